//! Performance reports (Dask's `performance_report`): every task event of a
//! block of code, written as one self-contained HTML page with the task
//! stream, per-function counts and durations, and how busy each worker's
//! threads were.
//!
//! A report records the events this process sees
//! (`rask_executor::events`): tasks of every executor in the process, and
//! on a cluster what its scheduler reports. Times are taken when an event
//! arrives here; a task's start is its end minus how long it ran, so a
//! cluster's task stream is exact in durations and within a message's trip
//! in placement.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rask_executor::diagnostics::{
    group, report_page, Counts, FunctionCounts, RecordStatus, Report, Snapshot, TaskRecord,
    WorkerRow, SCHEMA_VERSION,
};
use rask_executor::events::{self, Event, EventKind, Place};

use crate::{Error, Result};

/// Records events from its creation until [`Recorder::finish`].
pub(crate) struct Recorder {
    state: Arc<Mutex<Recording>>,
    _subscription: events::Subscription,
}

struct Recording {
    start: Instant,
    tasks: Vec<TaskRecord>,
    functions: Vec<FunctionCounts>,
    by_name: HashMap<String, usize>,
    /// Busy milliseconds and the highest thread index seen, per worker
    /// (`0` is this process).
    workers: HashMap<u32, (f64, u32)>,
}

impl Recording {
    /// The row of tasks named `name`: their group's, so tasks named one
    /// by one (`load-17`, `load-18`) share the row `load`.
    fn function(&mut self, name: &str) -> &mut FunctionCounts {
        let name = group(name);
        let i = match self.by_name.get(name) {
            Some(&i) => i,
            None => {
                self.functions.push(FunctionCounts {
                    name: name.to_owned(),
                    counts: Counts::default(),
                    busy_ms: 0.0,
                });
                self.by_name
                    .insert(name.to_owned(), self.functions.len() - 1);
                self.functions.len() - 1
            }
        };
        &mut self.functions[i]
    }

    fn record(&mut self, event: &Event<'_>, place: Place, ran_ms: f64, status: RecordStatus) {
        let end_ms = self.start.elapsed().as_secs_f64() * 1e3;
        let start_ms = (end_ms - ran_ms).max(0.0);
        let worker = place.worker.unwrap_or(0);
        let lane = self.workers.entry(worker).or_insert((0.0, 0));
        lane.0 += end_ms - start_ms;
        lane.1 = lane.1.max(place.thread);
        self.tasks.push(TaskRecord {
            seq: self.tasks.len() as u64,
            key: event.key.to_string(),
            function: event.name.to_owned(),
            worker,
            thread: place.thread,
            start_ms,
            end_ms,
            status,
        });
    }

    fn event(&mut self, event: &Event<'_>) {
        match event.kind {
            EventKind::Queued => self.function(event.name).counts.waiting += 1,
            EventKind::Started { .. } => {
                let counts = &mut self.function(event.name).counts;
                counts.waiting = counts.waiting.saturating_sub(1);
                counts.processing += 1;
            }
            EventKind::Finished {
                place, duration, ..
            } => {
                let ran_ms = duration.as_secs_f64() * 1e3;
                let function = self.function(event.name);
                function.counts.processing = function.counts.processing.saturating_sub(1);
                function.counts.done += 1;
                function.counts.memory += 1;
                function.busy_ms += ran_ms;
                self.record(event, place, ran_ms, RecordStatus::Memory);
            }
            EventKind::Erred { place, .. } => {
                let counts = &mut self.function(event.name).counts;
                match place {
                    Some(_) => counts.processing = counts.processing.saturating_sub(1),
                    None => counts.waiting = counts.waiting.saturating_sub(1),
                }
                counts.erred += 1;
                if let Some(place) = place {
                    self.record(event, place, 0.0, RecordStatus::Erred);
                }
            }
            EventKind::Released => {
                let counts = &mut self.function(event.name).counts;
                counts.memory = counts.memory.saturating_sub(1);
            }
            _ => {}
        }
    }

    fn report(&self, title: String, ran_on: String) -> Report {
        let span_ms = self.start.elapsed().as_secs_f64() * 1e3;
        let mut totals = Counts::default();
        for f in &self.functions {
            totals += f.counts;
        }
        let mut workers: Vec<WorkerRow> = self
            .workers
            .iter()
            .map(|(&id, &(busy_ms, top_thread))| {
                let threads = top_thread.saturating_add(1);
                WorkerRow {
                    id,
                    address: if id == 0 {
                        "this process".to_owned()
                    } else {
                        format!("worker {id}")
                    },
                    name: String::new(),
                    threads,
                    running: 0,
                    sent: 0,
                    memory_bytes: None,
                    data_bytes: 0,
                    keys: 0,
                    last_heartbeat_ms: 0,
                    utilisation: (span_ms > 0.0)
                        .then(|| (busy_ms / (span_ms * f64::from(threads))).min(1.0)),
                    spill: None,
                    resources: String::new(),
                    retiring: false,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        Report {
            status: Snapshot {
                version: SCHEMA_VERSION,
                scheduler: ran_on,
                uptime_ms: span_ms as u64,
                clients: 1,
                tasks_per_second: if span_ms > 0.0 {
                    totals.done as f64 / (span_ms / 1e3)
                } else {
                    0.0
                },
                totals,
                functions: self.functions.clone(),
                workers,
                unrunnable: Vec::new(),
            },
            tasks: self.tasks.clone(),
            title,
        }
    }
}

impl Recorder {
    pub(crate) fn start() -> Recorder {
        let state = Arc::new(Mutex::new(Recording {
            start: Instant::now(),
            tasks: Vec::new(),
            functions: Vec::new(),
            by_name: HashMap::new(),
            workers: HashMap::new(),
        }));
        let sink = state.clone();
        let subscription = events::subscribe(move |event: &Event<'_>| {
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .event(event);
        });
        Recorder {
            state,
            _subscription: subscription,
        }
    }

    /// Stops recording and writes the page to `path`.
    pub(crate) fn finish(self, path: &Path, ran_on: String) -> Result<()> {
        let Recorder {
            state,
            _subscription,
        } = self;
        drop(_subscription);
        let title = format!(
            "rask performance report: {}",
            path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            )
        );
        let report = state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report(title, ran_on);
        std::fs::write(path, report_page(&report)).map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rask_executor::Key;

    use super::*;

    fn recording() -> Recording {
        Recording {
            start: Instant::now(),
            tasks: Vec::new(),
            functions: Vec::new(),
            by_name: HashMap::new(),
            workers: HashMap::new(),
        }
    }

    #[test]
    fn tasks_named_one_by_one_count_in_their_groups_row() {
        let mut recording = recording();
        let names: Vec<String> = (0..500).map(|i| format!("load-{i}")).collect();
        let inc = "inc".to_owned();
        for (i, name) in names.iter().chain([&inc]).enumerate() {
            let key = Key([i as u8; 32]);
            let place = Place::local(0);
            for kind in [
                EventKind::Queued,
                EventKind::Started { place },
                EventKind::Finished {
                    place,
                    duration: Duration::from_millis(1),
                    nbytes: None,
                },
            ] {
                recording.event(&Event::new(key, name, kind));
            }
        }
        let report = recording.report("t".into(), "sync".into());
        let rows: Vec<(&str, u64)> = report
            .status
            .functions
            .iter()
            .map(|f| (f.name.as_str(), f.counts.done))
            .collect();
        assert_eq!(rows, [("load", 500), ("inc", 1)]);
        // The task stream still names each task.
        assert_eq!(report.tasks[17].function, "load-17");
        assert_eq!(report.tasks.len(), 501);
    }
}
