//! Routing and retry policy: which node to ask first, and how long to wait before asking again.
//!
//! Everything here is pure: the client passes in the cluster description it learned, the
//! current instant and a random number, and gets back an order of nodes or a delay.
//!
//! # Routing
//!
//! A request for `(keyspace, key)` goes to the key's replicas first, in preference-list order:
//! the first replica is the preferred coordinator, so a client that routes well saves the
//! cluster one forwarding hop. The order is:
//!
//! 1. the first N entries of the key's preference list ([`quorumkv_ring::Ring`]), where N is the
//!    keyspace's replication factor;
//! 2. every other node, in the ring's fallback order for that range (which differs from range
//!    to range, so when replicas are down the load spreads instead of landing on one node);
//! 3. nodes the cluster listed with an address but that are not ring members yet (joining);
//! 4. within that order, nodes marked down (a failed dial, a broken or silent connection: see
//!    `health`) are moved to the end rather than dropped: when every node looks down, trying
//!    them anyway beats giving up.
//!
//! Any node accepts any request and forwards it to a coordinator if it is not a replica, so
//! **correctness never depends on routing**: a stale ring or an unknown keyspace only costs a
//! hop. An unknown keyspace is routed to every node in ring order and the node answers with
//! `InvalidRequest`.
//!
//! # Backoff
//!
//! Between retries the client sleeps for an exponentially growing delay (`base · 2^retry`,
//! capped) with "equal jitter": half the delay is fixed, half is random. The fixed half keeps a
//! retry from hammering an overloaded node at once; the random half keeps many clients that
//! failed together from retrying together.

use crate::protocol::ClusterInfo;
use quorumkv_ring::{Ring, Token};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// What the client knows about the cluster: the ring, where nodes listen, each keyspace's N,
/// and how long coordinators wait.
#[derive(Clone, Debug)]
pub(crate) struct Topology {
    ring: Ring,
    /// Node id → `host:port`. A `BTreeMap` so that orders built from it are deterministic.
    addresses: BTreeMap<String, String>,
    /// Keyspace name → replication factor N.
    replication: HashMap<String, usize>,
    /// The coordinator timeout the cluster reported, if it did.
    request_timeout: Option<Duration>,
}

impl Topology {
    /// Takes in a node's answer to `ClusterInfo`.
    pub(crate) fn new(info: ClusterInfo) -> Topology {
        Topology {
            ring: info.ring,
            addresses: info
                .nodes
                .into_iter()
                .map(|node| (node.id, node.address))
                .collect(),
            replication: info
                .keyspaces
                .into_iter()
                .map(|keyspace| (keyspace.name, usize::from(keyspace.n)))
                .collect(),
            request_timeout: info.request_timeout_ms.map(Duration::from_millis),
        }
    }

    /// How long the cluster's coordinators wait for replicas by default, if it said.
    pub(crate) fn request_timeout(&self) -> Option<Duration> {
        self.request_timeout
    }

    /// Where node `id` listens, if the cluster told us.
    pub(crate) fn address(&self, id: &str) -> Option<&str> {
        self.addresses.get(id).map(String::as_str)
    }

    /// Whether some known node listens at `address` (used to skip seeds that duplicate a node).
    pub(crate) fn has_address(&self, address: &str) -> bool {
        self.addresses.values().any(|a| a == address)
    }

    /// Node ids to try for `(keyspace, key)`, best first (see the module documentation).
    pub(crate) fn order_for_key(
        &self,
        keyspace: &str,
        key: &[u8],
        is_avoided: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut order: Vec<String> = Vec::with_capacity(self.addresses.len());
        let range = self.ring.range_of(Token::of(keyspace, key));
        let replicas_and_fallbacks = self.replication.get(keyspace).and_then(|&n| {
            let replicas = self.ring.preference_list(range, n).ok()?;
            let fallbacks = self.ring.fallbacks_for(range, n).ok()?;
            Some((replicas, fallbacks))
        });
        match replicas_and_fallbacks {
            Some((replicas, fallbacks)) => {
                order.extend(replicas.ids().map(|id| id.as_str().to_string()));
                order.extend(fallbacks.iter().map(|node| node.id.as_str().to_string()));
            }
            // Unknown keyspace, or an N this ring cannot serve: the node will say which.
            None => order.extend(
                self.ring
                    .members()
                    .iter()
                    .map(|node| node.id.as_str().to_string()),
            ),
        }
        self.finish_order(order, is_avoided)
    }

    /// Node ids to try for a request that concerns no key (such as `ClusterInfo`).
    pub(crate) fn order_any(&self, is_avoided: impl Fn(&str) -> bool) -> Vec<String> {
        let order = self
            .ring
            .members()
            .iter()
            .map(|node| node.id.as_str().to_string())
            .collect();
        self.finish_order(order, is_avoided)
    }

    /// Drops nodes without an address, appends listed non-members, moves avoided nodes last.
    fn finish_order(
        &self,
        mut order: Vec<String>,
        is_avoided: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        order.retain(|id| self.addresses.contains_key(id));
        for id in self.addresses.keys() {
            if !order.contains(id) {
                order.push(id.clone());
            }
        }
        // A stable partition keeps the preference order inside each half.
        let (healthy, avoided): (Vec<String>, Vec<String>) =
            order.into_iter().partition(|id| !is_avoided(id));
        healthy.into_iter().chain(avoided).collect()
    }
}

/// Delay before retry number `retry` (0 for the first retry).
///
/// `unit_random` is a random number in `[0, 1)`; the delay is `d/2 + d/2 · unit_random` where
/// `d = min(max, base · 2^retry)`.
pub(crate) fn backoff_delay(
    retry: u32,
    base: Duration,
    max: Duration,
    unit_random: f64,
) -> Duration {
    // 2^retry saturates long before u32 overflow matters; the cap applies right after.
    let factor = 1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX);
    let full = base.saturating_mul(factor).min(max);
    let half = full / 2;
    half + half.mul_f64(unit_random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{KeyspaceInfo, NodeAddress};
    use quorumkv_ring::{Node, NodeId, RingConfig, Zone};

    fn topology(members: &[&str], n: u8) -> Topology {
        let nodes = members
            .iter()
            .map(|id| Node::new(NodeId::new(*id).unwrap(), Zone::new("z").unwrap(), 1).unwrap());
        let ring = Ring::build(RingConfig::new(16, 3).unwrap(), nodes).unwrap();
        Topology::new(ClusterInfo {
            ring,
            nodes: members
                .iter()
                .enumerate()
                .map(|(i, id)| NodeAddress {
                    id: id.to_string(),
                    address: format!("127.0.0.1:{}", 7000 + i),
                })
                .collect(),
            keyspaces: vec![KeyspaceInfo {
                name: "default".into(),
                n,
            }],
            request_timeout_ms: Some(3_000),
        })
    }

    fn ids(list: &[String]) -> Vec<&str> {
        list.iter().map(String::as_str).collect()
    }

    #[test]
    fn replicas_come_first_in_preference_order_then_the_fallbacks() {
        let topology = topology(&["a", "b", "c", "d", "e"], 3);
        for key in [&b"k1"[..], b"k2", b"some other key"] {
            let order = topology.order_for_key("default", key, |_| false);
            let expected: Vec<String> = topology
                .ring
                .preference_list_for("default", key, 3)
                .unwrap()
                .ids()
                .map(|id| id.to_string())
                .collect();
            assert_eq!(order[..3], expected[..], "key {key:?}");
            let range = topology.ring.range_of(Token::of("default", key));
            let fallbacks: Vec<String> = topology
                .ring
                .fallbacks_for(range, 3)
                .unwrap()
                .iter()
                .map(|node| node.id.to_string())
                .collect();
            assert_eq!(order[3..], fallbacks[..]);
            // Every node appears exactly once.
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(ids(&sorted), ["a", "b", "c", "d", "e"]);
        }
    }

    #[test]
    fn avoided_nodes_move_last_keeping_their_relative_order() {
        let topology = topology(&["a", "b", "c", "d"], 3);
        let plain = topology.order_for_key("default", b"k", |_| false);
        let avoided = [plain[0].clone(), plain[2].clone()];
        let order = topology.order_for_key("default", b"k", |id| avoided.iter().any(|a| a == id));
        assert_eq!(
            ids(&order),
            [&plain[1], &plain[3], &plain[0], &plain[2]].map(String::as_str)
        );
    }

    #[test]
    fn unknown_keyspaces_and_non_members_still_get_every_node() {
        let mut topology = topology(&["a", "b", "c"], 3);
        topology
            .addresses
            .insert("joining".into(), "127.0.0.1:7999".into());
        assert_eq!(
            ids(&topology.order_for_key("no-such-keyspace", b"k", |_| false)),
            ["a", "b", "c", "joining"]
        );
        let order = topology.order_for_key("default", b"k", |_| false);
        assert_eq!(order.len(), 4);
        assert_eq!(order[3], "joining");
        assert_eq!(
            ids(&topology.order_any(|id| id == "a")),
            ["b", "c", "joining", "a"]
        );
        assert!(topology.has_address("127.0.0.1:7999"));
        assert_eq!(topology.address("b"), Some("127.0.0.1:7001"));
        assert_eq!(topology.request_timeout(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn nodes_without_an_address_are_skipped() {
        let mut topology = topology(&["a", "b", "c"], 2);
        topology.addresses.remove("b");
        let order = topology.order_for_key("default", b"k", |_| false);
        assert_eq!(order.len(), 2);
        assert!(!order.contains(&"b".to_string()));
    }

    #[test]
    fn backoff_doubles_with_equal_jitter_and_is_capped() {
        let base = Duration::from_millis(50);
        let max = Duration::from_secs(1);
        assert_eq!(backoff_delay(0, base, max, 0.0), Duration::from_millis(25));
        assert_eq!(backoff_delay(0, base, max, 1.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(1, base, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(2, base, max, 0.5), Duration::from_millis(150));
        assert_eq!(backoff_delay(10, base, max, 1.0), max);
        assert_eq!(backoff_delay(u32::MAX, base, max, 0.0), max / 2);
    }
}
