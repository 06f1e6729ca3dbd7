//! Inspection: what each replica of a key stores, seen without changing it
//! ([`Request::Replicas`], `quorumkv admin replicas`).
//!
//! A get cannot show one replica's copy: it joins every answer into one state and then repairs
//! the replicas it found behind (see [`super::read_repair`]), so looking would change what is
//! looked at. An inspection asks the same question of every replica ([`PeerMessage::Read`],
//! which on its own never repairs anything: repair is decided by a get's coordinator) but
//! keeps each answer apart and reports it as it came.
//!
//! # What the node does
//!
//! 1. Any node accepts the request, replica of the key or not; nothing is forwarded. Admission
//!    checks it like a data request (keyspace, key size, in-flight and send-queue limits).
//! 2. For each node of the key's preference list, in order: this node reads its own copy
//!    directly; a peer the failure detector believes down is reported failed at once; every
//!    other peer is sent a `Read`.
//! 3. Each answer is kept as it came: a copy (summarised: live siblings, whether it is a
//!    tombstone, a version summary `actor → counter`, the state hash), no copy, or a failure
//!    (a `Failed` answer, an undeliverable message, a peer found down meanwhile, a corrupt
//!    state or an answer about another key).
//! 4. The node answers [`Response::Replicas`] once every replica has answered or failed, or at
//!    the request's deadline, when the silent ones are reported timed out.
//!
//! # Guarantees
//!
//! An inspection never writes: no repair, local or remote, and no storage merge. A failed
//! replica is an entry of the answer, never an error of the whole request, so an operator
//! sees a partial picture rather than none. The answer is a snapshot per replica, not a
//! consistent cut: writes may land between the answers.
//!
//! # Fallbacks
//!
//! A write taken in by a fallback for an owner that was down (sloppy quorum, see
//! [`super::hints`]) lives on the fallback as a hint until it is handed over. So the node
//! also asks every other member outside the preference list that its failure detector
//! believes up for the hints it holds for the key ([`PeerMessage::HintRead`]), and lists each
//! hint after the owners, as [`ReplicaRole::Fallback`] with the owner it is for
//! (`ReplicaCopy::hint_for`). Members holding none are not listed, nor are members that could
//! not be asked (down, unreachable, silent until the deadline): a fallback entry is never a
//! failure, so it never turns the answer into a partial one.

use super::{NodeCore, Op, Origin, Output};
use crate::peer::{HeldHint, OpId, PeerMessage};
use crate::quorum::ReplicaProgress;
use crate::storage::{AuxTable, Storage};
use crate::version_vector::KeyState;
use quorumkv_client::protocol::{
    ReplicaAnswer, ReplicaCopy, ReplicaRole, Request, Response, SiblingValue, StoredCopy,
};
use quorumkv_ring::NodeId;
use std::collections::BTreeSet;

/// An inspection in flight: one slot per replica, in preference-list order.
#[derive(Debug)]
pub(super) struct InspectOp {
    origin: Origin,
    deadline_ms: u64,
    keyspace: String,
    key: Vec<u8>,
    /// Each replica, its role and its answer (`None` while it is due).
    replicas: Vec<(NodeId, ReplicaRole, Option<ReplicaAnswer>)>,
    /// Members outside the preference list asked for their hints, not answered yet.
    fallbacks_due: BTreeSet<NodeId>,
    /// The hints found so far: (fallback, owner, its copy).
    fallback_copies: Vec<(NodeId, String, ReplicaAnswer)>,
}

impl InspectOp {
    pub(super) fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// Whether `node`'s answer is still due.
    pub(super) fn waiting_on(&self, node: &NodeId) -> bool {
        self.slot(node).is_some() || self.fallbacks_due.contains(node)
    }

    /// The slot of `node` if its answer is still due.
    fn slot(&self, node: &NodeId) -> Option<usize> {
        self.replicas
            .iter()
            .position(|(id, _, answer)| id == node && answer.is_none())
    }

    fn done(&self) -> bool {
        self.replicas.iter().all(|(_, _, answer)| answer.is_some()) && self.fallbacks_due.is_empty()
    }
}

impl NodeCore {
    /// Starts inspecting the replicas of `checked`'s key (see the module docs).
    pub(super) fn inspect(
        &mut self,
        origin: Origin,
        checked: &super::Checked<'_>,
        deadline_ms: u64,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let op = self.new_op();
        let mut replicas = Vec::with_capacity(checked.preference_list.len());
        for (position, node) in checked.preference_list.iter().enumerate() {
            let role = ReplicaRole::Primary {
                // A preference list is at most N long, and N is a u8.
                position: u8::try_from(position).unwrap_or(u8::MAX),
            };
            let answer = if *node == self.me {
                Some(self.inspect_own_copy(checked.keyspace, checked.key, storage))
            } else if !self.detector.is_up(node) {
                Some(ReplicaAnswer::Failed {
                    reason: format!("node {} believes it down (no answer to pings)", self.me),
                })
            } else {
                out.push(Output::Send {
                    to: node.clone(),
                    message: PeerMessage::Read {
                        op,
                        keyspace: checked.keyspace.to_string(),
                        key: checked.key.to_vec(),
                    },
                });
                None
            };
            replicas.push((node.clone(), role, answer));
        }
        let mut fallbacks_due = BTreeSet::new();
        let mut fallback_copies = Vec::new();
        let outsiders: Vec<NodeId> = self
            .map
            .addresses
            .keys()
            .filter(|node| !checked.preference_list.contains(node))
            .cloned()
            .collect();
        for node in outsiders {
            if node == self.me {
                for (owner, state) in self.held_hints(checked, storage).unwrap_or_default() {
                    let answer = summarise(Some(&state));
                    fallback_copies.push((node.clone(), owner, answer));
                }
            } else if self.detector.is_up(&node) {
                out.push(Output::Send {
                    to: node.clone(),
                    message: PeerMessage::HintRead {
                        op,
                        keyspace: checked.keyspace.to_string(),
                        key: checked.key.to_vec(),
                    },
                });
                fallbacks_due.insert(node);
            }
        }
        self.insert_op(
            op,
            Op::Inspect(InspectOp {
                origin,
                deadline_ms,
                keyspace: checked.keyspace.to_string(),
                key: checked.key.to_vec(),
                replicas,
                fallbacks_due,
                fallback_copies,
            }),
        );
        self.finish_inspect_if_done(op, out);
    }

    /// The hints this node holds for `checked`'s key that carry a state, by owner.
    fn held_hints(
        &mut self,
        checked: &super::Checked<'_>,
        storage: &dyn Storage,
    ) -> Option<Vec<(String, KeyState)>> {
        let mut held = Vec::new();
        for owner in &checked.preference_list {
            let hkey = super::hints::hint_key(owner, checked.keyspace, checked.key);
            let record = match storage.aux(AuxTable::Hints, &hkey) {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(e) => {
                    self.storage_error("reading a hint", e);
                    return None;
                }
            };
            let state = super::hints::HintRecord::decode(&record)
                .ok()
                .and_then(|record| record.state)
                .and_then(|bytes| KeyState::decode(&bytes).ok());
            if let Some(state) = state {
                held.push((owner.to_string(), state));
            }
        }
        Some(held)
    }

    /// A [`PeerMessage::HintRead`]: the hints held here for the key, for any of its owners.
    pub(super) fn on_hint_read(
        &mut self,
        from: NodeId,
        op: OpId,
        keyspace: &str,
        key: &[u8],
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let message = match self.check(keyspace, key, 0, None) {
            Err(reply) => PeerMessage::Failed {
                op,
                reason: reply.message,
            },
            Ok(checked) => match self.held_hints(&checked, storage) {
                Some(held) => PeerMessage::HintReadReply {
                    op,
                    hints: held
                        .into_iter()
                        .map(|(owner, state)| HeldHint {
                            owner,
                            state: state.encode_canonical(),
                        })
                        .collect(),
                },
                None => PeerMessage::Failed {
                    op,
                    reason: "reading hints failed".to_string(),
                },
            },
        };
        out.push(Output::Send { to: from, message });
    }

    /// A member's [`PeerMessage::HintReadReply`] to inspection `op`.
    pub(super) fn on_inspect_hints(
        &mut self,
        op: OpId,
        from: &NodeId,
        hints: Vec<HeldHint>,
        out: &mut Vec<Output>,
    ) {
        let Some(Op::Inspect(inspect)) = self.ops.get_mut(&op) else {
            return;
        };
        if !inspect.fallbacks_due.remove(from) {
            return;
        }
        for hint in hints {
            let answer = match KeyState::decode(&hint.state) {
                Ok(state) => summarise(Some(&state)),
                Err(e) => ReplicaAnswer::Failed {
                    reason: format!("sent a corrupt hint: {e}"),
                },
            };
            inspect
                .fallback_copies
                .push((from.clone(), hint.owner, answer));
        }
        self.finish_inspect_if_done(op, out);
    }

    fn inspect_own_copy(
        &mut self,
        keyspace: &str,
        key: &[u8],
        storage: &dyn Storage,
    ) -> ReplicaAnswer {
        match storage.read(keyspace, key) {
            Ok(state) => summarise(state.as_ref()),
            Err(e) => ReplicaAnswer::Failed {
                reason: self.storage_error("reading the local copy", e).message,
            },
        }
    }

    /// Whether `op` is an inspection, whose answers go to [`NodeCore::on_inspect_reply`] and
    /// [`NodeCore::on_inspect_failed`] rather than to a get's coordinator.
    pub(super) fn is_inspection(&self, op: OpId) -> bool {
        matches!(self.ops.get(&op), Some(Op::Inspect(_)))
    }

    /// A replica's `ReadReply` to inspection `op`.
    pub(super) fn on_inspect_reply(
        &mut self,
        op: OpId,
        from: &NodeId,
        (keyspace, key): (&str, &[u8]),
        state: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        let Some(Op::Inspect(inspect)) = self.ops.get_mut(&op) else {
            return;
        };
        let Some(slot) = inspect.slot(from) else {
            // Not a replica of the key, or it answered already: a duplicate changes nothing.
            return;
        };
        let answer = if inspect.keyspace != keyspace || inspect.key != key {
            // Operation ids are unique, so only a bug or a hostile peer gets here.
            tracing::warn!(peer = %from, "replica answered an inspection with another key");
            ReplicaAnswer::Failed {
                reason: "answered about another key".to_string(),
            }
        } else {
            match state.map(KeyState::decode).transpose() {
                Ok(state) => summarise(state.as_ref()),
                Err(e) => {
                    tracing::warn!(peer = %from, error = %e, "replica sent a corrupt key state");
                    ReplicaAnswer::Failed {
                        reason: format!("sent a corrupt key state: {e}"),
                    }
                }
            }
        };
        inspect.replicas[slot].2 = Some(answer);
        self.finish_inspect_if_done(op, out);
    }

    /// A replica answered `Failed` to inspection `op`.
    pub(super) fn on_inspect_failed(
        &mut self,
        op: OpId,
        from: &NodeId,
        reason: String,
        out: &mut Vec<Output>,
    ) {
        self.record_inspect_failure(op, from, reason, out);
    }

    /// Progress reported without an answer: a message that could not be delivered, or a peer
    /// found down. Only a failure means anything to an inspection.
    pub(super) fn on_inspect_progress(
        &mut self,
        op: OpId,
        from: &NodeId,
        progress: ReplicaProgress,
        out: &mut Vec<Output>,
    ) {
        if progress == ReplicaProgress::Failed {
            let reason = format!("unreachable from node {}, or found down", self.me);
            self.record_inspect_failure(op, from, reason, out);
        }
    }

    fn record_inspect_failure(
        &mut self,
        op: OpId,
        from: &NodeId,
        reason: String,
        out: &mut Vec<Output>,
    ) {
        let Some(Op::Inspect(inspect)) = self.ops.get_mut(&op) else {
            return;
        };
        if let Some(slot) = inspect.slot(from) {
            inspect.replicas[slot].2 = Some(ReplicaAnswer::Failed { reason });
            self.finish_inspect_if_done(op, out);
        } else if inspect.fallbacks_due.remove(from) {
            // A member that could not say whether it holds hints is not listed.
            self.finish_inspect_if_done(op, out);
        }
    }

    fn finish_inspect_if_done(&mut self, op: OpId, out: &mut Vec<Output>) {
        if matches!(self.ops.get(&op), Some(Op::Inspect(inspect)) if inspect.done()) {
            self.expire_inspect(op, out);
        }
    }

    /// Answers inspection `op` with what it has; replicas still silent are timed out.
    pub(super) fn expire_inspect(&mut self, op: OpId, out: &mut Vec<Output>) {
        let Some(Op::Inspect(inspect)) = self.remove_op(op) else {
            return;
        };
        let fallbacks = inspect
            .fallback_copies
            .into_iter()
            .map(|(node, owner, answer)| ReplicaCopy {
                node: node.to_string(),
                role: ReplicaRole::Fallback,
                answer,
                hint_for: Some(owner),
            });
        let copies = inspect
            .replicas
            .into_iter()
            .map(|(node, role, answer)| ReplicaCopy {
                node: node.to_string(),
                role,
                answer: answer.unwrap_or(ReplicaAnswer::TimedOut),
                hint_for: None,
            })
            .chain(fallbacks)
            .collect();
        self.answer(&inspect.origin, Response::Replicas(copies), out);
    }
}

/// A replica's copy as the protocol reports it; no copy, or an empty one, is `Missing`.
pub(super) fn summarise(state: Option<&KeyState>) -> ReplicaAnswer {
    let Some(state) = state.filter(|state| !state.is_empty()) else {
        return ReplicaAnswer::Missing;
    };
    let siblings = state
        .live_siblings()
        .into_iter()
        .map(|sibling| SiblingValue {
            value: sibling.value.clone().unwrap_or_default(),
            timestamp_ms: sibling.timestamp_ms,
        })
        .collect();
    let context = state.context();
    let mut version: std::collections::BTreeMap<String, u64> = context
        .version_vector()
        .iter()
        .map(|(actor, counter)| (actor.to_string(), *counter))
        .collect();
    // Dots learned out of order: the summary shows the highest counter of each actor.
    for dot in context.cloud() {
        let counter = version.entry(dot.actor.to_string()).or_insert(0);
        *counter = (*counter).max(dot.counter);
    }
    ReplicaAnswer::Stored(StoredCopy {
        siblings,
        deleted: state.is_deleted(),
        version,
        state_hash: hex(&state.state_hash()),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Whether `request` is an inspection (admission routes it here instead of coordinating it).
pub(super) fn is_inspection_request(request: &Request) -> bool {
    matches!(request, Request::Replicas { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version_vector::{Actor, CausalContext, Dot, RequestId};

    #[test]
    fn a_copy_is_summarised_with_its_version_and_hash() {
        let mut state = KeyState::new();
        let dot = Dot::new(Actor(0x3e9), 1);
        state
            .update(
                &CausalContext::new(),
                dot,
                RequestId([1; 16]),
                7,
                Some(b"v".to_vec()),
            )
            .unwrap();
        match summarise(Some(&state)) {
            ReplicaAnswer::Stored(copy) => {
                assert_eq!(copy.siblings.len(), 1);
                assert_eq!(copy.siblings[0].value, b"v");
                assert_eq!(copy.siblings[0].timestamp_ms, 7);
                assert!(!copy.deleted);
                assert_eq!(copy.version, [("00000000000003e9".to_string(), 1)].into());
                assert_eq!(copy.state_hash, hex(&state.state_hash()));
                assert_eq!(copy.state_hash.len(), 64);
            }
            other => panic!("expected a stored copy, got {other:?}"),
        }
        assert_eq!(summarise(None), ReplicaAnswer::Missing);
        assert_eq!(summarise(Some(&KeyState::new())), ReplicaAnswer::Missing);
    }

    #[test]
    fn a_tombstone_is_a_deleted_copy_without_siblings() {
        let mut state = KeyState::new();
        let put = Dot::new(Actor(1), 1);
        let outcome = state
            .update(
                &CausalContext::new(),
                put,
                RequestId([1; 16]),
                1,
                Some(b"v".to_vec()),
            )
            .unwrap();
        let delete = Dot::new(Actor(1), 2);
        state
            .update(&outcome.context, delete, RequestId([2; 16]), 2, None)
            .unwrap();
        match summarise(Some(&state)) {
            ReplicaAnswer::Stored(copy) => {
                assert!(copy.deleted);
                assert!(copy.siblings.is_empty());
                assert_eq!(copy.version, [("0000000000000001".to_string(), 2)].into());
            }
            other => panic!("expected a stored copy, got {other:?}"),
        }
    }
}
