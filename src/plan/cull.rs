//! Pass 1, cull: keep only the tasks the outputs need.
//!
//! Lowering from the requested outputs already visits only what they reach,
//! so on a lowered graph this pass is a check that finds nothing to drop. It
//! matters for plans assembled by other means (a client merging graphs, a
//! hand-made plan), and it keeps later passes from folding work nobody asked
//! for. The check is one backward sweep over a flag per task; only when a
//! task is dropped is a new plan built.

use rask_executor::PlanBuilder;

use super::Draft;

/// Drops every task that no output depends on, directly or not.
///
/// Kept tasks keep their keys, ops, dependency order and relative order;
/// outputs keep their slots. When every task is needed, `draft` is returned
/// unchanged, without copying anything.
///
/// # Complexity
///
/// O(tasks + edges) time; one flag per task, plus a new plan only when a
/// task is dropped.
pub(crate) fn cull(draft: Draft) -> Draft {
    let n = draft.len();
    let mut needed = vec![false; n];
    for &o in draft.outputs() {
        needed[o as usize] = true;
    }
    // Inputs come before the tasks that use them (plan invariant 1): one
    // sweep from the end marks everything an output reaches.
    let mut count = 0usize;
    for i in (0..n as u32).rev() {
        if needed[i as usize] {
            count += 1;
            for &d in draft.deps(i) {
                needed[d as usize] = true;
            }
        }
    }
    if count == n {
        return draft;
    }
    let mut index = vec![u32::MAX; n];
    let mut b = PlanBuilder::with_capacity(count);
    let mut weights = Vec::with_capacity(count);
    let mut sizes = Vec::new();
    let mut deps = Vec::new();
    for i in 0..n as u32 {
        if !needed[i as usize] {
            continue;
        }
        deps.clear();
        deps.extend(draft.deps(i).iter().map(|&d| index[d as usize]));
        index[i as usize] = b.push_task_of(draft.shared_plan(), i, draft.key(i), &deps);
        weights.push(draft.weight(i));
        if !draft.sizes.is_empty() {
            sizes.push(draft.size(i));
        }
    }
    for &o in draft.outputs() {
        b.output(index[o as usize]);
    }
    Draft::with_sizes(b.build(), weights, sizes)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{draft, key, names, run, Does::*, D, N};
    use super::*;

    #[test]
    fn drops_what_no_output_needs() {
        let d = draft(
            &[
                ("a", N, Sum(1), &[]),
                ("unused", N, Sum(2), &[0]),
                ("v", D, Sum(3), &[]),
                ("b", N, Sum(0), &[0, 2]),
                ("also_unused", N, Sum(0), &[3]),
                ("c", N, Sum(10), &[]),
            ],
            &[3, 5, 3],
        );
        let culled = cull(d);
        let weights: Vec<_> = (0..4).map(|i| culled.weight(i)).collect();
        assert_eq!(weights, vec![N, D, N, N]);
        assert_eq!(culled.deps(2), &[0, 1]);
        assert_eq!(culled.outputs(), &[2, 3, 2]);
        let plan = culled.into_plan();
        assert_eq!(names(&plan), vec!["a", "v", "b", "c"]);
        let keys: Vec<_> = plan.keys().copied().collect();
        assert_eq!(keys, vec![key(0), key(2), key(3), key(5)]);
        assert_eq!(run(plan), vec![Ok(4), Ok(10), Ok(4)]);
    }

    #[test]
    fn keeps_a_plan_where_everything_is_needed() {
        let d = draft(&[("a", N, Sum(1), &[]), ("b", N, Sum(1), &[0, 0])], &[1, 0]);
        let plan = cull(d).into_plan();
        let keys: Vec<_> = plan.keys().copied().collect();
        assert_eq!(keys, vec![key(0), key(1)]);
        assert_eq!(plan.deps(1), &[0, 0]);
        assert_eq!(run(plan), vec![Ok(3), Ok(1)]);
    }

    #[test]
    fn a_plan_without_outputs_becomes_empty() {
        let d = draft(&[("a", N, Sum(1), &[])], &[]);
        assert_eq!(cull(d).len(), 0);
    }
}
