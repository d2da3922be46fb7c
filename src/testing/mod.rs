//! Deterministic, seeded runs for property-based tests (feature
//! `testing`): [`proptest`] strategies for random graphs and futures
//! scripts, agreement and event-log assertions, and seed exploration with a
//! one-line replay.
//!
//! The pieces:
//!
//! - [`dag`] builds random DAGs of [`Delayed`](crate::Delayed) from the
//!   leaf values and typed ops you give it ([`Ops`]), with the width, depth,
//!   sharing and fan-in of a [`Shape`]. A failing case shrinks to a small
//!   graph.
//! - [`script`] builds random futures scripts (submit, submit many,
//!   `as_completed` with `add`, `wait_first`, cancel, drop), which
//!   [`Script::run`] plays on a [`Client`](crate::Client).
//! - [`assert_agree`]: the same values and the same failing keys on every
//!   executor given. [`EventLog`]: what ran, how many times, what did not
//!   run because a result was held.
//! - [`for_each_seed`] runs a check under `sim:SEED` for many seeds, and on
//!   a failure prints `seed = N; replay: RASK_SCHEDULER=sim:N <command>`;
//!   run that line and only seed `N` runs, in the same order.
//!
//! The simulated executor itself ([`Config::simulated`](crate::Config::simulated),
//! `RASK_SCHEDULER=sim:SEED`) needs no feature.
//!
//! # Examples
//!
//! ```
//! use proptest::prelude::*;
//! use rask::testing::{self, Ops, Shape};
//! use rask::{delayed, Config, Delayed};
//!
//! fn sum(xs: Vec<i64>) -> i64 { xs.iter().sum() }
//! fn neg(x: i64) -> i64 { -x }
//!
//! let ops = Ops::new()
//!     .op("sum", 1..=3, |xs: Vec<Delayed<i64>>| delayed!(sum(xs)))
//!     .op("neg", 1..=1, |xs: Vec<Delayed<i64>>| delayed!(neg(&xs[0])));
//! proptest!(ProptestConfig::with_cases(16), |(graph in testing::dag(0..10_i64, &ops, Shape::default()))| {
//!     testing::assert_agree(&graph.outputs(), &[Config::synchronous(), Config::simulated(1)]);
//! });
//! ```
//!
//! Rules:
//!
//! 1. Nothing here reads a clock or the thread it runs on: with the same
//!    seed, a check runs the same tasks in the same order.
//! 2. A generated graph is data ([`Dag`]): its `Debug` is the shrunk case
//!    proptest prints, node by node, and [`Dag::build`] makes fresh
//!    `Delayed` values from it each time.
//! 3. Task events are process-wide: the [`EventLog`] of one test sees the
//!    tasks of tests running beside it. Count by key, or give each test
//!    its own values, as the examples do.

mod agree;
mod events;
mod seeds;
mod strategy;

pub use agree::{assert_agree, outcomes, Outcome};
pub use events::{EventLog, Recorded, Seen};
pub use seeds::{for_each_seed, replay_line, SeedFailure, REPLAY_COMMAND_ENV_VAR};
pub use strategy::{dag, script, Action, Dag, DagNode, Ops, Script, ScriptOutcome, Shape};
