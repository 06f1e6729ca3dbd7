//! Load generation and microbenchmarks for QuorumKV.
//!
//! Two kinds of benchmark live in this package:
//!
//! * **Microbenchmarks** (`benches/ring.rs`, `benches/merkle.rs`, run by criterion with
//!   `cargo bench`): one function at a time, in process.
//! * **The load generator**, the `quorumkv-bench` binary: whole systems under a workload, with
//!   the baselines that say what the figures mean. Its modes share one driver and one report:
//!
//! | mode | what it measures | module |
//! | --- | --- | --- |
//! | `run` | a QuorumKV cluster through the client crate (YCSB A/B/C, write-only) | [`quorumkv`], [`local_cluster`] |
//! | `ceiling` | the network-only quorum ceiling: QUIC + TLS fan-out to N echo processes, done at W replies | [`ceiling`], [`echo`] |
//! | `raw-quic` | one QUIC request/reply to one echo process | [`raw_quic`], [`echo`] |
//! | `raw-sled` | sled inserts, optionally durable with group commit | [`raw_sled`] |
//! | `etcd` | an etcd cluster under the same workloads (feature `etcd`) | [`etcd`] |
//!
//! The pieces every mode shares: [`cli`] (flags), [`keys`] (uniform and scrambled Zipfian key
//! choice), [`workload`] (the mixes and the closed-loop driver), [`report`] (HDR histograms,
//! the table and the JSON object). `benches/compare.sh` runs every mode and prints one table;
//! `benches/etcd.sh` sets up etcd. Measured figures go to `BENCHMARKS.md` with their commands.
//!
//! A mode that starts processes (a local cluster, echo endpoints) owns them through a guard
//! that stops them on drop, so an error, a panic or Ctrl-C never leaves them running.

pub mod ceiling;
pub mod cli;
pub mod echo;
pub mod etcd;
pub mod keys;
pub mod local_cluster;
pub mod quorumkv;
pub mod raw_quic;
pub mod raw_sled;
pub mod report;
pub mod workload;

use anyhow::Result;
use cli::{Cli, Command, Output};

/// Runs one command line; the report is printed on stdout. Returns when the run finished.
pub async fn main_with(cli: Cli) -> Result<()> {
    let output = Output::from_cli(&cli);
    let report = match cli.command {
        Command::Echo(args) => return echo::serve(args).await,
        Command::Run(args) => quorumkv::run(args, &output).await?,
        Command::Ceiling(args) => ceiling::run(args, &output).await?,
        Command::RawQuic(args) => raw_quic::run(args, &output).await?,
        Command::RawSled(args) => raw_sled::run(args, &output).await?,
        Command::Etcd(args) => etcd::run(args, &output).await?,
    };
    if output.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
