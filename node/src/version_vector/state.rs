//! The replicated state of one key: siblings plus the causal context that explains them.

use super::context::{CausalContext, Dot};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

/// The first byte of [`KeyState::encode_canonical`]: the format of everything after it.
/// Version 2 added the retired writes; [`KeyState::decode`] still reads version 1 (a state
/// without them).
pub const STATE_FORMAT_VERSION: u8 = 2;

/// How many superseded writes a key remembers ([`KeyState::retired`]): the most recent ones.
///
/// It is part of the replicated state's meaning, so every node must use the same number; it is
/// a constant, not a setting. Each entry costs about 28 bytes in a key written that often.
pub const RETIRED_WRITES_MAX: usize = 8;

/// Identifies one logical write. The client picks it at random (128 bits) and reuses it when it
/// retries that write, so that a retry is recognised instead of stored twice.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// One version of a key's value, created by one write.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sibling {
    /// The event that created it; unique among all versions of the key.
    pub dot: Dot,
    /// The logical write it belongs to (shared by that write's retries).
    pub request_id: RequestId,
    /// The coordinator's wall clock when it accepted the write, in ms since the Unix epoch. For
    /// display and client-side resolution only: causality never looks at it.
    pub timestamp_ms: u64,
    /// The value; `None` is a tombstone (a delete).
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

impl Sibling {
    /// Whether this sibling records a delete.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The order used to pick one payload when two replicas disagree about the same dot, which
    /// only a bug or corruption can cause. Any total order keeps the join commutative.
    fn payload_cmp(&self, other: &Sibling) -> Ordering {
        (self.request_id, self.timestamp_ms, &self.value).cmp(&(
            other.request_id,
            other.timestamp_ms,
            &other.value,
        ))
    }
}

/// A write that was superseded, remembered by its request id so that a copy of it stored by
/// another coordinator (a retry) is dropped wherever it meets this state, and a late retry of
/// it is recognised instead of stored again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Retired {
    /// The superseded write.
    pub request_id: RequestId,
    /// When it was superseded (the superseding write's coordinator clock), or, when a join
    /// learns of it, the superseded sibling's own timestamp. Orders retirements by age: a key
    /// keeps the [`RETIRED_WRITES_MAX`] most recent.
    pub timestamp_ms: u64,
}

impl Retired {
    /// Most recent first, ties broken by request id: the order in which a key keeps them.
    fn recency(&self) -> (std::cmp::Reverse<u64>, RequestId) {
        (std::cmp::Reverse(self.timestamp_ms), self.request_id)
    }
}

/// What [`KeyState::update`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// The context to hand back to the writer: its own context plus the dot(s) of its write.
    /// Never the whole state's context (see the module documentation).
    pub context: CausalContext,
    /// The dot that carries the write: the new one, or for a retry the lowest stored copy's;
    /// `None` for a retry of a write that was already superseded (nothing carries it any more).
    pub dot: Option<Dot>,
    /// Whether the write was recognised as a retry of one already stored here (nothing changed).
    pub is_retry: bool,
}

/// Everything a replica stores for one key.
///
/// Invariants, checked by [`KeyState::decode`] and kept by every operation: siblings are sorted
/// by dot with no dot twice; every sibling's dot is in `context`; `context` is normalised;
/// retired writes are sorted by request id, at most [`RETIRED_WRITES_MAX`], and no sibling
/// belongs to a retired write.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "StateRepr")]
pub struct KeyState {
    context: CausalContext,
    siblings: Vec<Sibling>,
    retired: Vec<Retired>,
}

/// The unchecked wire form of a key state. Version 1 had no retired writes: the field is
/// absent there and defaults to none.
#[derive(Deserialize)]
struct StateRepr {
    context: CausalContext,
    siblings: Vec<Sibling>,
    #[serde(default)]
    retired: Vec<Retired>,
}

/// The version 1 form, for [`KeyState::decode`]'s canonical check of old bytes.
#[derive(Serialize)]
struct StateV1<'a> {
    context: &'a CausalContext,
    siblings: &'a [Sibling],
}

impl TryFrom<StateRepr> for KeyState {
    type Error = String;

    fn try_from(repr: StateRepr) -> Result<KeyState, String> {
        for pair in repr.siblings.windows(2) {
            if pair[0].dot >= pair[1].dot {
                return Err(format!(
                    "siblings not strictly sorted by dot at {}",
                    pair[1].dot
                ));
            }
        }
        for sibling in &repr.siblings {
            if sibling.dot.counter == 0 {
                return Err(format!("sibling with counter 0 ({})", sibling.dot));
            }
            if !repr.context.contains(&sibling.dot) {
                return Err(format!("sibling {} is outside the context", sibling.dot));
            }
        }
        if repr.retired.len() > RETIRED_WRITES_MAX {
            return Err(format!(
                "{} retired writes (at most {RETIRED_WRITES_MAX})",
                repr.retired.len()
            ));
        }
        for pair in repr.retired.windows(2) {
            if pair[0].request_id >= pair[1].request_id {
                return Err("retired writes not strictly sorted by request id".to_owned());
            }
        }
        let state = KeyState {
            context: repr.context,
            siblings: repr.siblings,
            retired: repr.retired,
        };
        if let Some(sibling) = state
            .siblings
            .iter()
            .find(|s| state.is_retired(s.request_id))
        {
            return Err(format!(
                "sibling {} belongs to a retired write",
                sibling.dot
            ));
        }
        Ok(state)
    }
}

impl KeyState {
    /// The state of a key nobody has written.
    pub fn new() -> KeyState {
        KeyState::default()
    }

    /// Everything this replica has seen of the key. A reader gets exactly this (as a token), so
    /// that its next write replaces every sibling it was shown.
    pub fn context(&self) -> &CausalContext {
        &self.context
    }

    /// All siblings, tombstones and retry duplicates included, sorted by dot.
    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// The most recent superseded writes, sorted by request id (see [`Retired`]).
    pub fn retired(&self) -> &[Retired] {
        &self.retired
    }

    fn is_retired(&self, request_id: RequestId) -> bool {
        self.retired
            .binary_search_by(|r| r.request_id.cmp(&request_id))
            .is_ok()
    }

    /// Records that the writer of a write about to be applied had been shown `request_ids`
    /// (its token names them; see [`encode_token`](super::encode_token)): those writes are
    /// superseded, and so is every copy of them, including copies whose dots the writer's
    /// context does not cover because a retry stored them at another coordinator. The caller
    /// leaves out the request id of the write itself.
    pub fn supersede(&mut self, request_ids: &[RequestId], timestamp_ms: u64) {
        self.retire(request_ids.iter().map(|&request_id| Retired {
            request_id,
            timestamp_ms,
        }));
    }

    /// Adds retirements (a request id seen twice keeps its latest time), drops every sibling of
    /// a retired write, then keeps the [`RETIRED_WRITES_MAX`] most recent retirements. The
    /// siblings are filtered before the bound applies, so a retirement always takes effect on
    /// the state it is added to.
    fn retire(&mut self, retirements: impl IntoIterator<Item = Retired>) {
        for entry in retirements {
            match self
                .retired
                .binary_search_by(|r| r.request_id.cmp(&entry.request_id))
            {
                Ok(at) => {
                    let kept = &mut self.retired[at];
                    kept.timestamp_ms = kept.timestamp_ms.max(entry.timestamp_ms);
                }
                Err(at) => self.retired.insert(at, entry),
            }
        }
        if self.retired.is_empty() {
            return;
        }
        let retired = &self.retired;
        self.siblings.retain(|s| {
            retired
                .binary_search_by(|r| r.request_id.cmp(&s.request_id))
                .is_err()
        });
        if self.retired.len() > RETIRED_WRITES_MAX {
            self.retired.sort_by_key(Retired::recency);
            self.retired.truncate(RETIRED_WRITES_MAX);
            self.retired.sort_by_key(|r| r.request_id);
        }
    }

    /// How many siblings are stored. The caller refuses a write when this reaches its configured
    /// limit; this module never drops a sibling to stay under one.
    pub fn sibling_count(&self) -> usize {
        self.siblings.len()
    }

    /// The siblings a reader sees: tombstones left out, and siblings created by retries of one
    /// write (same request id, different coordinators) shown once, as the one with the lowest dot.
    pub fn live_siblings(&self) -> Vec<&Sibling> {
        let mut seen = BTreeSet::new();
        self.siblings
            .iter()
            .filter(|s| !s.is_tombstone() && seen.insert(s.request_id))
            .collect()
    }

    /// The values a reader sees, in the order of [`KeyState::live_siblings`].
    pub fn values(&self) -> Vec<&[u8]> {
        self.live_siblings()
            .into_iter()
            .filter_map(|s| s.value.as_deref())
            .collect()
    }

    /// Whether the key was written and every surviving sibling is a tombstone.
    pub fn is_deleted(&self) -> bool {
        !self.siblings.is_empty() && self.siblings.iter().all(Sibling::is_tombstone)
    }

    /// Whether nothing is known about the key (never written, or nothing seen).
    pub fn is_empty(&self) -> bool {
        self.siblings.is_empty() && self.context.is_empty()
    }

    /// The join of two replicas' states (commutative, associative, idempotent).
    pub fn join(&self, other: &KeyState) -> KeyState {
        let mut out = self.clone();
        out.join_in_place(other);
        out
    }

    /// Joins `other` into `self`. A sibling survives if both sides hold it, or if the side that
    /// lacks it has never seen its dot; a sibling one side lacks although it has seen its dot was
    /// replaced there, so it is dropped, and its write is retired (so a copy of it stored by
    /// another coordinator is dropped too, here or wherever this state goes). The contexts and
    /// the retired writes are united, and no sibling of a retired write survives.
    pub fn join_in_place(&mut self, other: &KeyState) {
        let mut dropped = Vec::new();
        let mut merged = Vec::with_capacity(self.siblings.len().max(other.siblings.len()));
        let mut left = std::mem::take(&mut self.siblings).into_iter().peekable();
        let mut right = other.siblings.iter().peekable();
        loop {
            let order = match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(l), Some(r)) => l.dot.cmp(&r.dot),
            };
            match order {
                Ordering::Less => {
                    if let Some(l) = left.next() {
                        if !other.context.contains(&l.dot) {
                            merged.push(l);
                        } else {
                            dropped.push(retirement_of(&l));
                        }
                    }
                }
                Ordering::Greater => {
                    if let Some(r) = right.next() {
                        if !self.context.contains(&r.dot) {
                            merged.push(r.clone());
                        } else {
                            dropped.push(retirement_of(r));
                        }
                    }
                }
                Ordering::Equal => {
                    if let (Some(l), Some(r)) = (left.next(), right.next()) {
                        let keep = if r.payload_cmp(&l) == Ordering::Greater {
                            r.clone()
                        } else {
                            l
                        };
                        merged.push(keep);
                    }
                }
            }
        }
        self.siblings = merged;
        self.context.join(&other.context);
        self.retire(dropped.into_iter().chain(other.retired.iter().copied()));
    }

    /// Applies a client's write at the coordinating actor `dot.actor`.
    ///
    /// `client_context` is what the writer had read (empty for a blind write) and `dot` is
    /// `clock.next_dot(self)` from this node's [`ActorClock`](super::ActorClock). The siblings
    /// the client context covers are replaced; the others are concurrent with the write and
    /// stay. If a sibling of the same `request_id` is still stored, the write is a retry and
    /// nothing changes.
    ///
    /// Preconditions (the caller's; nothing here can check them):
    ///
    /// - `self` is the coordinating node's own stored state of the key, as read from its
    ///   storage, never another replica's state or a copy received in a message;
    /// - the result is merged into this node's storage (the storage merge, a join) before the
    ///   write is replicated or acknowledged;
    /// - no other write of the same key is coordinated on this node between reading `self` and
    ///   that merge (two would get the same dot, and a join keeps only one of them).
    ///
    /// Together they keep the module's central invariant: the node's stored state of the key
    /// holds every dot the current actor issued for it, so the next dot is fresh.
    ///
    /// Fails, changing nothing, when `dot` is not above every dot of its actor this state knows
    /// ([`Error::DotNotFresh`]: a clock bug, or a state that is not the node's own), or when the
    /// client context claims a dot of the coordinating actor at or beyond `dot`
    /// ([`Error::ContextClaimsUnissuedDot`]: the actor never issued it for this key, so the
    /// context is forged or the actor was reused after the node forgot some of its dots).
    pub fn update(
        &mut self,
        client_context: &CausalContext,
        dot: Dot,
        request_id: RequestId,
        timestamp_ms: u64,
        value: Option<Vec<u8>>,
    ) -> Result<UpdateOutcome> {
        if dot.counter == 0 || self.context.max_counter(dot.actor) >= dot.counter {
            return Err(Error::DotNotFresh { dot });
        }
        let claimed = client_context.max_counter(dot.actor);
        if claimed >= dot.counter {
            return Err(Error::ContextClaimsUnissuedDot {
                dot: Dot::new(dot.actor, claimed),
            });
        }

        if self.is_retired(request_id) {
            // Already applied here or elsewhere, and already superseded: storing it again would
            // bring back a value its writers replaced.
            return Ok(UpdateOutcome {
                context: client_context.clone(),
                dot: None,
                is_retry: true,
            });
        }
        let retried: Vec<Dot> = self
            .siblings
            .iter()
            .filter(|s| s.request_id == request_id)
            .map(|s| s.dot)
            .collect();
        if let Some(first) = retried.first().copied() {
            let mut context = client_context.clone();
            for d in retried {
                context.insert(d);
            }
            return Ok(UpdateOutcome {
                context,
                dot: Some(first),
                is_retry: true,
            });
        }

        let replaced: Vec<Retired> = self
            .siblings
            .iter()
            .filter(|s| client_context.contains(&s.dot))
            .map(|s| Retired {
                request_id: s.request_id,
                timestamp_ms,
            })
            .collect();
        self.retire(replaced);
        self.siblings.retain(|s| !client_context.contains(&s.dot));
        // `dot` is above every dot of its actor here, so it sorts after them; find its place.
        let at = self.siblings.partition_point(|s| s.dot < dot);
        self.siblings.insert(
            at,
            Sibling {
                dot,
                request_id,
                timestamp_ms,
                value,
            },
        );
        self.context.join(client_context);
        self.context.insert(dot);

        let mut context = client_context.clone();
        context.insert(dot);
        Ok(UpdateOutcome {
            context,
            dot: Some(dot),
            is_retry: false,
        })
    }

    /// The canonical bytes of this state: a format version byte, then MessagePack of the
    /// normalised state. Equal states give equal bytes, whatever order built them.
    pub fn encode_canonical(&self) -> Vec<u8> {
        self.encode_version(STATE_FORMAT_VERSION)
    }

    /// The canonical bytes in format `version`; version 1 only for a state it can express (no
    /// retired writes), which is all [`KeyState::decode`] asks of it.
    // MessagePack encoding of plain structs, integers, byte strings and ordered collections
    // into a Vec has no failure path (the only errors are I/O errors of the writer).
    #[allow(clippy::expect_used)]
    fn encode_version(&self, version: u8) -> Vec<u8> {
        let mut out = vec![version];
        if version == 1 && self.retired.is_empty() {
            let v1 = StateV1 {
                context: &self.context,
                siblings: &self.siblings,
            };
            rmp_serde::encode::write(&mut out, &v1).expect("encoding into a Vec cannot fail");
        } else if version == STATE_FORMAT_VERSION {
            rmp_serde::encode::write(&mut out, self).expect("encoding into a Vec cannot fail");
        }
        out
    }

    /// BLAKE3 of [`KeyState::encode_canonical`]: what Merkle trees compare.
    pub fn state_hash(&self) -> [u8; 32] {
        *blake3::hash(&self.encode_canonical()).as_bytes()
    }

    /// Decodes and validates bytes from [`KeyState::encode_canonical`]. Anything that is not
    /// exactly the canonical encoding of a valid state is [`Error::CorruptState`].
    pub fn decode(bytes: &[u8]) -> Result<KeyState> {
        let corrupt = |reason: String| Error::CorruptState { reason };
        let (version, body) = bytes
            .split_first()
            .ok_or_else(|| corrupt("empty".to_owned()))?;
        if *version != STATE_FORMAT_VERSION && *version != 1 {
            return Err(corrupt(format!("unknown format version {version}")));
        }
        // Checked MessagePack: a sibling count the bytes do not back reserves nothing.
        let state: KeyState = quorumkv_client::msgpack::from_slice(body)
            .map_err(|e| corrupt(format!("undecodable: {e}")))?;
        // Rejects trailing bytes and non-minimal encodings, so that bytes and states correspond
        // one to one and equal hashes keep meaning equal states.
        if state.encode_version(*version) != bytes {
            return Err(corrupt("not in canonical form".to_owned()));
        }
        Ok(state)
    }
}

fn retirement_of(sibling: &Sibling) -> Retired {
    Retired {
        request_id: sibling.request_id,
        timestamp_ms: sibling.timestamp_ms,
    }
}

impl fmt::Debug for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyState")
            .field("context", &self.context)
            .field("siblings", &self.siblings)
            .field("retired", &self.retired)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::context::Actor;
    use super::*;

    fn dot(actor: u64, counter: u64) -> Dot {
        Dot::new(Actor(actor), counter)
    }

    fn rid(n: u8) -> RequestId {
        RequestId([n; 16])
    }

    fn put(state: &mut KeyState, ctx: &CausalContext, d: Dot, n: u8) -> UpdateOutcome {
        state
            .update(ctx, d, rid(n), 1_000 + u64::from(n), Some(vec![n]))
            .unwrap()
    }

    #[test]
    fn a_write_replaces_what_its_writer_saw_and_keeps_the_rest() {
        let mut s = KeyState::new();
        let first = put(&mut s, &CausalContext::new(), dot(1, 1), 1);
        put(&mut s, &CausalContext::new(), dot(1, 2), 2);
        assert_eq!(s.values(), vec![&[1u8][..], &[2u8][..]]);
        let third = put(&mut s, &first.context, dot(1, 3), 3);
        assert_eq!(s.values(), vec![&[2u8][..], &[3u8][..]]);
        // The writer is handed back what it saw plus its own dot, not the state's context.
        assert_eq!(
            third.context,
            CausalContext::from_dots([dot(1, 1), dot(1, 3)])
        );
        assert!(!third.context.contains(&dot(1, 2)));
    }

    #[test]
    fn stale_dots_and_contexts_from_the_future_are_refused() {
        let mut s = KeyState::new();
        put(&mut s, &CausalContext::new(), dot(1, 5), 1);
        let before = s.clone();
        let err = s.update(&CausalContext::new(), dot(1, 5), rid(2), 0, None);
        assert!(matches!(err, Err(Error::DotNotFresh { .. })), "{err:?}");
        let err = s.update(&CausalContext::new(), dot(1, 0), rid(2), 0, None);
        assert!(matches!(err, Err(Error::DotNotFresh { .. })), "{err:?}");
        let forged = CausalContext::from_dots([dot(1, 9)]);
        let err = s.update(&forged, dot(1, 6), rid(2), 0, None);
        assert!(
            matches!(err, Err(Error::ContextClaimsUnissuedDot { dot: d }) if d == dot(1, 9)),
            "{err:?}"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn a_retry_at_the_same_coordinator_changes_nothing() {
        let mut s = KeyState::new();
        let ctx = CausalContext::new();
        let first = put(&mut s, &ctx, dot(1, 1), 7);
        let before = s.clone();
        let again = put(&mut s, &ctx, dot(1, 2), 7);
        assert!(again.is_retry && !first.is_retry);
        assert_eq!(again.dot, Some(dot(1, 1)));
        assert_eq!(again.context, first.context);
        assert_eq!(s, before);
    }

    #[test]
    fn reads_show_a_retried_write_once_as_its_lowest_dot() {
        // The same request stored by two coordinators (the retry went elsewhere).
        let mut a = KeyState::new();
        let mut b = KeyState::new();
        a.update(&CausalContext::new(), dot(2, 1), rid(9), 1, Some(vec![9]))
            .unwrap();
        b.update(&CausalContext::new(), dot(1, 4), rid(9), 2, Some(vec![9]))
            .unwrap();
        put(&mut b, &CausalContext::new(), dot(1, 5), 3);
        let joined = a.join(&b);
        assert_eq!(joined.sibling_count(), 3);
        let live: Vec<Dot> = joined.live_siblings().iter().map(|s| s.dot).collect();
        assert_eq!(live, vec![dot(1, 4), dot(1, 5)]);
        assert_eq!(joined.values(), vec![&[9u8][..], &[3u8][..]]);
        // A retry of it at either coordinator hands back both copies' dots.
        let mut again = joined.clone();
        let outcome = again
            .update(&CausalContext::new(), dot(1, 6), rid(9), 4, Some(vec![9]))
            .unwrap();
        assert!(outcome.is_retry);
        assert_eq!(outcome.dot, Some(dot(1, 4)));
        assert_eq!(
            outcome.context,
            CausalContext::from_dots([dot(1, 4), dot(2, 1)])
        );
    }

    /// The retry story of hardening defect 4: a write stored by two coordinators (its first
    /// attempt's reply was lost, the client retried elsewhere), a reader who saw one copy, and
    /// its next write. The other copy must not survive next to that write, in any join order.
    #[test]
    fn superseding_one_copy_of_a_retried_write_supersedes_every_copy() {
        let mut a = KeyState::new();
        let mut b = KeyState::new();
        a.update(&CausalContext::new(), dot(1, 1), rid(9), 1, Some(vec![9]))
            .unwrap();
        b.update(&CausalContext::new(), dot(2, 1), rid(9), 2, Some(vec![9]))
            .unwrap();
        // The reader saw only a's copy; its write replaces it at a.
        let seen = a.context().clone();
        let mut written = a.clone();
        put(&mut written, &seen, dot(1, 2), 3);
        assert_eq!(written.retired().len(), 1);
        for joined in [written.join(&b), b.join(&written)] {
            assert_eq!(joined.values(), vec![&[3u8][..]], "{joined:?}");
            assert_eq!(joined.sibling_count(), 1);
        }
        // Also when the supersession reaches b's copy through a third replica that held
        // neither copy: the join that drops a's copy retires the write.
        let third = KeyState::new().join(&written);
        let joined = a.join(&third).join(&b);
        assert_eq!(joined.values(), vec![&[3u8][..]], "{joined:?}");
    }

    #[test]
    fn a_writer_shown_a_write_supersedes_copies_its_dots_do_not_cover() {
        // The coordinator of the next write holds only the copy the reader did not see.
        let mut b = KeyState::new();
        b.update(&CausalContext::new(), dot(2, 1), rid(9), 2, Some(vec![9]))
            .unwrap();
        let seen = CausalContext::from_dots([dot(1, 1)]);
        let mut without_writes = b.clone();
        put(&mut without_writes, &seen, dot(2, 2), 3);
        assert_eq!(without_writes.values(), vec![&[9u8][..], &[3u8][..]]);
        b.supersede(&[rid(9)], 5);
        put(&mut b, &seen, dot(2, 2), 3);
        assert_eq!(b.values(), vec![&[3u8][..]]);
    }

    #[test]
    fn a_late_retry_of_a_superseded_write_changes_nothing() {
        let mut s = KeyState::new();
        let first = put(&mut s, &CausalContext::new(), dot(1, 1), 7);
        put(&mut s, &first.context, dot(1, 2), 8);
        let before = s.clone();
        let late = s
            .update(&CausalContext::new(), dot(1, 3), rid(7), 9, Some(vec![7]))
            .unwrap();
        assert!(late.is_retry);
        assert_eq!(late.dot, None);
        assert_eq!(s, before);
        assert_eq!(s.values(), vec![&[8u8][..]]);
    }

    #[test]
    fn a_key_remembers_its_most_recent_superseded_writes() {
        let mut s = KeyState::new();
        let mut context = CausalContext::new();
        let count = RETIRED_WRITES_MAX as u8 + 3;
        for n in 1..=count {
            context = put(&mut s, &context, dot(1, u64::from(n)), n).context;
        }
        let kept: BTreeSet<RequestId> = s.retired().iter().map(|r| r.request_id).collect();
        let newest: BTreeSet<RequestId> =
            (count - RETIRED_WRITES_MAX as u8..count).map(rid).collect();
        assert_eq!(kept, newest);
        let decoded = KeyState::decode(&s.encode_canonical()).unwrap();
        assert_eq!(decoded, s);
    }

    #[test]
    fn version_1_states_still_decode() {
        let mut s = KeyState::new();
        put(&mut s, &CausalContext::new(), dot(1, 1), 1);
        let mut v1 = vec![1u8];
        rmp_serde::encode::write(&mut v1, &(s.context(), s.siblings())).unwrap();
        assert_eq!(KeyState::decode(&v1).unwrap(), s);
        // A version 1 body cannot carry retired writes.
        let mut bad = vec![1u8];
        let retired = [Retired {
            request_id: rid(3),
            timestamp_ms: 1,
        }];
        rmp_serde::encode::write(&mut bad, &(s.context(), s.siblings(), retired)).unwrap();
        assert!(KeyState::decode(&bad).is_err());
    }

    #[test]
    fn same_dot_with_different_payloads_joins_the_same_either_way() {
        let mut a = KeyState::new();
        let mut b = KeyState::new();
        put(&mut a, &CausalContext::new(), dot(1, 1), 1);
        put(&mut b, &CausalContext::new(), dot(1, 1), 2);
        assert_eq!(a.join(&b), b.join(&a));
        assert_eq!(a.join(&b).values(), vec![&[2u8][..]]);
    }

    #[test]
    fn deletes_are_tombstones_and_reads_hide_them() {
        let mut s = KeyState::new();
        assert!(!s.is_deleted() && s.is_empty());
        let w = put(&mut s, &CausalContext::new(), dot(1, 1), 1);
        s.update(&w.context, dot(1, 2), rid(2), 5, None).unwrap();
        assert!(s.is_deleted());
        assert!(s.values().is_empty());
        assert_eq!(s.sibling_count(), 1);
        // A concurrent write next to the tombstone: the key is live again, the tombstone stays.
        put(&mut s, &w.context, dot(1, 3), 3);
        assert!(!s.is_deleted());
        assert_eq!(s.values(), vec![&[3u8][..]]);
        assert_eq!(s.sibling_count(), 2);
    }

    #[test]
    fn decode_rejects_broken_invariants_without_panicking() {
        let mut s = KeyState::new();
        put(&mut s, &CausalContext::new(), dot(1, 1), 1);
        put(&mut s, &CausalContext::new(), dot(1, 2), 2);
        let good = s.encode_canonical();
        assert_eq!(KeyState::decode(&good).unwrap(), s);

        let sib = |d: Dot| Sibling {
            dot: d,
            request_id: rid(1),
            timestamp_ms: 0,
            value: Some(vec![1]),
        };
        let ctx = CausalContext::from_dots([dot(1, 1), dot(1, 2)]);
        let cases = [
            (ctx.clone(), vec![sib(dot(1, 2)), sib(dot(1, 1))]),
            (ctx.clone(), vec![sib(dot(1, 1)), sib(dot(1, 1))]),
            (ctx.clone(), vec![sib(dot(1, 3))]),
            (ctx.clone(), vec![sib(dot(1, 0))]),
        ];
        for (context, siblings) in cases {
            let mut bytes = vec![STATE_FORMAT_VERSION];
            rmp_serde::encode::write(&mut bytes, &(context, siblings)).unwrap();
            let err = KeyState::decode(&bytes);
            assert!(matches!(err, Err(Error::CorruptState { .. })), "{err:?}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        let mut wrong_version = good.clone();
        wrong_version[0] = 3;
        for bytes in [
            vec![],
            trailing,
            wrong_version,
            good[..good.len() - 1].to_vec(),
        ] {
            let err = KeyState::decode(&bytes);
            assert!(matches!(err, Err(Error::CorruptState { .. })), "{err:?}");
        }
        for len in 0..good.len() {
            assert!(KeyState::decode(&good[..len]).is_err());
        }
    }

    /// Found by `node/tests/fuzz_alloc.rs`: a state of a few bytes whose sibling array claimed
    /// 2^32 - 1 entries made the decoder reserve 1 MiB for them before it found none. Such a
    /// state is now refused before anything is reserved, naming the claim.
    #[test]
    fn a_sibling_count_the_bytes_do_not_back_is_refused() {
        // The state as an array of two: an empty context, then a siblings header and nothing.
        let mut bytes = vec![STATE_FORMAT_VERSION, 0x92];
        rmp_serde::encode::write(&mut bytes, &CausalContext::new()).unwrap();
        bytes.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        let err = KeyState::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("announces 4294967295 elements"), "{err}");
    }
}
