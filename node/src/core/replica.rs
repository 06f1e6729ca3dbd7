//! The replica side: what a node does with the messages other nodes send it.
//!
//! A `Replicate` is merged through the one write path ([`Storage::merge`]) after validation
//! (known keyspace, key size, a state that decodes), and answered once: `Applied` at once, or
//! `Durable` after the node's next flush when the coordinator asked for it. A `Read` is answered
//! with the stored state. Pings get pongs; answers to this node's own requests go to
//! [`super::coordinate`], [`super::forward`] and, for inspections, [`super::inspect`].

use super::{DurableWaiter, NodeCore, Now, Op, Origin, Output};
use crate::peer::{OpId, PeerMessage};
use crate::quorum::ReplicaProgress;
use crate::storage::Storage;
use crate::version_vector::KeyState;
use quorumkv_ring::NodeId;

impl NodeCore {
    pub(super) fn on_peer(
        &mut self,
        now: Now,
        from: NodeId,
        message: PeerMessage,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        match message {
            PeerMessage::Forward { op, request } => {
                self.on_request(now, Origin::Peer { node: from, op }, request, storage, out)
            }
            PeerMessage::ForwardReply { op, response } => {
                if let Some(Op::Forward(forward)) = self.ops.get(&op) {
                    if forward.to == from {
                        let client = forward.client;
                        self.remove_op(op);
                        out.push(Output::Reply {
                            handle: client,
                            response,
                        });
                    }
                }
            }
            PeerMessage::Replicate {
                op,
                keyspace,
                key,
                state,
                durable,
                hint_for,
            } => {
                let at = (keyspace.as_str(), key.as_slice());
                let message = (op, state.as_slice(), durable);
                self.on_replicate(now, from, hint_for, at, message, storage, out)
            }
            PeerMessage::Applied { op } => {
                self.on_progress(op, &from, ReplicaProgress::Applied, out)
            }
            PeerMessage::Durable { op } => {
                self.on_progress(op, &from, ReplicaProgress::Durable, out)
            }
            PeerMessage::Failed { op, reason } if self.gc_owns(op) => {
                tracing::debug!(peer = %from, %reason, "peer refused a tombstone check");
                self.on_gc_check_reply(now, &from, op, None, storage, out)
            }
            PeerMessage::Failed { op, reason } if self.ae_owns(op) => {
                tracing::debug!(peer = %from, %reason, "peer refused an anti-entropy request");
                self.ae_failed(op, &from, now)
            }
            PeerMessage::Failed { op, reason } => {
                tracing::warn!(peer = %from, %reason, "replica failed an operation");
                if self.is_inspection(op) {
                    return self.on_inspect_failed(op, &from, reason, out);
                }
                self.on_progress(op, &from, ReplicaProgress::Failed, out)
            }
            PeerMessage::Read { op, keyspace, key } => {
                let read = match self.out_of_service_reply() {
                    Some(reply) => Err(reply.message),
                    None => storage
                        .read(&keyspace, &key)
                        .map_err(|e| self.storage_error("reading a key", e).message),
                };
                let message = match read {
                    Ok(state) => PeerMessage::ReadReply {
                        op,
                        state: state.map(|s| s.encode_canonical()),
                        keyspace,
                        key,
                    },
                    Err(reason) => PeerMessage::Failed { op, reason },
                };
                out.push(Output::Send { to: from, message });
            }
            PeerMessage::ReadReply {
                op,
                keyspace,
                key,
                state,
            } => {
                // The same answer serves a get and an inspection; only a get repairs.
                if self.is_inspection(op) {
                    self.on_inspect_reply(op, &from, (&keyspace, &key), state.as_deref(), out)
                } else {
                    self.on_read_reply(op, &from, (&keyspace, &key), state.as_deref(), out)
                }
            }
            // Out of service, the node stays silent, so peers' detectors count it down and stop
            // sending it work.
            PeerMessage::Ping { nonce } if self.in_service() => out.push(Output::Send {
                to: from,
                message: PeerMessage::Pong { nonce },
            }),
            PeerMessage::Ping { .. } => {}
            PeerMessage::Pong { .. } => {}
            PeerMessage::AeLevel {
                op,
                keyspace,
                range,
                depth,
                level,
                parents,
            } => self.on_ae_level(from, op, &keyspace, range, depth, level, &parents, out),
            PeerMessage::AeLevelReply { op, level } => {
                self.on_ae_level_reply(now, from, op, level, storage, out)
            }
            PeerMessage::AePush {
                op,
                keyspace,
                range,
                intervals,
                keys,
            } => self.on_ae_push(from, op, &keyspace, range, &intervals, keys, storage, out),
            PeerMessage::AePushReply {
                op,
                keys,
                resume_from,
            } => self.on_ae_push_reply(now, from, op, keys, resume_from, storage, out),
            PeerMessage::HintRead { op, keyspace, key } => {
                self.on_hint_read(from, op, &keyspace, &key, storage, out)
            }
            PeerMessage::HintReadReply { op, hints } => {
                self.on_inspect_hints(op, &from, hints, out)
            }
            PeerMessage::GcCheck { op, keys } => self.on_gc_check(from, op, &keys, storage, out),
            PeerMessage::GcCheckReply { op, ok } => {
                self.on_gc_check_reply(now, &from, op, Some(ok), storage, out)
            }
            PeerMessage::GcCollect { keys } => self.on_gc_collect(now, &keys, storage),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_replicate(
        &mut self,
        now: Now,
        from: NodeId,
        hint_for: Option<String>,
        (keyspace, key): (&str, &[u8]),
        (op, state, durable): (OpId, &[u8], bool),
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        if let Some(owner) = hint_for {
            let checked = match NodeId::new(owner.as_str()) {
                Err(e) => Err(format!("hint for an invalid node id: {e}")),
                Ok(owner) => self
                    .check_replica_write(keyspace, key)
                    .and_then(|()| KeyState::decode(state).map_err(|e| e.to_string()))
                    .map(|incoming| (owner, incoming)),
            };
            return match checked {
                Ok((owner, incoming)) => self.on_hinted_replicate(
                    now,
                    from,
                    op,
                    &owner,
                    (keyspace, key),
                    &incoming,
                    durable,
                    storage,
                    out,
                ),
                Err(reason) => {
                    tracing::warn!(peer = %from, %reason, "refused a hinted write");
                    out.push(Output::Send {
                        to: from,
                        message: PeerMessage::Failed { op, reason },
                    });
                }
            };
        }
        let result = if let Err(reason) = self.check_replica_write(keyspace, key) {
            Err(reason)
        } else {
            match KeyState::decode(state) {
                Err(e) => Err(e.to_string()),
                Ok(incoming) => match self.store(storage, keyspace, key, &incoming, &[]) {
                    Ok(merged) => Ok(merged),
                    Err(e) => Err(self.storage_error("merging a replica write", e).message),
                },
            }
        };
        match result {
            Ok(merged) => {
                if !durable {
                    out.push(Output::Send {
                        to: from,
                        message: PeerMessage::Applied { op },
                    });
                } else {
                    if merged.seq <= storage.durable_seq() {
                        out.push(Output::Send {
                            to: from,
                            message: PeerMessage::Durable { op },
                        });
                    } else {
                        self.durable_waiters
                            .entry(merged.seq)
                            .or_default()
                            .push(DurableWaiter::Peer { node: from, op });
                        self.request_flush(out);
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(peer = %from, %reason, "refused a replica write");
                out.push(Output::Send {
                    to: from,
                    message: PeerMessage::Failed { op, reason },
                });
            }
        }
    }

    /// Why a replica write (or hint) for `key` in `keyspace` must be refused, if it must.
    fn check_replica_write(&self, keyspace: &str, key: &[u8]) -> Result<(), String> {
        if let Some(reply) = self.out_of_service_reply() {
            Err(reply.message)
        } else if !self.map.keyspaces.contains_key(keyspace) {
            Err(format!("unknown keyspace `{keyspace}`"))
        } else if key.is_empty() || key.len() > self.config.key_bytes_max {
            Err(format!(
                "key of {} bytes is outside 1..=key_bytes_max",
                key.len()
            ))
        } else {
            Ok(())
        }
    }
}
