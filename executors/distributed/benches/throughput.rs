//! Throughput and latency of the distributed executor, in one process:
//! a scheduler and 2 workers × 1 thread on 127.0.0.1, plain `Instant`
//! timing (no statistics harness).
//!
//! - `map`: 100 000 independent trivial tasks (`add` of a literal, as
//!   `client.map(inc, 0..100_000)` lowers), all outputs fetched.
//! - `round trip`: 1 000 sequential one-task submissions (submit → result).
//!
//! Run: `cargo bench -p rask-distributed --bench throughput`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::{Cluster, Collect, Graph};

fn map(cluster: &Cluster, client: &rask_distributed::Client, n: i64, salt: u64) -> f64 {
    let start = Instant::now();
    let mut g = Graph::salted(&cluster.shared, salt);
    for i in 0..n {
        let t = g.op("add", i, &[]);
        g.output(t);
    }
    let got = Collect::new(n as usize);
    got.submit(client, g.build());
    let out = got.wait();
    let secs = start.elapsed().as_secs_f64();
    assert!(out.iter().enumerate().all(|(i, v)| *v == Ok(i as i64)));
    secs
}

fn main() {
    // `cargo test --benches` runs this binary too: keep that run short.
    let quick =
        std::env::args().any(|a| a == "--test") || std::env::var_os("RASK_BENCH_QUICK").is_some();
    let n: i64 = if quick { 2_000 } else { 100_000 };
    let trips = if quick { 50 } else { 1_000 };

    let cluster = Cluster::new(2, 1);
    let client = cluster.client();

    // Warm-up: connections, allocator, the scheduler's task-duration estimate.
    map(&cluster, &client, n.min(5_000), 1);
    let mut best = f64::MAX;
    for run in 0..3 {
        let secs = map(&cluster, &client, n, 100 + run);
        best = best.min(secs);
        println!(
            "map {n} tasks, 2 workers x 1 thread: {:.1} ms, {:.0} tasks/s",
            secs * 1e3,
            n as f64 / secs
        );
    }
    println!("map best: {:.0} tasks/s", n as f64 / best);

    let mut times = Vec::with_capacity(trips);
    // The first trips also pay for releasing the last map: not measured.
    for i in 0..trips + 20 {
        let start = Instant::now();
        let mut g = Graph::salted(&cluster.shared, 10_000 + i as u64);
        let t = g.op("add", i as i64, &[]);
        g.output(t);
        let got = Collect::new(1);
        got.submit(&client, g.build());
        assert_eq!(got.wait(), vec![Ok(i as i64)]);
        if i >= 20 {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "round trip (submit -> result), {trips} sequential: mean {mean:.0} us, median {:.0} us, p99 {:.0} us, max {:.0} us",
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times[times.len() - 1]
    );
}
