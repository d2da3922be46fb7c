//! Where a ready task runs, and how much work a worker may hold.
//!
//! Rules:
//!
//! 1. A task goes to the worker holding the most bytes of its inputs, among
//!    workers with room in their window; ties go to the least loaded worker
//!    (tasks per thread), then to the lowest id.
//! 2. A task whose best holder is full waits in the central queue when that
//!    holder has at least [`LOCALITY_BYTES`] of its inputs, unless some worker
//!    is idle: moving megabytes is worth a short wait, but an idle worker is
//!    never left idle while work is queued.
//! 3. A worker's window is `threads × per_thread`, where `per_thread` grows
//!    as tasks get shorter (see [`per_thread`]): enough queued work to cover a
//!    round trip and batch messages, not so much that the last tasks of a run
//!    pile up on one worker while another is idle.
//! 4. Arithmetic saturates. Thread counts and sizes come from workers; the
//!    shell refuses values out of the protocol's ranges, and what gets
//!    through (or a sum over many inputs) still cannot overflow here.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::protocol::WorkerId;

/// Inputs this big on one full worker make a task wait for that worker:
/// moving them costs more than the short wait for a free slot there, and
/// once moved they are held twice.
pub(crate) const LOCALITY_BYTES: u64 = 64 << 10;

/// The amount of queued work per thread that a window aims at.
const TARGET_BACKLOG: Duration = Duration::from_millis(2);

/// Most tasks a worker holds per thread, however short the tasks.
const MAX_PER_THREAD: u32 = 64;

/// What placement needs to know about a worker.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    /// Tasks assigned and not yet reported.
    pub(crate) tasks: u32,
    /// Compute threads.
    pub(crate) threads: u32,
}

impl Load {
    /// The most tasks this worker is given at once (rule 3).
    pub(crate) fn window(&self, per_thread: u32) -> u32 {
        self.threads.max(1).saturating_mul(per_thread)
    }

    fn has_room(&self, per_thread: u32) -> bool {
        self.tasks < self.window(per_thread)
    }

    /// `self` is less loaded than `other`, per thread.
    fn lighter(&self, other: &Load) -> bool {
        (self.tasks as u64) * (other.threads.max(1) as u64)
            < (other.tasks as u64) * (self.threads.max(1) as u64)
    }
}

/// Tasks per thread in a worker's window, given the mean task duration
/// (`None` before any task finished).
///
/// Two per thread at least, so a thread finds its next task waiting while
/// the report of the last one travels; up to [`MAX_PER_THREAD`] for tasks
/// so short that only batching keeps the threads busy.
pub(crate) fn per_thread(mean_ns: Option<f64>) -> u32 {
    match mean_ns {
        None => 2,
        Some(mean) => {
            let target = TARGET_BACKLOG.as_nanos() as f64;
            let n = (target / mean.max(1.0)).ceil();
            (1 + n.clamp(1.0, (MAX_PER_THREAD - 1) as f64) as u32).min(MAX_PER_THREAD)
        }
    }
}

/// The decision for one ready task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Send it to this worker.
    Worker(WorkerId),
    /// Keep it queued: its data is on a full worker (rule 2).
    Defer,
    /// No worker has room.
    Full,
}

/// Chooses a worker for a task whose inputs are `inputs` (holders and size
/// of each input); `scratch` is reused between calls to avoid allocating.
pub(crate) fn choose<'a>(
    inputs: impl Iterator<Item = (&'a [WorkerId], u64)>,
    workers: &BTreeMap<WorkerId, Load>,
    per_thread: u32,
    scratch: &mut Vec<(WorkerId, u64)>,
) -> Choice {
    scratch.clear();
    for (holders, nbytes) in inputs {
        for &h in holders {
            match scratch.iter_mut().find(|(w, _)| *w == h) {
                Some((_, b)) => *b = b.saturating_add(nbytes),
                None => scratch.push((h, nbytes)),
            }
        }
    }
    // Best holder over all workers, and best holder with room.
    let mut best_any: Option<(WorkerId, u64)> = None;
    let mut best_room: Option<(WorkerId, u64)> = None;
    for &(w, bytes) in scratch.iter() {
        let Some(load) = workers.get(&w) else {
            continue;
        };
        if best_any.is_none_or(|(bw, bb)| better(bytes, load, w, bb, &workers[&bw], bw)) {
            best_any = Some((w, bytes));
        }
        if load.has_room(per_thread)
            && best_room.is_none_or(|(bw, bb)| better(bytes, load, w, bb, &workers[&bw], bw))
        {
            best_room = Some((w, bytes));
        }
    }
    if let Some((w, bytes)) = best_any {
        if best_room.map(|(r, _)| r) == Some(w) {
            return Choice::Worker(w);
        }
        if bytes >= LOCALITY_BYTES {
            // Its data is on a full worker: only an idle worker takes it.
            return match lightest(workers, |l| l.tasks == 0) {
                Some(idle) => Choice::Worker(idle),
                None => Choice::Defer,
            };
        }
        if let Some((w, bytes)) = best_room {
            if bytes > 0 {
                return Choice::Worker(w);
            }
        }
    }
    match lightest(workers, |l| l.has_room(per_thread)) {
        Some(w) => Choice::Worker(w),
        None => Choice::Full,
    }
}

/// Whether holder `a` (with `a_bytes` of the inputs) beats holder `b`.
fn better(a_bytes: u64, a: &Load, a_id: WorkerId, b_bytes: u64, b: &Load, b_id: WorkerId) -> bool {
    if a_bytes != b_bytes {
        return a_bytes > b_bytes;
    }
    if a.lighter(b) {
        return true;
    }
    !b.lighter(a) && a_id < b_id
}

/// The least loaded worker passing `filter`, lowest id first on ties.
fn lightest(
    workers: &BTreeMap<WorkerId, Load>,
    filter: impl Fn(&Load) -> bool,
) -> Option<WorkerId> {
    let mut best: Option<(WorkerId, &Load)> = None;
    for (&w, load) in workers {
        if filter(load) && best.is_none_or(|(_, b)| load.lighter(b)) {
            best = Some((w, load));
        }
    }
    best.map(|(w, _)| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(loads: &[(u32, u32)]) -> BTreeMap<WorkerId, Load> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &(tasks, threads))| (WorkerId(i as u32), Load { tasks, threads }))
            .collect()
    }

    #[test]
    fn window_grows_as_tasks_shrink() {
        assert_eq!(per_thread(None), 2);
        assert_eq!(per_thread(Some(1e9)), 2);
        assert_eq!(per_thread(Some(1e6)), 3);
        assert_eq!(per_thread(Some(1e3)), MAX_PER_THREAD);
        assert_eq!(per_thread(Some(0.0)), MAX_PER_THREAD);
    }

    #[test]
    fn most_input_bytes_wins() {
        let ws = workers(&[(0, 1), (1, 1)]);
        let (a, b) = ([WorkerId(0)], [WorkerId(1)]);
        let inputs = [(&a[..], 10), (&b[..], 20)];
        let got = choose(inputs.iter().map(|&(h, n)| (h, n)), &ws, 2, &mut vec![]);
        assert_eq!(got, Choice::Worker(WorkerId(1)));
    }

    #[test]
    fn ties_go_to_the_lighter_worker() {
        let ws = workers(&[(1, 1), (0, 1)]);
        let both = [WorkerId(0), WorkerId(1)];
        let got = choose([(&both[..], 10)].into_iter(), &ws, 2, &mut vec![]);
        assert_eq!(got, Choice::Worker(WorkerId(1)));
        let got = choose(std::iter::empty(), &ws, 2, &mut vec![]);
        assert_eq!(got, Choice::Worker(WorkerId(1)));
        // Per thread: 3 tasks on 4 threads is lighter than 1 on 1.
        let ws = workers(&[(1, 1), (3, 4)]);
        let got = choose(std::iter::empty(), &ws, 8, &mut vec![]);
        assert_eq!(got, Choice::Worker(WorkerId(1)));
    }

    #[test]
    fn small_inputs_move_big_inputs_wait() {
        let ws = workers(&[(2, 1), (1, 1)]); // worker 0 full at 2 per thread
        let a = [WorkerId(0)];
        let small = choose([(&a[..], 100)].into_iter(), &ws, 2, &mut vec![]);
        assert_eq!(small, Choice::Worker(WorkerId(1)));
        let big = choose([(&a[..], LOCALITY_BYTES)].into_iter(), &ws, 2, &mut vec![]);
        assert_eq!(big, Choice::Defer);
        let ws = workers(&[(2, 1), (0, 1)]); // worker 1 idle: it takes it
        let big = choose([(&a[..], LOCALITY_BYTES)].into_iter(), &ws, 2, &mut vec![]);
        assert_eq!(big, Choice::Worker(WorkerId(1)));
    }

    #[test]
    fn a_chunk_of_hundreds_of_kilobytes_is_worth_waiting_for() {
        // `persist`'s 800 KB chunks: a busy holder keeps its 1 µs tasks
        // rather than another worker fetching the chunk for each.
        let ws = workers(&[(2, 1), (1, 1)]);
        let a = [WorkerId(0)];
        let chunk = 800 << 10;
        let got = choose([(&a[..], chunk)].into_iter(), &ws, 2, &mut vec![]);
        assert_eq!(got, Choice::Defer);
    }

    #[test]
    fn extreme_thread_counts_and_sizes_do_not_overflow() {
        // The largest values the types can carry, past the protocol's
        // limits: nothing overflows (debug builds would panic).
        let ws = workers(&[(u32::MAX, u32::MAX), (0, u32::MAX), (u32::MAX, 1)]);
        assert_eq!(ws[&WorkerId(0)].window(MAX_PER_THREAD), u32::MAX);
        let (both, first) = ([WorkerId(0), WorkerId(2)], [WorkerId(0)]);
        let inputs = [
            (&both[..], u64::MAX),
            (&first[..], u64::MAX),
            (&both[..], 1),
        ];
        let got = choose(inputs.iter().copied(), &ws, MAX_PER_THREAD, &mut vec![]);
        // Workers 0 and 2 hold the most (saturated) bytes but are full;
        // worker 1 is idle, so it takes the task (rule 2).
        assert_eq!(got, Choice::Worker(WorkerId(1)));
        // No one idle: the task waits for its holder.
        let ws = workers(&[(u32::MAX, u32::MAX), (u32::MAX - 1, u32::MAX)]);
        let got = choose(inputs.iter().copied(), &ws, u32::MAX, &mut vec![]);
        assert_eq!(got, Choice::Defer);
        // Nothing held anywhere: the worker with room takes it.
        let got = choose(std::iter::empty(), &ws, u32::MAX, &mut vec![]);
        assert_eq!(got, Choice::Worker(WorkerId(1)));
        let ws = workers(&[(u32::MAX, 1), (u32::MAX, 0)]);
        assert_eq!(
            choose(std::iter::empty(), &ws, u32::MAX, &mut vec![]),
            Choice::Full
        );
        // Means far beyond any real task, or none at all, give sane windows.
        assert_eq!(per_thread(Some(f64::MAX)), 2);
        assert_eq!(per_thread(Some(u64::MAX as f64)), 2);
        assert_eq!(per_thread(Some(f64::INFINITY)), 2);
        assert_eq!(per_thread(Some(f64::NAN)), MAX_PER_THREAD);
    }

    #[test]
    fn all_full() {
        let ws = workers(&[(2, 1), (2, 1)]);
        assert_eq!(
            choose(std::iter::empty(), &ws, 2, &mut vec![]),
            Choice::Full
        );
    }
}
