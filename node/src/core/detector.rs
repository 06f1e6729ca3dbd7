//! The failure detector: which peers are worth waiting for.
//!
//! A coordinator that sends to a dead replica waits for its timeout; one that knows the replica
//! is down counts it as failed at once and answers early (or fails fast when the quorum is out
//! of reach). The detector combines two signals:
//!
//! * **Heartbeats.** Every `ping_interval_ms` the node pings each peer. Any message from a peer
//!   (a pong, a request, an answer) proves it alive. A peer silent for `down_after_ms` is
//!   marked down.
//! * **Request outcomes.** When the transport reports that a message could not be delivered
//!   (connection refused, handshake failure, connection lost), the peer is marked down at once.
//!
//! A down peer keeps being pinged, so the first answer after it recovers (a paused process
//! resumed with `SIGCONT`, a restarted node) marks it up again. The detector never reads a
//! clock: the caller passes `now_ms` (monotonic milliseconds) with every event, which is what
//! lets the simulation run it in virtual time.
//!
//! This is deliberately simpler than phi-accrual (Hayashibara et al., 2004): a fixed silence
//! threshold is predictable to operate and to test; the roadmap's adaptive detector can replace
//! [`FailureDetector::tick`] without changing its callers.

use quorumkv_ring::NodeId;
use std::collections::BTreeMap;

/// Whether a peer is believed reachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Up,
    Down,
}

#[derive(Clone, Debug)]
struct Peer {
    liveness: Liveness,
    last_heard_ms: u64,
    last_ping_ms: Option<u64>,
}

/// A change of a peer's liveness, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub node: NodeId,
    pub now: Liveness,
}

/// Tracks the liveness of every peer.
#[derive(Clone, Debug)]
pub struct FailureDetector {
    peers: BTreeMap<NodeId, Peer>,
    ping_interval_ms: u64,
    down_after_ms: u64,
    next_nonce: u64,
}

impl FailureDetector {
    /// All `peers` start up, as if heard from at `now_ms`: a node that just started gives its
    /// peers one `down_after_ms` to answer before it stops waiting for them.
    pub fn new(
        peers: impl IntoIterator<Item = NodeId>,
        now_ms: u64,
        ping_interval_ms: u64,
        down_after_ms: u64,
    ) -> FailureDetector {
        let peers = peers
            .into_iter()
            .map(|node| {
                let peer = Peer {
                    liveness: Liveness::Up,
                    last_heard_ms: now_ms,
                    last_ping_ms: None,
                };
                (node, peer)
            })
            .collect();
        FailureDetector {
            peers,
            ping_interval_ms,
            down_after_ms,
            next_nonce: 1,
        }
    }

    /// The peer's liveness; unknown nodes are down.
    pub fn liveness(&self, node: &NodeId) -> Liveness {
        self.peers
            .get(node)
            .map_or(Liveness::Down, |peer| peer.liveness)
    }

    /// Whether the peer is believed reachable.
    pub fn is_up(&self, node: &NodeId) -> bool {
        self.liveness(node) == Liveness::Up
    }

    /// A message arrived from `node`: it is alive.
    pub fn heard_from(&mut self, node: &NodeId, now_ms: u64) -> Option<Transition> {
        let peer = self.peers.get_mut(node)?;
        peer.last_heard_ms = peer.last_heard_ms.max(now_ms);
        (peer.liveness == Liveness::Down).then(|| {
            peer.liveness = Liveness::Up;
            Transition {
                node: node.clone(),
                now: Liveness::Up,
            }
        })
    }

    /// Advances time: returns the pings to send now (peer and nonce) and the peers that just
    /// went down because they were silent too long.
    pub fn tick(&mut self, now_ms: u64) -> (Vec<(NodeId, u64)>, Vec<Transition>) {
        let mut pings = Vec::new();
        let mut transitions = Vec::new();
        for (node, peer) in &mut self.peers {
            let due = peer
                .last_ping_ms
                .is_none_or(|last| now_ms.saturating_sub(last) >= self.ping_interval_ms);
            if due {
                peer.last_ping_ms = Some(now_ms);
                pings.push((node.clone(), self.next_nonce));
                self.next_nonce += 1;
            }
            let silent_ms = now_ms.saturating_sub(peer.last_heard_ms);
            if peer.liveness == Liveness::Up && silent_ms >= self.down_after_ms {
                peer.liveness = Liveness::Down;
                transitions.push(Transition {
                    node: node.clone(),
                    now: Liveness::Down,
                });
            }
        }
        (pings, transitions)
    }

    /// When [`FailureDetector::tick`] next has something to do.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.peers
            .values()
            .map(|peer| {
                let ping = peer
                    .last_ping_ms
                    .map_or(0, |last| last.saturating_add(self.ping_interval_ms));
                let down = match peer.liveness {
                    Liveness::Up => peer.last_heard_ms.saturating_add(self.down_after_ms),
                    Liveness::Down => u64::MAX,
                };
                ping.min(down)
            })
            .min()
    }

    /// The peers and their liveness, in id order.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeId, Liveness)> {
        self.peers.iter().map(|(node, peer)| (node, peer.liveness))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn detector() -> FailureDetector {
        FailureDetector::new([id("b"), id("c")], 0, 100, 300)
    }

    #[test]
    fn pings_every_interval() {
        let mut fd = detector();
        let (pings, _) = fd.tick(0);
        assert_eq!(pings.len(), 2);
        assert!(fd.tick(50).0.is_empty());
        assert_eq!(fd.tick(100).0.len(), 2);
    }

    #[test]
    fn a_silent_peer_goes_down_and_comes_back_when_it_answers() {
        // b answers, c is paused (kill -STOP): silent from t=0 on.
        let mut fd = detector();
        for t in (0..=300).step_by(100) {
            fd.tick(t);
            fd.heard_from(&id("b"), t);
        }
        assert!(fd.is_up(&id("b")));
        assert_eq!(fd.liveness(&id("c")), Liveness::Down);
        // Resumed: its first pong marks it up.
        let transition = fd.heard_from(&id("c"), 450).unwrap();
        assert_eq!(transition.now, Liveness::Up);
        assert!(fd.is_up(&id("c")));
    }

    #[test]
    fn unknown_nodes_are_down_and_ignored() {
        let mut fd = detector();
        assert!(!fd.is_up(&id("z")));
        assert!(fd.heard_from(&id("z"), 5).is_none());
    }

    #[test]
    fn next_deadline_covers_pings_and_silence() {
        let mut fd = detector();
        assert_eq!(fd.next_deadline_ms(), Some(0));
        fd.tick(0);
        assert_eq!(fd.next_deadline_ms(), Some(100));
    }
}
