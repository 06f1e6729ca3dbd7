//! Placement: filling the table so that every prefix of every preference list meets its quota.
//!
//! # The table
//!
//! The ring stores one row per range and `width` columns; entry `(r, j)` is the member index of
//! the `j+1`-th node in range r's preference list. A keyspace with N replicas uses the first N
//! columns. [`crate::quota`] says how many entries each node should hold in the first N columns
//! for every N; equivalently, how many it should hold in each column `j` (the difference of two
//! consecutive prefix quotas). Placement makes the column counts equal those column quotas,
//! column by column from the left, which makes every prefix exact at once.
//!
//! # Hard rules (never broken)
//!
//! - a row holds distinct nodes;
//! - zone rule: for every prefix N, no zone holds more than `L(N)` of the row's first N entries.
//!
//! Every operation below is checked against both before it is applied, so they hold whatever
//! happens to balance. If a hole cannot be filled without breaking them, the row's later entries
//! are cleared and refilled; a row with a valid prefix can always be extended (some zone is below
//! its bound and has an unused node, by the definition of `L`).
//!
//! # Algorithm, per column j
//!
//! A *source* is a hole in column j or an entry whose node is over its column quota; a *sink* is
//! a node under its column quota. Operations on a row r move column j from entry x to node y:
//!
//! - *direct*: y is not in the row; it replaces x (x leaves the row);
//! - *swap*: y sits later in the row, at column s; x and y trade places (the row's set of
//!   nodes is unchanged, so for prefixes beyond s nothing moves; x's new column is settled later).
//!
//! 1. Greedy rounds: visit the source rows in order of cheapest available operation, then of a
//!    hash of the range, and give each to the sink with the cheapest operation, then the largest
//!    deficit, then a hash of (range, node). "Cost" is the change in replicas moved relative to
//!    the previous ring, summed over the prefixes the operation touches: putting a node back
//!    where it was is free, a swap is cheap, a newcomer costs one per prefix. For a fresh build
//!    every cost is zero and the hashes spread co-replica sets across the cluster.
//! 2. Augmenting paths: when no source can take a sink directly, a breadth-first search over
//!    nodes finds x → y₁ → … → sink, where each arrow is an operation on a distinct row; applying
//!    the path moves one unit from the source to the sink and leaves the nodes in between even.
//!    This is Ford-Fulkerson on the bipartite b-matching of rows to nodes for this column, so it
//!    reaches the column quotas whenever the earlier columns allow it.
//! 3. Holes still open are filled with any allowed node (cheapest, least over quota), then the
//!    augmenting search runs again.
//!
//! Two refinements matter once zones or weights pin a quota at its maximum (a node in every
//! range, a zone at its bound in every range): a look-ahead refuses operations that leave a row
//! unable to reach those per-row minimums ([`row_demands`]), and rows that already cannot are
//! reopened in the current column. When rebalancing a previous table, a substitution whose only
//! conflict is a later entry of the same zone *evicts* that entry (it becomes a hole for its own
//! column to refill).
//!
//! Every loop has a bound, so placement always terminates; if quotas cannot all be met (possible
//! with odd zone layouts, or when earlier columns constrain later ones too much), the result is
//! still a valid table, only less balanced.
//!
//! # Cost
//!
//! A greedy round is `O(Q · sinks · width)`; one augmenting search is at most
//! `O(path length · Q · nodes · width)` and runs only for the few units the greedy rounds leave.

use crate::error::{Error, Result};

/// An empty table cell.
pub(crate) const HOLE: u16 = u16::MAX;

/// How many greedy rounds a column gets before augmenting paths take over.
const GREEDY_ROUNDS: usize = 4;

/// A fast, well-mixed 64-bit hash of two words (SplitMix64 finaliser). Used only for tie-breaks
/// inside placement, where blake3 per candidate would dominate the build time.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Direct,
    /// The target node already sits at this later column of the row.
    Swap(usize),
    /// Direct, and the entry at this later column (same zone as the target) becomes a hole,
    /// because keeping it would break the zone rule. Only happens when rebalancing a previous
    /// table, whose later columns are already filled.
    Evict(usize),
}

/// Inputs shared by every placement step.
#[derive(Debug)]
pub(crate) struct Shape<'a> {
    pub range_count: usize,
    pub width: usize,
    /// Member index → zone index.
    pub zone_of: &'a [usize],
    /// `bound[N-1]` is the zone bound `L(N)`.
    pub bound: &'a [usize],
    /// Member index → tie-break key derived from the node id.
    pub keys: &'a [u64],
}

/// Clears (makes holes of) entries that break the zone rule, scanning each row left to right,
/// so that the entries kept form a valid row. Needed after a change that alters zones or makes
/// the zone bound tighter (a new zone appears).
pub(crate) fn clear_zone_violations(shape: &Shape<'_>, table: &mut [u16]) {
    let zones = shape.zone_of.iter().max().map_or(0, |&z| z + 1);
    let mut counts = vec![0usize; zones];
    for row in table.chunks_mut(shape.width) {
        counts.iter_mut().for_each(|c| *c = 0);
        for (p, entry) in row.iter_mut().enumerate() {
            if *entry == HOLE {
                continue;
            }
            let zone = shape.zone_of[*entry as usize];
            if counts[zone] + 1 > shape.bound[p] {
                *entry = HOLE;
            } else {
                counts[zone] += 1;
            }
        }
    }
}

/// `result[N-1][i]`: entries of member i in the first N columns of `table`.
pub(crate) fn prefix_counts(table: &[u16], width: usize, members: usize) -> Vec<Vec<u64>> {
    let mut column = vec![vec![0u64; members]; width];
    for row in table.chunks(width) {
        for (j, &e) in row.iter().enumerate() {
            if e != HOLE {
                column[j][e as usize] += 1;
            }
        }
    }
    let mut result = Vec::with_capacity(width);
    let mut running = vec![0u64; members];
    for col in column {
        for (i, c) in col.into_iter().enumerate() {
            running[i] += c;
        }
        result.push(running.clone());
    }
    result
}

/// The placement state for one build or change.
pub(crate) struct Placer<'a> {
    shape: &'a Shape<'a>,
    members: usize,
    table: Vec<u16>,
    /// The previous ring's table in the new member indices (removed node → HOLE), for costs.
    old: &'a [u16],
    old_width: usize,
    /// `quota[j * members + i]`: entries member i should hold in column j.
    quota: Vec<u32>,
    count: Vec<u32>,
    /// `demands[M-1]`: what every row's first M entries must contain for the quotas to be
    /// reachable (see [`row_demands`]).
    demands: Vec<Vec<Demand>>,
}

/// A per-row minimum implied by the quotas, for one zone and one prefix length.
#[derive(Clone, Debug)]
struct Demand {
    zone: usize,
    /// Entries of the zone every row needs (0 when the zone is not pinned).
    need: usize,
    /// Nodes of the zone that every row needs.
    nodes: Vec<u16>,
}

/// Per-row minimums implied by the quotas.
///
/// A node cannot be in a range twice, so a node whose quota for the first M columns is Q must be
/// in every row's first M. Likewise the zone rule caps a zone at `c = min(L(M), zone size)`
/// entries of a row's first M, so a zone whose quotas add up to `Q·c` must have exactly `c` in
/// every row. A row whose first entries leave too few slots for these can never be completed to
/// meet the quotas; placement uses the minimums as a look-ahead and avoids such prefixes (it may
/// still make one as a last resort, since the zone rule comes first). Quotas short of these
/// extremes couple columns more loosely, and placement does not look ahead for them.
fn row_demands(shape: &Shape<'_>, prefix_quotas: &[Vec<u64>]) -> Vec<Vec<Demand>> {
    let zones = shape.zone_of.iter().max().map_or(0, |&z| z + 1);
    let mut sizes = vec![0usize; zones];
    for &z in shape.zone_of {
        sizes[z] += 1;
    }
    let q = shape.range_count as u64;
    (0..shape.width)
        .map(|k| {
            let mut totals = vec![0u64; zones];
            for (i, &z) in shape.zone_of.iter().enumerate() {
                totals[z] += prefix_quotas[k][i];
            }
            (0..zones)
                .filter_map(|z| {
                    let cap = shape.bound[k].min(sizes[z]);
                    // With one zone the zone minimum is the prefix length itself: no news.
                    let need = if zones > 1 && totals[z] >= q * cap as u64 {
                        cap
                    } else {
                        0
                    };
                    let nodes: Vec<u16> = (0..shape.zone_of.len())
                        .filter(|&i| shape.zone_of[i] == z && prefix_quotas[k][i] >= q)
                        .map(|i| i as u16)
                        .collect();
                    (need > 0 || !nodes.is_empty()).then_some(Demand {
                        zone: z,
                        need,
                        nodes,
                    })
                })
                .collect()
        })
        .collect()
}

impl<'a> Placer<'a> {
    /// `prefix_quotas[N-1][i]` as computed by [`crate::quota::prefix_quotas`].
    pub(crate) fn new(
        shape: &'a Shape<'a>,
        table: Vec<u16>,
        old: &'a [u16],
        old_width: usize,
        prefix_quotas: &[Vec<u64>],
    ) -> Placer<'a> {
        let members = shape.zone_of.len();
        let width = shape.width;
        let mut quota = vec![0u32; width * members];
        for j in 0..width {
            for i in 0..members {
                let before = if j == 0 { 0 } else { prefix_quotas[j - 1][i] };
                let diff = prefix_quotas[j][i].saturating_sub(before);
                quota[j * members + i] = u32::try_from(diff).unwrap_or(u32::MAX);
            }
        }
        let mut count = vec![0u32; width * members];
        for row in table.chunks(width) {
            for (j, &e) in row.iter().enumerate() {
                if e != HOLE {
                    count[j * members + e as usize] += 1;
                }
            }
        }
        let demands = row_demands(shape, prefix_quotas);
        Placer {
            shape,
            members,
            table,
            old,
            old_width,
            quota,
            count,
            demands,
        }
    }

    /// Settles every column in order and returns the table (no holes left).
    pub(crate) fn run(mut self) -> Result<Vec<u16>> {
        for j in 0..self.shape.width {
            self.settle(j)?;
        }
        Ok(self.table)
    }

    fn cell(&self, r: usize, j: usize) -> u16 {
        self.table[r * self.shape.width + j]
    }

    fn count(&self, j: usize, i: usize) -> u32 {
        self.count[j * self.members + i]
    }

    fn deficit(&self, j: usize, i: usize) -> u32 {
        self.quota[j * self.members + i].saturating_sub(self.count(j, i))
    }

    fn over(&self, j: usize, i: usize) -> bool {
        self.count(j, i) > self.quota[j * self.members + i]
    }

    /// True when the entry at (r, j) may give up its cell: a hole or an over-quota node.
    fn is_source(&self, r: usize, j: usize) -> bool {
        let x = self.cell(r, j);
        x == HOLE || self.over(j, x as usize)
    }

    /// Whether y may take cell (r, j), and how; checks distinctness, the zone rule for every
    /// prefix the operation changes and, when `strict`, that the row does not drift further from
    /// the zone minimums ([`zone_demands`]).
    fn placeable(&self, r: usize, j: usize, y: usize, strict: bool) -> Option<Kind> {
        let width = self.shape.width;
        let row = &self.table[r * width..(r + 1) * width];
        let target = y as u16;
        let mut kind = Kind::Direct;
        if let Some(p) = row.iter().position(|&e| e == target) {
            if p <= j {
                return None;
            }
            kind = Kind::Swap(p);
        }
        let x = row[j];
        let zone = self.shape.zone_of[y];
        let mut held = 0usize;
        for (p, &e) in row.iter().enumerate() {
            let e = match kind {
                _ if p == j => target,
                Kind::Swap(s) if s == p => x,
                _ => e,
            };
            if e != HOLE && self.shape.zone_of[e as usize] == zone {
                held += 1;
            }
            if p >= j && held > self.shape.bound[p] {
                if p == j || kind != Kind::Direct {
                    return None;
                }
                // Only entries after column j break the rule: evict the first of them in y's
                // zone. Counts at every prefix beyond it return to what they were (valid), and
                // prefixes before it hold no other entry of the zone after column j.
                let first = (j + 1..width)
                    .find(|&s| row[s] != HOLE && self.shape.zone_of[row[s] as usize] == zone)?;
                kind = Kind::Evict(first);
                break;
            }
        }
        if strict && !self.demands.iter().all(Vec::is_empty) {
            let after = self.zone_shortfall(j, |p| match kind {
                _ if p == j => target,
                Kind::Swap(s) if s == p => x,
                _ => row[p],
            });
            if after > 0 && after > self.zone_shortfall(j, |p| row[p]) {
                return None;
            }
        }
        Some(kind)
    }

    /// How far a row's first `j + 1` entries (read through `entry`) are from being completable
    /// to the row minimums: the worst, over prefixes M > j, of the missing entries beyond the
    /// slots left. Zero or less is fine.
    fn zone_shortfall(&self, j: usize, entry: impl Fn(usize) -> u16) -> i64 {
        let mut worst = i64::MIN;
        // Holes in the prefix are slots still to fill, like the columns after it.
        let filled = (0..=j).filter(|&p| entry(p) != HOLE).count() as i64;
        for (k, demands) in self.demands.iter().enumerate().skip(j) {
            let slots_left = k as i64 + 1 - filled;
            let mut missing = 0i64;
            for demand in demands {
                let in_zone = |p: &usize| {
                    let e = entry(*p);
                    e != HOLE && self.shape.zone_of[e as usize] == demand.zone
                };
                let have = (0..=j).filter(in_zone).count();
                let absent = demand
                    .nodes
                    .iter()
                    .filter(|&&i| !(0..=j).any(|p| entry(p) == i))
                    .count();
                missing += demand.need.saturating_sub(have).max(absent) as i64;
            }
            worst = worst.max(missing - slots_left);
        }
        worst
    }

    fn old_position(&self, r: usize, i: u16) -> Option<usize> {
        if self.old_width == 0 {
            return None;
        }
        self.old[r * self.old_width..(r + 1) * self.old_width]
            .iter()
            .position(|&e| e == i)
    }

    /// Change in replicas moved (against the previous ring), summed over the prefixes that the
    /// operation changes. Zero for a fresh build.
    fn cost(&self, r: usize, j: usize, y: usize, kind: Kind) -> i64 {
        if self.old_width == 0 {
            return 0;
        }
        let x = self.cell(r, j);
        let end = match kind {
            Kind::Direct | Kind::Evict(_) => self.shape.width,
            Kind::Swap(s) => s,
        };
        // An eviction leaves a hole whose refill moves a replica for every prefix beyond it.
        let eviction = match kind {
            Kind::Evict(s) => (self.shape.width - s) as i64,
            _ => 0,
        };
        let y_old = self.old_position(r, y as u16);
        let x_old = if x == HOLE {
            None
        } else {
            self.old_position(r, x)
        };
        let mut cost = eviction;
        for prefix in (j + 1)..=end {
            // A node outside the old prefix counts as moved while it is inside the new one.
            if y_old.is_none_or(|p| p >= prefix) {
                cost += 1;
            }
            if x != HOLE && x_old.is_none_or(|p| p >= prefix) {
                cost -= 1;
            }
        }
        cost
    }

    fn apply(&mut self, r: usize, j: usize, y: usize, kind: Kind) {
        let width = self.shape.width;
        let members = self.members;
        let x = self.cell(r, j);
        match kind {
            Kind::Direct => {}
            Kind::Swap(s) => {
                self.table[r * width + s] = x;
                self.count[s * members + y] -= 1;
                if x != HOLE {
                    self.count[s * members + x as usize] += 1;
                }
            }
            Kind::Evict(s) => {
                let evicted = self.table[r * width + s];
                self.table[r * width + s] = HOLE;
                if evicted != HOLE {
                    self.count[s * members + evicted as usize] -= 1;
                }
            }
        }
        self.table[r * width + j] = y as u16;
        self.count[j * members + y] += 1;
        if x != HOLE {
            self.count[j * members + x as usize] -= 1;
        }
    }

    /// The best operation giving cell (r, j) to one of `sinks`: (cost, deficit order, hash).
    fn best_sink(&self, r: usize, j: usize, sinks: &[usize]) -> Option<(i64, usize, Kind)> {
        let mut best: Option<((i64, u32, u64), usize, Kind)> = None;
        for &u in sinks {
            let deficit = self.deficit(j, u);
            if deficit == 0 {
                continue;
            }
            let Some(kind) = self.placeable(r, j, u, true) else {
                continue;
            };
            let key = (
                self.cost(r, j, u, kind),
                u32::MAX - deficit,
                mix(r as u64, self.shape.keys[u]),
            );
            if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                best = Some((key, u, kind));
            }
        }
        best.map(|(key, u, kind)| (key.0, u, kind))
    }

    /// One greedy round over column j; returns whether anything changed.
    fn greedy(&mut self, j: usize) -> bool {
        let sinks: Vec<usize> = (0..self.members)
            .filter(|&i| self.deficit(j, i) > 0)
            .collect();
        if sinks.is_empty() {
            return false;
        }
        let mut rows: Vec<(i64, u64, usize)> = (0..self.shape.range_count)
            .filter(|&r| self.is_source(r, j))
            .filter_map(|r| {
                let (cost, _, _) = self.best_sink(r, j, &sinks)?;
                Some((cost, mix(r as u64, j as u64), r))
            })
            .collect();
        rows.sort_unstable();
        let mut changed = false;
        for (_, _, r) in rows {
            if !self.is_source(r, j) {
                continue;
            }
            if let Some((_, u, kind)) = self.best_sink(r, j, &sinks) {
                self.apply(r, j, u, kind);
                changed = true;
            }
        }
        changed
    }

    /// Finds and applies one augmenting path in column j. Returns false when none exists.
    fn augment(&mut self, j: usize) -> bool {
        let members = self.members;
        let hole = members;
        let none = usize::MAX;
        if !(0..members).any(|i| self.deficit(j, i) > 0) {
            return false;
        }
        let mut visited = vec![false; members + 1];
        let mut frontier = vec![false; members + 1];
        // parent[y] = (previous node or `hole`, row, operation); `none` marks a source.
        let mut parent = vec![(none, 0usize, Kind::Direct); members];
        for i in 0..members {
            if self.over(j, i) {
                visited[i] = true;
                frontier[i] = true;
            }
        }
        if (0..self.shape.range_count).any(|r| self.cell(r, j) == HOLE) {
            visited[hole] = true;
            frontier[hole] = true;
        }
        // Each level visits at least one new node, so `members` levels suffice.
        for _ in 0..members {
            let mut next = vec![false; members + 1];
            let mut grew = false;
            for r in 0..self.shape.range_count {
                let x = self.cell(r, j);
                let from = if x == HOLE { hole } else { x as usize };
                if !frontier[from] {
                    continue;
                }
                for y in 0..members {
                    if visited[y] {
                        continue;
                    }
                    let Some(kind) = self.placeable(r, j, y, true) else {
                        continue;
                    };
                    visited[y] = true;
                    next[y] = true;
                    grew = true;
                    parent[y] = (from, r, kind);
                    if self.deficit(j, y) > 0 {
                        self.apply_path(j, y, &parent);
                        return true;
                    }
                }
            }
            if !grew {
                return false;
            }
            frontier = next;
        }
        false
    }

    fn apply_path(&mut self, j: usize, sink: usize, parent: &[(usize, usize, Kind)]) {
        // Rows along a path hold distinct nodes in column j, so they are distinct rows and each
        // operation was checked against a row no other step touches.
        let mut y = sink;
        let mut steps = Vec::new();
        for _ in 0..=self.members {
            let (from, r, kind) = parent[y];
            steps.push((r, y, kind));
            if from >= self.members || parent[from].0 == usize::MAX {
                break;
            }
            y = from;
        }
        for (r, y, kind) in steps {
            self.apply(r, j, y, kind);
        }
    }

    /// Fills a hole that no sink could take: the cheapest allowed node, least over quota first.
    /// Clears the row's later entries if nothing fits (then something always fits).
    fn fill_hole(&mut self, r: usize, j: usize) -> Result<()> {
        for attempt in 0..3 {
            let mut best: Option<((i64, i64, u64), usize, Kind)> = None;
            for y in 0..self.members {
                let Some(kind) = self.placeable(r, j, y, attempt == 0) else {
                    continue;
                };
                let surplus =
                    i64::from(self.count(j, y)) - i64::from(self.quota[j * self.members + y]);
                let key = (
                    self.cost(r, j, y, kind),
                    surplus,
                    mix(r as u64, self.shape.keys[y]),
                );
                if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                    best = Some((key, y, kind));
                }
            }
            if let Some((_, y, kind)) = best {
                self.apply(r, j, y, kind);
                return Ok(());
            }
            if attempt == 1 {
                let width = self.shape.width;
                for s in (j + 1)..width {
                    let e = self.table[r * width + s];
                    if e != HOLE {
                        self.count[s * self.members + e as usize] -= 1;
                        self.table[r * width + s] = HOLE;
                    }
                }
            }
        }
        Err(Error::corrupt(format!(
            "placement found no node for range {r}, column {j}; zone layout cannot be satisfied"
        )))
    }

    /// Clears column j in rows whose first `j + 1` entries already miss the row minimums when
    /// the entry in column j is not one of the needed ones: refilling the cell with a needed
    /// node is then the only way to reach the quotas. Happens after a change raised a quota to
    /// the maximum (a heavier node that must now be in every list, a zone that must be in every
    /// list); never for a fresh build, whose rows are built with the look-ahead.
    fn clear_short_rows(&mut self, j: usize) {
        if self.demands.iter().all(Vec::is_empty) {
            return;
        }
        let width = self.shape.width;
        for r in 0..self.shape.range_count {
            let x = self.cell(r, j);
            if x == HOLE {
                continue;
            }
            let row = &self.table[r * width..(r + 1) * width];
            let now = self.zone_shortfall(j, |p| row[p]);
            if now <= 0 {
                continue;
            }
            let cleared = self.zone_shortfall(j, |p| if p == j { HOLE } else { row[p] });
            if cleared < now {
                self.table[r * width + j] = HOLE;
                self.count[j * self.members + x as usize] -= 1;
            }
        }
    }

    fn settle(&mut self, j: usize) -> Result<()> {
        self.clear_short_rows(j);
        for _ in 0..GREEDY_ROUNDS {
            if !self.greedy(j) {
                break;
            }
        }
        let limit = self.shape.range_count * 2 + self.members;
        for _ in 0..limit {
            if !self.augment(j) {
                break;
            }
        }
        for r in 0..self.shape.range_count {
            if self.cell(r, j) == HOLE {
                self.fill_hole(r, j)?;
            }
        }
        for _ in 0..limit {
            if !self.augment(j) {
                break;
            }
        }
        Ok(())
    }
}
