//! Benchmarks of the anti-entropy Merkle trees at a million keys.
//!
//! Every benchmark uses one keyspace over 1,024 ranges (`range_bits` 10) at the default depth 2,
//! so a forest holds 1,024 trees of 256 buckets each. Keys are `key-{i}` for `i` in
//! `0..1_000_000` and key `i`'s state hash is `blake3(i as u64 LE)`, so every run sees the same
//! data.
//!
//! - `merkle_build/incremental_1m`: a forest from empty by one `update` per key, the way the
//!   storage merge function maintains it.
//! - `merkle_build/bulk_1m`: the same forest by `MerkleTree::from_items` per range, the way a
//!   rebuild from storage makes it (keys grouped by range beforehand, outside the timing).
//! - `merkle_update/change_one_key_1m`: one state change of one key in the 1M-key forest.
//! - `merkle_diff/forest_1m/{d}`: the diff of two whole forests (all 1,024 range trees compared,
//!   so even identical forests cost 1,024 root comparisons) with `d` keys whose state hash
//!   differs, spread evenly over the key space.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use quorumkv_node::merkle::{DiffStats, Geometry, Hash, MerkleForest, MerkleTree, DEFAULT_DEPTH};
use quorumkv_ring::Token;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

const KEYS: u64 = 1_000_000;
const RANGE_BITS: u8 = 10;
const KEYSPACE: &str = "default";

struct Item {
    token: Token,
    key: Vec<u8>,
    state: Hash,
}

fn geometry() -> Geometry {
    Geometry::new(RANGE_BITS, DEFAULT_DEPTH).expect("valid geometry")
}

fn items() -> Vec<Item> {
    (0..KEYS)
        .map(|i| {
            let key = format!("key-{i}").into_bytes();
            let token = Token::of(KEYSPACE, &key);
            Item {
                token,
                key,
                state: *blake3::hash(&i.to_le_bytes()).as_bytes(),
            }
        })
        .collect()
}

fn build_incremental(items: &[Item]) -> MerkleForest {
    let mut forest = MerkleForest::new(geometry());
    for item in items {
        forest
            .update(KEYSPACE, item.token, &item.key, None, Some(&item.state))
            .expect("insert");
    }
    forest
}

/// Items grouped by range, as a token-ordered storage scan would deliver them.
type ByRange<'a> = BTreeMap<u32, Vec<(Token, &'a [u8], Hash)>>;

fn by_range(items: &[Item]) -> ByRange<'_> {
    let g = geometry();
    let mut ranges = ByRange::new();
    for item in items {
        ranges
            .entry(g.range_of(item.token))
            .or_default()
            .push((item.token, &item.key, item.state));
    }
    ranges
}

fn build_bulk(ranges: &ByRange<'_>) -> MerkleForest {
    let g = geometry();
    let mut forest = MerkleForest::new(g);
    for (&range, range_items) in ranges {
        let tree = MerkleTree::from_items(g, range, range_items.iter().copied()).expect("build");
        forest.replace(KEYSPACE, tree).expect("same geometry");
    }
    forest
}

/// The state key `i` moves to when a benchmark changes it: one bit flipped.
fn changed(state: &Hash) -> Hash {
    let mut other = *state;
    other[0] ^= 1;
    other
}

fn bench_build(c: &mut Criterion) {
    let items = items();
    let ranges = by_range(&items);
    let mut group = c.benchmark_group("merkle_build");
    // Each iteration takes seconds: ten equal samples, and time enough to take them.
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(60));
    group.bench_function("incremental_1m", |b| {
        b.iter_with_large_drop(|| build_incremental(black_box(&items)))
    });
    group.bench_function("bulk_1m", |b| {
        b.iter_with_large_drop(|| build_bulk(black_box(&ranges)))
    });
    group.finish();
}

fn bench_update(c: &mut Criterion) {
    let items = items();
    let mut forest = build_bulk(&by_range(&items));
    let mut flipped = vec![false; items.len()];
    let mut next = 0usize;
    c.bench_function("merkle_update/change_one_key_1m", |b| {
        b.iter(|| {
            // Walk the keys with a large prime stride so successive updates hit different trees,
            // and flip each key between its two states so the forest stays the same size.
            let item = &items[next];
            let (original, other) = (item.state, changed(&item.state));
            let (old, new) = if flipped[next] {
                (other, original)
            } else {
                (original, other)
            };
            forest
                .update(KEYSPACE, item.token, &item.key, Some(&old), Some(&new))
                .expect("change");
            flipped[next] = !flipped[next];
            next = (next + 7_919) % items.len();
        })
    });
}

fn bench_diff(c: &mut Criterion) {
    let items = items();
    let base = build_bulk(&by_range(&items));
    let mut group = c.benchmark_group("merkle_diff");
    for differing in [0u64, 10, 1_000] {
        let mut other = base.clone();
        for j in 0..differing {
            let item = &items[(j * (KEYS / differing.max(1))) as usize];
            let new = changed(&item.state);
            other
                .update(
                    KEYSPACE,
                    item.token,
                    &item.key,
                    Some(&item.state),
                    Some(&new),
                )
                .expect("change");
        }
        let mut stats = DiffStats::default();
        let diffs = base.diff(&other, &mut stats).expect("same geometry");
        let buckets: usize = diffs.iter().map(|d| d.buckets.len()).sum();
        eprintln!(
            "merkle_diff/forest_1m/{differing}: {} node comparisons, {buckets} differing buckets",
            stats.comparisons
        );
        group.bench_with_input(
            BenchmarkId::new("forest_1m", differing),
            &other,
            |b, other| {
                b.iter(|| {
                    let mut stats = DiffStats::default();
                    black_box(
                        base.diff(black_box(other), &mut stats)
                            .expect("same geometry"),
                    )
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_build, bench_update, bench_diff);
criterion_main!(benches);
