//! Durable means on stable storage: every durable acknowledgement follows an `fdatasync`.
//!
//! A kill -9 test cannot tell a write that reached the disk from one still in the page cache
//! (the page cache survives the process), and sled's own flush ends with `sync_file_range`,
//! which survives a process crash but not a power cut. So this test watches the system calls
//! instead: it attaches `strace` to one node of a three-node cluster, makes sequential writes
//! that every replica must acknowledge durably (W = dw = 3), and checks that for each write the
//! traced node ran an `fdatasync` of its sled log that began after the write was sent and ended
//! before it was acknowledged. A flush that skipped the sync would acknowledge a write with no
//! such call in its window. It then stops the node cleanly and checks that the clean-shutdown
//! record (written by the same `set_incarnation` path as the start-up record) was synced too.
//!
//! `strace` comes from Debian's package, which `.ci/run` installs; without it (or without the
//! right to trace) the test says so and is skipped, unless `CI` or
//! `QUORUMKV_REQUIRE_PRIVILEGES=1` is set, where it fails instead.

use quorumkv_client::protocol::WriteOptions;
use quorumkv_tests::cluster::{within, ClusterOptions, TestCluster};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WRITES: usize = 20;

/// One completed system call as strace printed it.
#[derive(Debug)]
struct Syscall {
    name: String,
    /// Path of the first argument's file descriptor (`-y`).
    path: String,
    start: f64,
    end: f64,
    ok: bool,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Attaches strace to every thread of `pid`, writing to `log`; returns once it is attached.
fn attach(pid: nix::unistd::Pid, log: &Path) -> Child {
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-ttt",
            "-T",
            "-y",
            "-e",
            "trace=fdatasync,fsync,syncfs",
        ])
        .arg("-o")
        .arg(log)
        .arg("-p")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting strace");
    // strace reports each thread it attached to on stderr; the first line means tracing began.
    let stderr = strace.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let first = lines
        .next()
        .expect("strace printed nothing")
        .expect("reading strace's output");
    assert!(
        first.contains("attached"),
        "strace could not attach: {first}"
    );
    // Keep draining stderr so strace never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    strace
}

/// Parses `PID SECONDS.MICROS name(FD</path>...) = RESULT <DURATION>` lines.
fn parse(log: &Path) -> Vec<Syscall> {
    let text = std::fs::read_to_string(log).expect("reading the strace log");
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Syscall> {
    // strace pads the pid column to a fixed width, so fields are split on runs of spaces.
    let line = line.trim_start();
    let (_pid, rest) = line.split_once(' ')?;
    let (start, call) = rest.trim_start().split_once(' ')?;
    let start: f64 = start.parse().ok()?;
    let open = call.find('(')?;
    let name = call[..open].to_string();
    let path = call[open..]
        .split('<')
        .nth(1)?
        .split('>')
        .next()?
        .to_string();
    let duration: f64 = call
        .rsplit('<')
        .next()?
        .trim_end_matches('>')
        .parse()
        .ok()?;
    let ok = call.contains(") = 0 ");
    Some(Syscall {
        name,
        path,
        start,
        end: start + duration,
        ok,
    })
}

/// The successful `fdatasync` calls on `node_data`'s sled log.
fn log_syncs<'a>(calls: &'a [Syscall], node_data: &str) -> Vec<&'a Syscall> {
    let log_file = format!("{node_data}/db");
    calls
        .iter()
        .filter(|call| call.ok && call.name == "fdatasync" && call.path == log_file)
        .collect()
}

#[test]
fn every_durable_acknowledgement_follows_an_fdatasync_of_the_log() {
    if !strace_available() {
        quorumkv_tests::skip(
            "cluster_durability",
            "strace",
            "strace is not installed (.ci/run installs it from Debian's package)",
            "QUORUMKV_REQUIRE_PRIVILEGES",
        );
        return;
    }
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    let traced = 0;
    let data_dir = cluster.node(traced).config.data_dir.clone();
    let data_dir = data_dir
        .canonicalize()
        .expect("the data directory exists")
        .display()
        .to_string();
    let trace_log = cluster.dir().join("strace.log");
    let mut strace = attach(cluster.pid(traced), &trace_log);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let windows: Vec<(f64, f64)> = runtime.block_on(within(Duration::from_secs(120), async {
        let client = cluster.client().await;
        let options = WriteOptions {
            w: Some(3),
            dw: Some(3),
            timeout_ms: None,
            ..WriteOptions::default()
        };
        let mut windows = Vec::new();
        for i in 0..WRITES {
            let sent = unix_now();
            client
                .put(
                    "default",
                    format!("durable-{i}"),
                    vec![b'v'; 100],
                    None,
                    options,
                )
                .await
                .unwrap_or_else(|e| panic!("durable write {i} failed: {e}"));
            windows.push((sent, unix_now()));
        }
        client.close().await;
        windows
    }));

    let stop_sent = unix_now();
    cluster.stop(traced);
    let _ = strace.wait();

    let calls = parse(&trace_log);
    let syncs = log_syncs(&calls, &data_dir);
    assert!(
        !calls.is_empty(),
        "strace recorded no sync calls at all; is it tracing the node? Its log begins:\n{}",
        std::fs::read_to_string(&trace_log)
            .unwrap_or_default()
            .lines()
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (i, (sent, acked)) in windows.iter().enumerate() {
        let covered = syncs
            .iter()
            .any(|call| call.start >= *sent && call.end <= *acked);
        assert!(
            covered,
            "durable write {i} (sent at {sent:.6}, acknowledged at {acked:.6}) has no fdatasync \
             of {data_dir}/db between the two; sync calls seen: {:#?}",
            calls
                .iter()
                .filter(|c| c.end >= *sent - 0.5 && c.start <= *acked + 0.5)
                .collect::<Vec<_>>()
        );
    }
    assert!(
        syncs.iter().any(|call| call.start >= stop_sent),
        "no fdatasync of the log after SIGTERM: the clean-shutdown record was not synced"
    );
}

#[test]
fn strace_lines_parse() {
    let line = "4242 1764752000.123456 fdatasync(12</tmp/x/n1/data/db>) = 0 <0.001250>";
    assert!(
        parse_line(&line.replace("4242 ", "424  ")).is_some(),
        "padded pid"
    );
    let call = parse_line(line).expect("parses");
    assert_eq!(call.name, "fdatasync");
    assert_eq!(call.path, "/tmp/x/n1/data/db");
    assert!(call.ok);
    assert!((call.end - call.start - 0.00125).abs() < 1e-5);
    let failed =
        "4242 1764752000.123456 fsync(7</d/blobs/9>) = -1 EIO (Input/output error) <0.000010>";
    assert!(!parse_line(failed).expect("parses").ok);
}
