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
//! 5. Every decision costs O(log workers) plus the task's inputs: [`Loads`]
//!    keeps the workers ordered by load per thread, then id. Room in a window
//!    is monotone in load per thread (`tasks < threads × per_thread` is
//!    `tasks / threads < per_thread`), and so is idleness, so the first
//!    worker of that order is the lightest with room, or idle, if any is.
//! 6. A *closed* worker — *paused* (scheduler rule S17: it holds back new
//!    tasks for memory), or *reserved* for a task that must run alone
//!    there (S18) — has no room and is never idle; it is placed after
//!    every worker that is not, so rule 5 still holds, and it is no holder
//!    to wait for (rule 2): a task whose inputs it holds goes to a worker
//!    with room, which fetches them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Load {
    /// Tasks assigned and not yet reported.
    pub(crate) tasks: u32,
    /// Compute threads.
    pub(crate) threads: u32,
    /// It holds back new tasks for memory (rule 6).
    pub(crate) paused: bool,
    /// It is kept for one task that must run alone there (rule 6, S18).
    pub(crate) reserved: bool,
}

impl Load {
    /// Whether it is sent no new task: paused or reserved (rule 6).
    pub(crate) fn closed(&self) -> bool {
        self.paused || self.reserved
    }

    /// The most tasks this worker is given at once (rule 3); 0 while
    /// closed (rule 6), which also closes its early count (S9).
    pub(crate) fn window(&self, per_thread: u32) -> u32 {
        if self.closed() {
            return 0;
        }
        self.threads.max(1).saturating_mul(per_thread)
    }

    /// Whether it may be sent one more task: fewer tasks than its window,
    /// which is empty while it is closed (rule 6).
    pub(crate) fn has_room(&self, per_thread: u32) -> bool {
        self.tasks < self.window(per_thread)
    }

    /// Whether it runs nothing and may be sent tasks (rule 6).
    pub(crate) fn idle(&self) -> bool {
        !self.closed() && self.tasks == 0
    }

    /// Whether worker `id` with this load goes before worker `other_id`
    /// with `other`: lighter per thread, then lower id.
    pub(crate) fn lighter_or_first(&self, id: WorkerId, other: &Load, other_id: WorkerId) -> bool {
        self.lighter(other) || (!other.lighter(self) && id < other_id)
    }

    /// `self` goes before `other` in placement order: not closed while
    /// `other` is, or less loaded per thread (rule 6).
    fn lighter(&self, other: &Load) -> bool {
        self.rank() < other.rank()
    }

    fn rank(&self) -> (bool, PerThread) {
        (
            self.closed(),
            PerThread {
                tasks: self.tasks,
                threads: self.threads.max(1),
            },
        )
    }
}

/// Tasks per thread as an exact fraction: `1/2` equals `2/4`. Compared by
/// cross-multiplication, which cannot overflow in `u64` (rule 4), where
/// floats would round two close loads to one.
#[derive(Debug, Clone, Copy)]
struct PerThread {
    tasks: u32,
    /// At least 1.
    threads: u32,
}

impl Ord for PerThread {
    fn cmp(&self, other: &Self) -> Ordering {
        (u64::from(self.tasks) * u64::from(other.threads))
            .cmp(&(u64::from(other.tasks) * u64::from(self.threads)))
    }
}

impl PartialOrd for PerThread {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for PerThread {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for PerThread {}

/// Every worker's load, by id and in placement order: load per thread,
/// then id (rule 5). All changes go through its methods, which keep the two
/// in step.
#[derive(Debug, Default)]
pub(crate) struct Loads {
    by_id: BTreeMap<WorkerId, Load>,
    by_load: BTreeSet<((bool, PerThread), WorkerId)>,
}

impl Loads {
    /// Adds worker `id` with no tasks, or resets it.
    pub(crate) fn insert(&mut self, id: WorkerId, threads: u32) {
        let (paused, reserved) = (false, false);
        self.set(
            id,
            Load {
                tasks: 0,
                threads,
                paused,
                reserved,
            },
        );
    }

    /// Removes worker `id`, returning its load.
    pub(crate) fn remove(&mut self, id: WorkerId) -> Option<Load> {
        let load = self.by_id.remove(&id)?;
        self.by_load.remove(&(load.rank(), id));
        Some(load)
    }

    pub(crate) fn get(&self, id: WorkerId) -> Option<&Load> {
        self.by_id.get(&id)
    }

    /// One more task on worker `id`, if it is known.
    pub(crate) fn add_task(&mut self, id: WorkerId) {
        if let Some(&load) = self.by_id.get(&id) {
            let tasks = load.tasks.saturating_add(1);
            self.set(id, Load { tasks, ..load });
        }
    }

    /// One task fewer on worker `id`, if it is known.
    pub(crate) fn remove_task(&mut self, id: WorkerId) {
        if let Some(&load) = self.by_id.get(&id) {
            let tasks = load.tasks.saturating_sub(1);
            self.set(id, Load { tasks, ..load });
        }
    }

    /// Marks worker `id` paused or not (rule 6), if it is known.
    pub(crate) fn set_paused(&mut self, id: WorkerId, paused: bool) {
        if let Some(&load) = self.by_id.get(&id) {
            self.set(id, Load { paused, ..load });
        }
    }

    /// Marks worker `id` reserved or not (rule 6, S18), if it is known.
    pub(crate) fn set_reserved(&mut self, id: WorkerId, reserved: bool) {
        if let Some(&load) = self.by_id.get(&id) {
            self.set(id, Load { reserved, ..load });
        }
    }

    fn set(&mut self, id: WorkerId, load: Load) {
        if let Some(old) = self.by_id.insert(id, load) {
            self.by_load.remove(&(old.rank(), id));
        }
        self.by_load.insert((load.rank(), id));
    }

    /// The least loaded worker per thread, lowest id first on ties;
    /// closed workers last (rule 6).
    pub(crate) fn lightest(&self) -> Option<(WorkerId, Load)> {
        let &(_, id) = self.by_load.first()?;
        Some((id, self.by_id[&id]))
    }

    /// Workers in placement order (rule 5), lightest first, closed ones
    /// last (rule 6).
    pub(crate) fn in_order(&self) -> impl DoubleEndedIterator<Item = (WorkerId, Load)> + '_ {
        self.by_load.iter().map(|&(_, id)| (id, self.by_id[&id]))
    }

    /// Workers by id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (WorkerId, &Load)> {
        self.by_id.iter().map(|(&id, load)| (id, load))
    }

    /// Checks that the order is the one recomputed from the loads (tests,
    /// and the simulated cluster after every step).
    pub(crate) fn check(&self) {
        let expected: Vec<(WorkerId, Load)> = {
            let mut v: Vec<_> = self.iter().map(|(id, &l)| (id, l)).collect();
            v.sort_by(|(a, la), (b, lb)| la.rank().cmp(&lb.rank()).then(a.cmp(b)));
            v
        };
        let indexed: Vec<(WorkerId, Load)> = self
            .by_load
            .iter()
            .map(|&(_, id)| (id, self.by_id[&id]))
            .collect();
        assert_eq!(indexed, expected, "placement order out of step with loads");
        for &((closed, key), id) in &self.by_load {
            let (held_closed, load) = self.by_id[&id].rank();
            assert!(
                closed == held_closed && key.tasks == load.tasks && key.threads == load.threads,
                "{id} indexed at {key:?}, holds {load:?}"
            );
        }
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
    workers: &Loads,
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
        let Some(load) = workers.get(w).filter(|l| !l.closed()) else {
            continue; // gone, or closed: no holder to wait for (rule 6)
        };
        let of = |id| workers.get(id).expect("only known workers are kept");
        if best_any.is_none_or(|(bw, bb)| better(bytes, load, w, bb, of(bw), bw)) {
            best_any = Some((w, bytes));
        }
        if load.has_room(per_thread)
            && best_room.is_none_or(|(bw, bb)| better(bytes, load, w, bb, of(bw), bw))
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
            return match workers.lightest() {
                Some((idle, l)) if l.idle() => Choice::Worker(idle),
                _ => Choice::Defer,
            };
        }
        if let Some((w, bytes)) = best_room {
            if bytes > 0 {
                return Choice::Worker(w);
            }
        }
    }
    // Rule 5: if the lightest worker has no room, none has.
    match workers.lightest() {
        Some((w, l)) if l.has_room(per_thread) => Choice::Worker(w),
        _ => Choice::Full,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(loads: &[(u32, u32)]) -> Loads {
        let mut ws = Loads::default();
        for (i, &(tasks, threads)) in loads.iter().enumerate() {
            let (paused, reserved) = (false, false);
            ws.set(
                WorkerId(i as u32),
                Load {
                    tasks,
                    threads,
                    paused,
                    reserved,
                },
            );
        }
        ws.check();
        ws
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
        assert_eq!(
            ws.get(WorkerId(0)).unwrap().window(MAX_PER_THREAD),
            u32::MAX
        );
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
    fn a_paused_worker_gets_nothing_and_is_no_holder_to_wait_for() {
        // Worker 0 idle but paused, worker 1 busy with room.
        let mut ws = workers(&[(0, 1), (1, 1)]);
        ws.set_paused(WorkerId(0), true);
        ws.check();
        assert_eq!(ws.lightest().map(|(w, _)| w), Some(WorkerId(1)));
        let a = [WorkerId(0)];
        // Its megabytes are fetched elsewhere rather than waited for.
        let big = choose([(&a[..], 10 << 20)].into_iter(), &ws, 2, &mut vec![]);
        assert_eq!(big, Choice::Worker(WorkerId(1)));
        assert_eq!(ws.get(WorkerId(0)).unwrap().window(2), 0);
        // Every worker paused: none has room.
        ws.set_paused(WorkerId(1), true);
        assert_eq!(
            choose(std::iter::empty(), &ws, 2, &mut vec![]),
            Choice::Full
        );
        ws.set_paused(WorkerId(0), false);
        assert_eq!(
            choose(std::iter::empty(), &ws, 2, &mut vec![]),
            Choice::Worker(WorkerId(0))
        );
    }

    #[test]
    fn a_reserved_worker_stays_closed_whatever_its_memory_says() {
        let mut ws = workers(&[(0, 1), (1, 1)]);
        ws.set_reserved(WorkerId(0), true);
        ws.check();
        let a = [WorkerId(0)];
        let big = choose([(&a[..], 10 << 20)].into_iter(), &ws, 2, &mut vec![]);
        assert_eq!(big, Choice::Worker(WorkerId(1)));
        // Paused and resumed (S17): still reserved, still closed.
        ws.set_paused(WorkerId(0), true);
        ws.set_paused(WorkerId(0), false);
        ws.check();
        assert!(!ws.get(WorkerId(0)).unwrap().idle());
        assert_eq!(ws.get(WorkerId(0)).unwrap().window(2), 0);
        ws.set_reserved(WorkerId(0), false);
        assert_eq!(
            choose(std::iter::empty(), &ws, 2, &mut vec![]),
            Choice::Worker(WorkerId(0))
        );
    }

    #[test]
    fn all_full() {
        let ws = workers(&[(2, 1), (2, 1)]);
        assert_eq!(
            choose(std::iter::empty(), &ws, 2, &mut vec![]),
            Choice::Full
        );
    }

    /// The scan the index replaced: lightest passing `filter`, lowest id
    /// first on ties.
    fn scan(ws: &Loads, filter: impl Fn(&Load) -> bool) -> Option<WorkerId> {
        let mut best: Option<(WorkerId, &Load)> = None;
        for (w, load) in ws.iter() {
            if filter(load) && best.is_none_or(|(_, b)| load.lighter(b)) {
                best = Some((w, load));
            }
        }
        best.map(|(w, _)| w)
    }

    #[test]
    fn the_index_picks_what_a_scan_of_every_worker_picks() {
        // Equal loads per thread with different counts (1/2 and 2/4), ties
        // on id, workers coming and going: a fixed pseudo-random walk.
        let mut ws = Loads::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = WorkerId((x % 12) as u32);
            match (x >> 8) % 10 {
                0 => ws.insert(id, 1 + ((x >> 16) % 4) as u32),
                1 => drop(ws.remove(id)),
                2..=4 => ws.add_task(id),
                5 => ws.set_paused(id, (x >> 20) % 3 == 0),
                6 => ws.set_reserved(id, (x >> 20) % 3 == 0),
                _ => ws.remove_task(id),
            }
            let per_thread = 1 + ((x >> 24) % 4) as u32;
            let lightest = ws.lightest().map(|(w, _)| w);
            assert_eq!(lightest, scan(&ws, |_| true), "step {step}");
            let room = lightest.filter(|&w| ws.get(w).unwrap().has_room(per_thread));
            assert_eq!(room, scan(&ws, |l| l.has_room(per_thread)), "step {step}");
            let idle = lightest.filter(|&w| ws.get(w).unwrap().idle());
            assert_eq!(idle, scan(&ws, |l| l.idle()), "step {step}");
            if step % 64 == 0 {
                ws.check();
            }
        }
    }
}
