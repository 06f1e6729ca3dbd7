//! Anti-entropy across real processes: a node whose data directory is wiped while it is down
//! comes back as a new incarnation with nothing, and Merkle-tree exchanges give it every key
//! back (its per-range roots, read from `/sync-status`, become equal to its peers' before anyone
//! reads); writes made after its return are not lost.

use quorumkv_client::protocol::{ReadOptions, WriteOptions};
use quorumkv_client::{Client, DEFAULT_KEYSPACE};
use quorumkv_node::config::Config;
use quorumkv_tests::cluster::{run_cli, wait_until, within, ClusterOptions, TestCluster};
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(240);
/// With exchanges every ~100 ms, four at a time, 64 ranges take a few seconds per cycle; the
/// rest is slack for a busy machine.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(90);
const KEYS: usize = 200;
const REWRITTEN: usize = 50;

fn short_intervals(_index: usize, config: &mut Config) {
    config.anti_entropy.interval_ms = 100;
    config.anti_entropy.exchanges_max = 4;
}

fn write(w: u8) -> WriteOptions {
    WriteOptions {
        w: Some(w),
        dw: Some(1),
        ..WriteOptions::default()
    }
}

fn read(r: u8) -> ReadOptions {
    ReadOptions {
        r: Some(r),
        ..ReadOptions::default()
    }
}

async fn client_for(cluster: &TestCluster) -> Client {
    cluster
        .client_builder()
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("connecting a client")
}

/// Waits until every node has built its trees, holds at least `keys` keys (the harness writes a
/// few of its own while it waits for the cluster to connect) and reports the same digest of its
/// range roots (with three nodes and N = 3 every node replicates every range).
fn wait_converged(cluster: &TestCluster, keys: u64) {
    let mut last = Vec::new();
    let converged = |last: &mut Vec<String>| {
        let statuses: Vec<_> = (0..cluster.len()).map(|i| cluster.sync_status(i)).collect();
        *last = statuses
            .iter()
            .map(|s| {
                s.as_ref().map_or("unavailable".to_owned(), |s| {
                    format!(
                        "{} built={} keys={} digest={}",
                        s["node"],
                        s["trees_built"],
                        s["keyspaces"][DEFAULT_KEYSPACE]["keys"],
                        s["digest"]
                    )
                })
            })
            .collect();
        let Some(Some(first)) = statuses.first() else {
            return false;
        };
        statuses.iter().all(|status| {
            status.as_ref().is_some_and(|s| {
                s["trees_built"] == true
                    && s["keyspaces"][DEFAULT_KEYSPACE]["keys"]
                        .as_u64()
                        .is_some_and(|held| held >= keys)
                    && s["digest"] == first["digest"]
                    && s["keyspaces"] == first["keyspaces"]
            })
        })
    };
    let deadline = std::time::Instant::now() + CONVERGE_DEADLINE;
    while !converged(&mut last) {
        assert!(
            std::time::Instant::now() < deadline,
            "replicas did not converge on {keys} keys within {CONVERGE_DEADLINE:?}: {last:#?}\n{}",
            cluster.log_tails()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_node_gets_every_key_back_from_anti_entropy_and_later_writes_survive() {
    let mut cluster = TestCluster::start(
        3,
        ClusterOptions {
            patch: Some(short_intervals),
            ..ClusterOptions::default()
        },
    );
    let victim = 2;
    within(TEST_LIMIT, async {
        let client = client_for(&cluster).await;
        for i in 0..KEYS {
            client
                .put(
                    DEFAULT_KEYSPACE,
                    format!("key-{i}"),
                    format!("v{i}"),
                    None,
                    write(3),
                )
                .await
                .expect("w=3 with every node up");
        }
        tokio::task::block_in_place(|| wait_converged(&cluster, KEYS as u64));
        client.close().await;

        // The victim dies, loses its whole data directory, and starts again from nothing.
        cluster.kill(victim);
        let data_dir = cluster.local().nodes[victim].config.data_dir.clone();
        std::fs::remove_dir_all(&data_dir).expect("wiping the data directory");
        std::fs::create_dir_all(&data_dir).expect("recreating the data directory");
        cluster.restart(victim);
        wait_until(
            "the restarted node answers /sync-status",
            Duration::from_secs(30),
            || cluster.sync_status(victim).is_some(),
        );

        // No read, no write: anti-entropy alone brings every key back. The victim's counters
        // started at zero with its process, so every key it holds came through an exchange.
        tokio::task::block_in_place(|| wait_converged(&cluster, KEYS as u64));
        let repaired = cluster.metric(victim, "quorumkv_anti_entropy_keys_repaired_total", &[]);
        assert!(
            repaired >= KEYS as f64,
            "the wiped node merged {repaired} keys from anti-entropy, expected {KEYS}"
        );

        // Writes after its return: rewrites with context and new keys, all replicas up.
        let client = client_for(&cluster).await;
        for i in 0..REWRITTEN {
            let key = format!("key-{i}");
            let current = client
                .get(DEFAULT_KEYSPACE, &key, read(2))
                .await
                .expect("reading before a rewrite");
            client
                .put(
                    DEFAULT_KEYSPACE,
                    &key,
                    format!("w{i}"),
                    Some(&current.context),
                    write(2),
                )
                .await
                .expect("a rewrite after the return");
            client
                .put(
                    DEFAULT_KEYSPACE,
                    format!("after-{i}"),
                    format!("a{i}"),
                    None,
                    write(2),
                )
                .await
                .expect("a new key after the return");
        }
        tokio::task::block_in_place(|| wait_converged(&cluster, (KEYS + REWRITTEN) as u64));
        // The operator's view of the same: `quorumkv admin sync-status`.
        let admin: Vec<String> = (0..cluster.len())
            .map(|i| cluster.local().nodes[i].admin().to_string())
            .collect();
        let output = tokio::task::block_in_place(|| {
            run_cli(
                cluster
                    .cli()
                    .args(["admin", "sync-status", "--json", "--admin"])
                    .arg(admin.join(",")),
                Duration::from_secs(30),
            )
        });
        assert_eq!(output.code, Some(0), "{}", output.stderr);
        let report = output.stdout_json();
        assert_eq!(report["digests_equal"], true, "{report}");
        assert_eq!(report["nodes"].as_array().map(Vec::len), Some(3));

        for i in 0..KEYS {
            let got = client
                .get(DEFAULT_KEYSPACE, format!("key-{i}"), read(3))
                .await
                .expect("reading every key");
            let values: Vec<String> = got
                .siblings
                .iter()
                .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                .collect();
            let expected = if i < REWRITTEN {
                format!("w{i}")
            } else {
                format!("v{i}")
            };
            assert_eq!(values, [expected], "key-{i}");
        }
        for i in 0..REWRITTEN {
            let got = client
                .get(DEFAULT_KEYSPACE, format!("after-{i}"), read(3))
                .await
                .expect("reading a new key");
            assert_eq!(got.siblings.len(), 1, "after-{i}");
            assert_eq!(got.siblings[0].value, format!("a{i}").into_bytes());
        }
        client.close().await;
    })
    .await;
}
