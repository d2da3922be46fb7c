//! The build layer: what a graph is made of, as users build it.

pub(crate) mod args;
pub(crate) mod data;
pub(crate) mod delayed;
pub(crate) mod error;
pub(crate) mod graph;
pub(crate) mod key;
pub(crate) mod node;
pub(crate) mod ops;
pub(crate) mod pick;
pub(crate) mod registry;
