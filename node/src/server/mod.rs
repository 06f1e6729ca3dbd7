//! The node's async shell: everything between the core and the outside world.
//!
//! [`run`] starts a node from its [`Config`]:
//!
//! 1. open storage (sled) and settle the incarnation: reuse the actor after a clean shutdown,
//!    draw a new one otherwise, and make that record durable before serving anything;
//! 2. build the cluster map (ring, keyspaces, addresses) and its fingerprint;
//! 3. bind one QUIC endpoint that serves both protocols, told apart by ALPN: clients
//!    (`quorumkv-client/1`) and peers (`quorumkv-peer/1`), both with mutual TLS against the
//!    cluster CA;
//! 4. start the core task (see [`core_task`]), the peer transport, and the admin HTTP server
//!    (`/health`, `/ready`, `/metrics`);
//! 5. on shutdown, stop accepting, stop the core, flush storage and write the clean-shutdown
//!    incarnation record, so the next start may reuse the actor.
//!
//! Everything here is plumbing: no replication decision is made in this module.

pub mod admin;
pub mod core_task;
pub mod listener;

use crate::config::Config;
use crate::core::{ClusterMap, CoreConfig, NodeCore};
use crate::error::{Error, Result};
use crate::storage::sled_store::{SledOptions, SledStorage};
use crate::storage::Storage;
use crate::transport::quic::{PeerRoute, QuicTransport, QuicTransportConfig};
use crate::version_vector::{on_clean_shutdown, on_start};
use crate::{metrics, tls, Result as NodeResult};
use quorumkv_ring::{Node, Ring, RingConfig};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Builds the cluster map every member must agree on from the static configuration.
pub fn cluster_map(config: &Config) -> NodeResult<ClusterMap> {
    let ring_config =
        RingConfig::new(config.ranges, config.replication_max).map_err(|e| Error::Config {
            field: "ranges".into(),
            reason: e.to_string(),
        })?;
    let mut members = Vec::new();
    let mut addresses = std::collections::BTreeMap::new();
    for member in &config.members {
        let node =
            Node::new(member.id.clone(), member.zone.clone(), member.capacity).map_err(|e| {
                Error::Config {
                    field: "members".into(),
                    reason: e.to_string(),
                }
            })?;
        members.push(node);
        addresses.insert(member.id.clone(), member.address.clone());
    }
    let ring = Ring::build(ring_config, members).map_err(|e| Error::Config {
        field: "members".into(),
        reason: e.to_string(),
    })?;
    let keyspaces = config
        .keyspaces
        .iter()
        .map(|(name, ks)| (name.clone(), ks.n))
        .collect();
    Ok(ClusterMap {
        ring,
        keyspaces,
        addresses,
    })
}

/// The core's knobs, taken from the node configuration.
pub fn core_config(config: &Config) -> CoreConfig {
    CoreConfig {
        request_timeout_ms: config.timeouts.request_timeout_ms,
        ping_interval_ms: config.timeouts.ping_interval_ms,
        peer_down_after_ms: config.timeouts.peer_down_after_ms,
        key_bytes_max: config.limits.key_bytes_max,
        value_bytes_max: config.limits.value_bytes_max,
        context_entries_max: config.limits.context_entries_max,
        in_flight_requests_max: config.limits.in_flight_requests_max,
        siblings_per_key_max: config.limits.siblings_per_key_max,
        siblings_per_key_warn: config.limits.siblings_per_key_warn,
        key_state_bytes_max: (config.limits.frame_bytes_max as usize)
            .saturating_sub(config.limits.key_bytes_max)
            .saturating_sub(crate::config::FRAME_ENVELOPE_BYTES as usize),
        hint_bytes_per_target_max: config.hints.bytes_per_target_max,
        hint_max_age_ms: config.hints.max_age_ms,
        hint_delivery_batch: config.hints.delivery_batch.max(1),
        anti_entropy: crate::core::AntiEntropyConfig {
            enabled: config.anti_entropy.enabled,
            interval_ms: config.anti_entropy.interval_ms,
            exchanges_max: config.anti_entropy.exchanges_max,
            exchange_timeout_ms: config.anti_entropy.exchange_timeout_ms,
            keys_per_second_max: config.anti_entropy.keys_per_second_max,
            build_keys_per_tick_max: config.anti_entropy.build_keys_per_tick_max,
        },
        tombstones: crate::core::TombstoneConfig {
            enabled: config.tombstones.enabled,
            grace_ms: config.tombstones.grace_ms,
            quiet_ms: config.tombstones.quiet_ms,
            interval_ms: config.tombstones.interval_ms,
            batch: config.tombstones.batch,
        },
    }
}

/// Runs a node until `shutdown` resolves, then stops it cleanly.
pub async fn run(
    config: Config,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let me = config.node_id.clone();
    let map = Arc::new(cluster_map(&config)?);
    let fingerprint = map.fingerprint();

    let data_dir = config.data_dir.clone();
    let storage =
        tokio::task::spawn_blocking(move || SledStorage::open(&data_dir, SledOptions::default()))
            .await
            .map_err(|e| Error::Storage {
                operation: "open",
                reason: e.to_string(),
            })??;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let previous = storage.incarnation()?;
    let clean = previous
        .as_ref()
        .is_some_and(|record| record.clean_shutdown);
    let (clock, record) = on_start(previous, rand::random());
    storage.set_incarnation(&record)?;
    tracing::info!(node = %me, actor = %record.actor, reused = clean, "incarnation settled");

    let server_crypto = tls::server_crypto(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?;
    let server_config = tls::quic_server_config(server_crypto, &config.limits)?;
    let endpoint =
        quinn::Endpoint::server(server_config, config.listen).map_err(|e| Error::Config {
            field: "listen".into(),
            reason: format!("cannot bind {}: {e}", config.listen),
        })?;
    let peer_client = tls::quic_client_config(
        tls::peer_client_crypto(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?,
        &config.limits,
    )?;

    let clock_origin = Instant::now();
    // Random per process start: sent in every peer hello and the first half of every operation
    // id, so peers and answers can tell this process from the previous one.
    let instance: u64 = rand::random();
    let (stop_tx, stop_rx) = watch::channel(false);
    let inbox = core_task::inbox(config.limits.inbox_bytes_max);
    let peers = map
        .addresses
        .iter()
        .filter(|(id, _)| **id != me)
        .map(|(id, address)| PeerRoute {
            id: id.clone(),
            address: address.clone(),
        })
        .collect();
    let transport = Arc::new(QuicTransport::start(
        endpoint.clone(),
        QuicTransportConfig {
            me: me.clone(),
            fingerprint: fingerprint.clone(),
            instance,
            client_config: peer_client,
            connect_timeout: Duration::from_millis(config.timeouts.connect_timeout_ms),
            frame_bytes_max: config.limits.frame_bytes_max,
            queue_bytes_max: config.limits.peer_queue_bytes_max,
        },
        peers,
        inbox.0.clone(),
    ));
    let core = NodeCore::new(
        me.clone(),
        map.clone(),
        core_config(&config),
        clock,
        instance,
        core_task::now(clock_origin),
    );
    let running = core_task::spawn(
        core,
        storage.clone(),
        transport.clone(),
        inbox,
        clock_origin,
        stop_rx.clone(),
    );

    let ready = Arc::new(AtomicBool::new(false));
    metrics::in_service(true);
    let admin = admin::serve(
        config.admin_listen,
        vec![ready.clone(), running.in_service.clone()],
        prometheus,
        running.sync_status.clone(),
    )
    .await?;
    let listener = tokio::spawn(listener::accept(
        endpoint.clone(),
        listener::ListenerConfig {
            me: me.clone(),
            fingerprint,
            frame_bytes_max: config.limits.frame_bytes_max,
            on_peer_hello: {
                let transport = transport.clone();
                Arc::new(move |node: &quorumkv_ring::NodeId, instance| {
                    transport.peer_connected(node, instance)
                })
            },
        },
        running.handle.clone(),
    ));
    ready.store(true, Ordering::SeqCst);
    tracing::info!(node = %me, listen = %config.listen, admin = %admin.local_addr, "node ready");

    shutdown.await;
    tracing::info!(node = %me, "shutting down");
    ready.store(false, Ordering::SeqCst);
    endpoint.close(quinn::VarInt::from_u32(0), b"node shutting down");
    listener.abort();
    let _ = stop_tx.send(true);
    let core = running.task.await.map_err(|e| Error::Storage {
        operation: "stop core",
        reason: e.to_string(),
    })?;
    let storage_for_flush = storage.clone();
    tokio::task::spawn_blocking(move || storage_for_flush.flush())
        .await
        .map_err(|e| Error::Storage {
            operation: "flush",
            reason: e.to_string(),
        })??;
    storage.set_incarnation(&on_clean_shutdown(core.clock()))?;
    // Give the close frames a moment to reach peers and clients, but do not wait for
    // connections whose peer never answers (a half-open dial) to idle out.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    admin.stop();
    tracing::info!(node = %me, "stopped cleanly");
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: what stops a node or a dev cluster.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let ctrl_c = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
