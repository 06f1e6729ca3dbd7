//! The async client: connections, routing, timeouts and retries around the wire protocol.
//!
//! # Life of a request
//!
//! 1. **Route.** [`Client::put`] (and the others) compute the key's token, look up the
//!    keyspace's N and ask the ring for the preference list (see `route`). That gives an order
//!    of nodes: replicas first, then every other node, recently failed nodes last, seeds that
//!    are not known nodes at the very end.
//! 2. **Connect.** One QUIC connection per node is cached and shared by every request to it
//!    (QUIC multiplexes streams, so there is no pool to size). A closed connection is replaced
//!    on next use. Dialing is bounded by `connect_timeout` and uses the node's own TLS server
//!    name, `<id>.node.quorumkv` (seeds: `node.quorumkv`).
//! 3. **Exchange.** Each attempt opens one bidirectional stream, writes one request frame,
//!    finishes the send side, reads the 5-byte header, checks it against `max_frame_bytes`
//!    *before* allocating, reads the body and decodes one response. The attempt is bounded by
//!    the client's `request_timeout` (or the request's own `timeout_ms` plus a second, if that
//!    is longer, so the client never gives up before the coordinator does).
//! 4. **Retry.** What happens next depends on how the attempt failed:
//!    - *connection-level* (unreachable, handshake timeout, connection lost, stream reset): the
//!      node is avoided for a while and the request moves on to the next node at once. This
//!      does not use up a retry: a request should reach the one live node among five dead ones.
//!      Each node is tried at most once per request this way; when none is left the error is
//!      [`Error::NoNodeReachable`] listing every attempt.
//!    - *retryable answer* ([`Error::is_retryable`]: `Overloaded`, `Unavailable`, `Timeout`):
//!      sleep with exponential backoff and jitter, then try the next node in the order
//!      (wrapping around), up to `retries` times.
//!    - anything else (`InvalidRequest`, `QuorumNotReached`, `AuthenticationRefused`, ...) is
//!      returned at once.
//!
//! # Writes and retries
//!
//! Every logical write draws one random [`RequestId`] and sends it with every retry. A node
//! that already holds a sibling written under that id treats the retry as done, so a write
//! retried after a lost answer never becomes two siblings. That is what makes it safe to retry
//! a write whose fate is unknown (connection lost after sending, timeout).
//!
//! # Failure detection of the TLS kind
//!
//! In TLS 1.3 the server checks the client's certificate after the client already considers
//! the handshake done, so a refused certificate shows up either while connecting or on the
//! first stream, as a QUIC close carrying a TLS alert. Both places map that to
//! [`Error::AuthenticationRefused`], which is never retried: another node of the same cluster
//! would refuse the same certificate.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::frame::{decode_body, decode_header, encode_frame, FRAME_HEADER_LEN};
use crate::protocol::{
    ErrorKind, ErrorReply, ReadOptions, Request, RequestId, Response, SiblingValue, WriteOptions,
};
use crate::route::{backoff_delay, Avoidance, Topology};
use crate::tls::{node_server_name, TlsIdentity, SEED_SERVER_NAME};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Default cap on one frame: 1 MiB of value plus 128 KiB for key, context and framing.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = (1 << 20) + (128 << 10);
/// Default client-side bound on one attempt; longer than the node's default 2 s coordinator
/// timeout, so a node's own `QuorumNotReached` or `Unavailable` answer arrives first.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on resolving and dialing one node, handshake included.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of retries after a retryable answer.
pub const DEFAULT_RETRIES: u32 = 3;
/// Default first backoff delay; it doubles on every retry.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Default cap on one backoff delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Default time a node is tried last after a connection-level failure.
pub const DEFAULT_AVOID_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// The QUIC application close code a node uses when a certificate carries no usable identity
/// (the node's `close_code::NOT_A_NODE`). Kept in step with the node by hand.
const CLOSE_IDENTITY_REFUSED: u32 = 0x10;
/// QUIC transport error codes `0x100..=0x1ff` carry a TLS alert (RFC 9001, section 4.8).
const CRYPTO_ERROR_RANGE: std::ops::RangeInclusive<u64> = 0x100..=0x1ff;

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
    request_timeout: Duration,
    connect_timeout: Duration,
    retries: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    max_frame_bytes: u32,
    avoid_after_failure: Duration,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            seeds: Vec::new(),
            identity: None,
            settings: Settings {
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                retries: DEFAULT_RETRIES,
                backoff_base: DEFAULT_BACKOFF_BASE,
                backoff_max: DEFAULT_BACKOFF_MAX,
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                avoid_after_failure: DEFAULT_AVOID_AFTER_FAILURE,
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

    /// Adds several seed addresses, tried in the order given.
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

    /// Client-side bound on one attempt (default 5 s). A request whose `timeout_ms` option is
    /// longer gets that plus one second instead.
    pub fn request_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.settings.request_timeout = timeout;
        self
    }

    /// Bound on resolving and connecting to one node, TLS handshake included (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.settings.connect_timeout = timeout;
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

    /// How long a node whose connection failed is tried last (default 2 s).
    pub fn avoid_after_failure(mut self, period: Duration) -> ClientBuilder {
        self.settings.avoid_after_failure = period;
        self
    }

    /// Loads the TLS identity, contacts the first seed that answers and learns the cluster.
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
        let client = Client {
            inner: Arc::new(Inner {
                settings: self.settings,
                quic: identity.quic_client_config()?,
                endpoints: Endpoints::default(),
                seeds: self.seeds,
                topology: RwLock::new(None),
                links: Mutex::new(Links::default()),
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
    quic: quinn::ClientConfig,
    endpoints: Endpoints,
    seeds: Vec<String>,
    /// `None` only while `build` fetches it the first time.
    topology: RwLock<Option<Arc<Topology>>>,
    links: Mutex<Links>,
}

/// Cached connections and recent failures, keyed by target label.
#[derive(Debug, Default)]
struct Links {
    connections: HashMap<String, quinn::Connection>,
    avoidance: Avoidance,
}

/// One UDP endpoint per address family, bound on first use.
#[derive(Debug, Default)]
struct Endpoints {
    v4: Mutex<Option<quinn::Endpoint>>,
    v6: Mutex<Option<quinn::Endpoint>>,
}

impl Endpoints {
    fn for_address(&self, address: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let (slot, local) = match address {
            SocketAddr::V4(_) => (&self.v4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            SocketAddr::V6(_) => (&self.v6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))),
        };
        let mut slot = lock(slot);
        if let Some(endpoint) = slot.as_ref() {
            return Ok(endpoint.clone());
        }
        let endpoint = quinn::Endpoint::client(local)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    fn all(&self) -> Vec<quinn::Endpoint> {
        [&self.v4, &self.v6]
            .into_iter()
            .filter_map(|slot| lock(slot).clone())
            .collect()
    }
}

/// A mutex guarding plain maps: a panic elsewhere cannot leave them inconsistent, so recover
/// the guard instead of propagating the poison.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Somewhere to send a request: a known node or a seed.
#[derive(Clone, Debug)]
struct Target {
    /// Node id, or the address for a seed (addresses contain ':', node ids cannot).
    label: String,
    address: String,
    server_name: String,
}

/// How one attempt failed.
#[derive(Debug)]
enum AttemptError {
    /// The node could not be reached or the connection broke: try another node.
    Connection(String),
    /// The client's own per-attempt bound ran out.
    Timeout,
    /// Stop and report.
    Fatal(Error),
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
        match self
            .execute(&request, targets, self.attempt_timeout(options.timeout_ms))
            .await?
        {
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

    /// Asks a node for the ring, the node addresses and the keyspaces, and routes by them from
    /// now on. Known nodes are asked first, then the seeds.
    pub async fn refresh_cluster_info(&self) -> Result<()> {
        let targets = self.targets_any();
        match self
            .execute(
                &Request::ClusterInfo,
                targets,
                self.inner.settings.request_timeout,
            )
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

    /// Closes every connection and waits (at most `connect_timeout`) for the nodes to be told,
    /// so they free their state at once instead of after an idle timeout.
    pub async fn close(&self) {
        let connections: Vec<quinn::Connection> = lock(&self.inner.links)
            .connections
            .drain()
            .map(|(_, connection)| connection)
            .collect();
        for connection in connections {
            connection.close(0u32.into(), b"client closing");
        }
        for endpoint in self.inner.endpoints.all() {
            let _ = tokio::time::timeout(self.inner.settings.connect_timeout, endpoint.wait_idle())
                .await;
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
        match self
            .execute(request, targets, self.attempt_timeout(options.timeout_ms))
            .await?
        {
            Response::Written { context } => Ok(context),
            other => Err(unexpected("Written", &other)),
        }
    }

    /// The per-attempt bound: never shorter than what the request asked the coordinator to wait.
    fn attempt_timeout(&self, request_timeout_ms: Option<u32>) -> Duration {
        let asked = request_timeout_ms
            .map(|ms| Duration::from_millis(u64::from(ms)) + Duration::from_secs(1))
            .unwrap_or_default();
        self.inner.settings.request_timeout.max(asked)
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
        let ids = match &topology {
            Some(topology) => {
                let links = lock(&self.inner.links);
                let now = Instant::now();
                topology.order_for_key(keyspace, key, |id| links.avoidance.is_avoided(id, now))
            }
            None => Vec::new(),
        };
        self.targets(topology.as_deref(), ids)
    }

    fn targets_any(&self) -> Vec<Target> {
        let topology = self.topology();
        let ids = match &topology {
            Some(topology) => {
                let links = lock(&self.inner.links);
                let now = Instant::now();
                topology.order_any(|id| links.avoidance.is_avoided(id, now))
            }
            None => Vec::new(),
        };
        self.targets(topology.as_deref(), ids)
    }

    /// Turns node ids into targets and appends the seeds that are not known nodes' addresses.
    fn targets(&self, topology: Option<&Topology>, ids: Vec<String>) -> Vec<Target> {
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
        targets
    }

    /// Sends `request` to `targets` in order under the retry policy in the module docs.
    async fn execute(
        &self,
        request: &Request,
        targets: Vec<Target>,
        attempt_timeout: Duration,
    ) -> Result<Response> {
        let settings = self.inner.settings;
        // Encoded once: every retry sends the same bytes, request id included.
        let frame = encode_frame(request, settings.max_frame_bytes)?;
        let mut unreachable: HashSet<usize> = HashSet::new();
        let mut attempts: Vec<(String, String)> = Vec::new();
        let mut last_answer: Option<Error> = None;
        let mut retries_used = 0u32;
        let mut cursor = 0usize;
        loop {
            let next = (0..targets.len())
                .map(|offset| (cursor + offset) % targets.len())
                .find(|index| !unreachable.contains(index));
            let Some(index) = next else {
                // Every node failed at the connection level at least once; if one of them gave
                // a retryable answer before that, that answer says more than "unreachable".
                return Err(last_answer.unwrap_or(Error::NoNodeReachable { attempts }));
            };
            cursor = index + 1;
            let target = &targets[index];
            let error = match self.attempt(target, &frame, attempt_timeout).await {
                Ok(Response::Error(reply)) => reply_error(reply),
                Ok(response) => return Ok(response),
                Err(AttemptError::Connection(reason)) => {
                    unreachable.insert(index);
                    attempts.push((target.label.clone(), reason));
                    continue;
                }
                Err(AttemptError::Timeout) => Error::Timeout,
                Err(AttemptError::Fatal(error)) => return Err(error),
            };
            if !error.is_retryable() || retries_used >= settings.retries {
                return Err(error);
            }
            let delay = backoff_delay(
                retries_used,
                settings.backoff_base,
                settings.backoff_max,
                rand::random::<f64>(),
            );
            retries_used += 1;
            last_answer = Some(error);
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt on one target: connect (or reuse), exchange one frame each way.
    async fn attempt(
        &self,
        target: &Target,
        frame: &[u8],
        timeout: Duration,
    ) -> Result<Response, AttemptError> {
        let connection = match self.connection(target).await {
            Ok(connection) => connection,
            Err(error) => {
                self.note_failure(target, &error);
                return Err(error);
            }
        };
        let max = self.inner.settings.max_frame_bytes;
        let outcome = match tokio::time::timeout(timeout, exchange(&connection, frame, max)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(error.into_attempt_error(&target.label)),
            Err(_elapsed) => Err(AttemptError::Timeout),
        };
        match &outcome {
            Ok(_) => lock(&self.inner.links).avoidance.forgive(&target.label),
            Err(error) => self.note_failure(target, error),
        }
        outcome
    }

    /// Bookkeeping after a failed attempt: avoid unreachable nodes, and stop reusing a
    /// connection that broke or timed out (the next request dials afresh, which detects a dead
    /// node within `connect_timeout` instead of `request_timeout`).
    fn note_failure(&self, target: &Target, error: &AttemptError) {
        let mut links = lock(&self.inner.links);
        match error {
            AttemptError::Connection(_) => {
                links.connections.remove(&target.label);
                let period = self.inner.settings.avoid_after_failure;
                links.avoidance.avoid(&target.label, Instant::now(), period);
            }
            AttemptError::Timeout => {
                links.connections.remove(&target.label);
            }
            AttemptError::Fatal(_) => {}
        }
    }

    /// The cached connection to `target`, or a new one.
    async fn connection(&self, target: &Target) -> Result<quinn::Connection, AttemptError> {
        let cached = lock(&self.inner.links)
            .connections
            .get(&target.label)
            .filter(|connection| connection.close_reason().is_none())
            .cloned();
        if let Some(connection) = cached {
            return Ok(connection);
        }
        let timeout = self.inner.settings.connect_timeout;
        let connection = match tokio::time::timeout(timeout, self.dial(target)).await {
            Ok(result) => result?,
            Err(_elapsed) => {
                return Err(AttemptError::Connection(format!(
                    "no connection to {} within {} ms",
                    target.address,
                    timeout.as_millis()
                )))
            }
        };
        // Two requests may dial the same node at once; the later connection wins the cache and
        // the other closes when its request drops it. Rare, and harmless.
        lock(&self.inner.links)
            .connections
            .insert(target.label.clone(), connection.clone());
        Ok(connection)
    }

    /// Resolves `target.address` (every time: DNS may have moved it) and connects to the first
    /// address that completes a handshake.
    async fn dial(&self, target: &Target) -> Result<quinn::Connection, AttemptError> {
        let addresses = tokio::net::lookup_host(target.address.as_str())
            .await
            .map_err(|e| {
                AttemptError::Connection(format!("cannot resolve {}: {e}", target.address))
            })?;
        let mut last =
            AttemptError::Connection(format!("{} resolved to no address", target.address));
        for address in addresses {
            let endpoint = self
                .inner
                .endpoints
                .for_address(address)
                .map_err(|e| AttemptError::Fatal(Error::Io(e)))?;
            let connecting = match endpoint.connect_with(
                self.inner.quic.clone(),
                address,
                &target.server_name,
            ) {
                Ok(connecting) => connecting,
                Err(e) => {
                    last = AttemptError::Connection(format!("cannot connect to {address}: {e}"));
                    continue;
                }
            };
            match connecting.await {
                Ok(connection) => return Ok(connection),
                Err(e) => match classify_connection_error(&target.label, &e) {
                    fatal @ AttemptError::Fatal(_) => return Err(fatal),
                    other => last = other,
                },
            }
        }
        Err(last)
    }
}

/// How one exchange on a stream failed, before deciding what it means for the request.
#[derive(Debug)]
enum ExchangeError {
    Connection(quinn::ConnectionError),
    /// The stream broke (reset, finished without an answer) while the connection lives on.
    Stream(String),
    /// The answer's bytes are wrong.
    Frame(Error),
}

impl ExchangeError {
    fn into_attempt_error(self, label: &str) -> AttemptError {
        match self {
            ExchangeError::Connection(e) => classify_connection_error(label, &e),
            ExchangeError::Stream(reason) => AttemptError::Connection(reason),
            ExchangeError::Frame(error) => AttemptError::Fatal(error),
        }
    }
}

/// One request frame out, one response frame back, on a fresh bidirectional stream.
async fn exchange(
    connection: &quinn::Connection,
    frame: &[u8],
    max_frame_bytes: u32,
) -> Result<Response, ExchangeError> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(ExchangeError::Connection)?;
    match send.write_all(frame).await {
        Ok(()) => {
            // Finishing only fails if the stream is already closed; the read below says how.
            let _ = send.finish();
        }
        // The node stopped reading (for example it refused an oversized frame); its answer on
        // the receive side says why.
        Err(quinn::WriteError::Stopped(_)) => {}
        Err(quinn::WriteError::ConnectionLost(e)) => return Err(ExchangeError::Connection(e)),
        Err(e) => {
            return Err(ExchangeError::Stream(format!(
                "sending the request failed: {e}"
            )))
        }
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    read_exact(&mut recv, &mut header).await?;
    // Checked before allocating: a hostile or broken node cannot make us allocate more than
    // `max_frame_bytes`.
    let len = decode_header(header, max_frame_bytes).map_err(ExchangeError::Frame)?;
    let mut body = vec![0u8; len];
    read_exact(&mut recv, &mut body).await?;
    decode_body(&body).map_err(ExchangeError::Frame)
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), ExchangeError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(read) => ExchangeError::Stream(format!(
            "the node closed the stream after {read} bytes of its answer"
        )),
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e)) => {
            ExchangeError::Connection(e)
        }
        quinn::ReadExactError::ReadError(e) => {
            ExchangeError::Stream(format!("reading the answer failed: {e}"))
        }
    })
}

/// Tells a refused TLS handshake (fatal) from a connection that merely failed (try elsewhere).
fn classify_connection_error(label: &str, error: &quinn::ConnectionError) -> AttemptError {
    use quinn::ConnectionError as E;
    match error {
        // Our side's TLS refused the node's certificate (or the handshake otherwise failed).
        E::TransportError(e) if CRYPTO_ERROR_RANGE.contains(&u64::from(e.code)) => {
            AttemptError::Fatal(Error::AuthenticationRefused {
                reason: format!(
                    "TLS handshake with {label} failed: {} ({e})",
                    alert_name(u64::from(e.code))
                ),
            })
        }
        // The node's TLS refused our certificate, and said so with an alert.
        E::ConnectionClosed(close) if CRYPTO_ERROR_RANGE.contains(&u64::from(close.error_code)) => {
            AttemptError::Fatal(Error::AuthenticationRefused {
                reason: format!(
                    "{label} refused the TLS handshake: {} ({close})",
                    alert_name(u64::from(close.error_code))
                ),
            })
        }
        // The handshake passed but the node found no usable identity in our certificate.
        E::ApplicationClosed(close) if close.error_code == CLOSE_IDENTITY_REFUSED.into() => {
            AttemptError::Fatal(Error::AuthenticationRefused {
                reason: format!("{label} refused our certificate: {close}"),
            })
        }
        other => AttemptError::Connection(format!("connection to {label} failed: {other}")),
    }
}

/// The TLS alert's name (`UnknownCA`, `BadCertificate`, ...) from a QUIC crypto error code.
fn alert_name(code: u64) -> String {
    // The low byte of a crypto error code is the alert; `CRYPTO_ERROR_RANGE` was checked.
    let alert = rustls::AlertDescription::from((code & 0xff) as u8);
    format!("TLS alert {alert:?}")
}

/// The error a node's [`ErrorReply`] stands for.
fn reply_error(reply: ErrorReply) -> Error {
    let message = reply.message;
    match reply.kind {
        ErrorKind::InvalidRequest => Error::InvalidRequest { message },
        ErrorKind::QuorumNotReached => {
            let (required, acked, durable_required, durable_acked) = reply
                .quorum
                .map(|q| (q.required, q.acked, q.durable_required, q.durable_acked))
                .unwrap_or_default();
            Error::QuorumNotReached {
                required,
                acked,
                durable_required,
                durable_acked,
                message,
            }
        }
        ErrorKind::Overloaded => Error::Overloaded { message },
        ErrorKind::Unavailable => Error::Unavailable { message },
        ErrorKind::Internal => Error::Internal { message },
    }
}

fn unexpected(expected: &str, found: &Response) -> Error {
    let found = match found {
        Response::Got { .. } => "Got",
        Response::Written { .. } => "Written",
        Response::ClusterInfo(_) => "ClusterInfo",
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
    use crate::protocol::QuorumShortfall;

    #[test]
    fn replies_map_to_errors_with_their_shortfall() {
        let error = reply_error(ErrorReply {
            kind: ErrorKind::QuorumNotReached,
            message: "1 of 2".into(),
            quorum: Some(QuorumShortfall {
                required: 2,
                acked: 1,
                durable_required: 1,
                durable_acked: 1,
            }),
        });
        assert!(matches!(
            error,
            Error::QuorumNotReached {
                required: 2,
                acked: 1,
                durable_required: 1,
                durable_acked: 1,
                ..
            }
        ));
        assert!(!error.is_retryable());
        for (kind, retryable) in [
            (ErrorKind::InvalidRequest, false),
            (ErrorKind::Overloaded, true),
            (ErrorKind::Unavailable, true),
            (ErrorKind::Internal, false),
        ] {
            let error = reply_error(ErrorReply {
                kind,
                message: String::new(),
                quorum: None,
            });
            assert_eq!(error.is_retryable(), retryable, "{kind:?}");
        }
    }

    #[test]
    fn tls_alerts_are_authentication_refusals_and_other_closes_are_not() {
        let refused = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(48),
            frame_type: None,
            reason: Default::default(),
        });
        match classify_connection_error("n1", &refused) {
            AttemptError::Fatal(Error::AuthenticationRefused { reason }) => {
                assert!(reason.contains("UnknownCA"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let identity = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: CLOSE_IDENTITY_REFUSED.into(),
            reason: Default::default(),
        });
        assert!(matches!(
            classify_connection_error("n1", &identity),
            AttemptError::Fatal(Error::AuthenticationRefused { .. })
        ));
        for transient in [
            quinn::ConnectionError::TimedOut,
            quinn::ConnectionError::Reset,
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: 0u32.into(),
                reason: Default::default(),
            }),
        ] {
            assert!(matches!(
                classify_connection_error("n1", &transient),
                AttemptError::Connection(_)
            ));
        }
    }

    #[test]
    fn request_ids_are_random() {
        assert_ne!(new_request_id(), new_request_id());
    }
}
