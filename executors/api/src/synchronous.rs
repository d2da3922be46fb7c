//! The reference executor: one thread, tasks in plan order.

use std::collections::HashMap;
use std::sync::Arc;

use crate::events::{self, Place};
use crate::{
    drop_each_quietly, drop_quietly, run_task, Executor, Failure, Outcome, Plan, Reporter, Stop,
    Value,
};

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
        plan,
        values: Vec::new(),
        free: Vec::new(),
        failures: HashMap::new(),
        uses: (0..n as u32)
            .map(|i| Uses {
                remaining: plan.consumers(i),
                slot: NO_SLOT,
            })
            .collect(),
    };
    let mut inputs: Vec<Option<Value>> = Vec::new();
    for i in 0..n as u32 {
        if reporter.cancelled() {
            report_cancelled(plan, reporter, i);
            return;
        }
        let mut failed = None;
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
        // The task ran, or was skipped: its inputs go, quietly (dropping
        // rule 1; an op that reads its inputs in place leaves them here,
        // one that took them leaves nothing to catch).
        if inputs.iter().any(Option::is_some) {
            drop_each_quietly(
                inputs.drain(..),
                format_args!("an input of task {}", plan.label(i)),
            );
        } else {
            inputs.clear();
        }
        outcomes.put(i, outcome);
        for slot in plan.output_slots_of(i) {
            let outcome = outcomes.take(i);
            reporter.output(slot, outcome);
        }
    }
}

/// A task without a value slot: not run yet, failed, or its value taken by
/// its last use.
const NO_SLOT: u32 = u32::MAX;

/// Uses of a task's outcome not yet taken (plan rule 3), and the slot of
/// `Outcomes::values` its value waits in.
#[derive(Clone, Copy)]
struct Uses {
    remaining: u32,
    slot: u32,
}

/// Each finished task's outcome until its last consumer took it: a value in
/// a slot of a small pool (a slot is reused once its value was taken for the
/// last time, so the pool holds as many slots as values live at once: about
/// the depth of a tree, not one per task), a failure (rare) in a map.
/// What a cancelled run leaves is dropped with it, quietly (dropping rule
/// 1).
struct Outcomes<'a> {
    plan: &'a Plan,
    values: Vec<Option<Value>>,
    /// Slots of `values` free for the next value.
    free: Vec<u32>,
    failures: HashMap<u32, Arc<Failure>>,
    uses: Vec<Uses>,
}

impl Outcomes<'_> {
    fn put(&mut self, task: u32, outcome: Outcome) {
        match outcome {
            Ok(value) => {
                let uses = &mut self.uses[task as usize];
                if uses.remaining == 0 {
                    drop_quietly(
                        value,
                        format_args!("the value of task {}", self.plan.label(task)),
                    );
                    return;
                }
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.values[slot as usize] = Some(value);
                        slot
                    }
                    None => {
                        self.values.push(Some(value));
                        (self.values.len() - 1) as u32
                    }
                };
                uses.slot = slot;
            }
            Err(failure) => {
                self.failures.insert(task, failure);
            }
        }
    }

    /// Task `d`'s outcome, moved out by its last use.
    fn take(&mut self, d: u32) -> Outcome {
        let uses = &mut self.uses[d as usize];
        uses.remaining -= 1;
        let last = uses.remaining == 0;
        if uses.slot != NO_SLOT {
            let slot = uses.slot;
            let value = if last {
                uses.slot = NO_SLOT;
                self.free.push(slot);
                self.values[slot as usize].take()
            } else {
                self.values[slot as usize].clone()
            };
            return Ok(value.expect("a slot in use holds a value"));
        }
        let failure = if last {
            self.failures.remove(&d)
        } else {
            self.failures.get(&d).cloned()
        };
        Err(failure.expect("a dependency runs before its dependents"))
    }
}

impl Drop for Outcomes<'_> {
    fn drop(&mut self) {
        if self.free.len() == self.values.len() {
            return; // every value was taken (a run that was not cancelled)
        }
        for (task, uses) in self.uses.iter().enumerate() {
            if uses.slot != NO_SLOT {
                let value = self.values[uses.slot as usize].take();
                drop_quietly(
                    value,
                    format_args!("the value of task {}", self.plan.label(task as u32)),
                );
            }
        }
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

    /// A value that counts the live ones of its kind.
    struct Counted(i64, Arc<AtomicUsize>);
    impl serde::Serialize for Counted {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.0.serialize(s)
        }
    }
    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Adds its inputs' numbers and `constant`; records the most values
    /// alive while it runs.
    struct CountedSum {
        constant: i64,
        live: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    }
    impl Op for CountedSum {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            let live = self.live.load(Ordering::SeqCst);
            self.most.fetch_max(live, Ordering::SeqCst);
            let mut total = self.constant;
            for v in inputs.iter_mut() {
                total += v.take().unwrap().downcast_ref::<Counted>().unwrap().0;
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(Counted(total, self.live.clone())))
        }
        fn name(&self) -> &str {
            "counted sum"
        }
    }

    #[test]
    fn a_tree_keeps_about_its_depth_of_values_and_frees_them_all() {
        // 64 leaves summed pairwise, in post-order: slots are reused, so at
        // most one value per level waits (plus the pair being added).
        let live = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut b = PlanBuilder::new();
        let mut next_key = 0u32;
        let mut push = |b: &mut PlanBuilder, constant: i64, deps: &[u32]| {
            next_key += 1;
            let mut key = [0; 32];
            key[..4].copy_from_slice(&next_key.to_le_bytes());
            let op = Arc::new(CountedSum {
                constant,
                live: live.clone(),
                most: most.clone(),
            });
            b.push(Key(key), op, deps)
        };
        fn tree(
            b: &mut PlanBuilder,
            push: &mut dyn FnMut(&mut PlanBuilder, i64, &[u32]) -> u32,
            lo: i64,
            hi: i64,
        ) -> u32 {
            if hi - lo == 1 {
                return push(b, lo, &[]);
            }
            let mid = (lo + hi) / 2;
            let l = tree(b, push, lo, mid);
            let r = tree(b, push, mid, hi);
            push(b, 0, &[l, r])
        }
        let root = tree(&mut b, &mut push, 0, 64);
        b.output(root);
        struct Sums(Mutex<Vec<i64>>);
        impl Reporter for Sums {
            fn output(&self, _: usize, outcome: Outcome) {
                let v = outcome.unwrap();
                self.0
                    .lock()
                    .unwrap()
                    .push(v.downcast_ref::<Counted>().unwrap().0);
            }
        }
        let sums = Arc::new(Sums(Mutex::new(Vec::new())));
        Synchronous.submit(Arc::new(b.build()), sums.clone());
        assert_eq!(*sums.0.lock().unwrap(), vec![(0..64).sum::<i64>()]);
        // Depth 6: at most one waiting value per level.
        assert!(
            most.load(Ordering::SeqCst) <= 7,
            "{most:?} values alive at once"
        );
        assert_eq!(live.load(Ordering::SeqCst), 0, "every value was freed");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Values reuse slots as they are freed: whatever the plan's shape,
        /// every task gets its own inputs' values, not another's left in a
        /// reused slot. Checked against a direct evaluation.
        #[test]
        fn every_task_gets_its_own_inputs(
            tasks in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..4),
                 0i64..1000,
                 proptest::prelude::any::<bool>()),
                1..40,
            ),
            outputs in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 1..6),
        ) {
            let mut b = PlanBuilder::new();
            let mut expected: Vec<Result<i64, ()>> = Vec::new();
            for (i, (deps, constant, fail)) in tasks.iter().enumerate() {
                let deps: Vec<u32> = if i == 0 {
                    Vec::new()
                } else {
                    deps.iter().map(|d| d.index(i) as u32).collect()
                };
                let mut total = Ok(*constant);
                for &d in &deps {
                    total = match (total, expected[d as usize]) {
                        (Ok(t), Ok(v)) => Ok(t + v),
                        _ => Err(()),
                    };
                }
                // A failing task fails only when its inputs did not.
                let fail = *fail && i % 3 == 0;
                if fail && total.is_ok() {
                    total = Err(());
                }
                expected.push(total);
                let mut key = [0; 32];
                key[..4].copy_from_slice(&(i as u32).to_le_bytes());
                b.push(Key(key), op(*constant, fail), &deps);
            }
            let mut want = Vec::new();
            for (slot, o) in outputs.iter().enumerate() {
                let t = o.index(tasks.len());
                b.output(t as u32);
                want.push((slot, t));
            }
            let log = Arc::new(Log::default());
            Synchronous.submit(Arc::new(b.build()), log.clone());
            let mut got = log.0.lock().unwrap().clone();
            got.sort_by_key(|(slot, _)| *slot);
            let want: Vec<_> = want
                .into_iter()
                .map(|(slot, t)| (slot, expected[t].map_err(|()| FailureKind::Panicked)))
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    /// Dropping rule 1: a value whose `Drop` panics is dropped quietly
    /// wherever the executor lets it go (the panic came out of `submit`).
    #[test]
    fn a_value_whose_drop_panics_is_dropped_quietly() {
        crate::dropping::scenarios::dropped_quietly(&Synchronous);
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
