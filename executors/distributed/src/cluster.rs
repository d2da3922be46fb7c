//! [`LocalCluster`]: a scheduler in this process and worker processes on
//! this machine.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::scheduler::{self, SchedulerHandle};
use crate::{Client, Error, WORKER_ENV};

/// How long `start` waits for every worker to register.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes of a worker's stderr kept to explain an early exit.
const TAIL_BYTES: usize = 4096;

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
    tail: Arc<Mutex<VecDeque<u8>>>,
    stderr: Option<JoinHandle<()>>,
}

impl LocalCluster {
    /// Starts a scheduler on 127.0.0.1 (port chosen by the OS) and `workers`
    /// processes made by `worker`, with [`WORKER_ENV`] set to the
    /// scheduler's address. Returns once every worker registered.
    ///
    /// Workers' stderr is forwarded to this process's stderr; the last few
    /// kilobytes are kept to explain a worker that exits early.
    ///
    /// # Errors
    ///
    /// [`Error::NestedCluster`] when called inside a worker process (its
    /// `main` ran again instead of the worker: worker mode is not set up),
    /// [`Error::Spawn`] if a process cannot be started,
    /// [`Error::WorkerExited`] if one exits before registering (with its exit
    /// status and the tail of its stderr), [`Error::Timeout`] if they do not
    /// all register within a minute. Every process started is stopped.
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
            command
                .env(WORKER_ENV, &address)
                .stdin(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = command
                .spawn()
                .map_err(|source| Error::Spawn { index, source })?;
            let tail = Arc::new(Mutex::new(VecDeque::new()));
            let stderr = child.stderr.take().and_then(|pipe| {
                let tail = tail.clone();
                std::thread::Builder::new()
                    .name(format!("rask-worker-{index}-stderr"))
                    .spawn(move || forward_stderr(pipe, &tail))
                    .ok()
            });
            cluster.workers.push(Worker {
                child: Some(child),
                tail,
                stderr,
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while cluster.scheduler.workers() < workers {
            for (index, w) in cluster.workers.iter_mut().enumerate() {
                let Some(child) = w.child.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = child.try_wait() {
                    w.child = None;
                    // Let the forwarder read what the process wrote last.
                    if let Some(t) = w.stderr.take() {
                        let _ = t.join();
                    }
                    let tail = w.tail.lock().unwrap_or_else(|e| e.into_inner());
                    let stderr = String::from_utf8_lossy(&tail.iter().copied().collect::<Vec<_>>())
                        .into_owned();
                    return Err(Error::WorkerExited {
                        index,
                        status,
                        stderr,
                    });
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
        for w in &mut self.workers {
            if let Some(t) = w.stderr.take() {
                let _ = t.join();
            }
        }
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

/// Copies a worker's stderr to ours, keeping its last bytes.
fn forward_stderr(pipe: std::process::ChildStderr, tail: &Mutex<VecDeque<u8>>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                // Through `eprint!` so test harnesses capture it.
                eprint!("{}", String::from_utf8_lossy(&line));
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                t.extend(line.iter().copied());
                while t.len() > TAIL_BYTES {
                    t.pop_front();
                }
            }
        }
    }
}
