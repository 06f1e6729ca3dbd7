//! Tests of the Merkle core: the tree's algebra, the geometry's arithmetic, the wire level and
//! the diff's exactness and cost.

use super::*;
use crate::Error;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use quorumkv_ring::Token;
use std::collections::{BTreeMap, BTreeSet};

const KS: &str = "users";

fn state(i: u64) -> Hash {
    *blake3::hash(&i.to_le_bytes()).as_bytes()
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

fn geometry(range_bits: u8, depth: u8) -> Geometry {
    Geometry::new(range_bits, depth).unwrap()
}

/// A tree over the whole ring (no range bits), so every token belongs to it.
fn ring_tree(depth: u8) -> MerkleTree {
    MerkleTree::new(geometry(0, depth), 0).unwrap()
}

fn insert(tree: &mut MerkleTree, i: u64) {
    let k = key(i);
    tree.update(Token::of(KS, &k), &k, None, Some(&state(i)))
        .unwrap();
}

fn remove(tree: &mut MerkleTree, i: u64) {
    let k = key(i);
    tree.update(Token::of(KS, &k), &k, Some(&state(i)), None)
        .unwrap();
}

/// `n` keys with their tokens and states, for `from_items`.
fn items(n: u64) -> Vec<(Token, Vec<u8>, Hash)> {
    (0..n)
        .map(|i| (Token::of(KS, &key(i)), key(i), state(i)))
        .collect()
}

fn is_level_error<T: std::fmt::Debug>(result: crate::Result<T>) -> bool {
    matches!(result, Err(Error::InvalidMerkleLevel { .. }))
}

// --- geometry ---

#[test]
fn geometry_rejects_shapes_that_do_not_fit() {
    for (range_bits, depth) in [(17, 2), (0, 0), (10, 0), (0, 9), (16, 9), (255, 255)] {
        assert!(
            matches!(
                Geometry::new(range_bits, depth),
                Err(Error::InvalidMerkleGeometry { .. })
            ),
            "range_bits {range_bits}, depth {depth} must be rejected"
        );
    }
    for (range_bits, depth) in [(0, 1), (10, 2), (16, 8), (0, 8)] {
        let g = geometry(range_bits, depth);
        assert_eq!(g.range_count(), 1 << range_bits);
        assert_eq!(g.bucket_count(), 1 << (4 * depth));
    }
}

#[test]
fn bucket_token_bounds_agree_with_bucket_of() {
    let samples: Vec<Token> = (0..200u64)
        .map(|i| Token::of("bounds", &i.to_le_bytes()))
        .chain([
            Token(0),
            Token(u64::MAX),
            Token(1 << 63),
            Token((1 << 63) - 1),
        ])
        .collect();
    for (range_bits, depth) in [(0, 1), (0, 2), (4, 3), (10, 2), (16, 8), (0, 8), (16, 1)] {
        let g = geometry(range_bits, depth);
        for &token in &samples {
            let (range, bucket) = (g.range_of(token), g.bucket_of(token));
            let (low, high) = g.bucket_token_bounds(range, bucket).unwrap();
            assert!(
                low <= token && token <= high,
                "{token} outside its bucket {low}..={high}"
            );
            for end in [low, high] {
                assert_eq!((g.range_of(end), g.bucket_of(end)), (range, bucket));
            }
            // The neighbours just outside the bounds belong to another bucket or range.
            if let Some(before) = low.0.checked_sub(1).map(Token) {
                assert_ne!((g.range_of(before), g.bucket_of(before)), (range, bucket));
            }
            if let Some(after) = high.0.checked_add(1).map(Token) {
                assert_ne!((g.range_of(after), g.bucket_of(after)), (range, bucket));
            }
            let (range_low, range_high) = g.range_token_bounds(range).unwrap();
            assert!(range_low <= low && high <= range_high);
            assert_eq!(g.range_of(range_low), range);
            assert_eq!(g.range_of(range_high), range);
        }
    }
    // The buckets of a range tile it: the first starts the range, the last ends it.
    let g = geometry(10, 2);
    let (range_low, range_high) = g.range_token_bounds(7).unwrap();
    assert_eq!(g.bucket_token_bounds(7, 0).unwrap().0, range_low);
    assert_eq!(g.bucket_token_bounds(7, 255).unwrap().1, range_high);
    assert!(is_level_error(g.bucket_token_bounds(7, 256)));
    assert!(g.bucket_token_bounds(1024, 0).is_err());
    let whole = geometry(0, 1).range_token_bounds(0).unwrap();
    assert_eq!(whole, (Token(0), Token(u64::MAX)));
}

// --- the tree's algebra ---

#[test]
fn an_empty_tree_has_the_empty_root() {
    let tree = ring_tree(2);
    assert_eq!(tree.root(), EMPTY);
    assert_eq!((tree.leaf_count(), tree.key_count()), (0, 0));
    assert_eq!(tree.level(0, &[]).unwrap().entries, vec![]);
}

#[test]
fn inserting_then_removing_every_key_returns_to_the_empty_root() {
    for depth in [1, 2, 3] {
        let mut tree = ring_tree(depth);
        for i in 0..2_000 {
            insert(&mut tree, i);
        }
        assert_ne!(tree.root(), EMPTY);
        assert_eq!(tree.key_count(), 2_000);
        tree.check_invariants();
        // Remove in a different order from the inserts.
        for i in (0..2_000).rev() {
            remove(&mut tree, i);
        }
        assert_eq!(tree.root(), EMPTY);
        assert_eq!((tree.leaf_count(), tree.key_count()), (0, 0));
        tree.check_invariants();
        for level in 1..=depth {
            let all_parents: Vec<u32> = (0..16u32.pow(u32::from(level) - 1)).collect();
            assert!(
                tree.level(level, &all_parents).unwrap().entries.is_empty(),
                "sparse again"
            );
        }
    }
}

#[test]
fn the_root_does_not_depend_on_insertion_order() {
    let n = 3_000u64;
    let mut forward = ring_tree(2);
    let mut backward = ring_tree(2);
    let mut strided = ring_tree(2);
    for i in 0..n {
        insert(&mut forward, i);
        insert(&mut backward, n - 1 - i);
        // 7 is coprime to 3000, so this visits every key once in a scrambled order.
        insert(&mut strided, (i * 7) % n);
    }
    let bulk = MerkleTree::from_items(geometry(0, 2), 0, items(n)).unwrap();
    for other in [&backward, &strided, &bulk] {
        assert_eq!(forward.root(), other.root());
        assert_eq!(
            forward.diff(other, &mut DiffStats::default()).unwrap(),
            Vec::<u32>::new()
        );
    }
    bulk.check_invariants();
    assert_eq!(bulk.key_count(), n);
}

#[test]
fn changing_a_state_changes_the_root_and_changing_it_back_restores_it() {
    let mut tree = ring_tree(2);
    for i in 0..500 {
        insert(&mut tree, i);
    }
    let before = tree.root();
    let k = key(42);
    let token = Token::of(KS, &k);
    tree.update(token, &k, Some(&state(42)), Some(&state(1_000_042)))
        .unwrap();
    assert_ne!(tree.root(), before);
    assert_eq!(tree.key_count(), 500, "a change is not an insert");
    tree.check_invariants();
    tree.update(token, &k, Some(&state(1_000_042)), Some(&state(42)))
        .unwrap();
    assert_eq!(tree.root(), before);
    // Rewriting the same state is an idempotent merge: nothing changes.
    tree.update(token, &k, Some(&state(42)), Some(&state(42)))
        .unwrap();
    assert_eq!(tree.root(), before);
}

#[test]
fn bad_updates_are_rejected_and_change_nothing() {
    let mut tree = MerkleTree::new(geometry(4, 2), 3).unwrap();
    // Removing from an empty bucket: the caller's `old` cannot be right.
    let token = Token(3 << 60);
    let err = tree.update(token, b"k", Some(&state(1)), None);
    assert!(matches!(err, Err(Error::InvalidMerkleUpdate { .. })));
    // A token of another range.
    let err = tree.update(Token(4 << 60), b"k", None, Some(&state(1)));
    assert!(matches!(err, Err(Error::InvalidMerkleUpdate { .. })));
    assert_eq!(
        (tree.root(), tree.leaf_count(), tree.key_count()),
        (EMPTY, 0, 0)
    );
    assert!(MerkleTree::new(geometry(4, 2), 16).is_err());
    assert!(MerkleTree::from_items(geometry(4, 2), 3, [(Token(0), b"k", state(1))]).is_err());
}

#[test]
fn a_wrong_old_hash_corrupts_the_bucket_until_a_rebuild() {
    let g = geometry(0, 2);
    let mut tree = ring_tree(2);
    for i in 0..1_000 {
        insert(&mut tree, i);
    }
    let k = key(7);
    let token = Token::of(KS, &k);
    // The caller lies about the old state: the tree cannot tell.
    tree.update(token, &k, Some(&state(999_999)), Some(&state(8)))
        .unwrap();
    let truth = (0..1_000).map(|i| {
        (
            Token::of(KS, &key(i)),
            key(i),
            state(if i == 7 { 8 } else { i }),
        )
    });
    let rebuilt = MerkleTree::from_items(g, 0, truth).unwrap();
    let diff = tree.diff(&rebuilt, &mut DiffStats::default()).unwrap();
    assert_eq!(
        diff,
        vec![g.bucket_of(token)],
        "exactly the damaged bucket shows up"
    );
    // The rebuild from storage is the cure.
    let mut forest = MerkleForest::new(g);
    forest.replace(KS, rebuilt.clone()).unwrap();
    assert_eq!(forest.root(KS, 0), rebuilt.root());
}

// --- levels ---

#[test]
fn levels_answer_requests_for_children() {
    let mut tree = ring_tree(2);
    for i in 0..300 {
        insert(&mut tree, i);
    }
    assert_eq!(tree.level(0, &[]).unwrap().entries, vec![(0, tree.root())]);
    let level1 = tree.level(1, &[0]).unwrap();
    assert_eq!(level1.level, 1);
    assert_eq!(
        level1.entries.len(),
        16,
        "300 keys reach every level-1 node"
    );
    level1.validate_reply(&tree.geometry(), 1, &[0]).unwrap();
    let leaves = tree.level(2, &[5, 3, 5]).unwrap();
    leaves.validate_reply(&tree.geometry(), 2, &[3, 5]).unwrap();
    assert!(leaves
        .entries
        .iter()
        .all(|(i, _)| i >> 4 == 3 || i >> 4 == 5));
    assert!(
        leaves.entries.windows(2).all(|w| w[0].0 < w[1].0),
        "sorted despite the request"
    );
    assert!(is_level_error(tree.level(3, &[0])));
    assert!(is_level_error(tree.level(2, &[16])));
    assert!(is_level_error(tree.level(1, &[1])));
}

#[test]
fn a_level_round_trips_through_messagepack_compactly() {
    let mut tree = ring_tree(2);
    for i in 0..300 {
        insert(&mut tree, i);
    }
    let level = tree.level(2, &[0, 1, 2]).unwrap();
    let bytes = rmp_serde::to_vec(&level).unwrap();
    let back: Level = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, level);
    back.validate(&tree.geometry()).unwrap();
    // About 36 bytes a node: index, binary-string header and the 32 hash bytes, no field names.
    assert!(
        bytes.len() <= 4 + level.entries.len() * 38,
        "{} bytes",
        bytes.len()
    );
}

#[test]
fn malformed_levels_are_rejected() {
    let g = geometry(0, 2);
    let h = [7u8; 32];
    let bad = [
        Level {
            level: 3,
            entries: vec![],
        },
        Level {
            level: 0,
            entries: vec![(1, h)],
        },
        Level {
            level: 1,
            entries: vec![(16, h)],
        },
        Level {
            level: 2,
            entries: vec![(256, h)],
        },
        Level {
            level: 2,
            entries: vec![(5, h), (4, h)],
        },
        Level {
            level: 2,
            entries: vec![(5, h), (5, h)],
        },
        Level {
            level: 2,
            entries: vec![(5, EMPTY)],
        },
    ];
    for level in bad {
        assert!(
            is_level_error(level.validate(&g)),
            "{level:?} must be rejected"
        );
    }
    let good = Level {
        level: 2,
        entries: vec![(0x35, h)],
    };
    good.validate(&g).unwrap();
    assert!(
        is_level_error(good.validate_reply(&g, 1, &[3])),
        "wrong level"
    );
    assert!(
        is_level_error(good.validate_reply(&g, 2, &[4])),
        "not a requested parent"
    );
    good.validate_reply(&g, 2, &[3]).unwrap();
    // A hash of the wrong length does not decode.
    let short = rmp_serde::to_vec(&(2u8, vec![(1u32, serde_bytes::ByteBuf::from(vec![1u8; 31]))]));
    assert!(rmp_serde::from_slice::<Level>(&short.unwrap()).is_err());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_level_decoder(bytes in vec(any::<u8>(), 0..300)) {
        if let Ok(level) = rmp_serde::from_slice::<Level>(&bytes) {
            let _ = level.validate(&geometry(0, 2));
        }
    }

    #[test]
    fn arbitrary_well_typed_levels_validate_or_fail_cleanly(
        level in 0u8..5,
        raw in vec((0u32..600, vec(any::<u8>(), 30..34)), 0..20),
        parents in vec(0u32..20, 0..4),
    ) {
        let entries: Vec<_> =
            raw.into_iter().map(|(i, h)| (i, serde_bytes::ByteBuf::from(h))).collect();
        let bytes = rmp_serde::to_vec(&(level, entries)).unwrap();
        if let Ok(decoded) = rmp_serde::from_slice::<Level>(&bytes) {
            let g = geometry(0, 2);
            if decoded.validate(&g).is_ok() {
                prop_assert!(decoded.level <= 2);
                prop_assert!(decoded.entries.windows(2).all(|w| w[0].0 < w[1].0));
            }
            let _ = decoded.validate_reply(&g, level, &parents);
        }
    }
}

// --- the diff ---

#[test]
fn diff_rejects_trees_that_do_not_line_up() {
    let a = MerkleTree::new(geometry(2, 2), 1).unwrap();
    for b in [
        MerkleTree::new(geometry(2, 3), 1).unwrap(),
        MerkleTree::new(geometry(3, 2), 1).unwrap(),
        MerkleTree::new(geometry(2, 2), 2).unwrap(),
    ] {
        let err = a.diff(&b, &mut DiffStats::default());
        assert!(matches!(err, Err(Error::InvalidMerkleGeometry { .. })));
    }
    let f = MerkleForest::new(geometry(2, 2));
    assert!(f
        .diff(
            &MerkleForest::new(geometry(2, 3)),
            &mut DiffStats::default()
        )
        .is_err());
}

/// Builds `base`, then a copy with `d` keys spread over the key space made different (a third
/// changed, a third removed, a third added), and returns both with the buckets touched.
fn tree_pair(n: u64, d: u64, depth: u8) -> (MerkleTree, MerkleTree, BTreeSet<u32>) {
    let g = geometry(0, depth);
    let base = MerkleTree::from_items(g, 0, items(n)).unwrap();
    let mut other = base.clone();
    let mut touched = BTreeSet::new();
    for j in 0..d {
        let i = j * (n / d.max(1));
        let k = key(i);
        let token = Token::of(KS, &k);
        match j % 3 {
            0 => other
                .update(token, &k, Some(&state(i)), Some(&state(i + n)))
                .unwrap(),
            1 => other.update(token, &k, Some(&state(i)), None).unwrap(),
            _ => insert(&mut other, n + i),
        }
        let t = if j % 3 == 2 {
            Token::of(KS, &key(n + i))
        } else {
            token
        };
        touched.insert(g.bucket_of(t));
    }
    (base, other, touched)
}

#[test]
fn diff_work_is_proportional_to_the_difference() {
    let n = 100_000;
    for depth in [2u8, 4] {
        let (base, same, _) = tree_pair(n, 0, depth);
        let mut stats = DiffStats::default();
        assert!(base.diff(&same, &mut stats).unwrap().is_empty());
        assert_eq!(
            stats.comparisons, 1,
            "identical trees cost one root comparison"
        );

        let mut previous = stats.comparisons;
        for d in [1u64, 10, 100] {
            let (base, other, touched) = tree_pair(n, d, depth);
            let mut stats = DiffStats::default();
            let diff = base.diff(&other, &mut stats).unwrap();
            assert_eq!(diff.into_iter().collect::<BTreeSet<_>>(), touched);
            let bound = 16 * d * u64::from(depth) + 1;
            println!("depth {depth}, {d} differing keys among {n}: {stats:?} (bound {bound})");
            assert!(
                stats.comparisons <= bound,
                "d={d} depth={depth}: {stats:?} > {bound}"
            );
            assert!(
                stats.comparisons > previous,
                "more difference costs more work"
            );
            previous = stats.comparisons;
        }
    }
}

/// The naive answer: per (keyspace, range, bucket), the set of (key, state) pairs on each side.
type Contents = BTreeMap<(String, u32, u32), BTreeSet<(Vec<u8>, u8)>>;

fn contents(g: &Geometry, map: &BTreeMap<(bool, Vec<u8>), u8>) -> Contents {
    let mut out = Contents::new();
    for ((second_keyspace, key), state) in map {
        let keyspace = if *second_keyspace { "b" } else { "a" };
        let token = Token::of(keyspace, key);
        out.entry((keyspace.to_owned(), g.range_of(token), g.bucket_of(token)))
            .or_default()
            .insert((key.clone(), *state));
    }
    out
}

fn apply(forest: &mut MerkleForest, key: &(bool, Vec<u8>), old: Option<u8>, new: Option<u8>) {
    let keyspace = if key.0 { "b" } else { "a" };
    let hash = |s: u8| state(u64::from(s));
    let (old, new) = (old.map(hash), new.map(hash));
    forest
        .update(
            keyspace,
            Token::of(keyspace, &key.1),
            &key.1,
            old.as_ref(),
            new.as_ref(),
        )
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the two replicas hold, the diff names exactly the buckets where a naive
    /// comparison of their (key, state) sets finds a difference.
    #[test]
    fn diff_finds_exactly_the_buckets_a_naive_comparison_finds(
        range_bits in 0u8..4,
        depth in 1u8..4,
        shared in btree_map((any::<bool>(), vec(any::<u8>(), 0..6)), any::<u8>(), 0..60),
        changed in btree_map((any::<bool>(), vec(any::<u8>(), 0..6)), (any::<u8>(), 1u8..), 0..20),
        only_mine in btree_map((any::<bool>(), vec(any::<u8>(), 0..6)), any::<u8>(), 0..20),
        only_theirs in btree_map((any::<bool>(), vec(any::<u8>(), 0..6)), any::<u8>(), 0..20),
    ) {
        let g = geometry(range_bits, depth);
        // Prefix keys by their role so the four maps never share a key.
        let tag = |t: u8, (ks, k): &(bool, Vec<u8>)| (*ks, [vec![t], k.clone()].concat());
        let mut mine_map = BTreeMap::new();
        let mut theirs_map = BTreeMap::new();
        let (mut mine, mut theirs) = (MerkleForest::new(g), MerkleForest::new(g));
        for (k, &s) in &shared {
            let k = tag(0, k);
            apply(&mut mine, &k, None, Some(s));
            apply(&mut theirs, &k, None, Some(s));
            mine_map.insert(k.clone(), s);
            theirs_map.insert(k, s);
        }
        for (k, &(s, delta)) in &changed {
            let k = tag(1, k);
            let other = s.wrapping_add(delta);
            apply(&mut mine, &k, None, Some(s));
            // Theirs goes through the change path rather than a plain insert.
            apply(&mut theirs, &k, None, Some(s));
            apply(&mut theirs, &k, Some(s), Some(other));
            mine_map.insert(k.clone(), s);
            theirs_map.insert(k, other);
        }
        for (k, &s) in &only_mine {
            let k = tag(2, k);
            apply(&mut mine, &k, None, Some(s));
            // Theirs held the key once and removed it: removal must erase it completely.
            apply(&mut theirs, &k, None, Some(s));
            apply(&mut theirs, &k, Some(s), None);
            mine_map.insert(k, s);
        }
        for (k, &s) in &only_theirs {
            let k = tag(3, k);
            apply(&mut theirs, &k, None, Some(s));
            theirs_map.insert(k, s);
        }
        for (_, _, tree) in mine.trees().chain(theirs.trees()) {
            tree.check_invariants();
        }
        prop_assert_eq!(mine.key_count(), mine_map.len() as u64);

        let (a, b) = (contents(&g, &mine_map), contents(&g, &theirs_map));
        let expected: BTreeSet<(String, u32, u32)> = a
            .keys()
            .chain(b.keys())
            .filter(|place| a.get(*place) != b.get(*place))
            .cloned()
            .collect();
        let mut stats = DiffStats::default();
        let found: BTreeSet<(String, u32, u32)> = mine
            .diff(&theirs, &mut stats)
            .unwrap()
            .into_iter()
            .flat_map(|d| d.buckets.into_iter().map(move |b| (d.keyspace.clone(), d.range, b)))
            .collect();
        prop_assert_eq!(&found, &expected);
        // And the other way round.
        let back: usize =
            theirs.diff(&mine, &mut DiffStats::default()).unwrap().iter().map(|d| d.buckets.len()).sum();
        prop_assert_eq!(back, expected.len());
    }
}

// --- the forest ---

#[test]
fn the_forest_creates_trees_on_demand_and_drops_empty_ones() {
    let g = geometry(10, 2);
    let mut forest = MerkleForest::new(g);
    assert_eq!(forest.tree_count(), 0);
    let k = b"only".to_vec();
    let token = Token::of(KS, &k);
    forest.update(KS, token, &k, None, Some(&state(1))).unwrap();
    let range = g.range_of(token);
    assert_eq!(forest.tree_count(), 1);
    assert_eq!(forest.tree(KS, range).map(MerkleTree::key_count), Some(1));
    assert_ne!(forest.root(KS, range), EMPTY);
    assert_eq!(forest.root("other", range), EMPTY);
    // A failed update on an absent tree leaves no empty tree behind.
    assert!(forest
        .update("other", token, &k, Some(&state(1)), None)
        .is_err());
    assert_eq!(forest.tree_count(), 1);
    forest.update(KS, token, &k, Some(&state(1)), None).unwrap();
    assert_eq!((forest.tree_count(), forest.key_count()), (0, 0));
    assert_eq!(forest.root(KS, range), EMPTY);
}

#[test]
fn the_forest_diff_covers_every_range_of_every_keyspace() {
    let g = geometry(4, 2);
    let (mut a, mut b) = (MerkleForest::new(g), MerkleForest::new(g));
    for i in 0..2_000 {
        for keyspace in ["x", "y"] {
            let k = key(i);
            let t = Token::of(keyspace, &k);
            a.update(keyspace, t, &k, None, Some(&state(i))).unwrap();
            b.update(keyspace, t, &k, None, Some(&state(i))).unwrap();
        }
    }
    let mut stats = DiffStats::default();
    assert!(a.diff(&b, &mut stats).unwrap().is_empty());
    assert_eq!(stats.comparisons, 2 * 16, "one root comparison per tree");
    let k = key(5);
    let t = Token::of("y", &k);
    b.update("y", t, &k, Some(&state(5)), None).unwrap();
    let diffs = a.diff(&b, &mut DiffStats::default()).unwrap();
    let expected = RangeDiff {
        keyspace: "y".into(),
        range: g.range_of(t),
        buckets: vec![g.bucket_of(t)],
    };
    assert_eq!(diffs, vec![expected]);
    // A rebuilt tree replaces the incremental one and agrees with it.
    let range = g.range_of(t);
    let rebuilt = MerkleTree::from_items(
        g,
        range,
        (0..2_000)
            .filter(|&i| i != 5)
            .map(|i| (Token::of("y", &key(i)), key(i), state(i)))
            .filter(|(t, _, _)| g.range_of(*t) == range),
    )
    .unwrap();
    assert_eq!(rebuilt.root(), b.root("y", range));
    a.replace("y", rebuilt).unwrap();
    assert!(a.diff(&b, &mut DiffStats::default()).unwrap().is_empty());
    assert!(
        a.replace("y", ring_tree(2)).is_err(),
        "geometry must match the forest's"
    );
}
