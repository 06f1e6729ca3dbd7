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
//! reply carries that state's live siblings and its context. Answers after the reply are
//! dropped (read repair, which will use them, comes with the repair work).
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

pub mod detector;

use crate::metrics;
use crate::peer::{OpId, PeerMessage};
use crate::quorum::{ReplicaProgress, Shortfall, Tally, Verdict};
use crate::storage::{Storage, WriteSeq};
use crate::version_vector::{
    self, ActorClock, CausalContext, KeyState, RequestId as CoreRequestId,
};
use detector::{FailureDetector, Liveness, Transition};
use quorumkv_client::protocol::{
    ClusterInfo, ErrorKind, ErrorReply, KeyspaceInfo, NodeAddress, QuorumShortfall, ReadOptions,
    Request, Response, SiblingValue, WriteOptions,
};
use quorumkv_client::Context;
use quorumkv_ring::{NodeId, Ring};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

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
    pub context_entries_max: usize,
    pub in_flight_requests_max: usize,
}

impl Default for CoreConfig {
    fn default() -> CoreConfig {
        CoreConfig {
            request_timeout_ms: 2_000,
            ping_interval_ms: 500,
            peer_down_after_ms: 2_000,
            key_bytes_max: 1024,
            value_bytes_max: 1024 * 1024,
            context_entries_max: 256,
            in_flight_requests_max: 4096,
        }
    }
}

/// The longest timeout a request may ask for.
const REQUEST_TIMEOUT_MAX_MS: u64 = 120_000;

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
    /// The transport could not deliver a message to `node`.
    Unreachable { node: NodeId },
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
}

#[derive(Debug)]
struct ReadOp {
    origin: Origin,
    tally: Tally,
    deadline_ms: u64,
    keyspace: String,
    key: Vec<u8>,
    merged: KeyState,
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
}

impl Op {
    fn deadline_ms(&self) -> u64 {
        match self {
            Op::Write(w) => w.deadline_ms,
            Op::Read(r) => r.deadline_ms,
            Op::Forward(f) => f.deadline_ms,
        }
    }
}

/// Who is waiting for a write to become durable.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DurableWaiter {
    /// This node's own copy, coordinating `OpId`.
    Local(OpId),
    /// A coordinator on another node.
    Peer { node: NodeId, op: OpId },
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
    next_op: u64,
    durable_waiters: BTreeMap<WriteSeq, Vec<DurableWaiter>>,
    flush_in_flight: bool,
}

impl NodeCore {
    /// A core for node `me`, issuing dots from `clock` (see [`version_vector`] for how the
    /// shell obtains it from the incarnation record).
    pub fn new(
        me: NodeId,
        map: Arc<ClusterMap>,
        config: CoreConfig,
        clock: ActorClock,
        now: Now,
    ) -> NodeCore {
        let peers = map.addresses.keys().filter(|node| **node != me).cloned();
        let detector = FailureDetector::new(
            peers,
            now.monotonic_ms,
            config.ping_interval_ms,
            config.peer_down_after_ms,
        );
        NodeCore {
            me,
            map,
            config,
            clock,
            detector,
            ops: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            congested: BTreeSet::new(),
            next_op: 1,
            durable_waiters: BTreeMap::new(),
            flush_in_flight: false,
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

    /// Requests being coordinated or forwarded now.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// The liveness the failure detector believes for each peer.
    pub fn peer_liveness(&self) -> impl Iterator<Item = (&NodeId, Liveness)> {
        self.detector.peers()
    }

    /// When the core next needs an [`Input::Tick`] (monotonic ms), if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let op = self.deadlines.first().map(|(deadline, _)| *deadline);
        op.into_iter().chain(self.detector.next_deadline_ms()).min()
    }

    /// Handles one input, appending what the shell must do to `out`.
    pub fn handle(&mut self, now: Now, input: Input, storage: &dyn Storage, out: &mut Vec<Output>) {
        match input {
            Input::Client { handle, request } => {
                self.on_request(now, Origin::Client(handle), request, storage, out)
            }
            Input::Peer { from, message } => {
                if let Some(transition) = self.detector.heard_from(&from, now.monotonic_ms) {
                    log_transition(&transition);
                }
                self.on_peer(now, from, message, storage, out)
            }
            Input::Flushed { through } => self.on_flushed(through, out),
            Input::FlushFailed { reason } => self.on_flush_failed(&reason, out),
            Input::Unreachable { node } => {
                if let Some(transition) = self.detector.unreachable(&node) {
                    log_transition(&transition);
                }
                self.on_replica_lost(&node, out);
            }
            Input::PeerCongested { node, congested } => {
                if congested {
                    tracing::debug!(peer = %node, "send queue to peer is full; admitting less");
                    self.congested.insert(node);
                } else {
                    self.congested.remove(&node);
                }
            }
            Input::Tick => self.on_tick(now, out),
        }
    }

    // ----- requests --------------------------------------------------------------------------

    fn on_request(
        &mut self,
        now: Now,
        origin: Origin,
        request: Request,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        if matches!(request, Request::ClusterInfo) {
            let response = Response::ClusterInfo(self.cluster_info());
            return self.answer(&origin, response, out);
        }
        if self.ops.len() >= self.config.in_flight_requests_max {
            metrics::limit_exceeded("in_flight_requests");
            let message = format!(
                "node {} has {} requests in flight (limit in_flight_requests_max = {})",
                self.me,
                self.ops.len(),
                self.config.in_flight_requests_max
            );
            return self.answer(&origin, error(ErrorKind::Overloaded, message), out);
        }
        let fields = match &request {
            Request::Get {
                keyspace,
                key,
                options,
            } => (keyspace, key, 0, options.timeout_ms),
            Request::Put {
                keyspace,
                key,
                value,
                options,
                ..
            } => (keyspace, key, value.len(), options.timeout_ms),
            Request::Delete {
                keyspace,
                key,
                options,
                ..
            } => (keyspace, key, 0, options.timeout_ms),
            Request::ClusterInfo => return,
        };
        let checked = match self.check(fields.0, fields.1, fields.2, fields.3) {
            Ok(checked) => checked,
            Err(reply) => return self.answer(&origin, Response::Error(reply), out),
        };
        if let Some(peer) = self.congested_replica(&checked.preference_list) {
            metrics::limit_exceeded("peer_queue_bytes");
            let message = format!(
                "node {} cannot take more work for replica {peer} now: its send queue is full \
                 (limit peer_queue_bytes_max); retry later",
                self.me
            );
            return self.answer(&origin, error(ErrorKind::Overloaded, message), out);
        }
        if !checked.preference_list.contains(&self.me) {
            return match origin {
                Origin::Client(client) => self.forward(now, client, &checked, request.clone(), out),
                // A forward only goes to a replica; a peer that thinks otherwise runs another
                // ring, which the connection handshake should have refused.
                Origin::Peer { .. } => {
                    let message = format!("node {} is not a replica of this key", self.me);
                    self.answer(&origin, error(ErrorKind::Unavailable, message), out)
                }
            };
        }
        let deadline_ms = now.monotonic_ms.saturating_add(checked.timeout_ms);
        let result = match &request {
            Request::Get { options, .. } => self.coordinate_get(
                now,
                origin.clone(),
                &checked,
                options,
                deadline_ms,
                storage,
                out,
            ),
            Request::Put {
                value,
                context,
                request_id,
                options,
                ..
            } => self.coordinate_write(
                now,
                origin.clone(),
                &checked,
                Some(value.clone()),
                context.as_ref(),
                request_id.0,
                options,
                deadline_ms,
                storage,
                out,
            ),
            Request::Delete {
                context,
                request_id,
                options,
                ..
            } => self.coordinate_write(
                now,
                origin.clone(),
                &checked,
                None,
                context.as_ref(),
                request_id.0,
                options,
                deadline_ms,
                storage,
                out,
            ),
            Request::ClusterInfo => Ok(()),
        };
        if let Err(reply) = result {
            self.answer(&origin, Response::Error(reply), out);
        }
    }

    /// A replica of `list` (other than this node) that a request would send to now, but whose
    /// send queue is full. A replica believed down gets nothing, so its queue does not count.
    fn congested_replica<'a>(&self, list: &'a [NodeId]) -> Option<&'a NodeId> {
        if self.congested.is_empty() {
            return None;
        }
        list.iter().find(|node| {
            **node != self.me && self.congested.contains(*node) && self.detector.is_up(node)
        })
    }

    /// Validates a data request against the keyspace and the limits.
    fn check<'r>(
        &self,
        keyspace: &'r str,
        key: &'r [u8],
        value_len: usize,
        timeout_ms: Option<u32>,
    ) -> Result<Checked<'r>, ErrorReply> {
        let Some(&n) = self.map.keyspaces.get(keyspace) else {
            return Err(invalid(format!("unknown keyspace `{keyspace}`")));
        };
        if key.is_empty() {
            return Err(invalid("the key is empty".to_string()));
        }
        if key.len() > self.config.key_bytes_max {
            metrics::limit_exceeded("key_bytes");
            return Err(invalid(format!(
                "key of {} bytes exceeds key_bytes_max = {}",
                key.len(),
                self.config.key_bytes_max
            )));
        }
        if value_len > self.config.value_bytes_max {
            metrics::limit_exceeded("value_bytes");
            return Err(invalid(format!(
                "value of {value_len} bytes exceeds value_bytes_max = {}",
                self.config.value_bytes_max
            )));
        }
        let timeout_ms = match timeout_ms {
            None => self.config.request_timeout_ms,
            Some(0) => return Err(invalid("timeout_ms must be at least 1".to_string())),
            Some(ms) => u64::from(ms).min(REQUEST_TIMEOUT_MAX_MS),
        };
        let preference_list = match self
            .map
            .ring
            .preference_list_for(keyspace, key, usize::from(n))
        {
            Ok(list) => list.ids().cloned().collect(),
            Err(e) => {
                return Err(internal(format!(
                    "keyspace `{keyspace}` cannot be placed: {e}"
                )))
            }
        };
        Ok(Checked {
            keyspace,
            key,
            n,
            preference_list,
            timeout_ms,
        })
    }

    fn forward(
        &mut self,
        now: Now,
        client: ClientHandle,
        checked: &Checked<'_>,
        request: Request,
        out: &mut Vec<Output>,
    ) {
        let mut candidates: Vec<NodeId> = checked
            .preference_list
            .iter()
            .filter(|node| self.detector.is_up(node))
            .cloned()
            .collect();
        if candidates.is_empty() {
            let message = format!(
                "no replica of this key is reachable from node {} (replicas: {})",
                self.me,
                join_ids(&checked.preference_list)
            );
            return self.answer(
                &Origin::Client(client),
                error(ErrorKind::Unavailable, message),
                out,
            );
        }
        let to = candidates.remove(0);
        let op = self.new_op();
        out.push(Output::Send {
            to: to.clone(),
            message: PeerMessage::Forward {
                op,
                request: request.clone(),
            },
        });
        // The coordinator gets the request's own timeout; allow it that long plus one more to
        // answer, so its QuorumNotReached reaches the client rather than our Unavailable.
        let deadline_ms = now
            .monotonic_ms
            .saturating_add(checked.timeout_ms.saturating_mul(2));
        self.insert_op(
            op,
            Op::Forward(ForwardOp {
                client,
                request,
                to,
                remaining: candidates,
                deadline_ms,
            }),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn coordinate_write(
        &mut self,
        now: Now,
        origin: Origin,
        checked: &Checked<'_>,
        value: Option<Vec<u8>>,
        context: Option<&Context>,
        request_id: [u8; 16],
        options: &WriteOptions,
        deadline_ms: u64,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) -> Result<(), ErrorReply> {
        let (w, dw) = write_quorum(checked.n, options)?;
        let client_context = self.decode_context(checked, context)?;
        let mut state = storage
            .read(checked.keyspace, checked.key)
            .map_err(|e| internal(format!("reading the local copy failed: {e}")))?
            .unwrap_or_default();
        let dot = self.clock.next_dot(&state);
        let outcome = state
            .update(
                &client_context,
                dot,
                CoreRequestId(request_id),
                now.wall_ms,
                value,
            )
            .map_err(|e| invalid(format!("the write cannot be applied: {e}")))?;
        let merged = storage
            .merge(checked.keyspace, checked.key, &state, &[])
            .map_err(|e| internal(format!("writing the local copy failed: {e}")))?;
        let reply_context = Context::from_bytes(version_vector::encode_token(
            &outcome.context,
            checked.keyspace,
            checked.key,
        ));
        let op = self.new_op();
        let mut tally = Tally::new(checked.preference_list.iter().cloned(), w, dw);
        tally.record(&self.me, ReplicaProgress::Applied);
        if dw > 0 {
            self.await_durable(
                merged.seq,
                DurableWaiter::Local(op),
                storage,
                &mut tally,
                out,
            );
        }
        let encoded = merged.state.encode_canonical();
        // The coordinator's own flush gives one durable acknowledgement; replicas are asked to
        // answer after their flush only when the request needs more. A replica answers each
        // Replicate once: `Applied` at once, or `Durable` (which also counts as applied) after
        // its flush, never both.
        let durable = dw > 1;
        self.fan_out(checked, &mut tally, out, || PeerMessage::Replicate {
            op,
            keyspace: checked.keyspace.to_string(),
            key: checked.key.to_vec(),
            state: encoded.clone(),
            durable,
        });
        self.insert_op(
            op,
            Op::Write(WriteOp {
                origin,
                tally,
                deadline_ms,
                reply_context,
            }),
        );
        self.settle(op, out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn coordinate_get(
        &mut self,
        _now: Now,
        origin: Origin,
        checked: &Checked<'_>,
        options: &ReadOptions,
        deadline_ms: u64,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) -> Result<(), ErrorReply> {
        let r = read_quorum(checked.n, options)?;
        let local = storage
            .read(checked.keyspace, checked.key)
            .map_err(|e| internal(format!("reading the local copy failed: {e}")))?
            .unwrap_or_default();
        let op = self.new_op();
        let mut tally = Tally::new(checked.preference_list.iter().cloned(), r, 0);
        tally.record(&self.me, ReplicaProgress::Applied);
        self.fan_out(checked, &mut tally, out, || PeerMessage::Read {
            op,
            keyspace: checked.keyspace.to_string(),
            key: checked.key.to_vec(),
        });
        self.insert_op(
            op,
            Op::Read(ReadOp {
                origin,
                tally,
                deadline_ms,
                keyspace: checked.keyspace.to_string(),
                key: checked.key.to_vec(),
                merged: local,
            }),
        );
        self.settle(op, out);
        Ok(())
    }

    /// Sends `message()` to every other replica believed up; the ones believed down count as
    /// failed at once, so the request does not wait for them.
    fn fan_out(
        &self,
        checked: &Checked<'_>,
        tally: &mut Tally,
        out: &mut Vec<Output>,
        message: impl Fn() -> PeerMessage,
    ) {
        for replica in checked
            .preference_list
            .iter()
            .filter(|node| **node != self.me)
        {
            if self.detector.is_up(replica) {
                out.push(Output::Send {
                    to: replica.clone(),
                    message: message(),
                });
            } else {
                tally.record(replica, ReplicaProgress::Failed);
            }
        }
    }

    fn decode_context(
        &self,
        checked: &Checked<'_>,
        context: Option<&Context>,
    ) -> Result<CausalContext, ErrorReply> {
        match context {
            None => Ok(CausalContext::new()),
            Some(token) if token.is_empty() => Ok(CausalContext::new()),
            Some(token) => version_vector::decode_token(
                token.as_bytes(),
                checked.keyspace,
                checked.key,
                self.config.context_entries_max,
            )
            .map_err(|e| {
                if matches!(e, crate::Error::ContextTooLarge { .. }) {
                    metrics::limit_exceeded("context_entries");
                }
                invalid(e.to_string())
            }),
        }
    }

    // ----- peer messages ---------------------------------------------------------------------

    fn on_peer(
        &mut self,
        now: Now,
        from: NodeId,
        message: PeerMessage,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        match message {
            PeerMessage::Forward { op, request } => {
                self.on_request(now, Origin::Peer { node: from, op }, request, storage, out)
            }
            PeerMessage::ForwardReply { op, response } => {
                if let Some(Op::Forward(forward)) = self.ops.get(&op) {
                    if forward.to == from {
                        let client = forward.client;
                        self.remove_op(op);
                        out.push(Output::Reply {
                            handle: client,
                            response,
                        });
                    }
                }
            }
            PeerMessage::Replicate {
                op,
                keyspace,
                key,
                state,
                durable,
            } => self.on_replicate(from, op, &keyspace, &key, &state, durable, storage, out),
            PeerMessage::Applied { op } => {
                self.on_progress(op, &from, ReplicaProgress::Applied, out)
            }
            PeerMessage::Durable { op } => {
                self.on_progress(op, &from, ReplicaProgress::Durable, out)
            }
            PeerMessage::Failed { op, reason } => {
                tracing::warn!(peer = %from, %reason, "replica failed an operation");
                self.on_progress(op, &from, ReplicaProgress::Failed, out)
            }
            PeerMessage::Read { op, keyspace, key } => {
                let message = match storage.read(&keyspace, &key) {
                    Ok(state) => PeerMessage::ReadReply {
                        op,
                        state: state.map(|s| s.encode_canonical()),
                    },
                    Err(e) => PeerMessage::Failed {
                        op,
                        reason: e.to_string(),
                    },
                };
                out.push(Output::Send { to: from, message });
            }
            PeerMessage::ReadReply { op, state } => {
                self.on_read_reply(op, &from, state.as_deref(), out)
            }
            PeerMessage::Ping { nonce } => out.push(Output::Send {
                to: from,
                message: PeerMessage::Pong { nonce },
            }),
            PeerMessage::Pong { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_replicate(
        &mut self,
        from: NodeId,
        op: OpId,
        keyspace: &str,
        key: &[u8],
        state: &[u8],
        durable: bool,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let result = if !self.map.keyspaces.contains_key(keyspace) {
            Err(format!("unknown keyspace `{keyspace}`"))
        } else if key.is_empty() || key.len() > self.config.key_bytes_max {
            Err(format!(
                "key of {} bytes is outside 1..=key_bytes_max",
                key.len()
            ))
        } else {
            KeyState::decode(state)
                .map_err(|e| e.to_string())
                .and_then(|incoming| {
                    storage
                        .merge(keyspace, key, &incoming, &[])
                        .map_err(|e| e.to_string())
                })
        };
        match result {
            Ok(merged) => {
                if !durable {
                    out.push(Output::Send {
                        to: from,
                        message: PeerMessage::Applied { op },
                    });
                } else {
                    if merged.seq <= storage.durable_seq() {
                        out.push(Output::Send {
                            to: from,
                            message: PeerMessage::Durable { op },
                        });
                    } else {
                        self.durable_waiters
                            .entry(merged.seq)
                            .or_default()
                            .push(DurableWaiter::Peer { node: from, op });
                        self.request_flush(out);
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(peer = %from, %reason, "refused a replica write");
                out.push(Output::Send {
                    to: from,
                    message: PeerMessage::Failed { op, reason },
                });
            }
        }
    }

    fn on_read_reply(
        &mut self,
        op: OpId,
        from: &NodeId,
        state: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        let Some(Op::Read(read)) = self.ops.get_mut(&op) else {
            return;
        };
        let progress = match state.map(KeyState::decode).transpose() {
            Ok(Some(remote)) => {
                read.merged = read.merged.join(&remote);
                ReplicaProgress::Applied
            }
            Ok(None) => ReplicaProgress::Applied,
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "replica sent a corrupt key state");
                ReplicaProgress::Failed
            }
        };
        self.on_progress(op, from, progress, out);
    }

    fn on_progress(
        &mut self,
        op: OpId,
        from: &NodeId,
        progress: ReplicaProgress,
        out: &mut Vec<Output>,
    ) {
        match self.ops.get_mut(&op) {
            Some(Op::Write(write)) => {
                write.tally.record(from, progress);
            }
            Some(Op::Read(read)) => {
                read.tally.record(from, progress);
            }
            Some(Op::Forward(forward))
                if progress == ReplicaProgress::Failed && forward.to == *from =>
            {
                return self.retry_forward(op, out);
            }
            _ => return,
        }
        self.settle(op, out);
    }

    // ----- durability ------------------------------------------------------------------------

    fn await_durable(
        &mut self,
        seq: WriteSeq,
        waiter: DurableWaiter,
        storage: &dyn Storage,
        tally: &mut Tally,
        out: &mut Vec<Output>,
    ) {
        if seq <= storage.durable_seq() {
            tally.record(&self.me, ReplicaProgress::Durable);
        } else {
            self.durable_waiters.entry(seq).or_default().push(waiter);
            self.request_flush(out);
        }
    }

    fn request_flush(&mut self, out: &mut Vec<Output>) {
        if !self.flush_in_flight {
            self.flush_in_flight = true;
            out.push(Output::Flush);
        }
    }

    fn on_flushed(&mut self, through: WriteSeq, out: &mut Vec<Output>) {
        self.flush_in_flight = false;
        let still_waiting = self
            .durable_waiters
            .split_off(&WriteSeq(through.0.saturating_add(1)));
        let done = std::mem::replace(&mut self.durable_waiters, still_waiting);
        for waiter in done.into_values().flatten() {
            match waiter {
                DurableWaiter::Local(op) => {
                    let me = self.me.clone();
                    self.on_progress(op, &me, ReplicaProgress::Durable, out);
                }
                DurableWaiter::Peer { node, op } => out.push(Output::Send {
                    to: node,
                    message: PeerMessage::Durable { op },
                }),
            }
        }
        if !self.durable_waiters.is_empty() {
            self.request_flush(out);
        }
    }

    fn on_flush_failed(&mut self, reason: &str, out: &mut Vec<Output>) {
        tracing::error!(%reason, "storage flush failed; durable writes waiting for it fail");
        self.flush_in_flight = false;
        for waiter in std::mem::take(&mut self.durable_waiters)
            .into_values()
            .flatten()
        {
            match waiter {
                DurableWaiter::Local(op) => {
                    let me = self.me.clone();
                    self.on_progress(op, &me, ReplicaProgress::Failed, out);
                }
                DurableWaiter::Peer { node, op } => out.push(Output::Send {
                    to: node,
                    message: PeerMessage::Failed {
                        op,
                        reason: format!("flush failed: {reason}"),
                    },
                }),
            }
        }
    }

    // ----- time and failures -----------------------------------------------------------------

    fn on_tick(&mut self, now: Now, out: &mut Vec<Output>) {
        let (pings, transitions) = self.detector.tick(now.monotonic_ms);
        for (to, nonce) in pings {
            out.push(Output::Send {
                to,
                message: PeerMessage::Ping { nonce },
            });
        }
        for transition in transitions {
            log_transition(&transition);
            self.on_replica_lost(&transition.node, out);
        }
        let expired: Vec<OpId> = self
            .deadlines
            .range(..=(now.monotonic_ms, OpId(u64::MAX)))
            .map(|(_, op)| *op)
            .collect();
        for op in expired {
            self.expire(op, out);
        }
    }

    /// A replica is down or unreachable: every request still waiting on it counts it failed.
    fn on_replica_lost(&mut self, node: &NodeId, out: &mut Vec<Output>) {
        let affected: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| match op {
                Op::Write(w) => w.tally.waiting().any(|n| n == node),
                Op::Read(r) => r.tally.waiting().any(|n| n == node),
                Op::Forward(f) => f.to == *node,
            })
            .map(|(op, _)| *op)
            .collect();
        for op in affected {
            self.on_progress(op, node, ReplicaProgress::Failed, out);
        }
    }

    fn retry_forward(&mut self, op: OpId, out: &mut Vec<Output>) {
        let Some(Op::Forward(forward)) = self.ops.get_mut(&op) else {
            return;
        };
        while !forward.remaining.is_empty() {
            let next = forward.remaining.remove(0);
            if self.detector.is_up(&next) {
                forward.to = next.clone();
                out.push(Output::Send {
                    to: next,
                    message: PeerMessage::Forward {
                        op,
                        request: forward.request.clone(),
                    },
                });
                return;
            }
        }
        let client = forward.client;
        self.remove_op(op);
        let message = "no replica of this key answered the forwarded request".to_string();
        out.push(Output::Reply {
            handle: client,
            response: error(ErrorKind::Unavailable, message),
        });
    }

    fn expire(&mut self, op: OpId, out: &mut Vec<Output>) {
        match self.remove_op(op) {
            Some(Op::Write(write)) => {
                let reply = quorum_not_reached("write", write.tally.shortfall());
                self.answer(&write.origin, reply, out);
            }
            Some(Op::Read(read)) => {
                let reply = quorum_not_reached("read", read.tally.shortfall());
                self.answer(&read.origin, reply, out);
            }
            Some(Op::Forward(forward)) => {
                let message = format!("coordinator {} did not answer in time", forward.to);
                out.push(Output::Reply {
                    handle: forward.client,
                    response: error(ErrorKind::Unavailable, message),
                });
            }
            None => {}
        }
    }

    /// Answers `op` if its tally has decided.
    fn settle(&mut self, op: OpId, out: &mut Vec<Output>) {
        let verdict = match self.ops.get(&op) {
            Some(Op::Write(write)) => write.tally.verdict(),
            Some(Op::Read(read)) => read.tally.verdict(),
            _ => return,
        };
        // A failed request still waits for the replicas that have not answered (never past its
        // deadline, and never for replicas known down), so its error reports every
        // acknowledgement that was actually made rather than whichever arrived first.
        let quiet = match self.ops.get(&op) {
            Some(Op::Write(write)) => write.tally.waiting().next().is_none(),
            Some(Op::Read(read)) => read.tally.waiting().next().is_none(),
            _ => true,
        };
        if verdict == Verdict::Pending || (verdict == Verdict::Failed && !quiet) {
            return;
        }
        match self.remove_op(op) {
            Some(Op::Write(write)) => {
                let response = match verdict {
                    Verdict::Reached => Response::Written {
                        context: write.reply_context,
                    },
                    _ => quorum_not_reached("write", write.tally.shortfall()),
                };
                self.answer(&write.origin, response, out);
            }
            Some(Op::Read(read)) => {
                let response = match verdict {
                    Verdict::Reached => {
                        let siblings = read
                            .merged
                            .live_siblings()
                            .into_iter()
                            .map(|sibling| SiblingValue {
                                value: sibling.value.clone().unwrap_or_default(),
                                timestamp_ms: sibling.timestamp_ms,
                            })
                            .collect();
                        let token = version_vector::encode_token(
                            read.merged.context(),
                            &read.keyspace,
                            &read.key,
                        );
                        Response::Got {
                            siblings,
                            context: Context::from_bytes(token),
                        }
                    }
                    _ => quorum_not_reached("read", read.tally.shortfall()),
                };
                self.answer(&read.origin, response, out);
            }
            _ => {}
        }
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
        Some(op)
    }

    fn new_op(&mut self) -> OpId {
        let op = OpId(self.next_op);
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
        }
    }
}

/// A majority of `n`: the default R and W.
pub fn majority(n: u8) -> u8 {
    n / 2 + 1
}

fn write_quorum(n: u8, options: &WriteOptions) -> Result<(u8, u8), ErrorReply> {
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
    Ok((w, dw))
}

fn read_quorum(n: u8, options: &ReadOptions) -> Result<u8, ErrorReply> {
    let r = options.r.unwrap_or_else(|| majority(n));
    if r == 0 || r > n {
        return Err(invalid(format!(
            "r = {r} is outside 1..={n} (the keyspace's N)"
        )));
    }
    Ok(r)
}

fn quorum_not_reached(what: &str, shortfall: Shortfall) -> Response {
    let message = if shortfall.acked < shortfall.required {
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
