//! A local cluster on one machine: the layout `quorumkv dev` creates, and the test harness too.
//! `dev` puts every node on loopback; the tests may give each node an address of its own
//! ([`Ports::Addresses`]).
//!
//! [`prepare`] lays out everything a local cluster needs under one directory:
//!
//! ```text
//! DIR/certs/ca.pem, ca.key                cluster CA (created once)
//! DIR/certs/node-<id>.pem/.key            one certificate per node
//! DIR/certs/client-dev.pem/.key           a client certificate for the CLI
//! DIR/<id>/node.toml                      each node's configuration
//! DIR/<id>/data/                          each node's sled directory
//! DIR/cluster.env                         `source` it to point a shell at the cluster
//! ```
//!
//! Running it again on the same directory reuses what is there: certificates are kept, the
//! configuration is rewritten identically, and the data directories are untouched, so a
//! restarted dev cluster still holds its data. One function builds the layout for both the
//! `dev` command and the multi-process tests, so the tests exercise what users run.

use crate::certs::{self, IfExists, IssuedPaths};
use crate::config::{Config, KeyspaceConfig, Limits, MemberConfig, Timeouts, TlsConfig};
use crate::error::{Error, Result};
use quorumkv_ring::{NodeId, Zone};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

/// The client certificate name `quorumkv dev` issues for the CLI.
pub const DEV_CLIENT: &str = "dev";

/// How to choose ports for a local cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Node i (from 0) gets QUIC port `quic + i` and admin port `admin + i`.
    Base { quic: u16, admin: u16 },
    /// One (QUIC, admin) pair per node, chosen by the caller (tests pick free ports).
    Explicit(Vec<(u16, u16)>),
    /// One (QUIC, admin) socket address per node, for nodes that do not share loopback: each
    /// on a host or in a network namespace of its own (the network-fault tests).
    Addresses(Vec<(SocketAddr, SocketAddr)>),
}

/// Everything about one node of a local cluster.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub id: NodeId,
    pub config_path: PathBuf,
    pub config: Config,
}

impl LocalNode {
    /// Where the node's admin HTTP server listens.
    pub fn admin(&self) -> SocketAddr {
        self.config.admin_listen
    }

    /// Where the node's QUIC endpoint listens.
    pub fn quic(&self) -> SocketAddr {
        self.config.listen
    }
}

/// A prepared local cluster.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    pub dir: PathBuf,
    pub nodes: Vec<LocalNode>,
    pub ca: PathBuf,
    pub client: IssuedPaths,
}

impl LocalCluster {
    /// `QUORUMKV_NODES`: every node's QUIC address, comma-separated.
    pub fn nodes_var(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.quic().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The environment that points the CLI at this cluster.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("QUORUMKV_NODES", self.nodes_var()),
            ("QUORUMKV_CA", self.ca.display().to_string()),
            ("QUORUMKV_CERT", self.client.cert.display().to_string()),
            ("QUORUMKV_KEY", self.client.key.display().to_string()),
        ]
    }

    /// The text of `cluster.env`: `export` lines for a POSIX shell.
    pub fn env_file(&self) -> String {
        let mut text =
            String::from("# Written by `quorumkv dev`: `source` this file to use the cluster.\n");
        for (name, value) in self.env() {
            text.push_str(&format!("export {name}='{value}'\n"));
        }
        text
    }
}

/// Timeouts for a loopback cluster: the production defaults, which suit loopback too.
fn local_timeouts() -> Timeouts {
    Timeouts::default()
}

/// Lays out a local cluster of `count` nodes under `dir` (see the module docs). `ranges` is
/// the ring size (Q). Existing certificates and data are reused.
pub fn prepare(dir: &Path, count: usize, ports: &Ports, ranges: u32) -> Result<LocalCluster> {
    if count == 0 {
        return Err(Error::Config {
            field: "nodes".into(),
            reason: "a cluster needs at least one node".into(),
        });
    }
    let addresses: Vec<(SocketAddr, SocketAddr)> = match ports {
        Ports::Base { quic, admin } => (0..count)
            .map(|i| {
                let offset = u16::try_from(i).unwrap_or(u16::MAX);
                (
                    loopback(quic.saturating_add(offset)),
                    loopback(admin.saturating_add(offset)),
                )
            })
            .collect(),
        Ports::Explicit(pairs) if pairs.len() == count => pairs
            .iter()
            .map(|(quic, admin)| (loopback(*quic), loopback(*admin)))
            .collect(),
        Ports::Addresses(addresses) if addresses.len() == count => addresses.clone(),
        Ports::Explicit(pairs) => return Err(ports_mismatch(pairs.len(), count)),
        Ports::Addresses(addresses) => return Err(ports_mismatch(addresses.len(), count)),
    };
    let dir = absolute(dir)?;
    let certs_dir = dir.join("certs");
    let ca = certs::ca_paths(&certs_dir);
    if !ca.cert.exists() {
        certs::init_ca(&certs_dir, IfExists::Refuse)?;
    }
    let client = certs::client_paths(&certs_dir, DEV_CLIENT);
    if !client.cert.exists() {
        certs::issue_client(&certs_dir, DEV_CLIENT, IfExists::Refuse)?;
    }
    let ids: Vec<NodeId> = (1..=count)
        .map(|i| NodeId::new(format!("n{i}")))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Config {
            field: "nodes".into(),
            reason: e.to_string(),
        })?;
    let zone = Zone::new("local").map_err(|e| Error::Config {
        field: "zone".into(),
        reason: e.to_string(),
    })?;
    let members: Vec<MemberConfig> = ids
        .iter()
        .zip(&addresses)
        .map(|(id, (quic, _))| MemberConfig {
            id: id.clone(),
            address: quic.to_string(),
            zone: zone.clone(),
            capacity: 1,
        })
        .collect();
    let n = u8::try_from(count.min(3)).unwrap_or(3);
    let keyspaces: BTreeMap<String, KeyspaceConfig> =
        [("default".to_string(), KeyspaceConfig { n })]
            .into_iter()
            .collect();
    let mut nodes = Vec::new();
    for (id, (quic, admin)) in ids.iter().zip(&addresses) {
        let node_certs = certs::node_paths(&certs_dir, id);
        if !node_certs.cert.exists() {
            certs::issue_node(&certs_dir, id, IfExists::Refuse)?;
        }
        let node_dir = dir.join(id.as_str());
        let data_dir = node_dir.join("data");
        std::fs::create_dir_all(&data_dir).map_err(|e| io_error(&data_dir, e))?;
        let config = Config {
            node_id: id.clone(),
            zone: zone.clone(),
            capacity: 1,
            listen: *quic,
            advertise: quic.to_string(),
            data_dir,
            admin_listen: *admin,
            ranges,
            replication_max: 3,
            worker_threads: shared_cpu_threads(count),
            keyspaces: keyspaces.clone(),
            timeouts: local_timeouts(),
            limits: Limits::default(),
            hints: Default::default(),
            anti_entropy: Default::default(),
            tombstones: Default::default(),
            tls: TlsConfig {
                ca_cert: ca.cert.clone(),
                cert: node_certs.cert.clone(),
                key: node_certs.key.clone(),
            },
            members: members.clone(),
        };
        config.validate()?;
        let config_path = node_dir.join("node.toml");
        let text = config.to_toml()?;
        std::fs::write(&config_path, text).map_err(|e| io_error(&config_path, e))?;
        nodes.push(LocalNode {
            id: id.clone(),
            config_path,
            config,
        });
    }
    let cluster = LocalCluster {
        dir: dir.clone(),
        nodes,
        ca: ca.cert,
        client,
    };
    let env_path = dir.join("cluster.env");
    std::fs::write(&env_path, cluster.env_file()).map_err(|e| io_error(&env_path, e))?;
    Ok(cluster)
}

/// Runtime threads for one of `nodes` nodes sharing this machine: its share of the CPUs, at
/// least one. More threads than CPUs only add context switches between the processes.
fn shared_cpu_threads(nodes: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / nodes.max(1)).max(1)
}

fn ports_mismatch(given: usize, count: usize) -> Error {
    Error::Config {
        field: "ports".into(),
        reason: format!("{given} port pairs given for {count} nodes"),
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    std::fs::canonicalize(dir).map_err(|e| io_error(dir, e))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Config {
        field: "dir".into(),
        reason: format!("{}: {e}", path.display()),
    }
}

/// Asks a node's admin server whether it is ready (`GET /ready` answered 200).
pub fn is_ready(admin: SocketAddr) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_millis(500)))
        .build()
        .into();
    agent
        .get(format!("http://{admin}/ready"))
        .call()
        .is_ok_and(|response| response.status() == 200)
}

/// Fetches a node's Prometheus metrics text.
pub fn scrape_metrics(admin: SocketAddr) -> Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(2)))
        .build()
        .into();
    agent
        .get(format!("http://{admin}/metrics"))
        .call()
        .and_then(|mut response| response.body_mut().read_to_string())
        .map_err(|e| Error::Config {
            field: "admin_listen".into(),
            reason: format!("scraping http://{admin}/metrics: {e}"),
        })
}

/// The body of `http://{admin}{path}` on a node's admin server (for example `/sync-status`),
/// failing on any status but 200.
pub fn admin_get(admin: SocketAddr, path: &str) -> Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(2)))
        .build()
        .into();
    agent
        .get(format!("http://{admin}{path}"))
        .call()
        .and_then(|mut response| response.body_mut().read_to_string())
        .map_err(|e| Error::Config {
            field: "admin_listen".into(),
            reason: format!("reading http://{admin}{path}: {e}"),
        })
}

/// Arguments of `quorumkv dev`.
#[derive(Clone, Debug, clap::Args)]
pub struct DevArgs {
    /// How many nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Where certificates, configurations and data live; reused when run again.
    #[arg(long, default_value = "quorumkv-dev")]
    pub dir: PathBuf,
    /// QUIC port of the first node; node i uses this plus i.
    #[arg(long, default_value_t = 7401)]
    pub base_port: u16,
    /// Admin HTTP port of the first node; node i uses this plus i.
    #[arg(long, default_value_t = 9401)]
    pub admin_base_port: u16,
    /// Ranges on the ring (Q).
    #[arg(long, default_value_t = 256)]
    pub ranges: u32,
}

/// Runs `quorumkv dev`: prepares the layout, starts the nodes, waits until they are ready,
/// prints how to use the cluster, and stops every node cleanly on Ctrl-C or SIGTERM.
/// Returns the process exit code.
pub async fn run(args: DevArgs) -> i32 {
    let ports = Ports::Base {
        quic: args.base_port,
        admin: args.admin_base_port,
    };
    let cluster = match prepare(&args.dir, args.nodes, &ports, args.ranges) {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find the quorumkv binary: {e}");
            return 1;
        }
    };
    let mut children = Vec::new();
    for node in &cluster.nodes {
        let log_path = node.config_path.with_file_name("node.log");
        let log = match std::fs::File::create(&log_path) {
            Ok(log) => log,
            Err(e) => {
                eprintln!("error: {}: {e}", log_path.display());
                stop_all(&mut children).await;
                return 1;
            }
        };
        let stderr = match log.try_clone() {
            Ok(stderr) => stderr,
            Err(e) => {
                eprintln!("error: {}: {e}", log_path.display());
                stop_all(&mut children).await;
                return 1;
            }
        };
        let child = tokio::process::Command::new(&exe)
            .arg("start")
            .arg("--config")
            .arg(&node.config_path)
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(child) => children.push((node.id.clone(), child)),
            Err(e) => {
                eprintln!("error: starting node {}: {e}", node.id);
                stop_all(&mut children).await;
                return 1;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    for node in &cluster.nodes {
        loop {
            let admin = node.admin();
            if tokio::task::spawn_blocking(move || is_ready(admin))
                .await
                .unwrap_or(false)
            {
                break;
            }
            let exited = children
                .iter_mut()
                .find(|(id, _)| *id == node.id)
                .and_then(|(_, child)| child.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                eprintln!(
                    "error: node {} did not become ready; see {}",
                    node.id,
                    node.config_path.with_file_name("node.log").display()
                );
                stop_all(&mut children).await;
                return 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    print_banner(&cluster, &exe);
    crate::server::shutdown_signal().await;
    eprintln!("stopping {} nodes...", children.len());
    stop_all(&mut children).await;
    eprintln!("stopped");
    0
}

fn print_banner(cluster: &LocalCluster, exe: &Path) {
    println!(
        "QuorumKV dev cluster of {} nodes is ready.",
        cluster.nodes.len()
    );
    for node in &cluster.nodes {
        println!(
            "  {}  quic {}  admin http://{}  log {}",
            node.id,
            node.quic(),
            node.admin(),
            node.config_path.with_file_name("node.log").display()
        );
    }
    println!();
    println!("In another shell:");
    println!("  source {}", cluster.dir.join("cluster.env").display());
    println!("  {} put greeting hello", exe.display());
    println!("  {} get greeting --json", exe.display());
    println!(
        "  curl -s http://{}/metrics | grep quorumkv_",
        cluster.nodes[0].admin()
    );
    println!();
    println!(
        "Press Ctrl-C to stop every node cleanly; run again with --dir {} to reuse the data.",
        cluster.dir.display()
    );
}

/// Sends SIGTERM to every child and waits for it; a child that does not stop within ten
/// seconds is killed.
async fn stop_all(children: &mut Vec<(NodeId, tokio::process::Child)>) {
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
    for (id, child) in children.iter_mut() {
        match tokio::time::timeout(std::time::Duration::from_secs(10), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("node {id} did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
    }
    children.clear();
}
