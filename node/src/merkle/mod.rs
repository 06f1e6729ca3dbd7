//! Merkle trees for anti-entropy: how two replicas of a range find, cheaply, the keys on which
//! they disagree.
//!
//! Hinted handoff and read repair fix most divergence, but not all: a hint can be lost with its
//! node, and a key nobody reads is never read-repaired. Dynamo closes the gap with background
//! anti-entropy (DeCandia et al., "Dynamo: Amazon's Highly Available Key-value Store",
//! SOSP 2007, §4.7, <https://www.allthingsdistributed.com/files/amazon-dynamo-sosp2007.pdf>):
//! every replica keeps a hash tree per key range, two replicas compare trees from the root
//! down, and only the leaves that differ are synchronised. The hash tree is Merkle's
//! (R. C. Merkle, "A Digital Signature Based on a Conventional Encryption Function",
//! CRYPTO '87, <https://doi.org/10.1007/3-540-48184-2_32>): a node's hash covers its children's
//! hashes, so equal roots vouch for equal trees and a difference can be chased down the one
//! path where hashes disagree. This module is the pure core of that process: the trees, their
//! incremental maintenance and the comparison. Sending levels over QUIC, throttling, and
//! streaming the keys of differing buckets belong to the anti-entropy worker.
//!
//! # What it guarantees
//!
//! - **Same contents, same tree.** Two trees of the same [`Geometry`] and range that summarise
//!   the same set of (key, state hash) pairs are identical node for node, whatever order the
//!   updates came in and whichever replica built them. Nothing depends on a clock, on map
//!   iteration order or on the machine.
//! - **The diff is exact.** [`MerkleTree::diff`] returns exactly the buckets that hold a key
//!   present on one side only or present on both with different state hashes, unless a hash
//!   collides (see "How it fails").
//! - **The diff costs what the difference costs.** Identical trees cost one root comparison. `d`
//!   differing keys cost at most `16 · d · depth + 1` node comparisons, however many keys the
//!   trees hold; [`DiffStats`] counts them.
//! - **Memory follows the data.** Empty subtrees, buckets and trees are stored nowhere.
//!
//! # The algorithm
//!
//! **Layout by token.** A key's [`Token`](quorumkv_ring::Token) is a 64-bit hash. Its top
//! `range_bits` bits pick the range (one tree each), the next `4 · depth` bits pick the bucket
//! (a leaf), and the remaining bits are ignored:
//!
//! ```text
//!   token:  | range (range_bits) | level 1 (4) | level 2 (4) | ... | level depth (4) | rest |
//!                 which tree        \______ bucket index = path from the root ______/
//! ```
//!
//! Level `l` of a tree has `16^l` node positions; node `i` at level `l` has children
//! `16i .. 16i + 15` at level `l + 1`; the buckets are level `depth`. The bucket is a function of
//! the token alone, so the same key falls in the same bucket on every replica and two replicas'
//! trees line up position for position. Storage orders data by token, so one bucket is one scan
//! ([`Geometry::bucket_token_bounds`]).
//!
//! **Leaves are multiset hashes.** Storing the keys in the tree would cost as much memory as the
//! keys themselves. Instead a bucket keeps the sum, modulo 2^256, of its items' hashes
//! `BLAKE3(domain || len(key) as u64 LE || key || state_hash)`, and its key count: the additive
//! multiset hash (MSet-Add-Hash of Clarke et al., "Incremental Multiset Hash Functions and Their
//! Application to Memory Integrity Checking", ASIACRYPT 2003). Addition is commutative and has
//! an inverse, so an insert adds one item hash, a removal subtracts one, a change does both, and
//! the result does not depend on order. The price is that subtracting needs the old state hash.
//! [`MerkleTree::update`] therefore takes `old` from the caller: the storage merge function reads
//! the stored state anyway in order to merge, so it knows `old` for free, and the tree never has
//! to store or look up a key. The leaf's hash, which its parent sees, is
//! `BLAKE3(domain || sum || count)`.
//!
//! **Inner nodes are Merkle nodes.** An inner node's hash is
//! `BLAKE3(domain || child_0 || ... || child_15)`, with [`EMPTY`] for absent children. A node
//! whose subtree holds no key is not stored and hashes to [`EMPTY`]. An update changes one
//! bucket and rehashes its `depth` ancestors from their children.
//!
//! **The diff walks levels.** [`MerkleTree::level`] answers "the non-empty nodes at level `l`
//! below these parents" with a [`Level`], a compact serde value a replica can send;
//! [`diff_level`] compares two answers and yields the differing indices, which are the parents
//! of the next request. Starting from the roots (level 0) and stopping when nothing differs or
//! the buckets are reached, the local [`MerkleTree::diff`] runs exactly this protocol, so the
//! network exchange has nothing new to get wrong. A received level is checked with
//! [`Level::validate_reply`] before use.
//!
//! # Invariants
//!
//! - A node is stored if and only if its subtree holds at least one key; a stored leaf has a
//!   count of at least 1, and no stored hash is [`EMPTY`].
//! - Every stored inner node's hash is `BLAKE3(domain || its 16 children's hashes)`, absent
//!   children counting as [`EMPTY`], after every public call returns.
//! - A leaf's sum is the sum of the item hashes of exactly the (key, state hash) pairs the
//!   callers inserted and did not remove, provided every `old` passed was correct.
//! - A tree's key count is the sum of its leaves' counts; a forest holds no empty tree.
//! - Level entries are sorted by index, unique, in bounds for their level, and never [`EMPTY`].
//!
//! # Memory and cost
//!
//! A non-empty bucket stores 76 bytes (sum, count, cached hash, index) in a `BTreeMap`; with the
//! map's node overhead and the inner nodes above it (36 bytes each, at most one sixteenth as
//! many as the nodes below them) that comes to about 120 bytes a bucket, independent of the size
//! of keys and values. A million keys over 1,024 ranges at depth 2 fill nearly all 262,144
//! buckets: built by updates the trees hold 30.2 MiB of live heap; built by
//! [`MerkleTree::from_items`], which packs the maps full, 21.9 MiB (`tests/merkle_memory.rs`
//! checks the budget of 64 MiB). An empty range costs nothing.
//!
//! An update costs one or two item hashes, one leaf hash, `depth` inner hashes of 512 bytes, and
//! `O(depth · log n)` map operations. A diff of `d` differing keys compares at most 16 nodes per
//! differing node per level, `O(d · depth)`. Rebuilding a tree from its items
//! ([`MerkleTree::from_items`]) hashes each inner node once: `n` item hashes, one map insertion per key, and one
//! hash per non-empty node.
//!
//! # How it fails
//!
//! - **A wrong `old`.** If a caller passes an `old` state hash other than the one the tree last
//!   saw for the key (a bug, or storage rolled back under the tree), the bucket's sum is wrong
//!   and the tree reports that bucket as different from every correct replica, on every
//!   exchange, until the tree is rebuilt. Nothing here can detect it, except the one case where
//!   `old` names a key in an empty bucket, which [`MerkleTree::update`] rejects with
//!   [`Error::InvalidMerkleUpdate`](crate::Error::InvalidMerkleUpdate) without changing the
//!   tree. A bucket that empties forgets its sum, so the damage heals if all its keys go. The
//!   cure is a rebuild from storage: scan the range in token order
//!   ([`Geometry::range_token_bounds`]), build [`MerkleTree::from_items`] and install it with
//!   [`MerkleForest::replace`]. The trees live in memory only, so a restarting node rebuilds them
//!   this way too; a periodic rebuild bounds how long any corruption lasts.
//! - **Hash collisions.** If two different buckets hash alike, the diff misses them and that
//!   bucket is not repaired by this exchange. For BLAKE3 that is negligible. The additive sum is
//!   weaker against an adversary: someone who controls many keys *and* their exact state hashes
//!   could search for two sets with the same sum (Wagner's generalised birthday attack,
//!   CRYPTO 2002). State hashes cover node-issued version vectors, which a client does not
//!   choose, and the consequence would be a missed repair, never corrupted data.
//! - **Mismatched trees.** Comparing trees of different geometries or ranges, or a malformed or
//!   out-of-bounds level from a peer, is an error
//!   ([`InvalidMerkleGeometry`](crate::Error::InvalidMerkleGeometry),
//!   [`InvalidMerkleLevel`](crate::Error::InvalidMerkleLevel)), never a panic and never a
//!   silently wrong answer.

mod forest;
mod geometry;
mod hash;
mod level;
mod tree;

pub use forest::{MerkleForest, RangeDiff};
pub use geometry::{Geometry, DEFAULT_DEPTH, FANOUT, MAX_DEPTH, MAX_RANGE_BITS};
pub use hash::{Hash, EMPTY};
pub use level::{diff_level, Level};
pub use tree::{DiffStats, MerkleTree};

#[cfg(test)]
mod tests;
