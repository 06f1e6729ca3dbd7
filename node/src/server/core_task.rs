//! The task that owns a [`NodeCore`] and carries its inputs and outputs.
//!
//! The core is single-threaded by design: one task receives every input from one inbox (client
//! requests, peer messages, flush results, transport failures), calls [`NodeCore::handle`], and
//! executes the outputs: replies go to the waiting client stream, messages to the transport,
//! flush requests to the flusher. Between inputs it sleeps until the core's next deadline and
//! then feeds it a tick, so timeouts and heartbeats need no timers of their own.
//!
//! The flusher runs storage flushes (fsyncs) off the core task in a blocking thread, one at a
//! time. Because the core asks for a new flush only when the previous one has finished, every
//! durable write that arrives during a flush shares the next one: group commit.

use crate::core::{ClientHandle, Input, NodeCore, Now, Output};
use crate::metrics;
use crate::storage::Storage;
use crate::transport::Transport;
use quorumkv_client::protocol::{ErrorKind, ErrorReply, Request, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Replies the core has not produced yet, by client handle.
type Pending = Arc<Mutex<HashMap<ClientHandle, oneshot::Sender<Response>>>>;

/// A cheap, cloneable way to talk to a running core.
#[derive(Clone, Debug)]
pub struct CoreHandle {
    inbox: mpsc::UnboundedSender<Input>,
    pending: Pending,
    next_handle: Arc<AtomicU64>,
}

impl CoreHandle {
    /// Sends a client request to the core and waits for its answer.
    pub async fn request(&self, request: Request) -> Response {
        let handle = ClientHandle(self.next_handle.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(handle, tx);
        if self.inbox.send(Input::Client { handle, request }).is_err() {
            lock(&self.pending).remove(&handle);
            return stopping();
        }
        // The core answers every request by its deadline; a dropped sender means it stopped.
        rx.await.unwrap_or_else(|_| stopping())
    }

    /// The inbox, for transports and listeners that feed the core.
    pub fn inbox(&self) -> mpsc::UnboundedSender<Input> {
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
}

/// Creates the inbox a core will read; transports need its sender before the core starts.
pub fn inbox() -> (mpsc::UnboundedSender<Input>, mpsc::UnboundedReceiver<Input>) {
    mpsc::unbounded_channel()
}

/// Starts the core task and its flusher. The core stops when `stop` turns true.
pub fn spawn(
    core: NodeCore,
    storage: Arc<dyn Storage>,
    transport: Arc<dyn Transport>,
    inbox: (mpsc::UnboundedSender<Input>, mpsc::UnboundedReceiver<Input>),
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
    let task = tokio::spawn(run(
        core,
        storage,
        transport,
        inbox_rx,
        pending.clone(),
        flush_wanted,
        clock_origin,
        stop,
    ));
    RunningCore {
        handle: CoreHandle {
            inbox: inbox_tx,
            pending,
            next_handle: Arc::new(AtomicU64::new(1)),
        },
        task,
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

#[allow(clippy::too_many_arguments)]
async fn run(
    mut core: NodeCore,
    storage: Arc<dyn Storage>,
    transport: Arc<dyn Transport>,
    mut inbox: mpsc::UnboundedReceiver<Input>,
    pending: Pending,
    flush_wanted: Arc<Notify>,
    clock_origin: Instant,
    mut stop: watch::Receiver<bool>,
) -> NodeCore {
    let mut out = Vec::new();
    loop {
        let wake_at = core
            .next_deadline_ms()
            .map_or(Instant::now() + Duration::from_secs(3600), |ms| {
                clock_origin + Duration::from_millis(ms)
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
        core.handle(now(clock_origin), input, storage.as_ref(), &mut out);
        for output in out.drain(..) {
            match output {
                Output::Reply { handle, response } => {
                    if let Some(waiter) = lock(&pending).remove(&handle) {
                        // The client stream may have gone away; its answer has nowhere to go.
                        let _ = waiter.send(response);
                    }
                }
                Output::Send { to, message } => transport.send(&to, message),
                Output::Flush => flush_wanted.notify_one(),
            }
        }
        metrics::in_flight(core.in_flight());
    }
    core
}

async fn flusher(
    storage: Arc<dyn Storage>,
    wanted: Arc<Notify>,
    inbox: mpsc::UnboundedSender<Input>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = wanted.notified() => {}
        }
        let storage = storage.clone();
        let result = tokio::task::spawn_blocking(move || storage.flush()).await;
        metrics::storage_flush();
        let input = match result {
            Ok(Ok(through)) => Input::Flushed { through },
            Ok(Err(e)) => Input::FlushFailed {
                reason: e.to_string(),
            },
            Err(e) => Input::FlushFailed {
                reason: format!("flush task failed: {e}"),
            },
        };
        if inbox.send(input).is_err() {
            return;
        }
    }
}
