//! The peer protocol: the messages nodes exchange.
//!
//! Peers talk over QUIC connections negotiated with the peer ALPN (`crate::tls::PEER_ALPN`) and mutually
//! authenticated with node certificates. Each message travels as one frame (see
//! `quorumkv_client::frame`); a node sends all its messages to one peer on one long-lived
//! unidirectional stream, in order, so many share a packet (see `crate::transport::quic`), and
//! QUIC flow control is the backpressure. Messages are fire-and-forget: requests
//! and their answers are matched by the sender's [`OpId`], and a lost answer shows up as a
//! timeout in the coordinator, never as a hang.
//!
//! The first frame of every new connection's stream is [`Hello`]: the dialing node names itself and the
//! fingerprint of the cluster map it runs with. The accepting node refuses a peer whose claimed
//! id differs from its certificate's, or whose fingerprint differs from its own, and says both
//! fingerprints in the close reason, so a misconfigured member is found at connect time rather
//! than by silently misplaced data.
//!
//! Key states travel as their canonical encoding (`KeyState::encode_canonical`) and are decoded
//! with validation on arrival; a replica that receives a corrupt state answers with an error
//! instead of storing it.

use crate::merkle::Level;
use quorumkv_client::protocol::{Request, Response};
use serde::{Deserialize, Serialize};

/// Identifies one operation at the node that started it; answers carry it back.
///
/// The first field is the starting node's *instance*, random per process start, and the second
/// counts operations within that instance. So an answer still travelling to a node's previous
/// process can never be taken for an answer to an operation of its new one (counters restart,
/// instances do not repeat).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub u64, pub u64);

/// The first frame on a peer connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The dialing node's id; must match its certificate.
    pub node: String,
    /// Hex fingerprint of the dialing node's cluster map (ring, keyspaces, addresses).
    pub fingerprint: String,
    /// Random per process start. A peer that sees a new value knows the dialing node
    /// restarted, so its own outgoing connection to it is dead and must be re-dialled.
    pub instance: u64,
}

/// A message between two nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// A client request handed to a member of the key's preference list, by a node that is
    /// not one (so version vectors only ever name the key's owners).
    Forward { op: OpId, request: Request },
    /// The coordinator's answer to a [`PeerMessage::Forward`].
    ForwardReply { op: OpId, response: Response },
    /// Merge this state into your copy of the key and answer once: [`PeerMessage::Applied`]
    /// as soon as it is merged, or, when `durable` is set, [`PeerMessage::Durable`] once the
    /// merge is flushed to disk (a durable answer counts as applied too).
    ///
    /// With `hint_for`, the receiver is a fallback standing in for that owner under a sloppy
    /// quorum: it keeps the state as a hint for the owner (not as its own data) and answers
    /// the same way once the hint is stored.
    Replicate {
        op: OpId,
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
        durable: bool,
        #[serde(default)]
        hint_for: Option<String>,
    },
    /// The replica merged the state of `op` (the answer to a non-durable `Replicate`).
    Applied { op: OpId },
    /// The replica's merge of `op` is on disk (the answer to a durable `Replicate`).
    Durable { op: OpId },
    /// Send me your copy of the key.
    Read {
        op: OpId,
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The replica's copy (canonical encoding) of the key it names, `None` if it has none. The
    /// key travels back so the coordinator can check the answer is about the key it asked for.
    ReadReply {
        op: OpId,
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        state: Option<Vec<u8>>,
    },
    /// The replica could not serve `op` (corrupt input, storage error); the reason is for logs.
    Failed { op: OpId, reason: String },
    /// Failure detector probe.
    Ping { nonce: u64 },
    /// Answer to a [`PeerMessage::Ping`].
    Pong { nonce: u64 },
    /// Anti-entropy (`crate::core::anti_entropy`): send me the non-empty nodes of your Merkle
    /// tree of (`keyspace`, `range`) at `level` below `parents` (at most
    /// `anti_entropy::PARENTS_PER_REQUEST_MAX` of them), in trees `depth` levels deep. Answered
    /// with [`PeerMessage::AeLevelReply`] or [`PeerMessage::Failed`].
    AeLevel {
        op: OpId,
        keyspace: String,
        range: u32,
        depth: u8,
        level: u8,
        parents: Vec<u32>,
    },
    /// The answer to a [`PeerMessage::AeLevel`]; checked with `Level::validate_reply`.
    AeLevelReply { op: OpId, level: Level },
    /// Anti-entropy: here is my state of every key of (`keyspace`, `range`) whose token lies
    /// in one of `intervals` (inclusive, sorted, disjoint); merge them, and answer with
    /// [`PeerMessage::AePushReply`] carrying your states that I lack in those intervals.
    AePush {
        op: OpId,
        keyspace: String,
        range: u32,
        intervals: Vec<(u64, u64)>,
        keys: Vec<AeKey>,
    },
    /// The answer to a [`PeerMessage::AePush`]: the replica's states of the keys in the pushed
    /// intervals that the pusher lacks (absent from the push, or merged into something the
    /// push did not hold), in token order. `resume_from` is set when the frame budget cut the
    /// answer short: every key below that token was sent, and the pusher continues from it.
    AePushReply {
        op: OpId,
        keys: Vec<AeKey>,
        resume_from: Option<u64>,
    },
    /// Inspection (`quorumkv admin replicas`): send me the hints you hold for this key, for
    /// any owner. Answered with [`PeerMessage::HintReadReply`] or [`PeerMessage::Failed`].
    HintRead {
        op: OpId,
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The hints the replica holds for the key of a [`PeerMessage::HintRead`]: (owner, the
    /// state kept for it, canonical encoding). Hints that name no state (a replica's own
    /// reminder to hand its copy over) are left out.
    HintReadReply { op: OpId, hints: Vec<HeldHint> },
    /// Tombstone collection (`crate::core::tombstones`): for each key, may its state with this
    /// hash be removed for good, as far as you know? Answered with
    /// [`PeerMessage::GcCheckReply`] once everything the receiver stores is durable.
    GcCheck { op: OpId, keys: Vec<GcKey> },
    /// The answer to a [`PeerMessage::GcCheck`], one flag per key in its order.
    GcCheckReply { op: OpId, ok: Vec<bool> },
    /// Tombstone collection: every member cleared these keys twice, a quiet period apart;
    /// remove each one you replicate whose stored state still has this hash. Not answered.
    GcCollect { keys: Vec<GcKey> },
}

/// A hint a node holds for one owner, in a [`PeerMessage::HintReadReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldHint {
    pub owner: String,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

/// A deleted key's state, named by its hash, in tombstone collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcKey {
    pub keyspace: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// `KeyState::state_hash` of the tombstone state (32 bytes; anything else never matches).
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
}

/// One key and its state (canonical encoding) in an anti-entropy push or its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeKey {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

impl PeerMessage {
    /// The operation of the *sending* node this message asks a peer to serve (a forward, a
    /// replica write, a read), if it is such a request. When it cannot be delivered, that
    /// operation, and only it, counts the peer as failed (`Input::SendFailed`).
    pub fn request_op(&self) -> Option<OpId> {
        match self {
            PeerMessage::Forward { op, .. }
            | PeerMessage::Replicate { op, .. }
            | PeerMessage::Read { op, .. }
            | PeerMessage::AeLevel { op, .. }
            | PeerMessage::AePush { op, .. }
            | PeerMessage::GcCheck { op, .. }
            | PeerMessage::HintRead { op, .. } => Some(*op),
            _ => None,
        }
    }

    /// A short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMessage::Forward { .. } => "forward",
            PeerMessage::ForwardReply { .. } => "forward_reply",
            PeerMessage::Replicate { .. } => "replicate",
            PeerMessage::Applied { .. } => "applied",
            PeerMessage::Durable { .. } => "durable",
            PeerMessage::Read { .. } => "read",
            PeerMessage::ReadReply { .. } => "read_reply",
            PeerMessage::Failed { .. } => "failed",
            PeerMessage::Ping { .. } => "ping",
            PeerMessage::Pong { .. } => "pong",
            PeerMessage::AeLevel { .. } => "ae_level",
            PeerMessage::AeLevelReply { .. } => "ae_level_reply",
            PeerMessage::AePush { .. } => "ae_push",
            PeerMessage::AePushReply { .. } => "ae_push_reply",
            PeerMessage::HintRead { .. } => "hint_read",
            PeerMessage::HintReadReply { .. } => "hint_read_reply",
            PeerMessage::GcCheck { .. } => "gc_check",
            PeerMessage::GcCheckReply { .. } => "gc_check_reply",
            PeerMessage::GcCollect { .. } => "gc_collect",
        }
    }
}
