//! Read repair: a read that finds replicas disagreeing writes the merged version back to the
//! ones that are behind.
//!
//! A get joins every replica's answer into one state (see [`super::coordinate`]). Each answer's
//! state hash is remembered, so once the read has its answers the coordinator knows exactly
//! which replicas hold less than the merged state: those that answered with another hash, or
//! with no copy at all. Each of them receives the merged state as an ordinary replica write
//! ([`PeerMessage::Replicate`]), so repair goes through the one write path and can never lose a
//! sibling: a replica joins what it receives into what it has, whatever arrived meanwhile. The
//! coordinator's own stale copy is merged locally the same way. This is Dynamo's read repair
//! (§4.7, "read repair"), Riak's `get_fsm` repair and Cassandra's read repair.
//!
//! # When
//!
//! - **Background** (the default, [`ReadRepair::Background`]): the client gets its reply as
//!   soon as R replicas answered; the read then lingers, collecting the late answers until
//!   every replica has answered or failed, or its deadline passes, and repairs whatever it found
//!   behind. The client is never delayed by repair.
//! - **Blocking** ([`ReadRepair::Blocking`]): once R replicas answered, the stale ones among them
//!   are repaired first, and the reply waits until at least R replicas are known to hold the
//!   returned version (they answered with it, or acknowledged its repair). A later quorum read
//!   then cannot see anything older: monotonic quorum reads, like Cassandra's blocking read
//!   repair. If that cannot be reached before the deadline, the read fails with
//!   `QuorumNotReached` naming what it reached.
//!
//! # Bounds
//!
//! A read stays in the node's table after its reply only while answers or repair
//! acknowledgements are due, and never past its deadline. Such lingering reads (and writes, see
//! [`super::hints`]) do not count toward `in_flight_requests_max`, but at most that many may
//! linger at once; beyond it a read ends with its reply and skips background repair, which
//! anti-entropy covers, counted by `quorumkv_read_repairs_total{outcome="skipped"}`. Each
//! repair carries one state of at most one frame. Replicas believed down are not repaired
//! (hinted handoff and anti-entropy bring them up to date when they return).
//!
//! Only state hashes of the answers are kept, never the states themselves, so a lingering read
//! costs the merged state plus 32 bytes per replica.

use super::{quorum_not_reached, NodeCore, Op, Output, ReadOp};
use crate::metrics;
use crate::peer::{OpId, PeerMessage};
use crate::quorum::{ReplicaProgress, Verdict};
use crate::storage::Storage;
use crate::version_vector::{self, ClientContext};
use quorumkv_client::protocol::{
    ErrorKind, ErrorReply, QuorumShortfall, ReadRepair, Response, SiblingValue,
};
use quorumkv_client::Context;
use quorumkv_ring::NodeId;

impl NodeCore {
    /// Moves a read along: reply when its quorum (and, for a blocking read, its repair) is
    /// reached, repair stale replicas, and end it when nothing more is due.
    pub(super) fn settle_read(&mut self, op: OpId, out: &mut Vec<Output>) {
        let Some(Op::Read(read)) = self.ops.get(&op) else {
            return;
        };
        let verdict = read.tally.verdict();
        let quiet = read.tally.waiting().next().is_none();
        match verdict {
            Verdict::Pending => return,
            // A failed read still waits for the replicas that have not answered (never past
            // its deadline, never for replicas known down), so its error counts every answer.
            Verdict::Failed if !quiet => return,
            Verdict::Failed => {
                if let Some(Op::Read(read)) = self.remove_op(op) {
                    let reply = quorum_not_reached("read", read.tally.shortfall(), false);
                    self.answer(&read.origin, reply, out);
                }
                return;
            }
            Verdict::Reached => {}
        }
        if !read.replied {
            match read.repair {
                ReadRepair::Background => self.reply_to_read(op, out),
                ReadRepair::Blocking => {
                    self.repair_stale(op, out);
                    let Some(Op::Read(read)) = self.ops.get(&op) else {
                        return;
                    };
                    if read.holders.len() >= usize::from(read.tally.required()) {
                        self.reply_to_read(op, out);
                    } else if read.repairing.is_empty() {
                        // Every repair it could send has failed: the read cannot be monotonic.
                        return self.fail_blocking_read(op, out);
                    } else {
                        return;
                    }
                }
            }
        }
        let Some(Op::Read(read)) = self.ops.get(&op) else {
            return;
        };
        if read.tally.waiting().next().is_some() {
            // Late answers are still due; they may show more stale replicas.
            return self.linger(op);
        }
        if !read.final_repair {
            if self.lingering.len() > self.config.in_flight_requests_max {
                metrics::read_repair("skipped");
                self.remove_op(op);
                return;
            }
            if let Some(Op::Read(read)) = self.ops.get_mut(&op) {
                read.final_repair = true;
            }
            self.repair_stale(op, out);
        }
        match self.ops.get(&op) {
            Some(Op::Read(read)) if !read.repairing.is_empty() => self.linger(op),
            _ => {
                self.remove_op(op);
            }
        }
    }

    /// Sends the merged state to every replica that answered with less and is not being
    /// repaired yet; this node's own copy, if behind, is merged at the end of the current input
    /// (see [`NodeCore::apply_local_repairs`]).
    fn repair_stale(&mut self, op: OpId, out: &mut Vec<Output>) {
        let Some(Op::Read(read)) = self.ops.get_mut(&op) else {
            return;
        };
        if read.merged.is_empty() {
            return;
        }
        let merged_hash = read.merged.state_hash();
        let stale: Vec<NodeId> = read
            .answers
            .iter()
            .filter(|(node, hash)| {
                **hash != Some(merged_hash)
                    && !read.repairing.contains(*node)
                    && !read.holders.contains(*node)
            })
            .map(|(node, _)| node.clone())
            .collect();
        for (node, hash) in &read.answers {
            if *hash == Some(merged_hash) {
                read.holders.insert(node.clone());
            }
        }
        if stale.is_empty() {
            return;
        }
        let (keyspace, key, merged) =
            (read.keyspace.clone(), read.key.clone(), read.merged.clone());
        let encoded = merged.encode_canonical();
        for node in stale {
            if node == self.me {
                metrics::read_repair("local");
                self.local_repairs
                    .push((keyspace.clone(), key.clone(), merged.clone()));
                if let Some(Op::Read(read)) = self.ops.get_mut(&op) {
                    read.holders.insert(node);
                }
            } else if self.detector.is_up(&node) {
                metrics::read_repair("sent");
                out.push(Output::Send {
                    to: node.clone(),
                    message: PeerMessage::Replicate {
                        op,
                        keyspace: keyspace.clone(),
                        key: key.clone(),
                        state: encoded.clone(),
                        durable: false,
                        hint_for: None,
                    },
                });
                if let Some(Op::Read(read)) = self.ops.get_mut(&op) {
                    read.repairing.insert(node);
                }
            }
        }
    }

    /// Records a repaired replica's acknowledgement (or failure) for `op`; returns whether
    /// `from` was being repaired by it.
    pub(super) fn on_repair_progress(
        read: &mut ReadOp,
        from: &NodeId,
        progress: ReplicaProgress,
    ) -> bool {
        if !read.repairing.remove(from) {
            return false;
        }
        if progress != ReplicaProgress::Failed {
            read.holders.insert(from.clone());
        } else {
            metrics::read_repair("failed");
        }
        true
    }

    fn linger(&mut self, op: OpId) {
        self.lingering.insert(op);
    }

    /// Sends the client the read's merged siblings and context.
    fn reply_to_read(&mut self, op: OpId, out: &mut Vec<Output>) {
        let Some(Op::Read(read)) = self.ops.get_mut(&op) else {
            return;
        };
        read.replied = true;
        let siblings: Vec<SiblingValue> = read
            .merged
            .live_siblings()
            .into_iter()
            .map(|sibling| SiblingValue {
                value: sibling.value.clone().unwrap_or_default(),
                timestamp_ms: sibling.timestamp_ms,
            })
            .collect();
        // The reader supersedes what it was shown: every live write, each as one request id
        // however many copies retries left.
        let shown = read
            .merged
            .live_siblings()
            .into_iter()
            .map(|sibling| sibling.request_id)
            .take(self.config.context_entries_max);
        let token = version_vector::encode_token(
            &self.config.context_keys,
            &ClientContext::new(read.merged.context().clone(), shown),
            &read.keyspace,
            &read.key,
        );
        metrics::read_siblings(siblings.len());
        let response = Response::Got {
            siblings,
            context: Context::from_bytes(token),
        };
        let origin = read.origin.clone();
        self.answer(&origin, response, out);
    }

    /// Merges this node's stale copies that reads found, through the one write path. Called by
    /// [`NodeCore::handle`] after every input, so a repair decided anywhere (a late answer, a
    /// tick) is applied before the input returns. A failure only costs the repair: the read's
    /// answer stands, and an engine failure takes the node out of service as usual.
    pub(super) fn apply_local_repairs(&mut self, storage: &dyn Storage) {
        for (keyspace, key, state) in std::mem::take(&mut self.local_repairs) {
            if let Err(e) = self.store(storage, &keyspace, &key, &state, &[]) {
                let reply = self.storage_error("read repair of the local copy", e);
                tracing::warn!(error = %reply.message, "read repair failed locally");
            }
        }
    }

    /// A blocking read whose repair cannot (or did not in time) reach R holders.
    pub(super) fn fail_blocking_read(&mut self, op: OpId, out: &mut Vec<Output>) {
        metrics::quorum_failure("r");
        if let Some(Op::Read(read)) = self.remove_op(op) {
            let required = read.tally.required();
            // Below `required`, or the read would have been answered.
            let holders = read.holders.len().min(usize::from(required)) as u8;
            let message = format!(
                "read quorum not reached: the replicas answered, but after blocking read repair \
                 only {holders} of the required {required} hold the version read"
            );
            let reply = Response::Error(ErrorReply {
                kind: ErrorKind::QuorumNotReached,
                message,
                quorum: Some(QuorumShortfall {
                    required,
                    acked: holders,
                    durable_required: 0,
                    durable_acked: 0,
                }),
            });
            self.answer(&read.origin, reply, out);
        }
    }

    /// A read at its deadline: answered with what it reached, or ended if already answered.
    pub(super) fn expire_read(&mut self, op: OpId, out: &mut Vec<Output>) {
        let Some(Op::Read(read)) = self.ops.get(&op) else {
            return;
        };
        if read.replied {
            // Late answers that did come in still get their repair (unacknowledged: the read
            // ends here).
            if !read.final_repair {
                self.repair_stale(op, out);
            }
            self.remove_op(op);
        } else if read.tally.verdict() == Verdict::Reached {
            // Only a blocking read gets here: its quorum answered but its repair did not.
            self.fail_blocking_read(op, out);
        } else if let Some(Op::Read(read)) = self.remove_op(op) {
            let reply = quorum_not_reached("read", read.tally.shortfall(), true);
            self.answer(&read.origin, reply, out);
        }
    }
}
