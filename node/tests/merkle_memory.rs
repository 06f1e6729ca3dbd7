//! The anti-entropy trees for a million keys fit in 64 MiB.
//!
//! The forest is built the way the node builds it, one incremental update per key, for 1,024
//! ranges at the default depth of 2 (262,144 buckets). The figure is the growth of the process's
//! resident set (`VmRSS` in `/proc/self/status`) across the build. That is an upper bound on the
//! heap the trees keep: it also counts allocator slack and freed memory the allocator holds on
//! to. A counting `#[global_allocator]` would measure live bytes exactly, but implementing
//! `GlobalAlloc` needs `unsafe`, and the workspace sets `unsafe_code = "forbid"`, which an
//! `#[allow]` in this file cannot override.

use quorumkv_node::merkle::{Geometry, MerkleForest, DEFAULT_DEPTH};
use quorumkv_ring::Token;

const KEYS: u64 = 1_000_000;
const RANGE_BITS: u8 = 10;
const BUDGET_BYTES: u64 = 64 << 20;

/// The resident set size in bytes, or `None` where `/proc` does not exist.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn merkle_trees_for_a_million_keys_fit_in_64_mib() {
    let geometry = Geometry::new(RANGE_BITS, DEFAULT_DEPTH).expect("valid geometry");
    let Some(before) = resident_bytes() else {
        println!("no /proc/self/status on this platform; memory not measured");
        return;
    };
    let mut forest = MerkleForest::new(geometry);
    for i in 0..KEYS {
        // Keys are generated and dropped one at a time so that only the trees stay resident.
        let key = format!("key-{i}");
        let token = Token::of("default", key.as_bytes());
        let state = blake3::hash(&i.to_le_bytes());
        forest
            .update(
                "default",
                token,
                key.as_bytes(),
                None,
                Some(state.as_bytes()),
            )
            .expect("insert");
    }
    let after = resident_bytes().expect("/proc/self/status was readable a moment ago");
    let grown = after.saturating_sub(before);

    assert_eq!(forest.key_count(), KEYS);
    assert_eq!(forest.tree_count(), 1 << RANGE_BITS);
    println!(
        "{KEYS} keys, {} trees, {} non-empty buckets: resident set grew by {:.1} MiB \
         ({:.0} bytes per bucket, {:.1} per key)",
        forest.tree_count(),
        forest.leaf_count(),
        grown as f64 / f64::from(1 << 20),
        grown as f64 / forest.leaf_count() as f64,
        grown as f64 / KEYS as f64,
    );
    assert!(
        grown < BUDGET_BYTES,
        "the trees took {grown} bytes, over the 64 MiB budget"
    );
}
