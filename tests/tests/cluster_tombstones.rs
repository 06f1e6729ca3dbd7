//! Tombstone collection across real processes: keys written and then deleted disappear from
//! every node's storage (the `quorumkv_tombstones` gauge falls to zero and each node counts them
//! collected), deleted keys read as absent, and a key written again after its collection is
//! read back.

use quorumkv_client::protocol::{ReadOptions, WriteOptions};
use quorumkv_client::{Client, DEFAULT_KEYSPACE};
use quorumkv_node::config::Config;
use quorumkv_tests::cluster::{wait_until, within, ClusterOptions, TestCluster};
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(240);
const KEYS: usize = 20;
const GRACE_MS: u64 = 500;
const QUIET_MS: u64 = 1_000;
const INTERVAL_MS: u64 = 200;

fn short_intervals(_index: usize, config: &mut Config) {
    config.anti_entropy.interval_ms = 100;
    config.anti_entropy.exchanges_max = 4;
    config.tombstones.grace_ms = GRACE_MS;
    config.tombstones.quiet_ms = QUIET_MS;
    config.tombstones.interval_ms = INTERVAL_MS;
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

#[tokio::test(flavor = "multi_thread")]
async fn deleted_keys_are_collected_on_every_node_and_can_be_written_again() {
    let cluster = TestCluster::start(
        3,
        ClusterOptions {
            patch: Some(short_intervals),
            ..ClusterOptions::default()
        },
    );
    within(TEST_LIMIT, async {
        let client: Client = cluster
            .client_builder()
            .connect_timeout(Duration::from_millis(500))
            .build()
            .await
            .expect("connecting a client");
        for i in 0..KEYS {
            let key = format!("gone-{i}");
            let context = client
                .put(DEFAULT_KEYSPACE, &key, format!("v{i}"), None, write(3))
                .await
                .expect("w=3 with every node up");
            client
                .delete(DEFAULT_KEYSPACE, &key, Some(&context), write(3))
                .await
                .expect("deleting with the write's context");
        }
        // The bound the configuration gives (grace, quiet period, two passes, a request
        // timeout), with slack for a busy two-core machine.
        let request_timeout = cluster.node(0).config.timeouts.request_timeout_ms;
        let bound = Duration::from_millis(GRACE_MS + QUIET_MS + 2 * INTERVAL_MS + request_timeout)
            + Duration::from_secs(30);
        let started = std::time::Instant::now();
        tokio::task::block_in_place(|| {
            wait_until("every node collected the deleted keys", bound, || {
                (0..cluster.len()).all(|i| {
                    cluster.metric(i, "quorumkv_tombstones", &[]) == 0.0
                        && cluster.metric(i, "quorumkv_tombstones_collected_total", &[])
                            >= KEYS as f64
                })
            })
        });
        eprintln!("collected everywhere after {:?}", started.elapsed());
        for i in 0..KEYS {
            let got = client
                .get(DEFAULT_KEYSPACE, format!("gone-{i}"), read(3))
                .await
                .expect("reading a collected key");
            assert!(got.siblings.is_empty(), "gone-{i} came back: {got:?}");
        }
        // Written again, the key is there.
        client
            .put(DEFAULT_KEYSPACE, "gone-0", "again", None, write(3))
            .await
            .expect("writing a collected key again");
        let got = client
            .get(DEFAULT_KEYSPACE, "gone-0", read(3))
            .await
            .expect("reading it back");
        let values: Vec<&[u8]> = got.siblings.iter().map(|s| s.value.as_slice()).collect();
        assert_eq!(values, vec![b"again".as_slice()]);
        client.close().await;
    })
    .await;
}
