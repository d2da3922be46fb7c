//! The worker's compute threads (worker rules 2, 10 and 14): a priority
//! queue of jobs, the threads that take them, and what each thread runs
//! now, so the watchdog can retire a thread stuck in a released task and
//! start another in its place.
//!
//! *Members* are the threads that count towards the worker's `threads`:
//! live, not retired, and not seceded (waiting in a task for a nested
//! computation, rule 15). The pool keeps at least `threads` members: a
//! thread that secedes is replaced at once; one that rejoins makes a member
//! too many, and the next member to look for a job leaves instead. A
//! thread gives its place back once however many waits secede for it at a
//! time (a timed task's retry waits beside its abandoned first attempt):
//! the first wait gives it, the last to rejoin takes it again, and the
//! scheduler hears once per job.

use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use super::state::{Done, Job};
use super::watchdog::Running;
use super::{report, run_link};
use crate::nested::TaskCluster;
use crate::protocol::WireKey;

/// Jobs waiting for a thread, lowest priority number first.
struct Queue {
    heap: BinaryHeap<Queued>,
    closed: bool,
    /// Threads blocked on the condition variable: only they need a wake-up.
    sleeping: usize,
    /// Threads counting towards `Shared::target` (module docs).
    members: usize,
}

struct Queued(Job);

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.0.priority, self.0.id) == (other.0.priority, other.0.id)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: reverse so the lowest priority pops first.
        (other.0.priority, other.0.id).cmp(&(self.0.priority, self.0.id))
    }
}

/// What one compute thread is doing, as the watchdog sees it (rule 10).
#[derive(Default)]
pub(crate) struct Seat {
    pub(crate) running: Option<Running>,
    /// Replaced: the thread takes no new job and exits when this one
    /// returns.
    pub(crate) retired: bool,
    /// Its task waits for a nested computation (rule 15): the thread is
    /// no member, another took its place.
    pub(crate) seceded: bool,
    /// Waits that seceded for this thread and have not rejoined: its own
    /// task's, or those of its task's attempts, a retry's beside the
    /// abandoned one's (`rask_executor::run_limited`). Its place is given
    /// back by the first and taken again by the last (module docs).
    pub(crate) waits: u32,
    /// The job whose secession the scheduler was told of: once per job.
    pub(crate) told: Option<u64>,
}

/// One compute thread's seat, shared with the watchdog.
pub(crate) type SeatRef = Arc<Mutex<Seat>>;

pub(crate) fn seat(seat: &SeatRef) -> MutexGuard<'_, Seat> {
    // Every critical section only assigns fields: poison is harmless.
    seat.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    done: mpsc::UnboundedSender<Done>,
    /// Tasks that seceded, for the scheduler (rule 15), with their job's
    /// id.
    seceded: mpsc::UnboundedSender<(WireKey, u64)>,
    /// The seat of every live compute thread, retired ones included.
    seats: Mutex<Vec<SeatRef>>,
    /// Compute threads started so far, for their names.
    started: Mutex<usize>,
    /// The members the pool keeps (module docs): the worker's threads.
    target: usize,
    /// Installed on every compute thread (`nested` rule 1).
    cluster: Option<Arc<TaskCluster>>,
}

/// The worker's compute threads (rule 2). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Starts `threads` compute threads that report to `done`, and tasks
    /// that secede to `seceded`, each thread with `cluster` installed
    /// (`nested` rule 1).
    pub(crate) fn start(
        threads: usize,
        done: mpsc::UnboundedSender<Done>,
        seceded: mpsc::UnboundedSender<(WireKey, u64)>,
        cluster: Option<Arc<TaskCluster>>,
    ) -> Pool {
        let pool = Pool {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    heap: BinaryHeap::new(),
                    closed: false,
                    sleeping: 0,
                    members: 0,
                }),
                ready: Condvar::new(),
                done,
                seceded,
                seats: Mutex::new(Vec::new()),
                started: Mutex::new(0),
                target: threads,
                cluster,
            }),
        };
        for _ in 0..threads {
            // A thread that cannot be spawned leaves the pool smaller; the
            // worker still runs as long as one thread exists.
            pool.add_member();
        }
        pool
    }

    /// Starts one more member (module docs); false if the system refused.
    fn add_member(&self) -> bool {
        self.queue().members += 1;
        let added = self.add_thread();
        if !added {
            self.queue().members -= 1;
        }
        added
    }

    /// Starts a thread in place of a member the watchdog retired (rule
    /// 10): the number of members stays; false if the system refused.
    pub(crate) fn replace_retired(&self) -> bool {
        let added = self.add_thread();
        if !added {
            self.queue().members -= 1;
        }
        added
    }

    /// Starts one more compute thread, counted as the caller says; false if
    /// the system refused.
    fn add_thread(&self) -> bool {
        let index = {
            let mut started = self
                .shared
                .started
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *started += 1;
            *started - 1
        };
        let me = SeatRef::default();
        let shared = self.shared.clone();
        let mine = me.clone();
        // Listed before it starts, so it is never missing from the list
        // while it runs.
        self.seats().push(me.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("rask-worker-{index}"))
            .spawn(move || {
                LANE.with(|lane| {
                    lane.set(u32::try_from(index).unwrap_or(u32::MAX).saturating_add(1))
                });
                if let Some(cluster) = &shared.cluster {
                    crate::nested::install(cluster.clone());
                }
                let seat: Arc<dyn rask_executor::Seat> = Arc::new(PoolSeat {
                    shared: shared.clone(),
                    me: mine.clone(),
                    job: None,
                    gave: Default::default(),
                });
                <dyn rask_executor::Seat>::enter(seat, || compute_thread(&shared, &mine))
            });
        if let Err(e) = spawned {
            tracing::warn!("worker: could not start compute thread {index}: {e}");
            self.seats().retain(|s| !Arc::ptr_eq(s, &me));
            return false;
        }
        true
    }

    /// The seats of the live compute threads (rule 10).
    pub(crate) fn seats(&self) -> MutexGuard<'_, Vec<SeatRef>> {
        self.shared
            .seats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `jobs`; a closed pool drops them (the worker ended).
    pub(crate) fn submit(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut q = self.queue();
        if q.closed {
            return;
        }
        let before = q.heap.len();
        q.heap.extend(jobs.into_iter().map(Queued));
        let added = q.heap.len() - before;
        if q.sleeping == 0 || added == 0 {
            return;
        }
        if added > 1 {
            self.shared.ready.notify_all();
        } else {
            self.shared.ready.notify_one();
        }
    }

    /// Drops the jobs waiting for a thread (their scheduler connection was
    /// lost, worker rule 1); the threads stay for the next connection's.
    pub(crate) fn clear(&self) {
        let jobs = std::mem::take(&mut self.queue().heap);
        // Their inputs' `Drop`s run outside the lock (worker rule 16).
        drop(jobs);
    }

    /// Threads exit once idle; running ops finish first, unobserved.
    pub(crate) fn close(&self) {
        let jobs = {
            let mut q = self.queue();
            q.closed = true;
            self.shared.ready.notify_all();
            std::mem::take(&mut q.heap)
        };
        drop(jobs);
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

thread_local! {
    /// Where task events place a task run on this thread: 0 on the
    /// worker's network thread (short tasks run there), `i + 1` on compute
    /// thread `i`.
    static LANE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// This thread's lane for task events (see `LANE`).
pub(crate) fn lane() -> u32 {
    LANE.with(std::cell::Cell::get)
        .min(crate::protocol::MAX_THREADS)
}

fn compute_thread(shared: &Arc<Shared>, me: &SeatRef) {
    let pool = Pool {
        shared: shared.clone(),
    };
    loop {
        let job = {
            let mut q = pool.queue();
            loop {
                if q.closed {
                    break None;
                }
                if q.members > shared.target {
                    // A seceded thread rejoined (rule 15): one member too
                    // many, and this one is between jobs.
                    q.members -= 1;
                    break None;
                }
                if let Some(Queued(job)) = q.heap.pop() {
                    break Some(job);
                }
                q.sleeping += 1;
                q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                q.sleeping -= 1;
            }
        };
        let Some(mut job) = job else {
            break;
        };
        // Its successors, link after link (state rule 5).
        let go_on = loop {
            seat(me).running = Some(Running::of(&job));
            let (done, next) = run_link(job);
            let retired = {
                let mut s = seat(me);
                s.running = None;
                s.retired
            };
            // A retired thread's late report is dropped by the state
            // (state rule 3) unless its task was not released.
            let open = done.is_none_or(|d| report(&shared.done, d));
            match next {
                Some(next) if open && !retired => job = next,
                Some(next) => {
                    if open {
                        // Someone else runs the rest of the chain.
                        pool.submit([next]);
                    }
                    break open && !retired;
                }
                None => break open && !retired,
            }
        };
        if !go_on {
            break;
        }
    }
    pool.seats().retain(|s| !Arc::ptr_eq(s, me));
}

/// A compute thread's place in the pool, given back while its task waits
/// for a nested computation (rule 15, `rask_executor::blocking`).
struct PoolSeat {
    shared: Arc<Shared>,
    me: SeatRef,
    /// For a timed attempt of a task (`Seat::bound`): that task's job id;
    /// once the thread runs another job, this seat's `secede` does
    /// nothing.
    job: Option<u64>,
    /// Its last `secede` gave the thread's place back: its `rejoin` takes
    /// it again, whatever the thread runs by then.
    gave: std::sync::atomic::AtomicBool,
}

impl PoolSeat {
    /// Whether this seat stands for the thread's current job: always,
    /// unless bound to a job the thread has left.
    fn current(&self) -> bool {
        self.job
            .is_none_or(|id| seat(&self.me).running.as_ref().is_some_and(|r| r.id == id))
    }
}

impl rask_executor::Seat for PoolSeat {
    fn bound(&self) -> Option<Arc<dyn rask_executor::Seat>> {
        let job = seat(&self.me).running.as_ref().map(|r| r.id)?;
        Some(Arc::new(PoolSeat {
            shared: self.shared.clone(),
            me: self.me.clone(),
            job: Some(job),
            gave: Default::default(),
        }))
    }

    fn secede(&self) {
        if !self.current() {
            // An abandoned attempt of a job the thread has left: its wait
            // is its own; the thread is a member running another task.
            return;
        }
        self.gave.store(true, std::sync::atomic::Ordering::Relaxed);
        let (give, tell) = {
            let mut s = seat(&self.me);
            s.seceded = true;
            s.waits += 1;
            if s.retired {
                // No member since the watchdog retired it (its released
                // task ran on): a thread took its place then, so nothing
                // to give back or replace now, and `rejoin` adds nothing.
                return;
            }
            let run = s.running.as_ref().map(|r| (r.key, r.id));
            let tell = run.filter(|&(_, id)| s.told != Some(id));
            if let Some((_, id)) = tell {
                s.told = Some(id);
            }
            // Given back already by a wait still going: a retried
            // attempt's, while the abandoned one waits on. Binding seats
            // to attempts would not tell them apart: each secedes while
            // its own attempt is the thread's current one.
            (s.waits == 1, tell)
        };
        if let Some(run) = tell {
            // Out of the scheduler's window for this worker, so the work
            // the task waits for can come here. A closed channel: the
            // worker ended.
            let _ = self.shared.seceded.send(run);
        }
        if !give {
            return;
        }
        let pool = Pool {
            shared: self.shared.clone(),
        };
        let short = {
            let mut q = pool.queue();
            q.members -= 1;
            !q.closed && q.members < self.shared.target
        };
        if short {
            // Refused: the worker runs on fewer threads until this one
            // rejoins, as when a thread cannot be started at all.
            pool.add_member();
        }
    }

    fn rejoin(&self) {
        if !self.gave.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return; // its secede counted no wait
        }
        let (retired, last) = {
            let mut s = seat(&self.me);
            s.waits = s.waits.saturating_sub(1);
            let last = s.waits == 0;
            if last {
                s.seceded = false;
            }
            (s.retired, last)
        };
        if retired || !last {
            // Its task was released meanwhile (rule 10): the thread exits
            // when the task returns, as no member. Or another wait of the
            // thread goes on: its place stays given back.
            return;
        }
        let pool = Pool {
            shared: self.shared.clone(),
        };
        let mut q = pool.queue();
        q.members += 1;
        if q.members > self.shared.target && q.sleeping > 0 {
            // An idle member leaves at once.
            self.shared.ready.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::{Op, OpError, Seat as _, Value};

    struct Nop;
    impl Op for Nop {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(0i64))
        }
        fn name(&self) -> &str {
            "nop"
        }
    }

    fn running(key: WireKey) -> Running {
        Running {
            key,
            id: 3,
            function: "nop".into(),
            op: Arc::new(Nop),
            cancelled: Arc::default(),
            cancel_seen: None,
            reported: false,
        }
    }

    /// The seat of a compute thread of `pool` whose place is `me`.
    fn unbound(pool: &Pool, me: SeatRef) -> PoolSeat {
        PoolSeat {
            shared: pool.shared.clone(),
            me,
            job: None,
            gave: Default::default(),
        }
    }

    fn members(pool: &Pool) -> usize {
        pool.queue().members
    }

    fn started(pool: &Pool) -> usize {
        *pool.shared.started.lock().unwrap()
    }

    /// Waits up to 10 s for `done` to hold of the pool's queue.
    fn queue_comes_to(pool: &Pool, done: impl Fn(&Queue) -> bool) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done(&pool.queue()) {
            if std::time::Instant::now() > until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Rejoins `seat` of a pool of one thread, whose two threads (the
    /// first and the one that took the seat's place) are idle, and tells
    /// whether that made a member too many: one of the idle threads then
    /// leaves at once (rule 15), and one member and one sleeper remain.
    /// Without a member added, both threads sleep on.
    fn rejoin_sheds_a_member(pool: &Pool, seat: &dyn rask_executor::Seat) -> bool {
        assert!(
            queue_comes_to(pool, |q| q.sleeping == 2 && q.members == 1),
            "both threads idle before the rejoin"
        );
        seat.rejoin();
        queue_comes_to(pool, |q| q.sleeping == 1 && q.members == 1)
    }

    #[test]
    fn a_seat_secedes_and_rejoins_as_a_member_and_a_retired_one_as_none() {
        let (done, _done_rx) = mpsc::unbounded_channel();
        let (seceded, mut seceded_rx) = mpsc::unbounded_channel();
        let pool = Pool::start(1, done, seceded, None);
        assert_eq!((members(&pool), started(&pool)), (1, 1));
        // A member secedes: a thread takes its place, and it tells the
        // scheduler; rejoining, it is a member too many for a while.
        let me = SeatRef::default();
        seat(&me).running = Some(running([9; 32]));
        let member = unbound(&pool, me.clone());
        member.secede();
        assert_eq!((members(&pool), started(&pool)), (1, 2));
        assert_eq!(seceded_rx.try_recv().ok(), Some(([9; 32], 3)));
        assert!(rejoin_sheds_a_member(&pool, &member));
        // A retired thread (its released task ran on, and a thread took
        // its place then) is no member: seceding changes nothing, nor
        // does rejoining.
        let retired = SeatRef::default();
        {
            let mut s = seat(&retired);
            s.running = Some(running([8; 32]));
            s.retired = true;
        }
        let gone = unbound(&pool, retired);
        gone.secede();
        assert_eq!((members(&pool), started(&pool)), (1, 2));
        assert!(seceded_rx.try_recv().is_err(), "a released task is no news");
        gone.rejoin();
        assert_eq!(members(&pool), 1);
        pool.close();
    }

    /// A retried timed task (`run_limited`): its first attempt seceded in
    /// a nested wait, timed out and was abandoned, and waits on; the retry
    /// of the same job secedes too. The thread's place is given back once
    /// (one thread in its place, one `TaskSeceded`), and taken again when
    /// the last of the two waits ends. Binding the seat to the attempt would
    /// not do: both attempts secede while theirs is the thread's current
    /// one. Before, the retry gave the place back a second time: a second
    /// thread started and the scheduler heard of the task twice.
    #[test]
    fn a_retried_attempt_gives_its_threads_place_back_once() {
        let (done, _done_rx) = mpsc::unbounded_channel();
        let (seceded, mut seceded_rx) = mpsc::unbounded_channel();
        let pool = Pool::start(1, done, seceded, None);
        let me = SeatRef::default();
        seat(&me).running = Some(running([9; 32]));
        let thread = unbound(&pool, me.clone());
        let first = thread.bound().expect("a thread running a job binds");
        first.secede();
        assert_eq!((members(&pool), started(&pool)), (1, 2));
        assert_eq!(seceded_rx.try_recv().ok(), Some(([9; 32], 3)));
        let retry = thread.bound().unwrap();
        retry.secede();
        assert_eq!(
            (members(&pool), started(&pool)),
            (1, 2),
            "no second thread for one thread's place"
        );
        assert!(seceded_rx.try_recv().is_err(), "the task seceded once");
        // The retry's wait ends first: the first attempt still waits, the
        // place stays given.
        retry.rejoin();
        assert_eq!(members(&pool), 1);
        assert!(rejoin_sheds_a_member(&pool, &*first));
        // A later job of the thread tells the scheduler again.
        seat(&me).running.as_mut().unwrap().id = 4;
        let next = thread.bound().unwrap();
        next.secede();
        assert_eq!(seceded_rx.try_recv().ok(), Some(([9; 32], 4)));
        next.rejoin();
        pool.close();
    }

    /// A user's value whose `Drop` panics.
    struct Boom;
    impl Drop for Boom {
        fn drop(&mut self) {
            panic!("a Boom was dropped");
        }
    }
    impl serde::Serialize for Boom {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_unit()
        }
    }

    /// Reads its inputs in place: the job drops them after it ran.
    struct Peek;
    impl Op for Peek {
        fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(inputs.iter().flatten().count() as i64))
        }
        fn name(&self) -> &str {
            "peek"
        }
    }

    fn job(id: u64, op: Arc<dyn Op>, inputs: Vec<Option<Value>>) -> Job {
        Job {
            id,
            key: [id as u8; 32],
            function: op.name().into(),
            op,
            inputs,
            priority: Default::default(),
            cancelled: Arc::default(),
            claim: Default::default(),
            next: Arc::default(),
        }
    }

    /// Waits up to 10 s for the next report of `done`.
    fn next_done(done: &mut mpsc::UnboundedReceiver<Done>) -> Option<Done> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(d) = done.try_recv() {
                return Some(d);
            }
            if std::time::Instant::now() > until {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Worker rule 16 on a compute thread: a job holding the last
    /// reference to an input whose `Drop` panics (its value was released
    /// from the store while it ran), and a released job that never ran
    /// holding one, drop them quietly; the thread reports the job and
    /// takes the next. Before, the panic ended the thread: no report (the
    /// task hung) and a pool of one thread ran nothing more.
    #[test]
    fn a_compute_thread_survives_inputs_whose_drop_panics() {
        let (done, mut done_rx) = mpsc::unbounded_channel();
        let (seceded, _seceded_rx) = mpsc::unbounded_channel();
        let pool = Pool::start(1, done, seceded, None);
        let boom = || Some(Arc::new(Boom) as Value);
        let released = job(2, Arc::new(Peek), vec![boom()]);
        released
            .cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        pool.submit([job(1, Arc::new(Peek), vec![boom(), None])]);
        pool.submit([released]);
        pool.submit([job(3, Arc::new(Nop), vec![])]);
        // Failing, the pool is leaked: dropping its queued Booms while
        // this test unwinds would abort the test binary.
        let mut reported = || match next_done(&mut done_rx) {
            Some(done) => done,
            None => {
                std::mem::forget(pool.clone());
                panic!("no report: the compute thread died");
            }
        };
        let first = reported();
        assert_eq!(first.id, 1);
        let value = first.outcome.expect("its value stands").value;
        assert_eq!(value.downcast_ref::<i64>(), Some(&1));
        // The released job is not reported; the next one is.
        assert_eq!(reported().id, 3);
        pool.close();
    }

    /// A seat bound to a job (a timed attempt's, `Seat::bound`) gives the
    /// thread back only while the thread runs that job; what it gave, it
    /// takes back whatever the thread runs by then.
    #[test]
    fn a_bound_seat_acts_for_its_own_job_only() {
        let (done, _done_rx) = mpsc::unbounded_channel();
        let (seceded, mut seceded_rx) = mpsc::unbounded_channel();
        let pool = Pool::start(1, done, seceded, None);
        let me = SeatRef::default();
        seat(&me).running = Some(running([9; 32]));
        let thread = unbound(&pool, me.clone());
        let attempt = thread.bound().expect("a thread running a job binds");
        // The thread left job 3 (the attempt was abandoned at its timeout)
        // and runs job 4: the attempt's wait gives nothing back.
        seat(&me).running.as_mut().unwrap().id = 4;
        attempt.secede();
        assert_eq!((members(&pool), started(&pool)), (1, 1));
        assert!(seceded_rx.try_recv().is_err(), "job 4 did not secede");
        attempt.rejoin();
        assert_eq!(members(&pool), 1);
        // An attempt of job 4 that secedes while the thread runs job 4
        // gives its place back, and takes it again after job 5 began.
        let attempt = thread.bound().unwrap();
        attempt.secede();
        assert_eq!((members(&pool), started(&pool)), (1, 2));
        assert_eq!(seceded_rx.try_recv().ok(), Some(([9; 32], 4)));
        seat(&me).running.as_mut().unwrap().id = 5;
        assert!(rejoin_sheds_a_member(&pool, &*attempt));
        pool.close();
    }
}
