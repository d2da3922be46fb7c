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
//! 5. A plan keeps every op alive for as long as it lives, in one of two
//!    ways: it holds the op ([`PlanBuilder::push`], a reference count per
//!    task), or it holds *keepers*, values that keep the op alive, and
//!    points at the op ([`PlanBuilder::keeping`]). A graph's nodes are
//!    kept by its roots: a plan of a million nodes holds its roots, not a
//!    million counts to raise while lowering and to lower again, node by
//!    node, when the plan is dropped.
//! 6. A plan lets go of what it holds quietly ([`drop_each_quietly`],
//!    dropping rule 5): the ops it holds and its keepers, one at a time,
//!    and a keepers' list (a graph's roots) root by root. Its ops hold
//!    the user's values (literal arguments), and its last reference goes
//!    wherever its run ends: an executor's pool thread, a cluster
//!    client's loop, a waiting thread that stepped a simulation.

// The one module of the crate with `unsafe` (the crate's `Cargo.toml`):
// each block says why it holds.
#![allow(unsafe_code)]

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::{drop_each_quietly, Failure, FailureKind, Key, Op, OpError};

/// One task of a [`Plan`]: its op and where its inputs are listed. Its
/// key is the plan's to tell ([`Plan::key`]): most ops know it themselves
/// ([`Op::key`]), so a task entry holds no copy of it.
///
/// A task lives in its plan only: it is neither cloned nor built outside
/// it, so a reference to its op never outlives the plan (invariant 5).
pub struct PlanTask {
    /// The work to do: held by the plan or by one of its keepers.
    op: NonNull<dyn Op>,
    deps: (u32, u32),
}

// SAFETY: a task only points at its op, which is `Send + Sync` (`Op`'s
// bounds), and the plan holding the task keeps that op alive (invariant
// 5) with `Arc`s of `Send + Sync` values: sending or sharing a task sends
// or shares nothing but access to such an op.
unsafe impl Send for PlanTask {}
// SAFETY: as for `Send` above.
unsafe impl Sync for PlanTask {}

impl PlanTask {
    /// The work to do.
    #[inline]
    pub fn op(&self) -> &dyn Op {
        // SAFETY: `self` lives in a plan (the type is neither cloned nor
        // built outside one), and the plan keeps the op alive as long as
        // itself (invariant 5): through `Plan::owned` for pushed ops, and
        // through `Plan::keepers` for those `PlanBuilder::keeping` lowered
        // (their references came from the keepers it handed over, by its
        // signature) or `push_task_of` copied (with the keepers of their
        // plan). The op is only read through the pointer.
        unsafe { self.op.as_ref() }
    }
}

impl std::fmt::Debug for PlanTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op().key() {
            Some(key) => write!(f, "{}-{}", self.op().name(), key.short()),
            None => f.write_str(self.op().name()),
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
#[derive(Default)]
pub struct Plan {
    /// Which plan this is, for the events of its tasks.
    id: PlanId,
    tasks: Vec<PlanTask>,
    /// The keys of the tasks whose op does not tell it (invariant 4),
    /// `(task, key)` sorted by task.
    keys: Vec<(u32, Key)>,
    /// The ops the plan holds, `(task, op)` sorted by task (invariant 5).
    owned: Vec<(u32, Arc<dyn Op>)>,
    /// What keeps the other ops alive (invariant 5).
    keepers: Arc<Keepers<Keeper>>,
    deps: Vec<u32>,
    /// Made on first use: an executor running tasks in plan order (the
    /// synchronous one) never needs them, and they cost 8 bytes a task.
    dependents: std::sync::OnceLock<Dependents>,
    consumers: Vec<u32>,
    outputs: Vec<u32>,
    /// `(task, output index)` sorted by task.
    output_slots: Vec<(u32, u32)>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("tasks", &self.tasks)
            .field("keys", &self.keys)
            .field("deps", &self.deps)
            .field("consumers", &self.consumers)
            .field("outputs", &self.outputs)
            .field("output_slots", &self.output_slots)
            .finish_non_exhaustive()
    }
}

/// A plan's identity, unique in this process: the events of its tasks carry
/// it ([`Event::plan`](crate::events::Event::plan)), so that a listener
/// tells one run of a key from another run of the same key (a progress
/// bar counts its own runs' tasks only).
///
/// Every plan [`PlanBuilder::build`] makes has an id of its own; only an
/// empty [`Plan::default`] has `PlanId::default()`.
///
/// # Examples
///
/// ```
/// use rask_executor::PlanBuilder;
///
/// let (a, b) = (PlanBuilder::new().build(), PlanBuilder::new().build());
/// assert_ne!(a.id(), b.id());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlanId(u64);

/// The last id given; 0 is `Plan::default()`'s.
static LAST_PLAN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Plan {
    /// This plan's identity (see [`PlanId`]).
    #[inline]
    pub fn id(&self) -> PlanId {
        self.id
    }

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

    /// Task `i` as log lines name it, `name-1a2b3c4d` (its op's name and
    /// its key's first eight hex digits), formatted only when shown.
    ///
    /// ```
    /// # use rask_executor::{Key, Op, OpError, PlanBuilder, Value};
    /// # use std::sync::Arc;
    /// # struct Inc;
    /// # impl Op for Inc {
    /// #     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> { Ok(Arc::new(1_i64)) }
    /// #     fn name(&self) -> &str { "inc" }
    /// # }
    /// let mut b = PlanBuilder::new();
    /// let t = b.push(Key([0xab; 32]), Arc::new(Inc), &[]);
    /// let plan = b.build();
    /// assert_eq!(plan.label(t).to_string(), "inc-abababab");
    /// ```
    pub fn label(&self, i: u32) -> impl fmt::Display + '_ {
        struct Label<'a>(&'a Plan, u32);
        impl fmt::Display for Label<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let (plan, i) = (self.0, self.1);
                write!(f, "{}-{}", plan.task(i).op().name(), plan.key(i).short())
            }
        }
        Label(self, i)
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
        let op = self.tasks[i as usize].op();
        op.key()
            .unwrap_or_else(|| panic!("op `{}` stopped telling its key", op.name()))
    }

    /// Task `i`'s op when the plan holds it itself (invariant 5).
    fn owned_op(&self, i: u32) -> Option<&Arc<dyn Op>> {
        let at = self
            .owned
            .binary_search_by_key(&i, |&(task, _)| task)
            .ok()?;
        Some(&self.owned[at].1)
    }

    /// Turns an op's error into a named [`Failure`] of task `i` (or of the
    /// inner task the error names as its origin).
    pub fn failure(&self, i: u32, mut err: OpError) -> Failure {
        let (key, name) = match err.origin.take() {
            Some((key, name)) => (key, name),
            None => (*self.key(i), self.task(i).op().name().into()),
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
        Failure::new(*self.key(i), self.task(i).op().name().into(), kind, message)
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

/// A value that keeps some of a plan's ops alive (invariant 5).
type Keeper = Arc<dyn Any + Send + Sync>;

/// What a plan's drop names in the warning of a `Drop` that panicked
/// (invariant 6). Never the task: its op, which tells its name, is gone.
const LET_GO: &str = "an op of a plan let go (a task with the arguments it held)";

impl Drop for Plan {
    /// Lets go of the ops the plan holds, quietly (invariant 6); its
    /// keepers go the same way, with the last plan that holds them.
    fn drop(&mut self) {
        drop_each_quietly(self.owned.drain(..), LET_GO);
    }
}

/// Values kept for a plan's ops (invariant 5), let go one at a time,
/// quietly (invariant 6): a plan's list of keepers, and the list of
/// values [`PlanBuilder::keeping`] was given (a graph's roots).
struct Keepers<T>(Vec<T>);

impl<T> Default for Keepers<T> {
    fn default() -> Self {
        Keepers(Vec::new())
    }
}

impl<T> Drop for Keepers<T> {
    fn drop(&mut self) {
        drop_each_quietly(self.0.drain(..), LET_GO);
    }
}

/// The builder inside [`PlanBuilder::keeping`]: pushes ops reached from
/// the keepers by reference, and any other op as [`PlanBuilder::push`]
/// does.
pub struct Kept<'a, 'b> {
    builder: &'b mut PlanBuilder,
    /// `'a` is the lifetime of the keepers' loan: invariant, so that no
    /// reference of a shorter life passes for one of theirs.
    _keepers: PhantomData<fn(&'a ()) -> &'a ()>,
}

impl<'a> Kept<'a, '_> {
    /// Appends a task whose op lives in the keepers (or for ever), and
    /// returns its index.
    ///
    /// # Panics
    ///
    /// As [`PlanBuilder::push`].
    pub fn push(&mut self, key: Key, op: &'a dyn Op, deps: &[u32]) -> u32 {
        // `op` lives as long as the keepers, which the plan holds
        // (invariant 5): `PlanBuilder::keeping` hands them over.
        self.builder.append(key, erase(op), deps)
    }

    /// Appends a task holding `op`, as [`PlanBuilder::push`].
    pub fn push_owned(&mut self, key: Key, op: Arc<dyn Op>, deps: &[u32]) -> u32 {
        self.builder.push(key, op, deps)
    }
}

/// `op` with the lifetime of its borrow and of its trait object erased:
/// what a [`PlanTask`] stores. Reading it back is `PlanTask::op`'s
/// business (invariant 5).
fn erase<'a>(op: &'a (dyn Op + 'a)) -> NonNull<dyn Op> {
    let op: NonNull<dyn Op + 'a> = NonNull::from(op);
    // SAFETY: a transmute between fat pointers to the same trait object,
    // which differ only in the lifetime bound of the object: same layout,
    // same vtable. The pointer is only read as long as the plan keeps the
    // op alive (invariant 5).
    unsafe { std::mem::transmute::<NonNull<dyn Op + 'a>, NonNull<dyn Op>>(op) }
}

/// Builds a [`Plan`] one task at a time; a task may only depend on tasks pushed
/// before it, which makes cycles impossible.
#[derive(Default)]
pub struct PlanBuilder {
    tasks: Vec<PlanTask>,
    keys: Vec<(u32, Key)>,
    owned: Vec<(u32, Arc<dyn Op>)>,
    keepers: Vec<Keeper>,
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
            deps: Vec::with_capacity(tasks * 2),
            ..PlanBuilder::default()
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
        // The plan holds `op` (invariant 5).
        let pointer = NonNull::from(&*op);
        let index = self.append(key, pointer, deps);
        self.owned.push((index, op));
        index
    }

    /// Lowers a structure of ops into this builder without a reference
    /// count per task: `keepers` (a graph's roots, say) are handed to
    /// `lower` by reference, and every op it reaches from them may be
    /// pushed by reference ([`Kept::push`]). The plan holds `keepers`, which
    /// keep those ops alive (invariant 5): a plan of a million nodes then
    /// holds its roots, not a million counts raised here and lowered again,
    /// node by node, when the plan is dropped.
    ///
    /// `lower` works for any lifetime `'a`, so an op it pushes by
    /// reference can only come from `keepers` (or live for ever): the
    /// compiler rejects a reference to anything else.
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
    /// // Two ops that one value holds.
    /// let both = Arc::new([Const(1), Const(2)]);
    /// let mut b = PlanBuilder::new();
    /// let last = b.keeping(vec![both], |kept, b| {
    ///     let [one, two] = &*kept[0];
    ///     b.push(Key([1; 32]), one, &[]);
    ///     b.push(Key([2; 32]), two, &[])
    /// });
    /// b.output(last);
    /// let plan = b.build();
    /// assert_eq!(plan.task(last).op().name(), "const");
    /// ```
    ///
    /// An op that the keepers do not hold cannot be pushed by reference:
    ///
    /// ```compile_fail
    /// # use rask_executor::{Key, Op, OpError, PlanBuilder, Value};
    /// # use std::sync::Arc;
    /// # struct Const(i64);
    /// # impl Op for Const {
    /// #     fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
    /// #         Ok(Arc::new(self.0))
    /// #     }
    /// #     fn name(&self) -> &str { "const" }
    /// # }
    /// let mut b = PlanBuilder::new();
    /// let local = Const(3);
    /// b.keeping(vec![Arc::new(Const(1))], |_, b| b.push(Key([3; 32]), &local, &[]));
    /// ```
    pub fn keeping<T, R>(
        &mut self,
        keepers: Vec<Arc<T>>,
        lower: impl for<'a> FnOnce(&'a [Arc<T>], &mut Kept<'a, '_>) -> R,
    ) -> R
    where
        T: Any + Send + Sync,
    {
        // Held before `lower` pushes anything, so that a task pushed before
        // a panic in `lower` still points at something the builder keeps.
        // The ops pushed point into the values of `keepers`, or into its
        // buffer: both stay in place as long as the vector lives.
        let keepers = Arc::new(Keepers(keepers));
        self.keepers.push(keepers.clone());
        lower(
            &keepers.0,
            &mut Kept {
                builder: self,
                _keepers: PhantomData,
            },
        )
    }

    /// Appends task `i` of `plan` with key `key` and dependencies `deps`
    /// (indices in this builder): the same op, held as `plan` holds it. The
    /// new plan then also keeps what keeps `plan`'s ops alive, not `plan`.
    ///
    /// # Panics
    ///
    /// As [`push`](PlanBuilder::push), and when `plan` has no task `i`.
    pub fn push_task_of(&mut self, plan: &Plan, i: u32, key: Key, deps: &[u32]) -> u32 {
        if let Some(op) = plan.owned_op(i) {
            return self.push(key, op.clone(), deps);
        }
        // Each plan's keepers once: a builder keeps a handful of lists.
        let theirs = Arc::as_ptr(&plan.keepers);
        if !self
            .keepers
            .iter()
            .any(|k| std::ptr::addr_eq(Arc::as_ptr(k), theirs))
        {
            self.keepers.push(plan.keepers.clone());
        }
        // `plan` keeps this op alive through its keepers (invariant 5),
        // which this builder now keeps too.
        self.append(key, plan.tasks[i as usize].op, deps)
    }

    /// Appends a task pointing at `op`, which the caller makes sure the
    /// plan keeps alive (invariant 5).
    fn append(&mut self, key: Key, op: NonNull<dyn Op>, deps: &[u32]) -> u32 {
        let index = u32::try_from(self.tasks.len()).expect("a plan holds at most 2^32 tasks");
        assert!(
            deps.iter().all(|&d| d < index),
            "plan dependencies must point to earlier tasks"
        );
        let start = self.deps.len() as u32;
        self.deps.extend_from_slice(deps);
        let end = self.deps.len() as u32;
        let task = PlanTask {
            op,
            deps: (start, end),
        };
        if task.op().key() != Some(&key) {
            self.keys.push((index, key));
        }
        self.tasks.push(task);
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
            // One relaxed add per plan: ids need only be distinct.
            id: PlanId(LAST_PLAN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1),
            tasks: self.tasks,
            keys: self.keys,
            owned: self.owned,
            keepers: Arc::new(Keepers(self.keepers)),
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
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

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
        // Under miri (CI runs this module's tests there, for the plan's
        // pointers) a few cases cover the same code: each takes seconds
        // in the interpreter, and the full set runs in the plain tests.
        #![proptest_config(proptest::test_runner::Config::with_cases(
            if cfg!(miri) { 8 } else { proptest::test_runner::Config::default().cases }
        ))]

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

    /// A graph's node as the tests build one: an op holding its inputs,
    /// which adds its inputs' values to its own, and counts its drop.
    struct Node {
        own: i64,
        inputs: Vec<Arc<Node>>,
        dropped: Arc<AtomicUsize>,
    }
    impl Op for Node {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            let mut sum = self.own;
            for input in inputs.iter_mut() {
                let value = input.take().ok_or_else(|| OpError::failed("no input"))?;
                sum += *value
                    .downcast_ref::<i64>()
                    .ok_or_else(|| OpError::failed("not i64"))?;
            }
            Ok(Arc::new(sum))
        }
        fn name(&self) -> &str {
            "node"
        }
    }
    impl Drop for Node {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, SeqCst);
        }
    }

    /// `leaves` leaves of own values 1, 2, …, each used by one sum node,
    /// a node summing those and the root above it: the root's value is
    /// `1 + … + n`.
    fn graph(leaves: i64, dropped: &Arc<AtomicUsize>) -> Arc<Node> {
        let node = |own, inputs| {
            Arc::new(Node {
                own,
                inputs,
                dropped: dropped.clone(),
            })
        };
        let sums = (1..=leaves)
            .map(|i| node(0, vec![node(i, vec![])]))
            .collect();
        node(0, vec![node(0, sums)])
    }

    /// Pushes every node under `root` by reference, inputs first (each
    /// node once: the test graphs are trees), and asks for the root.
    fn lower(b: &mut PlanBuilder, root: Arc<Node>) -> u32 {
        fn walk<'a>(node: &'a Arc<Node>, b: &mut Kept<'a, '_>) -> u32 {
            let deps: Vec<u32> = node.inputs.iter().map(|input| walk(input, b)).collect();
            b.push(Key([7; 32]), &**node, &deps)
        }
        let top = b.keeping(vec![root], |roots, b| walk(&roots[0], b));
        b.output(top);
        top
    }

    /// What the synchronous executor gives for `plan`'s outputs.
    fn run(plan: Plan) -> Vec<i64> {
        struct Got(std::sync::Mutex<Vec<i64>>);
        impl crate::Reporter for Got {
            fn output(&self, _: usize, outcome: crate::Outcome) {
                let value = *outcome.unwrap().downcast_ref::<i64>().unwrap();
                self.0.lock().unwrap().push(value);
            }
        }
        let got = Arc::new(Got(std::sync::Mutex::new(Vec::new())));
        crate::Executor::submit(&crate::Synchronous, Arc::new(plan), got.clone());
        let values = got.0.lock().unwrap().clone();
        values
    }

    /// Invariant 5: a plan of kept ops keeps them alive once whoever
    /// lowered it let go of the graph, runs them, and lets them go when it
    /// is dropped, not before: every node is dropped exactly once.
    #[test]
    fn a_plan_keeps_its_kept_ops_alive_as_long_as_itself() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut b = PlanBuilder::new();
        lower(&mut b, graph(6, &dropped));
        let plan = b.build();
        assert_eq!(plan.len(), 14);
        assert_eq!(plan.owned.len(), 0, "no op is held one by one");
        assert_eq!(dropped.load(SeqCst), 0);
        assert_eq!(run(plan), vec![21]);
        assert_eq!(dropped.load(SeqCst), 14);
    }

    /// Invariant 5 across plans: a task copied from a plan of kept ops
    /// ([`PlanBuilder::push_task_of`]) stays alive with the new plan once
    /// the first is gone, and so does a held one; keepers are taken over
    /// once however many tasks are copied.
    #[test]
    fn a_copied_task_outlives_the_plan_it_came_from() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut b = PlanBuilder::new();
        let top = lower(&mut b, graph(3, &dropped));
        let held = b.push(Key([99; 32]), Arc::new(Telling(None)), &[]);
        let first = b.build();
        // Every task but the held one, in order, with the same inputs.
        let mut copy = PlanBuilder::new();
        for i in 0..=top {
            copy.push_task_of(&first, i, *first.key(i), first.deps(i));
        }
        copy.push_task_of(&first, held, *first.key(held), &[]);
        copy.output(top);
        assert_eq!(copy.keepers.len(), 1);
        drop(first);
        assert_eq!(dropped.load(SeqCst), 0);
        let copy = copy.build();
        assert_eq!(copy.task(held).op().name(), "telling");
        assert_eq!(copy.key(held), &Key([99; 32]));
        assert_eq!(run(copy), vec![6]);
        assert_eq!(dropped.load(SeqCst), 8);
    }

    /// Invariant 5 when lowering fails half-way: the tasks pushed before a
    /// panic in `keeping`'s closure still point at ops the builder keeps,
    /// whoever held the graph before.
    #[test]
    fn a_panic_while_lowering_leaves_what_was_pushed_kept() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut b = PlanBuilder::new();
        let root = graph(2, &dropped);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.keeping(vec![root], |roots, b| {
                let leaf = &roots[0].inputs[0].inputs[0].inputs[0];
                b.push(Key([1; 32]), &**leaf, &[]);
                panic!("lowering failed");
            })
        }));
        assert!(caught.is_err());
        b.output(0);
        assert_eq!(dropped.load(SeqCst), 0);
        assert_eq!(run(b.build()), vec![1]);
        assert_eq!(dropped.load(SeqCst), 6);
    }

    /// Plans cross threads (executors run them on their own): a plan of
    /// kept ops read from several threads at once gives the same answers.
    #[test]
    fn a_plan_of_kept_ops_is_read_from_many_threads() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut b = PlanBuilder::new();
        lower(&mut b, graph(4, &dropped));
        let plan = Arc::new(b.build());
        std::thread::scope(|s| {
            for _ in 0..3 {
                let plan = plan.clone();
                s.spawn(move || {
                    let names: Vec<&str> = plan.tasks().iter().map(|t| t.op().name()).collect();
                    assert!(names.iter().all(|&n| n == "node"), "{names:?}");
                });
            }
        });
        drop(plan);
        assert_eq!(dropped.load(SeqCst), 10);
    }

    /// An op holding a user's value whose `Drop` panics (a literal
    /// argument), after counting the drop.
    struct Armed(Arc<AtomicUsize>);
    impl Op for Armed {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(()))
        }
        fn name(&self) -> &str {
            "armed"
        }
    }
    impl Drop for Armed {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
            panic!("an argument that panics when dropped");
        }
    }

    /// A plan lets its ops go quietly, one at a time (dropping rule 5):
    /// ops it holds and keepers whose `Drop` panics are each dropped, a
    /// second panic never meets a first one unwinding (which aborted the
    /// process), and nothing unwinds out of the plan's drop, wherever its
    /// last reference goes (an executor's pool thread, a cluster client's
    /// loop: found by review). A plan sharing its keepers with another
    /// drops them with the last of the two.
    #[test]
    fn a_plan_lets_ops_whose_drop_panics_go_quietly() {
        crate::failure::record_panic_locations();
        let dropped = Arc::new(AtomicUsize::new(0));
        let armed = || Arc::new(Armed(dropped.clone()));
        let mut b = PlanBuilder::new();
        let kept = b.keeping(vec![armed(), armed()], |roots, b| {
            b.push(Key([1; 32]), &*roots[0], &[])
        });
        b.push(Key([2; 32]), armed(), &[]);
        b.push(Key([3; 32]), armed(), &[kept]);
        let plan = b.build();
        let mut copy = PlanBuilder::new();
        copy.push_task_of(&plan, kept, Key([1; 32]), &[]);
        let copy = copy.build();
        drop(plan);
        assert_eq!(dropped.load(SeqCst), 2, "the ops it held");
        drop(copy);
        assert_eq!(dropped.load(SeqCst), 4, "and the keepers, with the copy");
        assert!(crate::failure::take_panic_location().is_none());
    }

    #[test]
    #[should_panic(expected = "earlier tasks")]
    fn forward_dependency_is_rejected() {
        let mut b = PlanBuilder::new();
        b.push(Key([0; 32]), Arc::new(Nop), &[3]);
    }
}
