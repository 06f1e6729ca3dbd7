//! Ring microbenchmarks: key lookup (the hot path of every request) and placement.
//!
//! `cargo bench -p quorumkv-bench --bench ring`. The lookup target is under 150 ns for a 16-byte
//! key on a 10-node, Q = 1024, N = 3 ring.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use quorumkv_ring::{Change, Node, NodeId, Ring, RingConfig, Token, Zone};
use std::hint::black_box;

fn nodes(count: usize) -> Vec<Node> {
    (0..count)
        .map(|i| {
            let id = NodeId::new(format!("n{i:02}")).expect("valid id");
            let zone = Zone::new(format!("z{}", i % 3)).expect("valid zone");
            Node::new(id, zone, 1).expect("valid node")
        })
        .collect()
}

fn ring(count: usize, range_count: u32) -> Ring {
    let config = RingConfig::new(range_count, 5).expect("valid config");
    Ring::build(config, nodes(count)).expect("ring builds")
}

fn lookup(c: &mut Criterion) {
    let ring = ring(10, 1024);
    let key = *b"user:0000001234\0";
    c.bench_function(
        "token + preference list lookup, 16-byte key, 10 nodes, Q=1024, N=3",
        |b| {
            b.iter(|| {
                let list = ring
                    .preference_list_for("default", black_box(&key), 3)
                    .expect("N=3 is valid");
                // Touch every replica so the iterator is not optimised away.
                list.iter().map(|node| node.capacity).sum::<u32>()
            })
        },
    );
    let token = Token::of("default", &key);
    c.bench_function("table lookup only (range_of + preference list), N=3", |b| {
        b.iter(|| {
            let range = ring.range_of(black_box(token));
            let list = ring.preference_list(range, 3).expect("N=3 is valid");
            list.iter().map(|node| node.capacity).sum::<u32>()
        })
    });
}

fn placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("placement");
    group.sample_size(10);
    let config = RingConfig::new(4096, 5).expect("valid config");
    let members = nodes(64);
    group.bench_function("Ring::build, 64 nodes, Q=4096, rf_max 5", |b| {
        b.iter(|| Ring::build(config, black_box(members.clone())).expect("ring builds"))
    });
    let base = ring(64, 4096);
    let newcomer = Node::new(
        NodeId::new("n99").expect("valid id"),
        Zone::new("z0").expect("valid zone"),
        1,
    )
    .expect("valid node");
    group.bench_function("Ring::apply(Add), 64 -> 65 nodes, Q=4096", |b| {
        b.iter_batched(
            || Change::Add(newcomer.clone()),
            |change| base.apply(&change).expect("add applies"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, lookup, placement);
criterion_main!(benches);
