//! Strategies: random DAGs of `Delayed` from user ops, and futures scripts.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::Index;

use crate::build::data::Data;
use crate::build::delayed::{value, Delayed};
use crate::futures::client::Client;
use crate::futures::future::{as_completed, wait_first, Future};
use crate::testing::agree::Outcome;

type Build<T> = Arc<dyn Fn(Vec<Delayed<T>>) -> Delayed<T> + Send + Sync>;

/// One typed op of [`Ops`].
struct OpEntry<T> {
    name: &'static str,
    arity: RangeInclusive<usize>,
    build: Build<T>,
}

/// The inner nodes [`dag`] may use: each a name, how many inputs it takes
/// (its fan-in) and a function that makes the node from its inputs,
/// typically with [`delayed!`](crate::delayed!) over your own function.
///
/// # Examples
///
/// ```
/// use rask::testing::Ops;
/// use rask::{delayed, Delayed};
/// fn sum(xs: Vec<i64>) -> i64 { xs.iter().sum() }
/// fn sub(a: i64, b: i64) -> i64 { a - b }
///
/// let ops = Ops::new()
///     .op("sum", 1..=4, |xs: Vec<Delayed<i64>>| delayed!(sum(xs)))
///     .op("sub", 2..=2, |xs: Vec<Delayed<i64>>| delayed!(sub(&xs[0], &xs[1])));
/// assert_eq!(ops.len(), 2);
/// ```
pub struct Ops<T> {
    ops: Arc<Vec<OpEntry<T>>>,
}

impl<T> Clone for Ops<T> {
    fn clone(&self) -> Self {
        Ops {
            ops: self.ops.clone(),
        }
    }
}

impl<T> fmt::Debug for Ops<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.ops.iter().map(|o| (o.name, &o.arity)))
            .finish()
    }
}

impl<T: Data> Default for Ops<T> {
    fn default() -> Self {
        Ops::new()
    }
}

impl<T: Data> Ops<T> {
    /// No op: [`dag`] then makes leaves only.
    pub fn new() -> Self {
        Ops {
            ops: Arc::new(Vec::new()),
        }
    }

    /// Adds the op `name`, taking between `arity.start()` and `arity.end()`
    /// inputs (at least one), built by `build`, which gets exactly that
    /// many inputs.
    ///
    /// # Panics
    ///
    /// When `arity` is empty or starts at 0, or when called on a clone
    /// that shares its list (add every op before cloning).
    pub fn op(
        mut self,
        name: &'static str,
        arity: RangeInclusive<usize>,
        build: impl Fn(Vec<Delayed<T>>) -> Delayed<T> + Send + Sync + 'static,
    ) -> Self {
        assert!(
            *arity.start() >= 1 && arity.start() <= arity.end(),
            "op `{name}`: the arity must be a non-empty range of at least 1"
        );
        Arc::get_mut(&mut self.ops)
            .expect("ops are added before the list is cloned")
            .push(OpEntry {
                name,
                arity,
                build: Arc::new(build),
            });
        self
    }

    /// The number of ops.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there is no op.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn max_arity(&self) -> usize {
        self.ops.iter().map(|o| *o.arity.end()).max().unwrap_or(0)
    }
}

/// The size and form of the graphs [`dag`] makes.
///
/// - Width grows with `leaves` (more leaves, more independent branches)
///   and with `window`; depth with a small `window`, up to `max_depth`.
/// - `sharing`: how likely an input is a node that already has a consumer,
///   which makes diamonds and shared subgraphs.
/// - Fan-in is each op's arity ([`Ops::op`]).
///
/// # Examples
///
/// ```
/// let deep = rask::testing::Shape { window: 2, max_depth: 30, ..Default::default() };
/// assert_eq!(deep.window, 2);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// How many nodes (before shrinking).
    pub nodes: RangeInclusive<usize>,
    /// The share of leaves among the nodes, from 0 to 1 (the first node is
    /// always a leaf).
    pub leaves: f64,
    /// How likely an input is picked among nodes that already have a
    /// consumer, from 0 to 1; otherwise a node without one is preferred.
    pub sharing: f64,
    /// Inputs are picked among the last `window` nodes before the one made.
    pub window: usize,
    /// No node is deeper than this (a leaf has depth 0); a node that would
    /// be becomes a leaf.
    pub max_depth: usize,
}

impl Default for Shape {
    /// 1 to 16 nodes, a third of them leaves, some sharing, any window,
    /// depth up to 8.
    fn default() -> Self {
        Shape {
            nodes: 1..=16,
            leaves: 0.33,
            sharing: 0.3,
            window: usize::MAX,
            max_depth: 8,
        }
    }
}

/// One node of a [`Dag`]: a leaf value, or an op over earlier nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum DagNode<T> {
    /// A value, made with [`rask::value`](crate::value).
    Leaf(T),
    /// Op number `op` of the [`Ops`] over the nodes `inputs` (indices of
    /// earlier nodes).
    Op {
        /// Which op.
        op: usize,
        /// Its inputs, each an earlier node.
        inputs: Vec<usize>,
    },
}

/// A generated graph: nodes in topological order (every input is an
/// earlier node), as data. Build it into `Delayed` values with
/// [`build`](Dag::build) or [`outputs`](Dag::outputs); its `Debug` shows
/// one node per entry, e.g. `[0] 3, [1] sum(0, 0)`.
#[derive(Clone)]
pub struct Dag<T> {
    nodes: Vec<DagNode<T>>,
    ops: Ops<T>,
}

impl<T: fmt::Debug> fmt::Debug for Dag<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dag {{ ")?;
        for (i, node) in self.nodes.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            match node {
                DagNode::Leaf(v) => write!(f, "[{i}] {v:?}")?,
                DagNode::Op { op, inputs } => {
                    write!(f, "[{i}] {}(", self.ops.ops[*op].name)?;
                    for (j, input) in inputs.iter().enumerate() {
                        let sep = if j > 0 { ", " } else { "" };
                        write!(f, "{sep}{input}")?;
                    }
                    write!(f, ")")?;
                }
            }
        }
        write!(f, " }}")
    }
}

impl<T: Data> Dag<T> {
    /// The nodes, in topological order.
    pub fn nodes(&self) -> &[DagNode<T>] {
        &self.nodes
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph has no node (never, from [`dag`]).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The name of node `i`'s op, or `None` for a leaf.
    pub fn op_name(&self, i: usize) -> Option<&'static str> {
        match &self.nodes[i] {
            DagNode::Leaf(_) => None,
            DagNode::Op { op, .. } => Some(self.ops.ops[*op].name),
        }
    }

    /// Fresh `Delayed` values, one per node, in node order.
    pub fn build(&self) -> Vec<Delayed<T>> {
        let mut out: Vec<Delayed<T>> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let d = match node {
                DagNode::Leaf(v) => value(v.clone()),
                DagNode::Op { op, inputs } => {
                    let inputs = inputs.iter().map(|&i| out[i].clone()).collect();
                    (self.ops.ops[*op].build)(inputs)
                }
            };
            out.push(d);
        }
        out
    }

    /// The indices of the nodes no other node uses (the sinks).
    pub fn output_indices(&self) -> Vec<usize> {
        let mut used = vec![false; self.nodes.len()];
        for node in &self.nodes {
            if let DagNode::Op { inputs, .. } = node {
                for &i in inputs {
                    used[i] = true;
                }
            }
        }
        (0..self.nodes.len()).filter(|&i| !used[i]).collect()
    }

    /// Fresh `Delayed` values of the sinks: what a test computes.
    pub fn outputs(&self) -> Vec<Delayed<T>> {
        let all = self.build();
        self.output_indices()
            .into_iter()
            .map(|i| all[i].clone())
            .collect()
    }
}

/// What one node of a DAG is drawn as, before it is resolved against the
/// nodes before it: every choice is an [`Index`] or a bool, so that
/// removing a node while shrinking leaves every later node valid.
#[derive(Debug, Clone)]
struct Raw<T> {
    leaf: T,
    is_op: bool,
    op: Index,
    arity: Index,
    inputs: Vec<(Index, bool)>,
}

/// Random DAGs of `Delayed<T>`: leaves drawn from `leaves`, inner nodes
/// from `ops`, sized and formed by `shape`. Failing cases shrink by
/// removing nodes, turning ops into leaves, lowering fan-in and leaf
/// values, so what proptest reports is a small graph.
///
/// # Panics
///
/// When `shape.nodes` starts at 0.
///
/// # Examples
///
/// ```
/// use proptest::prelude::*;
/// use proptest::strategy::ValueTree;
/// use proptest::test_runner::TestRunner;
/// use rask::testing::{dag, Ops, Shape};
/// use rask::{delayed, Delayed};
/// fn sum(xs: Vec<i64>) -> i64 { xs.iter().sum() }
///
/// let ops = Ops::new().op("sum", 1..=3, |xs: Vec<Delayed<i64>>| delayed!(sum(xs)));
/// let shape = Shape { nodes: 5..=5, ..Shape::default() };
/// let mut runner = TestRunner::deterministic();
/// let graph = dag(0..100_i64, &ops, shape).new_tree(&mut runner).unwrap().current();
/// assert_eq!(graph.len(), 5);
/// assert!(!graph.outputs().is_empty());
/// ```
pub fn dag<T, S>(leaves: S, ops: &Ops<T>, shape: Shape) -> impl Strategy<Value = Dag<T>>
where
    T: Data + fmt::Debug,
    S: Strategy<Value = T> + Clone,
{
    assert!(*shape.nodes.start() >= 1, "a DAG has at least one node");
    let fan_in = ops.max_arity();
    let raw = (
        leaves,
        proptest::bool::weighted((1.0 - shape.leaves).clamp(0.0, 1.0)),
        any::<Index>(),
        any::<Index>(),
        proptest::collection::vec(
            (
                any::<Index>(),
                proptest::bool::weighted(shape.sharing.clamp(0.0, 1.0)),
            ),
            fan_in..=fan_in,
        ),
    )
        .prop_map(|(leaf, is_op, op, arity, inputs)| Raw {
            leaf,
            is_op,
            op,
            arity,
            inputs,
        });
    let ops = ops.clone();
    proptest::collection::vec(raw, shape.nodes.clone())
        .prop_map(move |raws| resolve(raws, &ops, &shape))
}

/// Turns drawn nodes into a DAG (see [`Raw`]): deterministic, so a raw
/// list and its shrunk versions always give a valid graph.
fn resolve<T: Data>(raws: Vec<Raw<T>>, ops: &Ops<T>, shape: &Shape) -> Dag<T> {
    let mut nodes = Vec::with_capacity(raws.len());
    let mut depth: Vec<usize> = Vec::with_capacity(raws.len());
    let mut consumers: Vec<usize> = vec![0; raws.len()];
    for (i, raw) in raws.into_iter().enumerate() {
        let start = i.saturating_sub(shape.window.max(1));
        let candidates: Vec<usize> = (start..i).filter(|&j| depth[j] < shape.max_depth).collect();
        if !raw.is_op || ops.is_empty() || candidates.is_empty() {
            nodes.push(DagNode::Leaf(raw.leaf));
            depth.push(0);
            continue;
        }
        let op = raw.op.index(ops.len());
        let entry = &ops.ops[op];
        let (lo, hi) = (*entry.arity.start(), *entry.arity.end());
        let arity = lo + raw.arity.index(hi - lo + 1);
        let mut inputs = Vec::with_capacity(arity);
        for &(pick, share) in raw.inputs.iter().take(arity) {
            let fresh: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&j| consumers[j] == 0)
                .collect();
            let from = if share || fresh.is_empty() {
                &candidates
            } else {
                &fresh
            };
            let input = from[pick.index(from.len())];
            consumers[input] += 1;
            inputs.push(input);
        }
        depth.push(1 + inputs.iter().map(|&j| depth[j]).max().unwrap_or(0));
        nodes.push(DagNode::Op { op, inputs });
    }
    Dag {
        nodes,
        ops: ops.clone(),
    }
}

/// One step of a futures [`Script`]. Indices pick among the DAG's nodes
/// (`Submit`) or among the futures held so far (the others); a step with
/// nothing to pick does nothing.
#[derive(Debug, Clone)]
pub enum Action {
    /// Submit one node.
    Submit(Index),
    /// Submit several nodes at once, as `Client::map` would.
    SubmitMany(Vec<Index>),
    /// Iterate `as_completed` over every future held; after the first one
    /// done, `add` one more node's future to it (Dask's dynamic search).
    AsCompleted {
        /// The node to submit and add while iterating.
        add: Option<Index>,
    },
    /// `wait_first` over every future held.
    WaitFirst,
    /// Cancel one future.
    Cancel(Index),
    /// Drop one future (releasing its result once no clone is left).
    Drop(Index),
    /// Ask one future for its result.
    Result(Index),
}

/// A random sequence of futures calls over a [`Dag`]; see [`script`].
#[derive(Debug, Clone)]
pub struct Script {
    /// The steps, in order.
    pub actions: Vec<Action>,
}

/// What a [`Script`] saw: per node, the outcomes of its futures' results.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptOutcome<T> {
    /// Node index → every outcome its futures gave, in the order seen.
    pub results: BTreeMap<usize, Vec<Outcome<T>>>,
}

impl<T: PartialEq + fmt::Debug> ScriptOutcome<T> {
    /// Checks that every outcome here that was not a cancellation equals
    /// the node's outcome in `reference` (e.g. the node computed on
    /// `sync`): whatever the order, a node's value does not change.
    ///
    /// # Errors
    ///
    /// The first node whose outcome differs, with both outcomes.
    pub fn consistent_with(&self, reference: &BTreeMap<usize, Outcome<T>>) -> Result<(), String> {
        for (node, outcomes) in &self.results {
            let Some(expected) = reference.get(node) else {
                continue;
            };
            for got in outcomes {
                if !matches!(got, Outcome::Cancelled) && got != expected {
                    return Err(format!(
                        "node {node}: a future gave {got:?}, computing it gives {expected:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Random futures scripts of `len` steps.
///
/// # Examples
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// use proptest::test_runner::TestRunner;
/// let script = rask::testing::script(3..=3)
///     .new_tree(&mut TestRunner::deterministic()).unwrap().current();
/// assert_eq!(script.actions.len(), 3);
/// ```
pub fn script(len: RangeInclusive<usize>) -> impl Strategy<Value = Script> {
    let action = prop_oneof![
        3 => any::<Index>().prop_map(Action::Submit),
        2 => proptest::collection::vec(any::<Index>(), 1..5).prop_map(Action::SubmitMany),
        1 => proptest::option::of(any::<Index>()).prop_map(|add| Action::AsCompleted { add }),
        1 => Just(Action::WaitFirst),
        1 => any::<Index>().prop_map(Action::Cancel),
        1 => any::<Index>().prop_map(Action::Drop),
        1 => any::<Index>().prop_map(Action::Result),
    ];
    proptest::collection::vec(action, len).prop_map(|actions| Script { actions })
}

impl Script {
    /// Plays the script on `client` over fresh `Delayed` values of `dag`,
    /// then asks every future still held for its result.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::testing::{dag, outcomes, script, Ops, Shape};
    /// use rask::{delayed, Client, Config, Delayed};
    /// # use proptest::strategy::{Strategy, ValueTree};
    /// fn sum(xs: Vec<i64>) -> i64 { xs.iter().sum() }
    ///
    /// let ops = Ops::new().op("sum", 1..=2, |xs: Vec<Delayed<i64>>| delayed!(sum(xs)));
    /// # let mut runner = proptest::test_runner::TestRunner::deterministic();
    /// let graph = dag(0..9_i64, &ops, Shape::default()).new_tree(&mut runner).unwrap().current();
    /// let script = script(1..=6).new_tree(&mut runner).unwrap().current();
    /// let seen = script.run(&graph, &Client::simulated(3)?);
    /// let reference = outcomes(&graph.build(), &Config::synchronous()).into_iter().enumerate().collect();
    /// seen.consistent_with(&reference).unwrap();
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn run<T: Data>(&self, dag: &Dag<T>, client: &Client) -> ScriptOutcome<T> {
        let nodes = dag.build();
        let mut held: Vec<(usize, Future<T>)> = Vec::new();
        let mut results: BTreeMap<usize, Vec<Outcome<T>>> = BTreeMap::new();
        let mut record = |node: usize, f: &Future<T>| {
            results
                .entry(node)
                .or_default()
                .push(Outcome::from_result(f.result()));
        };
        let submit = |held: &mut Vec<(usize, Future<T>)>, pick: &Index| -> Option<usize> {
            if nodes.is_empty() {
                return None;
            }
            let node = pick.index(nodes.len());
            let f = client.submit(&nodes[node]).ok()?;
            held.push((node, f));
            Some(held.len() - 1)
        };
        for action in &self.actions {
            match action {
                Action::Submit(pick) => {
                    submit(&mut held, pick);
                }
                Action::SubmitMany(picks) => {
                    for pick in picks {
                        submit(&mut held, pick);
                    }
                }
                Action::AsCompleted { add } => {
                    let by_key: Vec<(usize, Future<T>)> = held.clone();
                    let mut seq = as_completed(held.iter().map(|(_, f)| f.clone()));
                    let mut added = add.as_ref();
                    let mut extra: Vec<(usize, Future<T>)> = Vec::new();
                    while let Some(done) = seq.next() {
                        let node = by_key
                            .iter()
                            .chain(extra.iter())
                            .find(|(_, f)| f.key() == done.key())
                            .map(|(n, _)| *n)
                            .expect("as_completed yields the futures given to it");
                        record(node, &done);
                        if let Some(pick) = added.take() {
                            if let Some(at) = submit(&mut held, pick) {
                                seq.add(held[at].1.clone());
                                extra.push(held[at].clone());
                            }
                        }
                    }
                }
                Action::WaitFirst => {
                    let futures: Vec<Future<T>> = held.iter().map(|(_, f)| f.clone()).collect();
                    let _ = wait_first(&futures);
                }
                Action::Cancel(pick) if !held.is_empty() => {
                    held[pick.index(held.len())].1.cancel();
                }
                Action::Drop(pick) if !held.is_empty() => {
                    // Dropping it is the point: its work is released.
                    drop(held.remove(pick.index(held.len())));
                }
                Action::Result(pick) if !held.is_empty() => {
                    let (node, f) = &held[pick.index(held.len())];
                    record(*node, f);
                }
                Action::Cancel(_) | Action::Drop(_) | Action::Result(_) => {}
            }
        }
        for (node, f) in &held {
            record(*node, f);
        }
        ScriptOutcome { results }
    }
}
