//! How much does building a graph cost per task?
//!
//! Building = `delayed!` calls only (keys, node allocation, argument slots);
//! nothing is lowered or run. The graphs are dropped outside the timing.
//!
//! ```text
//! cargo bench --bench build
//! ```

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rask::{delayed, Delayed};

const N: u64 = 10_000;

fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn sum(v: Vec<i64>) -> i64 {
    v.iter().sum()
}

/// tree(N) of `shared/bench/WORKLOADS.md`: `2N - 1` tasks.
fn tree(n: u64) -> Delayed<i64> {
    let mut level: Vec<Delayed<i64>> = (0..n as i64).map(|i| delayed!(inc(i))).collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => delayed!(add(a, b)),
                [a] => a.clone(),
                _ => unreachable!(),
            })
            .collect();
    }
    level.pop().expect("one root")
}

fn chain(n: u64) -> Delayed<i64> {
    let mut x = delayed!(inc(0));
    for _ in 1..n {
        x = delayed!(inc(&x));
    }
    x
}

fn fan_in(n: u64) -> Delayed<i64> {
    let leaves: Vec<Delayed<i64>> = (0..n as i64).map(|i| delayed!(inc(i))).collect();
    delayed!(sum(leaves))
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("build");
    g.throughput(Throughput::Elements(2 * N - 1));
    g.bench_function("tree_10k", |b| b.iter_with_large_drop(|| tree(N)));
    g.throughput(Throughput::Elements(N));
    g.bench_function("chain_10k", |b| b.iter_with_large_drop(|| chain(N)));
    g.throughput(Throughput::Elements(N + 1));
    g.bench_function("fan_in_10k", |b| b.iter_with_large_drop(|| fan_in(N)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = build
}
criterion_main!(benches);
