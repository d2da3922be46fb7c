//! The scheduler's state machine: no sockets, no tokio, and no clock but
//! the one the shell moves (`on_tick`).
//!
//! The shell in `mod.rs` calls one `on_<fact>` handler per message; handlers
//! answer through an [`Outbox`]. The task state machine and its invariants
//! are described in `README.md` beside this file; the numbered rules there
//! are referred to as (S1)…(S16) in the code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use rask_executor::Key;

use super::placement::{self, Choice, Loads, LOCALITY_BYTES};
use super::ready::Ready;
use rask_executor::diagnostics::Counts;

use crate::protocol::{
    KeyMap, Priority, TaskSpec, ToClient, ToWorker, WireEvent, WireEventKind, WireFailure,
    WireFailureKind, WireKey, WorkerId, INLINE_BYTES, MAX_THREADS,
};
use rask_executor::Resources;

/// A task that was running on this many workers when they died fails
/// rather than kill the next worker too (S7), unless set otherwise
/// (`State::set_allowed_failures`).
pub(crate) const ALLOWED_WORKER_DEATHS: u8 = 3;

/// Tasks with more inputs than this are never sent early (S9): deciding
/// scans every input, at each change of one of them.
pub(crate) const EARLY_MAX_DEPS: usize = 16;

/// A task is moved to an idle worker only when it would otherwise wait at
/// least this long on its own (S15): below that, the `Release` and the new
/// `Compute` cost about what the wait does.
pub(crate) const STEAL_MIN_WAIT_NS: f64 = 1e6;

/// How long a worker's tasks must have been out, all its threads' worth
/// of them, for the tasks sent after them to count as stuck behind them
/// (S15): those move to an idle thread whatever the mean task time says.
pub(crate) const STUCK_MS: u64 = 200;

/// How often the shell moves the state machine's clock (`State::on_tick`),
/// in milliseconds: the precision of [`STUCK_MS`].
pub(crate) const TICK_MS: u64 = 100;

/// Bytes an idle worker fetches per nanosecond, as S15 weighs them against
/// the wait: 0.1 (100 MB/s), a cautious figure for a busy network.
pub(crate) const STEAL_BYTES_PER_NS: f64 = 0.1;

/// What a restricted task needs of its worker (S14): resources and worker
/// names. Tasks with equal restrictions share one queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Restriction {
    resources: Resources,
    /// Addresses or names; empty: any worker.
    workers: Vec<String>,
}

impl Restriction {
    fn describe(&self) -> String {
        rask_executor::Annotations {
            priority: 0,
            resources: self.resources.clone(),
            workers: self.workers.clone(),
        }
        .describe_restrictions()
    }
}

/// Identifies a client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ClientId(pub(crate) u32);

/// Who reports a failed fetch (S12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reporter {
    /// A client, fetching a key it wants.
    Client(ClientId),
    /// A worker, fetching an input of a task it was sent.
    Worker(WorkerId),
}

/// Whether a task with this function is work of its own, which events and
/// counts report: not a value or a failure a client sent in its stead
/// (`rask_executor::Op::is_work`).
fn is_work(function: &str) -> bool {
    function != rask_executor::VALUE_FUNCTION
        && function != rask_executor::REMOTE_FUNCTION
        && function != rask_executor::FAIL_FUNCTION
}

/// What a worker says of a task it finished (`ToScheduler::TaskFinished`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Finished {
    pub(crate) nbytes: u64,
    pub(crate) duration_ns: u64,
    pub(crate) value: Option<Arc<[u8]>>,
    pub(crate) thread: u32,
}

/// One worker as [`State::census`] counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WorkerCensus {
    pub(crate) id: WorkerId,
    pub(crate) address: String,
    pub(crate) threads: u32,
    /// Tasks it runs now as far as the scheduler can tell: those of
    /// `sent` neither sent early (S9) nor seceded, at most `threads`.
    pub(crate) running: u64,
    /// Tasks sent to it and not reported.
    pub(crate) sent: u64,
    /// Bytes and number of the values it holds.
    pub(crate) data_bytes: u64,
    pub(crate) keys: u64,
    /// Its resources, as `GPU=2,MEM=64`.
    pub(crate) resources: String,
    /// Whether it is retiring (S16, S16a).
    pub(crate) retiring: bool,
}

/// Where handlers put the messages they send.
pub(crate) trait Outbox {
    /// Queues `msg` for `worker` (dropped if it is gone).
    fn to_worker(&mut self, worker: WorkerId, msg: ToWorker);
    /// Queues `msg` for `client` (dropped if it is gone).
    fn to_client(&mut self, client: ClientId, msg: ToClient);
    /// Whether anyone wants task events (a dashboard, a watching client):
    /// handlers build them only then.
    fn watching(&self) -> bool {
        false
    }
    /// What happened to a task (asked only while `watching`).
    fn task_event(&mut self, event: WireEvent) {
        let _ = event;
    }
}

/// A slot index plus a generation, so a stale id never names a new task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct TaskId {
    index: u32,
    gen: u32,
}

/// Where a task is in its life (see README.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TaskState {
    /// Known, not needed now, or not yet started; no value anywhere.
    Released,
    /// Needed; some input is not in memory yet.
    Waiting,
    /// Needed, inputs in memory, in the central queue.
    Queued,
    /// Sent to this worker.
    Processing(WorkerId),
    /// The value is held by at least one worker.
    Memory,
    /// The task, or an input, failed.
    Erred(Arc<WireFailure>),
}

impl TaskState {
    fn is_active(&self) -> bool {
        matches!(
            self,
            TaskState::Waiting | TaskState::Queued | TaskState::Processing(_)
        )
    }
}

struct Task {
    key: Key,
    name: Arc<str>,
    function: Arc<str>,
    payload: Arc<[u8]>,
    /// Inputs in op order; one entry per edge, repeats kept.
    deps: Vec<TaskId>,
    /// One entry per edge from a dependent; may hold stale ids of forgotten
    /// dependents (skipped, and compacted away), see `live_dependents`.
    dependents: Vec<TaskId>,
    /// Number of edges in `dependents` from live tasks.
    live_dependents: u32,
    state: TaskState,
    /// While `Waiting`: input edges whose input is not in memory.
    waiting_on: u32,
    /// Input edges from active dependents (S2).
    waiters: u32,
    /// While `Memory`: the workers holding the value. Changed only through
    /// `add_holder`, `remove_holder` and `clear_holders`, which keep
    /// `since` beside it.
    who_has: Vec<WorkerId>,
    /// For each entry of `who_has`, the tick of the clock when it became a
    /// holder (S11, S12).
    since: Vec<u64>,
    /// The tick when the task last entered `Memory` (S11).
    in_memory_at: u64,
    /// While `Memory`: workers asked to fetch a copy (`ToWorker::Fetch`,
    /// S13) that are not holders yet, each with the tick of the ask.
    /// Emptied with `who_has` by `clear_holders`, and by `lose`.
    replicas: Vec<(WorkerId, u64)>,
    /// While `Processing`: the tick when its `Compute` was sent, naming
    /// the holders of its inputs as they were then (S11, S12); the run
    /// its reports name (`ToWorker::Compute::run`, S6).
    sent_at: u64,
    /// While `Processing`: the scheduler's clock, in milliseconds, when
    /// its `Compute` was sent (S15; `State::on_tick`).
    sent_ms: u64,
    nbytes: u64,
    /// While `Memory`: the value's encoding, when small enough to be
    /// handed to clients with `KeyInMemory` (`INLINE_BYTES`).
    inline: Option<Arc<[u8]>>,
    /// Clients holding at least one reference.
    who_wants: Vec<Wanter>,
    priority: Priority,
    /// What it needs of its worker (S14); `None`: any worker.
    restriction: Option<Arc<Restriction>>,
    /// Times a worker died while this task was running on it (S7).
    deaths: u8,
    /// While `Processing`: sent early (S9), and not every input is known to
    /// be in memory yet. Counted in its worker's `early`, not in its window.
    early: bool,
    /// While `Processing`: it waits for a nested computation on its
    /// worker's thread it gave back (`ToScheduler::TaskSeceded`); out of
    /// its worker's window, which it would otherwise hold shut on the work
    /// it waits for.
    seceded: bool,
    /// While `Processing`: its worker was asked to give it up, to send it
    /// to another (S15); it stays `Processing` on its worker until the
    /// answer.
    moving: Option<Move>,
    /// While `Processing`: its worker refused to give it up (it had
    /// started): not asked again while it stays there (S15).
    kept: bool,
    /// How long it may run, in milliseconds (`TaskSpec::timeout_ms`).
    timeout_ms: Option<u64>,
    /// How many times it runs again when it fails (`TaskSpec::retries`).
    retries: u32,
}

/// A move asked of a task's worker (S15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Move {
    /// Where it goes once given up.
    to: WorkerId,
    /// The tick of the ask, which the answer names (`ToWorker::GiveUp::id`).
    asked: u64,
}

/// A client holding references to a task (S5).
#[derive(Clone, Copy, Debug)]
struct Wanter {
    client: ClientId,
    /// How many references it holds (at least one): a client may name one
    /// key any number of times; the count saturates, and a count stuck at
    /// the top only keeps the key until the client disconnects.
    count: u32,
    /// The tick when it was last told `KeyInMemory`, naming the holders of
    /// that moment; 0 if never (S12).
    told_at: u64,
}

impl Task {
    fn needed(&self) -> bool {
        !self.who_wants.is_empty() || self.waiters > 0
    }

    fn wanted_by(&self, client: ClientId) -> bool {
        self.who_wants.iter().any(|w| w.client == client)
    }

    fn add_holder(&mut self, worker: WorkerId, now: u64) {
        self.who_has.push(worker);
        self.since.push(now);
    }

    fn remove_holder(&mut self, pos: usize) {
        self.who_has.swap_remove(pos);
        self.since.swap_remove(pos);
    }

    /// Empties `who_has` (and the copies asked for, S13), returning who it
    /// named.
    fn clear_holders(&mut self) -> Vec<WorkerId> {
        self.since.clear();
        self.replicas.clear();
        std::mem::take(&mut self.who_has)
    }

    /// What a client wanting this task is told once it is in memory.
    fn key_in_memory(&self) -> ToClient {
        ToClient::KeyInMemory {
            key: self.key.0,
            holders: self.who_has.clone(),
            nbytes: self.nbytes,
            value: self.inline.clone(),
        }
    }
}

struct Slot {
    gen: u32,
    task: Option<Task>,
}

/// A worker; its load is in `State::loads`, where placement finds it.
struct Worker {
    address: String,
    /// Tasks sent early (S9) whose inputs are not all in memory yet.
    early: u32,
    /// Waiting tasks that may be sent early to this worker, by priority.
    /// Entries can be stale: each is checked again when popped.
    candidates: Ready<(Priority, TaskId)>,
    /// Its name, when it has one (S14: tasks may name it).
    name: Option<String>,
    /// What it declared (S14).
    resources: Resources,
    /// Per entry of `resources`, what its processing tasks hold.
    used: Vec<u64>,
    /// Tasks sent to it, each with the tick it was sent at, in sending
    /// order; stale entries (no longer processing here since that tick)
    /// are skipped and compacted away. Where S15 looks for a task to move.
    sent: Vec<(TaskId, u64)>,
    /// `sent` is compacted when it reaches this length, which is then set
    /// to twice what is left plus 64 (amortized O(1) per task sent).
    sent_limit: usize,
    /// Set while it is being retired (S16).
    retiring: Option<Retiring>,
    /// Tasks of other workers asked to give them up for this one (S15).
    incoming: u32,
    /// Its tasks it was asked to give up (S15).
    outgoing: u32,
    /// The task it is reserved for (S18): while set, its load is closed;
    /// the task is sent once nothing else runs here, and nothing else is
    /// sent while it runs.
    solo: Option<TaskId>,
}

impl Worker {
    /// Whether it may ever run tasks restricted by `r`: it is named, if
    /// names are given, and declared enough of each resource (S14).
    fn eligible(&self, r: &Restriction) -> bool {
        (r.workers.is_empty()
            || r.workers
                .iter()
                .any(|n| *n == self.address || self.name.as_ref() == Some(n)))
            && self.resources.covers(&r.resources)
    }

    /// Whether a task restricted by `r` (if any) may start here now.
    fn may_take_now(&self, r: Option<&Restriction>) -> bool {
        r.is_none_or(|r| self.eligible(r) && self.fits_now(r))
    }

    /// Whether `r`'s resources fit in what its running tasks leave.
    fn fits_now(&self, r: &Restriction) -> bool {
        r.resources.milli().iter().all(|(name, amount)| {
            let entries = self.resources.milli();
            match entries.binary_search_by(|(n, _)| n.cmp(name)) {
                Ok(i) => entries[i].1.saturating_sub(self.used[i]) >= *amount,
                Err(_) => false,
            }
        })
    }

    /// Adds (`hold`) or takes back what `r` holds of its resources.
    fn hold(&mut self, r: &Restriction, hold: bool) {
        for (name, amount) in r.resources.milli() {
            let entries = self.resources.milli();
            if let Ok(i) = entries.binary_search_by(|(n, _)| n.cmp(name)) {
                self.used[i] = if hold {
                    self.used[i].saturating_add(*amount)
                } else {
                    self.used[i].saturating_sub(*amount)
                };
            }
        }
    }
}

/// What a worker says of itself when it registers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Registration {
    pub(crate) address: String,
    pub(crate) threads: u32,
    pub(crate) resources: Resources,
    /// Its name, if it has one.
    pub(crate) name: Option<String>,
}

/// A worker being retired (S16): out of placement, finishing what it was
/// sent, then handing its values over.
struct Retiring {
    /// Its compute threads (its load left placement with it).
    threads: u32,
    /// Tasks in its window, not reported yet.
    busy: u32,
    /// Once it runs nothing: the values it holds, dropped from the list as
    /// they leave memory.
    held: Option<Vec<TaskId>>,
}

/// A client's request to retire workers (S16), answered once every one is
/// gone.
struct RetireRequest {
    client: ClientId,
    id: u64,
    waiting: BTreeSet<WorkerId>,
}

/// The scheduler's whole state.
pub(crate) struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_key: KeyMap<Key, TaskId>,
    workers: BTreeMap<WorkerId, Worker>,
    /// The clients connected. Their references to each task are kept in
    /// the task (`Task::who_wants`, S5), not in a table per client: one
    /// table fewer to look up on each task a client submits and releases.
    clients: BTreeSet<ClientId>,
    queue: Ready<(Priority, TaskId)>,
    /// Queued restricted tasks (S14), one queue per restriction. Entries
    /// can be stale, as in `queue`; empty queues are dropped.
    restricted: BTreeMap<Arc<Restriction>, Ready<(Priority, TaskId)>>,
    /// The next submission order (`Priority::order`).
    next_priority: u64,
    /// Whether idle workers take queued work from busy ones (S15).
    balancing: bool,
    /// Mean op duration (exponentially weighted), for the window size.
    mean_ns: Option<f64>,
    /// Tasks whose need may have changed, to settle (S3, S4).
    unsettled: Vec<TaskId>,
    /// Every worker's tasks in its window and threads, in placement order.
    loads: Loads,
    /// Workers whose early candidates (S9) may be sent: given a candidate,
    /// or early room, since `assign_early` last looked. It empties them.
    early_ready: BTreeSet<WorkerId>,
    /// Workers with candidates but no early room when last looked, and
    /// `per_thread` then: they need a look again only when their early
    /// count drops or windows grow. With `early_ready`, this keeps
    /// `assign_early` off the workers it has nothing to send to.
    early_blocked: BTreeSet<WorkerId>,
    early_per_thread: u32,
    /// Reused buffer.
    scratch: Vec<(WorkerId, u64)>,
    /// The timeout of tasks that have none of their own, in milliseconds.
    task_timeout_ms: Option<u64>,
    /// Worker deaths a task may be running at before it fails (S7).
    allowed_failures: u8,
    /// A logical clock: ticks at each holder added, each `Compute` sent
    /// and each `KeyInMemory` sent, so the scheduler can tell which holders
    /// it named to whom (S11, S12).
    clock: u64,
    /// The shell's clock, in milliseconds since it started, as of its last
    /// tick (`on_tick`): how long tasks have been out (S15).
    now_ms: u64,
    /// Workers being retired (S16), and the requests waiting for them.
    retiring: BTreeSet<WorkerId>,
    retire_requests: Vec<RetireRequest>,
    /// Turns the workers that keep copies of retiring workers' values.
    copy_turn: usize,
    /// Tasks moved so far (S15).
    moved: u64,
    /// Queued tasks that were running at a worker's death, each to run
    /// alone (S18); not in `queue` nor `restricted`. Entries can be stale
    /// or repeated: each is checked again when looked at.
    suspects: Vec<TaskId>,
    /// Workers reserved for one of them (S18): those whose `solo` is set.
    reserved: BTreeSet<WorkerId>,
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

impl State {
    pub(crate) fn new() -> State {
        State {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: KeyMap::default(),
            workers: BTreeMap::new(),
            clients: BTreeSet::new(),
            queue: Ready::default(),
            restricted: BTreeMap::new(),
            next_priority: 0,
            balancing: true,
            mean_ns: None,
            unsettled: Vec::new(),
            loads: Loads::default(),
            early_ready: BTreeSet::new(),
            early_blocked: BTreeSet::new(),
            early_per_thread: 0,
            scratch: Vec::new(),
            task_timeout_ms: None,
            allowed_failures: ALLOWED_WORKER_DEATHS,
            clock: 0,
            now_ms: 0,
            retiring: BTreeSet::new(),
            retire_requests: Vec::new(),
            copy_turn: 0,
            moved: 0,
            suspects: Vec::new(),
            reserved: BTreeSet::new(),
        }
    }

    /// The next tick of the clock.
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Sets how many worker deaths a task may be running at before it fails
    /// (S7; at least 1).
    pub(crate) fn set_allowed_failures(&mut self, n: u8) {
        self.allowed_failures = n.max(1);
    }

    /// Turns S15 off (tests about other rules) or on.
    #[cfg(test)]
    pub(crate) fn set_balancing(&mut self, on: bool) {
        self.balancing = on;
    }

    /// Sets the timeout of tasks that have none of their own.
    pub(crate) fn set_task_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.task_timeout_ms = timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    }

    // ----- queries (tests, the shell) -----

    /// Adds this state's live tasks to `by_name`, counted by name and
    /// state, and one figure per worker to `workers` (the dashboard, the
    /// clients' `Info`). A full scan: asked a few times a second at most.
    pub(crate) fn census(
        &self,
        by_name: &mut HashMap<Arc<str>, Counts>,
        workers: &mut Vec<WorkerCensus>,
    ) {
        let first = workers.len();
        let index: HashMap<WorkerId, usize> = self
            .workers
            .keys()
            .enumerate()
            .map(|(i, &id)| (id, first + i))
            .collect();
        workers.extend(self.workers.iter().map(|(&id, w)| WorkerCensus {
            id,
            address: w.address.clone(),
            threads: match &w.retiring {
                Some(r) => r.threads,
                None => self.loads.get(id).map_or(0, |l| l.threads),
            },
            running: 0,
            sent: 0,
            data_bytes: 0,
            keys: 0,
            resources: w.resources.to_string(),
            retiring: w.retiring.is_some(),
        }));
        for task in self.slots.iter().filter_map(|s| s.task.as_ref()) {
            if !is_work(&task.function) {
                continue;
            }
            let counts = by_name.entry(task.name.clone()).or_default();
            match &task.state {
                TaskState::Released => {}
                TaskState::Waiting | TaskState::Queued => counts.waiting += 1,
                TaskState::Processing(w) => {
                    counts.processing += 1;
                    if let Some(&i) = index.get(w) {
                        workers[i].sent += 1;
                        // One sent early waits for its inputs, a seceded
                        // one for its nested work: neither holds a thread.
                        if !task.early && !task.seceded {
                            workers[i].running += 1;
                        }
                    }
                }
                TaskState::Memory => {
                    counts.memory += 1;
                    for w in &task.who_has {
                        if let Some(&i) = index.get(w) {
                            workers[i].data_bytes += task.nbytes;
                            workers[i].keys += 1;
                        }
                    }
                }
                TaskState::Erred(_) => counts.erred += 1,
            }
        }
        // The rest of what it was sent waits there for a thread: the
        // scheduler keeps a window of tasks on each worker (`placement`
        // rule 3).
        for w in &mut workers[first..] {
            w.running = w.running.min(u64::from(w.threads));
        }
    }

    /// Number of registered workers.
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Whether `worker` is one of this state's workers: a worker whose
    /// connection is open stops being one only when it retired (S16).
    pub(crate) fn has_worker(&self, worker: WorkerId) -> bool {
        self.workers.contains_key(&worker)
    }

    /// Tasks moved to another worker once given up, so far (S15).
    pub(crate) fn moved(&self) -> u64 {
        self.moved
    }

    /// Number of tasks the scheduler remembers.
    pub(crate) fn task_count(&self) -> usize {
        self.by_key.len()
    }

    /// Whether `key`'s task is remembered.
    pub(crate) fn knows(&self, key: &WireKey) -> bool {
        self.by_key.contains_key(&Key(*key))
    }

    /// The state of `key`, if remembered.
    #[cfg(test)]
    pub(crate) fn state_of(&self, key: &WireKey) -> Option<&TaskState> {
        let id = self.by_key.get(&Key(*key))?;
        Some(&self.task(*id).state)
    }

    /// Workers holding `key`.
    pub(crate) fn who_has(&self, key: &WireKey) -> &[WorkerId] {
        match self.by_key.get(&Key(*key)) {
            Some(id) => &self.task(*id).who_has,
            None => &[],
        }
    }

    // ----- slab -----

    fn task(&self, id: TaskId) -> &Task {
        let slot = &self.slots[id.index as usize];
        debug_assert_eq!(slot.gen, id.gen);
        slot.task.as_ref().expect("a live task id names a task")
    }

    fn task_mut(&mut self, id: TaskId) -> &mut Task {
        let slot = &mut self.slots[id.index as usize];
        debug_assert_eq!(slot.gen, id.gen);
        slot.task.as_mut().expect("a live task id names a task")
    }

    fn get(&self, id: TaskId) -> Option<&Task> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.gen == id.gen {
            slot.task.as_ref()
        } else {
            None
        }
    }

    fn insert(&mut self, task: Task) -> TaskId {
        let key = task.key;
        let id = if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.task = Some(task);
            TaskId {
                index,
                gen: slot.gen,
            }
        } else {
            let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 live tasks");
            self.slots.push(Slot {
                gen: 0,
                task: Some(task),
            });
            TaskId { index, gen: 0 }
        };
        self.by_key.insert(key, id);
        id
    }

    /// Tells the outbox what happened to `id`, if anyone watches and it is
    /// work of its own (not a value a client sent).
    fn event(&self, id: TaskId, kind: WireEventKind, out: &mut impl Outbox) {
        if out.watching() {
            let task = self.task(id);
            if !is_work(&task.function) {
                return;
            }
            out.task_event(WireEvent {
                key: task.key.0,
                name: task.name.clone(),
                kind,
            });
        }
    }

    fn remove(&mut self, id: TaskId) -> Task {
        let slot = &mut self.slots[id.index as usize];
        let task = slot.task.take().expect("a live task id names a task");
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(id.index);
        self.by_key.remove(&task.key);
        task
    }

    /// Live dependents of `id`, one entry per edge.
    fn dependents(&self, id: TaskId) -> Vec<TaskId> {
        self.task(id)
            .dependents
            .iter()
            .copied()
            .filter(|&d| self.get(d).is_some())
            .collect()
    }

    // ----- connections -----

    /// A client connected: tell it where the workers are.
    pub(crate) fn on_client_connected(&mut self, client: ClientId, out: &mut impl Outbox) {
        self.clients.insert(client);
        for (&id, w) in &self.workers {
            out.to_client(
                client,
                ToClient::WorkerJoined {
                    id,
                    address: w.address.clone(),
                },
            );
        }
    }

    /// A client went away: drop all its references (S5).
    pub(crate) fn on_client_disconnected(&mut self, client: ClientId, out: &mut impl Outbox) {
        // Its retirements go on, unanswered (S16).
        self.retire_requests.retain(|r| r.client != client);
        if !self.clients.remove(&client) {
            return;
        }
        // A full scan: a client leaving is rare, and it keeps the hot path
        // free of per-client tables of tasks.
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(task) = slot.task.as_mut() else {
                continue;
            };
            if task.wanted_by(client) {
                task.who_wants.retain(|w| w.client != client);
                self.unsettled.push(TaskId {
                    index: index as u32,
                    gen: slot.gen,
                });
            }
        }
        self.settle(out);
        self.assign(out);
    }

    /// A worker registered its data address, with no resources and no
    /// name (tests).
    #[cfg(test)]
    pub(crate) fn on_worker_registered(
        &mut self,
        worker: WorkerId,
        address: String,
        threads: u32,
        out: &mut impl Outbox,
    ) {
        let registration = Registration {
            address,
            threads,
            ..Registration::default()
        };
        self.on_worker_joined(worker, registration, out);
    }

    /// A worker registered. Its `threads` count as within
    /// 1..=[`MAX_THREADS`] whatever the shell let through.
    pub(crate) fn on_worker_joined(
        &mut self,
        worker: WorkerId,
        registration: Registration,
        out: &mut impl Outbox,
    ) {
        let Registration {
            address,
            threads,
            resources,
            name,
        } = registration;
        out.to_worker(worker, ToWorker::Registered { id: worker });
        for (&id, w) in &self.workers {
            out.to_worker(
                worker,
                ToWorker::PeerJoined {
                    id,
                    address: w.address.clone(),
                },
            );
            out.to_worker(
                id,
                ToWorker::PeerJoined {
                    id: worker,
                    address: address.clone(),
                },
            );
        }
        for &client in &self.clients {
            out.to_client(
                client,
                ToClient::WorkerJoined {
                    id: worker,
                    address: address.clone(),
                },
            );
        }
        self.workers.insert(
            worker,
            Worker {
                address,
                early: 0,
                candidates: Ready::default(),
                name,
                used: vec![0; resources.milli().len()],
                resources,
                sent: Vec::new(),
                sent_limit: 64,
                retiring: None,
                incoming: 0,
                outgoing: 0,
                solo: None,
            },
        );
        self.loads.insert(worker, threads.clamp(1, MAX_THREADS));
        self.early_ready.remove(&worker);
        self.early_blocked.remove(&worker);
        // A retirement waiting for a worker to hand values to goes on
        // there (S16).
        self.assign(out);
    }

    /// A worker's connection ended: reschedule what it was given, recompute
    /// what only it held (S7).
    pub(crate) fn on_worker_lost(&mut self, worker: WorkerId, out: &mut impl Outbox) {
        let Some(gone) = self.workers.remove(&worker) else {
            return;
        };
        let retired = gone.retiring.is_some();
        // A retiring worker's load already left placement (S16).
        let threads = match (self.loads.remove(worker), gone.retiring) {
            (Some(load), _) => load.threads,
            (None, Some(retiring)) => retiring.threads,
            (None, None) => unreachable!("loads name every worker not retiring"),
        };
        self.retiring.remove(&worker);
        // Its reserved task, if it was running, counts this death alone
        // (S18): nothing else ran there.
        self.reserved.remove(&worker);
        self.early_ready.remove(&worker);
        self.early_blocked.remove(&worker);
        for &id in self.workers.keys() {
            out.to_worker(id, ToWorker::PeerLeft { id: worker });
        }
        for &client in &self.clients {
            out.to_client(client, ToClient::WorkerLeft { id: worker });
        }
        // A full scan: worker loss is rare, and it keeps the hot path free of
        // per-worker task sets.
        let mut lost = Vec::new();
        let mut requeue = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(task) = slot.task.as_mut() else {
                continue;
            };
            let id = TaskId {
                index: index as u32,
                gen: slot.gen,
            };
            task.replicas.retain(|&(w, _)| w != worker);
            if let Some(pos) = task.who_has.iter().position(|&w| w == worker) {
                task.remove_holder(pos);
                if task.who_has.is_empty() && task.state == TaskState::Memory {
                    lost.push(id);
                }
            }
            if task.state == TaskState::Processing(worker) {
                requeue.push(id);
            }
        }
        // S7: the tasks it was running, as far as the scheduler can tell:
        // a worker runs its tasks in priority order, `threads` at a time
        // plus one on its network thread, so those are its `threads + 1`
        // first-priority tasks that are not waiting for inputs (early).
        // Tasks queued behind them cannot have killed it.
        let mut running: Vec<(Priority, TaskId)> = requeue
            .iter()
            .map(|&id| self.task(id))
            .filter(|t| !t.early)
            .map(|t| (t.priority, self.by_key[&t.key]))
            .collect();
        running.sort_unstable();
        running.truncate(threads as usize + 1);
        // A retired worker's own line said it all: nothing goes elsewhere,
        // nothing is lost.
        if !retired {
            tracing::info!(
                %worker,
                running = running.len(),
                given = requeue.len(),
                lost = lost.len(),
                "{worker} is gone: {} of its tasks go elsewhere, {} values it alone held are \
                 lost (recomputed where still needed)",
                requeue.len(),
                lost.len()
            );
        }
        for id in lost {
            tracing::debug!(%worker, task = %label(self.task(id)), "value lost with {worker}");
            self.event(id, WireEventKind::Lost { worker }, out);
            self.lose(id, out);
        }
        for id in requeue {
            // An early task may have erred with an input requeued before it.
            if self.task(id).state != TaskState::Processing(worker) {
                continue;
            }
            let suspect = running.iter().any(|&(_, r)| r == id);
            let allowed = self.allowed_failures;
            // A move asked of it will not be answered (S15).
            self.cancel_move(id);
            let task = self.task_mut(id);
            task.early = false;
            task.seceded = false;
            task.kept = false;
            if suspect {
                task.deaths = task.deaths.saturating_add(1);
            }
            if suspect {
                tracing::debug!(
                    %worker,
                    task = %label(task),
                    deaths = task.deaths,
                    "task was running on {worker} when it died"
                );
            }
            if task.deaths >= allowed {
                // Alone there (S18), nothing else can have caused it.
                let why = if gone.solo == Some(id) {
                    "the last one while it ran alone there: it crashes its process (exit, \
                     abort, a segfault) or gets it killed (out of memory)"
                } else {
                    "it may crash its process"
                };
                let failure = Arc::new(WireFailure::new(
                    task.key.0,
                    task.name.to_string(),
                    WireFailureKind::Failed,
                    format!(
                        "{} workers died while running this task ({why}; the limit is the \
                         scheduler's allowed failures)",
                        task.deaths
                    ),
                ));
                self.set_erred(id, failure, out);
            } else {
                self.restart(id, out);
            }
        }
        self.settle(out);
        self.assign(out);
        // Requests waiting for it are done with it, retired or dead (S16).
        for request in &mut self.retire_requests {
            request.waiting.remove(&worker);
        }
        let (done, waiting) = std::mem::take(&mut self.retire_requests)
            .into_iter()
            .partition(|r| r.waiting.is_empty());
        self.retire_requests = waiting;
        for request in done {
            let (id, error) = (request.id, None);
            out.to_client(request.client, ToClient::Retired { id, error });
        }
    }

    // ----- client messages -----

    /// A client's graph: add unknown tasks, take references to `wanted`.
    pub(crate) fn on_update_graph(
        &mut self,
        client: ClientId,
        tasks: Vec<TaskSpec>,
        wanted: Vec<WireKey>,
        out: &mut impl Outbox,
    ) {
        let mut added = Vec::new();
        for spec in tasks {
            let key = Key(spec.key);
            if self.by_key.contains_key(&key) {
                continue; // (S1) one task per key
            }
            let mut deps = Vec::with_capacity(spec.deps.len());
            let mut unknown = None;
            for dep in &spec.deps {
                match self.by_key.get(&Key(*dep)) {
                    Some(&d) => deps.push(d),
                    None => unknown = Some(Key(*dep)),
                }
            }
            let priority = Priority {
                user: spec.annotations.priority,
                order: self.next_priority,
            };
            self.next_priority += 1;
            let restriction = spec.annotations.is_restricted().then(|| {
                Arc::new(Restriction {
                    resources: spec.annotations.resources.clone(),
                    workers: spec.annotations.workers.clone(),
                })
            });
            let state = match (unknown, self.unrunnable(restriction.as_deref())) {
                (None, None) => TaskState::Released,
                (Some(dep), _) => TaskState::Erred(Arc::new(WireFailure::new(
                    spec.key,
                    spec.name.to_string(),
                    WireFailureKind::Failed,
                    format!("input {dep} is not in the graph sent to the scheduler"),
                ))),
                (None, Some(why)) => TaskState::Erred(Arc::new(WireFailure::new(
                    spec.key,
                    spec.name.to_string(),
                    WireFailureKind::Failed,
                    why,
                ))),
            };
            let n_deps = deps.len();
            let id = self.insert(Task {
                key,
                name: spec.name,
                function: spec.function,
                payload: spec.payload,
                deps,
                dependents: Vec::new(),
                live_dependents: 0,
                state,
                waiting_on: 0,
                waiters: 0,
                who_has: Vec::new(),
                since: Vec::new(),
                in_memory_at: 0,
                replicas: Vec::new(),
                sent_at: 0,
                sent_ms: 0,
                nbytes: 0,
                inline: None,
                who_wants: Vec::new(),
                priority,
                restriction,
                deaths: 0,
                early: false,
                seceded: false,
                moving: None,
                kept: false,
                timeout_ms: spec.timeout_ms,
                retries: spec.retries,
            });
            for i in 0..n_deps {
                let d = self.task(id).deps[i];
                let dep = self.task_mut(d);
                dep.dependents.push(id);
                dep.live_dependents += 1;
            }
            added.push(id);
        }
        self.inherit_priorities(&added);
        self.clients.insert(client);
        let mut to_activate = Vec::new();
        for key in wanted {
            let Some(&id) = self.by_key.get(&Key(key)) else {
                out.to_client(
                    client,
                    ToClient::KeyErred {
                        key,
                        failure: WireFailure::new(
                            key,
                            "unknown".into(),
                            WireFailureKind::Failed,
                            "the scheduler was asked for a key whose task it was not sent".into(),
                        ),
                    },
                );
                continue;
            };
            let slot = &mut self.slots[id.index as usize];
            let task = slot.task.as_mut().expect("a live task id names a task");
            // A client can name one key any number of times without the
            // scheduler storing anything more: its count saturates.
            match task.who_wants.iter_mut().find(|w| w.client == client) {
                Some(w) => w.count = w.count.saturating_add(1),
                None => task.who_wants.push(Wanter {
                    client,
                    count: 1,
                    told_at: 0,
                }),
            }
            match &task.state {
                TaskState::Memory => {
                    out.to_client(client, task.key_in_memory());
                    // The clock, inlined: `self` is borrowed through `wants`.
                    self.clock += 1;
                    let now = self.clock;
                    for w in task.who_wants.iter_mut().filter(|w| w.client == client) {
                        w.told_at = now;
                    }
                }
                TaskState::Erred(f) => out.to_client(
                    client,
                    ToClient::KeyErred {
                        key,
                        failure: (**f).clone(),
                    },
                ),
                TaskState::Released => to_activate.push(id),
                _ => {}
            }
        }
        for id in to_activate {
            self.activate(id, out);
        }
        // Tasks nobody wants and nothing depends on are forgotten at once.
        self.unsettled.extend(added.into_iter().rev());
        self.settle(out);
        self.assign(out);
    }

    /// A client dropped references.
    pub(crate) fn on_release_keys(
        &mut self,
        client: ClientId,
        keys: Vec<WireKey>,
        out: &mut impl Outbox,
    ) {
        if !self.clients.contains(&client) {
            return;
        }
        for key in keys {
            let Some(&id) = self.by_key.get(&Key(key)) else {
                continue;
            };
            let slot = &mut self.slots[id.index as usize];
            let task = slot.task.as_mut().expect("a live task id names a task");
            let Some(at) = task.who_wants.iter().position(|w| w.client == client) else {
                continue;
            };
            let wanter = &mut task.who_wants[at];
            wanter.count -= 1;
            if wanter.count == 0 {
                task.who_wants.remove(at);
                self.unsettled.push(id);
            }
        }
        self.settle(out);
        self.assign(out);
    }

    // ----- worker messages -----

    /// A worker ran a task and holds its value.
    pub(crate) fn on_task_finished(
        &mut self,
        worker: WorkerId,
        key: WireKey,
        run: u64,
        report: Finished,
        out: &mut impl Outbox,
    ) {
        let Finished {
            nbytes,
            duration_ns,
            value,
            thread,
        } = report;
        let Some(&id) = self.by_key.get(&Key(key)) else {
            out.to_worker(worker, ToWorker::Release { key });
            return;
        };
        let task = self.task(id);
        if task.state == TaskState::Processing(worker) && task.sent_at != run {
            // Stale: a run released before the one the worker runs now,
            // which it dropped on that release (S6).
            return;
        }
        if task.state != TaskState::Processing(worker) {
            // Stale: the task was released, or reassigned (S6).
            if !(task.state == TaskState::Memory && task.who_has.contains(&worker)) {
                out.to_worker(worker, ToWorker::Release { key });
            }
            return;
        }
        self.unload(id);
        let sample = duration_ns as f64;
        self.mean_ns = Some(match self.mean_ns {
            None => sample,
            Some(m) => 0.9 * m + 0.1 * sample,
        });
        let now = self.tick();
        let task = self.task_mut(id);
        task.state = TaskState::Memory;
        task.in_memory_at = now;
        task.clear_holders();
        task.add_holder(worker, now);
        task.nbytes = nbytes;
        // Bounded, whatever a worker sends.
        task.inline = value.filter(|v| v.len() <= INLINE_BYTES);
        self.event(
            id,
            WireEventKind::Finished {
                worker,
                thread,
                duration_ns,
                nbytes,
            },
            out,
        );
        self.deactivate(id);
        self.in_memory(id, out);
        self.unsettled.push(id);
        self.settle(out);
        self.assign(out);
    }

    /// The task `key` if `worker` is processing it; a report about anything
    /// else is stale (the task was released or reassigned, S6) and ignored.
    fn processing_on(&self, worker: WorkerId, key: WireKey) -> Option<TaskId> {
        let &id = self.by_key.get(&Key(key))?;
        (self.task(id).state == TaskState::Processing(worker)).then_some(id)
    }

    /// The run of `key`'s last `Compute` (tests report as its worker).
    #[cfg(test)]
    pub(crate) fn run_of(&self, key: WireKey) -> u64 {
        self.by_key
            .get(&Key(key))
            .map_or(0, |&id| self.task(id).sent_at)
    }

    /// The task `key` if `worker` is processing it in run `run` (the
    /// `run` of its last `Compute`); a report of an earlier run, released
    /// since, is stale too (S6).
    fn running_on(&self, worker: WorkerId, key: WireKey, run: u64) -> Option<TaskId> {
        self.processing_on(worker, key)
            .filter(|&id| self.task(id).sent_at == run)
    }

    /// A worker's task failed.
    pub(crate) fn on_task_erred(
        &mut self,
        worker: WorkerId,
        key: WireKey,
        run: u64,
        failure: WireFailure,
        out: &mut impl Outbox,
    ) {
        let Some(id) = self.running_on(worker, key, run) else {
            return;
        };
        self.set_erred(id, Arc::new(failure), out);
        self.settle(out);
        self.assign(out);
    }

    /// A worker gave a task back: an input could not be fetched.
    pub(crate) fn on_task_abandoned(
        &mut self,
        worker: WorkerId,
        key: WireKey,
        run: u64,
        out: &mut impl Outbox,
    ) {
        let Some(id) = self.running_on(worker, key, run) else {
            return;
        };
        self.unload(id);
        self.restart(id, out);
        self.settle(out);
        self.assign(out);
    }

    /// `worker` gave task `key` up, as asked by the `GiveUp` of tick `id`
    /// (S15): it never runs there, and goes to the worker the move was for
    /// if that one may still take it (registered, not retiring nor paused,
    /// and the task's restrictions fit there now, S14), else back to the
    /// queue. An answer to a move no longer asked (the task ended, was
    /// released, or is another `Compute` of the key) changes nothing.
    pub(crate) fn on_task_given_up(
        &mut self,
        worker: WorkerId,
        key: WireKey,
        id: u64,
        out: &mut impl Outbox,
    ) {
        let Some(tid) = self.processing_on(worker, key) else {
            return;
        };
        let Some(m) = self.task(tid).moving.filter(|m| m.asked == id) else {
            return;
        };
        self.unload(tid);
        let task = self.task(tid);
        let open = self.loads.get(m.to).is_some_and(|l| !l.closed());
        let fits = self
            .workers
            .get(&m.to)
            .is_some_and(|t| t.may_take_now(task.restriction.as_deref()));
        // An input lost meanwhile (S7 leaves a processing task where it
        // is): the task waits for it again rather than go where nothing
        // can be fetched.
        let ready = task
            .deps
            .iter()
            .all(|&d| self.task(d).state == TaskState::Memory);
        if open && fits && ready {
            tracing::debug!(task = %label(task), from = %worker, to = %m.to, "task moved to an idle worker");
            self.send_compute(tid, m.to, false, out);
            self.moved += 1;
        } else {
            self.restart(tid, out);
        }
        self.settle(out);
        self.assign(out);
    }

    /// `worker` kept task `key` when asked to give it up by the `GiveUp`
    /// of tick `id` (S15): it had started. It stays, and is not asked
    /// again while it is there.
    pub(crate) fn on_task_kept(
        &mut self,
        worker: WorkerId,
        key: WireKey,
        id: u64,
        out: &mut impl Outbox,
    ) {
        let Some(tid) = self.processing_on(worker, key) else {
            return;
        };
        if self.task(tid).moving.is_none_or(|m| m.asked != id) {
            return;
        }
        self.cancel_move(tid);
        self.task_mut(tid).kept = true;
        self.assign(out);
    }

    /// `worker` paused (it holds back new tasks for memory), or resumed
    /// (S17): while paused it is sent nothing, not even early, and S15
    /// may move its tasks away. Said with its heartbeats; only a change
    /// counts.
    pub(crate) fn on_worker_paused(
        &mut self,
        worker: WorkerId,
        paused: bool,
        out: &mut impl Outbox,
    ) {
        if self.loads.get(worker).is_none_or(|l| l.paused == paused) {
            return; // unchanged, or retiring: it gets nothing anyway
        }
        tracing::debug!(%worker, paused, "{worker} {}", if paused { "paused: no task goes there" } else { "resumed" });
        self.loads.set_paused(worker, paused);
        if !paused {
            // Early room again (S9).
            self.early_blocked.remove(&worker);
            if self
                .workers
                .get(&worker)
                .is_some_and(|w| !w.candidates.is_empty())
            {
                self.early_ready.insert(worker);
            }
        }
        self.assign(out);
    }

    /// A task `worker` runs waits for a nested computation and gave its
    /// thread back (`worker` rule 15): it leaves the worker's window, so
    /// the work it waits for can be sent there. Ignored for a task not
    /// processing on `worker` (a late report), and said once.
    pub(crate) fn on_task_seceded(
        &mut self,
        worker: WorkerId,
        key: WireKey,
        run: u64,
        out: &mut impl Outbox,
    ) {
        let Some(id) = self.running_on(worker, key, run) else {
            return;
        };
        // It runs: an ask to give it up will be answered `TaskKept` (S15).
        self.cancel_move(id);
        if !self.reserved.is_empty()
            && self
                .workers
                .get(&worker)
                .is_some_and(|w| w.solo == Some(id))
        {
            // The work it waits for may need this very worker (S18).
            self.unreserve(worker);
        }
        let task = self.task_mut(id);
        if std::mem::replace(&mut task.seceded, true) || task.early {
            // An early task takes no window room to give back; it never
            // takes any now (see `settle`).
            return;
        }
        self.loads.remove_task(worker);
        self.assign(out);
    }

    /// A client asks for a copy of each of `keys` on every worker (S13):
    /// each key it wants that is in memory is fetched by every worker that
    /// does not hold it.
    pub(crate) fn on_replicate(
        &mut self,
        client: ClientId,
        keys: Vec<WireKey>,
        out: &mut impl Outbox,
    ) {
        // A retiring worker is leaving: no copy for it (S16).
        let workers: Vec<WorkerId> = self
            .workers
            .keys()
            .copied()
            .filter(|w| !self.retiring.contains(w))
            .collect();
        for key in keys {
            let Some(&id) = self.by_key.get(&Key(key)) else {
                continue;
            };
            let task = self.task(id);
            if task.state != TaskState::Memory || !task.wanted_by(client) {
                continue;
            }
            let holders = task.who_has.clone();
            // Workers asked since the last holder was added: told of every
            // holder there is, their fetch is under way. One that failed
            // with every holder it was told of took each off who-has (S12),
            // so the holders left are newer and it is asked again. Asking
            // again meanwhile would only repeat the `Fetch`, once per
            // worker for each time a client names the key (S13).
            let newest = task.since.iter().copied().max().unwrap_or(0);
            let mut pending: Vec<WorkerId> = task
                .replicas
                .iter()
                .filter(|&&(_, asked)| asked > newest)
                .map(|&(w, _)| w)
                .collect();
            pending.sort_unstable();
            for &w in &workers {
                if holders.contains(&w) || pending.binary_search(&w).is_ok() {
                    continue;
                }
                let now = self.tick();
                let replicas = &mut self.task_mut(id).replicas;
                replicas.retain(|&(r, _)| r != w);
                replicas.push((w, now));
                out.to_worker(
                    w,
                    ToWorker::Fetch {
                        key,
                        holders: holders.clone(),
                    },
                );
            }
        }
    }

    /// A worker holds a copy of `key` it fetched. It counts only if the
    /// scheduler asked that worker to fetch it (S11, S13); otherwise, as for a
    /// copy of a key no longer in memory (S6), the worker is told to drop
    /// it.
    pub(crate) fn on_data_added(&mut self, worker: WorkerId, key: WireKey, out: &mut impl Outbox) {
        if let Some(&id) = self.by_key.get(&Key(key)) {
            let task = self.task(id);
            if task.state == TaskState::Processing(worker) {
                // The value was lost elsewhere and recomputation was sent to
                // this very worker, which already has a copy: it reports
                // `TaskFinished` for it. A `Release` now would cancel the
                // task the scheduler waits for.
                return;
            }
            if task.state == TaskState::Memory && task.who_has.contains(&worker) {
                return; // already a holder: a `Release` would lose a copy
            }
            if task.state == TaskState::Memory
                && self.workers.contains_key(&worker)
                && (self.asked_to_fetch(worker, id, task.in_memory_at)
                    || asked_to_copy(task, worker, task.in_memory_at))
            {
                let now = self.tick();
                let task = self.task_mut(id);
                task.replicas.retain(|&(w, _)| w != worker);
                task.add_holder(worker, now);
                if !self.retiring.is_empty() {
                    self.retire_step(out); // a retiring worker's value moved (S16)
                }
                return;
            }
        }
        // Released meanwhile, or never asked for: not a holder (S6, S11).
        out.to_worker(worker, ToWorker::Release { key });
    }

    /// Whether a task sent to `worker` after `after` (a tick) has `id`
    /// among its inputs: the scheduler then named `id`'s holders of that
    /// moment to `worker` (S11, S12). Scans `id`'s dependents: a report
    /// about a fetch is rare next to the tasks it serves.
    fn asked_to_fetch(&self, worker: WorkerId, id: TaskId, after: u64) -> bool {
        self.task(id).dependents.iter().any(|&d| {
            self.get(d)
                .is_some_and(|t| t.state == TaskState::Processing(worker) && t.sent_at > after)
        })
    }

    /// A client or worker could not get `key` from `holder`. It counts
    /// only if the key is in memory, the reporter needs it (a client
    /// wanting it, a worker with a task that has it as input) and the
    /// scheduler named `holder` to it, or the reporter is `holder` itself
    /// (S12); a client is told the key's holders again either way.
    pub(crate) fn on_fetch_failed(
        &mut self,
        reporter: Reporter,
        key: WireKey,
        holder: WorkerId,
        out: &mut impl Outbox,
    ) {
        let Some(&id) = self.by_key.get(&Key(key)) else {
            return;
        };
        let task = self.task(id);
        let pos = task.who_has.iter().position(|&w| w == holder);
        if let (TaskState::Memory, Some(pos)) = (&task.state, pos) {
            let since = task.since[pos];
            let told = match reporter {
                Reporter::Client(c) => task
                    .who_wants
                    .iter()
                    .any(|w| w.client == c && w.told_at > since),
                // A worker may always say it lacks a value it is said to
                // hold: it can only take itself off.
                Reporter::Worker(w) => {
                    w == holder
                        || self.asked_to_fetch(w, id, since)
                        || asked_to_copy(task, w, since)
                }
            };
            if told {
                let task = self.task_mut(id);
                task.remove_holder(pos);
                let now_lost = task.who_has.is_empty();
                if self.workers.contains_key(&holder) {
                    // It may hold the value after all (a transient error):
                    // make it drop it, so who-has stays exact.
                    out.to_worker(holder, ToWorker::Release { key });
                }
                if now_lost {
                    // Its run no longer counts as done (watch rule 5).
                    self.event(id, WireEventKind::Lost { worker: holder }, out);
                    self.lose(id, out);
                }
            }
        }
        if let Reporter::Client(client) = reporter {
            let task = self.task(id);
            if task.state == TaskState::Memory && task.wanted_by(client) {
                out.to_client(client, task.key_in_memory());
                let now = self.tick();
                for w in self.task_mut(id).who_wants.iter_mut() {
                    if w.client == client {
                        w.told_at = now;
                    }
                }
            }
        }
        self.settle(out);
        self.assign(out);
    }

    /// A client asks to retire `workers` (S16), answered by
    /// `ToClient::Retired` with `id`: they get no new task, finish what
    /// they were sent, each value only they hold is copied to another
    /// worker, then each is told to exit. Refused, retiring none, when no
    /// other worker would be left to hold their values.
    pub(crate) fn on_retire_workers(
        &mut self,
        client: ClientId,
        id: u64,
        workers: Vec<WorkerId>,
        out: &mut impl Outbox,
    ) {
        let workers: BTreeSet<WorkerId> = workers
            .into_iter()
            .filter(|w| self.workers.contains_key(w))
            .collect();
        let keep = self
            .workers
            .keys()
            .filter(|w| !self.retiring.contains(w) && !workers.contains(w))
            .count();
        if keep == 0 && !workers.is_empty() {
            let error = Some(format!(
                "retiring {} of the {} workers would leave none to hold their values; \
                 start another worker first",
                workers.len(),
                self.workers.len()
            ));
            out.to_client(client, ToClient::Retired { id, error });
            return;
        }
        if workers.is_empty() {
            out.to_client(client, ToClient::Retired { id, error: None });
            return;
        }
        for &w in &workers {
            self.start_retiring(w);
        }
        self.retire_requests.push(RetireRequest {
            client,
            id,
            waiting: workers,
        });
        // Queued work it had no room for yet, and early candidates bound
        // for it, go elsewhere now.
        self.assign(out);
    }

    /// Worker `w` asks to leave (S16a: its process was asked to stop):
    /// retired as `on_retire_workers` retires it, with no client to
    /// answer; when no other worker stays to hold its values, it is told
    /// to exit at once and lost (its values are computed again when
    /// wanted, as a killed worker's are).
    pub(crate) fn on_worker_leaving(&mut self, w: WorkerId, out: &mut impl Outbox) {
        if !self.workers.contains_key(&w) || self.retiring.contains(&w) {
            return;
        }
        let stays = self
            .workers
            .keys()
            .any(|other| *other != w && !self.retiring.contains(other));
        if !stays {
            tracing::warn!(
                worker = %w,
                "{w} asks to leave, and no other worker stays to hold its values: it \
                 leaves now, and what it alone holds is computed again when wanted"
            );
            out.to_worker(w, ToWorker::Retire);
            self.on_worker_lost(w, out);
            return;
        }
        self.start_retiring(w);
        self.assign(out);
    }

    /// Marks `w`, registered, as retiring (S16): out of placement, its
    /// window counted down as the tasks sent to it end.
    fn start_retiring(&mut self, w: WorkerId) {
        if self.retiring.contains(&w) {
            return;
        }
        let load = self
            .loads
            .remove(w)
            .expect("loads name every worker not retiring");
        // Its seceded tasks left its load but still run there.
        let seceded = self
            .slots
            .iter()
            .filter_map(|slot| slot.task.as_ref())
            .filter(|t| t.state == TaskState::Processing(w) && !t.early && t.seceded)
            .count() as u32;
        if let Some(worker) = self.workers.get_mut(&w) {
            worker.retiring = Some(Retiring {
                threads: load.threads,
                busy: load.tasks + seceded,
                held: None,
            });
        }
        self.retiring.insert(w);
        tracing::info!(
            worker = %w,
            "{w} retiring: it gets no new task; once the {} sent to it are done, the \
             values only it holds are copied to other workers",
            load.tasks
        );
    }

    /// Moves each retiring worker that runs nothing a step on (S16): asks
    /// a worker that stays for a copy of each value it alone holds (in
    /// turn over those workers), and tells it to exit once every such value
    /// is held elsewhere. Its held values are found by one full scan when
    /// it becomes idle; each later step checks only those left.
    fn retire_step(&mut self, out: &mut impl Outbox) {
        // Called with every assign while a retirement is under way: most
        // calls find every retiring worker still running something.
        let idle = |w: &WorkerId| {
            self.workers.get(w).is_some_and(|worker| {
                worker.early == 0 && worker.retiring.as_ref().is_some_and(|r| r.busy == 0)
            })
        };
        if !self.retiring.iter().any(idle) {
            return;
        }
        let keep: Vec<WorkerId> = self
            .workers
            .keys()
            .copied()
            .filter(|w| !self.retiring.contains(w))
            .collect();
        for w in self.retiring.clone() {
            // A retirement finished in this loop may have ended it.
            let Some(worker) = self.workers.get_mut(&w) else {
                continue;
            };
            let Some(retiring) = worker.retiring.as_mut() else {
                continue;
            };
            if retiring.busy > 0 || worker.early > 0 {
                continue; // still running what it was sent
            }
            let held = match retiring.held.take() {
                Some(held) => held,
                None => {
                    self.slots
                        .iter()
                        .enumerate()
                        .filter_map(|(index, slot)| {
                            let task = slot.task.as_ref()?;
                            (task.state == TaskState::Memory && task.who_has.contains(&w))
                                .then_some(TaskId {
                                    index: index as u32,
                                    gen: slot.gen,
                                })
                        })
                        .collect()
                }
            };
            let mut still = Vec::with_capacity(held.len());
            let mut moving = false;
            for id in held {
                let Some(task) = self.get(id) else { continue };
                if task.state != TaskState::Memory || !task.who_has.contains(&w) {
                    continue; // released, or lost
                }
                still.push(id);
                if task.who_has.iter().any(|h| !self.retiring.contains(h)) {
                    continue; // held by a worker that stays
                }
                moving = true;
                // A copy asked of a worker that stays is on its way; with
                // no such worker, the next one to register takes it.
                if keep.is_empty() || task.replicas.iter().any(|(r, _)| keep.contains(r)) {
                    continue;
                }
                let holders = task.who_has.clone();
                let key = task.key.0;
                let target = keep[self.copy_turn % keep.len()];
                self.copy_turn = self.copy_turn.wrapping_add(1);
                let now = self.tick();
                self.task_mut(id).replicas.push((target, now));
                out.to_worker(target, ToWorker::Fetch { key, holders });
            }
            if moving {
                if let Some(r) = self.workers.get_mut(&w).and_then(|w| w.retiring.as_mut()) {
                    r.held = Some(still);
                }
                continue;
            }
            out.to_worker(w, ToWorker::Retire);
            tracing::info!(
                worker = %w,
                values = still.len(),
                "{w} retired: other workers hold the {} values it held",
                still.len()
            );
            // Loses nothing and requeues nothing: it runs nothing and
            // holds nothing alone.
            self.on_worker_lost(w, out);
            // Clients drop it from the holders they know (`WorkerLeft`):
            // those that want its values are told where they are now.
            for id in still {
                if self.get(id).is_some_and(|t| t.state == TaskState::Memory) {
                    self.tell_wanters(id, out);
                }
            }
        }
    }

    // ----- transitions -----

    /// One more task in the window of `worker` (`w`), as
    /// [`unload`](State::unload) takes one off: in its load in placement
    /// (not a seceded one), and, while it retires (its load out of
    /// placement), in its `busy` count, seceded ones included, which holds
    /// the retirement until the task ends (S16). Takes the worker its
    /// callers already looked up, and `loads` beside it.
    fn count_in_window(loads: &mut Loads, w: WorkerId, worker: &mut Worker, seceded: bool) {
        if !seceded {
            loads.add_task(w);
        }
        if let Some(r) = worker.retiring.as_mut() {
            r.busy = r.busy.saturating_add(1);
        }
    }

    /// Takes a `Processing` task off its worker's books: out of its window,
    /// or out of its early count (S9). The caller changes the state next.
    fn unload(&mut self, id: TaskId) {
        self.cancel_move(id);
        let TaskState::Processing(worker) = self.task(id).state else {
            return;
        };
        if !self.reserved.is_empty()
            && self
                .workers
                .get(&worker)
                .is_some_and(|w| w.solo == Some(id))
        {
            self.unreserve(worker); // it ran alone, and is done there (S18)
        }
        let task = self.task_mut(id);
        let early = std::mem::take(&mut task.early);
        task.kept = false;
        let restriction = task.restriction.clone();
        let seceded = std::mem::take(&mut task.seceded);
        if !early {
            if !seceded {
                self.loads.remove_task(worker);
            }
            if let Some(w) = self.workers.get_mut(&worker) {
                if let Some(r) = &restriction {
                    w.hold(r, false);
                }
                // A retiring worker's window counts its seceded tasks too:
                // it is not idle while one still runs (S16).
                if let Some(r) = w.retiring.as_mut() {
                    r.busy = r.busy.saturating_sub(1);
                }
            }
        } else if let Some(w) = self.workers.get_mut(&worker) {
            w.early = w.early.saturating_sub(1);
            self.early_room(worker);
        }
    }

    /// Forgets the move asked of `id`'s worker, if any (S15): its answer,
    /// when it comes, no longer matches and changes nothing.
    fn cancel_move(&mut self, id: TaskId) {
        let task = self.task_mut(id);
        let Some(m) = task.moving.take() else {
            return;
        };
        let from = match task.state {
            TaskState::Processing(w) => Some(w),
            _ => None,
        };
        if let Some(w) = self.workers.get_mut(&m.to) {
            w.incoming = w.incoming.saturating_sub(1);
        }
        if let Some(w) = from.and_then(|f| self.workers.get_mut(&f)) {
            w.outgoing = w.outgoing.saturating_sub(1);
        }
    }

    /// Released → Waiting or Queued, with every released input activated
    /// too, since it is now needed (S2). Iterative: chains can be long.
    fn activate(&mut self, id: TaskId, out: &mut impl Outbox) {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            if self.task(id).state != TaskState::Released || !self.task(id).needed() {
                continue;
            }
            let mut waiting_on = 0;
            let mut erred = None;
            for i in 0..self.task(id).deps.len() {
                let d = self.task(id).deps[i];
                let dep = self.task_mut(d);
                dep.waiters += 1;
                match &dep.state {
                    TaskState::Memory => {}
                    TaskState::Erred(f) => erred = Some(f.clone()),
                    TaskState::Released => {
                        waiting_on += 1;
                        stack.push(d);
                    }
                    _ => waiting_on += 1,
                }
            }
            self.wait_for_inputs(id, waiting_on, erred, out);
        }
    }

    /// Task `id` becomes Waiting on `waiting_on` inputs, then Erred if an
    /// input is (S8), Queued if none is missing, or sent early if it can be
    /// (S9).
    fn wait_for_inputs(
        &mut self,
        id: TaskId,
        waiting_on: u32,
        erred: Option<Arc<WireFailure>>,
        out: &mut impl Outbox,
    ) {
        let task = self.task_mut(id);
        task.state = TaskState::Waiting;
        task.waiting_on = waiting_on;
        if let Some(f) = erred {
            self.set_erred(id, f, out);
        } else if waiting_on == 0 {
            self.enqueue(id);
        } else {
            self.consider(id);
        }
    }

    /// An active task goes back to Waiting or Queued, as its inputs now are.
    fn restart(&mut self, id: TaskId, out: &mut impl Outbox) {
        let mut waiting_on = 0;
        let mut erred = None;
        for i in 0..self.task(id).deps.len() {
            let d = self.task(id).deps[i];
            match &self.task(d).state {
                TaskState::Memory => {}
                TaskState::Erred(f) => erred = Some(f.clone()),
                TaskState::Released => {
                    waiting_on += 1;
                    self.activate(d, out);
                }
                _ => waiting_on += 1,
            }
        }
        self.wait_for_inputs(id, waiting_on, erred, out);
    }

    fn enqueue(&mut self, id: TaskId) {
        let task = self.task_mut(id);
        task.state = TaskState::Queued;
        if task.deaths > 0 {
            self.suspects.push(id); // it runs alone (S18)
            return;
        }
        let entry = (task.priority, id);
        match task.restriction.clone() {
            None => self.queue.push(entry),
            Some(r) => self.restricted.entry(r).or_default().push(entry),
        }
    }

    /// Why no worker could run a task restricted by `r` (S14): `None`
    /// when some connected worker may, when `r` is `None`, or when no
    /// worker is connected at all (the task waits for one, as any does).
    fn unrunnable(&self, r: Option<&Restriction>) -> Option<String> {
        let r = r?;
        if self.workers.is_empty() || self.workers.values().any(|w| w.eligible(r)) {
            return None;
        }
        let mut listed: Vec<String> = self
            .workers
            .iter()
            .take(8)
            .map(|(id, w)| {
                let name = w.name.as_ref().map_or(String::new(), |n| format!(" `{n}`"));
                let has = if w.resources.is_empty() {
                    "no resources".to_owned()
                } else {
                    w.resources.to_string()
                };
                format!("{id}{name} at {}: {has}", w.address)
            })
            .collect();
        if self.workers.len() > 8 {
            listed.push(format!("and {} more", self.workers.len() - 8));
        }
        Some(format!(
            "no connected worker can run this task: it asks for {} (workers: {})",
            r.describe(),
            listed.join("; ")
        ))
    }

    /// Raises the priority of the inputs of each task of `added` to the
    /// task's own, transitively (Delayed::priority: inputs run at least at
    /// their dependent's priority). Queued tasks go in their queue again
    /// (the old entry is stale); waiting ones are found by priority later.
    fn inherit_priorities(&mut self, added: &[TaskId]) {
        let mut stack: Vec<TaskId> = added
            .iter()
            .copied()
            .filter(|&id| {
                let task = self.task(id);
                task.deps
                    .iter()
                    .any(|&d| self.task(d).priority.user < task.priority.user)
            })
            .collect();
        while let Some(id) = stack.pop() {
            let user = self.task(id).priority.user;
            for i in 0..self.task(id).deps.len() {
                let d = self.task(id).deps[i];
                let dep = self.task_mut(d);
                if dep.priority.user >= user {
                    continue;
                }
                dep.priority.user = user;
                if dep.state == TaskState::Queued {
                    self.enqueue(d);
                } else if dep.state == TaskState::Waiting {
                    self.consider(d);
                }
                stack.push(d);
            }
        }
    }

    /// An active task stops being active: its inputs lose a waiter.
    fn deactivate(&mut self, id: TaskId) {
        for i in 0..self.task(id).deps.len() {
            let d = self.task(id).deps[i];
            let dep = self.task_mut(d);
            dep.waiters -= 1;
            if dep.waiters == 0 {
                self.unsettled.push(d);
            }
        }
    }

    /// `id` just entered memory: tell wanting clients, wake dependents.
    /// Tells every client that wants `id` (in memory) where it is now.
    fn tell_wanters(&mut self, id: TaskId, out: &mut impl Outbox) {
        if self.task(id).who_wants.is_empty() {
            return;
        }
        let now = self.tick();
        let task = self.task_mut(id);
        let told = task.key_in_memory();
        for w in &mut task.who_wants {
            w.told_at = now;
            out.to_client(w.client, told.clone());
        }
    }

    fn in_memory(&mut self, id: TaskId, out: &mut impl Outbox) {
        self.tell_wanters(id, out);
        let task = self.task(id);
        let len = task.dependents.len();
        for i in 0..len {
            let s = self.task(id).dependents[i];
            let Some(dependent) = self.get(s) else {
                continue;
            };
            match dependent.state {
                TaskState::Waiting => {
                    let dependent = self.task_mut(s);
                    dependent.waiting_on -= 1;
                    if dependent.waiting_on == 0 {
                        self.enqueue(s);
                    } else {
                        self.consider(s);
                    }
                }
                TaskState::Processing(w) if dependent.early => {
                    // Every input in memory: it can run now, so it counts
                    // in its worker's window from here on (S9).
                    let ready = dependent
                        .deps
                        .iter()
                        .all(|&d| self.task(d).state == TaskState::Memory);
                    if ready {
                        self.task_mut(s).early = false;
                        let seceded = self.task(s).seceded;
                        if let Some(worker) = self.workers.get_mut(&w) {
                            worker.early = worker.early.saturating_sub(1);
                            State::count_in_window(&mut self.loads, w, worker, seceded);
                            self.early_room(w);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The worker a waiting task may be sent to early (S9): the one
    /// processing every input not in memory yet, if the inputs in memory
    /// elsewhere are small.
    fn early_target(&self, id: TaskId) -> Option<WorkerId> {
        let task = self.task(id);
        // Restricted tasks wait for a worker that fits them now (S14), and
        // a task that was running at a death for a worker of its own (S18).
        if task.state != TaskState::Waiting
            || task.deps.len() > EARLY_MAX_DEPS
            || task.restriction.is_some()
            || task.deaths > 0
        {
            return None;
        }
        let mut target = None;
        for &d in &task.deps {
            match self.task(d).state {
                TaskState::Processing(w) if target.is_none_or(|t| t == w) => target = Some(w),
                TaskState::Memory => {}
                _ => return None,
            }
        }
        let target = target?;
        // Sizes come from workers: saturate rather than trust their sum.
        let elsewhere: u64 = task
            .deps
            .iter()
            .map(|&d| self.task(d))
            .filter(|dep| dep.state == TaskState::Memory && !dep.who_has.contains(&target))
            .fold(0, |sum, dep| sum.saturating_add(dep.nbytes));
        (elsewhere < LOCALITY_BYTES).then_some(target)
    }

    /// Remembers a waiting task as a candidate to be sent early (S9).
    fn consider(&mut self, id: TaskId) {
        let Some(w) = self.early_target(id) else {
            return;
        };
        let priority = self.task(id).priority;
        if let Some(worker) = self.workers.get_mut(&w) {
            worker.candidates.push((priority, id));
            self.early_ready.insert(w);
        }
    }

    /// `w`'s early count dropped: if its candidates waited for room, they
    /// may go now.
    fn early_room(&mut self, w: WorkerId) {
        if self.early_blocked.remove(&w) {
            self.early_ready.insert(w);
        }
    }

    /// `id`'s value is gone from every worker (S7): dependents wait again,
    /// and it is recomputed if still needed.
    fn lose(&mut self, id: TaskId, out: &mut impl Outbox) {
        let task = self.task_mut(id);
        task.state = TaskState::Released;
        task.inline = None;
        task.replicas.clear();
        for s in self.dependents(id) {
            let dependent = self.task_mut(s);
            match dependent.state {
                TaskState::Waiting => dependent.waiting_on += 1,
                TaskState::Queued => {
                    dependent.state = TaskState::Waiting;
                    dependent.waiting_on = 1;
                }
                // A dependent already sent to a worker either fetched the
                // value in time or gives the task back (TaskAbandoned).
                _ => {}
            }
        }
        // S7: recomputing lost work goes after work that never ran, unless
        // a client waits for this very key.
        if self.task(id).who_wants.is_empty() {
            let order = self.next_priority;
            self.next_priority += 1;
            self.task_mut(id).priority.order = order;
        }
        if self.task(id).needed() {
            self.activate(id, out);
        }
        self.unsettled.push(id);
    }

    /// `id` failed with `failure`: so do its waiting dependents, and those
    /// sent early (S8, S9).
    fn set_erred(&mut self, id: TaskId, failure: Arc<WireFailure>, out: &mut impl Outbox) {
        tracing::debug!(
            task = %label(self.task(id)),
            "task erred: {}",
            failure.message
        );
        let origin = id;
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            let task = self.task(id);
            if matches!(task.state, TaskState::Erred(_)) {
                continue;
            }
            let was_active = task.state.is_active();
            if let TaskState::Processing(w) = task.state {
                // A dependent sent early still waits on its worker: drop it
                // there. The failed task itself is already gone from it.
                if id != origin {
                    out.to_worker(w, ToWorker::Release { key: task.key.0 });
                }
                self.unload(id);
            }
            let ran_on = match self.task(id).state {
                TaskState::Processing(w) if id == origin => Some(w),
                _ => None,
            };
            self.task_mut(id).state = TaskState::Erred(failure.clone());
            self.event(id, WireEventKind::Erred { worker: ran_on }, out);
            if was_active {
                self.deactivate(id);
            }
            let task = self.task(id);
            for &Wanter { client, .. } in &task.who_wants {
                out.to_client(
                    client,
                    ToClient::KeyErred {
                        key: task.key.0,
                        failure: (*failure).clone(),
                    },
                );
            }
            for s in self.dependents(id) {
                let dependent = self.task(s);
                if matches!(dependent.state, TaskState::Waiting | TaskState::Queued)
                    || dependent.early
                {
                    stack.push(s);
                }
            }
            self.unsettled.push(id);
        }
    }

    /// Applies (S3) and (S4) to every task whose need may have changed:
    /// stop or drop what nobody needs, forget what nobody references.
    fn settle(&mut self, out: &mut impl Outbox) {
        while let Some(id) = self.unsettled.pop() {
            let Some(task) = self.get(id) else {
                continue;
            };
            if !task.needed() {
                match task.state.clone() {
                    TaskState::Waiting | TaskState::Queued => {
                        self.task_mut(id).state = TaskState::Released;
                        self.deactivate(id);
                    }
                    TaskState::Processing(w) => {
                        out.to_worker(w, ToWorker::Release { key: task.key.0 });
                        self.unload(id);
                        self.task_mut(id).state = TaskState::Released;
                        self.deactivate(id);
                    }
                    TaskState::Memory => {
                        let key = task.key.0;
                        self.event(id, WireEventKind::Released, out);
                        let task = self.task_mut(id);
                        task.state = TaskState::Released;
                        task.inline = None;
                        for w in task.clear_holders() {
                            out.to_worker(w, ToWorker::Release { key });
                        }
                    }
                    TaskState::Released | TaskState::Erred(_) => {}
                }
            }
            let task = self.task(id);
            if task.who_wants.is_empty() && task.live_dependents == 0 {
                let task = self.remove(id);
                for d in task.deps {
                    let dep = self.task_mut(d);
                    dep.live_dependents -= 1;
                    // Stale entries are skipped everywhere; compact so that a
                    // task with many short-lived dependents stays small.
                    if dep.dependents.len() > 2 * dep.live_dependents as usize + 8 {
                        let mut deps = std::mem::take(&mut self.task_mut(d).dependents);
                        deps.retain(|&s| self.get(s).is_some());
                        self.task_mut(d).dependents = deps;
                    }
                    self.unsettled.push(d);
                }
            }
        }
    }

    /// Hands queued tasks to workers with room in their window, then
    /// candidates to be sent early to workers with early room (S9).
    fn assign(&mut self, out: &mut impl Outbox) {
        if self.workers.is_empty() {
            return;
        }
        let per_thread = placement::per_thread(self.mean_ns);
        if !self.suspects.is_empty() || !self.reserved.is_empty() {
            self.assign_suspects(out);
        }
        self.assign_queued(per_thread, out);
        self.assign_early(per_thread, out);
        self.balance(out);
        if !self.retiring.is_empty() {
            self.retire_step(out);
        }
    }

    /// Runs each queued task that was running at a worker's death alone
    /// (S18), best priority first: it reserves a worker (closed to other
    /// work, and its queued tasks free to move, S15), preferring one that
    /// runs nothing, and is sent there once nothing else runs there. At
    /// most half the workers (at least one) are reserved at once; the
    /// rest go on with the other work. Drops the reservations whose task
    /// left the queue without being sent, or whose worker retires.
    fn assign_suspects(&mut self, out: &mut impl Outbox) {
        for w in self.reserved.clone() {
            let Some(worker) = self.workers.get(&w) else {
                self.reserved.remove(&w);
                continue;
            };
            let serves = worker.solo.and_then(|id| self.get(id)).is_some_and(|t| {
                t.state == TaskState::Processing(w)
                    || (t.state == TaskState::Queued && worker.retiring.is_none())
            });
            if !serves {
                self.unreserve(w);
            }
        }
        let mut suspects = std::mem::take(&mut self.suspects);
        suspects.retain(|&id| self.get(id).is_some_and(|t| t.state == TaskState::Queued));
        suspects.sort_unstable_by_key(|&id| (self.task(id).priority, id));
        suspects.dedup();
        let most = (self.workers.len() / 2).max(1);
        for id in suspects {
            let reserved = self
                .reserved
                .iter()
                .copied()
                .find(|w| self.workers.get(w).is_some_and(|w| w.solo == Some(id)));
            let w = match reserved {
                Some(w) if self.ready_to_run_alone(w) => w,
                // Still busy, or paused (S17): a worker that has emptied
                // since takes over.
                Some(w) => match self.empty_worker(id) {
                    Some(empty) => {
                        self.unreserve(w);
                        self.reserve(empty, id);
                        empty
                    }
                    None => w,
                },
                None => match (self.reserved.len() < most)
                    .then(|| self.worker_to_reserve(id))
                    .flatten()
                {
                    Some(w) => {
                        self.reserve(w, id);
                        w
                    }
                    None => {
                        self.suspects.push(id);
                        continue;
                    }
                },
            };
            let fits = self
                .workers
                .get(&w)
                .is_some_and(|worker| worker.may_take_now(self.task(id).restriction.as_deref()));
            if fits && self.ready_to_run_alone(w) {
                tracing::debug!(task = %label(self.task(id)), worker = %w, "a task that was running at a worker's death runs alone on {w}");
                self.send_compute(id, w, false, out);
            } else {
                self.suspects.push(id);
            }
        }
    }

    /// The worker to reserve for task `id` (S18): one not closed that may
    /// be reserved for it; one that runs nothing if any, else the first in
    /// placement order. A scan of the workers: this happens only after a
    /// worker died running something.
    fn worker_to_reserve(&self, id: TaskId) -> Option<WorkerId> {
        if let Some(w) = self.empty_worker(id) {
            return Some(w);
        }
        self.loads
            .in_order()
            .take_while(|(_, l)| !l.closed())
            .map(|(w, _)| w)
            .find(|&w| self.may_reserve(w, id))
    }

    /// An open worker that runs nothing and may be reserved for `id`
    /// (S18). Such workers come first in placement order (no task in their
    /// window), so the scan stops at the first busy one: cheap while the
    /// cluster is busy.
    fn empty_worker(&self, id: TaskId) -> Option<WorkerId> {
        self.loads
            .in_order()
            .take_while(|(_, l)| l.idle())
            .map(|(w, _)| w)
            .find(|&w| self.runs_nothing(w) && self.may_reserve(w, id))
    }

    /// Whether worker `w` may be reserved for `id` (S18): it may run it
    /// (S14), is not reserved, and holds no early task (S9), which could
    /// wait there for an input that a closed worker is never sent.
    fn may_reserve(&self, w: WorkerId, id: TaskId) -> bool {
        let restriction = self.task(id).restriction.as_deref();
        self.workers.get(&w).is_some_and(|worker| {
            worker.solo.is_none()
                && worker.early == 0
                && restriction.is_none_or(|r| worker.eligible(r))
        })
    }

    /// Whether worker `w` may be sent a task to run alone (S18): it runs
    /// nothing and is not paused (S17).
    fn ready_to_run_alone(&self, w: WorkerId) -> bool {
        self.runs_nothing(w) && self.loads.get(w).is_some_and(|l| !l.paused)
    }

    /// Whether no task is processing on worker `w`, in its window or early,
    /// but seceded ones: those wait for work elsewhere (which may be the
    /// very task to run alone), so they are not waited for.
    fn runs_nothing(&self, w: WorkerId) -> bool {
        self.workers.get(&w).is_some_and(|worker| {
            !worker
                .sent
                .iter()
                .any(|&(t, at)| self.sent_to(t, at, w) && !self.task(t).seceded)
        })
    }

    /// Keeps worker `w` for task `id` alone (S18).
    fn reserve(&mut self, w: WorkerId, id: TaskId) {
        if let Some(worker) = self.workers.get_mut(&w) {
            worker.solo = Some(id);
            self.reserved.insert(w);
            self.loads.set_reserved(w, true);
            tracing::debug!(task = %label(self.task(id)), worker = %w, "{w} reserved for a task that was running at a worker's death");
        }
    }

    /// Opens worker `w` to other work again (S18).
    fn unreserve(&mut self, w: WorkerId) {
        self.reserved.remove(&w);
        self.loads.set_reserved(w, false);
        if let Some(worker) = self.workers.get_mut(&w) {
            worker.solo = None;
            // Early room again (S9).
            self.early_blocked.remove(&w);
            if !worker.candidates.is_empty() {
                self.early_ready.insert(w);
            }
        }
    }

    /// Hands queued tasks to workers, best priority first across the
    /// central queue and the restricted queues (S14): a queue whose head
    /// cannot be placed now is left for this pass, and the others go on.
    fn assign_queued(&mut self, per_thread: u32, out: &mut impl Outbox) {
        if self.queue.is_empty() && self.restricted.is_empty() {
            return;
        }
        let mut deferred = Vec::new();
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut central_open = true;
        let mut blocked: BTreeSet<Arc<Restriction>> = BTreeSet::new();
        loop {
            // The best head among the open queues; stale heads are dropped.
            let central = if central_open {
                self.head_of_central()
            } else {
                None
            };
            let mut best: Option<(Priority, Option<Arc<Restriction>>)> = central.map(|p| (p, None));
            let mut emptied = Vec::new();
            for (r, heap) in &mut self.restricted {
                if blocked.contains(r) {
                    continue;
                }
                let head = loop {
                    match heap.peek() {
                        None => break None,
                        Some((p, id)) => {
                            let live = self.slots.get(id.index as usize).is_some_and(|slot| {
                                slot.gen == id.gen
                                    && slot.task.as_ref().is_some_and(|t| {
                                        t.state == TaskState::Queued && t.priority == p
                                    })
                            });
                            if live {
                                break Some(p);
                            }
                            heap.pop();
                        }
                    }
                };
                match head {
                    None => emptied.push(r.clone()),
                    Some(p) if best.as_ref().is_none_or(|(b, _)| p < *b) => {
                        best = Some((p, Some(r.clone())))
                    }
                    Some(_) => {}
                }
            }
            for r in emptied {
                self.restricted.remove(&r);
            }
            let Some((_, from)) = best else { break };
            match from {
                None => {
                    let Some((priority, id)) = self.queue.pop() else {
                        break;
                    };
                    let task = self.task(id);
                    let inputs = task.deps.iter().map(|&d| {
                        let dep = self.task(d);
                        (&dep.who_has[..], dep.nbytes)
                    });
                    match placement::choose(inputs, &self.loads, per_thread, &mut scratch) {
                        Choice::Worker(w) => self.send_compute(id, w, false, out),
                        Choice::Defer => {
                            deferred.push((priority, id));
                            // Bound the work spent skipping data-bound tasks.
                            if deferred.len() >= 64 {
                                central_open = false;
                            }
                        }
                        Choice::Full => {
                            deferred.push((priority, id));
                            central_open = false;
                        }
                    }
                }
                Some(r) => {
                    let Some((_, id)) = self.restricted.get(&r).and_then(|h| h.peek()) else {
                        continue;
                    };
                    match self.choose_restricted(id, &r, per_thread) {
                        Some(w) => {
                            if let Some(heap) = self.restricted.get_mut(&r) {
                                heap.pop();
                            }
                            self.send_compute(id, w, false, out);
                        }
                        None => {
                            blocked.insert(r);
                        }
                    }
                }
            }
        }
        self.scratch = scratch;
        self.queue.extend(deferred);
    }

    /// The priority of the central queue's first live entry, dropping
    /// stale ones.
    fn head_of_central(&mut self) -> Option<Priority> {
        while let Some((priority, id)) = self.queue.peek() {
            if self
                .get(id)
                .is_some_and(|t| t.state == TaskState::Queued && t.priority == priority)
            {
                return Some(priority);
            }
            self.queue.pop();
        }
        None
    }

    /// The worker for restricted task `id` (S14): among the workers `r`
    /// allows, with room in their window and `r`'s resources free, the one
    /// holding the most bytes of its inputs, then the least loaded, then the
    /// lowest id. `None` when none fits now. A scan of the workers:
    /// restricted tasks are the rare ones.
    fn choose_restricted(&self, id: TaskId, r: &Restriction, per_thread: u32) -> Option<WorkerId> {
        let task = self.task(id);
        let mut best: Option<(u64, placement::Load, WorkerId)> = None;
        for (&wid, w) in &self.workers {
            let Some(&load) = self.loads.get(wid) else {
                continue;
            };
            if !load.has_room(per_thread) || !w.eligible(r) || !w.fits_now(r) {
                continue;
            }
            let bytes = task
                .deps
                .iter()
                .map(|&d| self.task(d))
                .filter(|dep| dep.who_has.contains(&wid))
                .fold(0u64, |sum, dep| sum.saturating_add(dep.nbytes));
            let better = best.as_ref().is_none_or(|(bb, bl, bw)| {
                bytes > *bb || (bytes == *bb && load.lighter_or_first(wid, bl, *bw))
            });
            if better {
                best = Some((bytes, load, wid));
            }
        }
        best.map(|(_, _, w)| w)
    }

    /// Moves queued work from the busiest worker to idle threads (S15):
    /// while some worker has a thread that runs nothing and no move is
    /// on its way to, and the busiest worker has more than threads + 1
    /// tasks not being moved already, the busiest is asked to give up the
    /// worst-priority task that it does not seem to run yet
    /// (`ToWorker::GiveUp`), if its expected wait there is longer than
    /// [`STEAL_MIN_WAIT_NS`] and than fetching its inputs the idle worker
    /// lacks would take. A paused worker (S17) is asked for
    /// any of its tasks, whatever they take: they wait there anyway. The
    /// task moves once given up (`on_task_given_up`); a task its worker
    /// kept is not asked for again while it stays there.
    fn balance(&mut self, out: &mut impl Outbox) {
        if !self.balancing {
            return;
        }
        let mean = self.mean_ns;
        for _ in 0..64 {
            let Some(thief) = self.idle_thread() else {
                return;
            };
            let Some((victim, id)) = self.to_move(thief, mean) else {
                return;
            };
            self.ask_to_move(victim, id, thief, out);
        }
    }

    /// The clock moved to `now_ms`, milliseconds since the shell started
    /// (it never goes back; the shell ticks every [`TICK_MS`]): moves
    /// tasks stuck behind long ones to idle threads (S15).
    pub(crate) fn on_tick(&mut self, now_ms: u64, out: &mut impl Outbox) {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.balancing {
            return;
        }
        for _ in 0..64 {
            let Some(thief) = self.idle_thread() else {
                return;
            };
            let Some((victim, id)) = self.stuck_to_move(thief) else {
                return;
            };
            self.ask_to_move(victim, id, thief, out);
        }
    }

    /// A task stuck on its worker that S15 would move to `thief`: of a
    /// worker with more tasks than threads whose `threads` oldest have all
    /// been out for [`STUCK_MS`], so that every thread there is held and
    /// the rest wait at least that long again, a task that does not seem
    /// to run yet, as [`steal_candidate`](State::steal_candidate) picks
    /// it. Costs a pass over the tasks out on every worker: for
    /// [`on_tick`](State::on_tick), not for every assignment.
    fn stuck_to_move(&self, thief: WorkerId) -> Option<(WorkerId, TaskId)> {
        for (victim, load) in self.loads.in_order().rev() {
            if victim == thief || load.closed() {
                continue; // a closed worker's tasks move in `balance`
            }
            let Some(v) = self.workers.get(&victim) else {
                continue;
            };
            let threads = load.threads.max(1) as usize;
            let queued = (load.tasks as usize).saturating_sub(v.outgoing as usize);
            if queued <= threads {
                continue; // nothing waits there (the cheap look first)
            }
            let mut ages: Vec<u64> = v
                .sent
                .iter()
                .filter(|&&(id, at)| self.sent_to(id, at, victim))
                .filter(|&&(id, _)| !self.task(id).early && !self.task(id).seceded)
                .map(|&(id, _)| self.now_ms.saturating_sub(self.task(id).sent_ms))
                .collect();
            ages.sort_unstable_by(|a, b| b.cmp(a));
            let Some(&held_for) = ages.get(threads - 1).filter(|&&age| age >= STUCK_MS) else {
                continue; // a thread there is free, or its task is young
            };
            let wait_ns = held_for as f64 * 1e6;
            if let Some(id) = self.steal_candidate(victim, thief, wait_ns, threads) {
                return Some((victim, id));
            }
        }
        None
    }

    /// Asks `victim` to give task `id` up for `thief` (S15).
    fn ask_to_move(
        &mut self,
        victim: WorkerId,
        id: TaskId,
        thief: WorkerId,
        out: &mut impl Outbox,
    ) {
        let asked = self.tick();
        let task = self.task_mut(id);
        task.moving = Some(Move { to: thief, asked });
        let key = task.key.0;
        tracing::debug!(task = %label(self.task(id)), %victim, %thief, "asking {victim} to give a task up for an idle worker");
        for (w, incoming) in [(thief, true), (victim, false)] {
            if let Some(w) = self.workers.get_mut(&w) {
                if incoming {
                    w.incoming += 1;
                } else {
                    w.outgoing += 1;
                }
            }
        }
        out.to_worker(victim, ToWorker::GiveUp { key, id: asked });
    }

    /// The first worker in placement order with a thread that runs no
    /// task and waits for no task being moved to it (S15); paused workers
    /// never (S17).
    fn idle_thread(&self) -> Option<WorkerId> {
        for (w, load) in self.loads.in_order() {
            let threads = load.threads.max(1);
            // Placement order is by load per thread: past the first
            // worker with a task per thread, none has an idle thread.
            if load.closed() || load.tasks >= threads {
                return None;
            }
            let incoming = self.workers.get(&w).map_or(0, |w| w.incoming);
            if load.tasks.saturating_add(incoming) < threads {
                return Some(w);
            }
        }
        None
    }

    /// The worker and task S15 would move to `thief`: a paused worker's
    /// task (S17), else the busiest worker's, when tasks take `mean` on
    /// average (`None`: not known yet).
    fn to_move(&self, thief: WorkerId, mean: Option<f64>) -> Option<(WorkerId, TaskId)> {
        for (victim, busy) in self.loads.in_order().rev() {
            if victim == thief {
                return None;
            }
            let threads = busy.threads.max(1);
            if busy.closed() {
                // Everything it was sent waits until its memory drops, or
                // until it runs nothing (S18).
                match self.steal_candidate(victim, thief, f64::INFINITY, 0) {
                    Some(id) => return Some((victim, id)),
                    None => continue,
                }
            }
            let mean = mean?;
            let outgoing = self.workers.get(&victim)?.outgoing;
            let queued = busy.tasks.saturating_sub(outgoing);
            if queued <= threads + 1 {
                return None;
            }
            // The last task of the victim starts once the tasks before it
            // ran, `threads` at a time.
            let wait = f64::from(queued - threads) / f64::from(threads) * mean;
            if wait < STEAL_MIN_WAIT_NS {
                return None;
            }
            let skip = threads as usize + 1;
            return self
                .steal_candidate(victim, thief, wait, skip)
                .map(|id| (victim, id));
        }
        None
    }

    /// The task S15 moves from `victim` to `thief`: of the victim's tasks
    /// sent with every input in memory and not seceded, leaving out the
    /// `skip` it runs first (S7's reading), the worst priority not being
    /// moved already nor kept by the victim once, that `thief` may run
    /// (S14), and whose inputs `thief` lacks are fetched quicker than
    /// `wait`.
    fn steal_candidate(
        &self,
        victim: WorkerId,
        thief: WorkerId,
        wait: f64,
        skip: usize,
    ) -> Option<TaskId> {
        let v = self.workers.get(&victim)?;
        let t = self.workers.get(&thief)?;
        let mut live: Vec<(Priority, TaskId)> = v
            .sent
            .iter()
            .filter(|&&(id, at)| self.sent_to(id, at, victim))
            .filter(|&&(id, _)| !self.task(id).early && !self.task(id).seceded)
            .map(|&(id, _)| (self.task(id).priority, id))
            .collect();
        if live.len() <= skip {
            return None;
        }
        live.sort_unstable();
        live.drain(..skip);
        live.into_iter().rev().map(|(_, id)| id).find(|&id| {
            let task = self.task(id);
            // A task running alone stays where it is (S18).
            if task.moving.is_some() || task.kept || v.solo == Some(id) {
                return false;
            }
            let fits = t.may_take_now(task.restriction.as_deref());
            let missing = task
                .deps
                .iter()
                .map(|&d| self.task(d))
                .filter(|dep| !dep.who_has.contains(&thief))
                .fold(0u64, |sum, dep| sum.saturating_add(dep.nbytes));
            fits && (missing as f64) / STEAL_BYTES_PER_NS < wait
        })
    }

    /// Why queued restricted tasks cannot run (S14): one line per
    /// restriction no connected worker satisfies, with how many tasks wait
    /// for it. For `scheduler_info` and the dashboard.
    pub(crate) fn unrunnable_lines(&self, lines: &mut Vec<String>) {
        let unrunnable = |r: &Restriction| !self.workers.values().any(|w| w.eligible(r));
        let queued = |id: TaskId, p: Option<Priority>| {
            self.get(id)
                .is_some_and(|t| t.state == TaskState::Queued && p.is_none_or(|p| t.priority == p))
        };
        // Only the restrictions no worker satisfies are counted.
        let mut waiting: BTreeMap<&Restriction, BTreeSet<TaskId>> = BTreeMap::new();
        for (r, heap) in self.restricted.iter().filter(|(r, _)| unrunnable(r)) {
            let live = heap.iter().filter(|e| queued(e.1, Some(e.0)));
            waiting.entry(r).or_default().extend(live.map(|e| e.1));
        }
        // Those that run alone once a worker fits them (S18).
        for &id in self.suspects.iter().filter(|&&id| queued(id, None)) {
            if let Some(r) = self
                .task(id)
                .restriction
                .as_deref()
                .filter(|r| unrunnable(r))
            {
                waiting.entry(r).or_default().insert(id);
            }
        }
        for (r, ids) in waiting.into_iter().filter(|(_, ids)| !ids.is_empty()) {
            lines.push(format!(
                "{} task(s) wait for a worker with {}: no connected worker has it",
                ids.len(),
                r.describe()
            ));
        }
    }

    /// Sends early candidates to their worker while it has early room: as
    /// many tasks as its window (S9). Sending one can make its own waiting
    /// dependents candidates, so a chain goes out link after link.
    ///
    /// Looks only at workers in `early_ready` (and all blocked ones when
    /// windows grew), by id: any other worker has no candidate or no early
    /// room, so it would send nothing.
    fn assign_early(&mut self, per_thread: u32, out: &mut impl Outbox) {
        if per_thread > self.early_per_thread {
            let blocked = std::mem::take(&mut self.early_blocked);
            self.early_ready.extend(blocked);
        }
        self.early_per_thread = per_thread;
        // Sending to `w` can give `w` new candidates (its dependents go
        // early to it) and so put it back: never a worker visited earlier.
        while let Some(w) = self.early_ready.pop_first() {
            self.early_blocked.remove(&w);
            let window = self.loads.get(w).map_or(0, |l| l.window(per_thread));
            while let Some(worker) = self.workers.get_mut(&w) {
                if worker.early >= window {
                    if !worker.candidates.is_empty() {
                        self.early_blocked.insert(w);
                    }
                    break;
                }
                let Some((priority, id)) = worker.candidates.pop() else {
                    break;
                };
                let fresh = self
                    .get(id)
                    .is_some_and(|t| t.priority == priority && t.state == TaskState::Waiting);
                if fresh && self.early_target(id) == Some(w) {
                    self.send_compute(id, w, true, out);
                }
            }
        }
    }

    /// Sends `id` to `worker`; `early` when some input is not in memory yet
    /// but being computed there (S9).
    fn send_compute(&mut self, id: TaskId, worker: WorkerId, early: bool, out: &mut impl Outbox) {
        let task = self.task(id);
        let mut deps = Vec::with_capacity(task.deps.len());
        let mut who_has = Vec::new();
        for &d in &task.deps {
            let dep = self.task(d);
            deps.push(dep.key.0);
            // An input still being computed is not named: the worker waits
            // for its own result (S9).
            if dep.state == TaskState::Memory
                && !dep.who_has.contains(&worker)
                && !who_has.iter().any(|(k, _)| *k == dep.key.0)
            {
                who_has.push((dep.key.0, dep.who_has.clone()));
            }
        }
        // The run's number: the tick of this send, new at every `Compute`
        // (S6).
        let now = self.tick();
        let task = self.task(id);
        out.to_worker(
            worker,
            ToWorker::Compute {
                key: task.key.0,
                run: now,
                name: task.name.clone(),
                function: task.function.clone(),
                payload: task.payload.clone(),
                deps,
                who_has,
                priority: task.priority,
                timeout_ms: task.timeout_ms.or(self.task_timeout_ms),
                retries: task.retries,
            },
        );
        self.event(id, WireEventKind::Started { worker }, out);
        let now_ms = self.now_ms;
        let task = self.task_mut(id);
        task.state = TaskState::Processing(worker);
        task.sent_at = now;
        task.sent_ms = now_ms;
        task.early = early;
        task.kept = false;
        let restriction = task.restriction.clone();
        if let Some(w) = self.workers.get_mut(&worker) {
            if early {
                w.early += 1;
            } else {
                State::count_in_window(&mut self.loads, worker, w, false);
                if let Some(r) = restriction {
                    w.hold(&r, true);
                }
            }
            w.sent.push((id, now));
            if w.sent.len() >= w.sent_limit {
                let mut sent = std::mem::take(&mut w.sent);
                sent.retain(|&(t, at)| self.sent_to(t, at, worker));
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.sent_limit = 2 * sent.len() + 64;
                    w.sent = sent;
                }
            }
        }
        // Its waiting dependents may now go early to this worker too.
        let len = self.task(id).dependents.len();
        for i in 0..len {
            let s = self.task(id).dependents[i];
            if self.get(s).is_some_and(|t| t.state == TaskState::Waiting) {
                self.consider(s);
            }
        }
    }

    /// Whether `id` is still processing on `worker` since the `Compute`
    /// sent at tick `at`: an entry of that worker's `sent` is live.
    fn sent_to(&self, id: TaskId, at: u64, worker: WorkerId) -> bool {
        self.get(id)
            .is_some_and(|t| t.state == TaskState::Processing(worker) && t.sent_at == at)
    }

    /// Checks the invariants of README.md (tests, and the simulated
    /// cluster after every step). A full scan.
    pub(crate) fn check_invariants(&self) {
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(task) = &slot.task else { continue };
            let id = TaskId {
                index: index as u32,
                gen: slot.gen,
            };
            assert_eq!(self.by_key.get(&task.key), Some(&id));
            let waiters = self
                .dependents(id)
                .iter()
                .filter(|&&s| self.task(s).state.is_active())
                .count() as u32;
            assert_eq!(task.waiters, waiters, "waiters of {:?}", task.key);
            assert_eq!(self.dependents(id).len() as u32, task.live_dependents);
            assert_eq!(task.since.len(), task.who_has.len());
            for (w, _) in &task.replicas {
                assert!(!task.who_has.contains(w), "{w} asked to copy what it holds");
                assert!(self.workers.contains_key(w), "{w} asked to copy, then gone");
            }
            match &task.state {
                TaskState::Memory => assert!(!task.who_has.is_empty()),
                _ => {
                    assert!(task.who_has.is_empty(), "{:?} {:?}", task.key, task.state);
                    assert!(task.inline.is_none(), "{:?} {:?}", task.key, task.state);
                    assert!(task.replicas.is_empty(), "{:?} {:?}", task.key, task.state);
                }
            }
            if task.state.is_active() || task.state == TaskState::Memory {
                assert!(
                    task.needed(),
                    "{:?} is {:?} but not needed",
                    task.key,
                    task.state
                );
            }
            if task.state == TaskState::Waiting {
                let missing = task
                    .deps
                    .iter()
                    .filter(|&&d| self.task(d).state != TaskState::Memory)
                    .count() as u32;
                assert_eq!(task.waiting_on, missing);
                assert!(missing > 0);
            }
            if task.early {
                assert!(matches!(task.state, TaskState::Processing(_)));
                assert!(
                    task.deps
                        .iter()
                        .any(|&d| self.task(d).state != TaskState::Memory),
                    "{:?} is early with every input in memory",
                    task.key
                );
            }
            if let Some(m) = task.moving {
                let TaskState::Processing(w) = task.state else {
                    panic!("{:?} moving while {:?}", task.key, task.state);
                };
                assert!(!task.early && !task.seceded && !task.kept && m.to != w);
            }
            if task.kept {
                assert!(matches!(task.state, TaskState::Processing(_)));
            }
            if task.state == TaskState::Queued && task.deaths > 0 {
                assert!(self.suspects.contains(&id), "{:?} left out (S18)", task.key);
            }
            if task.state == TaskState::Queued {
                assert!(task
                    .deps
                    .iter()
                    .all(|&d| self.task(d).state == TaskState::Memory));
            }
            assert!(!(task.who_wants.is_empty() && task.live_dependents == 0));
            // A client's references are counted in one entry of the task's
            // wanters, and only while it is connected (S5).
            for (i, w) in task.who_wants.iter().enumerate() {
                assert!(w.count >= 1 && self.clients.contains(&w.client));
                assert!(task.who_wants[..i].iter().all(|o| o.client != w.client));
            }
        }
        for (&w, worker) in &self.workers {
            let on_w = || {
                self.slots
                    .iter()
                    .filter_map(|s| s.task.as_ref())
                    .filter(move |t| t.state == TaskState::Processing(w))
            };
            let window = match &worker.retiring {
                Some(r) => r.busy,
                None => self.loads.get(w).expect("every worker has a load").tasks,
            };
            let seceded_count = |counted: bool| {
                on_w()
                    .filter(|t| !t.early && (counted || !t.seceded))
                    .count() as u32
            };
            assert_eq!(window, seceded_count(worker.retiring.is_some()));
            assert_eq!(worker.retiring.is_some(), self.retiring.contains(&w));
            let all = || self.slots.iter().filter_map(|s| s.task.as_ref());
            let incoming = all()
                .filter(|t| t.moving.is_some_and(|m| m.to == w))
                .count();
            assert_eq!(worker.incoming as usize, incoming, "moves to {w}");
            let outgoing = on_w().filter(|t| t.moving.is_some()).count();
            assert_eq!(worker.outgoing as usize, outgoing, "moves from {w}");
            assert_eq!(worker.early, on_w().filter(|t| t.early).count() as u32);
            let mut used = vec![0u64; worker.resources.milli().len()];
            for t in on_w().filter(|t| !t.early) {
                assert!(
                    t.restriction.as_deref().is_none_or(|r| worker.eligible(r)),
                    "{:?} runs on {w}, which it may not use",
                    t.key
                );
                for (name, amount) in t.restriction.iter().flat_map(|r| r.resources.milli()) {
                    let i = worker
                        .resources
                        .milli()
                        .binary_search_by(|(n, _)| n.cmp(name))
                        .expect("a task holds only resources its worker has");
                    used[i] += amount;
                }
            }
            assert_eq!(worker.used, used, "resources held on {w}");
            // S18: a reserved worker is closed, and runs its task alone.
            assert_eq!(worker.solo.is_some(), self.reserved.contains(&w));
            if let Some(load) = self.loads.get(w) {
                assert_eq!(load.reserved, worker.solo.is_some(), "{w} reserved");
            }
            if let Some(id) = worker.solo {
                assert_eq!(worker.early, 0, "{w} reserved with early tasks");
                let task = self.get(id).expect("a reserved worker's task is live");
                assert!(
                    task.deaths > 0,
                    "{w} reserved for a task that never saw a death"
                );
                match task.state {
                    TaskState::Queued => assert!(self.suspects.contains(&id)),
                    TaskState::Processing(on) => {
                        assert_eq!(on, w);
                        let beside = on_w().filter(|t| !t.seceded).count();
                        assert_eq!(beside, 1, "{w} runs others beside its reserved task");
                    }
                    ref other => panic!("{w} reserved for a task {other:?}"),
                }
            }
            for t in on_w().filter(|t| t.deaths > 0 && !t.seceded) {
                assert_eq!(
                    worker.solo.map(|id| self.task(id).key),
                    Some(t.key),
                    "{:?} ran at a death, and runs on {w} not alone",
                    t.key
                );
            }
            for (i, (name, total)) in worker.resources.milli().iter().enumerate() {
                assert!(used[i] <= *total, "{w} runs more {name} than it has");
            }
        }
        assert!(
            self.loads.iter().map(|(id, _)| id).eq(self
                .workers
                .keys()
                .copied()
                .filter(|w| !self.retiring.contains(w))),
            "loads and workers name different workers"
        );
        self.loads.check();
        for (&w, worker) in &self.workers {
            let window = self.loads.get(w).map(|l| l.window(self.early_per_thread));
            if self.early_blocked.contains(&w) {
                assert!(Some(worker.early) >= window, "{w} blocked with early room");
            } else if !worker.candidates.is_empty() {
                assert!(self.early_ready.contains(&w), "{w}'s candidates overlooked");
            }
        }
        for w in self.early_ready.iter().chain(&self.early_blocked) {
            assert!(self.workers.contains_key(w), "{w} is gone but indexed");
        }
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

/// Whether `worker` was asked to fetch a copy of `task` (S13) after `after`
/// (a tick): that `Fetch` named the holders of that moment.
fn asked_to_copy(task: &Task, worker: WorkerId, after: u64) -> bool {
    task.replicas
        .iter()
        .any(|&(w, asked)| w == worker && asked > after)
}

/// A task as log lines name it: `name-1a2b3c4d`.
fn label(task: &Task) -> String {
    let hex: String = task.key.0[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", task.name)
}
