//! Plans a ring and a membership change, and reports balance, zone safety and movement.
//!
//! ```text
//! cargo run -p quorumkv-ring --example plan -- --nodes 10 --zones 1 --ranges 1024 --n 3 --add 1 --json
//! ```
//!
//! Nodes are named `n01..nNN` and assigned to zones `z1..zK` round-robin. `--add K` adds K more
//! nodes (continuing the names and the round-robin), `--remove K` removes the last K. Without
//! either, the ring is described as built (moved = 0).

use quorumkv_ring::{moved, Change, Node, NodeId, Ring, RingConfig, Zone};
use serde_json::json;
use std::process::ExitCode;

const USAGE: &str = "usage: plan [--nodes N] [--zones K] [--ranges Q] [--n N] [--rf-max R] \
[--add K | --remove K] [--json]
  --nodes   initial members (default 10)
  --zones   zones, assigned round-robin (default 1)
  --ranges  ranges Q, a power of two (default 1024)
  --n       replication factor to report on (default 3)
  --rf-max  ring width setting (default max(5, n))
  --add     nodes to add
  --remove  nodes to remove (the last ones by name)
  --json    print one JSON object instead of a table";

#[derive(Debug)]
struct Args {
    nodes: usize,
    zones: usize,
    ranges: u32,
    n: usize,
    rf_max: Option<u32>,
    add: usize,
    remove: usize,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        nodes: 10,
        zones: 1,
        ranges: 1024,
        n: 3,
        rf_max: None,
        add: 0,
        remove: 0,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--json" {
            args.json = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--nodes" => args.nodes = number(&value)?,
            "--zones" => args.zones = number(&value)?,
            "--ranges" => {
                args.ranges =
                    u32::try_from(number(&value)?).map_err(|_| format!("{flag}: too large"))?
            }
            "--n" => args.n = number(&value)?,
            "--rf-max" => {
                args.rf_max =
                    Some(u32::try_from(number(&value)?).map_err(|_| format!("{flag}: too large"))?)
            }
            "--add" => args.add = number(&value)?,
            "--remove" => args.remove = number(&value)?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.nodes == 0 || args.zones == 0 || args.n == 0 {
        return Err("--nodes, --zones and --n must be at least 1".into());
    }
    if args.add > 0 && args.remove > 0 {
        return Err("give --add or --remove, not both".into());
    }
    if args.remove >= args.nodes {
        return Err("--remove must leave at least one node".into());
    }
    Ok(args)
}

fn node(i: usize, digits: usize, zones: usize) -> Result<Node, String> {
    let id = NodeId::new(format!("n{:0digits$}", i + 1)).map_err(|e| e.to_string())?;
    let zone = Zone::new(format!("z{}", i % zones + 1)).map_err(|e| e.to_string())?;
    Node::new(id, zone, 1).map_err(|e| e.to_string())
}

/// Largest and smallest count in the first `n` columns over the mean.
fn load_ratios(ring: &Ring, n: usize) -> (f64, f64) {
    let load = ring.load(n);
    let mean = f64::from(ring.range_count()) * n as f64 / load.len() as f64;
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    let min = load.iter().copied().min().unwrap_or(0) as f64;
    (max / mean, min / mean)
}

fn run(args: &Args) -> Result<(), String> {
    let total = args.nodes + args.add;
    let digits = total.to_string().len().max(2);
    let rf_max = args.rf_max.unwrap_or(args.n.max(5) as u32);
    let config = RingConfig::new(args.ranges, rf_max).map_err(|e| e.to_string())?;
    let members: Vec<Node> = (0..args.nodes)
        .map(|i| node(i, digits, args.zones))
        .collect::<Result<_, _>>()?;
    let before = Ring::build(config, members.clone()).map_err(|e| e.to_string())?;
    let mut after = before.clone();
    let mut changed: Vec<Node> = Vec::new();
    for i in args.nodes..total {
        let added = node(i, digits, args.zones)?;
        after = after
            .apply(&Change::Add(added.clone()))
            .map_err(|e| e.to_string())?;
        changed.push(added);
    }
    for i in (args.nodes - args.remove..args.nodes).rev() {
        let removed = members[i].clone();
        after = after
            .apply(&Change::Remove(removed.id.clone()))
            .map_err(|e| e.to_string())?;
        changed.push(removed);
    }
    after.check_replication(args.n).map_err(|e| e.to_string())?;
    // Ideal movement: what the added nodes must receive (their fair share in the new ring), or
    // what the removed nodes held (in the old ring). Nothing for a plain build.
    let ideal = |n: usize| -> f64 {
        if changed.is_empty() {
            0.0
        } else if args.add > 0 {
            let shares = after.fair_shares(n);
            changed
                .iter()
                .filter_map(|c| after.index_of(&c.id).ok())
                .map(|i| shares[i])
                .sum()
        } else {
            let load = before.load(n);
            changed
                .iter()
                .filter_map(|c| before.index_of(&c.id).ok())
                .map(|i| load[i] as f64)
                .sum()
        }
    };
    let per_n: Vec<serde_json::Value> = (1..=after.width())
        .map(|n| {
            let (max, min) = load_ratios(&after, n);
            json!({
                "n": n,
                "moved": moved(&before, &after, n),
                "ideal_moved": ideal(n),
                "max_load_ratio": max,
                "min_load_ratio": min,
                "zone_bound": after.zone_bound(n),
                "zone_violations": after.zone_violations(n),
            })
        })
        .collect();
    let (max, min) = load_ratios(&after, args.n);
    let change = match (args.add, args.remove) {
        (0, 0) => "none".to_string(),
        (k, 0) => format!("add {k}"),
        (_, k) => format!("remove {k}"),
    };
    let report = json!({
        "nodes": after.members().len(),
        "zones": after.zone_count(),
        "ranges": after.range_count(),
        "n": args.n,
        "rf_max": rf_max,
        "width": after.width(),
        "change": change,
        "version": after.version(),
        "fingerprint": after.fingerprint().to_string(),
        "max_load_ratio": max,
        "min_load_ratio": min,
        "moved": moved(&before, &after, args.n),
        "ideal_moved": ideal(args.n),
        "zone_violations": after.zone_violations(args.n),
        "per_n": per_n,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{} nodes, {} zones, {} ranges, width {}, change: {change}, version {}",
        after.members().len(),
        after.zone_count(),
        after.range_count(),
        after.width(),
        after.version()
    );
    println!("fingerprint {}", after.fingerprint());
    println!(
        "{:>3} {:>8} {:>10} {:>9} {:>9} {:>5} {:>15}",
        "N", "moved", "ideal", "max/mean", "min/mean", "L(N)", "zone_violations"
    );
    for row in &per_n {
        let number = |key: &str| row[key].as_f64().unwrap_or(0.0);
        println!(
            "{:>3} {:>8} {:>10.1} {:>9.4} {:>9.4} {:>5} {:>15}",
            number("n"),
            number("moved"),
            number("ideal_moved"),
            number("max_load_ratio"),
            number("min_load_ratio"),
            number("zone_bound"),
            number("zone_violations"),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("plan: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("plan: {message}");
            ExitCode::FAILURE
        }
    }
}
