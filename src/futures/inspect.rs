//! Looking at the executor behind a [`Client`] (Dask's `scheduler_info`,
//! `wait_for_workers`, `who_has`, `dashboard_link`), and retiring a
//! cluster's workers (`retire_workers`).
//!
//! On a cluster the answers come from its scheduler. Executors in this
//! process answer as a cluster of one worker would: this process, with its
//! threads.

use std::time::{Duration, Instant};

use rask_executor::diagnostics::{Snapshot, WorkerRow, SCHEMA_VERSION};

use crate::futures::client::{Client, State};
use crate::futures::future::Future;
use crate::run::backend::Backend;
use crate::{Error, Result, TaskKey};

/// What "this process" is called where a cluster names a worker.
const THIS_PROCESS: &str = "this process";

impl Client {
    /// What the executor looks like now: its workers (threads, tasks
    /// running, memory, data held, last heartbeat) and the tasks of this
    /// program per state and per function (Dask's `scheduler_info`). On a
    /// cluster, its scheduler answers for this program's build; on
    /// `sync` and `threads`, the answer is one worker, this process, and
    /// the futures this client holds.
    ///
    /// # Errors
    ///
    /// On a cluster, [`Error::Distributed`] when its scheduler cannot be
    /// asked (not connected, no answer within 10 s).
    ///
    /// # Examples
    ///
    /// ```
    /// let client = rask::Client::threads(2)?;
    /// let info = client.scheduler_info()?;
    /// assert_eq!(info.workers.len(), 1);
    /// assert_eq!(info.workers[0].threads, 2);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn scheduler_info(&self) -> Result<Snapshot> {
        // (workers, threads each): a simulated cluster's workers run on the
        // calling thread but are its workers all the same.
        let (workers, threads) = match &self.inner.backend {
            #[cfg(feature = "distributed")]
            Backend::Distributed(cluster) => return Ok(cluster.client().info()?),
            Backend::Synchronous(_) | Backend::Simulated(_) => (1u32, 1usize),
            #[cfg(test)]
            Backend::Custom(_) => (1, 1),
            #[cfg(feature = "distributed")]
            Backend::SimCluster(sim) => (sim.workers(), rask_distributed::sim::THREADS as usize),
            #[cfg(feature = "threaded")]
            Backend::Threads(pool) => (1, pool.threads()),
        };
        let totals = self.inner.counts();
        let finished = totals.memory;
        Ok(Snapshot {
            version: SCHEMA_VERSION,
            scheduler: self.inner.kind.to_string(),
            uptime_ms: 0,
            clients: 1,
            tasks_per_second: 0.0,
            totals,
            functions: Vec::new(),
            workers: (0..workers)
                .map(|id| WorkerRow {
                    id,
                    address: THIS_PROCESS.to_owned(),
                    name: String::new(),
                    threads: u32::try_from(threads).unwrap_or(u32::MAX),
                    // Work sent to the executor runs on its threads, the
                    // rest queued there.
                    running: if id == 0 {
                        totals.processing.min(threads as u64)
                    } else {
                        0
                    },
                    sent: if id == 0 { totals.processing } else { 0 },
                    memory_bytes: None,
                    data_bytes: 0,
                    keys: if id == 0 { finished } else { 0 },
                    last_heartbeat_ms: 0,
                    utilisation: None,
                    spill: None,
                    resources: String::new(),
                    retiring: false,
                })
                .collect(),
            unrunnable: Vec::new(),
        })
    }

    /// Waits until the executor has at least `n` workers (Dask's
    /// `wait_for_workers`): on a cluster, workers of this program's build
    /// registered with its scheduler. Executors in this process have one
    /// worker, this process; `sim-cluster:W:SEED` has its W simulated ones.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when fewer than `n` are there after `timeout`
    /// (at once on an executor in this process, which never has more than
    /// one; never on a cluster for a timeout too long for the clock,
    /// `Duration::MAX`); as [`scheduler_info`](Client::scheduler_info)
    /// otherwise.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let client = rask::Client::synchronous()?;
    /// client.wait_for_workers(1, Duration::from_secs(1))?;
    /// assert!(client.wait_for_workers(2, Duration::from_secs(1)).is_err());
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn wait_for_workers(&self, n: usize, timeout: Duration) -> Result<()> {
        // `None`: a timeout too long for the clock, no deadline.
        let deadline = crate::futures::future::deadline(timeout);
        loop {
            let have = self.scheduler_info()?.workers.len();
            if have >= n {
                return Ok(());
            }
            // Only a real cluster gains workers while we wait.
            #[cfg(feature = "distributed")]
            let grows = matches!(&self.inner.backend, Backend::Distributed(_));
            #[cfg(not(feature = "distributed"))]
            let grows = false;
            if !grows || deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::Timeout {
                    task: None,
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Retires the cluster's workers of these names gracefully (Dask's
    /// `retire_workers`) and returns once they are gone: they get no new
    /// task, finish what they were sent, every value only they hold is
    /// copied to a worker that stays, then their processes exit. Nothing
    /// is computed again; persisted values and futures stay readable.
    /// Names are those [`scheduler_info`](Client::scheduler_info) lists:
    /// a worker's `--name` or `RASK_WORKER_NAME`, by default `host-pid`.
    ///
    /// # Errors
    ///
    /// [`Error::Distributed`] wrapping `rask_distributed::Error::Retire`
    /// when a name is not one of this program's workers, when no other
    /// worker would be left to hold their values (none is retired then),
    /// or when this client's executor is not a cluster; or the connection's
    /// error if it is lost first.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// rask::init();
    /// let client = rask::Client::local(3)?;
    /// let names: Vec<String> =
    ///     client.scheduler_info()?.workers.into_iter().map(|w| w.name).collect();
    /// client.retire_workers(&names[..1])?;
    /// assert_eq!(client.scheduler_info()?.workers.len(), 2);
    /// # Ok::<(), rask::Error>(())
    /// ```
    #[cfg(feature = "distributed")]
    pub fn retire_workers<S: AsRef<str>>(&self, names: &[S]) -> Result<()> {
        match &self.inner.backend {
            Backend::Distributed(cluster) => Ok(cluster.client().retire_workers(names)?),
            _ => Err(Error::Distributed(rask_distributed::Error::Retire {
                reason: "this client's executor is not a cluster".to_owned(),
            })),
        }
    }

    /// Where the value of each finished future is held (Dask's `who_has`):
    /// the data ports (`host:port`) of the workers holding it on a cluster,
    /// `this process` on `sync` and `threads`; nothing for a future that
    /// is not finished, or whose value was brought into this process and
    /// released on the cluster.
    ///
    /// # Errors
    ///
    /// As [`scheduler_info`](Client::scheduler_info).
    ///
    /// # Examples
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let client = rask::Client::synchronous()?;
    /// let f = client.submit(rask::delayed!(inc(1)))?;
    /// let held = client.who_has(&[f.clone()])?;
    /// assert_eq!(held, vec![(f.key(), vec!["this process".to_string()])]);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn who_has<T>(&self, futures: &[Future<T>]) -> Result<Vec<(TaskKey, Vec<String>)>> {
        #[cfg(feature = "distributed")]
        if let Backend::Distributed(cluster) = &self.inner.backend {
            let keys: Vec<rask_executor::Key> = futures.iter().map(|f| f.key().key()).collect();
            let holders = cluster.client().who_has(&keys)?;
            return Ok(futures.iter().map(|f| f.key()).zip(holders).collect());
        }
        Ok(futures
            .iter()
            .map(|f| {
                let (shared, key) = f.parts();
                let here = match shared.state(key) {
                    State::Finished(_) => vec![THIS_PROCESS.to_owned()],
                    _ => Vec::new(),
                };
                (f.key(), here)
            })
            .collect())
    }

    /// The address of the live dashboard, `http://HOST:PORT/status`, when
    /// this client's cluster serves one: a local cluster started with
    /// `RASK_DASHBOARD=ADDR` (`:0` picks a port). `None` otherwise, also
    /// for a cluster this process connected to by address (its dashboard
    /// is printed by `rask-scheduler`).
    ///
    /// # Examples
    ///
    /// ```
    /// let client = rask::Client::threads(2)?;
    /// assert_eq!(client.dashboard_link(), None);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn dashboard_link(&self) -> Option<String> {
        match &self.inner.backend {
            #[cfg(feature = "distributed")]
            Backend::Distributed(cluster) => {
                cluster.dashboard().map(|at| format!("http://{at}/status"))
            }
            _ => None,
        }
    }
}
