//! Read repair, told with the deterministic driver: a read that finds a replica behind writes
//! the merged version back to it, after the reply by default and before it when the request
//! asks for blocking repair.

use quorumkv_client::protocol::{ErrorKind, ReadOptions, ReadRepair, Response};
use quorumkv_node::core::driver::Driver;
use quorumkv_node::core::CoreConfig;
use quorumkv_ring::NodeId;

fn blocking(r: u8) -> ReadOptions {
    ReadOptions {
        r: Some(r),
        repair: ReadRepair::Blocking,
        ..ReadOptions::default()
    }
}

/// A cluster where only `holder` has "v1" of key "k" (written at W = 1 while it was cut off
/// from both other nodes), with every link healed again.
fn one_fresh_replica() -> (Driver, [NodeId; 3]) {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    cluster.cut(&n1, &n2);
    cluster.cut(&n1, &n3);
    let put = cluster.put(&n1, "k", "v1", 1);
    cluster.settle();
    assert!(cluster.written(put), "{:?}", cluster.reply(put));
    cluster.heal();
    assert!(cluster.values(&n2, "k").is_empty());
    assert!(cluster.values(&n3, "k").is_empty());
    (cluster, [n1, n2, n3])
}

/// Delivers messages one at a time until `handle` is answered.
fn deliver_until_answered(cluster: &mut Driver, handle: quorumkv_node::core::ClientHandle) {
    while cluster.reply(handle).is_none() {
        assert!(
            cluster.deliver_next(),
            "nothing left to deliver and no answer"
        );
    }
}

#[test]
fn a_read_repairs_every_replica_it_found_behind_without_any_write() {
    let (mut cluster, [n1, n2, n3]) = one_fresh_replica();

    let get = cluster.get(&n1, "k", 2);
    cluster.settle();
    assert_eq!(cluster.got(get), Some(vec!["v1".to_string()]));
    // Both replicas that answered with nothing now hold the merged version, the one that
    // answered after the reply included.
    assert_eq!(cluster.values(&n2, "k"), ["v1"]);
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
    assert_eq!(cluster.core(&n1).unwrap().in_flight(), 0);
}

#[test]
fn the_coordinator_repairs_its_own_stale_copy_too() {
    let (mut cluster, [n1, n2, _n3]) = one_fresh_replica();

    // n2 coordinates: its own copy is the stale one.
    let get = cluster.get(&n2, "k", 3);
    cluster.settle();
    assert_eq!(cluster.got(get), Some(vec!["v1".to_string()]));
    assert_eq!(cluster.values(&n2, "k"), ["v1"]);
    assert_eq!(cluster.values(&n1, "k"), ["v1"]);
}

#[test]
fn siblings_on_different_replicas_are_joined_on_every_replica() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    // Two blind writes, each reaching only its coordinator: concurrent, so siblings.
    cluster.cut(&n1, &n2);
    cluster.cut(&n1, &n3);
    cluster.cut(&n2, &n3);
    let a = cluster.put(&n1, "k", "a", 1);
    let b = cluster.put(&n2, "k", "b", 1);
    cluster.settle();
    assert!(cluster.written(a) && cluster.written(b));
    cluster.heal();

    let get = cluster.get(&n3, "k", 3);
    cluster.settle();
    assert_eq!(
        cluster.got(get),
        Some(vec!["a".to_string(), "b".to_string()])
    );
    for node in [&n1, &n2, &n3] {
        assert_eq!(cluster.values(node, "k"), ["a", "b"], "on {node}");
    }
}

#[test]
fn background_repair_never_delays_the_reply() {
    let (mut cluster, [n1, n2, n3]) = one_fresh_replica();

    // R = 1 at the fresh replica: the reply goes out before any message is delivered ...
    let get = cluster.get(&n1, "k", 1);
    assert_eq!(cluster.got(get), Some(vec!["v1".to_string()]));
    assert!(cluster.values(&n2, "k").is_empty());
    // ... and the late answers still lead to repairs.
    cluster.settle();
    assert_eq!(cluster.values(&n2, "k"), ["v1"]);
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
}

#[test]
fn a_blocking_read_answers_only_once_r_replicas_hold_what_it_returns() {
    let (mut cluster, [n1, n2, _n3]) = one_fresh_replica();

    // R = 2 at n1: n1's copy and the first empty answer make the quorum. A background read
    // would answer now; a blocking one repairs the empty replica first.
    let get = cluster.get_with(&n1, "k", blocking(2));
    deliver_until_answered(&mut cluster, get);
    assert_eq!(cluster.got(get), Some(vec!["v1".to_string()]));
    let holders = [&n2, &_n3]
        .iter()
        .filter(|node| cluster.values(node, "k") == ["v1"])
        .count();
    assert!(
        holders >= 1,
        "when the blocking read answered, a second replica already held v1"
    );
}

#[test]
fn a_background_read_answers_before_the_repair_lands() {
    // The counterpart of the blocking story, so that one can fail: same cluster, same read,
    // background repair.
    let (mut cluster, [n1, n2, n3]) = one_fresh_replica();
    let get = cluster.get(&n1, "k", 2);
    deliver_until_answered(&mut cluster, get);
    assert!(cluster.values(&n2, "k").is_empty() && cluster.values(&n3, "k").is_empty());
}

#[test]
fn a_blocking_read_whose_repair_cannot_land_fails_and_says_so() {
    let (mut cluster, [n1, n2, n3]) = one_fresh_replica();

    let get = cluster.get_with(&n1, "k", blocking(2));
    // The read requests reach n2 and n3; then n1 can no longer send to them, so the repairs
    // are lost while their answers still arrive.
    assert!(cluster.deliver_next() && cluster.deliver_next());
    cluster.cut_one_way(&n1, &n2);
    cluster.cut_one_way(&n1, &n3);
    cluster.settle();
    assert!(cluster.reply(get).is_none(), "waits for the repair");
    cluster.advance(CoreConfig::default().request_timeout_ms);
    match cluster.reply(get) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::QuorumNotReached, "{}", e.message);
            let quorum = e.quorum.expect("quorum details");
            assert_eq!((quorum.required, quorum.acked), (2, 1), "{}", e.message);
            assert!(e.message.contains("read repair"), "{}", e.message);
        }
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
}

#[test]
fn a_replica_believed_down_is_left_to_the_other_repair_mechanisms() {
    let (mut cluster, [n1, n2, n3]) = one_fresh_replica();
    cluster.crash(&n3);
    // Long enough for n1's failure detector to count n3 down.
    cluster.advance(CoreConfig::default().peer_down_after_ms + 1_000);
    let get = cluster.get(&n1, "k", 2);
    cluster.settle();
    assert_eq!(cluster.got(get), Some(vec!["v1".to_string()]));
    assert_eq!(cluster.values(&n2, "k"), ["v1"]);
    assert_eq!(cluster.core(&n1).unwrap().in_flight(), 0);
    // Nothing is left waiting on the down replica.
    cluster.advance(CoreConfig::default().request_timeout_ms);
    assert!(cluster.values(&n3, "k").is_empty());
}
