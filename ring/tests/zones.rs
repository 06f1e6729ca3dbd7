//! The zone rule and fallbacks across zone layouts: 2, 3 and 5 zones, equal and unequal sizes.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use quorumkv_ring::{Change, Node, RangeId, Ring, RingConfig};
use std::collections::BTreeMap;

/// Nodes for zones of the given sizes, named `<zone>-<i>`.
fn layout(sizes: &[usize]) -> Vec<Node> {
    sizes
        .iter()
        .enumerate()
        .flat_map(|(z, &size)| {
            (0..size).map(move |i| node(&format!("z{z}-{i}"), &format!("z{z}"), 1))
        })
        .collect()
}

const LAYOUTS: &[&[usize]] = &[
    &[3, 3],
    &[5, 2],
    &[4, 4, 4],
    &[6, 3, 1],
    &[2, 2, 2, 2, 2],
    &[4, 3, 2, 1, 1],
];

#[test]
fn zone_rule_holds_for_every_prefix_in_every_layout() {
    for sizes in LAYOUTS {
        for ranges in [256u32, 1024] {
            let ring = Ring::build(RingConfig::new(ranges, 5).unwrap(), layout(sizes)).unwrap();
            assert_eq!(zone_rule_error(&ring), None, "{sizes:?}, Q={ranges}");
            for n in 1..=ring.width() {
                assert_eq!(ring.zone_violations(n), 0);
                assert_eq!(
                    weighted_balance_error(&ring, n),
                    None,
                    "{sizes:?}, Q={ranges}, N={n}"
                );
            }
        }
    }
}

#[test]
fn with_enough_zones_the_first_n_never_share_a_zone() {
    for sizes in [&[4usize, 4, 4][..], &[2, 2, 2, 2, 2], &[4, 3, 2, 1, 1]] {
        let ring = Ring::build(RingConfig::new(512, 5).unwrap(), layout(sizes)).unwrap();
        for n in 1..=sizes.len().min(ring.width()) {
            assert_eq!(ring.zone_bound(n), 1);
            for r in 0..512 {
                let list = ring.preference_list(RangeId(r), n).unwrap();
                let mut zones: Vec<_> = list.iter().map(|node| &node.zone).collect();
                zones.sort();
                zones.dedup();
                assert_eq!(zones.len(), n, "{sizes:?} range {r}: {list:?}");
            }
        }
    }
}

#[test]
fn with_fewer_zones_the_bound_is_the_ceiling_or_the_best_achievable() {
    let ring = Ring::build(RingConfig::new(256, 5).unwrap(), layout(&[3, 3])).unwrap();
    assert_eq!(
        (1..=5).map(|n| ring.zone_bound(n)).collect::<Vec<_>>(),
        vec![1, 1, 2, 2, 3]
    );
    // A one-node zone cannot take its part, so the big zone must hold 4 of 5.
    let lopsided = Ring::build(RingConfig::new(256, 5).unwrap(), layout(&[6, 1])).unwrap();
    assert_eq!(lopsided.zone_bound(5), 4);
    assert_eq!(zone_rule_error(&lopsided), None);
    // The small zone's single node is then in every list's first two entries.
    let lone = lopsided.index_of(&"z1-0".parse().unwrap()).unwrap();
    assert_eq!(lopsided.load(2)[lone], 256);
}

#[test]
fn the_zone_rule_wins_over_balance_and_shares_are_even_within_a_zone() {
    // 12 nodes in zones of 6, 3 and 3, N = 3: each zone holds exactly one replica per range, so
    // nodes in the big zone carry half as much as the others, and equal amounts among themselves.
    let ring = Ring::build(RingConfig::new(1024, 3).unwrap(), layout(&[6, 3, 3])).unwrap();
    let load = ring.load(3);
    let by_zone: BTreeMap<String, Vec<u64>> =
        ring.members()
            .iter()
            .zip(&load)
            .fold(BTreeMap::new(), |mut acc, (m, &c)| {
                acc.entry(m.zone.to_string()).or_default().push(c);
                acc
            });
    for (zone, counts) in &by_zone {
        let total: u64 = counts.iter().sum();
        assert_eq!(total, 1024, "zone {zone}");
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "zone {zone}: {counts:?}");
    }
}

#[test]
fn changes_keep_the_zone_rule() {
    let mut ring = Ring::build(RingConfig::new(256, 5).unwrap(), layout(&[3, 3])).unwrap();
    // A third zone appears: the bound for three replicas tightens from 2 to 1.
    ring = ring.apply(&Change::Add(node("z2-0", "z2", 1))).unwrap();
    assert_eq!(ring.zone_bound(3), 1);
    assert_eq!(zone_rule_error(&ring), None);
    ring = ring
        .apply(&Change::Rezone {
            id: "z0-0".parse().unwrap(),
            zone: "z2".parse().unwrap(),
        })
        .unwrap();
    assert_eq!(zone_rule_error(&ring), None);
    ring = ring
        .apply(&Change::Remove("z2-0".parse().unwrap()))
        .unwrap();
    assert_eq!(zone_rule_error(&ring), None);
}

#[test]
fn a_dead_nodes_ranges_fall_back_onto_many_nodes() {
    for sizes in [&[12usize][..], &[4, 4, 4], &[5, 4, 3]] {
        let ring = Ring::build(RingConfig::new(1024, 3).unwrap(), layout(sizes)).unwrap();
        let dead = ring.members()[0].id.clone();
        let mut first_fallback: BTreeMap<String, u32> = BTreeMap::new();
        for r in 0..1024 {
            let list = ring.preference_list(RangeId(r), 3).unwrap();
            if !list.contains(&dead) {
                continue;
            }
            let fallbacks = ring.fallbacks(RangeId(r)).unwrap();
            assert!(fallbacks.iter().all(|f| !list.contains(&f.id)));
            let distinct: std::collections::BTreeSet<_> = fallbacks.iter().map(|f| &f.id).collect();
            assert_eq!(distinct.len(), fallbacks.len());
            *first_fallback
                .entry(fallbacks[0].id.to_string())
                .or_default() += 1;
        }
        // 9 candidates are possible (12 minus the list); the dead node's ~256 ranges should reach
        // nearly all of them, with no node taking more than a third.
        let held: u32 = first_fallback.values().sum();
        assert!(first_fallback.len() >= 8, "{sizes:?}: {first_fallback:?}");
        assert!(
            first_fallback.values().all(|&c| c * 3 <= held),
            "{sizes:?}: {first_fallback:?}"
        );
    }
}
