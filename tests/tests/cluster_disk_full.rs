//! A real full disk (hardening defect 5): a node whose storage fails takes itself out of
//! service, and the cluster carries on without it.
//!
//! One node of three keeps its data directory on a tmpfs of [`TMPFS_BYTES`]; the others use
//! the cluster's directory. Writes of [`VALUE_BYTES`] values to distinct keys (every key has
//! every node among its three replicas) fill that tmpfs until sled's log write fails with
//! ENOSPC. What sled 0.34 does then (seen in these tests' node logs): the write of its log
//! buffer fails (`hit error while writing iobuf ... No space left on device`), sled keeps that
//! error and returns it from every later write and flush, and from a read that must rewrite a
//! page; its background flusher stops. It does not panic. So the node must notice at
//! whichever of its storage calls fails first (its flush, a merge, or a read):
//!
//! * [`a_node_whose_disk_fills_up_takes_itself_out_of_service`]: the node coordinates durable
//!   writes, so its own flush (group commit) is usually what meets the full disk. The test then
//!   checks what an operator and a client see: `/ready` answers 503 and the
//!   `quorumkv_in_service` gauge is 0; a request sent straight to the node is refused with the
//!   retryable `Unavailable` (never `Internal`), naming the full disk; the Rust client, given
//!   every node's address, completes writes and reads of keys that node would coordinate by
//!   going to another replica; the other nodes' failure detectors count the node down, and
//!   writes at W = 2 go on; the node's process is alive and no node panicked.
//! * [`a_replica_whose_disk_fills_under_fast_writes_takes_itself_out_of_service`]: the node is
//!   only a replica of writes that ask for no durability, so nothing waits for its flush; sled's
//!   own background writer meets the full disk, and the node's next merge (or read) sees the
//!   error sled kept. The same out-of-service checks apply.
//!
//! Mounting a tmpfs needs root. Without it (or when `mount` fails) the tests say `SKIPPED` on
//! stderr and pass, unless `CI` or `QUORUMKV_REQUIRE_PRIVILEGES=1` is set: then they fail.

use quorumkv_client::protocol::{ErrorKind, Request, Response, CLIENT_ALPN};
use quorumkv_client::{Client, ReadOptions, RequestId, WriteOptions, DEFAULT_KEYSPACE};
use quorumkv_node::metrics::IN_SERVICE;
use quorumkv_tests::cluster::{
    metric_value, wait_until, within, ClusterOptions, RawConnection, TestCluster, PEER_UP,
};
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(120);
const CONDITION_DEADLINE: Duration = Duration::from_secs(30);
/// The failing node's disk. sled writes its log into this sparse file as it goes, so the
/// tmpfs fills after a few MiB of writes.
const TMPFS_BYTES: u64 = 4 << 20;
/// Large values fill the disk in few writes.
const VALUE_BYTES: usize = 128 << 10;
/// A bound on the filling: many times what fits on the tmpfs.
const FILL_WRITES_MAX: usize = 400;
/// What the OS says about ENOSPC; the node's refusal passes it on.
const NO_SPACE: &str = "No space left on device";

// ----- privileges and the tmpfs --------------------------------------------------------------

/// A tmpfs of a given size, mounted on a fresh directory and unmounted on drop (also when the
/// test panics). Declare it before the cluster, so the cluster's processes, which hold files
/// on it open, are gone by the time it drops.
struct Tmpfs {
    mount_point: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes`, or says why it cannot.
    fn mount(bytes: u64) -> Result<Tmpfs, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not running as root (mounting a tmpfs needs it)".into());
        }
        let mount_point = tempfile::Builder::new()
            .prefix("quorumkv-disk-full-")
            .tempdir()
            .map_err(|e| format!("cannot create a mount point: {e}"))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(mount_point.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "`mount -t tmpfs` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs { mount_point })
    }

    /// Mounts a tmpfs for `test`, or prints `SKIPPED: <test>: <reason>` and returns `None`;
    /// panics instead of skipping when CI requires privileged tests to run.
    fn mount_or_skip(test: &str, bytes: u64) -> Option<Tmpfs> {
        match Tmpfs::mount(bytes) {
            Ok(tmpfs) => Some(tmpfs),
            Err(reason) => {
                quorumkv_tests::skip(test, "a tmpfs", &reason, "QUORUMKV_REQUIRE_PRIVILEGES");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.mount_point.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.path().to_path_buf();
        let unmounted = Command::new("umount")
            .arg(&path)
            .status()
            .is_ok_and(|status| status.success());
        if !unmounted {
            // Something still holds a file open: detach the mount now, the kernel frees it
            // when the last file closes. The TempDir then removes the empty mount point.
            let lazy = Command::new("umount").arg("--lazy").arg(&path).status();
            eprintln!("umount {} failed; lazy unmount: {lazy:?}", path.display());
        }
    }
}

// ----- looking at a node ---------------------------------------------------------------------

/// The HTTP status of `GET path` on an admin endpoint.
fn http_status(admin: SocketAddr, path: &str) -> Result<u16, String> {
    let mut stream =
        TcpStream::connect_timeout(&admin, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))
}

/// Node `index`'s answer to `/ready`.
fn ready_status(cluster: &TestCluster, index: usize) -> u16 {
    http_status(cluster.node(index).admin(), "/ready")
        .unwrap_or_else(|e| panic!("asking node {index} /ready: {e}\n{}", cluster.log_tails()))
}

/// Node `index`'s `quorumkv_in_service` gauge.
fn in_service(cluster: &TestCluster, index: usize) -> Option<f64> {
    metric_value(&cluster.metrics(index), IN_SERVICE, &[])
}

/// Whether `observer`'s failure detector counts `peer` down.
fn believes_down(cluster: &TestCluster, observer: usize, peer: usize) -> bool {
    let id = cluster.node(peer).id.to_string();
    metric_value(&cluster.metrics(observer), PEER_UP, &[("peer", &id)]) == Some(0.0)
}

/// Checks that node `index` still runs and that no node's log shows a panic.
fn assert_alive_and_no_panic(cluster: &mut TestCluster, index: usize) {
    if let Some(status) = cluster.exit_status(index) {
        panic!(
            "node {index} exited ({status}) instead of staying up out of service\n{}",
            cluster.log_tails()
        );
    }
    for node in 0..cluster.len() {
        let log = cluster.log(node);
        assert!(
            !log.contains("panicked"),
            "node {node} panicked:\n{}",
            cluster.log_tails()
        );
    }
}

// ----- the cluster ---------------------------------------------------------------------------

/// A cluster whose node `victim` keeps its data on `tmpfs`. Peers ping every 200 ms and count a
/// silent peer down after 2 s, so the test sees the failure detector act soon.
fn start_cluster(tmpfs: &Tmpfs, victim: usize) -> TestCluster {
    let options = ClusterOptions {
        ping_interval_ms: Some(200),
        peer_down_after_ms: Some(2000),
        data_dirs: BTreeMap::from([(victim, PathBuf::from(tmpfs.path()))]),
        ..ClusterOptions::default()
    };
    TestCluster::start(3, options)
}

fn write(w: u8, dw: u8) -> WriteOptions {
    WriteOptions {
        w: Some(w),
        dw: Some(dw),
        timeout_ms: None,
        ..WriteOptions::default()
    }
}

/// Distinct keys `{prefix}{i}` whose preference list starts at `coordinator` (the client sends
/// them there first).
fn keys_coordinated_by<'a>(
    cluster: &'a TestCluster,
    coordinator: usize,
    prefix: &'a str,
) -> impl Iterator<Item = String> + 'a {
    (0..)
        .map(move |i| format!("{prefix}{i}"))
        .filter(move |key| cluster.replicas(DEFAULT_KEYSPACE, key.as_bytes())[0] == coordinator)
}

/// Writes large values to keys coordinated by `coordinator` until node `victim` answers
/// `/ready` with 503; returns how many writes that took. Every write must succeed: a write that
/// meets the full disk at `victim` still has two healthy replicas, and when `victim` refuses to
/// coordinate, the client goes to another one.
async fn fill_until_out_of_service(
    cluster: &TestCluster,
    client: &Client,
    coordinator: usize,
    victim: usize,
    options: WriteOptions,
) -> usize {
    let value = vec![b'x'; VALUE_BYTES];
    let keys = keys_coordinated_by(cluster, coordinator, "fill-").take(FILL_WRITES_MAX);
    for (count, key) in keys.enumerate() {
        client
            .put(DEFAULT_KEYSPACE, &key, value.clone(), None, options)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "fill write {} ({key}) failed: {e:?}\n{}",
                    count + 1,
                    cluster.log_tails()
                )
            });
        match ready_status(cluster, victim) {
            200 => {}
            503 => return count + 1,
            other => panic!("node {victim} answered /ready with {other}"),
        }
    }
    panic!(
        "node {victim} was still ready after {FILL_WRITES_MAX} writes of {VALUE_BYTES} bytes \
         to a {TMPFS_BYTES}-byte disk\n{}",
        cluster.log_tails()
    );
}

/// What an operator sees of a node out of service: `/ready` 503, the gauge at 0.
fn assert_out_of_service(cluster: &TestCluster, victim: usize) {
    assert_eq!(ready_status(cluster, victim), 503);
    assert_eq!(
        in_service(cluster, victim),
        Some(0.0),
        "{IN_SERVICE} of node {victim}"
    );
}

// ----- the tests -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_disk_fills_up_takes_itself_out_of_service() {
    let test = "a_node_whose_disk_fills_up_takes_itself_out_of_service";
    let Some(tmpfs) = Tmpfs::mount_or_skip(test, TMPFS_BYTES) else {
        return;
    };
    let victim = 0;
    let mut cluster = start_cluster(&tmpfs, victim);
    within(TEST_LIMIT, async {
        assert_eq!(ready_status(&cluster, victim), 200);
        assert_eq!(in_service(&cluster, victim), Some(1.0));
        let client = cluster.client().await;

        // Durable writes (dw = 2) that the victim coordinates: each waits for the victim's
        // own flush, and two other replicas keep each durable when that flush fails.
        let writes =
            fill_until_out_of_service(&cluster, &client, victim, victim, write(2, 2)).await;
        eprintln!("node {victim} went out of service after {writes} fill writes");
        assert_out_of_service(&cluster, victim);

        // 2. The node refuses to coordinate, with a retryable error that names the cause.
        let key = cluster.find_key(DEFAULT_KEYSPACE, "direct-", |replicas| {
            replicas[0] == victim
        });
        let raw = RawConnection::connect(
            cluster.node(victim).quic(),
            &cluster.client_identity(),
            CLIENT_ALPN,
            "node.quorumkv",
        )
        .await
        .expect("a raw connection to the node out of service");
        let requests = [
            Request::Put {
                keyspace: DEFAULT_KEYSPACE.into(),
                key: key.clone().into_bytes(),
                value: b"refused".to_vec(),
                context: None,
                request_id: RequestId([5; 16]),
                options: write(1, 0),
            },
            Request::Get {
                keyspace: DEFAULT_KEYSPACE.into(),
                key: key.clone().into_bytes(),
                options: ReadOptions {
                    r: Some(1),
                    timeout_ms: None,
                    ..ReadOptions::default()
                },
            },
        ];
        for request in &requests {
            match raw.request(request).await {
                Response::Error(error) => {
                    assert_eq!(error.kind, ErrorKind::Unavailable, "{request:?}: {error:?}");
                    assert!(
                        error.message.contains(NO_SPACE),
                        "the refusal should name the full disk: {}",
                        error.message
                    );
                }
                other => panic!("{request:?} at the node out of service: {other:?}"),
            }
        }
        raw.close().await;

        // 3. The client, given every address, goes to another replica for keys the node out
        // of service would coordinate.
        let keys: Vec<String> = keys_coordinated_by(&cluster, victim, "elsewhere-")
            .take(5)
            .collect();
        for key in &keys {
            client
                .put(
                    DEFAULT_KEYSPACE,
                    key,
                    key.clone().into_bytes(),
                    None,
                    write(2, 1),
                )
                .await
                .unwrap_or_else(|e| panic!("w=2 put of {key}: {e:?}"));
            let read = client
                .get(
                    DEFAULT_KEYSPACE,
                    key,
                    ReadOptions {
                        r: Some(2),
                        timeout_ms: None,
                        ..ReadOptions::default()
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("r=2 get of {key}: {e:?}"));
            let values: Vec<&[u8]> = read.siblings.iter().map(|s| s.value.as_slice()).collect();
            assert_eq!(values, [key.as_bytes()], "{key}");
        }

        // 4. It answers no pings, so the other nodes count it down, and W = 2 goes on: writes
        // coordinated by each of them, with the node out of service on every preference list.
        wait_until(
            "both other nodes count the node out of service down",
            CONDITION_DEADLINE,
            || {
                [1, 2]
                    .iter()
                    .all(|observer| believes_down(&cluster, *observer, victim))
            },
        );
        for coordinator in [1, 2] {
            let key = cluster.find_key(DEFAULT_KEYSPACE, "after-down-", |replicas| {
                replicas[0] == coordinator
            });
            client
                .put(DEFAULT_KEYSPACE, &key, b"w2".to_vec(), None, write(2, 2))
                .await
                .unwrap_or_else(|e| panic!("w=2 dw=2 put of {key}: {e:?}"));
        }
        // Still out of service: a full disk does not heal itself.
        assert_out_of_service(&cluster, victim);
        client.close().await;
    })
    .await;
    // 5. Out of service, not crashed.
    assert_alive_and_no_panic(&mut cluster, victim);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_disk_fills_under_fast_writes_takes_itself_out_of_service() {
    let test = "a_replica_whose_disk_fills_under_fast_writes_takes_itself_out_of_service";
    let Some(tmpfs) = Tmpfs::mount_or_skip(test, TMPFS_BYTES) else {
        return;
    };
    let victim = 0;
    let coordinator = 1;
    let mut cluster = start_cluster(&tmpfs, victim);
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        // dw = 0: the victim merges each write in memory and answers at once; only sled's own
        // background writer touches the disk, and its failure surfaces at a later merge.
        let writes =
            fill_until_out_of_service(&cluster, &client, coordinator, victim, write(2, 0)).await;
        eprintln!("node {victim} went out of service after {writes} fill writes");
        assert_out_of_service(&cluster, victim);
        wait_until(
            "both other nodes count the node out of service down",
            CONDITION_DEADLINE,
            || {
                [1, 2]
                    .iter()
                    .all(|observer| believes_down(&cluster, *observer, victim))
            },
        );
        client.close().await;
    })
    .await;
    assert_alive_and_no_panic(&mut cluster, victim);
}
