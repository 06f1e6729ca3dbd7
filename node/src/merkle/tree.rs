//! One sparse tree over one (keyspace, range): incremental updates, levels and the diff.

use super::geometry::{Geometry, BITS_PER_LEVEL};
use super::hash::{inner_hash, item_hash, leaf_hash, Hash, Sum, EMPTY};
use super::level::{diff_entries, sorted_unique, Level};
use crate::error::{Error, Result};
use quorumkv_ring::Token;
use std::collections::BTreeMap;
use std::fmt;

/// The work a diff did, so tests and metrics can see that it is proportional to the difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Node comparisons: one for the roots, then one per index present on either side among
    /// the children of each differing node (at most 16 per differing node per level).
    pub comparisons: u64,
}

/// A non-empty bucket: the multiset hash of its keys, and the hash its parent sees.
#[derive(Clone, Copy, Debug, Default)]
struct Leaf {
    /// Sum modulo 2^256 of the item hashes of the bucket's (key, state hash) pairs.
    sum: Sum,
    /// How many keys the bucket holds; never 0 for a stored leaf.
    count: u64,
    /// `leaf_hash(sum, count)`, cached because every update of a sibling needs it and every
    /// level request at the bucket level sends it.
    hash: Hash,
}

/// The Merkle tree of one range of one keyspace. See the [module documentation](super) for the
/// algorithm, the invariants and the cost.
#[derive(Clone)]
pub struct MerkleTree {
    geometry: Geometry,
    range: u32,
    /// The range root; `None` when the range holds no key.
    root: Option<Hash>,
    /// `inner[l - 1]` holds the non-empty nodes of level `l`, for `1 <= l < depth`. Sparse
    /// maps, so an empty subtree costs nothing.
    inner: Vec<BTreeMap<u32, Hash>>,
    /// The non-empty buckets (level `depth`), by bucket index.
    leaves: BTreeMap<u32, Leaf>,
    key_count: u64,
}

impl MerkleTree {
    /// An empty tree for `range` (which must exist in `geometry`).
    pub fn new(geometry: Geometry, range: u32) -> Result<MerkleTree> {
        geometry.check_range(range)?;
        let inner_levels = usize::from(geometry.depth()) - 1;
        Ok(MerkleTree {
            geometry,
            range,
            root: None,
            inner: vec![BTreeMap::new(); inner_levels],
            leaves: BTreeMap::new(),
            key_count: 0,
        })
    }

    /// Builds the tree of `range` in one pass from every `(token, key, state hash)` stored in
    /// it, in any order: the rebuild from storage that repairs a tree after a crash or after a
    /// caller passed a wrong `old` hash. Cheaper than the same updates one by one, because each
    /// inner node is hashed once instead of once per key below it.
    pub fn from_items<I, K>(geometry: Geometry, range: u32, items: I) -> Result<MerkleTree>
    where
        I: IntoIterator<Item = (Token, K, Hash)>,
        K: AsRef<[u8]>,
    {
        let mut tree = MerkleTree::new(geometry, range)?;
        for (token, key, state) in items {
            tree.check_token(token)?;
            let leaf = tree.leaves.entry(geometry.bucket_of(token)).or_default();
            leaf.sum.add(&item_hash(key.as_ref(), &state));
            leaf.count += 1;
            tree.key_count += 1;
        }
        // Collecting a sorted iterator bulk-loads the map with full nodes, which also undoes
        // the slack that random-order insertion left.
        tree.leaves = std::mem::take(&mut tree.leaves)
            .into_iter()
            .map(|(bucket, mut leaf)| {
                leaf.hash = leaf_hash(&leaf.sum, leaf.count);
                (bucket, leaf)
            })
            .collect();
        tree.rebuild_inner();
        Ok(tree)
    }

    /// The geometry this tree was built with.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The range this tree covers.
    pub fn range(&self) -> u32 {
        self.range
    }

    /// The root hash: [`EMPTY`] for a range without keys. Equal roots mean equal contents (up
    /// to hash collisions), whatever order the keys arrived in.
    pub fn root(&self) -> Hash {
        self.root.unwrap_or(EMPTY)
    }

    /// The number of non-empty buckets.
    pub fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    /// The number of keys the tree summarises.
    pub fn key_count(&self) -> u64 {
        self.key_count
    }

    /// The first and last token (both inclusive) of `bucket` in this tree's range, for scanning
    /// the keys of a bucket a diff reported.
    pub fn bucket_token_bounds(&self, bucket: u32) -> Result<(Token, Token)> {
        self.geometry.bucket_token_bounds(self.range, bucket)
    }

    /// Records that `key` (at `token`) changed from state hash `old` to `new`: `old = None` is an
    /// insert, `new = None` a removal. O(depth): the bucket's sum loses `old`'s item hash and
    /// gains `new`'s, then each ancestor is rehashed from its 16 children.
    ///
    /// `old` must be the state hash this tree last saw for the key; the storage merge function
    /// has it, because it reads the stored state to merge. That is what lets the tree store no
    /// keys. A wrong `old` is undetectable here and corrupts the bucket until a rebuild (see the
    /// module documentation). Fails with [`Error::InvalidMerkleUpdate`], changing nothing, when
    /// the token is outside this tree's range or `old` names a key in an empty bucket.
    pub fn update(
        &mut self,
        token: Token,
        key: &[u8],
        old: Option<&Hash>,
        new: Option<&Hash>,
    ) -> Result<()> {
        self.check_token(token)?;
        if old == new {
            // Rewriting an identical state (an idempotent merge) leaves the tree as it is.
            return Ok(());
        }
        let bucket = self.geometry.bucket_of(token);
        if old.is_some() && !self.leaves.contains_key(&bucket) {
            return Err(Error::InvalidMerkleUpdate {
                reason: format!(
                    "removing a key from bucket {bucket} of range {}, which holds none",
                    self.range
                ),
            });
        }
        let leaf = self.leaves.entry(bucket).or_default();
        if let Some(old) = old {
            // A stored leaf has count >= 1 (checked above), so this cannot underflow.
            leaf.sum.sub(&item_hash(key, old));
            leaf.count -= 1;
            self.key_count -= 1;
        }
        if let Some(new) = new {
            leaf.sum.add(&item_hash(key, new));
            leaf.count += 1;
            self.key_count += 1;
        }
        if leaf.count == 0 {
            // Forget the sum too: it is zero unless some `old` was wrong, and dropping it is
            // what lets a corrupted bucket heal once it empties.
            self.leaves.remove(&bucket);
        } else {
            leaf.hash = leaf_hash(&leaf.sum, leaf.count);
        }
        self.rehash_ancestors(bucket);
        Ok(())
    }

    /// The non-empty nodes at `level` whose parents (at `level - 1`) are in `parents`, sorted by
    /// index; at level 0 the root alone (or nothing, for an empty tree) and `parents` is
    /// ignored. This is the request one replica answers for another during an exchange, so
    /// `level` and `parents` may come from a peer: out-of-bounds values are an
    /// [`Error::InvalidMerkleLevel`], never a panic. Unsorted or repeated parents are accepted.
    /// The answer holds at most 16 entries per parent; the exchange layer bounds how many parents
    /// one request may name, and so the size of a reply.
    pub fn level(&self, level: u8, parents: &[u32]) -> Result<Level> {
        let depth = self.geometry.depth();
        if level > depth {
            return Err(Error::InvalidMerkleLevel {
                reason: format!("level {level} is deeper than the tree depth {depth}"),
            });
        }
        let mut entries = Vec::new();
        if level == 0 {
            entries.extend(self.root.map(|root| (0, root)));
            return Ok(Level { level, entries });
        }
        let parents = sorted_unique(parents);
        let positions = self.geometry.positions_at(level - 1);
        if let Some(&bad) = parents.iter().find(|&&p| u64::from(p) >= positions) {
            return Err(Error::InvalidMerkleLevel {
                reason: format!(
                    "parent {bad} is outside 0..{positions} at level {}",
                    level - 1
                ),
            });
        }
        for &parent in parents.iter() {
            self.for_each_child(level, parent, |index, hash| entries.push((index, hash)));
        }
        Ok(Level { level, entries })
    }

    /// The buckets whose contents differ between `self` and `other`: a key present on one side
    /// only, or present on both with different state hashes. Walks from the root down through
    /// differing nodes only, using [`level`](Self::level), [`Level::validate_reply`] and
    /// [`diff_level`](super::diff_level) exactly as an exchange between two replicas does, and
    /// adds the node comparisons to `stats`. Fails with [`Error::InvalidMerkleGeometry`] when
    /// the trees have different geometries or ranges.
    pub fn diff(&self, other: &MerkleTree, stats: &mut DiffStats) -> Result<Vec<u32>> {
        if self.geometry != other.geometry || self.range != other.range {
            return Err(Error::InvalidMerkleGeometry {
                reason: format!(
                    "cannot compare range {} of {:?} with range {} of {:?}",
                    self.range, self.geometry, other.range, other.geometry
                ),
            });
        }
        let mut differing: Vec<u32> = Vec::new();
        for level in 0..=self.geometry.depth() {
            let mine = self.level(level, &differing)?;
            let theirs = other.level(level, &differing)?;
            theirs.validate_reply(&self.geometry, level, &differing)?;
            let (next, compared) = diff_entries(&mine.entries, &theirs.entries);
            // The roots are compared even when both are empty and neither level lists them.
            stats.comparisons += if level == 0 { 1 } else { compared };
            differing = next;
            if differing.is_empty() {
                break;
            }
        }
        Ok(differing)
    }

    /// Fails unless `token` falls in this tree's range.
    fn check_token(&self, token: Token) -> Result<()> {
        let range = self.geometry.range_of(token);
        if range != self.range {
            return Err(Error::InvalidMerkleUpdate {
                reason: format!("token {token} is in range {range}, not {}", self.range),
            });
        }
        Ok(())
    }

    /// Calls `f(index, hash)` for each non-empty child of `parent`, where the children are at
    /// `child_level` (1..=depth), in index order.
    fn for_each_child(&self, child_level: u8, parent: u32, mut f: impl FnMut(u32, Hash)) {
        // parent < 16^(depth - 1) <= 2^28, so the children's indices fit in u32.
        let first = parent << BITS_PER_LEVEL;
        let children = first..=first | 0xf;
        if child_level == self.geometry.depth() {
            for (&index, leaf) in self.leaves.range(children) {
                f(index, leaf.hash);
            }
        } else {
            for (&index, &hash) in self.inner[usize::from(child_level) - 1].range(children) {
                f(index, hash);
            }
        }
    }

    /// Rehashes every ancestor of `bucket` from its children, bottom up. An ancestor whose
    /// children are all empty is removed, which keeps the tree sparse.
    fn rehash_ancestors(&mut self, bucket: u32) {
        let mut index = bucket;
        for level in (0..self.geometry.depth()).rev() {
            let parent = index >> BITS_PER_LEVEL;
            let mut children = [EMPTY; 16];
            let mut any = false;
            self.for_each_child(level + 1, parent, |child, hash| {
                children[(child & 0xf) as usize] = hash;
                any = true;
            });
            let hash = any.then(|| inner_hash(&children));
            self.set_inner(level, parent, hash);
            index = parent;
        }
    }

    /// Stores (or, for `None`, removes) the hash of node `index` at inner `level` (0..depth).
    fn set_inner(&mut self, level: u8, index: u32, hash: Option<Hash>) {
        if level == 0 {
            self.root = hash;
            return;
        }
        let nodes = &mut self.inner[usize::from(level) - 1];
        match hash {
            Some(hash) => {
                nodes.insert(index, hash);
            }
            None => {
                nodes.remove(&index);
            }
        }
    }

    /// Recomputes every inner level from the leaves in one bottom-up pass over sorted maps.
    fn rebuild_inner(&mut self) {
        let mut below: Vec<(u32, Hash)> = self
            .leaves
            .iter()
            .map(|(&bucket, leaf)| (bucket, leaf.hash))
            .collect();
        for level in (0..self.geometry.depth()).rev() {
            let mut above: Vec<(u32, Hash)> = Vec::new();
            // `below` is sorted, so the children of one parent are consecutive.
            for group in below.chunk_by(|a, b| a.0 >> BITS_PER_LEVEL == b.0 >> BITS_PER_LEVEL) {
                let mut children = [EMPTY; 16];
                for &(child, hash) in group {
                    children[(child & 0xf) as usize] = hash;
                }
                above.push((group[0].0 >> BITS_PER_LEVEL, inner_hash(&children)));
            }
            if level == 0 {
                self.root = above.first().map(|&(_, hash)| hash);
            } else {
                self.inner[usize::from(level) - 1] = above.iter().copied().collect();
            }
            below = above;
        }
    }

    /// Recomputes everything from the leaves and checks it against what is stored: the tests'
    /// oracle for the invariants listed in the module documentation.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut fresh = self.clone();
        fresh.rebuild_inner();
        assert_eq!(fresh.root, self.root, "root is the hash of its children");
        assert_eq!(
            fresh.inner, self.inner,
            "every inner node is the hash of its children"
        );
        let mut keys = 0;
        for (&bucket, leaf) in &self.leaves {
            assert!(u64::from(bucket) < self.geometry.bucket_count());
            assert!(leaf.count > 0, "an empty bucket is not stored");
            assert_eq!(leaf.hash, leaf_hash(&leaf.sum, leaf.count));
            keys += leaf.count;
        }
        assert_eq!(keys, self.key_count);
        for level in &self.inner {
            assert!(level.values().all(|h| *h != EMPTY));
        }
    }
}

impl fmt::Debug for MerkleTree {
    /// A summary: the nodes themselves would run to megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root = self.root();
        let prefix: String = root[..8].iter().map(|b| format!("{b:02x}")).collect();
        f.debug_struct("MerkleTree")
            .field("geometry", &self.geometry)
            .field("range", &self.range)
            .field("root", &format_args!("{prefix}…"))
            .field("leaf_count", &self.leaves.len())
            .field("key_count", &self.key_count)
            .finish()
    }
}
