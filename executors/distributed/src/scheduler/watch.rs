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
//! 3. Work is counted by *group*, a task's name up to its first `-` that
//!    is not followed by a word of letters ([`group`], Dask's key
//!    prefix): `inc` is `inc`, tasks named one by one (`load-17`,
//!    `load-18`) count as `load`. At most [`MAX_GROUPS`] groups get rows
//!    of their own for the scheduler's life, and the work of any other counts as
//!    [`OTHER`]: what is kept, and the size of a snapshot, do not grow with
//!    the number of tasks however they are named.
//! 4. Builds never meet (scheduler rule 5): what is counted from the
//!    events is counted for every build (the dashboard's view) and for the
//!    event's own build, whose clients' `Info` sees that alone; a build's
//!    counts go with its partition.
//! 5. A task counts as done once however often it ran: a finished value
//!    lost with its holders (a `Lost` event; its task waits to run
//!    again) leaves the done count of its row, so done, waiting,
//!    processing and erred add up to the tasks at every moment.
//! 6. The rate is of the tasks finished in the [`RATE_WINDOW`] before the
//!    snapshot, over that window (over the time since the first finished,
//!    when shorter): it drops to 0 once work stops.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rask_executor::diagnostics::{
    group, Counts, FunctionCounts, RecordStatus, Snapshot, Spill, TaskRecord, WorkerRow,
    SCHEMA_VERSION,
};
use rask_executor::Key;

use super::state::{State, WorkerCensus};
use crate::dashboard::Board;
use crate::protocol::{WireEvent, WireEventKind, WorkerId};
use crate::BuildId;

/// How far back the rate of finished tasks looks.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The most groups with rows of their own (rule 3).
const MAX_GROUPS: usize = 1_000;

/// The row of work past [`MAX_GROUPS`] groups (rule 3).
const OTHER: &str = "(other groups)";

/// Counts the events cannot be scanned for (rule 2), and the board.
pub(super) struct History {
    started: Instant,
    board: Option<Arc<Board>>,
    /// Every build's counts: the dashboard's (rule 4).
    all: Tally,
    /// Each build's own: its clients' `Info` (rule 4).
    builds: HashMap<BuildId, Tally>,
}

/// What the events of some builds counted (rule 2).
#[derive(Default)]
struct Tally {
    /// Per function: finished, erred, milliseconds spent; and the order
    /// functions were first seen in.
    functions: crate::protocol::KeyMap<Arc<str>, (u64, u64, f64)>,
    order: Vec<Arc<str>>,
    /// Finished tasks per 100 ms bucket, newest last: trimmed as tasks
    /// finish, so a snapshot reads only those of its window (rule 6).
    recent: VecDeque<(Instant, u64)>,
    /// When the first task counted here finished: the rate of a start
    /// shorter than [`RATE_WINDOW`] is over that start alone.
    first: Option<Instant>,
}

/// What the shell knows of a worker that the state does not.
pub(super) struct WorkerShell {
    pub(super) name: String,
    pub(super) last_heard: Instant,
    pub(super) memory_bytes: Option<u64>,
    pub(super) spill: Option<Spill>,
}

impl Tally {
    /// The counts of the row a task named `name` counts in (rule 3).
    fn function(&mut self, name: &Arc<str>) -> &mut (u64, u64, f64) {
        let row = self.row(name);
        if !self.functions.contains_key(&row) {
            self.order.push(row.clone());
        }
        self.functions.entry(row).or_default()
    }

    /// The row a task named `name` counts in: its group's, or [`OTHER`]
    /// once [`MAX_GROUPS`] groups have rows (rule 3). The name itself when
    /// it is its group, so a call's name costs no allocation.
    fn row(&self, name: &Arc<str>) -> Arc<str> {
        let mut g = group(name);
        if !self.functions.contains_key(g) && self.functions.len() >= MAX_GROUPS {
            g = OTHER;
        }
        match self.functions.get_key_value(g) {
            Some((row, _)) => row.clone(),
            None if g.len() == name.len() => name.clone(),
            None => Arc::from(g),
        }
    }

    /// A run of `name` finished at `now` after `ran_ms`.
    fn finished(&mut self, name: &Arc<str>, ran_ms: f64, now: Instant) {
        let f = self.function(name);
        f.0 += 1;
        f.2 += ran_ms;
        self.first.get_or_insert(now);
        match self.recent.back_mut() {
            Some((at, n)) if now.duration_since(*at) < Duration::from_millis(100) => *n += 1,
            _ => self.recent.push_back((now, 1)),
        }
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// A finished value of `name` was lost (its holders gone, its task
    /// back to waiting): its run no longer counts as done (rule 5). Which
    /// run it was is not kept (rule 3), so the row's time loses an
    /// average run's, which keeps its time per task.
    fn lost(&mut self, name: &Arc<str>) {
        let row = self.row(name);
        if let Some(f) = self.functions.get_mut(&row) {
            if f.0 > 0 {
                f.2 -= f.2 / f.0 as f64;
                f.0 -= 1;
            }
        }
    }
}

impl History {
    pub(super) fn new(board: Option<Arc<Board>>) -> History {
        History {
            started: Instant::now(),
            board,
            all: Tally::default(),
            builds: HashMap::new(),
        }
    }

    /// Whether a dashboard runs.
    pub(super) fn board(&self) -> Option<&Arc<Board>> {
        self.board.as_ref()
    }

    /// Forgets what `build`'s events counted: its partition is gone
    /// (rule 4).
    pub(super) fn forget(&mut self, build: BuildId) {
        self.builds.remove(&build);
    }

    /// Counts `event` of `build`'s partition (rule 4) and puts a finished
    /// or failed run on the board.
    pub(super) fn record(&mut self, now: Instant, build: BuildId, event: &WireEvent) {
        match event.kind {
            WireEventKind::Finished {
                worker,
                thread,
                duration_ns,
                ..
            } => {
                let ran_ms = duration_ns as f64 / 1e6;
                self.all.finished(&event.name, ran_ms, now);
                let own = self.builds.entry(build).or_default();
                own.finished(&event.name, ran_ms, now);
                self.put(now, event, worker, thread, ran_ms, RecordStatus::Memory);
            }
            WireEventKind::Erred { worker } => {
                self.all.function(&event.name).1 += 1;
                self.builds
                    .entry(build)
                    .or_default()
                    .function(&event.name)
                    .1 += 1;
                if let Some(worker) = worker {
                    self.put(now, event, worker, 0, 0.0, RecordStatus::Erred);
                }
            }
            WireEventKind::Lost { .. } => {
                self.all.lost(&event.name);
                if let Some(own) = self.builds.get_mut(&build) {
                    own.lost(&event.name);
                }
            }
            _ => {}
        }
    }

    fn put(
        &self,
        now: Instant,
        event: &WireEvent,
        worker: WorkerId,
        thread: u32,
        ran_ms: f64,
        status: RecordStatus,
    ) {
        let Some(board) = &self.board else {
            return;
        };
        let end_ms = now.saturating_duration_since(self.started).as_secs_f64() * 1e3;
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

    /// The snapshot of `states` at `now` (every partition for the
    /// dashboard, with `build` `None`; the client's own for `Info`, counted
    /// from its own build's events, rule 4).
    pub(super) fn snapshot<'a>(
        &self,
        now: Instant,
        build: Option<BuildId>,
        scheduler: &str,
        clients: u32,
        states: impl Iterator<Item = &'a State>,
        shells: &HashMap<WorkerId, WorkerShell>,
    ) -> Snapshot {
        let empty = Tally::default();
        let tally = match build {
            None => &self.all,
            Some(build) => self.builds.get(&build).unwrap_or(&empty),
        };
        let mut live: HashMap<Arc<str>, Counts> = HashMap::new();
        let mut census: Vec<WorkerCensus> = Vec::new();
        let mut unrunnable = Vec::new();
        for state in states {
            state.census(&mut live, &mut census);
            state.unrunnable_lines(&mut unrunnable);
        }
        // Live tasks by row (rule 3): a group not seen finishing yet gets
        // a row while rows are left.
        let mut by_name: HashMap<Arc<str>, Counts> = HashMap::new();
        for (name, counts) in live {
            let mut row = group(&name);
            let known = tally.functions.contains_key(row) || by_name.contains_key(row);
            if !known && tally.functions.len() + by_name.len() >= MAX_GROUPS {
                row = OTHER;
            }
            let row: Arc<str> = match by_name.get_key_value(row) {
                Some((row, _)) => row.clone(),
                None => Arc::from(row),
            };
            *by_name.entry(row).or_default() += counts;
        }
        let mut names: Vec<Arc<str>> = tally
            .order
            .iter()
            .filter(|n| by_name.contains_key(*n) || tally.functions.contains_key(*n))
            .cloned()
            .collect();
        let mut unseen: Vec<Arc<str>> = by_name
            .keys()
            .filter(|n| !tally.functions.contains_key(*n))
            .cloned()
            .collect();
        unseen.sort();
        names.extend(unseen);
        let mut totals = Counts::default();
        let functions: Vec<FunctionCounts> = names
            .into_iter()
            .map(|name| {
                let mut counts = by_name.get(&name).copied().unwrap_or_default();
                let (done, erred, busy_ms) =
                    tally.functions.get(&name).copied().unwrap_or_default();
                counts.done = done.max(counts.memory);
                counts.erred = erred.max(counts.erred);
                totals += counts;
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
                    sent: w.sent,
                    memory_bytes: shell.and_then(|s| s.memory_bytes),
                    data_bytes: w.data_bytes,
                    keys: w.keys,
                    last_heartbeat_ms: shell.map_or(0, |s| {
                        u64::try_from(now.saturating_duration_since(s.last_heard).as_millis())
                            .unwrap_or(u64::MAX)
                    }),
                    utilisation: None,
                    spill: shell.and_then(|s| s.spill),
                    resources: w.resources,
                    retiring: w.retiring,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        // Rule 6: the buckets are trimmed only as tasks finish, so those
        // older than the window are skipped here; and the window is a
        // shorter one only while counting began less than one ago.
        let window = tally.first.map_or(RATE_WINDOW, |first| {
            now.saturating_duration_since(first)
                .clamp(Duration::from_millis(100), RATE_WINDOW)
        });
        let finished: u64 = tally
            .recent
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        Snapshot {
            version: SCHEMA_VERSION,
            scheduler: scheduler.to_owned(),
            uptime_ms: u64::try_from(now.saturating_duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX),
            clients,
            tasks_per_second: finished as f64 / window.as_secs_f64(),
            totals,
            functions,
            workers,
            unrunnable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{TaskSpec, ToClient, ToWorker};
    use crate::scheduler::state::{ClientId, Finished, Outbox, Reporter};

    /// An outbox that drops what it is given.
    struct Discard;

    impl Outbox for Discard {
        fn to_worker(&mut self, _: WorkerId, _: ToWorker) {}
        fn to_client(&mut self, _: ClientId, _: ToClient) {}
    }

    fn finished(n: u64, name: &str) -> WireEvent {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&n.to_le_bytes());
        WireEvent {
            key,
            name: Arc::from(name),
            kind: WireEventKind::Finished {
                worker: WorkerId(0),
                thread: 0,
                duration_ns: 1_000_000,
                nbytes: 8,
            },
        }
    }

    /// A state of one worker holding `names.len()` tasks (one per name)
    /// wanted by one client: one processing, the rest queued.
    fn live(names: &[String]) -> State {
        let mut s = State::new();
        let mut out = Discard;
        s.on_worker_registered(WorkerId(0), "127.0.0.1:1000".into(), 1, &mut out);
        s.on_client_connected(ClientId(0), &mut out);
        let specs: Vec<TaskSpec> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut key = [1u8; 32];
                key[..8].copy_from_slice(&(i as u64).to_le_bytes());
                spec(key, name)
            })
            .collect();
        let wanted = specs.iter().map(|t| t.key).collect();
        s.on_update_graph(ClientId(0), specs, wanted, &mut out);
        s
    }

    /// A task `name` of key `key`, with no inputs.
    fn spec(key: [u8; 32], name: &str) -> TaskSpec {
        TaskSpec {
            key,
            name: name.into(),
            function: "f".into(),
            payload: Arc::from(&[0u8][..]),
            deps: Vec::new(),
            timeout_ms: None,
            retries: 0,
            annotations: Default::default(),
        }
    }

    /// An outbox that watches: it keeps the task events and the runs sent.
    #[derive(Default)]
    struct Watcher {
        events: Vec<WireEvent>,
        runs: Vec<(WorkerId, [u8; 32], u64)>,
    }

    impl Outbox for Watcher {
        fn to_worker(&mut self, worker: WorkerId, msg: ToWorker) {
            if let ToWorker::Compute { key, run, .. } = msg {
                self.runs.push((worker, key, run));
            }
        }
        fn to_client(&mut self, _: ClientId, _: ToClient) {}
        fn watching(&self) -> bool {
            true
        }
        fn task_event(&mut self, event: WireEvent) {
            self.events.push(event);
        }
    }

    impl Watcher {
        /// Counts the events so far in `history`.
        fn record(&mut self, history: &mut History) {
            for event in self.events.drain(..) {
                history.record(Instant::now(), BuildId::NONE, &event);
            }
        }
    }

    /// Every task counts in exactly one state: done (memory included),
    /// waiting, processing or erred.
    fn accounted(snapshot: &Snapshot) -> u64 {
        let c = snapshot.totals;
        c.done + c.waiting + c.processing + c.erred
    }

    /// A state of one worker `W0` and one client wanting one task `inc`,
    /// sent to `W0`.
    fn one_task(out: &mut Watcher) -> State {
        let mut s = State::new();
        s.on_worker_registered(WorkerId(0), "127.0.0.1:1000".into(), 1, out);
        s.on_client_connected(ClientId(0), out);
        s.on_update_graph(ClientId(0), vec![spec([7; 32], "inc")], vec![[7; 32]], out);
        s
    }

    /// `worker` finishes the run it was sent, after 4 ms.
    fn finish(s: &mut State, out: &mut Watcher, worker: WorkerId) {
        let at = out.runs.iter().position(|&(w, _, _)| w == worker).unwrap();
        let (_, key, run) = out.runs.remove(at);
        let report = Finished {
            nbytes: 8,
            duration_ns: 4_000_000,
            value: None,
            thread: 0,
        };
        s.on_task_finished(worker, key, run, report, out);
    }

    /// What `h` shows now of the one build `s`.
    fn snapshot(h: &History, s: &State) -> Snapshot {
        h.snapshot(
            Instant::now(),
            None,
            "test",
            1,
            std::iter::once(s),
            &HashMap::new(),
        )
    }

    /// A value lost with its worker and computed again is one task done
    /// once: the lost run leaves the row's counts (and its time with it).
    #[test]
    fn work_lost_with_a_worker_and_run_again_counts_once() {
        let mut out = Watcher::default();
        let mut s = one_task(&mut out);
        let mut history = History::new(None);
        finish(&mut s, &mut out, WorkerId(0));
        out.record(&mut history);
        assert_eq!(accounted(&snapshot(&history, &s)), 1);

        s.on_worker_lost(WorkerId(0), &mut out);
        out.record(&mut history);
        let after_death = snapshot(&history, &s);
        assert_eq!(after_death.totals.done, 0, "the lost value is not done");
        assert_eq!(accounted(&after_death), 1);

        s.on_worker_registered(WorkerId(1), "127.0.0.1:1001".into(), 1, &mut out);
        finish(&mut s, &mut out, WorkerId(1));
        out.record(&mut history);
        let after_rerun = snapshot(&history, &s);
        assert_eq!(after_rerun.totals.done, 1);
        assert_eq!(after_rerun.totals.memory, 1);
        assert_eq!(accounted(&after_rerun), 1);
        assert_eq!(after_rerun.functions[0].busy_ms, 4.0, "4 ms each");
    }

    fn rows(snapshot: &Snapshot) -> Vec<(&str, u64, u64)> {
        snapshot
            .functions
            .iter()
            .map(|f| {
                let live = f.counts.waiting + f.counts.processing;
                (f.name.as_str(), f.counts.done, live)
            })
            .collect()
    }

    /// A value its only holder says it lacks, computed again, is one task
    /// done once too (rule 5).
    #[test]
    fn work_its_holder_lost_and_ran_again_counts_once() {
        let mut out = Watcher::default();
        let mut s = one_task(&mut out);
        let mut history = History::new(None);
        finish(&mut s, &mut out, WorkerId(0));
        s.on_fetch_failed(
            Reporter::Worker(WorkerId(0)),
            [7; 32],
            WorkerId(0),
            &mut out,
        );
        out.record(&mut history);
        let lost = snapshot(&history, &s);
        assert_eq!(lost.totals.done, 0, "the lost value is not done");
        assert_eq!(accounted(&lost), 1);
        finish(&mut s, &mut out, WorkerId(0));
        out.record(&mut history);
        let again = snapshot(&history, &s);
        assert_eq!((again.totals.done, again.totals.memory), (1, 1));
        assert_eq!(accounted(&again), 1);
    }

    /// The rate covers the last [`RATE_WINDOW`] at the snapshot's `now`:
    /// a burst long past counts for nothing, and a start shorter than the
    /// window is divided by its own length.
    #[test]
    fn the_rate_counts_the_last_window_only_and_drops_to_zero_when_idle() {
        let mut history = History::new(None);
        let t0 = history.started;
        let none = HashMap::new();
        for i in 0..100 {
            history.record(t0, BuildId::NONE, &finished(i, "inc"));
        }
        let rate = |h: &History, at: Duration| {
            h.snapshot(t0 + at, None, "test", 1, std::iter::empty(), &none)
                .tasks_per_second
        };
        assert_eq!(rate(&history, Duration::from_secs(1)), 100.0, "1 s of work");
        assert_eq!(rate(&history, Duration::from_millis(6_500)), 0.0, "idle");
        // Work again: only what finished in the last window counts, over
        // the whole window.
        let t1 = t0 + Duration::from_secs(20);
        for i in 100..110 {
            history.record(t1, BuildId::NONE, &finished(i, "inc"));
        }
        assert_eq!(rate(&history, Duration::from_secs(21)), 2.0);
        assert_eq!(rate(&history, Duration::from_secs(30)), 0.0);
        assert_eq!(
            history
                .snapshot(t1, None, "test", 1, std::iter::empty(), &none)
                .totals
                .done,
            110
        );
    }

    /// Rule 4: a build's `Info` counts its own build's events only; the
    /// dashboard counts every build's; a build's counts go with it.
    #[test]
    fn each_build_sees_its_own_counts_and_the_dashboard_all() {
        let (a, b) = (BuildId::from_bytes([1; 32]), BuildId::from_bytes([2; 32]));
        let mut history = History::new(None);
        history.record(Instant::now(), a, &finished(1, "load"));
        history.record(Instant::now(), a, &finished(2, "load"));
        history.record(Instant::now(), b, &finished(3, "secret"));
        let none = HashMap::new();
        let of =
            |build| history.snapshot(Instant::now(), build, "test", 1, std::iter::empty(), &none);
        assert_eq!(rows(&of(Some(a))), [("load", 2, 0)]);
        assert_eq!(rows(&of(Some(b))), [("secret", 1, 0)]);
        assert_eq!(rows(&of(None)), [("load", 2, 0), ("secret", 1, 0)]);
        assert_eq!(of(Some(a)).totals.done, 2);
        history.forget(a);
        let of =
            |build| history.snapshot(Instant::now(), build, "test", 1, std::iter::empty(), &none);
        assert!(rows(&of(Some(a))).is_empty());
        assert_eq!(rows(&of(None)).len(), 2, "the dashboard keeps what it saw");
    }

    #[test]
    fn tasks_named_one_by_one_count_in_one_row() {
        let mut history = History::new(None);
        for i in 0..50_000 {
            history.record(
                Instant::now(),
                BuildId::NONE,
                &finished(i, &format!("item-{i}")),
            );
        }
        history.record(Instant::now(), BuildId::NONE, &finished(50_000, "inc"));
        let names: Vec<String> = (0..30).map(|i| format!("item-{}", 60_000 + i)).collect();
        let state = live(&names);
        let snapshot = snapshot(&history, &state);
        assert_eq!(rows(&snapshot), [("item", 50_000, 30), ("inc", 1, 0)]);
        assert_eq!(snapshot.totals.done, 50_001);
    }

    #[test]
    fn past_the_most_groups_work_counts_as_other_and_none_is_lost() {
        let mut history = History::new(None);
        let n = MAX_GROUPS as u64 + 500;
        for i in 0..n {
            history.record(
                Instant::now(),
                BuildId::NONE,
                &finished(i, &format!("g{i}")),
            );
        }
        // Live work of groups seen finishing, and of groups never seen.
        let names: Vec<String> = ["g3", "g4", "new0", "new1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let state = live(&names);
        let snapshot = snapshot(&history, &state);
        let rows = rows(&snapshot);
        assert_eq!(rows.len(), MAX_GROUPS + 1, "every group kept, and one more");
        assert_eq!(rows.last(), Some(&(OTHER, 500, 2)));
        assert_eq!(rows[3], ("g3", 1, 1));
        assert_eq!(snapshot.totals.done, n);
        assert_eq!(snapshot.totals.waiting + snapshot.totals.processing, 4);
        // What is kept stays bounded however many more names come.
        for i in n..n + 10_000 {
            history.record(
                Instant::now(),
                BuildId::NONE,
                &finished(i, &format!("h{i}")),
            );
        }
        assert_eq!(history.all.functions.len(), MAX_GROUPS + 1);
        assert_eq!(history.all.order.len(), MAX_GROUPS + 1);
    }
}
