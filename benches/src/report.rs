//! Results: HDR histograms per operation, error counts by kind, and the two ways to print
//! them (a table for people, one JSON object for scripts).
//!
//! # Why HDR histograms
//!
//! Latency distributions of a replicated store are long-tailed: the p99.9 is often ten times
//! the median, and the tail is what users feel. A mean hides it and a sorted sample of every
//! latency costs memory proportional to the run. An HDR histogram (Gil Tene's HdrHistogram)
//! keeps every value from 1 µs to [`LATENCY_MAX_US`] with three significant digits (at most
//! 0.1% error at any magnitude) in a fixed few hundred KiB, and two histograms merge by adding
//! counts, so each worker records into its own and they are summed at the end.
//!
//! # What a report says
//!
//! A report is self-describing: it carries the configuration that produced it (mode, target,
//! workload, N/R/W/dw, value size, concurrency, records, window) next to the figures. Per
//! operation kind it gives the count of successful operations, their throughput over the
//! measured window, latency percentiles (p50, p90, p99, p99.9, max, mean) in microseconds,
//! and errors by kind. Failed operations are not in the latency figures. `--json` prints the
//! same content as one JSON object on stdout:
//!
//! ```json
//! { "tool": "quorumkv-bench", "mode": "run", "config": { ... },
//!   "measured_seconds": 15.0, "ops": 123456, "errors": 0, "throughput_ops_per_sec": 8230.4,
//!   "errors_by_kind": {},
//!   "operations": { "write": { "ops": 123456, "throughput_ops_per_sec": 8230.4,
//!       "errors": 0, "errors_by_kind": {},
//!       "latency_us": { "min": 310, "mean": 7771.2, "p50": 7000, "p90": 9000, "p99": 15000,
//!                       "p99_9": 23000, "max": 41000 } } } }
//! ```

use crate::workload::{Measurement, OpKind};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The largest latency a histogram holds: 60 s. Longer ones are clamped to it (and still
/// counted), which no sane timeout lets happen.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// Significant decimal digits kept by every histogram.
const SIGNIFICANT_DIGITS: u8 = 3;

/// A histogram over 1 µs ..= [`LATENCY_MAX_US`] at three significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; the fallback is never taken.
    Histogram::new_with_bounds(1, LATENCY_MAX_US, SIGNIFICANT_DIGITS)
        .or_else(|_| Histogram::new(SIGNIFICANT_DIGITS))
        .unwrap_or_else(|_| unreachable!("three significant digits are valid"))
}

/// One operation kind's results.
#[derive(Clone, Debug)]
pub struct KindStats {
    /// Latencies of successful operations, in microseconds.
    pub histogram: Histogram<u64>,
    /// Failed operations by error kind.
    pub errors: BTreeMap<&'static str, u64>,
}

impl Default for KindStats {
    fn default() -> Self {
        KindStats {
            histogram: latency_histogram(),
            errors: BTreeMap::new(),
        }
    }
}

impl KindStats {
    /// Failed operations of every kind.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    fn is_empty(&self) -> bool {
        self.histogram.is_empty() && self.errors.is_empty()
    }
}

/// Results per operation kind, indexed by [`OpKind::index`].
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub kinds: [KindStats; OpKind::ALL.len()],
}

impl Stats {
    /// Records one finished operation.
    pub fn record(&mut self, kind: OpKind, micros: u128, outcome: Result<(), &'static str>) {
        let stats = &mut self.kinds[kind.index()];
        match outcome {
            Ok(()) => {
                let micros = u64::try_from(micros).unwrap_or(u64::MAX);
                stats
                    .histogram
                    .saturating_record(micros.clamp(1, LATENCY_MAX_US));
            }
            Err(error) => *stats.errors.entry(error).or_default() += 1,
        }
    }

    /// Adds another worker's results.
    pub fn merge(&mut self, other: Stats) {
        for (mine, theirs) in self.kinds.iter_mut().zip(other.kinds) {
            // Both histograms have the same bounds, so adding cannot fail; a failure would
            // only lose that worker's latencies, never corrupt these.
            let _ = mine.histogram.add(&theirs.histogram);
            for (error, count) in theirs.errors {
                *mine.errors.entry(error).or_default() += count;
            }
        }
    }

    /// Successful operations of every kind.
    pub fn ops(&self) -> u64 {
        self.kinds.iter().map(|kind| kind.histogram.len()).sum()
    }

    /// Failed operations of every kind.
    pub fn errors(&self) -> u64 {
        self.kinds.iter().map(KindStats::error_total).sum()
    }
}

/// A finished benchmark: the configuration and the measurement, ready to print.
#[derive(Debug)]
pub struct Report {
    /// The subcommand (`run`, `ceiling`, `raw-quic`, `raw-sled`, `etcd`).
    pub mode: String,
    /// Everything needed to reproduce the figures, in the order given.
    pub config: Map<String, Value>,
    pub measurement: Measurement,
}

impl Report {
    /// A report for `mode`; add configuration with [`Report::with`].
    pub fn new(mode: &str, measurement: Measurement) -> Report {
        Report {
            mode: mode.to_string(),
            config: Map::new(),
            measurement,
        }
    }

    /// Adds one configuration entry.
    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Report {
        self.config.insert(name.to_string(), value.into());
        self
    }

    fn seconds(&self) -> f64 {
        self.measurement.elapsed.as_secs_f64()
    }

    fn rate(&self, ops: u64) -> f64 {
        let seconds = self.seconds();
        if seconds > 0.0 {
            ops as f64 / seconds
        } else {
            0.0
        }
    }

    /// The operation kinds that ran, with their stats.
    fn kinds(&self) -> impl Iterator<Item = (OpKind, &KindStats)> {
        OpKind::ALL
            .into_iter()
            .map(|kind| (kind, &self.measurement.stats.kinds[kind.index()]))
            .filter(|(_, stats)| !stats.is_empty())
    }

    /// The report as one JSON object (shape in the module docs).
    pub fn to_json(&self) -> Value {
        let stats = &self.measurement.stats;
        let mut operations = Map::new();
        let mut all_errors: BTreeMap<&str, u64> = BTreeMap::new();
        for (kind, kind_stats) in self.kinds() {
            for (error, count) in &kind_stats.errors {
                *all_errors.entry(error).or_default() += count;
            }
            let ops = kind_stats.histogram.len();
            operations.insert(
                kind.name().to_string(),
                json!({
                    "ops": ops,
                    "throughput_ops_per_sec": round2(self.rate(ops)),
                    "errors": kind_stats.error_total(),
                    "errors_by_kind": kind_stats.errors,
                    "latency_us": latency_json(&kind_stats.histogram),
                }),
            );
        }
        json!({
            "tool": "quorumkv-bench",
            "mode": self.mode,
            "config": self.config,
            "measured_seconds": round2(self.seconds()),
            "ops": stats.ops(),
            "errors": stats.errors(),
            "throughput_ops_per_sec": round2(self.rate(stats.ops())),
            "errors_by_kind": all_errors,
            "operations": operations,
        })
    }

    /// The report as text: the configuration, then one table row per operation kind.
    pub fn to_table(&self) -> String {
        let stats = &self.measurement.stats;
        let mut out = String::new();
        let _ = writeln!(out, "quorumkv-bench {}", self.mode);
        for (name, value) in &self.config {
            let value = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "  {name:<16} {value}");
        }
        let _ = writeln!(
            out,
            "  {:<16} {:.2} s, {} ops, {} errors, {:.1} ops/s",
            "measured",
            self.seconds(),
            stats.ops(),
            stats.errors(),
            self.rate(stats.ops())
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<8} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "op",
            "ops",
            "ops/s",
            "mean µs",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "errors"
        );
        for (kind, kind_stats) in self.kinds() {
            let h = &kind_stats.histogram;
            let ops = h.len();
            let _ = writeln!(
                out,
                "{:<8} {:>10} {:>11.1} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
                kind.name(),
                ops,
                self.rate(ops),
                if ops > 0 { h.mean() } else { 0.0 },
                quantile(h, 0.50),
                quantile(h, 0.90),
                quantile(h, 0.99),
                quantile(h, 0.999),
                if ops > 0 { h.max() } else { 0 },
                kind_stats.error_total()
            );
        }
        let errors: Vec<String> = self
            .kinds()
            .flat_map(|(kind, kind_stats)| {
                kind_stats
                    .errors
                    .iter()
                    .map(move |(error, count)| format!("{} {error}: {count}", kind.name()))
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(out, "\nerrors: {}", errors.join(", "));
        }
        out
    }
}

fn quantile(histogram: &Histogram<u64>, q: f64) -> u64 {
    if histogram.is_empty() {
        0
    } else {
        histogram.value_at_quantile(q)
    }
}

fn latency_json(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return json!({});
    }
    json!({
        "min": histogram.min(),
        "mean": round2(histogram.mean()),
        "p50": histogram.value_at_quantile(0.50),
        "p90": histogram.value_at_quantile(0.90),
        "p99": histogram.value_at_quantile(0.99),
        "p99_9": histogram.value_at_quantile(0.999),
        "max": histogram.max(),
    })
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> Report {
        let mut stats = Stats::default();
        for micros in 1..=1000u128 {
            stats.record(OpKind::Read, micros, Ok(()));
        }
        let mut other = Stats::default();
        other.record(OpKind::Update, 5000, Ok(()));
        other.record(OpKind::Update, 0, Err("timeout"));
        other.record(OpKind::Update, 0, Err("timeout"));
        other.record(OpKind::Update, 0, Err("quorum_not_reached"));
        stats.merge(other);
        let measurement = Measurement {
            elapsed: Duration::from_secs(2),
            stats,
        };
        Report::new("run", measurement)
            .with("workload", "a")
            .with("concurrency", 64)
    }

    #[test]
    fn json_has_the_documented_shape() {
        let json = sample().to_json();
        assert_eq!(json["tool"], "quorumkv-bench");
        assert_eq!(json["mode"], "run");
        assert_eq!(json["config"]["workload"], "a");
        assert_eq!(json["config"]["concurrency"], 64);
        assert_eq!(json["measured_seconds"], 2.0);
        assert_eq!(json["ops"], 1001);
        assert_eq!(json["errors"], 3);
        assert_eq!(json["throughput_ops_per_sec"], 500.5);
        assert_eq!(json["errors_by_kind"]["timeout"], 2);
        let read = &json["operations"]["read"];
        assert_eq!(read["ops"], 1000);
        assert_eq!(read["errors"], 0);
        let latency = &read["latency_us"];
        for field in ["min", "mean", "p50", "p90", "p99", "p99_9", "max"] {
            assert!(latency[field].is_number(), "{field} in {latency}");
        }
        // Three significant digits: within 0.1% of the true percentile.
        let p50 = latency["p50"].as_u64().unwrap();
        assert!((499..=501).contains(&p50), "{p50}");
        assert_eq!(latency["max"], 1000);
        let update = &json["operations"]["update"];
        assert_eq!(update["ops"], 1);
        assert_eq!(update["errors_by_kind"]["quorum_not_reached"], 1);
        assert!(
            json["operations"].get("write").is_none(),
            "kinds that did not run are left out"
        );
    }

    #[test]
    fn the_table_names_every_kind_and_error() {
        let table = sample().to_table();
        assert!(table.contains("workload"), "{table}");
        assert!(
            table.lines().any(|line| line.starts_with("read ")),
            "{table}"
        );
        assert!(table.contains("update timeout: 2"), "{table}");
    }

    #[test]
    fn latencies_beyond_the_range_are_clamped_not_lost() {
        let mut stats = Stats::default();
        stats.record(OpKind::Write, u128::MAX, Ok(()));
        stats.record(OpKind::Write, 0, Ok(()));
        assert_eq!(stats.kinds[OpKind::Write.index()].histogram.len(), 2);
    }
}
