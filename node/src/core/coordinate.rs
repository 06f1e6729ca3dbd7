//! Coordination: what the coordinator of a put or get does, and how it decides to answer.
//!
//! A put draws a new dot, applies the update to the coordinator's own stored state (the new
//! value replaces exactly the siblings the client's context covers), merges it through the one
//! write path, and sends the merged state to the other replicas. A get reads the local copy and
//! asks the other replicas for theirs, joining every answer. A [`Tally`] counts answers; the
//! request is answered once its quorum is reached, or once it can no longer be reached and
//! every live replica has answered (so the error counts every acknowledgement made), or at its
//! deadline. Riak's `put_fsm`/`get_fsm` and Garage's `rpc_helper` are the models.

use super::{
    error, invalid, quorum_not_reached, read_quorum, write_quorum, Checked, DurableWaiter,
    NodeCore, Now, Op, Origin, Output, ReadOp, WriteOp, CONTEXT_TOKEN_SLACK,
};
use crate::metrics;
use crate::peer::{OpId, PeerMessage};
use crate::quorum::{ReplicaProgress, Tally, Verdict};
use crate::storage::{AuxTable, AuxWrite, Storage};
use crate::version_vector::{self, ClientContext, KeyState, RequestId as CoreRequestId};
use quorumkv_client::protocol::{ErrorKind, ErrorReply, ReadOptions, Response, WriteOptions};
use quorumkv_client::Context;
use quorumkv_ring::NodeId;
use std::collections::BTreeMap;
use std::sync::Arc;

impl NodeCore {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn coordinate_write(
        &mut self,
        now: Now,
        origin: Origin,
        checked: &Checked<'_>,
        value: Option<Vec<u8>>,
        context: Option<&Context>,
        request_id: [u8; 16],
        options: &WriteOptions,
        deadline_ms: u64,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) -> Result<(), ErrorReply> {
        let (w, dw, pw) = write_quorum(checked.n, options)?;
        let client_context = self.decode_context(checked, context)?;
        let request_id = CoreRequestId(request_id);
        let mut state = storage
            .read(checked.keyspace, checked.key)
            .map_err(|e| self.storage_error("reading the local copy", e))?
            .unwrap_or_default();
        let before = state.clone();
        let dot = self.clock.next_dot(&state);
        // The writes the client was shown are superseded in every copy, also copies under dots
        // its context does not cover (a retry stored elsewhere); never the write itself.
        let seen: Vec<CoreRequestId> = client_context
            .writes()
            .iter()
            .copied()
            .filter(|seen| *seen != request_id)
            .collect();
        state.supersede(&seen, now.wall_ms);
        let outcome = state
            .update(&client_context.context, dot, request_id, now.wall_ms, value)
            .map_err(|e| invalid(format!("the write cannot be applied: {e}")))?;
        self.check_key_state(&before, &state)?;
        // Where the write goes: owners believed up, fallbacks for owners believed down (sloppy
        // quorum), and hints here for owners neither covers, stored with the data.
        let sloppy = options.sloppy_quorum.unwrap_or(true);
        let ring = Arc::clone(&self.map);
        let placement = self.place_write(
            &ring.ring,
            checked.keyspace,
            checked.key,
            &checked.preference_list,
            sloppy,
        );
        let hints =
            self.coordinator_hints(now, checked.keyspace, checked.key, &placement.hinted_here);
        // The sizes of the hints these replace, for the per-owner totals; a storage error here
        // fails the write like any other, rather than leaving the totals silently wrong.
        let mut existed: Vec<Option<usize>> = Vec::with_capacity(hints.len());
        for (_, write) in &hints {
            let old = storage
                .aux(AuxTable::Hints, &write.key)
                .map_err(|e| self.storage_error("reading a hint", e))?;
            existed.push(old.map(|v| v.len()));
        }
        let aux: Vec<AuxWrite> = hints.iter().map(|(_, write)| write.clone()).collect();
        let merged = self
            .store(storage, checked.keyspace, checked.key, &state, &aux)
            .map_err(|e| self.storage_error("writing the local copy", e))?;
        self.note_hints_written(&hints, &existed, "coordinator");
        // The writer knows its own write: a later write with this context supersedes every copy
        // of it, including one a retry left at another coordinator.
        let reply_context = Context::from_bytes(version_vector::encode_token(
            &self.config.context_keys,
            &ClientContext::new(outcome.context, [request_id]),
            checked.keyspace,
            checked.key,
        ));
        let op = self.new_op();
        let mut tally = Tally::with_primaries(checked.preference_list.iter().cloned(), w, dw, pw);
        tally.record(&self.me, ReplicaProgress::Applied);
        for owner in &placement.hinted_here {
            tally.record(owner, ReplicaProgress::Failed);
        }
        let mut fallbacks = BTreeMap::new();
        for (to, owner) in &placement.sends {
            if let Some(owner) = owner {
                tally.substitute(owner);
                fallbacks.insert(to.clone(), owner.clone());
            }
        }
        if dw > 0 {
            self.await_durable(
                merged.seq,
                DurableWaiter::Local(op),
                storage,
                &mut tally,
                out,
            );
        }
        let encoded = merged.state.encode_canonical();
        // The coordinator's own flush gives one durable acknowledgement; replicas are asked to
        // answer after their flush only when the request needs more. A replica answers each
        // Replicate once: `Applied` at once, or `Durable` (which also counts as applied) after
        // its flush, never both.
        let durable = dw > 1;
        for (to, owner) in placement.sends {
            out.push(Output::Send {
                to,
                message: PeerMessage::Replicate {
                    op,
                    keyspace: checked.keyspace.to_string(),
                    key: checked.key.to_vec(),
                    state: encoded.clone(),
                    durable,
                    hint_for: owner.map(|owner| owner.to_string()),
                },
            });
        }
        self.insert_op(
            op,
            Op::Write(WriteOp {
                origin,
                tally,
                deadline_ms,
                reply_context,
                keyspace: checked.keyspace.to_string(),
                key: checked.key.to_vec(),
                owners: checked.preference_list.clone(),
                fallbacks,
                hinted_here: placement.hinted_here.into_iter().collect(),
                replied: false,
            }),
        );
        self.settle(op, out);
        Ok(())
    }

    /// Refuses a write that would leave the key over its sibling, size or context limit without
    /// making it smaller: a key's state must always fit one replication frame, and a write that
    /// resolves siblings (it replaces some with its context) is always allowed, or a key at the
    /// limit could never be repaired.
    ///
    /// The context limit is what lets reads never hand out a context that writes refuse: a
    /// read returns the join of replicas' states, each kept within `context_entries_max` by
    /// the writes that made it, and client tokens are accepted up to [`CONTEXT_TOKEN_SLACK`]
    /// times that, room for the join of states written concurrently at different
    /// coordinators.
    fn check_key_state(&self, before: &KeyState, after: &KeyState) -> Result<(), ErrorReply> {
        let (count_before, count_after) = (before.sibling_count(), after.sibling_count());
        if count_after > self.config.siblings_per_key_max && count_after >= count_before {
            metrics::limit_exceeded("siblings_per_key");
            return Err(invalid(format!(
                "the key has {count_before} siblings and this write would add another (limit \
                 limits.siblings_per_key_max = {}); read the key and write with its context \
                 to resolve them",
                self.config.siblings_per_key_max
            )));
        }
        let bytes_after = after.encode_canonical().len();
        // Only a state over the limit pays for encoding the old one too.
        if bytes_after > self.config.key_state_bytes_max
            && bytes_after >= before.encode_canonical().len()
        {
            metrics::limit_exceeded("key_state_bytes");
            return Err(invalid(format!(
                "the key's state would be {bytes_after} bytes, more than one replication frame \
                 carries ({} bytes, from limits.frame_bytes_max); read the key and write with \
                 its context to replace its siblings",
                self.config.key_state_bytes_max
            )));
        }
        let (entries_before, entries_after) = (before.context().len(), after.context().len());
        if entries_after > self.config.context_entries_max && entries_after > entries_before {
            metrics::limit_exceeded("context_entries");
            return Err(invalid(format!(
                "the key's causal context would grow to {entries_after} entries (limit \
                 limits.context_entries_max = {}): it has been written through too many node \
                 incarnations",
                self.config.context_entries_max
            )));
        }
        if count_after >= self.config.siblings_per_key_warn && count_after > count_before {
            metrics::sibling_warning();
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn coordinate_get(
        &mut self,
        _now: Now,
        origin: Origin,
        checked: &Checked<'_>,
        options: &ReadOptions,
        deadline_ms: u64,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) -> Result<(), ErrorReply> {
        let r = read_quorum(checked.n, options)?;
        let local = storage
            .read(checked.keyspace, checked.key)
            .map_err(|e| self.storage_error("reading the local copy", e))?
            .unwrap_or_default();
        let op = self.new_op();
        let mut tally = Tally::new(checked.preference_list.iter().cloned(), r, 0);
        tally.record(&self.me, ReplicaProgress::Applied);
        let own_hash = (!local.is_empty()).then(|| local.state_hash());
        self.fan_out(checked, &mut tally, out, || PeerMessage::Read {
            op,
            keyspace: checked.keyspace.to_string(),
            key: checked.key.to_vec(),
        });
        self.insert_op(
            op,
            Op::Read(ReadOp {
                origin,
                tally,
                deadline_ms,
                keyspace: checked.keyspace.to_string(),
                key: checked.key.to_vec(),
                merged: local,
                answers: [(self.me.clone(), own_hash)].into(),
                repair: options.repair,
                replied: false,
                final_repair: false,
                repairing: Default::default(),
                holders: Default::default(),
            }),
        );
        self.settle(op, out);
        Ok(())
    }

    /// Sends `message()` to every other replica believed up; the ones believed down count as
    /// failed at once, so the request does not wait for them.
    pub(super) fn fan_out(
        &self,
        checked: &Checked<'_>,
        tally: &mut Tally,
        out: &mut Vec<Output>,
        message: impl Fn() -> PeerMessage,
    ) {
        for replica in checked
            .preference_list
            .iter()
            .filter(|node| **node != self.me)
        {
            if self.detector.is_up(replica) {
                out.push(Output::Send {
                    to: replica.clone(),
                    message: message(),
                });
            } else {
                tally.record(replica, ReplicaProgress::Failed);
            }
        }
    }

    pub(super) fn decode_context(
        &self,
        checked: &Checked<'_>,
        context: Option<&Context>,
    ) -> Result<ClientContext, ErrorReply> {
        match context {
            None => Ok(ClientContext::default()),
            Some(token) if token.is_empty() => Ok(ClientContext::default()),
            Some(token) => version_vector::decode_token(
                &self.config.context_keys,
                token.as_bytes(),
                checked.keyspace,
                checked.key,
                self.config
                    .context_entries_max
                    .saturating_mul(CONTEXT_TOKEN_SLACK),
            )
            .map_err(|e| {
                match &e {
                    crate::Error::ContextTooLarge { unit: "bytes", .. } => {
                        metrics::limit_exceeded("context_bytes")
                    }
                    crate::Error::ContextTooLarge { .. } => {
                        metrics::limit_exceeded("context_entries")
                    }
                    crate::Error::ContextNotAuthentic => {
                        // A forgery, damage in transit, or a context from before a secret was
                        // retired: worth seeing, but a client sent it, so not above `info`.
                        metrics::context_refused("not_authentic");
                        tracing::info!(
                            keyspace = %checked.keyspace.escape_debug(),
                            key_bytes = checked.key.len(),
                            "refused a context that no accepted cluster secret sealed"
                        );
                    }
                    _ => metrics::context_refused("invalid"),
                }
                invalid(e.to_string())
            }),
        }
    }

    pub(super) fn on_read_reply(
        &mut self,
        op: OpId,
        from: &NodeId,
        (keyspace, key): (&str, &[u8]),
        state: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        let Some(Op::Read(read)) = self.ops.get_mut(&op) else {
            return;
        };
        if read.keyspace != keyspace || read.key != key {
            // Operation ids are unique, so only a bug or a hostile peer gets here; an answer
            // about another key must never be joined into this one.
            tracing::warn!(peer = %from, "replica answered a read with another key; ignored");
            return self.on_progress(op, from, ReplicaProgress::Failed, out);
        }
        if read.answers.contains_key(from) {
            // One answer per replica; a duplicate changes nothing.
            return;
        }
        let progress = match state.map(KeyState::decode).transpose() {
            Ok(Some(remote)) => {
                let hash = (!remote.is_empty()).then(|| remote.state_hash());
                read.answers.insert(from.clone(), hash);
                read.merged.join_in_place(&remote);
                ReplicaProgress::Applied
            }
            Ok(None) => {
                read.answers.insert(from.clone(), None);
                ReplicaProgress::Applied
            }
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "replica sent a corrupt key state");
                ReplicaProgress::Failed
            }
        };
        self.on_progress(op, from, progress, out);
    }

    pub(super) fn on_progress(
        &mut self,
        op: OpId,
        from: &NodeId,
        progress: ReplicaProgress,
        out: &mut Vec<Output>,
    ) {
        match self.ops.get_mut(&op) {
            Some(Op::Write(write)) => {
                // A fallback's answer fills the slot of the owner it stands in for.
                let slot = write.fallbacks.get(from).unwrap_or(from).clone();
                write.tally.record(&slot, progress);
            }
            Some(Op::Handoff(_)) => {
                let done = progress == ReplicaProgress::Durable;
                return self.on_handoff_answer(op, from, done);
            }
            Some(Op::Read(read)) => {
                // After its answer, a replica's progress for a read is its repair's.
                if !Self::on_repair_progress(read, from, progress) {
                    read.tally.record(from, progress);
                }
            }
            Some(Op::Forward(forward))
                if progress == ReplicaProgress::Failed && forward.to == *from =>
            {
                return self.retry_forward(op, out);
            }
            Some(Op::Inspect(_)) => return self.on_inspect_progress(op, from, progress, out),
            _ => return,
        }
        self.settle(op, out);
    }

    /// Answers `op` if its tally has decided.
    pub(super) fn settle(&mut self, op: OpId, out: &mut Vec<Output>) {
        let write = match self.ops.get(&op) {
            Some(Op::Write(write)) => write,
            Some(Op::Read(_)) => return self.settle_read(op, out),
            _ => return,
        };
        let verdict = write.tally.verdict();
        // A failed request still waits for the replicas that have not answered (never past its
        // deadline, and never for replicas known down), so its error reports every
        // acknowledgement that was actually made rather than whichever arrived first.
        let quiet = write.tally.waiting().next().is_none();
        if verdict == Verdict::Pending || (verdict == Verdict::Failed && !quiet) {
            return;
        }
        if !write.replied {
            let response = match verdict {
                Verdict::Reached => Response::Written {
                    context: write.reply_context.clone(),
                    hinted: write.tally.hinted(),
                },
                _ => quorum_not_reached("write", write.tally.shortfall(), false),
            };
            let origin = write.origin.clone();
            self.answer(&origin, response, out);
            if let Some(Op::Write(write)) = self.ops.get_mut(&op) {
                write.replied = true;
            }
        }
        // After the reply the write lingers until every owner answered, so that each owner
        // that did not apply it gets a hint (at the latest at the deadline, see `expire`).
        if quiet || self.lingering.len() > self.config.in_flight_requests_max {
            self.finish_write(op);
        } else {
            self.lingering.insert(op);
        }
    }

    /// Ends a write: every owner that did not apply it (itself or through a fallback) and has
    /// no hint from the write yet gets one here.
    fn finish_write(&mut self, op: OpId) {
        if let Some(Op::Write(write)) = self.remove_op(op) {
            let missing: Vec<NodeId> = Self::owners_missing(&write.tally, &write.owners, &self.me)
                .into_iter()
                .filter(|owner| !write.hinted_here.contains(owner))
                .collect();
            if !missing.is_empty() {
                self.queue_hints(&write.keyspace, &write.key, missing);
            }
        }
    }

    pub(super) fn expire(&mut self, op: OpId, out: &mut Vec<Output>) {
        match self.ops.get(&op) {
            Some(Op::Read(_)) => return self.expire_read(op, out),
            Some(Op::Handoff(_)) => return self.expire_handoff(op),
            Some(Op::Inspect(_)) => return self.expire_inspect(op, out),
            Some(Op::Write(write)) => {
                if !write.replied {
                    let reply = quorum_not_reached("write", write.tally.shortfall(), true);
                    let origin = write.origin.clone();
                    self.answer(&origin, reply, out);
                }
                return self.finish_write(op);
            }
            _ => {}
        }
        match self.remove_op(op) {
            Some(Op::Write(_)) | Some(Op::Handoff(_)) | Some(Op::Inspect(_)) => {}
            Some(Op::Read(_)) => {}
            Some(Op::Forward(forward)) => {
                let message = format!("coordinator {} did not answer in time", forward.to);
                out.push(Output::Reply {
                    handle: forward.client,
                    response: error(ErrorKind::Unavailable, message),
                });
            }
            None => {}
        }
    }
}
