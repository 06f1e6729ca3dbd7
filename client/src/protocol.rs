//! The client protocol: the messages a client and a node exchange.
//!
//! A client opens one QUIC bidirectional stream per request, writes one [`Request`] frame (see
//! [`crate::frame`]) and reads one [`Response`] frame. Messages are encoded with rmp-serde in
//! its named (map) form, so a later protocol version can add optional fields that older peers
//! ignore; anything incompatible bumps [`crate::frame::PROTOCOL_VERSION`].
//!
//! Every write carries a [`RequestId`] that the client draws once per logical write and reuses
//! on every retry of it: a node that already holds a sibling created under that id treats the
//! retry as done instead of adding a second sibling.
//!
//! Quorum options are per request. A field left `None` falls back to the keyspace default
//! (R = W = a majority of the keyspace's N, `dw` = 1).
//!
//! [`Request::Replicas`] is an operator's inspection, not a data request: it shows what each
//! replica of a key stores, read directly from each replica, without the read repair a
//! [`Request::Get`] triggers and without writing anything. An older node does not know it and
//! refuses the frame as malformed.

use crate::context::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// ALPN protocol name of the client protocol.
pub const CLIENT_ALPN: &[u8] = b"quorumkv-client/1";

/// The keyspace every cluster has.
pub const DEFAULT_KEYSPACE: &str = "default";

/// The coordinator timeout of a node whose configuration sets none
/// (`timeouts.request_timeout_ms`); also what a client assumes of a cluster that does not report
/// its own in [`ClusterInfo::request_timeout_ms`].
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 2_000;

/// The longest coordinator timeout a request's `timeout_ms` may ask for; nodes clamp longer ones
/// to this.
pub const REQUEST_TIMEOUT_MAX_MS: u64 = 120_000;

/// Identifies one logical write across its retries. Drawn at random by the client.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 16]);

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Per-request read options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOptions {
    /// Replicas that must answer (a not-found answer counts). Default: a majority of N.
    pub r: Option<u8>,
    /// How long the coordinator waits for replicas. Default: the node's configured timeout.
    pub timeout_ms: Option<u32>,
    /// How many of the answers must come from the key's primary owners (its preference list)
    /// rather than fallbacks. Reads ask primary owners only, so this raises the number of
    /// answers awaited to `max(r, pr)`. Default 0. Added after the first release, like every
    /// field below: an older peer leaves it out and it decodes as its default.
    #[serde(default)]
    pub pr: Option<u8>,
    /// Whether the reply waits for read repair (see [`ReadRepair`]). Default: background.
    #[serde(default)]
    pub repair: ReadRepair,
}

/// When the coordinator of a read repairs the replicas that answered with an older version
/// (or none): the merged version is written back to them through the normal write path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadRepair {
    /// After the reply, off the latency path (Riak's and Cassandra's default).
    #[default]
    Background,
    /// Before the reply: the read succeeds only once at least `r` replicas hold the version it
    /// returns, so a later quorum read cannot return anything older (monotonic quorum reads,
    /// Cassandra's blocking read repair).
    Blocking,
}

/// Per-request write options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOptions {
    /// Replicas that must acknowledge the write. Default: a majority of N.
    pub w: Option<u8>,
    /// How many of those acknowledgements must come from replicas that flushed the write to
    /// disk. Default 1; 0 acknowledges writes that may still be lost in a crash.
    pub dw: Option<u8>,
    /// How long the coordinator waits for replicas. Default: the node's configured timeout.
    pub timeout_ms: Option<u32>,
    /// How many of the `w` acknowledgements must come from the key's primary owners rather
    /// than fallbacks holding a hint for them. Default 0. Added after the first release, like
    /// the field below: an older peer leaves it out and it decodes as its default.
    #[serde(default)]
    pub pw: Option<u8>,
    /// Whether a fallback's hinted acknowledgement may stand in for a primary owner that is
    /// down (a sloppy quorum, Dynamo §4.6). Default: allowed; `Some(false)` counts primary
    /// owners only.
    #[serde(default)]
    pub sloppy_quorum: Option<bool>,
}

/// A request from a client to any node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Read a key's siblings and context.
    Get {
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        options: ReadOptions,
    },
    /// Write a value. With the context of an earlier read it replaces exactly the siblings that
    /// read saw; without one it becomes a sibling of whatever is stored.
    Put {
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        context: Option<Context>,
        request_id: RequestId,
        options: WriteOptions,
    },
    /// Write a tombstone that replaces the siblings the context covers.
    Delete {
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        context: Option<Context>,
        request_id: RequestId,
        options: WriteOptions,
    },
    /// Ask for the ring, the nodes' addresses and the keyspaces, so the client can route.
    ClusterInfo,
    /// Show what every replica of a key stores (admin inspection; `quorumkv admin replicas`).
    /// Any node answers, whether or not it is a replica: it asks each node of the key's
    /// preference list for its copy (reading its own directly), waits until each has answered
    /// or failed or its request timeout passes, and answers [`Response::Replicas`]. It never
    /// triggers read repair and never writes; a replica that fails or stays silent is reported
    /// as such, not as an error of the whole request.
    Replicas {
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

/// One visible value of a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiblingValue {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// The coordinating node's wall clock when the value was written, in ms since the Unix
    /// epoch. Informational (for last-writer-wins resolvers); causality never depends on it.
    pub timestamp_ms: u64,
}

/// Where a node listens for clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    pub id: String,
    /// `host:port` of the node's QUIC endpoint.
    pub address: String,
}

/// A keyspace and its replication factor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceInfo {
    pub name: String,
    pub n: u8,
}

/// What a client needs to route requests itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub ring: quorumkv_ring::Ring,
    pub nodes: Vec<NodeAddress>,
    pub keyspaces: Vec<KeyspaceInfo>,
    /// How long the answering node's coordinators wait for replicas when a request sets no
    /// `timeout_ms` (its `timeouts.request_timeout_ms`), so a client can size its own wait.
    /// Added after the first release: older nodes leave it out (decoded as `None`) and older
    /// clients ignore it, as the named encoding allows.
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
}

/// A node's answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The siblings (tombstones excluded; empty for a missing or deleted key) and the context
    /// to send with the next write of this key.
    Got {
        siblings: Vec<SiblingValue>,
        context: Context,
    },
    /// The write reached its quorum; the context covers exactly what it replaced plus itself.
    Written {
        context: Context,
        /// How many of the acknowledgements counted toward `w` came from fallbacks holding a
        /// hint for a primary owner that was down (0 when every primary owner answered).
        #[serde(default)]
        hinted: u8,
    },
    /// The answer to [`Request::ClusterInfo`].
    ClusterInfo(ClusterInfo),
    /// The answer to [`Request::Replicas`]: one entry per replica, in preference-list order.
    Replicas(Vec<ReplicaCopy>),
    /// The request failed.
    Error(ErrorReply),
}

/// One replica of a key and what it answered to an inspection ([`Request::Replicas`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaCopy {
    /// The replica's node id.
    pub node: String,
    /// Why this node holds the key.
    pub role: ReplicaRole,
    /// What it stores, or why it could not say. For a fallback, the hint it keeps.
    pub answer: ReplicaAnswer,
    /// For a fallback: the owner its hint is for.
    #[serde(default)]
    pub hint_for: Option<String>,
}

/// Why a node is among a key's replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaRole {
    /// An owner of the key: entry `position` of its preference list (0 is the first owner).
    Primary { position: u8 },
    /// A member outside the preference list holding a hint for the key (a write it took in
    /// for an owner that was down, under a sloppy quorum); `ReplicaCopy::hint_for` names the
    /// owner. Listed only when it holds one.
    Fallback,
}

/// What one replica answered to an inspection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaAnswer {
    /// The replica's stored copy of the key.
    Stored(StoredCopy),
    /// The replica has no copy of the key.
    Missing,
    /// The replica could not be asked (the inspecting node believes it down, or could not
    /// reach it) or answered with an error; `reason` is for a human.
    Failed { reason: String },
    /// The replica did not answer before the inspecting node's request timeout.
    TimedOut,
}

/// A replica's stored copy of a key, summarised for a human or a script.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCopy {
    /// The values a reader of this copy alone would see (tombstones left out).
    pub siblings: Vec<SiblingValue>,
    /// Whether the key was written and every surviving version is a tombstone (a delete).
    pub deleted: bool,
    /// The causal context as a version summary: actor (a node incarnation, 16 hex digits) →
    /// the highest counter of that actor's writes to the key this copy has seen. Two copies
    /// with equal summaries have seen the same writes, unless one learned some out of order.
    pub version: BTreeMap<String, u64>,
    /// The BLAKE3 hash of the copy's canonical encoding, in hex: equal hashes, equal copies.
    pub state_hash: String,
}

impl ReplicaAnswer {
    /// Whether the replica answered (with a copy or with none), as opposed to failing or
    /// staying silent.
    pub fn answered(&self) -> bool {
        matches!(self, ReplicaAnswer::Stored(_) | ReplicaAnswer::Missing)
    }
}

/// Why a request failed, in a form a program can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request itself is wrong (bad option, oversized key or value, bad context, unknown
    /// keyspace). Retrying it unchanged fails the same way.
    InvalidRequest,
    /// Fewer replicas answered than the request required before its timeout. A failed write
    /// may still have been applied on some replicas.
    QuorumNotReached,
    /// The node is at its in-flight limit; retry later.
    Overloaded,
    /// This node cannot serve the request, but another may: it could not reach any replica or
    /// coordinator for the key in time, or it took itself out of service (its storage failed).
    /// Retryable on another node.
    Unavailable,
    /// The node hit an error that retrying elsewhere would not fix (for example one key's
    /// stored state is corrupt).
    Internal,
}

/// The error half of [`Response`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    /// A sentence for a human.
    pub message: String,
    /// For [`ErrorKind::QuorumNotReached`]: what the request required and what it reached.
    pub quorum: Option<QuorumShortfall>,
}

/// What a request required and what it reached when a quorum failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumShortfall {
    pub required: u8,
    pub acked: u8,
    /// For writes: durable acknowledgements required (`dw`) and reached.
    pub durable_required: u8,
    pub durable_acked: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame};

    #[test]
    fn requests_round_trip_through_frames() {
        let requests = vec![
            Request::Get {
                keyspace: DEFAULT_KEYSPACE.into(),
                key: b"k".to_vec(),
                options: ReadOptions {
                    r: Some(2),
                    timeout_ms: None,
                    pr: Some(1),
                    repair: ReadRepair::Blocking,
                },
            },
            Request::Put {
                keyspace: DEFAULT_KEYSPACE.into(),
                key: b"k".to_vec(),
                value: vec![0, 159, 146, 150],
                context: Some(Context::from_bytes(vec![1, 2, 3])),
                request_id: RequestId([7; 16]),
                options: WriteOptions {
                    w: Some(3),
                    dw: Some(0),
                    timeout_ms: Some(500),
                    pw: Some(2),
                    sloppy_quorum: Some(false),
                },
            },
            Request::ClusterInfo,
            Request::Replicas {
                keyspace: DEFAULT_KEYSPACE.into(),
                key: b"k".to_vec(),
            },
        ];
        for request in requests {
            let frame = encode_frame(&request, 1 << 20).unwrap();
            assert_eq!(decode_frame::<Request>(&frame, 1 << 20).unwrap(), request);
        }
    }

    #[test]
    fn cluster_info_gained_the_request_timeout_compatibly() {
        use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
        /// `ClusterInfo` as the first release encoded it.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct ClusterInfoV0 {
            ring: quorumkv_ring::Ring,
            nodes: Vec<NodeAddress>,
            keyspaces: Vec<KeyspaceInfo>,
        }
        let node = Node::new(NodeId::new("n1").unwrap(), Zone::new("z").unwrap(), 1).unwrap();
        let ring = Ring::build(RingConfig::new(4, 1).unwrap(), [node]).unwrap();
        let old = ClusterInfoV0 {
            ring: ring.clone(),
            nodes: vec![NodeAddress {
                id: "n1".into(),
                address: "127.0.0.1:7000".into(),
            }],
            keyspaces: vec![KeyspaceInfo {
                name: DEFAULT_KEYSPACE.into(),
                n: 1,
            }],
        };
        // An old node's answer decodes, without a timeout.
        let frame = encode_frame(&old, 1 << 20).unwrap();
        let decoded: ClusterInfo = decode_frame(&frame, 1 << 20).unwrap();
        assert_eq!(decoded.request_timeout_ms, None);
        assert_eq!(decoded.ring, ring);
        // A new node's answer decodes in an old client, which ignores the timeout.
        let new = ClusterInfo {
            request_timeout_ms: Some(5_000),
            ..decoded
        };
        let frame = encode_frame(&new, 1 << 20).unwrap();
        assert_eq!(decode_frame::<ClusterInfoV0>(&frame, 1 << 20).unwrap(), old);
        assert_eq!(decode_frame::<ClusterInfo>(&frame, 1 << 20).unwrap(), new);
    }

    #[test]
    fn replica_copies_round_trip() {
        let stored = StoredCopy {
            siblings: vec![SiblingValue {
                value: b"v".to_vec(),
                timestamp_ms: 5,
            }],
            deleted: false,
            version: [("00000000000003e9".to_string(), 2)].into(),
            state_hash: "ab".repeat(32),
        };
        let response = Response::Replicas(vec![
            ReplicaCopy {
                node: "n1".into(),
                role: ReplicaRole::Primary { position: 0 },
                answer: ReplicaAnswer::Stored(stored),
                hint_for: None,
            },
            ReplicaCopy {
                node: "n2".into(),
                role: ReplicaRole::Primary { position: 1 },
                answer: ReplicaAnswer::Missing,
                hint_for: None,
            },
            ReplicaCopy {
                node: "n3".into(),
                role: ReplicaRole::Fallback,
                answer: ReplicaAnswer::Failed {
                    reason: "down".into(),
                },
                hint_for: Some("n1".into()),
            },
            ReplicaCopy {
                node: "n4".into(),
                role: ReplicaRole::Primary { position: 2 },
                answer: ReplicaAnswer::TimedOut,
                hint_for: None,
            },
        ]);
        let frame = encode_frame(&response, 1 << 20).unwrap();
        assert_eq!(decode_frame::<Response>(&frame, 1 << 20).unwrap(), response);
    }

    #[test]
    fn error_replies_round_trip() {
        let response = Response::Error(ErrorReply {
            kind: ErrorKind::QuorumNotReached,
            message: "2 of 3 replicas acknowledged".into(),
            quorum: Some(QuorumShortfall {
                required: 3,
                acked: 2,
                durable_required: 1,
                durable_acked: 1,
            }),
        });
        let frame = encode_frame(&response, 1 << 20).unwrap();
        assert_eq!(decode_frame::<Response>(&frame, 1 << 20).unwrap(), response);
    }
}
