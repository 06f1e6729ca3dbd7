//! MessagePack decoding that reserves memory only for what the input holds.
//!
//! # The hole
//!
//! rmp-serde passes each array's and map's announced length to serde as a size hint, and
//! serde's `Vec` (and every other sequence it builds with a capacity) reserves room for
//! `min(hint, 1 MiB / element size)` elements before it reads the first one. The announced
//! length is whatever the sender wrote. A 53-byte `Response::Got` whose `siblings` header
//! claims four billion entries made a client reserve 1 MiB, then fail on the missing entries; a
//! 20-byte key state did the same to a replica through `Replicate`, a `ForwardReply` to a
//! coordinator, and a client's context token (whose checksum anyone can compute) to the node
//! it writes through. Strings and byte strings were never the problem: rmp-serde checks their
//! length against the input and borrows them from it.
//!
//! # The check
//!
//! [`from_slice`] walks the input once before decoding ([`check_lengths`]): token by token,
//! without recursion and without allocating, it refuses the input unless every length is
//! backed by the bytes after its header. A string, byte string or extension must fit in what
//! is left; an array or map may announce no more elements than there are bytes left, since
//! every element takes at least one byte. Elements owed by all open arrays and maps are counted
//! together, so nested headers cannot each claim the whole rest of the input. Only then does
//! rmp-serde decode, and every size hint serde sees is at most the input's length: a decode of
//! `n` bytes reserves room for at most `n` elements in all, whatever its headers say.
//!
//! The walk covers the whole input, not only its first value, because rmp-serde reads some
//! lenient forms (an enum variant written as its name followed by its fields) across what, to
//! MessagePack, are two values. So an input is accepted only if it is a sequence of complete
//! values; rmp-serde alone ignored whatever followed the first. Everything our encoders write
//! is one complete value, and every input rmp-serde decodes to the end passes the check
//! unchanged.

use serde::Deserialize;

pub use rmp_serde::decode::Error;

/// Decodes MessagePack like `rmp_serde::from_slice`, after [`check_lengths`].
pub fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Error> {
    check_lengths(bytes)?;
    rmp_serde::from_slice(bytes)
}

/// Checks that `bytes` is a sequence of complete MessagePack values whose every length is
/// backed by the bytes after its header (see the module documentation). Linear time, constant
/// memory.
pub fn check_lengths(bytes: &[u8]) -> Result<(), Error> {
    let mut at = 0;
    // Elements announced by open arrays and maps and not yet read. Never above the bytes left,
    // so it cannot overflow.
    let mut owed: u64 = 0;
    while let Some(&marker) = bytes.get(at) {
        let token = Token::of(marker).ok_or_else(|| {
            Error::Syntax(format!(
                "byte {at}: 0x{marker:02x} is not a MessagePack marker"
            ))
        })?;
        let header_end = at + 1 + token.length_bytes;
        let length = bytes
            .get(at + 1..header_end)
            .ok_or_else(|| Error::Syntax(format!("byte {at}: the input ends inside a header")))?;
        let length = length.iter().fold(0u64, |n, b| n << 8 | u64::from(*b)) + token.fixed_len;
        let left = (bytes.len() - header_end) as u64;
        // What the token itself claims: its payload's bytes, or its container's elements.
        let (payload, elements) = match token.kind {
            Kind::Scalar | Kind::Bytes => (length, 0),
            Kind::Array => (0, length),
            // A key and a value per entry.
            Kind::Map => (0, 2 * length),
        };
        if payload.max(elements) > left {
            return Err(Error::Syntax(format!(
                "byte {at}: a {} announces {length} {}, but only {left} bytes follow",
                token.kind.noun(),
                token.kind.unit(),
            )));
        }
        // The token is one element of the innermost open container (or a new top-level value
        // when none is open); a container owes its own elements from here on.
        owed = owed.saturating_sub(1) + elements;
        if payload + owed > left {
            return Err(Error::Syntax(format!(
                "byte {at}: the open arrays and maps still announce {owed} elements, but only {} \
                 bytes follow",
                left - payload
            )));
        }
        // In range: `payload <= left`, a length within the slice.
        at = header_end + payload as usize;
    }
    if owed > 0 {
        return Err(Error::Syntax(format!(
            "the input ends {owed} elements before its arrays and maps do"
        )));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nil, booleans, numbers: a fixed payload.
    Scalar,
    /// Strings, byte strings and extensions: a payload of the announced length.
    Bytes,
    Array,
    Map,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Scalar => "number",
            Kind::Bytes => "string",
            Kind::Array => "array",
            Kind::Map => "map",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Kind::Scalar | Kind::Bytes => "bytes",
            Kind::Array => "elements",
            Kind::Map => "entries",
        }
    }
}

/// What a marker byte says about the token it starts.
struct Token {
    kind: Kind,
    /// Big-endian length bytes after the marker (0 when the marker holds the length).
    length_bytes: usize,
    /// Added to the length read: the length a fix-form marker holds, the fixed payload of a
    /// number, or the type byte of an extension.
    fixed_len: u64,
}

impl Token {
    /// The token a marker starts; `None` for 0xc1, which MessagePack never uses.
    fn of(marker: u8) -> Option<Token> {
        let token = |kind, length_bytes, fixed_len| {
            Some(Token {
                kind,
                length_bytes,
                fixed_len,
            })
        };
        let low = |mask: u8| u64::from(marker & mask);
        match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => token(Kind::Scalar, 0, 0),
            0x80..=0x8f => token(Kind::Map, 0, low(0x0f)),
            0x90..=0x9f => token(Kind::Array, 0, low(0x0f)),
            0xa0..=0xbf => token(Kind::Bytes, 0, low(0x1f)),
            0xc1 => None,
            // bin 8/16/32 and str 8/16/32
            0xc4..=0xc6 => token(Kind::Bytes, 1 << (marker - 0xc4), 0),
            0xd9..=0xdb => token(Kind::Bytes, 1 << (marker - 0xd9), 0),
            // ext 8/16/32: the length, then a type byte, then the data
            0xc7..=0xc9 => token(Kind::Bytes, 1 << (marker - 0xc7), 1),
            // float 32/64, uint 8..64, int 8..64
            0xca => token(Kind::Scalar, 0, 4),
            0xcb => token(Kind::Scalar, 0, 8),
            0xcc..=0xcf => token(Kind::Scalar, 0, 1 << (marker - 0xcc)),
            0xd0..=0xd3 => token(Kind::Scalar, 0, 1 << (marker - 0xd0)),
            // fixext 1/2/4/8/16: a type byte and 2^k bytes of data
            0xd4..=0xd8 => token(Kind::Bytes, 0, 1 + (1 << (marker - 0xd4))),
            0xdc | 0xdd => token(Kind::Array, 2 << (marker - 0xdc), 0),
            0xde | 0xdf => token(Kind::Map, 2 << (marker - 0xde), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Serialize;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        name: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        items: Vec<(u64, Option<String>)>,
        table: BTreeMap<String, Vec<i32>>,
        kind: ProbeKind,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    enum ProbeKind {
        Unit,
        Tuple(u8, f64),
        Struct { flag: bool },
    }

    fn array32(claim: u32) -> Vec<u8> {
        let mut out = vec![0xdd];
        out.extend_from_slice(&claim.to_be_bytes());
        out
    }

    /// The regression: a 53-byte `Response::Got` whose `siblings` claimed 2^32 - 1 entries
    /// made serde reserve 1 MiB (`node/tests/fuzz_alloc.rs` found it). Claims the bytes do not
    /// back are now refused before serde sees them.
    #[test]
    fn a_length_the_bytes_do_not_back_is_refused_before_decoding() {
        let mut bytes = array32(u32::MAX);
        bytes.extend_from_slice(&[1, 2, 3]);
        let err = from_slice::<Vec<u64>>(&bytes).unwrap_err();
        assert!(
            err.to_string().contains("announces 4294967295 elements"),
            "{err}"
        );
        // Maps owe two tokens per entry, and strings their bytes.
        assert!(from_slice::<BTreeMap<u8, u8>>(&[0x82, 1, 2, 3]).is_err());
        assert!(from_slice::<String>(&[0xdb, 0, 0, 1, 0, b'a']).is_err());
        // Nested headers share the input: neither may claim all of it for itself.
        let mut nested = vec![0x92];
        nested.extend(array32(4));
        nested.extend_from_slice(&[1, 2, 3, 4]);
        assert!(from_slice::<(Vec<u8>, u8)>(&nested).is_err());
        nested.push(5);
        assert_eq!(
            from_slice::<(Vec<u8>, u8)>(&nested).unwrap(),
            (vec![1, 2, 3, 4], 5)
        );
    }

    #[test]
    fn truncated_headers_reserved_markers_and_trailing_garbage_are_refused() {
        for bytes in [
            &[0xcd, 0x01][..],
            &[0xdc, 0x00],
            &[0xc1],
            &[0x01, 0xc1],
            &[0x01, 0x92],
        ] {
            assert!(check_lengths(bytes).is_err(), "{bytes:02x?}");
        }
        // A sequence of complete values passes; so does nothing at all.
        assert!(check_lengths(&[0x01, 0x91, 0xc0, 0xa1, b'x']).is_ok());
        assert!(check_lengths(&[]).is_ok());
    }

    /// Nesting costs rmp-serde a stack frame per level, also inside a field the decoder skips;
    /// its depth limit (1024) turns a deep input into an error before a test thread's (or a
    /// tokio worker's) 2 MiB stack runs out. The check itself walks without recursion.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let depth = 100_000;
        let mut bytes = vec![0x81, 0xa4, b'd', b'e', b'e', b'p'];
        bytes.extend(std::iter::repeat_n(0x91, depth));
        bytes.push(0xc0);
        assert!(check_lengths(&bytes).is_ok());
        let err = from_slice::<Probe>(&bytes).unwrap_err();
        assert!(err.to_string().contains("depth limit"), "{err}");
    }

    #[test]
    fn extensions_and_numbers_are_walked_over() {
        let bytes = [
            0xd4, 1, 9, // fixext 1
            0xc7, 2, 5, 0xaa, 0xbb, // ext 8 of 2 bytes
            0xcb, 0, 0, 0, 0, 0, 0, 0, 0, // float 64
            0xd1, 0xff, 0xfe, // int 16
        ];
        assert!(check_lengths(&bytes).is_ok());
        assert!(check_lengths(&bytes[..bytes.len() - 1]).is_err());
    }

    fn probe() -> impl Strategy<Value = Probe> {
        let kind = prop_oneof![
            Just(ProbeKind::Unit),
            any::<(u8, f64)>().prop_map(|(a, b)| ProbeKind::Tuple(a, b)),
            any::<bool>().prop_map(|flag| ProbeKind::Struct { flag }),
        ];
        (
            ".{0,8}",
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(any::<(u64, Option<String>)>(), 0..4),
            proptest::collection::btree_map(".{0,4}", any::<Vec<i32>>(), 0..3),
            kind,
        )
            .prop_map(|(name, payload, items, table, kind)| Probe {
                name,
                payload,
                items,
                table,
                kind,
            })
    }

    /// rmp-serde's own decode, and whether it read every byte.
    fn plain(bytes: &[u8]) -> (Result<Probe, Error>, bool) {
        let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
        let result = Probe::deserialize(&mut de);
        let read_all = de.position() == bytes.len() as u64;
        (result, read_all)
    }

    proptest! {
        /// The check only ever refuses what rmp-serde cannot decode to the end: on valid
        /// encodings, both forms, and damaged ones, the checked decode agrees with rmp-serde
        /// whenever rmp-serde reads the whole input, and never accepts what rmp-serde refuses.
        #[test]
        fn the_check_agrees_with_rmp_serde(
            value in probe(),
            named in any::<bool>(),
            damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = if named {
                rmp_serde::to_vec_named(&value).unwrap()
            } else {
                rmp_serde::to_vec(&value).unwrap()
            };
            if damage.is_empty() && !truncate {
                prop_assert_eq!(from_slice::<Probe>(&bytes).unwrap(), value);
            }
            for (at, byte) in &damage {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let checked = from_slice::<Probe>(&bytes);
            let (unchecked, read_all) = plain(&bytes);
            match (&checked, &unchecked) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Ok(a), Err(e)) => prop_assert!(false, "accepted {:?}, rmp-serde: {}", a, e),
                (Err(e), Ok(b)) => prop_assert!(!read_all, "refused {:?}: {}", b, e),
                (Err(_), Err(_)) => {}
            }
        }
    }
}
