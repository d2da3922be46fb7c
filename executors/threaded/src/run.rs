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
//! 3. The plan is cut into blocks of consecutive tasks (rule 8), and
//!    pullers, at most one per pool thread, run blocks in plan order, each
//!    to its end, and each task a block makes ready (rule 8) to the end of
//!    its chain, before starting the next. Live intermediates therefore
//!    stay near `threads × depth` for a tree, and a million-leaf plan holds
//!    no million queued jobs.
//! 4. Each puller owns a range of blocks. It refills the range from a
//!    shared cursor in growing chunks (so neighbouring blocks, whose results
//!    meet soon, mostly run on the same thread); once the cursor is
//!    exhausted, an idle puller steals the upper half of another's range, so
//!    a chunk of slow blocks does not end up on one thread. Positions only
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
//! 8. A task is *inner* when each of its dependencies is an inner task of
//!    its block (a task without dependencies is inner): nothing outside
//!    the block holds it back, so the thread that runs the block runs it,
//!    in plan order, as `Synchronous` runs a plan (its values in the
//!    block's own store, no atomics, no lock). Every other task is *outer*
//!    and goes through dependency counting (rules 1 and 2), and so do its
//!    dependents, all outer. An inner task with outer dependents stores its
//!    outcome for their edges (rule 2) and releases them, and runs the
//!    first that becomes ready, to the end of its chain, before it goes on
//!    with its block. A tree's inner tasks are all but the few whose
//!    subtree crosses a block's start.
//! 9. Once a puller finds no block left to start or steal, the run is
//!    *hungry*: a thread running a block splits the rest of it in two
//!    wherever no inner task of the upper half depends on a task before
//!    it, and queues the upper half as a job of its own (a block of its
//!    own, rule 8), where an idle thread can steal it. Slow tasks side by
//!    side in one block (a map's) thus still spread over the threads.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::blocks::Blocks;
use rask_executor::events::{self, Place};
use rask_executor::{
    drop_each_quietly, drop_quietly, run_task, Failure, Outcome, OutcomeStore, Plan, Reporter,
    Stop, Value,
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
    /// Puller number `.1`: runs blocks until none is left (rule 3).
    Puller(Arc<Run>, usize),
    /// Runs one ready task, then the chain of tasks it makes ready.
    Chain(Arc<Run>, u32),
    /// Runs the inner tasks `.1` of a block, split off its rest (rule 9).
    Tail(Arc<Run>, Range<u32>),
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
            Job::Puller(run, _) | Job::Chain(run, _) | Job::Tail(run, _) | Job::Batch(run, ..) => {
                run.stop.clone()
            }
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
            Job::Tail(run, tasks) => {
                let mut scratch = Scratch::default();
                run.run_block(tasks, spawner, &mut scratch);
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
    if run.blocks.count() == 0 {
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

/// The first chunk of blocks a puller takes from the cursor; each refill
/// doubles it up to `MAX_CHUNK`. Small plans keep close to plan order, large
/// ones touch the shared cursor rarely.
const FIRST_CHUNK: u32 = 1;
const MAX_CHUNK: u32 = 32;

/// The state of one submitted plan.
pub(crate) struct Run {
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    /// The plan's blocks (rule 8).
    blocks: Blocks,
    /// The state of each shared task (outer, or inner with outer
    /// dependents), by [`Blocks::shared`].
    tasks: Box<[TaskState]>,
    /// The first block no puller owns yet.
    cursor: AtomicUsize,
    /// The blocks each puller owns (rule 4).
    ranges: Box<[Owned]>,
    /// Failures of tasks with dependents (rule 2); rare, so one lock.
    failures: Mutex<HashMap<u32, Arc<Failure>>>,
    /// Whether each output slot was reported.
    reported: Box<[AtomicBool]>,
    /// Live jobs of this run (rule 5).
    active: AtomicUsize,
    /// Whether a puller found no block left (rule 9); sticky.
    hungry: AtomicBool,
    /// Sticky copy of `reporter.cancelled()`.
    cancelled: AtomicBool,
    /// What `rask_executor::cancelled` reads in this run's tasks.
    stop: Stop,
}

/// 32 bytes a shared task: with [`Blocks`], the per-task memory of a run.
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

/// Blocks `lo..hi` packed as `lo << 32 | hi` (rule 4), on its own cache
/// line: the owner updates it for every block it starts.
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
    /// Outer dependents an inner task made ready (rule 8).
    released: Vec<u32>,
    /// Whether a job was spawned since the puller last drained its deque.
    spawned: bool,
}

impl Run {
    fn new(plan: Arc<Plan>, reporter: Arc<dyn Reporter>, threads: usize) -> Run {
        let blocks = Blocks::of(&plan, threads);
        let mut tasks: Box<[TaskState]> = (0..blocks.shared_len())
            .map(|_| TaskState {
                pending: AtomicU32::new(0),
                remaining: AtomicU32::new(0),
                value: Mutex::new(None),
            })
            .collect();
        for &task in blocks.outer() {
            let deps = plan.deps(task).len() as u32;
            *tasks[blocks.shared(task)].pending.get_mut() = deps;
        }
        let pullers = threads.min(blocks.count()).max(1);
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
            blocks,
            tasks,
            cursor: AtomicUsize::new(0),
            ranges,
            failures: Mutex::new(HashMap::new()),
            reported,
            active: AtomicUsize::new(0),
            hungry: AtomicBool::new(false),
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

    /// The next block for puller `me`, from its own range, a new chunk or
    /// another puller's range (rule 4).
    fn next_block(&self, me: usize, chunk: &mut u32) -> Option<usize> {
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
                    Ok(_) => return Some(lo),
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
    /// half of another puller's range; `None` when every block is owned.
    fn claim(&self, me: usize, chunk: &mut u32) -> Option<(usize, usize)> {
        let len = self.blocks.count();
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
                // blocks that come first in plan order.
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
        while let Some(block) = self.next_block(me, &mut chunk) {
            self.run_block(self.blocks.tasks_of(block), spawner, &mut scratch);
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
        self.hungry.store(true, Ordering::Relaxed);
        self.job_ended();
    }

    /// Runs the inner tasks of block `tasks` in plan order (rule 8) and,
    /// before going on, each outer task one of them makes ready to the end
    /// of its chain.
    fn run_block<S: Spawner>(
        self: &Arc<Self>,
        mut tasks: Range<u32>,
        spawner: &S,
        scratch: &mut Scratch,
    ) {
        let plan = &*self.plan;
        // What a cancellation leaves in it is dropped with it (rule 7).
        let mut store = OutcomeStore::new(plan, tasks.clone());
        while let Some(task) = tasks.next() {
            if !self.blocks.is_inner(task) {
                continue;
            }
            if self.is_cancelled() {
                return;
            }
            if tasks.len() > 1 && self.hungry.load(Ordering::Relaxed) {
                // Rule 9: the tasks from `mid` on, to a job of their own.
                let mid = tasks.start + tasks.len() as u32 / 2;
                let apart = (mid..tasks.end)
                    .all(|t| !self.blocks.is_inner(t) || plan.deps(t).iter().all(|&d| d >= mid));
                if apart {
                    let tail = Job::Tail(Arc::clone(self), mid..tasks.end);
                    self.active.fetch_add(1, Ordering::Relaxed);
                    spawner.spawn_job(tail);
                    scratch.spawned = true;
                    tasks.end = mid;
                }
            }
            // As `Synchronous` runs a task; every dependency is in `store`.
            let inputs = &mut scratch.inputs;
            let mut failed: Option<Arc<Failure>> = None;
            for &dep in plan.deps(task) {
                match store.take(dep) {
                    Ok(value) => inputs.push(Some(value)),
                    Err(failure) => {
                        failed.get_or_insert(failure);
                    }
                }
            }
            let outcome = match failed {
                Some(failure) => {
                    events::skipped(plan, task, &failure);
                    Err(failure)
                }
                None => events::observe(plan, task, thread_place, || run_task(plan, task, inputs)),
            };
            if inputs.iter().any(Option::is_some) {
                drop_inputs(plan, task, inputs);
            } else {
                inputs.clear();
            }
            // Outer dependents take the outcome from the run's slot, inner
            // ones and outputs from the block's store.
            let mut uses = plan.consumers(task);
            let mut outcome = Some(outcome);
            if self.blocks.exports(task) {
                let dependents = self.blocks.outer_dependents(task);
                let outer = dependents.len() as u32;
                uses -= outer;
                let shared = if uses == 0 {
                    outcome.take()
                } else {
                    outcome.clone()
                };
                self.store(task, shared.expect("taken here only"), outer);
                for &dependent in dependents {
                    if self.release(dependent) {
                        scratch.released.push(dependent);
                    }
                }
            }
            if let Some(outcome) = outcome {
                store.put(task, outcome, uses);
            }
            if self.blocks.has_outputs(task) {
                for slot in plan.output_slots_of(task) {
                    self.reported[slot].store(true, Ordering::Relaxed);
                    self.reporter.output(slot, store.take(task));
                }
            }
            if let Some((&next, rest)) = scratch.released.split_first() {
                scratch.spawned |= self.spawn_ready(rest, spawner);
                scratch.released.clear();
                self.chain(next, None, spawner, scratch);
            }
        }
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
        let dependents = self.blocks.outer_dependents(task);
        // The first dependent's state is read when this task resolves, and
        // its op when it runs, mostly next on this thread: both loads start
        // now, while this task runs, rather than stall then.
        if let Some(&next) = dependents.first() {
            rask_executor::prefetch(self.state(next));
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

    /// Reports outer `task`'s outputs, stores its outcome for its
    /// `dependents` (all outer, which `step` read already) and releases
    /// them.
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
                if self.state(dependent).pending.load(Ordering::Acquire) == 1 {
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
                // `dependents` is in plan order, so is `ready`.
                scratch.spawned |= self.spawn_ready(&scratch.ready, spawner);
                scratch.ready.clear();
                first.map(|dependent| (dependent, None))
            }
        }
    }

    /// Queues one job for the ready tasks `ready` (in plan order: a batch
    /// runs its lowest index first); whether there were any.
    fn spawn_ready<S: Spawner>(self: &Arc<Self>, ready: &[u32], spawner: &S) -> bool {
        let job = match *ready {
            [] => return false,
            [ready] => Job::Chain(Arc::clone(self), ready),
            _ => Job::Batch(Arc::clone(self), ready.into(), 0..ready.len()),
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        spawner.spawn_job(job);
        true
    }

    /// Shared `task`'s state.
    #[inline]
    fn state(&self, task: u32) -> &TaskState {
        &self.tasks[self.blocks.shared(task)]
    }

    fn store(&self, task: u32, outcome: Outcome, remaining: u32) {
        match outcome {
            Ok(value) => {
                let state = self.state(task);
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
        let state = self.state(dep);
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
        let pending = &self.state(task).pending;
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
        for (task, state) in self.blocks.shared_tasks().zip(tasks) {
            let slot = state.value.into_inner();
            if let Some(value) = slot.unwrap_or_else(PoisonError::into_inner) {
                drop_value(&self.plan, task, Ok(value));
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
