//! One suite, every executor: each module runs the same tests against the
//! configuration its `config()` returns, and the properties compare every
//! executor with a naive evaluation.

#[path = "support/arguments.rs"]
mod arguments;
mod support;

macro_rules! for_each_executor {
    ($($t:tt)*) => {
        mod synchronous {
            fn config() -> rask::Config { rask::Config::synchronous() }
            $($t)*
        }
        /// Ready tasks in a seeded order; every case's plan differs, so
        /// one seed still explores many orders.
        mod simulated {
            fn config() -> rask::Config { rask::Config::simulated(0x5eed) }
            $($t)*
        }
        #[cfg(feature = "threaded")]
        mod threads_1 {
            fn config() -> rask::Config { rask::Config::threads(1) }
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
        #[cfg(feature = "distributed")]
        mod distributed {
            fn config() -> rask::Config {
                crate::support::loopback_cluster(crate::cluster_tasks())
            }
            $($t)*
        }
        #[cfg(feature = "distributed")]
        mod sim_cluster {
            fn config() -> rask::Config {
                rask::init_with(crate::cluster_tasks());
                rask::Config::new().executor(rask::ExecutorKind::SimCluster { workers: 3, seed: 7, faults: 0 })
            }
            $($t)*
        }
    };
}

/// The functions of both cluster modules: one registry serves the
/// process, and the module whose test runs first installs it.
#[cfg(feature = "distributed")]
fn cluster_tasks() -> rask::Tasks {
    arguments::register(rask::tasks![
        neg_i64,
        show_u64,
        distributed::inc,
        distributed::add,
        distributed::sum,
        distributed::len_shared,
        distributed::pair,
        distributed::first,
        distributed::explode,
        distributed::make_boom,
        distributed::boom_and,
        distributed::fails?,
        distributed::parse?,
        distributed::flaky_once?,
        distributed::nap,
        distributed::outer,
        distributed::fan,
        distributed::total_of,
        distributed::keys_of,
        distributed::length,
        distributed::result_of?,
        distributed::key_of,
        distributed::results_of?,
        distributed::len_of?,
        distributed::submit_inc?,
        sim_cluster::inc,
        sim_cluster::add,
        sim_cluster::sum,
        sim_cluster::len_shared,
        sim_cluster::pair,
        sim_cluster::first,
        sim_cluster::explode,
        sim_cluster::make_boom,
        sim_cluster::boom_and,
        sim_cluster::fails?,
        sim_cluster::parse?,
        sim_cluster::flaky_once?,
        sim_cluster::nap,
        sim_cluster::outer,
        sim_cluster::fan,
        sim_cluster::total_of,
        sim_cluster::keys_of,
        sim_cluster::length,
        sim_cluster::result_of?,
        sim_cluster::key_of,
        sim_cluster::results_of?,
        sim_cluster::len_of?,
        sim_cluster::submit_inc?,
        support::leaf,
        support::mix?,
        support::tree_inc,
        support::tree_add
    ])
}

/// Whether `config` runs on a cluster, where tasks cannot be split or call
/// `compute` from inside a worker that has no spare thread.
fn on_cluster(config: &rask::Config) -> bool {
    matches!(
        config.resolve(),
        Ok(rask::ExecutorKind::Tcp(_) | rask::ExecutorKind::SimCluster { .. })
    )
}

for_each_executor! {
    use std::sync::Arc;

    use proptest::prelude::*;
    use rask::{delayed, Delayed, Error};

    use crate::support::{self, build, eval, executions, run_id, upstream};

    pub(crate) fn inc(x: i64) -> i64 { x + 1 }
    pub(crate) fn add(x: i64, y: i64) -> i64 { x + y }
    pub(crate) fn sum(xs: Vec<i64>) -> i64 { xs.iter().sum() }
    pub(crate) fn len_shared(xs: Arc<Vec<u8>>) -> usize { xs.len() }
    pub(crate) fn pair(x: i64) -> (i64, String) { (x * 2, format!("#{x}")) }
    pub(crate) fn first((a, b): (i64, i64)) -> i64 { a * 10 + b }
    pub(crate) fn explode(x: i64) -> i64 { if x > 0 { panic!("exploded on {x}") } x }
    pub(crate) fn parse(s: String) -> Result<i64, std::num::ParseIntError> { s.parse() }

    /// Fails the first call for each `id`.
    pub(crate) fn flaky_once(id: u64) -> Result<i64, String> {
        static SEEN: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
        let mut seen = SEEN.lock().unwrap();
        if seen.contains(&id) {
            Ok(id as i64)
        } else {
            seen.push(id);
            Err("first call".into())
        }
    }

    /// Computes `inc(x)` from inside the task, on the same executor, and
    /// doubles it.
    pub(crate) fn outer(x: i64) -> i64 {
        delayed!(inc(x)).compute_with(&config()).unwrap() * 2
    }

    /// Computes four `inc`s and their sum from inside the task, on the same
    /// executor: `4 * x + 10`.
    pub(crate) fn fan(x: i64) -> i64 {
        let parts: Vec<Delayed<i64>> = (0..4).map(|i| delayed!(inc(x + i))).collect();
        delayed!(sum(parts)).compute_with(&config()).unwrap()
    }

    /// Computes the `Delayed`s it was given as they are (untraversed),
    /// from inside the task, on the same executor, and sums them.
    pub(crate) fn total_of(parts: Vec<Delayed<i64>>) -> i64 {
        rask::compute_with(parts, &config()).unwrap().iter().sum()
    }

    /// The keys of the `Delayed`s it was given, where it runs.
    pub(crate) fn keys_of(parts: Vec<Delayed<i64>>) -> Vec<String> {
        parts.iter().map(|p| p.key().to_string()).collect()
    }

    /// The length of plain untraversed data.
    pub(crate) fn length(bytes: Vec<u8>) -> usize {
        bytes.len()
    }

    /// Submits `inc(x)` through a client of its own and waits for it.
    pub(crate) fn submit_inc(x: i64) -> Result<i64, Error> {
        rask::Client::with_config(&config())?.submit(delayed!(inc(x)))?.result()
    }

    /// The value of the future it was given as is (untraversed).
    pub(crate) fn result_of(f: rask::Future<i64>) -> Result<i64, Error> {
        f.result()
    }

    /// The key of the future it was given as is.
    pub(crate) fn key_of(f: rask::Future<i64>) -> String {
        f.key().to_string()
    }

    /// The sum of the values of the named futures it was given as they are.
    pub(crate) fn results_of(fs: Vec<(String, rask::Future<i64>)>) -> Result<i64, Error> {
        fs.iter().map(|(_, f)| f.result()).sum()
    }

    /// The length of the value of the future it was given as is.
    pub(crate) fn len_of(f: rask::Future<Vec<u8>>) -> Result<usize, Error> {
        Ok(f.result()?.len())
    }

    /// Sleeps `ms` milliseconds.
    pub(crate) fn nap(ms: u64) -> i64 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        0
    }

    /// Tasks named alike over distinct inputs are distinct work: each gets
    /// its own value, in one graph and through a client (the first one
    /// found used to stand for all of them).
    #[test]
    fn work_named_alike_keeps_its_own_value() {
        let parts: Vec<Delayed<i64>> = (0..4)
            .map(|i| delayed!(add(delayed!(inc(i)), 100)).named("part"))
            .collect();
        let total = delayed!(sum(parts.clone()));
        assert_eq!(total.compute_with(&config()).unwrap(), 101 + 102 + 103 + 104);
        let client = rask::Client::with_config(&config()).unwrap();
        let futures: Vec<_> = parts.iter().map(|p| client.compute(p).unwrap()).collect();
        assert_eq!(client.gather(&futures).unwrap(), vec![101, 102, 103, 104]);
    }

    /// Values wrapped under one name are keyed by their data too: each task
    /// over one gets its own value, in one graph, and through a client that
    /// holds a result over another value of the name (a name used to be the
    /// key: the first value found stood for all, and a held result over it
    /// was handed out for the others).
    #[test]
    fn values_named_alike_keep_their_own_data() {
        let chunks: Vec<Delayed<i64>> = (1..=4).map(|i| rask::value_named("chunk", i)).collect();
        let total = delayed!(sum(chunks.clone()));
        assert_eq!(total.compute_with(&config()).unwrap(), 1 + 2 + 3 + 4);

        let client = rask::Client::with_config(&config()).unwrap();
        let held = client.persist(&rask::value_named("cfg", 10_i64)).unwrap();
        let over_ten = client
            .compute(&delayed!(add(&held, 1)))
            .unwrap();
        assert_eq!(over_ten.result().unwrap(), 11);
        // Other data under the held name, while the client holds both the
        // value and a result over it.
        let twenty = rask::value_named("cfg", 20_i64);
        let over_twenty = client.compute(&delayed!(add(&twenty, 1))).unwrap();
        assert_eq!(over_twenty.result().unwrap(), 21);
        assert_eq!(client.compute(&twenty).unwrap().result().unwrap(), 20);
        // The same data under the name is the same value.
        assert_eq!(rask::value_named("cfg", 10_i64).key(), held.key());
        drop((held, over_ten));
    }

    /// Retries and timeouts hold for a task inside a chain the optimizer
    /// fuses: they apply to that task's own work.
    #[test]
    fn limits_hold_inside_fused_chains() {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 1_000 + line!() as u64;
        let flaky = delayed!(flaky_once(id)?).retries(1);
        let x = delayed!(inc(delayed!(inc(flaky))));
        assert_eq!(x.compute_with(&config()).unwrap(), id as i64 + 2);
        let slow = delayed!(nap(5_000)).timeout(std::time::Duration::from_millis(50));
        let y = delayed!(inc(delayed!(inc(&slow))));
        match y.compute_with(&config()) {
            Err(Error::Timeout { task: Some(task), .. }) => assert_eq!(task, slow.key()),
            other => panic!("{other:?}"),
        }
    }

    /// The error a task returns is the source of the error the caller gets:
    /// the value itself in this process, its type name and message from
    /// another one; the report prints its message once.
    #[test]
    fn a_task_error_keeps_its_type() {
        let bad = delayed!(parse("x".to_string())?);
        let err = delayed!(add(&bad, 1)).compute_with(&config()).unwrap_err();
        let expected = "x".parse::<i64>().unwrap_err().to_string();
        assert!(matches!(&err, Error::Task { key, panicked: false, .. } if *key == bad.key()), "{err}");
        let source = std::error::Error::source(&err).expect("the task's error");
        if crate::on_cluster(&config()) {
            let remote = source.downcast_ref::<rask::RemoteError>().expect("a remote error");
            assert!(remote.type_name().ends_with("ParseIntError"), "{}", remote.type_name());
        } else {
            assert!(source.downcast_ref::<std::num::ParseIntError>().is_some());
        }
        assert_eq!(source.to_string(), expected);
        // Display names the task; `{:#}` adds the cause, once.
        assert!(!err.to_string().contains(&expected), "{err}");
        assert_eq!(format!("{err:#}").matches(&expected).count(), 1, "{err:#}");
    }

    /// A panic keeps where it happened.
    #[test]
    fn a_panic_keeps_its_location() {
        let err = delayed!(explode(1)).compute_with(&config()).unwrap_err();
        match &err {
            Error::Task { panicked: true, location: Some(at), error: None, .. } => {
                assert!(at.starts_with("tests/executors.rs:"), "{at}");
                assert!(err.to_string().contains(at.as_str()), "{err}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn computes_a_small_graph() {
        let x = delayed!(inc(1));
        let y = delayed!(inc(2));
        let total = delayed!(add(&x, &y));
        assert_eq!(total.compute_with(&config()).unwrap(), 5);
        let (a, t) = rask::compute_with((&x, &total), &config()).unwrap();
        assert_eq!((a, t), (2, 5));
    }

    #[test]
    fn collections_tuples_and_splits() {
        let parts: Vec<Delayed<i64>> = (0..100).map(|i| delayed!(inc(i))).collect();
        assert_eq!(delayed!(sum(&parts)).compute_with(&config()).unwrap(), 5050);
        let t = delayed!(first((&parts[1], &parts[2])));
        assert_eq!(t.compute_with(&config()).unwrap(), 23);
        let (doubled, label) = delayed!(pair(21)).split();
        assert_eq!(rask::compute_with((&doubled, &label), &config()).unwrap(), (42, "#21".to_string()));
        let all = rask::compute_with(parts[..3].to_vec(), &config()).unwrap();
        assert_eq!(all, vec![1, 2, 3]);
    }

    #[test]
    fn nested_structures_are_traversed() {
        crate::arguments::nested_structures(&config());
    }

    #[test]
    fn parts_of_values_and_map() {
        crate::arguments::parts(&config());
    }

    #[test]
    fn futures_inside_structures() {
        crate::arguments::futures_in_structures(&config());
    }

    #[test]
    fn operators_in_both_orders_and_lazy_comparisons() {
        crate::arguments::operators(&config());
    }

    #[test]
    fn shared_values_are_not_copied_for_arc_parameters() {
        let data = rask::value(vec![7u8; 1000]);
        let lens: Vec<Delayed<usize>> = (0..4).map(|_| delayed!(len_shared(&data)).unique()).collect();
        assert_eq!(rask::compute_with(lens, &config()).unwrap(), vec![1000; 4]);
    }

    /// A user's number whose `Drop` panics: executors drop it quietly
    /// (`rask_executor::drop_quietly`). The test forgets the ones it gets.
    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    pub(crate) struct Boom(i64);

    impl Drop for Boom {
        fn drop(&mut self) {
            panic!("a Boom of {} was dropped", self.0);
        }
    }

    pub(crate) fn make_boom(x: i64) -> Boom { Boom(x) }
    pub(crate) fn boom_and(b: Arc<Boom>, y: i64) -> i64 { b.0 + y }
    pub(crate) fn fails(x: i64) -> Result<i64, String> { Err(format!("{x} fails")) }

    /// Booms dropped by the executor and by `compute`: the other result of
    /// a compute that fails, the input of a task skipped for a failed one
    /// (on a cluster, both released there too), a result (released by its
    /// cluster once fetched). Each compute answers as without the panics,
    /// and the executor goes on.
    fn drop_scenarios() {
        let boom = delayed!(make_boom(1));
        let failing = delayed!(fails(2)?);
        let names_failing = |err: Option<&Error>| {
            matches!(err, Some(Error::Task { key, message, .. })
                if *key == failing.key() && message == "2 fails")
        };
        let got = rask::compute_with((&boom, &failing), &config());
        let named = names_failing(got.as_ref().err());
        std::mem::forget(got);
        assert!(named, "the failure of `fails`");
        let skipped = delayed!(boom_and(&delayed!(make_boom(3)), &failing));
        let err = skipped.compute_with(&config()).unwrap_err();
        assert!(names_failing(Some(&err)), "{err:?}");
        let got = boom.compute_with(&config());
        let value = got.as_ref().map(|b| b.0).ok();
        std::mem::forget(got);
        assert_eq!(value, Some(1));
        assert_eq!(delayed!(inc(41)).compute_with(&config()).unwrap(), 42);
    }

    /// Values whose `Drop` panics never crash the executor (a thread pool
    /// aborted the process; the synchronous and simulated executors
    /// panicked out of `compute`; a cluster's worker ended). Run in a
    /// child process, this test binary again, so that an abort fails this
    /// test rather than ending the run.
    #[test]
    fn values_whose_drop_panics_never_crash_the_executor() {
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let name = format!("{module}::values_whose_drop_panics_never_crash_the_executor");
        crate::support::in_child(&name, drop_scenarios);
    }

    #[test]
    fn panic_fails_the_task_and_names_it() {
        let ok = delayed!(inc(1));
        let bad = delayed!(explode(3));
        let after = delayed!(add(&bad, &ok));
        let err = rask::compute_with((&ok, &after), &config()).unwrap_err();
        match &err {
            Error::Task { key, panicked, message, .. } => {
                assert_eq!(key, &bad.key());
                assert!(*panicked);
                assert_eq!(message, "exploded on 3");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains(&bad.key().to_string()));
        // The executor is still usable.
        assert_eq!(after.key(), delayed!(add(&bad, &ok)).key());
        assert_eq!(delayed!(inc(41)).compute_with(&config()).unwrap(), 42);
    }

    /// A chain runs as one task on every executor, a cluster included (its
    /// steps travel as one wire task), with the chain's last key; a step
    /// that panics inside it still names itself.
    #[test]
    fn a_chain_runs_as_one_task_and_a_failing_step_names_itself() {
        use rask::events::EventKind;
        let x = (0..20).fold(delayed!(inc(1_000_000)), |x, _| delayed!(inc(x)));
        let keys: std::collections::HashSet<rask::TaskKey> =
            rask::Graph::from_delayed(&x).keys().collect();
        assert_eq!(keys.len(), 21);
        let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = finished.clone();
        let subscription = rask::events::subscribe(move |e: &rask::events::Event<'_>| {
            if matches!(e.kind, EventKind::Finished { .. }) && keys.iter().any(|k| k.key() == e.key) {
                sink.lock().unwrap().push((e.key, e.name.to_owned()));
            }
        });
        assert_eq!(x.compute_with(&config()).unwrap(), 1_000_021);
        drop(subscription);
        let finished = std::mem::take(&mut *finished.lock().unwrap());
        assert_eq!(finished, vec![(x.key().key(), "inc…inc(21)".to_owned())]);

        let boom = delayed!(explode(delayed!(inc(delayed!(inc(0))))));
        let y = delayed!(inc(delayed!(add(&boom, 5))));
        match y.compute_with(&config()).unwrap_err() {
            Error::Task { key, panicked, message, .. } => {
                assert_eq!(key, boom.key());
                assert!(panicked);
                assert_eq!(message, "exploded on 2");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn dependents_of_a_failure_do_not_run() {
        let run = run_id();
        let specs = vec![
            support::Spec::Leaf(1),
            support::Spec::Mix { deps: vec![0], salt: 0, fails: true },
            support::Spec::Mix { deps: vec![1], salt: 1, fails: false },
            support::Spec::Mix { deps: vec![2], salt: 2, fails: false },
        ];
        let nodes = build(&specs, run);
        let err = nodes[3].compute_with(&config()).unwrap_err();
        assert!(matches!(&err, Error::Task { key, panicked: false, .. } if *key == nodes[1].key()), "{err}");
        // leaf and the failing mix ran; the two dependents did not.
        assert_eq!(executions(run), 2);
    }

    #[test]
    fn persisted_values_are_reused() {
        let run = run_id();
        let specs = vec![support::Spec::Leaf(5), support::Spec::Mix { deps: vec![0, 0], salt: 1, fails: false }];
        let nodes = build(&specs, run);
        let kept = nodes[1].persist_with(&config()).unwrap();
        assert_eq!(kept.key(), nodes[1].key());
        assert_eq!(executions(run), 2);
        let again = delayed!(add(&kept, 1));
        let expected = eval(&specs, 1).unwrap() + 1;
        assert_eq!(again.compute_with(&config()).unwrap(), expected);
        assert_eq!(again.compute_with(&config()).unwrap(), expected);
        assert_eq!(executions(run), 2, "persisted work ran again");
    }

    #[test]
    fn tree_reduction() {
        let n = 5000;
        assert_eq!(support::tree(n).compute_with(&config()).unwrap(), n * (n + 1) / 2);
    }

    /// A task that computes a graph itself, on the same executor: on a
    /// cluster its thread is given back while it waits, so eight of them
    /// on four worker threads cannot deadlock.
    #[test]
    fn nested_compute_inside_a_task() {
        let parts: Vec<Delayed<i64>> = (0..8).map(|i| delayed!(outer(i))).collect();
        let got = rask::compute_with(parts, &config()).unwrap();
        assert_eq!(got, (0..8).map(|i| (i + 1) * 2).collect::<Vec<_>>());
    }

    /// The same with a timeout on each task, which runs it on a thread of
    /// its own while its worker waits: on a thread pool whose every worker
    /// so waited, the nested computations were queued for a worker and ran
    /// nowhere, until the timeouts failed the tasks.
    #[test]
    fn nested_compute_inside_a_timed_task() {
        let limit = std::time::Duration::from_secs(10);
        let parts: Vec<Delayed<i64>> = (0..6)
            .map(|i| delayed!(fan(i)).timeout(limit))
            .chain((0..2).map(|i| delayed!(outer(i)).timeout(limit)))
            .collect();
        let got = rask::compute_with(parts, &config()).unwrap();
        let want: Vec<i64> = (0..6)
            .map(|i| 4 * i + 10)
            .chain((0..2).map(|i| (i + 1) * 2))
            .collect();
        assert_eq!(got, want);
    }

    /// A task that started once a future it takes was done, and submits
    /// work of its own and waits for it, gets it: a thread pool may run
    /// such a task on the thread that started it, where its submission
    /// used to queue behind it for ever.
    #[test]
    fn a_task_started_behind_a_future_waits_for_its_own_submissions() {
        let client = rask::Client::with_config(&config()).unwrap();
        let f = client.submit(delayed!(add(delayed!(nap(30)), 41))).unwrap();
        let r = client.submit(delayed!(submit_inc(&f)?)).unwrap();
        assert_eq!(r.result().unwrap(), 42);
    }

    /// `Untraversed` values reach the task as they are, on every executor:
    /// `Delayed`s as handles the task computes itself (on a cluster, its
    /// graph travels and is rebuilt under the same keys), plain data as
    /// data. Equal values give equal keys, different ones different keys.
    #[test]
    fn untraversed_values_reach_the_task_as_they_are() {
        use rask::Untraversed;
        let a = delayed!(inc(1));
        let parts = vec![a.clone(), delayed!(add(&a, delayed!(inc(&a)))), delayed!(sum(vec![7, 8]))];
        let total = delayed!(total_of(Untraversed(parts.clone())));
        assert_eq!(total.compute_with(&config()).unwrap(), 2 + 5 + 15);
        let keys = delayed!(keys_of(Untraversed(parts.clone()))).compute_with(&config()).unwrap();
        assert_eq!(keys, parts.iter().map(|p| p.key().to_string()).collect::<Vec<_>>());
        assert_eq!(delayed!(total_of(Untraversed(parts.clone()))).key(), total.key());
        let other = delayed!(total_of(Untraversed(vec![a.clone(), delayed!(inc(2))])));
        assert_ne!(other.key(), total.key());
        assert_eq!(other.compute_with(&config()).unwrap(), 5);
        let n = delayed!(length(Untraversed(vec![3u8; 10])));
        assert_eq!(n.compute_with(&config()).unwrap(), 10);
        assert_ne!(n.key(), delayed!(length(Untraversed(vec![3u8; 11]))).key());
    }

    /// A future given untraversed reaches the task as a future of the same
    /// key whose `result()` is its value, on every executor: alone, in a
    /// structure, a big value a cluster holds, one whose submitter dropped
    /// it before the task ran; a failed one fails the task with its
    /// failure. The task's key follows the futures' keys.
    #[test]
    fn untraversed_futures_reach_the_task_as_futures() {
        use rask::Untraversed;
        let client = rask::Client::with_config(&config()).unwrap();
        let f = client.submit(delayed!(inc(41))).unwrap();
        let g = client.submit(delayed!(inc(1))).unwrap();
        let got = delayed!(result_of(Untraversed(f.clone()))?);
        assert_eq!(got.compute_with(&config()).unwrap(), 42);
        assert_eq!(client.submit(&got).unwrap().result().unwrap(), 42);
        let key = delayed!(key_of(Untraversed(f.clone()))).compute_with(&config()).unwrap();
        assert_eq!(key, f.key().to_string());
        assert_eq!(delayed!(result_of(Untraversed(f.clone()))?).key(), got.key());
        assert_ne!(delayed!(result_of(Untraversed(g.clone()))?).key(), got.key());
        let named = |fs: &[&rask::Future<i64>]| -> Vec<(String, rask::Future<i64>)> {
            fs.iter().map(|f| (f.key().to_string(), (*f).clone())).collect()
        };
        let all = delayed!(results_of(Untraversed(named(&[&f, &g, &f])))?);
        assert_eq!(all.compute_with(&config()).unwrap(), 42 + 2 + 42);
        assert_ne!(all.key(), delayed!(results_of(Untraversed(named(&[&f, &g])))?).key());

        // Over 64 KiB: a cluster holds it and the task's input fetches it.
        let big = client.scatter(vec![7u8; 100_000]).unwrap();
        assert_eq!(delayed!(len_of(Untraversed(big.clone()))?).compute_with(&config()).unwrap(), 100_000);

        // The submitter lets go of its future before the task runs: the
        // graph holds it, and the task runs once it is done.
        let slow = client.submit(delayed!(add(delayed!(nap(50)), 7))).unwrap();
        let later = delayed!(result_of(Untraversed(slow.clone()))?);
        drop(slow);
        let pending = client.submit(&later).unwrap();
        drop(later);
        assert_eq!(pending.result().unwrap(), 7);

        let bad = client.submit(delayed!(parse("x".to_string())?)).unwrap();
        let err = delayed!(result_of(Untraversed(bad.clone()))?).compute_with(&config()).unwrap_err();
        assert!(matches!(&err, Error::Task { key, .. } if *key == bad.key()), "{err}");
        let err = client.submit(delayed!(result_of(Untraversed(bad.clone()))?)).unwrap().result().unwrap_err();
        assert!(matches!(&err, Error::Task { key, .. } if *key == bad.key()), "{err}");
    }

    /// Per key: the task's name and its event kinds in arrival order.
    type EventLog = std::collections::HashMap<rask::Key, (String, Vec<&'static str>)>;

    /// The events a computation reports for the tasks of its plan.
    fn events_of(what: &Delayed<i64>, plan_config: &rask::Config) -> (EventLog, Result<i64, Error>) {
        use rask::events::EventKind;
        let plan = rask::explain(what, plan_config).unwrap();
        let keys: std::collections::HashSet<rask::Key> = plan.tasks().map(|t| t.key()).collect();
        let log = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let sink = log.clone();
        let subscription = rask::events::subscribe(move |e: &rask::events::Event<'_>| {
            if !keys.contains(&e.key) {
                return;
            }
            let kind = match e.kind {
                EventKind::Queued => "queued",
                EventKind::Started { .. } => "started",
                EventKind::Finished { .. } => "finished",
                EventKind::Erred { .. } => "erred",
                // A cluster lets values go once nobody wants them: not
                // part of what ran.
                EventKind::Released => return,
                _ => "other",
            };
            let mut log = sink.lock().unwrap();
            let entry = log.entry(e.key).or_insert_with(|| (e.name.to_owned(), Vec::new()));
            entry.1.push(kind);
        });
        let result = what.compute_with(plan_config);
        drop(subscription);
        let log = std::mem::take(&mut *log.lock().unwrap());
        (log, result)
    }

    /// Every task of a successful plan is queued, started and finished,
    /// once each, in that order, under its own name.
    #[test]
    fn every_task_reports_queued_started_finished() {
        let run = run_id() as i64;
        let a = delayed!(inc(run));
        let b = delayed!(inc(run + 1));
        let total = delayed!(add(&a, &b));
        let plain = config().optimize(false);
        let (log, result) = events_of(&total, &plain);
        assert_eq!(result.unwrap(), 2 * run + 3);
        assert_eq!(log.len(), 3, "{log:?}");
        for key in [a.key().key(), b.key().key(), total.key().key()] {
            let (_, kinds) = &log[&key];
            assert_eq!(kinds, &["queued", "started", "finished"], "{key:?}");
        }
        assert_eq!(log[&total.key().key()].0, "add");
    }

    /// A failing task errs; its dependent errs without starting.
    #[test]
    fn a_failure_and_its_dependents_report_erred() {
        let bad = delayed!(parse(format!("x{}", run_id()))?);
        let after = delayed!(add(&bad, 1));
        let (log, result) = events_of(&after, &config().optimize(false));
        assert!(result.is_err());
        assert_eq!(log[&bad.key().key()].1, ["queued", "started", "erred"]);
        let after = &log[&after.key().key()].1;
        if crate::on_cluster(&config()) {
            // Sent early to the worker that ran `bad`, to wait there.
            assert!(after == &["queued", "erred"] || after == &["queued", "started", "erred"], "{after:?}");
        } else {
            assert_eq!(after, &["queued", "erred"]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        /// (b) compute equals a naive recursive evaluation, failures included;
        /// (c) each distinct key executes exactly once per compute.
        #[test]
        fn agrees_with_naive_evaluation_and_runs_each_key_once(specs in support::dag(60, 0.05)) {
            let run = run_id();
            let nodes = build(&specs, run);
            let root = nodes.len() - 1;
            let got = nodes[root].compute_with(&config());
            match (eval(&specs, root), got) {
                (Ok(want), Ok(got)) => {
                    prop_assert_eq!(want, got);
                    let distinct = rask::Graph::from_delayed(&nodes[root]).len();
                    prop_assert_eq!(executions(run), distinct);
                }
                (Err(()), Err(Error::Task { key, .. })) => {
                    let up = upstream(&specs, root);
                    let culprit = (0..specs.len()).any(|i| {
                        up[i] && matches!(specs[i], support::Spec::Mix { fails: true, .. }) && nodes[i].key() == key
                    });
                    prop_assert!(culprit, "error names {} which is not a failing upstream task", key);
                }
                (want, got) => prop_assert!(false, "naive {:?}, executor {:?}", want, got),
            }
        }

        /// Events agree with the run: with no failure every planned task
        /// finishes once, after it started; with failures no task both
        /// finishes and errs, and none reports twice.
        #[test]
        fn events_report_each_planned_task_once(specs in support::dag(40, 0.05)) {
            let run = run_id();
            let nodes = build(&specs, run);
            let root = nodes.len() - 1;
            let plan = rask::explain(&nodes[root], &config()).unwrap();
            let (log, result) = events_of(&nodes[root], &config());
            for (key, (name, kinds)) in &log {
                let count = |k: &str| kinds.iter().filter(|&&x| x == k).count();
                prop_assert!(count("finished") + count("erred") <= 1, "{} {:?}: {:?}", name, key, kinds);
                prop_assert!(count("queued") <= 1 && count("started") <= 1, "{:?}", kinds);
                if let Some(f) = kinds.iter().position(|&k| k == "finished") {
                    prop_assert!(kinds[..f].contains(&"started"), "{:?}", kinds);
                }
            }
            if result.is_ok() {
                prop_assert_eq!(log.len(), plan.len());
                for task in plan.tasks() {
                    let kinds = &log[&task.key()].1;
                    prop_assert_eq!(kinds.iter().filter(|&&k| k == "finished").count(), 1);
                }
            }
        }

        /// Several outputs in one compute equal computing each alone.
        #[test]
        fn many_outputs_agree(specs in support::dag(40, 0.0)) {
            let nodes = build(&specs, 0);
            let all = rask::compute_with(nodes.clone(), &config()).unwrap();
            for (i, got) in all.into_iter().enumerate() {
                prop_assert_eq!(Ok(got), eval(&specs, i));
            }
        }
    }
}

/// A simulated cluster shows its simulated workers, and waiting for more
/// than it has fails instead of waiting: none will join.
#[cfg(feature = "distributed")]
#[test]
fn a_simulated_cluster_has_its_workers() {
    rask::init_with(cluster_tasks());
    let config = rask::Config::new().executor(rask::ExecutorKind::SimCluster {
        workers: 3,
        seed: 1,
        faults: 0,
    });
    let client = rask::Client::with_config(&config).unwrap();
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.workers.len(), 3);
    assert!(info.workers.iter().all(|w| w.threads == 2));
    client
        .wait_for_workers(3, std::time::Duration::from_secs(1))
        .unwrap();
    let err = client
        .wait_for_workers(4, std::time::Duration::from_secs(3600))
        .unwrap_err();
    assert!(matches!(err, rask::Error::Timeout { .. }), "{err}");
}

/// The simulated cluster under faults (workers killed, values lost,
/// messages delayed; 4 per run, placed by each run's own seed) gives the
/// sync executor's results over 500 random graphs: values equal, and a
/// failure names a failing task upstream, as sync's does.
#[cfg(feature = "distributed")]
#[test]
fn sim_cluster_with_faults_agrees_with_sync_over_500_graphs() {
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    rask::init_with(cluster_tasks());
    let seeds = AtomicU64::new(0);
    let mut runner = support::runner(500);
    runner
        .run(&support::dag(30, 0.05), |specs| {
            let seed = seeds.fetch_add(1, Ordering::Relaxed);
            let nodes = support::build(&specs, 0);
            let root = nodes.len() - 1;
            let faulty = rask::Config::new().executor(rask::ExecutorKind::SimCluster {
                workers: 3,
                seed,
                faults: 4,
            });
            let want = nodes[root].compute_with(&rask::Config::synchronous());
            let got = nodes[root].compute_with(&faulty);
            match (want, got) {
                (Ok(want), Ok(got)) => prop_assert_eq!(want, got, "seed {}", seed),
                (Err(rask::Error::Task { .. }), Err(rask::Error::Task { key, .. })) => {
                    let up = support::upstream(&specs, root);
                    let culprit = (0..specs.len()).any(|i| {
                        up[i]
                            && matches!(specs[i], support::Spec::Mix { fails: true, .. })
                            && nodes[i].key() == key
                    });
                    prop_assert!(
                        culprit,
                        "seed {}: {} is not a failing upstream task",
                        seed,
                        key
                    );
                }
                (want, got) => prop_assert!(false, "seed {}: sync {:?}, sim {:?}", seed, want, got),
            }
            Ok(())
        })
        .unwrap();
}

/// The sync executor frees each value right after its last consumer: a tree
/// reduction keeps O(depth) values alive, not O(leaves).
#[test]
fn synchronous_frees_intermediates() {
    use std::sync::atomic::{AtomicIsize, Ordering};

    use rask::delayed;

    static LIVE: AtomicIsize = AtomicIsize::new(0);
    static PEAK: AtomicIsize = AtomicIsize::new(0);

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Tracked(i64);
    impl Tracked {
        fn new(v: i64) -> Self {
            let live = LIVE.fetch_add(1, Ordering::SeqCst) + 1;
            PEAK.fetch_max(live, Ordering::SeqCst);
            Tracked(v)
        }
    }
    impl Clone for Tracked {
        fn clone(&self) -> Self {
            Tracked::new(self.0)
        }
    }
    impl Drop for Tracked {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }
    fn leaf(i: i64) -> Tracked {
        Tracked::new(i)
    }
    fn join(a: Tracked, b: Tracked) -> Tracked {
        Tracked::new(a.0 + b.0)
    }

    let n = 4096;
    let mut level: Vec<_> = (0..n).map(|i| delayed!(leaf(i))).collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| delayed!(join(&p[0], &p[1])))
            .collect();
    }
    let total = level[0].compute_with(&rask::Config::synchronous()).unwrap();
    assert_eq!(total.0, n * (n - 1) / 2);
    drop(total);
    let depth = 12;
    let peak = PEAK.load(Ordering::SeqCst);
    assert!(
        peak <= depth + 3,
        "peak of {peak} live values for a tree of depth {depth}"
    );
    assert_eq!(LIVE.load(Ordering::SeqCst), 0);
}

#[cfg(feature = "distributed")]
fn neg_i64(x: i64) -> i64 {
    -x
}

#[cfg(feature = "distributed")]
fn show_u64(x: u64) -> u64 {
    x
}

/// A task's value asked for as another type (`Graph::delayed::<T>` with
/// the wrong `T`) is refused when the handle is made, for a call, a
/// wrapped value, a future, a persisted result and a hand-written task: a
/// cluster keeps values as bytes,
/// and read the `i64` −5's as the `u64` 9 (`show_u64` of it computed 9 on
/// a simulated cluster before). The right type still computes there.
#[cfg(feature = "distributed")]
#[test]
fn a_value_asked_for_as_another_type_is_refused_before_it_travels() {
    rask::init_with(cluster_tasks());
    let call = rask::delayed!(neg_i64(5));
    let value = rask::value(-5i64);
    let client = rask::Client::with_config(&rask::Config::synchronous()).unwrap();
    let future = client
        .submit(rask::delayed!(neg_i64(6)))
        .unwrap()
        .to_delayed();
    let persisted = client.persist(&rask::delayed!(neg_i64(7))).unwrap();
    for d in [&call, &value, &future, &persisted] {
        let g = rask::Graph::from_delayed(d);
        let key = d.key().key();
        let err = g.delayed::<u64>(key).unwrap_err();
        assert!(matches!(err, rask::Error::WrongType { .. }), "{err}");
        assert_eq!(g.delayed::<i64>(key).unwrap().key().key(), key);
    }
    let mut hand = rask::Graph::new();
    let five = hand.insert_task("five", &[], |_| 5i64);
    assert!(matches!(
        hand.delayed::<u64>(five),
        Err(rask::Error::WrongType { .. })
    ));
    let cluster = rask::Config::new().executor(rask::ExecutorKind::SimCluster {
        workers: 1,
        seed: 7,
        faults: 0,
    });
    let right = rask::Graph::from_delayed(&call)
        .delayed::<i64>(call.key().key())
        .unwrap();
    let shown = rask::delayed!(neg_i64(&right));
    assert_eq!(shown.compute_with(&cluster).unwrap(), 5);
}

/// Calls of `polite` so far.
static POLITE_CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// First call: work that stops when `cancelled()` says so (its timeout),
/// returning a partial -1; later calls: quick and complete.
fn polite(x: i64) -> i64 {
    if POLITE_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
        while !rask::cancelled() {
            std::thread::yield_now();
        }
        return -1;
    }
    x + 1
}

/// Runs until `cancelled()` says so, then returns a partial -1.
fn until_told(_x: i64) -> i64 {
    while !rask::cancelled() {
        std::thread::yield_now();
    }
    -1
}

/// A nested computation whose timed task times out, and a value of its
/// own in its stead.
fn with_fallback(x: i64) -> i64 {
    let inner = rask::delayed!(until_told(x)).timeout(std::time::Duration::from_millis(20));
    inner
        .compute_with(&rask::Config::synchronous())
        .unwrap_or(1000 + x)
}

/// A timeout is not a cancellation: a task that saw `cancelled()` true
/// because a deadline passed (its own, on an attempt retried since; or a
/// nested task's) keeps the value it returns once its own work is wanted.
/// Both values were dropped as cancelled by the first version of the rule
/// that drops a value returned after a cancellation.
#[test]
fn a_value_returned_after_a_timeout_not_a_cancellation_is_kept() {
    let config = rask::Config::synchronous();
    let retried = rask::delayed!(polite(1))
        .timeout(std::time::Duration::from_millis(30))
        .retries(1);
    assert_eq!(retried.compute_with(&config).unwrap(), 2);
    assert_eq!(
        POLITE_CALLS.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the first attempt timed out"
    );
    assert_eq!(
        rask::delayed!(with_fallback(5))
            .compute_with(&config)
            .unwrap(),
        1005
    );
}

/// Sleeps for `ms`, never asking whether it is still wanted.
fn sleeps_on(ms: u64) -> u64 {
    std::thread::sleep(std::time::Duration::from_millis(ms));
    ms
}

/// A task abandoned at its timeout is listed under its function's name,
/// which a worker's "unhealthy" line shows; every such task was listed as
/// "task".
#[test]
fn a_task_abandoned_at_its_timeout_is_listed_by_its_name() {
    let err = rask::delayed!(sleeps_on(20_000))
        .timeout(std::time::Duration::from_millis(10))
        .compute_with(&rask::Config::synchronous())
        .unwrap_err();
    assert!(matches!(err, rask::Error::Timeout { .. }), "{err}");
    let names: Vec<String> = rask_executor::abandoned()
        .iter()
        .map(|a| a.name.to_string())
        .collect();
    assert!(names.iter().any(|n| n == "sleeps_on"), "{names:?}");
}

/// The thread a task ran on.
#[cfg(feature = "threaded")]
fn thread_of(_tag: i64) -> String {
    format!("{:?}", std::thread::current().id())
}

/// The thread a task ran on, after its input's.
#[cfg(feature = "threaded")]
fn thread_after(_before: String) -> String {
    thread_of(0)
}

/// `threads` runs a plan whose tasks can only run one at a time (one task,
/// a chain) on the thread that waits for it, and still runs tasks that can
/// run side by side on its pool.
#[cfg(feature = "threaded")]
#[test]
fn threads_runs_a_plan_of_one_task_at_a_time_on_the_waiting_thread() -> rask::Result<()> {
    use rask::delayed;
    let here = thread_of(0);
    let pool = rask::Config::threads(2);
    assert_eq!(delayed!(thread_of(1)).compute_with(&pool)?, here);
    // A chain the optimizer leaves as three tasks, each after the one before.
    let first = delayed!(thread_of(2));
    let chain = delayed!(thread_after(delayed!(thread_after(&first))));
    let unfused = pool.clone().optimize(false);
    assert_eq!(rask::explain(&chain, &unfused)?.len(), 3);
    assert_eq!(chain.compute_with(&unfused)?, here);
    // Two tasks side by side: the pool's.
    let (a, b) = rask::compute_with((&delayed!(thread_of(3)), &delayed!(thread_of(4))), &pool)?;
    assert_ne!(a, here);
    assert_ne!(b, here);
    // The same single task on a client's executor, which does not wait:
    // the pool's too.
    let client = rask::Client::with_config(&pool)?;
    assert_ne!(client.submit(delayed!(thread_of(5)))?.result()?, here);
    Ok(())
}
