//! The values a worker holds, its memory limit, and spilling to disk.
//!
//! Rules:
//!
//! 1. **What counts.** The memory a worker holds is the sum of the encoded
//!    sizes of the values in its store (`Stored::nbytes`, known because
//!    every value is encoded once when it is produced or arrives: state
//!    rule 4). Not the process's resident memory, which is reported beside
//!    it: resident memory also counts the program, the runtime, buffers in
//!    flight and heap the allocator keeps after a value is freed, so it may
//!    never come down however much is spilled, and a worker that paused on
//!    it could stay paused for good. The encoded size is a good measure of
//!    the plain data rask moves (vectors, numbers, strings) and what a
//!    spill frees; a value whose in-memory form is much bigger than its
//!    encoding (a map of small boxes) is undercounted.
//! 2. **Levels.** With a memory limit `L`, above [`SPILL_AT`] × `L`
//!    (60 %, Dask's `target`) one spill thread moves the least recently
//!    used values to the worker's spill directory until the store holds
//!    less again; above [`PAUSE_AT`] × `L` (95 %, Dask's `pause`) the
//!    worker holds back new tasks (state rule 6) until spilling brings it
//!    below. A value is *used* when it is stored, given to a task as an
//!    input, or read by a peer or client; a value being written stays
//!    readable from memory until the file is whole.
//! 3. **Files.** A spilled value is one [`rask_executor::entry`] file (the
//!    cache's format: a header with the type name, length and blake3 of
//!    the value's bytes, written to a temporary name and renamed) holding
//!    exactly what [`AnyValue::encode`](rask_executor::AnyValue::encode)
//!    produced. Each spill of a key gets a file of its own (named by the
//!    key and a generation), so a late removal never deletes a newer file.
//!    The directory, `rask-spill-PID-R` under [`Options::spill_dir`] (the
//!    system's temporary directory by default; `R` is 16 random hex
//!    digits of its own), is made at the first spill and removed with
//!    everything in it when the worker ends.
//!
//!    *Whose directory.* Containers sharing a spill directory may run
//!    workers of one process id, and one cannot see the other's
//!    processes, so neither a name nor `/proc` tells a live directory from
//!    a dead one. A worker holds an exclusive `flock` on the file `lock`
//!    in its directory for as long as the directory is its own; the kernel
//!    releases it when the process ends, however it ends, and the lock
//!    holds across PID namespaces on one filesystem. A directory appears
//!    under its name with its lock held already: it is made as
//!    `.rask-spill-making-PID-R`, locked, then renamed; the random part,
//!    and the lock file that keeps it from being empty, keep two workers
//!    from ever sharing one. When a worker makes its directory, it
//!    removes, on a thread of its own (never under a lock the network
//!    thread takes), the directories whose lock it can take, holding the
//!    lock while it removes; and a `.rask-spill-making-` one it can lock, or
//!    that has no lock file, when it is over a minute old (its maker died
//!    within the microseconds of making it). Directories of older
//!    versions (`rask-spill-PID-N`, no lock file) are left alone, with a
//!    warning: whose they are cannot be told across containers, and
//!    removing a live one loses its values; remove them by hand once no
//!    worker of an older version runs.
//! 4. **Coming back.** A spilled value needed by a task of this worker is
//!    read back into memory (an [`Encoded`], most recently used) before the
//!    task is handed to the pool, and its file removed. The read happens on
//!    the network thread, where the task is dispatched: a few milliseconds
//!    for a value of tens of MiB in the page cache, more from a cold disk,
//!    during which the worker neither reports nor dispatches (its data port
//!    and heartbeats wait too). Reading on the compute thread would avoid
//!    that at the cost of a third way for a job to end; not done yet. A spilled value a
//!    peer or a client asks the data port for is read from disk on a
//!    blocking thread and sent, and stays on disk; one that moved
//!    meanwhile (read back for a task, spilled again) is read where it
//!    went: a file removed for a newer place is no damage (rule 5).
//! 5. **Never a wrong value, never a good one dropped.** A file that is
//!    gone, or does not read back whole and matching its checksum and type
//!    (`entry` rule 2), drops its value, with a warning: the data port
//!    answers `Missing`, a task that needed it is given back after
//!    `FetchFailed` names this worker, and the scheduler computes the
//!    value again (its lost-data path) — as if the worker had never held
//!    it. A read that fails with an I/O error (too many open files, an
//!    interrupted read, no memory for the kernel) says nothing of the
//!    file, which is damage only when it is proven: the value stays
//!    spilled, its file too, with a warning. A task that needs it waits
//!    and tries again (state rule 7); a reader of the data port is tried
//!    again on its blocking thread after 10 ms, doubling, 8 times (about
//!    2.5 s), and answered `Missing` only if it still fails (the value
//!    stays here then too, until the scheduler releases it). A file that
//!    has failed so for 30 s ([`UNREADABLE_FOR`]: a failing disk, not a
//!    passing shortage) is damage after all: its value is dropped as
//!    above, so a task waiting for it is given back and the value computed
//!    again rather than waited for for ever.
//! 6. **Failures keep values.** A value that cannot be written (a full
//!    disk, no directory, an encoding that fails now) stays in memory with
//!    a warning, and the spill thread waits a second before trying again.
//!    Such a worker may stay paused until values are released.
//!
//! [`Options::spill_dir`]: super::Options::spill_dir

use std::collections::VecDeque;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rask_executor::diagnostics::Spill;
use rask_executor::{drop_quietly, entry, Encoded, Key, Value};

use crate::net::log_limited;
use crate::protocol::{KeyMap, WireKey, MAX_MEMORY};

/// Share of the memory limit above which values are spilled (rule 2).
pub const SPILL_AT: f64 = 0.6;

/// Share of the memory limit above which no new task starts (rule 2).
pub const PAUSE_AT: f64 = 0.95;

/// How long the spill thread waits after a failed write (rule 6).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How many times a data port read that failed for now is tried again
/// ([`Store::read_patiently`], rule 5).
const PATIENCE: u32 = 8;

/// How long a spilled value's file may fail to read with I/O errors
/// before the value counts as lost and is computed again (rule 5): long
/// enough for a passing shortage (open files, memory), short enough that
/// a task waiting on a file that never reads (a failing disk) does not
/// wait for ever.
const UNREADABLE_FOR: Duration = Duration::from_secs(30);

/// What a memory limit setting must be, for [`Error::Env`](crate::Error::Env).
pub(crate) const LIMIT_EXPECTED: &str = "a size such as `200MiB` or `2GB`, a fraction of the \
     machine's memory such as `0.5`, `auto` (the machine's memory), or `none`";

/// What a memory limit setting must be when the machine's memory is not
/// known.
pub(crate) const LIMIT_EXPECTED_NO_MACHINE: &str = "a size such as `200MiB` or `2GB`, or `none` \
     (this machine's memory could not be read, so a fraction or `auto` means nothing)";

/// The memory of this machine in bytes, or of the cgroup this process
/// runs in if that is smaller (a container's limit); `None` where neither
/// can be read (not Linux).
///
/// # Examples
///
/// ```
/// if let Some(bytes) = rask_distributed::worker::machine_memory() {
///     assert!(bytes > 0);
/// }
/// ```
pub fn machine_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        });
    // cgroup v2, then v1 (whose "no limit" is a huge number, which `min`
    // ignores); "max" does not parse and means no limit.
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
    .filter(|&b| b > 0)
}

/// Reads a memory limit: `None` for no limit. `machine` gives the
/// machine's memory, for fractions and `auto`. `Err` is what was expected.
pub(crate) fn parse_limit(
    text: &str,
    machine: impl FnOnce() -> Option<u64>,
) -> Result<Option<u64>, &'static str> {
    let text = text.trim().to_ascii_lowercase();
    if matches!(text.as_str(), "none" | "off" | "0") {
        return Ok(None);
    }
    let share = |fraction: f64| -> Result<Option<u64>, &'static str> {
        let machine = machine().ok_or(LIMIT_EXPECTED_NO_MACHINE)?;
        Ok(Some(((machine as f64 * fraction) as u64).max(1)))
    };
    if text == "auto" {
        return share(1.0);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| LIMIT_EXPECTED)?;
    if !value.is_finite() || value <= 0.0 {
        return Err(LIMIT_EXPECTED);
    }
    let scale: u64 = match unit.trim() {
        // No unit: a fraction of the machine up to 1, whole bytes above.
        "" if value <= 1.0 => return share(value),
        "" if value.fract() == 0.0 => 1,
        "" => return Err(LIMIT_EXPECTED),
        "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_u64.pow(2),
        "g" | "gb" => 1000_u64.pow(3),
        "t" | "tb" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(LIMIT_EXPECTED),
    };
    let bytes = value * scale as f64;
    if bytes < 1.0 || bytes > MAX_MEMORY as f64 {
        return Err(LIMIT_EXPECTED);
    }
    Ok(Some(bytes as u64))
}

/// A value held by this worker, with the size of its encoding.
#[derive(Clone)]
pub(crate) struct Stored {
    pub(crate) value: Value,
    pub(crate) nbytes: u64,
}

/// What [`Held::remove`] took out: the file to remove, the value to drop.
pub(crate) type Removed = (Option<OnDisk>, Option<Value>);

/// Where one held value is.
enum Place {
    /// In memory; `touched` is its place in the LRU order.
    Memory { value: Value, touched: u64 },
    /// In memory, being written by the spill thread (rule 2).
    Writing { value: Value },
    /// In its file (rule 3).
    Disk { type_name: &'static str },
}

struct Slot {
    nbytes: u64,
    /// Names this value's file apart from other spills of the same key.
    generation: u64,
    place: Place,
}

/// A value the spill thread writes.
pub(crate) struct ToSpill {
    key: WireKey,
    generation: u64,
    value: Value,
}

/// A spilled value to read back.
pub(crate) struct OnDisk {
    key: WireKey,
    generation: u64,
    type_name: &'static str,
}

/// How a lookup for a task's input or a reader went.
pub(crate) enum Found {
    Memory(Value),
    Disk(OnDisk),
    Missing,
}

/// The levels of rule 2, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Levels {
    pub(crate) limit: u64,
    pub(crate) spill: u64,
    pub(crate) pause: u64,
}

impl Levels {
    pub(crate) fn of(limit: u64) -> Levels {
        // Within the protocol's range (`ToScheduler::Memory`).
        let limit = limit.clamp(1, MAX_MEMORY);
        Levels {
            limit,
            spill: (limit as f64 * SPILL_AT) as u64,
            pause: (limit as f64 * PAUSE_AT) as u64,
        }
    }
}

/// The store's bookkeeping, with no I/O: which value is where, the LRU
/// order, the byte counts and the levels.
#[derive(Default)]
pub(crate) struct Held {
    values: KeyMap<WireKey, Slot>,
    /// Values in memory and not being written, by last use (rule 2): each
    /// use appends the value's new tick, O(1). Entries go stale when the
    /// value is used again, removed or spilled (its slot's tick differs);
    /// [`Held::next_spill`] skips them, and [`Held::touch`] sweeps them out
    /// once they outnumber the values, so the list stays within twice the
    /// store.
    lru: VecDeque<(u64, WireKey)>,
    tick: u64,
    levels: Option<Levels>,
    memory: u64,
    stats: Spill,
}

impl Held {
    pub(crate) fn new(levels: Option<Levels>) -> Held {
        Held {
            levels,
            ..Held::default()
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Stores `stored` under `key`, most recently used; returns what it
    /// replaces, as [`remove`](Held::remove) does.
    pub(crate) fn insert(&mut self, key: WireKey, stored: Stored) -> Removed {
        let old = self.remove(&key);
        let touched = self.next_tick();
        self.memory += stored.nbytes;
        self.values.insert(
            key,
            Slot {
                nbytes: stored.nbytes,
                generation: touched,
                place: Place::Memory {
                    value: stored.value,
                    touched,
                },
            },
        );
        self.touch(touched, key);
        old
    }

    /// Records that `key` was used at `tick`, its slot's new tick.
    fn touch(&mut self, tick: u64, key: WireKey) {
        self.lru.push_back((tick, key));
        if self.lru.len() > 2 * self.values.len() + 64 {
            let values = &self.values;
            self.lru
                .retain(|&(tick, key)| Self::is_current(values, tick, &key));
        }
    }

    /// Whether `(tick, key)` in the LRU list is the value's last use.
    fn is_current(values: &KeyMap<WireKey, Slot>, tick: u64, key: &WireKey) -> bool {
        values
            .get(key)
            .is_some_and(|s| matches!(s.place, Place::Memory { touched, .. } if touched == tick))
    }

    /// Forgets `key`; returns its file, to remove, if it was spilled, and
    /// its value if it was in memory, for the caller to drop quietly
    /// once the lock is released (worker rule 16: a `Drop` is user code).
    pub(crate) fn remove(&mut self, key: &WireKey) -> Removed {
        let Some(slot) = self.values.remove(key) else {
            return (None, None);
        };
        match slot.place {
            // Its LRU entry is stale now. One being written: the spill
            // thread finds it gone and removes its file.
            Place::Memory { value, .. } | Place::Writing { value } => {
                self.memory -= slot.nbytes;
                (None, Some(value))
            }
            Place::Disk { type_name } => {
                self.stats.spilled_bytes -= slot.nbytes;
                self.stats.spilled_keys -= 1;
                let file = OnDisk {
                    key: *key,
                    generation: slot.generation,
                    type_name,
                };
                (Some(file), None)
            }
        }
    }

    /// Forgets every value; returns the files to remove and the values to
    /// drop, as [`remove`](Held::remove) does.
    pub(crate) fn clear(&mut self) -> (Vec<OnDisk>, Vec<(WireKey, Value)>) {
        let keys: Vec<WireKey> = self.values.keys().copied().collect();
        let (mut files, mut values) = (Vec::new(), Vec::new());
        for key in keys {
            let (file, value) = self.remove(&key);
            files.extend(file);
            values.extend(value.map(|v| (key, v)));
        }
        (files, values)
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    pub(crate) fn contains(&self, key: &WireKey) -> bool {
        self.values.contains_key(key)
    }

    pub(crate) fn nbytes(&self, key: &WireKey) -> Option<u64> {
        self.values.get(key).map(|s| s.nbytes)
    }

    /// Looks `key` up, making it the most recently used (rule 2).
    pub(crate) fn find(&mut self, key: &WireKey) -> Found {
        let tick = self.next_tick();
        let Some(slot) = self.values.get_mut(key) else {
            return Found::Missing;
        };
        match &mut slot.place {
            Place::Memory { value, touched } => {
                *touched = tick;
                let value = value.clone();
                self.touch(tick, *key);
                Found::Memory(value)
            }
            Place::Writing { value } => Found::Memory(value.clone()),
            Place::Disk { type_name } => Found::Disk(OnDisk {
                key: *key,
                generation: slot.generation,
                type_name,
            }),
        }
    }

    /// The least recently used value to spill, if the store holds more
    /// than the spill level; it is `Writing` until [`Held::written`].
    pub(crate) fn next_spill(&mut self) -> Option<ToSpill> {
        let levels = self.levels?;
        if self.memory <= levels.spill {
            return None;
        }
        let key = loop {
            let (tick, key) = self.lru.pop_front()?;
            if Self::is_current(&self.values, tick, &key) {
                break key;
            }
        };
        let slot = self.values.get_mut(&key).expect("the LRU lists held keys");
        let Place::Memory { value, .. } = &slot.place else {
            unreachable!("the LRU lists values in memory only");
        };
        let value = value.clone();
        slot.place = Place::Writing {
            value: value.clone(),
        };
        Some(ToSpill {
            key,
            generation: slot.generation,
            value,
        })
    }

    /// The spill thread wrote `spill` (`ok`) or could not (rule 6). Returns
    /// the file to remove when the value went meanwhile (or was replaced).
    pub(crate) fn written(&mut self, spill: &ToSpill, ok: bool) -> Option<OnDisk> {
        let gone = OnDisk {
            key: spill.key,
            generation: spill.generation,
            type_name: spill.value.type_name(),
        };
        let tick = self.next_tick();
        let Some(slot) = self.values.get_mut(&spill.key) else {
            return ok.then_some(gone);
        };
        if slot.generation != spill.generation || !matches!(slot.place, Place::Writing { .. }) {
            return ok.then_some(gone);
        }
        if ok {
            // The value in `Writing` is never its last reference here:
            // `spill` holds one, which the spill thread drops quietly.
            slot.place = Place::Disk {
                type_name: spill.value.type_name(),
            };
            self.memory -= slot.nbytes;
            self.stats.spilled_bytes += slot.nbytes;
            self.stats.spilled_keys += 1;
            self.stats.spills += 1;
        } else {
            // Back in the LRU as just used: the next try picks another.
            slot.place = Place::Memory {
                value: spill.value.clone(),
                touched: tick,
            };
            self.touch(tick, spill.key);
            self.stats.failed_spills += 1;
        }
        None
    }

    /// `disk` was read back (`Some` bytes, checked) or could not be (rule
    /// 5). With `keep`, a value read back goes back into memory and its
    /// file is to be removed (returned). Counts the read either way.
    pub(crate) fn read_back(
        &mut self,
        disk: &OnDisk,
        bytes: Option<&Arc<[u8]>>,
        keep: bool,
    ) -> Option<OnDisk> {
        let current = self.holds_on_disk(disk);
        match bytes {
            Some(bytes) => {
                self.stats.unspills += 1;
                if !(keep && current) {
                    return None;
                }
                let nbytes = self.values[&disk.key].nbytes;
                // On disk: no value in memory to drop.
                let (file, _) = self.remove(&disk.key);
                // A new generation: the old file goes, a later spill makes
                // its own.
                self.insert(
                    disk.key,
                    Stored {
                        value: Arc::new(Encoded::new(bytes.clone())),
                        nbytes,
                    },
                );
                file
            }
            None => {
                if !current {
                    return None;
                }
                self.stats.lost += 1;
                self.remove(&disk.key).0
            }
        }
    }

    /// Whether `disk` is still where its value is: on disk, at that
    /// generation.
    fn holds_on_disk(&self, disk: &OnDisk) -> bool {
        self.values.get(&disk.key).is_some_and(|s| {
            s.generation == disk.generation && matches!(s.place, Place::Disk { .. })
        })
    }

    /// Whether no new task should start (rule 2).
    pub(crate) fn paused(&self) -> bool {
        self.levels.is_some_and(|l| self.memory > l.pause)
    }

    /// The figures for `scheduler_info`; `None` without a limit.
    pub(crate) fn report(&self) -> Option<Spill> {
        let levels = self.levels?;
        Some(Spill {
            limit_bytes: levels.limit,
            spill_at_bytes: levels.spill,
            pause_at_bytes: levels.pause,
            memory_bytes: self.memory.min(MAX_MEMORY),
            spilled_bytes: self.stats.spilled_bytes.min(MAX_MEMORY),
            paused: self.paused(),
            ..self.stats
        })
    }
}

/// The values a worker holds, shared by its state, its data port and its
/// spill thread (rules 2 to 6). Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Store(Arc<Shared>);

#[derive(Default)]
struct Shared {
    held: Mutex<Held>,
    /// Wakes the spill thread.
    wake: Condvar,
    /// Where spilled values go; the directory is made at the first spill.
    spill: Mutex<SpillDir>,
    /// Told when a spill brought the store below the pause level.
    resumed: tokio::sync::Notify,
    /// Spilled values whose files failed to read with an I/O error, by
    /// key and generation, since when (rule 5).
    unreadable: Mutex<std::collections::HashMap<(WireKey, u64), std::time::Instant>>,
    /// How long such a file may fail before its value counts as lost
    /// ([`UNREADABLE_FOR`]; shorter in tests).
    unreadable_for: Duration,
}

#[derive(Default)]
struct SpillDir {
    /// The directory the spill directory is made in.
    parent: PathBuf,
    /// The spill directory, once made.
    made: Option<PathBuf>,
    /// Its lock file, locked for as long as it is this worker's (rule 3).
    lock: Option<File>,
    /// The spill thread runs.
    thread: bool,
    /// The worker ended: the spill thread exits.
    closed: bool,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data whole at each step a panic
    // could interrupt (no user code runs under these locks).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    /// A store spilling above the levels of `limit` (none: never) into a
    /// directory under `parent` (rule 3).
    pub(crate) fn new(limit: Option<u64>, parent: PathBuf) -> Store {
        let shared = Shared {
            held: Mutex::new(Held::new(limit.map(Levels::of))),
            spill: Mutex::new(SpillDir {
                parent,
                ..SpillDir::default()
            }),
            wake: Condvar::new(),
            resumed: tokio::sync::Notify::new(),
            unreadable: Mutex::default(),
            unreadable_for: UNREADABLE_FOR,
        };
        Store(Arc::new(shared))
    }

    /// A store as [`new`](Store::new) whose spilled files may fail to read
    /// for `unreadable_for` before their values count as lost (rule 5).
    #[cfg(test)]
    pub(crate) fn with_patience(
        limit: Option<u64>,
        parent: PathBuf,
        unreadable_for: Duration,
    ) -> Store {
        let mut store = Store::new(limit, parent);
        if let Some(shared) = Arc::get_mut(&mut store.0) {
            shared.unreadable_for = unreadable_for;
        }
        store
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        locked(&self.0.held)
    }

    /// Stores a value; wakes the spill thread when over the spill level.
    pub(crate) fn insert(&self, key: WireKey, stored: Stored) {
        let ((file, old), over) = {
            let mut held = self.held();
            let old = held.insert(key, stored);
            let over = held.levels.is_some_and(|l| held.memory > l.spill);
            (old, over)
        };
        self.remove_files(file);
        drop_quietly(old, format_args!("the value of key {}", Key(key).short()));
        if over {
            self.start_spilling();
        }
    }

    /// Drops `key`'s value, quietly and outside the lock (worker rule
    /// 16), and its file.
    pub(crate) fn remove(&self, key: &WireKey) {
        let (file, value) = self.held().remove(key);
        self.remove_files(file);
        drop_quietly(
            value,
            format_args!("the value of key {}", Key(*key).short()),
        );
    }

    /// Drops every value, as [`remove`](Store::remove) does; returns how
    /// many there were.
    pub(crate) fn clear(&self) -> usize {
        let (n, (files, values)) = {
            let mut held = self.held();
            (held.len(), held.clear())
        };
        self.remove_files(files);
        for (key, value) in values {
            drop_quietly(value, format_args!("the value of key {}", Key(key).short()));
        }
        n
    }

    pub(crate) fn contains(&self, key: &WireKey) -> bool {
        self.held().contains(key)
    }

    pub(crate) fn nbytes(&self, key: &WireKey) -> Option<u64> {
        self.held().nbytes(key)
    }

    pub(crate) fn paused(&self) -> bool {
        self.held().paused()
    }

    pub(crate) fn report(&self) -> Option<Spill> {
        self.held().report()
    }

    /// Resolves after a spill that left the store below the pause level
    /// (a wake-up is kept if nobody waits).
    pub(crate) async fn resumed(&self) {
        self.0.resumed.notified().await
    }

    /// Looks up a value (rule 2).
    pub(crate) fn find(&self, key: &WireKey) -> Found {
        self.held().find(key)
    }

    /// A task's input: from memory, or read back from disk into memory
    /// (rule 4). `Ok(None)`: not held. `Err(Unread::Lost)`: its file was
    /// damaged, the value is dropped; `Err(Unread::Later)`: its file could
    /// not be read now, the value stays spilled (rule 5).
    pub(crate) fn input(&self, key: &WireKey) -> Result<Option<Value>, Unread> {
        match self.find(key) {
            Found::Memory(value) => Ok(Some(value)),
            Found::Missing => Ok(None),
            Found::Disk(disk) => self
                .read(&disk, true)
                .map(|bytes| Some(Arc::new(Encoded::new(bytes)) as Value)),
        }
    }

    /// Reads a spilled value's bytes (rules 4 and 5): `keep` puts it back
    /// in memory. `Err(Unread::Lost)` when its file cannot be read back
    /// whole (the value is dropped then) or the value is no longer held;
    /// `Err(Unread::Later)` when reading failed for now (the value stays
    /// spilled).
    pub(crate) fn read(&self, disk: &OnDisk, keep: bool) -> Result<Arc<[u8]>, Unread> {
        let mut moved: Option<OnDisk> = None;
        // A value that moves while it is read (read back for a task,
        // spilled again) is read where it went; a few moves in a row, and
        // it is taken for not held.
        for _ in 0..4 {
            let disk = moved.as_ref().unwrap_or(disk);
            match self.read_at(disk, keep) {
                ReadAt::Bytes(bytes) => return Ok(bytes),
                ReadAt::Unread(why) => return Err(why),
                ReadAt::Moved(Found::Memory(value)) => {
                    let bytes = match value.downcast_ref::<Encoded>() {
                        Some(encoded) => Ok(encoded.0.clone()),
                        // A panicking `Serialize` is the type's bug: lost.
                        None => match catch_unwind(AssertUnwindSafe(|| value.encode())) {
                            Ok(Ok(bytes)) => Ok(Arc::from(bytes)),
                            _ => Err(Unread::Lost),
                        },
                    };
                    let key = Key(disk.key);
                    drop_quietly(value, format_args!("the value of key {}", key.short()));
                    return bytes;
                }
                ReadAt::Moved(Found::Disk(newer)) => moved = Some(newer),
                ReadAt::Moved(Found::Missing) => return Err(Unread::Lost),
            }
        }
        Err(Unread::Lost)
    }

    /// [`read`](Store::read) for a reader of the data port, on a blocking
    /// thread: a read that fails for now is tried again after 10 ms,
    /// doubling, [`PATIENCE`] times (about 2.5 s in all, rule 5), and the
    /// value stays put; `keep` is never set.
    pub(crate) fn read_patiently(&self, disk: &OnDisk) -> Result<Arc<[u8]>, Unread> {
        let mut wait = Duration::from_millis(10);
        for _ in 0..PATIENCE {
            match self.read(disk, false) {
                Err(Unread::Later) => std::thread::sleep(wait),
                done => return done,
            }
            wait *= 2;
        }
        self.read(disk, false)
    }

    /// [`read`](Store::read) at `disk`: [`ReadAt::Moved`] with where the
    /// value is now when its file could not be read because it moved
    /// since (a file removed for a newer place is no damage, rule 5).
    fn read_at(&self, disk: &OnDisk, keep: bool) -> ReadAt {
        let dir = locked(&self.0.spill).made.clone();
        let read = match &dir {
            // Its size in memory once (`entry` rule 4).
            Some(dir) => entry::read_shared(dir, &file_key(disk), Some(disk.type_name)),
            None => Err(entry::EntryError::Missing),
        };
        let bytes = match read {
            Ok((_, bytes)) => Some(bytes),
            Err(e) => {
                {
                    let mut held = self.held();
                    if !held.holds_on_disk(disk) {
                        return ReadAt::Moved(held.find(&disk.key));
                    }
                }
                // An I/O error says nothing of the file's content: too
                // many open files, an interrupted or short-of-memory read
                // pass. Only a file that is gone or does not check out is
                // damage; anything else leaves the value where it is.
                if let entry::EntryError::Io { .. } = e {
                    let since = *locked(&self.0.unreadable)
                        .entry((disk.key, disk.generation))
                        .or_insert_with(std::time::Instant::now);
                    if since.elapsed() < self.0.unreadable_for {
                        log_limited!(
                            "worker: spilled value unreadable",
                            "worker: a spilled value ({}) cannot be read back now, it stays on \
                             disk and is read again later: {e}",
                            Key(disk.key)
                        );
                        return ReadAt::Unread(Unread::Later);
                    }
                    // Failing for longer than a passing shortage lasts:
                    // lost, as a damaged file is.
                }
                log_limited!(
                    "worker: spilled value lost",
                    "worker: a spilled value ({}) cannot be read back, dropped; the scheduler \
                     computes it again: {e}",
                    Key(disk.key)
                );
                None
            }
        };
        {
            let mut unreadable = locked(&self.0.unreadable);
            if !unreadable.is_empty() {
                unreadable.remove(&(disk.key, disk.generation));
            }
        }
        let (file, over) = {
            let mut held = self.held();
            let file = held.read_back(disk, bytes.as_ref(), keep);
            (file, held.levels.is_some_and(|l| held.memory > l.spill))
        };
        self.remove_files(file);
        if over {
            self.start_spilling();
        }
        match bytes {
            Some(bytes) => ReadAt::Bytes(bytes),
            None => ReadAt::Unread(Unread::Lost),
        }
    }

    /// Ends spilling: every value and the spill directory go, the spill
    /// thread exits (the worker ended).
    pub(crate) fn close(&self) {
        self.clear();
        let (made, lock) = {
            let mut spill = locked(&self.0.spill);
            spill.closed = true;
            (spill.made.take(), spill.lock.take())
        };
        // The thread waits on `held`'s condvar: notified under that lock.
        {
            let _held = self.held();
            self.0.wake.notify_all();
        }
        if let Some(dir) = made {
            remove_own(&dir, lock);
        }
    }

    /// The spill directory, once made (tests).
    #[cfg(test)]
    pub(crate) fn spill_dir(&self) -> Option<PathBuf> {
        locked(&self.0.spill).made.clone()
    }

    /// The file of a spilled value (tests).
    #[cfg(test)]
    pub(crate) fn spill_file(&self, key: &WireKey) -> Option<PathBuf> {
        let Found::Disk(disk) = self.held().find(key) else {
            return None;
        };
        Some(entry::path(&self.spill_dir()?, &file_key(&disk)))
    }

    /// A store with `limit` that never spills: its levels only pause
    /// (tests of the state's rule 6).
    #[cfg(test)]
    pub(crate) fn unspilled(limit: u64) -> Store {
        let store = Store::new(Some(limit), PathBuf::new());
        locked(&store.0.spill).closed = true;
        store
    }

    fn remove_files(&self, files: impl IntoIterator<Item = OnDisk>) {
        let mut files = files.into_iter().peekable();
        if files.peek().is_none() {
            return;
        }
        let Some(dir) = locked(&self.0.spill).made.clone() else {
            return;
        };
        for file in files {
            let _ = entry::remove(&dir, &file_key(&file));
        }
    }

    /// Starts the spill thread if it does not run (rule 2).
    fn start_spilling(&self) {
        {
            let mut spill = locked(&self.0.spill);
            if spill.closed || spill.thread {
                drop(spill);
                self.0.wake.notify_one();
                return;
            }
            spill.thread = true;
        }
        let store = self.clone();
        let started = std::thread::Builder::new()
            .name("rask-spill".into())
            .spawn(move || store.spill_loop());
        if let Err(e) = started {
            locked(&self.0.spill).thread = false;
            log_limited!(
                "worker: no spill thread",
                "worker: cannot start the spill thread, values stay in memory: {e}"
            );
        }
    }

    /// The spill thread: writes the least recently used value while the
    /// store is over its spill level (rule 2); exits at `close`.
    fn spill_loop(&self) {
        loop {
            let spill = {
                let mut held = self.held();
                loop {
                    if locked(&self.0.spill).closed {
                        return;
                    }
                    if let Some(spill) = held.next_spill() {
                        break spill;
                    }
                    held = self
                        .0
                        .wake
                        .wait(held)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            let written = self.write(&spill);
            let (file, paused) = {
                let mut held = self.held();
                (held.written(&spill, written.is_ok()), held.paused())
            };
            // Its last reference if the value was released meanwhile
            // (worker rule 16).
            let key = Key(spill.key);
            drop_quietly(spill, format_args!("the value of key {}", key.short()));
            self.remove_files(file);
            if !paused {
                self.0.resumed.notify_one();
            }
            if let Err(e) = written {
                log_limited!(
                    "worker: cannot spill",
                    "worker: cannot spill a value to disk, it stays in memory: {e}"
                );
                // A whole second, whatever wakes the thread meanwhile (new
                // values would only fail the same way), unless it ends.
                let deadline = std::time::Instant::now() + RETRY_AFTER;
                let mut held = self.held();
                while !locked(&self.0.spill).closed {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    held = self
                        .0
                        .wake
                        .wait_timeout(held, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    /// Writes one value's file (rule 3).
    fn write(&self, spill: &ToSpill) -> Result<(), String> {
        let dir = self.dir()?;
        let encoded;
        let bytes: &[u8] = match spill.value.downcast_ref::<Encoded>() {
            Some(e) => &e.0,
            None => {
                // It encoded when it was made; a panic now is the type's
                // own bug, and must not end the spill thread.
                encoded = catch_unwind(AssertUnwindSafe(|| spill.value.encode()))
                    .map_err(|_| "encoding the value panicked".to_owned())?
                    .map_err(|e| e.to_string())?;
                &encoded
            }
        };
        let key = file_key(&OnDisk {
            key: spill.key,
            generation: spill.generation,
            type_name: spill.value.type_name(),
        });
        entry::write(&dir, &key, spill.value.type_name(), bytes)
            .map(drop)
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// The spill directory, made now if it is not yet (rule 3).
    fn dir(&self) -> Result<PathBuf, String> {
        let (dir, parent) = {
            let mut spill = locked(&self.0.spill);
            if let Some(dir) = &spill.made {
                return Ok(dir.clone());
            }
            let (dir, lock) =
                make_dir(&spill.parent).map_err(|e| format!("{}: {e}", spill.parent.display()))?;
            spill.made = Some(dir.clone());
            spill.lock = Some(lock);
            (dir, spill.parent.clone())
        };
        // Dead processes' directories go on a thread of their own, outside
        // the lock an insert on the network thread takes: a crashed
        // worker's thousands of files held it for seconds (no heartbeat
        // meanwhile). Done inline if no thread starts.
        let clean = parent.clone();
        if std::thread::Builder::new()
            .name("rask-spill-clean".into())
            .spawn(move || remove_stale(&clean))
            .is_err()
        {
            remove_stale(&parent);
        }
        Ok(dir)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A store dropped without `close` still holds values: they go
        // quietly too (worker rule 16).
        let held = self.held.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (key, value) in held.clear().1 {
            drop_quietly(value, format_args!("the value of key {}", Key(key).short()));
        }
        let (made, lock) = {
            let mut spill = locked(&self.spill);
            (spill.made.take(), spill.lock.take())
        };
        if let Some(dir) = made {
            remove_own(&dir, lock);
        }
    }
}

/// Why a spilled value was not read back (rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unread {
    /// Its file is damaged or gone, or the value is no longer held: the
    /// value is dropped.
    Lost,
    /// Reading its file failed for now (an I/O error, such as too many
    /// open files): the value stays spilled, its file too, to be read
    /// again later.
    Later,
}

/// How [`Store::read`] at one place went.
enum ReadAt {
    Bytes(Arc<[u8]>),
    Unread(Unread),
    /// The value moved since (read back for a task, spilled again): where
    /// it is now.
    Moved(Found),
}

/// The name of a spill's file: its key and generation (rule 3).
fn file_key(disk: &OnDisk) -> Key {
    let mut h = blake3::Hasher::new_derive_key("rask spill file v1");
    h.update(&disk.key);
    h.update(&disk.generation.to_le_bytes());
    Key(*h.finalize().as_bytes())
}

/// The start of every spill directory's name (rule 3).
const PREFIX: &str = "rask-spill-";

/// The start of the name of a spill directory being made (rule 3).
const MAKING: &str = ".rask-spill-making-";

/// The lock file in a spill directory (rule 3).
const LOCK: &str = "lock";

/// How old a directory left half made must be before it is removed
/// (rule 3): making one takes microseconds.
const MAKING_STALE: Duration = Duration::from_secs(60);

/// Makes a spill directory of this process's own under `parent`, and
/// returns it with its lock file, locked (rule 3).
fn make_dir(parent: &Path) -> std::io::Result<(PathBuf, File)> {
    std::fs::create_dir_all(parent)?;
    loop {
        let tag = format!("{}-{:016x}", std::process::id(), random());
        let making = parent.join(format!("{MAKING}{tag}"));
        match std::fs::create_dir(&making) {
            Ok(()) => {}
            // Another worker's (or one of ours) of the same tag: a new one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let made = (|| {
            let lock = File::options()
                .write(true)
                .create_new(true)
                .open(making.join(LOCK))?;
            take_lock(&lock)?.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "a new spill directory's lock is held by another process",
                )
            })?;
            let dir = parent.join(format!("{PREFIX}{tag}"));
            // Never onto another directory: every made one holds its lock
            // file, and a directory is renamed onto another only if that
            // one is empty.
            std::fs::rename(&making, &dir)?;
            Ok((dir, lock))
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&making);
        }
        return made;
    }
}

/// 64 random bits: std's hasher keys come from the system's randomness.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Takes `file`'s exclusive lock without waiting: `None` if another open
/// file holds it (rule 3).
fn take_lock(file: &File) -> std::io::Result<Option<()>> {
    // Called as the trait's function: std's own `File::try_lock` (Rust
    // 1.89, past this crate's rust-version) would win a method call.
    match fs4::FileExt::try_lock(file) {
        Ok(()) => Ok(Some(())),
        Err(fs4::TryLockError::WouldBlock) => Ok(None),
        Err(fs4::TryLockError::Error(e)) => Err(e),
    }
}

/// Removes this worker's own spill directory, then lets go of its lock
/// (rule 3). Where an open file cannot be removed (Windows), after.
fn remove_own(dir: &Path, lock: Option<File>) {
    if std::fs::remove_dir_all(dir).is_err() {
        drop(lock);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// What [`remove_if_dead`] did with a directory.
#[derive(Debug, PartialEq, Eq)]
enum Stale {
    Removed,
    /// Its lock is held: its worker lives.
    Live,
    /// It has no lock file (an older version's, or half made).
    Unlocked,
}

/// Removes the spill directory `dir` if no process holds its lock
/// (rule 3), holding the lock while it removes.
fn remove_if_dead(dir: &Path) -> Stale {
    let lock = match File::options().write(true).open(dir.join(LOCK)) {
        Ok(lock) => lock,
        Err(_) => return Stale::Unlocked,
    };
    match take_lock(&lock) {
        Ok(Some(())) => {
            let _ = std::fs::remove_dir_all(dir);
            Stale::Removed
        }
        Ok(None) | Err(_) => Stale::Live,
    }
}

/// Removes the spill directories a worker process `pid` made under
/// `parent`: a [`LocalCluster`](crate::LocalCluster) does so for the
/// workers it killed, which could not. Only those whose lock is free
/// (rule 3): another container's worker of that process id keeps its own.
pub(crate) fn remove_spill_dirs(parent: &Path, pid: u32) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = format!("{PREFIX}{pid}-");
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            remove_if_dead(&entry.path());
        }
    }
}

/// Removes the spill directories under `parent` whose worker no longer
/// runs (killed before it could remove its own, rule 3).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let mut older = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let path = entry.path();
        if name.starts_with(PREFIX) {
            if remove_if_dead(&path) == Stale::Unlocked {
                older += 1;
            }
        } else if name.starts_with(MAKING) {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > MAKING_STALE);
            if old && remove_if_dead(&path) == Stale::Unlocked {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
    if older > 0 {
        log_limited!(
            "worker: old spill directories",
            "worker: {older} spill directories of an older rask under {} are left alone: \
             whether their worker runs cannot be told; remove them once no older worker runs",
            parent.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn stored(n: u64) -> Stored {
        Stored {
            value: Arc::new(vec![1u8; n as usize]),
            nbytes: n,
        }
    }

    #[test]
    fn limits_read_sizes_fractions_and_none() {
        let machine = || Some(8 << 30);
        let parse = |t: &str| parse_limit(t, machine);
        assert_eq!(parse("200MiB"), Ok(Some(200 << 20)));
        assert_eq!(parse(" 2GB "), Ok(Some(2_000_000_000)));
        assert_eq!(parse("1.5 gib"), Ok(Some(3 << 29)));
        assert_eq!(parse("0.5"), Ok(Some(4 << 30)));
        assert_eq!(parse("1"), Ok(Some(8 << 30)));
        assert_eq!(parse("auto"), Ok(Some(8 << 30)));
        assert_eq!(parse("1000000"), Ok(Some(1_000_000)));
        for off in ["0", "none", "NONE", "off"] {
            assert_eq!(parse(off), Ok(None), "{off}");
        }
        for bad in [
            "",
            "lots",
            "-1",
            "1.5",
            "2 parsecs",
            "nan",
            "inf",
            "0.0.1",
            "2PB0",
        ] {
            assert_eq!(parse(bad), Err(LIMIT_EXPECTED), "{bad:?}");
        }
        assert_eq!(parse("5000TiB"), Err(LIMIT_EXPECTED));
        assert_eq!(parse_limit("0.5", || None), Err(LIMIT_EXPECTED_NO_MACHINE));
        assert_eq!(parse_limit("1GB", || None), Ok(Some(1_000_000_000)));
    }

    #[test]
    fn least_recently_used_values_spill_above_the_spill_level_only() {
        // Limit 100 MiB: spill above 60, pause above 95.
        let mut held = Held::new(Some(Levels::of(100 * MIB)));
        for k in 0..5u8 {
            held.insert([k; 32], stored(20 * MIB));
        }
        // 100 MiB held: over both levels.
        assert!(held.paused());
        // Key 0 is used again: key 1 is now the least recently used.
        assert!(matches!(held.find(&[0; 32]), Found::Memory(_)));
        let first = held.next_spill().expect("over the spill level");
        assert_eq!(first.key, [1; 32]);
        // Still readable from memory while being written.
        assert!(matches!(held.find(&[1; 32]), Found::Memory(_)));
        assert!(held.written(&first, true).is_none());
        assert!(matches!(held.find(&[1; 32]), Found::Disk(_)));
        // 80 MiB: below the pause level, still over the spill level.
        assert!(!held.paused());
        let second = held.next_spill().unwrap();
        assert_eq!(second.key, [2; 32]);
        held.written(&second, true);
        // 60 MiB: at the level, not over it.
        assert!(held.next_spill().is_none());
        let report = held.report().unwrap();
        assert_eq!(
            (report.memory_bytes, report.spilled_bytes, report.spills),
            (60 * MIB, 40 * MIB, 2)
        );
        assert_eq!(report.spilled_keys, 2);
        assert!(!report.paused);
        // No limit: nothing ever spills or pauses.
        let mut free = Held::new(None);
        free.insert(
            [9; 32],
            Stored {
                value: Arc::new(0u8),
                nbytes: 1 << 40,
            },
        );
        assert!(free.next_spill().is_none() && !free.paused() && free.report().is_none());
    }

    proptest::proptest! {
        /// Whatever the uses, a spill takes the value in memory used least
        /// recently, and the LRU list stays within twice the store.
        #[test]
        fn spills_follow_last_use(ops in proptest::collection::vec((0u8..4, 0u8..12), 1..400)) {
            let mut held = Held::new(Some(Levels::of(1)));
            // The model: each key in memory and its last use, counted here.
            let mut model: std::collections::BTreeMap<u8, u64> = Default::default();
            let mut now = 0u64;
            for (op, k) in ops {
                now += 1;
                let key = [k; 32];
                match op {
                    0 => {
                        held.insert(key, stored(1));
                        model.insert(k, now);
                    }
                    1 => {
                        let found = held.find(&key);
                        if let Some(used) = model.get_mut(&k) {
                            proptest::prop_assert!(matches!(found, Found::Memory(_)));
                            *used = now;
                        }
                    }
                    2 => {
                        held.remove(&key);
                        model.remove(&k);
                    }
                    _ => {
                        let oldest = model.iter().min_by_key(|(_, &t)| t).map(|(&k, _)| k);
                        let spill = held.next_spill();
                        proptest::prop_assert_eq!(spill.as_ref().map(|s| s.key[0]), oldest);
                        if let Some(spill) = spill {
                            held.written(&spill, true);
                            model.remove(&spill.key[0]);
                        }
                    }
                }
                proptest::prop_assert!(held.lru.len() <= 2 * held.len() + 65);
            }
        }
    }

    #[test]
    fn a_value_released_or_replaced_while_written_leaves_no_file() {
        let mut held = Held::new(Some(Levels::of(10)));
        held.insert([1; 32], stored(20));
        let spill = held.next_spill().unwrap();
        held.remove(&[1; 32]);
        assert_eq!(held.report().unwrap().memory_bytes, 0);
        // Written after it went: its file is to be removed.
        let file = held.written(&spill, true).expect("a file to remove");
        assert_eq!(file.generation, spill.generation);
        // Replaced by a new value of the same key while written.
        held.insert([2; 32], stored(20));
        let spill = held.next_spill().unwrap();
        held.insert([2; 32], stored(20));
        assert!(held.written(&spill, true).is_some());
        assert!(matches!(held.find(&[2; 32]), Found::Memory(_)));
        // A failed write keeps the value in memory, most recently used.
        held.insert([3; 32], stored(1));
        let spill = held.next_spill().unwrap();
        assert_eq!(spill.key, [2; 32]);
        assert!(held.written(&spill, false).is_none());
        assert!(matches!(held.find(&[2; 32]), Found::Memory(_)));
        let report = held.report().unwrap();
        assert_eq!((report.failed_spills, report.spills), (1, 0));
        assert_eq!(held.next_spill().unwrap().key, [3; 32]);
    }

    #[test]
    fn a_read_back_comes_into_memory_and_a_damaged_one_is_dropped() {
        let mut held = Held::new(Some(Levels::of(100)));
        held.insert([1; 32], stored(70));
        held.insert([2; 32], stored(70));
        let spill = held.next_spill().unwrap();
        held.written(&spill, true);
        let Found::Disk(disk) = held.find(&[1; 32]) else {
            panic!("spilled")
        };
        // A reader of the data port: the value stays on disk.
        let bytes: Arc<[u8]> = Arc::from(&[1u8; 70][..]);
        assert!(held.read_back(&disk, Some(&bytes), false).is_none());
        assert!(matches!(held.find(&[1; 32]), Found::Disk(_)));
        // A task of this worker: back in memory, its file to remove.
        let file = held.read_back(&disk, Some(&bytes), true).expect("file");
        assert_eq!(file.generation, disk.generation);
        match held.find(&[1; 32]) {
            Found::Memory(v) => assert_eq!(v.downcast_ref::<Encoded>().unwrap().0.len(), 70),
            _ => panic!("in memory"),
        }
        let report = held.report().unwrap();
        assert_eq!((report.unspills, report.memory_bytes), (2, 140));
        assert_eq!(report.spilled_bytes, 0);
        // A damaged file: the value is gone, counted, its file removed.
        let spill = held.next_spill().unwrap();
        held.written(&spill, true);
        let Found::Disk(disk) = held.find(&spill.key) else {
            panic!("spilled")
        };
        assert!(held.read_back(&disk, None, true).is_some());
        assert!(!held.contains(&spill.key));
        assert_eq!(held.report().unwrap().lost, 1);
        // An old read of a value spilled again reports nothing.
        assert!(held.read_back(&disk, None, true).is_none());
        assert_eq!(held.report().unwrap().lost, 1);
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rask-memory-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Waits until `check` holds, for up to 30 s.
    fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn the_spill_thread_writes_files_that_read_back_and_close_removes_them() {
        let parent = scratch("thread");
        let store = Store::new(Some(1000), parent.clone());
        for k in 0..10u8 {
            store.insert(
                [k; 32],
                Stored {
                    value: Arc::new(vec![k; 200]),
                    nbytes: 200,
                },
            );
        }
        eventually("spilled below 600 bytes", || {
            store.report().unwrap().memory_bytes <= 600
        });
        let dir = store.spill_dir().expect("made at the first spill");
        assert!(dir.starts_with(&parent));
        // The oldest went first; it reads back as the bytes `encode` gave.
        let Found::Disk(disk) = store.find(&[0; 32]) else {
            panic!("key 0 spilled")
        };
        let bytes = store.read(&disk, false).expect("whole");
        assert_eq!(
            postcard::from_bytes::<Vec<u8>>(&bytes).unwrap(),
            vec![0; 200]
        );
        // Damage key 1's file: it is dropped, never served.
        let Found::Disk(one) = store.find(&[1; 32]) else {
            panic!("key 1 spilled")
        };
        let file = entry::path(&dir, &file_key(&one));
        let mut raw = std::fs::read(&file).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&file, raw).unwrap();
        assert!(matches!(store.input(&[1; 32]), Err(Unread::Lost)));
        assert!(!store.contains(&[1; 32]));
        assert!(!file.exists());
        // A task's input comes back into memory, its file goes.
        let value = store.input(&[0; 32]).unwrap().expect("held");
        assert!(value.downcast_ref::<Encoded>().is_some());
        assert!(!entry::path(&dir, &file_key(&disk)).exists());
        // A reader that found it on disk before (the data port) is
        // answered from memory, where it went: the value was answered
        // missing, then released by the scheduler on the peer's word.
        assert_eq!(store.read(&disk, false).ok().as_deref(), Some(&bytes[..]));
        assert!(store.contains(&[0; 32]));
        store.close();
        assert!(!dir.exists());
        assert_eq!(store.clear(), 0);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// Runs this binary's test `name` again in a child process, with
    /// [`CHILD`] set, through `sh -c` with `shell` run first (`ulimit`).
    fn child(name: &str, shell: &str) -> std::process::Command {
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{shell} && exec \"$0\" \"$@\""))
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1");
        command
    }

    /// Set in a child process [`child`] starts.
    const CHILD: &str = "RASK_MEMORY_TEST_CHILD";

    /// Waits up to 60 s for `child` to end by itself, killed after that.
    fn exit_of(mut child: std::process::Child) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child process did not end within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A spilled value whose file cannot be read now keeps its value and
    /// its file, and reads back once it can (rule 5). The real fault: a
    /// child process with at most 64 open files opens files until the
    /// kernel refuses (EMFILE), then reads the value back.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_read_failing_for_too_many_open_files_keeps_the_value() {
        let name = "worker::memory::tests::a_read_failing_for_too_many_open_files_keeps_the_value";
        if std::env::var_os(CHILD).is_none() {
            let started = child(name, "ulimit -n 64").spawn().unwrap();
            assert!(exit_of(started).success(), "the child process failed");
            return;
        }
        let parent = scratch("emfile");
        let store = Store::new(Some(100), parent.clone());
        store.insert([1; 32], stored(70));
        store.insert([2; 32], stored(70));
        eventually("key 1 spilled", || store.spill_file(&[1; 32]).is_some());
        let file = store.spill_file(&[1; 32]).unwrap();
        let mut open = Vec::new();
        let refused = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) if open.len() < 1000 => open.push(f),
                Ok(_) => panic!("1000 files open under a limit of 64"),
                Err(e) => break e,
            }
        };
        assert_eq!(refused.raw_os_error(), Some(24), "EMFILE: {refused}");
        assert_eq!(store.input(&[1; 32]).err(), Some(Unread::Later));
        assert!(store.contains(&[1; 32]));
        // A reader of the data port tries again meanwhile, and is answered
        // once files can be opened again.
        let Found::Disk(disk) = store.find(&[1; 32]) else {
            panic!("still spilled")
        };
        let reader = {
            let store = store.clone();
            std::thread::spawn(move || store.read_patiently(&disk))
        };
        drop(open);
        assert_eq!(reader.join().unwrap().unwrap().len(), 70 + 1);
        assert!(file.exists());
        assert_eq!(store.report().unwrap().lost, 0);
        match store.input(&[1; 32]) {
            Ok(Some(v)) => assert_eq!(
                postcard::from_bytes::<Vec<u8>>(&v.downcast_ref::<Encoded>().unwrap().0).unwrap(),
                vec![1; 70]
            ),
            _ => panic!("read back"),
        }
        store.close();
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// The same fault in this process, with no limit to lower: a directory
    /// in the file's place opens but does not read (EISDIR).
    #[test]
    fn a_read_failing_with_an_io_error_keeps_the_value() {
        let parent = scratch("io-error");
        let store = Store::new(Some(100), parent.clone());
        store.insert([1; 32], stored(70));
        store.insert([2; 32], stored(70));
        eventually("key 1 spilled", || store.spill_file(&[1; 32]).is_some());
        let file = store.spill_file(&[1; 32]).unwrap();
        let whole = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let Found::Disk(disk) = store.find(&[1; 32]) else {
            panic!("spilled")
        };
        assert_eq!(store.read(&disk, false).err(), Some(Unread::Later));
        assert_eq!(store.input(&[1; 32]).err(), Some(Unread::Later));
        assert!(store.contains(&[1; 32]));
        assert_eq!(store.report().unwrap().lost, 0);
        std::fs::remove_dir(&file).unwrap();
        std::fs::write(&file, &whole).unwrap();
        assert_eq!(store.read(&disk, false).unwrap().len(), 70 + 1);
        assert!(matches!(store.input(&[1; 32]), Ok(Some(_))));
        store.close();
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// A file that keeps failing with I/O errors past the store's
    /// patience (a failing disk, not a passing shortage) is lost after
    /// all: a task waiting for it is given back and the value computed
    /// again, not waited for for ever.
    #[test]
    fn a_file_that_never_reads_is_lost_after_the_patience() {
        let parent = scratch("io-error-for-good");
        let store = Store::with_patience(Some(100), parent.clone(), Duration::from_millis(200));
        store.insert([1; 32], stored(70));
        store.insert([2; 32], stored(70));
        eventually("key 1 spilled", || store.spill_file(&[1; 32]).is_some());
        let file = store.spill_file(&[1; 32]).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        assert_eq!(store.input(&[1; 32]).err(), Some(Unread::Later));
        assert!(store.contains(&[1; 32]));
        eventually("the value counted lost", || {
            store.input(&[1; 32]).err() == Some(Unread::Lost)
        });
        assert!(!store.contains(&[1; 32]));
        assert_eq!(store.report().unwrap().lost, 1);
        store.close();
        let _ = std::fs::remove_dir_all(&parent);
    }

    #[test]
    fn a_value_that_cannot_be_written_stays_in_memory() {
        // The spill directory's parent is a file: every write fails, as on
        // a full disk.
        let parent = scratch("unwritable");
        let file = parent.join("not-a-directory");
        std::fs::write(&file, b"").unwrap();
        let store = Store::new(Some(100), file);
        store.insert([1; 32], stored(80));
        eventually("a failed spill", || {
            store.report().unwrap().failed_spills > 0
        });
        let report = store.report().unwrap();
        assert_eq!((report.memory_bytes, report.spills), (80, 0));
        match store.input(&[1; 32]) {
            Ok(Some(v)) => assert_eq!(v.downcast_ref::<Vec<u8>>().unwrap().len(), 80),
            _ => panic!("still held in memory"),
        }
        store.close();
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// Set in a child process to the spill directory it is to hold.
    const HOLD: &str = "RASK_MEMORY_TEST_HOLD";

    /// A spill directory whose lock another process holds is never
    /// removed, whatever process id its name holds; once that process is
    /// killed, it is (rule 3). The child plays a worker of another
    /// container: its directory names a process id this namespace does
    /// not run.
    #[test]
    #[cfg(unix)]
    fn a_live_workers_directory_is_kept_and_a_dead_ones_removed() {
        use std::io::BufRead;
        let name =
            "worker::memory::tests::a_live_workers_directory_is_kept_and_a_dead_ones_removed";
        if let Some(dir) = std::env::var_os(HOLD) {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            let lock = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(LOCK))
                .unwrap();
            assert_eq!(take_lock(&lock).unwrap(), Some(()));
            println!("\nlocked");
            // Until the parent kills it, or ends and so closes stdin.
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
            return;
        }
        let parent = scratch("live");
        // No process has this id on Linux (pids stop at 2^22).
        let theirs = parent.join(format!("{PREFIX}{}-00000000000000ab", u32::MAX - 1));
        let mut holder = child(name, "true")
            .env(HOLD, &theirs)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read on a thread of its own, so a child that never says it
        // locked fails the test after a minute instead of hanging it.
        let out = std::io::BufReader::new(holder.stdout.take().unwrap());
        let (said, heard) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let locked = out.lines().any(|l| l.is_ok_and(|l| l == "locked"));
            let _ = said.send(locked);
        });
        if heard.recv_timeout(Duration::from_secs(60)) != Ok(true) {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("the child did not lock its directory");
        }
        remove_stale(&parent);
        remove_spill_dirs(&parent, u32::MAX - 1);
        let kept = theirs.exists();
        // Killed as a worker dies without removing its own directory.
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert!(kept, "a live worker's directory was removed");
        assert!(theirs.join(LOCK).exists());
        remove_stale(&parent);
        assert!(!theirs.exists(), "a dead worker's directory was kept");
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// Two stores of one process id get directories of their own, each
    /// locked, and never remove each other's; a dead one's goes, and so
    /// does one left half made long ago; an older version's is left alone
    /// (rule 3).
    #[test]
    fn directories_are_made_locked_and_only_dead_ones_removed() {
        let parent = scratch("stale");
        let pid = std::process::id();
        let older = parent.join(format!("{PREFIX}{pid}-0"));
        let dead = parent.join(format!("{PREFIX}{pid}-00000000000000cd"));
        let half = parent.join(format!("{MAKING}{pid}-00000000000000ef"));
        let making = parent.join(format!("{MAKING}{pid}-00000000000000aa"));
        for dir in [&older, &dead, &half, &making] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(dead.join(LOCK), b"").unwrap();
        let long_ago = std::time::SystemTime::now() - 2 * MAKING_STALE;
        File::open(&half).unwrap().set_modified(long_ago).unwrap();
        let spilled = |store: &Store| {
            store.insert([1; 32], stored(200));
            eventually("a spill", || store.spill_file(&[1; 32]).is_some());
            store.spill_dir().unwrap()
        };
        let one = Store::new(Some(100), parent.clone());
        let two = Store::new(Some(100), parent.clone());
        let (dir_one, dir_two) = (spilled(&one), spilled(&two));
        assert_ne!(dir_one, dir_two);
        for dir in [&dir_one, &dir_two] {
            let name = dir.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(&format!("{PREFIX}{pid}-")), "{name}");
            assert_eq!(remove_if_dead(dir), Stale::Live);
        }
        // Each store's first spill cleans on a thread of its own.
        eventually("the dead directories removed", || {
            !dead.exists() && !half.exists()
        });
        remove_stale(&parent);
        assert!(older.exists() && making.exists());
        assert!(dir_one.exists() && dir_two.exists());
        assert!(one.spill_file(&[1; 32]).unwrap().exists());
        one.close();
        assert!(!dir_one.exists());
        assert!(dir_two.exists());
        two.close();
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
