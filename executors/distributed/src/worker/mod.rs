//! The worker: runs tasks on its own threads, keeps their values, serves them
//! to peers and clients on its data port.
//!
//! A worker is a library entry point: it runs inside the user's own binary
//! (started in worker mode), because only that binary has the user's
//! functions in its [`rask_executor::Registry`].
//!
//! Rules:
//!
//! 1. **The worker outlives its scheduler by its death timeout.** It
//!    registers with the scheduler at one address, trying again while
//!    nothing answers there (refused, timed out, closed: `connect::retried`
//!    says which failures are worth it) every 100 ms at first, doubling up
//!    to every 2 s, for up to [`Options::death_timeout`] (60 s by default)
//!    from its first attempt. A scheduler connection lasts until it closes
//!    or fails, the scheduler breaks the protocol (then [`run`] returns
//!    [`Error::Protocol`]), or [`WorkerHandle::stop`]. When it closes or
//!    fails, everything the worker held for it goes: its values, its queued
//!    tasks and its running ones, released as by `Release` (state rule 3;
//!    rule 10 replaces threads stuck in them). Its data port stays up
//!    (rule 4) and answers `Missing` for what went. The worker then
//!    registers again in the same way, within the death timeout counted
//!    from the loss, as a new worker with the id the scheduler gives it: a
//!    restarted scheduler knows nothing of the old values and computes
//!    again whatever it needs. Only when the death timeout passes without a
//!    registration does [`run`] return, `Ok(())` (or the error of an
//!    attempt refused for a reason time does not change, such as another
//!    protocol version). A zero death timeout means one attempt at the
//!    start and none after a loss: the worker ends with its scheduler, as
//!    a [`LocalCluster`](crate::LocalCluster)'s do. The runtime, the pool,
//!    the watchdog and the data port (with its handshakes' thread, rule 13)
//!    last the worker's whole life, across connections; when the worker
//!    ends, the handshakes' thread is stopped and joined, closing the data
//!    port, before [`run`] returns or [`WorkerHandle::stop`] does.
//! 2. One thread at a time, the *network thread*, drives the worker's tokio
//!    runtime: all networking and the dispatch of jobs, save the data
//!    port's accepting and handshakes (rule 13). Ops run on
//!    `threads` plain compute threads, so a long op never delays a data
//!    transfer or a report (but see rule 5 for ops known to be short).
//! 3. Reports to the scheduler are batched: everything that finished while
//!    the network thread was busy goes out in one frame.
//! 4. The data port listens on the address the worker used to reach its
//!    scheduler (port chosen by the OS): the one interface other machines of
//!    the cluster are known to route to. It is bound by the first
//!    connection and kept for the next ones (rule 1), which announce the
//!    same address.
//! 5. A job whose function's last 4 runs on this worker (`FAST_STREAK`)
//!    each took under 50 µs (`FAST_OP`) runs on the network thread itself,
//!    right after it is dispatched: for a tiny task, the hand-off to a
//!    compute thread and back costs more than the task. The network thread
//!    runs such jobs outside the runtime, one at a time, with the worker's
//!    state unlocked while each runs (rule 9); it does so for at most
//!    500 µs a turn (`INLINE_TURN`) and hands the rest to the pool. A run
//!    over 50 µs sends its function back to the pool until it has been fast
//!    4 times in a row again, so a function that turns slow delays the
//!    network thread once, by that one run, and by at most `INLINE_STUCK`
//!    (rule 9).
//! 6. The worker sends a heartbeat as often as its scheduler asked
//!    (`ToWorker::Heartbeat`), so a hung worker (or one whose machine became
//!    unreachable) is told from a busy one: a long task on a compute thread
//!    never delays it, a short one on the network thread (rule 5) barely,
//!    and a task that hangs there by `INLINE_STUCK` at most (rule 9).
//! 7. Tasks print to the stdout and stderr the worker process was started
//!    with. Stdout is flushed before each batch of reports is sent, so what
//!    a task printed, even a `print!` without a newline, is written before
//!    its result can reach a client (flushing an empty buffer costs no
//!    system call).
//! 8. A worker announces its program's build ([`BuildId::current`]) to the
//!    scheduler, which gives it tasks of that build only, and its data port
//!    serves only readers of that build: a peer announcing another is
//!    closed with a logged reason.
//! 9. **Hand-off.** A watchdog thread looks every 10 ms (`watchdog::TICK`).
//!    When the network thread has been in one job of rule 5 for 20 ms
//!    (`INLINE_STUCK`, 400 times `FAST_OP`), the watchdog starts another
//!    thread, which becomes the network thread: the runtime, left by the
//!    old one, is driven from the new one (a current-thread runtime can be,
//!    once nobody is inside `block_on`). The job's function goes back to
//!    the pool. When the job returns, the old thread sees it was replaced
//!    (its `watchdog::Slot` says so), hands its report over as a compute
//!    thread would and exits. So a hang on the network thread never takes
//!    the worker out: heartbeats, reports and the data port carry on.
//!    [`run`] waits on a channel for whichever thread ends the worker.
//! 10. **Replacement.** A compute thread whose task was released (its
//!     `cancelled` flag set, state rule 3) and that is still in it when the
//!     watchdog looks is retired, and a new compute thread starts at once:
//!     the worker keeps the `threads` working threads it announced, which
//!     the scheduler's window counts on. A retired thread takes no new job
//!     and exits when its task returns; the late result is dropped (state
//!     rule 3). At most `threads` threads are retired at a time: beyond
//!     that, the worker runs on fewer threads until one returns, and a task
//!     still stuck after the grace makes it unhealthy (rule 11).
//! 11. **Grace.** A thread still in a released task (on the pool, or a
//!     former network thread) [`Options::grace`] after the watchdog saw the
//!     release, or a task abandoned at its timeout
//!     ([`rask_executor::abandoned`], counted per process) still running
//!     `grace` after, makes the worker *unhealthy*: it logs one warning
//!     (`worker 3: unhealthy: task foo-1a2b3c4d
//!     ignored its cancellation for 30 s`). A worker run by a supervisor
//!     ([`Options::supervised`], which [`LocalCluster`](crate::LocalCluster)
//!     sets) then exits its process with [`RESTART_EXIT_CODE`](crate::RESTART_EXIT_CODE), and the
//!     supervisor starts it again; any other worker goes on with its
//!     replacement threads.
//! 12. **Authentication.** A worker proves its [`Options::auth`] to its
//!     scheduler, requires the same of every reader of its data port, and
//!     proves it to the data ports of its peers (`auth.rs` rules): a reader
//!     that does not prove the cluster's token gets the data port's hello
//!     and nothing else, not one value. A worker without a token that was
//!     not told the cluster is insecure does not start
//!     ([`Error::NoToken`]); one its scheduler refuses ([`Error::Auth`])
//!     does not try again (rule 1), time does not change a token.
//! 13. **Limits** (`net` rules 5 to 10). The worker's connections, to its
//!     scheduler, to other data ports and on its own, share one budget for
//!     big frames (1 GiB) and the stall timeout (30 s). Every frame read
//!     from the scheduler or a peer's data port holds from that budget
//!     what its messages take decoded until the network loop handled them
//!     (`net` rule 8): the scheduler's until the turn after it was read,
//!     a peer's answer until it was stored. A frame waiting for room keeps
//!     its place while the loop goes on with the rest; one that would take
//!     more than the whole budget closes its connection (the scheduler's
//!     ends the worker, as any protocol error does, rule 1), and a lost
//!     scheduler connection lets go of all it held (`Io::lost`) before
//!     the worker reaches its scheduler again. The data port takes
//!     connections as the scheduler does (pre-auth only the handshake, for
//!     10 s; at most 256 pre-auth; capped from half the open-file limit,
//!     the rest being the worker's and its tasks'). Like the scheduler's
//!     (its rule 8), it accepts them and takes them through their
//!     handshakes (TLS's, then the token's) on a thread of its own,
//!     `rask-handshake`, never the network thread: what a process that can
//!     reach the port but has not authenticated makes the worker compute
//!     (a TLS key exchange and signature, the token's proofs) can hold up
//!     other handshakes, not heartbeats, dispatch or reports (rules 2 and
//!     6). A reader of another build (rule 8) is closed there too; an
//!     authenticated one moves to the network thread (`net` rule 12) and
//!     is served there. Its requests are small frames (at most 64 KiB;
//!     requesters send at most 1 024 keys per `GetData`), read with no
//!     grant from the worker's frame budget (`net::Limits::requests`), so
//!     a reader that takes its answers slowly holds nothing other frames
//!     wait for; what a frame's requests take decoded is held, while they
//!     are answered, from a budget of the connection's own (128 KiB), and
//!     a frame of requests that takes more, or a bigger request frame,
//!     closes the connection. The data
//!     port answers a `GetData` one value at a time, waiting while more than 64 MiB wait to be sent
//!     to the reader (so a reader that stops reading holds at most that and
//!     one value, and is closed once it reads nothing for the stall
//!     timeout), and closes a connection with nothing in flight either way
//!     for [`DATA_IDLE`] (readers close theirs after 30 s idle and connect
//!     again when they need to). Every line a peer can make it log is
//!     rate-limited.
//! 14. **Memory** (`memory` rules). With [`Options::memory_limit`], the
//!     worker spills its least recently used values to disk above 60 % of
//!     the limit ([`SPILL_AT`]) and reads them back when a task or a reader
//!     needs them; above 95 % ([`PAUSE_AT`]) it holds back new tasks
//!     (`state` rule 6) until spilling brings it below. It sends what it
//!     holds and spilled with each heartbeat (`ToScheduler::Memory`), which
//!     `scheduler_info` shows, and at once when it pauses or resumes: the
//!     scheduler sends a paused worker no task and may move its queued
//!     ones away (scheduler rule S17).
//! 15. **Nested computation.** Every thread that runs tasks knows the
//!     worker's cluster (`nested` rules): a task that computes a graph
//!     itself computes it there. While such a task waits
//!     (`rask_executor::blocking`), its compute thread *secedes*: it stops
//!     counting towards `threads`, and the pool starts a thread in its
//!     place, so as many tasks as the worker announced keep running and
//!     the tasks it waits for find a thread, on a worker of one thread
//!     too. When the wait ends it *rejoins*; the next thread between jobs
//!     leaves, so the worker is over its count for at most one task's end
//!     per rejoin (Dask's `rejoin` waits for that instead; running on
//!     cannot deadlock). A seceded task is no hung one: the watchdog acts
//!     on it only once it is released (rule 10), and then starts no thread
//!     for it, one took its place already.
//! 16. **Values' drops.** A value's `Drop` is user code, and a worker lets
//!     values go on every one of its threads: a released or replaced value
//!     (network thread), the inputs of a job that ran or never will (a
//!     compute thread, or whichever thread drops the job), a report
//!     nobody takes (the task was released while it ran, or the worker
//!     ended), a value the spill thread or the data port held while it
//!     was released. Each goes through `rask_executor::drop_quietly`, the
//!     store's outside the store's lock: a panic there is a logged
//!     warning naming the key, never the end of a thread, so the worker,
//!     its reports and its `threads` compute threads go on, and no task's
//!     outcome changes.
//! 17. **Leaving on `SIGTERM`.** A worker process ([`run`], [`run_with`]:
//!     a program in worker mode) handles `SIGTERM`, what supervisors
//!     (systemd, Kubernetes, Slurm) send to stop a process: it asks its
//!     scheduler to retire it (`ToScheduler::Leaving`, scheduler rule
//!     S16a), as [`Client::retire_workers`](crate::Client::retire_workers)
//!     would: it gets no new task, finishes those it runs, the values only
//!     it holds are copied to workers that stay, then the scheduler tells
//!     it to exit and it returns `Ok` (the process exits 0). Nothing runs
//!     twice. The last worker of a cluster leaves at once (nobody would
//!     take its values). A second `SIGTERM` stops it at once, as does a
//!     lost scheduler while it leaves; its values are then computed again
//!     when wanted, as a killed worker's are. `SIGINT` (Ctrl-C, sent to a
//!     terminal's whole process group, a program's local workers with it)
//!     keeps its default: the process ends at once. A worker of
//!     [`spawn`] runs in a program that is not the worker's: it leaves
//!     signals to that program. So do the workers of a
//!     [`LocalCluster`](crate::LocalCluster) ([`LEAVE_ON_SIGTERM_ENV`]
//!     `0`, [`Options::leave_on_sigterm`]): their program owns their lives,
//!     and a `SIGTERM` sent to its whole group (`kill -TERM -PGID`, a
//!     service manager stopping it) ends them at once, as before, rather
//!     than retiring every one while the program may still want them; the
//!     cluster starts one that ended so again.

mod connect;
mod memory;
mod pool;
mod state;
mod watchdog;

pub(crate) use memory::remove_spill_dirs;
pub use memory::{machine_memory, PAUSE_AT, SPILL_AT};

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rask_executor::{
    drop_quietly, panic_message, run_task, Encoded, FailureKind, Key, PlanBuilder, Registry, Stop,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::net::{self, log_limited, Chain, Fetched, FrameReader, PeerPool, Reader};
use crate::protocol::valid_worker_name;
use crate::protocol::Scheme;
use crate::protocol::{
    duration_ns_of, parse_address, Batch, FromPeer, FromPeerRef, ProtocolError, Role, ToPeer,
    ToScheduler, ToWorker, WireKey, WorkerId, INLINE_BYTES, MAX_FRAME, MAX_TASK_DURATION,
    MAX_THREADS,
};
use crate::tls::Acceptor;
use crate::{
    Auth, BuildId, Error, Tls, Token, DEATH_TIMEOUT_ENV, GRACE_ENV, LEAVE_ON_SIGTERM_ENV,
    MEMORY_LIMIT_ENV, RESOURCES_ENV, SPILL_DIR_ENV, SUPERVISED_ENV, WORKER_NAME_ENV,
    WORKER_THREADS_ENV,
};
use connect::{Connection, Link};
use memory::{Found, Store, Stored};
use pool::Pool;
use state::{Compute, Done, Job, Outbox, WorkerState};
use watchdog::{Running, Seconds, Slot};

/// The largest value a worker keeps: one that still fits a frame.
const MAX_VALUE: usize = MAX_FRAME - 1024;

/// A run shorter than this is fast (rule 5).
const FAST_OP: Duration = Duration::from_micros(50);

/// How many fast runs in a row make a function run on the network thread
/// (rule 5).
const FAST_STREAK: u32 = 4;

/// The longest the network thread runs jobs itself in one turn (rule 5).
const INLINE_TURN: Duration = Duration::from_micros(500);

/// How long a data connection with nothing in flight either way stays open
/// (rule 13): two minutes, four times as long as a reader keeps one, so
/// only a connection its reader forgot or abandoned reaches it.
pub const DATA_IDLE: Duration = Duration::from_secs(120);

/// How long a thread may stay in a released or timed-out task before its
/// worker is unhealthy, unless [`Options::grace`] says otherwise (rule 11).
pub const GRACE: Duration = Duration::from_secs(30);

/// How long a worker tries to reach its scheduler, when it starts and after
/// losing it, unless [`Options::death_timeout`] says otherwise (rule 1).
pub const DEATH_TIMEOUT: Duration = Duration::from_secs(60);

/// How a worker runs.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rask_distributed::worker::Options;
/// let options = Options::default().threads(4).grace(Duration::from_secs(5));
/// assert_eq!(options.threads, 4);
/// assert!(!options.supervised);
/// // Exit at once when the scheduler goes away, as a local cluster's do.
/// let options = options.death_timeout(Duration::ZERO);
/// assert!(options.death_timeout.is_zero());
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
#[must_use = "options do nothing until they are passed to `run_with` or `spawn_with`"]
pub struct Options {
    /// Tasks run at once: at least one, at most [`MAX_THREADS`] (more is
    /// taken as that). Default 1.
    pub threads: usize,
    /// How long a thread may stay in a task after its cancellation, or
    /// after its timeout, before the worker is unhealthy (rule 11). Default
    /// [`GRACE`], 30 s.
    pub grace: Duration,
    /// Whether a supervisor restarts this worker's process: an unhealthy
    /// worker then exits the process with [`RESTART_EXIT_CODE`](crate::RESTART_EXIT_CODE) (rule 11).
    /// Default `false`.
    pub supervised: bool,
    /// Whether a worker process ([`run`], [`run_with`]) leaves without
    /// loss on `SIGTERM` (rule 17); `false` keeps the signal's default,
    /// ending the process at once. A worker of [`spawn`] leaves signals to
    /// its program either way. Default `true`; [`Options::from_env`]
    /// reads [`LEAVE_ON_SIGTERM_ENV`] (a [`LocalCluster`](crate::LocalCluster)
    /// sets it to `0`).
    pub leave_on_sigterm: bool,
    /// How long the worker tries to reach its scheduler before it gives up
    /// (rule 1): when it starts, counted from its first attempt, and after
    /// losing the scheduler, counted from the loss. It retries a scheduler
    /// that cannot be reached (connection refused, timed out, closed)
    /// every 100 ms at first, doubling up to every 2 s. Zero: one attempt
    /// when it starts, and none after a loss, so the worker ends with its
    /// scheduler (a [`LocalCluster`](crate::LocalCluster)'s workers run so,
    /// their scheduler being in the program's own process). Default
    /// [`DEATH_TIMEOUT`], 60 s.
    pub death_timeout: Duration,
    /// What the worker proves to its scheduler and requires of its data
    /// port's readers (rule 12). Default `None`: the worker does not start
    /// ([`Error::NoToken`]); [`Options::from_env`] finds one as
    /// [`Auth::from_env`] says.
    pub auth: Option<Auth>,
    /// How the worker reaches a `tls://` scheduler and serves its data
    /// port then (`tls.rs` rules): the CA that signed the scheduler's
    /// certificate, and the worker's own certificate, which its data port
    /// presents (it must name the worker's IP address as the scheduler
    /// connection sees it) and which it shows the scheduler when asked
    /// (mutual TLS). Not used with a `tcp://` address. Default `None`;
    /// [`Options::from_env`] reads it as [`Tls::from_env`] says.
    pub tls: Option<Tls>,
    /// The memory limit, in bytes (rule 14): above [`SPILL_AT`] of it the
    /// worker spills least recently used values to disk, above
    /// [`PAUSE_AT`] it starts no new task. What counts is the encoded size
    /// of the values it holds, not the process's resident memory (`memory`
    /// rule 1). Default `None`: no limit ([`Options::from_env`] reads
    /// [`MEMORY_LIMIT_ENV`]; a [`LocalCluster`](crate::LocalCluster) gives
    /// each worker a share of the machine).
    pub memory_limit: Option<u64>,
    /// Where the worker makes its spill directory, `rask-spill-PID-RANDOM`,
    /// removed when the worker ends (`memory` rule 3). Default `None`: the system's
    /// temporary directory ([`Options::from_env`] reads [`SPILL_DIR_ENV`]).
    pub spill_dir: Option<std::path::PathBuf>,
    /// What the worker has for tasks that ask for resources
    /// (`Delayed::resources`): the scheduler sends it a task only while the
    /// tasks it runs leave enough of each. Default none; [`Options::from_env`]
    /// reads [`RESOURCES_ENV`] with [`parse_resources`].
    pub resources: rask_executor::Resources,
    /// The worker's name, unique among its scheduler's workers: shown by
    /// `scheduler_info`, the dashboard and log lines, and what
    /// [`Client::retire_workers`](crate::Client::retire_workers) takes.
    /// Default `None`: `host-pid` ([`default_name`]).
    pub name: Option<String>,
}

/// Parses a worker's resources as `--resources` and [`RESOURCES_ENV`]
/// give them: `NAME=AMOUNT` entries separated by commas, e.g.
/// `GPU=2,MEM=64e9` (amounts from 0 to 10^15, kept in thousandths).
///
/// # Errors
///
/// [`ResourceError`](rask_executor::ResourceError) naming the first bad
/// entry.
///
/// # Examples
///
/// ```
/// let r = rask_distributed::worker::parse_resources("GPU=2,MEM=64e9")?;
/// assert_eq!(r.get_milli("GPU"), 2000);
/// # Ok::<(), rask_executor::ResourceError>(())
/// ```
pub fn parse_resources(
    text: &str,
) -> Result<rask_executor::Resources, rask_executor::ResourceError> {
    rask_executor::Resources::parse(text)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: 1,
            grace: GRACE,
            supervised: false,
            leave_on_sigterm: true,
            death_timeout: DEATH_TIMEOUT,
            auth: None,
            tls: None,
            memory_limit: None,
            spill_dir: None,
            resources: rask_executor::Resources::new(),
            name: None,
        }
    }
}

impl Options {
    /// These options with `threads` threads.
    pub fn threads(mut self, threads: usize) -> Options {
        self.threads = threads;
        self
    }

    /// These options with another grace period (rule 11).
    pub fn grace(mut self, grace: Duration) -> Options {
        self.grace = grace;
        self
    }

    /// These options, for a worker whose process a supervisor restarts
    /// (`true`) or not (rule 11).
    pub fn supervised(mut self, supervised: bool) -> Options {
        self.supervised = supervised;
        self
    }

    /// These options with another death timeout (rule 1).
    pub fn death_timeout(mut self, death_timeout: Duration) -> Options {
        self.death_timeout = death_timeout;
        self
    }

    /// These options with a memory limit in bytes, or none (rule 14).
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::worker::Options;
    /// let options = Options::default().memory_limit(Some(200 << 20));
    /// assert_eq!(options.memory_limit, Some(200 << 20));
    /// ```
    pub fn memory_limit(mut self, bytes: Option<u64>) -> Options {
        self.memory_limit = bytes;
        self
    }

    /// These options making the spill directory under `dir` (rule 14).
    pub fn spill_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Options {
        self.spill_dir = Some(dir.into());
        self
    }

    /// These options proving `auth` (rule 12).
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::{worker::Options, Auth, Token};
    /// let options = Options::default().auth(Auth::Token(Token::generate()?));
    /// assert!(options.auth.is_some());
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn auth(mut self, auth: Auth) -> Options {
        self.auth = Some(auth);
        self
    }

    /// These options with these resources (see [`Options::resources`]).
    pub fn resources(mut self, resources: rask_executor::Resources) -> Options {
        self.resources = resources;
        self
    }

    /// These options naming the worker `name` (see [`Options::name`]).
    ///
    /// # Errors
    ///
    /// [`Error::Arg`] for an empty name, one longer than
    /// [`MAX_WORKER_NAME`](crate::protocol::MAX_WORKER_NAME) bytes, or one with whitespace or a control
    /// character.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::worker::Options;
    /// let options = Options::default().name("gpu-1")?;
    /// assert_eq!(options.name.as_deref(), Some("gpu-1"));
    /// assert!(Options::default().name("two words").is_err());
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn name(mut self, name: &str) -> Result<Options, Error> {
        if !valid_worker_name(name) {
            return Err(Error::Arg {
                arg: name.to_owned(),
                problem: NAME_EXPECTED.to_owned(),
            });
        }
        self.name = Some(name.to_owned());
        Ok(self)
    }

    /// The options of a worker process started in worker mode (what
    /// `rask::init` uses): the defaults with one thread per core, then
    /// what the environment sets ([`Options::from_env`],
    /// [`WORKER_THREADS_ENV`], [`WORKER_NAME_ENV`]), then, for a worker
    /// started by hand, its command-line arguments `args` (the program's,
    /// without its name; [`WORKER_USAGE`](crate::WORKER_USAGE)): `--nthreads N` and
    /// `--name NAME` (also `--nthreads=N`), which win over the
    /// environment. A supervised worker ([`SUPERVISED_ENV`], a
    /// [`LocalCluster`](crate::LocalCluster)'s) runs with the arguments of
    /// the program that started the cluster, which are that program's own:
    /// they are not read, and its threads come from [`WORKER_THREADS_ENV`]
    /// as the cluster set it.
    ///
    /// # Errors
    ///
    /// As [`Options::from_env`], [`Error::Env`] for a bad
    /// [`WORKER_THREADS_ENV`] or [`WORKER_NAME_ENV`], and [`Error::Arg`] for
    /// an argument that is not one of those or a bad value.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// // RASK_WORKER=tcp://host:8786 ./my-app --nthreads 4 --name gpu-1
    /// let args = std::env::args_os().skip(1);
    /// let options = rask_distributed::worker::Options::from_process(args)?;
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn from_process(
        args: impl IntoIterator<Item = std::ffi::OsString>,
    ) -> Result<Options, Error> {
        let mut options = Options::from_env()?;
        if std::env::var_os(WORKER_THREADS_ENV).is_none() {
            options.threads = cores();
        }
        if options.supervised {
            return Ok(options);
        }
        options.with_args(args)
    }

    /// These options with the command-line arguments `args` of a worker
    /// started by hand ([`Options::from_process`]).
    fn with_args(
        mut self,
        args: impl IntoIterator<Item = std::ffi::OsString>,
    ) -> Result<Options, Error> {
        let mut args = args.into_iter().map(|a| a.to_string_lossy().into_owned());
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg.clone(), None),
            };
            let problem = |problem: &str| Error::Arg {
                arg: arg.clone(),
                problem: problem.to_owned(),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| problem("needs a value"))
            };
            match flag.as_str() {
                "--nthreads" => {
                    let text = value()?;
                    self.threads = parse_threads(&text).ok_or_else(|| Error::Arg {
                        arg: format!("{flag} {text}"),
                        problem: format!("expected {THREADS_EXPECTED}"),
                    })?;
                }
                "--name" => {
                    let text = value()?;
                    self = self.name(&text)?;
                }
                "--resources" => {
                    let text = value()?;
                    self.resources = parse_resources(&text).map_err(|e| Error::Arg {
                        arg: format!("{flag} {text}"),
                        problem: e.to_string(),
                    })?;
                }
                "--memory-limit" => {
                    let text = value()?;
                    self.memory_limit =
                        memory::parse_limit(&text, machine_memory).map_err(|expected| {
                            Error::Arg {
                                arg: format!("{flag} {text}"),
                                problem: format!("expected {expected}"),
                            }
                        })?;
                }
                _ => return Err(problem("not a worker option")),
            }
        }
        Ok(self)
    }

    /// These options with TLS settings (see [`Options::tls`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use rask_distributed::{worker::Options, Tls};
    /// let tls = Tls::new()
    ///     .trust("ca.pem".as_ref())?
    ///     .identity("worker.pem".as_ref(), "worker.key".as_ref())?;
    /// let options = Options::default().tls(tls);
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn tls(mut self, tls: Tls) -> Options {
        self.tls = Some(tls);
        self
    }

    /// The defaults, with what the environment sets: [`GRACE_ENV`] (a
    /// grace period in seconds, `2.5` allowed), [`DEATH_TIMEOUT_ENV`] (a
    /// death timeout in seconds, `2.5` allowed, `0` not to wait),
    /// [`SUPERVISED_ENV`] (`1` when a supervisor restarts this process, `0`
    /// or unset when not), [`LEAVE_ON_SIGTERM_ENV`] (`0` to end at once on
    /// `SIGTERM`, `1` or unset to leave without loss), [`MEMORY_LIMIT_ENV`] (`200MiB`, `2GB`, `0.5` of
    /// the machine's memory, `auto` for all of it, `none` or `0` for no
    /// limit), [`SPILL_DIR_ENV`] (a directory), the token or its absence as
    /// [`Auth::from_env`] finds it, and the TLS settings as
    /// [`Tls::from_env`] finds them.
    ///
    /// # Errors
    ///
    /// [`Error::Env`] for a value that is not one of those; as
    /// [`Auth::from_env`] for the token, as [`Tls::from_env`] for TLS.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// // None of the variables is set here.
    /// let options = rask_distributed::worker::Options::from_env()?;
    /// assert_eq!(options.grace, rask_distributed::worker::GRACE);
    /// assert_eq!(options.death_timeout, rask_distributed::worker::DEATH_TIMEOUT);
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn from_env() -> Result<Options, Error> {
        let mut options = Options::default().with_env(|name| std::env::var_os(name))?;
        options.tls = Tls::from_env()?;
        Ok(options)
    }

    /// [`Options::from_env`] with the variables `var` gives.
    fn with_env(
        mut self,
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Options, Error> {
        let invalid =
            |name: &'static str, value: &std::ffi::OsStr, expected: &'static str| Error::Env {
                name,
                value: value.to_string_lossy().into_owned(),
                expected,
            };
        // Negative, infinite and NaN seconds are no duration.
        let seconds = |name: &'static str| -> Result<Option<Duration>, Error> {
            let Some(value) = var(name) else {
                return Ok(None);
            };
            value
                .to_str()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map(Some)
                .ok_or_else(|| invalid(name, &value, "a number of seconds"))
        };
        if let Some(grace) = seconds(GRACE_ENV)? {
            self.grace = grace;
        }
        if let Some(death_timeout) = seconds(DEATH_TIMEOUT_ENV)? {
            self.death_timeout = death_timeout;
        }
        let switch = |name: &'static str| -> Result<Option<bool>, Error> {
            let Some(value) = var(name) else {
                return Ok(None);
            };
            match value.to_str().map(str::trim) {
                Some("1") => Ok(Some(true)),
                Some("0") | Some("") => Ok(Some(false)),
                _ => Err(invalid(name, &value, "`1` or `0`")),
            }
        };
        if let Some(supervised) = switch(SUPERVISED_ENV)? {
            self.supervised = supervised;
        }
        if let Some(leave) = switch(LEAVE_ON_SIGTERM_ENV)? {
            self.leave_on_sigterm = leave;
        }
        if let Some(value) = var(MEMORY_LIMIT_ENV) {
            let text = value.to_string_lossy();
            self.memory_limit = memory::parse_limit(&text, machine_memory)
                .map_err(|expected| invalid(MEMORY_LIMIT_ENV, &value, expected))?;
        }
        if let Some(dir) = var(SPILL_DIR_ENV).filter(|d| !d.is_empty()) {
            self.spill_dir = Some(dir.into());
        }
        if let Some(value) = var(RESOURCES_ENV) {
            self.resources = value
                .to_str()
                .and_then(|v| parse_resources(v).ok())
                .ok_or_else(|| {
                    invalid(
                        RESOURCES_ENV,
                        &value,
                        "NAME=AMOUNT[,NAME=AMOUNT…], e.g. GPU=2,MEM=64e9",
                    )
                })?;
        }
        if let Some(auth) = Auth::with_env(&var)? {
            self.auth = Some(auth);
        }
        if let Some(value) = var(WORKER_THREADS_ENV) {
            self.threads = value
                .to_str()
                .and_then(parse_threads)
                .ok_or_else(|| invalid(WORKER_THREADS_ENV, &value, THREADS_EXPECTED))?;
        }
        if let Some(value) = var(WORKER_NAME_ENV) {
            match value.to_str() {
                Some(name) if valid_worker_name(name) => self.name = Some(name.to_owned()),
                _ => return Err(invalid(WORKER_NAME_ENV, &value, NAME_EXPECTED)),
            }
        }
        Ok(self)
    }
}

/// What a thread count must be, for errors (here and for
/// `RASK_WORKER_THREADS` of a local cluster).
pub const THREADS_EXPECTED: &str = "a whole number of threads from 1 to 4096";

/// What a worker name must be, for errors.
const NAME_EXPECTED: &str = "a worker name: 1 to 255 bytes, no whitespace or control characters";

/// The thread count `text` names, if it is one: 1 to [`MAX_THREADS`].
pub fn parse_threads(text: &str) -> Option<usize> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| (1..=MAX_THREADS as usize).contains(&n))
}

/// The machine's cores, as the OS lets this process use them (at least 1).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The name of a worker that was given none: `host-pid`, the host's name
/// as the kernel has it (`localhost` if unknown), so that workers of one
/// machine differ and a worker is found with `ps` from its name. A process
/// running several workers (tests) names its second one `host-pid-2`, and
/// so on.
pub fn default_name() -> String {
    static STARTED: AtomicU32 = AtomicU32::new(0);
    let nth = STARTED.fetch_add(1, Ordering::Relaxed) + 1;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    // Whatever the host's name holds, the result is a valid name.
    let mut host: String = host
        .chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    while host.len() > 200 {
        host.pop();
    }
    match nth {
        1 => format!("{host}-{}", std::process::id()),
        n => format!("{host}-{}-{n}", std::process::id()),
    }
}

/// Runs a worker until its scheduler is gone for its death timeout (then
/// returns `Ok`, rule 1), registering with it again each time it comes
/// back; the calling thread waits for it, its network runs on threads of
/// its own (rule 9). The process's `SIGTERM` makes it leave without loss:
/// its scheduler retires it, then it returns `Ok` (rule 17); a second
/// `SIGTERM` stops it at once.
///
/// `scheduler` is `tcp://host:port` or `host:port`; `threads` is the number
/// of tasks run at once (at least one, at most [`MAX_THREADS`]: more is
/// taken as that). The other [`Options`] come from the environment
/// ([`Options::from_env`]): a [`LocalCluster`](crate::LocalCluster) sets
/// [`SUPERVISED_ENV`] and a [`DEATH_TIMEOUT_ENV`] of 0, [`GRACE_ENV`] sets
/// the grace period.
///
/// # Errors
///
/// [`Error::Env`] for a malformed [`GRACE_ENV`], [`DEATH_TIMEOUT_ENV`] or
/// [`SUPERVISED_ENV`], errors of [`Auth::from_env`] for the token;
/// otherwise as [`run_with`].
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
    run_with(scheduler, registry, Options::from_env()?.threads(threads))
}

/// [`run`] with `options`, and no look at the environment; `SIGTERM` as
/// [`run`] handles it (rule 17).
///
/// # Errors
///
/// [`Error::NoToken`] when `options` has no [`Options::auth`];
/// [`Error::Auth`] at once if the scheduler refuses the worker's token or
/// its lack of one (rule 12); [`Error::Address`] for a malformed address; [`Error::Connection`],
/// [`Error::Timeout`] or [`Error::Handshake`] if the scheduler cannot be
/// reached when the worker starts, within its death timeout (rule 1; the
/// last attempt's error); [`Error::Handshake`] at once, when it starts or
/// after a loss, if what answers at the address is not a rask scheduler of
/// this version; [`Error::Protocol`] if the scheduler breaks the protocol
/// (a malformed message, or a number out of its range such as a heartbeat
/// interval over an hour); [`Error::Io`] if the worker's threads or its
/// data port cannot be started.
///
/// # Panics
///
/// If the worker's network thread panicked (a bug of this crate).
///
/// # Examples
///
/// ```no_run
/// # fn registry() -> std::sync::Arc<dyn rask_executor::Registry> { unimplemented!() }
/// use rask_distributed::worker::{self, Options};
/// use rask_distributed::{Auth, Token};
/// let token = Token::load("/etc/rask/token".as_ref())?;
/// let options = Options::default().threads(2).auth(Auth::Token(token));
/// worker::run_with("tcp://127.0.0.1:8786", registry(), options)?;
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn run_with(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    options: Options,
) -> Result<(), Error> {
    let limits = net::Limits::standard();
    let leave_on_sigterm = options.leave_on_sigterm;
    let started = start(
        scheduler,
        registry,
        options,
        BuildId::current(),
        (None, leave_on_sigterm),
        limits,
    )?;
    let ending = started.ending.recv();
    let _ = started.watchdog.join();
    match ending {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        // The thread that ended the worker could not say how: it went.
        Err(_) => Ok(()),
    }
}

/// How a worker ended: its result, or the panic of its network thread.
type Ending = std::thread::Result<Result<(), Error>>;

/// A worker running on background threads of this process (tests).
///
/// [`WorkerHandle::stop`] (and dropping the handle) stops it abruptly: its
/// connections are dropped as a crash would drop them. Until then it runs
/// as [`run`] would, reconnecting to its scheduler within its
/// [`Options::death_timeout`] (rule 1).
pub struct WorkerHandle {
    /// The id of its latest registration, updated by the worker.
    id: Arc<AtomicU32>,
    data_address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    // In a mutex only to make the handle `Sync`.
    ending: Mutex<std::sync::mpsc::Receiver<Ending>>,
    /// Ends last, after every socket closed.
    watchdog: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// The address of the worker's data port.
    pub fn data_address(&self) -> SocketAddr {
        self.data_address
    }

    /// The id the scheduler gave the worker at its latest registration: a
    /// worker that registered again after losing its scheduler has the id
    /// the new connection was given (rule 1).
    pub fn id(&self) -> u32 {
        self.id.load(Ordering::Acquire)
    }

    /// Whether the worker stopped: its scheduler stayed away for its death
    /// timeout, it broke the protocol, or `stop`.
    pub fn is_finished(&self) -> bool {
        self.watchdog.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the worker at once, closing its connections without notice, as
    /// if its process had been killed. Tasks running on its threads finish in
    /// the background and their results are dropped.
    pub fn stop(mut self) {
        self.halt();
    }

    /// Waits until the worker stops by itself (when its scheduler stayed
    /// away for its death timeout, rule 1) and returns how it ended.
    ///
    /// # Errors
    ///
    /// What [`run`] would have returned.
    pub fn join(mut self) -> Result<(), Error> {
        // Dropping the sender (not sending) lets the worker run on.
        self.stop = None;
        self.wait()
    }

    fn wait(&mut self) -> Result<(), Error> {
        let Some(watchdog) = self.watchdog.take() else {
            return Ok(());
        };
        let ending = locked(&self.ending).recv();
        let _ = watchdog.join();
        match ending {
            Ok(Ok(result)) => result,
            _ => Ok(()),
        }
    }

    fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.wait();
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
            .field("id", &self.id())
            .field("data_address", &self.data_address)
            .finish()
    }
}

/// Starts a worker on background threads; returns once the scheduler
/// registered it. A scheduler that cannot be reached yet is waited for, as
/// [`run`] waits for it: for up to the death timeout (rule 1). The token
/// comes from the environment, as [`Auth::from_env`] finds it; the other
/// options are the defaults with `threads`.
///
/// # Errors
///
/// As [`run_with`], for the connection and registration; as
/// [`Auth::from_env`] for the token.
///
/// # Examples
///
/// ```no_run
/// # fn registry() -> std::sync::Arc<dyn rask_executor::Registry> { unimplemented!() }
/// // `RASK_TOKEN` holds the scheduler's token.
/// let worker = rask_distributed::worker::spawn("tcp://127.0.0.1:8786", registry(), 1)?;
/// worker.stop(); // as if killed
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn spawn(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    threads: usize,
) -> Result<WorkerHandle, Error> {
    let mut options = Options::default().threads(threads);
    options.auth = Auth::from_env()?;
    options.tls = Tls::from_env()?;
    spawn_with(scheduler, registry, options)
}

/// [`spawn`] with `options` (a supervised worker exits this process when
/// it is unhealthy, rule 11).
///
/// # Errors
///
/// As [`spawn`].
///
/// # Examples
///
/// ```no_run
/// # fn registry() -> std::sync::Arc<dyn rask_executor::Registry> { unimplemented!() }
/// use std::time::Duration;
/// use rask_distributed::worker::{self, Options};
/// use rask_distributed::Auth;
/// let scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
/// let address = format!("tcp://{}", scheduler.address());
/// let token = scheduler.token().expect("on by default").clone();
/// let options = Options::default().grace(Duration::from_secs(1)).auth(Auth::Token(token));
/// let worker = worker::spawn_with(&address, registry(), options)?;
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn spawn_with(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    options: Options,
) -> Result<WorkerHandle, Error> {
    spawn_inner(scheduler, registry, options, BuildId::current())
}

/// [`spawn_with`], announcing `build` instead of this process's build:
/// tests run workers of several "programs" in one process this way.
///
/// # Errors
///
/// As [`spawn_with`].
#[doc(hidden)]
pub fn spawn_as(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    options: Options,
    build: BuildId,
) -> Result<WorkerHandle, Error> {
    spawn_inner(scheduler, registry, options, build)
}

fn spawn_inner(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    options: Options,
    build: BuildId,
) -> Result<WorkerHandle, Error> {
    let (stop, stopped) = oneshot::channel();
    let limits = net::Limits::standard();
    let started = start(
        scheduler,
        registry,
        options,
        build,
        (Some(stopped), false),
        limits,
    )?;
    Ok(WorkerHandle {
        id: started.id,
        data_address: started.data_address,
        stop: Some(stop),
        ending: Mutex::new(started.ending),
        watchdog: Some(started.watchdog),
    })
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

/// The worker's state and what its handlers produce: locked by the network
/// thread while it handles messages and reports, never while a job runs
/// (rules 5 and 9).
struct Core {
    state: WorkerState,
    speeds: Speeds,
    out: Out,
    /// Jobs of fast functions, for the network thread (rule 5).
    fast: VecDeque<Job>,
    /// Jobs for the pool, sent at the end of the turn.
    to_pool: Vec<Job>,
    /// The job the network thread runs now, for the watchdog (rule 9).
    inline: Option<Running>,
}

impl Core {
    fn new(state: WorkerState) -> Core {
        Core {
            state,
            speeds: Speeds::default(),
            out: Out::default(),
            fast: VecDeque::new(),
            to_pool: Vec::new(),
            inline: None,
        }
    }

    /// A job's report, from a compute thread or the network thread: its
    /// function's speed is noted (rule 5), then the state takes it.
    fn finished(&mut self, done: Done) {
        self.speeds.record(&done);
        self.state.on_task_done(done, &mut self.out);
    }

    /// Sorts the jobs dispatched since the last look: fast ones for the
    /// network thread, the others for the pool (rule 5).
    fn route(&mut self) {
        for job in self.out.jobs.drain(..) {
            if self.speeds.is_fast(&job.function) {
                self.fast.push_back(job);
            } else {
                self.to_pool.push(job);
            }
        }
    }

    /// The next job for the network thread in a turn that began at
    /// `start`, if its budget allows one (rule 5).
    fn next_fast(&mut self, start: Instant) -> Option<Job> {
        self.route();
        if self.fast.is_empty() || start.elapsed() >= INLINE_TURN {
            return None;
        }
        self.fast.pop_front()
    }

    /// Every job not run yet, for the pool (end of a turn, rule 5).
    fn leftovers(&mut self, into: &mut Vec<Job>) {
        self.route();
        into.append(&mut self.to_pool);
        into.extend(self.fast.drain(..));
    }
}

/// The worker's runtime and connections: only the network thread touches
/// them (rules 2 and 9).
struct Net {
    // Dropped before the runtime they were made in.
    io: Io,
    /// The thread that accepts the data port's connections and takes them
    /// through their handshakes (rule 13). Stopped and joined when dropped,
    /// which closes the data port; before the runtime, so that no
    /// connection comes over while it goes.
    _handshakes: net::Handshakes,
    runtime: tokio::runtime::Runtime,
}

/// What one turn of the network loop reads and writes.
struct Io {
    /// The scheduler connection's reading end; replaced with the rest of
    /// the connection's parts at each registration (rule 1), `None` from
    /// the loss of one until the next ([`Io::lost`]).
    read: Option<FrameReader<Reader>>,
    writer: net::Writer,
    peers: PeerPool,
    fetch_rx: mpsc::UnboundedReceiver<Fetched>,
    /// Rule 6: ticks once the scheduler said how often.
    heartbeat: Option<tokio::time::Interval>,
    /// Kept across connections: reports of the pool, which go on.
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Kept across connections: tasks that seceded (rule 15).
    seceded_rx: mpsc::UnboundedReceiver<(WireKey, u64)>,
    /// Kept across connections: a test's `WorkerHandle::stop`.
    stop: Option<oneshot::Receiver<()>>,
    /// The process's `SIGTERM`s, in a process that is a worker (rule 17).
    term: Option<Term>,
    /// Whether a `SIGTERM` came: the scheduler was asked to retire the
    /// worker (rule 17).
    leaving: bool,
    /// Whether the scheduler is yet to be told (`Leaving`).
    leave_due: bool,
    /// What arrived, for the next turn to handle under one lock.
    messages: Vec<ToWorker>,
    /// What `messages` take decoded, held from the frame budget until the
    /// turn handled them (`net` rule 8).
    grant: Option<net::Grant>,
    done: Vec<Done>,
    fetched: Vec<Fetched>,
    seceded: Vec<(WireKey, u64)>,
    heartbeat_due: bool,
    /// Whether the scheduler was last told this worker is paused (rule 14).
    paused: bool,
    /// Buffers kept from turn to turn.
    fetches: Vec<(WorkerId, WireKey)>,
    to_pool: Vec<Job>,
}

impl Io {
    /// The network loop's parts for its first `connection`.
    fn new(
        connection: Connection,
        (done_rx, seceded_rx): (
            mpsc::UnboundedReceiver<Done>,
            mpsc::UnboundedReceiver<(WireKey, u64)>,
        ),
        stop: Option<oneshot::Receiver<()>>,
        link: &Link,
    ) -> Io {
        let (fetch_tx, fetch_rx) = mpsc::unbounded_channel();
        Io {
            read: Some(connection.read),
            writer: connection.writer,
            peers: PeerPool::new(
                fetch_tx,
                link.build,
                link.auth.clone(),
                link.connector(),
                link.limits.clone(),
            ),
            fetch_rx,
            heartbeat: None,
            done_rx,
            seceded_rx,
            stop,
            messages: connection.first,
            grant: connection.grant,
            done: Vec::new(),
            fetched: Vec::new(),
            seceded: Vec::new(),
            heartbeat_due: false,
            term: None,
            leaving: false,
            leave_due: false,
            paused: false,
            fetches: Vec::new(),
            to_pool: Vec::new(),
        }
    }

    /// Lets go of a lost connection (rule 1), before the worker reaches
    /// its scheduler again: whatever belonged to it goes now, so that none
    /// of it holds the frame budget while the worker waits (`net` rule 8):
    /// its reader (and a frame waiting there for its grant), the messages
    /// read and not handled, with their grant, its peers and their
    /// answers. The peers of the old scheduler go with their answers, on a
    /// channel of their own: the new scheduler numbers its workers afresh,
    /// so an old answer could otherwise pass for a new peer's.
    fn lost(&mut self, link: &Link) {
        let (fetch_tx, fetch_rx) = mpsc::unbounded_channel();
        self.read = None;
        self.peers = PeerPool::new(
            fetch_tx,
            link.build,
            link.auth.clone(),
            link.connector(),
            link.limits.clone(),
        );
        self.fetch_rx = fetch_rx;
        self.heartbeat = None;
        self.messages.clear();
        self.grant = None;
        self.done.clear();
        self.fetched.clear();
        self.seceded.clear();
        self.heartbeat_due = false;
        self.paused = false;
        self.fetches.clear();
        self.to_pool.clear();
    }

    /// Takes `connection` in place of the one [`Io::lost`] let go of
    /// (rule 1).
    fn reconnected(&mut self, connection: Connection) {
        self.read = Some(connection.read);
        self.writer = connection.writer;
        self.messages = connection.first;
        self.grant = connection.grant;
    }
}

/// Everything the threads of one worker share: the network thread (whoever
/// it is, rule 9), the watchdog and, through the pool, the compute threads.
struct Worker {
    /// The id of the latest registration (rule 1), shared with a
    /// `WorkerHandle`.
    id: Arc<AtomicU32>,
    options: Options,
    /// Where the worker registers, and the announced thread count (within
    /// the protocol's range).
    link: Link,
    /// The data port, bound by the first connection and kept (rule 4).
    data_address: SocketAddr,
    core: Mutex<Core>,
    /// `None` once the worker ended.
    net: Mutex<Option<Net>>,
    pool: Pool,
    /// Reports of compute threads and of former network threads.
    done: mpsc::UnboundedSender<Done>,
    store: Store,
    /// What its tasks' nested computations connect to (rule 15).
    cluster: Arc<crate::nested::TaskCluster>,
    /// Taken by the thread that ends the worker.
    end: Mutex<Option<End>>,
}

/// Who learns that the worker ended.
struct End {
    /// `run` or the `WorkerHandle`.
    ending: std::sync::mpsc::Sender<Ending>,
    /// Dropped to stop the watchdog.
    _watchdog: std::sync::mpsc::Sender<()>,
}

/// Locks `mutex`; the critical sections of a worker leave their data
/// consistent at every step a panic could interrupt (a panicking handler
/// is caught in the state), so poison is ignored.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Worker {
    fn core(&self) -> MutexGuard<'_, Core> {
        locked(&self.core)
    }

    /// The id of the latest registration, for log lines.
    fn id(&self) -> WorkerId {
        WorkerId(self.id.load(Ordering::Acquire))
    }

    /// The scheduler connection ended (rule 1): every task and value of it
    /// goes, running tasks are released (rule 10 replaces threads stuck in
    /// them), and jobs not started yet are dropped. Returns how many tasks
    /// and values went.
    fn lose(&self) -> (usize, usize) {
        let lost = {
            let mut core = self.core();
            let core = &mut *core;
            let lost = core.state.on_scheduler_lost();
            // Their tasks are gone from the state: these are stale.
            core.out = Out::default();
            core.fast.clear();
            core.to_pool.clear();
            lost
        };
        self.pool.clear();
        lost
    }

    /// A new connection registered as `id` (rule 1).
    fn registered(&self, id: WorkerId) {
        self.id.store(id.0, Ordering::Release);
        self.core().state.on_registered(id);
    }

    /// Ends the worker (rule 1): its sockets close, its pool stops, its
    /// values go, and `run` returns `ending`.
    fn finish(&self, ending: Ending) {
        let net = locked(&self.net).take();
        drop(net);
        self.pool.close();
        self.store.close();
        if let Some(end) = locked(&self.end).take() {
            let _ = end.ending.send(ending);
        }
    }
}

/// A started worker, as `run` and `spawn` hold it.
struct Started {
    id: Arc<AtomicU32>,
    data_address: SocketAddr,
    ending: std::sync::mpsc::Receiver<Ending>,
    watchdog: JoinHandle<()>,
    /// The runtime the network thread drives, for tests to hold it busy.
    #[cfg(test)]
    network: tokio::runtime::Handle,
}

/// Connects, registers (waiting for the scheduler as rule 1 says), and
/// starts the worker's threads: the network thread, the watchdog and the
/// pool. Its connections read within `limits` (rule 13: the standard
/// ones, but in tests).
fn start(
    scheduler: &str,
    registry: Arc<dyn Registry>,
    options: Options,
    build: BuildId,
    (stop, on_sigterm): (Option<oneshot::Receiver<()>>, bool),
    limits: net::Limits,
) -> Result<Started, Error> {
    let (scheme, address) = parse_address(scheduler).ok_or_else(|| Error::Address {
        address: scheduler.to_owned(),
    })?;
    let auth = options.auth.clone().ok_or_else(|| Error::NoToken {
        default_path: Token::default_path(),
    })?;
    let tls = match (scheme, &options.tls) {
        (Scheme::Tcp | Scheme::Unix, _) => None,
        (Scheme::Tls, None) => {
            return Err(Error::TlsSettings {
                problem: "a worker of a `tls://` scheduler needs TLS settings: set RASK_TLS_CA \
                          to the CA that signed the scheduler's certificate, and RASK_TLS_CERT \
                          and RASK_TLS_KEY to the worker's certificate (its data port presents \
                          it)",
                source: None,
            })
        }
        (Scheme::Tls, Some(tls)) => {
            // Checked now, not once the data port is bound (rule 4).
            tls.acceptor(false)?;
            Some(connect::LinkTls {
                connector: tls.connector()?,
                settings: tls.clone(),
            })
        }
    };
    // The data port's accepting and handshakes run on a thread of their
    // own (rule 13); when the worker does not start, it stops here.
    let handshakes = net::Handshakes::start().map_err(Error::Io)?;
    let link = Link {
        address: address.to_owned(),
        scheme,
        tls,
        build,
        auth: Arc::new(auth),
        // The protocol's range (rule 5 of `protocol`): the pool is that
        // big too.
        threads: options.threads.clamp(1, MAX_THREADS as usize),
        resources: options.resources.clone(),
        name: options.name.clone().unwrap_or_else(default_name),
        limits,
        handshakes: handshakes.runtime().clone(),
    };
    let runtime = net::runtime().map_err(Error::Io)?;
    // Rule 17: registered before the worker connects, so that a signal
    // from then on is the worker's to handle.
    let term = if on_sigterm {
        let _inside = runtime.enter();
        Some(Term::new().map_err(Error::Io)?)
    } else {
        None
    };
    let spill_parent = options.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
    let store = Store::new(options.memory_limit, spill_parent);
    let connection = runtime.block_on(connect::reach(
        &link,
        &store,
        &mut None,
        Instant::now(),
        options.death_timeout,
        true,
        false,
    ))?;
    let (id, data_address) = (connection.id, connection.data_address);
    #[cfg(test)]
    let network = runtime.handle().clone();
    let (done, done_rx) = mpsc::unbounded_channel();
    let (seceded, seceded_rx) = mpsc::unbounded_channel();
    let mut io = Io::new(connection, (done_rx, seceded_rx), stop, &link);
    io.term = term;
    let cluster = Arc::new(crate::nested::TaskCluster::new(
        scheme,
        &link.address,
        link.build,
        (link.auth.clone(), link.connector()),
        options.death_timeout.is_zero(),
    ));
    let pool = Pool::start(link.threads, done.clone(), seceded, Some(cluster.clone()));
    let (ending, ended) = std::sync::mpsc::channel();
    let (end_watchdog, watchdog_ends) = std::sync::mpsc::channel();
    let shared_id = Arc::new(AtomicU32::new(id.0));
    let worker = Arc::new(Worker {
        id: shared_id.clone(),
        options,
        link,
        data_address,
        core: Mutex::new(Core::new(WorkerState::new(id, registry, store.clone()))),
        net: Mutex::new(Some(Net {
            io,
            _handshakes: handshakes,
            runtime,
        })),
        pool,
        done,
        store,
        cluster,
        end: Mutex::new(Some(End {
            ending,
            _watchdog: end_watchdog,
        })),
    });
    let slot = Arc::new(Slot::default());
    let watchdog = match watchdog::start(worker.clone(), slot.clone(), watchdog_ends) {
        Ok(w) => w,
        Err(e) => {
            worker.finish(Ok(Ok(())));
            return Err(Error::Io(e));
        }
    };
    let (go, ready) = std::sync::mpsc::channel();
    let _ = go.send(true);
    if let Err(e) = spawn_driver(worker.clone(), slot, ready) {
        worker.finish(Ok(Ok(())));
        let _ = watchdog.join();
        return Err(Error::Io(e));
    }
    Ok(Started {
        id: shared_id,
        data_address,
        ending: ended,
        watchdog,
        #[cfg(test)]
        network,
    })
}

/// Reaches the scheduler again after losing it (rule 1), within the death
/// timeout counted from now, and puts the new connection in `io`: `None`
/// then, and the worker goes on. Otherwise how the worker ends: `Ok` when
/// the death timeout passed (at once when it is zero) or on
/// `WorkerHandle::stop`, the error of an attempt refused for a reason that
/// is not retried.
async fn reconnect(io: &mut Io, worker: &Worker) -> Option<Result<(), Error>> {
    let limit = worker.options.death_timeout;
    if limit.is_zero() {
        // The worker ends with its scheduler, silently, as it always did.
        return Some(Ok(()));
    }
    if io.leaving {
        // Rule 17: what it held went with the scheduler it was leaving.
        tracing::info!(
            "{}: lost the scheduler while leaving: stopping",
            worker.id()
        );
        return Some(Ok(()));
    }
    let lost = Instant::now();
    let old = worker.id();
    let (tasks, values) = worker.lose();
    io.lost(&worker.link);
    let address = &worker.link.address;
    let counted = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    tracing::warn!(
        "{old}: lost the scheduler at {address}; dropped {} and {}; waiting for it (up to {})",
        counted(values, "value"),
        counted(tasks, "task"),
        Seconds(limit)
    );
    let mut data = Some(worker.data_address);
    let reach = connect::reach(
        &worker.link,
        &worker.store,
        &mut data,
        lost,
        limit,
        false,
        true,
    );
    let connection = tokio::select! {
        reached = reach => reached,
        () = stop_signal(&mut io.stop) => return Some(Ok(())),
        () = sigterm(&mut io.term) => {
            tracing::info!("{old}: SIGTERM while waiting for the scheduler: stopping");
            return Some(Ok(()));
        }
    };
    match connection {
        Ok(connection) => {
            let id = connection.id;
            worker.registered(id);
            io.reconnected(connection);
            tracing::warn!("{id}: registered again with the scheduler at {address} (was {old})");
            None
        }
        Err(e) if connect::retried(&e) => {
            tracing::warn!(
                "{old}: no scheduler at {address} for {}: {}; giving up",
                Seconds(limit),
                Chain(&e)
            );
            Some(Ok(()))
        }
        Err(e) => {
            tracing::warn!(
                "{old}: the scheduler at {address} refused the worker: {}",
                Chain(&e)
            );
            Some(Err(e))
        }
    }
}

/// Resolves when `stop` is sent to (`WorkerHandle::stop`); never when there
/// is none, or once its sender was dropped without sending (`join`: the
/// worker runs on), which also forgets it.
async fn stop_signal(stop: &mut Option<oneshot::Receiver<()>>) {
    if let Some(signal) = stop.as_mut() {
        if signal.await.is_ok() {
            return;
        }
        *stop = None;
    }
    std::future::pending().await
}

/// The `SIGTERM`s of this process (rule 17), where there are signals.
#[cfg(unix)]
struct Term(tokio::signal::unix::Signal);

#[cfg(unix)]
impl Term {
    /// Registers for `SIGTERM`; in the worker's network runtime.
    fn new() -> std::io::Result<Term> {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map(Term)
    }

    async fn recv(&mut self) -> Option<()> {
        self.0.recv().await
    }
}

/// Where there are no signals, none ever comes.
#[cfg(not(unix))]
struct Term;

#[cfg(not(unix))]
impl Term {
    fn new() -> std::io::Result<Term> {
        Ok(Term)
    }

    async fn recv(&mut self) -> Option<()> {
        None
    }
}

/// Resolves at each `SIGTERM` this worker handles (rule 17); never
/// without one.
async fn sigterm(term: &mut Option<Term>) {
    if let Some(signals) = term.as_mut() {
        if signals.recv().await.is_some() {
            return;
        }
        *term = None;
    }
    std::future::pending().await
}

/// Starts a thread that becomes the network thread of `worker`, watched
/// through `slot`, once `go` says so (rule 9).
fn spawn_driver(
    worker: Arc<Worker>,
    slot: Arc<Slot>,
    go: std::sync::mpsc::Receiver<bool>,
) -> std::io::Result<()> {
    // The name tells the network thread from compute threads
    // (`rask-worker-N`), in tests and in debuggers.
    std::thread::Builder::new()
        .name("rask-worker".into())
        .spawn(move || {
            if go.recv() == Ok(true) {
                // Fast jobs run here (rules 5 and 14).
                crate::nested::install(worker.cluster.clone());
                drive(&worker, &slot);
            }
        })
        .map(drop)
}

/// The network thread (rules 2, 5 and 9): turns of the network loop inside
/// the runtime, and the fast jobs they dispatch outside it.
fn drive(worker: &Arc<Worker>, slot: &Slot) {
    let mut seq = 0;
    let mut to_pool = Vec::new();
    let ended = catch_unwind(AssertUnwindSafe(|| loop {
        {
            let mut net = locked(&worker.net);
            let Net { io, runtime, .. } = net.as_mut()?;
            match runtime.block_on(turn(io, worker)) {
                None => {}
                Some(Ended::Finished(result)) => return Some(result),
                // Rule 1. A new connection has no fast jobs waiting yet.
                Some(Ended::Lost) => match runtime.block_on(reconnect(io, worker)) {
                    Some(result) => return Some(result),
                    None => continue,
                },
            }
        }
        match run_fast(&worker.core, slot, &mut seq, &mut to_pool) {
            Fast::Finished if to_pool.is_empty() => {}
            Fast::Finished => worker.pool.submit(to_pool.drain(..)),
            Fast::Replaced(handed) => {
                let (done, next) = *handed;
                // Rule 9: as a compute thread would.
                if let Some(done) = done {
                    report(&worker.done, done);
                }
                worker.pool.submit(next);
                return None;
            }
        }
    }));
    match ended {
        Ok(None) => {}
        Ok(Some(result)) => worker.finish(Ok(result)),
        Err(panic) => {
            tracing::warn!(
                "{}: the network thread panicked: {}",
                worker.id(),
                panic_message(&*panic)
            );
            worker.finish(Err(panic));
        }
    }
}

/// How a run of fast jobs ended.
enum Fast {
    /// Its budget is spent or no fast job is left; the jobs not run are
    /// for the pool.
    Finished,
    /// The network was taken over while the last job ran (rule 9): its
    /// report and successor are this thread's to hand over (boxed: this is
    /// the rare case).
    Replaced(Box<(Option<Done>, Option<Job>)>),
}

/// Runs fast jobs on this thread, one at a time, for up to
/// [`INLINE_TURN`], each outside the lock, with `slot` telling the
/// watchdog (rule 9); reports each, which may dispatch more. The jobs left
/// go to `to_pool`.
fn run_fast(core: &Mutex<Core>, slot: &Slot, seq: &mut u64, to_pool: &mut Vec<Job>) -> Fast {
    let start = Instant::now();
    let mut c = locked(core);
    loop {
        let Some(job) = c.next_fast(start) else {
            c.inline = None;
            c.leftovers(to_pool);
            return Fast::Finished;
        };
        c.inline = Some(Running::of(&job));
        drop(c);
        *seq += 1;
        slot.begin(*seq);
        let (done, next) = run_link(job);
        if !slot.end() {
            return Fast::Replaced(Box::new((done, next)));
        }
        c = locked(core);
        if let Some(done) = done {
            c.finished(done);
        }
        // Its successor is a job like any other here: fast or not.
        c.out.jobs.extend(next);
    }
}

/// Why the network loop left a scheduler connection.
enum Ended {
    /// The connection closed or failed: the worker reaches its scheduler
    /// again, or ends (rule 1).
    Lost,
    /// The worker ends: `WorkerHandle::stop`, or the scheduler broke the
    /// protocol.
    Finished(Result<(), Error>),
}

/// One turn of the network loop: handles what arrived, sends what is due
/// and waits for more, until fast jobs wait for the network thread (then
/// `None`, rule 5) or the connection ends (rule 1).
async fn turn(io: &mut Io, worker: &Worker) -> Option<Ended> {
    let protocol = |reason| Ended::Finished(Err(Error::Protocol { reason }));
    loop {
        // Everything that arrived, under one lock (rule 3).
        let (frames, fast) = {
            let mut core = worker.core();
            let c = &mut *core;
            for msg in io.messages.drain(..) {
                match msg {
                    ToWorker::Compute {
                        key,
                        run,
                        name,
                        function,
                        payload,
                        deps,
                        who_has,
                        priority,
                        timeout_ms,
                        retries,
                    } => c.state.on_compute(
                        Compute {
                            key,
                            run,
                            name,
                            function,
                            payload,
                            deps,
                            who_has,
                            priority,
                            timeout: timeout_ms.map(Duration::from_millis),
                            retries,
                        },
                        &mut c.out,
                    ),
                    ToWorker::Release { key } => c.state.on_release(key, &mut c.out),
                    ToWorker::GiveUp { key, id } => c.state.on_give_up(key, id, &mut c.out),
                    ToWorker::Fetch { key, holders } => c.state.on_fetch(key, holders, &mut c.out),
                    ToWorker::PeerJoined { id, address } => io.peers.add_peer(id, address),
                    ToWorker::PeerLeft { id } => {
                        io.peers.remove_peer(id);
                        c.state.on_peer_left(id);
                    }
                    ToWorker::Heartbeat { every_ms } => {
                        // Within MIN_HEARTBEAT..=MAX_HEARTBEAT (checked when
                        // decoded): the interval's arithmetic cannot overflow.
                        let every = Duration::from_millis(every_ms);
                        let mut ticks = tokio::time::interval(every);
                        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        io.heartbeat = Some(ticks);
                    }
                    ToWorker::Retire if io.leaving => {
                        // Its values moved, or it was the last worker
                        // (scheduler rule S16a, which logs which).
                        tracing::info!(
                            "{} ({}): left: the scheduler let it go",
                            worker.id(),
                            worker.link.name
                        );
                        return Some(Ended::Finished(Ok(())));
                    }
                    ToWorker::Retire => {
                        tracing::info!(
                            "{} ({}): retired by the scheduler: other workers hold its values",
                            worker.id(),
                            worker.link.name
                        );
                        return Some(Ended::Finished(Ok(())));
                    }
                    ToWorker::Registered { .. } | ToWorker::Refused { .. } => {
                        tracing::warn!(
                            "worker: closing the scheduler connection: registered twice"
                        );
                        return Some(Ended::Finished(Ok(())));
                    }
                }
            }
            // Handled: what they took goes back to the budget (`net` rule
            // 8).
            io.grant = None;
            // Before the reports: one of them may end a task that
            // seceded, and the scheduler ignores a late secession.
            for (key, id) in io.seceded.drain(..) {
                // A run of this connection's task only: one of a task the
                // last scheduler sent, seceding now, would take this
                // scheduler's task of the same key out of its window.
                if let Some(run) = c.state.run_of(&key, id) {
                    c.out.to_scheduler(ToScheduler::TaskSeceded { key, run });
                }
            }
            for done in io.done.drain(..) {
                c.finished(done);
            }
            for f in io.fetched.drain(..) {
                c.state.on_fetched(f.from, f.key, f.result, &mut c.out);
            }
            if std::mem::take(&mut io.leave_due) {
                c.out.to_scheduler(ToScheduler::Leaving);
            }
            let heartbeat = std::mem::take(&mut io.heartbeat_due);
            if heartbeat {
                c.out.to_scheduler(ToScheduler::Heartbeat);
                if let Some(memory_bytes) = resident_memory() {
                    c.out.to_scheduler(ToScheduler::Resources { memory_bytes });
                }
            }
            // Rule 14: with each heartbeat, and at once when the worker
            // pauses or resumes, so the scheduler stops or starts sending
            // it tasks (scheduler rule S17) without waiting for one.
            let paused = worker.store.paused();
            if heartbeat || paused != io.paused {
                io.paused = paused;
                if let Some(spill) = worker.store.report() {
                    c.out.to_scheduler(ToScheduler::Memory { spill });
                }
            }
            // Tasks held back while paused (state rule 6).
            c.state.resume(&mut c.out);
            c.route();
            std::mem::swap(&mut c.to_pool, &mut io.to_pool);
            std::mem::swap(&mut c.out.fetches, &mut io.fetches);
            (c.out.scheduler.take_frames(), !c.fast.is_empty())
        };
        // Flush (rule 3). Jobs first: a thread starts on them while the
        // reports are written.
        if !io.to_pool.is_empty() {
            worker.pool.submit(io.to_pool.drain(..));
        }
        if !frames.is_empty() {
            // Tasks' output before their reports (rule 7). A stdout that
            // cannot be written to is the program's business, not the
            // worker's.
            let _ = std::io::stdout().flush();
            for frame in frames {
                let _ = io.writer.send(frame);
            }
        }
        for (from, key) in io.fetches.drain(..) {
            io.peers.request(from, key);
        }
        io.peers.flush();
        if fast {
            // Run outside the runtime (rules 5 and 9).
            return None;
        }

        tokio::select! {
            () = stop_signal(&mut io.stop) => return Some(Ended::Finished(Ok(()))),
            // Rule 17: the first asks the scheduler to retire the worker,
            // a second stops it at once.
            () = sigterm(&mut io.term) => {
                if io.leaving {
                    tracing::warn!(
                        "{} ({}): SIGTERM again: stopping now; what it alone holds is computed \
                         again elsewhere",
                        worker.id(),
                        worker.link.name
                    );
                    return Some(Ended::Finished(Ok(())));
                }
                tracing::info!(
                    "{} ({}): SIGTERM: leaving: it finishes its tasks and hands its values \
                     over, then exits (a second SIGTERM stops it at once)",
                    worker.id(),
                    worker.link.name
                );
                io.leaving = true;
                io.leave_due = true;
            }
            // A frame waiting for its grant keeps its place while the
            // rest goes on (`net` rule 8).
            got = scheduler_messages(&mut io.read) => match got {
                Ok(Some(net::Messages { msgs, grant })) => {
                    io.messages = msgs;
                    io.grant = grant;
                }
                // The scheduler went away, or stopped reading (net rule
                // 9): the worker reaches it again or ends (rule 1).
                Ok(None)
                | Err(ProtocolError::Closed)
                | Err(ProtocolError::Io(_))
                | Err(ProtocolError::Stalled(_)) => return Some(Ended::Lost),
                Err(e) => {
                    tracing::warn!("worker: closing the scheduler connection: {}", Chain(&e));
                    return Some(protocol(e));
                }
            },
            why = io.writer.closed() => {
                if let Some(e) = why {
                    tracing::warn!("worker: closing the scheduler connection: {e}");
                }
                return Some(Ended::Lost);
            }
            Some(done) = io.done_rx.recv() => {
                io.done.push(done);
                while let Ok(done) = io.done_rx.try_recv() {
                    io.done.push(done);
                }
            }
            Some(key) = io.seceded_rx.recv() => {
                io.seceded.push(key);
                while let Ok(key) = io.seceded_rx.try_recv() {
                    io.seceded.push(key);
                }
            }
            Some(fetched) = io.fetch_rx.recv() => {
                io.fetched.push(fetched);
                while let Ok(f) = io.fetch_rx.try_recv() {
                    io.fetched.push(f);
                }
            }
            // A spill brought the store below its pause level: the next
            // round resumes held-back tasks (state rule 6).
            () = worker.store.resumed() => {}
            _ = async {
                match io.heartbeat.as_mut() {
                    Some(ticks) => {
                        ticks.tick().await;
                    }
                    None => std::future::pending().await,
                }
            } => io.heartbeat_due = true,
        }
    }
}

/// The next frame of messages from the scheduler, holding from the frame
/// budget what they take decoded (`net` rule 8); cancel-safe. Never while
/// the worker has no scheduler connection ([`Io::lost`]).
async fn scheduler_messages(
    read: &mut Option<FrameReader<Reader>>,
) -> Result<Option<net::Messages<ToWorker>>, ProtocolError> {
    match read {
        Some(read) => read.next_messages().await,
        None => std::future::pending().await,
    }
}

/// Accepts peers on the data port (rule 13), over TLS when given an
/// acceptor: here, on the handshakes' thread, it takes them through their
/// handshakes, then serves them on the runtime of `network`, the network
/// thread's.
async fn serve_data(
    listener: TcpListener,
    store: Store,
    build: BuildId,
    (auth, tls): (Arc<Auth>, Option<Acceptor>),
    limits: net::Limits,
    network: tokio::runtime::Handle,
) {
    // Half the open files: the rest are the worker's own and its tasks'.
    let gate = net::Gate::new(net::Caps::for_this_process(2));
    net::accept_loop(
        listener,
        gate,
        "worker: data port",
        move |stream, peer, ticket| {
            let (store, auth, limits) = (store.clone(), auth.clone(), limits.clone());
            let (tls, network) = (tls.clone(), network.clone());
            tokio::spawn(async move {
                let detached = match data_handshakes(stream, ticket, build, (&auth, tls)).await {
                    Ok(detached) => detached,
                    Err(e) => {
                        data_closed(peer, &e);
                        return;
                    }
                };
                network.spawn(async move {
                    // Requests are small, read with no grant (rule 13).
                    let served = match detached.attach(&limits.requests()) {
                        Ok(accepted) => data_connection(accepted, store, &limits).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = served {
                        data_closed(peer, &e);
                    }
                });
            });
        },
    )
    .await
}

/// Logs why this side closed the data connection from `peer`.
fn data_closed(peer: net::PeerAddr, e: &ProtocolError) {
    match e {
        // Rule 12: a line per refusal, naming what is wrong.
        ProtocolError::Auth(_) => log_limited!(
            "worker: refused data connection",
            "worker: refused the data connection from {peer}: {e}"
        ),
        _ => log_limited!(
            "worker: closing data connection",
            "worker: closing data connection from {peer}: {}",
            Chain(e)
        ),
    }
}

/// Takes a peer of the data port through its handshakes (rule 13), on
/// the handshakes' thread: only a peer that proved `auth` (rule 12), of
/// this worker's `build` (rule 8), comes out, to be served on the network
/// thread. `Err` says why this side closed it.
async fn data_handshakes(
    stream: TcpStream,
    ticket: net::PreAuth,
    build: BuildId,
    (auth, tls): (&Auth, Option<Acceptor>),
) -> Result<net::Detached, ProtocolError> {
    let detached = net::accept_detached(
        net::Incoming::Tcp(stream, tls.as_ref()),
        ticket,
        Role::DataServer,
        build,
        auth,
        &[Role::Peer],
    )
    .await?;
    if detached.hello().build != build {
        return Err(ProtocolError::Build {
            ours: build,
            theirs: detached.hello().build,
        });
    }
    Ok(detached)
}

/// Answers one authenticated peer's `GetData`s until it goes away, or is
/// idle for [`DATA_IDLE`] (rule 13). `Err` says why this side closed it.
async fn data_connection(
    accepted: net::Accepted,
    store: Store,
    limits: &net::Limits,
) -> Result<(), ProtocolError> {
    let _slot = accepted.slot;
    let writer = net::spawn_writer(accepted.write, limits, None);
    let mut read = accepted.read;
    let mut batch = Batch::default();
    let mut idle = tokio::time::interval(DATA_IDLE / 4);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_active = Instant::now();
    loop {
        // What the requests take decoded is held from the connection's
        // own budget until they were answered (`net` rule 8): a frame of
        // requests that takes more than the budget closes the connection.
        let net::Messages { msgs, grant } = tokio::select! {
            biased;
            got = read.next_messages::<ToPeer>() => match got {
                Ok(Some(got)) => got,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            },
            why = writer.closed() => return why.map_or(Ok(()), Err),
            _ = idle.tick() => {
                if read.in_frame() || writer.queued() > 0 {
                    last_active = Instant::now();
                } else if last_active.elapsed() >= DATA_IDLE {
                    return Err(ProtocolError::Idle(DATA_IDLE));
                }
                continue;
            }
        };
        for ToPeer::GetData { keys } in msgs {
            for key in keys {
                answer(&store, key, &mut batch).await;
                // One value at a time while the reader lags (rule 13).
                let sealed = batch.take_sealed();
                if !sealed.is_empty() {
                    for frame in sealed {
                        writer.send(frame)?;
                    }
                    writer.room().await?;
                    // A frame's worth of answers was encoded: let the rest
                    // of the worker (heartbeats, reports) have its turn.
                    tokio::task::yield_now().await;
                }
            }
        }
        net::send_batch(&writer, &mut batch)?;
        drop(grant);
        last_active = Instant::now();
    }
}

/// Puts the answer to a `GetData` for `key` in `batch`: the value's bytes,
/// or `Missing`. A spilled value is read on a blocking thread, so the
/// network thread goes on meanwhile, and stays on disk (`memory` rules 4
/// and 5: a damaged file is `Missing`, never a wrong value; a read that
/// fails for now is tried again there for a while first).
async fn answer(store: &Store, key: WireKey, batch: &mut Batch) {
    match store.find(&key) {
        Found::Disk(disk) => {
            let store = store.clone();
            let read = tokio::task::spawn_blocking(move || store.read_patiently(&disk)).await;
            match read {
                Ok(Ok(bytes)) => batch.push(&FromPeerRef::Data {
                    key: &key,
                    bytes: &bytes,
                }),
                _ => batch.push(&FromPeer::Missing { key }),
            }
        }
        Found::Memory(value) => {
            if let Some(encoded) = value.downcast_ref::<Encoded>() {
                batch.push(&FromPeerRef::Data {
                    key: &key,
                    bytes: &encoded.0,
                });
            } else {
                // A panicking `Serialize` is user code too: the reader
                // gets `Missing`, the network thread goes on.
                match catch_unwind(AssertUnwindSafe(|| value.encode())) {
                    Ok(Ok(bytes)) => batch.push(&FromPeerRef::Data {
                        key: &key,
                        bytes: &bytes,
                    }),
                    // Encoded once already when it was computed; a
                    // failure now is the type's own bug.
                    _ => batch.push(&FromPeer::Missing { key }),
                }
            }
            // Released meanwhile, this was its last reference (rule 16).
            drop_quietly(value, format_args!("the value of key {}", Key(key).short()));
        }
        Found::Missing => batch.push(&FromPeer::Missing { key }),
    }
}

/// Sends a job's report to the network thread; `false` when the worker
/// ended, and then the report's value goes, quietly (rule 16).
fn report(to: &mpsc::UnboundedSender<Done>, done: Done) -> bool {
    let Err(unsent) = to.send(done) else {
        return true;
    };
    let done = unsent.0;
    let (function, key) = (done.function.clone(), Key(done.key));
    drop_quietly(
        done,
        format_args!("the value of task {function}-{}", key.short()),
    );
    false
}

/// Runs one link of a chain (state rule 5): `job`, then fills its
/// successor's inputs with the value. Returns the report, none for a job
/// released before it started (the state gives its successor back), and
/// the successor to run next.
fn run_link(job: Job) -> (Option<Done>, Option<Job>) {
    // Taken before the report, so the network thread never both attaches
    // a successor and expects it to be dispatched by itself.
    let successor = job.take_successor();
    // A task given up (state rule 8) never starts; one released before
    // it started neither.
    if job.cancelled.load(Ordering::Relaxed) || !job.claim.run() {
        return (None, None);
    }
    let done = run_job(job);
    let next = match (&done.outcome, successor) {
        (Ok(stored), Some(mut next)) => {
            for input in next.inputs.iter_mut().filter(|i| i.is_none()) {
                *input = Some(stored.value.clone());
            }
            Some(next)
        }
        _ => None,
    };
    (Some(done), next)
}

/// How long each function's recent runs took on this worker (rule 5).
#[derive(Default)]
struct Speeds {
    /// Fast runs in a row, per function.
    streaks: crate::protocol::KeyMap<Arc<str>, u32>,
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

    /// A run of `function` is stuck on the network thread (rule 9): it
    /// starts over on the pool.
    fn forget(&mut self, function: &str) {
        if let Some(streak) = self.streaks.get_mut(function) {
            *streak = 0;
        }
    }

    fn is_fast(&self, function: &str) -> bool {
        self.streaks
            .get(function)
            .is_some_and(|&s| s >= FAST_STREAK)
    }
}

/// This process's resident memory in bytes, from `/proc/self/statm` (the
/// dashboard's workers table); `None` where it cannot be read.
fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux pages are 4 KiB on the platforms rask builds for, save a few
    // with larger pages, where this underestimates.
    Some(pages.saturating_mul(4096).min(crate::protocol::MAX_MEMORY))
}

/// Runs one job and encodes its value.
fn run_job(mut job: Job) -> Done {
    let (id, key, function) = (job.id, job.key, job.function.clone());
    let mut plan = PlanBuilder::with_capacity(1);
    plan.push(Key(key), job.op.clone(), &[]);
    let plan = plan.build();
    let start = Instant::now();
    // A released task sees `rask::cancelled()` turn true (state rule 3).
    let cancelled = job.cancelled.clone();
    let outcome = Stop::flag(cancelled).enter(|| run_task(&plan, 0, &mut job.inputs));
    // What the op read in place goes now, quietly (rule 16): a released
    // input's last reference may be here.
    drop(job);
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
        let failed =
            |(kind, message): (FailureKind, String)| Arc::new(plan.failure_as(0, kind, message));
        let failure = match encoded {
            Ok(n) if n <= MAX_VALUE => {
                return Ok(Stored {
                    value,
                    nbytes: n as u64,
                })
            }
            Ok(n) => failed((FailureKind::Failed, format!(
                "its value of type `{}` encodes to {n} bytes, over the {MAX_VALUE} byte limit of one frame",
                value.type_name()
            ))),
            Err(e) => failed(e),
        };
        // Rule 16: the task fails, its value goes.
        drop_quietly(value, format_args!("the value of task {}", plan.label(0)));
        Err(failure)
    });
    Done {
        id,
        key,
        function,
        outcome,
        duration_ns,
        inline,
        thread: pool::lane(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode_checked;
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
            thread: 0,
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
            run: k as u64 + 1,
            name: "spin".into(),
            function: "spin".into(),
            payload: Arc::from(&[][..]),
            deps: Vec::new(),
            who_has: Vec::new(),
            priority: crate::protocol::Priority {
                user: 0,
                order: k as u64,
            },
            timeout: None,
            retries: 0,
        }
    }

    fn core(registry: Arc<dyn Registry>) -> Mutex<Core> {
        Mutex::new(Core::new(WorkerState::new(
            WorkerId(0),
            registry,
            Store::default(),
        )))
    }

    #[test]
    fn one_turn_runs_fast_jobs_within_its_budget_and_leaves_the_rest_to_the_pool() {
        const JOBS: usize = 40;
        let core = core(Arc::new(Reg));
        let (slot, mut seq, mut to_pool) = (Slot::default(), 0, Vec::new());
        {
            let mut c = locked(&core);
            let c = &mut *c;
            for k in 0..JOBS {
                c.state.on_compute(spin(k), &mut c.out);
            }
            assert_eq!(c.out.jobs.len(), JOBS);
        }
        // Not known to be fast yet: everything goes to the pool.
        assert!(matches!(
            run_fast(&core, &slot, &mut seq, &mut to_pool),
            Fast::Finished
        ));
        assert_eq!(to_pool.len(), JOBS);
        to_pool.clear();
        {
            let mut c = locked(&core);
            let c = &mut *c;
            for _ in 0..FAST_STREAK {
                c.speeds.record(&done("spin", 1));
            }
            for k in 0..JOBS {
                c.state.on_compute(spin(JOBS + k), &mut c.out);
            }
        }
        assert!(matches!(
            run_fast(&core, &slot, &mut seq, &mut to_pool),
            Fast::Finished
        ));
        // 40 × 20 µs is over the 500 µs budget: some ran here, not all.
        assert!(
            !to_pool.is_empty() && to_pool.len() < JOBS,
            "{}",
            to_pool.len()
        );
        assert_eq!(seq as usize, JOBS - to_pool.len(), "one slot number a job");
        let c = locked(&core);
        // Those that ran here are finished in the state.
        assert_eq!(c.state.pending(), JOBS + to_pool.len());
        assert!(c.out.jobs.is_empty() && c.fast.is_empty() && c.to_pool.is_empty());
        assert!(c.inline.is_none());
    }

    /// Waits for a token from its test.
    struct Block(Arc<Mutex<std::sync::mpsc::Receiver<()>>>);
    impl Op for Block {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            let rx = self.0.lock().unwrap();
            rx.recv_timeout(Duration::from_secs(30)).unwrap();
            Ok(Arc::new(1i64))
        }
        fn name(&self) -> &str {
            "block"
        }
    }
    impl Registry for Block {
        fn resolve(&self, _: &WireTask) -> Result<Arc<dyn Op>, WireError> {
            Ok(Arc::new(Block(self.0.clone())))
        }
    }

    #[test]
    fn a_network_thread_taken_over_in_a_job_keeps_its_report_and_leaves_the_rest() {
        let (unblock, rx) = std::sync::mpsc::channel();
        let core = Arc::new(core(Arc::new(Block(Arc::new(Mutex::new(rx))))));
        {
            let mut c = locked(&core);
            let c = &mut *c;
            for _ in 0..FAST_STREAK {
                c.speeds.record(&done("spin", 1));
            }
            c.state.on_compute(spin(1), &mut c.out);
            c.state.on_compute(spin(2), &mut c.out);
        }
        let slot = Arc::new(Slot::default());
        let runner = {
            let (core, slot) = (core.clone(), slot.clone());
            std::thread::spawn(move || {
                let (mut seq, mut to_pool) = (0, Vec::new());
                let fast = run_fast(&core, &slot, &mut seq, &mut to_pool);
                (fast, to_pool.len())
            })
        };
        // What the watchdog does (rule 9): the job in the slot is taken
        // over, and the state shows which one it is.
        let deadline = Instant::now() + Duration::from_secs(30);
        let seq = loop {
            if let Some(seq) = slot.running() {
                break seq;
            }
            assert!(Instant::now() < deadline, "the job never started");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(slot.take(seq));
        let stuck = locked(&core).inline.take().expect("the job running");
        assert_eq!(stuck.key, [1; 32]);
        unblock.send(()).unwrap();
        let (fast, left) = runner.join().unwrap();
        match fast {
            Fast::Replaced(handed) => match *handed {
                (Some(done), None) => assert_eq!(done.key, [1; 32]),
                _ => panic!("no report"),
            },
            Fast::Finished => panic!("not replaced"),
        }
        // The old thread took nothing more: job 2 waits for the new one.
        assert_eq!(left, 0);
        let c = locked(&core);
        assert_eq!(c.fast.len(), 1);
        assert_eq!(
            c.state.pending(),
            2,
            "the report is not the old thread's to give"
        );
        assert!(slot.returned());
    }

    /// Rule 13: the data port's handshakes, TLS's and the token's, run on
    /// a thread of their own: they complete while the network thread is
    /// busy (blocked here on purpose), and the reader is served there once
    /// it is free. Before, both ran on the network thread, so any process
    /// that could reach the data port could spend it on TLS's key exchange,
    /// holding up heartbeats, dispatch and reports. Once the worker
    /// stopped, nothing listens on its data port (rule 1).
    #[test]
    fn data_port_handshakes_complete_while_the_network_thread_is_busy() {
        use crate::protocol::{FromPeer, ToPeer};
        let pki = crate::tls::testing::Pki::new("data-handshakes");
        let options = crate::scheduler::Options::default().tls(pki.identity());
        let scheduler =
            crate::scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap();
        let auth = Auth::Token(scheduler.token().unwrap().clone());
        let options = Options::default()
            .auth(auth.clone())
            .tls(pki.both())
            .death_timeout(Duration::ZERO);
        let address = format!("tls://{}", scheduler.address());
        let (worker, network) = started_worker(&address, options);
        let data_address = worker.data_address;
        // The network thread, blocked until told (60 s at most).
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (blocking, blocked) = std::sync::mpsc::channel();
        network.spawn(async move {
            let _ = blocking.send(std::thread::current().name().map(str::to_owned));
            let _ = released.recv_timeout(Duration::from_secs(60));
        });
        let wait = Duration::from_secs(30);
        let on = blocked.recv_timeout(wait).unwrap();
        assert_eq!(on.as_deref(), Some("rask-worker"));
        let runtime = net::runtime().unwrap();
        let limits = net::Limits::standard();
        let connector = pki.connector();
        let connected = runtime.block_on(net::connect(
            (Scheme::Tls, &data_address.to_string(), Some(&connector)),
            Role::Peer,
            Role::DataServer,
            BuildId::current(),
            &auth,
            net::CONNECT_TIMEOUT,
            &limits,
        ));
        let _ = release.send(());
        let connected = match connected {
            Ok(connected) => connected,
            Err(e) => {
                panic!("no handshake with the data port while the network thread was busy: {e}")
            }
        };
        // Served on the network thread once it is free: a `GetData` is
        // answered.
        let key = [7; 32];
        let answer = runtime.block_on(async {
            let writer = net::spawn_writer(connected.write, &limits, None);
            let mut batch = Batch::default();
            batch.push(&ToPeer::GetData { keys: vec![key] });
            net::send_batch(&writer, &mut batch).unwrap();
            let mut read = connected.read;
            match tokio::time::timeout(wait, read.next()).await {
                Ok(Ok(true)) => decode_checked::<FromPeer>(read.frame()).unwrap(),
                other => panic!("no answer from the data port: {other:?}"),
            }
        });
        assert_eq!(answer, [FromPeer::Missing { key }]);
        worker.stop();
        match std::net::TcpStream::connect_timeout(&data_address, wait) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
            Ok(_) => panic!("the data port of a stopped worker still listens"),
        }
    }

    /// A reader's connection to the data port at `data_address`, proving
    /// `auth`, within `limits`.
    async fn data_connection(
        data_address: std::net::SocketAddr,
        auth: &Auth,
        limits: &net::Limits,
    ) -> net::Connected {
        net::connect(
            (Scheme::Tcp, &data_address.to_string(), None),
            Role::Peer,
            Role::DataServer,
            BuildId::current(),
            auth,
            net::CONNECT_TIMEOUT,
            limits,
        )
        .await
        .unwrap()
    }

    /// A scheduler on 127.0.0.1 (plain TCP, its own token) and a worker of
    /// it, which ends with it; the token, for a reader of its data port.
    fn worker_of_a_scheduler() -> (crate::scheduler::SchedulerHandle, WorkerHandle, Auth) {
        let scheduler =
            crate::scheduler::serve_with("127.0.0.1:0".parse().unwrap(), Default::default())
                .unwrap();
        let auth = Auth::Token(scheduler.token().unwrap().clone());
        let options = Options::default()
            .auth(auth.clone())
            .death_timeout(Duration::ZERO);
        let address = format!("tcp://{}", scheduler.address());
        let (worker, _) = started_worker(&address, options);
        (scheduler, worker, auth)
    }

    /// A worker of the scheduler at `address`, started with `options`
    /// (stopped when the handle drops, however the test ends), and the
    /// runtime its network thread drives.
    fn started_worker(address: &str, options: Options) -> (WorkerHandle, tokio::runtime::Handle) {
        started_within(address, options, net::Limits::standard()).unwrap()
    }

    /// As [`started_worker`], its connections read within `limits`, or
    /// why it did not start.
    fn started_within(
        address: &str,
        options: Options,
        limits: net::Limits,
    ) -> Result<(WorkerHandle, tokio::runtime::Handle), Error> {
        let (stop, stopped) = oneshot::channel();
        let started = start(
            address,
            Arc::new(Reg),
            options,
            BuildId::current(),
            (Some(stopped), false),
            limits,
        )?;
        let worker = WorkerHandle {
            id: started.id,
            data_address: started.data_address,
            stop: Some(stop),
            ending: Mutex::new(started.ending),
            watchdog: Some(started.watchdog),
        };
        Ok((worker, started.network))
    }

    /// Rule 13, as a reviewer found it: a request frame the data port read
    /// held a grant from the worker's frame budget until every key it
    /// named was answered, for as long as its reader took to read the
    /// answers; granted from the lane, it held up every big frame of the
    /// worker (a fetched value, a task from the scheduler) that long, with
    /// the pool empty. Requests are now small frames, read with no grant:
    /// one past [`net::SMALL_FRAME`] closes the connection (before, it was
    /// granted and answered), and a requester's `GetData`s of many keys
    /// travel in small frames, every key answered.
    #[test]
    fn the_data_port_reads_requests_as_small_frames_holding_no_budget() {
        use crate::protocol::{FromPeer, ToPeer};
        let (_scheduler, worker, auth) = worker_of_a_scheduler();
        let data_address = worker.data_address;
        let runtime = net::runtime().unwrap();
        let limits = net::Limits::standard();
        let wait = Duration::from_secs(30);
        let keys: Vec<WireKey> = (0..3000u32)
            .map(|i| {
                let mut key = [0; 32];
                key[..4].copy_from_slice(&i.to_le_bytes());
                key
            })
            .collect();
        // Sends `batch` on a new connection to the data port: the answers
        // read until `keys.len()` came, or the end of the connection.
        let ask = |mut batch: Batch| {
            runtime.block_on(async {
                let connected = data_connection(data_address, &auth, &limits).await;
                let writer = net::spawn_writer(connected.write, &limits, None);
                net::send_batch(&writer, &mut batch).unwrap();
                let mut read = connected.read;
                let mut answers = Vec::new();
                while answers.len() < keys.len() {
                    match tokio::time::timeout(wait, read.next()).await {
                        Ok(Ok(true)) => {
                            answers.extend(decode_checked::<FromPeer>(read.frame()).unwrap())
                        }
                        Ok(_) => return (answers, true),
                        Err(_) => panic!("the data port neither answered nor closed"),
                    }
                }
                (answers, false)
            })
        };
        // One `GetData` of 3 000 keys, in one frame of 96 KiB.
        let mut big = Batch::default();
        big.push(&ToPeer::GetData { keys: keys.clone() });
        let (answers, closed) = ask(big);
        assert!(
            closed && answers.is_empty(),
            "a request frame past the small frames' size was read and answered ({} answers)",
            answers.len()
        );
        // As requesters send them: small frames, every key answered.
        let mut small = Batch::default();
        net::push_requests(&mut small, keys.clone());
        let (answers, closed) = ask(small);
        assert!(!closed);
        let missing: Vec<FromPeer> = keys.iter().map(|&key| FromPeer::Missing { key }).collect();
        assert_eq!(answers, missing);
        worker.stop();
    }

    /// A frame of `n` copies of `msg` (length prefix included): what no
    /// honest sender coalesces.
    fn frame_of<M: serde::Serialize>(msg: &M, n: usize) -> Vec<u8> {
        let body = crate::protocol::frame(msg)[4..].repeat(n);
        let mut frame = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
        frame.extend(body);
        frame
    }

    /// One frame of the messages of `frames` (length prefixes included),
    /// in order.
    fn joined(frames: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = frames.iter().flat_map(|f| f[4..].to_vec()).collect();
        let mut frame = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
        frame.extend(body);
        frame
    }

    /// A scheduler of one connection, listening on 127.0.0.1 (port 0) on a
    /// thread of its own, for a worker proving `auth`: it reads the
    /// worker's `RegisterWorker`, sends `frames` (the first should
    /// register it), then reads what the worker sends until it hears a
    /// heartbeat or the worker closes the connection: whether it closed.
    fn a_scheduler_sending(
        auth: Auth,
        frames: Vec<Vec<u8>>,
    ) -> (String, std::thread::JoinHandle<bool>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = format!("tcp://{}", listener.local_addr().unwrap());
        let thread = std::thread::spawn(move || {
            let wait = Duration::from_secs(30);
            let runtime = net::runtime().unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let (stream, _) = tokio::time::timeout(wait, listener.accept())
                    .await
                    .expect("the worker connects")
                    .unwrap();
                let gate = net::Gate::new(net::Caps::for_files(1024, 1));
                let limits = net::Limits::standard();
                let accepted = net::accept_detached(
                    net::Incoming::Tcp(stream, None),
                    gate.admit().unwrap(),
                    Role::Scheduler,
                    BuildId::current(),
                    &auth,
                    &[Role::Worker],
                )
                .await
                .unwrap()
                .attach(&limits)
                .unwrap();
                let writer = net::spawn_writer(accepted.write, &limits, None);
                let mut read = accepted.read;
                let hello = tokio::time::timeout(wait, read.next_messages::<ToScheduler>()).await;
                match hello {
                    Ok(Ok(Some(got))) => assert!(matches!(
                        &got.msgs[..],
                        [ToScheduler::RegisterWorker { .. }, ..]
                    )),
                    other => panic!("no registration: {other:?}"),
                }
                for frame in frames {
                    if writer.send(frame).is_err() {
                        return true;
                    }
                }
                loop {
                    match tokio::time::timeout(wait, read.next_messages::<ToScheduler>()).await {
                        Ok(Ok(Some(got))) => {
                            if got.msgs.contains(&ToScheduler::Heartbeat) {
                                return false;
                            }
                        }
                        Ok(_) => return true,
                        Err(_) => panic!("the worker neither closed nor sent a heartbeat"),
                    }
                }
            })
        });
        (address, thread)
    }

    /// Net rule 8, as a reviewer found it, on the worker's scheduler
    /// connection: the worker decoded its scheduler's frames outside its
    /// frame budget. A frame of 16 000 `PeerLeft`s, 32 KB sent (a small
    /// frame: no grant), decodes to 2.9 MB, which protocol rule 5 lets a
    /// frame of that length take: an authenticated scheduler, buggy or
    /// hostile, could make a worker allocate many times its budget. Now
    /// every frame holds what its messages take decoded, and one that
    /// takes more than the whole budget closes the connection: the worker
    /// ends with the protocol error (rule 1), whether it comes with the
    /// registration or after it. Before, the worker registered, handled
    /// it, and went on to heartbeats.
    #[test]
    fn a_scheduler_frame_that_decodes_past_the_budget_closes_the_connection() {
        const BUDGET: usize = 1 << 20;
        let flood = frame_of(&ToWorker::PeerLeft { id: WorkerId(9) }, 16_000);
        // What the old code read: within rule 5, past the budget.
        let (_, decoded) =
            crate::protocol::decode_sized::<ToWorker>(&flood[4..], usize::MAX).unwrap();
        assert!(flood.len() < net::SMALL_FRAME && decoded > 2 * BUDGET);
        let registered = crate::protocol::frame(&ToWorker::Registered { id: WorkerId(1) });
        let heartbeat = crate::protocol::frame(&ToWorker::Heartbeat { every_ms: 100 });
        let past_the_budget = |e: &Error| {
            matches!(
                e,
                Error::Protocol {
                    reason: ProtocolError::OutOfRange { what, .. }
                } if *what == crate::protocol::PAST_THE_BUDGET
            )
        };
        let auth = Auth::Token(crate::Token::generate().unwrap());
        let options = || {
            Options::default()
                .auth(auth.clone())
                .death_timeout(Duration::ZERO)
        };
        let limits = || net::Limits::new(BUDGET, Duration::from_secs(30));
        // With the registration, in its frame: the worker does not start.
        let frames = vec![
            joined(&[registered.clone(), flood.clone()]),
            heartbeat.clone(),
        ];
        let (address, scheduler) = a_scheduler_sending(auth.clone(), frames);
        match started_within(&address, options(), limits()) {
            Err(e) => assert!(past_the_budget(&e), "{e}"),
            Ok(_) => panic!("the worker registered and read on"),
        }
        assert!(scheduler.join().unwrap(), "the connection closed");
        // After it.
        let frames = vec![registered, flood, heartbeat];
        let (address, scheduler) = a_scheduler_sending(auth.clone(), frames);
        let (worker, _) = started_within(&address, options(), limits()).unwrap();
        assert!(
            scheduler.join().unwrap(),
            "the worker read on and sent heartbeats"
        );
        match worker.join() {
            Err(e) => assert!(past_the_budget(&e), "{e}"),
            Ok(()) => panic!("the worker ended well"),
        }
    }

    /// Net rule 8 on the data port, as a reviewer found it: a request
    /// frame of 30 000 empty `GetData`s, 60 KB (a small frame, read with no
    /// grant), decodes to 0.8 MB, outside any budget, on every connection
    /// of every authenticated reader at once. Now the requests of a frame
    /// hold what they take decoded from the connection's own budget
    /// (`net::Limits::requests`, 128 KiB) while they are answered: this
    /// frame closes the connection, and the request after it is never
    /// read. Before, both were read and the second answered.
    #[test]
    fn a_request_frame_that_decodes_past_its_budget_closes_the_data_connection() {
        use crate::protocol::{FromPeer, ToPeer};
        let flood = frame_of(&ToPeer::GetData { keys: Vec::new() }, 30_000);
        let (_, decoded) =
            crate::protocol::decode_sized::<ToPeer>(&flood[4..], usize::MAX).unwrap();
        assert!(flood.len() < net::SMALL_FRAME && decoded > 4 * net::SMALL_FRAME);
        let (_scheduler, worker, auth) = worker_of_a_scheduler();
        let data_address = worker.data_address;
        let runtime = net::runtime().unwrap();
        let limits = net::Limits::standard();
        let wait = Duration::from_secs(30);
        let key = [7; 32];
        let answered = runtime.block_on(async {
            let connected = data_connection(data_address, &auth, &limits).await;
            let writer = net::spawn_writer(connected.write, &limits, None);
            writer.send(flood).unwrap();
            let mut ask = Batch::default();
            ask.push(&ToPeer::GetData { keys: vec![key] });
            // The connection may be closed already.
            let _ = net::send_batch(&writer, &mut ask);
            let mut read = connected.read;
            match tokio::time::timeout(wait, read.next_messages::<FromPeer>()).await {
                Ok(Ok(Some(got))) => got.msgs,
                Ok(_) => Vec::new(),
                Err(_) => panic!("the data port neither answered nor closed"),
            }
        });
        assert!(
            answered.is_empty(),
            "the frame was read and the next request answered: {answered:?}"
        );
        worker.stop();
    }

    #[test]
    fn options_come_from_the_environment_and_bad_values_are_errors() {
        let env = |grace: Option<&str>, supervised: Option<&str>| {
            Options::default().with_env(|name| match name {
                GRACE_ENV => grace.map(Into::into),
                SUPERVISED_ENV => supervised.map(Into::into),
                _ => None,
            })
        };
        let options = env(None, None).unwrap();
        assert_eq!((options.grace, options.supervised), (GRACE, false));
        assert_eq!(options.death_timeout, DEATH_TIMEOUT);
        let options = env(Some("2.5"), Some("1")).unwrap();
        assert_eq!(options.grace, Duration::from_millis(2500));
        assert!(options.supervised);
        assert!(!env(None, Some("0")).unwrap().supervised);
        for (grace, supervised, name) in [
            (Some("soon"), None, GRACE_ENV),
            (Some("-1"), None, GRACE_ENV),
            (Some("inf"), None, GRACE_ENV),
            (None, Some("yes"), SUPERVISED_ENV),
        ] {
            match env(grace, supervised) {
                Err(Error::Env { name: n, .. }) => assert_eq!(n, name),
                other => panic!("{grace:?} {supervised:?}: {other:?}"),
            }
        }
        let text = env(Some("soon"), None).unwrap_err().to_string();
        assert_eq!(
            text,
            "RASK_WORKER_GRACE=\"soon\" is not valid: expected a number of seconds"
        );
        // Rule 17: leaving on SIGTERM, on unless turned off.
        let leave = |value: &str| {
            Options::default().with_env(|name| (name == LEAVE_ON_SIGTERM_ENV).then(|| value.into()))
        };
        assert!(Options::default().leave_on_sigterm);
        assert!(leave("1").unwrap().leave_on_sigterm);
        assert!(!leave("0").unwrap().leave_on_sigterm);
        let text = leave("no").unwrap_err().to_string();
        assert_eq!(
            text,
            "RASK_WORKER_LEAVE_ON_SIGTERM=\"no\" is not valid: expected `1` or `0`"
        );
    }

    #[test]
    fn the_memory_limit_and_spill_directory_come_from_the_environment() {
        let env = |limit: &str, dir: &str| {
            Options::default().with_env(|name| match name {
                MEMORY_LIMIT_ENV => Some(limit.into()),
                SPILL_DIR_ENV => Some(dir.into()),
                _ => None,
            })
        };
        let options = env("200MiB", "/scratch").unwrap();
        assert_eq!(options.memory_limit, Some(200 << 20));
        assert_eq!(options.spill_dir, Some("/scratch".into()));
        assert_eq!(env("none", "").unwrap().memory_limit, None);
        assert_eq!(env("none", "").unwrap().spill_dir, None);
        assert_eq!(Options::default().memory_limit, None);
        let text = env("lots", "").unwrap_err().to_string();
        assert!(
            text.starts_with("RASK_WORKER_MEMORY_LIMIT=\"lots\" is not valid: expected a size"),
            "{text}"
        );
    }

    #[test]
    fn the_death_timeout_comes_from_the_environment_in_seconds() {
        let env = |value: &str| {
            Options::default().with_env(|name| (name == DEATH_TIMEOUT_ENV).then(|| value.into()))
        };
        let timeout = |value| env(value).unwrap().death_timeout;
        assert_eq!(timeout("0"), Duration::ZERO);
        assert_eq!(timeout(" 1.5 "), Duration::from_millis(1500));
        assert_eq!(timeout("120"), Duration::from_secs(120));
        for bad in ["", "soon", "-1", "inf", "NaN", "1e300"] {
            match env(bad) {
                Err(Error::Env { name, value, .. }) => {
                    assert_eq!((name, value.as_str()), (DEATH_TIMEOUT_ENV, bad))
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(
            env("soon").unwrap_err().to_string(),
            "RASK_WORKER_DEATH_TIMEOUT=\"soon\" is not valid: expected a number of seconds"
        );
    }
}
