//! A deterministic simulation of a QuorumKV cluster in one process.
//!
//! Every node is a real [`NodeCore`] over a real [`MemoryStorage`]; only the world around them
//! is simulated: a virtual clock, a network that delays, loses and reorders messages, flushes
//! that take time, crashes that lose unflushed writes, and clients that issue requests. All
//! randomness comes from one seeded RNG and every collection that affects a decision is
//! ordered, so a seed replays the same history exactly; a failing run prints its seed.
//!
//! The simulator is an event queue ordered by (virtual time, sequence number). Handling an
//! event feeds one input to one core and turns its outputs into future events:
//!
//! * `Output::Send` becomes a delivery after a random delay, or nothing if the message is
//!   lost; a send to a crashed node comes back to the sender as `Input::SendFailed`, like a
//!   refused QUIC connection.
//! * `Output::Flush` becomes a flush that completes after `flush_delay_ms`.
//! * `Output::Reply` completes a client operation and lets that client issue its next one.
//! * After every input the core's next deadline is scheduled as a tick.

use quorumkv_client::protocol::{ReadOptions, Request, RequestId, Response, WriteOptions};
use quorumkv_client::Context;
use quorumkv_node::core::{ClientHandle, ClusterMap, CoreConfig, Input, NodeCore, Now, Output};
use quorumkv_node::storage::memory::MemoryStorage;
use quorumkv_node::storage::Storage;
use quorumkv_node::version_vector::on_start;
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The wall clock the simulation pretends to start at (ms since the epoch).
const WALL_EPOCH_MS: u64 = 1_800_000_000_000;

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
    pub flush_delay_ms: u64,
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
            flush_delay_ms: 5,
            core: CoreConfig::default(),
        }
    }
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

/// A completed operation, for history checks.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    pub at_ms: u64,
    pub client: usize,
    pub node: NodeId,
    pub op: ClientOp,
    pub response: Response,
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
    Client {
        client: usize,
        node: NodeId,
        op: ClientOp,
    },
}

#[derive(Debug)]
struct SimNode {
    core: Option<NodeCore>,
    storage: Arc<MemoryStorage>,
    /// Bumped on every restart so that flushes scheduled before a crash are ignored.
    incarnation: u64,
    next_tick_ms: Option<u64>,
}

/// The simulated cluster.
#[derive(Debug)]
pub struct Sim {
    pub seed: u64,
    config: SimConfig,
    rng: ChaCha8Rng,
    now_ms: u64,
    seq: u64,
    map: Arc<ClusterMap>,
    nodes: BTreeMap<NodeId, SimNode>,
    queue: BTreeMap<(u64, u64), Event>,
    in_flight: BTreeMap<(NodeId, ClientHandle), (usize, ClientOp)>,
    next_handle: u64,
    history: Vec<Completed>,
    flushes: u64,
}

impl Sim {
    /// A cluster of `config.nodes` nodes named `n1`, `n2`, … in one zone.
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
            keyspaces: [("default".to_string(), config.n)].into_iter().collect(),
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
            map,
            nodes: BTreeMap::new(),
            queue: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_handle: 1,
            history: Vec::new(),
            flushes: 0,
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
        sim
    }

    /// The node ids, in order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().cloned().collect()
    }

    /// The virtual time now.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Every completed operation so far.
    pub fn history(&self) -> &[Completed] {
        &self.history
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

    /// Schedules `op` from `client` at `node`, `after_ms` from now.
    pub fn submit(&mut self, client: usize, node: NodeId, op: ClientOp, after_ms: u64) {
        let at = self.now_ms + after_ms;
        self.schedule(at, Event::Client { client, node, op });
    }

    /// Crashes `node`: its core is gone and everything it had not flushed is lost.
    pub fn crash(&mut self, node: &NodeId) {
        let sim_node = self.nodes.get_mut(node).expect("known node");
        sim_node.core = None;
        sim_node.storage.crash();
        sim_node.next_tick_ms = None;
        self.in_flight.retain(|(n, _), _| n != node);
    }

    /// Restarts a crashed `node` on what its storage kept.
    pub fn restart(&mut self, node: &NodeId) {
        self.start_node(node);
    }

    /// Whether `node` is running.
    pub fn is_up(&self, node: &NodeId) -> bool {
        self.nodes[node].core.is_some()
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

    /// Operations submitted and not yet answered.
    pub fn pending_operations(&self) -> usize {
        self.in_flight.len()
            + self
                .queue
                .values()
                .filter(|e| matches!(e, Event::Client { .. }))
                .count()
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
            Event::Client { client, node, op } => {
                if !self.is_up(&node) {
                    // The client's connection is refused; record it like a transport error.
                    self.history.push(Completed {
                        at_ms: self.now_ms,
                        client,
                        node,
                        op,
                        response: Response::Error(quorumkv_client::protocol::ErrorReply {
                            kind: quorumkv_client::protocol::ErrorKind::Unavailable,
                            message: "node down".into(),
                            quorum: None,
                        }),
                    });
                    return;
                }
                let handle = ClientHandle(self.next_handle);
                self.next_handle += 1;
                let request = self.request(client, &op);
                self.in_flight.insert((node.clone(), handle), (client, op));
                self.feed(&node, Input::Client { handle, request });
            }
        }
    }

    fn request(&mut self, _client: usize, op: &ClientOp) -> Request {
        let mut request_id = [0u8; 16];
        self.rng.fill(&mut request_id);
        match op {
            ClientOp::Get { key, r } => Request::Get {
                keyspace: "default".into(),
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
                keyspace: "default".into(),
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                context: context.clone(),
                request_id: RequestId(request_id),
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
                keyspace: "default".into(),
                key: key.as_bytes().to_vec(),
                context: context.clone(),
                request_id: RequestId(request_id),
                options: WriteOptions {
                    w: Some(*w),
                    dw: Some(*dw),
                    timeout_ms: None,
                    ..WriteOptions::default()
                },
            },
        }
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
                    if let Some((client, op)) = self.in_flight.remove(&(id.clone(), handle)) {
                        self.history.push(Completed {
                            at_ms: self.now_ms,
                            client,
                            node: id.clone(),
                            op,
                            response,
                        });
                    }
                }
                Output::Send { to, message } => {
                    let delay = self
                        .rng
                        .random_range(self.config.delay_ms.0..=self.config.delay_ms.1);
                    if !self.is_up(&to) {
                        let Some(op) = message.request_op() else {
                            continue;
                        };
                        let input = Input::SendFailed { to, ops: vec![op] };
                        self.schedule(
                            self.now_ms + delay,
                            Event::Deliver {
                                to: id.clone(),
                                input,
                            },
                        );
                    } else if !self.rng.random_bool(self.config.loss) {
                        let input = Input::Peer {
                            from: id.clone(),
                            message,
                        };
                        self.schedule(self.now_ms + delay, Event::Deliver { to, input });
                    }
                }
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
