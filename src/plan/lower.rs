//! Lowering: the nodes behind the requested outputs become a [`Draft`], a
//! plan in the order it runs, for the passes of the pipeline (`mod.rs`).
//!
//! Rules:
//!
//! 1. Tasks with equal keys are one task: lowering keeps the first node found
//!    for a key, so shared work runs once, within a graph and across graphs
//!    merged into one computation.
//! 2. Lowering visits dependencies depth-first, in argument order, and emits a
//!    task after its inputs (a post-order: `build::graph::postorder`). That
//!    order is the plan order: a branch finishes before the next one starts,
//!    which keeps few intermediate values alive at once.
//! 3. For a cluster (`remote`), a task is [`Weight::Alone`] when the
//!    cluster must see it as a task of its own ([`travels_alone`]): limits
//!    and annotations apply per wire task, a held key is used in place
//!    only as a task, and a future is waited for as one. A node replaced by
//!    `cut` is alone too (its op was made elsewhere), on any executor when
//!    the caller asks so ([`Options::cut_alone`]).

use std::sync::Arc;

use rask_executor::{Op, Plan, PlanBuilder};

use super::{chain, Draft, Options, Weight};
use crate::build::graph::{self, postorder, postorder_marked};
use crate::build::node::Node;

/// Lowers the graph behind `roots` into a draft whose outputs are the roots,
/// in order: the first stage of [`plan`](super::plan).
///
/// `cut(node)` is asked once per key before its inputs are visited: `Some(op)`
/// replaces the node and everything it depends on with `op` (see
/// [`postorder`]), e.g. a value the caller already holds.
///
/// When `opts` [absorbs chains](Options::absorbs_chains), linear chains are fused as they are found
/// ([`chain`]); the plan is what the fuse pass would
/// make of it, built without a plan task per chain node. When an absorbed
/// key is also found elsewhere (chain rule 2), lowers again without.
///
/// With `repeatable` (`cut` may be asked again about a node, with the same
/// answer and no effect that matters), lowering finds the nodes it emitted
/// by their marks, not by a map from keys ([`postorder_marked`]), and
/// lowers again with the map in the rare case that fails. Without it, `cut`
/// is asked exactly once per key.
///
/// # Complexity
///
/// O(nodes + edges) time; with `repeatable`, no map, else one hash-map entry
/// per distinct key (one set entry per absorbed node); twice that when
/// absorbing found a key twice, or a key was found in two distinct nodes.
pub(crate) fn lower(
    roots: &[Arc<Node>],
    opts: &Options,
    repeatable: bool,
    mut cut: impl FnMut(&Arc<Node>) -> Option<Arc<dyn Op>>,
) -> Draft {
    let mut marked = repeatable;
    let alone = Alone {
        remote: opts.remote,
        cut: opts.remote || opts.cut_alone,
    };
    if opts.absorbs_chains() {
        let mut absorbed = chain::Absorbed::default();
        let lowered = lower_weighed(roots, Some(&mut absorbed), marked, alone, &mut cut);
        match lowered {
            Some((plan, weights, sizes, single_inputs)) => {
                if !absorbed.conflict(plan.keys()) {
                    return Draft::with_sizes(plan, weights, sizes).lowered(single_inputs);
                }
            }
            None => marked = false,
        }
    }
    if marked {
        if let Some((plan, weights, _, single_inputs)) =
            lower_weighed(roots, None, true, alone, &mut cut)
        {
            return Draft::new(plan, weights).lowered(single_inputs);
        }
    }
    let (plan, weights, _, single_inputs) =
        lower_weighed(roots, None, false, alone, cut).expect("lowering by key map always succeeds");
    Draft::new(plan, weights).lowered(single_inputs)
}

/// Which tasks lowering makes [`Weight::Alone`] (rule 3).
#[derive(Clone, Copy)]
struct Alone {
    /// Those that [travel alone](travels_alone) to a cluster.
    remote: bool,
    /// Those `cut` replaced.
    cut: bool,
}

/// The plan of [`lower`], plus whether each task is data (a replaced node counts as
/// a call), when chains were absorbed how many graph nodes each task
/// stands for (empty otherwise), and whether any task has exactly one input.
/// `None` when lowering by marks failed.
fn lower_weighed(
    roots: &[Arc<Node>],
    absorbed: Option<&mut chain::Absorbed>,
    marked: bool,
    alone: Alone,
    cut: impl FnMut(&Arc<Node>) -> Option<Arc<dyn Op>>,
) -> Option<(Plan, Vec<Weight>, Vec<u32>, bool)> {
    let tasks = graph::tasks_hint(roots);
    let mut b = PlanBuilder::with_capacity(tasks);
    let mut single_inputs = false;
    let mut weights = Vec::with_capacity(tasks);
    let mut sizes = Vec::new();
    let mut absorbed = absorbed;
    // The plan keeps the roots, which keep every node it is given by
    // reference: no count per node to raise here and lower again when the
    // plan is dropped.
    let outputs = b.keeping(roots.to_vec(), |roots, b| {
        let absorb = |node| {
            let (bottom, chain) = chain::absorb(node, absorbed.as_deref_mut()?)?;
            let size = chain.len() as u32;
            Some((bottom, Arc::new(chain) as Arc<dyn Op>, size))
        };
        let emit = emitter(roots, |node, replacement, deps, size| {
            // A chain also replaces its top node; it stands for two or more.
            let was_cut = replacement.is_some() && size == 1;
            let weight = match replacement {
                _ if (alone.cut && was_cut) || (alone.remote && travels_alone(node)) => {
                    Weight::Alone
                }
                // Data cannot fail (invariant 5), unless a timeout bounds
                // it (`value(x).timeout(..)`): that one is work like any.
                None if node.is_data() && node.call.timeout().is_none() => Weight::Data,
                _ => Weight::Normal,
            };
            if size > 1 && sizes.is_empty() {
                sizes.resize(weights.len(), 1);
            }
            if size > 1 || !sizes.is_empty() {
                sizes.push(size);
            }
            single_inputs |= deps.len() == 1;
            match replacement {
                Some(op) => b.push_owned(node.key, op, deps),
                None => b.push(node.key, &**node, deps),
            };
            weights.push(weight);
        });
        if marked {
            postorder_marked(roots, tasks, absorb, cut, emit)
        } else {
            Some(postorder(roots, absorb, cut, emit))
        }
    })?;
    for i in outputs {
        b.output(i);
    }
    Some((b.build(), weights, sizes, single_inputs))
}

/// `emit` as [`lower_weighed`] gives it to the walk: the nodes it is given
/// are borrowed from `roots` for `'a`, so it may push them by reference.
fn emitter<'a, F>(_roots: &'a [Arc<Node>], emit: F) -> F
where
    F: FnMut(&'a Arc<Node>, Option<Arc<dyn Op>>, &[u32], u32),
{
    emit
}

/// Whether `node` must reach a cluster as a wire task of its own (rule 3):
/// it has a timeout, retries or annotations, stands for a future, or holds
/// a value the cluster keeps (which travels as its key, `rask.remote`).
pub(crate) fn travels_alone(node: &Node) -> bool {
    let call = &node.call;
    call.timeout().is_some()
        || call.retries() > 0
        || call.annotations().is_some()
        || call.is_future()
        || call
            .value()
            .is_some_and(|v| v.is::<rask_executor::Remote>())
}
