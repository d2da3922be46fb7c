//! The distributed executor seen from a rask program: worker mode, local
//! clusters and connections to a running scheduler.
//!
//! A worker is this program's own binary, started with `RASK_WORKER` set to
//! its scheduler's address: [`crate::init`] sees the variable and runs the
//! worker instead of returning to `main`, so the functions it runs are the
//! ones the program registered. The process exits once the worker gives up
//! on its scheduler (`rask_distributed::worker` rule 1: after its death
//! timeout, `RASK_WORKER_DEATH_TIMEOUT`).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use rask_distributed::{Client, LocalCluster, WORKER_ENV, WORKER_THREADS_ENV};

use crate::{Error, Result};

/// The thread count `text` names, from [`WORKER_THREADS_ENV`].
fn parse_worker_threads(text: &str) -> Result<usize> {
    rask_distributed::worker::parse_threads(text).ok_or_else(|| {
        Error::Distributed(rask_distributed::Error::Env {
            name: WORKER_THREADS_ENV,
            value: text.to_owned(),
            expected: rask_distributed::worker::THREADS_EXPECTED,
        })
    })
}

/// Threads per worker process of a local cluster of `workers`:
/// [`WORKER_THREADS_ENV`] if set, else the machine's cores split between
/// the workers, at least one each (Dask's `LocalCluster` does the same).
fn worker_threads(workers: usize) -> Result<usize> {
    match std::env::var(WORKER_THREADS_ENV) {
        Ok(text) => parse_worker_threads(&text),
        Err(std::env::VarError::NotUnicode(text)) => parse_worker_threads(&text.to_string_lossy()),
        Err(std::env::VarError::NotPresent) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Ok((cores / workers.max(1)).max(1))
        }
    }
}

/// How long [`Cluster::broadcast`] waits for every worker to hold a copy.
const BROADCAST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection to a scheduler, and the local cluster behind it if this
/// process started one.
pub(crate) struct Cluster {
    client: Client,
    // Dropped after the client: stops the scheduler and the workers.
    local: Mutex<Option<LocalCluster>>,
}

impl Cluster {
    /// Connects to a running scheduler at `host:port` (`tls://host:port`
    /// over TLS, `unix:PATH` through its Unix socket), with the token the
    /// configuration gives; inside a task on a worker of that scheduler, as
    /// that worker (its build, token and TLS settings:
    /// `rask_distributed::TaskCluster`).
    pub(crate) fn connect(address: &str) -> Result<Cluster> {
        if let Some(cluster) = task_cluster_at(address) {
            return Ok(Cluster {
                client: Client::for_task_cluster(&cluster)?,
                local: Mutex::new(None),
            });
        }
        let auth = crate::run::config::auth()?.ok_or_else(|| rask_distributed::Error::NoToken {
            default_path: rask_distributed::Token::default_path(),
        })?;
        Ok(Cluster {
            client: Client::connect_with(address, auth)?,
            local: Mutex::new(None),
        })
    }

    /// Starts a scheduler in this process and `workers` worker processes of
    /// this program on 127.0.0.1, [`worker_threads`] threads each, and
    /// connects to it.
    pub(crate) fn local(workers: usize) -> Result<Cluster> {
        if std::env::var_os(WORKER_ENV).is_some() {
            // A worker that reached this point did not call `rask::init`
            // first; starting a cluster here would recurse.
            return Err(Error::WorkerSetup);
        }
        if crate::build::registry::installed().is_none() {
            return Err(Error::NotInitialized);
        }
        // `/proc/self/exe` opens the file this program started from even
        // after a rebuild replaced it: workers (restarted ones too) are
        // always this very build.
        let running = std::path::Path::new("/proc/self/exe");
        let exe = if running.exists() {
            running.to_path_buf()
        } else {
            std::env::current_exe().map_err(Error::Executor)?
        };
        // Checked before any process starts: a bad setting is the
        // client's error, not a worker's death.
        let threads = worker_threads(workers)?.to_string();
        let mut args = std::env::args_os();
        let name = args.next();
        let args: Vec<_> = args.collect();
        // Workers inherit this program's stdout and stderr: what tasks
        // print shows as if they ran here.
        let mut options = rask_distributed::scheduler::Options::default();
        let dashboard = crate::run::config::dashboard()?;
        if let Some((at, _)) = dashboard {
            options = options.dashboard(at);
        }
        let started = LocalCluster::start_with(workers, options, move || {
            let mut command = Command::new(&exe);
            // Shown by `ps` as this program, not as `/proc/self/exe`.
            #[cfg(unix)]
            if let Some(name) = &name {
                std::os::unix::process::CommandExt::arg0(&mut command, name);
            }
            #[cfg(not(unix))]
            let _ = &name;
            command
                .args(&args)
                .env(WORKER_THREADS_ENV, &threads)
                .stdin(Stdio::null());
            command
        });
        let local = match (started, dashboard) {
            // Named with the setting that asked for it: the user's to change.
            (Err(rask_distributed::Error::Dashboard { addr, reason }), Some((_, setting))) => {
                return Err(Error::Dashboard {
                    address: addr,
                    setting,
                    reason,
                })
            }
            (started, _) => started?,
        };
        Ok(Cluster {
            client: local.client()?,
            local: Mutex::new(Some(local)),
        })
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Has every worker hold a copy of `key` (Dask's `replicate`), if the
    /// cluster holds it, and waits until they do, at most
    /// [`BROADCAST_TIMEOUT`]: the scheduler
    /// asks each worker to fetch it (its rule S13) and answers nothing, so
    /// this asks it who holds the key until every worker does.
    // Asking is a round trip per look, with pauses growing to 50 ms: a
    // broadcast is rare and its copies take a fetch each, so this costs
    // little; a scheduler answer once all copies arrived would cost none,
    // and a state per request in the scheduler (TODO(#16)).
    pub(crate) fn broadcast(&self, key: rask_executor::Key) -> Result<()> {
        let holders = |client: &Client| -> Result<usize> {
            Ok(client.who_has(&[key])?.pop().map_or(0, |h| h.len()))
        };
        if holders(&self.client)? == 0 {
            // Not held there: a small value came back to this process and
            // travels with each task (`rask_distributed::client` rule 5).
            return Ok(());
        }
        self.client.replicate(&[key])?;
        let deadline = std::time::Instant::now() + BROADCAST_TIMEOUT;
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            // Workers may leave meanwhile: counted again each time.
            let workers = self.client.info()?.workers.len();
            let held = holders(&self.client)?;
            if held >= workers {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    held,
                    workers,
                    "scatter: {held} of {workers} workers hold the broadcast value after {:?}; \
                     the others fetch it when a task needs it",
                    BROADCAST_TIMEOUT
                );
                return Ok(());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(50));
        }
    }

    /// The address of a local cluster's dashboard, if it runs.
    pub(crate) fn dashboard(&self) -> Option<std::net::SocketAddr> {
        self.local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(LocalCluster::dashboard)
    }

    /// Kills worker process `index` of a local cluster (for fault tests).
    pub(crate) fn kill_worker(&self, index: usize) -> Result<()> {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        match local.as_mut() {
            Some(cluster) => Ok(cluster.kill_worker(index)?),
            None => Err(Error::Executor(std::io::Error::other(
                "this client is not on a local cluster",
            ))),
        }
    }
}

/// The process-wide cluster for `RASK_SCHEDULER=local:N`: started on first
/// use, kept until the process exits (its workers exit when they lose it).
pub(crate) fn shared_local(workers: usize) -> Result<Arc<Cluster>> {
    static CLUSTERS: Mutex<Option<HashMap<usize, Arc<Cluster>>>> = Mutex::new(None);
    let mut clusters = CLUSTERS.lock().unwrap_or_else(PoisonError::into_inner);
    let clusters = clusters.get_or_insert_with(HashMap::new);
    if let Some(cluster) = clusters.get(&workers) {
        return Ok(cluster.clone());
    }
    let cluster = Arc::new(Cluster::local(workers)?);
    clusters.insert(workers, cluster.clone());
    Ok(cluster)
}

/// The process-wide connection for `RASK_SCHEDULER=tcp://host:port`: made on
/// first use and kept, so computes don't reconnect each time. A connection
/// found lost (the scheduler restarted, the network failed) is replaced by
/// a new one; whatever still holds the old one sees its futures fail.
pub(crate) fn shared_connection(address: &str) -> Result<Arc<Cluster>> {
    static CONNECTIONS: Mutex<Option<HashMap<String, Arc<Cluster>>>> = Mutex::new(None);
    let mut connections = CONNECTIONS.lock().unwrap_or_else(PoisonError::into_inner);
    let connections = connections.get_or_insert_with(HashMap::new);
    match connections.get(address) {
        Some(cluster) if cluster.client.is_connected() => return Ok(cluster.clone()),
        Some(_) => {
            connections.remove(address);
        }
        None => {}
    }
    let cluster = Arc::new(Cluster::connect(address)?);
    connections.insert(address.to_owned(), cluster.clone());
    Ok(cluster)
}

/// The executor of the cluster whose worker runs this thread's task, if it
/// runs on one (config rule 4).
pub(crate) fn task_cluster_executor() -> Option<crate::run::config::ExecutorKind> {
    let cluster = rask_distributed::task_cluster()?;
    crate::run::config::ExecutorKind::parse(cluster.address()).ok()
}

/// The cluster of the worker running this thread's task, if `address` (as
/// [`shared_connection`] is given it: `host:port`, `tls://host:port` or
/// `unix:PATH`)
/// is its scheduler's.
fn task_cluster_at(address: &str) -> Option<Arc<rask_distributed::TaskCluster>> {
    let cluster = rask_distributed::task_cluster()?;
    let own = cluster.address();
    (own == address || own.strip_prefix("tcp://") == Some(address)).then_some(cluster)
}

/// In a worker process (`RASK_WORKER` set): runs the worker, then exits the
/// process. Otherwise returns at once.
pub(crate) fn run_worker_if_asked() {
    let Some(address) = std::env::var_os(WORKER_ENV) else {
        return;
    };
    // A worker process is rask's own: its life goes to the program's stderr
    // (RUST_LOG filters it), unless the program installed a subscriber.
    rask_distributed::init_logging();
    let address = address.to_string_lossy().into_owned();
    // Threads and name from the environment and, for a worker started by
    // hand, its command line (`--nthreads`, `--name`). Invalid: refused,
    // never silently replaced by a default.
    let options = match rask_distributed::worker::Options::from_process(std::env::args_os().skip(1))
    {
        Ok(options) => options,
        Err(e) => {
            // An exit status of its own: the cluster starting it then
            // knows it started as a worker (no hint about `rask::init`).
            eprintln!("rask worker for {address}: {e}");
            std::process::exit(rask_distributed::SETTINGS_EXIT_CODE);
        }
    };
    let Some(registry) = crate::build::registry::installed() else {
        eprintln!("rask worker: no task registry installed");
        std::process::exit(2);
    };
    let run = || -> Result<()> {
        let mut options = options;
        options.auth = crate::run::config::auth()?;
        Ok(rask_distributed::worker::run_with(
            &address, registry, options,
        )?)
    };
    match run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            // The whole chain: a handshake's reason is the error's source.
            let mut line = format!("rask worker for {address}: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                line.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("{line}");
            std::process::exit(1);
        }
    }
}
