//! Quotas: how many entries each node should hold in the first N columns of the table.
//!
//! # What this computes
//!
//! For every prefix length N in `1..=width` and every member i, an integer `P[N][i]`: the number
//! of ranges whose first N preference-list entries should include node i. Placement then makes
//! the table match these numbers exactly (when it can; see the private `place` module). The quotas obey:
//!
//! - `Σ_i P[N][i] = Q·N` (every range has N entries in its first N columns);
//! - `P[N][i] ≤ Q` (a node holds at most one replica of a range);
//! - `Σ_{i in zone z} P[N][i] ≤ Q·L(N)` where `L(N)` is the zone bound ([`zone_bound`]), so the
//!   zone rule can hold in every row;
//! - `P[N-1][i] ≤ P[N][i]` (prefixes nest, so the column counts `P[N][i] - P[N-1][i]` are never
//!   negative).
//!
//! # Algorithm
//!
//! 1. *Fair shares* (real numbers): water-fill `Q·N` over the nodes in proportion to capacity,
//!    with a cap of `Q` per node and `Q·min(L(N), zone size)` per zone. Water-filling raises a
//!    common level λ; a node receives `min(cap, λ·capacity)`; a zone whose members would exceed
//!    its cap is pinned at the cap and its cap is shared among its own members by the same
//!    method. The result is the *achievable proportion*: as close to capacity-proportional as the
//!    one-replica-per-range limit and the zone rule allow.
//! 2. *Rounding*, first of zone totals and then of nodes within each zone, by largest remainder:
//!    every value becomes its floor or its ceiling, so a quota is always within 1 of its fair
//!    share. The ceilings go first to values whose current count (in the table being rebalanced)
//!    already reaches the ceiling ("sticky" rounding), then by larger remainder, then by a hash
//!    of the node id. Sticky rounding is what keeps churn out of membership changes: on an add
//!    every fair share of an old node shrinks, and a node that held the ceiling keeps it rather
//!    than trading it with a neighbour, so old nodes only lose entries.
//! 3. *Nesting*: if rounding made some `P[N][i] < P[N-1][i]`, units are moved from nodes with
//!    slack (first at zone level, then inside the zone) until prefixes nest.
//!
//! # Determinism
//!
//! Fair shares use `f64`. Rust does not contract `a*b+c` into fused operations and every sum here
//! runs in a fixed order, so the same inputs give bit-identical floats on every IEEE-754 platform.
//! Rounding compares remainders with a small tolerance so that values that are integers in exact
//! arithmetic are treated as integers.

/// Values closer than this to an integer are that integer (shares are at most 2^20, where an
/// f64 ulp is about 2e-10).
const EPS: f64 = 1e-6;

/// The zone bound `L(n)`: the smallest `L` such that `Σ_z min(size_z, L) ≥ n`.
///
/// No zone may hold more than `L(n)` of a preference list's first `n` entries. With at least `n`
/// zones this is 1 (no zone repeats). With fewer zones it is `⌈n / zones⌉` when every zone has
/// enough nodes, and larger when small zones cannot take their part. It is the best possible
/// bound: any list of `n` distinct nodes has some zone with at least `L(n)` of them.
/// Returns `n` when the zones together have fewer than `n` nodes (no valid list exists then).
pub fn zone_bound(zone_sizes: &[usize], n: usize) -> usize {
    (1..=n)
        .find(|&l| zone_sizes.iter().map(|&s| s.min(l)).sum::<usize>() >= n)
        .unwrap_or(n)
}

/// One member as quota computation sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Member {
    pub zone: usize,
    pub capacity: u32,
    /// Deterministic tie-breaker derived from the node id.
    pub key: u64,
}

/// Water-fills `total` over items: item i receives `clamp(λ·weights[i], lows[i], caps[i])` for
/// the common level λ that makes the values sum to `total`.
///
/// Requires `Σ lows ≤ total ≤ Σ caps` (outside that range the values are all lows or all caps).
/// The sum is piecewise linear in λ with breakpoints at `lows[i]/weights[i]` and
/// `caps[i]/weights[i]`; the function finds the segment holding `total` and solves on it.
fn water_fill(total: f64, weights: &[f64], lows: &[f64], caps: &[f64]) -> Vec<f64> {
    let value = |level: f64, i: usize| (level * weights[i]).max(lows[i]).min(caps[i]);
    let sum_at = |level: f64| (0..weights.len()).map(|i| value(level, i)).sum::<f64>();
    let mut breaks: Vec<f64> = (0..weights.len())
        .flat_map(|i| [lows[i] / weights[i], caps[i] / weights[i]])
        .collect();
    breaks.sort_by(|a, b| a.total_cmp(b));
    breaks.dedup();
    // The first breakpoint whose sum reaches the total bounds the segment from above.
    let upper = breaks.partition_point(|&b| sum_at(b) < total);
    let Some(&high) = breaks.get(upper) else {
        return caps.to_vec();
    };
    if upper == 0 {
        return (0..weights.len()).map(|i| value(high, i)).collect();
    }
    let low = breaks[upper - 1];
    // On (low, high) every item is either pinned (at its low or cap) or proportional.
    let mut fixed = 0.0;
    let mut slope = 0.0;
    let middle = 0.5 * (low + high);
    for i in 0..weights.len() {
        let free = middle * weights[i];
        if free <= lows[i] {
            fixed += lows[i];
        } else if free >= caps[i] {
            fixed += caps[i];
        } else {
            slope += weights[i];
        }
    }
    let level = if slope > 0.0 {
        (total - fixed) / slope
    } else {
        high
    };
    (0..weights.len()).map(|i| value(level, i)).collect()
}

/// Fair (real) shares of `q·n` entries for the first `n` columns: see the module docs.
/// `lows[i]` is member i's fair share of the first `n - 1` columns (zero for n = 1): a node keeps
/// at least what it had in a shorter prefix, since prefixes nest.
fn fair_shares_at(
    q: u64,
    n: usize,
    members: &[Member],
    zone_sizes: &[usize],
    lows: &[f64],
) -> Vec<f64> {
    let bound = zone_bound(zone_sizes, n);
    let zone_caps: Vec<f64> = zone_sizes
        .iter()
        .map(|&s| (q * s.min(bound) as u64) as f64)
        .collect();
    let total = (q * n as u64) as f64;
    let weight = |i: usize| f64::from(members[i].capacity);
    let mut zone_pinned = vec![false; zone_sizes.len()];
    let mut shares = vec![0.0; members.len()];
    // Each pass pins at least one zone or finishes.
    for _ in 0..=zone_sizes.len() {
        let free: Vec<usize> = (0..members.len())
            .filter(|&i| !zone_pinned[members[i].zone])
            .collect();
        let pinned_total: f64 = (0..zone_sizes.len())
            .filter(|&z| zone_pinned[z])
            .map(|z| zone_caps[z])
            .sum();
        let weights: Vec<f64> = free.iter().map(|&i| weight(i)).collect();
        let free_lows: Vec<f64> = free.iter().map(|&i| lows[i]).collect();
        let caps = vec![q as f64; free.len()];
        let free_shares = water_fill(total - pinned_total, &weights, &free_lows, &caps);
        let mut zone_sums = vec![0.0; zone_sizes.len()];
        for (k, &i) in free.iter().enumerate() {
            shares[i] = free_shares[k];
            zone_sums[members[i].zone] += free_shares[k];
        }
        let mut pinned_any = false;
        for z in 0..zone_sizes.len() {
            if !zone_pinned[z] && zone_sums[z] > zone_caps[z] + EPS {
                zone_pinned[z] = true;
                pinned_any = true;
            }
        }
        if !pinned_any {
            break;
        }
    }
    // A pinned zone shares exactly its cap among its own members.
    for z in 0..zone_sizes.len() {
        if !zone_pinned[z] {
            continue;
        }
        let inside: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].zone == z)
            .collect();
        let weights: Vec<f64> = inside.iter().map(|&i| weight(i)).collect();
        let inside_lows: Vec<f64> = inside.iter().map(|&i| lows[i]).collect();
        let caps = vec![q as f64; inside.len()];
        let filled = water_fill(zone_caps[z], &weights, &inside_lows, &caps);
        for (k, share) in filled.into_iter().enumerate() {
            shares[inside[k]] = share;
        }
    }
    shares
}

/// Fair shares for every prefix: `result[N-1][i]` for N in `1..=width`.
pub(crate) fn fair_shares(
    q: u64,
    width: usize,
    members: &[Member],
    zone_sizes: &[usize],
) -> Vec<Vec<f64>> {
    let mut result: Vec<Vec<f64>> = Vec::with_capacity(width);
    for n in 1..=width {
        let zeros;
        let lows = match result.last() {
            Some(previous) => previous,
            None => {
                zeros = vec![0.0; members.len()];
                &zeros
            }
        };
        let shares = fair_shares_at(q, n, members, zone_sizes, lows);
        result.push(shares);
    }
    result
}

/// Rounds `shares` to integers summing to `total`, each the floor or ceiling of its share and at
/// most its cap. Ceilings go first to values with a fractional part, then by larger `prefer`
/// (how much rounding up helps keep the table steady, see [`ceiling_benefit`]), then to values
/// whose `current` count already reaches the ceiling, then by larger remainder, then by smaller
/// key.
fn round_shares(
    total: u64,
    shares: &[f64],
    caps: &[u64],
    prefer: &[i64],
    current: &[u64],
    keys: &[u64],
) -> Vec<u64> {
    let len = shares.len();
    let mut out: Vec<u64> = (0..len).map(|i| floor_share(shares[i], caps[i])).collect();
    let remainder = |i: usize| shares[i] - out[i] as f64;
    let assigned: u64 = out.iter().sum();
    let mut order: Vec<usize> = (0..len).collect();
    if assigned < total {
        let fractional = |i: usize| remainder(i) > EPS;
        order.sort_by(|&a, &b| {
            fractional(b)
                .cmp(&fractional(a))
                .then(prefer[b].cmp(&prefer[a]))
                .then((current[b] > out[b]).cmp(&(current[a] > out[a])))
                .then(remainder(b).total_cmp(&remainder(a)))
                .then(keys[a].cmp(&keys[b]))
        });
        let mut missing = total - assigned;
        // Float error can leave more than one unit per item in pathological inputs; loop until
        // placed or no item has room.
        while missing > 0 {
            let before = missing;
            for &i in &order {
                if missing > 0 && out[i] < caps[i] {
                    out[i] += 1;
                    missing -= 1;
                }
            }
            if missing == before {
                break;
            }
        }
    } else if assigned > total {
        order.sort_by(|&a, &b| {
            prefer[a]
                .cmp(&prefer[b])
                .then((current[a] >= out[a]).cmp(&(current[b] >= out[b])))
                .then(remainder(a).total_cmp(&remainder(b)))
                .then(keys[b].cmp(&keys[a]))
        });
        let mut extra = assigned - total;
        while extra > 0 {
            let before = extra;
            for &i in &order {
                if extra > 0 && out[i] > 0 {
                    out[i] -= 1;
                    extra -= 1;
                }
            }
            if extra == before {
                break;
            }
        }
    }
    out
}

/// The floor of a share (snapping values within `EPS` of an integer), capped.
fn floor_share(share: f64, cap: u64) -> u64 {
    ((share.max(0.0) + EPS).floor() as u64).min(cap)
}

/// How much better rounding up is than rounding down, for one value at prefix N.
///
/// `lost_before` is what the value lost at prefix N-1 (current count minus quota) and
/// `slacks[k]` its current count minus its floor at prefix N+k, so its loss at each prefix is
/// `slack` (rounded down) or `slack - 1` (rounded up). A change moves the fewest entries when
/// every node's loss (or gain) is monotone in N: a node that gives up a primary should give up
/// that same entry from longer prefixes too, rather than take an entry back in a later column,
/// which costs a replica move. The total variation of the loss path measures exactly that, and
/// a two-state dynamic programme over the remaining prefixes finds its minimum under each choice.
///
/// Later prefixes have a limited number of ceilings to hand out, so among paths of equal
/// variation the programme prefers those that need what is plentiful: `scarcity[k]` is the share
/// of items that can round up at prefix N+k, in 1/`SCALE` units; a later ceiling costs
/// `SCALE - scarcity`, a later floor costs `scarcity`. Variation always dominates.
fn ceiling_benefit(lost_before: i64, slacks: &[i64], scarcity: &[i64]) -> i64 {
    let Some(&slack) = slacks.first() else {
        return 0;
    };
    let weight = SCALE * (slacks.len() as i64 + 1);
    let step_cost = |k: usize, up: usize| {
        if up == 1 {
            SCALE - scarcity[k]
        } else {
            scarcity[k]
        }
    };
    // future[e]: least cost over the later prefixes when this one rounds up (e = 1) or not.
    let mut future = [0i64; 2];
    for k in (1..slacks.len()).rev() {
        let mut cost = [0i64; 2];
        for (e, slot) in cost.iter_mut().enumerate() {
            let lost = slacks[k - 1] - e as i64;
            *slot = (0..2)
                .map(|up| {
                    weight * (slacks[k] - up as i64 - lost).abs() + step_cost(k, up) + future[up]
                })
                .min()
                .unwrap_or(0);
        }
        future = cost;
    }
    let cost = |e: usize| weight * (slack - e as i64 - lost_before).abs() + future[e];
    cost(0) - cost(1)
}

/// Fixed-point unit for [`ceiling_benefit`]'s scarcity costs.
const SCALE: i64 = 1 << 16;

/// For each prefix, the share of `group` that can round up (in 1/`SCALE` units): how many
/// ceilings the group's total needs over its floors, divided by the group's size.
fn scarcity(shares: &[Vec<f64>], caps: &[Vec<u64>], group: &[usize]) -> Vec<i64> {
    shares
        .iter()
        .zip(caps)
        .map(|(share, cap)| {
            if group.is_empty() {
                return 0;
            }
            let total: f64 = group.iter().map(|&i| share[i]).sum();
            let floors: u64 = group.iter().map(|&i| floor_share(share[i], cap[i])).sum();
            let ceilings = (total + 0.5).floor().max(0.0) as u64;
            let ceilings = ceilings.saturating_sub(floors).min(group.len() as u64);
            ceilings as i64 * SCALE / group.len() as i64
        })
        .collect()
}

/// Moves units between items until no item is below `prev`, taking from the item with the most
/// slack over `prev`. Requires `Σ values ≥ Σ prev` to fully succeed.
fn make_nested(prev: &[u64], values: &mut [u64]) {
    loop {
        let Some(low) = (0..values.len()).find(|&i| values[i] < prev[i]) else {
            return;
        };
        let donor = (0..values.len())
            .filter(|&k| values[k] > prev[k])
            .max_by(|&a, &b| {
                (values[a] - prev[a])
                    .cmp(&(values[b] - prev[b]))
                    .then(b.cmp(&a))
            });
        let Some(donor) = donor else {
            return;
        };
        values[donor] -= 1;
        values[low] += 1;
    }
}

/// Integer prefix quotas: `result[N-1][i]` for N in `1..=width`.
///
/// `current[N-1][i]` is node i's count in the first N columns of the table being rebalanced
/// (all zero for a fresh build); it only steers rounding.
pub(crate) fn prefix_quotas(
    q: u64,
    width: usize,
    members: &[Member],
    zone_sizes: &[usize],
    current: &[Vec<u64>],
) -> Vec<Vec<u64>> {
    let zones = zone_sizes.len();
    let count = members.len();
    let keys: Vec<u64> = members.iter().map(|m| m.key).collect();
    // A zone's tie-break key is its smallest member key: deterministic and id-derived.
    let mut zone_keys = vec![u64::MAX; zones];
    for m in members {
        zone_keys[m.zone] = zone_keys[m.zone].min(m.key);
    }
    let shares = fair_shares(q, width, members, zone_sizes);
    let zone_caps: Vec<Vec<u64>> = (1..=width)
        .map(|n| {
            let bound = zone_bound(zone_sizes, n);
            zone_sizes
                .iter()
                .map(|&s| q * s.min(bound) as u64)
                .collect()
        })
        .collect();
    let zone_sum = |values: &[f64]| {
        let mut sums = vec![0.0; zones];
        for (i, m) in members.iter().enumerate() {
            sums[m.zone] += values[i];
        }
        sums
    };
    let zone_shares: Vec<Vec<f64>> = shares.iter().map(|s| zone_sum(s)).collect();
    let zone_current: Vec<Vec<u64>> = current
        .iter()
        .map(|c| {
            let mut sums = vec![0u64; zones];
            for (i, m) in members.iter().enumerate() {
                sums[m.zone] += c[i];
            }
            sums
        })
        .collect();
    // Slack of an item at prefix index k: current count minus the floor of its share.
    let node_slack =
        |k: usize, i: usize| current[k][i] as i64 - floor_share(shares[k][i], q) as i64;
    let zone_slack = |k: usize, z: usize| {
        zone_current[k][z] as i64 - floor_share(zone_shares[k][z], zone_caps[k][z]) as i64
    };

    let node_caps: Vec<Vec<u64>> = vec![vec![q; count]; width];
    let all_zones: Vec<usize> = (0..zones).collect();
    let zone_scarcity = scarcity(&zone_shares, &zone_caps, &all_zones);
    let members_of: Vec<Vec<usize>> = (0..zones)
        .map(|z| (0..count).filter(|&i| members[i].zone == z).collect())
        .collect();
    let node_scarcity: Vec<Vec<i64>> = members_of
        .iter()
        .map(|inside| scarcity(&shares, &node_caps, inside))
        .collect();

    let mut result: Vec<Vec<u64>> = Vec::with_capacity(width);
    let mut prev_zone_totals = vec![0u64; zones];
    for k in 0..width {
        let zone_prefer: Vec<i64> = (0..zones)
            .map(|z| {
                let lost = if k == 0 {
                    0
                } else {
                    zone_current[k - 1][z] as i64 - prev_zone_totals[z] as i64
                };
                let slacks: Vec<i64> = (k..width).map(|m| zone_slack(m, z)).collect();
                ceiling_benefit(lost, &slacks, &zone_scarcity[k..])
            })
            .collect();
        let mut zone_totals = round_shares(
            q * (k as u64 + 1),
            &zone_shares[k],
            &zone_caps[k],
            &zone_prefer,
            &zone_current[k],
            &zone_keys,
        );
        make_nested(&prev_zone_totals, &mut zone_totals);
        let mut quota = vec![0u64; count];
        for z in 0..zones {
            let inside = &members_of[z];
            let prefer: Vec<i64> = inside
                .iter()
                .map(|&i| {
                    let lost = match result.last() {
                        None => 0,
                        Some(prev) => current[k - 1][i] as i64 - prev[i] as i64,
                    };
                    let slacks: Vec<i64> = (k..width).map(|m| node_slack(m, i)).collect();
                    ceiling_benefit(lost, &slacks, &node_scarcity[z][k..])
                })
                .collect();
            let pick = |v: &[u64]| inside.iter().map(|&i| v[i]).collect::<Vec<u64>>();
            let inside_shares: Vec<f64> = inside.iter().map(|&i| shares[k][i]).collect();
            let caps = vec![q; inside.len()];
            let mut values = round_shares(
                zone_totals[z],
                &inside_shares,
                &caps,
                &prefer,
                &pick(&current[k]),
                &pick(&keys),
            );
            if let Some(prev) = result.last() {
                make_nested(&pick(prev), &mut values);
            }
            for (slot, &i) in inside.iter().enumerate() {
                quota[i] = values[slot];
            }
        }
        prev_zone_totals = zone_totals;
        result.push(quota);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(zones: &[usize], capacities: &[u32]) -> Vec<Member> {
        zones
            .iter()
            .zip(capacities)
            .enumerate()
            .map(|(i, (&zone, &capacity))| Member {
                zone,
                capacity,
                key: i as u64,
            })
            .collect()
    }

    #[test]
    fn zone_bound_matches_the_definition() {
        assert_eq!(zone_bound(&[10], 3), 3);
        assert_eq!(zone_bound(&[4, 4, 4], 3), 1);
        assert_eq!(zone_bound(&[4, 4], 3), 2);
        assert_eq!(zone_bound(&[4, 4], 5), 3);
        // A one-node zone cannot take its part: the big zone must hold 4 of 5.
        assert_eq!(zone_bound(&[1, 6], 5), 4);
        assert_eq!(zone_bound(&[1, 1, 6], 5), 3);
        assert_eq!(zone_bound(&[2, 2], 5), 5);
    }

    #[test]
    fn water_fill_caps_and_redistributes() {
        let out = water_fill(10.0, &[1.0, 1.0, 8.0], &[0.0; 3], &[10.0, 10.0, 4.0]);
        assert_eq!(out, vec![3.0, 3.0, 4.0]);
        // A floor from a shorter prefix holds even when the weight says less.
        let out = water_fill(10.0, &[1.0, 1.0, 1.0], &[6.0, 0.0, 0.0], &[10.0; 3]);
        assert_eq!(out, vec![6.0, 2.0, 2.0]);
    }

    #[test]
    fn equal_weights_get_floor_or_ceiling_and_exact_sums() {
        let m = members(&[0; 7], &[1; 7]);
        let current = vec![vec![0; 7]; 3];
        let p = prefix_quotas(1024, 3, &m, &[7], &current);
        for (n, row) in p.iter().enumerate() {
            assert_eq!(row.iter().sum::<u64>(), 1024 * (n as u64 + 1));
            let mean = 1024.0 * (n as f64 + 1.0) / 7.0;
            assert!(row.iter().all(|&v| (v as f64 - mean).abs() < 1.0));
        }
        for pair in p.windows(2) {
            assert!(pair[0].iter().zip(&pair[1]).all(|(a, b)| a <= b));
        }
    }

    #[test]
    fn a_node_never_exceeds_one_replica_per_range() {
        let m = members(&[0, 0, 0], &[100, 1, 1]);
        let shares = &fair_shares(256, 2, &m, &[3])[1];
        assert_eq!(shares[0], 256.0);
        assert!((shares[1] - 128.0).abs() < 1e-9);
    }

    #[test]
    fn zone_caps_pin_heavy_zones() {
        // Zone 0 has the weight but may hold at most one of two entries per range.
        let m = members(&[0, 0, 1], &[10, 10, 1]);
        let shares = &fair_shares(100, 2, &m, &[2, 1])[1];
        assert!((shares[0] - 50.0).abs() < 1e-9 && (shares[1] - 50.0).abs() < 1e-9);
        assert!((shares[2] - 100.0).abs() < 1e-9);
    }

    #[test]
    fn sticky_rounding_keeps_ceilings_with_their_holders() {
        // Four shares of 1.25 need one ceiling; the value already holding 2 keeps it even though
        // its key loses every tie.
        let out = round_shares(
            5,
            &[1.25; 4],
            &[9; 4],
            &[0; 4],
            &[1, 1, 1, 2],
            &[0, 1, 2, 3],
        );
        assert_eq!(out, vec![1, 1, 1, 2]);
        let fresh = round_shares(5, &[1.25; 4], &[9; 4], &[0; 4], &[0; 4], &[0, 1, 2, 3]);
        // A value whose loss path needs the ceiling gets it before a sticky one.
        let steered = round_shares(
            5,
            &[1.25; 4],
            &[9; 4],
            &[0, 2, 0, 0],
            &[1, 1, 1, 2],
            &[0, 1, 2, 3],
        );
        assert_eq!(steered, vec![1, 2, 1, 1]);
        assert_eq!(fresh, vec![2, 1, 1, 1]);
    }
}
