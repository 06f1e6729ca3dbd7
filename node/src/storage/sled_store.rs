//! The on-disk store, on [sled](https://docs.rs/sled/0.34) 0.34.
//!
//! # Layout
//!
//! One sled `Db` per node, holding these trees:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `data/<keyspace>` | [`storage_key`]: token (8 bytes, BE), key | `KeyState::encode_canonical` |
//! | `aux/hints`, `aux/merkle-dirty` ([`AuxTable::name`]) | chosen by the table's owner | opaque |
//! | `meta` | `format` | on-disk format version, `u32` big-endian |
//! | `meta` | `incarnation` | the [`IncarnationRecord`], rmp-serde with field names |
//!
//! Because tokens are stored big-endian in front of the key, byte order is token order: the
//! keys of one range of the ring are one contiguous run, and a scan is one sled range.
//!
//! # The merge
//!
//! [`Storage::merge`] holds one of [`MERGE_STRIPES`] mutexes, chosen by the key's token, from
//! its read to the assignment of its [`WriteSeq`]; every write of a key goes through `merge`,
//! so merges of one key run one at a time. Under that lock it reads the stored bytes, decodes
//! and joins (the *plan*). If the canonical bytes would not change and there are no aux
//! writes, it is done: no transaction. Otherwise it runs one multi-tree sled transaction over
//! the keyspace's tree and the aux trees that re-reads the key, checks the bytes are the ones
//! it planned from (re-planning if not, so a stale plan can never overwrite a state it did not
//! join), writes the new bytes and the aux records. sled seals a transaction's writes into one
//! log batch, so a crash keeps all of them or none.
//!
//! The stripe lock is also what lets an unchanged merge report a sequence number covering the
//! write it found (see the durability rule in [`super`]).
//!
//! # Durability
//!
//! sled makes writes durable by flushing its log. `flush` reads the sequence counter first,
//! then calls `Db::flush`; every merge counted had committed before the read, so the sync
//! covers it. sled also flushes in the background (every 500 ms by default), which can only
//! make writes durable earlier than reported, never later.
//!
//! # Caveats of sled 0.34 that shape this code
//!
//! - Transactions take a process-wide write lock: all transactions in the process, on every
//!   `Db`, run one at a time, and once any has run, plain reads take that lock's read side.
//!   So the decode and join happen before the transaction, which only re-reads and writes,
//!   and a merge with nothing to write skips it.
//! - The transaction closure may run more than once (on a conflict), so it only computes from
//!   what it reads and returns the result; the sequence number is taken after the commit.
//! - Non-transactional writes inside a transaction closure deadlock on that lock; the closure
//!   writes only through its transactional views.
//! - After an I/O error while writing its log, sled refuses all further work until reopened.
//! - Opening a keyspace's tree creates it, so reading an unknown keyspace leaves an empty tree.
//!   Keyspaces are a small configured set, so this is harmless.

use super::{
    corrupt_at, key_for_display, scan_bounds, split_storage_key, storage_key, AuxTable, AuxWrite,
    Merged, Storage, StoredKey, WriteSeq,
};
use crate::error::{Error, Result};
use crate::version_vector::{IncarnationRecord, KeyState};
use quorumkv_ring::Token;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

/// The on-disk format this code reads and writes. Bump it with any change to the layout or the
/// value encodings, and teach `open` to migrate or refuse.
pub const FORMAT_VERSION: u32 = 1;

/// How many locks serialise merges; merges of keys on different stripes run in parallel (up to
/// sled's own transaction lock).
pub const MERGE_STRIPES: usize = 64;

const META_TREE: &str = "meta";
const META_FORMAT: &[u8] = b"format";
const META_INCARNATION: &[u8] = b"incarnation";
const DATA_TREE_PREFIX: &str = "data/";

/// Tuning for [`SledStorage::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SledOptions {
    /// sled's page cache, in bytes. sled's own default is 1 GiB, too much for a node that
    /// shares a machine; 64 MiB keeps the hot part of a modest data set in memory.
    pub cache_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> SledOptions {
        SledOptions {
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Storage on sled; see the [module docs](self).
#[derive(Debug)]
pub struct SledStorage {
    db: sled::Db,
    meta: sled::Tree,
    hints: sled::Tree,
    merkle_dirty: sled::Tree,
    /// Opened data trees by keyspace; opening a tree costs a lookup in sled's tree directory.
    data_trees: RwLock<BTreeMap<String, sled::Tree>>,
    stripes: Vec<Mutex<()>>,
    /// The sequence number of the last merge that wrote; bumped only after its commit.
    seq: AtomicU64,
    /// The highest sequence number a completed flush covered.
    durable: AtomicU64,
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`. Refuses a directory written in another format
    /// version with [`Error::StorageFormat`].
    ///
    /// A directory another instance holds open is [`Error::Storage`] naming it. sled releases
    /// its lock from background threads after the last handle drops, so reopening in the same
    /// process right after a close can briefly meet that error too.
    pub fn open(dir: impl AsRef<Path>, options: SledOptions) -> Result<SledStorage> {
        let dir = dir.as_ref();
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_bytes)
            .open()
            .map_err(|e| open_error(dir, e))?;
        let meta = open_tree(&db, META_TREE)?;
        check_format(&db, &meta)?;
        let hints = open_tree(&db, AuxTable::Hints.name())?;
        let merkle_dirty = open_tree(&db, AuxTable::MerkleDirty.name())?;
        Ok(SledStorage {
            db,
            meta,
            hints,
            merkle_dirty,
            data_trees: RwLock::new(BTreeMap::new()),
            stripes: (0..MERGE_STRIPES).map(|_| Mutex::new(())).collect(),
            seq: AtomicU64::new(0),
            durable: AtomicU64::new(0),
        })
    }

    /// The data tree of `keyspace`, opened once and cached.
    pub(super) fn data_tree(&self, keyspace: &str) -> Result<sled::Tree> {
        let cached = self
            .data_trees
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(keyspace)
            .cloned();
        if let Some(tree) = cached {
            return Ok(tree);
        }
        let mut trees = self
            .data_trees
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tree) = trees.get(keyspace) {
            return Ok(tree.clone());
        }
        let tree = open_tree(&self.db, &format!("{DATA_TREE_PREFIX}{keyspace}"))?;
        trees.insert(keyspace.to_owned(), tree.clone());
        Ok(tree)
    }

    fn aux_tree(&self, table: AuxTable) -> &sled::Tree {
        match table {
            AuxTable::Hints => &self.hints,
            AuxTable::MerkleDirty => &self.merkle_dirty,
        }
    }

    /// The merge lock of the key stored at `skey`. Tokens are uniform hashes, so the low bits of
    /// the token spread keys evenly over the stripes.
    fn stripe(&self, skey: &[u8]) -> MutexGuard<'_, ()> {
        let token = split_storage_key(skey).map_or(0, |(token, _)| token.0);
        // The remainder is below MERGE_STRIPES, so the cast back cannot truncate.
        let index = (token % MERGE_STRIPES as u64) as usize;
        self.stripes[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes a planned merge and its aux records in one transaction.
    ///
    /// The plan was made from `planned_from`, the bytes read before the transaction. The
    /// stripe lock keeps every other merge of this key out, so the transaction finds the same
    /// bytes; it checks anyway, and re-plans from what it finds if they differ (a write that
    /// bypassed `merge`), so a stale plan can never overwrite a state it did not join. Returns
    /// the plan it carried out.
    pub(super) fn write_merge(
        &self,
        data: &sled::Tree,
        at: (&str, &[u8], &[u8]),
        incoming: &KeyState,
        planned_from: Option<&[u8]>,
        plan: Plan,
        aux: &[AuxWrite],
    ) -> Result<Plan> {
        let (keyspace, key, skey) = at;
        let trees = (data, &self.hints, &self.merkle_dirty);
        let result = trees.transaction(|(data, hints, dirty)| {
            let current = data.get(skey)?;
            let replanned = if current.as_deref() == planned_from {
                None
            } else {
                let replanned = Plan::new(keyspace, key, current.as_deref(), incoming)
                    .map_err(ConflictableTransactionError::Abort)?;
                Some(replanned)
            };
            if let Some(bytes) = &replanned.as_ref().unwrap_or(&plan).write {
                data.insert(skey, bytes.as_slice())?;
            }
            for write in aux {
                let tree = match write.table {
                    AuxTable::Hints => hints,
                    AuxTable::MerkleDirty => dirty,
                };
                match &write.value {
                    Some(value) => tree.insert(write.key.as_slice(), value.as_slice())?,
                    None => tree.remove(write.key.as_slice())?,
                };
            }
            Ok(replanned)
        });
        match result {
            Ok(replanned) => Ok(replanned.unwrap_or(plan)),
            Err(TransactionError::Abort(error)) => Err(error),
            Err(TransactionError::Storage(error)) => Err(engine_error("merge", error)),
        }
    }
}

/// What a merge will do, computed from the stored bytes (`None`: the key is absent).
pub(super) struct Plan {
    state: KeyState,
    /// The canonical bytes to store, or `None` if they would not change.
    write: Option<Vec<u8>>,
    old_hash: Option<[u8; 32]>,
    new_hash: [u8; 32],
}

impl Plan {
    pub(super) fn new(
        keyspace: &str,
        key: &[u8],
        stored: Option<&[u8]>,
        incoming: &KeyState,
    ) -> Result<Plan> {
        let Some(bytes) = stored else {
            return Ok(Plan {
                state: incoming.clone(),
                write: Some(incoming.encode_canonical()),
                old_hash: None,
                new_hash: incoming.state_hash(),
            });
        };
        let old = KeyState::decode(bytes).map_err(|e| corrupt_at(keyspace, key, e))?;
        let joined = old.join(incoming);
        let encoded = joined.encode_canonical();
        let old_hash = old.state_hash();
        let (write, new_hash) = if encoded.as_slice() == bytes {
            (None, old_hash)
        } else {
            let new_hash = joined.state_hash();
            (Some(encoded), new_hash)
        };
        Ok(Plan {
            state: joined,
            write,
            old_hash: Some(old_hash),
            new_hash,
        })
    }
}

impl Storage for SledStorage {
    fn read(&self, keyspace: &str, key: &[u8]) -> Result<Option<KeyState>> {
        let tree = self.data_tree(keyspace)?;
        let bytes = tree
            .get(storage_key(keyspace, key))
            .map_err(|e| engine_error("read", e))?;
        bytes
            .map(|bytes| KeyState::decode(&bytes).map_err(|e| corrupt_at(keyspace, key, e)))
            .transpose()
    }

    fn merge(
        &self,
        keyspace: &str,
        key: &[u8],
        incoming: &KeyState,
        aux: &[AuxWrite],
    ) -> Result<Merged> {
        let data = self.data_tree(keyspace)?;
        let skey = storage_key(keyspace, key);
        let _stripe = self.stripe(&skey);
        let stored = data.get(&skey).map_err(|e| engine_error("merge", e))?;
        let mut plan = Plan::new(keyspace, key, stored.as_deref(), incoming)?;
        let wrote = plan.write.is_some() || !aux.is_empty();
        // Read repair and anti-entropy mostly deliver states already stored. Such a merge
        // writes nothing, so it skips the transaction and sled's process-wide lock.
        if wrote {
            let at = (keyspace, key, skey.as_slice());
            plan = self.write_merge(&data, at, incoming, stored.as_deref(), plan, aux)?;
        }
        // Taken after the commit and under the stripe lock: see the module docs.
        let seq = if wrote {
            self.seq.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.seq.load(Ordering::SeqCst)
        };
        Ok(Merged {
            changed: plan.write.is_some(),
            state: plan.state,
            seq: WriteSeq(seq),
            old_hash: plan.old_hash,
            new_hash: plan.new_hash,
        })
    }

    fn flush(&self) -> Result<WriteSeq> {
        // Read before syncing: every write counted here committed before the sync starts.
        let seq = self.seq.load(Ordering::SeqCst);
        self.db.flush().map_err(|e| engine_error("flush", e))?;
        let before = self.durable.fetch_max(seq, Ordering::SeqCst);
        Ok(WriteSeq(before.max(seq)))
    }

    fn durable_seq(&self) -> WriteSeq {
        WriteSeq(self.durable.load(Ordering::SeqCst))
    }

    fn scan(&self, keyspace: &str, first: Token, last: Token) -> Result<Vec<StoredKey>> {
        if first > last {
            return Ok(Vec::new());
        }
        let tree = self.data_tree(keyspace)?;
        let (start, end) = scan_bounds(first, last);
        let entries = match end {
            Some(end) => tree.range(start..end),
            None => tree.range(start..),
        };
        entries
            .map(|entry| {
                let (skey, bytes) = entry.map_err(|e| engine_error("scan", e))?;
                decode_entry(keyspace, &skey, &bytes)
            })
            .collect()
    }

    fn aux(&self, table: AuxTable, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let value = self
            .aux_tree(table)
            .get(key)
            .map_err(|e| engine_error("aux read", e))?;
        Ok(value.map(|value| value.to_vec()))
    }

    fn incarnation(&self) -> Result<Option<IncarnationRecord>> {
        let bytes = self
            .meta
            .get(META_INCARNATION)
            .map_err(|e| engine_error("read incarnation", e))?;
        bytes
            .map(|bytes| super::decode_incarnation(&bytes))
            .transpose()
    }

    fn set_incarnation(&self, record: &IncarnationRecord) -> Result<()> {
        let bytes = super::encode_incarnation(record)?;
        self.meta
            .insert(META_INCARNATION, bytes)
            .map_err(|e| engine_error("write incarnation", e))?;
        // A node must never reuse an incarnation's counters, so the record is durable before
        // the node acts on it.
        self.flush()?;
        Ok(())
    }
}

/// Decodes one scanned entry, checking that its token is the key's.
fn decode_entry(keyspace: &str, skey: &[u8], bytes: &[u8]) -> Result<StoredKey> {
    let Some((token, key)) = split_storage_key(skey) else {
        return Err(Error::CorruptState {
            reason: format!(
                "keyspace {keyspace:?}: storage key {} is shorter than a token",
                key_for_display(skey)
            ),
        });
    };
    // A key filed under the wrong token would sit in the wrong range and Merkle bucket, where
    // anti-entropy could never reconcile it. One hash per scanned key is cheap beside decoding.
    let expected = Token::of(keyspace, key);
    if token != expected {
        return Err(Error::CorruptState {
            reason: format!(
                "keyspace {keyspace:?}, key {}: stored under token {token} but its token is \
                 {expected}",
                key_for_display(key)
            ),
        });
    }
    let state = KeyState::decode(bytes).map_err(|e| corrupt_at(keyspace, key, e))?;
    Ok(StoredKey {
        token,
        key: key.to_vec(),
        state,
    })
}

fn open_tree(db: &sled::Db, name: &str) -> Result<sled::Tree> {
    db.open_tree(name).map_err(|e| engine_error("open tree", e))
}

/// Checks the format marker, writing it into a new store.
fn check_format(db: &sled::Db, meta: &sled::Tree) -> Result<()> {
    let stored = meta.get(META_FORMAT).map_err(|e| engine_error("open", e))?;
    match stored {
        Some(bytes) => {
            let found = <[u8; 4]>::try_from(bytes.as_ref()).map_err(|_| Error::StorageCorrupt {
                operation: "open",
                reason: format!("format marker is {} bytes, expected 4", bytes.len()),
            })?;
            let found = u32::from_be_bytes(found);
            if found != FORMAT_VERSION {
                return Err(Error::StorageFormat {
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            Ok(())
        }
        None => {
            // No marker: either a new directory, or one whose marker was lost. Data without a
            // marker is of unknown format, so refuse it rather than guess.
            if let Some(name) = first_nonempty_tree(db)? {
                return Err(Error::StorageCorrupt {
                    operation: "open",
                    reason: format!("tree {name:?} holds data but the format marker is missing"),
                });
            }
            meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())
                .map_err(|e| engine_error("open", e))?;
            db.flush().map_err(|e| engine_error("open", e))?;
            Ok(())
        }
    }
}

/// The name of a tree other than `meta` that holds any entry, if one does.
fn first_nonempty_tree(db: &sled::Db) -> Result<Option<String>> {
    for name in db.tree_names() {
        let name = String::from_utf8_lossy(&name).into_owned();
        if name == META_TREE {
            continue;
        }
        let tree = open_tree(db, &name)?;
        if !tree.is_empty() {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// sled reports a directory locked by another instance as a plain I/O error with this text;
/// name the cause in words an operator recognises.
fn open_error(dir: &Path, error: sled::Error) -> Error {
    match &error {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            Error::Storage {
                operation: "open",
                reason: format!(
                    "data directory {} is in use by another instance ({io})",
                    dir.display()
                ),
            }
        }
        _ => engine_error("open", error),
    }
}

/// Classifies a sled error: I/O may pass, everything else is permanent.
pub(super) fn engine_error(operation: &'static str, error: sled::Error) -> Error {
    match error {
        sled::Error::Io(io) => Error::Storage {
            operation,
            reason: io.to_string(),
        },
        other => Error::StorageCorrupt {
            operation,
            reason: other.to_string(),
        },
    }
}
