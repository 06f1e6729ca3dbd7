//! Hinted handoff: writes a replica missed wait, durably, for it to come back.
//!
//! Dynamo keeps a write available when owners of its key are down by sending it to another
//! node with a *hint* naming the intended owner (DeCandia et al., SOSP 2007, §4.6); the holder
//! hands it over once the owner is reachable again. Riak (fallback vnodes and handoff) and
//! Cassandra (hints, `max_hint_window`) do the same. Here:
//!
//! - **Fallbacks under a sloppy quorum.** When a primary owner is believed down at the start of
//!   a write and the request allows sloppy quorums (the default), the coordinator sends the
//!   write to the next fallback the ring names for the key's range ([`Ring::fallbacks_for`]),
//!   marked with the owner it stands in for. The fallback stores the state in its hints table
//!   only (never as its own data, so reads and anti-entropy of ranges it does not own are
//!   untouched), joined with any hint it already holds for that key and owner, and acknowledges.
//!   That acknowledgement fills the owner's slot in the write's [`Tally`], counting toward W and
//!   `dw` but not toward `pw`, and the reply's `hinted` says how many such acknowledgements it
//!   counted. A fallback that cannot store the hint (its bound for that owner is reached, a
//!   storage error) refuses, and the refusal counts as a failed slot.
//! - **Hints at the coordinator.** Every owner that did not apply a write, whether or not W was
//!   met, gets a hint at the coordinator, which is itself a replica of the key: the hint only
//!   names the key, and delivery sends the coordinator's current copy, which contains the write.
//!   An owner known down when the write starts (and not covered by a fallback) gets its hint in
//!   the same storage write as the data ([`AuxWrite`] in the one merge); an owner that fails or
//!   stays silent later gets it when the write ends (all answered, or the deadline), in a
//!   separate write. With 3 nodes and N = 3 there is no fallback, so this is the only kind.
//! - **Delivery.** On every tick, for each owner with hints that the failure detector believes
//!   up, a bounded batch is sent as ordinary durable replica writes ([`PeerMessage::Replicate`]
//!   with `durable`), so handoff goes through the one write path and can only add. A hint is
//!   deleted only after the owner confirms the write is on its disk, and only if the hint's
//!   stored bytes are still the ones delivered: a hint that changed meanwhile (a newer write
//!   joined into it) stays for the next round.
//! - **Bounds.** Hints for one owner are bounded in bytes (`hints.bytes_per_target_max`). A
//!   fallback refuses a hint beyond it (so it never counts toward W); a coordinator's hint beyond
//!   it is dropped, with `quorumkv_hints_dropped_total{reason="bound"}` and a log line, leaving
//!   the range to anti-entropy. Coordinator hints not delivered within `hints.max_age_ms` of
//!   their last write expire the same way (`reason="age"`); a fallback's hint, on which a
//!   write's acknowledgement rested, is never dropped by a bound or by age.
//!
//! The per-owner totals (count and bytes) are kept in memory for the bound and the
//! `quorumkv_hints_pending` gauges, loaded from the hints table before the first input after
//! start is handled.
//!
//! # Record layout
//!
//! Key: the owner's node id, a zero byte, the keyspace, a zero byte, the key (node ids and
//! keyspace names hold no zero byte), so one owner's hints are one prefix scan. Value: a
//! [`HintRecord`] in MessagePack.

use super::{DurableWaiter, NodeCore, Now, Op, Output};
use crate::metrics;
use crate::peer::{OpId, PeerMessage};
use crate::quorum::Tally;
use crate::storage::{AuxTable, AuxWrite, Storage};
use crate::version_vector::KeyState;
use quorumkv_ring::{NodeId, Ring};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A hint's stored value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintRecord {
    /// Wall-clock ms of the last write that joined into this hint; age counts from here.
    pub updated_ms: u64,
    /// A write's acknowledgement counted on this hint (a fallback's): never dropped.
    pub counted: bool,
    /// The state to hand over (canonical encoding) when this node is a fallback; `None` when
    /// this node is a replica of the key and hands over its own current copy.
    #[serde(with = "serde_bytes")]
    pub state: Option<Vec<u8>>,
}

impl HintRecord {
    fn encode(&self) -> Vec<u8> {
        // A struct of plain fields always encodes.
        rmp_serde::to_vec_named(self).expect("a hint record encodes")
    }

    pub(super) fn decode(bytes: &[u8]) -> crate::Result<HintRecord> {
        quorumkv_client::msgpack::from_slice(bytes).map_err(|e| crate::Error::CorruptState {
            reason: format!("hint record does not decode: {e}"),
        })
    }
}

/// The hints table key of `owner`'s hint for `key` in `keyspace`.
pub fn hint_key(owner: &NodeId, keyspace: &str, key: &[u8]) -> Vec<u8> {
    let mut out = hint_prefix(owner);
    out.extend_from_slice(keyspace.as_bytes());
    out.push(0);
    out.extend_from_slice(key);
    out
}

fn hint_prefix(owner: &NodeId) -> Vec<u8> {
    let mut out = owner.as_str().as_bytes().to_vec();
    out.push(0);
    out
}

/// Splits a hints table key into (owner, keyspace, key).
fn split_hint_key(raw: &[u8]) -> Option<(NodeId, String, Vec<u8>)> {
    let first = raw.iter().position(|b| *b == 0)?;
    let rest = &raw[first + 1..];
    let second = rest.iter().position(|b| *b == 0)?;
    let owner = NodeId::new(std::str::from_utf8(&raw[..first]).ok()?).ok()?;
    let keyspace = std::str::from_utf8(&rest[..second]).ok()?.to_string();
    Some((owner, keyspace, rest[second + 1..].to_vec()))
}

/// Hints pending for one owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintTotals {
    pub count: u64,
    pub bytes: u64,
}

/// The core's hint bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Hints {
    /// Per owner, what the hints table holds; valid once `loaded`.
    totals: BTreeMap<NodeId, HintTotals>,
    /// Bumped whenever `totals` changes, so the shell knows when to republish `/sync-status`.
    generation: u64,
    loaded: bool,
    /// Hint keys being delivered now, so one hint is never in flight twice.
    delivering: BTreeSet<Vec<u8>>,
    /// Coordinator hints decided while handling the current input, written at its end.
    queued: Vec<(NodeId, String, Vec<u8>)>,
    /// Delivered hints to delete at the end of the current input, with their delivered bytes.
    delivered: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A hint delivery in flight: one hint, sent to its owner as a durable replica write.
#[derive(Debug)]
pub(super) struct HandoffOp {
    pub(super) owner: NodeId,
    pub(super) hint_key: Vec<u8>,
    /// The hint's stored bytes when it was sent: it is deleted only if they did not change.
    pub(super) record: Vec<u8>,
    pub(super) deadline_ms: u64,
}

/// Why a hint was not stored.
pub(super) enum HintRefused {
    /// Storing it would take the owner's hints over `hints.bytes_per_target_max`.
    Bound,
    Storage(crate::Error),
}

/// Where a write goes besides the coordinator: each owner believed up gets it directly; an
/// owner believed down is covered by a fallback (sloppy quorum), or else by a hint here.
pub(super) struct Placement {
    /// (node to send to, the owner whose slot it fills if it is a fallback).
    pub(super) sends: Vec<(NodeId, Option<NodeId>)>,
    /// Owners believed down with no fallback: hinted in the same write as the data.
    pub(super) hinted_here: Vec<NodeId>,
}

impl NodeCore {
    /// Plans where a write to `preference_list` goes (see [`Placement`]).
    pub(super) fn place_write(
        &self,
        ring: &Ring,
        keyspace: &str,
        key: &[u8],
        preference_list: &[NodeId],
        sloppy: bool,
    ) -> Placement {
        let mut placement = Placement {
            sends: Vec::new(),
            hinted_here: Vec::new(),
        };
        let mut fallbacks: Vec<NodeId> = Vec::new();
        let mut fallbacks_loaded = false;
        for owner in preference_list.iter().filter(|node| **node != self.me) {
            if self.detector.is_up(owner) {
                placement.sends.push((owner.clone(), None));
                continue;
            }
            if sloppy && !fallbacks_loaded {
                fallbacks_loaded = true;
                let range = ring.range_of(quorumkv_ring::Token::of(keyspace, key));
                let n = preference_list.len();
                fallbacks = ring
                    .fallbacks_for(range, n)
                    .map(|nodes| nodes.into_iter().map(|node| node.id.clone()).collect())
                    .unwrap_or_default();
                fallbacks.retain(|node| *node != self.me && self.detector.is_up(node));
                fallbacks.reverse(); // pop() takes them in the ring's order
            }
            match fallbacks.pop() {
                Some(fallback) if sloppy => placement.sends.push((fallback, Some(owner.clone()))),
                _ => placement.hinted_here.push(owner.clone()),
            }
        }
        placement
    }

    /// The aux writes that hint `owners` about `key` here, as part of the write that stores
    /// the data. Owners over their bound are dropped (counted and logged).
    pub(super) fn coordinator_hints(
        &mut self,
        now: Now,
        keyspace: &str,
        key: &[u8],
        owners: &[NodeId],
    ) -> Vec<(NodeId, AuxWrite)> {
        let record = HintRecord {
            updated_ms: now.wall_ms,
            counted: false,
            state: None,
        }
        .encode();
        owners
            .iter()
            .filter(|owner| self.hint_fits(owner, record.len() as u64, false, key))
            .map(|owner| {
                let write = AuxWrite {
                    table: AuxTable::Hints,
                    key: hint_key(owner, keyspace, key),
                    value: Some(record.clone()),
                };
                (owner.clone(), write)
            })
            .collect()
    }

    /// Whether a hint of `bytes` more for `owner` fits its bound; a coordinator hint that does
    /// not is dropped here (metric and log), a counted one is the caller's refusal.
    fn hint_fits(&self, owner: &NodeId, bytes: u64, counted: bool, key: &[u8]) -> bool {
        let pending = self.hints.totals.get(owner).copied().unwrap_or_default();
        let fits = pending.bytes.saturating_add(bytes) <= self.config.hint_bytes_per_target_max;
        if !fits && !counted {
            metrics::hint_dropped("bound");
            tracing::warn!(
                %owner,
                pending_bytes = pending.bytes,
                key = %crate::storage::key_for_display(key),
                "hints for this owner are at hints.bytes_per_target_max; this write is left \
                 to anti-entropy"
            );
        }
        fits
    }

    /// Records that hint writes for `owners` landed (totals, metric).
    pub(super) fn note_hints_written(
        &mut self,
        written: &[(NodeId, AuxWrite)],
        existed: &[Option<usize>],
        kind: &'static str,
    ) {
        for ((owner, write), old) in written.iter().zip(existed) {
            let new = write.value.as_ref().map_or(0, Vec::len) as u64;
            let totals = self.hints.totals.entry(owner.clone()).or_default();
            match old {
                Some(old) => totals.bytes = totals.bytes.saturating_sub(*old as u64) + new,
                None => {
                    totals.count += 1;
                    totals.bytes += new;
                }
            }
            metrics::hint_written(kind);
            metrics::hints_pending(owner.as_str(), totals.count, totals.bytes);
            self.hints.generation += 1;
        }
    }

    /// Queues coordinator hints for `owners`, written at the end of the current input (the
    /// data is already stored; see the module docs).
    pub(super) fn queue_hints(&mut self, keyspace: &str, key: &[u8], owners: Vec<NodeId>) {
        for owner in owners {
            self.hints
                .queued
                .push((owner, keyspace.to_string(), key.to_vec()));
        }
    }

    /// Owners of a write's slots that did not apply it and hold no hint yet.
    pub(super) fn owners_missing(tally: &Tally, owners: &[NodeId], me: &NodeId) -> Vec<NodeId> {
        owners
            .iter()
            .filter(|owner| *owner != me && !tally.applied(owner))
            .cloned()
            .collect()
    }

    /// A fallback stores a hint for `owner`: the state joined with any hint it holds for that
    /// key. Returns the write's sequence number.
    pub(super) fn store_fallback_hint(
        &mut self,
        now: Now,
        storage: &dyn Storage,
        owner: &NodeId,
        (keyspace, key): (&str, &[u8]),
        incoming: &KeyState,
    ) -> Result<crate::storage::WriteSeq, HintRefused> {
        let hkey = hint_key(owner, keyspace, key);
        let old = storage
            .aux(AuxTable::Hints, &hkey)
            .map_err(HintRefused::Storage)?;
        let old_len = old.as_ref().map(Vec::len);
        let mut state = incoming.clone();
        if let Some(old) = &old {
            let old = HintRecord::decode(old).map_err(HintRefused::Storage)?;
            if let Some(bytes) = old.state {
                let held = KeyState::decode(&bytes).map_err(HintRefused::Storage)?;
                state.join_in_place(&held);
            }
        }
        let record = HintRecord {
            updated_ms: now.wall_ms,
            counted: true,
            state: Some(state.encode_canonical()),
        }
        .encode();
        let grows = (record.len() as u64).saturating_sub(old_len.unwrap_or(0) as u64);
        if !self.hint_fits(owner, grows, true, key) {
            metrics::hint_refused();
            return Err(HintRefused::Bound);
        }
        let write = AuxWrite {
            table: AuxTable::Hints,
            key: hkey,
            value: Some(record),
        };
        let seq = storage
            .write_aux(std::slice::from_ref(&write))
            .map_err(HintRefused::Storage)?;
        self.note_hints_written(&[(owner.clone(), write)], &[old_len], "fallback");
        Ok(seq)
    }

    /// A `Replicate` that names an owner: this node is a fallback for it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_hinted_replicate(
        &mut self,
        now: Now,
        from: NodeId,
        op: OpId,
        owner: &NodeId,
        (keyspace, key): (&str, &[u8]),
        incoming: &KeyState,
        durable: bool,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let refusal = if !self.map.addresses.contains_key(owner) || *owner == self.me {
            Some(format!("hint for {owner}, which is not another member"))
        } else {
            match self.store_fallback_hint(now, storage, owner, (keyspace, key), incoming) {
                Ok(seq) => {
                    if !durable {
                        out.push(Output::Send {
                            to: from,
                            message: PeerMessage::Applied { op },
                        });
                    } else if seq <= storage.durable_seq() {
                        out.push(Output::Send {
                            to: from,
                            message: PeerMessage::Durable { op },
                        });
                    } else {
                        self.durable_waiters
                            .entry(seq)
                            .or_default()
                            .push(DurableWaiter::Peer { node: from, op });
                        self.request_flush(out);
                    }
                    return;
                }
                Err(HintRefused::Bound) => Some(format!(
                    "fallback {} holds hints.bytes_per_target_max of hints for {owner}",
                    self.me
                )),
                Err(HintRefused::Storage(e)) => {
                    Some(self.storage_error("storing a hint", e).message)
                }
            }
        };
        if let Some(reason) = refusal {
            tracing::warn!(peer = %from, %reason, "refused a hinted write");
            out.push(Output::Send {
                to: from,
                message: PeerMessage::Failed { op, reason },
            });
        }
    }

    /// Work of this input that needs storage: queued coordinator hints and deletions of
    /// delivered hints. Called by [`NodeCore::handle`] after every input.
    pub(super) fn apply_hint_work(&mut self, now: Now, storage: &dyn Storage) {
        if self.hints.queued.is_empty() && self.hints.delivered.is_empty() {
            return;
        }
        for (owner, keyspace, key) in std::mem::take(&mut self.hints.queued) {
            let hkey = hint_key(&owner, &keyspace, &key);
            let old = match storage.aux(AuxTable::Hints, &hkey) {
                Ok(old) => old,
                Err(e) => {
                    self.note_storage_failure(&e);
                    tracing::warn!(error = %e, "reading a hint failed; the write is left to anti-entropy");
                    continue;
                }
            };
            let writes = self.coordinator_hints(now, &keyspace, &key, std::slice::from_ref(&owner));
            let aux: Vec<AuxWrite> = writes.iter().map(|(_, w)| w.clone()).collect();
            if aux.is_empty() {
                continue;
            }
            match storage.write_aux(&aux) {
                Ok(_) => self.note_hints_written(&writes, &[old.map(|o| o.len())], "coordinator"),
                Err(e) => {
                    self.note_storage_failure(&e);
                    tracing::warn!(error = %e, "writing a hint failed; the write is left to anti-entropy");
                }
            }
        }
        for (hkey, delivered) in std::mem::take(&mut self.hints.delivered) {
            let current = match storage.aux(AuxTable::Hints, &hkey) {
                Ok(current) => current,
                Err(e) => {
                    self.note_storage_failure(&e);
                    continue;
                }
            };
            if current.as_deref() != Some(delivered.as_slice()) {
                // A newer write joined into the hint meanwhile: it goes out next round.
                continue;
            }
            let delete = AuxWrite {
                table: AuxTable::Hints,
                key: hkey.clone(),
                value: None,
            };
            match storage.write_aux(&[delete]) {
                Ok(_) => {
                    metrics::hint_delivered();
                    self.forget_hint(&hkey, delivered.len());
                }
                Err(e) => {
                    self.note_storage_failure(&e);
                }
            }
        }
    }

    fn forget_hint(&mut self, hkey: &[u8], len: usize) {
        let Some((owner, _, _)) = split_hint_key(hkey) else {
            return;
        };
        let totals = self.hints.totals.entry(owner.clone()).or_default();
        totals.count = totals.count.saturating_sub(1);
        totals.bytes = totals.bytes.saturating_sub(len as u64);
        metrics::hints_pending(owner.as_str(), totals.count, totals.bytes);
        self.hints.generation += 1;
    }

    /// Loads the per-owner totals from the hints table, once, before the first input is
    /// handled (a failure is retried at the next input; until then no hint is delivered).
    pub(super) fn load_hints_once(&mut self, storage: &dyn Storage) {
        if self.hints.loaded || !self.in_service() {
            return;
        }
        self.hints.totals.clear();
        if let Err(e) = self.load_hint_totals(storage) {
            self.note_storage_failure(&e);
            tracing::warn!(error = %e, "loading hints failed");
        }
    }

    /// Loads the per-owner totals from the hints table.
    fn load_hint_totals(&mut self, storage: &dyn Storage) -> crate::Result<()> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = storage.aux_scan(AuxTable::Hints, b"", after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (hkey, value) in &page {
                if let Some((owner, _, _)) = split_hint_key(hkey) {
                    let totals = self.hints.totals.entry(owner).or_default();
                    totals.count += 1;
                    totals.bytes += value.len() as u64;
                }
            }
        }
        for (owner, totals) in &self.hints.totals {
            metrics::hints_pending(owner.as_str(), totals.count, totals.bytes);
        }
        self.hints.loaded = true;
        self.hints.generation += 1;
        Ok(())
    }

    /// Changes whenever the hints held change (see `server::core_task`'s `/sync-status`).
    pub fn hints_generation(&self) -> u64 {
        self.hints.generation
    }

    /// Hint deliveries in flight.
    pub(super) fn hints_in_flight(&self) -> usize {
        self.hints.delivering.len()
    }

    /// Hints pending per owner, as this node holds them.
    pub fn hints_pending(&self) -> impl Iterator<Item = (&NodeId, HintTotals)> {
        self.hints
            .totals
            .iter()
            .filter(|(_, totals)| totals.count > 0)
            .map(|(owner, totals)| (owner, *totals))
    }

    /// On a tick: sends a batch of hints to every owner believed up, and expires old ones.
    pub(super) fn deliver_hints(&mut self, now: Now, storage: &dyn Storage, out: &mut Vec<Output>) {
        if !self.in_service() {
            return;
        }
        if !self.hints.loaded {
            return;
        }
        let owners: Vec<NodeId> = self
            .hints
            .totals
            .iter()
            .filter(|(owner, totals)| totals.count > 0 && self.detector.is_up(owner))
            .map(|(owner, _)| owner.clone())
            .collect();
        for owner in owners {
            if let Err(e) = self.deliver_to(now, &owner, storage, out) {
                self.note_storage_failure(&e);
                tracing::warn!(%owner, error = %e, "hint delivery failed");
            }
        }
    }

    fn deliver_to(
        &mut self,
        now: Now,
        owner: &NodeId,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) -> crate::Result<()> {
        let prefix = hint_prefix(owner);
        let in_flight = self
            .hints
            .delivering
            .iter()
            .filter(|hkey| hkey.starts_with(&prefix))
            .count();
        let room = self.config.hint_delivery_batch.saturating_sub(in_flight);
        if room == 0 {
            return Ok(());
        }
        let mut after: Option<Vec<u8>> = None;
        let mut sent = 0;
        while sent < room {
            let page = storage.aux_scan(AuxTable::Hints, &prefix, after.as_deref(), room)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (hkey, bytes) in page {
                if sent >= room {
                    break;
                }
                if self.hints.delivering.contains(&hkey) {
                    continue;
                }
                if self.deliver_one(now, owner, hkey, bytes, storage, out)? {
                    sent += 1;
                }
            }
        }
        Ok(())
    }

    /// Sends one hint; returns whether it went out (an expired or empty one is deleted).
    fn deliver_one(
        &mut self,
        now: Now,
        owner: &NodeId,
        hkey: Vec<u8>,
        bytes: Vec<u8>,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) -> crate::Result<bool> {
        let decoded = HintRecord::decode(&bytes);
        let parsed = split_hint_key(&hkey);
        let (record, (_, keyspace, key)) = match (decoded, parsed) {
            (Ok(record), Some(parsed)) => (record, parsed),
            _ => {
                tracing::error!(key = %crate::storage::key_for_display(&hkey), "corrupt hint record; deleting it");
                return self
                    .drop_hint(hkey, bytes.len(), "corrupt", storage)
                    .map(|_| false);
            }
        };
        let age_ms = now.wall_ms.saturating_sub(record.updated_ms);
        if !record.counted && age_ms > self.config.hint_max_age_ms {
            tracing::warn!(%owner, %keyspace, age_ms, "hint expired undelivered (hints.max_age_ms); left to anti-entropy");
            return self
                .drop_hint(hkey, bytes.len(), "age", storage)
                .map(|_| false);
        }
        let state = match &record.state {
            Some(state) => state.clone(),
            None => match storage.read(&keyspace, &key)? {
                Some(state) => state.encode_canonical(),
                None => {
                    return self
                        .drop_hint(hkey, bytes.len(), "empty", storage)
                        .map(|_| false)
                }
            },
        };
        let op = self.new_op();
        out.push(Output::Send {
            to: owner.clone(),
            message: PeerMessage::Replicate {
                op,
                keyspace,
                key,
                state,
                durable: true,
                hint_for: None,
            },
        });
        self.hints.delivering.insert(hkey.clone());
        self.insert_op(
            op,
            Op::Handoff(HandoffOp {
                owner: owner.clone(),
                hint_key: hkey,
                record: bytes,
                deadline_ms: now.monotonic_ms + self.config.request_timeout_ms,
            }),
        );
        Ok(true)
    }

    fn drop_hint(
        &mut self,
        hkey: Vec<u8>,
        len: usize,
        reason: &'static str,
        storage: &dyn Storage,
    ) -> crate::Result<()> {
        storage.write_aux(&[AuxWrite {
            table: AuxTable::Hints,
            key: hkey.clone(),
            value: None,
        }])?;
        if reason != "empty" {
            metrics::hint_dropped(reason);
        }
        self.forget_hint(&hkey, len);
        Ok(())
    }

    /// The owner answered a hint delivery (or it failed, or timed out).
    pub(super) fn on_handoff_answer(&mut self, op: OpId, from: &NodeId, done: bool) {
        let Some(Op::Handoff(handoff)) = self.ops.get(&op) else {
            return;
        };
        if handoff.owner != *from {
            return;
        }
        if let Some(Op::Handoff(handoff)) = self.remove_op(op) {
            self.hints.delivering.remove(&handoff.hint_key);
            if done {
                self.hints
                    .delivered
                    .push((handoff.hint_key, handoff.record));
            }
        }
    }

    /// A delivery past its deadline: the hint stays for the next round.
    pub(super) fn expire_handoff(&mut self, op: OpId) {
        if let Some(Op::Handoff(handoff)) = self.remove_op(op) {
            self.hints.delivering.remove(&handoff.hint_key);
        }
    }
}
