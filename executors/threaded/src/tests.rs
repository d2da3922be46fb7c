//! Tests of the threaded executor against the contract and `Synchronous`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use rask_executor::{
    Executor, Failure, FailureKind, Key, Op, OpError, Outcome, Plan, PlanBuilder, Reporter,
    Synchronous, Value,
};

use crate::ThreadPool;

/// Long enough for any test on a loaded machine; reaching it means a hang.
const TIMEOUT: Duration = Duration::from_secs(120);

fn key(i: u64) -> Key {
    let mut bytes = [0; 32];
    bytes[..8].copy_from_slice(&i.to_le_bytes());
    Key(bytes)
}

fn int(value: &Value) -> i64 {
    *value.downcast_ref::<i64>().expect("test values are i64")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    No,
    Error,
    Panic,
}

/// Adds its inputs to a constant (wrapping); counts its runs; may fail.
struct Sum {
    constant: i64,
    fail: Fail,
    runs: Arc<AtomicUsize>,
}

impl Op for Sum {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        match self.fail {
            Fail::No => {}
            Fail::Error => return Err(OpError::failed(format!("bad {}", self.constant))),
            Fail::Panic => panic!("boom {}", self.constant),
        }
        let mut total = self.constant;
        for input in inputs.iter_mut() {
            total = total.wrapping_add(int(&input.take().expect("every input is given")));
        }
        Ok(Arc::new(total))
    }

    fn name(&self) -> &str {
        "sum"
    }
}

fn sum(constant: i64, fail: Fail, runs: &Arc<AtomicUsize>) -> Arc<dyn Op> {
    Arc::new(Sum {
        constant,
        fail,
        runs: Arc::clone(runs),
    })
}

/// Records outputs and checks rule 4 (each output once, then `finished`
/// once); can play a reporter that cancels.
#[derive(Default)]
struct Collect {
    state: Mutex<CollectState>,
    cv: Condvar,
    /// `cancelled()` answers true once this many outputs were reported.
    cancel_after_outputs: Option<usize>,
    /// `cancelled()` answers true once a failure was reported, like the
    /// root crate's reporter.
    fail_fast: bool,
    /// `cancelled()` answers true once the counter reached the limit.
    cancel_at_runs: Option<(Arc<AtomicUsize>, usize)>,
    cancelled_seen: AtomicBool,
}

#[derive(Default)]
struct CollectState {
    outputs: Vec<Option<Outcome>>,
    reported: usize,
    failures: usize,
    finished: usize,
    /// Contract violations, checked by the test thread (a panic in a
    /// reporter would abort the process).
    errors: Vec<String>,
}

impl Collect {
    fn new(outputs: usize) -> Collect {
        let collect = Collect::default();
        collect.state.lock().unwrap().outputs = vec![None; outputs];
        collect
    }

    /// Waits for `finished` and returns the outputs.
    fn wait(&self) -> Vec<Outcome> {
        let state = self.state.lock().unwrap();
        let (mut state, timeout) = self
            .cv
            .wait_timeout_while(state, TIMEOUT, |s| s.finished == 0)
            .unwrap();
        assert!(!timeout.timed_out(), "the run did not finish (deadlock?)");
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        assert_eq!(state.finished, 1, "finished is called exactly once");
        state
            .outputs
            .iter_mut()
            .enumerate()
            .map(|(i, o)| {
                o.take()
                    .unwrap_or_else(|| panic!("output {i} not reported"))
            })
            .collect()
    }
}

impl Reporter for Collect {
    fn output(&self, index: usize, outcome: Outcome) {
        let mut state = self.state.lock().unwrap();
        if state.finished > 0 {
            state.errors.push(format!("output {index} after finished"));
        }
        if outcome.is_err() {
            state.failures += 1;
        }
        match state.outputs.get_mut(index) {
            Some(slot @ None) => *slot = Some(outcome),
            Some(Some(_)) => state.errors.push(format!("output {index} reported twice")),
            None => state.errors.push(format!("output {index} does not exist")),
        }
        state.reported += 1;
    }

    fn cancelled(&self) -> bool {
        if self.cancel_after_outputs.is_none() && !self.fail_fast && self.cancel_at_runs.is_none() {
            return false;
        }
        let state = self.state.lock().unwrap();
        let cancelled = self
            .cancel_after_outputs
            .is_some_and(|n| state.reported >= n)
            || (self.fail_fast && state.failures > 0)
            || self
                .cancel_at_runs
                .as_ref()
                .is_some_and(|(runs, limit)| runs.load(Ordering::SeqCst) >= *limit);
        if cancelled {
            self.cancelled_seen.store(true, Ordering::SeqCst);
        }
        cancelled
    }

    fn finished(&self) {
        let mut state = self.state.lock().unwrap();
        state.finished += 1;
        if state.finished > 1 {
            state.errors.push("finished twice".into());
        }
        let unreported = state.outputs.iter().filter(|o| o.is_none()).count();
        if unreported > 0 {
            state
                .errors
                .push(format!("finished with {unreported} outputs unreported"));
        }
        self.cv.notify_all();
    }
}

fn run_on(executor: &dyn Executor, plan: &Arc<Plan>) -> Vec<Outcome> {
    let collect = Arc::new(Collect::new(plan.outputs().len()));
    executor.submit(Arc::clone(plan), collect.clone());
    collect.wait()
}

fn pool(threads: usize) -> ThreadPool {
    ThreadPool::new(threads).expect("the test machine can start threads")
}

/// An outcome in comparable form.
type Summary = Result<i64, (Key, FailureKind, String)>;

fn summary(outcome: &Outcome) -> Summary {
    match outcome {
        Ok(value) => Ok(int(value)),
        Err(f) => Err((f.key, f.kind, f.message.clone())),
    }
}

fn summaries(outcomes: &[Outcome]) -> Vec<Summary> {
    outcomes.iter().map(summary).collect()
}

/// Runs `body` on another thread and fails if it does not end in time.
fn with_timeout(body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        body();
        let _ = tx.send(());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(()) => handle.join().expect("the body passed"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlock: the test did not end"),
    }
}

#[test]
fn new_and_threads() {
    assert_eq!(pool(3).threads(), 3);
    let expected = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(pool(0).threads(), expected);
    let pool = pool(1);
    assert_eq!(format!("{pool:?}"), "ThreadPool { threads: 1 }");
}

#[test]
fn empty_plan_finishes() {
    let plan = Arc::new(PlanBuilder::new().build());
    for threads in [1, 2] {
        assert!(run_on(&pool(threads), &plan).is_empty());
    }
}

#[test]
fn diamond() {
    let runs = Arc::default();
    let mut b = PlanBuilder::new();
    let a = b.push(key(0), sum(1, Fail::No, &runs), &[]);
    let l = b.push(key(1), sum(10, Fail::No, &runs), &[a]);
    let r = b.push(key(2), sum(100, Fail::No, &runs), &[a]);
    let j = b.push(key(3), sum(0, Fail::No, &runs), &[l, r]);
    b.output(j);
    b.output(a);
    b.output(j);
    let plan = Arc::new(b.build());
    for threads in [1, 2, 4] {
        let got = summaries(&run_on(&pool(threads), &plan));
        assert_eq!(got, vec![Ok(112), Ok(1), Ok(112)]);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3 * 4, "each task runs once");
}

#[test]
fn duplicate_dependencies_and_unused_tasks() {
    let runs = Arc::default();
    let mut b = PlanBuilder::new();
    let a = b.push(key(0), sum(3, Fail::No, &runs), &[]);
    let _unused = b.push(key(1), sum(5, Fail::No, &runs), &[a]);
    let twice = b.push(key(2), sum(0, Fail::No, &runs), &[a, a]);
    let thrice = b.push(key(3), sum(0, Fail::No, &runs), &[twice, a, twice]);
    b.output(thrice);
    let plan = Arc::new(b.build());
    for threads in [1, 2, 4] {
        let got = summaries(&run_on(&pool(threads), &plan));
        assert_eq!(got, vec![Ok(15)]);
    }
}

#[test]
fn failure_reaches_dependents_not_siblings() {
    for fail in [Fail::Error, Fail::Panic] {
        let runs = Arc::default();
        let mut b = PlanBuilder::new();
        let bad = b.push(key(0), sum(1, fail, &runs), &[]);
        let dep = b.push(key(1), sum(1, Fail::No, &runs), &[bad]);
        let ok = b.push(key(2), sum(5, Fail::No, &runs), &[]);
        let dep2 = b.push(key(3), sum(1, Fail::No, &runs), &[ok, dep]);
        let sibling = b.push(key(4), sum(1, Fail::No, &runs), &[ok]);
        for t in [bad, dep, dep2, sibling, ok] {
            b.output(t);
        }
        let plan = Arc::new(b.build());
        let reference = run_on(&Synchronous, &plan);
        for threads in [1, 2, 4] {
            let got = run_on(&pool(threads), &plan);
            assert_eq!(summaries(&got), summaries(&reference));
            let failure = |o: &Outcome| -> Arc<Failure> { o.clone().expect_err("failed") };
            // Rule 2: the very same failure, naming the task that failed.
            assert!(Arc::ptr_eq(&failure(&got[0]), &failure(&got[1])));
            assert!(Arc::ptr_eq(&failure(&got[0]), &failure(&got[2])));
            assert_eq!(failure(&got[2]).key, key(0));
            let kind = match fail {
                Fail::Panic => FailureKind::Panicked,
                _ => FailureKind::Failed,
            };
            assert_eq!(failure(&got[0]).kind, kind);
            assert_eq!(summary(&got[3]), Ok(6));
            assert_eq!(summary(&got[4]), Ok(5));
        }
        // Only `bad`, `ok` and `sibling` ran, on each of 4 executors.
        assert_eq!(runs.load(Ordering::SeqCst), 3 * 4);
    }
}

#[test]
fn cancelled_from_the_start_runs_nothing() {
    let runs = Arc::default();
    let mut b = PlanBuilder::new();
    let a = b.push(key(0), sum(1, Fail::No, &runs), &[]);
    let c = b.push(key(1), sum(1, Fail::No, &runs), &[a]);
    b.output(c);
    b.output(a);
    b.output(c);
    let plan = Arc::new(b.build());
    for threads in [1, 2, 4] {
        let collect = Arc::new(Collect {
            cancel_after_outputs: Some(0),
            ..Collect::new(3)
        });
        pool(threads).submit(Arc::clone(&plan), collect.clone());
        let got = collect.wait();
        assert!(got
            .iter()
            .all(|o| matches!(o, Err(f) if f.kind == FailureKind::Cancelled)));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[test]
fn cancel_stops_new_tasks() {
    // A chain: tasks run one after another, so once `cancelled` says yes
    // (after the 10th run) no 11th may start.
    for threads in [1, 2, 4] {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut b = PlanBuilder::new();
        let mut prev = b.push(key(0), sum(1, Fail::No, &runs), &[]);
        b.output(prev);
        for i in 1..100 {
            prev = b.push(key(i), sum(1, Fail::No, &runs), &[prev]);
            b.output(prev);
        }
        let plan = Arc::new(b.build());
        let collect = Arc::new(Collect {
            cancel_at_runs: Some((Arc::clone(&runs), 10)),
            ..Collect::new(100)
        });
        pool(threads).submit(Arc::clone(&plan), collect.clone());
        let got = collect.wait();
        assert_eq!(runs.load(Ordering::SeqCst), 10);
        for (i, outcome) in got.iter().enumerate() {
            match outcome {
                Ok(v) => assert!(i < 10 && int(v) == i as i64 + 1),
                Err(f) => assert!(i >= 10 && f.kind == FailureKind::Cancelled),
            }
        }
    }
}

#[test]
fn cancel_on_wide_plan_reports_everything_once() {
    // Independent tasks: tasks already started may finish, nothing else.
    for threads in [1, 2, 4] {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut b = PlanBuilder::new();
        for i in 0..1000 {
            let t = b.push(key(i), sum(1, Fail::No, &runs), &[]);
            b.output(t);
        }
        let plan = Arc::new(b.build());
        let collect = Arc::new(Collect {
            cancel_at_runs: Some((Arc::clone(&runs), 10)),
            ..Collect::new(1000)
        });
        pool(threads).submit(Arc::clone(&plan), collect.clone());
        let got = collect.wait();
        let ran = runs.load(Ordering::SeqCst);
        assert!((10..10 + threads).contains(&ran), "{ran} tasks ran");
        assert_eq!(got.iter().filter(|o| o.is_ok()).count(), ran);
    }
}

#[test]
fn fail_fast_reporter() {
    // The root crate's reporter cancels after the first failure.
    let runs = Arc::new(AtomicUsize::new(0));
    let mut b = PlanBuilder::new();
    let bad = b.push(key(0), sum(1, Fail::Error, &runs), &[]);
    b.output(bad);
    let mut prev = b.push(key(1), sum(1, Fail::No, &runs), &[]);
    for i in 2..50 {
        prev = b.push(key(i), sum(1, Fail::No, &runs), &[prev]);
    }
    b.output(prev);
    let plan = Arc::new(b.build());
    let collect = Arc::new(Collect {
        fail_fast: true,
        ..Collect::new(2)
    });
    pool(1).submit(Arc::clone(&plan), collect.clone());
    let got = collect.wait();
    assert_eq!(summary(&got[0]).unwrap_err().1, FailureKind::Failed);
    assert_eq!(summary(&got[1]).unwrap_err().1, FailureKind::Cancelled);
    assert!(collect.cancelled_seen.load(Ordering::SeqCst));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one thread: nothing after the failure"
    );
}

#[test]
fn submit_returns_before_the_plan_finished() {
    /// Blocks until the test thread lets it go.
    struct Gate(Mutex<mpsc::Receiver<()>>);
    impl Op for Gate {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            let got = self.0.lock().unwrap().recv_timeout(TIMEOUT);
            got.map_err(|_| OpError::failed("submit blocked"))?;
            Ok(Arc::new(7i64))
        }
        fn name(&self) -> &str {
            "gate"
        }
    }
    let (tx, rx) = mpsc::channel();
    let mut b = PlanBuilder::new();
    let t = b.push(key(0), Arc::new(Gate(Mutex::new(rx))), &[]);
    b.output(t);
    let collect = Arc::new(Collect::new(1));
    pool(1).submit(Arc::new(b.build()), collect.clone());
    tx.send(()).unwrap();
    assert_eq!(summaries(&collect.wait()), vec![Ok(7)]);
}

/// Submits an inner plan to the pool it runs on and waits for its result.
struct Nested {
    pool: ThreadPool,
    /// Nesting levels below this one.
    depth: u32,
    width: i64,
}

impl Op for Nested {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let base: i64 = inputs.iter().map(|v| int(v.as_ref().expect("given"))).sum();
        let runs = Arc::default();
        let mut b = PlanBuilder::new();
        let mut parts = Vec::new();
        for i in 0..self.width {
            parts.push(b.push(key(i as u64), sum(i, Fail::No, &runs), &[]));
        }
        if self.depth > 0 {
            let inner = Nested {
                pool: self.pool.clone(),
                depth: self.depth - 1,
                width: self.width,
            };
            let first = parts[0];
            parts.push(b.push(key(1000), Arc::new(inner), &[first]));
        }
        let total = b.push(key(2000), sum(base, Fail::No, &runs), &parts);
        b.output(total);
        let collect = Arc::new(Collect::new(1));
        self.pool.submit(Arc::new(b.build()), collect.clone());
        let got = collect.wait();
        got.into_iter()
            .next()
            .expect("one output")
            .map_err(|f| OpError::failed(format!("nested run failed: {f}")))
    }

    fn name(&self) -> &str {
        "nested"
    }
}

/// Expected result of a `Nested` op with these parameters.
fn nested_value(base: i64, depth: u32, width: i64) -> i64 {
    let own = base + (0..width).sum::<i64>();
    if depth == 0 {
        own
    } else {
        own + nested_value(0, depth - 1, width)
    }
}

/// A seed and eight `Nested` ops on it (`limit`: each under that timeout),
/// summed; and the sum they give.
fn nested_plan(pool: &ThreadPool, limit: Option<Duration>) -> (Arc<Plan>, i64) {
    let runs = Arc::default();
    let mut b = PlanBuilder::new();
    let seed = b.push(key(0), sum(1, Fail::No, &runs), &[]);
    let mut parts = Vec::new();
    for i in 0..8u64 {
        let op = Nested {
            pool: pool.clone(),
            depth: (i % 3) as u32,
            width: 5,
        };
        let op = rask_executor::with_limits(Arc::new(op), limit, 0);
        parts.push(b.push(key(10 + i), op, &[seed]));
    }
    let total = b.push(key(100), sum(0, Fail::No, &runs), &parts);
    b.output(total);
    let expected: i64 = (0..8).map(|i| nested_value(1, i % 3, 5)).sum();
    (Arc::new(b.build()), expected)
}

#[test]
fn nested_submit_does_not_deadlock() {
    for threads in [1, 2] {
        with_timeout(move || {
            let pool = pool(threads);
            let (plan, expected) = nested_plan(&pool, None);
            for _ in 0..5 {
                assert_eq!(summaries(&run_on(&pool, &plan)), vec![Ok(expected)]);
            }
        });
    }
}

/// A task with a timeout runs on a thread of its own while its worker
/// waits for it; its nested submits ran nowhere when every worker so
/// waited (until the timeouts), and now run on the attempt's thread, inner
/// nested submits there included.
#[test]
fn nested_submit_from_a_timed_task_does_not_wait_for_a_worker() {
    for threads in [1, 2] {
        with_timeout(move || {
            let pool = pool(threads);
            let (plan, expected) = nested_plan(&pool, Some(Duration::from_secs(30)));
            assert_eq!(summaries(&run_on(&pool, &plan)), vec![Ok(expected)]);
        });
    }
}

#[test]
fn many_concurrent_submits() {
    with_timeout(|| {
        let pool = pool(2);
        let runs = Arc::default();
        let mut b = PlanBuilder::new();
        let leaves: Vec<u32> = (0..20)
            .map(|i| b.push(key(i), sum(i as i64, Fail::No, &runs), &[]))
            .collect();
        let total = b.push(key(100), sum(0, Fail::No, &runs), &leaves);
        b.output(total);
        let plan = Arc::new(b.build());
        let collects: Vec<_> = (0..2000)
            .map(|_| {
                let collect = Arc::new(Collect::new(1));
                pool.submit(Arc::clone(&plan), collect.clone());
                collect
            })
            .collect();
        for collect in collects {
            assert_eq!(summaries(&collect.wait()), vec![Ok(190)]);
        }
    });
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random plan: up to 4 dependencies per task, some failing tasks, random
/// (possibly repeated) outputs.
fn random_plan(rng: &mut Rng, runs: &Arc<AtomicUsize>) -> Plan {
    // Mostly small plans; some large ones with hubs many tasks depend on.
    let large = rng.below(8) == 0;
    let n = 1 + rng.below(if large { 3000 } else { 150 });
    let mut b = PlanBuilder::new();
    for i in 0..n {
        let deps: Vec<u32> = match i {
            0 => vec![],
            _ => (0..rng.below(5))
                .map(|_| match rng.below(8) {
                    // A hub: one of the first tasks.
                    0 if large => rng.below(i.min(3)) as u32,
                    // Any earlier task.
                    1 => rng.below(i) as u32,
                    // A recent task.
                    _ => (i - 1 - rng.below(i.min(8))) as u32,
                })
                .collect(),
        };
        let fail = match rng.below(200) {
            0..=5 => Fail::Error,
            6 if rng.below(4) == 0 => Fail::Panic,
            _ => Fail::No,
        };
        b.push(key(i), sum(rng.below(1000) as i64, fail, runs), &deps);
    }
    for _ in 0..1 + rng.below(6) {
        b.output(rng.below(n) as u32);
    }
    b.build()
}

#[test]
fn random_plans_match_synchronous() {
    let pools: Vec<ThreadPool> = [1, 2, 4].into_iter().map(pool).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let runs = Arc::new(AtomicUsize::new(0));
        let plan = Arc::new(random_plan(&mut rng, &runs));
        let reference = summaries(&run_on(&Synchronous, &plan));
        let ran = runs.swap(0, Ordering::SeqCst);
        for pool in &pools {
            let got = summaries(&run_on(pool, &plan));
            assert_eq!(got, reference, "round {round}, {} threads", pool.threads());
            assert_eq!(runs.swap(0, Ordering::SeqCst), ran, "same tasks ran");
        }
    }
}

/// A pairwise tree reduction in plan (post-)order over `leaves` leaves;
/// returns the plan's root.
fn tree(
    b: &mut PlanBuilder,
    leaves: std::ops::Range<u64>,
    make: &dyn Fn(Kind) -> Arc<dyn Op>,
) -> u32 {
    tree_over(b, leaves, make, &[])
}

/// Like `tree`, with every leaf depending on `leaf_deps`.
fn tree_over(
    b: &mut PlanBuilder,
    leaves: std::ops::Range<u64>,
    make: &dyn Fn(Kind) -> Arc<dyn Op>,
    leaf_deps: &[u32],
) -> u32 {
    if leaves.end - leaves.start == 1 {
        return b.push(
            key(leaves.start),
            make(Kind::Leaf(leaves.start as i64)),
            leaf_deps,
        );
    }
    let mid = leaves.start + (leaves.end - leaves.start) / 2;
    let left = tree_over(b, leaves.start..mid, make, leaf_deps);
    let right = tree_over(b, mid..leaves.end, make, leaf_deps);
    // Keys of inner nodes do not matter to executors; keep them distinct.
    b.push(
        key(u64::MAX - leaves.start - (leaves.end << 32)),
        make(Kind::Add),
        &[left, right],
    )
}

enum Kind {
    Leaf(i64),
    Add,
}

#[test]
fn large_tree_reduction_matches_synchronous() {
    // 999,999 tasks; about 2 s for all four executors in a debug build.
    let leaves: u64 = 500_000;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut b = PlanBuilder::with_capacity(2 * leaves as usize);
    let root = tree(&mut b, 0..leaves, &|kind| match kind {
        Kind::Leaf(v) => sum(v, Fail::No, &runs),
        Kind::Add => sum(0, Fail::No, &runs),
    });
    b.output(root);
    let plan = Arc::new(b.build());
    assert_eq!(plan.len() as u64, 2 * leaves - 1);
    let expected = (leaves * (leaves - 1) / 2) as i64;
    assert_eq!(summaries(&run_on(&Synchronous, &plan)), vec![Ok(expected)]);
    for threads in [1, 2, 4] {
        assert_eq!(
            summaries(&run_on(&pool(threads), &plan)),
            vec![Ok(expected)]
        );
    }
}

/// Counts live values: produced by `Counted` ops, dropped with the value.
#[derive(Default)]
struct Live {
    now: AtomicI64,
    max: AtomicI64,
}

#[derive(serde::Serialize)]
struct CountedValue {
    value: i64,
    /// Bookkeeping only: values must be serializable, the counter need not be.
    #[serde(skip)]
    live: Arc<Live>,
}

impl Drop for CountedValue {
    fn drop(&mut self) {
        self.live.now.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Counted {
    leaf: Option<i64>,
    live: Arc<Live>,
}

impl Op for Counted {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let mut value = self.leaf.unwrap_or(0);
        for input in inputs.iter_mut() {
            let input = input.take().expect("given");
            value += input.downcast_ref::<CountedValue>().expect("counted").value;
        }
        let now = self.live.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.live.max.fetch_max(now, Ordering::SeqCst);
        Ok(Arc::new(CountedValue {
            value,
            live: Arc::clone(&self.live),
        }))
    }

    fn name(&self) -> &str {
        "counted"
    }
}

/// Runs a tree reduction over `leaves` counted leaves, all depending on one
/// shared source when `fan_out`, and returns the peak of live values.
fn peak_live_values(threads: usize, leaves: u64, fan_out: bool) -> i64 {
    let live = Arc::new(Live::default());
    let make = |leaf| -> Arc<dyn Op> {
        Arc::new(Counted {
            leaf,
            live: Arc::clone(&live),
        })
    };
    let mut b = PlanBuilder::with_capacity(2 * leaves as usize + 1);
    let shared: Vec<u32> = match fan_out {
        true => vec![b.push(key(u64::MAX), make(Some(0)), &[])],
        false => vec![],
    };
    let root = tree_over(
        &mut b,
        0..leaves,
        &|kind| match kind {
            Kind::Leaf(v) => make(Some(v)),
            Kind::Add => make(None),
        },
        &shared,
    );
    b.output(root);
    let plan = Arc::new(b.build());
    let got = run_on(&pool(threads), &plan);
    let value = got[0]
        .as_ref()
        .ok()
        .and_then(|v| v.downcast_ref::<CountedValue>());
    assert_eq!(
        value.map(|v| v.value),
        Some((leaves * (leaves - 1) / 2) as i64)
    );
    drop(got);
    assert_eq!(
        live.now.load(Ordering::SeqCst),
        0,
        "every value was dropped"
    );
    live.max.load(Ordering::SeqCst)
}

/// Sleeps 5 ms and notes the pool thread it ran on; returns its number.
struct Noted {
    number: i64,
    threads: Arc<Mutex<std::collections::BTreeSet<usize>>>,
}

impl Op for Noted {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        std::thread::sleep(Duration::from_millis(5));
        let thread = rayon::current_thread_index().unwrap_or(usize::MAX);
        self.threads.lock().unwrap().insert(thread);
        Ok(Arc::new(self.number))
    }
    fn name(&self) -> &str {
        "noted"
    }
}

#[test]
fn slow_sources_side_by_side_spread_over_the_threads() {
    // 4096 sources, of which 64 side by side (64..128) sleep: a puller
    // takes neighbouring sources in chunks, and an idle one steals half of
    // another's (rule 4 of `run.rs`), so both threads run some of the slow
    // ones. A design that hands out runs of consecutive tasks must still
    // split such a run (a blocks design measured in round twenty-eight of
    // `benches/README.md` did, at the end of a run).
    let runs = Arc::default();
    let threads = Arc::default();
    let mut b = PlanBuilder::new();
    let parts: Vec<u32> = (0..4096)
        .map(|i| {
            let op: Arc<dyn Op> = match i {
                64..128 => Arc::new(Noted {
                    number: i,
                    threads: Arc::clone(&threads),
                }),
                _ => sum(i, Fail::No, &runs),
            };
            b.push(key(i as u64), op, &[])
        })
        .collect();
    let total = b.push(key(1 << 20), sum(0, Fail::No, &runs), &parts);
    b.output(total);
    let plan = Arc::new(b.build());
    let expected = summaries(&run_on(&Synchronous, &plan));
    assert_eq!(expected, vec![Ok((0..4096).sum::<i64>())]);
    // A thread the machine keeps from running for the whole 320 ms would
    // leave them all to the other: up to three runs, one must spread.
    let pool = pool(2);
    let mut spread = 0;
    for _ in 0..3 {
        threads.lock().unwrap().clear();
        assert_eq!(summaries(&run_on(&pool, &plan)), expected);
        spread = threads.lock().unwrap().len();
        if spread == 2 {
            break;
        }
    }
    assert_eq!(spread, 2, "ran on both threads");
}

#[test]
fn live_intermediates_stay_bounded() {
    let leaves = 100_000u64;
    let depth = 64 - (leaves - 1).leading_zeros() as i64; // 17
    for fan_out in [false, true] {
        for threads in [1, 2, 4] {
            let max = peak_live_values(threads, leaves, fan_out);
            let bound = 16 * threads as i64 * depth;
            assert!(
                max < bound,
                "{max} live values with {threads} threads (bound {bound})"
            );
            eprintln!(
                "fan-out {fan_out}, {threads} threads: at most {max} live values (depth {depth})"
            );
        }
    }
}

/// Rough per-task overhead, printed, not asserted (figures belong to the
/// benchmark harness). `cargo test -p rask-threaded --release -- --ignored
/// --nocapture overhead`
#[test]
#[ignore = "a measurement; run in release"]
fn overhead_of_a_million_task_tree() {
    use std::time::Instant;
    struct Leaf(i64);
    impl Op for Leaf {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(self.0))
        }
        fn name(&self) -> &str {
            "leaf"
        }
    }
    struct Add;
    impl Op for Add {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            let total: i64 = inputs.iter().map(|v| int(v.as_ref().expect("given"))).sum();
            Ok(Arc::new(total))
        }
        fn name(&self) -> &str {
            "add"
        }
    }
    let leaves = 500_000u64;
    let add: Arc<dyn Op> = Arc::new(Add);
    let mut b = PlanBuilder::with_capacity(2 * leaves as usize);
    let root = tree(&mut b, 0..leaves, &|kind| match kind {
        Kind::Leaf(v) => Arc::new(Leaf(v)),
        Kind::Add => Arc::clone(&add),
    });
    b.output(root);
    let plan = Arc::new(b.build());
    let tasks = plan.len() as f64;
    let expected = vec![Ok((leaves * (leaves - 1) / 2) as i64)];
    let executors: Vec<(String, Box<dyn Executor>)> = vec![
        ("sync".into(), Box::new(Synchronous)),
        ("threads:1".into(), Box::new(pool(1))),
        ("threads:2".into(), Box::new(pool(2))),
        ("threads:4".into(), Box::new(pool(4))),
    ];
    for (name, executor) in &executors {
        let times: Vec<String> = (0..10)
            .map(|_| {
                let start = Instant::now();
                assert_eq!(summaries(&run_on(&**executor, &plan)), expected);
                format!("{:.0}", start.elapsed().as_secs_f64() * 1e9 / tasks)
            })
            .collect();
        eprintln!(
            "{name}: {} ns/task ({tasks} tasks, 10 runs)",
            times.join(" ")
        );
    }
}

/// Speed-up on CPU-bound sources, printed, not asserted:
/// `cargo test -p rask-threaded --release -- --ignored --nocapture slow_sources`
#[test]
#[ignore = "a measurement; run in release"]
fn speedup_on_slow_sources() {
    use std::time::Instant;
    /// Spins for its number of microseconds.
    struct Spin(u64);
    impl Op for Spin {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            let start = Instant::now();
            while start.elapsed() < Duration::from_micros(self.0) {
                std::hint::spin_loop();
            }
            Ok(Arc::new(1i64))
        }
        fn name(&self) -> &str {
            "spin"
        }
    }
    let runs = Arc::default();
    for (label, micros) in [
        ("200 x 5 ms", vec![5000; 200]),
        (
            "uneven",
            (0..200)
                .map(|i| if i < 20 { 20_000 } else { 1000 })
                .collect(),
        ),
        (
            "64 x 5 ms side by side among 4032 of nothing",
            (0..4096)
                .map(|i| if (64..128).contains(&i) { 5000 } else { 0 })
                .collect(),
        ),
    ] {
        let mut b = PlanBuilder::new();
        let parts: Vec<u32> = micros
            .iter()
            .enumerate()
            .map(|(i, &us)| b.push(key(i as u64), Arc::new(Spin(us)), &[]))
            .collect();
        let total = b.push(key(1 << 20), sum(0, Fail::No, &runs), &parts);
        b.output(total);
        let plan = Arc::new(b.build());
        let start = Instant::now();
        run_on(&Synchronous, &plan);
        let sync = start.elapsed().as_secs_f64();
        let pool = pool(2);
        let start = Instant::now();
        run_on(&pool, &plan);
        let threads = start.elapsed().as_secs_f64();
        eprintln!(
            "{label}: sync {sync:.3} s, threads:2 {threads:.3} s, speed-up {:.2}",
            sync / threads
        );
    }
}

/// A user's value whose `Drop` panics, after counting the drop.
struct Boom(Arc<AtomicUsize>);

impl Drop for Boom {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("a Boom was dropped");
    }
}

impl serde::Serialize for Boom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

/// Makes a [`Boom`] counting its drop in `drops`; counts the Booms made.
struct MakeBoom {
    drops: Arc<AtomicUsize>,
    made: Arc<AtomicUsize>,
}

impl Op for MakeBoom {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        self.made.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Boom(self.drops.clone())))
    }

    fn name(&self) -> &str {
        "make_boom"
    }
}

/// A task's error whose `Drop` panics, after counting the drop.
#[derive(Debug)]
struct BoomError(Arc<AtomicUsize>);

impl std::fmt::Display for BoomError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an error that panics when dropped")
    }
}

impl std::error::Error for BoomError {}

impl Drop for BoomError {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("a BoomError was dropped");
    }
}

/// Fails with a [`BoomError`] counting its drop in `.0`.
struct FailsWithBoom(Arc<AtomicUsize>);

impl Op for FailsWithBoom {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        Err(OpError::caused(rask_executor::Cause::new(BoomError(
            self.0.clone(),
        ))))
    }

    fn name(&self) -> &str {
        "fails_with_boom"
    }
}

/// How many of its inputs are Booms; reads them in place, so the executor
/// drops them after it ran.
struct Peek;

impl Op for Peek {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let booms = inputs
            .iter()
            .filter(|i| {
                i.as_ref()
                    .is_some_and(|v| v.downcast_ref::<Boom>().is_some())
            })
            .count();
        Ok(Arc::new(booms as i64))
    }

    fn name(&self) -> &str {
        "peek"
    }
}

/// Booms made and dropped by one plan.
#[derive(Default)]
struct Booms {
    drops: Arc<AtomicUsize>,
    made: Arc<AtomicUsize>,
}

impl Booms {
    fn op(&self) -> Arc<dyn Op> {
        Arc::new(MakeBoom {
            drops: self.drops.clone(),
            made: self.made.clone(),
        })
    }

    /// Every Boom made was dropped, once.
    fn all_dropped(&self) {
        assert_eq!(
            self.drops.load(Ordering::SeqCst),
            self.made.load(Ordering::SeqCst),
            "every value dropped once"
        );
    }
}

/// Set in the child process that runs [`drop_scenarios`].
const DROP_CHILD_ENV: &str = "RASK_THREADED_TEST_DROP_CHILD";

/// Values whose `Drop` panics, dropped by a pool of `threads`: inputs
/// after their task ran (its result stands), inputs of a task skipped for
/// a failed one, a value no task uses, a value stored for a dependent a
/// cancellation stopped, one handed over to such a dependent, and a
/// task's error the run recorded for its dependents. Each is dropped once
/// and the runs end as without the panics.
fn drop_scenarios(threads: usize) {
    let pool = pool(threads);
    let failed = |o: &Outcome| summary(o).unwrap_err().1;

    let booms = Booms::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut b = PlanBuilder::new();
    let used = b.push(key(1), booms.op(), &[]);
    let reads = b.push(key(2), Arc::new(Peek), &[used]);
    let skipped_input = b.push(key(3), booms.op(), &[]);
    let fails = b.push(key(4), sum(4, Fail::Error, &runs), &[]);
    let skipped = b.push(key(5), Arc::new(Peek), &[skipped_input, fails]);
    b.push(key(6), booms.op(), &[]); // no consumer
    b.output(reads);
    b.output(skipped);
    let got = run_on(&pool, &Arc::new(b.build()));
    assert_eq!(summary(&got[0]), Ok(1), "the reader's result stands");
    assert_eq!(failed(&got[1]), FailureKind::Failed);
    drop(got);
    assert_eq!(booms.made.load(Ordering::SeqCst), 3);
    booms.all_dropped();

    // Stored for `reads`, which waits for `late` too; the run stops at the
    // failure before.
    let booms = Booms::default();
    let mut b = PlanBuilder::new();
    let held = b.push(key(1), booms.op(), &[]);
    let fails = b.push(key(2), sum(2, Fail::Error, &runs), &[]);
    let late = b.push(key(3), sum(3, Fail::No, &runs), &[]);
    let reads = b.push(key(4), Arc::new(Peek), &[held, late]);
    b.output(fails);
    b.output(reads);
    let collect = Arc::new(Collect {
        fail_fast: true,
        ..Collect::new(2)
    });
    pool.submit(Arc::new(b.build()), collect.clone());
    let got = collect.wait();
    assert_eq!(failed(&got[0]), FailureKind::Failed);
    assert!(matches!(summary(&got[1]), Ok(1)) || failed(&got[1]) == FailureKind::Cancelled);
    drop(got);
    booms.all_dropped();

    // Handed over to `reads`, its only consumer, as the run is cancelled.
    let booms = Booms::default();
    let mut b = PlanBuilder::new();
    let held = b.push(key(1), booms.op(), &[]);
    let reads = b.push(key(2), Arc::new(Peek), &[held]);
    b.output(reads);
    let collect = Arc::new(Collect {
        cancel_at_runs: Some((booms.made.clone(), 1)),
        ..Collect::new(1)
    });
    pool.submit(Arc::new(b.build()), collect.clone());
    let got = collect.wait();
    assert_eq!(failed(&got[0]), FailureKind::Cancelled);
    drop(got);
    assert_eq!(booms.made.load(Ordering::SeqCst), 1);
    booms.all_dropped();

    // A failure whose error panics when dropped, recorded for the two
    // dependents it skipped (one would take it directly), which no
    // output reports: the run holds its last reference when it ends (the
    // user's error, rule 7).
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut b = PlanBuilder::new();
    let fails = b.push(key(1), Arc::new(FailsWithBoom(dropped.clone())), &[]);
    b.push(key(2), sum(2, Fail::No, &runs), &[fails]);
    b.push(key(4), sum(4, Fail::No, &runs), &[fails]);
    let other = b.push(key(3), sum(3, Fail::No, &runs), &[]);
    b.output(other);
    let got = run_on(&pool, &Arc::new(b.build()));
    assert_eq!(summary(&got[0]), Ok(3));
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "dropped once, by the run"
    );
}

/// Dropping rule 1 of `rask_executor` on pool threads, where a panic
/// aborts the process (rayon's default): the scenarios run in a child
/// process (this test binary, run again), so that an abort fails this
/// test instead of ending the test run.
#[test]
fn values_whose_drop_panics_are_dropped_quietly() {
    if std::env::var_os(DROP_CHILD_ENV).is_some() {
        for threads in [1, 3] {
            drop_scenarios(threads);
        }
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().expect("this test's path"))
        .args([
            "--exact",
            "tests::values_whose_drop_panics_are_dropped_quietly",
            "--test-threads=1",
        ])
        .env(DROP_CHILD_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the child starts");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while child
        .try_wait()
        .expect("the child can be waited for")
        .is_none()
    {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("the child's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the child ended with {}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
