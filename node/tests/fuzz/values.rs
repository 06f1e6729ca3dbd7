//! Generated valid values of every message the decoders read, and their encodings: the
//! starting points that mutations damage and round trips check.

use super::{TOKEN_KEY, TOKEN_KEYSPACE};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use quorumkv_client::protocol::{
    ClusterInfo, ErrorKind, ErrorReply, KeyspaceInfo, NodeAddress, QuorumShortfall, ReadOptions,
    ReadRepair, ReplicaAnswer, ReplicaCopy, ReplicaRole, Request, Response, SiblingValue,
    StoredCopy, WriteOptions,
};
use quorumkv_client::{Context, RequestId as ClientRequestId};
use quorumkv_node::peer::{Hello, OpId, PeerMessage};
use quorumkv_node::version_vector::{
    encode_token, Actor, CausalContext, ClientContext, Dot, IncarnationRecord, KeyState, RequestId,
    TOKEN_FORMAT_VERSION,
};
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use std::sync::OnceLock;

pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn keyspace() -> impl Strategy<Value = String> {
    prop_oneof![Just("default".to_owned()), ".{0,16}"]
}

fn opaque_context() -> impl Strategy<Value = Context> {
    bytes(48).prop_map(Context::from_bytes)
}

fn read_options() -> impl Strategy<Value = ReadOptions> {
    (
        any::<Option<u8>>(),
        any::<Option<u32>>(),
        any::<Option<u8>>(),
        any::<bool>(),
    )
        .prop_map(|(r, timeout_ms, pr, blocking)| ReadOptions {
            r,
            timeout_ms,
            pr,
            repair: if blocking {
                ReadRepair::Blocking
            } else {
                ReadRepair::Background
            },
        })
}

fn write_options() -> impl Strategy<Value = WriteOptions> {
    (
        any::<Option<u8>>(),
        any::<Option<u8>>(),
        any::<Option<u32>>(),
        any::<Option<u8>>(),
        any::<Option<bool>>(),
    )
        .prop_map(|(w, dw, timeout_ms, pw, sloppy_quorum)| WriteOptions {
            w,
            dw,
            timeout_ms,
            pw,
            sloppy_quorum,
        })
}

pub fn request() -> impl Strategy<Value = Request> {
    let request_id = any::<[u8; 16]>().prop_map(ClientRequestId);
    prop_oneof![
        (keyspace(), bytes(32), read_options()).prop_map(|(keyspace, key, options)| Request::Get {
            keyspace,
            key,
            options
        }),
        (
            keyspace(),
            bytes(32),
            bytes(64),
            proptest::option::of(opaque_context()),
            request_id.clone(),
            write_options()
        )
            .prop_map(|(keyspace, key, value, context, request_id, options)| {
                Request::Put {
                    keyspace,
                    key,
                    value,
                    context,
                    request_id,
                    options,
                }
            }),
        (
            keyspace(),
            bytes(32),
            proptest::option::of(opaque_context()),
            request_id,
            write_options()
        )
            .prop_map(
                |(keyspace, key, context, request_id, options)| Request::Delete {
                    keyspace,
                    key,
                    context,
                    request_id,
                    options
                }
            ),
        Just(Request::ClusterInfo),
        (keyspace(), bytes(32)).prop_map(|(keyspace, key)| Request::Replicas { keyspace, key }),
    ]
}

fn ring() -> impl Strategy<Value = Ring> {
    (0u32..5, 1u32..=3, 1usize..=4, vec((0u8..2, 1u32..=3), 4)).prop_map(
        |(log_ranges, rf_max, members, shape)| {
            let config = RingConfig::new(1 << log_ranges, rf_max).unwrap();
            let nodes = (0..members).map(|i| {
                let (zone, capacity) = shape[i];
                Node {
                    id: NodeId::new(format!("n{i}")).unwrap(),
                    zone: Zone::new(format!("z{zone}")).unwrap(),
                    capacity,
                }
            });
            Ring::build(config, nodes).unwrap()
        },
    )
}

fn cluster_info() -> impl Strategy<Value = ClusterInfo> {
    let node = (".{0,8}", ".{0,24}").prop_map(|(id, address)| NodeAddress { id, address });
    let keyspace = (".{0,12}", any::<u8>()).prop_map(|(name, n)| KeyspaceInfo { name, n });
    (
        ring(),
        vec(node, 0..4),
        vec(keyspace, 0..3),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(ring, nodes, keyspaces, request_timeout_ms)| ClusterInfo {
            ring,
            nodes,
            keyspaces,
            request_timeout_ms,
        })
}

fn error_reply() -> impl Strategy<Value = ErrorReply> {
    let kind = select(
        &[
            ErrorKind::InvalidRequest,
            ErrorKind::QuorumNotReached,
            ErrorKind::Overloaded,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ][..],
    );
    let quorum = proptest::option::of(any::<[u8; 4]>().prop_map(|[a, b, c, d]| QuorumShortfall {
        required: a,
        acked: b,
        durable_required: c,
        durable_acked: d,
    }));
    (kind, ".{0,40}", quorum).prop_map(|(kind, message, quorum)| ErrorReply {
        kind,
        message,
        quorum,
    })
}

fn sibling_value() -> impl Strategy<Value = SiblingValue> {
    (bytes(32), any::<u64>()).prop_map(|(value, timestamp_ms)| SiblingValue {
        value,
        timestamp_ms,
    })
}

fn replica_copy() -> impl Strategy<Value = ReplicaCopy> {
    let role = prop_oneof![
        any::<u8>().prop_map(|position| ReplicaRole::Primary { position }),
        Just(ReplicaRole::Fallback),
    ];
    let stored = (
        vec(sibling_value(), 0..3),
        any::<bool>(),
        proptest::collection::btree_map("[0-9a-f]{16}", any::<u64>(), 0..3),
        "[0-9a-f]{64}",
    )
        .prop_map(|(siblings, deleted, version, state_hash)| StoredCopy {
            siblings,
            deleted,
            version,
            state_hash,
        });
    let answer = prop_oneof![
        stored.prop_map(ReplicaAnswer::Stored),
        Just(ReplicaAnswer::Missing),
        ".{0,24}".prop_map(|reason| ReplicaAnswer::Failed { reason }),
        Just(ReplicaAnswer::TimedOut),
    ];
    let hint_for = proptest::option::of(".{0,8}");
    (".{0,8}", role, answer, hint_for).prop_map(|(node, role, answer, hint_for)| ReplicaCopy {
        node,
        role,
        answer,
        hint_for,
    })
}

pub fn response() -> impl Strategy<Value = Response> {
    let sibling = sibling_value();
    prop_oneof![
        (vec(sibling, 0..4), opaque_context())
            .prop_map(|(siblings, context)| Response::Got { siblings, context }),
        (opaque_context(), any::<u8>())
            .prop_map(|(context, hinted)| Response::Written { context, hinted }),
        cluster_info().prop_map(Response::ClusterInfo),
        vec(replica_copy(), 0..4).prop_map(Response::Replicas),
        error_reply().prop_map(Response::Error),
    ]
}

fn op() -> impl Strategy<Value = OpId> {
    any::<(u64, u64)>().prop_map(|(instance, n)| OpId(instance, n))
}

pub fn peer_message() -> impl Strategy<Value = PeerMessage> {
    prop_oneof![
        (op(), request()).prop_map(|(op, request)| PeerMessage::Forward { op, request }),
        (op(), response()).prop_map(|(op, response)| PeerMessage::ForwardReply { op, response }),
        (
            op(),
            keyspace(),
            bytes(32),
            key_state(),
            any::<bool>(),
            proptest::option::of(select(vec!["n1".to_string(), "n2".to_string()]))
        )
            .prop_map(|(op, keyspace, key, state, durable, hint_for)| {
                PeerMessage::Replicate {
                    op,
                    keyspace,
                    key,
                    state: state.encode_canonical(),
                    durable,
                    hint_for,
                }
            }),
        op().prop_map(|op| PeerMessage::Applied { op }),
        op().prop_map(|op| PeerMessage::Durable { op }),
        (op(), keyspace(), bytes(32)).prop_map(|(op, keyspace, key)| PeerMessage::Read {
            op,
            keyspace,
            key
        }),
        (
            op(),
            keyspace(),
            bytes(32),
            proptest::option::of(key_state())
        )
            .prop_map(|(op, keyspace, key, state)| PeerMessage::ReadReply {
                op,
                keyspace,
                key,
                state: state.map(|s| s.encode_canonical())
            }),
        (op(), ".{0,40}").prop_map(|(op, reason)| PeerMessage::Failed { op, reason }),
        any::<u64>().prop_map(|nonce| PeerMessage::Ping { nonce }),
        any::<u64>().prop_map(|nonce| PeerMessage::Pong { nonce }),
    ]
}

pub fn hello() -> impl Strategy<Value = Hello> {
    ("[a-z0-9-]{1,12}", "[0-9a-f]{64}", any::<u64>()).prop_map(|(node, fingerprint, instance)| {
        Hello {
            node,
            fingerprint,
            instance,
        }
    })
}

/// Three actors per generated value, drawn from the whole `u64` range so that every width of
/// MessagePack integer appears.
fn actors() -> impl Strategy<Value = [u64; 3]> {
    prop_oneof![
        any::<[u64; 3]>(),
        Just([1, 2, 3]),
        Just([0, u64::MAX, 1 << 32])
    ]
}

pub fn causal_context() -> impl Strategy<Value = CausalContext> {
    (actors(), vec((0usize..3, 1u64..40), 0..16)).prop_map(|(actors, dots)| {
        CausalContext::from_dots(dots.into_iter().map(|(a, c)| Dot::new(Actor(actors[a]), c)))
    })
}

/// What a client's token carries: the dots it saw and the writes it was shown.
pub fn client_context() -> impl Strategy<Value = ClientContext> {
    (causal_context(), vec(any::<[u8; 16]>(), 0..5)).prop_map(|(context, writes)| {
        ClientContext::new(context, writes.into_iter().map(RequestId))
    })
}

/// One write of a generated key history: at actor `actor`, `skip` counters past its last dot
/// of the key, by a writer that had seen `seen` and, if `supersede`, names the writes it was
/// shown (as its token does), which retires them.
#[derive(Clone, Debug)]
struct Write {
    actor: usize,
    skip: u64,
    seen: Vec<(usize, u64)>,
    supersede: bool,
    request_id: [u8; 16],
    timestamp_ms: u64,
    value: Option<Vec<u8>>,
}

fn write() -> impl Strategy<Value = Write> {
    (
        0usize..3,
        0u64..3,
        vec((0usize..3, 1u64..8), 0..3),
        any::<bool>(),
        any::<[u8; 16]>(),
        any::<u64>(),
        proptest::option::of(bytes(24)),
    )
        .prop_map(
            |(actor, skip, seen, supersede, request_id, timestamp_ms, value)| Write {
                actor,
                skip,
                seen,
                supersede,
                request_id,
                timestamp_ms,
                value,
            },
        )
}

fn build(actors: [u64; 3], writes: &[Write]) -> KeyState {
    let mut state = KeyState::new();
    for write in writes {
        let actor = Actor(actors[write.actor]);
        let Some(counter) = state
            .context()
            .max_counter(actor)
            .checked_add(1 + write.skip)
        else {
            continue;
        };
        let dot = Dot::new(actor, counter);
        // A writer's context never claims a dot of the coordinating actor at or past the new one.
        let seen = CausalContext::from_dots(
            write
                .seen
                .iter()
                .map(|&(a, c)| Dot::new(Actor(actors[a]), c))
                .filter(|d| d.actor != actor || d.counter < counter),
        );
        if write.supersede {
            let shown: Vec<RequestId> = state
                .siblings()
                .iter()
                .filter(|s| seen.contains(&s.dot) && s.request_id.0 != write.request_id)
                .map(|s| s.request_id)
                .collect();
            state.supersede(&shown, write.timestamp_ms);
        }
        // Refusals (a retried request id) leave the state as it was, which is fine here.
        let _ = state.update(
            &seen,
            dot,
            RequestId(write.request_id),
            write.timestamp_ms,
            write.value.clone(),
        );
    }
    state
}

/// Key states as coordinators build them, joined across two replicas' histories so that
/// concurrent siblings and cloud dots appear.
pub fn key_state() -> impl Strategy<Value = KeyState> {
    (actors(), vec(write(), 0..5), vec(write(), 0..3))
        .prop_map(|(actors, left, right)| build(actors, &left).join(&build(actors, &right)))
}

pub fn incarnation() -> impl Strategy<Value = IncarnationRecord> {
    (any::<u64>(), any::<bool>()).prop_map(|(actor, clean_shutdown)| IncarnationRecord {
        actor: Actor(actor),
        clean_shutdown,
    })
}

// ----- tokens ------------------------------------------------------------------------------

/// The token checksum as `token.rs` documents it. The checksum is not keyed, so anyone can
/// seal a token around any body: the decoder behind it must stand on its own.
pub fn seal_token(mut body: Vec<u8>) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"quorumkv/context-checksum/v1\0");
    hasher.update(&body);
    body.extend_from_slice(&hasher.finalize().as_bytes()[..8]);
    body
}

/// A sealed token of the current format for ([`TOKEN_KEYSPACE`], [`TOKEN_KEY`]) whose context
/// is `payload`.
pub fn token_around(payload: Vec<u8>) -> Vec<u8> {
    token_of_format(TOKEN_FORMAT_VERSION, payload)
}

/// The same in format 1, which nodes still accept: a causal context without writes.
pub fn token_v1_around(payload: Vec<u8>) -> Vec<u8> {
    token_of_format(1, payload)
}

fn token_of_format(version: u8, payload: Vec<u8>) -> Vec<u8> {
    let empty = encode_token(&ClientContext::default(), TOKEN_KEYSPACE, TOKEN_KEY);
    // The binding, taken from a real token so that it cannot drift from the code.
    let mut body = vec![version];
    body.extend_from_slice(&empty[1..9]);
    body.extend(payload);
    seal_token(body)
}

/// The context part of a token: what [`token_around`] wraps.
pub fn token_payload(context: &ClientContext) -> Vec<u8> {
    let token = encode_token(context, TOKEN_KEYSPACE, TOKEN_KEY);
    token[9..token.len() - 8].to_vec()
}

// ----- certificates ------------------------------------------------------------------------

/// One key pair for every generated certificate: key generation is the slow part, and the
/// decoder never looks at the key.
pub fn cert_key() -> &'static rcgen::KeyPair {
    static KEY: OnceLock<rcgen::KeyPair> = OnceLock::new();
    KEY.get_or_init(|| rcgen::KeyPair::generate().unwrap())
}

/// A self-signed certificate with these subject alternative names, or `None` if rcgen
/// refuses them.
pub fn cert_with(sans: Vec<rcgen::SanType>, common_name: &str) -> Option<Vec<u8>> {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    Some(params.self_signed(cert_key()).ok()?.der().to_vec())
}

/// Certificates as the cluster CA issues them, for node and client identities.
pub fn valid_cert() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?".prop_map(|id| {
            let id = NodeId::new(id).unwrap();
            let sans = vec![
                uri_san(&quorumkv_node::certs::node_uri(&id)),
                rcgen::SanType::DnsName(
                    quorumkv_node::certs::node_dns_name(&id).try_into().unwrap(),
                ),
                rcgen::SanType::DnsName("node.quorumkv".try_into().unwrap()),
            ];
            cert_with(sans, id.as_str()).unwrap()
        }),
        "[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?".prop_map(|name| {
            let sans = vec![uri_san(&quorumkv_node::certs::client_uri(&name))];
            cert_with(sans, &name).unwrap()
        }),
    ]
}

pub fn uri_san(uri: &str) -> rcgen::SanType {
    rcgen::SanType::URI(uri.try_into().unwrap())
}
