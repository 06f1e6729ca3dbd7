//! `quorumkv admin ...`: operator commands that inspect a cluster without changing it.
//!
//! - `quorumkv admin replicas KEY [--keyspace K] [--json]`: what each replica of KEY stores,
//!   read directly from each replica without the read repair a `get` triggers
//!   ([`quorumkv_client::Client::replicas`]). Plain output is a table on stdout, one row per
//!   replica in preference-list order: node, role (`primary P`, P its position in the
//!   preference list from 0), what it answered (`stored`, `missing`, `failed`, `timed out`),
//!   its version summary (`actor:counter`, actors in hex), the first 16 hex digits of its state
//!   hash, and its values (or `(deleted)`, or the error). `--json` prints one line, described
//!   in [`quorumkv_client::render`]. Two replicas with equal state hashes hold equal copies.
//!
//! - `quorumkv admin sync-status --admin ADDR,... [--json]`: each node's digest of every
//!   range's Merkle root, its hints pending per target (its admin server's `/sync-status`),
//!   and whether the cluster has converged (equal digests, no hints pending). Exit code 0, or
//!   1 when a node did not answer (the others' answers are still printed).
//!
//! The connection flags and environment variables of `replicas` are those of `get` (`--nodes`/
//! `QUORUMKV_NODES`, `--ca`/`QUORUMKV_CA`, `--cert`/`QUORUMKV_CERT`, `--key`/`QUORUMKV_KEY`).
//!
//! Exit codes: 0 when every replica answered (with a copy or with none); 7 when the node
//! answered but at least one replica failed or did not answer in time (the output still lists
//! every replica, the failed ones with their error); otherwise the client commands' codes for
//! a request that failed as a whole (2 invalid input such as an unknown keyspace, 4 cluster
//! unreachable or timed out, 5 certificate refused, 6 overloaded, 1 anything else; see
//! [`crate::cli_client`]), with the error on stderr.

use crate::cli_client::ConnectArgs;
use clap::{Args, Subcommand};
use quorumkv_client::{exit_code, render, ReplicaCopy, DEFAULT_KEYSPACE};

/// The exit code of `admin replicas` when some replica failed or stayed silent.
pub const EXIT_REPLICA_FAILED: i32 = 7;

/// The `admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Show what each replica of KEY stores, without repairing anything.
    Replicas(ReplicasArgs),
    /// Each node's Merkle roots (a digest of every range's root) and the hints it holds, so a
    /// script can tell when replicas have converged: with every node holding every range
    /// (N = nodes), equal digests and no hints pending.
    SyncStatus(SyncStatusArgs),
}

/// Flags of `admin sync-status`.
#[derive(Args, Clone, Debug)]
pub struct SyncStatusArgs {
    /// Admin addresses (`admin_listen`) of the nodes to ask, comma-separated.
    #[arg(
        long,
        env = "QUORUMKV_ADMIN",
        value_delimiter = ',',
        required = true,
        value_name = "HOST:PORT"
    )]
    pub admin: Vec<std::net::SocketAddr>,
    /// Print one JSON object instead of a line per node.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `admin replicas`.
#[derive(Args, Clone, Debug)]
pub struct ReplicasArgs {
    /// The key to inspect.
    pub key: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Keyspace of the key.
    #[arg(long, default_value = DEFAULT_KEYSPACE)]
    pub keyspace: String,
    /// Print the result (and errors) as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// Runs one `admin` subcommand; returns the exit code.
pub async fn run_admin(command: &AdminCommand) -> i32 {
    match command {
        AdminCommand::Replicas(args) => run_replicas(args).await,
        // A few blocking HTTP requests to admin servers, then done.
        AdminCommand::SyncStatus(args) => run_sync_status(args),
    }
}

/// `quorumkv admin sync-status`: prints each node's answer; returns 1 if a node did not answer
/// (after printing what the others said), else 0.
pub fn run_sync_status(args: &SyncStatusArgs) -> i32 {
    let (admin, json) = (&args.admin, args.json);
    let mut nodes = Vec::new();
    let mut unreachable = 0;
    for address in admin {
        let status = crate::dev::admin_get(*address, "/sync-status")
            .map_err(|e| e.to_string())
            .and_then(|text| {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())
            });
        match status {
            Ok(status) => nodes.push(status),
            Err(error) => {
                unreachable += 1;
                nodes.push(serde_json::json!({ "admin": address.to_string(), "error": error }));
            }
        }
    }
    let digests: std::collections::BTreeSet<String> = nodes
        .iter()
        .map(|n| n.get("digest").map_or_else(String::new, |d| d.to_string()))
        .collect();
    let built = nodes
        .iter()
        .all(|n| n.get("trees_built") == Some(&serde_json::Value::Bool(true)));
    let agree = unreachable == 0 && built && digests.len() == 1;
    let hints: u64 = nodes
        .iter()
        .filter_map(|n| n.get("hints_pending")?.as_object())
        .flat_map(|pending| pending.values().filter_map(serde_json::Value::as_u64))
        .sum();
    // Converged: every replica holds the same data and nothing waits to be handed off.
    let converged = agree && hints == 0;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "digests_equal": agree,
                "hints_pending": hints,
                "converged": converged,
                "nodes": nodes,
            })
        );
    } else {
        for node in &nodes {
            match node.get("error") {
                Some(error) => println!("{}  error: {error}", node["admin"]),
                None => println!(
                    "{}  built={}  hints_pending={}  keys={}  digest={}",
                    node["node"],
                    node["trees_built"],
                    node["hints_pending"]
                        .as_object()
                        .map_or(0, |h| h.values().filter_map(|v| v.as_u64()).sum::<u64>()),
                    node["keyspaces"].as_object().map_or(0, |k| k
                        .values()
                        .filter_map(|v| v["keys"].as_u64())
                        .sum::<u64>()),
                    node["digest"]
                ),
            }
        }
        println!("digests equal: {agree}; hints pending: {hints}; converged: {converged}");
    }
    if unreachable > 0 {
        eprintln!(
            "quorumkv: {unreachable} of {} nodes did not answer",
            admin.len()
        );
        return 1;
    }
    0
}

/// `quorumkv admin replicas KEY`: prints every replica's copy. Returns the exit code.
pub async fn run_replicas(args: &ReplicasArgs) -> i32 {
    let result = async {
        let client = args.connect.connect().await?;
        let copies = client.replicas(&args.keyspace, args.key.as_bytes()).await;
        client.close().await;
        copies
    }
    .await;
    match result {
        Ok(copies) => {
            if args.json {
                println!(
                    "{}",
                    render::replicas_json(&args.keyspace, &args.key, &copies)
                );
            } else {
                print!("{}", render::replicas_text(&copies));
            }
            replicas_exit_code(&copies)
        }
        Err(error) => {
            if args.json {
                eprintln!("{}", render::error_json(&error));
            } else {
                eprintln!("{}", render::error_text(&error));
            }
            exit_code(&error)
        }
    }
}

/// 0 when every replica answered, [`EXIT_REPLICA_FAILED`] otherwise.
fn replicas_exit_code(copies: &[ReplicaCopy]) -> i32 {
    if copies.iter().all(|copy| copy.answer.answered()) {
        0
    } else {
        EXIT_REPLICA_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorumkv_client::{Error, ReplicaAnswer, ReplicaRole};

    fn copy(answer: ReplicaAnswer) -> ReplicaCopy {
        ReplicaCopy {
            node: "n1".into(),
            role: ReplicaRole::Primary { position: 0 },
            answer,
            hint_for: None,
        }
    }

    #[test]
    fn the_exit_code_says_whether_every_replica_answered() {
        assert_eq!(replicas_exit_code(&[copy(ReplicaAnswer::Missing)]), 0);
        assert_eq!(replicas_exit_code(&[]), 0);
        let failed = copy(ReplicaAnswer::Failed {
            reason: "down".into(),
        });
        assert_eq!(
            replicas_exit_code(&[copy(ReplicaAnswer::Missing), failed]),
            EXIT_REPLICA_FAILED
        );
        assert_eq!(
            replicas_exit_code(&[copy(ReplicaAnswer::TimedOut)]),
            EXIT_REPLICA_FAILED
        );
    }

    #[test]
    fn the_failure_code_is_none_of_the_request_codes() {
        let request_errors = [
            Error::InvalidRequest { message: "".into() },
            Error::QuorumNotReached {
                required: 2,
                acked: 1,
                durable_required: 0,
                durable_acked: 0,
                message: "".into(),
            },
            Error::Timeout,
            Error::AuthenticationRefused { reason: "".into() },
            Error::Overloaded { message: "".into() },
            Error::Internal { message: "".into() },
        ];
        for error in request_errors {
            assert_ne!(exit_code(&error), EXIT_REPLICA_FAILED, "{error}");
        }
    }
}
