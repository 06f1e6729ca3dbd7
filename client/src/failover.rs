//! One request's attempts: when to start another, and which outcome ends the request.
//!
//! [`Failover`] is a pure state machine. The client starts it with a plan, feeds it what
//! happened to each attempt ([`Event`]) and wakes it at [`Failover::deadline`]; it answers with
//! [`Action`]s: dial a target, send on a connection, abandon a dial, or finish. It never touches
//! a socket or a clock; every call takes `now`.
//!
//! # An attempt
//!
//! An attempt is one target (a node, or a seed) and two phases: *connecting* (waiting for the
//! client's one shared dial to that node, or taking its cached connection at once) and
//! *sending* (one request frame out on a fresh stream, one answer back). Only the sending phase
//! can have effects on the cluster.
//!
//! # Racing dials (every request)
//!
//! If an attempt is still connecting `connect_race_delay` after it started (a delay sized to
//! the handshakes seen so far, see `health`), the next target is dialed as well, and so on, as
//! Happy Eyeballs (RFC 8305) does with addresses: the first connection that completes gets the
//! request, and the other attempts are abandoned before they send anything (their dials go on
//! in the background and leave a cached connection, or a node marked down). This is safe for
//! writes too: a write is still sent to exactly one node. It is what lets a fresh process, which
//! knows nothing yet, avoid waiting out a dead seed or a dead first replica.
//!
//! # Hedging (reads only)
//!
//! A read that has been sent and has had no answer for `hedge_delay` (by default a high
//! percentile of recent read latencies, see `health`) is sent to the next target as well, at
//! most [`HEDGES_MAX`] times per request; the first answer that ends the request wins
//! (Cassandra's speculative retry, the ScyllaDB driver's speculative execution). Writes are
//! never hedged: until the duplicate-sibling defect of retried writes is fixed on the nodes, a
//! write must not be in flight at two coordinators at once. A write moves to another node only
//! after its attempt is over (refused, connection failed or went silent, or its time ran out),
//! and carries the same request id there.
//!
//! # Outcomes
//!
//! - [`Outcome::Answer`]: a success, or an answer that would be the same anywhere
//!   (`InvalidRequest`, `QuorumNotReached`, an authentication refusal). The request ends with it.
//! - [`Outcome::Retryable`]: `Overloaded`, `Unavailable`, or the attempt's time ran out. If no
//!   other attempt is in flight, the next target is tried after the next backoff delay, up to
//!   `retries` times (targets wrap around).
//! - [`Outcome::Unreachable`]: the dial failed, or the connection broke or went silent. The
//!   target is not tried again in this request, and if no other attempt is in flight the next
//!   one starts at once, without using a retry: a request should reach the one live node among
//!   five dead ones.
//!
//! When no target is left and nothing is in flight, the request ends with the last retryable
//! answer if there was one, or else "no node reachable".

use std::time::{Duration, Instant};

/// At most this many hedges per read: one more replica, as Cassandra's speculative retry sends.
pub(crate) const HEDGES_MAX: u32 = 1;

/// An attempt's index within its request.
pub(crate) type AttemptId = usize;

/// Whether a request may be in flight at two nodes at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Idempotent and without effects (`Get`, `ClusterInfo`): may be hedged.
    Read,
    /// `Put` and `Delete`: one node at a time. Also `Replicas`, which has no effects but waits
    /// for every replica by design, so hedging it would only double its cost.
    Write,
}

/// Everything a request's failover needs to know up front.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) kind: Kind,
    /// How many targets there are, best first.
    pub(crate) targets: usize,
    /// The delay before retry number i (one per retry allowed).
    pub(crate) backoffs: Vec<Duration>,
    /// How long a dial may be pending before the next target is dialed as well.
    pub(crate) connect_race_delay: Duration,
    /// For reads: how long a sent request may go unanswered before it is hedged. `None`: never.
    pub(crate) hedge_delay: Option<Duration>,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Answer,
    Retryable,
    Unreachable,
}

/// Something that happened to an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The attempt's connection is ready.
    Connected(AttemptId),
    /// The attempt is over.
    Ended(AttemptId, Outcome),
}

/// Why a new attempt started, for the client's logs and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The first attempt, or the next after a failure or backoff.
    Next,
    /// A dial was pending too long.
    ConnectRace,
    /// A read was unanswered too long.
    Hedge,
}

/// What the client should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start attempt `attempt` on target `target`: get its connection.
    Connect {
        attempt: AttemptId,
        target: usize,
        reason: Reason,
    },
    /// Send the request on the attempt's connection.
    Send(AttemptId),
    /// Drop a connecting attempt: it must not send (its dial may go on in the background).
    Abandon(AttemptId),
    /// The request is over.
    Finish(Finish),
}

/// How the request ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// With this attempt's answer.
    Answer(AttemptId),
    /// With this attempt's retryable error, the last one seen.
    Retryable(AttemptId),
    /// Every target was unreachable.
    Unreachable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sending,
    Over,
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    target: usize,
    phase: Phase,
    /// Started while another attempt was already sending: it may send too.
    hedge: bool,
}

/// The failover state of one request.
#[derive(Debug)]
pub(crate) struct Failover {
    plan: Plan,
    attempts: Vec<Attempt>,
    unreachable: Vec<bool>,
    /// The target to consider next (wrapping).
    cursor: usize,
    retries_used: u32,
    hedges_used: u32,
    last_retryable: Option<AttemptId>,
    /// While a backoff runs: when the next attempt may start.
    not_before: Option<Instant>,
    last_connect_start: Option<Instant>,
    last_send_start: Option<Instant>,
    finished: bool,
}

impl Failover {
    pub(crate) fn new(plan: Plan) -> Failover {
        let targets = plan.targets;
        Failover {
            plan,
            attempts: Vec::new(),
            unreachable: vec![false; targets],
            cursor: 0,
            retries_used: 0,
            hedges_used: 0,
            last_retryable: None,
            not_before: None,
            last_connect_start: None,
            last_send_start: None,
            finished: false,
        }
    }

    /// The first actions of the request.
    pub(crate) fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        self.start_next(now, Reason::Next, &mut actions);
        actions
    }

    /// Whether the request is over.
    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// How many retries the request used so far.
    #[cfg(test)]
    pub(crate) fn retries_used(&self) -> u32 {
        self.retries_used
    }

    /// What happened to an attempt, and what to do about it.
    pub(crate) fn on_event(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.finished {
            return actions;
        }
        match event {
            Event::Connected(id) => self.on_connected(now, id, &mut actions),
            Event::Ended(id, outcome) => self.on_ended(now, id, outcome, &mut actions),
        }
        actions
    }

    /// Called at (or after) [`Failover::deadline`].
    pub(crate) fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.finished {
            return actions;
        }
        if let Some(not_before) = self.not_before {
            if now >= not_before && self.in_flight() == 0 {
                self.not_before = None;
                self.start_next(now, Reason::Next, &mut actions);
            }
            return actions;
        }
        if self.race_due().is_some_and(|due| now >= due) {
            self.start_next(now, Reason::ConnectRace, &mut actions);
        } else if self.hedge_due().is_some_and(|due| now >= due) {
            self.hedges_used += 1;
            self.start_next(now, Reason::Hedge, &mut actions);
        }
        actions
    }

    /// When [`Failover::on_timer`] next has something to do, if ever.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        if let Some(not_before) = self.not_before {
            return Some(not_before);
        }
        [self.race_due(), self.hedge_due()]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_connected(&mut self, now: Instant, id: AttemptId, actions: &mut Vec<Action>) {
        let Some(attempt) = self.attempts.get(id).copied() else {
            return;
        };
        if attempt.phase != Phase::Connecting {
            return;
        }
        let someone_sending = self.attempts.iter().any(|a| a.phase == Phase::Sending);
        if someone_sending && !attempt.hedge {
            // A racing dial completed after another one already got the request.
            self.attempts[id].phase = Phase::Over;
            actions.push(Action::Abandon(id));
            return;
        }
        self.attempts[id].phase = Phase::Sending;
        self.last_send_start = Some(now);
        actions.push(Action::Send(id));
        // The dials this one raced against lose: only one of them may send.
        for (other, attempt) in self.attempts.iter_mut().enumerate() {
            if other != id && attempt.phase == Phase::Connecting && !attempt.hedge {
                attempt.phase = Phase::Over;
                actions.push(Action::Abandon(other));
            }
        }
    }

    fn on_ended(
        &mut self,
        now: Instant,
        id: AttemptId,
        outcome: Outcome,
        actions: &mut Vec<Action>,
    ) {
        let Some(attempt) = self.attempts.get(id).copied() else {
            return;
        };
        if attempt.phase == Phase::Over {
            return;
        }
        self.attempts[id].phase = Phase::Over;
        match outcome {
            Outcome::Answer => self.finish(Finish::Answer(id), actions),
            Outcome::Unreachable => {
                self.unreachable[attempt.target] = true;
                if self.in_flight() == 0 {
                    self.start_next(now, Reason::Next, actions);
                }
            }
            Outcome::Retryable => {
                self.last_retryable = Some(id);
                if self.in_flight() > 0 {
                    // Another attempt (a hedge or a racing dial) may still succeed.
                    return;
                }
                let Some(&delay) = self.plan.backoffs.get(self.retries_used as usize) else {
                    self.finish(Finish::Retryable(id), actions);
                    return;
                };
                self.retries_used += 1;
                if delay.is_zero() {
                    self.start_next(now, Reason::Next, actions);
                } else {
                    self.not_before = Some(now + delay);
                }
            }
        }
    }

    /// Starts an attempt on the next usable target, or finishes if none is left and nothing is
    /// in flight.
    fn start_next(&mut self, now: Instant, reason: Reason, actions: &mut Vec<Action>) {
        let targets = self.plan.targets;
        let busy: Vec<usize> = self
            .attempts
            .iter()
            .filter(|a| a.phase != Phase::Over)
            .map(|a| a.target)
            .collect();
        let next = (0..targets)
            .map(|offset| (self.cursor + offset) % targets.max(1))
            .find(|&target| !self.unreachable[target] && !busy.contains(&target));
        let Some(target) = next.filter(|_| targets > 0) else {
            if self.in_flight() == 0 {
                let finish = match self.last_retryable {
                    Some(id) => Finish::Retryable(id),
                    None => Finish::Unreachable,
                };
                self.finish(finish, actions);
            }
            return;
        };
        self.cursor = target + 1;
        let hedge = self.attempts.iter().any(|a| a.phase == Phase::Sending);
        let attempt = self.attempts.len();
        self.attempts.push(Attempt {
            target,
            phase: Phase::Connecting,
            hedge,
        });
        self.last_connect_start = Some(now);
        actions.push(Action::Connect {
            attempt,
            target,
            reason,
        });
    }

    fn finish(&mut self, finish: Finish, actions: &mut Vec<Action>) {
        self.finished = true;
        self.not_before = None;
        actions.push(Action::Finish(finish));
    }

    fn in_flight(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.phase != Phase::Over)
            .count()
    }

    /// When a pending dial should be raced, if one is pending and nothing is sending yet.
    fn race_due(&self) -> Option<Instant> {
        let connecting = self.attempts.iter().any(|a| a.phase == Phase::Connecting);
        let sending = self.attempts.iter().any(|a| a.phase == Phase::Sending);
        if !connecting || sending || !self.target_left() {
            return None;
        }
        Some(self.last_connect_start? + self.plan.connect_race_delay)
    }

    /// When an unanswered read should be hedged, if it may be.
    fn hedge_due(&self) -> Option<Instant> {
        let delay = match (self.plan.kind, self.plan.hedge_delay) {
            (Kind::Read, Some(delay)) => delay,
            _ => return None,
        };
        let sending = self.attempts.iter().any(|a| a.phase == Phase::Sending);
        let connecting = self.attempts.iter().any(|a| a.phase == Phase::Connecting);
        if !sending || connecting || self.hedges_used >= HEDGES_MAX || !self.target_left() {
            return None;
        }
        Some(self.last_send_start? + delay)
    }

    /// Whether some target is neither unreachable nor busy.
    fn target_left(&self) -> bool {
        (0..self.plan.targets).any(|target| {
            !self.unreachable[target]
                && !self
                    .attempts
                    .iter()
                    .any(|a| a.phase != Phase::Over && a.target == target)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn plan(kind: Kind, targets: usize) -> Plan {
        Plan {
            kind,
            targets,
            backoffs: vec![ms(10), ms(20), ms(40)],
            connect_race_delay: ms(30),
            hedge_delay: Some(ms(50)),
        }
    }

    fn connect(attempt: AttemptId, target: usize, reason: Reason) -> Action {
        Action::Connect {
            attempt,
            target,
            reason,
        }
    }

    #[test]
    fn a_healthy_request_is_one_attempt_on_the_first_target() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Read, 3));
        assert_eq!(failover.start(t0), [connect(0, 0, Reason::Next)]);
        assert_eq!(
            failover.on_event(t0 + ms(1), Event::Connected(0)),
            [Action::Send(0)]
        );
        assert_eq!(failover.deadline(), Some(t0 + ms(51)), "the hedge");
        assert_eq!(
            failover.on_event(t0 + ms(2), Event::Ended(0, Outcome::Answer)),
            [Action::Finish(Finish::Answer(0))]
        );
        assert!(failover.is_finished());
        assert_eq!(failover.deadline(), None);
    }

    #[test]
    fn a_slow_read_is_hedged_once_and_the_first_answer_wins() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Read, 3));
        failover.start(t0);
        failover.on_event(t0, Event::Connected(0));
        // Nothing before the hedge delay.
        assert!(failover.on_timer(t0 + ms(49)).is_empty());
        assert_eq!(
            failover.on_timer(t0 + ms(50)),
            [connect(1, 1, Reason::Hedge)]
        );
        // The hedge connects and sends although attempt 0 is still sending.
        assert_eq!(
            failover.on_event(t0 + ms(51), Event::Connected(1)),
            [Action::Send(1)]
        );
        // One hedge only: no more timers while both are in flight.
        assert_eq!(failover.deadline(), None);
        assert_eq!(
            failover.on_event(t0 + ms(52), Event::Ended(1, Outcome::Answer)),
            [Action::Finish(Finish::Answer(1))]
        );
    }

    #[test]
    fn a_write_is_never_hedged() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Write, 3));
        failover.start(t0);
        failover.on_event(t0, Event::Connected(0));
        assert_eq!(failover.deadline(), None);
        assert!(failover.on_timer(t0 + ms(10_000)).is_empty());
        assert_eq!(
            failover.on_event(t0 + ms(10_001), Event::Ended(0, Outcome::Answer)),
            [Action::Finish(Finish::Answer(0))]
        );
    }

    #[test]
    fn reads_are_not_hedged_when_hedging_is_off() {
        let t0 = Instant::now();
        let mut failover = Failover::new(Plan {
            hedge_delay: None,
            ..plan(Kind::Read, 3)
        });
        failover.start(t0);
        failover.on_event(t0, Event::Connected(0));
        assert_eq!(failover.deadline(), None);
    }

    #[test]
    fn a_pending_dial_is_raced_and_the_first_connection_gets_the_write() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Write, 3));
        failover.start(t0);
        assert_eq!(failover.deadline(), Some(t0 + ms(30)));
        assert_eq!(
            failover.on_timer(t0 + ms(30)),
            [connect(1, 1, Reason::ConnectRace)]
        );
        assert_eq!(failover.deadline(), Some(t0 + ms(60)), "races go on");
        // Target 1 connects first: it sends, and target 0's dial is abandoned.
        assert_eq!(
            failover.on_event(t0 + ms(35), Event::Connected(1)),
            [Action::Send(1), Action::Abandon(0)]
        );
        // A late connection of the abandoned attempt changes nothing.
        assert!(failover
            .on_event(t0 + ms(40), Event::Connected(0))
            .is_empty());
        assert_eq!(failover.deadline(), None);
        assert_eq!(
            failover.on_event(t0 + ms(41), Event::Ended(1, Outcome::Answer)),
            [Action::Finish(Finish::Answer(1))]
        );
    }

    #[test]
    fn unreachable_targets_are_skipped_at_once_without_using_a_retry() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Write, 3));
        failover.start(t0);
        assert_eq!(
            failover.on_event(t0 + ms(5), Event::Ended(0, Outcome::Unreachable)),
            [connect(1, 1, Reason::Next)]
        );
        assert_eq!(
            failover.on_event(t0 + ms(6), Event::Ended(1, Outcome::Unreachable)),
            [connect(2, 2, Reason::Next)]
        );
        assert_eq!(
            failover.on_event(t0 + ms(7), Event::Ended(2, Outcome::Unreachable)),
            [Action::Finish(Finish::Unreachable)]
        );
        assert_eq!(failover.retries_used(), 0);
    }

    #[test]
    fn a_failed_racer_leaves_the_other_to_finish() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Read, 2));
        failover.start(t0);
        failover.on_timer(t0 + ms(30));
        // Attempt 1's dial fails while attempt 0's is still pending: wait for it.
        assert!(failover
            .on_event(t0 + ms(31), Event::Ended(1, Outcome::Unreachable))
            .is_empty());
        assert_eq!(failover.deadline(), None, "no target left to race");
        assert_eq!(
            failover.on_event(t0 + ms(40), Event::Connected(0)),
            [Action::Send(0)]
        );
    }

    #[test]
    fn retryable_answers_back_off_wrap_around_and_stop_after_the_retries() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Write, 2));
        failover.start(t0);
        failover.on_event(t0, Event::Connected(0));
        assert!(failover
            .on_event(t0 + ms(1), Event::Ended(0, Outcome::Retryable))
            .is_empty());
        assert_eq!(failover.deadline(), Some(t0 + ms(11)), "first backoff");
        assert!(failover.on_timer(t0 + ms(10)).is_empty());
        assert_eq!(
            failover.on_timer(t0 + ms(11)),
            [connect(1, 1, Reason::Next)]
        );
        failover.on_event(t0 + ms(12), Event::Connected(1));
        failover.on_event(t0 + ms(13), Event::Ended(1, Outcome::Retryable));
        // Wraps around to target 0 after the second backoff.
        assert_eq!(
            failover.on_timer(t0 + ms(33)),
            [connect(2, 0, Reason::Next)]
        );
        failover.on_event(t0 + ms(34), Event::Connected(2));
        failover.on_event(t0 + ms(35), Event::Ended(2, Outcome::Retryable));
        assert_eq!(
            failover.on_timer(t0 + ms(75)),
            [connect(3, 1, Reason::Next)]
        );
        failover.on_event(t0 + ms(76), Event::Connected(3));
        // The three retries are used up: the last retryable answer ends the request.
        assert_eq!(
            failover.on_event(t0 + ms(77), Event::Ended(3, Outcome::Retryable)),
            [Action::Finish(Finish::Retryable(3))]
        );
        assert_eq!(failover.retries_used(), 3);
    }

    #[test]
    fn a_retryable_answer_then_only_unreachable_targets_reports_the_answer() {
        let t0 = Instant::now();
        let mut failover = Failover::new(Plan {
            backoffs: vec![Duration::ZERO],
            ..plan(Kind::Write, 2)
        });
        failover.start(t0);
        failover.on_event(t0, Event::Connected(0));
        assert_eq!(
            failover.on_event(t0, Event::Ended(0, Outcome::Retryable)),
            [connect(1, 1, Reason::Next)]
        );
        // Target 0 is busy no more and not unreachable, so after 1 fails it is tried again...
        assert_eq!(
            failover.on_event(t0, Event::Ended(1, Outcome::Unreachable)),
            [connect(2, 0, Reason::Next)]
        );
        // ...and when it turns out unreachable too, the earlier answer says more.
        assert_eq!(
            failover.on_event(t0, Event::Ended(2, Outcome::Unreachable)),
            [Action::Finish(Finish::Retryable(0))]
        );
    }

    #[test]
    fn a_retryable_answer_waits_for_a_hedge_still_in_flight() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Read, 3));
        failover.start(t0);
        failover.on_event(t0, Event::Connected(0));
        failover.on_timer(t0 + ms(50));
        failover.on_event(t0 + ms(51), Event::Connected(1));
        assert!(failover
            .on_event(t0 + ms(52), Event::Ended(0, Outcome::Retryable))
            .is_empty());
        assert_eq!(
            failover.on_event(t0 + ms(53), Event::Ended(1, Outcome::Answer)),
            [Action::Finish(Finish::Answer(1))]
        );
        assert_eq!(failover.retries_used(), 0);
    }

    #[test]
    fn no_targets_is_unreachable_at_once() {
        let mut failover = Failover::new(plan(Kind::Read, 0));
        assert_eq!(
            failover.start(Instant::now()),
            [Action::Finish(Finish::Unreachable)]
        );
    }

    #[test]
    fn events_after_the_finish_are_ignored() {
        let t0 = Instant::now();
        let mut failover = Failover::new(plan(Kind::Read, 2));
        failover.start(t0);
        failover.on_event(t0, Event::Connected(0));
        failover.on_timer(t0 + ms(50));
        failover.on_event(t0 + ms(60), Event::Ended(0, Outcome::Answer));
        assert!(failover
            .on_event(t0 + ms(61), Event::Connected(1))
            .is_empty());
        assert!(failover.on_timer(t0 + ms(1000)).is_empty());
    }
}
