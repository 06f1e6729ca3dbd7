//! `quorumkv-bench ceiling`: the network-only quorum ceiling.
//!
//! A QuorumKV write with N = 3 and W = 2 is, seen from the network, one message to each of
//! three replicas and a wait for the second answer. This mode does exactly that and nothing
//! else: each operation sends one request frame (a key and a `--value-bytes` value) on a new
//! stream to each of `--replicas` echo endpoints (separate processes, see [`crate::echo`]) and
//! completes when `--quorum` replies arrived. Stragglers finish in the background, as a
//! coordinator's do. No storage, no state machine, no fsync: whatever QuorumKV measures, it
//! cannot beat this on the same machine, and the gap says how much the node itself costs.
//!
//! The shape is the client-side one (the client fans out), which is a little kinder than a
//! real request (client → coordinator → replicas is two hops, and the coordinator's own copy
//! is local); the ceiling is an upper bound on purpose.
//!
//! An operation fails with `quorum_not_reached` when so many replies failed that the quorum
//! became impossible; the individual failures are not counted separately.

use crate::cli::{LoadArgs, Output};
use crate::echo::{self, EchoProcess, Pki};
use crate::report::Report;
use crate::workload::{self, Mix, OpKind, Target};
use anyhow::{bail, Result};
use quorumkv_node::config::Limits;
use std::sync::Arc;

/// Arguments of `quorumkv-bench ceiling`.
#[derive(Clone, Debug, clap::Args)]
pub struct CeilingArgs {
    /// Echo endpoints each request goes to (N).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Replies that complete a request (W).
    #[arg(long, default_value_t = 2)]
    pub quorum: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Fans each request out to every connection and waits for `quorum` replies.
#[derive(Debug)]
struct Ceiling {
    connections: Vec<quinn::Connection>,
    quorum: usize,
    value: Vec<u8>,
    max_frame_bytes: u32,
}

impl Target for Ceiling {
    async fn execute(&self, _kind: OpKind, key: u64) -> Result<(), &'static str> {
        let frame = Arc::new(echo::request_frame(key, &self.value)?);
        let (replies, mut received) = tokio::sync::mpsc::channel(self.connections.len());
        for connection in &self.connections {
            let (connection, frame, replies) = (connection.clone(), frame.clone(), replies.clone());
            let max = self.max_frame_bytes;
            tokio::spawn(async move {
                let outcome = echo::exchange(&connection, &frame, max).await;
                // The request may be decided already; a late reply has nowhere to go.
                let _ = replies.send(outcome).await;
            });
        }
        drop(replies);
        let (mut acked, mut failed) = (0usize, 0usize);
        while let Some(outcome) = received.recv().await {
            match outcome {
                Ok(()) => acked += 1,
                Err(_) => failed += 1,
            }
            if acked >= self.quorum {
                return Ok(());
            }
            if self.connections.len() - failed < self.quorum {
                break;
            }
        }
        Err("quorum_not_reached")
    }
}

/// Runs the mode and returns its report.
pub async fn run(args: CeilingArgs, output: &Output) -> Result<Report> {
    if args.replicas == 0 || args.quorum == 0 || args.quorum > args.replicas {
        bail!(
            "need 1 <= --quorum <= --replicas (got quorum {} of {})",
            args.quorum,
            args.replicas
        );
    }
    let load = &args.load;
    let pki = Pki::new(args.replicas)?;
    let exe = echo::own_executable()?;
    let processes: Vec<EchoProcess> = (1..=args.replicas)
        .map(|index| pki.spawn_echo(&exe, index))
        .collect::<Result<_>>()?;
    let endpoint = echo::client_endpoint()?;
    let config = pki.client_config()?;
    let mut connections = Vec::new();
    for process in &processes {
        connections.push(process.connect(&endpoint, config.clone()).await?);
    }
    let target = Arc::new(Ceiling {
        connections: connections.clone(),
        quorum: args.quorum,
        value: load.value(),
        max_frame_bytes: Limits::default().frame_bytes_max,
    });
    let keys = load.key_chooser()?;
    let measurement =
        workload::drive(target, &Mix::only(OpKind::Write), &keys, &load.plan(output)).await?;
    for connection in &connections {
        connection.close(0u32.into(), b"done");
    }
    let report = Report::new("ceiling", measurement)
        .with(
            "target",
            format!("{} echo processes on loopback", processes.len()),
        )
        .with("replicas", args.replicas)
        .with("quorum", args.quorum)
        .with(
            "request",
            format!(
                "1 stream to each of {} endpoints, done at {} replies",
                args.replicas, args.quorum
            ),
        )
        .with("tls", "TLS 1.3 mutual (node certificates, client ALPN)");
    Ok(load.describe(report))
}
