//! Admission: the first look at every client request (and every request a peer forwards).
//!
//! A request is checked before it costs the node anything: the keyspace exists, the key and
//! value fit their limits, the quorum options make sense for the keyspace's N, the node has room
//! for another request in flight, and no replica the request would send to has a full send
//! queue. A request that fails a check is answered at once (`InvalidRequest` naming the limit,
//! or `Overloaded`, which the client retries elsewhere) and a metric counts it. A request that
//! passes is coordinated here when this node is on the key's preference list
//! ([`super::coordinate`]) and forwarded to a replica otherwise ([`super::forward`]).

use super::{error, inspect, invalid, Checked, NodeCore, Now, Origin, Output};
use super::{internal, REQUEST_TIMEOUT_MAX_MS};
use crate::metrics;
use crate::storage::Storage;
use quorumkv_client::protocol::{ErrorKind, ErrorReply, Request, Response};
use quorumkv_ring::NodeId;

impl NodeCore {
    pub(super) fn on_request(
        &mut self,
        now: Now,
        origin: Origin,
        request: Request,
        storage: &dyn Storage,
        out: &mut Vec<Output>,
    ) {
        if matches!(request, Request::ClusterInfo) {
            let response = Response::ClusterInfo(self.cluster_info());
            return self.answer(&origin, response, out);
        }
        if let Some(reply) = self.out_of_service_reply() {
            return self.answer(&origin, Response::Error(reply), out);
        }
        if self.in_flight() >= self.config.in_flight_requests_max {
            metrics::limit_exceeded("in_flight_requests");
            let message = format!(
                "node {} has {} requests in flight (limit in_flight_requests_max = {})",
                self.me,
                self.in_flight(),
                self.config.in_flight_requests_max
            );
            return self.answer(&origin, error(ErrorKind::Overloaded, message), out);
        }
        let fields = match &request {
            Request::Get {
                keyspace,
                key,
                options,
            } => (keyspace, key, 0, options.timeout_ms),
            Request::Put {
                keyspace,
                key,
                value,
                options,
                ..
            } => (keyspace, key, value.len(), options.timeout_ms),
            Request::Delete {
                keyspace,
                key,
                options,
                ..
            } => (keyspace, key, 0, options.timeout_ms),
            Request::Replicas { keyspace, key } => (keyspace, key, 0, None),
            Request::ClusterInfo => return,
        };
        let checked = match self.check(fields.0, fields.1, fields.2, fields.3) {
            Ok(checked) => checked,
            Err(reply) => return self.answer(&origin, Response::Error(reply), out),
        };
        if let Some(peer) = self.congested_replica(&checked.preference_list) {
            metrics::limit_exceeded("peer_queue_bytes");
            let message = format!(
                "node {} cannot take more work for replica {peer} now: its send queue is full \
                 (limit peer_queue_bytes_max); retry later",
                self.me
            );
            return self.answer(&origin, error(ErrorKind::Overloaded, message), out);
        }
        let deadline_ms = now.monotonic_ms.saturating_add(checked.timeout_ms);
        if inspect::is_inspection_request(&request) {
            // Any node inspects, replica or not: nothing to forward.
            return self.inspect(origin, &checked, deadline_ms, storage, out);
        }
        if !checked.preference_list.contains(&self.me) {
            return match origin {
                Origin::Client(client) => self.forward(now, client, &checked, request.clone(), out),
                // A forward only goes to a replica; a peer that thinks otherwise runs another
                // ring, which the connection handshake should have refused.
                Origin::Peer { .. } => {
                    let message = format!("node {} is not a replica of this key", self.me);
                    self.answer(&origin, error(ErrorKind::Unavailable, message), out)
                }
            };
        }
        let result = match &request {
            Request::Get { options, .. } => self.coordinate_get(
                now,
                origin.clone(),
                &checked,
                options,
                deadline_ms,
                storage,
                out,
            ),
            Request::Put {
                value,
                context,
                request_id,
                options,
                ..
            } => self.coordinate_write(
                now,
                origin.clone(),
                &checked,
                Some(value.clone()),
                context.as_ref(),
                request_id.0,
                options,
                deadline_ms,
                storage,
                out,
            ),
            Request::Delete {
                context,
                request_id,
                options,
                ..
            } => self.coordinate_write(
                now,
                origin.clone(),
                &checked,
                None,
                context.as_ref(),
                request_id.0,
                options,
                deadline_ms,
                storage,
                out,
            ),
            Request::ClusterInfo | Request::Replicas { .. } => Ok(()),
        };
        if let Err(reply) = result {
            self.answer(&origin, Response::Error(reply), out);
        }
    }

    /// A replica of `list` (other than this node) that a request would send to now, but whose
    /// send queue is full. A replica believed down gets nothing, so its queue does not count.
    pub(super) fn congested_replica<'a>(&self, list: &'a [NodeId]) -> Option<&'a NodeId> {
        if self.congested.is_empty() {
            return None;
        }
        list.iter().find(|node| {
            **node != self.me && self.congested.contains(*node) && self.detector.is_up(node)
        })
    }

    /// Validates a data request against the keyspace and the limits.
    pub(super) fn check<'r>(
        &self,
        keyspace: &'r str,
        key: &'r [u8],
        value_len: usize,
        timeout_ms: Option<u32>,
    ) -> Result<Checked<'r>, ErrorReply> {
        let Some(&n) = self.map.keyspaces.get(keyspace) else {
            return Err(invalid(format!("unknown keyspace `{keyspace}`")));
        };
        if key.is_empty() {
            return Err(invalid("the key is empty".to_string()));
        }
        if key.len() > self.config.key_bytes_max {
            metrics::limit_exceeded("key_bytes");
            return Err(invalid(format!(
                "key of {} bytes exceeds key_bytes_max = {}",
                key.len(),
                self.config.key_bytes_max
            )));
        }
        if value_len > self.config.value_bytes_max {
            metrics::limit_exceeded("value_bytes");
            return Err(invalid(format!(
                "value of {value_len} bytes exceeds value_bytes_max = {}",
                self.config.value_bytes_max
            )));
        }
        let timeout_ms = match timeout_ms {
            None => self.config.request_timeout_ms,
            Some(0) => return Err(invalid("timeout_ms must be at least 1".to_string())),
            Some(ms) => u64::from(ms).min(REQUEST_TIMEOUT_MAX_MS),
        };
        let preference_list = match self
            .map
            .ring
            .preference_list_for(keyspace, key, usize::from(n))
        {
            Ok(list) => list.ids().cloned().collect(),
            Err(e) => {
                return Err(internal(format!(
                    "keyspace `{keyspace}` cannot be placed: {e}"
                )))
            }
        };
        Ok(Checked {
            keyspace,
            key,
            n,
            preference_list,
            timeout_ms,
        })
    }
}
