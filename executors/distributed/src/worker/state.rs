//! A worker's state machine: which tasks wait for which inputs, which
//! inputs are being fetched from whom. No sockets, no threads.
//!
//! Rules:
//!
//! 1. A task is handed to the thread pool once every input is in the store;
//!    its inputs are given in the order of its `deps`. An input that is a
//!    task of this worker (sent early, scheduler rule S9) is waited for, not
//!    fetched: the dependent is dispatched in the same handler that stores
//!    the input's value. If that input ends without a value (it failed, was
//!    released or given back), its waiting dependents are given back
//!    (`TaskAbandoned`); for a failure the scheduler has already failed them
//!    and ignores the report.
//! 2. Each missing input is fetched once, from one holder at a time; a holder
//!    that fails is reported (`FetchFailed`) and the next one is tried. When
//!    none is left, every task waiting for the input is given back
//!    (`TaskAbandoned`): the scheduler knows better where the value is now.
//!    A copy the scheduler asks for (`Fetch`, scheduler rule S13) is
//!    fetched the same way, with no task waiting, and kept (`DataAdded`);
//!    when no holder delivers it, nothing more is said.
//! 3. After `Release`, nothing about that key is reported: a running task's
//!    result is dropped (tasks carry a local id so a later `Compute` of the
//!    same key is not confused with the released one). Every report of a
//!    task names the scheduler's run of it (`Compute::run`), so one sent
//!    before the `Release` arrived is not taken for a later run either
//!    (scheduler rule S6).
//! 4. A value enters the store with its encoded size, which the worker knows
//!    because every result is encoded once when it is produced; a value that
//!    cannot be encoded fails its task right there, naming its type.
//! 5. A task whose only missing input is a task of this worker already
//!    handed to the pool becomes that job's *successor* (at most one per
//!    job): the compute thread that runs the input runs it right after, with
//!    the input's value, so a chain runs on one thread without a hand-off to
//!    the network thread and back per link. The thread takes the successor
//!    (closing the slot) before it reports the input, so a successor is run
//!    exactly once: by that thread if the input succeeded, by nobody if it
//!    failed or was released (the successor is then given back, rule 1).
//!    The price: a chain keeps its thread until it ends, ahead of queued
//!    jobs of better priority.
//! 6. **Paused** (`memory` rule 2): while the store holds more than its
//!    pause level, a task whose inputs are all here is held back, in the
//!    order it became ready, instead of being handed to the pool, and no
//!    successor is attached (one attached before goes on). The scheduler
//!    hears of it (worker rule 14) and sends no more tasks meanwhile
//!    (scheduler rule S17); those sent before it heard wait here unless
//!    it asks for them back (rule 8). [`WorkerState::resume`]
//!    dispatches them once spilling brought the store below the level.
//!    Inputs are fetched as usual meanwhile.
//! 7. A spilled input is read back when its task is dispatched (`memory`
//!    rule 4). One whose file is damaged is reported as this worker
//!    failing to deliver it (`FetchFailed` naming itself: the scheduler
//!    takes it off the holders and computes it again if no one else holds
//!    it) and the task is given back (`TaskAbandoned`), as for an input
//!    that cannot be fetched (rule 2): never a wrong value. One whose file
//!    cannot be read *now* (an I/O error such as too many open files,
//!    `memory` rule 5) keeps its value, and the task is held back as in
//!    rule 6 and tried again at each later round of the network thread
//!    (its next heartbeat at the latest), until it runs, is released or
//!    given up, or the file has failed for 30 s and its value counts as
//!    lost (`memory` rule 5: then as above).
//! 8. **Giving a task up** (scheduler rule S15). `GiveUp` asks for a task
//!    back before the scheduler sends it elsewhere. A task not started
//!    yet is given up: dropped as by `Release` (rule 3, its local
//!    dependents given back) and answered `TaskGivenUp`; one that started,
//!    ended or is unknown is kept and answered `TaskKept`. "Started" is
//!    decided by one atomic *claim* per task, shared with its job: a
//!    thread (compute or network, a successor's too) takes the claim
//!    before it runs the job, `GiveUp` takes it to give the task up, and
//!    only one of them can, so a task given up never runs here, and one
//!    that ran was never given up. A task waiting for inputs, held back
//!    (rule 6), queued for a thread or attached as a successor (rule 5)
//!    has not started.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use rask_executor::{
    drop_each_quietly, drop_quietly, panic_message, Encoded, Failure, FailureKind, Key, Op,
    Registry, Value, WireTask,
};

use super::memory::{Store, Stored, Unread};
use crate::net::FetchResult;
use crate::protocol::{KeyMap, Priority, ToScheduler, WireFailure, WireKey, WorkerId};

/// A task ready to run on the pool.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) key: WireKey,
    /// The registered function it runs: the worker learns how long each
    /// function takes (worker rule 5).
    pub(crate) function: Arc<str>,
    /// What it runs: the pool makes it a one-task plan, to run it with
    /// `rask_executor::run_task`; the watchdog names the task by it.
    pub(crate) op: Arc<dyn Op>,
    /// `None` only in a successor, where this job's value goes (rule 5).
    pub(crate) inputs: Vec<Option<Value>>,
    pub(crate) priority: Priority,
    pub(crate) cancelled: Arc<AtomicBool>,
    /// Who runs it or gives it up (rule 8).
    pub(crate) claim: Claim,
    /// The job to run right after this one (rule 5).
    pub(crate) next: Arc<Mutex<Successor>>,
}

/// Why no job was made for a task ([`WorkerState::job`]).
enum NoJob {
    /// An input is not here, or was lost: the task is given back.
    Gone,
    /// A spilled input cannot be read now: the task is tried again later
    /// (rule 7).
    Later,
}

/// A task's claim (rule 8): taken once, by the thread that runs the task
/// or by a `GiveUp`, never both. Cheap to clone; clones share the claim.
#[derive(Clone, Default)]
pub(crate) struct Claim(Arc<AtomicU8>);

impl Claim {
    const FREE: u8 = 0;
    const RUN: u8 = 1;
    const GIVEN_UP: u8 = 2;

    /// Takes the claim to run the task: false if it was given up.
    pub(crate) fn run(&self) -> bool {
        self.take(Claim::RUN)
    }

    /// Takes the claim to give the task up: false if it started.
    fn give_up(&self) -> bool {
        self.take(Claim::GIVEN_UP)
    }

    fn take(&self, to: u8) -> bool {
        self.0
            .compare_exchange(Claim::FREE, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A job's successor slot (rule 5).
#[derive(Default)]
pub(crate) struct Successor {
    /// The successor, until the compute thread takes it.
    pub(crate) job: Option<Job>,
    /// Set by the compute thread when it takes the successor: from then on
    /// nothing is attached.
    pub(crate) finished: bool,
}

/// Worker rule 16: a job dropped (run, released before it started, given
/// up, dropped with its connection or its worker) drops the inputs it
/// still holds quietly, on whatever thread lets it go.
impl Drop for Job {
    fn drop(&mut self) {
        // An op that took its inputs leaves nothing to catch.
        if self.inputs.iter().any(Option::is_some) {
            let (function, key) = (&self.function, Key(self.key));
            drop_each_quietly(
                self.inputs.drain(..),
                format_args!("an input of task {function}-{}", key.short()),
            );
        }
    }
}

impl Job {
    /// Closes this job's successor slot and takes the successor, if any.
    pub(crate) fn take_successor(&self) -> Option<Job> {
        let mut slot = self.next.lock().unwrap_or_else(|e| e.into_inner());
        slot.finished = true;
        slot.job.take()
    }
}

/// What the pool reports for a job.
pub(crate) struct Done {
    pub(crate) id: u64,
    pub(crate) key: WireKey,
    pub(crate) function: Arc<str>,
    pub(crate) outcome: Result<Stored, Arc<Failure>>,
    pub(crate) duration_ns: u64,
    /// The value's encoding, if small enough to go with the report.
    pub(crate) inline: Option<Arc<[u8]>>,
    /// The lane of the thread it ran on (`pool::lane`).
    pub(crate) thread: u32,
}

/// Where the worker's handlers put what they send.
pub(crate) trait Outbox {
    /// Queues a message to the scheduler.
    fn to_scheduler(&mut self, msg: ToScheduler);
    /// Asks `from` for `key`; the answer comes back as `on_fetched`.
    fn fetch(&mut self, from: WorkerId, key: WireKey);
    /// Hands a job to the thread pool.
    fn run(&mut self, job: Job);
}

struct LocalTask {
    id: u64,
    /// The scheduler's run of it, named in its reports (rule 3).
    run: u64,
    function: Arc<str>,
    op: Arc<dyn Op>,
    deps: Vec<WireKey>,
    /// Distinct inputs not in the store yet.
    missing: u32,
    priority: Priority,
    cancelled: Arc<AtomicBool>,
    /// Shared with its job (rule 8).
    claim: Claim,
    /// Tasks of this worker waiting for this one's value (rule 1).
    dependents: Vec<WireKey>,
    /// Once its job is built: the job's successor slot (rule 5).
    slot: Option<Arc<Mutex<Successor>>>,
    /// It is some job's successor: its inputs' arrival does not dispatch it.
    chained: bool,
}

struct Fetch {
    /// The holder asked now.
    current: WorkerId,
    /// Holders not tried yet.
    others: Vec<WorkerId>,
    /// Tasks waiting for this input.
    waiting: Vec<WireKey>,
    /// The scheduler asked for a copy (`ToWorker::Fetch`): keep the value
    /// even if no task waits for it.
    keep: bool,
}

/// The `Compute` command's content.
pub(crate) struct Compute {
    pub(crate) key: WireKey,
    /// The scheduler's run of the task, named back in its reports.
    pub(crate) run: u64,
    pub(crate) name: Arc<str>,
    pub(crate) function: Arc<str>,
    pub(crate) payload: Arc<[u8]>,
    pub(crate) deps: Vec<WireKey>,
    pub(crate) who_has: Vec<(WireKey, Vec<WorkerId>)>,
    pub(crate) priority: Priority,
    /// How long it may run (`rask_executor::run_task` enforces it).
    pub(crate) timeout: Option<std::time::Duration>,
    /// How many times it runs again when it fails (`run_task` again).
    pub(crate) retries: u32,
}

/// The worker's whole state.
pub(crate) struct WorkerState {
    me: WorkerId,
    registry: Arc<dyn Registry>,
    store: Store,
    tasks: KeyMap<WireKey, LocalTask>,
    fetches: KeyMap<WireKey, Fetch>,
    next_id: u64,
    /// Tasks ready to run, held back while paused (rule 6) or until a
    /// spilled input can be read (rule 7).
    held_back: VecDeque<WireKey>,
}

impl WorkerState {
    pub(crate) fn new(me: WorkerId, registry: Arc<dyn Registry>, store: Store) -> WorkerState {
        WorkerState {
            me,
            registry,
            store,
            tasks: KeyMap::default(),
            fetches: KeyMap::default(),
            next_id: 0,
            held_back: VecDeque::new(),
        }
    }

    /// Tasks received and not finished (tests).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.tasks.len()
    }

    /// The scheduler asks for a task.
    pub(crate) fn on_compute(&mut self, msg: Compute, out: &mut impl Outbox) {
        if self.tasks.contains_key(&msg.key) {
            return;
        }
        if let Some(nbytes) = self.store.nbytes(&msg.key) {
            // Fetched earlier as someone's input: already done.
            out.to_scheduler(ToScheduler::TaskFinished {
                key: msg.key,
                run: msg.run,
                nbytes,
                duration_ns: 0,
                value: None,
                thread: 0,
            });
            return;
        }
        let wire = WireTask {
            function: msg.function.to_string(),
            payload: msg.payload.to_vec(),
        };
        let fail = |kind, message: String| ToScheduler::TaskErred {
            key: msg.key,
            run: msg.run,
            failure: WireFailure::from(&Failure::new(
                Key(msg.key),
                msg.name.clone(),
                kind,
                message,
            )),
        };
        // A registry that panics while decoding fails that task only.
        let op = match catch_unwind(AssertUnwindSafe(|| self.registry.resolve(&wire))) {
            // A task made of steps takes a timeout on each (a fused
            // chain, which has none of its own: this is the default).
            Ok(Ok(op)) => match msg.timeout.and_then(|t| op.each_step_limited(t)) {
                Some(stepwise) => rask_executor::with_limits(stepwise, None, msg.retries),
                None => rask_executor::with_limits(op, msg.timeout, msg.retries),
            },
            Ok(Err(e)) => return out.to_scheduler(fail(FailureKind::Failed, e.to_string())),
            Err(p) => return out.to_scheduler(fail(FailureKind::Panicked, panic_message(&*p))),
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut missing = Vec::new();
        {
            let mut seen = HashSet::new();
            for dep in &msg.deps {
                if seen.insert(*dep) && !self.store.contains(dep) {
                    missing.push(*dep);
                }
            }
        }
        self.tasks.insert(
            msg.key,
            LocalTask {
                id,
                run: msg.run,
                function: msg.function,
                op,
                deps: msg.deps,
                missing: missing.len() as u32,
                priority: msg.priority,
                cancelled: Arc::new(AtomicBool::new(false)),
                claim: Claim::default(),
                dependents: Vec::new(),
                slot: None,
                chained: false,
            },
        );
        if missing.is_empty() {
            self.dispatch(msg.key, out);
            return;
        }
        if let [dep] = missing[..] {
            if let Some(input) = self.tasks.get_mut(&dep) {
                input.dependents.push(msg.key);
                self.chain_after(dep, out);
                return;
            }
        }
        for dep in missing {
            if let Some(input) = self.tasks.get_mut(&dep) {
                input.dependents.push(msg.key);
                continue;
            }
            if let Some(fetch) = self.fetches.get_mut(&dep) {
                fetch.waiting.push(msg.key);
                continue;
            }
            let mut holders: Vec<WorkerId> = msg
                .who_has
                .iter()
                .find(|(k, _)| *k == dep)
                .map(|(_, h)| h.iter().copied().filter(|&w| w != self.me).collect())
                .unwrap_or_default();
            // Spread the load of popular inputs across their holders.
            if holders.len() > 1 {
                let pick = (id as usize) % holders.len();
                holders.swap(0, pick);
            }
            holders.reverse();
            match holders.pop() {
                Some(first) => {
                    out.fetch(first, dep);
                    self.fetches.insert(
                        dep,
                        Fetch {
                            current: first,
                            others: holders,
                            waiting: vec![msg.key],
                            keep: false,
                        },
                    );
                }
                None => {
                    // The scheduler believes this worker holds it; it does
                    // not (released meanwhile). Say so and give the task back.
                    out.to_scheduler(ToScheduler::FetchFailed {
                        key: dep,
                        holder: self.me,
                    });
                    self.abandon(msg.key, out);
                    return;
                }
            }
        }
    }

    /// The scheduler asks for a copy of `key`, held by `holders`: fetch
    /// it and keep it, reporting `DataAdded` (rule 2). Nothing to do when
    /// it is held or computed here, or already being fetched (which then
    /// keeps it).
    pub(crate) fn on_fetch(&mut self, key: WireKey, holders: Vec<WorkerId>, out: &mut impl Outbox) {
        if self.store.contains(&key) {
            // Held already (fetched as an input): say so, and the
            // scheduler counts it as the copy it asked for.
            out.to_scheduler(ToScheduler::DataAdded { key });
            return;
        }
        if self.tasks.contains_key(&key) {
            return; // computed here: reported by `TaskFinished`
        }
        if let Some(fetch) = self.fetches.get_mut(&key) {
            fetch.keep = true;
            return;
        }
        let mut others: Vec<WorkerId> = holders.into_iter().filter(|&w| w != self.me).collect();
        others.reverse();
        let Some(first) = others.pop() else {
            return; // no holder but this worker, which does not hold it
        };
        out.fetch(first, key);
        self.fetches.insert(
            key,
            Fetch {
                current: first,
                others,
                waiting: Vec::new(),
                keep: true,
            },
        );
    }

    /// The scheduler releases a key: drop its value or its task (rule 3).
    /// Tasks waiting for the task's value are given back (rule 1).
    pub(crate) fn on_release(&mut self, key: WireKey, out: &mut impl Outbox) {
        self.store.remove(&key);
        if let Some(fetch) = self.fetches.get_mut(&key) {
            // A copy being fetched is no longer wanted.
            fetch.keep = false;
        }
        if let Some(task) = self.tasks.remove(&key) {
            task.cancelled.store(true, Ordering::Relaxed);
            self.unwait(&key, &task.deps);
            for dependent in task.dependents {
                self.abandon(dependent, out);
            }
        }
    }

    /// The scheduler asks for `key` back (rule 8): dropped and answered
    /// `TaskGivenUp` if it has not started, else answered `TaskKept`.
    pub(crate) fn on_give_up(&mut self, key: WireKey, id: u64, out: &mut impl Outbox) {
        let given = self.tasks.get(&key).is_some_and(|t| t.claim.give_up());
        if given {
            // The answer first: the scheduler has placed the task anew by
            // the time it hears of its local dependents, given back here
            // as for a released input (rules 1 and 3).
            out.to_scheduler(ToScheduler::TaskGivenUp { key, id });
            self.on_release(key, out);
        } else {
            out.to_scheduler(ToScheduler::TaskKept { key, id });
        }
    }

    /// The pool finished a job.
    /// The scheduler's run of task `key` if job `id` is its current run
    /// (rule 3): `None` for a task released meanwhile, or one the last
    /// scheduler sent.
    pub(crate) fn run_of(&self, key: &WireKey, id: u64) -> Option<u64> {
        self.tasks.get(key).filter(|t| t.id == id).map(|t| t.run)
    }

    pub(crate) fn on_task_done(&mut self, done: Done, out: &mut impl Outbox) {
        match self.tasks.get(&done.key) {
            Some(task) if task.id == done.id => {}
            _ => {
                // Released while it ran: its value goes (worker rule 16).
                let (function, key) = (done.function.clone(), Key(done.key));
                drop_quietly(
                    done,
                    format_args!("the value of task {function}-{}", key.short()),
                );
                return;
            }
        }
        let Some(task) = self.tasks.remove(&done.key) else {
            return;
        };
        match done.outcome {
            Ok(stored) => {
                let nbytes = stored.nbytes;
                self.store.insert(done.key, stored);
                // Dependents first: the pool starts on them sooner.
                for dependent in task.dependents {
                    self.input_arrived(dependent, out);
                }
                out.to_scheduler(ToScheduler::TaskFinished {
                    key: done.key,
                    run: task.run,
                    nbytes,
                    duration_ns: done.duration_ns,
                    value: done.inline,
                    thread: done.thread,
                });
            }
            Err(failure) => {
                out.to_scheduler(ToScheduler::TaskErred {
                    key: done.key,
                    run: task.run,
                    failure: WireFailure::from(&*failure),
                });
                for dependent in task.dependents {
                    self.abandon(dependent, out);
                }
            }
        }
    }

    /// One missing input of `task` is now in the store.
    fn input_arrived(&mut self, task: WireKey, out: &mut impl Outbox) {
        let Some(t) = self.tasks.get_mut(&task) else {
            return;
        };
        t.missing -= 1;
        // A successor is run by the thread that ran this input (rule 5).
        if t.missing == 0 && !t.chained {
            self.dispatch(task, out);
        }
    }

    /// A fetch was answered (rule 2).
    pub(crate) fn on_fetched(
        &mut self,
        from: WorkerId,
        key: WireKey,
        result: FetchResult,
        out: &mut impl Outbox,
    ) {
        match self.fetches.get(&key) {
            Some(fetch) if fetch.current == from => {}
            _ => return, // nobody waits any more, or an old attempt
        }
        match result {
            FetchResult::Data(bytes) => {
                let fetch = self.fetches.remove(&key).expect("checked above");
                if fetch.waiting.is_empty() && !fetch.keep {
                    return;
                }
                let nbytes = bytes.len() as u64;
                self.store.insert(
                    key,
                    Stored {
                        value: Arc::new(Encoded::new(bytes)),
                        nbytes,
                    },
                );
                out.to_scheduler(ToScheduler::DataAdded { key });
                for task in fetch.waiting {
                    self.input_arrived(task, out);
                }
            }
            FetchResult::Missing | FetchResult::Lost => {
                out.to_scheduler(ToScheduler::FetchFailed { key, holder: from });
                let fetch = self.fetches.get_mut(&key).expect("checked above");
                if let Some(next) = fetch.others.pop() {
                    fetch.current = next;
                    out.fetch(next, key);
                    return;
                }
                let fetch = self.fetches.remove(&key).expect("checked above");
                for task in fetch.waiting {
                    self.abandon(task, out);
                }
            }
        }
    }

    /// The scheduler connection ended (worker rule 1): everything of it
    /// goes, and nothing is reported, since nobody is there to hear it.
    /// Every task is released as by `Release` (rule 3: a running one sees
    /// its cancellation, and its report is dropped), every fetch
    /// forgotten (late answers find nobody waiting, rule 2) and every value
    /// dropped, so the data port answers `Missing` for them. Local ids go
    /// on counting, so no report of a task of the lost connection passes
    /// for one of the next. Returns how many tasks and values went.
    pub(crate) fn on_scheduler_lost(&mut self) -> (usize, usize) {
        let tasks = self.tasks.len();
        for (_, task) in self.tasks.drain() {
            task.cancelled.store(true, Ordering::Relaxed);
        }
        self.fetches.clear();
        self.held_back.clear();
        let values = self.store.clear();
        (tasks, values)
    }

    /// A scheduler registered this worker as `me` (worker rule 1).
    pub(crate) fn on_registered(&mut self, me: WorkerId) {
        self.me = me;
    }

    /// Dispatches the tasks held back while paused, once the store is
    /// below its pause level again (rule 6), and those waiting for a
    /// spilled input's file to be readable (rule 7), which go back to wait
    /// if it is not yet; those released or given back meanwhile are
    /// skipped.
    pub(crate) fn resume(&mut self, out: &mut impl Outbox) {
        if self.held_back.is_empty() || self.store.paused() {
            return;
        }
        for key in std::mem::take(&mut self.held_back) {
            let ready = self
                .tasks
                .get(&key)
                .is_some_and(|t| t.missing == 0 && !t.chained && t.slot.is_none());
            if ready {
                // Held back again if this one's input brought the pause back.
                self.dispatch(key, out);
            }
        }
    }

    /// A peer left: fetches from it will fail through their connection; no
    /// state to change here. Kept as a hook for symmetry with the scheduler.
    pub(crate) fn on_peer_left(&mut self, _peer: WorkerId) {}

    /// Gives a task back to the scheduler, and the tasks waiting for its
    /// value with it (rule 1). Iterative: local chains can be long.
    fn abandon(&mut self, key: WireKey, out: &mut impl Outbox) {
        let mut stack = vec![key];
        while let Some(key) = stack.pop() {
            if let Some(task) = self.tasks.remove(&key) {
                task.cancelled.store(true, Ordering::Relaxed);
                self.unwait(&key, &task.deps);
                out.to_scheduler(ToScheduler::TaskAbandoned { key, run: task.run });
                stack.extend(task.dependents);
            }
        }
    }

    /// Removes `task` from the waiting lists of its inputs: fetches, and
    /// tasks of this worker.
    fn unwait(&mut self, task: &WireKey, deps: &[WireKey]) {
        for dep in deps {
            if let Some(fetch) = self.fetches.get_mut(dep) {
                fetch.waiting.retain(|t| t != task);
            }
            if let Some(input) = self.tasks.get_mut(dep) {
                input.dependents.retain(|t| t != task);
            }
        }
    }

    fn dispatch(&mut self, key: WireKey, out: &mut impl Outbox) {
        if self.store.paused() {
            self.held_back.push_back(key);
            return;
        }
        let job = match self.job(key, None, out) {
            Ok(job) => job,
            // A spilled input whose file cannot be read now (rule 7):
            // tried again with the tasks held back.
            Err(NoJob::Later) => {
                self.held_back.push_back(key);
                return;
            }
            // An input was released between its arrival and now: cannot
            // happen within one handler, but giving the task back is safe.
            Err(NoJob::Gone) => {
                self.abandon(key, out);
                return;
            }
        };
        if let Some(task) = self.tasks.get_mut(&key) {
            task.slot = Some(job.next.clone());
        }
        self.chain_after(key, out);
        out.run(job);
    }

    /// The job for `key`, its inputs from the store except `from`, whose
    /// places stay empty for a successor (rule 5); [`NoJob::Gone`] if
    /// another input is missing, or was spilled and its file is damaged
    /// (then reported), [`NoJob::Later`] if such a file cannot be read now
    /// (rule 7).
    fn job(
        &self,
        key: WireKey,
        from: Option<WireKey>,
        out: &mut impl Outbox,
    ) -> Result<Job, NoJob> {
        let task = self.tasks.get(&key).ok_or(NoJob::Gone)?;
        let mut inputs = Vec::with_capacity(task.deps.len());
        for dep in &task.deps {
            if Some(*dep) == from {
                inputs.push(None);
                continue;
            }
            match self.store.input(dep) {
                Ok(Some(value)) => inputs.push(Some(value)),
                Ok(None) => return Err(NoJob::Gone),
                Err(Unread::Lost) => {
                    out.to_scheduler(ToScheduler::FetchFailed {
                        key: *dep,
                        holder: self.me,
                    });
                    return Err(NoJob::Gone);
                }
                Err(Unread::Later) => return Err(NoJob::Later),
            }
        }
        Ok(Job {
            id: task.id,
            key,
            function: task.function.clone(),
            op: task.op.clone(),
            inputs,
            priority: task.priority,
            cancelled: task.cancelled.clone(),
            claim: task.claim.clone(),
            next: Arc::default(),
        })
    }

    /// Makes successors (rule 5): from `key`, whose job is built, attaches
    /// a dependent waiting for it alone, then one waiting for that one, and
    /// so on while slots are free; none while paused (rule 6).
    fn chain_after(&mut self, mut key: WireKey, out: &mut impl Outbox) {
        loop {
            if self.store.paused() {
                return;
            }
            let Some(task) = self.tasks.get(&key) else {
                return;
            };
            let Some(slot) = task.slot.clone() else {
                return;
            };
            let next = task.dependents.iter().copied().find(|d| {
                self.tasks
                    .get(d)
                    .is_some_and(|t| t.missing == 1 && t.slot.is_none())
            });
            let Some(next) = next else {
                return;
            };
            // A successor whose other input cannot be read now is
            // dispatched by itself once this job's value is here.
            let Ok(job) = self.job(next, Some(key), out) else {
                return;
            };
            let next_slot = job.next.clone();
            {
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                if slot.finished || slot.job.is_some() {
                    return;
                }
                slot.job = Some(job);
            }
            if let Some(t) = self.tasks.get_mut(&next) {
                t.chained = true;
                t.slot = Some(next_slot);
            }
            key = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::{OpError, WireError};

    struct AddOne;
    impl Op for AddOne {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(inputs.len() as i64))
        }
        fn name(&self) -> &str {
            "add"
        }
    }

    struct Reg;
    impl Registry for Reg {
        fn resolve(&self, task: &WireTask) -> Result<Arc<dyn Op>, WireError> {
            match task.function.as_str() {
                "add" => Ok(Arc::new(AddOne)),
                "bad" => panic!("decoder exploded"),
                f => Err(WireError::Unregistered {
                    function: f.to_owned(),
                }),
            }
        }
    }

    #[derive(Default)]
    struct Rec {
        sent: Vec<ToScheduler>,
        fetches: Vec<(WorkerId, WireKey)>,
        jobs: Vec<Job>,
    }
    impl Outbox for Rec {
        fn to_scheduler(&mut self, msg: ToScheduler) {
            self.sent.push(msg);
        }
        fn fetch(&mut self, from: WorkerId, key: WireKey) {
            self.fetches.push((from, key));
        }
        fn run(&mut self, job: Job) {
            self.jobs.push(job);
        }
    }

    /// The scheduler's run in the `Compute` of `key` (`compute`).
    fn run(key: u8) -> u64 {
        1000 + u64::from(key)
    }

    fn compute(key: u8, function: &str, deps: &[u8], who_has: &[(u8, &[u32])]) -> Compute {
        Compute {
            key: [key; 32],
            run: run(key),
            name: "t".into(),
            function: function.into(),
            payload: Arc::from(&[][..]),
            deps: deps.iter().map(|&d| [d; 32]).collect(),
            who_has: who_has
                .iter()
                .map(|&(k, ws)| ([k; 32], ws.iter().map(|&w| WorkerId(w)).collect()))
                .collect(),
            priority: Priority {
                user: 0,
                order: key as u64,
            },
            timeout: None,
            retries: 0,
        }
    }

    fn state() -> WorkerState {
        WorkerState::new(WorkerId(0), Arc::new(Reg), Store::default())
    }

    fn put(s: &WorkerState, key: u8) {
        s.store.insert(
            [key; 32],
            Stored {
                value: Arc::new(1i64),
                nbytes: 1,
            },
        );
    }

    #[test]
    fn local_inputs_run_at_once_in_dep_order() {
        let mut s = state();
        let mut out = Rec::default();
        put(&s, 1);
        put(&s, 2);
        s.on_compute(compute(3, "add", &[2, 1, 2], &[]), &mut out);
        assert_eq!(out.jobs.len(), 1);
        assert_eq!(out.jobs[0].inputs.len(), 3);
        let job = out.jobs.pop().unwrap();
        let stored = Stored {
            value: Arc::new(3i64),
            nbytes: 1,
        };
        s.on_task_done(
            Done {
                duration_ns: 5,
                inline: Some(Arc::from(&[3u8][..])),
                thread: 1,
                ..done(&job, Ok(stored))
            },
            &mut out,
        );
        assert_eq!(
            out.sent,
            vec![ToScheduler::TaskFinished {
                key: [3; 32],
                run: run(3),
                nbytes: 1,
                duration_ns: 5,
                value: Some(Arc::from(&[3u8][..])),
                thread: 1,
            }]
        );
        assert_eq!(s.pending(), 0);
    }

    /// A secession counts only from the current run of its key: one of a
    /// task released (or sent by the last scheduler) is no news, even
    /// when the key is sent again; the current one names the scheduler's
    /// run of its `Compute`.
    #[test]
    fn only_the_current_run_of_a_key_runs_it() {
        let mut s = state();
        let mut out = Rec::default();
        put(&s, 1);
        s.on_compute(compute(3, "add", &[1], &[]), &mut out);
        let first = out.jobs.pop().unwrap();
        assert_eq!(s.run_of(&[3; 32], first.id), Some(run(3)));
        s.on_release([3; 32], &mut out);
        assert_eq!(s.run_of(&[3; 32], first.id), None);
        let again = Compute {
            run: run(3) + 1,
            ..compute(3, "add", &[1], &[])
        };
        s.on_compute(again, &mut out);
        let second = out.jobs.pop().unwrap();
        assert_eq!(s.run_of(&[3; 32], second.id), Some(run(3) + 1));
        assert_eq!(
            s.run_of(&[3; 32], first.id),
            None,
            "an older run of the same key"
        );
    }

    #[test]
    fn missing_inputs_are_fetched_once_then_the_task_runs() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(3, "add", &[1], &[(1, &[7])]), &mut out);
        s.on_compute(compute(4, "add", &[1], &[(1, &[7])]), &mut out);
        assert_eq!(out.fetches, vec![(WorkerId(7), [1; 32])]);
        assert!(out.jobs.is_empty());
        s.on_fetched(
            WorkerId(7),
            [1; 32],
            FetchResult::Data(Arc::from(&[2u8][..])),
            &mut out,
        );
        assert_eq!(out.jobs.len(), 2);
        assert_eq!(out.sent, vec![ToScheduler::DataAdded { key: [1; 32] }]);
    }

    #[test]
    fn a_copy_asked_for_is_fetched_and_kept() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_fetch([1; 32], vec![WorkerId(7), WorkerId(8)], &mut out);
        assert_eq!(out.fetches, vec![(WorkerId(7), [1; 32])]);
        // The first holder fails: reported, the next one is tried.
        s.on_fetched(WorkerId(7), [1; 32], FetchResult::Missing, &mut out);
        assert_eq!(out.fetches[1], (WorkerId(8), [1; 32]));
        s.on_fetched(
            WorkerId(8),
            [1; 32],
            FetchResult::Data(Arc::from(&[2u8][..])),
            &mut out,
        );
        assert_eq!(
            out.sent,
            vec![
                ToScheduler::FetchFailed {
                    key: [1; 32],
                    holder: WorkerId(7)
                },
                ToScheduler::DataAdded { key: [1; 32] }
            ]
        );
        assert!(s.store.contains(&[1; 32]), "no task waits: kept");
        assert!(out.jobs.is_empty());
        // Asked again for what it holds: says so at once, fetches nothing.
        s.on_fetch([1; 32], vec![WorkerId(8)], &mut out);
        assert_eq!(out.fetches.len(), 2);
        assert_eq!(out.sent[2], ToScheduler::DataAdded { key: [1; 32] });
    }

    #[test]
    fn a_copy_released_while_fetched_is_dropped() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_fetch([1; 32], vec![WorkerId(7)], &mut out);
        s.on_release([1; 32], &mut out);
        s.on_fetched(
            WorkerId(7),
            [1; 32],
            FetchResult::Data(Arc::from(&[2u8][..])),
            &mut out,
        );
        assert!(out.sent.is_empty());
        assert!(!s.store.contains(&[1; 32]));
        // Only itself named as holder: nothing to fetch from.
        s.on_fetch([2; 32], vec![WorkerId(0)], &mut out);
        assert!(out.fetches.len() == 1 && out.sent.is_empty());
    }

    #[test]
    fn failed_fetch_tries_the_next_holder_then_gives_the_task_back() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(3, "add", &[1], &[(1, &[7, 8])]), &mut out);
        let (first, _) = out.fetches[0];
        s.on_fetched(first, [1; 32], FetchResult::Lost, &mut out);
        assert_eq!(out.fetches.len(), 2);
        let (second, _) = out.fetches[1];
        assert_ne!(first, second);
        s.on_fetched(second, [1; 32], FetchResult::Missing, &mut out);
        assert_eq!(
            out.sent,
            vec![
                ToScheduler::FetchFailed {
                    key: [1; 32],
                    holder: first
                },
                ToScheduler::FetchFailed {
                    key: [1; 32],
                    holder: second
                },
                ToScheduler::TaskAbandoned {
                    key: [3; 32],
                    run: run(3),
                },
            ]
        );
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn released_task_result_is_dropped() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(3, "add", &[], &[]), &mut out);
        let job = out.jobs.pop().unwrap();
        s.on_release([3; 32], &mut out);
        assert!(job.cancelled.load(Ordering::Relaxed));
        // Computed again after the release: the old result must not count.
        s.on_compute(compute(3, "add", &[], &[]), &mut out);
        let again = out.jobs.pop().unwrap();
        s.on_task_done(done(&job, ok()), &mut out);
        assert!(out.sent.is_empty());
        assert_eq!(s.pending(), 1);
        assert_ne!(again.id, job.id);
    }

    #[test]
    fn a_lost_scheduler_takes_every_task_fetch_and_value_and_tells_nobody() {
        let mut s = state();
        let mut out = Rec::default();
        put(&s, 1);
        // Running, waiting for a fetch, and chained after the running one.
        s.on_compute(compute(3, "add", &[1], &[]), &mut out);
        s.on_compute(compute(4, "add", &[2], &[(2, &[7])]), &mut out);
        s.on_compute(compute(5, "add", &[3], &[]), &mut out);
        let running = out.jobs.pop().unwrap();
        let successor = running.next.lock().unwrap().job.take().unwrap();
        let sent_before = out.sent.len();
        assert_eq!(s.on_scheduler_lost(), (3, 1));
        assert!(out.sent.len() == sent_before && out.jobs.is_empty());
        assert!(running.cancelled.load(Ordering::Relaxed));
        assert!(successor.cancelled.load(Ordering::Relaxed));
        assert_eq!(s.store.clear(), 0);
        assert_eq!(s.pending(), 0);
        // Registered again under another id: late answers and reports of
        // the lost connection count for nothing.
        s.on_registered(WorkerId(9));
        s.on_fetched(
            WorkerId(7),
            [2; 32],
            FetchResult::Data(Arc::from(&[2u8][..])),
            &mut out,
        );
        s.on_task_done(done(&running, ok()), &mut out);
        assert!(out.sent.is_empty() && out.jobs.is_empty());
        assert_eq!(s.store.clear(), 0);
        // The same task again is a new one, with a new local id; its input
        // is fetched now, and never from the worker itself.
        s.on_compute(compute(3, "add", &[1], &[(1, &[9, 8])]), &mut out);
        assert_eq!(out.fetches.pop(), Some((WorkerId(8), [1; 32])));
        put(&s, 1);
        s.on_compute(compute(6, "add", &[1], &[]), &mut out);
        let again = out.jobs.pop().unwrap();
        assert!(again.id > successor.id.max(running.id));
        s.on_task_done(done(&running, ok()), &mut out);
        assert!(out.sent.is_empty(), "the old report passes for nothing");
    }

    #[test]
    fn unregistered_or_panicking_resolution_fails_the_task() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(3, "nope", &[], &[]), &mut out);
        s.on_compute(compute(4, "bad", &[], &[]), &mut out);
        match &out.sent[..] {
            [ToScheduler::TaskErred {
                key: a,
                run: ra,
                failure: fa,
            }, ToScheduler::TaskErred {
                key: b,
                run: rb,
                failure: fb,
            }] => {
                assert_eq!((*a, *b), ([3; 32], [4; 32]));
                assert_eq!((*ra, *rb), (run(3), run(4)), "each names its run");
                assert!(
                    fa.message.contains("`nope` is not registered"),
                    "{}",
                    fa.message
                );
                assert!(fb.message.contains("decoder exploded"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn input_the_scheduler_thinks_is_here_but_is_not() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(3, "add", &[1], &[]), &mut out);
        assert_eq!(
            out.sent,
            vec![
                ToScheduler::FetchFailed {
                    key: [1; 32],
                    holder: WorkerId(0)
                },
                ToScheduler::TaskAbandoned {
                    key: [3; 32],
                    run: run(3),
                },
            ]
        );
    }

    fn done(job: &Job, outcome: Result<Stored, Arc<Failure>>) -> Done {
        Done {
            id: job.id,
            key: job.key,
            function: job.function.clone(),
            outcome,
            duration_ns: 1,
            inline: None,
            thread: 0,
        }
    }

    fn ok() -> Result<Stored, Arc<Failure>> {
        Ok(Stored {
            value: Arc::new(1i64),
            nbytes: 1,
        })
    }

    #[test]
    fn an_input_computed_here_is_waited_for_not_fetched() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(1, "add", &[], &[]), &mut out);
        let one = out.jobs.pop().unwrap();
        // The pool took 1's successor slot already (it ran 1): 2 waits.
        assert!(one.take_successor().is_none());
        // Sent early: its input is task 1 of this worker (no holder named).
        s.on_compute(compute(2, "add", &[1], &[(1, &[])]), &mut out);
        assert!(out.fetches.is_empty() && out.sent.is_empty() && out.jobs.is_empty());
        s.on_task_done(done(&one, ok()), &mut out);
        // 2 is dispatched by the same handler that stored 1.
        assert_eq!(out.jobs.len(), 1);
        assert_eq!(out.jobs[0].key, [2; 32]);
        assert_eq!(
            out.sent,
            vec![ToScheduler::TaskFinished {
                key: [1; 32],
                run: run(1),
                nbytes: 1,
                duration_ns: 1,
                value: None,
                thread: 0,
            }]
        );
    }

    #[test]
    fn a_chain_becomes_successors_run_by_the_thread_of_their_input() {
        let mut s = state();
        let mut out = Rec::default();
        put(&s, 9);
        s.on_compute(compute(1, "add", &[], &[]), &mut out);
        s.on_compute(compute(2, "add", &[1, 9, 1], &[]), &mut out);
        s.on_compute(compute(3, "add", &[2], &[]), &mut out);
        // Only the head goes to the pool; 2 and 3 hang behind it.
        assert_eq!(out.jobs.len(), 1);
        let one = out.jobs.pop().unwrap();
        let two = one.take_successor().expect("2 follows 1");
        assert_eq!(two.key, [2; 32]);
        // The places of 1's value are left for the thread to fill.
        let filled: Vec<bool> = two.inputs.iter().map(Option::is_some).collect();
        assert_eq!(filled, vec![false, true, false]);
        let three = two.take_successor().expect("3 follows 2");
        assert_eq!(three.key, [3; 32]);
        // The thread reports each link; none is dispatched a second time.
        for job in [&one, &two, &three] {
            s.on_task_done(done(job, ok()), &mut out);
        }
        assert!(out.jobs.is_empty());
        assert_eq!(out.sent.len(), 3);
        assert_eq!(s.pending(), 0);
        // A link arriving once its input's slot is closed waits as usual.
        s.on_compute(compute(4, "add", &[3], &[]), &mut out);
        assert_eq!(out.jobs.len(), 1, "3 is in the store: 4 runs at once");
    }

    #[test]
    fn a_failed_local_input_gives_its_waiting_dependents_back() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(1, "add", &[], &[]), &mut out);
        s.on_compute(compute(2, "add", &[1], &[]), &mut out);
        s.on_compute(compute(3, "add", &[2], &[]), &mut out);
        let one = out.jobs.pop().unwrap();
        let failure = Arc::new(Failure::new(
            Key([1; 32]),
            "t".into(),
            FailureKind::Failed,
            "no".into(),
        ));
        s.on_task_done(done(&one, Err(failure)), &mut out);
        assert!(out.jobs.is_empty(), "dependents of a failure never run");
        match &out.sent[..] {
            [ToScheduler::TaskErred { key, run: r, .. }, ToScheduler::TaskAbandoned { key: a, run: ra }, ToScheduler::TaskAbandoned { key: b, run: rb }] =>
            {
                assert_eq!((key[0], a[0], b[0]), (1, 2, 3));
                assert_eq!(
                    (*r, *ra, *rb),
                    (run(1), run(2), run(3)),
                    "each names its run"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_released_dependent_stops_waiting_and_a_released_input_gives_it_back() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(1, "add", &[], &[]), &mut out);
        s.on_compute(compute(2, "add", &[1], &[]), &mut out);
        s.on_release([2; 32], &mut out);
        let one = out.jobs.pop().unwrap();
        s.on_task_done(done(&one, ok()), &mut out);
        assert!(out.jobs.is_empty(), "the released dependent does not run");
        assert_eq!(s.pending(), 0);
        out.sent.clear();
        // Now the input is released while its dependent waits for it.
        s.on_compute(compute(4, "add", &[], &[]), &mut out);
        s.on_compute(compute(5, "add", &[4], &[]), &mut out);
        s.on_release([4; 32], &mut out);
        assert_eq!(
            out.sent,
            vec![ToScheduler::TaskAbandoned {
                key: [5; 32],
                run: run(5),
            }]
        );
        assert_eq!(s.pending(), 0);
    }

    fn sized(n: u64) -> Stored {
        Stored {
            value: Arc::new(1i64),
            nbytes: n,
        }
    }

    #[test]
    fn a_paused_worker_holds_tasks_back_until_memory_drops() {
        // Limit 100: paused above 95 bytes held.
        let mut s = WorkerState::new(WorkerId(0), Arc::new(Reg), Store::unspilled(100));
        let mut out = Rec::default();
        s.store.insert([1; 32], sized(50));
        s.store.insert([2; 32], sized(50));
        assert!(s.store.paused());
        s.on_compute(compute(3, "add", &[1], &[]), &mut out);
        s.on_compute(compute(4, "add", &[], &[]), &mut out);
        // A task waiting for 4 attaches no successor while paused.
        s.on_compute(compute(5, "add", &[4], &[]), &mut out);
        assert!(out.jobs.is_empty(), "nothing starts while paused");
        assert_eq!(s.pending(), 3);
        s.resume(&mut out);
        assert!(out.jobs.is_empty(), "still paused");
        // A released task is not run later.
        s.on_release([4; 32], &mut out);
        assert_eq!(
            out.sent,
            vec![ToScheduler::TaskAbandoned {
                key: [5; 32],
                run: run(5),
            }]
        );
        s.on_release([2; 32], &mut out);
        assert!(!s.store.paused());
        s.resume(&mut out);
        let keys: Vec<u8> = out.jobs.iter().map(|j| j.key[0]).collect();
        assert_eq!(keys, vec![3]);
        assert!(out.jobs[0].take_successor().is_none());
    }

    #[test]
    fn a_task_not_started_is_given_up_and_never_runs() {
        let mut s = state();
        let mut out = Rec::default();
        // Queued for a thread: its job is out, no thread took it.
        s.on_compute(compute(3, "add", &[], &[]), &mut out);
        let queued = out.jobs.pop().unwrap();
        // Waiting for an input being fetched, and chained after the
        // queued job (rule 5): neither started.
        s.on_compute(compute(4, "add", &[1], &[(1, &[7])]), &mut out);
        s.on_compute(compute(5, "add", &[3], &[]), &mut out);
        s.on_give_up([3; 32], 11, &mut out);
        s.on_give_up([4; 32], 12, &mut out);
        assert_eq!(
            out.sent,
            vec![
                ToScheduler::TaskGivenUp {
                    key: [3; 32],
                    id: 11
                },
                // Its local dependent comes back after the answer (rule 1).
                ToScheduler::TaskAbandoned {
                    key: [5; 32],
                    run: run(5),
                },
                ToScheduler::TaskGivenUp {
                    key: [4; 32],
                    id: 12
                },
            ]
        );
        assert_eq!(s.pending(), 0);
        // The thread that reaches the queued job cannot take it, nor its
        // successor.
        let successor = queued.next.lock().unwrap().job.take();
        assert!(!queued.claim.run());
        assert!(successor.is_some_and(|j| j.cancelled.load(Ordering::Relaxed)));
        // The input arrives later: nothing runs, nothing is said.
        out.sent.clear();
        s.on_fetched(
            WorkerId(7),
            [1; 32],
            FetchResult::Data(Arc::from(&[2u8][..])),
            &mut out,
        );
        assert!(out.jobs.is_empty() && out.sent.is_empty());
        // Computed again later, it is a new task with a claim of its own.
        s.on_compute(compute(3, "add", &[], &[]), &mut out);
        assert!(out.jobs.pop().unwrap().claim.run());
    }

    #[test]
    fn a_started_or_unknown_task_is_kept_and_reports_as_usual() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(3, "add", &[], &[]), &mut out);
        let job = out.jobs.pop().unwrap();
        assert!(job.claim.run(), "a thread took it");
        s.on_give_up([3; 32], 1, &mut out);
        // Unknown here (never sent, or finished and reported already).
        s.on_give_up([9; 32], 2, &mut out);
        s.on_task_done(done(&job, ok()), &mut out);
        assert!(matches!(
            &out.sent[..],
            [
                ToScheduler::TaskKept {
                    key: [3, ..],
                    id: 1
                },
                ToScheduler::TaskKept {
                    key: [9, ..],
                    id: 2
                },
                ToScheduler::TaskFinished { key: [3, ..], .. },
            ]
        ));
        assert!(!job.cancelled.load(Ordering::Relaxed));
    }

    #[test]
    fn a_task_held_back_while_paused_can_be_given_up() {
        let mut s = WorkerState::new(WorkerId(0), Arc::new(Reg), Store::unspilled(100));
        let mut out = Rec::default();
        s.store.insert([1; 32], sized(96));
        s.on_compute(compute(3, "add", &[], &[]), &mut out);
        assert!(out.jobs.is_empty(), "held back");
        s.on_give_up([3; 32], 5, &mut out);
        assert_eq!(
            out.sent,
            vec![ToScheduler::TaskGivenUp {
                key: [3; 32],
                id: 5
            }]
        );
        s.on_release([1; 32], &mut out);
        s.resume(&mut out);
        assert!(out.jobs.is_empty(), "given up: not run on resuming");
    }

    #[test]
    fn a_claim_is_taken_once_by_the_runner_or_the_give_up() {
        // The race of a compute thread starting a job and the network
        // thread giving it up: exactly one wins, every time.
        for _ in 0..2_000 {
            let claim = Claim::default();
            let other = claim.clone();
            let runner = std::thread::spawn(move || other.run());
            let given = claim.give_up();
            let ran = runner.join().unwrap();
            assert!(ran != given, "ran {ran}, given up {given}");
        }
    }

    /// A worker whose store (limit 100 bytes, under a scratch directory
    /// named after `what`) holds keys 1 and 2 of 70 bytes each, key 1
    /// spilled (the older, over 60 bytes): its state, store, directory and
    /// key 1's file, once the spill thread wrote it (bounded).
    fn with_key_1_spilled(
        what: &str,
    ) -> (WorkerState, Store, std::path::PathBuf, std::path::PathBuf) {
        let parent = std::env::temp_dir().join(format!("rask-state-{what}-{}", std::process::id()));
        let store = Store::new(Some(100), parent.clone());
        let s = WorkerState::new(WorkerId(4), Arc::new(Reg), store.clone());
        store.insert([1; 32], sized(70));
        store.insert([2; 32], sized(70));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let file = loop {
            if let Some(file) = store.spill_file(&[1; 32]) {
                break file;
            }
            assert!(std::time::Instant::now() < deadline, "never spilled");
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        (s, store, parent, file)
    }

    #[test]
    fn a_damaged_spilled_input_is_reported_lost_and_its_task_given_back() {
        let (mut s, store, parent, file) = with_key_1_spilled("lost");
        let mut out = Rec::default();
        std::fs::write(&file, b"not an entry").unwrap();
        s.on_compute(compute(3, "add", &[2, 1], &[]), &mut out);
        assert!(out.jobs.is_empty(), "never run on a damaged input");
        assert_eq!(
            out.sent,
            vec![
                ToScheduler::FetchFailed {
                    key: [1; 32],
                    holder: WorkerId(4)
                },
                ToScheduler::TaskAbandoned {
                    key: [3; 32],
                    run: run(3),
                },
            ]
        );
        assert!(!store.contains(&[1; 32]));
        assert_eq!(store.report().unwrap().lost, 1);
        store.close();
        let _ = std::fs::remove_dir_all(&parent);
    }

    /// A spilled input whose file cannot be read now (an I/O error: here
    /// a directory in the file's place, which opens but does not read)
    /// keeps its value; its task waits, nothing reported, and runs once
    /// the file reads again.
    #[test]
    fn a_spilled_input_unreadable_for_now_holds_its_task_until_it_reads() {
        let (mut s, store, parent, file) = with_key_1_spilled("later");
        let mut out = Rec::default();
        let whole = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        s.on_compute(compute(3, "add", &[2, 1], &[]), &mut out);
        s.resume(&mut out);
        assert!(out.jobs.is_empty() && out.sent.is_empty());
        assert!(store.contains(&[1; 32]));
        assert_eq!(store.report().unwrap().lost, 0);
        std::fs::remove_dir(&file).unwrap();
        std::fs::write(&file, whole).unwrap();
        s.resume(&mut out);
        assert_eq!(out.jobs.len(), 1);
        assert_eq!(out.jobs[0].key, [3; 32]);
        assert!(out.sent.is_empty());
        store.close();
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[test]
    fn an_input_already_finished_here_lets_an_early_task_run_at_once() {
        let mut s = state();
        let mut out = Rec::default();
        s.on_compute(compute(1, "add", &[], &[]), &mut out);
        let one = out.jobs.pop().unwrap();
        s.on_task_done(done(&one, ok()), &mut out);
        // The scheduler sent 2 before it read 1's report.
        s.on_compute(compute(2, "add", &[1], &[]), &mut out);
        assert_eq!(out.jobs.len(), 1);
    }

    /// Property test: whatever the scheduler sends, in any order, with
    /// jobs and fetches ending in any order: no panic, and nothing is
    /// reported about a task the scheduler did not send or released
    /// (rule 3), nor a copy nobody asked this worker to fetch.
    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            /// `Compute` of `k(key)` with these inputs and holders (ids 0
            /// to 2, 0 being this worker); `registered`: a function the
            /// registry knows.
            Compute {
                key: u8,
                deps: Vec<u8>,
                holders: Vec<(u8, Vec<u32>)>,
                registered: bool,
            },
            Release(u8),
            Fetch(u8, Vec<u32>),
            GiveUp(u8, u64),
            /// The pool runs the `i`-th job handed to it (modulo), with
            /// success or not, then its successor.
            Run(usize, bool),
            /// The `i`-th fetch asked (modulo) is answered: 0 data, 1
            /// missing, 2 lost.
            Fetched(usize, u8),
            SchedulerLost,
        }

        fn op() -> impl Strategy<Value = Op> {
            let key = || 1..=6u8;
            let holders = || proptest::collection::vec(0..3u32, 0..3);
            prop_oneof![
                4 => (
                    key(),
                    proptest::collection::vec(key(), 0..3),
                    proptest::collection::vec((key(), holders()), 0..3),
                    prop_oneof![5 => Just(true), 1 => Just(false)],
                )
                    .prop_map(|(key, deps, holders, registered)| Op::Compute {
                        key,
                        deps,
                        holders,
                        registered,
                    }),
                2 => key().prop_map(Op::Release),
                1 => (key(), holders()).prop_map(|(k, h)| Op::Fetch(k, h)),
                1 => (key(), any::<u64>()).prop_map(|(k, id)| Op::GiveUp(k, id)),
                4 => (any::<usize>(), prop_oneof![4 => Just(true), 1 => Just(false)])
                    .prop_map(|(i, ok)| Op::Run(i, ok)),
                3 => (any::<usize>(), 0..3u8).prop_map(|(i, how)| Op::Fetched(i, how)),
                1 => Just(Op::SchedulerLost),
            ]
        }

        fn failed(key: WireKey) -> Result<Stored, Arc<Failure>> {
            Err(Arc::new(Failure::new(
                Key(key),
                "t".into(),
                FailureKind::Failed,
                "no".into(),
            )))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn reports_only_what_was_asked(ops in proptest::collection::vec(op(), 1..60)) {
                let mut s = state();
                let mut out = Rec::default();
                // Keys sent (`Compute`) and not released or reported since.
                let mut asked: HashSet<WireKey> = HashSet::new();
                // Keys this worker was asked to fetch, as an input or a copy.
                let mut to_fetch: HashSet<WireKey> = HashSet::new();
                let mut jobs: Vec<Job> = Vec::new();
                let mut fetches: Vec<(WorkerId, WireKey)> = Vec::new();
                for op in ops {
                    match op {
                        Op::Compute { key, deps, holders, registered } => {
                            let holders: Vec<(u8, &[u32])> =
                                holders.iter().map(|(k, h)| (*k, &h[..])).collect();
                            let function = if registered { "add" } else { "nope" };
                            asked.insert([key; 32]);
                            to_fetch.extend(deps.iter().map(|&d| [d; 32]));
                            s.on_compute(compute(key, function, &deps, &holders), &mut out);
                        }
                        Op::Release(key) => {
                            asked.remove(&[key; 32]);
                            s.on_release([key; 32], &mut out);
                        }
                        Op::Fetch(key, holders) => {
                            to_fetch.insert([key; 32]);
                            let holders = holders.into_iter().map(WorkerId).collect();
                            s.on_fetch([key; 32], holders, &mut out);
                        }
                        Op::GiveUp(key, id) => s.on_give_up([key; 32], id, &mut out),
                        Op::Run(i, ok) if !jobs.is_empty() => {
                            // As `run_link` does.
                            let job = jobs.swap_remove(i % jobs.len());
                            let successor = job.take_successor();
                            if job.cancelled.load(Ordering::Relaxed) || !job.claim.run() {
                                continue;
                            }
                            let outcome = if ok { super::ok() } else { failed(job.key) };
                            let succeeded = outcome.is_ok();
                            s.on_task_done(done(&job, outcome), &mut out);
                            if let (true, Some(mut next)) = (succeeded, successor) {
                                for input in next.inputs.iter_mut().filter(|i| i.is_none()) {
                                    *input = Some(Arc::new(1i64));
                                }
                                jobs.push(next);
                            }
                        }
                        Op::Fetched(i, how) if !fetches.is_empty() => {
                            let (from, key) = fetches.swap_remove(i % fetches.len());
                            let result = match how {
                                0 => FetchResult::Data(Arc::from(&[1u8][..])),
                                1 => FetchResult::Missing,
                                _ => FetchResult::Lost,
                            };
                            s.on_fetched(from, key, result, &mut out);
                        }
                        Op::Run(..) | Op::Fetched(..) => {}
                        Op::SchedulerLost => {
                            s.on_scheduler_lost();
                            asked.clear();
                            to_fetch.clear();
                            fetches.clear();
                        }
                    }
                    jobs.append(&mut out.jobs);
                    for &(from, key) in &out.fetches {
                        prop_assert_ne!(from, WorkerId(0), "fetched {:?} from itself", key);
                        prop_assert!(to_fetch.contains(&key), "fetched {key:?} unasked");
                    }
                    fetches.append(&mut out.fetches);
                    for msg in out.sent.drain(..) {
                        match msg {
                            ToScheduler::TaskFinished { key, .. }
                            | ToScheduler::TaskErred { key, .. }
                            | ToScheduler::TaskAbandoned { key, .. }
                            | ToScheduler::TaskGivenUp { key, .. } => {
                                prop_assert!(
                                    asked.remove(&key),
                                    "reported {msg:?}, not asked or released"
                                );
                            }
                            ToScheduler::DataAdded { key } => {
                                prop_assert!(to_fetch.contains(&key), "copy of {key:?} unasked");
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}
