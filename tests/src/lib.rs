//! Cross-crate, simulation, multi-process and fault-injection tests for QuorumKV.
//!
//! The library half holds the machinery tests share: [`sim`], a deterministic in-process
//! simulation of a whole cluster; [`cluster`], a harness that runs the real `quorumkv` binary as
//! several processes on loopback or, with [`netns`], each in a network namespace of its own;
//! and [`history`], a checker of what concurrent clients saw. The tests themselves live in
//! `tests/tests/`.

pub mod cluster;
pub mod history;
pub mod netns;
pub mod sim;
