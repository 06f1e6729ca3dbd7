//! The cluster workload: concurrent clients over a five-node, N = 3 cluster under seeded faults,
//! recorded as a [`History`] and judged by [`crate::history::check`] and a convergence check.
//!
//! # One run
//!
//! 1. **Faults and traffic.** [`cluster_config`] draws partitions (full, one-way, a node
//!    isolated) and crashes inside the first [`Workload::run_ms`] of virtual time, with message
//!    loss, duplication and late delivery, and client answers lost on the way back. Meanwhile
//!    [`Workload::clients`] closed-loop clients send operations to random nodes (so requests
//!    are forwarded, and coordinators meet owners they believe down: fallbacks and hints):
//!    gets at a random R; blind puts; read-modify-write puts (a get, then a put with its
//!    context); deletes (a get, then a delete with its context); W random in 1..=N and `dw`
//!    0, 1 or up to W. Every value is globally unique (`c3-op41`), every delete named
//!    (`c3-op42-delete`). Unanswered attempts are retried at another node with the same
//!    request id.
//! 2. **Cold keys.** The faults heal; then one node is cut off from its peers, and once the
//!    others count it down, [`Workload::cold_keys`] keys it owns are written and never read
//!    before the convergence check: only hinted handoff (through a fallback or the
//!    coordinator) and anti-entropy can bring them to it.
//! 3. **Convergence.** Everything heals. Within [`convergence_bound_ms`] of virtual time,
//!    derived from the configured intervals, every replica of every range must report the same
//!    Merkle root and no node may hold a hint ([`Sim::divergence`]).
//! 4. **Final reads and the history.** Every key is read at R = N, and the history goes to
//!    [`crate::history::check`]: no acknowledged write lost (`dw = 0` writes exempt only after
//!    crashes of W distinct nodes, as [`crate::history`] explains), no value unknown or under
//!    another key, no superseded sibling, nothing deleted or superseded back.
//!
//! [`Hooks`] let a test install a network filter for the whole run and act after the heal:
//! that is how [`super::broken`] injects the broken variants each checker must catch.
//!
//! # Adjusting the cluster
//!
//! [`run`] takes the [`SimConfig`] to run with, so a test changes what it needs in
//! [`cluster_config`]'s answer first: `config.core` for the nodes (for example no room for
//! hints, or, once it exists, tombstone collection: the workload already deletes, and deleted
//! values coming back are what the history checker flags), `config.faults` for the schedule,
//! `config.client_retries` for the clients.

use super::{
    collection_bound_ms, convergence_bound_ms, ClientOp, Completed, FaultConfig, Filter, Sim,
    SimConfig, NO_ANSWER,
};
use crate::history::{self, History, Op, Outcome, Record, Report, Violation};
use quorumkv_client::protocol::Response;
use quorumkv_client::Context;
use quorumkv_node::core::CoreConfig;
use quorumkv_ring::NodeId;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The shape of the traffic.
#[derive(Clone, Debug)]
pub struct Workload {
    pub clients: usize,
    /// Keys the clients share: few, so that writes collide and siblings form.
    pub keys: usize,
    /// Clients start operations until this virtual time; faults fall inside it.
    pub run_ms: u64,
    /// Keys written while one node is isolated, right before the final heal.
    pub cold_keys: usize,
    /// Record every client attempt ([`Run::trace`]), for replaying a seed.
    pub trace: bool,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            clients: 8,
            keys: 10,
            run_ms: 10_000,
            cold_keys: 4,
            trace: false,
        }
    }
}

/// A five-node cluster, N = 3, short timeouts and intervals (virtual time is cheap, events are
/// not), and faults within the workload's first `run_ms`.
pub fn cluster_config(workload: &Workload) -> SimConfig {
    let mut core = CoreConfig {
        request_timeout_ms: 800,
        ping_interval_ms: 200,
        peer_down_after_ms: 800,
        ..CoreConfig::default()
    };
    core.anti_entropy.interval_ms = 250;
    core.anti_entropy.exchange_timeout_ms = 1_000;
    // Off here: its production periods (minutes) dwarf a simulated run. A test that turns it
    // on gives it periods in the simulation's scale (see `tests/tests/sim.rs`).
    core.tombstones.enabled = false;
    SimConfig {
        nodes: 5,
        n: 3,
        ranges: 16,
        delay_ms: (1, 15),
        loss: 0.02,
        duplicate: 0.02,
        late: 0.02,
        late_delay_ms: 1_000,
        flush_delay_ms: 5,
        reply_loss: 0.02,
        client_retries: 2,
        // The client crate's bound on an attempt: the request's timeout plus a margin.
        client_attempt_timeout_ms: Some(core.request_timeout_ms + 200),
        faults: FaultConfig {
            window_ms: (100, workload.run_ms.max(200)),
            network_faults: 10,
            crashes: 5,
            hold_ms: (200, 1_500),
        },
        core,
    }
}

/// Ways for a test to break the run on purpose (see [`super::broken`]).
#[derive(Default)]
pub struct Hooks {
    /// A filter every peer message passes, from the start.
    pub filter: Option<Filter>,
    /// Runs once everything healed, before convergence is awaited; gets the history so far.
    #[allow(clippy::type_complexity)]
    pub after_heal: Option<Box<dyn FnOnce(&mut Sim, &History)>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("filter", &self.filter.is_some())
            .field("after_heal", &self.after_heal.is_some())
            .finish()
    }
}

/// Everything one run produced.
#[derive(Debug)]
pub struct Run {
    pub seed: u64,
    pub history: History,
    pub report: Report,
    /// How long the cluster took to converge after the heal, or why it had not at the bound.
    pub convergence: Result<u64, Vec<String>>,
    pub bound_ms: u64,
    pub timeline: Vec<String>,
    /// Operations still unanswered when the workload's time was up (a liveness bug).
    pub unanswered: usize,
    /// Keys whose final read failed.
    pub final_read_failures: Vec<String>,
    /// What the run exercised, so tests can tell it was not vacuous.
    pub exercised: Exercised,
    /// With tombstone collection on: how long after convergence the last deleted key was
    /// collected on every node, or how many deleted keys were still stored at the bound.
    pub collection: Option<Result<u64, usize>>,
    pub collection_bound_ms: u64,
    /// Deleted keys removed by tombstone collection while the faults lasted, and in all.
    pub collected_during_faults: u64,
    pub collected: u64,
    /// Writes (values and delete names) that took more than one attempt.
    pub retried_writes: BTreeSet<String>,
    /// Every client attempt and its answer, if [`Workload::trace`] asked for them.
    pub trace: Vec<String>,
}

/// Counts of what a run exercised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exercised {
    /// Writes acknowledged with help from a fallback (sloppy quorum, hinted handoff).
    pub hinted_writes: usize,
    /// Operations that took more than one attempt (retries with the same request id).
    pub retried: usize,
    /// Crashes during the run.
    pub crashes: usize,
}

impl Run {
    /// Whether every check passed and the run did something worth checking; otherwise what
    /// failed, with the timeline and the checker's report.
    pub fn verdict(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Err(reasons) = &self.convergence {
            problems.push(format!(
                "replicas did not converge within {} ms of the heal: {}",
                self.bound_ms,
                reasons.join("; ")
            ));
        }
        if let Some(Err(left)) = self.collection {
            problems.push(format!(
                "{left} deleted keys were still stored {} ms after convergence (the collection \
                 bound)",
                self.collection_bound_ms
            ));
        }
        if self.unanswered > 0 {
            problems.push(format!(
                "{} operations were never answered",
                self.unanswered
            ));
        }
        if !self.final_read_failures.is_empty() {
            problems.push(format!(
                "final reads failed: {}",
                self.final_read_failures.join("; ")
            ));
        }
        if !self.report.is_ok() {
            problems.push("the history checker found violations".to_string());
        }
        if self.report.stats.puts_checked == 0 {
            problems.push("no acknowledged put was checked: the workload did nothing".into());
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{}\nfault timeline:\n  {}\nchecker: {}",
            problems.join("\n"),
            self.timeline.join("\n  "),
            self.report
        ))
    }

    /// Whether every failure of this run is the known late-retry bug (see
    /// `a_late_retry_of_a_superseded_write_does_not_bring_it_back` in `tests/tests/sim.rs`): the
    /// run converged, and every violation is a superseded or resurrected value whose write was
    /// retried. A soak uses it to tell that bug from new ones.
    pub fn only_known_bug(&self) -> bool {
        self.convergence.is_ok()
            && !matches!(self.collection, Some(Err(_)))
            && self.unanswered == 0
            && self.final_read_failures.is_empty()
            && !self.report.is_ok()
            && self.report.violations.iter().all(|v| match v {
                Violation::SupersededSibling { older, .. } => self.retried_writes.contains(older),
                Violation::Resurrected { value, .. } => self.retried_writes.contains(value),
                _ => false,
            })
    }

    /// The history, one operation a line, and the final reads: for a replayed seed.
    pub fn describe_history(&self) -> String {
        let mut text = String::new();
        for record in &self.history.records {
            text.push_str(&format!("{record}\n"));
        }
        text.push_str(&format!(
            "crashes: {:?}\nfinal reads: {:?}\n",
            self.history.crashes, self.history.final_reads
        ));
        text
    }
}

/// What a client does next once its current operation completes.
#[derive(Clone, Debug)]
enum Then {
    Nothing,
    /// Write the key with the context the get returns.
    Put,
    Delete,
}

/// A client's operation in flight, with what its record needs beyond the operation.
#[derive(Clone, Debug)]
struct InFlight {
    then: Then,
    /// For a write with a context: the siblings of the read whose context it carries.
    read: Vec<String>,
    /// For a delete: its unique name.
    delete_id: Option<String>,
}

/// Records completed operations in the checker's format.
#[derive(Debug, Default)]
struct Recorder {
    records: Vec<Record>,
    /// Attempts each record took, in the same order.
    attempts: Vec<u32>,
    in_flight: BTreeMap<usize, InFlight>,
}

impl Recorder {
    fn record(&mut self, done: &Completed) -> InFlight {
        let meta = self.in_flight.remove(&done.client).unwrap_or(InFlight {
            then: Then::Nothing,
            read: Vec::new(),
            delete_id: None,
        });
        let outcome = outcome(&done.response);
        let op = match &done.op {
            ClientOp::Get { r, .. } => Op::Get {
                r: *r,
                siblings: match &done.response {
                    Response::Got { siblings, .. } => values(siblings),
                    _ => Vec::new(),
                },
            },
            ClientOp::Put {
                value,
                context: None,
                w,
                dw,
                ..
            } => Op::PutBlind {
                value: value.clone(),
                w: *w,
                dw: *dw,
            },
            ClientOp::Put { value, w, dw, .. } => Op::PutWithContext {
                value: value.clone(),
                read: meta.read.clone(),
                w: *w,
                dw: *dw,
            },
            ClientOp::Delete { w, dw, .. } => Op::Delete {
                id: meta.delete_id.clone().unwrap_or_default(),
                read: meta.read.clone(),
                w: *w,
                dw: *dw,
            },
        };
        self.attempts.push(done.attempts);
        self.records.push(Record {
            client: done.client,
            key: done.op.key().to_string(),
            op,
            outcome,
            invoked: done.invoked_tick,
            completed: done.completed_tick,
        });
        meta
    }
}

fn values(siblings: &[quorumkv_client::protocol::SiblingValue]) -> Vec<String> {
    siblings
        .iter()
        .map(|s| String::from_utf8_lossy(&s.value).into_owned())
        .collect()
}

fn outcome(response: &Response) -> Outcome {
    match response {
        Response::Written { .. } | Response::Got { .. } => Outcome::Ok,
        Response::Error(e) if e.message == NO_ANSWER => Outcome::Indeterminate(e.message.clone()),
        Response::Error(e) => Outcome::Failed(format!("{:?}: {}", e.kind, e.message)),
        other => Outcome::Failed(format!("unexpected answer {other:?}")),
    }
}

fn write_quorum(rng: &mut ChaCha8Rng, n: u8) -> (u8, u8) {
    let w = rng.random_range(1..=n);
    let dw = match rng.random_range(0..4) {
        0 => 0,
        1 | 2 => 1,
        _ => rng.random_range(1..=w),
    };
    (w, dw)
}

/// Runs one seed of the workload with `hooks`; see the module docs for the phases.
pub fn run(seed: u64, workload: &Workload, config: SimConfig, hooks: Hooks) -> Run {
    let mut sim = Sim::new(seed, config);
    if workload.trace {
        sim.set_trace();
    }
    if let Some(filter) = hooks.filter {
        sim.set_filter(filter);
    }
    let n = sim.config().n;
    let nodes = sim.node_ids();
    let keys: Vec<String> = (0..workload.keys).map(|k| format!("k{k}")).collect();
    let mut recorder = Recorder::default();
    let mut issued = vec![0u64; workload.clients];
    let run_ms = workload.run_ms;
    let request_timeout_ms = sim.config().core.request_timeout_ms;
    // Every operation is answered by its deadline, retries included: a generous end.
    let give_up_ms = run_ms + 20 * request_timeout_ms;
    sim.run_clients(workload.clients, give_up_ms, |rng, client, done| {
        let then = match done {
            Some(done) => {
                let meta = recorder.record(done);
                if done.at_ms >= run_ms {
                    return None;
                }
                match (&meta.then, &done.response) {
                    (Then::Put | Then::Delete, Response::Got { siblings, context }) => {
                        Some((meta.then.clone(), values(siblings), context.clone()))
                    }
                    _ => None,
                }
            }
            None => None,
        };
        issued[client] += 1;
        let id = format!("c{client}-op{}", issued[client]);
        let node = nodes[rng.random_range(0..nodes.len())].clone();
        let think_ms = rng.random_range(0..20);
        let (op, meta) = match then {
            Some((then, read, context)) => {
                let key = match &done {
                    Some(done) => done.op.key().to_string(),
                    None => unreachable!("a follow-up has a completed read"),
                };
                next_write(rng, n, key, id, then, read, context)
            }
            None => next_op(rng, n, &keys, id),
        };
        recorder.in_flight.insert(client, meta);
        Some((node, op, think_ms))
    });
    let mut unanswered = sim.pending_operations();

    // Cold keys: the faults heal, one node is cut off, and keys it owns are written.
    let collected_during_faults = sim.tombstones_collected();
    sim.heal_all();
    let core = sim.config().core.clone();
    let (_, delay_max) = sim.config().delay_ms;
    let settle_ms = core.ping_interval_ms + core.peer_down_after_ms + 2 * delay_max;
    sim.run_until(sim.now_ms() + settle_ms);
    let cold = nodes[sim.rng().random_range(0..nodes.len())].clone();
    sim.isolate(&cold);
    sim.run_until(sim.now_ms() + settle_ms);
    let cold_keys: Vec<String> = (0..)
        .map(|i| format!("cold-{i}"))
        .filter(|key| sim.owners(key).contains(&cold))
        .take(workload.cold_keys)
        .collect();
    let others: Vec<NodeId> = nodes.iter().filter(|n| **n != cold).cloned().collect();
    let base = workload.clients;
    sim.run_clients(
        cold_keys.len(),
        sim.now_ms() + give_up_ms,
        |rng, client, done| {
            if let Some(done) = done {
                recorder.record(done);
                // The cold writes run as clients `0..`; number them after the workload's clients.
                if let Some(record) = recorder.records.last_mut() {
                    record.client += base;
                }
                return None;
            }
            let key = cold_keys[client].clone();
            let op = ClientOp::Put {
                value: format!("{key}-c{}-v", base + client),
                key,
                context: None,
                w: 2,
                dw: 1,
            };
            recorder.in_flight.insert(
                client,
                InFlight {
                    then: Then::Nothing,
                    read: Vec::new(),
                    delete_id: None,
                },
            );
            Some((others[rng.random_range(0..others.len())].clone(), op, 0))
        },
    );
    unanswered += sim.pending_operations();

    sim.heal_all();
    let recorded_attempts = recorder.attempts;
    let mut history = History {
        records: recorder.records,
        crashes: sim
            .crashes()
            .iter()
            .map(|(tick, node)| (*tick, node.to_string()))
            .collect(),
        final_reads: BTreeMap::new(),
    };
    if let Some(after_heal) = hooks.after_heal {
        after_heal(&mut sim, &history);
    }
    let all_keys: Vec<String> = keys.iter().chain(&cold_keys).cloned().collect();
    let bound_ms = convergence_bound_ms(sim.config(), all_keys.len());
    let mut convergence = sim.run_until_converged(bound_ms);
    // With tombstone collection on, every deleted key must then be collected everywhere, and
    // the replicas converge again, before the final reads look for deleted values come back.
    let collection = if sim.config().core.tombstones.enabled && convergence.is_ok() {
        let collected = sim.run_until_collected(collection_bound_ms(sim.config()));
        if let Err(reasons) = sim.run_until_converged(bound_ms) {
            convergence = Err(reasons);
        }
        Some(collected)
    } else {
        None
    };

    // Final reads of every key from all its replicas.
    let mut final_reads: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut final_read_failures = Vec::new();
    sim.run_clients(
        all_keys.len(),
        sim.now_ms() + give_up_ms,
        |rng, client, done| {
            if let Some(done) = done {
                match &done.response {
                    Response::Got { siblings, .. } => {
                        final_reads.insert(done.op.key().to_string(), values(siblings));
                    }
                    other => final_read_failures.push(format!("{}: {other:?}", done.op.key())),
                }
                return None;
            }
            let op = ClientOp::Get {
                key: all_keys[client].clone(),
                r: n,
            };
            Some((nodes[rng.random_range(0..nodes.len())].clone(), op, 0))
        },
    );
    history.final_reads = final_reads;
    let report = history::check(&history);
    let exercised = Exercised {
        hinted_writes: sim
            .history()
            .iter()
            .filter(|c| matches!(c.response, Response::Written { hinted, .. } if hinted > 0))
            .count(),
        retried: sim.history().iter().filter(|c| c.attempts > 1).count(),
        crashes: sim.crashes().len(),
    };
    let retried_writes = history
        .records
        .iter()
        .zip(recorded_attempts)
        .filter(|(_, attempts)| *attempts > 1)
        .filter_map(|(record, _)| record.op.write_id().map(str::to_string))
        .collect();
    Run {
        seed,
        history,
        report,
        convergence,
        bound_ms,
        timeline: sim.timeline().to_vec(),
        unanswered,
        final_read_failures,
        exercised,
        collection,
        collection_bound_ms: collection_bound_ms(sim.config()),
        collected_during_faults,
        collected: sim.tombstones_collected(),
        retried_writes,
        trace: sim.trace().to_vec(),
    }
}

/// A new operation: a get, a blind put, or the get that starts a read-modify-write or delete.
fn next_op(rng: &mut ChaCha8Rng, n: u8, keys: &[String], id: String) -> (ClientOp, InFlight) {
    let key = keys[rng.random_range(0..keys.len())].clone();
    let then = match rng.random_range(0..100) {
        0..25 => Then::Nothing,
        25..45 => {
            let (w, dw) = write_quorum(rng, n);
            let op = ClientOp::Put {
                key,
                value: id,
                context: None,
                w,
                dw,
            };
            return (
                op,
                InFlight {
                    then: Then::Nothing,
                    read: Vec::new(),
                    delete_id: None,
                },
            );
        }
        45..85 => Then::Put,
        _ => Then::Delete,
    };
    let op = ClientOp::Get {
        key,
        r: rng.random_range(1..=n),
    };
    (
        op,
        InFlight {
            then,
            read: Vec::new(),
            delete_id: None,
        },
    )
}

/// The write of a read-modify-write or delete, with the context its get returned.
fn next_write(
    rng: &mut ChaCha8Rng,
    n: u8,
    key: String,
    id: String,
    then: Then,
    read: Vec<String>,
    context: Context,
) -> (ClientOp, InFlight) {
    let (w, dw) = write_quorum(rng, n);
    match then {
        Then::Delete => (
            ClientOp::Delete {
                key,
                context: Some(context),
                w,
                dw,
            },
            InFlight {
                then: Then::Nothing,
                read,
                delete_id: Some(format!("{id}-delete")),
            },
        ),
        _ => (
            ClientOp::Put {
                key,
                value: id,
                context: Some(context),
                w,
                dw,
            },
            InFlight {
                then: Then::Nothing,
                read,
                delete_id: None,
            },
        ),
    }
}

/// The command that replays `seed` alone, for failure messages.
pub fn replay_command(seed: u64) -> String {
    format!(
        "QUORUMKV_SIM_SEED={seed} cargo test -p quorumkv-tests --test sim --profile test -- \
         replay_one_seed --exact --nocapture"
    )
}
