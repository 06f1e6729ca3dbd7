//! A core whose inbox never empties still keeps its deadlines and detects dead peers.
//!
//! The core task takes inputs from one inbox and sleeps until the core's next deadline only
//! when the inbox is empty. Under sustained load it never is, so unless the task checks the
//! deadline before each input, a request waiting on a silent replica never times out and a
//! dead peer is never marked down. These tests keep node n1's inbox full of cheap inputs (a
//! flood of pongs from n3) for as long as they run, with n2 silent (its messages go into an
//! inbox nobody reads), and expect both on time:
//!
//! * a write that needs n2 (W = 3) with a short timeout is answered `QuorumNotReached`;
//! * once n2 has been silent for `peer_down_after_ms`, a write that needs it with a timeout of
//!   a minute fails at once, because the failure detector marked n2 down.
//!
//! Each answer must arrive while the flood is still going (the inbox holds inputs when it
//! arrives). The flood gives up after a safety limit; a core that only ticks on an empty inbox
//! answers only after that, and the test fails (checked once by disabling the deadline check in
//! `core_task`: both tests failed).

use quorumkv_client::protocol::{ErrorKind, Request, RequestId, Response, WriteOptions};
use quorumkv_node::core::{ClusterMap, CoreConfig, Input, NodeCore};
use quorumkv_node::peer::PeerMessage;
use quorumkv_node::server::core_task;
use quorumkv_node::storage::memory::MemoryStorage;
use quorumkv_node::transport::memory::MemoryNetwork;
use quorumkv_node::version_vector::on_start;
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The flood stops after this long whatever happens, so a broken core fails the test instead
/// of hanging it.
const FLOOD_LIMIT: Duration = Duration::from_secs(30);
/// The flood keeps at least this many inputs queued, topping up in chunks as the core drains.
const BACKLOG: usize = 50_000;
const CHUNK: usize = 1_000;

fn id(name: &str) -> NodeId {
    NodeId::new(name).expect("valid id")
}

fn put(key: &str, timeout_ms: u32) -> Request {
    Request::Put {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        context: None,
        request_id: RequestId([7; 16]),
        options: WriteOptions {
            w: Some(3),
            dw: Some(0),
            timeout_ms: Some(timeout_ms),
            ..WriteOptions::default()
        },
    }
}

/// Node n1 under test, with n2 and n3 either real cores or inboxes nobody reads.
struct Setup {
    handle: core_task::CoreHandle,
    flood_from: NodeId,
    _stop: watch::Sender<bool>,
    _unread: Vec<core_task::InboxReceiver>,
}

fn start(real_peers: &[&str]) -> Setup {
    let ids = [id("n1"), id("n2"), id("n3")];
    let members = ids
        .iter()
        .map(|node| Node::new(node.clone(), Zone::new("z").expect("zone"), 1).expect("node"));
    let ring = Ring::build(RingConfig::new(16, 3).expect("config"), members).expect("ring");
    let map = Arc::new(ClusterMap {
        ring,
        keyspaces: [("default".to_string(), 3u8)].into_iter().collect(),
        addresses: ids.iter().map(|n| (n.clone(), format!("{n}:1"))).collect(),
    });
    let config = CoreConfig {
        request_timeout_ms: 60_000,
        ping_interval_ms: 50,
        peer_down_after_ms: 300,
        ..CoreConfig::default()
    };
    let network = MemoryNetwork::new();
    let origin = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut unread = Vec::new();
    let mut handle = None;
    for (i, node) in ids.iter().enumerate() {
        let inbox = core_task::inbox(64 << 20);
        let transport = network.join(node.clone(), inbox.0.clone());
        if i > 0 && !real_peers.contains(&node.as_str()) {
            unread.push(inbox.1);
            continue;
        }
        let (clock, _) = on_start(None, i as u64 + 1);
        let core = NodeCore::new(
            node.clone(),
            map.clone(),
            config.clone(),
            clock,
            i as u64 + 1,
            core_task::now(origin),
        );
        let running = core_task::spawn(
            core,
            Arc::new(MemoryStorage::new()),
            Arc::new(transport),
            inbox,
            origin,
            stop_rx.clone(),
        );
        if i == 0 {
            handle = Some(running.handle);
        }
    }
    Setup {
        handle: handle.expect("n1 started"),
        flood_from: ids[2].clone(),
        _stop: stop_tx,
        _unread: unread,
    }
}

/// Keeps n1's inbox full of pongs "from n3" until `flooding` turns false or [`FLOOD_LIMIT`]
/// passes; returns whether it was stopped in time. Returns once the backlog has built.
async fn flood(setup: &Setup, flooding: Arc<AtomicBool>) -> tokio::task::JoinHandle<bool> {
    let inbox = setup.handle.inbox();
    let from = setup.flood_from.clone();
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let mut nonce = 0u64;
        while flooding.load(Ordering::Relaxed) && started.elapsed() < FLOOD_LIMIT {
            while inbox.queued() < 2 * BACKLOG {
                for _ in 0..CHUNK {
                    nonce += 1;
                    inbox.send(Input::Peer {
                        from: from.clone(),
                        message: PeerMessage::Pong { nonce },
                    });
                }
            }
            tokio::task::yield_now().await;
        }
        started.elapsed() < FLOOD_LIMIT
    });
    while setup.handle.inbox().queued() < BACKLOG {
        tokio::task::yield_now().await;
    }
    task
}

/// Sends `request` to n1 under the flood; returns the answer, whether the inbox still held
/// inputs when it came, and whether it came before the flood's safety limit.
async fn under_flood(setup: &Setup, request: Request) -> (Response, bool, bool) {
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = flood(setup, flooding.clone()).await;
    let response = setup.handle.request(request).await;
    let busy = setup.handle.inbox().queued() > 0;
    flooding.store(false, Ordering::Relaxed);
    let in_time = flood.await.expect("flood task");
    (response, busy, in_time)
}

fn assert_quorum_failure(what: &str, (response, busy, in_time): (Response, bool, bool)) {
    assert!(
        in_time,
        "{what}: the answer came only after the flood stopped: the core did not keep its \
         deadlines while its inbox was full"
    );
    assert!(
        busy,
        "{what}: the inbox emptied; the flood did not keep the core busy"
    );
    match &response {
        Response::Error(e) if e.kind == ErrorKind::QuorumNotReached => {}
        other => panic!("{what}: expected QuorumNotReached, got {other:?}"),
    }
}

/// n3 is up (the flood's pongs come from it) but never answers a write: only the request's
/// own deadline can end a write that needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_times_out_on_time_while_the_inbox_is_full() {
    let setup = start(&["n2"]);
    let outcome = under_flood(&setup, put("k", 300)).await;
    assert_quorum_failure("timeout", outcome);
}

/// n2 is silent from the start. A write that needs it, with a minute to wait, ends as soon as
/// the failure detector marks n2 down (after `peer_down_after_ms` of silence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_is_detected_on_time_while_the_inbox_is_full() {
    let setup = start(&["n3"]);
    let outcome = under_flood(&setup, put("k", 60_000)).await;
    assert_quorum_failure("down detection", outcome);
}
