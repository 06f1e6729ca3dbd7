//! The exchange itself, both sides: answering level requests, descending through differing
//! nodes, pushing and merging the keys of differing buckets. See the parent module for the
//! protocol, its bounds and what it guarantees.

use super::{
    Exchange, Outcome, Phase, INTERVALS_PER_PUSH_MAX, KEYS_PER_MESSAGE_MAX, KEY_OVERHEAD_BYTES,
    PARENTS_PER_REQUEST_MAX,
};
use crate::core::{NodeCore, Now, Output};
use crate::merkle::{diff_level, Level};
use crate::metrics;
use crate::peer::{AeKey, OpId, PeerMessage};
use crate::storage::Storage;
use crate::version_vector::KeyState;
use quorumkv_ring::{NodeId, RangeId, Token};
use std::collections::BTreeSet;

fn within(intervals: &[(u64, u64)], token: u64) -> bool {
    intervals.iter().any(|&(lo, hi)| lo <= token && token <= hi)
}

/// Adds keys from `found` (token order) to `keys` while they fit `bytes_left` and the key
/// count limit, never splitting a run of equal tokens. Returns the token of the first key left
/// out, if any was.
fn take_batch(
    found: Vec<(Token, Vec<u8>, Vec<u8>)>,
    keys: &mut Vec<AeKey>,
    bytes_left: &mut usize,
) -> Option<u64> {
    let mut last_token: Option<u64> = None;
    for (token, key, state) in found {
        let cost = key.len() + state.len() + KEY_OVERHEAD_BYTES;
        let same_run = last_token == Some(token.0);
        let full = keys.len() >= KEYS_PER_MESSAGE_MAX || cost > *bytes_left;
        if full && !keys.is_empty() && !same_run {
            return Some(token.0);
        }
        *bytes_left = bytes_left.saturating_sub(cost);
        last_token = Some(token.0);
        keys.push(AeKey { key, state });
    }
    None
}

impl NodeCore {
    /// Checks a peer's anti-entropy request: the node serves, the keyspace and range exist,
    /// both nodes replicate the range, and the range's tree is built.
    fn ae_check_request(&self, from: &NodeId, keyspace: &str, range: u32) -> Result<(), String> {
        if let Some(reply) = self.out_of_service_reply() {
            return Err(reply.message);
        }
        if !self.anti_entropy.config.enabled {
            return Err(format!("anti-entropy is disabled on {}", self.me));
        }
        let n = self
            .map
            .keyspaces
            .get(keyspace)
            .ok_or_else(|| format!("unknown keyspace `{keyspace}`"))?;
        if range >= self.anti_entropy.geometry.range_count() {
            return Err(format!("range {range} does not exist"));
        }
        let list = self
            .map
            .ring
            .preference_list(RangeId(range), usize::from(*n))
            .map_err(|e| e.to_string())?;
        if !list.contains(&self.me) || !list.contains(from) {
            return Err(format!(
                "{} and {from} are not both replicas of range {range} of `{keyspace}`",
                self.me
            ));
        }
        if !self.anti_entropy.is_built(keyspace, range) {
            return Err(format!("the tree of range {range} is not built yet"));
        }
        Ok(())
    }

    /// A peer asks for a level of one of this node's trees.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::core) fn on_ae_level(
        &mut self,
        from: NodeId,
        op: OpId,
        keyspace: &str,
        range: u32,
        depth: u8,
        level: u8,
        parents: &[u32],
        out: &mut Vec<Output>,
    ) {
        let answer = self
            .ae_check_request(&from, keyspace, range)
            .and_then(|()| {
                if depth != self.anti_entropy.geometry.depth() {
                    return Err(format!(
                        "trees {depth} levels deep cannot be compared with {} levels",
                        self.anti_entropy.geometry.depth()
                    ));
                }
                if parents.len() > PARENTS_PER_REQUEST_MAX {
                    return Err(format!(
                        "{} parents exceed the limit of {PARENTS_PER_REQUEST_MAX}",
                        parents.len()
                    ));
                }
                self.anti_entropy.level(keyspace, range, level, parents)
            });
        let message = match answer {
            Ok(level) => PeerMessage::AeLevelReply { op, level },
            Err(reason) => PeerMessage::Failed { op, reason },
        };
        out.push(Output::Send { to: from, message });
    }

    /// The answer to one of this node's level requests.
    pub(in crate::core) fn on_ae_level_reply(
        &mut self,
        now: Now,
        from: NodeId,
        op: OpId,
        theirs: Level,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let now_ms = now.monotonic_ms;
        let Some(mut exchange) = self.ae_take(op, &from) else {
            return;
        };
        if !self
            .anti_entropy
            .is_built(&exchange.keyspace, exchange.range)
        {
            self.ae_finish(exchange, Outcome::Failed, now_ms);
            return;
        }
        let geometry = self.anti_entropy.geometry;
        let Phase::Levels {
            level,
            parents,
            done,
            chunk,
            differing,
        } = &mut exchange.phase
        else {
            self.ae_finish(exchange, Outcome::Failed, now_ms);
            return;
        };
        if let Err(e) = theirs.validate_reply(&geometry, *level, chunk) {
            tracing::warn!(peer = %from, error = %e, "invalid anti-entropy level; exchange dropped");
            self.ae_finish(exchange, Outcome::Failed, now_ms);
            return;
        }
        let mine = match self
            .anti_entropy
            .level(&exchange.keyspace, exchange.range, *level, chunk)
        {
            Ok(mine) => mine,
            Err(_) => {
                self.ae_finish(exchange, Outcome::Failed, now_ms);
                return;
            }
        };
        differing.extend(diff_level(&mine, &theirs));
        if *done < parents.len() {
            self.ae_request_level(exchange, now_ms, out);
            return;
        }
        if differing.is_empty() {
            self.ae_finish(exchange, Outcome::InSync, now_ms);
            return;
        }
        if *level == 0 {
            metrics::anti_entropy_range_different();
        }
        if *level < geometry.depth() {
            *level += 1;
            *parents = std::mem::take(differing);
            *done = 0;
            self.ae_request_level(exchange, now_ms, out);
            return;
        }
        let buckets = std::mem::take(differing);
        exchange.phase = Phase::Keys {
            buckets,
            next: 0,
            cursor: 0,
            pushed: Vec::new(),
            after: (0, 0),
        };
        self.ae_push_next(exchange, now, storage, out);
    }

    /// Takes the exchange waiting on `op`, if `from` is the peer it asked.
    fn ae_take(&mut self, op: OpId, from: &NodeId) -> Option<Exchange> {
        if self.anti_entropy.exchanges.get(&op)?.peer != *from {
            return None;
        }
        self.anti_entropy.exchanges.remove(&op)
    }

    /// Sends the next push of a repairing exchange, waits for budget, or ends it.
    pub(super) fn ae_push_next(
        &mut self,
        mut exchange: Exchange,
        now: Now,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let now_ms = now.monotonic_ms;
        self.anti_entropy.refill(now_ms);
        if self.anti_entropy.budget_milli <= 0 {
            self.anti_entropy.throttled.push(exchange);
            return;
        }
        let push = match self.ae_build_push(&exchange, storage) {
            Ok(push) => push,
            Err(e) => {
                tracing::warn!(error = %e, "anti-entropy cannot read its side of a range");
                self.note_storage_failure(&e);
                self.ae_finish(exchange, Outcome::Failed, now_ms);
                return;
            }
        };
        let Some((intervals, keys, after)) = push else {
            self.ae_finish(exchange, Outcome::Repaired, now_ms);
            return;
        };
        self.anti_entropy.spend(keys.len());
        if let Phase::Keys {
            pushed, after: a, ..
        } = &mut exchange.phase
        {
            *pushed = intervals.clone();
            *a = after;
        }
        let message = PeerMessage::AePush {
            op: OpId(0, 0),
            keyspace: exchange.keyspace.clone(),
            range: exchange.range,
            intervals,
            keys,
        };
        self.ae_send(exchange, message, now_ms, out);
    }

    /// This node's side of the next push: the intervals it covers, every key in them, and where
    /// the push after it starts. `None` when every differing bucket has been pushed.
    #[allow(clippy::type_complexity)]
    fn ae_build_push(
        &self,
        exchange: &Exchange,
        storage: &dyn Storage,
    ) -> crate::Result<Option<(Vec<(u64, u64)>, Vec<AeKey>, (usize, u64))>> {
        let Phase::Keys {
            buckets,
            next,
            cursor,
            ..
        } = &exchange.phase
        else {
            return Ok(None);
        };
        let geometry = self.anti_entropy.geometry;
        let (mut next, mut cursor) = (*next, *cursor);
        let mut intervals = Vec::new();
        let mut keys = Vec::new();
        let mut bytes_left = self.config.key_state_bytes_max;
        while next < buckets.len() && intervals.len() < INTERVALS_PER_PUSH_MAX {
            let (lo, hi) = geometry.bucket_token_bounds(exchange.range, buckets[next])?;
            let start = cursor.max(lo.0);
            if start > hi.0 {
                next += 1;
                continue;
            }
            let found: Vec<(Token, Vec<u8>, Vec<u8>)> = storage
                .scan(&exchange.keyspace, Token(start), hi)?
                .into_iter()
                .map(|stored| (stored.token, stored.key, stored.state.encode_canonical()))
                .collect();
            match take_batch(found, &mut keys, &mut bytes_left) {
                None => {
                    intervals.push((start, hi.0));
                    next += 1;
                    match hi.0.checked_add(1) {
                        Some(after) => cursor = after,
                        None => {
                            next = buckets.len();
                        }
                    }
                }
                Some(left_out) => {
                    // Everything below the first key left out is in this push (nothing of
                    // this bucket, when its first key is the one left out).
                    if left_out > start {
                        intervals.push((start, left_out - 1));
                    }
                    cursor = left_out;
                    break;
                }
            }
        }
        if intervals.is_empty() {
            return Ok(None);
        }
        Ok(Some((intervals, keys, (next, cursor))))
    }

    /// A peer pushes its states of some intervals: merge them, answer with what it lacks.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::core) fn on_ae_push(
        &mut self,
        from: NodeId,
        op: OpId,
        keyspace: &str,
        range: u32,
        intervals: &[(u64, u64)],
        keys: Vec<AeKey>,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let message = match self.ae_serve_push(&from, keyspace, range, intervals, keys, storage) {
            Ok((keys, resume_from)) => PeerMessage::AePushReply {
                op,
                keys,
                resume_from,
            },
            Err(reason) => {
                tracing::warn!(peer = %from, %reason, "refused an anti-entropy push");
                PeerMessage::Failed { op, reason }
            }
        };
        out.push(Output::Send { to: from, message });
    }

    fn ae_check_intervals(&self, range: u32, intervals: &[(u64, u64)]) -> Result<(), String> {
        if intervals.is_empty() || intervals.len() > INTERVALS_PER_PUSH_MAX {
            return Err(format!(
                "a push names {} intervals, outside 1..={INTERVALS_PER_PUSH_MAX}",
                intervals.len()
            ));
        }
        let (first, last) = self
            .anti_entropy
            .geometry
            .range_token_bounds(range)
            .map_err(|e| e.to_string())?;
        let mut previous: Option<u64> = None;
        for &(lo, hi) in intervals {
            let ordered = lo <= hi && previous.is_none_or(|p| p < lo);
            if !ordered || lo < first.0 || hi > last.0 {
                return Err(format!(
                    "interval {lo}..={hi} is out of order or outside range {range}"
                ));
            }
            previous = Some(hi);
        }
        Ok(())
    }

    /// Checks a key of a push or its answer and decodes its state.
    fn ae_check_key(
        &self,
        keyspace: &str,
        intervals: &[(u64, u64)],
        entry: &AeKey,
    ) -> Result<KeyState, String> {
        if entry.key.is_empty() || entry.key.len() > self.config.key_bytes_max {
            return Err(format!(
                "key of {} bytes is outside 1..=key_bytes_max",
                entry.key.len()
            ));
        }
        let token = Token::of(keyspace, &entry.key);
        if !within(intervals, token.0) {
            return Err("a key lies outside the intervals of its push".to_owned());
        }
        KeyState::decode(&entry.state).map_err(|e| e.to_string())
    }

    /// Merges a push and collects the answer: this node's states in the intervals that the
    /// push did not hold in full, within the frame budget.
    #[allow(clippy::type_complexity)]
    fn ae_serve_push(
        &mut self,
        from: &NodeId,
        keyspace: &str,
        range: u32,
        intervals: &[(u64, u64)],
        keys: Vec<AeKey>,
        storage: &dyn Storage,
    ) -> Result<(Vec<AeKey>, Option<u64>), String> {
        self.ae_check_request(from, keyspace, range)?;
        self.ae_check_intervals(range, intervals)?;
        if keys.len() > KEYS_PER_MESSAGE_MAX {
            return Err(format!(
                "{} keys exceed the limit of {KEYS_PER_MESSAGE_MAX}",
                keys.len()
            ));
        }
        let mut states = Vec::with_capacity(keys.len());
        for entry in &keys {
            states.push(self.ae_check_key(keyspace, intervals, entry)?);
        }
        // Keys whose merged state is exactly what the peer sent: it lacks nothing of them.
        let mut covered: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut repaired = 0u64;
        for (entry, state) in keys.into_iter().zip(states) {
            let merged = self
                .store(storage, keyspace, &entry.key, &state, &[])
                .map_err(|e| {
                    self.storage_error("merging an anti-entropy push", e)
                        .message
                })?;
            if merged.changed {
                repaired += 1;
            }
            if merged.new_hash == state.state_hash() {
                covered.insert(entry.key);
            }
        }
        metrics::anti_entropy_keys_repaired(repaired);
        let mut answer = Vec::new();
        let mut bytes_left = self.config.key_state_bytes_max;
        for &(lo, hi) in intervals {
            let found: Vec<(Token, Vec<u8>, Vec<u8>)> = storage
                .scan(keyspace, Token(lo), Token(hi))
                .map_err(|e| self.storage_error("scanning for anti-entropy", e).message)?
                .into_iter()
                .filter(|stored| !covered.contains(&stored.key))
                .map(|stored| (stored.token, stored.key, stored.state.encode_canonical()))
                .collect();
            if let Some(resume_from) = take_batch(found, &mut answer, &mut bytes_left) {
                return Ok((answer, Some(resume_from)));
            }
        }
        Ok((answer, None))
    }

    /// The answer to one of this node's pushes: merge what the peer had, then push on.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::core) fn on_ae_push_reply(
        &mut self,
        now: Now,
        from: NodeId,
        op: OpId,
        keys: Vec<AeKey>,
        resume_from: Option<u64>,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        let now_ms = now.monotonic_ms;
        let Some(mut exchange) = self.ae_take(op, &from) else {
            return;
        };
        match self.ae_merge_reply(&mut exchange, keys, resume_from, storage) {
            Ok(()) => self.ae_push_next(exchange, now, storage, out),
            Err(reason) => {
                tracing::warn!(peer = %from, %reason, "invalid anti-entropy answer; exchange dropped");
                self.ae_finish(exchange, Outcome::Failed, now_ms);
            }
        }
    }

    fn ae_merge_reply(
        &mut self,
        exchange: &mut Exchange,
        keys: Vec<AeKey>,
        resume_from: Option<u64>,
        storage: &dyn Storage,
    ) -> Result<(), String> {
        let Phase::Keys {
            buckets,
            next,
            cursor,
            pushed,
            after,
        } = &mut exchange.phase
        else {
            return Err("an answer to a push the exchange did not send".to_owned());
        };
        if keys.len() > KEYS_PER_MESSAGE_MAX {
            return Err(format!("{} keys in one answer", keys.len()));
        }
        let mut states = Vec::with_capacity(keys.len());
        for entry in &keys {
            states.push(self.ae_check_key(&exchange.keyspace, pushed, entry)?);
            let token = Token::of(&exchange.keyspace, &entry.key).0;
            if resume_from.is_some_and(|resume| token >= resume) {
                return Err("a key at or past the answer's resume token".to_owned());
            }
        }
        let position = match resume_from {
            None => *after,
            Some(resume) => {
                // Progress: an answer cut short carries at least one key, all below `resume`.
                if keys.is_empty() || !within(pushed, resume) {
                    return Err(format!("resume token {resume} makes no progress"));
                }
                let bucket = self.anti_entropy.geometry.bucket_of(Token(resume));
                let index = buckets
                    .binary_search(&bucket)
                    .map_err(|_| format!("resume token {resume} is in no differing bucket"))?;
                (index, resume)
            }
        };
        (*next, *cursor) = position;
        self.anti_entropy.spend(keys.len());
        let mut repaired = 0u64;
        for (entry, state) in keys.into_iter().zip(states) {
            let merged = self
                .store(storage, &exchange.keyspace, &entry.key, &state, &[])
                .map_err(|e| {
                    self.storage_error("merging an anti-entropy answer", e)
                        .message
                })?;
            if merged.changed {
                repaired += 1;
            }
        }
        metrics::anti_entropy_keys_repaired(repaired);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_never_splits_a_run_of_equal_tokens_and_always_takes_one_key() {
        let item = |t: u64, n: usize| (Token(t), vec![b'k'; 1], vec![0u8; n]);
        let mut keys = Vec::new();
        let mut left = 10;
        // The first key alone exceeds the budget and is still taken.
        assert_eq!(
            take_batch(vec![item(1, 50), item(2, 1)], &mut keys, &mut left),
            Some(2)
        );
        assert_eq!(keys.len(), 1);
        let mut keys = Vec::new();
        let mut left = 40;
        assert_eq!(
            take_batch(
                vec![item(1, 1), item(1, 30), item(3, 1)],
                &mut keys,
                &mut left
            ),
            Some(3)
        );
        assert_eq!(keys.len(), 2);
    }
}
