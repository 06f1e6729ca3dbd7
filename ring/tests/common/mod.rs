//! Helpers shared by the integration tests: ring construction and the balance, zone and
//! movement checks that the crate documentation promises.
#![allow(dead_code, clippy::unwrap_used)]

use quorumkv_ring::{Change, Node, NodeId, Ring, RingConfig, Zone};

pub fn node(name: &str, zone: &str, capacity: u32) -> Node {
    Node::new(
        NodeId::new(name).unwrap(),
        Zone::new(zone).unwrap(),
        capacity,
    )
    .unwrap()
}

/// `count` equal nodes `n000..`, zones `z0..` assigned round-robin.
pub fn nodes(count: usize, zones: usize) -> Vec<Node> {
    (0..count)
        .map(|i| node(&format!("n{i:03}"), &format!("z{}", i % zones), 1))
        .collect()
}

pub fn build(count: usize, zones: usize, ranges: u32, rf_max: u32) -> Ring {
    Ring::build(
        RingConfig::new(ranges, rf_max).unwrap(),
        nodes(count, zones),
    )
    .unwrap()
}

/// The balance rule for equal weights: every node's count in the first `n` columns is within
/// 2 % of the mean, or within 1 where 2 % of the mean is less than 1. Returns the worst offender.
pub fn equal_balance_error(ring: &Ring, n: usize) -> Option<String> {
    let load = ring.load(n);
    let mean = f64::from(ring.range_count()) * n as f64 / load.len() as f64;
    let allowed = (0.02 * mean).max(1.0);
    load.iter().enumerate().find_map(|(i, &c)| {
        let off = (c as f64 - mean).abs();
        (off > allowed + 1e-9).then(|| {
            format!(
                "node {} holds {c} of the first {n} columns; mean {mean:.2}, allowed ±{allowed:.2}",
                ring.members()[i].id
            )
        })
    })
}

/// The weighted balance rule: within 5 % of the achievable fair share, or within 1.
pub fn weighted_balance_error(ring: &Ring, n: usize) -> Option<String> {
    balance_error_within(ring, n, (0.05, 1.0))
}

/// Every node within `fraction` of its fair share or `entries` of it, whichever is larger.
pub fn balance_error_within(
    ring: &Ring,
    n: usize,
    (fraction, entries): (f64, f64),
) -> Option<String> {
    let load = ring.load(n);
    let shares = ring.fair_shares(n);
    load.iter()
        .zip(&shares)
        .enumerate()
        .find_map(|(i, (&c, &share))| {
            let allowed = (fraction * share).max(entries);
            ((c as f64 - share).abs() > allowed + 1e-9).then(|| {
                format!(
                "node {} (capacity {}) holds {c} of the first {n} columns; fair share {share:.2}",
                ring.members()[i].id,
                ring.members()[i].capacity
            )
            })
        })
}

/// Checks the zone rule for every prefix of every list, independently of the ring's own
/// validation.
pub fn zone_rule_error(ring: &Ring) -> Option<String> {
    for r in 0..ring.range_count() {
        let list = ring
            .preference_list(quorumkv_ring::RangeId(r), ring.width())
            .unwrap();
        for n in 1..=ring.width() {
            let bound = ring.zone_bound(n);
            let mut zones: Vec<&Zone> = list.iter().take(n).map(|node| &node.zone).collect();
            zones.sort();
            for w in zones.chunk_by(|a, b| a == b) {
                if w.len() > bound {
                    return Some(format!(
                        "range {r}: zone {} holds {} of first {n} (bound {bound})",
                        w[0],
                        w.len()
                    ));
                }
            }
        }
    }
    None
}

/// What kind of cluster a history explores.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Equal capacities, one zone: the strict balance and movement rules apply.
    Equal,
    /// Capacities 1..=4, one zone.
    Weighted,
    /// Equal capacities, several zones, nodes moving between zones.
    Zoned,
    /// Capacities and zones both vary.
    Mixed,
}

#[derive(Clone, Debug)]
pub enum Step {
    Add { zone: usize, capacity: u32 },
    Remove(usize),
    Reweigh(usize, u32),
    Rezone(usize, usize),
}

/// Turns a random step into a change that applies to `ring` in `mode` (or None to skip it).
pub fn change_for(ring: &Ring, mode: Mode, step: &Step, next_id: &mut usize) -> Option<Change> {
    let members = ring.members();
    let weighted = matches!(mode, Mode::Weighted | Mode::Mixed);
    let zoned = matches!(mode, Mode::Zoned | Mode::Mixed);
    match *step {
        Step::Add { zone, capacity } => {
            *next_id += 1;
            let zone = if zoned { zone } else { 0 };
            let capacity = if weighted { capacity } else { 1 };
            Some(Change::Add(node(
                &format!("m{:03}", *next_id),
                &format!("z{zone}"),
                capacity,
            )))
        }
        Step::Remove(i) => {
            (members.len() > 1).then(|| Change::Remove(members[i % members.len()].id.clone()))
        }
        Step::Reweigh(i, capacity) => {
            let target = &members[i % members.len()];
            (weighted && target.capacity != capacity).then(|| Change::Reweigh {
                id: target.id.clone(),
                capacity,
            })
        }
        Step::Rezone(i, zone) => {
            let target = &members[i % members.len()];
            let zone = Zone::new(format!("z{zone}")).unwrap();
            (zoned && target.zone != zone).then(|| Change::Rezone {
                id: target.id.clone(),
                zone,
            })
        }
    }
}

pub fn initial(mode: Mode, count: usize, capacities: &[u32]) -> Vec<Node> {
    let zoned = matches!(mode, Mode::Zoned | Mode::Mixed);
    let weighted = matches!(mode, Mode::Weighted | Mode::Mixed);
    (0..count)
        .map(|i| {
            let zone = if zoned { i % 3 } else { 0 };
            let capacity = if weighted {
                capacities[i % capacities.len()]
            } else {
                1
            };
            node(&format!("n{i:03}"), &format!("z{zone}"), capacity)
        })
        .collect()
}
