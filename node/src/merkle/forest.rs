//! All the trees of one node: one per (keyspace, range) that holds keys.

use super::geometry::Geometry;
use super::hash::{Hash, EMPTY};
use super::tree::{DiffStats, MerkleTree};
use crate::error::{Error, Result};
use quorumkv_ring::Token;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

/// The buckets of one (keyspace, range) in which two forests differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeDiff {
    /// The keyspace.
    pub keyspace: String,
    /// The range within the keyspace.
    pub range: u32,
    /// The differing buckets, sorted.
    pub buckets: Vec<u32>,
}

/// The trees of a node, keyed by keyspace and then range, all with one geometry.
///
/// A tree is created by the first key stored in its range and dropped when its last key goes,
/// so the forest costs memory only for ranges that hold data. An absent tree is an empty tree:
/// its root is [`EMPTY`]. Maps are `BTreeMap`s so every walk over the forest has the same order
/// on every node.
#[derive(Clone, Debug)]
pub struct MerkleForest {
    geometry: Geometry,
    trees: BTreeMap<String, BTreeMap<u32, MerkleTree>>,
}

impl MerkleForest {
    /// An empty forest whose trees will all have `geometry`.
    pub fn new(geometry: Geometry) -> MerkleForest {
        MerkleForest {
            geometry,
            trees: BTreeMap::new(),
        }
    }

    /// The geometry shared by every tree.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// [`MerkleTree::update`] on the tree of `keyspace` and the token's range, creating the tree
    /// if needed and dropping it if it ends up empty.
    pub fn update(
        &mut self,
        keyspace: &str,
        token: Token,
        key: &[u8],
        old: Option<&Hash>,
        new: Option<&Hash>,
    ) -> Result<()> {
        let geometry = self.geometry;
        match self.trees.get_mut(keyspace) {
            Some(ranges) => {
                let result = update_in(geometry, ranges, token, key, old, new);
                if ranges.is_empty() {
                    self.trees.remove(keyspace);
                }
                result
            }
            None => {
                // Allocate the keyspace name only when its first tree appears.
                let mut ranges = BTreeMap::new();
                let result = update_in(geometry, &mut ranges, token, key, old, new);
                if !ranges.is_empty() {
                    self.trees.insert(keyspace.to_owned(), ranges);
                }
                result
            }
        }
    }

    /// The tree of (`keyspace`, `range`), if it holds any key.
    pub fn tree(&self, keyspace: &str, range: u32) -> Option<&MerkleTree> {
        self.trees.get(keyspace)?.get(&range)
    }

    /// The root of (`keyspace`, `range`): [`EMPTY`] when the range holds no key.
    pub fn root(&self, keyspace: &str, range: u32) -> Hash {
        self.tree(keyspace, range).map_or(EMPTY, MerkleTree::root)
    }

    /// Every non-empty tree as `(keyspace, range, tree)`, sorted by keyspace then range.
    pub fn trees(&self) -> impl Iterator<Item = (&str, u32, &MerkleTree)> + '_ {
        self.trees.iter().flat_map(|(keyspace, ranges)| {
            ranges
                .iter()
                .map(move |(&range, tree)| (keyspace.as_str(), range, tree))
        })
    }

    /// The number of non-empty trees.
    pub fn tree_count(&self) -> usize {
        self.trees.values().map(BTreeMap::len).sum()
    }

    /// The number of keys over all trees.
    pub fn key_count(&self) -> u64 {
        self.trees().map(|(_, _, tree)| tree.key_count()).sum()
    }

    /// The number of non-empty buckets over all trees.
    pub fn leaf_count(&self) -> usize {
        self.trees().map(|(_, _, tree)| tree.leaf_count()).sum()
    }

    /// Installs `tree` as the tree of `keyspace` for its range, replacing the old one: how a
    /// tree rebuilt from storage ([`MerkleTree::from_items`]) takes over. An empty tree removes
    /// the entry. Fails if the tree's geometry is not the forest's.
    pub fn replace(&mut self, keyspace: &str, tree: MerkleTree) -> Result<()> {
        if tree.geometry() != self.geometry {
            return Err(Error::InvalidMerkleGeometry {
                reason: format!(
                    "a tree of {:?} cannot join a forest of {:?}",
                    tree.geometry(),
                    self.geometry
                ),
            });
        }
        if tree.key_count() == 0 {
            self.remove(keyspace, tree.range());
        } else {
            self.trees
                .entry(keyspace.to_owned())
                .or_default()
                .insert(tree.range(), tree);
        }
        Ok(())
    }

    /// Drops the tree of (`keyspace`, `range`), for example after the range was handed off.
    pub fn remove(&mut self, keyspace: &str, range: u32) -> Option<MerkleTree> {
        let ranges = self.trees.get_mut(keyspace)?;
        let tree = ranges.remove(&range);
        if ranges.is_empty() {
            self.trees.remove(keyspace);
        }
        tree
    }

    /// [`MerkleTree::diff`] for one (keyspace, range), an absent tree standing for an empty one.
    pub fn diff_range(
        &self,
        other: &MerkleForest,
        keyspace: &str,
        range: u32,
        stats: &mut DiffStats,
    ) -> Result<Vec<u32>> {
        self.check_same_geometry(other)?;
        match (self.tree(keyspace, range), other.tree(keyspace, range)) {
            (Some(mine), Some(theirs)) => mine.diff(theirs, stats),
            (mine, theirs) => {
                // Only a range missing on one side pays for a stand-in empty tree.
                let empty = MerkleTree::new(self.geometry, range)?;
                mine.unwrap_or(&empty).diff(theirs.unwrap_or(&empty), stats)
            }
        }
    }

    /// Diffs every (keyspace, range) that holds keys in either forest, in sorted order, and
    /// returns those with differing buckets. Identical forests cost one root comparison per
    /// tree. (Between two real nodes each range is exchanged separately, because each range has
    /// its own replicas; this whole-forest form serves tests and benchmarks.)
    pub fn diff(&self, other: &MerkleForest, stats: &mut DiffStats) -> Result<Vec<RangeDiff>> {
        self.check_same_geometry(other)?;
        let pairs: BTreeSet<(&str, u32)> = self
            .trees()
            .chain(other.trees())
            .map(|(keyspace, range, _)| (keyspace, range))
            .collect();
        let mut diffs = Vec::new();
        for (keyspace, range) in pairs {
            let buckets = self.diff_range(other, keyspace, range, stats)?;
            if !buckets.is_empty() {
                diffs.push(RangeDiff {
                    keyspace: keyspace.to_owned(),
                    range,
                    buckets,
                });
            }
        }
        Ok(diffs)
    }

    fn check_same_geometry(&self, other: &MerkleForest) -> Result<()> {
        if self.geometry != other.geometry {
            return Err(Error::InvalidMerkleGeometry {
                reason: format!(
                    "cannot compare {:?} with {:?}",
                    self.geometry, other.geometry
                ),
            });
        }
        Ok(())
    }
}

/// [`MerkleTree::update`] within one keyspace's trees, creating the range's tree on demand and
/// dropping it once it is empty, so that an empty range costs no memory.
fn update_in(
    geometry: Geometry,
    ranges: &mut BTreeMap<u32, MerkleTree>,
    token: Token,
    key: &[u8],
    old: Option<&Hash>,
    new: Option<&Hash>,
) -> Result<()> {
    let range = geometry.range_of(token);
    let tree = match ranges.entry(range) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(MerkleTree::new(geometry, range)?),
    };
    let result = tree.update(token, key, old, new);
    if tree.key_count() == 0 {
        ranges.remove(&range);
    }
    result
}
