//! What the fuzz targets share: the run's size, the decoders under test, and the three kinds of
//! input they are fed.
//!
//! # The inputs
//!
//! Purely random bytes rarely get past a decoder's first byte: a frame wants version 1, a key
//! state wants its format byte, a token wants a checksum over everything else, and
//! MessagePack wants a map whose keys are our field names. So each target is fed a mix of
//!
//! 1. **random bytes**, which do test the first checks;
//! 2. **random MessagePack** ([`msgpack`]): well-formed trees whose strings come from a
//!    dictionary of our field and variant names ([`WORDS`]) and whose leaves include headers
//!    that claim gigabytes, wrapped the way the target expects (framed, prefixed with a format
//!    byte, sealed with a token's checksum), so they reach the code behind those checks;
//! 3. **mutations of valid encodings** ([`Mutation`]): generated messages, encoded, then
//!    damaged by bit flips, byte changes, truncation, deletion, insertion, splices of their own
//!    bytes, and length fields rewritten to huge values. These are nearly valid, so they travel
//!    deepest: this is where decoders that trust a length, an index or an invariant break.
//!    Mutations are applied both before the target's wrapping (so a damaged body still has a
//!    correct frame header and a damaged token a correct checksum) and after it.
//!
//! # The run's size
//!
//! Every target runs a fixed number of cases with a fixed seed, so CI is deterministic and
//! quick. `QUORUMKV_FUZZ_CASES=N` runs N cases per target instead (a long run), and
//! `QUORUMKV_FUZZ_SEED=S` explores from another seed:
//!
//! ```sh
//! QUORUMKV_FUZZ_CASES=1000000 cargo test -p quorumkv-node --test fuzz_decoders --test fuzz_alloc
//! QUORUMKV_FUZZ_CASES=100000 QUORUMKV_FUZZ_SEED=7 cargo test -p quorumkv-node --test fuzz_alloc
//! ```
//!
//! Keep the test profile rather than `--release`: it is optimised too, and it checks integer
//! overflow, which is part of "no panic" (a release build wraps silently).
//!
//! Failures are not persisted to regression files: a failure found here is fixed in the
//! decoder and pinned by a named unit test next to it, which says what broke and why far
//! better than an opaque seed file would.

// Helpers outside `#[test]` functions unwrap too: a valid value that fails to encode is a bug
// of the test. Each test binary uses part of what is here.
#![allow(clippy::unwrap_used, dead_code)]

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use quorumkv_client::frame::{decode_body, decode_frame, encode_frame, PROTOCOL_VERSION};
use quorumkv_client::protocol::{
    ClusterInfo, ErrorKind, ErrorReply, KeyspaceInfo, NodeAddress, QuorumShortfall, ReadOptions,
    Request, Response, SiblingValue, WriteOptions,
};
use quorumkv_client::{Context, RequestId as ClientRequestId};
use quorumkv_node::peer::{Hello, OpId, PeerMessage};
use quorumkv_node::storage::{decode_incarnation, encode_incarnation};
use quorumkv_node::tls::Identity;
use quorumkv_node::version_vector::{
    decode_token, encode_token, Actor, CausalContext, Dot, IncarnationRecord, KeyState, RequestId,
};
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::sync::OnceLock;

/// Cases per target for a long run (the default is each target's own, small count).
pub const CASES_VAR: &str = "QUORUMKV_FUZZ_CASES";
/// The seed to explore from (default [`DEFAULT_SEED`]).
pub const SEED_VAR: &str = "QUORUMKV_FUZZ_SEED";
/// The fixed seed of the CI run.
pub const DEFAULT_SEED: u64 = 0x0f22_dec0_de55_0008;

/// The frame cap the frame targets decode under (the node's default is 4 MiB plus slack; a
/// smaller cap changes nothing but the size of the largest frame the fuzzer could build).
pub const MAX_FRAME: u32 = 1 << 20;

/// The keyspace and key that tokens of the token target are bound to.
pub const TOKEN_KEYSPACE: &str = "default";
pub const TOKEN_KEY: &[u8] = b"fuzzed-key";

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={value:?} is not a number: {e}"),
    }
}

/// The cases to run: `default`, or [`CASES_VAR`].
pub fn cases(default: u32) -> u32 {
    env_u64(CASES_VAR).map_or(default, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// A proptest configuration for one target: its case count, the run's seed, no regression
/// files.
pub fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        rng_seed: RngSeed::Fixed(env_u64(SEED_VAR).unwrap_or(DEFAULT_SEED)),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `test` on `config.cases` inputs from `inputs`; a failure or a panic fails the calling
/// test with the target's name and the smallest input proptest found.
pub fn run<S: Strategy>(
    name: &str,
    config: ProptestConfig,
    inputs: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: Debug,
{
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&inputs, test) {
        panic!("fuzz target {name}: {e}");
    }
}

// ----- mutations of valid encodings --------------------------------------------------------

/// Single bytes worth trying: MessagePack markers after which the next bytes are read as a
/// length or a count, the never-valid 0xc1, and the edges of the fixed-size ranges.
const MARKERS: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xc4, 0xc5, 0xc6, 0xc7,
    0xc8, 0xc9, 0xcf, 0xd3, 0xd4, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff,
];

/// A header that claims far more than any input here holds: a byte string, text, extension,
/// array or map of up to 4 GiB or 4 G entries, with nothing behind it.
pub fn huge_header() -> impl Strategy<Value = Vec<u8>> {
    let wide = (
        select(&[0xc6u8, 0xc9, 0xdb, 0xdd, 0xdf][..]),
        select(&[u32::MAX, 1 << 31, 1 << 24, 1 << 20, 65_536][..]),
    )
        .prop_map(|(marker, len)| {
            let mut header = vec![marker];
            header.extend_from_slice(&len.to_be_bytes());
            header
        });
    let narrow = select(&[0xc5u8, 0xc8, 0xda, 0xdc, 0xde][..]).prop_map(|marker| {
        let mut header = vec![marker];
        header.extend_from_slice(&u16::MAX.to_be_bytes());
        header
    });
    prop_oneof![3 => wide, 1 => narrow]
}

/// One change to an encoding. Positions are proportional ([`Index`]), so a mutation shrinks
/// and applies to inputs of any length.
#[derive(Clone, Debug)]
pub enum Mutation {
    FlipBit {
        at: Index,
        bit: u8,
    },
    SetByte {
        at: Index,
        byte: u8,
    },
    Truncate {
        at: Index,
    },
    Delete {
        at: Index,
        len: usize,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Overwrite {
        at: Index,
        bytes: Vec<u8>,
    },
    /// Copies `len` bytes from one place of the input into another: splices of valid parts,
    /// such as a field repeated or a header moved in front of the wrong data.
    Splice {
        from: Index,
        len: usize,
        to: Index,
    },
    /// Rewrites the length of the `nth` string, byte string, array or map to `len`, in its
    /// 32-bit form: the length field says one thing and the bytes another.
    Relength {
        nth: Index,
        len: u32,
    },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let any_index = any::<Index>;
    prop_oneof![
        3 => (any_index(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any_index(), prop_oneof![select(MARKERS), any::<u8>()])
            .prop_map(|(at, byte)| Mutation::SetByte { at, byte }),
        1 => any_index().prop_map(|at| Mutation::Truncate { at }),
        1 => (any_index(), 1usize..16).prop_map(|(at, len)| Mutation::Delete { at, len }),
        2 => (any_index(), prop_oneof![huge_header(), vec(any::<u8>(), 1..8)])
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any_index(), prop_oneof![huge_header(), vec(any::<u8>(), 1..8)])
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        1 => (any_index(), 1usize..32, any_index())
            .prop_map(|(from, len, to)| Mutation::Splice { from, len, to }),
        3 => (
            any_index(),
            prop_oneof![
                select(&[u32::MAX, 1 << 31, 1 << 24, 65_536][..]),
                0u32..64
            ]
        )
            .prop_map(|(nth, len)| Mutation::Relength { nth, len }),
    ]
}

impl Mutation {
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        // Positions within the input, and insertion points (one more: the end).
        let within =
            |at: &Index, bytes: &Vec<u8>| (!bytes.is_empty()).then(|| at.index(bytes.len()));
        let point = |at: &Index, bytes: &Vec<u8>| at.index(bytes.len() + 1);
        match self {
            Mutation::FlipBit { at, bit } => {
                if let Some(i) = within(at, bytes) {
                    bytes[i] ^= 1 << bit;
                }
            }
            Mutation::SetByte { at, byte } => {
                if let Some(i) = within(at, bytes) {
                    bytes[i] = *byte;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(point(at, bytes)),
            Mutation::Delete { at, len } => {
                if let Some(i) = within(at, bytes) {
                    let end = (i + len).min(bytes.len());
                    bytes.drain(i..end);
                }
            }
            Mutation::Insert { at, bytes: new } => {
                let i = point(at, bytes);
                bytes.splice(i..i, new.iter().copied());
            }
            Mutation::Overwrite { at, bytes: new } => {
                let i = point(at, bytes);
                let end = (i + new.len()).min(bytes.len());
                bytes.splice(i..end, new.iter().copied());
            }
            Mutation::Splice { from, len, to } => {
                if let Some(i) = within(from, bytes) {
                    let piece = bytes[i..(i + len).min(bytes.len())].to_vec();
                    let j = point(to, bytes);
                    bytes.splice(j..j, piece);
                }
            }
            Mutation::Relength { nth, len } => {
                let count = length_field_count(bytes);
                if count > 0 {
                    relength(bytes, nth.index(count), *len);
                }
            }
        }
    }
}

/// How many strings, byte strings, arrays and maps the MessagePack in `bytes` holds (see
/// [`relength`]).
pub fn length_field_count(bytes: &[u8]) -> usize {
    length_fields(bytes).len()
}

/// Rewrites the length of the `nth` string, byte string, array or map in `bytes` to `len`, in
/// the 32-bit form of its header. Does nothing if there is no such field.
pub fn relength(bytes: &mut Vec<u8>, nth: usize, len: u32) {
    if let Some(field) = length_fields(bytes).get(nth) {
        let mut header = vec![field.kind.marker32()];
        header.extend_from_slice(&len.to_be_bytes());
        bytes.splice(field.at..field.at + field.header_len, header);
    }
}

/// A valid encoding from `valid`, damaged by one to four mutations.
pub fn mutated(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (valid, vec(mutation(), 1..=4)).prop_map(|(mut bytes, mutations)| {
        for mutation in &mutations {
            mutation.apply(&mut bytes);
        }
        bytes
    })
}

#[derive(Clone, Copy, Debug)]
enum LengthKind {
    Str,
    Bin,
    Array,
    Map,
}

impl LengthKind {
    fn marker32(self) -> u8 {
        match self {
            LengthKind::Str => 0xdb,
            LengthKind::Bin => 0xc6,
            LengthKind::Array => 0xdd,
            LengthKind::Map => 0xdf,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct LengthField {
    at: usize,
    header_len: usize,
    kind: LengthKind,
}

/// The headers that carry a length, found by walking the MessagePack tokens. Inputs may start
/// with a prefix that is not MessagePack (a frame header, a format byte, a token's version and
/// binding), so the walk starts at each of the first 16 offsets and the longest list wins. A
/// walk stops at the first byte that is not a well-formed token.
fn length_fields(bytes: &[u8]) -> Vec<LengthField> {
    (0..bytes.len().min(16))
        .map(|start| walk(&bytes[start..], start))
        .max_by_key(Vec::len)
        .unwrap_or_default()
}

fn walk(bytes: &[u8], offset: usize) -> Vec<LengthField> {
    let mut fields = Vec::new();
    let mut at = 0;
    while let Some(&marker) = bytes.get(at) {
        let be = |n: usize| -> Option<usize> {
            let field = bytes.get(at + 1..at + 1 + n)?;
            Some(
                field
                    .iter()
                    .fold(0usize, |acc, b| acc << 8 | usize::from(*b)),
            )
        };
        // (header length, payload to skip, kind of length it carries)
        let (header_len, skip, kind) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (1, 0, None),
            0x80..=0x8f => (1, 0, Some(LengthKind::Map)),
            0x90..=0x9f => (1, 0, Some(LengthKind::Array)),
            0xa0..=0xbf => (1, usize::from(marker & 0x1f), Some(LengthKind::Str)),
            0xc4..=0xc6 => {
                let n = 1 << (marker - 0xc4);
                let Some(len) = be(n) else { break };
                (1 + n, len, Some(LengthKind::Bin))
            }
            0xd9..=0xdb => {
                let n = 1 << (marker - 0xd9);
                let Some(len) = be(n) else { break };
                (1 + n, len, Some(LengthKind::Str))
            }
            0xdc | 0xdd => (1 + (2 << (marker - 0xdc)), 0, Some(LengthKind::Array)),
            0xde | 0xdf => (1 + (2 << (marker - 0xde)), 0, Some(LengthKind::Map)),
            0xca => (5, 0, None),
            0xcb => (9, 0, None),
            0xcc..=0xcf => (1 + (1 << (marker - 0xcc)), 0, None),
            0xd0..=0xd3 => (1 + (1 << (marker - 0xd0)), 0, None),
            // Extensions and 0xc1 do not occur in our encodings: stop.
            _ => break,
        };
        if at + header_len + skip > bytes.len() {
            break;
        }
        if let Some(kind) = kind {
            fields.push(LengthField {
                at: offset + at,
                header_len,
                kind,
            });
        }
        at += header_len + skip;
    }
    fields
}

// ----- random MessagePack ------------------------------------------------------------------

/// Our field, variant and enum-value names, so random maps look like our messages.
pub const WORDS: &[&str] = &[
    // client protocol
    "Get",
    "Put",
    "Delete",
    "ClusterInfo",
    "keyspace",
    "key",
    "value",
    "context",
    "request_id",
    "options",
    "r",
    "w",
    "dw",
    "timeout_ms",
    "Got",
    "Written",
    "Error",
    "siblings",
    "timestamp_ms",
    "ring",
    "nodes",
    "keyspaces",
    "id",
    "address",
    "name",
    "n",
    "kind",
    "message",
    "quorum",
    "required",
    "acked",
    "durable_required",
    "durable_acked",
    "InvalidRequest",
    "QuorumNotReached",
    "Overloaded",
    "Unavailable",
    "Internal",
    // ring
    "version",
    "config",
    "members",
    "table",
    "range_count",
    "rf_max",
    "zone",
    "capacity",
    // peer protocol
    "Forward",
    "ForwardReply",
    "Replicate",
    "Applied",
    "Durable",
    "Read",
    "ReadReply",
    "Failed",
    "Ping",
    "Pong",
    "op",
    "request",
    "response",
    "state",
    "durable",
    "reason",
    "nonce",
    "node",
    "fingerprint",
    "instance",
    // causality and storage
    "vv",
    "cloud",
    "dot",
    "actor",
    "counter",
    "clean_shutdown",
    "",
];

fn str_token(text: &str) -> Vec<u8> {
    rmp_serde::to_vec(text).unwrap()
}

fn bin_token(bytes: &[u8]) -> Vec<u8> {
    rmp_serde::to_vec(&serde_bytes::Bytes::new(bytes)).unwrap()
}

fn container_header(len: usize, fix: u8, m16: u8, m32: u8) -> Vec<u8> {
    match (u8::try_from(len), u16::try_from(len)) {
        (Ok(n), _) if n < 16 => vec![fix | n],
        (_, Ok(n)) => [vec![m16], n.to_be_bytes().to_vec()].concat(),
        _ => [vec![m32], (len as u32).to_be_bytes().to_vec()].concat(),
    }
}

fn array_token(items: Vec<Vec<u8>>) -> Vec<u8> {
    let mut out = container_header(items.len(), 0x90, 0xdc, 0xdd);
    items.into_iter().for_each(|item| out.extend(item));
    out
}

fn map_token(entries: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let mut out = container_header(entries.len(), 0x80, 0xde, 0xdf);
    for (key, value) in entries {
        out.extend(key);
        out.extend(value);
    }
    out
}

fn word_token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => select(WORDS).prop_map(str_token),
        1 => "[a-z_]{0,12}".prop_map(|s| str_token(&s)),
        1 => (0u64..16).prop_map(|n| rmp_serde::to_vec(&n).unwrap()),
    ]
}

/// Well-formed MessagePack trees up to five levels deep that look like our messages, with
/// headers claiming gigabytes among their leaves.
pub fn msgpack() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(vec![0xc0]),
        any::<bool>().prop_map(|b| vec![if b { 0xc3 } else { 0xc2 }]),
        any::<u64>().prop_map(|n| rmp_serde::to_vec(&n).unwrap()),
        select(&[0u64, 1, 2, 15, 16, 255, 256, 65_535, 65_536, u64::MAX][..])
            .prop_map(|n| rmp_serde::to_vec(&n).unwrap()),
        any::<i64>().prop_map(|n| rmp_serde::to_vec(&n).unwrap()),
        word_token(),
        ".{0,12}".prop_map(|s| str_token(&s)),
        vec(any::<u8>(), 0..24).prop_map(|b| bin_token(&b)),
        huge_header(),
    ];
    leaf.prop_recursive(5, 96, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(array_token),
            vec((word_token(), inner.clone()), 0..6).prop_map(map_token),
            // An enum variant: a map of one entry.
            (word_token(), inner).prop_map(|entry| map_token(vec![entry])),
        ]
    })
}

// ----- valid values ------------------------------------------------------------------------

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn keyspace() -> impl Strategy<Value = String> {
    prop_oneof![Just("default".to_owned()), ".{0,16}"]
}

fn client_context() -> impl Strategy<Value = Context> {
    bytes(48).prop_map(Context::from_bytes)
}

fn read_options() -> impl Strategy<Value = ReadOptions> {
    (any::<Option<u8>>(), any::<Option<u32>>())
        .prop_map(|(r, timeout_ms)| ReadOptions { r, timeout_ms })
}

fn write_options() -> impl Strategy<Value = WriteOptions> {
    (
        any::<Option<u8>>(),
        any::<Option<u8>>(),
        any::<Option<u32>>(),
    )
        .prop_map(|(w, dw, timeout_ms)| WriteOptions { w, dw, timeout_ms })
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
            proptest::option::of(client_context()),
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
            proptest::option::of(client_context()),
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
    (ring(), vec(node, 0..4), vec(keyspace, 0..3)).prop_map(|(ring, nodes, keyspaces)| {
        ClusterInfo {
            ring,
            nodes,
            keyspaces,
        }
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

pub fn response() -> impl Strategy<Value = Response> {
    let sibling = (bytes(32), any::<u64>()).prop_map(|(value, timestamp_ms)| SiblingValue {
        value,
        timestamp_ms,
    });
    prop_oneof![
        (vec(sibling, 0..4), client_context())
            .prop_map(|(siblings, context)| Response::Got { siblings, context }),
        client_context().prop_map(|context| Response::Written { context }),
        cluster_info().prop_map(Response::ClusterInfo),
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
        (op(), keyspace(), bytes(32), key_state(), any::<bool>()).prop_map(
            |(op, keyspace, key, state, durable)| PeerMessage::Replicate {
                op,
                keyspace,
                key,
                state: state.encode_canonical(),
                durable
            }
        ),
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

/// One write of a generated key history: at actor `actor`, `skip` counters past its last dot
/// of the key, by a writer that had seen `seen`.
#[derive(Clone, Debug)]
struct Write {
    actor: usize,
    skip: u64,
    seen: Vec<(usize, u64)>,
    request_id: [u8; 16],
    timestamp_ms: u64,
    value: Option<Vec<u8>>,
}

fn write() -> impl Strategy<Value = Write> {
    (
        0usize..3,
        0u64..3,
        vec((0usize..3, 1u64..8), 0..3),
        any::<[u8; 16]>(),
        any::<u64>(),
        proptest::option::of(bytes(24)),
    )
        .prop_map(
            |(actor, skip, seen, request_id, timestamp_ms, value)| Write {
                actor,
                skip,
                seen,
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
        let seen = write
            .seen
            .iter()
            .map(|&(a, c)| Dot::new(Actor(actors[a]), c))
            .filter(|d| d.actor != actor || d.counter < counter);
        // Refusals (a retried request id) leave the state as it was, which is fine here.
        let _ = state.update(
            &CausalContext::from_dots(seen),
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

/// A sealed token for ([`TOKEN_KEYSPACE`], [`TOKEN_KEY`]) whose context is `payload`.
pub fn token_around(payload: Vec<u8>) -> Vec<u8> {
    let empty = encode_token(&CausalContext::new(), TOKEN_KEYSPACE, TOKEN_KEY);
    // Version byte and binding, taken from a real token so they cannot drift from the code.
    let mut body = empty[..9].to_vec();
    body.extend(payload);
    seal_token(body)
}

/// The context part of a token: what [`token_around`] wraps.
pub fn token_payload(context: &CausalContext) -> Vec<u8> {
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

// ----- the targets -------------------------------------------------------------------------

/// One decoder of untrusted bytes, as the fuzz runs see it.
pub struct Target {
    pub name: &'static str,
    /// Encodings of generated valid values, before [`Target::wrap`].
    pub valid: fn() -> BoxedStrategy<Vec<u8>>,
    /// Turns a payload into the decoder's input: frames it, prefixes a format byte, seals a
    /// token, or nothing.
    pub wrap: fn(Vec<u8>) -> Vec<u8>,
    /// Decodes the input and drops the result: `true` if it was accepted. Never panics.
    pub decode: fn(&[u8]) -> bool,
    /// Decodes the input and, if it was accepted, checks that encoding the value again gives
    /// an input that decodes to the same value.
    pub check: fn(&[u8]) -> Result<(), String>,
}

impl Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// What every target is fed: random bytes, random MessagePack wrapped for it, and mutations of
/// valid encodings before and after wrapping.
pub fn inputs(target: &Target) -> impl Strategy<Value = Vec<u8>> {
    let wrap = target.wrap;
    prop_oneof![
        1 => bytes(96),
        2 => msgpack().prop_map(wrap),
        3 => mutated((target.valid)()).prop_map(wrap),
        2 => mutated((target.valid)().prop_map(wrap)),
    ]
}

fn framed(body: Vec<u8>) -> Vec<u8> {
    let mut frame = vec![PROTOCOL_VERSION];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend(body);
    frame
}

fn body_of<T: Serialize>(message: &T) -> Vec<u8> {
    encode_frame(message, MAX_FRAME).unwrap()[5..].to_vec()
}

fn check_body<T: Serialize + DeserializeOwned + PartialEq + Debug>(
    bytes: &[u8],
) -> Result<(), String> {
    let Ok(message) = decode_body::<T>(bytes) else {
        return Ok(());
    };
    let again = decode_body::<T>(&body_of(&message)).map_err(|e| format!("{message:?}: {e}"))?;
    if again != message {
        return Err(format!("{message:?} re-decodes as {again:?}"));
    }
    Ok(())
}

fn check_frame<T: Serialize + DeserializeOwned + PartialEq + Debug>(
    bytes: &[u8],
) -> Result<(), String> {
    let Ok(message) = decode_frame::<T>(bytes, MAX_FRAME) else {
        return Ok(());
    };
    let frame = encode_frame(&message, MAX_FRAME).map_err(|e| e.to_string())?;
    match decode_frame::<T>(&frame, MAX_FRAME) {
        Ok(again) if again == message => Ok(()),
        other => Err(format!("{message:?} re-decodes as {other:?}")),
    }
}

fn check_token(bytes: &[u8]) -> Result<(), String> {
    match decode_token(bytes, TOKEN_KEYSPACE, TOKEN_KEY, usize::MAX) {
        // Only canonical tokens are accepted, so the value must encode back to the same bytes.
        Ok(context) if encode_token(&context, TOKEN_KEYSPACE, TOKEN_KEY) != bytes => Err(format!(
            "{context:?} was accepted from a non-canonical token"
        )),
        _ => Ok(()),
    }
}

fn check_state(bytes: &[u8]) -> Result<(), String> {
    match KeyState::decode(bytes) {
        Ok(state) if state.encode_canonical() != bytes => {
            Err(format!("{state:?} was accepted from non-canonical bytes"))
        }
        _ => Ok(()),
    }
}

fn check_incarnation(bytes: &[u8]) -> Result<(), String> {
    let Ok(record) = decode_incarnation(bytes) else {
        return Ok(());
    };
    let again = encode_incarnation(&record).and_then(|b| decode_incarnation(&b));
    match again {
        Ok(again) if again == record => Ok(()),
        other => Err(format!("{record:?} re-decodes as {other:?}")),
    }
}

fn check_identity(bytes: &[u8]) -> Result<(), String> {
    let _ = Identity::from_certificate_der(bytes);
    Ok(())
}

pub const REQUEST_FRAME: Target = Target {
    name: "frame::decode_frame::<Request>",
    valid: || request().prop_map(|m| body_of(&m)).boxed(),
    wrap: framed,
    decode: |b| decode_frame::<Request>(b, MAX_FRAME).is_ok(),
    check: check_frame::<Request>,
};

pub const REQUEST: Target = Target {
    name: "frame::decode_body::<Request>",
    valid: || request().prop_map(|m| body_of(&m)).boxed(),
    wrap: |b| b,
    decode: |b| decode_body::<Request>(b).is_ok(),
    check: check_body::<Request>,
};

pub const RESPONSE: Target = Target {
    name: "frame::decode_body::<Response>",
    valid: || response().prop_map(|m| body_of(&m)).boxed(),
    wrap: |b| b,
    decode: |b| decode_body::<Response>(b).is_ok(),
    check: check_body::<Response>,
};

pub const PEER_MESSAGE: Target = Target {
    name: "frame::decode_body::<PeerMessage>",
    valid: || peer_message().prop_map(|m| body_of(&m)).boxed(),
    wrap: |b| b,
    decode: |b| decode_body::<PeerMessage>(b).is_ok(),
    check: check_body::<PeerMessage>,
};

pub const HELLO: Target = Target {
    name: "frame::decode_body::<Hello>",
    valid: || hello().prop_map(|m| body_of(&m)).boxed(),
    wrap: |b| b,
    decode: |b| decode_body::<Hello>(b).is_ok(),
    check: check_body::<Hello>,
};

pub const TOKEN: Target = Target {
    name: "version_vector::decode_token",
    valid: || causal_context().prop_map(|c| token_payload(&c)).boxed(),
    wrap: token_around,
    decode: |b| decode_token(b, TOKEN_KEYSPACE, TOKEN_KEY, usize::MAX).is_ok(),
    check: check_token,
};

pub const KEY_STATE: Target = Target {
    name: "KeyState::decode",
    valid: || {
        key_state()
            .prop_map(|s| s.encode_canonical()[1..].to_vec())
            .boxed()
    },
    wrap: |b| [vec![quorumkv_node::version_vector::STATE_FORMAT_VERSION], b].concat(),
    decode: |b| KeyState::decode(b).is_ok(),
    check: check_state,
};

pub const INCARNATION: Target = Target {
    name: "storage::decode_incarnation",
    valid: || {
        incarnation()
            .prop_map(|r| encode_incarnation(&r).unwrap())
            .boxed()
    },
    wrap: |b| b,
    decode: |b| decode_incarnation(b).is_ok(),
    check: check_incarnation,
};

pub const IDENTITY: Target = Target {
    name: "tls::Identity::from_certificate_der",
    valid: || valid_cert().boxed(),
    wrap: |b| b,
    decode: |b| Identity::from_certificate_der(b).is_ok(),
    check: check_identity,
};

/// Every target, for runs that treat them alike.
pub const ALL: [&Target; 9] = [
    &REQUEST_FRAME,
    &REQUEST,
    &RESPONSE,
    &PEER_MESSAGE,
    &HELLO,
    &TOKEN,
    &KEY_STATE,
    &INCARNATION,
    &IDENTITY,
];
