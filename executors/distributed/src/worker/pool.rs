//! The worker's compute threads (worker rules 2 and 10): a priority queue
//! of jobs, the threads that take them, and what each thread runs now, so
//! the watchdog can retire a thread stuck in a released task and start
//! another in its place.

use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use super::run_link;
use super::state::{Done, Job};
use super::watchdog::Running;

/// Jobs waiting for a thread, lowest priority number first.
struct Queue {
    heap: BinaryHeap<Queued>,
    closed: bool,
    /// Threads blocked on the condition variable: only they need a wake-up.
    sleeping: usize,
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
    /// The seat of every live compute thread, retired ones included.
    seats: Mutex<Vec<SeatRef>>,
    /// Compute threads started so far, for their names.
    started: Mutex<usize>,
}

/// The worker's compute threads (rule 2). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Starts `threads` compute threads that report to `done`.
    pub(crate) fn start(threads: usize, done: mpsc::UnboundedSender<Done>) -> Pool {
        let pool = Pool {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    heap: BinaryHeap::new(),
                    closed: false,
                    sleeping: 0,
                }),
                ready: Condvar::new(),
                done,
                seats: Mutex::new(Vec::new()),
                started: Mutex::new(0),
            }),
        };
        for _ in 0..threads {
            // A thread that cannot be spawned leaves the pool smaller; the
            // worker still runs as long as one thread exists.
            pool.add_thread();
        }
        pool
    }

    /// Starts one more compute thread; false if the system refused.
    pub(crate) fn add_thread(&self) -> bool {
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
                compute_thread(&shared, &mine)
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
        self.queue().heap.clear();
    }

    /// Threads exit once idle; running ops finish first, unobserved.
    pub(crate) fn close(&self) {
        let mut q = self.queue();
        q.closed = true;
        q.heap.clear();
        self.shared.ready.notify_all();
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
            let open = done.is_none_or(|d| shared.done.send(d).is_ok());
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
