//! The one error type of rask.

use std::sync::Arc;

use rask_executor::{Failure, FailureKind, Key};

use crate::delayed::TaskKey;

/// Everything that can go wrong building or running a graph.
///
/// # Examples
///
/// ```
/// fn half(x: i64) -> Result<i64, String> {
///     if x % 2 == 0 { Ok(x / 2) } else { Err(format!("{x} is odd")) }
/// }
/// let err = rask::delayed!(half(3)?).compute().unwrap_err();
/// match err {
///     rask::Error::Task { key, message, .. } => {
///         assert_eq!(key.name(), "half");
///         assert_eq!(message, "3 is odd");
///     }
///     other => panic!("unexpected {other}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A task returned an error or panicked. Its dependents did not run.
    #[error("task {key} {}: {message}", if *.panicked { "panicked" } else { "failed" })]
    Task {
        /// The task that failed (not one of its dependents).
        key: TaskKey,
        /// Whether the task panicked rather than returned an error.
        panicked: bool,
        /// The task's error or panic message.
        message: String,
    },
    /// The computation was cancelled before this task produced a value.
    #[error("task {key} was cancelled")]
    Cancelled {
        /// The task whose value was not produced.
        key: TaskKey,
    },
    /// A future passed to `gather` failed or was cancelled.
    #[error("future {index} ({future}) of the gather failed: {source}")]
    Gather {
        /// Position of the future in the gathered list.
        index: usize,
        /// The future's key.
        future: TaskKey,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// A wait gave up before the result was ready.
    #[error("timed out after {after:?}")]
    Timeout {
        /// How long it waited.
        after: std::time::Duration,
    },
    /// A hand-assembled graph has a cycle.
    #[error("graph has a cycle through {0}")]
    Cycle(TaskKey),
    /// A hand-assembled graph names a dependency it does not contain.
    #[error("task {task} depends on key {missing}, which is not in the graph")]
    MissingDependency {
        /// The task with the dangling dependency.
        task: TaskKey,
        /// The key it depends on.
        missing: Key,
    },
    /// A key was asked for that the graph does not contain.
    #[error("key {0} is not in the graph")]
    UnknownKey(Key),
    /// A value has another type than the one asked for.
    #[error("a value has another type than the `{expected}` asked for")]
    WrongType {
        /// The type that was asked for.
        expected: &'static str,
    },
    /// The executor setting could not be understood.
    #[error("invalid executor `{value}` (from {source_name}): {reason}; accepted forms: `sync`, `threads`, `threads:N`, `local:N` (N ≥ 1), `tcp://host:port`")]
    Config {
        /// The text that was given.
        value: String,
        /// Where it came from, e.g. `RASK_SCHEDULER`.
        source_name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An on/off setting, such as `RASK_OPTIMIZE`, could not be understood.
    #[error("invalid value `{value}` for {source_name}: expected `1`, `true`, `on`, `0`, `false` or `off`")]
    Switch {
        /// The text that was given.
        value: String,
        /// Where it came from, e.g. `RASK_OPTIMIZE`.
        source_name: &'static str,
    },
    /// The chosen executor is not compiled into this build.
    #[error("executor `{0}` is not compiled in; enable feature `{0}`")]
    Unavailable(&'static str),
    /// The distributed executor failed: a connection, the protocol, a worker.
    #[cfg(feature = "distributed")]
    #[error(transparent)]
    Distributed(#[from] rask_distributed::Error),
    /// This process was started as a worker (`RASK_WORKER` is set) but did
    /// not call `rask::init` first in `main`.
    #[error("this process was started as a rask worker but did not call `rask::init(rask::tasks![...])` first in `main`")]
    WorkerSetup,
    /// Distributed execution was asked for before `rask::init` was called.
    #[error("distributed execution needs `rask::init(rask::tasks![...])` at the start of `main`, listing the functions tasks call")]
    NotInitialized,
    /// The executor could not be started (e.g. no threads could be spawned).
    #[error("executor could not start: {0}")]
    Executor(#[source] std::io::Error),
}

impl Error {
    pub(crate) fn from_failure(f: &Arc<Failure>) -> Error {
        let key = TaskKey::from_parts(f.name.clone(), f.key);
        match f.kind {
            FailureKind::Cancelled => Error::Cancelled { key },
            kind => Error::Task {
                key,
                panicked: kind == FailureKind::Panicked,
                message: f.message.clone(),
            },
        }
    }
}

/// `Result<T, rask::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
