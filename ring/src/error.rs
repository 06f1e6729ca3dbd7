//! The crate's one error type.
//!
//! Every message names the offending value, so an operator reading a log line can act on it
//! without the source. Errors fall in three groups: bad input from the caller (names, settings,
//! changes that do not apply), impossible requests (a replication factor the ring cannot serve),
//! and corrupt rings received from elsewhere ([`Error::is_corrupt_ring`]). None is retryable: the
//! ring is a pure function of its input, so asking again gives the same answer.

use crate::node::NodeId;

/// Everything that can go wrong in placement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid {kind} {value:?}: {reason}")]
    InvalidName {
        kind: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("node {id} has capacity 0; capacity must be at least 1")]
    ZeroCapacity { id: NodeId },
    #[error("range count {range_count} is not a power of two between 1 and 65536")]
    InvalidRangeCount { range_count: u64 },
    #[error("rf_max {rf_max} is outside 1..={max}")]
    InvalidRfMax { rf_max: u64, max: usize },
    #[error("a ring needs at least one member")]
    NoMembers,
    #[error("{count} members exceed the limit of {max}")]
    TooManyMembers { count: usize, max: usize },
    #[error("node {id} is already a member")]
    DuplicateNode { id: NodeId },
    #[error("node {id} is not a member")]
    UnknownNode { id: NodeId },
    #[error("cannot remove node {id}: it is the last member")]
    LastMember { id: NodeId },
    #[error("the change leaves node {id} as it is")]
    NoChange { id: NodeId },
    #[error("replication factor 0 is not allowed; at least one replica is needed")]
    ZeroReplication,
    #[error("replication factor {n} exceeds the {nodes} members of the ring")]
    NotEnoughNodes { n: usize, nodes: usize },
    #[error("replication factor {n} exceeds the ring's rf_max of {rf_max}")]
    AboveRfMax { n: usize, rf_max: usize },
    #[error("range {range} is out of bounds; the ring has {range_count} ranges")]
    RangeOutOfBounds { range: u32, range_count: u32 },
    #[error("ring version {version} cannot be incremented")]
    VersionOverflow { version: u64 },
    #[error("corrupt ring: {reason}")]
    CorruptRing { reason: String },
    #[error("cannot encode ring: {reason}")]
    Encode { reason: String },
}

impl Error {
    /// True when the error describes a ring that failed validation (decoded or computed). A node
    /// that receives such a ring from a peer should drop it and keep its own.
    pub fn is_corrupt_ring(&self) -> bool {
        matches!(self, Error::CorruptRing { .. })
    }

    /// Placement is pure: the same input fails the same way every time.
    pub fn is_retryable(&self) -> bool {
        false
    }

    pub(crate) fn corrupt(reason: impl Into<String>) -> Error {
        Error::CorruptRing {
            reason: reason.into(),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
