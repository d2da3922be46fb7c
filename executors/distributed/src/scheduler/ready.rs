//! A priority queue for ready work that costs O(1) when entries arrive in
//! order.
//!
//! The scheduler's queues hold `(Priority, TaskId)` and hand out the least
//! first. Most entries arrive already in order: a submission's tasks get
//! rising submission orders, and most have the default user priority. A
//! binary heap pays O(log n) for each push and pop regardless, walking a
//! 100,000-entry array on every task of a large map. [`Ready`] keeps the
//! entries that arrive in order in a sorted run (a `VecDeque`: an entry no
//! less than its back is pushed there, one no greater than its front is
//! pushed at the front, and pops take the front) and the rest in a heap;
//! the least entry is the lesser of the two heads. Entries arriving in
//! falling order (a tree's leaves reached from its root) stay O(1) too. Entries out of order (a raised
//! priority, a task given back, work deferred by a pass) cost what a heap
//! costs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// A min-queue of `K`: [`pop`](Ready::pop) returns the least entry.
#[derive(Debug)]
pub(crate) struct Ready<K> {
    /// Entries that arrived no less, or no greater, than every entry here
    /// before them, ascending.
    run: VecDeque<K>,
    /// The others.
    heap: BinaryHeap<Reverse<K>>,
}

impl<K> Default for Ready<K>
where
    K: Ord,
{
    fn default() -> Self {
        Ready {
            run: VecDeque::new(),
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord + Copy> Ready<K> {
    /// Adds `entry`.
    pub(crate) fn push(&mut self, entry: K) {
        match (self.run.front(), self.run.back()) {
            (Some(first), Some(last)) if *first < entry && entry < *last => {
                self.heap.push(Reverse(entry))
            }
            (Some(first), _) if entry <= *first => self.run.push_front(entry),
            _ => self.run.push_back(entry),
        }
    }

    /// The least entry, without removing it.
    pub(crate) fn peek(&self) -> Option<K> {
        match (self.run.front(), self.heap.peek()) {
            (Some(&a), Some(&Reverse(b))) => Some(a.min(b)),
            (a, b) => a.copied().or(b.map(|r| r.0)),
        }
    }

    /// Removes and returns the least entry.
    pub(crate) fn pop(&mut self) -> Option<K> {
        let from_run = match (self.run.front(), self.heap.peek()) {
            (Some(a), Some(Reverse(b))) => a <= b,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if from_run {
            self.run.pop_front()
        } else {
            self.heap.pop().map(|r| r.0)
        }
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.run.is_empty() && self.heap.is_empty()
    }

    /// Every entry, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &K> {
        self.run.iter().chain(self.heap.iter().map(|r| &r.0))
    }
}

impl<K: Ord + Copy> Extend<K> for Ready<K> {
    fn extend<I: IntoIterator<Item = K>>(&mut self, entries: I) {
        for entry in entries {
            self.push(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever the order of pushes and pops, it hands out what a
        /// binary heap does.
        #[test]
        fn pops_what_a_heap_pops(ops in proptest::collection::vec(proptest::option::of(0u16..50), 0..500)) {
            let mut ready = Ready::default();
            let mut heap = BinaryHeap::new();
            for op in ops {
                match op {
                    Some(k) => {
                        ready.push(k);
                        heap.push(Reverse(k));
                    }
                    None => {
                        proptest::prop_assert_eq!(ready.peek(), heap.peek().map(|r| r.0));
                        proptest::prop_assert_eq!(ready.pop(), heap.pop().map(|r| r.0));
                    }
                }
                proptest::prop_assert_eq!(ready.is_empty(), heap.is_empty());
                proptest::prop_assert_eq!(ready.iter().count(), heap.len());
            }
        }
    }

    #[test]
    fn entries_in_order_never_reach_the_heap() {
        let mut ready = Ready::default();
        ready.extend(500..1000u32);
        ready.push(1000);
        ready.extend((0..500).rev());
        assert!(ready.heap.is_empty());
        ready.push(5);
        assert_eq!(ready.heap.len(), 1);
        let popped: Vec<u32> = std::iter::from_fn(|| ready.pop()).collect();
        let mut expected: Vec<u32> = (0..=1000).collect();
        expected.insert(6, 5);
        assert_eq!(popped, expected);
    }
}
