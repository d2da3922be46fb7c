//! rask: lazy, content-hashed task graphs with pluggable executors.
//!
//! Wrap function calls with [`delayed!`] to build a graph without running
//! anything; [`compute`](Delayed::compute) runs it on the executor the
//! configuration names (one thread, a work-stealing pool, …) and returns a
//! typed value. Identical work has identical keys and runs once.
//!
//! # A 30-second tour
//!
//! ```
//! use rask::prelude::*;
//!
//! fn inc(x: i64) -> i64 { x + 1 }
//! fn add(x: i64, y: i64) -> i64 { x + y }
//!
//! let x = delayed!(inc(1));                 // nothing runs yet
//! let y = delayed!(inc(2));
//! let total = delayed!(add(&x, &y));        // arguments: values, Delayed, &Delayed, Vec<Delayed<T>>
//! assert_eq!(total.compute()?, 5);          // executor chosen by configuration
//!
//! let (a, t) = rask::compute((&x, &total))?; // shared nodes run once
//! assert_eq!((a, t), (2, 5));
//! println!("{}", total.key());             // e.g. add-3f9a0c1e: same inputs, same key
//! let dot = total.to_dot();                 // Graphviz rendering
//!
//! let sum = &x + &y * 10;                   // operators build tasks too
//! assert_eq!(sum.compute()?, 32);
//!
//! let total = total.persist()?;             // computed once, kept while referenced
//! assert_eq!(delayed!(add(&total, 1)).compute()?, 6);
//! # Ok::<(), rask::Error>(())
//! ```
//!
//! # Arguments
//!
//! `delayed!(f(a, b))` converts each argument through [`IntoArg`], according
//! to the type of `f`'s parameter:
//!
//! | argument | parameter | passed as |
//! |---|---|---|
//! | plain value `x: T` | `T` | a literal, hashed into the key |
//! | `Delayed<T>` / `&Delayed<T>` / [`Future<T>`] | `T` | the result (moved on last use, else cloned) |
//! | the same | `Arc<T>` | the result, shared without copying |
//! | `Vec<X>` / `&[X]` / `[X; N]` | `Vec<A>` (or `[A; N]`) | every element converted |
//! | `Option<X>` | `Option<A>` | the element converted, or `None` |
//! | `BTreeMap<K, X>` / `HashMap<K, X>` | the same map of `A` | every value converted |
//! | `(X1, X2, …)` (up to 6) | `(A1, A2, …)` | every element converted |
//! | [`Untraversed<T>`] | `T` | the value as is (its futures are inputs too) |
//!
//! Each `X` is a `Delayed`, a future or again a structure ([`Traverse`]),
//! to any depth: `vec![vec![&a, &b], vec![&c]]` is a `Vec<Vec<T>>`. The key
//! holds the structure's shape, so distinct structures never share a key.
//! Parts of a value are tasks too: [`Delayed::split`] for tuples,
//! [`Delayed::item`] for a list's element or a map's value, and
//! [`Delayed::map`] applies a function. Operators take plain values on
//! either side (`1 + &a`); `a == b` compares keys, [`Delayed::lazy_eq`] is
//! the lazy comparison.
//!
//! ```
//! use std::collections::BTreeMap;
//! use rask::{delayed, value};
//!
//! fn total(groups: Vec<Vec<i64>>) -> i64 { groups.iter().flatten().sum() }
//! fn squares(n: i64) -> Vec<i64> { (0..n).map(|i| i * i).collect() }
//!
//! let (a, b, c) = (value(1), value(2), value(3));
//! assert_eq!(delayed!(total(vec![vec![&a, &b], vec![&c]])).compute()?, 6);
//! assert_eq!((10 - delayed!(squares(4)).item(3)).compute()?, 1);
//! assert!(a.lazy_eq(1).compute()? && a != b);
//! # Ok::<(), rask::Error>(())
//! ```
//!
//! `delayed!(f(a)?)` is for functions returning `Result<T, E>`: `Err(e)`
//! fails the task, and `e` is the [`source`](std::error::Error::source) of
//! the [`Error::Task`] the caller gets — the value itself on a local
//! executor, a [`RemoteError`] with its type name and message chain from a
//! cluster. Values must be [`Data`] (serde + `Clone` + `Send` + `Sync`).
//!
//! # Keys
//!
//! A key is blake3 (keyed with a key derived from the context
//! `"rask task key v2"`) over the task's name and its function's path and
//! *type tag* (its `TypeId`), hashed once per function, and each
//! argument's key (for task inputs) or serde calls (for literals). It
//! prints as `name-` plus eight hex digits. The rules:
//!
//! 1. Distinct functions never share a key — closures included: two closures
//!    of one function, or two bound to one name, are different types.
//! 2. A function item or a closure that captures nothing keeps its keys in
//!    every run of the same binary for the same inputs. Keys change when a
//!    function is renamed or moved, when the program is built by another
//!    compiler or in another profile, or when a literal's serialized form
//!    changes (a `HashMap` literal serializes in its iteration order, which
//!    is random per map: two equal `HashMap`s get different keys, even in
//!    one process; use a `BTreeMap`).
//!    The task's name is part of its key: `d.map(f)` and `delayed!(f(&d))`
//!    are one task for a function item `f`, but a closure bound to `f` is
//!    named `{{closure}}` by `map` and `f` by `delayed!`, two tasks of one
//!    work; build such work one way.
//! 3. A closure that captures variables is impure: what it captured is not
//!    hashed, so every call gets a fresh key and is never shared. To share
//!    such work, pass the values as arguments of a function item, or name it.
//! 4. Editing a function's body does not change its keys. Within one process
//!    that cannot matter; on a cluster, workers serve only clients of their
//!    own build (a fingerprint of the program), so an edited program never
//!    receives values computed by the old code.
//!
//! [`Delayed::named`] names a task, hashing the name over the work's own
//! key (distinct work never shares a key under one name); [`value_named`]
//! wraps data under a name, keyed by the name and the data;
//! [`Delayed::unique`] gives a fresh key for impure work.
//!
//! # Choosing the executor
//!
//! Explicit argument ([`Delayed::compute_with`]) > scoped [`config::set`]
//! (this thread) > process-wide [`config::set_global`] > the
//! `RASK_SCHEDULER` environment variable (`sync`, `threads`, `threads:N`,
//! `local:N`, `tcp://host:port`, `tls://host:port`, `unix:PATH`) > the config file
//! (`rask.toml` in the working directory, or the file `RASK_CONFIG`
//! names) > the default, `threads`. Whether to optimize, draw progress bars, serve
//! a dashboard and where the token is follow the same order ([`config`]).
//! An unknown value is an error, never a silent fallback.
//!
//! # Futures
//!
//! A [`Client`] runs work in the background and returns [`Future`]s, with
//! Dask's names: `submit`, `map`, `gather`, `scatter`, `compute`, `persist`,
//! [`as_completed`], [`wait`]. Futures are task arguments, identical
//! submissions share one computation, and dropping the last clone of a
//! future releases its result. [`Client::map_zip`] maps over several
//! iterables, [`AsCompleted`] is also a `Stream` and gives batches,
//! [`AnyFuture`] lets `wait` and `as_completed` take futures of different
//! types, and [`Client::scatter_with`] broadcasts to every worker.
//!
//! ```
//! use rask::{as_completed, delayed, Client};
//! fn inc(x: i64) -> i64 { x + 1 }
//!
//! let client = Client::threads(2)?;
//! let f = client.submit(delayed!(inc(1)))?;
//! let g = client.submit(delayed!(inc(&f)))?;       // computation moves to the data
//! let mut seq = as_completed(client.map(inc, 0..4)?);
//! while let Some(done) = seq.next() {
//!     if done.result()? < 3 { seq.add(client.submit(delayed!(inc(10)))?); }
//! }
//! assert_eq!(g.result()?, 3);
//! # Ok::<(), rask::Error>(())
//! ```
//!
//! # Clusters
//!
//! `RASK_SCHEDULER=local:N` (or [`Client::local`]) starts a scheduler and N
//! worker processes of the program itself; `tcp://host:port` (or
//! [`Client::connect`]) uses a running `rask-scheduler`, and
//! `tls://host:port` reaches one over TLS (`RASK_TLS_CA`, `RASK_TLS_CERT`,
//! `RASK_TLS_KEY`; README, Security). Every process of a
//! cluster proves the cluster's token when it connects: a local cluster
//! makes its own, and for a running scheduler clients and workers find it
//! in `RASK_TOKEN`, the file `RASK_TOKEN_FILE` names, or `~/.rask/token`
//! (README, Security). Workers run the functions marked [`#[rask::task]`](task),
//! found by [`init`], called first in `main`:
//!
//! ```no_run
//! #[rask::task]
//! fn inc(x: i64) -> i64 { x + 1 }
//! fn main() {
//!     rask::init();   // a worker process stays in here
//!     let two = rask::delayed!(inc(1)).compute().unwrap();
//!     println!("{two}");
//! }
//! ```
//!
//! # Design
//!
//! - **`src/` is four layers, one folder each, and a lower layer never
//!   names a higher one** (`tests/layers.rs` fails on a reference that
//!   points up, so no module cycle runs through two layers). Bottom to top:
//!   1. `build/`: what a graph is made of, as users build it: keys
//!      (`key`), values (`data`), nodes and typed calls (`node`, `args`,
//!      `ops`, `pick`), [`Delayed`] and its constructors (`delayed`),
//!      [`Graph`] (`graph`, with the post-order walk lowering shares),
//!      [`Error`] (`error`), and the task registry (`registry`): which
//!      functions may travel and their wire form. The registry is here,
//!      not in `run/`, because a task's wire form consults it while graphs
//!      are built; only [`init`], which can turn the process into a
//!      worker, is in `run/`.
//!   2. `plan/`: nodes → [`Plan`](rask_executor::Plan), one pipeline with
//!      one entry (`plan::plan`): lower → cull → inline → fuse → assemble,
//!      the data going through once; [`Explain`] reads what it recorded.
//!   3. `run/`: [`Config`], the `Backend` over the executor crates, the
//!      cluster a process starts or joins, [`init`], the progress-bar
//!      engine, and running: [`compute`], [`explain`] and the methods of
//!      `Delayed` and `Graph` that run (`Delayed::compute`,
//!      `Delayed::plan_dot`, `Graph::compute`), written as inherent `impl`
//!      blocks in `run/compute.rs` — Rust allows them in any module of the
//!      crate, so a type's methods sit in the layer of what they use.
//!   4. `futures/`: [`Client`], [`Future`], [`as_completed`]/[`wait`],
//!      [`progress()`] for futures, performance reports, and [`persist`]
//!      (`Delayed::persist`), which keeps values on a cluster through a
//!      client.
//!   5. `testing/` (feature `testing`): `rask::testing`, strategies and
//!      assertions for property tests, on top of everything.
//!
//!   `lib.rs` is the facade: it names every layer, and the public paths
//!   (`rask::Client`, `rask::config`, `rask::progress`, …) are its
//!   re-exports, so moving code between layers changes none of them.
//!   Test modules may use any layer (a unit test runs what it tests).
//! - **Executors don't know `Delayed`.** The graph is lowered into a
//!   [`Plan`](rask_executor::Plan) — task indices, dependency lists and
//!   opaque ops — defined by the `rask-executor` crate. Executors
//!   (`rask-threaded`, …) depend only on that crate; this crate depends on
//!   them and dispatches by configuration. Dependencies point one way.
//! - **A graph is its nodes.** A `Delayed` is an `Arc` to an immutable node
//!   holding its inputs, so a graph needs no central map while it is built
//!   (cheap, and cycles are impossible), and lowering merges graphs by key.
//! - **Values are `Arc<dyn AnyValue>`.** A value used by many tasks is
//!   shared; the last consumer takes it without a copy. Every value can
//!   encode itself (serde + postcard), which gives literals their keys and
//!   lets the distributed executor move values between processes; local
//!   executors never serialize results.
//! - **A worker is the program itself.** Tasks travel as a registered
//!   function's name plus their literal arguments as bytes; a worker process
//!   is the same binary, so it has the same functions, found through the
//!   link-time list [`#[rask::task]`](task) adds them to. No code is
//!   shipped, and this crate has no `unsafe`.
//! - **The order is the plan order.** Lowering emits a depth-first post-order,
//!   which finishes a branch before starting the next; executors free each
//!   value right after its last consumer ran, so a tree reduction holds
//!   O(depth) intermediates.
//! - **Optimize between lowering and running.** The lowered plan goes through
//!   cull, inline and fuse passes (`src/plan/`) before it reaches the
//!   executor: a chain of `n` tasks costs one trip through the executor, not
//!   `n`, and a chain of temporaries (nodes no handle refers to) is folded
//!   while lowering, without a plan task per node. Passes never change a
//!   result, an output key or which task an error names;
//!   [`Config::optimize`] switches them off, [`explain`] shows the plan.
//! - **Failures are values.** A task that returns `Err` or panics becomes a
//!   failure naming that task; its dependents do not run, the computation
//!   stops early and returns [`Error::Task`]; the process survives.
#![warn(missing_docs)]

mod build;
mod futures;
mod plan;
mod run;
#[cfg(feature = "testing")]
pub mod testing;

pub use build::args::{mode, IntoArg, Traverse, Untraversed};
pub use build::data::Data;
pub use build::delayed::{named_key, value, value_named, Delayed, TaskKey};
pub use build::error::{Error, Result};
pub use build::graph::Graph;
pub use build::registry::{Register, Tasks};
pub use futures::client::{Client, ClientStats, Iterables};
pub use futures::future::{
    as_completed, fire_and_forget, wait, wait_first, wait_timeout, AnyFuture, AsCompleted, Done,
    Future, Status, Waitable,
};
pub use futures::persist::{persist, persist_with};
pub use futures::progress;
pub use futures::progress::{progress, Progress};
pub use plan::{Explain, PlannedTask, Timings};
/// Prints rask's log lines (a cluster's workers joining, dying and being
/// restarted, refused connections, warnings) on stderr, filtered by
/// `RUST_LOG`, for a program without a `tracing` subscriber of its own.
/// rask prints nothing until one is installed. See
/// [`rask_distributed::init_logging`].
#[cfg(feature = "distributed")]
pub use rask_distributed::init_logging;
pub use rask_executor::{
    cancelled, diagnostics, events, Annotations, Key, RemoteError, ResourceError, Resources, Value,
};
pub use run::cache;
pub use run::compute::{compute, compute_with, explain, Compute};
pub use run::config;
pub use run::config::{CacheSettings, Config, ExecutorKind};
pub use run::init::{init, init_with};

/// Registers a fn item as a task function, so that [`init`] finds it in
/// every process of the program and a cluster can run it: no list to keep.
///
/// A function returning a `Result` (any type path ending in `Result`:
/// `Result<T, E>`, `io::Result<T>`, `anyhow::Result<T>`) is registered as
/// called with `?`, `delayed!(f(x)?)`, where `Err` fails the task; any
/// other is registered as called without, `delayed!(f(x))`. Say it when the
/// name misleads: `#[rask::task(fallible)]` for an alias by another name,
/// `#[rask::task(plain)]` for a `Result` that is the task's value. The
/// function itself is left as written, and may still be listed in
/// [`tasks!`] (it is registered once).
///
/// For the result cache ([`cache`]), the attribute also records the
/// function's version — a hash of its signature and body tokens, so that
/// editing it invalidates its cache entries — or the `N` of
/// `#[rask::task(version = N)]`; `#[rask::task(cache)]` caches every call
/// of the function. Options combine: `#[rask::task(fallible, cache)]`.
///
/// It takes free fn items without type or const parameters: a generic
/// function is one function per instance, so register the instances used
/// with [`init_with`] (`Tasks::new().register(f::<i64>)`). A closure cannot
/// be marked; one that captures nothing may be listed in [`tasks!`], and
/// one that captures variables can never run on a cluster (make it a
/// marked fn item taking the captured values as arguments). The generated
/// code names the crate `::rask`, so a dependency renamed in `Cargo.toml`
/// cannot use the attribute.
///
/// # Examples
///
/// ```
/// use rask::delayed;
///
/// #[rask::task]
/// fn inc(x: i64) -> i64 { x + 1 }
///
/// #[rask::task]   // a `Result`: called as `delayed!(parse(s)?)`
/// fn parse(s: String) -> Result<i64, std::num::ParseIntError> { s.parse() }
///
/// fn main() -> Result<(), rask::Error> {
///     rask::init();   // no list: `RASK_SCHEDULER=local:2` runs these too
///     let n = delayed!(parse("41".to_string())?);
///     assert_eq!(delayed!(inc(&n)).compute()?, 42);
///     Ok(())
/// }
/// ```
///
/// A generic function is refused, with what to do instead:
///
/// ```compile_fail
/// #[rask::task]
/// fn double<T: std::ops::Add<Output = T> + Copy>(x: T) -> T { x + x }
/// ```
pub use rask_macros::task;

/// The README's Rust examples, compiled and run as doc-tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The names most programs need: `use rask::prelude::*;`.
pub mod prelude {
    pub use crate::{
        as_completed, compute, delayed, value, wait, Client, Config, Data, Delayed, Error, Future,
        Result,
    };
}

/// Support for the `delayed!` macro; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::build::args::apply;
    pub use crate::build::node::{Fallible, Plain};
    pub use crate::build::registry::{Registration, REGISTRATIONS};
    pub use linkme;

    /// The registry installed by [`init`](crate::init), for tests that run
    /// workers inside their own process.
    pub fn registry() -> Option<std::sync::Arc<dyn rask_executor::Registry>> {
        crate::build::registry::installed()
            .map(|r| r as std::sync::Arc<dyn rask_executor::Registry>)
    }
}
