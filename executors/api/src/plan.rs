//! The lowered, frozen form of a graph that executors run.
//!
//! Invariants, established by [`PlanBuilder`] and relied on by every executor:
//!
//! 1. Tasks are topologically sorted: every dependency index is smaller than
//!    the index of the task that uses it. A plan therefore has no cycle.
//! 2. Plan order is also the preferred execution order: the lowering emits a
//!    depth-first post-order, so running tasks by increasing index finishes a
//!    branch before starting the next one.
//! 3. `consumers(i)` counts every use of task `i`: once per dependent edge and
//!    once per output slot naming it. An executor frees a value when that
//!    count reaches zero.
//! 4. `key(i)` is the key given to [`PlanBuilder::push`] for task `i`. The
//!    plan keeps a copy only of the keys their ops do not tell
//!    ([`Op::key`]): a task entry is 24 bytes, where a key alone is 32.

use std::sync::Arc;

use crate::{Failure, FailureKind, Key, Op, OpError};

/// One task of a [`Plan`]: its op and where its inputs are listed. Its
/// key is the plan's to tell ([`Plan::key`]): most ops know it themselves
/// ([`Op::key`]), so a task entry holds no copy of it.
#[derive(Clone)]
pub struct PlanTask {
    /// The work to do.
    pub op: Arc<dyn Op>,
    deps: (u32, u32),
}

impl std::fmt::Debug for PlanTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op.key() {
            Some(key) => write!(f, "{}-{}", self.op.name(), key.short()),
            None => f.write_str(self.op.name()),
        }
    }
}

/// A frozen, topologically sorted list of tasks and the outputs wanted from it.
///
/// Build one with [`PlanBuilder`].
///
/// # Examples
///
/// ```
/// use rask_executor::{Key, Op, OpError, PlanBuilder, Value};
/// use std::sync::Arc;
///
/// struct Const(i64);
/// impl Op for Const {
///     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
///         Ok(Arc::new(self.0))
///     }
///     fn name(&self) -> &str { "const" }
/// }
///
/// let mut b = PlanBuilder::new();
/// let a = b.push(Key([1; 32]), Arc::new(Const(1)), &[]);
/// b.output(a);
/// let plan = b.build();
/// assert_eq!(plan.len(), 1);
/// assert_eq!(plan.outputs(), &[a]);
/// // `Const` does not tell its key (`Op::key`): the plan kept a copy.
/// assert_eq!(plan.key(a), &Key([1; 32]));
/// ```
#[derive(Debug, Default)]
pub struct Plan {
    tasks: Vec<PlanTask>,
    /// The keys of the tasks whose op does not tell it (invariant 4),
    /// `(task, key)` sorted by task.
    keys: Vec<(u32, Key)>,
    deps: Vec<u32>,
    /// Made on first use: an executor running tasks in plan order (the
    /// synchronous one) never needs them, and they cost 8 bytes a task.
    dependents: std::sync::OnceLock<Dependents>,
    consumers: Vec<u32>,
    outputs: Vec<u32>,
    /// `(task, output index)` sorted by task.
    output_slots: Vec<(u32, u32)>,
}

impl Plan {
    /// Number of tasks.
    #[inline]
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the plan has no task.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Task number `i`.
    #[inline]
    pub fn task(&self, i: u32) -> &PlanTask {
        &self.tasks[i as usize]
    }

    /// All tasks in plan order.
    #[inline]
    pub fn tasks(&self) -> &[PlanTask] {
        &self.tasks
    }

    /// Task `i`'s content key: the one it was pushed with (invariant 4).
    ///
    /// # Panics
    ///
    /// When task `i`'s op told its key when the task was pushed and tells
    /// none now, against [`Op::key`]'s contract (a bug in that op).
    #[inline]
    pub fn key(&self, i: u32) -> &Key {
        if !self.keys.is_empty() {
            if let Ok(at) = self.keys.binary_search_by_key(&i, |&(task, _)| task) {
                return &self.keys[at].1;
            }
        }
        self.key_told(i)
    }

    /// Every task's key, in plan order: [`key`](Plan::key) of `0`, `1`, …
    /// (and panics as it does).
    pub fn keys(&self) -> impl Iterator<Item = &Key> + '_ {
        let mut kept = self.keys.iter().peekable();
        (0..self.len() as u32).map(move |i| match kept.next_if(|&&(task, _)| task == i) {
            Some((_, key)) => key,
            None => self.key_told(i),
        })
    }

    /// The key task `i`'s op tells, which is its key when the plan keeps
    /// none for it.
    fn key_told(&self, i: u32) -> &Key {
        let op = &self.tasks[i as usize].op;
        op.key()
            .unwrap_or_else(|| panic!("op `{}` stopped telling its key", op.name()))
    }

    /// Turns an op's error into a named [`Failure`] of task `i` (or of the
    /// inner task the error names as its origin).
    pub fn failure(&self, i: u32, mut err: OpError) -> Failure {
        let (key, name) = match err.origin.take() {
            Some((key, name)) => (key, name),
            None => (*self.key(i), self.task(i).op.name().into()),
        };
        Failure::from_op(key, name, err)
    }

    /// A failure of kind `Failed` of task `i`, for what went wrong around
    /// it rather than in its op (e.g. it cannot travel).
    pub fn failed(&self, i: u32, message: String) -> Failure {
        self.failure_as(i, FailureKind::Failed, message)
    }

    /// A failure of task `i` of kind `kind`, under its key and name.
    pub fn failure_as(&self, i: u32, kind: FailureKind, message: String) -> Failure {
        Failure::new(*self.key(i), self.task(i).op.name().into(), kind, message)
    }

    /// Dependencies of task `i`, in argument order.
    #[inline]
    pub fn deps(&self, i: u32) -> &[u32] {
        let (start, end) = self.tasks[i as usize].deps;
        &self.deps[start as usize..end as usize]
    }

    /// Tasks that depend on task `i` (one entry per edge).
    ///
    /// # Complexity
    ///
    /// O(1); the first call on a plan makes the index of every task's
    /// dependents, O(tasks + edges).
    #[inline]
    pub fn dependents(&self, i: u32) -> &[u32] {
        let index = self
            .dependents
            .get_or_init(|| Dependents::of(&self.tasks, &self.deps));
        let i = i as usize;
        let (start, end) = (index.offsets[i], index.offsets[i + 1]);
        &index.tasks[start as usize..end as usize]
    }

    /// How many times task `i`'s value is consumed: dependent edges plus
    /// output slots (invariant 3).
    #[inline]
    pub fn consumers(&self, i: u32) -> u32 {
        self.consumers[i as usize]
    }

    /// The task behind each output slot.
    #[inline]
    pub fn outputs(&self) -> &[u32] {
        &self.outputs
    }

    /// The output slots filled by task `i`.
    pub fn output_slots_of(&self, i: u32) -> impl Iterator<Item = usize> + '_ {
        let start = self.output_slots.partition_point(|&(t, _)| t < i);
        self.output_slots[start..]
            .iter()
            .take_while(move |&&(t, _)| t == i)
            .map(|&(_, slot)| slot as usize)
    }

    /// A failure of kind `Cancelled` for output slot `slot`.
    pub fn cancelled_output(&self, slot: usize) -> Arc<Failure> {
        Arc::new(self.failure_as(
            self.outputs[slot],
            FailureKind::Cancelled,
            "the computation was cancelled".into(),
        ))
    }
}

/// The dependents of every task of a plan, by task: task `i`'s are
/// `tasks[offsets[i]..offsets[i + 1]]`, one entry per edge, in plan order.
#[derive(Debug, Default)]
struct Dependents {
    tasks: Vec<u32>,
    offsets: Vec<u32>,
}

impl Dependents {
    /// O(tasks + edges).
    fn of(tasks: &[PlanTask], deps: &[u32]) -> Dependents {
        let n = tasks.len();
        let mut offsets = vec![0u32; n + 1];
        for &d in deps {
            offsets[d as usize + 1] += 1;
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        // Each task's start serves as its fill cursor, and ends at the next
        // task's start: shifted back by one afterwards (no second array).
        let mut dependents = vec![0u32; deps.len()];
        for (i, task) in tasks.iter().enumerate() {
            let (start, end) = task.deps;
            for &d in &deps[start as usize..end as usize] {
                let at = &mut offsets[d as usize];
                dependents[*at as usize] = i as u32;
                *at += 1;
            }
        }
        offsets.copy_within(0..n, 1);
        offsets[0] = 0;
        Dependents {
            tasks: dependents,
            offsets,
        }
    }
}

/// Builds a [`Plan`] one task at a time; a task may only depend on tasks pushed
/// before it, which makes cycles impossible.
#[derive(Default)]
pub struct PlanBuilder {
    tasks: Vec<PlanTask>,
    keys: Vec<(u32, Key)>,
    deps: Vec<u32>,
    outputs: Vec<u32>,
}

impl PlanBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder with room for `tasks` tasks.
    pub fn with_capacity(tasks: usize) -> Self {
        PlanBuilder {
            tasks: Vec::with_capacity(tasks),
            keys: Vec::new(),
            deps: Vec::with_capacity(tasks * 2),
            outputs: Vec::new(),
        }
    }

    /// Number of tasks pushed so far.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Appends a task and returns its index.
    ///
    /// # Panics
    ///
    /// Panics if a dependency index does not name an earlier task: that is a
    /// bug in the lowering, not a user error.
    pub fn push(&mut self, key: Key, op: Arc<dyn Op>, deps: &[u32]) -> u32 {
        let index = u32::try_from(self.tasks.len()).expect("a plan holds at most 2^32 tasks");
        assert!(
            deps.iter().all(|&d| d < index),
            "plan dependencies must point to earlier tasks"
        );
        let start = self.deps.len() as u32;
        self.deps.extend_from_slice(deps);
        let end = self.deps.len() as u32;
        if op.key() != Some(&key) {
            self.keys.push((index, key));
        }
        self.tasks.push(PlanTask {
            op,
            deps: (start, end),
        });
        index
    }

    /// Asks for task `task`'s value; returns the output slot number.
    pub fn output(&mut self, task: u32) -> usize {
        assert!((task as usize) < self.tasks.len(), "output names no task");
        self.outputs.push(task);
        self.outputs.len() - 1
    }

    /// Freezes the plan, computing consumer counts (dependents are
    /// indexed on first use, see [`Plan::dependents`]).
    ///
    /// # Complexity
    ///
    /// O(tasks + edges).
    pub fn build(self) -> Plan {
        let n = self.tasks.len();
        let mut consumers = vec![0u32; n];
        for &d in &self.deps {
            consumers[d as usize] += 1;
        }
        let mut output_slots: Vec<(u32, u32)> = self
            .outputs
            .iter()
            .enumerate()
            .map(|(slot, &t)| (t, slot as u32))
            .collect();
        output_slots.sort_unstable();
        for &t in &self.outputs {
            consumers[t as usize] += 1;
        }
        Plan {
            tasks: self.tasks,
            keys: self.keys,
            deps: self.deps,
            dependents: std::sync::OnceLock::new(),
            consumers,
            outputs: self.outputs,
            output_slots,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    struct Nop;
    impl Op for Nop {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(()))
        }
        fn name(&self) -> &str {
            "nop"
        }
    }

    #[test]
    fn build_computes_dependents_and_consumers() {
        let mut b = PlanBuilder::new();
        let a = b.push(Key([0; 32]), Arc::new(Nop), &[]);
        let c = b.push(Key([1; 32]), Arc::new(Nop), &[a, a]);
        let d = b.push(Key([2; 32]), Arc::new(Nop), &[a, c]);
        b.output(d);
        b.output(a);
        let plan = b.build();
        assert_eq!(plan.deps(c), &[a, a]);
        assert_eq!(plan.dependents(a), &[c, c, d]);
        assert_eq!(plan.dependents(c), &[d]);
        assert_eq!(plan.consumers(a), 4);
        assert_eq!(plan.consumers(d), 1);
        assert_eq!(plan.output_slots_of(a).collect::<Vec<_>>(), vec![1]);
        assert_eq!(plan.output_slots_of(d).collect::<Vec<_>>(), vec![0]);
        assert_eq!(plan.output_slots_of(c).count(), 0);
    }

    /// An op that tells a key of its own (`Some`), or none.
    struct Telling(Option<Key>);
    impl Op for Telling {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(()))
        }
        fn name(&self) -> &str {
            "telling"
        }
        fn key(&self) -> Option<&Key> {
            self.0.as_ref()
        }
    }

    proptest::proptest! {
        /// Invariant 4: whatever its op tells (the same key, another one,
        /// or none), a task's key is the one it was pushed with, by index
        /// and in `keys()`; a copy is kept only where the op does not tell
        /// that key.
        #[test]
        fn a_task_keeps_the_key_it_was_pushed_with(
            tasks in proptest::collection::vec((0u8..8, 0u8..3), 0..40)
        ) {
            let mut b = PlanBuilder::new();
            let mut pushed = Vec::new();
            let mut told_otherwise = 0;
            for &(key, told) in &tasks {
                let key = Key([key; 32]);
                let op = match told {
                    0 => Telling(Some(key)),
                    1 => Telling(Some(Key([key.0[0] ^ 0x80; 32]))),
                    _ => Telling(None),
                };
                told_otherwise += usize::from(told != 0);
                b.push(key, Arc::new(op), &[]);
                pushed.push(key);
            }
            let plan = b.build();
            for (i, key) in pushed.iter().enumerate() {
                proptest::prop_assert_eq!(plan.key(i as u32), key);
            }
            proptest::prop_assert_eq!(plan.keys().copied().collect::<Vec<_>>(), pushed);
            proptest::prop_assert_eq!(plan.keys.len(), told_otherwise);
        }
    }

    #[test]
    fn failures_name_the_pushed_key_not_the_one_the_op_tells() {
        let mut b = PlanBuilder::new();
        let t = b.push(Key([1; 32]), Arc::new(Telling(Some(Key([2; 32])))), &[]);
        b.output(t);
        let plan = b.build();
        assert_eq!(plan.failed(t, "lost".into()).key, Key([1; 32]));
        assert_eq!(plan.failure(t, OpError::failed("bad")).key, Key([1; 32]));
        assert_eq!(plan.cancelled_output(0).key, Key([1; 32]));
    }

    #[test]
    #[should_panic(expected = "earlier tasks")]
    fn forward_dependency_is_rejected() {
        let mut b = PlanBuilder::new();
        b.push(Key([0; 32]), Arc::new(Nop), &[3]);
    }
}
