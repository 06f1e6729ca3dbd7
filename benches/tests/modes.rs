//! End-to-end runs of the `quorumkv-bench` binary: each mode runs for about a second and must
//! report completed operations and no errors. Nothing here looks at how fast anything was;
//! the figures belong to benchmark runs, not tests.

use serde_json::Value;
use std::process::{Command, Stdio};

/// Runs the binary with `args` and `--json`, and returns the parsed report.
fn bench(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_quorumkv-bench"))
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("running quorumkv-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "quorumkv-bench {args:?} failed ({}):\n{stderr}",
        output.status
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not one JSON object ({e}):\n{stdout}"))
}

/// Short, bounded runs: a small window, a few workers, no warmup.
const SHORT: [&str; 6] = ["--duration", "1", "--warmup", "0", "--concurrency", "8"];

fn assert_completed_without_errors(report: &Value, mode: &str, op: &str) {
    assert_eq!(report["mode"], mode, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let ops = report["operations"][op]["ops"].as_u64().unwrap_or(0);
    assert!(ops > 0, "no {op} completed: {report}");
    assert_eq!(report["ops"], ops, "{report}");
    assert!(
        report["operations"][op]["latency_us"]["p99"].is_u64(),
        "{report}"
    );
}

#[test]
fn raw_sled_durable_completes_inserts_with_group_commit() {
    let mut args = vec!["raw-sled", "--durable", "--records", "1000"];
    args.extend(SHORT);
    let report = bench(&args);
    assert_completed_without_errors(&report, "raw-sled", "insert");
    assert_eq!(report["config"]["durable"], true);
    let flushes = report["config"]["flushes"].as_u64().unwrap_or(0);
    assert!(flushes > 0, "{report}");
}

#[test]
fn ceiling_completes_requests_at_a_quorum_of_echo_processes() {
    let mut args = vec!["ceiling", "--replicas", "3", "--quorum", "2"];
    args.extend(SHORT);
    let report = bench(&args);
    assert_completed_without_errors(&report, "ceiling", "write");
    assert_eq!(report["config"]["replicas"], 3);
    assert_eq!(report["config"]["quorum"], 2);
}

#[test]
fn raw_quic_completes_an_ops_budget_exactly() {
    let report = bench(&[
        "raw-quic",
        "--ops",
        "500",
        "--warmup",
        "0",
        "--concurrency",
        "4",
    ]);
    assert_completed_without_errors(&report, "raw-quic", "write");
    assert_eq!(report["ops"], 500);
}

#[test]
fn an_impossible_quorum_is_refused_before_anything_starts() {
    let output = Command::new(env!("CARGO_BIN_EXE_quorumkv-bench"))
        .args(["ceiling", "--replicas", "2", "--quorum", "3"])
        .output()
        .expect("running quorumkv-bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--quorum"), "{stderr}");
}
