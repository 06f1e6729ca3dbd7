//! The node's configuration: one documented struct, four layers, one validation.
//!
//! # Layers
//!
//! A [`Config`] is assembled from, lowest precedence first:
//!
//! 1. **defaults**, written next to each field below;
//! 2. **the TOML file** given with `--config` (or `QUORUMKV_CONFIG`); `ops/quorumkv.toml` is a
//!    commented example of every field;
//! 3. **environment variables** `QUORUMKV_<PATH>`, the field's dotted path in upper case with
//!    `.` as `_`: `QUORUMKV_NODE_ID`, `QUORUMKV_LIMITS_VALUE_BYTES_MAX`;
//! 4. **command-line flags** `--<path>`, the dotted path with `.` and `_` as `-`:
//!    `--node-id`, `--limits-value-bytes-max`.
//!
//! Every field is settable in all three places ([`ConfigOverrides`] is the list of flags and
//! variables; clap reads both, a flag winning over its variable). A higher layer replaces a
//! field's whole value: `--members` replaces the file's member list rather than adding to it.
//!
//! Relative paths in the file (`data_dir`, `tls.*`) are relative to the file's directory, so
//! a directory holding a config and its certificates can move as a whole; relative paths in
//! flags and variables are relative to the working directory, as on any command line.
//!
//! # Derived defaults
//!
//! A few defaults come from other fields when they are not set anywhere: this node's `zone`,
//! `capacity` and `advertise` address come from its entry in `members` (`advertise` falls back
//! to `listen` when the node is not listed and `listen` is a specific address), and
//! `limits.frame_bytes_max` is `limits.value_bytes_max` plus [`FRAME_SLACK_DEFAULT_BYTES`].
//! The `default` keyspace always exists, with N = 3 unless configured.
//!
//! # Validation
//!
//! [`Config::validate`] runs at start and refuses a bad configuration with
//! [`Error::Config`], whose message names the field by its dotted path
//! (`` config field `limits.value_bytes_max`: must be at least 1 ``), so the operator knows
//! what to fix. It is pure: it reads no file. Unknown fields in the file are refused too, so a
//! misspelt limit is an error rather than a silently ignored line.

use crate::error::{Error, Result};
use quorumkv_ring::{NodeId, Zone, MEMBERS_MAX, RANGE_COUNT_MAX, RF_MAX_LIMIT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The keyspace that always exists.
pub const DEFAULT_KEYSPACE: &str = "default";
/// N of the `default` keyspace when the configuration does not set it.
pub const DEFAULT_KEYSPACE_N: u8 = 3;
/// Default `limits.frame_bytes_max` is `limits.value_bytes_max` plus this much.
pub const FRAME_SLACK_DEFAULT_BYTES: u32 = 64 * 1024;
/// Room a frame needs beyond key and value: message envelope, keyspace name, ids, options.
pub const FRAME_ENVELOPE_BYTES: u64 = 4 * 1024;
/// Upper bound on the encoded size of one causal-context entry (an actor and a counter).
pub const CONTEXT_ENTRY_BYTES_MAX: u64 = 32;
/// Longest keyspace name.
pub const KEYSPACE_NAME_LEN_MAX: usize = 64;

/// The whole configuration of one node. See the module documentation for how it is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id; it must be listed in `members` and match its certificate. Required.
    pub node_id: NodeId,
    /// This node's failure domain. Default: its `members` entry's zone (or `"default"`).
    #[serde(default = "default_zone")]
    pub zone: Zone,
    /// This node's relative weight in placement. Default: its `members` entry's capacity.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// The UDP socket the QUIC endpoint binds, for clients and peers alike. Default
    /// `0.0.0.0:7401`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `host:port` that others use to reach this node. Default: this node's `members`
    /// address, else `listen` when it is not an unspecified address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub advertise: String,
    /// Where the node keeps its data. Required.
    pub data_dir: PathBuf,
    /// The TCP socket of the admin HTTP server (health, readiness, metrics). Default
    /// `127.0.0.1:9401`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Number of equal ranges the ring is cut into (Q): a power of two in 1..=65536. It is
    /// fixed for the life of a cluster. Default 1024.
    #[serde(default = "default_ranges")]
    pub ranges: u32,
    /// The largest N any keyspace may ever use; preference lists are this long. Default 5.
    #[serde(default = "default_replication_max")]
    pub replication_max: u32,
    /// Threads of the node's async runtime; 0 means one per CPU. The core task is one thread's
    /// work whatever this says; more threads serve connections and storage reads in parallel.
    /// Several nodes sharing one machine (`quorumkv dev`) do better with fewer: `dev` gives each
    /// node CPUs / nodes (at least 1). Default 0.
    #[serde(default)]
    pub worker_threads: usize,
    /// Keyspaces by name. Default: `default` with N = 3.
    #[serde(default = "default_keyspaces")]
    pub keyspaces: BTreeMap<String, KeyspaceConfig>,
    /// Timeouts and intervals.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Size and count limits.
    #[serde(default)]
    pub limits: Limits,
    /// Hinted handoff.
    #[serde(default)]
    pub hints: HintsConfig,
    /// Background Merkle-tree exchanges between replicas.
    #[serde(default)]
    pub anti_entropy: AntiEntropy,
    /// Removal of deleted keys once no replica can bring them back.
    #[serde(default)]
    pub tombstones: Tombstones,
    /// Certificate and key files. Required.
    pub tls: TlsConfig,
    /// The static member list, this node included. Required.
    pub members: Vec<MemberConfig>,
}

/// One member of the static member list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's node id.
    pub id: NodeId,
    /// `host:port` of its QUIC endpoint.
    pub address: String,
    /// Its failure domain. Default `"default"`.
    #[serde(default = "default_zone")]
    pub zone: Zone,
    /// Its relative weight, at least 1. Default 1.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
}

/// One keyspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyspaceConfig {
    /// Replication factor: how many nodes hold each key. 1..=min(members, replication_max).
    pub n: u8,
}

/// Timeouts and intervals, in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// How long a coordinator waits for a quorum before failing a request. Default 2000.
    pub request_timeout_ms: u64,
    /// How long dialing a peer may take. Default 1000.
    pub connect_timeout_ms: u64,
    /// How often the failure detector pings each peer. Default 500.
    pub ping_interval_ms: u64,
    /// A peer silent this long is considered down; more than `ping_interval_ms`. Default 2000.
    pub peer_down_after_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            request_timeout_ms: quorumkv_client::protocol::DEFAULT_REQUEST_TIMEOUT_MS,
            connect_timeout_ms: 1000,
            ping_interval_ms: 500,
            peer_down_after_ms: 2000,
        }
    }
}

/// Size and count limits. Hitting one is a clear error to the caller, never a crash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest key. Default 1024.
    pub key_bytes_max: usize,
    /// Largest value. Default 1 MiB.
    pub value_bytes_max: usize,
    /// Largest frame on the wire, client or peer. It must hold the largest key, the largest
    /// value, a full context and the envelope. Default `value_bytes_max` + 64 KiB.
    pub frame_bytes_max: u32,
    /// Streams a peer may have open at once on one connection (each direction). Default 256.
    pub streams_per_connection_max: u32,
    /// Requests this node coordinates at once; more are refused. Default 4096.
    pub in_flight_requests_max: usize,
    /// Largest causal context (entries) a key's state may reach through writes (one entry per
    /// node incarnation that wrote the key, plus out-of-order dots); a write that would grow
    /// it further is refused. Client context tokens are accepted up to 4 times as large, so a
    /// context a read hands out is never refused. Default 256.
    pub context_entries_max: usize,
    /// Most siblings a key may hold: a write that would leave more, without resolving any, is
    /// refused (read the key and write with its context instead). Default 100.
    pub siblings_per_key_max: usize,
    /// Sibling count at which writes are counted in `quorumkv_sibling_warnings_total`, so
    /// operators see keys heading for the limit. Default 25.
    pub siblings_per_key_warn: usize,
    /// Bytes of client requests and peer messages queued for the node's core. A client
    /// request that does not fit is refused as overloaded; a peer message waits (slowing that
    /// peer). At least twice `frame_bytes_max`. Default 64 MiB.
    pub inbox_bytes_max: u32,
    /// Bytes queued to one peer at which the node stops admitting requests that need that
    /// peer (refused as overloaded) until half of it has drained. Queued messages are never
    /// dropped for it. Default 32 MiB.
    pub peer_queue_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        let value_bytes_max: u32 = 1024 * 1024;
        Limits {
            key_bytes_max: 1024,
            value_bytes_max: value_bytes_max as usize,
            frame_bytes_max: value_bytes_max + FRAME_SLACK_DEFAULT_BYTES,
            streams_per_connection_max: 256,
            in_flight_requests_max: 4096,
            context_entries_max: 256,
            siblings_per_key_max: 100,
            siblings_per_key_warn: 25,
            inbox_bytes_max: 64 * 1024 * 1024,
            peer_queue_bytes_max: 32 * 1024 * 1024,
        }
    }
}

/// Hinted handoff: how much a node keeps for owners that missed writes, and for how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HintsConfig {
    /// Bytes of hints kept for one owner. Beyond it a fallback refuses hinted writes (they do
    /// not count toward W) and a replica drops its hints for that owner, leaving the range to
    /// anti-entropy, with a metric and a log line. Default 256 MiB.
    pub bytes_per_target_max: u64,
    /// A hint no acknowledgement counted on expires this long after its last write if still
    /// undelivered (Cassandra's `max_hint_window`). Default 3 hours.
    pub max_age_ms: u64,
    /// Hints in flight to one owner at a time while delivering. Default 64.
    pub delivery_batch: usize,
}

impl Default for HintsConfig {
    fn default() -> HintsConfig {
        let core = crate::core::CoreConfig::default();
        HintsConfig {
            bytes_per_target_max: core.hint_bytes_per_target_max,
            max_age_ms: core.hint_max_age_ms,
            delivery_batch: core.hint_delivery_batch,
        }
    }
}

/// Anti-entropy: replicas compare Merkle trees in the background and exchange the keys on which
/// they differ (see `quorumkv_node::core::anti_entropy`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntiEntropy {
    /// Whether this node starts and serves exchanges. Trees are kept either way, so
    /// `/sync-status` still shows whether replicas agree. Default true.
    pub enabled: bool,
    /// How often new exchanges start, in ms, with ±25% jitter. Each exchange covers one range
    /// with one other replica, so a node cycles through its ranges in about
    /// `ranges / exchanges_max * interval_ms`. Default 500.
    pub interval_ms: u64,
    /// Exchanges this node runs at once. Default 2.
    pub exchanges_max: usize,
    /// An exchange whose peer has not answered for this long (ms) is dropped. Default 10000.
    pub exchange_timeout_ms: u64,
    /// Throttle: keys sent and received per second over all of this node's exchanges, so
    /// repair traffic does not crowd out clients. Default 10000.
    pub keys_per_second_max: u64,
    /// Keys scanned per 10 ms tick while Merkle trees are built from storage (at start); whole
    /// ranges only. Default 20000.
    pub build_keys_per_tick_max: u64,
}

impl Default for AntiEntropy {
    fn default() -> AntiEntropy {
        let core = crate::core::AntiEntropyConfig::default();
        AntiEntropy {
            enabled: core.enabled,
            interval_ms: core.interval_ms,
            exchanges_max: core.exchanges_max,
            exchange_timeout_ms: core.exchange_timeout_ms,
            keys_per_second_max: core.keys_per_second_max,
            build_keys_per_tick_max: core.build_keys_per_tick_max,
        }
    }
}

/// Tombstone collection: a deleted key's state is removed from every replica once every member
/// has confirmed, twice and a quiet period apart, that nothing it replaced can come back (see
/// `quorumkv_node::core::tombstones`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tombstones {
    /// Whether this node collects the deleted keys it is primary for. It answers other nodes'
    /// checks either way. Default true.
    pub enabled: bool,
    /// How old (ms) a key's newest tombstone must be before its collection is considered.
    /// Default 600000 (10 minutes).
    pub grace_ms: u64,
    /// The least time (ms) between the two checks that must both clear a key. It must be at
    /// least twice the longest a peer message can take to arrive (the peer connection's idle
    /// timeout, 30 s); smaller values can bring deleted values back. Default 120000.
    pub quiet_ms: u64,
    /// How often (ms) a collection pass starts. Default 60000.
    pub interval_ms: u64,
    /// Most keys in one pass, at most 1024. Default 256.
    pub batch: usize,
}

impl Default for Tombstones {
    fn default() -> Tombstones {
        let core = crate::core::TombstoneConfig::default();
        Tombstones {
            enabled: core.enabled,
            grace_ms: core.grace_ms,
            quiet_ms: core.quiet_ms,
            interval_ms: core.interval_ms,
            batch: core.batch,
        }
    }
}

/// Certificate and key files (PEM), all required; `quorumkv certs` writes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate(s): peers and clients must present a certificate it signed.
    pub ca_cert: PathBuf,
    /// This node's certificate, issued by the CA for `node_id`.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

fn default_zone() -> Zone {
    // A constant that satisfies the zone naming rule; the fallback cannot be reached.
    Zone::new("default").unwrap_or_else(|_| unreachable!("\"default\" is a valid zone name"))
}
fn default_capacity() -> u32 {
    1
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7401))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9401))
}
fn default_ranges() -> u32 {
    1024
}
fn default_replication_max() -> u32 {
    5
}
fn default_keyspaces() -> BTreeMap<String, KeyspaceConfig> {
    BTreeMap::from([(
        DEFAULT_KEYSPACE.to_owned(),
        KeyspaceConfig {
            n: DEFAULT_KEYSPACE_N,
        },
    )])
}

// ----- command-line and environment layer ----------------------------------------------------

/// The config file path plus every override; flatten it into a subcommand that needs a config.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigArgs {
    /// The TOML configuration file (see ops/quorumkv.toml).
    #[arg(long, env = "QUORUMKV_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: ConfigOverrides,
}

impl ConfigArgs {
    /// Loads and validates the configuration these arguments describe.
    pub fn load(&self) -> Result<Config> {
        Config::load(self.config.as_deref(), &self.overrides)
    }
}

/// One optional flag per configuration field, each also read from its environment variable.
/// Flags win over variables (clap), both win over the file.
#[derive(Clone, Debug, Default, clap::Args)]
#[command(next_help_heading = "Configuration (flags beat QUORUMKV_* variables beat the file)")]
pub struct ConfigOverrides {
    /// This node's id (`node_id`).
    #[arg(long, env = "QUORUMKV_NODE_ID", value_name = "ID")]
    pub node_id: Option<NodeId>,
    /// This node's zone (`zone`).
    #[arg(long, env = "QUORUMKV_ZONE", value_name = "ZONE")]
    pub zone: Option<Zone>,
    /// This node's capacity weight (`capacity`).
    #[arg(long, env = "QUORUMKV_CAPACITY", value_name = "N")]
    pub capacity: Option<u32>,
    /// UDP address of the QUIC endpoint (`listen`).
    #[arg(long, env = "QUORUMKV_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// host:port others reach this node at (`advertise`).
    #[arg(long, env = "QUORUMKV_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Data directory (`data_dir`).
    #[arg(long, env = "QUORUMKV_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TCP address of the admin HTTP server (`admin_listen`).
    #[arg(long, env = "QUORUMKV_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Static members, comma-separated `id=host:port[@zone][*capacity]` (`members`).
    #[arg(long, env = "QUORUMKV_MEMBERS", value_name = "LIST")]
    pub members: Option<MemberList>,
    /// Number of ring ranges, a power of two (`ranges`).
    #[arg(long, env = "QUORUMKV_RANGES", value_name = "Q")]
    pub ranges: Option<u32>,
    /// Largest N any keyspace may use (`replication_max`).
    #[arg(long, env = "QUORUMKV_REPLICATION_MAX", value_name = "N")]
    pub replication_max: Option<u32>,
    /// Threads of the async runtime, 0 for one per CPU (`worker_threads`).
    #[arg(long, env = "QUORUMKV_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Keyspaces, comma-separated `name=n` (`keyspaces`).
    #[arg(long, env = "QUORUMKV_KEYSPACES", value_name = "LIST")]
    pub keyspaces: Option<KeyspaceList>,
    /// `timeouts.request_timeout_ms`.
    #[arg(long, env = "QUORUMKV_TIMEOUTS_REQUEST_TIMEOUT_MS", value_name = "MS")]
    pub timeouts_request_timeout_ms: Option<u64>,
    /// `timeouts.connect_timeout_ms`.
    #[arg(long, env = "QUORUMKV_TIMEOUTS_CONNECT_TIMEOUT_MS", value_name = "MS")]
    pub timeouts_connect_timeout_ms: Option<u64>,
    /// `timeouts.ping_interval_ms`.
    #[arg(long, env = "QUORUMKV_TIMEOUTS_PING_INTERVAL_MS", value_name = "MS")]
    pub timeouts_ping_interval_ms: Option<u64>,
    /// `timeouts.peer_down_after_ms`.
    #[arg(long, env = "QUORUMKV_TIMEOUTS_PEER_DOWN_AFTER_MS", value_name = "MS")]
    pub timeouts_peer_down_after_ms: Option<u64>,
    /// `limits.key_bytes_max`.
    #[arg(long, env = "QUORUMKV_LIMITS_KEY_BYTES_MAX", value_name = "BYTES")]
    pub limits_key_bytes_max: Option<usize>,
    /// `limits.value_bytes_max`.
    #[arg(long, env = "QUORUMKV_LIMITS_VALUE_BYTES_MAX", value_name = "BYTES")]
    pub limits_value_bytes_max: Option<usize>,
    /// `limits.frame_bytes_max`.
    #[arg(long, env = "QUORUMKV_LIMITS_FRAME_BYTES_MAX", value_name = "BYTES")]
    pub limits_frame_bytes_max: Option<u32>,
    /// `limits.streams_per_connection_max`.
    #[arg(
        long,
        env = "QUORUMKV_LIMITS_STREAMS_PER_CONNECTION_MAX",
        value_name = "N"
    )]
    pub limits_streams_per_connection_max: Option<u32>,
    /// `limits.in_flight_requests_max`.
    #[arg(long, env = "QUORUMKV_LIMITS_IN_FLIGHT_REQUESTS_MAX", value_name = "N")]
    pub limits_in_flight_requests_max: Option<usize>,
    /// `limits.context_entries_max`.
    #[arg(long, env = "QUORUMKV_LIMITS_CONTEXT_ENTRIES_MAX", value_name = "N")]
    pub limits_context_entries_max: Option<usize>,
    /// `limits.siblings_per_key_max`.
    #[arg(long, env = "QUORUMKV_LIMITS_SIBLINGS_PER_KEY_MAX", value_name = "N")]
    pub limits_siblings_per_key_max: Option<usize>,
    /// `limits.siblings_per_key_warn`.
    #[arg(long, env = "QUORUMKV_LIMITS_SIBLINGS_PER_KEY_WARN", value_name = "N")]
    pub limits_siblings_per_key_warn: Option<usize>,
    /// `limits.inbox_bytes_max`.
    #[arg(long, env = "QUORUMKV_LIMITS_INBOX_BYTES_MAX", value_name = "BYTES")]
    pub limits_inbox_bytes_max: Option<u32>,
    /// `limits.peer_queue_bytes_max`.
    #[arg(
        long,
        env = "QUORUMKV_LIMITS_PEER_QUEUE_BYTES_MAX",
        value_name = "BYTES"
    )]
    pub limits_peer_queue_bytes_max: Option<usize>,
    /// `hints.bytes_per_target_max`.
    #[arg(
        long,
        env = "QUORUMKV_HINTS_BYTES_PER_TARGET_MAX",
        value_name = "BYTES"
    )]
    pub hints_bytes_per_target_max: Option<u64>,
    /// `hints.max_age_ms`.
    #[arg(long, env = "QUORUMKV_HINTS_MAX_AGE_MS", value_name = "MS")]
    pub hints_max_age_ms: Option<u64>,
    /// `hints.delivery_batch`.
    #[arg(long, env = "QUORUMKV_HINTS_DELIVERY_BATCH", value_name = "N")]
    pub hints_delivery_batch: Option<usize>,
    /// `anti_entropy.enabled`.
    #[arg(long, env = "QUORUMKV_ANTI_ENTROPY_ENABLED", value_name = "BOOL")]
    pub anti_entropy_enabled: Option<bool>,
    /// `anti_entropy.interval_ms`.
    #[arg(long, env = "QUORUMKV_ANTI_ENTROPY_INTERVAL_MS", value_name = "MS")]
    pub anti_entropy_interval_ms: Option<u64>,
    /// `anti_entropy.exchanges_max`.
    #[arg(long, env = "QUORUMKV_ANTI_ENTROPY_EXCHANGES_MAX", value_name = "N")]
    pub anti_entropy_exchanges_max: Option<usize>,
    /// `anti_entropy.exchange_timeout_ms`.
    #[arg(
        long,
        env = "QUORUMKV_ANTI_ENTROPY_EXCHANGE_TIMEOUT_MS",
        value_name = "MS"
    )]
    pub anti_entropy_exchange_timeout_ms: Option<u64>,
    /// `anti_entropy.keys_per_second_max`.
    #[arg(
        long,
        env = "QUORUMKV_ANTI_ENTROPY_KEYS_PER_SECOND_MAX",
        value_name = "N"
    )]
    pub anti_entropy_keys_per_second_max: Option<u64>,
    /// `anti_entropy.build_keys_per_tick_max`.
    #[arg(
        long,
        env = "QUORUMKV_ANTI_ENTROPY_BUILD_KEYS_PER_TICK_MAX",
        value_name = "N"
    )]
    pub anti_entropy_build_keys_per_tick_max: Option<u64>,
    /// `tombstones.enabled`.
    #[arg(long, env = "QUORUMKV_TOMBSTONES_ENABLED", value_name = "BOOL")]
    pub tombstones_enabled: Option<bool>,
    /// `tombstones.grace_ms`.
    #[arg(long, env = "QUORUMKV_TOMBSTONES_GRACE_MS", value_name = "MS")]
    pub tombstones_grace_ms: Option<u64>,
    /// `tombstones.quiet_ms`.
    #[arg(long, env = "QUORUMKV_TOMBSTONES_QUIET_MS", value_name = "MS")]
    pub tombstones_quiet_ms: Option<u64>,
    /// `tombstones.interval_ms`.
    #[arg(long, env = "QUORUMKV_TOMBSTONES_INTERVAL_MS", value_name = "MS")]
    pub tombstones_interval_ms: Option<u64>,
    /// `tombstones.batch`.
    #[arg(long, env = "QUORUMKV_TOMBSTONES_BATCH", value_name = "N")]
    pub tombstones_batch: Option<usize>,
    /// The cluster CA certificate (`tls.ca_cert`).
    #[arg(long, env = "QUORUMKV_TLS_CA_CERT", value_name = "FILE")]
    pub tls_ca_cert: Option<PathBuf>,
    /// This node's certificate (`tls.cert`).
    #[arg(long, env = "QUORUMKV_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (`tls.key`).
    #[arg(long, env = "QUORUMKV_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl ConfigOverrides {
    /// Writes every override that is set into `table`, at its field's dotted path.
    fn apply(&self, table: &mut toml::Table) -> Result<()> {
        let mut set = Setter { table };
        set.field("node_id", &self.node_id)?;
        set.field("zone", &self.zone)?;
        set.field("capacity", &self.capacity)?;
        set.field("listen", &self.listen)?;
        set.field("advertise", &self.advertise)?;
        set.field("data_dir", &self.data_dir)?;
        set.field("admin_listen", &self.admin_listen)?;
        set.field("members", &self.members.as_ref().map(|m| &m.0))?;
        set.field("ranges", &self.ranges)?;
        set.field("replication_max", &self.replication_max)?;
        set.field("worker_threads", &self.worker_threads)?;
        set.field("keyspaces", &self.keyspaces.as_ref().map(|k| &k.0))?;
        set.field(
            "timeouts.request_timeout_ms",
            &self.timeouts_request_timeout_ms,
        )?;
        set.field(
            "timeouts.connect_timeout_ms",
            &self.timeouts_connect_timeout_ms,
        )?;
        set.field("timeouts.ping_interval_ms", &self.timeouts_ping_interval_ms)?;
        set.field(
            "timeouts.peer_down_after_ms",
            &self.timeouts_peer_down_after_ms,
        )?;
        set.field("limits.key_bytes_max", &self.limits_key_bytes_max)?;
        set.field("limits.value_bytes_max", &self.limits_value_bytes_max)?;
        set.field("limits.frame_bytes_max", &self.limits_frame_bytes_max)?;
        set.field(
            "limits.streams_per_connection_max",
            &self.limits_streams_per_connection_max,
        )?;
        set.field(
            "limits.in_flight_requests_max",
            &self.limits_in_flight_requests_max,
        )?;
        set.field(
            "limits.context_entries_max",
            &self.limits_context_entries_max,
        )?;
        set.field(
            "limits.siblings_per_key_max",
            &self.limits_siblings_per_key_max,
        )?;
        set.field(
            "limits.siblings_per_key_warn",
            &self.limits_siblings_per_key_warn,
        )?;
        set.field("limits.inbox_bytes_max", &self.limits_inbox_bytes_max)?;
        set.field(
            "limits.peer_queue_bytes_max",
            &self.limits_peer_queue_bytes_max,
        )?;
        set.field(
            "hints.bytes_per_target_max",
            &self.hints_bytes_per_target_max,
        )?;
        set.field("hints.max_age_ms", &self.hints_max_age_ms)?;
        set.field("hints.delivery_batch", &self.hints_delivery_batch)?;
        set.field("anti_entropy.enabled", &self.anti_entropy_enabled)?;
        set.field("anti_entropy.interval_ms", &self.anti_entropy_interval_ms)?;
        set.field(
            "anti_entropy.exchanges_max",
            &self.anti_entropy_exchanges_max,
        )?;
        set.field(
            "anti_entropy.exchange_timeout_ms",
            &self.anti_entropy_exchange_timeout_ms,
        )?;
        set.field(
            "anti_entropy.keys_per_second_max",
            &self.anti_entropy_keys_per_second_max,
        )?;
        set.field(
            "anti_entropy.build_keys_per_tick_max",
            &self.anti_entropy_build_keys_per_tick_max,
        )?;
        set.field("tombstones.enabled", &self.tombstones_enabled)?;
        set.field("tombstones.grace_ms", &self.tombstones_grace_ms)?;
        set.field("tombstones.quiet_ms", &self.tombstones_quiet_ms)?;
        set.field("tombstones.interval_ms", &self.tombstones_interval_ms)?;
        set.field("tombstones.batch", &self.tombstones_batch)?;
        set.field("tls.ca_cert", &self.tls_ca_cert)?;
        set.field("tls.cert", &self.tls_cert)?;
        set.field("tls.key", &self.tls_key)?;
        Ok(())
    }
}

/// Writes values into a TOML table by dotted path, creating intermediate tables.
struct Setter<'a> {
    table: &'a mut toml::Table,
}

impl Setter<'_> {
    fn field<T: Serialize>(&mut self, path: &str, value: &Option<T>) -> Result<()> {
        let Some(value) = value else {
            return Ok(());
        };
        let value = toml::Value::try_from(value).map_err(|e| config_error(path, e))?;
        let mut table = &mut *self.table;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                table.insert(part.to_owned(), value);
                return Ok(());
            }
            let entry = table
                .entry(part.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| config_error(part, "must be a table"))?;
        }
        Ok(())
    }
}

/// The `--members` list: comma-separated `id=address[@zone][*capacity]`.
///
/// `n1=10.0.0.1:7401@rack-a*2,n2=10.0.0.2:7401@rack-b,n3=[::1]:7401` is three members; zone
/// defaults to `default` and capacity to 1. Addresses cannot contain `@`, `*` or `,`, so the
/// grammar is unambiguous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberList(pub Vec<MemberConfig>);

impl FromStr for MemberList {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<MemberList, String> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(parse_member)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(MemberList)
    }
}

fn parse_member(entry: &str) -> std::result::Result<MemberConfig, String> {
    let err = |reason: String| {
        format!("member {entry:?}: {reason} (expected id=host:port[@zone][*capacity])")
    };
    let (id, rest) = entry
        .split_once('=')
        .ok_or_else(|| err("missing '='".into()))?;
    let id = NodeId::new(id.trim()).map_err(|e| err(e.to_string()))?;
    let (rest, capacity) = match rest.rsplit_once('*') {
        Some((rest, capacity)) => {
            let capacity = capacity
                .trim()
                .parse::<u32>()
                .map_err(|e| err(format!("capacity {capacity:?}: {e}")))?;
            (rest, capacity)
        }
        None => (rest, default_capacity()),
    };
    let (address, zone) = match rest.rsplit_once('@') {
        Some((address, zone)) => (
            address,
            Zone::new(zone.trim()).map_err(|e| err(e.to_string()))?,
        ),
        None => (rest, default_zone()),
    };
    let address = address.trim();
    check_host_port(address).map_err(|reason| err(format!("address {address:?} {reason}")))?;
    Ok(MemberConfig {
        id,
        address: address.to_owned(),
        zone,
        capacity,
    })
}

impl fmt::Display for MemberList {
    /// The compact grammar, always spelling zone and capacity: parses back to the same list.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}@{}*{}", m.id, m.address, m.zone, m.capacity)?;
        }
        Ok(())
    }
}

/// The `--keyspaces` list: comma-separated `name=n`, e.g. `default=3,logs=2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyspaceList(pub BTreeMap<String, KeyspaceConfig>);

impl FromStr for KeyspaceList {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<KeyspaceList, String> {
        let mut keyspaces = BTreeMap::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |reason: String| format!("keyspace {entry:?}: {reason} (expected name=n)");
            let (name, n) = entry
                .split_once('=')
                .ok_or_else(|| err("missing '='".into()))?;
            let name = name.trim();
            check_keyspace_name(name).map_err(|reason| err(reason.into()))?;
            let n = n
                .trim()
                .parse::<u8>()
                .map_err(|e| err(format!("n {n:?}: {e}")))?;
            if keyspaces
                .insert(name.to_owned(), KeyspaceConfig { n })
                .is_some()
            {
                return Err(err("listed twice".into()));
            }
        }
        Ok(KeyspaceList(keyspaces))
    }
}

impl fmt::Display for KeyspaceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, keyspace)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{name}={}", keyspace.n)?;
        }
        Ok(())
    }
}

// ----- loading --------------------------------------------------------------------------------

/// Fields without a default; checked before deserializing so the error names the variable and
/// flag that would set them.
const REQUIRED: [&str; 6] = [
    "node_id",
    "data_dir",
    "members",
    "tls.ca_cert",
    "tls.cert",
    "tls.key",
];

/// Fields that hold paths, resolved against the config file's directory when relative.
const PATH_FIELDS: [&str; 4] = ["data_dir", "tls.ca_cert", "tls.cert", "tls.key"];

/// The command-line flag that sets the field at `path`.
pub fn flag_name(path: &str) -> String {
    format!("--{}", path.replace(['.', '_'], "-"))
}

/// The environment variable that sets the field at `path`.
pub fn env_name(path: &str) -> String {
    format!("QUORUMKV_{}", path.replace('.', "_").to_uppercase())
}

impl Config {
    /// Loads the configuration: defaults, then the file at `path` (if any), then `overrides`
    /// (flags and environment variables, as clap parsed them); fills derived defaults; and
    /// validates the result.
    pub fn load(path: Option<&Path>, overrides: &ConfigOverrides) -> Result<Config> {
        let mut table = match path {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        overrides.apply(&mut table)?;
        Config::from_table(table)
    }

    /// Like [`Config::load`] with the file's text given; relative paths in it are relative to
    /// `base_dir`.
    pub fn load_str(text: &str, base_dir: &Path, overrides: &ConfigOverrides) -> Result<Config> {
        let mut table = parse_toml(text, Path::new("<config>"))?;
        resolve_paths(&mut table, base_dir);
        overrides.apply(&mut table)?;
        Config::from_table(table)
    }

    /// Builds a config from merged layers: required fields, typed fields, derived defaults,
    /// validation.
    fn from_table(table: toml::Table) -> Result<Config> {
        for path in REQUIRED {
            if lookup(&table, path).is_none() {
                return Err(config_error(
                    path,
                    format!(
                        "is required: set it in the config file, {} or {}",
                        env_name(path),
                        flag_name(path)
                    ),
                ));
            }
        }
        let explicit = Explicit {
            zone: lookup(&table, "zone").is_some(),
            capacity: lookup(&table, "capacity").is_some(),
            advertise: lookup(&table, "advertise").is_some(),
            frame_bytes_max: lookup(&table, "limits.frame_bytes_max").is_some(),
        };
        let mut config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(typed_error)?;
        config.derive_defaults(&explicit)?;
        config.validate()?;
        Ok(config)
    }

    /// Fills defaults that depend on other fields (see the module documentation).
    fn derive_defaults(&mut self, explicit: &Explicit) -> Result<()> {
        if let Some(me) = self.members.iter().find(|m| m.id == self.node_id) {
            if !explicit.zone {
                self.zone = me.zone.clone();
            }
            if !explicit.capacity {
                self.capacity = me.capacity;
            }
            if !explicit.advertise {
                self.advertise = me.address.clone();
            }
        }
        if self.advertise.is_empty() && !self.listen.ip().is_unspecified() {
            self.advertise = self.listen.to_string();
        }
        if !explicit.frame_bytes_max {
            self.limits.frame_bytes_max = u32::try_from(self.limits.value_bytes_max)
                .ok()
                .and_then(|v| v.checked_add(FRAME_SLACK_DEFAULT_BYTES))
                .ok_or_else(|| {
                    config_error(
                        "limits.value_bytes_max",
                        "is too large: frames must stay below 4 GiB",
                    )
                })?;
        }
        self.keyspaces
            .entry(DEFAULT_KEYSPACE.to_owned())
            .or_insert(KeyspaceConfig {
                n: DEFAULT_KEYSPACE_N,
            });
        Ok(())
    }

    /// The effective configuration as TOML; loading it back gives the same `Config`.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| config_error("(all)", e))
    }

    /// This node's entry in `members`, if it is listed.
    pub fn this_member(&self) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.id == self.node_id)
    }

    /// Checks every rule in the module documentation; the error names the first bad field.
    pub fn validate(&self) -> Result<()> {
        self.validate_members()?;
        self.validate_node()?;
        self.validate_ring()?;
        self.validate_keyspaces()?;
        self.validate_timeouts()?;
        self.validate_limits()?;
        self.validate_anti_entropy()?;
        self.validate_tombstones()?;
        self.validate_paths()
    }

    fn validate_members(&self) -> Result<()> {
        if self.members.is_empty() {
            return Err(config_error("members", "must list at least this node"));
        }
        if self.members.len() > MEMBERS_MAX {
            return Err(config_error(
                "members",
                format!(
                    "lists {} members; at most {MEMBERS_MAX} are allowed",
                    self.members.len()
                ),
            ));
        }
        let mut ids = BTreeSet::new();
        let mut addresses = BTreeMap::new();
        for (i, member) in self.members.iter().enumerate() {
            if !ids.insert(&member.id) {
                return Err(config_error(
                    &format!("members[{i}].id"),
                    format!("node {} is listed twice", member.id),
                ));
            }
            check_host_port(&member.address)
                .map_err(|reason| config_error(&format!("members[{i}].address"), reason))?;
            if let Some(other) = addresses.insert(member.address.as_str(), &member.id) {
                return Err(config_error(
                    &format!("members[{i}].address"),
                    format!("{} is also the address of node {other}", member.address),
                ));
            }
            if member.capacity == 0 {
                return Err(config_error(
                    &format!("members[{i}].capacity"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    fn validate_node(&self) -> Result<()> {
        let me = self.this_member().ok_or_else(|| {
            config_error(
                "members",
                format!("does not list this node (node_id = {})", self.node_id),
            )
        })?;
        if self.zone != me.zone {
            return Err(config_error(
                "zone",
                format!(
                    "is {} but this node's members entry says {}; set one of them only",
                    self.zone, me.zone
                ),
            ));
        }
        if self.capacity == 0 {
            return Err(config_error("capacity", "must be at least 1"));
        }
        if self.capacity != me.capacity {
            return Err(config_error(
                "capacity",
                format!(
                    "is {} but this node's members entry says {}; set one of them only",
                    self.capacity, me.capacity
                ),
            ));
        }
        if self.advertise.is_empty() {
            return Err(config_error(
                "advertise",
                format!(
                    "is required when listen ({}) is an unspecified address",
                    self.listen
                ),
            ));
        }
        check_host_port(&self.advertise).map_err(|reason| config_error("advertise", reason))?;
        if self.advertise != me.address {
            return Err(config_error(
                "advertise",
                format!(
                    "is {} but this node's members entry says {}; peers dial the members address",
                    self.advertise, me.address
                ),
            ));
        }
        Ok(())
    }

    fn validate_ring(&self) -> Result<()> {
        if !self.ranges.is_power_of_two() || self.ranges > RANGE_COUNT_MAX {
            return Err(config_error(
                "ranges",
                format!(
                    "is {}; it must be a power of two between 1 and {RANGE_COUNT_MAX}",
                    self.ranges
                ),
            ));
        }
        let limit = u32::try_from(RF_MAX_LIMIT).unwrap_or(u32::MAX);
        if !(1..=limit).contains(&self.replication_max) {
            return Err(config_error(
                "replication_max",
                format!(
                    "is {}; it must be between 1 and {limit}",
                    self.replication_max
                ),
            ));
        }
        Ok(())
    }

    fn validate_keyspaces(&self) -> Result<()> {
        if !self.keyspaces.contains_key(DEFAULT_KEYSPACE) {
            return Err(config_error(
                "keyspaces",
                "must include the `default` keyspace",
            ));
        }
        let members = self.members.len();
        let replication_max = self.replication_max as usize;
        for (name, keyspace) in &self.keyspaces {
            check_keyspace_name(name)
                .map_err(|reason| config_error("keyspaces", format!("name {name:?} {reason}")))?;
            let field = format!("keyspaces.{name}.n");
            let n = usize::from(keyspace.n);
            if n == 0 {
                return Err(config_error(&field, "must be at least 1"));
            }
            if n > members {
                return Err(config_error(
                    &field,
                    format!(
                        "is {n} but the cluster has only {members} member(s); a key cannot \
                         have more replicas than there are nodes"
                    ),
                ));
            }
            if n > replication_max {
                return Err(config_error(
                    &field,
                    format!("is {n} but replication_max is {replication_max}"),
                ));
            }
        }
        Ok(())
    }

    fn validate_timeouts(&self) -> Result<()> {
        let t = &self.timeouts;
        for (field, value) in [
            ("timeouts.request_timeout_ms", t.request_timeout_ms),
            ("timeouts.connect_timeout_ms", t.connect_timeout_ms),
            ("timeouts.ping_interval_ms", t.ping_interval_ms),
            ("timeouts.peer_down_after_ms", t.peer_down_after_ms),
        ] {
            if value == 0 {
                return Err(config_error(field, "must be at least 1"));
            }
        }
        // A peer must miss at least one ping before it is declared down, or healthy peers flap.
        if t.peer_down_after_ms <= t.ping_interval_ms {
            return Err(config_error(
                "timeouts.peer_down_after_ms",
                format!(
                    "is {} but must be greater than timeouts.ping_interval_ms ({})",
                    t.peer_down_after_ms, t.ping_interval_ms
                ),
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<()> {
        let l = &self.limits;
        for (field, value) in [
            ("limits.key_bytes_max", l.key_bytes_max),
            ("limits.value_bytes_max", l.value_bytes_max),
            ("limits.frame_bytes_max", l.frame_bytes_max as usize),
            (
                "limits.streams_per_connection_max",
                l.streams_per_connection_max as usize,
            ),
            ("limits.in_flight_requests_max", l.in_flight_requests_max),
            ("limits.context_entries_max", l.context_entries_max),
            ("limits.inbox_bytes_max", l.inbox_bytes_max as usize),
            ("limits.peer_queue_bytes_max", l.peer_queue_bytes_max),
            ("limits.siblings_per_key_max", l.siblings_per_key_max),
            ("limits.siblings_per_key_warn", l.siblings_per_key_warn),
            ("hints.delivery_batch", self.hints.delivery_batch),
        ] {
            if value == 0 {
                return Err(config_error(field, "must be at least 1"));
            }
        }
        // The largest legitimate request must fit one frame, or the limit on values is a lie.
        let needed = (l.key_bytes_max as u64)
            .saturating_add(l.value_bytes_max as u64)
            .saturating_add(
                (l.context_entries_max as u64)
                    .saturating_mul(crate::core::CONTEXT_TOKEN_SLACK as u64)
                    .saturating_mul(CONTEXT_ENTRY_BYTES_MAX),
            )
            .saturating_add(FRAME_ENVELOPE_BYTES);
        if u64::from(l.frame_bytes_max) < needed {
            return Err(config_error(
                "limits.frame_bytes_max",
                format!(
                    "is {} but a request with the largest key ({}), value ({}) and context \
                     ({} entries) needs {needed}",
                    l.frame_bytes_max, l.key_bytes_max, l.value_bytes_max, l.context_entries_max
                ),
            ));
        }
        if l.siblings_per_key_warn > l.siblings_per_key_max {
            return Err(config_error(
                "limits.siblings_per_key_warn",
                format!(
                    "is {} but must not exceed limits.siblings_per_key_max ({})",
                    l.siblings_per_key_warn, l.siblings_per_key_max
                ),
            ));
        }
        // Room for two of the largest frames, so one large request never waits on an inbox
        // that can only ever hold it alone.
        if u64::from(l.inbox_bytes_max) < 2 * u64::from(l.frame_bytes_max) {
            return Err(config_error(
                "limits.inbox_bytes_max",
                format!(
                    "is {} but must be at least twice limits.frame_bytes_max ({})",
                    l.inbox_bytes_max, l.frame_bytes_max
                ),
            ));
        }
        Ok(())
    }

    fn validate_anti_entropy(&self) -> Result<()> {
        let a = &self.anti_entropy;
        for (field, value) in [
            ("anti_entropy.interval_ms", a.interval_ms),
            ("anti_entropy.exchanges_max", a.exchanges_max as u64),
            ("anti_entropy.exchange_timeout_ms", a.exchange_timeout_ms),
            ("anti_entropy.keys_per_second_max", a.keys_per_second_max),
            (
                "anti_entropy.build_keys_per_tick_max",
                a.build_keys_per_tick_max,
            ),
        ] {
            if value == 0 {
                return Err(config_error(field, "must be at least 1"));
            }
        }
        Ok(())
    }

    fn validate_tombstones(&self) -> Result<()> {
        let t = &self.tombstones;
        if t.interval_ms == 0 {
            return Err(config_error("tombstones.interval_ms", "must be at least 1"));
        }
        if t.batch == 0 || t.batch > crate::core::tombstones::KEYS_PER_CHECK_MAX {
            return Err(config_error(
                "tombstones.batch",
                format!(
                    "must be between 1 and {}",
                    crate::core::tombstones::KEYS_PER_CHECK_MAX
                ),
            ));
        }
        Ok(())
    }

    fn validate_paths(&self) -> Result<()> {
        for (field, path) in [
            ("data_dir", &self.data_dir),
            ("tls.ca_cert", &self.tls.ca_cert),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(config_error(field, "must not be empty"));
            }
        }
        Ok(())
    }
}

/// Which derived fields some layer set explicitly.
struct Explicit {
    zone: bool,
    capacity: bool,
    advertise: bool,
    frame_bytes_max: bool,
}

fn config_error(field: &str, reason: impl fmt::Display) -> Error {
    Error::Config {
        field: field.to_owned(),
        reason: reason.to_string(),
    }
}

fn read_file(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })?;
    let mut table = parse_toml(&text, path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    resolve_paths(&mut table, base);
    Ok(table)
}

/// Parses TOML text into a table, reporting a syntax error on one line with its position.
fn parse_toml(text: &str, path: &Path) -> Result<toml::Table> {
    text.parse::<toml::Table>().map_err(|e| {
        let position = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        Error::ConfigFile {
            path: path.to_path_buf(),
            reason: format!("{position}{}", e.message().trim()),
        }
    })
}

/// Makes relative path fields absolute against `base` (the config file's directory).
fn resolve_paths(table: &mut toml::Table, base: &Path) {
    for path in PATH_FIELDS {
        if let Some(toml::Value::String(value)) = lookup_mut(table, path) {
            let as_path = Path::new(value.as_str());
            if as_path.is_relative() && !value.is_empty() {
                *value = base.join(as_path).to_string_lossy().into_owned();
            }
        }
    }
}

/// A type error found while turning the merged layers into a [`Config`], as a config error
/// naming the field by its path (`limits.value_bytes_max`, `members[1].id`).
fn typed_error(error: serde_path_to_error::Error<toml::de::Error>) -> Error {
    let path = error.path().to_string();
    let message = error.into_inner().message().trim().to_owned();
    Error::Config {
        field: if path == "." {
            "(config)".to_owned()
        } else {
            path
        },
        reason: message,
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

fn lookup_mut<'a>(table: &'a mut toml::Table, path: &str) -> Option<&'a mut toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get_mut(parts.next()?)?;
    for part in parts {
        value = value.as_table_mut()?.get_mut(part)?;
    }
    Some(value)
}

/// Checks `host:port`: a non-empty host (a bracketed IPv6 literal, an IPv4 address or a DNS
/// name) and a port in 1..=65535.
pub fn check_host_port(address: &str) -> std::result::Result<(), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| "must be host:port".to_owned())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("has port {port:?}, which is not a number in 1..=65535"))?;
    if port == 0 {
        return Err("has port 0; a peer cannot dial port 0".to_owned());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .ok_or_else(|| "has an unclosed '[' in its host".to_owned())?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("has {ip:?}, which is not an IPv6 address"))?;
        return Ok(());
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid_name {
        return Err(format!(
            "has host {host:?}, which is neither an IP address nor a DNS name (IPv6 needs brackets)"
        ));
    }
    Ok(())
}

/// Keyspace names: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
fn check_keyspace_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() || name.len() > KEYSPACE_NAME_LEN_MAX {
        return Err("must be 1 to 64 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err("may contain only lowercase letters a-z, digits 0-9, '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    const MINIMAL: &str = r#"
        node_id = "n1"
        data_dir = "/data"
        members = [
            { id = "n1", address = "10.0.0.1:7401", zone = "a", capacity = 2 },
            { id = "n2", address = "10.0.0.2:7401", zone = "b" },
            { id = "n3", address = "10.0.0.3:7401", zone = "c" },
        ]
        [tls]
        ca_cert = "/certs/ca.pem"
        cert = "/certs/node-n1.pem"
        key = "/certs/node-n1.key"
    "#;

    /// The clap command for the overrides, with every environment variable ignored, so tests
    /// are hermetic whatever the developer's shell exports.
    fn command_without_env() -> clap::Command {
        ConfigOverrides::augment_args(clap::Command::new("test")).mut_args(|arg| arg.env(None))
    }

    fn flags(args: &[&str]) -> ConfigOverrides {
        let argv = std::iter::once("test").chain(args.iter().copied());
        let matches = command_without_env().try_get_matches_from(argv).unwrap();
        ConfigOverrides::from_arg_matches(&matches).unwrap()
    }

    fn load(text: &str, args: &[&str]) -> Result<Config> {
        Config::load_str(text, Path::new("/etc/quorumkv"), &flags(args))
    }

    fn field_of(result: Result<Config>) -> String {
        match result {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_every_optional_field() {
        let config = load(MINIMAL, &[]).unwrap();
        assert_eq!(config.node_id.as_str(), "n1");
        assert_eq!(config.listen, "0.0.0.0:7401".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:9401".parse().unwrap());
        assert_eq!(config.ranges, 1024);
        assert_eq!(config.replication_max, 5);
        assert_eq!(config.keyspaces, default_keyspaces());
        assert_eq!(config.timeouts, Timeouts::default());
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.frame_bytes_max, 1024 * 1024 + 64 * 1024);
        assert_eq!(config.members[1].capacity, 1);
        // Derived from this node's members entry.
        assert_eq!(config.zone.as_str(), "a");
        assert_eq!(config.capacity, 2);
        assert_eq!(config.advertise, "10.0.0.1:7401");
    }

    #[test]
    fn a_missing_required_field_says_how_to_set_it() {
        for field in REQUIRED {
            let mut table: toml::Table = MINIMAL.parse().unwrap();
            match field.split_once('.') {
                Some((outer, inner)) => {
                    table[outer].as_table_mut().unwrap().remove(inner);
                }
                None => {
                    table.remove(field);
                }
            }
            let err = Config::from_table(table).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, Error::Config { field: ref f, .. } if f == field),
                "{message}"
            );
            assert!(message.contains(&env_name(field)), "{message}");
            assert!(message.contains(&flag_name(field)), "{message}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let text = format!("{MINIMAL}\n[limits]\nkey_bytes_max = 100\nvalue_bytes_max = 200\n");
        let config = load(&text, &["--limits-key-bytes-max", "300"]).unwrap();
        assert_eq!(config.limits.key_bytes_max, 300, "flag beats file");
        assert_eq!(config.limits.value_bytes_max, 200, "file beats default");
        assert_eq!(
            config.limits.frame_bytes_max,
            200 + FRAME_SLACK_DEFAULT_BYTES
        );
        let config = load(
            MINIMAL,
            &[
                "--members",
                "n1=h1:1@z*3,n2=h2:1",
                "--keyspaces",
                "default=2",
            ],
        )
        .unwrap();
        assert_eq!(config.members.len(), 2, "a flag replaces the whole list");
        assert_eq!((config.zone.as_str(), config.capacity), ("z", 3));
    }

    /// Every field has a flag and a variable named by the rule, and each flag lands on its
    /// field: a config built from flags alone, every one set to a non-default value, equals
    /// the config written out by hand.
    #[test]
    fn every_field_is_settable_by_flag_and_variable() {
        let args = [
            "--node-id",
            "n2",
            "--zone",
            "z2",
            "--capacity",
            "3",
            "--listen",
            "127.0.0.1:7000",
            "--advertise",
            "h2:7000",
            "--data-dir",
            "/d",
            "--admin-listen",
            "127.0.0.1:9000",
            "--members",
            "n1=h1:7000@z1,n2=h2:7000@z2*3",
            "--ranges",
            "64",
            "--replication-max",
            "2",
            "--worker-threads",
            "1",
            "--keyspaces",
            "default=2,logs=1",
            "--timeouts-request-timeout-ms",
            "11",
            "--timeouts-connect-timeout-ms",
            "12",
            "--timeouts-ping-interval-ms",
            "13",
            "--timeouts-peer-down-after-ms",
            "14",
            "--limits-key-bytes-max",
            "15",
            "--limits-value-bytes-max",
            "16",
            "--limits-frame-bytes-max",
            "100000",
            "--limits-streams-per-connection-max",
            "18",
            "--limits-in-flight-requests-max",
            "19",
            "--limits-context-entries-max",
            "20",
            "--limits-siblings-per-key-max",
            "22",
            "--limits-siblings-per-key-warn",
            "21",
            "--limits-inbox-bytes-max",
            "300000",
            "--limits-peer-queue-bytes-max",
            "21",
            "--hints-bytes-per-target-max",
            "23",
            "--hints-max-age-ms",
            "24",
            "--hints-delivery-batch",
            "25",
            "--anti-entropy-enabled",
            "false",
            "--anti-entropy-interval-ms",
            "31",
            "--anti-entropy-exchanges-max",
            "32",
            "--anti-entropy-exchange-timeout-ms",
            "33",
            "--anti-entropy-keys-per-second-max",
            "34",
            "--anti-entropy-build-keys-per-tick-max",
            "35",
            "--tombstones-enabled",
            "false",
            "--tombstones-grace-ms",
            "41",
            "--tombstones-quiet-ms",
            "42",
            "--tombstones-interval-ms",
            "43",
            "--tombstones-batch",
            "44",
            "--tls-ca-cert",
            "/c/ca.pem",
            "--tls-cert",
            "/c/n2.pem",
            "--tls-key",
            "/c/n2.key",
        ];
        let config = Config::load(None, &flags(&args)).unwrap();
        let member = |id: &str, address: &str, zone: &str, capacity| MemberConfig {
            id: NodeId::new(id).unwrap(),
            address: address.into(),
            zone: Zone::new(zone).unwrap(),
            capacity,
        };
        let expected = Config {
            node_id: NodeId::new("n2").unwrap(),
            zone: Zone::new("z2").unwrap(),
            capacity: 3,
            listen: "127.0.0.1:7000".parse().unwrap(),
            advertise: "h2:7000".into(),
            data_dir: "/d".into(),
            admin_listen: "127.0.0.1:9000".parse().unwrap(),
            ranges: 64,
            replication_max: 2,
            worker_threads: 1,
            keyspaces: "default=2,logs=1".parse::<KeyspaceList>().unwrap().0,
            timeouts: Timeouts {
                request_timeout_ms: 11,
                connect_timeout_ms: 12,
                ping_interval_ms: 13,
                peer_down_after_ms: 14,
            },
            limits: Limits {
                key_bytes_max: 15,
                value_bytes_max: 16,
                frame_bytes_max: 100_000,
                streams_per_connection_max: 18,
                in_flight_requests_max: 19,
                context_entries_max: 20,
                siblings_per_key_max: 22,
                siblings_per_key_warn: 21,
                inbox_bytes_max: 300_000,
                peer_queue_bytes_max: 21,
            },
            hints: HintsConfig {
                bytes_per_target_max: 23,
                max_age_ms: 24,
                delivery_batch: 25,
            },
            anti_entropy: AntiEntropy {
                enabled: false,
                interval_ms: 31,
                exchanges_max: 32,
                exchange_timeout_ms: 33,
                keys_per_second_max: 34,
                build_keys_per_tick_max: 35,
            },
            tombstones: Tombstones {
                enabled: false,
                grace_ms: 41,
                quiet_ms: 42,
                interval_ms: 43,
                batch: 44,
            },
            tls: TlsConfig {
                ca_cert: "/c/ca.pem".into(),
                cert: "/c/n2.pem".into(),
                key: "/c/n2.key".into(),
            },
            members: vec![
                member("n1", "h1:7000", "z1", 1),
                member("n2", "h2:7000", "z2", 3),
            ],
        };
        assert_eq!(config, expected);

        // Every leaf of the config (members and keyspaces count as leaves) has its flag and
        // its variable, spelled by the documented rule.
        let command = ConfigOverrides::augment_args(clap::Command::new("test"));
        let table: toml::Table = config.to_toml().unwrap().parse().unwrap();
        let mut leaves = Vec::new();
        for (key, value) in &table {
            match value.as_table() {
                Some(inner) if key != "keyspaces" => {
                    leaves.extend(inner.keys().map(|k| format!("{key}.{k}")));
                }
                _ => leaves.push(key.clone()),
            }
        }
        assert_eq!(leaves.len(), command.get_arguments().count(), "{leaves:?}");
        for leaf in leaves {
            let arg = command
                .get_arguments()
                .find(|a| a.get_long().map(|l| format!("--{l}")) == Some(flag_name(&leaf)))
                .unwrap_or_else(|| panic!("no flag {} for {leaf}", flag_name(&leaf)));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(env_name(&leaf).as_str()),
                "{leaf}"
            );
        }
    }

    /// Name of the test that the env test runs in a child process.
    const ENV_CHILD: &str = "config::tests::env_layer_child";
    const ENV_CHILD_MARKER: &str = "QUORUMKV_TEST_ENV_CHILD";

    /// Environment variables sit between the file and the flags. Setting variables in this
    /// process would race with every other test reading them, so the check runs in a child
    /// process (this test binary, running only [`env_layer_child`]) with its own environment.
    #[test]
    fn environment_sits_between_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("quorumkv.toml");
        let text = format!("ranges = 256\nreplication_max = 4\n{MINIMAL}");
        std::fs::write(&file, text).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.args([ENV_CHILD, "--exact", "--test-threads=1", "--nocapture"]);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("QUORUMKV_") {
                child.env_remove(name);
            }
        }
        child
            .env(ENV_CHILD_MARKER, "1")
            .env("QUORUMKV_CONFIG", &file)
            .env("QUORUMKV_RANGES", "512")
            .env("QUORUMKV_REPLICATION_MAX", "3")
            .env("QUORUMKV_LIMITS_KEY_BYTES_MAX", "77")
            .env("QUORUMKV_KEYSPACES", "default=2,logs=1");
        let output = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The child half of [`environment_sits_between_file_and_flags`]; a no-op elsewhere.
    #[test]
    fn env_layer_child() {
        if std::env::var_os(ENV_CHILD_MARKER).is_none() {
            return;
        }
        let command = ConfigArgs::augment_args(clap::Command::new("test"));
        let matches = command
            .try_get_matches_from(["test", "--replication-max", "2"])
            .unwrap();
        let args = ConfigArgs::from_arg_matches(&matches).unwrap();
        assert!(args.config.is_some(), "QUORUMKV_CONFIG names the file");
        let config = args.load().unwrap();
        assert_eq!(config.ranges, 512, "variable beats file");
        assert_eq!(config.replication_max, 2, "flag beats variable");
        assert_eq!(config.limits.key_bytes_max, 77, "variable beats default");
        assert_eq!(config.keyspaces["logs"].n, 1, "lists parse from variables");
        assert_eq!(config.timeouts, Timeouts::default());
    }

    #[test]
    fn each_validation_error_names_its_field() {
        let cases: &[(&[&str], &str, &str)] = &[
            (
                &["--limits-value-bytes-max", "0"],
                "",
                "limits.value_bytes_max",
            ),
            (&["--limits-key-bytes-max", "0"], "", "limits.key_bytes_max"),
            (
                &["--limits-frame-bytes-max", "1000"],
                "",
                "limits.frame_bytes_max",
            ),
            (
                &["--limits-streams-per-connection-max", "0"],
                "",
                "limits.streams_per_connection_max",
            ),
            (
                &["--limits-in-flight-requests-max", "0"],
                "",
                "limits.in_flight_requests_max",
            ),
            (
                &["--limits-context-entries-max", "0"],
                "",
                "limits.context_entries_max",
            ),
            (
                &["--timeouts-request-timeout-ms", "0"],
                "",
                "timeouts.request_timeout_ms",
            ),
            (
                &["--timeouts-connect-timeout-ms", "0"],
                "",
                "timeouts.connect_timeout_ms",
            ),
            (
                &["--timeouts-ping-interval-ms", "0"],
                "",
                "timeouts.ping_interval_ms",
            ),
            (
                &["--timeouts-peer-down-after-ms", "500"],
                "",
                "timeouts.peer_down_after_ms",
            ),
            (&["--ranges", "1000"], "", "ranges"),
            (&["--ranges", "0"], "", "ranges"),
            (&["--ranges", "131072"], "", "ranges"),
            (&["--replication-max", "0"], "", "replication_max"),
            (&["--replication-max", "17"], "", "replication_max"),
            (&["--replication-max", "2"], "", "keyspaces.default.n"),
            (&["--keyspaces", "default=4"], "", "keyspaces.default.n"),
            (&["--keyspaces", "default=0"], "", "keyspaces.default.n"),
            (
                &["--keyspaces", "logs=2,default=3", "--members", "n1=h:1"],
                "",
                "keyspaces.default.n",
            ),
            (&["--node-id", "n9"], "", "members"),
            (&["--zone", "elsewhere"], "", "zone"),
            (&["--capacity", "5"], "", "capacity"),
            (&["--capacity", "0"], "", "capacity"),
            (&["--advertise", "10.9.9.9:7401"], "", "advertise"),
            (
                &["--members", "n1=h1:1,n2=h1:1,n3=h3:1"],
                "",
                "members[1].address",
            ),
            (
                &["--members", "n1=h1:1*0,n2=h2:1,n3=h3:1"],
                "",
                "members[0].capacity",
            ),
            (
                &["--members", "n1=h1:1,n2=h2:1,n1=h3:1"],
                "",
                "members[2].id",
            ),
            (&[], "[keyspaces.Bad]\nn = 1\n", "keyspaces"),
            (&[], "advertise = \"no-port\"\n", "advertise"),
            (
                &[],
                "members = [{ id = \"n1\", address = \"h:0\" }]\n",
                "members[0].address",
            ),
            (&[], "data_dir = \"\"\n", "data_dir"),
            (
                &[],
                "[limits]\nvalue_bytes_max = 4294967295\n",
                "limits.value_bytes_max",
            ),
        ];
        for (args, extra, field) in cases {
            // Later keys of the same name replace earlier ones when the extra text is merged
            // as a second layer, so build it as a table and merge by hand.
            let mut table: toml::Table = MINIMAL.parse().unwrap();
            let extra_table: toml::Table = extra.parse().unwrap();
            for (key, value) in extra_table {
                match (table.get_mut(&key).and_then(|v| v.as_table_mut()), value) {
                    (Some(existing), toml::Value::Table(inner)) => existing.extend(inner),
                    (_, value) => {
                        table.insert(key, value);
                    }
                }
            }
            flags(args).apply(&mut table).unwrap();
            let result = Config::from_table(table);
            let message = result
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert_eq!(&field_of(result), field, "{args:?} {extra:?}: {message}");
            assert!(
                message.starts_with(&format!("config field `{field}`: ")),
                "{message}"
            );
        }
    }

    #[test]
    fn a_single_node_cluster_must_lower_the_default_n() {
        let err = load(MINIMAL, &["--members", "n1=h:1"]).unwrap_err();
        assert!(err.to_string().contains("only 1 member"), "{err}");
        load(
            MINIMAL,
            &["--members", "n1=h:1", "--keyspaces", "default=1"],
        )
        .unwrap();
    }

    #[test]
    fn advertise_comes_from_listen_when_the_node_is_not_listed() {
        let mut config = load(MINIMAL, &[]).unwrap();
        config.advertise.clear();
        config.members.retain(|m| m.id.as_str() != "n1");
        config.listen = "10.1.1.1:7401".parse().unwrap();
        let explicit = Explicit {
            zone: false,
            capacity: false,
            advertise: false,
            frame_bytes_max: true,
        };
        config.derive_defaults(&explicit).unwrap();
        assert_eq!(config.advertise, "10.1.1.1:7401");
        config.advertise.clear();
        config.listen = "0.0.0.0:7401".parse().unwrap();
        config.derive_defaults(&explicit).unwrap();
        assert!(
            config.advertise.is_empty(),
            "unspecified listen gives no advertise"
        );
    }

    #[test]
    fn unknown_fields_and_bad_types_are_refused() {
        let err = load(&format!("{MINIMAL}\n[limits]\nvalue_byte_max = 1\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("value_byte_max"), "{err}");
        let err = load(&format!("ranges = \"many\"\n{MINIMAL}"), &[]).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        let err = load(&MINIMAL.replace("\"n2\", address", "\"N2\", address"), &[]).unwrap_err();
        assert!(err.to_string().contains("N2"), "{err}");
    }

    #[test]
    fn syntax_errors_give_line_and_column_on_one_line() {
        let err = load("node_id = \"n1\"\nranges = = 3\n", &[]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::ConfigFile { .. }), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn relative_paths_in_the_file_are_relative_to_the_file() {
        let text = MINIMAL
            .replace("\"/data\"", "\"data\"")
            .replace("\"/certs/ca.pem\"", "\"certs/ca.pem\"");
        let config = load(&text, &["--tls-key", "k.pem"]).unwrap();
        assert_eq!(config.data_dir, Path::new("/etc/quorumkv/data"));
        assert_eq!(config.tls.ca_cert, Path::new("/etc/quorumkv/certs/ca.pem"));
        assert_eq!(
            config.tls.key,
            Path::new("k.pem"),
            "flags stay relative to the cwd"
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let config = load(MINIMAL, &["--keyspaces", "default=3,logs=2"]).unwrap();
        let text = config.to_toml().unwrap();
        assert_eq!(load(&text, &[]).unwrap(), config, "{text}");
    }

    #[test]
    fn member_grammar_round_trips() {
        let list: MemberList = "n1=10.0.0.1:7401@zone-a*2, n2=[::1]:7401@b,n3=host.example:9"
            .parse()
            .unwrap();
        assert_eq!(list.0.len(), 3);
        assert_eq!(list.0[0].zone.as_str(), "zone-a");
        assert_eq!(list.0[0].capacity, 2);
        assert_eq!(list.0[1].address, "[::1]:7401");
        assert_eq!(list.0[1].capacity, 1);
        assert_eq!(list.0[2].zone.as_str(), "default");
        let text = list.to_string();
        assert_eq!(text.parse::<MemberList>().unwrap(), list);
        for bad in [
            "n1",
            "N1=h:1",
            "n1=h:1@Zone",
            "n1=h:1*x",
            "n1=h:1*-1",
            "n1=h",
            "n1=h:99999",
            "n1=::1:7401",
            "n1=a b:1",
        ] {
            let err = bad.parse::<MemberList>().unwrap_err();
            assert!(
                err.contains("id=host:port[@zone][*capacity]"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn keyspace_grammar_round_trips() {
        let list: KeyspaceList = "default=3,logs=2".parse().unwrap();
        assert_eq!(list.to_string(), "default=3,logs=2");
        assert_eq!(list.to_string().parse::<KeyspaceList>().unwrap(), list);
        for bad in [
            "default",
            "Logs=1",
            "a=x",
            "a=1,a=2",
            &format!("{}=1", "k".repeat(65)),
        ] {
            assert!(bad.parse::<KeyspaceList>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_port_rules() {
        for ok in [
            "10.0.0.1:7401",
            "[::1]:1",
            "node-1.example.com:65535",
            "localhost:80",
        ] {
            check_host_port(ok).unwrap();
        }
        for bad in [
            "", "h", "h:", ":1", "h:0", "h:70000", "[::1:1", "[zz]:1", "a_b:1", "a..b:1",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/quorumkv.toml")
    }

    /// The example file loads, validates, and shows every field: set to its default where the
    /// default is a constant, commented out where it derives from another field.
    #[test]
    fn the_example_config_is_valid_and_complete() {
        let path = example_path();
        let config = Config::load(Some(&path), &ConfigOverrides::default()).unwrap();
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.admin_listen, default_admin_listen());
        assert_eq!(config.ranges, default_ranges());
        assert_eq!(config.replication_max, default_replication_max());
        assert_eq!(config.timeouts, Timeouts::default());
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.keyspaces["default"].n, DEFAULT_KEYSPACE_N);
        let text = std::fs::read_to_string(&path).unwrap();
        for derived in ["zone", "capacity", "advertise", "frame_bytes_max"] {
            assert!(text.contains(&format!("\n# {derived} = ")), "{derived}");
        }
        let table: toml::Table = config.to_toml().unwrap().parse().unwrap();
        let mut keys: Vec<String> = Vec::new();
        for (key, value) in &table {
            keys.push(key.clone());
            if let Some(inner) = value.as_table().filter(|_| key != "keyspaces") {
                keys.extend(inner.keys().cloned());
            }
        }
        keys.extend(["id", "address"].map(String::from));
        for key in keys {
            let shown = [
                format!("\n{key} = "),
                format!("\n# {key} = "),
                format!("\n[{key}]"),
                format!("\n[{key}."),
                format!("\n[[{key}]]"),
            ];
            assert!(
                shown.iter().any(|form| text.contains(form.as_str())),
                "{key} is not in the example"
            );
        }
    }
}
