//! The client context token: a [`ClientContext`] as opaque, authenticated bytes bound to one key.
//!
//! Layout (version 3):
//!
//! ```text
//! body    = version u8 (= 3)
//!        || binding: 8 bytes = BLAKE3(BINDING_DOMAIN || len(keyspace) u64 LE || keyspace
//!                                     || len(key) u64 LE || key)[..8]
//!        || MessagePack([CausalContext, [RequestId...]])
//! token   = body || mac: 32 bytes = keyed BLAKE3(cluster secret, MAC_DOMAIN || body)
//! ```
//!
//! # Why a MAC
//!
//! A context decides which stored siblings a write replaces and which dots the write claims
//! to have seen. A client that can write any context can make replicas discard acknowledged
//! writes (by claiming another coordinator's future dots), stop a key from ever being written
//! again (by claiming the largest counter), or bloat a key's context with made-up actors until
//! every context a read hands out is refused. Versions 1 and 2 sealed the body with an unkeyed
//! checksum, which anyone can compute; version 3 seals it with a MAC under the *cluster
//! secret* that every node loads ([`ContextKeys`]) and no client has, so only a node of this
//! cluster can have made a token, and a client can only hand back what it was given. Tokens of
//! versions 1 and 2 fail the MAC like any forgery (their holders read the key again).
//!
//! # Order of checks
//!
//! The decoder checks, in order: the token's length against what `max_entries` entries can
//! take ([`token_bytes_max`], so an oversized token costs no hashing or decoding); the MAC,
//! with every accepted secret (the comparison of [`blake3::Hash`] is constant time), before a
//! byte of the body is interpreted; then the version, the key binding, and the context itself
//! (canonical form, entry count). The MAC is the outer frame, kept by every future version: a
//! token of a format this node does not know is reported as an unknown version only if it was
//! sealed by this cluster.
//!
//! # Rotation
//!
//! New tokens are always sealed with the current secret; a token sealed with one of the
//! previous secrets the node was configured with is still accepted, so a cluster can move to a
//! new secret node by node without refusing contexts its clients hold. Once every node runs
//! with the new secret and the old one has been dropped, tokens under the old one are refused.

use super::context::CausalContext;
use super::state::RequestId;
use crate::error::{Error, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The token format this node writes, and the only one it reads.
pub const TOKEN_FORMAT_VERSION: u8 = 3;

/// Bytes in a cluster secret (a keyed-BLAKE3 key).
pub const CLUSTER_SECRET_LEN: usize = 32;

/// What the holder of a token had seen of a key: the dots (the causal context, which a write
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

/// The key every node of a cluster shares to seal context tokens. Its `Debug` and `Display`
/// show only [`ClusterSecret::id`], never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; CLUSTER_SECRET_LEN]);

impl ClusterSecret {
    /// The secret with these bytes (from a secret file, or random).
    pub fn from_bytes(bytes: [u8; CLUSTER_SECRET_LEN]) -> ClusterSecret {
        ClusterSecret(bytes)
    }

    /// The bytes, for writing a secret file.
    pub fn as_bytes(&self) -> &[u8; CLUSTER_SECRET_LEN] {
        &self.0
    }

    /// A short public name for the secret (16 hex digits of a hash of it), for logs and for an
    /// operator comparing nodes during a rotation. It reveals nothing usable about the key.
    pub fn id(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(SECRET_ID_DOMAIN);
        hasher.update(&self.0);
        hasher.finalize().to_hex()[..16].to_owned()
    }

    fn mac(&self, body: &[u8]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(MAC_DOMAIN);
        hasher.update(body);
        hasher.finalize()
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret(id {})", self.id())
    }
}

impl fmt::Display for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

/// The secrets a node seals and checks tokens with: the current one seals every new token and
/// is tried first; the previous ones (a rotation in progress) are only accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextKeys {
    current: ClusterSecret,
    previous: Vec<ClusterSecret>,
}

impl ContextKeys {
    /// Seal with `current`; accept `current` and every one of `previous`.
    pub fn new(current: ClusterSecret, previous: impl IntoIterator<Item = ClusterSecret>) -> Self {
        ContextKeys {
            current,
            previous: previous.into_iter().collect(),
        }
    }

    /// The secret new tokens are sealed with.
    pub fn current(&self) -> &ClusterSecret {
        &self.current
    }

    /// The secrets still accepted but no longer used to seal.
    pub fn previous(&self) -> &[ClusterSecret] {
        &self.previous
    }

    /// Whether some accepted secret sealed `body` with `mac`. Every secret is tried, whichever
    /// matches, and each comparison is constant time, so the answer's timing says nothing about
    /// how close a forgery came or which secret matched.
    fn verify(&self, body: &[u8], mac: &blake3::Hash) -> bool {
        let mut ok = self.current.mac(body) == *mac;
        for secret in &self.previous {
            ok |= secret.mac(body) == *mac;
        }
        ok
    }
}

const BINDING_DOMAIN: &[u8] = b"quorumkv/context-binding/v1\0";
const MAC_DOMAIN: &[u8] = b"quorumkv/context-mac/v3\0";
const SECRET_ID_DOMAIN: &[u8] = b"quorumkv/cluster-secret-id/v1\0";
const BINDING_LEN: usize = 8;
const MAC_LEN: usize = blake3::OUT_LEN;
/// Bytes of a token besides its entries: version, binding, MAC, and the MessagePack headers of
/// the context's arrays and map (at most 5 bytes each), rounded up.
const TOKEN_FIXED_BYTES_MAX: usize = 1 + BINDING_LEN + MAC_LEN + 32;
/// Bytes one entry can take: a cloud dot (an array of two u64, at most 19 bytes) or a version
/// vector entry (at most 18), plus a request id (16 bytes as MessagePack bin, 18), rounded up.
const TOKEN_ENTRY_BYTES_MAX: usize = 40;

/// The longest token that can hold `max_entries` entries (and as many writes): a longer one is
/// refused before anything is hashed or decoded.
pub fn token_bytes_max(max_entries: usize) -> usize {
    max_entries
        .saturating_mul(TOKEN_ENTRY_BYTES_MAX)
        .saturating_add(TOKEN_FIXED_BYTES_MAX)
}

fn binding(keyspace: &str, key: &[u8]) -> [u8; BINDING_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(BINDING_DOMAIN);
    hasher.update(&(keyspace.len() as u64).to_le_bytes());
    hasher.update(keyspace.as_bytes());
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    let mut out = [0u8; BINDING_LEN];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..BINDING_LEN]);
    out
}

/// Encodes `context` as a token for `key` in `keyspace`, sealed with `keys`' current secret.
pub fn encode_token(
    keys: &ContextKeys,
    context: &ClientContext,
    keyspace: &str,
    key: &[u8],
) -> Vec<u8> {
    seal(&keys.current, body(context, keyspace, key))
}

/// The unsealed body of a token.
// Encoding a context into a Vec has no failure path (only writer I/O errors exist).
#[allow(clippy::expect_used)]
fn body(context: &ClientContext, keyspace: &str, key: &[u8]) -> Vec<u8> {
    let mut out = vec![TOKEN_FORMAT_VERSION];
    out.extend_from_slice(&binding(keyspace, key));
    rmp_serde::encode::write(&mut out, context).expect("encoding into a Vec cannot fail");
    out
}

fn seal(secret: &ClusterSecret, mut body: Vec<u8>) -> Vec<u8> {
    let mac = secret.mac(&body);
    body.extend_from_slice(mac.as_bytes());
    body
}

/// Decodes a token that a client presents for `key` in `keyspace`, allowing at most
/// `max_entries` context entries and as many writes, and accepting the secrets in `keys`.
/// Never panics and never falls back to an empty context.
///
/// Errors: a token longer than [`token_bytes_max`]`(max_entries)`, or with too many entries
/// or writes, is [`Error::ContextTooLarge`]; an empty or truncated one is
/// [`Error::ContextCorrupt`]; one whose MAC no accepted secret produced (forged, damaged,
/// from another cluster or from before a secret was retired) is [`Error::ContextNotAuthentic`];
/// an authentic token of another format is [`Error::ContextUnknownVersion`], of another key
/// [`Error::ContextWrongKey`]; undecodable or non-canonical contents are
/// [`Error::ContextCorrupt`].
pub fn decode_token(
    keys: &ContextKeys,
    token: &[u8],
    keyspace: &str,
    key: &[u8],
    max_entries: usize,
) -> Result<ClientContext> {
    let corrupt = |reason: &str| Error::ContextCorrupt {
        reason: reason.to_owned(),
    };
    let bytes_max = token_bytes_max(max_entries);
    if token.len() > bytes_max {
        return Err(Error::ContextTooLarge {
            found: token.len(),
            max: bytes_max,
            unit: "bytes",
        });
    }
    if token.is_empty() {
        return Err(corrupt("the token is empty"));
    }
    if (1..TOKEN_FORMAT_VERSION).contains(&token[0]) {
        // The unkeyed formats 1 and 2, which anyone could seal: however intact, nothing proves
        // a node issued them.
        return Err(Error::ContextNotAuthentic);
    }
    let Some(body_len) = token
        .len()
        .checked_sub(MAC_LEN)
        .filter(|n| *n > BINDING_LEN)
    else {
        return Err(corrupt("the token is truncated"));
    };
    let (sealed, mac) = token.split_at(body_len);
    let mac: [u8; MAC_LEN] = mac
        .try_into()
        .map_err(|_| corrupt("the token is truncated"))?;
    if !keys.verify(sealed, &blake3::Hash::from(mac)) {
        return Err(Error::ContextNotAuthentic);
    }
    let version = sealed[0];
    if version != TOKEN_FORMAT_VERSION {
        return Err(Error::ContextUnknownVersion { version });
    }
    let (bound, encoded) = sealed[1..].split_at(BINDING_LEN);
    if bound != binding(keyspace, key) {
        return Err(Error::ContextWrongKey);
    }
    // Only a node of this cluster can have sealed these bytes, but a node of a later release
    // may encode differently: decode them as checked MessagePack all the same, which reserves
    // nothing for lengths the bytes do not back.
    let context: ClientContext =
        quorumkv_client::msgpack::from_slice(encoded).map_err(|e| Error::ContextCorrupt {
            reason: format!("undecodable context: {e}"),
        })?;
    if body(&context, keyspace, key) != sealed
        || context.writes.windows(2).any(|pair| pair[0] >= pair[1])
    {
        return Err(corrupt("the context is not in canonical form"));
    }
    let entries = context.context.len().max(context.writes.len());
    if entries > max_entries {
        return Err(Error::ContextTooLarge {
            found: entries,
            max: max_entries,
            unit: "causal entries",
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

    fn keys() -> ContextKeys {
        ContextKeys::new(ClusterSecret::from_bytes([7; CLUSTER_SECRET_LEN]), [])
    }

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

    /// A token around `body_after_version`, sealed with the test secret as a node would.
    fn rebuild_with(version: u8, body_after_version: &[u8]) -> Vec<u8> {
        let mut body = vec![version];
        body.extend_from_slice(body_after_version);
        seal(keys().current(), body)
    }

    /// A token of format 2, sealed as every client could: with the unkeyed checksum.
    fn unkeyed_v2(context: &ClientContext, keyspace: &str, key: &[u8]) -> Vec<u8> {
        let mut body = vec![2];
        body.extend_from_slice(&binding(keyspace, key));
        rmp_serde::encode::write(&mut body, context).unwrap();
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"quorumkv/context-checksum/v1\0");
        hasher.update(&body);
        body.extend_from_slice(&hasher.finalize().as_bytes()[..8]);
        body
    }

    #[test]
    fn tokens_sealed_by_anyone_without_the_secret_are_not_authentic() {
        let context = ClientContext::from(CausalContext::from_dots([Dot::new(Actor(1), 3)]));
        // The unkeyed formats that every client could compute.
        let err = decode_token(&keys(), &unkeyed_v2(&context, "ks", b"k"), "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextNotAuthentic)), "{err:?}");
        // The current format sealed under another cluster's secret.
        let other = ContextKeys::new(ClusterSecret::from_bytes([8; CLUSTER_SECRET_LEN]), []);
        let token = encode_token(&other, &context, "ks", b"k");
        let err = decode_token(&keys(), &token, "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextNotAuthentic)), "{err:?}");
        // A valid token whose body an attacker altered (a higher counter), the MAC kept.
        let token = encode_token(&keys(), &context, "ks", b"k");
        let bigger = ClientContext::from(CausalContext::from_dots([Dot::new(Actor(1), 9)]));
        let mut altered = body(&bigger, "ks", b"k");
        altered.extend_from_slice(&token[token.len() - MAC_LEN..]);
        assert_eq!(altered.len(), token.len());
        let err = decode_token(&keys(), &altered, "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextNotAuthentic)), "{err:?}");
    }

    #[test]
    fn previous_secrets_are_accepted_until_they_are_dropped() {
        let old = ClusterSecret::from_bytes([1; CLUSTER_SECRET_LEN]);
        let new = ClusterSecret::from_bytes([2; CLUSTER_SECRET_LEN]);
        let context = ClientContext::from(CausalContext::from_dots([Dot::new(Actor(1), 3)]));
        let before = ContextKeys::new(old.clone(), []);
        let rotating = ContextKeys::new(new.clone(), [old.clone()]);
        let after = ContextKeys::new(new.clone(), []);
        let old_token = encode_token(&before, &context, "ks", b"k");
        assert_eq!(
            decode_token(&rotating, &old_token, "ks", b"k", 10).unwrap(),
            context
        );
        // New tokens are sealed with the current secret only.
        let new_token = encode_token(&rotating, &context, "ks", b"k");
        assert_eq!(new_token, encode_token(&after, &context, "ks", b"k"));
        assert!(decode_token(&before, &new_token, "ks", b"k", 10).is_err());
        let err = decode_token(&after, &old_token, "ks", b"k", 10);
        assert!(matches!(err, Err(Error::ContextNotAuthentic)), "{err:?}");
        assert_ne!(old.id(), new.id());
        assert!(!format!("{rotating:?}").contains("[1, 1"), "{rotating:?}");
    }

    #[test]
    fn an_oversized_token_is_refused_before_it_is_checked() {
        let limit = token_bytes_max(4);
        let err = decode_token(&keys(), &vec![0xff; limit + 1], "ks", b"k", 4);
        assert!(
            matches!(err, Err(Error::ContextTooLarge { found, max, unit: "bytes" })
                if found == limit + 1 && max == limit),
            "{err:?}"
        );
    }

    #[test]
    fn writes_out_of_order_or_twice_are_corrupt() {
        for writes in [
            vec![RequestId([2; 16]), RequestId([1; 16])],
            vec![RequestId([1; 16]); 2],
        ] {
            let mut body = binding("ks", b"k").to_vec();
            rmp_serde::encode::write(&mut body, &(CausalContext::new(), writes)).unwrap();
            let token = rebuild_with(TOKEN_FORMAT_VERSION, &body);
            let err = decode_token(&keys(), &token, "ks", b"k", 100);
            assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        }
    }

    #[test]
    fn empty_and_garbage_are_refused() {
        for bytes in [&b""[..], b"\x03", b"not a token at all"] {
            let err = decode_token(&keys(), bytes, "ks", b"k", 100);
            assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        }
        let err = decode_token(&keys(), &[0x03; 64], "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextNotAuthentic)), "{err:?}");
        let err = token_from_text("***");
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
    }

    #[test]
    fn authentic_tokens_of_a_future_format_are_an_unknown_version() {
        let token = encode_token(&keys(), &ClientContext::default(), "ks", b"k");
        let future = rebuild_with(4, &token[1..token.len() - MAC_LEN]);
        let err = decode_token(&keys(), &future, "ks", b"k", 100);
        assert!(
            matches!(err, Err(Error::ContextUnknownVersion { version: 4 })),
            "{err:?}"
        );
    }

    #[test]
    fn a_well_sealed_but_undecodable_or_non_canonical_context_is_corrupt() {
        let bind = binding("ks", b"k");
        let v = TOKEN_FORMAT_VERSION;
        // 0xc1 is never valid MessagePack.
        let mut body = bind.to_vec();
        body.push(0xc1);
        let err = decode_token(&keys(), &rebuild_with(v, &body), "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        // A context whose cloud holds a dot the vector already covers.
        let mut body = bind.to_vec();
        let raw = (
            (
                std::collections::BTreeMap::from([(Actor(1), 3u64)]),
                std::collections::BTreeSet::from([Dot::new(Actor(1), 2)]),
            ),
            Vec::<RequestId>::new(),
        );
        rmp_serde::encode::write(&mut body, &raw).unwrap();
        let err = decode_token(&keys(), &rebuild_with(v, &body), "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
        // Trailing bytes after the context.
        let mut body = bind.to_vec();
        rmp_serde::encode::write(&mut body, &ClientContext::default()).unwrap();
        body.push(0);
        let err = decode_token(&keys(), &rebuild_with(v, &body), "ks", b"k", 100);
        assert!(matches!(err, Err(Error::ContextCorrupt { .. })), "{err:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(super::super::tests::cases(64)))]

        #[test]
        fn token_round_trips_in_bytes_and_text(ctx in context_strategy(), key in any::<Vec<u8>>()) {
            let token = encode_token(&keys(), &ctx, "keyspace", &key);
            let n = ctx.context.len().max(ctx.writes().len());
            prop_assert!(token.len() <= token_bytes_max(n), "{} bytes", token.len());
            let decoded = decode_token(&keys(), &token, "keyspace", &key, n).unwrap();
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
            let token = encode_token(&keys(), &ctx, "keyspace", &key);
            let err = decode_token(&keys(), &token, "keyspace", &other, usize::MAX);
            prop_assert!(matches!(err, Err(Error::ContextWrongKey)), "{:?}", err);
            // The framing keeps ("ab", "c") and ("a", "bc") apart.
            let token = encode_token(&keys(), &ctx, "ab", b"c");
            let err = decode_token(&keys(), &token, "a", b"bc", usize::MAX);
            prop_assert!(matches!(err, Err(Error::ContextWrongKey)), "{:?}", err);
        }

        #[test]
        fn every_flipped_bit_is_refused_as_not_authentic(ctx in context_strategy()) {
            let token = encode_token(&keys(), &ctx, "ks", b"key");
            for bit in 0..token.len() * 8 {
                let mut damaged = token.clone();
                damaged[bit / 8] ^= 1 << (bit % 8);
                let err = decode_token(&keys(), &damaged, "ks", b"key", usize::MAX);
                let refused = matches!(err, Err(Error::ContextNotAuthentic));
                prop_assert!(refused, "bit {}: {:?}", bit, err);
            }
        }

        #[test]
        fn every_truncation_is_refused(ctx in context_strategy()) {
            let token = encode_token(&keys(), &ctx, "ks", b"key");
            for len in 0..token.len() {
                let err = decode_token(&keys(), &token[..len], "ks", b"key", usize::MAX);
                let refused = matches!(
                    err,
                    Err(Error::ContextCorrupt { .. } | Error::ContextNotAuthentic)
                );
                prop_assert!(refused, "len {}: {:?}", len, err);
            }
        }

        #[test]
        fn too_many_entries_is_refused(ctx in context_strategy()) {
            prop_assume!(!ctx.context.is_empty());
            let token = encode_token(&keys(), &ctx, "ks", b"key");
            let n = ctx.context.len().max(ctx.writes().len());
            let err = decode_token(&keys(), &token, "ks", b"key", n - 1);
            let refused = matches!(
                err,
                Err(Error::ContextTooLarge { found, max, unit: "causal entries" })
                    if found == n && max == n - 1
            ) || matches!(err, Err(Error::ContextTooLarge { unit: "bytes", .. }));
            prop_assert!(refused, "{:?}", err);
        }
    }
}
