//! Tombstone collection: the state of a deleted key is removed for good, from every replica,
//! once no copy of anything it replaced can still arrive anywhere.
//!
//! # Why a delete cannot simply be forgotten
//!
//! A delete is a tombstone sibling whose context covers what its writer saw
//! ([`crate::version_vector`]). The context is what keeps the deleted value deleted: a copy of
//! the old value that arrives later (a delayed replica write, a hint, a read repair, an
//! anti-entropy push from a replica that missed the delete) joins a state whose context has
//! seen its dot, and the join drops it. Remove the state and that copy meets an absent key,
//! which every join takes as news: the deleted value is back. So a key's state may go only
//! when no such copy exists anywhere and none is on its way.
//!
//! # The rule
//!
//! The first owner in a key's preference list (its *primary*) drives the collection of the
//! key; the other owners and the rest of the cluster answer. A deleted key (every sibling a
//! tombstone) is collected when:
//!
//! 1. **It is old enough.** Its newest tombstone is at least `grace_ms` old (wall clock).
//!    Safety does not rest on this; it keeps freshly deleted keys out of the checks, and gives
//!    operators the window Cassandra calls `gc_grace_seconds` and Riak `delete_mode`.
//! 2. **Every member clears it, twice, a quiet period apart.** The primary sends
//!    [`PeerMessage::GcCheck`] naming the key and its state hash to every other member of the
//!    cluster map, and checks itself. A member clears the key when (a) if it is an owner, it
//!    stores exactly that state; (b) it holds no hint for the key, for any owner; (c) it has no
//!    read, write or hint delivery of the key in progress; and it answers only once everything
//!    it stores is durable, so a crash cannot take the tombstone back. A member that does not
//!    answer (down, cut off, out of service) blocks the collection; so does any refusal. The
//!    primary collects only after a second check, at least `quiet_ms` after the first, clears
//!    the same state again.
//! 3. **Then every owner removes it**, if its stored state still has that hash
//!    ([`PeerMessage::GcCollect`]; a state that changed meanwhile stays, and the key is
//!    considered again later). Before the first removal that takes one of its own dots, a node
//!    retires its actor (rule 4 of [`crate::version_vector`]), so it never issues those dots
//!    again.
//!
//! # Why nothing deleted comes back
//!
//! Let `v` be a value the delete replaced: its dot is in the tombstone state `h`'s context.
//! A copy of `v` without `h` could reach an owner after its removal only from a stored copy
//! or from a message. Stored copies: states are only ever joined, so an owner that held `h`
//! at both checks held it throughout (the hash of a growing state cannot return to `h`), and
//! it held it durably; every hint for the key was gone at both checks. Operations: at the
//! first check no member had an operation on the key in progress, so every read or write that
//! could carry `v` later started after it, and an operation that starts after the first check
//! reads owners that all hold `h` (its repairs carry `h`), or is a new write with a new dot
//! (new data, not a deleted value). Messages: what is left is a message sent before the first
//! check and still on its way (a replica write, an anti-entropy push or its answer). A peer
//! message lives at most `L`: QUIC retransmits it until the connection's idle timeout
//! ([`crate::tls::IDLE_TIMEOUT`], 30 s), then drops it with the connection, and a send that
//! finds no connection fails at once. With `quiet_ms ≥ 2L` (a push, then its answer), every
//! such message has arrived, and been absorbed by `h`, before the second check. Replicas that
//! are absent, for however long, block collection until they return and clear the key, and
//! then they hold `h` themselves: the rule for long-absent replicas is that they are waited
//! for. A wiped replica returns empty under a new actor (rule 3) and anti-entropy gives it
//! `h` before it can clear. What this cannot protect against is an operator restoring an old
//! backup of a data directory: as for the incarnation record, a restored directory must be
//! treated as wiped.
//!
//! A new write to a collected key is new data: under a retired actor's successor, its dot is
//! new to every replica and every client context, so it is neither mistaken for an old write
//! nor swallowed by an old context.
//!
//! # Bounds and costs
//!
//! * One check in flight per node, of at most `batch` keys (and [`KEYS_PER_CHECK_MAX`]),
//!   every `interval_ms`, only when every peer is believed up. A check that is not answered
//!   within the request timeout is dropped and retried at the next pass.
//! * Once writes and faults stop, a deleted key is gone everywhere within about
//!   `grace_ms + quiet_ms + 2 · interval_ms` plus one request timeout, provided anti-entropy
//!   has made its replicas equal by then (`interval_ms` of `[anti_entropy]` per range).
//! * The deleted keys this node stores are tracked in memory (key, hash, age): rebuilt at start
//!   by the Merkle tree build's scan, kept by the write path. Memory grows with the tombstones
//!   waiting, which is what this module keeps small.
//! * A retired actor costs a version-vector entry in every key the node writes afterwards;
//!   a node retires at most once per pass, and only when a removed state holds a dot of its
//!   current actor.

use super::{DurableWaiter, NodeCore, Now, Output, Storage};
use crate::metrics;
use crate::peer::{GcKey, OpId, PeerMessage};
use crate::storage::WriteSeq;
use crate::version_vector::{on_local_deletion, KeyState};
use quorumkv_ring::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// Most keys one check names (a key is at most a few KiB, so a check fits a frame).
pub const KEYS_PER_CHECK_MAX: usize = 1024;

/// The tombstone collection knobs; see `[tombstones]` in the node configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TombstoneConfig {
    /// Whether this node collects tombstones of the keys it is primary for. It answers other
    /// nodes' checks either way (answering never removes anything by itself).
    pub enabled: bool,
    /// How old a key's newest tombstone must be before the key is considered.
    pub grace_ms: u64,
    /// The least time between the two checks that must both clear a key; at least twice the
    /// longest a peer message can take to arrive (see the module docs).
    pub quiet_ms: u64,
    /// How often a collection pass starts.
    pub interval_ms: u64,
    /// Most keys in one pass.
    pub batch: usize,
}

impl Default for TombstoneConfig {
    fn default() -> TombstoneConfig {
        TombstoneConfig {
            enabled: true,
            grace_ms: 10 * 60 * 1000,
            quiet_ms: 2 * 60 * 1000,
            interval_ms: 60 * 1000,
            batch: 256,
        }
    }
}

/// A deleted key this node stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tombstone {
    hash: [u8; 32],
    /// Wall-clock ms of the newest tombstone.
    deleted_ms: u64,
}

/// A check this node started and is waiting on.
#[derive(Debug)]
struct Check {
    op: OpId,
    keys: Vec<GcKey>,
    /// Members that have not answered yet.
    waiting: BTreeSet<NodeId>,
    /// Per key: every answer so far cleared it (this node's own check included).
    cleared: Vec<bool>,
    /// Everything this node stored when the check started; its own states must be durable
    /// through it before it counts itself as clearing them.
    own_seq: WriteSeq,
    deadline_ms: u64,
}

/// The tombstone bookkeeping of one node.
#[derive(Debug, Default)]
pub(super) struct Tombstones {
    /// Deleted keys stored here, by (keyspace, key).
    stored: BTreeMap<(String, Vec<u8>), Tombstone>,
    /// Keys every member cleared once: (hash cleared, monotonic ms of that check).
    cleared_once: BTreeMap<(String, Vec<u8>), ([u8; 32], u64)>,
    check: Option<Check>,
    next_pass_ms: u64,
    /// Actors retired so far by this process, to derive fresh ones.
    retirements: u64,
    /// Deleted keys removed by this process.
    collected: u64,
}

impl Tombstones {
    pub(super) fn new(config: &TombstoneConfig, now_ms: u64) -> Tombstones {
        Tombstones {
            next_pass_ms: now_ms + config.interval_ms,
            ..Tombstones::default()
        }
    }
}

/// The newest tombstone's wall-clock time, if every sibling of `state` is a tombstone.
fn deleted_at(state: &KeyState) -> Option<u64> {
    state
        .is_deleted()
        .then(|| state.siblings().iter().map(|s| s.timestamp_ms).max())
        .flatten()
}

fn hash_of(key: &GcKey) -> Option<[u8; 32]> {
    key.hash.as_slice().try_into().ok()
}

impl NodeCore {
    /// Deleted keys this node stores now.
    pub fn tombstones_stored(&self) -> usize {
        self.tombstones.stored.len()
    }

    /// Deleted keys this process removed for good.
    pub fn tombstones_collected(&self) -> u64 {
        self.tombstones.collected
    }

    /// The write path stored `state` for `key` (hash `hash`): track it if it is deleted.
    pub(super) fn tombstones_on_stored(
        &mut self,
        keyspace: &str,
        key: &[u8],
        state: &KeyState,
        hash: &[u8; 32],
    ) {
        self.note_tombstone(keyspace, key, state, *hash);
        metrics::tombstones(self.tombstones.stored.len());
    }

    /// Tracks `key` if `state` is deleted, forgets it otherwise. Also called by the Merkle tree
    /// build for every key it scans, so the set is complete after a restart.
    pub(super) fn note_tombstone(
        &mut self,
        keyspace: &str,
        key: &[u8],
        state: &KeyState,
        hash: [u8; 32],
    ) {
        let id = (keyspace.to_owned(), key.to_vec());
        match deleted_at(state) {
            Some(deleted_ms) => {
                self.tombstones
                    .stored
                    .insert(id, Tombstone { hash, deleted_ms });
            }
            None => {
                self.tombstones.stored.remove(&id);
                self.tombstones.cleared_once.remove(&id);
            }
        }
    }

    /// When the collection needs the next tick.
    pub(super) fn tombstones_next_deadline_ms(&self) -> Option<u64> {
        let t = &self.tombstones;
        if let Some(check) = &t.check {
            return Some(check.deadline_ms);
        }
        (self.config.tombstones.enabled && !t.stored.is_empty()).then_some(t.next_pass_ms)
    }

    /// On every tick: time out a check, or start a pass when one is due.
    pub(super) fn tombstones_tick(
        &mut self,
        now: Now,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        metrics::tombstones(self.tombstones.stored.len());
        if let Some(check) = &self.tombstones.check {
            if now.monotonic_ms >= check.deadline_ms {
                tracing::debug!(waiting = check.waiting.len(), "tombstone check timed out");
                metrics::tombstone_check("timeout");
                self.tombstones.check = None;
            }
            return;
        }
        if !self.config.tombstones.enabled
            || now.monotonic_ms < self.tombstones.next_pass_ms
            || !self.in_service()
        {
            return;
        }
        self.tombstones.next_pass_ms = now.monotonic_ms + self.config.tombstones.interval_ms;
        let peers: Vec<NodeId> = self
            .map
            .addresses
            .keys()
            .filter(|node| **node != self.me)
            .cloned()
            .collect();
        // A member believed down would not answer: no point in asking anyone.
        if peers.iter().any(|peer| !self.detector.is_up(peer)) {
            return;
        }
        let keys = self.tombstones_due(now, storage);
        if keys.is_empty() {
            return;
        }
        let own_seq = storage.latest_seq();
        if own_seq > storage.durable_seq() {
            self.request_flush(out);
        }
        let op = self.new_op();
        for peer in &peers {
            out.push(Output::Send {
                to: peer.clone(),
                message: PeerMessage::GcCheck {
                    op,
                    keys: keys.clone(),
                },
            });
        }
        let cleared = vec![true; keys.len()];
        self.tombstones.check = Some(Check {
            op,
            keys,
            waiting: peers.into_iter().collect(),
            cleared,
            own_seq,
            deadline_ms: now.monotonic_ms + self.config.request_timeout_ms,
        });
        if self
            .tombstones
            .check
            .as_ref()
            .is_some_and(|c| c.waiting.is_empty())
        {
            // A cluster of one: nobody else to ask.
            self.tombstones_decide(now, storage, out);
        }
    }

    /// The deleted keys this node is primary for, old enough, and clear here: the next check.
    fn tombstones_due(&self, now: Now, storage: &dyn Storage) -> Vec<GcKey> {
        let config = &self.config.tombstones;
        let limit = config.batch.clamp(1, KEYS_PER_CHECK_MAX);
        let busy = self.keys_in_progress();
        let mut due = Vec::new();
        for ((keyspace, key), tombstone) in &self.tombstones.stored {
            if due.len() == limit {
                break;
            }
            if tombstone.deleted_ms.saturating_add(config.grace_ms) > now.wall_ms
                || busy.contains(&(keyspace.as_str(), key.as_slice()))
                || self.primary_of(keyspace, key).as_ref() != Some(&self.me)
            {
                continue;
            }
            due.push(GcKey {
                keyspace: keyspace.clone(),
                key: key.clone(),
                hash: tombstone.hash.to_vec(),
            });
        }
        due.retain(|key| self.clears(key, storage, &BTreeSet::new()).unwrap_or(false));
        due
    }

    /// The first owner of `key`'s preference list.
    fn primary_of(&self, keyspace: &str, key: &[u8]) -> Option<NodeId> {
        let n = *self.map.keyspaces.get(keyspace)?;
        let list = self
            .map
            .ring
            .preference_list_for(keyspace, key, usize::from(n))
            .ok()?;
        list.ids().next().cloned()
    }

    /// The keys that reads, writes or hint deliveries in progress here are about.
    fn keys_in_progress(&self) -> BTreeSet<(&str, &[u8])> {
        self.ops
            .values()
            .filter_map(|op| match op {
                super::Op::Write(w) => Some((w.keyspace.as_str(), w.key.as_slice())),
                super::Op::Read(r) => Some((r.keyspace.as_str(), r.key.as_slice())),
                _ => None,
            })
            .collect()
    }

    /// Whether this node clears `key` (rule 2 of the module docs, durability aside).
    fn clears(
        &self,
        key: &GcKey,
        storage: &dyn Storage,
        busy: &BTreeSet<(&str, &[u8])>,
    ) -> crate::Result<bool> {
        let Some(hash) = hash_of(key) else {
            return Ok(false);
        };
        let Some(n) = self.map.keyspaces.get(&key.keyspace) else {
            return Ok(false);
        };
        if busy.contains(&(key.keyspace.as_str(), key.key.as_slice())) {
            return Ok(false);
        }
        let Ok(list) = self
            .map
            .ring
            .preference_list_for(&key.keyspace, &key.key, usize::from(*n))
        else {
            return Ok(false);
        };
        let owners: Vec<NodeId> = list.ids().cloned().collect();
        if owners.contains(&self.me) {
            let held = storage.read(&key.keyspace, &key.key)?;
            if held.map(|state| state.state_hash()) != Some(hash) {
                return Ok(false);
            }
        }
        for owner in &owners {
            let hint = super::hints::hint_key(owner, &key.keyspace, &key.key);
            if storage
                .aux(crate::storage::AuxTable::Hints, &hint)?
                .is_some()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A [`PeerMessage::GcCheck`]: answer once everything stored here is durable.
    pub(super) fn on_gc_check(
        &mut self,
        from: NodeId,
        op: OpId,
        keys: &[GcKey],
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        if keys.len() > KEYS_PER_CHECK_MAX {
            return out.push(Output::Send {
                to: from,
                message: PeerMessage::Failed {
                    op,
                    reason: format!("a tombstone check of {} keys is too large", keys.len()),
                },
            });
        }
        let busy = self.keys_in_progress();
        let answer: crate::Result<Vec<bool>> = keys
            .iter()
            .map(|key| self.clears(key, storage, &busy))
            .collect();
        let ok = match answer {
            Ok(ok) => ok,
            Err(e) => {
                let reason = self.storage_error("a tombstone check", e).message;
                return out.push(Output::Send {
                    to: from,
                    message: PeerMessage::Failed { op, reason },
                });
            }
        };
        let reply = PeerMessage::GcCheckReply { op, ok };
        let seq = storage.latest_seq();
        if seq <= storage.durable_seq() {
            out.push(Output::Send {
                to: from,
                message: reply,
            });
        } else {
            self.durable_waiters
                .entry(seq)
                .or_default()
                .push(DurableWaiter::Send {
                    node: from,
                    op,
                    message: reply,
                });
            self.request_flush(out);
        }
    }

    /// Whether `op` is this node's tombstone check.
    pub(super) fn gc_owns(&self, op: OpId) -> bool {
        self.tombstones.check.as_ref().is_some_and(|c| c.op == op)
    }

    /// A member answered (`Some`) or refused or could not be reached (`None`).
    pub(super) fn on_gc_check_reply(
        &mut self,
        now: Now,
        from: &NodeId,
        op: OpId,
        ok: Option<Vec<bool>>,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let Some(check) = self.tombstones.check.as_mut().filter(|c| c.op == op) else {
            return;
        };
        if !check.waiting.remove(from) {
            return;
        }
        match ok {
            Some(ok) if ok.len() == check.keys.len() => {
                for (cleared, ok) in check.cleared.iter_mut().zip(ok) {
                    *cleared &= ok;
                }
            }
            _ => {
                tracing::debug!(peer = %from, "a member refused a tombstone check");
                metrics::tombstone_check("failed");
                self.tombstones.check = None;
                return;
            }
        }
        if check.waiting.is_empty() {
            self.tombstones_decide(now, storage, out);
        }
    }

    /// Every member answered: clear keys once, or collect those cleared twice.
    fn tombstones_decide(&mut self, now: Now, storage: &dyn Storage, out: &mut Vec<Output>) {
        let Some(check) = self.tombstones.check.take() else {
            return;
        };
        let durable = storage.durable_seq() >= check.own_seq;
        let quiet_ms = self.config.tombstones.quiet_ms;
        let mut collect: Vec<GcKey> = Vec::new();
        let mut any_cleared = false;
        for (key, cleared) in check.keys.into_iter().zip(check.cleared) {
            let id = (key.keyspace.clone(), key.key.clone());
            let here = durable
                && self
                    .clears(&key, storage, &self.keys_in_progress())
                    .unwrap_or(false);
            let Some(hash) = hash_of(&key).filter(|_| cleared && here) else {
                self.tombstones.cleared_once.remove(&id);
                continue;
            };
            any_cleared = true;
            match self.tombstones.cleared_once.get(&id) {
                Some((first, at)) if *first == hash => {
                    if now.monotonic_ms.saturating_sub(*at) >= quiet_ms {
                        collect.push(key);
                    }
                }
                _ => {
                    self.tombstones
                        .cleared_once
                        .insert(id, (hash, now.monotonic_ms));
                }
            }
        }
        metrics::tombstone_check(if any_cleared { "cleared" } else { "blocked" });
        if collect.is_empty() {
            return;
        }
        // Each other owner gets the keys it replicates; this node removes its own copies.
        let mut by_owner: BTreeMap<NodeId, Vec<GcKey>> = BTreeMap::new();
        for key in &collect {
            let n = self.map.keyspaces.get(&key.keyspace).copied().unwrap_or(0);
            if let Ok(list) =
                self.map
                    .ring
                    .preference_list_for(&key.keyspace, &key.key, usize::from(n))
            {
                for owner in list.ids().filter(|owner| **owner != self.me) {
                    by_owner.entry(owner.clone()).or_default().push(key.clone());
                }
            }
        }
        for (owner, keys) in by_owner {
            out.push(Output::Send {
                to: owner,
                message: PeerMessage::GcCollect { keys },
            });
        }
        self.collect_here(now, &collect, storage);
    }

    /// A [`PeerMessage::GcCollect`] from a key's primary.
    pub(super) fn on_gc_collect(&mut self, now: Now, keys: &[GcKey], storage: &dyn Storage) {
        if !self.in_service() || keys.len() > KEYS_PER_CHECK_MAX {
            return;
        }
        self.collect_here(now, keys, storage);
    }

    /// Removes the keys this node replicates whose stored state still has the hash named,
    /// retiring the actor first if any of them holds one of its dots.
    fn collect_here(&mut self, now: Now, keys: &[GcKey], storage: &dyn Storage) {
        let busy = self.keys_in_progress();
        let mut removable: Vec<(&GcKey, [u8; 32])> = Vec::new();
        let mut retire = false;
        for key in keys {
            let Some(hash) = hash_of(key) else { continue };
            if busy.contains(&(key.keyspace.as_str(), key.key.as_slice())) {
                continue;
            }
            match storage.read(&key.keyspace, &key.key) {
                Ok(Some(state)) if state.state_hash() == hash => {
                    retire |= state.context().max_counter(self.clock.actor()) > 0;
                    removable.push((key, hash));
                }
                Ok(_) => {}
                Err(e) => {
                    self.storage_error("reading a tombstone to collect", e);
                    return;
                }
            }
        }
        if removable.is_empty() {
            return;
        }
        if retire {
            self.tombstones.retirements += 1;
            let fresh = super::anti_entropy::splitmix64(
                self.instance ^ self.tombstones.retirements.rotate_left(32),
            );
            let (clock, record) = on_local_deletion(&self.clock, fresh);
            // Durable before any removal takes effect, and before the next write it coordinates.
            if let Err(e) = storage.set_incarnation(&record) {
                self.storage_error("retiring the actor before collecting tombstones", e);
                return;
            }
            tracing::info!(old = ?self.clock.actor(), new = ?clock.actor(), "actor retired before removing deleted keys");
            self.clock = clock;
        }
        let mut removed = 0u64;
        for (key, hash) in removable {
            match storage.remove_if(&key.keyspace, &key.key, &hash) {
                Ok(Some(_)) => {
                    removed += 1;
                    self.ae_on_stored(&key.keyspace, &key.key, Some(&hash), None);
                    let id = (key.keyspace.clone(), key.key.clone());
                    self.tombstones.stored.remove(&id);
                    self.tombstones.cleared_once.remove(&id);
                }
                Ok(None) => {}
                Err(e) => {
                    self.storage_error("removing a deleted key", e);
                    break;
                }
            }
        }
        self.tombstones.collected += removed;
        metrics::tombstones_collected(removed);
        metrics::tombstones(self.tombstones.stored.len());
        tracing::debug!(removed, at_ms = now.wall_ms, "deleted keys collected");
    }
}
