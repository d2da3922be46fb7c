//! The threaded executor of rask: runs plans on a work-stealing pool (rayon).
//!
//! [`ThreadPool`] implements [`rask_executor::Executor`]. It reports the same
//! outputs and failures as the reference [`rask_executor::Synchronous`], but
//! runs independent tasks on all threads of the pool.
//!
//! ```
//! use rask_executor::{Executor, Key, Op, OpError, Outcome, PlanBuilder, Reporter, Value};
//! use rask_threaded::ThreadPool;
//! use std::sync::{mpsc, Arc, Mutex};
//!
//! /// Adds its inputs to a constant.
//! struct Add(i64);
//! impl Op for Add {
//!     fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
//!         let mut total = self.0;
//!         for input in inputs.iter() {
//!             let value = input.as_ref().and_then(|v| v.downcast_ref::<i64>());
//!             total += value.ok_or_else(|| OpError::failed("not an i64"))?;
//!         }
//!         Ok(Arc::new(total))
//!     }
//!     fn name(&self) -> &str { "add" }
//! }
//!
//! /// Sends each output down a channel.
//! struct Channel(Mutex<mpsc::Sender<(usize, Outcome)>>);
//! impl Reporter for Channel {
//!     fn output(&self, index: usize, outcome: Outcome) {
//!         let _ = self.0.lock().unwrap().send((index, outcome));
//!     }
//! }
//!
//! let mut b = PlanBuilder::new();
//! let one = b.push(Key([1; 32]), Arc::new(Add(1)), &[]);
//! let two = b.push(Key([2; 32]), Arc::new(Add(2)), &[]);
//! let sum = b.push(Key([3; 32]), Arc::new(Add(0)), &[one, two]);
//! b.output(sum);
//!
//! let pool = ThreadPool::new(2)?;
//! let (tx, rx) = mpsc::channel();
//! pool.submit(Arc::new(b.build()), Arc::new(Channel(Mutex::new(tx))));
//! let (index, outcome) = rx.recv()?;
//! assert_eq!(index, 0);
//! assert_eq!(outcome?.downcast_ref::<i64>(), Some(&3));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Design
//!
//! - **One rayon pool per [`ThreadPool`], reused across submits.** `submit`
//!   from outside the pool queues one job and returns at once; the run goes
//!   on in the background and talks to the caller only through its
//!   [`Reporter`].
//! - **Nested submits run in place.** A task that submits a plan to its own
//!   pool (a nested compute) would block a worker if it waited for a
//!   background run: with one thread, forever. So a submit from one of the
//!   pool's workers runs the plan inside a rayon scope on that worker: the
//!   calling worker runs tasks itself, idle workers steal the rest, and
//!   `submit` returns once the plan finished.
//! - **A timed task's nested submits run on its attempt's thread.** A task
//!   with a timeout runs on a thread of its own while its worker waits for
//!   it (`rask_executor::run_limited`); a plan it submits to this pool,
//!   queued like one from outside, would wait for a worker, and with every
//!   worker so waiting, for ever (until the timeouts). Each worker carries
//!   the pool's seat (`rask_executor::Seat`), which the attempt's thread
//!   carries too, so `submit` knows such a thread and runs the plan there,
//!   on that thread alone, returning once it finished: the attempt does
//!   the work its worker would have done in place.
//! - **Dependency counting, no global lock.** Each task of a run has an
//!   atomic count of unresolved dependencies; the thread that resolves the
//!   last one owns the task. A task that makes several dependents ready runs
//!   the lowest-index one inline (a continuation loop, so a chain costs no
//!   queueing) and spawns the others on its worker's deque, where the LIFO
//!   pop keeps the run depth-first and idle workers steal from the far end.
//! - **Sources are pulled, not spawned.** Plan order is a depth-first
//!   post-order. Tasks without dependencies are started in plan order by at
//!   most one puller per thread, and each branch runs as far as it can
//!   before the next source starts. A tree reduction over a million leaves
//!   thus keeps about `threads × depth` values alive instead of queueing a
//!   million jobs. Each puller takes a run of neighbouring sources at once
//!   (their results meet soon, so they stay on one core), and an idle puller
//!   steals half of another's run, so slow sources still spread evenly.
//! - **Wide fan-out is one job.** When a task makes many dependents ready at
//!   once, they go on the deque as one list of indices; running it splits
//!   off halves for idle workers to steal and works through the lowest
//!   indices first, so a million ready dependents cost `log` queued jobs.
//! - **Values are freed by their last consumer.** A task's outcome waits in a
//!   per-task slot with a count of the dependents still to take it; the last
//!   one moves it out, so an op often gets the only reference. A task whose
//!   only consumer is the dependent it makes ready hands the value over
//!   directly, without the slot.
//! - **Failures and cancellation follow the reference.** Ops run through
//!   [`rask_executor::run_task`], which catches panics; a dependent waits for
//!   all its dependencies and takes the first failure in argument order,
//!   exactly like `Synchronous`. The reporter's `cancelled` is polled before
//!   every task; once it says yes nothing new starts, and when the running
//!   tasks are done, every output not reported yet is reported as cancelled.
//!   A value the run lets go is dropped with `rask_executor::drop_quietly`,
//!   so a user's `Drop` that panics is logged instead of aborting the
//!   process from a pool thread; so are the ops of its plan (and the
//!   literal arguments they hold), let go by the plan itself when the run
//!   ends (`rask_executor` dropping rule 5).
//! - **Memory.** A run holds 32 bytes per task (dependency count, consumer
//!   count, value slot) plus 4 per source, allocated when it starts and
//!   freed when it finished.
//!
//! # Limits
//!
//! - A [`Reporter`] must not panic: it is called on pool threads outside
//!   any task, where a panic aborts the process (rayon's default).
//! - Only a nested *submit* runs in place. A task that blocks its worker on
//!   something else the pool must compute (say, the result of a plan
//!   submitted earlier from outside) can starve the pool like any blocking
//!   task on a fixed-size pool.
#![warn(missing_docs)]

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use rask_executor::{Executor, Plan, Reporter, Seat};

mod run;
#[cfg(test)]
mod tests;

/// A pool of worker threads that runs plans, sharing work by stealing.
///
/// Cloning is cheap and shares the same threads. The threads stop once the
/// last clone is dropped and the runs already submitted have finished.
///
/// # Examples
///
/// ```
/// use rask_executor::{Executor, Key, Op, OpError, PlanBuilder, Reporter, Outcome, Value};
/// use rask_threaded::ThreadPool;
/// use std::sync::{Arc, Condvar, Mutex};
///
/// struct Square(u64);
/// impl Op for Square {
///     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
///         Ok(Arc::new(self.0 * self.0))
///     }
///     fn name(&self) -> &str { "square" }
/// }
///
/// /// Collects outputs; `wait` blocks until the run finished.
/// #[derive(Default)]
/// struct Collect { done: Mutex<Option<Vec<u64>>>, outputs: Mutex<Vec<u64>>, cv: Condvar }
/// impl Reporter for Collect {
///     fn output(&self, _: usize, outcome: Outcome) {
///         let value = *outcome.unwrap().downcast_ref::<u64>().unwrap();
///         self.outputs.lock().unwrap().push(value);
///     }
///     fn finished(&self) {
///         let outputs = std::mem::take(&mut *self.outputs.lock().unwrap());
///         *self.done.lock().unwrap() = Some(outputs);
///         self.cv.notify_all();
///     }
/// }
/// impl Collect {
///     fn wait(&self) -> Vec<u64> {
///         let mut done = self.done.lock().unwrap();
///         loop {
///             if let Some(outputs) = done.take() { return outputs; }
///             done = self.cv.wait(done).unwrap();
///         }
///     }
/// }
///
/// let mut b = PlanBuilder::new();
/// for i in 0..10u8 {
///     let t = b.push(Key([i; 32]), Arc::new(Square(i.into())), &[]);
///     b.output(t);
/// }
/// let pool = ThreadPool::new(0)?; // one thread per core
/// let reporter = Arc::new(Collect::default());
/// pool.submit(Arc::new(b.build()), reporter.clone()); // returns at once
/// let mut squares = reporter.wait();
/// squares.sort();
/// assert_eq!(squares, [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]);
/// # Ok::<(), rask_threaded::BuildError>(())
/// ```
#[derive(Clone)]
pub struct ThreadPool {
    pool: Arc<rayon::ThreadPool>,
    /// The seat every worker carries, which tells a timed attempt of one of
    /// them.
    seat: Arc<dyn Seat>,
}

impl ThreadPool {
    /// Starts a pool of `threads` worker threads; `0` means one per core
    /// (`std::thread::available_parallelism`).
    ///
    /// # Examples
    ///
    /// ```
    /// let pool = rask_threaded::ThreadPool::new(2)?;
    /// assert_eq!(pool.threads(), 2);
    /// # Ok::<(), rask_threaded::BuildError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Returns a [`BuildError`] when the operating system refuses to start
    /// the threads.
    pub fn new(threads: usize) -> Result<ThreadPool, BuildError> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            n => n,
        };
        let seat: Arc<dyn Seat> = Arc::new(Member);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("rask-worker-{i}"))
            .spawn_handler(|worker| {
                let mut thread = std::thread::Builder::new();
                if let Some(name) = worker.name() {
                    thread = thread.name(name.to_owned());
                }
                if let Some(size) = worker.stack_size() {
                    thread = thread.stack_size(size);
                }
                let seat = Arc::clone(&seat);
                thread.spawn(|| <dyn Seat>::enter(seat, || worker.run()))?;
                Ok(())
            })
            .build()
            .map_err(|source| BuildError { source })?;
        Ok(ThreadPool {
            pool: Arc::new(pool),
            seat,
        })
    }

    /// The number of worker threads.
    ///
    /// # Examples
    ///
    /// ```
    /// let pool = rask_threaded::ThreadPool::new(0)?;
    /// assert!(pool.threads() >= 1);
    /// # Ok::<(), rask_threaded::BuildError>(())
    /// ```
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl Executor for ThreadPool {
    /// Starts running `plan` and returns at once, except when called from one
    /// of this pool's own workers (a task submitting a nested plan): then the
    /// calling worker takes part in the run, and `submit` returns after
    /// `reporter.finished()` was called; or from the thread of a timed
    /// attempt of such a task: then that thread runs the plan alone, and
    /// `submit` returns once it finished.
    fn submit(&self, plan: Arc<Plan>, reporter: Arc<dyn Reporter>) {
        let threads = self.threads();
        if self.pool.current_thread_index().is_some() {
            // Waiting inside the scope executes and steals jobs, so the
            // worker is never idle while the nested run goes on.
            self.pool
                .in_place_scope(|scope| run::start(scope, plan, reporter, threads));
        } else if self.runs_an_attempt_here() {
            run::start_inline(plan, reporter);
        } else {
            self.pool
                .spawn(move || run::start(&run::Detached, plan, reporter, threads));
        }
    }
}

impl ThreadPool {
    /// Whether this thread runs a timed attempt of a task of one of this
    /// pool's workers: it carries their seat.
    fn runs_an_attempt_here(&self) -> bool {
        <dyn Seat>::current()
            .is_some_and(|seat| std::ptr::addr_eq(Arc::as_ptr(&seat), Arc::as_ptr(&self.seat)))
    }
}

/// The seat of the pool's workers (`rask_executor::blocking`). A
/// fixed-size pool starts no thread when a task waits, so it does nothing;
/// it tells a timed attempt's thread (see *Design*).
struct Member;

impl Seat for Member {
    fn secede(&self) {}

    fn rejoin(&self) {}
}

/// The thread pool could not be started.
#[derive(Debug)]
pub struct BuildError {
    source: rayon::ThreadPoolBuildError,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("could not start the thread pool")
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}
