//! Dropping values whose `Drop` is user code.
//!
//! Rules:
//!
//! 1. A value an executor owns (a task's value waiting for its consumers,
//!    the inputs it gave a task, what a cancelled run still held, a
//!    worker's stored values) is a user's type, and its `Drop` is user
//!    code that may panic. Executors drop such values with
//!    [`drop_quietly`] or [`drop_each_quietly`]: a panic there is caught
//!    and logged (a `tracing` warning naming whose value it was), and never
//!    unwinds into the executor, where it would abort the process (a
//!    thread pool), end a worker or leave its task unreported (a worker's
//!    threads) or come out of `compute` (the synchronous executor).
//! 2. Such a panic changes no outcome. The value was dropped because
//!    nobody needs it any more, or after the task it was an input of ran:
//!    that task's result stands. A task whose own code drops a value (an
//!    op that takes its input and lets it go) panics inside the task, and
//!    fails as any panic of its code does (crate rule 3).
//! 3. Values are dropped one at a time, each under its own catch: a second
//!    `Drop` that panics while a first one unwinds aborts the process, as
//!    dropping a whole `Vec` of such values would.
//! 4. Nothing is allocated and no lock taken unless a `Drop` panics. A
//!    catch still costs a little when nothing panics (about 2 ns a task
//!    on a million-task tree of ops that read their inputs in place,
//!    `rask-threaded`'s `overhead_of_a_million_task_tree`), so
//!    [`drop_each_quietly`] catches once for a whole list while nothing
//!    panics, and the executors skip it for a task that took its inputs
//!    (nothing left to drop).
//! 5. A [`Plan`](crate::Plan) lets go of what it holds the same way (plan
//!    invariant 6): its ops hold the user's literal arguments, and it may
//!    hold their last reference (a client lets go of a graph once it
//!    submitted its plan), wherever its own last reference goes: an
//!    executor's pool thread once a run ended, a cluster client's loop, a
//!    thread that stepped a simulation. An executor lets go of a plan as
//!    of any other `Arc`.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::failure::{panic_message, take_panic_location};

/// Drops `value`, catching a panic of its `Drop` (rule 1): the panic is
/// logged as a warning that names `whose` ("the value of task
/// `inc-1a2b3c4d`"), and `drop_quietly` returns as if nothing happened.
///
/// `whose` is formatted only when the drop panicked, so a lazy
/// `Display` (such as [`Plan::label`](crate::Plan::label) in
/// `format_args!`) costs nothing otherwise.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use rask_executor::{drop_quietly, Value};
///
/// struct Boom;
/// impl Drop for Boom {
///     fn drop(&mut self) {
///         panic!("a user's value that panics when dropped");
///     }
/// }
/// impl serde::Serialize for Boom {
///     fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
///         s.serialize_unit()
///     }
/// }
///
/// let value: Value = Arc::new(Boom);
/// drop_quietly(value, "the value of task `boom`"); // logged, not unwound
/// ```
#[inline]
pub fn drop_quietly<T>(value: T, whose: impl fmt::Display) {
    if !std::mem::needs_drop::<T>() {
        return;
    }
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
        caught(payload, &whose);
    }
}

/// Drops each of `values` with [`drop_quietly`], one at a time (rule 3),
/// naming them `whose`.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use rask_executor::{drop_each_quietly, Value};
///
/// let mut inputs: Vec<Option<Value>> = vec![Some(Arc::new(1_i64)), None];
/// // Empties the vector and keeps its capacity, for the next task.
/// drop_each_quietly(inputs.drain(..), "the inputs of task `add`");
/// assert!(inputs.is_empty() && inputs.capacity() >= 2);
/// ```
#[inline]
pub fn drop_each_quietly<T>(values: impl IntoIterator<Item = T>, whose: impl fmt::Display) {
    let mut values = values.into_iter();
    if !std::mem::needs_drop::<T>() {
        return values.for_each(drop);
    }
    // One catch for the whole loop while nothing panics (the common
    // case, where a catch per value would cost a few nanoseconds each).
    // A value whose drop panics was moved out of the iterator already:
    // unwinding drops no other, and the loop starts again, under a new
    // catch, with the next one (rule 3).
    loop {
        match catch_unwind(AssertUnwindSafe(|| values.by_ref().for_each(drop))) {
            Ok(()) => return,
            Err(payload) => caught(payload, &whose),
        }
    }
}

/// Logs a caught panic of a `Drop` (rule 1).
#[cold]
#[inline(never)]
fn caught(payload: Box<dyn Any + Send>, whose: &dyn fmt::Display) {
    let message = panic_message(&*payload);
    match take_panic_location() {
        Some(at) => tracing::warn!(
            "dropping {whose} panicked at {at}: {message} (ignored: the value was no longer needed)"
        ),
        None => tracing::warn!(
            "dropping {whose} panicked: {message} (ignored: the value was no longer needed)"
        ),
    }
    // A payload is user data too: one whose own `Drop` panics is leaked
    // rather than let abort the process.
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
        take_panic_location();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    /// Panics when dropped, after counting the drop.
    struct Boom;
    impl Drop for Boom {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::SeqCst);
            panic!("boom");
        }
    }

    /// A panic payload that panics when dropped.
    struct Nasty;
    impl Drop for Nasty {
        fn drop(&mut self) {
            panic!("the payload's own drop");
        }
    }
    struct ThrowsNasty;
    impl Drop for ThrowsNasty {
        fn drop(&mut self) {
            std::panic::panic_any(Nasty);
        }
    }

    /// Rule 3: two values that panic, dropped as one `Vec`, would abort;
    /// dropped one at a time, each is dropped and the call returns. A
    /// payload that panics when dropped is leaked, not unwound.
    #[test]
    fn each_value_is_dropped_under_its_own_catch() {
        crate::failure::record_panic_locations();
        let before = DROPPED.load(Ordering::SeqCst);
        let values: Vec<Option<Arc<Boom>>> = vec![Some(Arc::new(Boom)), None, Some(Arc::new(Boom))];
        drop_each_quietly(values, "two booms");
        assert_eq!(DROPPED.load(Ordering::SeqCst) - before, 2);
        drop_quietly(ThrowsNasty, "a value whose panic's payload panics");
        // The location the hook recorded was taken for the warning: a
        // later task panic does not inherit it.
        assert!(take_panic_location().is_none());
    }
}

/// Plans whose values panic when dropped, for the executors of this
/// crate (the threaded executor's tests have their own copy).
#[cfg(test)]
pub(crate) mod scenarios {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use crate::{Executor, FailureKind, Key, Op, OpError, Outcome, PlanBuilder, Reporter, Value};

    /// A user's value whose `Drop` panics, after counting the drop.
    pub(crate) struct Boom(Arc<AtomicUsize>);
    impl Drop for Boom {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("a Boom was dropped");
        }
    }
    impl serde::Serialize for Boom {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_unit()
        }
    }

    /// Makes a [`Boom`] counting its drop in `.0`, counting it in `.1`.
    struct Make(Arc<AtomicUsize>, Arc<AtomicUsize>);
    impl Op for Make {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(Boom(self.0.clone())))
        }
        fn name(&self) -> &str {
            "make"
        }
    }

    /// How many of its inputs are `Boom`s; reads them in place, so the
    /// executor drops them after it ran.
    struct Peek;
    impl Op for Peek {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            let booms = inputs
                .iter()
                .filter(|i| {
                    i.as_ref()
                        .is_some_and(|v| v.downcast_ref::<Boom>().is_some())
                })
                .count();
            Ok(Arc::new(booms as i64))
        }
        fn name(&self) -> &str {
            "peek"
        }
    }

    struct Fails;
    impl Op for Fails {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Err(OpError::failed("no"))
        }
        fn name(&self) -> &str {
            "fails"
        }
    }

    /// Outputs as numbers or failure kinds; cancels after the first
    /// failure when `fail_fast`, as `compute`'s reporter does.
    #[derive(Default)]
    struct Outputs {
        got: Mutex<Vec<(usize, Result<i64, FailureKind>)>>,
        failed: AtomicBool,
        fail_fast: bool,
        finished: AtomicBool,
    }
    impl Reporter for Outputs {
        fn output(&self, index: usize, outcome: Outcome) {
            if outcome.is_err() {
                self.failed.store(true, Ordering::SeqCst);
            }
            let o = outcome
                .map(|v| *v.downcast_ref::<i64>().expect("outputs are numbers"))
                .map_err(|f| f.kind);
            self.got.lock().unwrap().push((index, o));
        }
        fn cancelled(&self) -> bool {
            self.fail_fast && self.failed.load(Ordering::SeqCst)
        }
        fn finished(&self) {
            self.finished.store(true, Ordering::SeqCst);
        }
    }

    fn key(i: u8) -> Key {
        Key([i; 32])
    }

    /// Runs `plan` on `executor`, which finishes it before `submit`
    /// returns; its outputs by index.
    fn run(
        executor: &dyn Executor,
        plan: PlanBuilder,
        fail_fast: bool,
    ) -> Vec<(usize, Result<i64, FailureKind>)> {
        let outputs = Arc::new(Outputs {
            fail_fast,
            ..Outputs::default()
        });
        executor.submit(Arc::new(plan.build()), outputs.clone());
        assert!(outputs.finished.load(Ordering::SeqCst), "the run finished");
        let mut got = std::mem::take(&mut *outputs.got.lock().unwrap());
        got.sort_by_key(|(i, _)| *i);
        got
    }

    /// Values whose `Drop` panics, dropped by `executor` (which runs
    /// plans to the end within `submit`): after the task they were an
    /// input of ran (its result stands), by a task that was skipped for a
    /// failed input, unused, and held by a run that was cancelled. Each is
    /// dropped once, and nothing unwinds out of `submit`.
    pub(crate) fn dropped_quietly(executor: &dyn Executor) {
        crate::failure::record_panic_locations();
        let (drops, made) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let make = || Arc::new(Make(drops.clone(), made.clone())) as Arc<dyn Op>;
        let mut b = PlanBuilder::new();
        let used = b.push(key(1), make(), &[]);
        let reads = b.push(key(2), Arc::new(Peek), &[used]);
        let skipped_input = b.push(key(3), make(), &[]);
        let fails = b.push(key(4), Arc::new(Fails), &[]);
        let skipped = b.push(key(5), Arc::new(Peek), &[skipped_input, fails]);
        b.push(key(6), make(), &[]); // no consumer
        b.output(reads);
        b.output(skipped);
        assert_eq!(
            run(executor, b, false),
            vec![(0, Ok(1)), (1, Err(FailureKind::Failed))]
        );
        assert_eq!(made.load(Ordering::SeqCst), 3);
        assert_eq!(drops.load(Ordering::SeqCst), 3, "each value dropped once");

        // Cancelled after `fails`: `held`, if it ran before, waits for
        // `reads`, which then may not run.
        let (drops, made) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let make = || Arc::new(Make(drops.clone(), made.clone())) as Arc<dyn Op>;
        let mut b = PlanBuilder::new();
        let held = b.push(key(1), make(), &[]);
        let fails = b.push(key(2), Arc::new(Fails), &[]);
        let reads = b.push(key(3), Arc::new(Peek), &[held]);
        b.output(fails);
        b.output(reads);
        let got = run(executor, b, true);
        assert_eq!(got[0], (0, Err(FailureKind::Failed)));
        assert!(
            matches!(got[1], (1, Ok(1) | Err(FailureKind::Cancelled))),
            "{got:?}"
        );
        assert_eq!(
            drops.load(Ordering::SeqCst),
            made.load(Ordering::SeqCst),
            "the value, if made, dropped once"
        );
    }
}
