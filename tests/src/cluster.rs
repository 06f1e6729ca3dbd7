//! The multi-process harness: real `quorumkv` processes on loopback, started, killed, paused
//! and restarted by the tests in `tests/tests/cluster_*.rs`; with [`ClusterOptions::hosts`],
//! each in a network namespace of its own (`tests/tests/netfault.rs`, see [`crate::netns`]).
//!
//! [`TestCluster::start`] builds the binary once per test process ([`ensure_binary`]), picks
//! free ports, lays out certificates, configurations and data directories with the same
//! [`dev::prepare`] that `quorumkv dev` uses (so the tests exercise what users run), applies the
//! test's [`ClusterOptions`] (by default a 64-range ring and coordinator and failure-detector
//! timeouts of [`TOLERANT_TIMEOUT_MS`]), starts one process per node with its output in
//! `<dir>/<id>/node.log`, waits until every node answers `/ready` and then until the nodes can
//! replicate to each other ([`TestCluster::wait_connected`]). Dropping the cluster kills and
//! reaps every process, also when the test panicked; a panicking test prints the tail of every
//! node's log, and `QUORUMKV_TEST_KEEP=1` keeps the directory for a closer look. Nodes log at
//! `info` unless `QUORUMKV_TEST_NODE_LOG` says otherwise (an `EnvFilter` string).
//!
//! Besides processes, the harness offers the dev client ([`TestCluster::client`]), the CLI
//! ([`TestCluster::cli`], [`run_cli`]), Prometheus scraping ([`TestCluster::metric`]), ring
//! lookups to pick keys by coordinator ([`TestCluster::find_key`]) and a raw QUIC connection
//! for bytes no client library would send ([`RawConnection`]).
//!
//! # Rules the tests follow
//!
//! * **No sleeping as synchronisation.** Everything waits for a condition with a deadline
//!   ([`wait_until`], [`wait_until_async`]) and panics with a description when it runs out.
//! * **No timing assertions.** Deadlines only bound how long a test may hang.
//! * **One cluster at a time per test process.** [`TestCluster::start`] (and [`exclusive`])
//!   take a process-wide slot, so tests in one file run their clusters one after another.
//!   Cargo already runs test binaries one at a time; together that keeps a 2-core CI machine
//!   from being oversubscribed, which would make failure detectors see ghosts.
//!
//! # Finding the binary
//!
//! The `quorumkv` binary belongs to `quorumkv-node`, so `CARGO_BIN_EXE_quorumkv` does not exist
//! in this crate. [`ensure_binary`] runs, from the workspace root,
//!
//! ```text
//! cargo build --workspace --bin quorumkv --locked --profile test     (or --release)
//! ```
//!
//! and takes the executable's path from cargo's JSON messages, which respects
//! `CARGO_TARGET_DIR` and any other target-directory setting (the `test` profile writes to
//! `<target>/debug/`). `--profile test` and `--workspace` (which resolves features the way
//! `cargo test --workspace` does) make it share every dependency with the test build, so in CI
//! the nested build compiles only `quorumkv-node` and the binary once more; a plain
//! `cargo build -p quorumkv-node` would build the whole dependency tree again in the `dev`
//! profile. `--release` is passed when this test binary was built without debug assertions.
//! `cargo test` releases its build lock before it runs test binaries, so the nested build does
//! not wait for its parent.

use quorumkv_client::frame::{decode_frame, encode_frame};
use quorumkv_client::protocol::{Request, Response};
use quorumkv_client::{Client, ClientBuilder};
use quorumkv_node::config::{Config, Limits};
use quorumkv_node::dev::{self, LocalCluster, LocalNode, Ports};
use quorumkv_ring::NodeId;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a node (or a whole cluster) may take to answer `/ready`.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How often conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a node may take to stop after SIGTERM (a bound on a hang, not an expectation:
/// a node gives its connections at most 2 s to drain).
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// The failure detector's gauge: 1 while a node believes a peer up, 0 while down.
pub const PEER_UP: &str = "quorumkv_peer_up";
/// Lines of each node log printed when something fails.
const LOG_TAIL_LINES: usize = 40;

// ----- the binary ----------------------------------------------------------------------------

/// Builds the `quorumkv` binary (once per test process) and returns its path.
///
/// Panics with cargo's output if the build fails.
pub fn ensure_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_binary)
}

fn build_binary() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // `cargo test` gives this process the variables it sets for the test crate
    // (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...). Build scripts such as ring's declare
    // `rerun-if-env-changed` on some of them, so passing them on would make the nested build
    // differ from the outer one and the two would rebuild half the tree in turn.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo_for_the_test = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&name.as_ref());
        if set_by_cargo_for_the_test {
            command.env_remove(name.as_ref());
        }
    }
    command
        .current_dir(&workspace)
        .args(["build", "--workspace", "--bin", "quorumkv", "--locked"])
        .arg("--message-format=json-render-diagnostics");
    if cfg!(debug_assertions) {
        command.args(["--profile", "test"]);
    } else {
        command.arg("--release");
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .expect("running cargo to build the quorumkv binary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "building the quorumkv binary failed ({}):\n{stderr}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let executable = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "quorumkv")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from));
    match executable {
        Some(path) if path.exists() => path,
        other => panic!("cargo built no quorumkv executable (found {other:?}):\n{stderr}"),
    }
}

// ----- one cluster at a time -----------------------------------------------------------------

/// The right to run a multi-process cluster in this test process; released on drop.
#[derive(Debug)]
pub struct ExclusiveSlot {
    slot: &'static (Mutex<bool>, Condvar),
}

fn slot() -> &'static (Mutex<bool>, Condvar) {
    static SLOT: OnceLock<(Mutex<bool>, Condvar)> = OnceLock::new();
    SLOT.get_or_init(|| (Mutex::new(false), Condvar::new()))
}

/// Waits until no other test of this process runs a cluster, and claims the slot. Tests that
/// run processes without a [`TestCluster`] (the `quorumkv dev` test) take it themselves.
pub fn exclusive() -> ExclusiveSlot {
    let slot = slot();
    let mut busy = slot
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while *busy {
        busy = slot
            .1
            .wait(busy)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    *busy = true;
    ExclusiveSlot { slot }
}

impl Drop for ExclusiveSlot {
    fn drop(&mut self) {
        let mut busy = self
            .slot
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *busy = false;
        self.slot.1.notify_one();
    }
}

// ----- waiting -------------------------------------------------------------------------------

/// Polls `condition` every [`POLL_INTERVAL`] until it holds; panics naming `what` after
/// `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    loop {
        if condition() {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting until {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls the async `attempt` until it returns `Some`; panics naming `what` (and the last
/// attempt's description) after `deadline`. Each attempt is also bounded by `deadline`.
pub async fn wait_until_async<T, F, Fut>(what: &str, deadline: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut last = String::from("no attempt finished");
    loop {
        match tokio::time::timeout_at(until, attempt()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(reason)) => last = reason,
            Err(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting until {what}; last attempt: {last}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Runs a test body with a bound on its run time: a hung test fails instead of hanging CI.
pub async fn within<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

// ----- ports ---------------------------------------------------------------------------------

/// `count` (QUIC, admin) port pairs that were free a moment ago: each UDP and TCP port is bound
/// on 127.0.0.1 with port 0, read and released. All are held until every one is chosen, so
/// they are distinct.
pub fn free_port_pairs(count: usize) -> Vec<(u16, u16)> {
    let mut held = Vec::new();
    let mut pairs = Vec::new();
    for _ in 0..count {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a UDP port");
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a TCP port");
        let pair = (
            udp.local_addr().expect("UDP address").port(),
            tcp.local_addr().expect("TCP address").port(),
        );
        pairs.push(pair);
        held.push((udp, tcp));
    }
    pairs
}

/// A base (QUIC, admin) port pair such that `base .. base + count` are all free, for
/// `quorumkv dev --base-port --admin-base-port`.
pub fn free_port_ranges(count: u16) -> (u16, u16) {
    for _ in 0..200 {
        let base = free_port_pairs(1)[0];
        if base.0 > u16::MAX - count || base.1 > u16::MAX - count {
            continue;
        }
        let udp: Vec<_> = (0..count)
            .map_while(|i| UdpSocket::bind((Ipv4Addr::LOCALHOST, base.0 + i)).ok())
            .collect();
        let tcp: Vec<_> = (0..count)
            .map_while(|i| TcpListener::bind((Ipv4Addr::LOCALHOST, base.1 + i)).ok())
            .collect();
        if udp.len() == usize::from(count) && tcp.len() == usize::from(count) {
            return base;
        }
    }
    panic!("found no run of {count} free ports");
}

// ----- processes -----------------------------------------------------------------------------

/// A child process that is killed (after a SIGCONT, in case it was paused) and reaped when
/// dropped. `quorumkv dev` guards get a SIGTERM first, so they can stop their nodes.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    terminate_first: bool,
}

impl ChildGuard {
    /// Guards `child`; on drop it is killed with SIGKILL.
    pub fn kill_on_drop(child: Child) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            terminate_first: false,
        }
    }

    /// Guards `child`; on drop it gets SIGTERM and [`STOP_DEADLINE`] to exit, then SIGKILL.
    pub fn terminate_on_drop(child: Child) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            terminate_first: true,
        }
    }

    /// The process id, while the process has not been reaped.
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        let id = self.child.as_ref()?.id();
        Some(nix::unistd::Pid::from_raw(i32::try_from(id).ok()?))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.pid().expect("the process was already reaped");
        nix::sys::signal::kill(pid, signal)
            .unwrap_or_else(|e| panic!("sending {signal} to {pid}: {e}"));
    }

    /// The exit status if the process has exited (it is reaped then).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()?
            .try_wait()
            .expect("waiting for a child process")
    }

    /// Waits for the process to exit, at most `deadline`; `None` if it is still running.
    pub fn wait_for_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGCONT, SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.terminate_first && self.child.is_some() {
            if let Some(pid) = self.pid() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
            let _ = self.wait_for_exit(STOP_DEADLINE);
        }
        self.kill();
    }
}

/// Spawns `quorumkv start --config <config>` with stdout and stderr appended to `log`.
pub fn spawn_node(config: &Path, log: &Path) -> ChildGuard {
    spawn_node_under(&[], config, log)
}

/// [`spawn_node`] under a launcher: `launcher[0] launcher[1..] quorumkv start ...`, for example
/// `ip netns exec <namespace>`. The launcher must exec the node in its own process (as
/// `ip netns exec` does), so that the guard's signals reach the node itself.
pub fn spawn_node_under(launcher: &[String], config: &Path, log: &Path) -> ChildGuard {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
    let stderr = file.try_clone().expect("duplicating the log file handle");
    let level = std::env::var("QUORUMKV_TEST_NODE_LOG").unwrap_or_else(|_| "info".into());
    let mut command = match launcher.split_first() {
        Some((program, arguments)) => {
            let mut command = Command::new(program);
            command.args(arguments).arg(ensure_binary());
            command
        }
        None => Command::new(ensure_binary()),
    };
    let child = command
        .arg("start")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", ensure_binary().display()));
    ChildGuard::kill_on_drop(child)
}

/// The last `lines` lines of a file (or why it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

// ----- options -------------------------------------------------------------------------------

/// The coordinator timeout and failure-detector silence test clusters use unless a test sets
/// its own: longer than the nodes' 2 s defaults, so a CI machine that stalls a process for a
/// moment (a busy disk, another job) does not turn into a failed quorum. Tests of the failure
/// detector set short values themselves.
pub const TOLERANT_TIMEOUT_MS: u64 = 5_000;

/// How to configure a test cluster beyond what `dev::prepare` writes.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Ring size (Q). Small rings start fast.
    pub ranges: u32,
    /// Extra keyspaces (name → N), on every node.
    pub keyspaces: BTreeMap<String, u8>,
    /// `timeouts.request_timeout_ms`; `None` keeps the node's default (2000). The harness
    /// default is [`TOLERANT_TIMEOUT_MS`].
    pub request_timeout_ms: Option<u64>,
    /// `timeouts.ping_interval_ms`, if not the default.
    pub ping_interval_ms: Option<u64>,
    /// `timeouts.peer_down_after_ms`; `None` keeps the node's default (2000). The harness
    /// default is [`TOLERANT_TIMEOUT_MS`].
    pub peer_down_after_ms: Option<u64>,
    /// Limits, if not the defaults.
    pub limits: Option<Limits>,
    /// Data directories that live elsewhere than the cluster's directory, by node index: for
    /// a node whose data must sit on a file system of its own (a small tmpfs that fills up).
    /// The directory must exist; the harness neither creates nor removes it.
    pub data_dirs: BTreeMap<usize, PathBuf>,
    /// Any other change, applied last to node `i`'s configuration (it must stay valid).
    pub patch: Option<fn(usize, &mut Config)>,
    /// Whether [`TestCluster::start`] waits until the nodes can replicate to each other
    /// ([`TestCluster::wait_connected`]) or returns as soon as every node answers `/ready`.
    pub wait_connected: bool,
    /// Where each node runs: empty puts every node on loopback with free ports; otherwise one
    /// [`NodeHost`] per node.
    pub hosts: Vec<NodeHost>,
}

/// A node's own address and how to start it there, for nodes that do not share loopback (for
/// example one network namespace per node, [`crate::netns`]).
#[derive(Clone, Debug)]
pub struct NodeHost {
    /// Where the node's QUIC endpoint listens and its peers and clients reach it.
    pub quic: SocketAddr,
    /// Where the node's admin HTTP server listens.
    pub admin: SocketAddr,
    /// The command `quorumkv start` runs under, such as `ip netns exec <namespace>` (see
    /// [`spawn_node_under`]); empty runs it directly.
    pub launcher: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            ranges: 64,
            keyspaces: BTreeMap::new(),
            request_timeout_ms: Some(TOLERANT_TIMEOUT_MS),
            ping_interval_ms: None,
            peer_down_after_ms: Some(TOLERANT_TIMEOUT_MS),
            limits: None,
            data_dirs: BTreeMap::new(),
            patch: None,
            wait_connected: true,
            hosts: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// Adds a keyspace with replication factor `n`.
    pub fn keyspace(mut self, name: &str, n: u8) -> ClusterOptions {
        self.keyspaces.insert(name.to_string(), n);
        self
    }

    fn apply(&self, index: usize, config: &mut Config) {
        for (name, n) in &self.keyspaces {
            config.keyspaces.insert(
                name.clone(),
                quorumkv_node::config::KeyspaceConfig { n: *n },
            );
        }
        if let Some(ms) = self.request_timeout_ms {
            config.timeouts.request_timeout_ms = ms;
        }
        if let Some(ms) = self.ping_interval_ms {
            config.timeouts.ping_interval_ms = ms;
        }
        if let Some(ms) = self.peer_down_after_ms {
            config.timeouts.peer_down_after_ms = ms;
        }
        if let Some(limits) = &self.limits {
            config.limits = limits.clone();
        }
        if let Some(dir) = self.data_dirs.get(&index) {
            config.data_dir = dir.clone();
        }
        if let Some(patch) = self.patch {
            patch(index, config);
        }
    }
}

// ----- the cluster ---------------------------------------------------------------------------

/// A running multi-process cluster (on loopback unless [`ClusterOptions::hosts`] says
/// otherwise); everything is torn down on drop.
#[derive(Debug)]
pub struct TestCluster {
    local: LocalCluster,
    /// The command each node runs under ([`NodeHost::launcher`]); empty for loopback nodes.
    launchers: Vec<Vec<String>>,
    /// The cluster map every node runs with (ring, keyspaces, addresses).
    map: quorumkv_node::core::ClusterMap,
    processes: Vec<Option<ChildGuard>>,
    paused: Vec<bool>,
    // Dropped after the processes (fields drop in order): kill first, then delete their files.
    dir: Option<tempfile::TempDir>,
    _slot: ExclusiveSlot,
}

impl TestCluster {
    /// Starts `nodes` nodes, waits until all answer `/ready` and, unless the options say
    /// otherwise, until they can replicate to each other ([`TestCluster::wait_connected`]).
    pub fn start(nodes: usize, options: ClusterOptions) -> TestCluster {
        let slot = exclusive();
        ensure_binary();
        let dir = tempfile::Builder::new()
            .prefix("quorumkv-test-")
            .tempdir()
            .expect("creating a temporary directory");
        let ports = if options.hosts.is_empty() {
            Ports::Explicit(free_port_pairs(nodes))
        } else {
            assert_eq!(options.hosts.len(), nodes, "one host per node");
            Ports::Addresses(
                options
                    .hosts
                    .iter()
                    .map(|host| (host.quic, host.admin))
                    .collect(),
            )
        };
        let mut local = dev::prepare(dir.path(), nodes, &ports, options.ranges)
            .unwrap_or_else(|e| panic!("preparing the cluster layout: {e}"));
        for (index, node) in local.nodes.iter_mut().enumerate() {
            options.apply(index, &mut node.config);
            node.config
                .validate()
                .unwrap_or_else(|e| panic!("the options make node {} invalid: {e}", node.id));
            let text = node.config.to_toml().expect("serializing a node config");
            std::fs::write(&node.config_path, text).expect("writing a node config");
        }
        let map = quorumkv_node::server::cluster_map(&local.nodes[0].config)
            .unwrap_or_else(|e| panic!("building the cluster map: {e}"));
        let launchers = if options.hosts.is_empty() {
            vec![Vec::new(); nodes]
        } else {
            options
                .hosts
                .iter()
                .map(|host| host.launcher.clone())
                .collect()
        };
        let mut cluster = TestCluster {
            map,
            launchers,
            processes: local.nodes.iter().map(|_| None).collect(),
            paused: vec![false; nodes],
            local,
            dir: Some(dir),
            _slot: slot,
        };
        for index in 0..nodes {
            cluster.spawn(index);
        }
        for index in 0..nodes {
            cluster.wait_ready(index);
        }
        if options.wait_connected {
            cluster.wait_connected();
        }
        cluster
    }

    /// The layout: directory, node configs, CA and client certificate paths.
    pub fn local(&self) -> &LocalCluster {
        &self.local
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.local.dir
    }

    /// Node `index` (from 0; its id is `n{index + 1}`).
    pub fn node(&self, index: usize) -> &LocalNode {
        &self.local.nodes[index]
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.local.nodes.len()
    }

    /// Whether the cluster has no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.local.nodes.is_empty()
    }

    /// The index of the node with id `id`.
    pub fn index_of(&self, id: &NodeId) -> usize {
        self.local
            .nodes
            .iter()
            .position(|node| node.id == *id)
            .unwrap_or_else(|| panic!("no node {id} in the cluster"))
    }

    /// The preference list (the first N of the key's ring entries) of `key`, as node indexes.
    pub fn replicas(&self, keyspace: &str, key: &[u8]) -> Vec<usize> {
        let n = *self
            .map
            .keyspaces
            .get(keyspace)
            .unwrap_or_else(|| panic!("no keyspace {keyspace}"));
        let list = self
            .map
            .ring
            .preference_list_for(keyspace, key, usize::from(n))
            .expect("placing a key");
        list.ids().map(|id| self.index_of(id)).collect()
    }

    /// The cluster map the nodes run with; its `fingerprint()` is what peers compare.
    pub fn cluster_map(&self) -> &quorumkv_node::core::ClusterMap {
        &self.map
    }

    /// The first key `{prefix}{i}` (i = 0, 1, ...) whose replicas satisfy `wanted`.
    pub fn find_key(
        &self,
        keyspace: &str,
        prefix: &str,
        wanted: impl Fn(&[usize]) -> bool,
    ) -> String {
        (0..100_000)
            .map(|i| format!("{prefix}{i}"))
            .find(|key| wanted(&self.replicas(keyspace, key.as_bytes())))
            .unwrap_or_else(|| panic!("no key with prefix {prefix} has the wanted replicas"))
    }

    /// Where node `index` writes its log.
    pub fn log_path(&self, index: usize) -> PathBuf {
        self.local.nodes[index]
            .config_path
            .with_file_name("node.log")
    }

    /// Node `index`'s log so far.
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(self.log_path(index)).unwrap_or_default()
    }

    /// The last lines of every node's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut text = String::new();
        for (index, node) in self.local.nodes.iter().enumerate() {
            text.push_str(&format!(
                "----- {} ({}) -----\n{}\n",
                node.id,
                self.log_path(index).display(),
                tail(&self.log_path(index), LOG_TAIL_LINES)
            ));
        }
        text
    }

    fn spawn(&mut self, index: usize) {
        assert!(
            self.processes[index].is_none(),
            "node {index} is already running"
        );
        let node = &self.local.nodes[index];
        let log = self.log_path(index);
        let mut marker = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("opening a node log");
        let _ = writeln!(marker, "===== harness: starting {} =====", node.id);
        self.processes[index] = Some(spawn_node_under(
            &self.launchers[index],
            &node.config_path,
            &log,
        ));
    }

    /// Waits until node `index` answers `/ready`; panics with the logs if it exits first or
    /// the deadline passes.
    pub fn wait_ready(&mut self, index: usize) {
        let admin = self.local.nodes[index].admin();
        let until = Instant::now() + READY_DEADLINE;
        loop {
            if dev::is_ready(admin) {
                return;
            }
            let process = self.processes[index].as_mut().expect("node is not running");
            if let Some(status) = process.try_wait() {
                panic!(
                    "node {} exited ({status}) before it was ready\n{}",
                    self.local.nodes[index].id,
                    self.log_tails()
                );
            }
            assert!(
                Instant::now() < until,
                "node {} was not ready within {READY_DEADLINE:?}\n{}",
                self.local.nodes[index].id,
                self.log_tails()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn process(&self, index: usize) -> &ChildGuard {
        self.processes[index]
            .as_ref()
            .unwrap_or_else(|| panic!("node {index} is not running"))
    }

    /// Whether node `index` has a live process (running or paused).
    pub fn is_running(&self, index: usize) -> bool {
        self.processes[index].is_some()
    }

    /// The exit status of node `index`'s process if it has exited on its own (a crash, a
    /// panic, an exit on error), `None` while it lives. The harness does not notice such an
    /// exit by itself: this is how a test checks that a node stayed up.
    pub fn exit_status(&mut self, index: usize) -> Option<ExitStatus> {
        self.processes[index]
            .as_mut()
            .unwrap_or_else(|| panic!("node {index} is not running"))
            .try_wait()
    }

    /// SIGKILL (kill -9) node `index` and reap it.
    pub fn kill(&mut self, index: usize) {
        let mut process = self.processes[index]
            .take()
            .unwrap_or_else(|| panic!("node {index} is not running"));
        self.paused[index] = false;
        process.kill();
    }

    /// SIGTERM node `index`, wait for it to exit and assert that it exited with status 0.
    pub fn stop(&mut self, index: usize) {
        self.stop_nodes(&[index]);
    }

    /// SIGTERM the given nodes all at once (as `quorumkv dev` does on Ctrl-C), then wait for
    /// each to exit and assert that each exited with status 0.
    pub fn stop_nodes(&mut self, indexes: &[usize]) {
        let mut stopping = Vec::new();
        for &index in indexes {
            let process = self.processes[index]
                .take()
                .unwrap_or_else(|| panic!("node {index} is not running"));
            self.paused[index] = false;
            process.signal(nix::sys::signal::Signal::SIGCONT);
            process.signal(nix::sys::signal::Signal::SIGTERM);
            stopping.push((index, process));
        }
        let until = Instant::now() + STOP_DEADLINE;
        for (index, mut process) in stopping {
            let left = until.saturating_duration_since(Instant::now());
            match process.wait_for_exit(left) {
                Some(status) => assert!(
                    status.success(),
                    "node {} exited with {status} after SIGTERM\n{}",
                    self.local.nodes[index].id,
                    self.log_tails()
                ),
                None => panic!(
                    "node {} did not stop within {STOP_DEADLINE:?} of SIGTERM\n{}",
                    self.local.nodes[index].id,
                    self.log_tails()
                ),
            }
        }
    }

    /// Starts node `index` again on the same configuration and data, and waits until it is
    /// ready and connected ([`TestCluster::wait_connected`]).
    pub fn restart(&mut self, index: usize) {
        self.restart_nodes(&[index]);
    }

    /// Starts the given (stopped or killed) nodes again, waits until each is ready, then until
    /// the cluster is connected.
    pub fn restart_nodes(&mut self, indexes: &[usize]) {
        for &index in indexes {
            self.spawn(index);
        }
        for &index in indexes {
            self.wait_ready(index);
        }
        self.wait_connected();
    }

    /// Starts node `index` again and waits only until it answers `/ready`, for tests of what
    /// happens before the cluster is connected.
    pub fn restart_process(&mut self, index: usize) {
        self.spawn(index);
        self.wait_ready(index);
    }

    /// Waits until the running nodes can replicate to each other: when every node runs, a
    /// write with W = N coordinated by each node in turn succeeds (which exercises every
    /// directed peer link); then, and otherwise, [`TestCluster::wait_peers_up`].
    ///
    /// `/ready` says a node serves, not that its peers have heard from it: a restarted node's
    /// peers count it down until its first message arrives. Tests that study that moment
    /// (`writes_succeed_as_soon_as_every_node_is_ready`) start without this wait; the others
    /// start from a cluster that agrees it is whole.
    pub fn wait_connected(&self) {
        let all_live = (0..self.len()).all(|index| self.is_running(index) && !self.paused[index]);
        if all_live {
            self.write_through_every_coordinator();
        }
        self.wait_peers_up();
    }

    fn write_through_every_coordinator(&self) {
        let n = self.local.nodes[0].config.keyspaces[quorumkv_node::config::DEFAULT_KEYSPACE].n;
        let keys: Vec<String> = (0..self.len())
            .filter_map(|coordinator| {
                (0..10_000)
                    .map(|i| format!("harness-probe-{i}"))
                    .find(|key| {
                        self.replicas(quorumkv_client::DEFAULT_KEYSPACE, key.as_bytes())
                            .first()
                            == Some(&coordinator)
                    })
            })
            .collect();
        let builder = self
            .client_builder()
            .connect_timeout(Duration::from_secs(1));
        let tails = || self.log_tails();
        std::thread::scope(|scope| {
            let probe = scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the probe");
                runtime.block_on(async {
                    let client = builder.build().await.map_err(|e| e.to_string())?;
                    let until = Instant::now() + READY_DEADLINE;
                    let options = quorumkv_client::WriteOptions {
                        w: Some(n),
                        dw: Some(0),
                        timeout_ms: None,
                        ..quorumkv_client::WriteOptions::default()
                    };
                    loop {
                        let mut failed = None;
                        for key in &keys {
                            let put = client.put(
                                quorumkv_client::DEFAULT_KEYSPACE,
                                key,
                                b"probe".to_vec(),
                                None,
                                options,
                            );
                            if let Err(e) = put.await {
                                failed = Some(format!("{key}: {e}"));
                                break;
                            }
                        }
                        match failed {
                            None => break,
                            Some(reason) if Instant::now() >= until => return Err(reason),
                            Some(_) => tokio::time::sleep(POLL_INTERVAL).await,
                        }
                    }
                    client.close().await;
                    Ok::<(), String>(())
                })
            });
            if let Err(reason) = probe.join().expect("the probe thread panicked") {
                panic!("the nodes could not replicate to each other within {READY_DEADLINE:?}: {reason}\n{}", tails());
            }
        });
    }

    /// Waits until every running, unpaused node's failure detector believes every other
    /// running, unpaused node up (no `quorumkv_peer_up{peer=...} 0` series). A node that starts
    /// before its peers, or hears nothing from a peer for a while, marks it down until its
    /// next ping is answered; tests that count replicas start from a cluster that agrees.
    pub fn wait_peers_up(&self) {
        let live: Vec<usize> = (0..self.len())
            .filter(|index| self.is_running(*index) && !self.paused[*index])
            .collect();
        let until = Instant::now() + READY_DEADLINE;
        loop {
            let mut down = Vec::new();
            for &observer in &live {
                let text = match dev::scrape_metrics(self.node(observer).admin()) {
                    Ok(text) => text,
                    Err(e) => {
                        down.push(format!("{}: {e}", self.node(observer).id));
                        continue;
                    }
                };
                for &peer in live.iter().filter(|peer| **peer != observer) {
                    let id = self.node(peer).id.to_string();
                    if metric_value(&text, PEER_UP, &[("peer", &id)]) == Some(0.0) {
                        down.push(format!("{} believes {id} down", self.node(observer).id));
                    }
                }
            }
            if down.is_empty() {
                return;
            }
            assert!(
                Instant::now() < until,
                "peers still down after {READY_DEADLINE:?}: {down:?}\n{}",
                self.log_tails()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The process id of node `index`, which must be running.
    pub fn pid(&self, index: usize) -> nix::unistd::Pid {
        self.process(index)
            .pid()
            .unwrap_or_else(|| panic!("node {index} was reaped"))
    }

    /// SIGSTOP node `index`: it stays alive but does nothing until [`TestCluster::resume`].
    pub fn pause(&mut self, index: usize) {
        self.process(index)
            .signal(nix::sys::signal::Signal::SIGSTOP);
        self.paused[index] = true;
    }

    /// SIGCONT node `index`.
    pub fn resume(&mut self, index: usize) {
        self.process(index)
            .signal(nix::sys::signal::Signal::SIGCONT);
        self.paused[index] = false;
    }

    /// Node `index`'s Prometheus metrics text.
    pub fn metrics(&self, index: usize) -> String {
        dev::scrape_metrics(self.local.nodes[index].admin())
            .unwrap_or_else(|e| panic!("scraping node {index}: {e}"))
    }

    /// The sum of metric `name` over the series whose labels include `labels`, on node
    /// `index` (0 if there is none).
    pub fn metric(&self, index: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(index), name, labels)
    }

    /// Node `index`'s `/sync-status`: a digest of every range's Merkle root (see
    /// `quorumkv_node::core::SyncStatus`), or `None` while it cannot answer.
    pub fn sync_status(&self, index: usize) -> Option<serde_json::Value> {
        let text = dev::admin_get(self.local.nodes[index].admin(), "/sync-status").ok()?;
        serde_json::from_str(&text).ok()
    }

    /// [`TestCluster::metric`] summed over every running node.
    pub fn metric_total(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        (0..self.len())
            .filter(|index| self.is_running(*index))
            .map(|index| self.metric(index, name, labels))
            .sum()
    }

    /// Every node's QUIC address, as seeds.
    pub fn addresses(&self) -> Vec<String> {
        self.local
            .nodes
            .iter()
            .map(|node| node.quic().to_string())
            .collect()
    }

    /// A client builder with the dev client certificate and every node as a seed.
    ///
    /// Its per-attempt timeout is the nodes' `request_timeout_ms` plus 3 s, so the node's own
    /// answer (`QuorumNotReached`, `Unavailable`) arrives before the client gives up.
    pub fn client_builder(&self) -> ClientBuilder {
        let node_timeout_ms = self.local.nodes[0].config.timeouts.request_timeout_ms;
        Client::builder()
            .seeds(self.addresses())
            .identity_files(
                &self.local.ca,
                &self.local.client.cert,
                &self.local.client.key,
            )
            .request_timeout(Duration::from_millis(node_timeout_ms) + Duration::from_secs(3))
    }

    /// A client for a cluster with dead nodes: it gives up on a silent node quickly and then
    /// leaves it alone, so every request does not pay for dialing the dead.
    pub async fn fault_tolerant_client(&self) -> Client {
        self.client_builder()
            .connect_timeout(Duration::from_millis(500))
            .down_backoff(Duration::from_secs(600), Duration::from_secs(600))
            .build()
            .await
            .unwrap_or_else(|e| panic!("connecting a client: {e}\n{}", self.log_tails()))
    }

    /// A connected client (dev client certificate, every node a seed).
    pub async fn client(&self) -> Client {
        self.client_builder()
            .build()
            .await
            .unwrap_or_else(|e| panic!("connecting a client: {e}\n{}", self.log_tails()))
    }

    /// The `quorumkv` binary with `QUORUMKV_NODES`, `QUORUMKV_CA`, `QUORUMKV_CERT` and
    /// `QUORUMKV_KEY` pointing at this cluster, and `RUST_LOG` unset (the CLI's default).
    pub fn cli(&self) -> Command {
        let mut command = Command::new(ensure_binary());
        command
            .envs(self.local.env())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }

    /// A TLS identity for raw connections: the cluster CA and the dev client certificate.
    pub fn client_identity(&self) -> RawIdentity {
        RawIdentity::Certificate {
            ca: self.local.ca.clone(),
            cert: self.local.client.cert.clone(),
            key: self.local.client.key.clone(),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for process in self.processes.iter_mut().flatten() {
            process.kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "test cluster in {} failed; node logs:\n{}",
                self.local.dir.display(),
                self.log_tails()
            );
            if std::env::var_os("QUORUMKV_TEST_KEEP").is_some() {
                if let Some(dir) = self.dir.take() {
                    eprintln!("kept {}", dir.keep().display());
                }
            }
        }
    }
}

// ----- metrics -------------------------------------------------------------------------------

/// Sums the samples of metric `name` in Prometheus text whose labels include every pair in
/// `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(key, wanted)| label_text.contains(&format!("{key}=\"{wanted}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Whether metric `name` has a series with exactly these label values (for gauges that do not
/// exist until first set).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(key, wanted)| label_text.contains(&format!("{key}=\"{wanted}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
}

// ----- raw QUIC connections ------------------------------------------------------------------

/// What a raw connection presents: a certificate (with the CA to trust), or none.
#[derive(Clone, Debug)]
pub enum RawIdentity {
    Certificate {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// Trusts `ca` but presents no client certificate.
    NoCertificate { ca: PathBuf },
}

/// A QUIC connection to one node that bypasses the client library, for sending bytes no
/// well-behaved client would send.
#[derive(Debug)]
pub struct RawConnection {
    pub connection: quinn::Connection,
    endpoint: quinn::Endpoint,
}

/// What came back on a raw stream.
#[derive(Debug)]
pub enum RawOutcome {
    /// A complete response frame.
    Response(Response),
    /// Bytes came back that are not a response frame.
    Garbage(String),
    /// The node stopped reading our stream or reset its side; no response.
    StreamRefused(String),
    /// The connection is gone.
    ConnectionLost(quinn::ConnectionError),
}

impl RawConnection {
    /// Connects to `address` with `identity`, offering ALPN `alpn` and asking for TLS server
    /// name `server_name`. Errors are the handshake's.
    pub async fn connect(
        address: SocketAddr,
        identity: &RawIdentity,
        alpn: &[u8],
        server_name: &str,
    ) -> Result<RawConnection, quinn::ConnectionError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported");
        let ca = match identity {
            RawIdentity::Certificate { ca, .. } | RawIdentity::NoCertificate { ca } => ca,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in quorumkv_node::tls::load_certificates(ca).expect("loading the CA") {
            roots.add(cert).expect("adding the CA");
        }
        let builder = builder.with_root_certificates(roots);
        let mut tls = match identity {
            RawIdentity::Certificate { cert, key, .. } => builder
                .with_client_auth_cert(
                    quorumkv_node::tls::load_certificates(cert).expect("loading a certificate"),
                    quorumkv_node::tls::load_private_key(key).expect("loading a key"),
                )
                .expect("a usable client certificate"),
            RawIdentity::NoCertificate { .. } => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![alpn.to_vec()];
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("a QUIC TLS config");
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            Duration::from_secs(10).try_into().expect("a small timeout"),
        ));
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("binding a client endpoint");
        let connecting = endpoint
            .connect_with(config, address, server_name)
            .expect("a valid address and server name");
        let connection = connecting.await?;
        Ok(RawConnection {
            connection,
            endpoint,
        })
    }

    /// Opens a stream, writes `bytes`, finishes, and reads whatever comes back (at most
    /// 4 MiB).
    pub async fn exchange(&self, bytes: &[u8]) -> RawOutcome {
        let (mut send, mut recv) = match self.connection.open_bi().await {
            Ok(streams) => streams,
            Err(e) => return RawOutcome::ConnectionLost(e),
        };
        match send.write_all(bytes).await {
            Ok(()) => {
                let _ = send.finish();
            }
            Err(quinn::WriteError::ConnectionLost(e)) => return RawOutcome::ConnectionLost(e),
            // Stopped: the node refused to read on; its answer says why.
            Err(_) => {}
        }
        match recv.read_to_end(4 << 20).await {
            Ok(body) => match decode_frame::<Response>(&body, 4 << 20) {
                Ok(response) => RawOutcome::Response(response),
                Err(e) => RawOutcome::Garbage(format!("{} bytes: {e}", body.len())),
            },
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => {
                RawOutcome::ConnectionLost(e)
            }
            Err(e) => RawOutcome::StreamRefused(e.to_string()),
        }
    }

    /// Sends one well-formed request and returns the response; panics on anything else.
    pub async fn request(&self, request: &Request) -> Response {
        let frame = encode_frame(request, 4 << 20).expect("encoding a request");
        match self.exchange(&frame).await {
            RawOutcome::Response(response) => response,
            other => panic!("expected a response to {request:?}, got {other:?}"),
        }
    }

    /// Closes the connection and waits (briefly) for the node to hear it.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

// ----- the CLI -------------------------------------------------------------------------------

/// What a CLI run printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// stdout parsed as one JSON value; panics with the whole output if it is not.
    pub fn stdout_json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }

    /// stderr parsed as one JSON value; panics with the whole output if it is not.
    pub fn stderr_json(&self) -> serde_json::Value {
        serde_json::from_str(self.stderr.trim())
            .unwrap_or_else(|e| panic!("stderr is not one JSON value ({e}): {self:?}"))
    }
}

/// Runs `command` to completion (bounded by `deadline`; killed after it) and captures its
/// output. Blocking: call it from a test thread or `spawn_blocking`.
pub fn run_cli(command: &mut Command, deadline: Duration) -> CliOutput {
    let stdout = tempfile::tempfile().expect("a temporary file for stdout");
    let stderr = tempfile::tempfile().expect("a temporary file for stderr");
    let child = command
        .stdout(stdout.try_clone().expect("duplicating a file handle"))
        .stderr(stderr.try_clone().expect("duplicating a file handle"))
        .spawn()
        .expect("starting the quorumkv CLI");
    let mut guard = ChildGuard::kill_on_drop(child);
    let status = guard
        .wait_for_exit(deadline)
        .unwrap_or_else(|| panic!("the CLI did not finish within {deadline:?}: {command:?}"));
    CliOutput {
        code: status.code(),
        stdout: read_all(stdout),
        stderr: read_all(stderr),
    }
}

fn read_all(mut file: File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))
        .expect("rewinding a temporary file");
    file.read_to_string(&mut text)
        .expect("reading a temporary file");
    text
}

/// Parses a `cluster.env` written by `quorumkv dev`: `export NAME='value'` lines.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.trim_matches('\'').to_string()))
        .collect()
}
