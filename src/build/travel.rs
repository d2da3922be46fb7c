//! A `Delayed` as a value: its graph of wire tasks, so that a task given
//! one [`Untraversed`](crate::Untraversed) can run in another process and
//! compute it there itself (a nested computation, as in Dask).
//!
//! Rules:
//!
//! 1. A `Delayed<T>` serializes as the graph behind it: every node once,
//!    dependencies before dependents, the root last, each as its key, its
//!    name, its wire task (`registry.rs` rules 2 to 5: a registered
//!    function and its payload, a held value, a part of a value) with its
//!    timeout and retries, and the positions of its dependencies. A node
//!    that cannot travel (a capturing closure, a function not registered)
//!    makes the serialization fail with what `check_sendable` would say.
//! 2. It deserializes, in a process whose registry is installed
//!    ([`init`](crate::init)), into nodes that keep their keys: computed
//!    there, they are the same work under the same keys as where they were
//!    built, so a cluster shares them with the graphs that named them
//!    there, and distinct work stays distinct. Their ops come from the
//!    registry, as a worker's do; sent on, each travels as the wire task
//!    it arrived as.
//! 3. What arrives is checked before anything is built: every dependency
//!    points to an earlier node (so the graph is acyclic), a graph has a
//!    root, and a wire task that does not resolve fails the
//!    deserialization with the registry's reason.
//! 4. Each node's value type travels as its type tag when it is known
//!    where the node was built ([`Call::output_tag`]): the rebuilt node
//!    has it, so [`Graph::delayed`](crate::Graph::delayed) refuses another
//!    type for it, and a `Delayed<T>` whose root is of another type than
//!    `T` is refused as it deserializes; a value's bytes are never read as
//!    another type's (`i64` −5 as the `u64` 9). A `Delayed` inside
//!    a task's argument inside a travelling `Delayed` nests at most
//!    [`MAX_NESTING`] deep, on both sides: each level is a recursion (a
//!    task's argument decodes while its graph is rebuilt), and a deeper
//!    one, from a peer or a program, would overflow the thread's stack and
//!    abort the whole process; it is refused as it is met.
//!
//! Futures inside an untraversed value (a layer above names them: they
//! serialize through [`handle_index`] and deserialize through
//! [`bound_input`]):
//!
//! 5. When `delayed!` meets an `Untraversed` value it serializes it once
//!    into its task's key, collecting every future inside it
//!    ([`futures_in`]; a `Delayed` then writes its key, a future its
//!    position, key and name). Each becomes an input of the task,
//!    as a traversed future would: the task runs once they are all done,
//!    the cluster holds their values for it until it ran (it is their
//!    dependent, so no release by the submitter can take them away, and a
//!    retry or a lost worker finds them again), a failed one fails the task
//!    with its failure, and the key depends on theirs.
//! 6. On the wire a future is its position among those inputs, its key and
//!    its name ([`encode_untraversed`] with the inputs' keys); a future
//!    that is not one of them (serialized anywhere else: a task's result,
//!    a literal) cannot travel, and says so.
//! 7. Where the task runs, the inputs' values are bound for the time of
//!    the decoding ([`decode_bound`]): each future becomes a finished
//!    future holding its input's value under its key, so `result()` gives
//!    that value without going back to the cluster. A position that is not
//!    one of the task's inputs fails the decoding.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Registry, Value, WireError, WireTask};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::build::delayed::Delayed;
use crate::build::key::KeyHasher;
use crate::build::node::{Call, Decorated, Label, Node};

/// One node of a travelling graph (rule 1).
#[derive(Serialize, Deserialize)]
struct WireNode {
    key: [u8; 32],
    name: String,
    function: String,
    payload: Vec<u8>,
    timeout_ns: Option<u64>,
    retries: u32,
    /// Positions of its dependencies, each before this node.
    deps: Vec<u32>,
    /// Its priority, resources and workers, when it has any: they hold
    /// where it is computed too.
    annotations: Option<rask_executor::Annotations>,
    /// Its value type's tag, when known (rule 4).
    output: Option<u64>,
}

/// How deep travelling `Delayed`s may nest inside each other (rule 4).
pub(crate) const MAX_NESTING: u32 = 64;

thread_local! {
    /// Travelling `Delayed`s being encoded or decoded on this thread, one
    /// inside the other (rule 4).
    static NESTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// One more level of nesting for as long as it lives (rule 4); the error
/// once past [`MAX_NESTING`].
struct Nested;

impl Nested {
    fn enter() -> Result<Nested, String> {
        let depth = NESTING.with(|n| n.get()) + 1;
        if depth > MAX_NESTING {
            return Err(format!(
                "a `Delayed` nested {depth} deep inside task arguments; at most {MAX_NESTING} levels travel"
            ));
        }
        NESTING.with(|n| n.set(depth));
        Ok(Nested)
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        let _ = NESTING.try_with(|n| n.set(n.get().saturating_sub(1)));
    }
}

impl<T> Serialize for Delayed<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if HANDLES.with(|h| matches!(*h.borrow(), Some(Handles::Collect(_)))) {
            // Futures are looked for, and the value's key taken (rule 5):
            // a `Delayed` is its key.
            return serializer.serialize_bytes(&self.node().key.0);
        }
        let _level = Nested::enter().map_err(refuse)?;
        match wire_graph(self.node()) {
            Ok(graph) => graph.serialize(serializer),
            Err(e) => Err(refuse(e.to_string())),
        }
    }
}

/// The error of a value inside an untraversed one that cannot travel,
/// saying why: postcard keeps no custom message, so `encode_untraversed`
/// finds it here.
pub(crate) fn refuse<E: serde::ser::Error>(message: String) -> E {
    E::custom(remember(message))
}

/// Keeps `message` for [`why`], and gives it back.
fn remember(message: String) -> String {
    let _ = WHY.try_with(|w| w.replace(Some(message.clone())));
    message
}

/// The message of the last [`refuse`] on this thread, taken.
pub(crate) fn why() -> Option<String> {
    WHY.try_with(|w| w.take()).ok().flatten()
}

/// As [`refuse`], for a value that cannot be rebuilt here; [`decode_bound`]
/// finds the message.
pub(crate) fn refuse_decoding<E: serde::de::Error>(message: String) -> E {
    E::custom(remember(message))
}

thread_local! {
    /// Why the last `Delayed` or future on this thread could not be
    /// serialized.
    static WHY: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// What a future met while an untraversed value serializes does (rules 5
/// and 6).
enum Handles {
    /// Adds its node to these.
    Collect(Vec<Arc<Node>>),
    /// Writes its position among these keys, the task's inputs.
    Wire(Vec<Key>),
}

thread_local! {
    static HANDLES: RefCell<Option<Handles>> = const { RefCell::new(None) };
    /// The values of a task's untraversed futures while its argument
    /// decodes (rule 7).
    static BOUND: RefCell<Option<Vec<Value>>> = const { RefCell::new(None) };
}

/// Sets `HANDLES` (or `BOUND`) for the time of one call, and back after it,
/// also when it panics.
struct Restore<T: 'static> {
    cell: &'static std::thread::LocalKey<RefCell<Option<T>>>,
    old: Option<Option<T>>,
}

impl<T: 'static> Restore<T> {
    fn set(cell: &'static std::thread::LocalKey<RefCell<Option<T>>>, value: T) -> Self {
        let old = cell.with(|c| c.replace(Some(value)));
        Restore {
            cell,
            old: Some(old),
        }
    }

    fn take(mut self) -> Option<T> {
        let old = self.old.take().flatten();
        self.cell.with(|c| c.replace(old))
    }
}

impl<T: 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            self.cell.with(|c| c.replace(old));
        }
    }
}

/// The futures inside an untraversed `value`, in the order it serializes
/// them, with the value serialized into `hasher` for its task's key (rule
/// 5), and whether it serialized whole. A value that does not serialize
/// yields those met before the error: it cannot travel anyway, and here it
/// is passed as is.
pub(crate) fn futures_in(
    value: &(impl Serialize + ?Sized),
    hasher: &mut KeyHasher,
) -> (Vec<Arc<Node>>, bool) {
    let scope = Restore::set(&HANDLES, Handles::Collect(Vec::new()));
    let whole = hasher.literal(value).is_ok();
    let found = match scope.take() {
        Some(Handles::Collect(found)) => found,
        _ => Vec::new(),
    };
    (found, whole)
}

/// The position a future of key `key` (whose node `node` makes) writes
/// while an untraversed value serializes (rules 5 and 6).
///
/// # Errors
///
/// A message when no untraversed value is being serialized, or when the
/// future is not one of the task's inputs.
pub(crate) fn handle_index(key: Key, node: impl FnOnce() -> Arc<Node>) -> Result<u32, String> {
    HANDLES.with(|h| match h.borrow_mut().as_mut() {
        Some(Handles::Collect(found)) => {
            found.push(node());
            u32::try_from(found.len() - 1).map_err(|_| "more than 2^32 futures".to_owned())
        }
        Some(Handles::Wire(keys)) => keys
            .iter()
            .position(|k| *k == key)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                format!(
                    "future {} is not among the inputs of the task it was given to",
                    key.short()
                )
            }),
        None => Err(
            "a `Future` is serialized only inside a `rask::Untraversed(…)` task \
                     argument: pass `Untraversed(future)` for the future itself, or `&future` \
                     for its value; a future is no plain value, and no task result that \
                     leaves its process"
                .to_owned(),
        ),
    })
}

/// The value of input `index` of the task whose untraversed argument is
/// being decoded (rule 7).
///
/// # Errors
///
/// A message when no such argument is being decoded, or `index` is not
/// one of its inputs.
pub(crate) fn bound_input(index: u32) -> Result<Value, String> {
    BOUND.with(|b| match b.borrow().as_ref() {
        Some(values) => values.get(index as usize).cloned().ok_or_else(|| {
            format!(
                "an untraversed future names input {index} of a task argument that has {}",
                values.len()
            )
        }),
        None => Err(
            "a `Future` arrived outside an untraversed task argument: only \
                     `rask::Untraversed(…)` carries futures to another process"
                .to_owned(),
        ),
    })
}

/// Decodes `bytes` as an `A` with `inputs` bound to the futures inside it
/// (rule 7).
///
/// # Errors
///
/// Why the bytes do not decode: a future or `Delayed` inside that could
/// not be rebuilt says why.
pub(crate) fn decode_bound<A: crate::build::data::Data>(
    bytes: &[u8],
    inputs: Vec<Value>,
) -> Result<A, String> {
    let _ = why();
    let _scope = Restore::set(&BOUND, inputs);
    postcard::from_bytes(bytes).map_err(|e| why().unwrap_or_else(|| e.to_string()))
}

/// The postcard bytes of an untraversed `value` whose futures are the
/// task inputs `inputs` (rule 6); when a `Delayed` inside it cannot
/// travel, the error says why (rule 1).
pub(crate) fn encode_untraversed<T: crate::build::data::Data>(
    value: &T,
    inputs: &[Key],
) -> Result<Vec<u8>, WireError> {
    let _ = why();
    let _scope = Restore::set(&HANDLES, Handles::Wire(inputs.to_vec()));
    crate::build::registry::encode_literal(value).map_err(|e| match why() {
        Some(why) => WireError::NotSerializable {
            what: format!("an untraversed value: {why}"),
        },
        None => e,
    })
}

impl<'de, T: 'static> Deserialize<'de> for Delayed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let _level = Nested::enter().map_err(refuse_decoding)?;
        let nodes = Vec::<WireNode>::deserialize(deserializer)?;
        let root = rebuild(nodes).map_err(refuse_decoding)?;
        match root.call.output_tag() {
            Some(tag) if tag != crate::build::key::type_tag::<T>() => {
                Err(refuse_decoding(format!(
                    "a `Delayed` of another type than `{}` (task `{}`)",
                    std::any::type_name::<T>(),
                    root.name()
                )))
            }
            _ => Ok(Delayed::from_node(root)),
        }
    }
}

/// The graph behind `root`, dependencies first (rule 1). Iterative: chains
/// can be long.
fn wire_graph(root: &Arc<Node>) -> Result<Vec<WireNode>, WireError> {
    let mut position: HashMap<Key, u32> = HashMap::new();
    let mut out: Vec<WireNode> = Vec::new();
    // (node, whether its dependencies were pushed already)
    let mut stack: Vec<(&Arc<Node>, bool)> = vec![(root, false)];
    while let Some((node, expanded)) = stack.pop() {
        if position.contains_key(&node.key) {
            continue;
        }
        if !expanded {
            stack.push((node, true));
            for dep in node.deps.iter().rev() {
                if !position.contains_key(&dep.key) {
                    stack.push((dep, false));
                }
            }
            continue;
        }
        node.call.sendable()?;
        let task = if node.call.is_future() {
            node.call.to_travelling_wire()?
        } else {
            Op::to_wire(&**node)?
        };
        let deps = node
            .deps
            .iter()
            .map(|d| position[&d.key])
            .collect::<Vec<u32>>();
        let at = u32::try_from(out.len()).map_err(|_| WireError::NotSerializable {
            what: "a graph of more than 2^32 tasks".into(),
        })?;
        position.insert(node.key, at);
        out.push(WireNode {
            key: node.key.0,
            name: node.name().to_owned(),
            function: task.function,
            payload: task.payload,
            timeout_ns: node
                .call
                .timeout()
                .map(|t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)),
            retries: node.call.retries(),
            deps,
            annotations: node.call.annotations().cloned(),
            output: node.call.output_tag(),
        });
    }
    Ok(out)
}

/// The nodes of a travelled graph, built with the installed registry; the
/// root (rules 2 and 3).
fn rebuild(wire: Vec<WireNode>) -> Result<Arc<Node>, String> {
    let registry = crate::build::registry::installed().ok_or_else(|| {
        "a `Delayed` arrived in a process without a task registry: call `rask::init` first"
            .to_owned()
    })?;
    let mut built: Vec<Arc<Node>> = Vec::with_capacity(wire.len());
    for (at, node) in wire.into_iter().enumerate() {
        let mut deps = Vec::with_capacity(node.deps.len());
        for &d in &node.deps {
            match built.get(d as usize) {
                Some(dep) if (d as usize) < at => deps.push(dep.clone()),
                _ => {
                    return Err(format!(
                        "a travelled graph's task {at} depends on task {d}, which does not come \
                         before it"
                    ))
                }
            }
        }
        let task = WireTask {
            function: node.function,
            payload: node.payload,
        };
        let op = registry
            .resolve(&task)
            .map_err(|e| format!("task `{}` of a travelled graph: {e}", node.name))?;
        let mut call: Arc<dyn Call> = Arc::new(Travelled {
            op,
            task,
            name: node.name,
            output: node.output,
        });
        let timeout = node.timeout_ns.map(std::time::Duration::from_nanos);
        if timeout.is_some() || node.retries > 0 {
            // Enforced where it runs, as the node it was (`Decorated`).
            call = Decorated::limited(&call, timeout, Some(node.retries), None);
        }
        if let Some(annotations) = node.annotations {
            call = Decorated::annotated(&call, annotations);
        }
        built.push(Arc::new(Node {
            mark: Default::default(),
            key: Key(node.key),
            label: Label::Call,
            deps: deps.into(),
            call,
        }));
    }
    built
        .pop()
        .ok_or_else(|| "a travelled graph with no task".to_owned())
}

/// A task that arrived as part of a `Delayed` (rule 2), its name and its
/// value type's tag (rule 4).
struct Travelled {
    op: Arc<dyn Op>,
    task: WireTask,
    name: String,
    output: Option<u64>,
}

impl Call for Travelled {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        self.op.run(inputs)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        Ok(self.task.clone())
    }

    fn output_tag(&self) -> Option<u64> {
        self.output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::registry::{install, Tasks};

    fn lonely(x: i64) -> i64 {
        x
    }

    /// A graph with a shared node travels once per node, keeps its keys,
    /// and computes the same; one calling an unregistered function does
    /// not travel and says which.
    #[test]
    fn a_delayed_travels_as_its_graph_under_its_keys() {
        // Operators on primitive types are in every registry.
        install(Tasks::new());
        let a = crate::value(1i64) + 1;
        let total = &a + &(&a * 2);
        let bytes = encode_untraversed(&total, &[]).unwrap();
        let graph: Vec<WireNode> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(graph.len(), 4, "the shared node once");
        assert_eq!(graph.last().map(|n| n.key), Some(total.key().key().0));
        let back: Delayed<i64> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.key(), total.key());
        let keys = |d: &Delayed<i64>| -> Vec<Key> {
            let mut out = vec![d.key().key()];
            let mut stack: Vec<&Arc<Node>> = d.node().deps.iter().collect();
            while let Some(n) = stack.pop() {
                out.push(n.key);
                stack.extend(n.deps.iter());
            }
            out
        };
        assert_eq!(keys(&back), keys(&total));
        // Sent on, each node is the wire task it arrived as.
        assert_eq!(encode_untraversed(&back, &[]).unwrap(), bytes);
        // Its annotations travel with it: where and how soon it may run.
        let placed = (&a * 3).priority(7).workers(["gpu-1"]);
        let bytes = encode_untraversed(&placed, &[]).unwrap();
        let back: Delayed<i64> = postcard::from_bytes(&bytes).unwrap();
        let annotations = back.node().call.annotations().cloned().unwrap();
        assert_eq!(annotations.priority, 7);
        assert_eq!(annotations.workers, ["gpu-1"]);
        assert!(a.node().call.annotations().is_none());
        let err = encode_untraversed(&vec![crate::delayed!(lonely(3))], &[]).unwrap_err();
        assert!(err.to_string().contains("lonely"), "{err}");
    }

    /// A travelled node keeps its value type (rule 4): asked for as
    /// another type, it is refused, root or not; a value held as bytes was
    /// read as that type (the `u64` 9 as the `i64` -5).
    #[test]
    fn a_travelled_delayed_keeps_its_value_type() {
        install(Tasks::new());
        let four = crate::value(4u64);
        let nine = &four + 5;
        let bytes = encode_untraversed(&nine, &[]).unwrap();
        let back: Delayed<u64> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.compute().unwrap(), 9);
        let graph = crate::Graph::from_delayed(&back);
        for key in [back.key().key(), four.key().key()] {
            assert!(graph.delayed::<u64>(key).is_ok());
            let err = graph.delayed::<i64>(key).err();
            assert!(
                matches!(err, Some(crate::Error::WrongType { .. })),
                "{err:?}"
            );
        }
        let held = encode_untraversed(&four, &[]).unwrap();
        for bytes in [bytes, held] {
            assert!(postcard::from_bytes::<Delayed<i64>>(&bytes).is_err());
            let why = super::why().unwrap_or_default();
            assert!(why.contains("another type than `i64`"), "{why}");
        }
    }

    /// A dependency that does not come before its dependent is refused.
    #[test]
    fn a_graph_pointing_forward_is_refused() {
        install(Tasks::new());
        let node = |deps: Vec<u32>| WireNode {
            key: [1; 32],
            name: "x".into(),
            function: crate::build::registry::VALUE_FUNCTION.into(),
            payload: postcard::to_stdvec(&1i64).unwrap(),
            timeout_ns: None,
            retries: 0,
            deps,
            annotations: None,
            output: None,
        };
        let bytes = postcard::to_stdvec(&vec![node(vec![0])]).unwrap();
        let err = postcard::from_bytes::<Delayed<i64>>(&bytes).err();
        assert!(err.is_some());
        let bytes = postcard::to_stdvec(&Vec::<WireNode>::new()).unwrap();
        assert!(postcard::from_bytes::<Delayed<i64>>(&bytes).is_err());
    }
}
