//! The one error type of the `quorumkv-client` crate.
//!
//! Errors fall into four families, and each classifier below answers one question about them:
//!
//! - **Framing** (`FrameTooLarge`, `UnsupportedVersion`, `MalformedFrame`, `Encode`,
//!   `UnexpectedResponse`): the bytes themselves are wrong. Sending them again fails the same way.
//! - **Refusals by a node** (`InvalidRequest`, `QuorumNotReached`, `Overloaded`, `Unavailable`,
//!   `Internal`): a node answered with an [`ErrorReply`](crate::protocol::ErrorReply).
//! - **Transport** (`NoNodeReachable`, `Timeout`, `AuthenticationRefused`): no usable answer
//!   came back at all.
//! - **Local setup** (`InvalidContextText`, `Tls`, `InvalidConfig`, `Io`): the caller's input or
//!   files are wrong; nothing was sent.
//!
//! [`Error::is_retryable`] says whether sending the same request again may succeed; the client
//! retries exactly those (with the same request id, so a retried write never adds a sibling).
//! [`Error::kind`] is a stable snake_case name for logs and the CLI's JSON output, and
//! [`exit_code`] is the CLI's process exit code. All three match every variant explicitly, so a
//! new variant cannot be added without deciding how it is classified.

use thiserror::Error;

/// Everything that can go wrong between a caller and a QuorumKV cluster.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame announced a length above the cap; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion { found: u8, supported: u8 },
    /// The frame's body is not a valid message.
    #[error("malformed frame: {reason}")]
    MalformedFrame { reason: String },
    /// A message could not be encoded (a bug, or a value the encoder cannot represent).
    #[error("could not encode message: {reason}")]
    Encode { reason: String },
    /// A context token's text form is not valid base64url.
    #[error("invalid context text: {reason}")]
    InvalidContextText { reason: String },

    /// The node refused the request itself (bad option such as `r = 0`, oversized key or value,
    /// a context for another key, unknown keyspace). Retrying it unchanged fails the same way.
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
    /// Fewer replicas acknowledged than the request required before the coordinator's timeout.
    ///
    /// **The write may have been applied on some replicas**: `acked` of them hold it, and it will
    /// spread from there (read repair, anti-entropy). Reading the key shows what happened.
    /// Writing again with the same request id is safe (a replica that already holds it does not
    /// add a sibling), but the client does not retry this error by default: the cluster just
    /// failed to gather `required` answers, and repeating the write at once doubles its load for
    /// little chance of a different outcome.
    #[error("quorum not reached: {acked} of {required} replicas answered ({durable_acked} of {durable_required} durable): {message}")]
    QuorumNotReached {
        required: u8,
        acked: u8,
        durable_required: u8,
        durable_acked: u8,
        message: String,
    },
    /// The node is at its in-flight limit. Retried with backoff.
    #[error("node overloaded: {message}")]
    Overloaded { message: String },
    /// The node could not reach the replicas (or the coordinator) of the key in time.
    #[error("unavailable: {message}")]
    Unavailable { message: String },
    /// The node hit an internal error (for example its disk failed).
    #[error("internal error on the node: {message}")]
    Internal { message: String },
    /// The node answered with a message that does not answer the request (a protocol bug).
    #[error("unexpected response: {reason}")]
    UnexpectedResponse { reason: String },

    /// Every node tried failed at the connection level (unreachable, handshake timed out,
    /// connection lost or silent mid-request). Each attempt is `(node, reason)`, where `node` is
    /// a node id or, for a seed, its address.
    #[error("no node reachable: {}", format_attempts(.attempts))]
    NoNodeReachable { attempts: Vec<(String, String)> },
    /// A node did not answer within the client's per-attempt bound: the request's `timeout_ms`,
    /// or the cluster's coordinator timeout, plus a margin (see [`crate::client`]), while its
    /// connection stayed alive.
    #[error("request timed out waiting for a node")]
    Timeout,
    /// A node refused the TLS handshake: our certificate is missing, expired or issued by
    /// another CA, or the node's certificate does not verify against our CA.
    #[error("authentication refused: {reason}")]
    AuthenticationRefused { reason: String },

    /// The TLS material (CA, certificate, key PEM files) could not be read or used.
    #[error("TLS configuration: {reason}")]
    Tls { reason: String },
    /// The client configuration is unusable (no seed addresses, an unparsable address).
    #[error("invalid configuration: {reason}")]
    InvalidConfig { reason: String },
    /// A local I/O operation failed (for example binding the client's UDP socket).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

fn format_attempts(attempts: &[(String, String)]) -> String {
    if attempts.is_empty() {
        return "no node to try".to_string();
    }
    attempts
        .iter()
        .map(|(node, reason)| format!("{node}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Whether sending the same request again (to the same or another node) may succeed.
    ///
    /// Framing errors describe the bytes themselves, and refusals of the request itself repeat.
    /// `QuorumNotReached` is not retryable by default: see its documentation. `Internal` is not
    /// either: a node whose disk failed keeps failing, and the caller should hear about it.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Overloaded { .. }
            | Error::Unavailable { .. }
            | Error::Timeout
            | Error::NoNodeReachable { .. } => true,
            Error::FrameTooLarge { .. }
            | Error::UnsupportedVersion { .. }
            | Error::MalformedFrame { .. }
            | Error::Encode { .. }
            | Error::InvalidContextText { .. }
            | Error::InvalidRequest { .. }
            | Error::QuorumNotReached { .. }
            | Error::Internal { .. }
            | Error::UnexpectedResponse { .. }
            | Error::AuthenticationRefused { .. }
            | Error::Tls { .. }
            | Error::InvalidConfig { .. }
            | Error::Io(_) => false,
        }
    }

    /// A stable snake_case name of the variant, for logs, metrics and the CLI's JSON errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::FrameTooLarge { .. } => "frame_too_large",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::MalformedFrame { .. } => "malformed_frame",
            Error::Encode { .. } => "encode",
            Error::InvalidContextText { .. } => "invalid_context_text",
            Error::InvalidRequest { .. } => "invalid_request",
            Error::QuorumNotReached { .. } => "quorum_not_reached",
            Error::Overloaded { .. } => "overloaded",
            Error::Unavailable { .. } => "unavailable",
            Error::Internal { .. } => "internal",
            Error::UnexpectedResponse { .. } => "unexpected_response",
            Error::NoNodeReachable { .. } => "no_node_reachable",
            Error::Timeout => "timeout",
            Error::AuthenticationRefused { .. } => "authentication_refused",
            Error::Tls { .. } => "tls",
            Error::InvalidConfig { .. } => "invalid_config",
            Error::Io(_) => "io",
        }
    }
}

/// The `quorumkv` CLI's exit code for an error.
///
/// | code | meaning |
/// |------|---------|
/// | 2 | usage or invalid input: `InvalidRequest`, `InvalidContextText`, `Tls`, `InvalidConfig` |
/// | 3 | `QuorumNotReached` (a write may still have been applied) |
/// | 4 | the cluster could not be reached: `NoNodeReachable`, `Unavailable`, `Timeout` |
/// | 5 | `AuthenticationRefused` |
/// | 6 | `Overloaded` |
/// | 1 | anything else |
///
/// Exit code 0 is success; clap also exits with 2 on unparsable arguments, which matches.
pub fn exit_code(error: &Error) -> i32 {
    match error {
        Error::InvalidRequest { .. }
        | Error::InvalidContextText { .. }
        | Error::Tls { .. }
        | Error::InvalidConfig { .. } => 2,
        Error::QuorumNotReached { .. } => 3,
        Error::NoNodeReachable { .. } | Error::Unavailable { .. } | Error::Timeout => 4,
        Error::AuthenticationRefused { .. } => 5,
        Error::Overloaded { .. } => 6,
        Error::FrameTooLarge { .. }
        | Error::UnsupportedVersion { .. }
        | Error::MalformedFrame { .. }
        | Error::Encode { .. }
        | Error::Internal { .. }
        | Error::UnexpectedResponse { .. }
        | Error::Io(_) => 1,
    }
}

/// Shorthand for results carrying [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> String {
        "m".to_string()
    }

    /// One value of every variant, so the tables below cover them all.
    fn every_variant() -> Vec<Error> {
        vec![
            Error::FrameTooLarge { len: 2, max: 1 },
            Error::UnsupportedVersion {
                found: 9,
                supported: 1,
            },
            Error::MalformedFrame { reason: message() },
            Error::Encode { reason: message() },
            Error::InvalidContextText { reason: message() },
            Error::InvalidRequest { message: message() },
            Error::QuorumNotReached {
                required: 2,
                acked: 1,
                durable_required: 1,
                durable_acked: 0,
                message: message(),
            },
            Error::Overloaded { message: message() },
            Error::Unavailable { message: message() },
            Error::Internal { message: message() },
            Error::UnexpectedResponse { reason: message() },
            Error::NoNodeReachable {
                attempts: vec![("n1".into(), "timed out".into())],
            },
            Error::Timeout,
            Error::AuthenticationRefused { reason: message() },
            Error::Tls { reason: message() },
            Error::InvalidConfig { reason: message() },
            Error::Io(std::io::Error::other("disk")),
        ]
    }

    #[test]
    fn exit_codes_follow_the_cli_contract() {
        let table: Vec<(&str, i32)> = every_variant()
            .iter()
            .map(|e| (e.kind(), exit_code(e)))
            .collect();
        assert_eq!(
            table,
            vec![
                ("frame_too_large", 1),
                ("unsupported_version", 1),
                ("malformed_frame", 1),
                ("encode", 1),
                ("invalid_context_text", 2),
                ("invalid_request", 2),
                ("quorum_not_reached", 3),
                ("overloaded", 6),
                ("unavailable", 4),
                ("internal", 1),
                ("unexpected_response", 1),
                ("no_node_reachable", 4),
                ("timeout", 4),
                ("authentication_refused", 5),
                ("tls", 2),
                ("invalid_config", 2),
                ("io", 1),
            ]
        );
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        let retryable: Vec<&str> = every_variant()
            .iter()
            .filter(|e| e.is_retryable())
            .map(Error::kind)
            .collect();
        assert_eq!(
            retryable,
            vec!["overloaded", "unavailable", "no_node_reachable", "timeout"]
        );
    }

    #[test]
    fn messages_name_the_shortfall_and_the_attempts() {
        let quorum = &every_variant()[6];
        assert_eq!(
            quorum.to_string(),
            "quorum not reached: 1 of 2 replicas answered (0 of 1 durable): m"
        );
        let none = Error::NoNodeReachable {
            attempts: vec![
                ("n1".into(), "refused".into()),
                ("10.0.0.1:7000".into(), "timed out".into()),
            ],
        };
        assert_eq!(
            none.to_string(),
            "no node reachable: n1: refused; 10.0.0.1:7000: timed out"
        );
    }
}
