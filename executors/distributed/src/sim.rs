//! A simulated cluster: the real scheduler state machine, in-process
//! simulated workers and one simulated client, on a simulated clock, with
//! faults injected at chosen steps. One thread, no sockets, no sleeps: a
//! seed replays a run exactly.
//!
//! ```
//! use std::sync::Arc;
//! use rask_distributed::protocol::{TaskSpec, WireFailure};
//! use rask_distributed::sim::{Fault, Sim};
//! use rask_executor::Value;
//!
//! // Two tasks: `a` and `b = a + 1`. Payloads hold the literal.
//! let spec = |n: u8, deps: &[u8]| TaskSpec {
//!     key: [n; 32],
//!     name: format!("t{n}").into(),
//!     function: "add".into(),
//!     payload: Arc::from(&[n][..]),
//!     deps: deps.iter().map(|&d| [d; 32]).collect(),
//!     timeout_ms: None,
//!     retries: 0,
//!     annotations: Default::default(),
//! };
//! let mut add = |task: &TaskSpec, inputs: &mut [Option<Value>]| -> Result<Value, Box<WireFailure>> {
//!     let sum: u64 = inputs.iter().map(|v| rask_distributed::sim::decode_u64(v.as_ref().unwrap())).sum();
//!     Ok(Arc::new(sum + u64::from(task.payload[0])))
//! };
//! let report = Sim::new(3, 42)
//!     .fault(Fault::KillWorker { step: 5, worker: 0 })
//!     .run(vec![spec(1, &[]), spec(2, &[1])], vec![[2; 32]], &mut add);
//! let b = report.results[&[2; 32]].as_ref().unwrap();
//! assert_eq!(postcard::from_bytes::<u64>(b).unwrap(), 3);
//! assert_eq!(report.remembered, 0); // everything released and forgotten
//! ```
//!
//! # Rules
//!
//! 1. **The scheduler is the real one.** Every message goes through the
//!    same `State` handlers as in `rask-scheduler`, dispatched as its shell
//!    does; `State::check_invariants` runs after every step unless turned
//!    off ([`Sim::check_invariants`]).
//! 2. **One clock, one generator.** Time is a tick counter (read it as
//!    microseconds), which the scheduler's clock follows as its shell's
//!    does (`State::on_tick` every 100 000 ticks, while anything else is
//!    to happen); every latency, task duration and random choice comes
//!    from one [`SplitMix64`] seeded by the seed, in the order events are
//!    handled. Everything that is iterated is ordered (B-trees), so equal
//!    seeds give equal [`Report::log`]s.
//! 3. **A step is one event handled**: a message delivered, a run ended, a
//!    fetch answered, a worker lost or joined. Faults name the step they
//!    happen at.
//! 4. **Links are FIFO.** Messages on one link (scheduler → worker, worker
//!    → scheduler, scheduler ↔ client) arrive in the order sent, each after
//!    a random latency of 1–10 ticks; a delayed message holds back the ones
//!    sent after it on its link, as TCP would.
//! 5. **A killed worker is replaced.** Its values and runs vanish; the
//!    scheduler hears of the loss after the messages the worker had already
//!    sent (S7), and a new worker (a new id) registers soon after, as a
//!    supervisor would restart it, so a run always has its worker count.
//!    A worker the client retires ([`Fault::RetireWorker`], S16) exits
//!    when the scheduler says `Retire`, after what it sent, and is not
//!    replaced; one asked to stop ([`Fault::LeaveWorker`], S16a) exits
//!    the same way, and a new worker takes its place later.
//! 6. **Workers keep the worker's contract** (`worker/state.rs` rules 1–3)
//!    in a simpler model: a task runs once every input is in its store,
//!    `threads` at a time in priority order; a missing input named in the
//!    `Compute` is fetched from its holders in turn (`FetchFailed` for each
//!    that does not deliver it, `TaskAbandoned` when none is left); an input
//!    the worker computes itself (sent early, S9) is waited for; an input it
//!    neither holds nor computes and was not told of (it held it and lost it)
//!    is reported missing (`FetchFailed` naming itself) and the task given
//!    back. Values fetched from a peer arrive [`Encoded`], as over a socket.
//!    A task asked for back (`GiveUp`, S15) is given up if it has not
//!    started running, else kept (`worker/state.rs` rule 8).
//!    A copy asked for (`Fetch`, S13, as retirements ask) is fetched from
//!    the holders named, in turn, and reported `DataAdded`; one held
//!    already is reported at once. Not modelled: successors (worker rule
//!    5), timeouts, heartbeats, memory limits (S17).
//! 7. **The client wants every output once**, fetches values too big to
//!    travel inline from their holders (reporting `FetchFailed`), and
//!    releases everything when all are known; the run goes on until no event
//!    is left, so [`Report::remembered`] and [`Report::held`] say whether the
//!    scheduler forgot everything and every value was released.
//!
//! # Design
//!
//! The workers are a model, not the real `worker/state.rs`: that one hands
//! ops to a thread pool and fetches through sockets, and the simulation must
//! stay on one thread to replay. What is under test is the scheduler; the
//! model keeps the messages a worker sends and when, which is all the
//! scheduler sees.
//!
//! What a task computes is up to the caller's runner (a closure over the
//! [`TaskSpec`] and its inputs): [`Cluster`] resolves functions through a
//! [`Registry`], as a worker does, so a program's own tasks run; tests and
//! benchmarks pass plain closures.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rask_executor::{
    Encoded, Executor, Failure, FailureKind, Key, Plan, PlanBuilder, Registry, Reporter, Value,
    WireTask,
};

use crate::protocol::{
    Priority, TaskSpec, ToClient, ToScheduler, ToWorker, WireEvent, WireFailure, WireFailureKind,
    WireKey, WorkerId, INLINE_BYTES,
};
use crate::scheduler::state::{
    ClientId, Finished, Outbox, Registration, Reporter as FetchReporter, State,
};
use rask_executor::Resources;

/// The seeded generator behind every choice of a simulation: SplitMix64
/// (Steele, Lea and Flood), small, fast and good enough to pick latencies.
///
/// # Examples
///
/// ```
/// use rask_distributed::sim::SplitMix64;
/// let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose sequence is decided by `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// A fault to inject into a simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// At step `step`, the worker at position `worker` (modulo their
    /// number) among the live workers, in id order, dies: its values and
    /// runs are lost (rule 5).
    KillWorker {
        /// The step.
        step: u64,
        /// Which live worker.
        worker: u32,
    },
    /// At step `step`, a worker silently drops one value it holds (a worker
    /// and a value chosen by the seed among those held), as if its memory
    /// lost it; the scheduler learns of it when someone fails to fetch it.
    LoseValue {
        /// The step.
        step: u64,
    },
    /// The first message sent at or after step `step` arrives `by` ticks
    /// later than it would, and holds back its link behind it (rule 4).
    DelayMessage {
        /// The step.
        step: u64,
        /// The extra latency, in ticks.
        by: u64,
    },
    /// At step `step`, the client asks to retire the worker at position
    /// `worker` (modulo their number) among the live workers, in id order
    /// (S16): it finishes what it was sent, its values are copied to the
    /// workers that stay, then it exits and is not replaced (rule 5).
    RetireWorker {
        /// The step.
        step: u64,
        /// Which live worker.
        worker: u32,
    },
    /// At step `step`, the worker at position `worker` (modulo their
    /// number) among the live workers, in id order, is asked to stop, as
    /// `SIGTERM` asks a worker process (`worker` rule 17): it asks to
    /// leave (S16a), finishes what it was sent, its values are copied to
    /// the workers that stay (the last worker leaves at once), then it
    /// exits; a new worker takes its place later, as a supervisor would
    /// start one.
    LeaveWorker {
        /// The step.
        step: u64,
        /// Which live worker.
        worker: u32,
    },
    /// The `nth` run (from 1) of function `function`, counted over the
    /// whole cluster, fails as `how` says.
    FailRun {
        /// The function's registered name.
        function: String,
        /// Which run.
        nth: u32,
        /// How it fails.
        how: FailHow,
    },
}

/// How an injected run failure shows ([`Fault::FailRun`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailHow {
    /// The worker dies while running it: the scheduler counts the death
    /// against the task (S7) and runs it again elsewhere, so results do not
    /// change unless it happens `allowed failures` times.
    Crash,
    /// The task errs (`TaskErred`, kind `Failed`): it and its dependents
    /// fail (S8), as a task returning an error would.
    Error,
}

/// What happened in a simulation, in order ([`Report::log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A worker registered.
    Joined(WorkerId),
    /// A worker started running a task.
    Ran {
        /// The worker.
        worker: WorkerId,
        /// The task's key.
        key: WireKey,
        /// The task's name.
        name: Arc<str>,
    },
    /// A worker's run ended (with a value or a failure) and was reported.
    Finished {
        /// The worker.
        worker: WorkerId,
        /// The task's key.
        key: WireKey,
    },
    /// A worker fetched a value from a peer.
    Fetched {
        /// The worker.
        worker: WorkerId,
        /// The value's key.
        key: WireKey,
        /// The peer it came from.
        from: WorkerId,
    },
    /// A worker gave a task back (an input could not be had).
    Abandoned {
        /// The worker.
        worker: WorkerId,
        /// The task's key.
        key: WireKey,
    },
    /// A worker was killed ([`Fault::KillWorker`], or a [`FailHow::Crash`]
    /// while it ran `key`).
    Killed {
        /// The worker.
        worker: WorkerId,
        /// The task whose run crashed it, if any.
        key: Option<WireKey>,
    },
    /// A worker left when told to ([`Fault::RetireWorker`]).
    Retired {
        /// The worker.
        worker: WorkerId,
    },
    /// The scheduler answered a retirement the client asked for.
    RetireAnswered {
        /// Why it was refused, if it was.
        error: Option<String>,
    },
    /// A value was dropped by [`Fault::LoseValue`].
    Dropped {
        /// The worker that held it.
        worker: WorkerId,
        /// The value's key.
        key: WireKey,
    },
    /// A message was held back by [`Fault::DelayMessage`].
    Delayed {
        /// The extra ticks.
        by: u64,
    },
    /// A run failed by [`FailHow::Error`].
    Injected {
        /// The task's key.
        key: WireKey,
    },
    /// The client learnt an output: its value, or a failure.
    Output {
        /// The output's key.
        key: WireKey,
        /// Whether it failed.
        erred: bool,
    },
}

/// One line of the log: when, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The step (rule 3).
    pub step: u64,
    /// The simulated time, in ticks.
    pub time: u64,
    /// What happened.
    pub event: Event,
}

/// What a simulation did ([`Sim::run`]).
#[derive(Debug)]
pub struct Report {
    /// Each wanted key's encoded value, or its failure. A key is missing
    /// only if the run stalled, which is a bug ([`Report::stalled`]).
    pub results: BTreeMap<WireKey, Result<Arc<[u8]>, WireFailure>>,
    /// Everything that happened, in order (empty when logging is off).
    pub log: Vec<Entry>,
    /// Steps taken.
    pub steps: u64,
    /// Simulated time at the end, in ticks.
    pub time: u64,
    /// `Compute`s the scheduler sent: its placement decisions.
    pub decisions: u64,
    /// Wall time spent in the scheduler's handlers.
    pub scheduler_time: Duration,
    /// Tasks the scheduler still remembers at the end (0 unless it leaks:
    /// the client released everything, S4).
    pub remembered: usize,
    /// Values live workers still hold at the end (0 unless one leaks).
    pub held: usize,
    /// Whether the event queue ran dry, or the step limit was reached,
    /// before every wanted key was known.
    pub stalled: bool,
    /// The scheduler's task events, as a watching client receives them
    /// (empty unless [`Sim::watch`]).
    pub task_events: Vec<WireEvent>,
}

impl Report {
    /// How many times `key` started running.
    pub fn runs(&self, key: &WireKey) -> usize {
        self.log
            .iter()
            .filter(|e| matches!(&e.event, Event::Ran { key: k, .. } if k == key))
            .count()
    }

    /// Names of the tasks that started more than once, sorted, each once.
    pub fn ran_again(&self) -> Vec<Arc<str>> {
        let mut count: BTreeMap<WireKey, (Arc<str>, usize)> = BTreeMap::new();
        for e in &self.log {
            if let Event::Ran { key, name, .. } = &e.event {
                count.entry(*key).or_insert_with(|| (name.clone(), 0)).1 += 1;
            }
        }
        let mut names: Vec<Arc<str>> = count
            .into_values()
            .filter(|(_, n)| *n > 1)
            .map(|(name, _)| name)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Decodes a value a runner received: an `Encoded` copy (from a peer) or a
/// `u64` computed on the same worker. A helper for runners over `u64`s, as
/// in tests and benchmarks.
///
/// # Panics
///
/// If the value is neither.
pub fn decode_u64(value: &Value) -> u64 {
    if let Some(n) = value.downcast_ref::<u64>() {
        return *n;
    }
    let encoded = value
        .downcast_ref::<Encoded>()
        .expect("a u64 or its encoding");
    postcard::from_bytes(&encoded.0).expect("the encoding of a u64")
}

/// A runner: computes a task from its spec and inputs (in `deps` order).
/// Failures are boxed: a `WireFailure` is large next to a value.
pub type Runner<'a> =
    dyn FnMut(&TaskSpec, &mut [Option<Value>]) -> Result<Value, Box<WireFailure>> + 'a;

/// Threads per simulated worker unless [`Sim::threads`] says otherwise.
pub const THREADS: u32 = 2;

/// A simulated cluster, set up by its builder methods and run once with
/// [`Sim::run`].
///
/// # Examples
///
/// See the [module documentation](self).
#[derive(Clone, Debug)]
pub struct Sim {
    workers: u32,
    seed: u64,
    threads: u32,
    faults: Vec<Fault>,
    random_faults: usize,
    check: bool,
    log: bool,
    max_steps: u64,
    max_duration: u64,
    watch: bool,
    /// The resources of the worker in each slot (`Sim::worker_resources`).
    resources: Vec<Resources>,
}

impl Sim {
    /// A cluster of `workers` workers (at least 1) of 2 threads each, with
    /// every choice decided by `seed`, no faults, invariants checked and the
    /// log kept.
    pub fn new(workers: u32, seed: u64) -> Sim {
        Sim {
            workers: workers.max(1),
            seed,
            threads: THREADS,
            faults: Vec::new(),
            random_faults: 0,
            check: true,
            log: true,
            max_steps: u64::MAX,
            max_duration: 100,
            watch: false,
            resources: Vec::new(),
        }
    }

    /// The resources each worker declares, by slot: the `i`-th worker
    /// started, and each worker that replaces it after a kill, declares
    /// `resources[i]`; workers past the list declare none.
    pub fn worker_resources(mut self, resources: Vec<Resources>) -> Sim {
        self.resources = resources;
        self
    }

    /// Threads per worker (at least 1).
    pub fn threads(mut self, threads: u32) -> Sim {
        self.threads = threads.max(1);
        self
    }

    /// Adds a fault.
    pub fn fault(mut self, fault: Fault) -> Sim {
        self.faults.push(fault);
        self
    }

    /// Adds `n` faults chosen by the seed that leave results unchanged:
    /// killed workers, lost values, delayed messages, and at most two deaths
    /// in all (kills and crashing runs), below the scheduler's 3 allowed
    /// failures, so no task fails for them.
    pub fn random_faults(mut self, n: usize) -> Sim {
        self.random_faults = n;
        self
    }

    /// Whether to check the scheduler's invariants after every step (on by
    /// default; a full scan, so off for large runs).
    pub fn check_invariants(mut self, on: bool) -> Sim {
        self.check = on;
        self
    }

    /// Whether to keep [`Report::log`] (on by default).
    pub fn log(mut self, on: bool) -> Sim {
        self.log = on;
        self
    }

    /// Whether to collect the scheduler's task events
    /// ([`Report::task_events`]; off by default).
    pub fn watch(mut self, on: bool) -> Sim {
        self.watch = on;
        self
    }

    /// Stops after this many steps (the report then says it stalled).
    pub fn max_steps(mut self, steps: u64) -> Sim {
        self.max_steps = steps;
        self
    }

    /// Longest simulated run of one task, in ticks (at least 1; 100 by
    /// default): each run takes 1 to this many.
    pub fn max_duration(mut self, ticks: u64) -> Sim {
        self.max_duration = ticks.max(1);
        self
    }

    /// Runs the graph `tasks` (each input before its dependents, as a client
    /// sends them) until every key of `wanted` is known and released, with
    /// `runner` computing each task.
    pub fn run(
        self,
        tasks: Vec<TaskSpec>,
        wanted: Vec<WireKey>,
        runner: &mut Runner<'_>,
    ) -> Report {
        let mut world = World::new(self, &tasks);
        world.start(tasks, wanted);
        world.run(runner);
        world.report()
    }
}

/// Who a link goes between (rule 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Link {
    ToWorker(WorkerId),
    FromWorker(WorkerId),
    ToClient,
    FromClient,
}

/// Something that happens at a time.
enum Ev {
    ToWorker(WorkerId, ToWorker),
    ToScheduler(WorkerId, ToScheduler),
    ToClient(ToClient),
    FromClient(ToScheduler),
    RunDone(WorkerId, u64),
    Fetched {
        worker: WorkerId,
        key: WireKey,
        holders: Vec<WorkerId>,
    },
    ClientFetched {
        key: WireKey,
        holders: Vec<WorkerId>,
    },
    /// The scheduler notices a dead worker's connection closed; the
    /// worker's slot.
    Lost(WorkerId, u32),
    /// A worker registers in this slot.
    Join(u32),
    /// The client's request to retire a worker reaches the scheduler.
    Retire(WorkerId),
    /// The scheduler notices a retired worker's connection closed.
    Left(WorkerId),
    /// The scheduler's clock moves (`State::on_tick`, rule 2).
    Tick,
}

/// The sim's outbox: what the scheduler sent during one handler.
#[derive(Default)]
struct Mail {
    to_workers: Vec<(WorkerId, ToWorker)>,
    to_client: Vec<ToClient>,
    watching: bool,
    events: Vec<WireEvent>,
}

impl Outbox for Mail {
    fn watching(&self) -> bool {
        self.watching
    }
    fn task_event(&mut self, event: WireEvent) {
        self.events.push(event);
    }
    fn to_worker(&mut self, worker: WorkerId, msg: ToWorker) {
        self.to_workers.push((worker, msg));
    }
    fn to_client(&mut self, _: ClientId, msg: ToClient) {
        self.to_client.push(msg);
    }
}

/// A value in a worker's store: the value and its encoding.
#[derive(Clone)]
struct Held {
    value: Quiet,
    bytes: Arc<[u8]>,
}

/// A stored value, dropped quietly wherever the simulation lets it go, as
/// a real worker drops its values (worker rule 16): a user's `Drop` that
/// panics is logged, and the run goes on. `None` only while dropped.
#[derive(Clone)]
struct Quiet(Option<Value>);

impl Quiet {
    fn value(&self) -> Value {
        self.0
            .clone()
            .expect("a stored value is there until dropped")
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        rask_executor::drop_quietly(self.0.take(), "a value of the simulated cluster");
    }
}

/// A task a worker was sent.
struct Pending {
    spec: TaskSpec,
    priority: Priority,
    /// Inputs not in the store yet.
    missing: BTreeSet<WireKey>,
    /// The run's id while running.
    run: Option<u64>,
    /// The scheduler's run of it (`Compute::run`), named in its reports.
    asked: u64,
}

struct Running {
    key: WireKey,
    outcome: Result<Held, WireFailure>,
    /// When it started: its duration is reported (ticks read as µs).
    started: u64,
}

struct SimWorker {
    threads: u32,
    busy: u32,
    store: BTreeMap<WireKey, Held>,
    tasks: BTreeMap<WireKey, Pending>,
    ready: BTreeSet<(Priority, WireKey)>,
    /// Inputs being fetched, with the holders still to try after the
    /// current one.
    fetching: BTreeSet<WireKey>,
    runs: BTreeMap<u64, Running>,
    /// Its slot (`Sim::worker_resources`) and what it declared.
    slot: u32,
    resources: Resources,
}

impl SimWorker {
    fn new(threads: u32, slot: u32, resources: Resources) -> SimWorker {
        SimWorker {
            slot,
            resources,
            threads,
            busy: 0,
            store: BTreeMap::new(),
            tasks: BTreeMap::new(),
            ready: BTreeSet::new(),
            fetching: BTreeSet::new(),
            runs: BTreeMap::new(),
        }
    }
}

const CLIENT: ClientId = ClientId(0);

/// Ticks between two moves of the scheduler's clock (rule 2): its
/// [`TICK_MS`](crate::scheduler::state::TICK_MS), ticks being microseconds.
const TICK: u64 = crate::scheduler::state::TICK_MS * 1_000;

struct World {
    sim: Sim,
    rng: SplitMix64,
    state: State,
    now: u64,
    step: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    /// The last delivery time on each link (rule 4).
    links: BTreeMap<Link, u64>,
    workers: BTreeMap<WorkerId, SimWorker>,
    next_worker: u32,
    next_run: u64,
    /// Runs started per function.
    runs_of: BTreeMap<Arc<str>, u32>,
    faults: Vec<Fault>,
    /// A delay armed by [`Fault::DelayMessage`], for the next message.
    delay: u64,
    /// Retirements the client asked for, numbering them.
    retire_requests: u64,
    /// Workers asked to stop ([`Fault::LeaveWorker`]).
    leaving: BTreeSet<WorkerId>,
    wanted: BTreeSet<WireKey>,
    results: BTreeMap<WireKey, Result<Arc<[u8]>, WireFailure>>,
    released: bool,
    log: Vec<Entry>,
    decisions: u64,
    scheduler_time: Duration,
    stalled: bool,
    task_events: Vec<WireEvent>,
    /// The annotations of the run's tasks, which a `Compute` does not
    /// carry (the resources a simulated worker checks).
    annotations: BTreeMap<WireKey, rask_executor::Annotations>,
}

impl World {
    fn new(sim: Sim, tasks: &[TaskSpec]) -> World {
        let mut rng = SplitMix64::new(sim.seed);
        let mut faults = sim.faults.clone();
        let horizon = (tasks.len() as u64 * 8).max(16);
        let mut deaths = 0;
        for _ in 0..sim.random_faults {
            let step = rng.below(horizon);
            let fault = match rng.below(4) {
                0 | 1 if deaths < 2 => {
                    deaths += 1;
                    if rng.below(2) == 0 || tasks.is_empty() {
                        Fault::KillWorker {
                            step,
                            worker: rng.below(u64::from(sim.workers)) as u32,
                        }
                    } else {
                        let task = &tasks[rng.below(tasks.len() as u64) as usize];
                        Fault::FailRun {
                            function: task.function.to_string(),
                            nth: 1 + rng.below(tasks.len() as u64) as u32,
                            how: FailHow::Crash,
                        }
                    }
                }
                2 => Fault::DelayMessage {
                    step,
                    by: 1 + rng.below(200),
                },
                _ => Fault::LoseValue { step },
            };
            faults.push(fault);
        }
        World {
            rng,
            state: State::new(),
            now: 0,
            step: 0,
            seq: 0,
            events: BTreeMap::new(),
            links: BTreeMap::new(),
            workers: BTreeMap::new(),
            next_worker: 0,
            next_run: 0,
            runs_of: BTreeMap::new(),
            faults,
            delay: 0,
            retire_requests: 0,
            leaving: BTreeSet::new(),
            wanted: BTreeSet::new(),
            results: BTreeMap::new(),
            released: false,
            log: Vec::new(),
            decisions: 0,
            scheduler_time: Duration::ZERO,
            stalled: false,
            task_events: Vec::new(),
            annotations: tasks
                .iter()
                .filter(|t| t.annotations != rask_executor::Annotations::default())
                .map(|t| (t.key, t.annotations.clone()))
                .collect(),
            sim,
        }
    }

    fn record(&mut self, event: Event) {
        if self.sim.log {
            self.log.push(Entry {
                step: self.step,
                time: self.now,
                event,
            });
        }
    }

    fn at(&mut self, time: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((time, self.seq), ev);
    }

    /// Sends `ev` over `link`: after a latency, behind what the link
    /// already carries (rule 4).
    fn send(&mut self, link: Link, ev: Ev) {
        let mut time = self.now + 1 + self.rng.below(10);
        if self.delay > 0 {
            time += self.delay;
            let by = std::mem::take(&mut self.delay);
            self.record(Event::Delayed { by });
        }
        let last = self.links.entry(link).or_insert(0);
        time = time.max(*last);
        *last = time;
        self.at(time, ev);
    }

    /// Calls a scheduler handler and sends what it wrote.
    fn schedule(&mut self, f: impl FnOnce(&mut State, &mut Mail)) {
        let mut mail = Mail {
            watching: self.sim.watch,
            ..Mail::default()
        };
        let started = Instant::now();
        f(&mut self.state, &mut mail);
        self.scheduler_time += started.elapsed();
        for (w, msg) in mail.to_workers {
            if matches!(msg, ToWorker::Compute { .. }) {
                self.decisions += 1;
            }
            self.send(Link::ToWorker(w), Ev::ToWorker(w, msg));
        }
        for msg in mail.to_client {
            self.send(Link::ToClient, Ev::ToClient(msg));
        }
        self.task_events.extend(mail.events);
    }

    fn join(&mut self, slot: u32) {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        let resources = self
            .sim
            .resources
            .get(slot as usize)
            .cloned()
            .unwrap_or_default();
        let worker = SimWorker::new(self.sim.threads, slot, resources.clone());
        self.workers.insert(id, worker);
        self.record(Event::Joined(id));
        let registration = Registration {
            address: format!("sim:{}", id.0),
            threads: self.sim.threads,
            resources,
            name: Some(format!("slot-{slot}")),
        };
        self.schedule(|s, out| s.on_worker_joined(id, registration, out));
    }

    fn start(&mut self, tasks: Vec<TaskSpec>, wanted: Vec<WireKey>) {
        for slot in 0..self.sim.workers {
            self.join(slot);
        }
        self.schedule(|s, out| s.on_client_connected(CLIENT, out));
        self.at(TICK, Ev::Tick);
        self.wanted = wanted.iter().copied().collect();
        let wanted: Vec<WireKey> = self.wanted.iter().copied().collect();
        self.send(
            Link::FromClient,
            Ev::FromClient(ToScheduler::UpdateGraph { tasks, wanted }),
        );
    }

    fn run(&mut self, runner: &mut Runner<'_>) {
        while let Some(((time, _), ev)) = self.events.pop_first() {
            if self.step >= self.sim.max_steps {
                break;
            }
            if matches!(ev, Ev::Tick) && self.events.is_empty() {
                break; // nothing else is to happen
            }
            self.now = time;
            self.apply_faults();
            self.handle(ev, runner);
            if self.sim.check {
                self.state.check_invariants();
            }
            self.step += 1;
        }
        self.stalled = self.results.len() < self.wanted.len();
    }

    fn apply_faults(&mut self) {
        let step = self.step;
        let due: Vec<Fault> = {
            let (due, rest) = std::mem::take(&mut self.faults)
                .into_iter()
                .partition(|f| match f {
                    Fault::KillWorker { step: s, .. }
                    | Fault::RetireWorker { step: s, .. }
                    | Fault::LeaveWorker { step: s, .. }
                    | Fault::LoseValue { step: s }
                    | Fault::DelayMessage { step: s, .. } => *s <= step,
                    Fault::FailRun { .. } => false,
                });
            self.faults = rest;
            due
        };
        for fault in due {
            match fault {
                Fault::KillWorker { worker, .. } => {
                    let live: Vec<WorkerId> = self.workers.keys().copied().collect();
                    if !live.is_empty() {
                        let w = live[worker as usize % live.len()];
                        self.kill(w, None);
                    }
                }
                Fault::RetireWorker { worker, .. } => {
                    let live: Vec<WorkerId> = self.workers.keys().copied().collect();
                    if !live.is_empty() {
                        let w = live[worker as usize % live.len()];
                        self.send(Link::FromClient, Ev::Retire(w));
                    }
                }
                Fault::LeaveWorker { worker, .. } => {
                    let live: Vec<WorkerId> = self.workers.keys().copied().collect();
                    if !live.is_empty() {
                        let w = live[worker as usize % live.len()];
                        if self.leaving.insert(w) {
                            self.send(
                                Link::FromWorker(w),
                                Ev::ToScheduler(w, ToScheduler::Leaving),
                            );
                        }
                    }
                }
                Fault::LoseValue { .. } => {
                    let holding: Vec<WorkerId> = self
                        .workers
                        .iter()
                        .filter(|(_, w)| !w.store.is_empty())
                        .map(|(&id, _)| id)
                        .collect();
                    if holding.is_empty() {
                        continue;
                    }
                    let w = holding[self.rng.below(holding.len() as u64) as usize];
                    let store = &mut self.workers.get_mut(&w).expect("live").store;
                    let i = self.rng.below(store.len() as u64) as usize;
                    let key = *store.keys().nth(i).expect("in range");
                    store.remove(&key);
                    self.record(Event::Dropped { worker: w, key });
                }
                Fault::DelayMessage { by, .. } => self.delay += by,
                Fault::FailRun { .. } => unreachable!("not due by step"),
            }
        }
    }

    /// `w` dies (rule 5).
    fn kill(&mut self, w: WorkerId, key: Option<WireKey>) {
        let Some(dead) = self.workers.remove(&w) else {
            return;
        };
        self.record(Event::Killed { worker: w, key });
        // Behind what it already sent.
        self.send(Link::FromWorker(w), Ev::Lost(w, dead.slot));
    }

    fn handle(&mut self, ev: Ev, runner: &mut Runner<'_>) {
        // Only these events change a worker's ready tasks or free threads:
        // starting runs on that worker alone keeps a step O(1) in workers.
        let touched = match &ev {
            Ev::ToWorker(w, _) | Ev::RunDone(w, _) => Some(*w),
            Ev::Fetched { worker, .. } => Some(*worker),
            _ => None,
        };
        match ev {
            Ev::ToWorker(w, msg) => self.worker_message(w, msg),
            Ev::ToScheduler(w, msg) => self.scheduler_message(w, msg),
            Ev::FromClient(msg) => match msg {
                ToScheduler::UpdateGraph { tasks, wanted } => {
                    self.schedule(|s, out| s.on_update_graph(CLIENT, tasks, wanted, out))
                }
                ToScheduler::ReleaseKeys { keys } => {
                    self.schedule(|s, out| s.on_release_keys(CLIENT, keys, out))
                }
                ToScheduler::FetchFailed { key, holder } => self.schedule(|s, out| {
                    s.on_fetch_failed(FetchReporter::Client(CLIENT), key, holder, out)
                }),
                _ => unreachable!("the sim client sends nothing else"),
            },
            Ev::ToClient(msg) => self.client_message(msg),
            Ev::RunDone(w, run) => self.run_done(w, run),
            Ev::Fetched {
                worker,
                key,
                holders,
            } => self.fetched(worker, key, holders),
            Ev::ClientFetched { key, holders } => self.client_fetched(key, holders),
            Ev::Lost(w, slot) => {
                self.schedule(|s, out| s.on_worker_lost(w, out));
                let at = self.now + 1 + self.rng.below(20);
                self.at(at, Ev::Join(slot));
            }
            Ev::Join(slot) => self.join(slot),
            Ev::Retire(w) => {
                self.retire_requests += 1;
                let id = self.retire_requests;
                self.schedule(|s, out| s.on_retire_workers(CLIENT, id, vec![w], out));
            }
            Ev::Left(w) => self.schedule(|s, out| s.on_worker_lost(w, out)),
            Ev::Tick => {
                let now_ms = self.now / 1_000;
                self.schedule(|s, out| s.on_tick(now_ms, out));
                self.at(self.now + TICK, Ev::Tick);
            }
        }
        if let Some(w) = touched {
            self.pump(w, runner);
        }
    }

    fn scheduler_message(&mut self, w: WorkerId, msg: ToScheduler) {
        match msg {
            ToScheduler::TaskFinished {
                key,
                run,
                nbytes,
                duration_ns,
                value,
                thread,
            } => {
                let report = Finished {
                    nbytes,
                    duration_ns,
                    value,
                    thread,
                };
                self.schedule(|s, out| s.on_task_finished(w, key, run, report, out))
            }
            ToScheduler::TaskErred { key, run, failure } => {
                self.schedule(|s, out| s.on_task_erred(w, key, run, failure, out))
            }
            ToScheduler::TaskAbandoned { key, run } => {
                self.schedule(|s, out| s.on_task_abandoned(w, key, run, out))
            }
            ToScheduler::TaskGivenUp { key, id } => {
                self.schedule(|s, out| s.on_task_given_up(w, key, id, out))
            }
            ToScheduler::TaskKept { key, id } => {
                self.schedule(|s, out| s.on_task_kept(w, key, id, out))
            }
            ToScheduler::DataAdded { key } => self.schedule(|s, out| s.on_data_added(w, key, out)),
            ToScheduler::Leaving => self.schedule(|s, out| s.on_worker_leaving(w, out)),
            ToScheduler::FetchFailed { key, holder } => self
                .schedule(|s, out| s.on_fetch_failed(FetchReporter::Worker(w), key, holder, out)),
            _ => unreachable!("sim workers send nothing else"),
        }
    }

    fn report_to_scheduler(&mut self, w: WorkerId, msg: ToScheduler) {
        self.send(Link::FromWorker(w), Ev::ToScheduler(w, msg));
    }

    // ----- workers (rule 6) -----

    fn worker_message(&mut self, w: WorkerId, msg: ToWorker) {
        let Some(worker) = self.workers.get_mut(&w) else {
            return; // dead: the message is lost with its connection
        };
        match msg {
            ToWorker::Compute {
                key,
                run: asked,
                name,
                function,
                payload,
                deps,
                who_has,
                priority,
                timeout_ms,
                retries,
            } => {
                if worker.tasks.contains_key(&key) {
                    return;
                }
                if let Some(held) = worker.store.get(&key) {
                    // Fetched earlier as someone's input: already done.
                    let nbytes = held.bytes.len() as u64;
                    let finished = ToScheduler::TaskFinished {
                        key,
                        run: asked,
                        nbytes,
                        duration_ns: 0,
                        value: None,
                        thread: 0,
                    };
                    return self.report_to_scheduler(w, finished);
                }
                let mut missing = BTreeSet::new();
                let mut fetch = Vec::new();
                let mut gone = None;
                for d in &deps {
                    if worker.store.contains_key(d) || missing.contains(d) {
                        continue;
                    }
                    if let Some((_, holders)) = who_has.iter().find(|(k, _)| k == d) {
                        missing.insert(*d);
                        if worker.fetching.insert(*d) {
                            fetch.push((*d, holders.clone()));
                        }
                    } else if worker.tasks.contains_key(d) || worker.fetching.contains(d) {
                        missing.insert(*d); // early (S9): computed here
                    } else {
                        gone = Some(*d);
                        break;
                    }
                }
                if let Some(d) = gone {
                    // Held here once, lost since: say so, give the task back.
                    for (k, _) in fetch {
                        worker.fetching.remove(&k);
                    }
                    self.report_to_scheduler(w, ToScheduler::FetchFailed { key: d, holder: w });
                    self.record(Event::Abandoned { worker: w, key });
                    // Nothing here waits for it yet: it was never pending.
                    let abandoned = ToScheduler::TaskAbandoned { key, run: asked };
                    return self.report_to_scheduler(w, abandoned);
                }
                let ready = missing.is_empty();
                let spec = TaskSpec {
                    key,
                    name,
                    function,
                    payload,
                    deps,
                    timeout_ms,
                    retries,
                    annotations: self.annotations.get(&key).cloned().unwrap_or_default(),
                };
                worker.tasks.insert(
                    key,
                    Pending {
                        spec,
                        priority,
                        missing,
                        run: None,
                        asked,
                    },
                );
                if ready {
                    worker.ready.insert((priority, key));
                }
                for (d, holders) in fetch {
                    self.start_fetch(w, d, holders);
                }
            }
            ToWorker::Release { key } => {
                worker.store.remove(&key);
                if let Some(task) = worker.tasks.remove(&key) {
                    worker.ready.remove(&(task.priority, key));
                    if let Some(run) = task.run {
                        worker.runs.remove(&run);
                        worker.busy -= 1;
                    }
                    // Its local dependents cannot have it now (worker rule 1).
                    self.abandon_waiting(w, key);
                }
            }
            ToWorker::GiveUp { key, id } => {
                // Worker state rule 8: given up only if it has not started.
                let started = worker.tasks.get(&key).is_none_or(|t| t.run.is_some());
                if started {
                    return self.report_to_scheduler(w, ToScheduler::TaskKept { key, id });
                }
                if let Some(task) = worker.tasks.remove(&key) {
                    worker.ready.remove(&(task.priority, key));
                }
                self.report_to_scheduler(w, ToScheduler::TaskGivenUp { key, id });
                self.abandon_waiting(w, key);
            }
            ToWorker::Fetch { key, holders } => {
                // A copy asked for (S13), as `worker/state.rs` answers it.
                if worker.store.contains_key(&key) {
                    return self.report_to_scheduler(w, ToScheduler::DataAdded { key });
                }
                if worker.tasks.contains_key(&key) || worker.fetching.contains(&key) {
                    return; // reported when computed or fetched
                }
                let others: Vec<WorkerId> = holders.into_iter().filter(|&h| h != w).collect();
                if !others.is_empty() {
                    worker.fetching.insert(key);
                    self.start_fetch(w, key, others);
                }
            }
            ToWorker::Retire => {
                // Everything it held is held elsewhere (S16): it exits,
                // behind what it already sent, and is not replaced; one
                // that asked to leave (S16a) is, later.
                let gone = self.workers.remove(&w);
                self.record(Event::Retired { worker: w });
                self.send(Link::FromWorker(w), Ev::Left(w));
                if let Some(gone) = gone.filter(|_| self.leaving.contains(&w)) {
                    let at = self.now + 1 + self.rng.below(20);
                    self.at(at, Ev::Join(gone.slot));
                }
            }
            ToWorker::Registered { .. }
            | ToWorker::PeerJoined { .. }
            | ToWorker::PeerLeft { .. }
            | ToWorker::Heartbeat { .. } => {}
            // The simulated cluster names no worker.
            ToWorker::Refused { .. } => {}
        }
    }

    /// Gives back every task of `w` waiting for `key`, which will not come,
    /// and in turn the tasks waiting for those (worker rule 1).
    fn abandon_waiting(&mut self, w: WorkerId, key: WireKey) {
        let mut ended = vec![key];
        while let Some(key) = ended.pop() {
            let Some(worker) = self.workers.get_mut(&w) else {
                return;
            };
            let waiting: Vec<WireKey> = worker
                .tasks
                .iter()
                .filter(|(_, t)| t.missing.contains(&key))
                .map(|(&k, _)| k)
                .collect();
            for k in waiting {
                self.abandon(w, k);
                ended.push(k);
            }
        }
    }

    /// Gives task `key` of `w`, not running, back to the scheduler.
    fn abandon(&mut self, w: WorkerId, key: WireKey) {
        let Some(task) = self
            .workers
            .get_mut(&w)
            .and_then(|worker| worker.tasks.remove(&key).map(|t| (worker, t)))
            .map(|(worker, task)| {
                worker.ready.remove(&(task.priority, key));
                task
            })
        else {
            return;
        };
        self.record(Event::Abandoned { worker: w, key });
        let abandoned = ToScheduler::TaskAbandoned {
            key,
            run: task.asked,
        };
        self.report_to_scheduler(w, abandoned);
    }

    fn start_fetch(&mut self, w: WorkerId, key: WireKey, holders: Vec<WorkerId>) {
        // A request and its answer: two latencies.
        let at = self.now + 2 + self.rng.below(10) + self.rng.below(10);
        self.at(
            at,
            Ev::Fetched {
                worker: w,
                key,
                holders,
            },
        );
    }

    fn fetched(&mut self, w: WorkerId, key: WireKey, mut holders: Vec<WorkerId>) {
        if !self.workers.contains_key(&w) {
            return;
        }
        let Some(holder) = holders.first().copied() else {
            self.workers
                .get_mut(&w)
                .expect("live")
                .fetching
                .remove(&key);
            return self.abandon_waiting(w, key);
        };
        let got = self
            .workers
            .get(&holder)
            .and_then(|h| h.store.get(&key))
            .map(|held| held.bytes.clone());
        let worker = self.workers.get_mut(&w).expect("live");
        if let Some(bytes) = got {
            worker.fetching.remove(&key);
            let value: Value = Arc::new(Encoded::new(bytes.clone()));
            worker.store.insert(
                key,
                Held {
                    value: Quiet(Some(value)),
                    bytes,
                },
            );
            for (&k, t) in worker.tasks.iter_mut() {
                if t.missing.remove(&key) && t.missing.is_empty() && t.run.is_none() {
                    worker.ready.insert((t.priority, k));
                }
            }
            self.record(Event::Fetched {
                worker: w,
                key,
                from: holder,
            });
            return self.report_to_scheduler(w, ToScheduler::DataAdded { key });
        }
        holders.remove(0);
        let none_left = holders.is_empty();
        if none_left {
            worker.fetching.remove(&key);
        }
        self.report_to_scheduler(w, ToScheduler::FetchFailed { key, holder });
        if none_left {
            self.abandon_waiting(w, key);
        } else {
            self.start_fetch(w, key, holders);
        }
    }

    /// Starts ready tasks of `w` on its free threads, in priority order.
    fn pump(&mut self, w: WorkerId, runner: &mut Runner<'_>) {
        while let Some(worker) = self.workers.get_mut(&w) {
            if worker.busy >= worker.threads {
                break;
            }
            let Some((_, key)) = worker.ready.pop_first() else {
                break;
            };
            self.start_run(w, key, runner);
        }
    }

    fn start_run(&mut self, w: WorkerId, key: WireKey, runner: &mut Runner<'_>) {
        let worker = self.workers.get_mut(&w).expect("live");
        let task = worker.tasks.get(&key).expect("a ready task is pending");
        let inputs: Option<Vec<Option<Value>>> = task
            .spec
            .deps
            .iter()
            .map(|d| worker.store.get(d).map(|h| Some(h.value.value())))
            .collect();
        let spec = task.spec.clone();
        let Some(mut inputs) = inputs else {
            // An input went between its arrival and now (lost).
            self.abandon(w, key);
            return self.abandon_waiting(w, key);
        };
        let nth = {
            let n = self.runs_of.entry(spec.function.clone()).or_insert(0);
            *n += 1;
            *n
        };
        self.record(Event::Ran {
            worker: w,
            key,
            name: spec.name.clone(),
        });
        let injected = self.faults.iter().position(|f| {
            matches!(f, Fault::FailRun { function, nth: n, .. }
                if **function == *spec.function && *n == nth)
        });
        let how = injected.map(|i| match self.faults.remove(i) {
            Fault::FailRun { how, .. } => how,
            _ => unreachable!("matched above"),
        });
        let outcome = match how {
            Some(FailHow::Crash) => {
                rask_executor::drop_each_quietly(inputs, "an input of the simulated cluster");
                return self.kill(w, Some(key));
            }
            Some(FailHow::Error) => {
                self.record(Event::Injected { key });
                Err(WireFailure::new(
                    key,
                    spec.name.to_string(),
                    WireFailureKind::Failed,
                    format!("injected failure of run {nth} of `{}`", spec.function),
                ))
            }
            None => match runner(&spec, &mut inputs) {
                Err(failure) => Err(*failure),
                Ok(value) => match value.encode() {
                    Ok(bytes) => Ok(Held {
                        value: Quiet(Some(value)),
                        bytes: bytes.into(),
                    }),
                    // Worker rule 4: a value that cannot be encoded fails there.
                    Err(e) => {
                        rask_executor::drop_quietly(value, "a value of the simulated cluster");
                        Err(WireFailure::new(
                            key,
                            spec.name.to_string(),
                            WireFailureKind::Failed,
                            e.to_string(),
                        ))
                    }
                },
            },
        };
        // What the task read in place goes, quietly (worker rule 16).
        rask_executor::drop_each_quietly(inputs, "an input of the simulated cluster");
        let run = self.next_run;
        self.next_run += 1;
        let worker = self.workers.get_mut(&w).expect("live");
        worker.busy += 1;
        worker.tasks.get_mut(&key).expect("pending").run = Some(run);
        let started = self.now;
        worker.runs.insert(
            run,
            Running {
                key,
                outcome,
                started,
            },
        );
        // Resources are never exceeded by what runs at once (S14).
        let running: Vec<&TaskSpec> = worker
            .runs
            .values()
            .filter_map(|r| worker.tasks.get(&r.key))
            .map(|t| &t.spec)
            .collect();
        for (name, total) in worker.resources.milli() {
            let held: u64 = running
                .iter()
                .map(|t| t.annotations.resources.get_milli(name))
                .sum();
            assert!(
                held <= *total,
                "{w} runs {held} thousandths of {name}, above its {total}"
            );
        }
        for t in &running {
            assert!(
                worker.resources.covers(&t.annotations.resources),
                "{w} runs a task asking for resources it lacks"
            );
        }
        let at = self.now + 1 + self.rng.below(self.sim.max_duration);
        self.at(at, Ev::RunDone(w, run));
    }

    fn run_done(&mut self, w: WorkerId, run: u64) {
        let Some(worker) = self.workers.get_mut(&w) else {
            return;
        };
        let Some(Running {
            key,
            outcome,
            started,
        }) = worker.runs.remove(&run)
        else {
            return; // released while running
        };
        worker.busy -= 1;
        let Some(Pending { asked: run, .. }) = worker.tasks.remove(&key) else {
            return; // a run is of a pending task: released with it
        };
        self.record(Event::Finished { worker: w, key });
        let worker = self.workers.get_mut(&w).expect("live");
        match outcome {
            Ok(held) => {
                let nbytes = held.bytes.len() as u64;
                let value = (held.bytes.len() <= INLINE_BYTES).then(|| held.bytes.clone());
                worker.store.insert(key, held);
                for (&k, t) in worker.tasks.iter_mut() {
                    if t.missing.remove(&key) && t.missing.is_empty() && t.run.is_none() {
                        worker.ready.insert((t.priority, k));
                    }
                }
                let finished = ToScheduler::TaskFinished {
                    key,
                    run,
                    nbytes,
                    duration_ns: (self.now - started).saturating_mul(1_000),
                    value,
                    thread: 0,
                };
                self.report_to_scheduler(w, finished);
            }
            Err(failure) => {
                self.report_to_scheduler(w, ToScheduler::TaskErred { key, run, failure });
                self.abandon_waiting(w, key);
            }
        }
    }

    // ----- the client (rule 7) -----

    fn client_message(&mut self, msg: ToClient) {
        match msg {
            ToClient::KeyInMemory {
                key,
                holders,
                value,
                ..
            } => {
                if !self.wanted.contains(&key) || self.results.contains_key(&key) {
                    return;
                }
                match value {
                    Some(bytes) => self.output(key, Ok(bytes)),
                    None => {
                        let at = self.now + 2 + self.rng.below(10) + self.rng.below(10);
                        self.at(at, Ev::ClientFetched { key, holders });
                    }
                }
            }
            ToClient::KeyErred { key, failure }
                if self.wanted.contains(&key) && !self.results.contains_key(&key) =>
            {
                self.output(key, Err(failure));
            }
            ToClient::Retired { error, .. } => self.record(Event::RetireAnswered { error }),
            _ => {}
        }
    }

    fn client_fetched(&mut self, key: WireKey, mut holders: Vec<WorkerId>) {
        if self.results.contains_key(&key) || holders.is_empty() {
            return;
        }
        let holder = holders.remove(0);
        let got = self
            .workers
            .get(&holder)
            .and_then(|h| h.store.get(&key))
            .map(|held| held.bytes.clone());
        match got {
            Some(bytes) => self.output(key, Ok(bytes)),
            None => {
                // The scheduler tells the holders again (S12); the rest are
                // tried meanwhile.
                self.send(
                    Link::FromClient,
                    Ev::FromClient(ToScheduler::FetchFailed { key, holder }),
                );
                if !holders.is_empty() {
                    let at = self.now + 2 + self.rng.below(10);
                    self.at(at, Ev::ClientFetched { key, holders });
                }
            }
        }
    }

    fn output(&mut self, key: WireKey, result: Result<Arc<[u8]>, WireFailure>) {
        self.record(Event::Output {
            key,
            erred: result.is_err(),
        });
        self.results.insert(key, result);
        if self.results.len() == self.wanted.len() && !self.released {
            self.released = true;
            let keys = self.wanted.iter().copied().collect();
            self.send(
                Link::FromClient,
                Ev::FromClient(ToScheduler::ReleaseKeys { keys }),
            );
        }
    }

    fn report(self) -> Report {
        Report {
            held: self.workers.values().map(|w| w.store.len()).sum(),
            remembered: self.state.task_count(),
            results: self.results,
            log: self.log,
            steps: self.step,
            time: self.now,
            decisions: self.decisions,
            scheduler_time: self.scheduler_time,
            stalled: self.stalled,
            task_events: self.task_events,
        }
    }
}

/// A simulated cluster as an [`Executor`]: each plan runs on a fresh
/// simulated cluster of `workers` workers seeded by `seed` ([`Sim`]), its
/// tasks resolved through `registry` as a worker resolves them, and each
/// output is reported as the [`Encoded`] bytes a cluster's client receives.
/// `submit` returns once the plan ran.
///
/// A plan is sent as a client would send it: a task that cannot leave the
/// process (a closure that captures, an argument that does not serialize)
/// fails every output, as on a real cluster. Values held by a real cluster
/// ([`Remote`](rask_executor::Remote)) are fetched and sent as values.
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # struct Nothing;
/// # impl rask_executor::Registry for Nothing {
/// #     fn resolve(&self, t: &rask_executor::WireTask) -> Result<Arc<dyn rask_executor::Op>, rask_executor::WireError> {
/// #         Err(rask_executor::WireError::Unregistered { function: t.function.clone() })
/// #     }
/// # }
/// let cluster = rask_distributed::sim::Cluster::new(4, 7, Arc::new(Nothing));
/// assert_eq!(cluster.workers(), 4);
/// ```
pub struct Cluster {
    workers: u32,
    seed: u64,
    faults: usize,
    registry: Arc<dyn Registry>,
}

impl Cluster {
    /// A simulated cluster of `workers` workers (at least 1), decided by
    /// `seed`, running functions of `registry`.
    pub fn new(workers: u32, seed: u64, registry: Arc<dyn Registry>) -> Cluster {
        Cluster {
            workers: workers.max(1),
            seed,
            faults: 0,
            registry,
        }
    }

    /// This cluster with `n` faults in every run, chosen by the seed, that
    /// leave results unchanged ([`Sim::random_faults`]): killed workers,
    /// lost values, delayed messages.
    pub fn random_faults(mut self, n: usize) -> Cluster {
        self.faults = n;
        self
    }

    /// The faults of every run.
    pub fn faults(&self) -> usize {
        self.faults
    }

    /// The number of workers.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sim::Cluster({} workers, seed {}, {} faults)",
            self.workers, self.seed, self.faults
        )
    }
}

impl Executor for Cluster {
    fn submit(&self, plan: Arc<Plan>, reporter: Arc<dyn Reporter>) {
        let fail_all = |failure: Arc<Failure>| {
            for slot in 0..plan.outputs().len() {
                reporter.output(slot, Err(failure.clone()));
            }
            reporter.finished();
        };
        let mut tasks = Vec::with_capacity(plan.len());
        for (i, task) in plan.tasks().iter().enumerate() {
            let wire = match task.op().to_wire() {
                Ok(w) if w.function == rask_executor::REMOTE_FUNCTION => {
                    // Held by a real cluster: send its value (wire rule 5).
                    let value = rask_executor::run_task(&plan, i as u32, &mut [])
                        .map_err(|f| f.message.clone())
                        .and_then(|v| v.encode().map_err(|e| e.to_string()));
                    match value {
                        Ok(bytes) => WireTask {
                            function: rask_executor::VALUE_FUNCTION.to_owned(),
                            payload: bytes,
                        },
                        Err(message) => return fail_all(Arc::new(plan.failed(i as u32, message))),
                    }
                }
                Ok(w) => w,
                Err(e) => return fail_all(Arc::new(plan.failed(i as u32, e.to_string()))),
            };
            tasks.push(TaskSpec::of(&plan, i as u32, wire));
        }
        let wanted: Vec<WireKey> = plan.outputs().iter().map(|&t| plan.key(t).0).collect();
        let watch = rask_executor::events::listening();
        if watch {
            rask_executor::events::queued(&plan);
        }
        let registry = self.registry.clone();
        let mut runner = |spec: &TaskSpec, inputs: &mut [Option<Value>]| {
            let wire = WireTask {
                function: spec.function.to_string(),
                payload: spec.payload.to_vec(),
            };
            let fail = |message: String| {
                Box::new(WireFailure::from(&Failure::new(
                    Key(spec.key),
                    spec.name.clone(),
                    FailureKind::Failed,
                    message,
                )))
            };
            let op = registry.resolve(&wire).map_err(|e| fail(e.to_string()))?;
            // Limits are real: a timeout waits on the clock, as on a worker.
            let timeout = spec.timeout_ms.map(Duration::from_millis);
            let op = rask_executor::with_limits(op, timeout, spec.retries);
            let mut one = PlanBuilder::with_capacity(1);
            one.push(Key(spec.key), op, &[]);
            let one = one.build();
            rask_executor::run_task(&one, 0, inputs).map_err(|f| Box::new(WireFailure::from(&*f)))
        };
        let report = Sim::new(self.workers, self.seed)
            .random_faults(self.faults)
            .check_invariants(false)
            .log(false)
            .watch(watch)
            .run(tasks, wanted.clone(), &mut runner);
        crate::client::emit_events(&report.task_events);
        for (slot, key) in wanted.iter().enumerate() {
            let outcome = match report.results.get(key) {
                Some(Ok(bytes)) => Ok(Arc::new(Encoded::new(bytes.clone())) as Value),
                Some(Err(failure)) => Err(Arc::new(Failure::from(failure))),
                None => Err(Arc::new(plan.failed(
                    plan.outputs()[slot],
                    "the simulated cluster stalled before computing this key".into(),
                ))),
            };
            reporter.output(slot, outcome);
        }
        drop(plan);
        reporter.finished();
    }
}

#[cfg(test)]
#[path = "sim_tests.rs"]
mod tests;
