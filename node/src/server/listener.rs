//! Accepting connections: one QUIC endpoint, two protocols.
//!
//! Every incoming connection has completed a mutual-TLS handshake against the cluster CA
//! before this code sees it. The negotiated ALPN then decides what it may do:
//!
//! * **Client protocol.** Each bidirectional stream carries one request frame and gets one
//!   response frame. A malformed or oversized frame gets an `InvalidRequest` answer on that
//!   stream and a metric; the connection and the node keep serving.
//! * **Peer protocol.** Only node certificates of *members* are accepted: a client
//!   certificate, or a node certificate (however properly issued by the cluster CA) for an id
//!   that is not in the cluster map, is refused with a close reason, a metric and a log line
//!   before a byte of the connection is read. The first frame of the first unidirectional
//!   stream must be a `Hello` whose node id matches the certificate and whose cluster-map
//!   fingerprint matches ours; otherwise the connection is closed with a reason that names
//!   both fingerprints. After
//!   that, every frame on that stream (and on any later unidirectional stream of the
//!   connection) is one peer message for the core, tagged with the certificate's node id
//!   (never an id the message claims). Messages go into the core's inbox in stream order; when
//!   the inbox is over its byte budget the reader waits, and QUIC flow control slows the
//!   sender (see `core_task`). A frame that does not decode ends that stream: the stream cannot
//!   be trusted to be in step after it.
//!
//! Every frame is read with `quorumkv_client::frame_io::read_frame`: its body grows only with
//! the bytes that arrive, and it must arrive whole within `timeouts.frame_read_timeout_ms`
//! (counted from the stream's opening for a client request, from the frame's first byte on a
//! peer's long-lived stream). A frame that stalls gets its stream stopped, a metric
//! (`quorumkv_frame_read_timeouts_total`) and a log line.

use super::core_task::CoreHandle;
use crate::core::Input;
use crate::metrics;
use crate::peer::{Hello, PeerMessage};
use crate::tls::{self, Identity, PEER_ALPN};
use quorumkv_client::frame::{decode_body, encode_frame, FRAME_HEADER_LEN};
use quorumkv_client::frame_io::{read_frame, Deadline, ReadFrameError};
use quorumkv_client::protocol::{ErrorKind, ErrorReply, Request, Response, CLIENT_ALPN};
use quorumkv_ring::NodeId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Close codes the node uses on QUIC connections.
pub mod close_code {
    /// The peer's certificate is not a node certificate.
    pub const NOT_A_NODE: u32 = 0x10;
    /// The peer's hello is missing, malformed, or names another node than its certificate.
    pub const BAD_HELLO: u32 = 0x11;
    /// The peer runs with another cluster map.
    pub const FINGERPRINT_MISMATCH: u32 = 0x12;
    /// The ALPN is neither protocol.
    pub const UNKNOWN_PROTOCOL: u32 = 0x13;
    /// The peer's certificate names a node that is not a member of the cluster map.
    pub const NOT_A_MEMBER: u32 = 0x14;
}

/// Error codes the node stops or resets streams with.
pub mod stream_code {
    /// A frame was refused (malformed or oversized); the rest of the stream is not read.
    pub const REFUSED_FRAME: u32 = 1;
    /// A frame did not arrive whole within the frame read deadline.
    pub const FRAME_TIMEOUT: u32 = 2;
}

/// How long a peer has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Called with a peer's node id and process instance once its hello is accepted.
pub type PeerHelloHook = Arc<dyn Fn(&NodeId, u64) + Send + Sync>;

/// What the listener needs to know.
#[derive(Clone)]
pub struct ListenerConfig {
    pub me: NodeId,
    pub fingerprint: String,
    /// The members of the cluster map: the only node identities the peer protocol accepts.
    pub members: Arc<BTreeSet<NodeId>>,
    pub frame_bytes_max: u32,
    /// How long a frame has to arrive whole (`timeouts.frame_read_timeout_ms`).
    pub frame_read_timeout: Duration,
    /// Told when a peer has connected to us and passed its hello: it is up now, so our own
    /// outgoing link to it should be (re)established at once (see `transport::quic`).
    pub on_peer_hello: PeerHelloHook,
}

impl std::fmt::Debug for ListenerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerConfig")
            .field("me", &self.me)
            .field("fingerprint", &self.fingerprint)
            .field("members", &self.members)
            .field("frame_bytes_max", &self.frame_bytes_max)
            .field("frame_read_timeout", &self.frame_read_timeout)
            .finish_non_exhaustive()
    }
}

/// Accepts connections until the endpoint closes.
pub async fn accept(endpoint: quinn::Endpoint, config: ListenerConfig, core: CoreHandle) {
    while let Some(incoming) = endpoint.accept().await {
        let config = config.clone();
        let core = core.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => serve_connection(connection, config, core).await,
                // Handshake failures (no or foreign certificate) end here; rustls has already
                // sent the TLS alert that tells the client why.
                Err(e) => {
                    tracing::info!(error = %e, "incoming connection refused during handshake")
                }
            }
        });
    }
}

async fn serve_connection(connection: quinn::Connection, config: ListenerConfig, core: CoreHandle) {
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    let identity = match tls::peer_identity(&connection) {
        Ok(identity) => identity,
        Err(e) => {
            tracing::warn!(remote = %connection.remote_address(), error = %e, "certificate has no usable identity");
            connection.close(close_code::NOT_A_NODE.into(), e.to_string().as_bytes());
            return;
        }
    };
    match alpn.as_deref() {
        Some(alpn) if alpn == CLIENT_ALPN => serve_client(connection, config, core).await,
        Some(alpn) if alpn == PEER_ALPN => match identity {
            Identity::Node(node) if config.members.contains(&node) => {
                serve_peer(connection, node, config, core).await
            }
            Identity::Node(node) => {
                metrics::peer_refused("not_a_member");
                let reason = format!(
                    "node {node} is not a member of this cluster's map; the peer protocol accepts \
                     members only"
                );
                tracing::warn!(remote = %connection.remote_address(), %reason, "peer refused");
                connection.close(close_code::NOT_A_MEMBER.into(), reason.as_bytes());
            }
            other => {
                metrics::peer_refused("not_a_node");
                let reason = format!("the peer protocol accepts node certificates only; {other} presented a client certificate");
                tracing::warn!(remote = %connection.remote_address(), %reason, "peer refused");
                connection.close(close_code::NOT_A_NODE.into(), reason.as_bytes());
            }
        },
        _ => connection.close(
            close_code::UNKNOWN_PROTOCOL.into(),
            b"unknown ALPN protocol",
        ),
    }
}

// ----- client protocol -----------------------------------------------------------------------

async fn serve_client(connection: quinn::Connection, config: ListenerConfig, core: CoreHandle) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        let core = core.clone();
        let limits = FrameLimits::of(&config);
        tokio::spawn(serve_client_stream(send, recv, core, limits));
    }
}

/// How frames are read: at most this long, within this long.
#[derive(Clone, Copy, Debug)]
struct FrameLimits {
    bytes_max: u32,
    timeout: Duration,
}

impl FrameLimits {
    fn of(config: &ListenerConfig) -> FrameLimits {
        FrameLimits {
            bytes_max: config.frame_bytes_max,
            timeout: config.frame_read_timeout,
        }
    }
}

async fn serve_client_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    core: CoreHandle,
    limits: FrameLimits,
) {
    let started = Instant::now();
    let max = limits.bytes_max;
    // A request stream exists to carry one frame: its deadline starts now.
    let read = read_frame(&mut recv, max, limits.timeout, Deadline::FromNow).await;
    let response = match read {
        Ok(body) => match decode_body::<Request>(&body) {
            Ok(request) => {
                let operation = operation(&request);
                let response = core
                    .request_sized(request, FRAME_HEADER_LEN + body.len())
                    .await;
                metrics::request(
                    operation,
                    outcome(&response),
                    started.elapsed().as_secs_f64(),
                );
                response
            }
            Err(e) => bad_frame(format!("malformed request: {e}")),
        },
        Err(ReadFrameError::Refused(e)) => {
            // Tell the sender to stop: we will not read the rest of an oversized frame.
            let _ = recv.stop(quinn::VarInt::from_u32(stream_code::REFUSED_FRAME));
            bad_frame(format!("refused frame: {e}"))
        }
        Err(e @ ReadFrameError::TimedOut { .. }) => {
            metrics::frame_read_timeout("client");
            tracing::info!(reason = %e, "client request stream closed: its frame stalled");
            let _ = recv.stop(quinn::VarInt::from_u32(stream_code::FRAME_TIMEOUT));
            let _ = send.reset(quinn::VarInt::from_u32(stream_code::FRAME_TIMEOUT));
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "client stream ended before a full request");
            return;
        }
    };
    let frame = match encode_frame(&response, max) {
        Ok(frame) => frame,
        Err(e) => match encode_frame(
            &bad_frame(format!("response could not be encoded: {e}")),
            max,
        ) {
            Ok(frame) => frame,
            Err(_) => return,
        },
    };
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
        // Wait until the client has the answer (or gave up) before dropping the stream.
        let _ = send.stopped().await;
    }
}

fn bad_frame(message: String) -> Response {
    metrics::bad_frame("client");
    tracing::info!(%message, "bad client frame");
    Response::Error(ErrorReply {
        kind: ErrorKind::InvalidRequest,
        message,
        quorum: None,
    })
}

fn operation(request: &Request) -> &'static str {
    match request {
        Request::Get { .. } => "get",
        Request::Put { .. } => "put",
        Request::Delete { .. } => "delete",
        Request::ClusterInfo => "cluster_info",
        Request::Replicas { .. } => "replicas",
    }
}

fn outcome(response: &Response) -> &'static str {
    match response {
        Response::Error(reply) => match reply.kind {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::QuorumNotReached => "quorum_not_reached",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        },
        _ => "ok",
    }
}

// ----- peer protocol -------------------------------------------------------------------------

async fn serve_peer(
    connection: quinn::Connection,
    node: NodeId,
    config: ListenerConfig,
    core: CoreHandle,
) {
    let (hello, first) = match check_hello(&connection, &node, &config).await {
        Ok(found) => found,
        Err((code, reason)) => {
            tracing::error!(peer = %node, %reason, "peer refused");
            connection.close(code.into(), reason.as_bytes());
            return;
        }
    };
    tracing::debug!(peer = %node, instance = hello.instance, "peer connected");
    (config.on_peer_hello)(&node, hello.instance);
    let limits = FrameLimits::of(&config);
    tokio::spawn(read_peer_stream(first, node.clone(), core.inbox(), limits));
    while let Ok(recv) = connection.accept_uni().await {
        tokio::spawn(read_peer_stream(recv, node.clone(), core.inbox(), limits));
    }
}

/// Feeds every frame of one peer stream to the core, in order, until the stream ends.
async fn read_peer_stream(
    mut recv: quinn::RecvStream,
    node: NodeId,
    inbox: super::core_task::InboxSender,
    limits: FrameLimits,
) {
    loop {
        // A peer's stream is long-lived and may be quiet between frames; inside one it may not.
        let read = read_frame(
            &mut recv,
            limits.bytes_max,
            limits.timeout,
            Deadline::FromFirstByte,
        )
        .await;
        let body = match read {
            Ok(body) => body,
            Err(e @ ReadFrameError::Refused(_)) => return refuse_peer_stream(&mut recv, &node, &e),
            Err(e @ ReadFrameError::TimedOut { .. }) => {
                metrics::frame_read_timeout("peer");
                tracing::warn!(peer = %node, reason = %e, "peer stream closed: a frame stalled");
                let _ = recv.stop(quinn::VarInt::from_u32(stream_code::FRAME_TIMEOUT));
                return;
            }
            Err(_) => return,
        };
        match decode_body::<PeerMessage>(&body) {
            Ok(message) => {
                let input = Input::Peer {
                    from: node.clone(),
                    message,
                };
                if !inbox.send_peer(input, FRAME_HEADER_LEN + body.len()).await {
                    return;
                }
            }
            Err(e) => return refuse_peer_stream(&mut recv, &node, &e),
        }
    }
}

fn refuse_peer_stream(recv: &mut quinn::RecvStream, node: &NodeId, reason: &dyn std::fmt::Display) {
    metrics::bad_frame("peer");
    tracing::warn!(peer = %node, %reason, "bad peer frame; the rest of its stream is ignored");
    let _ = recv.stop(quinn::VarInt::from_u32(stream_code::REFUSED_FRAME));
}

/// Waits for the first stream of a peer connection and checks the hello at its start. Returns
/// the hello and the stream, which goes on to carry the peer's messages.
async fn check_hello(
    connection: &quinn::Connection,
    node: &NodeId,
    config: &ListenerConfig,
) -> Result<(Hello, quinn::RecvStream), (u32, String)> {
    let (hello, recv) = tokio::time::timeout(HELLO_TIMEOUT, async {
        let mut recv = connection.accept_uni().await.map_err(|e| e.to_string())?;
        let body = read_frame(
            &mut recv,
            config.frame_bytes_max,
            config.frame_read_timeout.min(HELLO_TIMEOUT),
            Deadline::FromNow,
        )
        .await
        .map_err(|e| e.to_string())?;
        let hello = decode_body::<Hello>(&body).map_err(|e| e.to_string())?;
        Ok::<_, String>((hello, recv))
    })
    .await
    .map_err(|_| "no hello in time".to_string())
    .and_then(|hello| hello)
    .map_err(|reason| {
        metrics::peer_refused("bad_hello");
        (
            close_code::BAD_HELLO,
            format!("bad hello from {node}: {reason}"),
        )
    })?;
    if hello.node != node.as_str() {
        metrics::peer_refused("claimed_id_mismatch");
        return Err((
            close_code::BAD_HELLO,
            format!(
                "peer claims to be node {} but its certificate is node {node}",
                hello.node
            ),
        ));
    }
    if hello.fingerprint != config.fingerprint {
        metrics::peer_refused("fingerprint_mismatch");
        return Err((
            close_code::FINGERPRINT_MISMATCH,
            format!(
                "cluster map mismatch: node {node} has fingerprint {}, node {} has {}; \
                 members, ranges and keyspaces must be configured identically on every node",
                hello.fingerprint, config.me, config.fingerprint
            ),
        ));
    }
    Ok((hello, recv))
}
