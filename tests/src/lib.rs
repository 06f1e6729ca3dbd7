//! Cross-crate, simulation, multi-process and fault-injection tests for QuorumKV.
//!
//! The library half holds the machinery tests share: [`sim`], a deterministic in-process
//! simulation of a whole cluster, and [`cluster`], a harness that runs the real `quorumkv`
//! binary as several processes on loopback. The tests themselves live in `tests/tests/`.

pub mod cluster;
pub mod history;
pub mod sim;
