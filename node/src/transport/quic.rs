//! The QUIC transport between nodes.
//!
//! Each node has one quinn endpoint. For every peer it keeps one outgoing connection, dialed
//! by the peer's node name (`<id>.node.quorumkv`, a DNS SAN in its certificate) rather than by
//! IP, so a certificate for one node can never stand in for another. The first stream on a new
//! connection carries [`Hello`]: our id and our cluster-map fingerprint; the peer refuses the
//! connection (closing it with a reason naming both fingerprints) if either is wrong.
//!
//! Every message then travels on its own unidirectional stream as one frame. A queue per peer
//! decouples the core from the network: [`Transport::send`] never blocks. When the queue is
//! full, the connection cannot be made, or a write fails, the message is dropped and the core
//! hears `Input::Unreachable`, so requests waiting on that peer fail fast instead of hanging.
//! QUIC's per-connection stream limit is the backpressure between two nodes.
//!
//! Incoming connections are accepted by the server (see `crate::server`), which checks the
//! certificate identity and the hello and feeds messages to the core. When a hello arrives
//! from a process instance of a peer not seen before, the server calls
//! [`QuicTransport::peer_connected`]: the peer is demonstrably up, so our outgoing link to it is
//! re-dialled at once. That matters in two cases. A node that
//! started before its peer may be stuck in a dial (or its back-off) to an address nobody
//! listened on yet. And a peer that crashed and restarted cannot tell us to drop our old
//! connection (its new endpoint has no state for it), which would otherwise swallow messages
//! until the idle timeout.

use super::Transport;
use crate::certs::node_dns_name;
use crate::core::Input;
use crate::peer::{Hello, PeerMessage};
use quorumkv_client::frame::encode_frame;
use quorumkv_ring::NodeId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Messages queued per peer before sends start failing.
const QUEUE_DEPTH: usize = 4096;

/// After a failed dial, sends fail at once for this long instead of dialing again per message;
/// the failure detector's pings keep probing.
const REDIAL_BACKOFF: Duration = Duration::from_millis(250);

/// What a sender task needs to reach one peer.
#[derive(Clone, Debug)]
pub struct PeerRoute {
    pub id: NodeId,
    /// `host:port`, resolved at every dial.
    pub address: String,
}

/// Settings shared by every sender task.
#[derive(Clone, Debug)]
pub struct QuicTransportConfig {
    pub me: NodeId,
    pub fingerprint: String,
    /// This process's random instance id, sent in every hello.
    pub instance: u64,
    pub client_config: quinn::ClientConfig,
    pub connect_timeout: Duration,
    pub frame_bytes_max: u32,
}

/// The QUIC implementation of [`Transport`].
#[derive(Debug)]
pub struct QuicTransport {
    queues: BTreeMap<NodeId, mpsc::Sender<PeerMessage>>,
    redials: BTreeMap<NodeId, Arc<Notify>>,
    /// The instance id each peer last said hello with.
    instances: std::sync::Mutex<BTreeMap<NodeId, u64>>,
    inbox: mpsc::UnboundedSender<Input>,
}

impl QuicTransport {
    /// Starts one sender task per peer on the current tokio runtime.
    pub fn start(
        endpoint: quinn::Endpoint,
        config: QuicTransportConfig,
        peers: Vec<PeerRoute>,
        inbox: mpsc::UnboundedSender<Input>,
    ) -> QuicTransport {
        let config = Arc::new(config);
        let mut queues = BTreeMap::new();
        let mut redials = BTreeMap::new();
        for peer in peers {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            let redial = Arc::new(Notify::new());
            queues.insert(peer.id.clone(), tx);
            redials.insert(peer.id.clone(), redial.clone());
            let sender = PeerSender {
                endpoint: endpoint.clone(),
                config: config.clone(),
                peer,
                inbox: inbox.clone(),
                connection: None,
                dial_failed_at: None,
                redial,
            };
            tokio::spawn(sender.run(rx));
        }
        QuicTransport {
            queues,
            redials,
            instances: std::sync::Mutex::default(),
            inbox,
        }
    }

    /// `node` connected to us and passed its hello. If this is a process instance of it we
    /// have not seen before (it started or restarted), replace our outgoing link to it. The
    /// same instance saying hello again (it re-dialled us) changes nothing, so two nodes never
    /// make each other reconnect in a loop.
    pub fn peer_connected(&self, node: &NodeId, instance: u64) {
        let mut instances = self
            .instances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if instances.insert(node.clone(), instance) == Some(instance) {
            return;
        }
        if let Some(redial) = self.redials.get(node) {
            redial.notify_one();
        }
    }
}

impl Transport for QuicTransport {
    fn send(&self, to: &NodeId, message: PeerMessage) {
        let queued = self
            .queues
            .get(to)
            .is_some_and(|queue| queue.try_send(message).is_ok());
        if !queued {
            tracing::debug!(peer = %to, "peer queue full or unknown; message dropped");
            let _ = self.inbox.send(Input::Unreachable { node: to.clone() });
        }
    }
}

/// Owns the outgoing connection to one peer.
struct PeerSender {
    endpoint: quinn::Endpoint,
    config: Arc<QuicTransportConfig>,
    peer: PeerRoute,
    inbox: mpsc::UnboundedSender<Input>,
    connection: Option<quinn::Connection>,
    dial_failed_at: Option<Instant>,
    redial: Arc<Notify>,
}

impl PeerSender {
    async fn run(mut self, mut queue: mpsc::Receiver<PeerMessage>) {
        loop {
            let message = tokio::select! {
                message = queue.recv() => match message {
                    Some(message) => message,
                    None => return,
                },
                _ = self.redial.notified() => {
                    self.forget_connection("the peer connected to us anew");
                    continue;
                }
            };
            if let Err(reason) = self.deliver(&message).await {
                tracing::debug!(peer = %self.peer.id, kind = message.kind(), %reason, "send failed");
                let _ = self.inbox.send(Input::Unreachable {
                    node: self.peer.id.clone(),
                });
            }
        }
    }

    async fn deliver(&mut self, message: &PeerMessage) -> Result<(), String> {
        let frame =
            encode_frame(message, self.config.frame_bytes_max).map_err(|e| e.to_string())?;
        let connection = self.connection().await?;
        let result = write_stream(&connection, &frame).await;
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    async fn connection(&mut self) -> Result<quinn::Connection, String> {
        if let Some(connection) = &self.connection {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
            if let Some(reason) = connection.close_reason() {
                tracing::warn!(peer = %self.peer.id, %reason, "connection to peer closed");
            }
            self.connection = None;
        }
        if let Some(failed_at) = self.dial_failed_at {
            if failed_at.elapsed() < REDIAL_BACKOFF {
                return Err("recent dial failed; backing off".into());
            }
        }
        // A dial to a peer that is not listening yet waits for the connect timeout; if the peer
        // connects to us meanwhile it is up, so start over instead of waiting that out.
        let dialed = tokio::select! {
            dialed = self.dial() => dialed,
            _ = self.redial.notified() => self.dial().await,
        };
        match dialed {
            Ok(connection) => {
                self.dial_failed_at = None;
                self.connection = Some(connection.clone());
                Ok(connection)
            }
            Err(reason) => {
                self.dial_failed_at = Some(Instant::now());
                tracing::debug!(peer = %self.peer.id, %reason, "dial failed");
                Err(reason)
            }
        }
    }

    async fn dial(&self) -> Result<quinn::Connection, String> {
        let address = tokio::net::lookup_host(&self.peer.address)
            .await
            .map_err(|e| format!("resolving {}: {e}", self.peer.address))?
            .next()
            .ok_or_else(|| format!("{} resolved to no address", self.peer.address))?;
        let server_name = node_dns_name(&self.peer.id);
        let connecting = self
            .endpoint
            .connect_with(self.config.client_config.clone(), address, &server_name)
            .map_err(|e| format!("dialing {address}: {e}"))?;
        let connection = tokio::time::timeout(self.config.connect_timeout, connecting)
            .await
            .map_err(|_| format!("connecting to {address} timed out"))?
            .map_err(|e| format!("connecting to {address}: {e}"))?;
        let hello = Hello {
            node: self.config.me.to_string(),
            fingerprint: self.config.fingerprint.clone(),
            instance: self.config.instance,
        };
        let frame = encode_frame(&hello, self.config.frame_bytes_max).map_err(|e| e.to_string())?;
        write_stream(&connection, &frame).await?;
        Ok(connection)
    }
}

impl PeerSender {
    /// Drops the outgoing connection (closing it) and any dial back-off, so the next message
    /// dials afresh.
    fn forget_connection(&mut self, why: &str) {
        if let Some(connection) = self.connection.take() {
            tracing::debug!(peer = %self.peer.id, %why, "replacing the connection to a peer");
            connection.close(quinn::VarInt::from_u32(0), why.as_bytes());
        }
        self.dial_failed_at = None;
    }
}

async fn write_stream(connection: &quinn::Connection, frame: &[u8]) -> Result<(), String> {
    let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
    stream.write_all(frame).await.map_err(|e| e.to_string())?;
    stream.finish().map_err(|e| e.to_string())?;
    Ok(())
}
