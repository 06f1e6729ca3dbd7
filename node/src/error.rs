//! The one error type of the `quorumkv-node` library.

use thiserror::Error;

/// Everything that can go wrong inside the node library.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    // --- version vectors and client contexts ---
    /// The context token is empty, truncated or fails its checksum.
    #[error("invalid context: {reason}")]
    ContextCorrupt { reason: String },
    /// The context token was written by a format this node does not know.
    #[error("invalid context: unknown format version {version}")]
    ContextUnknownVersion { version: u8 },
    /// The context token belongs to another keyspace or key.
    #[error("invalid context: it was issued for a different key")]
    ContextWrongKey,
    /// The context token carries more causal entries than the limit allows.
    #[error("invalid context: {entries} causal entries exceed the limit of {max}")]
    ContextTooLarge { entries: usize, max: usize },
    /// A stored or received key state could not be decoded or breaks an invariant.
    #[error("corrupt key state: {reason}")]
    CorruptState { reason: String },

    // --- Merkle trees ---
    /// The tree geometry (range bits, depth) does not fit a 64-bit token.
    #[error("invalid Merkle geometry: {reason}")]
    InvalidMerkleGeometry { reason: String },
    /// A serialized tree level could not be decoded or does not match the tree.
    #[error("invalid Merkle level: {reason}")]
    InvalidMerkleLevel { reason: String },
}

impl Error {
    /// Whether retrying the same operation may succeed. None of the pure-core errors are
    /// retryable: they describe bad input or corrupt data, which a retry does not change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
