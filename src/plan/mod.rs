//! The plan layer: nodes → executable plan, one pipeline with one entry,
//! [`plan`], that every caller goes through (compute, explain, the futures
//! client); the data passes through it once.
//!
//! Lowering ([`lower`](lower::lower)) turns the nodes behind the requested
//! outputs into a [`Draft`]: a topologically sorted [`Plan`] with one task per
//! distinct key, plus what the passes need to know about each task (its
//! [`Weight`]). When fuse is on, lowering already folds the chains of nodes
//! nothing else refers to ([`chain`]): such a chain becomes one draft task
//! that stands for several nodes, without a plan task per node — on a long
//! chain that is most of what optimizing saves. The pipeline then runs, in
//! this order:
//!
//! 1. [`cull`](cull::cull): drop the tasks no output needs;
//! 2. [`inline`](inline::inline): fold data and cheap tasks into their only
//!    consumer;
//! 3. [`fuse`](fuse::fuse): fold a task into its only consumer when that
//!    consumer has no other input (a linear chain);
//!
//! and [`assemble`] freezes the result into the plan the executor runs: every
//! group of folded tasks becomes one [`Fused`](fuse::Fused) task that runs
//! its steps in order inside `Op::run`.
//!
//! Inline and fuse do not rebuild anything: they only mark tasks as *folded*
//! into their consumer ([`Folds`]). A task that is not folded is a *group
//! root*; its *group* is itself plus every task folded into it, directly or
//! through other folded tasks. Deciding first and building once keeps every
//! stage linear, however long the chains.
//!
//! # Invariants
//!
//! 1. **Same outputs, same keys.** The optimized plan has the same output
//!    slots as the lowered one, in the same order, and the task behind each
//!    slot has the key of the task the slot asked for. A fused task takes the
//!    key of its group root.
//! 2. **Pinned tasks stay tasks.** An output, or a key in
//!    [`Options::keep`], is never folded into another task: it stays
//!    addressable as its own plan task (its group may absorb others).
//! 3. **Only single consumers fold.** A folded task has exactly one consumer
//!    edge in the draft (not an output, not used twice), and that consumer is
//!    in its group. So a group is a tree, each graph task belongs to exactly
//!    one group, and still runs at most once.
//! 4. **Same values.** A group runs its steps in the post-order of its tree,
//!    following argument order, which is a topological order. Inputs are
//!    handed over as the executor would: every step receives one slot per
//!    argument, an inner result is *moved* to its only consumer (so
//!    `Arc::try_unwrap` still avoids a copy), and what a step leaves in its
//!    slots is dropped right after it ran.
//! 5. **Same failures.** A failure inside a group names the step that failed
//!    (`OpError::origin`), panics included. An executor fails a task with the
//!    first failing input in argument order *before* the task runs; for the
//!    fused task to fail with the failure the unoptimized plan reports, no
//!    external input of a group is consumed after a step that can fail on its
//!    own. Data cannot fail; inline keeps this rule for cheap tasks, and fuse
//!    preserves it (it folds only the single external input of a group).
//! 6. **Topological order kept.** Group roots keep their relative plan order,
//!    so the optimized plan is still sorted and still depth-first.
//! 7. **Linear cost.** Every stage is O(tasks + edges) with a handful of
//!    per-task flags; a stage with nothing to do returns its input as is
//!    (cull keeps the plan, assemble keeps it when nothing was folded).
//!    What lowering knows spares the passes that cannot change its draft
//!    ([`Draft::lowered`]): cull on every lowered draft (lowering emits only
//!    what the outputs reach), inline and fuse on a draft with no data, no
//!    cheap task and no task of exactly one input (a tree of calls).
//!
//! Trade-offs:
//!
//! - An executor polls for cancellation between plan tasks, so a fused
//!   chain, once started, runs to its end or its first failure.
//! - A fused task refers to its steps by index into the lowered plan, which
//!   all fused tasks share (no op is copied, a step is 12 bytes). So when
//!   anything was fused, the lowered plan lives as long as the optimized one.
//! - Nothing marks a call [`Weight::Cheap`] yet (it needs a hook on
//!   `node::Call`); inline folds data, and the rules for cheap tasks are in
//!   place and tested.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rask_executor::{Key, Op, Plan, PlanBuilder};

use crate::build::node::Node;

use crate::build::graph::KeyHash;

pub(crate) mod chain;
pub(crate) mod cull;
pub(crate) mod explain;
pub(crate) mod fuse;
pub(crate) mod inline;
pub(crate) mod lower;

pub use explain::{Explain, PlannedTask, Timings};

/// What the inline pass may do with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weight {
    /// An ordinary call: folded only by fuse (linear chains).
    Normal,
    /// A call marked cheap: folded into its only consumer like data, but it
    /// can fail (invariant 5).
    ///
    /// Nothing in rask marks calls cheap yet: that needs a hook on
    /// `node::Call` for lowering to read. Callers of the pipeline (and the
    /// tests) can set it already.
    #[cfg_attr(not(test), allow(dead_code))]
    Cheap,
    /// A node holding a value (a wrapped literal or a persisted result): never
    /// fails, costs one reference count to run.
    Data,
    /// A task that must travel to a cluster as a task of its own
    /// ([`Options::remote`]): never folded, and nothing is folded into it.
    Alone,
}

/// A lowered graph before optimization: a topologically sorted [`Plan`], one
/// task per distinct key, and the weight of each task.
///
/// When no pass changes anything, this plan is what runs: an unchanged graph
/// costs the passes a few flags per task and no copy.
pub(crate) struct Draft {
    /// Shared with the fused tasks built from it.
    plan: Arc<Plan>,
    weights: Vec<Weight>,
    /// How many graph nodes each task stands for (a [`chain::Chain`] stands
    /// for several); empty when every task stands for one.
    sizes: Vec<u32>,
    /// Every task is needed by an output: cull has nothing to drop.
    culled: bool,
    /// Some task may have exactly one input (`false` only when lowering
    /// found none).
    single_inputs: bool,
}

impl Draft {
    /// A draft of `plan` with one weight per task.
    ///
    /// # Panics
    ///
    /// When the lengths differ: a bug in the caller.
    pub(crate) fn new(plan: Plan, weights: Vec<Weight>) -> Draft {
        Draft::with_sizes(plan, weights, Vec::new())
    }

    /// A draft of `plan` with one weight per task, and one size per task
    /// (how many graph nodes it stands for) or none when each stands for one.
    ///
    /// # Panics
    ///
    /// When the lengths differ: a bug in the caller.
    pub(crate) fn with_sizes(plan: Plan, weights: Vec<Weight>, sizes: Vec<u32>) -> Draft {
        assert_eq!(plan.len(), weights.len(), "one weight per task");
        assert!(
            sizes.is_empty() || sizes.len() == plan.len(),
            "one size per task"
        );
        Draft {
            plan: Arc::new(plan),
            weights,
            sizes,
            culled: false,
            single_inputs: true,
        }
    }

    /// This draft as lowering made it: every task reached from an output,
    /// and `single_inputs` telling whether any task has exactly one input.
    pub(crate) fn lowered(self, single_inputs: bool) -> Draft {
        Draft {
            culled: true,
            single_inputs,
            ..self
        }
    }

    /// Whether some task is data or cheap, which inline may fold: without
    /// any (a graph of calls), one pass over a byte per task spares inline
    /// a walk of every edge.
    fn may_inline(&self) -> bool {
        self.weights
            .iter()
            .any(|w| matches!(w, Weight::Data | Weight::Cheap))
    }

    /// Whether fuse may fold anything after inline: fuse folds a group's
    /// only external input, and with nothing inlined a task's external
    /// inputs are all its inputs, so only a task of exactly one input can
    /// start a group.
    fn may_fuse(&self, inlines: bool) -> bool {
        inlines || self.single_inputs
    }

    /// How many graph nodes task `i` stands for.
    pub(crate) fn size(&self, i: u32) -> u32 {
        self.sizes.get(i as usize).copied().unwrap_or(1)
    }

    /// How many graph nodes the draft stands for.
    pub(crate) fn graph_len(&self) -> usize {
        if self.sizes.is_empty() {
            self.len()
        } else {
            self.sizes.iter().map(|&s| s as usize).sum()
        }
    }

    /// A draft of a plan built elsewhere: every task [`Weight::Normal`], so
    /// only cull and fuse apply.
    #[allow(dead_code)] // for plans lowered by other means (the futures client)
    pub(crate) fn from_plan(plan: Plan) -> Draft {
        let weights = vec![Weight::Normal; plan.len()];
        Draft::new(plan, weights)
    }

    /// The plan of this draft as is: one plan task per draft task.
    pub(crate) fn into_plan(self) -> Arc<Plan> {
        self.plan
    }

    /// The plan, to share with fused tasks.
    pub(crate) fn shared_plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Number of tasks.
    pub(crate) fn len(&self) -> usize {
        self.plan.len()
    }

    /// Task `i`'s key.
    pub(crate) fn key(&self, i: u32) -> Key {
        *self.plan.key(i)
    }

    /// Task `i`'s op.
    pub(crate) fn op(&self, i: u32) -> &dyn Op {
        self.plan.task(i).op()
    }

    /// Task `i`'s weight.
    pub(crate) fn weight(&self, i: u32) -> Weight {
        self.weights[i as usize]
    }

    /// Task `i`'s inputs, in argument order.
    pub(crate) fn deps(&self, i: u32) -> &[u32] {
        self.plan.deps(i)
    }

    /// How many times task `i`'s value is used: input edges plus output
    /// slots.
    pub(crate) fn consumers(&self, i: u32) -> u32 {
        self.plan.consumers(i)
    }

    /// The task behind each output slot.
    pub(crate) fn outputs(&self) -> &[u32] {
        self.plan.outputs()
    }
}

/// A set of keys, hashed by their first bytes (keys are already uniform).
pub(crate) type KeySet = HashSet<Key, BuildHasherDefault<KeyHash>>;

/// Which passes run, and what they must leave addressable.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) cull: bool,
    pub(crate) inline: bool,
    pub(crate) fuse: bool,
    /// Keys that must stay plan tasks of their own (invariant 2), e.g. the
    /// keys a client caches; outputs always do.
    pub(crate) keep: KeySet,
    /// The plan goes to a cluster: every plan task travels as one wire task
    /// (a fused one as `rask.fused`, `fuse` module docs), so a task whose
    /// wire form or limits the cluster must see on their own is
    /// [`Weight::Alone`] (`lower` rule 3), and chains are not absorbed while
    /// lowering (a [`chain::Chain`] has no wire form).
    pub(crate) remote: bool,
    /// `cut` answers for keys whose outcome the caller already has or gets
    /// elsewhere (the futures client's table): such a key must neither run
    /// again inside this plan nor disappear into another task. So every
    /// node `cut` replaced is [`Weight::Alone`] (`lower` rule 3), and
    /// chains are not absorbed while lowering: absorption takes the nodes
    /// below a node without asking `cut` about them (`chain` rule 1), and
    /// would run again a node whose outcome the caller holds. The fuse
    /// pass folds the same chains from the draft, where every node was
    /// asked.
    pub(crate) cut_alone: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options::all()
    }
}

impl Options {
    /// Every pass.
    pub(crate) fn all() -> Self {
        Options {
            cull: true,
            inline: true,
            fuse: true,
            keep: KeySet::default(),
            remote: false,
            cut_alone: false,
        }
    }

    /// No pass: the plan is the lowered graph, one task per key.
    pub(crate) fn none() -> Self {
        Options {
            cull: false,
            inline: false,
            fuse: false,
            keep: KeySet::default(),
            remote: false,
            cut_alone: false,
        }
    }

    /// Whether lowering may absorb chains ([`chain`]): only when fuse would
    /// fold them anyway, no key must stay a task of its own, and `cut`
    /// need not be asked about every node ([`Options::cut_alone`]).
    pub(crate) fn absorbs_chains(&self) -> bool {
        self.fuse && self.keep.is_empty() && !self.remote && !self.cut_alone
    }

    /// Also keeps these keys as plan tasks of their own.
    #[allow(dead_code)] // for the futures client, which keeps the keys it caches
    pub(crate) fn keep(mut self, keys: impl IntoIterator<Item = Key>) -> Self {
        self.keep.extend(keys);
        self
    }
}

/// Names listed in full in a group's name; longer groups are `first…last(n)`.
pub(crate) const MAX_LISTED: usize = 3;

/// The name of a group of `count` named steps: `a+b+c` from `listed` (the
/// first [`MAX_LISTED`] names, in run order) when there are that few, else
/// `first…last(count)`.
pub(crate) fn group_name(count: usize, listed: &[&str], last: &str) -> String {
    match listed.first() {
        Some(first) if count > MAX_LISTED => format!("{first}…{last}({count})"),
        _ => listed.join("+"),
    }
}

pub(crate) use crate::build::fused::named_origin;

/// Per task of a draft: whether it must stay a task (pinned) and whether a
/// pass folded it into its only consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Folds {
    pinned: Vec<bool>,
    folded: Vec<bool>,
}

impl Folds {
    /// Nothing folded; outputs and kept keys pinned.
    ///
    /// # Complexity
    ///
    /// O(tasks + outputs), plus one set lookup per task when `keep` is not
    /// empty.
    pub(crate) fn new(draft: &Draft, keep: &KeySet) -> Folds {
        let n = draft.len();
        let mut pinned = vec![false; n];
        for &o in draft.outputs() {
            pinned[o as usize] = true;
        }
        if !keep.is_empty() {
            for (pin, key) in pinned.iter_mut().zip(draft.plan.keys()) {
                *pin |= keep.contains(key);
            }
        }
        Folds {
            pinned,
            folded: vec![false; n],
        }
    }

    /// Whether task `i` must stay a task of its own.
    pub(crate) fn pinned(&self, i: u32) -> bool {
        self.pinned[i as usize]
    }

    /// Whether task `i` was folded into its only consumer.
    pub(crate) fn folded(&self, i: u32) -> bool {
        self.folded[i as usize]
    }

    /// Whether task `i` of `draft` may be folded into its consumer: not
    /// pinned, not yet folded, not [`Weight::Alone`], and consumed by
    /// exactly one edge (invariant 3).
    pub(crate) fn can_fold(&self, draft: &Draft, i: u32) -> bool {
        !self.pinned(i)
            && !self.folded(i)
            && draft.consumers(i) == 1
            && draft.weight(i) != Weight::Alone
    }

    /// Whether task `c` of `draft` may take tasks folded into it: not
    /// [`Weight::Alone`].
    pub(crate) fn can_absorb(draft: &Draft, c: u32) -> bool {
        draft.weight(c) != Weight::Alone
    }

    /// Folds task `i` into its only consumer.
    pub(crate) fn fold(&mut self, i: u32) {
        self.folded[i as usize] = true;
    }

    fn any_folded(&self) -> bool {
        self.folded.contains(&true)
    }
}

/// How often [`plan`] may ask its `cut` about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asks {
    /// Exactly once per key: `cut` has effects that must not repeat.
    Once,
    /// Possibly again, with the same answer and no effect that matters:
    /// lowering may then find nodes by their marks instead of a key map,
    /// and start again in the rare case that fails ([`lower`](lower::lower)).
    Repeatable,
}

/// Nodes → the plan an executor runs: the one way through this layer.
///
/// Lowers the graph behind `roots` (asking `cut` about each node as `asks`
/// allows, see [`lower`](lower::lower)), then runs the passes `opts` turns on, in order:
/// cull → inline → fuse → assemble. The data goes through once, each stage
/// taking the previous one's output by value; when fuse is on, chains are
/// already absorbed while lowering. With `record`, it also notes what each
/// plan task stands for and how long each stage took ([`explain`](crate::explain()).
///
/// # Complexity
///
/// O(nodes + edges) (invariant 7).
pub(crate) fn plan(
    roots: &[Arc<Node>],
    opts: &Options,
    asks: Asks,
    cut: impl FnMut(&Arc<Node>) -> Option<Arc<dyn Op>>,
    record: Option<&mut Record>,
) -> Arc<Plan> {
    // The clock is read only when asked.
    let start = record.is_some().then(Instant::now);
    let repeatable = asks == Asks::Repeatable;
    let draft = lower::lower(roots, opts, repeatable, cut);
    let Some(record) = record else {
        return pipeline(draft, opts, false, None).plan;
    };
    record.timings.lower = start.map_or(Duration::ZERO, |s| s.elapsed());
    record.graph_len = draft.graph_len();
    let Assembled { plan, shapes } = pipeline(draft, opts, true, Some(&mut record.timings));
    record.shapes = shapes;
    plan
}

/// What [`plan`] notes on the way when asked, for [`Explain`].
#[derive(Default)]
pub(crate) struct Record {
    /// What each plan task stands for.
    pub(crate) shapes: Vec<Shape>,
    /// Distinct tasks of the graph, before the passes.
    pub(crate) graph_len: usize,
    pub(crate) timings: Timings,
}

/// The passes alone, on a draft made by hand.
#[cfg(test)]
pub(crate) fn optimize(draft: Draft, opts: &Options) -> Arc<Plan> {
    pipeline(draft, opts, false, None).plan
}

/// Stage durations for [`Timings`]; the clock is read only when asked.
struct Stopwatch<'a> {
    timings: Option<&'a mut Timings>,
    last: Option<Instant>,
}

impl<'a> Stopwatch<'a> {
    fn new(timings: Option<&'a mut Timings>) -> Self {
        let last = timings.as_ref().map(|_| Instant::now());
        Stopwatch { timings, last }
    }

    fn lap(&mut self, field: fn(&mut Timings) -> &mut Duration) {
        if let (Some(timings), Some(last)) = (self.timings.as_deref_mut(), self.last) {
            let now = Instant::now();
            *field(timings) = now - last;
            self.last = Some(now);
        }
    }
}

/// The optimized plan and, when asked for, what each of its tasks stands for.
pub(crate) struct Assembled {
    pub(crate) plan: Arc<Plan>,
    pub(crate) shapes: Vec<Shape>,
}

/// What one task of an optimized plan stands for, for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One call of the graph.
    Task,
    /// One data node of the graph.
    Data,
    /// A group of this many graph tasks.
    Fused(u32),
}

/// The passes after lowering, optionally describing each plan task and
/// timing each stage.
fn pipeline(
    draft: Draft,
    opts: &Options,
    describe: bool,
    timings: Option<&mut Timings>,
) -> Assembled {
    let mut clock = Stopwatch::new(timings);
    // One task is an output: nothing to drop, nothing to fold it into. (A
    // client submitting one call at a time pays no pass.)
    if draft.len() < 2 {
        return plain(draft, describe);
    }
    let draft = if opts.cull && !draft.culled {
        cull::cull(draft)
    } else {
        draft
    };
    clock.lap(|t| &mut t.cull);
    let inlines = opts.inline && draft.may_inline();
    let fuses = opts.fuse && draft.may_fuse(inlines);
    if !inlines && !fuses {
        let assembled = plain(draft, describe);
        clock.lap(|t| &mut t.assemble);
        return assembled;
    }
    let mut folds = Folds::new(&draft, &opts.keep);
    if inlines {
        folds = inline::inline(&draft, folds);
    }
    clock.lap(|t| &mut t.inline);
    if fuses {
        folds = fuse::fuse(&draft, folds);
    }
    clock.lap(|t| &mut t.fuse);
    let assembled = assemble(draft, &folds, describe);
    clock.lap(|t| &mut t.assemble);
    assembled
}

/// The draft's plan as is, one plan task per draft task.
fn plain(draft: Draft, describe: bool) -> Assembled {
    let shapes = if describe {
        (0..draft.len() as u32)
            .map(|i| Shape::of(draft.weight(i), draft.size(i)))
            .collect()
    } else {
        Vec::new()
    };
    Assembled {
        plan: draft.into_plan(),
        shapes,
    }
}

/// Freezes `draft` into the executable plan: group roots in plan order, each
/// group of two or more tasks as one fused task with the root's key.
/// `describe` also returns the [`Shape`] of every plan task.
///
/// # Complexity
///
/// O(tasks + edges); the draft's plan is returned as is when nothing is
/// folded.
pub(crate) fn assemble(draft: Draft, folds: &Folds, describe: bool) -> Assembled {
    if !folds.any_folded() {
        return plain(draft, describe);
    }
    let n = draft.len() as u32;
    // Group sizes first, so that each fused op allocates its steps once:
    // inputs come first, so a folded task's size is final when its
    // consumer adds it.
    // `steps`: draft tasks per group (a fused task's steps); `sizes`: graph
    // nodes per group (a chain is one step of several nodes), only to
    // describe the plan.
    let group = |per_task: &dyn Fn(u32) -> u32| {
        let mut total = vec![0u32; n as usize];
        for i in 0..n {
            let inner: u32 = draft
                .deps(i)
                .iter()
                .filter(|&&d| folds.folded(d))
                .map(|&d| total[d as usize])
                .sum();
            total[i as usize] = per_task(i) + inner;
        }
        total
    };
    let steps = group(&|_| 1);
    let sizes = if describe {
        group(&|i| draft.size(i))
    } else {
        Vec::new()
    };
    let mut b = PlanBuilder::with_capacity(n as usize);
    let mut shapes = Vec::new();
    // Plan index of each group root in the new plan; folded tasks have none.
    let mut index = vec![u32::MAX; n as usize];
    let mut scratch = fuse::Scratch::default();
    let mut deps: Vec<u32> = Vec::new();
    for i in 0..n {
        if folds.folded(i) {
            continue;
        }
        let has_inner = draft.deps(i).iter().any(|&d| folds.folded(d));
        deps.clear();
        index[i as usize] = if has_inner {
            let fused =
                fuse::Fused::build(&draft, folds, i, steps[i as usize] as usize, &mut scratch);
            deps.extend(scratch.externals().iter().map(|&d| index[d as usize]));
            if describe {
                shapes.push(Shape::Fused(sizes[i as usize]));
            }
            b.push(draft.key(i), Arc::new(fused), &deps)
        } else {
            deps.extend(draft.deps(i).iter().map(|&d| index[d as usize]));
            if describe {
                shapes.push(Shape::of(draft.weight(i), draft.size(i)));
            }
            b.push_task_of(draft.shared_plan(), i, draft.key(i), &deps)
        };
    }
    for &o in draft.outputs() {
        let new = index[o as usize];
        assert!(new != u32::MAX, "an output is never folded");
        b.output(new);
    }
    Assembled {
        plan: Arc::new(b.build()),
        shapes,
    }
}

impl Shape {
    /// The shape of a draft task of `weight` standing for `size` graph
    /// nodes.
    fn of(weight: Weight, size: u32) -> Shape {
        match weight {
            _ if size > 1 => Shape::Fused(size),
            Weight::Data => Shape::Data,
            Weight::Normal | Weight::Cheap | Weight::Alone => Shape::Task,
        }
    }
}

/// Hand-made plans and a way to run them, for the unit tests of every pass.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use rask_executor::{
        Executor, FailureKind, Key, Op, OpError, Outcome, PlanBuilder, Reporter, Synchronous,
        Value, WireError, WireTask,
    };

    use super::{Draft, Weight};

    /// What a test task does: sums its `i64` inputs (taking them) and a
    /// constant; or fails, or panics.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Does {
        Sum(i64),
        Fail,
        Panic,
    }

    pub(crate) struct TestOp {
        pub(crate) name: String,
        pub(crate) does: Does,
    }

    impl Op for TestOp {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            let mut total = match self.does {
                Does::Sum(c) => c,
                Does::Fail => return Err(OpError::failed(format!("{} failed", self.name))),
                Does::Panic => panic!("{} panicked", self.name),
            };
            for slot in inputs.iter_mut() {
                let value = slot
                    .take()
                    .ok_or_else(|| OpError::failed("missing input"))?;
                total += value
                    .downcast_ref::<i64>()
                    .ok_or_else(|| OpError::failed("not an i64"))?;
            }
            Ok(Arc::new(total))
        }
        fn name(&self) -> &str {
            &self.name
        }

        /// `test`, the name and what it does as bytes ([`resolve`]).
        fn to_wire(&self) -> Result<WireTask, WireError> {
            let mut payload = match self.does {
                Does::Sum(c) => [&[0u8][..], &c.to_le_bytes()].concat(),
                Does::Fail => vec![1],
                Does::Panic => vec![2],
            };
            payload.extend_from_slice(self.name.as_bytes());
            Ok(WireTask {
                function: "test".into(),
                payload,
            })
        }
    }

    /// A test task from its wire form, as a worker's registry would make
    /// it; anything else is unregistered. The name is always `wired`, so
    /// that a fused task's received steps must be renamed to their own.
    pub(crate) fn resolve(wire: &WireTask) -> Result<Arc<dyn Op>, WireError> {
        let unknown = || WireError::Unregistered {
            function: wire.function.clone(),
        };
        if wire.function != "test" {
            return Err(unknown());
        }
        let does = match wire.payload.first() {
            Some(0) => {
                let bytes = wire.payload.get(1..9).ok_or_else(unknown)?;
                Does::Sum(i64::from_le_bytes(bytes.try_into().map_err(|_| unknown())?))
            }
            Some(1) => Does::Fail,
            Some(2) => Does::Panic,
            _ => return Err(unknown()),
        };
        Ok(Arc::new(TestOp {
            name: "wired".into(),
            does,
        }))
    }

    /// The key of test task `i`.
    pub(crate) fn key(i: usize) -> Key {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        Key(k)
    }

    /// One hand-made task: name, weight, what it does, its inputs.
    pub(crate) type Spec<'a> = (&'a str, Weight, Does, &'a [u32]);

    /// A draft with these tasks (task `i` has key [`key(i)`](key)) and
    /// outputs.
    pub(crate) fn draft(tasks: &[Spec<'_>], outputs: &[u32]) -> Draft {
        let mut b = PlanBuilder::new();
        let mut weights = Vec::new();
        for (i, &(name, weight, does, deps)) in tasks.iter().enumerate() {
            let op = Arc::new(TestOp {
                name: name.to_owned(),
                does,
            });
            b.push(key(i), op, deps);
            weights.push(weight);
        }
        for &o in outputs {
            b.output(o);
        }
        Draft::new(b.build(), weights)
    }

    /// Short names for the weights.
    pub(crate) const N: Weight = Weight::Normal;
    pub(crate) const C: Weight = Weight::Cheap;
    pub(crate) const D: Weight = Weight::Data;
    pub(crate) const A: Weight = Weight::Alone;

    /// What a plan's outputs came out as: the value, or the failed task's
    /// key, name and kind.
    pub(crate) type Got = Result<i64, (Key, String, FailureKind)>;

    /// Runs `plan` on the synchronous executor.
    pub(crate) fn run(plan: impl Into<Arc<rask_executor::Plan>>) -> Vec<Got> {
        #[derive(Default)]
        struct Log(Mutex<Vec<Option<Got>>>);
        impl Reporter for Log {
            fn output(&self, index: usize, outcome: Outcome) {
                let got = match outcome {
                    Ok(v) => Ok(*v.downcast_ref::<i64>().expect("test values are i64")),
                    Err(f) => Err((f.key, f.name.to_string(), f.kind)),
                };
                let mut log = self.0.lock().expect("not poisoned");
                if log.len() <= index {
                    log.resize(index + 1, None);
                }
                log[index] = Some(got);
            }
        }
        let log = Arc::new(Log::default());
        Synchronous.submit(plan.into(), log.clone());
        let got = log.0.lock().expect("not poisoned").clone();
        got.into_iter()
            .map(|g| g.expect("every output reported"))
            .collect()
    }

    /// Names of the plan's tasks, in order.
    pub(crate) fn names(plan: &rask_executor::Plan) -> Vec<String> {
        plan.tasks()
            .iter()
            .map(|t| t.op().name().to_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rask_executor::FailureKind;

    use super::testing::{draft, key, names, run, Does::*, C, D, N};
    use super::*;

    /// A plan with a chain, inlined data, a cheap task, a diamond and an
    /// unused branch, run with and without optimization.
    fn mixed() -> Draft {
        draft(
            &[
                ("a", N, Sum(1), &[]),     // 0
                ("b", N, Sum(10), &[0]),   // 1: chain a -> b -> c
                ("v", D, Sum(100), &[]),   // 2: data, only consumer c
                ("c", N, Sum(0), &[1, 2]), // 3
                ("x", N, Sum(5), &[]),     // 4: unused
                ("l", N, Sum(1), &[3]),    // 5: diamond on c
                ("r", C, Sum(2), &[3]),    // 6: cheap, only consumer j
                ("j", N, Sum(0), &[5, 6]), // 7
                ("out", N, Sum(0), &[7]),  // 8
            ],
            &[8, 3],
        )
    }

    #[test]
    fn optimized_plan_computes_the_same_outputs_with_fewer_tasks() {
        let want = run(optimize(mixed(), &Options::none()));
        // c = 1 + 10 + 100; out = (c + 1) + (c + 2)
        assert_eq!(want, vec![Ok(225), Ok(111)]);
        let plan = optimize(mixed(), &Options::all());
        assert_eq!(names(&plan), vec!["a+b+c", "l", "r+j+out"]);
        let keys: Vec<Key> = plan.outputs().iter().map(|&o| *plan.key(o)).collect();
        assert_eq!(keys, vec![key(8), key(3)]);
        assert_eq!(run(plan), want);
    }

    #[test]
    fn each_pass_can_be_switched_off() {
        let want = run(optimize(mixed(), &Options::none()));
        for (cull, inline, fuse) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (true, true, false),
            (false, true, true),
        ] {
            let opts = Options {
                cull,
                inline,
                fuse,
                ..Options::none()
            };
            let plan = optimize(mixed(), &opts);
            assert_eq!(run(plan), want, "cull {cull} inline {inline} fuse {fuse}");
        }
        assert_eq!(optimize(mixed(), &Options::none()).len(), 9);
    }

    #[test]
    fn kept_keys_stay_tasks_of_their_own() {
        let plan = optimize(mixed(), &Options::all().keep([key(1), key(6)]));
        // `b` and `r` stay; `c` still absorbs its data input.
        assert_eq!(names(&plan), vec!["a+b", "c", "l", "r", "j+out"]);
        assert_eq!(run(plan), run(optimize(mixed(), &Options::none())));
    }

    #[test]
    fn failure_inside_a_group_names_the_inner_task() {
        let d = || {
            draft(
                &[
                    ("a", N, Sum(1), &[]),
                    ("bad", N, Fail, &[0]),
                    ("c", N, Sum(0), &[1]),
                ],
                &[2],
            )
        };
        let plan = optimize(d(), &Options::all());
        assert_eq!(plan.len(), 1);
        let got = run(plan);
        assert_eq!(got, run(optimize(d(), &Options::none())));
        assert_eq!(
            got,
            vec![Err((key(1), "bad".to_owned(), FailureKind::Failed))]
        );
    }

    /// The futures client's options ([`Options::cut_alone`]): a node `cut`
    /// answers for is neither absorbed into a chain, even when nothing else
    /// holds it, nor folded into its consumer; the chain above it still
    /// fuses, and a literal folds into its consumer, on a cluster too.
    #[test]
    fn cut_nodes_stay_alone_and_the_rest_fuses() {
        use super::testing::TestOp;
        use crate::delayed;
        fn inc(x: i64) -> i64 {
            x + 1
        }
        for remote in [false, true] {
            let opts = Options {
                remote,
                cut_alone: true,
                ..Options::all()
            };
            let held = delayed!(inc(crate::value(1_i64)));
            let held_key = held.node().key;
            // `held` moves into the chain: its consumer's is the node's only
            // reference, which is what chain absorption looks for.
            let top = delayed!(inc(delayed!(inc(held))));
            let op: Arc<dyn Op> = Arc::new(TestOp {
                name: "held".into(),
                does: Sum(41),
            });
            let mut asked = false;
            let cut = |node: &Arc<Node>| {
                asked |= node.key == held_key;
                (node.key == held_key).then(|| op.clone())
            };
            let p = plan(&[top.node().clone()], &opts, Asks::Once, cut, None);
            assert!(asked, "cut is asked about the held node");
            assert_eq!(names(&p), vec!["held", "inc+inc"], "remote {remote}");
            assert_eq!(run(p), vec![Ok(43)], "the held value is used");

            let chain = delayed!(inc(delayed!(inc(delayed!(inc(crate::value(1_i64)))))));
            let p = plan(&[chain.node().clone()], &opts, Asks::Once, |_| None, None);
            assert_eq!(names(&p), vec!["inc+inc+inc"], "remote {remote}");
            assert_eq!(run(p), vec![Ok(4)]);
        }
    }

    #[test]
    fn shapes_describe_the_plan() {
        let a = pipeline(mixed(), &Options::all(), true, None);
        assert_eq!(
            a.shapes,
            vec![Shape::Fused(4), Shape::Task, Shape::Fused(3)]
        );
        let a = pipeline(mixed(), &Options::none(), true, None);
        assert_eq!(a.shapes[2], Shape::Data);
        assert_eq!(a.shapes.len(), 9);
    }
}

/// Random plans with every weight, failures and panics: the optimized plan
/// reports exactly what the lowered one does (invariants 1, 4, 5).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::testing::{draft, key, run, Does, A, C, D, N};
    use super::*;

    /// One task: weight, what it does, inputs (indices of earlier tasks).
    type Task = (Weight, Does, Vec<u32>);

    fn tasks(max: usize) -> impl Strategy<Value = Vec<Task>> {
        (1..=max).prop_flat_map(|n| {
            let tasks: Vec<BoxedStrategy<Task>> = (0..n as u32)
                .map(|i| {
                    let data = Just((D, Does::Sum(1), Vec::new())).boxed();
                    if i == 0 {
                        return data;
                    }
                    let does = prop_oneof![
                        12 => (0i64..5).prop_map(Does::Sum),
                        1 => Just(Does::Fail),
                        1 => Just(Does::Panic),
                    ];
                    let call = (
                        prop_oneof![Just(N), Just(C), Just(A)],
                        does,
                        proptest::collection::vec(0..i, 1..4),
                    );
                    prop_oneof![1 => data, 4 => call.boxed()].boxed()
                })
                .collect();
            tasks
        })
    }

    fn outputs_and_keep(n: usize) -> impl Strategy<Value = (Vec<u32>, Vec<usize>)> {
        (
            proptest::collection::vec(0..n as u32, 1..4),
            proptest::collection::vec(0..n, 0..3),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn optimized_equals_lowered(
            (tasks, (outputs, keep_at)) in tasks(40)
                .prop_flat_map(|t| { let n = t.len(); (Just(t), outputs_and_keep(n)) })
        ) {
            let specs: Vec<_> = tasks
                .iter()
                .map(|(w, does, deps)| ("t", *w, *does, &deps[..]))
                .collect();
            let want = run(optimize(draft(&specs, &outputs), &Options::none()));
            let keep = Options::all().keep(keep_at.iter().map(|&i| key(i)));
            let plan = optimize(draft(&specs, &outputs), &keep);
            for (&o, &slot) in outputs.iter().zip(plan.outputs()) {
                prop_assert_eq!(*plan.key(slot), key(o as usize));
            }
            // A kept task that an output needs is still a task of its own.
            let mut needed = vec![false; tasks.len()];
            for &o in &outputs {
                needed[o as usize] = true;
            }
            for i in (0..tasks.len()).rev() {
                if needed[i] {
                    for &d in &tasks[i].2 {
                        needed[d as usize] = true;
                    }
                }
            }
            for &i in keep_at.iter().filter(|&&i| needed[i]) {
                prop_assert!(plan.keys().any(|k| *k == key(i)), "kept task {} folded", i);
            }
            // An alone task is a task of its own, with nothing folded into
            // it: every input of its own is still an input.
            for i in (0..tasks.len()).filter(|&i| needed[i] && tasks[i].0 == A) {
                let at = plan.keys().position(|k| *k == key(i));
                prop_assert!(at.is_some(), "alone task {} folded", i);
                let deps = at.map_or(0, |at| plan.deps(at as u32).len());
                prop_assert_eq!(deps, tasks[i].2.len(), "something folded into alone task {}", i);
            }
            prop_assert!(plan.len() <= tasks.len());
            prop_assert_eq!(run(plan), want);
        }
    }
}
