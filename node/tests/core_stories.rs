//! Scenarios of the replication core, told step by step with the deterministic driver
//! (`quorumkv_node::core::driver`): which messages arrive, which links are cut, which node
//! crashes, and what each replica holds afterwards.

use quorumkv_client::protocol::{ErrorKind, Response};
use quorumkv_node::core::driver::Driver;
use quorumkv_node::core::CoreConfig;

fn context_of(
    cluster: &Driver,
    handle: quorumkv_node::core::ClientHandle,
) -> quorumkv_client::Context {
    match cluster.reply(handle) {
        Some(Response::Got { context, .. }) | Some(Response::Written { context, .. }) => {
            context.clone()
        }
        other => panic!("no context in {other:?}"),
    }
}

#[test]
fn a_write_reaches_every_replica_it_can_and_w_decides_the_answer() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();

    // n1 cannot reach n2. A write at W = 2 still succeeds through n1 and n3 ...
    cluster.cut(&n1, &n2);
    let put = cluster.put(&n1, "k", "v1", 2);
    cluster.settle();
    assert!(cluster.written(put), "{:?}", cluster.reply(put));
    assert_eq!(cluster.values(&n1, "k"), ["v1"]);
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
    // ... and n2, which the write never reached, does not have it.
    assert!(cluster.values(&n2, "k").is_empty());

    // A write at W = 3 cannot succeed while the link is cut: it fails at its deadline, and
    // says so (the write was applied on two replicas).
    let put = cluster.put(&n1, "k2", "v", 3);
    cluster.settle();
    assert!(
        cluster.reply(put).is_none(),
        "waits for n2 until its deadline"
    );
    cluster.advance(CoreConfig::default().request_timeout_ms);
    match cluster.reply(put) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::QuorumNotReached);
            let quorum = e.quorum.expect("quorum details");
            assert_eq!((quorum.required, quorum.acked), (3, 2));
        }
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
}

#[test]
fn concurrent_writes_become_siblings_and_a_write_with_the_read_context_replaces_them() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();

    // Two clients write the same key at two coordinators, neither having read the other's.
    let a = cluster.put(&n1, "k", "from-a", 2);
    let b = cluster.put(&n2, "k", "from-b", 2);
    cluster.settle();
    assert!(cluster.written(a) && cluster.written(b));

    let read = cluster.get(&n3, "k", 3);
    cluster.settle();
    assert_eq!(
        cluster.got(read).expect("the read succeeds"),
        ["from-a", "from-b"]
    );

    // A write with the read's context replaces exactly the two siblings it saw.
    let context = context_of(&cluster, read);
    let resolve = cluster.put_with(&n3, "k", "merged", Some(context), 3);
    cluster.settle();
    assert!(cluster.written(resolve));
    for node in [&n1, &n2, &n3] {
        assert_eq!(cluster.values(node, "k"), ["merged"], "on {node}");
    }
}

#[test]
fn a_crash_keeps_what_was_flushed_and_the_node_comes_back_as_a_new_incarnation() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, _n3] = cluster.ids();

    // A durable write (dw = 1) is acknowledged only after its coordinator's flush.
    let put = cluster.put(&n1, "k", "durable", 2);
    while cluster.deliver_next() {}
    assert!(cluster.reply(put).is_none(), "not before the flush");
    assert!(cluster.complete_flush(&n1));
    cluster.settle();
    assert!(cluster.written(put));

    // n1 crashes and restarts: the acknowledged write survives, under a new actor.
    let actor_before = cluster.core(&n1).expect("running").clock().actor();
    cluster.crash(&n1);
    cluster.restart(&n1);
    assert_ne!(
        cluster.core(&n1).expect("running").clock().actor(),
        actor_before
    );
    assert_eq!(cluster.values(&n1, "k"), ["durable"]);

    // Its next write of the key does not drop the old value it never read.
    let put = cluster.put(&n1, "k", "after-restart", 2);
    cluster.settle();
    assert!(cluster.written(put));
    assert_eq!(cluster.values(&n2, "k"), ["after-restart", "durable"]);
}

#[test]
fn a_node_that_is_not_a_replica_forwards_to_one_that_is() {
    // Four nodes and N = 2: every key has two nodes that are not its replicas.
    let mut cluster = Driver::new(4, 2, CoreConfig::default());
    let ids: [_; 4] = cluster.ids();
    let replicas: Vec<String> = cluster
        .map()
        .ring
        .preference_list_for("default", b"k", 2)
        .expect("placed")
        .ids()
        .map(|id| id.to_string())
        .collect();
    let outsider = ids
        .iter()
        .find(|id| !replicas.contains(&id.to_string()))
        .expect("a node outside the preference list")
        .clone();

    let put = cluster.put(&outsider, "k", "v", 2);
    cluster.settle();
    assert!(cluster.written(put), "{:?}", cluster.reply(put));
    assert!(
        cluster.values(&outsider, "k").is_empty(),
        "not stored off its replicas"
    );
    for id in &ids {
        if replicas.contains(&id.to_string()) {
            assert_eq!(cluster.values(id, "k"), ["v"], "on replica {id}");
        }
    }
}

#[test]
fn an_answer_meant_for_a_previous_instance_never_lands_on_a_new_operation() {
    // Keys "a" and "b" live on all three nodes. n1 asks n2 and n3 for "a" ...
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, _n3] = cluster.ids();
    let put = cluster.put(&n2, "a", "value-of-a", 3);
    cluster.settle();
    assert!(cluster.written(put));
    let _lost = cluster.get(&n1, "a", 3);
    // ... n2 and n3 answer (the answers are in flight to n1) ...
    assert_eq!(cluster.in_flight(), 2, "two reads in flight");
    assert!(cluster.deliver_next() && cluster.deliver_next());
    assert_eq!(cluster.in_flight(), 2, "two answers in flight");
    // ... and n1 crashes and restarts before they arrive. Its first new operation reads "b".
    cluster.crash(&n1);
    cluster.restart(&n1);
    let read_b = cluster.get(&n1, "b", 2);
    cluster.settle();
    // The stale answers about "a" must not be taken for answers about "b".
    assert_eq!(
        cluster.got(read_b).expect("the read of b succeeds"),
        Vec::<String>::new(),
        "a value of key a leaked into a read of key b"
    );
}

#[test]
fn a_key_at_its_sibling_limit_refuses_blind_writes_until_a_write_resolves_it() {
    let config = CoreConfig {
        siblings_per_key_max: 3,
        siblings_per_key_warn: 2,
        ..CoreConfig::default()
    };
    let mut cluster = Driver::new(3, 3, config);
    let [n1, n2, _n3] = cluster.ids();
    for value in ["a", "b", "c"] {
        let put = cluster.put(&n1, "k", value, 2);
        cluster.settle();
        assert!(cluster.written(put), "{value}: {:?}", cluster.reply(put));
    }
    // A fourth concurrent value would be one sibling too many: refused, naming the limit.
    let put = cluster.put(&n2, "k", "d", 2);
    cluster.settle();
    match cluster.reply(put) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(
                e.message.contains("siblings_per_key_max = 3"),
                "{}",
                e.message
            );
        }
        other => panic!("expected the sibling limit, got {other:?}"),
    }
    // Reads still work, and a write with the read's context resolves the key.
    let read = cluster.get(&n2, "k", 2);
    cluster.settle();
    assert_eq!(cluster.got(read).expect("read"), ["a", "b", "c"]);
    let context = context_of(&cluster, read);
    let resolve = cluster.put_with(&n2, "k", "resolved", Some(context), 2);
    cluster.settle();
    assert!(cluster.written(resolve), "{:?}", cluster.reply(resolve));
    assert_eq!(cluster.values(&n1, "k"), ["resolved"]);
}

#[test]
fn a_key_state_larger_than_one_replication_frame_is_refused() {
    let config = CoreConfig {
        key_state_bytes_max: 1_000,
        ..CoreConfig::default()
    };
    let mut cluster = Driver::new(3, 3, config);
    let [n1, _n2, _n3] = cluster.ids();
    let big = "x".repeat(400);
    let first = cluster.put(&n1, "k", &big, 2);
    let second = cluster.put(&n1, "k", &big, 2);
    let third = cluster.put(&n1, "k", &big, 2);
    cluster.settle();
    assert!(cluster.written(first) && cluster.written(second));
    match cluster.reply(third) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(e.message.contains("frame_bytes_max"), "{}", e.message);
        }
        other => panic!("expected the key-state limit, got {other:?}"),
    }
}

#[test]
fn a_read_never_hands_out_a_context_that_writes_refuse() {
    // Each coordinator writes under its own actor; with room for two entries, the third
    // actor's first write to the key is refused, so the key's context stays within the limit
    // and any context a read returns is accepted by a write.
    let config = CoreConfig {
        context_entries_max: 2,
        ..CoreConfig::default()
    };
    let mut cluster = Driver::new(3, 3, config);
    let [n1, n2, n3] = cluster.ids();
    let a = cluster.put(&n1, "k", "a", 3);
    cluster.settle();
    let b = cluster.put(&n2, "k", "b", 3);
    cluster.settle();
    assert!(cluster.written(a) && cluster.written(b));
    let c = cluster.put(&n3, "k", "c", 3);
    cluster.settle();
    match cluster.reply(c) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(
                e.message.contains("context_entries_max = 2"),
                "{}",
                e.message
            );
        }
        other => panic!("expected the context limit, got {other:?}"),
    }
    // Whatever a read returns, a write with it is accepted.
    for reader in [&n1, &n2, &n3] {
        let read = cluster.get(reader, "k", 3);
        cluster.settle();
        let context = context_of(&cluster, read);
        let write = cluster.put_with(&n1, "k", "resolved", Some(context), 3);
        cluster.settle();
        assert!(cluster.written(write), "{:?}", cluster.reply(write));
    }
}

#[test]
fn a_durable_write_stops_waiting_for_a_replica_that_died_before_its_flush() {
    // W = 2, dw = 2, and n3 is cut off: the write needs n2's durable answer. n2 merges the write
    // and dies before flushing it; the write must fail as soon as n2 is found down, not wait
    // out its (long) deadline.
    let config = CoreConfig {
        request_timeout_ms: 60_000,
        ping_interval_ms: 50,
        peer_down_after_ms: 300,
        ..CoreConfig::default()
    };
    let mut cluster = Driver::new(3, 3, config);
    let [n1, n2, n3] = cluster.ids();
    cluster.cut(&n1, &n3);
    let put = cluster.request(
        &n1,
        quorumkv_client::protocol::Request::Put {
            keyspace: "default".into(),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            context: None,
            request_id: quorumkv_client::protocol::RequestId([9; 16]),
            options: quorumkv_client::protocol::WriteOptions {
                w: Some(2),
                dw: Some(2),
                timeout_ms: None,
                ..quorumkv_client::protocol::WriteOptions::default()
            },
        },
    );
    // Deliver the replica write; n2 applies it, then crashes before any flush completes.
    while cluster.deliver_next() {}
    assert_eq!(cluster.values(&n2, "k"), ["v"]);
    cluster.crash(&n2);
    cluster.settle();
    assert!(cluster.reply(put).is_none(), "still waiting for n2");
    for _ in 0..10 {
        cluster.advance(100);
    }
    match cluster.reply(put) {
        Some(Response::Error(e)) => assert_eq!(e.kind, ErrorKind::QuorumNotReached),
        other => panic!("n2's death must fail the write within a second, got {other:?}"),
    }
}

#[test]
fn a_node_whose_storage_failed_takes_itself_out_of_service() {
    let config = CoreConfig {
        ping_interval_ms: 50,
        peer_down_after_ms: 300,
        ..CoreConfig::default()
    };
    let mut cluster = Driver::new(3, 3, config);
    let [n1, n2, _n3] = cluster.ids();
    cluster.storage(&n1).fail("No space left on device");

    // A client at n1 is told to go elsewhere (Unavailable is retryable), and n1 says so.
    let put = cluster.put(&n1, "k", "v", 2);
    cluster.settle();
    match cluster.reply(put) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::Unavailable);
            assert!(e.message.contains("out of service"), "{}", e.message);
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(!cluster.core(&n1).expect("running").in_service());
    // A write n1 refuses leaves n2 a hint for it, which n2 then tries to hand off on every
    // tick: n1 must not answer those either, or it would look alive.
    let put = cluster.put(&n2, "before", "v", 2);
    cluster.settle();
    assert!(cluster.written(put), "{:?}", cluster.reply(put));

    // n1 answers no more pings or requests, so its peers count it down; writes go on without
    // it.
    for _ in 0..5 {
        cluster.advance(100);
    }
    let n1_down = cluster
        .core(&n2)
        .expect("running")
        .peer_liveness()
        .any(|(node, l)| *node == n1 && l == quorumkv_node::core::detector::Liveness::Down);
    assert!(n1_down, "n2 still believes n1 up");
    let put = cluster.put(&n2, "k", "v", 2);
    cluster.settle();
    assert!(cluster.written(put), "{:?}", cluster.reply(put));
    // And it stays out of service until it is restarted.
    let put = cluster.put(&n1, "k2", "v", 1);
    cluster.settle();
    assert!(
        matches!(cluster.reply(put), Some(Response::Error(e)) if e.kind == ErrorKind::Unavailable)
    );
}

/// Hardening defect 4, the writer's side: a client whose write timed out at one coordinator
/// retries it at another, then writes again with the context that retry handed back. That
/// context's dots cover only the retry's copy, yet the first copy must go as well.
#[test]
fn a_write_after_a_retry_elsewhere_replaces_both_copies_of_the_retried_write() {
    use quorumkv_client::protocol::{Request, RequestId, WriteOptions};
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    cluster.cut(&n1, &n2);
    cluster.cut(&n1, &n3);
    let attempt = Request::Put {
        keyspace: "default".into(),
        key: b"k".to_vec(),
        value: b"x".to_vec(),
        context: None,
        request_id: RequestId([7; 16]),
        options: WriteOptions {
            w: Some(1),
            dw: Some(0),
            timeout_ms: None,
            ..WriteOptions::default()
        },
    };
    let first = cluster.request(&n1, attempt.clone());
    let retry = cluster.request(&n2, attempt);
    cluster.settle();
    assert!(cluster.written(first) && cluster.written(retry));
    let context = context_of(&cluster, retry);

    let next = cluster.put_with(&n1, "k", "y", Some(context), 1);
    cluster.settle();
    assert!(cluster.written(next));
    assert_eq!(cluster.values(&n1, "k"), ["y"], "the first copy survived");

    cluster.heal();
    let read = cluster.get(&n3, "k", 3);
    cluster.settle();
    assert_eq!(cluster.got(read).expect("the read succeeds"), ["y"]);
}
