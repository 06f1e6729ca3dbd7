//! The decoders under test, each with how to make its input from MessagePack, how to decode,
//! and how to check what it accepted.

use super::values::*;
use super::{msgpack, mutated, MAX_FRAME, TOKEN_KEY, TOKEN_KEYSPACE};
use proptest::prelude::*;
use quorumkv_client::frame::{decode_body, decode_frame, encode_frame, PROTOCOL_VERSION};
use quorumkv_client::protocol::Request;
use quorumkv_client::protocol::Response;
use quorumkv_node::peer::{Hello, PeerMessage};
use quorumkv_node::storage::{decode_incarnation, encode_incarnation};
use quorumkv_node::tls::Identity;
use quorumkv_node::version_vector::{
    decode_token, encode_token, KeyState, STATE_FORMAT_VERSION, TOKEN_FORMAT_VERSION,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

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
    let Ok(context) = decode_token(fuzz_keys(), bytes, TOKEN_KEYSPACE, TOKEN_KEY, usize::MAX)
    else {
        return Ok(());
    };
    // Only canonical tokens are accepted: one encodes back to the same bytes.
    let token = encode_token(fuzz_keys(), &context, TOKEN_KEYSPACE, TOKEN_KEY);
    if bytes[0] == TOKEN_FORMAT_VERSION && token != bytes {
        return Err(format!(
            "{context:?} was accepted from a non-canonical token"
        ));
    }
    match decode_token(fuzz_keys(), &token, TOKEN_KEYSPACE, TOKEN_KEY, usize::MAX) {
        Ok(again) if again == context => Ok(()),
        other => Err(format!("{context:?} re-decodes as {other:?}")),
    }
}

fn check_state(bytes: &[u8]) -> Result<(), String> {
    let Ok(state) = KeyState::decode(bytes) else {
        return Ok(());
    };
    // As for tokens: canonical bytes of the current format, and format 1 read as the same state.
    let canonical = state.encode_canonical();
    if bytes[0] == STATE_FORMAT_VERSION && canonical != bytes {
        return Err(format!("{state:?} was accepted from non-canonical bytes"));
    }
    match KeyState::decode(&canonical) {
        Ok(again) if again == state => Ok(()),
        other => Err(format!("{state:?} re-decodes as {other:?}")),
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
    valid: || client_context().prop_map(|c| token_payload(&c)).boxed(),
    wrap: token_around,
    decode: |b| decode_token(fuzz_keys(), b, TOKEN_KEYSPACE, TOKEN_KEY, usize::MAX).is_ok(),
    check: check_token,
};

pub const KEY_STATE: Target = Target {
    name: "KeyState::decode",
    valid: || {
        key_state()
            .prop_map(|s| s.encode_canonical()[1..].to_vec())
            .boxed()
    },
    wrap: |b| [vec![STATE_FORMAT_VERSION], b].concat(),
    decode: |b| KeyState::decode(b).is_ok(),
    check: check_state,
};

/// States of format 1, which nodes still read: `[context, siblings]`, no retired writes.
pub const KEY_STATE_V1: Target = Target {
    name: "KeyState::decode (format 1)",
    valid: || {
        key_state()
            .prop_map(|s| rmp_serde::to_vec(&(s.context(), s.siblings())).unwrap())
            .boxed()
    },
    wrap: |b| [vec![1], b].concat(),
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
pub const ALL: [&Target; 10] = [
    &REQUEST_FRAME,
    &REQUEST,
    &RESPONSE,
    &PEER_MESSAGE,
    &HELLO,
    &TOKEN,
    &KEY_STATE,
    &KEY_STATE_V1,
    &INCARNATION,
    &IDENTITY,
];
