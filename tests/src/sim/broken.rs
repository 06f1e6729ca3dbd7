//! Deliberately broken variants of the cluster, for the checkers' negative tests: a checker
//! that cannot fail proves nothing.
//!
//! Each variant is injected from the simulator's side, as a network [`Filter`] or an action
//! after the heal, so production code carries no test-only switch; each stands for a real bug
//! the store could have:
//!
//! | variant | the bug it stands for | what must catch it |
//! | --- | --- | --- |
//! | [`repair_off`] | hinted handoff, read repair and anti-entropy that never run | convergence |
//! | [`drop_a_sibling`] | a merge that loses one of two concurrent siblings | lost write |
//! | [`forge_a_value`] | a replica answering with a value nobody wrote | unknown value |
//! | [`answer_for_another_key`] | a replica answering a read with another key's state | wrong key |
//! | [`superseded_sibling_back`] | a replica whose copy still shows a value that was replaced, as if new | superseded sibling |
//! | [`resurrect_after_heal`] | a replica that forgot a key's tombstone (collected it too early) and hands its stale copy back | resurrection |
//!
//! States are rewritten through their public parts (context, siblings, retired writes) and
//! must still pass the receiver's validation: the bugs are in what the states say, not in
//! their encoding. A value a variant brings back gets a dot of a fresh actor (and a fresh
//! request id), which is exactly what forgetting a key's causal history amounts to: nothing
//! the receivers know covers it.

use super::workload::Hooks;
use super::{Envelope, Filter, Sim, KEYSPACE};
use crate::history::{History, Op};
use quorumkv_node::peer::{AeKey, OpId, PeerMessage};
use quorumkv_node::version_vector::{
    Actor, CausalContext, Dot, KeyState, RequestId, Retired, Sibling,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A key state's parts, in the order its encoding has them.
#[derive(Debug, Serialize, Deserialize)]
struct Parts {
    context: CausalContext,
    siblings: Vec<Sibling>,
    retired: Vec<Retired>,
}

impl Parts {
    fn of(state: &KeyState) -> Option<Parts> {
        let bytes = rmp_serde::to_vec(state).ok()?;
        rmp_serde::from_slice(&bytes).ok()
    }

    /// The state these parts make, if it is valid (what a receiver would accept).
    fn assemble(mut self) -> Option<KeyState> {
        self.siblings.sort_by_key(|s| s.dot);
        let bytes = rmp_serde::to_vec(&self).ok()?;
        rmp_serde::from_slice(&bytes).ok()
    }

    /// Adds `value` as a sibling under a dot nobody has seen (a fresh actor), with a fresh
    /// request id: a value whose causal history was forgotten.
    fn add_unexplained(&mut self, value: Vec<u8>, fresh: u64) {
        let dot = Dot::new(Actor(0xBAD0_0000_0000_0000 | fresh), 1);
        let mut request_id = [0xBA; 16];
        request_id[..8].copy_from_slice(&fresh.to_be_bytes());
        self.context.insert(dot);
        self.siblings.push(Sibling {
            dot,
            request_id: RequestId(request_id),
            timestamp_ms: 1,
            value: Some(value),
        });
    }
}

/// Rewrites every key state `message` carries with `rewrite(key, state)`; states that do not
/// decode, and rewrites that return `None`, are left as they were.
fn rewrite_states(
    message: PeerMessage,
    mut rewrite: impl FnMut(&[u8], &KeyState) -> Option<KeyState>,
) -> PeerMessage {
    let mut apply = |key: &[u8], bytes: &mut Vec<u8>| {
        if let Ok(state) = KeyState::decode(bytes) {
            if let Some(new) = rewrite(key, &state) {
                *bytes = new.encode_canonical();
            }
        }
    };
    match message {
        PeerMessage::Replicate {
            op,
            keyspace,
            key,
            mut state,
            durable,
            hint_for,
        } => {
            apply(&key, &mut state);
            PeerMessage::Replicate {
                op,
                keyspace,
                key,
                state,
                durable,
                hint_for,
            }
        }
        PeerMessage::ReadReply {
            op,
            keyspace,
            key,
            state: Some(mut state),
        } => {
            apply(&key, &mut state);
            PeerMessage::ReadReply {
                op,
                keyspace,
                key,
                state: Some(state),
            }
        }
        PeerMessage::AePush {
            op,
            keyspace,
            range,
            intervals,
            mut keys,
        } => {
            for AeKey { key, state } in &mut keys {
                apply(key, state);
            }
            PeerMessage::AePush {
                op,
                keyspace,
                range,
                intervals,
                keys,
            }
        }
        PeerMessage::AePushReply {
            op,
            mut keys,
            resume_from,
        } => {
            for AeKey { key, state } in &mut keys {
                apply(key, state);
            }
            PeerMessage::AePushReply {
                op,
                keys,
                resume_from,
            }
        }
        other => other,
    }
}

fn filter(f: impl FnMut(&Envelope<'_>, PeerMessage) -> Vec<PeerMessage> + 'static) -> Hooks {
    Hooks {
        filter: Some(Filter(Box::new(f))),
        after_heal: None,
    }
}

/// Repair switched off once the faults heal: every replica write (hint deliveries, read
/// repairs) and every anti-entropy message is dropped, so replicas that missed writes stay
/// behind. Convergence must fail.
pub fn repair_off() -> Hooks {
    filter(|envelope, message| {
        let repair = matches!(
            message,
            PeerMessage::Replicate { .. }
                | PeerMessage::AeLevel { .. }
                | PeerMessage::AeLevelReply { .. }
                | PeerMessage::AePush { .. }
                | PeerMessage::AePushReply { .. }
        );
        if envelope.healed && repair {
            Vec::new()
        } else {
            vec![message]
        }
    })
}

/// A merge that drops a sibling: every state with two or more live siblings travels without
/// the first of them (every copy of its write), its dot still in the context, so each receiver
/// forgets it too. Acknowledged writes must be found lost.
pub fn drop_a_sibling() -> Hooks {
    filter(|_, message| {
        vec![rewrite_states(message, |_, state| {
            let live = state.live_siblings();
            if live.len() < 2 {
                return None;
            }
            let victim = live[0].request_id;
            let mut parts = Parts::of(state)?;
            parts.siblings.retain(|s| s.request_id != victim);
            parts.assemble()
        })]
    })
}

/// Read answers carrying a value nobody wrote (`forged-<i>`), the first `limit` times a
/// replica answers a read with a state. Unknown values must be found.
pub fn forge_a_value(limit: u64) -> Hooks {
    let mut forged = 0;
    filter(move |_, message| {
        if forged >= limit || !matches!(message, PeerMessage::ReadReply { state: Some(_), .. }) {
            return vec![message];
        }
        vec![rewrite_states(message, |_, state| {
            forged += 1;
            let mut parts = Parts::of(state)?;
            parts.add_unexplained(format!("forged-{forged}").into_bytes(), forged);
            parts.assemble()
        })]
    })
}

/// Read answers carrying another key's state instead of the key's own, the first `limit` times
/// one is available (states are taken from replica writes seen earlier). Values under the
/// wrong key must be found.
pub fn answer_for_another_key(limit: u64) -> Hooks {
    let mut seen: BTreeMap<Vec<u8>, KeyState> = BTreeMap::new();
    let mut swapped = 0;
    filter(move |_, message| {
        if let PeerMessage::Replicate { key, state, .. } = &message {
            if let Ok(decoded) = KeyState::decode(state) {
                if !decoded.live_siblings().is_empty() {
                    seen.insert(key.clone(), decoded);
                }
            }
            return vec![message];
        }
        if swapped >= limit {
            return vec![message];
        }
        match message {
            PeerMessage::ReadReply {
                op,
                keyspace,
                key,
                state: Some(state),
            } => {
                let other = seen.iter().find(|(k, _)| **k != key).map(|(_, s)| s);
                let state = match other {
                    Some(other) => {
                        swapped += 1;
                        other.encode_canonical()
                    }
                    None => state,
                };
                vec![PeerMessage::ReadReply {
                    op,
                    keyspace,
                    key,
                    state: Some(state),
                }]
            }
            other => vec![other],
        }
    })
}

/// Read answers that still show a value the answering state's context says was replaced (a
/// sibling seen in an earlier replica write of the key), as if it were new, the first `limit`
/// times one exists. Reads returning a value beside one that supersedes it must be found.
pub fn superseded_sibling_back(limit: u64) -> Hooks {
    let mut seen: BTreeMap<Vec<u8>, Vec<Sibling>> = BTreeMap::new();
    let mut injected = 0;
    filter(move |_, message| {
        if let PeerMessage::Replicate { key, state, .. } = &message {
            if let Ok(decoded) = KeyState::decode(state) {
                let known = seen.entry(key.clone()).or_default();
                for sibling in decoded.live_siblings() {
                    if !known.iter().any(|k| k.request_id == sibling.request_id) {
                        known.push(sibling.clone());
                    }
                }
            }
            return vec![message];
        }
        if injected >= limit || !matches!(message, PeerMessage::ReadReply { state: Some(_), .. }) {
            return vec![message];
        }
        vec![rewrite_states(message, |key, state| {
            // A sibling this state replaced: its dot is known here, its write is not shown.
            let replaced = seen.get(key)?.iter().rev().find(|old| {
                state.context().contains(&old.dot)
                    && !state
                        .siblings()
                        .iter()
                        .any(|s| s.request_id == old.request_id)
                    && !state.live_siblings().is_empty()
            })?;
            injected += 1;
            let mut parts = Parts::of(state)?;
            parts.add_unexplained(replaced.value.clone()?, injected);
            parts.assemble()
        })]
    })
}

/// After the heal, every acknowledged delete's key gets, at each of its owners, the values that
/// delete removed under dots nobody has seen: what a replica that collected the tombstone too
/// early and kept a stale copy would hand back. Deleted values coming back must be found.
pub fn resurrect_after_heal() -> Hooks {
    Hooks {
        filter: None,
        after_heal: Some(Box::new(|sim: &mut Sim, history: &History| {
            let mut fresh = 0u64;
            for record in &history.records {
                let Op::Delete { read, .. } = &record.op else {
                    continue;
                };
                if !record.outcome.is_ok() || read.is_empty() {
                    continue;
                }
                let mut parts = Parts {
                    context: CausalContext::new(),
                    siblings: Vec::new(),
                    retired: Vec::new(),
                };
                for value in read {
                    fresh += 1;
                    parts.add_unexplained(value.clone().into_bytes(), fresh);
                }
                let Some(state) = parts.assemble() else {
                    continue;
                };
                let owners = sim.owners(&record.key);
                let Some(sender) = sim.node_ids().into_iter().find(|n| !owners.contains(n)) else {
                    continue;
                };
                for owner in &owners {
                    let message = PeerMessage::Replicate {
                        op: OpId(u64::MAX, fresh),
                        keyspace: KEYSPACE.to_string(),
                        key: record.key.as_bytes().to_vec(),
                        state: state.encode_canonical(),
                        durable: false,
                        hint_for: None,
                    };
                    sim.inject(&sender, owner, message, 1);
                }
            }
        })),
    }
}
