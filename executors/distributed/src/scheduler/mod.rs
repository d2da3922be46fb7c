//! The scheduler: a sans-IO state machine ([`state`](self)) behind a thin
//! tokio shell.
//!
//! The shell accepts connections, checks handshakes, decodes frames into
//! messages and hands them to the state machine's `on_<fact>` handlers one by
//! one; what the handlers send is collected per connection and written as one
//! frame per connection after every burst of input. The task state machine
//! is described in `README.md` beside this file.
//!
//! Rules:
//!
//! 1. One thread owns the state; connection tasks only decode and forward.
//! 2. A connection that breaks the protocol (bad handshake, oversized or
//!    malformed frame, a number out of its range, a message its role may
//!    not send) is closed with a logged reason; for a worker that is the same as the worker dying, for a
//!    client the same as it disconnecting. Everyone else is unaffected.
//! 3. Outgoing messages are flushed after the input that caused them and all
//!    input already queued behind it was handled: many small messages to one
//!    peer become one frame and one write.
//! 4. A worker is told to send a heartbeat every fifth of
//!    [`Options::worker_timeout`] (kept within the protocol's
//!    [`MIN_HEARTBEAT`]..=[`MAX_HEARTBEAT`]); one the scheduler hears nothing from for
//!    that long is closed as if it had died (rule 2): hung, stopped, or on
//!    a machine that became unreachable, it would otherwise hold its tasks
//!    and values for ever. A client connected over TCP sends a heartbeat
//!    every second it sends nothing else, and one silent for
//!    [`Options::client_timeout`] (60 s) is closed as if it had
//!    disconnected: clients are long-lived and often idle, so the timeout
//!    is long, and only a client that hung or vanished reaches it. A
//!    client of this process (through memory) is never timed out. A peer
//!    this side stopped reading (rule 8, or a frame waiting for its budget)
//!    is not blamed for the silence meanwhile. Bytes of a frame under way
//!    count as heard (their reader moves a count, `net` rule 9, which the
//!    check reads), so a peer whose big frame takes longer than its
//!    timeout to arrive is not taken for silent while its bytes keep
//!    coming: a client's graph of 512 MiB over a link of 5 MB/s takes
//!    almost two minutes.
//! 5. Builds never meet. Every connection belongs to the *partition* of its
//!    build ([`BuildId`], from its handshake; a client of this process
//!    through memory is of this process's build), and each partition is a
//!    state machine of its own: the tasks, keys, references and workers of
//!    one build are invisible to every other, so equal keys sent by
//!    different code never share a value, and a worker only ever runs tasks
//!    of its own program. A partition comes with its first connection and
//!    goes with its last. Ids are connection numbers, unique across
//!    partitions. (`README.md`, B1 to B4.)
//! 6. A client's graph whose build has no worker while other builds have
//!    some is refused at once: each wanted key is answered `KeyErred`,
//!    naming the client's build and every other build with its number of
//!    workers, and the graph is not added. With no worker at all, graphs
//!    wait for workers as before; so does a graph accepted then, even if
//!    only workers of other builds register later.
//! 7. Only authenticated connections reach the state loop: a connection is
//!    announced to it (`Event::Connected`) once `net::accept_detached` returned,
//!    i.e. once its peer proved the scheduler's token ([`Options::auth`];
//!    `auth.rs` rules). A refused peer gets the scheduler's hello and
//!    nothing else, and costs one log line. What an authenticated worker
//!    may report is then checked by the state machine (README.md, S6 and
//!    S10 to S12).
//! 8. **Limits before trust** (`net` rules 5 to 10). A connection is
//!    pre-auth until `net::accept_detached` returns: it may send its
//!    handshake only, within 10 s, and at most 256 of them wait at once
//!    (the oldest makes room for a new one). Connections are accepted and
//!    taken through their handshakes (TLS's, then the token's) on a thread
//!    of their own, `rask-handshake`, never the state's: what a peer that
//!    has not authenticated makes the scheduler compute (a TLS key
//!    exchange and signature, the token's proofs) can hold up other
//!    handshakes, not the state loop nor an authenticated connection. An
//!    authenticated connection moves to the state's thread (`net` rule 12)
//!    and is served there. Once authenticated, its frames are read within
//!    the scheduler's budget ([`Options::frame_budget`]), granted as their
//!    bytes arrive (a peer that announces a big frame and sends little
//!    holds little), which also
//!    holds what a frame's messages take decoded until the state loop
//!    handled them, and its stall
//!    timeout ([`Options::stall_timeout`]); while more than 64 MiB wait to
//!    be sent to it, its own frames are not read (and its reader lets the
//!    state loop answer every 4 MiB it read, so that count is up to date:
//!    `READ_AHEAD`); a client with more than
//!    [`CLIENT_BACKLOG`] waiting is closed (its answers are small, so only
//!    a client that stopped reading gets there; a worker is sent tasks with
//!    their inputs, as big as clients made them, and is closed only when it
//!    reads nothing for the stall timeout). Connections are capped from the
//!    limit of open files, per role and in total, and accepting backs off
//!    when it fails. Every line a peer can make the scheduler log is
//!    rate-limited.
//! 9. **Watching.** A client that asks (`Watch`) is sent the task events
//!    of its build's partition as they happen, batched with everything
//!    else; when no client watches a build, no event of it is built. With a
//!    dashboard ([`Options::dashboard`]) every partition's events are kept
//!    in a bounded history (`watch.rs`) and a snapshot of the cluster is
//!    published on the dashboard's board after each flush; the dashboard
//!    server, on a thread of its own, reads the board and never touches
//!    the state (dashboard rule 3). What the events count is kept for
//!    every build (the dashboard) and for each build apart: a client's
//!    `Info` shows its own build's work only (rule 5).
//! 10. **A connection number names one connection.** It is drawn when the
//!     socket is accepted, before the handshake, and stays in use until
//!     the connection's `Closed` was sent; a number in use is never drawn
//!     again, whatever the count of connections made and closed before
//!     (the count wraps at 2^32), and [`NO_HOLDER`]'s never is. So the
//!     state loop hears of a number's `Closed` before any later `Connected`
//!     with it, and a `Connected` never finds its number taken (were it
//!     ever, the newcomer is closed, never the live one).

mod placement;
mod ready;
pub(crate) mod state;
mod watch;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rask_executor::diagnostics::Spill;
use rask_executor::{Failure, FailureKind, Key};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::dashboard::{self, Access, Board};
use crate::net::{self, info_limited, log_limited, Chain};
use crate::protocol::{
    Batch, KeyMap, ProtocolError, Role, TaskSpec, ToClient, ToScheduler, ToWorker, WireEvent,
    WireFailure, WireKey, WorkerId, MAX_HEARTBEAT, MIN_HEARTBEAT, NO_HOLDER,
};
use crate::tls::Acceptor;
use crate::{Auth, BuildId, Error, Tls, Token, WORKER_ENV};
use state::{ClientId, Outbox, Reporter, State};
use watch::{History, WorkerShell};

/// The most bytes waiting to be sent to one client before it is closed
/// (rule 8), 256 MiB: a client is sent reports of at most
/// [`INLINE_BYTES`](crate::protocol::INLINE_BYTES) each, so this is a
/// quarter of a million of them unread.
pub const CLIENT_BACKLOG: usize = 256 << 20;

/// The bytes of frames a connection's reader hands the state loop before it
/// lets the state loop run (rule 8): the pause for a peer that does not read
/// counts the answers of what was read, so a reader must not run far ahead
/// of the state loop. Far more than a burst of ordinary frames.
const READ_AHEAD: usize = 4 << 20;

/// A scheduler running on a background thread; dropping it shuts it down.
///
/// # Examples
///
/// ```
/// let mut scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
/// assert_ne!(scheduler.address().port(), 0);
/// scheduler.shutdown();
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub struct SchedulerHandle {
    address: SocketAddr,
    /// Where the dashboard answers, if it runs.
    dashboard: Option<SocketAddr>,
    /// The dashboard's server, on a thread of its own.
    dashboard_server: Option<dashboard::Server>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    counts: Arc<Counts>,
    /// The scheduler thread's runtime, for a client of this process to run
    /// its connection on that thread ([`crate::LocalCluster::client`]).
    runtime: tokio::runtime::Handle,
    /// Hands the scheduler its end of an in-memory connection, and the
    /// client's build.
    locals: mpsc::UnboundedSender<(net::LocalEnd, BuildId)>,
    /// What every TCP peer must prove (rule 7).
    auth: Arc<Auth>,
    /// The TLS settings it serves with.
    tls: Option<Tls>,
    /// The Unix socket it also listens on ([`Options::unix`]), and the
    /// guard that removes its file at shutdown.
    unix: Option<(PathBuf, net::SocketFile)>,
}

/// Figures the state loop publishes after every burst of input.
#[derive(Default)]
struct Counts {
    workers: AtomicUsize,
    clients: AtomicUsize,
    tasks: AtomicUsize,
    moved: AtomicU64,
}

impl SchedulerHandle {
    /// The address the scheduler listens on (with the real port when it was
    /// started on port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The address of the web dashboard ([`Options::dashboard`]), with
    /// its real port; `None` when it does not run. Its page is
    /// `http://ADDRESS/status`.
    pub fn dashboard(&self) -> Option<SocketAddr> {
        self.dashboard
    }

    /// The Unix socket the scheduler also listens on ([`Options::unix`]),
    /// its path made absolute: processes of this machine reach it at
    /// `unix:PATH`.
    pub fn unix(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(path, _)| path.as_path())
    }

    /// Number of workers registered now, of every build.
    pub fn workers(&self) -> usize {
        self.counts.workers.load(Ordering::Acquire)
    }

    /// Number of clients connected now, of every build, those of this
    /// process (through memory) included.
    ///
    /// # Examples
    ///
    /// ```
    /// let scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
    /// assert_eq!(scheduler.clients(), 0);
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn clients(&self) -> usize {
        self.counts.clients.load(Ordering::Acquire)
    }

    /// Number of tasks the scheduler remembers now, for every build: tasks
    /// some client wants, and their inputs. Zero once every client released
    /// everything.
    pub fn tasks(&self) -> usize {
        self.counts.tasks.load(Ordering::Acquire)
    }

    /// Number of tasks moved from a busy worker to an idle one since the
    /// scheduler started, for every build: each was given up by the first
    /// worker before it started there (S15 in `scheduler/README.md`), so
    /// none ran twice.
    ///
    /// # Examples
    ///
    /// ```
    /// let scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
    /// assert_eq!(scheduler.moved(), 0);
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn moved(&self) -> u64 {
        self.counts.moved.load(Ordering::Acquire)
    }

    /// The token every client and worker must prove; `None` when the
    /// scheduler runs without authentication ([`Auth::Insecure`]). Hand it
    /// to other processes with [`Token::expose_secret`].
    ///
    /// # Examples
    ///
    /// ```
    /// let scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
    /// // A fresh token unless the options gave one.
    /// let token = scheduler.token().expect("on by default");
    /// assert_eq!(token.expose_secret().len(), 64);
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn token(&self) -> Option<&Token> {
        self.auth.token()
    }

    /// What the scheduler requires of TCP peers, for a client of this
    /// process to prove to workers' data ports.
    pub(crate) fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The TLS settings the scheduler serves with, if any: a client of
    /// this process reaches workers' data ports with them.
    pub(crate) fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The runtime of the scheduler's thread.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// A connection to this scheduler through memory rather than a socket,
    /// for a client of this process: frames are handed over as they are
    /// ([`net::LocalEnd`]), and the scheduler treats it as a client's TCP
    /// connection from this process's build (rule 5). `None` once it
    /// stopped.
    pub(crate) fn local(&self) -> Option<net::LocalEnd> {
        let (client, scheduler) = net::local_pair();
        // Hashed here, on the caller's thread, not on the scheduler's.
        let build = BuildId::current();
        self.locals.send((scheduler, build)).ok().map(|()| client)
    }

    /// Stops the scheduler and waits for its thread, and for the
    /// dashboard's. Every connection is closed, so workers exit and
    /// clients see their submissions fail. Calling it again does nothing.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A client running on this thread may hold the last reference
            // to its cluster: then the thread ends by itself once the
            // current task yields, and cannot wait for itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
        if let Some(mut server) = self.dashboard_server.take() {
            server.stop();
        }
        // Removes the socket file, once nothing listens on it.
        drop(self.unix.take());
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle")
            .field("address", &self.address)
            .finish()
    }
}

/// How a scheduler treats its peers.
#[derive(Clone, Debug)]
#[non_exhaustive]
#[must_use = "options do nothing until they are passed to `serve_with`"]
pub struct Options {
    /// A worker that sends nothing, not even a heartbeat, for this long is
    /// taken for dead and its work goes elsewhere (rule 4). Default 5 s:
    /// workers send a heartbeat every fifth of it (once a second), and a
    /// worker's network thread is never held up by a task (worker rule
    /// 9), so only a stopped or vanished worker stays silent that long.
    pub worker_timeout: Duration,
    /// How long a task without a timeout of its own may run before it fails
    /// as timed out; a task made of steps (a chain fused into one wire
    /// task) gives each step this long ([`rask_executor::Op::each_step_limited`]).
    /// Default: no limit.
    pub task_timeout: Option<Duration>,
    /// How many workers may die while running one task before the task
    /// fails instead of being run again (a task that crashes its process
    /// would otherwise take every worker down in turn). After its first
    /// such death a task runs alone on a worker, so later deaths count
    /// against the task that caused them only. Default 3, at least 1.
    pub allowed_failures: u8,
    /// What clients and workers must prove in their handshake (rule 7).
    /// Default `None`: a fresh token, made when the scheduler starts and
    /// read back with [`SchedulerHandle::token`]. `Some(Auth::Insecure)`
    /// lets anyone who can connect run the program's registered functions
    /// and read every value.
    pub auth: Option<Auth>,
    /// A client connected over TCP that sends nothing, not even a
    /// heartbeat, for this long is closed as if it had disconnected (rule
    /// 4). Default 60 s. Clients send a heartbeat every second they send
    /// nothing else, so anything much above 2 s keeps every live client.
    pub client_timeout: Duration,
    /// How long a frame may take to arrive, on top of one second per MiB
    /// of it that arrived (a peer sending slower than 1 MiB/s falls behind
    /// that, however big the frame it announced), and how long a peer may
    /// leave bytes queued for it unread, before its connection is closed
    /// (rule 8): a peer that trickles a frame byte by byte, or stopped
    /// reading. Default 30 s.
    pub stall_timeout: Duration,
    /// The most bytes of frames over 64 KiB the scheduler reads and
    /// handles at once, over every connection (rule 8), granted as they
    /// arrive; a frame whose next bytes do not fit waits for room, and its
    /// connection is not read meanwhile. A frame bigger than half the
    /// budget closes its connection, so half of this is also the biggest
    /// graph frame a client can send. Default 1 GiB, twice the largest
    /// frame; at least 16 MiB (a smaller budget counts as 16 MiB: below
    /// it, what a small frame takes decoded might not fit, and every
    /// connection would be closed at its first frame).
    pub frame_budget: usize,
    /// Where to serve the web dashboard (rule 9): `None` (the default),
    /// none; port 0 picks a free port ([`SchedulerHandle::dashboard`]).
    pub dashboard: Option<SocketAddr>,
    /// TLS: clients and workers connect with `tls://` addresses, and the
    /// scheduler presents the settings' certificate; settings with a CA
    /// require a client certificate signed by it of every client and
    /// worker (mutual TLS, `tls.rs` rule 4). Default `None`: plain TCP.
    pub tls: Option<Tls>,
    /// A Unix socket to listen on besides the TCP address: workers and
    /// clients of this machine connect with `unix:PATH`, prove the same
    /// token, and each message costs them and the scheduler no TCP/IP
    /// processing (a [`LocalCluster`](crate::LocalCluster)'s workers use
    /// one). A relative path is taken from the working directory and made
    /// absolute ([`SchedulerHandle::unix`]). A file at the path is an
    /// error, unless it is a socket nothing listens on any more (then it
    /// is replaced); the file is removed at shutdown. On Linux, `@NAME` is
    /// NAME in the abstract namespace: no file, and any process of the
    /// machine may connect (and must prove the token), as over TCP on
    /// loopback. Not with [`Options::tls`]. Default `None`.
    pub unix: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            worker_timeout: Duration::from_secs(5),
            task_timeout: None,
            allowed_failures: 3,
            auth: None,
            client_timeout: Duration::from_secs(60),
            stall_timeout: net::STALL_TIMEOUT,
            frame_budget: net::FRAME_BUDGET,
            dashboard: None,
            tls: None,
            unix: None,
        }
    }
}

impl Options {
    /// These options with another worker timeout.
    pub fn worker_timeout(mut self, timeout: Duration) -> Options {
        self.worker_timeout = timeout;
        self
    }

    /// These options with another number of allowed failures.
    pub fn allowed_failures(mut self, n: u8) -> Options {
        self.allowed_failures = n;
        self
    }

    /// These options with a default timeout for tasks that have none.
    pub fn task_timeout(mut self, timeout: Duration) -> Options {
        self.task_timeout = Some(timeout);
        self
    }

    /// These options requiring `auth` of every client and worker (rule 7).
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::scheduler::{serve_with, Options};
    /// use rask_distributed::{Auth, Token};
    /// let token = Token::generate()?;
    /// let options = Options::default().auth(Auth::Token(token.clone()));
    /// let scheduler = serve_with("127.0.0.1:0".parse().unwrap(), options)?;
    /// assert_eq!(scheduler.token().unwrap().expose_secret(), token.expose_secret());
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn auth(mut self, auth: Auth) -> Options {
        self.auth = Some(auth);
        self
    }

    /// These options with another client timeout (rule 4).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = rask_distributed::scheduler::Options::default()
    ///     .client_timeout(Duration::from_secs(300));
    /// assert_eq!(options.client_timeout, Duration::from_secs(300));
    /// ```
    pub fn client_timeout(mut self, timeout: Duration) -> Options {
        self.client_timeout = timeout;
        self
    }

    /// These options with another stall timeout (rule 8).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = rask_distributed::scheduler::Options::default()
    ///     .stall_timeout(Duration::from_secs(120));
    /// assert_eq!(options.stall_timeout, Duration::from_secs(120));
    /// ```
    pub fn stall_timeout(mut self, timeout: Duration) -> Options {
        self.stall_timeout = timeout;
        self
    }

    /// These options with another frame budget, in bytes (rule 8).
    ///
    /// # Examples
    ///
    /// ```
    /// // A scheduler on a small machine: at most 256 MiB of big frames at
    /// // once, and no graph frame over half of that.
    /// let options = rask_distributed::scheduler::Options::default().frame_budget(256 << 20);
    /// assert_eq!(options.frame_budget, 256 << 20);
    /// ```
    pub fn frame_budget(mut self, bytes: usize) -> Options {
        self.frame_budget = bytes;
        self
    }

    /// These options serving the web dashboard on `address` (rule 9).
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::scheduler::{serve_with, Options};
    /// let options = Options::default().dashboard("127.0.0.1:0".parse().unwrap());
    /// let scheduler = serve_with("127.0.0.1:0".parse().unwrap(), options)?;
    /// let page = format!("http://{}/status", scheduler.dashboard().unwrap());
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn dashboard(mut self, address: SocketAddr) -> Options {
        self.dashboard = Some(address);
        self
    }

    /// These options serving TLS with `tls` (see [`Options::tls`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use rask_distributed::scheduler::{serve_with, Options};
    /// use rask_distributed::Tls;
    /// let tls = Tls::new()
    ///     .identity("scheduler.pem".as_ref(), "scheduler.key".as_ref())?
    ///     .trust("ca.pem".as_ref())?; // mutual TLS
    /// let scheduler = serve_with("0.0.0.0:8786".parse().unwrap(), Options::default().tls(tls))?;
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn tls(mut self, tls: Tls) -> Options {
        self.tls = Some(tls);
        self
    }

    /// These options also listening on the Unix socket `path` (see
    /// [`Options::unix`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::scheduler::{serve_with, Options};
    /// let dir = std::env::temp_dir().join(format!("rask-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let path = dir.join("scheduler.sock");
    /// let mut scheduler = serve_with("127.0.0.1:0".parse().unwrap(), Options::default().unix(&path))?;
    /// // Workers of this machine: `rask-worker unix:/…/scheduler.sock`.
    /// assert_eq!(scheduler.unix(), Some(path.as_path()));
    /// scheduler.shutdown();
    /// assert!(!path.exists());
    /// # std::fs::remove_dir(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn unix(mut self, path: impl Into<PathBuf>) -> Options {
        self.unix = Some(path.into());
        self
    }

    /// How often workers are asked to send a heartbeat: within the range a
    /// worker accepts.
    fn heartbeat(&self) -> Duration {
        (self.worker_timeout / 5).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
    }
}

/// Starts a scheduler listening on `addr` (port 0 picks a free port) on a
/// background thread with its own single-threaded tokio runtime, with the
/// default [`Options`].
///
/// Clients and workers must prove the scheduler's token, a fresh one made
/// now ([`SchedulerHandle::token`]); see [`Options::auth`] for another.
///
/// # Errors
///
/// [`Error::Io`] if the address cannot be bound, the runtime not built or
/// the token not made; [`Error::Dashboard`] if the dashboard's address
/// ([`Options::dashboard`]) cannot be bound; [`Error::TlsSettings`] for TLS settings without a
/// certificate.
///
/// # Examples
///
/// ```
/// let scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
/// let address = format!("tcp://{}", scheduler.address());
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn serve(addr: SocketAddr) -> Result<SchedulerHandle, Error> {
    serve_with(addr, Options::default())
}

/// [`serve`] with `options`.
///
/// # Errors
///
/// As [`serve`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rask_distributed::scheduler::{serve_with, Options};
/// let options = Options::default().worker_timeout(Duration::from_secs(300));
/// let scheduler = serve_with("127.0.0.1:0".parse().unwrap(), options)?;
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn serve_with(addr: SocketAddr, options: Options) -> Result<SchedulerHandle, Error> {
    if options.unix.is_some() && options.tls.is_some() {
        return Err(Error::TlsSettings {
            problem: "a scheduler over TLS listens on no Unix socket: leave `Options::unix` unset",
            source: None,
        });
    }
    let auth = Arc::new(match &options.auth {
        Some(auth) => auth.clone(),
        None => Auth::Token(Token::generate()?),
    });
    let acceptor = match &options.tls {
        Some(tls) => Some(tls.acceptor(tls.has_ca())?),
        None => None,
    };
    let tls = options.tls.clone();
    let listener = net::listen(addr).map_err(Error::Io)?;
    let address = listener.local_addr().map_err(Error::Io)?;
    // The file is removed when `unix_file` drops: at shutdown, or on the
    // way out of an error below.
    let (unix, unix_file): (Option<net::UnixBound>, _) = match &options.unix {
        #[cfg(unix)]
        Some(path) => {
            // Absolute, so that processes started elsewhere find it.
            let path = net::unix_path(path).map_err(Error::Io)?;
            let (listener, file) = net::listen_unix(&path).map_err(Error::Io)?;
            (Some(listener), Some((path, file)))
        }
        #[cfg(not(unix))]
        Some(_) => return Err(Error::Io(net::unix_unsupported())),
        None => (None, None),
    };
    // The dashboard's server has a thread of its own (dashboard rule 3),
    // stopped with the scheduler's: by `shutdown`, or by dropping it on
    // the way out of an error below.
    let (board, dashboard_server, dashboard_address) = match options.dashboard {
        Some(at) => {
            let listener =
                net::listen(at).map_err(|reason| Error::Dashboard { addr: at, reason })?;
            let at = listener
                .local_addr()
                .map_err(|reason| Error::Dashboard { addr: at, reason })?;
            let access = Access::for_address(at, auth.token());
            let board = Arc::new(Board::default());
            let server =
                dashboard::Server::start(listener, board.clone(), access).map_err(Error::Io)?;
            (Some(board), Some(server), Some(at))
        }
        None => (None, None, None),
    };
    let runtime = net::runtime().map_err(Error::Io)?;
    let handle = runtime.handle().clone();
    // Connections are accepted and taken through their handshakes on a
    // thread of their own (rule 8), which ends when the scheduler's does.
    let handshakes = net::Handshakes::start().map_err(Error::Io)?;
    let handshaker = handshakes.runtime().clone();
    let (locals, locals_rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = oneshot::channel();
    let counts = Arc::new(Counts::default());
    let count = counts.clone();
    let required = auth.clone();
    let thread = std::thread::Builder::new()
        .name("rask-scheduler".into())
        .spawn(move || {
            runtime.block_on(async move {
                // The listening sockets belong to the handshakes' reactor.
                let (unix, listener) = {
                    let _handshakes = handshaker.enter();
                    let unix = unix.map(net::listening).transpose();
                    (unix, TcpListener::from_std(listener))
                };
                let unix = match unix {
                    Ok(unix) => unix,
                    Err(e) => {
                        tracing::warn!("scheduler: cannot listen on the Unix socket: {e}");
                        None
                    }
                };
                match listener {
                    Ok(listener) => {
                        let served = Served {
                            address,
                            board,
                            unix,
                            handshakes: handshaker,
                        };
                        let peers = (required, acceptor);
                        run(listener, locals_rx, stop_rx, count, options, peers, served).await
                    }
                    Err(e) => tracing::warn!("scheduler: cannot listen: {e}"),
                }
            });
            // Closes the listening sockets and the connections still in
            // their handshakes before the scheduler is taken for stopped.
            drop(handshakes);
        })
        .map_err(Error::Io)?;
    Ok(SchedulerHandle {
        address,
        dashboard: dashboard_address,
        dashboard_server,
        stop: Some(stop),
        thread: Some(thread),
        counts,
        runtime: handle,
        locals,
        auth,
        tls,
        unix: unix_file,
    })
}

/// What connection tasks tell the state loop.
enum Event {
    Connected {
        conn: u32,
        role: Role,
        build: BuildId,
        peer: net::PeerAddr,
        writer: net::Writer,
        held: net::Held,
        heard: net::Heard,
        /// Whether it is a client of this process, through memory.
        local: bool,
        kill: oneshot::Sender<()>,
    },
    Frame {
        conn: u32,
        msgs: Vec<ToScheduler>,
        /// Returns the frame's bytes to the budget once handled.
        _grant: Option<net::Grant>,
    },
    Closed {
        conn: u32,
        reason: Option<ProtocolError>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Client(ClientId),
    /// A worker that has not sent `RegisterWorker` yet.
    NewWorker,
    Worker(WorkerId),
}

struct Conn {
    kind: Kind,
    /// Its partition (rule 5).
    build: BuildId,
    /// Whether a graph of it was refused (rule 6): logged once, not for
    /// each of a client's many submissions.
    refused: bool,
    peer: net::PeerAddr,
    /// When its last frame arrived, or bytes of one under way were seen
    /// to (rule 4).
    last_heard: Instant,
    /// Set while its reader waits on this side (rule 4).
    held: net::Held,
    /// Moved by its reader while bytes of a frame under way arrive, and
    /// its count when the silence check last looked (rule 4).
    heard: (net::Heard, u64),
    /// A client of this process, through memory: never timed out.
    local: bool,
    writer: net::Writer,
    /// A client that asked for task events (rule 9).
    watching: bool,
    /// A worker's resident memory, as it last said.
    memory_bytes: Option<u64>,
    /// A worker's memory limit and spilling, as it last said.
    spill: Option<Spill>,
    /// A registered worker's name, unique among the scheduler's workers.
    name: Option<String>,
    // Dropping it ends the reader task, which closes the socket; closed
    // once the reader ended.
    kill: oneshot::Sender<()>,
}

/// The shell's outbox: one batch per connection, flushed after each burst.
struct Batches {
    by_conn: KeyMap<u32, Batch>,
    /// The build whose state machine is handling a message now.
    current: BuildId,
    /// Whether every build's task events are wanted (a dashboard runs).
    all: bool,
    /// The connections of the clients watching each build (rule 9).
    watched: KeyMap<BuildId, Vec<u32>>,
    /// Task events of this burst with their build, counted at the flush.
    events: Vec<(BuildId, WireEvent)>,
}

impl Default for Batches {
    fn default() -> Self {
        Batches {
            by_conn: KeyMap::default(),
            current: BuildId::NONE,
            all: false,
            watched: KeyMap::default(),
            events: Vec::new(),
        }
    }
}

impl Outbox for Batches {
    fn to_worker(&mut self, worker: WorkerId, msg: ToWorker) {
        self.by_conn.entry(worker.0).or_default().push(&msg);
    }
    fn to_client(&mut self, client: ClientId, msg: ToClient) {
        self.by_conn.entry(client.0).or_default().push(&msg);
    }
    fn watching(&self) -> bool {
        self.all || self.watched.contains_key(&self.current)
    }
    /// Sent at once, in order with the other messages to each watcher: a
    /// client hears that a task finished before its result arrives.
    fn task_event(&mut self, event: WireEvent) {
        if let Some(conns) = self.watched.get(&self.current) {
            for &conn in conns {
                let msg = ToClient::TaskEvents {
                    events: vec![event.clone()],
                };
                self.by_conn.entry(conn).or_default().push(&msg);
            }
        }
        self.events.push((self.current, event));
    }
}

/// The tasks, keys, clients and workers of one build (rule 5).
struct Partition {
    state: State,
    /// Its connections, workers not registered yet included: the partition
    /// goes with the last.
    conns: usize,
}

impl Partition {
    fn new(options: &Options) -> Partition {
        let mut state = State::new();
        state.set_task_timeout(options.task_timeout);
        state.set_allowed_failures(options.allowed_failures);
        Partition { state, conns: 0 }
    }
}

struct Shell {
    /// One partition per build with a connection (rule 5).
    partitions: KeyMap<BuildId, Partition>,
    conns: KeyMap<u32, Conn>,
    /// How many of `conns` are clients.
    clients: usize,
    out: Batches,
    options: Options,
    /// When silent workers were last looked for (rule 4).
    last_check: Instant,
    /// The start of the state machines' clock (`State::on_tick`).
    started: Instant,
    /// The dashboard's board and the counts of watched events (rule 9).
    history: History,
    /// `tcp://host:port`, as snapshots name the scheduler.
    address: String,
    /// Tasks moved in partitions dropped since (`SchedulerHandle::moved`).
    moved_before: u64,
    /// The snapshot answered to a client's `Info` since the last flush,
    /// with its build: every `Info` of that build until then gets it too,
    /// so a frame of a thousand questions costs one census, not a
    /// thousand.
    answered: Option<(BuildId, rask_executor::diagnostics::Snapshot)>,
}

/// Gives connection numbers (rule 10): each is in use from its draw until
/// its [`Number`] is dropped, and never given twice meanwhile; never
/// [`NO_HOLDER`]'s either.
#[derive(Clone)]
struct Numbers(Arc<Mutex<Drawn>>);

struct Drawn {
    /// Where the next draw starts looking.
    next: u32,
    in_use: HashSet<u32>,
}

/// A connection number in use; dropping it makes it free again.
struct Number {
    n: u32,
    numbers: Numbers,
}

impl Numbers {
    fn new() -> Self {
        Numbers(Arc::new(Mutex::new(Drawn {
            next: 0,
            in_use: HashSet::new(),
        })))
    }

    /// The next number neither in use nor reserved; none if every one is
    /// (the caps on connections, rule 8, keep far below that).
    fn draw(&self) -> Option<Number> {
        let mut drawn = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Every number but NO_HOLDER's in use: none left.
        if drawn.in_use.len() >= NO_HOLDER.0 as usize {
            return None;
        }
        // Counting on, as before, so a number just freed is not given
        // again at once: the log lines naming the old one stay unambiguous.
        // Numbers in use are few beside 2^32, so the skipping is short.
        loop {
            let n = drawn.next;
            drawn.next = n.wrapping_add(1);
            if n != NO_HOLDER.0 && drawn.in_use.insert(n) {
                return Some(Number {
                    n,
                    numbers: self.clone(),
                });
            }
        }
    }
}

impl Number {
    fn get(&self) -> u32 {
        self.n
    }
}

impl Drop for Number {
    fn drop(&mut self) {
        let mut drawn = self
            .numbers
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drawn.in_use.remove(&self.n);
    }
}

/// Where the scheduler answers: its address, and the board of its
/// dashboard if one runs.
struct Served {
    address: SocketAddr,
    board: Option<Arc<Board>>,
    /// The Unix socket it also listens on (never, without Unix sockets).
    #[cfg_attr(not(unix), allow(dead_code))]
    unix: Option<net::UnixListening>,
    /// The runtime of the thread that accepts connections and takes them
    /// through their handshakes (rule 8).
    handshakes: tokio::runtime::Handle,
}

async fn run(
    listener: TcpListener,
    mut locals: mpsc::UnboundedReceiver<(net::LocalEnd, BuildId)>,
    mut stop: oneshot::Receiver<()>,
    counts: Arc<Counts>,
    options: Options,
    (auth, tls): (Arc<Auth>, Option<Acceptor>),
    served: Served,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let budget = options.frame_budget.max(net::MIN_FRAME_BUDGET);
    let limits = net::Limits::new(budget, options.stall_timeout);
    // Connection numbers, for TCP and in-memory connections alike.
    let numbers = Numbers::new();
    let gate = net::Gate::new(net::Caps::for_this_process(1));
    // Accepting, and each connection's handshakes, run on the handshakes'
    // thread (rule 8): neither its back-off nor what a peer that has not
    // authenticated makes it compute holds up the state. Connections come
    // back here once authenticated.
    let serve = {
        let (events, numbers, limits) = (events_tx.clone(), numbers.clone(), limits.clone());
        let state = tokio::runtime::Handle::current();
        move |socket: Socket, peer, ticket| {
            // Every number in use: the socket is dropped, refused.
            let Some(number) = numbers.draw() else {
                return;
            };
            tokio::spawn(connection(
                number,
                (socket, peer, ticket),
                (auth.clone(), tls.clone()),
                limits.clone(),
                events.clone(),
                state.clone(),
            ));
        }
    };
    // The Unix socket's connections count towards the same caps (rule 7).
    #[cfg(unix)]
    if let Some(unix) = served.unix {
        let serve = serve.clone();
        served.handshakes.spawn(net::accept_loop(
            unix,
            gate.clone(),
            "scheduler",
            move |s, p, t| serve(Socket::Unix(s), p, t),
        ));
    }
    served.handshakes.spawn(net::accept_loop(
        listener,
        gate,
        "scheduler",
        move |s, p, t| serve(Socket::Tcp(s), p, t),
    ));
    let mut silence = tokio::time::interval(options.heartbeat());
    silence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The board's snapshot is refreshed this often; without a dashboard
    // the tick is rare and does nothing.
    let mut refresh = tokio::time::interval(if served.board.is_some() {
        dashboard::UPDATE_EVERY
    } else {
        Duration::from_secs(3600)
    });
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clock = tokio::time::interval(Duration::from_millis(state::TICK_MS));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shell = Shell {
        partitions: KeyMap::default(),
        conns: KeyMap::default(),
        clients: 0,
        out: Batches {
            all: served.board.is_some(),
            ..Batches::default()
        },
        options,
        last_check: Instant::now(),
        started: Instant::now(),
        history: History::new(served.board),
        answered: None,
        address: format!("tcp://{}", served.address),
        moved_before: 0,
    };
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some((end, build)) = locals.recv() => {
                let Some(number) = numbers.draw() else {
                    continue;
                };
                let peer = net::PeerAddr::Memory;
                let link = Link {
                    frames: net::Frames::local(end.recv),
                    writer: net::Writer::local(end.send),
                    held: net::Held::default(),
                    heard: net::Heard::default(),
                    slot: None,
                };
                let hello = (Role::Client, build);
                tokio::spawn(serve_connection(number, hello, peer, link, events_tx.clone()));
            }
            Some(event) = events.recv() => {
                shell.handle(event);
                // Handle whatever else is already queued before flushing, so
                // a burst of input becomes one frame per peer (rule 3).
                let mut n = 0;
                while n < 4096 {
                    match events.try_recv() {
                        Ok(event) => shell.handle(event),
                        Err(_) => break,
                    }
                    n += 1;
                }
                shell.flush();
                shell.publish(&counts);
            }
            _ = silence.tick() => {
                if shell.close_silent() {
                    shell.flush();
                    shell.publish(&counts);
                }
            }
            _ = clock.tick() => {
                shell.tick();
                shell.flush();
                shell.publish(&counts);
            }
            _ = refresh.tick() => shell.refresh_board(),
        }
    }
}

/// A socket a connection was accepted on.
enum Socket {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

/// Logs that this side closes the connection from `peer` for `e` (rule
/// 7: one line, rate-limited).
fn log_closing(peer: net::PeerAddr, e: &ProtocolError) {
    log_limited!(
        "scheduler: closing",
        "scheduler: closing connection from {peer}: {}",
        Chain(e)
    );
}

/// One accepted connection, pre-auth under `ticket`: its handshakes, here
/// on the handshakes' thread, then [`serve_connection`] within `limits`
/// (rule 8) on the `state`'s; the state loop hears of it only once its
/// peer authenticated (rule 7).
async fn connection(
    number: Number,
    (socket, peer, ticket): (Socket, net::PeerAddr, net::PreAuth),
    (auth, tls): (Arc<Auth>, Option<Acceptor>),
    limits: net::Limits,
    events: mpsc::UnboundedSender<Event>,
    state: tokio::runtime::Handle,
) {
    // The scheduler runs no user code: it has no build of its own.
    let serves = [Role::Client, Role::Worker];
    let incoming = match socket {
        Socket::Tcp(stream) => net::Incoming::Tcp(stream, tls.as_ref()),
        #[cfg(unix)]
        Socket::Unix(stream) => net::Incoming::Unix(stream),
    };
    let detached = net::accept_detached(
        incoming,
        ticket,
        Role::Scheduler,
        BuildId::NONE,
        &auth,
        &serves,
    )
    .await;
    let detached = match detached {
        Ok(detached) => detached,
        // One line per refusal (rule 7), naming what is wrong.
        Err(e @ ProtocolError::Auth(_)) => {
            log_limited!(
                "scheduler: refused",
                "scheduler: refused the connection from {peer}: {e}"
            );
            return;
        }
        Err(e) => return log_closing(peer, &e),
    };
    state.spawn(async move {
        let accepted = match detached.attach(&limits) {
            Ok(accepted) => accepted,
            Err(e) => return log_closing(peer, &e),
        };
        let role = accepted.hello.role;
        // Rule 7: a client's answers are small, a worker's tasks are not.
        let cap = (role == Role::Client).then_some(CLIENT_BACKLOG);
        let held = net::Held::default();
        let heard = net::Heard::default();
        let read = accepted.read.held_by(held.clone()).heard_by(heard.clone());
        let link = Link {
            frames: net::Frames::stream(read),
            writer: net::spawn_writer(accepted.write, &limits, cap),
            held,
            heard,
            slot: Some(accepted.slot),
        };
        serve_connection(number, (role, accepted.hello.build), peer, link, events).await;
    });
}

/// The parts of a connection, TCP or in memory.
struct Link {
    frames: net::Frames,
    writer: net::Writer,
    /// Set while its reader waits on this side (rule 4).
    held: net::Held,
    /// Moved while bytes of a frame under way arrive (rule 4).
    heard: net::Heard,
    /// Its place among the connections of its role; none in memory.
    slot: Option<net::Slot>,
}

/// Tells the state loop about a connection whose peer is `role` of `build`,
/// forwards its decoded frames, then tells it the connection closed.
async fn serve_connection(
    number: Number,
    (role, build): (Role, BuildId),
    peer: net::PeerAddr,
    link: Link,
    events: mpsc::UnboundedSender<Event>,
) {
    let conn = number.get();
    let Link {
        frames,
        writer,
        held,
        heard,
        slot,
    } = link;
    let (kill, killed) = oneshot::channel();
    let local = slot.is_none();
    if events
        .send(Event::Connected {
            conn,
            role,
            build,
            peer,
            writer: writer.clone(),
            held: held.clone(),
            heard,
            local,
            kill,
        })
        .is_err()
    {
        return;
    }
    let reason = read_loop(frames, killed, conn, &events, &writer, &held).await;
    let _ = events.send(Event::Closed { conn, reason });
    // The connection's place goes with it (rule 8), and its number only
    // now, behind its `Closed` (rule 10).
    drop(slot);
    drop(number);
}

async fn read_loop(
    mut read: net::Frames,
    mut killed: oneshot::Receiver<()>,
    conn: u32,
    events: &mpsc::UnboundedSender<Event>,
    writer: &net::Writer,
    held: &net::Held,
) -> Option<ProtocolError> {
    let mut ahead = 0;
    loop {
        if ahead >= READ_AHEAD {
            // The state loop answers what was read before more is read, so
            // the backlog below is up to date (rule 8).
            ahead = 0;
            tokio::task::yield_now().await;
        }
        if !writer.has_room() {
            // Rule 7: a peer that does not read its answers is not read
            // from either, and not blamed for its silence meanwhile.
            held.store(true, Ordering::Release);
            let room = tokio::select! {
                _ = &mut killed => return None,
                room = writer.room() => room,
            };
            held.store(false, Ordering::Release);
            if let Err(e) = room {
                return Some(e);
            }
        }
        tokio::select! {
            biased;
            _ = &mut killed => return None,
            // What the messages take decoded is held from the budget
            // until they were handled (net rule 8), small frames too: a
            // frame of heartbeats takes 200 times its length.
            got = read.next_messages::<ToScheduler>() => match got {
                Ok(Some(net::Messages { msgs, grant })) => {
                    ahead += read.frame().len();
                    if events.send(Event::Frame { conn, msgs, _grant: grant }).is_err() {
                        return None;
                    }
                }
                Ok(None) => return None,
                Err(e) => return Some(e),
            },
            why = writer.closed() => return why,
        }
    }
}

impl Shell {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Connected {
                conn,
                role,
                build,
                peer,
                writer,
                held,
                heard,
                local,
                kill,
            } => {
                // Rule 10: numbers are not given twice while in use. Were
                // one ever, the newcomer is closed, not the live one lost
                // under it (its reader's `Closed` would then name the
                // newcomer, and a worker would never be taken for lost).
                if self.conns.contains_key(&conn) {
                    debug_assert!(false, "connection number {conn} given twice");
                    log_limited!(
                        "scheduler: closing",
                        "scheduler: closing connection from {peer}: its number {conn} is in use"
                    );
                    // Dropping `kill` ends its reader; its `Closed` is told
                    // apart below. Frames it read meanwhile would still be
                    // taken for the live one's: this is a last guard, the
                    // draw is the fix.
                    return;
                }
                let partition = self
                    .partitions
                    .entry(build)
                    .or_insert_with(|| Partition::new(&self.options));
                partition.conns += 1;
                let kind = match role {
                    Role::Client => {
                        partition
                            .state
                            .on_client_connected(ClientId(conn), &mut self.out);
                        self.clients += 1;
                        if !local {
                            info_limited!(
                                "scheduler: client connected",
                                client = conn,
                                %peer,
                                "client {conn} connected from {peer}"
                            );
                        }
                        Kind::Client(ClientId(conn))
                    }
                    _ => Kind::NewWorker,
                };
                self.conns.insert(
                    conn,
                    Conn {
                        kind,
                        build,
                        refused: false,
                        peer,
                        last_heard: Instant::now(),
                        held,
                        heard: (heard, 0),
                        local,
                        watching: false,
                        memory_bytes: None,
                        spill: None,
                        name: None,
                        writer,
                        kill,
                    },
                );
            }
            Event::Frame { conn, msgs, .. } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.last_heard = Instant::now();
                }
                for msg in msgs {
                    let Some(c) = self.conns.get(&conn) else {
                        return; // closed by an earlier message of this frame
                    };
                    if let Err(what) = self.message(conn, c.kind, c.build, msg) {
                        self.close(conn, Some(ProtocolError::Unexpected(what)));
                    }
                }
            }
            Event::Closed { conn, reason } => {
                // A reader drops its end of `kill` before it says `Closed`;
                // a `Closed` finding that end alive is a refused newcomer's
                // (above), not this connection's.
                if self.conns.get(&conn).is_some_and(|c| !c.kill.is_closed()) {
                    return;
                }
                self.close(conn, reason)
            }
        }
    }

    /// Dispatches one message to the partition of `build`; `Err` names a
    /// message this peer may not send.
    fn message(
        &mut self,
        conn: u32,
        kind: Kind,
        build: BuildId,
        msg: ToScheduler,
    ) -> Result<(), &'static str> {
        self.out.current = build;
        let msg = match (kind, msg) {
            (Kind::Client(client), ToScheduler::Watch { on }) => {
                let changed = self
                    .conns
                    .get_mut(&conn)
                    .is_some_and(|c| std::mem::replace(&mut c.watching, on) != on);
                if changed {
                    self.rewatch();
                }
                let _ = client;
                return Ok(());
            }
            (Kind::Client(client), ToScheduler::Info { id }) => {
                // Rule 8: answers are small, unless a client asks without
                // reading; those pile up before any write refuses them.
                let waiting = self.out.by_conn.get(&client.0).map_or(0, Batch::bytes);
                if waiting > CLIENT_BACKLOG {
                    return Err("a client asked for more than it reads");
                }
                let snapshot = match &self.answered {
                    Some((b, snapshot)) if *b == build => snapshot.clone(),
                    _ => {
                        let snapshot = self.snapshot(Some(build));
                        self.answered = Some((build, snapshot.clone()));
                        snapshot
                    }
                };
                self.out.to_client(client, ToClient::Info { id, snapshot });
                return Ok(());
            }
            (Kind::Client(client), ToScheduler::WhoHas { id, keys }) => {
                let state = self.partitions.get(&build).map(|p| &p.state);
                let holders = keys
                    .iter()
                    .map(|k| state.map_or_else(Vec::new, |s| s.who_has(k).to_vec()))
                    .collect();
                self.out.to_client(client, ToClient::WhoHas { id, holders });
                return Ok(());
            }
            (Kind::Worker(_), ToScheduler::Resources { memory_bytes }) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.memory_bytes = Some(memory_bytes);
                }
                return Ok(());
            }
            (Kind::Worker(w), ToScheduler::Memory { spill }) => {
                let paused = spill.paused;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.spill = Some(spill);
                }
                // S17: a paused worker is sent nothing.
                if let Some(partition) = self.partitions.get_mut(&build) {
                    partition.state.on_worker_paused(w, paused, &mut self.out);
                }
                return Ok(());
            }
            (_, msg) => msg,
        };
        if let (Kind::Client(client), ToScheduler::UpdateGraph { tasks, wanted }) = (kind, &msg) {
            if let Some(why) = self.no_worker_of(build) {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if !std::mem::replace(&mut c.refused, true) {
                        log_limited!(
                            "scheduler: refusing graphs",
                            "scheduler: refusing graphs of the client at {}: {why}",
                            c.peer
                        );
                    }
                }
                // The client releases every wanted key once, refused or
                // not: keys this build's tasks already have take their
                // reference as usual, so that release cannot drop one an
                // earlier graph of the client holds.
                if let Some(partition) = self.partitions.get_mut(&build) {
                    let known: Vec<WireKey> = wanted
                        .iter()
                        .copied()
                        .filter(|k| partition.state.knows(k))
                        .collect();
                    if !known.is_empty() {
                        partition
                            .state
                            .on_update_graph(client, Vec::new(), known, &mut self.out);
                    }
                }
                refuse(client, tasks, wanted, &why, &mut self.out);
                return Ok(());
            }
        }
        let out = &mut self.out;
        let state = &mut self
            .partitions
            .entry(build)
            .or_insert_with(|| Partition::new(&self.options))
            .state;
        match (kind, msg) {
            (Kind::Client(c), ToScheduler::UpdateGraph { tasks, wanted }) => {
                state.on_update_graph(c, tasks, wanted, out)
            }
            (Kind::Client(c), ToScheduler::ReleaseKeys { keys }) => {
                state.on_release_keys(c, keys, out)
            }
            (Kind::Client(c), ToScheduler::FetchFailed { key, holder }) => {
                state.on_fetch_failed(Reporter::Client(c), key, holder, out)
            }
            (Kind::Client(c), ToScheduler::Replicate { keys }) => state.on_replicate(c, keys, out),
            (Kind::Client(c), ToScheduler::RetireWorkers { id, names }) => {
                // Names are looked up among the workers of the client's
                // build: only those run its tasks and hold its values.
                let mut workers = Vec::with_capacity(names.len());
                for name in &names {
                    let found = self.conns.iter().find_map(|(_, w)| match w.kind {
                        Kind::Worker(id) if w.build == build && w.name.as_ref() == Some(name) => {
                            Some(id)
                        }
                        _ => None,
                    });
                    match found {
                        Some(w) => workers.push(w),
                        None => {
                            let mut known: Vec<&str> = self
                                .conns
                                .values()
                                .filter(|w| w.build == build)
                                .filter_map(|w| w.name.as_deref())
                                .collect();
                            known.sort_unstable();
                            let error = Some(format!(
                                "no worker named {name:?} runs this program's build \
                                 (workers: {}); none was retired",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            ));
                            out.to_client(c, ToClient::Retired { id, error });
                            return Ok(());
                        }
                    }
                }
                state.on_retire_workers(c, id, workers, out)
            }
            (
                Kind::NewWorker,
                ToScheduler::RegisterWorker {
                    address,
                    threads,
                    resources,
                    name,
                },
            ) => {
                let w = WorkerId(conn);
                let taken = self.conns.iter().find_map(|(_, other)| {
                    (other.name.as_ref() == Some(&name)).then_some(other.peer)
                });
                if let Some(holder) = taken {
                    // The worker closes the connection when told (a
                    // silent one is closed after the worker timeout).
                    let reason = format!(
                        "the name {name:?} is taken by the worker connected from {holder}; \
                         give each worker its own name (--name, RASK_WORKER_NAME)"
                    );
                    log_limited!(
                        "scheduler: worker refused",
                        "scheduler: refusing a worker: {reason}"
                    );
                    out.to_worker(w, ToWorker::Refused { reason });
                    return Ok(());
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.kind = Kind::Worker(w);
                    c.name = Some(name.clone());
                    info_limited!(
                        "scheduler: worker joined",
                        %w,
                        peer = %c.peer,
                        threads,
                        name = %name,
                        "{w} ({name}) joined from {}: {threads} threads, data port {address}",
                        c.peer
                    );
                }
                // `.workers([…])` names a worker by address or name.
                let registration = state::Registration {
                    address,
                    threads,
                    resources,
                    name: Some(name),
                };
                state.on_worker_joined(w, registration, out);
                // At most an hour (`heartbeat`): the cast is exact.
                let every_ms = self.options.heartbeat().as_millis() as u64;
                out.to_worker(w, ToWorker::Heartbeat { every_ms });
            }
            (Kind::Worker(_) | Kind::Client(_), ToScheduler::Heartbeat) => {}
            (
                Kind::Worker(w),
                ToScheduler::TaskFinished {
                    key,
                    run,
                    nbytes,
                    duration_ns,
                    value,
                    thread,
                },
            ) => {
                let report = state::Finished {
                    nbytes,
                    duration_ns,
                    value,
                    thread,
                };
                state.on_task_finished(w, key, run, report, out)
            }
            (Kind::Worker(w), ToScheduler::TaskErred { key, run, failure }) => {
                state.on_task_erred(w, key, run, failure, out)
            }
            (Kind::Worker(w), ToScheduler::TaskAbandoned { key, run }) => {
                state.on_task_abandoned(w, key, run, out)
            }
            (Kind::Worker(w), ToScheduler::TaskSeceded { key, run }) => {
                state.on_task_seceded(w, key, run, out)
            }
            (Kind::Worker(w), ToScheduler::TaskGivenUp { key, id }) => {
                state.on_task_given_up(w, key, id, out)
            }
            (Kind::Worker(w), ToScheduler::TaskKept { key, id }) => {
                state.on_task_kept(w, key, id, out)
            }
            (Kind::Worker(w), ToScheduler::DataAdded { key }) => state.on_data_added(w, key, out),
            (Kind::Worker(w), ToScheduler::Leaving) => state.on_worker_leaving(w, out),
            (Kind::Worker(w), ToScheduler::FetchFailed { key, holder }) => {
                state.on_fetch_failed(Reporter::Worker(w), key, holder, out)
            }
            (Kind::NewWorker, _) => return Err("a worker must register first"),
            (Kind::Worker(_), ToScheduler::RegisterWorker { .. }) => {
                return Err("a worker registered twice")
            }
            (Kind::Client(_), _) => return Err("a client sent a worker's message"),
            (Kind::Worker(_), _) => return Err("a worker sent a client's message"),
        }
        Ok(())
    }

    fn close(&mut self, conn: u32, reason: Option<ProtocolError>) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let peer = c.peer;
        // Named in the lines below as `worker 3 (gpu-1)`.
        let named = c
            .name
            .as_deref()
            .map_or_else(String::new, |n| format!(" ({n})"));
        let why = match &reason {
            Some(reason) => Chain(reason).to_string(),
            None => "its connection closed".to_owned(),
        };
        // A worker retired (S16) left its scheduler's state before its
        // connection ended.
        let retired = match c.kind {
            Kind::Worker(w) => self
                .partitions
                .get(&c.build)
                .is_some_and(|p| !p.state.has_worker(w)),
            _ => false,
        };
        match (c.kind, reason.is_some()) {
            // Asked to retire, it left when done: news, not a warning.
            (Kind::Worker(w), false) if retired => info_limited!(
                "scheduler: worker retired",
                %w,
                %peer,
                "{w}{named} at {peer} retired and left"
            ),
            (Kind::Worker(w), true) => log_limited!(
                "scheduler: worker died",
                %w,
                %peer,
                "{w}{named} at {peer} is taken for dead: {why}"
            ),
            // A worker killed and one that exited look the same from here.
            (Kind::Worker(w), false) => log_limited!(
                "scheduler: worker gone",
                %w,
                %peer,
                "{w}{named} at {peer} is gone: {why}"
            ),
            (Kind::Client(ClientId(id)), _) if !c.local => info_limited!(
                "scheduler: client left",
                client = id,
                %peer,
                "client {id} at {peer} disconnected: {why}"
            ),
            (_, true) => log_limited!(
                "scheduler: closing",
                "scheduler: closing connection from {peer}: {why}"
            ),
            _ => {}
        }
        self.out.by_conn.remove(&conn);
        if c.watching {
            self.rewatch();
        }
        self.out.current = c.build;
        let partition = self
            .partitions
            .entry(c.build)
            .or_insert_with(|| Partition::new(&self.options));
        match c.kind {
            Kind::Client(client) => {
                self.clients -= 1;
                partition
                    .state
                    .on_client_disconnected(client, &mut self.out)
            }
            Kind::Worker(worker) => partition.state.on_worker_lost(worker, &mut self.out),
            Kind::NewWorker => {}
        }
        partition.conns = partition.conns.saturating_sub(1);
        if partition.conns == 0 {
            // Rule 5: with no client left, every task was forgotten (S4).
            if let Some(gone) = self.partitions.remove(&c.build) {
                self.moved_before += gone.state.moved();
                self.history.forget(c.build);
            }
        }
    }

    /// Why a graph of a client of `build` cannot run (rule 6): no worker
    /// of its build, but workers of others. `None` if it can, or if there
    /// is no worker at all.
    fn no_worker_of(&self, build: BuildId) -> Option<String> {
        if self
            .partitions
            .get(&build)
            .is_some_and(|p| p.state.worker_count() > 0)
        {
            return None;
        }
        let mut others: Vec<(BuildId, usize)> = self
            .partitions
            .iter()
            .map(|(&b, p)| (b, p.state.worker_count()))
            .filter(|&(b, n)| b != build && n > 0)
            .collect();
        if others.is_empty() {
            return None;
        }
        // Most workers first; the order is stable for equal counts.
        others.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let others: Vec<String> = others.iter().map(|(b, n)| format!("{b} ({n})")).collect();
        Some(format!(
            "no worker runs this program's build: client {build}, workers {}; start workers \
             of this build, `{WORKER_ENV}=ADDRESS ./program` with this scheduler's address on \
             each worker machine (after a rebuild, restart the old ones), or run on a local \
             cluster, RASK_SCHEDULER=local:N",
            others.join(", ")
        ))
    }

    /// Publishes the figures [`SchedulerHandle`] reads: totals over every
    /// build.
    fn publish(&self, counts: &Counts) {
        let partitions = self.partitions.values();
        let workers = partitions.clone().map(|p| p.state.worker_count()).sum();
        let tasks = partitions.clone().map(|p| p.state.task_count()).sum();
        let moved: u64 = partitions.map(|p| p.state.moved()).sum();
        counts.workers.store(workers, Ordering::Release);
        counts.clients.store(self.clients, Ordering::Release);
        counts.tasks.store(tasks, Ordering::Release);
        counts
            .moved
            .store(self.moved_before + moved, Ordering::Release);
    }

    /// Closes the workers not heard from for the worker timeout, and the
    /// clients not heard from for the client timeout (rule 4); whether
    /// there were any.
    fn close_silent(&mut self) -> bool {
        let now = Instant::now();
        let since = now.duration_since(std::mem::replace(&mut self.last_check, now));
        if since > 2 * self.options.heartbeat() {
            // This thread was held up (a huge graph, a stalled machine): the
            // frames that arrived meanwhile have not been read yet. Start
            // everyone's window again rather than blame the workers.
            for c in self.conns.values_mut() {
                c.last_heard = now;
            }
            return false;
        }
        let (workers, clients) = (self.options.worker_timeout, self.options.client_timeout);
        let mut silent = Vec::new();
        for (&conn, c) in &mut self.conns {
            if c.held.load(Ordering::Acquire) {
                // Not read on purpose (rule 8): not the peer's silence.
                c.last_heard = now;
                continue;
            }
            let (heard, seen) = &mut c.heard;
            let count = heard.load(Ordering::Relaxed);
            if count != *seen {
                // Bytes of a frame under way arrived since the last look
                // (net rule 9): heard, though the frame is not whole yet.
                *seen = count;
                c.last_heard = now;
                continue;
            }
            let timeout = match c.kind {
                Kind::Client(_) if c.local => continue,
                Kind::Client(_) => clients,
                Kind::NewWorker | Kind::Worker(_) => workers,
            };
            if now.duration_since(c.last_heard) > timeout {
                silent.push((conn, timeout));
            }
        }
        for &(conn, timeout) in &silent {
            self.close(conn, Some(ProtocolError::Silent(timeout)));
        }
        !silent.is_empty()
    }

    /// Moves every state machine's clock to now: tasks stuck behind long
    /// ones move to idle threads (`state` S15).
    fn tick(&mut self) {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        for (&build, partition) in &mut self.partitions {
            self.out.current = build;
            partition.state.on_tick(now_ms, &mut self.out);
        }
    }

    /// The builds some client watches (rule 9).
    fn rewatch(&mut self) {
        let mut watched: KeyMap<BuildId, Vec<u32>> = KeyMap::default();
        for (&conn, c) in &self.conns {
            if c.watching {
                watched.entry(c.build).or_default().push(conn);
            }
        }
        self.out.watched = watched;
    }

    /// The snapshot of one build's partition, or of every one.
    fn snapshot(&self, build: Option<BuildId>) -> rask_executor::diagnostics::Snapshot {
        let shells: HashMap<WorkerId, WorkerShell> = self
            .conns
            .iter()
            .filter(|(_, c)| build.is_none_or(|b| c.build == b))
            .filter_map(|(_, c)| match c.kind {
                Kind::Worker(w) => Some((
                    w,
                    WorkerShell {
                        name: c.name.clone().unwrap_or_default(),
                        last_heard: c.last_heard,
                        memory_bytes: c.memory_bytes,
                        spill: c.spill,
                    },
                )),
                _ => None,
            })
            .collect();
        let clients = self
            .conns
            .values()
            .filter(|c| matches!(c.kind, Kind::Client(_)))
            .filter(|c| build.is_none_or(|b| c.build == b))
            .count();
        let states = self
            .partitions
            .iter()
            .filter(move |(b, _)| build.is_none_or(|want| **b == want))
            .map(|(_, p)| &p.state);
        self.history.snapshot(
            Instant::now(),
            build,
            &self.address,
            u32::try_from(clients).unwrap_or(u32::MAX),
            states,
            &shells,
        )
    }

    /// Puts a fresh snapshot on the dashboard's board (rule 9).
    fn refresh_board(&mut self) {
        if let Some(board) = self.history.board().cloned() {
            board.publish(self.snapshot(None));
        }
    }

    /// Sends what the handlers produced, one batch per connection (rule 3),
    /// once their task events are on record for the dashboard (rule 9).
    /// A connection whose writer refuses (rule 8) is closed, and what that
    /// produces is sent in turn.
    fn flush(&mut self) {
        self.answered = None;
        loop {
            let now = Instant::now();
            for (build, event) in std::mem::take(&mut self.out.events) {
                self.history.record(now, build, &event);
            }
            let mut refused = Vec::new();
            for (conn, mut batch) in self.out.by_conn.drain() {
                if batch.is_empty() {
                    continue;
                }
                if let Some(c) = self.conns.get(&conn) {
                    if let Err(e) = net::send_batch(&c.writer, &mut batch) {
                        refused.push((conn, e));
                    }
                }
            }
            if refused.is_empty() {
                return;
            }
            for (conn, e) in refused {
                // A connection already gone says so itself, quietly.
                let reason = (!matches!(e, ProtocolError::Closed)).then_some(e);
                self.close(conn, reason);
            }
        }
    }
}

/// Answers every key `client` wants with a failure saying `why` (rule 6),
/// without adding its graph.
fn refuse(
    client: ClientId,
    tasks: &[TaskSpec],
    wanted: &[WireKey],
    why: &str,
    out: &mut impl Outbox,
) {
    let names: HashMap<WireKey, &Arc<str>> = tasks.iter().map(|t| (t.key, &t.name)).collect();
    for &key in wanted {
        let failure = Failure::new(
            Key(key),
            names
                .get(&key)
                .map_or_else(|| "unknown".into(), |&n| n.clone()),
            FailureKind::Failed,
            why.to_owned(),
        );
        let failure = WireFailure::from(&failure);
        out.to_client(client, ToClient::KeyErred { key, failure });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TaskSpec;
    use state::TaskState;

    fn shell() -> Shell {
        Shell {
            partitions: KeyMap::default(),
            conns: KeyMap::default(),
            clients: 0,
            out: Batches::default(),
            options: Options::default(),
            last_check: Instant::now(),
            started: Instant::now(),
            history: History::new(None),
            address: "tcp://x".into(),
            moved_before: 0,
            answered: None,
        }
    }

    /// Announces connection `conn` as its reader does; the receiver stands
    /// for the reader's end of `kill`.
    fn connect(
        shell: &mut Shell,
        conn: u32,
        role: Role,
    ) -> (mpsc::UnboundedReceiver<Vec<u8>>, oneshot::Receiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (kill, killed) = oneshot::channel();
        shell.handle(Event::Connected {
            conn,
            role,
            build: BuildId::NONE,
            peer: net::PeerAddr::Memory,
            writer: net::Writer::local(tx),
            held: Default::default(),
            heard: Default::default(),
            local: false,
            kill,
        });
        (rx, killed)
    }

    fn frame(shell: &mut Shell, conn: u32, msgs: Vec<ToScheduler>) {
        shell.handle(Event::Frame {
            conn,
            msgs,
            _grant: None,
        });
        shell.flush();
    }

    fn spec(n: u8) -> TaskSpec {
        TaskSpec {
            key: [n; 32],
            name: format!("t{n}").into(),
            function: "f".into(),
            payload: Arc::from(&[n][..]),
            deps: Vec::new(),
            timeout_ms: None,
            retries: 0,
            annotations: Default::default(),
        }
    }

    /// Numbers as if 2^32 connections less `to_go` were made already.
    fn near_the_wrap(numbers: &Numbers, to_go: u32) {
        numbers.0.lock().unwrap().next = u32::MAX - to_go + 1;
    }

    /// Rule 10: connections counted past 2^32 (unauthenticated
    /// connect-and-close ones count too) never give a newcomer a live
    /// worker's number. Before, the newcomer took number 5, its `Conn`
    /// replaced the worker's, the worker's `Closed` then removed the
    /// newcomer, and the worker stayed in the state for ever, a ghost
    /// holding task 1 and given task 2.
    #[test]
    fn a_wrapped_connection_number_leaves_no_ghost_worker() {
        let rt = net::runtime().unwrap();
        let _g = rt.enter();
        let numbers = Numbers::new();
        let mut sh = shell();
        let st = |sh: &Shell, n: u8| {
            sh.partitions[&BuildId::NONE]
                .state
                .state_of(&[n; 32])
                .cloned()
        };
        let skipped: Vec<Number> = (0..5).map(|_| numbers.draw().unwrap()).collect();
        drop(skipped);
        let worker = numbers.draw().unwrap();
        assert_eq!(worker.get(), 5);
        let (_w_rx, w_killed) = connect(&mut sh, 5, Role::Worker);
        frame(
            &mut sh,
            5,
            vec![ToScheduler::RegisterWorker {
                address: "127.0.0.1:1".into(),
                threads: 1,
                resources: Default::default(),
                name: "w5".into(),
            }],
        );
        let client = numbers.draw().unwrap();
        let (_c_rx, _c_killed) = connect(&mut sh, client.get(), Role::Client);
        frame(
            &mut sh,
            client.get(),
            vec![ToScheduler::UpdateGraph {
                tasks: vec![spec(1)],
                wanted: vec![[1; 32]],
            }],
        );
        assert_eq!(st(&sh, 1), Some(TaskState::Processing(WorkerId(5))));
        // 2^32 connections later: eight connect and close, then one stays.
        near_the_wrap(&numbers, 3);
        for _ in 0..8 {
            drop(numbers.draw().unwrap());
        }
        let newcomer = numbers.draw().unwrap();
        let (_n_rx, _n_killed) = connect(&mut sh, newcomer.get(), Role::Client);
        // The worker dies: its reader ends, then says so.
        drop(w_killed);
        sh.handle(Event::Closed {
            conn: 5,
            reason: None,
        });
        sh.flush();
        drop(worker);
        let p = &sh.partitions[&BuildId::NONE];
        assert_eq!(
            (p.state.worker_count(), st(&sh, 1)),
            (0, Some(TaskState::Queued)),
            "newcomer numbered {}: the dead worker must be gone and its task back in the queue",
            newcomer.get()
        );
        assert!(sh.conns.contains_key(&newcomer.get()));
        // New work waits for a worker; none goes to a ghost.
        frame(
            &mut sh,
            client.get(),
            vec![ToScheduler::UpdateGraph {
                tasks: vec![spec(2)],
                wanted: vec![[2; 32]],
            }],
        );
        assert_eq!(st(&sh, 2), Some(TaskState::Queued));
    }

    /// Rule 10: no connection is numbered NO_HOLDER. Before, the one
    /// after 2^32 - 1 others was, so a client's `FetchFailed(NO_HOLDER)`
    /// (it knows no holder left) named a real worker, whose good copy the
    /// scheduler then dropped.
    #[test]
    fn no_holder_names_no_real_worker_after_the_wrap() {
        use crate::protocol::NO_HOLDER;
        let numbers = Numbers::new();
        near_the_wrap(&numbers, 2);
        let before = numbers.draw().unwrap();
        assert_eq!(before.get(), u32::MAX - 1);
        let number = numbers.draw().unwrap();
        let w = WorkerId(number.get());
        let mut s = State::new();
        let mut out = Batches::default();
        s.on_worker_registered(w, "127.0.0.1:1".into(), 1, &mut out);
        s.on_client_connected(ClientId(before.get()), &mut out);
        s.on_update_graph(
            ClientId(before.get()),
            vec![spec(1)],
            vec![[1; 32]],
            &mut out,
        );
        let run = s.run_of([1; 32]);
        s.on_task_finished(
            w,
            [1; 32],
            run,
            state::Finished {
                nbytes: 100_000,
                ..Default::default()
            },
            &mut out,
        );
        assert_eq!(s.who_has(&[1; 32]), &[w]);
        // The client knows no holder (its table lost them) and asks.
        s.on_fetch_failed(
            Reporter::Client(ClientId(before.get())),
            [1; 32],
            NO_HOLDER,
            &mut out,
        );
        assert_eq!(
            (s.state_of(&[1; 32]), s.who_has(&[1; 32])),
            (Some(&TaskState::Memory), &[w][..]),
            "worker numbered {}",
            w.0
        );
    }

    /// A peer sending frames of one-byte heartbeats (each over 200 bytes
    /// decoded) to a state loop that does not keep up: what waits to be
    /// handled stays within the frame budget, each frame holding a grant
    /// for what its messages take, and the connection is not read
    /// meanwhile (net rule 8).
    #[test]
    fn decoded_messages_waiting_to_be_handled_stay_within_the_budget() {
        const BUDGET: usize = 1 << 20;
        const FRAMES: usize = 100;
        let heartbeats = 2_000;
        let runtime = net::runtime().unwrap();
        runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut peer = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (socket, _) = listener.accept().await.unwrap();
            let (read, _write) = socket.into_split();
            let limits = net::Limits::new(BUDGET, Duration::from_secs(30));
            let held = net::Held::default();
            let frames = net::Frames::stream(
                net::FrameReader::new(
                    tokio::io::BufReader::new(net::ReadHalf::Plain(read)),
                    limits,
                )
                .held_by(held.clone()),
            );
            let mut frame = Batch::default();
            for _ in 0..heartbeats {
                frame.push(&ToScheduler::Heartbeat);
            }
            let frame = frame.take_frames().concat();
            let bytes = frame.repeat(FRAMES);
            // 100 frames of 2 000 heartbeats: 2 000 times 216 bytes each
            // decoded, 43 MB in all, sent in 200 KB.
            let sending = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = peer.write_all(&bytes).await;
                peer // kept open: no end of stream
            });
            let (tx, _rx) = mpsc::unbounded_channel();
            let writer = net::Writer::local(tx);
            let (events_tx, mut events) = mpsc::unbounded_channel();
            let (_kill, killed) = oneshot::channel();
            let reading = {
                let held = held.clone();
                tokio::spawn(async move {
                    read_loop(frames, killed, 1, &events_tx, &writer, &held).await
                })
            };
            // The state loop does not run: every frame read stays here,
            // with its grant, until the reader waits for the budget or
            // every frame was read.
            let mut waiting = Vec::new();
            while !held.load(Ordering::Acquire) && waiting.len() < FRAMES {
                match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
                    Ok(Some(Event::Frame { msgs, _grant, .. })) => waiting.push((msgs, _grant)),
                    Ok(_) => panic!("the connection closed"),
                    Err(_) => panic!("no frame nor a wait for the budget within 30 s"),
                }
            }
            while let Ok(Event::Frame { msgs, _grant, .. }) = events.try_recv() {
                waiting.push((msgs, _grant));
            }
            let decoded: usize = waiting
                .iter()
                .map(|(msgs, _)| msgs.capacity() * std::mem::size_of::<ToScheduler>())
                .sum();
            eprintln!(
                "{} of {FRAMES} frames read, {decoded} bytes decoded waiting, budget {BUDGET}",
                waiting.len()
            );
            for (msgs, grant) in &waiting {
                let size = msgs.capacity() * std::mem::size_of::<ToScheduler>();
                let granted = grant.as_ref().map_or(0, net::Grant::bytes);
                assert!(
                    granted >= size,
                    "{size} bytes decoded hold a grant of {granted}"
                );
            }
            assert!(decoded <= BUDGET);
            assert!(
                held.load(Ordering::Acquire),
                "the reader waits for the budget"
            );
            // Handling what waited lets the reader go on.
            let before = waiting.len();
            waiting.clear();
            assert!(matches!(
                tokio::time::timeout(Duration::from_secs(30), events.recv()).await,
                Ok(Some(Event::Frame { .. }))
            ));
            assert!(before < FRAMES);
            reading.abort();
            sending.abort();
        });
    }

    /// `n` peers on 127.0.0.1, each read by a `read_loop` (connections 1
    /// to `n`) within `limits`, whose events go to `events`: the peers'
    /// sockets and the readers. Each reader keeps its connection open (no
    /// end of stream, no closed writer, no kill).
    async fn read_loops(
        n: u32,
        limits: &net::Limits,
        events: &mpsc::UnboundedSender<Event>,
    ) -> (
        Vec<TcpStream>,
        Vec<tokio::task::JoinHandle<Option<ProtocolError>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut peers = Vec::new();
        let mut readers = Vec::new();
        for conn in 1..=n {
            let peer = TcpStream::connect(address).await.unwrap();
            let (socket, _) = listener.accept().await.unwrap();
            let (read, write) = socket.into_split();
            let frames = net::Frames::stream(net::FrameReader::new(
                tokio::io::BufReader::new(net::ReadHalf::Plain(read)),
                limits.clone(),
            ));
            let (tx, rx) = mpsc::unbounded_channel();
            let writer = net::Writer::local(tx);
            let (kill, killed) = oneshot::channel();
            let events = events.clone();
            readers.push(tokio::spawn(async move {
                let _open = (write, rx, kill);
                let held = net::Held::default();
                read_loop(frames, killed, conn, &events, &writer, &held).await
            }));
            peers.push(peer);
        }
        (peers, readers)
    }

    /// A frame of a graph of 300 KiB, over the small frames' threshold.
    fn big_graph() -> Vec<u8> {
        let mut task = spec(1);
        task.payload = Arc::from(vec![7; 300 << 10]);
        let graph = crate::protocol::frame(&ToScheduler::UpdateGraph {
            tasks: vec![task],
            wanted: vec![[1; 32]],
        });
        assert!(graph.len() > net::SMALL_FRAME);
        graph
    }

    /// `event` is [`big_graph`]'s frame, read from connection `from`.
    fn assert_graph_from(from: u32, event: Option<Event>) {
        match event {
            Some(Event::Frame { conn, msgs, .. }) => {
                assert_eq!(conn, from);
                assert!(matches!(&msgs[..], [ToScheduler::UpdateGraph { .. }]));
            }
            _ => panic!("a connection closed"),
        }
    }

    /// Net rule 8, as a reviewer found it: two authenticated peers that
    /// announce frames as big as the lane (before, half the budget each:
    /// all of it), send 4 bytes of them and go quiet, while a third sends a
    /// big frame whole. Before, the two were granted their announced
    /// lengths and held them for the stall timeout and a second per MiB
    /// (9 minutes at the defaults, 10 here), and the third's frame waited
    /// in line all that time; granted as their bytes arrive, they hold a
    /// step each and the third is read at once.
    #[test]
    fn peers_announcing_huge_frames_and_going_quiet_hold_up_no_other_frame() {
        use tokio::io::AsyncWriteExt;
        const BUDGET: usize = 1 << 20;
        let runtime = net::runtime().unwrap();
        runtime.block_on(async {
            // One budget for every connection, as in `run`; a stall timeout
            // far longer than the test waits.
            let limits = net::Limits::new(BUDGET, Duration::from_secs(600));
            let (events_tx, mut events) = mpsc::unbounded_channel();
            let (mut peers, readers) = read_loops(3, &limits, &events_tx).await;
            // One quiet peer, then the other, each holding its grant
            // before the third sends anything.
            let huge = u32::try_from(BUDGET / 2).unwrap();
            for (i, peer) in peers.iter_mut().take(2).enumerate() {
                peer.write_all(&huge.to_le_bytes()).await.unwrap();
                peer.write_all(&[0; 4]).await.unwrap();
                let holds = (i + 1) * net::SMALL_FRAME;
                while limits.budget.available() > BUDGET - holds {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            // A graph of 300 KiB, over the small frames' threshold.
            let graph = big_graph();
            peers[2].write_all(&graph).await.unwrap();
            let wait = Duration::from_secs(30);
            let read = tokio::time::timeout(wait, events.recv()).await;
            assert!(
                read.is_ok(),
                "the third connection's frame was not read within {wait:?}"
            );
            assert_graph_from(3, read.ok().flatten());
            for reading in readers {
                reading.abort();
            }
        });
    }

    /// Net rule 9, as a reviewer reasoned it: a peer that fills the pool
    /// (sending all but the last byte of a frame as big as it, for real)
    /// and announces another big frame on a second connection is granted
    /// all of that one from the lane before its bytes arrive. Sending its
    /// head and then a byte now and then, it held the lane for the whole
    /// frame's allowance (the stall timeout and a second per MiB
    /// announced: 9 minutes for 512 MiB at the defaults, 33 s here), and
    /// every other big frame waited in the lane's line. With the progress
    /// deadline it is closed the stall timeout and what its head earned
    /// after, and the frame waiting behind it is read.
    #[test]
    fn a_peer_trickling_a_frame_granted_the_lane_is_closed_and_the_frame_behind_it_read() {
        use tokio::io::AsyncWriteExt;
        const BUDGET: usize = 64 << 20;
        // As big as the lane, and as the pool.
        const FRAME: usize = BUDGET / 2;
        const HEAD: usize = 256 << 10;
        let runtime = net::runtime().unwrap();
        runtime.block_on(async {
            let limits = net::Limits::new(BUDGET, Duration::from_secs(1));
            let (events_tx, mut events) = mpsc::unbounded_channel();
            let (mut peers, mut readers) = read_loops(3, &limits, &events_tx).await;
            let mut trickler = peers.remove(1);
            let mut behind = peers.remove(1);
            let filler = &mut peers[0];
            let prefix = u32::try_from(FRAME).unwrap().to_le_bytes();
            // The first fills the pool: all its frame but the last byte.
            filler.write_all(&prefix).await.unwrap();
            let chunk = vec![0; 1 << 20];
            let mut sent = 0;
            while sent < FRAME - 1 {
                let n = chunk.len().min(FRAME - 1 - sent);
                filler.write_all(&chunk[..n]).await.unwrap();
                sent += n;
            }
            while limits.budget.available() > BUDGET - FRAME {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // The second announces as much and sends its head: the pool
            // has no room, the lane grants it all.
            trickler.write_all(&prefix).await.unwrap();
            trickler.write_all(&chunk[..HEAD]).await.unwrap();
            while limits.budget.available() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // A graph of 300 KiB waits in the lane's line behind it; sent
            // from a task of its own, as it is not read meanwhile.
            let graph = big_graph();
            let sending = tokio::spawn(async move {
                let _ = behind.write_all(&graph).await;
                behind // kept open
            });
            // Then a byte every 100 ms: it earns 10 µs a second.
            let trickling = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if trickler.write_all(&[0]).await.is_err() {
                        return;
                    }
                }
            });
            let bound = Duration::from_secs(15);
            let mut second = readers.remove(1);
            match tokio::time::timeout(bound, &mut second).await {
                Ok(Ok(Some(ProtocolError::Stalled(_)))) => {}
                Ok(other) => panic!("the trickling peer's reader ended otherwise: {other:?}"),
                Err(_) => panic!("the trickling peer still held the lane after {bound:?}"),
            }
            let read = tokio::time::timeout(bound, events.recv()).await;
            assert!(
                read.is_ok(),
                "the frame behind was not read within {bound:?}"
            );
            assert_graph_from(3, read.ok().flatten());
            trickling.abort();
            sending.abort();
            for reading in readers {
                reading.abort();
            }
        });
    }

    /// Rule 8: a connection's handshakes, TLS's and the token's, run on
    /// the handshakes' thread: they complete while the state's thread is
    /// busy (blocked here on purpose), and the connection is served there
    /// once it is free. Before, both ran on the state's thread, so any peer
    /// could spend it on TLS's key exchange before proving anything.
    #[test]
    fn tls_handshakes_complete_while_the_state_thread_is_busy() {
        let pki = crate::tls::testing::Pki::new("handshakes");
        let options = Options::default().tls(pki.identity());
        let scheduler = serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap();
        let auth = Auth::Token(scheduler.token().unwrap().clone());
        let connector = pki.connector();
        // The state's thread, blocked until told (60 s at most).
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (blocking, blocked) = std::sync::mpsc::channel();
        scheduler.runtime.spawn(async move {
            let _ = blocking.send(std::thread::current().name().map(str::to_owned));
            let _ = released.recv_timeout(Duration::from_secs(60));
        });
        let wait = Duration::from_secs(30);
        let on = blocked.recv_timeout(wait).unwrap();
        assert_eq!(on.as_deref(), Some("rask-scheduler"));
        let address = scheduler.address().to_string();
        let runtime = net::runtime().unwrap();
        let connected = runtime.block_on(net::connect(
            (crate::protocol::Scheme::Tls, &address, Some(&connector)),
            Role::Client,
            Role::Scheduler,
            BuildId::NONE,
            &auth,
            net::CONNECT_TIMEOUT,
            &net::Limits::standard(),
        ));
        let _ = release.send(());
        let connected = match connected {
            Ok(connected) => connected,
            Err(e) => panic!("no handshake while the state's thread was busy: {e}"),
        };
        // Served on the state's thread once it is free: a client counted.
        let deadline = Instant::now() + wait;
        while scheduler.clients() == 0 {
            assert!(Instant::now() < deadline, "the client was not served");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(connected);
    }
}
