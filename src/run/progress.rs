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
//!    nothing is drawn and one plain line is printed at the end. Bars alive
//!    at once share one `MultiProgress`, made when the first starts and
//!    dropped when the last ends ([`Screen`]), so each keeps a line of its
//!    own.
//! 4. [`Progress::wait`] runs the work it waits for where nothing else
//!    would: a simulated client's watched futures run only when someone
//!    waits, so `wait` steps that client (its `drive`) before it sleeps.
//! 5. A bar draws only on a thread of its own, never on the thread that
//!    told it of a task or ended it: events come on executor threads, which
//!    must not block (events rule 5), and a write to stderr blocks for as
//!    long as nobody reads it (a full pipe, a paused terminal). The event
//!    callback only counts, under the tracker's lock, which is never held
//!    while drawing. The drawing thread redraws the bar at its rate (10
//!    times a second) from those counts, draws its last state or prints
//!    the plain line when the work is over, and ends; it ends too when the
//!    display is dropped unfinished. `compute`'s bar waits for its last
//!    state to be drawn before `compute` returns, so on a screen that reads
//!    it is there before the program's next line (rule 6);
//!    [`Progress::wait`] returns once it is drawn.
//! 6. A screen that stops reading holds a drawing thread in its write,
//!    and the bars sharing its `MultiProgress` behind that write's lock
//!    (a new `MultiProgress`, or a plain line, would block in a write of
//!    its own): no such thread ends before the screen reads again.
//!    `compute` does not wait for that: its bar waits [`LAST_DRAW`] at
//!    most for its last state, then gives its thread up, to end by itself
//!    once its write returns. `persist` on a cluster, whose display
//!    watches futures, waits for its work, then the same way
//!    (`Progress::wait_for_work`).
//!    While a thread given up on runs, the screen counts as stalled: bars
//!    started then draw nothing, print no plain line and start no thread,
//!    so what is stuck is at most the threads of the bars alive when the
//!    screen stopped reading, never one more per `compute`. Once those
//!    threads end, new bars draw again. [`Progress::wait`] gives nothing
//!    up: it returns once its bar's last state is drawn.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, LazyLock, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
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
        self.wait_while(|state| !state.drawn);
    }

    /// Blocks until the watched work is done, then as `compute`'s bar
    /// does (rule 6): until its last state is drawn, or [`LAST_DRAW`] at
    /// most on a screen that does not read. For `persist`, which returns
    /// the work's values and must not hang on a display.
    pub(crate) fn wait_for_work(&self) {
        self.wait_while(|state| !state.finished);
        self.tracker.last_drawn();
    }

    /// Runs a simulated client's work (rule 4), then blocks while `blocked`
    /// holds of the display's state.
    fn wait_while(&self, blocked: impl Fn(&TrackerState) -> bool) {
        if let Some(drive) = &self.drive {
            drive(&|| self.done());
        }
        let state = self.tracker.lock();
        let _state = self
            .tracker
            .changed
            .wait_while(state, |state| blocked(state))
            .unwrap_or_else(PoisonError::into_inner);
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
    /// It draws on `screen` (rule 3).
    pub(crate) fn watching(
        collect: impl FnOnce(&Arc<Plans>) -> Vec<(Key, String)>,
        futures: usize,
        drive: Option<Drive>,
        ran: Ran,
        screen: &Screen,
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
        let tracker = Tracker::start(collect(&plans), plans, screen);
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
    /// A bar on `screen` (stderr, but in tests).
    pub(crate) fn start_on<'a>(
        screen: &Screen,
        plan: PlanId,
        tasks: impl IntoIterator<Item = (Key, &'a str)>,
    ) -> Bar {
        let plans = Plans::default();
        plans.add(plan);
        Bar {
            tracker: Tracker::start(
                tasks.into_iter().map(|(k, n)| (k, n.to_owned())).collect(),
                Arc::new(plans),
                screen,
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
    /// panic is a run that did not succeed. Returns once the bar's last
    /// state is drawn and its drawing thread ended (rule 5), or after
    /// [`LAST_DRAW`] on a screen that does not read, giving that thread
    /// up (rule 6).
    fn drop(&mut self) {
        self.tracker.finish(self.ok);
        self.tracker.last_drawn();
    }
}

/// How long `compute`'s bar waits for its last state to be drawn (rule 6):
/// a draw on a screen that reads takes well under a millisecond, so only
/// a blocked write (or a machine stalled for this long) is given up on.
const LAST_DRAW: Duration = Duration::from_secs(3);

/// A drawing thread's standing with its screen (rule 6), shared by its
/// bar and the thread itself: it outlives the tracker.
struct Drawing {
    /// The screen's count of drawing threads given up on and still
    /// running.
    stalled: Arc<AtomicUsize>,
    standing: Mutex<Standing>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Standing {
    Running,
    /// The bar stopped waiting for it; counted in `stalled` until it ends.
    GivenUp,
    Ended,
}

impl Drawing {
    /// The bar stops waiting for the thread: the screen is stalled until
    /// it ends, if it still runs.
    fn give_up(&self) {
        let mut standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        if *standing == Standing::Running {
            *standing = Standing::GivenUp;
            self.stalled.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The thread ends: the screen is no longer stalled by it.
    fn end(&self) {
        let mut standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        if *standing == Standing::GivenUp {
            self.stalled.fetch_sub(1, Ordering::AcqRel);
        }
        *standing = Standing::Ended;
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

/// Where bars draw (rule 3): stderr, or in tests a terminal of their own.
/// The bars alive at once share one `MultiProgress`, a line each.
pub(crate) struct Screen {
    /// The `MultiProgress` of the bars alive now: their drawing threads
    /// hold it, so it goes when the last of them ends.
    shared: Mutex<Weak<MultiProgress>>,
    /// What a new `MultiProgress` draws to, or `None` when this is not a
    /// terminal (a plain line at the end instead).
    target: Box<dyn Fn() -> Option<ProgressDrawTarget> + Send + Sync>,
    /// Drawing threads given up on and still running: while there is one,
    /// this screen does not read and new bars draw nothing (rule 6).
    stalled: Arc<AtomicUsize>,
}

impl Screen {
    /// Stderr, drawn to at most 10 times a second when it is a terminal.
    pub(crate) fn stderr() -> &'static Screen {
        static STDERR: LazyLock<Screen> = LazyLock::new(|| {
            Screen::new(|| {
                std::io::stderr()
                    .is_terminal()
                    .then(|| ProgressDrawTarget::stderr_with_hz(10))
            })
        });
        &STDERR
    }

    /// A screen whose bars draw to what `target` makes, `None` for no
    /// terminal.
    pub(crate) fn new(
        target: impl Fn() -> Option<ProgressDrawTarget> + Send + Sync + 'static,
    ) -> Screen {
        Screen {
            shared: Mutex::new(Weak::new()),
            target: Box::new(target),
            stalled: Arc::default(),
        }
    }

    /// Whether a drawing thread given up on still runs (rule 6).
    fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire) > 0
    }

    /// The `MultiProgress` a new bar joins: the one of the bars alive now,
    /// or a new one. `None` when this is not a terminal.
    fn join(&self) -> Option<Arc<MultiProgress>> {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(multi) = shared.upgrade() {
            return Some(multi);
        }
        let multi = Arc::new(MultiProgress::with_draw_target((self.target)()?));
        *shared = Arc::downgrade(&multi);
        Some(multi)
    }
}

struct Tracker {
    state: Mutex<TrackerState>,
    changed: Condvar,
    /// The runs whose events count (rule 1).
    plans: Arc<Plans>,
    started: Instant,
    /// Whether the screen is a terminal: a bar drawn, else one line at the
    /// end.
    terminal: bool,
    /// Takes the bar's last state to its drawing thread (rule 5); `None`
    /// once sent, or when the thread could not be started.
    to_drawer: Mutex<Option<Sender<Last>>>,
    /// The drawing thread, for `compute`'s bar to join or give up (rules 5
    /// and 6).
    drawer: Mutex<Option<(JoinHandle<()>, Arc<Drawing>)>>,
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
    /// The watched work is over: counts no longer change.
    finished: bool,
    /// The bar's last state is drawn, or the plain line printed (rule 5).
    drawn: bool,
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

    /// Where the bar stands: the tasks that ran, well or not.
    fn position(&self) -> u64 {
        self.functions.iter().map(|f| f.done + f.erred).sum()
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

/// How often a drawing thread redraws its bar: the rate stderr is drawn
/// to at most.
const TICK: Duration = Duration::from_millis(100);

/// What a drawing thread draws when the work is over (rule 5).
enum Last {
    /// The bar's last state: full (`finish`) or left where it stands.
    Bar {
        position: u64,
        message: String,
        full: bool,
    },
    /// The plain line, when stderr is not a terminal.
    Line(String),
    /// Nothing to say: no tasks and no terminal.
    Nothing,
}

/// A bar's drawing thread (rule 5): redraws `bar` (none when the screen
/// is not a terminal) from the tracker's counts every [`TICK`] until told
/// its last state, draws that and ends; ends too, leaving the bar where it
/// stands, when the tracker is dropped unfinished.
fn draw(
    tracker: &Weak<Tracker>,
    drawing: Arc<Drawing>,
    bar: Option<(Arc<MultiProgress>, ProgressBar)>,
    last: &Receiver<Last>,
) {
    // Whatever happens here, `Progress::wait` is not left waiting for it.
    let _drawn = Drawn(tracker.clone(), drawing);
    let Some((multi, bar)) = bar else {
        match last.recv() {
            Ok(Last::Line(line)) => {
                // One write: the line stays whole beside other output.
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
            Ok(Last::Bar { .. } | Last::Nothing) | Err(_) => {}
        }
        return;
    };
    let bar = multi.add(bar);
    let mut shown = String::new();
    let last = loop {
        match last.recv_timeout(TICK) {
            Ok(last) => break Some(last),
            Err(RecvTimeoutError::Disconnected) => break None,
            Err(RecvTimeoutError::Timeout) => {
                let Some(tracker) = tracker.upgrade() else {
                    break None;
                };
                let (position, message) = {
                    let state = tracker.lock();
                    (state.position(), state.message())
                };
                drop(tracker);
                bar.set_position(position);
                if message != shown {
                    bar.set_message(message.clone());
                    shown = message;
                }
                // Redrawn even when nothing changed: the rate and eta do.
                bar.tick();
            }
        }
    };
    match last {
        Some(Last::Bar {
            position,
            message,
            full,
        }) => {
            bar.set_position(position);
            bar.set_message(message);
            if full {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
        // Dropped unfinished: dropping the bar would draw it full.
        None => bar.abandon(),
        Some(Last::Line(_) | Last::Nothing) => {}
    }
}

/// Marks the bar's last state drawn when the drawing thread ends, however
/// it ends (rule 5), and the screen no longer stalled by it (rule 6).
struct Drawn(Weak<Tracker>, Arc<Drawing>);

impl Drop for Drawn {
    fn drop(&mut self) {
        self.1.end();
        if let Some(tracker) = self.0.upgrade() {
            tracker.lock().drawn = true;
            tracker.changed.notify_all();
        }
    }
}

impl Tracker {
    fn start(tasks: Vec<(Key, String)>, plans: Arc<Plans>, screen: &Screen) -> Arc<Tracker> {
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
        // A stalled screen (rule 6): nothing drawn, no thread to block.
        let stalled = screen.stalled();
        let bar = (!stalled).then(|| screen.join()).flatten().map(|multi| {
            let bar = ProgressBar::with_draw_target(
                Some(pending.len() as u64),
                ProgressDrawTarget::hidden(),
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
            // Drawn from here on, by the drawing thread alone: hidden until
            // it joins the screen's `MultiProgress`.
            (multi, bar)
        });
        let tracker = Arc::new(Tracker {
            state: Mutex::new(TrackerState {
                pending,
                functions,
                futures: 0,
                failed: false,
                ran: None,
                finished: false,
                drawn: false,
                subscription: None,
            }),
            changed: Condvar::new(),
            plans,
            started: Instant::now(),
            terminal: bar.is_some(),
            to_drawer: Mutex::new(None),
            drawer: Mutex::new(None),
        });
        let (to_drawer, from_tracker) = mpsc::channel();
        let weak = Arc::downgrade(&tracker);
        let drawing = Arc::new(Drawing {
            stalled: screen.stalled.clone(),
            standing: Mutex::new(Standing::Running),
        });
        let mine = drawing.clone();
        let drawer = (!stalled).then(|| {
            std::thread::Builder::new()
                .name("rask-progress".to_owned())
                .spawn(move || draw(&weak, mine, bar, &from_tracker))
        });
        // Without a thread there is no display: the work runs all the same.
        if let Some(Ok(drawer)) = drawer {
            *tracker
                .to_drawer
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(to_drawer);
            *tracker
                .drawer
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some((drawer, drawing));
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

    /// Once the work is over: waits for the last state to be drawn and
    /// the drawing thread to end (rule 5), or [`LAST_DRAW`] at most on a
    /// screen that does not read, then gives that thread up (rule 6).
    fn last_drawn(&self) {
        let drawn = {
            let state = self.lock();
            let (state, _) = self
                .changed
                .wait_timeout_while(state, LAST_DRAW, |state| !state.drawn)
                .unwrap_or_else(PoisonError::into_inner);
            state.drawn
        };
        let drawer = self
            .drawer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match drawer {
            // Drawn: it has nothing left to do but end (a panic there drew
            // nothing more: nothing to add to it here).
            Some((thread, _)) if drawn => drop(thread.join()),
            Some((_, drawing)) => drawing.give_up(),
            None => {}
        }
    }

    fn event(&self, event: &Event<'_>) {
        if let Some(ok) = outcome(event) {
            if self.plans.watches(event.plan) {
                self.record(event.key, ok);
            }
        }
    }

    /// Task `key` ended, well (`ok`) or not: counted once, if watched.
    /// Called on executor threads: it only counts (rule 5).
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
    /// of counts as done if it was, else as not run (rule 2); the drawing
    /// thread is told to draw the bar's last state, or print the plain line
    /// (rule 5).
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
            let total: u64 = state.functions.iter().map(|f| f.total).sum();
            let not_run: u64 = state.functions.iter().map(|f| f.not_run).sum();
            let last = if self.terminal {
                Last::Bar {
                    position: state.position(),
                    message: state.message(),
                    // Else left where it stands: `finish` would draw it full.
                    full: not_run == 0,
                }
            } else if total > 0 {
                Last::Line(summary(&state.functions, self.started.elapsed()))
            } else {
                Last::Nothing
            };
            let to_drawer = self
                .to_drawer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            // No drawing thread to say it: nothing will be drawn.
            if to_drawer.is_none_or(|to| to.send(last).is_err()) {
                state.drawn = true;
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
        let bar = Bar::start_on(
            Screen::stderr(),
            PlanId::default(),
            keys.iter().map(|k| (*k, "inc")),
        );
        bar.tracker.record(keys[0], false);
        let tracker = bar.tracker.clone();
        drop(bar);
        let counts = tracker.lock().counts();
        assert_eq!(counts.len(), 1);
        assert_eq!(
            (counts[0].total, counts[0].done, counts[0].erred),
            (50, 0, 1)
        );
        assert!(tracker.lock().position() < 50, "the bar is not full");
    }

    /// A run that returned its values: tasks not heard of ran (fused, or
    /// before the bar listened), so they are done.
    #[test]
    fn a_successful_run_counts_the_tasks_not_heard_of_as_done() {
        let keys = keys(3);
        let mut bar = Bar::start_on(
            Screen::stderr(),
            PlanId::default(),
            keys.iter().map(|k| (*k, "inc")),
        );
        bar.tracker.record(keys[0], true);
        bar.succeeded();
        let tracker = bar.tracker.clone();
        drop(bar);
        let counts = tracker.lock().counts();
        assert_eq!(
            (counts[0].done, counts[0].erred, counts[0].not_run),
            (3, 0, 0)
        );
        assert_eq!(tracker.lock().position(), 3);
    }

    /// A terminal for tests: its rows as a terminal would show them, and
    /// writes that wait while it is held (a terminal nobody reads, a full
    /// pipe).
    #[derive(Debug, Clone, Default)]
    struct Terminal(Arc<TerminalState>);

    #[derive(Debug, Default)]
    struct TerminalState {
        rows: Mutex<Rows>,
        held: Mutex<bool>,
        released: Condvar,
        /// Writes waiting now.
        waiting: Mutex<usize>,
        waited: Condvar,
    }

    #[derive(Debug, Default)]
    struct Rows {
        rows: Vec<Vec<char>>,
        row: usize,
        col: usize,
        /// Inside an escape sequence (styles): skipped.
        escape: bool,
    }

    const WIDTH: usize = 100;
    /// How long a test waits for something that takes milliseconds when it
    /// works: its failure condition, never a speed expected.
    const PATIENCE: Duration = Duration::from_secs(20);

    impl Terminal {
        fn screen(&self) -> Screen {
            let term = self.clone();
            Screen::new(move || Some(ProgressDrawTarget::term_like(Box::new(term.clone()))))
        }

        /// Waits while held, for long enough to fail a test but not for
        /// good: the drawing threads end.
        fn write(&self, f: impl FnOnce(&mut Rows)) -> std::io::Result<()> {
            let held = self.0.held.lock().unwrap();
            if *held {
                *self.0.waiting.lock().unwrap() += 1;
                self.0.waited.notify_all();
                let (held, _) = self
                    .0
                    .released
                    .wait_timeout_while(held, PATIENCE * 2, |held| *held)
                    .unwrap();
                drop(held);
                *self.0.waiting.lock().unwrap() -= 1;
            } else {
                drop(held);
            }
            f(&mut self.0.rows.lock().unwrap());
            Ok(())
        }

        /// The rows on screen, trailing blanks cut.
        fn rows(&self) -> Vec<String> {
            let rows = self.0.rows.lock().unwrap();
            rows.rows
                .iter()
                .map(|r| r.iter().collect::<String>().trim_end().to_owned())
                .collect()
        }
    }

    impl Terminal {
        fn hold(&self) {
            *self.0.held.lock().unwrap() = true;
        }

        fn release(&self) {
            *self.0.held.lock().unwrap() = false;
            self.0.released.notify_all();
        }

        /// Whether a write is waiting for the terminal, within `PATIENCE`.
        fn a_write_waits(&self) -> bool {
            let waiting = self.0.waiting.lock().unwrap();
            let (waiting, _) = self
                .0
                .waited
                .wait_timeout_while(waiting, PATIENCE, |n| *n == 0)
                .unwrap();
            *waiting > 0
        }
    }

    impl Rows {
        fn put(&mut self, c: char) {
            if self.escape {
                self.escape = !c.is_ascii_alphabetic();
                return;
            }
            match c {
                '\x1b' => self.escape = true,
                '\r' => self.col = 0,
                '\n' => (self.row, self.col) = (self.row + 1, 0),
                c => {
                    if self.col == WIDTH {
                        (self.row, self.col) = (self.row + 1, 0);
                    }
                    while self.rows.len() <= self.row {
                        self.rows.push(vec![' '; WIDTH]);
                    }
                    self.rows[self.row][self.col] = c;
                    self.col += 1;
                }
            }
        }

        /// Moves by `n` rows, up or down; 0 writes nothing, as `console`.
        fn moved(&mut self, n: usize, down: bool) {
            if n > 0 {
                self.row = if down {
                    self.row + n
                } else {
                    self.row.saturating_sub(n)
                };
                self.col = self.col.min(WIDTH - 1);
            }
        }
    }

    impl indicatif::TermLike for Terminal {
        fn width(&self) -> u16 {
            WIDTH as u16
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.write(|r| r.moved(n, false))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.write(|r| r.moved(n, true))
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.write(|r| r.col = (r.col + n).min(WIDTH - 1))
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.write(|r| r.col = r.col.saturating_sub(n))
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write(|r| s.chars().chain(['\n']).for_each(|c| r.put(c)))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.write(|r| s.chars().for_each(|c| r.put(c)))
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.write(|r| {
                if let Some(row) = r.rows.get_mut(r.row) {
                    row.fill(' ');
                }
                r.col = 0;
            })
        }
        fn flush(&self) -> std::io::Result<()> {
            self.write(|_| ())
        }
    }

    /// Runs `f` on a thread of its own: its value, or `None` if it took
    /// longer than `PATIENCE` (the thread is then left to end by itself).
    fn within<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(PATIENCE).ok()
    }

    /// Opens once; tasks wait on it for `PATIENCE` at most.
    #[cfg(feature = "threaded")]
    static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

    #[cfg(feature = "threaded")]
    fn gated(x: i64) -> i64 {
        let open = GATE.0.lock().unwrap();
        drop(GATE.1.wait_timeout_while(open, PATIENCE, |open| !*open));
        x + 1
    }

    /// `compute`'s bar has its last state drawn when it ends, by its
    /// drawing thread.
    #[test]
    fn a_bar_draws_its_last_state_before_it_ends() {
        let terminal = Terminal::default();
        let keys = keys(3);
        let mut bar = Bar::start_on(
            &terminal.screen(),
            PlanId::default(),
            keys.iter().map(|k| (*k, "inc")),
        );
        bar.tracker.record(keys[0], true);
        bar.succeeded();
        drop(bar);
        let rows = terminal.rows();
        assert!(
            rows.iter()
                .any(|row| row.starts_with("inc") && row.contains("3/3")),
            "{rows:#?}"
        );
    }

    /// A bar whose terminal stops reading does not stop the work it
    /// watches: tasks end on executor threads, which only count, and the
    /// bar waits on its own thread. They drew there (`inc` and
    /// `set_message` from the event callback), so the first task to end
    /// waited for the terminal, and the computation with it.
    #[cfg(feature = "threaded")]
    #[test]
    fn a_blocked_terminal_does_not_block_the_computation() {
        let terminal = Terminal::default();
        let screen = terminal.screen();
        let held = terminal.clone();
        let computed = within(move || {
            let client = crate::Client::threads(2).unwrap();
            let futures = client.map(gated, 0..20).unwrap();
            // Told of every task as it ends, on an executor thread.
            let bar = crate::futures::progress::progress_on(&futures, &screen);
            held.hold();
            *GATE.0.lock().unwrap() = true;
            GATE.1.notify_all();
            let values: Vec<i64> = futures.iter().map(|f| f.result().unwrap()).collect();
            (values, bar)
        });
        let Some((values, bar)) = computed else {
            terminal.release();
            panic!("the computation did not end while its bar's terminal was blocked");
        };
        assert_eq!(values, (1..=20).collect::<Vec<_>>());
        assert!(
            terminal.a_write_waits(),
            "the bar draws to the blocked terminal meanwhile"
        );
        terminal.release();
        assert!(
            within(move || bar.wait()).is_some(),
            "the bar ends once released"
        );
        assert!(
            terminal.rows().iter().any(|row| row.contains("20/20")),
            "the last state is drawn: {:?}",
            terminal.rows()
        );
    }

    /// Two bars alive at once each keep a line: they drew each to a
    /// target of its own, which redrew its line where the other's was.
    #[test]
    fn two_bars_at_once_each_keep_their_line() {
        let terminal = Terminal::default();
        let screen = terminal.screen();
        let keys = keys(5);
        let mut inc = Bar::start_on(
            &screen,
            PlanId::default(),
            keys[..3].iter().map(|k| (*k, "inc")),
        );
        let mut add = Bar::start_on(
            &screen,
            PlanId::default(),
            keys[3..].iter().map(|k| (*k, "add")),
        );
        for key in &keys[..3] {
            inc.tracker.record(*key, true);
        }
        add.tracker.record(keys[3], true);
        inc.succeeded();
        drop(inc);
        add.tracker.record(keys[4], true);
        add.succeeded();
        drop(add);
        let rows = terminal.rows();
        let shown = |name: &str, count: &str| {
            rows.iter()
                .any(|row| row.starts_with(name) && row.contains(count))
        };
        assert!(shown("inc", "3/3") && shown("add", "2/2"), "{rows:#?}");
    }

    fn inc(x: i64) -> i64 {
        x + 1
    }

    fn dec(x: i64) -> i64 {
        x - 1
    }

    /// `compute` of `x` with a bar on `screen`.
    fn compute_on(screen: &Screen, x: &crate::Delayed<i64>) -> crate::Result<i64> {
        let config = crate::Config::synchronous().progress(true);
        let values = crate::run::compute::run_on(&[x.node().clone()], &config, screen)?;
        crate::run::compute::take(&mut values.into_iter())
    }

    /// `compute` with a bar returns its value when the bar's terminal
    /// stopped reading (rule 6): it waited for the bar's drawing thread,
    /// blocked in its write for as long as the terminal did not read. A
    /// second `compute` meanwhile starts no drawing thread (one would wait
    /// behind the first's write, given up too), and once the terminal
    /// reads again bars draw again.
    #[test]
    fn compute_returns_while_its_bar_terminal_is_blocked() {
        let terminal = Terminal::default();
        let screen = Arc::new(terminal.screen());
        terminal.hold();
        let on = screen.clone();
        let computed = within(move || {
            let x = crate::delayed!(inc(1));
            (compute_on(&on, &x), compute_on(&on, &x))
        });
        let Some((first, second)) = computed else {
            terminal.release();
            panic!("compute did not return while its bar's terminal was blocked");
        };
        assert_eq!((first.unwrap(), second.unwrap()), (2, 2));
        assert!(terminal.a_write_waits(), "the first bar's thread waits");
        assert_eq!(
            screen.stalled.load(Ordering::Acquire),
            1,
            "the second bar started no thread to be stuck (behind the first's write)"
        );
        terminal.release();
        // The first bar's thread draws and ends now: the screen is read.
        let deadline = Instant::now() + PATIENCE;
        while screen.stalled() {
            assert!(Instant::now() < deadline, "the given-up thread never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(compute_on(&screen, &crate::delayed!(dec(1))).unwrap(), 0);
        let rows = terminal.rows();
        assert!(
            rows.iter()
                .any(|row| row.starts_with("dec") && row.contains("1/1")),
            "a bar draws again once the terminal reads: {rows:#?}"
        );
    }
    /// `persist` with a bar on a cluster waits for its work, then for the
    /// bar's last state as `compute` does (rule 6): it waited for that
    /// state with no limit, so a terminal that stopped reading held the    /// `persist` for as long (`Progress::wait`, which it called).
    #[test]
    fn a_display_waited_for_its_work_returns_while_its_terminal_is_blocked() {
        let terminal = Terminal::default();
        let screen = Arc::new(terminal.screen());
        let keys = keys(2);
        let ran: Ran = Arc::new(|_| true);
        let listed = keys.clone();
        let collect = move |_: &Arc<Plans>| -> Vec<(Key, String)> {
            listed.iter().map(|k| (*k, "inc".to_owned())).collect()
        };
        let progress = Arc::new(Progress::watching(collect, 2, None, ran, &screen));
        terminal.hold();
        progress.future_done(true);
        let waited = progress.clone();
        let waiting = std::thread::spawn(move || waited.wait_for_work());
        // Not done yet: the work still runs, and is waited for.
        assert!(!progress.done());
        progress.future_done(true);
        let returned = within(move || waiting.join().is_ok());
        terminal.release();
        assert_eq!(
            returned,
            Some(true),
            "the wait did not return while the bar's terminal was blocked"
        );
        assert!(progress.done());
    }
}
