//! The distributed executor of rask: a scheduler, worker processes and a
//! client, speaking a small binary protocol over TCP.
//!
//! A [`Client`] is an [`Executor`](rask_executor::Executor): `submit` sends
//! a plan's tasks to the scheduler as one graph, and each output's value
//! comes back from a worker that holds it — or, when the reporter asks to
//! [`keep_remote`](rask_executor::Reporter::keep_remote), stays there behind
//! a [`Remote`](rask_executor::Remote) handle that later graphs of the same
//! client use in place. The scheduler places tasks on
//! workers; workers run them on their own threads, fetch inputs from each
//! other and keep results until no client or pending task needs them.
//!
//! ```no_run
//! use rask_distributed::{scheduler, worker, Auth, Client};
//! # fn registry() -> std::sync::Arc<dyn rask_executor::Registry> { unimplemented!() }
//! // One process can hold them all (tests); normally the scheduler is the
//! // `rask-scheduler` binary or a `LocalCluster`, and workers are the
//! // user's program started with `RASK_WORKER=tcp://host:port`.
//! let sched = scheduler::serve("127.0.0.1:0".parse().unwrap())?;
//! let address = format!("tcp://{}", sched.address());
//! // A scheduler of its own makes a fresh token; every process proves it.
//! let auth = Auth::Token(sched.token().expect("authenticated").clone());
//! let options = worker::Options::default().auth(auth.clone());
//! let _workers = [
//!     worker::spawn_with(&address, registry(), options.clone())?,
//!     worker::spawn_with(&address, registry(), options)?,
//! ];
//! let client = Client::connect_with(&address, auth)?;
//! // client.submit(plan, reporter) — see rask_executor::Executor.
//! # Ok::<(), rask_distributed::Error>(())
//! ```
//!
//! # Starting workers
//!
//! A worker is the user's own binary in worker mode, because only that
//! binary has the user's functions in its registry. The program checks
//! [`WORKER_ENV`] first thing in `main` and, when it is set, runs
//! [`worker::run`] instead of its own code. [`LocalCluster`] starts worker
//! processes that way; on other machines, start
//! `RASK_WORKER=tcp://scheduler-host:8786 ./my-app` by hand. A worker whose
//! program forgot the check runs `main` again; if that `main` starts a
//! cluster, [`LocalCluster::start`] refuses with [`Error::NestedCluster`]
//! instead of recursing. A worker serves only clients of its own build of
//! the program ([`BuildId`]): after a rebuild, start the workers again. A
//! [`LocalCluster`]'s command best starts `/proc/self/exe` on Linux, as the
//! `rask` crate's does: the file the program started from, even after a
//! rebuild replaced it, so its workers (restarted ones too) are always its
//! own build.
//!
//! A worker started by hand waits for its scheduler: started before it,
//! or having lost it (a restart, a network failure), it tries again for up
//! to its death timeout ([`DEATH_TIMEOUT_ENV`], 60 s by default, `0` not
//! to wait) and registers as a new worker once the scheduler answers
//! ([`worker`] rule 1). A [`LocalCluster`]'s workers are started with a
//! death timeout of 0: their scheduler is in the program's own process, so
//! they exit with it.
//!
//! # Authentication
//!
//! Every TCP connection — client to scheduler, worker to scheduler, peer
//! to a worker's data port — starts with a mutual challenge–response over
//! the cluster's [`Token`], so a process that does not hold it is refused
//! before it can send or receive anything else (`auth.rs` rules). On by
//! default: a [`LocalCluster`] makes a fresh token and hands it to its
//! workers ([`TOKEN_ENV`]); [`scheduler::serve`] makes one too
//! ([`SchedulerHandle::token`](scheduler::SchedulerHandle::token)); the
//! `rask-scheduler` binary keeps one in a file; clients and workers find it
//! as [`Auth::from_env`] says, and refuse to start without one unless told
//! the cluster is insecure ([`INSECURE_ENV`]). The token proves membership,
//! nothing more: over `tcp://` traffic is not encrypted, so someone who can
//! watch or alter packets between two processes can read values and take
//! over a connection after its handshake.
//!
//! # TLS
//!
//! A `tls://host:port` address runs every connection of the cluster over
//! TLS (rustls, TLS 1.3), with the token proved inside it: [`Tls`] holds a
//! process's CA and certificate ([`Tls::from_env`]: [`TLS_CA_ENV`],
//! [`TLS_CERT_ENV`], [`TLS_KEY_ENV`]); [`scheduler::Options::tls`] serves it
//! (with a CA: mutual TLS), [`Client::connect_tls`] and
//! [`worker::Options::tls`] connect with it, and workers' data ports serve
//! it too (`tls.rs` rules).
//!
//! # Design
//!
//! - **Sans-IO cores, thin async shells.** The scheduler's task state
//!   machine (`scheduler/state.rs`) and the worker's (`worker/state.rs`) are
//!   plain structs with `on_<fact>` handlers writing to an outbox; tokio only
//!   moves bytes. The hard logic is unit-tested without sockets, clocks or
//!   threads. See `scheduler/README.md` for the state machine.
//! - **A simulated cluster tests the real scheduler.** [`sim`] runs the
//!   scheduler's state machine with simulated workers on a seeded clock,
//!   with faults injected at chosen steps, so a failure replays from its
//!   seed (`RASK_SCHEDULER=sim-cluster:W:SEED` in the `rask` crate).
//! - **Batched everything.** A frame holds many messages; every shell
//!   handles all input already queued before it flushes one frame per peer.
//!   A map of 100 000 tasks costs a few hundred frames, not a few hundred
//!   thousand round trips.
//! - **Windows, not stealing.** The scheduler hands each worker a bounded
//!   window of tasks (two per thread for slow tasks, up to 64 per thread for
//!   very short ones) and keeps the rest in one priority queue. A worker with
//!   room takes the next task even if its inputs are elsewhere (it fetches
//!   them), so idle workers never starve, and no task is stuck behind a long
//!   one for more than a window. Placement prefers the worker holding most of
//!   a task's input bytes.
//!   A task whose inputs are all being computed on one worker is sent there
//!   at once and waits for them on the worker, so a chain of tasks costs no
//!   scheduler hop per link. When a worker runs dry while another holds
//!   queued tasks, the scheduler asks that worker to give one up and sends
//!   it to the idle worker only once it was given up (it had not started),
//!   so a moved task never runs twice; a worker paused for memory is sent
//!   nothing, and its queued tasks move the same way.
//! - **Data moves peer to peer.** Values are fetched from a worker's data
//!   port directly, by workers and by clients; the scheduler only knows who
//!   has what. The exception is small values (at most 1 KiB encoded): they
//!   travel with the task's report through the scheduler to the clients that
//!   want them, since a fetch would cost a round trip per result.
//! - **Everything is recomputable.** The scheduler keeps every task's spec
//!   while anything refers to it, including data tasks (`rask.value`), so a
//!   value lost with a worker is recomputed from its inputs.
//! - **A scheduler restart costs values, not workers.** A worker that loses
//!   its scheduler drops what it held and registers again, as a new
//!   worker, when a scheduler answers at the same address within its death
//!   timeout. It does not offer its old values to the new scheduler, which
//!   would then have to trust results of tasks it never placed; that
//!   scheduler recomputes what its clients need instead, on workers whose
//!   threads, pool and data port carried on.
//! - **One thread per role.** Each scheduler, worker and client runs a
//!   single-threaded tokio runtime on its own thread; workers run ops on
//!   separate plain threads. No multi-threaded runtime, no locks on the
//!   scheduler's hot path. A scheduler accepts connections and takes them
//!   through their handshakes (TLS's, the token's) on a second thread of
//!   its own, so that a peer that has not authenticated spends none of
//!   the state's thread; once authenticated, a connection is served on the
//!   state's. A worker does the same for its data port, so that none
//!   spends its network thread. The exception is a client of a scheduler in the
//!   same process ([`LocalCluster::client`], [`in_process_client`]): it
//!   shares the scheduler's thread and hands it frames (the same as over
//!   TCP) through in-memory channels, so a message between them costs no
//!   system call, no copy through a socket and no thread hand-off. A
//!   worker's runtime is driven by one thread at a time, not always the
//!   same one: its network thread runs very short tasks itself, outside
//!   the runtime, and when one of them hangs a watchdog hands the runtime
//!   to a new thread ([`worker`] rule 9), so a hang never silences a
//!   worker.
//! - **A stuck task costs a thread, not a worker.** Cancellation is
//!   cooperative, so a task that ignores it keeps its thread. The worker
//!   starts another thread in its place at once, so the thread count the
//!   scheduler plans with stays true; if the task is still running after a
//!   grace period (30 s, [`GRACE_ENV`]), as for a task abandoned at its
//!   timeout, the worker says it is unhealthy on stderr, and a worker of a
//!   [`LocalCluster`] exits to be restarted ([`RESTART_EXIT_CODE`]); a
//!   worker started by hand goes on with its replacement threads.
//! - **Builds never meet.** A key names a task's function by path, not by
//!   its code, so a worker left running from an older build of the program
//!   would compute another value under the same key. Every process sends
//!   its [`BuildId`] (blake3 of its executable) in its handshake, and the
//!   scheduler keeps one task state per build: tasks, keys and workers of
//!   one build never meet another's. A client whose build has no worker
//!   while others do gets an error naming the builds at once, not a wrong
//!   value and not a wait; with no worker at all it waits, as ever. A
//!   worker's data port serves only its own build.
//! - **Trust is per connection, checked once.** The handshake proves the
//!   token both ways; after it, a connection is trusted for what its role
//!   may send, and the scheduler still checks each report against what it
//!   asked of that very worker (`scheduler/README.md`, S6 and S10–S12): a
//!   result only from the worker the task was sent to, for the run it was
//!   sent (each `Compute` names one), a fetched copy only
//!   of an input of a task sent to it, a failed fetch only of a key the
//!   sender needs, naming a holder it was told of. A process holding the
//!   token can still run any registered function; no code is shipped.
//! - **Faults close one connection.** A bad handshake, an oversized or
//!   malformed frame, a number out of the range the protocol allows for it
//!   (a thread count, a size, a duration; see [`protocol`]), or a message a
//!   role may not send closes that connection with a warning (a `tracing`
//!   event, see [`init_logging`]); the rest of the cluster carries on.
//! - **Limits before trust.** Until its handshake passed, a connection may
//!   send that handshake only (a hello of 76 bytes and a proof of 36, within
//!   10 s), and at most 256 connections wait so on a socket: a new one
//!   closes the oldest.
//!   After it, what any peer can make a process hold is bounded: frames
//!   over 64 KiB are granted from a budget of 1 GiB per process (a
//!   scheduler's [`scheduler::Options::frame_budget`]) as their bytes
//!   arrive, and wait for room, unread, instead of being allocated, so a
//!   peer that announces a big frame and sends little holds little; a
//!   frame trickled in (slower than 1 MiB/s, after a stall timeout of
//!   30 s), or a peer that stops reading its answers for the stall
//!   timeout, is closed; a server stops
//!   reading a peer with more than 64 MiB of answers waiting for it;
//!   clients send heartbeats and a silent one is closed after a minute;
//!   connections are capped per role from the limit of open files; and
//!   lines a peer can make a process log are rate-limited.
#![warn(missing_docs)]

mod auth;
mod build;
mod client;
mod cluster;
mod dashboard;
mod handshake;
mod logging;
mod nested;
mod net;
pub mod protocol;
pub mod scheduler;
pub mod sim;
mod tls;
pub mod worker;

use std::process::ExitStatus;
use std::time::Duration;

pub use auth::{Auth, AuthError, Token, INSECURE_ENV, TOKEN_ENV, TOKEN_FILE_ENV};
pub use build::BuildId;
pub use client::Client;
#[doc(hidden)]
pub use client::LoopTables;
pub use cluster::{in_process_client, LocalCluster};
pub use logging::{init_logging, LOG_ENV};
pub use nested::{task_cluster, TaskCluster};
pub use protocol::ProtocolError;
pub use tls::{Tls, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV};
pub use worker::WorkerHandle;

/// The environment variable a worker process reads: the `tcp://host:port`
/// of its scheduler.
pub const WORKER_ENV: &str = "RASK_WORKER";

/// The environment variable giving a worker process its compute threads
/// (tasks run at once): 1 to [`protocol::MAX_THREADS`]. A worker started
/// by hand without it (or `--nthreads`) runs one per core; a
/// [`LocalCluster`]'s workers share the machine's cores (see
/// [`worker::Options::from_process`]).
pub const WORKER_THREADS_ENV: &str = "RASK_WORKER_THREADS";

/// The environment variable naming a worker process (like `--name`): 1 to
/// [`protocol::MAX_WORKER_NAME`] bytes, no whitespace or control
/// characters, unique among its scheduler's workers (a second worker of
/// the same name is refused). Default `host-pid`.
pub const WORKER_NAME_ENV: &str = "RASK_WORKER_NAME";

/// What a worker started by hand accepts on its command line, for errors
/// and documentation (see [`worker::Options::from_process`]).
pub const WORKER_USAGE: &str = "a rask worker (RASK_WORKER=tcp://host:port ./program [options]) \
takes: --nthreads N (tasks run at once, 1 to 4096; or RASK_WORKER_THREADS; default: the \
machine's cores), --name NAME (unique among the scheduler's workers, no whitespace; or \
RASK_WORKER_NAME; default: host-pid), --resources NAME=AMOUNT[,…] (e.g. GPU=2,MEM=64e9; or \
RASK_WORKER_RESOURCES; default: none), --memory-limit SIZE (e.g. 200MiB, 2GB, 0.5 of the \
machine, auto, none; or RASK_WORKER_MEMORY_LIMIT; default: none)";

/// The environment variable giving a worker process its grace period, in
/// seconds (`2.5` allowed; default 30): how long a thread may stay in a
/// task after its cancellation or timeout before the worker is unhealthy
/// (see [`worker::Options::grace`]).
pub const GRACE_ENV: &str = "RASK_WORKER_GRACE";

/// The environment variable giving a worker process its death timeout, in
/// seconds (`2.5` allowed, `0` not to wait; default 60): how long it tries
/// to reach its scheduler, when it starts and after losing it, before it
/// gives up (see [`worker::Options::death_timeout`]).
pub const DEATH_TIMEOUT_ENV: &str = "RASK_WORKER_DEATH_TIMEOUT";

/// The environment variable giving a worker process its memory limit
/// (see [`worker::Options::memory_limit`]): a size (`200MiB`, `2GB`,
/// `1.5GiB`, a number of bytes), a fraction of the machine's memory
/// (`0.5`), `auto` (all of it) or `none`/`0` (no limit, the default for a
/// worker started by hand). A [`LocalCluster`] sets it on its workers to
/// their share of the machine unless this process has it set.
pub const MEMORY_LIMIT_ENV: &str = "RASK_WORKER_MEMORY_LIMIT";

/// The environment variable naming the directory a worker process makes
/// its spill directory in (see [`worker::Options::spill_dir`]); the
/// system's temporary directory when unset.
pub const SPILL_DIR_ENV: &str = "RASK_WORKER_SPILL_DIR";

/// The environment variable a supervisor sets to `1` in the worker
/// processes it restarts ([`LocalCluster`] does): an unhealthy worker then
/// exits with [`RESTART_EXIT_CODE`] (see [`worker::Options::supervised`]).
pub const SUPERVISED_ENV: &str = "RASK_WORKER_SUPERVISED";

/// The environment variable that, set to `0`, keeps `SIGTERM`'s default
/// in a worker process: it ends at once instead of leaving without loss
/// ([`worker::Options::leave_on_sigterm`], `worker` rule 17).
/// [`LocalCluster`] sets it: its program owns its workers' lives.
pub const LEAVE_ON_SIGTERM_ENV: &str = "RASK_WORKER_LEAVE_ON_SIGTERM";

/// The environment variable declaring a worker process's resources, e.g.
/// `GPU=2,MEM=64e9` (see [`worker::Options::resources`] and
/// [`worker::parse_resources`]).
pub const RESOURCES_ENV: &str = "RASK_WORKER_RESOURCES";

/// The exit status of a worker process that refused a setting of its own
/// before connecting: a variable such as [`MEMORY_LIMIT_ENV`] or an
/// argument it cannot use, said on its stderr (2, a usage error, as
/// command-line tools give). It started as a worker: a
/// [`LocalCluster`] whose worker exits so does not ask whether the program
/// sets worker mode up ([`Error::WorkerExited`]).
pub const SETTINGS_EXIT_CODE: i32 = 2;

/// The exit status of a supervised worker process that asks to be
/// restarted because a thread is stuck in a task (75, `EX_TEMPFAIL` of
/// `sysexits.h`: a temporary failure, try again).
pub const RESTART_EXIT_CODE: i32 = 75;

/// What the message of [`Error::WorkerExited`] adds to the exit `status`.
fn worker_exit_hint(status: &ExitStatus) -> &'static str {
    if status.code() == Some(SETTINGS_EXIT_CODE) {
        "it refused a setting, named in its stderr printed above"
    } else {
        "its stderr is printed above; does the program call rask's worker-mode setup first \
         thing in main?"
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A local I/O operation (bind, spawn a thread, build a runtime) failed.
    #[error("i/o error")]
    Io(#[source] std::io::Error),
    /// An address is not `tcp://host:port`, `tls://host:port`,
    /// `host:port` or `unix:PATH`.
    #[error(
        "invalid address `{address}`: expected `tcp://host:port`, `tls://host:port`, \
         `host:port` or `unix:PATH`"
    )]
    Address {
        /// The address as given.
        address: String,
    },
    /// Connecting to a scheduler failed. The reason is part of the
    /// message (it is not a [`source`](std::error::Error::source)): a
    /// program printing `{e}` shows it.
    #[error("could not connect to {addr}: {reason}")]
    Connection {
        /// The address.
        addr: String,
        /// Why.
        reason: std::io::Error,
    },
    /// The scheduler's dashboard cannot listen on its address
    /// ([`scheduler::Options::dashboard`]): the port is taken, say. The
    /// reason is part of the message.
    #[error("cannot serve the dashboard on {addr}: {reason}")]
    Dashboard {
        /// The dashboard's address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: std::io::Error,
    },
    /// The other side is not a rask process of this protocol version.
    #[error("handshake with {addr} failed")]
    Handshake {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        reason: ProtocolError,
    },
    /// The handshake with a scheduler or data port failed to authenticate:
    /// one side has a token and the other none, or their tokens differ.
    /// The message says which, and what to set.
    #[error("{}", reason.describe(*peer, addr))]
    Auth {
        /// The address.
        addr: String,
        /// What this process was connecting to.
        peer: protocol::Role,
        /// What went wrong.
        reason: AuthError,
    },
    /// A client or worker found no token and was not told the cluster is
    /// insecure ([`Auth::from_env`]).
    #[error(
        "no token for the cluster: set {TOKEN_ENV} to the scheduler's token, or \
         {TOKEN_FILE_ENV} to a file holding it, or copy it to {}; or set {INSECURE_ENV}=1 \
         for a scheduler started with --insecure",
        default_path.as_ref().map_or_else(|| "$HOME/.rask/token".to_owned(), |p| p.display().to_string())
    )]
    NoToken {
        /// The per-user token file looked for, if `HOME` is set.
        default_path: Option<std::path::PathBuf>,
    },
    /// A token's text is not 64 hex digits. The text itself is not
    /// repeated: it may be a secret mistyped.
    #[error("{from} does not hold a rask token (64 hex digits, as rask-scheduler writes)")]
    BadToken {
        /// Where the text came from: a variable's name or a file's path.
        from: String,
    },
    /// A token file could not be read or created. The reason is part of
    /// the message.
    #[error("cannot use the token file {}: {reason}", path.display())]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// [`INSECURE_ENV`] is `1` and a token is given too: one of them is a
    /// mistake.
    #[error(
        "{INSECURE_ENV}=1 is set together with a token ({TOKEN_ENV} or {TOKEN_FILE_ENV}); \
         unset one of them"
    )]
    AuthConflict,
    /// A TLS file (CA, certificate, key) cannot be read. The reason is
    /// part of the message.
    #[error("cannot read the TLS {what} file {}: {reason}", path.display())]
    TlsFile {
        /// Which file: `CA`, `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// A TLS file holds nothing of what it should, in PEM form.
    #[error("{} holds no {what} in PEM form", path.display())]
    BadPem {
        /// What was looked for: `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
    },
    /// TLS settings that cannot be used as they are: a part missing for
    /// what the process does, a key that does not match its certificate.
    #[error("TLS settings: {problem}")]
    TlsSettings {
        /// What is wrong, and what to set.
        problem: &'static str,
        /// The TLS library's reason, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The TLS handshake with a scheduler or a data port failed: an
    /// unknown CA, a certificate that does not name the host, a client
    /// certificate missing or refused, a peer that does not speak TLS.
    #[error("TLS handshake with {addr} failed: {reason}{hint}")]
    Tls {
        /// The address.
        addr: String,
        /// The TLS library's reason.
        reason: std::io::Error,
        /// What to check, when the reason says (empty otherwise).
        hint: &'static str,
    },
    /// The peer at a `tcp://` address speaks TLS.
    #[error(
        "{addr} speaks TLS: connect with `tls://{addr}`, with RASK_TLS_CA set to the CA of its \
         certificate"
    )]
    TlsRequired {
        /// The address.
        addr: String,
    },
    /// The other side broke the protocol after the handshake.
    #[error("protocol error")]
    Protocol {
        /// Why.
        #[source]
        reason: ProtocolError,
    },
    /// Something took too long.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// A worker process exited before it registered with its scheduler.
    /// Workers write to this process's stderr, so what it wrote there is
    /// printed above the error. The message asks whether the program sets
    /// worker mode up unless the worker exited with
    /// [`SETTINGS_EXIT_CODE`]: then it started as a worker and refused a
    /// setting.
    #[error(
        "worker process {index} exited before registering ({status}); {}",
        worker_exit_hint(status)
    )]
    WorkerExited {
        /// Which worker.
        index: usize,
        /// Its exit status.
        status: ExitStatus,
    },
    /// A worker process could not be started.
    #[error("could not start worker process {index}")]
    Spawn {
        /// Which worker.
        index: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A worker process tried to start a cluster of its own.
    #[error(
        "this process is a rask worker ({WORKER_ENV} is set) but ran the program's main and \
         tried to start a cluster; call rask's worker-mode setup first thing in main"
    )]
    NestedCluster,
    /// An environment variable a worker reads has a value it cannot use.
    #[error("{name}={value:?} is not valid: expected {expected}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// A worker process started by hand got a command-line argument it
    /// does not take, or a value it cannot use ([`WORKER_USAGE`]).
    #[error("worker argument {arg:?}: {problem}; {WORKER_USAGE}")]
    Arg {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The scheduler refused to register this worker (its name is taken).
    #[error("the scheduler refused this worker: {reason}")]
    Refused {
        /// The scheduler's reason.
        reason: String,
    },
    /// No worker of these names, or a retirement that would leave no
    /// worker ([`Client::retire_workers`]).
    #[error("cannot retire workers: {reason}")]
    Retire {
        /// The scheduler's reason.
        reason: String,
    },
    /// No such worker in a [`LocalCluster`], or it was killed already.
    #[error("no running worker {index} in this cluster")]
    NoWorker {
        /// The index asked for.
        index: usize,
    },
}
