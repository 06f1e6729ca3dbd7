//! One node of three killed with `kill -9`: CLI commands and a long-lived client keep answering
//! at close to their usual latency (issue 8, defect 7).
//!
//! Before the client learned to fail over, each CLI command waited out a connect timeout on the
//! dead node (first as a seed, then as the key's first replica: 4 to 6 s in all), and a
//! long-lived client connected to the node before it died waited a whole request timeout for
//! its first request there. Here every key's preference list starts at the dead node, which is
//! also the first seed the CLI is given, the worst case for both.
//!
//! The bounds are generous (a healthy command takes about a tenth of [`BOUND`] on a 2-core
//! machine) and only assert that nothing waits out a timeout; the figures themselves are
//! measured in BENCHMARKS.md, not here.

use quorumkv_client::{Client, ReadOptions, WriteOptions, DEFAULT_KEYSPACE};
use quorumkv_tests::cluster::{run_cli, within, CliOutput, ClusterOptions, TestCluster};
use std::process::Command;
use std::time::{Duration, Instant};

/// Longest a command or request may take with one node of three dead.
const BOUND: Duration = Duration::from_millis(1500);
/// Bounds a CLI process that hangs (far above [`BOUND`]: the assertion says what went wrong).
const CLI_LIMIT: Duration = Duration::from_secs(60);
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// The node killed: `n1`, also the first address in `QUORUMKV_NODES`.
const VICTIM: usize = 0;

/// Runs a CLI command to completion on a blocking thread; returns its output and duration.
async fn timed_cli(mut command: Command) -> (CliOutput, Duration) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let output = run_cli(&mut command, CLI_LIMIT);
        (output, started.elapsed())
    })
    .await
    .expect("the CLI thread panicked")
}

fn assert_fast(what: &str, elapsed: Duration, cluster: &TestCluster) {
    eprintln!("{what}: {} ms", elapsed.as_millis());
    assert!(
        elapsed < BOUND,
        "{what} took {elapsed:?} with one node of three dead (bound {BOUND:?})\n{}",
        cluster.log_tails()
    );
}

/// Connections to every node, and enough answered reads for the client to know its latencies.
async fn warm_up(client: &Client, keys: &[String]) {
    for round in 0..8 {
        for key in keys {
            client
                .put(
                    DEFAULT_KEYSPACE,
                    key,
                    format!("warm-{round}").into_bytes(),
                    None,
                    WriteOptions::default(),
                )
                .await
                .expect("a put with every node up");
            client
                .get(DEFAULT_KEYSPACE, key, ReadOptions::default())
                .await
                .expect("a get with every node up");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_node_of_three_killed_cli_commands_and_clients_answer_without_stalling() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    // Keys whose first replica (the coordinator a client picks first) is the victim.
    let victim_keys: Vec<String> = (0..4)
        .map(|i| {
            cluster.find_key(DEFAULT_KEYSPACE, &format!("failover-{i}-"), |replicas| {
                replicas[0] == VICTIM
            })
        })
        .collect();
    // Keys coordinated by each of the others, so the warm-up reaches every node.
    let other_keys: Vec<String> = (1..3)
        .map(|node| {
            cluster.find_key(DEFAULT_KEYSPACE, &format!("other-{node}-"), |replicas| {
                replicas[0] == node
            })
        })
        .collect();
    let warm_keys: Vec<String> = victim_keys.iter().chain(&other_keys).cloned().collect();
    within(TEST_LIMIT, async {
        // Two long-lived clients, connected to the victim before it dies: one is first asked
        // to read after the kill, the other to write (a write is never hedged).
        let reader = cluster.client().await;
        let writer = cluster.client().await;
        warm_up(&reader, &warm_keys).await;
        warm_up(&writer, &warm_keys).await;

        cluster.kill(VICTIM);

        for (client, first) in [(&reader, "get"), (&writer, "put")] {
            for (i, key) in victim_keys.iter().enumerate() {
                let ops: [&str; 2] = if first == "get" {
                    ["get", "put"]
                } else {
                    ["put", "get"]
                };
                for op in ops {
                    let started = Instant::now();
                    match op {
                        "get" => {
                            client
                                .get(DEFAULT_KEYSPACE, key, ReadOptions::default())
                                .await
                                .unwrap_or_else(|e| panic!("get {key} with a node dead: {e}"));
                        }
                        _ => {
                            client
                                .put(
                                    DEFAULT_KEYSPACE,
                                    key,
                                    format!("after-{i}").into_bytes(),
                                    None,
                                    WriteOptions::default(),
                                )
                                .await
                                .unwrap_or_else(|e| panic!("put {key} with a node dead: {e}"));
                        }
                    }
                    assert_fast(
                        &format!("long-lived client ({first} first): {op} {key}"),
                        started.elapsed(),
                        &cluster,
                    );
                }
            }
        }

        // Fresh processes: each knows nothing, and n1 is their first seed.
        for (i, key) in victim_keys.iter().enumerate() {
            let value = format!("cli-{i}");
            let mut put = cluster.cli();
            put.args(["put", key, &value]);
            let (output, elapsed) = timed_cli(put).await;
            assert_eq!(output.code, Some(0), "quorumkv put {key}: {output:?}");
            assert_fast(&format!("CLI put {key}"), elapsed, &cluster);

            let mut get = cluster.cli();
            get.args(["get", key, "--json"]);
            let (output, elapsed) = timed_cli(get).await;
            assert_eq!(output.code, Some(0), "quorumkv get {key}: {output:?}");
            let siblings = output.stdout_json()["siblings"].clone();
            assert!(
                siblings
                    .as_array()
                    .is_some_and(|values| values.iter().any(|v| v == value.as_str())),
                "get {key} should show {value}: {output:?}"
            );
            assert_fast(&format!("CLI get {key}"), elapsed, &cluster);
        }
        let mut delete = cluster.cli();
        delete.args(["delete", &victim_keys[0]]);
        let (output, elapsed) = timed_cli(delete).await;
        assert_eq!(output.code, Some(0), "quorumkv delete: {output:?}");
        assert_fast("CLI delete", elapsed, &cluster);

        reader.close().await;
        writer.close().await;
    })
    .await;
}
