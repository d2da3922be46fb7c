//! The build layer, the bottom one: what a graph is made of, as users build
//! it — keys, values, nodes and typed calls, `Delayed`, `Graph`, `Error`,
//! and the task registry (a task's wire form consults it while graphs are
//! built). It names no other layer (`tests/layers.rs`); what runs a graph
//! is added to these types from above, as inherent `impl` blocks in `run/`
//! and `futures/`.

pub(crate) mod annotate;
pub(crate) mod args;
pub(crate) mod data;
pub(crate) mod delayed;
pub(crate) mod error;
pub(crate) mod fused;
pub(crate) mod graph;
pub(crate) mod key;
pub(crate) mod node;
pub(crate) mod ops;
pub(crate) mod pick;
pub(crate) mod registry;
pub(crate) mod travel;
