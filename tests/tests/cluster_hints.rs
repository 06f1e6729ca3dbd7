//! Hinted handoff with real processes: a killed owner misses writes, the writes leave hints,
//! and once the owner is back the hints reach it and disappear. With four nodes, a fallback's
//! hinted acknowledgement keeps W = 3 writes available (a sloppy quorum) unless the request
//! asks for `pw = 3`.
//!
//! What an owner holds is read with a raw R = 1 get sent to the owner itself: its coordinator
//! answers from its own copy before any other replica's answer arrives, so the probe shows the
//! owner's copy. (Read repair runs after that reply, so each key is probed only once hints
//! are known delivered.)

use quorumkv_client::protocol::{ReadOptions, Request, Response, WriteOptions, CLIENT_ALPN};
use quorumkv_client::{Error, DEFAULT_KEYSPACE};
use quorumkv_tests::cluster::{
    metric_value, wait_until, wait_until_async, within, ClusterOptions, RawConnection, TestCluster,
    PEER_UP,
};
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(180);
const CONDITION_DEADLINE: Duration = Duration::from_secs(60);
const HINTS_PENDING: &str = "quorumkv_hints_pending";
const HINTS_DELIVERED: &str = "quorumkv_hints_delivered_total";
const HINTS_WRITTEN: &str = "quorumkv_hints_written_total";

fn write(w: u8, pw: Option<u8>) -> WriteOptions {
    WriteOptions {
        w: Some(w),
        dw: Some(1),
        pw,
        ..WriteOptions::default()
    }
}

/// The values node `index` itself stores for `key` (see the module docs).
async fn local_values(cluster: &TestCluster, index: usize, key: &str) -> Vec<String> {
    let raw = RawConnection::connect(
        cluster.node(index).quic(),
        &cluster.client_identity(),
        CLIENT_ALPN,
        "node.quorumkv",
    )
    .await
    .expect("connecting to the node");
    let response = raw
        .request(&Request::Get {
            keyspace: DEFAULT_KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            options: ReadOptions {
                r: Some(1),
                ..ReadOptions::default()
            },
        })
        .await;
    raw.close().await;
    match response {
        Response::Got { siblings, .. } => siblings
            .into_iter()
            .map(|s| String::from_utf8_lossy(&s.value).into_owned())
            .collect(),
        other => panic!("a local read of {key} at node {index}: {other:?}"),
    }
}

/// Waits until no running node holds a hint for `node_id`.
fn wait_hints_delivered(cluster: &TestCluster, node_id: &str) {
    wait_until(
        &format!("every hint for {node_id} delivered"),
        CONDITION_DEADLINE,
        || cluster.metric_total(HINTS_PENDING, &[("target", node_id)]) == 0.0,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_owner_receives_every_write_it_missed() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    let victim = 2;
    let victim_id = cluster.node(victim).id.to_string();
    within(TEST_LIMIT, async {
        let client = cluster.fault_tolerant_client().await;
        cluster.kill(victim);
        let keys: Vec<String> = (0..20).map(|i| format!("missed-{i}")).collect();
        for key in &keys {
            client
                .put(
                    DEFAULT_KEYSPACE,
                    key,
                    key.as_bytes().to_vec(),
                    None,
                    write(2, None),
                )
                .await
                .unwrap_or_else(|e| panic!("W = 2 with one node dead: {e}"));
        }
        // A write the dead owner never answered ends at its deadline, unless the failure
        // detector already counted the owner down; either way it leaves a hint.
        wait_until(
            "every write left a hint for the dead owner",
            CONDITION_DEADLINE,
            || cluster.metric_total(HINTS_PENDING, &[("target", &victim_id)]) >= keys.len() as f64,
        );

        cluster.restart(victim);
        wait_hints_delivered(&cluster, &victim_id);
        assert!(cluster.metric_total(HINTS_DELIVERED, &[]) >= keys.len() as f64);
        for key in &keys {
            assert_eq!(
                local_values(&cluster, victim, key).await,
                std::slice::from_ref(key),
                "{key}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_four_nodes_a_fallback_keeps_w_3_available_unless_pw_3_is_asked() {
    let mut cluster = TestCluster::start(4, ClusterOptions::default());
    // A key owned by nodes 0, 1 and 2 (in some order), so node 3 is a fallback for it.
    let key = cluster.find_key(DEFAULT_KEYSPACE, "sloppy-", |replicas| {
        !replicas.contains(&3) && replicas[0] != 2
    });
    let victim = 2;
    let victim_id = cluster.node(victim).id.to_string();
    within(TEST_LIMIT, async {
        let client = cluster.fault_tolerant_client().await;
        cluster.kill(victim);
        // Wait until the possible coordinators (the two live owners) count the victim down
        // and the fallback up: W = 3 then goes to the fallback at once. (Right after start a
        // detector may still count a peer down while its first dial is retried.)
        let fallback_id = cluster.node(3).id.to_string();
        wait_until(
            "the victim counted down and the fallback up",
            CONDITION_DEADLINE,
            || {
                (0..3).filter(|i| *i != victim).all(|i| {
                    cluster.metric(i, PEER_UP, &[("peer", &victim_id)]) == 0.0
                        // The gauge appears at a peer's first transition: absent is up.
                        && metric_value(&cluster.metrics(i), PEER_UP, &[("peer", &fallback_id)])
                            .is_none_or(|up| up == 1.0)
                })
            },
        );
        match client
            .put(
                DEFAULT_KEYSPACE,
                &key,
                b"strict".to_vec(),
                None,
                write(3, Some(3)),
            )
            .await
        {
            Err(Error::QuorumNotReached { required: 3, .. }) => {}
            other => panic!("pw = 3 with an owner dead: expected QuorumNotReached, got {other:?}"),
        }
        let (client_ref, key_ref) = (&client, key.as_str());
        wait_until_async(
            "W = 3 through a fallback's hinted acknowledgement",
            CONDITION_DEADLINE,
            move || async move {
                client_ref
                    .put(
                        DEFAULT_KEYSPACE,
                        key_ref,
                        b"sloppy".to_vec(),
                        None,
                        write(3, None),
                    )
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        assert!(
            cluster.metric(3, HINTS_WRITTEN, &[("kind", "fallback")]) >= 1.0,
            "node 3 took the write as a fallback"
        );

        cluster.restart(victim);
        wait_hints_delivered(&cluster, &victim_id);
        let values = local_values(&cluster, victim, &key).await;
        assert!(values.contains(&"sloppy".to_string()), "{values:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_that_was_paused_receives_every_write_it_missed() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    let victim = 1;
    let victim_id = cluster.node(victim).id.to_string();
    within(TEST_LIMIT, async {
        let client = cluster.fault_tolerant_client().await;
        cluster.pause(victim);
        wait_until("the paused node counted down", CONDITION_DEADLINE, || {
            [0, 2].iter().all(|i| {
                cluster.metric(
                    *i,
                    quorumkv_tests::cluster::PEER_UP,
                    &[("peer", &victim_id)],
                ) == 0.0
            })
        });
        let keys: Vec<String> = (0..20).map(|i| format!("paused-{i}")).collect();
        for key in &keys {
            client
                .put(
                    DEFAULT_KEYSPACE,
                    key,
                    key.as_bytes().to_vec(),
                    None,
                    write(2, None),
                )
                .await
                .unwrap_or_else(|e| panic!("W = 2 with one node paused: {e}"));
        }
        cluster.resume(victim);
        wait_hints_delivered(&cluster, &victim_id);
        for key in &keys {
            assert_eq!(
                local_values(&cluster, victim, key).await,
                std::slice::from_ref(key),
                "{key}"
            );
        }
    })
    .await;
}
