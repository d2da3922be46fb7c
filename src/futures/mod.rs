//! The futures layer: a client running work in the background.

pub(crate) mod client;
pub(crate) mod future;
pub(crate) mod inspect;
pub(crate) mod persist;
pub mod progress;
pub(crate) mod report;
