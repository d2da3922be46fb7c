//! `assert_agree`: the same values and failing keys on every executor.

use std::fmt;

use crate::build::data::Data;
use crate::build::delayed::{Delayed, TaskKey};
use crate::build::error::{Error, Result};
use crate::run::config::{Config, ExecutorKind};
use crate::testing::seeds::replay_line;

/// What computing one output gave, in a form two executors can be compared
/// by.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// Its value.
    Value(T),
    /// A task failed: this one (the task that failed, not its dependent).
    Failed(TaskKey),
    /// It, or a task it needs, was cancelled.
    Cancelled,
    /// Any other error, as its message (a configuration or executor error).
    Error(String),
}

impl<T> Outcome<T> {
    /// The outcome of a `compute` or `result` call.
    pub fn from_result(result: Result<T>) -> Outcome<T> {
        match result {
            Ok(v) => Outcome::Value(v),
            Err(Error::Task { key, .. })
            | Err(Error::Timeout {
                task: Some(key), ..
            }) => Outcome::Failed(key),
            Err(Error::Cancelled { .. }) => Outcome::Cancelled,
            Err(Error::Gather { source, .. }) => Outcome::from_result(Err(*source)),
            Err(other) => Outcome::Error(other.to_string()),
        }
    }
}

/// Computes each of `outputs` on its own under `config`: one outcome per
/// output, so that a failure in one does not hide the others.
///
/// # Examples
///
/// ```
/// use rask::testing::{outcomes, Outcome};
/// use rask::{delayed, Config};
/// fn half(x: i64) -> Result<i64, String> { if x % 2 == 0 { Ok(x / 2) } else { Err("odd".into()) } }
///
/// let (ok, odd) = (delayed!(half(4)?), delayed!(half(3)?));
/// let got = outcomes(&[ok, odd.clone()], &Config::simulated(9));
/// assert_eq!(got[0], Outcome::Value(2));
/// assert_eq!(got[1], Outcome::Failed(odd.key()));
/// ```
pub fn outcomes<T: Data>(outputs: &[Delayed<T>], config: &Config) -> Vec<Outcome<T>> {
    outputs
        .iter()
        .map(|d| Outcome::from_result(d.compute_with(config)))
        .collect()
}

/// Asserts that every executor in `configs` gives the same value, or fails
/// naming the same task, for each of `outputs`, as the first one does.
///
/// # Panics
///
/// On the first output where an executor disagrees with the first one,
/// naming both executors and outcomes; when that executor is `sim:SEED`,
/// the message also gives the seed and a replay line ([`replay_line`]).
///
/// # Examples
///
/// ```
/// use rask::testing::assert_agree;
/// use rask::{delayed, Config};
/// fn add(x: i64, y: i64) -> i64 { x + y }
///
/// let a = delayed!(add(1, 2));
/// let b = delayed!(add(&a, &a));
/// assert_agree(&[a, b], &[Config::synchronous(), Config::simulated(1), Config::threads(2)]);
/// ```
pub fn assert_agree<T>(outputs: &[Delayed<T>], configs: &[Config])
where
    T: Data + PartialEq + fmt::Debug,
{
    let Some((first, rest)) = configs.split_first() else {
        return;
    };
    let reference = outcomes(outputs, first);
    let name = |c: &Config| {
        c.resolve()
            .map_or_else(|e| e.to_string(), |k| k.to_string())
    };
    for config in rest {
        let got = outcomes(outputs, config);
        for (i, (want, got)) in reference.iter().zip(&got).enumerate() {
            if want != got {
                let replay = match config.resolve() {
                    Ok(ExecutorKind::Simulated(seed)) => format!("\n{}", replay_line(seed)),
                    _ => String::new(),
                };
                panic!(
                    "executors disagree on output {i} ({}): {} gave {want:?}, {} gave {got:?}{replay}",
                    outputs[i].key(),
                    name(first),
                    name(config),
                );
            }
        }
    }
}
