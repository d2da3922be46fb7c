//! Pass 3, fuse: merge linear chains; and [`Fused`], the op that runs a
//! group of folded tasks as one plan task.
//!
//! A task whose only consumer reads nothing else from outside its group is
//! folded into that consumer: `x = inc(0); x = inc(x); …` becomes one task
//! that runs every `inc` in a loop, instead of one trip through the executor
//! per `inc`. Fusing never costs parallelism: the consumer had to wait for
//! that one input anyway, and nothing else waits for it.
//!
//! # How a fused task runs
//!
//! [`Fused::build`] walks a group from its root, depth-first in argument
//! order, and records a small stack program: before each step, how many
//! external inputs to push, then the step itself, which takes its arguments
//! from the top of the stack and leaves its result there. In a post-order
//! walk of a tree, a step's arguments are exactly the top entries, in order,
//! so no step needs an index and nothing is copied: each step gets the
//! stack's top slots as its `&mut [Option<Value>]`, just as an executor would
//! pass them. The stack's size is known when the op is built; up to
//! [`INLINE_STACK`](crate::build::fused::INLINE_STACK) slots live on the thread's stack, so running a chain does
//! not allocate beyond what its steps do.
//!
//! # On a cluster
//!
//! A fused task travels to a worker as one wire task, `rask.fused`
//! ([`Op::to_wire`] here; `build::fused` has the wire form, its rules and
//! the op a worker resolves it to, which runs the same stack program).

use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Plan, Value, WireError, WireTask};

use super::{group_name, Draft, Folds, Weight, MAX_LISTED};
use crate::build::fused::{exec, with_stack, WireGroup, WireStep, FUSED_FUNCTION};

/// Marks, in plan order, each task whose group reads exactly one edge from
/// outside as absorbing that input's task, when the input is not pinned and
/// has no other consumer.
///
/// Taking folds from inline into account, a chain runs through inlined data
/// (`add(x, value(1))` has `x` as its only external input).
///
/// # Complexity
///
/// O(tasks + edges) time, five bytes per task. Each task is looked at once:
/// when a task absorbs its input, that input's own chain was already
/// absorbed into it, so a chain of any length costs one step per task.
pub(crate) fn fuse(draft: &Draft, mut folds: Folds) -> Folds {
    let n = draft.len();
    // Per group root: how many edges it reads from outside its group
    // (0, 1, or 2 for "more"), and for exactly one, the task it reads.
    let mut reads = vec![0u8; n];
    let mut source = vec![u32::MAX; n];
    for c in 0..n as u32 {
        let mut count = 0u8;
        let mut one = u32::MAX;
        for &d in draft.deps(c) {
            if folds.folded(d) {
                let r = reads[d as usize];
                if r == 1 {
                    one = source[d as usize];
                }
                count = count.saturating_add(r).min(2);
            } else {
                one = d;
                count = count.saturating_add(1).min(2);
            }
        }
        if count == 1 && Folds::can_absorb(draft, c) && folds.can_fold(draft, one) {
            folds.fold(one);
            count = reads[one as usize];
            one = source[one as usize];
        }
        reads[c as usize] = count;
        source[c as usize] = one;
    }
    folds
}

/// One step of a fused task: a task of the lowered plan, which the fused
/// task shares.
struct Step {
    /// Index of the task in the lowered plan.
    task: u32,
    /// External inputs to push before this step runs.
    pushes: u32,
    /// Arguments it takes from the top of the stack.
    args: u32,
}

/// A group of tasks run as one plan task, in the order [`Fused::build`]
/// recorded (module docs). Its key is the group root's.
///
/// The steps are indices into the lowered plan, which every fused task of an
/// optimized plan shares: building a fused task copies no op and touches no
/// reference count, a step is 12 bytes, and an error finds the step's key in
/// the plan. The trade-off: when anything is fused, the lowered plan lives as
/// long as the optimized one.
pub(crate) struct Fused {
    plan: Arc<Plan>,
    name: Name,
    steps: Box<[Step]>,
    depth: usize,
}

/// A fused task's name: one step's own (when only one step is a call), or
/// built from several.
enum Name {
    Step(u32),
    Built(Box<str>),
}

/// Buffers reused across the groups of one plan.
#[derive(Default)]
pub(crate) struct Scratch {
    walk: Vec<(u32, u32)>,
    externals: Vec<u32>,
}

/// The steps that are calls, as far as naming needs them: the first few,
/// the last, and how many.
#[derive(Default)]
struct Named {
    first: [u32; MAX_LISTED],
    last: u32,
    count: usize,
}

impl Named {
    fn add(&mut self, step: u32) {
        if let Some(slot) = self.first.get_mut(self.count) {
            *slot = step;
        }
        self.last = step;
        self.count += 1;
    }
}

impl Scratch {
    /// The external inputs of the last group built, in the order its fused
    /// task takes them: its dependencies.
    pub(crate) fn externals(&self) -> &[u32] {
        &self.externals
    }
}

impl Fused {
    /// The fused op of the group rooted at `root`, of `size` tasks; its
    /// dependencies are left in [`Scratch::externals`].
    ///
    /// # Complexity
    ///
    /// O(tasks + edges of the group), one allocation for the steps (and one
    /// for the name when several steps are calls).
    pub(crate) fn build(
        draft: &Draft,
        folds: &Folds,
        root: u32,
        size: usize,
        scratch: &mut Scratch,
    ) -> Fused {
        let Scratch { walk, externals } = scratch;
        walk.clear();
        // A group is at most as deep as it is large.
        walk.reserve(size);
        externals.clear();
        let mut named = Named::default();
        let mut steps = Vec::with_capacity(size);
        let (mut pushes, mut depth, mut max_depth) = (0u32, 0usize, 0usize);
        walk.push((root, 0));
        while let Some(top) = walk.last_mut() {
            let (t, next) = *top;
            if let Some(&d) = draft.deps(t).get(next as usize) {
                top.1 += 1;
                if folds.folded(d) {
                    walk.push((d, 0));
                } else {
                    externals.push(d);
                    pushes += 1;
                    depth += 1;
                    max_depth = max_depth.max(depth);
                }
                continue;
            }
            walk.pop();
            // The arguments are the top `args` entries; the result replaces
            // them.
            let args = draft.deps(t).len();
            depth = depth + 1 - args;
            max_depth = max_depth.max(depth);
            if draft.weight(t) != Weight::Data {
                named.add(steps.len() as u32);
            }
            steps.push(Step {
                task: t,
                pushes,
                args: args as u32,
            });
            pushes = 0;
        }
        debug_assert_eq!(steps.len(), size, "group size");
        Fused {
            plan: draft.shared_plan().clone(),
            name: name_of(draft, &steps, &named),
            steps: steps.into_boxed_slice(),
            depth: max_depth,
        }
    }

    fn exec(
        &self,
        inputs: &mut [Option<Value>],
        stack: &mut [Option<Value>],
    ) -> Result<Value, OpError> {
        let steps = self
            .steps
            .iter()
            .map(|step| (step.pushes, step.args, self.plan.task(step.task).op()));
        let key_of = |step: usize| *self.plan.key(self.steps[step].task);
        exec(steps, key_of, inputs, stack)
    }

    /// The wire form of step `step`, for [`Op::to_wire`].
    fn wire_step(&self, step: &Step) -> Result<WireStep, WireError> {
        let task = self.plan.task(step.task);
        let WireTask { function, payload } = task.op().to_wire()?;
        Ok(WireStep {
            key: self.plan.key(step.task).0,
            name: task.op().name().to_owned(),
            function,
            payload,
            pushes: step.pushes,
            args: step.args,
        })
    }
}

impl Op for Fused {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        with_stack(self.depth, |stack| self.exec(inputs, stack))
    }

    /// `rask.fused` (`build::fused`): every step's own wire task, key and
    /// name, and the stack program.
    fn to_wire(&self) -> Result<WireTask, WireError> {
        let group = WireGroup {
            name: self.name().to_owned(),
            steps: self
                .steps
                .iter()
                .map(|step| self.wire_step(step))
                .collect::<Result<_, _>>()?,
        };
        let payload = postcard::to_stdvec(&group).map_err(|e| WireError::Encode {
            what: "a fused task".into(),
            reason: e.to_string(),
        })?;
        Ok(WireTask {
            function: FUSED_FUNCTION.to_owned(),
            payload,
        })
    }

    fn name(&self) -> &str {
        match &self.name {
            Name::Step(i) => self.plan.task(self.steps[*i as usize].task).op().name(),
            Name::Built(name) => name,
        }
    }

    /// The group root's, the last step (invariant 1): an optimized plan
    /// then keeps no copy of it.
    fn key(&self) -> Option<&Key> {
        self.steps.last().map(|root| self.plan.key(root.task))
    }
}

/// `a+b+c` for the steps that are calls (data steps are not named: a task
/// with a value folded in keeps its own name), `a…z(n)` when there are many.
fn name_of(draft: &Draft, steps: &[Step], named: &Named) -> Name {
    let name = |i: u32| draft.op(steps[i as usize].task).name();
    match named.count {
        0 => Name::Step(steps.len().saturating_sub(1) as u32),
        1 => Name::Step(named.last),
        n => {
            let listed: Vec<&str> = named.first[..n.min(MAX_LISTED)]
                .iter()
                .map(|&i| name(i))
                .collect();
            Name::Built(group_name(n, &listed, name(named.last)).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use rask_executor::{FailureKind, Key};

    use super::super::testing::{draft, key, names, run, Does::*, Spec, D, N};
    use super::super::{assemble, inline::inline, optimize, Options};
    use super::*;
    use crate::build::fused::resolve;

    fn fused(tasks: &[Spec<'_>], outputs: &[u32], keep: &[Key]) -> Arc<Plan> {
        let d = draft(tasks, outputs);
        let keep = keep.iter().copied().collect();
        let folds = fuse(&d, Folds::new(&d, &keep));
        assemble(d, &folds, false).plan
    }

    fn unoptimized(tasks: &[Spec<'_>], outputs: &[u32]) -> Arc<Plan> {
        optimize(draft(tasks, outputs), &Options::none())
    }

    #[test]
    fn a_chain_becomes_one_task_with_the_last_key() {
        let tasks: &[Spec<'_>] = &[
            ("a", N, Sum(1), &[]),
            ("b", N, Sum(1), &[0]),
            ("c", N, Sum(1), &[1]),
        ];
        let plan = fused(tasks, &[2], &[]);
        assert_eq!(names(&plan), vec!["a+b+c"]);
        assert_eq!(*plan.key(0), key(2));
        assert_eq!(run(plan), vec![Ok(3)]);
    }

    #[test]
    fn long_chains_get_a_short_name() {
        let deps: Vec<[u32; 1]> = (0..100).map(|i| [i]).collect();
        let mut tasks: Vec<Spec<'_>> = vec![("inc", N, Sum(1), &[])];
        tasks.extend(deps.iter().take(99).map(|d| ("inc", N, Sum(1), &d[..])));
        let plan = fused(&tasks, &[99], &[]);
        assert_eq!(names(&plan), vec!["inc…inc(100)"]);
        assert_eq!(run(plan), vec![Ok(100)]);
    }

    #[test]
    fn chains_stop_at_shared_pinned_and_multi_input_tasks() {
        let tasks: &[Spec<'_>] = &[
            ("x", N, Sum(1), &[]),     // 0: two consumers
            ("l", N, Sum(1), &[0]),    // 1
            ("r", N, Sum(2), &[0]),    // 2
            ("j", N, Sum(0), &[1, 2]), // 3: two inputs
            ("p", N, Sum(1), &[3]),    // 4: an output
            ("q", N, Sum(1), &[4]),    // 5
            ("k", N, Sum(1), &[5]),    // 6: kept
            ("s", N, Sum(1), &[6]),    // 7
        ];
        let plan = fused(tasks, &[7, 4], &[key(6)]);
        // j absorbs its chain into p (j has one consumer, p one input);
        // l and r each read x, which has two consumers.
        assert_eq!(names(&plan), vec!["x", "l", "r", "j+p", "q+k", "s"]);
        assert_eq!(run(plan), run(unoptimized(tasks, &[7, 4])));
    }

    #[test]
    fn a_chain_head_keeps_its_inputs_in_order() {
        let tasks: &[Spec<'_>] = &[
            ("x", N, Sum(1), &[]),
            ("y", N, Sum(10), &[]),
            ("h", N, Sum(0), &[1, 0, 1]),
            ("t", N, Sum(100), &[2]),
        ];
        let plan = fused(tasks, &[3], &[]);
        assert_eq!(names(&plan), vec!["x", "y", "h+t"]);
        assert_eq!(plan.deps(2), &[1, 0, 1]);
        assert_eq!(run(plan), vec![Ok(121)]);
    }

    #[test]
    fn chains_run_through_inlined_data() {
        let tasks: &[Spec<'_>] = &[
            ("a", N, Sum(1), &[]),
            ("v", D, Sum(10), &[]),
            ("add", N, Sum(0), &[1, 0]),
            ("inc", N, Sum(1), &[2]),
        ];
        let d = draft(tasks, &[3]);
        let folds = Folds::new(&d, &Default::default());
        let folds = fuse(&d, inline(&d, folds));
        let plan = assemble(d, &folds, false).plan;
        assert_eq!(names(&plan), vec!["a+add+inc"]);
        assert_eq!(run(plan), vec![Ok(12)]);
    }

    #[test]
    fn errors_and_panics_name_the_inner_task() {
        for (does, kind) in [(Fail, FailureKind::Failed), (Panic, FailureKind::Panicked)] {
            let tasks: &[Spec<'_>] = &[
                ("a", N, Sum(1), &[]),
                ("bad", N, does, &[0]),
                ("c", N, Sum(1), &[1]),
            ];
            let plan = fused(tasks, &[2], &[]);
            assert_eq!(plan.len(), 1);
            let got = run(plan);
            assert_eq!(got, vec![Err((key(1), "bad".to_owned(), kind))]);
            assert_eq!(got, run(unoptimized(tasks, &[2])));
        }
    }

    #[test]
    fn deep_groups_use_a_heap_stack() {
        let leaves: Vec<u32> = (0..12).collect();
        let mut tasks: Vec<Spec<'_>> = (0..12).map(|_| ("v", D, Sum(1), &[][..])).collect();
        tasks.push(("sum", N, Sum(0), &leaves[..]));
        tasks.push(("inc", N, Sum(1), &[12]));
        let d = draft(&tasks, &[13]);
        let folds = fuse(&d, inline(&d, Folds::new(&d, &Default::default())));
        let plan = assemble(d, &folds, false).plan;
        assert_eq!(names(&plan), vec!["sum+inc"]);
        assert_eq!(run(plan), vec![Ok(13)]);
    }

    /// Every task of `plan` as another process receives it: through its
    /// wire form, resolved by the test registry.
    fn received(plan: &Plan) -> Arc<Plan> {
        let mut b = rask_executor::PlanBuilder::new();
        for (i, task) in plan.tasks().iter().enumerate() {
            let wire = task.op().to_wire().unwrap();
            let op = if wire.function == FUSED_FUNCTION {
                resolve(&wire.payload, super::super::testing::resolve).unwrap()
            } else {
                super::super::testing::resolve(&wire).unwrap()
            };
            b.push(*plan.key(i as u32), op, plan.deps(i as u32));
        }
        for &o in plan.outputs() {
            b.output(o);
        }
        Arc::new(b.build())
    }

    #[test]
    fn a_fused_task_runs_the_same_from_its_wire_form() {
        for does in [Sum(5), Fail, Panic] {
            let tasks: &[Spec<'_>] = &[
                ("x", N, Sum(1), &[]),
                ("y", N, Sum(10), &[]),
                ("v", D, Sum(100), &[]),
                ("h", N, Sum(0), &[1, 0, 2, 1]),
                ("mid", N, does, &[3]),
                ("t", N, Sum(1000), &[4]),
            ];
            let d = draft(tasks, &[5]);
            let folds = fuse(&d, inline(&d, Folds::new(&d, &Default::default())));
            let plan = assemble(d, &folds, false).plan;
            assert_eq!(names(&plan), vec!["x", "y", "h+mid+t"]);
            let wired = received(&plan);
            assert_eq!(wired.task(2).op().name(), "h+mid+t");
            let want = run(unoptimized(tasks, &[5]));
            assert_eq!(run(wired), want, "{does:?}");
            if does != Sum(5) {
                assert!(matches!(&want[0], Err((k, name, _)) if *k == key(4) && name == "mid"));
            }
        }
    }

    #[test]
    fn wire_forms_that_do_not_make_a_program_are_refused() {
        let step = |pushes, args, function: &str| WireStep {
            key: [0; 32],
            name: "s".into(),
            function: function.into(),
            payload: vec![0, 1, 0, 0, 0, 0, 0, 0, 0],
            pushes,
            args,
        };
        let encode = |steps| {
            postcard::to_stdvec(&WireGroup {
                name: "g".into(),
                steps,
            })
            .unwrap()
        };
        let refused = |payload: Vec<u8>| {
            matches!(
                resolve(&payload, super::super::testing::resolve),
                Err(WireError::Decode { .. })
            )
        };
        assert!(refused(vec![0xff; 3]));
        assert!(refused(encode(vec![])), "no step");
        assert!(
            refused(encode(vec![step(1, 2, "test")])),
            "takes more than pushed"
        );
        assert!(
            refused(encode(vec![step(2, 1, "test")])),
            "leaves two values"
        );
        assert!(refused(encode(vec![step(0, 0, FUSED_FUNCTION)])), "nested");
        // A count far beyond the inputs received fails the run, without a
        // stack of that size.
        let op = resolve(
            &encode(vec![step(u32::MAX, u32::MAX, "test")]),
            super::super::testing::resolve,
        )
        .unwrap();
        let err = op.run(&mut [Some(Arc::new(1i64) as Value)]).unwrap_err();
        assert!(err.message.contains("received 1 inputs"), "{}", err.message);
        let ok = resolve(
            &encode(vec![step(1, 1, "test")]),
            super::super::testing::resolve,
        )
        .unwrap();
        let got = ok.run(&mut [Some(Arc::new(1i64) as Value)]).unwrap();
        assert_eq!(got.downcast_ref::<i64>(), Some(&2));
    }

    /// Checks that it holds the only reference to its input, then adds one.
    struct Unique;
    impl Op for Unique {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            let v = inputs[0].take().ok_or_else(|| OpError::failed("none"))?;
            let v = rask_executor::downcast::<i64>(v).map_err(|_| OpError::failed("not i64"))?;
            match Arc::try_unwrap(v) {
                Ok(x) => Ok(Arc::new(x + 1)),
                Err(_) => Err(OpError::failed("input was shared")),
            }
        }
        fn name(&self) -> &str {
            "unique"
        }
    }

    #[test]
    fn inner_values_are_moved_not_shared() {
        let mut b = rask_executor::PlanBuilder::new();
        let src = b.push(
            key(0),
            Arc::new(super::super::testing::TestOp {
                name: "src".into(),
                does: Sum(1),
            }),
            &[],
        );
        let u1 = b.push(key(1), Arc::new(Unique), &[src]);
        let u2 = b.push(key(2), Arc::new(Unique), &[u1]);
        b.output(u2);
        let d = Draft::from_plan(b.build());
        let plan = optimize(d, &Options::all());
        assert_eq!(names(&plan), vec!["src+unique+unique"]);
        assert_eq!(run(plan), vec![Ok(3)]);
    }
}
