//! A deterministic driver for several cores, so core scenarios read as stories.
//!
//! The driver owns a few [`NodeCore`]s over in-memory storage and moves their outputs by hand:
//! messages wait in one FIFO until a test delivers them, flushes wait until a test completes
//! them (or [`Driver::settle`] does), and time moves only when a test says so. Nothing is
//! random and nothing runs in the background, so a test reads like what it checks:
//!
//! ```
//! use quorumkv_node::core::driver::Driver;
//! use quorumkv_node::core::CoreConfig;
//!
//! let mut cluster = Driver::new(3, 3, CoreConfig::default());
//! let [n1, n2, _n3] = cluster.ids();
//! cluster.cut(&n1, &n2);
//! let put = cluster.put(&n1, "k", "v", 2);
//! cluster.settle();
//! assert!(cluster.written(put));
//! assert!(cluster.values(&n2, "k").is_empty());
//! ```
//!
//! The deterministic simulation (`quorumkv-tests`) drives the same cores with seeded delays,
//! losses and crashes; this driver is for hand-written scenarios of one mechanism at a time.

use super::{ClientHandle, ClusterMap, CoreConfig, Input, NodeCore, Now, Output, SyncStatus};
use crate::peer::PeerMessage;
use crate::storage::memory::MemoryStorage;
use crate::storage::Storage;
use crate::version_vector::on_start;
use quorumkv_client::protocol::{ReadOptions, Request, RequestId, Response, WriteOptions};
use quorumkv_client::Context;
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// The keyspace every driven cluster has.
pub const KEYSPACE: &str = "default";

/// A wall clock far from zero, so timestamps look like real ones.
const WALL_EPOCH_MS: u64 = 1_800_000_000_000;

#[derive(Debug)]
struct DrivenNode {
    core: Option<NodeCore>,
    storage: Arc<MemoryStorage>,
    /// A flush the core asked for and the test has not completed yet.
    flush_pending: bool,
    /// Incarnations started so far, to draw distinct actors deterministically.
    starts: u64,
}

/// Several cores, their storage, and the messages between them; see the module docs.
#[derive(Debug)]
pub struct Driver {
    map: Arc<ClusterMap>,
    config: CoreConfig,
    now_ms: u64,
    nodes: BTreeMap<NodeId, DrivenNode>,
    /// Messages sent and not yet delivered, oldest first.
    in_flight: VecDeque<(NodeId, NodeId, PeerMessage)>,
    /// Directed links that lose everything: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    replies: BTreeMap<ClientHandle, Response>,
    next_handle: u64,
    next_request: u64,
    /// Anti-entropy messages sent so far, by kind: (messages, frame bytes).
    traffic: BTreeMap<&'static str, Traffic>,
    /// Which messages to keep back ([`Driver::hold_while`]), and those kept back.
    holding: Option<Holding>,
    held: Vec<(NodeId, NodeId, PeerMessage)>,
}

/// The predicate of [`Driver::hold_while`].
struct Holding(HoldFn);

type HoldFn = Box<dyn FnMut(&NodeId, &NodeId, &PeerMessage) -> bool>;

impl std::fmt::Debug for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Holding(..)")
    }
}

/// Write options of W = `w`, durable on one replica: what the driver's writes ask for.
fn durable_on_one(w: u8) -> WriteOptions {
    WriteOptions {
        w: Some(w),
        dw: Some(1),
        ..WriteOptions::default()
    }
}

/// Messages of one kind and their encoded size, as the QUIC transport would frame them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub messages: u64,
    pub bytes: u64,
}

impl Driver {
    /// `count` nodes `n1`, `n2`, … in one zone, keyspace [`KEYSPACE`] with replication factor
    /// `n`, a ring of 16 ranges.
    pub fn new(count: usize, n: u8, config: CoreConfig) -> Driver {
        let ids: Vec<NodeId> = (1..=count)
            .map(|i| NodeId::new(format!("n{i}")).expect("n<i> is a valid node id"))
            .collect();
        let zone = Zone::new("z1").expect("z1 is a valid zone");
        let members = ids
            .iter()
            .map(|id| Node::new(id.clone(), zone.clone(), 1).expect("valid node"));
        let ring_config = RingConfig::new(16, u32::from(n)).expect("16 ranges, n replicas");
        let ring = Ring::build(ring_config, members).expect("a ring of distinct nodes");
        let map = Arc::new(ClusterMap {
            ring,
            keyspaces: [(KEYSPACE.to_string(), n)].into_iter().collect(),
            addresses: ids
                .iter()
                .map(|id| (id.clone(), format!("{id}:1")))
                .collect(),
        });
        let mut driver = Driver {
            map,
            config,
            now_ms: 0,
            nodes: BTreeMap::new(),
            in_flight: VecDeque::new(),
            cut: BTreeSet::new(),
            replies: BTreeMap::new(),
            next_handle: 1,
            next_request: 1,
            traffic: BTreeMap::new(),
            holding: None,
            held: Vec::new(),
        };
        for id in ids {
            driver.nodes.insert(
                id.clone(),
                DrivenNode {
                    core: None,
                    storage: Arc::new(MemoryStorage::new()),
                    flush_pending: false,
                    starts: 0,
                },
            );
            driver.start(&id);
        }
        driver
    }

    /// The node ids, in order (`let [n1, n2, n3] = driver.ids();`).
    pub fn ids<const N: usize>(&self) -> [NodeId; N] {
        let ids: Vec<NodeId> = self.nodes.keys().cloned().collect();
        ids.try_into()
            .unwrap_or_else(|ids: Vec<NodeId>| panic!("the cluster has {} nodes", ids.len()))
    }

    /// The cluster map every core runs with.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The core of `node`, if it is running.
    pub fn core(&self, node: &NodeId) -> Option<&NodeCore> {
        self.nodes[node].core.as_ref()
    }

    /// The storage of `node` (kept across crashes, minus what was not flushed).
    pub fn storage(&self, node: &NodeId) -> &MemoryStorage {
        &self.nodes[node].storage
    }

    /// Sends `request` from a client to `node`; the answer is [`Driver::reply`] once it exists.
    pub fn request(&mut self, node: &NodeId, request: Request) -> ClientHandle {
        let handle = ClientHandle(self.next_handle);
        self.next_handle += 1;
        self.feed(node, Input::Client { handle, request });
        handle
    }

    /// A blind put of `value` at W = `w` (durable on one replica), sent to `node`.
    pub fn put(&mut self, node: &NodeId, key: &str, value: &str, w: u8) -> ClientHandle {
        self.put_with(node, key, value, None, w)
    }

    /// A put of `value` at W = `w` that replaces what `context` covers.
    pub fn put_with(
        &mut self,
        node: &NodeId,
        key: &str,
        value: &str,
        context: Option<Context>,
        w: u8,
    ) -> ClientHandle {
        let request = Request::Put {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            context,
            request_id: self.request_id(),
            options: durable_on_one(w),
        };
        self.request(node, request)
    }

    /// A blind put of `value` with the given options, sent to `node`.
    pub fn put_options(
        &mut self,
        node: &NodeId,
        key: &str,
        value: &str,
        options: WriteOptions,
    ) -> ClientHandle {
        let request = Request::Put {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            context: None,
            request_id: self.request_id(),
            options,
        };
        self.request(node, request)
    }

    /// A delete at W = `w` that removes what `context` covers, sent to `node`.
    pub fn delete_with(
        &mut self,
        node: &NodeId,
        key: &str,
        context: Option<Context>,
        w: u8,
    ) -> ClientHandle {
        let request = Request::Delete {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            context,
            request_id: self.request_id(),
            options: durable_on_one(w),
        };
        self.request(node, request)
    }

    /// The context a successful put or get `handle` returned.
    pub fn context(&self, handle: ClientHandle) -> Option<Context> {
        match self.reply(handle)? {
            Response::Got { context, .. } | Response::Written { context, .. } => {
                Some(context.clone())
            }
            _ => None,
        }
    }

    /// Whether `node` stores any state of `key` (a tombstone counts).
    pub fn stores(&self, node: &NodeId, key: &str) -> bool {
        self.storage(node)
            .read(KEYSPACE, key.as_bytes())
            .expect("memory storage reads")
            .is_some()
    }

    /// From now on, messages that `hold` selects are kept back when their turn comes, until
    /// [`Driver::release_held`]: a link that delays some messages indefinitely.
    pub fn hold_while(
        &mut self,
        hold: impl FnMut(&NodeId, &NodeId, &PeerMessage) -> bool + 'static,
    ) {
        self.holding = Some(Holding(Box::new(hold)));
    }

    /// Stops holding messages back and returns those held so far, oldest first.
    pub fn release_held(&mut self) -> Vec<(NodeId, NodeId, PeerMessage)> {
        self.holding = None;
        std::mem::take(&mut self.held)
    }

    /// Puts a message in flight as if `from` had sent it now (a delayed or duplicated message).
    pub fn inject(&mut self, from: &NodeId, to: &NodeId, message: PeerMessage) {
        self.in_flight
            .push_back((from.clone(), to.clone(), message));
    }

    /// The key's preference list (its owners, in order).
    pub fn owners(&self, key: &str) -> Vec<NodeId> {
        let n = self.map.keyspaces[KEYSPACE];
        self.map
            .ring
            .preference_list_for(KEYSPACE, key.as_bytes(), usize::from(n))
            .expect("the driven keyspace places")
            .ids()
            .cloned()
            .collect()
    }

    /// Hints `node` holds, per owner (count), if it is running.
    pub fn hints(&self, node: &NodeId) -> Vec<(NodeId, u64)> {
        self.core(node)
            .map(|core| {
                core.hints_pending()
                    .map(|(owner, totals)| (owner.clone(), totals.count))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A get at R = `r`, sent to `node`.
    pub fn get(&mut self, node: &NodeId, key: &str, r: u8) -> ClientHandle {
        let request = Request::Get {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            options: ReadOptions {
                r: Some(r),
                ..ReadOptions::default()
            },
        };
        self.request(node, request)
    }

    /// A get with the given options, sent to `node`.
    pub fn get_with(&mut self, node: &NodeId, key: &str, options: ReadOptions) -> ClientHandle {
        let request = Request::Get {
            keyspace: KEYSPACE.into(),
            key: key.as_bytes().to_vec(),
            options,
        };
        self.request(node, request)
    }

    /// The answer to `handle`, if it came.
    pub fn reply(&self, handle: ClientHandle) -> Option<&Response> {
        self.replies.get(&handle)
    }

    /// Whether `handle` was answered `Written`.
    pub fn written(&self, handle: ClientHandle) -> bool {
        matches!(self.reply(handle), Some(Response::Written { .. }))
    }

    /// The visible values a successful get `handle` returned, sorted.
    pub fn got(&self, handle: ClientHandle) -> Option<Vec<String>> {
        match self.reply(handle)? {
            Response::Got { siblings, .. } => {
                let mut values: Vec<String> = siblings
                    .iter()
                    .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                    .collect();
                values.sort();
                Some(values)
            }
            _ => None,
        }
    }

    /// The visible values `node` stores for `key`, sorted, read straight from its storage.
    pub fn values(&self, node: &NodeId, key: &str) -> Vec<String> {
        let state = self
            .storage(node)
            .read(KEYSPACE, key.as_bytes())
            .expect("memory storage reads");
        let mut values: Vec<String> = state
            .map(|state| {
                state
                    .values()
                    .into_iter()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        values.sort();
        values
    }

    /// Loses every message from `a` to `b` and from `b` to `a` until [`Driver::heal`].
    pub fn cut(&mut self, a: &NodeId, b: &NodeId) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Loses every message from `from` to `to` until [`Driver::heal`].
    pub fn cut_one_way(&mut self, from: &NodeId, to: &NodeId) {
        self.cut.insert((from.clone(), to.clone()));
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Messages sent and not yet delivered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Delivers the oldest message in flight (or loses it on a cut link); false if none.
    pub fn deliver_next(&mut self) -> bool {
        let Some((from, to, message)) = self.in_flight.pop_front() else {
            return false;
        };
        if self.cut.contains(&(from.clone(), to.clone())) {
            return true;
        }
        if let Some(Holding(hold)) = self.holding.as_mut() {
            if hold(&from, &to, &message) {
                self.held.push((from, to, message));
                return true;
            }
        }
        let Some(destination) = self.nodes.get(&to) else {
            // Addressed to a node outside the driven cluster (an answer to an injected
            // message): nobody receives it.
            return true;
        };
        if destination.core.is_none() {
            // The destination is down: the sender's transport cannot reach it.
            if let Some(op) = message.request_op() {
                self.feed(&from, Input::SendFailed { to, ops: vec![op] });
            }
        } else {
            self.feed(&to, Input::Peer { from, message });
        }
        true
    }

    /// Completes the flush `node` asked for, if any; false if it asked for none.
    pub fn complete_flush(&mut self, node: &NodeId) -> bool {
        let driven = self.nodes.get_mut(node).expect("known node");
        if !std::mem::take(&mut driven.flush_pending) || driven.core.is_none() {
            return false;
        }
        let through = driven.storage.flush().expect("memory storage flushes");
        self.feed(node, Input::Flushed { through });
        true
    }

    /// Delivers messages and completes flushes until nothing is left to do (time stands still).
    pub fn settle(&mut self) {
        loop {
            if self.deliver_next() {
                continue;
            }
            let flushing: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.flush_pending)
                .map(|(id, _)| id.clone())
                .collect();
            if flushing.is_empty() {
                return;
            }
            for node in flushing {
                self.complete_flush(&node);
            }
        }
    }

    /// Moves time forward by `ms` and ticks every running core, then settles.
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        let running: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.core.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for node in running {
            self.feed(&node, Input::Tick);
        }
        self.settle();
    }

    /// Anti-entropy messages sent since the last [`Driver::reset_traffic`], by kind
    /// (`ae_level`, `ae_level_reply`, `ae_push`, `ae_push_reply`).
    pub fn traffic(&self) -> &BTreeMap<&'static str, Traffic> {
        &self.traffic
    }

    /// Anti-entropy messages and bytes over all kinds.
    pub fn traffic_total(&self) -> Traffic {
        self.traffic
            .values()
            .fold(Traffic::default(), |sum, t| Traffic {
                messages: sum.messages + t.messages,
                bytes: sum.bytes + t.bytes,
            })
    }

    /// Forgets the traffic counted so far.
    pub fn reset_traffic(&mut self) {
        self.traffic.clear();
    }

    /// `node`'s digest of its Merkle roots.
    pub fn sync_status(&self, node: &NodeId) -> SyncStatus {
        self.core(node).expect("running").sync_status()
    }

    /// Starts an anti-entropy exchange of `range` from `node` with `peer` now (see
    /// [`NodeCore::start_exchange`]); false if the core would not start one.
    pub fn exchange(&mut self, node: &NodeId, range: u32, peer: &NodeId) -> bool {
        let now = self.now();
        let driven = self.nodes.get_mut(node).expect("known node");
        let Some(core) = driven.core.as_mut() else {
            return false;
        };
        let mut out = Vec::new();
        let started = core.start_exchange(now, KEYSPACE, range, peer, &mut out);
        self.dispatch(node, out);
        started
    }

    /// Stops `node` without warning: its core is gone and unflushed writes are lost.
    pub fn crash(&mut self, node: &NodeId) {
        let driven = self.nodes.get_mut(node).expect("known node");
        driven.core = None;
        driven.flush_pending = false;
        driven.storage.crash();
    }

    /// Starts a crashed `node` again on what its storage kept (a new incarnation).
    pub fn restart(&mut self, node: &NodeId) {
        assert!(self.nodes[node].core.is_none(), "{node} is running");
        self.start(node);
    }

    fn start(&mut self, node: &NodeId) {
        let now = self.now();
        let map = self.map.clone();
        let config = self.config.clone();
        let index = self.nodes.keys().position(|id| id == node).unwrap_or(0) as u64;
        let driven = self.nodes.get_mut(node).expect("known node");
        driven.starts += 1;
        let previous = driven.storage.incarnation().expect("memory storage reads");
        let fresh = (index + 1) * 1_000 + driven.starts;
        let (clock, record) = on_start(previous, fresh);
        driven
            .storage
            .set_incarnation(&record)
            .expect("memory storage writes");
        let instance = fresh;
        driven.core = Some(NodeCore::new(
            node.clone(),
            map,
            config,
            clock,
            instance,
            now,
        ));
    }

    fn now(&self) -> Now {
        Now {
            monotonic_ms: self.now_ms,
            wall_ms: WALL_EPOCH_MS + self.now_ms,
        }
    }

    fn request_id(&mut self) -> RequestId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_request.to_be_bytes());
        self.next_request += 1;
        RequestId(id)
    }

    /// Hands `node` a peer message that claims to come from `from`, which need not be a
    /// member: what a hostile or misconfigured node's connection would deliver.
    pub fn inject_peer(&mut self, node: &NodeId, from: NodeId, message: PeerMessage) {
        self.feed(node, Input::Peer { from, message });
    }

    fn feed(&mut self, node: &NodeId, input: Input) {
        let now = self.now();
        let driven = self.nodes.get_mut(node).expect("known node");
        let Some(core) = driven.core.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        core.handle(now, input, driven.storage.as_ref(), &mut out);
        self.dispatch(node, out);
    }

    fn dispatch(&mut self, node: &NodeId, out: Vec<Output>) {
        for output in out {
            match output {
                Output::Reply { handle, response } => {
                    self.replies.insert(handle, response);
                }
                Output::Send { to, message } => {
                    let kind = message.kind();
                    if kind.starts_with("ae_") {
                        let bytes = quorumkv_client::frame::encode_frame(&message, u32::MAX)
                            .map_or(0, |frame| frame.len() as u64);
                        let traffic = self.traffic.entry(kind).or_default();
                        traffic.messages += 1;
                        traffic.bytes += bytes;
                    }
                    self.in_flight.push_back((node.clone(), to, message));
                }
                Output::Flush => {
                    self.nodes.get_mut(node).expect("known node").flush_pending = true;
                }
            }
        }
    }
}
