//! A checker for histories of a leaderless key-value store: pure, with no sockets and no clock,
//! so the network-fault suite (`tests/tests/netfault.rs`) and the simulation can share it.
//!
//! # What is recorded
//!
//! Every value a workload writes is globally unique (for example `c3-op41`), and every delete has
//! a unique name too, so a history can be checked without interpreting version vectors. A
//! [`Record`] says who ran the operation ([`Record::client`]), on which key, what it was
//! ([`Op`]: a blind put, a put with a context, a delete, a get), the values its writer had read
//! (the siblings of the read whose context the write carried), the requested R, W and `dw`, how
//! it ended ([`Outcome`]), and for a get the siblings it returned. Records carry logical ticks
//! ([`Recorder::tick`]) for their invocation and completion; [`Recorder::crashed`] marks a
//! kill -9 in the same time line. After the faults heal, the workload reads every key from all
//! replicas and records those [`History::final_reads`].
//!
//! # The supersession graph
//!
//! A write `w` *supersedes* value `v` when `v` was among the siblings its writer had read: the
//! context `w` carried covers `v`'s dot, so every state holding `w` forgets `v`, and every later
//! write whose writer read `w` (or a state that held it) forgets `v` as well. Edges go from a
//! write to the values it read; `v` is an *ancestor* of `w` when a path leads from `w` to `v`.
//! The graph is acyclic in any real history (a value is written before it is read).
//!
//! # The checks
//!
//! 1. **Only written values, under their own key.** Every sibling any read returned (during the
//!    faults or at the end) is the value of a put to that key. A value nobody wrote, or one
//!    written to another key, is a [`Violation::UnknownValue`] or [`Violation::WrongKey`].
//! 2. **No superseded sibling.** No read returns two siblings one of which is an ancestor of the
//!    other ([`Violation::SupersededSibling`]). This holds whatever the outcome of the writes
//!    involved: a sibling that was returned was applied somewhere, and every state holding it
//!    covers its ancestors.
//! 3. **No acknowledged write lost.** Every put that must survive (below) is in the final read of
//!    its key, or is an ancestor of a write that may be in effect: a delete (tombstones are never
//!    visible, so any delete may be in effect, whatever its outcome), a put in the final read,
//!    or, recursively, a put that is itself an ancestor of a write that may be in effect.
//!    Otherwise it is a [`Violation::LostWrite`]. Writes that failed or timed out may or may not
//!    be present; they are counted ([`Stats`]), never flagged.
//! 4. **Nothing superseded comes back.** No value in a final read is an ancestor of a write that
//!    must survive and is not itself in that final read ([`Violation::Resurrected`]; when it is
//!    there, check 2 reports the pair). A delete's values must stay deleted.
//!
//! # Which writes must survive
//!
//! A write acknowledged with `dw >= 1` was flushed to disk on at least one replica before the
//! acknowledgement, so it must survive anything the suites do. The store acknowledges `dw = 0`
//! writes before they are on disk, so a kill -9 may lose them legitimately; but a write
//! acknowledged at W was applied (in memory) on W distinct replicas, and a replica that never
//! crashed keeps it. So a `dw = 0` acknowledgement must survive unless at least W distinct nodes
//! were killed after the write was invoked (the suite records a crash once the process is dead,
//! so a write invoked later cannot have been on it). That is simple and sound: it never blames
//! the store for a loss it is allowed, at the price of not checking `dw = 0` writes whose W
//! replicas might all have crashed since.
//!
//! # Soundness and its price
//!
//! Every violation is a real bug of the store (or of the history's recording): the checks only
//! use facts the history proves. The price is completeness: the checker cannot see tombstones
//! or contexts, so a lost write that some failed delete had read, or a lost `dw = 0` write in a
//! schedule with a crash, goes unnoticed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A point in a history's logical time: one counter shared by every client.
pub type Tick = u64;

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The store acknowledged it (for a get: answered it).
    Ok,
    /// The store answered with an error. A write that failed this way (a quorum not reached, for
    /// example) may still have been applied on some replicas.
    Failed(String),
    /// No answer came in time (or the connection broke): it may or may not have been applied.
    Indeterminate(String),
}

impl Outcome {
    /// Whether the store acknowledged the operation.
    pub fn is_ok(&self) -> bool {
        *self == Outcome::Ok
    }
}

/// What an operation was, with what its writer had read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A put without a context: it becomes a sibling of whatever is stored.
    PutBlind { value: String, w: u8, dw: u8 },
    /// A put carrying the context of an earlier read, whose siblings were `read`.
    PutWithContext {
        value: String,
        read: Vec<String>,
        w: u8,
        dw: u8,
    },
    /// A delete carrying the context of an earlier read, whose siblings were `read`. Tombstones
    /// have no value, so `id` names the delete (unique among every write's id).
    Delete {
        id: String,
        read: Vec<String>,
        w: u8,
        dw: u8,
    },
    /// A read at `r`, and the siblings it returned (empty unless it succeeded).
    Get { r: u8, siblings: Vec<String> },
}

impl Op {
    /// A write's id (a put's value, a delete's name); `None` for a get.
    pub fn write_id(&self) -> Option<&str> {
        match self {
            Op::PutBlind { value, .. } | Op::PutWithContext { value, .. } => Some(value),
            Op::Delete { id, .. } => Some(id),
            Op::Get { .. } => None,
        }
    }

    /// The values the writer had read (the siblings its context covers); empty for blind puts
    /// and gets.
    pub fn read(&self) -> &[String] {
        match self {
            Op::PutWithContext { read, .. } | Op::Delete { read, .. } => read,
            Op::PutBlind { .. } | Op::Get { .. } => &[],
        }
    }

    /// A write's `w` and `dw`; `None` for a get.
    pub fn quorum(&self) -> Option<(u8, u8)> {
        match self {
            Op::PutBlind { w, dw, .. }
            | Op::PutWithContext { w, dw, .. }
            | Op::Delete { w, dw, .. } => Some((*w, *dw)),
            Op::Get { .. } => None,
        }
    }

    fn is_put(&self) -> bool {
        matches!(self, Op::PutBlind { .. } | Op::PutWithContext { .. })
    }
}

/// One operation of one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub client: usize,
    pub key: String,
    pub op: Op,
    pub outcome: Outcome,
    pub invoked: Tick,
    pub completed: Tick,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[t{}..t{}] c{} ",
            self.invoked, self.completed, self.client
        )?;
        match &self.op {
            Op::PutBlind { value, w, dw } => {
                write!(f, "put {} = {value} (blind) w={w} dw={dw}", self.key)?
            }
            Op::PutWithContext { value, read, w, dw } => write!(
                f,
                "put {} = {value} (context of {read:?}) w={w} dw={dw}",
                self.key
            )?,
            Op::Delete { id, read, w, dw } => write!(
                f,
                "delete {} as {id} (context of {read:?}) w={w} dw={dw}",
                self.key
            )?,
            Op::Get { r, siblings } => write!(f, "get {} r={r} -> {siblings:?}", self.key)?,
        }
        match &self.outcome {
            Outcome::Ok => write!(f, ": ok"),
            Outcome::Failed(error) => write!(f, ": failed ({error})"),
            Outcome::Indeterminate(error) => write!(f, ": indeterminate ({error})"),
        }
    }
}

/// Everything a run recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub records: Vec<Record>,
    /// When (after which the process was dead) and which node was killed with SIGKILL.
    pub crashes: Vec<(Tick, String)>,
    /// Per key, the siblings of the read after the faults healed, from every replica.
    pub final_reads: BTreeMap<String, Vec<String>>,
}

/// Collects a [`History`] from concurrent clients.
#[derive(Debug, Default)]
pub struct Recorder {
    clock: AtomicU64,
    history: Mutex<History>,
}

impl Recorder {
    /// A recorder with an empty history.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// The next logical tick: call it when invoking an operation and again when it completes.
    pub fn tick(&self) -> Tick {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Adds a completed operation.
    pub fn record(&self, record: Record) {
        self.lock().records.push(record);
    }

    /// Marks that `node` was killed with SIGKILL; call it once the process is dead.
    pub fn crashed(&self, node: &str) {
        let tick = self.tick();
        self.lock().crashes.push((tick, node.to_string()));
    }

    /// Records the final read of `key`.
    pub fn final_read(&self, key: &str, siblings: Vec<String>) {
        self.lock().final_reads.insert(key.to_string(), siblings);
    }

    /// A copy of the history so far.
    pub fn history(&self) -> History {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Which read returned a sibling set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAt {
    /// A read during the run: its client and invocation tick.
    During { client: usize, invoked: Tick },
    /// The final read of the key.
    Final,
}

impl fmt::Display for ReadAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadAt::During { client, invoked } => write!(f, "the read by c{client} at t{invoked}"),
            ReadAt::Final => write!(f, "the final read"),
        }
    }
}

/// Something the store did that it must not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two writes share an id: the history cannot be checked (a workload bug).
    DuplicateId { id: String },
    /// A read returned a value no put ever wrote.
    UnknownValue {
        key: String,
        value: String,
        at: ReadAt,
    },
    /// A read returned a value that was written to another key.
    WrongKey {
        key: String,
        value: String,
        written_to: String,
        at: ReadAt,
    },
    /// A read returned `older` beside `newer`, although `older` is an ancestor of `newer`;
    /// `chain` holds the writes from `newer` down to `older`, each of which had read the next.
    SupersededSibling {
        key: String,
        older: String,
        newer: String,
        at: ReadAt,
        chain: Vec<Record>,
    },
    /// An acknowledged put that must survive is neither in the final read nor superseded by
    /// anything that may be in effect. `readers` are the writes that had read it, none of which
    /// may be in effect.
    LostWrite {
        write: Record,
        readers: Vec<Record>,
        final_siblings: Vec<String>,
    },
    /// A value in the final read is an ancestor of `by`, an acknowledged write that must
    /// survive: a superseded (for example deleted) value came back.
    Resurrected {
        key: String,
        value: String,
        by: Record,
    },
    /// A key that was written has no final read, so nothing about it can be checked.
    NoFinalRead { key: String },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::DuplicateId { id } => {
                write!(f, "two writes share the id {id}: the history is ambiguous")
            }
            Violation::UnknownValue { key, value, at } => {
                write!(f, "{at} of {key} returned {value}, which nobody wrote")
            }
            Violation::WrongKey {
                key,
                value,
                written_to,
                at,
            } => write!(
                f,
                "{at} of {key} returned {value}, which was written to {written_to}"
            ),
            Violation::SupersededSibling {
                key,
                older,
                newer,
                at,
                chain,
            } => {
                write!(
                    f,
                    "{at} of {key} returned {older} beside {newer}, which supersedes it:"
                )?;
                for write in chain {
                    write!(f, "\n      {write}")?;
                }
                Ok(())
            }
            Violation::LostWrite {
                write,
                readers,
                final_siblings,
            } => {
                write!(
                    f,
                    "acknowledged write lost: {write}; the final read of {} is {final_siblings:?}",
                    write.key
                )?;
                if readers.is_empty() {
                    write!(f, "; no write had read it")
                } else {
                    write!(f, "; it was read by writes none of which may be in effect:")?;
                    for reader in readers {
                        write!(f, "\n      {reader}")?;
                    }
                    Ok(())
                }
            }
            Violation::Resurrected { key, value, by } => write!(
                f,
                "superseded value came back: the final read of {key} has {value}, which this \
                 acknowledged write superseded: {by}"
            ),
            Violation::NoFinalRead { key } => {
                write!(f, "{key} was written but has no final read")
            }
        }
    }
}

/// What the history held, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Operations by kind (`put_blind`, `put_context`, `delete`, `get`) and outcome (`ok`,
    /// `failed`, `indeterminate`).
    pub operations: BTreeMap<(&'static str, &'static str), usize>,
    /// Acknowledged puts checked for loss (those that must survive).
    pub puts_checked: usize,
    /// Acknowledged `dw = 0` writes exempt from the checks by later crashes (of W nodes), and how many of
    /// those puts are neither present nor superseded (lost, legitimately).
    pub exempt_by_crash: usize,
    pub exempt_puts_missing: usize,
    /// Puts that failed or timed out, and how many of them took effect after all (present in a
    /// final read or superseded by something that may be in effect).
    pub unacknowledged_puts: usize,
    pub unacknowledged_puts_in_effect: usize,
    /// Siblings in the final reads, over every key, and the most any read returned.
    pub final_siblings: usize,
    pub siblings_max: usize,
    pub crashes: usize,
}

/// The checker's verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub stats: Stats,
}

impl Report {
    /// Whether the history passed every check.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = &self.stats;
        write!(f, "operations:")?;
        for ((kind, outcome), count) in &stats.operations {
            write!(f, " {kind}/{outcome}={count}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "acknowledged puts checked: {}; dw=0 writes exempt by a crash: {} ({} of those puts \
             missing); unacknowledged puts: {} ({} in effect); final siblings: {}; most siblings \
             in one read: {}; crashes: {}",
            stats.puts_checked,
            stats.exempt_by_crash,
            stats.exempt_puts_missing,
            stats.unacknowledged_puts,
            stats.unacknowledged_puts_in_effect,
            stats.final_siblings,
            stats.siblings_max,
            stats.crashes
        )?;
        if self.violations.is_empty() {
            return writeln!(f, "no violations");
        }
        writeln!(f, "{} violations:", self.violations.len())?;
        for violation in &self.violations {
            writeln!(f, "  - {violation}")?;
        }
        Ok(())
    }
}

/// Runs every check over `history`.
pub fn check(history: &History) -> Report {
    let graph = Graph::new(history);
    let mut report = Report {
        violations: graph.duplicates.clone(),
        stats: Stats {
            crashes: history.crashes.len(),
            ..Stats::default()
        },
    };
    count_operations(history, &mut report.stats);
    check_reads(history, &graph, &mut report);
    check_durability(history, &graph, &mut report);
    report
}

/// Writes by id and the supersession edges between them.
struct Graph<'a> {
    writes: BTreeMap<&'a str, &'a Record>,
    /// Write id → the writes that read it.
    readers: BTreeMap<&'a str, Vec<&'a Record>>,
    duplicates: Vec<Violation>,
}

impl<'a> Graph<'a> {
    fn new(history: &'a History) -> Graph<'a> {
        let mut writes = BTreeMap::new();
        let mut readers: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for record in &history.records {
            let Some(id) = record.op.write_id() else {
                continue;
            };
            if writes.insert(id, record).is_some() {
                duplicates.push(Violation::DuplicateId { id: id.to_string() });
            }
            for value in record.op.read() {
                readers.entry(value.as_str()).or_default().push(record);
            }
        }
        Graph {
            writes,
            readers,
            duplicates,
        }
    }

    /// The values `id`'s writer had read.
    fn read_by(&self, id: &str) -> &'a [String] {
        self.writes.get(id).map_or(&[], |record| record.op.read())
    }

    /// The writes from `newer` down to its ancestor `older` (both included), each of which had
    /// read the next; `None` if `older` is not an ancestor of `newer`.
    fn chain(&self, newer: &str, older: &str) -> Option<Vec<Record>> {
        let mut parent: BTreeMap<&'a str, &'a str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::new();
        let start = self.writes.get_key_value(newer)?.0;
        queue.push_back(*start);
        while let Some(id) = queue.pop_front() {
            for next in self.read_by(id) {
                let next = next.as_str();
                if next == *start || parent.contains_key(next) {
                    continue;
                }
                parent.insert(next, id);
                if next == older {
                    let mut path = vec![next];
                    while let Some(up) = parent.get(path[path.len() - 1]) {
                        path.push(up);
                    }
                    path.reverse();
                    return Some(
                        path.iter()
                            .filter_map(|id| self.writes.get(id).map(|r| (*r).clone()))
                            .collect(),
                    );
                }
                queue.push_back(next);
            }
        }
        None
    }

    /// Every strict ancestor of any of `starts`.
    fn ancestors<'s>(&self, starts: impl IntoIterator<Item = &'s str>) -> BTreeSet<&'a str>
    where
        'a: 's,
    {
        let mut seen: BTreeSet<&'a str> = BTreeSet::new();
        let mut stack: Vec<&'a str> = Vec::new();
        for start in starts {
            for value in self.read_by(start) {
                stack.push(value);
            }
        }
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(self.read_by(id).iter().map(String::as_str));
            }
        }
        seen
    }
}

fn count_operations(history: &History, stats: &mut Stats) {
    for record in &history.records {
        let kind = match record.op {
            Op::PutBlind { .. } => "put_blind",
            Op::PutWithContext { .. } => "put_context",
            Op::Delete { .. } => "delete",
            Op::Get { .. } => "get",
        };
        let outcome = match record.outcome {
            Outcome::Ok => "ok",
            Outcome::Failed(_) => "failed",
            Outcome::Indeterminate(_) => "indeterminate",
        };
        *stats.operations.entry((kind, outcome)).or_default() += 1;
    }
}

/// Checks 1 and 2 on every sibling set a read returned.
fn check_reads(history: &History, graph: &Graph<'_>, report: &mut Report) {
    let during = history
        .records
        .iter()
        .filter_map(|record| match &record.op {
            Op::Get { siblings, .. } if record.outcome.is_ok() => Some((
                record.key.as_str(),
                siblings,
                ReadAt::During {
                    client: record.client,
                    invoked: record.invoked,
                },
            )),
            _ => None,
        });
    let finals = history
        .final_reads
        .iter()
        .map(|(key, siblings)| (key.as_str(), siblings, ReadAt::Final));
    for (key, siblings, at) in during.chain(finals) {
        report.stats.siblings_max = report.stats.siblings_max.max(siblings.len());
        for value in siblings {
            match graph.writes.get(value.as_str()) {
                Some(write) if !write.op.is_put() => {
                    report.violations.push(Violation::UnknownValue {
                        key: key.to_string(),
                        value: value.clone(),
                        at: at.clone(),
                    })
                }
                Some(write) if write.key != key => report.violations.push(Violation::WrongKey {
                    key: key.to_string(),
                    value: value.clone(),
                    written_to: write.key.clone(),
                    at: at.clone(),
                }),
                Some(_) => {}
                None => report.violations.push(Violation::UnknownValue {
                    key: key.to_string(),
                    value: value.clone(),
                    at: at.clone(),
                }),
            }
        }
        let ancestors = graph.ancestors(siblings.iter().map(String::as_str));
        for older in siblings
            .iter()
            .filter(|value| ancestors.contains(value.as_str()))
        {
            for newer in siblings.iter().filter(|newer| *newer != older) {
                if let Some(chain) = graph.chain(newer, older) {
                    report.violations.push(Violation::SupersededSibling {
                        key: key.to_string(),
                        older: older.clone(),
                        newer: newer.clone(),
                        at: at.clone(),
                        chain,
                    });
                }
            }
        }
    }
}

/// Checks 3 and 4 against the final reads.
fn check_durability(history: &History, graph: &Graph<'_>, report: &mut Report) {
    let present = |record: &Record| {
        history
            .final_reads
            .get(&record.key)
            .is_some_and(|siblings| {
                siblings
                    .iter()
                    .any(|v| Some(v.as_str()) == record.op.write_id())
            })
    };
    // Writes that may be in effect: every delete, every put in a final read, and (below) their
    // ancestors. A put is accounted for when it is present or an ancestor of one of them.
    let anchors = graph
        .writes
        .iter()
        .filter(|(_, record)| !record.op.is_put() || present(record))
        .map(|(id, _)| *id);
    let superseded = graph.ancestors(anchors);
    let accounted_for = |record: &Record| {
        present(record)
            || record
                .op
                .write_id()
                .is_some_and(|id| superseded.contains(id))
    };
    let must_survive = |record: &Record| {
        let Some((w, dw)) = record.op.quorum() else {
            return false;
        };
        let crashed_since: BTreeSet<&str> = history
            .crashes
            .iter()
            .filter(|(tick, _)| *tick > record.invoked)
            .map(|(_, node)| node.as_str())
            .collect();
        record.outcome.is_ok() && (dw >= 1 || crashed_since.len() < usize::from(w))
    };

    let mut written_keys = BTreeSet::new();
    for record in graph.writes.values() {
        written_keys.insert(record.key.as_str());
        let exempt = record.outcome.is_ok() && !must_survive(record);
        if exempt {
            report.stats.exempt_by_crash += 1;
        }
        if !record.op.is_put() {
            continue;
        }
        if !record.outcome.is_ok() {
            report.stats.unacknowledged_puts += 1;
            if accounted_for(record) {
                report.stats.unacknowledged_puts_in_effect += 1;
            }
        } else if exempt {
            if !accounted_for(record) {
                report.stats.exempt_puts_missing += 1;
            }
        } else if history.final_reads.contains_key(&record.key) {
            report.stats.puts_checked += 1;
            if !accounted_for(record) {
                let id = record.op.write_id().unwrap_or_default();
                report.violations.push(Violation::LostWrite {
                    write: (*record).clone(),
                    readers: graph
                        .readers
                        .get(id)
                        .map(|readers| readers.iter().map(|r| (*r).clone()).collect())
                        .unwrap_or_default(),
                    final_siblings: history.final_reads[&record.key].clone(),
                });
            }
        }
    }
    for key in written_keys {
        if !history.final_reads.contains_key(key) {
            report.violations.push(Violation::NoFinalRead {
                key: key.to_string(),
            });
        }
    }

    for (key, siblings) in &history.final_reads {
        report.stats.final_siblings += siblings.len();
        let durable: Vec<&Record> = graph
            .writes
            .values()
            .filter(|record| record.key == *key && must_survive(record) && !present(record))
            .copied()
            .collect();
        let covered = graph.ancestors(durable.iter().filter_map(|r| r.op.write_id()));
        for value in siblings.iter().filter(|v| covered.contains(v.as_str())) {
            let by = durable
                .iter()
                .find(|record| {
                    record
                        .op
                        .write_id()
                        .is_some_and(|id| graph.ancestors([id]).contains(value.as_str()))
                })
                .map(|record| (*record).clone());
            if let Some(by) = by {
                report.violations.push(Violation::Resurrected {
                    key: key.clone(),
                    value: value.clone(),
                    by,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds histories by hand: one tick per operation, in the order written.
    #[derive(Default)]
    struct Script {
        history: History,
        tick: Tick,
    }

    impl Script {
        fn push(&mut self, client: usize, key: &str, op: Op, outcome: Outcome) -> &mut Script {
            self.history.records.push(Record {
                client,
                key: key.to_string(),
                op,
                outcome,
                invoked: self.tick,
                completed: self.tick + 1,
            });
            self.tick += 2;
            self
        }

        fn put(&mut self, key: &str, value: &str, dw: u8) -> &mut Script {
            self.push(0, key, blind(value, dw), Outcome::Ok)
        }

        fn put_after(&mut self, key: &str, value: &str, read: &[&str], dw: u8) -> &mut Script {
            self.push(0, key, with_context(value, read, dw), Outcome::Ok)
        }

        fn delete(&mut self, key: &str, id: &str, read: &[&str], outcome: Outcome) -> &mut Script {
            let op = Op::Delete {
                id: id.to_string(),
                read: strings(read),
                w: 2,
                dw: 1,
            };
            self.push(0, key, op, outcome)
        }

        fn get(&mut self, key: &str, siblings: &[&str]) -> &mut Script {
            let op = Op::Get {
                r: 1,
                siblings: strings(siblings),
            };
            self.push(1, key, op, Outcome::Ok)
        }

        fn crash(&mut self, node: &str) -> &mut Script {
            self.history.crashes.push((self.tick, node.into()));
            self.tick += 1;
            self
        }

        fn finally(&mut self, key: &str, siblings: &[&str]) -> &mut Script {
            self.history
                .final_reads
                .insert(key.to_string(), strings(siblings));
            self
        }

        fn check(&self) -> Report {
            check(&self.history)
        }
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    fn blind(value: &str, dw: u8) -> Op {
        Op::PutBlind {
            value: value.into(),
            w: 2,
            dw,
        }
    }

    fn with_context(value: &str, read: &[&str], dw: u8) -> Op {
        Op::PutWithContext {
            value: value.into(),
            read: strings(read),
            w: 2,
            dw,
        }
    }

    fn failed() -> Outcome {
        Outcome::Failed("quorum not reached".into())
    }

    fn timed_out() -> Outcome {
        Outcome::Indeterminate("timeout".into())
    }

    fn only(report: &Report) -> &Violation {
        assert_eq!(report.violations.len(), 1, "{report}");
        &report.violations[0]
    }

    #[test]
    fn a_correct_history_with_siblings_overwrites_and_deletes_passes() {
        let report = Script::default()
            .put("k", "a", 1)
            .put("k", "b", 0)
            .get("k", &["a", "b"])
            .put_after("k", "c", &["a", "b"], 1)
            .put("k", "d", 1)
            .get("k", &["c", "d"])
            .delete("k", "del-1", &["c", "d"], Outcome::Ok)
            .put("k", "e", 1)
            .put("j", "x", 1)
            .finally("k", &["e"])
            .finally("j", &["x"])
            .check();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.stats.puts_checked, 6, "{report}");
        assert_eq!(report.stats.siblings_max, 2, "{report}");
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let report = Script::default()
            .put("k", "a", 1)
            .put("k", "b", 1)
            .finally("k", &["a"])
            .check();
        match only(&report) {
            Violation::LostWrite { write, .. } => assert_eq!(write.op.write_id(), Some("b")),
            other => panic!("expected a lost write, got {other}"),
        }
    }

    #[test]
    fn a_write_superseded_by_a_present_write_is_not_lost_even_through_a_chain() {
        let report = Script::default()
            .put("k", "a", 1)
            .put_after("k", "b", &["a"], 1)
            // c failed, but it was applied: d read it.
            .push(0, "k", with_context("c", &["b"], 1), failed())
            .put_after("k", "d", &["c"], 1)
            .finally("k", &["d"])
            .check();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.stats.unacknowledged_puts_in_effect, 1, "{report}");
    }

    #[test]
    fn a_superseding_write_that_vanished_explains_nothing() {
        // b read a, but b is neither present nor superseded: it never took effect (or was lost
        // too), so a's absence is a loss.
        let report = Script::default()
            .put("k", "a", 1)
            .push(0, "k", with_context("b", &["a"], 1), timed_out())
            .finally("k", &[])
            .check();
        match only(&report) {
            Violation::LostWrite { write, readers, .. } => {
                assert_eq!(write.op.write_id(), Some("a"));
                assert_eq!(readers.len(), 1);
            }
            other => panic!("expected a lost write, got {other}"),
        }
    }

    #[test]
    fn any_delete_may_explain_an_absence_because_tombstones_are_invisible() {
        let report = Script::default()
            .put("k", "a", 1)
            .delete("k", "del-1", &["a"], timed_out())
            .put("k", "b", 1)
            .finally("k", &["b"])
            .check();
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn failed_and_timed_out_writes_are_counted_never_flagged() {
        let report = Script::default()
            .push(0, "k", blind("a", 1), failed())
            .push(0, "k", blind("b", 1), timed_out())
            .push(0, "k", blind("c", 1), failed())
            .finally("k", &["b"])
            .check();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.stats.unacknowledged_puts, 3);
        assert_eq!(report.stats.unacknowledged_puts_in_effect, 1);
    }

    fn put_w(value: &str, w: u8, dw: u8) -> Op {
        Op::PutBlind {
            value: value.into(),
            w,
            dw,
        }
    }

    #[test]
    fn dw0_acknowledgements_may_be_lost_only_when_w_replicas_crashed_since() {
        // a (w=2) and b (w=1), both dw=0, then one node crashes: b may be lost, but a was
        // applied on a replica that is still alive.
        let one_crash = Script::default()
            .push(0, "k", put_w("a", 2, 0), Outcome::Ok)
            .push(0, "k", put_w("b", 1, 0), Outcome::Ok)
            .crash("n2")
            .finally("k", &[])
            .check();
        match only(&one_crash) {
            Violation::LostWrite { write, .. } => assert_eq!(write.op.write_id(), Some("a")),
            other => panic!("expected a lost write, got {other}"),
        }
        assert_eq!(one_crash.stats.exempt_by_crash, 1, "{one_crash}");
        assert_eq!(one_crash.stats.exempt_puts_missing, 1, "{one_crash}");

        // Two distinct nodes crashed since: a (w=2) may be lost too. The same node twice
        // counts once.
        let two_nodes = Script::default()
            .push(0, "k", put_w("a", 2, 0), Outcome::Ok)
            .crash("n2")
            .crash("n3")
            .finally("k", &[])
            .check();
        assert!(two_nodes.is_ok(), "{two_nodes}");
        let same_node_twice = Script::default()
            .push(0, "k", put_w("a", 2, 0), Outcome::Ok)
            .crash("n2")
            .crash("n2")
            .finally("k", &[])
            .check();
        assert!(
            matches!(only(&same_node_twice), Violation::LostWrite { .. }),
            "{same_node_twice}"
        );
    }

    #[test]
    fn dw0_acknowledgements_after_the_last_crash_or_without_one_must_survive() {
        let after = Script::default()
            .crash("n2")
            .push(0, "k", put_w("a", 1, 0), Outcome::Ok)
            .finally("k", &[])
            .check();
        assert!(
            matches!(only(&after), Violation::LostWrite { .. }),
            "{after}"
        );

        let without_crash = Script::default()
            .push(0, "k", put_w("a", 1, 0), Outcome::Ok)
            .finally("k", &[])
            .check();
        assert!(
            matches!(only(&without_crash), Violation::LostWrite { .. }),
            "{without_crash}"
        );
    }

    #[test]
    fn dw1_acknowledgements_survive_any_crash() {
        let durable = Script::default()
            .push(0, "k", put_w("a", 1, 1), Outcome::Ok)
            .crash("n1")
            .crash("n2")
            .crash("n3")
            .finally("k", &[])
            .check();
        assert!(
            matches!(only(&durable), Violation::LostWrite { .. }),
            "{durable}"
        );
    }

    #[test]
    fn a_value_nobody_wrote_is_caught_during_the_run_and_at_the_end() {
        let report = Script::default()
            .put("k", "a", 1)
            .get("k", &["a", "ghost"])
            .finally("k", &["a", "phantom"])
            .check();
        assert_eq!(report.violations.len(), 2, "{report}");
        assert!(report
            .violations
            .iter()
            .all(|v| matches!(v, Violation::UnknownValue { .. })));
        assert!(report.to_string().contains("ghost") && report.to_string().contains("phantom"));
    }

    #[test]
    fn a_delete_id_returned_as_a_value_is_unknown() {
        let report = Script::default()
            .put("k", "a", 1)
            .delete("k", "del-1", &[], Outcome::Ok)
            .get("k", &["a", "del-1"])
            .finally("k", &["a"])
            .check();
        assert!(
            matches!(only(&report), Violation::UnknownValue { .. }),
            "{report}"
        );
    }

    #[test]
    fn a_value_under_another_key_is_caught() {
        let report = Script::default()
            .put("k", "a", 1)
            .put("j", "b", 1)
            .get("k", &["a", "b"])
            .finally("k", &["a"])
            .finally("j", &["b"])
            .check();
        match only(&report) {
            Violation::WrongKey {
                key, written_to, ..
            } => assert_eq!((key.as_str(), written_to.as_str()), ("k", "j")),
            other => panic!("expected a value under the wrong key, got {other}"),
        }
    }

    #[test]
    fn a_superseded_sibling_is_caught_directly_and_transitively_whatever_the_outcomes() {
        let direct = Script::default()
            .put("k", "a", 1)
            .put_after("k", "b", &["a"], 1)
            .get("k", &["a", "b"])
            .finally("k", &["b"])
            .check();
        match only(&direct) {
            Violation::SupersededSibling {
                older,
                newer,
                chain,
                ..
            } => {
                assert_eq!((older.as_str(), newer.as_str()), ("a", "b"));
                let ids: Vec<_> = chain.iter().filter_map(|r| r.op.write_id()).collect();
                assert_eq!(ids, ["b", "a"]);
            }
            other => panic!("expected a superseded sibling, got {other}"),
        }

        // Neither b nor c was acknowledged; returning c shows it was applied, and wherever it
        // is, a is gone.
        let transitive = Script::default()
            .put("k", "a", 1)
            .push(0, "k", with_context("b", &["a"], 1), failed())
            .push(0, "k", with_context("c", &["b"], 1), timed_out())
            .finally("k", &["c", "a"])
            .check();
        assert!(
            transitive.violations.iter().any(|v| matches!(
                v,
                Violation::SupersededSibling { older, newer, at: ReadAt::Final, .. }
                    if older == "a" && newer == "c"
            )),
            "{transitive}"
        );
    }

    #[test]
    fn a_deleted_value_that_comes_back_is_caught() {
        let report = Script::default()
            .put("k", "a", 1)
            .get("k", &["a"])
            .delete("k", "del-1", &["a"], Outcome::Ok)
            .finally("k", &["a"])
            .check();
        match only(&report) {
            Violation::Resurrected { value, by, .. } => {
                assert_eq!(value, "a");
                assert_eq!(by.op.write_id(), Some("del-1"));
            }
            other => panic!("expected a resurrected value, got {other}"),
        }
    }

    #[test]
    fn a_value_superseded_through_a_chain_of_acknowledged_writes_stays_gone() {
        let report = Script::default()
            .put("k", "a", 1)
            .put_after("k", "b", &["a"], 1)
            .delete("k", "del-1", &["b"], Outcome::Ok)
            .finally("k", &["a"])
            .check();
        assert!(
            matches!(only(&report), Violation::Resurrected { value, .. } if value == "a"),
            "{report}"
        );
    }

    #[test]
    fn a_value_may_come_back_when_its_delete_failed_or_was_lost_in_a_crash() {
        let failed_delete = Script::default()
            .put("k", "a", 1)
            .delete("k", "del-1", &["a"], failed())
            .finally("k", &["a"])
            .check();
        assert!(failed_delete.is_ok(), "{failed_delete}");

        let lost_delete = Script::default()
            .put("k", "a", 1)
            .push(
                0,
                "k",
                Op::Delete {
                    id: "del-1".into(),
                    read: strings(&["a"]),
                    w: 1,
                    dw: 0,
                },
                Outcome::Ok,
            )
            .crash("n1")
            .finally("k", &["a"])
            .check();
        assert!(lost_delete.is_ok(), "{lost_delete}");
    }

    #[test]
    fn a_written_key_without_a_final_read_is_flagged() {
        let report = Script::default().put("k", "a", 1).check();
        assert!(
            matches!(only(&report), Violation::NoFinalRead { .. }),
            "{report}"
        );
    }

    #[test]
    fn duplicate_write_ids_are_flagged() {
        let report = Script::default()
            .put("k", "a", 1)
            .put("k", "a", 1)
            .finally("k", &["a"])
            .check();
        assert!(
            matches!(only(&report), Violation::DuplicateId { .. }),
            "{report}"
        );
    }

    #[test]
    fn the_recorder_orders_ticks_and_crashes() {
        let recorder = Recorder::new();
        let invoked = recorder.tick();
        recorder.record(Record {
            client: 0,
            key: "k".into(),
            op: put_w("a", 1, 0),
            outcome: Outcome::Ok,
            invoked,
            completed: recorder.tick(),
        });
        recorder.crashed("n1");
        recorder.final_read("k", vec![]);
        let history = recorder.history();
        assert_eq!(history.crashes, vec![(2, "n1".to_string())]);
        // The w=1, dw=0 write was invoked before the crash: exempt, not lost.
        assert!(check(&history).is_ok());
    }
}
