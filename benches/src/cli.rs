//! The command line: one subcommand per mode, and the load options every mode shares.
//!
//! Every mode drives its target with the same closed-loop driver ([`crate::workload`]) and
//! prints the same report ([`crate::report`]), so the flags below mean the same thing
//! everywhere: `--concurrency` operations in flight, a measured window of `--duration` seconds
//! (or `--ops` operations) after `--warmup` seconds, `--value-bytes` per written value, keys
//! drawn from `--records` records by `--keys`. A run never asks for more than it was given:
//! without `--ops`, the window is 20 s by default.

use crate::keys::{KeyChooser, KeyDistribution, DEFAULT_ZIPFIAN_CONSTANT};
use crate::report::Report;
use crate::workload::Plan;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::io::IsTerminal as _;
use std::time::Duration;

/// Measured window when neither `--duration` nor `--ops` is given.
pub const DEFAULT_DURATION_SECS: f64 = 20.0;

/// quorumkv-bench: load generator for QuorumKV and the baselines it is compared with.
#[derive(Debug, Parser)]
#[command(name = "quorumkv-bench", version, about, long_about = None)]
pub struct Cli {
    /// Print the report as one JSON object on stdout (and no progress bar).
    #[arg(long, global = true)]
    pub json: bool,
    /// Never show a progress bar (it is shown only when stderr is a terminal anyway).
    #[arg(long, global = true)]
    pub no_progress: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drive a QuorumKV cluster (given, or started locally with --local N) with a workload.
    Run(crate::quorumkv::RunArgs),
    /// The network-only quorum ceiling: each request to N echo processes over QUIC with
    /// mutual TLS, done at W replies.
    Ceiling(crate::ceiling::CeilingArgs),
    /// Raw QUIC request/reply to one echo process.
    RawQuic(crate::raw_quic::RawQuicArgs),
    /// Raw sled inserts, optionally durable with group commit.
    RawSled(crate::raw_sled::RawSledArgs),
    /// Drive an etcd cluster with the same workloads (needs the `etcd` feature).
    Etcd(crate::etcd::EtcdArgs),
    /// Serve as an echo endpoint (started by `ceiling` and `raw-quic`; rarely run by hand).
    #[command(hide = true)]
    Echo(crate::echo::EchoArgs),
}

/// How results are shown, from the global flags.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub json: bool,
    pub progress: bool,
}

impl Output {
    /// JSON if asked; a progress bar only on a terminal and never with JSON.
    pub fn from_cli(cli: &Cli) -> Output {
        Output {
            json: cli.json,
            progress: !cli.json && !cli.no_progress && std::io::stderr().is_terminal(),
        }
    }
}

/// The load options every mode shares.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Operations in flight at once (closed-loop workers).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Length of the measured window in seconds [default: 20, or unbounded with --ops].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Stop after this many measured operations (bounded by --duration if also given).
    #[arg(long, value_name = "N")]
    pub ops: Option<u64>,
    /// Seconds of unrecorded operations before the measured window.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub warmup: f64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Records (distinct keys) the workload touches.
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// How keys are chosen.
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    pub keys: KeyDistribution,
    /// The Zipfian constant θ, in (0, 1), for --keys zipfian.
    #[arg(long, default_value_t = DEFAULT_ZIPFIAN_CONSTANT)]
    pub zipfian_constant: f64,
    /// Seed of the workers' random choices (worker i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl LoadArgs {
    /// The measured window: `--duration`, else unbounded with `--ops`, else the default.
    pub fn duration(&self) -> Option<Duration> {
        match (self.duration, self.ops) {
            (Some(secs), _) => Some(Duration::from_secs_f64(secs.max(0.0))),
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs_f64(DEFAULT_DURATION_SECS)),
        }
    }

    /// The driver's plan.
    pub fn plan(&self, output: &Output) -> Plan {
        Plan {
            concurrency: self.concurrency,
            warmup: Duration::from_secs_f64(self.warmup.max(0.0)),
            duration: self.duration(),
            ops: self.ops,
            seed: self.seed,
            progress: output.progress,
        }
    }

    /// The key chooser.
    pub fn key_chooser(&self) -> Result<KeyChooser> {
        KeyChooser::new(self.keys, self.records, self.zipfian_constant)
    }

    /// A value of `--value-bytes` bytes. The bytes vary so that no layer can compress them
    /// away.
    pub fn value(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(self.value_bytes);
        let mut counter = 0u64;
        while value.len() < self.value_bytes {
            let block = blake3::hash(&counter.to_le_bytes());
            let take = (self.value_bytes - value.len()).min(32);
            value.extend_from_slice(&block.as_bytes()[..take]);
            counter += 1;
        }
        value
    }

    /// Adds the load options to a report's configuration.
    pub fn describe(&self, report: Report) -> Report {
        let keys = match self.keys {
            KeyDistribution::Uniform => "uniform".to_string(),
            KeyDistribution::Zipfian => {
                format!("zipfian (scrambled, θ = {})", self.zipfian_constant)
            }
        };
        report
            .with("value_bytes", self.value_bytes)
            .with("concurrency", self.concurrency)
            .with("records", self.records)
            .with("keys", keys)
            .with("duration_secs", self.duration().map(|d| d.as_secs_f64()))
            .with("ops_limit", self.ops)
            .with("warmup_secs", self.warmup)
            .with("seed", self.seed)
    }
}
