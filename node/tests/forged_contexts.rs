//! The three attacks of issue 9 with forged contexts, replayed against the replication core
//! through the deterministic driver. A client builds each forged context the way an attacker
//! would: in the unkeyed token format that anyone can seal (versions 1 and 2 of the token), or
//! by altering the body of a valid token and keeping its MAC. Every forgery must be refused
//! with a clear error, and the harm it aimed at must not happen.

use quorumkv_client::protocol::{ErrorKind, Response};
use quorumkv_client::Context;
use quorumkv_node::core::driver::{Driver, KEYSPACE};
use quorumkv_node::core::{ClientHandle, CoreConfig};
use quorumkv_node::version_vector::{Actor, CausalContext, ClientContext, Dot};
use quorumkv_ring::NodeId;

/// The key every attack aims at.
const KEY: &str = "victim";

/// The 8-byte key binding, as `token.rs` documents it (public: it is not a secret).
fn binding(keyspace: &str, key: &[u8]) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"quorumkv/context-binding/v1\0");
    hasher.update(&(keyspace.len() as u64).to_le_bytes());
    hasher.update(keyspace.as_bytes());
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    let mut out = [0u8; 8];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    out
}

/// A token in the unkeyed format 2, sealed with the checksum every client can compute.
fn unkeyed_token(context: &ClientContext) -> Context {
    let mut body = vec![2u8];
    body.extend_from_slice(&binding(KEYSPACE, KEY.as_bytes()));
    rmp_serde::encode::write(&mut body, context).expect("encoding a context");
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"quorumkv/context-checksum/v1\0");
    hasher.update(&body);
    body.extend_from_slice(&hasher.finalize().as_bytes()[..8]);
    Context::from_bytes(body)
}

/// A valid token (`real`) whose body is replaced by `context`, its 32-byte MAC kept.
fn altered_token(real: &Context, context: &ClientContext) -> Context {
    let real = real.as_bytes();
    let mut body = vec![real[0]];
    body.extend_from_slice(&binding(KEYSPACE, KEY.as_bytes()));
    rmp_serde::encode::write(&mut body, context).expect("encoding a context");
    body.extend_from_slice(&real[real.len().saturating_sub(32)..]);
    Context::from_bytes(body)
}

fn actor_of(cluster: &Driver, node: &NodeId) -> Actor {
    cluster.core(node).expect("running").clock().actor()
}

/// The context a read at `node` hands out.
fn read_context(cluster: &mut Driver, node: &NodeId) -> Context {
    let get = cluster.get(node, KEY, 1);
    cluster.settle();
    match cluster.reply(get) {
        Some(Response::Got { context, .. }) => context.clone(),
        other => panic!("read at {node}: {other:?}"),
    }
}

fn assert_refused_as_forged(cluster: &Driver, put: ClientHandle, what: &str) {
    match cluster.reply(put) {
        Some(Response::Error(e))
            if e.kind == ErrorKind::InvalidRequest
                && e.message.contains("not issued by this cluster") => {}
        other => panic!("{what}: expected the forged context refused, got {other:?}"),
    }
}

/// Both forgeries of `forged`: the unkeyed format, and a real token's body altered.
fn forgeries(
    cluster: &mut Driver,
    via: &NodeId,
    forged: &ClientContext,
) -> [(Context, &'static str); 2] {
    let real = read_context(cluster, via);
    [
        (unkeyed_token(forged), "unkeyed token"),
        (altered_token(&real, forged), "altered token"),
    ]
}

/// Attack 1: a context that claims another coordinator's future dots. A replica cut off from
/// the attacker's coordinator accepts an honest write under one of those dots; when the states
/// meet, the join would take the honest write for one the forged context had seen and
/// replaced, and drop it: an acknowledged write silently lost.
#[test]
fn a_context_claiming_another_nodes_future_dots_is_refused_and_no_write_is_lost() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    let forged = ClientContext::from(CausalContext::from_dots(
        (1..=5).map(|counter| Dot::new(actor_of(&cluster, &n2), counter)),
    ));
    for (token, what) in forgeries(&mut cluster, &n1, &forged) {
        cluster.cut(&n1, &n2);
        cluster.cut(&n3, &n2);
        let attack = cluster.put_with(&n1, KEY, &format!("attack ({what})"), Some(token), 2);
        cluster.settle();
        assert_refused_as_forged(&cluster, attack, what);
        // An honest write at n2, which the forged state has not reached, acknowledged.
        let honest = format!("honest ({what})");
        let put = cluster.put(&n2, KEY, &honest, 1);
        cluster.settle();
        assert!(cluster.written(put), "{:?}", cluster.reply(put));
        cluster.heal();
        let get = cluster.get(&n1, KEY, 3);
        cluster.settle();
        let values = cluster.got(get).expect("a read after the heal");
        assert!(
            values.contains(&honest),
            "{what}: lost {honest}: {values:?}"
        );
    }
}

/// Attack 2: a context that claims the largest counter of two other coordinators' actors.
/// Their next dot for the key would be past `u64::MAX`, so they could never coordinate a write
/// of it again.
#[test]
fn a_context_claiming_the_largest_counter_is_refused_and_every_replica_still_writes() {
    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, n3] = cluster.ids();
    let forged = ClientContext::from(CausalContext::from_dots([
        Dot::new(actor_of(&cluster, &n2), u64::MAX),
        Dot::new(actor_of(&cluster, &n3), u64::MAX),
    ]));
    for (token, what) in forgeries(&mut cluster, &n1, &forged) {
        let attack = cluster.put_with(&n1, KEY, "attack", Some(token), 3);
        cluster.settle();
        assert_refused_as_forged(&cluster, attack, what);
        for node in [&n2, &n3] {
            let put = cluster.put(node, KEY, &format!("after {what} at {node}"), 3);
            cluster.settle();
            assert!(
                cluster.written(put),
                "{what}: {node} cannot write: {:?}",
                cluster.reply(put)
            );
        }
    }
}

/// Attack 3: a context that adds 255 made-up actors, one short of the limit on a key's context.
/// The forged write would fit, but every write through another coordinator would then add its
/// actor, exceed the limit and be refused: every context a read hands out would be useless.
#[test]
fn a_context_with_made_up_actors_is_refused_and_read_contexts_stay_usable() {
    let config = CoreConfig::default();
    let made_up = config.context_entries_max - 1;
    let mut cluster = Driver::new(3, 3, config);
    let [n1, n2, _] = cluster.ids();
    let forged = ClientContext::from(CausalContext::from_dots(
        (0..made_up as u64).map(|a| Dot::new(Actor(0xdead_0000 + a), 1)),
    ));
    for (token, what) in forgeries(&mut cluster, &n1, &forged) {
        let attack = cluster.put_with(&n1, KEY, "attack", Some(token), 3);
        cluster.settle();
        assert_refused_as_forged(&cluster, attack, what);
        let context = read_context(&mut cluster, &n2);
        let put = cluster.put_with(&n2, KEY, &format!("after {what}"), Some(context), 3);
        cluster.settle();
        assert!(
            cluster.written(put),
            "{what}: a write with a read's context: {:?}",
            cluster.reply(put)
        );
    }
}
