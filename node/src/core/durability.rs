//! Durability: waiting for flushes, and group commit.
//!
//! A write that must be durable (the coordinator's own copy when `dw > 0`, a replica's copy
//! when the coordinator asked for a durable answer) waits until storage reports a flush that
//! covers its [`WriteSeq`]. The core asks the shell for at most one flush at a time
//! ([`Output::Flush`]); every write that wants durability while a flush is running waits for
//! the next one, so N concurrent durable writes cost far fewer than N flushes. A failed flush
//! (a full disk) fails every write waiting on it: never an acknowledgement that is not true.

use super::{DurableWaiter, NodeCore, Output};
use crate::peer::PeerMessage;
use crate::quorum::{ReplicaProgress, Tally};
use crate::storage::{Storage, WriteSeq};

impl NodeCore {
    pub(super) fn await_durable(
        &mut self,
        seq: WriteSeq,
        waiter: DurableWaiter,
        storage: &dyn Storage,
        tally: &mut Tally,
        out: &mut Vec<Output>,
    ) {
        if seq <= storage.durable_seq() {
            tally.record(&self.me, ReplicaProgress::Durable);
        } else {
            self.durable_waiters.entry(seq).or_default().push(waiter);
            self.request_flush(out);
        }
    }

    pub(super) fn request_flush(&mut self, out: &mut Vec<Output>) {
        if !self.flush_in_flight {
            self.flush_in_flight = true;
            out.push(Output::Flush);
        }
    }

    pub(super) fn on_flushed(&mut self, through: WriteSeq, out: &mut Vec<Output>) {
        self.flush_in_flight = false;
        let still_waiting = self
            .durable_waiters
            .split_off(&WriteSeq(through.0.saturating_add(1)));
        let done = std::mem::replace(&mut self.durable_waiters, still_waiting);
        for waiter in done.into_values().flatten() {
            match waiter {
                DurableWaiter::Local(op) => {
                    let me = self.me.clone();
                    self.on_progress(op, &me, ReplicaProgress::Durable, out);
                }
                DurableWaiter::Peer { node, op } => out.push(Output::Send {
                    to: node,
                    message: PeerMessage::Durable { op },
                }),
                DurableWaiter::Send { node, message, .. } => {
                    out.push(Output::Send { to: node, message })
                }
            }
        }
        if !self.durable_waiters.is_empty() {
            self.request_flush(out);
        }
    }

    pub(super) fn on_flush_failed(&mut self, reason: &str, out: &mut Vec<Output>) {
        tracing::error!(%reason, "storage flush failed; durable writes waiting for it fail");
        self.flush_in_flight = false;
        // A failed flush is a failed disk (sled refuses all work after it): stop serving. The
        // reason already names the flush (the shell reports the storage error as it was).
        self.take_out_of_service(reason.to_string());
        for waiter in std::mem::take(&mut self.durable_waiters)
            .into_values()
            .flatten()
        {
            match waiter {
                DurableWaiter::Local(op) => {
                    let me = self.me.clone();
                    self.on_progress(op, &me, ReplicaProgress::Failed, out);
                }
                DurableWaiter::Peer { node, op } | DurableWaiter::Send { node, op, .. } => out
                    .push(Output::Send {
                        to: node,
                        message: PeerMessage::Failed {
                            op,
                            reason: format!("flush failed: {reason}"),
                        },
                    }),
            }
        }
    }
}
