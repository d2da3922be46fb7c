//! Stopping tasks: cooperative cancellation and timeouts.
//!
//! Rules:
//!
//! 1. Every executor runs each task with a [`Stop`] signal installed on the
//!    thread that runs it ([`Stop::enter`]); [`cancelled`] reads it. The
//!    signal is raised when nobody wants the task's work any more (its run
//!    or its future was cancelled, its key released on a cluster).
//! 2. Cancellation is cooperative: a task that never asks runs to its end,
//!    and its executor only drops the result. A task that saw
//!    [`cancelled`] true while its work was given up may return what it
//!    has so far; that is never its value:
//!    [`run_task`](crate::run_task) makes it a failure of kind
//!    `Cancelled`, for every executor, so it is never reported (nor
//!    cached) as the task's result. A nested task's sighting counts for
//!    the task around it, and a timed attempt's for its task; a sighting
//!    drops a value only if the task's own work was given up when it
//!    returned (not for a deadline that passed: a timeout of a nested
//!    task, or of an attempt retried since, which fails as such).
//! 3. A timeout is enforced, not requested: a task whose op has a
//!    [`timeout`](crate::Op::timeout) runs on a thread of its own, and
//!    [`run_task`](crate::run_task) stops waiting for it at the deadline and
//!    fails it as [`FailureKind::TimedOut`](crate::FailureKind::TimedOut).
//!    From then on [`cancelled`] is true on that thread; the thread is
//!    *abandoned*: counted by [`abandoned`] until the task returns, its
//!    result dropped. A task that never returns keeps its thread; a
//!    distributed worker calls itself unhealthy when one stays abandoned
//!    past its grace period, and a local cluster then restarts its process
//!    (see `rask_distributed::worker`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Whether the work behind a task was given up (rule 1): cheap to clone,
/// checked by the task's code through [`cancelled`].
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use rask_executor::{cancelled, Stop};
///
/// let flag = Arc::new(AtomicBool::new(false));
/// let stop = Stop::flag(flag.clone());
/// stop.enter(|| assert!(!cancelled()));
/// flag.store(true, Ordering::Relaxed);
/// stop.enter(|| assert!(cancelled()));
/// assert!(!cancelled()); // outside a task
/// ```
#[derive(Clone, Default)]
pub struct Stop {
    check: Check,
    deadline: Option<Instant>,
}

/// What raises a [`Stop`] besides its deadline.
#[derive(Clone, Default)]
enum Check {
    #[default]
    Never,
    /// A flag: one reference count to copy, nothing to allocate (a worker
    /// makes one per task).
    Flag(Arc<AtomicBool>),
    When(Arc<dyn Fn() -> bool + Send + Sync>),
}

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stop")
            .field("raised", &self.raised())
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Stop {
    /// A signal that is never raised.
    pub fn never() -> Stop {
        Stop::default()
    }

    /// A signal raised once `flag` is set.
    pub fn flag(flag: Arc<AtomicBool>) -> Stop {
        Stop {
            check: Check::Flag(flag),
            deadline: None,
        }
    }

    /// A signal raised once `check` returns true.
    pub fn when(check: impl Fn() -> bool + Send + Sync + 'static) -> Stop {
        Stop {
            check: Check::When(Arc::new(check)),
            deadline: None,
        }
    }

    /// This signal, also raised at `deadline` (the earlier one wins).
    pub fn until(mut self, deadline: Instant) -> Stop {
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
        self
    }

    /// Whether the signal can ever be raised: false for
    /// [`Stop::never`], the signal outside tasks.
    pub fn can_raise(&self) -> bool {
        self.deadline.is_some() || !matches!(self.check, Check::Never)
    }

    /// Whether the signal is raised now.
    pub fn raised(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d) || self.given_up()
    }

    /// Whether the work was given up (rule 1), its deadline left aside: a
    /// deadline that passed is a timeout, which fails the task as such.
    pub(crate) fn given_up(&self) -> bool {
        match &self.check {
            Check::Never => false,
            Check::Flag(flag) => flag.load(Ordering::Relaxed),
            Check::When(check) => check(),
        }
    }

    /// Runs `f` with this signal as the current thread's (rule 1), then
    /// restores the one before.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        let previous = CURRENT.with(|c| c.replace(self.clone()));
        struct Restore(Option<Stop>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(previous) = self.0.take() {
                    let _ = CURRENT.try_with(|c| c.replace(previous));
                }
            }
        }
        let _restore = Restore(Some(previous));
        f()
    }

    /// The signal installed on this thread, for work handed to another
    /// thread on a task's behalf.
    pub fn current() -> Stop {
        CURRENT.with(|c| c.borrow().clone())
    }
}

thread_local! {
    /// Whether the task running on this thread saw [`cancelled`] true
    /// (rule 2).
    static SAW: Cell<bool> = const { Cell::new(false) };
    static CURRENT: RefCell<Stop> = RefCell::new(Stop::never());
}

/// Whether the task running on this thread should stop: its work is no
/// longer wanted, or its timeout passed (rules 1 to 3). Always `false`
/// outside a task. Long tasks call it now and then and return early:
/// once it said `true`, whatever the task returns is dropped, never
/// reported (nor cached) as its value (rule 2).
///
/// # Examples
///
/// ```
/// fn search(limit: u64) -> u64 {
///     let mut best = 0;
///     for i in 0..limit {
///         if i % 1024 == 0 && rask_executor::cancelled() {
///             break; // nobody wants the answer any more
///         }
///         best = best.max(i % 97);
///     }
///     best
/// }
/// assert_eq!(search(1000), 96);
/// ```
pub fn cancelled() -> bool {
    let raised = CURRENT.try_with(|c| c.borrow().raised()).unwrap_or(false);
    if raised {
        note_saw_cancel();
    }
    raised
}

/// Runs a task's work `f` and tells whether it saw [`cancelled`] true
/// (rule 2); the sighting counts for the task around it too, if any.
pub(crate) fn noting_cancel<R>(f: impl FnOnce() -> R) -> (R, bool) {
    let outer = SAW.try_with(|s| s.replace(false)).unwrap_or(false);
    let result = f();
    let saw = SAW.try_with(|s| s.get()).unwrap_or(false);
    let _ = SAW.try_with(|s| s.set(outer || saw));
    (result, saw)
}

/// Notes that the task running on this thread saw [`cancelled`] true on
/// another thread (a timed attempt's, rule 3).
pub(crate) fn note_saw_cancel() {
    let _ = SAW.try_with(|s| s.set(true));
}

/// Threads running a task past its timeout, by id (rule 3).
static ABANDONED: Mutex<Option<HashMap<u64, Abandoned>>> = Mutex::new(None);
static NEXT_ABANDONED: AtomicU64 = AtomicU64::new(0);

/// A task whose thread was abandoned at its timeout and has not returned
/// (rule 3).
#[derive(Clone, Debug)]
pub struct Abandoned {
    /// The task's name.
    pub name: Arc<str>,
    /// When it was abandoned.
    pub since: Instant,
}

/// The tasks of this process still running on abandoned threads (rule 3).
pub fn abandoned() -> Vec<Abandoned> {
    ABANDONED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default()
}

/// Notes that the thread running `name` was abandoned; the returned guard
/// takes the note back when the task returns.
pub(crate) fn abandon(name: Arc<str>) -> AbandonedGuard {
    let id = NEXT_ABANDONED.fetch_add(1, Ordering::Relaxed);
    ABANDONED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(
            id,
            Abandoned {
                name,
                since: Instant::now(),
            },
        );
    AbandonedGuard(id)
}

/// Removes its entry from [`abandoned`] when dropped.
pub(crate) struct AbandonedGuard(u64);

impl Drop for AbandonedGuard {
    fn drop(&mut self) {
        if let Some(m) = ABANDONED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            m.remove(&self.0);
        }
    }
}

/// How long [`run_task`](crate::run_task) gives a task with `timeout`, as a
/// deadline from now (saturating far in the future).
pub(crate) fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
