//! What the dashboard and performance reports show, as data: the JSON
//! documents of the scheduler's `/api/` and of a report, and the page that
//! draws them.
//!
//! Schema version 1. A [`Snapshot`] is the state of a cluster (or of this
//! process, for a report) at one moment; a [`TaskRecord`] is one run of a
//! task in the task stream. Times are milliseconds since the scheduler (or
//! the report) started, as floats. Fields are only ever added; a reader
//! ignores fields it does not know.
//!
//! The page ([`STATUS_PAGE`]) is one self-contained HTML file: no
//! framework, no CDN, no external font. Served as is, it follows a live
//! scheduler through `api/events`; with data embedded by [`report_page`],
//! it draws that data once and opens no connection.

use serde::{Deserialize, Serialize};

/// The dashboard page: HTML, CSS and JavaScript in one file.
pub const STATUS_PAGE: &str = include_str!("status.html");

/// The JSON schema version of [`Snapshot`] and [`TaskRecord`].
pub const SCHEMA_VERSION: u32 = 1;

/// The group a task named `name` counts under in the dashboard's and a
/// performance report's per-function rows: words joined by `-`, kept up
/// to the first that is not all letters or looks like a hash (eight hex
/// digits), as Dask's `key_split` does; the whole name when its first
/// word is empty. Tasks named one by one count as one group.
///
/// ```
/// use rask_executor::diagnostics::group;
///
/// assert_eq!(group("inc"), "inc");
/// assert_eq!(group("load-17"), "load");
/// assert_eq!(group("read-csv-3f2a"), "read-csv");
/// ```
pub fn group(name: &str) -> &str {
    let mut words = name.split('-');
    let mut end = words.next().map_or(0, str::len);
    if end == 0 {
        return name;
    }
    for word in words {
        let letters = !word.is_empty() && word.chars().all(char::is_alphabetic);
        let hash = word.len() == 8 && word.bytes().all(|b| b.is_ascii_hexdigit());
        if !letters || hash {
            break;
        }
        end += 1 + word.len();
    }
    &name[..end]
}

/// Task counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Waiting for inputs or for a worker.
    pub waiting: u64,
    /// Running, or sent to a worker to run.
    pub processing: u64,
    /// Finished and held now.
    pub memory: u64,
    /// Failed, or not run because an input failed.
    pub erred: u64,
    /// Finished successfully since the start, including results already
    /// released.
    pub done: u64,
}

/// Adds `other`'s counts, state by state: the counts of both together.
impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.waiting += other.waiting;
        self.processing += other.processing;
        self.memory += other.memory;
        self.erred += other.erred;
        self.done += other.done;
    }
}

/// One function's counts: every task whose name's [`group`] is `name`
/// (tasks named one by one, `load-17`, `load-18`, count as `load`; on a
/// cluster's scheduler, past 1 000 groups the rest count as
/// `(other groups)`). In JSON the counts sit beside the name:
/// `{"name": "inc", "waiting": 0, …}`.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionCounts {
    /// The function, e.g. `inc`.
    pub name: String,
    /// Its tasks by state.
    pub counts: Counts,
    /// Total time its finished tasks ran, in milliseconds.
    pub busy_ms: f64,
}

/// The flat form of [`FunctionCounts`], the same in JSON and in binary
/// encodings (which cannot flatten).
#[derive(Serialize, Deserialize)]
struct FlatCounts {
    name: String,
    waiting: u64,
    processing: u64,
    memory: u64,
    erred: u64,
    done: u64,
    busy_ms: f64,
}

impl Serialize for FunctionCounts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let c = self.counts;
        FlatCounts {
            name: self.name.clone(),
            waiting: c.waiting,
            processing: c.processing,
            memory: c.memory,
            erred: c.erred,
            done: c.done,
            busy_ms: self.busy_ms,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for FunctionCounts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let f = FlatCounts::deserialize(deserializer)?;
        Ok(FunctionCounts {
            name: f.name,
            counts: Counts {
                waiting: f.waiting,
                processing: f.processing,
                memory: f.memory,
                erred: f.erred,
                done: f.done,
            },
            busy_ms: f.busy_ms,
        })
    }
}

/// One worker of a cluster (a report of work in this process has one, for
/// the process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRow {
    /// Its id (`0` for this process in a report).
    pub id: u32,
    /// Its data port, `host:port`, or `this process`.
    pub address: String,
    /// Its name (`--name`, `RASK_WORKER_NAME`; by default `host-pid`);
    /// empty where workers have none (this process, a simulated worker).
    #[serde(default)]
    pub name: String,
    /// Compute threads.
    pub threads: u32,
    /// Tasks running on it now, at most one per thread. A cluster's
    /// scheduler counts the tasks it sent there and that are not finished,
    /// leaving out those sent before their inputs were ready and those
    /// waiting on nested work (their threads given back), up to the
    /// worker's thread count: the worker is not asked which of them started.
    pub running: u64,
    /// Tasks sent to it and not finished: [`running`](Self::running) and
    /// those waiting there (for a thread, for their inputs, or on nested
    /// work). A scheduler sends a worker more than it has threads, so that
    /// it never idles between tasks. `0` in reports and from older
    /// versions.
    #[serde(default)]
    pub sent: u64,
    /// Its resident memory, when known.
    pub memory_bytes: Option<u64>,
    /// Bytes of results it holds.
    pub data_bytes: u64,
    /// Results it holds.
    pub keys: u64,
    /// Milliseconds since it was last heard from.
    pub last_heartbeat_ms: u64,
    /// Share of its threads' time spent running tasks, from 0 to 1, over
    /// the report's span (reports only; `null` live).
    pub utilisation: Option<f64>,
    /// The resources it declared, e.g. `GPU=2,MEM=64000000000`; empty
    /// when none.
    #[serde(default)]
    pub resources: String,
    /// Its memory limit and what it spilled to disk, for a worker with a
    /// memory limit (`null` otherwise, and before its first heartbeat).
    #[serde(default)]
    pub spill: Option<Spill>,
    /// Whether it is retiring (`Client::retire_workers`, or its process
    /// got `SIGTERM`): it gets no new task, and leaves once the values
    /// only it holds are held elsewhere. `false` in reports and from
    /// older versions.
    #[serde(default)]
    pub retiring: bool,
}

/// A worker's memory limit and what it did to stay within it: values held
/// in memory, values moved to its spill directory and read back, whether
/// it paused. Sizes are the values' encoded sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spill {
    /// The memory limit, in bytes.
    pub limit_bytes: u64,
    /// Above this many bytes held in memory, the worker spills least
    /// recently used values to disk.
    pub spill_at_bytes: u64,
    /// Above this many bytes held in memory, the worker starts no new task.
    pub pause_at_bytes: u64,
    /// Bytes of values held in memory now.
    pub memory_bytes: u64,
    /// Bytes of values on disk now.
    pub spilled_bytes: u64,
    /// Values on disk now.
    pub spilled_keys: u64,
    /// Values written to disk since the worker started.
    pub spills: u64,
    /// Spilled values read back since the worker started (for a task of
    /// the worker, or for a reader of its data port).
    pub unspills: u64,
    /// Spilled values that could not be read back (a damaged or missing
    /// file): dropped, never served; the scheduler computes them again.
    pub lost: u64,
    /// Values that could not be written (a full disk): kept in memory.
    pub failed_spills: u64,
    /// Whether the worker holds back new tasks now.
    pub paused: bool,
}

/// The state of a cluster at one moment (`GET /api/status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SCHEMA_VERSION`].
    pub version: u32,
    /// The scheduler's address, e.g. `tcp://127.0.0.1:8786`, or what ran a
    /// report's work, e.g. `threads:2`.
    pub scheduler: String,
    /// Milliseconds since the scheduler (or the report) started.
    pub uptime_ms: u64,
    /// Connected clients.
    pub clients: u32,
    /// Tasks finished per second, over the last few seconds (over the whole
    /// span in a report).
    pub tasks_per_second: f64,
    /// Counts over every function.
    pub totals: Counts,
    /// Counts per function, in the order functions were first seen.
    pub functions: Vec<FunctionCounts>,
    /// Workers, by id.
    pub workers: Vec<WorkerRow>,
    /// Work that waits because no connected worker can run it: one line
    /// per restriction (`Delayed::resources`, `Delayed::workers`) that no
    /// worker satisfies any more, with how many tasks wait for it.
    #[serde(default)]
    pub unrunnable: Vec<String>,
}

/// Whether a task in the task stream finished or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    /// Finished; its value was held.
    Memory,
    /// Failed.
    Erred,
}

/// One run of a task, for the task stream (`GET /api/tasks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Position in the stream: numbers only grow.
    pub seq: u64,
    /// The task's key, in hex.
    pub key: String,
    /// Its function.
    pub function: String,
    /// The worker that ran it (`0` for this process in a report).
    pub worker: u32,
    /// The thread on that worker.
    pub thread: u32,
    /// When it started, in milliseconds since the start.
    pub start_ms: f64,
    /// When it ended.
    pub end_ms: f64,
    /// How it ended.
    pub status: RecordStatus,
}

/// One update of the live stream (`GET /api/events`): the state now and
/// the task runs since the previous update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The state now.
    pub status: Snapshot,
    /// New task runs.
    pub tasks: Vec<TaskRecord>,
}

/// A performance report's data: the page draws it once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The state at the end of the report's span.
    pub status: Snapshot,
    /// Every task run in the span.
    pub tasks: Vec<TaskRecord>,
    /// A title for the page.
    pub title: String,
}

/// The placeholder in [`STATUS_PAGE`] that [`report_page`] fills.
const DATA_SLOT: &str = r#"<script id="rask-data" type="application/json">null</script>"#;

/// [`STATUS_PAGE`] with `report` embedded: a self-contained file that
/// draws the report with no server.
///
/// # Examples
///
/// ```
/// use rask_executor::diagnostics::{report_page, Counts, Report, Snapshot, SCHEMA_VERSION};
///
/// let status = Snapshot {
///     version: SCHEMA_VERSION, scheduler: "sync".into(), uptime_ms: 5, clients: 1,
///     tasks_per_second: 0.0, totals: Counts::default(), functions: vec![], workers: vec![],
///     unrunnable: vec![],
/// };
/// let page = report_page(&Report { status, tasks: vec![], title: "</script> & co".into() });
/// assert!(page.contains(r#""scheduler":"sync""#));
/// assert!(!page.contains("</script> & co"));   // cannot close the data element
/// ```
pub fn report_page(report: &Report) -> String {
    // `<` as `\u003c` inside JSON strings: the data can never close its
    // element or open a comment.
    let json = serde_json::to_string(report)
        .unwrap_or_else(|_| "null".to_owned())
        .replace('<', "\\u003c");
    let filled = format!(r#"<script id="rask-data" type="application/json">{json}</script>"#);
    STATUS_PAGE.replacen(DATA_SLOT, &filled, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_a_name_up_to_its_first_word_that_is_not_letters() {
        for (name, want) in [
            ("inc", "inc"),
            ("load-17", "load"),
            ("read-csv-3f2a", "read-csv"),
            ("sum-of-squares", "sum-of-squares"),
            ("x-deadbeef", "x"),
            ("x-abcdefgh", "x-abcdefgh"),
            ("chunk_17", "chunk_17"),
            ("größe-2", "größe"),
            ("a--b", "a"),
            ("-17", "-17"),
            ("", ""),
        ] {
            assert_eq!(group(name), want, "{name}");
        }
    }

    #[test]
    fn the_page_has_exactly_one_data_slot() {
        assert_eq!(STATUS_PAGE.matches(DATA_SLOT).count(), 1);
    }

    #[test]
    fn records_round_trip_in_the_documented_shape() {
        let record = TaskRecord {
            seq: 3,
            key: "ab".into(),
            function: "inc".into(),
            worker: 1,
            thread: 0,
            start_ms: 1.5,
            end_ms: 2.0,
            status: RecordStatus::Erred,
        };
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(
            text,
            r#"{"seq":3,"key":"ab","function":"inc","worker":1,"thread":0,"start_ms":1.5,"end_ms":2.0,"status":"erred"}"#
        );
        assert_eq!(serde_json::from_str::<TaskRecord>(&text).unwrap(), record);
        let bytes = postcard::to_allocvec(&record).unwrap();
        assert_eq!(postcard::from_bytes::<TaskRecord>(&bytes).unwrap(), record);
        let counts = FunctionCounts {
            name: "inc".into(),
            counts: Counts {
                done: 2,
                ..Counts::default()
            },
            busy_ms: 0.5,
        };
        let text = serde_json::to_string(&counts).unwrap();
        assert_eq!(
            text,
            r#"{"name":"inc","waiting":0,"processing":0,"memory":0,"erred":0,"done":2,"busy_ms":0.5}"#
        );
        assert_eq!(
            serde_json::from_str::<FunctionCounts>(&text).unwrap(),
            counts
        );
        let bytes = postcard::to_allocvec(&counts).unwrap();
        assert_eq!(
            postcard::from_bytes::<FunctionCounts>(&bytes).unwrap(),
            counts
        );
    }
}
