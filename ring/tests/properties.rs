//! Property tests: random membership histories keep every promise of the crate documentation.
//!
//! Each case builds a ring and applies 20 random changes (adds, removes, reweighs, zone moves),
//! checking after every step: the zone rule for every prefix, balance and, for adds and removes
//! among equal single-zone nodes, the movement bound at N = 3.
//!
//! Balance: equal weights in one zone, always 2 % of the mean or 1. Other modes: a fresh build,
//! 5 % of the achievable fair share or 1. After a change in those modes the same rule holds in
//! about 99.5 % of steps; the rest (nodes whose share nearly fills every range, several zones
//! with unequal weights) can be off by up to ~16 % of the share, because placement settles one
//! column at a time and cannot undo an earlier column's composition. Those steps are checked
//! against the looser `CHANGE_SLACK` bound, which is a known gap (see the crate docs).
//!
//! The default is 24 cases per property from a fixed seed, so CI is deterministic; set
//! `PROPTEST_CASES` for more cases and `RING_PROPTEST_SEED` for another seed.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proptest::prelude::*;
use quorumkv_ring::{moved, Change, Ring, RingConfig};

/// Looser bound after a change in weighted or multi-zone modes: 20 % of the share or 4 entries.
const CHANGE_SLACK: (f64, f64) = (0.20, 4.0);

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let seed = std::env::var("RING_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x005e_ed0f_71a6);
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..4, 1u32..=4).prop_map(|(zone, capacity)| Step::Add { zone, capacity }),
        2 => any::<usize>().prop_map(Step::Remove),
        1 => (any::<usize>(), 1u32..=4).prop_map(|(i, c)| Step::Reweigh(i, c)),
        1 => (any::<usize>(), 0usize..4).prop_map(|(i, z)| Step::Rezone(i, z)),
    ]
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Equal),
        Just(Mode::Weighted),
        Just(Mode::Zoned),
        Just(Mode::Mixed)
    ]
}

fn check_ring(ring: &Ring, mode: Mode, after_change: bool) -> Result<(), TestCaseError> {
    if let Some(err) = zone_rule_error(ring) {
        return Err(TestCaseError::fail(err));
    }
    for n in 1..=ring.width() {
        let err = match mode {
            Mode::Equal => equal_balance_error(ring, n),
            _ if after_change => balance_error_within(ring, n, CHANGE_SLACK),
            _ => weighted_balance_error(ring, n),
        };
        if let Some(err) = err {
            let members: Vec<String> = ring
                .members()
                .iter()
                .map(|m| format!("{}@{}x{}", m.id, m.zone, m.capacity))
                .collect();
            let fresh = Ring::build(ring.config(), ring.members().to_vec()).unwrap();
            return Err(TestCaseError::fail(format!(
                "{mode:?}, Q={}, N={n}: {err}\nmembers {members:?}\nload {:?}\nfair {:.2?}\n\
                 a fresh build holds {:?}",
                ring.range_count(),
                ring.load(n),
                ring.fair_shares(n),
                fresh.load(n),
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn histories_keep_balance_zones_and_movement(
        mode in mode(),
        count in 1usize..=12,
        capacities in prop::collection::vec(1u32..=4, 1..=4),
        ranges in prop::sample::select(vec![256u32, 1024]),
        rf_max in 1u32..=5,
        steps in prop::collection::vec(step(), 20),
    ) {
        let config = RingConfig::new(ranges, rf_max).unwrap();
        let mut ring = Ring::build(config, initial(mode, count, &capacities)).unwrap();
        check_ring(&ring, mode, false)?;
        let mut next_id = 0;
        for step in &steps {
            let Some(change) = change_for(&ring, mode, step, &mut next_id) else { continue };
            let next = ring.apply(&change).unwrap();
            prop_assert_eq!(next.version(), ring.version() + 1);
            check_ring(&next, mode, true)?;
            if matches!(mode, Mode::Equal) {
                let n = 3.min(ring.width()).min(next.width());
                let got = moved(&ring, &next, n) as f64;
                let ideal = match &change {
                    Change::Add(_) => f64::from(ranges) * n as f64 / next.members().len() as f64,
                    Change::Remove(id) => ring.load(n)[ring.index_of(id).unwrap()] as f64,
                    _ => unreachable!("equal mode only adds and removes"),
                };
                prop_assert!(got <= 1.10 * ideal + 1.0,
                    "{:?} on {} members, Q={}: moved {} at N={}, ideal {:.1}",
                    change, ring.members().len(), ranges, got, n, ideal);
            }
            ring = next;
        }
    }

    #[test]
    fn build_ignores_member_order(
        count in 1usize..=20,
        zones in 1usize..=4,
        seed in any::<u64>(),
    ) {
        let members = nodes(count, zones);
        let mut shuffled = members.clone();
        // A deterministic Fisher-Yates from the seed: proptest shrinks the seed, not the order.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let config = RingConfig::new(256, 3).unwrap();
        let a = Ring::build(config, members).unwrap();
        let b = Ring::build(config, shuffled).unwrap();
        prop_assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
        prop_assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn same_changes_give_identical_rings(
        count in 1usize..=8,
        steps in prop::collection::vec(step(), 20),
    ) {
        let config = RingConfig::new(256, 4).unwrap();
        let run = || {
            let mut ring = Ring::build(config, initial(Mode::Mixed, count, &[1, 2, 3])).unwrap();
            let mut next_id = 0;
            let mut fingerprints = Vec::new();
            for step in &steps {
                if let Some(change) = change_for(&ring, Mode::Mixed, step, &mut next_id) {
                    ring = ring.apply(&change).unwrap();
                    fingerprints.push(ring.fingerprint());
                }
            }
            (ring.to_bytes().unwrap(), fingerprints)
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn serde_round_trip_keeps_bytes_and_fingerprint(
        count in 1usize..=12,
        zones in 1usize..=3,
        ranges in prop::sample::select(vec![1u32, 2, 64, 1024]),
    ) {
        let ring = build(count, zones, ranges, 3);
        let bytes = ring.to_bytes().unwrap();
        let back = Ring::from_bytes(&bytes).unwrap();
        prop_assert_eq!(&back, &ring);
        prop_assert_eq!(back.fingerprint(), ring.fingerprint());
        prop_assert_eq!(back.to_bytes().unwrap(), bytes);
        let via_serde: Ring = rmp_serde::from_slice(&rmp_serde::to_vec(&ring).unwrap()).unwrap();
        prop_assert_eq!(via_serde, ring);
    }

    #[test]
    fn corrupted_bytes_are_rejected_without_panic(
        count in 1usize..=6,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let ring = build(count, 2, 64, 3);
        let mut bytes = ring.to_bytes().unwrap();
        for (at, value) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value | 1;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        // Either an error, or a ring that passed validation (a flip can land on a value, such
        // as the version or a capacity, that has another valid reading).
        if let Ok(decoded) = Ring::from_bytes(&bytes) {
            prop_assert!(zone_rule_error(&decoded).is_none());
            prop_assert_eq!(Ring::from_bytes(&decoded.to_bytes().unwrap()).unwrap(), decoded);
        }
    }
}
