//! The result cache: values of cached tasks kept on disk, so that a later
//! run — in this process or another — that reaches the same work loads the
//! value instead of running the task or anything it depends on.
//!
//! Turn it on with [`Config::cache`](crate::Config::cache), `RASK_CACHE=dir`
//! or the config file's `cache`; tasks opt in with
//! [`Delayed::cache`](crate::Delayed::cache), with `#[rask::task(cache)]`
//! for every call of a function, or all pure calls at once with
//! [`Config::cache_all`](crate::Config::cache_all).
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("rask-cache-mod-doc-{}", std::process::id()));
//! use rask::{delayed, Config};
//!
//! #[rask::task(cache)]               // every call cached, versioned by its source
//! fn square(x: i64) -> i64 { x * x }
//!
//! let config = Config::synchronous().cache(&dir);
//! let before = rask::cache::stats();
//! assert_eq!(delayed!(square(12)).compute_with(&config)?, 144);   // runs, written
//! assert_eq!(delayed!(square(12)).compute_with(&config)?, 144);   // loaded
//! let after = rask::cache::stats();
//! assert!(after.hits > before.hits);
//! assert_eq!(rask::cache::info(&dir)?.entries, 1);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What an entry is
//!
//! A cached task's value is written to `dir/ab/abcd…` in the format of
//! [`rask_executor::entry`] (postcard bytes behind a header with a format
//! version, the type's name, the length and a blake3 checksum). The file is
//! named by the task's *address*: blake3 over
//!
//! 1. the task's key (its function's path and type, its literal arguments,
//!    its inputs' keys: see [keys](crate#keys)),
//! 2. its function's *version*: the hash of its signature and body tokens
//!    that `#[rask::task]` takes at compile time, or the `N` of
//!    `#[rask::task(version = N)]`; rask's version for its own operators
//!    and parts (`.item`, `.split`); and, for a function with no recorded
//!    version (a plain `fn` used with `delayed!`, a generic instance given
//!    to `init_with`), the *build* of the program, a hash of its
//!    executable,
//! 3. the *shapes* of its value's type and of its literal arguments'
//!    types: a hash of what each type's `Deserialize` asks for, traced
//!    through serde once per type and process (every struct's and enum's
//!    name, its fields or variants by name and in order, their types); for
//!    a type serde cannot trace (one that needs a self-describing format,
//!    such as an untagged enum, or that rejects made-up values), the build
//!    instead, unless the function has an explicit `version = N`, which
//!    then vouches for the types too,
//! 4. the address of each of its inputs, so the versions of everything
//!    upstream count too; a wrapped value's address is its key (its bytes)
//!    and its type's shape (or the build, when serde cannot trace it), and
//!    a value whose code is unknown here — a persisted result, a future —
//!    counts as its key and the build,
//! 5. with [`Config::cache_strict`](crate::Config::cache_strict), the build.
//!
//! # What invalidates an entry
//!
//! An entry is used only when the address matches, so it is not used
//! again when:
//!
//! - a literal argument or an input's value changes (a different key),
//! - any token of the signature or body of a `#[rask::task]` function
//!   changes, for that task or any task upstream of it; comments, doc
//!   comments and layout are not tokens and do not count,
//! - a `version = N` changes (and *only* then, for such a function: that is
//!   what an explicit version is for),
//! - the program is rebuilt at all, when the task or anything upstream has
//!   no recorded version, or the cache is strict,
//! - the function is renamed or moved, or the compiler changes (keys
//!   change, and another compiler may print tokens differently),
//! - its value's type is named differently, its shape or a literal
//!   argument's type's shape changes (a field added, removed, renamed,
//!   reordered or retyped to a type serde encodes otherwise, a variant
//!   added), for that task or any task
//!   upstream of it, or the entry's format version changes.
//!
//! What does **not** invalidate an entry: a change in code a versioned
//! function calls but does not contain — a helper function, a trait impl
//! (a hand-written `Deserialize` whose traced shape stays the same), a
//! constant, a dependency's new release; a field retyped to a type serde
//! encodes alike (a `BTreeSet` for a `Vec`, a `PathBuf` for a `String`, a
//! `usize` for a `u64`: the shape is how a type encodes, not its Rust
//! type); and, for a program whose rask code lives in a shared library (a
//! Python extension, a plugin), a rebuild of that library alone: the build
//! is the hash of the running executable. Give such a function an explicit
//! `version = N` and bump it, or turn on
//! [`cache_strict`](crate::Config::cache_strict), when that matters.
//! A field serde skips (`#[serde(skip)]`) is not in an entry: a hit gives
//! it what deserializing gives it (its default), where the task's own
//! value held what the task put there.
//! A name you chose hides nothing: a [`value_named`](crate::value_named)
//! value is keyed by its data as well as its name, and a
//! [`named`](crate::Delayed::named) task's key keeps its work's own (its
//! arguments count as unnamed ones do).
//!
//! # Rules
//!
//! 1. Looked up before anything runs, in this process, for every executor
//!    alike: a hit replaces the task and everything only it needs before
//!    the graph is lowered, so nothing of it is run or loaded, and only the
//!    hit's own value goes to a cluster (rule 9). The entry is decoded
//!    then; one that does not decode as the task's output type is a miss.
//! 2. A cached task that misses becomes an output of the run, and its
//!    value is written when it reaches this process — on a cluster, the
//!    value travels to the client, and workers never touch the directory
//!    (the price: cached values cross the network once).
//! 3. Nothing read is trusted: a file that is short, corrupt, of another
//!    type or another format is a miss, with one warning per entry
//!    (`tracing`), and is then written again.
//! 4. Writes go to a temporary file renamed into place, so processes
//!    sharing a directory see whole entries only; two processes writing
//!    one entry write the same bytes.
//! 5. A write that fails (a full disk, no permission) turns writing off
//!    for that directory for the rest of the process, with one warning;
//!    the computation goes on and returns its value.
//! 6. A hit sets its entry's modification time to now, so the time says
//!    when an entry was last used. With
//!    [`cache_max_bytes`](crate::Config::cache_max_bytes), a run that
//!    wrote entries then removes the least recently used ones until the
//!    entries fit (a scan of the directory).
//! 7. A capturing closure's calls and [`unique`](crate::Delayed::unique)
//!    work are never cached (their keys are fresh in every run), nor are
//!    data nodes and hand-written [`Graph`](crate::Graph) tasks; and
//!    nothing that depends on a capturing closure's call has an address,
//!    even when the closure is [`named`](crate::Delayed::named): its name
//!    stands for what it captured within a run, not across runs, where
//!    other captured values would read the first run's entries.
//! 8. **Entry points.** These use the cache, on every executor:
//!    `compute` ([`Delayed::compute`](crate::Delayed::compute),
//!    [`rask::compute`](crate::compute), [`Graph::compute`](crate::Graph::compute)),
//!    `persist` ([`Delayed::persist`](crate::Delayed::persist),
//!    [`rask::persist`](crate::persist)), and a client's
//!    [`Client::compute`](crate::Client::compute) and
//!    [`Client::persist`](crate::Client::persist), with the cache its
//!    configuration named when it was made. [`Client::submit`](crate::Client::submit),
//!    [`map`](crate::Client::map), [`map_zip`](crate::Client::map_zip)
//!    and [`scatter`](crate::Client::scatter) never do: they run the
//!    graph as submitted, at the lowest latency.
//! 9. **Where hits go.** `compute` puts a hit's value in the plan: on a
//!    cluster it travels with that one graph. `persist` on a cluster and
//!    a client's `compute` and `persist` first *place* each hit, as
//!    [`Client::scatter`](crate::Client::scatter) would: on a cluster it
//!    is sent once, to one worker, and held there under its task's key,
//!    so the tasks and later graphs that need it refer to it by key and
//!    fetch it from that worker. It is held while the computation needs
//!    it, and for as long as a persisted result is it.
//! 10. **When misses are written.** `compute` and `persist` write each
//!     value as it reaches this process, before they return (on a cluster,
//!     the bytes of a value that stays there are fetched for it). A
//!     client's `compute` and `persist` return a future at once and write
//!     in the background once the work is done; [`flush`] waits for those
//!     writes, which a program that ends right after reading such a result
//!     needs. A miss whose computation was cancelled, or whose root
//!     failed before it finished, is not written. A cached task that is
//!     itself the root of a client's `compute` is held until it is
//!     written: dropping its future does not stop it, cancelling it does.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use rask_executor::entry::{self, EntryError};
use rask_executor::events::{self, Event, EventKind};
use rask_executor::{Key, Value};

use crate::build::args::Shapes;
use crate::build::graph::KeyMap;
use crate::build::node::{Code, Function, Node};
use crate::build::registry::{recorded, Version};
use crate::run::config::CacheSettings;

/// What a cache directory holds ([`info`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheInfo {
    /// Entries.
    pub entries: u64,
    /// Bytes the entries take.
    pub bytes: u64,
}

/// What the result cache did in this process since it started ([`stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Cached tasks loaded instead of run.
    pub hits: u64,
    /// Cached tasks that had no usable entry, and ran.
    pub misses: u64,
    /// Entries that were there but unusable (corrupt, truncated, of another
    /// type or format, or not decodable): counted among the misses too.
    pub rejected: u64,
    /// Entries written.
    pub written: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Entries removed to keep under `cache_max_bytes`.
    pub evicted: u64,
}

static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);
static REJECTED: AtomicU64 = AtomicU64::new(0);
static WRITTEN: AtomicU64 = AtomicU64::new(0);
static WRITTEN_BYTES: AtomicU64 = AtomicU64::new(0);
static EVICTED: AtomicU64 = AtomicU64::new(0);

/// The result cache's counters in this process: hits, misses, writes and
/// evictions of every computation so far. Take two and subtract to see what
/// one computation did; per task, the same shows in the task events
/// (`EventKind::CacheHit`, `EventKind::CacheMiss`).
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("rask-cache-stats-doc-{}", std::process::id()));
/// fn double(x: i64) -> i64 { 2 * x }
/// let config = rask::Config::synchronous().cache(&dir);
/// let before = rask::cache::stats();
/// rask::delayed!(double(5)).cache().compute_with(&config)?;
/// rask::delayed!(double(5)).cache().compute_with(&config)?;
/// let after = rask::cache::stats();
/// assert!(after.misses > before.misses && after.hits > before.hits);
/// assert!(after.written > before.written);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), rask::Error>(())
/// ```
pub fn stats() -> CacheStats {
    CacheStats {
        hits: HITS.load(Ordering::Relaxed),
        misses: MISSES.load(Ordering::Relaxed),
        rejected: REJECTED.load(Ordering::Relaxed),
        written: WRITTEN.load(Ordering::Relaxed),
        written_bytes: WRITTEN_BYTES.load(Ordering::Relaxed),
        evicted: EVICTED.load(Ordering::Relaxed),
    }
}

/// Waits until the values of cached tasks that [`Client::compute`] and
/// [`Client::persist`] computed so far in this process are written (rule
/// 10). Those two return a future at once and write in the background once
/// the work is done, so a program that ends right after reading such a
/// result calls this first, or its last values may not be written. Returns
/// at once when nothing is being written; waits for work still running.
///
/// [`Client::compute`]: crate::Client::compute
/// [`Client::persist`]: crate::Client::persist
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("rask-cache-flush-doc-{}", std::process::id()));
/// fn square(x: i64) -> i64 { x * x }
/// let client = rask::Client::with_config(&rask::Config::threads(2).cache(&dir))?;
/// let future = client.compute(&rask::delayed!(square(9)).cache())?;
/// assert_eq!(future.result()?, 81);
/// rask::cache::flush();                              // written now
/// assert_eq!(rask::cache::info(&dir)?.entries, 1);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn flush() {
    loop {
        let pending = std::mem::take(&mut *WRITERS.lock().unwrap_or_else(PoisonError::into_inner));
        if pending.is_empty() {
            return;
        }
        for Writer { thread, drive } in pending {
            if let Some(drive) = drive {
                drive(&|| thread.is_finished());
            }
            let _ = thread.join();
        }
    }
}

/// A thread writing the values of a client's computation ([`flush`]).
pub(crate) struct Writer {
    pub(crate) thread: std::thread::JoinHandle<()>,
    /// Runs the work the thread waits for until the given test holds,
    /// where nothing runs unless someone waits (a simulated client).
    pub(crate) drive: Option<Drive>,
}

/// How [`Writer::drive`] runs work: until the test it is given holds.
pub(crate) type Drive = Box<dyn FnOnce(&dyn Fn() -> bool) + Send>;

static WRITERS: Mutex<Vec<Writer>> = Mutex::new(Vec::new());

/// Counts `writer` among those [`flush`] waits for.
pub(crate) fn writing(writer: Writer) {
    let mut writers = WRITERS.lock().unwrap_or_else(PoisonError::into_inner);
    writers.retain(|w| !w.thread.is_finished());
    writers.push(writer);
}

/// How many entries a cache directory holds and how many bytes they take
/// (temporary files of writes under way are not counted). A directory that
/// does not exist is empty.
///
/// # Errors
///
/// An I/O error reading the directory.
///
/// ```
/// let info = rask::cache::info(std::path::Path::new("/nonexistent/rask-cache"))?;
/// assert_eq!((info.entries, info.bytes), (0, 0));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn info(dir: &Path) -> io::Result<CacheInfo> {
    let mut info = CacheInfo::default();
    for (_, len, _) in scan(dir)? {
        info.entries += 1;
        info.bytes += len;
    }
    Ok(info)
}

/// Removes every entry of a cache directory (and the directory's entry
/// folders); files that are not entries are left alone.
///
/// # Errors
///
/// An I/O error reading the directory or removing a file.
///
/// ```
/// rask::cache::clear(std::path::Path::new("/nonexistent/rask-cache"))?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn clear(dir: &Path) -> io::Result<()> {
    for (path, _, _) in scan(dir)? {
        remove_file(&path)?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every entry file under `dir` (`dir/ab/<64 hex digits>`): its path, size
/// and modification time.
fn scan(dir: &Path) -> io::Result<Vec<(PathBuf, u64, SystemTime)>> {
    let mut found = Vec::new();
    let top = match std::fs::read_dir(dir) {
        Ok(top) => top,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for sub in top {
        let sub = sub?;
        let name = sub.file_name();
        let is_shard = name.len() == 2 && name.to_str().is_some_and(is_hex);
        if !is_shard || !sub.file_type()?.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(sub.path())? {
            let file = file?;
            let name = file.file_name();
            if name.len() != 64 || !name.to_str().is_some_and(is_hex) {
                continue;
            }
            // Gone since it was listed: another process evicted it.
            let Ok(meta) = file.metadata() else { continue };
            if meta.is_file() {
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((file.path(), meta.len(), modified));
            }
        }
    }
    Ok(found)
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes the least recently used entries of `dir` until they take at most
/// `max_bytes` (rule 6).
fn evict(dir: &Path, max_bytes: u64) -> io::Result<()> {
    let mut entries = scan(dir)?;
    let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
    if total <= max_bytes {
        return Ok(());
    }
    entries.sort_by_key(|(_, _, modified)| *modified);
    for (path, len, _) in entries {
        if total <= max_bytes {
            break;
        }
        remove_file(&path)?;
        total -= len;
        EVICTED.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// What looking a graph up in the cache found (rule 1): the values of the
/// hits by task key, and the cached tasks to write once they ran.
pub(crate) struct Lookup {
    /// Each hit's node with its value. Holding the node keeps lowering from
    /// absorbing it into a chain (`plan::chain` rule 1 absorbs only nodes
    /// nothing else holds), so lowering asks about it and replaces it.
    pub(crate) hits: KeyMap<(Arc<Node>, Value)>,
    pub(crate) writes: Vec<Write>,
    dir: PathBuf,
    max_bytes: Option<u64>,
}

/// A cached task that missed: it runs, and its value goes to `address`.
pub(crate) struct Write {
    pub(crate) node: Arc<Node>,
    address: Key,
    output: &'static str,
}

impl Lookup {
    /// Looks up every cached task behind `roots`, from the roots down,
    /// stopping at hits: what only a hit needs is never visited.
    pub(crate) fn new(roots: &[Arc<Node>], settings: &CacheSettings) -> Lookup {
        let mut lookup = Lookup {
            hits: KeyMap::default(),
            writes: Vec::new(),
            dir: settings.dir.clone(),
            max_bytes: settings.max_bytes,
        };
        let mut addresses = Addresses {
            memo: KeyMap::default(),
            strict: settings.strict,
        };
        let mut seen = crate::plan::KeySet::default();
        let mut stack: Vec<&Arc<Node>> = roots.iter().rev().collect();
        while let Some(node) = stack.pop() {
            if !seen.insert(node.key) {
                continue;
            }
            if let Some(function) = wanted(node, settings.all) {
                if let Some(address) = addresses.address(node) {
                    if let Some(value) = lookup.read(node, address, &function) {
                        HITS.fetch_add(1, Ordering::Relaxed);
                        emit(node, EventKind::CacheHit);
                        lookup.hits.insert(node.key, (node.clone(), value));
                        continue;
                    }
                    MISSES.fetch_add(1, Ordering::Relaxed);
                    emit(node, EventKind::CacheMiss);
                    lookup.writes.push(Write {
                        node: node.clone(),
                        address,
                        output: function.output,
                    });
                }
            }
            stack.extend(node.deps.iter().rev());
        }
        lookup
    }

    /// The outputs of a run of `roots` that writes the misses (rule 2):
    /// `roots`, then each cached task that missed and is not a root; and,
    /// for each of [`writes`](Lookup::writes) in order, the index of the
    /// output that holds its value.
    pub(crate) fn outputs(&self, roots: &[Arc<Node>]) -> (Vec<Arc<Node>>, Vec<usize>) {
        let mut outputs = roots.to_vec();
        let slots: HashMap<Key, usize> =
            roots.iter().enumerate().map(|(i, r)| (r.key, i)).collect();
        let writes = self
            .writes
            .iter()
            .map(|write| {
                slots.get(&write.node.key).copied().unwrap_or_else(|| {
                    outputs.push(write.node.clone());
                    outputs.len() - 1
                })
            })
            .collect();
        (outputs, writes)
    }

    /// The value of the entry at `address`, if it is whole and decodes as
    /// `function`'s output (rules 1, 3).
    fn read(&self, node: &Node, address: Key, function: &Function) -> Option<Value> {
        let rejected = |why: &dyn std::fmt::Display| {
            REJECTED.fetch_add(1, Ordering::Relaxed);
            warn_once(address, || {
                tracing::warn!(
                    task = %node.name(),
                    "result cache: ignoring an entry ({why}); the task runs and the entry is \
                     written again"
                )
            });
        };
        let found = match entry::read(&self.dir, &address, Some(function.output)) {
            Ok(found) => found,
            Err(EntryError::Missing) => return None,
            Err(e) => {
                rejected(&e);
                return None;
            }
        };
        // A hand-written `Deserialize` is user code: a panic there is a
        // miss, not a crash of the computation.
        let decoded = std::panic::catch_unwind(|| (function.decode)(&found.bytes))
            .unwrap_or_else(|_| Err("its `Deserialize` panicked".to_owned()));
        match decoded {
            Ok(value) => {
                touch(&entry::path(&self.dir, &address));
                Some(value)
            }
            Err(e) => {
                let path = entry::path(&self.dir, &address);
                rejected(&format_args!(
                    "{}: does not decode as a `{}`: {e}",
                    path.display(),
                    function.output
                ));
                None
            }
        }
    }

    /// Writes the value of `writes[i]` (rules 2, 4, 5).
    pub(crate) fn write(&self, i: usize, value: &Value) {
        let Some(write) = self.writes.get(i) else {
            return;
        };
        if writing_off(&self.dir) {
            return;
        }
        let bytes = match value.encode() {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(task = %write.node.name(), "result cache: cannot encode the value: {e}");
                return;
            }
        };
        match entry::write(&self.dir, &write.address, write.output, &bytes) {
            Ok(size) => {
                WRITTEN.fetch_add(1, Ordering::Relaxed);
                WRITTEN_BYTES.fetch_add(size, Ordering::Relaxed);
            }
            Err(e) => turn_writing_off(&self.dir, &e),
        }
    }

    /// After the run: keeps the directory under its size cap (rule 6).
    pub(crate) fn finish(&self) {
        let Some(max) = self.max_bytes else { return };
        if self.writes.is_empty() {
            return;
        }
        if let Err(e) = evict(&self.dir, max) {
            tracing::warn!(
                "result cache: cannot keep {} under {max} bytes: {e}",
                self.dir.display()
            );
        }
    }
}

/// Tells subscribers what the cache did for `node`.
fn emit(node: &Node, kind: EventKind<'static>) {
    if events::listening() {
        events::emit(&Event::new(node.key, node.name(), kind));
    }
}

/// Whether `node` is to be cached, and its function if so (rule 7).
fn wanted(node: &Node, all: bool) -> Option<Function> {
    let Code::Call(function) = node.call.code() else {
        return None;
    };
    if !function.pure {
        return None;
    }
    let on = node
        .call
        .cache_mark()
        .unwrap_or_else(|| all || recorded(function.id).cache);
    on.then_some(function)
}

/// Sets the modification time of a hit's file to now (rule 6). A cache on a
/// read-only disk still serves hits: errors are ignored.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Addresses of nodes (see the module's "What an entry is"), each computed
/// once per lookup.
struct Addresses {
    memo: KeyMap<Option<Key>>,
    strict: bool,
}

/// The context of addresses; changing it changes every address.
const CONTEXT: &str = "rask result cache address v1";

impl Addresses {
    /// The address of `node`, or `None` when it depends on the build and
    /// the build cannot be known (the executable cannot be read).
    fn address(&mut self, node: &Arc<Node>) -> Option<Key> {
        // Post-order without recursion: a chain may be millions long.
        let mut stack: Vec<(&Arc<Node>, bool)> = vec![(node, false)];
        while let Some((next, inputs_done)) = stack.pop() {
            if self.memo.contains_key(&next.key) {
                continue;
            }
            if !inputs_done {
                stack.push((next, true));
                for dep in next.deps.iter() {
                    if !self.memo.contains_key(&dep.key) {
                        stack.push((dep, false));
                    }
                }
                continue;
            }
            let address = self.compute(next);
            self.memo.insert(next.key, address);
        }
        self.memo.get(&node.key).copied().flatten()
    }

    /// The address of `node`, whose inputs' addresses are known.
    fn compute(&self, node: &Node) -> Option<Key> {
        let code = node.call.code();
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        h.update(&node.key.0);
        let needs_build = match code {
            // Its bytes are in its key, how its type reads them is not: a
            // field retyped or reordered between builds keeps the key.
            Code::Literal => {
                let mut shapes = Shapes::new();
                node.call.literals(&mut shapes);
                match shapes.finish() {
                    Ok(None) => false,
                    Ok(Some(shape)) => {
                        h.update(b"l").update(&shape);
                        false
                    }
                    Err(type_name) => untraced(format!("`{type_name}`"), node.name()),
                }
            }
            Code::Opaque => true,
            // A capturing closure's value depends on what it captured,
            // which no address holds, even when a name stands for it in
            // its key (rule 7).
            Code::Call(function) if !function.pure => return None,
            Code::Call(function) => {
                let version = if function.builtin {
                    Some(Version::Builtin)
                } else {
                    recorded(function.id).version
                };
                // The shapes of the output's type and of the literal
                // arguments' types, when serde can trace them; when not,
                // only an explicit version vouches for the layouts.
                let traced = shapes(node, &function, &mut h);
                match version {
                    Some(Version::Source(hash)) => {
                        h.update(b"s").update(&hash.to_le_bytes());
                        traced.is_err_and(|type_name| untraced(type_name, node.name()))
                    }
                    Some(Version::Explicit(n)) => {
                        h.update(b"e").update(&n.to_le_bytes());
                        false
                    }
                    Some(Version::Builtin) => {
                        h.update(b"r").update(env!("CARGO_PKG_VERSION").as_bytes());
                        traced.is_err_and(|type_name| untraced(type_name, node.name()))
                    }
                    None => {
                        unversioned(function.id, node.name());
                        true
                    }
                }
            }
        };
        if needs_build || self.strict {
            h.update(b"b").update(build()?);
        }
        for dep in node.deps.iter() {
            let address = self.memo.get(&dep.key).copied().flatten()?;
            h.update(&address.0);
        }
        Some(Key(*h.finalize().as_bytes()))
    }
}

/// This program's build: blake3 of its executable, read once; `None`, with
/// a warning, when it cannot be read — then what depends on it is not
/// cached, since a hash of anything else (its path) would survive a
/// rebuild.
fn build() -> Option<&'static [u8; 32]> {
    static BUILD: OnceLock<Option<[u8; 32]>> = OnceLock::new();
    BUILD
        .get_or_init(|| {
            let hash = |path: &Path| -> io::Result<[u8; 32]> {
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(path)?)?;
                Ok(*h.finalize().as_bytes())
            };
            let read = hash(Path::new("/proc/self/exe"))
                .or_else(|_| std::env::current_exe().and_then(|p| hash(&p)));
            match read {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(
                        "result cache: cannot read this program's executable ({e}); tasks of \
                         functions with no recorded version are not cached"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Says once per function (whatever its tasks are named: `named` gives
/// each task a name of its own) that its entries last one build; `true`
/// when it said so now.
fn unversioned(function: std::any::TypeId, name: &str) -> bool {
    static SAID: Mutex<Option<HashSet<std::any::TypeId>>> = Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
    let first = said.get_or_insert_with(HashSet::new).insert(function);
    if first {
        tracing::info!(
            task = name,
            "result cache: the function of `{name}` has no recorded version (mark it \
             #[rask::task]), so its entries and those of tasks built on it last until the \
             program is rebuilt"
        );
    }
    first
}

/// Hashes into `h` the shapes of `node`'s value type (`function`'s output)
/// and of its literal arguments' types; `Err` saying which type, when one
/// cannot be traced.
fn shapes(node: &Node, function: &Function, h: &mut blake3::Hasher) -> Result<(), String> {
    let output = (function.shape)().ok_or_else(|| format!("`{}`", function.output))?;
    h.update(b"o").update(&output);
    let mut literals = Shapes::new();
    node.call.literals(&mut literals);
    match literals.finish() {
        Ok(None) => Ok(()),
        Ok(Some(shapes)) => {
            h.update(b"l").update(&shapes);
            Ok(())
        }
        Err(type_name) => Err(format!("`{type_name}` (a literal argument's type)")),
    }
}

/// Says once per type that serde cannot trace its shape, so the entries of
/// tasks returning it or taking it as a literal last one build; always
/// `true` (the address then holds the build).
fn untraced(type_name: String, name: &str) -> bool {
    static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
    if said
        .get_or_insert_with(HashSet::new)
        .insert(type_name.clone())
    {
        tracing::info!(
            task = name,
            "result cache: the shape of {type_name} (of task `{name}`) cannot be traced \
             through serde, so a change of its fields could not be told from the entries: \
             they last until the program is rebuilt (give its function `version = N` to \
             vouch for the types yourself)"
        );
    }
    true
}

/// Runs `warn` the first time `address` is rejected in this process (rule 3).
fn warn_once(address: Key, warn: impl FnOnce()) {
    static WARNED: Mutex<Option<HashSet<Key>>> = Mutex::new(None);
    let first = WARNED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashSet::new)
        .insert(address);
    if first {
        warn();
    }
}

/// Directories this process no longer writes to (rule 5).
static WRITING_OFF: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn writing_off(dir: &Path) -> bool {
    WRITING_OFF
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|d| d == dir)
}

fn turn_writing_off(dir: &Path, error: &io::Error) {
    let mut off = WRITING_OFF.lock().unwrap_or_else(PoisonError::into_inner);
    if !off.iter().any(|d| d == dir) {
        off.push(dir.to_owned());
        tracing::warn!(
            "result cache: cannot write to {} ({error}); caching values there is off for the \
             rest of this process, and computations go on",
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::any::TypeId;

    use super::{unversioned, Addresses, Shapes};
    use crate::build::data::layouts::{before, swapped};
    use crate::delayed;

    fn x_before(p: before::Point) -> i64 {
        p.x
    }

    fn x_swapped(p: swapped::Point) -> i64 {
        p.x
    }

    fn shapes<T>(task: &crate::Delayed<T>) -> Result<Option<[u8; 32]>, &'static str> {
        let mut shapes = Shapes::new();
        task.node().call.literals(&mut shapes);
        shapes.finish()
    }

    /// A wrapped value (`rask::value`) of a type whose field was retyped
    /// between two builds keeps its key (the type's name and tag, and the
    /// same bytes: `1i64` and `2u64`... encode alike in places); its
    /// address holds its type's shape, so an entry computed from the old
    /// one is not taken for the new. Two builds are played here by one
    /// key held with two shapes.
    #[test]
    fn a_wrapped_value_of_another_layout_has_another_address() {
        use crate::build::data::layouts::retyped;
        use crate::build::node::Origin;
        fn add_before(s: &mut Shapes) {
            s.add::<before::Point>();
        }
        fn add_retyped(s: &mut Shapes) {
            s.add::<retyped::Point>();
        }
        let wrapped = crate::value(before::Point { x: 1, y: 2 });
        let key = wrapped.node().key;
        let held = |add: fn(&mut Shapes)| {
            let value: rask_executor::Value = std::sync::Arc::new(before::Point { x: 1, y: 2 });
            let name = crate::build::node::Name::Borrowed("value");
            crate::Delayed::<before::Point>::held(key, name, value, Origin::Literal(add))
        };
        fn address<T>(d: &crate::Delayed<T>) -> Option<rask_executor::Key> {
            let mut addresses = Addresses {
                memo: Default::default(),
                strict: false,
            };
            addresses.address(d.node())
        }
        let (old, new) = (held(add_before), held(add_retyped));
        assert_eq!(old.node().key, new.node().key);
        assert!(address(&old).is_some());
        assert_ne!(address(&old), address(&new));
        assert_eq!(address(&old), address(&wrapped), "rask::value's own shape");
        // Downstream of it, too.
        let (a, b) = (delayed!(x_before(&old)), delayed!(x_before(&new)));
        assert_eq!(a.node().key, b.node().key);
        assert_ne!(address(&a), address(&b));
    }

    /// A literal's bytes are in its task's key, its type's layout is not:
    /// `{x: 2, y: 1}` of a type whose fields were swapped encodes as the
    /// old `{x: 1, y: 2}`. The literals' shapes tell them apart.
    #[test]
    fn literals_of_one_encoding_and_other_layouts_have_other_shapes() {
        let old = before::Point { x: 1, y: 2 };
        let new = swapped::Point { y: 1, x: 2 };
        assert_eq!(
            postcard::to_stdvec(&old).unwrap(),
            postcard::to_stdvec(&new).unwrap()
        );
        let a = shapes(&delayed!(x_before(old))).unwrap();
        let b = shapes(&delayed!(x_swapped(new))).unwrap();
        assert!(a.is_some());
        assert_ne!(a, b);
        // The same type holding other values: the same shapes.
        assert_eq!(
            shapes(&delayed!(x_before(before::Point { x: 7, y: 8 }))).unwrap(),
            a
        );
        // Nested in a structure, beside an input: found too.
        let input = delayed!(x_before(before::Point { x: 0, y: 0 }));
        let nested = |p| delayed!(pair(vec![Some(p)], &input));
        assert_eq!(
            shapes(&nested(before::Point { x: 3, y: 4 })).unwrap(),
            shapes(&nested(before::Point { x: 5, y: 6 })).unwrap()
        );
        assert_ne!(shapes(&nested(before::Point { x: 3, y: 4 })).unwrap(), None);
        // Inputs alone: no literal shapes.
        assert_eq!(shapes(&delayed!(double(&input))).unwrap(), None);
    }

    fn pair(points: Vec<Option<before::Point>>, x: i64) -> i64 {
        points.len() as i64 + x
    }

    fn double(x: i64) -> i64 {
        2 * x
    }

    #[test]
    fn a_function_without_a_version_is_said_once_whatever_its_tasks_are_named() {
        struct Load;
        struct Other;
        assert!(unversioned(TypeId::of::<Load>(), "load-1"));
        for i in 2..100 {
            assert!(!unversioned(TypeId::of::<Load>(), &format!("load-{i}")));
        }
        assert!(unversioned(TypeId::of::<Other>(), "load-1"));
    }
}
