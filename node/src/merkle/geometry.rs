//! Where a token lands: its range, its bucket, and the token interval a bucket covers.

use crate::error::{Error, Result};
use quorumkv_ring::Token;

/// The fanout of every inner node. Sixteen children means four token bits per level, so a level
/// boundary is a hex digit of the token, which keeps the bucket arithmetic and its debugging
/// simple.
pub const FANOUT: u32 = 16;

/// Token bits consumed by one tree level (log2 of [`FANOUT`]).
pub(crate) const BITS_PER_LEVEL: u32 = 4;

/// The most range bits a geometry accepts (65,536 ranges), matching the ring's limit.
pub const MAX_RANGE_BITS: u8 = 16;

/// The deepest tree a geometry accepts. Node indices are `u32` on the wire and in memory, and
/// level `d` has `16^d` positions, so eight levels (2^32 buckets) is as deep as `u32` reaches.
pub const MAX_DEPTH: u8 = 8;

/// The depth the node uses unless configured otherwise: 256 buckets per range. With 1,024
/// ranges that is 262,144 buckets for the whole ring, a handful of keys per bucket at a million
/// keys, so a repair of one bucket moves a few keys while the tree stays small.
pub const DEFAULT_DEPTH: u8 = 2;

/// The shape shared by every tree of a node: how many token bits select the range, and how many
/// levels of fanout 16 sit below each range root.
///
/// Two trees can be compared only when their geometries are equal, because only then does the
/// same node index mean the same token interval on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    range_bits: u8,
    depth: u8,
}

impl Geometry {
    /// A geometry with `2^range_bits` ranges and `depth` levels below each range root.
    ///
    /// Fails with [`Error::InvalidMerkleGeometry`] unless `range_bits <= 16`, `1 <= depth <= 8`
    /// and `range_bits + 4 * depth <= 64` (the range and bucket must both come out of one
    /// 64-bit token).
    pub fn new(range_bits: u8, depth: u8) -> Result<Geometry> {
        let invalid = |reason: String| Err(Error::InvalidMerkleGeometry { reason });
        if range_bits > MAX_RANGE_BITS {
            return invalid(format!("range_bits {range_bits} exceeds {MAX_RANGE_BITS}"));
        }
        if depth == 0 {
            return invalid("depth must be at least 1".to_owned());
        }
        if depth > MAX_DEPTH {
            return invalid(format!(
                "depth {depth} exceeds {MAX_DEPTH} (bucket indices are 32-bit)"
            ));
        }
        let bits = u32::from(range_bits) + BITS_PER_LEVEL * u32::from(depth);
        if bits > 64 {
            return invalid(format!(
                "range_bits {range_bits} + 4 * depth {depth} = {bits} exceeds the 64 token bits"
            ));
        }
        Ok(Geometry { range_bits, depth })
    }

    /// How many top token bits select the range.
    pub fn range_bits(&self) -> u8 {
        self.range_bits
    }

    /// How many levels of fanout 16 sit below a range root; the buckets are level `depth`.
    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// The number of ranges, `2^range_bits`.
    pub fn range_count(&self) -> u32 {
        1 << self.range_bits
    }

    /// The number of buckets (leaf positions) per range, `16^depth`.
    pub fn bucket_count(&self) -> u64 {
        self.positions_at(self.depth)
    }

    /// The number of node positions at `level` of a tree, `16^level`. Only meaningful for
    /// `level <= depth`, which every caller checks first.
    pub(crate) fn positions_at(&self, level: u8) -> u64 {
        1u64 << (BITS_PER_LEVEL * u32::from(level))
    }

    /// The range `token` belongs to: its top `range_bits` bits.
    pub fn range_of(&self, token: Token) -> u32 {
        // A shift by 64 would overflow, and with no range bits every token is in range 0.
        token
            .0
            .checked_shr(64 - u32::from(self.range_bits))
            .unwrap_or(0) as u32
    }

    /// The bucket `token` belongs to within its range: the `4 * depth` bits after the range
    /// bits. The bucket depends on the token alone, which is what lines up two replicas' trees.
    pub fn bucket_of(&self, token: Token) -> u32 {
        let bucket_bits = BITS_PER_LEVEL * u32::from(self.depth);
        // Shift the range bits out at the top, then keep the next `bucket_bits` (at most 32).
        ((token.0 << self.range_bits) >> (64 - bucket_bits)) as u32
    }

    /// The first and last token (both inclusive) of `range`, so storage can scan a whole range,
    /// for example to rebuild its tree.
    pub fn range_token_bounds(&self, range: u32) -> Result<(Token, Token)> {
        self.check_range(range)?;
        let low = self.range_start(range);
        let span_bits = 64 - u32::from(self.range_bits);
        // `span_bits` is 64 when there are no range bits; u128 keeps the mask arithmetic exact.
        let high = low | (((1u128 << span_bits) - 1) as u64);
        Ok((Token(low), Token(high)))
    }

    /// The first and last token (both inclusive) of `bucket` in `range`: exactly the tokens for
    /// which [`range_of`](Self::range_of) is `range` and [`bucket_of`](Self::bucket_of) is
    /// `bucket`. Storage orders data by token, so this is one scan.
    pub fn bucket_token_bounds(&self, range: u32, bucket: u32) -> Result<(Token, Token)> {
        self.check_range(range)?;
        self.check_bucket(bucket)?;
        // At most 16 + 32 bits are taken, so at least 16 low bits remain and no shift overflows.
        let low_bits = 64 - u32::from(self.range_bits) - BITS_PER_LEVEL * u32::from(self.depth);
        let low = self.range_start(range) | (u64::from(bucket) << low_bits);
        let high = low | ((1u64 << low_bits) - 1);
        Ok((Token(low), Token(high)))
    }

    /// Fails unless `range` exists in this geometry.
    pub(crate) fn check_range(&self, range: u32) -> Result<()> {
        if range >= self.range_count() {
            return Err(Error::InvalidMerkleGeometry {
                reason: format!(
                    "range {range} does not exist with {} ranges",
                    self.range_count()
                ),
            });
        }
        Ok(())
    }

    /// Fails unless `bucket` is a leaf position of this geometry. A bucket index usually comes
    /// from a peer's tree level, so a bad one is a bad level.
    pub(crate) fn check_bucket(&self, bucket: u32) -> Result<()> {
        if u64::from(bucket) >= self.bucket_count() {
            return Err(Error::InvalidMerkleLevel {
                reason: format!("bucket {bucket} is outside 0..{}", self.bucket_count()),
            });
        }
        Ok(())
    }

    /// The first token of `range`, for a range already checked to exist.
    fn range_start(&self, range: u32) -> u64 {
        // With no range bits the shift is 64, which only u128 allows; range is then 0 anyway.
        (u128::from(range) << (64 - u32::from(self.range_bits))) as u64
    }
}
