//! Chain absorption: fusing linear chains while lowering, before they become
//! plan tasks.
//!
//! The fuse pass ([`super::fuse`]) folds a linear chain only after lowering
//! has given each of its nodes a plan task: a key-map entry, a plan entry and
//! a weight per node, which costs several times what running the fused chain
//! does. Most chains, though, can be recognised on the nodes themselves: a
//! node whose `Arc` only its consumer holds (strong count 1) has exactly one
//! consumer in any graph — no `Delayed`, no other node and no plan refers to
//! it. Lowering ([`lower`](super::lower::lower)) asks [`absorb`] about every node it
//! enters, and a node whose only input is such a node takes that input in as
//! the step before it, and so on down the chain. The whole chain becomes one
//! draft task, a [`Chain`], under the key of its top node, with the inputs of
//! its bottom node.
//!
//! # Rules
//!
//! 1. **Only what fuse would fold.** An absorbed node has one consumer edge
//!    (strong count 1: its consumer's only input), is not an output (an
//!    output is also held by the caller), and is not pinned (absorption only
//!    runs when no key is kept). Data and futures are never absorbed: data is
//!    for inline to fold, and a future must be waited for before the plan
//!    runs (`Call::prepare`).
//! 2. **One task per key, still.** Absorbed nodes are not in lowering's key
//!    map, so [`Absorbed`] records their keys: if an absorbed key shows up
//!    twice, or also as a plan task, lowering starts again without absorbing
//!    anything (the graph then lowers exactly as with absorption off). Such a
//!    graph has two separately built nodes with one key, which is rare.
//! 3. **Same values, same failures.** A chain runs its steps bottom-up, each
//!    step's value moved into the next (so `Arc::try_unwrap` still avoids a
//!    copy); a step that fails or panics names itself (`OpError::origin`),
//!    as in a fused task. Only the bottom step has external inputs, so a
//!    failed input fails the chain before any step runs, as it would fail the
//!    bottom task.
//!
//! A [`Chain`] is an ordinary op to the passes after lowering: fuse may fold
//! it into a larger group. Like a fused task, once started it runs to its
//! end or its first failure.
//!
//! # Complexity
//!
//! O(1) per node: a strong-count read and one set insertion per absorbed
//! node; the set check at the end is one lookup per plan task, skipped when
//! nothing was absorbed. A chain holds one reference per [`SEGMENT`] steps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Value};

use super::{group_name, named_origin, MAX_LISTED};
use crate::build::node::{Name, Node};

/// The fingerprint of a key: its first eight bytes (keys are uniform), never
/// 0 (which marks an empty slot of [`Absorbed`]).
fn fingerprint(key: &Key) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&key.as_bytes()[..8]);
    u64::from_le_bytes(word).max(1)
}

/// The keys of the nodes absorbed into chains during one lowering (rule 2).
///
/// A set of key fingerprints (open addressing, linear probing, at most half
/// full): one probe per absorbed node, far cheaper than a map of keys.
/// Fingerprints stand for keys: two different keys with one fingerprint are
/// taken for a conflict, which only costs a second lowering.
///
/// A large table is handed back to its thread when lowering is done and
/// reused by the next lowering that needs one about that size: a fresh one
/// costs a page fault per 4 KiB, several times what clearing it does.
#[derive(Default)]
pub(crate) struct Absorbed {
    /// `0` marks an empty slot ([`fingerprint`] is never 0).
    slots: Vec<u64>,
    len: usize,
    conflict: bool,
}

/// Tables of at least this many slots are kept for reuse ([`Absorbed`]).
const SPARE_MIN: usize = 1 << 14;
/// Nor more than this many (16 MiB).
const SPARE_MAX: usize = 1 << 21;

thread_local! {
    /// A table for this thread's next large lowering; cleared when taken.
    static SPARE: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Absorbed {
    /// Makes room for one more key, keeping the table at most half full;
    /// it grows fourfold, so that long chains rehash few times.
    fn reserve_one(&mut self) {
        if (self.len + 1) * 2 <= self.slots.len() {
            return;
        }
        let size = (self.slots.len() * 4).max(64);
        let old = std::mem::replace(&mut self.slots, Absorbed::table(size));
        for fp in old.into_iter().filter(|&fp| fp != 0) {
            self.place(fp);
        }
    }

    /// An empty table of at least `size` slots (a power of two): this
    /// thread's spare one when it is no more than four times that, else a
    /// new one.
    fn table(size: usize) -> Vec<u64> {
        if size >= SPARE_MIN {
            let spare = SPARE.with(|spare| {
                let mut spare = spare.borrow_mut();
                let fits = spare.len() >= size && spare.len() <= size * 4;
                fits.then(|| std::mem::take(&mut *spare))
            });
            if let Some(mut table) = spare {
                table.fill(0);
                return table;
            }
        }
        vec![0; size]
    }

    /// The slot holding `fp`, or the empty slot where it belongs: `(slot,
    /// found)`.
    fn probe(&self, fp: u64) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut i = fp as usize & mask;
        loop {
            match self.slots[i] {
                0 => return (i, false),
                x if x == fp => return (i, true),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Puts `fp` in its slot; returns whether it was there already.
    fn place(&mut self, fp: u64) -> bool {
        let (i, found) = self.probe(fp);
        self.slots[i] = fp;
        found
    }

    /// Records the key of an absorbed node; a key seen twice is a conflict.
    fn insert(&mut self, key: &Key) {
        self.reserve_one();
        if self.place(fingerprint(key)) {
            self.conflict = true;
        } else {
            self.len += 1;
        }
    }

    /// Whether `key`'s fingerprint was recorded.
    fn contains(&self, key: &Key) -> bool {
        self.len > 0 && self.probe(fingerprint(key)).1
    }

    /// Whether the lowering that absorbed these keys must be redone without
    /// absorbing: an absorbed key was seen twice, or is also one of `tasks`
    /// (the keys of the plan's tasks).
    pub(crate) fn conflict<'a>(&self, mut tasks: impl Iterator<Item = &'a Key>) -> bool {
        self.conflict || (self.len > 0 && tasks.any(|k| self.contains(k)))
    }
}

impl Drop for Absorbed {
    /// Hands a large table back to the thread (see [`Absorbed`]), keeping
    /// the larger of it and the spare already there.
    fn drop(&mut self) {
        let size = self.slots.len();
        if (SPARE_MIN..=SPARE_MAX).contains(&size) {
            let table = std::mem::take(&mut self.slots);
            // Fails only while the thread is being torn down: then the
            // table is simply freed.
            let _ = SPARE.try_with(|spare| {
                if let Ok(mut spare) = spare.try_borrow_mut() {
                    if spare.len() < size {
                        *spare = table;
                    }
                }
            });
        }
    }
}

/// If `top`'s only input can be absorbed (rule 1), absorbs the chain below
/// `top` and returns its bottom node, whose inputs the chain takes, and the
/// [`Chain`] that runs it; `None` when there is nothing to absorb.
///
/// # Complexity
///
/// O(length of the chain).
pub(crate) fn absorb<'a>(
    top: &'a Arc<Node>,
    absorbed: &mut Absorbed,
) -> Option<(&'a Arc<Node>, Chain)> {
    let mut bottom = top;
    let mut len = 1;
    let mut marks = Vec::new();
    while let [input] = &*bottom.deps {
        // A strong count of 1 is the consumer's own reference: no other node,
        // `Delayed` or plan holds this one. (Another thread lowering the same
        // graph holds references for a while; that only means less is
        // absorbed.)
        if Arc::strong_count(input) != 1
            || (input.deps.is_empty() && (input.is_data() || input.call.is_future()))
        {
            break;
        }
        absorbed.insert(&input.key);
        if len % SEGMENT == 0 {
            marks.push(input.clone());
        }
        len += 1;
        bottom = input;
    }
    if len == 1 {
        return None;
    }
    Some((bottom, Chain::new(top.clone(), marks, bottom, len)))
}

/// Steps per segment of a chain (see [`Chain`]).
const SEGMENT: usize = 64;

/// A linear chain of graph nodes run as one task: each step's value is the
/// next step's only input (see the [module docs](self)).
///
/// The steps run bottom-up, but a node only leads to its input, down. So a
/// chain holds a node every [`SEGMENT`] steps (the top, then its marks): it
/// runs the lowest segment first, finding its nodes from the segment's first
/// node into a small buffer, then the one above, and so on. That costs one
/// reference count per segment, not per step, and no buffer as long as the
/// chain. (The nodes between two marks stay alive: a node holds its input,
/// and never changes.)
pub(crate) struct Chain {
    /// The top node: the first node of the top segment.
    top: Arc<Node>,
    /// The first node of each further segment, top down: the node `SEGMENT
    /// × (i + 1)` steps below the top.
    marks: Box<[Arc<Node>]>,
    /// Nodes in the chain, top included (at least 2).
    len: usize,
    name: Name,
}

impl Chain {
    fn new(top: Arc<Node>, marks: Vec<Arc<Node>>, bottom: &Node, len: usize) -> Chain {
        // Run order is bottom-up; a long chain names its ends only.
        let mut listed: Vec<&str> = match len {
            n if n > MAX_LISTED => vec![bottom.name()],
            n => top.first_inputs(n).map(|node| node.name()).collect(),
        };
        listed.reverse();
        let name = group_name(len, &listed, top.name()).into();
        Chain {
            top,
            marks: marks.into_boxed_slice(),
            len,
            name,
        }
    }

    /// Number of graph nodes it runs.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first node of segment `i` (segment 0 starts at the top).
    fn segment_start(&self, i: usize) -> &Node {
        match i {
            0 => &self.top,
            i => &self.marks[i - 1],
        }
    }

    /// How many nodes segment `i` has.
    fn segment_len(&self, i: usize) -> usize {
        SEGMENT.min(self.len - SEGMENT * i)
    }
}

impl Node {
    /// This node, its first input, that one's first input and so on: `len`
    /// nodes at most, top down.
    fn first_inputs(&self, len: usize) -> impl Iterator<Item = &Node> {
        std::iter::successors(Some(self), |node| node.deps.first().map(|n| &**n)).take(len)
    }
}

impl Op for Chain {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        // The step running, to name it if it panics: one unwinding guard for
        // the whole chain rather than one per step.
        let mut running: Option<&Node> = None;
        match catch_unwind(AssertUnwindSafe(|| self.steps(inputs, &mut running))) {
            Ok(outcome) => outcome,
            Err(payload) => {
                let err = OpError::panicked(&*payload);
                Err(match running {
                    Some(node) => named(node, err),
                    None => err,
                })
            }
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// The top node's: the chain stands for it.
    fn key(&self) -> Option<&Key> {
        Some(&self.top.key)
    }
}

impl Chain {
    /// Runs the steps, segments bottom-up, keeping `running` on the step
    /// that runs. Finding a segment's nodes is one dependent load per node,
    /// so the segment above is found one node per step while this one runs:
    /// the two walks overlap.
    fn steps<'a>(
        &'a self,
        inputs: &mut [Option<Value>],
        running: &mut Option<&'a Node>,
    ) -> Result<Value, OpError> {
        let last = self.marks.len();
        let mut current: Vec<&Node> = self
            .segment_start(last)
            .first_inputs(self.segment_len(last))
            .collect();
        let mut above: Vec<&Node> = Vec::with_capacity(SEGMENT);
        let mut value: Option<Value> = None;
        for i in (0..=last).rev() {
            // The walk of segment `i - 1`, advanced as this one runs.
            let mut walk = match i {
                0 => None,
                i => Some(
                    self.segment_start(i - 1)
                        .first_inputs(self.segment_len(i - 1)),
                ),
            };
            above.clear();
            for &node in current.iter().rev() {
                if let Some(next) = walk.as_mut().and_then(Iterator::next) {
                    above.push(next);
                }
                *running = Some(node);
                let outcome = match value.take() {
                    Some(below) => node.call.run(&mut [Some(below)]),
                    None => {
                        // The bottom step, on the chain's inputs. What it
                        // did not take is dropped now, as an executor drops
                        // a task's inputs once it ran.
                        let outcome = node.call.run(inputs);
                        for slot in inputs.iter_mut() {
                            *slot = None;
                        }
                        outcome
                    }
                };
                value = Some(outcome.map_err(|err| named(node, err))?);
            }
            above.extend(walk.into_iter().flatten());
            std::mem::swap(&mut current, &mut above);
        }
        value.ok_or_else(|| OpError::failed("a chain has no step"))
    }
}

/// Names `node` as where `err` started, unless it names a task already.
fn named(node: &Node, err: OpError) -> OpError {
    named_origin(node.key, node.name(), err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct keys with distinct fingerprints, spread over the table.
    fn key(i: u64) -> Key {
        let mut k = [0xa5u8; 32];
        let fp = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        k[..8].copy_from_slice(&fp.to_le_bytes());
        Key(k)
    }

    fn spare_len() -> usize {
        SPARE.with(|spare| spare.borrow().len())
    }

    #[test]
    fn a_key_absorbed_twice_or_also_a_task_is_a_conflict() {
        let mut absorbed = Absorbed::default();
        for i in 0..1000 {
            absorbed.insert(&key(i));
        }
        assert!(!absorbed.conflict([key(1000), key(5000)].iter()));
        assert!(absorbed.conflict([key(1000), key(999)].iter()));
        assert!(absorbed.conflict([key(0)].iter()));
        absorbed.insert(&key(500));
        assert!(absorbed.conflict(std::iter::empty()));
        assert!(!Absorbed::default().conflict([key(1)].iter()));
    }

    #[test]
    fn a_large_table_is_reused_by_the_next_lowering_cleared() {
        SPARE.with(|spare| spare.borrow_mut().clear());
        let n = SPARE_MIN as u64; // grows the table past SPARE_MIN slots
        let mut first = Absorbed::default();
        for i in 0..n {
            first.insert(&key(i));
        }
        let size = first.slots.len();
        assert!(size >= SPARE_MIN);
        drop(first);
        assert_eq!(spare_len(), size);
        // The same keys again: a table that was not cleared would report
        // every one as seen twice.
        let mut second = Absorbed::default();
        for i in 0..n {
            second.insert(&key(i));
        }
        assert_eq!(spare_len(), 0, "the spare table is in use");
        assert_eq!(second.slots.len(), size);
        assert!(!second.conflict(std::iter::empty()));
        assert!(second.conflict([key(n - 1)].iter()));
        assert!(!second.conflict([key(n)].iter()));
        drop(second);
        assert_eq!(spare_len(), size);
    }
}
