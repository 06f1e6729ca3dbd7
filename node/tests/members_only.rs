//! Only members of the cluster map speak the peer protocol: the core refuses a replica write
//! (and every other peer message) from a node outside the map, whatever reached it. The
//! listener refuses such a node's connection before this (`tests/tests/cluster_hostile.rs`);
//! this is the second line.

use quorumkv_node::core::driver::{Driver, KEYSPACE};
use quorumkv_node::core::CoreConfig;
use quorumkv_node::peer::{OpId, PeerMessage};
use quorumkv_node::version_vector::{Actor, CausalContext, Dot, KeyState, RequestId};
use quorumkv_ring::NodeId;

/// A state holding one write of `value`, as a replica write carries it.
fn state_of(value: &str) -> Vec<u8> {
    let mut state = KeyState::new();
    state
        .update(
            &CausalContext::new(),
            Dot::new(Actor(0xbad), 1),
            RequestId([9; 16]),
            0,
            Some(value.as_bytes().to_vec()),
        )
        .expect("a fresh dot");
    state.encode_canonical()
}

fn replicate(key: &str, value: &str) -> PeerMessage {
    PeerMessage::Replicate {
        op: OpId(1, 1),
        keyspace: KEYSPACE.into(),
        key: key.as_bytes().to_vec(),
        state: state_of(value),
        durable: false,
        hint_for: None,
    }
}

#[test]
fn a_replica_write_from_a_node_outside_the_map_is_refused() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, _] = cluster.ids();
    let outsider = NodeId::new("n9").expect("a node id");

    cluster.inject_peer(&n1, outsider, replicate("planted", "by n9"));
    cluster.settle();
    assert!(
        cluster.values(&n1, "planted").is_empty(),
        "a non-member wrote a replica: {:?}",
        cluster.values(&n1, "planted")
    );
    // The same message from a member is applied: the refusal is about the sender.
    cluster.inject_peer(&n1, n2, replicate("planted", "by n2"));
    cluster.settle();
    assert_eq!(cluster.values(&n1, "planted"), ["by n2"]);
}
