//! One level of a tree as it travels between replicas, and the comparison of two of them.

use super::geometry::Geometry;
use super::hash::{Hash, EMPTY};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The non-empty nodes of one tree level below a set of parents, as one side of a comparison
/// sends them.
///
/// `entries` holds `(index, hash)` pairs sorted by index, without duplicates and without
/// [`EMPTY`] hashes: an absent index means an empty subtree. Encoded with MessagePack this is a
/// two-element array, with each index a variable-length integer and each hash a 32-byte binary
/// string, about 36 bytes per node.
///
/// A `Level` decoded from a peer is untrusted: call [`Level::validate`] (structure) or
/// [`Level::validate_reply`] (structure, and that it answers the request) before using it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    /// Which level the entries are at: 0 is the range root, `depth` the buckets.
    pub level: u8,
    /// The non-empty nodes, sorted by index.
    #[serde(with = "wire_entries")]
    pub entries: Vec<(u32, Hash)>,
}

impl Level {
    /// Checks the structure against `geometry`: `level <= depth`, indices strictly increasing
    /// (so sorted and unique), every index below `16^level`, no [`EMPTY`] hash. Fails with
    /// [`Error::InvalidMerkleLevel`].
    pub fn validate(&self, geometry: &Geometry) -> Result<()> {
        if self.level > geometry.depth() {
            return invalid(format!(
                "level {} is deeper than the tree depth {}",
                self.level,
                geometry.depth()
            ));
        }
        let positions = geometry.positions_at(self.level);
        let mut previous: Option<u32> = None;
        for &(index, ref hash) in &self.entries {
            if u64::from(index) >= positions {
                return invalid(format!(
                    "index {index} is outside 0..{positions} at level {}",
                    self.level
                ));
            }
            if previous.is_some_and(|p| p >= index) {
                return invalid(format!("index {index} is out of order or repeated"));
            }
            if *hash == EMPTY {
                return invalid(format!("index {index} is listed with the empty hash"));
            }
            previous = Some(index);
        }
        Ok(())
    }

    /// Checks that this level is a well-formed answer to the request "level `level`, children of
    /// `parents`": [`validate`](Self::validate), the right level, and every entry a child of a
    /// requested parent. Without the last check a peer could steer the comparison into subtrees
    /// nobody asked about.
    pub fn validate_reply(&self, geometry: &Geometry, level: u8, parents: &[u32]) -> Result<()> {
        self.validate(geometry)?;
        if self.level != level {
            return invalid(format!(
                "level {} answers a request for {level}",
                self.level
            ));
        }
        if level == 0 {
            return Ok(());
        }
        let parents = sorted_unique(parents);
        for &(index, _) in &self.entries {
            if parents.binary_search(&(index >> 4)).is_err() {
                return invalid(format!(
                    "index {index} is not a child of a requested parent"
                ));
            }
        }
        Ok(())
    }
}

/// The indices at which two levels differ: present on one side only, or present on both with
/// different hashes. Sorted, so they can be sent as the parents of the next request.
///
/// Both levels should be validated and at the same level; this merge walk does not check, and
/// never panics either way.
pub fn diff_level(mine: &Level, theirs: &Level) -> Vec<u32> {
    diff_entries(&mine.entries, &theirs.entries).0
}

/// The merge walk behind [`diff_level`]. Also returns how many indices it compared (the size of
/// the union), which is the work a diff reports.
pub(crate) fn diff_entries(mine: &[(u32, Hash)], theirs: &[(u32, Hash)]) -> (Vec<u32>, u64) {
    let mut differing = Vec::new();
    let mut compared = 0u64;
    let (mut i, mut j) = (0, 0);
    while i < mine.len() || j < theirs.len() {
        compared += 1;
        match (mine.get(i), theirs.get(j)) {
            (Some(&(a, ref ha)), Some(&(b, ref hb))) if a == b => {
                if ha != hb {
                    differing.push(a);
                }
                i += 1;
                j += 1;
            }
            (Some(&(a, _)), Some(&(b, _))) if a < b => {
                differing.push(a);
                i += 1;
            }
            (Some(&(a, _)), None) => {
                differing.push(a);
                i += 1;
            }
            (_, Some(&(b, _))) => {
                differing.push(b);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (differing, compared)
}

/// `parents` sorted and without duplicates, copying only when the caller did not already sort.
pub(crate) fn sorted_unique(parents: &[u32]) -> Cow<'_, [u32]> {
    if parents.windows(2).all(|w| w[0] < w[1]) {
        Cow::Borrowed(parents)
    } else {
        let mut owned = parents.to_vec();
        owned.sort_unstable();
        owned.dedup();
        Cow::Owned(owned)
    }
}

fn invalid<T>(reason: String) -> Result<T> {
    Err(Error::InvalidMerkleLevel { reason })
}

/// Encodes `Vec<(u32, Hash)>` with each hash as a binary string (`serde_bytes`) rather than a
/// sequence of 32 integers, which MessagePack would spend up to 64 bytes on.
mod wire_entries {
    use super::Hash;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteArray, Bytes};

    pub(super) fn serialize<S: Serializer>(
        entries: &[(u32, Hash)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(entries.iter().map(|(i, h)| (i, Bytes::new(h))))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<(u32, Hash)>, D::Error> {
        // ByteArray<32> rejects a binary string of any other length, so a short or long hash
        // from a peer is a decode error, not a panic.
        let raw = Vec::<(u32, ByteArray<32>)>::deserialize(deserializer)?;
        Ok(raw.into_iter().map(|(i, h)| (i, h.into_array())).collect())
    }
}
