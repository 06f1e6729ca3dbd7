//! Framing: how messages are cut out of a QUIC stream.
//!
//! Every message, on the client protocol and the peer protocol alike, travels as one frame:
//!
//! ```text
//! +---------+-------------------+------------------------------+
//! | version | length (u32, BE)  | body: rmp-serde, `length` B  |
//! +---------+-------------------+------------------------------+
//!   1 byte        4 bytes
//! ```
//!
//! The header is checked before anything is allocated for the body: an unknown version or a
//! length above the receiver's cap is refused on the five header bytes alone, so a hostile or
//! broken peer cannot make a node allocate more than `max_frame_bytes` for the body. Decoding
//! the body never panics, and reserves memory only for what the body's bytes hold, not for
//! what its MessagePack headers claim ([`crate::msgpack`]); malformed bytes become
//! [`Error::MalformedFrame`].
//!
//! This module holds no runtime: reading and writing frames on a stream is the transport's job,
//! which calls [`decode_header`] on the first five bytes and [`decode_body`] on the rest.

use crate::error::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};

/// The protocol version this build speaks, carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes in a frame header: one version byte and a big-endian `u32` length.
pub const FRAME_HEADER_LEN: usize = 5;

/// Encodes `message` as one frame: header then rmp-serde body.
///
/// Fails if the body would exceed `max_frame_bytes`, so a sender learns about an oversized
/// message before the receiver has to refuse it.
pub fn encode_frame<T: Serialize>(message: &T, max_frame_bytes: u32) -> Result<Vec<u8>> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    // Named (map) encoding lets later versions add optional fields without breaking old peers.
    rmp_serde::encode::write_named(&mut out, message).map_err(|e| Error::Encode {
        reason: e.to_string(),
    })?;
    let body_len = out.len() - FRAME_HEADER_LEN;
    if body_len as u64 > u64::from(max_frame_bytes) {
        return Err(Error::FrameTooLarge {
            len: body_len as u64,
            max: u64::from(max_frame_bytes),
        });
    }
    out[0] = PROTOCOL_VERSION;
    // The cast cannot truncate: body_len <= max_frame_bytes, a u32.
    out[1..FRAME_HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(out)
}

/// Checks a frame header and returns the body length to read next.
pub fn decode_header(header: [u8; FRAME_HEADER_LEN], max_frame_bytes: u32) -> Result<usize> {
    if header[0] != PROTOCOL_VERSION {
        return Err(Error::UnsupportedVersion {
            found: header[0],
            supported: PROTOCOL_VERSION,
        });
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len > max_frame_bytes {
        return Err(Error::FrameTooLarge {
            len: u64::from(len),
            max: u64::from(max_frame_bytes),
        });
    }
    Ok(len as usize)
}

/// Decodes a frame body read after [`decode_header`]. The body must be complete MessagePack
/// whose every length its bytes back ([`crate::msgpack`]), so a body reserves no memory for
/// what it only claims to hold.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    crate::msgpack::from_slice(body).map_err(|e| Error::MalformedFrame {
        reason: e.to_string(),
    })
}

/// Decodes one complete frame held in memory (header and body); trailing bytes are an error.
pub fn decode_frame<T: DeserializeOwned>(frame: &[u8], max_frame_bytes: u32) -> Result<T> {
    let Some((header, body)) = frame.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(Error::MalformedFrame {
            reason: format!("{} bytes is shorter than a frame header", frame.len()),
        });
    };
    let len = decode_header(*header, max_frame_bytes)?;
    if body.len() != len {
        return Err(Error::MalformedFrame {
            reason: format!(
                "header announces {len} body bytes, frame holds {}",
                body.len()
            ),
        });
    }
    decode_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        name: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    }

    fn probe(len: usize) -> Probe {
        Probe {
            name: "probe".into(),
            payload: vec![7; len],
        }
    }

    #[test]
    fn round_trip() {
        let frame = encode_frame(&probe(100), 1024).unwrap();
        assert_eq!(frame[0], PROTOCOL_VERSION);
        let back: Probe = decode_frame(&frame, 1024).unwrap();
        assert_eq!(back, probe(100));
    }

    #[test]
    fn oversized_message_is_refused_by_sender() {
        let err = encode_frame(&probe(2000), 1024).unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { max: 1024, .. }),
            "{err}"
        );
    }

    #[test]
    fn oversized_header_is_refused_before_reading_the_body() {
        let mut header = [PROTOCOL_VERSION, 0, 0, 0, 0];
        header[1..].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = decode_header(header, 1 << 20).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { len, .. } if len == u64::from(u32::MAX)));
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut frame = encode_frame(&probe(1), 1024).unwrap();
        frame[0] = 9;
        let err = decode_frame::<Probe>(&frame, 1024).unwrap_err();
        assert!(matches!(
            err,
            Error::UnsupportedVersion {
                found: 9,
                supported: 1
            }
        ));
    }

    #[test]
    fn length_mismatch_is_malformed() {
        let mut frame = encode_frame(&probe(10), 1024).unwrap();
        frame.pop();
        assert!(matches!(
            decode_frame::<Probe>(&frame, 1024),
            Err(Error::MalformedFrame { .. })
        ));
        assert!(matches!(
            decode_frame::<Probe>(&[1, 0], 1024),
            Err(Error::MalformedFrame { .. })
        ));
    }

    /// Found by `node/tests/fuzz_alloc.rs`: a 53-byte `Response::Got` body whose sibling array
    /// claimed 2^32 - 1 entries made the decoder reserve 1 MiB. It is malformed, and refused
    /// before anything is reserved.
    #[test]
    fn a_body_claiming_more_than_it_holds_is_malformed() {
        let mut body = vec![0x92, 0xa1, b'x'];
        body.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc4, 0x00]);
        let err = decode_body::<(String, Vec<Probe>)>(&body).unwrap_err();
        assert!(matches!(err, Error::MalformedFrame { .. }), "{err}");
        assert!(
            err.to_string().contains("announces 4294967295 elements"),
            "{err}"
        );
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame::<Probe>(&bytes, 1024);
        }

        /// A valid header with arbitrary body bytes is an error or a message, never a panic.
        #[test]
        fn arbitrary_bodies_do_not_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut frame = vec![PROTOCOL_VERSION];
            frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
            frame.extend_from_slice(&body);
            let _ = decode_frame::<Probe>(&frame, 1024);
        }
    }
}
