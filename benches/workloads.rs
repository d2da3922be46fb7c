//! The shared benchmark workloads of `shared/bench/WORKLOADS.md`, one JSON
//! line per run, comparable one to one with the Dask reference figures.
//!
//! ```text
//! cargo bench --bench workloads -- WORKLOAD N [--executor E]   # one run
//! cargo bench --bench workloads -- all [--executor E] [--repeat R]  # every run
//! cargo bench --bench workloads -- list                        # what exists
//! ```
//!
//! `all` re-runs this binary in a fresh process per (workload, N, executor),
//! so that each run's `peak_rss_mib` is its own, three times by default; it
//! prints the fastest run's JSON line on stdout and a summary on stderr.
//! Every run checks its result and exits non-zero on a wrong one.
//!
//! Workloads on a cluster (`local:N`) re-run this same binary as the
//! cluster's worker processes: `main` calls `rask::init` before anything
//! else, listing every function a workload sends to a cluster.
//!
//! Adding a workload: write `fn my_workload(run: &Run) -> Outcome` and add
//! one [`Workload`] row to [`WORKLOADS`] (a function it runs on a cluster
//! also goes into the `rask::tasks!` list of `main`).

use std::fmt::Write as _;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use rask::prelude::*;

// ---------------------------------------------------------------------------
// The workload table
// ---------------------------------------------------------------------------

/// One workload: how to run it and what `all` runs it on.
struct Workload {
    name: &'static str,
    about: &'static str,
    /// The sizes `all` runs.
    sizes: &'static [u64],
    /// The executors `all` runs it on, in order; the first is the default of
    /// a single run. `none` means the workload runs nothing.
    executors: &'static [&'static str],
    /// Which executors a single run accepts.
    accepts: Accepts,
    /// Sizes `all` leaves out on some executors, and why.
    caps: &'static [Cap],
    run: fn(&Run) -> Outcome,
}

/// `all` runs a workload on executors starting with `executor` only up to
/// `max_n` (a single run may still ask for more).
struct Cap {
    executor: &'static str,
    max_n: u64,
    why: &'static str,
}

#[derive(Clone, Copy, PartialEq)]
enum Accepts {
    /// Runs nothing (`build`).
    Nothing,
    Sync,
    /// The simulated executor: `sim:SEED`.
    Sim,
    Threads,
    /// A cluster: `local:N` or `tcp://host:port` (`tls://` over TLS).
    Cluster,
    /// `sync`, `threads`, `threads:N`, `local:N`, `tcp://host:port`, `tls://host:port`.
    Any,
}

const SIZES: &[u64] = &[1_000, 10_000, 100_000];
const SIZES_1M: &[u64] = &[1_000, 10_000, 100_000, 1_000_000];

/// `all` runs the workload that pays a client round trip per task
/// (`dist_roundtrip`) up to 10 000 on a cluster, to stay within its
/// 5-minute budget.
const ROUND_TRIP_CAP: &[Cap] = &[Cap {
    executor: "local:",
    max_n: 10_000,
    why: "one client round trip per task: 12-30 s a run at 100 000, over the time budget of `all` (run it alone)",
}];

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "build",
        about: "build tree(N) only",
        sizes: SIZES_1M,
        executors: &["none"],
        caps: &[],
        accepts: Accepts::Nothing,
        run: build,
    },
    Workload {
        name: "build_nested",
        about: "build tree(N) of functions four modules deep, as an application's are",
        sizes: SIZES_1M,
        executors: &["none"],
        caps: &[],
        accepts: Accepts::Nothing,
        run: build_nested,
    },
    Workload {
        name: "sync",
        about: "build tree(N), compute it on the sync executor",
        sizes: SIZES_1M,
        executors: &["sync"],
        caps: &[],
        accepts: Accepts::Sync,
        run: tree_compute,
    },
    Workload {
        name: "sim",
        about: "build tree(N), compute it on the simulated executor (ready tasks in seed order)",
        sizes: SIZES_1M,
        executors: &["sim:1"],
        caps: &[],
        accepts: Accepts::Sim,
        run: tree_compute,
    },
    Workload {
        name: "threads",
        about: "build tree(N), compute it on the threaded executor",
        sizes: SIZES_1M,
        executors: &["threads", "threads:1"],
        caps: &[],
        accepts: Accepts::Threads,
        run: tree_compute,
    },
    Workload {
        name: "chain",
        about: "build chain(N); compute it on sync, then the same object on threads",
        sizes: SIZES,
        executors: &["threads"],
        caps: &[],
        accepts: Accepts::Threads,
        run: chain,
    },
    Workload {
        name: "small",
        about: "N computes, one after the other, of a graph of one task (`inc(i)`), each waited for",
        sizes: SIZES,
        executors: &["sync", "threads"],
        caps: &[],
        accepts: Accepts::Any,
        run: small,
    },
    Workload {
        name: "persist",
        about: "N/100 chunks of 100k f64, N slice sums reduced by add; A: over loads, B: over persisted chunks",
        sizes: SIZES,
        executors: &["sync", "threads", "local:2"],
        // A worker decodes a fetched chunk once for all its slice sums, and
        // tasks wait for the worker holding their chunk: N = 100 000 takes
        // ~12 s a run on `local:2`.
        caps: &[],
        accepts: Accepts::Any,
        run: persist,
    },
    Workload {
        name: "persist_cache",
        about: "persist's chunks from the result cache: cold (computed, written) here, warm (loaded from disk) in a fresh process",
        // 800 KB per chunk on disk: 100 000 would write 800 MB.
        sizes: &[1_000, 10_000],
        executors: &["sync", "threads", "local:2"],
        caps: &[],
        accepts: Accepts::Any,
        run: persist_cache,
    },
    Workload {
        name: "cpu_scaling",
        about: "N tasks of ~5 ms CPU work (matrix products); speed-up over the sync executor",
        sizes: &[200],
        executors: &["sync", "threads", "local:2"],
        caps: &[],
        accepts: Accepts::Any,
        run: cpu_scaling,
    },
    Workload {
        name: "map",
        about: "in-process client: map(inc, 0..N) + gather, then the same again while the first futures are held",
        sizes: SIZES,
        executors: &["threads"],
        caps: &[],
        accepts: Accepts::Any,
        run: map,
    },
    Workload {
        name: "as_completed",
        about: "10 noop futures in flight; each completion submits one more, until N completions",
        sizes: SIZES,
        executors: &["threads", "local:2"],
        caps: &[],
        accepts: Accepts::Any,
        run: as_completed,
    },
    Workload {
        name: "dist_map",
        about: "map + gather as `map`, on a local cluster (start-up timed apart as startup_s)",
        sizes: SIZES,
        executors: &["local:2"],
        caps: &[],
        accepts: Accepts::Cluster,
        run: map,
    },
    Workload {
        name: "dist_graph",
        about: "build tree(N), compute it on a cluster through the client",
        sizes: SIZES,
        executors: &["local:2"],
        caps: &[],
        accepts: Accepts::Cluster,
        run: dist_graph,
    },
    Workload {
        name: "dist_chains",
        about: "build N/10 chains of 10 `inc` summed pairwise by `add`, compute it on a cluster with compute_with",
        sizes: SIZES,
        executors: &["local:2"],
        caps: &[],
        accepts: Accepts::Cluster,
        run: dist_chains,
    },
    Workload {
        name: "dist_submit_chain",
        about: "f = submit(inc(0)), then f = submit(inc(f)) N-1 times without waiting, then gather f",
        sizes: SIZES,
        executors: &["local:2"],
        // The links run on the workers without a round trip each (~12
        // µs/link): N = 100 000 takes ~1.2 s a run.
        caps: &[],
        accepts: Accepts::Cluster,
        run: dist_submit_chain,
    },
    Workload {
        name: "dist_unequal",
        about: "N sleeping tasks, 20 % 50 ms and the rest 1 ms, the long ones all placed on one worker; after a warm-up of 2000 no-ops",
        sizes: &[200],
        executors: &["local:2"],
        caps: &[],
        accepts: Accepts::Cluster,
        run: dist_unequal,
    },
    Workload {
        name: "dist_unequal_short",
        about: "N sleeping tasks, 20 % 2 ms and the rest 50 µs (under 1 ms on average), the long ones all placed on one worker; after a warm-up of 2000 no-ops",
        sizes: &[128],
        executors: &["local:2"],
        caps: &[],
        accepts: Accepts::Cluster,
        run: dist_unequal_short,
    },
    Workload {
        name: "dist_roundtrip",
        about: "N strictly sequential submit(inc(x)).result() round trips",
        sizes: SIZES,
        executors: &["local:2"],
        // One client round trip per task (120–300 µs here): N = 100 000
        // takes 12–30 s a run, ~1.5 min with `all`'s three repeats.
        caps: ROUND_TRIP_CAP,
        accepts: Accepts::Cluster,
        run: dist_roundtrip,
    },
];

// ---------------------------------------------------------------------------
// Runs and reports
// ---------------------------------------------------------------------------

/// What a single run is asked to do.
struct Run {
    workload: &'static str,
    n: u64,
    /// As given (`sync`, `threads`, `threads:2`, `none`).
    executor: String,
    config: Config,
}

impl Run {
    /// Thread count of a threads executor (`threads` = every core); on a
    /// `local:N` cluster, workers × threads per worker.
    fn threads(&self) -> usize {
        if let Some(workers) = self.cluster() {
            return workers * worker_threads(workers);
        }
        match self.executor.strip_prefix("threads") {
            Some(n) => n
                .trim_start_matches(':')
                .parse()
                .unwrap_or_else(|_| cores()),
            None => 1,
        }
    }

    /// Worker processes when the executor is a cluster: `N` of `local:N`,
    /// 0 for `tcp://…` (not known here); `None` in process.
    fn cluster(&self) -> Option<usize> {
        match rask::ExecutorKind::parse(&self.executor) {
            Ok(rask::ExecutorKind::Local(n)) => Some(n),
            Ok(rask::ExecutorKind::Tcp(_) | rask::ExecutorKind::Tls(_)) => Some(0),
            _ => None,
        }
    }
}

/// Threads per worker process of a local cluster of `workers`, as
/// `Client::local` chooses them (`RASK_WORKER_THREADS`, default the cores
/// split between the workers, at least 1 each); for a cluster reached by
/// address (0 workers here), what a worker started by hand runs.
fn worker_threads(workers: usize) -> usize {
    std::env::var("RASK_WORKER_THREADS")
        .ok()
        .and_then(|t| t.trim().parse::<usize>().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| match workers {
            0 => 1, // a worker started by hand without the variable
            n => (cores() / n).max(1),
        })
}

/// What a run measured: the headline figure, its task count, and every other
/// field of its JSON line.
struct Report {
    tasks: u64,
    /// Seconds of the headline figure (`us_per_task` = this / tasks).
    headline_s: f64,
    /// Seconds of all timed work of the run (build and computes).
    wall_s: f64,
    /// Peak resident memory of the run's timed part.
    peak_rss_mib: f64,
    executor: String,
    fields: Vec<(&'static str, Field)>,
}

enum Field {
    Float(f64),
    Int(u64),
    Str(String),
}

/// `Err` is a wrong answer or a failed computation: the run exits non-zero.
type Outcome = Result<Report, String>;

impl Report {
    fn new(run: &Run, tasks: u64, headline_s: f64, wall_s: f64) -> Self {
        // Graph optimization (on by default) changes what runs: say so.
        let optimize = std::env::var("RASK_OPTIMIZE").unwrap_or_else(|_| "default".into());
        let mut report = Report {
            tasks,
            headline_s,
            wall_s,
            peak_rss_mib: peak_rss_mib(),
            executor: run.executor.clone(),
            fields: vec![("rask_optimize", Field::Str(optimize))],
        };
        if let Some(workers) = run.cluster() {
            // `peak_rss_mib` is this process (client and scheduler); the
            // workers are processes of their own.
            report = report
                .int("workers", workers as u64)
                .int("worker_threads", worker_threads(workers) as u64)
                .float("workers_peak_rss_mib", children_peak_rss_mib());
        }
        report
    }

    /// A cluster's start-up seconds, when this run started one: reported
    /// beside the figures, never inside a headline.
    fn startup(self, startup_s: Option<f64>) -> Self {
        match startup_s {
            Some(s) => self.secs("startup_s", s),
            None => self,
        }
    }

    fn secs(mut self, name: &'static str, s: f64) -> Self {
        self.fields.push((name, Field::Float(s)));
        self
    }

    fn float(self, name: &'static str, x: f64) -> Self {
        self.secs(name, x)
    }

    fn int(mut self, name: &'static str, x: u64) -> Self {
        self.fields.push((name, Field::Int(x)));
        self
    }

    /// The JSON line; `baseline_rss_mib` and `load_1m` were read when the
    /// run started.
    fn json(&self, run: &Run, baseline_rss_mib: f64, load_1m: f64) -> String {
        let mut out = String::from("{");
        let _ = write!(
            out,
            "\"workload\": {}, \"n\": {}, \"executor\": {}, \"tasks\": {}, \
             \"wall_s\": {}, \"tasks_per_s\": {}, \"us_per_task\": {}, \
             \"peak_rss_mib\": {}, \"bytes_per_task\": {}, \"load_1m\": {}",
            json_str(run.workload),
            run.n,
            json_str(&self.executor),
            self.tasks,
            json_f64(self.wall_s),
            json_f64(self.tasks as f64 / self.headline_s),
            json_f64(self.headline_s / self.tasks as f64 * 1e6),
            json_f64(self.peak_rss_mib),
            json_f64(
                (self.peak_rss_mib - baseline_rss_mib).max(0.0) * 1048576.0 / self.tasks as f64
            ),
            json_f64(load_1m),
        );
        for (name, value) in &self.fields {
            let value = match value {
                Field::Float(x) => json_f64(*x),
                Field::Int(x) => x.to_string(),
                Field::Str(s) => json_str(s),
            };
            let _ = write!(out, ", {}: {value}", json_str(name));
        }
        out.push('}');
        out
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Six significant digits; `null` for NaN and infinities (not JSON numbers).
fn json_f64(x: f64) -> String {
    if !x.is_finite() {
        return "null".into();
    }
    let rounded: f64 = format!("{x:.5e}").parse().unwrap_or(x);
    format!("{rounded}")
}

/// A `/proc/self/status` figure in MiB (`VmHWM`: peak, `VmRSS`: now).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The machine's 1-minute load average: above the core count, other work
/// competed with the run.
fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM")
}

/// Sum of the peak resident memory (`VmHWM`) of this process's live child
/// processes: a local cluster's workers.
fn children_peak_rss_mib() -> f64 {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    let mut total = 0.0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesised command: state, ppid, …
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        if rest.split_whitespace().nth(1) != Some(me.as_str()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            });
        total += kib.unwrap_or(0.0) / 1024.0;
    }
    total
}

/// The machine's CPU time so far, busy and in all (`/proc/stat`, every
/// CPU, in clock ticks); `None` where it cannot be read.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

/// Seconds of CPU the whole machine spent busy while `f` ran (every
/// process: the bench, a local cluster's workers, and anything else that
/// ran meanwhile), with `f`'s value and its wall seconds.
fn timed_cpu<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let before = cpu_ticks();
    let (value, wall_s) = timed(f);
    let busy_s = match (before, cpu_ticks()) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            (busy1 - busy0) as f64 / (total1 - total0) as f64 * cores() as f64 * wall_s
        }
        _ => f64::NAN,
    };
    (value, wall_s, busy_s)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` and returns its value with the seconds it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed().as_secs_f64())
}

fn check<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("wrong {what}: got {got:?}, want {want:?}"))
    }
}

fn computed<T>(what: &str, r: rask::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what} failed: {e}"))
}

// ---------------------------------------------------------------------------
// Functions and graph shapes (WORKLOADS.md)
// ---------------------------------------------------------------------------

fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// Reduces `level` pairwise, level by level; an odd last element is carried
/// over unchanged.
fn reduce<T: Data>(
    mut level: Vec<Delayed<T>>,
    add: impl Fn(&Delayed<T>, &Delayed<T>) -> Delayed<T>,
) -> Delayed<T> {
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        let mut items = level.into_iter();
        while let Some(a) = items.next() {
            next.push(match items.next() {
                Some(b) => add(&a, &b),
                None => a,
            });
        }
        level = next;
    }
    level.pop().expect("a tree has at least one leaf")
}

/// tree(N): leaves `inc(i)`, reduced pairwise by `add`; `2N - 1` tasks.
fn tree(n: u64) -> Delayed<i64> {
    let leaves = (0..n as i64).map(|i| delayed!(inc(i))).collect();
    reduce(leaves, |a, b| delayed!(add(a, b)))
}

/// `inc` and `add` where an application keeps its functions: a key hashes
/// the function's path (`keys` in the crate's documentation).
mod pipeline {
    pub(crate) mod stages {
        pub(crate) mod arithmetic {
            pub(crate) fn inc(x: i64) -> i64 {
                x + 1
            }

            pub(crate) fn add(x: i64, y: i64) -> i64 {
                x + y
            }
        }
    }
}

/// tree(N) of `pipeline::stages::arithmetic`'s `inc` and `add`.
fn tree_nested(n: u64) -> Delayed<i64> {
    use pipeline::stages::arithmetic::{add, inc};
    let leaves = (0..n as i64).map(|i| delayed!(inc(i))).collect();
    reduce(leaves, |a, b| delayed!(add(a, b)))
}

fn tree_sum(n: u64) -> i64 {
    let n = n as i64;
    n * (n + 1) / 2
}

/// chain(N): `inc(0)`, then `inc(x)` N - 1 times; N tasks, result N.
fn chain_graph(n: u64) -> Delayed<i64> {
    let mut x = delayed!(inc(0));
    for _ in 1..n {
        x = delayed!(inc(&x));
    }
    x
}

// ---------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------

fn build(run: &Run) -> Outcome {
    build_of(run, tree)
}

fn build_nested(run: &Run) -> Outcome {
    build_of(run, tree_nested)
}

/// Builds the tree `tree` makes, against the floor's.
fn build_of(run: &Run, tree: fn(u64) -> Delayed<i64>) -> Outcome {
    let (root, build_s) = timed(|| tree(run.n));
    let tasks = 2 * run.n - 1;
    let report = Report::new(run, tasks, build_s, build_s).secs("build_s", build_s);
    // Checked after the memory figure: the graph map is not part of a build.
    check(
        "task count",
        rask::Graph::from_delayed(&root).len() as u64,
        tasks,
    )?;
    drop(root);
    let floor = floor::measure(run.n)?;
    Ok(report
        .secs("floor_build_s", floor.build_s)
        .float("build_x_floor", build_s / floor.build_s))
}

fn tree_compute(run: &Run) -> Outcome {
    let (root, build_s) = timed(|| tree(run.n));
    let (total, compute_s) = timed(|| root.compute_with(&run.config));
    check("tree sum", computed("compute", total)?, tree_sum(run.n))?;
    let report = Report::new(run, 2 * run.n - 1, compute_s, build_s + compute_s)
        .secs("build_s", build_s)
        .secs("compute_s", compute_s);
    // The floor runs after the memory figure was read, on memory rask no
    // longer holds.
    drop(root);
    let floor = floor::measure(run.n)?;
    Ok(report
        .secs("floor_build_s", floor.build_s)
        .secs("floor_compute_s", floor.compute_s)
        .float("build_x_floor", build_s / floor.build_s)
        .float("compute_x_floor", compute_s / floor.compute_s))
}

/// The floor: the cheapest honest runner of tree(N) we know, measured in
/// the same process as rask so that every in-process figure has a ratio to
/// it (`build_x_floor`, `compute_x_floor`).
///
/// Honest means it does the work any task runner must do, with nothing
/// known in advance about the shape: tasks in flat arrays (an op as a
/// function pointer, its arguments as literals or task indices), the
/// dependents of each task found from the arguments, a dependency counter
/// per task, a stack of ready tasks, one thread, and the result checked.
/// What it leaves out is what rask adds on purpose: keys (content hashes),
/// typed values behind `Arc<dyn Any>`, optimization, errors and panics as
/// data, executors that can be swapped.
mod floor {
    use std::time::Instant;

    /// One argument of a task.
    #[derive(Clone, Copy)]
    enum Arg {
        Literal(i64),
        Task(u32),
    }

    /// Tasks in flat arrays: task `t` calls `ops[t]` on
    /// `args[starts[t]..starts[t + 1]]`.
    struct Tasks {
        ops: Vec<fn(&[i64]) -> i64>,
        starts: Vec<u32>,
        args: Vec<Arg>,
    }

    impl Tasks {
        fn push(&mut self, op: fn(&[i64]) -> i64, args: &[Arg]) -> u32 {
            let t = self.ops.len() as u32;
            self.ops.push(op);
            self.args.extend_from_slice(args);
            self.starts.push(self.args.len() as u32);
            t
        }
    }

    fn inc(x: &[i64]) -> i64 {
        x[0] + 1
    }

    fn add(x: &[i64]) -> i64 {
        x[0] + x[1]
    }

    /// tree(N) as the workloads build it: leaves `inc(i)`, reduced pairwise.
    fn tree(n: u64) -> (Tasks, u32) {
        let tasks = (2 * n - 1) as usize;
        let mut g = Tasks {
            ops: Vec::with_capacity(tasks),
            starts: Vec::with_capacity(tasks + 1),
            args: Vec::with_capacity(2 * tasks),
        };
        g.starts.push(0);
        let mut level: Vec<u32> = (0..n as i64)
            .map(|i| g.push(inc, &[Arg::Literal(i)]))
            .collect();
        while level.len() > 1 {
            let mut next = Vec::with_capacity(level.len().div_ceil(2));
            for pair in level.chunks(2) {
                next.push(match *pair {
                    [a, b] => g.push(add, &[Arg::Task(a), Arg::Task(b)]),
                    [a] => a,
                    _ => unreachable!("chunks of 2"),
                });
            }
            level = next;
        }
        (g, level[0])
    }

    /// Runs every task once its inputs are done; the value of each task.
    // Index loops: the arrays run in parallel, as in any such runner.
    #[allow(clippy::needless_range_loop)]
    fn run(g: &Tasks) -> Vec<i64> {
        let tasks = g.ops.len();
        // Dependents of each task, compressed rows, and dependency counters.
        let mut pending = vec![0u32; tasks];
        let mut dependents_start = vec![0u32; tasks + 1];
        for t in 0..tasks {
            for arg in &g.args[g.starts[t] as usize..g.starts[t + 1] as usize] {
                if let Arg::Task(input) = *arg {
                    pending[t] += 1;
                    dependents_start[input as usize + 1] += 1;
                }
            }
        }
        for t in 0..tasks {
            dependents_start[t + 1] += dependents_start[t];
        }
        let mut fill = dependents_start.clone();
        let mut dependents = vec![0u32; dependents_start[tasks] as usize];
        for t in 0..tasks {
            for arg in &g.args[g.starts[t] as usize..g.starts[t + 1] as usize] {
                if let Arg::Task(input) = *arg {
                    dependents[fill[input as usize] as usize] = t as u32;
                    fill[input as usize] += 1;
                }
            }
        }
        let mut ready: Vec<u32> = (0..tasks as u32)
            .filter(|&t| pending[t as usize] == 0)
            .collect();
        let mut values = vec![0i64; tasks];
        let mut inputs = Vec::with_capacity(4);
        while let Some(t) = ready.pop() {
            let t = t as usize;
            inputs.clear();
            inputs.extend(
                g.args[g.starts[t] as usize..g.starts[t + 1] as usize]
                    .iter()
                    .map(|arg| match *arg {
                        Arg::Literal(x) => x,
                        Arg::Task(input) => values[input as usize],
                    }),
            );
            values[t] = (g.ops[t])(&inputs);
            let from = dependents_start[t] as usize;
            let to = dependents_start[t + 1] as usize;
            for &d in &dependents[from..to] {
                pending[d as usize] -= 1;
                if pending[d as usize] == 0 {
                    ready.push(d);
                }
            }
        }
        values
    }

    /// Seconds the floor took to build and to run tree(`n`).
    pub(super) struct Floor {
        pub(super) build_s: f64,
        pub(super) compute_s: f64,
    }

    /// Builds and runs tree(`n`) on the floor; `Err` on a wrong sum.
    pub(super) fn measure(n: u64) -> Result<Floor, String> {
        let start = Instant::now();
        let (g, root) = std::hint::black_box(tree(n));
        let build_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let values = std::hint::black_box(run(&g));
        let compute_s = start.elapsed().as_secs_f64();
        super::check("floor tree sum", values[root as usize], super::tree_sum(n))?;
        Ok(Floor { build_s, compute_s })
    }
}

/// The floor of `as_completed` and of `dist_roundtrip` on a local cluster:
/// the same threads and processes passing the same hand-offs, with nothing
/// else, measured in the same process after rask's run
/// (`floor_us_per_task`, `x_floor`).
///
/// Honest means every hand-off a completion needs is there, each the
/// cheapest way this machine offers it: the waiting thread hands a new
/// task's number to a thread that owns the worker connections (a channel
/// into a Tokio runtime of one thread, as a client's commands); that thread
/// writes it to one of `workers` worker processes over a Unix socket; the
/// worker writes back what it read at once; the owning thread reads it
/// and hands it to the waiting thread (a queue and a condition variable,
/// woken only when it waits), which takes the completions one at a time
/// and submits one task for each: 10 in flight for `as_completed`, one
/// at a time for `dist_roundtrip`, whose waiting thread watches for up to
/// 100 µs before it sleeps, as `Future::result` on a cluster does. What
/// it leaves out is what
/// rask adds on purpose: keys, a scheduler's state and placement, messages
/// with types and checks, values, results of any type, errors as data.
#[cfg(unix)]
mod handoff {
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdStream;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::unix::OwnedReadHalf;
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::mpsc;

    /// The environment variable that makes this binary a floor worker,
    /// connecting to the socket it names.
    pub(super) const WORKER_ENV: &str = "RASK_BENCH_HANDOFF_WORKER";

    /// How the floor waits: tasks in flight, and how long the waiting
    /// thread watches before it sleeps.
    #[derive(Clone, Copy)]
    pub(super) struct Waits {
        in_flight: u64,
        watch: Option<Duration>,
    }

    /// As `as_completed`: 10 in flight, and a thread that sleeps at once.
    pub(super) const AS_COMPLETED: Waits = Waits {
        in_flight: 10,
        watch: None,
    };

    /// As a round trip: one at a time, and a thread that watches for up
    /// to 100 µs before it sleeps, as `Future::result` on a cluster does.
    pub(super) const ROUND_TRIP: Waits = Waits {
        in_flight: 1,
        watch: Some(Duration::from_micros(100)),
    };

    /// Bytes of one task's number.
    const WIDTH: usize = 8;

    /// How long the workers may take to connect.
    const CONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

    /// The worker: writes back whatever it reads, as it reads it, until
    /// the socket closes.
    pub(super) fn worker(path: &str) -> Result<(), String> {
        let mut socket = StdStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = socket.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            socket.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        }
    }

    /// Completions handed to the waiting thread.
    #[derive(Default)]
    struct Done {
        queue: Mutex<Queue>,
        ready: Condvar,
        /// Bumped at every push and at the end, read without the lock by a
        /// watching waiter (as a client's `Spin::changed`).
        changes: AtomicU64,
    }

    #[derive(Default)]
    struct Queue {
        ids: VecDeque<u64>,
        /// The waiting thread sleeps on `ready` and nobody notified it yet.
        waiting: bool,
        /// A worker's connection ended: no more completions come from it.
        ended: bool,
    }

    impl Done {
        fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
            self.queue.lock().unwrap_or_else(PoisonError::into_inner)
        }

        fn push(&self, ids: impl Iterator<Item = u64>) {
            let mut queue = self.lock();
            queue.ids.extend(ids);
            self.changes.fetch_add(1, Ordering::Release);
            // One notification per sleep, as `as_completed` sends them.
            if std::mem::take(&mut queue.waiting) {
                self.ready.notify_one();
            }
        }

        fn end(&self) {
            self.lock().ended = true;
            self.changes.fetch_add(1, Ordering::Release);
            self.ready.notify_one();
        }

        /// The next completion; `None` once none is queued and a worker's
        /// connection ended. With `watch`, the waiting thread watches for
        /// a push for that long before it sleeps, as a client's wait for a
        /// result does (`src/futures/spin.rs`).
        fn pop(&self, mut watch: Option<Duration>) -> Option<u64> {
            let mut queue = self.lock();
            loop {
                if let Some(id) = queue.ids.pop_front() {
                    return Some(id);
                }
                if queue.ended {
                    return None;
                }
                if let Some(limit) = watch.take() {
                    // Read under the lock, which every push takes: no push
                    // is missed between this look and the watch.
                    let seen = self.changes.load(Ordering::Acquire);
                    drop(queue);
                    let start = Instant::now();
                    let mut reads = 0u32;
                    while self.changes.load(Ordering::Acquire) == seen {
                        std::hint::spin_loop();
                        reads += 1;
                        if reads % 64 == 0 && start.elapsed() >= limit {
                            break;
                        }
                    }
                    queue = self.lock();
                    continue;
                }
                queue.waiting = true;
                queue = self
                    .ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                queue.waiting = false;
            }
        }
    }

    /// Hands every whole number read from a worker to `done`, until the
    /// connection ends.
    async fn read_completions(mut read: OwnedReadHalf, done: Arc<Done>) {
        let mut buf = vec![0u8; 64 << 10];
        let mut held = 0;
        while let Ok(got @ 1..) = read.read(&mut buf[held..]).await {
            held += got;
            let whole = held - held % WIDTH;
            done.push(
                buf[..whole]
                    .chunks_exact(WIDTH)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())),
            );
            buf.copy_within(whole..held, 0);
            held -= whole;
        }
        done.end();
    }

    /// The thread owning the connections: reads completions, and writes
    /// each submitted number to the next worker in turn, all the numbers
    /// waiting at once in one write per worker.
    async fn own(
        sockets: Vec<UnixStream>,
        mut submitted: mpsc::UnboundedReceiver<u64>,
        done: Arc<Done>,
    ) {
        let mut writers = Vec::new();
        for socket in sockets {
            let (read, write) = socket.into_split();
            tokio::spawn(read_completions(read, done.clone()));
            writers.push(write);
        }
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); writers.len()];
        let mut next_worker = 0;
        while let Some(first) = submitted.recv().await {
            let mut id = Some(first);
            while let Some(task) = id {
                out[next_worker].extend_from_slice(&task.to_le_bytes());
                next_worker = (next_worker + 1) % writers.len();
                id = submitted.try_recv().ok();
            }
            for (writer, bytes) in writers.iter_mut().zip(&mut out) {
                if !bytes.is_empty() {
                    if writer.write_all(bytes).await.is_err() {
                        return;
                    }
                    bytes.clear();
                }
            }
        }
    }

    /// Seconds per completion of `n` completions through `workers` worker
    /// processes, waited for as `waits` says; `Err` when a completion is
    /// lost or wrong.
    pub(super) fn measure(n: u64, workers: usize, waits: Waits) -> Result<f64, String> {
        let path = std::env::temp_dir().join(format!("rask-handoff-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| e.to_string())?;
        let listener = runtime
            .block_on(async { UnixListener::bind(&path) })
            .map_err(|e| format!("bind {}: {e}", path.display()))?;
        let mut children = Vec::new();
        for _ in 0..workers.max(1) {
            let child = std::process::Command::new(&exe)
                .env(WORKER_ENV, &path)
                .spawn()
                .map_err(|e| format!("spawn a floor worker: {e}"))?;
            children.push(child);
        }
        let accepted: Result<Vec<UnixStream>, String> = runtime.block_on(async {
            let mut sockets = Vec::new();
            for _ in 0..children.len() {
                let accept = tokio::time::timeout(CONNECT_WITHIN, listener.accept());
                let (socket, _) = accept
                    .await
                    .map_err(|_| "a floor worker did not connect within 10 s".to_string())?
                    .map_err(|e| e.to_string())?;
                sockets.push(socket);
            }
            Ok(sockets)
        });
        if accepted.is_err() {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_file(&path);
        let sockets = accepted?;
        let done = Arc::new(Done::default());
        let (submit, submitted) = mpsc::unbounded_channel::<u64>();
        let owner = {
            let done = done.clone();
            std::thread::spawn(move || {
                runtime.block_on(own(sockets, submitted, done.clone()));
                // Nothing runs on the runtime any more: no completion comes.
                done.end();
            })
        };
        let start = Instant::now();
        let mut next = 0;
        let send = |id: u64| {
            submit
                .send(id)
                .map_err(|_| "the owning thread stopped".to_string())
        };
        while next < waits.in_flight.max(1).min(n) {
            send(next)?;
            next += 1;
        }
        let mut total = 0u64;
        for _ in 0..n {
            total += done
                .pop(waits.watch)
                .ok_or("a floor worker stopped before the end")?;
            if next < n {
                send(next)?;
                next += 1;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        drop(submit);
        let _ = owner.join();
        for mut child in children {
            let _ = child.wait();
        }
        super::check("floor completions' sum", total, n * (n - 1) / 2)?;
        Ok(seconds / n as f64)
    }
}

fn chain(run: &Run) -> Outcome {
    let (x, build_s) = timed(|| chain_graph(run.n));
    let sync = Config::synchronous();
    let (on_sync, compute_sync_s) = timed(|| x.compute_with(&sync));
    check(
        "chain result on sync",
        computed("compute", on_sync)?,
        run.n as i64,
    )?;
    let (on_threads, compute_threads_s) = timed(|| x.compute_with(&run.config));
    check(
        "chain result on threads",
        computed("compute", on_threads)?,
        run.n as i64,
    )?;
    let mut report = Report::new(
        run,
        run.n,
        compute_sync_s,
        build_s + compute_sync_s + compute_threads_s,
    )
    .secs("build_s", build_s)
    .secs("compute_sync_s", compute_sync_s)
    .secs("compute_threads_s", compute_threads_s)
    .float(
        "us_per_task_threads",
        compute_threads_s / run.n as f64 * 1e6,
    );
    report.executor = format!("sync+{}", run.executor);
    Ok(report)
}

/// N computes of a one-task graph, each built and waited for in turn: what
/// a program pays per `compute` of small work, beside what the work costs.
fn small(run: &Run) -> Outcome {
    let (sum, compute_s) = timed(|| -> Result<i64, String> {
        let mut sum = 0;
        for i in 0..run.n as i64 {
            sum += computed("compute", delayed!(inc(i)).compute_with(&run.config))?;
        }
        Ok(sum)
    });
    let n = run.n as i64;
    check("sum of results", sum?, n * (n + 1) / 2)?;
    Ok(Report::new(run, run.n, compute_s, compute_s).secs("compute_s", compute_s))
}

/// Values per chunk of the `persist` workload.
const CHUNK: usize = 100_000;

/// 100 000 f64 in [0, 1) from a SplitMix64 generator seeded with `c`.
fn load(c: u64) -> Vec<f64> {
    let mut state = c.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..CHUNK)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// Sum of elements `1000 j .. 1000 (j + 1)`; the chunk is shared, not copied.
fn slice_sum(chunk: Arc<Vec<f64>>, j: usize) -> f64 {
    chunk[1000 * j..1000 * (j + 1)].iter().sum()
}

fn add_f(x: f64, y: f64) -> f64 {
    x + y
}

/// N slice sums over `chunks`, reduced by a tree of `add`.
fn persist_graph(chunks: &[Delayed<Vec<f64>>]) -> Delayed<f64> {
    let parts = chunks
        .iter()
        .flat_map(|chunk| (0..100).map(move |j| delayed!(slice_sum(chunk, j))))
        .collect();
    reduce(parts, |a, b| delayed!(add_f(a, b)))
}

fn persist(run: &Run) -> Outcome {
    if run.n % 100 != 0 || run.n == 0 {
        return Err(format!("persist needs N a multiple of 100, got {}", run.n));
    }
    let c = run.n / 100;
    let config = &run.config;
    let startup_s = start_cluster(run)?;

    // A: over delayed loads; both computes run the loads.
    let (a, a_build_s) = timed(|| {
        let loads: Vec<_> = (0..c).map(|c| delayed!(load(c))).collect();
        persist_graph(&loads)
    });
    let (a1, a_compute1_s) = timed(|| a.compute_with(config));
    let (a2, a_compute2_s) = timed(|| a.compute_with(config));
    drop(a);

    // B: persist the chunks, then build over the held chunks (no loads).
    // All C chunks at once (Dask's `persist(*chunks)`), so that the loads run
    // in parallel; on a cluster the chunks stay on the workers (Dask's
    // `client.persist(chunks)`) and the graphs built on them use them there.
    let (chunks, b_persist_s) = timed(|| {
        let loads: Vec<_> = (0..c).map(|c| delayed!(load(c))).collect();
        rask::persist_with(&loads, config)
    });
    let chunks = computed("persist", chunks)?;
    let (b, b_build_s) = timed(|| persist_graph(&chunks));
    let (b1, b_compute1_s) = timed(|| b.compute_with(config));
    let (b2, b_compute2_s) = timed(|| b.compute_with(config));

    let tasks = 2 * run.n - 1;
    let wall_s = a_build_s + a_compute1_s + a_compute2_s + b_persist_s + b_build_s;
    let report = Report::new(
        run,
        tasks,
        b_compute1_s,
        wall_s + b_compute1_s + b_compute2_s,
    )
    .startup(startup_s)
    .int("chunks", c)
    .secs("a_build_s", a_build_s)
    .secs("a_compute1_s", a_compute1_s)
    .secs("a_compute2_s", a_compute2_s)
    .secs("b_persist_s", b_persist_s)
    .secs("b_build_s", b_build_s)
    .secs("b_compute1_s", b_compute1_s)
    .secs("b_compute2_s", b_compute2_s)
    .float("speedup_b_over_a", a_compute1_s / b_compute1_s);

    // Every compute walks the same tree, so all four sums are bit-identical;
    // they must also match a plain sum of the data.
    let [a1, a2, b1, b2] = [a1, a2, b1, b2].map(|r| computed("compute", r));
    let (a1, a2, b1, b2) = (a1?, a2?, b1?, b2?);
    check("second A sum", a2.to_bits(), a1.to_bits())?;
    check("first B sum", b1.to_bits(), a1.to_bits())?;
    check("second B sum", b2.to_bits(), a1.to_bits())?;
    drop(chunks);
    // The plain loop also tells what one load costs on this machine.
    let (plain, plain_s) = timed(|| (0..c).map(|c| load(c).iter().sum::<f64>()).sum::<f64>());
    if (a1 - plain).abs() > 1e-9 * plain.abs() {
        return Err(format!(
            "wrong persist sum: got {a1}, a plain sum gives {plain}"
        ));
    }
    Ok(report.float("ms_per_load", plain_s / c as f64 * 1e3))
}

/// A chunk of the `persist` workload, cached (`#[rask::task(cache)]`:
/// versioned by its source, so no process hashes its executable).
#[rask::task(cache)]
fn cached_load(c: u64) -> Vec<f64> {
    load(c)
}

/// The environment variable that makes a `persist_cache` run the warm
/// phase on the cache directory it names.
const WARM_ENV: &str = "RASK_BENCH_WARM_CACHE";

/// Persists the C cached chunks with the cache `dir`, then computes the
/// slice sums over them twice (two graphs): the seconds of each, and the
/// sum (checked equal).
fn persist_cache_phase(run: &Run, dir: &std::path::Path) -> Result<(f64, f64, f64, f64), String> {
    let config = run.config.clone().cache(dir);
    let chunks: Vec<_> = (0..run.n / 100).map(|c| delayed!(cached_load(c))).collect();
    let (chunks, persist_s) = timed(|| rask::persist_with(&chunks, &config));
    let chunks = computed("persist", chunks)?;
    let (sum, compute_s) = timed(|| persist_graph(&chunks).compute_with(&config));
    let sum = computed("compute", sum)?;
    let (again, compute2_s) = timed(|| persist_graph(&chunks).compute_with(&config));
    check(
        "second sum",
        computed("compute", again)?.to_bits(),
        sum.to_bits(),
    )?;
    Ok((persist_s, compute_s, compute2_s, sum))
}

/// `persist`'s B part with its chunks cached: cold in this process (the
/// chunks are computed and written), then warm in a fresh process of this
/// binary (the chunks are read from disk), interleaved by `--repeat`.
fn persist_cache(run: &Run) -> Outcome {
    if run.n % 100 != 0 || run.n == 0 {
        return Err(format!(
            "persist_cache needs N a multiple of 100, got {}",
            run.n
        ));
    }
    let startup_s = start_cluster(run)?;
    if let Some(dir) = std::env::var_os(WARM_ENV) {
        let (persist_s, compute_s, compute2_s, sum) =
            persist_cache_phase(run, std::path::Path::new(&dir))?;
        println!(
            "warm {persist_s} {compute_s} {compute2_s} {}",
            sum.to_bits()
        );
        return Err("the warm phase reports to its parent".into());
    }
    let dir = std::env::temp_dir().join(format!("rask-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cold_persist_s, cold_compute_s, cold_compute2_s, cold_sum) =
        persist_cache_phase(run, &dir)?;
    let bytes = rask::cache::info(&dir).map_err(|e| e.to_string())?.bytes;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (output, warm_wall_s) = timed(|| {
        std::process::Command::new(exe)
            .args([
                "persist_cache",
                &run.n.to_string(),
                "--executor",
                &run.executor,
            ])
            .env(WARM_ENV, &dir)
            .stderr(std::process::Stdio::null())
            .output()
    });
    let _ = std::fs::remove_dir_all(&dir);
    let output = output.map_err(|e| format!("warm process: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let said = || format!("the warm process said: {stdout}");
    let warm: Vec<&str> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("warm "))
        .ok_or_else(said)?
        .split(' ')
        .collect();
    let [warm_persist_s, warm_compute_s, warm_compute2_s, warm_bits] = warm[..] else {
        return Err(said());
    };
    let secs = |x: &str| x.parse::<f64>().map_err(|_| said());
    let (warm_persist_s, warm_compute_s, warm_compute2_s) = (
        secs(warm_persist_s)?,
        secs(warm_compute_s)?,
        secs(warm_compute2_s)?,
    );
    let warm_bits = warm_bits.parse::<u64>().map_err(|_| said())?;
    check("warm sum", warm_bits, cold_sum.to_bits())?;
    let report = Report::new(run, run.n / 100, warm_persist_s, warm_wall_s)
        .startup(startup_s)
        .int("chunks", run.n / 100)
        .int("cache_bytes", bytes)
        .secs("cold_persist_s", cold_persist_s)
        .secs("cold_compute_s", cold_compute_s)
        .secs("cold_compute2_s", cold_compute2_s)
        .secs("warm_persist_s", warm_persist_s)
        .secs("warm_compute_s", warm_compute_s)
        .secs("warm_compute2_s", warm_compute2_s)
        .secs("warm_process_s", warm_wall_s)
        .float("speedup_warm_over_cold", cold_persist_s / warm_persist_s);
    Ok(report)
}

/// Side of the matrices of `cpu_work`: 3 × 128 KiB stays in a core's L2.
const DIM: usize = 128;
/// Products per task: about 5 ms on this machine (see the README).
const REPS: usize = 15;

/// ~5 ms of CPU work with no shared state: `REPS` products of two `DIM²`
/// integer-valued f64 matrices (exact, so every executor agrees bit for bit).
fn cpu_work(seed: u64) -> f64 {
    let s = seed as usize;
    let mut a: Vec<f64> = (0..DIM * DIM).map(|k| ((k * 7 + s) % 5) as f64).collect();
    let b: Vec<f64> = (0..DIM * DIM).map(|k| ((k * 3 + s) % 7) as f64).collect();
    let mut c = vec![0.0f64; DIM * DIM];
    let mut total = 0.0;
    for r in 0..REPS {
        c.iter_mut().for_each(|x| *x = 0.0);
        for i in 0..DIM {
            for k in 0..DIM {
                let aik = a[i * DIM + k];
                let (row, brow) = (&mut c[i * DIM..(i + 1) * DIM], &b[k * DIM..(k + 1) * DIM]);
                for (x, y) in row.iter_mut().zip(brow) {
                    *x += aik * y;
                }
            }
        }
        total += c[(r * 31 % DIM) * DIM + r * 17 % DIM];
        a[r % (DIM * DIM)] += 1.0;
    }
    total + c.iter().sum::<f64>()
}

fn sum_all(parts: Vec<f64>) -> f64 {
    parts.iter().sum()
}

fn cpu_scaling(run: &Run) -> Outcome {
    let startup_s = start_cluster(run)?;
    let graph = || {
        let parts: Vec<Delayed<f64>> = (0..run.n).map(|i| delayed!(cpu_work(i))).collect();
        delayed!(sum_all(parts))
    };
    let (want, plain_s) = timed(|| (0..run.n).map(cpu_work).sum::<f64>());
    let total = graph();
    let (on_sync, compute_sync_s) = timed(|| total.compute_with(&Config::synchronous()));
    check(
        "sum on sync",
        computed("compute", on_sync)?.to_bits(),
        want.to_bits(),
    )?;
    let (got, compute_s) = if run.executor == "sync" {
        (Ok(want), compute_sync_s)
    } else {
        // A fresh graph: identical keys, nothing cached between computes.
        let total = graph();
        timed(|| total.compute_with(&run.config))
    };
    check("sum", computed("compute", got)?.to_bits(), want.to_bits())?;
    let report = Report::new(
        run,
        run.n + 1,
        compute_s,
        plain_s + compute_sync_s + compute_s,
    )
    .startup(startup_s)
    .int("threads", run.threads() as u64)
    .secs("plain_loop_s", plain_s)
    .secs("compute_sync_s", compute_sync_s)
    .secs("compute_s", compute_s)
    .float("ms_per_work_task", plain_s / run.n as f64 * 1e3)
    .float("speedup_vs_sync", compute_sync_s / compute_s)
    .float("speedup_vs_plain_loop", plain_s / compute_s);
    Ok(report)
}

fn noop(i: i64) -> i64 {
    i
}

/// On a cluster, starts it and returns the seconds that took (`startup_s`,
/// never part of a headline): a `local:N` cluster is started once per
/// process and kept, so later clients and computes on the same executor
/// find it running. In process, `None`.
fn start_cluster(run: &Run) -> Result<Option<f64>, String> {
    if run.cluster().is_none() {
        return Ok(None);
    }
    let (client, startup_s) = timed(|| rask::Client::with_config(&run.config));
    client.map_err(|e| format!("cluster start-up: {e}"))?;
    Ok(Some(startup_s))
}

/// A client on the run's executor, and the cluster's start-up seconds.
fn client(run: &Run) -> Result<(rask::Client, Option<f64>), String> {
    let startup_s = start_cluster(run)?;
    let client = rask::Client::with_config(&run.config).map_err(|e| format!("client: {e}"))?;
    Ok((client, startup_s))
}

fn map(run: &Run) -> Outcome {
    let (client, startup_s) = client(run)?;
    let want: Vec<i64> = (1..=run.n as i64).collect();
    let ((first, got), map_gather_s, map_gather_cpu_s) = timed_cpu(|| {
        let futures = client.map(inc, 0..run.n as i64);
        let got = futures
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|f| client.gather(f).map_err(|e| e.to_string()));
        (futures, got)
    });
    check(
        "map results",
        got.map_err(|e| format!("map: {e}"))?,
        want.clone(),
    )?;
    // Again while `first` is held: every key is in the client's table.
    let ((again, got), map_gather_cached_s) = timed(|| {
        let futures = client.map(inc, 0..run.n as i64);
        let pending = futures
            .as_ref()
            .map_or(0, |f| f.iter().filter(|f| !f.done()).count());
        let got = futures
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|f| client.gather(f).map_err(|e| e.to_string()));
        ((futures, pending), got)
    });
    check(
        "cached map results",
        got.map_err(|e| format!("map: {e}"))?,
        want,
    )?;
    check(
        "futures of the cached map not done at once (work re-ran)",
        again.1,
        0,
    )?;
    check(
        "keys the client holds",
        client.stats().keys_held as u64,
        run.n,
    )?;
    let report = Report::new(run, run.n, map_gather_s, map_gather_s + map_gather_cached_s)
        .startup(startup_s)
        .secs("map_gather_s", map_gather_s)
        .secs("map_gather_cached_s", map_gather_cached_s)
        .float(
            "us_per_task_cached",
            map_gather_cached_s / run.n as f64 * 1e6,
        )
        .float("cpu_us_per_task", map_gather_cpu_s / run.n as f64 * 1e6);
    drop((first, again));
    Ok(report)
}

fn as_completed(run: &Run) -> Outcome {
    const IN_FLIGHT: u64 = 10;
    let (client, startup_s) = client(run)?;
    let submit = |i: u64| {
        client
            .submit(delayed!(noop(i as i64)))
            .map_err(|e| format!("submit: {e}"))
    };
    let (sums, as_completed_s) = timed(|| -> Result<(u64, i64), String> {
        let first = (0..IN_FLIGHT.min(run.n))
            .map(submit)
            .collect::<Result<Vec<_>, _>>()?;
        let mut next = first.len() as u64;
        let mut seq = rask::as_completed(first);
        let (mut done, mut total) = (0u64, 0i64);
        while let Some(f) = seq.next() {
            total += f.result().map_err(|e| format!("noop: {e}"))?;
            done += 1;
            if next < run.n {
                seq.add(submit(next)?);
                next += 1;
            }
        }
        Ok((done, total))
    });
    let (done, total) = sums?;
    check("completions", done, run.n)?;
    check(
        "sum of results",
        total,
        (run.n as i64 - 1) * run.n as i64 / 2,
    )?;
    let report = Report::new(run, run.n, as_completed_s, as_completed_s)
        .startup(startup_s)
        .secs("as_completed_s", as_completed_s);
    drop(client);
    // The hand-off floor, on a local cluster (`mod handoff`).
    #[cfg(unix)]
    let report = match run.cluster().filter(|&w| w > 0) {
        Some(workers) => {
            let floor_s = handoff::measure(run.n, workers, handoff::AS_COMPLETED)?;
            report
                .float("floor_us_per_task", floor_s * 1e6)
                .float("x_floor", as_completed_s / run.n as f64 / floor_s)
        }
        None => report,
    };
    Ok(report)
}

/// tree(N) computed on a cluster through the client. The client runs the
/// passes `compute` runs, but a tree has no chain to fuse (every `add` has
/// two inputs) nor a literal node to fold: it is sent task for task.
fn dist_graph(run: &Run) -> Outcome {
    let (client, startup_s) = client(run)?;
    let (root, build_s) = timed(|| tree(run.n));
    let (total, compute_s) = timed(|| client.compute(&root).and_then(|f| f.result()));
    check("tree sum", computed("compute", total)?, tree_sum(run.n))?;
    let report = Report::new(run, 2 * run.n - 1, compute_s, build_s + compute_s)
        .startup(startup_s)
        .secs("build_s", build_s)
        .secs("compute_s", compute_s);
    Ok(report)
}

/// chains(N): `N / 10` chains `inc(10 c)`, then `inc(x)` 9 times, their ends
/// reduced pairwise by `add`: `N + N / 10 - 1` tasks, the sum `5 k (k + 1)`
/// for `k = N / 10` chains.
fn chains_graph(n: u64) -> (Delayed<i64>, u64, i64) {
    let k = (n / 10).max(1);
    let ends = (0..k as i64)
        .map(|c| (1..10).fold(delayed!(inc(10 * c)), |x, _| delayed!(inc(x))))
        .collect();
    let root = reduce(ends, |a, b| delayed!(add(a, b)));
    (root, 10 * k + k - 1, 5 * k as i64 * (k as i64 + 1))
}

/// chains(N) computed on a cluster by `compute_with`, the path a fused
/// chain travels to a worker as one task.
fn dist_chains(run: &Run) -> Outcome {
    let startup_s = start_cluster(run)?;
    let ((root, tasks, want), build_s) = timed(|| chains_graph(run.n));
    let (total, compute_s) = timed(|| root.compute_with(&run.config));
    check("chains sum", computed("compute", total)?, want)?;
    let report = Report::new(run, tasks, compute_s, build_s + compute_s)
        .startup(startup_s)
        .secs("build_s", build_s)
        .secs("compute_s", compute_s);
    Ok(report)
}

/// A chain of N submissions, each on the previous future, none waited for
/// until the last is gathered.
fn dist_submit_chain(run: &Run) -> Outcome {
    let (client, startup_s) = client(run)?;
    let start = Instant::now();
    let mut submit_s = 0.0;
    let got = (|| -> rask::Result<i64> {
        let mut f = client.submit(delayed!(inc(0)))?;
        for _ in 1..run.n {
            f = client.submit(delayed!(inc(&f)))?;
        }
        submit_s = start.elapsed().as_secs_f64();
        Ok(client.gather(std::slice::from_ref(&f))?[0])
    })();
    let submit_gather_s = start.elapsed().as_secs_f64();
    check("chain result", computed("submit chain", got)?, run.n as i64)?;
    let report = Report::new(run, run.n, submit_gather_s, submit_gather_s)
        .startup(startup_s)
        .secs("submit_s", submit_s)
        .secs("submit_gather_s", submit_gather_s);
    Ok(report)
}

/// Sleeps 50 ms for `i` ending in 0 or 2, 1 ms otherwise; returns `i`.
fn unequal(i: i64) -> i64 {
    let ms = if matches!(i % 10, 0 | 2) { 50 } else { 1 };
    std::thread::sleep(std::time::Duration::from_millis(ms));
    i
}

/// Sleeps 2 ms for `i` ending in 0 or 2, 50 µs otherwise; returns `i`.
fn unequal_short(i: i64) -> i64 {
    let us = if matches!(i % 10, 0 | 2) { 2_000 } else { 50 };
    std::thread::sleep(std::time::Duration::from_micros(us));
    i
}

/// Unequal task costs placed unluckily: 2000 no-ops first teach the
/// scheduler that tasks are short (windows of 64 per thread), then
/// `map(unequal, 0..N)` goes out in those windows, alternately to the two
/// workers, so every long task (even `i`) lands on the first worker. Timed:
/// the map and its gather.
fn dist_unequal(run: &Run) -> Outcome {
    unequal_map(run, unequal)
}

/// `dist_unequal` with tasks under 1 ms on average (`unequal_short`):
/// N = 128 is one window per worker, all sent at once.
fn dist_unequal_short(run: &Run) -> Outcome {
    unequal_map(run, unequal_short)
}

/// `dist_unequal`'s measurement, mapping `f`.
/// Generic, not a `fn` pointer: a task's function is named by its type.
fn unequal_map<F>(run: &Run, f: F) -> Outcome
where
    F: Fn(i64) -> i64 + Clone + Send + Sync + 'static,
{
    let (client, startup_s) = client(run)?;
    let warm = client
        .map(noop, 0..2000)
        .and_then(|f| client.gather(&f))
        .map_err(|e| format!("warm-up: {e}"))?;
    check("warm-up results", warm.len(), 2000)?;
    let (got, map_gather_s) = timed(|| {
        client
            .map(f, 0..run.n as i64)
            .and_then(|f| client.gather(&f))
    });
    let got = computed("unequal", got)?;
    check(
        "sum of results",
        got.iter().sum::<i64>(),
        (run.n as i64 - 1) * run.n as i64 / 2,
    )?;
    let report = Report::new(run, run.n, map_gather_s, map_gather_s)
        .startup(startup_s)
        .secs("map_gather_s", map_gather_s);
    Ok(report)
}

/// N strictly sequential round trips: submit `inc(x)`, wait for its result,
/// feed it to the next.
fn dist_roundtrip(run: &Run) -> Outcome {
    let (client, startup_s) = client(run)?;
    let (got, roundtrips_s) = timed(|| -> rask::Result<i64> {
        let mut x = 0;
        for _ in 0..run.n {
            x = client.submit(delayed!(inc(x)))?.result()?;
        }
        Ok(x)
    });
    check("last result", computed("round trip", got)?, run.n as i64)?;
    let report = Report::new(run, run.n, roundtrips_s, roundtrips_s)
        .startup(startup_s)
        .secs("roundtrips_s", roundtrips_s)
        .float("us_per_roundtrip", roundtrips_s / run.n as f64 * 1e6);
    drop(client);
    // The hand-off floor of one round trip at a time, on a local cluster.
    #[cfg(unix)]
    let report = match run.cluster().filter(|&w| w > 0) {
        Some(workers) => {
            let floor_s = handoff::measure(run.n, workers, handoff::ROUND_TRIP)?;
            report
                .float("floor_us_per_task", floor_s * 1e6)
                .float("x_floor", roundtrips_s / run.n as f64 / floor_s)
        }
        None => report,
    };
    Ok(report)
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const USAGE: &str = "\
usage: cargo bench --bench workloads -- WORKLOAD N [--executor E]
       cargo bench --bench workloads -- all [--executor E] [--repeat R]
       cargo bench --bench workloads -- list

E: sync | threads | threads:N | local:N | tcp://host:port | tls://host:port (default: the
   workload's first executor; local:N starts N worker processes of this
   binary, RASK_WORKER_THREADS threads each, default cores / N, at least 1)
`all` runs every workload at the sizes of shared/bench/WORKLOADS.md on every
executor it lists (or only E), each run in a fresh process, R times (default
3), and prints the fastest run's JSON line (by headline figure) on stdout,
with `\"best_of\": R` added; a summary table goes to stderr.";

fn main() -> ExitCode {
    // First of all: a worker of the hand-off floor (this binary, re-run
    // with `handoff::WORKER_ENV` set) echoes and exits.
    #[cfg(unix)]
    if let Some(path) = std::env::var_os(handoff::WORKER_ENV) {
        return match handoff::worker(&path.to_string_lossy()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("floor worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // In a worker process of a local cluster (this binary, re-run with
    // `RASK_WORKER` set) this runs the worker and exits. Every function a
    // workload sends to a cluster is listed.
    rask::init_with(rask::tasks![
        inc,
        add,
        noop,
        load,
        slice_sum,
        add_f,
        cpu_work,
        sum_all,
        unequal,
        unequal_short
    ]);
    // `cargo bench` appends `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match parse(&args) {
        Ok(Mode::Usage) => {
            eprintln!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Mode::List) => {
            for w in WORKLOADS {
                println!(
                    "{:<17} N in {:?}, on {}: {}",
                    w.name,
                    w.sizes,
                    w.executors.join(", "),
                    w.about
                );
            }
            ExitCode::SUCCESS
        }
        Ok(Mode::All { executor, repeat }) => all(executor.as_deref(), repeat),
        Ok(Mode::One(run, workload)) => one(&run, workload),
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

enum Mode {
    Usage,
    List,
    All {
        executor: Option<String>,
        repeat: u32,
    },
    One(Run, &'static Workload),
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let mut positional = Vec::new();
    let mut executor = None;
    let mut repeat = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Mode::Usage),
            "--executor" | "-e" => {
                let e = it.next().ok_or("--executor needs a value")?;
                executor = Some(e.clone());
            }
            a if a.starts_with("--executor=") => executor = Some(a["--executor=".len()..].into()),
            "--repeat" => {
                let r = it.next().ok_or("--repeat needs a value")?;
                let r = r.parse::<u32>().ok().filter(|&r| r > 0);
                repeat = Some(r.ok_or("--repeat needs a whole number ≥ 1")?);
            }
            a if a.starts_with('-') => return Err(format!("unknown option `{a}`")),
            a => positional.push(a),
        }
    }
    match positional.as_slice() {
        [] => Ok(Mode::Usage),
        ["list"] => Ok(Mode::List),
        ["all"] => Ok(Mode::All {
            executor,
            repeat: repeat.unwrap_or(3),
        }),
        _ if repeat.is_some() => Err("--repeat is for `all` only".into()),
        [name, n] => {
            let workload = find(name)?;
            let n: u64 = n
                .replace('_', "")
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("N must be a whole number ≥ 1, got `{n}`"))?;
            let executor = executor.unwrap_or_else(|| workload.executors[0].to_string());
            let config = executor_config(workload, &executor)?;
            Ok(Mode::One(
                Run {
                    workload: workload.name,
                    n,
                    executor,
                    config,
                },
                workload,
            ))
        }
        [name] => {
            find(name)?;
            Err(format!("`{name}` needs a size N"))
        }
        _ => Err(format!("too many arguments: {}", positional.join(" "))),
    }
}

fn find(name: &str) -> Result<&'static Workload, String> {
    WORKLOADS.iter().find(|w| w.name == name).ok_or_else(|| {
        let known: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
        format!(
            "unknown workload `{name}`; known: {}, all, list",
            known.join(", ")
        )
    })
}

/// The configuration for `executor`, if this workload runs on it and this
/// build has it.
fn executor_config(workload: &Workload, executor: &str) -> Result<Config, String> {
    if workload.accepts == Accepts::Nothing {
        return match executor {
            "none" => Ok(Config::synchronous()),
            _ => Err(format!("`{}` runs no executor", workload.name)),
        };
    }
    let kind = rask::ExecutorKind::parse(executor).map_err(|e| e.to_string())?;
    let threads = matches!(kind, rask::ExecutorKind::Threads(_));
    let cluster = matches!(
        kind,
        rask::ExecutorKind::Local(_) | rask::ExecutorKind::Tcp(_) | rask::ExecutorKind::Tls(_)
    );
    let fits = match workload.accepts {
        Accepts::Sync => matches!(kind, rask::ExecutorKind::Synchronous),
        Accepts::Sim => matches!(kind, rask::ExecutorKind::Simulated(_)),
        Accepts::Threads => threads,
        Accepts::Cluster => cluster,
        Accepts::Any | Accepts::Nothing => true,
    };
    if !fits {
        return Err(format!(
            "`{}` does not run on `{executor}` (it runs on {})",
            workload.name,
            workload.executors.join(", ")
        ));
    }
    if threads && !cfg!(feature = "threaded") {
        return Err(format!(
            "`{executor}` needs the `threaded` feature (built without it)"
        ));
    }
    if cluster && !cfg!(feature = "distributed") {
        return Err(format!(
            "`{executor}` needs the `distributed` feature (built without it)"
        ));
    }
    Ok(Config::new().executor(kind))
}

fn one(run: &Run, workload: &Workload) -> ExitCode {
    let baseline = status_mib("VmRSS");
    let load_1m = load_1m();
    match (workload.run)(run) {
        Ok(report) => {
            println!("{}", report.json(run, baseline, load_1m));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("FAILED {} {} on {}: {e}", run.workload, run.n, run.executor);
            ExitCode::FAILURE
        }
    }
}

/// Every workload at every size on every executor this build has, each run
/// `repeat` times in a child process; prints the fastest run of each.
fn all(only: Option<&str>, repeat: u32) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find this benchmark's executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let start = Instant::now();
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for w in WORKLOADS {
        for &n in w.sizes {
            for &e in w.executors {
                if only.is_some_and(|o| o != e) {
                    continue;
                }
                if let Some(cap) = w
                    .caps
                    .iter()
                    .find(|c| e.starts_with(c.executor) && n > c.max_n)
                {
                    eprintln!("skip {} {n} on {e}: {}", w.name, cap.why);
                    continue;
                }
                if e.starts_with("threads") && !cfg!(feature = "threaded") {
                    eprintln!("skip {} {n} on {e}: built without `threaded`", w.name);
                    continue;
                }
                if e.starts_with("local:") && !cfg!(feature = "distributed") {
                    eprintln!("skip {} {n} on {e}: built without `distributed`", w.name);
                    continue;
                }
                let what = format!("{} {n} --executor {e}", w.name);
                eprintln!("run  {what}  (x{repeat})");
                let mut best: Option<(f64, String)> = None;
                for _ in 0..repeat {
                    match run_child(&exe, w.name, n, e) {
                        Ok(line) => {
                            let us = field(&line, "us_per_task").parse().unwrap_or(f64::MAX);
                            if best.as_ref().is_none_or(|(b, _)| us < *b) {
                                best = Some((us, line));
                            }
                        }
                        Err(why) => {
                            failed.push(format!("{what}: {why}"));
                            best = None;
                            break;
                        }
                    }
                }
                if let Some((_, line)) = best {
                    let line = format!(
                        "{}, \"best_of\": {repeat}}}",
                        line.trim_end().trim_end_matches('}')
                    );
                    println!("{line}");
                    summary.push(summary_row(&line));
                }
            }
        }
    }
    eprintln!(
        "\n{:<17} {:>9} {:<16} {:>9} {:>12} {:>10} {:>9} {:>6}",
        "workload", "n", "executor", "tasks", "tasks/s", "us/task", "rss MiB", "load"
    );
    for row in &summary {
        eprintln!("{row}");
    }
    eprintln!(
        "\n{} configurations x{repeat} in {:.1} s",
        summary.len(),
        start.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("FAILED:\n  {}", failed.join("\n  "));
        ExitCode::FAILURE
    }
}

/// Runs one (workload, N, executor) in a fresh process; its JSON line.
fn run_child(
    exe: &std::path::Path,
    workload: &str,
    n: u64,
    executor: &str,
) -> Result<String, String> {
    let mut command = Command::new(exe);
    command.args([workload, &n.to_string(), "--executor", executor]);
    if executor.starts_with("local:") {
        // Clusters of `all` are N workers of one thread each.
        command.env("RASK_WORKER_THREADS", "1");
    }
    let out = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not start: {e}"))?;
    if !out.status.success() {
        return Err(format!("exited with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match (lines.next(), lines.next()) {
        (Some(line), None) if line.starts_with('{') => Ok(line.to_string()),
        _ => Err(format!("expected one JSON line, got: {text:?}")),
    }
}

/// A top-level field of one of our JSON lines, as text (strings unquoted).
fn field(line: &str, name: &str) -> String {
    let pat = format!("\"{name}\": ");
    line.find(&pat)
        .map(|i| {
            let rest = &line[i + pat.len()..];
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            rest[..end].trim_matches('"').to_string()
        })
        .unwrap_or_default()
}

/// One line of the human summary, read back from a JSON line.
fn summary_row(line: &str) -> String {
    let field = |name| field(line, name);
    format!(
        "{:<17} {:>9} {:<16} {:>9} {:>12} {:>10} {:>9} {:>6}",
        field("workload"),
        field("n"),
        field("executor"),
        field("tasks"),
        field("tasks_per_s"),
        field("us_per_task"),
        field("peak_rss_mib"),
        field("load_1m"),
    )
}
