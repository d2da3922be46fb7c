//! Timeouts and retries, enforced by the op that has them.
//!
//! Rules:
//!
//! 1. An op with a timeout or retries runs its work through
//!    [`run_limited`], in its own `run`: the executors' path for every other
//!    task pays nothing for the feature, and the limits apply to that op's
//!    own work wherever it runs (alone, or as a step of a fused task).
//! 2. A timed attempt runs on a thread of its own; the caller stops waiting
//!    at the deadline and the attempt fails as
//!    [`FailureKind::TimedOut`]. A result that
//!    arrives after the deadline counts as timed out too (the work may have
//!    stopped early, having seen [`cancelled`]). The
//!    thread is then *abandoned* (stop rule 3).
//! 3. A failed attempt (an error, a panic or a timeout; not a cancellation,
//!    and not once the task's work was given up) is run again on the same
//!    inputs, up to `retries` times; the last failure counts the attempts
//!    ([`OpError::attempts`](crate::OpError::attempts)).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stop::{self, Stop};
use crate::{cancelled, drop_each_quietly, drop_quietly, FailureKind, OpError, Seat, Value};

/// The work of an op, callable from another thread (rule 2).
pub type Run = Arc<dyn Fn(&mut [Option<Value>]) -> Result<Value, OpError> + Send + Sync>;

/// Runs `run` on `inputs` under a `timeout` and up to `retries` more
/// attempts (rules 2 and 3); `name` names the task in [`abandoned`].
///
/// [`abandoned`]: crate::abandoned
///
/// # Errors
///
/// The last attempt's error, its `attempts` set.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use rask_executor::{run_limited, OpError, Run, Value};
///
/// let calls = Arc::new(AtomicU32::new(0));
/// let counted = calls.clone();
/// let flaky: Run = Arc::new(move |_: &mut [Option<Value>]| {
///     match counted.fetch_add(1, Ordering::SeqCst) {
///         0 => Err(OpError::failed("try again")),
///         _ => Ok(Arc::new(7_i64) as Value),
///     }
/// });
/// let value = run_limited("flaky", None, 1, &flaky, &mut []).unwrap();
/// assert_eq!(value.downcast_ref::<i64>(), Some(&7));
/// assert_eq!(calls.load(Ordering::SeqCst), 2);
/// ```
pub fn run_limited(
    name: &str,
    timeout: Option<Duration>,
    retries: u32,
    run: &Run,
    inputs: &mut [Option<Value>],
) -> Result<Value, OpError> {
    let mut attempt = 1;
    loop {
        // The last attempt may take its inputs; earlier ones share them.
        let result = if attempt > retries {
            attempt_once(name, timeout, run, inputs)
        } else {
            attempt_once(name, timeout, run, &mut inputs.to_vec())
        };
        match result {
            Err(_) if attempt <= retries && !cancelled() => attempt += 1,
            Err(mut err) => {
                if err.kind != FailureKind::Cancelled {
                    err.attempts = attempt;
                }
                return Err(err);
            }
            ok => return ok,
        }
    }
}

/// One attempt: here without a timeout (panics caught), on a thread of its
/// own with one (rule 2).
fn attempt_once(
    name: &str,
    timeout: Option<Duration>,
    run: &Run,
    inputs: &mut [Option<Value>],
) -> Result<Value, OpError> {
    let Some(timeout) = timeout else {
        return catch_unwind(AssertUnwindSafe(|| run(inputs)))
            .unwrap_or_else(|payload| Err(OpError::panicked(&*payload)));
    };
    /// Whether the attempt returned, and the note that its thread was
    /// abandoned, which it takes back when it returns.
    #[derive(Default)]
    struct Ending {
        returned: bool,
        abandoned: Option<stop::AbandonedGuard>,
    }
    let deadline = stop::deadline(timeout);
    let given_up = Arc::new(AtomicBool::new(false));
    let signal = {
        let outer = Stop::current();
        let given_up = given_up.clone();
        Stop::when(move || given_up.load(Ordering::Relaxed) || outer.raised()).until(deadline)
    };
    let ending = Arc::new(Mutex::new(Ending::default()));
    let (tx, rx) = std::sync::mpsc::channel();
    let work = run.clone();
    let mut owned: Vec<Option<Value>> = inputs.iter_mut().map(Option::take).collect();
    let on_thread = ending.clone();
    let task = name.to_owned();
    // A nested computation's wait there gives the task's thread back
    // (blocking rule 4).
    let seat = <dyn Seat>::current();
    // And it computes where its task would have (blocking rule 5).
    let context = crate::blocking::context();
    let spawned = std::thread::Builder::new()
        .name(format!("rask-timed-{name}"))
        .spawn(move || {
            if let Some(context) = context {
                crate::blocking::install_context(context);
            }
            let mut attempt = || {
                stop::noting_cancel(|| {
                    signal.enter(|| {
                        catch_unwind(AssertUnwindSafe(|| work(&mut owned)))
                            .unwrap_or_else(|payload| Err(OpError::panicked(&*payload)))
                    })
                })
            };
            let (result, saw_cancel) = match seat {
                Some(seat) => <dyn Seat>::enter(seat, attempt),
                None => attempt(),
            };
            // Dropping rule 1, on a thread that must go on to take its
            // abandonment note back.
            drop_each_quietly(owned, format_args!("an input of task `{task}`"));
            if let Err(late) = tx.send((result, saw_cancel, Instant::now())) {
                // Nobody waits any more (rule 2): a late value goes too.
                drop_quietly(late.0, format_args!("the late value of task `{task}`"));
            }
            let mut ending = on_thread.lock().unwrap_or_else(|e| e.into_inner());
            ending.returned = true;
            ending.abandoned = None;
        });
    if let Err(e) = spawned {
        return Err(OpError::failed(format!(
            "could not start a thread to run it under its timeout: {e}"
        )));
    }
    let in_time = |(result, saw_cancel, at): (Result<Value, OpError>, bool, Instant)| {
        if saw_cancel {
            // For `run_task`, on this thread (stop rule 2).
            stop::note_saw_cancel();
        }
        if at < deadline {
            result
        } else {
            drop_quietly(result, format_args!("the late value of task `{name}`"));
            Err(OpError::timed_out(timeout))
        }
    };
    let wait = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(wait) {
        Ok(done) => in_time(done),
        Err(_) => {
            let mut ending = ending.lock().unwrap_or_else(|e| e.into_inner());
            match rx.try_recv() {
                // It returned just now.
                Ok(done) => in_time(done),
                Err(_) => {
                    given_up.store(true, Ordering::Relaxed);
                    if !ending.returned {
                        ending.abandoned = Some(stop::abandon(name.into()));
                    }
                    Err(OpError::timed_out(timeout))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `run_limited` on a thread of its own with `context` installed,
    /// under `timeout`: what the task's work saw as its thread's context.
    fn context_seen(timeout: Option<Duration>) -> Option<String> {
        std::thread::spawn(move || {
            crate::install_context(Arc::new(String::from("the worker's cluster")));
            let run: Run = Arc::new(|_| {
                let seen = crate::context().and_then(|c| c.downcast_ref::<String>().cloned());
                Ok(Arc::new(seen) as Value)
            });
            let value = run_limited("seen", timeout, 0, &run, &mut []).unwrap();
            let any: &dyn std::any::Any = &*value;
            any.downcast_ref::<Option<String>>().unwrap().clone()
        })
        .join()
        .unwrap()
    }

    /// A timed attempt's thread drops the inputs it was given once the
    /// work returned: an input whose `Drop` panics is dropped quietly
    /// (dropping rule 1), and the attempt's value still reaches its
    /// caller. Before, the panic ended the thread before it sent the
    /// value: the attempt failed at once as timed out (the channel closed
    /// with the thread), and the thread stayed listed as abandoned, which
    /// makes a worker unhealthy after its grace.
    #[test]
    fn a_timed_attempt_survives_an_input_whose_drop_panics() {
        crate::failure::record_panic_locations();
        struct Boom;
        impl Drop for Boom {
            fn drop(&mut self) {
                panic!("a Boom was dropped");
            }
        }
        impl serde::Serialize for Boom {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_unit()
            }
        }
        // Reads its input in place.
        let run: Run = Arc::new(|inputs: &mut [Option<Value>]| {
            let boom = inputs[0]
                .as_ref()
                .is_some_and(|v| v.downcast_ref::<Boom>().is_some());
            Ok(Arc::new(boom) as Value)
        });
        let mut inputs = [Some(Arc::new(Boom) as Value)];
        let timeout = Some(Duration::from_secs(10));
        let value = run_limited("reads-a-boom", timeout, 0, &run, &mut inputs)
            .expect("the attempt's value, in time");
        let any: &dyn std::any::Any = &*value;
        assert_eq!(any.downcast_ref::<bool>(), Some(&true));
        assert!(crate::abandoned()
            .iter()
            .all(|a| &*a.name != "reads-a-boom"));
    }

    /// Blocking rule 5: an attempt run on a thread of its own under a
    /// timeout has its task's context, as one run in place has (it had
    /// none: a timed task on a worker computed its nested work off its
    /// cluster).
    #[test]
    fn a_timed_attempt_carries_its_threads_context() {
        let cluster = Some(String::from("the worker's cluster"));
        assert_eq!(context_seen(None), cluster);
        assert_eq!(context_seen(Some(Duration::from_secs(60))), cluster);
    }
}
