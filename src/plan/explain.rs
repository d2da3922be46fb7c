//! Inspecting the plan an executor would run: what [`explain`](crate::explain)
//! returns.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use rask_executor::{Key, Plan};

use super::{Options, Record, Shape};
use crate::build::node::Node;

/// Lowers and optimizes the graph behind `roots` as `opts` says, recording
/// what [`Explain`] shows; [`explain`](crate::explain) is the public entry.
pub(crate) fn explain_roots(roots: &[Arc<Node>], opts: &Options) -> Explain {
    let mut record = Record::default();
    // Without `prepare`: inspecting a graph must not wait for the futures in
    // it.
    let plan = super::plan(
        roots,
        opts,
        super::Asks::Repeatable,
        |_| None,
        Some(&mut record),
    );
    Explain {
        plan,
        shapes: record.shapes,
        graph_len: record.graph_len,
        timings: record.timings,
    }
}

/// The plan an executor would run for a computation, from [`explain`](crate::explain()): its
/// tasks after culling, inlining and fusing, or one task per node of the
/// graph when optimization is off.
///
/// # Examples
///
/// ```
/// use rask::{delayed, Config};
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// let total = delayed!(add(delayed!(inc(1)), rask::value(10)));
/// let plan = rask::explain(&total, &Config::new())?;
/// // `value(10)` is folded into `add`, and `add` into a chain with `inc`.
/// assert_eq!(plan.len(), 1);
/// assert_eq!(plan.tasks().next().unwrap().name(), "inc+add");
/// assert!(plan.to_dot().contains("inc+add-"));
/// # Ok::<(), rask::Error>(())
/// ```
pub struct Explain {
    plan: Arc<Plan>,
    shapes: Vec<Shape>,
    graph_len: usize,
    timings: Timings,
}

impl Explain {
    /// Number of tasks the executor runs.
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    /// Whether the plan has no task.
    pub fn is_empty(&self) -> bool {
        self.plan.is_empty()
    }

    /// Number of distinct tasks in the graph, before optimization.
    pub fn graph_len(&self) -> usize {
        self.graph_len
    }

    /// The plan's tasks in plan order (the order the synchronous executor
    /// runs them in).
    pub fn tasks(&self) -> impl ExactSizeIterator<Item = PlannedTask<'_>> + '_ {
        (0..self.plan.len() as u32).map(move |index| PlannedTask {
            plan: &self.plan,
            shape: self.shapes[index as usize],
            index,
        })
    }

    /// The key behind each output, in the order the outputs were asked for:
    /// the keys of the requested tasks, whatever was fused.
    pub fn outputs(&self) -> impl ExactSizeIterator<Item = Key> + '_ {
        self.plan.outputs().iter().map(|&o| *self.plan.key(o))
    }

    /// The executable plan itself, as an executor receives it: for running
    /// it on an executor of your own, or inspecting it with the
    /// `rask-executor` API.
    ///
    /// ```
    /// use rask_executor::{Executor, Outcome, Reporter, Synchronous};
    /// use std::sync::{Arc, Mutex};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// #[derive(Default)]
    /// struct Last(Mutex<Option<i64>>);
    /// impl Reporter for Last {
    ///     fn output(&self, _: usize, outcome: Outcome) {
    ///         let v = outcome.ok().and_then(|v| v.downcast_ref::<i64>().copied());
    ///         *self.0.lock().unwrap() = v;
    ///     }
    /// }
    ///
    /// let x = rask::delayed!(inc(rask::delayed!(inc(1))));
    /// let plan = rask::explain(&x, &rask::Config::new())?.plan();
    /// let last = Arc::new(Last::default());
    /// Synchronous.submit(plan, last.clone());
    /// assert_eq!(*last.0.lock().unwrap(), Some(3));
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn plan(&self) -> Arc<Plan> {
        self.plan.clone()
    }

    /// How long lowering and each pass took.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Renders the plan as Graphviz DOT: one node per plan task, labelled
    /// with its name and short key; fused tasks have a double border and say
    /// how many graph tasks they run, data is a box, outputs are bold.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph plan {\n  rankdir=BT;\n");
        let mut is_output = vec![false; self.plan.len()];
        for &o in self.plan.outputs() {
            is_output[o as usize] = true;
        }
        for task in self.tasks() {
            let label = task.to_string().replace('\\', "\\\\").replace('"', "\\\"");
            let i = task.index;
            let style = if is_output[i as usize] {
                ", style=bold"
            } else {
                ""
            };
            let _ = match task.shape {
                Shape::Task => writeln!(out, "  n{i} [label=\"{label}\"{style}];"),
                Shape::Data => writeln!(out, "  n{i} [label=\"{label}\", shape=box{style}];"),
                Shape::Fused(n) => writeln!(
                    out,
                    "  n{i} [label=\"{label}\\n{n} tasks\", peripheries=2{style}];"
                ),
            };
            for d in task.deps() {
                let _ = writeln!(out, "  n{d} -> n{i};");
            }
        }
        out.push_str("}\n");
        out
    }
}

impl fmt::Debug for Explain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.tasks()).finish()
    }
}

/// One task of an [`Explain`]ed plan.
///
/// # Examples
///
/// ```
/// use rask::{delayed, Config};
/// fn inc(x: i64) -> i64 { x + 1 }
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// let (a, b) = (delayed!(inc(1)), delayed!(inc(2)));
/// let total = delayed!(add(&a, &b));
/// let plan = rask::explain(&total, &Config::new())?;
/// let tasks: Vec<_> = plan.tasks().collect();
/// assert_eq!(tasks.len(), 3); // `add` has two inputs: nothing to fuse
/// assert_eq!(tasks[2].key(), total.key().key());
/// assert_eq!(tasks[2].deps(), &[0, 1]);
/// assert_eq!(tasks[2].to_string(), total.key().to_string()); // add-…
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct PlannedTask<'a> {
    plan: &'a Plan,
    shape: Shape,
    index: u32,
}

impl<'a> PlannedTask<'a> {
    /// Position in the plan.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// The task's key: for a fused task, the key of the last task it runs.
    pub fn key(&self) -> Key {
        *self.plan.key(self.index)
    }

    /// The task's name: the function name, or for a fused task the names of
    /// the tasks it runs, `inc+inc+inc`, shortened to `inc…inc(100)` for long
    /// chains.
    pub fn name(&self) -> &'a str {
        self.plan.task(self.index).op().name()
    }

    /// How many tasks of the graph this plan task runs: 1, or more when
    /// fused.
    pub fn size(&self) -> usize {
        match self.shape {
            Shape::Fused(n) => n as usize,
            Shape::Task | Shape::Data => 1,
        }
    }

    /// Whether this task holds a value rather than calls a function.
    pub fn is_data(&self) -> bool {
        self.shape == Shape::Data
    }

    /// The plan positions of its inputs, in argument order.
    pub fn deps(&self) -> &'a [u32] {
        self.plan.deps(self.index)
    }
}

impl fmt::Display for PlannedTask<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.name(), self.key().short())
    }
}

impl fmt::Debug for PlannedTask<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        if self.size() > 1 {
            write!(f, " ({} tasks)", self.size())?;
        }
        Ok(())
    }
}

/// How long each stage of [`explain`](crate::explain()) took: lowering the graph, then each
/// optimization pass. A pass switched off takes (almost) no time.
///
/// # Examples
///
/// ```
/// fn inc(x: i64) -> i64 { x + 1 }
/// let plan = rask::explain(&rask::delayed!(inc(1)), &rask::Config::new())?;
/// let t = plan.timings();
/// assert_eq!(t.passes(), t.cull + t.inline + t.fuse + t.assemble);
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timings {
    /// Lowering the graph into one task per distinct key.
    pub lower: Duration,
    /// The cull pass.
    pub cull: Duration,
    /// The inline pass.
    pub inline: Duration,
    /// The fuse pass.
    pub fuse: Duration,
    /// Building the executable plan from the passes' decisions.
    pub assemble: Duration,
}

impl Timings {
    /// Time spent optimizing: every pass and the assembly, not lowering.
    pub fn passes(&self) -> Duration {
        self.cull + self.inline + self.fuse + self.assemble
    }
}
