//! The one error type of the `quorumkv-node` library.

use thiserror::Error;

/// Everything that can go wrong inside the node library.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    // --- version vectors and client contexts ---
    /// The context token is empty, truncated, or its contents are undecodable or not canonical.
    #[error("invalid context: {reason}")]
    ContextCorrupt { reason: String },
    /// The context token's MAC was not made with a cluster secret this node accepts: it was
    /// forged or damaged, comes from another cluster, is of an unkeyed format from before
    /// contexts were authenticated, or was sealed with a secret since retired.
    #[error(
        "invalid context: it was not issued by this cluster (forged, damaged, or sealed with a \
         cluster secret no longer accepted); read the key again for a fresh context"
    )]
    ContextNotAuthentic,
    /// The context token was written by a format this node does not know.
    #[error("invalid context: unknown format version {version}")]
    ContextUnknownVersion { version: u8 },
    /// The context token belongs to another keyspace or key.
    #[error("invalid context: it was issued for a different key")]
    ContextWrongKey,
    /// The context token is longer, or carries more causal entries, than the limit allows.
    /// `unit` says which: `"bytes"` or `"causal entries"`.
    #[error("invalid context: {found} {unit} exceed the limit of {max}")]
    ContextTooLarge {
        found: usize,
        max: usize,
        unit: &'static str,
    },
    /// A stored or received key state could not be decoded or breaks an invariant.
    #[error("corrupt key state: {reason}")]
    CorruptState { reason: String },
    /// A write was given a dot that is not above every dot of its actor the key's state already
    /// knows: the dot was not taken from this node's clock with this node's own state of the
    /// key, or the key's counter is exhausted. Storing it could make replicas drop the write, so
    /// it is refused and nothing changes.
    #[error("refused write: dot {dot} is not fresh for this key")]
    DotNotFresh { dot: crate::version_vector::Dot },
    /// The client context claims to have seen a dot of the coordinating actor that the actor
    /// has not issued (a forged context, or one from a lost past of the node). Accepting it
    /// would let this write replace a later write it never saw, so it is refused.
    #[error("invalid context: it claims dot {dot}, which its coordinator has not issued")]
    ContextClaimsUnissuedDot { dot: crate::version_vector::Dot },

    // --- Merkle trees ---
    /// The tree geometry (range bits, depth) does not fit a 64-bit token.
    #[error("invalid Merkle geometry: {reason}")]
    InvalidMerkleGeometry { reason: String },
    /// A serialized tree level could not be decoded or does not match the tree.
    #[error("invalid Merkle level: {reason}")]
    InvalidMerkleLevel { reason: String },
    /// An update cannot apply to the tree: its token lies outside the tree's range, or it
    /// removes a key from a bucket that holds none. The tree is left unchanged.
    #[error("invalid Merkle update: {reason}")]
    InvalidMerkleUpdate { reason: String },

    // --- storage ---
    /// The storage engine failed an I/O operation (disk full, permission, a failed write or
    /// fsync). A retry may succeed once the cause is gone; note that sled 0.34 remembers an I/O
    /// failure and refuses further work until the database is reopened.
    #[error("storage {operation} failed: {reason}")]
    Storage {
        operation: &'static str,
        reason: String,
    },
    /// The storage engine found its files corrupt or failed in a way it cannot recover from (an
    /// engine bug, an unsupported configuration, an unreadable metadata record). Retrying does
    /// not help; an operator must look.
    #[error("storage {operation} failed permanently: {reason}")]
    StorageCorrupt {
        operation: &'static str,
        reason: String,
    },
    /// The data directory was written in an on-disk format this binary does not read.
    #[error(
        "storage format version {found} is not supported (this binary reads version {supported})"
    )]
    StorageFormat { found: u32, supported: u32 },

    // --- configuration, certificates, TLS ---
    /// A configuration value is missing, malformed or inconsistent. `field` is its dotted path
    /// in the configuration file (`limits.value_bytes_max`, `members[2].address`), so the
    /// operator knows which line, variable or flag to fix.
    #[error("config field `{field}`: {reason}")]
    Config { field: String, reason: String },
    /// The configuration file cannot be read or is not valid TOML.
    #[error("config file {}: {reason}", path.display())]
    ConfigFile {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A certificate or key file cannot be read, written or parsed.
    #[error("{}: {reason}", path.display())]
    CertificateFile {
        path: std::path::PathBuf,
        reason: String,
    },
    /// Creating a CA or issuing a certificate would replace an existing file, and replacing
    /// was not asked for. Replacing a CA invalidates every certificate it issued.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    CertificateExists { path: std::path::PathBuf },
    /// A certificate could not be generated or signed, or the CA's key does not match its
    /// certificate.
    #[error("certificate: {reason}")]
    Certificate { reason: String },
    /// A client name for a certificate breaks the naming rule.
    #[error("invalid client name {name:?}: {reason}")]
    InvalidClientName { name: String, reason: &'static str },
    /// The TLS or QUIC configuration could not be built from the certificates and keys given
    /// (a key that does not match its certificate, an empty CA file, an unsupported key type).
    #[error("TLS setup: {reason}")]
    Tls { reason: String },
    /// A peer's certificate carries no usable QuorumKV identity: no `quorumkv://` URI SAN,
    /// several, or one that does not parse.
    #[error("peer certificate: {reason}")]
    PeerIdentity { reason: String },
    /// A connection negotiated the peer protocol with a client certificate. Only nodes may
    /// speak the peer protocol: it can write any key without a quorum.
    #[error(
        "the peer protocol accepts node certificates only; {identity} presented a client \
         certificate"
    )]
    ClientOnPeerProtocol { identity: String },
    /// A node claimed an id that its certificate does not carry.
    #[error("peer claims to be node {claimed} but its certificate says {certified}")]
    NodeIdMismatch { claimed: String, certified: String },
    /// A connection negotiated no ALPN protocol, or one this node does not serve.
    #[error("unknown application protocol {alpn}")]
    UnknownAlpn { alpn: String },
}

impl Error {
    /// Whether retrying the same operation may succeed. None of the pure-core errors are
    /// retryable: they describe bad input or corrupt data, which a retry does not change. A
    /// storage I/O failure may be transient (a full disk gets space back); corruption and a
    /// format mismatch are not. Configuration, certificate and TLS errors describe what an
    /// operator or a peer presented; they stay until someone changes it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Storage { .. })
    }
}

/// Shorthand for results carrying [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
