//! A seeded variant of the reference executor: one thread, ready tasks
//! picked in an order drawn from a seed.
//!
//! Rules, on top of those every executor keeps (crate docs):
//!
//! 1. The order depends on the seed and on the plans submitted, in the
//!    order they were submitted, and on nothing else: no clock, no address,
//!    no thread, no hash map. The same program with the same seed runs its
//!    tasks in the same order on any machine.
//! 2. Every choice is one draw of a [`SplitMix64`] generator, scaled to
//!    the number of candidates without a modulo bias worth naming
//!    (`(draw as u128 * n as u128) >> 64`), so the order is the same on
//!    32- and 64-bit targets.
//! 3. A task is ready when every dependency is done (succeeded or failed).
//!    A failed dependency makes the task fail without running, with the
//!    failure of its first failed dependency in dependency order, as
//!    [`Synchronous`](crate::Synchronous) does: the failing keys do not
//!    depend on the seed.
//! 4. Eager ([`Simulated::new`]): `submit` runs the plan to the end before
//!    it returns. Stepped ([`Simulated::stepped`]): `submit` only queues the
//!    plan; each [`step`](Simulated::step) runs one ready task, picked
//!    among the ready tasks of every queued plan. Whoever waits for a
//!    result steps (the `rask` futures client does), so completions arrive
//!    one at a time, in seed order.
//! 5. No lock is held while an op runs or a reporter is called: an op may
//!    submit more work, which joins the queue.

use std::sync::{Arc, Mutex, PoisonError};

use crate::events::{self, Place};
use crate::synchronous::take;
use crate::{
    drop_each_quietly, drop_quietly, run_task, Executor, Failure, Outcome, Plan, Reporter, Stop,
    Value,
};

/// A small, fast, seedable generator (Steele, Lea and Flood's SplitMix64):
/// the only source of choice of [`Simulated`].
///
/// # Examples
///
/// ```
/// use rask_executor::SplitMix64;
/// let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is `0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// Runs plans on the calling thread, picking each next task among the
/// ready ones in an order drawn from a seed: the order a thread pool or a
/// cluster might have chosen, replayable exactly.
///
/// `RASK_SCHEDULER=sim:SEED` selects it in `rask`. Outputs and failures are
/// those of [`Synchronous`](crate::Synchronous) unless an op depends on the
/// order tasks run in, which is what it is for: a seed that breaks such an
/// op breaks it every time.
///
/// # Examples
///
/// ```
/// use rask_executor::{Executor, Key, Op, OpError, Outcome, PlanBuilder, Reporter, Simulated, Value};
/// use std::sync::{Arc, Mutex};
///
/// /// Records the order it runs in.
/// struct Mark(i64, Arc<Mutex<Vec<i64>>>);
/// impl Op for Mark {
///     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
///         self.1.lock().unwrap().push(self.0);
///         Ok(Arc::new(self.0))
///     }
///     fn name(&self) -> &str { "mark" }
/// }
/// struct Ignore;
/// impl Reporter for Ignore { fn output(&self, _: usize, _: Outcome) {} }
///
/// let order = |seed| {
///     let log = Arc::new(Mutex::new(Vec::new()));
///     let mut b = PlanBuilder::new();
///     for i in 0..8 {
///         let t = b.push(Key([i as u8; 32]), Arc::new(Mark(i, log.clone())), &[]);
///         b.output(t);
///     }
///     Simulated::new(seed).submit(Arc::new(b.build()), Arc::new(Ignore));
///     let order = log.lock().unwrap().clone();
///     order
/// };
/// assert_eq!(order(1), order(1));       // a seed replays its order
/// assert_ne!(order(1), order(2));       // another seed, another order
/// ```
#[derive(Debug)]
pub struct Simulated {
    seed: u64,
    eager: bool,
    world: Mutex<World>,
}

impl Simulated {
    /// Eager: `submit` runs the plan to the end before it returns (rule 4).
    pub fn new(seed: u64) -> Simulated {
        Simulated::with_mode(seed, true)
    }

    /// Stepped: `submit` queues the plan, [`step`](Simulated::step) runs
    /// one task (rule 4).
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_executor::{Executor, Key, Op, OpError, Outcome, PlanBuilder, Reporter, Simulated, Value};
    /// use std::sync::{Arc, Mutex};
    ///
    /// struct One;
    /// impl Op for One {
    ///     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> { Ok(Arc::new(1_i64)) }
    ///     fn name(&self) -> &str { "one" }
    /// }
    /// struct Count(Mutex<usize>);
    /// impl Reporter for Count { fn output(&self, _: usize, _: Outcome) { *self.0.lock().unwrap() += 1; } }
    ///
    /// let sim = Simulated::stepped(3);
    /// let mut b = PlanBuilder::new();
    /// let t = b.push(Key([1; 32]), Arc::new(One), &[]);
    /// b.output(t);
    /// let count = Arc::new(Count(Mutex::new(0)));
    /// sim.submit(Arc::new(b.build()), count.clone());
    /// assert_eq!(*count.0.lock().unwrap(), 0);   // queued, not run
    /// assert!(sim.step());
    /// assert_eq!(*count.0.lock().unwrap(), 1);
    /// assert!(!sim.step());                      // nothing left
    /// ```
    pub fn stepped(seed: u64) -> Simulated {
        Simulated::with_mode(seed, false)
    }

    fn with_mode(seed: u64, eager: bool) -> Simulated {
        Simulated {
            seed,
            eager,
            world: Mutex::new(World {
                rng: SplitMix64::new(seed),
                runs: Vec::new(),
                next_id: 0,
            }),
        }
    }

    /// The seed this executor draws its order from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether `submit` runs plans to the end ([`Simulated::new`]).
    pub fn is_eager(&self) -> bool {
        self.eager
    }

    /// Whether no queued plan is left.
    pub fn is_idle(&self) -> bool {
        self.lock().runs.is_empty()
    }

    /// A number in `0..n` drawn from this executor's generator: for callers
    /// that pick among things the executor finished (the `rask` client picks
    /// among completed futures with it), so that their choices replay too.
    pub fn choose(&self, n: usize) -> usize {
        self.lock().rng.below(n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one ready task of the queued plans, picked by the seed, and
    /// reports what it completed; returns `false` when nothing was left
    /// to run.
    pub fn step(&self) -> bool {
        let picked = {
            let mut world = self.lock();
            world.pick()
        };
        match picked {
            Picked::Idle => false,
            Picked::Cancelled(run) => {
                finish_cancelled(run);
                true
            }
            Picked::Task(step) => {
                let (run_id, task) = (step.run_id, step.task);
                let outcome = step.run();
                let mut world = self.lock();
                let finished = world.complete(run_id, task, outcome);
                drop(world);
                deliver(finished);
                true
            }
        }
    }

    /// Steps until no queued plan is left.
    pub fn run_all(&self) {
        while self.step() {}
    }
}

impl Executor for Simulated {
    fn submit(&self, plan: Arc<Plan>, reporter: Arc<dyn Reporter>) {
        if events::listening() {
            events::queued(&plan);
        }
        let stop = {
            let reporter = reporter.clone();
            Stop::when(move || reporter.cancelled())
        };
        let empty = plan.is_empty();
        let run = RunState::new(plan, reporter, stop);
        if empty {
            // Nothing will ever be ready: report the end now (rule 4 of
            // the crate: `finished` even for a plan of no task).
            run.reporter.finished();
            return;
        }
        {
            let mut world = self.lock();
            world.next_id += 1;
            let id = world.next_id;
            world.runs.push((id, run));
        }
        if self.eager {
            // A task of this plan may submit more to this same executor;
            // that joins the queue and runs here too.
            self.run_all();
        }
    }
}

#[derive(Debug)]
struct World {
    rng: SplitMix64,
    runs: Vec<(u64, RunState)>,
    next_id: u64,
}

/// One queued plan being run.
struct RunState {
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    stop: Stop,
    slots: Vec<Option<Outcome>>,
    /// Uses of each task's outcome not yet taken (plan rule 3).
    remaining: Vec<u32>,
    /// Dependencies of each task not yet done.
    waiting: Vec<u32>,
    /// Tasks whose dependencies are all done, in a deterministic order.
    ready: Vec<u32>,
    /// Tasks not yet done.
    left: usize,
    /// Tasks taken out to run and not completed yet: a cancelled run
    /// ends only once none is (another step may come meanwhile, from a
    /// task that steps this executor, or from another thread).
    running: u32,
}

impl std::fmt::Debug for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunState")
            .field("tasks", &self.plan.len())
            .field("left", &self.left)
            .finish()
    }
}

/// A run that ends holds the values nobody took: those of tasks whose
/// consumers a cancellation stopped, or that have none. They go quietly
/// (dropping rule 1).
impl Drop for RunState {
    fn drop(&mut self) {
        for (task, slot) in self.slots.iter_mut().enumerate() {
            if let Some(Ok(value)) = slot.take() {
                drop_quietly(
                    value,
                    format_args!("the value of task {}", self.plan.label(task as u32)),
                );
            }
        }
    }
}

impl RunState {
    fn new(plan: Arc<Plan>, reporter: Arc<dyn Reporter>, stop: Stop) -> RunState {
        let n = plan.len();
        let waiting: Vec<u32> = (0..n as u32).map(|i| plan.deps(i).len() as u32).collect();
        let ready = (0..n as u32)
            .filter(|&i| waiting[i as usize] == 0)
            .collect();
        RunState {
            remaining: (0..n as u32).map(|i| plan.consumers(i)).collect(),
            slots: vec![None; n],
            waiting,
            ready,
            left: n,
            running: 0,
            plan,
            reporter,
            stop,
        }
    }
}

/// One task taken out of its run, with its inputs, to run without a lock.
struct Step {
    run_id: u64,
    task: u32,
    plan: Arc<Plan>,
    stop: Stop,
    /// The values of its inputs that succeeded (all of them unless
    /// `failed`): dropped, quietly, once it ran or was skipped (dropping
    /// rule 1), outside the lock.
    inputs: Vec<Option<Value>>,
    /// The failure of its first failed input: it is skipped.
    failed: Option<Arc<Failure>>,
}

impl Step {
    fn run(self) -> Outcome {
        let (plan, task, mut inputs) = (&*self.plan, self.task, self.inputs);
        let outcome = match self.failed {
            Some(failure) => {
                events::skipped(plan, task, &failure);
                Err(failure)
            }
            None => self.stop.enter(|| {
                events::observe(
                    plan,
                    task,
                    || Place::local(0),
                    || run_task(plan, task, &mut inputs),
                )
            }),
        };
        // Dropping rule 1: what an op read in place, or a skipped task
        // took, goes here.
        drop_each_quietly(
            inputs,
            format_args!("an input of task {}", plan.label(task)),
        );
        outcome
    }
}

enum Picked {
    Idle,
    Cancelled(RunState),
    Task(Step),
}

/// How a run ended, if it did with a task.
enum End {
    /// Its last task completed.
    Done(RunState),
    /// It was cancelled, and its last running task completed.
    Cancelled(RunState),
}

/// Outputs to report and, when the run ended, how.
type Delivery = (Arc<dyn Reporter>, Vec<(usize, Outcome)>, Option<End>);

impl World {
    fn pick(&mut self) -> Picked {
        // A cancelled run stops before its next task (crate rule 5), and
        // ends once no task of it runs. Asked once per run here: the
        // answer may change meanwhile.
        let cancelled: Vec<bool> = self
            .runs
            .iter()
            .map(|(_, r)| r.reporter.cancelled())
            .collect();
        if let Some(at) =
            (0..self.runs.len()).find(|&i| cancelled[i] && self.runs[i].1.running == 0)
        {
            return Picked::Cancelled(self.runs.remove(at).1);
        }
        let ready = |i: usize, r: &RunState| if cancelled[i] { 0 } else { r.ready.len() };
        let total: usize = self
            .runs
            .iter()
            .enumerate()
            .map(|(i, (_, r))| ready(i, r))
            .sum();
        if total == 0 {
            return Picked::Idle;
        }
        let mut at = self.rng.below(total);
        let (run_id, run) = self
            .runs
            .iter_mut()
            .enumerate()
            .find_map(|(i, (id, r))| {
                let n = ready(i, r);
                if at < n {
                    Some((*id, r))
                } else {
                    at -= n;
                    None
                }
            })
            .expect("`at` is below the total of ready tasks");
        run.running += 1;
        let task = run.ready.swap_remove(at);
        let mut failed = None;
        let mut inputs = Vec::with_capacity(run.plan.deps(task).len());
        for &d in run.plan.deps(task) {
            match take(&mut run.slots, &mut run.remaining, d) {
                Ok(v) => inputs.push(Some(v)),
                Err(f) => {
                    failed.get_or_insert(f);
                }
            }
        }
        Picked::Task(Step {
            run_id,
            task,
            plan: run.plan.clone(),
            stop: run.stop.clone(),
            inputs,
            failed,
        })
    }

    fn complete(&mut self, run_id: u64, task: u32, outcome: Outcome) -> Delivery {
        let at = self
            .runs
            .iter()
            .position(|(id, _)| *id == run_id)
            .expect("a run stays queued while one of its tasks runs");
        let run = &mut self.runs[at].1;
        run.slots[task as usize] = Some(outcome);
        run.left -= 1;
        run.running -= 1;
        for &d in run.plan.dependents(task) {
            let w = &mut run.waiting[d as usize];
            *w -= 1;
            if *w == 0 {
                run.ready.push(d);
            }
        }
        let plan = run.plan.clone();
        let outputs = plan
            .output_slots_of(task)
            .map(|slot| (slot, take(&mut run.slots, &mut run.remaining, task)))
            .collect();
        let reporter = run.reporter.clone();
        let ended = if run.left == 0 {
            Some(End::Done(self.runs.remove(at).1))
        } else if run.running == 0 && run.reporter.cancelled() {
            Some(End::Cancelled(self.runs.remove(at).1))
        } else {
            None
        };
        (reporter, outputs, ended)
    }
}

/// Reports outputs and the end of a run, with no lock held (rule 5).
fn deliver((reporter, outputs, ended): Delivery) {
    for (slot, outcome) in outputs {
        reporter.output(slot, outcome);
    }
    match ended {
        Some(End::Done(run)) => {
            let reporter = run.reporter.clone();
            drop(run);
            reporter.finished();
        }
        Some(End::Cancelled(run)) => finish_cancelled(run),
        None => {}
    }
}

/// Reports every output a cancelled run did not report yet.
fn finish_cancelled(run: RunState) {
    let reporter = run.reporter.clone();
    let unreported: Vec<usize> = run
        .plan
        .outputs()
        .iter()
        .enumerate()
        // A completed task reported its outputs when it completed.
        .filter(|(_, &t)| !run.completed(t))
        .map(|(slot, _)| slot)
        .collect();
    let failures: Vec<(usize, Arc<Failure>)> = unreported
        .into_iter()
        .map(|slot| (slot, run.plan.cancelled_output(slot)))
        .collect();
    drop(run);
    for (slot, failure) in failures {
        reporter.output(slot, Err(failure));
    }
    reporter.finished();
}

impl RunState {
    /// Whether task `t` ran (or failed without running).
    fn completed(&self, t: u32) -> bool {
        // A task completed once its slot was filled; a filled slot may have
        // been emptied since by its last consumer, but then `remaining`
        // fell below the task's consumer count.
        self.slots[t as usize].is_some() || self.remaining[t as usize] < self.plan.consumers(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FailureKind, Key, Op, OpError, PlanBuilder, Synchronous};

    /// Adds its inputs and a constant, logging its constant; fails when asked to.
    struct Sum {
        constant: i64,
        fail: bool,
        log: Arc<Mutex<Vec<i64>>>,
    }
    impl Op for Sum {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            self.log.lock().unwrap().push(self.constant);
            if self.fail {
                panic!("boom");
            }
            let mut total = self.constant;
            for v in inputs.iter_mut() {
                total += v.take().unwrap().downcast_ref::<i64>().unwrap();
            }
            Ok(Arc::new(total))
        }
        fn name(&self) -> &str {
            "sum"
        }
    }

    /// Output index and its value, or its failure's kind and key.
    type Reported = (usize, Result<i64, (FailureKind, Key)>);

    #[derive(Default)]
    struct Log(Mutex<Vec<Reported>>, Mutex<bool>);
    impl Reporter for Log {
        fn output(&self, index: usize, outcome: Outcome) {
            let o = outcome
                .map(|v| *v.downcast_ref::<i64>().unwrap())
                .map_err(|f| (f.kind, f.key));
            self.0.lock().unwrap().push((index, o));
        }
        fn finished(&self) {
            *self.1.lock().unwrap() = true;
        }
    }

    /// A layered random-ish plan: 40 tasks, each on up to two earlier ones;
    /// task 13 panics when `fail`.
    fn plan(log: &Arc<Mutex<Vec<i64>>>, fail: bool) -> Plan {
        let mut b = PlanBuilder::new();
        let mut rng = SplitMix64::new(99);
        for i in 0..40u32 {
            let deps: Vec<u32> = if i < 5 {
                vec![]
            } else {
                vec![rng.below(i as usize) as u32, rng.below(i as usize) as u32]
            };
            let op = Arc::new(Sum {
                constant: i as i64,
                fail: fail && i == 13,
                log: log.clone(),
            });
            let t = b.push(Key([i as u8; 32]), op, &deps);
            if i % 3 == 0 {
                b.output(t);
            }
        }
        b.build()
    }

    /// The outputs by index and the order the tasks ran in.
    fn run(executor: &dyn Executor, fail: bool) -> (Vec<Reported>, Vec<i64>) {
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Log::default());
        executor.submit(Arc::new(plan(&order, fail)), log.clone());
        assert!(*log.1.lock().unwrap(), "finished is reported");
        let mut outputs = log.0.lock().unwrap().clone();
        outputs.sort_by_key(|(i, _)| *i);
        let order = order.lock().unwrap().clone();
        (outputs, order)
    }

    #[test]
    fn agrees_with_synchronous_and_replays_its_order() {
        for fail in [false, true] {
            let (reference, _) = run(&Synchronous, fail);
            let mut orders = std::collections::BTreeSet::new();
            for seed in 0..20 {
                let (outputs, order) = run(&Simulated::new(seed), fail);
                assert_eq!(outputs, reference, "seed {seed}");
                assert_eq!(
                    run(&Simulated::new(seed), fail).1,
                    order,
                    "seed {seed} replays"
                );
                orders.insert(order);
            }
            assert!(orders.len() > 15, "seeds explore orders: {}", orders.len());
        }
    }

    /// Dropping rule 1, in the orders of several seeds.
    #[test]
    fn a_value_whose_drop_panics_is_dropped_quietly() {
        for seed in 0..8 {
            crate::dropping::scenarios::dropped_quietly(&Simulated::new(seed));
        }
    }

    #[test]
    fn stepped_interleaves_queued_plans_and_stops_cancelled_ones() {
        struct Cancel(Log, std::sync::atomic::AtomicBool);
        impl Reporter for Cancel {
            fn output(&self, i: usize, o: Outcome) {
                self.0.output(i, o)
            }
            fn cancelled(&self) -> bool {
                self.1.load(std::sync::atomic::Ordering::Relaxed)
            }
            fn finished(&self) {
                self.0.finished()
            }
        }
        let sim = Simulated::stepped(5);
        let order = Arc::new(Mutex::new(Vec::new()));
        let a = Arc::new(Cancel(Log::default(), false.into()));
        let b = Arc::new(Log::default());
        sim.submit(Arc::new(plan(&order, false)), a.clone());
        sim.submit(Arc::new(plan(&order, false)), b.clone());
        for _ in 0..10 {
            assert!(sim.step());
        }
        a.1.store(true, std::sync::atomic::Ordering::Relaxed);
        sim.run_all();
        assert!(sim.is_idle());
        assert!(*a.0 .1.lock().unwrap() && *b.1.lock().unwrap());
        let a_out = a.0 .0.lock().unwrap();
        assert_eq!(a_out.len(), 14, "every output reported once");
        assert!(a_out
            .iter()
            .any(|(_, o)| matches!(o, Err((FailureKind::Cancelled, _)))));
        assert_eq!(b.0.lock().unwrap().len(), 14);
        assert!(
            order.lock().unwrap().len() < 80,
            "the cancelled plan stopped early"
        );
    }

    /// A run cancelled while one of its tasks runs, and stepped meanwhile
    /// (the task submits to this very executor, which runs eagerly), ends
    /// once that task completed: each output reported once, `finished`
    /// last. Before, the nested step ended the run at once, and the task's
    /// completion found no run and panicked.
    #[test]
    fn a_run_cancelled_while_its_task_runs_ends_after_that_task() {
        use std::sync::atomic::{AtomicBool, Ordering};

        struct Logged {
            failed: AtomicBool,
            log: Mutex<Vec<String>>,
        }
        impl Reporter for Logged {
            fn output(&self, slot: usize, outcome: Outcome) {
                if outcome.is_err() {
                    self.failed.store(true, Ordering::Relaxed);
                }
                self.log.lock().unwrap().push(format!("output {slot}"));
            }
            // As `compute`'s reporter: a failed output cancels the run.
            fn cancelled(&self) -> bool {
                self.failed.load(Ordering::Relaxed)
            }
            fn finished(&self) {
                self.log.lock().unwrap().push("finished".into());
            }
        }
        struct Quiet;
        impl Reporter for Quiet {
            fn output(&self, _: usize, _: Outcome) {}
        }
        struct Leaf;
        impl Op for Leaf {
            fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
                Ok(Arc::new(1i64))
            }
            fn name(&self) -> &str {
                "leaf"
            }
        }
        /// Submits a plan of its own to the executor that runs it.
        struct Nested(Arc<Logged>, Arc<Simulated>);
        impl Op for Nested {
            fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
                let mut b = PlanBuilder::new();
                let t = b.push(Key([9; 32]), Arc::new(Leaf), &[]);
                b.output(t);
                self.1.submit(Arc::new(b.build()), Arc::new(Quiet));
                self.0.log.lock().unwrap().push("nested returns".into());
                Ok(Arc::new(2i64))
            }
            fn name(&self) -> &str {
                "nested"
            }
        }
        struct Fails;
        impl Op for Fails {
            fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
                Err(OpError::failed("no"))
            }
            fn name(&self) -> &str {
                "fails"
            }
        }
        for seed in 0..16 {
            let sim = Arc::new(Simulated::new(seed));
            let logged = Arc::new(Logged {
                failed: AtomicBool::new(false),
                log: Mutex::new(Vec::new()),
            });
            let mut b = PlanBuilder::new();
            let n = b.push(
                Key([1; 32]),
                Arc::new(Nested(logged.clone(), sim.clone())),
                &[],
            );
            let f = b.push(Key([2; 32]), Arc::new(Fails), &[]);
            b.output(n);
            b.output(f);
            sim.submit(Arc::new(b.build()), logged.clone());
            let log = logged.log.lock().unwrap().clone();
            for slot in ["output 0", "output 1"] {
                assert_eq!(
                    log.iter().filter(|l| *l == slot).count(),
                    1,
                    "seed {seed}: {log:?}"
                );
            }
            assert_eq!(
                log.last().map(String::as_str),
                Some("finished"),
                "seed {seed}: {log:?}"
            );
            assert_eq!(
                log.iter().filter(|l| *l == "finished").count(),
                1,
                "seed {seed}: {log:?}"
            );
        }
    }
}
