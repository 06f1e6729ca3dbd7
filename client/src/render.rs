//! Text and JSON renderings of results and errors, as the `quorumkv` CLI prints them.
//!
//! They live here, next to the types they render, so the CLI stays a thin shell and the output
//! contract is unit-tested in one place. Every JSON rendering is exactly one line.
//!
//! # Values
//!
//! Values are bytes. A rendering shows them as UTF-8 text when **every** sibling is valid
//! UTF-8 (`"encoding":"utf8"`), and otherwise shows **all** of them in standard base64 with
//! padding (RFC 4648 section 4, alphabet `A-Z a-z 0-9 + /`, `"encoding":"base64"`), so a script
//! decodes one list with one rule. Contexts are always base64url without padding, the text
//! form of [`Context`].
//!
//! # The formats
//!
//! `get --json` prints
//! `{"siblings":["v1","v2"],"context":"<base64url>","encoding":"utf8"}`; a missing or deleted
//! key gives `"siblings":[]` and still a context (write with it to create the key without
//! racing a concurrent delete). Tombstones are never siblings.
//!
//! `get` without `--json` prints each value on its own line on stdout (so
//! `v=$(quorumkv get k)` captures exactly the value of an uncontended key), then on stderr a
//! line `context: <base64url>` and, only when values are base64, a line `encoding: base64`.
//! A value containing a newline spans lines; scripts that may meet such values use `--json`.
//!
//! `put` and `delete` print the new context: `--json` gives `{"context":"<base64url>"}`, plain
//! mode the bare token on one line.
//!
//! `admin replicas --json` prints one line
//! `{"keyspace":"default","key":"k","encoding":"utf8","replicas":[...]}` with one object per
//! replica, the preference list in order and then any fallbacks holding a hint for the key:
//! `node`, `role` (`primary` with its `position` in the preference list from 0, or `fallback`
//! with `hint_for`, the owner its hint is for), and `status`, one of `stored` (then `siblings`
//! as `[{"value":"v","timestamp_ms":1}]`, `deleted`, `version` as `{"<actor>":counter}` and
//! `state_hash` in hex), `missing`, `failed` (then `error`, a sentence) or `timed_out`. Every
//! value of every replica shares the document's one `encoding`. Plain `admin replicas` prints
//! the same as a table on stdout, one row per replica.
//!
//! Errors go to stderr as one line: `error: <message>` in plain mode; with `--json`,
//! `{"error":{"kind":"quorum_not_reached","message":"...","required":2,"acked":1,
//! "durable_required":1,"durable_acked":0}}` (the quorum fields only for that kind;
//! `no_node_reachable` carries `"attempts":[{"node":"...","reason":"..."}]`). `kind` is
//! [`Error::kind`].

use crate::client::GetResult;
use crate::context::Context;
use crate::error::Error;
use crate::protocol::{ReplicaAnswer, ReplicaCopy, ReplicaRole, SiblingValue};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Serialize;
use std::collections::BTreeMap;

/// How sibling values are written out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueEncoding {
    /// Every value is valid UTF-8 and is shown as text.
    Utf8,
    /// At least one value is not UTF-8; all are shown in standard, padded base64.
    Base64,
}

impl ValueEncoding {
    /// The name used in the output: `utf8` or `base64`.
    pub fn name(self) -> &'static str {
        match self {
            ValueEncoding::Utf8 => "utf8",
            ValueEncoding::Base64 => "base64",
        }
    }
}

/// The values of `siblings` as text, with the one encoding used for all of them.
pub fn encode_values(siblings: &[SiblingValue]) -> (ValueEncoding, Vec<String>) {
    let texts: Option<Vec<String>> = siblings
        .iter()
        .map(|sibling| String::from_utf8(sibling.value.clone()).ok())
        .collect();
    match texts {
        Some(texts) => (ValueEncoding::Utf8, texts),
        None => (
            ValueEncoding::Base64,
            siblings
                .iter()
                .map(|sibling| STANDARD.encode(&sibling.value))
                .collect(),
        ),
    }
}

/// `get --json`: `{"siblings":[...],"context":"...","encoding":"utf8"|"base64"}`, one line.
pub fn get_json(result: &GetResult) -> String {
    #[derive(Serialize)]
    struct GetJson<'a> {
        siblings: &'a [String],
        context: String,
        encoding: &'static str,
    }
    let (encoding, values) = encode_values(&result.siblings);
    to_json_line(&GetJson {
        siblings: &values,
        context: result.context.to_string(),
        encoding: encoding.name(),
    })
}

/// Plain `get`: what goes to stdout and what goes to stderr (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetText {
    /// Each value followed by a newline; empty when the key has no siblings.
    pub stdout: String,
    /// `context: <token>` and, for base64 values, `encoding: base64`, each with a newline.
    pub stderr: String,
}

/// Plain `get` output.
pub fn get_text(result: &GetResult) -> GetText {
    let (encoding, values) = encode_values(&result.siblings);
    let stdout = values.iter().map(|value| format!("{value}\n")).collect();
    let mut stderr = format!("context: {}\n", result.context);
    if encoding == ValueEncoding::Base64 {
        stderr.push_str("encoding: base64\n");
    }
    GetText { stdout, stderr }
}

/// `put --json` and `delete --json`: `{"context":"..."}`, one line.
pub fn context_json(context: &Context) -> String {
    #[derive(Serialize)]
    struct ContextJson {
        context: String,
    }
    to_json_line(&ContextJson {
        context: context.to_string(),
    })
}

/// Every sibling value stored by any of `replicas`, in order, so one encoding covers them all.
fn replica_values(replicas: &[ReplicaCopy]) -> Vec<SiblingValue> {
    replicas
        .iter()
        .filter_map(|replica| match &replica.answer {
            ReplicaAnswer::Stored(copy) => Some(copy.siblings.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn role_name(role: ReplicaRole) -> (&'static str, Option<u8>) {
    match role {
        ReplicaRole::Primary { position } => ("primary", Some(position)),
        ReplicaRole::Fallback => ("fallback", None),
    }
}

fn status_name(answer: &ReplicaAnswer) -> &'static str {
    match answer {
        ReplicaAnswer::Stored(_) => "stored",
        ReplicaAnswer::Missing => "missing",
        ReplicaAnswer::Failed { .. } => "failed",
        ReplicaAnswer::TimedOut => "timed_out",
    }
}

/// `admin replicas --json`: one line, described in the module documentation.
pub fn replicas_json(keyspace: &str, key: &str, replicas: &[ReplicaCopy]) -> String {
    #[derive(Serialize)]
    struct Value<'a> {
        value: &'a str,
        timestamp_ms: u64,
    }
    #[derive(Serialize)]
    struct Replica<'a> {
        node: &'a str,
        role: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        hint_for: Option<&'a str>,
        status: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        siblings: Option<Vec<Value<'a>>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        deleted: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        version: Option<&'a BTreeMap<String, u64>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        state_hash: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Document<'a> {
        keyspace: &'a str,
        key: &'a str,
        encoding: &'static str,
        replicas: Vec<Replica<'a>>,
    }
    let (encoding, texts) = encode_values(&replica_values(replicas));
    let mut texts = texts.iter();
    let rows = replicas
        .iter()
        .map(|replica| {
            let (role, position) = role_name(replica.role);
            let mut row = Replica {
                node: &replica.node,
                role,
                position,
                hint_for: replica.hint_for.as_deref(),
                status: status_name(&replica.answer),
                siblings: None,
                deleted: None,
                version: None,
                state_hash: None,
                error: None,
            };
            match &replica.answer {
                ReplicaAnswer::Stored(copy) => {
                    row.siblings = Some(
                        copy.siblings
                            .iter()
                            .zip(texts.by_ref())
                            .map(|(sibling, text)| Value {
                                value: text,
                                timestamp_ms: sibling.timestamp_ms,
                            })
                            .collect(),
                    );
                    row.deleted = Some(copy.deleted);
                    row.version = Some(&copy.version);
                    row.state_hash = Some(&copy.state_hash);
                }
                ReplicaAnswer::Failed { reason } => row.error = Some(reason),
                ReplicaAnswer::Missing | ReplicaAnswer::TimedOut => {}
            }
            row
        })
        .collect();
    to_json_line(&Document {
        keyspace,
        key,
        encoding: encoding.name(),
        replicas: rows,
    })
}

/// Plain `admin replicas`: a table with one row per replica (node, role, what it stores, its
/// version summary, the first 16 hex digits of its state hash, and its values or its error),
/// then a line saying so when values are shown in base64.
pub fn replicas_text(replicas: &[ReplicaCopy]) -> String {
    let (encoding, texts) = encode_values(&replica_values(replicas));
    let mut texts = texts.iter();
    let mut rows = vec![["NODE", "ROLE", "COPY", "VERSION", "HASH", "VALUES"].map(String::from)];
    for replica in replicas {
        let role = match replica.role {
            ReplicaRole::Primary { position } => format!("primary {position}"),
            ReplicaRole::Fallback => match &replica.hint_for {
                Some(owner) => format!("fallback for {owner}"),
                None => "fallback".to_string(),
            },
        };
        let (version, hash, values) = match &replica.answer {
            ReplicaAnswer::Stored(copy) => {
                let version = copy
                    .version
                    .iter()
                    .map(|(actor, counter)| format!("{actor}:{counter}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let mut values: Vec<String> = copy
                    .siblings
                    .iter()
                    .zip(texts.by_ref())
                    .map(|(_, text)| serde_json::to_string(text).unwrap_or_default())
                    .collect();
                if copy.deleted {
                    values.push("(deleted)".to_string());
                }
                let hash = copy.state_hash.chars().take(16).collect();
                (version, hash, values.join(", "))
            }
            ReplicaAnswer::Failed { reason } => {
                let reason = reason.replace(['\n', '\r'], " ");
                ("-".into(), "-".into(), format!("error: {reason}"))
            }
            ReplicaAnswer::Missing => ("-".into(), "-".into(), "-".into()),
            ReplicaAnswer::TimedOut => (
                "-".into(),
                "-".into(),
                "error: no answer before the node's request timeout".into(),
            ),
        };
        let status = status_name(&replica.answer).replace('_', " ");
        rows.push([replica.node.clone(), role, status, version, hash, values]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if encoding == ValueEncoding::Base64 {
        out.push_str("values are in base64: at least one is not UTF-8\n");
    }
    out
}

/// An error as one JSON line: `{"error":{"kind":"...","message":"...", ...}}`.
pub fn error_json(error: &Error) -> String {
    #[derive(Serialize)]
    struct Attempt<'a> {
        node: &'a str,
        reason: &'a str,
    }
    #[derive(Serialize)]
    struct Fields<'a> {
        kind: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        required: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        acked: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        durable_required: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        durable_acked: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        attempts: Option<Vec<Attempt<'a>>>,
    }
    #[derive(Serialize)]
    struct ErrorJson<'a> {
        error: Fields<'a>,
    }
    let mut fields = Fields {
        kind: error.kind(),
        message: error.to_string(),
        required: None,
        acked: None,
        durable_required: None,
        durable_acked: None,
        attempts: None,
    };
    match error {
        Error::QuorumNotReached {
            required,
            acked,
            durable_required,
            durable_acked,
            ..
        } => {
            fields.required = Some(*required);
            fields.acked = Some(*acked);
            fields.durable_required = Some(*durable_required);
            fields.durable_acked = Some(*durable_acked);
        }
        Error::NoNodeReachable { attempts } => {
            fields.attempts = Some(
                attempts
                    .iter()
                    .map(|(node, reason)| Attempt { node, reason })
                    .collect(),
            );
        }
        _ => {}
    }
    to_json_line(&ErrorJson { error: fields })
}

/// An error as one plain line: `error: <message>`.
pub fn error_text(error: &Error) -> String {
    // Messages may quote a node's text; keep the promise of one line.
    let message = error.to_string().replace(['\n', '\r'], " ");
    format!("error: {message}")
}

/// Serializes one of the output structs above. serde_json keeps struct field order, and a
/// compact rendering escapes newlines inside strings, so the output is always one line.
fn to_json_line<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        // Unreachable for these structs (strings and integers only), but never panic a CLI.
        format!(
            r#"{{"error":{{"kind":"encode","message":"{}"}}}}"#,
            e.to_string().escape_default()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn result(values: &[&[u8]], context: &[u8]) -> GetResult {
        GetResult {
            siblings: values
                .iter()
                .map(|value| SiblingValue {
                    value: value.to_vec(),
                    timestamp_ms: 1,
                })
                .collect(),
            context: Context::from_bytes(context.to_vec()),
        }
    }

    #[test]
    fn utf8_values_are_text() {
        let json = get_json(&result(
            &[b"hello", "h\u{e9}\"llo".as_bytes()],
            &[0xfb, 0xff],
        ));
        assert_eq!(
            json,
            r#"{"siblings":["hello","hé\"llo"],"context":"-_8","encoding":"utf8"}"#
        );
    }

    #[test]
    fn one_binary_value_makes_every_value_base64() {
        let json = get_json(&result(&[b"hi", &[0xff, 0xfe]], &[1]));
        assert_eq!(
            json,
            r#"{"siblings":["aGk=","//4="],"context":"AQ","encoding":"base64"}"#
        );
        let parsed: Value = serde_json::from_str(&json).unwrap();
        let decoded: Vec<Vec<u8>> = parsed["siblings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| STANDARD.decode(v.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(decoded, vec![b"hi".to_vec(), vec![0xff, 0xfe]]);
    }

    #[test]
    fn a_missing_key_has_no_siblings_and_still_a_context() {
        let missing = result(&[], &[9, 9]);
        assert_eq!(
            get_json(&missing),
            r#"{"siblings":[],"context":"CQk","encoding":"utf8"}"#
        );
        assert_eq!(
            get_text(&missing),
            GetText {
                stdout: String::new(),
                stderr: "context: CQk\n".into()
            }
        );
    }

    #[test]
    fn plain_get_puts_values_on_stdout_and_the_context_on_stderr() {
        assert_eq!(
            get_text(&result(&[b"a", b"b"], &[1])),
            GetText {
                stdout: "a\nb\n".into(),
                stderr: "context: AQ\n".into()
            }
        );
        assert_eq!(
            get_text(&result(&[&[0x80]], &[1])),
            GetText {
                stdout: "gA==\n".into(),
                stderr: "context: AQ\nencoding: base64\n".into()
            }
        );
    }

    #[test]
    fn writes_render_their_context() {
        assert_eq!(
            context_json(&Context::from_bytes(vec![1, 2])),
            r#"{"context":"AQI"}"#
        );
    }

    fn replicas() -> Vec<ReplicaCopy> {
        use crate::protocol::StoredCopy;
        vec![
            ReplicaCopy {
                node: "n1".into(),
                role: ReplicaRole::Primary { position: 0 },
                answer: ReplicaAnswer::Stored(StoredCopy {
                    siblings: vec![SiblingValue {
                        value: b"v2".to_vec(),
                        timestamp_ms: 9,
                    }],
                    deleted: false,
                    version: [("00000000000003e9".to_string(), 2)].into(),
                    state_hash: "ab".repeat(32),
                }),
                hint_for: None,
            },
            ReplicaCopy {
                node: "n2".into(),
                role: ReplicaRole::Primary { position: 1 },
                answer: ReplicaAnswer::Missing,
                hint_for: None,
            },
            ReplicaCopy {
                node: "n3".into(),
                role: ReplicaRole::Primary { position: 2 },
                answer: ReplicaAnswer::Failed {
                    reason: "believed\ndown".into(),
                },
                hint_for: None,
            },
            ReplicaCopy {
                node: "n4".into(),
                role: ReplicaRole::Fallback,
                answer: ReplicaAnswer::TimedOut,
                hint_for: Some("n3".into()),
            },
        ]
    }

    #[test]
    fn replicas_render_as_one_json_document() {
        let json = replicas_json("default", "k", &replicas());
        assert!(!json.contains('\n'));
        let parsed: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            parsed,
            json!({
                "keyspace": "default",
                "key": "k",
                "encoding": "utf8",
                "replicas": [
                    {"node": "n1", "role": "primary", "position": 0, "status": "stored",
                     "siblings": [{"value": "v2", "timestamp_ms": 9}], "deleted": false,
                     "version": {"00000000000003e9": 2}, "state_hash": "ab".repeat(32)},
                    {"node": "n2", "role": "primary", "position": 1, "status": "missing"},
                    {"node": "n3", "role": "primary", "position": 2, "status": "failed",
                     "error": "believed\ndown"},
                    {"node": "n4", "role": "fallback", "hint_for": "n3", "status": "timed_out"},
                ]
            })
        );
    }

    #[test]
    fn replicas_render_as_a_table() {
        let text = replicas_text(&replicas());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[0].starts_with("NODE  ROLE             COPY"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("n1    primary 0        stored"),
            "{text}"
        );
        assert!(
            lines[1].contains("00000000000003e9:2") && lines[1].contains(&"ab".repeat(8)),
            "{text}"
        );
        assert!(lines[1].ends_with("\"v2\""), "{text}");
        assert!(
            lines[2].starts_with("n2    primary 1        missing"),
            "{text}"
        );
        assert!(lines[3].ends_with("error: believed down"), "{text}");
        assert!(
            lines[4].starts_with("n4    fallback for n3  timed out"),
            "{text}"
        );
    }

    #[test]
    fn one_binary_value_makes_every_replica_value_base64() {
        let mut copies = replicas();
        if let ReplicaAnswer::Stored(copy) = &mut copies[0].answer {
            copy.siblings.push(SiblingValue {
                value: vec![0xff],
                timestamp_ms: 10,
            });
        }
        let parsed: Value = serde_json::from_str(&replicas_json("default", "k", &copies)).unwrap();
        assert_eq!(parsed["encoding"], "base64");
        assert_eq!(parsed["replicas"][0]["siblings"][0]["value"], "djI=");
        assert_eq!(parsed["replicas"][0]["siblings"][1]["value"], "/w==");
        assert!(
            replicas_text(&copies).ends_with("values are in base64: at least one is not UTF-8\n")
        );
    }

    #[test]
    fn quorum_errors_carry_the_shortfall() {
        let error = Error::QuorumNotReached {
            required: 2,
            acked: 1,
            durable_required: 1,
            durable_acked: 0,
            message: "timed out".into(),
        };
        let parsed: Value = serde_json::from_str(&error_json(&error)).unwrap();
        assert_eq!(parsed["error"]["kind"], "quorum_not_reached");
        assert_eq!(parsed["error"]["required"], 2);
        assert_eq!(parsed["error"]["acked"], 1);
        assert_eq!(parsed["error"]["durable_required"], 1);
        assert_eq!(parsed["error"]["durable_acked"], 0);
        assert!(parsed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"));
    }

    #[test]
    fn other_errors_have_kind_and_message_only_and_stay_on_one_line() {
        let error = Error::InvalidRequest {
            message: "r must be\nat least 1".into(),
        };
        let json = error_json(&error);
        assert!(!json.contains('\n'));
        let parsed: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            parsed,
            json!({"error": {"kind": "invalid_request", "message": "invalid request: r must be\nat least 1"}})
        );
        assert_eq!(
            error_text(&error),
            "error: invalid request: r must be at least 1"
        );
        let none = Error::NoNodeReachable {
            attempts: vec![("n1".into(), "timed out".into())],
        };
        let parsed: Value = serde_json::from_str(&error_json(&none)).unwrap();
        assert_eq!(
            parsed["error"]["attempts"],
            json!([{"node": "n1", "reason": "timed out"}])
        );
    }
}
