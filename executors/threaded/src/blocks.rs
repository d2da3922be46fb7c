//! A run's plan cut into blocks (rule 8 of `run.rs`): which tasks are
//! inner, which keep a state the run's threads share, and the outer
//! dependents of those.
//!
//! Kept as bits and for the shared tasks only: a run's memory is what a
//! compute touches fresh, and on nanosecond tasks touching it costs more
//! than running them. A tree's run holds about 0.4 bytes per task here,
//! plus this index and the state (`run::TaskState`) of its shared tasks,
//! a sixth of them or fewer.

use std::ops::Range;

use rask_executor::Plan;

/// Tasks per word of a [`TaskSet`].
const WORD: u32 = u64::BITS;

/// The most tasks in a block. A block runs on one thread, so a plan has at
/// least `32 × threads` blocks (of one task, in a plan that small) for
/// slow tasks to spread over the threads; past that, larger blocks would
/// make fewer tasks outer, but this size makes a tree's outer tasks a
/// tenth or less.
const MAX_BLOCK: u32 = 64;

/// A set of a plan's tasks, a bit each.
struct TaskSet(Box<[u64]>);

impl TaskSet {
    fn new(tasks: u32) -> Self {
        TaskSet(vec![0; tasks.div_ceil(WORD) as usize].into())
    }

    #[inline]
    fn contains(&self, task: u32) -> bool {
        self.0[(task / WORD) as usize] >> (task % WORD) & 1 != 0
    }

    #[inline]
    fn insert(&mut self, task: u32) {
        self.0[(task / WORD) as usize] |= 1 << (task % WORD);
    }
}

/// The blocks of one plan (rule 8 of `run.rs`).
pub(crate) struct Blocks {
    /// Tasks per block.
    len: u32,
    /// Tasks in the plan.
    tasks: u32,
    inner: TaskSet,
    /// Inner tasks with an outer dependent.
    exports: TaskSet,
    /// Tasks that fill output slots.
    outputs: TaskSet,
    /// The outer tasks, in plan order.
    outer: Box<[u32]>,
    /// For each word of the sets, how many shared tasks (outer, or
    /// exporting) come before it: a shared task's index is that plus the
    /// shared tasks before it in its word.
    before: Box<[u32]>,
    /// The outer dependents of the shared task of index `s` are
    /// `dependents[offsets[s]..offsets[s + 1]]`, one per edge, in plan
    /// order (every dependent of an outer task is outer).
    offsets: Box<[u32]>,
    dependents: Box<[u32]>,
}

impl Blocks {
    /// Cuts `plan` for a run on `threads` threads. O(tasks + edges of outer
    /// tasks).
    pub(crate) fn of(plan: &Plan, threads: usize) -> Blocks {
        let tasks = plan.len() as u32;
        let threads = u32::try_from(threads).unwrap_or(u32::MAX).max(1);
        let len = (tasks / threads.saturating_mul(32)).clamp(1, MAX_BLOCK);
        let mut inner = TaskSet::new(tasks);
        let mut exports = TaskSet::new(tasks);
        let mut outputs = TaskSet::new(tasks);
        for &task in plan.outputs() {
            outputs.insert(task);
        }
        let mut outer = Vec::new();
        for task in 0..tasks {
            let deps = plan.deps(task);
            let first = task - task % len;
            if deps.iter().all(|&d| d >= first && inner.contains(d)) {
                inner.insert(task);
            } else {
                outer.push(task);
                for &d in deps {
                    if inner.contains(d) {
                        exports.insert(d);
                    }
                }
            }
        }
        let mut blocks = Blocks {
            len,
            tasks,
            inner,
            exports,
            outputs,
            outer: outer.into(),
            before: Box::default(),
            offsets: Box::default(),
            dependents: Box::default(),
        };
        let mut shared = 0;
        let before = (0..blocks.inner.0.len())
            .map(|w| {
                let at = shared;
                shared += (blocks.shared_word(w) & blocks.valid(w)).count_ones();
                at
            })
            .collect();
        blocks.before = before;
        // Each shared task's outer dependents: counted, then filled with
        // each task's start as its cursor, which ends at the next task's
        // start (shifted back by one afterwards).
        let mut offsets = vec![0u32; shared as usize + 1];
        for &task in &blocks.outer {
            for &d in plan.deps(task) {
                offsets[blocks.shared(d) + 1] += 1;
            }
        }
        for s in 0..shared as usize {
            offsets[s + 1] += offsets[s];
        }
        let mut dependents = vec![0u32; offsets[shared as usize] as usize];
        for &task in &blocks.outer {
            for &d in plan.deps(task) {
                let at = &mut offsets[blocks.shared(d)];
                dependents[*at as usize] = task;
                *at += 1;
            }
        }
        offsets.copy_within(0..shared as usize, 1);
        offsets[0] = 0;
        blocks.offsets = offsets.into();
        blocks.dependents = dependents.into();
        blocks
    }

    /// How many blocks the plan has.
    pub(crate) fn count(&self) -> usize {
        self.tasks.div_ceil(self.len) as usize
    }

    /// The tasks of block `block`.
    pub(crate) fn tasks_of(&self, block: usize) -> Range<u32> {
        let first = block as u32 * self.len;
        first..(first + self.len).min(self.tasks)
    }

    /// Whether `task` is inner (rule 8).
    #[inline]
    pub(crate) fn is_inner(&self, task: u32) -> bool {
        self.inner.contains(task)
    }

    /// Whether inner `task` has outer dependents.
    #[inline]
    pub(crate) fn exports(&self, task: u32) -> bool {
        self.exports.contains(task)
    }

    /// Whether `task` fills output slots.
    #[inline]
    pub(crate) fn has_outputs(&self, task: u32) -> bool {
        self.outputs.contains(task)
    }

    /// The index of shared `task`'s state, below [`Blocks::shared_len`].
    #[inline]
    pub(crate) fn shared(&self, task: u32) -> usize {
        debug_assert!(!self.is_inner(task) || self.exports(task));
        let w = (task / WORD) as usize;
        let below = self.shared_word(w) & ((1 << (task % WORD)) - 1);
        (self.before[w] + below.count_ones()) as usize
    }

    /// The outer dependents of shared `task`, one per edge, in plan order.
    #[inline]
    pub(crate) fn outer_dependents(&self, task: u32) -> &[u32] {
        let s = self.shared(task);
        &self.dependents[self.offsets[s] as usize..self.offsets[s + 1] as usize]
    }

    /// How many tasks are shared (outer, or exporting).
    pub(crate) fn shared_len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The outer tasks, in plan order.
    pub(crate) fn outer(&self) -> &[u32] {
        &self.outer
    }

    /// The shared tasks, in plan order (their states' order).
    pub(crate) fn shared_tasks(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.inner.0.len()).flat_map(move |w| {
            let first = w as u32 * WORD;
            let mut bits = self.shared_word(w) & self.valid(w);
            std::iter::from_fn(move || {
                let bit = bits.trailing_zeros();
                if bit == WORD {
                    return None;
                }
                bits &= bits - 1;
                Some(first + bit)
            })
        })
    }

    /// The bits of word `w` that stand for tasks of the plan.
    fn valid(&self, w: usize) -> u64 {
        match self.tasks - w as u32 * WORD {
            left if left < WORD => (1 << left) - 1,
            _ => u64::MAX,
        }
    }

    /// Word `w` of the shared tasks (bits past the plan's end may be set).
    #[inline]
    fn shared_word(&self, w: usize) -> u64 {
        !self.inner.0[w] | self.exports.0[w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::{Key, Op, OpError, PlanBuilder, Value};
    use std::sync::Arc;

    struct Nop;
    impl Op for Nop {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(()))
        }
        fn name(&self) -> &str {
            "nop"
        }
    }

    /// A plan of `deps.len()` tasks, task `i` depending on `deps[i]`.
    fn plan(deps: &[&[u32]]) -> Plan {
        let mut b = PlanBuilder::new();
        for (i, deps) in deps.iter().enumerate() {
            b.push(Key([i as u8; 32]), Arc::new(Nop), deps);
        }
        b.output(deps.len() as u32 - 1);
        b.build()
    }

    #[test]
    fn a_task_is_inner_when_its_dependencies_are_inner_tasks_of_its_block() {
        // 200 tasks on one thread: blocks of 6 (200 / 32). Task 7 takes task
        // 5 from the block before; 8 takes 7, outer; 9 takes 6, inner.
        let mut deps: Vec<&[u32]> = vec![&[]; 200];
        deps[7] = &[5];
        deps[8] = &[7, 6];
        deps[9] = &[6];
        deps[199] = &[198, 5];
        let p = plan(&deps);
        let b = Blocks::of(&p, 1);
        assert_eq!(b.len, 6);
        assert_eq!(b.count(), 34);
        assert_eq!(b.tasks_of(33), 198..200);
        assert_eq!(b.outer(), [7, 8, 199]);
        assert!(b.exports(5) && b.exports(6) && b.exports(198));
        assert!(!b.exports(9) && b.is_inner(9));
        let shared: Vec<u32> = b.shared_tasks().collect();
        assert_eq!(shared, [5, 6, 7, 8, 198, 199]);
        assert_eq!(b.shared_len(), 6);
        for (s, &task) in shared.iter().enumerate() {
            assert_eq!(b.shared(task), s);
        }
        assert_eq!(b.outer_dependents(5), [7, 199]);
        assert_eq!(b.outer_dependents(6), [8]);
        assert_eq!(b.outer_dependents(7), [8]);
        assert_eq!(b.outer_dependents(199), [] as [u32; 0]);
        assert!(b.has_outputs(199) && !b.has_outputs(198));
    }

    #[test]
    fn a_task_taking_one_value_twice_has_an_edge_for_each() {
        let mut deps: Vec<&[u32]> = vec![&[]; 70];
        deps[69] = &[3, 3];
        let b = Blocks::of(&plan(&deps), 1);
        assert_eq!(b.outer_dependents(3), [69, 69]);
    }
}
