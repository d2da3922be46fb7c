//! Functions marked `#[rask::task]`, on every executor: `main` calls
//! `rask::init()` with no list, so on `local:2` the worker processes (this
//! binary again) find every function through the attribute alone. A binary
//! of its own (`harness = false`) since a worker must stop in `rask::init`
//! before the tests start, and because `tests/distributed.rs` keeps its
//! `rask::tasks!` list.

#[path = "support/harness.rs"]
mod harness;

use rask::{delayed, Client, Config, Delayed, Error, ExecutorKind};

#[rask::task]
fn inc(x: i64) -> i64 {
    x + 1
}

#[rask::task]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[rask::task]
fn sum(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Returns a `Result`: registered as called with `?`.
#[rask::task]
fn half(x: i64) -> Result<i64, String> {
    match x % 2 {
        0 => Ok(x / 2),
        _ => Err(format!("{x} is odd")),
    }
}

/// An alias the attribute cannot read as a `Result`.
type Checked<T> = Result<T, String>;

#[rask::task(fallible)]
fn checked_neg(x: i64) -> Checked<i64> {
    x.checked_neg()
        .ok_or_else(|| format!("{x} has no negation"))
}

/// A `Result` that is the task's value, not its failure.
#[rask::task(plain)]
fn parse(s: String) -> Result<i64, String> {
    s.parse().map_err(|e| format!("{s:?}: {e}"))
}

mod nested {
    /// Marked in another module.
    #[rask::task]
    pub(crate) fn square(x: i64) -> i64 {
        x * x
    }
}

/// The executors every test runs on.
fn executors() -> [Config; 3] {
    [
        Config::synchronous(),
        Config::threads(2),
        Config::new().executor(ExecutorKind::Local(2)),
    ]
}

fn marked_functions_run_on_every_executor() {
    for config in executors() {
        let x = delayed!(inc(1));
        let y = delayed!(nested::square(3));
        let total = delayed!(add(&x, &y));
        let parts: Vec<Delayed<i64>> = (0..=10).map(|i| delayed!(inc(i))).collect();
        let s = delayed!(sum(parts));
        let h = delayed!(half(&s)?);
        let n = delayed!(checked_neg(&h)?);
        let p = delayed!(parse("12".to_owned()));
        let got = rask::compute_with((&total, &s, &h, &n), &config).unwrap();
        assert_eq!(got, (11, 66, 33, -33), "on {config:?}");
        assert_eq!(p.compute_with(&config).unwrap(), Ok(12), "on {config:?}");

        // The futures API too.
        let client = Client::with_config(&config).unwrap();
        let squares = client.map(nested::square, 1..=4).unwrap();
        assert_eq!(client.gather(&squares).unwrap(), vec![1, 4, 9, 16]);
        let f = client.submit(delayed!(half(&squares[3])?)).unwrap();
        assert_eq!(f.result().unwrap(), 8, "on {config:?}");
    }
}

/// A marked function returning `Err` fails its task, naming it, with the
/// error's message, as a listed `f?` does; a `plain` one returns the `Err`.
fn marked_fallible_functions_fail_their_task() {
    for config in executors() {
        let odd = delayed!(half(7)?);
        let after = delayed!(inc(&odd));
        match after.compute_with(&config).unwrap_err() {
            Error::Task { key, .. } => assert_eq!(key, odd.key(), "on {config:?}"),
            other => panic!("unexpected {other} on {config:?}"),
        }
        let text = format!("{:#}", odd.compute_with(&config).unwrap_err());
        assert!(text.contains("7 is odd"), "on {config:?}: {text}");
        let err = delayed!(checked_neg(i64::MIN)?)
            .compute_with(&config)
            .unwrap_err();
        assert!(format!("{err:#}").contains("has no negation"), "{err:#}");
        let value = delayed!(parse("x".to_owned())).compute_with(&config);
        assert!(
            matches!(value, Ok(Err(ref e)) if e.contains("\"x\"")),
            "{value:?}"
        );
    }
}

/// A function marked inside a block (here a function body) is registered
/// like any other.
fn functions_marked_in_a_block_are_registered() {
    #[rask::task]
    fn cube(x: i64) -> i64 {
        x * x * x
    }
    for config in executors() {
        let d = delayed!(cube(delayed!(inc(2))));
        assert_eq!(d.compute_with(&config).unwrap(), 27, "on {config:?}");
    }
}

/// Not marked and not listed.
fn lonely(x: i64) -> i64 {
    x
}

/// An unmarked function runs in this process, and on a cluster fails at
/// once with an error naming it and the attribute.
fn unmarked_functions_are_named_on_a_cluster() {
    let [sync, threads, local] = executors();
    assert_eq!(delayed!(lonely(1)).compute_with(&sync).unwrap(), 1);
    assert_eq!(delayed!(lonely(1)).compute_with(&threads).unwrap(), 1);
    let text = delayed!(lonely(1))
        .compute_with(&local)
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("`registration::lonely` is not registered"),
        "{text}"
    );
    assert!(text.contains("#[rask::task]"), "{text}");
}

/// A closure that captures variables runs in this process; a cluster
/// refuses it where it is submitted, saying what to do instead, and sends
/// nothing of the graph.
fn capturing_closures_are_refused_by_a_cluster_at_submit() {
    let [sync, threads, local] = executors();
    let k = 3_i64;
    let add_k = move |x: i64| x + k;
    for config in [&sync, &threads] {
        let d = delayed!(add_k(delayed!(inc(1))));
        assert_eq!(d.compute_with(config).unwrap(), 5, "on {config:?}");
        let client = Client::with_config(config).unwrap();
        let f = client.submit(delayed!(add_k(1))).unwrap();
        assert_eq!(f.result().unwrap(), 4, "on {config:?}");
    }

    let client = Client::with_config(&local).unwrap();
    let before = client.stats();
    // Deep in a graph, behind a marked function.
    let d = delayed!(inc(delayed!(add_k(1))));
    // `map` names its tasks by the function's type, here the closure's.
    let refused = [
        ("add_k", client.submit(&d).map(drop).unwrap_err()),
        (
            "{{closure}}",
            client.map(add_k, 0..3).map(drop).unwrap_err(),
        ),
        ("add_k", d.compute_with(&local).unwrap_err()),
    ];
    for (name, err) in refused {
        let Error::Unsendable { ref key, .. } = err else {
            panic!("unexpected {err}");
        };
        assert_eq!(key.name(), name);
        let text = err.to_string();
        for what in [
            "registration::capturing_closures_are_refused_by_a_cluster_at_submit::{{closure}}",
            "is a closure that captures variables",
            "call a fn item marked `#[rask::task]` instead, taking those values as arguments",
        ] {
            assert!(text.contains(what), "{what:?} not in {text}");
        }
    }
    assert_eq!(client.stats(), before, "nothing was submitted");
    // The same work as a marked function taking the value runs.
    assert_eq!(delayed!(add(1, k)).compute_with(&local).unwrap(), 4);
}

fn main() {
    // No list: the worker processes of `local:2` know every marked function.
    rask::init();
    harness::token_for_this_run();
    let tests: &[(&str, fn())] = &[
        (
            "marked_functions_run_on_every_executor",
            marked_functions_run_on_every_executor,
        ),
        (
            "marked_fallible_functions_fail_their_task",
            marked_fallible_functions_fail_their_task,
        ),
        (
            "functions_marked_in_a_block_are_registered",
            functions_marked_in_a_block_are_registered,
        ),
        (
            "unmarked_functions_are_named_on_a_cluster",
            unmarked_functions_are_named_on_a_cluster,
        ),
        (
            "capturing_closures_are_refused_by_a_cluster_at_submit",
            capturing_closures_are_refused_by_a_cluster_at_submit,
        ),
    ];
    harness::run(tests);
}
