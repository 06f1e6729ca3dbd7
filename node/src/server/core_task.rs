//! The task that owns a [`NodeCore`] and carries its inputs and outputs.
//!
//! The core is single-threaded by design: one task receives every input from one inbox (client
//! requests, peer messages, flush results, transport reports), calls [`NodeCore::handle`], and
//! executes the outputs: replies go to the waiting client stream, messages to the transport,
//! flush requests to the flusher.
//!
//! # Deadlines on schedule
//!
//! Timeouts and failure-detector pings need no timers of their own: the core says when it next
//! needs an [`Input::Tick`] ([`NodeCore::next_deadline_ms`]). Before taking each input the task
//! checks whether that moment has passed and, if so, ticks first; when the inbox is empty it
//! sleeps until then. So a core under sustained load, whose inbox never empties, still expires
//! requests and pings peers on time (a test floods the inbox and checks exactly that).
//!
//! # Backpressure
//!
//! The inbox is one channel with a byte budget ([`inbox`]), counted in frame bytes:
//!
//! * a **client request** that does not fit is refused at once with `Overloaded` (exit code 6
//!   in the CLI, retryable in the client), before it costs the core anything;
//! * a **peer message** that does not fit waits for room, which stops the peer's stream reader,
//!   and QUIC flow control then slows the sending node: nothing is dropped;
//! * the node's **own reports** (flushes, transport failures, congestion) always go in; they
//!   are small and bounded by the work already admitted.
//!
//! The transport's send queues are bounded the same way, by the core: see
//! `Input::PeerCongested` and [`crate::transport::quic`].
//!
//! # Group commit
//!
//! The flusher runs storage flushes (fsyncs) off the core task in a blocking thread, one at a
//! time. Because the core asks for a new flush only when the previous one has finished, every
//! durable write that arrives during a flush shares the next one.

use crate::core::{ClientHandle, Input, NodeCore, Now, Output, SyncStatus};
use crate::metrics;
use crate::storage::Storage;
use crate::transport::Transport;
use quorumkv_client::protocol::{ErrorKind, ErrorReply, Request, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The latest [`SyncStatus`] the core task published, for the admin server's `/sync-status`.
pub type SharedSyncStatus = Arc<Mutex<Option<SyncStatus>>>;

/// How often, at most, the core task republishes the sync status while trees change. Between
/// changes it publishes nothing; after the last change it publishes on the next tick.
const SYNC_STATUS_EVERY_MS: u64 = 200;

/// Replies the core has not produced yet, by client handle.
type Pending = Arc<Mutex<HashMap<ClientHandle, oneshot::Sender<Response>>>>;

/// One input on its way to the core, holding its share of the inbox budget until taken out.
#[derive(Debug)]
struct Envelope {
    input: Input,
    _budget: Option<OwnedSemaphorePermit>,
}

/// The sending side of a core's inbox; cheap to clone. See the module docs for who may wait,
/// who is refused and who always gets in.
#[derive(Clone, Debug)]
pub struct InboxSender {
    tx: mpsc::UnboundedSender<Envelope>,
    budget: Arc<Semaphore>,
    budget_bytes: u32,
    queued: Arc<AtomicUsize>,
}

/// What became of a client request offered to the inbox.
enum Admission {
    Queued,
    Overloaded,
    Stopped,
}

/// The receiving side of a core's inbox.
#[derive(Debug)]
pub struct InboxReceiver {
    rx: mpsc::UnboundedReceiver<Envelope>,
    queued: Arc<AtomicUsize>,
}

/// Creates the inbox a core will read, with room for `bytes_max` bytes of client requests and
/// peer messages (at least 1). Transports need its sender before the core starts.
pub fn inbox(bytes_max: u32) -> (InboxSender, InboxReceiver) {
    let budget_bytes = bytes_max.max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        InboxSender {
            tx,
            budget: Arc::new(Semaphore::new(budget_bytes as usize)),
            budget_bytes,
            queued: queued.clone(),
        },
        InboxReceiver { rx, queued },
    )
}

impl InboxSender {
    /// Queues one of the node's own reports (a flush result, a transport failure). Always
    /// accepted; false only when the core has stopped.
    pub fn send(&self, input: Input) -> bool {
        self.push(input, None)
    }

    /// Queues a peer message of `bytes` frame bytes, waiting while the inbox is over budget.
    /// False when the core has stopped.
    pub async fn send_peer(&self, input: Input, bytes: usize) -> bool {
        let Ok(permit) = self
            .budget
            .clone()
            .acquire_many_owned(self.cost(bytes))
            .await
        else {
            return false;
        };
        self.push(input, Some(permit))
    }

    /// Inputs queued and not yet taken by the core.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn try_send_client(&self, input: Input, bytes: usize) -> Admission {
        match self.budget.clone().try_acquire_many_owned(self.cost(bytes)) {
            Ok(permit) => {
                if self.push(input, Some(permit)) {
                    Admission::Queued
                } else {
                    Admission::Stopped
                }
            }
            Err(_) => Admission::Overloaded,
        }
    }

    /// A message's share of the budget. One larger than the whole budget takes all of it, so it
    /// waits for an empty inbox rather than forever.
    fn cost(&self, bytes: usize) -> u32 {
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget_bytes)
    }

    fn push(&self, input: Input, budget: Option<OwnedSemaphorePermit>) -> bool {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .tx
            .send(Envelope {
                input,
                _budget: budget,
            })
            .is_ok();
        if !sent {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        sent
    }
}

impl InboxReceiver {
    pub(crate) async fn recv(&mut self) -> Option<Input> {
        let envelope = self.rx.recv().await?;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        // Dropping the envelope's permit returns its bytes to the budget: the core holds the
        // input itself from here on.
        Some(envelope.input)
    }
}

/// A cheap, cloneable way to talk to a running core.
#[derive(Clone, Debug)]
pub struct CoreHandle {
    inbox: InboxSender,
    pending: Pending,
    next_handle: Arc<AtomicU64>,
}

impl CoreHandle {
    /// Sends a client request to the core and waits for its answer, for callers in the same
    /// process: the request's inbox cost is its encoded size. See [`CoreHandle::request_sized`].
    pub async fn request(&self, request: Request) -> Response {
        let bytes = rmp_serde::to_vec_named(&request).map_or(0, |encoded| encoded.len());
        self.request_sized(request, bytes).await
    }

    /// Sends a client request (whose frame was `bytes` long) to the core and waits for its
    /// answer. A request that does not fit the inbox budget is answered `Overloaded` at once.
    pub async fn request_sized(&self, request: Request, bytes: usize) -> Response {
        let handle = ClientHandle(self.next_handle.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(handle, tx);
        let refused = match self
            .inbox
            .try_send_client(Input::Client { handle, request }, bytes)
        {
            Admission::Queued => None,
            Admission::Overloaded => Some(overloaded(self.inbox.budget_bytes)),
            Admission::Stopped => Some(stopping()),
        };
        if let Some(response) = refused {
            lock(&self.pending).remove(&handle);
            return response;
        }
        // The core answers every request by its deadline; a dropped sender means it stopped.
        rx.await.unwrap_or_else(|_| stopping())
    }

    /// The inbox, for transports and listeners that feed the core.
    pub fn inbox(&self) -> InboxSender {
        self.inbox.clone()
    }
}

fn stopping() -> Response {
    Response::Error(ErrorReply {
        kind: ErrorKind::Unavailable,
        message: "the node is shutting down".into(),
        quorum: None,
    })
}

fn overloaded(budget_bytes: u32) -> Response {
    metrics::limit_exceeded("inbox_bytes");
    Response::Error(ErrorReply {
        kind: ErrorKind::Overloaded,
        message: format!(
            "the node's inbox is full (limit inbox_bytes_max = {budget_bytes}); retry later"
        ),
        quorum: None,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing in this module panics while holding the lock; recover rather than cascade.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running core: its handle, and the task that returns the core when it stops (the caller
/// needs its actor clock for the clean-shutdown record).
#[derive(Debug)]
pub struct RunningCore {
    pub handle: CoreHandle,
    pub task: JoinHandle<NodeCore>,
    /// False once the core took itself out of service (see `NodeCore::in_service`); `/ready`
    /// reads it.
    pub in_service: Arc<AtomicBool>,
    /// Every range's Merkle root, as of the latest publication; `/sync-status` reads it.
    pub sync_status: SharedSyncStatus,
}

/// Starts the core task and its flusher. The core stops when `stop` turns true.
pub fn spawn(
    core: NodeCore,
    storage: Arc<dyn Storage>,
    transport: Arc<dyn Transport>,
    inbox: (InboxSender, InboxReceiver),
    clock_origin: Instant,
    stop: watch::Receiver<bool>,
) -> RunningCore {
    let (inbox_tx, inbox_rx) = inbox;
    let pending: Pending = Arc::default();
    let flush_wanted = Arc::new(Notify::new());
    tokio::spawn(flusher(
        storage.clone(),
        flush_wanted.clone(),
        inbox_tx.clone(),
        stop.clone(),
    ));
    let in_service = Arc::new(AtomicBool::new(true));
    let sync_status = SharedSyncStatus::default();
    let shell = Shell {
        storage,
        transport,
        in_service: in_service.clone(),
        sync_status: sync_status.clone(),
        published: Mutex::new(None),
        pending: pending.clone(),
        flush_wanted,
        clock_origin,
    };
    let task = tokio::spawn(shell.run(core, inbox_rx, stop));
    RunningCore {
        handle: CoreHandle {
            inbox: inbox_tx,
            pending,
            next_handle: Arc::new(AtomicU64::new(1)),
        },
        task,
        in_service,
        sync_status,
    }
}

/// The current time as the core sees it.
pub fn now(clock_origin: Instant) -> Now {
    let wall_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Now {
        monotonic_ms: clock_origin.elapsed().as_millis() as u64,
        wall_ms,
    }
}

/// What the core task carries outputs to.
struct Shell {
    storage: Arc<dyn Storage>,
    transport: Arc<dyn Transport>,
    in_service: Arc<AtomicBool>,
    sync_status: SharedSyncStatus,
    /// The tree and hint generations and the time (monotonic ms) of the last sync status
    /// published.
    published: Mutex<Option<((u64, u64), u64)>>,
    pending: Pending,
    flush_wanted: Arc<Notify>,
    clock_origin: Instant,
}

impl Shell {
    async fn run(
        self,
        mut core: NodeCore,
        mut inbox: InboxReceiver,
        mut stop: watch::Receiver<bool>,
    ) -> NodeCore {
        let mut out = Vec::new();
        loop {
            // A due deadline goes first, however many inputs are waiting (see the module docs).
            let due = core.next_deadline_ms();
            if due.is_some_and(|ms| ms <= now(self.clock_origin).monotonic_ms) {
                self.step(&mut core, Input::Tick, &mut out);
            }
            let wake_at = due.map_or(Instant::now() + Duration::from_secs(3600), |ms| {
                self.clock_origin + Duration::from_millis(ms)
            });
            let input = tokio::select! {
                biased;
                _ = stop.changed() => break,
                input = inbox.recv() => match input {
                    Some(input) => input,
                    None => break,
                },
                _ = tokio::time::sleep_until(wake_at) => Input::Tick,
            };
            self.step(&mut core, input, &mut out);
        }
        core
    }

    /// Feeds one input to the core and carries out what it asks for.
    fn step(&self, core: &mut NodeCore, input: Input, out: &mut Vec<Output>) {
        let tick = matches!(input, Input::Tick);
        let at = now(self.clock_origin);
        core.handle(at, input, self.storage.as_ref(), out);
        self.publish_sync_status(core, at.monotonic_ms, tick);
        for output in out.drain(..) {
            match output {
                Output::Reply { handle, response } => {
                    if let Some(waiter) = lock(&self.pending).remove(&handle) {
                        // The client stream may have gone away; its answer has nowhere to go.
                        let _ = waiter.send(response);
                    }
                }
                Output::Send { to, message } => self.transport.send(&to, message),
                Output::Flush => self.flush_wanted.notify_one(),
            }
        }
        metrics::in_flight(core.in_flight());
        if !core.in_service() {
            self.in_service.store(false, Ordering::SeqCst);
        }
    }
}

impl Shell {
    /// Publishes the trees' roots and the hints pending when they changed, at most every [`SYNC_STATUS_EVERY_MS`]
    /// (and at any tick), so serving `/sync-status` never waits for the core and a busy core
    /// does not rebuild the status on every write.
    fn publish_sync_status(&self, core: &NodeCore, now_ms: u64, tick: bool) {
        // Trees or hints: either changes what `/sync-status` says.
        let generation = (core.merkle_generation(), core.hints_generation());
        let mut published = lock(&self.published);
        let due = match *published {
            None => true,
            Some((seen, at)) => seen != generation && (tick || now_ms >= at + SYNC_STATUS_EVERY_MS),
        };
        if due {
            *lock(&self.sync_status) = Some(core.sync_status());
            *published = Some((generation, now_ms));
        }
    }
}

async fn flusher(
    storage: Arc<dyn Storage>,
    wanted: Arc<Notify>,
    inbox: InboxSender,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = wanted.notified() => {}
        }
        let storage = storage.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || storage.flush()).await;
        metrics::storage_flush(started.elapsed().as_secs_f64());
        let input = match result {
            Ok(Ok(through)) => Input::Flushed { through },
            Ok(Err(e)) => Input::FlushFailed {
                reason: e.to_string(),
            },
            Err(e) => Input::FlushFailed {
                reason: format!("flush task failed: {e}"),
            },
        };
        if !inbox.send(input) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorumkv_client::protocol::ReadOptions;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn handle(inbox: InboxSender) -> CoreHandle {
        CoreHandle {
            inbox,
            pending: Pending::default(),
            next_handle: Arc::new(AtomicU64::new(1)),
        }
    }

    fn get() -> Request {
        Request::Get {
            keyspace: "default".into(),
            key: b"k".to_vec(),
            options: ReadOptions::default(),
        }
    }

    /// Polls `future` once, without a runtime that could make progress elsewhere.
    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_full_inbox_refuses_client_requests_and_holds_peer_messages_back() {
        let (tx, mut rx) = inbox(1000);
        let peer = || Input::Peer {
            from: quorumkv_ring::NodeId::new("n2").expect("id"),
            message: crate::peer::PeerMessage::Pong { nonce: 1 },
        };
        assert!(tx.send_peer(peer(), 900).await);

        // 900 of 1000 bytes are taken: a 200-byte client request is refused at once.
        match handle(tx.clone()).request_sized(get(), 200).await {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Overloaded);
                assert!(
                    e.message.contains("inbox_bytes_max = 1000"),
                    "{}",
                    e.message
                );
            }
            other => panic!("expected Overloaded, got {other:?}"),
        }
        // A 200-byte peer message waits instead...
        let waiting = tx.send_peer(peer(), 200);
        let mut waiting = pin!(waiting);
        assert!(poll_once(waiting.as_mut()).is_pending());
        // ...until the core takes the first message out and its bytes return to the budget.
        assert!(rx.recv().await.is_some());
        assert!(waiting.await);
        // The node's own reports always get in, budget or not.
        assert!(tx.send(Input::Tick));
        assert_eq!(tx.queued(), 2);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_waits_for_an_empty_inbox_not_forever() {
        let (tx, mut rx) = inbox(100);
        assert!(tx.send_peer(Input::Tick, 5_000).await);
        assert!(rx.recv().await.is_some());
        assert!(tx.send_peer(Input::Tick, 5_000).await);
    }
}
