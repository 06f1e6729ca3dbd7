//! Causality: dotted version vectors, siblings, client contexts and node incarnations.
//!
//! # What this module guarantees
//!
//! Every key's replicated state is a [`KeyState`]: the versions of its value that are still
//! current (its *siblings*) and a causal *context*, the set of writes the replica has seen.
//! With it, and as long as every write path ends in [`KeyState::join`]:
//!
//! - **Concurrent writes become siblings.** Two writes whose writers had not seen each other
//!   are both kept, whichever coordinators took them and in whatever order replicas learn them.
//! - **A write replaces exactly what its writer saw.** A client that read some siblings and
//!   writes with the context of that read replaces those siblings, and only those.
//! - **Nothing acknowledged is silently dropped.** A stored write disappears only when a later
//!   write whose writer had seen it replaces it.
//! - **Siblings stay bounded by truly concurrent writers.** Two clients interleaving
//!   read-modify-write on one key leave at most two siblings (Riak's "sibling explosion" cannot
//!   happen).
//! - **Replicas converge.** Join is commutative, associative and idempotent, so replicas that
//!   have received the same writes, by any paths in any order, hold the same state and the same
//!   canonical bytes ([`KeyState::encode_canonical`], [`KeyState::state_hash`]).
//! - **A retried write is one write.** A client reuses the [`RequestId`] of a write when it
//!   retries it; a coordinator that holds the write, or knows it was superseded, recognises
//!   it; reads show one sibling per request id even when two coordinators each stored a copy;
//!   and a write that supersedes one copy supersedes every copy, wherever they meet.
//!
//! # The algorithm
//!
//! A *dot* `(actor, counter)` names one write of a key: the `counter`-th write of that key
//! coordinated by one *actor*.
//! A [`CausalContext`] is a set of dots, stored as a version vector (`actor -> n` meaning
//! dots `1..=n`) plus a *cloud* of dots learned out of order. Each sibling carries the dot of the
//! write that created it; the key's context holds every dot the replica has seen, both the
//! siblings' and those of writes it knows were replaced. This is the dotted version vector of
//! Preguiça, Baquero, Almeida, Fonte and Gonçalves, "Dotted Version Vectors: Logical Clocks for
//! Optimistic Replication" (2010, <https://arxiv.org/abs/1011.5808>), in the sibling-set form
//! that Riak ships as the DVV set: Almeida, Baquero, Gonçalves, Preguiça and Fonte, "Scalable and
//! Accurate Causality Tracking for Eventually Consistent Stores" (DAIS 2014). Written as a dot
//! store and a causal context, it is also the join of delta-state CRDTs (Almeida, Shoker and
//! Baquero, "Delta State Replicated Data Types", JPDC 2018):
//!
//! ```text
//! join((D1, C1), (D2, C2)) = ((D1 ∩ D2) ∪ (D1 \ C2) ∪ (D2 \ C1),  C1 ∪ C2)        (by dot)
//! ```
//!
//! A sibling survives if both replicas hold it, or if the replica that lacks it has never seen
//! its dot. If a replica has seen a dot but no longer holds the sibling, some write replaced it,
//! and the join drops it everywhere. Should both sides hold one dot with different payloads
//! (only a bug or corruption can do that) the larger by (request id, timestamp, value) wins, so
//! that the join stays commutative.
//!
//! **A write** ([`KeyState::update`]) arrives at a coordinating replica with the *client
//! context* `K` (what the writer read; empty for a blind write) and gets a fresh dot `d` from
//! the coordinator's [`ActorClock`]. The coordinator removes exactly the siblings whose dots
//! `K` contains, keeps the others (they are concurrent with the write), adds the new sibling
//! and sets its context to `C ∪ K ∪ {d}`. This is where per-node vector clocks go wrong: they
//! give the new version `K` with the coordinator's entry advanced past everything it stores,
//! which dominates an earlier write through the same coordinator with the same stale `K`, so
//! one of two concurrent writes is lost. The dot separates "what the writer saw" (`K`) from
//! "this event" (`d`).
//!
//! **The writer gets back `K ∪ {d}`, not the state's context.** The state's context may hold
//! siblings that were concurrent with this write and that the writer never saw. Handing it
//! back would let that client's next write (with the returned context, without re-reading)
//! replace those siblings: a write silently lost. `K ∪ {d}` is exactly what the writer knows.
//! A reader, by contrast, gets the whole context of what it read, because it was shown every
//! sibling in it.
//!
//! **Retries.** If a stored sibling carries the write's request id, the write is a retry:
//! nothing changes, no dot is used, and the writer gets `K` plus the dot(s) of the stored
//! copies. A retry through another coordinator that has not received the first copy creates a
//! second sibling with the same request id, under another dot; reads
//! ([`KeyState::live_siblings`], [`KeyState::values`]) show one of them (the lowest dot). Dots
//! alone cannot retire both: a reader shown one copy holds a context that covers that copy's
//! dot only. So a write is also identified by its request id once it is superseded:
//!
//! - a key's state keeps its [`RETIRED_WRITES_MAX`] most recently superseded request ids
//!   ([`KeyState::retired`]): [`KeyState::update`] retires the writes whose siblings it
//!   replaces, and [`KeyState::join`] retires a sibling it drops because the other side has
//!   seen its dot and no longer holds it (the first place where a copy meets its
//!   supersession);
//! - no sibling of a retired write survives a join or an update, so the other copy goes
//!   wherever the superseding state reaches it, and a retry of a retired write changes
//!   nothing;
//! - the client token names the writes its holder was shown (a read: the live siblings' request
//!   ids; a write: its own), and the coordinator retires them ([`KeyState::supersede`]) before
//!   applying the write, so even a coordinator that holds only the other copy drops it.
//!
//! The bound is the horizon: a copy that meets the superseding state only after the key has had
//! [`RETIRED_WRITES_MAX`] more recent supersessions comes back as a sibling (never lost data,
//! only a duplicate the client resolves). Each retired entry costs about 28 bytes in a key
//! written that often. Retiring by request id is monotone (a sibling dropped for it stays
//! dropped, since its dot stays in the context), so replicas still converge; join stays
//! commutative and idempotent, and associative except when the bound evicts a retirement
//! before the copy it would have dropped arrives.
//!
//! **Deletes** are writes of a tombstone (`value: None`): a sibling like any other, so a delete
//! replaces what its writer saw and nothing else. Reads hide tombstones;
//! [`KeyState::is_deleted`] says a key was written and every surviving sibling is a tombstone.
//! Nothing here assumes tombstones live forever: a node may collect a key's state entirely,
//! context included, provided it retires its actor (rule 4 below). When a tombstone may be
//! collected (not before every replica holds it, or a replica that never saw the delete would
//! bring back what it replaced) is the collection code's concern.
//!
//! **Counters are per key.** [`ActorClock::next_dot`] gives a write the dot `(actor, n + 1)`,
//! where `n` is the highest counter of the coordinator's actor in the coordinator's own stored
//! state of the key. There is no node-wide counter and nothing to persist per write. The new
//! dot is fresh because that state holds every dot the actor issued for the key (the invariant
//! of the next section), and it is contiguous with them, so it folds into the version vector:
//! a key's context holds one entry per actor that wrote it, plus the cloud dots that client
//! contexts bring in from truly concurrent writes, which fold away as the replicas' states
//! join. (The first design had one node-wide counter per actor; one key's dots from an actor
//! then had gaps, the other keys' dots, so they never folded and a key's context grew by one
//! entry per write, forever.)
//!
//! # Actors are node incarnations
//!
//! Per-key counters rest on one invariant: **for the current actor, the node's stored state of
//! every key holds every dot that actor issued for it.** Stored contexts only grow (every write
//! to storage is a join), so once a dot is stored the key's counter stays above it. A node can
//! forget a dot only by not storing it, by losing storage, or by deleting state; four rules
//! keep the invariant through all three:
//!
//! 1. **The coordinator stores its write before replicating it.** The coordinator applies
//!    [`KeyState::update`] to its own stored state of the key and merges the result into its
//!    storage before it replicates or acknowledges the write, and it coordinates one write of
//!    a key at a time (read, [`ActorClock::next_dot`], `update`, merge). These are the
//!    preconditions of `update` and `next_dot`; nothing here can check them.
//! 2. **An unclean start takes a new actor.** A crash can lose unflushed writes, including the
//!    node's own copy of dots it issued and that other replicas hold durably. If the node kept
//!    its actor it would issue one of those dots again: two writes under one dot, of which a
//!    join keeps one, and a writer handed back a context that claims the other, which its next
//!    write would replace unseen. Either way an acknowledged write held elsewhere is silently
//!    dropped. So [`on_start`] continues the old actor only after a clean shutdown
//!    ([`on_clean_shutdown`] is written after the final flush, so nothing was lost and version
//!    vectors stay small); after any other start it takes a brand-new random actor, which
//!    never claims any old dot.
//! 3. **A new or wiped data directory takes a new actor.** With no record at all, [`on_start`]
//!    takes a new random actor. This is Riak's "a node that rejoins with wiped data drops new
//!    writes": an empty node that kept its identity would count from 1 again, and replicas
//!    that saw its old `(actor, 1)` would take the new write for the old one and discard it.
//!    The record `on_start` returns is persisted (unclean) before the node serves anything, and
//!    must live in the same data directory as the data so that both are lost together. For the
//!    same reason, restoring a backup of a data directory must discard the restored record (or
//!    mark it unclean): the backup lacks the dots issued since it was taken.
//! 4. **Deleting local state takes a new actor.** Whenever the node deletes its state of keys
//!    other than by a join (tombstone collection, handing a range over to another node, an
//!    operator's repair), the collection and handoff code MUST call [`on_local_deletion`],
//!    switch to the clock it returns and persist its record durably before it coordinates
//!    another write; no write may be coordinated with the old actor once any of the deletion
//!    has taken effect. One new actor per collection pass or handoff, not per key: each one
//!    costs a version-vector entry in the keys written afterwards.
//!
//! Rule 4 is what makes collecting a key's state entirely safe. The deleted state was the only
//! record of which dots the actor had issued for the key; the actor would start the key again
//! at `(actor, 1)`, and a stale client context or replica that still holds the old
//! `(actor, 1)` would take the new write for the old one and swallow it. A retired actor
//! issues nothing more, so contexts that remember its dots can only name writes that are gone,
//! and the new actor's dots are new to everyone. Other actors' dots for the key stay safe by
//! the same invariant on their own nodes: a node that still stores the key still holds its
//! dots, and a node that deleted the key retired its actor too.
//!
//! # Invariants
//!
//! - **Invariant:** a `CausalContext` is normalised: no cloud dot is covered by or contiguous
//!   with its version vector, and no version-vector entry is zero.
//! - **Invariant:** a `KeyState`'s siblings are sorted by dot, no dot twice, and every sibling's
//!   dot is in its context.
//! - **Invariant:** no stored sibling's dot is in the causal history of another stored sibling.
//! - **Invariant:** a write removes only siblings whose dots its writer's context contains.
//! - **Invariant:** the context handed back after a write is the writer's context plus the
//!   write's dot(s), never the state's context.
//! - **Invariant:** for the current actor, the node's stored state of every key holds every dot
//!   that actor issued for it: the coordinator merges a write into its storage before
//!   replicating it, one write of a key at a time, and an unclean start, a new or wiped data
//!   directory, or a deletion of local key state takes a new random actor.
//! - **Invariant:** a key's dot is one above the highest counter of its actor in the
//!   coordinator's own state of the key, so an actor never issues a dot twice and the dots an
//!   actor issues for a key are exactly `1..=n`.
//! - **Invariant:** the coordinator's own state of a key holds its current actor's dots as one
//!   version-vector entry, never in the cloud.
//! - **Invariant:** a write is refused, not stored, if its dot is not above every dot of its
//!   actor that the key's state or the client's context claims.
//! - **Invariant:** equal states have equal canonical bytes and equal hashes; decoding accepts
//!   only canonical bytes of a valid state.
//! - **Invariant:** no stored sibling belongs to a retired write, and a state holds at most
//!   [`RETIRED_WRITES_MAX`] retired writes, the most recent ones.
//!
//! # How it fails
//!
//! - Bytes that are not a valid state decode to [`Error::CorruptState`]; client tokens that are
//!   too long or hold too many entries to [`Error::ContextTooLarge`] (the length is checked
//!   first), whose MAC no accepted cluster secret made (forged, damaged, of the old unkeyed
//!   formats, or sealed with a retired secret) to [`Error::ContextNotAuthentic`], empty,
//!   truncated or undecodable to [`Error::ContextCorrupt`], an authentic token of an unknown
//!   format to [`Error::ContextUnknownVersion`], of another key to
//!   [`Error::ContextWrongKey`]. Never a panic, and
//!   never a silent fall-back to an empty context (which would turn an update into a sibling).
//!   A client that has no context sends none, and the caller uses [`CausalContext::new`].
//! - [`KeyState::update`] refuses a dot that is not fresh ([`Error::DotNotFresh`]: a clock bug,
//!   a state that is not the coordinator's own, or a key whose counter reached `u64::MAX`,
//!   which saturates rather than wraps) and a client context that claims a dot its coordinator
//!   has not issued for the key ([`Error::ContextClaimsUnissuedDot`]), leaving the state
//!   unchanged. The second catches some uses of a reused actor; forged contexts (one that
//!   claims another actor's future dots, say) do not get this far, because tokens carry a MAC
//!   under the cluster secret that only nodes hold. Neither catches a precondition broken without a trace (a write
//!   applied to a stale copy, two writes of a key coordinated at once): those reuse a dot.
//! - Nothing here enforces limits by dropping data. [`KeyState::sibling_count`] lets the caller
//!   refuse a write when a key has too many siblings, and `decode_token`'s `max_entries` bounds
//!   a client context.
//! - A key's context holds one version-vector entry per actor that wrote it, and entries are
//!   never removed: every unclean restart, wiped data directory or local deletion gives its
//!   node a new actor, which adds an entry to every key written through the node afterwards.
//!   A key written 1,000 times through one node that never restarted uncleanly has a one-entry
//!   context (a token of under 64 bytes). Cloud dots are transient in stored states (they fold as the
//!   replicas' states join, except around dots lost for good with a wiped node) but not in a
//!   client's hands: a client that keeps writing with the
//!   contexts its own puts return, while another client writes the same key through the same
//!   coordinator, gains one cloud dot for each of its writes that follows one of the other
//!   client's, until it reads again. The `max_entries` limit turns an overgrown context into
//!   an error, not a crash. Removing retired actors' entries once every replica covers them
//!   (version-vector garbage collection by causal stability) is future work.
//!
//! # Encodings
//!
//! [`KeyState::encode_canonical`] is a format version byte ([`STATE_FORMAT_VERSION`], 2) then
//! MessagePack of the normalised state `[context, siblings, retired]`; [`KeyState::state_hash`]
//! is BLAKE3 of it, and [`KeyState::decode`] accepts only those exact bytes of a valid state
//! (and version 1's `[context, siblings]`, written before retired writes existed).
//!
//! The client token ([`encode_token`], [`decode_token`]) is
//!
//! ```text
//! body  = version u8 (= 3)
//!      || binding  8 bytes = BLAKE3("quorumkv/context-binding/v1\0" || len(keyspace) u64 LE
//!                                   || keyspace || len(key) u64 LE || key)[..8]
//!      || MessagePack([CausalContext, [RequestId, ...]])   (a ClientContext)
//! token = body || MAC 32 bytes = keyed BLAKE3(cluster secret, "quorumkv/context-mac/v3\0" || body)
//! ```
//!
//! The decoder checks the token's length against [`token_bytes_max`], then the MAC with every
//! accepted secret ([`ContextKeys`]: the current one, which seals every new token, and the
//! previous ones of a rotation), before it reads a byte of the body; then the version, the
//! binding (another key's token is refused, never applied to this key), the context (it must be
//! normalised and canonical, the writes sorted) and its entries. Versions 1 and 2 were sealed
//! with an unkeyed checksum anyone could compute and are refused as not authentic.
//! [`token_to_text`] and [`token_from_text`] convert to and from base64url without padding for
//! the CLI and JSON.
//!
//! [`Error::CorruptState`]: crate::Error::CorruptState
//! [`Error::ContextCorrupt`]: crate::Error::ContextCorrupt
//! [`Error::ContextUnknownVersion`]: crate::Error::ContextUnknownVersion
//! [`Error::ContextNotAuthentic`]: crate::Error::ContextNotAuthentic
//! [`Error::ContextWrongKey`]: crate::Error::ContextWrongKey
//! [`Error::ContextTooLarge`]: crate::Error::ContextTooLarge
//! [`Error::DotNotFresh`]: crate::Error::DotNotFresh
//! [`Error::ContextClaimsUnissuedDot`]: crate::Error::ContextClaimsUnissuedDot

mod clock;
mod context;
mod state;
mod token;

pub use clock::{on_clean_shutdown, on_local_deletion, on_start, ActorClock, IncarnationRecord};
pub use context::{Actor, CausalContext, Dot};
pub use state::{
    KeyState, RequestId, Retired, Sibling, UpdateOutcome, RETIRED_WRITES_MAX, STATE_FORMAT_VERSION,
};
pub use token::{
    decode_token, encode_token, token_bytes_max, token_from_text, token_to_text, ClientContext,
    ClusterSecret, ContextKeys, CLUSTER_SECRET_LEN, TOKEN_FORMAT_VERSION,
};

#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod tests;
