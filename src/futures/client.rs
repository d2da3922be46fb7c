//! `Client`: the futures API (`submit`, `map`, `gather`, `scatter`, …) on an
//! executor in this process.
//!
//! The client keeps a table of results by key. Rules:
//!
//! 1. An entry exists while at least one [`Future`] (or a `Delayed` returned
//!    by [`Client::persist`]) refers to its key; the last one dropped frees the
//!    value ("release on drop").
//! 2. Submitting work whose key has an entry creates no task: the new future
//!    shares the entry, finished or not. Cancelled and lost (rule 8)
//!    entries are replaced: the work runs again, and every future of the
//!    key gets its outcome.
//! 3. A submitted graph never recomputes a key the table holds: finished
//!    entries become data, failed ones replay their failure, and a graph that
//!    needs a pending entry starts only when that entry is done. A cancelled
//!    entry replays its cancellation only where the graph takes it as a
//!    future (a lost one fails it as lost, rule 8); met as a node of the
//!    graph's own (the same work, built again as a `Delayed`), either is
//!    computed, as rule 2 does for roots, and the entry stays as it was. A
//!    future cancelled after the graph was sent to a cluster, which had it
//!    computed there all the same, fails the graph's outputs as cancelled
//!    when they are recorded, as if the graph had waited here: so does one
//!    cancelled and submitted again meanwhile (its entry counts its
//!    cancellations, `Rare::cancels`, and the run keeps the count it saw).
//!    A pending future of another client in the graph is waited for the
//!    same way, where the graph would otherwise start on a thread of its
//!    own (threads, a cluster): no executor thread, and no cluster
//!    connection's thread, blocks on it (the completion of the very future
//!    it waited for could need that thread). A synchronous or simulated
//!    client, and another client's simulated future, which runs only when
//!    waited for, still wait for it where the graph runs.
//! 4. A submission stops (its executor run is cancelled) once none of its
//!    outputs is wanted any more: each completed, cancelled or released.
//!    An output counts once, however many of these happen to it: whoever
//!    takes the entry's run under the table lock counts it.
//! 5. On a cluster, results stay where they were computed: the table holds
//!    [`Remote`] handles (the client's runs ask to
//!    [`keep_remote`](Reporter::keep_remote)), later graphs refer to them by
//!    key, and a result's bytes come over only when `result()` (or a task in
//!    this process) needs them. Scattered data is sent to the cluster once,
//!    and held there the same way. Dropping the entry drops the handle,
//!    which frees the value on the cluster.
//! 6. A submitted graph is optimized as `compute` optimizes it (cull,
//!    inline, fuse; off with [`Config::optimize`]), so a chain travels to
//!    a cluster as one task. Every key the table answers for stays a task
//!    of its own, outside any fused task (so rule 3 holds inside fused
//!    tasks too), and so does every root: each future's key is a plan
//!    task whose outcome its executor reports. A progress display counts
//!    a run's plan tasks, a fused one once (`Shared::pending_tasks`).
//! 7. The client lets go of values and graphs on threads that are not its
//!    user's own call: an executor's thread completing a run, a listener
//!    there dropping the handle it held (`fire_and_forget`), a wait that
//!    started a deferred graph. A value's `Drop` and a graph's literal
//!    arguments' are user code, which may panic, and a panic on a pool
//!    thread aborts the process: an entry's value and graph when its last
//!    handle goes, a finished key's graph, a graph let go before it ran
//!    (released or cancelled while it waited) and a value nobody takes are
//!    dropped with `rask_executor::drop_quietly` (its dropping rules): the
//!    panic is logged and changes no outcome. So is a listener's panic (a
//!    user's `Waker`, a handle's drop): `Shared::wake` notifies each one
//!    under a catch of its own, and the sleepers, the listeners after it
//!    and the graphs waiting for the key still hear of it.
//! 8. A value left on a cluster (rule 5) belongs to the connection it was
//!    reported on: once that is lost, the cluster's handle says the value
//!    is [lost](Remote::lost) unless its bytes came here (small values,
//!    fetched ones), and the finished entry is *lost* work. The table asks
//!    the handle whenever it looks at a finished entry to decide (rules 2
//!    and 3, `Client::retry`), under its lock, and the handle answers from
//!    its connection's state as it is then (the cluster client's rule
//!    10): nothing is sent here on a reconnection, so no notice can arrive
//!    late, leaving a submission in flight to use a value already gone,
//!    or find the key's entry replaced meanwhile and mark the new value
//!    lost. A submission decided after the loss was seen recomputes the
//!    key; one decided before it was in flight at the loss, and fails as
//!    the cluster's open outputs do. A lost entry is taken as a cancelled
//!    one: the same work submitted again replaces it, and the future that
//!    held it, which shares the key, gets the new value (rule 2); met as a
//!    node of a new graph, it is computed there, and the entry stays lost
//!    (rule 3). Until replaced, the future stays finished (`status`) and
//!    its `result()` fails with "the value was lost with the connection to
//!    the scheduler", as does a graph that takes it as a future, at once
//!    and sent nowhere; a finished entry keeps no work to run again, so
//!    [`Client::retry`] fails with that error too.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Waker;

use rask_executor::{
    Failure, FailureKind, Key, Op, OpError, Outcome, Remote, Reporter, Value, WireError, WireTask,
};

use crate::build::args::{apply, IntoArg};
use crate::build::data::Data;
use crate::build::delayed::Delayed;
use crate::build::graph::KeyMap;
use crate::build::node::{Call, Name, Node, Plain};
use crate::build::registry::replay;
use crate::futures::future::Future;
use crate::futures::spin::Spin;
use crate::plan::Options;
use crate::run::backend::Backend;
use crate::run::config::{Config, ExecutorKind};
use crate::run::progress::Plans;
use crate::{Error, Result};

/// A handle to an executor that runs work in the background and returns
/// [`Future`]s: Dask's `Client`, in process.
///
/// Cloning is cheap; clones share the executor and the table of results.
///
/// # Examples
///
/// ```
/// use rask::{delayed, Client};
///
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// let client = Client::threads(2)?;
/// let x = client.submit(delayed!(inc(1)))?;          // returns at once
/// let total = client.submit(delayed!(add(&x, 10)))?; // futures are arguments
/// assert_eq!(total.result()?, 12);
///
/// let futures = client.map(inc, 0..10)?;
/// assert_eq!(client.gather(&futures)?, (1..=10).collect::<Vec<i64>>());
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Shared>,
    /// Given to every task this handle submits that has none of its own
    /// ([`Client::annotate`]).
    annotations: Option<Arc<rask_executor::Annotations>>,
}

/// Makes room in `table` for `nodes` keys at once: a `map` of a million
/// grows its client's table once, not twenty times over fresh memory.
/// Counted as though the keys held were among them (a `map` again), so a
/// table never grows for keys it holds.
fn make_room(table: &mut KeyMap<Entry>, nodes: usize) {
    let more = nodes.saturating_sub(table.len());
    table.reserve(more);
}

/// The most items a [`Client::map`] makes room for before it has them.
const MAX_HINT: usize = 1 << 24;

/// How many calls of a [`Client::map`] go in one submission: enough that
/// a submission's fixed costs do not show, few enough that the executor
/// starts soon.
const PART: usize = 4096;

/// State shared by a client, its futures and its running submissions.
pub(crate) struct Shared {
    pub(crate) backend: Backend,
    pub(crate) kind: ExecutorKind,
    table: Mutex<KeyMap<Entry>>,
    /// Notified when an entry some thread sleeps on ([`Entry::waiters`])
    /// stops being pending.
    changed: Condvar,
    /// Failures and cancellations of [`watched`](Entry::watched) entries
    /// so far, changed under the table lock: a thread in
    /// [`wait_all`](Shared::wait_all) looks at its keys again only when
    /// this moved.
    failures: AtomicU64,
    /// How a waiting thread watches before it sleeps (`spin` rules):
    /// `None` where it cannot pay.
    spin: Option<Spin>,
    /// Whether `compute` and `persist` draw a progress bar
    /// ([`Config::progress`]).
    progress: bool,
    /// Whether submitted graphs are optimized ([`Config::optimize`]).
    optimize: bool,
    /// The result cache `compute` and `persist` use
    /// (`crate::futures::cached`), as the configuration named it when the
    /// client was made.
    pub(crate) cache: Option<crate::run::config::CacheSettings>,
}

/// One key's result as the client holds it.
struct Entry {
    state: State,
    /// Live future handles (rule 1).
    refs: usize,
    /// Threads that went to sleep on `changed` waiting for this entry,
    /// counted under the table lock, reset when it stops being pending. A
    /// notification costs a syscall and wakes every sleeper, so only an
    /// entry somebody sleeps on sends one: a `gather` over many futures
    /// wakes once per future it waits for, not once per completion. It may
    /// count a sleeper twice (one woken by a timeout that sleeps again),
    /// never too few.
    waiters: u32,
    /// A thread waits for this entry among others and stops at the first
    /// of them that fails ([`wait_all`](Shared::wait_all)): when this one
    /// fails or is cancelled, [`Shared::failures`] counts it and the
    /// sleepers are woken. Never unset: a needless wake-up at most.
    watched: bool,
    /// The run computing this entry and the entry's output index in it, to
    /// stop it when nobody wants it (rule 4).
    run: Option<(Arc<Run>, usize)>,
    /// The work, until it finished: what `Client::retry` runs again.
    node: Option<Arc<Node>>,
    /// What few entries have, boxed so that the table's entries are small
    /// (a `map` of 100 000 futures looks each up a few times, in no order:
    /// most lookups miss the caches, and smaller entries miss less).
    rare: Option<Box<Rare>>,
}

/// The lists of an [`Entry`] that most entries never use.
#[derive(Default)]
struct Rare {
    /// Wakers of `.await`s and `as_completed` queues to notify once done.
    listeners: Vec<Listener>,
    /// Submissions waiting for this entry (rule 3).
    deferred: Vec<Arc<Deferred>>,
    /// Progress displays that counted this entry's tasks by the nodes of
    /// its graph, before a run planned it ([`Shared::pending_tasks`]): that
    /// run folds nothing, so every node counted reports its own outcome,
    /// and each display learns the run's plan to count its events
    /// (`run::progress` rule 1). Kept, the displays gone, until the run.
    counted: Vec<Weak<Plans>>,
    /// How many times it was cancelled ([`Entry::cancel`]): a run that took
    /// it as a future on a cluster, sent before one of them, fails as
    /// cancelled (rule 3), even once the work was submitted again.
    cancels: u64,
}

/// Where a key's computation stands.
#[derive(Clone)]
pub(crate) enum State {
    Pending,
    Finished(Value),
    Failed(Arc<Failure>),
    Cancelled,
}

impl State {
    pub(crate) fn is_pending(&self) -> bool {
        matches!(self, State::Pending)
    }

    /// Cancelled, or failed because an input was cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        match self {
            State::Cancelled => true,
            State::Failed(f) => f.kind == FailureKind::Cancelled,
            _ => false,
        }
    }

    /// Why a finished value is lost for good (rule 8): its cluster let it
    /// go and its bytes are not here. Asked of the value's handle, now.
    fn lost(&self) -> Option<WireError> {
        match self {
            State::Finished(value) => value.downcast_ref::<Remote>()?.lost(),
            _ => None,
        }
    }

    /// Work to run again when it is submitted (rules 2, 3 and 8):
    /// cancelled, or finished with a value that is lost.
    fn is_gone(&self) -> bool {
        self.is_cancelled() || self.lost().is_some()
    }
}

pub(crate) enum Listener {
    Waker(Waker),
    Queue(Arc<dyn Fn() + Send + Sync>),
}

impl Listener {
    fn notify(self) {
        match self {
            Listener::Waker(w) => w.wake(),
            Listener::Queue(f) => f(),
        }
    }

    /// [`notify`](Listener::notify), catching a panic (rule 7): a user's
    /// `Waker` that panics, a handle let go whose value's `Drop` does.
    /// Logged as a warning, and the caller goes on with the next one.
    fn notify_quietly(self) {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.notify())) {
            tracing::warn!(
                "a listener of a future panicked when told it is done: {} (ignored: the \
                 others are still told)",
                rask_executor::panic_message(&*payload)
            );
            rask_executor::drop_quietly(payload, "a listener's panic");
        }
    }
}

/// What rule 7 names in the warning of a graph's `Drop` that panicked.
const A_GRAPH: &str = "a graph the client let go (its literal arguments)";

/// Graphs let go quietly (rule 7) when this goes out of scope, one at a
/// time: declared before a table lock, so that they go after it (one may
/// hold the last reference to futures, whose drop takes the lock).
struct LetGo(Vec<Arc<Node>>);

impl Drop for LetGo {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            rask_executor::drop_each_quietly(self.0.drain(..), A_GRAPH);
        }
    }
}

/// What a client takes from its configuration when it is made.
struct Settings {
    progress: bool,
    optimize: bool,
    cache: Option<crate::run::config::CacheSettings>,
    /// Whether waits may watch before they sleep ([`Config::spin`]).
    spin: bool,
}

impl Settings {
    fn of(config: &Config) -> Result<Settings> {
        Ok(Settings {
            progress: config.resolve_progress()?,
            optimize: config.resolve_optimize()?,
            cache: config.resolve_cache()?,
            spin: config.resolve_spin()?,
        })
    }
}

/// A graph waiting for pending entries before it can be lowered.
struct Deferred {
    /// Taken out by the wake that starts the graph, so that only its plan
    /// holds the graph while it runs.
    roots: Mutex<Vec<Arc<Node>>>,
    waiting: AtomicUsize,
}

impl Client {
    /// A client on the executor the configuration names (explicit settings,
    /// then `rask::config::set`, then `RASK_SCHEDULER`, then the default).
    ///
    /// # Errors
    ///
    /// A configuration error, or [`Error::Executor`] if the executor cannot
    /// start.
    pub fn new() -> Result<Client> {
        Client::with_config(&Config::default())
    }

    /// A client on the executor `config` resolves to.
    ///
    /// # Errors
    ///
    /// As [`Client::new`].
    pub fn with_config(config: &Config) -> Result<Client> {
        let kind = config.resolve()?;
        let settings = Settings::of(config)?;
        Ok(Client::on(Backend::for_client(&kind)?, kind, settings))
    }

    fn on(backend: Backend, kind: ExecutorKind, settings: Settings) -> Client {
        Client {
            inner: Arc::new(Shared {
                backend,
                progress: settings.progress,
                optimize: settings.optimize,
                cache: settings.cache,
                table: Mutex::new(KeyMap::default()),
                changed: Condvar::new(),
                failures: AtomicU64::new(0),
                spin: Spin::for_client(&kind, settings.spin),
                kind,
            }),
            annotations: None,
        }
    }

    /// This client, giving `annotations` (a priority, resources, workers)
    /// to every task it submits that has none of its own — Dask's
    /// `client.submit(…, priority=…)`, `client.map(…, resources=…)`. The
    /// clone shares everything else (futures, cache, connection) with
    /// `self`. Identical work already submitted keeps its first
    /// annotations. Local executors ignore them (see
    /// [`Delayed::priority`](crate::Delayed::priority)).
    ///
    /// ```
    /// # use rask::{Annotations, Client};
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let client = Client::threads(2)?;
    /// let urgent = client.annotate(Annotations { priority: 10, ..Annotations::default() });
    /// let fs = urgent.map(inc, 0..4)?;
    /// assert_eq!(client.gather(&fs)?, vec![1, 2, 3, 4]);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn annotate(&self, annotations: rask_executor::Annotations) -> Client {
        Client {
            inner: self.inner.clone(),
            annotations: Some(Arc::new(annotations)),
        }
    }

    /// A client on a new cluster on this machine: a scheduler in this
    /// process and `workers` worker processes of this program (Dask's
    /// `Client(n_workers=…)`). The cluster stops when the last clone of the
    /// client is dropped. Needs [`rask::init`](crate::init) first in `main`.
    ///
    /// Workers write to this program's stdout and stderr, so what tasks
    /// print shows as if they ran here, unprefixed, and none of it is lost
    /// when the program exits; a worker flushes its stdout before it reports
    /// results, so a `print!` without a newline shows too. Lines of
    /// different workers may interleave: a `println!` line stays whole
    /// (Rust's stdout is line-buffered), but stderr is unbuffered and an
    /// `eprintln!` is written in pieces that two workers can mix (a line
    /// formatted first, newline included, and printed with
    /// `eprint!("{line}")` is written at once).
    /// `RASK_SCHEDULER=local:N` behaves the same.
    ///
    /// # Threads
    ///
    /// Each worker runs `RASK_WORKER_THREADS` threads if that is set, and
    /// otherwise the machine's cores split between the workers, at least one
    /// each: `max(1, cores / workers)`, as Dask's `Client(n_workers=…)`. On 8
    /// cores, `Client::local(2)` is 2 workers of 4 threads, and
    /// `Client::local(16)` 16 workers of 1. [`Client::scheduler_info`] shows
    /// the threads of each worker.
    ///
    /// # Errors
    ///
    /// [`Error::NotInitialized`] without `rask::init`; [`Error::Distributed`]
    /// naming the variable and its value when `RASK_WORKER_THREADS` is not a
    /// positive integer (before any process starts); a distributed error
    /// when the scheduler or a worker cannot start.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// fn main() -> rask::Result<()> {
    ///     rask::init();   // worker processes of this program stop here
    ///     let client = rask::Client::local(2)?;
    ///     let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    ///     for worker in client.scheduler_info()?.workers {
    ///         assert_eq!(worker.threads as usize, (cores / 2).max(1));
    ///     }
    ///     Ok(())
    /// }
    /// ```
    #[cfg(feature = "distributed")]
    pub fn local(workers: usize) -> Result<Client> {
        let cluster = crate::run::cluster::Cluster::local(workers)?;
        Ok(Client::on(
            Backend::Distributed(Arc::new(cluster)),
            ExecutorKind::Local(workers),
            Settings::of(&Config::new())?,
        ))
    }

    /// A client on a running scheduler, e.g. `Client::connect("tcp://10.0.0.5:8786")`
    /// (started with the `rask-scheduler` binary, its workers with
    /// `RASK_WORKER=tcp://10.0.0.5:8786 ./my-app`). It proves the
    /// scheduler's token, found in `RASK_TOKEN`, the file `RASK_TOKEN_FILE`
    /// names, or `~/.rask/token` (`RASK_INSECURE=1` for a scheduler
    /// started with `--insecure`). A `tls://host:port` address is reached
    /// over TLS, verified with the CA in `RASK_TLS_CA` (and presenting
    /// `RASK_TLS_CERT` and `RASK_TLS_KEY` to a scheduler that requires a
    /// client certificate).
    ///
    /// # Errors
    ///
    /// A distributed error when the scheduler cannot be reached, when no
    /// token is found, or when the scheduler refuses this one (the error
    /// says what to set).
    #[cfg(feature = "distributed")]
    pub fn connect(address: &str) -> Result<Client> {
        let kind = match (
            address.strip_prefix("tls://"),
            address.strip_prefix("unix:"),
        ) {
            (Some(rest), _) => ExecutorKind::Tls(rest.to_owned()),
            (_, Some(path)) => ExecutorKind::Unix(path.to_owned()),
            _ => ExecutorKind::Tcp(address.strip_prefix("tcp://").unwrap_or(address).to_owned()),
        };
        // `rask_distributed` reads the scheme; a bare `host:port` is TCP.
        let cluster = crate::run::cluster::Cluster::connect(address)?;
        Ok(Client::on(
            Backend::Distributed(Arc::new(cluster)),
            kind,
            Settings::of(&Config::new())?,
        ))
    }

    /// A client on a pool of `n` threads (`0`: one per core).
    ///
    /// # Errors
    ///
    /// As [`Client::new`].
    pub fn threads(n: usize) -> Result<Client> {
        Client::with_config(&Config::threads(n))
    }

    /// A client on the synchronous executor: `submit` runs the work before
    /// it returns. Useful for debugging and deterministic tests.
    ///
    /// # Errors
    ///
    /// As [`Client::new`].
    pub fn synchronous() -> Result<Client> {
        Client::with_config(&Config::synchronous())
    }

    /// A client on the simulated executor (`RASK_SCHEDULER=sim:SEED`):
    /// `submit` only queues the work; whoever waits for a future
    /// (`result`, `wait`, `as_completed`, `wait_first`, `.await`) runs the
    /// queued work on its own thread, one task at a time, picked among the
    /// ready tasks of every submission by `seed`, and `as_completed` picks
    /// among the futures done by `seed` too. The same seed and the same
    /// calls give the same order on any machine.
    ///
    /// # Errors
    ///
    /// As [`Client::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{as_completed, Client};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// let order = |seed| -> rask::Result<Vec<i64>> {
    ///     let client = Client::simulated(seed)?;
    ///     as_completed(client.map(inc, 0..6)?).map(|f| f.result()).collect()
    /// };
    /// assert_eq!(order(4)?, order(4)?);   // a seed replays its order
    /// assert!((0..20).any(|seed| order(seed).unwrap() != order(4).unwrap()));
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn simulated(seed: u64) -> Result<Client> {
        Client::with_config(&Config::simulated(seed))
    }

    /// Kills worker process `index` of the local cluster behind this client,
    /// as `kill -9` would: for fault-tolerance tests.
    ///
    /// # Errors
    ///
    /// When the client is not on a local cluster, or the worker is gone.
    #[doc(hidden)]
    #[cfg(feature = "distributed")]
    pub fn __kill_worker(&self, index: usize) -> Result<()> {
        match &self.inner.backend {
            Backend::Distributed(cluster) => cluster.kill_worker(index),
            _ => Err(Error::Executor(std::io::Error::other(
                "this client is not on a local cluster",
            ))),
        }
    }

    /// The executor this client runs on.
    pub fn executor(&self) -> ExecutorKind {
        self.inner.kind.clone()
    }

    /// Starts computing `delayed` in the background and returns its future
    /// at once. Work already held or running under the same key is not
    /// started again (rule 2).
    ///
    /// # Errors
    ///
    /// On a cluster, [`Error::Unsendable`] for a graph with a task that
    /// cannot run there (a closure that captures variables, a function that
    /// is not registered); nothing of it is sent.
    ///
    /// # Examples
    ///
    /// ```
    /// # use rask::{delayed, Client};
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let client = Client::threads(2)?;
    /// let a = client.submit(delayed!(inc(1)))?;
    /// let b = client.submit(delayed!(inc(1)))?;   // same key: shares `a`'s work
    /// assert_eq!(a.key(), b.key());
    /// assert_eq!(b.result()?, 2);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn submit<T: Data>(
        &self,
        delayed: impl std::borrow::Borrow<Delayed<T>>,
    ) -> Result<Future<T>> {
        let mut futures = self.submit_nodes(std::slice::from_ref(delayed.borrow().node()))?;
        Ok(futures.pop().expect("one future per submitted node"))
    }

    /// `compute` through the client: as [`submit`](Client::submit),
    /// returning a future at once (Dask's `client.compute(delayed)`), and
    /// drawing a progress bar for it when the client was made with
    /// [`Config::progress`] (or `RASK_PROGRESS=1`).
    ///
    /// Unlike `submit`, it uses the [result cache](crate::cache) the
    /// client's configuration names (`RASK_CACHE`, [`Config::cache`]): the
    /// cached tasks of the graph are looked up before it returns, a hit is
    /// placed on the executor (on a cluster: sent once, to a worker, as by
    /// [`scatter`](Client::scatter)) and stands for everything below it,
    /// and the value of each cached task that missed is written once it is
    /// done (see [`rask::cache`](crate::cache) rules 8 to 10).
    ///
    /// # Errors
    ///
    /// As [`submit`](Client::submit).
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("rask-client-compute-doc-{}", std::process::id()));
    /// use rask::{delayed, Client, Config};
    /// fn square(x: i64) -> i64 { x * x }
    ///
    /// let client = Client::with_config(&Config::threads(2).cache(&dir))?;
    /// let before = rask::cache::stats();
    /// assert_eq!(client.compute(&delayed!(square(7)).cache())?.result()?, 49);
    /// rask::cache::flush();                  // written in the background: wait for it
    /// let again = Client::with_config(&Config::threads(2).cache(&dir))?;
    /// assert_eq!(again.compute(&delayed!(square(7)).cache())?.result()?, 49);   // loaded
    /// assert_eq!(rask::cache::stats().hits - before.hits, 1);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn compute<T: Data>(&self, delayed: &Delayed<T>) -> Result<Future<T>> {
        let roots = std::slice::from_ref(delayed.node());
        let future = crate::futures::cached::submit::<T>(self, roots)?
            .finish_later()
            .pop()
            .expect("one future per root");
        if self.inner.progress {
            crate::progress(&future);
        }
        Ok(future)
    }

    /// Calls `f` on every item: one future per item, in order. Items may be
    /// plain values, `Delayed`s or futures, as in
    /// [`delayed!`](crate::delayed!). The calls are submitted 4096 at a
    /// time, so the first run while the next are built. All or nothing: a
    /// call that cannot be sent to a cluster fails the map before anything
    /// is submitted.
    ///
    /// # Errors
    ///
    /// As [`submit`](Client::submit).
    ///
    /// # Examples
    ///
    /// ```
    /// # use rask::Client;
    /// fn square(x: i64) -> i64 { x * x }
    /// let client = Client::threads(2)?;
    /// let squares = client.map(square, 1..=4)?;
    /// assert_eq!(client.gather(&squares)?, vec![1, 4, 9, 16]);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn map<F, A, R, X, K, I>(&self, f: F, items: I) -> Result<Vec<Future<R>>>
    where
        F: Fn(A) -> R + Clone + Send + Sync + 'static,
        A: 'static,
        R: Data,
        X: IntoArg<A, K>,
        I: IntoIterator<Item = X>,
    {
        let name = crate::build::node::name_of_type::<F>();
        let nodes = items.into_iter().map(|x| {
            let d: Delayed<R> = apply::<Plain, _, _, _, _>(name, f.clone(), (x,));
            d.node().clone()
        });
        self.submit_in_parts(nodes, <X as IntoArg<A, K>>::PLAIN)
    }

    /// Submits the nodes `nodes` yields, [`PART`] at a time: the executor
    /// starts on the first while the next are planned, which on a cluster
    /// keeps the scheduler and the workers busy meanwhile instead of
    /// waiting for the whole map. One future per node, in order.
    ///
    /// All or nothing: what would fail fails before anything is submitted.
    /// With `plain` (each node is one call of the same function on plain
    /// values, so whether it can travel to a cluster depends on the
    /// function alone), the first part's check answers for all, and parts
    /// go out as they are built; otherwise every node is built and checked
    /// first.
    fn submit_in_parts<T>(
        &self,
        nodes: impl Iterator<Item = Arc<Node>>,
        plain: bool,
    ) -> Result<Vec<Future<T>>> {
        if !plain {
            let nodes: Vec<Arc<Node>> = nodes.collect();
            self.check_sendable(&nodes)?;
            make_room(&mut self.inner.lock(), nodes.len());
            let parts = nodes.chunks(PART);
            return Ok(parts.flat_map(|part| self.submit_sendable(part)).collect());
        }
        // What the items say they are, up to a bound: a wrong hint costs
        // room, never a failed allocation.
        let hint = nodes.size_hint().0.min(MAX_HINT);
        let mut futures = Vec::with_capacity(hint);
        make_room(&mut self.inner.lock(), hint);
        let mut part = Vec::with_capacity(PART.min(hint));
        let mut nodes = nodes.peekable();
        while nodes.peek().is_some() {
            part.extend(nodes.by_ref().take(PART));
            if futures.is_empty() {
                self.check_sendable(&part)?;
            }
            futures.extend(self.submit_sendable(&part));
            part.clear();
        }
        Ok(futures)
    }

    /// Calls `f` with one item of each iterable, walked in step, submitted
    /// as [`map`](Client::map) does: Dask's `client.map(f, xs, ys)`, written
    /// `client.map_zip(f, (xs, ys))` (a tuple of 1 to 6 iterables, one per
    /// parameter of `f`). One future per call, in order. Items may be plain
    /// values, `Delayed`s or futures, as in [`map`](Client::map).
    ///
    /// Iterables of different lengths stop at the shortest, as Dask's
    /// `map` and Rust's [`zip`](std::iter::zip) do: the items left in the
    /// longer ones are not used (compare lengths first if that would be a
    /// bug).
    ///
    /// # Errors
    ///
    /// As [`submit`](Client::submit).
    ///
    /// # Examples
    ///
    /// ```
    /// # use rask::Client;
    /// fn add(x: i64, y: i64) -> i64 { x + y }
    /// fn scale(x: i64, by: i64, offset: i64) -> i64 { x * by + offset }
    ///
    /// let client = Client::threads(2)?;
    /// let sums = client.map_zip(add, (1..=3, vec![10, 20, 30]))?;
    /// assert_eq!(client.gather(&sums)?, vec![11, 22, 33]);
    ///
    /// // Futures are items too; the shortest iterable sets the length.
    /// let scaled = client.map_zip(scale, (&sums, [2, 3], std::iter::repeat(1)))?;
    /// assert_eq!(client.gather(&scaled)?, vec![23, 67]);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn map_zip<F, Is, Sig, Ks>(&self, f: F, iterables: Is) -> Result<Vec<Future<F::Out>>>
    where
        Is: Iterables,
        F: crate::build::args::Apply<Plain, Is::Items, Sig, Ks> + Clone + 'static,
        F::Out: Data,
    {
        let name = crate::build::node::name_of_type::<F>();
        let nodes = iterables.zip_items().map(|xs| {
            let d: Delayed<F::Out> = apply::<Plain, _, _, _, _>(name, f.clone(), xs);
            d.node().clone()
        });
        self.submit_in_parts(nodes, false)
    }

    /// Waits for every future and returns their values, in order.
    ///
    /// # Errors
    ///
    /// [`Error::Gather`] naming the first future (by position) that failed
    /// or was cancelled, with the task failure as its source.
    pub fn gather<T: Data>(&self, futures: &[Future<T>]) -> Result<Vec<T>> {
        let mut values = Vec::with_capacity(futures.len());
        // A part at a time, as `map` submits them: one wait for the part
        // (one wake-up when its futures end in order), stopping at a
        // failure; then its values, in order, while later parts still run.
        // Taking a value waits only for futures before a failed one.
        for part in futures.chunks(PART) {
            crate::futures::future::wait_all(part, true, None);
            for f in part {
                let value = f.result().map_err(|source| Error::Gather {
                    index: values.len(),
                    future: f.key(),
                    source: Box::new(source),
                })?;
                values.push(value);
            }
        }
        Ok(values)
    }

    /// Places `data` in the client's memory and returns a finished future for
    /// it, keyed by its content like [`rask::value`](crate::value). Pass the
    /// future to later tasks instead of the data itself.
    ///
    /// On a cluster the data is sent once, to one worker, and held there
    /// (rule 5): `scatter` returns once it arrived, and later tasks that use
    /// the future do not send it again.
    ///
    /// # Errors
    ///
    /// As [`submit`](Client::submit).
    ///
    /// # Examples
    ///
    /// ```
    /// # use rask::{delayed, Client};
    /// use std::sync::Arc;
    /// fn total(v: Arc<Vec<u8>>) -> u64 { v.iter().map(|&b| b as u64).sum() }
    /// let client = Client::threads(2)?;
    /// let data = client.scatter(vec![1u8; 1 << 20])?;
    /// assert!(data.done());
    /// assert_eq!(client.submit(delayed!(total(&data)))?.result()?, 1 << 20);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn scatter<T: Data>(&self, data: T) -> Result<Future<T>> {
        let future = self.submit(crate::value(data))?;
        if self.inner.backend.is_remote() {
            future.wait();
        }
        Ok(future)
    }

    /// As [`scatter`](Client::scatter); with `broadcast`, every worker of a
    /// cluster holds a copy (Dask's `scatter(…, broadcast=True)`), so tasks
    /// using the data on any worker start without fetching it. The data is
    /// sent once, to one worker; the others fetch it from there, through
    /// the scheduler's replicate request, and `scatter_with` returns once
    /// they all hold it (after at most 30 s: a copy that did not arrive by
    /// then is fetched when a task needs it, and a warning says so).
    /// [`who_has`](Client::who_has) lists the holders. Workers that join
    /// later get no copy. A value of at most 64 KiB is kept in this
    /// process instead and sent with each task that uses it (as for
    /// `scatter`), so there is nothing to copy and `broadcast` changes
    /// nothing.
    ///
    /// On `sync` and `threads` there is one copy, in this process, shared
    /// by every thread: `broadcast` changes nothing there.
    ///
    /// # Errors
    ///
    /// As [`submit`](Client::submit); on a cluster, [`Error::Distributed`]
    /// when its scheduler cannot be asked who holds the copies.
    ///
    /// # Examples
    ///
    /// ```
    /// # use rask::{delayed, Client};
    /// use std::sync::Arc;
    /// fn total(v: Arc<Vec<u8>>) -> u64 { v.iter().map(|&b| b as u64).sum() }
    /// let client = Client::threads(2)?;
    /// let data = client.scatter_with(vec![1u8; 1000], true)?;
    /// let held = client.who_has(&[data.clone()])?;
    /// assert_eq!(held[0].1, vec!["this process".to_string()]);   // every worker
    /// assert_eq!(client.submit(delayed!(total(&data)))?.result()?, 1000);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn scatter_with<T: Data>(&self, data: T, broadcast: bool) -> Result<Future<T>> {
        let future = self.scatter(data)?;
        #[cfg(feature = "distributed")]
        if let (true, Backend::Distributed(cluster)) = (broadcast, &self.inner.backend) {
            let key = future.key().key();
            if matches!(self.inner.state(key), State::Finished(_)) {
                cluster.broadcast(key)?;
            }
        }
        #[cfg(not(feature = "distributed"))]
        let _ = broadcast; // one copy in this process: nothing to do
        Ok(future)
    }

    /// Computes `delayed` in the background and returns a `Delayed` backed by
    /// the held result: later graphs built on it start from that result. The
    /// result is kept until the returned `Delayed` (and its clones, and
    /// graphs built on it) are dropped. Uses the result cache as
    /// [`compute`](Client::compute) does.
    ///
    /// # Errors
    ///
    /// As [`submit`](Client::submit).
    pub fn persist<T: Data>(&self, delayed: &Delayed<T>) -> Result<Delayed<T>> {
        Ok(self.compute(delayed)?.to_delayed())
    }

    /// Runs `work` and writes a performance report of it to `path` (Dask's
    /// `performance_report`): one self-contained HTML page with the task
    /// stream (a lane per worker thread, a bar per task), the tasks and
    /// time per function, and how busy each worker's threads were. The page
    /// needs no server and no network; open it in any browser.
    ///
    /// The report holds every task this process heard of while `work` ran,
    /// on any executor; on a cluster, as its scheduler reports them.
    ///
    /// # Errors
    ///
    /// [`Error::Write`] when `path` cannot be written; `work`'s own result
    /// is then dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{delayed, Client};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// let client = Client::threads(2)?;
    /// let path = std::env::temp_dir().join(format!("report-{}.html", std::process::id()));
    /// let total = client.performance_report(&path, || -> rask::Result<i64> {
    ///     let futures = client.map(inc, 0..100)?;
    ///     Ok(client.gather(&futures)?.iter().sum())
    /// })??;
    /// assert_eq!(total, 5050);
    /// let page = std::fs::read_to_string(&path).unwrap();
    /// assert!(page.contains(r#""function":"inc""#));
    /// # std::fs::remove_file(&path).unwrap();
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn performance_report<R>(
        &self,
        path: impl AsRef<std::path::Path>,
        work: impl FnOnce() -> R,
    ) -> Result<R> {
        let recorder = crate::futures::report::Recorder::start();
        let result = work();
        recorder.finish(path.as_ref(), self.inner.kind.to_string())?;
        Ok(result)
    }

    /// Runs the work behind a failed or cancelled `future` again (Dask's
    /// `Client.retry`): it is pending once more, and its result replaces the
    /// failure for every clone of it. Does nothing to a pending or finished
    /// future.
    ///
    /// # Errors
    ///
    /// For a future whose value was lost with its cluster's connection
    /// (the client's rule 8), the error its `result()` gives: a finished
    /// future keeps no work to run again, so submit the work again instead
    /// (that recomputes it, for this future too).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use rask::{delayed, Client};
    ///
    /// static READY: AtomicBool = AtomicBool::new(false);
    /// fn fetch(x: i64) -> Result<i64, String> {
    ///     if READY.load(Ordering::SeqCst) { Ok(x) } else { Err("not yet".into()) }
    /// }
    ///
    /// let client = Client::threads(2)?;
    /// let f = client.submit(delayed!(fetch(3)?))?;
    /// assert!(f.result().is_err());
    /// READY.store(true, Ordering::SeqCst);
    /// client.retry(&f)?;
    /// assert_eq!(f.result()?, 3);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn retry<T>(&self, future: &Future<T>) -> Result<()> {
        let key = future.key().key();
        let node = {
            let mut table = self.inner.lock();
            let Some(entry) = table.get_mut(&key) else {
                return Ok(());
            };
            let failed = matches!(entry.state, State::Failed(_) | State::Cancelled);
            match (&entry.node, failed) {
                (Some(node), true) => {
                    entry.state = State::Pending;
                    node.clone()
                }
                _ => {
                    return match entry.state.lost() {
                        // As `Future::result` says it (rule 8).
                        Some(lost) => Err(Error::Task {
                            key: future.key(),
                            panicked: false,
                            message: lost.to_string(),
                            location: None,
                            error: None,
                            attempts: 1,
                        }),
                        None => Ok(()),
                    };
                }
            }
        };
        self.inner.schedule(vec![node]);
        Ok(())
    }

    /// Numbers describing what the client holds now.
    pub fn stats(&self) -> ClientStats {
        let table = self.inner.lock();
        ClientStats {
            keys_held: table.len(),
            pending: table.values().filter(|e| e.state.is_pending()).count(),
            on_cluster: table
                .values()
                .filter(|e| {
                    matches!(&e.state, State::Finished(v) if v.is::<Remote>())
                        && e.state.lost().is_none()
                })
                .count(),
        }
    }

    /// Futures for `nodes`, scheduling those whose key has no live entry.
    pub(crate) fn submit_nodes<T>(&self, nodes: &[Arc<Node>]) -> Result<Vec<Future<T>>> {
        self.check_sendable(nodes)?;
        Ok(self.submit_sendable(nodes))
    }

    /// On a cluster, whether every task behind `nodes` can travel there
    /// (`registry::check_sendable`).
    fn check_sendable(&self, nodes: &[Arc<Node>]) -> Result<()> {
        if self.inner.backend.is_remote() {
            crate::build::registry::check_sendable(nodes)?;
        }
        Ok(())
    }

    /// [`submit_nodes`](Client::submit_nodes) once
    /// [checked](Client::check_sendable).
    fn submit_sendable<T>(&self, nodes: &[Arc<Node>]) -> Vec<Future<T>> {
        let annotated: Vec<Arc<Node>>;
        let nodes = match &self.annotations {
            Some(a) => {
                annotated = nodes
                    .iter()
                    .map(|n| match n.call.annotations() {
                        Some(_) => n.clone(),
                        None => {
                            let mut copy = n.rekeyed(n.key);
                            copy.call =
                                crate::build::annotate::annotate_call(&n.call, (**a).clone());
                            Arc::new(copy)
                        }
                    })
                    .collect();
                &annotated[..]
            }
            None => nodes,
        };
        let remote = self.inner.backend.is_remote();
        let mut fresh = Vec::new();
        // What replaced entries held, dropped after the table lock: a lost
        // value's handle takes its cluster client's lock when dropped, and
        // that client reports outputs here under it.
        let mut replaced = Vec::new();
        let futures = {
            let mut table = self.inner.lock();
            make_room(&mut table, nodes.len());
            nodes
                .iter()
                .map(|node| {
                    let entry = table
                        .entry(node.key)
                        .or_insert_with(|| match node.call.value() {
                            // Data is finished work: nothing to run, unless it
                            // is to be sent to a cluster once and held there
                            // (rule 5).
                            Some(value) if !remote => Entry {
                                state: State::Finished(value.clone()),
                                ..Entry::pending()
                            },
                            _ => {
                                fresh.push(node.clone());
                                Entry::pending()
                            }
                        });
                    if entry.state.is_gone() {
                        replaced.push(std::mem::replace(&mut entry.state, State::Pending));
                        fresh.push(node.clone());
                    }
                    if entry.state.is_pending() && entry.node.is_none() {
                        entry.node = Some(node.clone());
                    }
                    entry.refs += 1;
                    Future::new(self.inner.clone(), node.key, node.name_owned())
                })
                .collect()
        };
        drop(replaced);
        if !fresh.is_empty() {
            self.inner.schedule(fresh);
        }
        futures
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = self.stats();
        f.debug_struct("Client")
            .field("executor", &self.inner.kind)
            .field("keys_held", &stats.keys_held)
            .field("pending", &stats.pending)
            .finish()
    }
}

/// What a [`Client`] holds at one moment; see [`Client::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Keys with a live future: pending, finished, failed or cancelled.
    pub keys_held: usize,
    /// Keys still being computed.
    pub pending: usize,
    /// Finished keys whose value stays on a cluster, fetched only when
    /// needed (rule 5), not counting those lost with it (rule 8); `0` on
    /// executors in this process.
    pub on_cluster: usize,
}

/// A tuple of 1 to 6 iterables, walked in step by [`Client::map_zip`]: each
/// step takes one item of every iterable, and the walk stops at the end
/// of the shortest.
///
/// # Examples
///
/// ```
/// use rask::Iterables;
/// let steps: Vec<(i32, char)> = (0..5, ['a', 'b']).zip_items().collect();
/// assert_eq!(steps, vec![(0, 'a'), (1, 'b')]);
/// ```
pub trait Iterables {
    /// One step: a tuple with an item of each iterable.
    type Items;

    /// The steps, in order, up to the end of the shortest iterable.
    fn zip_items(self) -> impl Iterator<Item = Self::Items>;
}

macro_rules! iterables {
    ($($i:ident $n:tt),+) => {
        impl<$($i: IntoIterator),+> Iterables for ($($i,)+) {
            type Items = ($($i::Item,)+);

            fn zip_items(self) -> impl Iterator<Item = Self::Items> {
                let mut iters = ($(self.$n.into_iter(),)+);
                // Stops at the first iterable to end (items taken from the
                // ones before it in that step are dropped, as `zip` does).
                std::iter::from_fn(move || Some(($(iters.$n.next()?,)+)))
            }
        }
    };
}

iterables!(I0 0);
iterables!(I0 0, I1 1);
iterables!(I0 0, I1 1, I2 2);
iterables!(I0 0, I1 1, I2 2, I3 3);
iterables!(I0 0, I1 1, I2 2, I3 3, I4 4);
iterables!(I0 0, I1 1, I2 2, I3 3, I4 4, I5 5);

impl Entry {
    fn pending() -> Entry {
        Entry {
            state: State::Pending,
            refs: 0,
            waiters: 0,
            watched: false,
            run: None,
            node: None,
            rare: None,
        }
    }

    /// Its rare lists, made when first asked for.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Marks it cancelled, counting the cancellation (rule 3).
    fn cancel(&mut self) {
        self.state = State::Cancelled;
        let rare = self.rare();
        rare.cancels = rare.cancels.saturating_add(1);
    }

    /// How many times it was cancelled so far.
    fn cancels(&self) -> u64 {
        self.rare.as_ref().map_or(0, |r| r.cancels)
    }

    /// Its listeners and the submissions waiting for it, taken: whom to
    /// wake once it stopped being pending.
    fn take_waiting(&mut self) -> (Vec<Listener>, Vec<Arc<Deferred>>) {
        match self.rare.as_deref_mut() {
            Some(rare) => (
                std::mem::take(&mut rare.listeners),
                std::mem::take(&mut rare.deferred),
            ),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Whether a progress display counted its tasks node by node.
    fn is_counted(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| !r.counted.is_empty())
    }
}

/// One executor run started by the client: reports outputs into the table.
struct Run {
    shared: Arc<Shared>,
    /// What the executor runs, while it holds it: a progress display counts
    /// its tasks ([`Shared::pending_tasks`]), as `compute`'s counts its
    /// plan's. Not held here: the plan's nodes hold the futures its graph
    /// took as arguments, and once the executor let go of the plan (a
    /// cluster's does before it reports the last output) nothing of the
    /// run keeps them, however long the executor keeps the run.
    plan: Weak<rask_executor::Plan>,
    keys: Vec<Key>,
    /// Outputs still wanted: neither completed nor given up (rule 4).
    live: AtomicUsize,
    /// Outputs not reported yet, when the graph took futures as arguments:
    /// its last output may be held back until `finished` (below). `None`:
    /// a graph of no future, every output completed as it comes.
    unreported: Option<AtomicUsize>,
    /// The last output, held back when the executor still held the plan as
    /// it reported it (a local executor's thread does; a cluster's client
    /// lets go first): the plan's nodes hold the futures the graph took.
    /// Completed once `finished` says the executor let go (executor rule
    /// 4), so that whoever it wakes finds those futures released as soon
    /// as it drops its own handles.
    last: Mutex<Option<(Key, Outcome)>>,
    /// Set once the executor took the plan: from then on a cluster holds
    /// this run's keys, and later graphs may refer to them (see `PendingRef`).
    submitted: AtomicBool,
    /// How the executor stops one output's work, if it can (rule 4).
    stop: std::sync::OnceLock<Arc<dyn Fn(usize) + Send + Sync>>,
    /// The futures it takes that the cluster was computing for an earlier
    /// run when it was sent (`PendingRef`): one cancelled before this run's
    /// output is recorded fails it (rule 3).
    refs: Box<[TakenRef]>,
}

/// A future a [`Run`] takes that the cluster was computing for an earlier
/// run when it was sent (rule 3).
struct TakenRef {
    key: Key,
    name: Name,
    /// Its entry's cancellations when the run was sent ([`Entry::cancels`]):
    /// more by the time an output is recorded means it was cancelled
    /// meanwhile, whatever its state has become since.
    cancels: u64,
}

impl TakenRef {
    /// Whether it was cancelled since its run was sent, by `table`.
    fn cancelled_since(&self, table: &KeyMap<Entry>) -> bool {
        table
            .get(&self.key)
            .is_some_and(|e| e.state.is_cancelled() || e.cancels() > self.cancels)
    }
}

impl Run {
    /// Nobody wants output `slot` any more (rule 4).
    fn drop_output(&self, slot: usize) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        if let Some(stop) = self.stop.get() {
            stop(slot);
        }
    }

    /// An output was completed: the run owes it nobody any more (rule 4),
    /// so the rest of the run stops once the outputs still pending are
    /// given up too.
    fn output_done(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Reporter for Run {
    fn output(&self, index: usize, outcome: Outcome) {
        let key = self.keys[index];
        if let Some(unreported) = &self.unreported {
            if unreported.fetch_sub(1, Ordering::AcqRel) == 1 && self.plan.strong_count() > 0 {
                *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((key, outcome));
                return;
            }
        }
        self.shared.complete(self, key, outcome);
    }

    fn finished(&self) {
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((key, outcome)) = last {
            self.shared.complete(self, key, outcome);
        }
    }

    fn cancelled(&self) -> bool {
        self.live.load(Ordering::Relaxed) == 0
    }

    /// Results stay on a cluster until a future needs their value (rule 5).
    fn keep_remote(&self) -> bool {
        true
    }

    fn stop_with(&self, stop: Arc<dyn Fn(usize) + Send + Sync>) {
        let _ = self.stop.set(stop);
    }
}

/// The op standing in for `node` inside a new plan when its key is done
/// (rule 3): its value as data, or its failure replayed; `None` while it
/// is pending.
fn done_op(node: &Node, state: &State) -> Option<Arc<dyn Op>> {
    // A future whose value was lost with its cluster (rule 8): its work is
    // not kept, so the graph fails here, naming it.
    if let Some(lost) = state.lost() {
        return Some(Arc::new(Replay {
            name: node.name_owned(),
            failure: Arc::new(Failure::new(
                node.key,
                Arc::from(node.name()),
                FailureKind::Failed,
                lost.to_string(),
            )),
        }));
    }
    Some(match state {
        State::Finished(value) => Arc::new(HeldOp {
            name: node.name_owned(),
            value: value.clone(),
        }),
        State::Failed(failure) => Arc::new(Replay {
            name: node.name_owned(),
            failure: failure.clone(),
        }),
        State::Cancelled => Arc::new(Replay {
            name: node.name_owned(),
            failure: cancelled_failure(node.key, node.name()),
        }),
        State::Pending => return None,
    })
}

/// A held value standing in for a finished key inside a new plan.
struct HeldOp {
    name: Name,
    value: Value,
}

impl Op for HeldOp {
    fn run(&self, _: &mut [Option<Value>]) -> std::result::Result<Value, OpError> {
        Ok(self.value.clone())
    }
    fn is_work(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn to_wire(&self) -> std::result::Result<WireTask, WireError> {
        crate::build::registry::value_task(&self.value)
    }
}

/// Replays a failure recorded for a key, so dependents fail with it.
struct Replay {
    name: Name,
    failure: Arc<Failure>,
}

impl Op for Replay {
    fn run(&self, _: &mut [Option<Value>]) -> std::result::Result<Value, OpError> {
        Err(replay(&self.failure))
    }
    fn is_work(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn to_wire(&self) -> std::result::Result<WireTask, WireError> {
        crate::build::registry::fail_task(&self.failure)
    }
}

/// A key a cluster is computing for an earlier run of this client, as an
/// input of a new graph sent to the same cluster.
struct PendingRef {
    name: Name,
    key: Key,
    /// The client, which knows how the key ended if the cluster no longer
    /// holds it by the time this graph is sent.
    shared: std::sync::Weak<Shared>,
}

impl Op for PendingRef {
    /// The key's outcome once its run ended: the executor runs this when
    /// the cluster no longer holds the key, and sends the outcome instead
    /// of a reference. The cluster lets a key go just before its outcome is
    /// reported here, so this waits for it, briefly (the executor's own
    /// thread, which reports it, never gets here with the key pending).
    fn run(&self, _: &mut [Option<Value>]) -> std::result::Result<Value, OpError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let state = self
            .shared
            .upgrade()
            .map(|shared| shared.wait(self.key, Some(deadline)));
        match state {
            Some(State::Finished(value)) => Ok(value),
            Some(State::Failed(failure)) => Err(replay(&failure)),
            Some(State::Cancelled) => Err(replay(&cancelled_failure(self.key, &self.name))),
            Some(State::Pending) | None => Err(OpError::failed(format!(
                "{}-{} is still being computed on its cluster and cannot run here",
                self.name,
                self.key.short()
            ))),
        }
    }
    fn is_work(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn to_wire(&self) -> std::result::Result<WireTask, WireError> {
        Ok(WireTask {
            function: rask_executor::REMOTE_FUNCTION.to_owned(),
            payload: self.key.0.to_vec(),
        })
    }
}

fn cancelled_failure(key: Key, name: &str) -> Arc<Failure> {
    Arc::new(Failure::new(
        key,
        Arc::from(name),
        FailureKind::Cancelled,
        "the future was cancelled".into(),
    ))
}

/// How often a wait inside a task looks whether the task was released
/// ([`Shared::wait`]).
const TASK_RELEASE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// A graph waiting in [`QUEUE`] to be started by its client.
type Scheduled = (Arc<Shared>, Vec<Arc<Node>>);

thread_local! {
    /// Graphs to schedule once the outermost `schedule` on this thread is
    /// done: completing one run can start the next (a chain of submits), and
    /// a queue keeps that from recursing once per link.
    static QUEUE: std::cell::RefCell<Option<Vec<Scheduled>>> = const { std::cell::RefCell::new(None) };
}

/// Starts the graphs queued on this thread ([`QUEUE`]) now. Called before
/// a thread blocks on a future: an executor may run a task on the thread
/// that started it, inside the outer `schedule` (a thread pool's worker
/// takes part in a plan it submits), and a graph that task submits is then
/// queued behind it; waiting for it there would wait forever. Called
/// before a wait steps a simulated client too ([`Shared::drive`]), which
/// runs only what it was handed, and before an `.await` looks at a
/// future, whose waker only that work calls.
pub(crate) fn start_queued() {
    while let Some((shared, roots)) = QUEUE
        .try_with(|q| q.borrow_mut().as_mut().and_then(Vec::pop))
        .ok()
        .flatten()
    {
        shared.start(roots);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, KeyMap<Entry>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lowers and starts the graph behind `roots` (whose entries are pending),
    /// or defers it until the pending entries it needs are done (rule 3).
    fn schedule(self: &Arc<Self>, roots: Vec<Arc<Node>>) {
        let unqueued = QUEUE.with(|q| match q.borrow_mut().as_mut() {
            Some(queue) => {
                queue.push((self.clone(), roots));
                None
            }
            None => Some(roots),
        });
        let Some(roots) = unqueued else {
            return;
        };
        QUEUE.with(|q| *q.borrow_mut() = Some(Vec::new()));
        self.start(roots);
        while let Some((shared, roots)) = QUEUE.with(|q| q.borrow_mut().as_mut().and_then(Vec::pop))
        {
            shared.start(roots);
        }
        QUEUE.with(|q| *q.borrow_mut() = None);
    }

    fn start(self: &Arc<Self>, roots: Vec<Arc<Node>>) {
        self.start_checked(roots, None);
    }

    /// Starts the graph behind `roots` once the other clients' futures in
    /// `foreign` that are still pending are done (rule 3): now, with their
    /// outcomes, if none is.
    fn wait_for_foreign(
        self: &Arc<Self>,
        roots: Vec<Arc<Node>>,
        foreign: Vec<Arc<crate::futures::future::Handle>>,
    ) {
        let mut done = KeyMap::default();
        let mut pending = Vec::new();
        for h in foreign {
            match h.shared.state(h.key) {
                State::Pending => pending.push(h),
                state => {
                    done.insert(h.key, state);
                }
            }
        }
        if pending.is_empty() {
            return self.start_checked(roots, Some(done));
        }
        let deferred = Arc::new(Deferred {
            waiting: AtomicUsize::new(pending.len()),
            roots: Mutex::new(roots),
        });
        for h in pending {
            let (me, deferred) = (self.clone(), deferred.clone());
            let listener = Listener::Queue(Arc::new(move || {
                if deferred.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let roots = std::mem::take(
                        &mut *deferred
                            .roots
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner),
                    );
                    me.schedule(roots);
                }
            }));
            h.shared.on_done(h.key, listener);
        }
    }

    /// [`start`](Shared::start); `foreign` holds the outcomes of the other
    /// clients' futures in the graph once they were seen done (rule 3).
    fn start_checked(self: &Arc<Self>, roots: Vec<Arc<Node>>, foreign: Option<KeyMap<State>>) {
        // Roots not run are dropped after the table lock (declared before
        // it): one may hold the last reference to futures, whose drop takes
        // the lock. Quietly (rule 7): a graph released while it waited is
        // let go here, often on an executor's thread that woke it.
        let mut skipped = LetGo(Vec::new());
        let mut table = self.lock();
        // Roots cancelled or released while they waited are not run. In
        // the same look at each root: whether a progress display counted
        // it node by node (`Rare::counted`, see below).
        let mut counted = false;
        let roots: Vec<Arc<Node>> = roots
            .into_iter()
            .filter_map(|r| match table.get(&r.key) {
                Some(e) if e.state.is_pending() && e.run.is_none() => {
                    counted |= e.is_counted();
                    Some(r)
                }
                _ => {
                    skipped.0.push(r);
                    None
                }
            })
            .collect();
        if roots.is_empty() {
            return;
        }
        // The roots' keys, looked up for every node the passes meet: a few
        // are compared in turn, with no map to build.
        let own: Option<KeyMap<()>> =
            (roots.len() > 8).then(|| roots.iter().map(|r| (r.key, ())).collect());
        let is_root = |key: &Key| match &own {
            Some(own) => own.contains_key(key),
            None => roots.iter().any(|r| r.key == *key),
        };
        let mut waits = Vec::new();
        let mut refs = Vec::new();
        // Other clients' pending futures the graph takes, which it waits
        // for before it starts where it would start on a thread of its own
        // (rule 3); a simulated client's runs only when waited for.
        let mut pending_foreign = Vec::new();
        let waits_for_foreign = !matches!(
            self.kind,
            ExecutorKind::Synchronous | ExecutorKind::Simulated(_)
        );
        let remote = self.backend.is_remote();
        // Whether the graph takes futures (keys of the table) as arguments.
        let mut takes_futures = false;
        let cut = |node: &Arc<Node>| {
            if is_root(&node.key) {
                return None;
            }
            let Some(entry) = table.get(&node.key) else {
                let h = node
                    .call
                    .future()
                    .and_then(|f| f.downcast_ref::<Arc<crate::futures::future::Handle>>())
                    .filter(|h| {
                        waits_for_foreign
                            && !Arc::ptr_eq(&h.shared, self)
                            && !matches!(h.shared.kind, ExecutorKind::Simulated(_))
                    })?;
                // Seen done: its outcome, so that no thread waits for it.
                if let Some(state) = foreign.as_ref().and_then(|f| f.get(&h.key)) {
                    if let Some(op) = done_op(node, state) {
                        return Some(op);
                    }
                }
                pending_foreign.push(h.clone());
                return None;
            };
            // A node of the graph's own whose key was cancelled or lost
            // (rule 2's replaced entry, met below a root): the graph
            // computes it. Only a future the user cancelled and then
            // passed on fails as cancelled, and a lost one as lost
            // (`done_op`).
            if entry.state.is_gone() && !node.call.is_future() {
                return None;
            }
            takes_futures = true;
            if let Some(op) = done_op(node, &entry.state) {
                return Some(op);
            }
            // Pending. A future computed by a run already handed to a
            // cluster: refer to its key, and the scheduler makes this graph
            // wait for it there, with no round trip through this process.
            let op: Arc<dyn Op> = if remote
                && node.call.is_future()
                && entry
                    .run
                    .as_ref()
                    .is_some_and(|(r, _)| r.submitted.load(Ordering::Acquire))
            {
                refs.push(TakenRef {
                    key: node.key,
                    name: node.name_owned(),
                    cancels: entry.cancels(),
                });
                Arc::new(PendingRef {
                    name: node.name_owned(),
                    key: node.key,
                    shared: Arc::downgrade(self),
                })
            } else {
                waits.push(node.key);
                Arc::new(Replay {
                    name: node.name_owned(),
                    failure: cancelled_failure(node.key, node.name()),
                })
            };
            Some(op)
        };
        // The passes `compute` runs (unless the configuration turned them
        // off), keeping every key the table answers for a task of its own
        // (`Options::cut_alone`): its outcome is used, never computed again
        // inside another task. The roots are outputs, tasks of their own
        // too. A graph a progress display already counted node by node is
        // not optimized (`Rare::counted`).
        let mut options = if self.optimize && !counted {
            Options::all()
        } else {
            Options::none()
        };
        options.remote = remote;
        options.cut_alone = true;
        let plan = crate::plan::plan(&roots, &options, crate::plan::Asks::Once, cut, None);
        if !pending_foreign.is_empty() {
            // Their tables are looked at without this one locked: two
            // clients doing so at once never wait for each other.
            drop(table);
            drop(plan);
            self.wait_for_foreign(roots, pending_foreign);
            return;
        }
        if !waits.is_empty() {
            let deferred = Arc::new(Deferred {
                waiting: AtomicUsize::new(waits.len()),
                roots: Mutex::new(roots),
            });
            for key in waits {
                if let Some(entry) = table.get_mut(&key) {
                    entry.rare().deferred.push(deferred.clone());
                }
            }
            return;
        }
        let run = Arc::new(Run {
            shared: self.clone(),
            plan: Arc::downgrade(&plan),
            keys: roots.iter().map(|r| r.key).collect(),
            live: AtomicUsize::new(roots.len()),
            unreported: takes_futures.then(|| AtomicUsize::new(roots.len())),
            last: Mutex::new(None),
            submitted: AtomicBool::new(false),
            stop: std::sync::OnceLock::new(),
            refs: refs.into(),
        });
        for (slot, root) in roots.iter().enumerate() {
            if let Some(entry) = table.get_mut(&root.key) {
                entry.run = Some((run.clone(), slot));
                // Before the plan is submitted: no event of it is missed.
                let counted = entry.rare.as_mut().map(|r| std::mem::take(&mut r.counted));
                for plans in counted.into_iter().flatten() {
                    if let Some(plans) = plans.upgrade() {
                        plans.add(plan.id());
                    }
                }
            }
        }
        drop(table);
        // From here the plan alone holds the graph: whoever wakes on its
        // last output, completed once the executor let go of the plan,
        // holds the only references left to the futures it took.
        drop(roots);
        self.backend.executor().submit(plan, run.clone());
        run.submitted.store(true, Ordering::Release);
    }

    /// Records the outcome of a key from `run` and wakes whoever waits for it.
    fn complete(self: &Arc<Self>, run: &Run, key: Key, outcome: Outcome) {
        // The finished work's graph is dropped after the table lock: it may
        // hold futures, whose drop takes the lock. So is a value nobody
        // takes. Both quietly (rule 7): their `Drop` is user code, which
        // may panic, and this runs on an executor's thread; the graph's
        // last reference is often this one (the executor let go of its
        // plan before a run's last output is completed).
        let mut finished_node = None;
        let mut replaced = None;
        let mut unwanted = None;
        let woken = 'table: {
            let mut table = self.lock();
            // A future it took, cancelled since it was sent (and perhaps
            // submitted again since): its value reached the cluster's graph
            // anyway (the cluster computed it for this run), but work on a
            // cancelled future fails as cancelled, naming it, as where the
            // graph waits for the future in this process (rule 3).
            let cancelled_ref = match &outcome {
                Ok(_) if !run.refs.is_empty() => run
                    .refs
                    .iter()
                    .find(|r| r.cancelled_since(&table))
                    .map(|r| cancelled_failure(r.key, &r.name)),
                _ => None,
            };
            let outcome = match cancelled_ref {
                Some(failure) => {
                    replaced = Some(outcome);
                    Err(failure)
                }
                None => outcome,
            };
            let Some(entry) = table.get_mut(&key) else {
                unwanted = Some(outcome);
                break 'table None; // released while it ran
            };
            if !entry.state.is_pending() {
                unwanted = Some(outcome);
                break 'table None; // cancelled while it ran
            }
            if !entry
                .run
                .as_ref()
                .is_some_and(|(r, _)| std::ptr::eq(&**r, run))
            {
                unwanted = Some(outcome);
                break 'table None; // cancelled, then submitted again: a newer run owns it
            }
            match outcome {
                Ok(value) => {
                    finished_node = entry.node.take();
                    entry.state = State::Finished(value);
                }
                // This very key was cancelled (and counted, as every
                // cancellation); an input's cancellation is kept as a
                // failure naming that input.
                Err(f) if f.kind == FailureKind::Cancelled && f.key == key => entry.cancel(),
                Err(f) => entry.state = State::Failed(f),
            }
            // Taken under the lock, as `cancel` and `release` take it: the
            // slot is counted out of `live` here, and never by them.
            entry.run = None;
            run.output_done();
            let watched_failure = self.watched_failure(entry);
            let (listeners, deferred) = entry.take_waiting();
            Some((
                listeners,
                deferred,
                std::mem::take(&mut entry.waiters) > 0 || watched_failure,
            ))
        };
        rask_executor::drop_quietly(finished_node, A_GRAPH);
        for outcome in [replaced, unwanted] {
            rask_executor::drop_quietly(outcome, format_args!("the value of {}", key.short()));
        }
        if let Some((listeners, deferred, sleepers)) = woken {
            self.wake(listeners, deferred, sleepers);
        }
    }

    /// Notifies `listeners` and `deferred`, and when `sleepers` (the entry
    /// that changed had [`waiters`](Entry::waiters)) wakes the threads in
    /// [`wait`](Shared::wait); called after the table lock under which the
    /// entry changed was dropped, so every sleeper that saw the old state
    /// was counted by then. A listener that panics is logged and skipped
    /// (rule 7): everyone after it is still told.
    fn wake(
        self: &Arc<Self>,
        listeners: Vec<Listener>,
        deferred: Vec<Arc<Deferred>>,
        sleepers: bool,
    ) {
        // Listeners first: a progress bar draws its last state before the
        // program, woken from `wait`, prints its next line.
        for listener in listeners {
            listener.notify_quietly();
        }
        if let Some(spin) = &self.spin {
            spin.changed();
        }
        if sleepers {
            self.changed.notify_all();
        }
        for d in deferred {
            if d.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
                let roots =
                    std::mem::take(&mut *d.roots.lock().unwrap_or_else(PoisonError::into_inner));
                self.schedule(roots);
            }
        }
    }

    /// The keys the table holds now, by state, as a scheduler counts its
    /// tasks: pending ones whose run went to the executor are processing,
    /// the others waiting; finished ones are in memory (and done); failed
    /// ones erred. A cancelled key is none of these.
    pub(crate) fn counts(&self) -> rask_executor::diagnostics::Counts {
        let table = self.lock();
        let mut counts = rask_executor::diagnostics::Counts::default();
        for entry in table.values() {
            match &entry.state {
                State::Pending => {
                    let sent = entry
                        .run
                        .as_ref()
                        .is_some_and(|(run, _)| run.submitted.load(Ordering::Acquire));
                    if sent {
                        counts.processing += 1;
                    } else {
                        counts.waiting += 1;
                    }
                }
                State::Finished(_) => counts.memory += 1,
                State::Failed(_) => counts.erred += 1,
                State::Cancelled => {}
            }
        }
        counts.done = counts.memory;
        counts
    }

    /// Drops one future handle's reference to `key` (rule 1). The last
    /// one lets the entry's value and graph go quietly (rule 7): a handle
    /// is often dropped on an executor's thread (`fire_and_forget`'s, a
    /// plan's node taking the future, a graph let go there).
    pub(crate) fn release(self: &Arc<Self>, key: Key) {
        let removed = {
            let mut table = self.lock();
            let Some(entry) = table.get_mut(&key) else {
                return;
            };
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs > 0 {
                return;
            }
            table.remove(&key)
        };
        if let Some(entry) = removed {
            let Entry {
                state,
                waiters,
                run,
                node,
                rare,
                ..
            } = entry;
            let (listeners, deferred) =
                rare.map_or_else(Default::default, |r| (r.listeners, r.deferred));
            if let Some((run, slot)) = &run {
                run.drop_output(*slot);
            }
            // Graphs waiting for this key now compute it themselves.
            self.wake(listeners, deferred, waiters > 0);
            rask_executor::drop_quietly(state, format_args!("the value of {}", key.short()));
            rask_executor::drop_quietly(node, A_GRAPH);
        }
    }

    /// Cancels `key` if it is still pending.
    pub(crate) fn cancel(self: &Arc<Self>, key: Key) {
        let (listeners, deferred, sleepers, run) = {
            let mut table = self.lock();
            let Some(entry) = table.get_mut(&key) else {
                return;
            };
            if !entry.state.is_pending() {
                return;
            }
            entry.cancel();
            let run = entry.run.take();
            let watched_failure = self.watched_failure(entry);
            let (listeners, deferred) = entry.take_waiting();
            (
                listeners,
                deferred,
                std::mem::take(&mut entry.waiters) > 0 || watched_failure,
                run,
            )
        };
        // Outside the table lock: the executor may report the output
        // cancelled from here, which takes the lock.
        if let Some((run, slot)) = run {
            run.drop_output(slot);
        }
        self.wake(listeners, deferred, sleepers);
    }

    /// The state of `key` now (`Cancelled` if the client no longer holds it).
    pub(crate) fn state(&self, key: Key) -> State {
        self.lock()
            .get(&key)
            .map_or(State::Cancelled, |e| e.state.clone())
    }

    /// Runs queued work of a simulated client until `done` holds or
    /// nothing is left to run: on `sim:SEED` nothing runs in the
    /// background, so whoever waits runs the work, one task at a time, in
    /// seed order. Returns at once on every other executor. Says whether
    /// it ran anything.
    pub(crate) fn drive(&self, mut done: impl FnMut() -> bool) -> bool {
        let mut ran = false;
        if let Some(sim) = self.backend.simulation() {
            while !done() && sim.step() {
                ran = true;
            }
        }
        ran
    }

    /// Whether this client runs work only when someone waits for it
    /// ([`drive`](Shared::drive)).
    pub(crate) fn is_simulated(&self) -> bool {
        self.backend.simulation().is_some()
    }

    /// Blocks until `key` is no longer pending, or until `deadline`.
    ///
    /// Inside a task, the wait gives the task's thread back to its
    /// executor meanwhile (`rask_executor::blocking`: a cluster worker
    /// starts another thread, so the work waited for finds one), and ends
    /// as `Cancelled` within [`TASK_RELEASE_POLL`] once the task's own work
    /// is given up: nobody wants what the task would do with the value.
    pub(crate) fn wait(&self, key: Key, deadline: Option<std::time::Instant>) -> State {
        // Work this thread queued is handed over first: a simulated client
        // runs only what it was handed, and nobody steps it once this
        // thread sleeps.
        start_queued();
        // A simulated client has no time: the deadline never passes while
        // work is left.
        self.drive(|| !self.state(key).is_pending());
        let state = self.state(key);
        if !state.is_pending() {
            return state;
        }
        let task = rask_executor::Stop::current();
        let watch = self.watcher(&task);
        let state = rask_executor::blocking(|| {
            self.wait_pending(key, deadline, &task, watch.map(|(spin, _)| spin))
        });
        if let Some((spin, started)) = watch {
            spin.waited(started.elapsed());
        }
        state
    }

    /// How a waiting thread outside tasks watches before it sleeps (`spin`
    /// rules), and when its wait started (for `Spin::waited`): `None`
    /// where it sleeps at once, and inside a task (its thread goes back to
    /// its worker instead). The clock is read only when it watches.
    fn watcher(&self, task: &rask_executor::Stop) -> Option<(&Spin, std::time::Instant)> {
        let spin = self.spin.as_ref().filter(|_| !task.can_raise())?;
        Some((spin, std::time::Instant::now()))
    }

    /// [`wait`](Shared::wait) once `key` was seen pending.
    fn wait_pending(
        &self,
        key: Key,
        deadline: Option<std::time::Instant>,
        task: &rask_executor::Stop,
        mut spin: Option<&Spin>,
    ) -> State {
        let mut table = self.lock();
        loop {
            // Counted as a sleeper under the lock (see `wake`), in the one
            // lookup; a return below without sleeping over-counts, which
            // costs at most one needless notification.
            let state = match table.get_mut(&key) {
                None => return State::Cancelled,
                Some(entry) if !entry.state.is_pending() => return entry.state.clone(),
                Some(_) if spin.is_some() => {
                    // Watched first (`spin` rules), as no sleeper.
                    if let Some(spin) = spin.take() {
                        table = self.watch(spin, table, deadline, |table| {
                            table.get(&key).is_none_or(|e| !e.state.is_pending())
                        });
                    }
                    continue;
                }
                Some(entry) => {
                    entry.waiters = entry.waiters.saturating_add(1);
                    State::Pending
                }
            };
            match self.sleep(table, deadline, task) {
                Some(woken) => table = woken,
                None if task.raised() => return State::Cancelled,
                None => return state,
            }
        }
    }

    /// Whether `entry`, which just stopped being pending, is a failure a
    /// thread in [`wait_all`](Shared::wait_all) must hear of; counts it in
    /// [`failures`](Shared::failures) if so. Called under the table lock.
    fn watched_failure(&self, entry: &Entry) -> bool {
        let failed = entry.watched && !matches!(entry.state, State::Finished(_));
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        failed
    }

    /// Watches the table with `spin` until `ended` holds, before a first
    /// sleep (`spin` rules), and returns it locked again, ended or not:
    /// the caller looks at it again as after a sleep.
    fn watch<'a>(
        &'a self,
        spin: &Spin,
        table: MutexGuard<'a, KeyMap<Entry>>,
        deadline: Option<std::time::Instant>,
        ended: impl Fn(&KeyMap<Entry>) -> bool,
    ) -> MutexGuard<'a, KeyMap<Entry>> {
        let since = spin.mark();
        drop(table);
        spin.until(since, deadline, || ended(&self.lock()));
        self.lock()
    }

    /// Sleeps on `changed` once, at most until `deadline` and, inside a
    /// task, [`TASK_RELEASE_POLL`]; `None` without sleeping when the
    /// deadline passed or the task's work was given up.
    fn sleep<'a>(
        &'a self,
        table: MutexGuard<'a, KeyMap<Entry>>,
        deadline: Option<std::time::Instant>,
        task: &rask_executor::Stop,
    ) -> Option<MutexGuard<'a, KeyMap<Entry>>> {
        if task.raised() {
            return None;
        }
        let poll = task.can_raise().then_some(TASK_RELEASE_POLL);
        let timeout = match deadline {
            None => None,
            Some(deadline) => Some(deadline.checked_duration_since(std::time::Instant::now())?)
                .filter(|left| !left.is_zero()),
        };
        if deadline.is_some() && timeout.is_none() {
            return None;
        }
        let timeout = match (timeout, poll) {
            (Some(t), Some(p)) => Some(t.min(p)),
            (t, p) => t.or(p),
        };
        Some(match timeout {
            None => self
                .changed
                .wait(table)
                .unwrap_or_else(PoisonError::into_inner),
            Some(timeout) => {
                self.changed
                    .wait_timeout(table, timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        })
    }

    /// Blocks until none of `keys` is pending or, `to_first_failure`, one
    /// of them failed or was cancelled; or until `deadline`, or the
    /// calling task's work was given up (see [`wait`](Shared::wait)).
    /// Whether it ended so (and not by the deadline or the task).
    ///
    /// It sleeps on the last key still pending, so a set whose keys end in
    /// order wakes this thread once, not once per key (each wake-up is a
    /// system call on the thread that reports the key, and a hand-off):
    /// keys found ended at either end of the pending range are not looked
    /// at again. To stop at a failure in the middle, those keys are
    /// [`watched`](Entry::watched), and looked at again only when a
    /// watched key failed.
    ///
    /// # Complexity
    ///
    /// O(keys) lookups, plus O(keys) per failure of a watched key that
    /// does not end the wait.
    pub(crate) fn wait_all(
        &self,
        keys: &[Key],
        to_first_failure: bool,
        deadline: Option<std::time::Instant>,
    ) -> bool {
        start_queued();
        let task = rask_executor::Stop::current();
        let watch = self.watcher(&task);
        let spin = watch.map(|(spin, _)| spin);
        // Whether a key was found pending: only such a wait counts for
        // watching (`spin` rule 4).
        let mut watched = false;
        let ended = rask_executor::blocking(|| {
            let (mut from, mut to) = (0, keys.len());
            let mut looked_at = None;
            let mut table = self.lock();
            loop {
                // What the key at `i` says: `None` while pending.
                let ended = |table: &KeyMap<Entry>, i: usize| match table.get(&keys[i]) {
                    Some(e) if e.state.is_pending() => None,
                    Some(e) => Some(matches!(e.state, State::Finished(_))),
                    None => Some(false),
                };
                while from < to {
                    match ended(&table, from) {
                        None => break,
                        Some(false) if to_first_failure => return true,
                        Some(_) => from += 1,
                    }
                }
                while from < to {
                    match ended(&table, to - 1) {
                        None => break,
                        Some(false) if to_first_failure => return true,
                        Some(_) => to -= 1,
                    }
                }
                if from == to {
                    return true;
                }
                let failures = self.failures.load(Ordering::Relaxed);
                if to_first_failure && looked_at != Some(failures) {
                    for key in &keys[from..to] {
                        match table.get_mut(key) {
                            Some(e) if e.state.is_pending() => e.watched = true,
                            Some(e) if matches!(e.state, State::Finished(_)) => {}
                            _ => return true,
                        }
                    }
                    looked_at = Some(failures);
                }
                if let Some(spin) = spin.filter(|_| !watched) {
                    // Watched first (`spin` rules): until the last key
                    // ended or a watched one failed.
                    watched = true;
                    let last = keys[to - 1];
                    table = self.watch(spin, table, deadline, |table| {
                        self.failures.load(Ordering::Relaxed) != failures
                            || table.get(&last).is_none_or(|e| !e.state.is_pending())
                    });
                    continue;
                }
                if let Some(last) = table.get_mut(&keys[to - 1]) {
                    last.waiters = last.waiters.saturating_add(1);
                }
                match self.sleep(table, deadline, &task) {
                    Some(woken) => table = woken,
                    None => return false,
                }
            }
        });
        if let Some((spin, started)) = watch.filter(|_| watched) {
            spin.waited(started.elapsed());
        }
        ended
    }

    /// Appends the tasks `key` still waits for, itself included, as key and
    /// name: the tasks an executor reports events for, so that a progress
    /// display hears of each one it counts (`run::progress` rules 1, 2).
    /// Nothing when `key` is not pending. The walk follows inputs the
    /// table answers for into their own pending work.
    ///
    /// A key with a run is counted by the tasks of that run's plan below
    /// its output, as `compute` counts its plan's: a fused task is one
    /// task, named after its steps, and fails when one of them does. A key
    /// still waiting for a run (for other futures, rule 3) is counted by
    /// the nodes of its graph, down to data and futures, and marked
    /// [`counted`](Rare::counted) under the same lock: its run then folds
    /// nothing, so each node counted is a task of its own.
    ///
    /// The plans of the runs counted go to `plans`, and so will those of
    /// the runs of keys counted by their graph, once planned: the display
    /// counts their tasks' events only (`run::progress` rule 1).
    pub(crate) fn pending_tasks(&self, key: Key, out: &mut Vec<(Key, String)>, plans: &Arc<Plans>) {
        /// What a pending key waits for.
        enum Work {
            Planned(Arc<rask_executor::Plan>, usize),
            Graph(Arc<Node>),
        }
        let mut seen = std::collections::HashSet::new();
        let mut followed = std::collections::HashSet::new();
        let mut roots = vec![key];
        while let Some(key) = roots.pop() {
            if !followed.insert(key) {
                continue;
            }
            let work = {
                let mut table = self.lock();
                match table.get_mut(&key) {
                    Some(entry) if entry.state.is_pending() => match &entry.run {
                        // No plan: the executor let go of it, its work done.
                        // Dropped after the table lock, as the last
                        // reference it may be.
                        Some((run, slot)) => {
                            run.plan.upgrade().map(|plan| Work::Planned(plan, *slot))
                        }
                        None => {
                            entry.rare().counted.push(Arc::downgrade(plans));
                            entry.node.clone().map(Work::Graph)
                        }
                    },
                    _ => None,
                }
            };
            match work {
                None => {}
                Some(Work::Planned(plan, slot)) => {
                    plans.add(plan.id());
                    let mut stack: Vec<u32> =
                        plan.outputs().get(slot).copied().into_iter().collect();
                    while let Some(i) = stack.pop() {
                        let task = plan.task(i);
                        // Data, or a key the table answers for: no event
                        // here; a pending one has work of its own.
                        let key = *plan.key(i);
                        if !task.op().is_work() {
                            roots.push(key);
                            continue;
                        }
                        if seen.insert(key) {
                            out.push((key, task.op().name().to_owned()));
                            stack.extend_from_slice(plan.deps(i));
                        }
                    }
                }
                Some(Work::Graph(node)) => {
                    let mut stack = vec![node];
                    while let Some(node) = stack.pop() {
                        if node.call.value().is_some() {
                            continue;
                        }
                        if node.call.is_future() {
                            roots.push(node.key);
                            continue;
                        }
                        if seen.insert(node.key) {
                            out.push((node.key, node.name().to_owned()));
                            stack.extend(node.deps.iter().cloned());
                        }
                    }
                }
            }
        }
    }

    /// Calls `listener` once `key` is done: later, or now if it already is.
    pub(crate) fn on_done(&self, key: Key, listener: Listener) {
        {
            let mut table = self.lock();
            if let Some(entry) = table.get_mut(&key) {
                if entry.state.is_pending() {
                    entry.rare().listeners.push(listener);
                    return;
                }
            }
        }
        listener.notify();
    }

    /// Registers a waker for `key` if it is pending; returns the state seen.
    /// Work this thread queued is started first, as [`wait`](Shared::wait)
    /// does: the waker is called only once that work ran. A simulated
    /// client then runs the work (see [`drive`](Shared::drive)).
    pub(crate) fn poll_state(&self, key: Key, waker: &Waker) -> State {
        start_queued();
        self.drive(|| !self.state(key).is_pending());
        let mut table = self.lock();
        match table.get_mut(&key) {
            Some(entry) if entry.state.is_pending() => {
                // Polled again by the same task (a `select!` in a loop):
                // one waker is enough, and the list must not grow with
                // every poll.
                let listeners = &mut entry.rare().listeners;
                let known = listeners
                    .iter()
                    .any(|l| matches!(l, Listener::Waker(w) if w.will_wake(waker)));
                if !known {
                    listeners.push(Listener::Waker(waker.clone()));
                }
                State::Pending
            }
            Some(entry) => entry.state.clone(),
            None => State::Cancelled,
        }
    }
}

/// A finished future of `key` holding `value`, made where a task receives
/// a future inside an untraversed argument (`travel.rs` rule 7).
///
/// It belongs to one table per process that no executor runs anything
/// for: the value is already here (the task's input), so nothing of it
/// depends on the cluster any more, and no release there can take it
/// away. Passed on to a graph, it is data, as any finished future of
/// another client is (`FutureCall`).
pub(crate) fn holding<T>(key: Key, name: Name, value: Value) -> Future<T> {
    static HELD: std::sync::OnceLock<Arc<Shared>> = std::sync::OnceLock::new();
    let shared = HELD.get_or_init(|| {
        Client::on(
            Backend::Synchronous(rask_executor::Synchronous),
            ExecutorKind::Synchronous,
            Settings {
                progress: false,
                optimize: false,
                cache: None,
                spin: false,
            },
        )
        .inner
    });
    {
        let mut table = shared.lock();
        let entry = table.entry(key).or_insert_with(|| Entry {
            state: State::Finished(value),
            ..Entry::pending()
        });
        entry.refs += 1;
    }
    Future::new(shared.clone(), key, name)
}

/// A node standing for a future inside a graph: its value is the future's.
pub(crate) struct FutureCall {
    pub(crate) handle: Arc<crate::futures::future::Handle>,
    /// The type of the future's value.
    pub(crate) output: std::any::TypeId,
}

impl Call for FutureCall {
    fn run(&self, _: &mut [Option<Value>]) -> std::result::Result<Value, OpError> {
        let h = &self.handle;
        match h.shared.wait(h.key, None) {
            State::Finished(value) => Ok(value),
            State::Failed(failure) => Err(replay(&failure)),
            State::Cancelled | State::Pending => Err(replay(&cancelled_failure(h.key, &h.name))),
        }
    }

    fn name(&self) -> &str {
        &self.handle.name
    }

    fn prepare(&self) {
        let h = &self.handle;
        h.shared.wait(h.key, None);
    }

    fn is_future(&self) -> bool {
        true
    }

    fn future(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        Some(&self.handle)
    }

    fn output_type(&self) -> Option<std::any::TypeId> {
        Some(self.output)
    }

    fn to_travelling_wire(&self) -> std::result::Result<WireTask, WireError> {
        let h = &self.handle;
        match h.shared.wait(h.key, None) {
            State::Finished(value) => crate::build::registry::fetched_value_task(&value),
            _ => self.to_wire(),
        }
    }

    fn to_wire(&self) -> std::result::Result<WireTask, WireError> {
        let h = &self.handle;
        match h.shared.wait(h.key, None) {
            State::Finished(value) => crate::build::registry::value_task(&value),
            State::Failed(failure) => crate::build::registry::fail_task(&failure),
            State::Cancelled | State::Pending => {
                crate::build::registry::fail_task(&cancelled_failure(h.key, &h.name))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delayed;
    use rask_executor::{Executor, Synchronous};

    fn inc(x: i64) -> i64 {
        x + 1
    }

    fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    /// Runs each plan with the reference executor and drops it, then
    /// reports the outputs from a thread of its own, which keeps the
    /// reporter until `gate` opens: an executor's thread that reported a
    /// run's last output and was preempted before it let go of the run, as
    /// a cluster's client thread can be (it, too, drops its plan first).
    #[derive(Default)]
    struct Lagging {
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    /// Outputs kept to be reported later.
    #[derive(Default)]
    struct Kept(Mutex<Vec<(usize, Outcome)>>);

    impl Reporter for Kept {
        fn output(&self, index: usize, outcome: Outcome) {
            self.0.lock().unwrap().push((index, outcome));
        }
    }

    impl Executor for Lagging {
        fn submit(&self, plan: Arc<rask_executor::Plan>, reporter: Arc<dyn Reporter>) {
            let kept = Arc::new(Kept::default());
            Synchronous.submit(plan, kept.clone());
            let outputs = std::mem::take(&mut *kept.0.lock().unwrap());
            let gate = self.gate.clone();
            std::thread::spawn(move || {
                for (index, outcome) in outputs {
                    reporter.output(index, outcome);
                }
                let (open, opened) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = opened.wait(open).unwrap();
                }
                reporter.finished();
            });
        }
    }

    /// A future's result returns once its run reported it, and the
    /// executor may hold the run a while longer: by then the run holds no
    /// plan, so the futures its graph took as arguments are released with
    /// their last handles.
    #[test]
    fn a_finished_run_holds_no_future_its_graph_took() {
        let lagging = Arc::new(Lagging::default());
        let settings = Settings::of(&Config::new()).unwrap();
        let client = Client::on(
            Backend::Custom(lagging.clone()),
            ExecutorKind::Synchronous,
            settings,
        );
        let f = client.submit(delayed!(inc(1))).unwrap();
        assert_eq!(f.result().unwrap(), 2);
        let g = client.submit(delayed!(add(&f, 10))).unwrap();
        assert_eq!(g.result().unwrap(), 12);
        assert_eq!(client.stats().keys_held, 2);
        drop((f, g));
        assert_eq!(
            client.stats().keys_held,
            0,
            "the run of `g`, still held by the executor, keeps `f`"
        );
        let (open, opened) = &*lagging.gate;
        *open.lock().unwrap() = true;
        opened.notify_all();
    }

    /// An executor that never reports: its futures stay pending.
    #[derive(Default)]
    struct Never(Mutex<Vec<Arc<dyn Reporter>>>);

    impl Executor for Never {
        fn submit(&self, _: Arc<rask_executor::Plan>, reporter: Arc<dyn Reporter>) {
            self.0.lock().unwrap().push(reporter);
        }
    }

    /// A pending future polled again and again by one task (a `select!`
    /// in a loop) keeps one waker of it, not one per poll; another task's
    /// waker is kept beside it.
    #[test]
    fn a_future_polled_again_by_one_task_keeps_one_waker() {
        use std::future::Future as _;
        use std::task::{Context, Poll, Wake};
        struct Task;
        impl Wake for Task {
            fn wake(self: Arc<Self>) {}
        }
        let settings = Settings::of(&Config::new()).unwrap();
        let never = Arc::new(Never::default());
        let client = Client::on(
            Backend::Custom(never.clone()),
            ExecutorKind::Synchronous,
            settings,
        );
        let mut f = client.submit(delayed!(inc(1))).unwrap();
        let key = f.key().key();
        let listeners = || {
            client
                .inner
                .lock()
                .get(&key)
                .map(|e| e.rare.as_ref().map_or(0, |r| r.listeners.len()))
        };
        let one = Waker::from(Arc::new(Task));
        for _ in 0..100 {
            let poll = std::pin::Pin::new(&mut f).poll(&mut Context::from_waker(&one));
            assert!(matches!(poll, Poll::Pending));
        }
        assert_eq!(listeners(), Some(1));
        let other = Waker::from(Arc::new(Task));
        let poll = std::pin::Pin::new(&mut f).poll(&mut Context::from_waker(&other));
        assert!(matches!(poll, Poll::Pending));
        assert_eq!(listeners(), Some(2));
    }

    /// Runs each plan with the reference executor and reports each value
    /// as a cluster's client does (rule 5): a [`Remote`] handle of the
    /// connection it was computed on, lost once `epoch` moves on (the
    /// cluster client's rule 10).
    #[derive(Default)]
    struct Connection {
        epoch: Arc<AtomicU64>,
    }

    /// A value held through a [`Connection`], with its bytes for a fetch.
    struct Handle {
        key: Key,
        bytes: Arc<[u8]>,
        epoch: u64,
        current: Arc<AtomicU64>,
    }

    impl rask_executor::RemoteValue for Handle {
        fn key(&self) -> Key {
            self.key
        }

        fn fetch(&self) -> std::result::Result<Arc<[u8]>, WireError> {
            self.lost().map_or_else(|| Ok(self.bytes.clone()), Err)
        }

        fn lost(&self) -> Option<WireError> {
            (self.current.load(Ordering::SeqCst) != self.epoch).then(|| WireError::Fetch {
                key: self.key,
                reason: "the value was lost with the connection".into(),
            })
        }
    }

    impl Executor for Connection {
        fn submit(&self, plan: Arc<rask_executor::Plan>, reporter: Arc<dyn Reporter>) {
            let kept = Arc::new(Kept::default());
            let keys: Vec<Key> = plan.outputs().iter().map(|&t| *plan.key(t)).collect();
            Synchronous.submit(plan, kept.clone());
            let outputs = std::mem::take(&mut *kept.0.lock().unwrap());
            for (index, outcome) in outputs {
                let outcome = outcome.map(|value| -> Value {
                    Arc::new(Remote(Arc::new(Handle {
                        key: keys[index],
                        bytes: value.encode().unwrap().into(),
                        epoch: self.epoch.load(Ordering::SeqCst),
                        current: self.epoch.clone(),
                    })))
                });
                reporter.output(index, outcome);
            }
            reporter.finished();
        }
    }

    /// Runs of [`counted_inc`].
    static COUNTED_RUNS: AtomicUsize = AtomicUsize::new(0);

    /// `x + 1`, counted; run by one test only.
    fn counted_inc(x: i64) -> i64 {
        COUNTED_RUNS.fetch_add(1, Ordering::SeqCst);
        x + 1
    }

    /// Rule 8: a value lost with its connection is computed again by the
    /// same work submitted again, directly or as a node of a new graph;
    /// the future that held it fails as lost until the direct submission
    /// gives it the new value.
    #[test]
    fn a_value_lost_with_its_connection_is_computed_again() {
        let connection = Arc::new(Connection::default());
        let settings = Settings::of(&Config::new()).unwrap();
        let client = Client::on(
            Backend::Custom(connection.clone()),
            ExecutorKind::Synchronous,
            settings,
        );
        let runs = || COUNTED_RUNS.load(Ordering::SeqCst);
        let lost = |e: Error| assert!(e.to_string().contains("lost with the connection"), "{e}");
        let f = client.submit(delayed!(counted_inc(1000))).unwrap();
        assert_eq!(f.result().unwrap(), 1001);
        assert_eq!((runs(), client.stats().on_cluster), (1, 1));
        // Shared while its connection lives.
        let same = client.submit(delayed!(counted_inc(1000))).unwrap();
        assert_eq!(same.result().unwrap(), 1001);
        drop(same);
        assert_eq!(runs(), 1);
        connection.epoch.fetch_add(1, Ordering::SeqCst);
        assert_eq!(client.stats().on_cluster, 0);
        lost(f.result().unwrap_err());
        lost(client.retry(&f).unwrap_err());
        // A graph taking `f` fails before it runs, naming `f`.
        let on_f = client.submit(delayed!(add(&f, 1))).unwrap();
        let err = on_f.result().unwrap_err();
        assert!(
            matches!(&err, Error::Task { key, .. } if *key == f.key()),
            "{err:?}"
        );
        lost(err);
        drop(on_f); // its key is the next graph's
        let through = client
            .submit(delayed!(add(delayed!(counted_inc(1000)), 1)))
            .unwrap();
        assert_eq!(through.result().unwrap(), 1002);
        assert_eq!(runs(), 2);
        lost(f.result().unwrap_err());
        let again = client.submit(delayed!(counted_inc(1000))).unwrap();
        assert_eq!(again.result().unwrap(), 1001);
        assert_eq!(runs(), 3);
        assert_eq!(f.result().unwrap(), 1001);
        assert_eq!(client.stats().on_cluster, 2, "`f` and `through`");
    }

    #[test]
    fn a_client_watches_only_where_its_configuration_lets_it() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for spin in [true, false] {
            let settings = Settings::of(&Config::new().spin(spin)).unwrap();
            // The kind decides where watching pays (spin rule 2), the
            // setting whether it is allowed at all (rule 5).
            let client = Client::on(
                Backend::Synchronous(rask_executor::Synchronous),
                ExecutorKind::Local(2),
                settings,
            );
            assert_eq!(
                client.inner.spin.is_some(),
                spin && cores > 1,
                "spin {spin}"
            );
        }
    }
}
