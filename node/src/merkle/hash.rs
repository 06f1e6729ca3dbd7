//! The three hashes of the tree: item hashes summed into buckets, leaf hashes and inner hashes.
//!
//! Each hash has its own domain string so that no input to one can be mistaken for an input to
//! another, and none collides with any other BLAKE3 use in QuorumKV.

/// A 32-byte BLAKE3 digest: a node hash, a leaf hash, or a key's state hash.
pub type Hash = [u8; 32];

/// The hash of an empty subtree, which is stored nowhere. Any fixed value works because both
/// sides of a comparison use it; zero is obviously fixed, and BLAKE3 yields it with probability
/// 2^-256, so a real node never passes for an empty one.
pub const EMPTY: Hash = [0; 32];

const ITEM_DOMAIN: &[u8] = b"quorumkv/merkle/item/v1\0";
const LEAF_DOMAIN: &[u8] = b"quorumkv/merkle/leaf/v1\0";
const INNER_DOMAIN: &[u8] = b"quorumkv/merkle/inner/v1\0";

/// A 256-bit unsigned integer as four little-endian `u64` limbs, added and subtracted modulo
/// 2^256. Wrapping arithmetic is what makes the bucket sum a group: every insert has an exact
/// inverse, whatever order the updates come in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sum([u64; 4]);

impl Sum {
    /// Reads a digest as a little-endian 256-bit integer.
    fn from_hash(hash: &Hash) -> Sum {
        let mut limbs = [0u64; 4];
        for (limb, chunk) in limbs.iter_mut().zip(hash.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(bytes);
        }
        Sum(limbs)
    }

    /// `self += other (mod 2^256)`.
    pub(crate) fn add(&mut self, other: &Sum) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(other.0) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    /// `self -= other (mod 2^256)`.
    pub(crate) fn sub(&mut self, other: &Sum) {
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(other.0) {
            let (d1, b1) = a.overflowing_sub(b);
            let (d2, b2) = d1.overflowing_sub(u64::from(borrow));
            *a = d2;
            borrow = b1 || b2;
        }
    }

    fn to_le_bytes(self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        for (chunk, limb) in bytes.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        bytes
    }
}

/// The contribution of one key in one state to its bucket:
/// `BLAKE3(domain || len(key) as u64 LE || key || state_hash)`. The length prefix keeps the
/// split between key and state unambiguous.
pub(crate) fn item_hash(key: &[u8], state: &Hash) -> Sum {
    let mut hasher = blake3::Hasher::new();
    hasher.update(ITEM_DOMAIN);
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(state);
    Sum::from_hash(hasher.finalize().as_bytes())
}

/// The hash a non-empty bucket shows its parent: `BLAKE3(domain || sum || count)`. Hashing the
/// sum (rather than sending it) keeps the wire format uniform with inner nodes, and the count
/// makes a bucket whose items happen to sum to zero still differ from an empty one.
pub(crate) fn leaf_hash(sum: &Sum, count: u64) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(LEAF_DOMAIN);
    hasher.update(&sum.to_le_bytes());
    hasher.update(&count.to_le_bytes());
    *hasher.finalize().as_bytes()
}

/// A true Merkle node: `BLAKE3(domain || child_0 || ... || child_15)`, with [`EMPTY`] standing
/// in for absent children. The child's position is implied by its slot, so moving a key between
/// buckets changes the hash even if the multiset of leaf hashes stays the same.
pub(crate) fn inner_hash(children: &[Hash; 16]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(INNER_DOMAIN);
    for child in children {
        hasher.update(child);
    }
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_add_and_sub_are_inverse_with_carries() {
        let max = Sum([u64::MAX; 4]);
        let one = Sum([1, 0, 0, 0]);
        let mut s = max;
        s.add(&one);
        assert_eq!(
            s,
            Sum::default(),
            "2^256 - 1 + 1 wraps to zero through every limb"
        );
        s.sub(&one);
        assert_eq!(s, max);
        let a = item_hash(b"a", &[1; 32]);
        let b = item_hash(b"b", &[2; 32]);
        let mut x = Sum::default();
        x.add(&a);
        x.add(&b);
        x.sub(&a);
        assert_eq!(x, b);
    }

    #[test]
    fn item_hash_frames_key_and_state() {
        assert_ne!(item_hash(b"k", &[0; 32]), item_hash(b"k", &[1; 32]));
        assert_ne!(item_hash(b"k1", &[0; 32]), item_hash(b"k", &[0; 32]));
    }
}
