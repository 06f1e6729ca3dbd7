//! Read repair across real processes (issue 7, "Multi-process tests"): a replica made stale by
//! missing a write while it was down, then one read through another node, and the replica
//! holds the current version. `quorumkv admin replicas` shows each replica's own copy without
//! repairing it, so the test can look at the stale replica before the read and watch it catch
//! up after.
//!
//! Nothing else repairs the key here, or the test would not tell read repair apart: the
//! harness's connection probes write other keys, hinted handoff is kept out by a hint bound
//! of zero bytes (`hints.bytes_per_target_max = 0`), so the coordinator drops the hint it would
//! keep for the dead replica, and anti-entropy is switched off (`anti_entropy.enabled =
//! false`).

use quorumkv_client::protocol::{ReadOptions, Request, Response, CLIENT_ALPN};
use quorumkv_client::{ReplicaAnswer, ReplicaCopy, WriteOptions, DEFAULT_KEYSPACE};
use quorumkv_node::config::Config;
use quorumkv_node::metrics::HINTS_DROPPED_TOTAL;
use quorumkv_tests::cluster::{
    run_cli, wait_until, wait_until_async, within, CliOutput, ClusterOptions, RawConnection,
    TestCluster, PEER_UP,
};
use serde_json::Value;
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(300);
/// Bounds a CLI process that hangs.
const CLI_LIMIT: Duration = Duration::from_secs(60);
/// How long the failure detectors may take to count a killed node down (their bound is the
/// harness's `peer_down_after_ms`, 5 s).
const DOWN_DEADLINE: Duration = Duration::from_secs(60);
/// How long the repaired replica may take to hold the current version: a bound on a hang, far
/// above what a background repair needs (one message after the read's last answer).
const REPAIR_DEADLINE: Duration = Duration::from_secs(30);

/// No hint is kept for anyone and no exchange runs: neither hinted handoff nor anti-entropy
/// can bring the stale replica up to date.
fn without_hints(_: usize, config: &mut Config) {
    config.hints.bytes_per_target_max = 0;
    config.anti_entropy.enabled = false;
}

fn admin_replicas(cluster: &TestCluster, key: &str, json: bool) -> CliOutput {
    let mut command = cluster.cli();
    command.args(["admin", "replicas", key]);
    if json {
        command.arg("--json");
    }
    run_cli(&mut command, CLI_LIMIT)
}

/// The entry of node `id` in `admin replicas --json` output.
fn entry<'a>(json: &'a Value, id: &str) -> &'a Value {
    json["replicas"]
        .as_array()
        .and_then(|replicas| replicas.iter().find(|r| r["node"] == id))
        .unwrap_or_else(|| panic!("no replica {id} in {json}"))
}

/// The values a replica's copy holds, as `Client::replicas` reports them.
fn stored_values(copy: &ReplicaCopy) -> Option<Vec<String>> {
    match &copy.answer {
        ReplicaAnswer::Stored(stored) => Some(
            stored
                .siblings
                .iter()
                .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                .collect(),
        ),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_read_repairs_a_replica_that_missed_a_write_while_it_was_down() {
    let options = ClusterOptions {
        patch: Some(without_hints),
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(3, options);
    let key = "read-repair-key";
    let replicas = cluster.replicas(DEFAULT_KEYSPACE, key.as_bytes());
    assert_eq!(replicas.len(), 3, "N = 3 on three nodes");
    // The last replica goes stale; the read goes through the first, another node.
    let (reader, victim) = (replicas[0], replicas[2]);
    let victim_id = cluster.node(victim).id.to_string();
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        // Durable on every replica: kill -9 loses what a replica had not flushed.
        let all = WriteOptions {
            w: Some(3),
            dw: Some(3),
            ..WriteOptions::default()
        };
        let v1 = client
            .put(DEFAULT_KEYSPACE, key, b"v1".to_vec(), None, all)
            .await
            .expect("v1 on every replica");

        cluster.kill(victim);
        // Once the others count the victim down, an inspection still answers: the victim is an
        // entry that failed, and the exit code says that not every replica answered.
        wait_until(
            "the other replicas believe the victim down",
            DOWN_DEADLINE,
            || {
                replicas[..2].iter().all(|&observer| {
                    cluster.metric(observer, PEER_UP, &[("peer", victim_id.as_str())]) == 0.0
                })
            },
        );
        let down = admin_replicas(&cluster, key, true);
        assert_eq!(down.code, Some(7), "{down:?}");
        let json = down.stdout_json();
        assert_eq!(entry(&json, &victim_id)["status"], "failed", "{json}");

        let two = WriteOptions {
            w: Some(2),
            ..WriteOptions::default()
        };
        client
            .put(DEFAULT_KEYSPACE, key, b"v2".to_vec(), Some(&v1), two)
            .await
            .expect("v2 at W = 2 with one replica down");
        let dropped = cluster.metric_total(HINTS_DROPPED_TOTAL, &[("reason", "bound")]);
        assert!(
            dropped >= 1.0,
            "the coordinator kept no hint for the victim"
        );
        cluster.restart(victim);

        // The restarted replica holds v1 only; the others hold v2.
        let stale = admin_replicas(&cluster, key, true);
        assert_eq!(stale.code, Some(0), "{stale:?}");
        let json = stale.stdout_json();
        assert_eq!(json["keyspace"], DEFAULT_KEYSPACE, "{json}");
        assert_eq!(json["key"], key, "{json}");
        let victim_entry = entry(&json, &victim_id);
        assert_eq!(victim_entry["status"], "stored", "{json}");
        assert_eq!(victim_entry["siblings"][0]["value"], "v1", "{json}");
        assert_eq!(victim_entry["siblings"].as_array().map(Vec::len), Some(1));
        for &fresh in &replicas[..2] {
            let fresh_entry = entry(&json, cluster.node(fresh).id.as_str());
            assert_eq!(fresh_entry["siblings"][0]["value"], "v2", "{json}");
            assert_ne!(
                fresh_entry["state_hash"], victim_entry["state_hash"],
                "{json}"
            );
        }
        // The plain table says the same, one row per replica after the header.
        let table = admin_replicas(&cluster, key, false);
        assert_eq!(table.code, Some(0), "{table:?}");
        assert_eq!(table.stdout.lines().count(), 4, "{table:?}");
        let victim_row = table
            .stdout
            .lines()
            .find(|line| line.starts_with(&victim_id))
            .unwrap_or_else(|| panic!("no row for {victim_id}: {table:?}"));
        assert!(victim_row.ends_with("\"v1\""), "{table:?}");

        // Looking changed nothing: the victim is still stale.
        let copies = client
            .replicas(DEFAULT_KEYSPACE, key)
            .await
            .expect("an inspection");
        let victim_copy = copies
            .iter()
            .find(|copy| copy.node == victim_id)
            .expect("the victim is a replica");
        assert_eq!(stored_values(victim_copy), Some(vec!["v1".to_string()]));

        // ONE read, at R = 2, through another node.
        let raw = RawConnection::connect(
            cluster.node(reader).quic(),
            &cluster.client_identity(),
            CLIENT_ALPN,
            "node.quorumkv",
        )
        .await
        .expect("connecting to the reader");
        let read = raw
            .request(&Request::Get {
                keyspace: DEFAULT_KEYSPACE.into(),
                key: key.as_bytes().to_vec(),
                options: ReadOptions {
                    r: Some(2),
                    ..ReadOptions::default()
                },
            })
            .await;
        match &read {
            Response::Got { siblings, .. } => {
                let values: Vec<&[u8]> = siblings.iter().map(|s| s.value.as_slice()).collect();
                assert_eq!(values, [b"v2".as_slice()], "{read:?}");
            }
            other => panic!("expected Got, got {other:?}"),
        }
        raw.close().await;

        // Then the victim holds the current version, as every other replica does.
        wait_until_async("the restarted replica holds v2", REPAIR_DEADLINE, || {
            let client = client.clone();
            let victim_id = victim_id.clone();
            async move {
                let copies = client
                    .replicas(DEFAULT_KEYSPACE, key)
                    .await
                    .map_err(|e| e.to_string())?;
                let hashes: Vec<Option<&str>> = copies
                    .iter()
                    .map(|copy| match &copy.answer {
                        ReplicaAnswer::Stored(stored) => Some(stored.state_hash.as_str()),
                        _ => None,
                    })
                    .collect();
                let victim_copy = copies.iter().find(|copy| copy.node == victim_id);
                let repaired = victim_copy.and_then(stored_values) == Some(vec!["v2".into()])
                    && hashes
                        .iter()
                        .all(|hash| hash.is_some() && *hash == hashes[0]);
                if repaired {
                    Ok(())
                } else {
                    Err(format!("{copies:?}"))
                }
            }
        })
        .await;
        client.close().await;
    })
    .await;
}
