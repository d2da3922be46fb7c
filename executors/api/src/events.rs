//! Per-task events: one typed stream for progress bars, dashboards and
//! users, free when nobody listens.
//!
//! Rules:
//!
//! 1. Every executor in this process reports what happens to each task of a
//!    plan it runs through [`emit`], but only while [`listening`] is true:
//!    with no subscriber, an executor pays two relaxed atomic loads per
//!    task (one before it runs, one after: rule 2) and builds no event,
//!    reads no clock.
//! 2. For each task of a plan that is work of its own
//!    ([`Op::is_work`](crate::Op::is_work)), an executor reports [`EventKind::Queued`] at
//!    submission, then either [`EventKind::Started`] followed by
//!    [`EventKind::Finished`] or [`EventKind::Erred`], or only `Erred` when
//!    the task did not run because an input failed. Tasks a cancelled run
//!    never reached get no further event. A subscriber that starts
//!    listening mid-run sees the rest: a task that was already running
//!    then reports how it ended, `Finished` or `Erred`, without `Started`
//!    (whoever listens when it ends hears it, not only who listened when it
//!    started), so that a display started meanwhile neither counts a
//!    failure as done nor a success as not run. Its `Finished` says how
//!    long it ran since the listening began: no clock was read when it
//!    started (rule 1).
//! 3. Executors that run work elsewhere (a cluster) report what their
//!    scheduler tells them, later and in batches; they also report
//!    [`EventKind::Released`] and [`EventKind::Lost`].
//! 4. An event about a task of a plan run in this process names that plan
//!    ([`Event::plan`]): the same key run by two plans (a future cancelled
//!    while it ran, then submitted again) is two runs, told apart by it. A
//!    cluster's scheduler holds one task per key, whichever run wants it:
//!    what it reports (rule 3) names no plan, nor do the result cache's
//!    events.
//! 5. Subscribers are called on the executor's threads, in no particular
//!    order across threads: they must be quick, must not block on the
//!    executor and must not panic. A subscriber may subscribe or drop a
//!    [`Subscription`] from inside its callback.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Re-exported here: events name the plan they are about ([`Event::plan`]).
pub use crate::PlanId;
use crate::{Failure, Key, Outcome, Plan};

/// Something that happened to one task.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Event<'a> {
    /// The task's key.
    pub key: Key,
    /// Its name: the function for calls, e.g. `inc`.
    pub name: &'a str,
    /// What happened.
    pub kind: EventKind<'a>,
    /// The plan whose run of the task it is about, when that plan runs in
    /// this process; `None` for what a cluster reports and for the result
    /// cache's events (rule 4).
    pub plan: Option<PlanId>,
}

impl<'a> Event<'a> {
    /// An event naming no plan: `kind` happened to the task `key` named
    /// `name` (rule 4).
    pub fn new(key: Key, name: &'a str, kind: EventKind<'a>) -> Event<'a> {
        Event {
            key,
            name,
            kind,
            plan: None,
        }
    }

    /// An event about task `i` of `plan`, naming the plan (rule 4).
    fn of(plan: &'a Plan, i: u32, kind: EventKind<'a>) -> Event<'a> {
        Event {
            key: *plan.key(i),
            name: plan.task(i).op().name(),
            kind,
            plan: Some(plan.id()),
        }
    }
}

/// What happened to a task; see [`Event`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum EventKind<'a> {
    /// Submitted: it runs once its inputs are ready.
    Queued,
    /// Started running at `place`. On a cluster: sent to that worker,
    /// which runs it once its inputs are there (an input that fails then
    /// makes it err without running).
    Started {
        /// Where.
        place: Place,
    },
    /// Finished successfully.
    Finished {
        /// Where it ran.
        place: Place,
        /// How long its op ran; for a task that started before anyone
        /// listened, how long it ran since the listening began, a lower
        /// bound (rule 2).
        duration: Duration,
        /// Size of its value's encoding, when the executor knows it (a
        /// cluster does; executors in this process never encode values).
        nbytes: Option<u64>,
    },
    /// Failed, or did not run because an input failed or its work was
    /// cancelled; `failure` says which.
    Erred {
        /// Where it ran, if it did.
        place: Option<Place>,
        /// Why.
        failure: &'a Failure,
    },
    /// A cluster let go of its value: nobody wants it any more.
    Released,
    /// A cluster lost its value with the worker that held it; it is
    /// computed again if still wanted.
    Lost {
        /// The worker that died.
        worker: u32,
    },
    /// Its value was loaded from the result cache: it does not run, nor
    /// does anything only it needed (reported by `rask` while it plans).
    CacheHit,
    /// It is cached, and the result cache had no usable entry: it runs,
    /// and its value is written (reported by `rask` while it plans).
    CacheMiss,
}

/// Where a task ran: a worker of a cluster (if any) and a thread on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Place {
    /// The worker, on a cluster; `None` in this process.
    pub worker: Option<u32>,
    /// The thread: `0` for the synchronous executor, the pool thread's index
    /// for a thread pool or a worker.
    pub thread: u32,
}

impl Place {
    /// Thread `thread` of this process.
    pub fn local(thread: u32) -> Place {
        Place {
            worker: None,
            thread,
        }
    }
}

type Callback = Arc<dyn Fn(&Event<'_>) + Send + Sync>;
/// The subscribers at one moment, each with its id.
type Subscribers = Arc<Vec<(u64, Callback)>>;

/// The number of subscribers, read by [`listening`] (rule 1).
static LISTENERS: AtomicUsize = AtomicUsize::new(0);
/// When the first of the subscribers now listening came: a task that
/// started before ran at least since then (rule 2).
static LISTENING_SINCE: Mutex<Option<Instant>> = Mutex::new(None);
/// Subscribers, copied on write so that emitting takes the lock only to
/// clone one `Arc` and a callback can subscribe without a deadlock (rule 5).
static SUBSCRIBERS: Mutex<Option<Subscribers>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Whether anyone listens: executors build events only when this is true.
#[inline]
pub fn listening() -> bool {
    LISTENERS.load(Ordering::Relaxed) != 0
}

/// Hands `event` to every subscriber.
pub fn emit(event: &Event<'_>) {
    let subscribers = SUBSCRIBERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for (_, callback) in subscribers.iter().flat_map(|s| s.iter()) {
        callback(event);
    }
}

/// Calls `callback` with every event from now until the returned
/// [`Subscription`] is dropped.
///
/// Rules 4 and 5 of the [module docs](self) say what an event names and
/// what a callback may do.
///
/// # Examples
///
/// ```
/// use rask_executor::events::{self, Event, EventKind};
/// use rask_executor::{Executor, Key, Op, OpError, PlanBuilder, Reporter, Outcome, Synchronous, Value};
/// use std::sync::{Arc, Mutex};
///
/// struct Const;
/// impl Op for Const {
///     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> { Ok(Arc::new(1_i64)) }
///     fn name(&self) -> &str { "one" }
/// }
/// struct Ignore;
/// impl Reporter for Ignore { fn output(&self, _: usize, _: Outcome) {} }
///
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// let subscription = events::subscribe(move |e: &Event<'_>| {
///     let what = match e.kind { EventKind::Queued => "queued", EventKind::Started { .. } => "started",
///                               EventKind::Finished { .. } => "finished", _ => "other" };
///     log.lock().unwrap().push(format!("{} {what}", e.name));
/// });
/// let mut b = PlanBuilder::new();
/// let t = b.push(Key([3; 32]), Arc::new(Const), &[]);
/// b.output(t);
/// Synchronous.submit(Arc::new(b.build()), Arc::new(Ignore));
/// drop(subscription);
/// let seen = seen.lock().unwrap();
/// assert!(seen.ends_with(&["one queued".to_string(), "one started".into(), "one finished".into()]));
/// ```
pub fn subscribe(callback: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Subscription {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let first = {
        let mut subscribers = SUBSCRIBERS.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<(u64, Callback)> = subscribers.as_deref().cloned().unwrap_or_default();
        list.push((id, Arc::new(callback)));
        *subscribers = Some(Arc::new(list));
        let first = LISTENERS.fetch_add(1, Ordering::Relaxed) == 0;
        if first {
            *LISTENING_SINCE
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
        first
    };
    if first {
        changed();
    }
    Subscription { id }
}

type Hook = Arc<dyn Fn() + Send + Sync>;

/// Hooks called when [`listening`] may have changed.
static HOOKS: Mutex<Vec<(u64, Hook)>> = Mutex::new(Vec::new());

/// Calls every hook, outside every lock.
fn changed() {
    let hooks: Vec<Hook> = HOOKS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(_, h)| h.clone())
        .collect();
    for hook in hooks {
        hook();
    }
}

/// Calls `hook` whenever [`listening`] may have changed (the first
/// subscriber came, the last one left), until the returned guard is
/// dropped; the hook reads [`listening`] for the news. An executor that
/// must ask another process for events (a cluster client) uses it.
pub fn on_change(hook: impl Fn() + Send + Sync + 'static) -> ChangeHook {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    HOOKS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((id, Arc::new(hook)));
    ChangeHook { id }
}

/// A hook's registration ([`on_change`]): dropping it removes the hook.
#[derive(Debug)]
#[must_use = "dropping the guard removes the hook at once"]
pub struct ChangeHook {
    id: u64,
}

impl Drop for ChangeHook {
    fn drop(&mut self) {
        HOOKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(id, _)| *id != self.id);
    }
}

/// A subscriber's registration: dropping it stops the callback (events
/// already being delivered on other threads may still arrive).
#[derive(Debug)]
#[must_use = "dropping a subscription unsubscribes at once"]
pub struct Subscription {
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subscribers = SUBSCRIBERS.lock().unwrap_or_else(PoisonError::into_inner);
        let list: Vec<(u64, Callback)> = subscribers
            .iter()
            .flat_map(|s| s.iter())
            .filter(|(id, _)| *id != self.id)
            .cloned()
            .collect();
        *subscribers = if list.is_empty() {
            None
        } else {
            Some(Arc::new(list))
        };
        let last = LISTENERS.fetch_sub(1, Ordering::Relaxed) == 1;
        drop(subscribers);
        if last {
            changed();
        }
    }
}

/// Reports `Queued` for every task of a plan about to run (rule 2).
pub fn queued(plan: &Plan) {
    for (i, task) in plan.tasks().iter().enumerate() {
        if task.op().is_work() {
            emit(&Event::of(plan, i as u32, EventKind::Queued));
        }
    }
}

/// Runs `run` (task `i`'s op, through [`run_task`](crate::run_task)) and
/// reports it: `Started`, then `Finished` or `Erred`, when anyone listens;
/// only `Finished` or `Erred` when someone listens by the time it ends
/// (rules 1 and 2).
#[inline]
pub fn observe(
    plan: &Plan,
    i: u32,
    place: impl FnOnce() -> Place,
    run: impl FnOnce() -> Outcome,
) -> Outcome {
    // `listening` first: it is one load, where `is_work` asks the op.
    if !listening() {
        let outcome = run();
        // Started before anyone listened: how it ended is said to whoever
        // listens now (rule 2), a failure as one that kept the task from
        // running is. One more load when nobody does (rule 1).
        match &outcome {
            Err(failure) => skipped(plan, i, failure),
            Ok(_) if listening() => finished_unwatched(plan, i, place),
            Ok(_) => {}
        }
        return outcome;
    }
    let task = plan.task(i);
    if !task.op().is_work() {
        return run();
    }
    let place = place();
    emit(&Event::of(plan, i, EventKind::Started { place }));
    let start = Instant::now();
    let outcome = run();
    let kind = match &outcome {
        Ok(_) => EventKind::Finished {
            place,
            duration: start.elapsed(),
            nbytes: None,
        },
        Err(failure) => EventKind::Erred {
            place: Some(place),
            failure,
        },
    };
    emit(&Event::of(plan, i, kind));
    outcome
}

/// Reports that task `i`, which started before anyone listened, finished
/// (rule 2): rare, so kept out of the executor's loop.
#[cold]
#[inline(never)]
fn finished_unwatched(plan: &Plan, i: u32, place: impl FnOnce() -> Place) {
    if !plan.task(i).op().is_work() {
        return;
    }
    let since = *LISTENING_SINCE
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let kind = EventKind::Finished {
        place: place(),
        duration: since.map(|since| since.elapsed()).unwrap_or_default(),
        nbytes: None,
    };
    emit(&Event::of(plan, i, kind));
}

/// Reports that task `i` did not run because of `failure` (an input's, or
/// a cancellation), when anyone listens (rule 2).
#[inline]
pub fn skipped(plan: &Plan, i: u32, failure: &Failure) {
    let task = plan.task(i);
    if listening() && task.op().is_work() {
        emit(&Event::of(
            plan,
            i,
            EventKind::Erred {
                place: None,
                failure,
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Executor, OpError, PlanBuilder, Reporter, Synchronous, Value};

    type Heard = Arc<Mutex<Vec<(Key, Option<PlanId>, &'static str)>>>;

    /// Starts listening from inside its own run, as a display started
    /// while it ran would (no other test of this crate listens).
    struct ListensWhileRunning {
        heard: Heard,
        subscription: Mutex<Option<Subscription>>,
    }

    impl crate::Op for ListensWhileRunning {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            let heard = self.heard.clone();
            let subscription = subscribe(move |e: &Event<'_>| {
                let kind = match e.kind {
                    EventKind::Started { .. } => "started",
                    EventKind::Finished { .. } => "finished",
                    EventKind::Erred { .. } => "erred",
                    _ => "other",
                };
                heard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((e.key, e.plan, kind));
            });
            *self.subscription.lock().unwrap() = Some(subscription);
            Ok(Arc::new(1_i64))
        }

        fn name(&self) -> &str {
            "listens"
        }
    }

    struct Ignore;
    impl Reporter for Ignore {
        fn output(&self, _: usize, _: Outcome) {}
    }

    /// A task that started before anyone listened and succeeded says so
    /// to whoever listens when it ends, naming its plan (it said nothing:
    /// a progress bar started meanwhile counted it as not run).
    #[test]
    fn a_task_running_when_listening_began_reports_its_finish() {
        let op = Arc::new(ListensWhileRunning {
            heard: Heard::default(),
            subscription: Mutex::new(None),
        });
        let mut b = PlanBuilder::new();
        let t = b.push(Key([7; 32]), op.clone(), &[]);
        b.output(t);
        let plan = Arc::new(b.build());
        let id = plan.id();
        Synchronous.submit(plan, Arc::new(Ignore));
        drop(op.subscription.lock().unwrap().take());
        let heard = op.heard.lock().unwrap().clone();
        assert_eq!(heard, [(Key([7; 32]), Some(id), "finished")]);
    }
}
