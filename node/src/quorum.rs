//! Quorum accounting: counting replica answers against what a request requires.
//!
//! A coordinator asks the N replicas of a key and must decide, answer by answer, whether the
//! request has reached its quorum, can no longer reach it, or must keep waiting. This module
//! makes that decision and nothing else: it holds no sockets, reads no clock and never waits.
//! The coordinator feeds it events ([`Tally::record`]) and asks for the [`Verdict`]; when the
//! request's deadline passes the coordinator calls [`Tally::shortfall`] to say what was
//! required and what was reached.
//!
//! A write has two thresholds (as in Riak): `w` replicas must have applied it, and `dw` of them
//! must have flushed it to disk. A replica reports each stage separately, so a fast replica that
//! has applied but not yet flushed already counts toward `w`. A read has one threshold, `r`,
//! and its `dw` is zero.
//!
//! The verdict is *failed* as soon as the replicas still waiting could not make up the
//! difference, so a request fails fast when, say, two of three replicas are known to be down
//! and W = 3, instead of waiting for its timeout. Answers that arrive after the verdict are
//! still recorded but never change a decided verdict.
//!
//! **Invariant:** a verdict, once `Reached` or `Failed`, never changes.

use quorumkv_ring::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// An answer (or a failure) from one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaProgress {
    /// Answered: applied the write, or returned its copy for a read.
    Applied,
    /// Applied and flushed to disk.
    Durable,
    /// Failed, timed out at the transport, or known to be down.
    Failed,
}

/// What the tally knows of one replica. Separate from [`ReplicaProgress`] because "applied,
/// then failed to flush" counts toward `w` but can no longer count toward `dw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Applied,
    Durable,
    Failed,
    AppliedThenFailed,
}

impl State {
    fn applied(self) -> bool {
        matches!(
            self,
            State::Applied | State::Durable | State::AppliedThenFailed
        )
    }
}

/// The decision so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Neither reached nor impossible yet.
    Pending,
    /// Both thresholds are met.
    Reached,
    /// The replicas still waiting cannot make up the shortfall.
    Failed,
}

/// What a request required and what it reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub required: u8,
    pub acked: u8,
    pub durable_required: u8,
    pub durable_acked: u8,
}

/// Counts one request's replica answers.
///
/// Each primary owner has one slot. Under a sloppy quorum a fallback may answer in an owner's
/// place ([`Tally::substitute`]); its answer fills the owner's slot and counts toward
/// `required` and `durable_required`, but not toward `primary_required` (Riak's PW), which only
/// answers of the owners themselves fulfil.
#[derive(Clone, Debug)]
pub struct Tally {
    required: u8,
    durable_required: u8,
    primary_required: u8,
    replicas: BTreeMap<NodeId, State>,
    /// Owners whose slot a fallback answers.
    substituted: BTreeSet<NodeId>,
    decided: Option<Verdict>,
}

impl Tally {
    /// A tally over `replicas`, requiring `required` answers of which `durable_required` durable.
    ///
    /// The caller has validated `durable_required <= required <= replicas.len()`; if it has not,
    /// the tally is simply impossible to reach and fails at once.
    pub fn new(
        replicas: impl IntoIterator<Item = NodeId>,
        required: u8,
        durable_required: u8,
    ) -> Tally {
        Tally::with_primaries(replicas, required, durable_required, 0)
    }

    /// A tally that also requires `primary_required` of the answers to come from the owners
    /// themselves rather than fallbacks standing in for them.
    pub fn with_primaries(
        replicas: impl IntoIterator<Item = NodeId>,
        required: u8,
        durable_required: u8,
        primary_required: u8,
    ) -> Tally {
        let replicas = replicas
            .into_iter()
            .map(|node| (node, State::Waiting))
            .collect();
        let mut tally = Tally {
            required,
            durable_required,
            primary_required,
            replicas,
            substituted: BTreeSet::new(),
            decided: None,
        };
        tally.decide();
        tally
    }

    /// From now on, `owner`'s slot is answered by a fallback holding a hint for it. Must be
    /// called before anything is recorded for the slot.
    pub fn substitute(&mut self, owner: &NodeId) -> Verdict {
        if self.replicas.get(owner) == Some(&State::Waiting) {
            self.substituted.insert(owner.clone());
        }
        self.decide()
    }

    /// Answers counted toward `required` that came from fallbacks (hinted).
    pub fn hinted(&self) -> u8 {
        self.replicas
            .iter()
            .filter(|(node, state)| state.applied() && self.substituted.contains(*node))
            .count() as u8
    }

    /// Whether `owner`'s slot holds an answer (its own or a fallback's) that applied.
    pub fn applied(&self, owner: &NodeId) -> bool {
        self.replicas
            .get(owner)
            .is_some_and(|state| state.applied())
    }

    /// Records that `node` reached `progress`. Progress only moves forward (a late `Applied`
    /// after `Durable` changes nothing), and a replica that failed after applying keeps the
    /// applied answer it already gave.
    pub fn record(&mut self, node: &NodeId, progress: ReplicaProgress) -> Verdict {
        if let Some(current) = self.replicas.get_mut(node) {
            *current = match (*current, progress) {
                (State::Waiting, ReplicaProgress::Applied) => State::Applied,
                (State::Waiting, ReplicaProgress::Durable) => State::Durable,
                (State::Waiting, ReplicaProgress::Failed) => State::Failed,
                (State::Applied, ReplicaProgress::Durable) => State::Durable,
                // A replica that applied and then failed to flush still applied.
                (State::Applied, ReplicaProgress::Failed) => State::AppliedThenFailed,
                (current, _) => current,
            };
        }
        self.decide()
    }

    /// How many answers the request requires.
    pub fn required(&self) -> u8 {
        self.required
    }

    /// The verdict so far.
    pub fn verdict(&self) -> Verdict {
        self.decided.unwrap_or(Verdict::Pending)
    }

    /// What was required and what was reached, for the error a failed request returns. Each
    /// count stops at its requirement, so an error never reads "2 of 1 durable": a
    /// requirement that was met shows as met, whatever else fell short.
    pub fn shortfall(&self) -> Shortfall {
        Shortfall {
            required: self.required,
            acked: self.count(State::applied).min(self.required),
            durable_required: self.durable_required,
            durable_acked: self
                .count(|s| s == State::Durable)
                .min(self.durable_required),
        }
    }

    /// The replicas that have not answered yet.
    pub fn waiting(&self) -> impl Iterator<Item = &NodeId> {
        self.replicas
            .iter()
            .filter(|(_, s)| **s == State::Waiting)
            .map(|(node, _)| node)
    }

    fn count(&self, pred: impl Fn(State) -> bool) -> u8 {
        // At most a preference list's worth of replicas, far below u8::MAX.
        self.replicas.values().filter(|p| pred(**p)).count() as u8
    }

    fn decide(&mut self) -> Verdict {
        if let Some(verdict) = self.decided {
            return verdict;
        }
        let applied = self.count(State::applied);
        let durable = self.count(|s| s == State::Durable);
        let waiting = self.count(|s| s == State::Waiting);
        let may_still_flush = self.count(|s| s == State::Applied);
        let primary = |pred: fn(State) -> bool| {
            self.replicas
                .iter()
                .filter(|(node, state)| pred(**state) && !self.substituted.contains(*node))
                .count() as u8
        };
        let primary_applied = primary(State::applied);
        let primary_waiting = primary(|s| s == State::Waiting);
        let verdict = if applied >= self.required
            && durable >= self.durable_required
            && primary_applied >= self.primary_required
        {
            Verdict::Reached
        } else if applied + waiting < self.required
            || durable + waiting + may_still_flush < self.durable_required
            || primary_applied + primary_waiting < self.primary_required
        {
            Verdict::Failed
        } else {
            Verdict::Pending
        };
        if verdict != Verdict::Pending {
            self.decided = Some(verdict);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicaProgress::*;

    fn nodes() -> Vec<NodeId> {
        ["a", "b", "c"]
            .iter()
            .map(|id| NodeId::new(*id).unwrap())
            .collect()
    }

    fn id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    #[test]
    fn write_reaches_w_and_dw() {
        let mut tally = Tally::new(nodes(), 2, 1);
        assert_eq!(tally.record(&id("a"), Applied), Verdict::Pending);
        // Two applied, none durable yet: W met, DW not.
        assert_eq!(tally.record(&id("b"), Applied), Verdict::Pending);
        assert_eq!(tally.record(&id("b"), Durable), Verdict::Reached);
    }

    #[test]
    fn fails_fast_when_the_waiting_replicas_cannot_make_it() {
        // One node killed, W = 3: the failure decides at once, before any timeout.
        let mut tally = Tally::new(nodes(), 3, 1);
        tally.record(&id("a"), Durable);
        tally.record(&id("b"), Durable);
        assert_eq!(tally.record(&id("c"), Failed), Verdict::Failed);
        let shortfall = tally.shortfall();
        assert_eq!((shortfall.required, shortfall.acked), (3, 2));
        // Two durable answers against one required: the error says the requirement was met,
        // never "2 of 1 durable".
        assert_eq!(
            (shortfall.durable_required, shortfall.durable_acked),
            (1, 1)
        );
    }

    #[test]
    fn dw_zero_needs_no_flush() {
        let mut tally = Tally::new(nodes(), 1, 0);
        assert_eq!(tally.record(&id("c"), Applied), Verdict::Reached);
    }

    #[test]
    fn verdict_never_changes_once_decided() {
        let mut tally = Tally::new(nodes(), 1, 0);
        assert_eq!(tally.record(&id("a"), Applied), Verdict::Reached);
        tally.record(&id("b"), Failed);
        tally.record(&id("c"), Failed);
        assert_eq!(tally.verdict(), Verdict::Reached);
    }

    #[test]
    fn durable_can_still_come_from_an_applied_replica() {
        let mut tally = Tally::new(nodes(), 2, 2);
        tally.record(&id("a"), Applied);
        tally.record(&id("b"), Applied);
        assert_eq!(tally.record(&id("c"), Failed), Verdict::Pending);
        assert_eq!(tally.record(&id("a"), Durable), Verdict::Pending);
        assert_eq!(tally.record(&id("b"), Durable), Verdict::Reached);
    }

    #[test]
    fn a_replica_that_applied_then_failed_to_flush_keeps_its_applied_answer() {
        let mut tally = Tally::new(nodes(), 2, 2);
        tally.record(&id("a"), Durable);
        tally.record(&id("b"), Applied);
        tally.record(&id("c"), Failed);
        // b can no longer flush: DW = 2 is impossible.
        assert_eq!(tally.record(&id("b"), Failed), Verdict::Failed);
        assert_eq!(tally.shortfall().acked, 2);
        assert_eq!(tally.shortfall().durable_acked, 1);
    }

    #[test]
    fn answers_from_unknown_nodes_are_ignored() {
        let mut tally = Tally::new(nodes(), 1, 0);
        assert_eq!(tally.record(&id("z"), Applied), Verdict::Pending);
    }

    #[test]
    fn a_fallback_fills_its_owners_slot_but_not_a_primary_requirement() {
        // W = 2, PW = 2: a fallback standing in for c counts toward W, not toward PW.
        let mut tally = Tally::with_primaries(nodes(), 2, 0, 2);
        tally.substitute(&id("c"));
        tally.record(&id("a"), Applied);
        assert_eq!(tally.record(&id("c"), Applied), Verdict::Pending);
        assert_eq!(tally.hinted(), 1);
        assert_eq!(tally.record(&id("b"), Applied), Verdict::Reached);
        // PW = 2 with one owner failed and one substituted: impossible at once.
        let mut tally = Tally::with_primaries(nodes(), 2, 0, 2);
        tally.substitute(&id("c"));
        tally.record(&id("a"), Applied);
        assert_eq!(tally.record(&id("b"), Failed), Verdict::Failed);
        // Without PW the same answers reach W through the fallback.
        let mut tally = Tally::with_primaries(nodes(), 2, 0, 0);
        tally.substitute(&id("c"));
        tally.record(&id("a"), Applied);
        tally.record(&id("b"), Failed);
        assert_eq!(tally.record(&id("c"), Applied), Verdict::Reached);
    }

    #[test]
    fn impossible_requirements_fail_at_once() {
        let tally = Tally::new(nodes(), 4, 0);
        assert_eq!(tally.verdict(), Verdict::Failed);
    }
}
