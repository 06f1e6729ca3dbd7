//! What a benchmark does, and the closed-loop driver that does it.
//!
//! # Workloads
//!
//! The mixes are YCSB's core workloads, plus a write-only one:
//!
//! | workload | mix | YCSB's example |
//! | --- | --- | --- |
//! | `a` | 50% read, 50% update | a session store recording recent actions |
//! | `b` | 95% read, 5% update | photo tagging: mostly reads |
//! | `c` | 100% read | a user-profile cache |
//! | `write` | 100% write | ingest |
//!
//! The operations ([`OpKind`]) mean, for every target:
//!
//! * **read**: read one key (QuorumKV: a GET at R; etcd: a linearizable range read).
//! * **update**: read-modify-write. By default it reads the key and writes a new value with
//!   what the read returned (QuorumKV: the read's context, so the write replaces the siblings it
//!   saw instead of piling up new ones on hot keys). It is timed as *one* operation, read and
//!   write together. With `--blind` an update is a single write, like `write`.
//! * **write**: one write, no read. QuorumKV: with the context this client got back from its
//!   own last write of that key, if any (so one writer never makes siblings of itself).
//! * **insert**: the load phase's first write of each record; never part of a result.
//!
//! # The driver
//!
//! [`drive`] runs a closed loop: `concurrency` workers, each with one operation in flight at a
//! time, each issuing its next operation the moment the previous one finishes. Closed loops
//! measure what a fixed number of clients get, so latency and throughput are two views of one
//! queue (Little's law: in flight = throughput × latency). They do not model an open arrival
//! rate, and a stall is one slow operation per worker rather than a queue of late arrivals.
//!
//! A run has phases. During `warmup` operations run but are not recorded (connections, caches
//! and the allocator settle). The measured window starts when warmup ends and stops after
//! `duration` or after `ops` operations were started in it, whichever comes first. An
//! operation is recorded if it *started* inside the window; the window's length is measured
//! until the last such operation finished, so throughput is recorded operations divided by a
//! window that contains them all.
//!
//! Each worker keeps its own histograms and error counts, merged at the end: recording never
//! takes a lock or touches a shared cache line, except one relaxed counter for the progress
//! bar. Latency is the wall-clock time of the operation's future, in microseconds; failed
//! operations count as errors by kind and stay out of the latency histograms.

use crate::keys::KeyChooser;
use crate::report::Stats;
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One kind of operation; see the module docs for what each means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Read,
    Update,
    Write,
    Insert,
}

impl OpKind {
    /// Every kind, in report order.
    pub const ALL: [OpKind; 4] = [OpKind::Read, OpKind::Update, OpKind::Write, OpKind::Insert];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Update => "update",
            OpKind::Write => "write",
            OpKind::Insert => "insert",
        }
    }

    /// Position in [`OpKind::ALL`], for per-kind arrays.
    pub fn index(self) -> usize {
        match self {
            OpKind::Read => 0,
            OpKind::Update => 1,
            OpKind::Write => 2,
            OpKind::Insert => 3,
        }
    }
}

/// A workload mix, as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// YCSB A: 50% read, 50% update.
    A,
    /// YCSB B: 95% read, 5% update.
    B,
    /// YCSB C: read only.
    C,
    /// Write only.
    Write,
}

impl Workload {
    /// The mix as `(kind, fraction)` pairs summing to one.
    pub fn mix(self) -> Mix {
        match self {
            Workload::A => Mix::new(&[(OpKind::Read, 0.5), (OpKind::Update, 0.5)]),
            Workload::B => Mix::new(&[(OpKind::Read, 0.95), (OpKind::Update, 0.05)]),
            Workload::C => Mix::only(OpKind::Read),
            Workload::Write => Mix::only(OpKind::Write),
        }
    }

    /// Whether any operation reads existing data, so records must be loaded first.
    pub fn reads(self) -> bool {
        !matches!(self, Workload::Write)
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
            Workload::Write => "write",
        }
    }
}

/// A probability for each operation kind.
#[derive(Clone, Debug)]
pub struct Mix {
    /// Cumulative thresholds in [0, 1], with the kind chosen below each.
    thresholds: Vec<(f64, OpKind)>,
}

impl Mix {
    /// A mix from `(kind, fraction)` pairs; fractions are normalised to sum to one.
    pub fn new(parts: &[(OpKind, f64)]) -> Mix {
        let total: f64 = parts.iter().map(|(_, share)| share).sum();
        let mut cumulative = 0.0;
        let thresholds = parts
            .iter()
            .map(|(kind, share)| {
                cumulative += share / total;
                (cumulative, *kind)
            })
            .collect();
        Mix { thresholds }
    }

    /// Every operation of one kind.
    pub fn only(kind: OpKind) -> Mix {
        Mix {
            thresholds: vec![(1.0, kind)],
        }
    }

    /// Draws the next operation kind.
    pub fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> OpKind {
        if let [(_, only)] = self.thresholds.as_slice() {
            return *only;
        }
        let u: f64 = rng.random();
        self.thresholds
            .iter()
            .find(|(threshold, _)| u < *threshold)
            .or(self.thresholds.last())
            .map_or(OpKind::Read, |(_, kind)| *kind)
    }
}

/// Something the driver can send operations to: a QuorumKV cluster, an echo quorum, sled...
///
/// An error is returned as its kind, a short stable snake_case name (for QuorumKV,
/// `quorumkv_client::Error::kind`), which is what reports count.
pub trait Target: Send + Sync + 'static {
    /// Performs one operation of `kind` on record `key`.
    fn execute(
        &self,
        kind: OpKind,
        key: u64,
    ) -> impl Future<Output = Result<(), &'static str>> + Send;
}

/// How long and how hard to drive a target.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Operations in flight at once (workers).
    pub concurrency: usize,
    /// Unrecorded time before the measured window.
    pub warmup: Duration,
    /// Length of the measured window (an upper bound when `ops` is also set).
    pub duration: Option<Duration>,
    /// Operations to start in the measured window.
    pub ops: Option<u64>,
    /// Seed for the workers' random choices (worker i uses `seed + i`).
    pub seed: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Plan {
    /// Refuses a plan that would never end or never run.
    pub fn validate(&self) -> Result<()> {
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if self.duration.is_none() && self.ops.is_none() {
            bail!("give --duration or --ops");
        }
        if self.ops == Some(0) || self.duration == Some(Duration::ZERO) {
            bail!("--duration and --ops must be positive");
        }
        Ok(())
    }
}

/// What a measured run produced.
#[derive(Debug)]
pub struct Measurement {
    /// From the start of the measured window until its last operation finished.
    pub elapsed: Duration,
    /// Histograms and error counts per operation kind.
    pub stats: Stats,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Shared between the workers and the clock.
#[derive(Debug)]
struct Shared {
    phase: AtomicU8,
    /// Operations started in the measured window (the `ops` budget).
    started: AtomicU64,
    /// Operations finished, recorded or not (the progress bar).
    finished: AtomicU64,
}

/// Runs `plan` against `target` with operations drawn from `mix` over keys from `keys`.
pub async fn drive<T: Target>(
    target: Arc<T>,
    mix: &Mix,
    keys: &KeyChooser,
    plan: &Plan,
) -> Result<Measurement> {
    plan.validate()?;
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(if plan.warmup.is_zero() {
            MEASURE
        } else {
            WARMUP
        }),
        started: AtomicU64::new(0),
        finished: AtomicU64::new(0),
    });
    let bar = progress_bar(plan);
    let mut workers = tokio::task::JoinSet::new();
    let mut window_start = Instant::now();
    for worker in 0..plan.concurrency {
        let (target, shared, mix, keys) =
            (target.clone(), shared.clone(), mix.clone(), keys.clone());
        let seed = plan.seed.wrapping_add(worker as u64);
        let ops = plan.ops;
        workers.spawn(async move { work(&*target, &shared, &mix, &keys, seed, ops).await });
    }
    if !plan.warmup.is_zero() {
        bar.set_message("warmup");
        tick_until(&bar, &shared, Instant::now() + plan.warmup).await;
        shared.phase.store(MEASURE, Ordering::SeqCst);
        window_start = Instant::now();
    }
    bar.set_message("measuring");
    // Without a duration the window ends when the ops budget is spent; the timer never fires.
    let window = plan
        .duration
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let deadline = tokio::time::sleep_until((window_start + window).into());
    tokio::pin!(deadline);
    let mut stats = Stats::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(result) => stats.merge(result?),
                None => break,
            },
            () = &mut deadline, if shared.phase.load(Ordering::Relaxed) != STOP => {
                shared.phase.store(STOP, Ordering::SeqCst);
            }
            _ = ticker.tick() => bar.set_position(shared.finished.load(Ordering::Relaxed)),
        }
    }
    let elapsed = window_start.elapsed();
    bar.finish_and_clear();
    Ok(Measurement { elapsed, stats })
}

/// One worker: operations back to back until the phase says stop.
async fn work<T: Target>(
    target: &T,
    shared: &Shared,
    mix: &Mix,
    keys: &KeyChooser,
    seed: u64,
    ops: Option<u64>,
) -> Stats {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    loop {
        let recorded = match shared.phase.load(Ordering::Relaxed) {
            WARMUP => false,
            MEASURE => true,
            _ => break,
        };
        if recorded {
            if let Some(ops) = ops {
                if shared.started.fetch_add(1, Ordering::Relaxed) >= ops {
                    shared.phase.store(STOP, Ordering::Relaxed);
                    break;
                }
            }
        }
        let kind = mix.pick(&mut rng);
        let key = keys.next(&mut rng);
        let start = Instant::now();
        let outcome = target.execute(kind, key).await;
        let micros = start.elapsed().as_micros();
        if recorded {
            stats.record(kind, micros, outcome);
        }
        shared.finished.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

/// Keeps the progress bar moving until `until`.
async fn tick_until(bar: &ProgressBar, shared: &Shared, until: Instant) {
    while Instant::now() < until {
        bar.set_position(shared.finished.load(Ordering::Relaxed));
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
    }
}

/// A spinner with the operation count and rate on stderr, or a hidden bar when `plan.progress`
/// is off (not a terminal, or `--json`).
pub fn progress_bar(plan: &Plan) -> ProgressBar {
    if !plan.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}: {human_pos} ops ({per_sec})")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A progress bar with a known length (the load phase), hidden when `show` is off.
pub fn counted_bar(len: u64, show: bool, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {human_pos}/{human_len} ({per_sec}, {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// What the load phase did.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LoadSummary {
    pub records: u64,
    pub concurrency: usize,
    pub seconds: f64,
    pub errors: u64,
}

/// Writes every record once ([`OpKind::Insert`]) with `concurrency` writers; not measured.
///
/// Fails if any insert failed: a read-heavy run over partly missing data would measure
/// something else.
pub async fn load<T: Target>(
    target: Arc<T>,
    records: u64,
    concurrency: usize,
    progress: bool,
) -> Result<LoadSummary> {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<&'static str>));
    let bar = counted_bar(records, progress, "load");
    let start = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, next, errors, first_error, bar) = (
            target.clone(),
            next.clone(),
            errors.clone(),
            first_error.clone(),
            bar.clone(),
        );
        writers.spawn(async move {
            loop {
                let key = next.fetch_add(1, Ordering::Relaxed);
                if key >= records {
                    break;
                }
                if let Err(kind) = target.execute(OpKind::Insert, key).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut first) = first_error.lock() {
                        first.get_or_insert(kind);
                    }
                }
                bar.inc(1);
            }
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined?;
    }
    bar.finish_and_clear();
    let summary = LoadSummary {
        records,
        concurrency,
        seconds: start.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
    };
    if summary.errors > 0 {
        let kind = first_error.lock().ok().and_then(|first| *first);
        bail!(
            "the load phase failed: {} of {records} inserts failed (first error: {})",
            summary.errors,
            kind.unwrap_or("unknown")
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyDistribution;

    #[test]
    fn mixes_follow_their_shares() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mix = Workload::B.mix();
        let updates = (0..100_000)
            .filter(|_| mix.pick(&mut rng) == OpKind::Update)
            .count();
        assert!((4_000..6_000).contains(&updates), "{updates}");
        assert!((0..1000).all(|_| Workload::C.mix().pick(&mut rng) == OpKind::Read));
        assert!((0..1000).all(|_| Workload::Write.mix().pick(&mut rng) == OpKind::Write));
    }

    /// Counts operations and fails every tenth write.
    #[derive(Debug, Default)]
    struct Counter {
        calls: AtomicU64,
    }

    impl Target for Counter {
        async fn execute(&self, kind: OpKind, _key: u64) -> Result<(), &'static str> {
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            tokio::task::yield_now().await;
            if kind == OpKind::Write && call.is_multiple_of(10) {
                return Err("every_tenth");
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_ops_budget_is_spent_exactly_and_errors_are_counted_by_kind() {
        let keys = KeyChooser::new(KeyDistribution::Uniform, 100, 0.99).unwrap();
        let plan = Plan {
            concurrency: 8,
            warmup: Duration::ZERO,
            duration: None,
            ops: Some(1000),
            seed: 3,
            progress: false,
        };
        let target = Arc::new(Counter::default());
        let measured = drive(target.clone(), &Workload::Write.mix(), &keys, &plan)
            .await
            .unwrap();
        let write = &measured.stats.kinds[OpKind::Write.index()];
        assert_eq!(write.histogram.len() + write.error_total(), 1000);
        assert_eq!(write.errors.get("every_tenth"), Some(&100));
        assert_eq!(target.calls.load(Ordering::Relaxed), 1000);
    }

    #[tokio::test]
    async fn the_load_phase_writes_every_record_once() {
        let target = Arc::new(Counter::default());
        let summary = load(target.clone(), 500, 16, false).await.unwrap();
        assert_eq!(summary.records, 500);
        assert_eq!(target.calls.load(Ordering::Relaxed), 500);
    }

    #[test]
    fn plans_that_never_end_are_refused() {
        let plan = Plan {
            concurrency: 1,
            warmup: Duration::ZERO,
            duration: None,
            ops: None,
            seed: 0,
            progress: false,
        };
        assert!(plan.validate().is_err());
    }
}
