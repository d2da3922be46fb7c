//! Nested computation: what a task running on a worker knows of its
//! cluster, so that the graphs it computes itself run there too (Dask's
//! `get_client`).
//!
//! Rules:
//!
//! 1. Every thread of a worker that runs tasks (its compute threads and
//!    its network thread, `worker` rules 2 and 5) has the worker's
//!    [`TaskCluster`] installed for its whole life: the scheduler's
//!    address, the worker's build, token and TLS settings. A task's work
//!    run on another thread on its behalf (its attempts under a timeout)
//!    has it too (`rask_executor::blocking` rule 5).
//! 2. [`task_cluster`] reads it; outside a worker's threads it is `None`.
//! 3. [`Client::for_task_cluster`](crate::Client::for_task_cluster)
//!    connects to it as a client of the worker's build, proving the
//!    worker's token over the worker's TLS settings: no environment
//!    variable is read, so a worker started with explicit options nests as
//!    well as one started from the environment.
//! 4. The worker's compute threads give their place back while a task
//!    waits for a nested computation (`rask_executor::blocking`, `worker`
//!    rule 15), so a nested fan-out never waits for a thread its own
//!    waiting holds.
//! 5. A worker that ends with its scheduler (a zero death timeout, as a
//!    [`LocalCluster`](crate::LocalCluster)'s workers have: `worker`
//!    rule 1) ends silently when the scheduler goes, and so does its
//!    nested client: the loss of its connection is logged at `debug`, not
//!    as the warning a client gives otherwise (`client` rule 10). The end
//!    of a local cluster with its program is not an incident; the loss is
//!    still a warning for a worker that outlives its scheduler, and for
//!    every other client.

use std::sync::Arc;

use crate::protocol::Scheme;
use crate::tls::Connector;
use crate::{Auth, BuildId};

/// The cluster of the worker whose thread runs the current task (rule 1).
///
/// # Examples
///
/// ```
/// // Outside a worker's task there is none.
/// assert!(rask_distributed::task_cluster().is_none());
/// ```
pub struct TaskCluster {
    /// `tcp://host:port`, `tls://host:port` or `unix:PATH`.
    pub(crate) address: String,
    pub(crate) build: BuildId,
    pub(crate) auth: Arc<Auth>,
    pub(crate) tls: Option<Connector>,
    /// The worker ends when it loses its scheduler (rule 5).
    pub(crate) ends_with_scheduler: bool,
}

impl TaskCluster {
    /// The worker's cluster: its scheduler at `host:port`, reached with
    /// `scheme`; `ends_with_scheduler` if the worker ends when it loses
    /// it (rule 5).
    pub(crate) fn new(
        scheme: Scheme,
        host_port: &str,
        build: BuildId,
        (auth, tls): (Arc<Auth>, Option<Connector>),
        ends_with_scheduler: bool,
    ) -> TaskCluster {
        TaskCluster {
            address: format!("{}{host_port}", scheme.prefix()),
            build,
            auth,
            tls,
            ends_with_scheduler,
        }
    }

    /// The scheduler's address, `tcp://host:port`, `tls://host:port` or
    /// `unix:PATH`.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl std::fmt::Debug for TaskCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskCluster")
            .field("address", &self.address)
            .field("build", &self.build)
            .field("ends_with_scheduler", &self.ends_with_scheduler)
            .finish_non_exhaustive()
    }
}

/// Installs `cluster` on this thread for the rest of its life (rule 1),
/// as the thread's context: work run on a task's behalf on another thread
/// (a timed attempt) carries it along (`rask_executor::blocking` rule 5).
pub(crate) fn install(cluster: Arc<TaskCluster>) {
    rask_executor::install_context(cluster);
}

/// The cluster of the worker running this thread's task, if any (rule 2).
pub fn task_cluster() -> Option<Arc<TaskCluster>> {
    rask_executor::context()?.downcast::<TaskCluster>().ok()
}
