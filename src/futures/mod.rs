//! The futures layer, the top one: a `Client` running work in the
//! background, `Future`s, `progress` for futures, performance reports, and
//! `persist`, which keeps values on a cluster through a client. It may name
//! every layer below.

pub(crate) mod cached;
pub(crate) mod client;
pub(crate) mod future;
pub(crate) mod inspect;
pub(crate) mod persist;
pub mod progress;
pub(crate) mod report;
pub(crate) mod spin;
