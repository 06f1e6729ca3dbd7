//! Hinted handoff and sloppy quorums, told with the deterministic driver: owners that miss a
//! write get a hint, fallbacks stand in for owners that are down, and hints reach their owner
//! once it is back, then disappear.

use quorumkv_client::protocol::{ErrorKind, Response, WriteOptions};
use quorumkv_node::core::driver::Driver;
use quorumkv_node::core::CoreConfig;
use quorumkv_ring::NodeId;

/// Time for a failure detector to count a silent peer down.
fn detect_down() -> u64 {
    CoreConfig::default().peer_down_after_ms + 1_000
}

/// Lets time pass in ping-sized steps, so detectors notice a returning node and hints flow.
fn run_for(cluster: &mut Driver, ms: u64) {
    let step = CoreConfig::default().ping_interval_ms;
    for _ in 0..ms.div_ceil(step) {
        cluster.advance(step);
    }
}

fn options(w: u8) -> WriteOptions {
    WriteOptions {
        w: Some(w),
        dw: Some(1),
        ..WriteOptions::default()
    }
}

fn hinted(cluster: &Driver, handle: quorumkv_node::core::ClientHandle) -> u8 {
    match cluster.reply(handle) {
        Some(Response::Written { hinted, .. }) => *hinted,
        other => panic!("expected Written, got {other:?}"),
    }
}

#[test]
fn an_owner_that_was_down_gets_the_write_from_the_coordinators_hint() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, _n2, n3] = cluster.ids();
    cluster.crash(&n3);
    cluster.advance(detect_down());

    let put = cluster.put(&n1, "k", "v1", 2);
    cluster.settle();
    assert_eq!(
        hinted(&cluster, put),
        0,
        "no fallback exists with 3 nodes and N = 3"
    );
    assert_eq!(cluster.hints(&n1), [(n3.clone(), 1)]);

    cluster.restart(&n3);
    assert!(cluster.values(&n3, "k").is_empty());
    run_for(&mut cluster, 3_000);
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
    assert!(cluster.hints(&n1).is_empty(), "delivered hints are deleted");
}

#[test]
fn an_owner_that_stayed_silent_gets_a_hint_when_the_write_ends() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, _n2, n3] = cluster.ids();
    // n3 is up as far as n1 knows, but the write never reaches it.
    cluster.cut_one_way(&n1, &n3);
    let put = cluster.put(&n1, "k", "v1", 2);
    cluster.settle();
    assert!(cluster.written(put));
    assert!(cluster.hints(&n1).is_empty(), "n3 may still answer");
    // The write's deadline passes without n3's answer: n3 gets a hint.
    cluster.advance(CoreConfig::default().request_timeout_ms);
    assert_eq!(cluster.hints(&n1), [(n3.clone(), 1)]);

    cluster.heal();
    run_for(&mut cluster, 3_000);
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
    assert!(cluster.hints(&n1).is_empty());
}

#[test]
fn a_write_every_owner_applied_leaves_no_hint() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    let put = cluster.put(&n1, "k", "v1", 2);
    cluster.settle();
    assert!(cluster.written(put));
    run_for(&mut cluster, CoreConfig::default().request_timeout_ms);
    for node in [&n1, &n2, &n3] {
        assert!(cluster.hints(node).is_empty(), "{node}");
    }
}

/// Four nodes, N = 3, and a key coordinated by one of its owners: (cluster, coordinator, the
/// owner to take down, the fallback).
fn four_nodes(config: CoreConfig) -> (Driver, String, NodeId, NodeId, NodeId) {
    let cluster = Driver::new(4, 3, config);
    let [n1, n2, n3, n4]: [NodeId; 4] = cluster.ids();
    for i in 0..1000 {
        let key = format!("k{i}");
        let owners = cluster.owners(&key);
        if owners.contains(&n1) && !owners.contains(&n4) {
            let down = if owners.contains(&n2) { n2 } else { n3 };
            return (cluster, key, n1, down, n4);
        }
    }
    panic!("no key owned by n1 and not n4");
}

#[test]
fn under_a_sloppy_quorum_a_fallback_stands_in_for_an_owner_that_is_down() {
    let (mut cluster, key, coordinator, down, fallback) = four_nodes(CoreConfig::default());
    cluster.crash(&down);
    cluster.advance(detect_down());

    let put = cluster.put_options(&coordinator, &key, "v1", options(3));
    cluster.settle();
    assert_eq!(hinted(&cluster, put), 1, "{:?}", cluster.reply(put));
    // The fallback keeps the write as a hint for the owner, not as data of its own.
    assert_eq!(cluster.hints(&fallback), [(down.clone(), 1)]);
    assert!(cluster.values(&fallback, &key).is_empty());

    cluster.restart(&down);
    run_for(&mut cluster, 3_000);
    assert_eq!(cluster.values(&down, &key), ["v1"]);
    assert!(cluster.hints(&fallback).is_empty());
    assert!(cluster.hints(&coordinator).is_empty());
}

#[test]
fn pw_counts_primary_owners_only() {
    let (mut cluster, key, coordinator, down, _fallback) = four_nodes(CoreConfig::default());
    cluster.crash(&down);
    cluster.advance(detect_down());

    let put = cluster.put_options(
        &coordinator,
        &key,
        "v1",
        WriteOptions {
            pw: Some(3),
            ..options(3)
        },
    );
    cluster.settle();
    match cluster.reply(put) {
        Some(Response::Error(e)) => assert_eq!(e.kind, ErrorKind::QuorumNotReached, "{e:?}"),
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
    // pw = 2 is met by the two owners that are up, with the fallback filling W = 3.
    let put = cluster.put_options(
        &coordinator,
        &key,
        "v2",
        WriteOptions {
            pw: Some(2),
            ..options(3)
        },
    );
    cluster.settle();
    assert_eq!(hinted(&cluster, put), 1);
}

#[test]
fn without_sloppy_quorum_no_fallback_is_asked_and_the_coordinator_keeps_the_hint() {
    let (mut cluster, key, coordinator, down, fallback) = four_nodes(CoreConfig::default());
    cluster.crash(&down);
    cluster.advance(detect_down());

    let strict = WriteOptions {
        sloppy_quorum: Some(false),
        ..options(3)
    };
    let put = cluster.put_options(&coordinator, &key, "v1", strict);
    cluster.settle();
    match cluster.reply(put) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::QuorumNotReached, "{e:?}");
            assert_eq!(e.quorum.map(|q| (q.required, q.acked)), Some((3, 2)));
        }
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
    assert!(cluster.hints(&fallback).is_empty());
    // The write reached two owners and failed W = 3; the third owner still gets it later.
    assert_eq!(cluster.hints(&coordinator), [(down.clone(), 1)]);
    cluster.restart(&down);
    run_for(&mut cluster, 3_000);
    assert_eq!(cluster.values(&down, &key), ["v1"]);
}

#[test]
fn a_fallback_at_its_bound_refuses_and_its_refusal_does_not_count() {
    let config = CoreConfig {
        hint_bytes_per_target_max: 16,
        ..CoreConfig::default()
    };
    let (mut cluster, key, coordinator, down, fallback) = four_nodes(config);
    cluster.crash(&down);
    cluster.advance(detect_down());

    let put = cluster.put_options(&coordinator, &key, "v1", options(3));
    cluster.settle();
    match cluster.reply(put) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::QuorumNotReached, "{e:?}");
            assert_eq!(e.quorum.map(|q| (q.required, q.acked)), Some((3, 2)));
        }
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
    assert!(cluster.hints(&fallback).is_empty());
    // The coordinator's own hint is over the bound too: dropped, left to anti-entropy.
    assert!(cluster.hints(&coordinator).is_empty());
}

#[test]
fn hints_survive_a_restart_of_the_node_holding_them() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, _n2, n3] = cluster.ids();
    cluster.crash(&n3);
    cluster.advance(detect_down());
    // dw = 1: the coordinator's flush covers the data and its hint, written together.
    let put = cluster.put(&n1, "k", "v1", 2);
    cluster.settle();
    assert!(cluster.written(put));
    cluster.crash(&n1);
    cluster.restart(&n1);
    cluster.restart(&n3);
    run_for(&mut cluster, 3_000);
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
    assert!(cluster.hints(&n1).is_empty());
}

#[test]
fn hints_for_an_isolated_owner_are_delivered_after_the_heal() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    cluster.cut(&n1, &n3);
    cluster.cut(&n2, &n3);
    run_for(&mut cluster, detect_down());
    for i in 0..20 {
        let coordinator = if i % 2 == 0 { &n1 } else { &n2 };
        let put = cluster.put(coordinator, &format!("cold-{i}"), "v", 2);
        cluster.settle();
        assert!(cluster.written(put), "{:?}", cluster.reply(put));
    }
    assert_eq!(cluster.hints(&n1), [(n3.clone(), 10)]);
    assert_eq!(cluster.hints(&n2), [(n3.clone(), 10)]);
    cluster.heal();
    run_for(&mut cluster, 5_000);
    assert!(cluster.hints(&n1).is_empty(), "{:?}", cluster.hints(&n1));
    assert!(cluster.hints(&n2).is_empty(), "{:?}", cluster.hints(&n2));
    for i in 0..20 {
        assert_eq!(cluster.values(&n3, &format!("cold-{i}")), ["v"]);
    }
}

#[test]
fn a_node_restarted_with_hints_counts_each_once_even_if_it_writes_before_its_first_tick() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, _n2, n3] = cluster.ids();
    cluster.crash(&n3);
    cluster.advance(detect_down());
    let put = cluster.put(&n1, "before", "v", 2);
    cluster.settle();
    assert!(cluster.written(put));
    assert_eq!(cluster.hints(&n1), [(n3.clone(), 1)]);

    // n1 restarts and takes a write before any tick: its stored hint and the new one.
    cluster.crash(&n1);
    cluster.restart(&n1);
    let put = cluster.put(&n1, "after", "v", 2);
    cluster.settle();
    assert!(cluster.written(put), "{:?}", cluster.reply(put));
    cluster.advance(CoreConfig::default().request_timeout_ms);
    assert_eq!(cluster.hints(&n1), [(n3.clone(), 2)]);

    cluster.restart(&n3);
    run_for(&mut cluster, 3_000);
    assert_eq!(cluster.values(&n3, "before"), ["v"]);
    assert_eq!(cluster.values(&n3, "after"), ["v"]);
    assert!(cluster.hints(&n1).is_empty(), "{:?}", cluster.hints(&n1));
}
