//! Choosing the executor: explicit argument > scoped [`set`] > `RASK_SCHEDULER`
//! > default (`threads`).
//!
//! Whether to optimize the graph first follows the same precedence:
//! [`Config::optimize`] > scoped > `RASK_OPTIMIZE` > default (on). So does
//! whether to draw progress bars: [`Config::progress`] > scoped >
//! `RASK_PROGRESS` > default (off).
//!
//! Switching a whole program between executors is a configuration change:
//!
//! ```text
//! RASK_SCHEDULER=sync cargo run --example quickstart
//! RASK_SCHEDULER=threads:2 cargo run --example quickstart
//! RASK_OPTIMIZE=off cargo run --example quickstart
//! RASK_PROGRESS=1 cargo run --example persist
//! ```

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// The environment variable that picks the executor.
pub const ENV_VAR: &str = "RASK_SCHEDULER";

/// The environment variable that switches graph optimization: `1`, `true`,
/// `on` or `0`, `false`, `off` (any case).
pub const OPTIMIZE_ENV_VAR: &str = "RASK_OPTIMIZE";

/// The environment variable that draws a progress bar for every `compute`
/// and `persist`: `1`, `true`, `on` or `0`, `false`, `off` (any case).
pub const PROGRESS_ENV_VAR: &str = "RASK_PROGRESS";

/// Which executor runs a computation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecutorKind {
    /// One thread, tasks in a deterministic order: the reference semantics.
    Synchronous,
    /// A work-stealing pool; `None` means one thread per core.
    Threads(Option<usize>),
    /// A cluster on this machine: a scheduler and this many worker processes
    /// of the current program (feature `distributed`).
    Local(usize),
    /// A running scheduler at `host:port` (feature `distributed`).
    Tcp(String),
    /// A running scheduler at `host:port`, reached over TLS (feature
    /// `distributed`; TLS settings from `RASK_TLS_CA`, `RASK_TLS_CERT`,
    /// `RASK_TLS_KEY`).
    Tls(String),
}

impl ExecutorKind {
    /// Parses the forms accepted by `RASK_SCHEDULER`: `sync`, `threads`,
    /// `threads:N`, `local:N`, `tcp://host:port`, `tls://host:port`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the accepted forms.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::config::ExecutorKind;
    /// assert_eq!(ExecutorKind::parse("threads:4")?, ExecutorKind::Threads(Some(4)));
    /// assert!(ExecutorKind::parse("bogus").is_err());
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn parse(text: &str) -> Result<ExecutorKind> {
        parse(text, "a string")
    }
}

fn parse(text: &str, source_name: &'static str) -> Result<ExecutorKind> {
    let err = |reason| Error::Config {
        value: text.to_owned(),
        source_name,
        reason,
    };
    let trimmed = text.trim();
    match trimmed {
        "sync" | "synchronous" => return Ok(ExecutorKind::Synchronous),
        "threads" => return Ok(ExecutorKind::Threads(None)),
        _ => {}
    }
    if let Some(n) = trimmed.strip_prefix("threads:") {
        return match n.parse::<usize>() {
            Ok(0) | Err(_) => Err(err("the thread count must be a whole number ≥ 1")),
            Ok(n) => Ok(ExecutorKind::Threads(Some(n))),
        };
    }
    if let Some(n) = trimmed.strip_prefix("local:") {
        return match n.parse::<usize>() {
            Ok(0) | Err(_) => Err(err("the worker count must be a whole number ≥ 1")),
            Ok(n) => Ok(ExecutorKind::Local(n)),
        };
    }
    for (scheme, kind) in [
        ("tcp://", ExecutorKind::Tcp as fn(String) -> ExecutorKind),
        ("tls://", ExecutorKind::Tls),
    ] {
        if let Some(address) = trimmed.strip_prefix(scheme) {
            return match address.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(kind(address.to_owned()))
                }
                _ => Err(err(
                    "a scheduler address is `tcp://host:port` or `tls://host:port`",
                )),
            };
        }
    }
    Err(err("unknown executor"))
}

impl FromStr for ExecutorKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ExecutorKind::parse(s)
    }
}

impl fmt::Display for ExecutorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecutorKind::Synchronous => f.write_str("sync"),
            ExecutorKind::Threads(None) => f.write_str("threads"),
            ExecutorKind::Threads(Some(n)) => write!(f, "threads:{n}"),
            ExecutorKind::Local(n) => write!(f, "local:{n}"),
            ExecutorKind::Tcp(address) => write!(f, "tcp://{address}"),
            ExecutorKind::Tls(address) => write!(f, "tls://{address}"),
        }
    }
}

/// Settings for a computation. Fields left unset fall back to the scoped
/// settings, then the environment, then the defaults.
///
/// # Examples
///
/// ```
/// use rask::Config;
/// fn inc(x: i64) -> i64 { x + 1 }
/// let two = rask::delayed!(inc(1)).compute_with(&Config::threads(2))?;
/// assert_eq!(two, 2);
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "a Config does nothing until it is passed to `compute_with`, \
              `Client::with_config` or `config::set`"]
pub struct Config {
    executor: Option<ExecutorKind>,
    optimize: Option<bool>,
    progress: Option<bool>,
}

impl Config {
    /// Nothing set: every setting comes from the scope, the environment or
    /// the defaults.
    pub fn new() -> Self {
        Config::default()
    }

    /// Run on the synchronous executor.
    pub fn synchronous() -> Self {
        Config::new().executor(ExecutorKind::Synchronous)
    }

    /// Run on a pool of `n` threads (`0`: one per core).
    pub fn threads(n: usize) -> Self {
        let n = if n == 0 { None } else { Some(n) };
        Config::new().executor(ExecutorKind::Threads(n))
    }

    /// Sets the executor.
    pub fn executor(mut self, kind: ExecutorKind) -> Self {
        self.executor = Some(kind);
        self
    }

    /// Whether to optimize the graph before running it (cull what no output
    /// needs, fold data and cheap tasks into their consumer, fuse linear
    /// chains). On by default; results and output keys are the same either
    /// way, and errors name the same task.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{delayed, Config};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// let x = delayed!(inc(delayed!(inc(1))));
    /// let plain = Config::synchronous().optimize(false);
    /// assert_eq!(x.compute_with(&plain)?, 3);
    /// assert_eq!(rask::explain(&x, &plain)?.len(), 2); // one task per node
    /// assert_eq!(rask::explain(&x, &Config::new())?.len(), 1); // fused
    ///
    /// // A scoped setting applies to every computation on this thread.
    /// let _guard = rask::config::set(Config::new().optimize(false));
    /// assert!(!Config::new().resolve_optimize()?);
    /// assert!(Config::new().optimize(true).resolve_optimize()?); // explicit wins
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn optimize(mut self, on: bool) -> Self {
        self.optimize = Some(on);
        self
    }

    /// Whether every `compute` and `persist` with this configuration draws
    /// a progress bar on stderr while it runs (see
    /// [`rask::progress`](crate::progress())): off by default, or
    /// `RASK_PROGRESS=1`. Bars are drawn only when stderr is a terminal;
    /// otherwise one plain line is printed when the work is done.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{delayed, Config};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// let watched = Config::threads(2).progress(true);
    /// assert_eq!(delayed!(inc(1)).compute_with(&watched)?, 2);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = Some(on);
        self
    }

    /// The settings named by `RASK_SCHEDULER`, `RASK_OPTIMIZE` and
    /// `RASK_PROGRESS` (unset: nothing set).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `RASK_SCHEDULER` holds an unknown value,
    /// [`Error::Switch`] when `RASK_OPTIMIZE` or `RASK_PROGRESS` does.
    pub fn from_env() -> Result<Self> {
        Ok(Config {
            executor: env_executor()?,
            optimize: env_switch(OPTIMIZE_ENV_VAR)?,
            progress: env_switch(PROGRESS_ENV_VAR)?,
        })
    }

    /// The executor this configuration resolves to, applying the precedence
    /// explicit > scoped > environment > default.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the environment variable is consulted and holds
    /// an unknown value.
    pub fn resolve(&self) -> Result<ExecutorKind> {
        if let Some(kind) = &self.executor {
            return Ok(kind.clone());
        }
        if let Some(kind) =
            SCOPED.with(|s| s.borrow().iter().rev().find_map(|c| c.executor.clone()))
        {
            return Ok(kind);
        }
        Ok(env_executor()?.unwrap_or(DEFAULT))
    }

    /// Whether computations with this configuration optimize the graph,
    /// applying the precedence explicit > scoped > `RASK_OPTIMIZE` > default
    /// (on).
    ///
    /// # Errors
    ///
    /// [`Error::Switch`] when the environment variable is consulted and holds
    /// an unknown value.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::Config;
    /// assert!(!Config::new().optimize(false).resolve_optimize()?);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn resolve_optimize(&self) -> Result<bool> {
        if let Some(on) = self.optimize {
            return Ok(on);
        }
        if let Some(on) = SCOPED.with(|s| s.borrow().iter().rev().find_map(|c| c.optimize)) {
            return Ok(on);
        }
        Ok(env_switch(OPTIMIZE_ENV_VAR)?.unwrap_or(true))
    }

    /// Whether computations with this configuration draw progress bars,
    /// applying the precedence explicit > scoped > `RASK_PROGRESS` >
    /// default (off).
    ///
    /// # Errors
    ///
    /// [`Error::Switch`] when the environment variable is consulted and holds
    /// an unknown value.
    pub fn resolve_progress(&self) -> Result<bool> {
        if let Some(on) = self.progress {
            return Ok(on);
        }
        if let Some(on) = SCOPED.with(|s| s.borrow().iter().rev().find_map(|c| c.progress)) {
            return Ok(on);
        }
        Ok(env_switch(PROGRESS_ENV_VAR)?.unwrap_or(false))
    }
}

fn env_executor() -> Result<Option<ExecutorKind>> {
    match std::env::var(ENV_VAR) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(parse(&text, ENV_VAR)?)),
        _ => Ok(None),
    }
}

/// The on/off setting in environment variable `name`, if set.
fn env_switch(name: &'static str) -> Result<Option<bool>> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(parse_switch(&text, name)?)),
        _ => Ok(None),
    }
}

/// Parses an on/off setting: `1`, `true`, `on` or `0`, `false`, `off`, in any
/// case, surrounding spaces ignored.
fn parse_switch(text: &str, source_name: &'static str) -> Result<bool> {
    let t = text.trim();
    let is = |word: &str| t.eq_ignore_ascii_case(word);
    if is("1") || is("true") || is("on") {
        Ok(true)
    } else if is("0") || is("false") || is("off") {
        Ok(false)
    } else {
        Err(Error::Switch {
            value: text.to_owned(),
            source_name,
        })
    }
}

/// The executor used when nothing is set: the thread pool when it is
/// compiled in, the synchronous executor otherwise.
const DEFAULT: ExecutorKind = if cfg!(feature = "threaded") {
    ExecutorKind::Threads(None)
} else {
    ExecutorKind::Synchronous
};

thread_local! {
    static SCOPED: RefCell<Vec<Config>> = const { RefCell::new(Vec::new()) };
}

/// Makes `config` the setting for computations started on this thread until
/// the returned guard is dropped. Guards nest; an explicit configuration
/// passed to a call still wins.
///
/// # Examples
///
/// ```
/// use rask::config::{self, Config, ExecutorKind};
/// {
///     let _guard = config::set(Config::synchronous());
///     assert_eq!(Config::new().resolve()?, ExecutorKind::Synchronous);
///     // An explicit argument beats the scope.
///     assert_eq!(Config::threads(3).resolve()?, ExecutorKind::Threads(Some(3)));
/// }
/// # Ok::<(), rask::Error>(())
/// ```
#[must_use = "the setting lasts only while the guard lives"]
pub fn set(config: Config) -> ConfigGuard {
    SCOPED.with(|s| s.borrow_mut().push(config));
    ConfigGuard {
        _not_send: std::marker::PhantomData,
    }
}

/// Restores the previous scoped configuration when dropped.
pub struct ConfigGuard {
    // The setting is thread-local, so the guard must be dropped on its thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        SCOPED.with(|s| s.borrow_mut().pop());
    }
}

impl fmt::Debug for ConfigGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigGuard")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accepted_forms() {
        assert_eq!(
            ExecutorKind::parse("sync").unwrap(),
            ExecutorKind::Synchronous
        );
        assert_eq!(
            ExecutorKind::parse(" threads ").unwrap(),
            ExecutorKind::Threads(None)
        );
        assert_eq!(
            ExecutorKind::parse("threads:8").unwrap(),
            ExecutorKind::Threads(Some(8))
        );
        assert_eq!(
            ExecutorKind::parse("local:2").unwrap(),
            ExecutorKind::Local(2)
        );
        assert_eq!(
            ExecutorKind::parse("tcp://10.0.0.5:8786").unwrap(),
            ExecutorKind::Tcp("10.0.0.5:8786".into())
        );
        assert_eq!(
            ExecutorKind::parse("tls://sched.example:8786").unwrap(),
            ExecutorKind::Tls("sched.example:8786".into())
        );
        for bad in [
            "bogus",
            "threads:0",
            "threads:x",
            "threads:",
            "local:0",
            "tcp://h",
            "tcp://:1",
            "tcp://h:x",
            "tls://h",
            "tls://:1",
        ] {
            let err = ExecutorKind::parse(bad).unwrap_err().to_string();
            assert!(err.contains("accepted forms"), "{bad}: {err}");
            assert!(err.contains(bad.trim()), "{bad}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for kind in [
            ExecutorKind::Synchronous,
            ExecutorKind::Threads(None),
            ExecutorKind::Threads(Some(3)),
            ExecutorKind::Local(2),
            ExecutorKind::Tcp("127.0.0.1:8786".into()),
            ExecutorKind::Tls("127.0.0.1:8786".into()),
        ] {
            assert_eq!(ExecutorKind::parse(&kind.to_string()).unwrap(), kind);
        }
    }

    #[test]
    fn parses_switches() {
        for on in ["1", "true", " on ", "TRUE", "On"] {
            assert!(parse_switch(on, OPTIMIZE_ENV_VAR).unwrap(), "{on}");
        }
        for off in ["0", "false", "off ", "OFF", "False"] {
            assert!(!parse_switch(off, OPTIMIZE_ENV_VAR).unwrap(), "{off}");
        }
        for bad in ["yes", "2", "o n", "enabled"] {
            let err = parse_switch(bad, OPTIMIZE_ENV_VAR).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
            assert!(err.contains(OPTIMIZE_ENV_VAR), "{bad}: {err}");
            assert!(err.contains("`off`"), "{bad}: {err}");
        }
    }

    #[test]
    fn optimize_precedence_is_explicit_then_scoped() {
        let outer = set(Config::new().optimize(false));
        assert!(!Config::new().resolve_optimize().unwrap());
        assert!(Config::new().optimize(true).resolve_optimize().unwrap());
        {
            // A scope that sets only the executor leaves the switch to the
            // outer scope.
            let _inner = set(Config::synchronous());
            assert!(!Config::new().resolve_optimize().unwrap());
            let _innermost = set(Config::new().optimize(true));
            assert!(Config::new().resolve_optimize().unwrap());
        }
        assert!(!Config::new().resolve_optimize().unwrap());
        // Setting the switch leaves the executor to the scope.
        assert_eq!(
            Config::new().optimize(true).resolve().unwrap(),
            Config::new().resolve().unwrap()
        );
        drop(outer);
    }

    #[test]
    fn scoped_guards_nest_and_explicit_wins() {
        let outer = set(Config::threads(2));
        assert_eq!(
            Config::new().resolve().unwrap(),
            ExecutorKind::Threads(Some(2))
        );
        {
            let _inner = set(Config::synchronous());
            assert_eq!(Config::new().resolve().unwrap(), ExecutorKind::Synchronous);
            assert_eq!(
                Config::threads(5).resolve().unwrap(),
                ExecutorKind::Threads(Some(5))
            );
        }
        assert_eq!(
            Config::new().resolve().unwrap(),
            ExecutorKind::Threads(Some(2))
        );
        drop(outer);
    }
}
