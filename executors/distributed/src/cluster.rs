//! [`LocalCluster`]: a scheduler in this process and worker processes on
//! this machine.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::scheduler::{self, SchedulerHandle};
use crate::{
    Client, Error, Tls, Token, DEATH_TIMEOUT_ENV, INSECURE_ENV, LEAVE_ON_SIGTERM_ENV,
    MEMORY_LIMIT_ENV, RESTART_EXIT_CODE, SPILL_DIR_ENV, SUPERVISED_ENV, TOKEN_ENV, TOKEN_FILE_ENV,
    WORKER_ENV,
};

/// How long `start` waits for every worker to register.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the supervisor looks for workers that exited.
const SUPERVISE_EVERY: Duration = Duration::from_millis(20);

/// A worker process started less than this long ago is restarted only
/// once this long has passed: a worker that keeps exiting restarts once a
/// second at most.
const MIN_LIFE: Duration = Duration::from_secs(1);

/// A scheduler running in this process plus `n` worker processes on
/// 127.0.0.1. Dropping it kills and reaps every worker and stops the
/// scheduler.
///
/// # Authentication
///
/// Each cluster has a fresh [`Token`]: its workers get it in [`TOKEN_ENV`]
/// (the command's [`INSECURE_ENV`] and [`TOKEN_FILE_ENV`] are removed, so
/// nothing in this process's environment overrides it), and its scheduler
/// and their data ports refuse every process that does not prove it.
/// [`LocalCluster::client`] talks to the scheduler through memory and
/// needs no token of its own; another process connects with
/// [`LocalCluster::token`].
///
/// # TLS
///
/// When the environment holds TLS settings ([`Tls::from_env`]:
/// [`TLS_CA_ENV`](crate::TLS_CA_ENV), [`TLS_CERT_ENV`](crate::TLS_CERT_ENV),
/// [`TLS_KEY_ENV`](crate::TLS_KEY_ENV)), the cluster runs over TLS: the
/// scheduler presents the certificate and, the CA being given, requires
/// its workers' (mutual TLS); the workers inherit the same variables, so
/// they present the same certificate to the scheduler and on their data
/// ports, and [`LocalCluster::address`] is `tls://127.0.0.1:PORT`. The
/// certificate must name `127.0.0.1`. All three variables are needed.
///
/// # Transport
///
/// On Linux without TLS, the workers reach the scheduler through a Unix
/// socket of the abstract namespace (`unix:@rask-PID-N-…`: no file to
/// remove however the process ends), which costs less per message
/// than TCP over loopback. They prove the token there as over TCP, and
/// check the scheduler proves it too. Other processes, and the workers'
/// data ports, use TCP: [`LocalCluster::address`] is the TCP address.
/// Elsewhere, or over TLS, the workers use TCP too.
///
/// # Memory
///
/// Each worker gets a memory limit ([`MEMORY_LIMIT_ENV`]) of an equal
/// share of the machine's memory ([`worker::machine_memory`](crate::worker::machine_memory):
/// the machine's, or its cgroup's if smaller), as Dask's `LocalCluster`
/// does: a worker spills to disk above 60 % of it and holds back new tasks
/// above 95 % (see [`worker`](crate::worker) rule 14). A
/// [`MEMORY_LIMIT_ENV`] set in this process (inherited by the workers), or
/// on the command `worker` makes, wins; `none` turns the limit off. A
/// worker removes its spill directory when it ends; for the worker
/// processes the cluster kills (when dropped, by
/// [`LocalCluster::kill_worker`]) or restarts, the cluster removes it.
///
/// # Restarts
///
/// A supervisor thread owned by the cluster restarts a worker process that
/// dies or fails: killed by a signal (a segfault, an abort, the kernel's
/// out-of-memory killer), or exiting with any status but success — a task
/// that calls `std::process::exit(3)`, say, or a worker that exits with
/// [`RESTART_EXIT_CODE`] because a thread of its stays stuck in a
/// cancelled or timed-out task past its grace period (see
/// [`worker`](crate::worker) rule 11; workers are started with
/// [`SUPERVISED_ENV`] set, and [`GRACE_ENV`](crate::GRACE_ENV) sets the
/// period). Its tasks run elsewhere meanwhile, and a task that keeps
/// crashing its workers fails after the scheduler's allowed failures
/// ([`scheduler::Options::allowed_failures`]), so a cluster keeps its
/// workers whatever its tasks do. The new process is made by the same
/// command and keeps the same index; it starts within a few tens of
/// milliseconds of the exit, or one second after the old process started
/// if that is later (a worker that keeps exiting is restarted once a
/// second at most). A line on stderr says so. A worker that exits with
/// success is not restarted: it was retired
/// ([`Client::retire_workers`]), or a task ended its process with
/// `exit(0)`. Nor is one killed by [`LocalCluster::kill_worker`]. The
/// supervisor is stopped and joined when the cluster is dropped, before
/// the workers are killed.
///
/// # Examples
///
/// ```no_run
/// use rask_distributed::LocalCluster;
/// // Workers are this same program, started in worker mode (it must check
/// // `RASK_WORKER` at the top of `main` and call `worker::run`).
/// let cluster = LocalCluster::start(2, || {
///     std::process::Command::new(std::env::current_exe().unwrap())
/// })?;
/// let client = cluster.client()?;
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub struct LocalCluster {
    scheduler: SchedulerHandle,
    workers: Workers,
    /// Dropped to stop the supervisor, which is then joined.
    supervisor: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

/// The worker processes, shared with the supervisor.
type Workers = Arc<Mutex<Vec<Worker>>>;

struct Worker {
    /// `None` once killed by `kill_worker` (or never restarted).
    child: Option<Child>,
    started: Instant,
    /// Where its process makes its spill directory, which is removed
    /// once the process is gone (see Memory on [`LocalCluster`]).
    spill_parent: PathBuf,
}

/// Makes the command of a worker process.
type MakeWorker = Box<dyn Fn() -> Command + Send>;

fn lock_workers(workers: &Workers) -> MutexGuard<'_, Vec<Worker>> {
    // Every critical section leaves the list whole: poison is harmless.
    workers.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalCluster {
    /// Starts a scheduler on 127.0.0.1 (port chosen by the OS) and `workers`
    /// processes made by `worker`, with [`WORKER_ENV`] set to the
    /// scheduler's address, [`SUPERVISED_ENV`] to `1` and
    /// [`DEATH_TIMEOUT_ENV`] to `0`: the scheduler lives in this process, so
    /// when it goes away the program is gone, and its workers exit at once
    /// instead of waiting for it to come back. Returns once every worker
    /// registered. `worker` is kept to restart workers that die (see
    /// Restarts above).
    ///
    /// # Output
    ///
    /// Workers write straight to the stdout and stderr they inherit from
    /// this process (unless `worker`'s command redirects them): no pipe or
    /// thread stands in between, so nothing a task printed is lost when the
    /// program exits, and a worker flushes its stdout after its tasks run,
    /// before their results are reported (a `print!` without a newline
    /// shows too). Lines are not prefixed, and lines of different workers
    /// may interleave. Rust's stdout is line-buffered, so a `println!`
    /// line reaches the terminal whole; stderr is unbuffered, so an
    /// `eprintln!` is written in pieces, and two workers writing at the
    /// same moment can mix within a line (a line formatted first, newline
    /// included, and printed with `eprint!("{line}")` is written at once).
    ///
    /// # Errors
    ///
    /// [`Error::NestedCluster`] when called inside a worker process (its
    /// `main` ran again instead of the worker: worker mode is not set up),
    /// errors of [`Tls::from_env`], and [`Error::TlsSettings`] when the TLS
    /// settings lack one of their three parts (see TLS above),
    /// [`Error::Spawn`] if a process cannot be started,
    /// [`Error::WorkerExited`] if one exits before registering (with its exit
    /// status; what it wrote to stderr is printed above), [`Error::Timeout`]
    /// if they do not all register within a minute, [`Error::Io`] if the
    /// supervisor thread cannot be started. Every process started is
    /// stopped.
    pub fn start(
        workers: usize,
        worker: impl Fn() -> Command + Send + 'static,
    ) -> Result<LocalCluster, Error> {
        LocalCluster::start_with(workers, scheduler::Options::default(), worker)
    }

    /// [`LocalCluster::start`] with a scheduler of these `options`, e.g.
    /// serving the dashboard ([`scheduler::Options::dashboard`]).
    ///
    /// # Errors
    ///
    /// As [`LocalCluster::start`], and [`Error::Dashboard`] when the
    /// dashboard's address cannot be bound.
    pub fn start_with(
        workers: usize,
        options: scheduler::Options,
        worker: impl Fn() -> Command + Send + 'static,
    ) -> Result<LocalCluster, Error> {
        if std::env::var_os(WORKER_ENV).is_some() {
            return Err(Error::NestedCluster);
        }
        // A fresh token (`serve`'s default): see Authentication above.
        let mut options = options;
        if let Some(tls) = Tls::from_env()? {
            if !tls.has_ca() || !tls.has_identity() {
                return Err(Error::TlsSettings {
                    problem: "a local cluster over TLS needs RASK_TLS_CA, RASK_TLS_CERT and \
                              RASK_TLS_KEY, its certificate naming 127.0.0.1",
                    source: None,
                });
            }
            options = options.tls(tls);
        }
        let loopback = ([127, 0, 0, 1], 0).into();
        let scheduler = if cfg!(target_os = "linux")
            && options.tls.is_none()
            && options.unix.is_none()
        {
            // A name taken (by chance, or by a process squatting on it) is
            // not ours: another one.
            let mut tries = 0;
            loop {
                let named = options.clone().unix(abstract_socket_name());
                match scheduler::serve_with(loopback, named) {
                    Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 3 => {
                        tries += 1;
                    }
                    served => break served?,
                }
            }
        } else {
            scheduler::serve_with(loopback, options)?
        };
        let address = worker_address(&scheduler);
        let token = scheduler
            .token()
            .map(Token::expose_secret)
            .unwrap_or_default();
        let mut cluster = LocalCluster {
            scheduler,
            workers: Arc::new(Mutex::new(Vec::with_capacity(workers))),
            supervisor: None,
        };
        let share = machine_share(workers);
        let make: MakeWorker = Box::new(move || {
            let mut command = worker();
            let set = command.get_envs().any(|(name, _)| name == MEMORY_LIMIT_ENV);
            if let (Some(bytes), false) = (share, set) {
                command.env(MEMORY_LIMIT_ENV, bytes.to_string());
            }
            command
        });
        for index in 0..workers {
            let (child, spill_parent) = spawn(&make, &address, &token, index)?;
            lock_workers(&cluster.workers).push(Worker {
                child: Some(child),
                started: Instant::now(),
                spill_parent,
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while cluster.scheduler.workers() < workers {
            for (index, w) in lock_workers(&cluster.workers).iter_mut().enumerate() {
                let Some(child) = w.child.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = child.try_wait() {
                    w.child = None;
                    return Err(Error::WorkerExited { index, status });
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "the worker processes to register",
                    after: START_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (stop, stopped) = mpsc::channel();
        let shared = cluster.workers.clone();
        let supervisor = std::thread::Builder::new()
            .name("rask-supervisor".into())
            .spawn(move || supervise(&shared, &make, &address, &token, &stopped))
            .map_err(Error::Io)?;
        cluster.supervisor = Some((stop, supervisor));
        Ok(cluster)
    }

    /// The scheduler's address, `tcp://127.0.0.1:PORT` (`tls://…` over
    /// TLS).
    pub fn address(&self) -> String {
        scheme_address(&self.scheduler)
    }

    /// The address the cluster's workers reach the scheduler at: on Linux
    /// without TLS its Unix socket, `unix:@NAME` (see Transport above),
    /// else [`LocalCluster::address`]. Another worker of this machine may
    /// join there too, with the cluster's [`token`](LocalCluster::token).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use rask_distributed::LocalCluster;
    /// let cluster = LocalCluster::start(1, || {
    ///     std::process::Command::new(std::env::current_exe().unwrap())
    /// })?;
    /// // One more worker of this program, started by hand.
    /// std::process::Command::new(std::env::current_exe().unwrap())
    ///     .env(rask_distributed::WORKER_ENV, cluster.worker_address())
    ///     .env(rask_distributed::TOKEN_ENV, cluster.token().expose_secret())
    ///     .spawn()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn worker_address(&self) -> String {
        worker_address(&self.scheduler)
    }

    /// The address of the scheduler's web dashboard, when it runs
    /// ([`scheduler::Options::dashboard`]): its page is
    /// `http://ADDRESS/status`.
    pub fn dashboard(&self) -> Option<std::net::SocketAddr> {
        self.scheduler.dashboard()
    }

    /// The cluster's token, for another process to connect by
    /// [`LocalCluster::address`] (in its [`TOKEN_ENV`], or with
    /// [`Client::connect_with`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use rask_distributed::{Auth, Client, LocalCluster};
    /// let cluster = LocalCluster::start(1, || {
    ///     std::process::Command::new(std::env::current_exe().unwrap())
    /// })?;
    /// let auth = Auth::Token(cluster.token().clone());
    /// let other = Client::connect_with(&cluster.address(), auth)?;
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn token(&self) -> &Token {
        self.scheduler
            .token()
            .expect("a local cluster's scheduler always has a token")
    }

    /// A new client of this cluster. It talks to the scheduler through
    /// memory rather than a socket, and its network loop runs on the
    /// scheduler's thread: a message between the two costs no system call
    /// and no thread hand-off.
    ///
    /// # Errors
    ///
    /// As [`Client::connect`].
    pub fn client(&self) -> Result<Client, Error> {
        in_process_client(&self.scheduler)
    }

    /// Kills worker `index` with SIGKILL and reaps it (to test recovery).
    ///
    /// # Errors
    ///
    /// [`Error::NoWorker`] if there is no such worker, or it was killed
    /// already; [`Error::Io`] if the kill fails.
    pub fn kill_worker(&mut self, index: usize) -> Result<(), Error> {
        // Taken out under the lock: the supervisor never restarts it.
        let (child, parent) = lock_workers(&self.workers)
            .get_mut(index)
            .and_then(|w| Some((w.child.take()?, w.spill_parent.clone())))
            .ok_or(Error::NoWorker { index })?;
        reap(child, &parent).map_err(Error::Io)
    }

    /// Number of worker processes started (a restarted worker counts once).
    pub fn workers(&self) -> usize {
        lock_workers(&self.workers).len()
    }
}

/// Each worker's memory limit by default (see Memory on [`LocalCluster`]):
/// `None` when this process sets [`MEMORY_LIMIT_ENV`] (the workers inherit
/// it) or the machine's memory is unknown.
fn machine_share(workers: usize) -> Option<u64> {
    if std::env::var_os(MEMORY_LIMIT_ENV).is_some() {
        return None;
    }
    Some(crate::worker::machine_memory()? / workers.max(1) as u64)
}

/// Starts worker process `index` of the scheduler at `address`, whose
/// token's text is `token`; returns it and where it makes its spill
/// directory.
fn spawn(
    make: &MakeWorker,
    address: &str,
    token: &str,
    index: usize,
) -> Result<(Child, PathBuf), Error> {
    let mut command = make();
    let spill_parent = command
        .get_envs()
        .find(|(name, _)| *name == SPILL_DIR_ENV)
        .map(|(_, value)| value.map(PathBuf::from))
        .unwrap_or_else(|| std::env::var_os(SPILL_DIR_ENV).map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(std::env::temp_dir);
    // Stdout and stderr are inherited (see Output above).
    // The scheduler is in this process: never coming back once gone.
    command
        .env(WORKER_ENV, address)
        .env(SUPERVISED_ENV, "1")
        .env(DEATH_TIMEOUT_ENV, "0")
        // Worker rule 17: this program owns its workers' lives.
        .env(LEAVE_ON_SIGTERM_ENV, "0")
        .env(TOKEN_ENV, token)
        .env_remove(TOKEN_FILE_ENV)
        .env_remove(INSECURE_ENV)
        .stdin(Stdio::null());
    command
        .spawn()
        .map(|child| (child, spill_parent))
        .map_err(|source| Error::Spawn { index, source })
}

/// The supervisor (see Restarts on [`LocalCluster`]): until `stop` is sent
/// to or dropped, restarts the workers that died or exited with a status
/// other than success.
fn supervise(
    shared: &Workers,
    make: &MakeWorker,
    address: &str,
    token: &str,
    stop: &mpsc::Receiver<()>,
) {
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(SUPERVISE_EVERY) {
        let mut list = lock_workers(shared);
        for (index, w) in list.iter_mut().enumerate() {
            let Some(child) = w.child.as_mut() else {
                continue;
            };
            // A success is a retirement (or a task's `exit(0)`): not ours
            // to undo. The status is kept by `Child`, so asking again
            // costs nothing.
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            if status.success() || w.started.elapsed() < MIN_LIFE {
                continue;
            }
            crate::worker::remove_spill_dirs(&w.spill_parent, child.id());
            let what = if status.code() == Some(RESTART_EXIT_CODE) {
                "asked to be restarted"
            } else {
                "died"
            };
            match spawn(make, address, token, index) {
                Ok((new, spill_parent)) => {
                    w.spill_parent = spill_parent;
                    tracing::warn!("worker process {index} {what} ({status}); started it again");
                    w.child = Some(new);
                    w.started = Instant::now();
                }
                Err(e) => {
                    tracing::warn!(
                        "worker process {index} {what} ({status}), and could not be started \
                         again: {}",
                        crate::net::Chain(&e)
                    );
                    w.child = None;
                }
            }
        }
    }
}

/// A client of a scheduler this process started ([`scheduler::serve`]),
/// as [`LocalCluster::client`] makes: it hands the scheduler its frames
/// (the same as over TCP) through in-memory channels, with no handshake
/// (it is the scheduler's own process), and runs its network loop on the
/// scheduler's thread, so a message between the two costs no system call,
/// no copy through a socket and no thread hand-off. Other processes
/// (workers, other clients) still reach the scheduler at its TCP address;
/// this client proves the scheduler's token to workers' data ports.
///
/// # Errors
///
/// As [`Client::connect`]; a scheduler that was shut down refuses the
/// connection.
///
/// # Examples
///
/// ```
/// let scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap())?;
/// let client = rask_distributed::in_process_client(&scheduler)?;
/// assert_eq!(client.address(), format!("tcp://{}", scheduler.address()));
/// # Ok::<(), rask_distributed::Error>(())
/// ```
pub fn in_process_client(scheduler: &SchedulerHandle) -> Result<Client, Error> {
    let address = scheme_address(scheduler);
    // Workers' data ports of a TLS cluster are TLS too (`tls.rs` rule 1).
    let tls = scheduler.tls().map(Tls::connector).transpose()?;
    match scheduler.local() {
        Some(local) => {
            let auth = scheduler.auth().clone();
            Client::connect_on(&address, scheduler.runtime(), local, auth, tls)
        }
        None => Err(Error::Connection {
            addr: address,
            reason: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }),
    }
}

/// A name in Linux's abstract namespace for a cluster's scheduler, unlikely
/// to be taken: this process, a count, and the clock. A process holding
/// it first cannot pass for the scheduler (workers check the scheduler
/// proves the token); the cluster then takes another.
fn abstract_socket_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}rask-{}-{n}-{nanos:08x}",
        crate::net::ABSTRACT,
        std::process::id()
    )
}

/// The address workers of this machine reach `scheduler` at: its Unix
/// socket when there is one.
fn worker_address(scheduler: &SchedulerHandle) -> String {
    match scheduler.unix().and_then(|p| p.to_str()) {
        Some(path) => format!("unix:{path}"),
        None => scheme_address(scheduler),
    }
}

/// The address clients and workers reach `scheduler` at, with its scheme.
fn scheme_address(scheduler: &SchedulerHandle) -> String {
    let scheme = if scheduler.tls().is_some() {
        "tls"
    } else {
        "tcp"
    };
    format!("{scheme}://{}", scheduler.address())
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // First the supervisor, so nothing is restarted behind the kills.
        if let Some((stop, supervisor)) = self.supervisor.take() {
            drop(stop);
            let _ = supervisor.join();
        }
        for w in lock_workers(&self.workers).iter_mut() {
            if let Some(child) = w.child.take() {
                let _ = reap(child, &w.spill_parent);
            }
        }
        self.scheduler.shutdown();
    }
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("address", &self.address())
            .field("workers", &self.workers())
            .finish()
    }
}

/// Kills and reaps `child`, then removes the spill directories it made
/// under `spill_parent`, which a killed worker cannot.
fn reap(mut child: Child, spill_parent: &std::path::Path) -> std::io::Result<()> {
    // `kill` fails if the process already exited; `wait` reaps it either way.
    let killed = child.kill();
    child.wait()?;
    crate::worker::remove_spill_dirs(spill_parent, child.id());
    killed.or(Ok(()))
}
