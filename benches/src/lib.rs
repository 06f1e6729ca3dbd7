//! Load generation and microbenchmarks for QuorumKV.
//!
//! * **Microbenchmarks** (`benches/ring.rs`, `benches/merkle.rs`, run by criterion with
//!   `cargo bench`): one function at a time, in process.
//! * **The load generator** (being built): [`keys`] (uniform and scrambled Zipfian key
//!   choice), [`workload`] (the mixes and the closed-loop driver), [`report`] (HDR
//!   histograms, the table and the JSON object).

pub mod keys;
pub mod report;
pub mod workload;
