//! Tests of both storage engines: a model test that runs random operations (including reopen)
//! against each engine and a plain map of joined states, and the promises each engine makes on
//! its own (durability, atomicity of aux writes, sequence numbers, on-disk safety checks).

use super::memory::MemoryStorage;
use super::sled_store::{
    engine_error, Plan, SledOptions, SledStorage, FORMAT_VERSION, SEGMENT_BYTES,
};
use super::*;
use crate::version_vector::{Actor, CausalContext, Dot, RequestId};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const KEYSPACES: [&str; 2] = ["alpha", "beta"];
/// Keys per keyspace in the model test: few, so that operations often meet on one key.
const KEYS: u8 = 4;

/// Small, so a test opens sled quickly and a model test runs many cases.
fn sled_options() -> SledOptions {
    SledOptions {
        cache_bytes: 4 * 1024 * 1024,
    }
}

fn open_sled(dir: &Path) -> SledStorage {
    try_open_sled(dir).unwrap()
}

fn try_open_sled(dir: &Path) -> Result<SledStorage> {
    wait_for_lock(|| SledStorage::open(dir, sled_options()))
}

/// sled opened directly, to plant bytes the engine would never write.
fn raw_sled(dir: &Path) -> sled::Db {
    wait_for_lock(|| {
        sled::Config::new()
            .path(dir)
            .segment_size(SEGMENT_BYTES)
            .open()
    })
    .unwrap()
}

/// sled releases a directory's lock from background threads after its last handle drops, so an
/// open right after a close in the same process can find the lock still held (sled's own tests
/// block on the lock for this reason). Waits for the lock with a generous deadline; any other
/// outcome returns at once.
fn wait_for_lock<T, E: std::fmt::Display>(
    mut open: impl FnMut() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match open() {
            Err(e) if e.to_string().contains("acquire lock") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

fn key_bytes(index: u8) -> Vec<u8> {
    vec![b'k', index]
}

/// The payload of a dot, a function of the dot alone: two generated states that both hold a dot
/// agree on what it wrote, as real replicas do. Values come from a four-letter alphabet, and
/// one dot in five is a delete.
fn payload(dot: Dot) -> (RequestId, u64, Option<Vec<u8>>) {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&dot.actor.0.to_be_bytes());
    id[8..].copy_from_slice(&dot.counter.to_be_bytes());
    let value = match (dot.actor.0 * 7 + dot.counter) % 5 {
        0 => None,
        _ => Some(vec![b'a' + ((dot.actor.0 + dot.counter) % 4) as u8]),
    };
    (RequestId(id), 1_000 + dot.counter, value)
}

/// One write of a generated history: at `actor`, `skip` counters past the state's last dot of
/// that actor (other keys used them), by a writer that had seen the dots in `seen`.
#[derive(Clone, Debug)]
struct Step {
    actor: u64,
    skip: u64,
    seen: Vec<(u64, u64)>,
}

/// A key state built through the version-vector API, as coordinators build them.
fn build_state(steps: &[Step]) -> KeyState {
    let mut state = KeyState::new();
    for step in steps {
        let actor = Actor(step.actor);
        let counter = state.context().max_counter(actor) + 1 + step.skip;
        // A client context never claims a dot of the coordinating actor at or past the new one.
        let seen = step
            .seen
            .iter()
            .filter(|&&(a, c)| a != step.actor || c < counter)
            .map(|&(a, c)| Dot::new(Actor(a), c));
        let dot = Dot::new(actor, counter);
        let (id, timestamp_ms, value) = payload(dot);
        state
            .update(
                &CausalContext::from_dots(seen),
                dot,
                id,
                timestamp_ms,
                value,
            )
            .unwrap();
    }
    state
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (1u64..=3, 0u64..2, vec((1u64..=3, 1u64..=6), 0..3)).prop_map(|(actor, skip, seen)| Step {
        actor,
        skip,
        seen,
    })
}

fn state_strategy() -> impl Strategy<Value = KeyState> {
    vec(step_strategy(), 1..4).prop_map(|steps| build_state(&steps))
}

fn aux_strategy() -> impl Strategy<Value = AuxWrite> {
    (any::<bool>(), 0u8..4, proptest::option::of(0u8..4)).prop_map(|(hints, key, value)| AuxWrite {
        table: if hints {
            AuxTable::Hints
        } else {
            AuxTable::MerkleDirty
        },
        key: vec![key],
        value: value.map(|v| vec![v]),
    })
}

/// A scan bound: a raw token, or near the token of one of the generated keys, so that scans
/// cut between keys instead of almost always covering all or none of them.
#[derive(Clone, Debug)]
enum TokenChoice {
    Raw(u64),
    NearKey(u8, i8),
}

impl TokenChoice {
    fn resolve(&self, keyspace: &str) -> Token {
        match *self {
            TokenChoice::Raw(token) => Token(token),
            TokenChoice::NearKey(key, offset) => Token(
                Token::of(keyspace, &key_bytes(key))
                    .0
                    .wrapping_add_signed(i64::from(offset)),
            ),
        }
    }
}

fn token_choice() -> impl Strategy<Value = TokenChoice> {
    prop_oneof![
        any::<u64>().prop_map(TokenChoice::Raw),
        Just(TokenChoice::Raw(0)),
        Just(TokenChoice::Raw(u64::MAX)),
        (0..KEYS, -1i8..=1).prop_map(|(key, offset)| TokenChoice::NearKey(key, offset)),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Merge {
        keyspace: usize,
        key: u8,
        state: KeyState,
        aux: Vec<AuxWrite>,
    },
    /// Merges the state the model holds for the key (or an empty one): a redelivery, as read
    /// repair and anti-entropy do all the time. It must change nothing.
    Redeliver {
        keyspace: usize,
        key: u8,
        aux: Vec<AuxWrite>,
    },
    Read {
        keyspace: usize,
        key: u8,
    },
    Scan {
        keyspace: usize,
        first: TokenChoice,
        last: TokenChoice,
    },
    Aux {
        table: AuxTable,
        key: u8,
    },
    Flush,
    /// Memory: flush, then crash (which must lose nothing). Sled: drop and open the directory.
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYSPACES.len(), 0..KEYS, state_strategy(), vec(aux_strategy(), 0..3))
            .prop_map(|(keyspace, key, state, aux)| Op::Merge { keyspace, key, state, aux }),
        2 => (0..KEYSPACES.len(), 0..KEYS, vec(aux_strategy(), 0..2))
            .prop_map(|(keyspace, key, aux)| Op::Redeliver { keyspace, key, aux }),
        3 => (0..KEYSPACES.len(), 0..KEYS).prop_map(|(keyspace, key)| Op::Read { keyspace, key }),
        2 => (0..KEYSPACES.len(), token_choice(), token_choice())
            .prop_map(|(keyspace, first, last)| Op::Scan { keyspace, first, last }),
        1 => (any::<bool>(), 0u8..4).prop_map(|(hints, key)| Op::Aux {
            table: if hints { AuxTable::Hints } else { AuxTable::MerkleDirty },
            key,
        }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// What storage should hold: joined states and aux records, with no engine in between.
#[derive(Debug, Default)]
struct Model {
    data: BTreeMap<(String, Vec<u8>), KeyState>,
    aux: BTreeMap<(AuxTable, Vec<u8>), Vec<u8>>,
}

impl Model {
    /// Returns the state before and after, and whether the stored bytes change.
    fn merge(
        &mut self,
        keyspace: &str,
        key: &[u8],
        incoming: &KeyState,
        aux: &[AuxWrite],
    ) -> (Option<KeyState>, KeyState, bool) {
        let slot = (keyspace.to_owned(), key.to_vec());
        let old = self.data.get(&slot).cloned();
        let new = old
            .as_ref()
            .map_or_else(|| incoming.clone(), |old| old.join(incoming));
        let changed = old
            .as_ref()
            .is_none_or(|old| old.encode_canonical() != new.encode_canonical());
        self.data.insert(slot, new.clone());
        for write in aux {
            let slot = (write.table, write.key.clone());
            match &write.value {
                Some(value) => self.aux.insert(slot, value.clone()),
                None => self.aux.remove(&slot),
            };
        }
        (old, new, changed)
    }

    fn scan(&self, keyspace: &str, first: Token, last: Token) -> Vec<(Token, Vec<u8>, KeyState)> {
        let mut out: Vec<_> = self
            .data
            .iter()
            .filter(|((space, _), _)| space == keyspace)
            .map(|((_, key), state)| (Token::of(keyspace, key), key.clone(), state.clone()))
            .filter(|(token, _, _)| first <= *token && *token <= last)
            .collect();
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out
    }
}

/// Both engines and the model, run in lockstep.
struct Harness {
    model: Model,
    memory: MemoryStorage,
    sled: Option<SledStorage>,
    dir: TempDir,
    /// The latest sequence number each engine handed out (memory, sled).
    last_seq: [WriteSeq; 2],
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Harness {
            model: Model::default(),
            memory: MemoryStorage::new(),
            sled: Some(open_sled(dir.path())),
            dir,
            last_seq: [WriteSeq(0); 2],
        }
    }

    fn engines(&self) -> [(&'static str, &dyn Storage); 2] {
        let sled = self.sled.as_ref().expect("sled is open between steps");
        [("memory", &self.memory), ("sled", sled)]
    }

    /// Merges into both engines and the model and compares every field of the result; returns
    /// whether the data changed.
    fn merge(
        &mut self,
        keyspace: &str,
        key: &[u8],
        state: &KeyState,
        aux: &[AuxWrite],
    ) -> Result<bool, TestCaseError> {
        let (old, new, changed) = self.model.merge(keyspace, key, state, aux);
        let wrote = changed || !aux.is_empty();
        let mut last_seq = self.last_seq;
        for (i, (name, engine)) in self.engines().into_iter().enumerate() {
            let merged = engine.merge(keyspace, key, state, aux).unwrap();
            prop_assert_eq!(&merged.state, &new, "{}: merged state", name);
            prop_assert_eq!(merged.changed, changed, "{}: changed", name);
            prop_assert_eq!(merged.new_hash, new.state_hash(), "{}: new hash", name);
            prop_assert_eq!(
                merged.old_hash,
                old.as_ref().map(KeyState::state_hash),
                "{}: old hash",
                name
            );
            if wrote {
                prop_assert!(
                    merged.seq > last_seq[i],
                    "{}: a write takes a new seq",
                    name
                );
            } else {
                prop_assert_eq!(merged.seq, last_seq[i], "{}: no write, latest seq", name);
            }
            last_seq[i] = merged.seq;
        }
        self.last_seq = last_seq;
        Ok(changed)
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Merge {
                keyspace,
                key,
                state,
                aux,
            } => {
                self.merge(KEYSPACES[*keyspace], &key_bytes(*key), state, aux)?;
            }
            Op::Redeliver { keyspace, key, aux } => {
                let keyspace = KEYSPACES[*keyspace];
                let key = key_bytes(*key);
                let slot = (keyspace.to_owned(), key.clone());
                let state = self.model.data.get(&slot).cloned().unwrap_or_default();
                let present = self.model.data.contains_key(&slot);
                let changed = self.merge(keyspace, &key, &state, aux)?;
                prop_assert_eq!(changed, !present, "a redelivery changes nothing");
            }
            Op::Read { keyspace, key } => {
                let keyspace = KEYSPACES[*keyspace];
                let key = key_bytes(*key);
                let expected = self.model.data.get(&(keyspace.to_owned(), key.clone()));
                for (name, engine) in self.engines() {
                    let read = engine.read(keyspace, &key).unwrap();
                    prop_assert_eq!(read.as_ref(), expected, "{}: read", name);
                }
            }
            Op::Scan {
                keyspace,
                first,
                last,
            } => {
                let keyspace = KEYSPACES[*keyspace];
                // Ordered: reversed bounds are always empty (tested on their own below), and
                // would waste half the scans.
                let (a, b) = (first.resolve(keyspace), last.resolve(keyspace));
                let (first, last) = (a.min(b), a.max(b));
                let expected = self.model.scan(keyspace, first, last);
                for (name, engine) in self.engines() {
                    let scanned: Vec<_> = engine
                        .scan(keyspace, first, last)
                        .unwrap()
                        .into_iter()
                        .map(|stored| (stored.token, stored.key, stored.state))
                        .collect();
                    prop_assert_eq!(&scanned, &expected, "{}: scan", name);
                }
            }
            Op::Aux { table, key } => {
                let expected = self.model.aux.get(&(*table, vec![*key]));
                for (name, engine) in self.engines() {
                    let value = engine.aux(*table, &[*key]).unwrap();
                    prop_assert_eq!(value.as_ref(), expected, "{}: aux", name);
                }
            }
            Op::Flush => {
                let last_seq = self.last_seq;
                for (i, (name, engine)) in self.engines().into_iter().enumerate() {
                    let flushed = engine.flush().unwrap();
                    prop_assert_eq!(flushed, last_seq[i], "{}: flush covers every write", name);
                    prop_assert_eq!(engine.durable_seq(), flushed, "{}: durable seq", name);
                }
            }
            Op::Reopen => {
                self.memory.flush().unwrap();
                self.memory.crash();
                prop_assert_eq!(self.memory.pending_writes(), 0);
                prop_assert_eq!(self.memory.durable_seq(), self.last_seq[0]);
                // A clean close: sled flushes when its last handle drops, so nothing is lost.
                drop(self.sled.take());
                self.sled = Some(open_sled(self.dir.path()));
                // Sequence numbers belong to one open instance; a new one starts from zero.
                self.last_seq[1] = WriteSeq(0);
            }
        }
        Ok(())
    }

    /// After the run: every key the model holds reads back from both engines.
    fn check_everything(&self) -> Result<(), TestCaseError> {
        for ((keyspace, key), state) in &self.model.data {
            for (name, engine) in self.engines() {
                let read = engine.read(keyspace, key).unwrap();
                prop_assert_eq!(read.as_ref(), Some(state), "{}: final read", name);
            }
        }
        for keyspace in KEYSPACES {
            let all = self.model.scan(keyspace, Token(0), Token(u64::MAX));
            for (name, engine) in self.engines() {
                let scanned = engine.scan(keyspace, Token(0), Token(u64::MAX)).unwrap();
                prop_assert_eq!(scanned.len(), all.len(), "{}: full scan", name);
            }
        }
        Ok(())
    }
}

/// Case count: a modest default, more with `PROPTEST_CASES` (as the README says).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// Random merges, reads, scans, aux reads, flushes and reopens give the same answers from
    /// the memory engine, the sled engine and a plain map of joined states.
    #[test]
    fn engines_agree_with_the_model(ops in vec(op_strategy(), 1..50)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.step(op)?;
        }
        harness.check_everything()?;
    }

    /// The join laws hold through storage: merging states in any order stores the same bytes.
    #[test]
    fn merge_order_does_not_matter(states in vec(state_strategy(), 1..6)) {
        let forward = MemoryStorage::new();
        let backward = MemoryStorage::new();
        for state in &states {
            forward.merge("alpha", b"k", state, &[]).unwrap();
        }
        for state in states.iter().rev() {
            backward.merge("alpha", b"k", state, &[]).unwrap();
        }
        let forward = forward.read("alpha", b"k").unwrap().unwrap();
        let backward = backward.read("alpha", b"k").unwrap().unwrap();
        prop_assert_eq!(forward.encode_canonical(), backward.encode_canonical());
    }
}

// --- contracts both engines keep ---

/// Runs `check` against a fresh memory engine and a fresh sled engine.
fn on_both_engines(check: impl Fn(&dyn Storage)) {
    check(&MemoryStorage::new());
    let dir = tempfile::tempdir().unwrap();
    check(&open_sled(dir.path()));
}

fn sample_state(actor: u64, writes: u64) -> KeyState {
    let steps: Vec<Step> = (0..writes)
        .map(|_| Step {
            actor,
            skip: 0,
            seen: Vec::new(),
        })
        .collect();
    build_state(&steps)
}

#[test]
fn merging_the_same_state_twice_changes_nothing_the_second_time() {
    on_both_engines(|storage| {
        let state = sample_state(1, 2);
        let first = storage.merge("alpha", b"k", &state, &[]).unwrap();
        assert!(first.changed);
        assert_eq!(first.old_hash, None);
        assert_eq!(first.new_hash, state.state_hash());

        let second = storage.merge("alpha", b"k", &state, &[]).unwrap();
        assert!(!second.changed);
        assert_eq!(second.seq, first.seq);
        assert_eq!(second.old_hash, Some(first.new_hash));
        assert_eq!(second.new_hash, first.new_hash);
        assert_eq!(storage.read("alpha", b"k").unwrap(), Some(state));
    });
}

#[test]
fn concurrent_merges_into_one_key_converge_to_the_join_of_all() {
    const THREADS: u64 = 4;
    const WRITES: u64 = 25;
    // Thread t writes at actor t+1: each write replaces its own previous one (the writer read
    // it) and now and then also claims to have seen other actors' early dots, so the final state
    // mixes siblings from every thread with some of them replaced.
    let histories: Vec<Vec<KeyState>> = (0..THREADS)
        .map(|t| {
            let mut steps = Vec::new();
            (0..WRITES)
                .map(|i| {
                    let seen = if i % 5 == 4 {
                        (1..=THREADS).map(|a| (a, 1 + i / 5)).collect()
                    } else {
                        Vec::new()
                    };
                    steps.push(Step {
                        actor: t + 1,
                        skip: i % 2,
                        seen,
                    });
                    build_state(&steps)
                })
                .collect()
        })
        .collect();
    let expected = histories
        .iter()
        .flatten()
        .fold(KeyState::new(), |acc, state| acc.join(state));

    on_both_engines(|storage| {
        let seqs: Vec<Vec<WriteSeq>> = std::thread::scope(|scope| {
            let workers: Vec<_> = histories
                .iter()
                .map(|history| {
                    scope.spawn(move || {
                        history
                            .iter()
                            .map(|state| storage.merge("alpha", b"hot", state, &[]).unwrap())
                            .filter(|merged| merged.changed)
                            .map(|merged| merged.seq)
                            .collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert_eq!(
            storage.read("alpha", b"hot").unwrap(),
            Some(expected.clone())
        );

        // Every write took its own sequence number, and a flush covers all of them.
        let all: Vec<WriteSeq> = seqs.into_iter().flatten().collect();
        let distinct: BTreeSet<WriteSeq> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len());
        let highest = distinct.last().copied().unwrap_or_default();
        assert!(storage.flush().unwrap() >= highest);
    });
}

#[test]
fn sequence_numbers_count_writes_and_flush_reports_the_latest() {
    on_both_engines(|storage| {
        assert_eq!(storage.durable_seq(), WriteSeq(0));
        for (i, key) in [b"a", b"b", b"c"].into_iter().enumerate() {
            let merged = storage
                .merge("alpha", key, &sample_state(1, 1), &[])
                .unwrap();
            assert_eq!(merged.seq, WriteSeq(i as u64 + 1));
        }
        assert_eq!(storage.durable_seq(), WriteSeq(0), "nothing flushed yet");
        assert_eq!(storage.flush().unwrap(), WriteSeq(3));
        assert_eq!(storage.durable_seq(), WriteSeq(3));

        // No change and no aux: nothing written, the latest seq is reported.
        let same = storage
            .merge("alpha", b"a", &sample_state(1, 1), &[])
            .unwrap();
        assert_eq!((same.changed, same.seq), (false, WriteSeq(3)));

        // No change but an aux write: that is a write, with its own seq.
        let hint = AuxWrite {
            table: AuxTable::Hints,
            key: b"h".to_vec(),
            value: Some(b"v".to_vec()),
        };
        let aux_only = storage
            .merge("alpha", b"a", &sample_state(1, 1), &[hint])
            .unwrap();
        assert_eq!((aux_only.changed, aux_only.seq), (false, WriteSeq(4)));
        assert_eq!(storage.flush().unwrap(), WriteSeq(4));
    });
}

#[test]
fn scan_returns_keys_in_token_order_within_the_range_only() {
    on_both_engines(|storage| {
        let mut keys: Vec<(Token, Vec<u8>)> = (0u8..40)
            .map(|i| {
                let key = key_bytes(i);
                (Token::of("alpha", &key), key)
            })
            .collect();
        for (_, key) in &keys {
            storage
                .merge("alpha", key, &sample_state(1, 1), &[])
                .unwrap();
        }
        // Another keyspace's keys must not show up.
        storage
            .merge("beta", b"other", &sample_state(1, 1), &[])
            .unwrap();
        keys.sort();

        let scan = |first: Token, last: Token| -> Vec<(Token, Vec<u8>)> {
            let found = storage.scan("alpha", first, last).unwrap();
            found.into_iter().map(|s| (s.token, s.key)).collect()
        };
        // Inclusive at both ends, cut exactly at keys' tokens.
        let (lo, hi) = (10, 30);
        assert_eq!(scan(keys[lo].0, keys[hi].0), keys[lo..=hi].to_vec());
        // One past either end excludes that key.
        let inner = scan(Token(keys[lo].0 .0 + 1), Token(keys[hi].0 .0 - 1));
        assert_eq!(inner, keys[lo + 1..hi].to_vec());
        // A single token, and the whole ring (whose end has no successor token).
        assert_eq!(scan(keys[lo].0, keys[lo].0), vec![keys[lo].clone()]);
        assert_eq!(scan(Token(0), Token(u64::MAX)), keys);
        // Reversed bounds are an empty scan, not a wrap-around.
        assert!(scan(keys[hi].0, keys[lo].0).is_empty());
        assert!(storage
            .scan("gamma", Token(0), Token(u64::MAX))
            .unwrap()
            .is_empty());
    });
}

#[test]
fn storage_keys_sort_by_token_and_keep_colliding_keys_apart() {
    let low = storage_key_with_token(Token(1), b"zzzz");
    let high = storage_key_with_token(Token(2), b"a");
    assert!(low < high, "the token decides the order, not the key");
    assert!(storage_key_with_token(Token(0x0100), b"") > storage_key_with_token(Token(0xff), b""));

    // Two keys with one token: distinct storage keys, ordered by key, and each splits back.
    let first = storage_key_with_token(Token(7), b"apple");
    let second = storage_key_with_token(Token(7), b"apples");
    assert_ne!(first, second);
    assert!(first < second);
    assert_eq!(split_storage_key(&first), Some((Token(7), &b"apple"[..])));
    assert_eq!(split_storage_key(&second), Some((Token(7), &b"apples"[..])));
    // Both fall inside a scan of exactly that token.
    let (start, end) = scan_bounds(Token(7), Token(7));
    let end = end.unwrap();
    assert!(start <= first && second < end);

    assert_eq!(
        storage_key("alpha", b"k"),
        storage_key_with_token(Token::of("alpha", b"k"), b"k")
    );
    assert_eq!(split_storage_key(&[1, 2, 3]), None);
    assert_eq!(split_storage_key(&[0; 8]), Some((Token(0), &b""[..])));
    assert_eq!(scan_bounds(Token(5), Token(u64::MAX)).1, None);
}

// --- the memory engine's model of durability ---

fn hint(key: &[u8], value: &[u8]) -> AuxWrite {
    AuxWrite {
        table: AuxTable::Hints,
        key: key.to_vec(),
        value: Some(value.to_vec()),
    }
}

#[test]
fn memory_crash_loses_exactly_the_unflushed_writes() {
    let storage = MemoryStorage::new();
    let kept = sample_state(1, 1);
    storage.merge("alpha", b"kept", &kept, &[]).unwrap();
    storage.merge("alpha", b"updated", &kept, &[]).unwrap();
    assert_eq!(storage.flush().unwrap(), WriteSeq(2));

    let newer = sample_state(1, 2);
    storage.merge("alpha", b"updated", &newer, &[]).unwrap();
    storage.merge("alpha", b"lost", &newer, &[]).unwrap();
    storage.merge("beta", b"lost", &newer, &[]).unwrap();
    assert_eq!(storage.pending_writes(), 3);

    storage.crash();
    assert_eq!(storage.read("alpha", b"kept").unwrap(), Some(kept.clone()));
    assert_eq!(
        storage.read("alpha", b"updated").unwrap(),
        Some(kept.clone())
    );
    assert_eq!(storage.read("alpha", b"lost").unwrap(), None);
    assert_eq!(storage.read("beta", b"lost").unwrap(), None);
    assert_eq!(storage.pending_writes(), 0);
    assert_eq!(storage.durable_seq(), WriteSeq(2));

    // Sequence numbers continue from the durable one.
    let merged = storage.merge("alpha", b"again", &newer, &[]).unwrap();
    assert_eq!(merged.seq, WriteSeq(3));
}

#[test]
fn memory_aux_writes_are_lost_or_kept_together_with_their_data() {
    let storage = MemoryStorage::new();
    storage
        .merge(
            "alpha",
            b"flushed",
            &sample_state(1, 1),
            &[hint(b"h1", b"one")],
        )
        .unwrap();
    storage.flush().unwrap();
    storage
        .merge(
            "alpha",
            b"unflushed",
            &sample_state(2, 1),
            &[hint(b"h2", b"two")],
        )
        .unwrap();
    // An aux-only write (the data does not change) is just as volatile.
    storage
        .merge(
            "alpha",
            b"flushed",
            &sample_state(1, 1),
            &[hint(b"h3", b"three")],
        )
        .unwrap();
    assert_eq!(
        storage.aux(AuxTable::Hints, b"h2").unwrap(),
        Some(b"two".to_vec())
    );

    storage.crash();
    assert!(storage.read("alpha", b"flushed").unwrap().is_some());
    assert_eq!(
        storage.aux(AuxTable::Hints, b"h1").unwrap(),
        Some(b"one".to_vec())
    );
    assert_eq!(storage.read("alpha", b"unflushed").unwrap(), None);
    assert_eq!(storage.aux(AuxTable::Hints, b"h2").unwrap(), None);
    assert_eq!(storage.aux(AuxTable::Hints, b"h3").unwrap(), None);
    // The tables are separate.
    assert_eq!(storage.aux(AuxTable::MerkleDirty, b"h1").unwrap(), None);
}

#[test]
fn memory_incarnation_is_durable_at_once_and_takes_earlier_writes_with_it() {
    let storage = MemoryStorage::new();
    assert_eq!(storage.incarnation().unwrap(), None);
    storage
        .merge("alpha", b"k", &sample_state(1, 1), &[])
        .unwrap();
    let record = IncarnationRecord {
        actor: Actor(42),
        clean_shutdown: false,
    };
    storage.set_incarnation(&record).unwrap();
    assert_eq!(storage.durable_seq(), WriteSeq(1));
    storage.crash();
    assert_eq!(storage.incarnation().unwrap(), Some(record));
    assert!(storage.read("alpha", b"k").unwrap().is_some());
}

#[test]
fn memory_clone_durable_leaves_the_original_alone() {
    let storage = MemoryStorage::new();
    storage
        .merge("alpha", b"flushed", &sample_state(1, 1), &[])
        .unwrap();
    storage.flush().unwrap();
    storage
        .merge("alpha", b"volatile", &sample_state(1, 1), &[])
        .unwrap();

    let restarted = storage.clone_durable();
    assert!(restarted.read("alpha", b"flushed").unwrap().is_some());
    assert_eq!(restarted.read("alpha", b"volatile").unwrap(), None);
    assert!(storage.read("alpha", b"volatile").unwrap().is_some());
    assert_eq!(storage.pending_writes(), 1);
}

// --- the sled engine on disk ---

#[test]
fn sled_writes_the_format_marker_and_refuses_another_version() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_sled(dir.path()));
    {
        let db = raw_sled(dir.path());
        let meta = db.open_tree("meta").unwrap();
        let marker = meta.get(b"format").unwrap().unwrap();
        assert_eq!(marker.as_ref(), &FORMAT_VERSION.to_be_bytes());
        meta.insert(b"format", &(FORMAT_VERSION + 1).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = try_open_sled(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StorageFormat {
                found,
                supported: FORMAT_VERSION
            } if found == FORMAT_VERSION + 1
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[test]
fn sled_flush_syncs_the_blob_files_of_states_too_large_for_the_log() {
    // A state above sled's blob threshold (a quarter of SEGMENT_BYTES) lives in its own file,
    // which sled never syncs; the flush must, and the state must read back after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let big = vec![b'x'; SEGMENT_BYTES / 4 + 1024];
    let mut state = KeyState::new();
    let dot = Dot::new(Actor(9), 1);
    state
        .update(&CausalContext::new(), dot, RequestId([9; 16]), 1, Some(big))
        .unwrap();
    {
        let storage = open_sled(dir.path());
        storage.merge("alpha", b"big", &state, &[]).unwrap();
        storage.flush().unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert!(blobs >= 1, "the state was expected to go to a blob file");
        assert_eq!(storage.synced_blob_count(), blobs);
    }
    let storage = open_sled(dir.path());
    assert_eq!(storage.read("alpha", b"big").unwrap(), Some(state));
}

#[test]
fn sled_refuses_a_format_1_directory_by_name() {
    // Format 1 used sled's default log segments; sled itself refuses the directory before the
    // marker can be read, and the error must still say "format", not "corrupt".
    let dir = tempfile::tempdir().unwrap();
    {
        let db = wait_for_lock(|| sled::open(dir.path())).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"format", &1u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = try_open_sled(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::StorageFormat { found: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn sled_refuses_a_malformed_marker_and_data_without_one() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_sled(dir.path()));
    {
        let db = raw_sled(dir.path());
        db.open_tree("meta")
            .unwrap()
            .insert(b"format", &[0, 1])
            .unwrap();
        db.flush().unwrap();
    }
    let err = try_open_sled(dir.path()).unwrap_err();
    assert!(matches!(err, Error::StorageCorrupt { .. }), "{err:?}");

    let dir = tempfile::tempdir().unwrap();
    {
        let db = raw_sled(dir.path());
        db.open_tree("data/alpha")
            .unwrap()
            .insert(b"somekey!", b"x")
            .unwrap();
        db.flush().unwrap();
    }
    let err = try_open_sled(dir.path()).unwrap_err();
    assert!(matches!(err, Error::StorageCorrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("data/alpha"), "{err}");
}

/// Replaces the stored bytes of one key behind the engine's back.
fn overwrite_raw(dir: &Path, tree: &str, raw_key: &[u8], value: &[u8]) {
    let db = raw_sled(dir);
    db.open_tree(tree).unwrap().insert(raw_key, value).unwrap();
    db.flush().unwrap();
}

#[test]
fn sled_corrupt_bytes_are_an_error_naming_the_key_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = open_sled(dir.path());
        storage
            .merge("alpha", b"good", &sample_state(1, 1), &[])
            .unwrap();
        storage
            .merge("alpha", b"bad", &sample_state(1, 1), &[])
            .unwrap();
    }
    overwrite_raw(
        dir.path(),
        "data/alpha",
        &storage_key("alpha", b"bad"),
        b"\x01garbage",
    );
    let storage = open_sled(dir.path());

    let err = storage.read("alpha", b"bad").unwrap_err();
    assert!(matches!(err, Error::CorruptState { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains("626164"),
        "names the key in hex: {message}"
    );
    assert!(message.contains("alpha"), "names the keyspace: {message}");

    // A merge fails the same way and writes nothing, not even its aux records.
    let err = storage
        .merge("alpha", b"bad", &sample_state(2, 1), &[hint(b"h", b"v")])
        .unwrap_err();
    assert!(err.to_string().contains("626164"), "{err}");
    assert_eq!(storage.aux(AuxTable::Hints, b"h").unwrap(), None);
    assert_eq!(storage.flush().unwrap(), WriteSeq(0));

    // A scan over it fails; the other key is still readable on its own.
    assert!(storage.scan("alpha", Token(0), Token(u64::MAX)).is_err());
    assert_eq!(
        storage.read("alpha", b"good").unwrap(),
        Some(sample_state(1, 1))
    );
}

#[test]
fn sled_scan_rejects_a_key_filed_under_the_wrong_token() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_sled(dir.path()));
    let wrong = Token(Token::of("alpha", b"moved").0 ^ 1);
    let state = sample_state(1, 1).encode_canonical();
    overwrite_raw(
        dir.path(),
        "data/alpha",
        &storage_key_with_token(wrong, b"moved"),
        &state,
    );

    let storage = open_sled(dir.path());
    let err = storage
        .scan("alpha", Token(0), Token(u64::MAX))
        .unwrap_err();
    assert!(matches!(err, Error::CorruptState { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&key_for_display(b"moved")),
        "{err}"
    );
}

#[test]
fn sled_incarnation_and_data_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let record = IncarnationRecord {
        actor: Actor(0xfeed),
        clean_shutdown: true,
    };
    {
        let storage = open_sled(dir.path());
        assert_eq!(storage.incarnation().unwrap(), None);
        storage.set_incarnation(&record).unwrap();
        storage
            .merge("alpha", b"k", &sample_state(1, 2), &[hint(b"h", b"v")])
            .unwrap();
    }
    let storage = open_sled(dir.path());
    assert_eq!(storage.incarnation().unwrap(), Some(record));
    assert_eq!(
        storage.read("alpha", b"k").unwrap(),
        Some(sample_state(1, 2))
    );
    assert_eq!(
        storage.aux(AuxTable::Hints, b"h").unwrap(),
        Some(b"v".to_vec())
    );
}

#[test]
fn sled_corrupt_incarnation_record_is_a_permanent_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_sled(dir.path()));
    overwrite_raw(dir.path(), "meta", b"incarnation", b"\xc1not msgpack");
    let err = open_sled(dir.path()).incarnation().unwrap_err();
    assert!(matches!(err, Error::StorageCorrupt { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[test]
fn sled_io_failures_are_retryable_and_engine_corruption_is_not() {
    let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device");
    let err = engine_error("flush", sled::Error::Io(full));
    assert!(
        matches!(
            err,
            Error::Storage {
                operation: "flush",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("no space left"), "{err}");

    let err = engine_error("read", sled::Error::Unsupported("odd config".to_owned()));
    assert!(matches!(err, Error::StorageCorrupt { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[test]
fn sled_refuses_a_directory_another_instance_holds() {
    let dir = tempfile::tempdir().unwrap();
    let _held = open_sled(dir.path());
    let err = SledStorage::open(dir.path(), sled_options()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Storage {
                operation: "open",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn sled_merge_transaction_replans_when_the_stored_bytes_moved_under_its_plan() {
    // `merge` plans outside the transaction; the transaction must not write a plan made from
    // bytes that are no longer there. Plan as if the key were absent, after it was written.
    let dir = tempfile::tempdir().unwrap();
    let storage = open_sled(dir.path());
    let stored = sample_state(1, 2);
    storage.merge("alpha", b"k", &stored, &[]).unwrap();

    let incoming = sample_state(2, 1);
    let stale = Plan::new("alpha", b"k", None, &incoming).unwrap();
    let tree = storage.data_tree("alpha").unwrap();
    let at = ("alpha", &b"k"[..], storage_key("alpha", b"k"));
    storage
        .write_merge(&tree, (at.0, at.1, &at.2), &incoming, None, stale, &[])
        .unwrap();
    assert_eq!(
        storage.read("alpha", b"k").unwrap(),
        Some(stored.join(&incoming))
    );
}

/// `write_aux` and `aux_scan` behave alike in both engines: atomic aux-only writes with their
/// own sequence number, and prefix scans in key order that page with `after` and `limit`.
#[test]
fn aux_only_writes_and_prefix_scans_agree_across_engines() {
    let dir = TempDir::new().unwrap();
    let sled = open_sled(dir.path());
    let memory = MemoryStorage::new();
    let engines: [&dyn Storage; 2] = [&sled, &memory];
    for storage in engines {
        let before = storage.flush().unwrap();
        let seq = storage
            .write_aux(&[
                hint(b"a/1", b"x"),
                hint(b"a/2", b"y"),
                hint(b"b/1", b"z"),
                hint(b"a/3", b"w"),
            ])
            .unwrap();
        assert!(
            seq > before,
            "an aux-only write takes a new sequence number"
        );
        let all = storage.aux_scan(AuxTable::Hints, b"a/", None, 10).unwrap();
        let keys: Vec<&[u8]> = all.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"a/1"[..], b"a/2", b"a/3"]);
        let page = storage
            .aux_scan(AuxTable::Hints, b"a/", Some(b"a/1"), 1)
            .unwrap();
        assert_eq!(page, [(b"a/2".to_vec(), b"y".to_vec())]);
        // A later write to the same key in one call wins; None deletes.
        storage
            .write_aux(&[
                hint(b"a/2", b"first"),
                hint(b"a/2", b"second"),
                AuxWrite {
                    table: AuxTable::Hints,
                    key: b"a/1".to_vec(),
                    value: None,
                },
            ])
            .unwrap();
        let all = storage.aux_scan(AuxTable::Hints, b"a/", None, 10).unwrap();
        assert_eq!(
            all,
            [
                (b"a/2".to_vec(), b"second".to_vec()),
                (b"a/3".to_vec(), b"w".to_vec())
            ]
        );
        assert!(storage
            .aux_scan(AuxTable::MerkleDirty, b"", None, 10)
            .unwrap()
            .is_empty());
        assert!(storage.flush().unwrap() >= seq);
    }
    // Unflushed aux-only writes are lost in a crash, like any write.
    memory.write_aux(&[hint(b"c/1", b"volatile")]).unwrap();
    memory.crash();
    assert_eq!(memory.aux(AuxTable::Hints, b"c/1").unwrap(), None);
    assert_eq!(
        memory.aux(AuxTable::Hints, b"a/3").unwrap(),
        Some(b"w".to_vec())
    );
}

#[test]
fn remove_if_removes_only_the_state_it_was_shown() {
    on_both_engines(|storage| {
        let old = sample_state(1, 1);
        let newer = sample_state(1, 2);
        let first = storage.merge("alpha", b"k", &old, &[]).unwrap();
        storage.merge("alpha", b"other", &old, &[]).unwrap();
        assert_eq!(storage.latest_seq(), WriteSeq(first.seq.0 + 1));
        // A write arrived since the caller looked: the key stays.
        storage.merge("alpha", b"k", &newer, &[]).unwrap();
        assert_eq!(
            storage.remove_if("alpha", b"k", &old.state_hash()).unwrap(),
            None
        );
        assert_eq!(storage.read("alpha", b"k").unwrap(), Some(newer.clone()));
        let before = storage.latest_seq();
        let removed = storage
            .remove_if("alpha", b"k", &newer.state_hash())
            .unwrap()
            .expect("the key held exactly that state");
        assert!(removed > before, "a removal takes a sequence number");
        assert_eq!(storage.latest_seq(), removed);
        assert_eq!(storage.read("alpha", b"k").unwrap(), None);
        let all = storage.scan("alpha", Token(0), Token(u64::MAX)).unwrap();
        assert_eq!(all.len(), 1, "only the other key is left");
        // Absent keys and unknown keyspaces: nothing to remove, nothing written.
        assert_eq!(
            storage
                .remove_if("alpha", b"k", &newer.state_hash())
                .unwrap(),
            None
        );
        assert_eq!(
            storage
                .remove_if("beta", b"k", &newer.state_hash())
                .unwrap(),
            None
        );
        assert_eq!(storage.latest_seq(), removed);
        // The key can be written again afterwards.
        storage.merge("alpha", b"k", &old, &[]).unwrap();
        assert_eq!(storage.read("alpha", b"k").unwrap(), Some(old.clone()));
    });
}

#[test]
fn memory_crash_undoes_an_unflushed_removal_and_keeps_a_flushed_one() {
    let storage = MemoryStorage::new();
    let state = sample_state(1, 1);
    storage.merge("alpha", b"a", &state, &[]).unwrap();
    storage.merge("alpha", b"b", &state, &[]).unwrap();
    storage.flush().unwrap();
    storage
        .remove_if("alpha", b"a", &state.state_hash())
        .unwrap();
    storage.flush().unwrap();
    storage
        .remove_if("alpha", b"b", &state.state_hash())
        .unwrap();
    storage.crash();
    assert_eq!(storage.read("alpha", b"a").unwrap(), None);
    assert_eq!(storage.read("alpha", b"b").unwrap(), Some(state));
}
