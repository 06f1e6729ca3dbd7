//! `quorumkv-bench raw-sled`: sled inserts alone, optionally durable with group commit: what
//! one replica's storage can do before any network or replication is involved.
//!
//! # Durability and group commit
//!
//! With `--durable`, an insert is acknowledged only after a *flush that covers it*. A flush is
//! `sled::Db::flush()` (sled writes its dirty buffers and calls `sync_file_range` on them)
//! followed by `File::sync_data()` (fdatasync) on the `db` file in the sled directory, which
//! also forces the file's size and the device's write cache. `--flush-only` leaves out the
//! fdatasync, to compare with a store that trusts `Db::flush()` alone.
//!
//! Flushes are expensive (one or more device cache flushes) and cost about the same whatever
//! they cover, so writers share them, as the node's flusher does:
//!
//! 1. A writer inserts, then takes the next *write sequence number* (after the insert
//!    completed, so every number handed out belongs to a finished insert), wakes the flusher
//!    and waits until the *durable* number reaches its own.
//! 2. One flusher task runs at a time. It reads the current write number `target`, flushes,
//!    and publishes `target` as durable: every insert numbered up to `target` had completed
//!    before the flush started, so the flush covers it.
//! 3. Writers that arrive during a flush have numbers above `target` and wait for the next
//!    flush, which starts as soon as this one ends. Under load, each flush covers every insert
//!    that arrived during the previous one: the batch grows with the flush time, and
//!    throughput stays high while each writer waits for at most two flushes.
//!
//! A failed flush fails every insert waiting for it (error kind `flush`) and the flusher
//! tries again for the next ones. Without `--durable`, inserts are acknowledged as soon as
//! sled has them in memory; sled's own background flusher still runs every 500 ms.
//!
//! Inserts run on the async workers directly: they take microseconds, and blocking a worker
//! that long is what a storage engine called from a runtime does. Flushes run on a blocking
//! thread.

use crate::cli::{LoadArgs, Output};
use crate::keys::key_name;
use crate::report::Report;
use crate::workload::{self, Mix, OpKind, Target};
use anyhow::{Context as _, Result};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{watch, Notify};

/// Arguments of `quorumkv-bench raw-sled`.
#[derive(Clone, Debug, clap::Args)]
pub struct RawSledArgs {
    /// Acknowledge an insert only after a flush (Db::flush + fdatasync) that covers it;
    /// concurrent writers share flushes.
    #[arg(long)]
    pub durable: bool,
    /// With --durable, flush with Db::flush() alone (no fdatasync of the db file).
    #[arg(long, requires = "durable")]
    pub flush_only: bool,
    /// Directory for the sled database [default: a temporary directory, removed afterwards].
    /// It should be on the disk you want to measure (not tmpfs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// sled's cache in MiB.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: u64,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// The shared state of writers and the flusher.
#[derive(Debug)]
struct GroupCommit {
    /// The highest write sequence number handed out (every one belongs to a finished insert).
    written: AtomicU64,
    /// Rung by writers when there is something to flush.
    wake: Notify,
    /// The highest write sequence number a finished flush covered.
    durable: watch::Sender<u64>,
    /// Set when a flush failed; cleared by the next successful one.
    failed: AtomicBool,
    flushes: AtomicU64,
}

/// sled inserts, acknowledged at once or after a covering flush.
#[derive(Debug)]
struct RawSled {
    db: sled::Db,
    value: Vec<u8>,
    commit: Option<Arc<GroupCommit>>,
}

impl Target for RawSled {
    async fn execute(&self, _kind: OpKind, key: u64) -> Result<(), &'static str> {
        self.db
            .insert(key_name(key), self.value.as_slice())
            .map_err(|_| "insert")?;
        let Some(commit) = &self.commit else {
            return Ok(());
        };
        let seq = commit.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = commit.durable.subscribe();
        commit.wake.notify_one();
        durable
            .wait_for(|durable| *durable >= seq)
            .await
            .map_err(|_| "flusher_gone")?;
        if commit.failed.load(Ordering::SeqCst) {
            return Err("flush");
        }
        Ok(())
    }
}

/// The one flusher: flush whenever some write is not yet covered, publish what it covered.
async fn flusher(commit: Arc<GroupCommit>, db: sled::Db, file: Option<Arc<File>>) {
    loop {
        let target = commit.written.load(Ordering::SeqCst);
        if target <= *commit.durable.borrow() {
            // `notify_one` keeps a permit if nobody waits, so a wake between the check above
            // and this wait is not lost.
            commit.wake.notified().await;
            continue;
        }
        let (db, file) = (db.clone(), file.clone());
        let flushed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            db.flush().map_err(std::io::Error::other)?;
            if let Some(file) = file {
                file.sync_data()?;
            }
            Ok(())
        })
        .await;
        commit
            .failed
            .store(!matches!(flushed, Ok(Ok(()))), Ordering::SeqCst);
        commit.flushes.fetch_add(1, Ordering::Relaxed);
        commit.durable.send_replace(target);
    }
}

/// Runs the mode and returns its report.
pub async fn run(args: RawSledArgs, output: &Output) -> Result<Report> {
    let load = &args.load;
    let temporary = match &args.dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("quorumkv-bench-sled-")
                .tempdir()?,
        ),
    };
    let dir = match (&args.dir, &temporary) {
        (Some(dir), _) => dir.clone(),
        (None, Some(temporary)) => temporary.path().to_path_buf(),
        (None, None) => unreachable!("one of the two is set"),
    };
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(args.cache_mib * 1024 * 1024)
        .open()
        .with_context(|| format!("opening sled in {}", dir.display()))?;
    let (commit, flusher_task) = if args.durable {
        let file = if args.flush_only {
            None
        } else {
            let path = dir.join("db");
            Some(Arc::new(File::open(&path).with_context(|| {
                format!("opening {} for fdatasync", path.display())
            })?))
        };
        let commit = Arc::new(GroupCommit {
            written: AtomicU64::new(0),
            wake: Notify::new(),
            durable: watch::Sender::new(0),
            failed: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        });
        let task = tokio::spawn(flusher(commit.clone(), db.clone(), file));
        (Some(commit), Some(task))
    } else {
        (None, None)
    };
    let target = Arc::new(RawSled {
        db: db.clone(),
        value: load.value(),
        commit: commit.clone(),
    });
    let keys = load.key_chooser()?;
    let measured = workload::drive(
        target,
        &Mix::only(OpKind::Insert),
        &keys,
        &load.plan(output),
    )
    .await;
    if let Some(task) = flusher_task {
        task.abort();
    }
    let measurement = measured?;
    let durability = match (args.durable, args.flush_only) {
        (false, _) => "none (acknowledged in memory)".to_string(),
        (true, true) => "group commit: Db::flush() covering each insert".to_string(),
        (true, false) => {
            "group commit: Db::flush() + fdatasync(db) covering each insert".to_string()
        }
    };
    let mut report = Report::new("raw-sled", measurement)
        .with("target", format!("sled 0.34 in {}", dir.display()))
        .with("durable", args.durable)
        .with("durability", durability)
        .with("cache_mib", args.cache_mib);
    if let Some(commit) = &commit {
        report = report.with("flushes", commit.flushes.load(Ordering::Relaxed));
    }
    Ok(load.describe(report))
}
