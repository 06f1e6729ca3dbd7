//! The QuorumKV client crate, and the home of its public wire protocol.
//!
//! Everything a program needs to talk to a QuorumKV cluster lives here, in two layers:
//!
//! - **The protocol** ([`frame`], [`protocol`], [`context`], [`msgpack`]): the bytes on the
//!   wire and the messages they carry. These modules depend on no runtime and no socket library, so the
//!   node, the client and the test tools share one definition of the protocol.
//! - **The client** ([`Client`], built by [`ClientBuilder`]): QUIC connections with mutual TLS
//!   ([`tls`]), routing to a key's replicas, failover that keeps a dead node from stalling
//!   requests (racing dials, hedged reads, nodes remembered as down; see [`client`]),
//!   per-attempt timeouts that follow the request's and the cluster's, retries with backoff,
//!   and sibling resolution ([`Client::resolve`]). [`render`] holds the CLI's output formats.
//!
//! ```no_run
//! # async fn example() -> quorumkv_client::Result<()> {
//! use quorumkv_client::{ClientBuilder, ReadOptions, WriteOptions, DEFAULT_KEYSPACE};
//!
//! let client = ClientBuilder::new()
//!     .seed("10.0.0.1:7000")
//!     .identity_files("ca.pem", "client.pem", "client.key")
//!     .build()
//!     .await?;
//! let context = client
//!     .put(DEFAULT_KEYSPACE, b"greeting", b"hello".to_vec(), None, WriteOptions::default())
//!     .await?;
//! let read = client.get(DEFAULT_KEYSPACE, b"greeting", ReadOptions::default()).await?;
//! // Siblings appear only after concurrent writes; merge them and write back.
//! let merged = client
//!     .resolve(DEFAULT_KEYSPACE, b"greeting", ReadOptions::default(), WriteOptions::default(),
//!         |siblings| siblings.iter().map(|s| s.value.clone()).max().unwrap_or_default())
//!     .await?;
//! # let _ = (context, read, merged);
//! # Ok(()) }
//! ```
//!
//! Errors are one enum, [`Error`], with [`Error::is_retryable`] and the CLI's [`exit_code`].

mod attempts;
pub mod client;
mod connection;
pub mod context;
pub mod error;
mod failover;
pub mod frame;
pub mod frame_io;
mod health;
pub mod msgpack;
pub mod protocol;
pub mod render;
mod route;
pub mod tls;

pub use client::{Client, ClientBuilder, ClientStats, GetResult, Hedge};
pub use context::Context;
pub use error::{exit_code, Error, Result};
pub use health::NodeStats;
pub use protocol::{
    ReadOptions, ReadRepair, ReplicaAnswer, ReplicaCopy, ReplicaRole, RequestId, SiblingValue,
    StoredCopy, WriteOptions, DEFAULT_KEYSPACE,
};
pub use tls::TlsIdentity;
