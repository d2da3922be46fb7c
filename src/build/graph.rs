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
//! 4. A [`Graph`]'s keys are its tasks' names ([`named_key`]), but the nodes
//!    it builds to run ([`Graph::delayed`], [`Graph::compute`]) are keyed by
//!    what they hold: a value by its name, type and data (as
//!    [`value_named`](crate::value_named)), a hand-written task by a key
//!    drawn fresh where it was inserted, hashed over its inputs' node keys.
//!    So tasks of one name in two graphs never stand for each other where
//!    nodes meet: in one computation, in a client's results, on a cluster.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Value};

use crate::build::data::Data;
use crate::build::delayed::{named_key, Delayed, TaskKey};
use crate::build::key::{nonce, KeyHasher, Tag};
use crate::build::node::{Call, Label, Name, Node};
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
/// returns the index of each root, numbered in visit order.
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
///
/// # Complexity
///
/// O(nodes + edges), one key-map lookup per edge and one insertion per node.
/// [`postorder_marked`] does without the map.
pub(crate) fn postorder<'a>(
    roots: &'a [Arc<Node>],
    absorb: impl FnMut(&'a Arc<Node>) -> Option<(&'a Arc<Node>, Arc<dyn Op>, u32)>,
    cut: impl FnMut(&Arc<Node>) -> Option<Arc<dyn Op>>,
    emit: impl FnMut(&'a Arc<Node>, Option<Arc<dyn Op>>, &[u32], u32),
) -> Vec<u32> {
    walk(roots, &mut KeyMap::default(), absorb, cut, emit)
}

/// [`postorder`] finding the nodes it already emitted by their
/// [`Mark`](crate::build::node::Mark) instead of a key map: on a large
/// graph the map's probes and insertions miss the caches on nearly every
/// node, while a mark sits in the node the walk reads anyway. `tasks`,
/// about how many nodes it emits ([`tasks_hint`]), sizes its lists.
///
/// Marks tell nodes apart, not keys: two distinct nodes with one key would
/// both be emitted. So the keys emitted are checked for repeats afterwards
/// (by fingerprint, in cache-sized buckets), and `None` is returned when
/// one repeats, or when another lowering holds the marks (node rule 1):
/// the caller then starts again with [`postorder`], which asks `cut` and
/// `absorb` about the same nodes again, and throws away what `emit` got.
/// Rare in practice (a repeat needs the same task built twice), it then
/// costs a second lowering.
///
/// The check leaves out the nodes that cannot hold the first of a repeat
/// (see [`Marks::claim`]): in a tree, every node with inputs.
///
/// # Complexity
///
/// O(nodes + edges), no map; the repeat check is two passes over 8 bytes
/// per node checked.
pub(crate) fn postorder_marked<'a>(
    roots: &'a [Arc<Node>],
    tasks: usize,
    absorb: impl FnMut(&'a Arc<Node>) -> Option<(&'a Arc<Node>, Arc<dyn Op>, u32)>,
    cut: impl FnMut(&Arc<Node>) -> Option<Arc<dyn Op>>,
    emit: impl FnMut(&'a Arc<Node>, Option<Arc<dyn Op>>, &[u32], u32),
) -> Option<Vec<u32>> {
    let mut marks = Marks::take(tasks)?;
    let indices = walk(roots, &mut marks, absorb, cut, emit);
    // The next lowering of these roots (a second `compute`) sizes its lists
    // by this one (node rule 3): each root the tasks emitted while it was
    // walked, which add up to this lowering's (a root emitted before, under
    // another root, keeps its index and estimates 1).
    let mut before: u32 = 0;
    for (root, &index) in roots.iter().zip(&indices) {
        let after = index.saturating_add(1);
        if let Some(tasks) = after.checked_sub(before).filter(|&tasks| tasks > 0) {
            root.mark.set(0, tasks);
            before = after;
        }
    }
    let mut fingerprints = std::mem::take(&mut marks.fingerprints);
    if marks.stand_in {
        fingerprints.append(&mut marks.left_out);
    }
    drop(marks);
    (!repeats(fingerprints)).then_some(indices)
}

/// About how many tasks lowering `roots` makes, by their estimates (node
/// rule 3): what a lowering reserves room for, so that lists of millions of
/// tasks are not copied as they grow.
pub(crate) fn tasks_hint(roots: &[Arc<Node>]) -> usize {
    roots
        .iter()
        .fold(0u32, |sum, root| sum.saturating_add(root.mark.estimate())) as usize
}

/// How [`walk`] remembers the nodes it emitted.
trait Seen<'a> {
    /// The index of a node (or of its key) emitted before.
    fn get(&self, node: &'a Arc<Node>) -> Option<u32>;
    /// Records `node` as the next index, unless its key has one already:
    /// then that index. `plain`: it is emitted as itself (not cut or the
    /// top of a chain), its inputs' indices start with `first`.
    fn claim(&mut self, node: &'a Arc<Node>, plain: bool, first: Option<u32>) -> Result<u32, u32>;
}

impl<'a> Seen<'a> for KeyMap<u32> {
    fn get(&self, node: &'a Arc<Node>) -> Option<u32> {
        KeyMap::get(self, &node.key).copied()
    }

    fn claim(&mut self, node: &'a Arc<Node>, _: bool, _: Option<u32>) -> Result<u32, u32> {
        let next = self.len() as u32;
        match self.entry(node.key) {
            MapEntry::Occupied(e) => Err(*e.get()),
            MapEntry::Vacant(slot) => Ok(*slot.insert(next)),
        }
    }
}

/// The process-wide marking token (node rule 1).
static MARKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The epoch of the last lowering that held the token (node rule 2); only
/// the token holder changes it.
static EPOCH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The marks of one lowering: holds the token, and gives it back when
/// dropped, unwinding included. Its marks need no unsetting: the next
/// lowering has another epoch (node rule 2).
struct Marks {
    epoch: u32,
    /// The emitted nodes' key fingerprints, taken while the walk has each
    /// node at hand (the repeat check needs no second visit to every
    /// node); of the nodes [`Marks::claim`] leaves out, in `left_out`.
    fingerprints: Vec<u64>,
    left_out: Vec<u64>,
    /// Whether a node stands in for another's work
    /// ([`Call::stands_in`]) is
    /// emitted: then none is left out.
    stand_in: bool,
    /// One bit per emitted node, by index: whether nothing but one node (or
    /// one handle) held it when it was emitted.
    alone: Vec<u64>,
}

impl Marks {
    /// The token and a fresh epoch, unless another lowering holds the token
    /// or the epochs ran out; room for about `tasks` nodes.
    fn take(tasks: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        MARKING
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // Never wraps: an epoch used once is never used again, whatever
        // marks it left behind.
        let Some(epoch) = EPOCH.load(Ordering::Relaxed).checked_add(1) else {
            MARKING.store(false, Ordering::Release);
            return None;
        };
        EPOCH.store(epoch, Ordering::Relaxed);
        Some(Marks {
            epoch,
            left_out: Vec::with_capacity(tasks),
            stand_in: false,
            alone: Vec::with_capacity(tasks.div_ceil(64)),
            fingerprints: Vec::with_capacity(tasks),
        })
    }

    /// How many nodes were emitted so far: the next one's index.
    fn emitted(&self) -> u32 {
        (self.fingerprints.len() + self.left_out.len()) as u32
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        MARKING.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl<'a> Seen<'a> for Marks {
    fn get(&self, node: &'a Arc<Node>) -> Option<u32> {
        node.mark.get(self.epoch)
    }

    /// Leaves a node out of the repeat check when it cannot hold the first
    /// of a repeated key: emitted as itself, its key derived from its
    /// inputs' ([`Label::Static`]), and its first input held by nothing
    /// else when that was emitted (by its own reference count). Another
    /// node with its key then has a first input of the same key that is
    /// another node: a repeat below, which is checked, or (inductively)
    /// has one below it. Down to nodes without inputs, all of which are
    /// checked, unless one stands in for another's work under its key (a
    /// future, a held result): then every node is.
    fn claim(&mut self, node: &'a Arc<Node>, plain: bool, first: Option<u32>) -> Result<u32, u32> {
        if let Some(i) = node.mark.get(self.epoch) {
            return Err(i);
        }
        let next = self.emitted();
        node.mark.set(self.epoch, next);
        let (word, bit) = (next as usize / 64, next % 64);
        if word == self.alone.len() {
            self.alone.push(0);
        }
        // Before `emit` holds it too.
        if Arc::strong_count(node) == 1 {
            self.alone[word] |= 1 << bit;
        }
        let fingerprint = fingerprint(&node.key);
        match node.label {
            Label::Static(_) => {
                let alone = |d: u32| self.alone[d as usize / 64] >> (d % 64) & 1 == 1;
                if plain && first.is_some_and(alone) {
                    self.left_out.push(fingerprint);
                    return Ok(next);
                }
            }
            Label::Call => self.stand_in |= node.deps.is_empty() && node.call.stands_in(),
        }
        self.fingerprints.push(fingerprint);
        Ok(next)
    }
}

/// A key's first eight bytes: keys are uniform already.
fn fingerprint(key: &Key) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&key.as_bytes()[..8]);
    u64::from_le_bytes(word)
}

/// Whether a fingerprint occurs twice. Sorted into buckets by their top
/// bits first, so that each bucket's table fits in a cache: one probe per
/// fingerprint that hits a cache, where one table over a million keys would
/// miss on nearly every probe.
fn repeats(fingerprints: Vec<u64>) -> bool {
    /// Fingerprints per bucket, about.
    const BUCKET: usize = 1 << 12;
    let bits = (fingerprints.len() / BUCKET)
        .next_power_of_two()
        .trailing_zeros();
    let mut buckets = vec![0usize; (1 << bits) + 1];
    // `checked_shr`: with one bucket (`bits` = 0) every fingerprint is in it.
    let bucket = |f: u64| f.checked_shr(64 - bits).unwrap_or(0) as usize;
    for &f in &fingerprints {
        buckets[bucket(f) + 1] += 1;
    }
    for b in 1..buckets.len() {
        buckets[b] += buckets[b - 1];
    }
    let mut sorted = vec![0u64; fingerprints.len()];
    let mut fill = buckets.clone();
    for &f in &fingerprints {
        let b = bucket(f);
        sorted[fill[b]] = f;
        fill[b] += 1;
    }
    drop(fingerprints);
    // Open addressing over the low bits; a slot holds a fingerprint + 1 (0
    // is empty), so fingerprint `u64::MAX` takes the slot of 0's successor:
    // a repeat reported for two fingerprints that differ costs a relowering
    // only.
    let mut table: Vec<u64> = Vec::new();
    for w in buckets.windows(2) {
        let bucket = &sorted[w[0]..w[1]];
        let size = (bucket.len() * 2).next_power_of_two();
        table.clear();
        table.resize(size, 0);
        let mask = size - 1;
        for &f in bucket {
            let stored = f.wrapping_add(1).max(1);
            let mut slot = (f as usize) & mask;
            loop {
                match table[slot] {
                    0 => {
                        table[slot] = stored;
                        break;
                    }
                    s if s == stored => return true,
                    _ => slot = (slot + 1) & mask,
                }
            }
        }
    }
    false
}

/// The post-order walk of [`postorder`] and [`postorder_marked`].
fn walk<'a>(
    roots: &'a [Arc<Node>],
    seen: &mut impl Seen<'a>,
    mut absorb: impl FnMut(&'a Arc<Node>) -> Option<(&'a Arc<Node>, Arc<dyn Op>, u32)>,
    mut cut: impl FnMut(&Arc<Node>) -> Option<Arc<dyn Op>>,
    mut emit: impl FnMut(&'a Arc<Node>, Option<Arc<dyn Op>>, &[u32], u32),
) -> Vec<u32> {
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
    let mut stack: Vec<Frame<'a>> = Vec::new();
    let mut chains: Vec<(Arc<dyn Op>, u32)> = Vec::new();
    // Collecting indices as inputs finish keeps lowering at one lookup per
    // edge and one insertion per node.
    let mut found: Vec<u32> = Vec::new();
    let mut root_indices = Vec::with_capacity(roots.len());
    // Emits a node (unless its key is taken: the first one wins, see
    // `Delayed::named`) and records its index for its parent.
    macro_rules! finish {
        ($node:expr, $replacement:expr, $deps_from:expr, $size:expr) => {{
            let node: &'a Arc<Node> = $node;
            let replacement: Option<Arc<dyn Op>> = $replacement;
            let i = match seen.claim(node, replacement.is_none(), found.get($deps_from).copied()) {
                Err(i) => i,
                Ok(i) => {
                    emit(node, replacement, &found[$deps_from..], $size);
                    i
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
        if let Some(i) = seen.get(root) {
            root_indices.push(i);
            continue;
        }
        found.clear();
        enter!(root);
        while let Some(top) = stack.last_mut() {
            if let Some(child) = top.visit.deps.get(top.next as usize) {
                top.next += 1;
                match seen.get(child) {
                    Some(i) => found.push(i),
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
        root_indices.push(found[0]);
    }
    root_indices
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
            let label = format!("{}-{}", node.name(), node.key.short()).replace('"', "\\\"");
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
/// not exist, form a cycle, or give one name (its tasks' key) to two tasks;
/// [`Graph::validate`] (called before anything runs) reports all three.
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
    /// Names given to a second, different task ([`Graph::insert_task`],
    /// [`Graph::insert_value`], [`Graph::merge`]): a name is such a task's
    /// key, so the second could only be dropped or replace the first, and
    /// either would change a result silently. [`Graph::validate`] reports
    /// the first.
    renamed: Vec<TaskKey>,
}

#[derive(Clone)]
struct Task {
    label: Label,
    deps: Vec<Key>,
    call: Arc<dyn Call>,
    /// Whether its key is its name's ([`named_key`]), not its work's.
    by_name: bool,
    /// What its node's key is made of (rule 4).
    identity: Identity,
}

/// What a task's node is keyed by when the graph runs or is built on
/// (rule 4): never its name alone, which the graph's keys are.
#[derive(Clone, Copy)]
enum Identity {
    /// This key: a node's of a `Delayed` graph, or a value's (its name,
    /// type and data, as [`value_named`](crate::value_named)'s).
    Own(Key),
    /// A hand-written task: this key, fresh where it was inserted, over its
    /// inputs' node keys.
    Over(Key),
}

impl Identity {
    /// The key of a node of this identity over the nodes `deps`.
    fn key(self, deps: &[Arc<Node>]) -> Key {
        match self {
            Identity::Own(key) => key,
            Identity::Over(own) => {
                let mut h = KeyHasher::new(Tag::Unique, "graph task", "");
                h.input(&own);
                for dep in deps {
                    h.input(&dep.key);
                }
                h.finish()
            }
        }
    }
}

impl Task {
    fn name(&self) -> &str {
        self.label.name(&*self.call)
    }
}

/// A hand-written task body, and its task's name.
struct Raw<F>(F, Name);

impl<T: Data, F: Fn(&[Value]) -> T + Send + Sync + 'static> Call for Raw<F> {
    fn output_type(&self) -> Option<std::any::TypeId> {
        Some(std::any::TypeId::of::<T>())
    }

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

    fn name(&self) -> &str {
        &self.1
    }

    fn stands_in(&self) -> bool {
        false
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

    /// Adds everything `delayed` depends on, under their keys (of their
    /// work, not their names); keys already present are kept (they stand
    /// for the same work). Returns `delayed`'s key.
    pub fn insert<T>(&mut self, delayed: &Delayed<T>) -> Key {
        postorder(
            std::slice::from_ref(delayed.node()),
            |_| None,
            |_| None,
            |node, _, _, _| {
                self.add(
                    node.key,
                    Task {
                        label: node.label,
                        deps: node.deps.iter().map(|d| d.key).collect(),
                        call: node.call.clone(),
                        by_name: false,
                        identity: Identity::Own(node.key),
                    },
                );
            },
        );
        delayed.node().key
    }

    /// Adds every task of `other`; keys already present are kept (they stand
    /// for the same work). A name that each graph gave to a task of its
    /// own ([`insert_task`](Graph::insert_task),
    /// [`insert_value`](Graph::insert_value)) is an error that
    /// [`validate`](Graph::validate) reports: the two tasks would share
    /// one key.
    pub fn merge(&mut self, other: &Graph) {
        for key in &other.order {
            self.add(*key, other.tasks[key].clone());
        }
        self.renamed.extend(other.renamed.iter().cloned());
    }

    /// Adds a value under `name`; its key is [`named_key(name)`](named_key).
    /// A name given twice is an error that [`validate`](Graph::validate)
    /// reports (the first task would be kept, silently).
    pub fn insert_value<T: Data>(&mut self, name: &str, value: T) -> Key {
        let key = named_key(name);
        let wrapped = crate::value_named(name, value);
        self.add(
            key,
            Task {
                label: Label::Call,
                deps: Vec::new(),
                call: wrapped.node().call.clone(),
                by_name: true,
                identity: Identity::Own(wrapped.node().key),
            },
        );
        key
    }

    /// Adds a task named `name` (key [`named_key(name)`](named_key)) that
    /// calls `f` with the values of `deps`, in order. The dependencies need
    /// not exist yet; [`validate`](Graph::validate) checks them, and
    /// reports a name given twice.
    pub fn insert_task<T, F>(&mut self, name: &str, deps: &[Key], f: F) -> Key
    where
        T: Data,
        F: Fn(&[Value]) -> T + Send + Sync + 'static,
    {
        let key = named_key(name);
        let mut fresh = KeyHasher::new(Tag::Unique, name, "graph task");
        fresh.bytes(&nonce());
        self.add(
            key,
            Task {
                label: Label::Call,
                deps: deps.to_vec(),
                call: Arc::new(Raw(f, Name::Owned(name.to_owned()))),
                by_name: true,
                identity: Identity::Over(fresh.finish()),
            },
        );
        key
    }

    /// Adds `task` under `key`, unless the key is there: then the task
    /// there stays, and a task keyed by its name that is not that very
    /// task is recorded as a name given twice.
    fn add(&mut self, key: Key, task: Task) {
        match self.tasks.entry(key) {
            MapEntry::Vacant(slot) => {
                slot.insert(task);
                self.order.push(key);
            }
            MapEntry::Occupied(there) => {
                if task.by_name && !Arc::ptr_eq(&there.get().call, &task.call) {
                    let name: Arc<str> = Arc::from(task.name());
                    self.renamed.push(TaskKey::from_parts(name, key));
                }
            }
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
            .map(|k| TaskKey::from_parts(Arc::from(self.tasks[k].name()), *k))
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
    /// The handle's own key is its node's (rule 4), not `key`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownKey`], or what [`validate`](Graph::validate) reports for
    /// the part of the graph the key depends on. A wrong `T` is reported as
    /// [`Error::WrongType`] here when the task's type is known (a call built
    /// by `delayed!`, a wrapped value, a future, a persisted result, a part
    /// picked from a value, a body given to
    /// [`insert_task`](Graph::insert_task), and each of these once it
    /// travelled to another process inside a task's argument), else when
    /// the value is computed.
    pub fn delayed<T: Data>(&self, key: Key) -> Result<Delayed<T>> {
        let mut nodes = self.nodes(&[key])?;
        let node = nodes.pop().expect("one node per key asked");
        // Known here: refused here, before a cluster, which keeps values
        // as bytes, could read one type's bytes as another.
        if node
            .call
            .output_tag()
            .is_some_and(|t| t != crate::build::key::type_tag::<T>())
        {
            return Err(Error::WrongType {
                expected: std::any::type_name::<T>(),
            });
        }
        Ok(Delayed::from_node(node))
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
    /// for names given twice, missing dependencies and cycles.
    fn nodes(&self, keys: &[Key]) -> Result<Vec<Arc<Node>>> {
        if let Some(task) = self.renamed.first() {
            return Err(Error::NameGivenTwice(task.clone()));
        }
        #[derive(Clone)]
        enum Mark {
            Visiting,
            Done(Arc<Node>),
        }
        let mut marks: KeyMap<Mark> = KeyMap::default();
        let mut out = Vec::with_capacity(keys.len());
        let task_key = |key: &Key| TaskKey::from_parts(Arc::from(self.tasks[key].name()), *key);
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
                    .collect::<Vec<_>>();
                let node = Arc::new(Node {
                    mark: Default::default(),
                    key: task.identity.key(&deps),
                    label: task.label,
                    deps: deps.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::node::Origin;
    use crate::delayed;

    fn inc(x: i64) -> i64 {
        x + 1
    }

    fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    /// The keys `postorder_marked` emits, or `None` when it gave up.
    fn marked_keys_once(roots: &[Arc<Node>]) -> Option<(Vec<Key>, Vec<u32>)> {
        let mut keys = Vec::new();
        let outputs = postorder_marked(
            roots,
            tasks_hint(roots),
            |_| None,
            |_| None,
            |node, _, _, _| keys.push(node.key),
        )?;
        Some((keys, outputs))
    }

    /// [`marked_keys_once`], tried again while other tests' lowerings hold
    /// the marks (a few milliseconds at most; `None` after 10 s).
    fn marked_keys(roots: &[Arc<Node>]) -> Option<(Vec<Key>, Vec<u32>)> {
        let start = std::time::Instant::now();
        loop {
            let keys = marked_keys_once(roots);
            if keys.is_some() || start.elapsed() > std::time::Duration::from_secs(10) {
                return keys;
            }
            std::thread::yield_now();
        }
    }

    fn mapped_keys(roots: &[Arc<Node>]) -> (Vec<Key>, Vec<u32>) {
        let mut keys = Vec::new();
        let outputs = postorder(
            roots,
            |_| None,
            |_| None,
            |node, _, _, _| keys.push(node.key),
        );
        (keys, outputs)
    }

    fn unmarked(roots: &[Arc<Node>]) -> bool {
        let mut all = true;
        postorder(
            roots,
            |_| None,
            |_| None,
            |node, _, _, _| {
                // Under the epoch the next lowering will have.
                let next = EPOCH.load(std::sync::atomic::Ordering::Relaxed) + 1;
                all &= node.mark.get(next).is_none();
            },
        );
        all
    }

    #[test]
    fn a_mark_from_an_earlier_epoch_reads_as_unset() {
        // Marks are never unset (node rule 2): a node still carries the
        // index an earlier lowering gave it, pointing at a task of another
        // plan. Were it read, the node would not be emitted and its parent
        // would get the wrong input.
        let a = delayed!(inc(1));
        let b = delayed!(inc(2));
        let c = delayed!(add(&a, &b));
        let roots = [c.node().clone()];
        let first = marked_keys(&roots).expect("no repeated key");
        // As a lowering of another plan (an earlier epoch) would leave them.
        let earlier = EPOCH.load(std::sync::atomic::Ordering::Relaxed);
        b.node().mark.set(earlier, 0);
        c.node().mark.set(earlier, 0);
        assert_eq!(marked_keys(&roots), Some(first.clone()));
        assert_eq!(first, mapped_keys(&roots));
        assert_eq!(c.compute().unwrap(), 5);
    }

    #[test]
    fn marks_lower_as_the_key_map_does_and_read_as_unset_after() {
        // A shared node (`a` twice) and a root that is also an input.
        let a = delayed!(inc(1));
        let b = delayed!(add(&a, &a));
        let c = delayed!(add(&b, &a));
        let roots = [c.node().clone(), a.node().clone(), b.node().clone()];
        let marked = marked_keys(&roots).expect("no repeated key, nobody else marking");
        assert_eq!(marked, mapped_keys(&roots));
        assert_eq!(marked.0.len(), 3);
        assert!(unmarked(&roots));
        // Twice in a row: nothing left over from the first.
        assert_eq!(marked_keys(&roots), Some(marked));
    }

    #[test]
    fn a_graph_estimates_its_tasks_and_a_lowering_leaves_its_count() {
        // Built by moving, as a reduction does: exact (node rule 3).
        let mut level: Vec<_> = (0..10).map(|i| delayed!(inc(i))).collect();
        while level.len() > 1 {
            let mut next = Vec::new();
            let mut pairs = level.into_iter();
            while let Some(a) = pairs.next() {
                next.push(match pairs.next() {
                    Some(b) => delayed!(add(a, b)),
                    None => a,
                });
            }
            level = next;
        }
        let tree = level.pop().expect("one root");
        assert_eq!(tree.node().mark.estimate(), 19);
        assert_eq!(tasks_hint(&[tree.node().clone()]), 19);
        // An input something else holds counts 1 where it is taken again:
        // `a` is counted in `b` (only its handle held it then), and once
        // more in `c`, not with its graph a second time.
        let a = delayed!(add(delayed!(inc(1)), delayed!(inc(2))));
        let b = delayed!(inc(&a));
        let c = delayed!(add(&a, &b));
        assert_eq!(c.node().mark.estimate(), 1 + 1 + (1 + 3));
        // A lowering gives its roots the number of tasks it made, whatever
        // they estimated: the next one is sized by it.
        let roots = [c.node().clone()];
        let first = marked_keys(&roots).expect("no repeated key");
        assert_eq!(first.0.len(), 5);
        assert_eq!(c.node().mark.estimate(), 5);
        // Of several roots, each the tasks walked under it: they add up.
        let more = [b.node().clone(), c.node().clone(), a.node().clone()];
        marked_keys(&more).expect("no repeated key");
        let estimates = more.each_ref().map(|root| root.mark.estimate());
        assert_eq!(estimates, [4, 1, 1]);
        // The estimate sizes lists only: any estimate lowers alike.
        for estimate in [0, 1, 1 << 20] {
            c.node().mark.set(0, estimate);
            assert_eq!(marked_keys(&roots), Some(first.clone()));
        }
        assert!(unmarked(&roots));
        assert_eq!(c.compute().unwrap(), 11);
    }

    #[test]
    fn one_key_in_two_distinct_nodes_gives_up_on_marks() {
        // Built twice: equal keys, distinct nodes (rule 1 makes them one task).
        let left = delayed!(inc(1));
        let right = delayed!(inc(1));
        assert!(!Arc::ptr_eq(left.node(), right.node()));
        let sum = delayed!(add(&left, &right));
        let roots = [sum.node().clone()];
        assert_eq!(marked_keys_once(&roots), None);
        assert!(unmarked(&roots));
        // The key map, which lowering falls back to, makes them one task.
        assert_eq!(mapped_keys(&roots).0.len(), 2);
    }

    #[test]
    fn repeats_the_check_leaves_out_are_still_found() {
        // Each case: two distinct nodes with one key whose first inputs
        // are held by them alone, so neither is a repeat below.
        let inc_of = |v| delayed!(inc(delayed!(inc(v))));
        let cases = [
            // Hand-assembled tasks named alike, over distinct inputs: keys
            // from the name alone, not derived from them.
            // The key map keeps the left one's two incs, it and the sum.
            (by_name(inc_of(1), "n"), by_name(inc_of(2), "n"), 4),
            // A held result standing in for the work built again.
            (
                inc_of(3),
                {
                    let key = inc_of(3).node().key;
                    Delayed::held(key, Name::Borrowed("held"), Arc::new(5i64), Origin::Result)
                },
                3,
            ),
        ];
        for (left, right, tasks) in cases {
            assert_eq!(left.key(), right.key());
            let sum = delayed!(add(&left, &right));
            drop((left, right));
            let roots = [sum.node().clone()];
            assert_eq!(
                mapped_keys(&roots).0.len(),
                tasks,
                "the key map makes them one task"
            );
            // Busy marks (another test) or the repeat: either way, `None`.
            assert_eq!(marked_keys_once(&roots), None);
        }
        // Work built twice, which the check leaves out, over leaves built
        // twice, which it checks.
        let sum = delayed!(add(inc_of(4), inc_of(4)));
        let roots = [sum.node().clone()];
        assert_eq!(marked_keys_once(&roots), None);
        assert_eq!(mapped_keys(&roots).0.len(), 3);
    }

    #[test]
    fn a_lowering_holding_the_marks_sends_others_to_the_key_map() {
        let a = delayed!(inc(1));
        let b = delayed!(add(&a, &a));
        let roots = [b.node().clone()];
        let held = loop {
            // Other tests lower meanwhile, briefly.
            if let Some(held) = Marks::take(0) {
                break held;
            }
            std::thread::yield_now();
        };
        assert_eq!(marked_keys_once(&roots), None);
        drop(held);
        assert!(marked_keys(&roots).is_some());
    }

    #[test]
    fn a_panicking_cut_leaves_no_mark_behind() {
        let a = delayed!(inc(1));
        let b = delayed!(add(&a, &a));
        let roots = [b.node().clone()];
        let attempt = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                postorder_marked(
                    &roots,
                    0,
                    |_| None,
                    |node| {
                        assert!(node.deps.is_empty(), "the cut fails at the root");
                        None
                    },
                    |_, _, _, _| {},
                )
            }))
        };
        // `Ok(None)`: another test's lowering held the marks; try again.
        let mut unwound = attempt();
        while matches!(unwound, Ok(None)) {
            std::thread::yield_now();
            unwound = attempt();
        }
        assert!(unwound.is_err());
        assert!(unmarked(&roots));
        assert!(marked_keys(&roots).is_some(), "the token was given back");
    }

    #[test]
    fn repeats_finds_a_repeat_in_any_bucket() {
        for n in [0usize, 1, 2, 100, 5_000, 40_000] {
            // Spread over the whole range, as keys are.
            let fps: Vec<u64> = (0..n as u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            assert!(!repeats(fps.clone()), "n = {n}");
            for at in [0, n / 2, n.saturating_sub(1)] {
                if n < 2 {
                    continue;
                }
                let mut with = fps.clone();
                with.push(fps[at]);
                assert!(repeats(with), "n = {n}, repeat of {at}");
            }
        }
        assert!(repeats(vec![u64::MAX, 7, u64::MAX]));
        assert!(!repeats(vec![u64::MAX, 0]));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// `repeats` tells exactly whether a fingerprint occurs twice, over
        /// one bucket or many (past 4096 fingerprints), wherever the repeat.
        #[test]
        fn repeats_is_whether_a_fingerprint_occurs_twice(
            mut fps in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..20_000),
            repeat in proptest::option::of((proptest::prelude::any::<usize>(), proptest::prelude::any::<usize>())),
        ) {
            if let (Some((from, to)), false) = (repeat, fps.is_empty()) {
                let f = fps[from % fps.len()];
                fps.insert(to % (fps.len() + 1), f);
            }
            let distinct: std::collections::HashSet<u64> = fps.iter().copied().collect();
            let f_max_and_0 = distinct.contains(&u64::MAX) && distinct.contains(&0);
            proptest::prop_assume!(!f_max_and_0, "u64::MAX and 0 share a slot (documented)");
            proptest::prop_assert_eq!(repeats(fps.clone()), distinct.len() < fps.len());
        }
    }

    /// A call over `input` whose key is `name`'s alone, whatever the input
    /// (a hand-assembled graph's task, keyed by hand); `input` itself when
    /// a task below it has that name already (the graph refuses a name
    /// given twice).
    fn by_name(input: Delayed<i64>, name: &str) -> Delayed<i64> {
        let mut g = Graph::new();
        let of = g.insert(&input);
        g.insert_task(name, &[of], |v| {
            v[0].downcast_ref::<i64>().copied().unwrap_or(0) + 1
        });
        match g.delayed::<i64>(named_key(name)) {
            Ok(task) => Delayed::from_node(Arc::new(task.node().rekeyed(named_key(name)))),
            Err(_) => input,
        }
    }

    /// One node of a generated graph: its work, and for each input (by the
    /// index of an earlier node) whether it is that very node or the same
    /// work built again (equal keys, distinct nodes).
    #[derive(Clone, Debug)]
    enum Spec {
        Leaf(i64),
        Inc(usize, bool),
        Add((usize, bool), (usize, bool)),
        /// A hand-assembled task named `n{0}`: a key from the name alone,
        /// whatever the input.
        Named(u8, usize, bool),
        /// A held result under the input's key (as `persist` makes).
        StandIn(usize, bool),
        /// `cache`: the same key and inputs in another node.
        Cached(usize, bool),
    }

    fn spec(n: usize) -> impl proptest::strategy::Strategy<Value = Vec<Spec>> {
        use proptest::prelude::*;
        let one = |i: usize| (0..i.max(1), any::<bool>());
        (1..n).prop_flat_map(move |len| {
            (0..len)
                .map(|i| {
                    if i == 0 {
                        return (0..3i64).prop_map(Spec::Leaf).boxed();
                    }
                    prop_oneof![
                        (0..3i64).prop_map(Spec::Leaf),
                        one(i).prop_map(|(a, s)| Spec::Inc(a, s)),
                        (one(i), one(i)).prop_map(|(a, b)| Spec::Add(a, b)),
                        (0..2u8, one(i)).prop_map(|(n, (a, s))| Spec::Named(n, a, s)),
                        one(i).prop_map(|(a, s)| Spec::StandIn(a, s)),
                        one(i).prop_map(|(a, s)| Spec::Cached(a, s)),
                    ]
                    .boxed()
                })
                .collect::<Vec<_>>()
        })
    }

    /// Node `i` of `specs`: the one node `built` keeps for it when `shared`,
    /// else built anew (with its inputs, as their own flags say).
    fn node(specs: &[Spec], i: usize, built: &mut Vec<Option<Delayed<i64>>>) -> Delayed<i64> {
        let input = |(a, shared): (usize, bool), built: &mut Vec<Option<Delayed<i64>>>| {
            if !shared {
                return node(specs, a, &mut vec![None; specs.len()]);
            }
            if built[a].is_none() {
                built[a] = Some(node(specs, a, built));
            }
            built[a].clone().expect("built just now")
        };
        match specs[i] {
            Spec::Leaf(v) => delayed!(inc(v)),
            Spec::Inc(a, s) => delayed!(inc(input((a, s), built))),
            Spec::Add(a, b) => {
                let (a, b) = (input(a, built), input(b, built));
                delayed!(add(a, b))
            }
            Spec::Named(n, a, s) => by_name(input((a, s), built), &format!("n{n}")),
            Spec::StandIn(a, s) => {
                let of = input((a, s), built);
                Delayed::held(
                    of.node().key,
                    Name::Borrowed("held"),
                    Arc::new(0i64),
                    Origin::Result,
                )
            }
            Spec::Cached(a, s) => input((a, s), built).cache(),
        }
    }

    /// [`marked_keys_once`], tried again a while when it gives up (another
    /// test's lowering may hold the marks).
    fn marked_keys_soon(roots: &[Arc<Node>]) -> Option<(Vec<Key>, Vec<u32>)> {
        (0..100).find_map(|_| {
            let keys = marked_keys_once(roots);
            if keys.is_none() {
                std::thread::yield_now();
            }
            keys
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Lowering by marks emits what lowering by the key map does, or
        /// gives up: never one key twice, however the graph repeats keys
        /// (work built twice, names, held results, cached copies), even
        /// though it leaves nodes out of its repeat check.
        #[test]
        fn marks_never_emit_a_key_twice(specs in spec(12), extra in 0usize..12) {
            let mut built = vec![None; specs.len()];
            let last = node(&specs, specs.len() - 1, &mut built);
            let other = node(&specs, extra % specs.len(), &mut built);
            drop(built);
            let roots = [last.node().clone(), other.node().clone()];
            if let Some(marked) = marked_keys_soon(&roots) {
                proptest::prop_assert_eq!(marked, mapped_keys(&roots));
            }
        }
    }
}
