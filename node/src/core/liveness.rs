//! Time and failures: deadlines, pings, and replicas found down.
//!
//! On every tick the failure detector sends its pings (none while the node is out of service:
//! a silent node is what peers must see) and reports peers silent for too long;
//! requests waiting on a replica that went down count it failed at once, so they fail fast
//! instead of waiting for their deadline. Requests past their deadline are answered with what
//! they reached. The shell delivers a tick as soon as [`NodeCore::next_deadline_ms`] passes,
//! however busy the core is.

use super::{log_transition, NodeCore, Now, Op, Output};
use crate::peer::{OpId, PeerMessage};
use crate::quorum::ReplicaProgress;
use quorumkv_ring::NodeId;

impl NodeCore {
    pub(super) fn on_tick(&mut self, now: Now, out: &mut Vec<Output>) {
        let (pings, transitions) = self.detector.tick(now.monotonic_ms);
        // Out of service, the node falls silent (no pings, no pongs), so its peers count it
        // down and send it nothing more.
        let pings = if self.in_service() { pings } else { Vec::new() };
        for (to, nonce) in pings {
            out.push(Output::Send {
                to,
                message: PeerMessage::Ping { nonce },
            });
        }
        for transition in transitions {
            log_transition(&transition);
            self.on_replica_lost(&transition.node, out);
        }
        let expired: Vec<OpId> = self
            .deadlines
            .range(..=(now.monotonic_ms, OpId(u64::MAX, u64::MAX)))
            .map(|(_, op)| *op)
            .collect();
        for op in expired {
            self.expire(op, out);
        }
    }

    /// A replica is down or unreachable: every request still waiting on it counts it failed.
    pub(super) fn on_replica_lost(&mut self, node: &NodeId, out: &mut Vec<Output>) {
        let affected: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| match op {
                Op::Write(w) => {
                    w.tally.waiting().any(|n| n == node) || w.fallbacks.contains_key(node)
                }
                Op::Handoff(h) => h.owner == *node,
                Op::Read(r) => r.tally.waiting().any(|n| n == node) || r.repairing.contains(node),
                Op::Forward(f) => f.to == *node,
                Op::Inspect(i) => i.waiting_on(node),
            })
            .map(|(op, _)| *op)
            .collect();
        for op in affected {
            self.on_progress(op, node, ReplicaProgress::Failed, out);
        }
    }
}
