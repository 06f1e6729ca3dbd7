//! The QuorumKV node library (being written).
pub mod certs;
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
