//! Connections to nodes: one shared dial per node, one exchange per attempt, and the health
//! bookkeeping both feed.
//!
//! # One dial per node
//!
//! [`Nodes`] keeps, per target label (a node id, or a seed's address), either an established
//! QUIC connection, shared by every request to that node (QUIC multiplexes streams, so there is
//! no pool to size), or the one dial in progress, which every request that needs the node
//! waits on. A dial runs as its own task: a request that stops waiting for it (because a racing
//! dial to another node won, see `failover`) does not cancel it, so it still leaves behind a
//! cached connection or a node marked down. A dial is bounded by the connect timeout sized to
//! the network (see `health`), resolves the address every time (DNS may have moved it) and
//! uses the node's own TLS server name, `<id>.node.quorumkv` (seeds: `node.quorumkv`).
//!
//! # A dead connection
//!
//! A node killed with `kill -9`, or cut off, sends nothing more, and QUIC only notices at its
//! idle timeout. Three things catch it sooner:
//!
//! - **Silence while a request is outstanding.** Every request watches its connection: if the
//!   client has sent ack-eliciting frames (the request itself, keep-alives, retransmissions)
//!   and no packet at all has come back for the *silence timeout*, the node is gone. A live
//!   node acknowledges within its ack delay (25 ms) plus a round trip even while it works on a
//!   slow request, so this cannot mistake a slow answer for a dead node, only a process that is
//!   stalled for the whole timeout. The connection is closed and the attempt fails as
//!   unreachable. The silence timeout is `8 · (rtt + 25 ms)` within [`SILENCE_TIMEOUT_MIN`] and
//!   the connect timeout's ceiling.
//! - **Keep-alives.** The client sends a QUIC keep-alive after [`KEEP_ALIVE_INTERVAL`] without
//!   traffic and closes a connection that heard nothing for [`IDLE_TIMEOUT`], so an idle
//!   connection to a dead node is found closed when next needed, and redialed.
//! - **Marking down.** Either way, and on every failed dial, the node is marked down (see
//!   `health`) and routed last until a probe finds it back.

use crate::error::Error;
use crate::frame::{decode_body, encode_frame};
use crate::frame_io::{read_frame, Deadline, ReadFrameError};
use crate::health::{Health, Marked, RouteState};
use crate::protocol::{Request, Response};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The QUIC application close code a node uses when a certificate carries no usable identity
/// (the node's `close_code::NOT_A_NODE`). Kept in step with the node by hand.
pub(crate) const CLOSE_IDENTITY_REFUSED: u32 = 0x10;
/// QUIC transport error codes `0x100..=0x1ff` carry a TLS alert (RFC 9001, section 4.8).
const CRYPTO_ERROR_RANGE: std::ops::RangeInclusive<u64> = 0x100..=0x1ff;
/// The close code this client sends when it gives up on a silent connection.
const CLOSE_SILENT: u32 = 1;

/// The client sends a keep-alive after this long without receiving anything.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// A connection that heard nothing for this long is closed (the node's is 30 s; the lower of
/// the two applies).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(6);
/// The smallest silence timeout: a node stalled for less (a busy machine, a long pause of its
/// runtime) is not called dead.
pub(crate) const SILENCE_TIMEOUT_MIN: Duration = Duration::from_millis(500);
/// How long a node may take to acknowledge (QUIC's default `max_ack_delay`).
const ACK_DELAY_MAX: Duration = Duration::from_millis(25);

/// A mutex guarding plain maps: a panic elsewhere cannot leave them inconsistent, so recover
/// the guard instead of propagating the poison.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Somewhere to send a request: a known node or a seed.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// Node id, or the address for a seed (addresses contain ':', node ids cannot).
    pub(crate) label: String,
    pub(crate) address: String,
    pub(crate) server_name: String,
}

/// How one attempt failed.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// The node could not be reached, or the connection broke or went silent: try another.
    Unreachable(String),
    /// The client's own per-attempt bound ran out.
    Timeout,
    /// Stop and report.
    Fatal(Error),
}

/// How a dial failed, in a form every request waiting on the dial can have a copy of.
#[derive(Clone, Debug)]
pub(crate) enum DialError {
    Unreachable(String),
    /// The TLS handshake or the node refused: never retried elsewhere.
    Refused(String),
    /// A local failure, such as binding the UDP socket.
    Local(std::io::ErrorKind, String),
}

impl From<DialError> for AttemptError {
    fn from(error: DialError) -> AttemptError {
        match error {
            DialError::Unreachable(reason) => AttemptError::Unreachable(reason),
            DialError::Refused(reason) => {
                AttemptError::Fatal(Error::AuthenticationRefused { reason })
            }
            DialError::Local(kind, reason) => {
                AttemptError::Fatal(Error::Io(std::io::Error::new(kind, reason)))
            }
        }
    }
}

type DialResult = Option<Result<quinn::Connection, DialError>>;

/// What the client holds for one label.
#[derive(Debug)]
enum Link {
    Ready(quinn::Connection),
    Dialing {
        /// Tells this dial from a later one for the same label.
        generation: u64,
        result: watch::Receiver<DialResult>,
        task: tokio::task::AbortHandle,
    },
}

/// The bounds on dialing, from the builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectBounds {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
}

/// Everything the client holds per node: connections, dials in progress, and health.
#[derive(Debug)]
pub(crate) struct Nodes {
    endpoints: Endpoints,
    quic: quinn::ClientConfig,
    connect: ConnectBounds,
    max_frame_bytes: u32,
    links: Mutex<Links>,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Links {
    map: HashMap<String, Link>,
    next_generation: u64,
}

impl Nodes {
    pub(crate) fn new(
        quic: quinn::ClientConfig,
        connect: ConnectBounds,
        max_frame_bytes: u32,
        health: Health,
    ) -> Nodes {
        Nodes {
            endpoints: Endpoints::default(),
            quic,
            connect,
            max_frame_bytes,
            links: Mutex::new(Links::default()),
            health: Mutex::new(health),
        }
    }

    /// The health state, for routing decisions and statistics.
    pub(crate) fn health(&self) -> MutexGuard<'_, Health> {
        lock(&self.health)
    }

    /// The cached connection to `target`, or the dial in progress, or a new dial. The future
    /// only waits; dropping it leaves the dial running.
    pub(crate) fn connection(
        self: &Arc<Self>,
        target: &Target,
    ) -> impl std::future::Future<Output = Result<quinn::Connection, AttemptError>> + Send + 'static
    {
        let pending = self.connection_or_dial(target);
        let label = target.label.clone();
        async move {
            let mut receiver = match pending {
                Ok(connection) => return Ok(connection),
                Err(receiver) => receiver,
            };
            let outcome = match receiver.wait_for(Option::is_some).await {
                Ok(result) => result.clone(),
                Err(_closed) => None,
            };
            match outcome {
                Some(Ok(connection)) => Ok(connection),
                Some(Err(error)) => Err(error.into()),
                None => Err(AttemptError::Unreachable(format!(
                    "the dial to {label} was abandoned"
                ))),
            }
        }
    }

    /// The cached, open connection to `target`, if there is one; never dials.
    pub(crate) fn ready_connection(&self, target: &Target) -> Option<quinn::Connection> {
        match lock(&self.links).map.get(&target.label) {
            Some(Link::Ready(connection)) if connection.close_reason().is_none() => {
                Some(connection.clone())
            }
            _ => None,
        }
    }

    /// Starts a background dial to `target` if it has no connection and no dial: the probe of a
    /// node that is down and due (see `health`).
    pub(crate) fn probe(self: &Arc<Self>, target: &Target) {
        tracing::debug!(node = %target.label, "probing a node that was down");
        let _ = self.connection_or_dial(target);
    }

    fn connection_or_dial(
        self: &Arc<Self>,
        target: &Target,
    ) -> Result<quinn::Connection, watch::Receiver<DialResult>> {
        let mut links = lock(&self.links);
        match links.map.get(&target.label) {
            Some(Link::Ready(connection)) => match connection.close_reason() {
                None => return Ok(connection.clone()),
                Some(reason) => {
                    // Closed while cached; an idle timeout means the node went silent.
                    if matches!(reason, quinn::ConnectionError::TimedOut) {
                        self.note_down(&target.label, &format!("connection {reason}"));
                    }
                }
            },
            Some(Link::Dialing { result, .. }) => return Err(result.clone()),
            None => {}
        }
        links.next_generation += 1;
        let generation = links.next_generation;
        let (sender, receiver) = watch::channel(None);
        let timeout =
            self.health()
                .connect_timeout(&target.label, self.connect.min, self.connect.max);
        self.health().note_dial(&target.label);
        let nodes = Arc::clone(self);
        let target = target.clone();
        let label = target.label.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = match tokio::time::timeout(timeout, nodes.dial(&target)).await {
                Ok(result) => result,
                Err(_elapsed) => Err(DialError::Unreachable(format!(
                    "no connection to {} within {} ms",
                    target.address,
                    timeout.as_millis()
                ))),
            };
            nodes.dial_done(&target.label, generation, &result, started.elapsed());
            sender.send_replace(Some(result));
        });
        links.map.insert(
            label,
            Link::Dialing {
                generation,
                result: receiver.clone(),
                task: task.abort_handle(),
            },
        );
        Err(receiver)
    }

    /// Records a finished dial: the connection (or nothing) in the cache, the node's health.
    fn dial_done(
        &self,
        label: &str,
        generation: u64,
        result: &Result<quinn::Connection, DialError>,
        elapsed: Duration,
    ) {
        {
            let mut links = lock(&self.links);
            let ours = matches!(
                links.map.get(label),
                Some(Link::Dialing { generation: g, .. }) if *g == generation
            );
            if ours {
                match result {
                    Ok(connection) => {
                        links
                            .map
                            .insert(label.to_string(), Link::Ready(connection.clone()));
                    }
                    Err(_) => {
                        links.map.remove(label);
                    }
                }
            }
        }
        match result {
            Ok(_) => {
                tracing::debug!(
                    node = %label,
                    handshake_ms = elapsed.as_secs_f64() * 1e3,
                    "connected"
                );
                let mut health = self.health();
                health.record_handshake(label, elapsed);
                if health.mark_up(label) {
                    tracing::info!(node = %label, "node is up again");
                }
            }
            Err(error) => {
                self.health().note_dial_failure(label);
                tracing::debug!(node = %label, error = ?error, "dial failed");
                if let DialError::Unreachable(reason) = error {
                    self.note_down(label, reason);
                }
            }
        }
    }

    /// Marks `label` down and says so once.
    fn note_down(&self, label: &str, reason: &str) {
        let marked = self.health().mark_down(label, Instant::now());
        if let Marked::Down { backoff, failures } = marked {
            tracing::info!(
                node = %label,
                failures,
                backoff_ms = backoff.as_millis() as u64,
                reason,
                "node marked down"
            );
        }
    }

    /// Drops the cached connection to `label` if it is `connection` (a later one may have
    /// replaced it).
    fn forget(&self, label: &str, connection: &quinn::Connection) {
        let mut links = lock(&self.links);
        let same = matches!(
            links.map.get(label),
            Some(Link::Ready(cached)) if cached.stable_id() == connection.stable_id()
        );
        if same {
            links.map.remove(label);
        }
    }

    /// Records that `target` has not answered a read another node answered first.
    pub(crate) fn note_lost_hedge(&self, target: &Target) {
        tracing::debug!(node = %target.label, "a hedged read was answered elsewhere first");
        self.health().mark_suspect(&target.label, Instant::now());
    }

    /// Records that a dial to `target` was still pending when another node's connection got the
    /// request, unless it has completed since.
    pub(crate) fn note_lost_race(&self, target: &Target) {
        if self.ready_connection(target).is_none() {
            tracing::debug!(node = %target.label, "a dial lost a race to another node");
            self.health().mark_suspect(&target.label, Instant::now());
        }
    }

    /// How `label` should be routed now.
    pub(crate) fn route_state(&self, label: &str, now: Instant) -> RouteState {
        self.health().route_state(label, now)
    }

    /// One request out and one answer back on `connection`, bounded by `timeout` and watched
    /// for silence; records what it learned about the node.
    pub(crate) async fn exchange(
        self: Arc<Self>,
        target: Target,
        connection: quinn::Connection,
        frame: Arc<[u8]>,
        timeout: Duration,
        is_read: bool,
    ) -> Result<Response, AttemptError> {
        self.health().note_attempt(&target.label);
        let started = Instant::now();
        let silence = silence_timeout(connection.rtt(), self.connect.max);
        let outcome = tokio::select! {
            result = tokio::time::timeout(
                timeout,
                exchange(&connection, &frame, self.max_frame_bytes),
            ) => match result {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(error)) => Err(error.into_attempt_error(&target.label)),
                Err(_elapsed) => Err(AttemptError::Timeout),
            },
            () = wait_for_silence(&connection, silence) => {
                connection.close(CLOSE_SILENT.into(), b"no packet from the node");
                Err(AttemptError::Unreachable(format!(
                    "{} sent nothing for {} ms while a request was outstanding",
                    target.label,
                    silence.as_millis()
                )))
            }
        };
        match &outcome {
            Ok(response) => {
                let mut health = self.health();
                if health.mark_up(&target.label) {
                    tracing::info!(node = %target.label, "node is up again");
                }
                if is_read && !matches!(response, Response::Error(_)) {
                    health.record_read(started.elapsed());
                }
            }
            Err(AttemptError::Unreachable(reason)) => {
                self.forget(&target.label, &connection);
                self.note_down(&target.label, reason);
            }
            Err(AttemptError::Timeout | AttemptError::Fatal(_)) => {}
        }
        outcome
    }

    /// Closes every connection and abandons every dial. Returns each closed connection with
    /// the count of datagrams it had sent before its close, so the caller can wait until the
    /// close itself has gone out.
    pub(crate) fn close_all(&self) -> Vec<(quinn::Connection, u64)> {
        let links: Vec<Link> = lock(&self.links)
            .map
            .drain()
            .map(|(_, link)| link)
            .collect();
        let mut closed = Vec::new();
        for link in links {
            match link {
                Link::Ready(connection) => {
                    let sent = connection.stats().udp_tx.datagrams;
                    connection.close(0u32.into(), b"client closing");
                    closed.push((connection, sent));
                }
                Link::Dialing { task, .. } => task.abort(),
            }
        }
        closed
    }

    /// Resolves `target.address` and connects to the first address that completes a handshake.
    async fn dial(&self, target: &Target) -> Result<quinn::Connection, DialError> {
        let addresses = tokio::net::lookup_host(target.address.as_str())
            .await
            .map_err(|e| {
                DialError::Unreachable(format!("cannot resolve {}: {e}", target.address))
            })?;
        let mut last = DialError::Unreachable(format!("{} resolved to no address", target.address));
        for address in addresses {
            let endpoint = self
                .endpoints
                .for_address(address)
                .map_err(|e| DialError::Local(e.kind(), e.to_string()))?;
            let connecting =
                match endpoint.connect_with(self.quic.clone(), address, &target.server_name) {
                    Ok(connecting) => connecting,
                    Err(e) => {
                        last = DialError::Unreachable(format!("cannot connect to {address}: {e}"));
                        continue;
                    }
                };
            match connecting.await {
                Ok(connection) => return Ok(connection),
                Err(e) => match classify_connection_error(&target.label, &e) {
                    refused @ DialError::Refused(_) => return Err(refused),
                    other => last = other,
                },
            }
        }
        Err(last)
    }
}

/// The QUIC transport settings of client connections: keep-alives and the idle timeout (see the
/// module documentation).
pub(crate) fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let idle_ms = u32::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
    transport
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(idle_ms).into()));
    transport
}

/// How long a connection with a request outstanding may stay silent: `8 · (rtt + 25 ms)`
/// within [`SILENCE_TIMEOUT_MIN`] and `ceiling`.
pub(crate) fn silence_timeout(rtt: Duration, ceiling: Duration) -> Duration {
    ((rtt + ACK_DELAY_MAX) * 8).clamp(SILENCE_TIMEOUT_MIN, ceiling.max(SILENCE_TIMEOUT_MIN))
}

/// Frames sent that a live peer must acknowledge, from the connection's counters. MTU probes
/// are left out: the path may legitimately drop them.
fn ack_eliciting_sent(stats: &quinn::ConnectionStats) -> u64 {
    let frames = &stats.frame_tx;
    (frames.stream
        + frames.ping
        + frames.reset_stream
        + frames.stop_sending
        + frames.max_data
        + frames.max_stream_data)
        .saturating_sub(stats.path.sent_plpmtud_probes)
}

/// Returns once the client has sent something the node must acknowledge and nothing at all has
/// come back for `silence`. Never returns on a live connection.
async fn wait_for_silence(connection: &quinn::Connection, silence: Duration) {
    let tick = (silence / 4).max(Duration::from_millis(10));
    let stats = connection.stats();
    let mut received = stats.udp_rx.datagrams;
    let mut sent_at_last_receive = ack_eliciting_sent(&stats);
    let mut unanswered_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
        let stats = connection.stats();
        let now = Instant::now();
        if stats.udp_rx.datagrams != received {
            received = stats.udp_rx.datagrams;
            sent_at_last_receive = ack_eliciting_sent(&stats);
            unanswered_since = None;
            continue;
        }
        if ack_eliciting_sent(&stats) > sent_at_last_receive {
            let since = *unanswered_since.get_or_insert(now);
            if now.duration_since(since) + tick >= silence {
                return;
            }
        }
    }
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
            ExchangeError::Connection(e) => classify_connection_error(label, &e).into(),
            ExchangeError::Stream(reason) => AttemptError::Unreachable(reason),
            ExchangeError::Frame(error) => AttemptError::Fatal(error),
        }
    }
}

/// Encodes `request` once, so every attempt sends the same bytes (request id included).
pub(crate) fn encode_request(request: &Request, max_frame_bytes: u32) -> crate::Result<Arc<[u8]>> {
    Ok(encode_frame(request, max_frame_bytes)?.into())
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
    // The header is checked before anything is allocated, and the body grows only with the
    // bytes that arrive: a hostile or broken node can make us hold no more than it sends, and
    // once its answer has begun it must finish it within the frame deadline. How long the
    // answer may take to begin is the attempt's bound, not this one's.
    let body = read_frame(
        &mut recv,
        max_frame_bytes,
        FRAME_READ_TIMEOUT,
        Deadline::FromFirstByte,
    )
    .await
    .map_err(|e| match e {
        ReadFrameError::Ended => {
            ExchangeError::Stream("the node closed the stream without answering".into())
        }
        ReadFrameError::Truncated { received } => ExchangeError::Stream(format!(
            "the node closed the stream after {received} bytes of its answer"
        )),
        ReadFrameError::Refused(e) => ExchangeError::Frame(e),
        e @ ReadFrameError::TimedOut { .. } => ExchangeError::Stream(e.to_string()),
        ReadFrameError::Stream(quinn::ReadError::ConnectionLost(e)) => ExchangeError::Connection(e),
        ReadFrameError::Stream(e) => {
            ExchangeError::Stream(format!("reading the answer failed: {e}"))
        }
    })?;
    decode_body(&body).map_err(ExchangeError::Frame)
}

/// How long an answer has to arrive whole once its first byte came.
const FRAME_READ_TIMEOUT: Duration =
    Duration::from_millis(crate::frame_io::FRAME_READ_TIMEOUT_DEFAULT_MS);

/// Tells a refused TLS handshake (fatal) from a connection that merely failed (try elsewhere).
fn classify_connection_error(label: &str, error: &quinn::ConnectionError) -> DialError {
    use quinn::ConnectionError as E;
    match error {
        // Our side's TLS refused the node's certificate (or the handshake otherwise failed).
        E::TransportError(e) if CRYPTO_ERROR_RANGE.contains(&u64::from(e.code)) => {
            DialError::Refused(format!(
                "TLS handshake with {label} failed: {} ({e})",
                alert_name(u64::from(e.code))
            ))
        }
        // The node's TLS refused our certificate, and said so with an alert.
        E::ConnectionClosed(close) if CRYPTO_ERROR_RANGE.contains(&u64::from(close.error_code)) => {
            DialError::Refused(format!(
                "{label} refused the TLS handshake: {} ({close})",
                alert_name(u64::from(close.error_code))
            ))
        }
        // The handshake passed but the node found no usable identity in our certificate.
        E::ApplicationClosed(close) if close.error_code == CLOSE_IDENTITY_REFUSED.into() => {
            DialError::Refused(format!("{label} refused our certificate: {close}"))
        }
        other => DialError::Unreachable(format!("connection to {label} failed: {other}")),
    }
}

/// The TLS alert's name (`UnknownCA`, `BadCertificate`, ...) from a QUIC crypto error code.
fn alert_name(code: u64) -> String {
    // The low byte of a crypto error code is the alert; `CRYPTO_ERROR_RANGE` was checked.
    let alert = rustls::AlertDescription::from((code & 0xff) as u8);
    format!("TLS alert {alert:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alerts_are_authentication_refusals_and_other_closes_are_not() {
        let refused = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(48),
            frame_type: None,
            reason: Default::default(),
        });
        match AttemptError::from(classify_connection_error("n1", &refused)) {
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
            AttemptError::from(classify_connection_error("n1", &identity)),
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
                AttemptError::from(classify_connection_error("n1", &transient)),
                AttemptError::Unreachable(_)
            ));
        }
    }

    #[test]
    fn local_dial_failures_keep_their_io_kind() {
        let error = AttemptError::from(DialError::Local(
            std::io::ErrorKind::AddrInUse,
            "bind".into(),
        ));
        match error {
            AttemptError::Fatal(Error::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn silence_timeouts_follow_the_round_trip_within_their_bounds() {
        let ceiling = Duration::from_secs(2);
        assert_eq!(
            silence_timeout(Duration::from_micros(200), ceiling),
            SILENCE_TIMEOUT_MIN
        );
        assert_eq!(
            silence_timeout(Duration::from_millis(75), ceiling),
            Duration::from_millis(800)
        );
        assert_eq!(silence_timeout(Duration::from_secs(1), ceiling), ceiling);
        // A ceiling below the floor does not make the floor unreachable.
        assert_eq!(
            silence_timeout(Duration::from_secs(1), Duration::from_millis(100)),
            SILENCE_TIMEOUT_MIN
        );
    }
}
