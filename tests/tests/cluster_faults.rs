//! Real processes, real faults: kill -9 against per-request quorums and durable writes, and
//! SIGSTOP/SIGCONT against the failure detector.

use quorumkv_client::protocol::{ReadOptions, WriteOptions};
use quorumkv_client::{Error, GetResult, DEFAULT_KEYSPACE};
use quorumkv_tests::cluster::{
    metric_value, run_cli, wait_until, wait_until_async, within, ClusterOptions, TestCluster,
    PEER_UP,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(150);
const CLI_LIMIT: Duration = Duration::from_secs(30);
/// The coordinator timeout the CLI asks for when a quorum is expected to fail: the CLI waits
/// one second longer, so it hears the node's QuorumNotReached rather than timing out itself.
const CLI_TIMEOUT_MS: &str = "3000";
const CONDITION_DEADLINE: Duration = Duration::from_secs(30);

fn has_value(read: &GetResult, value: &str) -> bool {
    read.siblings
        .iter()
        .any(|sibling| sibling.value == value.as_bytes())
}

fn write(w: u8, dw: u8) -> WriteOptions {
    WriteOptions {
        w: Some(w),
        dw: Some(dw),
        timeout_ms: None,
        ..WriteOptions::default()
    }
}

fn read(r: u8) -> ReadOptions {
    ReadOptions {
        r: Some(r),
        timeout_ms: None,
        ..ReadOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_request_chooses_its_quorum_and_a_dead_node_cannot_count() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    // n1 coordinates the key (the client sends to the first replica), n3 is its last replica.
    let key = cluster.find_key(DEFAULT_KEYSPACE, "quorum-", |replicas| {
        replicas == [0, 1, 2]
    });
    let (first_victim, second_victim) = (2, 1);
    within(TEST_LIMIT, async {
        let client = cluster.fault_tolerant_client().await;
        client
            .put(
                DEFAULT_KEYSPACE,
                &key,
                b"before".to_vec(),
                None,
                write(3, 1),
            )
            .await
            .expect("w=3 with every node up");

        cluster.kill(first_victim);
        match client
            .put(DEFAULT_KEYSPACE, &key, b"lost?".to_vec(), None, write(3, 1))
            .await
        {
            Err(Error::QuorumNotReached {
                required: 3,
                acked: 2,
                ..
            }) => {}
            other => {
                panic!("w=3 with a node dead: expected QuorumNotReached 2 of 3, got {other:?}")
            }
        }
        let cli = run_cli(
            cluster.cli().args([
                "put",
                "--json",
                "--w",
                "3",
                "--timeout-ms",
                CLI_TIMEOUT_MS,
                &key,
                "cli-lost?",
            ]),
            CLI_LIMIT,
        );
        assert_eq!(cli.code, Some(3), "{cli:?}");
        assert_eq!(cli.stderr.trim_end().lines().count(), 1, "{cli:?}");
        let error = &cli.stderr_json()["error"];
        assert_eq!(error["kind"], "quorum_not_reached", "{cli:?}");
        assert_eq!(
            (error["required"].as_u64(), error["acked"].as_u64()),
            (Some(3), Some(2)),
            "{cli:?}"
        );
        client
            .put(
                DEFAULT_KEYSPACE,
                &key,
                b"after-one-kill".to_vec(),
                None,
                write(2, 1),
            )
            .await
            .expect("w=2 with two nodes up");

        cluster.kill(second_victim);
        let got = client
            .get(DEFAULT_KEYSPACE, &key, read(1))
            .await
            .expect("r=1 with one node up");
        assert!(
            has_value(&got, "after-one-kill"),
            "r=1 misses the w=2 write: {got:?}"
        );
        match client.get(DEFAULT_KEYSPACE, &key, read(2)).await {
            Err(Error::QuorumNotReached {
                required: 2,
                acked: 1,
                ..
            }) => {}
            other => {
                panic!("r=2 with one node up: expected QuorumNotReached 1 of 2, got {other:?}")
            }
        }
        let cli = run_cli(
            cluster.cli().args([
                "get",
                "--json",
                "--r",
                "2",
                "--timeout-ms",
                CLI_TIMEOUT_MS,
                &key,
            ]),
            CLI_LIMIT,
        );
        assert_eq!(cli.code, Some(3), "{cli:?}");
        let error = &cli.stderr_json()["error"];
        assert_eq!(
            (error["required"].as_u64(), error["acked"].as_u64()),
            (Some(2), Some(1)),
            "{cli:?}"
        );
        let cli = run_cli(
            cluster.cli().args(["get", "--json", "--r", "1", &key]),
            CLI_LIMIT,
        );
        assert_eq!(cli.code, Some(0), "{cli:?}");
        let siblings = cli.stdout_json()["siblings"].clone();
        assert!(
            siblings
                .as_array()
                .is_some_and(|s| s.contains(&"after-one-kill".into())),
            "{cli:?}"
        );
        client.close().await;
    })
    .await;
}

/// What the writers saw.
#[derive(Debug, Default)]
struct WriteLog {
    acknowledged: Vec<String>,
    failed: BTreeMap<&'static str, usize>,
}

/// Durable writes (w=2, dw=2) of distinct keys stream in from 8 concurrent writers while one
/// node (n2) is killed with SIGKILL; when the stream has ended, n2 is started again on its data
/// directory. Checked afterwards, for every write the client saw acknowledged:
///
/// 1. a read with r=3 (all three replicas answered, the restarted n2 among them) returns it;
/// 2. after n3, which never crashed, is killed as well, a read with r=2 (n1 and the restarted
///    n2) still returns it. dw=2 put every acknowledged write on the disks of two replicas, at
///    least one of which is n1 or n2, so this holds exactly when n2 kept every write it had
///    acknowledged as durable before its crash (the writes acknowledged by n2 and n3 alone are
///    the ones that test it).
///
/// Writes that failed may or may not be there; they are counted, not checked.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_durable_writes_survive_kill_9_and_restart() {
    const BEFORE_KILL: usize = 100;
    const AFTER_KILL: usize = 100;
    const WRITERS: usize = 8;
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    let (victim, survivor_to_kill) = (1, 2);
    within(TEST_LIMIT, async {
        let client = cluster.fault_tolerant_client().await;
        let log = Arc::new(Mutex::new(WriteLog::default()));
        let acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let (client, log, acked, stop) =
                (client.clone(), log.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("durable-{writer}-{seq}");
                    seq += 1;
                    match client
                        .put(
                            DEFAULT_KEYSPACE,
                            &key,
                            key.clone().into_bytes(),
                            None,
                            write(2, 2),
                        )
                        .await
                    {
                        Ok(_) => {
                            log.lock().expect("log lock").acknowledged.push(key);
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            *log.lock()
                                .expect("log lock")
                                .failed
                                .entry(e.kind())
                                .or_default() += 1
                        }
                    }
                }
            }));
        }
        let count = |acked: &AtomicUsize| acked.load(Ordering::Relaxed);
        wait_until_async(
            "writes are acknowledged before the kill",
            CONDITION_DEADLINE,
            || {
                let n = count(&acked);
                async move {
                    if n >= BEFORE_KILL {
                        Ok(())
                    } else {
                        Err(format!("{n} acknowledged"))
                    }
                }
            },
        )
        .await;
        cluster.kill(victim);
        let at_kill = count(&acked);
        wait_until_async(
            "writes are acknowledged after the kill",
            Duration::from_secs(60),
            || {
                let n = count(&acked);
                async move {
                    if n >= at_kill + AFTER_KILL {
                        Ok(())
                    } else {
                        Err(format!("{} since the kill", n - at_kill))
                    }
                }
            },
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.await.expect("writer task");
        }
        client.close().await;
        let log = std::mem::take(&mut *log.lock().expect("log lock"));
        eprintln!(
            "{} writes acknowledged ({at_kill} before the kill), failed by kind: {:?}",
            log.acknowledged.len(),
            log.failed
        );

        cluster.restart(victim);
        let client = cluster.fault_tolerant_client().await;
        let mut duplicates = 0;
        for key in &log.acknowledged {
            let got = client
                .get(DEFAULT_KEYSPACE, key, read(3))
                .await
                .unwrap_or_else(|e| panic!("r=3 {key}: {e}"));
            assert!(
                has_value(&got, key),
                "acknowledged write {key} missing from an r=3 read: {got:?}"
            );
            duplicates += usize::from(got.siblings.len() > 1);
        }
        eprintln!("{duplicates} keys hold their one write as more than one sibling");
        client.close().await;

        cluster.kill(survivor_to_kill);
        let client = cluster.fault_tolerant_client().await;
        for key in &log.acknowledged {
            let got = client
                .get(DEFAULT_KEYSPACE, key, read(2))
                .await
                .unwrap_or_else(|e| panic!("r=2 {key}: {e}"));
            assert!(
                has_value(&got, key),
                "acknowledged durable write {key} missing from n1 and the restarted n2: {got:?}"
            );
        }
        client.close().await;
    })
    .await;
}

/// Whether `observer` reports `peer` with the given `quorumkv_peer_up` value.
fn peer_up_is(cluster: &TestCluster, observer: usize, peer: usize, value: f64) -> bool {
    let id = cluster.node(peer).id.to_string();
    metric_value(&cluster.metrics(observer), PEER_UP, &[("peer", &id)]) == Some(value)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_node_is_detected_down_and_comes_back_up() {
    let options = ClusterOptions {
        ping_interval_ms: Some(200),
        peer_down_after_ms: Some(1000),
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(3, options);
    let paused = 2;
    let live = [0, 1];
    // One key coordinated by each live node, and one by the node that will be paused.
    let keys: Vec<String> = live
        .iter()
        .map(|coordinator| {
            cluster.find_key(DEFAULT_KEYSPACE, "detect-", |replicas| {
                replicas[0] == *coordinator
            })
        })
        .collect();
    let paused_key = cluster.find_key(DEFAULT_KEYSPACE, "detect-", |replicas| {
        replicas[0] == paused
    });
    within(TEST_LIMIT, async {
        let client = cluster.fault_tolerant_client().await;
        for key in &keys {
            client.put(DEFAULT_KEYSPACE, key, b"all-up".to_vec(), None, write(3, 1)).await.expect("w=3 with every node up");
        }

        cluster.pause(paused);
        wait_until("both live nodes report the paused node down", CONDITION_DEADLINE, || {
            live.iter().all(|observer| peer_up_is(&cluster, *observer, paused, 0.0))
        });
        for key in &keys {
            client
                .put(DEFAULT_KEYSPACE, key, b"paused".to_vec(), None, write(2, 2))
                .await
                .unwrap_or_else(|e| panic!("w=2 dw=2 on {key} with one node paused: {e}"));
            match client.put(DEFAULT_KEYSPACE, key, b"never".to_vec(), None, write(3, 1)).await {
                Err(Error::QuorumNotReached { required: 3, acked: 2, .. }) => {}
                other => panic!("w=3 on {key} with one node paused: expected QuorumNotReached 2 of 3, got {other:?}"),
            }
        }

        cluster.resume(paused);
        wait_until("both live nodes report the resumed node up", CONDITION_DEADLINE, || {
            live.iter().all(|observer| peer_up_is(&cluster, *observer, paused, 1.0))
        });
        // Every node, the resumed one included, coordinates a w=3 write again. The resumed node
        // may first believe its peers down (its clock ran while it was stopped) until it hears
        // from them, so this waits for success rather than demanding it at once.
        for key in keys.iter().chain([&paused_key]) {
            wait_until_async(&format!("a w=3 write of {key} succeeds"), CONDITION_DEADLINE, || {
                let client = client.clone();
                async move {
                    client
                        .put(DEFAULT_KEYSPACE, key, b"resumed".to_vec(), None, write(3, 1))
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await;
        }
        client.close().await;
    })
    .await;
}

/// After a node is killed and restarted, its peers must talk to the new process, not to the
/// dead one's connection. The new process cannot reset connections it has no state for, so
/// without help they would keep writing to their pre-crash QUIC connection until it idles out
/// (`IDLE_TIMEOUT`, 30 s after the kill): the restarted node would hear nothing from them,
/// believe them down and be unable to coordinate W=3. The help: the restarted node's hello
/// carries a new instance id, and each peer re-dials it on seeing one.
///
/// The deadline (10 s, twice `peer_down_after_ms`) is well below that idle timeout; it
/// bounds a liveness condition, it does not measure speed.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_hears_its_peers_before_their_old_connections_idle_out() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    let restarted = 1;
    let own_key = cluster.find_key(DEFAULT_KEYSPACE, "restart-", |replicas| {
        replicas[0] == restarted
    });
    let peer_key = cluster.find_key(DEFAULT_KEYSPACE, "restart-", |replicas| replicas[0] == 0);
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        client
            .put(
                DEFAULT_KEYSPACE,
                &own_key,
                b"before".to_vec(),
                None,
                write(3, 1),
            )
            .await
            .expect("w=3 before the kill");
        client.close().await;
        cluster.kill(restarted);
        cluster.restart_process(restarted);
        // A fresh client, so the request goes to the restarted process's own address first.
        let client = cluster.client().await;
        for (key, coordinator) in [
            (&own_key, "the restarted node"),
            (&peer_key, "a peer of the restarted node"),
        ] {
            wait_until_async(
                &format!("a w=3 write coordinated by {coordinator} succeeds"),
                Duration::from_secs(10),
                || {
                    let client = client.clone();
                    async move {
                        client
                            .put(DEFAULT_KEYSPACE, key, b"after".to_vec(), None, write(3, 1))
                            .await
                            .map_err(|e| e.to_string())
                    }
                },
            )
            .await;
        }
        client.close().await;
    })
    .await;
}
