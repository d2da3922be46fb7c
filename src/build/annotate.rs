//! Priorities, resources and worker restrictions on a `Delayed` (Dask's
//! `priority=`, `resources=` and `workers=`): what the scheduler of a
//! cluster reads besides the work. None of it changes the key or the value;
//! `sync`, `threads` and `sim:SEED` ignore it (one process: no declared
//! resources, no workers to choose).

use std::sync::Arc;

use rask_executor::{Annotations, Resources};

use crate::build::data::Data;
use crate::build::delayed::Delayed;
use crate::build::error::{Error, Result};
use crate::build::node::{Call, Decorated};

impl<T: Data> Delayed<T> {
    /// The same work with a priority: on a cluster, among tasks ready at
    /// the same time, higher runs first, in the scheduler's queue and in a
    /// worker's; equal priorities run in submission order. The default is
    /// 0; negative values run after default work. Inputs of a task run at
    /// least at its priority when they are submitted with it, so a
    /// high-priority task is not held up by its own inputs waiting behind
    /// other work. The key does not change: resubmitting work the cluster
    /// already has keeps the first priority (as in Dask).
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let urgent = rask::delayed!(inc(1)).priority(10);
    /// assert_eq!(urgent.key(), rask::delayed!(inc(1)).key());
    /// assert_eq!(urgent.compute()?, 2);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn priority(&self, priority: i32) -> Delayed<T> {
        self.annotated(|a| a.priority = priority)
    }

    /// The same work, run only on a worker that declared these resources
    /// (`RASK_WORKER_RESOURCES=GPU=2,MEM=64e9`), and counted against them
    /// while it runs: a worker with `GPU=1` runs one `GPU=1` task at a
    /// time, whatever its threads. On a cluster where no worker has enough,
    /// the task fails at once naming the request.
    ///
    /// # Errors
    ///
    /// [`Error::Setting`] for a bad name (1 to 64 letters, digits, `_`,
    /// `-`, `.`, `/`) or an amount outside 0 to 10^15.
    ///
    /// ```
    /// fn train(x: i64) -> i64 { x * 2 }
    /// let on_gpu = rask::delayed!(train(21)).resources([("GPU", 1.0)])?;
    /// assert_eq!(on_gpu.compute()?, 42); // in this process: ignored
    /// assert!(rask::delayed!(train(1)).resources([("GPU", -1.0)]).is_err());
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn resources<N: AsRef<str>>(
        &self,
        resources: impl IntoIterator<Item = (N, f64)>,
    ) -> Result<Delayed<T>> {
        let resources = Resources::from_pairs(resources).map_err(|e| Error::Setting {
            name: "resources",
            value: e.entry,
            expected: "NAME=AMOUNT, a name of 1 to 64 letters, digits, `_-./` and an amount from 0 to 1e15",
        })?;
        Ok(self.annotated(|a| a.resources = resources))
    }

    /// The same work, run only on these workers, named by data address
    /// (`host:port`, as `scheduler_info` lists them) or by worker name. On
    /// a cluster where none of them is connected, the task fails at once
    /// naming them.
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// let pinned = rask::delayed!(inc(1)).workers(["127.0.0.1:9000"]);
    /// assert_eq!(pinned.compute()?, 2); // in this process: ignored
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn workers<S: Into<String>>(&self, workers: impl IntoIterator<Item = S>) -> Delayed<T> {
        let workers: Vec<String> = workers.into_iter().map(Into::into).collect();
        self.annotated(|a| a.workers = workers)
    }

    /// The same work with all of `annotations` at once, replacing any it
    /// had (see [`priority`](Delayed::priority),
    /// [`resources`](Delayed::resources), [`workers`](Delayed::workers)).
    pub fn annotate(&self, annotations: &Annotations) -> Delayed<T> {
        self.annotated(|a| *a = annotations.clone())
    }

    /// This task's annotations (the defaults when it has none).
    pub fn annotations(&self) -> Annotations {
        self.node().call.annotations().cloned().unwrap_or_default()
    }

    fn annotated(&self, change: impl FnOnce(&mut Annotations)) -> Delayed<T> {
        let node = self.node();
        let mut annotations = node.call.annotations().cloned().unwrap_or_default();
        change(&mut annotations);
        let mut copy = node.rekeyed(node.key);
        copy.call = annotate_call(&node.call, annotations);
        Delayed::from_node(Arc::new(copy))
    }
}

/// `call` with `annotations` in place of any it had.
pub(crate) fn annotate_call(call: &Arc<dyn Call>, annotations: Annotations) -> Arc<dyn Call> {
    Decorated::annotated(call, annotations)
}
