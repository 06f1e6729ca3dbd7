//! Members of the ring: who they are, where they stand and how much they carry.
//!
//! A [`Node`] is an id, a zone and a capacity weight. The ring sorts members by id, so the id is
//! also what makes placement canonical: two processes given the same members in any order build
//! byte-identical rings.
//!
//! # Names
//!
//! Node ids and zone names end up in TLS certificate subject alternative names and in DNS names,
//! so both are restricted to what a DNS label allows, in one spelling only:
//!
//! - 1 to 63 characters (63 is the DNS label limit; a 64th character would not fit a label);
//! - lowercase ASCII letters, digits and `-` only. Uppercase is rejected rather than folded,
//!   because DNS compares names case-insensitively: `Node-1` and `node-1` would be two members to
//!   the ring and one name to a certificate check. `_` is rejected because hostnames forbid it;
//! - no leading or trailing `-` (RFC 1123 hostname labels).
//!
//! Validation happens in the constructors and again when a node is deserialized, so an invalid
//! name cannot enter a ring from the network either.
//!
//! # Capacity
//!
//! `capacity` is a relative weight (an integer, at least 1): a node of capacity 2 should carry
//! twice the replicas of a node of capacity 1, as far as the zone rule and the one-replica-per-range
//! limit allow (see the crate documentation).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest node id or zone name: one DNS label.
pub const NAME_LEN_MAX: usize = 63;

/// Checks `value` against the naming rule in the module documentation.
fn validate_name(kind: &'static str, value: &str) -> Result<()> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > NAME_LEN_MAX {
        Some("must be at most 63 characters (one DNS label)")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("may contain only lowercase letters a-z, digits 0-9 and '-'")
    } else if value.starts_with('-') || value.ends_with('-') {
        Some("must not start or end with '-'")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            kind,
            // Keep the error message bounded even for a hostile, megabyte-long name.
            value: value.chars().take(80).collect(),
            reason,
        }),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` (see the module documentation for the rule).
            pub fn new(value: impl Into<String>) -> Result<Self> {
                let value = value.into();
                validate_name($kind, &value)?;
                Ok(Self(value))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(value: String) -> Result<Self> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(value: &str) -> Result<Self> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A node's identity: a DNS-label-safe name, unique in the cluster.
    NodeId,
    "node id"
);

name_type!(
    /// A failure domain (rack, availability zone): replicas of a range avoid sharing one.
    Zone,
    "zone"
);

/// One member of the ring.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub zone: Zone,
    /// Relative weight, at least 1. Checked by [`Node::new`] and by every ring constructor.
    pub capacity: u32,
}

impl Node {
    /// A node, with its capacity checked.
    pub fn new(id: NodeId, zone: Zone, capacity: u32) -> Result<Node> {
        let node = Node { id, zone, capacity };
        node.validate()?;
        Ok(node)
    }

    /// Rejects a zero capacity (fields are public, so rings check again on entry).
    pub fn validate(&self) -> Result<()> {
        if self.capacity == 0 {
            return Err(Error::ZeroCapacity {
                id: self.id.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_label_names() {
        for ok in ["a", "n01", "node-7", "z1", "0", &"a".repeat(63)] {
            assert!(NodeId::new(ok).is_ok(), "{ok}");
            assert!(Zone::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else_with_a_message_naming_the_value() {
        for bad in [
            "",
            "Node1",
            "n_1",
            "-n",
            "n-",
            "n.1",
            "n 1",
            "é",
            &"a".repeat(64),
        ] {
            let err = NodeId::new(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidName {
                        kind: "node id",
                        ..
                    }
                ),
                "{bad}"
            );
            assert!(err
                .to_string()
                .contains(&format!("{:?}", bad.chars().take(80).collect::<String>())));
            assert!(Zone::new(bad).is_err());
        }
    }

    #[test]
    fn deserialization_validates() {
        let ok: NodeId = serde_json::from_str("\"n1\"").unwrap();
        assert_eq!(ok.as_str(), "n1");
        assert!(serde_json::from_str::<NodeId>("\"N1\"").is_err());
        assert!(serde_json::from_str::<Zone>("\"\"").is_err());
    }

    #[test]
    fn capacity_must_be_positive() {
        let id = NodeId::new("a").unwrap();
        let zone = Zone::new("z").unwrap();
        assert!(Node::new(id.clone(), zone.clone(), 1).is_ok());
        assert_eq!(
            Node::new(id.clone(), zone, 0).unwrap_err(),
            Error::ZeroCapacity { id }
        );
    }
}
