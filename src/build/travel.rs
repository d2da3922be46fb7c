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
//! 4. The value type is not on the wire: the receiving parameter's type
//!    says it, and a computed value of another type is an error
//!    (`Error::WrongType`), never a reinterpretation.

use std::collections::HashMap;
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Registry, Value, WireError, WireTask};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::build::delayed::Delayed;
use crate::build::node::{Call, Limited, Name, Node};

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
}

impl<T> Serialize for Delayed<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match wire_graph(self.node()) {
            Ok(graph) => graph.serialize(serializer),
            Err(e) => {
                // Postcard keeps no custom message: `encode_untraversed`
                // finds it here.
                let message = e.to_string();
                let _ = WHY.try_with(|w| w.replace(Some(message.clone())));
                Err(serde::ser::Error::custom(message))
            }
        }
    }
}

thread_local! {
    /// Why the last `Delayed` on this thread could not be serialized.
    static WHY: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The postcard bytes of an untraversed `value`; when a `Delayed` inside
/// it cannot travel, the error says why (rule 1).
pub(crate) fn encode_untraversed<T: crate::build::data::Data>(
    value: &T,
) -> Result<Vec<u8>, WireError> {
    let _ = WHY.try_with(|w| w.take());
    crate::build::registry::encode_literal(value).map_err(|e| {
        match WHY.try_with(|w| w.take()).ok().flatten() {
            Some(why) => WireError::NotSerializable {
                what: format!("an untraversed `Delayed`: {why}"),
            },
            None => e,
        }
    })
}

impl<'de, T> Deserialize<'de> for Delayed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let nodes = Vec::<WireNode>::deserialize(deserializer)?;
        rebuild(nodes)
            .map(Delayed::from_node)
            .map_err(serde::de::Error::custom)
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
        let task = Op::to_wire(&**node)?;
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
            name: node.name.to_string(),
            function: task.function,
            payload: task.payload,
            timeout_ns: node
                .call
                .timeout()
                .map(|t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)),
            retries: node.call.retries(),
            deps,
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
        let mut call: Arc<dyn Call> = Arc::new(Travelled { op, task });
        let timeout = node.timeout_ns.map(std::time::Duration::from_nanos);
        if timeout.is_some() || node.retries > 0 {
            // Enforced where it runs, as the node it was (`Limited`).
            call = Limited::wrap(&call, timeout, Some(node.retries));
        }
        built.push(Arc::new(Node {
            mark: Default::default(),
            key: Key(node.key),
            name: Name::Owned(node.name),
            deps: deps.into(),
            call,
        }));
    }
    built
        .pop()
        .ok_or_else(|| "a travelled graph with no task".to_owned())
}

/// A task that arrived as part of a `Delayed` (rule 2).
struct Travelled {
    op: Arc<dyn Op>,
    task: WireTask,
}

impl Call for Travelled {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        self.op.run(inputs)
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        Ok(self.task.clone())
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
        let bytes = encode_untraversed(&total).unwrap();
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
        assert_eq!(encode_untraversed(&back).unwrap(), bytes);
        let err = encode_untraversed(&vec![crate::delayed!(lonely(3))]).unwrap_err();
        assert!(err.to_string().contains("lonely"), "{err}");
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
        };
        let bytes = postcard::to_stdvec(&vec![node(vec![0])]).unwrap();
        let err = postcard::from_bytes::<Delayed<i64>>(&bytes).err();
        assert!(err.is_some());
        let bytes = postcard::to_stdvec(&Vec::<WireNode>::new()).unwrap();
        assert!(postcard::from_bytes::<Delayed<i64>>(&bytes).is_err());
    }
}
