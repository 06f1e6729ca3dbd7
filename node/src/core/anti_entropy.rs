//! Anti-entropy: replicas of a range compare Merkle trees in the background and exchange the
//! keys on which they differ, so a write that missed a replica reaches it eventually even if
//! nobody ever reads the key again.
//!
//! # Where it comes from
//!
//! Dynamo (DeCandia et al., SOSP 2007, §4.7) keeps a Merkle tree per key range on every replica
//! and lets two replicas of a range compare trees from the root down, transferring only the
//! leaves that differ. Riak's active anti-entropy (`riak_kv_index_hashtree`, `riak_kv_entropy_manager`)
//! turned that into a background process: hash trees kept current on every write and rebuilt
//! from the data when missing, exchanges between the replicas of one partition at a time, on a
//! tick, with a limit on concurrent exchanges. Cassandra's repair (`nodetool repair`, Merkle
//! trees per token range built by a validation compaction, streaming of the differing ranges)
//! is the same idea run by an operator. QuorumKV does what Riak does, with the pure trees of
//! [`crate::merkle`]:
//!
//! * **Trees.** One [`MerkleForest`] per node, one tree per (keyspace, range) holding keys. The
//!   Merkle ranges are the ring's ranges (`range_bits = log2(Q)`), so a range's replicas are
//!   exactly the ring's preference list and one tree is one exchange. The bucket depth is
//!   chosen from Q so that the whole ring has about 2^18 buckets ([`geometry_for`]): a few keys
//!   per bucket at a million keys, so a repair of one bucket moves a few keys.
//! * **Kept current.** [`NodeCore::store`](super::NodeCore) is the one write path; every merge
//!   that changed a key's state passes its old and new state hashes to the tree.
//! * **Built from the data** at start, and again whenever a tree is found wrong (an update the
//!   tree refuses): on ticks, a bounded number of keys' worth of whole ranges per tick, each
//!   range scanned and installed in one synchronous step of the core, so no write can slip
//!   between the scan and the tree. A range is not exchanged, by either side, until its tree
//!   is built. Requests are served meanwhile.
//! * **Exchange.** Every `interval_ms` (±25%, a deterministic jitter drawn from the process
//!   instance: the core reads no randomness), a node starts exchanges up to
//!   `exchanges_max` at once, for the ranges it replicates that it exchanged least recently,
//!   each with another replica of the range that its failure detector believes up (the
//!   replicas take turns). It asks for the peer's root ([`PeerMessage::AeLevel`], level 0) and
//!   compares it with its own: equal roots end the exchange, so **replicas that agree cost one
//!   root comparison, two small messages, per range**. Otherwise it descends level by level,
//!   asking only for the children of the nodes that differed (at most
//!   [`PARENTS_PER_REQUEST_MAX`] parents per request), down to the buckets.
//! * **Repair, both ways.** For the differing buckets the initiator pushes its state of every
//!   key in them ([`PeerMessage::AePush`], a batch of token intervals within the frame budget);
//!   the peer merges each through its own write path and answers with its states of the keys
//!   in those intervals that the push lacked or held older ([`PeerMessage::AePushReply`],
//!   also within the frame budget, with a resume token when cut short), which the initiator
//!   merges. Both sides end up with the join of both, by the same merge that every write uses,
//!   so a repair can never lose a sibling, and repeating one is harmless.
//!
//! # Bounds
//!
//! * At most `exchanges_max` exchanges started by this node at a time, one message in flight
//!   each. A responder keeps no state per exchange: every request is answered from its tree
//!   and storage at once.
//! * Every message fits one frame: a level request names at most [`PARENTS_PER_REQUEST_MAX`]
//!   parents (16 children each in the answer), a push or its answer carries at most
//!   [`KEYS_PER_MESSAGE_MAX`] keys and `key_state_bytes_max` bytes of states (one key alone
//!   always fits, since a write may not leave a larger state), a push at most
//!   [`INTERVALS_PER_PUSH_MAX`] intervals.
//! * Throttle: keys pushed and received by this node's exchanges are paid for from a budget of
//!   `keys_per_second_max` a second (a token bucket holding one second's worth); an exchange
//!   whose next push finds the budget empty waits. Tree builds scan at most
//!   `build_keys_per_tick_max` keys' worth of whole ranges per tick, a tick every 10 ms.
//! * An exchange that has waited `exchange_timeout_ms` for its peer is dropped (outcome
//!   `timeout`); a refusal, an invalid answer or an undeliverable request ends it as `failed`.
//!   Neither harms anything: the range is simply exchanged again later.
//!
//! # What it guarantees
//!
//! Once the network between two replicas of a range heals and both are up and in service,
//! every key state one of them holds for that range reaches the other within about
//! `ranges / (exchanges_max · 1000 / interval_ms)` seconds per replica (each node cycles
//! through the ranges it replicates, least recently exchanged first), plus the transfer time
//! the throttle allows. Once writes stop, all replicas of every range end with equal trees and
//! equal roots, which is what `/sync-status` shows. It does not order anything, pick winners or
//! delete anything: it only joins states, so it cannot bring back a value a context removed
//! (a join keeps the removal) and cannot lose a sibling.
//!
//! # How it fails
//!
//! * A tree that disagrees with its storage (a bug, or storage rolled back under it) keeps
//!   reporting its range as different; each exchange then moves the keys of the bad buckets for
//!   nothing, but moves the right data. A refused tree update marks the range for a rebuild.
//! * Trees live in memory only; a restarted node rebuilds them before it exchanges them.
//! * A state larger than a frame (possible only as the join of concurrent writes near the size
//!   limit) cannot be sent; the transport refuses it and the exchange fails, as replication
//!   would.

use super::{NodeCore, Now, Output};
use crate::merkle::{Geometry, Hash, Level, MerkleForest, MerkleTree, MAX_DEPTH};
use crate::metrics;
use crate::peer::{OpId, PeerMessage};
use crate::storage::Storage;
use crate::version_vector::KeyState;
use quorumkv_ring::{NodeId, RangeId, Token};

mod exchange;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Most parents one level request may name; the answer holds at most 16 entries per parent
/// (about 40 bytes each on the wire), so about 650 KiB at most.
pub const PARENTS_PER_REQUEST_MAX: usize = 1024;
/// Most token intervals (differing buckets, or parts of them) in one push.
pub const INTERVALS_PER_PUSH_MAX: usize = 64;
/// Most keys in one push or one answer to a push.
pub const KEYS_PER_MESSAGE_MAX: usize = 1024;
/// How often, at most, the key counts per keyspace are published as metrics.
const KEYS_PUBLISH_MS: u64 = 1_000;
/// How often, at most, the core scans ranges to build trees while some are missing.
const BUILD_STEP_MS: u64 = 10;
/// How soon a throttled exchange looks at the budget again.
const THROTTLE_POLL_MS: u64 = 10;
/// The geometry aims for about 2^18 buckets over the whole ring.
const TARGET_BUCKET_BITS: u32 = 18;
/// What one key costs in a push besides its bytes (MessagePack headers), rounded up.
const KEY_OVERHEAD_BYTES: usize = 16;
/// What one level entry costs on the wire, rounded up (index, 32-byte hash, headers).
const LEVEL_ENTRY_BYTES: usize = 40;

/// The anti-entropy knobs; see `[anti_entropy]` in the node configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AntiEntropyConfig {
    /// Whether this node starts and serves exchanges at all. Trees are kept either way, so
    /// `/sync-status` still tells whether replicas agree.
    pub enabled: bool,
    /// How often new exchanges start, ±25%.
    pub interval_ms: u64,
    /// Exchanges this node runs at once.
    pub exchanges_max: usize,
    /// An exchange whose peer has not answered for this long is dropped.
    pub exchange_timeout_ms: u64,
    /// Keys pushed and received per second over all exchanges.
    pub keys_per_second_max: u64,
    /// Keys scanned per tick (every 10 ms) while trees are being built; whole ranges only, so
    /// a tick may scan one range more than this.
    pub build_keys_per_tick_max: u64,
}

impl Default for AntiEntropyConfig {
    fn default() -> AntiEntropyConfig {
        AntiEntropyConfig {
            enabled: true,
            interval_ms: 500,
            exchanges_max: 2,
            exchange_timeout_ms: 10_000,
            keys_per_second_max: 10_000,
            build_keys_per_tick_max: 20_000,
        }
    }
}

/// The Merkle geometry for a ring of `range_count` ranges: one tree per ring range, and
/// `depth = (18 - log2(Q)) / 4` levels (at least 1, at most 4) so the whole ring has about
/// 2^18 buckets: 256 per range at the default Q = 1024.
pub fn geometry_for(range_count: u32) -> Geometry {
    let range_bits = range_count.max(1).trailing_zeros().min(16);
    let depth = (TARGET_BUCKET_BITS.saturating_sub(range_bits) / 4).clamp(1, 4);
    Geometry::new(range_bits as u8, depth.min(u32::from(MAX_DEPTH)) as u8)
        .unwrap_or_else(|_| unreachable!("at most 16 range bits and 4 levels form a geometry"))
}

/// One node's view of its trees, for operators and tests (`/sync-status`): a digest of every
/// range's Merkle root. Two replicas of a range agree exactly when their roots are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// The node's id.
    pub node: String,
    /// Whether every tree has been built from storage since the node started.
    pub trees_built: bool,
    /// How many (keyspace, range) trees are still waiting to be built.
    pub ranges_unbuilt: usize,
    /// BLAKE3 over every (keyspace, range, root) listed below, in hex: equal digests, equal
    /// trees (when the nodes hold the same ranges).
    pub digest: String,
    /// Per keyspace: keys held, and the root (hex) of every range holding keys.
    pub keyspaces: BTreeMap<String, KeyspaceSync>,
    /// Hints this node holds, per target node (owners with none are left out), so a script
    /// can tell convergence: equal roots and no hints pending anywhere.
    pub hints_pending: BTreeMap<String, u64>,
}

/// One keyspace's trees in a [`SyncStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyspaceSync {
    /// Keys over all its trees.
    pub keys: u64,
    /// Range → root hash in hex, for ranges holding keys (an absent range is empty).
    pub roots: BTreeMap<u32, String>,
}

/// The anti-entropy state of a node: its trees and its exchanges.
#[derive(Debug)]
pub(super) struct AntiEntropy {
    config: AntiEntropyConfig,
    geometry: Geometry,
    forest: MerkleForest,
    /// Ranges whose tree is not built, by keyspace.
    unbuilt: BTreeMap<String, BTreeSet<u32>>,
    next_build_ms: u64,
    next_exchange_ms: u64,
    /// Exchanges started so far: picks peers in turn and draws the jitter.
    round: u64,
    seed: u64,
    /// Exchanges waiting for the answer to their request, by the request's op.
    exchanges: BTreeMap<OpId, Exchange>,
    /// Exchanges ready to push, waiting for the throttle's budget.
    throttled: Vec<Exchange>,
    /// When each range last completed an exchange started here.
    last_exchanged_ms: BTreeMap<(String, u32), u64>,
    started_ms: u64,
    /// The throttle's budget, in thousandths of a key, and when it was last refilled.
    budget_milli: i64,
    budget_at_ms: u64,
    /// Counts changes to the trees, so the shell republishes the sync status only on change.
    generation: u64,
    /// When the key counts per keyspace were last published as metrics.
    keys_published_ms: Option<u64>,
}

#[derive(Debug)]
struct Exchange {
    keyspace: String,
    range: u32,
    peer: NodeId,
    deadline_ms: u64,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Comparing level `level` for `parents`; `chunk` is the part of them requested now,
    /// `done` how many were requested before, `differing` what differed so far.
    Levels {
        level: u8,
        parents: Vec<u32>,
        done: usize,
        chunk: Vec<u32>,
        differing: Vec<u32>,
    },
    /// Repairing `buckets`: the next push starts at bucket `next`, token `cursor`. While a push
    /// is out, `pushed` holds its intervals and `after` where the following one starts.
    Keys {
        buckets: Vec<u32>,
        next: usize,
        cursor: u64,
        pushed: Vec<(u64, u64)>,
        after: (usize, u64),
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    InSync,
    Repaired,
    Failed,
    Timeout,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::InSync => "in_sync",
            Outcome::Repaired => "repaired",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
        }
    }
}

impl AntiEntropy {
    pub(super) fn new(
        config: AntiEntropyConfig,
        range_count: u32,
        keyspaces: impl Iterator<Item = String>,
        instance: u64,
        now_ms: u64,
    ) -> AntiEntropy {
        let geometry = geometry_for(range_count);
        let unbuilt = keyspaces
            .map(|keyspace| (keyspace, (0..geometry.range_count()).collect()))
            .collect();
        let mut anti_entropy = AntiEntropy {
            geometry,
            forest: MerkleForest::new(geometry),
            unbuilt,
            next_build_ms: now_ms,
            next_exchange_ms: now_ms,
            round: 0,
            seed: instance,
            exchanges: BTreeMap::new(),
            throttled: Vec::new(),
            last_exchanged_ms: BTreeMap::new(),
            started_ms: now_ms,
            budget_milli: budget_cap(&config),
            budget_at_ms: now_ms,
            generation: 0,
            keys_published_ms: None,
            config,
        };
        anti_entropy.next_exchange_ms = now_ms + anti_entropy.jittered_interval();
        anti_entropy
    }

    /// The interval with ±25% jitter, drawn deterministically from the instance and round.
    fn jittered_interval(&mut self) -> u64 {
        self.round += 1;
        let interval = self.config.interval_ms.max(1);
        let spread = interval / 2 + 1;
        interval - interval / 4 + splitmix64(self.seed ^ self.round) % spread
    }

    fn is_built(&self, keyspace: &str, range: u32) -> bool {
        !self
            .unbuilt
            .get(keyspace)
            .is_some_and(|ranges| ranges.contains(&range))
    }

    fn mark_unbuilt(&mut self, keyspace: &str, range: u32) {
        self.forest.remove(keyspace, range);
        self.unbuilt
            .entry(keyspace.to_owned())
            .or_default()
            .insert(range);
        self.generation += 1;
    }

    fn first_unbuilt(&self) -> Option<(String, u32)> {
        self.unbuilt
            .iter()
            .find_map(|(keyspace, ranges)| ranges.first().map(|range| (keyspace.clone(), *range)))
    }

    fn set_built(&mut self, keyspace: &str, range: u32) {
        if let Some(ranges) = self.unbuilt.get_mut(keyspace) {
            ranges.remove(&range);
            if ranges.is_empty() {
                self.unbuilt.remove(keyspace);
            }
        }
        self.generation += 1;
    }

    fn unbuilt_count(&self) -> usize {
        self.unbuilt.values().map(BTreeSet::len).sum()
    }

    /// When the core next needs a tick for anti-entropy.
    pub(super) fn next_deadline_ms(&self) -> Option<u64> {
        let mut next = (!self.unbuilt.is_empty()).then_some(self.next_build_ms);
        if self.config.enabled {
            let exchanges = self.exchanges.values().map(|e| e.deadline_ms);
            let throttled =
                (!self.throttled.is_empty()).then_some(self.budget_at_ms + THROTTLE_POLL_MS);
            next = next
                .into_iter()
                .chain([self.next_exchange_ms])
                .chain(exchanges)
                .chain(throttled)
                .min();
        }
        next
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.budget_at_ms);
        if elapsed == 0 {
            return;
        }
        self.budget_at_ms = now_ms;
        let gain = i64::try_from(elapsed.saturating_mul(self.config.keys_per_second_max))
            .unwrap_or(i64::MAX);
        self.budget_milli = self
            .budget_milli
            .saturating_add(gain)
            .min(budget_cap(&self.config));
    }

    fn spend(&mut self, keys: usize) {
        let cost = i64::try_from(keys.max(1)).unwrap_or(i64::MAX / 1000) * 1000;
        self.budget_milli = self.budget_milli.saturating_sub(cost);
    }

    fn tree_or_empty(&self, keyspace: &str, range: u32) -> Result<Level0Source<'_>, String> {
        match self.forest.tree(keyspace, range) {
            Some(tree) => Ok(Level0Source::Borrowed(tree)),
            None => MerkleTree::new(self.geometry, range)
                .map(Level0Source::Owned)
                .map_err(|e| e.to_string()),
        }
    }

    fn level(
        &self,
        keyspace: &str,
        range: u32,
        level: u8,
        parents: &[u32],
    ) -> Result<Level, String> {
        let tree = self.tree_or_empty(keyspace, range)?;
        tree.get().level(level, parents).map_err(|e| e.to_string())
    }
}

/// A tree to read, or an empty one standing in for a range without keys.
enum Level0Source<'a> {
    Borrowed(&'a MerkleTree),
    Owned(MerkleTree),
}

impl Level0Source<'_> {
    fn get(&self) -> &MerkleTree {
        match self {
            Level0Source::Borrowed(tree) => tree,
            Level0Source::Owned(tree) => tree,
        }
    }
}

fn budget_cap(config: &AntiEntropyConfig) -> i64 {
    i64::try_from(config.keys_per_second_max.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// A 64-bit mix (Steele et al.'s SplitMix64 finaliser): the jitter's deterministic "random".
pub(super) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

impl NodeCore {
    /// A merge changed `key`'s state from `old` to `new` (`None`: tombstone collection removed
    /// it): keep its tree current. Called by [`NodeCore::store`] for every write, and for every
    /// removal.
    pub(super) fn ae_on_stored(
        &mut self,
        keyspace: &str,
        key: &[u8],
        old: Option<&Hash>,
        new: Option<&Hash>,
    ) {
        if old == new {
            return;
        }
        let ae = &mut self.anti_entropy;
        let token = Token::of(keyspace, key);
        let range = ae.geometry.range_of(token);
        if !ae.is_built(keyspace, range) {
            // The build scans the whole range later and will see this write.
            return;
        }
        ae.generation += 1;
        if let Err(e) = ae.forest.update(keyspace, token, key, old, new) {
            tracing::warn!(keyspace, range, error = %e, "Merkle tree refused an update; rebuilding it");
            ae.mark_unbuilt(keyspace, range);
        }
    }

    /// The geometry of this node's Merkle trees.
    pub fn merkle_geometry(&self) -> Geometry {
        self.anti_entropy.geometry
    }

    /// The root of this node's tree of (`keyspace`, `range`), or `None` while it is not built.
    pub fn merkle_root(&self, keyspace: &str, range: u32) -> Option<Hash> {
        let ae = &self.anti_entropy;
        ae.is_built(keyspace, range)
            .then(|| ae.forest.root(keyspace, range))
    }

    /// Anti-entropy exchanges this node has started and not finished (waiting for a peer or
    /// for the throttle).
    pub fn exchanges_in_flight(&self) -> usize {
        self.anti_entropy.exchanges.len() + self.anti_entropy.throttled.len()
    }

    /// Changes whenever a tree changes; the shell republishes [`NodeCore::sync_status`] then.
    pub fn merkle_generation(&self) -> u64 {
        self.anti_entropy.generation
    }

    /// Every range's root digest, for `/sync-status` and tests.
    pub fn sync_status(&self) -> SyncStatus {
        let ae = &self.anti_entropy;
        let mut keyspaces: BTreeMap<String, KeyspaceSync> = BTreeMap::new();
        let mut digest = blake3::Hasher::new();
        digest.update(b"quorumkv/sync-status/v1\0");
        for (keyspace, range, tree) in ae.forest.trees() {
            let root = tree.root();
            digest.update(&(keyspace.len() as u64).to_le_bytes());
            digest.update(keyspace.as_bytes());
            digest.update(&range.to_le_bytes());
            digest.update(&root);
            let entry = keyspaces
                .entry(keyspace.to_owned())
                .or_insert_with(|| KeyspaceSync {
                    keys: 0,
                    roots: BTreeMap::new(),
                });
            entry.keys += tree.key_count();
            entry.roots.insert(range, hex(&root));
        }
        let unbuilt = ae.unbuilt_count();
        SyncStatus {
            node: self.me.to_string(),
            trees_built: unbuilt == 0,
            ranges_unbuilt: unbuilt,
            digest: digest.finalize().to_hex().to_string(),
            keyspaces,
            hints_pending: self
                .hints_pending()
                .map(|(owner, totals)| (owner.to_string(), totals.count))
                .collect(),
        }
    }

    /// Anti-entropy's share of a tick: build missing trees, drop stalled exchanges, resume
    /// throttled ones, start new ones when the interval has passed.
    pub(super) fn ae_tick(&mut self, now: Now, storage: &dyn Storage, out: &mut Vec<Output>) {
        if !self.in_service() {
            return;
        }
        let now_ms = now.monotonic_ms;
        self.ae_publish_key_counts(now_ms);
        if !self.anti_entropy.unbuilt.is_empty() && now_ms >= self.anti_entropy.next_build_ms {
            self.anti_entropy.next_build_ms = now_ms + BUILD_STEP_MS;
            self.ae_build(storage);
        }
        if !self.anti_entropy.config.enabled {
            return;
        }
        let stalled: Vec<OpId> = self
            .anti_entropy
            .exchanges
            .iter()
            .filter(|(_, e)| e.deadline_ms <= now_ms)
            .map(|(op, _)| *op)
            .collect();
        for op in stalled {
            if let Some(exchange) = self.anti_entropy.exchanges.remove(&op) {
                self.ae_finish(exchange, Outcome::Timeout, now_ms);
            }
        }
        self.anti_entropy.refill(now_ms);
        while self.anti_entropy.budget_milli > 0 && !self.anti_entropy.throttled.is_empty() {
            let exchange = self.anti_entropy.throttled.remove(0);
            self.ae_push_next(exchange, now, storage, out);
        }
        if now_ms >= self.anti_entropy.next_exchange_ms {
            self.anti_entropy.next_exchange_ms = now_ms + self.anti_entropy.jittered_interval();
            self.ae_start_due(now_ms, out);
        }
    }

    /// Publishes the keys stored per keyspace (`quorumkv_keys`), at most once a second: the
    /// trees count them, so this costs one pass over the trees, not over storage.
    fn ae_publish_key_counts(&mut self, now_ms: u64) {
        let ae = &mut self.anti_entropy;
        if ae
            .keys_published_ms
            .is_some_and(|at| now_ms < at.saturating_add(KEYS_PUBLISH_MS))
        {
            return;
        }
        ae.keys_published_ms = Some(now_ms);
        let mut counts: BTreeMap<&str, u64> =
            self.map.keyspaces.keys().map(|k| (k.as_str(), 0)).collect();
        for (keyspace, _, tree) in ae.forest.trees() {
            *counts.entry(keyspace).or_default() += tree.key_count();
        }
        for (keyspace, keys) in counts {
            metrics::keys(keyspace, keys);
        }
    }

    /// Scans whole ranges into trees, up to the per-tick key budget.
    fn ae_build(&mut self, storage: &dyn Storage) {
        let mut scanned = 0u64;
        while scanned < self.anti_entropy.config.build_keys_per_tick_max {
            let Some((keyspace, range)) = self.anti_entropy.first_unbuilt() else {
                break;
            };
            match self.ae_scan_tree(storage, &keyspace, range) {
                Ok((tree, deleted)) => {
                    for (key, state, hash) in deleted {
                        self.note_tombstone(&keyspace, &key, &state, hash);
                    }
                    scanned += tree.key_count().max(1);
                    let ae = &mut self.anti_entropy;
                    if let Err(e) = ae.forest.replace(&keyspace, tree) {
                        tracing::error!(error = %e, "a rebuilt Merkle tree does not fit the forest");
                    }
                    ae.set_built(&keyspace, range);
                }
                Err(e) => {
                    tracing::warn!(%keyspace, range, error = %e, "cannot build a Merkle tree yet");
                    self.note_storage_failure(&e);
                    break;
                }
            }
        }
        metrics::anti_entropy_ranges_unbuilt(self.anti_entropy.unbuilt_count());
    }

    /// The tree of one range from storage, scanned one sixteenth of the range at a time so the
    /// states in memory at once stay small; all in one step of the core, so no write interleaves.
    /// Also returns the deleted keys it saw, for tombstone collection.
    #[allow(clippy::type_complexity)]
    fn ae_scan_tree(
        &self,
        storage: &dyn Storage,
        keyspace: &str,
        range: u32,
    ) -> crate::Result<(MerkleTree, Vec<(Vec<u8>, KeyState, Hash)>)> {
        let geometry = self.anti_entropy.geometry;
        let per_slice = (geometry.bucket_count() / 16) as u32;
        let mut items: Vec<(Token, Vec<u8>, Hash)> = Vec::new();
        let mut deleted = Vec::new();
        for slice in 0..16u32 {
            let (first, _) = geometry.bucket_token_bounds(range, slice * per_slice)?;
            let (_, last) = geometry.bucket_token_bounds(range, (slice + 1) * per_slice - 1)?;
            for stored in storage.scan(keyspace, first, last)? {
                let hash = stored.state.state_hash();
                if stored.state.is_deleted() {
                    deleted.push((stored.key.clone(), stored.state, hash));
                }
                items.push((stored.token, stored.key, hash));
            }
        }
        Ok((MerkleTree::from_items(geometry, range, items)?, deleted))
    }

    /// Starts exchanges for the least recently exchanged ranges this node replicates, up to
    /// the concurrency limit, and publishes the age of the oldest.
    fn ae_start_due(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let mut candidates: Vec<(u64, String, u32)> = Vec::new();
        let busy: BTreeSet<(&str, u32)> = self
            .anti_entropy
            .exchanges
            .values()
            .chain(&self.anti_entropy.throttled)
            .map(|e| (e.keyspace.as_str(), e.range))
            .collect();
        let mut oldest = now_ms;
        for (keyspace, n) in &self.map.keyspaces {
            for range in 0..self.map.ring.range_count() {
                let Ok(list) = self
                    .map
                    .ring
                    .preference_list(RangeId(range), usize::from(*n))
                else {
                    continue;
                };
                if !list.contains(&self.me) {
                    continue;
                }
                let key = (keyspace.clone(), range);
                let last = self
                    .anti_entropy
                    .last_exchanged_ms
                    .get(&key)
                    .copied()
                    .unwrap_or(self.anti_entropy.started_ms);
                oldest = oldest.min(last);
                if self.anti_entropy.is_built(keyspace, range)
                    && !busy.contains(&(keyspace.as_str(), range))
                {
                    candidates.push((last, key.0, range));
                }
            }
        }
        metrics::anti_entropy_oldest_unexchanged((now_ms - oldest) as f64 / 1000.0);
        candidates.sort();
        for (_, keyspace, range) in candidates {
            let active = self.anti_entropy.exchanges.len() + self.anti_entropy.throttled.len();
            if active >= self.anti_entropy.config.exchanges_max {
                break;
            }
            let Some(peer) = self.ae_pick_peer(&keyspace, range) else {
                continue;
            };
            self.ae_start(now_ms, keyspace, range, peer, out);
        }
    }

    /// Another replica of the range believed up, taking turns between them.
    fn ae_pick_peer(&mut self, keyspace: &str, range: u32) -> Option<NodeId> {
        let n = *self.map.keyspaces.get(keyspace)?;
        let list = self
            .map
            .ring
            .preference_list(RangeId(range), usize::from(n))
            .ok()?;
        let peers: Vec<NodeId> = list
            .ids()
            .filter(|id| **id != self.me && self.detector.is_up(id))
            .cloned()
            .collect();
        if peers.is_empty() {
            return None;
        }
        self.anti_entropy.round += 1;
        let pick = (self.anti_entropy.round % peers.len() as u64) as usize;
        peers.into_iter().nth(pick)
    }

    /// Starts one exchange of (`keyspace`, `range`) with `peer` now, whatever the timer and the
    /// concurrency limit say: for tests and operators. False (nothing sent) if anti-entropy is
    /// disabled, the range's tree is not built, or the peer or range is not known.
    pub fn start_exchange(
        &mut self,
        now: Now,
        keyspace: &str,
        range: u32,
        peer: &NodeId,
        out: &mut Vec<Output>,
    ) -> bool {
        let known = self.map.keyspaces.contains_key(keyspace)
            && self.map.addresses.contains_key(peer)
            && *peer != self.me
            && range < self.anti_entropy.geometry.range_count();
        if !known || !self.anti_entropy.config.enabled || !self.in_service() {
            return false;
        }
        if !self.anti_entropy.is_built(keyspace, range) {
            return false;
        }
        self.ae_start(
            now.monotonic_ms,
            keyspace.to_owned(),
            range,
            peer.clone(),
            out,
        );
        true
    }

    fn ae_start(
        &mut self,
        now_ms: u64,
        keyspace: String,
        range: u32,
        peer: NodeId,
        out: &mut Vec<Output>,
    ) {
        let exchange = Exchange {
            keyspace,
            range,
            peer,
            deadline_ms: now_ms + self.anti_entropy.config.exchange_timeout_ms,
            phase: Phase::Levels {
                level: 0,
                parents: Vec::new(),
                done: 0,
                chunk: Vec::new(),
                differing: Vec::new(),
            },
        };
        self.ae_request_level(exchange, now_ms, out);
    }

    /// Sends the next level request of `exchange`: level 0, or the next chunk of parents.
    fn ae_request_level(&mut self, mut exchange: Exchange, now_ms: u64, out: &mut Vec<Output>) {
        let Phase::Levels {
            level,
            parents,
            done,
            chunk,
            ..
        } = &mut exchange.phase
        else {
            return;
        };
        let per_request = self.ae_parents_per_request();
        let end = (*done + per_request).min(parents.len());
        *chunk = parents[*done..end].to_vec();
        *done = end;
        let message = PeerMessage::AeLevel {
            op: OpId(0, 0),
            keyspace: exchange.keyspace.clone(),
            range: exchange.range,
            depth: self.anti_entropy.geometry.depth(),
            level: *level,
            parents: chunk.clone(),
        };
        self.ae_send(exchange, message, now_ms, out);
    }

    /// Parents per level request, so that the answer fits a frame.
    fn ae_parents_per_request(&self) -> usize {
        (self.config.key_state_bytes_max / (16 * LEVEL_ENTRY_BYTES))
            .clamp(1, PARENTS_PER_REQUEST_MAX)
    }

    /// Sends `message` (its op replaced by a fresh one) and files the exchange under that op.
    fn ae_send(
        &mut self,
        mut exchange: Exchange,
        mut message: PeerMessage,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let fresh = self.new_op();
        match &mut message {
            PeerMessage::AeLevel { op, .. } | PeerMessage::AePush { op, .. } => *op = fresh,
            _ => {}
        }
        exchange.deadline_ms = now_ms + self.anti_entropy.config.exchange_timeout_ms;
        out.push(Output::Send {
            to: exchange.peer.clone(),
            message,
        });
        self.anti_entropy.exchanges.insert(fresh, exchange);
    }

    fn ae_finish(&mut self, exchange: Exchange, outcome: Outcome, now_ms: u64) {
        metrics::anti_entropy_exchange(outcome.label());
        match outcome {
            Outcome::InSync | Outcome::Repaired => {
                self.anti_entropy
                    .last_exchanged_ms
                    .insert((exchange.keyspace, exchange.range), now_ms);
            }
            Outcome::Failed | Outcome::Timeout => {
                tracing::debug!(
                    keyspace = %exchange.keyspace,
                    range = exchange.range,
                    peer = %exchange.peer,
                    outcome = outcome.label(),
                    "anti-entropy exchange ended early"
                );
            }
        }
    }

    /// Whether `op` is a request of one of this node's exchanges.
    pub(super) fn ae_owns(&self, op: OpId) -> bool {
        self.anti_entropy.exchanges.contains_key(&op)
    }

    /// The peer refused `op`, or it could not be delivered: the exchange ends as failed.
    pub(super) fn ae_failed(&mut self, op: OpId, from: &NodeId, now: Now) {
        if self
            .anti_entropy
            .exchanges
            .get(&op)
            .is_some_and(|e| e.peer == *from)
        {
            if let Some(exchange) = self.anti_entropy.exchanges.remove(&op) {
                self.ae_finish(exchange, Outcome::Failed, now.monotonic_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_geometry_follows_the_ring_and_keeps_about_a_quarter_million_buckets() {
        let g = geometry_for(1024);
        assert_eq!((g.range_bits(), g.depth()), (10, 2));
        let g = geometry_for(16);
        assert_eq!((g.range_bits(), g.depth()), (4, 3));
        let g = geometry_for(1);
        assert_eq!((g.range_bits(), g.depth()), (0, 4));
        let g = geometry_for(65_536);
        assert_eq!((g.range_bits(), g.depth()), (16, 1));
    }

    #[test]
    fn the_jitter_stays_within_a_quarter_of_the_interval_and_is_deterministic() {
        let config = AntiEntropyConfig::default();
        let mut a = AntiEntropy::new(config.clone(), 16, std::iter::empty(), 7, 0);
        let mut b = AntiEntropy::new(config, 16, std::iter::empty(), 7, 0);
        for _ in 0..1000 {
            let (x, y) = (a.jittered_interval(), b.jittered_interval());
            assert_eq!(x, y);
            assert!((375..=625).contains(&x), "{x}");
        }
    }
}
