//! The async client: routing, failover, timeouts and retries around the wire protocol.
//!
//! # Life of a request
//!
//! 1. **Route.** [`Client::put`] (and the others) compute the key's token, look up the
//!    keyspace's N and ask the ring for the preference list (see `route`). That gives an order
//!    of targets: replicas first, then every other node, nodes marked down or suspect last,
//!    seeds that are not known nodes at the very end.
//! 2. **Attempts.** A request is a sequence of attempts, each on one target, decided by a small
//!    pure state machine (`failover`) and carried out by tasks (`attempts`): the first attempt
//!    goes to the first target; another one starts when a dial is slow (*connect race*, every
//!    request), when a read is slow (*hedge*, reads only, once), when an attempt failed at the
//!    connection level (at once), or after a retryable answer (after a backoff). The first
//!    answer that ends the request wins.
//! 3. **Connect.** One QUIC connection per node is cached and shared by every request to it,
//!    and one dial per node is shared by every request that waits for it (`connection`). A dial
//!    is bounded by a connect timeout sized to the handshakes seen so far, between
//!    [`ClientBuilder::connect_timeout_min`] and [`ClientBuilder::connect_timeout`].
//! 4. **Exchange.** Each attempt opens one bidirectional stream, writes one request frame,
//!    finishes the send side, reads the 5-byte header, checks it against `max_frame_bytes`
//!    *before* allocating, reads the body and decodes one response. The attempt is bounded by
//!    the request's own `timeout_ms` when it has one, or else by the timeout the cluster reports
//!    for its coordinators (`ClusterInfo::request_timeout_ms`), plus
//!    [`ClientBuilder::attempt_margin`]: the node answers `QuorumNotReached` or `Unavailable`
//!    at its timeout, so the client waits just long enough to hear that answer, not longer.
//!    While it waits, it watches the connection: a node that has stopped acknowledging packets
//!    is dead, and the attempt fails as unreachable long before its bound.
//! 5. **Remember.** A failed dial, a broken or silent connection marks the node down (routed
//!    last) for a backoff that doubles per failure; when the backoff runs out the client dials
//!    it in the background and marks it up when that works (`health`). Every answer marks its
//!    node up and every read's latency feeds the hedging delay.
//!
//! # Failover
//!
//! How an attempt's failure moves the request on:
//!
//! - *connection-level* (unreachable, handshake timeout, connection lost or silent, stream
//!   reset): the next target is tried at once, without using a retry: a request should reach
//!   the one live node among five dead ones. Each target is tried at most once per request
//!   this way; when none is left the error is [`Error::NoNodeReachable`] listing every attempt.
//! - *retryable answer* ([`Error::is_retryable`]: `Overloaded`, `Unavailable`, `Timeout`):
//!   sleep with exponential backoff and jitter, then try the next target in the order (wrapping
//!   around), up to `retries` times.
//! - anything else (`InvalidRequest`, `QuorumNotReached`, `AuthenticationRefused`, ...) is
//!   returned at once.
//!
//! A fresh client (a CLI process) knows nothing about the cluster's health, so it does what
//! Happy Eyeballs does with addresses: it dials the first seed, and if that has not connected
//! after a short delay (50 ms at first, then one handshake bound, at most 250 ms) it dials the
//! next one too, and uses whichever connects first. A seed whose dial lost that race is
//! suspect, and so is the node at its address once the cluster is known, so the key's request
//! goes to another replica at once. The same race picks the coordinator when the key's first
//! replica does not connect: a dead seed or replica costs a fresh process one such delay, not a
//! timeout. A long-lived client already connected to a node that dies notices within the
//! silence timeout (at least 500 ms) and, for reads, sooner: a read with no answer after a high
//! percentile of recent read latencies ([`Hedge`], by default p99 between 20 ms and 500 ms) is
//! sent to the next replica too, and the node that lost the hedge is routed last until it
//! answers again. [`Client::stats`] counts hedges and races and shows each node's state; the
//! `tracing` events (`debug` for dials, races and hedges, `info` when a node is marked down or
//! up again) say why.
//!
//! # Writes and retries
//!
//! Every logical write draws one random [`RequestId`] and sends it with every retry. A node
//! that already holds a sibling written under that id treats the retry as done, so a write
//! retried after a lost answer does not become two siblings on that node. A write is never
//! hedged and never in flight at two nodes at once: it moves to another node only when its
//! attempt is over (refused, connection failed or went silent, time ran out), so a retry at a
//! second coordinator happens only where it happened before this client learned to fail over
//! fast. (Whether a retry that lands on another coordinator can store a second copy there is
//! the nodes' business: issue 8, defect 4.) Racing dials never sends a write twice: the
//! request goes to whichever connection completes first, and the other dials are abandoned
//! before anything is sent on them.
//!
//! If the future of a request is dropped, dials it was waiting for go on (they serve the next
//! request), and an attempt already sent runs to its end in the background so the client
//! learns about the node; its answer is discarded. A write dropped that way may or may not have
//! been applied.
//!
//! # Failure detection of the TLS kind
//!
//! In TLS 1.3 the server checks the client's certificate after the client already considers
//! the handshake done, so a refused certificate shows up either while connecting or on the
//! first stream, as a QUIC close carrying a TLS alert. Both places map that to
//! [`Error::AuthenticationRefused`], which is never retried: another node of the same cluster
//! would refuse the same certificate.

use crate::attempts::{Attempts, Counters};
use crate::connection::{encode_request, ConnectBounds, Nodes, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::failover::{Failover, Kind, Plan};
use crate::health::{DownBackoff, Health, NodeStats, RouteState};
use crate::protocol::{
    ReadOptions, ReplicaCopy, Request, RequestId, Response, SiblingValue, WriteOptions,
    DEFAULT_REQUEST_TIMEOUT_MS, REQUEST_TIMEOUT_MAX_MS,
};
use crate::route::{backoff_delay, Topology};
use crate::tls::{node_server_name, TlsIdentity, SEED_SERVER_NAME};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Default cap on one frame: 1 MiB of value plus 128 KiB for key, context and framing.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = (1 << 20) + (128 << 10);
/// Default time added to the node's timeout for one attempt: long enough for the node's own
/// `QuorumNotReached` or `Unavailable` answer to travel back.
pub const DEFAULT_ATTEMPT_MARGIN: Duration = Duration::from_millis(500);
/// Default ceiling on dialing one node, handshake included, and the bound before any handshake
/// has been seen.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default floor of the connect timeout sized to the network.
pub const DEFAULT_CONNECT_TIMEOUT_MIN: Duration = Duration::from_millis(100);
/// Default number of retries after a retryable answer.
pub const DEFAULT_RETRIES: u32 = 3;
/// Default first backoff delay; it doubles on every retry.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Default cap on one backoff delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Default time a node is marked down after its first failure; it doubles per failure.
pub const DEFAULT_DOWN_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Default cap on the time a node stays marked down before it is probed again.
pub const DEFAULT_DOWN_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default hedging: after the 99th percentile of recent read latencies, within 20-500 ms.
pub const DEFAULT_HEDGE: Hedge = Hedge::Percentile {
    percentile: 0.99,
    min: Duration::from_millis(20),
    max: Duration::from_millis(500),
};

/// When a read that has not been answered yet is sent to another replica as well (speculative
/// retry). Writes are never hedged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hedge {
    /// Never hedge.
    Never,
    /// Hedge a read unanswered after this long.
    After(Duration),
    /// Hedge a read unanswered after the `percentile` (0 to 1) of the last 256 reads' latencies,
    /// kept within `[min, max]`; `max` until 16 reads have been answered.
    Percentile {
        percentile: f64,
        min: Duration,
        max: Duration,
    },
}

/// The result of a read: the visible values and the context for the next write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetResult {
    /// Concurrent values of the key; tombstones are not siblings, so a missing or deleted key
    /// has none. More than one means concurrent writes: merge them and write back with
    /// `context` (see [`Client::resolve`]).
    pub siblings: Vec<SiblingValue>,
    /// Pass to the next `put` or `delete` of this key so it replaces exactly these siblings.
    pub context: Context,
}

/// Counters and per-node state of a client, from [`Client::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Requests started (each `get`, `put`, `delete`, `replicas` and cluster refresh is one).
    pub requests: u64,
    /// Reads sent to a second target because the first had not answered in time.
    pub hedges: u64,
    /// Dials started because an earlier dial of the same request was slow.
    pub connect_races: u64,
    /// Every node and seed the client has dialed, by name.
    pub nodes: Vec<NodeStats>,
}

/// Where the TLS identity comes from; loaded by [`ClientBuilder::build`].
#[derive(Debug)]
enum IdentitySource {
    Loaded(TlsIdentity),
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// Configures and connects a [`Client`].
///
/// ```no_run
/// # async fn example() -> quorumkv_client::Result<()> {
/// use quorumkv_client::ClientBuilder;
/// let client = ClientBuilder::new()
///     .seeds(["10.0.0.1:7000", "10.0.0.2:7000"])
///     .identity_files("ca.pem", "client.pem", "client.key")
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ClientBuilder {
    seeds: Vec<String>,
    identity: Option<IdentitySource>,
    settings: Settings,
}

/// The tunables, copied into the client.
#[derive(Clone, Copy, Debug)]
struct Settings {
    /// Overrides the per-attempt bound of requests without their own timeout.
    request_timeout: Option<Duration>,
    attempt_margin: Duration,
    connect_timeout_min: Duration,
    connect_timeout_max: Duration,
    retries: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    max_frame_bytes: u32,
    down_backoff: DownBackoff,
    hedge: Hedge,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            seeds: Vec::new(),
            identity: None,
            settings: Settings {
                request_timeout: None,
                attempt_margin: DEFAULT_ATTEMPT_MARGIN,
                connect_timeout_min: DEFAULT_CONNECT_TIMEOUT_MIN,
                connect_timeout_max: DEFAULT_CONNECT_TIMEOUT,
                retries: DEFAULT_RETRIES,
                backoff_base: DEFAULT_BACKOFF_BASE,
                backoff_max: DEFAULT_BACKOFF_MAX,
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                down_backoff: DownBackoff {
                    base: DEFAULT_DOWN_BACKOFF_BASE,
                    max: DEFAULT_DOWN_BACKOFF_MAX,
                },
                hedge: DEFAULT_HEDGE,
            },
        }
    }
}

impl ClientBuilder {
    /// A builder with the defaults above and no seeds or identity yet.
    pub fn new() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Adds one seed address, `host:port`. Seeds are only used to learn the cluster (and as a
    /// last resort when no known node answers); any node will do.
    pub fn seed(mut self, address: impl Into<String>) -> ClientBuilder {
        self.seeds.push(address.into());
        self
    }

    /// Adds several seed addresses. The first is dialed first; each next one is dialed as well
    /// when the earlier ones have not connected after a short delay.
    pub fn seeds<S: Into<String>>(
        mut self,
        addresses: impl IntoIterator<Item = S>,
    ) -> ClientBuilder {
        self.seeds.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// Uses an already loaded TLS identity.
    pub fn identity(mut self, identity: TlsIdentity) -> ClientBuilder {
        self.identity = Some(IdentitySource::Loaded(identity));
        self
    }

    /// Reads the CA, certificate and key PEM files when [`ClientBuilder::build`] runs.
    pub fn identity_files(
        mut self,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> ClientBuilder {
        self.identity = Some(IdentitySource::Files {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// A fixed client-side bound on one attempt of a request that carries no `timeout_ms` of
    /// its own. Without it the bound is the coordinator timeout the cluster reports (2 s if it
    /// reports none) plus [`ClientBuilder::attempt_margin`]. A request with a `timeout_ms` is
    /// always bounded by that plus the margin.
    pub fn request_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.settings.request_timeout = Some(timeout);
        self
    }

    /// What one attempt waits beyond the node's own timeout for its answer (default 500 ms).
    pub fn attempt_margin(mut self, margin: Duration) -> ClientBuilder {
        self.settings.attempt_margin = margin;
        self
    }

    /// Ceiling on resolving and connecting to one node, TLS handshake included, and the bound
    /// used before any handshake has been seen (default 2 s). Once handshakes have completed
    /// the bound is twice their smoothed bound (`srtt + 4 · rttvar`), between
    /// [`ClientBuilder::connect_timeout_min`] and this.
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.settings.connect_timeout_max = timeout;
        self
    }

    /// Floor of the connect timeout sized to the network (default 100 ms).
    pub fn connect_timeout_min(mut self, timeout: Duration) -> ClientBuilder {
        self.settings.connect_timeout_min = timeout;
        self
    }

    /// Retries after a retryable answer (default 3). Connection failures move on to the next
    /// node without using one.
    pub fn retries(mut self, retries: u32) -> ClientBuilder {
        self.settings.retries = retries;
        self
    }

    /// First backoff delay and the cap on any one delay (defaults 50 ms and 1 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> ClientBuilder {
        self.settings.backoff_base = base;
        self.settings.backoff_max = max;
        self
    }

    /// Largest frame sent or accepted (default 1 MiB + 128 KiB). Should match the nodes'.
    pub fn max_frame_bytes(mut self, max: u32) -> ClientBuilder {
        self.settings.max_frame_bytes = max;
        self
    }

    /// How long a node whose dial or connection failed is routed last before the client probes
    /// it: `base` after the first failure, doubling per consecutive failure up to `max`
    /// (defaults 1 s and 30 s).
    pub fn down_backoff(mut self, base: Duration, max: Duration) -> ClientBuilder {
        self.settings.down_backoff = DownBackoff { base, max };
        self
    }

    /// When an unanswered read is sent to another replica as well (default [`DEFAULT_HEDGE`]);
    /// [`Hedge::Never`] turns hedging off.
    pub fn hedge(mut self, hedge: Hedge) -> ClientBuilder {
        self.settings.hedge = hedge;
        self
    }

    /// Loads the TLS identity, asks the seeds (racing them, see the module documentation) for
    /// the cluster and learns it from the first that answers.
    ///
    /// Fails with [`Error::InvalidConfig`] without seeds, [`Error::Tls`] for bad key material,
    /// [`Error::NoNodeReachable`] when no seed answers and [`Error::AuthenticationRefused`] when
    /// a seed refuses the certificate.
    pub async fn build(self) -> Result<Client> {
        if self.seeds.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "no seed address given".into(),
            });
        }
        let identity = match self.identity {
            Some(IdentitySource::Loaded(identity)) => identity,
            Some(IdentitySource::Files { ca, cert, key }) => {
                TlsIdentity::from_files(ca, cert, key)?
            }
            None => {
                return Err(Error::Tls {
                    reason: "no TLS identity given (CA, certificate and key)".into(),
                })
            }
        };
        let mut quic = identity.quic_client_config()?;
        quic.transport_config(Arc::new(crate::connection::transport_config()));
        let settings = self.settings;
        let nodes = Nodes::new(
            quic,
            ConnectBounds {
                min: settings.connect_timeout_min,
                max: settings.connect_timeout_max,
            },
            settings.max_frame_bytes,
            Health::new(settings.down_backoff),
        );
        let client = Client {
            inner: Arc::new(Inner {
                settings,
                nodes: Arc::new(nodes),
                seeds: self.seeds,
                topology: RwLock::new(None),
                counters: Counters::default(),
            }),
        };
        client.refresh_cluster_info().await?;
        Ok(client)
    }
}

/// A connected QuorumKV client. Cheap to clone; clones share connections and cluster state.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    nodes: Arc<Nodes>,
    seeds: Vec<String>,
    /// `None` only while `build` fetches it the first time.
    topology: RwLock<Option<Arc<Topology>>>,
    counters: Counters,
}

impl Client {
    /// Starts configuring a client; see [`ClientBuilder`].
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// Reads `key`: its siblings (empty when missing or deleted) and the context to write with.
    pub async fn get(
        &self,
        keyspace: &str,
        key: impl AsRef<[u8]>,
        options: ReadOptions,
    ) -> Result<GetResult> {
        let key = key.as_ref();
        let request = Request::Get {
            keyspace: keyspace.to_string(),
            key: key.to_vec(),
            options,
        };
        let targets = self.targets_for_key(keyspace, key);
        let timeout = self.attempt_timeout(options.timeout_ms);
        match self.execute(&request, targets, Kind::Read, timeout).await? {
            Response::Got { siblings, context } => Ok(GetResult { siblings, context }),
            other => Err(unexpected("Got", &other)),
        }
    }

    /// Writes `value`. With the context of an earlier read it replaces exactly the siblings
    /// that read saw; without one it becomes a sibling of whatever is stored. Returns the
    /// context of the new value.
    ///
    /// On [`Error::QuorumNotReached`] the write may have been applied on some replicas.
    pub async fn put(
        &self,
        keyspace: &str,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
        context: Option<&Context>,
        options: WriteOptions,
    ) -> Result<Context> {
        let key = key.as_ref();
        let request = Request::Put {
            keyspace: keyspace.to_string(),
            key: key.to_vec(),
            value: value.into(),
            context: context.cloned(),
            request_id: new_request_id(),
            options,
        };
        self.write(keyspace, key, &request, options).await
    }

    /// Deletes `key` by writing a tombstone that replaces the siblings `context` covers (all
    /// that a read saw). Without a context the tombstone covers nothing it has not seen, so
    /// concurrent values survive: read first for a real delete. Returns the tombstone's context.
    pub async fn delete(
        &self,
        keyspace: &str,
        key: impl AsRef<[u8]>,
        context: Option<&Context>,
        options: WriteOptions,
    ) -> Result<Context> {
        let key = key.as_ref();
        let request = Request::Delete {
            keyspace: keyspace.to_string(),
            key: key.to_vec(),
            context: context.cloned(),
            request_id: new_request_id(),
            options,
        };
        self.write(keyspace, key, &request, options).await
    }

    /// Reads `key`, lets `merge` turn its siblings into one value, and writes that value back
    /// with the read's context, so it replaces every sibling the read saw. A missing key gives
    /// `merge` an empty slice and whatever it returns is written. Returns the write's context.
    ///
    /// Siblings written concurrently with this call survive it (they were not in the context);
    /// the next resolve merges them.
    pub async fn resolve<F>(
        &self,
        keyspace: &str,
        key: impl AsRef<[u8]>,
        read: ReadOptions,
        write: WriteOptions,
        merge: F,
    ) -> Result<Context>
    where
        F: FnOnce(&[SiblingValue]) -> Vec<u8>,
    {
        let key = key.as_ref();
        let current = self.get(keyspace, key, read).await?;
        let merged = merge(&current.siblings);
        self.put(keyspace, key, merged, Some(&current.context), write)
            .await
    }

    /// What every replica of `key` stores, each read directly from that replica, in
    /// preference-list order (admin inspection, `quorumkv admin replicas`). Unlike
    /// [`Client::get`] it triggers no read repair and changes nothing, so it shows a stale
    /// replica as stale. A replica that failed or did not answer in time is an entry saying so
    /// ([`ReplicaAnswer::Failed`](crate::ReplicaAnswer::Failed),
    /// [`ReplicaAnswer::TimedOut`](crate::ReplicaAnswer::TimedOut)), not an error.
    ///
    /// Any node can answer; the request goes to the key's replicas first, like a read.
    pub async fn replicas(
        &self,
        keyspace: &str,
        key: impl AsRef<[u8]>,
    ) -> Result<Vec<ReplicaCopy>> {
        let key = key.as_ref();
        let request = Request::Replicas {
            keyspace: keyspace.to_string(),
            key: key.to_vec(),
        };
        let targets = self.targets_for_key(keyspace, key);
        let timeout = self.attempt_timeout(None);
        // Never hedged, like a write: an inspection waits for every replica, up to the node's
        // timeout when one is silent, so it is slow by design; a hedge would only double it,
        // and its latency must not teach the read hedging delay.
        match self
            .execute(&request, targets, Kind::Write, timeout)
            .await?
        {
            Response::Replicas(copies) => Ok(copies),
            other => Err(unexpected("Replicas", &other)),
        }
    }

    /// Asks a node for the ring, the node addresses, the keyspaces and the coordinator timeout,
    /// and routes by them from now on. Known nodes are asked first, then the seeds.
    pub async fn refresh_cluster_info(&self) -> Result<()> {
        let targets = self.targets_any();
        let timeout = self.attempt_timeout(None);
        match self
            .execute(&Request::ClusterInfo, targets, Kind::Read, timeout)
            .await?
        {
            Response::ClusterInfo(info) => {
                let topology = Arc::new(Topology::new(info));
                *self
                    .inner
                    .topology
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(topology);
                Ok(())
            }
            other => Err(unexpected("ClusterInfo", &other)),
        }
    }

    /// The client's counters and what it knows about each node it dialed.
    pub fn stats(&self) -> ClientStats {
        let counters = &self.inner.counters;
        ClientStats {
            requests: counters.requests.load(Ordering::Relaxed),
            hedges: counters.hedges.load(Ordering::Relaxed),
            connect_races: counters.connect_races.load(Ordering::Relaxed),
            nodes: self.inner.nodes.health().snapshot(Instant::now()),
        }
    }

    /// Closes every connection, abandons dials in progress, and waits until each close has been
    /// sent (at most the connect timeout sized to the network), so the nodes free their state at
    /// once instead of after an idle timeout. It does not wait for the closes' draining period,
    /// nor for dials that never completed: a dead node has nobody to tell.
    pub async fn close(&self) {
        let settings = &self.inner.settings;
        // A dial to no particular node: the slowest handshake bound seen, or the ceiling.
        let linger = self.inner.nodes.health().connect_timeout(
            "",
            settings.connect_timeout_min,
            settings.connect_timeout_max,
        );
        let closed = self.inner.nodes.close_all();
        let deadline = tokio::time::Instant::now() + linger;
        while closed
            .iter()
            .any(|(connection, sent)| connection.stats().udp_tx.datagrams <= *sent)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn write(
        &self,
        keyspace: &str,
        key: &[u8],
        request: &Request,
        options: WriteOptions,
    ) -> Result<Context> {
        let targets = self.targets_for_key(keyspace, key);
        let timeout = self.attempt_timeout(options.timeout_ms);
        match self.execute(request, targets, Kind::Write, timeout).await? {
            Response::Written { context, .. } => Ok(context),
            other => Err(unexpected("Written", &other)),
        }
    }

    /// The per-attempt bound: the request's own timeout if it has one, or else the configured
    /// override or the cluster's coordinator timeout; plus the margin (see the module docs).
    fn attempt_timeout(&self, request_timeout_ms: Option<u32>) -> Duration {
        let settings = &self.inner.settings;
        let server = self
            .topology()
            .and_then(|topology| topology.request_timeout());
        attempt_bound(
            request_timeout_ms,
            settings.request_timeout,
            server,
            settings.attempt_margin,
        )
    }

    /// How long a read may go unanswered before it is hedged, if it may be.
    fn hedge_delay(&self) -> Option<Duration> {
        match self.inner.settings.hedge {
            Hedge::Never => None,
            Hedge::After(delay) => Some(delay),
            Hedge::Percentile {
                percentile,
                min,
                max,
            } => {
                let observed = self.inner.nodes.health().read_percentile(percentile);
                Some(observed.map_or(max, |delay| delay.clamp(min, max.max(min))))
            }
        }
    }

    fn topology(&self) -> Option<Arc<Topology>> {
        self.inner
            .topology
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn targets_for_key(&self, keyspace: &str, key: &[u8]) -> Vec<Target> {
        let topology = self.topology();
        let now = Instant::now();
        let ids = match &topology {
            Some(topology) => {
                let health = self.inner.nodes.health();
                topology.order_for_key(keyspace, key, |id| routed_last(&health, topology, id, now))
            }
            None => Vec::new(),
        };
        self.targets(topology.as_deref(), ids, now)
    }

    fn targets_any(&self) -> Vec<Target> {
        let topology = self.topology();
        let now = Instant::now();
        let ids = match &topology {
            Some(topology) => {
                let health = self.inner.nodes.health();
                topology.order_any(|id| routed_last(&health, topology, id, now))
            }
            None => Vec::new(),
        };
        self.targets(topology.as_deref(), ids, now)
    }

    /// Turns node ids into targets, appends the seeds that are not known nodes' addresses, and
    /// starts a background probe of every target that is down and due for one.
    fn targets(&self, topology: Option<&Topology>, ids: Vec<String>, now: Instant) -> Vec<Target> {
        let mut targets: Vec<Target> = match topology {
            Some(topology) => ids
                .into_iter()
                .filter_map(|id| {
                    let address = topology.address(&id)?.to_string();
                    Some(Target {
                        server_name: node_server_name(&id),
                        label: id,
                        address,
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        for seed in &self.inner.seeds {
            let known = topology.is_some_and(|topology| topology.has_address(seed));
            if !known && !targets.iter().any(|target| &target.label == seed) {
                targets.push(Target {
                    label: seed.clone(),
                    address: seed.clone(),
                    server_name: SEED_SERVER_NAME.to_string(),
                });
            }
        }
        for target in &targets {
            if self.inner.nodes.route_state(&target.label, now) == RouteState::ProbeDue {
                self.inner.nodes.probe(target);
            }
        }
        targets
    }

    /// Runs one request over `targets` under the failover policy in the module docs: the pure
    /// `Failover` decides, `attempts` carries its decisions out.
    async fn execute(
        &self,
        request: &Request,
        targets: Vec<Target>,
        kind: Kind,
        attempt_timeout: Duration,
    ) -> Result<Response> {
        let inner = &self.inner;
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        // Encoded once: every attempt sends the same bytes, request id included.
        let frame = encode_request(request, inner.settings.max_frame_bytes)?;
        let failover = Failover::new(self.plan(kind, &targets));
        let attempts = Attempts::new(
            &inner.nodes,
            &inner.counters,
            &targets,
            frame,
            kind,
            attempt_timeout,
        );
        attempts.run(failover).await
    }

    /// The failover plan of one request: its retries' backoffs and the race and hedge delays
    /// sized from what the client has seen.
    fn plan(&self, kind: Kind, targets: &[Target]) -> Plan {
        let settings = &self.inner.settings;
        // Each of these takes the health lock, which is not reentrant: one at a time.
        let connect_race_delay = self
            .inner
            .nodes
            .health()
            .connect_race_delay(targets.first().map_or("", |target| &target.label));
        let hedge_delay = match kind {
            Kind::Read => self.hedge_delay(),
            Kind::Write => None,
        };
        Plan {
            kind,
            targets: targets.len(),
            backoffs: (0..settings.retries)
                .map(|retry| {
                    backoff_delay(
                        retry,
                        settings.backoff_base,
                        settings.backoff_max,
                        rand::random::<f64>(),
                    )
                })
                .collect(),
            connect_race_delay,
            hedge_delay,
        }
    }
}

/// Whether node `id` goes to the end of an order: it is down, due for a probe or suspect, or
/// was just found so as a seed under its address (a fresh client dials seeds by address before
/// it knows their ids). A seed's state counts only until its period runs out: seeds that are
/// known nodes are never dialed again, so nothing would clear it.
fn routed_last(health: &Health, topology: &Topology, id: &str, now: Instant) -> bool {
    health.is_down(id, now)
        || topology.address(id).is_some_and(|address| {
            matches!(
                health.route_state(address, now),
                RouteState::Down | RouteState::Suspect
            )
        })
}

/// The per-attempt bound: the request's own timeout (clamped as the node clamps it) plus
/// `margin`; or else the builder's `fixed` bound; or else the cluster's coordinator timeout
/// (the node's default if the cluster reports none) plus `margin`.
fn attempt_bound(
    request_timeout_ms: Option<u32>,
    fixed: Option<Duration>,
    server: Option<Duration>,
    margin: Duration,
) -> Duration {
    match (request_timeout_ms, fixed) {
        (Some(ms), _) => Duration::from_millis(u64::from(ms).min(REQUEST_TIMEOUT_MAX_MS)) + margin,
        (None, Some(fixed)) => fixed,
        (None, None) => {
            server.unwrap_or(Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS)) + margin
        }
    }
}

fn unexpected(expected: &str, found: &Response) -> Error {
    let found = match found {
        Response::Got { .. } => "Got",
        Response::Written { .. } => "Written",
        Response::ClusterInfo(_) => "ClusterInfo",
        Response::Replicas(_) => "Replicas",
        Response::Error(_) => "Error",
    };
    Error::UnexpectedResponse {
        reason: format!("expected {expected}, the node answered {found}"),
    }
}

/// A fresh id for one logical write, shared by all its retries.
fn new_request_id() -> RequestId {
    RequestId(rand::random())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_bound_follows_the_request_then_the_override_then_the_cluster() {
        let ms = Duration::from_millis;
        let margin = ms(500);
        // The request's own timeout wins, shorter or longer than anything else.
        assert_eq!(
            attempt_bound(Some(100), Some(ms(9000)), Some(ms(5000)), margin),
            ms(600)
        );
        assert_eq!(
            attempt_bound(Some(30_000), None, Some(ms(2000)), margin),
            ms(30_500)
        );
        // ...clamped as the node clamps it.
        assert_eq!(
            attempt_bound(Some(u32::MAX), None, None, margin),
            ms(REQUEST_TIMEOUT_MAX_MS) + margin
        );
        // Without one: the builder's override, as given.
        assert_eq!(
            attempt_bound(None, Some(ms(9000)), Some(ms(5000)), margin),
            ms(9000)
        );
        // Or the cluster's coordinator timeout plus the margin, 2 s if it reports none.
        assert_eq!(attempt_bound(None, None, Some(ms(5000)), margin), ms(5500));
        assert_eq!(
            attempt_bound(None, None, None, margin),
            ms(DEFAULT_REQUEST_TIMEOUT_MS) + margin
        );
    }

    #[test]
    fn request_ids_are_random() {
        assert_ne!(new_request_id(), new_request_id());
    }
}
