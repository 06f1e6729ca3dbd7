//! The async shell without sockets: three core tasks on tokio, exchanging peer messages over
//! the in-memory transport, with in-memory storage. This exercises the core task, the flusher
//! and the `Transport` seam exactly as the QUIC node uses them.

use quorumkv_client::protocol::{ReadOptions, Request, RequestId, Response, WriteOptions};
use quorumkv_node::core::{ClusterMap, CoreConfig, NodeCore};
use quorumkv_node::server::core_task::{self, CoreHandle};
use quorumkv_node::storage::memory::MemoryStorage;
use quorumkv_node::transport::memory::MemoryNetwork;
use quorumkv_node::version_vector::on_start;
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

struct Cluster {
    network: MemoryNetwork,
    nodes: Vec<(NodeId, CoreHandle)>,
    _stop: watch::Sender<bool>,
}

fn start(count: usize) -> Cluster {
    let ids: Vec<NodeId> = (1..=count)
        .map(|i| NodeId::new(format!("n{i}")).expect("test setup"))
        .collect();
    let members = ids.iter().map(|id| {
        Node::new(id.clone(), Zone::new("z").expect("test setup"), 1).expect("test setup")
    });
    let ring =
        Ring::build(RingConfig::new(64, 3).expect("test setup"), members).expect("test setup");
    let map = Arc::new(ClusterMap {
        ring,
        keyspaces: [("default".to_string(), 3u8)].into_iter().collect(),
        addresses: ids
            .iter()
            .map(|id| (id.clone(), format!("{id}:1")))
            .collect(),
    });
    let network = MemoryNetwork::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let origin = Instant::now();
    let config = CoreConfig {
        request_timeout_ms: 500,
        peer_down_after_ms: 300,
        ping_interval_ms: 50,
        ..CoreConfig::default()
    };
    let mut nodes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let storage = Arc::new(MemoryStorage::new());
        let (clock, _) = on_start(None, 1000 + i as u64);
        let inbox = core_task::inbox(64 * 1024 * 1024);
        let transport = network.join(id.clone(), inbox.0.clone());
        let core = NodeCore::new(
            id.clone(),
            map.clone(),
            config.clone(),
            clock,
            i as u64 + 1,
            core_task::now(origin),
        );
        let running = core_task::spawn(
            core,
            storage,
            Arc::new(transport),
            inbox,
            origin,
            stop_rx.clone(),
        );
        nodes.push((id.clone(), running.handle));
    }
    Cluster {
        network,
        nodes,
        _stop: stop_tx,
    }
}

fn put(key: &str, value: &str, w: u8) -> Request {
    Request::Put {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        context: None,
        request_id: RequestId(rand_id(key, value)),
        options: WriteOptions {
            w: Some(w),
            dw: Some(1),
            timeout_ms: None,
            ..WriteOptions::default()
        },
    }
}

fn rand_id(key: &str, value: &str) -> [u8; 16] {
    let hash = blake3::hash(format!("{key}/{value}").as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&hash.as_bytes()[..16]);
    id
}

fn get(key: &str, r: u8) -> Request {
    Request::Get {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec(),
        options: ReadOptions {
            r: Some(r),
            timeout_ms: None,
            ..ReadOptions::default()
        },
    }
}

#[tokio::test]
async fn three_cores_replicate_over_the_memory_transport() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let cluster = start(3);
        let (_, n1) = &cluster.nodes[0];
        let (_, n3) = &cluster.nodes[2];
        assert!(matches!(
            n1.request(put("k", "v1", 3)).await,
            Response::Written { .. }
        ));
        // Every replica applied it (W = 3), so a read at another node with R = 3 sees it.
        match n3.request(get("k", 3)).await {
            Response::Got { siblings, .. } => {
                assert_eq!(siblings.len(), 1);
                assert_eq!(siblings[0].value, b"v1");
            }
            other => panic!("unexpected {other:?}"),
        }
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn a_cut_link_fails_w3_fast_and_w2_still_succeeds() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let cluster = start(3);
        let (id1, n1) = &cluster.nodes[0];
        let (id3, _) = &cluster.nodes[2];
        // n1 can no longer reach n3: sends fail as a refused connection would.
        cluster.network.set_link(id1, id3, false);
        match n1.request(put("k2", "v", 3)).await {
            Response::Error(reply) => {
                let quorum = reply.quorum.expect("quorum details");
                assert_eq!((quorum.required, quorum.acked), (3, 2), "{}", reply.message);
                assert!(
                    reply.message.contains("may have been applied"),
                    "{}",
                    reply.message
                );
            }
            other => panic!("expected a quorum failure, got {other:?}"),
        }
        assert!(matches!(
            n1.request(put("k3", "v", 2)).await,
            Response::Written { .. }
        ));
        cluster.network.set_link(id1, id3, true);
    })
    .await
    .expect("test finished in time");
}

/// Hardening defect 4: a write retried at another coordinator is stored twice (two dots, one
/// request id). A reader shown one copy writes with that context at a node that holds only the
/// other copy; neither copy may survive next to the new write, at that node or anywhere later.
#[tokio::test]
async fn a_retry_through_another_coordinator_never_leaves_a_duplicate() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let cluster = start(3);
        let (id1, n1) = &cluster.nodes[0];
        let (id2, n2) = &cluster.nodes[1];
        let (id3, n3) = &cluster.nodes[2];
        let isolate = |up: bool| {
            for other in [id2, id3] {
                cluster.network.set_link(id1, other, up);
                cluster.network.set_link(other, id1, up);
            }
        };
        // The first attempt reaches n1 only (its reply "lost"); the retry, same request id,
        // goes to n2, which stores a second copy under its own dot and replicates it to n3.
        isolate(false);
        let write = put("retried", "once", 1);
        assert!(matches!(
            n1.request(write.clone()).await,
            Response::Written { .. }
        ));
        let mut retry = write;
        if let Request::Put { options, .. } = &mut retry {
            options.w = Some(2);
        }
        assert!(matches!(n2.request(retry).await, Response::Written { .. }));
        // A reader is shown n1's copy only, and writes with that context at n3.
        let context = match n1.request(get("retried", 1)).await {
            Response::Got { siblings, context } => {
                assert_eq!(siblings.len(), 1);
                context
            }
            other => panic!("unexpected {other:?}"),
        };
        let mut replace = put("retried", "replaced", 1);
        if let Request::Put { context: c, .. } = &mut replace {
            *c = Some(context);
        }
        assert!(matches!(
            n3.request(replace).await,
            Response::Written { .. }
        ));
        let values = |response: Response| match response {
            Response::Got { siblings, .. } => siblings
                .into_iter()
                .map(|s| String::from_utf8_lossy(&s.value).into_owned())
                .collect::<Vec<_>>(),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            values(n3.request(get("retried", 1)).await),
            ["replaced"],
            "the retry's copy survived next to the write that replaced the write"
        );
        // Once healed, a read of every replica (each still holding what it held) agrees.
        isolate(true);
        assert_eq!(
            values(n1.request(get("retried", 3)).await),
            ["replaced"],
            "a copy of the replaced write came back"
        );
    })
    .await
    .expect("test finished in time");
}
