//! The reference executor: one thread, tasks in plan order.

use std::collections::HashMap;
use std::sync::Arc;

use crate::events::{self, Place};
use crate::{run_task, Executor, Failure, Outcome, Plan, Reporter, Stop, Value};

/// Runs a plan on the calling thread, in plan order (depth-first, so a branch
/// finishes before the next starts), freeing each value right after its last
/// consumer took it.
///
/// This is the reference semantics: every other executor must report the same
/// outputs and failures. `submit` returns only once the plan finished.
///
/// # Examples
///
/// ```
/// use rask_executor::{Executor, Key, Op, OpError, Outcome, PlanBuilder, Reporter, Synchronous, Value};
/// use std::sync::{Arc, Mutex};
///
/// struct Const(i64);
/// impl Op for Const {
///     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> { Ok(Arc::new(self.0)) }
///     fn name(&self) -> &str { "const" }
/// }
/// struct Collect(Mutex<Vec<i64>>);
/// impl Reporter for Collect {
///     fn output(&self, _: usize, outcome: Outcome) {
///         let v = outcome.unwrap();
///         self.0.lock().unwrap().push(*v.downcast_ref::<i64>().unwrap());
///     }
/// }
///
/// let mut b = PlanBuilder::new();
/// let t = b.push(Key([7; 32]), Arc::new(Const(42)), &[]);
/// b.output(t);
/// let got = Arc::new(Collect(Mutex::new(vec![])));
/// Synchronous.submit(Arc::new(b.build()), got.clone());
/// assert_eq!(*got.0.lock().unwrap(), vec![42]);
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct Synchronous;

impl Executor for Synchronous {
    fn submit(&self, plan: Arc<Plan>, reporter: Arc<dyn Reporter>) {
        // Tasks see the run's cancellation (stop rule 1).
        let stop = {
            let reporter = reporter.clone();
            Stop::when(move || reporter.cancelled())
        };
        if events::listening() {
            events::queued(&plan);
        }
        stop.enter(|| run(&plan, &*reporter));
        drop(plan);
        reporter.finished();
    }
}

fn run(plan: &Plan, reporter: &dyn Reporter) {
    let n = plan.len();
    let mut outcomes = Outcomes {
        values: vec![None; n],
        failures: HashMap::new(),
        remaining: (0..n as u32).map(|i| plan.consumers(i)).collect(),
    };
    let mut inputs: Vec<Option<Value>> = Vec::new();
    for i in 0..n as u32 {
        if reporter.cancelled() {
            report_cancelled(plan, reporter, i);
            return;
        }
        let mut failed = None;
        inputs.clear();
        for &d in plan.deps(i) {
            match outcomes.take(d) {
                Ok(v) => inputs.push(Some(v)),
                Err(f) => {
                    failed.get_or_insert(f);
                }
            }
        }
        let outcome = match failed {
            Some(f) => {
                events::skipped(plan, i, &f);
                Err(f)
            }
            None => events::observe(
                plan,
                i,
                || Place::local(0),
                || run_task(plan, i, &mut inputs),
            ),
        };
        inputs.clear();
        outcomes.put(i, outcome);
        for slot in plan.output_slots_of(i) {
            let outcome = outcomes.take(i);
            reporter.output(slot, outcome);
        }
    }
}

/// Each finished task's outcome until its last consumer took it: a value in
/// a slot of its own, a failure (rare) in a map. An empty slot of a finished
/// task means it failed. (A slot holding either would take 8 bytes more per
/// task, for plans of millions of tasks.)
struct Outcomes {
    values: Vec<Option<Value>>,
    failures: HashMap<u32, Arc<Failure>>,
    /// Uses of each task's outcome not yet taken (plan rule 3).
    remaining: Vec<u32>,
}

impl Outcomes {
    fn put(&mut self, task: u32, outcome: Outcome) {
        match outcome {
            Ok(value) => self.values[task as usize] = Some(value),
            Err(failure) => {
                self.failures.insert(task, failure);
            }
        }
    }

    /// Task `d`'s outcome, moved out by its last use.
    fn take(&mut self, d: u32) -> Outcome {
        let remaining = &mut self.remaining[d as usize];
        *remaining -= 1;
        let last = *remaining == 0;
        let slot = &mut self.values[d as usize];
        let value = if last { slot.take() } else { slot.clone() };
        if let Some(value) = value {
            return Ok(value);
        }
        let failure = if last {
            self.failures.remove(&d)
        } else {
            self.failures.get(&d).cloned()
        };
        Err(failure.expect("a dependency runs before its dependents"))
    }
}

/// Takes task `d`'s outcome from `slots` (for the simulated executor, whose
/// slots hold either), moved out by its last use.
pub(crate) fn take(slots: &mut [Option<Outcome>], remaining: &mut [u32], d: u32) -> Outcome {
    let d = d as usize;
    remaining[d] -= 1;
    let slot = &mut slots[d];
    if remaining[d] == 0 {
        slot.take()
            .expect("a task's value is taken at most `consumers` times")
    } else {
        slot.clone()
            .expect("a dependency runs before its dependents")
    }
}

fn report_cancelled(plan: &Plan, reporter: &dyn Reporter, first_not_run: u32) {
    for (slot, &t) in plan.outputs().iter().enumerate() {
        if t >= first_not_run {
            reporter.output(slot, Err(plan.cancelled_output(slot)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FailureKind, Key, Op, OpError, PlanBuilder};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Adds its inputs and a constant; fails when asked to.
    struct Sum {
        constant: i64,
        fail: bool,
        live: Arc<AtomicUsize>,
    }
    impl Op for Sum {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            if self.fail {
                panic!("boom");
            }
            let mut total = self.constant;
            for v in inputs.iter_mut() {
                total += v.take().unwrap().downcast_ref::<i64>().unwrap();
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(total))
        }
        fn name(&self) -> &str {
            "sum"
        }
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<(usize, Result<i64, FailureKind>)>>);
    impl Reporter for Log {
        fn output(&self, index: usize, outcome: Outcome) {
            let o = outcome
                .map(|v| *v.downcast_ref::<i64>().unwrap())
                .map_err(|f| f.kind);
            self.0.lock().unwrap().push((index, o));
        }
    }

    fn op(constant: i64, fail: bool) -> Arc<dyn Op> {
        Arc::new(Sum {
            constant,
            fail,
            live: Arc::default(),
        })
    }

    #[test]
    fn runs_diamond_and_reports_outputs() {
        let mut b = PlanBuilder::new();
        let a = b.push(Key([0; 32]), op(1, false), &[]);
        let l = b.push(Key([1; 32]), op(10, false), &[a]);
        let r = b.push(Key([2; 32]), op(100, false), &[a]);
        let j = b.push(Key([3; 32]), op(0, false), &[l, r]);
        b.output(j);
        b.output(a);
        let log = Arc::new(Log::default());
        Synchronous.submit(Arc::new(b.build()), log.clone());
        let got = log.0.lock().unwrap().clone();
        assert_eq!(got, vec![(1, Ok(1)), (0, Ok(112))]);
    }

    #[test]
    fn panic_fails_dependents_not_siblings() {
        let mut b = PlanBuilder::new();
        let bad = b.push(Key([0; 32]), op(1, true), &[]);
        let dep = b.push(Key([1; 32]), op(1, false), &[bad]);
        let ok = b.push(Key([2; 32]), op(5, false), &[]);
        b.output(dep);
        b.output(ok);
        let log = Arc::new(Log::default());
        Synchronous.submit(Arc::new(b.build()), log.clone());
        let got = log.0.lock().unwrap().clone();
        assert_eq!(got, vec![(0, Err(FailureKind::Panicked)), (1, Ok(5))]);
    }

    #[test]
    fn a_failure_reaches_every_consumer_and_is_freed_by_the_last() {
        // The failure sits in a map beside the value slots: each of its
        // three uses (two dependents, one output) must see it, and a value
        // of the same plan must not be mistaken for it.
        let mut b = PlanBuilder::new();
        let bad = b.push(Key([0; 32]), op(1, true), &[]);
        let good = b.push(Key([1; 32]), op(7, false), &[]);
        let l = b.push(Key([2; 32]), op(0, false), &[bad, good]);
        let r = b.push(Key([3; 32]), op(0, false), &[good, bad]);
        let g = b.push(Key([4; 32]), op(1, false), &[good]);
        b.output(l);
        b.output(r);
        b.output(bad);
        b.output(g);
        let log = Arc::new(Log::default());
        Synchronous.submit(Arc::new(b.build()), log.clone());
        let got = log.0.lock().unwrap().clone();
        let panicked = Err(FailureKind::Panicked);
        // Reported in plan order: `bad` (slot 2), `l`, `r`, `g`.
        assert_eq!(
            got,
            vec![(2, panicked), (0, panicked), (1, panicked), (3, Ok(8))]
        );
    }

    #[test]
    fn cancelled_run_reports_every_output() {
        struct Cancel(Log);
        impl Reporter for Cancel {
            fn output(&self, i: usize, o: Outcome) {
                self.0.output(i, o)
            }
            fn cancelled(&self) -> bool {
                true
            }
        }
        let mut b = PlanBuilder::new();
        let a = b.push(Key([0; 32]), op(1, false), &[]);
        b.output(a);
        b.output(a);
        let log = Arc::new(Cancel(Log::default()));
        Synchronous.submit(Arc::new(b.build()), log.clone());
        let got = log.0 .0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                (0, Err(FailureKind::Cancelled)),
                (1, Err(FailureKind::Cancelled))
            ]
        );
    }
}
