//! Fuzzing every decoder of untrusted bytes, on stable Rust, with proptest.
//!
//! Bytes a node or client did not produce itself arrive in these decoders:
//!
//! | decoder | bytes from |
//! | --- | --- |
//! | `quorumkv_client::frame::decode_header`, `decode_frame`, `decode_body` | every stream: client requests at a node, answers at a client, peer messages and hellos |
//! | `Context::from_str`, `version_vector::token_from_text` | a context's text form, typed or pasted by a user |
//! | `version_vector::decode_token` (format 3, sealed with the fuzz secret) | the context a client sends back with a write |
//! | `KeyState::decode` (formats 1 and 2) | a replica's state in `Replicate` and `ReadReply`, and every state read from disk |
//! | `storage::decode_incarnation`, `sled_store::decode_entry` | records read back from the data directory |
//! | `tls::Identity::from_certificate_der` | the certificate a peer or client presents |
//!
//! Each is fuzzed for three properties:
//!
//! 1. **No panic, whatever the bytes.** Random bytes, random MessagePack shaped like our
//!    messages, and mutations of valid encodings (see `fuzz/mod.rs` for why the last kind
//!    matters most) give a value or a typed error.
//! 2. **What is accepted is stable.** When damaged bytes do decode, encoding the value again
//!    and decoding that gives the same value (for the canonical encodings, key states and
//!    tokens, the very same bytes), so no decoder accepts something it cannot reproduce.
//! 3. **A decode of an encode gives back the value,** for generated values of every message.
//!
//! The third property of the issue, that no decoder allocates beyond what its input backs, is
//! measured in `fuzz_alloc.rs`, a binary of its own because it replaces the global allocator.
//!
//! The bounded run (each target's case count below) is part of `cargo test`; a long run is
//! `QUORUMKV_FUZZ_CASES=1000000 cargo test -p quorumkv-node --test fuzz_decoders` (see
//! `fuzz/mod.rs` for the seed and why not `--release`).

mod fuzz;

use fuzz::targets::*;
use fuzz::values::*;
use fuzz::*;
use proptest::collection::vec;
use proptest::prelude::*;
use quorumkv_client::frame::{
    decode_frame, decode_header, encode_frame, FRAME_HEADER_LEN, PROTOCOL_VERSION,
};
use quorumkv_client::protocol::{Request, Response};
use quorumkv_client::Context;
use quorumkv_node::certs::{client_uri, node_uri};
use quorumkv_node::peer::{Hello, PeerMessage};
use quorumkv_node::storage::sled_store::decode_entry;
use quorumkv_node::storage::{decode_incarnation, encode_incarnation, storage_key};
use quorumkv_node::tls::Identity;
use quorumkv_node::version_vector::{
    decode_token, encode_token, token_from_text, token_to_text, Actor, CausalContext,
    ClientContext, Dot, KeyState, RequestId,
};
use quorumkv_node::Error;
use quorumkv_ring::NodeId;

/// Cases per target in the bounded run of the byte decoders.
const CASES: u32 = 16_384;
/// Cases for targets that sign a certificate per case.
const CERT_CASES: u32 = 2048;

fn check(target: &Target, cases: u32) {
    run(target.name, config(cases), inputs(target), |bytes| {
        (target.check)(&bytes).map_err(TestCaseError::fail)
    });
}

// ----- 1 and 2: no panic, and what is accepted is stable ----------------------------------

#[test]
fn request_frames() {
    check(&REQUEST_FRAME, CASES);
}

#[test]
fn client_requests() {
    check(&REQUEST, CASES);
}

#[test]
fn node_responses() {
    check(&RESPONSE, CASES);
}

#[test]
fn peer_messages() {
    check(&PEER_MESSAGE, CASES);
}

#[test]
fn peer_hellos() {
    check(&HELLO, CASES);
}

#[test]
fn context_tokens() {
    check(&TOKEN, CASES);
}

#[test]
fn stored_key_states() {
    check(&KEY_STATE, CASES);
}

#[test]
fn stored_key_states_of_format_1() {
    check(&KEY_STATE_V1, CASES);
}

#[test]
fn incarnation_records() {
    check(&INCARNATION, CASES);
}

#[test]
fn certificate_identities() {
    check(&IDENTITY, CERT_CASES);
}

/// The header alone decides, on five bytes, whether a body is read: exactly version 1 and a
/// length within the cap pass, and the length returned is the one the header states.
#[test]
fn frame_headers() {
    let inputs = (any::<[u8; FRAME_HEADER_LEN]>(), any::<bool>()).prop_map(|(mut h, v1)| {
        if v1 {
            h[0] = PROTOCOL_VERSION;
        }
        h
    });
    run("frame::decode_header", config(CASES), inputs, |header| {
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let ok = header[0] == PROTOCOL_VERSION && len <= MAX_FRAME;
        match decode_header(header, MAX_FRAME) {
            Ok(n) => prop_assert!(ok && n == len as usize, "{header:?} gave {n}"),
            Err(e) => prop_assert!(!ok, "{header:?} refused: {e}"),
        }
        Ok(())
    });
}

/// A frame whose header disagrees with the bytes behind it, in either direction, is refused,
/// however plausible the body.
#[test]
fn frame_length_prefixes_rewritten() {
    let inputs = (request(), any::<u32>(), 0usize..3);
    run(
        "frame length prefix",
        config(CASES),
        inputs,
        |(request, len, how)| {
            let mut frame = encode_frame(&request, MAX_FRAME).unwrap();
            let body = frame.len() - FRAME_HEADER_LEN;
            let claimed = match how {
                0 => len,
                1 => (body as u32).saturating_add(1 + len % 16),
                _ => (body as u32).saturating_sub(1 + len % 16),
            };
            prop_assume!(claimed as usize != body);
            frame[1..FRAME_HEADER_LEN].copy_from_slice(&claimed.to_be_bytes());
            prop_assert!(decode_frame::<Request>(&frame, MAX_FRAME).is_err());
            Ok(())
        },
    );
}

/// The text forms of a context: any text is parsed or refused, and text made of valid base64
/// and then damaged likewise.
#[test]
fn context_texts() {
    let valid = vec(any::<u8>(), 0..64).prop_map(|b| Context::from_bytes(b).to_string());
    let inputs = prop_oneof![
        ".{0,64}".boxed(),
        "[A-Za-z0-9_=+/ \n-]{0,64}".boxed(),
        (valid, vec(mutation(), 1..3))
            .prop_map(|(text, mutations)| {
                let mut bytes = text.into_bytes();
                mutations.iter().for_each(|m| m.apply(&mut bytes));
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .boxed(),
    ];
    run("context text forms", config(CASES), inputs, |text| {
        if let Ok(context) = text.parse::<Context>() {
            prop_assert_eq!(context.to_string().parse::<Context>().unwrap(), context);
        }
        if let Ok(token) = token_from_text(&text) {
            prop_assert_eq!(token_from_text(&token_to_text(&token)).unwrap(), token);
        }
        Ok(())
    });
}

/// Entries scanned from disk: a storage key (token, then key) and a state. Damage to either is
/// an error naming the key, never a panic, and never an entry under the wrong token.
#[test]
fn stored_entries() {
    let inputs = (
        vec(any::<u8>(), 0..24),
        key_state(),
        vec(mutation(), 0..3),
        vec(mutation(), 0..3),
    )
        .prop_map(|(key, state, key_damage, state_damage)| {
            let mut skey = storage_key("ks", &key);
            key_damage.iter().for_each(|m| m.apply(&mut skey));
            let mut bytes = state.encode_canonical();
            state_damage.iter().for_each(|m| m.apply(&mut bytes));
            (skey, bytes)
        });
    run(
        "sled_store::decode_entry",
        config(CASES),
        inputs,
        |(skey, bytes)| {
            if let Ok(entry) = decode_entry("ks", &skey, &bytes) {
                prop_assert_eq!(storage_key("ks", &entry.key), skey);
                prop_assert_eq!(entry.state.encode_canonical(), bytes);
            }
            Ok(())
        },
    );
}

/// Certificates carrying arbitrary names: a node or client identity comes out only if the
/// certificate states it, as its one `quorumkv://` URI.
#[test]
fn certificates_with_arbitrary_names() {
    let uri = prop_oneof![
        Just("quorumkv://node/"),
        Just("quorumkv://client/"),
        Just("QuorumKV://node/"),
        Just("quorumkv://"),
        Just("quorumkv:"),
        Just("https://"),
        Just(""),
    ]
    .prop_flat_map(|prefix| "[ -~]{0,24}".prop_map(move |rest| format!("{prefix}{rest}")));
    let san = prop_oneof![
        3 => uri.prop_map(|u| (Some(u.clone()), rcgen::SanType::URI(u.try_into().unwrap()))),
        1 => "[a-z0-9.-]{1,24}".prop_filter_map("not a DNS name", |d| {
            Some((None, rcgen::SanType::DnsName(d.try_into().ok()?)))
        }),
        1 => "[ -~]{1,24}".prop_filter_map("not IA5", |e| {
            Some((None, rcgen::SanType::Rfc822Name(e.try_into().ok()?)))
        }),
    ];
    let inputs = (vec(san, 0..4), "[ -~]{0,32}");
    run(
        "certificates with arbitrary names",
        config(CERT_CASES),
        inputs,
        |(sans, common_name)| {
            let uris: Vec<String> = sans.iter().filter_map(|(u, _)| u.clone()).collect();
            let Some(der) = cert_with(sans.into_iter().map(|(_, san)| san).collect(), &common_name)
            else {
                return Ok(());
            };
            match Identity::from_certificate_der(&der) {
                Ok(Identity::Node(id)) => prop_assert!(uris.contains(&node_uri(&id)), "{uris:?}"),
                Ok(Identity::Client(name)) => {
                    prop_assert!(uris.contains(&client_uri(&name)), "{uris:?}")
                }
                Err(e) => prop_assert!(matches!(e, Error::PeerIdentity { .. }), "{e}"),
            }
            Ok(())
        },
    );
}

// ----- 3: a decode of an encode gives back the value ---------------------------------------

proptest! {
    #![proptest_config(config(CASES / 4))]

    #[test]
    fn requests_round_trip(request in request()) {
        let frame = encode_frame(&request, MAX_FRAME).unwrap();
        prop_assert_eq!(decode_frame::<Request>(&frame, MAX_FRAME).unwrap(), request);
    }

    #[test]
    fn responses_round_trip(response in response()) {
        let frame = encode_frame(&response, MAX_FRAME).unwrap();
        prop_assert_eq!(decode_frame::<Response>(&frame, MAX_FRAME).unwrap(), response);
    }

    #[test]
    fn peer_messages_round_trip(message in peer_message()) {
        let frame = encode_frame(&message, MAX_FRAME).unwrap();
        prop_assert_eq!(decode_frame::<PeerMessage>(&frame, MAX_FRAME).unwrap(), message);
    }

    #[test]
    fn hellos_round_trip(hello in hello()) {
        let frame = encode_frame(&hello, MAX_FRAME).unwrap();
        prop_assert_eq!(decode_frame::<Hello>(&frame, MAX_FRAME).unwrap(), hello);
    }

    #[test]
    fn tokens_round_trip(context in client_context(), key in vec(any::<u8>(), 0..32)) {
        let token = encode_token(fuzz_keys(), &context, "ks", &key);
        let entries = context.context.len().max(context.writes().len());
        prop_assert_eq!(decode_token(fuzz_keys(), &token, "ks", &key, entries).unwrap(), context);
        let text = token_to_text(&token);
        prop_assert_eq!(token_from_text(&text).unwrap(), token);
    }

    /// States written before format 2 still decode, with no retired writes.
    #[test]
    fn key_states_of_format_1_decode(state in key_state()) {
        let mut bytes = vec![1];
        rmp_serde::encode::write(&mut bytes, &(state.context(), state.siblings())).unwrap();
        let decoded = KeyState::decode(&bytes).unwrap();
        prop_assert_eq!(decoded.context(), state.context());
        prop_assert_eq!(decoded.siblings(), state.siblings());
        prop_assert!(decoded.retired().is_empty());
    }

    #[test]
    fn key_states_round_trip(state in key_state()) {
        prop_assert_eq!(KeyState::decode(&state.encode_canonical()).unwrap(), state);
    }

    #[test]
    fn incarnation_records_round_trip(record in incarnation()) {
        let bytes = encode_incarnation(&record).unwrap();
        prop_assert_eq!(decode_incarnation(&bytes).unwrap(), record);
    }

    #[test]
    fn stored_entries_round_trip(key in vec(any::<u8>(), 0..32), state in key_state()) {
        let entry = decode_entry("ks", &storage_key("ks", &key), &state.encode_canonical())
            .unwrap();
        prop_assert_eq!(entry.key, key);
        prop_assert_eq!(entry.state, state);
    }

    #[test]
    fn client_contexts_round_trip(bytes in vec(any::<u8>(), 0..64)) {
        let context = Context::from_bytes(bytes);
        prop_assert_eq!(context.to_string().parse::<Context>().unwrap(), context);
    }
}

proptest! {
    #![proptest_config(config(CERT_CASES))]

    /// A certificate made for a node or client identity gives back exactly that identity.
    #[test]
    fn identities_round_trip(
        node in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
        client in "[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?",
    ) {
        let id = NodeId::new(node).unwrap();
        let der = cert_with(vec![uri_san(&node_uri(&id))], "n").unwrap();
        prop_assert_eq!(Identity::from_certificate_der(&der).unwrap(), Identity::Node(id));
        let der = cert_with(vec![uri_san(&client_uri(&client))], "c").unwrap();
        prop_assert_eq!(Identity::from_certificate_der(&der).unwrap(), Identity::Client(client));
    }
}

/// The token helpers of `fuzz/mod.rs` rebuild real tokens byte for byte, so the token target's
/// sealed inputs are what a client could send.
#[test]
fn token_sealing_matches_the_node() {
    let context = ClientContext::new(
        CausalContext::from_dots([Dot::new(Actor(9), 3)]),
        [RequestId([7; 16])],
    );
    let token = encode_token(fuzz_keys(), &context, TOKEN_KEYSPACE, TOKEN_KEY);
    assert_eq!(token_around(token_payload(&context)), token);
}
