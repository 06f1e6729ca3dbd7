//! The network-fault suite: three `quorumkv` processes, each in a network namespace of its own
//! with its own address (`quorumkv_tests::netns`), concurrent clients writing and reading
//! through real kernel networking, and a fault schedule of partitions, packet loss, kill -9 and
//! SIGSTOP. A checker over the recorded history (`quorumkv_tests::history`) then finds any
//! acknowledged write lost, any value under a key it was never written to (or never written at
//! all), any superseded value among a read's siblings, and any superseded value come back.
//!
//! # The workload
//!
//! [`CLIENTS`] clients (each its own `quorumkv_client::Client`, in the hub namespace, talking to
//! the nodes' bridge addresses) loop over [`KEYS`] keys with a seeded choice of operation:
//! gets; blind puts; read-modify-write puts (a get, then a put with that get's context); and
//! deletes (a get, then a delete with its context). R, W and `dw` are drawn per operation
//! (R and W in 1..=3, `dw` in 0..=1). Every written value is globally unique (`c3-op41`).
//! Every operation is bounded ([`OPERATION_LIMIT`], on top of the client's own per-attempt
//! timeout), so the workload makes progress through any fault; an operation that runs out is
//! recorded as indeterminate.
//!
//! # The fault schedule
//!
//! One after another, each held for [`HOLD`] while the workload runs, then healed, with the
//! cluster whole again (every failure detector sees every peer) before the next:
//!
//! 1. full partition {n1} | {n2, n3} (clients still reach every node);
//! 2. one-way partition: n1 hears neither n2 nor n3, which still hear n1 (its replica writes
//!    apply elsewhere while its quorums fail);
//! 3. n3 isolated from peers and clients;
//! 4. 15 % random packet loss on every host, per datagram;
//! 5. kill -9 of n2, restarted on the same data directory;
//! 6. SIGSTOP of n1, then SIGCONT.
//!
//! Then the faults are healed, the workload stops, and every key is read at R = 3, which merges
//! what every replica holds (there is no read repair or anti-entropy yet, so only a read of all
//! replicas sees every write). Those final reads and the history go to the checker. The checks
//! are deterministic; the timing is not, and the suite asserts no duration.
//!
//! # Modes
//!
//! CI runs the schedule above once (about 40 s on a 2-core machine). `QUORUMKV_NETFAULT_SOAK=<seconds>`
//! adds that many seconds of random faults after it: random kinds, victims, groups, loss rates
//! and hold times, sometimes two faults at once (at most one of them a process fault). The
//! choices come from `QUORUMKV_NETFAULT_SEED` (random if unset, and printed either way; the
//! CI schedule is fixed, the seed then only drives the workload's choices).
//!
//! # Privileges
//!
//! The suite needs root, iproute2, iptables and ethtool (`.ci/run` installs them). Without them
//! it prints `SKIPPED: ...` and passes, unless `CI` or `QUORUMKV_REQUIRE_NETNS=1` is set, in
//! which case it fails.

use quorumkv_client::{Client, Context, Error, ReadOptions, WriteOptions, DEFAULT_KEYSPACE};
use quorumkv_tests::cluster::{
    ensure_binary, wait_until, wait_until_async, ClusterOptions, TestCluster, PEER_UP,
};
use quorumkv_tests::history::{self, Op, Outcome, Record, Recorder};
use quorumkv_tests::netns::{self, Network};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Nodes, each in its own namespace; N = 3.
const NODES: usize = 3;
/// Concurrent clients.
const CLIENTS: usize = 4;
/// Keys the clients share: few, so that writes collide and siblings form.
const KEYS: usize = 6;
/// How long each fault of the fixed schedule lasts.
const HOLD: Duration = Duration::from_secs(5);
/// Healthy traffic before the first fault and after the last.
const CALM: Duration = Duration::from_secs(2);
/// The bound on one operation, retries included.
const OPERATION_LIMIT: Duration = Duration::from_secs(10);
/// The coordinators' quorum timeout and the failure detector's silence bound (the nodes'
/// defaults, written out because the harness otherwise uses more tolerant ones).
const NODE_TIMEOUT_MS: u64 = 2_000;
/// Keys written while one node is isolated and never read before the convergence check.
const COLD_KEYS: usize = 20;
/// How long the final reads may keep failing after the heal before the suite gives up.
const FINAL_READ_DEADLINE: Duration = Duration::from_secs(60);
/// Loss rate of the fixed schedule.
const LOSS: f64 = 0.15;

/// One fault.
#[derive(Clone, Debug)]
enum Fault {
    /// Nodes in different groups cannot hear each other.
    Partition(Vec<Vec<usize>>),
    /// `receiver` stops hearing `senders`.
    OneWay {
        senders: Vec<usize>,
        receiver: usize,
    },
    /// A node cut off from peers and clients.
    Isolate(usize),
    /// Random loss on every host.
    Loss(f64),
    /// kill -9, restarted on the same data directory when healed.
    Kill(usize),
    /// SIGSTOP, SIGCONT when healed.
    Pause(usize),
}

impl Fault {
    fn is_process_fault(&self) -> bool {
        matches!(self, Fault::Kill(_) | Fault::Pause(_))
    }

    fn describe(&self) -> String {
        let name = |index: &usize| format!("n{}", index + 1);
        let names = |indexes: &[usize]| indexes.iter().map(name).collect::<Vec<_>>().join(",");
        match self {
            Fault::Partition(groups) => format!(
                "full partition {}",
                groups
                    .iter()
                    .map(|group| format!("{{{}}}", names(group)))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
            Fault::OneWay { senders, receiver } => format!(
                "one-way partition: {} stops hearing {}",
                name(receiver),
                names(senders)
            ),
            Fault::Isolate(index) => format!("{} isolated", name(index)),
            Fault::Loss(p) => format!("{:.0} % packet loss", p * 100.0),
            Fault::Kill(index) => format!("kill -9 of {}", name(index)),
            Fault::Pause(index) => format!("SIGSTOP of {}", name(index)),
        }
    }
}

/// The fixed schedule CI runs.
fn fixed_schedule() -> Vec<(Vec<Fault>, Duration)> {
    [
        Fault::Partition(vec![vec![0], vec![1, 2]]),
        Fault::OneWay {
            senders: vec![1, 2],
            receiver: 0,
        },
        Fault::Isolate(2),
        Fault::Loss(LOSS),
        Fault::Kill(1),
        Fault::Pause(0),
    ]
    .into_iter()
    .map(|fault| (vec![fault], HOLD))
    .collect()
}

/// A random fault for soak mode.
fn random_fault(rng: &mut ChaCha8Rng) -> Fault {
    let victim = rng.random_range(0..NODES);
    match rng.random_range(0..6) {
        0 => {
            let mut groups = vec![vec![victim], Vec::new()];
            for index in (0..NODES).filter(|index| *index != victim) {
                groups[1].push(index);
            }
            Fault::Partition(groups)
        }
        1 => Fault::OneWay {
            senders: (0..NODES)
                .filter(|index| *index != victim && rng.random_bool(0.7))
                .collect(),
            receiver: victim,
        },
        2 => Fault::Isolate(victim),
        3 => Fault::Loss(rng.random_range(0.05..0.35)),
        4 => Fault::Kill(victim),
        _ => Fault::Pause(victim),
    }
}

/// One or two faults at once (at most one process fault), for soak mode.
fn random_step(rng: &mut ChaCha8Rng) -> (Vec<Fault>, Duration) {
    let mut faults = vec![random_fault(rng)];
    if rng.random_bool(0.3) {
        let second = random_fault(rng);
        if !(second.is_process_fault() && faults[0].is_process_fault()) {
            faults.push(second);
        }
    }
    (
        faults,
        Duration::from_millis(rng.random_range(2_000..8_000)),
    )
}

/// What the environment asks for.
#[derive(Debug)]
struct Settings {
    seed: u64,
    soak: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let seed = match std::env::var("QUORUMKV_NETFAULT_SEED") {
            Ok(text) => text
                .parse()
                .unwrap_or_else(|e| panic!("QUORUMKV_NETFAULT_SEED={text}: {e}")),
            Err(_) if std::env::var_os("QUORUMKV_NETFAULT_SOAK").is_some() => rand::random(),
            Err(_) => 1,
        };
        let soak = match std::env::var("QUORUMKV_NETFAULT_SOAK") {
            Ok(text) => Duration::from_secs(
                text.parse()
                    .unwrap_or_else(|e| panic!("QUORUMKV_NETFAULT_SOAK={text} (seconds): {e}")),
            ),
            Err(_) => Duration::ZERO,
        };
        Settings { seed, soak }
    }
}

/// Operation counts the schedule logs while it runs.
#[derive(Debug, Default)]
struct Progress {
    ok: AtomicUsize,
    failed: AtomicUsize,
    indeterminate: AtomicUsize,
}

impl Progress {
    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Failed(_) => &self.failed,
            Outcome::Indeterminate(_) => &self.indeterminate,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [usize; 3] {
        [&self.ok, &self.failed, &self.indeterminate].map(|c| c.load(Ordering::Relaxed))
    }
}

#[test]
fn acknowledged_writes_survive_partitions_loss_kill_9_and_sigstop() {
    let Some(tools) = netns::tools_or_skip("netfault") else {
        return;
    };
    let settings = Settings::from_env();
    eprintln!(
        "netfault: seed {} (QUORUMKV_NETFAULT_SEED), soak {:?} (QUORUMKV_NETFAULT_SOAK), iptables \
         backend `{}`",
        settings.seed, settings.soak, tools.iptables
    );
    // Build before entering the hub: cargo has nothing to do there.
    ensure_binary();
    let network = Network::create("nf", NODES, &tools);
    let _hub = network.enter_hub();
    run(&network, &settings);
}

fn run(network: &Network, settings: &Settings) {
    let options = ClusterOptions {
        hosts: network.node_hosts(),
        request_timeout_ms: Some(NODE_TIMEOUT_MS),
        peer_down_after_ms: Some(NODE_TIMEOUT_MS),
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(NODES, options);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the clients");
    let recorder = Arc::new(Recorder::new());
    let progress = Arc::new(Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..KEYS).map(|k| format!("netfault-{k}")).collect();

    let clients: Vec<Client> = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(workload_client(&cluster).await);
        }
        clients
    });
    let workers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(index, client)| {
            runtime.spawn(workload(Worker {
                index,
                client: client.clone(),
                keys: keys.clone(),
                rng: ChaCha8Rng::seed_from_u64(settings.seed ^ ((index as u64) << 32)),
                recorder: Arc::clone(&recorder),
                progress: Arc::clone(&progress),
                stop: Arc::clone(&stop),
            }))
        })
        .collect();

    let mut timeline = Vec::new();
    let started = Instant::now();
    let mut log = |text: String| {
        let line = format!(
            "t{} (+{:.1} s) {text}",
            recorder.tick(),
            started.elapsed().as_secs_f64()
        );
        eprintln!("netfault: {line}");
        timeline.push(line);
    };
    std::thread::sleep(CALM);
    let mut steps = fixed_schedule();
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let soak_until = Instant::now() + settings.soak;
    loop {
        let (faults, hold) = if steps.is_empty() {
            if Instant::now() >= soak_until {
                break;
            }
            random_step(&mut rng)
        } else {
            steps.remove(0)
        };
        let before = progress.snapshot();
        let names: Vec<String> = faults.iter().map(Fault::describe).collect();
        log(format!("inject {} for {hold:?}", names.join(" + ")));
        for fault in &faults {
            inject(network, &mut cluster, &recorder, fault);
        }
        let rules = network.rules();
        if !rules.is_empty() {
            eprint!("{rules}");
        }
        std::thread::sleep(hold);
        heal(network, &mut cluster, &faults);
        let after = progress.snapshot();
        log(format!(
            "healed {}; meanwhile ok {} failed {} indeterminate {}",
            names.join(" + "),
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2]
        ));
    }
    std::thread::sleep(CALM);
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for worker in workers {
            worker.await.expect("a workload task panicked");
        }
    });
    log("workload stopped".into());

    // Quiescence: every node up and hearing every other. Then, before any read could repair
    // anything, the repair mechanisms alone (hinted handoff, anti-entropy) must bring every
    // replica to the same data: with N = nodes every node holds every range, so equal Merkle
    // digests on all nodes and no hint pending anywhere mean converged.
    cluster.wait_connected();
    // Cold keys: written while one node is cut off, and never read before the convergence
    // check, so only hinted handoff and anti-entropy can bring that node up to date (the hot
    // keys above are read so often that read repair alone would converge them).
    let cold = (settings.seed % NODES as u64) as usize;
    network.isolate(cold);
    // Written only once the others count it down, so nothing is even queued for it: QUIC
    // would deliver queued messages after the heal and hide whether repair works.
    let cold_id = cluster.node(cold).id.to_string();
    wait_until(
        "the others count the isolated node down",
        FINAL_READ_DEADLINE,
        || {
            (0..NODES)
                .filter(|index| *index != cold)
                .all(|index| cluster.metric(index, PEER_UP, &[("peer", &cold_id)]) == 0.0)
        },
    );
    timeline.push(format!("cold keys written with node {cold} isolated"));
    runtime.block_on(async {
        let client = cluster.fault_tolerant_client().await;
        for i in 0..COLD_KEYS {
            let (client, key) = (&client, format!("cold-{i}"));
            let key = key.as_str();
            wait_until_async(
                &format!("the cold write of {key} succeeds"),
                FINAL_READ_DEADLINE,
                move || async move {
                    client
                        .put(
                            DEFAULT_KEYSPACE,
                            key,
                            key.as_bytes().to_vec(),
                            None,
                            write(2, 1),
                        )
                        .await
                        .map_err(|e| e.to_string())
                },
            )
            .await;
        }
        client.close().await;
    });
    network.heal();
    cluster.wait_connected();
    wait_converged(&cluster, &mut timeline);
    // Then a read of every key from all replicas.
    runtime.block_on(async {
        let client = workload_client(&cluster).await;
        for key in &keys {
            let (client, key) = (&client, key.as_str());
            let siblings = wait_until_async(
                &format!("a read of {key} at r=3 succeeds"),
                FINAL_READ_DEADLINE,
                move || async move {
                    client
                        .get(DEFAULT_KEYSPACE, key, read(NODES as u8))
                        .await
                        .map(|got| got.siblings.iter().map(|s| text(&s.value)).collect())
                        .map_err(|e| e.to_string())
                },
            )
            .await;
            recorder.final_read(key, siblings);
        }
        client.close().await;
        for client in &clients {
            client.close().await;
        }
    });

    let history = recorder.history();
    let report = history::check(&history);
    eprintln!(
        "netfault: final reads: {:?}\nnetfault: checker: {report}",
        history.final_reads
    );
    if !report.is_ok() {
        let path = std::env::temp_dir().join(format!(
            "quorumkv-netfault-{}-{}.history",
            settings.seed,
            std::process::id()
        ));
        let mut text = timeline.join("\n");
        for record in &history.records {
            text.push_str(&format!("\n{record}"));
        }
        text.push_str(&format!(
            "\ncrashes: {:?}\nfinal reads: {:?}\n",
            history.crashes, history.final_reads
        ));
        std::fs::write(&path, text).expect("writing the history");
        panic!(
            "the history has violations (seed {}; the whole history is in {}):\n{report}\nfault \
             timeline:\n{}",
            settings.seed,
            path.display(),
            timeline.join("\n")
        );
    }
    assert!(
        report.stats.puts_checked > 0,
        "no acknowledged put was checked: the workload did nothing useful\n{report}"
    );
}

/// Waits until every node reports the same digest of its Merkle roots and no node holds a hint,
/// within a bound derived from the nodes' configuration: anti-entropy compares every range
/// within `ranges / exchanges_max · interval_ms`, and delivers what it finds at
/// `keys_per_second_max`; three such cycles plus a minute of slack for hint delivery and a
/// loaded machine. Panics, naming what each node reported, if they do not converge.
fn wait_converged(cluster: &TestCluster, timeline: &mut Vec<String>) {
    let config = &cluster.local().nodes[0].config;
    let ae = &config.anti_entropy;
    let cycle_ms = u64::from(config.ranges) / ae.exchanges_max.max(1) as u64 * ae.interval_ms;
    let bound = Duration::from_millis(3 * cycle_ms) + Duration::from_secs(60);
    let started = std::time::Instant::now();
    let mut last: Vec<Option<serde_json::Value>>;
    loop {
        let statuses: Vec<Option<serde_json::Value>> =
            (0..NODES).map(|index| cluster.sync_status(index)).collect();
        let digests: std::collections::BTreeSet<String> = statuses
            .iter()
            .map(|s| {
                s.as_ref()
                    .map_or(String::new(), |s| s["digest"].to_string())
            })
            .collect();
        let built = statuses
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s["trees_built"] == true));
        let hints: u64 = statuses
            .iter()
            .flatten()
            .filter_map(|s| s["hints_pending"].as_object())
            .flat_map(|pending| pending.values().filter_map(serde_json::Value::as_u64))
            .sum();
        if built && digests.len() == 1 && hints == 0 {
            let line = format!("converged after {:?} (bound {bound:?})", started.elapsed());
            eprintln!("netfault: {line}");
            timeline.push(line);
            return;
        }
        last = statuses;
        if started.elapsed() > bound {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics: Vec<String> = (0..NODES)
        .map(|index| {
            let text = cluster.metrics(index);
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && (l.contains("hints") || l.contains("peer_up")))
                .collect();
            format!("node {index}: {}", lines.join("; "))
        })
        .collect();
    panic!(
        "replicas did not converge within {bound:?} after the heal (equal Merkle digests, no \
         hints pending); hint and liveness metrics:\n{}\nlast status of each node: {last:?}",
        metrics.join("\n")
    );
}

fn inject(network: &Network, cluster: &mut TestCluster, recorder: &Recorder, fault: &Fault) {
    match fault {
        Fault::Partition(groups) => network.partition(groups),
        Fault::OneWay { senders, receiver } => network.one_way(senders, *receiver),
        Fault::Isolate(index) => network.isolate(*index),
        Fault::Loss(probability) => network.loss(*probability),
        Fault::Kill(index) => {
            cluster.kill(*index);
            // Recorded once the process is dead: writes invoked later cannot have been on it.
            recorder.crashed(cluster.node(*index).id.as_str());
        }
        Fault::Pause(index) => cluster.pause(*index),
    }
}

/// Removes the network faults, then resumes or restarts the nodes, and waits until the cluster
/// is whole again.
fn heal(network: &Network, cluster: &mut TestCluster, faults: &[Fault]) {
    network.heal();
    for fault in faults {
        match fault {
            Fault::Kill(index) => cluster.restart_process(*index),
            Fault::Pause(index) => cluster.resume(*index),
            _ => {}
        }
    }
    cluster.wait_peers_up();
}

/// A client that gives up on a silent node quickly and comes back to it soon after a heal.
async fn workload_client(cluster: &TestCluster) -> Client {
    cluster
        .client_builder()
        .request_timeout(Duration::from_millis(NODE_TIMEOUT_MS) + Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .retries(2)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .down_backoff(Duration::from_secs(1), Duration::from_secs(1))
        .build()
        .await
        .expect("connecting a workload client")
}

struct Worker {
    index: usize,
    client: Client,
    keys: Vec<String>,
    rng: ChaCha8Rng,
    recorder: Arc<Recorder>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn value(&self, op: u64) -> String {
        format!("c{}-op{op}", self.index)
    }

    fn write_options(&mut self) -> (u8, u8) {
        let w = self.rng.random_range(1..=NODES as u8);
        (w, self.rng.random_range(0..=1))
    }

    fn record(&self, key: &str, op: Op, outcome: Outcome, invoked: u64) {
        self.progress.count(&outcome);
        self.recorder.record(Record {
            client: self.index,
            key: key.to_string(),
            op,
            outcome,
            invoked,
            completed: self.recorder.tick(),
        });
    }

    /// A get, recorded; its siblings and context if it succeeded.
    async fn get(&mut self, key: &str) -> Option<(Vec<String>, Context)> {
        let r = self.rng.random_range(1..=NODES as u8);
        let invoked = self.recorder.tick();
        let result = bounded(self.client.get(DEFAULT_KEYSPACE, key, read(r))).await;
        match result {
            Ok(got) => {
                let siblings: Vec<String> = got.siblings.iter().map(|s| text(&s.value)).collect();
                let op = Op::Get {
                    r,
                    siblings: siblings.clone(),
                };
                self.record(key, op, Outcome::Ok, invoked);
                Some((siblings, got.context))
            }
            Err(outcome) => {
                let op = Op::Get {
                    r,
                    siblings: Vec::new(),
                };
                self.record(key, op, outcome, invoked);
                None
            }
        }
    }

    async fn put(&mut self, key: &str, value: String, read: Option<(Vec<String>, Context)>) {
        let (w, dw) = self.write_options();
        let invoked = self.recorder.tick();
        let (context, op) = match read {
            Some((siblings, context)) => (
                Some(context),
                Op::PutWithContext {
                    value: value.clone(),
                    read: siblings,
                    w,
                    dw,
                },
            ),
            None => (
                None,
                Op::PutBlind {
                    value: value.clone(),
                    w,
                    dw,
                },
            ),
        };
        let result = bounded(self.client.put(
            DEFAULT_KEYSPACE,
            key,
            value.into_bytes(),
            context.as_ref(),
            write(w, dw),
        ))
        .await;
        self.record(key, op, result.err().unwrap_or(Outcome::Ok), invoked);
    }

    async fn delete(&mut self, key: &str, id: String, read: (Vec<String>, Context)) {
        let (w, dw) = self.write_options();
        let invoked = self.recorder.tick();
        let (siblings, context) = read;
        let result =
            bounded(
                self.client
                    .delete(DEFAULT_KEYSPACE, key, Some(&context), write(w, dw)),
            )
            .await;
        let op = Op::Delete {
            id,
            read: siblings,
            w,
            dw,
        };
        self.record(key, op, result.err().unwrap_or(Outcome::Ok), invoked);
    }
}

/// One client's loop: a seeded mix of gets, blind puts, read-modify-write puts and deletes.
async fn workload(mut worker: Worker) {
    let mut op = 0u64;
    while !worker.stop.load(Ordering::SeqCst) {
        op += 1;
        let key = worker.keys[worker.rng.random_range(0..worker.keys.len())].clone();
        match worker.rng.random_range(0..100) {
            0..30 => {
                worker.get(&key).await;
            }
            30..55 => {
                let value = worker.value(op);
                worker.put(&key, value, None).await;
            }
            55..85 => {
                if let Some(read) = worker.get(&key).await {
                    let value = worker.value(op);
                    worker.put(&key, value, Some(read)).await;
                }
            }
            _ => {
                if let Some(read) = worker.get(&key).await {
                    let id = format!("{}-delete", worker.value(op));
                    worker.delete(&key, id, read).await;
                }
            }
        }
        let pause = Duration::from_millis(worker.rng.random_range(5..15));
        tokio::time::sleep(pause).await;
    }
}

/// Runs one client call within [`OPERATION_LIMIT`]; an error becomes the history's outcome.
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Outcome> {
    match tokio::time::timeout(OPERATION_LIMIT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error @ (Error::Timeout | Error::NoNodeReachable { .. }))) => {
            Err(Outcome::Indeterminate(error.kind().to_string()))
        }
        Ok(Err(error)) => Err(Outcome::Failed(error.kind().to_string())),
        Err(_) => Err(Outcome::Indeterminate(format!(
            "no answer within {OPERATION_LIMIT:?}"
        ))),
    }
}

fn read(r: u8) -> ReadOptions {
    ReadOptions {
        r: Some(r),
        timeout_ms: None,
        ..ReadOptions::default()
    }
}

fn write(w: u8, dw: u8) -> WriteOptions {
    WriteOptions {
        w: Some(w),
        dw: Some(dw),
        timeout_ms: None,
        ..WriteOptions::default()
    }
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}
