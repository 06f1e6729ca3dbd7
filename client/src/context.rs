//! The causal context a client carries between a read and the write that follows it.
//!
//! To the client a context is opaque bytes: the node encodes in it the version vector of what
//! the read saw (with a format version, a binding to the keyspace and key, and a checksum) and
//! checks all of that when the context comes back. A client only stores it, passes it to the
//! next `put` or `delete` of the same key, and may print it. The text form, used by the CLI and
//! in JSON, is base64url without padding.

use crate::error::{Error, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An opaque causal context token, as issued by a node for one key.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Context(#[serde(with = "serde_bytes")] Vec<u8>);

impl Context {
    /// Wraps token bytes received from a node.
    pub fn from_bytes(bytes: Vec<u8>) -> Context {
        Context(bytes)
    }

    /// The token bytes, to send back to a node unchanged.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether the token is empty (a context that has seen nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Context {
    /// The base64url text form, without padding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(&self.0))
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({self})")
    }
}

impl FromStr for Context {
    type Err = Error;

    /// Parses the base64url text form. Only the alphabet is checked here; whether the bytes are
    /// a valid context for a key is for the node to say.
    fn from_str(text: &str) -> Result<Context> {
        URL_SAFE_NO_PAD
            .decode(text.trim())
            .map(Context)
            .map_err(|e| Error::InvalidContextText {
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_form_is_unpadded_base64url() {
        let context = Context::from_bytes(vec![0xfb, 0xff, 0x01]);
        assert_eq!(context.to_string(), "-_8B");
        assert_eq!("-_8B".parse::<Context>().unwrap(), context);
    }

    #[test]
    fn bad_text_is_an_error() {
        assert!(matches!(
            "not base64!".parse::<Context>(),
            Err(Error::InvalidContextText { .. })
        ));
        // Standard-alphabet characters are not base64url.
        assert!("ab+/".parse::<Context>().is_err());
    }

    proptest! {
        #[test]
        fn text_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let context = Context::from_bytes(bytes);
            prop_assert_eq!(context.to_string().parse::<Context>().unwrap(), context);
        }
    }
}
