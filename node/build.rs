//! Tells the crate which commit it is built from (`QUORUMKV_COMMIT`, shown by the
//! `quorumkv_build_info` metric), when it is built from a git checkout with `git` at hand.

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_owned())
        .filter(|commit| !commit.is_empty());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=QUORUMKV_COMMIT={commit}");
    }
    // Rebuild when the checked-out commit moves. Only paths that exist are named: cargo reruns
    // a build script on every build while a named path is missing (a worktree's `.git` is a
    // file, a source tarball has none).
    println!("cargo:rerun-if-changed=build.rs");
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
