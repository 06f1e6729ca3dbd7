//! The client context token: a [`ClientContext`] as opaque, checked bytes bound to one key.
//!
//! Layout (version 2):
//!
//! ```text
//! body    = version u8 (= 2)
//!        || binding: 8 bytes = BLAKE3(BINDING_DOMAIN || len(keyspace) u64 LE || keyspace
//!                                     || len(key) u64 LE || key)[..8]
//!        || MessagePack([CausalContext, [RequestId...]])
//! token   = body || checksum: 8 bytes = BLAKE3(CHECKSUM_DOMAIN || body)[..8]
//! ```
//!
//! Version 1 carried the causal context alone; it is still accepted (with no writes), so
//! tokens handed out before an upgrade keep working.
//!
//! The trailing checksum is the outer frame and does not depend on the version: every future
//! version keeps it. The decoder therefore checks it first, so random corruption anywhere,
//! the version byte included, is reported as corrupt, and only an intact token of a format
//! this node does not know is reported as an unknown version. The checksum catches accidents,
//! not forgery: it is not keyed.

use super::context::CausalContext;
use super::state::RequestId;
use crate::error::{Error, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The token format this node writes. It also reads version 1.
pub const TOKEN_FORMAT_VERSION: u8 = 2;

/// What a token says its holder had seen of a key: the dots (the causal context, which a write
/// replaces exactly) and the request ids of the writes it was shown or made. A write with this
/// context supersedes those writes wherever a copy of them is stored, including copies that a
/// retry left at another coordinator under a dot the context does not cover.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientContext {
    /// The dots the holder had seen.
    pub context: CausalContext,
    /// The writes the holder had seen, sorted, no duplicates.
    writes: Vec<RequestId>,
}

impl ClientContext {
    /// A context with the writes it covers (in any order; duplicates are dropped).
    pub fn new(context: CausalContext, writes: impl IntoIterator<Item = RequestId>) -> Self {
        let mut writes: Vec<RequestId> = writes.into_iter().collect();
        writes.sort_unstable();
        writes.dedup();
        ClientContext { context, writes }
    }

    /// The writes the holder had seen, sorted.
    pub fn writes(&self) -> &[RequestId] {
        &self.writes
    }
}

impl From<CausalContext> for ClientContext {
    fn from(context: CausalContext) -> Self {
        ClientContext::new(context, [])
    }
}

const BINDING_DOMAIN: &[u8] = b"quorumkv/context-binding/v1\0";
const CHECKSUM_DOMAIN: &[u8] = b"quorumkv/context-checksum/v1\0";
const BINDING_LEN: usize = 8;
const CHECKSUM_LEN: usize = 8;

fn binding(keyspace: &str, key: &[u8]) -> [u8; BINDING_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(BINDING_DOMAIN);
    hasher.update(&(keyspace.len() as u64).to_le_bytes());
    hasher.update(keyspace.as_bytes());
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    first_bytes(hasher.finalize())
}

fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(CHECKSUM_DOMAIN);
    hasher.update(body);
    first_bytes(hasher.finalize())
}

fn first_bytes<const N: usize>(hash: blake3::Hash) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&hash.as_bytes()[..N]);
    out
}

/// Encodes `context` as a token for `key` in `keyspace`.
pub fn encode_token(context: &ClientContext, keyspace: &str, key: &[u8]) -> Vec<u8> {
    encode_version(TOKEN_FORMAT_VERSION, context, keyspace, key)
}

/// The token in format `version`: version 1 holds the causal context alone.
// Encoding a context into a Vec has no failure path (only writer I/O errors exist).
#[allow(clippy::expect_used)]
fn encode_version(version: u8, context: &ClientContext, keyspace: &str, key: &[u8]) -> Vec<u8> {
    let mut out = vec![version];
    out.extend_from_slice(&binding(keyspace, key));
    if version == 1 {
        rmp_serde::encode::write(&mut out, &context.context)
            .expect("encoding into a Vec cannot fail");
    } else {
        rmp_serde::encode::write(&mut out, context).expect("encoding into a Vec cannot fail");
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum);
    out
}

/// Decodes a token that a client presents for `key` in `keyspace`, allowing at most
/// `max_entries` context entries and as many writes. Never panics and never falls back to an
/// empty context.
///
/// Errors: empty, truncated, failed checksum, undecodable or non-canonical bytes are
/// [`Error::ContextCorrupt`]; an intact token of another format is
/// [`Error::ContextUnknownVersion`]; a token of another key is [`Error::ContextWrongKey`]; too
/// many entries or writes is [`Error::ContextTooLarge`].
pub fn decode_token(
    token: &[u8],
    keyspace: &str,
    key: &[u8],
    max_entries: usize,
) -> Result<ClientContext> {
    let corrupt = |reason: &str| Error::ContextCorrupt {
        reason: reason.to_owned(),
    };
    if token.is_empty() {
        return Err(corrupt("the token is empty"));
    }
    let Some(body_len) = token.len().checked_sub(CHECKSUM_LEN).filter(|n| *n > 0) else {
        return Err(corrupt("the token is truncated"));
    };
    let (body, sum) = token.split_at(body_len);
    if checksum(body) != sum {
        return Err(corrupt(
            "the checksum does not match (truncated or damaged)",
        ));
    }
    let version = body[0];
    if version != TOKEN_FORMAT_VERSION && version != 1 {
        return Err(Error::ContextUnknownVersion { version });
    }
    let rest = &body[1..];
    if rest.len() < BINDING_LEN {
        return Err(corrupt("the token is truncated"));
    }
    let (bound, encoded) = rest.split_at(BINDING_LEN);
    if bound != binding(keyspace, key) {
        return Err(Error::ContextWrongKey);
    }
    // The checksum is not keyed, so anyone can seal a token around any bytes: decode them as
    // checked MessagePack, which reserves nothing for lengths the bytes do not back.
    let undecodable = |e: rmp_serde::decode::Error| Error::ContextCorrupt {
        reason: format!("undecodable context: {e}"),
    };
    let context: ClientContext = if version == 1 {
        quorumkv_client::msgpack::from_slice::<CausalContext>(encoded)
            .map_err(undecodable)?
            .into()
    } else {
        quorumkv_client::msgpack::from_slice(encoded).map_err(undecodable)?
    };
    if encode_version(version, &context, keyspace, key) != token
        || context.writes.windows(2).any(|pair| pair[0] >= pair[1])
    {
        return Err(corrupt("the context is not in canonical form"));
    }
    let entries = context.context.len().max(context.writes.len());
    if entries > max_entries {
        return Err(Error::ContextTooLarge {
            entries,
            max: max_entries,
        });
    }
    Ok(context)
}

/// The text form of a token, for the CLI and JSON: base64url without padding.
pub fn token_to_text(token: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(token)
}

/// Parses the text form (surrounding whitespace ignored). Bad base64 is
/// [`Error::ContextCorrupt`]; whether the bytes are a valid token is for [`decode_token`].
pub fn token_from_text(text: &str) -> Result<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|e| Error::ContextCorrupt {
            reason: format!("not base64url: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::super::context::{Actor, Dot};
    use super::*;
    use proptest::prelude::*;

    fn context_strategy() -> impl Strategy<Value = ClientContext> {
        (
            proptest::collection::vec((any::<u64>(), 1u64..50), 0..12),
            proptest::collection::vec(any::<u8>(), 0..4),
        )
            .prop_map(|(dots, writes)| {
                let dots = dots.into_iter().map(|(a, c)| Dot::new(Actor(a % 4), c));
                ClientContext::new(
                    CausalContext::from_dots(dots),
                    writes.into_iter().map(|n| RequestId([n; 16])),
                )
            })
    }

    #[test]
    fn version_1_tokens_are_still_accepted() {
        let context = CausalContext::from_dots([Dot::new(Actor(1), 3)]);
        let old = encode_version(1, &context.clone().into(), "ks", b"k");
        let decoded = decode_token(&old, "ks", b"k", 100).unwrap();
        assert_eq!(decoded, ClientContext::from(context));
    }

    #[test]
    fn writes_out_of_order_or_twice_are_corrupt() {
        for writes in [
            vec![RequestId([2; 16]), RequestId([1; 16])],
            vec![RequestId([1; 16]); 2],
        ] {
            let mut body = binding("ks", b"k").to_vec();
            rmp_serde::encode::write(&mut body, &(CausalContext::new(), writes)).unwrap();
            let err = decode_token(&rebuild_with(2, &body), "ks", b"k", 100);
            assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        }
    }

    fn rebuild_with(version: u8, body_after_version: &[u8]) -> Vec<u8> {
        let mut body = vec![version];
        body.extend_from_slice(body_after_version);
        let sum = checksum(&body);
        body.extend_from_slice(&sum);
        body
    }

    #[test]
    fn empty_and_garbage_are_corrupt() {
        for bytes in [&b""[..], b"\x01", b"not a token at all"] {
            let err = decode_token(bytes, "ks", b"k", 100);
            assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        }
        let err = token_from_text("***");
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
    }

    #[test]
    fn intact_tokens_of_a_future_format_are_an_unknown_version() {
        let token = encode_token(&ClientContext::default(), "ks", b"k");
        let future = rebuild_with(3, &token[1..token.len() - CHECKSUM_LEN]);
        let err = decode_token(&future, "ks", b"k", 100);
        assert!(
            matches!(err, Err(Error::ContextUnknownVersion { version: 3 })),
            "{err:?}"
        );
    }

    #[test]
    fn a_well_framed_but_undecodable_or_non_canonical_context_is_corrupt() {
        let bind = binding("ks", b"k");
        // 0xc1 is never valid MessagePack.
        let mut body = bind.to_vec();
        body.push(0xc1);
        let err = decode_token(&rebuild_with(1, &body), "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        // A context whose cloud holds a dot the vector already covers.
        let mut body = bind.to_vec();
        let raw = (
            std::collections::BTreeMap::from([(Actor(1), 3u64)]),
            std::collections::BTreeSet::from([Dot::new(Actor(1), 2)]),
        );
        rmp_serde::encode::write(&mut body, &raw).unwrap();
        let err = decode_token(&rebuild_with(1, &body), "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        // Trailing bytes after the context.
        let mut body = bind.to_vec();
        rmp_serde::encode::write(&mut body, &CausalContext::new()).unwrap();
        body.push(0);
        let err = decode_token(&rebuild_with(1, &body), "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(super::super::tests::cases(64)))]

        #[test]
        fn token_round_trips_in_bytes_and_text(ctx in context_strategy(), key in any::<Vec<u8>>()) {
            let token = encode_token(&ctx, "keyspace", &key);
            let n = ctx.context.len().max(ctx.writes().len());
            let decoded = decode_token(&token, "keyspace", &key, n).unwrap();
            prop_assert_eq!(&decoded, &ctx);
            let text = token_to_text(&token);
            prop_assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'));
            prop_assert_eq!(token_from_text(&format!(" {text}\n")).unwrap(), token);
        }

        #[test]
        fn a_token_for_another_key_is_refused(
            ctx in context_strategy(), key in any::<Vec<u8>>(), other in any::<Vec<u8>>()
        ) {
            prop_assume!(key != other);
            let token = encode_token(&ctx, "keyspace", &key);
            let err = decode_token(&token, "keyspace", &other, usize::MAX);
            prop_assert!(matches!(err, Err(Error::ContextWrongKey)), "{:?}", err);
            // The framing keeps ("ab", "c") and ("a", "bc") apart.
            let token = encode_token(&ctx, "ab", b"c");
            let err = decode_token(&token, "a", b"bc", usize::MAX);
            prop_assert!(matches!(err, Err(Error::ContextWrongKey)), "{:?}", err);
        }

        #[test]
        fn every_flipped_bit_is_reported_as_corrupt(ctx in context_strategy()) {
            let token = encode_token(&ctx, "ks", b"key");
            for bit in 0..token.len() * 8 {
                let mut damaged = token.clone();
                damaged[bit / 8] ^= 1 << (bit % 8);
                let err = decode_token(&damaged, "ks", b"key", usize::MAX);
                let corrupt = matches!(err, Err(Error::ContextCorrupt { .. }));
                prop_assert!(corrupt, "bit {}: {:?}", bit, err);
            }
        }

        #[test]
        fn every_truncation_is_reported_as_corrupt(ctx in context_strategy()) {
            let token = encode_token(&ctx, "ks", b"key");
            for len in 0..token.len() {
                let err = decode_token(&token[..len], "ks", b"key", usize::MAX);
                let corrupt = matches!(err, Err(Error::ContextCorrupt { .. }));
                prop_assert!(corrupt, "len {}: {:?}", len, err);
            }
        }

        #[test]
        fn too_many_entries_is_refused(ctx in context_strategy()) {
            prop_assume!(!ctx.context.is_empty());
            let token = encode_token(&ctx, "ks", b"key");
            let n = ctx.context.len().max(ctx.writes().len());
            let err = decode_token(&token, "ks", b"key", n - 1);
            let refused = matches!(
                err,
                Err(Error::ContextTooLarge { entries, max }) if entries == n && max == n - 1
            );
            prop_assert!(refused, "{:?}", err);
        }
    }
}
