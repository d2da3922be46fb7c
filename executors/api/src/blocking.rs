//! Waiting inside a task: the thread gives its place back meanwhile
//! (Dask's `secede` and `rejoin`).
//!
//! A task that computes a graph itself (a nested computation) waits for
//! other tasks. If the executor running it counts the waiting thread as
//! busy, a pool whose every thread waits has none left to run what they
//! wait for: a nested fan-out on one thread deadlocks.
//!
//! Rules:
//!
//! 1. An executor whose threads would otherwise sit idle in such a wait
//!    installs a [`Seat`] on each thread that runs tasks
//!    (`<dyn Seat>::enter`).
//! 2. Code that waits for other tasks wraps the wait in [`blocking`]: the
//!    thread's seat is told it [`secede`](Seat::secede)s before the wait
//!    and [`rejoin`](Seat::rejoin)s after it, on every path out (a panic
//!    included). Without a seat (outside tasks, or on an executor that
//!    needs none) `blocking` only runs the wait.
//! 3. The seat is taken off the thread for the wait: a `blocking` inside a
//!    `blocking` secedes once.
//! 4. A task's work handed to another thread on its behalf (a timed
//!    attempt) carries the seat along (`<dyn Seat>::current`), so a wait there
//!    gives the task's thread back as well — bound to that task
//!    ([`Seat::bound`]): once the thread runs another task (the attempt was
//!    abandoned at its timeout), a wait there is the old task's alone and
//!    gives nothing back.
//! 5. What an executor tells the tasks of a thread about where they run (a
//!    worker's cluster, which nested computations use) is the thread's
//!    [`context`]: installed for the thread's life ([`install_context`]),
//!    and carried with the seat to work run on a task's behalf on another
//!    thread (rule 4), so that work computes where its task would have.

use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;

/// How an executor lets a thread give its place back while its task waits
/// (rule 1).
pub trait Seat: Send + Sync {
    /// The thread is about to wait for other tasks: its executor may start
    /// another thread so as many tasks as before keep running.
    fn secede(&self);
    /// The wait ended: the thread runs its task on.
    fn rejoin(&self);

    /// This seat bound to the task its thread runs now, for work run on
    /// another thread on that task's behalf (rule 4): its `secede` and
    /// `rejoin` do nothing once the thread runs another task. `None`: the
    /// seat itself serves (an executor that cannot tell its tasks apart).
    fn bound(&self) -> Option<Arc<dyn Seat>> {
        None
    }
}

thread_local! {
    static SEAT: RefCell<Option<Arc<dyn Seat>>> = const { RefCell::new(None) };
}

impl dyn Seat {
    /// Runs `f` with `seat` as the current thread's (rule 1), then
    /// restores the one before.
    pub fn enter<R>(seat: Arc<dyn Seat>, f: impl FnOnce() -> R) -> R {
        let previous = SEAT.with(|s| s.replace(Some(seat)));
        let _restore = Restore(previous);
        f()
    }

    /// The seat installed on this thread, for work run on another thread
    /// on its task's behalf (rule 4): bound to the task running now, when
    /// the seat can be ([`Seat::bound`]).
    pub fn current() -> Option<Arc<dyn Seat>> {
        let seat = SEAT.try_with(|s| s.borrow().clone()).ok().flatten()?;
        Some(seat.bound().unwrap_or(seat))
    }
}

thread_local! {
    static CONTEXT: RefCell<Option<Arc<dyn Any + Send + Sync>>> = const { RefCell::new(None) };
}

/// Installs `context` on this thread for the rest of its life, in place of
/// any before (rule 5): an executor does it on each thread that runs its
/// tasks.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
///
/// std::thread::spawn(|| {
///     rask_executor::install_context(Arc::new("the cluster at tcp://…"));
///     let context = rask_executor::context().unwrap();
///     assert_eq!(context.downcast_ref::<&str>(), Some(&"the cluster at tcp://…"));
/// })
/// .join()
/// .unwrap();
/// assert!(rask_executor::context().is_none()); // none on this thread
/// ```
pub fn install_context(context: Arc<dyn Any + Send + Sync>) {
    let _ = CONTEXT.try_with(|c| c.replace(Some(context)));
}

/// This thread's context (rule 5), if its executor installed one.
pub fn context() -> Option<Arc<dyn Any + Send + Sync>> {
    CONTEXT.try_with(|c| c.borrow().clone()).ok().flatten()
}

/// Puts a thread's seat back when dropped.
struct Restore(Option<Arc<dyn Seat>>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        let _ = SEAT.try_with(|s| s.replace(previous));
    }
}

/// Runs `f`, a wait for other tasks, with this thread's place given back
/// meanwhile (rule 2). Costs a thread-local look outside tasks.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicI32, Ordering};
/// use std::sync::Arc;
/// use rask_executor::{blocking, Seat};
///
/// #[derive(Default)]
/// struct Counted(AtomicI32);
/// impl Seat for Counted {
///     fn secede(&self) { self.0.fetch_sub(1, Ordering::SeqCst); }
///     fn rejoin(&self) { self.0.fetch_add(1, Ordering::SeqCst); }
/// }
///
/// let seat = Arc::new(Counted::default());
/// <dyn Seat>::enter(seat.clone(), || {
///     blocking(|| {
///         assert_eq!(seat.0.load(Ordering::SeqCst), -1); // given back
///         blocking(|| ()); // seceded once only
///         assert_eq!(seat.0.load(Ordering::SeqCst), -1);
///     });
/// });
/// assert_eq!(seat.0.load(Ordering::SeqCst), 0);
/// blocking(|| ()); // no seat here: just runs
/// ```
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let Some(seat) = SEAT.try_with(|s| s.borrow_mut().take()).ok().flatten() else {
        return f();
    };
    /// Rejoins and puts the seat back, on every way out (rule 2).
    struct Rejoin(Option<Arc<dyn Seat>>);
    impl Drop for Rejoin {
        fn drop(&mut self) {
            if let Some(seat) = self.0.take() {
                seat.rejoin();
                let _ = SEAT.try_with(|s| s.replace(Some(seat)));
            }
        }
    }
    seat.secede();
    let _rejoin = Rejoin(Some(seat));
    f()
}
