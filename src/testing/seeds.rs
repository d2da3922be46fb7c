//! Exploring seeds of the simulated executor, and replaying one.

use std::fmt;
use std::ops::Range;

use crate::run::config::{Config, ExecutorKind, ENV_VAR};

/// The variable that sets the command [`replay_line`] prints after
/// `RASK_SCHEDULER=sim:N`: by default the command line of this process.
pub const REPLAY_COMMAND_ENV_VAR: &str = "RASK_REPLAY_COMMAND";

/// `seed = N; replay: RASK_SCHEDULER=sim:N <command>`: the line a failing
/// seeded run prints. The command is `RASK_REPLAY_COMMAND` if set, or else
/// the command line of this process.
///
/// # Examples
///
/// ```
/// std::env::set_var("RASK_REPLAY_COMMAND", "cargo test --test pipeline");
/// assert_eq!(
///     rask::testing::replay_line(42),
///     "seed = 42; replay: RASK_SCHEDULER=sim:42 cargo test --test pipeline",
/// );
/// ```
pub fn replay_line(seed: u64) -> String {
    let command = std::env::var(REPLAY_COMMAND_ENV_VAR)
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    format!("seed = {seed}; replay: {ENV_VAR}=sim:{seed} {command}")
}

/// A check that failed under one seed; see [`for_each_seed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFailure {
    /// The seed it failed under.
    pub seed: u64,
    /// What the check said.
    pub message: String,
    /// The line that replays it ([`replay_line`]).
    pub replay: String,
}

impl fmt::Display for SeedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{}", self.message, self.replay)
    }
}

impl std::error::Error for SeedFailure {}

/// Runs `check` with [`Config::simulated`] for each seed of `seeds`, in
/// order, and stops at the first that fails: prints its
/// [`replay_line`] to stderr and returns it. When `RASK_SCHEDULER` is
/// `sim:N`, only seed `N` runs: the replay.
///
/// # Errors
///
/// The first seed whose check returned an error, with its message and
/// replay line.
///
/// # Examples
///
/// ```
/// use rask::{as_completed, Client};
/// fn square(x: i64) -> i64 { x * x }
/// # std::env::remove_var("RASK_SCHEDULER");
///
/// // A planted bug: it assumes results come back in submission order.
/// let found = rask::testing::for_each_seed(0..100, |config| {
///     let client = Client::with_config(&config).map_err(|e| e.to_string())?;
///     let squares: Vec<i64> = as_completed(client.map(square, 0..4).map_err(|e| e.to_string())?)
///         .map(|f| f.result().unwrap())
///         .collect();
///     if squares == [0, 1, 4, 9] { Ok(()) } else { Err(format!("out of order: {squares:?}")) }
/// });
/// let failure = found.unwrap_err();
/// assert!(failure.replay.starts_with(&format!("seed = {}; replay: RASK_SCHEDULER=sim:{}", failure.seed, failure.seed)));
/// ```
pub fn for_each_seed(
    seeds: Range<u64>,
    mut check: impl FnMut(Config) -> Result<(), String>,
) -> Result<(), SeedFailure> {
    let replay = match std::env::var(ENV_VAR).ok().map(|v| ExecutorKind::parse(&v)) {
        Some(Ok(ExecutorKind::Simulated(seed))) => Some(seed),
        _ => None,
    };
    let seeds = match replay {
        Some(seed) => seed..seed.saturating_add(1),
        None => seeds,
    };
    for seed in seeds {
        if let Err(message) = check(Config::simulated(seed)) {
            let failure = SeedFailure {
                seed,
                message,
                replay: replay_line(seed),
            };
            eprintln!("{}", failure.replay);
            return Err(failure);
        }
    }
    Ok(())
}
