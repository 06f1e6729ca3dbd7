//! What the client remembers about each node: whether it is down, how long its handshakes take,
//! and how long reads take.
//!
//! Everything here is pure: the client passes in what happened and the current instant, and
//! asks for the timeouts and delays that follow. Nothing reads a clock or touches a socket.
//!
//! # Down and up
//!
//! A node is marked **down** when a dial to it fails or times out, or a connection to it breaks
//! or goes silent ([`Health::mark_down`]). A down node is not excluded: routing moves it to the
//! end of every order (see `route`), so a request reaches it only when every other node failed
//! too. It stays down for a backoff that doubles with each consecutive failure, from
//! `down_backoff_base` up to `down_backoff_max` (the same shape as a retry backoff, without
//! jitter: only this client's requests depend on it). When the backoff has run out the node is
//! *due for a probe* ([`RouteState::ProbeDue`]): it is still routed last, and the client dials it
//! in the background. A dial that succeeds, or any answer from the node, marks it **up** again
//! and forgets its failures ([`Health::mark_up`]); a probe that fails marks it down for twice as
//! long. So a dead node costs a request nothing once it is known, and a node that comes back is
//! found within one backoff without a request paying for the probe.
//!
//! Failures of a node that is already down and not yet due for a probe do not lengthen its
//! backoff: several requests that were waiting on the same dead connection fail together, and
//! that is one failure, not many.
//!
//! # Suspect
//!
//! A node that lost a hedged read (another replica answered first while it still had not), or
//! whose dial lost a race (another node's connection got the request while its dial was still
//! pending), is *suspect* ([`Health::mark_suspect`]): routed last like a down node, but not
//! probed, for at most `down_backoff_base`, cleared sooner by its next answer or completed dial,
//! and turned into down by its next failure. A node that died while
//! the client was connected is usually found that way first, by a read, and the next write
//! then goes elsewhere at once instead of waiting for the dead connection to be noticed; a node
//! that was merely slow clears itself as soon as its late answer arrives.
//!
//! # Sizing timeouts to the network
//!
//! Each successful dial's duration (QUIC and TLS handshake, from the first packet to the
//! established connection) feeds a smoothed estimate per node, kept as TCP keeps its round-trip
//! time (RFC 6298): `srtt` and `rttvar`, and a bound `srtt + 4 · rttvar` that a healthy
//! handshake rarely exceeds ([`Smoothed::bound`]). The client derives from it how long to wait
//! for a dial before it calls the node down ([`Health::connect_timeout`]) and how long to wait
//! before it also dials the next node ([`Health::connect_race_delay`]). A node never dialed
//! successfully borrows the slowest estimate of the others: they share the network. Before any
//! dial has completed there is no estimate, and the configured ceiling (connect) or a fixed
//! initial delay (race) applies.
//!
//! # Read latency
//!
//! The duration of each read that a node answered goes into a window of the last
//! [`LATENCY_WINDOW`] reads, from which a percentile gives the hedging delay (see `failover`):
//! "slower than usual" means slower than, say, 99% of recent reads. Fewer than
//! [`LATENCY_SAMPLES_MIN`] samples give no percentile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Reads remembered for the latency percentile.
pub(crate) const LATENCY_WINDOW: usize = 256;
/// Fewer samples than this give no percentile.
pub(crate) const LATENCY_SAMPLES_MIN: usize = 16;
/// The percentile is recomputed after this many new samples, not on every request.
const PERCENTILE_REFRESH: usize = 16;

/// Smallest and largest delay before a second dial races a slow first one, and the delay before
/// any handshake has been seen. RFC 8305 (Happy Eyeballs v2) recommends 250 ms without history
/// and at least 10 ms with it; we start lower than 250 ms because our seeds and replicas share
/// one data centre far more often than a browser's addresses do.
pub(crate) const CONNECT_RACE_DELAY_MIN: Duration = Duration::from_millis(25);
pub(crate) const CONNECT_RACE_DELAY_MAX: Duration = Duration::from_millis(250);
pub(crate) const CONNECT_RACE_DELAY_INITIAL: Duration = Duration::from_millis(50);

/// A smoothed duration and its variation, as RFC 6298 keeps a round-trip time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Smoothed {
    srtt: Duration,
    rttvar: Duration,
}

impl Smoothed {
    fn new(sample: Duration) -> Smoothed {
        Smoothed {
            srtt: sample,
            rttvar: sample / 2,
        }
    }

    fn update(&mut self, sample: Duration) {
        let deviation = self.srtt.abs_diff(sample);
        self.rttvar = (self.rttvar * 3 + deviation) / 4;
        self.srtt = (self.srtt * 7 + sample) / 8;
    }

    /// The smoothed value.
    pub(crate) fn mean(&self) -> Duration {
        self.srtt
    }

    /// `srtt + 4 · rttvar`: what a healthy sample rarely exceeds.
    pub(crate) fn bound(&self) -> Duration {
        self.srtt + self.rttvar * 4
    }
}

/// How a node should be routed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteState {
    /// Route normally.
    Up,
    /// Route last.
    Down,
    /// Route last: it lost a hedged read and has not answered since.
    Suspect,
    /// Route last, and dial it in the background to see whether it is back.
    ProbeDue,
}

/// What [`Health::mark_down`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Marked {
    /// The node is down (again) for `backoff`, after `failures` consecutive failures.
    Down { backoff: Duration, failures: u32 },
    /// The node was already down and not yet due for a probe; nothing changed.
    AlreadyDown,
}

/// What the client knows about one node.
#[derive(Clone, Debug, Default)]
struct NodeState {
    handshake: Option<Smoothed>,
    /// Consecutive failures; 0 while up.
    failures: u32,
    /// Lost a hedged read and has not answered since: routed last until then.
    suspect_until: Option<Instant>,
    /// While down: when it becomes due for a probe.
    down_until: Option<Instant>,
    dials: u64,
    dial_failures: u64,
    attempts: u64,
}

/// A snapshot of one node's state, for [`crate::Client::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// The node's id, or a seed's address.
    pub node: String,
    /// Whether the node is marked down (routed last) now.
    pub down: bool,
    /// Whether the node lost a hedged read and has not answered since (also routed last).
    pub suspect: bool,
    /// Consecutive failures (dials, broken or silent connections); 0 when up.
    pub consecutive_failures: u32,
    /// Dials started.
    pub dials: u64,
    /// Dials that failed or timed out.
    pub dial_failures: u64,
    /// Requests sent to the node (attempts, including hedges and retries).
    pub attempts: u64,
    /// The smoothed handshake time, once a dial has succeeded.
    pub handshake: Option<Duration>,
}

/// The backoff settings of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DownBackoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl DownBackoff {
    /// `base · 2^(failures - 1)`, capped at `max`.
    fn after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// Per-node health and the client-wide read latency window.
#[derive(Debug)]
pub(crate) struct Health {
    backoff: DownBackoff,
    nodes: HashMap<String, NodeState>,
    reads: Vec<Duration>,
    /// Where the next read sample goes once `reads` is full.
    next_read: usize,
    samples_since_refresh: usize,
    /// `(percentile, value)` last computed.
    cached_percentile: Option<(f64, Duration)>,
}

impl Health {
    pub(crate) fn new(backoff: DownBackoff) -> Health {
        Health {
            backoff,
            nodes: HashMap::new(),
            reads: Vec::with_capacity(LATENCY_WINDOW),
            next_read: 0,
            samples_since_refresh: 0,
            cached_percentile: None,
        }
    }

    fn node(&mut self, node: &str) -> &mut NodeState {
        self.nodes.entry(node.to_string()).or_default()
    }

    /// Records a failure of `node` (see the module documentation).
    pub(crate) fn mark_down(&mut self, node: &str, now: Instant) -> Marked {
        let backoff = self.backoff;
        let state = self.node(node);
        if state.down_until.is_some_and(|until| now < until) {
            return Marked::AlreadyDown;
        }
        state.suspect_until = None;
        state.failures = state.failures.saturating_add(1);
        let period = backoff.after(state.failures);
        state.down_until = Some(now + period);
        Marked::Down {
            backoff: period,
            failures: state.failures,
        }
    }

    /// Records that `node` answered or accepted a connection. Returns whether it was down.
    pub(crate) fn mark_up(&mut self, node: &str) -> bool {
        let Some(state) = self.nodes.get_mut(node) else {
            return false;
        };
        let was_down = state.down_until.is_some();
        state.down_until = None;
        state.failures = 0;
        state.suspect_until = None;
        was_down
    }

    /// Records that `node` has not answered a read that another node answered first. A node
    /// already down stays down.
    pub(crate) fn mark_suspect(&mut self, node: &str, now: Instant) {
        let period = self.backoff.base;
        let state = self.node(node);
        if state.down_until.is_none() {
            state.suspect_until = Some(now + period);
        }
    }

    /// How `node` should be routed at `now`.
    pub(crate) fn route_state(&self, node: &str, now: Instant) -> RouteState {
        let Some(state) = self.nodes.get(node) else {
            return RouteState::Up;
        };
        match state.down_until {
            None if state.suspect_until.is_some_and(|until| now < until) => RouteState::Suspect,
            None => RouteState::Up,
            Some(until) if now < until => RouteState::Down,
            Some(_) => RouteState::ProbeDue,
        }
    }

    /// Whether `node` should be routed last.
    pub(crate) fn is_down(&self, node: &str, now: Instant) -> bool {
        self.route_state(node, now) != RouteState::Up
    }

    /// A dial to `node` began.
    pub(crate) fn note_dial(&mut self, node: &str) {
        self.node(node).dials += 1;
    }

    /// A dial to `node` failed (the caller decides separately whether to mark it down).
    pub(crate) fn note_dial_failure(&mut self, node: &str) {
        self.node(node).dial_failures += 1;
    }

    /// A request was sent to `node`.
    pub(crate) fn note_attempt(&mut self, node: &str) {
        self.node(node).attempts += 1;
    }

    /// A dial to `node` completed in `duration`.
    pub(crate) fn record_handshake(&mut self, node: &str, duration: Duration) {
        let state = self.node(node);
        match &mut state.handshake {
            Some(smoothed) => smoothed.update(duration),
            None => state.handshake = Some(Smoothed::new(duration)),
        }
    }

    /// The handshake estimate for `node`: its own, or else the slowest one known.
    pub(crate) fn handshake_estimate(&self, node: &str) -> Option<Smoothed> {
        if let Some(own) = self.nodes.get(node).and_then(|state| state.handshake) {
            return Some(own);
        }
        self.nodes
            .values()
            .filter_map(|state| state.handshake)
            .max_by_key(Smoothed::bound)
    }

    /// How long a dial to `node` may take before the node counts as down:
    /// `2 · (srtt + 4 · rttvar)` of its handshakes, within `[min, max]`; `max` without an
    /// estimate.
    pub(crate) fn connect_timeout(&self, node: &str, min: Duration, max: Duration) -> Duration {
        match self.handshake_estimate(node) {
            Some(estimate) => (estimate.bound() * 2).clamp(min, max.max(min)),
            None => max.max(min),
        }
    }

    /// How long to wait for a dial to `node` before also dialing the next node: one handshake
    /// bound, within [`CONNECT_RACE_DELAY_MIN`] and [`CONNECT_RACE_DELAY_MAX`].
    pub(crate) fn connect_race_delay(&self, node: &str) -> Duration {
        match self.handshake_estimate(node) {
            Some(estimate) => estimate
                .bound()
                .clamp(CONNECT_RACE_DELAY_MIN, CONNECT_RACE_DELAY_MAX),
            None => CONNECT_RACE_DELAY_INITIAL,
        }
    }

    /// A read answered by a node after `duration`.
    pub(crate) fn record_read(&mut self, duration: Duration) {
        if self.reads.len() < LATENCY_WINDOW {
            self.reads.push(duration);
        } else {
            self.reads[self.next_read] = duration;
            self.next_read = (self.next_read + 1) % LATENCY_WINDOW;
        }
        self.samples_since_refresh += 1;
    }

    /// The `percentile` (0 to 1) of recent read latencies, or `None` with too few samples.
    /// Recomputed only every [`PERCENTILE_REFRESH`] samples or when asked for another
    /// percentile.
    pub(crate) fn read_percentile(&mut self, percentile: f64) -> Option<Duration> {
        if self.reads.len() < LATENCY_SAMPLES_MIN {
            return None;
        }
        if let Some((cached_for, value)) = self.cached_percentile {
            if cached_for == percentile && self.samples_since_refresh < PERCENTILE_REFRESH {
                return Some(value);
            }
        }
        let mut sorted = self.reads.clone();
        sorted.sort_unstable();
        let rank = (percentile.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
        let value = sorted[rank.min(sorted.len() - 1)];
        self.cached_percentile = Some((percentile, value));
        self.samples_since_refresh = 0;
        Some(value)
    }

    /// Every node's state, sorted by name.
    pub(crate) fn snapshot(&self, now: Instant) -> Vec<NodeStats> {
        let mut nodes: Vec<NodeStats> = self
            .nodes
            .iter()
            .map(|(node, state)| NodeStats {
                node: node.clone(),
                down: state.down_until.is_some(),
                suspect: state.suspect_until.is_some_and(|until| now < until),
                consecutive_failures: state.failures,
                dials: state.dials,
                dial_failures: state.dial_failures,
                attempts: state.attempts,
                handshake: state.handshake.map(|smoothed| smoothed.mean()),
            })
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn health() -> Health {
        Health::new(DownBackoff {
            base: ms(1000),
            max: ms(8000),
        })
    }

    #[test]
    fn a_failed_node_is_down_for_a_doubling_capped_backoff_then_due_for_a_probe() {
        let mut health = health();
        let t0 = Instant::now();
        assert_eq!(health.route_state("a", t0), RouteState::Up);
        assert_eq!(
            health.mark_down("a", t0),
            Marked::Down {
                backoff: ms(1000),
                failures: 1
            }
        );
        assert_eq!(health.route_state("a", t0 + ms(999)), RouteState::Down);
        assert!(health.is_down("a", t0 + ms(999)));
        assert!(!health.is_down("b", t0));
        // Due for a probe: still routed last.
        let t1 = t0 + ms(1000);
        assert_eq!(health.route_state("a", t1), RouteState::ProbeDue);
        assert!(health.is_down("a", t1));
        // The probe failed: twice as long, then 4 s, then capped at 8 s.
        let mut now = t1;
        for expected in [2000, 4000, 8000, 8000] {
            match health.mark_down("a", now) {
                Marked::Down { backoff, .. } => assert_eq!(backoff, ms(expected)),
                other => panic!("{other:?}"),
            }
            now += ms(expected);
        }
    }

    #[test]
    fn failures_while_down_are_one_failure_and_an_answer_forgives_them() {
        let mut health = health();
        let t0 = Instant::now();
        health.mark_down("a", t0);
        assert_eq!(health.mark_down("a", t0 + ms(10)), Marked::AlreadyDown);
        assert_eq!(health.mark_down("a", t0 + ms(20)), Marked::AlreadyDown);
        assert!(health.mark_up("a"));
        assert!(!health.mark_up("a"), "already up");
        assert_eq!(health.route_state("a", t0), RouteState::Up);
        // Counting starts again from the base.
        assert_eq!(
            health.mark_down("a", t0 + ms(30)),
            Marked::Down {
                backoff: ms(1000),
                failures: 1
            }
        );
    }

    #[test]
    fn a_node_that_lost_a_hedge_is_suspect_until_it_answers_or_fails() {
        let mut health = health();
        let t0 = Instant::now();
        health.mark_suspect("a", t0);
        assert_eq!(health.route_state("a", t0), RouteState::Suspect);
        assert!(health.is_down("a", t0), "routed last");
        assert!(health.snapshot(t0)[0].suspect);
        // For one base backoff at most, if nothing else is heard of it.
        assert_eq!(health.route_state("a", t0 + ms(1000)), RouteState::Up);
        // Its late answer clears it, and that was no recovery from down.
        assert!(!health.mark_up("a"));
        assert_eq!(health.route_state("a", t0), RouteState::Up);
        // A failure turns suspicion into down; suspicion never hides down.
        health.mark_suspect("a", t0);
        health.mark_down("a", t0);
        assert_eq!(health.route_state("a", t0), RouteState::Down);
        health.mark_suspect("a", t0);
        assert_eq!(health.route_state("a", t0 + ms(1000)), RouteState::ProbeDue);
        assert!(!health.snapshot(t0)[0].suspect);
    }

    #[test]
    fn connect_timeouts_follow_the_handshakes_within_their_bounds() {
        let mut health = health();
        let (min, max) = (ms(100), ms(2000));
        // No estimate at all: the ceiling, and the initial race delay.
        assert_eq!(health.connect_timeout("a", min, max), max);
        assert_eq!(health.connect_race_delay("a"), CONNECT_RACE_DELAY_INITIAL);
        // One 40 ms handshake: bound 40 + 4 · 20 = 120 ms, timeout twice that.
        health.record_handshake("a", ms(40));
        assert_eq!(health.handshake_estimate("a").unwrap().bound(), ms(120));
        assert_eq!(health.connect_timeout("a", min, max), ms(240));
        assert_eq!(health.connect_race_delay("a"), ms(120));
        // A node never dialed borrows the slowest estimate.
        health.record_handshake("b", ms(2));
        assert_eq!(health.connect_timeout("c", min, max), ms(240));
        // Fast handshakes hit the floors, slow ones the ceilings.
        assert_eq!(health.connect_timeout("b", min, max), min);
        assert_eq!(health.connect_race_delay("b"), CONNECT_RACE_DELAY_MIN);
        health.record_handshake("d", ms(5000));
        assert_eq!(health.connect_timeout("d", min, max), max);
        assert_eq!(health.connect_race_delay("d"), CONNECT_RACE_DELAY_MAX);
    }

    #[test]
    fn smoothing_converges_on_steady_samples() {
        let mut smoothed = Smoothed::new(ms(100));
        for _ in 0..100 {
            smoothed.update(ms(10));
        }
        assert!(smoothed.mean() < ms(11), "{smoothed:?}");
        assert!(smoothed.bound() < ms(12), "{smoothed:?}");
    }

    #[test]
    fn read_percentiles_need_enough_samples_and_follow_the_window() {
        let mut health = health();
        for i in 0..(LATENCY_SAMPLES_MIN as u64 - 1) {
            health.record_read(ms(i));
        }
        assert_eq!(health.read_percentile(0.99), None);
        // 1..=100 ms: p50 about 50 ms, p99 about 99 ms.
        let mut health = self::health();
        for i in 1..=100 {
            health.record_read(ms(i));
        }
        assert_eq!(health.read_percentile(0.5), Some(ms(51)));
        assert_eq!(health.read_percentile(0.99), Some(ms(99)));
        assert_eq!(health.read_percentile(1.0), Some(ms(100)));
        // The window forgets old samples: after a full window of 1 ms reads, p99 is 1 ms.
        for _ in 0..LATENCY_WINDOW {
            health.record_read(ms(1));
        }
        assert_eq!(health.read_percentile(0.99), Some(ms(1)));
    }

    #[test]
    fn snapshots_report_counters_sorted_by_node() {
        let mut health = health();
        let now = Instant::now();
        health.note_dial("b");
        health.note_dial("a");
        health.note_dial_failure("a");
        health.note_attempt("b");
        health.record_handshake("b", ms(3));
        health.mark_down("a", now);
        let snapshot = health.snapshot(now);
        assert_eq!(snapshot.len(), 2);
        assert_eq!(snapshot[0].node, "a");
        assert!(snapshot[0].down);
        assert_eq!((snapshot[0].dials, snapshot[0].dial_failures), (1, 1));
        assert_eq!(snapshot[0].consecutive_failures, 1);
        assert!(!snapshot[1].down);
        assert_eq!(snapshot[1].attempts, 1);
        assert_eq!(snapshot[1].handshake, Some(ms(3)));
    }
}
