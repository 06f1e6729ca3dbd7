//! The QUIC transport between nodes.
//!
//! Each node has one quinn endpoint. For every peer it keeps one outgoing connection, dialed
//! by the peer's node name (`<id>.node.quorumkv`, a DNS SAN in its certificate) rather than by
//! IP, so a certificate for one node can never stand in for another. The first stream on a new
//! connection carries [`Hello`]: our id and our cluster-map fingerprint; the peer refuses the
//! connection (closing it with a reason naming both fingerprints) if either is wrong.
//!
//! After the hello, the same unidirectional stream carries every message to that peer, one
//! frame after another, for the life of the connection. Opening a stream per message would cost
//! a stream handshake, a task on each side and often a packet of its own; one long-lived stream
//! lets many messages share a packet, and delivers them in the order they were sent.
//!
//! # Queues and backpressure
//!
//! [`Transport::send`] never blocks: it encodes the message (so the frame's size is known and
//! an encoding failure is reported at once) and appends it to the peer's queue, which a sender
//! task drains, writing whatever has accumulated in one go. A queue is never cut short: a
//! message the core handed over is written unless the connection fails. Instead, the queue is
//! bounded in bytes through the core: when a peer's queued bytes reach `queue_bytes_max` the
//! transport tells the core (`Input::PeerCongested`), which then refuses new requests that
//! would send to that peer with `Overloaded`, until the queue drains below half the bound. Work
//! already admitted (replica answers, replication of acknowledged writes) always goes through.
//! Between the nodes, QUIC flow control is the backpressure: a receiver whose core is behind
//! stops reading (see the inbox budget in `crate::server::core_task`), so the sender's writes
//! wait and its queue grows until the core stops admitting work.
//!
//! When the connection cannot be made or a write fails, the messages of that attempt are lost,
//! and the core hears `Input::SendFailed` naming the operations they belonged to, so exactly
//! those requests count the peer as failed (and fail fast or try elsewhere) instead of hanging.
//! The transport never declares a peer down: that is the failure detector's job.
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
use crate::metrics;
use crate::peer::{Hello, OpId, PeerMessage};
use crate::server::core_task::InboxSender;
use quorumkv_client::frame::encode_frame;
use quorumkv_ring::NodeId;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// After a failed dial, sends fail at once for this long instead of dialing again per message;
/// the failure detector's pings keep probing.
const REDIAL_BACKOFF: Duration = Duration::from_millis(250);

/// A sender task writes at most this many queued bytes per batch before it accounts for them,
/// so congestion clears promptly while a long queue drains.
const BATCH_BYTES_MAX: usize = 256 * 1024;

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
    /// Bytes queued to one peer at which the core stops admitting work that needs it.
    pub queue_bytes_max: usize,
}

/// The QUIC implementation of [`Transport`].
#[derive(Debug)]
pub struct QuicTransport {
    links: BTreeMap<NodeId, Arc<PeerLink>>,
    /// The instance id each peer last said hello with.
    instances: Mutex<BTreeMap<NodeId, u64>>,
    inbox: InboxSender,
    frame_bytes_max: u32,
}

/// The core's side of one peer's queue.
#[derive(Debug)]
struct PeerLink {
    id: NodeId,
    frames: mpsc::UnboundedSender<Queued>,
    pressure: Mutex<Pressure>,
    queue_bytes_max: usize,
    redial: Notify,
    inbox: InboxSender,
}

/// An encoded message waiting to be written, and the operation of ours it serves, if any.
type Queued = (Vec<u8>, Option<OpId>);

/// Bytes queued to a peer, and whether the core was told the queue is congested.
#[derive(Debug, Default)]
struct Pressure {
    bytes: usize,
    congested: bool,
}

impl PeerLink {
    fn pressure(&self) -> MutexGuard<'_, Pressure> {
        self.pressure.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `bytes` more queued; tells the core when the queue crosses its bound.
    fn add(&self, bytes: usize) {
        let mut pressure = self.pressure();
        pressure.bytes += bytes;
        if !pressure.congested && pressure.bytes >= self.queue_bytes_max {
            pressure.congested = true;
            self.report(true);
        }
    }

    /// Counts `bytes` written (or lost); tells the core once the queue is below half its bound.
    fn remove(&self, bytes: usize) {
        let mut pressure = self.pressure();
        pressure.bytes = pressure.bytes.saturating_sub(bytes);
        if pressure.congested && pressure.bytes < self.queue_bytes_max / 2 {
            pressure.congested = false;
            self.report(false);
        }
        metrics::peer_queue_bytes(self.id.as_str(), pressure.bytes);
    }

    fn report(&self, congested: bool) {
        self.inbox.send(Input::PeerCongested {
            node: self.id.clone(),
            congested,
        });
    }
}

impl QuicTransport {
    /// Starts one sender task per peer on the current tokio runtime.
    pub fn start(
        endpoint: quinn::Endpoint,
        config: QuicTransportConfig,
        peers: Vec<PeerRoute>,
        inbox: InboxSender,
    ) -> QuicTransport {
        let config = Arc::new(config);
        let mut links = BTreeMap::new();
        for peer in peers {
            let (tx, rx) = mpsc::unbounded_channel();
            let link = Arc::new(PeerLink {
                id: peer.id.clone(),
                frames: tx,
                pressure: Mutex::default(),
                queue_bytes_max: config.queue_bytes_max.max(1),
                redial: Notify::new(),
                inbox: inbox.clone(),
            });
            links.insert(peer.id.clone(), link.clone());
            let sender = PeerSender {
                endpoint: endpoint.clone(),
                config: config.clone(),
                peer,
                link,
                connection: None,
                dial_failed_at: None,
            };
            tokio::spawn(sender.run(rx));
        }
        QuicTransport {
            links,
            instances: Mutex::default(),
            inbox,
            frame_bytes_max: config.frame_bytes_max,
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
            .unwrap_or_else(PoisonError::into_inner);
        if instances.insert(node.clone(), instance) == Some(instance) {
            return;
        }
        if let Some(link) = self.links.get(node) {
            link.redial.notify_one();
        }
    }
}

impl Transport for QuicTransport {
    fn send(&self, to: &NodeId, message: PeerMessage) {
        let op = message.request_op();
        let failed = |inbox: &InboxSender| {
            if let Some(op) = op {
                inbox.send(Input::SendFailed {
                    to: to.clone(),
                    ops: vec![op],
                });
            }
        };
        let Some(link) = self.links.get(to) else {
            tracing::warn!(peer = %to, kind = message.kind(), "message for an unknown peer dropped");
            return failed(&self.inbox);
        };
        let frame = match encode_frame(&message, self.frame_bytes_max) {
            Ok(frame) => frame,
            Err(e) => {
                // This message's fault (too large, most likely), not the peer's: fail the one
                // operation it belongs to.
                tracing::warn!(peer = %to, kind = message.kind(), error = %e, "message does not encode; dropped");
                return failed(&self.inbox);
            }
        };
        let bytes = frame.len();
        link.add(bytes);
        if link.frames.send((frame, op)).is_err() {
            // The sender task is gone: the node is stopping.
            link.remove(bytes);
        }
    }
}

/// Owns the outgoing connection to one peer and the stream every message travels on.
struct PeerSender {
    endpoint: quinn::Endpoint,
    config: Arc<QuicTransportConfig>,
    peer: PeerRoute,
    link: Arc<PeerLink>,
    connection: Option<(quinn::Connection, quinn::SendStream)>,
    dial_failed_at: Option<Instant>,
}

impl PeerSender {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Queued>) {
        let mut batch: Vec<Queued> = Vec::new();
        loop {
            let first = tokio::select! {
                frame = queue.recv() => match frame {
                    Some(frame) => frame,
                    None => return,
                },
                _ = self.link.redial.notified() => {
                    self.forget_connection("the peer connected to us anew");
                    continue;
                }
            };
            let mut bytes = first.0.len();
            batch.push(first);
            while bytes < BATCH_BYTES_MAX {
                match queue.try_recv() {
                    Ok(queued) => {
                        bytes += queued.0.len();
                        batch.push(queued);
                    }
                    Err(_) => break,
                }
            }
            let result = self.deliver(&batch).await;
            self.link.remove(bytes);
            if let Err(reason) = result {
                tracing::debug!(peer = %self.peer.id, messages = batch.len(), %reason, "send failed");
                let ops: Vec<OpId> = batch.iter().filter_map(|(_, op)| *op).collect();
                if !ops.is_empty() {
                    self.link.inbox.send(Input::SendFailed {
                        to: self.peer.id.clone(),
                        ops,
                    });
                }
            }
            batch.clear();
        }
    }

    async fn deliver(&mut self, frames: &[Queued]) -> Result<(), String> {
        let stream = self.stream().await?;
        let mut result = Ok(());
        for (frame, _) in frames {
            if let Err(e) = stream.write_all(frame).await {
                result = Err(e.to_string());
                break;
            }
        }
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    /// The stream to the peer, dialing (and saying hello) first if there is none.
    async fn stream(&mut self) -> Result<&mut quinn::SendStream, String> {
        let usable = self
            .connection
            .as_ref()
            .is_some_and(|(connection, _)| connection.close_reason().is_none());
        if !usable {
            if let Some((connection, _)) = self.connection.take() {
                if let Some(reason) = connection.close_reason() {
                    tracing::warn!(peer = %self.peer.id, %reason, "connection to peer closed");
                }
            }
            if let Some(failed_at) = self.dial_failed_at {
                if failed_at.elapsed() < REDIAL_BACKOFF {
                    return Err("recent dial failed; backing off".into());
                }
            }
            // A dial to a peer that is not listening yet waits for the connect timeout; if the
            // peer connects to us meanwhile it is up, so start over instead of waiting that out.
            let dialed = tokio::select! {
                dialed = self.dial() => dialed,
                _ = self.link.redial.notified() => self.dial().await,
            };
            match dialed {
                Ok(link) => {
                    self.dial_failed_at = None;
                    self.connection = Some(link);
                }
                Err(reason) => {
                    self.dial_failed_at = Some(Instant::now());
                    tracing::debug!(peer = %self.peer.id, %reason, "dial failed");
                    return Err(reason);
                }
            }
        }
        match &mut self.connection {
            Some((_, stream)) => Ok(stream),
            None => Err("no connection".into()),
        }
    }

    /// Connects, opens the message stream and writes the hello on it.
    async fn dial(&self) -> Result<(quinn::Connection, quinn::SendStream), String> {
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
        let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
        stream.write_all(&frame).await.map_err(|e| e.to_string())?;
        Ok((connection, stream))
    }

    /// Drops the outgoing connection (closing it) and any dial back-off, so the next message
    /// dials afresh.
    fn forget_connection(&mut self, why: &str) {
        if let Some((connection, _)) = self.connection.take() {
            tracing::debug!(peer = %self.peer.id, %why, "replacing the connection to a peer");
            connection.close(quinn::VarInt::from_u32(0), why.as_bytes());
        }
        self.dial_failed_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::core_task;

    #[tokio::test]
    async fn congestion_is_reported_at_the_bound_and_cleared_below_half_of_it() {
        let (inbox, mut reports) = core_task::inbox(1 << 20);
        let (frames, _unsent) = mpsc::unbounded_channel();
        let link = PeerLink {
            id: NodeId::new("n2").expect("id"),
            frames,
            pressure: Mutex::default(),
            queue_bytes_max: 100,
            redial: Notify::new(),
            inbox: inbox.clone(),
        };
        link.add(60);
        assert_eq!(inbox.queued(), 0, "under the bound: nothing to report");
        link.add(50);
        link.add(50);
        assert_eq!(inbox.queued(), 1, "one report per crossing");
        match reports.recv().await {
            Some(Input::PeerCongested { node, congested }) => {
                assert_eq!(node.as_str(), "n2");
                assert!(congested);
            }
            other => panic!("expected a congestion report, got {other:?}"),
        }
        link.remove(100);
        assert_eq!(
            inbox.queued(),
            0,
            "60 bytes left: still at or over half the bound"
        );
        link.remove(20);
        match reports.recv().await {
            Some(Input::PeerCongested { congested, .. }) => assert!(!congested),
            other => panic!("expected the all-clear, got {other:?}"),
        }
    }
}
