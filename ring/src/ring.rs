//! The ring: a versioned, validated placement table and everything read from it.
//!
//! See the crate documentation for the model. This module holds the [`Ring`] value, its
//! construction ([`Ring::build`], [`Ring::apply`]), lookups ([`Ring::range_of`],
//! [`Ring::preference_list`], [`Ring::fallbacks`]) and its wire form (serde with validation,
//! [`Ring::fingerprint`]).

use crate::error::{Error, Result};
use crate::node::{Node, NodeId, Zone};
use crate::place::{self, Placer, Shape, HOLE};
use crate::quota::{self, Member};
use crate::token::Token;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Most ranges a ring may have (2^16): member indices and range numbers stay small.
pub const RANGE_COUNT_MAX: u32 = 1 << 16;
/// Largest allowed `rf_max`: the width of the table.
pub const RF_MAX_LIMIT: usize = 16;
/// Most members a ring may have. Placement time grows with members × ranges; beyond this a
/// cluster should use more ranges per node and fewer, larger nodes.
pub const MEMBERS_MAX: usize = 1024;

/// Separates fallback hashing from every other BLAKE3 use.
const FALLBACK_DOMAIN: &[u8] = b"quorumkv/fallback/v1\0";
/// Separates placement tie-break keys from every other BLAKE3 use.
const KEY_DOMAIN: &[u8] = b"quorumkv/placement-key/v1\0";

/// Settings fixed when the cluster is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RingConfig {
    /// Number of equal ranges the token space is cut into (Q): a power of two in 1..=65536.
    pub range_count: u32,
    /// The largest replication factor any keyspace may use. Preference lists are computed this
    /// wide (or as wide as there are members, if fewer).
    pub rf_max: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            range_count: 1024,
            rf_max: 5,
        }
    }
}

impl RingConfig {
    /// A checked configuration.
    pub fn new(range_count: u32, rf_max: u32) -> Result<RingConfig> {
        let config = RingConfig {
            range_count,
            rf_max,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks both settings against their documented ranges.
    pub fn validate(&self) -> Result<()> {
        if !self.range_count.is_power_of_two() || self.range_count > RANGE_COUNT_MAX {
            return Err(Error::InvalidRangeCount {
                range_count: u64::from(self.range_count),
            });
        }
        if self.rf_max == 0 || self.rf_max as usize > RF_MAX_LIMIT {
            return Err(Error::InvalidRfMax {
                rf_max: u64::from(self.rf_max),
                max: RF_MAX_LIMIT,
            });
        }
        Ok(())
    }
}

/// One membership change; each produces the next ring version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Add(Node),
    Remove(NodeId),
    Reweigh {
        id: NodeId,
        capacity: u32,
    },
    /// Moves a node to another zone (for example after it was relabelled to its real rack).
    Rezone {
        id: NodeId,
        zone: Zone,
    },
}

/// A segment of the token space: `range_count` equal segments numbered from token 0 upwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RangeId(pub u32);

impl fmt::Display for RangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// BLAKE3 of a ring's canonical bytes. Two nodes agree on placement iff fingerprints match.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A borrowed view of the first N entries of one range's preference list. No allocation.
#[derive(Clone, Copy)]
pub struct PreferenceList<'a> {
    members: &'a [Node],
    entries: &'a [u16],
}

impl<'a> PreferenceList<'a> {
    /// Number of replicas (N).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never true for a list obtained from a ring (N ≥ 1), provided for completeness.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The replicas in preference order; the first is the preferred coordinator.
    pub fn iter(&self) -> Replicas<'a> {
        Replicas {
            members: self.members,
            entries: self.entries.iter(),
        }
    }

    /// The replica at `position` (0-based), if the list is that long.
    pub fn node(&self, position: usize) -> Option<&'a Node> {
        self.entries
            .get(position)
            .and_then(|&e| self.members.get(e as usize))
    }

    /// The replicas' ids in preference order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = &'a NodeId> + 'a {
        self.iter().map(|node| &node.id)
    }

    /// Whether `id` is one of these replicas.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.iter().any(|node| &node.id == id)
    }

    /// Member indices (positions in [`Ring::members`]) in preference order.
    pub fn member_indices(&self) -> &'a [u16] {
        self.entries
    }
}

impl<'a> IntoIterator for PreferenceList<'a> {
    type Item = &'a Node;
    type IntoIter = Replicas<'a>;

    fn into_iter(self) -> Replicas<'a> {
        self.iter()
    }
}

/// Iterator over the nodes of a [`PreferenceList`]; borrows the ring, allocates nothing.
#[derive(Clone, Debug)]
pub struct Replicas<'a> {
    members: &'a [Node],
    entries: std::slice::Iter<'a, u16>,
}

impl<'a> Iterator for Replicas<'a> {
    type Item = &'a Node;

    #[inline]
    fn next(&mut self) -> Option<&'a Node> {
        // Entries were validated against the member count when the ring was made, so `get`
        // never fails; it is used to keep indexing panic-free all the same.
        self.entries
            .next()
            .and_then(|&e| self.members.get(e as usize))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

impl ExactSizeIterator for Replicas<'_> {}

impl DoubleEndedIterator for Replicas<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.entries
            .next_back()
            .and_then(|&e| self.members.get(e as usize))
    }
}

impl fmt::Debug for PreferenceList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

/// The placement of every range: see the crate documentation.
///
/// Immutable; [`Ring::apply`] returns the next version. Serializes (rmp-serde) to its canonical
/// form and deserializes only what passes [`Ring`]'s validation.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RingWire")]
pub struct Ring {
    version: u64,
    config: RingConfig,
    /// Sorted by id, unique.
    members: Vec<Node>,
    /// `range_count × width` member indices, row-major.
    table: Vec<u16>,
    #[serde(skip_serializing)]
    width: usize,
    /// Right shift from a token to its range (64 - log2 Q); 64 for one range.
    #[serde(skip_serializing)]
    shift: u32,
    #[serde(skip_serializing)]
    fingerprint: Fingerprint,
}

/// The wire form, checked by `TryFrom` before it becomes a [`Ring`]. Field order matches
/// [`Ring`]'s serialized fields.
#[derive(Deserialize)]
struct RingWire {
    version: u64,
    config: RingConfig,
    members: Vec<Node>,
    table: Vec<u16>,
}

impl TryFrom<RingWire> for Ring {
    type Error = Error;
    fn try_from(wire: RingWire) -> Result<Ring> {
        Ring::assemble(wire.version, wire.config, wire.members, wire.table)
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("version", &self.version)
            .field("config", &self.config)
            .field("members", &self.members.len())
            .field("width", &self.width)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Zones numbered in name order, and each member's zone number.
fn zone_layout(members: &[Node]) -> (Vec<usize>, Vec<usize>) {
    let mut names: Vec<&Zone> = members.iter().map(|m| &m.zone).collect();
    names.sort();
    names.dedup();
    let zone_of: Vec<usize> = members
        .iter()
        .map(|m| names.binary_search(&&m.zone).unwrap_or(0))
        .collect();
    let mut sizes = vec![0usize; names.len()];
    for &z in &zone_of {
        sizes[z] += 1;
    }
    (zone_of, sizes)
}

fn placement_key(id: &NodeId) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(KEY_DOMAIN);
    hasher.update(id.as_str().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_be_bytes(first)
}

fn check_members(members: &[Node]) -> Result<()> {
    if members.is_empty() {
        return Err(Error::NoMembers);
    }
    if members.len() > MEMBERS_MAX {
        return Err(Error::TooManyMembers {
            count: members.len(),
            max: MEMBERS_MAX,
        });
    }
    members.iter().try_for_each(Node::validate)
}

impl Ring {
    /// Version 1: a pure function of the configuration and the set of members (their order in
    /// `members` does not matter; duplicates are an error).
    pub fn build(config: RingConfig, members: impl IntoIterator<Item = Node>) -> Result<Ring> {
        config.validate()?;
        let mut members: Vec<Node> = members.into_iter().collect();
        check_members(&members)?;
        members.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = members.windows(2).find(|p| p[0].id == p[1].id) {
            return Err(Error::DuplicateNode {
                id: pair[0].id.clone(),
            });
        }
        Ring::place(1, config, members, None)
    }

    /// The next version: a pure function of this ring and `change`.
    pub fn apply(&self, change: &Change) -> Result<Ring> {
        let version = self.version.checked_add(1).ok_or(Error::VersionOverflow {
            version: self.version,
        })?;
        let mut members = self.members.clone();
        // remap[old index] = new index, or HOLE for a removed node.
        let remap: Vec<u16> = match change {
            Change::Add(node) => {
                node.validate()?;
                let at = match members.binary_search_by(|m| m.id.cmp(&node.id)) {
                    Ok(_) => {
                        return Err(Error::DuplicateNode {
                            id: node.id.clone(),
                        })
                    }
                    Err(at) => at,
                };
                if members.len() + 1 > MEMBERS_MAX {
                    return Err(Error::TooManyMembers {
                        count: members.len() + 1,
                        max: MEMBERS_MAX,
                    });
                }
                members.insert(at, node.clone());
                (0..self.members.len())
                    .map(|i| if i < at { i as u16 } else { i as u16 + 1 })
                    .collect()
            }
            Change::Remove(id) => {
                let at = self.index_of(id)?;
                if members.len() == 1 {
                    return Err(Error::LastMember { id: id.clone() });
                }
                members.remove(at);
                (0..self.members.len())
                    .map(|i| match i.cmp(&at) {
                        std::cmp::Ordering::Less => i as u16,
                        std::cmp::Ordering::Equal => HOLE,
                        std::cmp::Ordering::Greater => i as u16 - 1,
                    })
                    .collect()
            }
            Change::Reweigh { id, capacity } => {
                let at = self.index_of(id)?;
                if *capacity == 0 {
                    return Err(Error::ZeroCapacity { id: id.clone() });
                }
                if members[at].capacity == *capacity {
                    return Err(Error::NoChange { id: id.clone() });
                }
                members[at].capacity = *capacity;
                (0..self.members.len()).map(|i| i as u16).collect()
            }
            Change::Rezone { id, zone } => {
                let at = self.index_of(id)?;
                if &members[at].zone == zone {
                    return Err(Error::NoChange { id: id.clone() });
                }
                members[at].zone = zone.clone();
                (0..self.members.len()).map(|i| i as u16).collect()
            }
        };
        let old: Vec<u16> = self
            .table
            .iter()
            .map(|&e| remap.get(e as usize).copied().unwrap_or(HOLE))
            .collect();
        Ring::place(version, self.config, members, Some((old, self.width)))
    }

    /// The one placement path: start from the previous table (or nothing), rebalance, validate.
    fn place(
        version: u64,
        config: RingConfig,
        members: Vec<Node>,
        previous: Option<(Vec<u16>, usize)>,
    ) -> Result<Ring> {
        let q = config.range_count as usize;
        let width = (config.rf_max as usize).min(members.len());
        let (zone_of, zone_sizes) = zone_layout(&members);
        let bound: Vec<usize> = (1..=width)
            .map(|n| quota::zone_bound(&zone_sizes, n))
            .collect();
        let keys: Vec<u64> = members.iter().map(|m| placement_key(&m.id)).collect();
        let shape = Shape {
            range_count: q,
            width,
            zone_of: &zone_of,
            bound: &bound,
            keys: &keys,
        };
        let (old, old_width) = previous.unwrap_or_default();
        let mut table = vec![HOLE; q * width];
        if old_width > 0 {
            for (row, old_row) in table.chunks_mut(width).zip(old.chunks(old_width)) {
                if width >= old_width {
                    // Keep every survivor in its column: holes are refilled in place.
                    row[..old_width].copy_from_slice(old_row);
                } else {
                    // The list got narrower (fewer members than rf_max): close up the gaps.
                    let survivors = old_row.iter().copied().filter(|&e| e != HOLE);
                    for (cell, e) in row.iter_mut().zip(survivors) {
                        *cell = e;
                    }
                }
            }
        }
        place::clear_zone_violations(&shape, &mut table);
        let current = place::prefix_counts(&table, width, members.len());
        let quota_members: Vec<Member> = (0..members.len())
            .map(|i| Member {
                zone: zone_of[i],
                capacity: members[i].capacity,
                key: keys[i],
            })
            .collect();
        let quotas = quota::prefix_quotas(q as u64, width, &quota_members, &zone_sizes, &current);
        let table = Placer::new(&shape, table, &old, old_width, &quotas).run()?;
        Ring::assemble(version, config, members, table)
    }

    /// Validates every invariant and computes the derived fields. The only way a [`Ring`] value
    /// comes to exist, whether computed here or decoded from a peer.
    fn assemble(
        version: u64,
        config: RingConfig,
        members: Vec<Node>,
        table: Vec<u16>,
    ) -> Result<Ring> {
        config.validate()?;
        check_members(&members)?;
        if version == 0 {
            return Err(Error::corrupt("version 0; versions start at 1"));
        }
        if let Some(pair) = members.windows(2).find(|p| p[0].id >= p[1].id) {
            return Err(Error::corrupt(format!(
                "members not sorted and unique at {} / {}",
                pair[0].id, pair[1].id
            )));
        }
        let width = (config.rf_max as usize).min(members.len());
        let expected = config.range_count as usize * width;
        if table.len() != expected {
            return Err(Error::corrupt(format!(
                "table has {} entries, expected {} ranges × {} = {}",
                table.len(),
                config.range_count,
                width,
                expected
            )));
        }
        let (zone_of, zone_sizes) = zone_layout(&members);
        let bound: Vec<usize> = (1..=width)
            .map(|n| quota::zone_bound(&zone_sizes, n))
            .collect();
        let mut zone_held = vec![0usize; zone_sizes.len()];
        for (r, row) in table.chunks(width).enumerate() {
            zone_held.iter_mut().for_each(|c| *c = 0);
            for (p, &e) in row.iter().enumerate() {
                let Some(&zone) = zone_of.get(e as usize) else {
                    return Err(Error::corrupt(format!(
                        "range {r} names member index {e}, but there are {} members",
                        members.len()
                    )));
                };
                if row[..p].contains(&e) {
                    return Err(Error::corrupt(format!(
                        "range {r} lists member {} twice",
                        members[e as usize].id
                    )));
                }
                zone_held[zone] += 1;
                if zone_held[zone] > bound[p] {
                    return Err(Error::corrupt(format!(
                        "range {r}: zone {} holds {} of the first {} entries; at most {} allowed",
                        members[e as usize].zone,
                        zone_held[zone],
                        p + 1,
                        bound[p]
                    )));
                }
            }
        }
        let mut ring = Ring {
            version,
            config,
            members,
            table,
            width,
            shift: 64 - config.range_count.trailing_zeros(),
            fingerprint: Fingerprint::default(),
        };
        let bytes = ring.to_bytes()?;
        ring.fingerprint = Fingerprint(*blake3::hash(&bytes).as_bytes());
        Ok(ring)
    }

    /// Canonical bytes (rmp-serde, struct fields as arrays). [`Ring::fingerprint`] hashes these.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        rmp_serde::to_vec(self).map_err(|e| Error::Encode {
            reason: e.to_string(),
        })
    }

    /// Decodes and validates a ring received from elsewhere. Never panics on bad input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Ring> {
        rmp_serde::from_slice(bytes).map_err(|e| {
            // A validation failure inside `try_from` comes back as a custom decode error; keep
            // its text, which already names the offending value.
            Error::corrupt(e.to_string())
        })
    }

    /// BLAKE3 of [`Ring::to_bytes`], computed once when the ring was made.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn config(&self) -> RingConfig {
        self.config
    }

    /// Q, the number of ranges.
    pub fn range_count(&self) -> u32 {
        self.config.range_count
    }

    /// Length of the stored preference lists: `min(rf_max, members)`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Members sorted by id. Positions in this slice are the "member indices" used by
    /// [`PreferenceList::member_indices`] and [`Ring::load`].
    pub fn members(&self) -> &[Node] {
        &self.members
    }

    /// The member with this id.
    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.index_of(id).ok().map(|i| &self.members[i])
    }

    /// Position of `id` in [`Ring::members`].
    pub fn index_of(&self, id: &NodeId) -> Result<usize> {
        self.members
            .binary_search_by(|m| m.id.cmp(id))
            .map_err(|_| Error::UnknownNode { id: id.clone() })
    }

    /// The range holding `token`: its top log2(Q) bits.
    #[inline]
    pub fn range_of(&self, token: Token) -> RangeId {
        // `checked_shr` yields None for a shift of 64 (one range), where every token is range 0.
        RangeId(token.0.checked_shr(self.shift).unwrap_or(0) as u32)
    }

    /// The first token of `range`; the range ends just before the next range's first token.
    pub fn range_start(&self, range: RangeId) -> Token {
        Token(u64::from(range.0).checked_shl(self.shift).unwrap_or(0))
    }

    /// Checks that a keyspace with `n` replicas can be served by this ring.
    pub fn check_replication(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::ZeroReplication);
        }
        if n > self.members.len() {
            return Err(Error::NotEnoughNodes {
                n,
                nodes: self.members.len(),
            });
        }
        if n > self.width {
            return Err(Error::AboveRfMax {
                n,
                rf_max: self.config.rf_max as usize,
            });
        }
        Ok(())
    }

    /// The first `n` entries of `range`'s preference list: a slice of the table, no allocation.
    #[inline]
    pub fn preference_list(&self, range: RangeId, n: usize) -> Result<PreferenceList<'_>> {
        self.check_replication(n)?;
        let start = range.0 as usize * self.width;
        match self.table.get(start..start + n) {
            Some(entries) => Ok(PreferenceList {
                members: &self.members,
                entries,
            }),
            None => Err(Error::RangeOutOfBounds {
                range: range.0,
                range_count: self.config.range_count,
            }),
        }
    }

    /// Token and preference list of a key in one call.
    #[inline]
    pub fn preference_list_for(
        &self,
        keyspace: &str,
        key: &[u8],
        n: usize,
    ) -> Result<PreferenceList<'_>> {
        self.preference_list(self.range_of(Token::of(keyspace, key)), n)
    }

    /// Every member that is not in `range`'s (full-width) preference list, in a deterministic
    /// order that differs from range to range: rendezvous hashing, highest BLAKE3 of
    /// (range, node id) first. When a node fails, its ranges therefore fall back onto many
    /// different nodes instead of all onto its neighbour.
    pub fn fallbacks(&self, range: RangeId) -> Result<Vec<&Node>> {
        let list = self.preference_list(range, self.width)?;
        let listed = list.member_indices();
        let mut scored: Vec<([u8; 32], &Node)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| !listed.contains(&(*i as u16)))
            .map(|(_, node)| {
                let mut hasher = blake3::Hasher::new();
                hasher.update(FALLBACK_DOMAIN);
                hasher.update(&range.0.to_be_bytes());
                hasher.update(node.id.as_str().as_bytes());
                (*hasher.finalize().as_bytes(), node)
            })
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        Ok(scored.into_iter().map(|(_, node)| node).collect())
    }

    /// Where a keyspace with `n` replicas sends writes its replicas cannot take (sloppy
    /// quorum): first the rest of the stored list (entries `n+1..=width`, which are already
    /// balanced and spread), then [`Ring::fallbacks`].
    pub fn fallbacks_for(&self, range: RangeId, n: usize) -> Result<Vec<&Node>> {
        self.check_replication(n)?;
        let rest = self.preference_list(range, self.width)?;
        let mut out: Vec<&Node> = rest.iter().skip(n).collect();
        out.extend(self.fallbacks(range)?);
        Ok(out)
    }

    /// Entries per member (indexed like [`Ring::members`]) in the first `n` columns: how many
    /// ranges each node replicates for a keyspace with `n` replicas. `n` is clamped to the width.
    pub fn load(&self, n: usize) -> Vec<u64> {
        let n = n.min(self.width);
        let mut counts = vec![0u64; self.members.len()];
        for row in self.table.chunks(self.width) {
            for &e in &row[..n] {
                counts[e as usize] += 1;
            }
        }
        counts
    }

    /// Each member's achievable fair share of the first `n` columns (a real number): capacity-
    /// proportional, water-filled under the one-replica-per-range cap and the zone rule. The
    /// quotas placement aims for are these, rounded.
    pub fn fair_shares(&self, n: usize) -> Vec<f64> {
        let n = n.min(self.width);
        let (zone_of, zone_sizes) = zone_layout(&self.members);
        let members: Vec<Member> = self
            .members
            .iter()
            .zip(&zone_of)
            .map(|(m, &zone)| Member {
                zone,
                capacity: m.capacity,
                key: 0,
            })
            .collect();
        let mut all =
            quota::fair_shares(u64::from(self.config.range_count), n, &members, &zone_sizes);
        all.pop().unwrap_or_default()
    }

    /// The zone bound `L(n)` for this ring's zones (see [`crate::quota::zone_bound`]).
    pub fn zone_bound(&self, n: usize) -> usize {
        quota::zone_bound(&zone_layout(&self.members).1, n)
    }

    /// Number of distinct zones.
    pub fn zone_count(&self) -> usize {
        zone_layout(&self.members).1.len()
    }

    /// Ranges whose first `n` entries put more than `L(n)` replicas in one zone. Always 0 for a
    /// valid ring; exposed so tools and tests can say so.
    pub fn zone_violations(&self, n: usize) -> u64 {
        let n = n.min(self.width);
        let (zone_of, zone_sizes) = zone_layout(&self.members);
        let bound = quota::zone_bound(&zone_sizes, n);
        let mut held = vec![0usize; zone_sizes.len()];
        let mut violations = 0;
        for row in self.table.chunks(self.width) {
            held.iter_mut().for_each(|c| *c = 0);
            for &e in &row[..n] {
                held[zone_of[e as usize]] += 1;
            }
            if held.iter().any(|&h| h > bound) {
                violations += 1;
            }
        }
        violations
    }
}

/// Replicas moved between two rings for keyspaces with `n` replicas: summed over ranges, the
/// nodes in the new ring's first `n` entries that were not in the old ring's first `n`.
/// Reordering inside a list is not movement. `n` is clamped to each ring's width. Rings with
/// different range counts are compared range by range of the finer one (each fine range maps
/// to the coarse range holding its first token).
pub fn moved(old: &Ring, new: &Ring, n: usize) -> u64 {
    let old_n = n.min(old.width);
    let new_n = n.min(new.width);
    // new member index → old member index (or None for a newcomer).
    let to_old: Vec<Option<u16>> = new
        .members
        .iter()
        .map(|m| old.index_of(&m.id).ok().map(|i| i as u16))
        .collect();
    let ranges = old.config.range_count.max(new.config.range_count);
    let fine = if old.config.range_count >= new.config.range_count {
        old
    } else {
        new
    };
    let mut total = 0u64;
    for r in 0..ranges {
        let token = fine.range_start(RangeId(r));
        let (ro, rn) = (
            old.range_of(token).0 as usize,
            new.range_of(token).0 as usize,
        );
        let old_row = &old.table[ro * old.width..ro * old.width + old_n];
        let new_row = &new.table[rn * new.width..rn * new.width + new_n];
        total += new_row
            .iter()
            .filter(|&&e| to_old[e as usize].is_none_or(|o| !old_row.contains(&o)))
            .count() as u64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, zone: &str, capacity: u32) -> Node {
        Node::new(NodeId::new(id).unwrap(), Zone::new(zone).unwrap(), capacity).unwrap()
    }

    fn nodes(count: usize) -> Vec<Node> {
        (0..count)
            .map(|i| node(&format!("n{i:02}"), "z", 1))
            .collect()
    }

    fn ring(count: usize, range_count: u32, rf_max: u32) -> Ring {
        Ring::build(RingConfig::new(range_count, rf_max).unwrap(), nodes(count)).unwrap()
    }

    #[test]
    fn range_of_takes_the_top_bits_even_for_one_range() {
        let one = ring(2, 1, 2);
        assert_eq!(one.range_of(Token(u64::MAX)), RangeId(0));
        assert_eq!(one.range_of(Token(0)), RangeId(0));
        let two = ring(2, 2, 2);
        assert_eq!(two.range_of(Token(u64::MAX >> 1)), RangeId(0));
        assert_eq!(two.range_of(Token(1 << 63)), RangeId(1));
        let big = ring(2, 1 << 16, 1);
        assert_eq!(big.range_of(Token(u64::MAX)), RangeId(65535));
        assert_eq!(big.range_start(RangeId(1)), Token(1 << 48));
        assert_eq!(one.range_start(RangeId(0)), Token(0));
    }

    #[test]
    fn config_is_validated() {
        for bad in [0, 3, 1000, 1 << 17] {
            assert_eq!(
                RingConfig::new(bad, 3).unwrap_err(),
                Error::InvalidRangeCount {
                    range_count: u64::from(bad)
                }
            );
        }
        assert!(matches!(
            RingConfig::new(1024, 0),
            Err(Error::InvalidRfMax { rf_max: 0, .. })
        ));
        assert!(matches!(
            RingConfig::new(1024, 17),
            Err(Error::InvalidRfMax { rf_max: 17, .. })
        ));
        assert_eq!(RingConfig::default(), RingConfig::new(1024, 5).unwrap());
    }

    #[test]
    fn preference_lists_are_borrowed_slices_of_the_width() {
        let r = ring(10, 1024, 5);
        assert_eq!(r.width(), 5);
        let list = r.preference_list(RangeId(7), 3).unwrap();
        assert_eq!(list.len(), 3);
        let ids: Vec<&NodeId> = list.ids().collect();
        let full = r.preference_list(RangeId(7), 5).unwrap();
        assert_eq!(ids, full.ids().take(3).collect::<Vec<_>>());
        assert!(list.contains(ids[0]));
        assert_eq!(list.node(0).map(|n| &n.id), Some(ids[0]));
        assert!(list.node(3).is_none());
        let via_key = r.preference_list_for("ks", b"key", 3).unwrap();
        assert_eq!(via_key.len(), 3);
    }

    #[test]
    fn replication_factor_is_checked() {
        let r = ring(4, 64, 3);
        assert_eq!(r.check_replication(0).unwrap_err(), Error::ZeroReplication);
        assert_eq!(
            r.preference_list(RangeId(0), 4).unwrap_err(),
            Error::AboveRfMax { n: 4, rf_max: 3 }
        );
        let small = ring(2, 64, 5);
        assert_eq!(small.width(), 2);
        assert_eq!(
            small.check_replication(3).unwrap_err(),
            Error::NotEnoughNodes { n: 3, nodes: 2 }
        );
        assert_eq!(
            r.preference_list(RangeId(64), 1).unwrap_err(),
            Error::RangeOutOfBounds {
                range: 64,
                range_count: 64
            }
        );
    }

    #[test]
    fn membership_errors_name_the_node() {
        let r = ring(2, 64, 3);
        let n00 = NodeId::new("n00").unwrap();
        let ghost = NodeId::new("ghost").unwrap();
        assert_eq!(
            r.apply(&Change::Add(node("n00", "z", 1))).unwrap_err(),
            Error::DuplicateNode { id: n00.clone() }
        );
        assert_eq!(
            r.apply(&Change::Remove(ghost.clone())).unwrap_err(),
            Error::UnknownNode { id: ghost }
        );
        assert_eq!(
            r.apply(&Change::Reweigh {
                id: n00.clone(),
                capacity: 1
            })
            .unwrap_err(),
            Error::NoChange { id: n00.clone() }
        );
        assert_eq!(
            r.apply(&Change::Reweigh {
                id: n00.clone(),
                capacity: 0
            })
            .unwrap_err(),
            Error::ZeroCapacity { id: n00.clone() }
        );
        let single = r.apply(&Change::Remove(n00.clone())).unwrap();
        let last = single.members()[0].id.clone();
        assert_eq!(
            single.apply(&Change::Remove(last.clone())).unwrap_err(),
            Error::LastMember { id: last }
        );
        assert!(Error::UnknownNode { id: n00 }.to_string().contains("n00"));
        assert_eq!(
            Ring::build(
                RingConfig::default(),
                vec![node("a", "z", 1), node("a", "y", 1)]
            )
            .unwrap_err(),
            Error::DuplicateNode {
                id: NodeId::new("a").unwrap()
            }
        );
        assert_eq!(
            Ring::build(RingConfig::default(), Vec::new()).unwrap_err(),
            Error::NoMembers
        );
    }

    #[test]
    fn versions_count_changes() {
        let r = ring(3, 64, 3);
        assert_eq!(r.version(), 1);
        let next = r.apply(&Change::Add(node("n99", "z", 2))).unwrap();
        assert_eq!(next.version(), 2);
        let moved_zone = next
            .apply(&Change::Rezone {
                id: NodeId::new("n99").unwrap(),
                zone: Zone::new("y").unwrap(),
            })
            .unwrap();
        assert_eq!(moved_zone.version(), 3);
        assert_eq!(moved_zone.zone_violations(3), 0);
    }

    #[test]
    fn tiny_rings_hold_every_node_in_every_list() {
        let one = ring(1, 16, 5);
        assert_eq!(one.width(), 1);
        assert_eq!(one.load(1), vec![16]);
        let two = ring(2, 16, 5);
        assert_eq!(two.load(1), vec![8, 8]);
        assert_eq!(two.load(2), vec![16, 16]);
        // Three nodes, rf 3: every row is a permutation and each column is balanced (a Latin
        // square in effect), so each node is primary, second and third for a third of the ranges.
        let three = ring(3, 1024, 3);
        let column = |j: usize| {
            let mut counts = vec![0u64; 3];
            for row in three.table.chunks(3) {
                counts[row[j] as usize] += 1;
            }
            counts
        };
        for j in 0..3 {
            let c = column(j);
            assert!(c.iter().all(|&v| v == 341 || v == 342), "column {j}: {c:?}");
        }
    }

    #[test]
    fn width_follows_membership_up_to_rf_max() {
        let mut r = ring(2, 256, 4);
        for (i, expected) in [(0, 3), (1, 4), (2, 4)] {
            r = r
                .apply(&Change::Add(node(&format!("m{i}"), "z", 1)))
                .unwrap();
            assert_eq!(r.width(), expected);
        }
        r = r
            .apply(&Change::Remove(NodeId::new("m0").unwrap()))
            .unwrap();
        r = r
            .apply(&Change::Remove(NodeId::new("m1").unwrap()))
            .unwrap();
        assert_eq!(r.width(), 3);
        for n in 1..=3 {
            let load = r.load(n);
            assert!(
                load.iter().all(|&c| c.abs_diff(load[0]) <= 1),
                "N={n}: {load:?}"
            );
        }
    }

    #[test]
    fn fallbacks_exclude_the_list_and_differ_between_ranges() {
        let r = ring(12, 256, 3);
        let mut firsts = std::collections::BTreeSet::new();
        for range in 0..256 {
            let list = r.preference_list(RangeId(range), 3).unwrap();
            let fallbacks = r.fallbacks(RangeId(range)).unwrap();
            assert_eq!(fallbacks.len(), 9);
            assert!(fallbacks.iter().all(|f| !list.contains(&f.id)));
            firsts.insert(fallbacks[0].id.clone());
            let for_two = r.fallbacks_for(RangeId(range), 2).unwrap();
            assert_eq!(for_two.len(), 10);
            assert_eq!(&for_two[0].id, list.node(2).map(|n| &n.id).unwrap());
        }
        assert!(
            firsts.len() >= 10,
            "first fallbacks concentrate on {firsts:?}"
        );
        assert_eq!(
            r.fallbacks(RangeId(3)).unwrap(),
            r.fallbacks(RangeId(3)).unwrap()
        );
    }

    #[test]
    fn decoding_rejects_rings_that_break_an_invariant() {
        let r = ring(4, 16, 3);
        let encode = |version: u64, config: RingConfig, members: &[Node], table: &[u16]| {
            rmp_serde::to_vec(&(version, config, members, table)).unwrap()
        };
        let ok = encode(1, r.config, &r.members, &r.table);
        assert_eq!(Ring::from_bytes(&ok).unwrap(), r);
        let mut unsorted = r.members.clone();
        unsorted.swap(0, 1);
        let mut out_of_bounds = r.table.clone();
        out_of_bounds[5] = 9;
        let mut repeated = r.table.clone();
        repeated[1] = repeated[0];
        let bad_config = RingConfig {
            range_count: 12,
            rf_max: 3,
        };
        for (bytes, needle) in [
            (encode(0, r.config, &r.members, &r.table), "version 0"),
            (encode(1, r.config, &unsorted, &r.table), "not sorted"),
            (encode(1, r.config, &r.members, &r.table[1..]), "expected"),
            (
                encode(1, r.config, &r.members, &out_of_bounds),
                "member index 9",
            ),
            (encode(1, r.config, &r.members, &repeated), "twice"),
            (encode(1, bad_config, &r.members, &r.table), "power of two"),
            (b"\xff\x00garbage".to_vec(), ""),
        ] {
            let err = Ring::from_bytes(&bytes).unwrap_err();
            assert!(err.is_corrupt_ring(), "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        }
    }

    #[test]
    fn decoding_checks_the_zone_rule() {
        let members = vec![node("a", "x", 1), node("b", "x", 1), node("c", "y", 1)];
        let r = Ring::build(RingConfig::new(4, 2).unwrap(), members.clone()).unwrap();
        // Put a and b (both zone x) first in range 0: two zones exist, so that breaks L(2) = 1.
        let mut table = r.table.clone();
        table[0] = 0;
        table[1] = 1;
        let bytes = rmp_serde::to_vec(&(1u64, r.config, &members, &table)).unwrap();
        let err = Ring::from_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("zone x"), "{err}");
    }

    #[test]
    fn fingerprint_is_blake3_of_the_canonical_bytes() {
        let r = ring(5, 64, 3);
        let bytes = r.to_bytes().unwrap();
        assert_eq!(r.fingerprint().0, *blake3::hash(&bytes).as_bytes());
        let hex = r.fingerprint().to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
        let other = r.apply(&Change::Add(node("n99", "z", 1))).unwrap();
        assert_ne!(other.fingerprint(), r.fingerprint());
    }

    #[test]
    fn moved_ignores_reordering_and_counts_set_changes() {
        let r = ring(6, 64, 3);
        assert_eq!(moved(&r, &r, 3), 0);
        let added = r.apply(&Change::Add(node("n99", "z", 1))).unwrap();
        // Every replica the newcomer holds is a move; nothing else has to be.
        let newcomer = added.index_of(&NodeId::new("n99").unwrap()).unwrap();
        assert_eq!(moved(&r, &added, 3), added.load(3)[newcomer]);
    }
}
