//! A throwaway local QuorumKV cluster for `quorumkv-bench run --local N`.
//!
//! The layout is the one `quorumkv dev` and the multi-process tests use
//! (`quorumkv_node::dev::prepare`: a cluster CA, node and client certificates, one
//! `node.toml` and data directory per node), in a fresh temporary directory (or `--dir`), on
//! loopback ports the OS reported free a moment before. Each node is a `quorumkv start
//! --config <node.toml>` process with its output in `<dir>/<id>/node.log`.
//!
//! Starting is done when every node answers `/ready` on its admin port *and* a probe write
//! with W = N succeeded through several coordinators, so the nodes see each other and the
//! first measured request does not pay for connection set-up or meet a failure detector that
//! has not yet heard from its peers.
//!
//! [`LocalCluster`] owns the processes: dropping it (normal end, an error, Ctrl-C, a panic)
//! sends SIGTERM, gives the nodes a few seconds to stop and kills what is left, then removes
//! the temporary directory. Ports are chosen by binding port 0 and releasing it, so another
//! program could take one in between; a node that fails to start says so in its log.
//!
//! The `quorumkv` binary is taken from `--quorumkv-bin`, else from next to this executable
//! (cargo puts both in `target/<profile>/`; build it with
//! `cargo build --release -p quorumkv-node -p quorumkv-bench`).

use anyhow::{anyhow, bail, Context as _, Result};
use quorumkv_client::{Client, ClientBuilder, WriteOptions, DEFAULT_KEYSPACE};
use quorumkv_node::dev::{self, Ports};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the nodes may take to become ready and connected.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Options for [`LocalCluster::start`].
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub nodes: usize,
    /// The `quorumkv` binary; `None` looks next to this executable.
    pub binary: Option<PathBuf>,
    /// Where to lay the cluster out; `None` makes a temporary directory, removed afterwards.
    pub dir: Option<PathBuf>,
    /// Ranges on the ring (Q).
    pub ranges: u32,
    /// `RUST_LOG` for the nodes.
    pub node_log: String,
}

/// A running local cluster; stopped on drop.
#[derive(Debug)]
pub struct LocalCluster {
    pub layout: dev::LocalCluster,
    children: Vec<(String, Child)>,
    /// Kept so the directory lives as long as the nodes; removed after they stopped.
    _temporary: Option<tempfile::TempDir>,
}

impl LocalCluster {
    /// Lays out, starts and waits for a cluster (see the module docs).
    pub async fn start(options: &LocalOptions) -> Result<LocalCluster> {
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            None => sibling_binary()?,
        };
        let temporary = match &options.dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("quorumkv-bench-cluster-")
                    .tempdir()?,
            ),
        };
        let dir = match (&options.dir, &temporary) {
            (Some(dir), _) => dir.clone(),
            (None, Some(temporary)) => temporary.path().to_path_buf(),
            (None, None) => unreachable!("one of the two is set"),
        };
        let ports = Ports::Explicit(free_port_pairs(options.nodes)?);
        let layout = dev::prepare(&dir, options.nodes, &ports, options.ranges)?;
        let mut cluster = LocalCluster {
            layout,
            children: Vec::new(),
            _temporary: temporary,
        };
        for node in &cluster.layout.nodes {
            let log_path = node.config_path.with_file_name("node.log");
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let child = Command::new(&binary)
                .arg("start")
                .arg("--config")
                .arg(&node.config_path)
                .env("RUST_LOG", &options.node_log)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} for node {}", binary.display(), node.id))?;
            cluster.children.push((node.id.to_string(), child));
        }
        cluster.wait_ready().await?;
        cluster.wait_connected().await?;
        Ok(cluster)
    }

    /// A client builder pointed at the cluster with the dev client certificate.
    pub fn client_builder(&self) -> ClientBuilder {
        ClientBuilder::new()
            .seeds(self.layout.nodes.iter().map(|node| node.quic().to_string()))
            .identity_files(
                &self.layout.ca,
                &self.layout.client.cert,
                &self.layout.client.key,
            )
    }

    /// The replication factor of the default keyspace.
    pub fn n(&self) -> Option<u8> {
        self.layout
            .nodes
            .first()
            .and_then(|node| node.config.keyspaces.get(DEFAULT_KEYSPACE))
            .map(|keyspace| keyspace.n)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        for index in 0..self.layout.nodes.len() {
            let node = &self.layout.nodes[index];
            let admin = node.admin();
            loop {
                let ready = tokio::task::spawn_blocking(move || dev::is_ready(admin)).await?;
                if ready {
                    break;
                }
                let log = node.config_path.with_file_name("node.log");
                if let Some(status) = self.children[index].1.try_wait()? {
                    bail!(
                        "node {} exited ({status}) before it was ready; see {}",
                        node.id,
                        log.display()
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {} was not ready in time; see {}",
                        node.id,
                        log.display()
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(())
    }

    /// Writes probe keys with W = N (no durability wait) until every one succeeds.
    async fn wait_connected(&self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        let client = loop {
            match self
                .client_builder()
                .connect_timeout(Duration::from_secs(1))
                .build()
                .await
            {
                Ok(client) => break client,
                Err(e) if Instant::now() > deadline => {
                    return Err(anyhow!(e).context("no client could connect to the cluster"))
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        };
        let options = WriteOptions {
            w: self.n(),
            dw: Some(0),
            timeout_ms: Some(1000),
            ..WriteOptions::default()
        };
        // Enough keys that, with overwhelming probability, every node coordinates some.
        let probes = 8 * self.layout.nodes.len();
        for probe in 0..probes {
            let key = format!("quorumkv-bench-probe-{probe}");
            loop {
                match probe_write(&client, &key, options).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => {
                        client.close().await;
                        return Err(anyhow!(e).context(
                            "the nodes did not replicate to each other in time (probe write)",
                        ));
                    }
                    Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
                }
            }
        }
        client.close().await;
        Ok(())
    }
}

async fn probe_write(
    client: &Client,
    key: &str,
    options: WriteOptions,
) -> quorumkv_client::Result<()> {
    let read = client
        .get(DEFAULT_KEYSPACE, key, Default::default())
        .await?;
    client
        .put(
            DEFAULT_KEYSPACE,
            key,
            b"probe".to_vec(),
            Some(&read.context),
            options,
        )
        .await?;
    Ok(())
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, child) in &self.children {
            let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        for (id, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("node {id} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// `quorumkv` next to this executable, or one directory up (test binaries live in `deps/`).
fn sibling_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let name = format!("quorumkv{}", std::env::consts::EXE_SUFFIX);
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "no quorumkv binary at {}; build it (cargo build --release -p quorumkv-node \
                 -p quorumkv-bench) or pass --quorumkv-bin",
                display_paths(&candidates)
            )
        })
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// `count` (QUIC, admin) port pairs that were free a moment ago, all distinct: every socket is
/// held until all are chosen.
fn free_port_pairs(count: usize) -> Result<Vec<(u16, u16)>> {
    let mut held = Vec::new();
    let mut pairs = Vec::new();
    for _ in 0..count {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        pairs.push((udp.local_addr()?.port(), tcp.local_addr()?.port()));
        held.push((udp, tcp));
    }
    Ok(pairs)
}
