//! The metrics as Prometheus sees them: every node's `/metrics` text passes
//! `promtool check metrics` after a workload that exercises writes, reads, deletes, failures
//! and repairs; and a real Prometheus server scraping a 3-node cluster on loopback sees all
//! three targets up and request counters rising.
//!
//! Both need Debian's `prometheus` package (`promtool` and `prometheus`), which `.ci/run`
//! installs; without it the tests skip visibly, except under CI
//! (`QUORUMKV_REQUIRE_PRIVILEGES=1`), where they fail.

use quorumkv_client::protocol::{ReadOptions, WriteOptions};
use quorumkv_client::{Client, DEFAULT_KEYSPACE};
use quorumkv_tests::cluster::{wait_until, within, ChildGuard, ClusterOptions, TestCluster};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(240);
const REQUIRE: &str = "QUORUMKV_REQUIRE_PRIVILEGES";

/// Whether `tool` runs; skips the test (or fails it under CI) when it does not.
fn have(test: &str, tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        quorumkv_tests::skip(
            test,
            tool,
            "not installed (Debian package prometheus)",
            REQUIRE,
        );
    }
    found
}

async fn client_for(cluster: &TestCluster) -> Client {
    cluster
        .client_builder()
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("connecting a client")
}

/// Puts, reads with context, deletes, and a few requests that fail, so that most families
/// have series.
async fn workload(client: &Client, round: usize) {
    let write = |w: u8| WriteOptions {
        w: Some(w),
        dw: Some(1),
        ..WriteOptions::default()
    };
    for i in 0..30 {
        let key = format!("m-{round}-{i}");
        let context = client
            .put(DEFAULT_KEYSPACE, &key, format!("v{i}"), None, write(2))
            .await
            .expect("a put with every node up");
        let got = client
            .get(
                DEFAULT_KEYSPACE,
                &key,
                ReadOptions {
                    r: Some(3),
                    ..ReadOptions::default()
                },
            )
            .await
            .expect("a get with every node up");
        assert_eq!(got.siblings.len(), 1);
        if i % 3 == 0 {
            client
                .delete(DEFAULT_KEYSPACE, &key, Some(&context), write(2))
                .await
                .expect("a delete with every node up");
        }
    }
    // 70 requests so far (30 puts, 30 gets, 10 deletes), then two refused: an unknown
    // keyspace, and W above N (the client may refuse these without asking a node).
    assert!(client
        .put("no-such-keyspace", "k", "v", None, write(1))
        .await
        .is_err());
    assert!(client
        .put(DEFAULT_KEYSPACE, "k", "v", None, write(9))
        .await
        .is_err());
}

/// Runs `promtool check metrics` over `text`; panics with its complaints if it refuses it.
fn promtool_accepts(index: usize, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("feeding promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics refused node {index}'s metrics ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_every_nodes_metrics_after_a_workload() {
    let test = "promtool_accepts_every_nodes_metrics_after_a_workload";
    if !have(test, "promtool") {
        return;
    }
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    within(TEST_LIMIT, async {
        let client = client_for(&cluster).await;
        workload(&client, 0).await;
        for index in 0..cluster.len() {
            let text = cluster.metrics(index);
            for family in [
                "quorumkv_requests_total",
                "quorumkv_request_duration_seconds_bucket",
                "quorumkv_read_siblings_bucket",
                "quorumkv_build_info",
                "quorumkv_tombstones",
            ] {
                assert!(
                    text.contains(family),
                    "node {index} exports no {family}:\n{text}"
                );
            }
            promtool_accepts(index, &text);
        }
        // Every node counts the keys it stores per keyspace (N = 3: all of them).
        tokio::task::block_in_place(|| {
            wait_until(
                "every node publishes its key count",
                Duration::from_secs(30),
                || {
                    (0..cluster.len()).all(|i| {
                        cluster.metric(i, "quorumkv_keys", &[("keyspace", DEFAULT_KEYSPACE)])
                            >= 20.0
                    })
                },
            )
        });

        // A write that cannot reach its quorum (an owner dead, no sloppy quorum) is counted by
        // kind, and the survivors' metrics still pass.
        cluster.kill(2);
        let refused = client
            .put(
                DEFAULT_KEYSPACE,
                "needs-all-three",
                "v",
                None,
                WriteOptions {
                    w: Some(3),
                    dw: Some(1),
                    sloppy_quorum: Some(false),
                    ..WriteOptions::default()
                },
            )
            .await;
        assert!(refused.is_err(), "w = 3 with a node dead: {refused:?}");
        client.close().await;
        let failures: f64 = (0..2)
            .map(|i| cluster.metric(i, "quorumkv_quorum_failures_total", &[]))
            .sum();
        assert!(failures >= 1.0, "no quorum failure counted");
        for index in 0..2 {
            promtool_accepts(index, &cluster.metrics(index));
        }
    })
    .await;
}

/// The value of the first result of an instant query, summed if there are several series.
fn query(prometheus: &str, expression: &str) -> Option<f64> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let body = agent
        .get(format!("http://{prometheus}/api/v1/query"))
        .query("query", expression)
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let results = json["data"]["result"].as_array()?;
    results
        .iter()
        .map(|r| r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prometheus_server_scrapes_all_three_nodes_and_sees_requests_rise() {
    let test = "a_prometheus_server_scrapes_all_three_nodes_and_sees_requests_rise";
    if !have(test, "prometheus") {
        return;
    }
    let cluster = TestCluster::start(3, ClusterOptions::default());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let targets: Vec<String> = (0..cluster.len())
        .map(|i| format!("\"{}\"", cluster.node(i).admin()))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: quorumkv\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .expect("writing prometheus.yml");
    let port = quorumkv_tests::cluster::free_port_pairs(1)[0].0;
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("a log file");
    let _prometheus = ChildGuard::kill_on_drop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus"),
    );
    let log_path = dir.path().join("prometheus.log");
    within(TEST_LIMIT, async {
        tokio::task::block_in_place(|| {
            wait_until(
                "Prometheus sees all three nodes up",
                Duration::from_secs(60),
                || query(&listen, "sum(up{job=\"quorumkv\"})") == Some(3.0),
            )
        });
        let before = query(&listen, "sum(quorumkv_requests_total)").unwrap_or(0.0);
        let client = client_for(&cluster).await;
        workload(&client, 1).await;
        client.close().await;
        tokio::task::block_in_place(|| {
            wait_until(
                "Prometheus sees the request counters rise by the workload",
                Duration::from_secs(60),
                || {
                    query(&listen, "sum(quorumkv_requests_total)")
                        .is_some_and(|after| after >= before + 70.0)
                },
            )
        });
    })
    .await;
    drop(log_path);
}
