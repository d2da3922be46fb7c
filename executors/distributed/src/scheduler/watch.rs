//! What the scheduler tells those who watch it: the dashboard's board, the
//! clients that asked for task events, and `Info` answers.
//!
//! Rules:
//!
//! 1. Task events are built only while someone watches (a dashboard runs,
//!    or a client of the build asked with `Watch`): otherwise the state
//!    machine builds none, and this module costs nothing.
//! 2. Counts of tasks per state come from a scan of the state when asked
//!    (a few times a second at most); what a scan cannot see — tasks done
//!    and erred since the start, time spent per function, the rate — is
//!    counted here from the events, so it covers the time something
//!    watched.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rask_executor::diagnostics::{
    Counts, FunctionCounts, RecordStatus, Snapshot, Spill, TaskRecord, WorkerRow, SCHEMA_VERSION,
};
use rask_executor::Key;

use super::state::{State, WorkerCensus};
use crate::dashboard::Board;
use crate::protocol::{WireEvent, WireEventKind, WorkerId};

/// How far back the rate of finished tasks looks.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Counts the events cannot be scanned for (rule 2), and the board.
pub(super) struct History {
    started: Instant,
    board: Option<Arc<Board>>,
    /// Per function: finished, erred, milliseconds spent; and the order
    /// functions were first seen in.
    functions: crate::protocol::KeyMap<Arc<str>, (u64, u64, f64)>,
    order: Vec<Arc<str>>,
    /// Finished tasks per 100 ms bucket, newest last.
    recent: VecDeque<(Instant, u64)>,
}

/// What the shell knows of a worker that the state does not.
pub(super) struct WorkerShell {
    pub(super) name: String,
    pub(super) last_heard: Instant,
    pub(super) memory_bytes: Option<u64>,
    pub(super) spill: Option<Spill>,
}

impl History {
    pub(super) fn new(board: Option<Arc<Board>>) -> History {
        History {
            started: Instant::now(),
            board,
            functions: Default::default(),
            order: Vec::new(),
            recent: VecDeque::new(),
        }
    }

    /// Whether a dashboard runs.
    pub(super) fn board(&self) -> Option<&Arc<Board>> {
        self.board.as_ref()
    }

    fn function(&mut self, name: &Arc<str>) -> &mut (u64, u64, f64) {
        if !self.functions.contains_key(name) {
            self.order.push(name.clone());
        }
        self.functions.entry(name.clone()).or_default()
    }

    /// Counts `event` and puts a finished or failed run on the board.
    pub(super) fn record(&mut self, event: &WireEvent) {
        let now = Instant::now();
        match event.kind {
            WireEventKind::Finished {
                worker,
                thread,
                duration_ns,
                ..
            } => {
                let ran_ms = duration_ns as f64 / 1e6;
                let f = self.function(&event.name);
                f.0 += 1;
                f.2 += ran_ms;
                match self.recent.back_mut() {
                    Some((at, n)) if now.duration_since(*at) < Duration::from_millis(100) => {
                        *n += 1
                    }
                    _ => self.recent.push_back((now, 1)),
                }
                while self
                    .recent
                    .front()
                    .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
                {
                    self.recent.pop_front();
                }
                self.put(event, worker, thread, ran_ms, RecordStatus::Memory);
            }
            WireEventKind::Erred { worker } => {
                self.function(&event.name).1 += 1;
                if let Some(worker) = worker {
                    self.put(event, worker, 0, 0.0, RecordStatus::Erred);
                }
            }
            _ => {}
        }
    }

    fn put(
        &self,
        event: &WireEvent,
        worker: WorkerId,
        thread: u32,
        ran_ms: f64,
        status: RecordStatus,
    ) {
        let Some(board) = &self.board else {
            return;
        };
        let end_ms = self.started.elapsed().as_secs_f64() * 1e3;
        board.record(TaskRecord {
            seq: 0,
            key: Key(event.key).to_string(),
            function: event.name.to_string(),
            worker: worker.0,
            thread,
            start_ms: (end_ms - ran_ms).max(0.0),
            end_ms,
            status,
        });
    }

    /// The snapshot of `states` (every partition for the dashboard, the
    /// client's own for `Info`).
    pub(super) fn snapshot<'a>(
        &self,
        scheduler: &str,
        clients: u32,
        states: impl Iterator<Item = &'a State>,
        shells: &HashMap<WorkerId, WorkerShell>,
    ) -> Snapshot {
        let mut by_name: HashMap<Arc<str>, Counts> = HashMap::new();
        let mut census: Vec<WorkerCensus> = Vec::new();
        let mut unrunnable = Vec::new();
        for state in states {
            state.census(&mut by_name, &mut census);
            state.unrunnable_lines(&mut unrunnable);
        }
        let mut names: Vec<Arc<str>> = self
            .order
            .iter()
            .filter(|n| by_name.contains_key(*n) || self.functions.contains_key(*n))
            .cloned()
            .collect();
        let mut unseen: Vec<Arc<str>> = by_name
            .keys()
            .filter(|n| !self.functions.contains_key(*n))
            .cloned()
            .collect();
        unseen.sort();
        names.extend(unseen);
        let mut totals = Counts::default();
        let functions: Vec<FunctionCounts> = names
            .into_iter()
            .map(|name| {
                let mut counts = by_name.get(&name).copied().unwrap_or_default();
                let (done, erred, busy_ms) = self.functions.get(&name).copied().unwrap_or_default();
                counts.done = done.max(counts.memory);
                counts.erred = erred.max(counts.erred);
                totals.waiting += counts.waiting;
                totals.processing += counts.processing;
                totals.memory += counts.memory;
                totals.erred += counts.erred;
                totals.done += counts.done;
                FunctionCounts {
                    name: name.to_string(),
                    counts,
                    busy_ms,
                }
            })
            .collect();
        let mut workers: Vec<WorkerRow> = census
            .into_iter()
            .map(|w| {
                let shell = shells.get(&w.id);
                WorkerRow {
                    id: w.id.0,
                    address: w.address,
                    name: shell.map_or_else(String::new, |s| s.name.clone()),
                    threads: w.threads,
                    running: w.running,
                    memory_bytes: shell.and_then(|s| s.memory_bytes),
                    data_bytes: w.data_bytes,
                    keys: w.keys,
                    last_heartbeat_ms: shell.map_or(0, |s| {
                        u64::try_from(s.last_heard.elapsed().as_millis()).unwrap_or(u64::MAX)
                    }),
                    utilisation: None,
                    spill: shell.and_then(|s| s.spill),
                    resources: w.resources,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        let window = self.recent.front().map_or(RATE_WINDOW, |(at, _)| {
            at.elapsed().clamp(Duration::from_millis(100), RATE_WINDOW)
        });
        let finished: u64 = self.recent.iter().map(|(_, n)| n).sum();
        Snapshot {
            version: SCHEMA_VERSION,
            scheduler: scheduler.to_owned(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            clients,
            tasks_per_second: finished as f64 / window.as_secs_f64(),
            totals,
            functions,
            workers,
            unrunnable,
        }
    }
}
