//! What the fuzz targets share: the run's size, the decoders under test, and the three kinds of
//! input they are fed. This file holds the run and the inputs; `values.rs` generates valid
//! messages of every kind, and `targets.rs` lists the decoders with how to wrap, decode and
//! check each.
//!
//! # The inputs
//!
//! Purely random bytes rarely get past a decoder's first byte: a frame wants version 1, a key
//! state wants its format byte, a token wants a MAC over everything else, and
//! MessagePack wants a map whose keys are our field names. So each target is fed a mix of
//!
//! 1. **random bytes**, which do test the first checks;
//! 2. **random MessagePack** ([`msgpack`]): well-formed trees whose strings come from a
//!    dictionary of our field and variant names ([`WORDS`]) and whose leaves include headers
//!    that claim gigabytes, wrapped the way the target expects (framed, prefixed with a format
//!    byte, sealed with a token's MAC under the fuzz secret), so they reach the code behind
//!    those checks;
//! 3. **mutations of valid encodings** ([`Mutation`]): generated messages, encoded, then
//!    damaged by bit flips, byte changes, truncation, deletion, insertion, splices of their own
//!    bytes, and length fields rewritten to huge values. These are nearly valid, so they travel
//!    deepest: this is where decoders that trust a length, an index or an invariant break.
//!    Mutations are applied both before the target's wrapping (so a damaged body still has a
//!    correct frame header and a damaged token a correct MAC) and after it.
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

pub mod targets;
pub mod values;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use std::fmt::Debug;

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
// Grouped by where the names come from, which rustfmt would flatten to one per line.
#[rustfmt::skip]
pub const WORDS: &[&str] = &[
    // client protocol
    "Get", "Put", "Delete", "ClusterInfo", "keyspace", "key", "value", "context", "request_id",
    "options", "r", "w", "dw", "timeout_ms", "Got", "Written", "Error", "siblings",
    "timestamp_ms", "ring", "nodes", "keyspaces", "id", "address", "name", "n", "kind",
    "message", "quorum", "required", "acked", "durable_required", "durable_acked",
    "InvalidRequest", "QuorumNotReached", "Overloaded", "Unavailable", "Internal",
    // ring
    "version", "config", "members", "table", "range_count", "rf_max", "zone", "capacity",
    // peer protocol
    "Forward", "ForwardReply", "Replicate", "Applied", "Durable", "Read", "ReadReply", "Failed",
    "Ping", "Pong", "op", "request", "response", "state", "durable", "reason", "nonce", "node",
    "fingerprint", "instance",
    // causality and storage
    "vv", "cloud", "dot", "actor", "counter", "clean_shutdown", "retired", "writes", "",
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
