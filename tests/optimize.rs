//! Graph optimization: results, errors and output keys are the same with it
//! and without it, on every executor; the plan shows what it did.

mod support;

use rask::{Config, Error};

/// Same value, or an error naming the same task with the same message.
fn same(on: &rask::Result<i64>, off: &rask::Result<i64>) -> Result<(), String> {
    match (on, off) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (
            Err(Error::Task {
                key: a,
                panicked: pa,
                message: ma,
                location: la,
                ..
            }),
            Err(Error::Task {
                key: b,
                panicked: pb,
                message: mb,
                location: lb,
                ..
            }),
        ) if a == b && a.name() == b.name() && pa == pb && ma == mb && la == lb => Ok(()),
        _ => Err(format!("optimized {on:?}, unoptimized {off:?}")),
    }
}

macro_rules! for_each_executor {
    ($($t:tt)*) => {
        mod synchronous {
            fn config() -> rask::Config { rask::Config::synchronous() }
            $($t)*
        }
        mod simulated {
            fn config() -> rask::Config { rask::Config::simulated(0x5eed) }
            $($t)*
        }
        #[cfg(feature = "threaded")]
        mod threads_2 {
            fn config() -> rask::Config { rask::Config::threads(2) }
            $($t)*
        }
        #[cfg(feature = "threaded")]
        mod threads_4 {
            fn config() -> rask::Config { rask::Config::threads(4) }
            $($t)*
        }
    };
}

for_each_executor! {
    use proptest::prelude::*;
    use rask::{delayed, Delayed, Error};

    use crate::same;
    use crate::support::{self, build, build_with_values, eval, executions, run_id};

    fn inc(x: i64) -> i64 { x + 1 }
    fn check(x: i64) -> Result<i64, String> {
        if x == 5 { Err(format!("{x} is not allowed")) } else { Ok(x) }
    }
    fn explode(x: i64) -> i64 {
        if x == 5 { panic!("exploded on {x}") }
        x
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        /// One root, failures included: the same value or the same error,
        /// and with data leaves too.
        #[test]
        fn one_root_is_the_same_with_and_without(specs in support::dag(60, 0.08)) {
            for nodes in [build(&specs, 0), build_with_values(&specs, 0)] {
                let root = &nodes[nodes.len() - 1];
                let on = root.compute_with(&config());
                let off = root.compute_with(&config().optimize(false));
                prop_assert!(same(&on, &off).is_ok(), "{}", same(&on, &off).unwrap_err());
                prop_assert_eq!(on.ok(), eval(&specs, nodes.len() - 1).ok());
            }
        }

        /// Several outputs, data leaves included: the same values as without
        /// optimization and as a naive evaluation, under the same keys.
        #[test]
        fn many_outputs_are_the_same(
            specs in support::dag(40, 0.0),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..6),
        ) {
            let nodes = build_with_values(&specs, 0);
            let at: Vec<usize> = picks.iter().map(|p| p.index(nodes.len())).collect();
            let chosen: Vec<Delayed<i64>> = at.iter().map(|&i| nodes[i].clone()).collect();
            let on = rask::compute_with(&chosen, &config()).unwrap();
            let off = rask::compute_with(&chosen, &config().optimize(false)).unwrap();
            prop_assert_eq!(&on, &off);
            let want: Vec<i64> = at.iter().map(|&i| eval(&specs, i).unwrap()).collect();
            prop_assert_eq!(&on, &want);
            let keys: Vec<rask::Key> = chosen.iter().map(|d| d.key().key()).collect();
            let plan = rask::explain(&chosen, &config()).unwrap();
            prop_assert_eq!(plan.outputs().collect::<Vec<_>>(), keys);
        }

        /// Fused or not, each distinct key runs exactly once.
        #[test]
        fn each_key_runs_once(specs in support::dag(60, 0.0)) {
            let run = run_id();
            let nodes = build(&specs, run);
            let root = &nodes[nodes.len() - 1];
            prop_assert_eq!(root.compute_with(&config()).ok(), eval(&specs, nodes.len() - 1).ok());
            prop_assert_eq!(executions(run), rask::Graph::from_delayed(root).len());
        }
    }

    /// `inc` applied `len` times on top of `x`, keeping no handle on the
    /// steps: what chain absorption folds while lowering.
    fn incs(x: Delayed<i64>, len: usize) -> Delayed<i64> {
        (0..len).fold(x, |x, _| delayed!(inc(x)))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

        /// With no handle kept on the inner nodes (so that lowering absorbs
        /// chains), failures included: the same value or error as without
        /// optimization, and each key runs once.
        #[test]
        fn absorbed_chains_are_the_same(specs in support::dag(50, 0.08), len in 0usize..8) {
            let run = run_id();
            let root = {
                let nodes = build(&specs, run);
                incs(nodes[nodes.len() - 1].clone(), len)
            };
            let on = root.compute_with(&config());
            if on.is_ok() {
                prop_assert_eq!(executions(run), rask::Graph::from_delayed(&root).len() - len);
            }
            let off = root.compute_with(&config().optimize(false));
            prop_assert!(same(&on, &off).is_ok(), "{}", same(&on, &off).unwrap_err());
            let want = eval(&specs, specs.len() - 1).map(|v| v + len as i64);
            prop_assert_eq!(on.ok(), want.ok());
        }

        /// Chains of temporaries over several nodes of a DAG, as several
        /// outputs: the same values as a naive evaluation, under the same
        /// keys.
        #[test]
        fn chains_over_many_outputs_are_the_same(
            specs in support::dag(30, 0.0),
            picks in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..6), 1..5),
        ) {
            let (chosen, at) = {
                let nodes = build(&specs, 0);
                let at: Vec<(usize, usize)> = picks.iter().map(|(p, len)| (p.index(nodes.len()), *len)).collect();
                let chosen: Vec<Delayed<i64>> = at.iter().map(|&(i, len)| incs(nodes[i].clone(), len)).collect();
                (chosen, at)
            };
            let on = rask::compute_with(&chosen, &config()).unwrap();
            let want: Vec<i64> = at.iter().map(|&(i, len)| eval(&specs, i).unwrap() + len as i64).collect();
            prop_assert_eq!(&on, &want);
            let keys: Vec<rask::Key> = chosen.iter().map(|d| d.key().key()).collect();
            let plan = rask::explain(&chosen, &config()).unwrap();
            prop_assert_eq!(plan.outputs().collect::<Vec<_>>(), keys);
        }

        /// The same graph built twice (equal keys, distinct nodes) under
        /// chains of different tops, in one computation: each key still runs
        /// once, as lowering notices the absorbed keys found twice.
        #[test]
        fn a_graph_built_twice_runs_each_key_once(specs in support::dag(30, 0.0), len in 1usize..5) {
            let run = run_id();
            let (a, b) = {
                let first = build(&specs, run);
                let second = build(&specs, run);
                let a = incs(first[first.len() - 1].clone(), len);
                let b = delayed!(inc(incs(second[second.len() - 1].clone(), len)));
                (a, b)
            };
            let want = eval(&specs, specs.len() - 1).unwrap() + len as i64;
            prop_assert_eq!(rask::compute_with((&a, &b), &config()).unwrap(), (want, want + 1));
            prop_assert_eq!(executions(run), rask::Graph::from_delayed(&a).len() - len);
        }
    }

    #[test]
    fn a_chain_of_temporaries_is_absorbed_as_one_task_of_every_node() {
        let x = incs(delayed!(inc(0)), 999);
        let plan = rask::explain(&x, &config()).unwrap();
        assert_eq!((plan.graph_len(), plan.len()), (1000, 1));
        let task = plan.tasks().next().unwrap();
        assert_eq!((task.name(), task.size()), ("inc…inc(1000)", 1000));
        assert_eq!(x.compute_with(&config()).unwrap(), 1000);
        // A handle on a step keeps it a node of its own while lowering; fuse
        // still folds it.
        let held = delayed!(inc(&x));
        let top = incs(held.clone(), 2);
        assert_eq!(rask::explain(&top, &config()).unwrap().len(), 1);
        assert_eq!(top.compute_with(&config()).unwrap(), 1003);
        assert_eq!(held.compute_with(&config()).unwrap(), 1001);
    }

    #[test]
    fn an_error_inside_an_absorbed_chain_names_the_inner_task() {
        let bad_key = delayed!(check(delayed!(inc(incs(delayed!(inc(0)), 3))))?).key();
        let total = incs(delayed!(check(delayed!(inc(incs(delayed!(inc(0)), 3))))?), 2);
        assert_eq!(rask::explain(&total, &config()).unwrap().len(), 1);
        let err = total.compute_with(&config()).unwrap_err();
        match &err {
            Error::Task { key, panicked: false, message, .. } => {
                assert_eq!(key, &bad_key);
                assert_eq!(message, "5 is not allowed");
            }
            other => panic!("unexpected {other:?}"),
        }
        let off = total.compute_with(&config().optimize(false));
        assert_eq!(same(&Err(err), &off), Ok(()));
        let total = incs(delayed!(explode(incs(delayed!(inc(0)), 4))), 3);
        match total.compute_with(&config()).unwrap_err() {
            Error::Task { key, panicked: true, message, .. } => {
                assert_eq!(key.name(), "explode");
                assert_eq!(message, "exploded on 5");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_chain_computes_as_one_task() {
        let x = support::chain(1000);
        assert_eq!(rask::explain(&x, &config()).unwrap().len(), 1);
        assert_eq!(x.compute_with(&config()).unwrap(), 1000);
        assert_eq!(x.compute_with(&config().optimize(false)).unwrap(), 1000);
    }

    #[test]
    fn an_error_inside_a_fused_chain_names_the_inner_task() {
        let a = delayed!(inc(3));
        let b = delayed!(inc(&a));
        let bad = delayed!(check(&b)?);
        let c = delayed!(inc(&bad));
        let total = delayed!(inc(&c));
        let plan = rask::explain(&total, &config()).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan.tasks().next().unwrap().name(), "inc…inc(5)");
        let err = total.compute_with(&config()).unwrap_err();
        match &err {
            Error::Task { key, panicked: false, message, .. } => {
                assert_eq!(key, &bad.key());
                assert_eq!(key.name(), "check");
                assert_eq!(message, "5 is not allowed");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains(&bad.key().to_string()));
        let off = total.compute_with(&config().optimize(false));
        assert_eq!(same(&Err(err), &off), Ok(()));
    }

    #[test]
    fn a_panic_inside_a_fused_chain_names_the_inner_task() {
        let a = delayed!(inc(3));
        let bad = delayed!(explode(delayed!(inc(&a))));
        let total = delayed!(inc(delayed!(inc(&bad))));
        assert_eq!(rask::explain(&total, &config()).unwrap().len(), 1);
        match total.compute_with(&config()).unwrap_err() {
            Error::Task { key, panicked: true, message, .. } => {
                assert_eq!(key, bad.key());
                assert_eq!(message, "exploded on 5");
            }
            other => panic!("unexpected {other:?}"),
        }
        // The executor is still usable.
        assert_eq!(delayed!(inc(&a)).compute_with(&config()).unwrap(), 5);
    }
}

fn inc(x: i64) -> i64 {
    x + 1
}

/// Dropping a graph does not recurse per level: a 200 000-node chain drops
/// on a 256 KiB stack.
#[test]
fn long_chains_drop_on_a_small_stack() {
    let worker = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let x = support::chain(200_000);
            let y = rask::delayed!(inc(&x));
            drop(x);
            y.compute_with(&Config::synchronous())
        })
        .unwrap();
    assert_eq!(worker.join().unwrap().unwrap(), 200_001);
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// Several outputs with failures: on the synchronous executor the run is
/// deterministic, so even which failure is reported first must not change.
mod synchronous_errors {
    use proptest::prelude::*;
    use rask::{Config, Delayed};

    use crate::support::{self, build_with_values};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

        #[test]
        fn many_outputs_fail_the_same(
            specs in support::dag(40, 0.1),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..6),
        ) {
            let nodes = build_with_values(&specs, 0);
            let chosen: Vec<Delayed<i64>> = picks.iter().map(|p| nodes[p.index(nodes.len())].clone()).collect();
            let sync = Config::synchronous();
            let on = rask::compute_with(&chosen, &sync).map_err(|e| e.to_string());
            let off = rask::compute_with(&chosen, &sync.optimize(false)).map_err(|e| e.to_string());
            prop_assert_eq!(on, off);
        }
    }
}

#[test]
fn output_keys_are_preserved() {
    let x = rask::delayed!(inc(1));
    let y = rask::delayed!(inc(&x));
    let total = rask::delayed!(inc(&y)).named("total");
    let plan = rask::explain(&total, &Config::new()).unwrap();
    assert_eq!(plan.len(), 1);
    let task = plan.tasks().next().unwrap();
    assert_eq!(task.key(), total.key().key());
    assert_eq!(task.name(), "inc+inc+total");
    assert_eq!(plan.outputs().collect::<Vec<_>>(), vec![total.key().key()]);

    // An intermediate asked for as well stays a task, under its own key.
    let plan = rask::explain((&y, &total), &Config::new()).unwrap();
    assert_eq!(
        plan.outputs().collect::<Vec<_>>(),
        vec![y.key().key(), total.key().key()]
    );
    let names: Vec<&str> = plan.tasks().map(|t| t.name()).collect();
    assert_eq!(names, vec!["inc+inc", "total"]);
    let got = rask::compute_with((&y, &total), &Config::synchronous()).unwrap();
    assert_eq!(got, (3, 4));
}

#[test]
fn optimization_off_runs_one_task_per_node() {
    let specs: Vec<support::Spec> = (0..30_usize)
        .map(|i| match i {
            0..=2 => support::Spec::Leaf(i as i64),
            _ => support::Spec::Mix {
                deps: vec![i - 1, (i * 7) % (i - 1)],
                salt: i as i64 % 3,
                fails: false,
            },
        })
        .collect();
    let nodes = support::build_with_values(&specs, 0);
    // A chain on top, so that there is something to fuse.
    let root = &rask::delayed!(inc(rask::delayed!(inc(&nodes[29]))));
    let graph_len = rask::Graph::from_delayed(root).len();
    let off = rask::explain(root, &Config::new().optimize(false)).unwrap();
    assert_eq!(off.len(), graph_len);
    assert_eq!(off.graph_len(), graph_len);
    assert!(off.tasks().all(|t| t.size() == 1));
    assert!(off.tasks().any(|t| t.is_data()));
    let on = rask::explain(root, &Config::new()).unwrap();
    assert_eq!(on.graph_len(), graph_len);
    assert!(on.len() < graph_len);
    assert_eq!(on.tasks().map(|t| t.size()).sum::<usize>(), graph_len);
}

#[test]
fn inlined_values_and_persisted_results_keep_the_consumer_name() {
    let base = rask::delayed!(inc(1))
        .persist_with(&Config::synchronous())
        .unwrap();
    let x = rask::delayed!(add(&base, rask::value(10)));
    let plan = rask::explain(&x, &Config::new()).unwrap();
    let tasks: Vec<_> = plan.tasks().collect();
    assert_eq!(tasks.len(), 1);
    assert_eq!((tasks[0].name(), tasks[0].size()), ("add", 3));
    assert_eq!(x.compute_with(&Config::synchronous()).unwrap(), 12);
    // A value used twice stays a task: nothing is copied into consumers.
    let shared = rask::value(5_i64);
    let y = rask::delayed!(add(&shared, &shared));
    let plan = rask::explain(&y, &Config::new()).unwrap();
    assert_eq!(plan.len(), 2);
    assert_eq!(y.compute_with(&Config::synchronous()).unwrap(), 10);
}

#[test]
fn the_switch_follows_scope_and_explicit_settings() {
    let x = support::chain(10);
    {
        let _off = rask::config::set(Config::new().optimize(false));
        assert_eq!(rask::explain(&x, &Config::new()).unwrap().len(), 10);
        assert_eq!(
            rask::explain(&x, &Config::new().optimize(true))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(x.compute_with(&Config::synchronous()).unwrap(), 10);
    }
    assert_eq!(rask::explain(&x, &Config::new()).unwrap().len(), 1);
}

#[test]
fn plan_dot_labels_fused_tasks() {
    let x = support::chain(100);
    let dot = x.plan_dot(&Config::new()).unwrap();
    assert!(dot.starts_with("digraph plan {"), "{dot}");
    assert!(dot.contains("inc…inc(100)-"), "{dot}");
    assert!(dot.contains("100 tasks"), "{dot}");
    let plain = x.plan_dot(&Config::new().optimize(false)).unwrap();
    assert_eq!(plain.matches("label=").count(), 100);
    assert_eq!(plain.matches("->").count(), 99);
}

/// Values move through a fused chain: a function taking its input by value
/// gets the only reference, so nothing is cloned, with or without fusing.
#[test]
fn fused_chains_move_values_instead_of_cloning() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CLONES: AtomicUsize = AtomicUsize::new(0);

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Counted(Vec<u8>);
    impl Clone for Counted {
        fn clone(&self) -> Self {
            CLONES.fetch_add(1, Ordering::SeqCst);
            Counted(self.0.clone())
        }
    }
    fn start(n: usize) -> Counted {
        Counted(vec![0; n])
    }
    fn grow(mut c: Counted) -> Counted {
        c.0.push(1);
        c
    }

    let mut x = rask::delayed!(start(1000));
    for _ in 0..50 {
        x = rask::delayed!(grow(&x));
    }
    for optimize in [true, false] {
        let config = Config::synchronous().optimize(optimize);
        assert_eq!(
            rask::explain(&x, &config).unwrap().len(),
            if optimize { 1 } else { 51 }
        );
        CLONES.store(0, Ordering::SeqCst);
        assert_eq!(x.compute_with(&config).unwrap().0.len(), 1050);
        assert_eq!(CLONES.load(Ordering::SeqCst), 0, "optimize: {optimize}");
    }
}

fn add_two(x: i64, y: i64) -> i64 {
    x + y
}

fn bad(x: i64) -> Result<i64, String> {
    Err(format!("bad {x}"))
}

fn plus_one(x: i64) -> i64 {
    x + 1
}

/// A value bounded by a timeout can fail, so it is not folded into its
/// consumer as data (which cannot fail) is: the first failure in argument
/// order stays the value's timeout, with optimization and without. It was
/// the other argument's failure when optimized.
#[test]
fn a_value_with_a_timeout_is_not_inlined_as_data_that_cannot_fail() {
    let v = rask::value(1i64).timeout(std::time::Duration::ZERO);
    let b = rask::delayed!(bad(2)?);
    let c = rask::delayed!(add_two(&v, &b));
    let d = rask::delayed!(plus_one(&b));
    let run = |optimize: bool| {
        rask::compute_with((&c, &d), &Config::synchronous().optimize(optimize)).map(|(c, d)| c + d)
    };
    let (on, off) = (run(true), run(false));
    assert!(matches!(off, Err(Error::Timeout { .. })), "{off:?}");
    assert!(
        matches!(on, Err(Error::Timeout { .. })),
        "optimized: {on:?}"
    );
}

/// Calls of `flaky_twice` so far, by id.
static FLAKY_CALLS: std::sync::Mutex<Vec<(u64, u32)>> = std::sync::Mutex::new(Vec::new());

/// Fails its first two calls for `id`, then returns 7.
fn flaky_twice(id: u64) -> Result<i64, String> {
    let mut calls = FLAKY_CALLS.lock().unwrap();
    let n = match calls.iter_mut().find(|(i, _)| *i == id) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            calls.push((id, 1));
            1
        }
    };
    if n <= 2 {
        Err("try again".into())
    } else {
        Ok(7)
    }
}

/// Work and the same work with retries (or a timeout) are two tasks in one
/// graph, each run as asked: before, they shared a key, and whichever the
/// lowering met first was the only one run, so the retries applied or not
/// by argument order.
#[test]
fn work_and_the_same_work_with_limits_in_one_graph_are_two_tasks() {
    let raw = rask::delayed!(flaky_twice(1)?);
    let safe = raw.retries(2);
    let bounded = raw.timeout(std::time::Duration::from_secs(60));
    assert_ne!(raw.key(), safe.key());
    assert_ne!(raw.key(), bounded.key());
    assert_ne!(safe.key(), bounded.key());
    assert_eq!(safe.key(), raw.retries(2).key(), "keys are stable");
    let config = Config::synchronous().optimize(false);
    for both in [
        rask::delayed!(add_two(&raw, &safe)),
        rask::delayed!(add_two(&safe, &raw)),
    ] {
        assert_eq!(rask::explain(&both, &config).unwrap().len(), 3);
    }
    // The retries apply: two failures, then the value.
    let safe = rask::delayed!(flaky_twice(2)?).retries(2);
    assert_eq!(safe.compute_with(&config).unwrap(), 7);
}

/// `explain` for a cluster shows the plan sent there: a task with retries
/// reaches a cluster as a task of its own, where in this process it is
/// fused with its chain. It showed the local plan before.
#[test]
fn explain_for_a_cluster_shows_what_travels_alone() {
    let mut x = rask::delayed!(plus_one(0));
    for i in 1..10 {
        x = rask::delayed!(plus_one(&x));
        if i == 5 {
            x = x.retries(1);
        }
    }
    let local = rask::explain(&x, &Config::synchronous()).unwrap();
    let cluster = rask::explain(&x, &Config::new().executor(rask::ExecutorKind::Local(2))).unwrap();
    assert_eq!(local.len(), 1, "fused in this process");
    assert!(cluster.len() > 1, "the retried task travels alone");
    let simulated = rask::explain(
        &x,
        &Config::new().executor(rask::ExecutorKind::SimCluster {
            workers: 2,
            seed: 1,
            faults: 0,
        }),
    )
    .unwrap();
    assert_eq!(simulated.len(), cluster.len(), "a simulated cluster too");
    // The drawing shows the same plans (it showed this process's plan for
    // a cluster too).
    let drawn = |config: &Config| x.plan_dot(config).unwrap().matches("label=").count();
    assert_eq!(drawn(&Config::synchronous()), local.len());
    let cluster_config = Config::new().executor(rask::ExecutorKind::Local(2));
    assert_eq!(drawn(&cluster_config), cluster.len());
}
