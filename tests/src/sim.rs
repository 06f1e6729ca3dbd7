//! A deterministic simulation of a QuorumKV cluster in one process: the proof that the
//! replication protocol keeps its promises under faults.
//!
//! Every node is a real [`NodeCore`] over a real [`MemoryStorage`]: the same coordinator,
//! replica, hinted-handoff, read-repair and anti-entropy code as production, nothing mocked.
//! Only the world around the cores is simulated: a virtual clock, a network, flushes that take
//! time, crashes, and clients. All randomness comes from one seeded [`ChaCha8Rng`] and every
//! collection that affects a decision is ordered, so a seed replays the same history exactly; a
//! failing run prints its seed and the command that replays it ([`workload`]).
//!
//! # The event queue
//!
//! The simulator is an event queue ordered by (virtual time, sequence number). Handling an
//! event feeds one input to one core and turns its outputs into future events:
//!
//! * `Output::Send` passes the [network filter](Sim::set_filter) (none unless a test installs
//!   one), then the network: a directed link that is cut loses it silently (like a dropped
//!   datagram); a send to a crashed node comes back to the sender as `Input::SendFailed`, like a
//!   refused QUIC connection; otherwise it is delivered after a random delay
//!   ([`SimConfig::delay_ms`]), or lost ([`SimConfig::loss`]), sometimes held back much longer
//!   ([`SimConfig::late`]: reordering and stale messages), sometimes delivered twice
//!   ([`SimConfig::duplicate`]).
//! * `Output::Flush` becomes a flush that completes after `flush_delay_ms`; a crash before then
//!   loses every unflushed write ([`MemoryStorage::crash`]).
//! * `Output::Reply` completes a client attempt. An attempt that ends `Unavailable` or
//!   `Overloaded`, or whose answer is lost ([`SimConfig::reply_loss`]: the connection broke,
//!   the write may have been applied), does not come within the client's own bound
//!   ([`SimConfig::client_attempt_timeout_ms`]), or whose node crashed, is retried at another node with
//!   the *same request id*, up to [`SimConfig::client_retries`] times, as the client crate
//!   does; then the operation completes with the last answer.
//! * After every input the core's next deadline is scheduled as a tick.
//!
//! # Faults
//!
//! [`FaultConfig`] asks for a number of network faults and crashes inside a time window; they
//! are drawn from the seed when the simulation is built: full partitions (two groups that
//! cannot hear each other), one-way partitions (a node stops hearing some others, which still
//! hear it), isolated nodes, each held for a random time and then healed; and crashes, each
//! followed by a restart on what the storage kept (a new incarnation, as after `kill -9`).
//! Directed link cuts compose (a link is cut while any fault cuts it). Tests can also cut and
//! heal links, crash and restart nodes, and inject messages themselves. [`Sim::heal_all`] ends
//! the fault phase: links heal, crashed nodes restart, and loss, duplication, late delivery and
//! lost answers stop, so liveness (convergence) can be checked in a healthy cluster.
//!
//! # What is checked, and where
//!
//! This module only runs the world. [`workload`] runs concurrent clients over a five-node
//! cluster, records the history in the format of [`crate::history`] (the checker shared with
//! the network-fault suite), checks convergence after the heal ([`Sim::divergence`],
//! [`convergence_bound_ms`]) and then the history. [`broken`] holds deliberately broken
//! variants, injected from the network side so production code has no test switches, that
//! each checker must catch.

pub mod broken;
pub mod workload;

use quorumkv_client::protocol::{
    ErrorKind, ErrorReply, ReadOptions, Request, RequestId, Response, WriteOptions,
};
use quorumkv_client::Context;
use quorumkv_node::core::anti_entropy::geometry_for;
use quorumkv_node::core::detector::Liveness;
use quorumkv_node::core::{ClientHandle, ClusterMap, CoreConfig, Input, NodeCore, Now, Output};
use quorumkv_node::peer::PeerMessage;
use quorumkv_node::storage::memory::MemoryStorage;
use quorumkv_node::storage::Storage;
use quorumkv_node::version_vector::on_start;
use quorumkv_ring::{Node, NodeId, RangeId, Ring, RingConfig, Token, Zone};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// The wall clock the simulation pretends to start at (ms since the epoch).
const WALL_EPOCH_MS: u64 = 1_800_000_000_000;

/// The keyspace of every simulated cluster.
pub const KEYSPACE: &str = "default";

/// How often, at most, the core builds Merkle trees while some are missing (one step per
/// tick; `anti_entropy::BUILD_STEP_MS` in the node).
const TREE_BUILD_STEP_MS: u64 = 10;

/// Knobs of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub n: u8,
    pub ranges: u32,
    /// Message delay, uniformly drawn from this range (ms).
    pub delay_ms: (u64, u64),
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice (each copy with its own delay).
    pub duplicate: f64,
    /// Probability that a message is held back up to `late_delay_ms` more: it overtakes
    /// nothing, everything else overtakes it.
    pub late: f64,
    pub late_delay_ms: u64,
    pub flush_delay_ms: u64,
    /// Probability that a client loses an answer on its way back (the connection broke): the
    /// operation may have been applied, and the client retries it elsewhere.
    pub reply_loss: f64,
    /// Attempts a client makes after the first, each at another node, with the same request id.
    pub client_retries: u32,
    /// How long a client waits for an attempt's answer before it gives up on it and retries
    /// (as the client crate does: the request's timeout plus a margin); `None` waits for the
    /// node, which always answers by its own deadline.
    pub client_attempt_timeout_ms: Option<u64>,
    /// Partitions and crashes, drawn from the seed.
    pub faults: FaultConfig,
    /// The cores' configuration; tests adjust it (for example to turn on tombstone collection).
    pub core: CoreConfig,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            nodes: 3,
            n: 3,
            ranges: 64,
            delay_ms: (1, 20),
            loss: 0.01,
            duplicate: 0.0,
            late: 0.0,
            late_delay_ms: 0,
            flush_delay_ms: 5,
            reply_loss: 0.0,
            client_retries: 0,
            client_attempt_timeout_ms: None,
            faults: FaultConfig::default(),
            core: CoreConfig::default(),
        }
    }
}

/// Faults drawn from the seed when the simulation is built.
#[derive(Clone, Debug, Default)]
pub struct FaultConfig {
    /// Faults start within `window_ms.0..window_ms.1` of virtual time.
    pub window_ms: (u64, u64),
    /// Partitions: full, one-way or one node isolated, in equal parts.
    pub network_faults: usize,
    /// Crashes, each followed by a restart.
    pub crashes: usize,
    /// How long each fault lasts, uniformly drawn from this range (ms).
    pub hold_ms: (u64, u64),
}

/// One client operation, as the workload asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOp {
    Get {
        key: String,
        r: u8,
    },
    Put {
        key: String,
        value: String,
        context: Option<Context>,
        w: u8,
        dw: u8,
    },
    Delete {
        key: String,
        context: Option<Context>,
        w: u8,
        dw: u8,
    },
}

impl ClientOp {
    /// The key the operation is about.
    pub fn key(&self) -> &str {
        match self {
            ClientOp::Get { key, .. }
            | ClientOp::Put { key, .. }
            | ClientOp::Delete { key, .. } => key,
        }
    }
}

/// A completed operation, for history checks.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    pub at_ms: u64,
    pub client: usize,
    /// The node of the last attempt.
    pub node: NodeId,
    pub op: ClientOp,
    /// The last attempt's answer; an attempt whose answer never came (lost, or the node
    /// crashed) ends `Unavailable` with a message saying so.
    pub response: Response,
    /// Attempts made, retries included.
    pub attempts: u32,
    /// Logical ticks (shared with [`Sim::crashes`]) of the first attempt and of the completion.
    pub invoked_tick: u64,
    pub completed_tick: u64,
}

/// The message of a client attempt whose answer never came.
pub const NO_ANSWER: &str = "no answer: the connection broke";

/// A directed link: messages from the first node to the second.
pub type Link = (NodeId, NodeId);

/// What the network filter sees besides the message.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    pub now_ms: u64,
    pub from: &'a NodeId,
    pub to: &'a NodeId,
    /// Whether [`Sim::heal_all`] has ended the fault phase.
    pub healed: bool,
}

/// A function every peer message passes before the network: it returns the messages to send
/// instead (none to drop it, a changed one to corrupt it, more to add some).
pub type FilterFn = dyn FnMut(&Envelope<'_>, PeerMessage) -> Vec<PeerMessage>;

/// A boxed [`FilterFn`], printable.
pub struct Filter(pub Box<FilterFn>);

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Filter(..)")
    }
}

#[derive(Debug)]
enum Fault {
    Cut { links: Vec<Link>, label: String },
    Uncut { links: Vec<Link>, label: String },
    Crash { node: NodeId, down_ms: u64 },
    Restart { node: NodeId },
}

#[derive(Debug)]
enum Event {
    Deliver {
        to: NodeId,
        input: Input,
    },
    Tick {
        node: NodeId,
    },
    FlushDone {
        node: NodeId,
        incarnation: u64,
    },
    Attempt {
        op: u64,
        node: NodeId,
    },
    /// The client stops waiting for attempt number `attempt` of `op`.
    AttemptTimeout {
        op: u64,
        attempt: u32,
    },
    Fault(Fault),
}

#[derive(Debug)]
struct SimNode {
    core: Option<NodeCore>,
    storage: Arc<MemoryStorage>,
    /// Bumped on every restart so that flushes scheduled before a crash are ignored.
    incarnation: u64,
    next_tick_ms: Option<u64>,
}

/// A client operation not yet completed.
#[derive(Debug)]
struct Pending {
    client: usize,
    op: ClientOp,
    request_id: RequestId,
    attempts: u32,
    node: NodeId,
    invoked_tick: Option<u64>,
}

/// The simulated cluster.
#[derive(Debug)]
pub struct Sim {
    pub seed: u64,
    config: SimConfig,
    rng: ChaCha8Rng,
    now_ms: u64,
    seq: u64,
    /// Logical time of invocations, completions and crashes, for the history checker.
    tick: u64,
    map: Arc<ClusterMap>,
    nodes: BTreeMap<NodeId, SimNode>,
    queue: BTreeMap<(u64, u64), Event>,
    pending: BTreeMap<u64, Pending>,
    next_pending: u64,
    in_flight: BTreeMap<(NodeId, ClientHandle), u64>,
    next_handle: u64,
    history: Vec<Completed>,
    flushes: u64,
    /// Directed links cut, with how many faults cut each.
    cuts: BTreeMap<Link, u32>,
    crashes: Vec<(u64, NodeId)>,
    healed: bool,
    filter: Option<Filter>,
    timeline: Vec<String>,
    /// Every client attempt and its answer, when asked for ([`Sim::set_trace`]).
    trace: Option<Vec<String>>,
    /// Deleted keys collected by node processes that have crashed since.
    collected_by_crashed: u64,
}

impl Sim {
    /// A cluster of `config.nodes` nodes named `n1`, `n2`, … in one zone, with the faults of
    /// `config.faults` drawn from `seed` and scheduled.
    pub fn new(seed: u64, config: SimConfig) -> Sim {
        let ids: Vec<NodeId> = (1..=config.nodes)
            .map(|i| NodeId::new(format!("n{i}")).expect("valid node id"))
            .collect();
        let members = ids.iter().map(|id| {
            Node::new(id.clone(), Zone::new("z1").expect("valid zone"), 1).expect("valid node")
        });
        let ring_config = RingConfig::new(config.ranges, u32::from(config.n)).expect("ring config");
        let ring = Ring::build(ring_config, members).expect("ring");
        let map = Arc::new(ClusterMap {
            ring,
            keyspaces: [(KEYSPACE.to_string(), config.n)].into_iter().collect(),
            addresses: ids
                .iter()
                .map(|id| (id.clone(), format!("{id}.sim:7401")))
                .collect(),
        });
        let mut sim = Sim {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            config,
            now_ms: 0,
            seq: 0,
            tick: 0,
            map,
            nodes: BTreeMap::new(),
            queue: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_pending: 1,
            in_flight: BTreeMap::new(),
            next_handle: 1,
            history: Vec::new(),
            flushes: 0,
            cuts: BTreeMap::new(),
            crashes: Vec::new(),
            healed: false,
            filter: None,
            timeline: Vec::new(),
            trace: None,
            collected_by_crashed: 0,
        };
        for id in ids {
            let storage = Arc::new(MemoryStorage::new());
            sim.nodes.insert(
                id.clone(),
                SimNode {
                    core: None,
                    storage,
                    incarnation: 0,
                    next_tick_ms: None,
                },
            );
            sim.start_node(&id);
        }
        sim.plan_faults();
        sim
    }

    /// The node ids, in order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().cloned().collect()
    }

    /// The configuration the simulation runs with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The cluster map every core runs with.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The core of `node`, if it is running.
    pub fn core(&self, node: &NodeId) -> Option<&NodeCore> {
        self.nodes[node].core.as_ref()
    }

    /// The virtual time now.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Every completed operation so far.
    pub fn history(&self) -> &[Completed] {
        &self.history
    }

    /// Every crash so far: the logical tick after which the node was down, and the node.
    pub fn crashes(&self) -> &[(u64, NodeId)] {
        &self.crashes
    }

    /// What happened to the network and the nodes, one line per fault, for failure reports.
    pub fn timeline(&self) -> &[String] {
        &self.timeline
    }

    /// Starts recording every client attempt and its answer (for replaying a failed seed).
    pub fn set_trace(&mut self) {
        self.trace.get_or_insert_with(Vec::new);
    }

    /// The attempts recorded since [`Sim::set_trace`].
    pub fn trace(&self) -> &[String] {
        self.trace.as_deref().unwrap_or_default()
    }

    /// Storage flushes performed so far, over all nodes.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// The storage of `node`, to inspect what it holds.
    pub fn storage(&self, node: &NodeId) -> Arc<MemoryStorage> {
        self.nodes[node].storage.clone()
    }

    /// A random draw from the simulation's RNG (for workloads that must replay too).
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// The owners of `key` (its preference list), in order.
    pub fn owners(&self, key: &str) -> Vec<NodeId> {
        self.map
            .ring
            .preference_list_for(KEYSPACE, key.as_bytes(), usize::from(self.config.n))
            .expect("the simulated keyspace places")
            .ids()
            .cloned()
            .collect()
    }

    /// Installs a filter every peer message passes from now on (see [`FilterFn`]).
    pub fn set_filter(&mut self, filter: Filter) {
        self.filter = Some(filter);
    }

    /// Delivers `message` from `from` to `to` after `after_ms`, bypassing filter and faults
    /// (a message that was in the network all along).
    pub fn inject(&mut self, from: &NodeId, to: &NodeId, message: PeerMessage, after_ms: u64) {
        let input = Input::Peer {
            from: from.clone(),
            message,
        };
        let at = self.now_ms + after_ms;
        self.schedule(
            at,
            Event::Deliver {
                to: to.clone(),
                input,
            },
        );
    }

    /// Schedules `op` from `client` at `node`, `after_ms` from now. A fresh request id is drawn
    /// for it and kept by its retries.
    pub fn submit(&mut self, client: usize, node: NodeId, op: ClientOp, after_ms: u64) {
        let mut request_id = [0u8; 16];
        self.rng.fill(&mut request_id);
        let id = self.next_pending;
        self.next_pending += 1;
        self.pending.insert(
            id,
            Pending {
                client,
                op,
                request_id: RequestId(request_id),
                attempts: 0,
                node: node.clone(),
                invoked_tick: None,
            },
        );
        let at = self.now_ms + after_ms;
        self.schedule(at, Event::Attempt { op: id, node });
    }

    /// Cuts the directed link `from` → `to` (once more, if it is cut already).
    pub fn cut(&mut self, from: &NodeId, to: &NodeId) {
        *self.cuts.entry((from.clone(), to.clone())).or_default() += 1;
    }

    /// Undoes one [`Sim::cut`] of `from` → `to`.
    pub fn uncut(&mut self, from: &NodeId, to: &NodeId) {
        let link = (from.clone(), to.clone());
        if let Some(count) = self.cuts.get_mut(&link) {
            *count -= 1;
            if *count == 0 {
                self.cuts.remove(&link);
            }
        }
    }

    /// Cuts `node` off from every other node, both ways (clients still reach it).
    pub fn isolate(&mut self, node: &NodeId) {
        let label = format!("{node} isolated (by the test)");
        let links = self.isolation_links(node);
        self.apply_fault(Fault::Cut { links, label });
    }

    /// Whether the directed link `from` → `to` is cut.
    pub fn is_cut(&self, from: &NodeId, to: &NodeId) -> bool {
        self.cuts.contains_key(&(from.clone(), to.clone()))
    }

    /// Crashes `node`: its core is gone and everything it had not flushed is lost. Client
    /// attempts at it lose their answer (and are retried elsewhere, if allowed).
    pub fn crash(&mut self, node: &NodeId) {
        let sim_node = self.nodes.get_mut(node).expect("known node");
        if sim_node.core.is_none() {
            return;
        }
        if let Some(core) = sim_node.core.take() {
            self.collected_by_crashed += core.tombstones_collected();
        }
        sim_node.storage.crash();
        sim_node.next_tick_ms = None;
        self.tick += 1;
        self.crashes.push((self.tick, node.clone()));
        self.log(format!("{node} crashed"));
        let lost: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|((n, _), _)| n == node)
            .map(|(_, op)| *op)
            .collect();
        self.in_flight.retain(|(n, _), _| n != node);
        for op in lost {
            self.attempt_failed(op, no_answer());
        }
    }

    /// Restarts a crashed `node` on what its storage kept.
    pub fn restart(&mut self, node: &NodeId) {
        if self.is_up(node) {
            return;
        }
        self.log(format!("{node} restarted"));
        self.start_node(node);
    }

    /// Whether `node` is running.
    pub fn is_up(&self, node: &NodeId) -> bool {
        self.nodes[node].core.is_some()
    }

    /// Whether [`Sim::heal_all`] ended the fault phase.
    pub fn is_healed(&self) -> bool {
        self.healed
    }

    /// Ends the fault phase: every link heals, crashed nodes restart, faults not yet begun are
    /// cancelled, and messages are no longer lost, duplicated or held back, nor client answers
    /// lost. Messages already in the network still arrive.
    pub fn heal_all(&mut self) {
        let faults: Vec<(u64, u64)> = self
            .queue
            .iter()
            .filter(|(_, event)| matches!(event, Event::Fault(_)))
            .map(|(key, _)| *key)
            .collect();
        for key in faults {
            self.queue.remove(&key);
        }
        self.cuts.clear();
        self.healed = true;
        self.log("healed: every link, every node, no more loss".to_string());
        for node in self.node_ids() {
            self.restart(&node);
        }
    }

    /// Runs events until virtual time `until_ms` (or until nothing is left to do).
    pub fn run_until(&mut self, until_ms: u64) {
        while let Some((&(at, seq), _)) = self.queue.iter().next() {
            if at > until_ms {
                break;
            }
            let event = self.queue.remove(&(at, seq)).expect("event just seen");
            self.now_ms = at;
            self.step(event);
        }
        self.now_ms = self.now_ms.max(until_ms);
    }

    /// Runs a closed-loop workload: every client has one operation outstanding at a time.
    /// `next_op` is asked for each client's first operation (with `None`) and again after each
    /// completion (with it); it returns the node to send to, the operation and a think time in
    /// ms, or `None` when that client is done. Runs until every client is done or `until_ms`.
    pub fn run_clients<F>(&mut self, clients: usize, until_ms: u64, mut next_op: F)
    where
        F: FnMut(&mut ChaCha8Rng, usize, Option<&Completed>) -> Option<(NodeId, ClientOp, u64)>,
    {
        for client in 0..clients {
            if let Some((node, op, think_ms)) = next_op(&mut self.rng, client, None) {
                self.submit(client, node, op, think_ms);
            }
        }
        let mut seen = self.history.len();
        while let Some((&(at, seq), _)) = self.queue.iter().next() {
            if at > until_ms {
                break;
            }
            let event = self.queue.remove(&(at, seq)).expect("event just seen");
            self.now_ms = at;
            self.step(event);
            while seen < self.history.len() {
                let done = self.history[seen].clone();
                seen += 1;
                if let Some((node, op, think_ms)) = next_op(&mut self.rng, done.client, Some(&done))
                {
                    self.submit(done.client, node, op, think_ms);
                }
            }
            if self.pending_operations() == 0 {
                break;
            }
        }
    }

    /// Operations submitted and not yet completed.
    pub fn pending_operations(&self) -> usize {
        self.pending.len()
    }

    /// Why the cluster has not converged, one line per reason; empty when it has: every node is
    /// up and believes every peer up, with every Merkle tree built, every replica of every range (the range's preference
    /// list) reports the same root, and no node holds a hint.
    pub fn divergence(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        for (id, node) in &self.nodes {
            match &node.core {
                None => reasons.push(format!("{id} is down")),
                Some(core) => {
                    for (peer, liveness) in core.peer_liveness() {
                        if liveness != Liveness::Up {
                            reasons.push(format!("{id} believes {peer} down"));
                        }
                    }
                    for (owner, totals) in core.hints_pending() {
                        reasons.push(format!("{id} holds {} hints for {owner}", totals.count));
                    }
                }
            }
        }
        let n = usize::from(self.config.n);
        for keyspace in self.map.keyspaces.keys() {
            for range in 0..self.map.ring.range_count() {
                let Ok(replicas) = self.map.ring.preference_list(RangeId(range), n) else {
                    reasons.push(format!("range {range} has no preference list"));
                    continue;
                };
                let roots: BTreeSet<Option<String>> = replicas
                    .ids()
                    .map(|id| {
                        self.core(id)
                            .and_then(|core| core.merkle_root(keyspace, range))
                            .map(|root| root.iter().map(|b| format!("{b:02x}")).collect())
                    })
                    .collect();
                if roots.len() != 1 || roots.contains(&None) {
                    let names: Vec<String> = replicas.ids().map(|id| id.to_string()).collect();
                    reasons.push(format!(
                        "{keyspace} range {range}: replicas {} report roots {:?}",
                        names.join(","),
                        roots
                            .iter()
                            .map(|r| r.as_deref().map_or("unbuilt/down", |r| &r[..8]))
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
        reasons
    }

    /// Deleted keys removed for good by tombstone collection so far, over all nodes and all
    /// their processes.
    pub fn tombstones_collected(&self) -> u64 {
        self.collected_by_crashed
            + self
                .nodes
                .values()
                .filter_map(|node| node.core.as_ref())
                .map(NodeCore::tombstones_collected)
                .sum::<u64>()
    }

    /// Deleted keys (every sibling a tombstone) stored on running nodes, over all nodes.
    pub fn stored_tombstones(&self) -> usize {
        self.nodes
            .values()
            .filter(|node| node.core.is_some())
            .map(|node| {
                node.storage
                    .scan(KEYSPACE, Token(0), Token(u64::MAX))
                    .expect("memory storage cannot fail")
                    .iter()
                    .filter(|stored| stored.state.is_deleted())
                    .count()
            })
            .sum()
    }

    /// Runs until no running node stores a deleted key, checking every `check_every_ms`, for at
    /// most `bound_ms`; returns how long it took, or how many were left at the bound.
    pub fn run_until_collected(&mut self, bound_ms: u64) -> Result<u64, usize> {
        let start = self.now_ms;
        let check_every_ms = self.config.delay_ms.1.max(1);
        loop {
            let left = self.stored_tombstones();
            if left == 0 {
                return Ok(self.now_ms - start);
            }
            if self.now_ms >= start + bound_ms {
                return Err(left);
            }
            let next = (self.now_ms + check_every_ms).min(start + bound_ms);
            self.run_until(next);
        }
    }

    /// Runs until [`Sim::divergence`] is empty, checking every `check_every_ms`, for at most
    /// `bound_ms`; returns how long it took, or the reasons it had not converged at the bound.
    pub fn run_until_converged(&mut self, bound_ms: u64) -> Result<u64, Vec<String>> {
        let start = self.now_ms;
        let check_every_ms = self.config.delay_ms.1.max(1);
        loop {
            let reasons = self.divergence();
            if reasons.is_empty() {
                return Ok(self.now_ms - start);
            }
            if self.now_ms >= start + bound_ms {
                return Err(reasons);
            }
            let next = (self.now_ms + check_every_ms).min(start + bound_ms);
            self.run_until(next);
        }
    }

    fn plan_faults(&mut self) {
        let faults = self.config.faults.clone();
        if faults.window_ms.1 <= faults.window_ms.0 {
            return;
        }
        let ids = self.node_ids();
        for _ in 0..faults.network_faults {
            let start = self
                .rng
                .random_range(faults.window_ms.0..faults.window_ms.1);
            let hold = self.rng.random_range(faults.hold_ms.0..=faults.hold_ms.1);
            let (links, label) = match self.rng.random_range(0..3) {
                0 => {
                    let mut shuffled = ids.clone();
                    for i in (1..shuffled.len()).rev() {
                        let j = self.rng.random_range(0..=i);
                        shuffled.swap(i, j);
                    }
                    let split = self.rng.random_range(1..shuffled.len().max(2));
                    let (a, b) = shuffled.split_at(split.min(shuffled.len()));
                    let mut links = Vec::new();
                    for x in a {
                        for y in b {
                            links.push((x.clone(), y.clone()));
                            links.push((y.clone(), x.clone()));
                        }
                    }
                    (links, format!("partition {} | {}", names(a), names(b)))
                }
                1 => {
                    let receiver = ids[self.rng.random_range(0..ids.len())].clone();
                    let mut senders: Vec<NodeId> = Vec::new();
                    for id in ids.iter().filter(|id| **id != receiver) {
                        if self.rng.random_bool(0.6) {
                            senders.push(id.clone());
                        }
                    }
                    if senders.is_empty() {
                        senders.push(
                            ids.iter()
                                .find(|id| **id != receiver)
                                .cloned()
                                .expect("a one-way partition needs two nodes"),
                        );
                    }
                    let label = format!("one-way: {receiver} stops hearing {}", names(&senders));
                    let links = senders.into_iter().map(|s| (s, receiver.clone())).collect();
                    (links, label)
                }
                _ => {
                    let node = ids[self.rng.random_range(0..ids.len())].clone();
                    (self.isolation_links(&node), format!("{node} isolated"))
                }
            };
            self.schedule(
                start,
                Event::Fault(Fault::Cut {
                    links: links.clone(),
                    label: label.clone(),
                }),
            );
            self.schedule(start + hold, Event::Fault(Fault::Uncut { links, label }));
        }
        for _ in 0..faults.crashes {
            let start = self
                .rng
                .random_range(faults.window_ms.0..faults.window_ms.1);
            let down_ms = self.rng.random_range(faults.hold_ms.0..=faults.hold_ms.1);
            let node = ids[self.rng.random_range(0..ids.len())].clone();
            self.schedule(start, Event::Fault(Fault::Crash { node, down_ms }));
        }
    }

    fn isolation_links(&self, node: &NodeId) -> Vec<Link> {
        self.nodes
            .keys()
            .filter(|other| *other != node)
            .flat_map(|other| [(node.clone(), other.clone()), (other.clone(), node.clone())])
            .collect()
    }

    fn apply_fault(&mut self, fault: Fault) {
        match fault {
            Fault::Cut { links, label } => {
                self.log(format!("begin {label}"));
                for (from, to) in &links {
                    self.cut(from, to);
                }
            }
            Fault::Uncut { links, label } => {
                self.log(format!("end {label}"));
                for (from, to) in &links {
                    self.uncut(from, to);
                }
            }
            Fault::Crash { node, down_ms } => {
                if self.is_up(&node) {
                    self.crash(&node);
                    let at = self.now_ms + down_ms;
                    self.schedule(at, Event::Fault(Fault::Restart { node }));
                }
            }
            Fault::Restart { node } => self.restart(&node),
        }
    }

    fn log(&mut self, line: String) {
        self.timeline.push(format!("t={}ms {line}", self.now_ms));
    }

    fn start_node(&mut self, id: &NodeId) {
        let fresh: u64 = self.rng.random();
        let now = self.now();
        let sim_node = self.nodes.get_mut(id).expect("known node");
        let previous = sim_node
            .storage
            .incarnation()
            .expect("memory storage cannot fail");
        let (clock, record) = on_start(previous, fresh);
        sim_node
            .storage
            .set_incarnation(&record)
            .expect("memory storage cannot fail");
        sim_node.incarnation += 1;
        sim_node.next_tick_ms = None;
        sim_node.core = Some(NodeCore::new(
            id.clone(),
            self.map.clone(),
            self.config.core.clone(),
            clock,
            fresh,
            now,
        ));
        self.schedule_tick(id);
    }

    fn now(&self) -> Now {
        Now {
            monotonic_ms: self.now_ms,
            wall_ms: WALL_EPOCH_MS + self.now_ms,
        }
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    fn schedule_tick(&mut self, id: &NodeId) {
        let Some(next) = self.nodes[id]
            .core
            .as_ref()
            .and_then(NodeCore::next_deadline_ms)
        else {
            return;
        };
        let next = next.max(self.now_ms);
        let sim_node = self.nodes.get_mut(id).expect("known node");
        // One pending tick per node is enough: a later tick re-reads the deadline.
        if sim_node
            .next_tick_ms
            .is_some_and(|t| t <= next && t >= self.now_ms)
        {
            return;
        }
        sim_node.next_tick_ms = Some(next);
        self.schedule(next, Event::Tick { node: id.clone() });
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Deliver { to, input } => self.feed(&to, input),
            Event::Tick { node } => {
                let due = self.nodes[&node]
                    .next_tick_ms
                    .is_some_and(|t| t <= self.now_ms);
                if due {
                    self.nodes.get_mut(&node).expect("known node").next_tick_ms = None;
                    self.feed(&node, Input::Tick);
                }
            }
            Event::FlushDone { node, incarnation } => {
                let sim_node = &self.nodes[&node];
                if sim_node.core.is_none() || sim_node.incarnation != incarnation {
                    return;
                }
                let through = sim_node
                    .storage
                    .flush()
                    .expect("memory storage cannot fail");
                self.flushes += 1;
                self.feed(&node, Input::Flushed { through });
            }
            Event::Attempt { op, node } => self.attempt(op, node),
            Event::AttemptTimeout { op, attempt } => {
                let current = self.pending.get(&op).is_some_and(|p| p.attempts == attempt);
                let waiting = self
                    .in_flight
                    .iter()
                    .find(|(_, pending)| **pending == op)
                    .map(|(key, _)| key.clone());
                if let (true, Some(key)) = (current, waiting) {
                    self.in_flight.remove(&key);
                    self.attempt_failed(op, no_answer());
                }
            }
            Event::Fault(fault) => self.apply_fault(fault),
        }
    }

    fn attempt(&mut self, op: u64, node: NodeId) {
        let tick = self.tick + 1;
        let Some(pending) = self.pending.get_mut(&op) else {
            return;
        };
        if pending.invoked_tick.is_none() {
            pending.invoked_tick = Some(tick);
            self.tick = tick;
        }
        pending.attempts += 1;
        pending.node = node.clone();
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!(
                "t={}ms c{} attempt {} of {} at {node}",
                self.now_ms,
                pending.client,
                pending.attempts,
                describe(&pending.op)
            ));
        }
        if !self.is_up(&node) {
            // The client's connection is refused.
            let refused = error(ErrorKind::Unavailable, "node down: connection refused");
            self.attempt_failed(op, refused);
            return;
        }
        let handle = ClientHandle(self.next_handle);
        self.next_handle += 1;
        let request = request(&self.pending[&op]);
        let attempt = self.pending[&op].attempts;
        self.in_flight.insert((node.clone(), handle), op);
        self.feed(&node, Input::Client { handle, request });
        if let Some(timeout) = self.config.client_attempt_timeout_ms {
            let at = self.now_ms + timeout;
            self.schedule(at, Event::AttemptTimeout { op, attempt });
        }
    }

    /// An attempt ended without a usable answer: retry at another node with the same request
    /// id, or complete with `response`.
    fn attempt_failed(&mut self, op: u64, response: Response) {
        let Some(pending) = self.pending.get(&op) else {
            return;
        };
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!(
                "t={}ms c{} attempt {} of {} at {} ended: {}",
                self.now_ms,
                pending.client,
                pending.attempts,
                describe(&pending.op),
                pending.node,
                answer(&response)
            ));
        }
        if pending.attempts > self.config.client_retries {
            self.complete(op, response);
            return;
        }
        let last = pending.node.clone();
        let others: Vec<NodeId> = self.nodes.keys().filter(|n| **n != last).cloned().collect();
        let node = if others.is_empty() {
            last
        } else {
            others[self.rng.random_range(0..others.len())].clone()
        };
        let backoff = self.rng.random_range(1..=self.config.delay_ms.1.max(1));
        let at = self.now_ms + backoff;
        self.schedule(at, Event::Attempt { op, node });
    }

    fn complete(&mut self, op: u64, response: Response) {
        let Some(pending) = self.pending.remove(&op) else {
            return;
        };
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!(
                "t={}ms c{} {} completed after {} attempts (last at {}): {}",
                self.now_ms,
                pending.client,
                describe(&pending.op),
                pending.attempts,
                pending.node,
                answer(&response)
            ));
        }
        self.tick += 1;
        self.history.push(Completed {
            at_ms: self.now_ms,
            client: pending.client,
            node: pending.node,
            op: pending.op,
            response,
            attempts: pending.attempts,
            invoked_tick: pending.invoked_tick.unwrap_or(self.tick),
            completed_tick: self.tick,
        });
    }

    fn chance(&mut self, p: f64) -> bool {
        !self.healed && p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    fn delay(&mut self) -> u64 {
        let (low, high) = self.config.delay_ms;
        let mut delay = self.rng.random_range(low..=high.max(low));
        if self.chance(self.config.late) {
            delay += self.rng.random_range(0..=self.config.late_delay_ms);
        }
        delay
    }

    fn send(&mut self, from: &NodeId, to: NodeId, message: PeerMessage) {
        let messages = match self.filter.as_mut() {
            Some(filter) => {
                let envelope = Envelope {
                    now_ms: self.now_ms,
                    from,
                    to: &to,
                    healed: self.healed,
                };
                (filter.0)(&envelope, message)
            }
            None => vec![message],
        };
        for message in messages {
            self.transmit(from, &to, message);
        }
    }

    fn transmit(&mut self, from: &NodeId, to: &NodeId, message: PeerMessage) {
        let delay = self.delay();
        if self.is_cut(from, to) {
            return;
        }
        if !self.is_up(to) {
            let Some(op) = message.request_op() else {
                return;
            };
            let input = Input::SendFailed {
                to: to.clone(),
                ops: vec![op],
            };
            self.schedule(
                self.now_ms + delay,
                Event::Deliver {
                    to: from.clone(),
                    input,
                },
            );
            return;
        }
        if self.chance(self.config.loss) {
            return;
        }
        if self.chance(self.config.duplicate) {
            let again = self.delay();
            let input = Input::Peer {
                from: from.clone(),
                message: message.clone(),
            };
            self.schedule(
                self.now_ms + again,
                Event::Deliver {
                    to: to.clone(),
                    input,
                },
            );
        }
        let input = Input::Peer {
            from: from.clone(),
            message,
        };
        self.schedule(
            self.now_ms + delay,
            Event::Deliver {
                to: to.clone(),
                input,
            },
        );
    }

    fn feed(&mut self, id: &NodeId, input: Input) {
        let now = self.now();
        let sim_node = self.nodes.get_mut(id).expect("known node");
        let Some(core) = sim_node.core.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        core.handle(now, input, sim_node.storage.as_ref(), &mut out);
        let incarnation = sim_node.incarnation;
        for output in out {
            match output {
                Output::Reply { handle, response } => {
                    let Some(op) = self.in_flight.remove(&(id.clone(), handle)) else {
                        continue;
                    };
                    let retryable = matches!(
                        &response,
                        Response::Error(ErrorReply {
                            kind: ErrorKind::Unavailable | ErrorKind::Overloaded,
                            ..
                        })
                    );
                    if self.chance(self.config.reply_loss) {
                        self.attempt_failed(op, no_answer());
                    } else if retryable {
                        self.attempt_failed(op, response);
                    } else {
                        self.complete(op, response);
                    }
                }
                Output::Send { to, message } => self.send(id, to, message),
                Output::Flush => {
                    let at = self.now_ms + self.config.flush_delay_ms;
                    self.schedule(
                        at,
                        Event::FlushDone {
                            node: id.clone(),
                            incarnation,
                        },
                    );
                }
            }
        }
        self.schedule_tick(id);
    }
}

/// The longest a healed cluster may take to converge, derived from its configuration; every
/// term is one mechanism's worst case once every link is up and every node running:
///
/// * stragglers: a hint delivery or replica write sent just before the heal waits for its
///   deadline (`request_timeout_ms`), an anti-entropy exchange for `exchange_timeout_ms`
///   (either may hold one of the few slots its mechanism has);
/// * detection: a failure detector sees a peer up again within a ping interval and a round
///   trip;
/// * tree builds: a restarted node builds one range per tree-building tick at worst;
/// * hinted handoff: each owner gets `hint_delivery_batch` hints per round (a tick, at least
///   every ping interval, and a durable round trip), for at most one hint per key;
/// * anti-entropy: a node exchanges `exchanges_max` of the ranges it replicates every
///   `interval_ms` (+25% jitter), least recently exchanged first, each exchange a root
///   comparison, a descent of `depth` levels and a push: `depth + 2` round trips. A replica
///   that missed a write learns it within one cycle of the replicas around it; three cycles
///   let the join of three replicas reach each of them whichever pairs exchange first.
pub fn convergence_bound_ms(config: &SimConfig, keys: usize) -> u64 {
    let core = &config.core;
    let ae = &core.anti_entropy;
    let round_trip = 2 * config.delay_ms.1 + config.flush_delay_ms;
    let stragglers = core.request_timeout_ms + ae.exchange_timeout_ms;
    let detection = core.ping_interval_ms + round_trip;
    let builds = u64::from(config.ranges) * TREE_BUILD_STEP_MS;
    let batch = core.hint_delivery_batch.max(1) as u64;
    let hint_rounds = (keys as u64).div_ceil(batch);
    let handoff = hint_rounds * (core.ping_interval_ms + round_trip);
    let ranges_per_node =
        (u64::from(config.ranges) * u64::from(config.n)).div_ceil(config.nodes.max(1) as u64);
    let depth = u64::from(geometry_for(config.ranges).depth());
    let exchange_ms = (depth + 2) * round_trip;
    let per_round = (ae.interval_ms + ae.interval_ms / 4).max(exchange_ms);
    let cycle = ranges_per_node.div_ceil(ae.exchanges_max.max(1) as u64) * per_round;
    stragglers + detection + builds + handoff + 3 * cycle
}

/// A client operation in a few words, for the trace.
fn describe(op: &ClientOp) -> String {
    match op {
        ClientOp::Get { key, r } => format!("get {key} r={r}"),
        ClientOp::Put {
            key,
            value,
            context,
            w,
            dw,
        } => {
            let with = if context.is_some() { " (context)" } else { "" };
            format!("put {key} = {value}{with} w={w} dw={dw}")
        }
        ClientOp::Delete { key, w, dw, .. } => format!("delete {key} w={w} dw={dw}"),
    }
}

/// An answer in a few words, for the trace.
fn answer(response: &Response) -> String {
    match response {
        Response::Got { siblings, .. } => {
            let values: Vec<String> = siblings
                .iter()
                .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                .collect();
            format!("got {values:?}")
        }
        Response::Written { hinted, .. } => format!("written (hinted {hinted})"),
        Response::Error(e) => format!("{:?}: {}", e.kind, e.message),
        other => format!("{other:?}"),
    }
}

/// The longest a healed, converged cluster may take to collect every deleted key, when
/// tombstone collection is on, derived from its configuration (`node/src/core/tombstones.rs`):
/// the grace period, the quiet period between the two checks, two collection intervals (a pass
/// may have just begun) and a request timeout for a check that was lost.
pub fn collection_bound_ms(config: &SimConfig) -> u64 {
    let core = &config.core;
    let tombstones = &core.tombstones;
    tombstones.grace_ms + tombstones.quiet_ms + 2 * tombstones.interval_ms + core.request_timeout_ms
}

fn names(ids: &[NodeId]) -> String {
    ids.iter()
        .map(NodeId::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn error(kind: ErrorKind, message: &str) -> Response {
    Response::Error(ErrorReply {
        kind,
        message: message.into(),
        quorum: None,
    })
}

fn no_answer() -> Response {
    error(ErrorKind::Unavailable, NO_ANSWER)
}

fn request(pending: &Pending) -> Request {
    match &pending.op {
        ClientOp::Get { key, r } => Request::Get {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            options: ReadOptions {
                r: Some(*r),
                timeout_ms: None,
                ..ReadOptions::default()
            },
        },
        ClientOp::Put {
            key,
            value,
            context,
            w,
            dw,
        } => Request::Put {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            context: context.clone(),
            request_id: pending.request_id,
            options: WriteOptions {
                w: Some(*w),
                dw: Some(*dw),
                timeout_ms: None,
                ..WriteOptions::default()
            },
        },
        ClientOp::Delete {
            key,
            context,
            w,
            dw,
        } => Request::Delete {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            context: context.clone(),
            request_id: pending.request_id,
            options: WriteOptions {
                w: Some(*w),
                dw: Some(*dw),
                timeout_ms: None,
                ..WriteOptions::default()
            },
        },
    }
}
