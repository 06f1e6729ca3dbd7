//! Scenario tests, written as stories: the classic Riak regressions, the crash, wipe and
//! deletion that make actors incarnations, and the size of a hot key's context. Each "bug"
//! variant runs the same story with the rule broken, to show that the story can fail.

use super::*;

fn id(n: u64) -> RequestId {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    RequestId(bytes)
}

/// A replica in a story: its clock and its state of the one key.
struct Node {
    clock: ActorClock,
    state: KeyState,
}

impl Node {
    fn start(actor: u64) -> Node {
        let (clock, _persist_before_serving) = on_start(None, actor);
        Node {
            clock,
            state: KeyState::new(),
        }
    }

    /// Coordinates a client's write and returns the context handed back to the client.
    fn put(&mut self, context: &CausalContext, request: u64, value: &str) -> CausalContext {
        self.try_put(context, request, value)
            .expect("write accepted")
    }

    fn try_put(
        &mut self,
        context: &CausalContext,
        request: u64,
        value: &str,
    ) -> crate::Result<CausalContext> {
        let dot = self.clock.next_dot(&self.state);
        let outcome = self.state.update(
            context,
            dot,
            id(request),
            request,
            Some(value.as_bytes().to_vec()),
        )?;
        Ok(outcome.context)
    }

    fn read(&self) -> (Vec<String>, CausalContext) {
        let values = self
            .state
            .values()
            .into_iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        (values, self.state.context().clone())
    }

    fn receive(&mut self, other: &KeyState) {
        self.state.join_in_place(other);
    }
}

/// Replicates `from`'s state to every node (what the coordinator's replica writes do).
fn replicate(nodes: &mut [Node], from: usize) {
    let state = nodes[from].state.clone();
    for node in nodes.iter_mut() {
        node.receive(&state);
    }
}

fn join_all(nodes: &[Node]) -> Vec<String> {
    let mut all = KeyState::new();
    for node in nodes {
        all.join_in_place(&node.state);
    }
    let mut values: Vec<String> = all
        .values()
        .into_iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    values.sort();
    values
}

#[test]
fn sibling_explosion_two_clients_writing_with_their_own_put_contexts() {
    // Riak's sibling explosion: two clients X and Y interleave read-modify-write on one key.
    // Each writes with the context its own previous put returned, without re-reading. X goes
    // through node A, Y through node B; every write is replicated to all three nodes.
    let mut nodes = vec![Node::start(0xA), Node::start(0xB), Node::start(0xC)];
    let mut x = CausalContext::new();
    let mut y = CausalContext::new();
    for round in 0..100u64 {
        x = nodes[0].put(&x, 2 * round, &format!("x{round}"));
        replicate(&mut nodes, 0);
        y = nodes[1].put(&y, 2 * round + 1, &format!("y{round}"));
        replicate(&mut nodes, 1);
        // Each write replaces its own client's previous one and keeps the other client's: never
        // more than the two truly concurrent writers.
        for node in &nodes {
            assert!(
                node.state.sibling_count() <= 2,
                "round {round}: {:?}",
                node.state
            );
        }
    }
    assert_eq!(join_all(&nodes), vec!["x99", "y99"]);
}

#[test]
fn sibling_explosion_two_clients_rereading_before_each_write() {
    // The same two clients, but each reads (from a different node each time) before writing, and
    // the reads and writes interleave: X reads, Y reads, X writes, Y writes.
    let mut nodes = vec![Node::start(0xA), Node::start(0xB), Node::start(0xC)];
    for round in 0..100u64 {
        let (_, x) = nodes[(round % 3) as usize].read();
        let (_, y) = nodes[((round + 1) % 3) as usize].read();
        nodes[0].put(&x, 2 * round, &format!("x{round}"));
        replicate(&mut nodes, 0);
        nodes[1].put(&y, 2 * round + 1, &format!("y{round}"));
        replicate(&mut nodes, 1);
        for node in &nodes {
            assert!(
                node.state.sibling_count() <= 2,
                "round {round}: {:?}",
                node.state
            );
        }
    }
    // Y's last write did not see X's last one: both remain, as siblings.
    assert_eq!(join_all(&nodes), vec!["x99", "y99"]);
}

/// Replicas A, B, C; writes coordinated at A reach everyone; then A's data directory is wiped
/// and A restarts with `restart(old clock)`. A client that read "not found" from A writes
/// `after-wipe` at A. Returns the values left after everything is joined, and whether a second
/// write at A, with a context read from B, was accepted.
fn wiped_replica_rejoins(restart: impl FnOnce(&ActorClock) -> ActorClock) -> (Vec<String>, bool) {
    let mut nodes = vec![Node::start(0xA), Node::start(0xB), Node::start(0xC)];
    let old_clock = nodes[0].clock.clone();

    // Two writes coordinated at A, the second replacing the first; both replicated.
    let first = nodes[0].put(&CausalContext::new(), 1, "v1");
    replicate(&mut nodes, 0);
    nodes[0].put(&first, 2, "v2");
    replicate(&mut nodes, 0);

    // A loses its disk and comes back empty.
    nodes[0] = Node {
        clock: restart(&old_clock),
        state: KeyState::new(),
    };

    // A client reads from A alone (R=1): not found, empty context. It writes "after-wipe".
    let (values, empty) = nodes[0].read();
    assert!(values.is_empty());
    nodes[0].put(&empty, 3, "after-wipe");

    // Another client reads from B (sees v2) and writes through A, replacing v2.
    let (_, from_b) = nodes[1].read();
    let accepted = nodes[0].try_put(&from_b, 4, "replaces-v2").is_ok();

    // Replication and anti-entropy join everything.
    replicate(&mut nodes, 0);
    replicate(&mut nodes, 1);
    replicate(&mut nodes, 2);
    (join_all(&nodes), accepted)
}

#[test]
fn wiped_replica_rejoins_with_a_new_actor_and_loses_nothing() {
    // The wiped node has no incarnation record, so it takes a brand-new actor.
    let (values, accepted) = wiped_replica_rejoins(|_| on_start(None, 0xA2).0);
    assert!(accepted);
    // v1 and v2 were replaced by writers that saw them; both new writes survive.
    assert_eq!(values, vec!["after-wipe", "replaces-v2"]);
}

#[test]
fn wiped_replica_reusing_its_old_actor_drops_a_write() {
    // The bug: the node keeps its old identity (say, its node id) with an empty state, so the
    // key's counter starts again at 1.
    let reuse = |old: &ActorClock| on_start(Some(on_clean_shutdown(old)), 0xA2).0;
    let (values, accepted) = wiped_replica_rejoins(reuse);
    // "after-wipe" got dot (A, 1) again. B and C have seen (A, 1) (it was v1, since replaced),
    // so the join takes the new write for v1's ghost and drops it: acknowledged, then lost.
    assert!(!values.contains(&"after-wipe".to_owned()), "{values:?}");
    assert_eq!(values, vec!["v2"]);
    // The second write is refused outright: its context (from B) claims dot (A, 2), which the
    // reused clock had not issued yet. Refusing beats losing, but only a new actor is correct.
    assert!(!accepted);
}

/// Replicas A and B. A coordinates six writes (each replacing the last) and a seventh,
/// `seventh`, that reaches B durably but is lost from A's unflushed memory when A crashes. A
/// restarts with `restart` and a client that reads from A writes `after-crash` there.
fn crash_loses_unflushed_dot(restart: impl FnOnce(IncarnationRecord) -> ActorClock) -> Vec<String> {
    let (clock, record_at_start) = on_start(None, 0xA);
    let mut a = Node {
        clock,
        state: KeyState::new(),
    };
    let mut b = Node::start(0xB);

    let mut context = CausalContext::new();
    for n in 1..=6u64 {
        context = a.put(&context, n, &format!("v{n}"));
    }
    b.receive(&a.state);
    let flushed = a.state.clone();

    // The seventh write: dot (A, 7), replicated to B and acknowledged, not yet flushed at A.
    a.put(&context, 7, "seventh");
    assert_eq!(a.state.siblings()[0].dot.counter, 7);
    b.receive(&a.state);

    // A crashes. On disk: the data as of the last flush, and the record written at start
    // (clean_shutdown = false).
    let mut a = Node {
        clock: restart(record_at_start),
        state: flushed,
    };

    // A client reads from A (sees v6) and writes.
    let (values, context) = a.read();
    assert_eq!(values, vec!["v6"]);
    a.put(&context, 8, "after-crash");

    join_all(&[a, b])
}

#[test]
fn crash_restart_with_a_new_actor_keeps_the_acknowledged_write() {
    let values = crash_loses_unflushed_dot(|record| {
        assert!(!record.clean_shutdown);
        on_start(Some(record), 0xA2).0
    });
    // "after-crash" did not see "seventh": they are concurrent, and both survive.
    assert_eq!(values, vec!["after-crash", "seventh"]);
}

#[test]
fn crash_restart_reusing_the_actor_drops_the_acknowledged_write() {
    // The bug: ignoring the missing clean marker and continuing the old actor. The key's
    // counter resumes from what the flushed state shows (dot 6), so it issues (A, 7) a second
    // time.
    let values = crash_loses_unflushed_dot(|record| {
        on_start(
            Some(IncarnationRecord {
                clean_shutdown: true,
                ..record
            }),
            0xA2,
        )
        .0
    });
    // Two different writes now carry dot (A, 7); the join keeps one. An acknowledged write is
    // gone.
    assert_eq!(values.len(), 1, "{values:?}");
}

/// Replicas A and B. A key is written, deleted, and its state collected everywhere (tombstone
/// collection); after collecting, A's clock becomes `after_collection(old clock)`. A client X
/// still holds the context of the first write. A new write comes in at A and is replicated;
/// then X writes through B with its old context. Returns the values left.
fn collected_key_is_written_again(
    after_collection: impl FnOnce(&ActorClock) -> ActorClock,
) -> Vec<String> {
    let mut nodes = vec![Node::start(0xA), Node::start(0xB)];
    let x = nodes[0].put(&CausalContext::new(), 1, "v1");
    replicate(&mut nodes, 0);
    let a = &mut nodes[0];
    let dot = a.clock.next_dot(&a.state);
    a.state
        .update(&x, dot, id(2), 2, None)
        .expect("delete accepted");
    replicate(&mut nodes, 0);
    assert!(nodes[0].state.is_deleted());

    // Every replica holds the tombstone, so it is collected: the key's state is gone everywhere,
    // and each node that deleted state retires its actor before coordinating again.
    for (n, node) in nodes.iter_mut().enumerate() {
        node.state = KeyState::new();
        if n > 0 {
            node.clock = on_local_deletion(&node.clock, 0xB2).0;
        }
    }
    nodes[0].clock = after_collection(&nodes[0].clock);

    // A new client writes the key again through A; it is replicated to B.
    nodes[0].put(&CausalContext::new(), 3, "new");
    replicate(&mut nodes, 0);

    // X, which never saw "new", writes through B with the context of its first write.
    nodes[1].put(&x, 4, "from-x");
    replicate(&mut nodes, 1);
    join_all(&nodes)
}

#[test]
fn a_collected_key_is_written_again_under_a_new_actor_and_loses_nothing() {
    let values = collected_key_is_written_again(|clock| {
        let (retired, record) = on_local_deletion(clock, 0xA2);
        assert_ne!(retired.actor(), clock.actor());
        assert_eq!(record.actor, retired.actor());
        assert!(!record.clean_shutdown);
        retired
    });
    // "new" got (A2, 1), which nobody had seen. X had not seen "new": both survive as siblings.
    assert_eq!(values, vec!["from-x", "new"]);
}

#[test]
fn a_collected_key_written_again_under_the_old_actor_drops_a_write() {
    // The bug: the node forgets to retire its actor after collecting. The key's state is gone,
    // so its counter starts again at 1 and "new" gets dot (A, 1), the dot of "v1", which X's
    // stale context contains.
    let values = collected_key_is_written_again(Clone::clone);
    // X's write replaced "new", which X never saw: acknowledged, then lost.
    assert_eq!(values, vec!["from-x"]);
}

/// A random-looking actor, as `on_start` gets from the OS RNG: token sizes are realistic.
const RANDOM_ACTOR: u64 = 0x9e37_79b9_7f4a_7c15;

/// One node's states of many keys, for the stories about context sizes.
struct Store {
    clock: ActorClock,
    keys: std::collections::BTreeMap<String, KeyState>,
}

impl Store {
    fn start(actor: u64) -> Store {
        Store {
            clock: on_start(None, actor).0,
            keys: Default::default(),
        }
    }

    fn state(&self, key: &str) -> KeyState {
        self.keys.get(key).cloned().unwrap_or_default()
    }

    /// Coordinates a write with the dot `dot_for` picks for the node's own state of the key, and
    /// stores it; returns the context handed back to the writer.
    fn put_with(
        &mut self,
        dot_for: &mut impl FnMut(&ActorClock, &KeyState) -> Dot,
        key: &str,
        context: &CausalContext,
        request: u64,
    ) -> CausalContext {
        let state = self.keys.entry(key.to_owned()).or_default();
        let dot = dot_for(&self.clock, state);
        let value = request.to_le_bytes().to_vec();
        state
            .update(context, dot, id(request), request, Some(value))
            .expect("write accepted")
            .context
    }

    fn put(&mut self, key: &str, context: &CausalContext, request: u64) -> CausalContext {
        self.put_with(
            &mut |clock, state| clock.next_dot(state),
            key,
            context,
            request,
        )
    }
}

fn test_keys() -> super::ContextKeys {
    super::ContextKeys::new(super::ClusterSecret::from_bytes([5; 32]), [])
}

fn token_len(context: &CausalContext, key: &str) -> usize {
    encode_token(&test_keys(), &context.clone().into(), "ks", key.as_bytes()).len()
}

/// A hot key written 1,000 times through one coordinator, each write with the context of a
/// fresh read and followed by writes to three other keys, with dots from `dot_for`. Checks that
/// every write replaces the last; returns the largest context seen (entries, token bytes),
/// stored or handed back, and the key's final context.
fn hot_key_story(
    mut dot_for: impl FnMut(&ActorClock, &KeyState) -> Dot,
) -> (usize, usize, CausalContext) {
    let mut node = Store::start(RANDOM_ACTOR);
    let (mut entries, mut bytes) = (0, 0);
    for n in 0..1_000u64 {
        let read = node.state("hot").context().clone();
        let returned = node.put_with(&mut dot_for, "hot", &read, n);
        for other in 0..3u64 {
            let key = format!("other-{}", (n + other) % 17);
            node.put_with(
                &mut dot_for,
                &key,
                &CausalContext::new(),
                1_000_000 + 3 * n + other,
            );
        }
        let state = node.state("hot");
        assert_eq!(state.sibling_count(), 1, "write {n}: {state:?}");
        for context in [state.context(), &returned] {
            entries = entries.max(context.len());
            bytes = bytes.max(token_len(context, "hot"));
        }
    }
    (entries, bytes, node.state("hot").context().clone())
}

#[test]
fn a_hot_key_keeps_a_one_entry_context() {
    let (entries, bytes, last) = hot_key_story(|clock, state| clock.next_dot(state));
    println!("hot key, 1,000 writes: {entries} context entry, tokens of at most {bytes} bytes");
    assert_eq!(entries, 1);
    assert!(bytes < 64, "{bytes} bytes");
    assert_eq!(
        last.version_vector().get(&Actor(RANDOM_ACTOR)),
        Some(&1_000)
    );
    let token = encode_token(&test_keys(), &last.clone().into(), "ks", b"hot");
    assert_eq!(
        decode_token(&test_keys(), &token, "ks", b"hot", 256)
            .unwrap()
            .context,
        last
    );
}

#[test]
fn a_node_wide_counter_grows_a_hot_keys_context_with_every_write() {
    // The first design: one counter per actor for all keys. The hot key's dots have gaps (the
    // other keys' dots), so they never fold into the version vector.
    let mut next = 1u64;
    let (entries, bytes, last) = hot_key_story(|clock, state| {
        let counter = next.max(state.context().max_counter(clock.actor()) + 1);
        next = counter + 1;
        Dot::new(clock.actor(), counter)
    });
    println!("node-wide counter, 1,000 writes: {entries} entries, {bytes}-byte tokens");
    assert!(entries > 256, "{entries} entries");
    let token = encode_token(&test_keys(), &last.clone().into(), "ks", b"hot");
    let err = decode_token(&test_keys(), &token, "ks", b"hot", 256);
    assert!(
        matches!(err, Err(crate::Error::ContextTooLarge { .. })),
        "{err:?}"
    );
}

#[test]
fn a_client_chaining_its_put_contexts_keeps_a_one_entry_context() {
    // A client writes 100 times through A with the context its previous put returned, never
    // reading; A coordinates writes to other keys in between. The returned context is the
    // writer's context plus the new dot, which is contiguous with it.
    let mut node = Store::start(RANDOM_ACTOR);
    let mut context = CausalContext::new();
    let mut bytes = 0;
    for n in 0..100u64 {
        context = node.put("chained", &context, n);
        for other in 0..3u64 {
            node.put(
                &format!("other-{other}"),
                &CausalContext::new(),
                1_000 + 3 * n + other,
            );
        }
        assert_eq!(context.len(), 1, "write {n}: {context:?}");
        assert_eq!(node.state("chained").sibling_count(), 1);
        bytes = bytes.max(token_len(&context, "chained"));
    }
    println!("chained put contexts, 100 writes: 1 entry, tokens of at most {bytes} bytes");
    assert!(bytes < 64, "{bytes} bytes");
    assert_eq!(&context, node.state("chained").context());
}

#[test]
fn two_clients_chaining_at_one_coordinator_carry_each_others_gaps_until_they_read() {
    // A known cost, not a loss: X and Y each write with the context of their own previous put,
    // through the same coordinator, never reading. Each one's context carries its own dots but
    // not the other's (it never saw them), so every write after one of the other's adds a
    // cloud dot. Siblings stay at two, and one read brings the context back to one entry.
    let mut node = Store::start(RANDOM_ACTOR);
    let (mut x, mut y) = (CausalContext::new(), CausalContext::new());
    for n in 0..100u64 {
        x = node.put("k", &x, 2 * n);
        y = node.put("k", &y, 2 * n + 1);
        assert!(node.state("k").sibling_count() <= 2);
        assert_eq!(x.len() as u64, n + 1, "{x:?}");
    }
    println!(
        "two clients chaining at one coordinator, 100 rounds: {} entries, {} bytes; after a read: {} entry",
        x.len(),
        token_len(&x, "k"),
        node.state("k").context().len()
    );
    assert_eq!(node.state("k").context().len(), 1);
    let read = node.state("k").context().clone();
    let after = node.put("k", &read, 1_000);
    assert_eq!(after.len(), 1);
    assert_eq!(node.state("k").sibling_count(), 1);
}
