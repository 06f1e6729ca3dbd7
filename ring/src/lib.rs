//! Placement for QuorumKV (being written).
pub mod token;
pub use token::Token;
