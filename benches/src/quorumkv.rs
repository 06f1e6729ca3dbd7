//! `quorumkv-bench run`: drive a QuorumKV cluster through the Rust client crate.
//!
//! The target is a running cluster (`--nodes`, `--ca`, `--cert`, `--key`, or the
//! `QUORUMKV_*` variables that `quorumkv dev` writes to `cluster.env`) or a local cluster of
//! `--local N` nodes started for the run and stopped after it ([`crate::local_cluster`]).
//!
//! Every worker shares one [`quorumkv_client::Client`] (one QUIC connection per node, as an
//! application would have) and issues requests with the run's quorum options: `--r` for
//! reads; `--w`, `--dw` for writes; `--timeout-ms` for both. Unset options take the
//! cluster's defaults (a majority of N, dw = 1).
//!
//! # Operations
//!
//! * `read`: `Client::get`.
//! * `update` (default): `Client::get`, then `Client::put` of a new value with the read's
//!   context, timed as one operation. Writing with the context is what a real application
//!   does, and it matters here: a blind write to a hot key becomes a sibling of every value
//!   stored there, so reads would slow down as siblings pile up. With `--blind`, an update
//!   is a `write`.
//! * `write`: `Client::put` with the context this client got back from its own last write of
//!   the key (kept in a striped in-memory map), or none for a key it never wrote. A single
//!   writer therefore replaces its own value; concurrent writers to one key can still leave
//!   siblings, which a later update's read-and-write resolves.
//! * `insert` (the `--load` phase, not measured): `Client::put` without a context; its
//!   context is remembered like a write's.
//!
//! Errors count by `quorumkv_client::Error::kind()`; the client's own retries (of
//! `overloaded`, `unavailable`, `timeout`) happen inside one operation and add to its latency.

use crate::cli::{LoadArgs, Output};
use crate::local_cluster::{LocalCluster, LocalOptions};
use crate::report::Report;
use crate::workload::{self, OpKind, Target, Workload};
use anyhow::{bail, Context as _, Result};
use quorumkv_client::{
    Client, ClientBuilder, Context, ReadOptions, WriteOptions, DEFAULT_KEYSPACE,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Arguments of `quorumkv-bench run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Cluster nodes, `host:port,...` (any subset works as seeds).
    #[arg(long, env = "QUORUMKV_NODES", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "QUORUMKV_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "QUORUMKV_CERT")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "QUORUMKV_KEY")]
    pub key: Option<PathBuf>,
    /// Start a local cluster of N nodes for this run instead (ignores --nodes and the TLS
    /// files; stopped and removed afterwards).
    #[arg(long, value_name = "N")]
    pub local: Option<usize>,
    /// The quorumkv binary for --local [default: next to this executable].
    #[arg(long, value_name = "PATH")]
    pub quorumkv_bin: Option<PathBuf>,
    /// Directory for the --local cluster [default: a temporary directory, removed
    /// afterwards]. It should be on the disk you want to measure.
    #[arg(long, value_name = "DIR")]
    pub local_dir: Option<PathBuf>,
    /// Ranges on the --local cluster's ring (Q).
    #[arg(long, default_value_t = 256)]
    pub local_ranges: u32,
    /// RUST_LOG for the --local nodes.
    #[arg(long, default_value = "warn")]
    pub node_log: String,
    /// The operation mix.
    #[arg(long, value_enum, default_value_t = Workload::A)]
    pub workload: Workload,
    /// Replicas that must answer a read [default: the cluster's, a majority of N].
    #[arg(long)]
    pub r: Option<u8>,
    /// Replicas that must acknowledge a write [default: the cluster's, a majority of N].
    #[arg(long)]
    pub w: Option<u8>,
    /// Of those, how many must have flushed it to disk [default: the cluster's, 1].
    #[arg(long)]
    pub dw: Option<u8>,
    /// Coordinator timeout per request in milliseconds [default: the cluster's].
    #[arg(long)]
    pub timeout_ms: Option<u32>,
    /// The keyspace to use.
    #[arg(long, default_value = DEFAULT_KEYSPACE)]
    pub keyspace: String,
    /// First write every record once, concurrently and unmeasured (needed for reads to find
    /// data).
    #[arg(long)]
    pub load: bool,
    /// Writers in flight during --load (independent of --concurrency, so that a
    /// concurrency-1 measurement does not load its records one at a time).
    #[arg(long, default_value_t = 64)]
    pub load_concurrency: usize,
    /// Updates write without reading first (a `write`, see the docs).
    #[arg(long)]
    pub blind: bool,
    #[command(flatten)]
    pub load_args: LoadArgs,
}

/// Contexts of this client's last write per record, striped to keep lock waits short.
#[derive(Debug)]
struct ContextCache {
    stripes: Vec<Mutex<HashMap<u64, Context>>>,
}

impl ContextCache {
    const STRIPES: usize = 64;

    fn new() -> ContextCache {
        ContextCache {
            stripes: (0..Self::STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe(&self, key: u64) -> &Mutex<HashMap<u64, Context>> {
        &self.stripes[(key % Self::STRIPES as u64) as usize]
    }

    fn get(&self, key: u64) -> Option<Context> {
        let stripe = self.stripe(key).lock().ok()?;
        stripe.get(&key).cloned()
    }

    fn put(&self, key: u64, context: Context) {
        if let Ok(mut stripe) = self.stripe(key).lock() {
            stripe.insert(key, context);
        }
    }
}

/// Requests through the client crate.
#[derive(Debug)]
struct QuorumKv {
    client: Client,
    keyspace: String,
    read: ReadOptions,
    write: WriteOptions,
    value: Vec<u8>,
    blind: bool,
    contexts: ContextCache,
}

impl QuorumKv {
    async fn put(&self, key: u64, context: Option<&Context>) -> Result<(), &'static str> {
        let name = crate::keys::key_name(key);
        let written = self
            .client
            .put(
                &self.keyspace,
                &name,
                self.value.clone(),
                context,
                self.write,
            )
            .await
            .map_err(|e| e.kind())?;
        self.contexts.put(key, written);
        Ok(())
    }
}

impl Target for QuorumKv {
    async fn execute(&self, kind: OpKind, key: u64) -> Result<(), &'static str> {
        match kind {
            OpKind::Read => {
                let name = crate::keys::key_name(key);
                self.client
                    .get(&self.keyspace, &name, self.read)
                    .await
                    .map_err(|e| e.kind())?;
                Ok(())
            }
            OpKind::Update if !self.blind => {
                let name = crate::keys::key_name(key);
                let read = self
                    .client
                    .get(&self.keyspace, &name, self.read)
                    .await
                    .map_err(|e| e.kind())?;
                self.put(key, Some(&read.context)).await
            }
            OpKind::Update | OpKind::Write => self.put(key, self.contexts.get(key).as_ref()).await,
            OpKind::Insert => self.put(key, None).await,
        }
    }
}

/// Runs the mode and returns its report.
pub async fn run(args: RunArgs, output: &Output) -> Result<Report> {
    let load = &args.load_args;
    // Declared first so it is dropped last: the nodes outlive the client.
    let mut local = None;
    let (builder, target_text, n) = match args.local {
        Some(nodes) => {
            if nodes == 0 {
                bail!("--local needs at least one node");
            }
            if !output.json {
                eprintln!("starting a local cluster of {nodes} nodes...");
            }
            let cluster = LocalCluster::start(&LocalOptions {
                nodes,
                binary: args.quorumkv_bin.clone(),
                dir: args.local_dir.clone(),
                ranges: args.local_ranges,
                node_log: args.node_log.clone(),
            })
            .await?;
            let builder = cluster.client_builder();
            let n = cluster.n();
            let text = format!(
                "local cluster of {nodes} nodes (quorumkv processes on loopback, data in {})",
                cluster.layout.dir.display()
            );
            local = Some(cluster);
            (builder, text, n)
        }
        None => {
            let (Some(ca), Some(cert), Some(key)) = (&args.ca, &args.cert, &args.key) else {
                bail!(
                    "give --local N, or a cluster: --nodes, --ca, --cert and --key (or \
                     `source cluster.env` from `quorumkv dev`)"
                );
            };
            if args.nodes.is_empty() {
                bail!("--nodes (or QUORUMKV_NODES) is empty");
            }
            let builder = ClientBuilder::new()
                .seeds(args.nodes.iter().cloned())
                .identity_files(ca, cert, key);
            (
                builder,
                format!("cluster at {}", args.nodes.join(",")),
                None,
            )
        }
    };
    let client = builder.build().await.context("connecting to the cluster")?;
    let target = Arc::new(QuorumKv {
        client: client.clone(),
        keyspace: args.keyspace.clone(),
        read: ReadOptions {
            r: args.r,
            timeout_ms: args.timeout_ms,
            ..ReadOptions::default()
        },
        write: WriteOptions {
            w: args.w,
            dw: args.dw,
            timeout_ms: args.timeout_ms,
            ..WriteOptions::default()
        },
        value: load.value(),
        blind: args.blind,
        contexts: ContextCache::new(),
    });
    let mut loaded = None;
    if args.load {
        if !output.json {
            eprintln!("loading {} records...", load.records);
        }
        loaded = Some(
            workload::load(
                target.clone(),
                load.records,
                args.load_concurrency,
                output.progress,
            )
            .await?,
        );
    } else if args.workload.reads() && !output.json {
        eprintln!("note: no --load; reads of records never written find nothing (still a read)");
    }
    let keys = load.key_chooser()?;
    let measured = workload::drive(target, &args.workload.mix(), &keys, &load.plan(output)).await;
    client.close().await;
    drop(local);
    let measurement = measured?;
    // Numbers when given, a description of the cluster's default otherwise.
    let default = |value: Option<u8>, default: &str| -> serde_json::Value {
        value.map_or_else(|| default.into(), Into::into)
    };
    let update = match (args.workload, args.blind) {
        (Workload::A | Workload::B, false) => "get + put with its context, timed as one op",
        (Workload::A | Workload::B, true) => "blind: one put (like write)",
        _ => "none in this workload",
    };
    let report = Report::new("run", measurement)
        .with("target", target_text)
        .with("workload", args.workload.name())
        .with("keyspace", args.keyspace.clone())
        .with("n", default(n, "the keyspace's"))
        .with("r", default(args.r, "cluster default (majority)"))
        .with("w", default(args.w, "cluster default (majority)"))
        .with("dw", default(args.dw, "cluster default (1)"))
        .with(
            "timeout_ms",
            args.timeout_ms
                .map_or_else(|| "cluster default".into(), serde_json::Value::from),
        )
        .with("update", update)
        .with(
            "load_phase",
            match loaded {
                Some(summary) => serde_json::to_value(summary)?,
                None => serde_json::Value::Null,
            },
        );
    Ok(load.describe(report))
}
