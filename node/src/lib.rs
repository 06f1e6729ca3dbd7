//! The QuorumKV node library (being written).
pub mod error;
pub mod merkle;
pub mod version_vector;

pub use error::{Error, Result};
