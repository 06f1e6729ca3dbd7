//! Storage: where a node keeps the causal state of its keys.
//!
//! The node talks to storage through the narrow [`Storage`] trait. Two implementations exist:
//! [`sled`](sled_store) on disk for production, and [`memory`] for tests and the deterministic
//! simulation. The in-memory twin models durability: writes land in a volatile layer that a
//! simulated crash throws away, and only [`Storage::flush`] makes them survive.
//!
//! # One write path
//!
//! Every way data arrives (a client put at its coordinator, a replica write, and later hint
//! delivery, read repair, anti-entropy and range handoff) ends in [`Storage::merge`]: read the
//! stored state, join it with the incoming state (the version-vector join, which is
//! commutative, associative and idempotent), and write the result only if it changed. Because
//! join is a semilattice merge, concurrent merges of the same key in any order converge, and
//! replaying a merge is harmless. Auxiliary records that must change atomically with the data
//! (hints, Merkle dirty marks) are passed as [`AuxWrite`]s and written in the same transaction.
//!
//! # Layout
//!
//! Within a keyspace, data is ordered by token: the storage key is the key's 8-byte big-endian
//! token followed by the key itself, so one range of the ring is one contiguous scan and two
//! keys with equal tokens still have distinct storage keys.
//!
//! # Durability
//!
//! Each merge that writes (changed data or aux records) gets a [`WriteSeq`], increasing.
//! [`Storage::flush`] makes every write so far durable and returns the sequence number it
//! covers. Flushes are batched by the caller (group commit): many writers waiting for
//! durability share one flush.
//!
//! The rule that makes group commit correct: a sequence number becomes visible (to `flush` or
//! to a later merge) only after its write has committed. `flush` reads the sequence number
//! *before* asking the engine to sync, so everything it reports was committed before the sync
//! began. Merges of one key are serialised, so a merge that finds nothing to change reports a
//! sequence number at least as high as the write that put the state there.
//!
//! Sequence numbers are positions within one open storage instance, not on-disk state: after a
//! restart (or [`memory::MemoryStorage::crash`]) they continue from what is durable, and no
//! waiter survives a restart to be confused by that.
//!
//! # Failure
//!
//! A stored state that does not decode is [`Error::CorruptState`] naming the keyspace and the
//! key (hex), never a panic; other keys stay readable. Engine I/O failures are
//! [`Error::Storage`] (possibly retryable), engine corruption is [`Error::StorageCorrupt`], and
//! a data directory of another format version is [`Error::StorageFormat`].

pub mod memory;
pub mod sled_store;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::version_vector::{IncarnationRecord, KeyState};
use quorumkv_ring::Token;

/// The position of a merge in the node's write order; flushes are reported in it. `WriteSeq(0)`
/// means "no write yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteSeq(pub u64);

/// A record written in the same transaction as a data merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuxWrite {
    /// Which auxiliary table (for example `hints`).
    pub table: AuxTable,
    /// The record's key within its table; its layout belongs to the table's owner.
    pub key: Vec<u8>,
    /// `None` deletes the record.
    pub value: Option<Vec<u8>>,
}

/// The auxiliary tables. A closed set, so that a typo cannot create a stray table on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuxTable {
    /// Writes waiting to be handed to a replica that was down.
    Hints,
    /// (keyspace, range, bucket) entries whose Merkle hashes must be recomputed.
    MerkleDirty,
}

impl AuxTable {
    /// Every auxiliary table, so an engine can create them all when it opens.
    pub const ALL: [AuxTable; 2] = [AuxTable::Hints, AuxTable::MerkleDirty];

    /// The table's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            AuxTable::Hints => "aux/hints",
            AuxTable::MerkleDirty => "aux/merkle-dirty",
        }
    }
}

/// The result of a [`Storage::merge`].
#[derive(Clone, Debug)]
pub struct Merged {
    /// The state now stored (the join of what was stored and what arrived).
    pub state: KeyState,
    /// Whether the stored bytes changed. An unchanged merge writes no data (its aux writes, if
    /// any, are still applied and given a sequence number).
    pub changed: bool,
    /// The write's position; flushing through it makes it durable. For a merge that wrote
    /// nothing, the sequence number of the latest write, so waiting for it is still correct.
    pub seq: WriteSeq,
    /// `state_hash` of the state before the merge (`None` if the key was absent), for the
    /// Merkle trees.
    pub old_hash: Option<[u8; 32]>,
    /// `state_hash` of the state after the merge (equal to `old_hash` when unchanged).
    pub new_hash: [u8; 32],
}

/// A key and its stored state, as returned by a scan.
#[derive(Clone, Debug)]
pub struct StoredKey {
    /// `Token::of(keyspace, key)`; scans check it against the key.
    pub token: Token,
    /// The key as the client wrote it.
    pub key: Vec<u8>,
    /// The key's stored state.
    pub state: KeyState,
}

/// The narrow interface between the node and its storage engine.
///
/// Implementations are internally synchronised: every method takes `&self` and may be called
/// from several threads. Merges of the same key are serialised so no join is lost.
pub trait Storage: Send + Sync + 'static {
    /// The stored state of `key` in `keyspace`, if any.
    fn read(&self, keyspace: &str, key: &[u8]) -> Result<Option<KeyState>>;

    /// The one write path: joins `incoming` into the stored state of `key` and writes the
    /// result, together with `aux`, in one transaction if the data changed. The aux writes are
    /// applied even when the data did not change (in order; a later write to the same aux key
    /// wins). An absent key counts as changed by any incoming state, so the first merge writes.
    fn merge(
        &self,
        keyspace: &str,
        key: &[u8],
        incoming: &KeyState,
        aux: &[AuxWrite],
    ) -> Result<Merged>;

    /// Removes the stored state of `key` if its [`KeyState::state_hash`] is `expected`: the one
    /// way a key's state leaves storage other than by a join, used by tombstone collection
    /// (`crate::core::tombstones`). Returns the removal's sequence number (flushing through it
    /// makes it durable), or `None`, writing nothing, when the key is absent or holds another
    /// state (a write arrived since the caller looked: the key is kept).
    fn remove_if(
        &self,
        keyspace: &str,
        key: &[u8],
        expected: &[u8; 32],
    ) -> Result<Option<WriteSeq>>;

    /// The sequence number of the latest write: flushing through it makes everything written
    /// so far durable.
    fn latest_seq(&self) -> WriteSeq;

    /// Makes every write so far durable; returns the sequence number now durable (at least the
    /// sequence number of every merge that returned before `flush` was called).
    fn flush(&self) -> Result<WriteSeq>;

    /// The highest sequence number known durable.
    fn durable_seq(&self) -> WriteSeq;

    /// Every key of `keyspace` whose token lies in `first..=last`, in token order (keys with
    /// equal tokens in byte order). Empty if `first > last`: a range that wraps around the end
    /// of the ring is two scans, by the caller.
    fn scan(&self, keyspace: &str, first: Token, last: Token) -> Result<Vec<StoredKey>>;

    /// A record from an auxiliary table.
    fn aux(&self, table: AuxTable, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Writes auxiliary records without touching data, atomically and in order (a later write to
    /// the same key wins), and returns their sequence number: for records that are data of
    /// their own, such as a hint a fallback keeps for a key it does not replicate.
    fn write_aux(&self, aux: &[AuxWrite]) -> Result<WriteSeq>;

    /// At most `limit` records of `table` whose keys start with `prefix`, in key order,
    /// starting after `after` when given (so a caller can page through a table).
    fn aux_scan(
        &self,
        table: AuxTable,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// The node's incarnation record (see [`crate::version_vector`]), if one was written.
    fn incarnation(&self) -> Result<Option<IncarnationRecord>>;

    /// Writes the incarnation record and makes it durable before returning (flushing every
    /// earlier write with it).
    fn set_incarnation(&self, record: &IncarnationRecord) -> Result<()>;
}

/// The storage key of `key`: its token, big-endian, then the key bytes.
pub fn storage_key(keyspace: &str, key: &[u8]) -> Vec<u8> {
    storage_key_with_token(Token::of(keyspace, key), key)
}

/// The layout behind [`storage_key`], with the token given. Separate so tests can build keys
/// whose tokens collide, which `Token::of` cannot be made to do.
pub(crate) fn storage_key_with_token(token: Token, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&token.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// Splits a storage key back into token and key.
pub(crate) fn split_storage_key(raw: &[u8]) -> Option<(Token, &[u8])> {
    let (token, key) = raw.split_first_chunk::<8>()?;
    Some((Token(u64::from_be_bytes(*token)), key))
}

/// The first storage key of `first`'s token and the first storage key past `last`'s token
/// (`None` when `last` is the end of the ring): the bounds of a token-range scan.
pub(crate) fn scan_bounds(first: Token, last: Token) -> (Vec<u8>, Option<Vec<u8>>) {
    let end = last
        .0
        .checked_add(1)
        .map(|next| next.to_be_bytes().to_vec());
    (first.to_be_bytes().to_vec(), end)
}

/// How error messages show a key: hex, cut after 64 bytes so a huge key cannot flood a log.
pub(crate) fn key_for_display(key: &[u8]) -> String {
    const SHOWN_MAX: usize = 64;
    let mut out: String = key
        .iter()
        .take(SHOWN_MAX)
        .map(|b| format!("{b:02x}"))
        .collect();
    if key.len() > SHOWN_MAX {
        out.push_str(&format!("... ({} bytes)", key.len()));
    }
    out
}

/// Adds where a bad state was found to a decode error, so the message names keyspace and key.
pub(crate) fn corrupt_at(keyspace: &str, key: &[u8], error: Error) -> Error {
    let reason = match error {
        Error::CorruptState { reason } => reason,
        other => other.to_string(),
    };
    Error::CorruptState {
        reason: format!(
            "keyspace {keyspace:?}, key {}: {reason}",
            key_for_display(key)
        ),
    }
}

/// The incarnation record's stored bytes (the same in every engine).
pub fn encode_incarnation(record: &IncarnationRecord) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(record).map_err(|e| crate::error::Error::Storage {
        operation: "write incarnation",
        reason: format!("incarnation record does not encode: {e}"),
    })
}

/// Decodes a stored incarnation record; bad bytes are corruption, never a fresh start. Public so
/// that the fuzz targets (`node/tests/fuzz_decoders.rs`) can reach it.
pub fn decode_incarnation(bytes: &[u8]) -> Result<IncarnationRecord> {
    quorumkv_client::msgpack::from_slice(bytes).map_err(|e| crate::error::Error::StorageCorrupt {
        operation: "read incarnation",
        reason: format!("incarnation record does not decode: {e}"),
    })
}
