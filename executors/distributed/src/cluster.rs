//! [`LocalCluster`]: a scheduler in this process and worker processes on
//! this machine.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::scheduler::{self, SchedulerHandle};
use crate::{Client, Error, WORKER_ENV};

/// How long `start` waits for every worker to register.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A scheduler running in this process plus `n` worker processes on
/// 127.0.0.1. Dropping it kills and reaps every worker and stops the
/// scheduler.
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
    workers: Vec<Worker>,
}

struct Worker {
    child: Option<Child>,
}

impl LocalCluster {
    /// Starts a scheduler on 127.0.0.1 (port chosen by the OS) and `workers`
    /// processes made by `worker`, with [`WORKER_ENV`] set to the
    /// scheduler's address. Returns once every worker registered.
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
    /// [`Error::Spawn`] if a process cannot be started,
    /// [`Error::WorkerExited`] if one exits before registering (with its exit
    /// status; what it wrote to stderr is printed above), [`Error::Timeout`]
    /// if they do not all register within a minute. Every process started
    /// is stopped.
    pub fn start(workers: usize, worker: impl Fn() -> Command) -> Result<LocalCluster, Error> {
        if std::env::var_os(WORKER_ENV).is_some() {
            return Err(Error::NestedCluster);
        }
        let scheduler = scheduler::serve(([127, 0, 0, 1], 0).into())?;
        let address = format!("tcp://{}", scheduler.address());
        let mut cluster = LocalCluster {
            scheduler,
            workers: Vec::with_capacity(workers),
        };
        for index in 0..workers {
            let mut command = worker();
            // Stdout and stderr are inherited (see Output above).
            command.env(WORKER_ENV, &address).stdin(Stdio::null());
            let child = command
                .spawn()
                .map_err(|source| Error::Spawn { index, source })?;
            cluster.workers.push(Worker { child: Some(child) });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while cluster.scheduler.workers() < workers {
            for (index, w) in cluster.workers.iter_mut().enumerate() {
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
        Ok(cluster)
    }

    /// The scheduler's address, `tcp://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("tcp://{}", self.scheduler.address())
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
        let child = self
            .workers
            .get_mut(index)
            .and_then(|w| w.child.take())
            .ok_or(Error::NoWorker { index })?;
        reap(child).map_err(Error::Io)
    }

    /// Number of worker processes started.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}

/// A client of a scheduler this process started ([`scheduler::serve`]),
/// as [`LocalCluster::client`] makes: it hands the scheduler its frames
/// (the same as over TCP) through in-memory channels, with no handshake,
/// and runs its network loop on the scheduler's thread, so a message
/// between the two costs no system call, no copy through a socket and no
/// thread hand-off. Other processes (workers, other clients) still reach
/// the scheduler at its TCP address.
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
    let address = format!("tcp://{}", scheduler.address());
    match scheduler.local() {
        Some(local) => Client::connect_on(&address, scheduler.runtime(), local),
        None => Err(Error::Connection {
            addr: address,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }),
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(child) = w.child.take() {
                let _ = reap(child);
            }
        }
        self.scheduler.shutdown();
    }
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("address", &self.address())
            .field("workers", &self.workers.len())
            .finish()
    }
}

fn reap(mut child: Child) -> std::io::Result<()> {
    // `kill` fails if the process already exited; `wait` reaps it either way.
    let killed = child.kill();
    child.wait()?;
    killed.or(Ok(()))
}
