//! Graphs: the post-order walk lowering and DOT rendering share, and
//! [`Graph`], the low-level graph keyed by [`Key`]. Lowering itself is the
//! plan layer's (`plan/lower.rs`).
//!
//! Rules:
//!
//! 1. Tasks with equal keys are one task: lowering keeps the first node found
//!    for a key, so shared work runs once, within a graph and across graphs
//!    merged into one computation.
//! 2. Lowering visits dependencies depth-first, in argument order, and emits a
//!    task after its inputs (a post-order). That order is the plan order: a
//!    branch finishes before the next one starts, which keeps few
//!    intermediate values alive at once.
//! 3. A graph of `Delayed`s cannot have a cycle (a node's inputs exist before
//!    it). A [`Graph`] assembled by hand can, and is checked before it runs.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Value};

use crate::build::data::Data;
use crate::build::delayed::{named_key, Delayed, TaskKey};
use crate::build::node::{Call, Held, Name, Node, Origin};
use crate::{Error, Result};

/// Keys are uniformly random already: their first eight bytes are the hash.
#[derive(Default)]
pub(crate) struct KeyHash(u64);

impl Hasher for KeyHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `Key` hashes as its 32-byte array: a length prefix, then the bytes.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
            self.0 = self.0.rotate_left(5);
        }
    }
    fn write_usize(&mut self, _len: usize) {}
}

pub(crate) type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHash>>;

/// Visits the nodes reachable from `roots` in post-order (rule 2), once per
/// key (rule 1), calling `emit(node, replacement, dependency_indices, size)`;
/// returns the index of every key, numbered in visit order.
///
/// `cut(node)` is asked once per key before its inputs are visited: `Some(op)`
/// replaces the node and everything it depends on with `op`, which gets no
/// dependencies (e.g. a value the caller already holds).
///
/// `absorb(node)`, asked after `cut` said `None`, may fold the chain of
/// inputs below a node into one op (the plan layer's `chain::absorb`):
/// `Some((bottom, op, size))` emits `op`, standing for `size` nodes, with the
/// inputs of the chain's `bottom`; the nodes in between are not visited (nor
/// asked about).
pub(crate) fn postorder<'a>(
    roots: &'a [Arc<Node>],
    mut absorb: impl FnMut(&'a Arc<Node>) -> Option<(&'a Arc<Node>, Arc<dyn Op>, u32)>,
    mut cut: impl FnMut(&Arc<Node>) -> Option<Arc<dyn Op>>,
    mut emit: impl FnMut(&'a Arc<Node>, Option<Arc<dyn Op>>, &[u32], u32),
) -> KeyMap<u32> {
    /// A node being visited (kept small: a chain of unabsorbed nodes is
    /// visited with one frame per node).
    struct Frame<'a> {
        node: &'a Arc<Node>,
        /// Whose inputs are visited: the node, or the bottom of its chain
        /// (then the chain is on top of `chains`).
        visit: &'a Arc<Node>,
        /// The next input of `visit`.
        next: u32,
        /// Where the inputs' indices start in `found`.
        from: u32,
    }
    let mut index: KeyMap<u32> = KeyMap::default();
    let mut stack: Vec<Frame<'a>> = Vec::new();
    let mut chains: Vec<(Arc<dyn Op>, u32)> = Vec::new();
    // Collecting indices as inputs finish keeps lowering at one map lookup
    // per edge and one insertion per node.
    let mut found: Vec<u32> = Vec::new();
    // Emits a node (unless its key is taken: the first one wins, see
    // `Delayed::named`) and records its index for its parent.
    macro_rules! finish {
        ($node:expr, $replacement:expr, $deps_from:expr, $size:expr) => {{
            let node: &'a Arc<Node> = $node;
            let next = index.len() as u32;
            let i = match index.entry(node.key) {
                MapEntry::Occupied(e) => *e.get(),
                MapEntry::Vacant(slot) => {
                    emit(node, $replacement, &found[$deps_from..], $size);
                    *slot.insert(next)
                }
            };
            found.truncate($deps_from);
            found.push(i);
        }};
    }
    // Asks `cut` about a node before its inputs are visited.
    macro_rules! enter {
        ($node:expr) => {{
            let node: &'a Arc<Node> = $node;
            match cut(node) {
                Some(op) => {
                    let from = found.len();
                    finish!(node, Some(op), from, 1);
                }
                None => {
                    let mut visit = node;
                    if let Some((bottom, chain, size)) = absorb(node) {
                        visit = bottom;
                        chains.push((chain, size));
                    }
                    stack.push(Frame {
                        node,
                        visit,
                        next: 0,
                        from: found.len() as u32,
                    });
                }
            }
        }};
    }
    for root in roots {
        if index.contains_key(&root.key) {
            continue;
        }
        found.clear();
        enter!(root);
        while let Some(top) = stack.last_mut() {
            if let Some(child) = top.visit.deps.get(top.next as usize) {
                top.next += 1;
                match index.get(&child.key) {
                    Some(&i) => found.push(i),
                    None => enter!(child),
                }
                continue;
            }
            let Some(Frame {
                node, visit, from, ..
            }) = stack.pop()
            else {
                break;
            };
            let from = from as usize;
            match chains.pop_if(|_| !Arc::ptr_eq(node, visit)) {
                Some((chain, size)) => finish!(node, Some(chain), from, size),
                None => finish!(node, None, from, 1),
            }
        }
    }
    index
}

/// Renders the graph behind `roots` as Graphviz DOT.
pub(crate) fn to_dot(roots: &[Arc<Node>]) -> String {
    let mut out = String::from("digraph rask {\n  rankdir=BT;\n");
    let mut count = 0u32;
    postorder(
        roots,
        |_| None,
        |_| None,
        |node, _, deps, _| {
            let shape = if node.is_data() { "box" } else { "ellipse" };
            let label = format!("{}-{}", node.name, node.key.short()).replace('"', "\\\"");
            let _ = writeln!(out, "  n{count} [label=\"{label}\", shape={shape}];");
            for d in deps {
                let _ = writeln!(out, "  n{d} -> n{count};");
            }
            count += 1;
        },
    );
    out.push_str("}\n");
    out
}

/// A graph as a map from key to task: the low-level way to assemble graphs by
/// hand, merge graphs, and inspect them.
///
/// Unlike `Delayed` graphs, a hand-made graph can name dependencies that do
/// not exist or form a cycle; [`Graph::validate`] (called before anything
/// runs) reports both.
///
/// # Examples
///
/// ```
/// use rask::{named_key, Graph};
///
/// let mut g = Graph::new();
/// let a = g.insert_value("a", 20_i64);
/// let b = g.insert_task("b", &[a], |v| v[0].downcast_ref::<i64>().copied().unwrap_or(0) * 2 + 2);
/// assert_eq!(g.compute::<i64>(b)?, 42);
///
/// // A cycle assembled by hand is an error, not a hang.
/// let mut bad = Graph::new();
/// bad.insert_task("x", &[named_key("y")], |_| 0_i64);
/// bad.insert_task("y", &[named_key("x")], |_| 0_i64);
/// assert!(matches!(bad.validate(), Err(rask::Error::Cycle(_))));
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Default, Clone)]
pub struct Graph {
    tasks: KeyMap<Task>,
    /// Keys in insertion order, so that rendering and iteration are stable.
    order: Vec<Key>,
}

#[derive(Clone)]
struct Task {
    name: Name,
    deps: Vec<Key>,
    call: Arc<dyn Call>,
}

/// A hand-written task body.
struct Raw<F>(F);

impl<T: Data, F: Fn(&[Value]) -> T + Send + Sync + 'static> Call for Raw<F> {
    fn run(&self, inputs: &mut [Option<Value>]) -> std::result::Result<Value, OpError> {
        let values: Vec<Value> = inputs
            .iter_mut()
            .map(|v| {
                v.take()
                    .ok_or_else(|| OpError::failed("an input is missing"))
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Arc::new((self.0)(&values)))
    }
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Graph::default()
    }

    /// The graph of everything `delayed` depends on, itself included.
    ///
    /// ```
    /// fn inc(x: i64) -> i64 { x + 1 }
    /// fn add(x: i64, y: i64) -> i64 { x + y }
    /// let x = rask::delayed!(inc(1));
    /// let total = rask::delayed!(add(&x, &x));
    /// assert_eq!(rask::Graph::from_delayed(&total).len(), 2);
    /// ```
    pub fn from_delayed<T>(delayed: &Delayed<T>) -> Self {
        let mut g = Graph::new();
        g.insert(delayed);
        g
    }

    /// Adds everything `delayed` depends on; keys already present are kept.
    /// Returns `delayed`'s key.
    pub fn insert<T>(&mut self, delayed: &Delayed<T>) -> Key {
        postorder(
            std::slice::from_ref(delayed.node()),
            |_| None,
            |_| None,
            |node, _, _, _| {
                self.add(
                    node.key,
                    Task {
                        name: node.name.clone(),
                        deps: node.deps.iter().map(|d| d.key).collect(),
                        call: node.call.clone(),
                    },
                );
            },
        );
        delayed.node().key
    }

    /// Adds every task of `other`; keys already present are kept (they stand
    /// for the same work).
    pub fn merge(&mut self, other: &Graph) {
        for key in &other.order {
            self.add(*key, other.tasks[key].clone());
        }
    }

    /// Adds a value under `name`; its key is [`named_key(name)`](named_key).
    pub fn insert_value<T: Data>(&mut self, name: &str, value: T) -> Key {
        let key = named_key(name);
        self.add(
            key,
            Task {
                name: Name::Owned(name.to_owned()),
                deps: Vec::new(),
                call: Arc::new(Held(Arc::new(value), Origin::Literal)),
            },
        );
        key
    }

    /// Adds a task named `name` (key [`named_key(name)`](named_key)) that
    /// calls `f` with the values of `deps`, in order. The dependencies need
    /// not exist yet; [`validate`](Graph::validate) checks them.
    pub fn insert_task<T, F>(&mut self, name: &str, deps: &[Key], f: F) -> Key
    where
        T: Data,
        F: Fn(&[Value]) -> T + Send + Sync + 'static,
    {
        let key = named_key(name);
        self.add(
            key,
            Task {
                name: Name::Owned(name.to_owned()),
                deps: deps.to_vec(),
                call: Arc::new(Raw(f)),
            },
        );
        key
    }

    fn add(&mut self, key: Key, task: Task) {
        if let MapEntry::Vacant(slot) = self.tasks.entry(key) {
            slot.insert(task);
            self.order.push(key);
        }
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the graph has no task.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Whether a task has this key.
    pub fn contains(&self, key: Key) -> bool {
        self.tasks.contains_key(&key)
    }

    /// The keys of all tasks, in insertion order, with their names.
    pub fn keys(&self) -> impl Iterator<Item = TaskKey> + '_ {
        self.order
            .iter()
            .map(|k| TaskKey::from_parts(Arc::from(&*self.tasks[k].name), *k))
    }

    /// Checks that every dependency exists and that there is no cycle.
    ///
    /// # Errors
    ///
    /// [`Error::MissingDependency`] or [`Error::Cycle`].
    ///
    /// # Complexity
    ///
    /// O(tasks + edges).
    pub fn validate(&self) -> Result<()> {
        self.nodes(&self.order).map(|_| ())
    }

    /// A typed handle to the task with this key, to compute it or build on it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownKey`], or what [`validate`](Graph::validate) reports for
    /// the part of the graph the key depends on. A wrong `T` is reported as
    /// [`Error::WrongType`] when the value is computed.
    pub fn delayed<T: Data>(&self, key: Key) -> Result<Delayed<T>> {
        let mut nodes = self.nodes(&[key])?;
        Ok(Delayed::from_node(
            nodes.pop().expect("one node per key asked"),
        ))
    }

    /// Renders the whole graph as Graphviz DOT.
    ///
    /// # Errors
    ///
    /// As [`validate`](Graph::validate).
    pub fn to_dot(&self) -> Result<String> {
        Ok(to_dot(&self.nodes(&self.order)?))
    }

    /// Builds the nodes for `keys` (and everything they depend on), checking
    /// for missing dependencies and cycles.
    fn nodes(&self, keys: &[Key]) -> Result<Vec<Arc<Node>>> {
        #[derive(Clone)]
        enum Mark {
            Visiting,
            Done(Arc<Node>),
        }
        let mut marks: KeyMap<Mark> = KeyMap::default();
        let mut out = Vec::with_capacity(keys.len());
        let task_key = |key: &Key| TaskKey::from_parts(Arc::from(&*self.tasks[key].name), *key);
        for key in keys {
            if !self.tasks.contains_key(key) {
                return Err(Error::UnknownKey(*key));
            }
            let mut stack: Vec<(Key, usize)> = vec![(*key, 0)];
            while let Some(top) = stack.last_mut() {
                let (k, next) = *top;
                if next == 0 {
                    if let Some(Mark::Done(_)) = marks.get(&k) {
                        stack.pop();
                        continue;
                    }
                    marks.insert(k, Mark::Visiting);
                }
                let task = &self.tasks[&k];
                if let Some(dep) = task.deps.get(next) {
                    top.1 += 1;
                    if !self.tasks.contains_key(dep) {
                        return Err(Error::MissingDependency {
                            task: task_key(&k),
                            missing: *dep,
                        });
                    }
                    match marks.get(dep) {
                        Some(Mark::Done(_)) => {}
                        Some(Mark::Visiting) => return Err(Error::Cycle(task_key(dep))),
                        None => stack.push((*dep, 0)),
                    }
                    continue;
                }
                stack.pop();
                let deps = task
                    .deps
                    .iter()
                    .map(|d| match &marks[d] {
                        Mark::Done(node) => node.clone(),
                        Mark::Visiting => unreachable!("a finished task's inputs are finished"),
                    })
                    .collect::<Vec<_>>()
                    .into();
                let node = Arc::new(Node {
                    key: k,
                    name: task.name.clone(),
                    deps,
                    call: task.call.clone(),
                });
                marks.insert(k, Mark::Done(node));
            }
            match &marks[key] {
                Mark::Done(node) => out.push(node.clone()),
                Mark::Visiting => unreachable!("the walk finishes every task it starts"),
            }
        }
        Ok(out)
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys()).finish()
    }
}
