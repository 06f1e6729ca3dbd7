//! Cross-crate, simulation, multi-process and fault-injection tests for QuorumKV.
//!
//! The library half holds the machinery tests share: [`sim`], a deterministic in-process
//! simulation of a whole cluster. The tests themselves live in `tests/tests/`.

pub mod sim;
