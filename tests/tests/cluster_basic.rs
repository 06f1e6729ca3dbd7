//! The data path of a healthy 3-node cluster of real processes: the Rust client, the CLI's
//! output formats and exit codes, forwarding by non-replicas, and group commit.

use quorumkv_client::protocol::{ReadOptions, Request, RequestId, Response, WriteOptions};
use quorumkv_client::{GetResult, DEFAULT_KEYSPACE};
use quorumkv_tests::cluster::{
    free_port_pairs, run_cli, wait_until, within, CliOutput, ClusterOptions, RawConnection,
    TestCluster,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(120);
const CLI_LIMIT: Duration = Duration::from_secs(30);

/// The sibling values of a read as text, sorted.
fn values(read: &GetResult) -> Vec<String> {
    let mut values: Vec<String> = read
        .siblings
        .iter()
        .map(|sibling| String::from_utf8_lossy(&sibling.value).into_owned())
        .collect();
    values.sort();
    values
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_writes_reads_keeps_siblings_and_deletes() {
    let cluster = TestCluster::start(3, ClusterOptions::default());
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        let ks = DEFAULT_KEYSPACE;
        let read_all = ReadOptions {
            r: Some(3),
            timeout_ms: None,
            ..ReadOptions::default()
        };

        // A put, then a get, sees the value.
        client
            .put(
                ks,
                "greeting",
                b"hello".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .expect("put greeting");
        let read = client
            .get(ks, "greeting", ReadOptions::default())
            .await
            .expect("get greeting");
        assert_eq!(values(&read), ["hello"]);
        assert!(!read.context.is_empty());

        // Two puts without a context are concurrent: two siblings, on every replica.
        for value in ["left", "right"] {
            client
                .put(
                    ks,
                    "pair",
                    value.as_bytes().to_vec(),
                    None,
                    WriteOptions::default(),
                )
                .await
                .expect("blind put");
        }
        let read = client.get(ks, "pair", read_all).await.expect("get pair");
        assert_eq!(values(&read), ["left", "right"]);

        // A put with the read's context replaces both.
        client
            .put(
                ks,
                "pair",
                b"both".to_vec(),
                Some(&read.context),
                WriteOptions::default(),
            )
            .await
            .expect("put with context");
        let read = client
            .get(ks, "pair", read_all)
            .await
            .expect("get pair again");
        assert_eq!(values(&read), ["both"]);

        // resolve() merges siblings into one value.
        client
            .put(ks, "pair", b"other".to_vec(), None, WriteOptions::default())
            .await
            .expect("blind put");
        client
            .resolve(ks, "pair", read_all, WriteOptions::default(), |siblings| {
                let mut parts: Vec<String> = siblings
                    .iter()
                    .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                    .collect();
                parts.sort();
                parts.join("+").into_bytes()
            })
            .await
            .expect("resolve");
        let read = client
            .get(ks, "pair", read_all)
            .await
            .expect("get resolved");
        assert_eq!(values(&read), ["both+other"]);

        // A delete with the context removes every sibling; the key still has a context.
        client
            .delete(ks, "pair", Some(&read.context), WriteOptions::default())
            .await
            .expect("delete");
        let read = client.get(ks, "pair", read_all).await.expect("get deleted");
        assert!(
            read.siblings.is_empty(),
            "deleted key has siblings: {read:?}"
        );
        assert!(
            !read.context.is_empty(),
            "a deleted key still has a context"
        );

        // A key never written reads as empty, with a context.
        let read = client
            .get(ks, "never-written", read_all)
            .await
            .expect("get missing");
        assert!(read.siblings.is_empty());
        assert!(!read.context.is_empty());
        client.close().await;
    })
    .await;
}

/// Runs the CLI with `args` and the cluster's environment.
fn cli(cluster: &TestCluster, args: &[&str]) -> CliOutput {
    run_cli(cluster.cli().args(args), CLI_LIMIT)
}

/// Asserts a failed run: exit `code`, nothing on stdout, one line on stderr. With `--json`
/// among the arguments the line is `{"error":{"kind":...}}` and is returned.
fn assert_fails(output: &CliOutput, code: i32, what: &str) -> Option<serde_json::Value> {
    assert_eq!(output.code, Some(code), "{what}: {output:?}");
    assert!(
        output.stdout.is_empty(),
        "{what}: stdout not empty: {output:?}"
    );
    assert_eq!(
        output.stderr.trim_end().lines().count(),
        1,
        "{what}: stderr is not one line: {output:?}"
    );
    serde_json::from_str::<serde_json::Value>(output.stderr.trim())
        .ok()
        .filter(|json| json.get("error").is_some())
}

fn assert_json_kind(output: &CliOutput, code: i32, kind: &str, what: &str) -> serde_json::Value {
    let json = assert_fails(output, code, what)
        .unwrap_or_else(|| panic!("{what}: stderr is not a JSON error: {output:?}"));
    assert_eq!(json["error"]["kind"], kind, "{what}: {output:?}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {output:?}"
    );
    json
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_json_and_exits_with_documented_codes() {
    let cluster = TestCluster::start(3, ClusterOptions::default());
    within(TEST_LIMIT, async {
        // put --json prints {"context":"..."}, one line.
        let put = cli(&cluster, &["put", "--json", "cli-key", "hello"]);
        assert_eq!(put.code, Some(0), "{put:?}");
        assert_eq!(put.stdout.lines().count(), 1, "{put:?}");
        let context = put.stdout_json()["context"].as_str().map(str::to_string);
        assert!(context.is_some_and(|c| !c.is_empty()), "{put:?}");

        // get --json prints siblings, context and encoding.
        let get = cli(&cluster, &["get", "--json", "cli-key"]);
        assert_eq!(get.code, Some(0), "{get:?}");
        assert_eq!(get.stdout.lines().count(), 1, "{get:?}");
        let json = get.stdout_json();
        assert_eq!(json["siblings"], serde_json::json!(["hello"]), "{get:?}");
        assert_eq!(json["encoding"], "utf8", "{get:?}");
        let context = json["context"]
            .as_str()
            .expect("a context string")
            .to_string();
        assert!(!context.is_empty());

        // Plain get: the value on stdout, the context on stderr.
        let plain = cli(&cluster, &["get", "cli-key"]);
        assert_eq!(plain.code, Some(0), "{plain:?}");
        assert_eq!(plain.stdout, "hello\n", "{plain:?}");
        assert_eq!(
            plain.stderr.trim(),
            format!("context: {context}"),
            "{plain:?}"
        );

        // put with the read's context replaces the value.
        let put = cli(
            &cluster,
            &["put", "--json", "--context", &context, "cli-key", "world"],
        );
        assert_eq!(put.code, Some(0), "{put:?}");
        let get = cli(&cluster, &["get", "--json", "cli-key"]);
        assert_eq!(
            get.stdout_json()["siblings"],
            serde_json::json!(["world"]),
            "{get:?}"
        );

        // A value that is not UTF-8 (written by the Rust client) is shown in base64.
        let client = cluster.client().await;
        client
            .put(
                DEFAULT_KEYSPACE,
                "binary",
                vec![0xff, 0xfe, 0x00],
                None,
                WriteOptions::default(),
            )
            .await
            .expect("put a binary value");
        client.close().await;
        let get = cli(&cluster, &["get", "--json", "binary"]);
        let json = get.stdout_json();
        assert_eq!(json["encoding"], "base64", "{get:?}");
        assert_eq!(json["siblings"], serde_json::json!(["//4A"]), "{get:?}");

        // Values from a file or from standard input, bytes as they are (not text, larger than
        // a command line allows).
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("value.bin");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &big).expect("writing the value file");
        let put = cli(
            &cluster,
            &[
                "put",
                "--json",
                "from-file",
                "--value-file",
                file.to_str().expect("utf-8 path"),
            ],
        );
        assert_eq!(put.code, Some(0), "{put:?}");
        let mut stdin_put = cluster.cli();
        stdin_put
            .args(["put", "--json", "from-stdin", "--value-file", "-"])
            .stdin(std::fs::File::open(&file).expect("opening the value file"));
        let put = run_cli(&mut stdin_put, CLI_LIMIT);
        assert_eq!(put.code, Some(0), "{put:?}");
        let client = cluster.client().await;
        for key in ["from-file", "from-stdin"] {
            let got = client
                .get(DEFAULT_KEYSPACE, key, ReadOptions::default())
                .await
                .expect("reading the value back");
            assert_eq!(got.siblings.len(), 1, "{key}");
            assert!(got.siblings[0].value == big, "{key}: the bytes differ");
        }
        client.close().await;
        // get --output writes the raw bytes back; a key with no value is refused.
        let back = dir.path().join("back.bin");
        let get = cli(
            &cluster,
            &[
                "get",
                "from-stdin",
                "--output",
                back.to_str().expect("utf-8 path"),
            ],
        );
        assert_eq!(get.code, Some(0), "{get:?}");
        assert!(get.stderr.starts_with("context: "), "{get:?}");
        assert!(std::fs::read(&back).expect("the written value") == big);
        let none = cli(
            &cluster,
            &[
                "get",
                "never-written",
                "--output",
                back.to_str().expect("utf-8 path"),
            ],
        );
        assert_fails(&none, 2, "--output for a key without a value");
        let missing = cli(
            &cluster,
            &["put", "k", "--value-file", "/nonexistent/value"],
        );
        assert_fails(&missing, 2, "a value file that does not exist");
        assert!(missing.stderr.contains("/nonexistent/value"), "{missing:?}");

        // A missing key: no siblings, still a context.
        let get = cli(&cluster, &["get", "--json", "no-such-key"]);
        assert_eq!(get.code, Some(0), "{get:?}");
        let json = get.stdout_json();
        assert_eq!(json["siblings"], serde_json::json!([]), "{get:?}");
        assert!(
            json["context"].as_str().is_some_and(|c| !c.is_empty()),
            "{get:?}"
        );

        // delete --json prints the tombstone's context; the key then reads empty.
        let delete = cli(&cluster, &["delete", "--json", "cli-key"]);
        assert_eq!(delete.code, Some(0), "{delete:?}");
        assert!(
            delete.stdout_json()["context"].as_str().is_some(),
            "{delete:?}"
        );
        let get = cli(&cluster, &["get", "--json", "cli-key"]);
        assert_eq!(
            get.stdout_json()["siblings"],
            serde_json::json!([]),
            "{get:?}"
        );

        // Exit 2: invalid input, refused by the node or by the CLI itself.
        let long_key = "k".repeat(1025);
        let invalid: Vec<(&str, Vec<&str>)> = vec![
            ("r = 0", vec!["get", "--r", "0", "k"]),
            ("w = 4 > N", vec!["put", "--w", "4", "k", "v"]),
            ("dw > w", vec!["put", "--w", "2", "--dw", "3", "k", "v"]),
            (
                "context that is not base64url",
                vec!["put", "--context", "not base64!", "k", "v"],
            ),
            (
                "context that is not a token",
                vec!["put", "--context", "AAAAAAAAAAAA", "k", "v"],
            ),
            ("oversized key", vec!["put", long_key.as_str(), "v"]),
        ];
        for (what, args) in &invalid {
            let plain = cli(&cluster, args);
            assert_fails(&plain, 2, what);
            assert!(plain.stderr.starts_with("error: "), "{what}: {plain:?}");
            let mut json_args = vec!["--json"];
            json_args.extend(args.iter().copied());
            // Flags go after the subcommand.
            json_args.swap(0, 1);
            let json = cli(&cluster, &json_args);
            assert_fails(&json, 2, what)
                .unwrap_or_else(|| panic!("{what}: no JSON error: {json:?}"));
        }
        let oversized = cli(&cluster, &["put", "--json", long_key.as_str(), "v"]);
        let json = assert_json_kind(&oversized, 2, "invalid_request", "oversized key");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("key_bytes_max")),
            "{oversized:?}"
        );

        // Exit 4: no node reachable (a port nobody listens on).
        let closed = format!("127.0.0.1:{}", free_port_pairs(1)[0].0);
        let unreachable = run_cli(
            cluster
                .cli()
                .env("QUORUMKV_NODES", &closed)
                .args(["get", "--json", "k"]),
            CLI_LIMIT,
        );
        let json = assert_json_kind(&unreachable, 4, "no_node_reachable", "closed port");
        assert!(
            json["error"]["attempts"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{unreachable:?}"
        );

        // Exit 5: a client certificate from another CA.
        let foreign = cluster.dir().join("foreign-ca");
        let foreign_dir = foreign.to_str().expect("a UTF-8 path");
        let init = run_cli(
            cluster.cli().args(["certs", "init", "--dir", foreign_dir]),
            CLI_LIMIT,
        );
        assert_eq!(init.code, Some(0), "{init:?}");
        let issue = run_cli(
            cluster.cli().args([
                "certs",
                "issue",
                "--dir",
                foreign_dir,
                "--client",
                "intruder",
            ]),
            CLI_LIMIT,
        );
        assert_eq!(issue.code, Some(0), "{issue:?}");
        let paths: Vec<&str> = issue.stdout.lines().collect();
        assert_eq!(
            paths.len(),
            2,
            "certs issue prints the certificate and key paths: {issue:?}"
        );
        for json in [false, true] {
            let mut command = cluster.cli();
            command
                .env("QUORUMKV_CERT", paths[0])
                .env("QUORUMKV_KEY", paths[1]);
            command.args(if json {
                vec!["get", "--json", "k"]
            } else {
                vec!["get", "k"]
            });
            let refused = run_cli(&mut command, CLI_LIMIT);
            if json {
                assert_json_kind(&refused, 5, "authentication_refused", "foreign certificate");
            } else {
                assert_fails(&refused, 5, "foreign certificate");
            }
        }

        // The cluster still serves.
        let put = cli(&cluster, &["put", "after-errors", "fine"]);
        assert_eq!(put.code, Some(0), "{put:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_that_are_not_replicas_forward_requests() {
    // `single` keeps each key on one node, so two of three nodes must forward every request.
    let cluster = TestCluster::start(3, ClusterOptions::default().keyspace("single", 1));
    within(TEST_LIMIT, async {
        let connections: Vec<RawConnection> = {
            let mut connections = Vec::new();
            for index in 0..cluster.len() {
                let connection = RawConnection::connect(
                    cluster.node(index).quic(),
                    &cluster.client_identity(),
                    quorumkv_client::protocol::CLIENT_ALPN,
                    "node.quorumkv",
                )
                .await
                .expect("raw connection");
                connections.push(connection);
            }
            connections
        };
        let mut forwarded = 0;
        for i in 0..30 {
            let key = format!("fwd-{i}");
            let replica = cluster.replicas("single", key.as_bytes())[0];
            let entry = (replica + 1 + i % 2) % cluster.len();
            assert_ne!(entry, replica);
            let value = format!("value-{i}");
            let put = Request::Put {
                keyspace: "single".into(),
                key: key.clone().into_bytes(),
                value: value.clone().into_bytes(),
                context: None,
                request_id: RequestId(rand::random()),
                options: WriteOptions::default(),
            };
            let response = connections[entry].request(&put).await;
            assert!(
                matches!(response, Response::Written { .. }),
                "put {key} via n{}: {response:?}",
                entry + 1
            );
            // Read back through another non-replica, and from the replica itself.
            let get = Request::Get {
                keyspace: "single".into(),
                key: key.clone().into_bytes(),
                options: ReadOptions::default(),
            };
            let other = (0..cluster.len())
                .find(|n| *n != replica && *n != entry)
                .expect("a third node");
            for via in [other, replica] {
                match connections[via].request(&get).await {
                    Response::Got { siblings, .. } => {
                        let got: Vec<&[u8]> = siblings.iter().map(|s| s.value.as_slice()).collect();
                        assert_eq!(got, [value.as_bytes()], "get {key} via n{}", via + 1);
                    }
                    other => panic!("get {key} via n{}: {other:?}", via + 1),
                }
            }
            forwarded += 1;
        }
        assert_eq!(forwarded, 30);
        for connection in connections {
            connection.close().await;
        }
        // The client, which routes to the replica itself, agrees.
        let client = cluster.client().await;
        let read = client
            .get("single", "fwd-7", ReadOptions::default())
            .await
            .expect("client get");
        assert_eq!(values(&read), ["value-7"]);
        client.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_durable_writes_share_flushes() {
    const WRITES: usize = 1000;
    const CONCURRENCY: usize = 64;
    let cluster = TestCluster::start(3, ClusterOptions::default());
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        // Warm up connections so the count below is about writes, not connecting.
        client
            .put(DEFAULT_KEYSPACE, "warm-up", b"x".to_vec(), None, WriteOptions::default())
            .await
            .expect("warm-up put");
        let flushes_before = cluster.metric_total("quorumkv_storage_flushes_total", &[]);
        let next = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut writers = Vec::new();
        for _ in 0..CONCURRENCY {
            let (client, next, failures) = (client.clone(), next.clone(), failures.clone());
            writers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= WRITES {
                        return;
                    }
                    let options = WriteOptions { w: Some(2), dw: Some(1), timeout_ms: None,
 ..WriteOptions::default() };
                    let key = format!("group-{i}");
                    if let Err(e) = client.put(DEFAULT_KEYSPACE, &key, key.clone().into_bytes(), None, options).await {
                        failures.lock().expect("failures lock").push(format!("{key}: {e}"));
                    }
                }
            }));
        }
        for writer in writers {
            writer.await.expect("writer task");
        }
        let failures = failures.lock().expect("failures lock").clone();
        assert!(failures.is_empty(), "{} durable writes failed: {failures:?}", failures.len());
        let flushes = cluster.metric_total("quorumkv_storage_flushes_total", &[]) - flushes_before;
        eprintln!("{WRITES} durable writes (w=2, dw=1, concurrency {CONCURRENCY}) cost {flushes} flushes over 3 nodes");
        assert!(flushes > 0.0, "durable writes caused no flush");
        assert!(flushes < 500.0, "{flushes} flushes for {WRITES} durable writes: no group commit");
        client.close().await;
    })
    .await;
}

/// A cluster whose nodes all answer `/ready` accepts writes that need every replica: right
/// after a simultaneous start, and right after one node is stopped cleanly, started again and
/// heard from by its peers.
///
/// The hazard: a node that dials a peer before the peer has bound its port loses the QUIC
/// Initial, and quinn retransmits it only after its first probe timeout (about 1 s), so without
/// help the dial and every message queued behind it would fail. The help: when the peer comes
/// up it dials us, and its hello (from a process instance not seen before) makes our transport
/// abandon the stuck dial and dial again at once (`QuicTransport::peer_connected`).
#[tokio::test(flavor = "multi_thread")]
async fn writes_succeed_as_soon_as_every_node_is_ready() {
    let options = ClusterOptions {
        wait_connected: false,
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(3, options);
    let keys: Vec<String> = (0..cluster.len())
        .map(|coordinator| {
            cluster.find_key(DEFAULT_KEYSPACE, "early-", |replicas| {
                replicas[0] == coordinator
            })
        })
        .collect();
    let all = WriteOptions {
        w: Some(3),
        dw: Some(1),
        timeout_ms: None,
        ..WriteOptions::default()
    };
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        for key in &keys {
            client
                .put(DEFAULT_KEYSPACE, key, b"early".to_vec(), None, all)
                .await
                .unwrap_or_else(|e| {
                    panic!("w=3 write of {key} right after every node was ready: {e}")
                });
        }
        client.close().await;
    })
    .await;
    cluster.wait_connected();
    let restarted = 2;
    cluster.stop(restarted);
    // Wait until the others have noticed, so they are dialing the stopped node.
    wait_until(
        "both peers report the stopped node down",
        Duration::from_secs(30),
        || {
            [0, 1].iter().all(|observer| {
                let text = cluster.metrics(*observer);
                let id = cluster.node(restarted).id.to_string();
                quorumkv_tests::cluster::metric_value(
                    &text,
                    quorumkv_tests::cluster::PEER_UP,
                    &[("peer", &id)],
                ) == Some(0.0)
            })
        },
    );
    cluster.restart_process(restarted);
    // A peer counts the restarted node down until the node's first message arrives; that
    // takes a moment after `/ready` and is no failure. What must not happen is the peer
    // believing it up while its own link to it is still stuck.
    wait_until(
        "both peers hear from the restarted node",
        Duration::from_secs(30),
        || {
            [0, 1].iter().all(|observer| {
                let text = cluster.metrics(*observer);
                let id = cluster.node(restarted).id.to_string();
                quorumkv_tests::cluster::metric_value(
                    &text,
                    quorumkv_tests::cluster::PEER_UP,
                    &[("peer", &id)],
                ) == Some(1.0)
            })
        },
    );
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        for key in &keys {
            client
                .put(DEFAULT_KEYSPACE, key, b"again".to_vec(), None, all)
                .await
                .unwrap_or_else(|e| {
                    panic!("w=3 write of {key} right after n3 restarted and was ready: {e}")
                });
        }
        client.close().await;
    })
    .await;
}
