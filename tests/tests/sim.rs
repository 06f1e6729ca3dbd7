//! The in-memory cluster: real node cores, in-memory storage, a virtual clock and one seeded
//! RNG for every fault (see `quorumkv_tests::sim`).
//!
//! The first tests show the shape the replication code must keep: every decision is driven by
//! inputs and a clock the caller owns, so one seed replays one history exactly (three nodes).
//! Then the proof: [`CI_SEEDS`] seeds of the five-node workload under partitions, crashes,
//! loss, duplication, late messages and retries, each checked for convergence and by the
//! history checker (`quorumkv_tests::sim::workload`); and for each check a deliberately broken
//! variant it must catch (`quorumkv_tests::sim::broken`).
//!
//! Environment:
//!
//! * `QUORUMKV_SIM_SEED=<seed>` makes `replay_one_seed` run that seed alone and print its whole
//!   history (a failing seed prints this command); with `QUORUMKV_SIM_TOMBSTONES=1` it runs the
//!   tombstone collection test's configuration.
//! * `QUORUMKV_SIM_SEEDS=<count>` or `<first>..<end>` makes `soak` run that many seeds (from a
//!   random first seed, printed) or that range.

use quorumkv_client::protocol::Response;
use quorumkv_client::Context;
use quorumkv_node::version_vector::KeyState;
use quorumkv_ring::NodeId;
use quorumkv_tests::history::Violation;
use quorumkv_tests::sim::workload::{self, cluster_config, replay_command, Hooks, Run, Workload};
use quorumkv_tests::sim::{broken, ClientOp, Completed, Sim, SimConfig};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// A mixed read-modify-write workload over a few keys: clients read, then write with the
/// context they read, sometimes blindly, sometimes delete.
fn mixed_workload(sim: &mut Sim, clients: usize, ops_per_client: usize) {
    let nodes = sim.node_ids();
    let mut done = vec![0usize; clients];
    let mut last_context: BTreeMap<(usize, String), Context> = BTreeMap::new();
    let mut next_key: BTreeMap<usize, String> = BTreeMap::new();
    sim.run_clients(
        clients,
        600_000,
        |rng: &mut ChaCha8Rng, client, completed: Option<&Completed>| {
            if let Some(completed) = completed {
                if let (ClientOp::Get { key, .. }, Response::Got { context, .. }) =
                    (&completed.op, &completed.response)
                {
                    last_context.insert((client, key.clone()), context.clone());
                }
            }
            if done[client] == ops_per_client {
                return None;
            }
            done[client] += 1;
            let node = nodes[rng.random_range(0..nodes.len())].clone();
            let key = next_key
                .entry(client)
                .or_insert_with(|| format!("k{}", rng.random_range(0..4)))
                .clone();
            let op = match rng.random_range(0..10) {
                0..=3 => ClientOp::Get {
                    key,
                    r: rng.random_range(1..=3),
                },
                4..=7 => ClientOp::Put {
                    value: format!("c{client}-op{}", done[client]),
                    context: last_context.get(&(client, key.clone())).cloned(),
                    key,
                    w: rng.random_range(1..=3),
                    dw: rng.random_range(0..=1),
                },
                8 => ClientOp::Put {
                    value: format!("c{client}-op{}", done[client]),
                    context: None,
                    key,
                    w: 2,
                    dw: 1,
                },
                _ => ClientOp::Delete {
                    context: last_context.get(&(client, key.clone())).cloned(),
                    key,
                    w: 2,
                    dw: 1,
                },
            };
            next_key.insert(client, format!("k{}", rng.random_range(0..4)));
            Some((node, op, rng.random_range(0..30)))
        },
    );
}

fn run(seed: u64) -> Vec<Completed> {
    let mut sim = Sim::new(seed, SimConfig::default());
    mixed_workload(&mut sim, 4, 40);
    assert_eq!(
        sim.pending_operations(),
        0,
        "seed {seed}: operations left unanswered"
    );
    sim.history().to_vec()
}

#[test]
fn the_same_seed_produces_the_same_history() {
    for seed in [1, 2, 3, 0xdead_beef] {
        let first = run(seed);
        let second = run(seed);
        assert_eq!(first.len(), 160, "seed {seed}: every operation completes");
        assert_eq!(
            first, second,
            "seed {seed} did not replay; rerun with this seed to debug"
        );
        // Not vacuous: the workload succeeds and writes create data.
        let writes = first
            .iter()
            .filter(|c| matches!(c.response, Response::Written { .. }))
            .count();
        assert!(writes > 20, "seed {seed}: only {writes} successful writes");
    }
}

#[test]
fn different_seeds_produce_different_histories() {
    assert_ne!(run(1), run(2));
}

/// Crash one node after a stream of writes; what it kept includes every write acknowledged
/// durably. Writes go with W = 3 so every replica applies each write; alternate writes ask for
/// `dw = 3` (every replica flushed before the ack) or `dw = 0` (nobody had to), and the stream
/// ends with a run of `dw = 0` writes that no flush covers. Only `dw = 0` writes may be
/// missing from the crashed node, and some must be, or the durability model is not exercised.
#[test]
fn a_crash_loses_only_writes_acknowledged_without_durability() {
    for seed in [7, 8, 9] {
        let config = SimConfig {
            loss: 0.0,
            flush_delay_ms: 40,
            ..SimConfig::default()
        };
        let mut sim = Sim::new(seed, config);
        let nodes = sim.node_ids();
        let victim: NodeId = nodes[1].clone();
        let mut issued = 0usize;
        sim.run_clients(4, 600_000, |rng: &mut ChaCha8Rng, client, _| {
            issued += 1;
            let durable = issued.is_multiple_of(2) && issued <= 360;
            let op = ClientOp::Put {
                key: format!("key-{issued}"),
                value: format!("value-{issued}"),
                context: None,
                w: 3,
                dw: if durable { 3 } else { 0 },
            };
            let node = nodes[rng.random_range(0..nodes.len())].clone();
            (issued <= 400 && client < 4).then_some((node, op, 1))
        });
        sim.crash(&victim);
        let storage = sim.storage(&victim);
        let mut durable_ok = 0;
        let mut lost_without_durability = 0;
        for completed in sim.history() {
            let (ClientOp::Put { key, value, dw, .. }, Response::Written { .. }) =
                (&completed.op, &completed.response)
            else {
                continue;
            };
            let held =
                quorumkv_node::storage::Storage::read(storage.as_ref(), "default", key.as_bytes())
                    .expect("memory storage reads")
                    .is_some_and(|state: KeyState| {
                        state
                            .live_siblings()
                            .iter()
                            .any(|s| s.value.as_deref() == Some(value.as_bytes()))
                    });
            if *dw == 3 {
                assert!(held, "seed {seed}: durable write {key} lost by the crash");
                durable_ok += 1;
            } else if !held {
                lost_without_durability += 1;
            }
        }
        assert!(
            durable_ok > 50,
            "seed {seed}: only {durable_ok} durable writes checked"
        );
        // The model must actually lose unflushed writes, or this test proves nothing.
        assert!(
            lost_without_durability > 0,
            "seed {seed}: the crash lost no dw=0 write; the durability model is not exercised"
        );
        sim.restart(&victim);
        assert!(sim.is_up(&victim));
    }
}

/// Group commit: durable writes that arrive while a flush is running share the next one.
#[test]
fn concurrent_durable_writes_share_flushes() {
    let config = SimConfig {
        loss: 0.0,
        flush_delay_ms: 5,
        ..SimConfig::default()
    };
    let mut sim = Sim::new(11, config);
    let nodes = sim.node_ids();
    let mut issued = 0usize;
    sim.run_clients(64, 600_000, |rng: &mut ChaCha8Rng, _client, _| {
        issued += 1;
        let op = ClientOp::Put {
            key: format!("key-{issued}"),
            value: format!("value-{issued}"),
            context: None,
            w: 2,
            dw: 1,
        };
        let node = nodes[rng.random_range(0..nodes.len())].clone();
        (issued <= 1000).then_some((node, op, 0))
    });
    let written = sim
        .history()
        .iter()
        .filter(|c| matches!(c.response, Response::Written { .. }))
        .count();
    assert_eq!(written, 1000);
    let flushes = sim.flushes();
    println!("1000 durable writes at concurrency 64: {flushes} flushes over 3 nodes");
    assert!(flushes > 0, "durable writes must flush");
    assert!(
        flushes < 500,
        "{flushes} flushes for 1000 durable writes: no group commit"
    );
}

/// Seeds of the five-node workload every `cargo test` runs, in [`SEED_CHUNKS`] tests so the
/// harness can run them in parallel.
const CI_SEEDS: u64 = 200;
const SEED_CHUNKS: u64 = 4;

fn run_seed(seed: u64, hooks: Hooks) -> Run {
    let workload = Workload::default();
    workload::run(seed, &workload, cluster_config(&workload), hooks)
}

/// Runs `seeds` and fails naming every failing seed, the command that replays it and why.
fn check_seeds(seeds: impl Iterator<Item = u64>) {
    let mut failures = Vec::new();
    let mut runs = 0;
    let mut slowest = (0, 0);
    for seed in seeds {
        runs += 1;
        let run = run_seed(seed, Hooks::default());
        if let Ok(took) = run.convergence {
            slowest = slowest.max((took, run.bound_ms));
        }
        if let Err(why) = run.verdict() {
            let known = if run.only_known_bug() {
                " (the known late-retry bug: every value reported came back through a retry)"
            } else {
                ""
            };
            failures.push(format!(
                "seed {seed} failed{known}; replay it with\n  {}\n{why}",
                replay_command(seed)
            ));
        }
    }
    println!(
        "{runs} seeds; the slowest convergence took {} ms of virtual time (bound {} ms)",
        slowest.0, slowest.1
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} seeds failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Seeds that fail today because of a known bug, left out of the CI seeds and run by the ignored
/// test `known_bug_seeds` (`cargo test -p quorumkv-tests --test sim --profile test --
/// --ignored`), which passes once the bug is fixed; then move them back. Every one is the late
/// retry of [`a_late_retry_of_a_superseded_write_does_not_bring_it_back`]: the value reported
/// superseded or back is a write that was retried at another node after its first attempt was
/// applied and superseded, and with `client_retries = 0` all of them pass.
const KNOWN_BUG_SEEDS: [u64; 3] = [59, 65, 210];

/// The CI seeds: the first [`CI_SEEDS`] from 1 up that are not known to fail.
fn ci_seeds() -> Vec<u64> {
    (1..)
        .filter(|seed| !KNOWN_BUG_SEEDS.contains(seed))
        .take(CI_SEEDS as usize)
        .collect()
}

fn ci_chunk(chunk: u64) {
    let seeds = ci_seeds();
    let per_chunk = seeds.len().div_ceil(SEED_CHUNKS as usize);
    check_seeds(
        seeds
            .into_iter()
            .skip(chunk as usize * per_chunk)
            .take(per_chunk),
    );
}

#[test]
fn five_nodes_under_faults_ci_seeds_part_1() {
    ci_chunk(0);
}

#[test]
fn five_nodes_under_faults_ci_seeds_part_2() {
    ci_chunk(1);
}

#[test]
fn five_nodes_under_faults_ci_seeds_part_3() {
    ci_chunk(2);
}

#[test]
fn five_nodes_under_faults_ci_seeds_part_4() {
    ci_chunk(3);
}

#[test]
#[ignore = "known bug: late retries bring superseded writes back (see KNOWN_BUG_SEEDS)"]
fn known_bug_seeds() {
    check_seeds(KNOWN_BUG_SEEDS.into_iter());
}

/// `QUORUMKV_SIM_SEED=<seed>`: runs that seed alone and prints its history and report.
#[test]
fn replay_one_seed() {
    let Ok(text) = std::env::var("QUORUMKV_SIM_SEED") else {
        return;
    };
    let seed: u64 = text
        .parse()
        .unwrap_or_else(|e| panic!("QUORUMKV_SIM_SEED={text}: {e}"));
    let workload = Workload {
        trace: true,
        ..Workload::default()
    };
    let config = if std::env::var_os("QUORUMKV_SIM_TOMBSTONES").is_some() {
        tombstone_config(&workload)
    } else {
        cluster_config(&workload)
    };
    let run = workload::run(seed, &workload, config, Hooks::default());
    println!(
        "seed {seed}\nclient attempts:\n  {}\nhistory:\n{}\nfault timeline:\n  {}\nconvergence: {:?} (bound {} ms)\nexercised: {:?}\n{}",
        run.trace.join("\n  "),
        run.describe_history(),
        run.timeline.join("\n  "),
        run.convergence,
        run.bound_ms,
        run.exercised,
        run.report
    );
    if let Err(why) = run.verdict() {
        panic!("seed {seed} failed:\n{why}");
    }
}

/// `QUORUMKV_SIM_SEEDS=<count>` (from a random first seed) or `<first>..<end>`: a soak.
#[test]
fn soak() {
    let Ok(text) = std::env::var("QUORUMKV_SIM_SEEDS") else {
        return;
    };
    let seeds = match text.split_once("..") {
        Some((first, end)) => {
            let first: u64 = first.parse().expect("QUORUMKV_SIM_SEEDS=<first>..<end>");
            let end: u64 = end.parse().expect("QUORUMKV_SIM_SEEDS=<first>..<end>");
            first..end
        }
        None => {
            let count: u64 = text.parse().expect("QUORUMKV_SIM_SEEDS=<count>");
            let first = rand::random::<u64>() >> 16;
            first..first + count
        }
    };
    println!("soak: seeds {seeds:?}");
    check_seeds(seeds);
}

/// The fixed seeds are not vacuous: over a handful of them, writes are acknowledged through
/// fallbacks, operations are retried with the same request id, nodes crash, `dw = 0` writes
/// are exempted by crashes, reads see siblings, and deletes and context writes succeed.
#[test]
fn the_workload_exercises_every_mechanism() {
    let mut hinted = 0;
    let mut retried = 0;
    let mut crashes = 0;
    let mut exempt = 0;
    let mut siblings_max = 0;
    let mut deletes = 0;
    let mut context_puts = 0;
    for seed in 1..=5 {
        let run = run_seed(seed, Hooks::default());
        hinted += run.exercised.hinted_writes;
        retried += run.exercised.retried;
        crashes += run.exercised.crashes;
        exempt += run.report.stats.exempt_by_crash;
        siblings_max = siblings_max.max(run.report.stats.siblings_max);
        let ops = &run.report.stats.operations;
        deletes += ops.get(&("delete", "ok")).copied().unwrap_or(0);
        context_puts += ops.get(&("put_context", "ok")).copied().unwrap_or(0);
    }
    println!(
        "hinted {hinted} retried {retried} crashes {crashes} exempt {exempt} siblings_max \
         {siblings_max} deletes {deletes} context puts {context_puts}"
    );
    assert!(hinted > 0, "no write was acknowledged through a fallback");
    assert!(retried > 0, "no operation was retried");
    assert!(crashes > 0, "no node crashed");
    assert!(exempt > 0, "no dw=0 write was exempted by a crash");
    assert!(siblings_max >= 2, "no read saw siblings");
    assert!(
        deletes > 0 && context_puts > 0,
        "no deletes or context writes"
    );
}

/// The five-node workload replays exactly: the same seed gives the same history, fault timeline
/// and client attempts.
#[test]
fn the_five_node_workload_replays_exactly() {
    let workload = Workload {
        trace: true,
        ..Workload::default()
    };
    for seed in [7, 8] {
        let first = workload::run(seed, &workload, cluster_config(&workload), Hooks::default());
        let second = workload::run(seed, &workload, cluster_config(&workload), Hooks::default());
        assert_eq!(first.history, second.history, "seed {seed}");
        assert_eq!(first.timeline, second.timeline, "seed {seed}");
        assert_eq!(first.trace, second.trace, "seed {seed}");
    }
}

/// The same production mechanisms run in the simulation: requests are forwarded to replicas,
/// fallbacks take writes for owners believed down, and anti-entropy exchanges find and push
/// differences (counted by a filter that passes every message on unchanged).
#[test]
fn forwarding_fallbacks_and_anti_entropy_all_happen() {
    use quorumkv_node::peer::PeerMessage;
    use quorumkv_tests::sim::Filter;
    use std::cell::RefCell;
    use std::rc::Rc;

    let counts: Rc<RefCell<BTreeMap<&'static str, usize>>> = Rc::default();
    let seen = Rc::clone(&counts);
    let hooks = Hooks {
        filter: Some(Filter(Box::new(move |_, message: PeerMessage| {
            let kind = match &message {
                PeerMessage::Replicate {
                    hint_for: Some(_), ..
                } => "replicate_to_fallback",
                other => other.kind(),
            };
            *seen.borrow_mut().entry(kind).or_default() += 1;
            vec![message]
        }))),
        after_heal: None,
    };
    let run = run_seed(1, hooks);
    assert!(run.verdict().is_ok(), "{:?}", run.verdict());
    let counts = counts.borrow();
    println!("messages by kind: {counts:?}");
    for kind in [
        "forward",
        "replicate_to_fallback",
        "read",
        "ae_level",
        "ae_push",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} message: {counts:?}"
        );
    }
}

/// Seeds the negative tests run: each broken variant must be caught on every one.
const BROKEN_SEEDS: [u64; 3] = [1, 2, 3];

fn violations(run: &Run) -> String {
    run.report.to_string()
}

#[test]
fn repair_switched_off_is_caught_by_the_convergence_check() {
    for seed in BROKEN_SEEDS {
        let run = run_seed(seed, broken::repair_off());
        let reasons = run
            .convergence
            .as_ref()
            .expect_err("replicas converged although nothing repaired them");
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("range") || r.contains("hints")),
            "seed {seed}: unexpected reasons {reasons:?}"
        );
    }
}

#[test]
fn a_merge_that_drops_a_sibling_is_caught_as_lost_writes() {
    for seed in BROKEN_SEEDS {
        let run = run_seed(seed, broken::drop_a_sibling());
        assert!(
            run.report
                .violations
                .iter()
                .any(|v| matches!(v, Violation::LostWrite { .. })),
            "seed {seed}: no lost write found:\n{}",
            violations(&run)
        );
    }
}

#[test]
fn a_forged_value_is_caught_as_unknown() {
    for seed in BROKEN_SEEDS {
        let run = run_seed(seed, broken::forge_a_value(3));
        assert!(
            run.report.violations.iter().any(
                |v| matches!(v, Violation::UnknownValue { value, .. } if value.starts_with("forged-"))
            ),
            "seed {seed}: no unknown value found:\n{}",
            violations(&run)
        );
    }
}

#[test]
fn another_keys_state_is_caught_as_a_wrong_key() {
    for seed in BROKEN_SEEDS {
        let run = run_seed(seed, broken::answer_for_another_key(3));
        assert!(
            run.report
                .violations
                .iter()
                .any(|v| matches!(v, Violation::WrongKey { .. })),
            "seed {seed}: no value under a wrong key found:\n{}",
            violations(&run)
        );
    }
}

#[test]
fn a_replaced_value_shown_again_is_caught_as_a_superseded_sibling() {
    for seed in BROKEN_SEEDS {
        let run = run_seed(seed, broken::superseded_sibling_back(10));
        assert!(
            run.report
                .violations
                .iter()
                .any(|v| matches!(v, Violation::SupersededSibling { .. })),
            "seed {seed}: no superseded sibling found:\n{}",
            violations(&run)
        );
    }
}

#[test]
fn a_forgotten_tombstone_is_caught_as_a_resurrection() {
    for seed in BROKEN_SEEDS {
        let run = run_seed(seed, broken::resurrect_after_heal());
        assert!(
            run.report
                .violations
                .iter()
                .any(|v| matches!(v, Violation::Resurrected { .. })),
            "seed {seed}: no resurrection found:\n{}",
            violations(&run)
        );
    }
}

/// Known bug, found by the simulation (seeds in [`KNOWN_BUG_SEEDS`]): a client's retry of a write
/// (same request id, at another node, after its first attempt's answer was lost or said
/// `Unavailable`) brings the write's value back once the key has retired more than
/// `RETIRED_WRITES_MAX` other writes since the first attempt was applied and superseded. The key
/// no longer remembers the request id, so the retry is stored as a new write under a new dot that
/// no context covers. Here: one write, superseded by a chain of read-modify-writes, then its retry.
fn late_retry_story(supersessions: usize) -> Option<Vec<String>> {
    use quorumkv_client::protocol::{Request, RequestId, WriteOptions};
    use quorumkv_node::core::driver::{Driver, KEYSPACE};
    use quorumkv_node::core::CoreConfig;

    let mut cluster = Driver::new(3, 3, CoreConfig::default());
    let [n1, n2, _n3] = cluster.ids();
    let original = Request::Put {
        keyspace: KEYSPACE.into(),
        key: b"k".to_vec(),
        value: b"v0".to_vec(),
        context: None,
        request_id: RequestId([42; 16]),
        options: WriteOptions {
            w: Some(3),
            dw: Some(1),
            ..WriteOptions::default()
        },
    };
    let first = cluster.request(&n1, original.clone());
    cluster.settle();
    assert!(cluster.written(first), "{:?}", cluster.reply(first));
    for i in 1..=supersessions {
        let read = cluster.get(&n1, "k", 3);
        cluster.settle();
        let Some(Response::Got { context, .. }) = cluster.reply(read).cloned() else {
            panic!("read {i} failed: {:?}", cluster.reply(read));
        };
        let put = cluster.put_with(&n1, "k", &format!("v{i}"), Some(context), 3);
        cluster.settle();
        assert!(cluster.written(put), "{:?}", cluster.reply(put));
    }
    // The first attempt's answer was lost; the client retries at another node.
    let retry = cluster.request(&n2, original);
    cluster.settle();
    let _ = cluster.reply(retry);
    let read = cluster.get(&n1, "k", 3);
    cluster.settle();
    cluster.got(read)
}

#[test]
fn a_retry_within_the_retired_window_changes_nothing() {
    let supersessions = quorumkv_node::version_vector::RETIRED_WRITES_MAX;
    assert_eq!(
        late_retry_story(supersessions),
        Some(vec![format!("v{supersessions}")])
    );
}

#[test]
#[ignore = "known bug: a retry after RETIRED_WRITES_MAX supersessions brings the write back"]
fn a_late_retry_of_a_superseded_write_does_not_bring_it_back() {
    let supersessions = quorumkv_node::version_vector::RETIRED_WRITES_MAX + 1;
    assert_eq!(
        late_retry_story(supersessions),
        Some(vec![format!("v{supersessions}")])
    );
}

/// With no room for hints (a real configuration: `hint_bytes_per_target_max = 0`), the node cut
/// off during the cold writes can only learn them from anti-entropy (nothing reads them before
/// the convergence check): it must still converge within the bound, and the history pass.
/// Clients do not retry here, so the known late-retry bug (see [`KNOWN_BUG_SEEDS`]) cannot
/// interfere with what this test is about.
#[test]
fn anti_entropy_alone_converges_within_the_bound() {
    let workload = Workload::default();
    for seed in 1..=10 {
        let mut config = cluster_config(&workload);
        config.core.hint_bytes_per_target_max = 0;
        config.client_retries = 0;
        let run = workload::run(seed, &workload, config, Hooks::default());
        if let Err(why) = run.verdict() {
            panic!(
                "seed {seed} without hints failed (convergence {:?}, bound {} ms):\n{why}",
                run.convergence, run.bound_ms
            );
        }
        // Not vacuous: the cold node was behind when everything healed.
        assert!(
            run.convergence.as_ref().is_ok_and(|took| *took > 0),
            "seed {seed}: nothing to repair after the heal"
        );
        println!("seed {seed}: converged in {:?} ms", run.convergence);
    }
}

/// The second bug class the soak found (seed 3962 of an earlier workload): one logical write
/// stored twice under different dots (a forwarding node handing the request to a second
/// coordinator, or a client retry, while the first had applied it), and a later writer whose
/// read showed only what superseded it. Its token names the context and the writes shown, not
/// the writes the read state had retired, so a replica holding the other copy keeps it beside
/// the new write. Returns the values that replica then shows.
///
/// The obvious fix, a read's token also naming the writes its state had retired, makes this
/// story pass but re-retires those writes with a fresh time, which pushes other retirements out
/// of the `RETIRED_WRITES_MAX` window: with it, 155 of seeds 1..320 fail by the late-retry bug.
/// Both want the same repair: knowing a retried write is superseded for as long as it can be
/// retried.
fn second_copy_story() -> Option<Vec<String>> {
    use quorumkv_client::protocol::{Request, RequestId, WriteOptions};
    use quorumkv_node::core::driver::{Driver, KEYSPACE};
    use quorumkv_node::core::CoreConfig;

    let mut cluster = Driver::new(5, 3, CoreConfig::default());
    let ids: [NodeId; 5] = cluster.ids();
    let owners = cluster.owners("k");
    let (a, b, c) = (owners[0].clone(), owners[1].clone(), owners[2].clone());
    let cut_off = |cluster: &mut Driver, node: &NodeId| {
        for other in ids.iter().filter(|other| *other != node) {
            cluster.cut(node, other);
        }
    };
    let got_context = |cluster: &Driver, handle| match cluster.reply(handle) {
        Some(Response::Got { context, .. }) => context.clone(),
        other => panic!("read failed: {other:?}"),
    };
    // One write, applied at A and (its retry) at B, each cut off from everyone.
    let v1 = Request::Put {
        keyspace: KEYSPACE.into(),
        key: b"k".to_vec(),
        value: b"v1".to_vec(),
        context: None,
        request_id: RequestId([1; 16]),
        options: WriteOptions {
            w: Some(1),
            dw: Some(1),
            ..WriteOptions::default()
        },
    };
    for node in &ids {
        cut_off(&mut cluster, node);
    }
    let first = cluster.request(&a, v1.clone());
    let retry = cluster.request(&b, v1);
    cluster.settle();
    assert!(cluster.written(first) && cluster.written(retry));
    // B stays cut off; A and C see A's copy, and v2 supersedes it.
    cluster.heal();
    cut_off(&mut cluster, &b);
    let read = cluster.get(&c, "k", 2);
    cluster.settle();
    let context = got_context(&cluster, read);
    let v2 = cluster.put_with(&c, "k", "v2", Some(context), 2);
    cluster.settle();
    assert!(cluster.written(v2), "{:?}", cluster.reply(v2));
    // A reader of v2 writes v3 at B, which still holds its copy of v1.
    let read = cluster.get(&a, "k", 1);
    cluster.settle();
    let context = got_context(&cluster, read);
    let v3 = cluster.put_with(&b, "k", "v3", Some(context), 1);
    cluster.settle();
    assert!(cluster.written(v3), "{:?}", cluster.reply(v3));
    let read = cluster.get(&b, "k", 1);
    cluster.settle();
    cluster.got(read)
}

#[test]
#[ignore = "known bug: a second copy of a superseded write survives beside a later write"]
fn a_second_copy_of_a_superseded_write_is_not_shown_beside_a_later_write() {
    assert_eq!(second_copy_story(), Some(vec!["v3".to_string()]));
}

/// Tombstone collection under the same faults: deleted keys are collected on every node while
/// clients write, delete and read through partitions, crashes, duplicated and late messages;
/// after the heal every deleted key is gone within the collection bound, the replicas converge
/// again, and nothing deleted comes back (the history checker). The quiet period is twice the
/// longest a simulated message can take (`delay_ms` plus `late_delay_ms`), as the collection
/// rule requires. Clients do not retry here, so the known late-retry bug (see
/// [`KNOWN_BUG_SEEDS`]) cannot interfere with what this test is about.
#[test]
fn tombstone_collection_under_faults_brings_nothing_back() {
    let workload = Workload::default();
    let mut collected = 0;
    let mut during_faults = 0;
    let mut removals = 0;
    for seed in 1..=TOMBSTONE_SEEDS {
        let config = tombstone_config(&workload);
        let run = workload::run(seed, &workload, config, Hooks::default());
        if let Err(why) = run.verdict() {
            panic!(
                "seed {seed} with tombstone collection failed (collection {:?}):\n{why}",
                run.collection
            );
        }
        if run.collection.is_some_and(|c| c.is_ok()) {
            collected += 1;
        }
        during_faults += run.collected_during_faults;
        removals += run.collected;
    }
    println!("{removals} removals of deleted keys, {during_faults} of them during the faults");
    assert_eq!(collected, TOMBSTONE_SEEDS, "collection did not run");
    // Not vacuous: keys were collected, also while messages were late, duplicated and lost.
    assert!(during_faults > 0, "nothing was collected during the faults");
}

/// The cluster with tombstone collection on, in the simulation's time scale, and no client
/// retries (`QUORUMKV_SIM_TOMBSTONES=1` makes `replay_one_seed` use it).
fn tombstone_config(workload: &Workload) -> SimConfig {
    let mut config = cluster_config(workload);
    let longest_message_ms = config.delay_ms.1 + config.late_delay_ms;
    config.core.tombstones.enabled = true;
    config.core.tombstones.grace_ms = 200;
    config.core.tombstones.quiet_ms = 2 * longest_message_ms;
    config.core.tombstones.interval_ms = 250;
    config.client_retries = 0;
    config
}

/// Seeds of the tombstone collection test.
const TOMBSTONE_SEEDS: u64 = 50;
