//! How much does a task's content key cost?
//!
//! Every `delayed!` call derives a blake3 key over the function's identity
//! and its arguments. These benches isolate that from the rest of graph
//! building (see `build.rs`) and set it beside raw blake3.
//!
//! ```text
//! cargo bench --bench keys
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rask::delayed;

fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn total(v: Vec<f64>) -> f64 {
    v.iter().sum()
}

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    g.throughput(Throughput::Elements(1));

    // Floor: one blake3 hash of about what a small task hashes (tag, name,
    // identity, one literal).
    g.bench_function("blake3_hash_64B", |b| {
        let bytes = [7u8; 64];
        b.iter(|| blake3::hash(black_box(&bytes)))
    });
    // A derive-key hash of a name alone: rask's hasher set-up and finish.
    g.bench_function("named_key", |b| {
        b.iter(|| rask::named_key(black_box("chunk-42")))
    });
    // A leaf task: key over the name, the identity and one i64 literal, plus
    // the node allocation.
    g.bench_function("leaf_task_inc_i64", |b| {
        let mut i = 0i64;
        b.iter(|| {
            i += 1;
            delayed!(inc(black_box(i)))
        })
    });
    // An inner task: key over two input keys, plus the node allocation.
    g.bench_function("inner_task_add_2_inputs", |b| {
        let x = delayed!(inc(1));
        let y = delayed!(inc(2));
        b.iter(|| delayed!(add(black_box(&x), black_box(&y))))
    });
    g.finish();

    // A large literal is hashed once, at `delayed!` time: bytes per second.
    let mut g = c.benchmark_group("keys_literal");
    let data: Vec<f64> = (0..100_000).map(f64::from).collect();
    g.throughput(Throughput::Bytes(8 * data.len() as u64));
    g.bench_function("vec_f64_100k", |b| {
        b.iter_with_large_drop(|| delayed!(total(black_box(data.clone()))))
    });
    // Bytes encode one at a time: what a `Vec<u8>` costs to wrap.
    let raw: Vec<u8> = (0..800_000u32).map(|i| i as u8).collect();
    g.bench_function("value_vec_u8_800KB", |b| {
        b.iter_with_large_drop(|| rask::value(black_box(raw.clone())))
    });
    // Floors: copying the data, and blake3 over its 800 KB in one call.
    g.bench_function("clone_only_vec_f64_100k", |b| {
        b.iter_with_large_drop(|| black_box(data.clone()))
    });
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    g.bench_function("blake3_hash_800KB", |b| {
        b.iter(|| blake3::hash(black_box(&bytes)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = keys
}
criterion_main!(benches);
