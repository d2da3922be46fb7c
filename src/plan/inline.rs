//! Pass 2, inline: fold data and cheap tasks into their only consumer.
//!
//! A data node (a wrapped value or a persisted result) costs a reference
//! count to "run"; as a task of its own it would cost a full round through
//! the executor. Folded into its only consumer, it runs as a step of that
//! consumer's fused task. A task marked cheap is treated the same way, with
//! one more rule because it can fail (module invariant 5): it is folded only
//! when no external input of the consumer follows it in argument order, so
//! that an input failure reported by the executor never hides its own.

use super::{Draft, Folds, Weight};

/// Marks data and cheap tasks with exactly one consumer edge as folded into
/// that consumer, unless pinned (an output or a kept key).
///
/// Tasks already folded by `folds` stay folded. Consumers are visited in plan
/// order, so a cheap task that absorbed its own inputs is judged with them.
/// The pipeline skips it when no task is data or cheap (`Draft::may_inline`).
///
/// # Complexity
///
/// O(tasks + edges) time, two flags per task.
pub(crate) fn inline(draft: &Draft, mut folds: Folds) -> Folds {
    let n = draft.len();
    // Per group root: can a step of its group fail on its own, and does the
    // group read an input from outside itself.
    let mut fallible = vec![false; n];
    let mut external = vec![false; n];
    for c in 0..n as u32 {
        let mut can_fail = draft.weight(c) != Weight::Data;
        let mut reads = false;
        // Walking the arguments backwards tells, at each one, whether an
        // external input follows it.
        let mut external_follows = false;
        for &d in draft.deps(c).iter().rev() {
            let du = d as usize;
            if matches!(draft.weight(d), Weight::Data | Weight::Cheap)
                && Folds::can_absorb(draft, c)
                && folds.can_fold(draft, d)
                && (!fallible[du] || !external_follows)
            {
                folds.fold(d);
            }
            if folds.folded(d) {
                can_fail |= fallible[du];
                if external[du] {
                    external_follows = true;
                    reads = true;
                }
            } else {
                external_follows = true;
                reads = true;
            }
        }
        fallible[c as usize] = can_fail;
        external[c as usize] = reads;
    }
    folds
}

#[cfg(test)]
mod tests {
    use super::super::testing::{draft, key, names, run, Does::*, Spec, C, D, N};
    use super::super::{assemble, optimize, Options};
    use super::*;

    fn folded(tasks: &[Spec<'_>], outputs: &[u32]) -> Vec<bool> {
        let d = draft(tasks, outputs);
        let folds = inline(&d, Folds::new(&d, &Default::default()));
        (0..d.len() as u32).map(|i| folds.folded(i)).collect()
    }

    #[test]
    fn data_with_one_consumer_is_folded() {
        let got = folded(
            &[
                ("v", D, Sum(1), &[]),
                ("w", D, Sum(2), &[]),
                ("a", N, Sum(0), &[]),
                ("f", N, Sum(0), &[0, 2, 1]),
            ],
            &[3],
        );
        assert_eq!(got, vec![true, true, false, false]);
    }

    #[test]
    fn shared_pinned_and_normal_tasks_are_not_folded() {
        let got = folded(
            &[
                ("shared", D, Sum(1), &[]),
                ("twice", D, Sum(2), &[]),
                ("output", D, Sum(3), &[]),
                ("normal", N, Sum(4), &[]),
                ("f", N, Sum(0), &[0, 1, 1, 2, 3]),
                ("g", N, Sum(0), &[0, 4]),
            ],
            &[5, 2],
        );
        assert_eq!(got, vec![false; 6]);
        let d = draft(&[("v", D, Sum(1), &[]), ("f", N, Sum(0), &[0])], &[1]);
        let keep = [key(0)].into_iter().collect();
        assert_eq!(inline(&d, Folds::new(&d, &keep)), Folds::new(&d, &keep));
    }

    #[test]
    fn cheap_task_is_not_folded_before_an_external_input() {
        let got = folded(
            &[
                ("x", N, Sum(1), &[]),
                ("k1", C, Sum(2), &[]),
                ("k2", C, Sum(3), &[0]),
                ("f", N, Sum(0), &[1, 0]),
                ("g", N, Sum(0), &[0, 2]),
                ("h", N, Sum(0), &[3, 4]),
            ],
            &[5],
        );
        // k1 precedes the external x in f: kept. k2 comes last in g: folded,
        // its own external read (x) then precedes nothing that can fail.
        assert_eq!(got, vec![false, false, true, false, false, false]);
    }

    #[test]
    fn infallible_groups_fold_anywhere_and_nest() {
        let got = folded(
            &[
                ("v", D, Sum(1), &[]),
                ("k", C, Sum(2), &[0]),
                ("x", N, Sum(3), &[]),
                ("f", N, Sum(0), &[1, 2]),
            ],
            &[3],
        );
        // v folds into k (data); k can fail and precedes external x: kept.
        assert_eq!(got, vec![true, false, false, false]);
        let got = folded(
            &[
                ("v", D, Sum(1), &[]),
                ("k", C, Sum(2), &[0]),
                ("x", N, Sum(3), &[]),
                ("f", N, Sum(0), &[2, 1]),
            ],
            &[3],
        );
        assert_eq!(got, vec![true, true, false, false]);
    }

    #[test]
    fn inlined_plan_runs_the_same_and_names_failures() {
        let tasks: &[Spec<'_>] = &[
            ("x", N, Sum(1), &[]),
            ("v", D, Sum(10), &[]),
            ("k", C, Fail, &[1]),
            ("f", N, Sum(0), &[0, 2]),
            ("w", D, Sum(7), &[]),
            ("g", N, Sum(0), &[4, 0]),
        ];
        let d = draft(tasks, &[3, 5]);
        let folds = inline(&d, Folds::new(&d, &Default::default()));
        let plan = assemble(d, &folds, false).plan;
        assert_eq!(names(&plan), vec!["x", "k+f", "g"]);
        let got = run(plan);
        assert_eq!(got, run(optimize(draft(tasks, &[3, 5]), &Options::none())));
        assert_eq!(got[1], Ok(8));
        assert!(matches!(&got[0], Err((k, name, _)) if *k == key(2) && name == "k"));
    }
}
