//! One submission: its per-task state and the loop that runs it.
//!
//! Rules, on top of the executor rules of `rask_executor`:
//!
//! 1. `pending[i]` counts the dependency edges of task `i` not yet resolved
//!    (succeeded or failed). The thread that resolves the last one owns task
//!    `i` from then on: it runs it inline or spawns exactly one job for it.
//! 2. A task's value is stored in its slot *before* its dependents are
//!    released, together with the number of dependent edges still to take it;
//!    the edge that takes it last moves it out (executor rule 6). A failure is
//!    stored in the run's failure table instead: an empty slot of a resolved
//!    task means it failed. A task whose only consumer is the dependent it
//!    releases last hands its outcome over directly and never touches either.
//! 3. Sources (tasks without dependencies) are not spawned up front: pullers,
//!    at most one per pool thread, start them in plan order, and run each to
//!    the end of its chain before starting the next. Live intermediates
//!    therefore stay near `threads × depth` for a tree, and a million-leaf
//!    plan holds no million queued jobs.
//! 4. Each puller owns a range of source positions. It refills the range from
//!    a shared cursor in growing chunks (so neighbouring sources, whose
//!    results meet soon, mostly run on the same thread); once the cursor is
//!    exhausted, an idle puller steals the upper half of another's range, so
//!    a chunk of slow sources does not end up on one thread. Positions only
//!    move forward or change owner, so a packed `(lo, hi)` pair never repeats
//!    and compare-and-swap on it has no ABA problem.
//! 5. `active` counts the live jobs of the run (pullers, chain and batch
//!    jobs); a job is counted before it is spawned. The job that brings it to zero
//!    reports the outputs that were never reached (a cancelled run) and then
//!    calls `Reporter::finished`, so `finished` comes after every output.
//! 6. Every task is resolved on a worker of the pool that runs the run, so
//!    `rayon::spawn` and `rayon::yield_local` always mean that pool; or,
//!    for a run started inline ([`start_inline`]), every task on the thread
//!    that started it, which queues its jobs itself (`yield_local` finds
//!    nothing there, off the pool).
//! 7. Every value the run lets go goes through `rask_executor::drop_quietly`
//!    (its dropping rules), never out of scope on a pool thread, where a
//!    panic in its `Drop` would abort the process: a task's inputs after
//!    it ran or was skipped, a value without consumers, one handed over to
//!    a task a cancellation stopped, and those still stored when the run
//!    ends, with the failures it recorded (a task's error is a user's
//!    value too). The plan, let go when the run ends, drops its ops (and
//!    the literal arguments they hold, of which it may hold the last
//!    reference: a client's graph) quietly itself (plan invariant 6).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rask_executor::events::{self, Place};
use rask_executor::{
    drop_each_quietly, drop_quietly, run_task, Failure, Outcome, Plan, Reporter, Stop, Value,
};

/// This thread's place in events: its index in the pool (`0` off the pool,
/// which runs only on a pool of one thread run inline).
fn thread_place() -> Place {
    Place::local(rayon::current_thread_index().map_or(0, |i| i as u32))
}

/// How a run puts jobs on the pool: detached (`rayon::spawn`, for a submit
/// from outside the pool) or inside a scope (a nested submit from one of the
/// pool's own workers, which waits for the scope and helps while waiting).
pub(crate) trait Spawner: Sized {
    /// Queues `job` on the current worker's deque, where other workers can
    /// steal it.
    fn spawn_job(&self, job: Job);
}

/// Spawns `'static` jobs with `rayon::spawn`; the run ends when `active`
/// reaches zero, whoever gets there.
pub(crate) struct Detached;

impl Spawner for Detached {
    fn spawn_job(&self, job: Job) {
        rayon::spawn(move || job.run(&Detached));
    }
}

/// Queues jobs on the thread that started the run, which runs them last
/// in, first out, as a worker pops its deque (rule 6).
struct Inline(std::cell::RefCell<Vec<Job>>);

impl Spawner for Inline {
    fn spawn_job(&self, job: Job) {
        self.0.borrow_mut().push(job);
    }
}

/// Runs `plan` on this thread alone, off the pool (rule 6), and returns once
/// it finished: a nested submit from a timed attempt's thread, whose
/// worker waits for it and runs nothing meanwhile.
pub(crate) fn start_inline(plan: Arc<Plan>, reporter: Arc<dyn Reporter>) {
    let inline = Inline(std::cell::RefCell::default());
    start(&inline, plan, reporter, 1);
    loop {
        let next = inline.0.borrow_mut().pop();
        match next {
            Some(job) => job.run(&inline),
            None => break,
        }
    }
}

impl Spawner for rayon::Scope<'_> {
    fn spawn_job(&self, job: Job) {
        self.spawn(move |scope| job.run(scope));
    }
}

/// Work queued on the pool for one run.
pub(crate) enum Job {
    /// Puller number `.1`: starts sources until none is left (rule 3).
    Puller(Arc<Run>, usize),
    /// Runs one ready task, then the chain of tasks it makes ready.
    Chain(Arc<Run>, u32),
    /// Runs ready tasks `.1[.2]`, lowest first, after spawning the upper
    /// half of the range (recursively), so a task with a million ready
    /// dependents queues a list of indices and `log` jobs, not a million.
    Batch(Arc<Run>, Arc<[u32]>, Range<usize>),
}

impl Job {
    fn run<S: Spawner>(self, spawner: &S) {
        // Tasks see the run's cancellation (`rask_executor::cancelled`);
        // installed once per job, which runs many tasks.
        let stop = match &self {
            Job::Puller(run, _) | Job::Chain(run, _) | Job::Batch(run, ..) => run.stop.clone(),
        };
        stop.enter(|| self.run_here(spawner));
    }

    fn run_here<S: Spawner>(self, spawner: &S) {
        match self {
            Job::Puller(run, me) => run.pull(me, spawner),
            Job::Chain(run, task) => {
                let mut scratch = Scratch::default();
                run.chain(task, None, spawner, &mut scratch);
                run.job_ended();
            }
            Job::Batch(run, tasks, mut range) => {
                while range.len() > 1 {
                    let mid = range.start + range.len() / 2;
                    run.active.fetch_add(1, Ordering::Relaxed);
                    let upper = Job::Batch(Arc::clone(&run), Arc::clone(&tasks), mid..range.end);
                    spawner.spawn_job(upper);
                    range.end = mid;
                }
                let mut scratch = Scratch::default();
                run.chain(tasks[range.start], None, spawner, &mut scratch);
                run.job_ended();
            }
        }
    }
}

/// Starts running `plan` from the current worker: builds the run's state,
/// spawns the other pullers and becomes the first one.
pub(crate) fn start<S: Spawner>(
    spawner: &S,
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    threads: usize,
) {
    if events::listening() {
        events::queued(&plan);
    }
    let run = Arc::new(Run::new(plan, reporter, threads));
    if run.sources.is_empty() {
        // No source means no task at all (task 0 never has dependencies).
        run.finish();
        return;
    }
    let pullers = run.ranges.len();
    run.active.store(pullers, Ordering::Relaxed);
    for me in 1..pullers {
        spawner.spawn_job(Job::Puller(Arc::clone(&run), me));
    }
    let stop = run.stop.clone();
    stop.enter(|| run.pull(0, spawner));
}

/// The first chunk of sources a puller takes from the cursor; each refill
/// doubles it up to `MAX_CHUNK`. Small plans keep close to plan order, large
/// ones touch the shared cursor rarely.
const FIRST_CHUNK: u32 = 4;
const MAX_CHUNK: u32 = 1024;

/// The state of one submitted plan.
pub(crate) struct Run {
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    tasks: Box<[TaskState]>,
    /// Tasks without dependencies, in plan order.
    sources: Box<[u32]>,
    /// Position in `sources` of the first source no puller owns yet.
    cursor: AtomicUsize,
    /// The source positions each puller owns (rule 4).
    ranges: Box<[Owned]>,
    /// Failures of tasks with dependents (rule 2); rare, so one lock.
    failures: Mutex<HashMap<u32, Arc<Failure>>>,
    /// Whether each output slot was reported.
    reported: Box<[AtomicBool]>,
    /// Live jobs of this run (rule 5).
    active: AtomicUsize,
    /// Sticky copy of `reporter.cancelled()`.
    cancelled: AtomicBool,
    /// What `rask_executor::cancelled` reads in this run's tasks.
    stop: Stop,
}

/// 32 bytes a task: the whole per-task memory of a run.
struct TaskState {
    /// Unresolved dependency edges (rule 1).
    pending: AtomicU32,
    /// Dependent edges that have not taken the value yet; only changed
    /// while `value` is locked (an atomic to stay outside the lock's
    /// padding).
    remaining: AtomicU32,
    /// The value, while dependents still have to take it (rule 2).
    value: Mutex<Option<Value>>,
}

/// Source positions `lo..hi` packed as `lo << 32 | hi` (rule 4), on its own
/// cache line: the owner updates it for every source it starts.
#[repr(align(128))]
struct Owned(AtomicU64);

fn pack(lo: usize, hi: usize) -> u64 {
    ((lo as u64) << 32) | hi as u64
}

fn unpack(range: u64) -> (usize, usize) {
    (
        (range >> 32) as usize,
        (range & u64::from(u32::MAX)) as usize,
    )
}

/// Per-job buffers, reused from task to task.
#[derive(Default)]
struct Scratch {
    inputs: Vec<Option<Value>>,
    ready: Vec<u32>,
    /// Whether a job was spawned since the puller last drained its deque.
    spawned: bool,
}

impl Run {
    fn new(plan: Arc<Plan>, reporter: Arc<dyn Reporter>, threads: usize) -> Run {
        let n = plan.len() as u32;
        let tasks = (0..n)
            .map(|i| TaskState {
                pending: AtomicU32::new(plan.deps(i).len() as u32),
                remaining: AtomicU32::new(0),
                value: Mutex::new(None),
            })
            .collect();
        let sources: Box<[u32]> = (0..n).filter(|&i| plan.deps(i).is_empty()).collect();
        let pullers = threads.min(sources.len()).max(1);
        let ranges = (0..pullers).map(|_| Owned(AtomicU64::new(0))).collect();
        let reported = plan
            .outputs()
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        let stop = {
            let reporter = reporter.clone();
            Stop::when(move || reporter.cancelled())
        };
        Run {
            plan,
            reporter,
            stop,
            tasks,
            sources,
            cursor: AtomicUsize::new(0),
            ranges,
            failures: Mutex::new(HashMap::new()),
            reported,
            active: AtomicUsize::new(0),
            cancelled: AtomicBool::new(false),
        }
    }

    /// Rule 5 of the executor contract: polled before every task.
    fn is_cancelled(&self) -> bool {
        if self.cancelled.load(Ordering::Relaxed) {
            return true;
        }
        let cancelled = self.reporter.cancelled();
        if cancelled {
            self.cancelled.store(true, Ordering::Relaxed);
        }
        cancelled
    }

    /// The next source for puller `me`, from its own range, a new chunk or
    /// another puller's range (rule 4).
    fn next_source(&self, me: usize, chunk: &mut u32) -> Option<u32> {
        let own = &self.ranges[me].0;
        loop {
            let mut range = own.load(Ordering::Acquire);
            loop {
                let (lo, hi) = unpack(range);
                if lo >= hi {
                    break;
                }
                let next = pack(lo + 1, hi);
                match own.compare_exchange_weak(range, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some(self.sources[lo]),
                    Err(now) => range = now,
                }
            }
            // Our range is empty and stays so (thieves only shrink non-empty
            // ranges), so a plain store may refill it.
            let (lo, hi) = self.claim(me, chunk)?;
            own.store(pack(lo, hi), Ordering::Release);
        }
    }

    /// A new range for puller `me`: a chunk from the cursor, else the upper
    /// half of another puller's range; `None` when every source is owned.
    fn claim(&self, me: usize, chunk: &mut u32) -> Option<(usize, usize)> {
        let len = self.sources.len();
        if self.cursor.load(Ordering::Relaxed) < len {
            let at = self.cursor.fetch_add(*chunk as usize, Ordering::Relaxed);
            if at < len {
                let end = len.min(at + *chunk as usize);
                *chunk = MAX_CHUNK.min(*chunk * 2);
                return Some((at, end));
            }
        }
        let pullers = self.ranges.len();
        for k in 1..pullers {
            let victim = &self.ranges[(me + k) % pullers].0;
            let mut range = victim.load(Ordering::Acquire);
            loop {
                let (lo, hi) = unpack(range);
                if lo >= hi {
                    break;
                }
                // Take the upper half, or the last one: the owner keeps the
                // sources that come first in plan order.
                let mid = lo + (hi - lo) / 2;
                let left = pack(lo, mid);
                match victim.compare_exchange_weak(range, left, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return Some((mid, hi)),
                    Err(now) => range = now,
                }
            }
        }
        None
    }

    /// The puller loop (rule 3).
    fn pull<S: Spawner>(self: &Arc<Self>, me: usize, spawner: &S) {
        let mut scratch = Scratch::default();
        let mut chunk = FIRST_CHUNK;
        while let Some(source) = self.next_source(me, &mut chunk) {
            self.chain(source, None, spawner, &mut scratch);
            if self.cancelled.load(Ordering::Relaxed) {
                break;
            }
            if std::mem::take(&mut scratch.spawned) {
                // The chain spawned tasks it could not run inline; they sit
                // on top of this worker's deque. Run them (depth-first)
                // before opening a new branch, unless another worker stole
                // them already. The jobs run here are chain jobs, which never
                // drain, so this does not recurse further.
                while let Some(rayon::Yield::Executed) = rayon::yield_local() {}
            }
        }
        self.job_ended();
    }

    /// Runs `task` and then, inline, the lowest-index task each step makes
    /// ready, until a step makes none ready.
    fn chain<S: Spawner>(
        self: &Arc<Self>,
        task: u32,
        handoff: Option<(u32, Outcome)>,
        spawner: &S,
        scratch: &mut Scratch,
    ) {
        let mut next = Some((task, handoff));
        while let Some((task, handoff)) = next {
            if self.is_cancelled() {
                // A value handed over to a task that will not run (rule 7).
                if let Some((from, outcome)) = handoff {
                    drop_value(&self.plan, from, outcome);
                }
                return;
            }
            next = self.step(task, handoff, spawner, scratch);
        }
    }

    /// Resolves one task whose dependencies are all resolved. Returns the
    /// dependent to run next on this thread, with this task's outcome when it
    /// is handed over directly.
    fn step<S: Spawner>(
        self: &Arc<Self>,
        task: u32,
        mut handoff: Option<(u32, Outcome)>,
        spawner: &S,
        scratch: &mut Scratch,
    ) -> Option<(u32, Option<(u32, Outcome)>)> {
        let plan = &*self.plan;
        let dependents = plan.dependents(task);
        // The first dependent's state is read when this task resolves, and
        // its op when it runs, mostly next on this thread: both loads start
        // now, while this task runs, rather than stall then.
        if let Some(&next) = dependents.first() {
            rask_executor::prefetch(&self.tasks[next as usize]);
            rask_executor::prefetch(plan.task(next).op());
        }
        let inputs = &mut scratch.inputs;
        inputs.clear();
        // Like `Synchronous`: every dependency is taken (so its value can be
        // freed), and the first failure in argument order wins (rule 2).
        let mut failed: Option<Arc<Failure>> = None;
        for &dep in plan.deps(task) {
            let outcome = match handoff.take() {
                Some((from, outcome)) if from == dep => outcome,
                other => {
                    handoff = other;
                    self.take(dep)
                }
            };
            match outcome {
                Ok(value) => inputs.push(Some(value)),
                Err(failure) => {
                    failed.get_or_insert(failure);
                }
            }
        }
        debug_assert!(handoff.is_none(), "a handed-over outcome is an input");
        let outcome = match failed {
            Some(failure) => {
                events::skipped(plan, task, &failure);
                Err(failure)
            }
            None => events::observe(plan, task, thread_place, || run_task(plan, task, inputs)),
        };
        // What an op read in place, or a skipped task took (rule 7); an op
        // that took its inputs leaves nothing to catch.
        if inputs.iter().any(Option::is_some) {
            drop_inputs(plan, task, inputs);
        } else {
            inputs.clear();
        }
        self.resolve(task, dependents, outcome, spawner, scratch)
    }

    /// Reports `task`'s outputs, stores its outcome for its `dependents`
    /// (the plan's, which `step` read already) and releases them.
    fn resolve<S: Spawner>(
        self: &Arc<Self>,
        task: u32,
        dependents: &[u32],
        outcome: Outcome,
        spawner: &S,
        scratch: &mut Scratch,
    ) -> Option<(u32, Option<(u32, Outcome)>)> {
        let plan = &*self.plan;
        let consumers = plan.consumers(task);
        let mut outcome = Some(outcome);
        if consumers as usize > dependents.len() {
            // The task fills output slots; the last use moves the outcome.
            let mut slots = plan.output_slots_of(task).peekable();
            while let Some(slot) = slots.next() {
                let report = if dependents.is_empty() && slots.peek().is_none() {
                    outcome.take()
                } else {
                    outcome.clone()
                };
                let report = report.expect("the outcome is moved out by its last use only");
                self.reported[slot].store(true, Ordering::Relaxed);
                self.reporter.output(slot, report);
            }
        }
        let outcome = outcome?;
        match dependents {
            [] => {
                // No consumer at all (rule 7).
                drop_value(plan, task, outcome);
                None
            }
            &[dependent] if consumers == 1 => {
                // One consumer: hand the outcome over when we release the
                // last edge of `dependent` (rule 2).
                if self.tasks[dependent as usize]
                    .pending
                    .load(Ordering::Acquire)
                    == 1
                {
                    return Some((dependent, Some((task, outcome))));
                }
                self.store(task, outcome, 1);
                self.release(dependent).then_some((dependent, None))
            }
            _ => {
                self.store(task, outcome, dependents.len() as u32);
                let mut first = None;
                for &dependent in dependents {
                    if self.release(dependent) {
                        match first {
                            None => first = Some(dependent),
                            Some(_) => scratch.ready.push(dependent),
                        }
                    }
                }
                // `dependents` is in plan order, so is `ready`; a batch runs
                // its lowest index first.
                let job = match scratch.ready[..] {
                    [] => None,
                    [ready] => Some(Job::Chain(Arc::clone(self), ready)),
                    ref ready => {
                        let range = 0..ready.len();
                        Some(Job::Batch(Arc::clone(self), ready.into(), range))
                    }
                };
                if let Some(job) = job {
                    self.active.fetch_add(1, Ordering::Relaxed);
                    spawner.spawn_job(job);
                    scratch.spawned = true;
                }
                scratch.ready.clear();
                first.map(|dependent| (dependent, None))
            }
        }
    }

    fn store(&self, task: u32, outcome: Outcome, remaining: u32) {
        match outcome {
            Ok(value) => {
                let state = &self.tasks[task as usize];
                let mut slot = lock(&state.value);
                debug_assert!(slot.is_none(), "a task resolves at most once");
                state.remaining.store(remaining, Ordering::Relaxed);
                *slot = Some(value);
            }
            Err(failure) => {
                lock(&self.failures).insert(task, failure);
            }
        }
    }

    /// Takes one use of `dep`'s stored outcome; the last use moves it out.
    fn take(&self, dep: u32) -> Outcome {
        let state = &self.tasks[dep as usize];
        let mut slot = lock(&state.value);
        let Some(value) = slot.as_ref() else {
            drop(slot);
            let failure = lock(&self.failures).get(&dep).cloned();
            return Err(failure.expect("a resolved task without a value failed"));
        };
        let remaining = state.remaining.load(Ordering::Relaxed) - 1;
        state.remaining.store(remaining, Ordering::Relaxed);
        if remaining == 0 {
            Ok(slot.take().expect("checked above"))
        } else {
            Ok(Arc::clone(value))
        }
    }

    /// Resolves one dependency edge of `task`; true when it was the last one.
    fn release(&self, task: u32) -> bool {
        let pending = &self.tasks[task as usize].pending;
        // Our edge is still counted, so 1 means it is the only one left and
        // no other thread will touch the counter again: skip the RMW.
        pending.load(Ordering::Acquire) == 1 || pending.fetch_sub(1, Ordering::AcqRel) == 1
    }

    fn job_ended(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    /// Rule 5: reports what was never reached, then `finished`.
    fn finish(&self) {
        for (slot, reported) in self.reported.iter().enumerate() {
            if !reported.load(Ordering::Relaxed) {
                debug_assert!(
                    self.cancelled.load(Ordering::Relaxed),
                    "only a cancelled run leaves outputs unreported"
                );
                self.reporter
                    .output(slot, Err(self.plan.cancelled_output(slot)));
            }
        }
        // `finished` comes from `Drop`, once no job holds the run.
    }
}

impl Drop for Run {
    /// The last job is gone: release the plan and every value the run held,
    /// then tell the reporter (rule 4 of the contract: a caller woken by
    /// `finished` holds the last reference to what the plan held).
    fn drop(&mut self) {
        // Values still stored: their dependents were cancelled (rule 7).
        // One pass, which frees the tasks' memory too.
        let tasks = std::mem::take(&mut self.tasks).into_vec();
        for (task, state) in tasks.into_iter().enumerate() {
            let slot = state.value.into_inner();
            if let Some(value) = slot.unwrap_or_else(PoisonError::into_inner) {
                drop_value(&self.plan, task as u32, Ok(value));
            }
        }
        let failures = std::mem::take(&mut *lock(&self.failures));
        if !failures.is_empty() {
            drop_each_quietly(failures.into_values(), "a failure a run recorded");
        }
        // Quietly, by the plan itself (rule 7): on a pool thread, where
        // the plan may hold the last reference to a user's values.
        self.plan = Arc::default();
        self.reporter.finished();
    }
}

/// Drops the inputs task `task` left (rule 7). Out of line, as is
/// [`drop_value`]: the tasks' loop stays as small as before.
#[inline(never)]
fn drop_inputs(plan: &Plan, task: u32, inputs: &mut Vec<Option<Value>>) {
    drop_each_quietly(
        inputs.drain(..),
        format_args!("an input of task {}", plan.label(task)),
    );
}

/// Drops the outcome of task `task`, which nobody takes (rule 7).
#[cold]
#[inline(never)]
fn drop_value(plan: &Plan, task: u32, outcome: Outcome) {
    drop_quietly(
        outcome,
        format_args!("the value of task {}", plan.label(task)),
    );
}

/// No code panics while holding a slot lock (ops run outside it), so a
/// poisoned lock still holds consistent data.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
