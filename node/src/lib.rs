//! The QuorumKV node: replication cores, storage, transport, and the `quorumkv` binary.
//!
//! The crate is split the way the replication logic must be tested: by what touches the world.
//!
//! * **Pure cores**, no I/O, no clock, no tokio: [`version_vector`] (dotted version vectors,
//!   siblings, client contexts, incarnations), [`merkle`] (anti-entropy trees), [`quorum`]
//!   (counting answers), and [`core`] (the node state machine: `handle(now, input) -> outputs`,
//!   coordinating puts and gets, forwarding, the failure detector). The simulation in
//!   `quorumkv-tests` drives them with a virtual clock and a seeded network.
//! * **Seams** with two implementations each: [`storage`] (`Storage`: sled and in-memory, one
//!   merge path) and [`transport`] (`Transport`: QUIC and in-memory).
//! * **The shell**: [`server`] (the core task, group commit, the QUIC listener, admin HTTP),
//!   [`tls`] and [`certs`] (mutual TLS against a cluster CA), [`config`] (one configuration
//!   struct), [`metrics`] (every metric name), [`dev`] (a local cluster), [`cli_client`] (the
//!   `put`/`get`/`delete` commands), [`cli_admin`] (the `admin` commands).
//!
//! `ARCHITECTURE.md` at the repository root walks a PUT and a GET through these modules.
pub mod certs;
pub mod cli_admin;
pub mod cli_client;
pub mod config;
pub mod core;
pub mod dev;
pub mod error;
pub mod merkle;
pub mod metrics;
pub mod peer;
pub mod quorum;
pub mod server;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod version_vector;

pub use error::{Error, Result};
