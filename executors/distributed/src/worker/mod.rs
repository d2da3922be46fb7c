//! The worker: runs tasks on its own threads, keeps their values, serves them
//! to peers and clients on its data port.
//!
//! A worker is a library entry point: it runs inside the user's own binary
//! (started in worker mode), because only that binary has the user's
//! functions in its [`rask_executor::Registry`].
//!
//! Rules:
//!
//! 1. The worker's life is its scheduler connection: when it ends, for any
//!    reason, [`run`] returns `Ok(())` and every value is dropped.
//! 2. One tokio thread does all networking; ops run on `threads` plain
//!    threads, so a long op never delays a data transfer or a report (but
//!    see rule 5 for ops known to be short).
//! 3. Reports to the scheduler are batched: everything that finished while
//!    the network thread was busy goes out in one frame.
//! 4. The data port listens on the address the worker used to reach its
//!    scheduler (port chosen by the OS): the one interface other machines of
//!    the cluster are known to route to.
//! 5. A job whose function's last 4 runs on this worker (`FAST_STREAK`)
//!    each took under 50 µs (`FAST_OP`) runs on the network thread itself,
//!    right where it is dispatched: for a tiny task, the hand-off to a
//!    compute thread and back costs more than the task. One turn of the
//!    network loop runs such jobs for at most 500 µs (`INLINE_TURN`) and
//!    hands the rest to the pool. A run over 50 µs sends its function back
//!    to the pool until it has been fast 4 times in a row again, so a
//!    function that turns slow delays the network thread once, by that one
//!    run.
//! 6. The worker sends a heartbeat as often as its scheduler asked
//!    (`ToWorker::Heartbeat`), so a hung worker (or one whose machine became
//!    unreachable) is told from a busy one: a long task on a compute thread
//!    never delays it, a short one on the network thread (rule 5) barely.
//! 7. Tasks print to the stdout and stderr the worker process was started
//!    with. Stdout is flushed before each batch of reports is sent, so what
//!    a task printed, even a `print!` without a newline, is written before
//!    its result can reach a client (flushing an empty buffer costs no
//!    system call).
//! 8. A worker announces its program's build ([`BuildId::current`]) to the
//!    scheduler, which gives it tasks of that build only, and its data port
//!    serves only readers of that build: a peer announcing another is
//!    closed with a logged reason.

mod state;

use std::collections::{BinaryHeap, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rask_executor::{panic_message, run_task, Encoded, Failure, FailureKind, Key, Registry, Stop};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::net::{self, log, Chain, ConnectError, FrameReader, PeerPool};
use crate::protocol::{
    decode_checked, duration_ns_of, strip_scheme, Batch, FromPeer, FromPeerRef, ProtocolError,
    Role, ToPeer, ToScheduler, ToWorker, WireKey, WorkerId, INLINE_BYTES, MAX_FRAME,
    MAX_TASK_DURATION, MAX_THREADS,
};
use crate::{BuildId, Error};
use state::{lock, Compute, Done, Job, Outbox, Store, Stored, WorkerState};

/// The largest value a worker keeps: one that still fits a frame.
const MAX_VALUE: usize = MAX_FRAME - 1024;

/// How long a worker waits for its scheduler to accept it.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A run shorter than this is fast (rule 5).
const FAST_OP: Duration = Duration::from_micros(50);

/// How many fast runs in a row make a function run on the network thread
/// (rule 5).
const FAST_STREAK: u32 = 4;

/// The longest the network thread runs jobs itself in one turn (rule 5).
const INLINE_TURN: Duration = Duration::from_micros(500);

/// Runs a worker until its scheduler goes away (then returns `Ok`), on the
/// calling thread.
///
/// `scheduler` is `tcp://host:port` or `host:port`; `threads` is the number
/// of tasks run at once (at least one, at most [`MAX_THREADS`]: more is
/// taken as that).
///
/// # Errors
///
/// [`Error::Address`] for a malformed address, [`Error::Connection`] or
/// [`Error::Timeout`] if the scheduler cannot be reached,
/// [`Error::Handshake`] if it is not a rask scheduler of this version,
/// [`Error::Protocol`] if it breaks the protocol (a malformed message, or a
/// number out of its range such as a heartbeat interval over an hour).
///
/// # Examples
///
/// A program in worker mode, as `RASK_WORKER=tcp://host:8786 ./my-app` starts it:
///
/// ```no_run
/// # fn registry() -> std::sync::Arc<dyn rask_executor::Registry> { unimplemented!() }
/// if let Ok(scheduler) = std::env::var(rask_distributed::WORKER_ENV) {
///     rask_distributed::worker::run(&scheduler, registry(), 4)?;
///     std::process::exit(0);
/// }
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn run(scheduler: &str, registry: Arc<dyn Registry>, threads: usize) -> Result<(), Error> {
    let runtime = net::runtime().map_err(Error::Io)?;
    let build = BuildId::current();
    runtime.block_on(main(
        scheduler.to_owned(),
        registry,
        threads,
        build,
        None,
        None,
    ))
}

/// A worker running on a background thread of this process (tests).
///
/// [`WorkerHandle::stop`] (and dropping the handle) stops it abruptly: its
/// connections are dropped as a crash would drop them.
pub struct WorkerHandle {
    id: WorkerId,
    data_address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl WorkerHandle {
    /// The address of the worker's data port.
    pub fn data_address(&self) -> SocketAddr {
        self.data_address
    }

    /// The id the scheduler gave the worker.
    pub fn id(&self) -> u32 {
        self.id.0
    }

    /// Whether the worker stopped (its scheduler went away, or `stop`).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the worker at once, closing its connections without notice, as
    /// if its process had been killed. Tasks running on its threads finish in
    /// the background and their results are dropped.
    pub fn stop(mut self) {
        self.halt();
    }

    /// Waits until the worker stops by itself (when its scheduler goes
    /// away) and returns how it ended.
    ///
    /// # Errors
    ///
    /// What [`run`] would have returned.
    pub fn join(mut self) -> Result<(), Error> {
        // Dropping the sender (not sending) lets the worker run on.
        self.stop = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            _ => Ok(()),
        }
    }

    fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("id", &self.id.0)
            .field("data_address", &self.data_address)
            .finish()
    }
}

/// Starts a worker on a background thread; returns once the scheduler
/// registered it.
///
/// # Errors
///
/// As [`run`], for the connection and registration.
///
/// # Examples
///
/// ```no_run
/// # fn registry() -> std::sync::Arc<dyn rask_executor::Registry> { unimplemented!() }
/// let scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
/// let address = format!("tcp://{}", scheduler.address());
/// let worker = rask_distributed::worker::spawn(&address, registry(), 1)?;
/// worker.stop(); // as if killed
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn spawn(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    threads: usize,
) -> Result<WorkerHandle, Error> {
    spawn_as(scheduler, registry, threads, BuildId::current())
}

/// [`spawn`], announcing `build` instead of this process's build: tests
/// run workers of several "programs" in one process this way.
///
/// # Errors
///
/// As [`spawn`].
#[doc(hidden)]
pub fn spawn_as(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    threads: usize,
    build: BuildId,
) -> Result<WorkerHandle, Error> {
    let runtime = net::runtime().map_err(Error::Io)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let scheduler = scheduler.to_owned();
    let thread = std::thread::Builder::new()
        .name("rask-worker".into())
        .spawn(move || {
            runtime.block_on(main(
                scheduler,
                registry,
                threads,
                build,
                Some(stop_rx),
                Some(ready_tx),
            ))
        })
        .map_err(Error::Io)?;
    match ready_rx.recv() {
        Ok((id, data_address)) => Ok(WorkerHandle {
            id,
            data_address,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        // The worker ended before registering: its result says why.
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(Error::Protocol {
                reason: ProtocolError::Closed,
            }),
        },
    }
}

fn connect_error(addr: &str, e: ConnectError) -> Error {
    match e {
        ConnectError::Io(source) => Error::Connection {
            addr: addr.to_owned(),
            source,
        },
        ConnectError::Timeout => Error::Timeout {
            what: "the scheduler to accept the connection",
            after: net::CONNECT_TIMEOUT,
        },
        ConnectError::Handshake(reason) => Error::Handshake {
            addr: addr.to_owned(),
            reason,
        },
    }
}

/// What the worker's handlers send, sorted by destination.
#[derive(Default)]
struct Out {
    scheduler: Batch,
    fetches: Vec<(WorkerId, WireKey)>,
    jobs: Vec<Job>,
}

impl Outbox for Out {
    fn to_scheduler(&mut self, msg: ToScheduler) {
        self.scheduler.push(&msg);
    }
    fn fetch(&mut self, from: WorkerId, key: WireKey) {
        self.fetches.push((from, key));
    }
    fn run(&mut self, job: Job) {
        self.jobs.push(job);
    }
}

async fn main(
    scheduler: String,
    registry: Arc<dyn Registry>,
    threads: usize,
    build: BuildId,
    stop: Option<oneshot::Receiver<()>>,
    ready: Option<std::sync::mpsc::Sender<(WorkerId, SocketAddr)>>,
) -> Result<(), Error> {
    let address = strip_scheme(&scheduler).ok_or_else(|| Error::Address {
        address: scheduler.clone(),
    })?;
    let (read, write, local, _) = net::connect(
        address,
        Role::Worker,
        Role::Scheduler,
        build,
        net::CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| connect_error(address, e))?;
    let local_ip = local.ip();
    let listener = TcpListener::bind((local_ip, 0)).await.map_err(Error::Io)?;
    let data_address = listener.local_addr().map_err(Error::Io)?;
    let writer = net::spawn_writer(write);
    // The protocol's range (rule 5 of `protocol`): the pool is that big too.
    let threads = threads.clamp(1, MAX_THREADS as usize);
    let mut out = Out::default();
    out.to_scheduler(ToScheduler::RegisterWorker {
        address: data_address.to_string(),
        threads: threads as u32,
    });
    net::send_batch(&writer, &mut out.scheduler);

    let mut read = FrameReader::new(read);
    let protocol = |reason| Error::Protocol { reason };
    let first = match tokio::time::timeout(REGISTER_TIMEOUT, read.next()).await {
        Ok(Ok(true)) => match decode_checked::<ToWorker>(read.frame()) {
            Ok(msgs) => msgs,
            Err(e) => {
                log!("worker: closing the scheduler connection: {}", Chain(&e));
                return Err(protocol(e));
            }
        },
        Ok(Ok(false)) => return Err(protocol(ProtocolError::Closed)),
        Ok(Err(e)) => return Err(protocol(e)),
        Err(_) => {
            return Err(Error::Timeout {
                what: "the scheduler to register the worker",
                after: REGISTER_TIMEOUT,
            })
        }
    };
    let mut first = first.into_iter();
    let Some(ToWorker::Registered { id }) = first.next() else {
        return Err(protocol(ProtocolError::Unexpected(
            "the scheduler did not answer the registration",
        )));
    };

    let store = Store::default();
    tokio::spawn(serve_data(listener, store.clone(), build));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let pool = Pool::start(threads, done_tx);
    let (fetch_tx, mut fetch_rx) = mpsc::unbounded_channel();
    let mut peers = PeerPool::new(fetch_tx, build);
    let mut state = WorkerState::new(id, registry, store);
    let mut speeds = Speeds::default();
    if let Some(ready) = ready {
        let _ = ready.send((id, data_address));
    }
    let mut stop = stop;

    let mut pending: Vec<ToWorker> = first.collect();
    // Rule 6: ticks once the scheduler said how often.
    let mut heartbeat: Option<tokio::time::Interval> = None;
    let result = loop {
        for msg in pending.drain(..) {
            match msg {
                ToWorker::Compute {
                    key,
                    name,
                    function,
                    payload,
                    deps,
                    who_has,
                    priority,
                    timeout_ms,
                    retries,
                } => state.on_compute(
                    Compute {
                        key,
                        name,
                        function,
                        payload,
                        deps,
                        who_has,
                        priority,
                        timeout: timeout_ms.map(Duration::from_millis),
                        retries,
                    },
                    &mut out,
                ),
                ToWorker::Release { key } => state.on_release(key, &mut out),
                ToWorker::PeerJoined { id, address } => peers.add_peer(id, address),
                ToWorker::PeerLeft { id } => {
                    peers.remove_peer(id);
                    state.on_peer_left(id);
                }
                ToWorker::Heartbeat { every_ms } => {
                    // Within MIN_HEARTBEAT..=MAX_HEARTBEAT (checked when
                    // decoded): the interval's arithmetic cannot overflow.
                    let every = Duration::from_millis(every_ms);
                    let mut ticks = tokio::time::interval(every);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    heartbeat = Some(ticks);
                }
                ToWorker::Registered { .. } => {
                    log!("worker: closing the scheduler connection: registered twice");
                    return Ok(());
                }
            }
        }
        // Short jobs run here (rule 5), which may dispatch more jobs.
        let jobs = run_fast_jobs(&mut out, &mut state, &mut speeds);
        // Flush (rule 3). Jobs first: a thread starts on them while the
        // reports are written.
        if !jobs.is_empty() {
            pool.submit(jobs.into_iter());
        }
        if !out.scheduler.is_empty() {
            // Tasks' output before their reports (rule 7). A stdout that
            // cannot be written to is the program's business, not the
            // worker's.
            let _ = std::io::stdout().flush();
        }
        net::send_batch(&writer, &mut out.scheduler);
        for (from, key) in out.fetches.drain(..) {
            peers.request(from, key);
        }
        peers.flush();

        tokio::select! {
            signal = async {
                match stop.as_mut() {
                    Some(s) => s.await,
                    None => std::future::pending().await,
                }
            } => match signal {
                Ok(()) => break Ok(()),
                // The handle let go without stopping it (`join`).
                Err(_) => stop = None,
            },
            got = read.next() => match got {
                Ok(true) => match decode_checked::<ToWorker>(read.frame()) {
                    Ok(msgs) => pending = msgs,
                    Err(e) => {
                        log!("worker: closing the scheduler connection: {}", Chain(&e));
                        break Err(protocol(e));
                    }
                },
                // The scheduler went away: the worker's life ends (rule 1).
                Ok(false) | Err(ProtocolError::Closed) | Err(ProtocolError::Io(_)) => break Ok(()),
                Err(e) => {
                    log!("worker: closing the scheduler connection: {}", Chain(&e));
                    break Err(protocol(e));
                }
            },
            Some(done) = done_rx.recv() => {
                finished(done, &mut speeds, &mut state, &mut out);
                while let Ok(done) = done_rx.try_recv() {
                    finished(done, &mut speeds, &mut state, &mut out);
                }
            }
            Some(fetched) = fetch_rx.recv() => {
                state.on_fetched(fetched.from, fetched.key, fetched.result, &mut out);
                while let Ok(f) = fetch_rx.try_recv() {
                    state.on_fetched(f.from, f.key, f.result, &mut out);
                }
            }
            _ = async {
                match heartbeat.as_mut() {
                    Some(ticks) => {
                        ticks.tick().await;
                    }
                    None => std::future::pending().await,
                }
            } => out.to_scheduler(ToScheduler::Heartbeat),
        }
    };
    pool.close();
    result
}

/// Accepts peers on the data port.
async fn serve_data(listener: TcpListener, store: Store, build: BuildId) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(data_connection(stream, peer, store.clone(), build));
            }
            Err(e) => {
                log!("worker: data port accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Answers one peer's `GetData`s until it goes away; only a peer of this
/// worker's `build` is served (rule 7).
async fn data_connection(stream: TcpStream, peer: SocketAddr, store: Store, build: BuildId) {
    let (theirs, read, write) = match net::accept(stream, Role::DataServer, build).await {
        Ok(x) => x,
        Err(e) => {
            log!("worker: closing data connection from {peer}: {}", Chain(&e));
            return;
        }
    };
    let refused = if theirs.role != Role::Peer {
        Some(ProtocolError::Role(theirs.role))
    } else if theirs.build != build {
        Some(ProtocolError::Build {
            ours: build,
            theirs: theirs.build,
        })
    } else {
        None
    };
    if let Some(reason) = refused {
        log!("worker: closing data connection from {peer}: {reason}");
        return;
    }
    let writer = net::spawn_writer(write);
    let mut read = FrameReader::new(read);
    let mut batch = Batch::default();
    loop {
        let msgs = match read.next().await {
            Ok(true) => match decode_checked::<ToPeer>(read.frame()) {
                Ok(m) => m,
                Err(e) => {
                    log!("worker: closing data connection from {peer}: {}", Chain(&e));
                    return;
                }
            },
            Ok(false) => return,
            Err(e) => {
                log!("worker: closing data connection from {peer}: {}", Chain(&e));
                return;
            }
        };
        for ToPeer::GetData { keys } in msgs {
            for key in keys {
                let stored = lock(&store).get(&key).map(|s| s.value.clone());
                match stored {
                    Some(value) => {
                        if let Some(encoded) = value.downcast_ref::<Encoded>() {
                            batch.push(&FromPeerRef::Data {
                                key: &key,
                                bytes: &encoded.0,
                            });
                        } else {
                            match value.encode() {
                                Ok(bytes) => batch.push(&FromPeerRef::Data {
                                    key: &key,
                                    bytes: &bytes,
                                }),
                                // Encoded once already when it was computed;
                                // a failure now is the type's own bug.
                                Err(_) => batch.push(&FromPeer::Missing { key }),
                            }
                        }
                    }
                    None => batch.push(&FromPeer::Missing { key }),
                }
            }
        }
        if !net::send_batch(&writer, &mut batch) {
            return;
        }
    }
}

/// Jobs waiting for a thread, lowest priority number first.
struct Queue {
    heap: BinaryHeap<Queued>,
    closed: bool,
    /// Threads blocked on the condition variable: only they need a wake-up.
    sleeping: usize,
}

struct Queued(Job);

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.0.priority, self.0.id) == (other.0.priority, other.0.id)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: reverse so the lowest priority pops first.
        (other.0.priority, other.0.id).cmp(&(self.0.priority, self.0.id))
    }
}

/// The worker's compute threads (rule 2).
struct Pool {
    shared: Arc<(Mutex<Queue>, Condvar)>,
}

impl Pool {
    fn start(threads: usize, done: mpsc::UnboundedSender<Done>) -> Pool {
        let shared = Arc::new((
            Mutex::new(Queue {
                heap: BinaryHeap::new(),
                closed: false,
                sleeping: 0,
            }),
            Condvar::new(),
        ));
        for i in 0..threads {
            let shared = shared.clone();
            let done = done.clone();
            // A thread that cannot be spawned leaves the pool smaller; the
            // worker still runs as long as one thread exists.
            let spawned = std::thread::Builder::new()
                .name(format!("rask-worker-{i}"))
                .spawn(move || compute_thread(&shared, &done));
            if let Err(e) = spawned {
                log!("worker: could not start compute thread {i}: {e}");
            }
        }
        Pool { shared }
    }

    fn submit(&self, jobs: impl Iterator<Item = Job>) {
        let (queue, ready) = &*self.shared;
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        let before = q.heap.len();
        q.heap.extend(jobs.map(Queued));
        if q.sleeping == 0 {
            return;
        }
        if q.heap.len() - before > 1 {
            ready.notify_all();
        } else {
            ready.notify_one();
        }
    }

    /// Threads exit once idle; running ops finish first, unobserved.
    fn close(&self) {
        let (queue, ready) = &*self.shared;
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        q.closed = true;
        q.heap.clear();
        ready.notify_all();
    }
}

fn compute_thread(shared: &(Mutex<Queue>, Condvar), done: &mpsc::UnboundedSender<Done>) {
    let (queue, ready) = shared;
    loop {
        let job = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.closed {
                    return;
                }
                if let Some(Queued(job)) = q.heap.pop() {
                    break job;
                }
                q.sleeping += 1;
                q = ready.wait(q).unwrap_or_else(|e| e.into_inner());
                q.sleeping -= 1;
            }
        };
        let mut open = true;
        run_chain(job, |report| {
            open = done.send(report).is_ok();
            open
        });
        if !open {
            return;
        }
    }
}

/// Runs `job`, then its successors link after link (state rule 5), giving
/// each report to `report`. When `report` answers `false`, stops and
/// returns the successor not yet run, its inputs filled in.
fn run_chain(mut job: Job, mut report: impl FnMut(Done) -> bool) -> Option<Job> {
    loop {
        // Taken before the report, so the network thread never both
        // attaches a successor and expects it to be dispatched by itself.
        let successor = job.take_successor();
        if job.cancelled.load(Ordering::Relaxed) {
            // Released: the network thread gives the successor back.
            return None;
        }
        let done = run_job(job);
        let value = match &done.outcome {
            Ok(stored) => Some(stored.value.clone()),
            Err(_) => None,
        };
        let go_on = report(done);
        match (value, successor) {
            (Some(value), Some(mut next)) => {
                for input in next.inputs.iter_mut().filter(|i| i.is_none()) {
                    *input = Some(value.clone());
                }
                if !go_on {
                    return Some(next);
                }
                job = next;
            }
            _ => return None,
        }
    }
}

/// How long each function's recent runs took on this worker (rule 5).
#[derive(Default)]
struct Speeds {
    /// Fast runs in a row, per function.
    streaks: HashMap<Arc<str>, u32>,
}

impl Speeds {
    fn record(&mut self, done: &Done) {
        let fast = done.duration_ns < FAST_OP.as_nanos() as u64;
        match self.streaks.get_mut(&done.function) {
            Some(streak) if fast => *streak = streak.saturating_add(1),
            Some(streak) => *streak = 0,
            None => {
                self.streaks.insert(done.function.clone(), u32::from(fast));
            }
        }
    }

    fn is_fast(&self, function: &str) -> bool {
        self.streaks
            .get(function)
            .is_some_and(|&s| s >= FAST_STREAK)
    }
}

/// A job's report, from a compute thread or this one: its function's speed
/// is noted (rule 5), then the state takes it.
fn finished(done: Done, speeds: &mut Speeds, state: &mut WorkerState, out: &mut Out) {
    speeds.record(&done);
    state.on_task_done(done, out);
}

/// Runs the jobs of fast functions on this thread for up to
/// [`INLINE_TURN`], reporting each to `state`, including the jobs that
/// their results dispatch (rule 5); returns the jobs left for the pool.
fn run_fast_jobs(out: &mut Out, state: &mut WorkerState, speeds: &mut Speeds) -> Vec<Job> {
    let mut to_pool = Vec::new();
    if out.jobs.is_empty() {
        return to_pool;
    }
    let start = Instant::now();
    let mut reports = Vec::new();
    while !out.jobs.is_empty() {
        for job in std::mem::take(&mut out.jobs) {
            if !speeds.is_fast(&job.function) || start.elapsed() >= INLINE_TURN {
                to_pool.push(job);
                continue;
            }
            let rest = run_chain(job, |done| {
                reports.push(done);
                start.elapsed() < INLINE_TURN
            });
            to_pool.extend(rest);
            for done in reports.drain(..) {
                finished(done, speeds, state, out);
            }
        }
    }
    to_pool
}

/// Runs one job and encodes its value.
fn run_job(job: Job) -> Done {
    let Job {
        id,
        key,
        function,
        plan,
        mut inputs,
        cancelled,
        ..
    } = job;
    let start = Instant::now();
    let task = plan.task(0);
    // A released task sees `rask::cancelled()` turn true (state rule 3).
    let outcome = Stop::flag(cancelled).enter(|| run_task(task, &mut inputs));
    drop(inputs);
    // Reported as at most the protocol's limit, which the scheduler checks.
    let duration_ns = duration_ns_of(start.elapsed().min(MAX_TASK_DURATION));
    // Encode once now: it sizes the value for placement and turns an
    // unserializable value into this task's failure (state rule 4); a
    // small encoding travels with the report (`INLINE_BYTES`).
    let mut inline = None;
    let outcome = outcome.and_then(|value| {
        let encoded = match value.downcast_ref::<Encoded>() {
            Some(e) => {
                if e.0.len() <= INLINE_BYTES {
                    inline = Some(e.0.clone());
                }
                Ok(e.0.len())
            }
            // A panicking `Serialize` fails this task, not the thread
            // (which may be the network thread, rule 5).
            None => match catch_unwind(AssertUnwindSafe(|| value.encode())) {
                Ok(Ok(bytes)) => {
                    let n = bytes.len();
                    if n <= INLINE_BYTES {
                        inline = Some(Arc::from(bytes));
                    }
                    Ok(n)
                }
                Ok(Err(e)) => Err((FailureKind::Failed, e.to_string())),
                Err(p) => Err((
                    FailureKind::Panicked,
                    format!("encoding its value panicked: {}", panic_message(&*p)),
                )),
            },
        };
        let failed = |(kind, message): (FailureKind, String)| {
            Arc::new(Failure::new(Key(key), task.op.name().into(), kind, message))
        };
        match encoded {
            Ok(n) if n > MAX_VALUE => Err(failed((FailureKind::Failed, format!(
                "its value of type `{}` encodes to {n} bytes, over the {MAX_VALUE} byte limit of one frame",
                value.type_name()
            )))),
            Ok(n) => Ok(Stored {
                value,
                nbytes: n as u64,
            }),
            Err(e) => Err(failed(e)),
        }
    });
    Done {
        id,
        key,
        function,
        outcome,
        duration_ns,
        inline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::state::Compute;
    use rask_executor::{Op, OpError, Value, WireError, WireTask};

    /// Busy for 20 µs: fast, yet 40 of them overrun one turn's budget.
    struct Spin;
    impl Op for Spin {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            let start = Instant::now();
            while start.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            }
            Ok(Arc::new(0i64))
        }
        fn name(&self) -> &str {
            "spin"
        }
    }

    struct Reg;
    impl Registry for Reg {
        fn resolve(&self, _: &WireTask) -> Result<Arc<dyn Op>, WireError> {
            Ok(Arc::new(Spin))
        }
    }

    fn done(function: &str, micros: u64) -> Done {
        Done {
            id: 0,
            key: [0; 32],
            function: function.into(),
            outcome: Ok(Stored {
                value: Arc::new(0i64),
                nbytes: 1,
            }),
            duration_ns: micros * 1000,
            inline: None,
        }
    }

    #[test]
    fn a_function_is_fast_after_a_streak_of_short_runs_until_a_long_one() {
        let mut speeds = Speeds::default();
        for _ in 1..FAST_STREAK {
            speeds.record(&done("f", 1));
        }
        assert!(!speeds.is_fast("f"));
        speeds.record(&done("f", 1));
        assert!(speeds.is_fast("f"));
        assert!(!speeds.is_fast("g"));
        speeds.record(&done("f", 60));
        assert!(!speeds.is_fast("f"));
        for _ in 0..FAST_STREAK {
            speeds.record(&done("f", 1));
        }
        assert!(speeds.is_fast("f"));
    }

    fn spin(k: usize) -> Compute {
        Compute {
            key: [k as u8; 32],
            name: "spin".into(),
            function: "spin".into(),
            payload: Arc::from(&[][..]),
            deps: Vec::new(),
            who_has: Vec::new(),
            priority: k as u64,
            timeout: None,
            retries: 0,
        }
    }

    #[test]
    fn one_turn_runs_fast_jobs_within_its_budget_and_leaves_the_rest_to_the_pool() {
        const JOBS: usize = 40;
        let mut state = WorkerState::new(WorkerId(0), Arc::new(Reg), Store::default());
        let mut out = Out::default();
        for k in 0..JOBS {
            state.on_compute(spin(k), &mut out);
        }
        assert_eq!(out.jobs.len(), JOBS);
        let mut speeds = Speeds::default();
        // Not known to be fast yet: everything goes to the pool.
        assert_eq!(run_fast_jobs(&mut out, &mut state, &mut speeds).len(), JOBS);
        for _ in 0..FAST_STREAK {
            speeds.record(&done("spin", 1));
        }
        for k in 0..JOBS {
            state.on_compute(spin(JOBS + k), &mut out);
        }
        let to_pool = run_fast_jobs(&mut out, &mut state, &mut speeds);
        // 40 × 20 µs is over the 500 µs budget: some ran here, not all.
        assert!(
            !to_pool.is_empty() && to_pool.len() < JOBS,
            "{}",
            to_pool.len()
        );
        // Those that ran here are finished in the state.
        assert_eq!(state.pending(), JOBS + to_pool.len());
        assert!(out.jobs.is_empty());
    }
}
