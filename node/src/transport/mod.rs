//! Transports: how peer messages travel between nodes.
//!
//! The node core emits `Output::Send { to, message }` and consumes `Input::Peer { from, .. }`;
//! a [`Transport`] carries the first to the second. Sending is fire-and-forget: the core never
//! waits on the network. A message that cannot be delivered (no connection, handshake refused,
//! connection lost, too large to encode) is reported back to the sender's core as
//! `Input::SendFailed` naming the operations the lost messages belonged to; those operations
//! count the peer as failed. The failure detector is not told: a lost message is not a dead
//! peer.
//!
//! Two implementations exist: [`quic`] (the real one: one quinn endpoint per node, mutual TLS,
//! one long-lived unidirectional stream per peer, queues bounded in bytes through the core)
//! and [`memory`] (tokio channels between nodes of one
//! process, for in-process tests of the shell). The deterministic simulation bypasses both and
//! moves messages itself.

pub mod memory;
pub mod quic;

use crate::peer::PeerMessage;
use quorumkv_ring::NodeId;

/// Carries peer messages from this node to others.
pub trait Transport: Send + Sync + 'static {
    /// Queues `message` for `to`. Never blocks; failures come back as `Input::SendFailed`.
    fn send(&self, to: &NodeId, message: PeerMessage);
}
