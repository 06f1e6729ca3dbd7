//! The node core: every replication decision a node makes, with no I/O.
//!
//! A QuorumKV node is a state machine. [`NodeCore::handle`] takes one [`Input`] (a client
//! request, a peer message, a finished flush, a transport failure, or the passage of time) and
//! the current time, and appends [`Output`]s (a reply to a client, a message to a peer, a
//! request to flush storage). It never reads a clock, spawns a task, sleeps or touches a
//! socket; it reaches storage only through the narrow [`Storage`] trait, whose in-memory twin
//! makes the whole node deterministic. The async shell ([`crate::server`]) carries inputs in and
//! outputs out over QUIC and sled; the simulation (`quorumkv-tests`) carries them through a
//! seeded in-memory network and virtual clock instead, which is what lets one seed replay a
//! whole cluster's history exactly.
//!
//! # Coordinating a put (Dynamo §4.5, Riak's `put_fsm`)
//!
//! 1. Any node accepts the request. The key's preference list comes from the ring; a node that
//!    is not on it forwards the request to the first member believed up
//!    ([`PeerMessage::Forward`]), so version vectors only ever name the key's owners.
//! 2. The coordinator decodes the client's context (bound to this key; a corrupt or foreign
//!    context is an `InvalidRequest`), reads its own copy, draws a new dot from its
//!    incarnation's clock and applies the update: the new value replaces exactly the siblings
//!    the context covers. The result goes through the one write path, [`Storage::merge`].
//! 3. It sends the merged state to the other N − 1 replicas ([`PeerMessage::Replicate`]); each
//!    merges it and answers once: `Applied` at once, or, when the write needs durable answers
//!    from other replicas (`dw` > 1; the coordinator's own flush is the first), `Durable` after
//!    its flush. Replicas the failure detector believes down count as failed at once, and a
//!    request that would send to a replica whose send queue is full is refused `Overloaded`
//!    before it starts (`Input::PeerCongested`).
//! 4. A [`Tally`] counts the answers. The reply goes out as soon as W replicas applied and `dw`
//!    of them are durable. Once that has become impossible (replicas failed or are known down)
//!    the coordinator stops waiting for the dead and answers as soon as the live replicas have,
//!    so the error's `acked` counts every acknowledgement made; the deadline bounds it all. A
//!    failed write may still have been applied on some replicas, and the error says so.
//!
//! # Coordinating a get
//!
//! The coordinator reads its own copy and asks the other replicas for theirs. Each answer
//! (including "I have none") counts toward R and is joined into one state; once R answered, the
//! reply carries that state's live siblings and its context. The read then repairs the replicas
//! it found behind (`read_repair`), after the reply unless the request asks for blocking
//! repair.
//!
//! # Durability and group commit
//!
//! Durable answers wait for a flush. The core asks the shell for at most one flush at a time
//! ([`Output::Flush`]); every write that wants durability while a flush is running waits for
//! the next one, so N concurrent durable writes cost far fewer than N flushes.
//!
//! # Limits
//!
//! Key and value sizes, context size and in-flight requests are bounded by [`CoreConfig`];
//! exceeding one is an `InvalidRequest` (or `Overloaded`) naming the limit, and a metric.
//!
//! # Where each mechanism lives
//!
//! | module | what it decides |
//! | --- | --- |
//! | this file | the types ([`Input`], [`Output`], [`ClusterMap`], [`CoreConfig`]), the dispatch in [`NodeCore::handle`], the error replies |
//! | `admission` | checks and limits on every request; coordinate here or forward |
//! | `forward` | handing a request to a replica, and trying the next one |
//! | `coordinate` | puts and gets at their coordinator: fan-out, tallies, answers, deadlines |
//! | `replica` | what a node does with peer messages: merge replicas, serve reads, pongs |
//! | `durability` | flush waiters and group commit |
//! | `read_repair` | a read's reply and the repair of replicas it found behind |
//! | `hints` | sloppy quorum placement, hints kept for owners that missed writes, their delivery |
//! | `inspect` | what each replica of a key stores, asked without repairing (`admin replicas`) |
//! | `liveness` | ticks: pings, peers found down, expired requests |
//! | [`anti_entropy`] | Merkle trees kept with every write, built at start; background exchanges between replicas |
//! | [`detector`] | the failure detector itself |
//! | [`driver`] | a deterministic multi-core test driver, for scenarios that read as stories |

mod admission;
pub mod anti_entropy;
mod coordinate;
pub mod detector;
pub mod driver;
mod durability;
mod forward;
mod hints;
mod inspect;
mod liveness;
mod read_repair;
mod replica;
pub mod tombstones;

use crate::metrics;
use crate::peer::{OpId, PeerMessage};
use crate::quorum::{ReplicaProgress, Shortfall, Tally};
use crate::storage::{AuxWrite, Merged, Storage, WriteSeq};
use crate::version_vector::{ActorClock, KeyState};
use anti_entropy::AntiEntropy;
pub use anti_entropy::{AntiEntropyConfig, KeyspaceSync, SyncStatus};
use detector::{FailureDetector, Liveness, Transition};
pub use hints::{HintRecord, HintTotals};
use quorumkv_client::protocol::{
    ClusterInfo, ErrorKind, ErrorReply, KeyspaceInfo, NodeAddress, QuorumShortfall, ReadOptions,
    ReadRepair, Request, Response, WriteOptions,
};
use quorumkv_client::Context;
use quorumkv_ring::{NodeId, Ring};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
pub use tombstones::TombstoneConfig;

/// The static description of the cluster every member must agree on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterMap {
    pub ring: Ring,
    /// Keyspace name → replication factor N.
    pub keyspaces: BTreeMap<String, u8>,
    /// Node id → the `host:port` its QUIC endpoint is reached at.
    pub addresses: BTreeMap<NodeId, String>,
}

impl ClusterMap {
    /// Whether `node` is a member: listed in the map and placed on the ring. Only members may
    /// speak the peer protocol.
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.addresses.contains_key(node) && self.ring.node(node).is_some()
    }

    /// A hash of everything members must agree on, in hex. Peers compare it at connect time.
    pub fn fingerprint(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"quorumkv/cluster-map/v1\0");
        hasher.update(&self.ring.fingerprint().0);
        for (name, n) in &self.keyspaces {
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(&[*n]);
        }
        for (node, address) in &self.addresses {
            let id = node.as_str();
            hasher.update(&(id.len() as u64).to_le_bytes());
            hasher.update(id.as_bytes());
            hasher.update(&(address.len() as u64).to_le_bytes());
            hasher.update(address.as_bytes());
        }
        hasher.finalize().to_hex().to_string()
    }
}

/// The knobs the core reads; the node's `Config` fills them in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    pub request_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub peer_down_after_ms: u64,
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    /// Most entries a key's causal context may reach through writes; client context tokens
    /// are accepted up to [`CONTEXT_TOKEN_SLACK`] times as many.
    pub context_entries_max: usize,
    pub in_flight_requests_max: usize,
    pub siblings_per_key_max: usize,
    pub siblings_per_key_warn: usize,
    /// The largest encoded key state a write may leave: what one replication frame can carry
    /// besides the key and the envelope. Derived from `limits.frame_bytes_max`.
    pub key_state_bytes_max: usize,
    /// Bytes of hints this node keeps for one owner (see `hints`).
    pub hint_bytes_per_target_max: u64,
    /// Age after which an undelivered hint that no acknowledgement counted on expires.
    pub hint_max_age_ms: u64,
    /// Hints delivered to one owner at a time.
    pub hint_delivery_batch: usize,
    /// Background Merkle-tree exchanges between replicas (`[anti_entropy]`).
    pub anti_entropy: AntiEntropyConfig,
    /// Removal of deleted keys once safe (`[tombstones]`).
    pub tombstones: TombstoneConfig,
    /// The cluster secrets that seal and check client context tokens (`tls.cluster_secret`,
    /// `tls.cluster_secret_previous`). The default is a random secret made once per process,
    /// shared by every core of the process (the driver, the simulation, in-process tests),
    /// so no well-known key exists; a node always replaces it with the secret file it loads.
    pub context_keys: crate::version_vector::ContextKeys,
}

impl Default for CoreConfig {
    fn default() -> CoreConfig {
        CoreConfig {
            request_timeout_ms: quorumkv_client::protocol::DEFAULT_REQUEST_TIMEOUT_MS,
            ping_interval_ms: 500,
            peer_down_after_ms: 2_000,
            key_bytes_max: 1024,
            value_bytes_max: 1024 * 1024,
            context_entries_max: 256,
            in_flight_requests_max: 4096,
            siblings_per_key_max: 100,
            siblings_per_key_warn: 25,
            key_state_bytes_max: 1024 * 1024 + 64 * 1024 - 1024 - 4096,
            hint_bytes_per_target_max: 256 * 1024 * 1024,
            hint_max_age_ms: 3 * 60 * 60 * 1000,
            hint_delivery_batch: 64,
            anti_entropy: AntiEntropyConfig::default(),
            tombstones: TombstoneConfig::default(),
            context_keys: process_context_keys(),
        }
    }
}

/// A random cluster secret made once per process, for [`CoreConfig::default`].
fn process_context_keys() -> crate::version_vector::ContextKeys {
    use crate::version_vector::{ClusterSecret, ContextKeys};
    static KEYS: std::sync::OnceLock<ContextKeys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| ContextKeys::new(ClusterSecret::from_bytes(rand::random()), []))
        .clone()
}

/// How many times `context_entries_max` entries a client's context token may carry: room for
/// the join of states written concurrently at different coordinators, so a context a read hands
/// out is never refused (see `coordinate::check_key_state`).
pub const CONTEXT_TOKEN_SLACK: usize = 4;

/// The longest timeout a request may ask for, defined with the protocol.
pub(crate) use quorumkv_client::protocol::REQUEST_TIMEOUT_MAX_MS;

/// The time, as the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds, for deadlines.
    pub monotonic_ms: u64,
    /// Wall-clock milliseconds since the Unix epoch, stamped on siblings (informational).
    pub wall_ms: u64,
}

/// Names the client stream a reply goes to; chosen by the shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientHandle(pub u64);

/// Something that happened to the node.
#[derive(Clone, Debug)]
pub enum Input {
    /// A client sent a request on stream `handle`.
    Client {
        handle: ClientHandle,
        request: Request,
    },
    /// A peer sent a message. `from` comes from the peer's certificate, not the message.
    Peer { from: NodeId, message: PeerMessage },
    /// Storage is durable through `through`.
    Flushed { through: WriteSeq },
    /// The last flush failed (for example, the disk is full).
    FlushFailed { reason: String },
    /// The transport could not deliver messages to `to` that belong to `ops`, operations this
    /// node started (a failed dial, a lost connection, a message too large to encode). Each of
    /// those operations counts `to` as failed, and nothing else does: whether a peer is down
    /// is the failure detector's decision alone, from its pings, so one lost message never
    /// fails requests that have nothing to do with it.
    SendFailed { to: NodeId, ops: Vec<OpId> },
    /// The transport's send queue to `node` went over its byte bound (`congested`), or drained
    /// back under half of it. While a replica's queue is congested, new requests that would
    /// send to it are refused with `Overloaded`; messages already queued are never dropped.
    PeerCongested { node: NodeId, congested: bool },
    /// Time passed; check deadlines and the failure detector.
    Tick,
}

/// Something the shell must do.
#[derive(Clone, Debug)]
pub enum Output {
    /// Answer the client on stream `handle`.
    Reply {
        handle: ClientHandle,
        response: Response,
    },
    /// Send a message to a peer.
    Send { to: NodeId, message: PeerMessage },
    /// Flush storage, then feed back [`Input::Flushed`] (or [`Input::FlushFailed`]).
    Flush,
}

/// Where a coordinated request came from, so its answer can go back.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Client(ClientHandle),
    /// Forwarded by a peer that is not a replica of the key.
    Peer {
        node: NodeId,
        op: OpId,
    },
}

#[derive(Debug)]
struct WriteOp {
    origin: Origin,
    tally: Tally,
    deadline_ms: u64,
    /// The context the writer gets back: its own context plus the new dot.
    reply_context: Context,
    keyspace: String,
    key: Vec<u8>,
    /// The key's preference list: the owners, one tally slot each.
    owners: Vec<NodeId>,
    /// Fallback → the owner whose slot it fills (sloppy quorum).
    fallbacks: BTreeMap<NodeId, NodeId>,
    /// Owners hinted here in the write that stored the data.
    hinted_here: BTreeSet<NodeId>,
    /// The client has its answer; the write lingers until every owner answered, to hint those
    /// that did not.
    replied: bool,
}

#[derive(Debug)]
struct ReadOp {
    origin: Origin,
    tally: Tally,
    deadline_ms: u64,
    keyspace: String,
    key: Vec<u8>,
    merged: KeyState,
    /// The state hash each replica answered with (`None`: no copy), this node's own included;
    /// read repair compares them with the merged state's.
    answers: BTreeMap<NodeId, Option<[u8; 32]>>,
    repair: ReadRepair,
    /// The client has its reply; the read lingers for late answers and repairs.
    replied: bool,
    /// Every replica has answered or failed, and the stale ones among them were repaired.
    final_repair: bool,
    /// Replicas sent the merged state that have not acknowledged it yet.
    repairing: BTreeSet<NodeId>,
    /// Replicas known to hold the merged state: they answered with it or acknowledged it.
    holders: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct ForwardOp {
    client: ClientHandle,
    request: Request,
    /// The replica the request is with now, then the ones to try if it fails.
    to: NodeId,
    remaining: Vec<NodeId>,
    deadline_ms: u64,
}

#[derive(Debug)]
enum Op {
    Write(WriteOp),
    Read(ReadOp),
    Forward(ForwardOp),
    Handoff(hints::HandoffOp),
    Inspect(inspect::InspectOp),
}

impl Op {
    fn deadline_ms(&self) -> u64 {
        match self {
            Op::Write(w) => w.deadline_ms,
            Op::Read(r) => r.deadline_ms,
            Op::Forward(f) => f.deadline_ms,
            Op::Handoff(h) => h.deadline_ms,
            Op::Inspect(i) => i.deadline_ms(),
        }
    }
}

/// Who is waiting for a write to become durable.
#[derive(Clone, Debug, PartialEq)]
enum DurableWaiter {
    /// This node's own copy, coordinating `OpId`.
    Local(OpId),
    /// A coordinator on another node.
    Peer { node: NodeId, op: OpId },
    /// A message to send to `node` once durable, answering its `op` (a tombstone check).
    Send {
        node: NodeId,
        op: OpId,
        message: PeerMessage,
    },
}

/// A validated data request.
struct Checked<'r> {
    keyspace: &'r str,
    key: &'r [u8],
    n: u8,
    preference_list: Vec<NodeId>,
    timeout_ms: u64,
}

/// The replication state machine of one node.
#[derive(Debug)]
pub struct NodeCore {
    me: NodeId,
    map: Arc<ClusterMap>,
    config: CoreConfig,
    clock: ActorClock,
    detector: FailureDetector,
    ops: BTreeMap<OpId, Op>,
    /// Every op's deadline, ordered, so the next deadline and the expired ops are found without
    /// visiting every op in flight (the core handles an input per message; it must stay cheap
    /// with thousands of requests in flight).
    deadlines: BTreeSet<(u64, OpId)>,
    /// Peers whose send queue is over its bound, as the transport last reported.
    congested: BTreeSet<NodeId>,
    /// This process start's random id, the first half of every [`OpId`] it issues.
    instance: u64,
    /// Why this node took itself out of service, if it did: its storage engine failed (an I/O
    /// error, a failed flush, engine corruption). See [`NodeCore::in_service`].
    out_of_service: Option<String>,
    next_op: u64,
    durable_waiters: BTreeMap<WriteSeq, Vec<DurableWaiter>>,
    flush_in_flight: bool,
    /// Answered ops kept for late answers, repairs or hints; they do not count toward
    /// `in_flight_requests_max` (see [`read_repair`]).
    lingering: BTreeSet<OpId>,
    /// This node's stale copies found by reads, merged at the end of the current input.
    local_repairs: Vec<(String, Vec<u8>, KeyState)>,
    hints: hints::Hints,
    /// The Merkle trees and the exchanges of anti-entropy.
    anti_entropy: AntiEntropy,
    /// Deleted keys stored here and their collection.
    tombstones: tombstones::Tombstones,
}

impl NodeCore {
    /// A core for node `me`, issuing dots from `clock` (see [`crate::version_vector`] for how
    /// the shell obtains it from the incarnation record). `instance` must differ on every
    /// process start (the shell draws it at random and sends the same value in its QUIC hello);
    /// it makes operation ids unique across restarts.
    pub fn new(
        me: NodeId,
        map: Arc<ClusterMap>,
        config: CoreConfig,
        clock: ActorClock,
        instance: u64,
        now: Now,
    ) -> NodeCore {
        let peers = map.addresses.keys().filter(|node| **node != me).cloned();
        let detector = FailureDetector::new(
            peers,
            now.monotonic_ms,
            config.ping_interval_ms,
            config.peer_down_after_ms,
        );
        let anti_entropy = AntiEntropy::new(
            config.anti_entropy.clone(),
            map.ring.range_count(),
            map.keyspaces.keys().cloned(),
            instance,
            now.monotonic_ms,
        );
        let tombstones = tombstones::Tombstones::new(&config.tombstones, now.monotonic_ms);
        NodeCore {
            me,
            map,
            config,
            clock,
            detector,
            ops: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            congested: BTreeSet::new(),
            instance,
            out_of_service: None,
            next_op: 1,
            durable_waiters: BTreeMap::new(),
            flush_in_flight: false,
            lingering: BTreeSet::new(),
            local_repairs: Vec::new(),
            hints: hints::Hints::default(),
            anti_entropy,
            tombstones,
        }
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.me
    }

    /// The actor clock, for the clean-shutdown record.
    pub fn clock(&self) -> &ActorClock {
        &self.clock
    }

    /// Whether the node serves. A node whose storage engine failed takes itself out of service
    /// for good (sled refuses all work after an I/O error until it is reopened, which means a
    /// restart): it answers client requests `Unavailable` (retryable, so clients go to another
    /// replica), answers no peer request (replica writes, reads, hint deliveries, anti-entropy,
    /// pings) so peers' failure detectors count it down, and the shell reports it not ready.
    pub fn in_service(&self) -> bool {
        self.out_of_service.is_none()
    }

    /// Requests being coordinated or forwarded now, not counting answered ones that linger
    /// for late answers or repairs, nor hint deliveries.
    pub fn in_flight(&self) -> usize {
        self.ops.len() - self.lingering.len() - self.hints_in_flight()
    }

    /// The liveness the failure detector believes for each peer.
    pub fn peer_liveness(&self) -> impl Iterator<Item = (&NodeId, Liveness)> {
        self.detector.peers()
    }

    /// When the core next needs an [`Input::Tick`] (monotonic ms), if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let op = self.deadlines.first().map(|(deadline, _)| *deadline);
        op.into_iter()
            .chain(self.detector.next_deadline_ms())
            .chain(self.anti_entropy.next_deadline_ms())
            .chain(self.tombstones_next_deadline_ms())
            .min()
    }

    /// Handles one input, appending what the shell must do to `out`.
    pub fn handle(&mut self, now: Now, input: Input, storage: &dyn Storage, out: &mut Vec<Output>) {
        // Before the first input can write a hint, so the totals count each stored hint once.
        self.load_hints_once(storage);
        match input {
            Input::Client { handle, request } => {
                self.on_request(now, Origin::Client(handle), request, storage, out)
            }
            Input::Peer { from, message } => {
                // Only members speak the peer protocol: the listener refuses other node
                // certificates at connect time, and the core refuses their messages too, so no
                // path (a transport bug, a test harness, a future transport) lets a non-member
                // write a replica, answer for one, or count as a live peer.
                if !self.map.is_member(&from) {
                    metrics::peer_message_refused();
                    tracing::warn!(
                        peer = %from,
                        kind = message.kind(),
                        "message from a node outside the cluster map refused"
                    );
                    return;
                }
                if let Some(transition) = self.detector.heard_from(&from, now.monotonic_ms) {
                    log_transition(&transition);
                }
                // Out of service, the node answers no peer request at all (not even with
                // `Failed`): any answer would count as a sign of life in the sender's failure
                // detector, and hint deliveries and anti-entropy, which retry on every tick,
                // would keep a node that cannot serve marked up. Silent, it is counted down
                // and its peers stop sending it work. Answers to its own operations still land.
                if !self.in_service()
                    && (message.request_op().is_some()
                        || matches!(message, PeerMessage::Ping { .. }))
                {
                    tracing::debug!(peer = %from, kind = message.kind(), "out of service; request ignored");
                } else {
                    self.on_peer(now, from, message, storage, out)
                }
            }
            Input::Flushed { through } => self.on_flushed(through, out),
            Input::FlushFailed { reason } => self.on_flush_failed(&reason, out),
            Input::SendFailed { to, ops } => {
                for op in ops {
                    if self.ae_owns(op) {
                        self.ae_failed(op, &to, now);
                    } else if self.gc_owns(op) {
                        self.on_gc_check_reply(now, &to, op, None, storage, out);
                    } else {
                        self.on_progress(op, &to, ReplicaProgress::Failed, out);
                    }
                }
            }
            Input::PeerCongested { node, congested } => {
                if congested {
                    tracing::debug!(peer = %node, "send queue to peer is full; admitting less");
                    self.congested.insert(node);
                } else {
                    self.congested.remove(&node);
                }
            }
            Input::Tick => {
                self.on_tick(now, out);
                self.deliver_hints(now, storage, out);
                self.ae_tick(now, storage, out);
                self.tombstones_tick(now, storage, out);
            }
        }
        if !self.local_repairs.is_empty() {
            self.apply_local_repairs(storage);
        }
        self.apply_hint_work(now, storage);
    }

    fn answer(&self, origin: &Origin, response: Response, out: &mut Vec<Output>) {
        match origin {
            Origin::Client(handle) => out.push(Output::Reply {
                handle: *handle,
                response,
            }),
            Origin::Peer { node, op } => out.push(Output::Send {
                to: node.clone(),
                message: PeerMessage::ForwardReply { op: *op, response },
            }),
        }
    }

    fn insert_op(&mut self, id: OpId, op: Op) {
        self.deadlines.insert((op.deadline_ms(), id));
        self.ops.insert(id, op);
    }

    fn remove_op(&mut self, id: OpId) -> Option<Op> {
        let op = self.ops.remove(&id)?;
        self.deadlines.remove(&(op.deadline_ms(), id));
        self.lingering.remove(&id);
        Some(op)
    }

    fn new_op(&mut self) -> OpId {
        let op = OpId(self.instance, self.next_op);
        self.next_op += 1;
        op
    }

    fn cluster_info(&self) -> ClusterInfo {
        ClusterInfo {
            ring: self.map.ring.clone(),
            nodes: self
                .map
                .addresses
                .iter()
                .map(|(id, address)| NodeAddress {
                    id: id.to_string(),
                    address: address.clone(),
                })
                .collect(),
            keyspaces: self
                .map
                .keyspaces
                .iter()
                .map(|(name, n)| KeyspaceInfo {
                    name: name.clone(),
                    n: *n,
                })
                .collect(),
            request_timeout_ms: Some(self.config.request_timeout_ms),
        }
    }
}

/// A majority of `n`: the default R and W.
pub fn majority(n: u8) -> u8 {
    n / 2 + 1
}

fn write_quorum(n: u8, options: &WriteOptions) -> Result<(u8, u8, u8), ErrorReply> {
    let w = options.w.unwrap_or_else(|| majority(n));
    if w == 0 || w > n {
        return Err(invalid(format!(
            "w = {w} is outside 1..={n} (the keyspace's N)"
        )));
    }
    let dw = options.dw.unwrap_or(1);
    if dw > w {
        return Err(invalid(format!("dw = {dw} exceeds w = {w}")));
    }
    let pw = options.pw.unwrap_or(0);
    if pw > w {
        return Err(invalid(format!("pw = {pw} exceeds w = {w}")));
    }
    Ok((w, dw, pw))
}

fn read_quorum(n: u8, options: &ReadOptions) -> Result<u8, ErrorReply> {
    let r = options.r.unwrap_or_else(|| majority(n));
    if r == 0 || r > n {
        return Err(invalid(format!(
            "r = {r} is outside 1..={n} (the keyspace's N)"
        )));
    }
    let pr = options.pr.unwrap_or(0);
    if pr > n {
        return Err(invalid(format!("pr = {pr} exceeds {n} (the keyspace's N)")));
    }
    // Reads ask primary owners only, so every answer is a primary one: PR raises the number
    // of answers awaited.
    Ok(r.max(pr))
}

/// The error of a request whose quorum was not reached; `timed_out` when its deadline passed
/// before the replicas had all answered or failed.
fn quorum_not_reached(what: &str, shortfall: Shortfall, timed_out: bool) -> Response {
    let short_of_answers = shortfall.acked < shortfall.required;
    crate::metrics::quorum_failure(match (timed_out, short_of_answers, what) {
        (true, _, _) => "timeout",
        (false, true, "read") => "r",
        (false, true, _) => "w",
        (false, false, _) => "dw",
    });
    let message = if short_of_answers {
        format!(
            "{what} quorum not reached: {} of the required {} replicas answered",
            shortfall.acked, shortfall.required
        )
    } else {
        format!(
            "{what} quorum not reached: {} of the required {} replicas confirmed durability",
            shortfall.durable_acked, shortfall.durable_required
        )
    };
    let message = if what == "write" {
        format!("{message}; the write may have been applied on some replicas")
    } else {
        message
    };
    Response::Error(ErrorReply {
        kind: ErrorKind::QuorumNotReached,
        message,
        quorum: Some(QuorumShortfall {
            required: shortfall.required,
            acked: shortfall.acked,
            durable_required: shortfall.durable_required,
            durable_acked: shortfall.durable_acked,
        }),
    })
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error(ErrorReply {
        kind,
        message,
        quorum: None,
    })
}

fn invalid(message: String) -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::InvalidRequest,
        message,
        quorum: None,
    }
}

impl NodeCore {
    /// The core's one way into [`Storage::merge`]. Every write a node makes (a client put at its
    /// coordinator, a replica write, a hint, a repair) passes here, so whatever must follow
    /// every change of a key's stored state follows all of them.
    fn store(
        &mut self,
        storage: &dyn Storage,
        keyspace: &str,
        key: &[u8],
        state: &KeyState,
        aux: &[AuxWrite],
    ) -> crate::Result<Merged> {
        let merged = storage.merge(keyspace, key, state, aux)?;
        if merged.changed {
            self.ae_on_stored(
                keyspace,
                key,
                merged.old_hash.as_ref(),
                Some(&merged.new_hash),
            );
            self.tombstones_on_stored(keyspace, key, &merged.state, &merged.new_hash);
        }
        Ok(merged)
    }
}

impl NodeCore {
    /// Turns a storage error met while serving into the caller's error. An engine failure takes
    /// the node out of service (see [`NodeCore::in_service`]) and is `Unavailable`, so clients
    /// retry on another replica; a corrupt state of one key is that key's `Internal` error.
    fn storage_error(&mut self, what: &str, error: crate::Error) -> ErrorReply {
        if self.note_storage_failure(&error) {
            ErrorReply {
                kind: ErrorKind::Unavailable,
                message: format!("node {} is out of service: {what} failed: {error}", self.me),
                quorum: None,
            }
        } else {
            internal(format!("{what} failed: {error}"))
        }
    }

    /// Takes the node out of service if `error` is a failure of the storage engine itself
    /// (not of one key's bytes); returns whether the node is out of service.
    fn note_storage_failure(&mut self, error: &crate::Error) -> bool {
        let engine = matches!(
            error,
            crate::Error::Storage { .. } | crate::Error::StorageCorrupt { .. }
        );
        if engine {
            self.take_out_of_service(error.to_string());
        }
        self.out_of_service.is_some()
    }

    /// Takes the node out of service for `reason` (the first reason stays).
    fn take_out_of_service(&mut self, reason: String) {
        if self.out_of_service.is_none() {
            tracing::error!(node = %self.me, %reason, "storage failed; taking this node out of service");
            metrics::in_service(false);
            self.out_of_service = Some(reason);
        }
    }

    /// The answer to any request while out of service.
    fn out_of_service_reply(&self) -> Option<ErrorReply> {
        let reason = self.out_of_service.as_ref()?;
        Some(ErrorReply {
            kind: ErrorKind::Unavailable,
            message: format!(
                "node {} is out of service since its storage failed ({reason}); \
                 restart it after fixing the cause",
                self.me
            ),
            quorum: None,
        })
    }
}

fn internal(message: String) -> ErrorReply {
    tracing::error!(%message, "internal error serving a request");
    ErrorReply {
        kind: ErrorKind::Internal,
        message,
        quorum: None,
    }
}

fn join_ids(ids: &[NodeId]) -> String {
    ids.iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn log_transition(transition: &Transition) {
    match transition.now {
        Liveness::Down => tracing::warn!(peer = %transition.node, "peer marked down"),
        Liveness::Up => tracing::info!(peer = %transition.node, "peer marked up"),
    }
    metrics::peer_transition(transition.node.as_str(), transition.now == Liveness::Up);
}
