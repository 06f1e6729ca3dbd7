//! Dot generation and the lifecycle of actors (node incarnations), as a pure state machine.

use super::context::{Actor, Dot};
use super::state::KeyState;
use serde::{Deserialize, Serialize};

/// The dot source of one node incarnation: its actor. Counters are per key and live in the
/// keys' states, not here, so the clock has nothing to persist but the actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorClock {
    actor: Actor,
}

impl ActorClock {
    /// The actor this clock issues dots for.
    pub fn actor(&self) -> Actor {
        self.actor
    }

    /// A fresh dot for a write to one key: `(actor, n + 1)`, where `n` is the highest counter
    /// of this actor that `state` knows of.
    ///
    /// Precondition: `state` is this node's own stored state of the key, read after every
    /// earlier write this node coordinated for the key was merged into its storage, and the
    /// write this dot is for is merged into storage (see [`KeyState::update`]) before another
    /// write of the key is coordinated here. Then `state` holds every dot this actor issued for
    /// the key (the invariant of the module documentation), so the dot is new, and contiguous
    /// with them: it folds into the version vector instead of growing the context. Given any
    /// other state (another replica's, a stale read), the dot may already be taken.
    ///
    /// The counter saturates at `u64::MAX` instead of wrapping: a saturated dot is refused by
    /// [`KeyState::update`] as not fresh, never reused.
    pub fn next_dot(&self, state: &KeyState) -> Dot {
        let counter = state.context().max_counter(self.actor).saturating_add(1);
        Dot::new(self.actor, counter)
    }
}

/// What a node persists about its actor, in the same data directory as its data so that both
/// are lost together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncarnationRecord {
    /// The actor of the incarnation that wrote the record.
    pub actor: Actor,
    /// True only when written by [`on_clean_shutdown`], after the final flush.
    pub clean_shutdown: bool,
}

/// Starts an incarnation.
///
/// `previous` is the record found in the data directory (`None` when it is new or was wiped);
/// `fresh_actor` is a random `u64` from the OS RNG, used unless the previous incarnation shut
/// down cleanly. Returns the clock to serve with and the record to persist durably (with
/// `clean_shutdown = false`) BEFORE serving anything, so that a crash from then on is seen as
/// unclean by the next start.
///
/// If `fresh_actor` happens to equal the previous actor (a broken RNG or caller), a different
/// actor is derived from it: an unclean start must never continue an old actor.
pub fn on_start(
    previous: Option<IncarnationRecord>,
    fresh_actor: u64,
) -> (ActorClock, IncarnationRecord) {
    let actor = match previous {
        Some(record) if record.clean_shutdown => record.actor,
        Some(record) => other_than(record.actor, fresh_actor),
        None => Actor(fresh_actor),
    };
    let clock = ActorClock { actor };
    let record = unclean_record(&clock);
    (clock, record)
}

/// The record to write at a clean shutdown, after the final flush of all data and after the
/// node has stopped accepting writes. The next start continues this actor.
pub fn on_clean_shutdown(clock: &ActorClock) -> IncarnationRecord {
    IncarnationRecord {
        actor: clock.actor,
        clean_shutdown: true,
    }
}

/// Retires the actor after this node deleted local state of keys (tombstone collection,
/// handing a range over to another node, any other removal that is not a join).
///
/// A deleted state took with it the only record of the dots the actor issued for those keys,
/// so the actor would issue them again. `fresh_actor` is a random `u64` from the OS RNG; if it
/// equals the current actor a different one is derived from it, as in [`on_start`]. Returns
/// the clock to coordinate with from now on and the record to persist durably (with
/// `clean_shutdown = false`) before the first write it coordinates. No write may be
/// coordinated with the old clock once any of the deletion has taken effect.
pub fn on_local_deletion(clock: &ActorClock, fresh_actor: u64) -> (ActorClock, IncarnationRecord) {
    let clock = ActorClock {
        actor: other_than(clock.actor, fresh_actor),
    };
    let record = unclean_record(&clock);
    (clock, record)
}

/// `Actor(fresh)`, or a different actor derived from it if that is `old`.
fn other_than(old: Actor, fresh: u64) -> Actor {
    if fresh == old.0 {
        Actor(fresh.wrapping_add(1))
    } else {
        Actor(fresh)
    }
}

fn unclean_record(clock: &ActorClock) -> IncarnationRecord {
    IncarnationRecord {
        actor: clock.actor,
        clean_shutdown: false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::context::CausalContext;
    use super::super::state::RequestId;
    use super::*;

    fn write(clock: &ActorClock, state: &mut KeyState, n: u8) -> Dot {
        let dot = clock.next_dot(state);
        state
            .update(&CausalContext::new(), dot, RequestId([n; 16]), 0, None)
            .unwrap();
        dot
    }

    #[test]
    fn a_new_or_wiped_data_directory_gets_a_fresh_actor() {
        let (clock, record) = on_start(None, 0xfeed);
        assert_eq!(clock.actor(), Actor(0xfeed));
        assert_eq!(record.actor, Actor(0xfeed));
        assert!(!record.clean_shutdown);
        assert_eq!(clock.next_dot(&KeyState::new()), Dot::new(Actor(0xfeed), 1));
    }

    #[test]
    fn an_unclean_start_abandons_the_old_actor() {
        let previous = IncarnationRecord {
            actor: Actor(7),
            clean_shutdown: false,
        };
        let (clock, record) = on_start(Some(previous), 9);
        assert_eq!(clock.actor(), Actor(9));
        assert_eq!(record.actor, Actor(9));
        assert!(!record.clean_shutdown);
        // Even when the RNG hands back the old actor.
        let (clock, record) = on_start(Some(previous), 7);
        assert_ne!(clock.actor(), Actor(7));
        assert_eq!(record.actor, clock.actor());
    }

    #[test]
    fn a_clean_restart_continues_the_actor_and_the_keys_counters() {
        let (clock, _) = on_start(None, 5);
        let mut state = KeyState::new();
        let issued: Vec<Dot> = (1..=3).map(|n| write(&clock, &mut state, n)).collect();
        let record = on_clean_shutdown(&clock);
        assert!(record.clean_shutdown);
        let (again, persisted) = on_start(Some(record), 99);
        assert_eq!(again.actor(), Actor(5));
        assert!(
            !persisted.clean_shutdown,
            "persisted before serving as unclean"
        );
        // The counters live in the (flushed) key states, so the next dot follows on.
        assert_eq!(again.next_dot(&state), Dot::new(Actor(5), 4));
        assert!(issued.iter().all(|d| d.counter < 4));
        // The record round-trips through serde as the storage writes it (with field names),
        // and a record from before counters were per key still decodes.
        let bytes = rmp_serde::to_vec_named(&persisted).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<IncarnationRecord>(&bytes).unwrap(),
            persisted
        );
        #[derive(Serialize)]
        struct Minimal {
            actor: Actor,
            clean_shutdown: bool,
        }
        let bytes = rmp_serde::to_vec_named(&Minimal {
            actor: Actor(5),
            clean_shutdown: true,
        })
        .unwrap();
        let decoded: IncarnationRecord = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!((decoded.actor, decoded.clean_shutdown), (Actor(5), true));
    }

    #[test]
    fn counters_are_per_key_and_contiguous() {
        let (clock, _) = on_start(None, 1);
        let mut key_a = KeyState::new();
        let mut key_b = KeyState::new();
        for round in 1..=5u64 {
            // Writes to other keys leave no gaps in this one.
            let n = 2 * round as u8;
            assert_eq!(write(&clock, &mut key_a, n).counter, round);
            assert_eq!(write(&clock, &mut key_b, n + 1).counter, round);
        }
        assert_eq!(key_a.context().len(), 1, "{:?}", key_a.context());
        assert!(key_a.context().cloud().is_empty());
        // A state that knows a higher dot of this actor (only a reused actor or a forged
        // context can put one there) pushes the key's counter past it.
        let far = Dot::new(Actor(1), 10);
        key_b
            .update(&CausalContext::new(), far, RequestId([99; 16]), 0, None)
            .unwrap();
        assert_eq!(clock.next_dot(&key_b).counter, 11);
        assert_eq!(clock.next_dot(&key_a).counter, 6);
    }

    #[test]
    fn a_local_deletion_retires_the_actor() {
        let (clock, _) = on_start(None, 3);
        let (retired, record) = on_local_deletion(&clock, 4);
        assert_eq!(retired.actor(), Actor(4));
        assert_eq!(record.actor, Actor(4));
        assert!(
            !record.clean_shutdown,
            "persisted as unclean, like on_start"
        );
        // Even when the RNG hands back the current actor.
        let (retired, record) = on_local_deletion(&clock, 3);
        assert_ne!(retired.actor(), Actor(3));
        assert_eq!(record.actor, retired.actor());
        // A deleted key starts again at 1, under an actor nobody has seen.
        assert_eq!(retired.next_dot(&KeyState::new()).counter, 1);
    }

    #[test]
    fn a_saturated_counter_is_refused_not_reused() {
        let (clock, _) = on_start(None, 1);
        let mut state = KeyState::new();
        let top = Dot::new(Actor(1), u64::MAX);
        state
            .update(&CausalContext::new(), top, RequestId([1; 16]), 0, None)
            .unwrap();
        let again = clock.next_dot(&state);
        assert_eq!(again, top, "saturates instead of wrapping to 0");
        let before = state.clone();
        let err = state.update(&CausalContext::new(), again, RequestId([2; 16]), 0, None);
        assert!(
            matches!(err, Err(crate::Error::DotNotFresh { dot }) if dot == top),
            "{err:?}"
        );
        assert_eq!(state, before);
    }
}
