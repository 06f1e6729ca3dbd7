//! The admin HTTP server: `/health`, `/ready` and `/metrics`.
//!
//! * `/health` answers 200 as long as the process serves HTTP at all.
//! * `/ready` answers 200 once storage is open, the incarnation is settled, the QUIC endpoint
//!   is bound and the core is running (membership is static, so every peer is known from the
//!   configuration); 503 before that and while shutting down. `quorumkv dev` and the test
//!   harness wait on it.
//! * `/metrics` renders the Prometheus exposition format from the recorder installed at start.
//! * `/sync-status` answers JSON: this node's digest of every range's Merkle root
//!   ([`crate::core::SyncStatus`]), as the core last published it (within a tick of the latest
//!   change), so a script can tell when replicas have converged: equal roots for a range on all
//!   its replicas. 503 until the core has published once.

use crate::error::{Error, Result};
use crate::server::core_task::SharedSyncStatus;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;

#[derive(Clone)]
struct AdminState {
    /// Ready when every flag is true (started, and the core in service).
    ready: Vec<Arc<AtomicBool>>,
    prometheus: Option<PrometheusHandle>,
    sync_status: SharedSyncStatus,
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    pub local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
}

impl AdminServer {
    /// Stops serving.
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// Binds `address` and serves the admin endpoints in the background.
pub async fn serve(
    address: SocketAddr,
    ready: Vec<Arc<AtomicBool>>,
    prometheus: Option<PrometheusHandle>,
    sync_status: SharedSyncStatus,
) -> Result<AdminServer> {
    let state = AdminState {
        ready,
        prometheus,
        sync_status,
    };
    let router = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready_handler))
        .route("/metrics", get(metrics_handler))
        .route("/sync-status", get(sync_status_handler))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| Error::Config {
            field: "admin_listen".into(),
            reason: format!("cannot bind {address}: {e}"),
        })?;
    let local_addr = listener.local_addr().map_err(|e| Error::Config {
        field: "admin_listen".into(),
        reason: e.to_string(),
    })?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let server = axum::serve(listener, router).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok(AdminServer { local_addr, stop })
}

async fn ready_handler(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.ready.iter().all(|flag| flag.load(Ordering::SeqCst)) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_handler(State(state): State<AdminState>) -> (StatusCode, String) {
    match &state.prometheus {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::OK, String::new()),
    }
}

async fn sync_status_handler(State(state): State<AdminState>) -> (StatusCode, String) {
    let status = state
        .sync_status
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    match status.map(|status| serde_json::to_string_pretty(&status)) {
        Some(Ok(json)) => (StatusCode::OK, json + "\n"),
        Some(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the core has not published its trees yet\n".to_owned(),
        ),
    }
}
