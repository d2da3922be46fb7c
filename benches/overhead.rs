//! What does each executor cost per task, on chain, fan-out and fan-in
//! shapes of 10 000 trivial tasks?
//!
//! Two levels:
//! - `compute/…`: `compute_with` on a graph built beforehand: lowering the
//!   graph into a plan, running it, collecting the outputs. What a user pays.
//! - `plan/…`: the executor alone, on a plan built beforehand whose ops do
//!   next to nothing (read an `i64`, box the result). What the executor pays.
//!
//! Shapes: `chain` (each task depends on the previous one), `fan_out` (one
//! task feeding N tasks, all N are outputs), `fan_in` (N independent tasks
//! feeding one).
//!
//! ```text
//! cargo bench --bench overhead
//! cargo bench --bench overhead -- plan/sync    # a subset
//! ```

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rask::{delayed, Config, Delayed};
use rask_executor::{Executor, Key, Op, OpError, Outcome, Plan, PlanBuilder, Reporter, Value};

const N: u64 = 10_000;

/// The executors this build has, as (label, config).
fn configs() -> Vec<(&'static str, Config)> {
    let mut out = vec![("sync", Config::synchronous())];
    if cfg!(feature = "threaded") {
        out.push(("threads:1", Config::threads(1)));
        out.push(("threads:2", Config::threads(2)));
    }
    out
}

fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn sum(v: Vec<i64>) -> i64 {
    v.iter().sum()
}

/// A shape as `Delayed`s: the outputs to compute and how many tasks it has.
struct Shape {
    name: &'static str,
    outputs: Vec<Delayed<i64>>,
    tasks: u64,
    want: i64,
}

fn shapes() -> Vec<Shape> {
    let mut x = delayed!(inc(0));
    for _ in 1..N {
        x = delayed!(inc(&x));
    }
    let chain = Shape {
        name: "chain",
        outputs: vec![x],
        tasks: N,
        want: N as i64,
    };
    let root = delayed!(inc(0));
    let fan_out = Shape {
        name: "fan_out",
        outputs: (0..N as i64).map(|i| delayed!(add(&root, i))).collect(),
        tasks: N + 1,
        want: (0..N as i64).map(|i| i + 1).sum(),
    };
    let leaves: Vec<Delayed<i64>> = (0..N as i64).map(|i| delayed!(inc(i))).collect();
    let fan_in = Shape {
        name: "fan_in",
        outputs: vec![delayed!(sum(leaves))],
        tasks: N + 1,
        want: (1..=N as i64).sum(),
    };
    vec![chain, fan_out, fan_in]
}

fn compute(c: &mut Criterion) {
    let mut g = c.benchmark_group("compute");
    for shape in shapes() {
        g.throughput(Throughput::Elements(shape.tasks));
        for (label, config) in configs() {
            let got: i64 = rask::compute_with(&shape.outputs, &config)
                .expect("compute")
                .iter()
                .sum();
            assert_eq!(got, shape.want, "{} on {label}", shape.name);
            g.bench_function(BenchmarkId::new(label, shape.name), |b| {
                b.iter(|| rask::compute_with(&shape.outputs, &config).expect("compute"))
            });
        }
    }
    g.finish();
}

// --- executor alone ---------------------------------------------------------

/// `inputs[0] + 1` (0 without inputs), or the sum of the inputs for `Sum`.
enum Trivial {
    Inc,
    Sum,
}

impl Op for Trivial {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let mut values = inputs
            .iter()
            .map(|v| v.as_ref().and_then(|v| v.downcast_ref::<i64>()).copied());
        let out = match self {
            Trivial::Inc => values.next().flatten().unwrap_or(0) + 1,
            Trivial::Sum => values.map(|v| v.unwrap_or(0)).sum(),
        };
        Ok(Arc::new(out))
    }

    fn name(&self) -> &str {
        match self {
            Trivial::Inc => "inc",
            Trivial::Sum => "sum",
        }
    }
}

fn key(i: u64) -> Key {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    Key(k)
}

fn plans() -> Vec<(&'static str, Arc<Plan>, u64)> {
    let inc: Arc<dyn Op> = Arc::new(Trivial::Inc);
    let sum: Arc<dyn Op> = Arc::new(Trivial::Sum);

    let mut b = PlanBuilder::with_capacity(N as usize);
    let mut prev = b.push(key(0), inc.clone(), &[]);
    for i in 1..N {
        prev = b.push(key(i), inc.clone(), &[prev]);
    }
    b.output(prev);
    let chain = Arc::new(b.build());

    let mut b = PlanBuilder::with_capacity(N as usize + 1);
    let root = b.push(key(0), inc.clone(), &[]);
    for i in 1..=N {
        let t = b.push(key(i), inc.clone(), &[root]);
        b.output(t);
    }
    let fan_out = Arc::new(b.build());

    let mut b = PlanBuilder::with_capacity(N as usize + 1);
    let leaves: Vec<u32> = (0..N).map(|i| b.push(key(i), inc.clone(), &[])).collect();
    let t = b.push(key(N), sum, &leaves);
    b.output(t);
    let fan_in = Arc::new(b.build());

    vec![
        ("chain", chain, N),
        ("fan_out", fan_out, N + 1),
        ("fan_in", fan_in, N + 1),
    ]
}

/// Waits for a plan to finish; counts failed outputs.
#[derive(Default)]
struct Wait {
    state: Mutex<(bool, usize)>,
    done: Condvar,
}

impl Reporter for Wait {
    fn output(&self, _: usize, outcome: Outcome) {
        if outcome.is_err() {
            self.state.lock().unwrap().1 += 1;
        }
    }

    fn finished(&self) {
        self.state.lock().unwrap().0 = true;
        self.done.notify_all();
    }
}

fn run(executor: &dyn Executor, plan: &Arc<Plan>) {
    let wait = Arc::new(Wait::default());
    executor.submit(plan.clone(), wait.clone());
    let mut state = wait.state.lock().unwrap();
    while !state.0 {
        state = wait.done.wait(state).unwrap();
    }
    assert_eq!(state.1, 0, "no output fails");
}

fn executors() -> Vec<(&'static str, Box<dyn Executor>)> {
    #[allow(unused_mut)]
    let mut out: Vec<(&'static str, Box<dyn Executor>)> =
        vec![("sync", Box::new(rask_executor::Synchronous))];
    #[cfg(feature = "threaded")]
    for (label, n) in [("threads:1", 1), ("threads:2", 2)] {
        let pool = rask_threaded::ThreadPool::new(n).expect("a thread pool");
        out.push((label, Box::new(pool)));
    }
    out
}

fn plan(c: &mut Criterion) {
    let executors = executors();
    let mut g = c.benchmark_group("plan");
    for (shape, plan, tasks) in plans() {
        g.throughput(Throughput::Elements(tasks));
        for (label, executor) in &executors {
            g.bench_function(BenchmarkId::new(*label, shape), |b| {
                b.iter(|| run(&**executor, &plan))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = compute, plan
}
criterion_main!(benches);
