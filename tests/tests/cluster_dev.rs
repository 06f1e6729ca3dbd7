//! `quorumkv dev`: the local cluster users start first. It comes up, serves the CLI through the
//! environment it writes, stops every node cleanly on SIGTERM, and keeps its data for the next
//! run on the same directory.

use quorumkv_node::dev;
use quorumkv_tests::cluster::{
    ensure_binary, exclusive, free_port_ranges, parse_env_file, run_cli, wait_until, ChildGuard,
    CliOutput,
};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const NODES: u16 = 3;
/// Certificates are generated on the first run, so allow more than a node start.
const DEV_READY_DEADLINE: Duration = Duration::from_secs(60);
const CLI_LIMIT: Duration = Duration::from_secs(30);

/// Starts `quorumkv dev` with its output in `log`; it is stopped with SIGTERM if the test fails.
fn start_dev(dir: &Path, quic: u16, admin: u16, log: &Path) -> ChildGuard {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("the dev log");
    let child = Command::new(ensure_binary())
        .arg("dev")
        .args(["--nodes", &NODES.to_string()])
        .arg("--dir")
        .arg(dir)
        .args([
            "--base-port",
            &quic.to_string(),
            "--admin-base-port",
            &admin.to_string(),
        ])
        .args(["--ranges", "64"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("duplicating a file handle"))
        .stderr(log_file)
        .spawn()
        .expect("starting quorumkv dev");
    ChildGuard::terminate_on_drop(child)
}

fn admins(admin: u16) -> Vec<SocketAddr> {
    (0..NODES)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], admin + i)))
        .collect()
}

/// Waits until `dev` wrote `cluster.env`, every node answers `/ready` and `dev` printed its
/// banner for the `expected_banners`-th time (the log is shared by both runs); returns the
/// environment it wrote.
fn wait_for_dev(
    dev: &mut ChildGuard,
    dir: &Path,
    admin: u16,
    log: &Path,
    expected_banners: usize,
) -> Vec<(String, String)> {
    let env_file = dir.join("cluster.env");
    wait_until("quorumkv dev is ready", DEV_READY_DEADLINE, || {
        if let Some(status) = dev.try_wait() {
            panic!(
                "quorumkv dev exited early ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        // The banner comes last: dev prints it once it has seen every node ready.
        let banner = std::fs::read_to_string(log).unwrap_or_default();
        let runs = banner.matches("is ready.").count();
        env_file.exists()
            && runs == expected_banners
            && admins(admin).into_iter().all(dev::is_ready)
    });
    let env = parse_env_file(&std::fs::read_to_string(&env_file).expect("reading cluster.env"));
    let names: Vec<&str> = env.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "QUORUMKV_NODES",
            "QUORUMKV_CA",
            "QUORUMKV_CERT",
            "QUORUMKV_KEY"
        ],
        "{env:?}"
    );
    env
}

fn cli(env: &[(String, String)], args: &[&str]) -> CliOutput {
    let mut command = Command::new(ensure_binary());
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("RUST_LOG")
        .args(args);
    run_cli(&mut command, CLI_LIMIT)
}

/// How long `dev` may take to stop: it gives each node 10 s after SIGTERM, one after another,
/// before it kills it.
const DEV_STOP_DEADLINE: Duration = Duration::from_secs(60);

/// SIGTERM, then: `dev` exits 0 and no node's admin port answers any more. Returns the
/// nodes that did not log a clean stop (dev killed them after its own 10 s deadline).
fn stop_dev(mut dev: ChildGuard, dir: &Path, admin: u16, log: &Path) -> Vec<String> {
    dev.signal(nix::sys::signal::Signal::SIGTERM);
    let dev_log = || std::fs::read_to_string(log).unwrap_or_default();
    let status = dev
        .wait_for_exit(DEV_STOP_DEADLINE)
        .unwrap_or_else(|| panic!("quorumkv dev did not stop:\n{}", dev_log()));
    assert!(
        status.success(),
        "quorumkv dev exited with {status}:\n{}",
        dev_log()
    );
    // `dev` waits for its nodes before it exits, so nothing listens any more.
    for address in admins(admin) {
        assert!(
            TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_err(),
            "{address} still answers after quorumkv dev stopped"
        );
    }
    (1..=NODES)
        .map(|i| format!("n{i}"))
        .filter(|id| {
            let node_log =
                std::fs::read_to_string(dir.join(id).join("node.log")).unwrap_or_default();
            !node_log.contains("stopped cleanly")
        })
        .collect()
}

/// Writes `greeting = hello` through the CLI, with the environment `dev` wrote, as soon as
/// `dev` says the cluster is ready.
fn put_greeting(env: &[(String, String)]) {
    let put = cli(env, &["put", "--json", "greeting", "hello"]);
    assert_eq!(put.code, Some(0), "put: {put:?}");
    assert!(put.stdout_json()["context"].is_string(), "put: {put:?}");
}

#[test]
fn dev_serves_the_cli_stops_on_sigterm_and_keeps_its_data() {
    let _slot = exclusive();
    let dir = tempfile::Builder::new()
        .prefix("quorumkv-dev-test-")
        .tempdir()
        .expect("a temporary directory");
    let (quic, admin) = free_port_ranges(NODES);
    let log = dir.path().join("dev.log");

    let mut first = start_dev(dir.path(), quic, admin, &log);
    let env = wait_for_dev(&mut first, dir.path(), admin, &log, 1);
    put_greeting(&env);
    let unclean = stop_dev(first, dir.path(), admin, &log);
    eprintln!("nodes dev had to kill: {unclean:?}");

    let mut second = start_dev(dir.path(), quic, admin, &log);
    let env_again = wait_for_dev(&mut second, dir.path(), admin, &log, 2);
    assert_eq!(env, env_again, "a second run writes the same environment");
    let get = cli(&env, &["get", "--json", "--r", "3", "greeting"]);
    assert_eq!(get.code, Some(0), "get: {get:?}");
    let siblings = get.stdout_json()["siblings"].clone();
    let values = siblings.as_array().expect("a sibling list");
    assert!(
        values == &[serde_json::json!("hello")],
        "after a restart of dev: {get:?}"
    );
    let unclean = stop_dev(second, dir.path(), admin, &log);
    eprintln!("nodes dev had to kill: {unclean:?}");
}

/// `dev` promises to stop every node cleanly on SIGTERM: each node flushes, writes its
/// clean-shutdown record and exits on its own, within `dev`'s 10 s grace. (A connection left
/// half-open at start-up used to hold a node's shutdown until it idled out after 30 s; the node
/// now gives close frames at most 2 s to drain.)
#[test]
fn dev_stops_every_node_cleanly() {
    let _slot = exclusive();
    let dir = tempfile::Builder::new()
        .prefix("quorumkv-dev-test-")
        .tempdir()
        .expect("a temporary directory");
    let (quic, admin) = free_port_ranges(NODES);
    let log = dir.path().join("dev.log");
    for run in 1..=3 {
        let mut dev = start_dev(dir.path(), quic, admin, &log);
        let env = wait_for_dev(&mut dev, dir.path(), admin, &log, run);
        put_greeting(&env);
        let unclean = stop_dev(dev, dir.path(), admin, &log);
        assert!(
            unclean.is_empty(),
            "run {run}: dev had to kill {unclean:?}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}
