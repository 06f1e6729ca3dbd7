//! The client's failover against fake nodes (see `common`): a dead seed, a dead or slow replica,
//! a connection that goes silent, and per-attempt bounds that follow the request and the cluster.
//!
//! A dead node is either an address nobody listens on (`dead_address`: a node that never
//! accepts) or a node behind a [`Relay`] that drops every datagram (a node killed after the
//! client connected to it). Durations are bounded generously, far below what the client before
//! failover waited (a full connect or request timeout per dead node, configured here to tens of
//! seconds so the difference cannot be noise); what the tests count is attempts, dials and
//! hedges.

// Test code unwraps: a failure should fail the test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use quorumkv_client::protocol::Request;
use quorumkv_client::{
    ClientBuilder, ClientStats, Error, Hedge, NodeStats, ReadOptions, WriteOptions,
    DEFAULT_KEYSPACE,
};
use std::time::{Duration, Instant};

/// What the client before failover waited on a dead node in these tests: the connect timeout
/// they configure, or the per-attempt timeout the cluster reports.
const OLD_STALL: Duration = Duration::from_secs(30);
/// A generous bound on an operation that must not wait out [`OLD_STALL`].
const FAST: Duration = Duration::from_secs(5);

fn node<'a>(stats: &'a ClientStats, name: &str) -> Option<&'a NodeStats> {
    stats.nodes.iter().find(|node| node.node == name)
}

fn requests_to<'a>(log: &'a [(String, Request)], node: &str) -> Vec<&'a Request> {
    log.iter()
        .filter(|(at, _)| at == node)
        .map(|(_, request)| request)
        .collect()
}

/// Runs `operation` and returns its output and how long it took.
async fn timed<T>(operation: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let output = operation.await;
    (output, started.elapsed())
}

#[tokio::test]
async fn a_client_learns_the_cluster_from_a_live_seed_without_waiting_for_dead_ones() {
    bounded(async {
        let cluster = Cluster::start();
        let dead = [dead_address(), dead_address()];
        let (client, elapsed) = timed(
            ClientBuilder::new()
                // The dead seeds come first; the old client dialed them one by one, each for
                // the whole connect timeout.
                .seeds([
                    dead[0].clone(),
                    dead[1].clone(),
                    cluster.n1.address.to_string(),
                ])
                .identity(cluster.ca.client_identity())
                .connect_timeout(OLD_STALL)
                .build(),
        )
        .await;
        let client = client.unwrap();
        assert!(
            elapsed < FAST,
            "bootstrap took {elapsed:?}, as if it waited for a dead seed"
        );
        let log = cluster.take_log();
        assert_eq!(log.len(), 1, "{log:?}");
        assert!(matches!(log[0], (ref node, Request::ClusterInfo) if node == "n1"));
        let stats = client.stats();
        // Seeds are dialed in the order given, each after the previous one was slow.
        assert!(stats.connect_races >= 1, "{stats:?}");
        assert_eq!(
            node(&stats, &cluster.n1.address.to_string())
                .unwrap()
                .attempts,
            1
        );
        for seed in &dead {
            assert_eq!(node(&stats, seed).map_or(0, |node| node.attempts), 0);
        }
    })
    .await;
}

#[tokio::test]
async fn a_fresh_client_sends_a_write_for_a_dead_replica_to_the_next_one_after_a_race() {
    bounded(async {
        let cluster = Cluster::start_with(Setup {
            relay_n2: true,
            ..Setup::default()
        });
        // n2 is dead from the start: the fresh client cannot know (a new CLI process).
        cluster.relay.as_ref().unwrap().play_dead(true);
        let client = cluster
            .builder()
            .connect_timeout(OLD_STALL)
            .build()
            .await
            .unwrap();
        cluster.take_log();
        let key = cluster.keys_coordinated_by("n2", 1).remove(0);
        let (written, elapsed) = timed(client.put(
            DEFAULT_KEYSPACE,
            &key,
            b"v".to_vec(),
            None,
            WriteOptions::default(),
        ))
        .await;
        written.unwrap();
        assert!(elapsed < FAST, "the put took {elapsed:?}");
        // The write went to n1, once: the dial to n2 was raced, not sent to.
        let log = cluster.take_log();
        assert_eq!(requests_to(&log, "n1").len(), 1, "{log:?}");
        assert!(requests_to(&log, "n2").is_empty(), "{log:?}");
        let stats = client.stats();
        assert!(stats.connect_races >= 1, "{stats:?}");
        assert_eq!(node(&stats, "n2").unwrap().attempts, 0, "{stats:?}");
    })
    .await;
}

#[tokio::test]
async fn a_seed_that_lost_the_bootstrap_race_is_routed_last_under_its_node_id() {
    bounded(async {
        let cluster = Cluster::start_with(Setup {
            relay_n2: true,
            ..Setup::default()
        });
        let relay = cluster.relay.as_ref().unwrap();
        relay.play_dead(true);
        // A CLI process: the dead node is the first seed, and its keys are asked for next.
        let client = ClientBuilder::new()
            .seeds([relay.address.to_string(), cluster.n1.address.to_string()])
            .identity(cluster.ca.client_identity())
            .connect_timeout(OLD_STALL)
            .build()
            .await
            .unwrap();
        let races_after_bootstrap = client.stats().connect_races;
        assert_eq!(races_after_bootstrap, 1, "{:?}", client.stats());
        cluster.take_log();
        let key = cluster.keys_coordinated_by("n2", 1).remove(0);
        let (written, elapsed) = timed(client.put(
            DEFAULT_KEYSPACE,
            &key,
            b"v".to_vec(),
            None,
            WriteOptions::default(),
        ))
        .await;
        written.unwrap();
        assert!(elapsed < FAST, "the put took {elapsed:?}");
        // n2's address lost the race as a seed, so n2 went last: no dial by its id, no race.
        let stats = client.stats();
        assert_eq!(stats.connect_races, races_after_bootstrap, "{stats:?}");
        assert!(node(&stats, "n2").is_none(), "{stats:?}");
        assert_eq!(requests_to(&cluster.take_log(), "n1").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_node_marked_down_is_skipped_by_the_next_requests_and_probed_back_later() {
    bounded(async {
        let cluster = Cluster::start_with(Setup {
            relay_n2: true,
            ..Setup::default()
        });
        let relay = cluster.relay.as_ref().unwrap();
        relay.play_dead(true);
        let client = cluster
            .builder()
            .connect_timeout(OLD_STALL)
            // Long enough that no probe runs while the test checks that n2 is left alone.
            .down_backoff(Duration::from_secs(600), Duration::from_secs(600))
            .build()
            .await
            .unwrap();
        let keys = cluster.keys_coordinated_by("n2", 10);
        client
            .put(
                DEFAULT_KEYSPACE,
                &keys[0],
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap();
        // The dial to n2 times out in the background (a connect timeout sized to n1's
        // handshakes, far below OLD_STALL) and marks it down.
        wait_until("n2 is marked down", || {
            node(&client.stats(), "n2").is_some_and(|node| node.down)
        })
        .await;
        let before = client.stats();
        let n2_before = node(&before, "n2").unwrap().clone();
        assert_eq!(n2_before.dial_failures, 1, "{n2_before:?}");
        cluster.take_log();
        let (done, elapsed) = timed(async {
            for key in &keys {
                client
                    .put(
                        DEFAULT_KEYSPACE,
                        key,
                        b"w".to_vec(),
                        None,
                        WriteOptions::default(),
                    )
                    .await
                    .unwrap();
                client
                    .get(DEFAULT_KEYSPACE, key, ReadOptions::default())
                    .await
                    .unwrap();
            }
        })
        .await;
        let () = done;
        assert!(elapsed < FAST, "20 requests took {elapsed:?}");
        // Every request went straight to n1: no dial, race or attempt for n2.
        let after = client.stats();
        let n2_after = node(&after, "n2").unwrap();
        assert_eq!(n2_after.dials, n2_before.dials, "{after:?}");
        assert_eq!(n2_after.attempts, 0, "{after:?}");
        assert_eq!(after.connect_races, before.connect_races, "{after:?}");
        assert_eq!(after.hedges, before.hedges, "{after:?}");
        let log = cluster.take_log();
        assert_eq!(requests_to(&log, "n1").len(), 20, "{log:?}");

        // n2 comes back. A client with a short backoff finds it with a background probe and
        // sends n2's keys to it again.
        relay.play_dead(false);
        let client = cluster
            .builder()
            .down_backoff(Duration::from_millis(200), Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        relay.play_dead(true);
        client
            .put(
                DEFAULT_KEYSPACE,
                &keys[0],
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap();
        wait_until("n2 is marked down", || {
            node(&client.stats(), "n2").is_some_and(|node| node.down)
        })
        .await;
        relay.play_dead(false);
        cluster.take_log();
        let mut reached_n2 = false;
        wait_until("a request reaches n2 again", || {
            reached_n2 |= !requests_to(&cluster.take_log(), "n2").is_empty();
            // Requests keep coming (routing starts the probe), from another task.
            let client = client.clone();
            let key = keys[1].clone();
            tokio::spawn(async move {
                let _ = client
                    .get(DEFAULT_KEYSPACE, &key, ReadOptions::default())
                    .await;
            });
            reached_n2
        })
        .await;
        let n2 = node(&client.stats(), "n2").unwrap().clone();
        assert!(!n2.down, "{n2:?}");
        assert!(n2.dials >= 2, "the probe dialed again: {n2:?}");
    })
    .await;
}

#[tokio::test]
async fn a_slow_replica_gets_a_read_hedged_to_the_next_one() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster
            .builder()
            .hedge(Hedge::After(Duration::from_millis(50)))
            .build()
            .await
            .unwrap();
        let key = cluster.keys_coordinated_by("n2", 1).remove(0);
        cluster
            .script()
            .delay
            .insert("n2".into(), Duration::from_secs(30));
        cluster.take_log();
        let (read, elapsed) =
            timed(client.get(DEFAULT_KEYSPACE, &key, ReadOptions::default())).await;
        read.unwrap();
        assert!(elapsed < FAST, "the read took {elapsed:?}");
        let log = cluster.take_log();
        assert_eq!(requests_to(&log, "n2").len(), 1, "{log:?}");
        assert_eq!(requests_to(&log, "n1").len(), 1, "the hedge: {log:?}");
        let stats = client.stats();
        assert_eq!(stats.hedges, 1);
        // n2 lost the hedge and has not answered since: the next write goes to n1 at once.
        assert!(node(&stats, "n2").unwrap().suspect, "{stats:?}");
        let (written, elapsed) = timed(client.put(
            DEFAULT_KEYSPACE,
            &key,
            b"v".to_vec(),
            None,
            WriteOptions::default(),
        ))
        .await;
        written.unwrap();
        assert!(elapsed < FAST, "the put took {elapsed:?}");
        let log = cluster.take_log();
        assert_eq!(requests_to(&log, "n1").len(), 1, "{log:?}");
        assert!(requests_to(&log, "n2").is_empty(), "{log:?}");
    })
    .await;
}

#[tokio::test]
async fn the_default_hedge_delay_follows_recent_read_latencies() {
    bounded(async {
        let cluster = Cluster::start();
        // The default: the 99th percentile of recent reads, at least 20 ms, at most 500 ms.
        let client = cluster.client().await;
        let key = cluster.keys_coordinated_by("n2", 1).remove(0);
        for _ in 0..32 {
            client
                .get(DEFAULT_KEYSPACE, &key, ReadOptions::default())
                .await
                .unwrap();
        }
        // Reads slower than 20 ms may have been hedged on a busy machine; count from here.
        let hedges_before = client.stats().hedges;
        cluster
            .script()
            .delay
            .insert("n2".into(), Duration::from_secs(30));
        cluster.take_log();
        let (read, elapsed) =
            timed(client.get(DEFAULT_KEYSPACE, &key, ReadOptions::default())).await;
        read.unwrap();
        assert!(elapsed < FAST, "the read took {elapsed:?}");
        assert_eq!(client.stats().hedges, hedges_before + 1);
        assert_eq!(requests_to(&cluster.take_log(), "n1").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn writes_and_reads_without_hedging_wait_for_the_slow_replica() {
    bounded(async {
        let cluster = Cluster::start();
        let client = cluster
            .builder()
            .hedge(Hedge::After(Duration::from_millis(50)))
            .build()
            .await
            .unwrap();
        let key = cluster.keys_coordinated_by("n2", 1).remove(0);
        cluster
            .script()
            .delay
            .insert("n2".into(), Duration::from_millis(500));
        cluster.take_log();
        client
            .put(
                DEFAULT_KEYSPACE,
                &key,
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .unwrap();
        let log = cluster.take_log();
        assert_eq!(log.len(), 1, "a write is never hedged: {log:?}");
        assert_eq!(log[0].0, "n2");
        assert_eq!(client.stats().hedges, 0);

        let client = cluster.builder().hedge(Hedge::Never).build().await.unwrap();
        cluster.take_log();
        client
            .get(DEFAULT_KEYSPACE, &key, ReadOptions::default())
            .await
            .unwrap();
        let log = cluster.take_log();
        assert_eq!(log.len(), 1, "hedging is off: {log:?}");
        assert_eq!(log[0].0, "n2");
        assert_eq!(client.stats().hedges, 0);
    })
    .await;
}

#[tokio::test]
async fn a_write_on_a_connection_that_goes_silent_moves_on_without_waiting_for_its_timeout() {
    bounded(async {
        let cluster = Cluster::start_with(Setup {
            relay_n2: true,
            // The old client waited this long for the dead node's answer.
            request_timeout_ms: Some(OLD_STALL.as_millis() as u64),
        });
        let client = cluster.client().await;
        let key = cluster.keys_coordinated_by("n2", 1).remove(0);
        // A connection to n2 is established and in use...
        client
            .get(DEFAULT_KEYSPACE, &key, ReadOptions::default())
            .await
            .unwrap();
        assert_eq!(requests_to(&cluster.take_log(), "n2").len(), 1);
        // ...when n2 dies.
        cluster.relay.as_ref().unwrap().play_dead(true);
        let (written, elapsed) = timed(client.put(
            DEFAULT_KEYSPACE,
            &key,
            b"v".to_vec(),
            None,
            WriteOptions::default(),
        ))
        .await;
        written.unwrap();
        assert!(elapsed < FAST, "the put took {elapsed:?}");
        // The write was sent to n2 (which never got it) and, once the connection was found
        // silent, to n1: one attempt at a time, and n1 saw it once.
        let log = cluster.take_log();
        assert_eq!(requests_to(&log, "n1").len(), 1, "{log:?}");
        let stats = client.stats();
        let n2 = node(&stats, "n2").unwrap();
        assert_eq!(n2.attempts, 2, "the read, then the write: {stats:?}");
        assert!(n2.down, "{stats:?}");
        assert_eq!(stats.hedges, 0);
    })
    .await;
}

#[tokio::test]
async fn an_attempt_waits_for_the_clusters_timeout_plus_a_margin_not_a_fixed_five_seconds() {
    bounded(async {
        let cluster = Cluster::start_with(Setup {
            request_timeout_ms: Some(300),
            ..Setup::default()
        });
        let client = cluster.builder().retries(0).build().await.unwrap();
        cluster.take_log();
        cluster.script().silent = true;
        let key = cluster.keys_coordinated_by("n1", 1).remove(0);
        let put = |options| client.put(DEFAULT_KEYSPACE, &key, b"v".to_vec(), None, options);

        // No timeout of its own: the cluster's 300 ms plus the 500 ms margin. The client before
        // this waited its fixed 5 s.
        let (result, elapsed) = timed(put(WriteOptions::default())).await;
        assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");

        // A request's own timeout lengthens the wait: the node would answer at 2 s.
        let options = WriteOptions {
            timeout_ms: Some(2_000),
            ..WriteOptions::default()
        };
        let (result, elapsed) = timed(put(options)).await;
        assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
        assert!(
            elapsed >= Duration::from_secs(2),
            "gave up early: {elapsed:?}"
        );
        assert_eq!(cluster.take_log().len(), 2, "one attempt each");
    })
    .await;
}

#[tokio::test]
async fn a_requests_own_timeout_shortens_the_wait_and_old_clusters_get_the_default() {
    bounded(async {
        // A cluster that does not report its timeout (an older node).
        let cluster = Cluster::start();
        let client = cluster
            .builder()
            .retries(0)
            // A fixed bound for requests without their own timeout...
            .request_timeout(OLD_STALL)
            .build()
            .await
            .unwrap();
        cluster.script().silent = true;
        let key = cluster.keys_coordinated_by("n1", 1).remove(0);
        // ...does not hold up a request that asks for 100 ms.
        let options = WriteOptions {
            timeout_ms: Some(100),
            ..WriteOptions::default()
        };
        let (result, elapsed) =
            timed(client.put(DEFAULT_KEYSPACE, &key, b"v".to_vec(), None, options)).await;
        assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
        assert!(elapsed < FAST, "{elapsed:?}");

        // Without the fixed bound, an old cluster's nodes are assumed to wait their default 2 s.
        let client = cluster.builder().retries(0).build().await.unwrap();
        let (result, elapsed) = timed(client.put(
            DEFAULT_KEYSPACE,
            &key,
            b"v".to_vec(),
            None,
            WriteOptions::default(),
        ))
        .await;
        assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
        assert!(
            elapsed >= Duration::from_secs(2),
            "gave up early: {elapsed:?}"
        );
        assert!(elapsed < FAST, "{elapsed:?}");
    })
    .await;
}
