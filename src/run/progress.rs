//! The progress-bar engine (Dask's `progress` and `ProgressBar`): a
//! consumer of the executors' task events (`rask_executor::events`). A
//! [`Bar`] serves `compute` and `persist`; the futures layer's
//! [`progress`](crate::progress()) watches futures with a [`Progress`].
//!
//! Rules:
//!
//! 1. A bar tracks a fixed set of tasks, known when it starts: a plan's
//!    tasks for `compute` and `persist`, the tasks behind the futures given
//!    to [`progress`](crate::progress()). A task counts once, when it
//!    finishes or errs in a run the bar watches: `compute`'s plan, or the
//!    plans computing the futures (events rule 4). Events about other
//!    tasks are ignored, and so are those naming another plan: a key
//!    cancelled while it ran and submitted again is run twice, and the
//!    cancelled run's end is not the watched run's (it counted as an
//!    error of a run that succeeded). What a cluster reports names no
//!    plan and counts by key: its scheduler runs a key once at a time.
//! 2. A bar is done when the work it watches is over — `compute`
//!    returned, every future finished, failed or was cancelled — whatever
//!    events arrived. Tasks it never heard of count as done then only if
//!    that work succeeded (`compute` returned its values, every future
//!    finished): they were folded into a fused task or ended before it
//!    started listening, and the bar reads 100 %. Otherwise they count as
//!    not run (a run stops at its first failure, a cancelled future's work
//!    is dropped) unless known to have run — for futures, the work of a
//!    watched future that finished, or a finished future itself — and the
//!    bar stays short of 100 %: work that did not run is never shown as
//!    done. A task already running when the bar started reports how it
//!    ended all the same (events rule 2), so a task of a failed future's
//!    work that succeeded then counts as done.
//! 3. Output goes to stderr only, on one line redrawn in place, so a
//!    program's own lines are never erased. When stderr is not a terminal,
//!    nothing is drawn and one plain line is printed at the end.
//! 4. [`Progress::wait`] runs the work it waits for where nothing else
//!    would: a simulated client's watched futures run only when someone
//!    waits, so `wait` steps that client (its `drive`) before it sleeps.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rask_executor::events::{self, Event, EventKind, Subscription};
use rask_executor::{Key, PlanId};

/// Where a progress display stands, for one function (see
/// [`Progress::counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FunctionProgress {
    /// The function's name, e.g. `inc`.
    pub name: String,
    /// Tasks of this function being watched.
    pub total: u64,
    /// Of those, finished successfully.
    pub done: u64,
    /// Of those, failed or not run because an input failed.
    pub erred: u64,
    /// Of those, never run: the watched work failed or was cancelled
    /// before they ran (rule 2 of the progress display).
    pub not_run: u64,
}

/// A progress display drawing on stderr until the work it watches is done;
/// returned by [`progress`](crate::progress()). Dropping it does not stop it.
#[derive(Clone)]
pub struct Progress {
    tracker: Arc<Tracker>,
    /// Runs the watched work until the given test holds or nothing is
    /// left to run, where nothing runs unless someone waits (rule 4).
    drive: Option<Drive>,
}

/// How [`Progress::wait`] runs the watched work of simulated clients.
pub(crate) type Drive = Arc<dyn Fn(&dyn Fn() -> bool) + Send + Sync>;

/// The plans whose runs a display watches (rule 1): known when it starts,
/// or added once the run of a graph it counted is planned.
#[derive(Default)]
pub(crate) struct Plans(Mutex<HashSet<PlanId>>);

impl Plans {
    /// The display watches the run of `plan` too.
    pub(crate) fn add(&self, plan: PlanId) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(plan);
    }

    /// Whether an event naming `plan` is about a watched run: one naming
    /// no plan counts by key (rule 1).
    fn watches(&self, plan: Option<PlanId>) -> bool {
        plan.is_none_or(|plan| {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&plan)
        })
    }
}

/// Whether a task the display never heard of is known to have run
/// successfully, asked when the watched work did not all succeed (rule 2).
pub(crate) type Ran = Arc<dyn Fn(Key) -> bool + Send + Sync>;

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("counts", &self.counts())
            .field("done", &self.done())
            .finish()
    }
}

impl Progress {
    /// Blocks until the watched work is done and the bar drew its last state.
    /// Runs the work of a simulated client meanwhile, which runs only while
    /// someone waits (rule 4).
    pub fn wait(&self) {
        if let Some(drive) = &self.drive {
            drive(&|| self.done());
        }
        let mut state = self.tracker.lock();
        while !state.finished {
            state = self
                .tracker
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether the watched work is done.
    pub fn done(&self) -> bool {
        self.tracker.lock().finished
    }

    /// Counts per function, in the order the functions were first seen.
    pub fn counts(&self) -> Vec<FunctionProgress> {
        self.tracker.lock().counts()
    }
}

impl Progress {
    /// A display of the tasks `collect` lists (key and name each), in the
    /// runs it adds to the [`Plans`] it is given (rule 1), that is done
    /// once [`future_done`](Progress::future_done) was called `futures`
    /// times (rule 2): at once when `futures` is 0.
    ///
    /// Outcomes are heard from before `collect` runs: a task it lists that
    /// ends before the display subscribed still counts as it ended, not as
    /// done by rule 2 (an erred task counted done would be a wrong count).
    pub(crate) fn watching(
        collect: impl FnOnce(&Arc<Plans>) -> Vec<(Key, String)>,
        futures: usize,
        drive: Option<Drive>,
        ran: Ran,
    ) -> Progress {
        type Heard = Vec<(Key, Option<PlanId>, bool)>;
        let early: Arc<Mutex<Heard>> = Arc::default();
        let heard = early.clone();
        let listening = events::subscribe(move |event: &Event<'_>| {
            if let Some(ok) = outcome(event) {
                heard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((event.key, event.plan, ok));
            }
        });
        let plans = Arc::new(Plans::default());
        let tracker = Tracker::start(collect(&plans), plans);
        // The tracker listens now: what was heard before counts once
        // (`record` takes each key off `pending` once), if it is about a
        // watched run, known now that `collect` ran.
        drop(listening);
        let early = std::mem::take(&mut *early.lock().unwrap_or_else(PoisonError::into_inner));
        for (key, plan, ok) in early {
            if tracker.plans.watches(plan) {
                tracker.record(key, ok);
            }
        }
        {
            let mut state = tracker.lock();
            state.futures = futures;
            state.ran = Some(ran);
        }
        if futures == 0 {
            tracker.finish(true);
        }
        Progress { tracker, drive }
    }

    /// One of the watched futures is done: finished (`ok`), or failed or
    /// cancelled.
    pub(crate) fn future_done(&self, ok: bool) {
        self.tracker.future_done(ok);
    }
}

/// A bar for one `compute` or `persist` of `tasks` (key and name of each
/// task of the plan `plan`, rule 1); finished when dropped ([`Tracker::finish`]), as
/// succeeded only if [`succeeded`](Bar::succeeded) was called.
pub(crate) struct Bar {
    tracker: Arc<Tracker>,
    ok: bool,
}

impl Bar {
    pub(crate) fn start<'a>(plan: PlanId, tasks: impl IntoIterator<Item = (Key, &'a str)>) -> Bar {
        let plans = Plans::default();
        plans.add(plan);
        Bar {
            tracker: Tracker::start(
                tasks.into_iter().map(|(k, n)| (k, n.to_owned())).collect(),
                Arc::new(plans),
            ),
            ok: false,
        }
    }

    /// The run returned its values: tasks not heard of ran (rule 2).
    pub(crate) fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl Drop for Bar {
    /// The work is over, however it ended (rule 2): an early return or a
    /// panic is a run that did not succeed.
    fn drop(&mut self) {
        self.tracker.finish(self.ok);
    }
}

/// One function's row.
struct Function {
    name: String,
    total: u64,
    done: u64,
    erred: u64,
    not_run: u64,
}

struct Tracker {
    state: Mutex<TrackerState>,
    changed: Condvar,
    bar: ProgressBar,
    /// Whether stderr is a terminal: bars drawn, else one line at the end.
    terminal: bool,
    /// The runs whose events count (rule 1).
    plans: Arc<Plans>,
    started: Instant,
}

struct TrackerState {
    /// Tasks not yet finished: key to index in `functions`.
    pending: HashMap<Key, usize>,
    functions: Vec<Function>,
    /// Watched futures not yet done.
    futures: usize,
    /// Whether a watched future failed or was cancelled (rule 2).
    failed: bool,
    /// Asked about each task not heard of when the work did not succeed.
    ran: Option<Ran>,
    finished: bool,
    /// When the per-function message was last redrawn.
    message_at: Option<Instant>,
    subscription: Option<Subscription>,
}

impl TrackerState {
    fn counts(&self) -> Vec<FunctionProgress> {
        self.functions
            .iter()
            .map(|f| FunctionProgress {
                name: f.name.clone(),
                total: f.total,
                done: f.done,
                erred: f.erred,
                not_run: f.not_run,
            })
            .collect()
    }

    /// `inc 40/100 · add 12/100 · 2 erred · 46 not run`, or empty for one
    /// function and no error (the bar says it all).
    fn message(&self) -> String {
        let erred: u64 = self.functions.iter().map(|f| f.erred).sum();
        let not_run: u64 = self.functions.iter().map(|f| f.not_run).sum();
        let mut parts: Vec<String> = Vec::new();
        if self.functions.len() > 1 {
            parts.extend(
                self.functions
                    .iter()
                    .map(|f| format!("{} {}/{}", f.name, f.done + f.erred, f.total)),
            );
        }
        if erred > 0 {
            parts.push(format!("{erred} erred"));
        }
        if not_run > 0 {
            parts.push(format!("{not_run} not run"));
        }
        parts.join(" · ")
    }
}

/// Whether `event` says a task ended well (`Some(true)`) or failed.
fn outcome(event: &Event<'_>) -> Option<bool> {
    match event.kind {
        EventKind::Finished { .. } => Some(true),
        EventKind::Erred { .. } => Some(false),
        _ => None,
    }
}

/// How often the per-function text is rebuilt: the bar's numbers are
/// drawn at most this often anyway.
const MESSAGE_EVERY: Duration = Duration::from_millis(100);

impl Tracker {
    fn start(tasks: Vec<(Key, String)>, plans: Arc<Plans>) -> Arc<Tracker> {
        let mut functions: Vec<Function> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut pending = HashMap::with_capacity(tasks.len());
        for (key, name) in tasks {
            if pending.contains_key(&key) {
                continue;
            }
            let i = *index.entry(name.clone()).or_insert_with(|| {
                functions.push(Function {
                    name,
                    total: 0,
                    done: 0,
                    erred: 0,
                    not_run: 0,
                });
                functions.len() - 1
            });
            functions[i].total += 1;
            pending.insert(key, i);
        }
        let terminal = std::io::stderr().is_terminal();
        let total = pending.len() as u64;
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if terminal {
                ProgressDrawTarget::stderr_with_hz(10)
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        let prefix = match functions.as_slice() {
            [only] => only.name.clone(),
            _ => "tasks".to_owned(),
        };
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:.bold} [{bar:25}] {pos}/{len} {rate} eta {eta} {wide_msg}",
        ) {
            let style = style.progress_chars("=> ").with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            );
            bar.set_style(style);
        }
        bar.set_prefix(prefix);
        let tracker = Arc::new(Tracker {
            state: Mutex::new(TrackerState {
                pending,
                functions,
                futures: 0,
                failed: false,
                ran: None,
                finished: false,
                message_at: None,
                subscription: None,
            }),
            changed: Condvar::new(),
            bar,
            terminal,
            plans,
            started: Instant::now(),
        });
        if terminal {
            tracker.bar.enable_steady_tick(Duration::from_millis(250));
        }
        let weak = Arc::downgrade(&tracker);
        let subscription = events::subscribe(move |event: &Event<'_>| {
            if let Some(tracker) = weak.upgrade() {
                tracker.event(event);
            }
        });
        tracker.lock().subscription = Some(subscription);
        tracker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn event(&self, event: &Event<'_>) {
        if let Some(ok) = outcome(event) {
            if self.plans.watches(event.plan) {
                self.record(event.key, ok);
            }
        }
    }

    /// Task `key` ended, well (`ok`) or not: counted once, if watched.
    fn record(&self, key: Key, ok: bool) {
        let mut state = self.lock();
        if state.finished {
            return;
        }
        let Some(i) = state.pending.remove(&key) else {
            return;
        };
        let function = &mut state.functions[i];
        if ok {
            function.done += 1;
        } else {
            function.erred += 1;
        }
        let redraw = state
            .message_at
            .is_none_or(|at| at.elapsed() >= MESSAGE_EVERY);
        if redraw && self.terminal {
            state.message_at = Some(Instant::now());
            self.bar.set_message(state.message());
        }
        drop(state);
        self.bar.inc(1);
    }

    fn future_done(&self, ok: bool) {
        let last = {
            let mut state = self.lock();
            state.failed |= !ok;
            state.futures = state.futures.saturating_sub(1);
            state.futures == 0
        };
        if last {
            let ok = !self.lock().failed;
            self.finish(ok);
        }
    }

    /// The work is over, successfully (`ok`) or not: everything not heard
    /// of counts as done if it was, else as not run (rule 2); the bar draws
    /// its last state, or the plain line is printed.
    fn finish(&self, ok: bool) {
        let subscription = {
            let mut state = self.lock();
            if state.finished {
                return;
            }
            state.finished = true;
            let pending = std::mem::take(&mut state.pending);
            let ran = state.ran.take().filter(|_| !ok);
            if let Some(ran) = ran {
                // Asked without this lock: `ran` may take a client's.
                drop(state);
                let ran: Vec<(usize, bool)> =
                    pending.into_iter().map(|(key, i)| (i, ran(key))).collect();
                state = self.lock();
                for (i, ran) in ran {
                    let function = &mut state.functions[i];
                    if ran {
                        function.done += 1;
                    } else {
                        function.not_run += 1;
                    }
                }
            } else {
                for i in pending.into_values() {
                    let function = &mut state.functions[i];
                    if ok {
                        function.done += 1;
                    } else {
                        function.not_run += 1;
                    }
                }
            }
            let message = state.message();
            let total: u64 = state.functions.iter().map(|f| f.total).sum();
            let not_run: u64 = state.functions.iter().map(|f| f.not_run).sum();
            self.bar.set_position(total - not_run);
            if self.terminal {
                self.bar.set_message(message);
                if not_run == 0 {
                    self.bar.finish();
                } else {
                    // Left where it stands: `finish` would draw it full.
                    self.bar.abandon();
                }
            } else if total > 0 {
                let line = summary(&state.functions, self.started.elapsed());
                // One write: the line stays whole beside other output.
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
            self.changed.notify_all();
            state.subscription.take()
        };
        drop(subscription);
    }
}

/// The plain line printed at the end when stderr is not a terminal:
/// `rask: 50 tasks done in 1.2 s`, or `rask: 1 of 50 tasks done in 0.0 s,
/// 1 erred, 49 not run` when some never ran (a done task here is one that
/// ran, erred or not).
fn summary(functions: &[Function], elapsed: Duration) -> String {
    let total: u64 = functions.iter().map(|f| f.total).sum();
    let erred: u64 = functions.iter().map(|f| f.erred).sum();
    let not_run: u64 = functions.iter().map(|f| f.not_run).sum();
    let ran = if not_run > 0 {
        format!("{} of ", total - not_run)
    } else {
        String::new()
    };
    let mut line = format!(
        "rask: {ran}{total} task{} done in {:.1} s",
        if total == 1 { "" } else { "s" },
        elapsed.as_secs_f64()
    );
    if functions.len() > 1 {
        let parts: Vec<String> = functions
            .iter()
            .map(|f| format!("{} {}", f.name, f.total))
            .collect();
        line.push_str(&format!(" ({})", parts.join(", ")));
    }
    if erred > 0 {
        line.push_str(&format!(", {erred} erred"));
    }
    if not_run > 0 {
        line.push_str(&format!(", {not_run} not run"));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_line_names_functions_and_errors() {
        let f = |name: &str, total, erred| Function {
            name: name.into(),
            total,
            done: total - erred,
            erred,
            not_run: 0,
        };
        assert_eq!(
            summary(&[f("inc", 1, 0)], Duration::from_millis(1250)),
            "rask: 1 task done in 1.2 s\n"
        );
        assert_eq!(
            summary(&[f("inc", 3, 0), f("add", 2, 1)], Duration::from_secs(2)),
            "rask: 5 tasks done in 2.0 s (inc 3, add 2), 1 erred\n"
        );
        let stopped = Function {
            name: "inc".into(),
            total: 50,
            done: 0,
            erred: 1,
            not_run: 49,
        };
        assert_eq!(
            summary(&[stopped], Duration::from_millis(10)),
            "rask: 1 of 50 tasks done in 0.0 s, 1 erred, 49 not run\n"
        );
    }

    fn keys(n: u8) -> Vec<Key> {
        (0..n).map(|i| Key([i; 32])).collect()
    }

    /// A run that stopped at its first failure: the tasks it never ran
    /// are not done (they counted as done, so 49 never-run tasks showed as
    /// succeeded beside the one that erred).
    #[test]
    fn a_failed_run_counts_the_tasks_it_never_ran_as_not_done() {
        let keys = keys(50);
        let bar = Bar::start(PlanId::default(), keys.iter().map(|k| (*k, "inc")));
        bar.tracker.record(keys[0], false);
        let tracker = bar.tracker.clone();
        drop(bar);
        let counts = tracker.lock().counts();
        assert_eq!(counts.len(), 1);
        assert_eq!(
            (counts[0].total, counts[0].done, counts[0].erred),
            (50, 0, 1)
        );
        assert!(tracker.bar.position() < 50, "the bar is not full");
    }

    /// A run that returned its values: tasks not heard of ran (fused, or
    /// before the bar listened), so they are done.
    #[test]
    fn a_successful_run_counts_the_tasks_not_heard_of_as_done() {
        let keys = keys(3);
        let mut bar = Bar::start(PlanId::default(), keys.iter().map(|k| (*k, "inc")));
        bar.tracker.record(keys[0], true);
        bar.succeeded();
        let tracker = bar.tracker.clone();
        drop(bar);
        let counts = tracker.lock().counts();
        assert_eq!(
            (counts[0].done, counts[0].erred, counts[0].not_run),
            (3, 0, 0)
        );
        assert_eq!(tracker.bar.position(), 3);
    }
}
