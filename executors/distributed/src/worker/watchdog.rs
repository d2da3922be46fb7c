//! The watchdog: a plain thread per worker that looks, every [`TICK`], for
//! threads stuck in tasks (worker rules 9 to 11). It takes the network over
//! from a network thread held by a job, replaces compute threads stuck in
//! released tasks, and declares the worker unhealthy when a thread stays
//! stuck past the grace period.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rask_executor::{Abandoned, Key, Op};

use super::pool::Seat;
use super::state::Job;
use super::{spawn_driver, Worker, FAST_OP};
use crate::protocol::WireKey;
use crate::RESTART_EXIT_CODE;

/// How often the watchdog looks.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// A job that holds the network thread this long is stuck there (rule 9):
/// 400 times the longest run of a function that may run there at all.
pub(crate) const INLINE_STUCK: Duration = Duration::from_millis(20);

const _: () = assert!(INLINE_STUCK.as_nanos() == 400 * FAST_OP.as_nanos());

/// A job in progress, as the watchdog sees it.
pub(crate) struct Running {
    pub(crate) key: WireKey,
    /// Its job's id (state rule 3): which run of the key this is.
    pub(crate) id: u64,
    pub(crate) function: Arc<str>,
    pub(crate) op: Arc<dyn Op>,
    pub(crate) cancelled: Arc<AtomicBool>,
    /// When the watchdog first saw it released.
    pub(crate) cancel_seen: Option<Instant>,
    /// Its unhealthy line was written (once per task).
    pub(crate) reported: bool,
}

impl Running {
    /// What the watchdog needs to know of `job`.
    pub(crate) fn of(job: &Job) -> Running {
        Running {
            key: job.key,
            id: job.id,
            function: job.function.clone(),
            op: job.op.clone(),
            cancelled: job.cancelled.clone(),
            cancel_seen: None,
            reported: false,
        }
    }

    /// Whether the task was released (state rule 3).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// `foo-1a2b3c4d`, as failures name tasks.
    fn task(&self) -> String {
        format!("{}-{}", self.op.name(), Key(self.key).short())
    }

    /// The line that makes the worker unhealthy once the task stayed on
    /// its thread `grace` after the watchdog saw it released (rule 11);
    /// `None` before, and after the line was given once.
    fn overdue(&mut self, now: Instant, grace: Duration) -> Option<String> {
        if self.reported || !self.is_cancelled() {
            return None;
        }
        let seen = *self.cancel_seen.get_or_insert(now);
        let stuck = now.saturating_duration_since(seen);
        if stuck < grace {
            return None;
        }
        self.reported = true;
        Some(format!(
            "task {} ignored its cancellation for {}",
            self.task(),
            Seconds(stuck)
        ))
    }
}

/// A duration for a log line: `31 s`, or `0.5 s` under ten seconds.
pub(super) struct Seconds(pub(super) Duration);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 < Duration::from_secs(10) {
            write!(f, "{:.1} s", self.0.as_secs_f64())
        } else {
            write!(f, "{} s", self.0.as_secs())
        }
    }
}

/// What the network thread runs outside the runtime (rule 9): one number
/// per job, so the watchdog tells a job that lasts from a stream of short
/// ones without reading the clock on the network thread.
#[derive(Default)]
pub(crate) struct Slot(AtomicU64);

/// Between jobs; also a taken-over thread's slot once its job returned.
const IDLE: u64 = 0;
/// Taken over by the watchdog while its job ran.
const TAKEN: u64 = u64::MAX;

impl Slot {
    /// The network thread starts job number `seq` (never 0: numbers start
    /// at 1 and a thread cannot run 2^64 jobs).
    pub(crate) fn begin(&self, seq: u64) {
        self.0.store(seq, Ordering::Release);
    }

    /// The job returned: `false` if the network was taken over meanwhile,
    /// and this thread is not the network thread any more.
    pub(crate) fn end(&self) -> bool {
        self.0.swap(IDLE, Ordering::AcqRel) != TAKEN
    }

    /// The job running now, if any.
    pub(super) fn running(&self) -> Option<u64> {
        match self.0.load(Ordering::Acquire) {
            IDLE | TAKEN => None,
            seq => Some(seq),
        }
    }

    /// Takes the network over from job `seq`, if it is still running.
    pub(super) fn take(&self, seq: u64) -> bool {
        self.0
            .compare_exchange(seq, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A taken-over thread's job returned.
    pub(super) fn returned(&self) -> bool {
        self.0.load(Ordering::Acquire) == IDLE
    }
}

/// What the watchdog decided about one compute thread.
#[derive(Debug, Default, PartialEq)]
struct Verdict {
    /// Retired: start a thread in its place (rule 10).
    replace: bool,
    /// The worker is unhealthy, for this reason (rule 11).
    unhealthy: Option<String>,
}

/// Looks at one compute thread's seat (rule 10): a thread whose task was
/// released is retired and replaced while `spare` threads may still be
/// added (when none may, the worker runs on fewer threads until one comes
/// back), and makes the worker unhealthy once it stayed in its task
/// `grace` after the release was seen. A task that returns a little late
/// (a sleep, a slow call) therefore never costs a restart.
fn review(seat: &mut Seat, now: Instant, grace: Duration, spare: &mut usize) -> Verdict {
    let mut verdict = Verdict::default();
    let Some(running) = seat.running.as_mut() else {
        return verdict;
    };
    if !running.is_cancelled() {
        return verdict;
    }
    if seat.seceded {
        // Its task waits for a nested computation (rule 15): another
        // thread took its place when it seceded, so it only leaves once
        // its task returns, which the release makes it do soon.
        seat.retired = true;
    } else if !seat.retired && *spare > 0 {
        *spare -= 1;
        seat.retired = true;
        verdict.replace = true;
    }
    verdict.unhealthy = running.overdue(now, grace);
    verdict
}

/// The lines that make the worker unhealthy for tasks of `abandoned` that
/// still run `grace` after their timeout (rule 11), each once: `reported`
/// keeps the ones said, as long as they run.
fn overdue_abandoned(
    abandoned: &[Abandoned],
    reported: &mut HashSet<(Arc<str>, Instant)>,
    now: Instant,
    grace: Duration,
) -> Vec<String> {
    reported.retain(|(name, since)| {
        abandoned
            .iter()
            .any(|a| a.name == *name && a.since == *since)
    });
    let mut lines = Vec::new();
    for a in abandoned {
        let stuck = now.saturating_duration_since(a.since);
        if stuck >= grace && reported.insert((a.name.clone(), a.since)) {
            lines.push(format!(
                "task {} ignored its timeout for {}",
                a.name,
                Seconds(stuck)
            ));
        }
    }
    lines
}

/// The watchdog's own state.
struct Watchdog {
    worker: Arc<Worker>,
    /// The network thread's slot, and the job seen in it since when.
    slot: Arc<Slot>,
    seen: Option<(u64, Instant)>,
    /// Former network threads still in the job they were taken over in.
    former: Vec<(Arc<Slot>, Running)>,
    /// Abandoned tasks already reported, by name and time of abandonment.
    abandoned: HashSet<(Arc<str>, Instant)>,
    /// A failed thread start was logged: not again every tick.
    spawn_failed: bool,
}

/// Starts the watchdog of `worker`, whose network thread uses `slot`; it
/// stops when `end` is dropped or sent to.
pub(crate) fn start(
    worker: Arc<Worker>,
    slot: Arc<Slot>,
    end: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    let mut watchdog = Watchdog {
        worker,
        slot,
        seen: None,
        former: Vec::new(),
        abandoned: HashSet::new(),
        spawn_failed: false,
    };
    std::thread::Builder::new()
        .name("rask-worker-watchdog".into())
        .spawn(move || loop {
            match end.recv_timeout(TICK) {
                Err(RecvTimeoutError::Timeout) => watchdog.tick(Instant::now()),
                _ => return,
            }
        })
}

impl Watchdog {
    fn tick(&mut self, now: Instant) {
        self.watch_network(now);
        self.watch_pool(now);
        self.watch_former(now);
        self.watch_abandoned(now);
    }

    /// Rule 9: a job on the network thread for [`INLINE_STUCK`].
    fn watch_network(&mut self, now: Instant) {
        let Some(seq) = self.slot.running() else {
            self.seen = None;
            return;
        };
        match self.seen {
            Some((seen, since)) if seen == seq => {
                if now.saturating_duration_since(since) >= INLINE_STUCK {
                    self.take_over(seq);
                }
            }
            _ => self.seen = Some((seq, now)),
        }
    }

    /// Starts a new network thread and hands it the network, unless job
    /// `seq` returned meanwhile.
    fn take_over(&mut self, seq: u64) {
        let slot = Arc::new(Slot::default());
        let (go, ready) = std::sync::mpsc::channel();
        // Started first, so a refusal leaves the old thread in charge.
        if let Err(e) = spawn_driver(self.worker.clone(), slot.clone(), ready) {
            if !std::mem::replace(&mut self.spawn_failed, true) {
                tracing::warn!(
                    "{}: could not start a thread to take the network over: {e}",
                    self.worker.id()
                );
            }
            return;
        }
        self.spawn_failed = false;
        if !self.slot.take(seq) {
            // It returned just now: the new thread goes away.
            let _ = go.send(false);
            self.seen = None;
            return;
        }
        // The old thread is in its job and touches the state no more
        // (rule 9); the new one waits for `go`.
        let running = {
            let mut core = self.worker.core();
            let running = core.inline.take();
            if let Some(r) = &running {
                // Its next runs go to the pool: a function that hangs once
                // cannot take network threads one after the other.
                core.speeds.forget(&r.function);
            }
            running
        };
        if let Some(r) = &running {
            tracing::warn!(
                "{}: task {} held the network thread over {INLINE_STUCK:?}; another thread took the network over",
                self.worker.id(),
                r.task()
            );
        }
        let old = std::mem::replace(&mut self.slot, slot);
        if let Some(running) = running {
            self.former.push((old, running));
        }
        self.seen = None;
        let _ = go.send(true);
    }

    /// Rules 10 and 11 for compute threads.
    fn watch_pool(&mut self, now: Instant) {
        let grace = self.worker.options.grace;
        let mut lines = Vec::new();
        let mut replace = 0;
        {
            let seats = self.worker.pool.seats();
            let mut locked: Vec<_> = seats.iter().map(|s| super::pool::seat(s)).collect();
            let retired = locked.iter().filter(|s| s.retired).count();
            let mut spare = self.worker.link.threads.saturating_sub(retired);
            for seat in &mut locked {
                let verdict = review(seat, now, grace, &mut spare);
                replace += usize::from(verdict.replace);
                lines.extend(verdict.unhealthy);
            }
        }
        for _ in 0..replace {
            self.worker.pool.replace_retired();
        }
        for line in lines {
            self.unhealthy(&line);
        }
    }

    /// Rule 11 for former network threads.
    fn watch_former(&mut self, now: Instant) {
        let grace = self.worker.options.grace;
        let mut lines = Vec::new();
        self.former.retain_mut(|(slot, running)| {
            if slot.returned() {
                return false;
            }
            lines.extend(running.overdue(now, grace));
            true
        });
        for line in lines {
            self.unhealthy(&line);
        }
    }

    /// Rule 11 for tasks abandoned at their timeout (counted per process).
    fn watch_abandoned(&mut self, now: Instant) {
        let grace = self.worker.options.grace;
        let abandoned = rask_executor::abandoned();
        for line in overdue_abandoned(&abandoned, &mut self.abandoned, now, grace) {
            self.unhealthy(&line);
        }
    }

    /// Rule 11: one line, and a supervised worker's process exits to be
    /// restarted.
    fn unhealthy(&self, why: &str) {
        let id = self.worker.id();
        if self.worker.options.supervised {
            tracing::warn!("{id}: unhealthy: {why}; exiting to be restarted");
            // Exit flushes what stdout holds if no thread holds its lock,
            // and never waits for one that does.
            std::process::exit(RESTART_EXIT_CODE);
        }
        tracing::warn!("{id}: unhealthy: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::{OpError, Value};

    struct Named;
    impl Op for Named {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(0i64))
        }
        fn name(&self) -> &str {
            "foo"
        }
    }

    fn running(cancelled: bool) -> Running {
        Running {
            key: [0x1a; 32],
            id: 0,
            function: "foo".into(),
            op: Arc::new(Named),
            cancelled: Arc::new(AtomicBool::new(cancelled)),
            cancel_seen: None,
            reported: false,
        }
    }

    #[test]
    fn a_task_abandoned_at_its_timeout_is_reported_once_after_the_grace() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let task = |name: &str| Abandoned {
            name: name.into(),
            since: t0,
        };
        let mut reported = HashSet::new();
        let list = [task("slow"), task("slower")];
        let early = t0 + grace - Duration::from_millis(1);
        assert!(overdue_abandoned(&list, &mut reported, early, grace).is_empty());
        let late = t0 + grace + Duration::from_secs(2);
        assert_eq!(
            overdue_abandoned(&list, &mut reported, late, grace),
            [
                "task slow ignored its timeout for 32 s",
                "task slower ignored its timeout for 32 s"
            ]
        );
        assert!(overdue_abandoned(&list, &mut reported, late, grace).is_empty());
        // One returned: forgotten; the other is not said again.
        assert!(overdue_abandoned(&list[1..], &mut reported, late, grace).is_empty());
        assert_eq!(reported.len(), 1);
    }

    #[test]
    fn durations_in_lines_are_whole_seconds_from_ten_on() {
        let line = |ms| Seconds(Duration::from_millis(ms)).to_string();
        assert_eq!(line(500), "0.5 s");
        assert_eq!(line(9_940), "9.9 s");
        assert_eq!(line(31_700), "31 s");
    }

    #[test]
    fn the_network_is_taken_over_only_from_the_job_still_running() {
        let slot = Slot::default();
        assert_eq!(slot.running(), None);
        slot.begin(1);
        assert_eq!(slot.running(), Some(1));
        assert!(slot.end(), "nobody took over");
        // Job 1 ended and job 2 runs: a take-over aimed at 1 misses.
        slot.begin(2);
        assert!(!slot.take(1));
        assert!(slot.end());
        slot.begin(3);
        assert!(slot.take(3));
        assert_eq!(slot.running(), None, "the new thread watches its own slot");
        assert!(!slot.returned());
        assert!(!slot.end(), "the old thread learns it was replaced");
        assert!(slot.returned());
        assert!(!slot.take(3));
    }

    #[test]
    fn a_released_task_retires_its_thread_once_then_is_unhealthy_after_the_grace() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut seat = Seat {
            running: Some(running(false)),
            ..Seat::default()
        };
        let mut spare = 1;
        // Running and wanted: nothing to do.
        assert_eq!(review(&mut seat, t0, grace, &mut spare), Verdict::default());
        seat.running
            .as_ref()
            .unwrap()
            .cancelled
            .store(true, Ordering::Relaxed);
        let first = review(&mut seat, t0, grace, &mut spare);
        assert_eq!(
            first,
            Verdict {
                replace: true,
                unhealthy: None
            }
        );
        assert!(seat.retired);
        assert_eq!(spare, 0);
        // Retired already: not replaced twice.
        let later = t0 + grace - Duration::from_millis(1);
        assert_eq!(
            review(&mut seat, later, grace, &mut spare),
            Verdict::default()
        );
        let overdue = review(
            &mut seat,
            t0 + grace + Duration::from_secs(1),
            grace,
            &mut spare,
        );
        assert!(!overdue.replace);
        assert_eq!(
            overdue.unhealthy.as_deref(),
            Some("task foo-1a1a1a1a ignored its cancellation for 31 s")
        );
        // Said once.
        let after = t0 + 2 * grace;
        assert_eq!(
            review(&mut seat, after, grace, &mut spare),
            Verdict::default()
        );
    }

    #[test]
    fn without_spare_threads_a_released_task_waits_for_the_grace() {
        let now = Instant::now();
        let mut seat = Seat {
            running: Some(running(true)),
            ..Seat::default()
        };
        let mut spare = 0;
        let verdict = review(&mut seat, now, Duration::from_secs(30), &mut spare);
        assert_eq!(verdict, Verdict::default());
        assert!(!seat.retired);
        // Still there after the grace: unhealthy then.
        let later = now + Duration::from_secs(31);
        let verdict = review(&mut seat, later, Duration::from_secs(30), &mut spare);
        assert!(verdict.unhealthy.is_some() && !verdict.replace);
        // An idle thread or one whose task is wanted is left alone.
        let mut idle = Seat::default();
        assert_eq!(
            review(&mut idle, now, Duration::ZERO, &mut spare),
            Verdict::default()
        );
    }
}
