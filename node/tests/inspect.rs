//! Inspection (`Request::Replicas`, `quorumkv admin replicas`), told with the deterministic
//! driver: each replica's copy is shown as it is, a stale one as stale, and nothing is repaired
//! or written; a replica that is down or silent is an entry of the answer, not an error.

use quorumkv_client::protocol::{
    ReplicaAnswer, ReplicaCopy, ReplicaRole, Request, Response, StoredCopy,
};
use quorumkv_node::core::driver::{Driver, KEYSPACE};
use quorumkv_node::core::{ClientHandle, CoreConfig};
use quorumkv_node::storage::Storage;
use quorumkv_ring::NodeId;

fn inspect(cluster: &mut Driver, node: &NodeId, key: &str) -> ClientHandle {
    cluster.request(
        node,
        Request::Replicas {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
        },
    )
}

/// The answer to inspection `handle`; panics on anything else.
fn inspected(cluster: &Driver, handle: ClientHandle) -> Vec<ReplicaCopy> {
    match cluster.reply(handle) {
        Some(Response::Replicas(copies)) => copies.clone(),
        other => panic!("expected Replicas, got {other:?}"),
    }
}

fn stored<'a>(copies: &'a [ReplicaCopy], node: &NodeId) -> &'a StoredCopy {
    match copies.iter().find(|copy| copy.node == node.as_str()) {
        Some(ReplicaCopy {
            answer: ReplicaAnswer::Stored(copy),
            ..
        }) => copy,
        other => panic!("expected a stored copy on {node}, got {other:?}"),
    }
}

fn answer<'a>(copies: &'a [ReplicaCopy], node: &NodeId) -> &'a ReplicaAnswer {
    &copies
        .iter()
        .find(|copy| copy.node == node.as_str())
        .unwrap_or_else(|| panic!("{node} is not in {copies:?}"))
        .answer
}

fn values(copy: &StoredCopy) -> Vec<String> {
    copy.siblings
        .iter()
        .map(|s| String::from_utf8_lossy(&s.value).into_owned())
        .collect()
}

/// What `node` stores for `key`, as canonical bytes (empty when nothing).
fn raw(cluster: &Driver, node: &NodeId, key: &str) -> Vec<u8> {
    cluster
        .storage(node)
        .read(KEYSPACE, key.as_bytes())
        .expect("memory storage reads")
        .map(|state| state.encode_canonical())
        .unwrap_or_default()
}

/// Three nodes, N = 3: "v1" everywhere, then "v2" (replacing it) written at W = 2 while n3 was
/// cut off, every link healed again. n3 is stale.
fn one_stale_replica() -> (Driver, [NodeId; 3]) {
    one_stale_replica_with(CoreConfig::default())
}

fn one_stale_replica_with(config: CoreConfig) -> (Driver, [NodeId; 3]) {
    let mut cluster = Driver::new(3, 3, config);
    let [n1, n2, n3] = cluster.ids();
    let first = cluster.put(&n1, "k", "v1", 3);
    cluster.settle();
    assert!(cluster.written(first), "{:?}", cluster.reply(first));
    let context = match cluster.reply(first) {
        Some(Response::Written { context, .. }) => context.clone(),
        other => panic!("{other:?}"),
    };
    cluster.cut(&n1, &n3);
    cluster.cut(&n2, &n3);
    let second = cluster.put_with(&n1, "k", "v2", Some(context), 2);
    cluster.settle();
    assert!(cluster.written(second), "{:?}", cluster.reply(second));
    cluster.heal();
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
    (cluster, [n1, n2, n3])
}

#[test]
fn an_inspection_shows_a_stale_replica_as_stale_and_repairs_nothing() {
    let (mut cluster, [n1, n2, n3]) = one_stale_replica();
    let before: Vec<Vec<u8>> = [&n1, &n2, &n3]
        .iter()
        .map(|node| raw(&cluster, node, "k"))
        .collect();

    // n3 inspects: its own copy is the stale one, which a get there would repair first.
    let handle = inspect(&mut cluster, &n3, "k");
    cluster.settle();
    let copies = inspected(&cluster, handle);
    let nodes: Vec<&str> = copies.iter().map(|copy| copy.node.as_str()).collect();
    let list: Vec<String> = cluster
        .map()
        .ring
        .preference_list_for(KEYSPACE, b"k", 3)
        .unwrap()
        .ids()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(nodes, list, "in preference-list order");
    for (position, copy) in copies.iter().enumerate() {
        assert_eq!(
            copy.role,
            ReplicaRole::Primary {
                position: position as u8
            }
        );
    }
    let (fresh, other, stale) = (
        stored(&copies, &n1),
        stored(&copies, &n2),
        stored(&copies, &n3),
    );
    assert_eq!(values(fresh), ["v2"]);
    assert_eq!(values(other), ["v2"]);
    assert_eq!(values(stale), ["v1"]);
    assert_eq!(fresh.state_hash, other.state_hash);
    assert_ne!(fresh.state_hash, stale.state_hash);
    assert!(!stale.deleted);
    // The stale copy has seen one write of the coordinator's actor, the fresh ones two.
    let counters = |copy: &StoredCopy| copy.version.values().copied().collect::<Vec<u64>>();
    assert_eq!(counters(stale), [1]);
    assert_eq!(counters(fresh), [2]);
    assert_eq!(
        fresh.version.keys().collect::<Vec<_>>(),
        stale.version.keys().collect::<Vec<_>>()
    );

    // Nothing was repaired or written, also after every deadline has passed.
    cluster.advance(CoreConfig::default().request_timeout_ms + 1);
    let after: Vec<Vec<u8>> = [&n1, &n2, &n3]
        .iter()
        .map(|node| raw(&cluster, node, "k"))
        .collect();
    assert_eq!(after, before);
    assert_eq!(cluster.values(&n3, "k"), ["v1"]);
    assert_eq!(cluster.core(&n3).unwrap().in_flight(), 0);

    // The counterpart, so the check above can fail: a get at the same node repairs n3.
    let get = cluster.get(&n3, "k", 2);
    cluster.settle();
    assert_eq!(cluster.got(get), Some(vec!["v2".to_string()]));
    assert_eq!(cluster.values(&n3, "k"), ["v2"]);
}

#[test]
fn a_replica_without_the_key_is_missing_and_a_deleted_copy_says_so() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    let handle = inspect(&mut cluster, &n1, "nobody-wrote-this");
    cluster.settle();
    let copies = inspected(&cluster, handle);
    assert_eq!(copies.len(), 3);
    assert!(copies
        .iter()
        .all(|copy| copy.answer == ReplicaAnswer::Missing));

    // A delete that reached n1 and n2 only.
    let put = cluster.put(&n1, "k", "v", 3);
    cluster.settle();
    let context = match cluster.reply(put) {
        Some(Response::Written { context, .. }) => context.clone(),
        other => panic!("{other:?}"),
    };
    cluster.cut(&n1, &n3);
    let delete = cluster.request(
        &n1,
        Request::Delete {
            keyspace: KEYSPACE.into(),
            key: b"k".to_vec(),
            context: Some(context),
            request_id: quorumkv_client::RequestId([9; 16]),
            options: quorumkv_client::WriteOptions {
                w: Some(2),
                ..Default::default()
            },
        },
    );
    cluster.settle();
    assert!(cluster.written(delete), "{:?}", cluster.reply(delete));
    cluster.heal();
    let handle = inspect(&mut cluster, &n2, "k");
    cluster.settle();
    let copies = inspected(&cluster, handle);
    let deleted = stored(&copies, &n1);
    assert!(
        deleted.deleted && deleted.siblings.is_empty(),
        "{deleted:?}"
    );
    assert_eq!(stored(&copies, &n2), deleted);
    let live = stored(&copies, &n3);
    assert!(!live.deleted);
    assert_eq!(values(live), ["v"]);
}

#[test]
fn a_crashed_replica_is_reported_failed_and_the_others_still_answer() {
    let (mut cluster, [n1, n2, n3]) = one_stale_replica();
    cluster.crash(&n3);

    // Before the failure detector notices: the read cannot be delivered.
    let handle = inspect(&mut cluster, &n1, "k");
    cluster.settle();
    let copies = inspected(&cluster, handle);
    assert!(
        matches!(answer(&copies, &n3), ReplicaAnswer::Failed { .. }),
        "{copies:?}"
    );
    assert_eq!(values(stored(&copies, &n1)), ["v2"]);
    assert_eq!(values(stored(&copies, &n2)), ["v2"]);

    // Once it is believed down, nothing is even sent to it.
    cluster.advance(CoreConfig::default().peer_down_after_ms + 1_000);
    let handle = inspect(&mut cluster, &n2, "k");
    assert!(cluster.reply(handle).is_none(), "n1's answer is still due");
    cluster.settle();
    let copies = inspected(&cluster, handle);
    match answer(&copies, &n3) {
        ReplicaAnswer::Failed { reason } => assert!(reason.contains("down"), "{reason}"),
        other => panic!("expected n3 failed, got {other:?}"),
    }
    assert_eq!(values(stored(&copies, &n1)), ["v2"]);
}

#[test]
fn a_silent_replica_is_reported_timed_out_at_the_deadline() {
    // A failure detector slower than the request timeout, so n3 is silent rather than down.
    let config = CoreConfig {
        peer_down_after_ms: 60_000,
        ..CoreConfig::default()
    };
    let (mut cluster, [n1, n2, n3]) = one_stale_replica_with(config.clone());
    // n3 answers, but nothing it sends reaches n1.
    cluster.cut_one_way(&n3, &n1);
    let handle = inspect(&mut cluster, &n1, "k");
    cluster.settle();
    assert!(
        cluster.reply(handle).is_none(),
        "waits for n3 until the deadline"
    );
    cluster.advance(config.request_timeout_ms);
    let copies = inspected(&cluster, handle);
    assert_eq!(answer(&copies, &n3), &ReplicaAnswer::TimedOut);
    assert_eq!(values(stored(&copies, &n2)), ["v2"]);
    assert_eq!(cluster.core(&n1).unwrap().in_flight(), 0);
}

#[test]
fn a_node_that_is_not_a_replica_inspects_without_forwarding() {
    let mut cluster = Driver::new(4, 3, CoreConfig::default());
    let [_n1, _n2, _n3, n4] = cluster.ids();
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|key| {
            !cluster
                .map()
                .ring
                .preference_list_for(KEYSPACE, key.as_bytes(), 3)
                .unwrap()
                .ids()
                .any(|id| *id == n4)
        })
        .expect("some key n4 does not replicate");
    let put = cluster.put(&n4, &key, "v", 3);
    cluster.settle();
    assert!(cluster.written(put));

    let handle = inspect(&mut cluster, &n4, &key);
    cluster.settle();
    let copies = inspected(&cluster, handle);
    assert_eq!(copies.len(), 3);
    assert!(copies.iter().all(|copy| copy.node != n4.as_str()));
    for copy in &copies {
        match &copy.answer {
            ReplicaAnswer::Stored(stored) => assert_eq!(values(stored), ["v"]),
            other => panic!("expected {} to hold v, got {other:?}", copy.node),
        }
    }
    assert!(raw(&cluster, &n4, &key).is_empty(), "n4 stored nothing");
}

#[test]
fn a_fallback_holding_a_hint_is_listed_after_the_owners_with_the_owner_it_is_for() {
    let config = CoreConfig::default();
    let mut cluster = Driver::new(4, 3, config.clone());
    let owners = cluster.owners("k");
    let all: [NodeId; 4] = cluster.ids();
    let fallback = all
        .iter()
        .find(|n| !owners.contains(n))
        .expect("four nodes, three owners")
        .clone();
    let away = owners[2].clone();
    cluster.crash(&away);
    for _ in 0..(config.peer_down_after_ms / 100 + 10) {
        cluster.advance(100);
    }
    let put = cluster.put(&owners[0], "k", "v", 3);
    cluster.settle();
    assert!(cluster.written(put), "{:?}", cluster.reply(put));

    assert_eq!(cluster.hints(&fallback), vec![(away.clone(), 1)]);
    // Asked through the fallback itself and through an owner: the same listing.
    for via in [&fallback, &owners[0]] {
        let handle = inspect(&mut cluster, via, "k");
        cluster.settle();
        let copies = inspected(&cluster, handle);
        assert_eq!(
            copies.len(),
            4,
            "three owners and one fallback: {copies:#?}"
        );
        assert!(matches!(
            answer(&copies, &away),
            ReplicaAnswer::Failed { .. }
        ));
        let last = &copies[3];
        assert_eq!(last.node, fallback.as_str());
        assert_eq!(last.role, ReplicaRole::Fallback);
        assert_eq!(last.hint_for.as_deref(), Some(away.as_str()));
        match &last.answer {
            ReplicaAnswer::Stored(copy) => assert_eq!(values(copy), vec!["v"]),
            other => panic!("expected the hint's copy, got {other:?}"),
        }
    }

    // Once the owner is back and the hint handed over, the fallback is no longer listed.
    cluster.restart(&away);
    for _ in 0..(config.peer_down_after_ms / 100 + 30) {
        cluster.advance(100);
    }
    let handle = inspect(&mut cluster, &owners[1], "k");
    cluster.settle();
    let copies = inspected(&cluster, handle);
    assert_eq!(copies.len(), 3, "{copies:#?}");
    assert_eq!(values(stored(&copies, &away)), vec!["v"]);
}
