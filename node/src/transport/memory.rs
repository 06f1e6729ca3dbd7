//! An in-process transport: nodes of one test process exchange messages over tokio channels.
//!
//! Every node registers its inbox with a shared [`MemoryNetwork`]. Sending looks the
//! destination up and pushes `Input::Peer` into its inbox; an unregistered or stopped node,
//! or a link the test has cut with [`MemoryNetwork::set_link`], makes the sender's core see
//! `Input::SendFailed` for the operation the message belonged to, as a refused QUIC connection
//! would.

use super::Transport;
use crate::core::Input;
use crate::peer::PeerMessage;
use crate::server::core_task::InboxSender;
use quorumkv_ring::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Inner {
    inboxes: BTreeMap<NodeId, InboxSender>,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
}

/// The shared switchboard of an in-process cluster.
#[derive(Clone, Debug, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> MemoryNetwork {
        MemoryNetwork::default()
    }

    /// Registers `node`'s inbox and returns the transport it sends with.
    pub fn join(&self, node: NodeId, inbox: InboxSender) -> MemoryTransport {
        self.lock().inboxes.insert(node.clone(), inbox);
        MemoryTransport {
            me: node,
            network: self.clone(),
        }
    }

    /// Removes `node`, as if its process stopped.
    pub fn leave(&self, node: &NodeId) {
        self.lock().inboxes.remove(node);
    }

    /// Cuts (`up == false`) or restores the directed link `from → to`.
    pub fn set_link(&self, from: &NodeId, to: &NodeId, up: bool) {
        let mut inner = self.lock();
        let link = (from.clone(), to.clone());
        if up {
            inner.cut.remove(&link);
        } else {
            inner.cut.insert(link);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock can only come from a bug in this file; the data
        // (a map of channels) stays consistent, so recover the guard instead of poisoning tests.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One node's handle on a [`MemoryNetwork`].
#[derive(Clone, Debug)]
pub struct MemoryTransport {
    me: NodeId,
    network: MemoryNetwork,
}

impl Transport for MemoryTransport {
    fn send(&self, to: &NodeId, message: PeerMessage) {
        let message_op = message.request_op();
        let inner = self.network.lock();
        let delivered = !inner.cut.contains(&(self.me.clone(), to.clone()))
            && inner.inboxes.get(to).is_some_and(|inbox| {
                // Delivered outside the byte budget: this send cannot wait, and the in-process
                // tests that use it do not exercise backpressure between nodes.
                inbox.send(Input::Peer {
                    from: self.me.clone(),
                    message,
                })
            });
        if !delivered {
            if let (Some(own), Some(op)) = (inner.inboxes.get(&self.me), message_op) {
                // Our own inbox gone means we are stopping; nobody needs the report then.
                own.send(Input::SendFailed {
                    to: to.clone(),
                    ops: vec![op],
                });
            }
        }
    }
}
