//! Deterministic sweeps of the balance and movement rules over cluster sizes.
//!
//! The balance sweep covers every node count 1..=64 for Q in {256, 1024, 4096} with rf_max 5,
//! all in one zone with equal capacities: for every prefix N, every node is within 2 % of the
//! mean (or within 1 where 2 % is less than 1).
//!
//! The movement sweep adds and removes one node for every node count 1..=64 with Q in {256,
//! 1024} and every 7th count with Q = 4096 (set `RING_SWEEP_FULL=1` for all of them, and
//! `RING_SWEEP_VERBOSE=1` to print each figure), and checks moved ≤ 1.10 × ideal + 1 at N = 3.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use quorumkv_ring::{moved, Change};

#[test]
fn balance_sweep_every_node_count_and_range_count() {
    for ranges in [256u32, 1024, 4096] {
        for count in 1..=64 {
            let ring = build(count, 1, ranges, 5);
            for n in 1..=ring.width() {
                if let Some(err) = equal_balance_error(&ring, n) {
                    panic!("{count} nodes, Q={ranges}: {err}");
                }
            }
        }
    }
}

#[test]
fn movement_sweep_add_and_remove_one_node() {
    let mut report = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let full = std::env::var_os("RING_SWEEP_FULL").is_some();
    for ranges in [256u32, 1024, 4096] {
        for count in 1..=64 {
            if !full && ranges == 4096 && count % 7 != 0 {
                continue;
            }
            let ring = build(count, 1, ranges, 5);
            let added = ring.apply(&Change::Add(node("zz-new", "z0", 1))).unwrap();
            for n in 1..=added.width() {
                if let Some(err) = equal_balance_error(&added, n) {
                    panic!("after add, {count} nodes, Q={ranges}: {err}");
                }
            }
            let n = 3.min(added.width());
            let ideal = f64::from(ranges) * n as f64 / (count + 1) as f64;
            let got = moved(&ring, &added, n) as f64;
            report.push(format!(
                "add Q={ranges} nodes={count} moved={got} ideal={ideal:.1}"
            ));
            if got > 1.10 * ideal + 1.0 {
                failures.push(format!(
                    "add to {count} nodes, Q={ranges}: moved {got}, ideal {ideal:.1}"
                ));
            }
            if count >= 2 {
                let victim = ring.members()[count / 2].id.clone();
                let held = ring.load(3)[count / 2] as f64;
                let removed = ring.apply(&Change::Remove(victim)).unwrap();
                for n in 1..=removed.width() {
                    if let Some(err) = equal_balance_error(&removed, n) {
                        panic!("after remove, {count} nodes, Q={ranges}: {err}");
                    }
                }
                let got = moved(&ring, &removed, 3) as f64;
                report.push(format!(
                    "remove Q={ranges} nodes={count} moved={got} held={held}"
                ));
                if got > 1.10 * held + 1.0 {
                    failures.push(format!(
                        "remove from {count} nodes, Q={ranges}: moved {got}, held {held}"
                    ));
                }
            }
        }
    }
    if std::env::var_os("RING_SWEEP_VERBOSE").is_some() {
        println!("{}", report.join("\n"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
