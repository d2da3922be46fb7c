//! The one type that knows every executor.

use std::sync::Arc;

use rask_executor::{Executor, Plan, Simulated, Synchronous};

use crate::run::config::ExecutorKind;
use crate::Result;

/// A resolved executor, ready to run plans.
pub(crate) enum Backend {
    Synchronous(Synchronous),
    /// Eager for `compute` and `persist`, stepped for a client
    /// ([`Backend::for_client`]).
    Simulated(Arc<Simulated>),
    #[cfg(feature = "threaded")]
    Threads(Arc<rask_threaded::ThreadPool>),
    #[cfg(feature = "distributed")]
    Distributed(Arc<crate::run::cluster::Cluster>),
    /// `sim-cluster:W:SEED`: runs each plan on a fresh simulated cluster,
    /// its tasks resolved through the program's registry as a worker would.
    #[cfg(feature = "distributed")]
    SimCluster(rask_distributed::sim::Cluster),
    /// An executor a unit test brings, to order its reports as it needs.
    #[cfg(test)]
    Custom(Arc<dyn Executor>),
}

impl Backend {
    /// The executor for `kind`. Thread pools and `local:N` clusters are
    /// started once per size and reused by every later computation.
    pub(crate) fn get(kind: &ExecutorKind) -> Result<Backend> {
        match kind {
            ExecutorKind::Synchronous => Ok(Backend::Synchronous(Synchronous)),
            // A new one per computation: each replays from its seed,
            // whatever ran before it in the process.
            ExecutorKind::Simulated(seed) => {
                Ok(Backend::Simulated(Arc::new(Simulated::new(*seed))))
            }
            #[cfg(feature = "threaded")]
            ExecutorKind::Threads(n) => pools::get(n.unwrap_or(0)).map(Backend::Threads),
            #[cfg(not(feature = "threaded"))]
            ExecutorKind::Threads(_) => Err(crate::Error::Unavailable("threaded")),
            #[cfg(feature = "distributed")]
            ExecutorKind::Local(n) => {
                crate::run::cluster::shared_local(*n).map(Backend::Distributed)
            }
            #[cfg(feature = "distributed")]
            ExecutorKind::Tcp(address) => {
                crate::run::cluster::shared_connection(address).map(Backend::Distributed)
            }
            #[cfg(feature = "distributed")]
            ExecutorKind::Tls(address) => {
                crate::run::cluster::shared_connection(&format!("tls://{address}"))
                    .map(Backend::Distributed)
            }
            #[cfg(feature = "distributed")]
            ExecutorKind::Unix(path) => {
                crate::run::cluster::shared_connection(&format!("unix:{path}"))
                    .map(Backend::Distributed)
            }
            #[cfg(feature = "distributed")]
            ExecutorKind::SimCluster {
                workers,
                seed,
                faults,
            } => {
                let Some(registry) = crate::build::registry::installed() else {
                    return Err(crate::Error::NotInitialized);
                };
                let cluster = rask_distributed::sim::Cluster::new(*workers, *seed, registry);
                Ok(Backend::SimCluster(cluster.random_faults(*faults as usize)))
            }
            #[cfg(not(feature = "distributed"))]
            ExecutorKind::Local(_)
            | ExecutorKind::Tcp(_)
            | ExecutorKind::Tls(_)
            | ExecutorKind::Unix(_)
            | ExecutorKind::SimCluster { .. } => Err(crate::Error::Unavailable("distributed")),
        }
    }

    /// The executor a [`Client`](crate::Client) on `kind` submits to: as
    /// [`Backend::get`], except that a simulated one is stepped, so that
    /// the client's submissions wait in one queue and whoever waits for a
    /// future runs them one task at a time, in seed order.
    pub(crate) fn for_client(kind: &ExecutorKind) -> Result<Backend> {
        match kind {
            ExecutorKind::Simulated(seed) => {
                Ok(Backend::Simulated(Arc::new(Simulated::stepped(*seed))))
            }
            _ => Backend::get(kind),
        }
    }

    /// The stepped simulation behind a client on `sim:SEED`, which its
    /// waits drive.
    pub(crate) fn simulation(&self) -> Option<&Simulated> {
        match self {
            Backend::Simulated(sim) if !sim.is_eager() => Some(sim),
            _ => None,
        }
    }

    pub(crate) fn executor(&self) -> &dyn Executor {
        match self {
            Backend::Synchronous(s) => s,
            Backend::Simulated(s) => &**s,
            #[cfg(feature = "threaded")]
            Backend::Threads(pool) => &**pool,
            #[cfg(feature = "distributed")]
            Backend::Distributed(cluster) => cluster.client(),
            #[cfg(feature = "distributed")]
            Backend::SimCluster(sim) => sim,
            #[cfg(test)]
            Backend::Custom(executor) => &**executor,
        }
    }

    /// [`Backend::get`]'s backend, for the executors a waiting caller
    /// (`compute`) reaches before it plans, so that a cluster that cannot
    /// be reached is said before the graph's futures are waited for; `None`
    /// for a thread pool, which [`Backend::for_waiting`] finds (or starts)
    /// once the plan is known.
    pub(crate) fn before_planning(kind: &ExecutorKind) -> Result<Option<Backend>> {
        match kind {
            #[cfg(feature = "threaded")]
            ExecutorKind::Threads(_) => Ok(None),
            _ => Backend::get(kind).map(Some),
        }
    }

    /// The backend that runs `plan` for a caller that waits for its
    /// outcome (`compute`): [`Backend::get`]'s, except that on a thread
    /// pool a plan whose tasks can only run one at a time
    /// (`one_at_a_time`) goes to the synchronous executor, on the calling
    /// thread, and starts no pool. The pool would run it one task at a time
    /// as well, after waking a thread of its own and before waking the
    /// caller: two wake-ups, which cost more than a small task (a one-task
    /// `compute` took 25 µs on `threads` against 3 µs on `sync`:
    /// `benches/README.md`, round twenty-nine). Results and failures are
    /// the same (the executors agree); its task events name thread 0, as a
    /// run on `sync` does. A caller that does not wait (a client's
    /// `submit`) keeps the pool.
    #[cfg_attr(not(feature = "threaded"), allow(unused_variables))]
    pub(crate) fn for_waiting(kind: &ExecutorKind, plan: &Plan) -> Result<Backend> {
        match kind {
            #[cfg(feature = "threaded")]
            ExecutorKind::Threads(_) if one_at_a_time(plan) => {
                Ok(Backend::Synchronous(Synchronous))
            }
            _ => Backend::get(kind),
        }
    }

    /// Whether plans leave the process: then only passes whose output can
    /// be sent (cull) run, since fused tasks exist only in this process.
    pub(crate) fn is_remote(&self) -> bool {
        match self {
            #[cfg(feature = "distributed")]
            Backend::Distributed(_) | Backend::SimCluster(_) => true,
            _ => false,
        }
    }
}

/// Whether no two tasks of `plan` could ever run side by side: each task
/// after the first takes the one before it as an input (a plan of one task,
/// a chain), so only one task at a time is ready to run. Stops at the first
/// task that does not, which for most plans of many tasks is the second.
#[cfg(feature = "threaded")]
fn one_at_a_time(plan: &Plan) -> bool {
    (1..plan.len() as u32).all(|task| plan.deps(task).contains(&(task - 1)))
}

#[cfg(feature = "threaded")]
mod pools {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, PoisonError};

    use rask_threaded::ThreadPool;

    use crate::{Error, Result};

    static POOLS: Mutex<Option<HashMap<usize, Arc<ThreadPool>>>> = Mutex::new(None);

    /// The shared pool of `threads` threads (`0`: one per core).
    pub(super) fn get(threads: usize) -> Result<Arc<ThreadPool>> {
        let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
        let pools = pools.get_or_insert_with(HashMap::new);
        if let Some(pool) = pools.get(&threads) {
            return Ok(pool.clone());
        }
        let pool =
            ThreadPool::new(threads).map_err(|e| Error::Executor(std::io::Error::other(e)))?;
        let pool = Arc::new(pool);
        pools.insert(threads, pool.clone());
        Ok(pool)
    }
}
