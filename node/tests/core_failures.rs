//! Failure paths of the pure node core, driven by hand: no sockets, no tokio, no clock.

use quorumkv_client::protocol::{ErrorKind, Request, RequestId, Response, WriteOptions};
use quorumkv_node::core::{ClientHandle, ClusterMap, CoreConfig, Input, NodeCore, Now, Output};
use quorumkv_node::peer::{OpId, PeerMessage};
use quorumkv_node::storage::memory::MemoryStorage;
use quorumkv_node::version_vector::on_start;
use quorumkv_ring::{Node, NodeId, Ring, RingConfig, Zone};
use std::sync::Arc;

fn single_node() -> (NodeCore, MemoryStorage) {
    let id = NodeId::new("n1").expect("valid id");
    let node = Node::new(id.clone(), Zone::new("z").expect("valid zone"), 1).expect("node");
    let ring = Ring::build(RingConfig::new(16, 1).expect("config"), [node]).expect("ring");
    let map = Arc::new(ClusterMap {
        ring,
        keyspaces: [("default".to_string(), 1u8)].into_iter().collect(),
        addresses: [(id.clone(), "n1:1".to_string())].into_iter().collect(),
    });
    let (clock, _) = on_start(None, 42);
    let now = Now {
        monotonic_ms: 0,
        wall_ms: 0,
    };
    let core = NodeCore::new(id, map, CoreConfig::default(), clock, 1, now);
    (core, MemoryStorage::new())
}

fn durable_put(key: &str) -> Request {
    Request::Put {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        context: None,
        request_id: RequestId([1; 16]),
        options: WriteOptions {
            w: Some(1),
            dw: Some(1),
            timeout_ms: None,
            ..WriteOptions::default()
        },
    }
}

fn reply(out: &[Output]) -> Option<&Response> {
    out.iter().find_map(|o| match o {
        Output::Reply { response, .. } => Some(response),
        _ => None,
    })
}

/// A flush that fails (a full disk, an I/O error) fails the durable writes waiting on it with
/// a quorum error that says what was reached, instead of acknowledging them.
#[test]
fn a_failed_flush_fails_the_durable_writes_waiting_for_it() {
    let (mut core, storage) = single_node();
    let now = Now {
        monotonic_ms: 1,
        wall_ms: 1,
    };
    let mut out = Vec::new();
    core.handle(
        now,
        Input::Client {
            handle: ClientHandle(1),
            request: durable_put("k"),
        },
        &storage,
        &mut out,
    );
    assert!(
        reply(&out).is_none(),
        "a durable write must wait for its flush"
    );
    assert!(
        out.iter().any(|o| matches!(o, Output::Flush)),
        "the core asks for a flush"
    );
    out.clear();
    core.handle(
        now,
        Input::FlushFailed {
            reason: "No space left on device".into(),
        },
        &storage,
        &mut out,
    );
    match reply(&out) {
        Some(Response::Error(error)) => {
            assert_eq!(error.kind, ErrorKind::QuorumNotReached);
            let quorum = error.quorum.expect("quorum details");
            assert_eq!((quorum.durable_required, quorum.durable_acked), (1, 0));
            assert!(error.message.contains("durab"), "{}", error.message);
        }
        other => panic!("expected a quorum error, got {other:?}"),
    }
    assert_eq!(core.in_flight(), 0);
}

/// The same write with a successful flush is acknowledged: the failure above is the flush's.
#[test]
fn a_successful_flush_acknowledges_the_durable_write() {
    let (mut core, storage) = single_node();
    let now = Now {
        monotonic_ms: 1,
        wall_ms: 1,
    };
    let mut out = Vec::new();
    core.handle(
        now,
        Input::Client {
            handle: ClientHandle(1),
            request: durable_put("k"),
        },
        &storage,
        &mut out,
    );
    out.clear();
    let through = quorumkv_node::storage::Storage::flush(&storage).expect("memory flush");
    core.handle(now, Input::Flushed { through }, &storage, &mut out);
    assert!(
        matches!(reply(&out), Some(Response::Written { .. })),
        "{out:?}"
    );
}

/// A request whose replicas never answer is answered at its deadline, never held forever.
#[test]
fn the_deadline_bounds_every_request() {
    let (mut core, storage) = single_node();
    let mut out = Vec::new();
    let start = Now {
        monotonic_ms: 1,
        wall_ms: 1,
    };
    core.handle(
        start,
        Input::Client {
            handle: ClientHandle(1),
            request: durable_put("k"),
        },
        &storage,
        &mut out,
    );
    out.clear();
    // Tick at every deadline the core names (anti-entropy has its own, earlier ones) until the
    // request is answered: no later than its timeout.
    let timeout_ms = CoreConfig::default().request_timeout_ms;
    for _ in 0..1000 {
        let deadline = core
            .next_deadline_ms()
            .expect("a pending request has a deadline");
        assert!(deadline <= start.monotonic_ms + timeout_ms, "{deadline}");
        let later = Now {
            monotonic_ms: deadline,
            wall_ms: deadline,
        };
        core.handle(later, Input::Tick, &storage, &mut out);
        if reply(&out).is_some() {
            break;
        }
    }
    match reply(&out) {
        Some(Response::Error(error)) => assert_eq!(error.kind, ErrorKind::QuorumNotReached),
        other => panic!("expected a quorum error at the deadline, got {other:?}"),
    }
}

/// Node n1 of three, N = 3: every key's preference list holds all three.
fn three_nodes() -> (NodeCore, MemoryStorage) {
    let ids: Vec<NodeId> = ["n1", "n2", "n3"]
        .iter()
        .map(|name| NodeId::new(*name).expect("valid id"))
        .collect();
    let members = ids
        .iter()
        .map(|id| Node::new(id.clone(), Zone::new("z").expect("zone"), 1).expect("node"));
    let ring = Ring::build(RingConfig::new(16, 3).expect("config"), members).expect("ring");
    let map = Arc::new(ClusterMap {
        ring,
        keyspaces: [("default".to_string(), 3u8)].into_iter().collect(),
        addresses: ids
            .iter()
            .map(|id| (id.clone(), format!("{id}:1")))
            .collect(),
    });
    let (clock, _) = on_start(None, 7);
    let now = Now {
        monotonic_ms: 0,
        wall_ms: 0,
    };
    let core = NodeCore::new(ids[0].clone(), map, CoreConfig::default(), clock, 1, now);
    (core, MemoryStorage::new())
}

/// While the transport's queue to a replica is over its bound, new requests that would send
/// to it are refused with `Overloaded` (nothing is queued for them); once it drains they are
/// served again. Messages already queued are the transport's to deliver, never dropped.
#[test]
fn a_congested_replica_makes_new_requests_overloaded_until_it_drains() {
    let (mut core, storage) = three_nodes();
    let now = Now {
        monotonic_ms: 1,
        wall_ms: 1,
    };
    let n2 = NodeId::new("n2").expect("valid id");
    let mut out = Vec::new();
    let congested = |congested| Input::PeerCongested {
        node: n2.clone(),
        congested,
    };
    core.handle(now, congested(true), &storage, &mut out);
    core.handle(
        now,
        Input::Client {
            handle: ClientHandle(1),
            request: durable_put("k"),
        },
        &storage,
        &mut out,
    );
    match reply(&out) {
        Some(Response::Error(error)) => {
            assert_eq!(error.kind, ErrorKind::Overloaded);
            assert!(error.message.contains("n2"), "{}", error.message);
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert!(
        !out.iter().any(|o| matches!(o, Output::Send { .. })),
        "a refused request sends nothing: {out:?}"
    );
    assert_eq!(core.in_flight(), 0);

    out.clear();
    core.handle(now, congested(false), &storage, &mut out);
    core.handle(
        now,
        Input::Client {
            handle: ClientHandle(2),
            request: durable_put("k"),
        },
        &storage,
        &mut out,
    );
    assert!(reply(&out).is_none(), "{out:?}");
    let replicated_to: Vec<&NodeId> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send { to, .. } => Some(to),
            _ => None,
        })
        .collect();
    assert!(replicated_to.contains(&&n2), "{out:?}");
}

/// A replica answers a durable replicate once, after its flush, with `Durable` alone; a
/// non-durable one at once with `Applied`.
#[test]
fn a_replica_answers_each_write_once() {
    let (mut core, storage) = three_nodes();
    let now = Now {
        monotonic_ms: 1,
        wall_ms: 1,
    };
    let n2 = NodeId::new("n2").expect("valid id");
    let mut state = quorumkv_node::version_vector::KeyState::new();
    state
        .update(
            &quorumkv_node::version_vector::CausalContext::new(),
            quorumkv_node::version_vector::Dot::new(quorumkv_node::version_vector::Actor(3), 1),
            quorumkv_node::version_vector::RequestId([3; 16]),
            1,
            Some(b"v".to_vec()),
        )
        .expect("fresh dot");
    let replicate = |op, durable| Input::Peer {
        from: n2.clone(),
        message: PeerMessage::Replicate {
            op: OpId(1, op),
            keyspace: "default".into(),
            key: b"k".to_vec(),
            state: state.encode_canonical(),
            durable,
            hint_for: None,
        },
    };
    let answers = |out: &[Output]| -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { message, .. } => Some(message.kind().to_string()),
                _ => None,
            })
            .collect()
    };
    let mut out = Vec::new();
    core.handle(now, replicate(1, false), &storage, &mut out);
    assert_eq!(answers(&out), ["applied"]);

    out.clear();
    core.handle(now, replicate(2, true), &storage, &mut out);
    assert!(
        answers(&out).is_empty(),
        "nothing before the flush: {out:?}"
    );
    assert!(out.iter().any(|o| matches!(o, Output::Flush)));
    out.clear();
    let through = quorumkv_node::storage::Storage::flush(&storage).expect("memory flush");
    core.handle(now, Input::Flushed { through }, &storage, &mut out);
    assert_eq!(answers(&out), ["durable"]);
}

/// An answer to a read must be about the key that was asked for; one about another key (a bug,
/// or a peer that is lying) counts as that replica failing, never as data.
#[test]
fn a_read_answer_about_another_key_is_not_joined_into_the_read() {
    let (mut core, storage) = three_nodes();
    let now = Now {
        monotonic_ms: 1,
        wall_ms: 1,
    };
    let mut out = Vec::new();
    let get = Request::Get {
        keyspace: "default".into(),
        key: b"k".to_vec(),
        options: quorumkv_client::protocol::ReadOptions {
            r: Some(2),
            timeout_ms: None,
            ..quorumkv_client::protocol::ReadOptions::default()
        },
    };
    core.handle(
        now,
        Input::Client {
            handle: ClientHandle(1),
            request: get,
        },
        &storage,
        &mut out,
    );
    let (op, asked) = out
        .iter()
        .find_map(|o| match o {
            Output::Send {
                to,
                message: PeerMessage::Read { op, .. },
            } => Some((*op, to.clone())),
            _ => None,
        })
        .expect("the coordinator asks a replica");
    let mut foreign = quorumkv_node::version_vector::KeyState::new();
    foreign
        .update(
            &quorumkv_node::version_vector::CausalContext::new(),
            quorumkv_node::version_vector::Dot::new(quorumkv_node::version_vector::Actor(5), 1),
            quorumkv_node::version_vector::RequestId([5; 16]),
            1,
            Some(b"other-key-value".to_vec()),
        )
        .expect("fresh dot");
    out.clear();
    core.handle(
        now,
        Input::Peer {
            from: asked,
            message: PeerMessage::ReadReply {
                op,
                keyspace: "default".into(),
                key: b"other".to_vec(),
                state: Some(foreign.encode_canonical()),
            },
        },
        &storage,
        &mut out,
    );
    if let Some(Response::Got { siblings, .. }) = reply(&out) {
        assert!(
            siblings.iter().all(|s| s.value != b"other-key-value"),
            "another key's value was returned: {siblings:?}"
        );
    }
}

fn put_w3(key: &str, id: u8) -> Request {
    Request::Put {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        context: None,
        request_id: RequestId([id; 16]),
        options: WriteOptions {
            w: Some(3),
            dw: Some(0),
            timeout_ms: None,
            ..WriteOptions::default()
        },
    }
}

/// The replicate message of `out` addressed to `to`.
fn replicate_op(out: &[Output], to: &NodeId) -> OpId {
    out.iter()
        .find_map(|o| match o {
            Output::Send {
                to: dest,
                message: PeerMessage::Replicate { op, .. },
            } if dest == to => Some(*op),
            _ => None,
        })
        .expect("a replicate to that node")
}

/// A message that could not be sent fails the one operation it belonged to. It does not make
/// the peer "down", and requests whose messages did reach that peer still complete.
#[test]
fn a_failed_send_fails_its_own_operation_only() {
    let (mut core, storage) = three_nodes();
    let now = Now {
        monotonic_ms: 1,
        wall_ms: 1,
    };
    let [n2, n3] = ["n2", "n3"].map(|n| NodeId::new(n).expect("id"));
    let mut out = Vec::new();
    let client = |handle, request| Input::Client {
        handle: ClientHandle(handle),
        request,
    };
    // Write A's replica messages went out; write B's message to n2 could not be sent (a dial
    // failure, or a message too large to encode).
    core.handle(now, client(1, put_w3("a", 1)), &storage, &mut out);
    let (a_n2, a_n3) = (replicate_op(&out, &n2), replicate_op(&out, &n3));
    out.clear();
    core.handle(now, client(2, put_w3("b", 2)), &storage, &mut out);
    let (b_n2, b_n3) = (replicate_op(&out, &n2), replicate_op(&out, &n3));
    out.clear();
    core.handle(
        now,
        Input::SendFailed {
            to: n2.clone(),
            ops: vec![b_n2],
        },
        &storage,
        &mut out,
    );
    let applied = |from: &NodeId, op| Input::Peer {
        from: from.clone(),
        message: PeerMessage::Applied { op },
    };
    core.handle(now, applied(&n3, b_n3), &storage, &mut out);
    match reply(&out) {
        Some(Response::Error(e)) => assert_eq!(e.kind, ErrorKind::QuorumNotReached),
        other => panic!("write B cannot reach W = 3 without n2: {other:?}"),
    }
    out.clear();

    // n2 is still believed up, and write A completes when n2 answers it.
    let n2_up = core.peer_liveness().any(|(node, liveness)| {
        *node == n2 && liveness == quorumkv_node::core::detector::Liveness::Up
    });
    assert!(n2_up, "a failed send must not mark the peer down");
    core.handle(now, applied(&n2, a_n2), &storage, &mut out);
    core.handle(now, applied(&n3, a_n3), &storage, &mut out);
    assert!(
        matches!(reply(&out), Some(Response::Written { .. })),
        "write A fails with B's send: {out:?}"
    );
}
