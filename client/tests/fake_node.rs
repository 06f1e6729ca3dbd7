//! The client against fake nodes (see `common`): routing, retries, errors and TLS.

// Test code unwraps: a failure should fail the test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use quorumkv_client::protocol::Request;
use quorumkv_client::{
    exit_code, ClientBuilder, Context, Error, ReadOptions, WriteOptions, DEFAULT_KEYSPACE,
};
use std::time::Duration;

// ----- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn learns_the_cluster_from_a_seed_and_routes_to_each_keys_coordinator() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        let log = cluster.take_log();
        assert_eq!(log.len(), 1);
        assert!(matches!(log[0], (ref node, Request::ClusterInfo) if node == "n1"));

        let keys: Vec<Vec<u8>> = (0..24).map(|i| format!("key-{i}").into_bytes()).collect();
        for key in &keys {
            client
                .put(
                    DEFAULT_KEYSPACE,
                    key,
                    key.clone(),
                    None,
                    WriteOptions::default(),
                )
                .await
                .unwrap();
        }
        let log = cluster.take_log();
        let mut reached = std::collections::BTreeSet::new();
        for (key, (node, request)) in keys.iter().zip(&log) {
            assert!(matches!(request, Request::Put { key: k, .. } if k == key));
            assert_eq!(node, &cluster.coordinator(key), "key {key:?}");
            reached.insert(node.clone());
        }
        // Both nodes coordinate some keys, so n2 was dialed by its own name.
        assert_eq!(reached.len(), 2, "{reached:?}");

        for key in &keys {
            let read = client
                .get(DEFAULT_KEYSPACE, key, ReadOptions::default())
                .await
                .unwrap();
            assert_eq!(read.siblings.len(), 1);
            assert_eq!(&read.siblings[0].value, key);
            assert_eq!(read.context, Context::from_bytes(b"ctx".to_vec()));
        }
        client.close().await;
    })
    .await;
}

#[tokio::test]
async fn an_overloaded_write_is_retried_with_the_same_request_id() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        cluster.take_log();
        cluster.script().overload_writes = 1;

        client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap();
        let log = cluster.take_log();
        assert_eq!(log.len(), 2, "one overloaded attempt, one retry");
        assert_eq!(put_request_id(&log[0].1), put_request_id(&log[1].1));
        assert_eq!(log[0].0, cluster.coordinator(b"k"));

        // The next logical write draws a new id.
        client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"w".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap();
        let next = cluster.take_log();
        assert_ne!(put_request_id(&next[0].1), put_request_id(&log[0].1));
    })
    .await;
}

#[tokio::test]
async fn retries_stop_after_the_configured_count() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.builder().retries(2).build().await.unwrap();
        cluster.take_log();
        cluster.script().overload_writes = 10;
        let error = client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Overloaded { .. }), "{error}");
        assert_eq!(exit_code(&error), 6);
        assert_eq!(cluster.take_log().len(), 3, "the attempt and two retries");
    })
    .await;
}

#[tokio::test]
async fn quorum_not_reached_is_reported_at_once_with_its_shortfall() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        cluster.take_log();
        cluster.script().fail_quorum_writes = 1;
        let error = client
            .put(
                DEFAULT_KEYSPACE,
                b"k",
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                Error::QuorumNotReached {
                    required: 2,
                    acked: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(exit_code(&error), 3);
        assert_eq!(cluster.take_log().len(), 1, "not retried");
    })
    .await;
}

#[tokio::test]
async fn invalid_requests_are_not_retried() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        cluster.take_log();
        let options = ReadOptions {
            r: Some(0),
            ..ReadOptions::default()
        };
        let error = client
            .get(DEFAULT_KEYSPACE, b"k", options)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::InvalidRequest { .. }), "{error}");
        assert_eq!(exit_code(&error), 2);
        assert_eq!(cluster.take_log().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn resolve_merges_siblings_and_writes_back_with_the_context() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster.client().await;
        // No context: each write becomes a sibling (in the fake as in the real node).
        for value in ["b", "a"] {
            client
                .put(DEFAULT_KEYSPACE, b"k", value, None, WriteOptions::default())
                .await
                .unwrap();
        }
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        assert_eq!(read.siblings.len(), 2);

        let mut seen = 0;
        client
            .resolve(
                DEFAULT_KEYSPACE,
                b"k",
                ReadOptions::default(),
                WriteOptions::default(),
                |siblings| {
                    seen = siblings.len();
                    let mut values: Vec<&[u8]> =
                        siblings.iter().map(|s| s.value.as_slice()).collect();
                    values.sort();
                    values.join(&b'+')
                },
            )
            .await
            .unwrap();
        assert_eq!(seen, 2);
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        assert_eq!(read.siblings.len(), 1);
        assert_eq!(read.siblings[0].value, b"a+b");

        // A missing key: the merge sees no siblings and its output is written.
        client
            .resolve(
                DEFAULT_KEYSPACE,
                b"fresh",
                ReadOptions::default(),
                WriteOptions::default(),
                |siblings| {
                    assert!(siblings.is_empty());
                    b"initial".to_vec()
                },
            )
            .await
            .unwrap();
        let log = cluster.take_log();
        let (_, last) = log.last().unwrap();
        assert!(matches!(
            last,
            Request::Put { key, value, context: Some(_), .. } if key == b"fresh" && value == b"initial"
        ));

        // Delete with the read's context removes what the read saw.
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        client
            .delete(DEFAULT_KEYSPACE, b"k", Some(&read.context), WriteOptions::default())
            .await
            .unwrap();
        let read = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap();
        assert!(read.siblings.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_node_that_never_answers_times_out() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster
            .builder()
            .request_timeout(Duration::from_millis(300))
            .retries(1)
            .build()
            .await
            .unwrap();
        cluster.take_log();
        cluster.script().silent = true;
        let error = client
            .get(DEFAULT_KEYSPACE, b"k", ReadOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Timeout), "{error}");
        assert_eq!(exit_code(&error), 4);
        assert_eq!(cluster.take_log().len(), 2, "the attempt and one retry");
    })
    .await;
}

#[tokio::test]
async fn a_client_certificate_from_a_foreign_ca_is_refused() {
    bounded(async {
        let cluster = Cluster::start();
        let foreign = Ca::new("someone else's CA");
        let error = ClientBuilder::new()
            .seed(cluster.n1.address.to_string())
            .identity(foreign.client_identity_trusting(&cluster.ca))
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::AuthenticationRefused { .. }),
            "{error}"
        );
        assert_eq!(exit_code(&error), 5);
        assert!(!error.is_retryable());
    })
    .await;
}

#[tokio::test]
async fn a_node_certificate_from_a_foreign_ca_is_refused() {
    bounded(async {
        let cluster = Cluster::start();
        let foreign = Ca::new("someone else's CA");
        // The client trusts only the foreign CA, so the cluster's nodes cannot prove who they are.
        let error = ClientBuilder::new()
            .seed(cluster.n1.address.to_string())
            .identity(cluster.ca.client_identity_trusting(&foreign))
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::AuthenticationRefused { .. }),
            "{error}"
        );
        assert_eq!(exit_code(&error), 5);
    })
    .await;
}

#[tokio::test]
async fn no_reachable_node_fails_with_every_attempt_listed() {
    bounded(async {
        let ca = Ca::new("quorumkv test CA");
        let seeds = [dead_address(), dead_address()];
        let error = ClientBuilder::new()
            .seeds(seeds.clone())
            .identity(ca.client_identity())
            .connect_timeout(Duration::from_millis(200))
            .build()
            .await
            .unwrap_err();
        match &error {
            Error::NoNodeReachable { attempts } => {
                let tried: Vec<&str> = attempts.iter().map(|(node, _)| node.as_str()).collect();
                assert_eq!(tried, [seeds[0].as_str(), seeds[1].as_str()]);
            }
            other => panic!("expected NoNodeReachable, got {other}"),
        }
        assert_eq!(exit_code(&error), 4);
    })
    .await;
}

#[tokio::test]
async fn configuration_errors_are_reported_before_any_network_use() {
    bounded(async {
        let ca = Ca::new("quorumkv test CA");
        let error = ClientBuilder::new()
            .identity(ca.client_identity())
            .build()
            .await
            .unwrap_err();
        assert!(matches!(error, Error::InvalidConfig { .. }), "{error}");
        let error = ClientBuilder::new()
            .seed(dead_address())
            .identity_files(
                "/nonexistent/ca.pem",
                "/nonexistent/c.pem",
                "/nonexistent/k.pem",
            )
            .build()
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Tls { .. }), "{error}");
        assert_eq!(exit_code(&error), 2);
    })
    .await;
}
