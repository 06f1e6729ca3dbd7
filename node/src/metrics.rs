//! The node's one metrics module: every metric name, its help text and its buckets.
//!
//! Code elsewhere records through the functions here, never through `metrics::counter!` with a
//! string of its own, so the names a dashboard depends on live in one file. Recording goes
//! through the `metrics` facade: with no recorder installed (unit tests, the simulation) it
//! costs almost nothing and does nothing; the node installs the Prometheus exporter at start
//! and serves it on the admin address at `/metrics`.
//!
//! Names follow Prometheus conventions: a `quorumkv_` prefix, `_total` for counters, base units
//! (`_seconds`, `_bytes`).

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

/// Client requests by operation (`get`, `put`, `delete`, `cluster_info`, `replicas`) and
/// outcome.
pub const REQUESTS_TOTAL: &str = "quorumkv_requests_total";
/// Client request latency by operation, as the node saw it.
pub const REQUEST_DURATION_SECONDS: &str = "quorumkv_request_duration_seconds";
/// Storage flushes (fsyncs). Group commit keeps this far below the number of durable writes.
pub const STORAGE_FLUSHES_TOTAL: &str = "quorumkv_storage_flushes_total";
/// Storage flush latency: the log write and its fsync together.
pub const STORAGE_FLUSH_DURATION_SECONDS: &str = "quorumkv_storage_flush_duration_seconds";
/// Bytes queued to each peer and not yet written to its connection.
pub const PEER_QUEUE_BYTES: &str = "quorumkv_peer_queue_bytes";
/// Writes that left a key with at least `limits.siblings_per_key_warn` siblings.
pub const SIBLING_WARNINGS_TOTAL: &str = "quorumkv_sibling_warnings_total";
/// Requests refused because they exceeded a limit, by limit.
pub const LIMIT_EXCEEDED_TOTAL: &str = "quorumkv_limit_exceeded_total";
/// Frames refused as malformed or oversized, by protocol.
pub const BAD_FRAMES_TOTAL: &str = "quorumkv_bad_frames_total";
/// Peer connections refused at the handshake, by reason.
pub const PEER_REFUSED_TOTAL: &str = "quorumkv_peer_refused_total";
/// Peer messages the core dropped because their sender is not a member of the cluster map.
pub const PEER_MESSAGES_REFUSED_TOTAL: &str = "quorumkv_peer_messages_refused_total";
/// Client contexts refused, by reason (`not_authentic`, `invalid`).
pub const CONTEXTS_REFUSED_TOTAL: &str = "quorumkv_contexts_refused_total";
/// Streams closed because a frame did not arrive whole within its read deadline, by protocol.
pub const FRAME_READ_TIMEOUTS_TOTAL: &str = "quorumkv_frame_read_timeouts_total";
/// 1 if the failure detector believes the peer up, 0 if down.
pub const PEER_UP: &str = "quorumkv_peer_up";
/// Peer liveness changes, by direction.
pub const PEER_TRANSITIONS_TOTAL: &str = "quorumkv_peer_transitions_total";
/// Requests currently being coordinated or forwarded by this node.
pub const IN_FLIGHT_REQUESTS: &str = "quorumkv_in_flight_requests";
/// Read repairs of one replica's copy, by outcome: `sent` (the merged state went to a stale
/// replica), `local` (this node's own stale copy was merged), `failed` (a repaired replica
/// refused or did not take it), `skipped` (too many reads lingering; anti-entropy covers it).
pub const READ_REPAIRS_TOTAL: &str = "quorumkv_read_repairs_total";
/// Hints written, by kind: `coordinator` (kept by a replica for an owner that missed a write)
/// or `fallback` (kept for an owner that was down, under a sloppy quorum).
pub const HINTS_WRITTEN_TOTAL: &str = "quorumkv_hints_written_total";
/// Hints the owner confirmed on its disk, then deleted.
pub const HINTS_DELIVERED_TOTAL: &str = "quorumkv_hints_delivered_total";
/// Hints dropped undelivered, by reason: `bound` (the owner's hints reached
/// `hints.bytes_per_target_max`), `age` (`hints.max_age_ms`), `corrupt`.
pub const HINTS_DROPPED_TOTAL: &str = "quorumkv_hints_dropped_total";
/// Hinted writes a fallback refused because its hints for the owner reached their bound.
pub const HINTS_REFUSED_TOTAL: &str = "quorumkv_hints_refused_total";
/// Hints this node holds, per owner (`target` is a member's node id).
pub const HINTS_PENDING: &str = "quorumkv_hints_pending";
/// Bytes of hints this node holds, per owner.
pub const HINTS_PENDING_BYTES: &str = "quorumkv_hints_pending_bytes";

/// Anti-entropy exchanges this node started, by outcome (`in_sync`, `repaired`, `failed`,
/// `timeout`).
pub const ANTI_ENTROPY_EXCHANGES_TOTAL: &str = "quorumkv_anti_entropy_exchanges_total";
/// Ranges whose roots differed when this node compared them with a replica.
pub const ANTI_ENTROPY_RANGES_DIFFERENT_TOTAL: &str =
    "quorumkv_anti_entropy_ranges_different_total";
/// Keys whose stored state changed by an anti-entropy merge on this node.
pub const ANTI_ENTROPY_KEYS_REPAIRED_TOTAL: &str = "quorumkv_anti_entropy_keys_repaired_total";
/// Seconds since the range this node replicates that it exchanged least recently was last
/// exchanged (or since start, for one never exchanged).
pub const ANTI_ENTROPY_OLDEST_UNEXCHANGED_SECONDS: &str =
    "quorumkv_anti_entropy_oldest_unexchanged_seconds";
/// Ranges whose Merkle tree is not built yet (after start, or after a tree was found wrong).
pub const ANTI_ENTROPY_RANGES_UNBUILT: &str = "quorumkv_anti_entropy_ranges_unbuilt";
/// Requests whose quorum was not reached, by kind: `w`, `r` (too few replicas answered), `dw`
/// (too few confirmed durability), `timeout` (the deadline passed first).
pub const QUORUM_FAILURES_TOTAL: &str = "quorumkv_quorum_failures_total";
/// Live siblings a successful read returned.
pub const READ_SIBLINGS: &str = "quorumkv_read_siblings";
/// Keys this node stores, per keyspace (from its Merkle trees, once built).
pub const KEYS: &str = "quorumkv_keys";
/// Always 1; the labels say which build runs (`version`, `commit`).
pub const BUILD_INFO: &str = "quorumkv_build_info";

/// Buckets of [`READ_SIBLINGS`]: one value is the normal case; many mean unresolved conflicts.
pub const SIBLING_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0];

/// Deleted keys (every sibling a tombstone) this node stores.
pub const TOMBSTONES: &str = "quorumkv_tombstones";
/// Deleted keys whose state this node removed for good (tombstone collection).
pub const TOMBSTONES_COLLECTED_TOTAL: &str = "quorumkv_tombstones_collected_total";
/// Tombstone collection checks this node started, by outcome (`cleared`: every member let at
/// least one key go; `blocked`: none; `timeout`, `failed`).
pub const TOMBSTONE_CHECKS_TOTAL: &str = "quorumkv_tombstone_checks_total";

/// Latency buckets in seconds: 100 µs to 10 s, roughly ×2.5 apart. Explicit, so histograms
/// from different nodes and versions aggregate.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Registers help text for every metric. Call once after installing a recorder.
pub fn describe() {
    describe_counter!(REQUESTS_TOTAL, "Client requests by operation and outcome.");
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Client request latency by operation."
    );
    describe_counter!(STORAGE_FLUSHES_TOTAL, "Storage flushes (fsyncs) performed.");
    describe_gauge!(
        IN_SERVICE,
        "1 while the node serves, 0 once its storage failed and it stopped serving."
    );
    describe_counter!(
        SIBLING_WARNINGS_TOTAL,
        "Writes that left a key with at least limits.siblings_per_key_warn siblings."
    );
    describe_histogram!(
        STORAGE_FLUSH_DURATION_SECONDS,
        Unit::Seconds,
        "Storage flush latency: log write and fsync."
    );
    describe_gauge!(
        PEER_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes queued to a peer and not yet written to its connection."
    );
    describe_counter!(
        LIMIT_EXCEEDED_TOTAL,
        "Requests refused for exceeding a limit, by limit."
    );
    describe_counter!(
        BAD_FRAMES_TOTAL,
        "Malformed or oversized frames refused, by protocol."
    );
    describe_counter!(
        PEER_REFUSED_TOTAL,
        "Peer connections refused at the handshake, by reason."
    );
    describe_counter!(
        PEER_MESSAGES_REFUSED_TOTAL,
        "Peer messages dropped because their sender is not in the cluster map."
    );
    describe_counter!(
        CONTEXTS_REFUSED_TOTAL,
        "Client contexts refused, by reason (not_authentic: no accepted cluster secret sealed it)."
    );
    describe_counter!(
        FRAME_READ_TIMEOUTS_TOTAL,
        "Streams closed because a frame did not arrive whole within its read deadline, by protocol."
    );
    describe_gauge!(
        PEER_UP,
        "1 if the failure detector believes the peer up, else 0."
    );
    describe_counter!(
        PEER_TRANSITIONS_TOTAL,
        "Peer liveness changes, by direction."
    );
    describe_gauge!(
        IN_FLIGHT_REQUESTS,
        "Requests being coordinated or forwarded by this node."
    );
    describe_counter!(
        READ_REPAIRS_TOTAL,
        "Read repairs of one replica's copy, by outcome (sent, local, failed, skipped)."
    );
    describe_counter!(
        HINTS_WRITTEN_TOTAL,
        "Hints written, by kind (coordinator, fallback)."
    );
    describe_counter!(
        HINTS_DELIVERED_TOTAL,
        "Hints delivered to their owner, confirmed durable there, and deleted."
    );
    describe_counter!(
        HINTS_DROPPED_TOTAL,
        "Hints dropped undelivered, by reason (bound, age, corrupt); anti-entropy covers them."
    );
    describe_counter!(
        HINTS_REFUSED_TOTAL,
        "Hinted writes refused by this node as a fallback: its hints for the owner are full."
    );
    describe_gauge!(HINTS_PENDING, "Hints held for an owner (target).");
    describe_gauge!(
        HINTS_PENDING_BYTES,
        Unit::Bytes,
        "Bytes of hints held for an owner (target)."
    );
    describe_counter!(
        ANTI_ENTROPY_EXCHANGES_TOTAL,
        "Anti-entropy exchanges this node started, by outcome."
    );
    describe_counter!(
        ANTI_ENTROPY_RANGES_DIFFERENT_TOTAL,
        "Ranges whose Merkle roots differed from a replica's at an exchange."
    );
    describe_counter!(
        ANTI_ENTROPY_KEYS_REPAIRED_TOTAL,
        "Keys whose stored state an anti-entropy merge changed on this node."
    );
    describe_gauge!(
        ANTI_ENTROPY_OLDEST_UNEXCHANGED_SECONDS,
        Unit::Seconds,
        "Age of the least recently exchanged range this node replicates."
    );
    describe_gauge!(
        ANTI_ENTROPY_RANGES_UNBUILT,
        "Ranges whose Merkle tree is still to be built from storage."
    );
    describe_counter!(
        QUORUM_FAILURES_TOTAL,
        "Requests whose quorum was not reached, by kind (w, r, dw, timeout)."
    );
    describe_histogram!(READ_SIBLINGS, "Live siblings returned by successful reads.");
    describe_gauge!(
        KEYS,
        "Keys this node stores per keyspace, as its Merkle trees count them."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels give the version and commit of the running build."
    );
    gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => option_env!("QUORUMKV_COMMIT").unwrap_or("unknown")
    )
    .set(1.0);
    describe_gauge!(
        TOMBSTONES,
        "Deleted keys (all siblings tombstones) stored on this node."
    );
    describe_counter!(
        TOMBSTONES_COLLECTED_TOTAL,
        "Deleted keys whose state this node removed for good."
    );
    describe_counter!(
        TOMBSTONE_CHECKS_TOTAL,
        "Tombstone collection checks this node started, by outcome."
    );
}

/// One finished client request.
pub fn request(operation: &'static str, outcome: &'static str, seconds: f64) {
    counter!(REQUESTS_TOTAL, "operation" => operation, "outcome" => outcome).increment(1);
    histogram!(REQUEST_DURATION_SECONDS, "operation" => operation).record(seconds);
}

/// One storage flush, which took `seconds`.
pub fn storage_flush(seconds: f64) {
    counter!(STORAGE_FLUSHES_TOTAL).increment(1);
    histogram!(STORAGE_FLUSH_DURATION_SECONDS).record(seconds);
}

/// `bytes` are queued to `peer` now.
pub fn peer_queue_bytes(peer: &str, bytes: usize) {
    gauge!(PEER_QUEUE_BYTES, "peer" => peer.to_string()).set(bytes as f64);
}

/// 1 while the node serves, 0 once it took itself out of service (its storage failed).
pub const IN_SERVICE: &str = "quorumkv_in_service";

/// Whether the node serves (it stops for good when its storage fails).
pub fn in_service(serving: bool) {
    gauge!(IN_SERVICE).set(if serving { 1.0 } else { 0.0 });
}

/// A write left a key with many siblings (at least `limits.siblings_per_key_warn`).
pub fn sibling_warning() {
    counter!(SIBLING_WARNINGS_TOTAL).increment(1);
}

/// A request refused by the limit named `limit` (for example `value_bytes`).
pub fn limit_exceeded(limit: &'static str) {
    counter!(LIMIT_EXCEEDED_TOTAL, "limit" => limit).increment(1);
}

/// A frame refused on `protocol` (`client` or `peer`).
pub fn bad_frame(protocol: &'static str) {
    counter!(BAD_FRAMES_TOTAL, "protocol" => protocol).increment(1);
}

/// A peer connection refused at the handshake.
pub fn peer_refused(reason: &'static str) {
    counter!(PEER_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A peer message dropped because its sender is not a member.
pub fn peer_message_refused() {
    counter!(PEER_MESSAGES_REFUSED_TOTAL).increment(1);
}

/// A client context refused for `reason` (`not_authentic`, `invalid`).
pub fn context_refused(reason: &'static str) {
    counter!(CONTEXTS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A stream closed because a frame on `protocol` (`client` or `peer`) was not read in time.
pub fn frame_read_timeout(protocol: &'static str) {
    counter!(FRAME_READ_TIMEOUTS_TOTAL, "protocol" => protocol).increment(1);
}

/// The failure detector changed its mind about `peer`.
pub fn peer_transition(peer: &str, up: bool) {
    let direction = if up { "up" } else { "down" };
    counter!(PEER_TRANSITIONS_TOTAL, "direction" => direction).increment(1);
    gauge!(PEER_UP, "peer" => peer.to_string()).set(if up { 1.0 } else { 0.0 });
}

/// A read repair of one replica's copy (`sent`, `local`, `failed` or `skipped`).
pub fn read_repair(outcome: &'static str) {
    counter!(READ_REPAIRS_TOTAL, "outcome" => outcome).increment(1);
}

/// A hint written (`coordinator` or `fallback`).
pub fn hint_written(kind: &'static str) {
    counter!(HINTS_WRITTEN_TOTAL, "kind" => kind).increment(1);
}

/// A hint delivered and deleted.
pub fn hint_delivered() {
    counter!(HINTS_DELIVERED_TOTAL).increment(1);
}

/// A hint dropped undelivered (`bound`, `age` or `corrupt`).
pub fn hint_dropped(reason: &'static str) {
    counter!(HINTS_DROPPED_TOTAL, "reason" => reason).increment(1);
}

/// A hinted write refused at its bound.
pub fn hint_refused() {
    counter!(HINTS_REFUSED_TOTAL).increment(1);
}

/// Hints now held for `target`.
pub fn hints_pending(target: &str, count: u64, bytes: u64) {
    gauge!(HINTS_PENDING, "target" => target.to_string()).set(count as f64);
    gauge!(HINTS_PENDING_BYTES, "target" => target.to_string()).set(bytes as f64);
}

/// Requests in flight at this node now.
pub fn in_flight(count: usize) {
    gauge!(IN_FLIGHT_REQUESTS).set(count as f64);
}

/// An anti-entropy exchange ended with `outcome`.
pub fn anti_entropy_exchange(outcome: &'static str) {
    counter!(ANTI_ENTROPY_EXCHANGES_TOTAL, "outcome" => outcome).increment(1);
}

/// An exchange found a range's roots different.
pub fn anti_entropy_range_different() {
    counter!(ANTI_ENTROPY_RANGES_DIFFERENT_TOTAL).increment(1);
}

/// Anti-entropy merges changed `keys` keys here.
pub fn anti_entropy_keys_repaired(keys: u64) {
    if keys > 0 {
        counter!(ANTI_ENTROPY_KEYS_REPAIRED_TOTAL).increment(keys);
    }
}

/// The least recently exchanged range was exchanged `seconds` ago.
pub fn anti_entropy_oldest_unexchanged(seconds: f64) {
    gauge!(ANTI_ENTROPY_OLDEST_UNEXCHANGED_SECONDS).set(seconds);
}

/// Ranges whose tree is not built yet.
pub fn anti_entropy_ranges_unbuilt(ranges: usize) {
    gauge!(ANTI_ENTROPY_RANGES_UNBUILT).set(ranges as f64);
}

/// This node stores `count` deleted keys.
pub fn tombstones(count: usize) {
    gauge!(TOMBSTONES).set(count as f64);
}

/// This node removed `keys` deleted keys for good.
pub fn tombstones_collected(keys: u64) {
    if keys > 0 {
        counter!(TOMBSTONES_COLLECTED_TOTAL).increment(keys);
    }
}

/// A tombstone collection check ended with `outcome`.
pub fn tombstone_check(outcome: &'static str) {
    counter!(TOMBSTONE_CHECKS_TOTAL, "outcome" => outcome).increment(1);
}

/// A request's quorum was not reached (`kind`: `w`, `r`, `dw` or `timeout`).
pub fn quorum_failure(kind: &'static str) {
    counter!(QUORUM_FAILURES_TOTAL, "kind" => kind).increment(1);
}

/// A read returned `siblings` live siblings.
pub fn read_siblings(siblings: usize) {
    histogram!(READ_SIBLINGS).record(siblings as f64);
}

/// This node stores `keys` keys of `keyspace`.
pub fn keys(keyspace: &str, keys: u64) {
    gauge!(KEYS, "keyspace" => keyspace.to_owned()).set(keys as f64);
}
