//! Anti-entropy, told with the deterministic driver: replicas that missed writes get them from
//! Merkle-tree exchanges alone (no read, so no read repair), an exchange costs what the
//! difference costs, and trees rebuilt after a crash match the data.

use quorumkv_node::core::anti_entropy::AntiEntropyConfig;
use quorumkv_node::core::driver::{Driver, Traffic, KEYSPACE};
use quorumkv_node::core::CoreConfig;
use quorumkv_node::merkle::MerkleTree;
use quorumkv_node::storage::Storage;
use quorumkv_node::version_vector::{Actor, CausalContext, Dot, KeyState, RequestId};
use quorumkv_ring::NodeId;

/// A core config with the given anti-entropy settings and no room for hints, so that what a
/// story shows is anti-entropy's work alone (hinted handoff would otherwise bring a cut-off
/// replica up to date as well; see `node/tests/hints.rs`).
fn config(anti_entropy: AntiEntropyConfig) -> CoreConfig {
    CoreConfig {
        anti_entropy,
        hint_bytes_per_target_max: 0,
        ..CoreConfig::default()
    }
}

/// Advances time in 100 ms steps for `seconds`, ticking every core.
fn run_for(cluster: &mut Driver, seconds: u64) {
    for _ in 0..seconds * 10 {
        cluster.advance(100);
    }
}

/// Every range's root on `node`, recomputed from what its storage holds.
fn roots_from_storage(cluster: &Driver, node: &NodeId) -> Vec<[u8; 32]> {
    let geometry = cluster.core(node).expect("running").merkle_geometry();
    (0..geometry.range_count())
        .map(|range| {
            let (first, last) = geometry.range_token_bounds(range).expect("a range");
            let items = cluster
                .storage(node)
                .scan(KEYSPACE, first, last)
                .expect("memory storage scans")
                .into_iter()
                .map(|stored| (stored.token, stored.key, stored.state.state_hash()));
            MerkleTree::from_items(geometry, range, items)
                .expect("scanned keys lie in their range")
                .root()
        })
        .collect()
}

/// Every range's root as `node`'s core keeps it (`None` while a tree is not built).
fn roots_in_core(cluster: &Driver, node: &NodeId) -> Vec<Option<[u8; 32]>> {
    let core = cluster.core(node).expect("running");
    (0..core.merkle_geometry().range_count())
        .map(|range| core.merkle_root(KEYSPACE, range))
        .collect()
}

#[test]
fn a_replica_cut_off_during_writes_gets_every_key_from_anti_entropy_without_a_read() {
    converge_after_a_cut(AntiEntropyConfig::default());
}

/// The story, with `anti_entropy` as configured: n3 is cut off while n1 takes writes and while
/// n3 takes writes of its own, so each side lacks something; after the heal, time passes and
/// nobody reads.
fn converge_after_a_cut(anti_entropy: AntiEntropyConfig) {
    let mut cluster = Driver::new(3, 3, config(anti_entropy));
    let [n1, n2, n3] = cluster.ids();
    cluster.advance(10);

    cluster.cut(&n1, &n3);
    cluster.cut(&n2, &n3);
    for i in 0..40 {
        let put = cluster.put(&n1, &format!("major-{i}"), &format!("m{i}"), 2);
        cluster.settle();
        assert!(cluster.written(put), "{:?}", cluster.reply(put));
    }
    for i in 0..20 {
        let put = cluster.put(&n3, &format!("minor-{i}"), &format!("n{i}"), 1);
        cluster.settle();
        assert!(cluster.written(put), "{:?}", cluster.reply(put));
    }
    assert!(cluster.values(&n3, "major-0").is_empty());
    assert!(cluster.values(&n1, "minor-0").is_empty());
    assert_ne!(
        cluster.sync_status(&n1).digest,
        cluster.sync_status(&n3).digest
    );

    cluster.heal();
    run_for(&mut cluster, 30);

    for node in [&n1, &n2, &n3] {
        for i in 0..40 {
            assert_eq!(
                cluster.values(node, &format!("major-{i}")),
                [format!("m{i}")],
                "major-{i} on {node}"
            );
        }
        for i in 0..20 {
            assert_eq!(
                cluster.values(node, &format!("minor-{i}")),
                [format!("n{i}")],
                "minor-{i} on {node}"
            );
        }
    }
    let status = cluster.sync_status(&n1);
    assert_eq!(status.keyspaces[KEYSPACE].keys, 60);
    assert_eq!(cluster.sync_status(&n2), {
        let mut s = status.clone();
        s.node = n2.to_string();
        s
    });
    assert_eq!(cluster.sync_status(&n3).digest, status.digest);
}

#[test]
#[should_panic(expected = "minor-0 on n1")]
fn without_anti_entropy_the_cut_off_replica_never_catches_up() {
    // The same story with exchanges switched off: nothing else repairs a key nobody reads.
    converge_after_a_cut(AntiEntropyConfig {
        enabled: false,
        ..AntiEntropyConfig::default()
    });
}

#[test]
fn trees_rebuilt_after_a_crash_match_the_data_and_follow_later_writes() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, _n3] = cluster.ids();
    cluster.advance(10);
    for i in 0..50 {
        let put = cluster.put(&n2, &format!("k{i}"), &format!("v{i}"), 3);
        cluster.settle();
        assert!(cluster.written(put));
    }
    // Make n1's copies durable, so the crash keeps them and the rebuilt trees can be compared
    // with the ones it had.
    cluster
        .storage(&n1)
        .flush()
        .expect("memory storage flushes");
    let before: Vec<_> = roots_in_core(&cluster, &n1);
    assert!(before.iter().all(Option::is_some));

    cluster.crash(&n1);
    cluster.restart(&n1);
    // Nothing is exchanged or reported before the trees are built again ...
    assert!(roots_in_core(&cluster, &n1).iter().all(Option::is_none));
    assert!(!cluster.sync_status(&n1).trees_built);
    // ... which the first tick does, from storage.
    cluster.advance(10);
    let rebuilt: Vec<_> = roots_in_core(&cluster, &n1)
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(rebuilt, roots_from_storage(&cluster, &n1));
    assert_eq!(roots_in_core(&cluster, &n1), before);

    // Writes after the restart keep the trees current, on the coordinator and the replicas.
    for i in 0..20 {
        let put = cluster.put(&n1, &format!("after-{i}"), "x", 3);
        cluster.settle();
        assert!(cluster.written(put));
    }
    for node in [&n1, &n2] {
        let kept: Vec<_> = roots_in_core(&cluster, node)
            .into_iter()
            .map(Option::unwrap)
            .collect();
        assert_eq!(kept, roots_from_storage(&cluster, node), "on {node}");
    }
    assert_eq!(
        cluster.sync_status(&n1).digest,
        cluster.sync_status(&n2).digest
    );
}

/// A key state as a coordinator would have written it, for loading storage directly.
fn state(i: u64) -> KeyState {
    let mut state = KeyState::new();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&i.to_be_bytes());
    state
        .update(
            &CausalContext::new(),
            Dot::new(Actor(77), 1),
            RequestId(id),
            1_800_000_000_000,
            Some(format!("value-{i}").into_bytes()),
        )
        .expect("a fresh dot");
    state
}

/// Two replicas (N = 2) holding `common` keys alike, then `different` more keys written to one
/// side or the other while they were cut apart. Returns the traffic of one exchange per range
/// (n1 with n2) and checks that afterwards both hold everything.
fn one_exchange_per_range(common: u64, different: u64) -> (Traffic, u64) {
    let mut cluster = Driver::new(
        2,
        2,
        config(AntiEntropyConfig {
            // No exchange on the timer: the test starts each one itself, and lets it run to
            // the end without waiting for the throttle (time stands still while it settles).
            interval_ms: 1 << 40,
            keys_per_second_max: 1_000_000_000,
            ..AntiEntropyConfig::default()
        }),
    );
    let [n1, n2] = cluster.ids();
    for i in 0..common {
        let key = format!("common-{i}");
        let state = state(i);
        for node in [&n1, &n2] {
            cluster
                .storage(node)
                .merge(KEYSPACE, key.as_bytes(), &state, &[])
                .expect("memory storage merges");
        }
    }
    // The first ticks build the trees from what storage holds.
    for _ in 0..100 {
        if cluster.sync_status(&n1).trees_built && cluster.sync_status(&n2).trees_built {
            break;
        }
        cluster.advance(10);
    }
    assert!(cluster.sync_status(&n1).trees_built);
    cluster.cut(&n1, &n2);
    for i in 0..different {
        // Odd keys reach only n2, even keys only n1: each side lacks what the other has.
        let node = if i % 2 == 0 { &n1 } else { &n2 };
        let put = cluster.put(node, &format!("different-{i}"), "d", 1);
        cluster.settle();
        assert!(cluster.written(put), "{:?}", cluster.reply(put));
    }
    cluster.heal();
    cluster.reset_traffic();
    let ranges = cluster
        .core(&n1)
        .expect("running")
        .merkle_geometry()
        .range_count();
    for range in 0..ranges {
        assert!(cluster.exchange(&n1, range, &n2));
        cluster.settle();
    }
    let traffic = cluster.traffic_total();
    let status = cluster.sync_status(&n1);
    assert_eq!(
        status.keyspaces.get(KEYSPACE).map_or(0, |k| k.keys),
        common + different
    );
    assert_eq!(status.digest, cluster.sync_status(&n2).digest);
    (traffic, u64::from(ranges))
}

#[test]
fn an_exchange_costs_what_the_difference_costs_not_what_the_data_costs() {
    const COMMON: u64 = 100_000;
    let (same, ranges) = one_exchange_per_range(COMMON, 0);
    let (ten, _) = one_exchange_per_range(COMMON, 10);
    let (thousand, _) = one_exchange_per_range(COMMON, 1000);
    println!("{COMMON} keys in {ranges} ranges, one exchange per range:");
    for (label, t) in [("0", same), ("10", ten), ("1000", thousand)] {
        println!(
            "  {label:>4} differing keys: {:>5} messages, {:>8} bytes",
            t.messages, t.bytes
        );
    }
    // Replicas that agree: one root comparison per range, a request and its answer.
    assert_eq!(same.messages, 2 * ranges);
    assert!(same.bytes < 200 * ranges, "{same:?}");
    // The cost grows with the difference ...
    assert!(same.messages < ten.messages && ten.messages < thousand.messages);
    assert!(same.bytes < ten.bytes && ten.bytes < thousand.bytes);
    // ... and not with the 100,000 keys both hold: per differing key, a bounded number of
    // bytes (the key's state both ways, a share of the tree levels above it).
    assert!(ten.bytes - same.bytes < 10 * 4_000, "{ten:?}");
    assert!(thousand.bytes - same.bytes < 1000 * 1_000, "{thousand:?}");
}

#[test]
fn exchanges_are_limited_and_one_with_a_silent_peer_times_out() {
    let mut cluster = Driver::new(
        3,
        3,
        config(AntiEntropyConfig {
            exchanges_max: 2,
            exchange_timeout_ms: 3_000,
            ..AntiEntropyConfig::default()
        }),
    );
    let [n1, n2, n3] = cluster.ids();
    cluster.advance(10);
    let in_flight = |cluster: &Driver| cluster.core(&n1).expect("running").exchanges_in_flight();

    // n2 and n3 hear n1, but their answers never come back.
    cluster.cut_one_way(&n2, &n1);
    cluster.cut_one_way(&n3, &n1);
    cluster.advance(700);
    assert_eq!(
        in_flight(&cluster),
        2,
        "the first interval starts as many as allowed"
    );
    for _ in 0..10 {
        cluster.advance(200);
        assert_eq!(in_flight(&cluster), 2, "and no more while they wait");
    }
    // Past the timeout the stalled exchanges are dropped; by then the failure detector counts
    // n2 and n3 down, so no new exchange starts.
    cluster.advance(1_500);
    assert_eq!(in_flight(&cluster), 0);

    cluster.heal();
    run_for(&mut cluster, 10);
    let digest = cluster.sync_status(&n1).digest;
    assert_eq!(cluster.sync_status(&n2).digest, digest);
    assert_eq!(cluster.sync_status(&n3).digest, digest);
}

#[test]
fn the_throttle_paces_a_large_repair() {
    let mut cluster = Driver::new(
        2,
        2,
        config(AntiEntropyConfig {
            interval_ms: 1 << 40,
            keys_per_second_max: 100,
            ..AntiEntropyConfig::default()
        }),
    );
    let [n1, n2] = cluster.ids();
    cluster.advance(10);
    cluster.cut(&n1, &n2);
    for i in 0..400 {
        let put = cluster.put(&n1, &format!("k{i}"), "v", 1);
        cluster.settle();
        assert!(cluster.written(put));
    }
    cluster.heal();
    let held = |cluster: &Driver| {
        cluster
            .sync_status(&n2)
            .keyspaces
            .get(KEYSPACE)
            .map_or(0, |k| k.keys)
    };
    let ranges = cluster
        .core(&n1)
        .expect("running")
        .merkle_geometry()
        .range_count();
    for range in 0..ranges {
        assert!(cluster.exchange(&n1, range, &n2));
    }
    cluster.settle();
    // One second's worth of budget (100 keys, give or take the last push) goes at once ...
    let first = held(&cluster);
    assert!((1..200).contains(&first), "{first}");
    // ... the rest at about 100 keys a second.
    cluster.advance(1_000);
    let second = held(&cluster);
    assert!(second > first && second < 400, "{first} then {second}");
    run_for(&mut cluster, 5);
    assert_eq!(held(&cluster), 400);
    assert_eq!(
        cluster.sync_status(&n1).digest,
        cluster.sync_status(&n2).digest
    );
}
