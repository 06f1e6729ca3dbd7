//! `quorumkv-bench raw-quic`: one QUIC request/reply per operation between this process and
//! one echo endpoint: the floor under every QuorumKV request.
//!
//! Each operation opens a bidirectional stream on one shared, mutually authenticated
//! connection, writes one request frame (a 16-byte key and a `--value-bytes` value), reads one
//! small reply frame, exactly as the client crate does with a node (see [`crate::echo`]).
//! Compared with [`crate::ceiling`], there is no fan-out: one endpoint, one reply. The
//! difference between the two is the cost of waiting for the second-fastest of three replies
//! instead of one; the difference between this and `run` is everything a node does.

use crate::cli::{LoadArgs, Output};
use crate::echo::{self, Pki};
use crate::report::Report;
use crate::workload::{self, Mix, OpKind, Target};
use anyhow::Result;
use quorumkv_node::config::Limits;
use std::sync::Arc;

/// Arguments of `quorumkv-bench raw-quic`.
#[derive(Clone, Debug, clap::Args)]
pub struct RawQuicArgs {
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Requests to one echo endpoint over one connection.
#[derive(Debug)]
struct RawQuic {
    connection: quinn::Connection,
    value: Vec<u8>,
    max_frame_bytes: u32,
}

impl Target for RawQuic {
    async fn execute(&self, _kind: OpKind, key: u64) -> Result<(), &'static str> {
        let frame = echo::request_frame(key, &self.value)?;
        echo::exchange(&self.connection, &frame, self.max_frame_bytes).await
    }
}

/// Runs the mode and returns its report.
pub async fn run(args: RawQuicArgs, output: &Output) -> Result<Report> {
    let load = &args.load;
    let pki = Pki::new(1)?;
    let process = pki.spawn_echo(&echo::own_executable()?, 1)?;
    let endpoint = echo::client_endpoint()?;
    let connection = process.connect(&endpoint, pki.client_config()?).await?;
    let target = Arc::new(RawQuic {
        connection: connection.clone(),
        value: load.value(),
        max_frame_bytes: Limits::default().frame_bytes_max,
    });
    let keys = load.key_chooser()?;
    let measurement =
        workload::drive(target, &Mix::only(OpKind::Write), &keys, &load.plan(output)).await?;
    connection.close(0u32.into(), b"done");
    let report = Report::new("raw-quic", measurement)
        .with("target", format!("1 echo process at {}", process.address()))
        .with("request", "1 stream per op, 1 reply")
        .with("tls", "TLS 1.3 mutual (node certificates, client ALPN)");
    Ok(load.describe(report))
}
