//! Chain absorption: fusing linear chains while lowering, before they become
//! plan tasks.
//!
//! The fuse pass ([`super::fuse`]) folds a linear chain only after lowering
//! has given each of its nodes a plan task: a key-map entry, a plan entry and
//! a weight per node, which costs several times what running the fused chain
//! does. Most chains, though, can be recognised on the nodes themselves: a
//! node whose `Arc` only its consumer holds (strong count 1) has exactly one
//! consumer in any graph — no `Delayed`, no other node and no plan refers to
//! it. Lowering ([`crate::graph::lower`]) asks [`absorb`] about every node it
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
//! nothing was absorbed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rask_executor::{Key, Op, OpError, Value};

use crate::node::{Name, Node};

/// The fingerprint of a key: its first eight bytes (keys are uniform).
fn fingerprint(key: &Key) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&key.as_bytes()[..8]);
    u64::from_le_bytes(word)
}

/// The keys of the nodes absorbed into chains during one lowering (rule 2).
///
/// A set of key fingerprints (open addressing, linear probing, at most half
/// full): one probe per absorbed node, far cheaper than a map of keys.
/// Fingerprints stand for keys: two different keys with one fingerprint are
/// taken for a conflict, which only costs a second lowering.
#[derive(Default)]
pub(crate) struct Absorbed {
    /// `0` marks an empty slot (a fingerprint of 0 is stored as 1).
    slots: Vec<u64>,
    len: usize,
    conflict: bool,
}

impl Absorbed {
    /// Makes room for one more key, keeping the table at most half full;
    /// it grows fourfold, so that long chains rehash few times.
    fn reserve_one(&mut self) {
        if (self.len + 1) * 2 <= self.slots.len() {
            return;
        }
        let size = ((self.len + 1) * 4).next_power_of_two().max(64);
        let old = std::mem::replace(&mut self.slots, vec![0; size]);
        for fp in old.into_iter().filter(|&fp| fp != 0) {
            self.place(fp);
        }
    }

    /// Puts `fp` in its slot; returns whether it was there already.
    fn place(&mut self, fp: u64) -> bool {
        let mask = self.slots.len() - 1;
        let mut i = fp as usize & mask;
        loop {
            match self.slots[i] {
                0 => {
                    self.slots[i] = fp;
                    return false;
                }
                x if x == fp => return true,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Records the key of an absorbed node; a key seen twice is a conflict.
    fn insert(&mut self, key: &Key) {
        self.reserve_one();
        if self.place(fingerprint(key).max(1)) {
            self.conflict = true;
        } else {
            self.len += 1;
        }
    }

    /// Whether `key`'s fingerprint was recorded.
    fn contains(&self, key: &Key) -> bool {
        if self.len == 0 {
            return false;
        }
        let fp = fingerprint(key).max(1);
        let mask = self.slots.len() - 1;
        let mut i = fp as usize & mask;
        loop {
            match self.slots[i] {
                0 => return false,
                x if x == fp => return true,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Whether the lowering that absorbed these keys must be redone without
    /// absorbing: an absorbed key was seen twice, or is also one of `tasks`
    /// (the keys of the plan's tasks).
    pub(crate) fn conflict<'a>(&self, mut tasks: impl Iterator<Item = &'a Key>) -> bool {
        self.conflict || (self.len > 0 && tasks.any(|k| self.contains(k)))
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
        len += 1;
        bottom = input;
    }
    if len == 1 {
        return None;
    }
    Some((bottom, Chain::new(top.clone(), bottom, len)))
}

/// Names listed in full in a chain's name; longer chains are `first…last(n)`.
const MAX_LISTED: usize = 3;

/// A linear chain of graph nodes run as one task: each step's value is the
/// next step's only input (see the [module docs](self)).
///
/// It holds its top node only: the nodes below are its input's input and so
/// on, which a node keeps alive and never changes. Running it follows them
/// again (one pointer per node: a single input is held in the node), which
/// costs less than taking and dropping a reference count per step.
pub(crate) struct Chain {
    top: Arc<Node>,
    /// Nodes in the chain, top included (at least 2).
    len: usize,
    name: Name,
}

impl Chain {
    fn new(top: Arc<Node>, bottom: &Node, len: usize) -> Chain {
        let name = if len > MAX_LISTED {
            format!("{}…{}({len})", bottom.name, top.name).into()
        } else {
            let mut names: Vec<&str> = top.chain(len).map(|node| &*node.name).collect();
            names.reverse();
            names.join("+").into()
        };
        Chain { top, len, name }
    }

    /// Number of graph nodes it runs.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Node {
    /// This node, its first input, that one's first input and so on: `len`
    /// nodes at most, top down.
    fn chain(&self, len: usize) -> impl Iterator<Item = &Node> {
        std::iter::successors(Some(self), |node| node.deps.first().map(|n| &**n)).take(len)
    }
}

impl Op for Chain {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let steps: Vec<&Node> = self.top.chain(self.len).collect();
        let mut steps = steps.into_iter().rev();
        let Some(bottom) = steps.next() else {
            return Err(OpError::failed("a chain has no step"));
        };
        let value = step(bottom, inputs);
        // What the bottom step did not take is dropped now, as an executor
        // drops a task's inputs once it ran.
        for slot in inputs.iter_mut() {
            *slot = None;
        }
        let mut value = value?;
        for node in steps {
            let mut slot = [Some(value)];
            value = step(node, &mut slot)?;
        }
        Ok(value)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Runs one step, naming it as the origin of a failure or panic.
fn step(node: &Node, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
    let name = |mut err: OpError| {
        if err.origin.is_none() {
            err.origin = Some((node.key, Arc::from(&*node.name)));
        }
        err
    };
    match catch_unwind(AssertUnwindSafe(|| node.call.run(inputs))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(name(err)),
        Err(payload) => Err(name(OpError::panicked(&*payload))),
    }
}
