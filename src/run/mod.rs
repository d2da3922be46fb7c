//! The run layer: configuration, executors and running plans.

pub(crate) mod backend;
#[cfg(feature = "distributed")]
pub(crate) mod cluster;
pub(crate) mod compute;
pub mod config;
pub(crate) mod init;
pub(crate) mod progress;
