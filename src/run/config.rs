//! Settings: which executor runs a computation, whether its graph is
//! optimized, whether progress bars are drawn, what a cluster needs, and
//! how a client waits for one.
//!
//! Each setting is taken from the first of these places that sets it:
//!
//! | | executor | optimize | progress | dashboard | token file | cache | spin |
//! |---|---|---|---|---|---|---|---|
//! | 1. argument ([`Delayed::compute_with`](crate::Delayed::compute_with), …) | [`Config::executor`] | [`Config::optimize`] | [`Config::progress`] | | | [`Config::cache`] | [`Config::spin`] |
//! | 2. scoped, this thread ([`set`]) | the same | the same | the same | | | the same | the same |
//! | 3. process-wide ([`set_global`]) | the same | the same | the same | | | the same | the same |
//! | 4. environment | `RASK_SCHEDULER` | `RASK_OPTIMIZE` | `RASK_PROGRESS` | `RASK_DASHBOARD` | `RASK_TOKEN`, `RASK_TOKEN_FILE` | `RASK_CACHE` | `RASK_SPIN` |
//! | 5. config file | `scheduler` | `optimize` | `progress` | `dashboard` | `token_file` | `cache` | `spin` |
//! | 6. default | `threads` | on | off | none | `~/.rask/token` | none | on |
//!
//! The config file is the one `RASK_CONFIG` names (it must exist), else
//! `rask.toml` in the working directory if there is one; it is read once,
//! when a setting is first looked up, and an unknown key or a bad value in
//! it is an error naming the file and the key ([`FileSettings`]):
//!
//! ```toml
//! scheduler = "threads:4"          # the forms of RASK_SCHEDULER
//! optimize = true
//! progress = false
//! dashboard = "127.0.0.1:8787"     # a local cluster's dashboard (":0": any port)
//! token_file = "secrets/token"     # relative to the file's directory
//! cache = ".rask-cache"            # the result cache's directory (see `rask::cache`)
//! spin = false                     # waits for a cluster's results sleep at once (`Config::spin`)
//! ```
//!
//! The dashboard setting applies to the clusters this process starts
//! (`local:N`, [`Client::local`](crate::Client::local)); the token file to
//! the clusters it connects to, as a client or as a worker.
//!
//! Switching a whole program between executors is a configuration change:
//!
//! ```text
//! RASK_SCHEDULER=sync cargo run --example quickstart
//! RASK_SCHEDULER=threads:2 cargo run --example quickstart
//! RASK_OPTIMIZE=off cargo run --example quickstart
//! RASK_PROGRESS=1 cargo run --example persist
//! ```
//!
//! Every layer, from the bottom up:
//!
//! ```
//! use rask::config::{self, Config, ExecutorKind};
//! # let dir = std::env::temp_dir().join(format!("rask-layers-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # std::env::remove_var("RASK_SCHEDULER");
//! let kind = || Config::new().resolve();
//! std::fs::write(dir.join("rask.toml"), "scheduler = 'threads:1'\n").unwrap();
//! std::env::set_var("RASK_CONFIG", dir.join("rask.toml"));
//! assert_eq!(kind()?, ExecutorKind::Threads(Some(1)));          // 5. file
//! std::env::set_var("RASK_SCHEDULER", "threads:2");
//! assert_eq!(kind()?, ExecutorKind::Threads(Some(2)));          // 4. environment
//! config::set_global(Config::threads(3));
//! assert_eq!(kind()?, ExecutorKind::Threads(Some(3)));          // 3. process-wide
//! let _scope = config::set(Config::threads(4));
//! assert_eq!(kind()?, ExecutorKind::Threads(Some(4)));          // 2. scoped
//! assert_eq!(Config::synchronous().resolve()?, ExecutorKind::Synchronous); // 1. argument
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), rask::Error>(())
//! ```
//!
//! Rules:
//!
//! 1. A scoped setting ([`set`]) is thread-local: it applies to the
//!    computations this thread starts, not to other threads, not to threads
//!    spawned while it is in place, and not to the tasks themselves.
//!    [`set_global`] is for the whole process.
//! 2. A layer that leaves a setting unset passes it on to the next:
//!    `set(Config::new().optimize(false))` keeps the executor of the layers
//!    below.
//! 3. A bad value is an error when it is consulted, never a silent
//!    fallback to the next layer. `compute`, `persist` and a `Client`
//!    consult every setting, on every executor, whether or not what it
//!    tunes is in use (`RASK_SPIN` without a cluster, `RASK_CACHE_ALL`
//!    without `RASK_CACHE`).
//! 4. Inside a task running on a cluster worker, the executor is that
//!    worker's cluster, below an argument and a scope and above every
//!    other layer (a worker process inherits its program's environment,
//!    where `RASK_SCHEDULER=local:2` would mean another cluster): a task's
//!    nested `compute`, `persist` or `Client::new()` runs on the cluster
//!    the task runs on, through one connection per worker process. Its
//!    thread is given back to the worker while it waits, so nested work
//!    never waits for a thread its own waiting holds.

use std::cell::RefCell;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{OnceLock, PoisonError, RwLock};

use crate::{Error, Result};

/// The environment variable that picks the executor.
pub const ENV_VAR: &str = "RASK_SCHEDULER";

/// The environment variable that names the config file (which must then
/// exist).
pub const FILE_ENV_VAR: &str = "RASK_CONFIG";

/// The config file looked for in the working directory when
/// [`FILE_ENV_VAR`] is not set: `rask.toml`.
pub const FILE_NAME: &str = "rask.toml";

/// The environment variable that serves a local cluster's dashboard:
/// `HOST:PORT`, or `:PORT` on 127.0.0.1 (`:0` picks a free port).
pub const DASHBOARD_ENV_VAR: &str = "RASK_DASHBOARD";

/// The environment variable that switches graph optimization: `1`, `true`,
/// `on` or `0`, `false`, `off` (any case).
pub const OPTIMIZE_ENV_VAR: &str = "RASK_OPTIMIZE";

/// The environment variable that draws a progress bar for every `compute`
/// and `persist`: `1`, `true`, `on` or `0`, `false`, `off` (any case).
pub const PROGRESS_ENV_VAR: &str = "RASK_PROGRESS";

/// The environment variable that lets a thread waiting for a cluster's
/// result watch for it before it sleeps ([`Config::spin`]): `1`, `true`,
/// `on` or `0`, `false`, `off` (any case).
///
/// ```
/// std::env::set_var("RASK_SPIN", "sometimes");
/// let err = rask::Config::new().resolve_spin().unwrap_err().to_string();
/// assert!(err.contains("RASK_SPIN") && err.contains("sometimes"), "{err}");
/// std::env::set_var("RASK_SPIN", "off");
/// assert!(!rask::Config::new().resolve_spin()?);
/// # Ok::<(), rask::Error>(())
/// ```
pub const SPIN_ENV_VAR: &str = "RASK_SPIN";

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
    /// A running scheduler of this machine, reached through its Unix socket
    /// at this path (`unix:PATH`; feature `distributed`): cheaper per
    /// message than TCP over loopback. A local cluster's workers reach
    /// their scheduler this way.
    Unix(String),
    /// One thread, ready tasks (and, for a [`Client`](crate::Client), the
    /// futures' completions) picked in an order drawn from this seed: the
    /// same seed replays the same order exactly, on any machine
    /// ([`Simulated`](rask_executor::Simulated)). For tests that explore
    /// the orders a pool or a cluster might choose.
    Simulated(u64),
    /// A simulated cluster in this process (feature `distributed`): the
    /// real scheduler state machine with `workers` simulated workers, every
    /// latency and choice decided by `seed`, so a run replays exactly
    /// (`rask_distributed::sim`). Each computation runs on a fresh one,
    /// with `faults` faults the seed places (killed workers, lost values,
    /// delayed messages) that must not change any result.
    SimCluster {
        /// Simulated workers, at least 1.
        workers: u32,
        /// The seed of every choice.
        seed: u64,
        /// Faults in every run: `sim-cluster:W:SEED:FAULTS`, 0 when left out.
        faults: u32,
    },
}

impl ExecutorKind {
    /// Whether tasks run in the worker processes of a cluster (`local:N`,
    /// `tcp://`, `tls://`, `unix:`), not in this process: values then
    /// travel, and stay on the workers that computed them. A simulated
    /// cluster runs in this process.
    ///
    /// ```
    /// use rask::ExecutorKind;
    /// assert!(ExecutorKind::Local(2).is_cluster());
    /// assert!(ExecutorKind::Tcp("10.0.0.5:8786".into()).is_cluster());
    /// assert!(!ExecutorKind::Threads(None).is_cluster());
    /// assert!(!ExecutorKind::SimCluster { workers: 2, seed: 1, faults: 0 }.is_cluster());
    /// ```
    pub fn is_cluster(&self) -> bool {
        matches!(
            self,
            ExecutorKind::Local(_)
                | ExecutorKind::Tcp(_)
                | ExecutorKind::Tls(_)
                | ExecutorKind::Unix(_)
        )
    }

    /// Whether plans for this executor leave the process, so they are
    /// planned as a cluster's are: a cluster, or a simulated one. What
    /// `compute` plans with and what `explain` shows, one predicate.
    pub(crate) fn plans_remotely(&self) -> bool {
        self.is_cluster() || matches!(self, ExecutorKind::SimCluster { .. })
    }

    /// Parses the forms accepted by `RASK_SCHEDULER`: `sync`, `threads`,
    /// `threads:N`, `local:N`, `tcp://host:port`, `tls://host:port`,
    /// `unix:PATH`, `sim:SEED`, `sim-cluster:WORKERS:SEED`.
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
    if let Some(seed) = trimmed.strip_prefix("sim:") {
        return match seed.parse::<u64>() {
            Ok(seed) => Ok(ExecutorKind::Simulated(seed)),
            Err(_) => Err(err("the seed must be a whole number from 0 to 2^64 - 1")),
        };
    }
    if let Some(n) = trimmed.strip_prefix("local:") {
        return match n.parse::<usize>() {
            Ok(0) | Err(_) => Err(err("the worker count must be a whole number ≥ 1")),
            Ok(n) => Ok(ExecutorKind::Local(n)),
        };
    }
    if let Some(rest) = trimmed.strip_prefix("sim-cluster:") {
        let parsed = || -> Option<(u32, u64, u32)> {
            let mut parts = rest.split(':');
            let workers = parts.next()?.parse().ok()?;
            let seed = parts.next()?.parse().ok()?;
            let faults = match parts.next() {
                Some(f) => f.parse().ok()?,
                None => 0,
            };
            parts.next().is_none().then_some((workers, seed, faults))
        };
        let parsed = parsed().map(|(w, s, f)| (w, s, Some(f)));
        return match parsed {
            Some((workers, seed, Some(faults))) if workers >= 1 => Ok(ExecutorKind::SimCluster {
                workers,
                seed,
                faults,
            }),
            _ => Err(err(
                "a simulated cluster is `sim-cluster:WORKERS:SEED[:FAULTS]`, WORKERS ≥ 1, SEED \
                 and FAULTS whole numbers",
            )),
        };
    }
    if let Some(path) = trimmed.strip_prefix("unix:") {
        return match path {
            "" => Err(err("a Unix socket address is `unix:PATH`")),
            path => Ok(ExecutorKind::Unix(path.to_owned())),
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
            ExecutorKind::Unix(path) => write!(f, "unix:{path}"),
            ExecutorKind::Simulated(seed) => write!(f, "sim:{seed}"),
            ExecutorKind::SimCluster {
                workers,
                seed,
                faults: 0,
            } => write!(f, "sim-cluster:{workers}:{seed}"),
            ExecutorKind::SimCluster {
                workers,
                seed,
                faults,
            } => write!(f, "sim-cluster:{workers}:{seed}:{faults}"),
        }
    }
}

/// Settings for a computation. Fields left unset fall back to the scoped
/// settings, the process-wide ones, the environment, the config file and
/// the defaults, in this order (see [the module](self)).
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
    cache: Option<PathBuf>,
    cache_all: Option<bool>,
    cache_max_bytes: Option<u64>,
    cache_strict: Option<bool>,
    spin: Option<bool>,
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

    /// Run on the simulated executor: one thread, tasks (and a client's
    /// completions) in an order drawn from `seed`; `RASK_SCHEDULER=sim:SEED`
    /// does the same.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{delayed, Config};
    /// fn add(x: i64, y: i64) -> i64 { x + y }
    /// let total = delayed!(add(delayed!(add(1, 2)), delayed!(add(3, 4))));
    /// for seed in 0..10 {
    ///     assert_eq!(total.compute_with(&Config::simulated(seed))?, 10);
    /// }
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn simulated(seed: u64) -> Self {
        Config::new().executor(ExecutorKind::Simulated(seed))
    }

    /// Run on a pool of `n` threads (`0`: one per core).
    ///
    /// A computation whose caller waits for it (`compute`) and whose plan
    /// can only run one task at a time (a single task, or a chain whose
    /// every task takes the one before it) runs on the calling thread, as
    /// [`synchronous`](Config::synchronous) runs it: the pool would take
    /// its tasks one at a time as well, after waking one of its threads
    /// and before waking the caller, which costs more than a small task.
    /// The pool starts with the first plan that has tasks side by side. A
    /// [`Client`](crate::Client)'s submissions, which return at once,
    /// always run on the pool.
    ///
    /// ```
    /// use rask::{delayed, Config};
    /// fn add(x: i64, y: i64) -> i64 { x + y }
    /// fn thread(_: i64) -> String { format!("{:?}", std::thread::current().id()) }
    ///
    /// let pool = Config::threads(2);
    /// // Two tasks side by side, then their sum: on the pool.
    /// let total = delayed!(add(delayed!(add(1, 2)), delayed!(add(3, 4))));
    /// assert_eq!(total.compute_with(&pool)?, 10);
    /// // One task: on this thread.
    /// let here = format!("{:?}", std::thread::current().id());
    /// assert_eq!(delayed!(thread(1)).compute_with(&pool)?, here);
    /// # Ok::<(), rask::Error>(())
    /// ```
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
    /// otherwise one plain line is printed when the work is done. `compute`
    /// returns once its bar's last state is drawn, or after three seconds
    /// when stderr does not take it (a paused terminal, a pipe nobody
    /// reads): bars draw nothing then until stderr is read again.
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

    /// Keeps the values of cached tasks in the directory `dir`, made when
    /// first needed, so that later runs load them instead of running them:
    /// the result cache ([`crate::cache`]); `RASK_CACHE=dir` or the config
    /// file's `cache` do the same. Tasks opt in with
    /// [`Delayed::cache`](crate::Delayed::cache), `#[rask::task(cache)]` or
    /// [`cache_all`](Config::cache_all).
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("rask-config-cache-doc-{}", std::process::id()));
    /// use rask::Config;
    /// let config = Config::new().cache(&dir).cache_max_bytes(1 << 30);
    /// assert_eq!(config.resolve_cache()?.unwrap().dir, dir);
    /// assert!(Config::new().resolve_cache()?.is_none() || std::env::var_os("RASK_CACHE").is_some());
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache = Some(dir.into());
        self
    }

    /// Caches every pure call (a function item or a closure that captures
    /// nothing, not [`unique`](crate::Delayed::unique)) when a cache is
    /// configured, as if each were marked [`cache`](crate::Delayed::cache):
    /// off by default, `RASK_CACHE_ALL=1`, or the config file's
    /// `cache_all`.
    pub fn cache_all(mut self, on: bool) -> Self {
        self.cache_all = Some(on);
        self
    }

    /// The most bytes the cache's entries may take: after a run writes
    /// entries past it, the least recently used entries are removed until
    /// they fit ([`crate::cache`]); `RASK_CACHE_MAX_BYTES`, or the config
    /// file's `cache_max_bytes`. No limit by default.
    pub fn cache_max_bytes(mut self, bytes: u64) -> Self {
        self.cache_max_bytes = Some(bytes);
        self
    }

    /// Also folds this program's build (a hash of its executable) into
    /// every cache entry's address, so that any rebuild invalidates every
    /// entry, whatever versions functions record: for when a task's value
    /// depends on code its version does not cover (a helper function, a
    /// type's layout). Off by default, `RASK_CACHE_STRICT=1`, or the config
    /// file's `cache_strict`.
    pub fn cache_strict(mut self, on: bool) -> Self {
        self.cache_strict = Some(on);
        self
    }

    /// Whether a thread waiting for a cluster's result may watch for it
    /// for a moment (at most 100 µs) before it sleeps: on by default,
    /// `RASK_SPIN=0` or the config file's `spin = false` turn it off.
    ///
    /// A result from a cluster crosses several threads, and waking a
    /// sleeping thread on an idle core takes the system tens of
    /// microseconds (more on a virtual machine): a waiting thread that
    /// watches keeps a core awake, and a round trip from a client to a
    /// local cluster took about half as long in `benches/README.md`
    /// (round five). Even when on, a wait watches only where that can
    /// pay: a client of a cluster, on a machine of more than one core,
    /// outside tasks, one thread per client at a time, and only while the
    /// client's recent waits were short, so waiting for long tasks never
    /// watches. Off, every wait sleeps at once: for a machine shared with
    /// other work, where a watching core is a core taken from it.
    /// Results are the same either way.
    ///
    /// A [`Client`](crate::Client) takes the setting when it is made.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::{delayed, Client, Config};
    /// fn inc(x: i64) -> i64 { x + 1 }
    ///
    /// let client = Client::with_config(&Config::threads(2).spin(false))?;
    /// assert_eq!(client.submit(delayed!(inc(1)))?.result()?, 2);
    ///
    /// let _scope = rask::config::set(Config::new().spin(false));
    /// assert!(!Config::new().resolve_spin()?);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn spin(mut self, on: bool) -> Self {
        self.spin = Some(on);
        self
    }

    /// The result cache this configuration uses, if any, applying the
    /// precedence explicit > scoped > process-wide > environment
    /// (`RASK_CACHE`, `RASK_CACHE_ALL`, `RASK_CACHE_MAX_BYTES`,
    /// `RASK_CACHE_STRICT`) > config file > default (none) to each setting.
    ///
    /// # Errors
    ///
    /// [`Error::Switch`] or [`Error::Setting`] when an environment variable
    /// is consulted and holds a bad value, whether or not a cache is on;
    /// as [`Config::resolve`] for the config file.
    ///
    /// ```
    /// std::env::set_var("RASK_CACHE_ALL", "sometimes");
    /// let err = rask::Config::new().resolve_cache().unwrap_err().to_string();
    /// assert!(err.contains("RASK_CACHE_ALL") && err.contains("sometimes"), "{err}");
    /// std::env::remove_var("RASK_CACHE_ALL");
    /// ```
    pub fn resolve_cache(&self) -> Result<Option<CacheSettings>> {
        // Every setting is read, a cache or not, so that a bad one is
        // refused rather than ignored until a cache is turned on.
        let all = self
            .pick(|c| c.cache_all, || env_switch(CACHE_ALL_ENV_VAR))?
            .unwrap_or(false);
        let max_bytes = self.pick(|c| c.cache_max_bytes, env_max_bytes)?;
        let strict = self
            .pick(|c| c.cache_strict, || env_switch(CACHE_STRICT_ENV_VAR))?
            .unwrap_or(false);
        let Some(dir) = self.pick(|c| c.cache.clone(), || Ok(env_path(CACHE_ENV_VAR)))? else {
            return Ok(None);
        };
        Ok(Some(CacheSettings {
            dir,
            all,
            max_bytes,
            strict,
        }))
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
            ..Config::default()
        })
    }

    /// The executor this configuration resolves to, applying the precedence
    /// explicit > scoped > process-wide > `RASK_SCHEDULER` > config file >
    /// default (`threads`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the environment variable is consulted and holds
    /// an unknown value, [`Error::ConfigFile`] when the config file is and
    /// cannot be read or holds an unknown key or a bad value.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::config::{Config, ExecutorKind};
    /// assert_eq!(Config::threads(3).resolve()?, ExecutorKind::Threads(Some(3)));
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn resolve(&self) -> Result<ExecutorKind> {
        let scoped = || SCOPED.with(|s| s.borrow().iter().rev().find_map(|c| c.executor.clone()));
        if let Some(kind) = self.executor.clone().or_else(scoped) {
            return Ok(kind);
        }
        // Rule 4: a task on a cluster worker computes on its cluster.
        #[cfg(feature = "distributed")]
        if let Some(kind) = crate::run::cluster::task_cluster_executor() {
            return Ok(kind);
        }
        Ok(self
            .pick(|c| c.executor.clone(), env_executor)?
            .unwrap_or(DEFAULT))
    }

    /// Whether computations with this configuration optimize the graph,
    /// applying the precedence explicit > scoped > process-wide >
    /// `RASK_OPTIMIZE` > config file > default (on).
    ///
    /// # Errors
    ///
    /// [`Error::Switch`] when the environment variable is consulted and holds
    /// an unknown value; as [`Config::resolve`] for the config file.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::Config;
    /// assert!(!Config::new().optimize(false).resolve_optimize()?);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn resolve_optimize(&self) -> Result<bool> {
        Ok(self
            .pick(|c| c.optimize, || env_switch(OPTIMIZE_ENV_VAR))?
            .unwrap_or(true))
    }

    /// Whether computations with this configuration draw progress bars,
    /// applying the precedence explicit > scoped > process-wide >
    /// `RASK_PROGRESS` > config file > default (off).
    ///
    /// # Errors
    ///
    /// [`Error::Switch`] when the environment variable is consulted and holds
    /// an unknown value; as [`Config::resolve`] for the config file.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::Config;
    /// assert!(Config::new().progress(true).resolve_progress()?);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn resolve_progress(&self) -> Result<bool> {
        Ok(self
            .pick(|c| c.progress, || env_switch(PROGRESS_ENV_VAR))?
            .unwrap_or(false))
    }

    /// Whether a thread waiting for a cluster's result may watch for it
    /// for a moment (at most 100 µs) before it sleeps, applying the
    /// precedence explicit > scoped > process-wide > `RASK_SPIN` > config
    /// file > default (on).
    ///
    /// # Errors
    ///
    /// [`Error::Switch`] when the environment variable is consulted and holds
    /// an unknown value; as [`Config::resolve`] for the config file.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask::Config;
    /// assert!(!Config::new().spin(false).resolve_spin()?);
    /// # Ok::<(), rask::Error>(())
    /// ```
    pub fn resolve_spin(&self) -> Result<bool> {
        Ok(self
            .pick(|c| c.spin, || env_switch(SPIN_ENV_VAR))?
            .unwrap_or(true))
    }

    /// One setting, from the first layer that sets it: this configuration,
    /// the scoped ones (innermost first), the process-wide one, the
    /// environment (`env`), the config file. `None`: the default applies.
    fn pick<T>(
        &self,
        get: impl Fn(&Config) -> Option<T>,
        env: impl FnOnce() -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let scoped = || SCOPED.with(|s| s.borrow().iter().rev().find_map(&get));
        let global = || {
            let global = GLOBAL.read().unwrap_or_else(PoisonError::into_inner);
            global.as_ref().and_then(&get)
        };
        if let Some(value) = get(self).or_else(scoped).or_else(global) {
            return Ok(Some(value));
        }
        if let Some(value) = env()? {
            return Ok(Some(value));
        }
        Ok(file()?.and_then(|f| get(&f.config)))
    }
}

/// The result cache a computation uses ([`Config::resolve_cache`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheSettings {
    /// The directory of its entries.
    pub dir: PathBuf,
    /// Whether every pure call is cached ([`Config::cache_all`]).
    pub all: bool,
    /// The most bytes its entries may take ([`Config::cache_max_bytes`]).
    pub max_bytes: Option<u64>,
    /// Whether the program's build is part of every address
    /// ([`Config::cache_strict`]).
    pub strict: bool,
}

/// The environment variable that turns the result cache on: a directory.
pub const CACHE_ENV_VAR: &str = "RASK_CACHE";
/// The environment variable that caches every pure call: on/off.
pub const CACHE_ALL_ENV_VAR: &str = "RASK_CACHE_ALL";
/// The environment variable that caps the cache's size: a number of bytes.
pub const CACHE_MAX_BYTES_ENV_VAR: &str = "RASK_CACHE_MAX_BYTES";
/// The environment variable that folds the build into every address: on/off.
pub const CACHE_STRICT_ENV_VAR: &str = "RASK_CACHE_STRICT";

/// A path in environment variable `name`, if set and not empty.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The text of environment variable `name`, if set and not blank. A value
/// that is not UTF-8 is an error naming the variable, never taken for
/// unset (which would let a lower layer's setting apply unseen).
fn env_text(name: &'static str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => Err(Error::Setting {
            name,
            value: raw.to_string_lossy().into_owned(),
            expected: "UTF-8 text",
        }),
    }
}

fn env_max_bytes() -> Result<Option<u64>> {
    let Some(text) = env_text(CACHE_MAX_BYTES_ENV_VAR)? else {
        return Ok(None);
    };
    text.trim().parse().map(Some).map_err(|_| Error::Setting {
        name: CACHE_MAX_BYTES_ENV_VAR,
        value: text.trim().to_owned(),
        expected: "a whole number of bytes",
    })
}

fn env_executor() -> Result<Option<ExecutorKind>> {
    env_text(ENV_VAR)?
        .map(|text| parse(&text, ENV_VAR))
        .transpose()
}

/// The on/off setting in environment variable `name`, if set.
fn env_switch(name: &'static str) -> Result<Option<bool>> {
    env_text(name)?
        .map(|text| parse_switch(&text, name))
        .transpose()
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
/// The setting is **thread-local**: computations started on other threads,
/// on threads spawned while the guard lives, or by `async` code that moves
/// between threads do not see it. Use [`set_global`] for the whole process.
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

/// Restores the previous scoped configuration when dropped; returned by
/// [`set`]. It must be dropped on the thread that made it, so it is neither
/// `Send` nor `Sync`.
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

static GLOBAL: RwLock<Option<Config>> = RwLock::new(None);

/// Makes `config` the process-wide setting, beneath explicit arguments and
/// [`set`] scopes and above the environment and the config file, for every
/// thread; returns the one it replaces. `set_global(Config::new())` clears
/// it.
///
/// Why there is both: a scope is undone when its guard drops, so it is safe
/// in libraries and tests that run in parallel; the process-wide setting is
/// for a program's `main`, the one place that owns the whole process.
///
/// # Examples
///
/// ```
/// use rask::config::{self, Config, ExecutorKind};
///
/// config::set_global(Config::synchronous().optimize(false));
/// let other = std::thread::spawn(|| Config::new().resolve()).join().unwrap()?;
/// assert_eq!(other, ExecutorKind::Synchronous); // every thread sees it
/// {
///     let _scope = config::set(Config::threads(2));
///     assert_eq!(Config::new().resolve()?, ExecutorKind::Threads(Some(2))); // a scope wins
///     assert!(!Config::new().resolve_optimize()?); // what the scope leaves unset
/// }
/// let before = config::set_global(Config::new());
/// assert_eq!(before, Config::synchronous().optimize(false));
/// # Ok::<(), rask::Error>(())
/// ```
pub fn set_global(config: Config) -> Config {
    let mut global = GLOBAL.write().unwrap_or_else(PoisonError::into_inner);
    let before = global.take().unwrap_or_default();
    if config != Config::new() {
        *global = Some(config);
    }
    before
}

/// The settings of a config file ([`FILE_NAME`] or the file
/// [`FILE_ENV_VAR`] names). Relative paths in it are taken from the file's
/// directory.
///
/// Keys, all optional:
///
/// | key | value | e.g. |
/// |---|---|---|
/// | `scheduler` | a form of `RASK_SCHEDULER` | `"threads:4"`, `"tcp://10.0.0.5:8786"` |
/// | `optimize` | `true` or `false` | `false` |
/// | `progress` | `true` or `false` | `true` |
/// | `dashboard` | `HOST:PORT`, or `:PORT` on 127.0.0.1 | `":8787"` |
/// | `token_file` | a file holding a cluster's token | `"/etc/rask/token"` |
/// | `cache` | the result cache's directory | `".rask-cache"` |
/// | `cache_all` | `true` or `false` | `true` |
/// | `cache_max_bytes` | a whole number of bytes | `10_000_000_000` |
/// | `cache_strict` | `true` or `false` | `false` |
/// | `spin` | `true` or `false` | `false` |
///
/// A `cache` path that exists must be a directory.
///
/// # Examples
///
/// ```
/// use rask::config::{ExecutorKind, FileSettings};
/// let file = FileSettings::parse("scheduler = 'sync'\noptimize = false\n", "rask.toml".as_ref())?;
/// assert_eq!(file.config.resolve()?, ExecutorKind::Synchronous);
///
/// let err = FileSettings::parse("schedular = 'sync'", "rask.toml".as_ref()).unwrap_err();
/// assert!(err.to_string().contains("unknown field `schedular`, expected one of `scheduler`"));
/// # Ok::<(), rask::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileSettings {
    /// The file they were read from.
    pub path: PathBuf,
    /// The executor, optimize and progress settings.
    pub config: Config,
    /// Where a local cluster started by this process serves its dashboard.
    pub dashboard: Option<SocketAddr>,
    /// The file holding the token of the clusters this process connects to.
    pub token_file: Option<PathBuf>,
    /// The directory of the result cache (also in `config`).
    pub cache: Option<PathBuf>,
}

/// A config file as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    scheduler: Option<String>,
    optimize: Option<bool>,
    progress: Option<bool>,
    dashboard: Option<String>,
    token_file: Option<PathBuf>,
    cache: Option<PathBuf>,
    cache_all: Option<bool>,
    cache_max_bytes: Option<u64>,
    cache_strict: Option<bool>,
    spin: Option<bool>,
}

impl FileSettings {
    /// Reads the config file at `path`.
    ///
    /// # Errors
    ///
    /// [`Error::ConfigFile`] when it cannot be read, is not TOML, or holds
    /// an unknown key or a bad value; the message names the file, the key
    /// and what is accepted.
    pub fn load(path: &Path) -> Result<FileSettings> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_owned(),
            problem: format!("cannot be read: {e}"),
        })?;
        FileSettings::parse(&text, path)
    }

    /// Parses `text` as the config file at `path` (which is not read; it
    /// names the file in errors and anchors relative paths).
    ///
    /// # Errors
    ///
    /// As [`FileSettings::load`].
    pub fn parse(text: &str, path: &Path) -> Result<FileSettings> {
        let bad = |problem: String| Error::ConfigFile {
            path: path.to_owned(),
            problem,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| format!("line {}: ", text[..span.start].matches('\n').count() + 1))
                .unwrap_or_default();
            bad(format!("{line}{}", e.message().trim_end()))
        })?;
        let executor = match &raw.scheduler {
            None => None,
            Some(text) => Some(parse(text, "key `scheduler`").map_err(|e| bad(e.to_string()))?),
        };
        let dashboard = match &raw.dashboard {
            None => None,
            Some(text) => parse_dashboard(text).ok_or_else(|| {
                bad(format!(
                    "invalid value `{text}` for key `dashboard`: expected {DASHBOARD_FORMS}"
                ))
            })?,
        };
        let base = path.parent().unwrap_or(Path::new(""));
        let anchor = |p: &PathBuf| base.join(p);
        for (key, value) in [("token_file", &raw.token_file), ("cache", &raw.cache)] {
            if value.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(bad(format!("key `{key}` is empty: expected a path")));
            }
        }
        let cache = raw.cache.as_ref().map(anchor);
        if let Some(cache) = &cache {
            if cache.exists() && !cache.is_dir() {
                return Err(bad(format!(
                    "key `cache`: {} is not a directory",
                    cache.display()
                )));
            }
        }
        Ok(FileSettings {
            path: path.to_owned(),
            config: Config {
                executor,
                optimize: raw.optimize,
                progress: raw.progress,
                cache: cache.clone(),
                cache_all: raw.cache_all,
                cache_max_bytes: raw.cache_max_bytes,
                cache_strict: raw.cache_strict,
                spin: raw.spin,
            },
            dashboard,
            token_file: raw.token_file.as_ref().map(anchor),
            cache,
        })
    }
}

/// The config file of this process: the one [`FILE_ENV_VAR`] names, else
/// [`FILE_NAME`] in the working directory, else none. Read on first use and
/// kept; a file that could not be read is tried again on the next call.
///
/// # Errors
///
/// [`Error::ConfigFile`] when [`FILE_ENV_VAR`] names a file that does not
/// exist, or the file cannot be read or holds an unknown key or a bad value.
///
/// # Examples
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("rask-config-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// // A file RASK_CONFIG names must exist.
/// std::env::set_var("RASK_CONFIG", dir.join("missing.toml"));
/// let err = rask::config::file().unwrap_err().to_string();
/// assert!(err.ends_with("missing.toml: does not exist (named by RASK_CONFIG)"), "{err}");
///
/// std::fs::write(dir.join("rask.toml"), "progress = true\n").unwrap();
/// std::env::set_var("RASK_CONFIG", dir.join("rask.toml"));
/// assert_eq!(rask::config::file()?.unwrap().config, rask::Config::new().progress(true));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), rask::Error>(())
/// ```
pub fn file() -> Result<Option<&'static FileSettings>> {
    static FILE: OnceLock<Option<FileSettings>> = OnceLock::new();
    if let Some(file) = FILE.get() {
        return Ok(file.as_ref());
    }
    let found = match std::env::var_os(FILE_ENV_VAR).filter(|v| !v.is_empty()) {
        Some(named) => {
            let path = PathBuf::from(named);
            if !path.exists() {
                return Err(Error::ConfigFile {
                    path,
                    problem: format!("does not exist (named by {FILE_ENV_VAR})"),
                });
            }
            Some(FileSettings::load(&path)?)
        }
        None => {
            let path = Path::new(FILE_NAME);
            if path.is_file() {
                Some(FileSettings::load(path)?)
            } else {
                None
            }
        }
    };
    // Two threads may both read the file on first use; one result is kept.
    Ok(FILE.get_or_init(|| found).as_ref())
}

const DASHBOARD_FORMS: &str = "HOST:PORT with an IP address, or :PORT for 127.0.0.1";

/// `HOST:PORT`, or `:PORT` for 127.0.0.1; `Some(None)` for empty text.
fn parse_dashboard(text: &str) -> Option<Option<SocketAddr>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(None);
    }
    let full = match text.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => text.to_owned(),
    };
    full.parse().ok().map(Some)
}

/// Where a local cluster started by this process serves its dashboard:
/// `RASK_DASHBOARD` > the config file's `dashboard` > nowhere; with the
/// setting it came from, for an error naming it.
#[cfg(feature = "distributed")]
pub(crate) fn dashboard() -> Result<Option<(SocketAddr, &'static str)>> {
    match env_text(DASHBOARD_ENV_VAR)? {
        Some(text) => parse_dashboard(&text)
            .map(|at| at.map(|at| (at, DASHBOARD_ENV_VAR)))
            .ok_or_else(|| Error::Setting {
                name: DASHBOARD_ENV_VAR,
                value: text.trim().to_owned(),
                expected: DASHBOARD_FORMS,
            }),
        None => Ok(file()?
            .and_then(|f| f.dashboard)
            .map(|at| (at, "the config file's `dashboard`"))),
    }
}

/// The token of the clusters this process connects to, as a client or a
/// worker: `RASK_INSECURE`, `RASK_TOKEN` and `RASK_TOKEN_FILE` as
/// [`rask_distributed::Auth::from_env`] reads them, the config file's
/// `token_file` where `RASK_TOKEN_FILE` is unset, then `~/.rask/token`.
#[cfg(feature = "distributed")]
pub(crate) fn auth() -> Result<Option<rask_distributed::Auth>> {
    use rask_distributed::{Auth, TOKEN_FILE_ENV};
    let token_file = file()?.and_then(|f| f.token_file.clone());
    Ok(Auth::from_vars(|name| {
        let set = std::env::var_os(name).filter(|v| !v.is_empty());
        if name == TOKEN_FILE_ENV {
            set.or_else(|| token_file.clone().map(PathBuf::into_os_string))
        } else {
            set
        }
    })?)
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
        let sim = ExecutorKind::parse("sim-cluster:3:42").unwrap();
        assert_eq!(
            sim,
            ExecutorKind::SimCluster {
                workers: 3,
                seed: 42,
                faults: 0
            }
        );
        assert_eq!(sim.to_string(), "sim-cluster:3:42");
        let faulty = ExecutorKind::parse("sim-cluster:3:42:5").unwrap();
        assert_eq!(
            faulty,
            ExecutorKind::SimCluster {
                workers: 3,
                seed: 42,
                faults: 5
            }
        );
        assert_eq!(faulty.to_string(), "sim-cluster:3:42:5");
        assert!(ExecutorKind::parse("sim-cluster:3:42:5:1").is_err());
        assert!(ExecutorKind::parse("sim-cluster:3:42:many").is_err());
        for bad in [
            "sim-cluster:0:1",
            "sim-cluster:3",
            "sim-cluster:x:1",
            "sim-cluster:2:-1",
        ] {
            let err = ExecutorKind::parse(bad).unwrap_err().to_string();
            assert!(err.contains("sim-cluster:WORKERS:SEED"), "{err}");
        }
        assert_eq!(
            ExecutorKind::parse("tcp://10.0.0.5:8786").unwrap(),
            ExecutorKind::Tcp("10.0.0.5:8786".into())
        );
        assert_eq!(
            ExecutorKind::parse("tls://sched.example:8786").unwrap(),
            ExecutorKind::Tls("sched.example:8786".into())
        );
        assert_eq!(
            ExecutorKind::parse("unix:/run/rask/scheduler.sock").unwrap(),
            ExecutorKind::Unix("/run/rask/scheduler.sock".into())
        );
        assert_eq!(
            ExecutorKind::Unix("/run/s.sock".into()).to_string(),
            "unix:/run/s.sock"
        );
        assert_eq!(
            ExecutorKind::parse("sim:18446744073709551615").unwrap(),
            ExecutorKind::Simulated(u64::MAX)
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
            "unix:",
            "sim:",
            "sim:-1",
            "sim:x",
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
            ExecutorKind::Simulated(42),
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

    fn parse_file(text: &str) -> Result<FileSettings> {
        FileSettings::parse(text, Path::new("conf/rask.toml"))
    }

    #[test]
    fn file_reads_every_key() {
        let file = parse_file(
            "scheduler = 'local:2'\noptimize = false\nprogress = true\n\
             dashboard = ':0'\ntoken_file = 'token'\ncache = '/nonexistent/cache'\n\
             cache_all = true\ncache_max_bytes = 1_000\ncache_strict = true\nspin = false\n",
        )
        .unwrap();
        assert_eq!(
            file.config,
            Config::new()
                .executor(ExecutorKind::Local(2))
                .optimize(false)
                .progress(true)
                .cache("/nonexistent/cache")
                .cache_all(true)
                .cache_max_bytes(1_000)
                .cache_strict(true)
                .spin(false)
        );
        assert_eq!(file.dashboard, Some("127.0.0.1:0".parse().unwrap()));
        // Relative paths are the file's directory's.
        assert_eq!(file.token_file, Some(PathBuf::from("conf/token")));
        assert_eq!(file.cache, Some(PathBuf::from("/nonexistent/cache")));
        assert_eq!(parse_file("").unwrap().config, Config::new());
    }

    #[test]
    fn file_errors_name_the_file_the_key_and_what_is_accepted() {
        for (text, expected) in [
            (
                "optimize = true\nschedular = 'sync'",
                "config file conf/rask.toml: line 2: unknown field `schedular`, expected one of \
                 `scheduler`, `optimize`, `progress`, `dashboard`, `token_file`, `cache`, \
                 `cache_all`, `cache_max_bytes`, `cache_strict`, `spin`",
            ),
            (
                "scheduler = 'bogus'",
                "config file conf/rask.toml: invalid executor `bogus` (from key `scheduler`): \
                 unknown executor; accepted forms: `sync`",
            ),
            (
                "optimize = 'off'",
                "config file conf/rask.toml: line 1: invalid type: string \"off\", expected a boolean",
            ),
            (
                "dashboard = 'localhost:80'",
                "config file conf/rask.toml: invalid value `localhost:80` for key `dashboard`: \
                 expected HOST:PORT with an IP address, or :PORT for 127.0.0.1",
            ),
            (
                "token_file = ''",
                "config file conf/rask.toml: key `token_file` is empty: expected a path",
            ),
            ("scheduler = ", "config file conf/rask.toml: line 1: "),
        ] {
            let err = parse_file(text).unwrap_err();
            assert!(matches!(err, Error::ConfigFile { .. }), "{text}: {err:?}");
            let err = err.to_string();
            assert!(err.starts_with(expected), "{text}:\n{err}\n{expected}");
        }
        let not_a_dir = format!("cache = '{}'", file!());
        let err = FileSettings::parse(&not_a_dir, Path::new("rask.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("is not a directory"), "{err}");
    }

    #[test]
    fn the_file_comes_after_every_other_layer() {
        // `pick` with the file's value standing in as the last layer.
        let file = Config::synchronous().optimize(false);
        let pick = |config: &Config, env: Option<bool>| {
            config
                .pick(|c| c.optimize, || Ok(env))
                .map(|v| v.or(file.optimize))
                .unwrap()
        };
        assert_eq!(pick(&Config::new(), None), Some(false));
        assert_eq!(pick(&Config::new(), Some(true)), Some(true));
        let _scope = set(Config::new().optimize(true));
        assert_eq!(pick(&Config::new(), Some(false)), Some(true));
        assert_eq!(pick(&Config::new().optimize(false), None), Some(false));
    }

    #[test]
    fn dashboard_forms() {
        assert_eq!(parse_dashboard(" "), Some(None));
        assert_eq!(
            parse_dashboard(":8787"),
            Some(Some("127.0.0.1:8787".parse().unwrap()))
        );
        assert_eq!(
            parse_dashboard("0.0.0.0:1"),
            Some(Some("0.0.0.0:1".parse().unwrap()))
        );
        assert_eq!(parse_dashboard("localhost:1"), None);
        assert_eq!(parse_dashboard(":x"), None);
    }

    #[test]
    fn spin_is_on_unless_a_layer_turns_it_off() {
        // `RASK_SPIN` and the file stand in as the last layers, as above.
        let pick = |config: &Config, env: Option<bool>, file: Option<bool>| {
            config
                .pick(|c| c.spin, || Ok(env))
                .map(|v| v.or(file).unwrap_or(true))
                .unwrap()
        };
        assert!(pick(&Config::new(), None, None));
        assert!(!pick(&Config::new(), None, Some(false)));
        assert!(!pick(&Config::new(), Some(false), Some(true)));
        let _scope = set(Config::new().spin(false));
        assert!(!pick(&Config::new(), Some(true), None));
        assert!(!Config::new().resolve_spin().unwrap());
        assert!(Config::new().spin(true).resolve_spin().unwrap());
        // A scope that sets the executor only keeps the switch of the one
        // around it.
        let _inner = set(Config::synchronous());
        assert!(!Config::new().resolve_spin().unwrap());
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
