//! The run layer: configuration, the `Backend` over the executor crates,
//! the result cache (`cache.rs`), clusters, `init`, the progress-bar
//! engine, and running plans (`compute.rs`, which also holds the methods of
//! `Delayed` and `Graph` that run). It names `build/` and `plan/`, never `futures/`
//! (`tests/layers.rs`).

pub(crate) mod backend;
pub mod cache;
#[cfg(feature = "distributed")]
pub(crate) mod cluster;
pub(crate) mod compute;
pub mod config;
pub(crate) mod init;
pub(crate) mod progress;
