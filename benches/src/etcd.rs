//! `quorumkv-bench etcd`: the same workloads against an etcd cluster, for comparison.
//!
//! etcd is the obvious neighbour: a replicated key-value store on the same kind of machine,
//! but with a leader (Raft) instead of quorums per request. Operations map as closely as the
//! two models allow:
//!
//! | operation | QuorumKV | etcd |
//! | --- | --- | --- |
//! | read | GET at R | `Range` (linearizable: confirmed by the leader, the default) |
//! | update | GET, then PUT with the context | `Range`, then `Put` (two requests, no transaction) |
//! | write | PUT | `Put` |
//! | insert (load) | PUT without context | `Put` |
//!
//! Every etcd write is durable (fsynced on a majority) before it is acknowledged, which is
//! QuorumKV's `dw >= 1` with W = majority. Keys and values are the same bytes as in `run`.
//!
//! The client is the `etcd-client` crate (gRPC), built only with the cargo feature `etcd`:
//! it compiles etcd's protobuf files at build time and so needs `protoc` and its well-known
//! types (Debian: `protobuf-compiler`, `libprotobuf-dev`), which the default build and CI do
//! not have. `benches/etcd.sh` installs them and etcd, starts a three-member cluster on
//! loopback and builds with `--features etcd`. Errors count as `etcd_<kind>`
//! (`etcd_grpc_unavailable`, ...).

use crate::cli::{LoadArgs, Output};
use crate::report::Report;
use crate::workload::Workload;
use anyhow::Result;

/// Arguments of `quorumkv-bench etcd`.
#[derive(Clone, Debug, clap::Args)]
pub struct EtcdArgs {
    /// etcd client endpoints, `host:port,...`.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// The operation mix.
    #[arg(long, value_enum, default_value_t = Workload::A)]
    pub workload: Workload,
    /// First write every record once, concurrently and unmeasured.
    #[arg(long)]
    pub load: bool,
    /// Writers in flight during --load (independent of --concurrency, so that a
    /// concurrency-1 measurement does not load its records one at a time).
    #[arg(long, default_value_t = 64)]
    pub load_concurrency: usize,
    /// Updates write without reading first.
    #[arg(long)]
    pub blind: bool,
    #[command(flatten)]
    pub load_args: LoadArgs,
}

/// Runs the mode and returns its report.
#[cfg(not(feature = "etcd"))]
pub async fn run(args: EtcdArgs, output: &Output) -> Result<Report> {
    let _ = (args, output);
    anyhow::bail!(
        "this quorumkv-bench was built without the `etcd` feature; build with \
         `cargo build --release -p quorumkv-bench --features etcd` (needs protoc) or run \
         benches/etcd.sh"
    )
}

#[cfg(feature = "etcd")]
pub use with_client::run;

#[cfg(feature = "etcd")]
mod with_client {
    use super::*;
    use crate::keys::key_name;
    use crate::workload::{self, OpKind, Target};
    use anyhow::Context as _;
    use std::sync::Arc;

    /// Requests through one shared gRPC channel (as `run` shares one client).
    struct Etcd {
        client: etcd_client::Client,
        value: Vec<u8>,
        blind: bool,
    }

    impl std::fmt::Debug for Etcd {
        /// `etcd_client::Client` has no `Debug`.
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Etcd")
                .field("value_bytes", &self.value.len())
                .field("blind", &self.blind)
                .finish_non_exhaustive()
        }
    }

    fn kind(error: etcd_client::Error) -> &'static str {
        match error {
            // gRPC status codes are numbered by the gRPC specification; etcd-client does not
            // re-export tonic's `Code` enum, so match the numbers.
            etcd_client::Error::GRpcStatus(status) => match status.code() as i32 {
                14 => "etcd_grpc_unavailable",
                4 => "etcd_grpc_deadline_exceeded",
                8 => "etcd_grpc_resource_exhausted",
                _ => "etcd_grpc_other",
            },
            etcd_client::Error::TransportError(_) => "etcd_transport",
            _ => "etcd_other",
        }
    }

    impl Etcd {
        async fn put(&self, key: u64) -> Result<(), &'static str> {
            let mut kv = self.client.kv_client();
            kv.put(key_name(key), self.value.clone(), None)
                .await
                .map_err(kind)?;
            Ok(())
        }

        async fn get(&self, key: u64) -> Result<(), &'static str> {
            let mut kv = self.client.kv_client();
            kv.get(key_name(key), None).await.map_err(kind)?;
            Ok(())
        }
    }

    impl Target for Etcd {
        async fn execute(&self, op: OpKind, key: u64) -> Result<(), &'static str> {
            match op {
                OpKind::Read => self.get(key).await,
                OpKind::Update if !self.blind => {
                    self.get(key).await?;
                    self.put(key).await
                }
                OpKind::Update | OpKind::Write | OpKind::Insert => self.put(key).await,
            }
        }
    }

    /// Runs the mode and returns its report.
    pub async fn run(args: EtcdArgs, output: &Output) -> Result<Report> {
        let load = &args.load_args;
        let client = etcd_client::Client::connect(&args.endpoints, None)
            .await
            .with_context(|| format!("connecting to etcd at {}", args.endpoints.join(",")))?;
        let target = Arc::new(Etcd {
            client,
            value: load.value(),
            blind: args.blind,
        });
        let mut loaded = serde_json::Value::Null;
        if args.load {
            if !output.json {
                eprintln!("loading {} records...", load.records);
            }
            let summary = workload::load(
                target.clone(),
                load.records,
                args.load_concurrency,
                output.progress,
            )
            .await?;
            loaded = serde_json::to_value(summary)?;
        }
        let keys = load.key_chooser()?;
        let measurement =
            workload::drive(target, &args.workload.mix(), &keys, &load.plan(output)).await?;
        let update = match (args.workload, args.blind) {
            (Workload::A | Workload::B, false) => "get + put, timed as one op",
            (Workload::A | Workload::B, true) => "blind: one put",
            _ => "none in this workload",
        };
        let report = Report::new("etcd", measurement)
            .with("target", format!("etcd at {}", args.endpoints.join(",")))
            .with("workload", args.workload.name())
            .with("reads", "linearizable")
            .with("writes", "Raft majority, fsynced")
            .with("update", update)
            .with("load_phase", loaded);
        Ok(load.describe(report))
    }
}
