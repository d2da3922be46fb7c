//! `EventLog`: what ran, how many times, and what did not run because its
//! result was held, read from the executors' task events.

use std::sync::{Arc, Mutex, PoisonError};

use rask_executor::events::{self, Event, EventKind, Subscription};
use rask_executor::Key;

use crate::build::delayed::Delayed;

/// The kind of a task event, without its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seen {
    /// Submitted.
    Queued,
    /// Started running.
    Started,
    /// Finished successfully.
    Finished,
    /// Failed, or did not run because an input failed or it was cancelled.
    Erred,
    /// A cluster let go of its value.
    Released,
    /// A cluster lost its value with a worker.
    Lost,
    /// Loaded from the result cache instead of run.
    CacheHit,
    /// Cached, with no usable entry: it runs and is written.
    CacheMiss,
    /// Something newer than this list.
    Other,
}

/// One task event as an [`EventLog`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The task's key.
    pub key: Key,
    /// Its name (a fused chain is named after its last task).
    pub name: String,
    /// What happened.
    pub kind: Seen,
}

/// Records every task event from its creation until it is dropped (rule 3
/// of [the module](crate::testing): events of other threads' work show
/// too; count by key or by names only this test uses).
///
/// Held results (a client's finished futures, persisted values, data) are
/// not work: a task whose result was held does not run and has no event,
/// which is how [`cached`](EventLog::cached) tells it was served from
/// memory. With optimization on, a fused chain runs as one task; pass
/// [`Config::optimize(false)`](crate::Config::optimize) to see one task
/// per node.
///
/// # Examples
///
/// ```
/// use rask::testing::EventLog;
/// use rask::{delayed, Config};
/// fn inc_tagged(x: i64, _tag: u64) -> i64 { x + 1 }
///
/// let config = Config::simulated(5).optimize(false);
/// let one = delayed!(inc_tagged(1, 0xd0c)).persist_with(&config)?;
/// let log = EventLog::record();
/// let two = delayed!(inc_tagged(&one, 0xd0c));
/// assert_eq!(two.compute_with(&config)?, 3);
/// log.assert_runs(&[(&two, 1)]);        // ran once
/// assert!(log.cached(&one));             // its input came from memory
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Debug)]
pub struct EventLog {
    seen: Arc<Mutex<Vec<Recorded>>>,
    _subscription: Subscription,
}

impl EventLog {
    /// Starts recording.
    pub fn record() -> EventLog {
        let seen: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let sink = seen.clone();
        let subscription = events::subscribe(move |e: &Event<'_>| {
            let kind = match e.kind {
                EventKind::Queued => Seen::Queued,
                EventKind::Started { .. } => Seen::Started,
                EventKind::Finished { .. } => Seen::Finished,
                EventKind::Erred { .. } => Seen::Erred,
                EventKind::Released => Seen::Released,
                EventKind::Lost { .. } => Seen::Lost,
                EventKind::CacheHit => Seen::CacheHit,
                EventKind::CacheMiss => Seen::CacheMiss,
                _ => Seen::Other,
            };
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Recorded {
                    key: e.key,
                    name: e.name.to_owned(),
                    kind,
                });
        });
        EventLog {
            seen,
            _subscription: subscription,
        }
    }

    /// Every event recorded so far, in the order seen.
    pub fn events(&self) -> Vec<Recorded> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self, kind: Seen, matches: impl Fn(&Recorded) -> bool) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|r| r.kind == kind && matches(r))
            .count()
    }

    /// How many times the task of `delayed` started running.
    pub fn runs<T>(&self, delayed: &Delayed<T>) -> usize {
        let key = delayed.key().key();
        self.count(Seen::Started, |r| r.key == key)
    }

    /// How many tasks named `name` started running.
    pub fn runs_named(&self, name: &str) -> usize {
        self.count(Seen::Started, |r| r.name == name)
    }

    /// How many times the task of `delayed` erred (failed, or skipped
    /// because an input failed or it was cancelled).
    pub fn errors<T>(&self, delayed: &Delayed<T>) -> usize {
        let key = delayed.key().key();
        self.count(Seen::Erred, |r| r.key == key)
    }

    /// Whether `delayed` had no event at all: nothing queued or ran it, so
    /// whatever used it got its value from memory (a held or persisted
    /// result, or data).
    pub fn cached<T>(&self, delayed: &Delayed<T>) -> bool {
        let key = delayed.key().key();
        !self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|r| r.key == key)
    }

    /// Asserts how many times each task started running.
    ///
    /// # Panics
    ///
    /// On the first task whose count differs, naming it, both counts and
    /// the events recorded for it.
    pub fn assert_runs<T>(&self, expected: &[(&Delayed<T>, usize)]) {
        for (delayed, want) in expected {
            let got = self.runs(delayed);
            if got != *want {
                let key = delayed.key().key();
                let its: Vec<Seen> = self
                    .events()
                    .into_iter()
                    .filter(|r| r.key == key)
                    .map(|r| r.kind)
                    .collect();
                panic!(
                    "{} ran {got} times, expected {want}; its events: {its:?}",
                    delayed.key()
                );
            }
        }
    }
}
