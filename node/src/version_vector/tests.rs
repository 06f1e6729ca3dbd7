//! Property tests: random histories of writes, retries, reads, joins, flushes, restarts,
//! crashes, wipes and handoffs at several replicas, checked against a model that does not trust
//! the implementation's contexts.
//!
//! The model gives every write a unique value and records its causal history: the dots its
//! writer had actually seen (computed by the model from what the writer read and wrote, not
//! taken from the implementation's returned context) plus its own dot. From that it checks:
//! no dot is issued twice; the coordinator's state holds every dot its current actor issued,
//! as one version-vector entry; no stored sibling lies in another's history; and after all
//! replicas are joined every written dot is either stored, or was seen by the writer of some
//! later write, or had its only copies lost by a crash or a wipe.
//!
//! Like the real coordinator, the model applies every write to the coordinating replica's own
//! state, which is where it is stored; a crash keeps only the state as of the last flush.

use super::*;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{BTreeMap, BTreeSet};

/// The number of cases for a property: `default` unless `PROPTEST_CASES` says otherwise.
pub(super) fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const REPLICAS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// A client writes at `replica` with one of the contexts clients hold (or none: a blind
    /// write); `delete` writes a tombstone.
    Write {
        replica: Index,
        context: Option<Index>,
        delete: bool,
    },
    /// A client retries an earlier logical write (same request id, context and value) at
    /// `replica`, which may or may not be the one that took it first.
    Retry { replica: Index, request: Index },
    /// A client reads a replica and keeps its context.
    Read { replica: Index },
    /// Replication, read repair or anti-entropy: `to` joins `from`'s state.
    Join { from: Index, to: Index },
    /// The replica's storage flushes: its state is durable.
    Flush { replica: Index },
    /// A clean shutdown (after a final flush) and restart: the actor carries on.
    CleanRestart { replica: Index },
    /// A crash: the state falls back to the last flush, and the start is unclean.
    Crash { replica: Index },
    /// The data directory is wiped: empty state, and `on_start(None, ..)` a new actor.
    Wipe { replica: Index },
    /// `from` hands the key over to `to` (which stores it durably) and deletes its own state,
    /// retiring its actor with `on_local_deletion`.
    Handoff { from: Index, to: Index },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<Index>(), any::<Option<Index>>(), prop::bool::weighted(0.15)).prop_map(
            |(replica, context, delete)| Op::Write { replica, context, delete }
        ),
        1 => (any::<Index>(), any::<Index>())
            .prop_map(|(replica, request)| Op::Retry { replica, request }),
        3 => any::<Index>().prop_map(|replica| Op::Read { replica }),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(from, to)| Op::Join { from, to }),
        2 => any::<Index>().prop_map(|replica| Op::Flush { replica }),
        1 => any::<Index>().prop_map(|replica| Op::CleanRestart { replica }),
        1 => any::<Index>().prop_map(|replica| Op::Crash { replica }),
        1 => any::<Index>().prop_map(|replica| Op::Wipe { replica }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(from, to)| Op::Handoff { from, to }),
    ]
}

/// A history and the order in which the final join visits the replicas.
fn history() -> impl Strategy<Value = (Vec<Op>, Vec<usize>, u64)> {
    (
        prop::collection::vec(op(), 1..60),
        Just((0..REPLICAS).collect::<Vec<_>>()).prop_shuffle(),
        any::<u64>(),
    )
}

/// A context a client holds: the implementation's, and the model's set of dots it really saw.
#[derive(Clone, Debug)]
struct Held {
    context: CausalContext,
    seen: BTreeSet<Dot>,
}

#[derive(Clone, Debug)]
struct Request {
    id: RequestId,
    held: Held,
    value: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Replica {
    clock: ActorClock,
    /// The incarnation record in its data directory (persisted durably when written).
    record: IncarnationRecord,
    /// The stored state, as the node reads it (memory and disk).
    state: KeyState,
    /// The state as of the last flush: what a crash leaves.
    durable: KeyState,
}

impl Replica {
    fn start((clock, record): (ActorClock, IncarnationRecord)) -> Replica {
        Replica {
            clock,
            record,
            state: KeyState::new(),
            durable: KeyState::new(),
        }
    }
}

#[derive(Debug)]
struct World {
    replicas: Vec<Replica>,
    /// Every dot written, with the causal history of its write (seen ∪ {dot}).
    history: BTreeMap<Dot, BTreeSet<Dot>>,
    /// Dots that some applied write's writer had seen: they may legitimately be gone, and so
    /// may every other copy of the same logical write (same request id, stored by a retry).
    superseded: BTreeSet<Dot>,
    /// The logical write each dot carries.
    request_of: BTreeMap<Dot, RequestId>,
    /// Dots whose only copies were lost by a crash or a wipe: lost to durability, not by the
    /// algorithm.
    lost: BTreeSet<Dot>,
    held: Vec<Held>,
    requests: Vec<Request>,
    /// States as they were at some moment, for the join laws.
    snapshots: Vec<KeyState>,
    next_actor: u64,
}

impl World {
    fn new(seed: u64) -> World {
        let mut world = World {
            replicas: Vec::new(),
            history: BTreeMap::new(),
            superseded: BTreeSet::new(),
            request_of: BTreeMap::new(),
            lost: BTreeSet::new(),
            held: Vec::new(),
            requests: Vec::new(),
            snapshots: vec![KeyState::new()],
            // Spread actors over the u64 range so their order is arbitrary.
            next_actor: seed,
        };
        for _ in 0..REPLICAS {
            let started = on_start(None, world.fresh_actor());
            world.replicas.push(Replica::start(started));
        }
        world
    }

    fn fresh_actor(&mut self) -> u64 {
        self.next_actor = self
            .next_actor
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.next_actor
    }

    /// The written dots a context contains: what a reader of it has seen.
    fn seen_in(&self, context: &CausalContext) -> BTreeSet<Dot> {
        self.history
            .keys()
            .filter(|d| context.contains(d))
            .copied()
            .collect()
    }

    /// Replica `i`'s state is about to become `kept`: records as lost the siblings whose only
    /// copy that was (no other replica has seen them and `kept` does not hold them).
    fn losing_state_of(&mut self, i: usize, kept: &KeyState) {
        let lost: Vec<Dot> = self.replicas[i]
            .state
            .siblings()
            .iter()
            .map(|s| s.dot)
            .filter(|d| !kept.context().contains(d))
            .filter(|d| {
                self.replicas
                    .iter()
                    .enumerate()
                    .all(|(j, r)| j == i || !r.state.context().contains(d))
            })
            .collect();
        self.lost.extend(lost);
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write {
                replica,
                context,
                delete,
            } => {
                let held = match context {
                    Some(i) if !self.held.is_empty() => self.held[i.index(self.held.len())].clone(),
                    _ => Held {
                        context: CausalContext::new(),
                        seen: BTreeSet::new(),
                    },
                };
                let n = self.requests.len() as u64;
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&n.to_le_bytes());
                let value = if *delete {
                    None
                } else {
                    Some(n.to_le_bytes().to_vec())
                };
                let request = Request {
                    id: RequestId(id),
                    held,
                    value,
                };
                self.requests.push(request.clone());
                self.write(replica.index(REPLICAS), &request);
            }
            Op::Retry { replica, request } => {
                if !self.requests.is_empty() {
                    let request = self.requests[request.index(self.requests.len())].clone();
                    self.write(replica.index(REPLICAS), &request);
                }
            }
            Op::Read { replica } => {
                let context = self.replicas[replica.index(REPLICAS)]
                    .state
                    .context()
                    .clone();
                let seen = self.seen_in(&context);
                self.held.push(Held { context, seen });
            }
            Op::Join { from, to } => {
                let (from, to) = (from.index(REPLICAS), to.index(REPLICAS));
                let source = self.replicas[from].state.clone();
                self.replicas[to].state.join_in_place(&source);
                self.check_no_sibling_supersedes_another(&self.replicas[to].state);
                self.snapshots.push(self.replicas[to].state.clone());
            }
            Op::Flush { replica } => {
                let r = &mut self.replicas[replica.index(REPLICAS)];
                r.durable = r.state.clone();
            }
            Op::CleanRestart { replica } => {
                let fresh = self.fresh_actor();
                let r = &mut self.replicas[replica.index(REPLICAS)];
                r.durable = r.state.clone();
                let (clock, record) = on_start(Some(on_clean_shutdown(&r.clock)), fresh);
                assert_eq!(clock.actor(), r.clock.actor());
                (r.clock, r.record) = (clock, record);
            }
            Op::Crash { replica } => {
                let i = replica.index(REPLICAS);
                let fresh = self.fresh_actor();
                let durable = self.replicas[i].durable.clone();
                self.losing_state_of(i, &durable);
                let r = &mut self.replicas[i];
                assert!(!r.record.clean_shutdown);
                let (clock, record) = on_start(Some(r.record), fresh);
                assert_ne!(clock.actor(), r.clock.actor());
                (r.clock, r.record, r.state) = (clock, record, durable);
            }
            Op::Wipe { replica } => {
                let i = replica.index(REPLICAS);
                let fresh = self.fresh_actor();
                self.losing_state_of(i, &KeyState::new());
                self.replicas[i] = Replica::start(on_start(None, fresh));
            }
            Op::Handoff { from, to } => {
                let from = from.index(REPLICAS);
                let mut to = to.index(REPLICAS);
                if to == from {
                    to = (from + 1) % REPLICAS;
                }
                let fresh = self.fresh_actor();
                let source = self.replicas[from].state.clone();
                let receiver = &mut self.replicas[to];
                receiver.state.join_in_place(&source);
                receiver.durable = receiver.state.clone();
                self.snapshots.push(receiver.state.clone());
                let retired = on_local_deletion(&self.replicas[from].clock, fresh);
                assert_ne!(retired.0.actor(), self.replicas[from].clock.actor());
                self.replicas[from] = Replica::start(retired);
            }
        }
        self.check_own_dots_are_stored();
    }

    /// The invariant per-key counters rest on: each replica's state holds every dot its current
    /// actor issued for the key, contiguously, so they are one version-vector entry.
    fn check_own_dots_are_stored(&self) {
        for r in &self.replicas {
            let actor = r.clock.actor();
            let issued: Vec<&Dot> = self.history.keys().filter(|d| d.actor == actor).collect();
            for (n, dot) in issued.iter().enumerate() {
                assert_eq!(dot.counter, n as u64 + 1, "{actor}'s dots have a gap");
                assert!(r.state.context().contains(dot), "{dot} forgotten: {r:?}");
            }
            assert!(
                r.state.context().cloud().iter().all(|d| d.actor != actor),
                "own dots in the cloud: {r:?}"
            );
        }
    }

    fn write(&mut self, replica: usize, request: &Request) {
        let r = &mut self.replicas[replica];
        let dot = r.clock.next_dot(&r.state);
        let outcome = r
            .state
            .update(
                &request.held.context,
                dot,
                request.id,
                0,
                request.value.clone(),
            )
            .expect("a legitimate write is never refused");
        let seen = if outcome.is_retry {
            let mut seen = request.held.seen.clone();
            seen.extend(
                r.state
                    .siblings()
                    .iter()
                    .filter(|s| s.request_id == request.id)
                    .map(|s| s.dot),
            );
            seen
        } else {
            assert_eq!(outcome.dot, Some(dot));
            assert!(!self.history.contains_key(&dot), "dot {dot} issued twice");
            let mut history = request.held.seen.clone();
            history.insert(dot);
            self.superseded.extend(request.held.seen.iter().copied());
            self.request_of.insert(dot, request.id);
            self.history.insert(dot, history.clone());
            history
        };
        // The writer is handed back exactly what it saw plus its write: no more, no less.
        for d in self.history.keys() {
            assert_eq!(
                outcome.context.contains(d),
                seen.contains(d),
                "returned context {:?} disagrees with the model on {d}",
                outcome.context
            );
        }
        let state = self.replicas[replica].state.clone();
        self.check_no_sibling_supersedes_another(&state);
        self.snapshots.push(state);
        self.held.push(Held {
            context: outcome.context,
            seen,
        });
    }

    fn check_no_sibling_supersedes_another(&self, state: &KeyState) {
        for s in state.siblings() {
            for t in state.siblings() {
                if s.dot != t.dot {
                    assert!(
                        !self.history[&t.dot].contains(&s.dot),
                        "sibling {} is in the history of sibling {}: {state:?}",
                        s.dot,
                        t.dot
                    );
                }
            }
        }
    }

    fn join_all(&self, order: &[usize]) -> KeyState {
        let mut state = KeyState::new();
        for i in order {
            state.join_in_place(&self.replicas[*i].state);
        }
        state
    }
}

fn run(ops: &[Op], seed: u64) -> World {
    let mut world = World::new(seed);
    for op in ops {
        world.apply(op);
    }
    world
}

fn pick<'a>(world: &'a World, i: &Index) -> &'a KeyState {
    &world.snapshots[i.index(world.snapshots.len())]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    /// Nothing acknowledged is silently dropped, and no sibling ever supersedes another, in any
    /// history and whatever order the replicas are finally joined in.
    #[test]
    fn no_acknowledged_write_is_lost((ops, order, seed) in history()) {
        let world = run(&ops, seed);
        let forward = world.join_all(&order);
        let backward: Vec<usize> = order.iter().rev().copied().collect();
        prop_assert_eq!(forward.encode_canonical(), world.join_all(&backward).encode_canonical());
        world.check_no_sibling_supersedes_another(&forward);
        let stored: BTreeSet<Dot> = forward.siblings().iter().map(|s| s.dot).collect();
        let superseded_requests: BTreeSet<RequestId> =
            world.superseded.iter().filter_map(|d| world.request_of.get(d)).copied().collect();
        for dot in world.history.keys() {
            let copy_superseded = superseded_requests.contains(&world.request_of[dot]);
            prop_assert!(
                stored.contains(dot)
                    || world.superseded.contains(dot)
                    || copy_superseded
                    || world.lost.contains(dot),
                "write {} vanished without being superseded: {:?}", dot, forward
            );
        }
        // Reads show one sibling per logical write.
        let ids: Vec<RequestId> = forward.live_siblings().iter().map(|s| s.request_id).collect();
        let unique: BTreeSet<RequestId> = ids.iter().copied().collect();
        prop_assert_eq!(ids.len(), unique.len());
    }

    /// Join is commutative, associative and idempotent; the canonical encoding round-trips and
    /// equal states hash equal.
    #[test]
    fn join_is_a_semilattice(
        (ops, _, seed) in history(), i in any::<Index>(), j in any::<Index>(), k in any::<Index>()
    ) {
        let world = run(&ops, seed);
        let (a, b, c) = (pick(&world, &i), pick(&world, &j), pick(&world, &k));
        let bytes = |s: &KeyState| s.encode_canonical();
        prop_assert_eq!(bytes(&a.join(b)), bytes(&b.join(a)));
        prop_assert_eq!(bytes(&a.join(b).join(c)), bytes(&a.join(&b.join(c))));
        prop_assert_eq!(bytes(&a.join(a)), bytes(a));
        prop_assert_eq!(a.join(b).state_hash(), b.join(a).state_hash());
        for s in [a, b, c, &a.join(b).join(c)] {
            let decoded = KeyState::decode(&bytes(s)).unwrap();
            prop_assert_eq!(&decoded, s);
            prop_assert_eq!(decoded.state_hash(), s.state_hash());
        }
    }

    /// Writes whose contexts do not cover each other become siblings, wherever they are
    /// coordinated, and stay siblings through replication.
    #[test]
    fn concurrent_writes_become_siblings(
        (ops, _, seed) in history(), r1 in any::<Index>(), r2 in any::<Index>()
    ) {
        let mut world = run(&ops, seed);
        let (r1, r2) = (r1.index(REPLICAS), r2.index(REPLICAS));
        let read1 = world.replicas[r1].state.context().clone();
        let read2 = world.replicas[r2].state.context().clone();
        let mut dots = Vec::new();
        for (n, (r, ctx)) in [(r1, read1), (r2, read2)].into_iter().enumerate() {
            let rep = &mut world.replicas[r];
            let dot = rep.clock.next_dot(&rep.state);
            let tag = 0xf0 + n as u8;
            rep.state.update(&ctx, dot, RequestId([tag; 16]), 0, Some(vec![tag])).unwrap();
            dots.push(dot);
        }
        let joined = world.replicas[r1].state.join(&world.replicas[r2].state);
        let values = joined.values();
        prop_assert!(
            values.contains(&&[0xf0u8][..]) && values.contains(&&[0xf1u8][..]),
            "{:?}", joined
        );
    }

    /// Two writes with the same stale context at the same coordinator keep both values. (A
    /// per-node vector clock would give the second write a clock that dominates the first.)
    #[test]
    fn same_stale_context_at_one_coordinator_keeps_both(
        (ops, _, seed) in history(), stale in any::<Index>(), r in any::<Index>()
    ) {
        let mut world = run(&ops, seed);
        let context = if world.held.is_empty() {
            CausalContext::new()
        } else {
            world.held[stale.index(world.held.len())].context.clone()
        };
        let rep = &mut world.replicas[r.index(REPLICAS)];
        for n in [1u8, 2] {
            let dot = rep.clock.next_dot(&rep.state);
            let tag = 0xe0 + n;
            rep.state.update(&context, dot, RequestId([tag; 16]), 0, Some(vec![tag])).unwrap();
        }
        let values = rep.state.values();
        prop_assert!(
            values.contains(&&[0xe1u8][..]) && values.contains(&&[0xe2u8][..]),
            "{:?}", rep.state
        );
    }

    /// A write with the coordinator's whole current context leaves exactly one value there.
    #[test]
    fn a_write_with_the_full_context_leaves_one_value(
        (ops, _, seed) in history(), r in any::<Index>()
    ) {
        let mut world = run(&ops, seed);
        let rep = &mut world.replicas[r.index(REPLICAS)];
        let context = rep.state.context().clone();
        let dot = rep.clock.next_dot(&rep.state);
        rep.state.update(&context, dot, RequestId([0xd0; 16]), 0, Some(vec![0xd0])).unwrap();
        prop_assert_eq!(rep.state.sibling_count(), 1);
        prop_assert_eq!(rep.state.values(), vec![&[0xd0u8][..]]);
    }

    /// A retry through another coordinator creates a second dot, but reads show the write once;
    /// a retry through the same coordinator creates nothing.
    #[test]
    fn retries_show_once((ops, _, seed) in history(), r1 in any::<Index>(), r2 in any::<Index>()) {
        let mut world = run(&ops, seed);
        let (r1, r2) = (r1.index(REPLICAS), r2.index(REPLICAS));
        let context = world.replicas[r1].state.context().clone();
        let id = RequestId([0xc0; 16]);
        let mut first = None;
        for r in [r1, r2] {
            let rep = &mut world.replicas[r];
            let before = rep.state.clone();
            let dot = rep.clock.next_dot(&rep.state);
            let outcome = rep.state.update(&context, dot, id, 0, Some(vec![0xc0])).unwrap();
            if first.is_some() && r == r1 {
                prop_assert!(outcome.is_retry);
                prop_assert_eq!(&rep.state, &before);
            }
            first.get_or_insert(outcome.dot);
        }
        let joined = world.replicas[r1].state.join(&world.replicas[r2].state);
        let copies = joined.values().iter().filter(|v| **v == [0xc0u8]).count();
        prop_assert_eq!(copies, 1, "{:?}", joined);
        // Writing with the joined context replaces every copy.
        let rep = &mut world.replicas[r1];
        rep.state.join_in_place(&joined);
        let dot = rep.clock.next_dot(&rep.state);
        let context = rep.state.context().clone();
        rep.state.update(&context, dot, RequestId([0xc1; 16]), 0, Some(vec![0xc1])).unwrap();
        prop_assert_eq!(rep.state.values(), vec![&[0xc1u8][..]]);
    }
}
