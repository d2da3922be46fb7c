//! [`init`]: the registry of the program, and worker mode.
//!
//! The registry itself is in the build layer (`build/registry.rs`): a
//! task's wire form consults it while graphs are built. Only the entry
//! point is here, since in a worker process it runs the worker.

use crate::build::registry::Tasks;

/// Sets the program up for distributed execution; call it first in `main`.
///
/// In a worker process (started by [`Client::local`](crate::Client::local),
/// or by hand with `RASK_WORKER=tcp://host:port ./my-app`) this runs the
/// worker and exits the process when its scheduler is gone for good —
/// `main` goes no further. A worker started by hand waits for its
/// scheduler, when it starts and after losing it, for up to
/// `RASK_WORKER_DEATH_TIMEOUT` seconds (default 60), and registers with it
/// again when it comes back; a [`Client::local`](crate::Client::local)
/// cluster's workers exit as soon as their scheduler, in the program's own
/// process, goes away. Otherwise it records the functions marked
/// [`#[rask::task]`](crate::task) as those that may run on a cluster and
/// returns. Calling it again keeps the first registry.
///
/// # Examples
///
/// ```
/// #[rask::task]
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// fn main() {
///     rask::init();   // a worker process stays in here
///     assert_eq!(rask::delayed!(inc(1)).compute().unwrap(), 2);
/// }
/// ```
pub fn init() {
    init_with(Tasks::new());
}

/// [`init`], also registering the functions of `tasks` (a
/// [`tasks!`](crate::tasks!) list): for functions that cannot be marked
/// [`#[rask::task]`](crate::task), such as one instance of a generic
/// function, a named closure that captures nothing, or a function of a
/// crate that does not use the attribute.
///
/// # Examples
///
/// ```
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn double<T: std::ops::Add<Output = T> + Copy>(x: T) -> T { x + x }
///
/// rask::init_with(rask::tasks![inc].register(double::<i64>));
/// ```
pub fn init_with(tasks: Tasks) {
    crate::build::registry::install(tasks);
    #[cfg(feature = "distributed")]
    crate::run::cluster::run_worker_if_asked();
}
