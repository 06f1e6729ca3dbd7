//! The in-memory twin of the sled store, for tests and the deterministic simulation.
//!
//! # What it models
//!
//! A real disk holds two things at once: what the engine has accepted (visible to reads) and
//! what has reached stable storage (survives a power cut). [`MemoryStorage`] keeps both:
//!
//! - the **volatile** layer: everything written, which every read sees;
//! - the **durable** layer: what the last [`Storage::flush`] covered;
//! - the **pending** log: the writes between the two, in order.
//!
//! `flush` replays the pending log onto the durable layer. [`MemoryStorage::crash`] throws
//! the volatile layer away and restarts from the durable one: unflushed data, unflushed aux
//! records and sequence numbers past the durable one are lost, exactly as a node that lost
//! power would lose them. Because a merge's data and aux writes enter the pending log as one
//! entry, a crash loses both or neither, which is the atomicity the sled transaction gives.
//! The incarnation record is always durable: `set_incarnation` flushes, as on disk.
//!
//! The model is deliberately the *worst* case the trait allows: a real engine may make some
//! unflushed writes durable early (sled flushes in the background), never the reverse. A
//! replication protocol that is correct here does not depend on luck with the page cache.
//!
//! # Determinism
//!
//! Everything is in `BTreeMap`s, so scans and any iteration a caller does replay exactly for a
//! given seed. One `Mutex` serialises all calls; the simulation is single-threaded anyway, and
//! the lock is what makes merges of one key serialise under the threaded tests.
//!
//! # Cost
//!
//! Creating one is a few empty maps. Stored states are shared between the layers through `Arc`,
//! so a flush copies pointers, not states; only `crash` and [`MemoryStorage::clone_durable`]
//! copy maps, and they are rare.

use super::{scan_bounds, storage_key, AuxTable, AuxWrite, Merged, Storage, StoredKey, WriteSeq};
use crate::error::{Error, Result};
use crate::version_vector::{IncarnationRecord, KeyState};
use quorumkv_ring::Token;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A stored state with what merges compare and report, computed once when it is written.
#[derive(Debug)]
struct Stored {
    state: KeyState,
    /// `encode_canonical` of `state`: "changed" means these bytes changed, as on disk.
    canonical: Vec<u8>,
    hash: [u8; 32],
}

impl Stored {
    fn new(state: KeyState) -> Stored {
        let canonical = state.encode_canonical();
        let hash = state.state_hash();
        Stored {
            state,
            canonical,
            hash,
        }
    }
}

/// One consistent image of the store: the volatile view or the durable one.
#[derive(Clone, Debug, Default)]
struct Layer {
    /// keyspace -> storage key -> state. Storage keys sort by token, as in sled.
    data: BTreeMap<String, BTreeMap<Vec<u8>, Arc<Stored>>>,
    aux: BTreeMap<AuxTable, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// The sequence number of the last write this layer contains.
    seq: WriteSeq,
}

impl Layer {
    fn apply(&mut self, write: &PendingWrite) {
        match &write.data {
            Some((keyspace, skey, Some(stored))) => {
                self.data
                    .entry(keyspace.clone())
                    .or_default()
                    .insert(skey.clone(), Arc::clone(stored));
            }
            Some((keyspace, skey, None)) => {
                if let Some(space) = self.data.get_mut(keyspace) {
                    space.remove(skey);
                }
            }
            None => {}
        }
        for aux in &write.aux {
            self.apply_aux(aux);
        }
        self.seq = self.seq.max(write.seq);
    }

    fn apply_aux(&mut self, aux: &AuxWrite) {
        let table = self.aux.entry(aux.table).or_default();
        match &aux.value {
            Some(value) => {
                table.insert(aux.key.clone(), value.clone());
            }
            None => {
                table.remove(&aux.key);
            }
        }
    }
}

/// One merge's writes, kept together so that flush and crash treat them as one unit.
#[derive(Debug)]
struct PendingWrite {
    /// `(keyspace, storage key, state)` if the data changed; a state of `None` removes the key.
    data: Option<(String, Vec<u8>, Option<Arc<Stored>>)>,
    aux: Vec<AuxWrite>,
    /// The merge's sequence number.
    seq: WriteSeq,
}

#[derive(Debug, Default)]
struct Inner {
    volatile: Layer,
    durable: Layer,
    /// Writes in `volatile` but not yet in `durable`, oldest first.
    pending: Vec<PendingWrite>,
    /// rmp-serde bytes of the incarnation record; kept encoded so the codec is exercised as
    /// the sled store exercises it. Always durable, so there is one copy.
    incarnation: Option<Vec<u8>>,
    /// Set by [`MemoryStorage::fail`]: every operation fails with it, as sled does after an
    /// I/O error, until a restart ([`MemoryStorage::crash`]) reopens the store.
    failure: Option<String>,
}

impl Inner {
    fn flush(&mut self) -> WriteSeq {
        for write in self.pending.drain(..) {
            self.durable.apply(&write);
        }
        self.durable.seq = self.volatile.seq;
        self.durable.seq
    }

    /// The image a restart would find on disk.
    fn durable_image(&self) -> Inner {
        Inner {
            volatile: self.durable.clone(),
            durable: self.durable.clone(),
            pending: Vec::new(),
            incarnation: self.incarnation.clone(),
            failure: None,
        }
    }
}

/// Storage in memory with a model of durability; see the [module docs](self).
#[derive(Debug, Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    /// Simulates a failed disk: from now on every operation fails with an I/O error naming
    /// `reason`, as sled does after one, until [`MemoryStorage::crash`] (a restart) reopens it.
    pub fn fail(&self, reason: &str) {
        self.lock().failure = Some(reason.to_string());
    }

    /// Simulates a power cut and restart in place: everything not flushed is lost, and the
    /// sequence number falls back to the durable one.
    pub fn crash(&self) {
        let mut inner = self.lock();
        *inner = inner.durable_image();
    }

    /// A new store holding what this one would hold after a crash; this one is unchanged.
    /// The simulator uses it to restart a node on a "disk" while the old instance is still
    /// referenced by in-flight work that must not see the restarted state.
    pub fn clone_durable(&self) -> MemoryStorage {
        MemoryStorage {
            inner: Mutex::new(self.lock().durable_image()),
        }
    }

    /// The number of merges whose writes are not yet durable (for tests and simulation checks).
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// A poisoned lock means another thread panicked inside a call. Every call mutates the
    /// state only after its last fallible step, so the state is still consistent: carry on
    /// rather than turn one panic into a panic in every later caller.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MemoryStorage {
    fn check_failure(&self, operation: &'static str) -> Result<()> {
        match &self.lock().failure {
            Some(reason) => Err(Error::Storage {
                operation,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl Storage for MemoryStorage {
    fn read(&self, keyspace: &str, key: &[u8]) -> Result<Option<KeyState>> {
        self.check_failure("read")?;
        let inner = self.lock();
        let stored = inner
            .volatile
            .data
            .get(keyspace)
            .and_then(|space| space.get(&storage_key(keyspace, key)));
        Ok(stored.map(|stored| stored.state.clone()))
    }

    fn merge(
        &self,
        keyspace: &str,
        key: &[u8],
        incoming: &KeyState,
        aux: &[AuxWrite],
    ) -> Result<Merged> {
        self.check_failure("merge")?;
        let skey = storage_key(keyspace, key);
        let mut inner = self.lock();
        let current = inner
            .volatile
            .data
            .get(keyspace)
            .and_then(|space| space.get(&skey))
            .cloned();

        let (merged, data) = match &current {
            Some(old) => {
                let joined = Stored::new(old.state.join(incoming));
                if joined.canonical == old.canonical {
                    (Arc::clone(old), None)
                } else {
                    let joined = Arc::new(joined);
                    (Arc::clone(&joined), Some(joined))
                }
            }
            None => {
                let stored = Arc::new(Stored::new(incoming.clone()));
                (Arc::clone(&stored), Some(stored))
            }
        };
        let changed = data.is_some();
        if !changed && aux.is_empty() {
            // Nothing to write, so nothing to lose in a crash: no pending entry.
            return Ok(unchanged(&merged, inner.volatile.seq));
        }

        // Aux-only writes take a sequence number too: a caller waiting for durability of its
        // hint must not be told "durable" by a flush that began before the hint was written.
        let seq = WriteSeq(inner.volatile.seq.0 + 1);
        let write = PendingWrite {
            data: data.map(|stored| (keyspace.to_owned(), skey, Some(stored))),
            aux: aux.to_vec(),
            seq,
        };
        inner.volatile.apply(&write);
        inner.pending.push(write);
        Ok(Merged {
            state: merged.state.clone(),
            changed,
            seq,
            old_hash: current.map(|old| old.hash),
            new_hash: merged.hash,
        })
    }

    fn remove_if(
        &self,
        keyspace: &str,
        key: &[u8],
        expected: &[u8; 32],
    ) -> Result<Option<WriteSeq>> {
        self.check_failure("remove")?;
        let skey = storage_key(keyspace, key);
        let mut inner = self.lock();
        let held = inner
            .volatile
            .data
            .get(keyspace)
            .and_then(|space| space.get(&skey))
            .is_some_and(|stored| stored.hash == *expected);
        if !held {
            return Ok(None);
        }
        let seq = WriteSeq(inner.volatile.seq.0 + 1);
        let write = PendingWrite {
            data: Some((keyspace.to_owned(), skey, None)),
            aux: Vec::new(),
            seq,
        };
        inner.volatile.apply(&write);
        inner.pending.push(write);
        Ok(Some(seq))
    }

    fn latest_seq(&self) -> WriteSeq {
        self.lock().volatile.seq
    }

    fn flush(&self) -> Result<WriteSeq> {
        self.check_failure("flush")?;
        Ok(self.lock().flush())
    }

    fn durable_seq(&self) -> WriteSeq {
        self.lock().durable.seq
    }

    fn scan(&self, keyspace: &str, first: Token, last: Token) -> Result<Vec<StoredKey>> {
        self.check_failure("scan")?;
        if first > last {
            return Ok(Vec::new());
        }
        let inner = self.lock();
        let Some(space) = inner.volatile.data.get(keyspace) else {
            return Ok(Vec::new());
        };
        let (start, end) = scan_bounds(first, last);
        let end = end.map_or(Bound::Unbounded, Bound::Excluded);
        space
            .range::<Vec<u8>, _>((Bound::Included(start), end))
            .map(|(skey, stored)| {
                let (token, key) = super::split_storage_key(skey).ok_or_else(|| {
                    // Unreachable through `merge`, which only writes full storage keys; kept an
                    // error so the two engines fail alike.
                    Error::CorruptState {
                        reason: format!(
                            "keyspace {keyspace:?}: storage key {} is shorter than a token",
                            super::key_for_display(skey)
                        ),
                    }
                })?;
                Ok(StoredKey {
                    token,
                    key: key.to_vec(),
                    state: stored.state.clone(),
                })
            })
            .collect()
    }

    fn aux(&self, table: AuxTable, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_failure("aux read")?;
        let inner = self.lock();
        Ok(inner
            .volatile
            .aux
            .get(&table)
            .and_then(|records| records.get(key))
            .cloned())
    }

    fn write_aux(&self, aux: &[AuxWrite]) -> Result<WriteSeq> {
        self.check_failure("aux write")?;
        let mut inner = self.lock();
        if aux.is_empty() {
            return Ok(inner.volatile.seq);
        }
        let seq = WriteSeq(inner.volatile.seq.0 + 1);
        let write = PendingWrite {
            data: None,
            aux: aux.to_vec(),
            seq,
        };
        inner.volatile.apply(&write);
        inner.pending.push(write);
        Ok(seq)
    }

    fn aux_scan(
        &self,
        table: AuxTable,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.check_failure("aux scan")?;
        let inner = self.lock();
        let Some(records) = inner.volatile.aux.get(&table) else {
            return Ok(Vec::new());
        };
        let start = match after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(records
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    fn incarnation(&self) -> Result<Option<IncarnationRecord>> {
        let inner = self.lock();
        inner
            .incarnation
            .as_deref()
            .map(super::decode_incarnation)
            .transpose()
    }

    fn set_incarnation(&self, record: &IncarnationRecord) -> Result<()> {
        self.check_failure("write incarnation")?;
        let bytes = super::encode_incarnation(record)?;
        let mut inner = self.lock();
        inner.incarnation = Some(bytes);
        // On disk the record is made durable by a flush of the whole engine, which takes every
        // earlier write with it; model that, so the two engines lose the same things.
        inner.flush();
        Ok(())
    }
}

fn unchanged(stored: &Stored, seq: WriteSeq) -> Merged {
    Merged {
        state: stored.state.clone(),
        changed: false,
        seq,
        old_hash: Some(stored.hash),
        new_hash: stored.hash,
    }
}
