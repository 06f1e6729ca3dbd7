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
//! writes, it is done: nothing is written.
//!
//! A merge that changes only the key (every client write and replica write) stores the new
//! bytes with one `compare_and_swap` against the bytes it planned from. A single-key write is
//! atomic in sled, and the compare means a stale plan can never overwrite a state it did not
//! join: if the bytes moved (a write that bypassed `merge`), the merge re-plans from what is
//! there. This path takes no process-wide lock and writes no extra log records.
//!
//! A merge with aux records (hints) runs one multi-tree sled transaction over the keyspace's
//! tree and the aux trees that re-reads the key, checks the bytes are the ones it planned from
//! (re-planning if not), writes the new bytes and the aux records. sled seals a transaction's
//! writes into one log batch, so a crash keeps all of them or none. That atomicity costs: see
//! the caveats below, which is why it is kept off the common path.
//!
//! The stripe lock is also what lets an unchanged merge report a sequence number covering the
//! write it found (see the durability rule in [`super`]).
//!
//! # Durability
//!
//! `flush` reads the sequence counter first, then makes everything written so far durable;
//! every merge counted had committed before the read, so the sync covers it. Making writes
//! durable takes two steps, because sled's own flush stops short of stable storage:
//!
//! 1. `Db::flush` writes sled's in-memory log buffer to the log file (`<dir>/db`). sled 0.34
//!    finishes each log write with `sync_file_range`, which pushes the pages to the device but
//!    neither flushes the device's volatile write cache nor persists file metadata, so after a
//!    power cut the "flushed" log can be gone.
//! 2. [`SledStorage`] then calls `fdatasync` on the log file, and `fsync` on every blob file
//!    sled wrote (values too large to sit inline in the log live in `<dir>/blobs/<lsn>`, which
//!    sled never syncs) and on the `blobs` directory, so their names survive too.
//!
//! Only then does `flush` report the sequence number durable. The store opens sled with
//! [`SEGMENT_BYTES`]-byte log segments, which puts sled's blob threshold (a quarter segment)
//! above any key state the frame limits allow, so blobs are an exception and the blob scan is
//! normally one empty `readdir`. A test traces the node's system calls and checks that every
//! durable acknowledgement follows an `fdatasync` of the log.
//!
//! sled also flushes in the background (every 500 ms, ending with an `fsync`), which can only
//! make writes durable earlier than reported, never later.
//!
//! # Caveats of sled 0.34 that shape this code
//!
//! - Transactions and batches take a process-wide write lock: all of them in the process, on
//!   every `Db`, run one at a time, and once any has run, plain reads and writes take that
//!   lock's read side. Each transaction also seals sled's log buffer and writes it out twice
//!   (measured: two `pwrite` + `sync_file_range` pairs per transaction, about 66 µs per merge
//!   against about 6 µs for a plain insert on the machine of BENCHMARKS.md). So client and
//!   replica writes never use one; the decode and join happen before any transaction, which
//!   only re-reads and writes, and a merge with nothing to write skips it.
//! - The transaction closure may run more than once (on a conflict), so it only computes from
//!   what it reads and returns the result; the sequence number is taken after the commit.
//! - Non-transactional writes inside a transaction closure deadlock on that lock; the closure
//!   writes only through its transactional views.
//! - After an I/O error while writing its log (ENOSPC, say), sled refuses all further work until
//!   reopened: it keeps the error and returns it from every later write and flush, and from a
//!   read that must rewrite a page (`tests/tests/cluster_disk_full.rs` fills a tmpfs to see it).
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
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

/// The on-disk format this code reads and writes. Bump it with any change to the layout or the
/// value encodings, and teach `open` to migrate or refuse.
pub const FORMAT_VERSION: u32 = 2;

/// How many locks serialise merges; merges of keys on different stripes run in parallel (up to
/// sled's own transaction lock).
pub const MERGE_STRIPES: usize = 64;

/// sled's log segment (and in-memory log buffer) size. sled stores an item out of line, in a
/// blob file, when it exceeds a quarter of a segment; 8 MiB segments put that threshold at
/// 2 MiB, above any key state a node accepts with the default frame limits, so the log file
/// holds (and one `fdatasync` covers) nearly everything. sled refuses to reopen a directory
/// with another segment size, which is why it is a constant of the format.
pub const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

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
    /// The files sled's flush leaves unsynced.
    sync: SyncFiles,
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
            .segment_size(SEGMENT_BYTES)
            .open()
            .map_err(|e| open_error(dir, e))?;
        let sync = SyncFiles::open(dir)?;
        let meta = open_tree(&db, META_TREE)?;
        check_format(&db, &meta, &sync)?;
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
            sync,
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

    /// How many of sled's blob files the last flush found synced (for tests).
    #[cfg(test)]
    pub(super) fn synced_blob_count(&self) -> usize {
        self.sync
            .synced_blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
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
        let mut stored = data.get(&skey).map_err(|e| engine_error("merge", e))?;
        let mut plan = Plan::new(keyspace, key, stored.as_deref(), incoming)?;
        let wrote = plan.write.is_some() || !aux.is_empty();
        // Read repair and anti-entropy mostly deliver states already stored. Such a merge
        // writes nothing at all.
        if !aux.is_empty() {
            let at = (keyspace, key, skey.as_slice());
            plan = self.write_merge(&data, at, incoming, stored.as_deref(), plan, aux)?;
        } else {
            // The common path: one atomic compare-and-swap of the key, re-planned if the bytes
            // moved since they were read (see the module docs).
            while let Some(bytes) = &plan.write {
                let swapped = data
                    .compare_and_swap(&skey, stored.as_deref(), Some(bytes.as_slice()))
                    .map_err(|e| engine_error("merge", e))?;
                match swapped {
                    Ok(()) => break,
                    Err(moved) => {
                        stored = moved.current;
                        plan = Plan::new(keyspace, key, stored.as_deref(), incoming)?;
                    }
                }
            }
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

    fn remove_if(
        &self,
        keyspace: &str,
        key: &[u8],
        expected: &[u8; 32],
    ) -> Result<Option<WriteSeq>> {
        let data = self.data_tree(keyspace)?;
        let skey = storage_key(keyspace, key);
        let _stripe = self.stripe(&skey);
        let Some(bytes) = data.get(&skey).map_err(|e| engine_error("remove", e))? else {
            return Ok(None);
        };
        let state = KeyState::decode(&bytes).map_err(|e| corrupt_at(keyspace, key, e))?;
        if state.state_hash() != *expected {
            return Ok(None);
        }
        // The stripe lock keeps merges of this key out; the compare keeps anything else out.
        let swapped = data
            .compare_and_swap(&skey, Some(bytes), None as Option<&[u8]>)
            .map_err(|e| engine_error("remove", e))?;
        if swapped.is_err() {
            return Ok(None);
        }
        // Taken after the commit and under the stripe lock, as a merge's.
        Ok(Some(WriteSeq(self.seq.fetch_add(1, Ordering::SeqCst) + 1)))
    }

    fn latest_seq(&self) -> WriteSeq {
        WriteSeq(self.seq.load(Ordering::SeqCst))
    }

    fn flush(&self) -> Result<WriteSeq> {
        // Read before syncing: every write counted here committed before the sync starts.
        let seq = self.seq.load(Ordering::SeqCst);
        self.db.flush().map_err(|e| engine_error("flush", e))?;
        self.sync.sync().map_err(|e| Error::Storage {
            operation: "flush",
            reason: e.to_string(),
        })?;
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

    fn write_aux(&self, aux: &[AuxWrite]) -> Result<WriteSeq> {
        if aux.is_empty() {
            return Ok(WriteSeq(self.seq.load(Ordering::SeqCst)));
        }
        let table = aux[0].table;
        if aux.iter().all(|write| write.table == table) {
            // One tree: a batch is atomic and takes no transaction lock.
            let mut batch = sled::Batch::default();
            for write in aux {
                match &write.value {
                    Some(value) => batch.insert(write.key.as_slice(), value.as_slice()),
                    None => batch.remove(write.key.as_slice()),
                }
            }
            self.aux_tree(table)
                .apply_batch(batch)
                .map_err(|e| engine_error("aux write", e))?;
        } else {
            let result = (&self.hints, &self.merkle_dirty).transaction(|(hints, dirty)| {
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
                Ok::<(), ConflictableTransactionError<Error>>(())
            });
            match result {
                Ok(()) => {}
                Err(TransactionError::Abort(error)) => return Err(error),
                Err(TransactionError::Storage(error)) => {
                    return Err(engine_error("aux write", error))
                }
            }
        }
        // Taken after the commit: see the module docs.
        Ok(WriteSeq(self.seq.fetch_add(1, Ordering::SeqCst) + 1))
    }

    fn aux_scan(
        &self,
        table: AuxTable,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let tree = self.aux_tree(table);
        let entries = match after {
            Some(after) => tree.range((
                std::ops::Bound::Excluded(after.to_vec()),
                std::ops::Bound::Unbounded,
            )),
            None => tree.range(prefix.to_vec()..),
        };
        let mut out = Vec::new();
        for entry in entries {
            let (key, value) = entry.map_err(|e| engine_error("aux scan", e))?;
            if !key.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
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

/// Decodes one scanned entry (storage key and stored bytes), checking that its token is the
/// key's. Public so that the fuzz targets (`node/tests/fuzz_decoders.rs`) can reach it.
pub fn decode_entry(keyspace: &str, skey: &[u8], bytes: &[u8]) -> Result<StoredKey> {
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

/// The files that sled writes but does not make durable, and how to sync them.
#[derive(Debug)]
struct SyncFiles {
    /// sled's log file, `<dir>/db`, opened once. `fdatasync` acts on the file, not on the
    /// descriptor, so our own handle syncs what sled wrote through its handle.
    log: std::fs::File,
    blobs: PathBuf,
    /// Blob files already synced. Blob names are log sequence numbers, but concurrent writers
    /// can create them out of order, so "everything above the last one seen" would miss a
    /// late small number; a set of names is exact. Pruned to the names still on disk.
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl SyncFiles {
    /// Opens the log file and syncs the directory, so the files sled created at its first
    /// open (the log, its configuration, the blob directory) have durable names.
    fn open(dir: &Path) -> Result<SyncFiles> {
        let failed = |what: &str, e: std::io::Error| Error::Storage {
            operation: "open",
            reason: format!("{what} in {}: {e}", dir.display()),
        };
        let log = std::fs::File::open(dir.join("db")).map_err(|e| failed("opening the log", e))?;
        for file in ["db", "conf"] {
            let path = dir.join(file);
            if path.exists() {
                sync_path(&path).map_err(|e| failed("syncing sled's files", e))?;
            }
        }
        sync_path(dir).map_err(|e| failed("syncing the data directory", e))?;
        Ok(SyncFiles {
            log,
            blobs: dir.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
        })
    }

    /// Makes everything sled has written durable: the log, new blob files, and their names.
    fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let mut synced = self
            .synced_blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut new_blob = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                match sync_path(&self.blobs.join(&name)) {
                    Ok(()) => new_blob = true,
                    // sled removed it meanwhile (its segment was reclaimed): nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            present.insert(name);
        }
        if new_blob {
            sync_path(&self.blobs)?;
        }
        *synced = present;
        Ok(())
    }
}

/// `fsync` of a file or directory by path.
fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Checks the format marker, writing it into a new store.
fn check_format(db: &sled::Db, meta: &sled::Tree, sync: &SyncFiles) -> Result<()> {
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
            sync.sync().map_err(|e| Error::Storage {
                operation: "open",
                reason: e.to_string(),
            })?;
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
        // Format 1 used sled's default 512 KiB segments, and sled refuses a directory made
        // with another segment size before our format marker can be read.
        sled::Error::Unsupported(reason) if reason.contains("io buffer size") => {
            Error::StorageFormat {
                found: 1,
                supported: FORMAT_VERSION,
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
