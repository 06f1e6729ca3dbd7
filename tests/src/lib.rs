//! Cross-crate, simulation, multi-process and fault-injection tests for QuorumKV.
//!
//! The library half holds the machinery tests share: [`sim`], a deterministic in-process
//! simulation of a whole cluster; [`cluster`], a harness that runs the real `quorumkv` binary as
//! several processes on loopback or, with [`netns`], each in a network namespace of its own;
//! and [`history`], a checker of what concurrent clients saw. The tests themselves live in
//! `tests/tests/`.

use std::io::Write as _;

pub mod cluster;
pub mod history;
pub mod netns;
pub mod sim;

/// Whether the environment demands that privileged tests run rather than skip: `CI`, or
/// `require_var` (`QUORUMKV_REQUIRE_NETNS`, `QUORUMKV_REQUIRE_PRIVILEGES`), set to anything but
/// empty, `0` or `false`.
pub fn required(require_var: &str) -> bool {
    let set = |name: &str| {
        std::env::var(name).is_ok_and(|value| !value.is_empty() && value != "0" && value != "false")
    };
    set("CI") || set(require_var)
}

/// A test that cannot have what it needs (`need`: root, a tool, a mount) skips visibly: it
/// prints `SKIPPED: <test>: <reason>` straight to the process's stderr (the test harness
/// captures `eprintln!` of passing tests, and a skip must be seen). When [`required`], it
/// panics instead, so CI can never pass by skipping.
pub fn skip(test: &str, need: &str, reason: &str, require_var: &str) {
    assert!(
        !required(require_var),
        "{test} needs {need} and cannot have it: {reason} (CI or {require_var}=1 is set, so \
         this fails instead of skipping)"
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}
