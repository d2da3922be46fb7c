//! Scale, planned past this machine: the real scheduler state machine
//! driven by the simulated cluster (`rask_distributed::sim`) with 10, 100
//! and 1 000 simulated workers of 2 threads and about a million tasks, in
//! two shapes: a map (`n/2` leaves, one task on each) and a binary tree
//! reduction (`n/2` leaves summed pairwise). Prints, per run: scheduling
//! decisions (`Compute`s sent) per second of time spent in the scheduler's
//! handlers, nanoseconds per decision (how placement cost grows with the
//! workers), the wall time of the whole simulation, and the peak resident
//! memory of the run per task (scheduler, simulated workers and the graph
//! together: an upper bound on the scheduler's share).
//!
//! `cargo bench --bench sim_scale` (add `-- N` for about N tasks; default
//! 1 000 000; add `-- N W` for one worker count).

use std::sync::Arc;
use std::time::Instant;

use rask_distributed::protocol::{TaskSpec, WireFailure, WireKey};
use rask_distributed::sim::Sim;
use rask_executor::Value;

fn key(i: usize) -> WireKey {
    let mut k = [0; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k
}

fn spec(i: usize, name: &Arc<str>, function: &Arc<str>, deps: Vec<WireKey>) -> TaskSpec {
    TaskSpec {
        key: key(i),
        name: name.clone(),
        function: function.clone(),
        payload: Arc::from(&[][..]),
        deps,
        timeout_ms: None,
        retries: 0,
        annotations: Default::default(),
    }
}

/// `n/2` leaves and one task on each; every mapped task is wanted.
fn map(n: usize) -> (Vec<TaskSpec>, Vec<WireKey>) {
    let (leaf, inc): (Arc<str>, Arc<str>) = ("leaf".into(), "inc".into());
    let half = n / 2;
    let mut tasks: Vec<TaskSpec> = (0..half).map(|i| spec(i, &leaf, &leaf, vec![])).collect();
    tasks.extend((0..half).map(|i| spec(half + i, &inc, &inc, vec![key(i)])));
    let wanted = (half..2 * half).map(key).collect();
    (tasks, wanted)
}

/// `n/2` leaves summed pairwise up to one root, which is wanted.
fn tree(n: usize) -> (Vec<TaskSpec>, Vec<WireKey>) {
    let (leaf, add): (Arc<str>, Arc<str>) = ("leaf".into(), "add".into());
    let mut tasks: Vec<TaskSpec> = (0..n / 2).map(|i| spec(i, &leaf, &leaf, vec![])).collect();
    let mut level: Vec<usize> = (0..n / 2).collect();
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for pair in level.chunks(2) {
            let i = tasks.len();
            tasks.push(spec(i, &add, &add, pair.iter().map(|&d| key(d)).collect()));
            next.push(i);
        }
        level = next;
    }
    let root = key(*level.last().expect("a leaf"));
    (tasks, vec![root])
}

/// Every task returns a unit: the bench measures the scheduler, not ops.
fn run_unit(_: &TaskSpec, _: &mut [Option<Value>]) -> Result<Value, Box<WireFailure>> {
    Ok(Arc::new(()))
}

/// A field of `/proc/self/status` in bytes (Linux; 0 elsewhere).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// One run in this process, which does nothing else (so its peak memory is
/// its own): prints its line.
fn one(shape: &str, w: u32, n: usize) {
    let before = status_bytes("VmRSS:");
    let (tasks, wanted) = if shape == "map" { map(n) } else { tree(n) };
    let count = tasks.len();
    let started = Instant::now();
    let report =
        Sim::new(w, 1)
            .check_invariants(false)
            .log(false)
            .run(tasks, wanted, &mut run_unit);
    let wall = started.elapsed();
    let peak = status_bytes("VmHWM:").saturating_sub(before);
    assert!(!report.stalled && report.remembered == 0 && report.held == 0);
    let secs = report.scheduler_time.as_secs_f64();
    println!(
        "{:<5} {:>8} {:>9} {:>11} {:>13.0} {:>9.0} {:>8.2} {:>12}",
        shape,
        w,
        count,
        report.decisions,
        report.decisions as f64 / secs,
        secs * 1e9 / report.decisions as f64,
        wall.as_secs_f64(),
        peak / count as u64,
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some("one") {
        let shape = &args[1];
        return one(shape, args[2].parse().unwrap(), args[3].parse().unwrap());
    }
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let workers: Vec<u32> = match args.get(1).and_then(|a| a.parse().ok()) {
        Some(w) => vec![w],
        None => vec![10, 100, 1_000],
    };
    println!(
        "{:<5} {:>8} {:>9} {:>11} {:>13} {:>9} {:>8} {:>12}",
        "shape", "workers", "tasks", "decisions", "decisions/s", "ns/dec", "wall s", "peak B/task"
    );
    let exe = std::env::current_exe().expect("this bench's path");
    for shape in ["map", "tree"] {
        for &w in &workers {
            let status = std::process::Command::new(&exe)
                .args(["one", shape, &w.to_string(), &n.to_string()])
                .status()
                .expect("the bench runs itself");
            assert!(status.success());
        }
    }
}
