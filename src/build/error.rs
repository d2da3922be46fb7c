//! The one error type of rask.

use std::fmt;
use std::sync::Arc;

use rask_executor::{Failure, FailureKind, Key};

use crate::build::delayed::TaskKey;

/// Everything that can go wrong building or running a graph.
///
/// Errors follow the convention of reports that walk
/// [`source`](std::error::Error::source): a variant whose cause is an error
/// value of its own (the error a task returned, the failed future of a
/// gather, an I/O error) does not repeat the cause's message in its
/// `Display`; `{:#}` prints the whole chain on one line, and so does
/// `{:?}`: what a `main` that returns this error (or a `Box<dyn Error>`
/// holding it) prints when it fails is the message and its causes, not
/// the variant's fields. Match on the variants to read those.
///
/// # Examples
///
/// ```
/// use std::num::ParseIntError;
/// fn parse(s: String) -> Result<i64, ParseIntError> { s.parse() }
///
/// let err = rask::delayed!(parse("x".to_string())?).compute().unwrap_err();
/// match &err {
///     rask::Error::Task { key, message, .. } => {
///         assert_eq!(key.name(), "parse");
///         assert_eq!(message, "invalid digit found in string");
///     }
///     other => panic!("unexpected {other}"),
/// }
/// // The task's own error, with its type, is the source.
/// let source = std::error::Error::source(&err).unwrap();
/// assert!(source.downcast_ref::<ParseIntError>().is_some());
/// assert!(format!("{err:#}").ends_with("failed: invalid digit found in string"));
/// ```
#[non_exhaustive]
pub enum Error {
    /// A task returned an error or panicked. Its dependents did not run.
    Task {
        /// The task that failed (not one of its dependents).
        key: TaskKey,
        /// Whether the task panicked rather than returned an error.
        panicked: bool,
        /// The task's error or panic message.
        message: String,
        /// Where the task panicked (`file:line:column`), for a panic.
        location: Option<String>,
        /// How many times the task ran: more than 1 when it had retries
        /// ([`Delayed::retries`](crate::Delayed::retries)).
        attempts: u32,
        /// The error the task returned, which [`source`](std::error::Error::source)
        /// also gives: the very value in the process where the task ran
        /// (downcast it to its type), a [`RemoteError`](crate::RemoteError)
        /// with its type name and message chain when it ran in another
        /// process. `None` for a panic, or for a failure rask itself
        /// detected (an input that could not be decoded, say).
        error: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// The computation was cancelled before this task produced a value.
    Cancelled {
        /// The task whose value was not produced.
        key: TaskKey,
    },
    /// A future passed to `gather` failed or was cancelled.
    Gather {
        /// Position of the future in the gathered list.
        index: usize,
        /// The future's key.
        future: TaskKey,
        /// Why it failed.
        source: Box<Error>,
    },
    /// A task ran past its timeout (`task` is set), or a wait gave up before
    /// the result was ready (`task` is `None`).
    Timeout {
        /// The task that ran too long.
        task: Option<TaskKey>,
        /// How long it was given, or how long the wait was.
        after: std::time::Duration,
    },
    /// A hand-assembled graph has a cycle.
    Cycle(TaskKey),
    /// A hand-assembled graph gives one name to two tasks
    /// ([`Graph::insert_task`](crate::Graph::insert_task),
    /// [`Graph::insert_value`](crate::Graph::insert_value), or two graphs
    /// merged): a name is such a task's key, so one of them would stand for
    /// both.
    NameGivenTwice(TaskKey),
    /// A hand-assembled graph names a dependency it does not contain.
    MissingDependency {
        /// The task with the dangling dependency.
        task: TaskKey,
        /// The key it depends on.
        missing: Key,
    },
    /// A key was asked for that the graph does not contain.
    UnknownKey(Key),
    /// A value has another type than the one asked for.
    WrongType {
        /// The type that was asked for.
        expected: &'static str,
    },
    /// The executor setting could not be understood.
    Config {
        /// The text that was given.
        value: String,
        /// Where it came from, e.g. `RASK_SCHEDULER`.
        source_name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An on/off setting, such as `RASK_OPTIMIZE`, could not be understood.
    Switch {
        /// The text that was given.
        value: String,
        /// Where it came from, e.g. `RASK_OPTIMIZE`.
        source_name: &'static str,
    },
    /// A setting, such as `RASK_DASHBOARD`, could not be understood.
    Setting {
        /// Where it came from, e.g. `RASK_DASHBOARD`.
        name: &'static str,
        /// The text that was given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// The config file (`rask.toml`, or the one `RASK_CONFIG` names) could
    /// not be read, or holds an unknown key or a bad value.
    ConfigFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, naming the key and what it accepts.
        problem: String,
    },
    /// The dashboard of a local cluster (`RASK_DASHBOARD`, or `dashboard`
    /// in the config file) cannot listen on its address: the port is
    /// taken, say. The reason is part of the message.
    #[cfg(feature = "distributed")]
    Dashboard {
        /// The address asked for.
        address: std::net::SocketAddr,
        /// The setting that asked for it, e.g. `RASK_DASHBOARD`.
        setting: &'static str,
        /// Why it cannot listen there.
        reason: std::io::Error,
    },
    /// The chosen executor is not compiled into this build.
    Unavailable(&'static str),
    /// The distributed executor failed: a connection, the protocol, a worker.
    #[cfg(feature = "distributed")]
    Distributed(rask_distributed::Error),
    /// This process was started as a worker (`RASK_WORKER` is set) but did
    /// not call `rask::init` first in `main`.
    WorkerSetup,
    /// Distributed execution was asked for before `rask::init` was called.
    NotInitialized,
    /// A graph was submitted to a cluster with a task that cannot run
    /// there: its function is a closure that captures variables, or is not
    /// registered. Nothing of the graph was sent.
    Unsendable {
        /// The first such task found.
        key: TaskKey,
        /// Why, and what to do instead; part of the message.
        reason: rask_executor::WireError,
    },
    /// The executor could not be started (e.g. no threads could be spawned).
    Executor(std::io::Error),
    /// A file could not be written (a performance report).
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Task {
                key,
                panicked,
                message,
                location,
                error,
                attempts,
            } => {
                let what = if *panicked { "panicked" } else { "failed" };
                write!(f, "task {key} {what}")?;
                if *attempts > 1 {
                    write!(f, " after {attempts} attempts")?;
                }
                if let Some(location) = location {
                    write!(f, " at {location}")?;
                }
                // With an error value, the message is the source's.
                if error.is_none() {
                    write!(f, ": {message}")?;
                }
            }
            Error::Cancelled { key } => write!(f, "task {key} was cancelled")?,
            Error::Gather { index, future, .. } => {
                write!(f, "future {index} ({future}) of the gather failed")?
            }
            Error::Timeout {
                task: Some(task),
                after,
            } => write!(f, "task {task} timed out after {after:?}")?,
            Error::Timeout { task: None, after } => write!(f, "timed out after {after:?}")?,
            Error::Cycle(key) => write!(f, "graph has a cycle through {key}")?,
            Error::NameGivenTwice(task) => write!(
                f,
                "two different tasks are named `{}` in the graph: a hand-assembled \
                 task's name is its key, so give each its own",
                task.name()
            )?,
            Error::MissingDependency { task, missing } => write!(
                f,
                "task {task} depends on key {missing}, which is not in the graph"
            )?,
            Error::UnknownKey(key) => write!(f, "key {key} is not in the graph")?,
            Error::WrongType { expected } => write!(
                f,
                "a value has another type than the `{expected}` asked for"
            )?,
            Error::Config {
                value,
                source_name,
                reason,
            } => write!(
                f,
                "invalid executor `{value}` (from {source_name}): {reason}; accepted forms: \
                 `sync`, `threads`, `threads:N`, `local:N` (N ≥ 1), `tcp://host:port`, \
                 `tls://host:port`, `unix:PATH`, `sim:SEED`, `sim-cluster:WORKERS:SEED`"
            )?,
            Error::Switch { value, source_name } => write!(
                f,
                "invalid value `{value}` for {source_name}: expected `1`, `true`, `on`, `0`, \
                 `false` or `off`"
            )?,
            Error::Setting {
                name,
                value,
                expected,
            } => write!(f, "invalid value `{value}` for {name}: expected {expected}")?,
            Error::ConfigFile { path, problem } => {
                write!(f, "config file {}: {problem}", path.display())?
            }
            #[cfg(feature = "distributed")]
            Error::Dashboard {
                address,
                setting,
                reason,
            } => write!(
                f,
                "cannot serve the dashboard on {address} (set by {setting}): {reason}; set \
                 {setting} to a free port (`:0` picks one), or unset it"
            )?,
            Error::Unavailable(name) => write!(
                f,
                "executor `{name}` is not compiled in; enable feature `{name}`"
            )?,
            #[cfg(feature = "distributed")]
            Error::Distributed(e) => write!(f, "{e}")?,
            Error::WorkerSetup => f.write_str(
                "this process was started as a rask worker but did not call \
                 `rask::init()` first in `main`",
            )?,
            Error::NotInitialized => f.write_str(
                "distributed execution needs `rask::init()` at the start of `main`, where \
                 worker processes of the program stop to run tasks",
            )?,
            // The reason is in the message, not only a source: it says
            // what to do, and a program printing `{e}` should show it.
            Error::Unsendable { key, reason } => {
                write!(f, "task {key} cannot be sent to a cluster: {reason}")?
            }
            Error::Executor(_) => f.write_str("executor could not start")?,
            Error::Write { path, .. } => write!(f, "could not write {}", path.display())?,
        }
        if f.alternate() {
            let mut source = std::error::Error::source(self);
            while let Some(s) = source {
                write!(f, ": {s}")?;
                source = s.source();
            }
        }
        Ok(())
    }
}

/// The message and its causes on one line, as `{:#}` prints them (see
/// [`Error`]): what a failed `main` prints.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:#}")
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Task {
                error: Some(error), ..
            } => Some(&**error as &(dyn std::error::Error + 'static)),
            Error::Gather { source, .. } => Some(&**source),
            #[cfg(feature = "distributed")]
            Error::Distributed(e) => e.source(),
            Error::Executor(e) => Some(e),
            Error::Write { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(feature = "distributed")]
impl From<rask_distributed::Error> for Error {
    fn from(e: rask_distributed::Error) -> Error {
        Error::Distributed(e)
    }
}

impl Error {
    pub(crate) fn from_failure(f: &Arc<Failure>) -> Error {
        let key = TaskKey::from_parts(f.name.clone(), f.key);
        match f.kind {
            FailureKind::Cancelled => Error::Cancelled { key },
            FailureKind::TimedOut(after) => Error::Timeout {
                task: Some(key),
                after,
            },
            kind => Error::Task {
                key,
                panicked: kind == FailureKind::Panicked,
                message: f.message.clone(),
                location: f.location.as_deref().map(str::to_owned),
                error: f.cause.as_ref().map(|c| c.error.clone()),
                attempts: f.attempts,
            },
        }
    }
}

/// `Result<T, rask::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// What a failed `main` prints (`{:?}`) is the message and its causes,
    /// as `{:#}` gives them, for a cluster's error too: a user saw
    /// `Error: Distributed(Io(Os { code: 98, .. }))`, and `{:#}` of a
    /// cluster's error gave "i/o error" without its cause.
    #[test]
    fn debug_prints_the_message_and_its_causes() {
        let write = Error::Write {
            path: "out.bin".into(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(format!("{write:?}"), "could not write out.bin: denied");
        assert_eq!(format!("{write:?}"), format!("{write:#}"));
        #[cfg(feature = "distributed")]
        {
            let taken = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
            let e = Error::from(rask_distributed::Error::Io(taken));
            assert_eq!(format!("{e}"), "i/o error");
            assert_eq!(format!("{e:#}"), "i/o error: address in use");
            assert_eq!(format!("{e:?}"), "i/o error: address in use");
        }
    }
}
