//! What graph optimization costs, and what it buys.
//!
//! ```text
//! cargo bench --bench optimize            # the figures below
//! cargo bench --bench optimize -- --quick # one repetition, for a smoke test
//! cargo bench --bench optimize -- --only chain   # or `--only tree`
//! ```
//!
//! 1. **Pass time per task** on a 1 M-task tree (`tree(500 000)` of
//!    `shared/bench/WORKLOADS.md`: 999 999 tasks), timed by `rask::explain`
//!    stage by stage: with `inc(i)` leaves (nothing to fold: the passes only
//!    look) and with `rask::value(i)` leaves (half the tasks are inlined, so
//!    the plan is rebuilt with 500 000 fused tasks).
//! 2. **The 100 k chain** (`x = inc(0)`, then `x = inc(x)` 99 999 times) on
//!    `threads:2` (and `sync`), with and without optimization: the whole
//!    `compute_with` (lowering, optimizing, running, collecting), then the
//!    executor alone on the plans built beforehand (`rask::explain(..).plan()`),
//!    which is what fusing changes. Runs with and without are interleaved;
//!    median and best of the runs are printed.
//!
//! Every result is checked; a wrong one aborts the bench.

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rask::{delayed, Config, Delayed, Timings};
use rask_executor::{Executor, Outcome, Plan, Reporter, Synchronous};

fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// tree(n) over the given leaves: pairwise `add`, an odd last node carried
/// over unchanged.
fn tree(mut level: Vec<Delayed<i64>>) -> Delayed<i64> {
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => delayed!(add(a, b)),
                [a] => a.clone(),
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    level.pop().expect("at least one leaf")
}

fn chain(n: usize) -> Delayed<i64> {
    let mut x = delayed!(inc(0));
    for _ in 1..n {
        x = delayed!(inc(&x));
    }
    x
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ns_per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e9 / n as f64
}

/// Median stage times of `explain` over `reps` runs.
fn explain_timings(root: &Delayed<i64>, reps: usize) -> Result<(Timings, usize, usize), String> {
    let mut runs = Vec::new();
    let mut sizes = (0, 0);
    for _ in 0..reps {
        let plan = rask::explain(root, &Config::new().optimize(true)).map_err(|e| e.to_string())?;
        sizes = (plan.graph_len(), plan.len());
        runs.push(*plan.timings());
    }
    let pick = |f: fn(&Timings) -> Duration| median(runs.iter().map(f).collect());
    let mut t = runs[0];
    t.lower = pick(|t| t.lower);
    t.cull = pick(|t| t.cull);
    t.inline = pick(|t| t.inline);
    t.fuse = pick(|t| t.fuse);
    t.assemble = pick(|t| t.assemble);
    Ok((t, sizes.0, sizes.1))
}

fn report_passes(what: &str, root: &Delayed<i64>, reps: usize) -> Result<(), String> {
    let (t, tasks, planned) = explain_timings(root, reps)?;
    println!("{what}: {tasks} tasks -> {planned} plan tasks (median of {reps})");
    println!(
        "  lower {:>8.2} ms  {:>6.1} ns/task   (not a pass: the cost without optimization)",
        ms(t.lower),
        ns_per(t.lower, tasks)
    );
    for (name, d) in [
        ("cull", t.cull),
        ("inline", t.inline),
        ("fuse", t.fuse),
        ("assemble", t.assemble),
        ("passes", t.passes()),
    ] {
        println!(
            "  {name:<8}{:>8.2} ms  {:>6.1} ns/task",
            ms(d),
            ns_per(d, tasks)
        );
    }
    Ok(())
}

/// One timed `compute_with`, checked.
fn time_chain(x: &Delayed<i64>, n: usize, config: &Config) -> Result<Duration, String> {
    let start = Instant::now();
    let got = black_box(x)
        .compute_with(config)
        .map_err(|e| e.to_string())?;
    let took = start.elapsed();
    if got != n as i64 {
        return Err(format!("chain({n}) gave {got}"));
    }
    Ok(took)
}

fn report_chain(label: &str, on: (Duration, Duration), off: (Duration, Duration), n: usize) {
    println!(
        "  {label:<10} optimized {:>6.2} ms ({:>5.1} ns/task, best {:>6.2} ms)   unoptimized {:>6.2} ms ({:>5.1} ns/task, best {:>6.2} ms)   speed-up {:.2}x (best {:.2}x)",
        ms(on.0),
        ns_per(on.0, n),
        ms(on.1),
        ms(off.0),
        ns_per(off.0, n),
        ms(off.1),
        off.0.as_secs_f64() / on.0.as_secs_f64(),
        off.1.as_secs_f64() / on.1.as_secs_f64(),
    );
}

fn run(quick: bool, only: Option<String>) -> Result<(), String> {
    let reps = if quick { 1 } else { 5 };
    if only.as_deref() != Some("chain") {
        trees(reps)?;
    }
    if only.as_deref() != Some("tree") {
        chains(reps)?;
    }
    Ok(())
}

/// 1. Pass time per task on a 1M-task tree.
fn trees(reps: usize) -> Result<(), String> {
    let leaves = 500_000;
    let inc_tree = tree((0..leaves).map(|i| delayed!(inc(i))).collect());
    let sum = inc_tree
        .compute_with(&Config::synchronous())
        .map_err(|e| e.to_string())?;
    if sum != leaves * (leaves + 1) / 2 {
        return Err(format!("tree sum {sum}"));
    }
    report_passes("tree(500000), inc leaves", &inc_tree, reps)?;
    drop(inc_tree);
    let value_tree = tree((0..leaves).map(|i| rask::value(i + 1)).collect());
    report_passes("tree(500000), value leaves", &value_tree, reps)?;
    drop(value_tree);
    Ok(())
}

/// 2. The 100k chain on threads:2, with and without optimization.
fn chains(reps: usize) -> Result<(), String> {
    let n = 100_000;
    let x = chain(n);
    let reps = reps * 3;
    let threads = Config::threads(2);
    // One untimed run each: starts the pool, warms the allocator.
    time_chain(&x, n, &threads)?;
    time_chain(&x, n, &threads.clone().optimize(false))?;
    println!("chain(100000), whole compute_with (median of {reps}):");
    for (label, config) in [("threads:2", threads), ("sync", Config::synchronous())] {
        // Interleaved, so that a burst of other work hits both alike.
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            on.push(time_chain(&x, n, &config.clone().optimize(true))?);
            off.push(time_chain(&x, n, &config.clone().optimize(false))?);
        }
        let stats = |v: Vec<Duration>| {
            let best = v.iter().copied().min().unwrap_or_default();
            (median(v), best)
        };
        report_chain(label, stats(on), stats(off), n);
    }
    report_passes("chain(100000), lowering and passes", &x, reps)?;
    executor_alone(&x, reps)
}

/// Waits for a plan's run to finish.
#[derive(Default)]
struct Done {
    done: Mutex<bool>,
    cv: Condvar,
    value: Mutex<Option<i64>>,
}

impl Reporter for Done {
    fn output(&self, _: usize, outcome: Outcome) {
        let value = outcome.ok().and_then(|v| v.downcast_ref::<i64>().copied());
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = value;
    }
    fn finished(&self) {
        *self.done.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_all();
    }
}

/// One run of `plan` on `executor`, checked, from submit to `finished`.
fn time_plan(executor: &dyn Executor, plan: &Arc<Plan>, want: i64) -> Result<Duration, String> {
    let done = Arc::new(Done::default());
    let start = Instant::now();
    executor.submit(plan.clone(), done.clone());
    let mut finished = done.done.lock().unwrap_or_else(PoisonError::into_inner);
    while !*finished {
        finished = done
            .cv
            .wait(finished)
            .unwrap_or_else(PoisonError::into_inner);
    }
    let took = start.elapsed();
    let got = *done.value.lock().unwrap_or_else(PoisonError::into_inner);
    if got != Some(want) {
        return Err(format!("plan gave {got:?}, not {want}"));
    }
    Ok(took)
}

/// The executor alone, on the chain's plans built beforehand (lowered, and
/// optimized or not): what fusing saves per task, without lowering.
fn executor_alone(x: &Delayed<i64>, reps: usize) -> Result<(), String> {
    let n = 100_000;
    let explain = |on: bool| {
        rask::explain(x, &Config::new().optimize(on))
            .map(|e| e.plan())
            .map_err(|e| e.to_string())
    };
    let (on, off) = (explain(true)?, explain(false)?);
    let executors: Vec<(&str, Box<dyn Executor>)> = vec![
        #[cfg(feature = "threaded")]
        (
            "threads:2",
            Box::new(rask_threaded::ThreadPool::new(2).map_err(|e| e.to_string())?),
        ),
        ("sync", Box::new(Synchronous)),
    ];
    println!(
        "chain(100000), the executor alone on a built plan ({} task(s) vs {}; median of {reps}):",
        on.len(),
        off.len()
    );
    for (label, executor) in &executors {
        time_plan(&**executor, &on, n as i64)?;
        time_plan(&**executor, &off, n as i64)?;
        let (mut t_on, mut t_off) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            t_on.push(time_plan(&**executor, &on, n as i64)?);
            t_off.push(time_plan(&**executor, &off, n as i64)?);
        }
        let stats = |v: Vec<Duration>| {
            let best = v.iter().copied().min().unwrap_or_default();
            (median(v), best)
        };
        report_chain(label, stats(t_on), stats(t_off), n);
    }
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; ignored.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    match run(quick, only) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
