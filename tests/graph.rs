//! Keys, graphs and the promises we keep across versions.

mod support;

use proptest::prelude::*;
use rask::{delayed, named_key, Config, Delayed, Error, Graph};

use support::{build, upstream, Spec};

fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// (a) The same expression built twice has identical keys; changing one
    /// literal changes the key of that node and every node downstream of it,
    /// and of no other node.
    #[test]
    fn keys_are_stable_and_change_exactly_downstream(specs in support::dag(50, 0.0), pick in any::<prop::sample::Index>()) {
        let a = build(&specs, 0);
        let b = build(&specs, 0);
        for (x, y) in a.iter().zip(&b) {
            prop_assert_eq!(x.key(), y.key());
        }
        let leaves: Vec<usize> = (0..specs.len()).filter(|&i| matches!(specs[i], Spec::Leaf(_))).collect();
        let changed = leaves[pick.index(leaves.len())];
        let mut edited = specs.clone();
        if let Spec::Leaf(v) = &mut edited[changed] {
            *v += 1_000_000;
        }
        let c = build(&edited, 0);
        for i in 0..specs.len() {
            let downstream = upstream(&specs, i)[changed];
            prop_assert_eq!(a[i].key() != c[i].key(), downstream, "node {}", i);
        }
    }
}

#[test]
fn key_display_is_short_and_readable() {
    let k = delayed!(inc(1)).key().to_string();
    let (name, hex) = k.split_once('-').unwrap();
    assert_eq!(name, "inc");
    assert_eq!(hex.len(), 8);
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
}

/// Golden key: changing it is a breaking change (keys are cache addresses).
/// Keys of calls and values also hold the type tag of their function or
/// type, which the compiler fixes for each build; they are checked for
/// stability across runs below, not against a constant.
#[test]
fn golden_keys() {
    assert_eq!(
        named_key("config").to_string(),
        "e2ff4c8652482c30b965274455f3913c47d87fede6ad2812e8629bdd805a273f"
    );
}

/// The keys of a fixed graph, one per line.
fn fixed_keys() -> String {
    let closure = |x: i64| x * 3;
    [
        rask::value(vec![1_i64, 2, 3]).key(),
        delayed!(add(&delayed!(inc(1)), 2)).key(),
        delayed!(closure(4)).key(),
    ]
    .iter()
    .map(|k| format!("{}\n", k.key()))
    .collect()
}

/// Rule: a function item, a closure that captures nothing and a value keep
/// their keys in every run of the same binary.
#[test]
fn keys_are_the_same_in_every_run_of_the_binary() {
    const PRINT: &str = "RASK_TEST_PRINT_KEYS";
    if std::env::var_os(PRINT).is_some() {
        print!("{}", fixed_keys());
        return;
    }
    let ours = fixed_keys();
    for _ in 0..2 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "keys_are_the_same_in_every_run_of_the_binary",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PRINT, "1")
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&ours), "{ours} not in {text}");
    }
}

fn parse_len(s: String) -> Result<usize, String> {
    if s.is_empty() {
        Err("empty".into())
    } else {
        Ok(s.len())
    }
}

/// Rule: a call and the same call unwrapped with `?` are two works (the
/// `Result`, and its `Ok` value): two keys, each its own value, in one
/// graph and on every executor. They shared a key, so one slot got the
/// other's value (locally a type error; on a cluster the bytes of
/// `Ok(5)` decoded as a number of another meaning).
#[test]
fn a_call_and_the_same_call_unwrapped_are_two_tasks() {
    let whole = delayed!(parse_len("hello".to_string()));
    let ok = delayed!(parse_len("hello".to_string())?);
    assert_ne!(whole.key(), ok.key());
    let mut configs = vec![Config::synchronous()];
    if cfg!(feature = "threaded") {
        configs.push(Config::threads(2));
    }
    for config in configs {
        let (a, b) = rask::compute_with((&whole, &ok), &config).unwrap();
        assert_eq!((a, b), (Ok(5), 5));
        let (a, b) = rask::compute_with((&ok, &whole), &config).unwrap();
        assert_eq!((a, b), (5, Ok(5)));
    }
    // Keys stay what they were for calls not unwrapped.
    assert_eq!(delayed!(parse_len("hello".to_string())).key(), whole.key());
}

/// Rule: distinct functions never share a key, closures included, and a
/// closure that captures variables gets a fresh key per call.
#[test]
fn distinct_closures_never_share_a_key() {
    let config = Config::synchronous();
    // Two closures of one function.
    let plus = |x: i64| x + 1;
    let times = |x: i64| x * 10;
    let (a, b) = (delayed!(plus(1)), delayed!(times(1)));
    assert_ne!(a.key(), b.key());
    assert_eq!(rask::compute_with((&a, &b), &config).unwrap(), (2, 10));
    // The same capture-free closure twice: one key, shared work.
    assert_eq!(delayed!(plus(1)).key(), a.key());
    // Shadowing: two closures bound to one name.
    let f = |x: i64| x + 1;
    let first = delayed!(f(5));
    let f = |x: i64| x * 10;
    let second = delayed!(f(5));
    assert_ne!(first.key(), second.key());
    assert_eq!(
        rask::compute_with((&first, &second), &config).unwrap(),
        (6, 50)
    );
    // Captured state is not hashed: each call is its own work.
    let mut adders = Vec::new();
    for k in 0..3_i64 {
        let add_k = move |x: i64| x + k;
        adders.push(delayed!(add_k(1)));
    }
    assert_eq!(rask::compute_with(&adders, &config).unwrap(), vec![1, 2, 3]);
    assert_ne!(adders[0].key(), adders[1].key());
    let k = 7_i64;
    let add_k = move |x: i64| x + k;
    assert_ne!(delayed!(add_k(1)).key(), delayed!(add_k(1)).key());
    // Named, the name stands for what it captured; its function and
    // arguments still count (calls over other arguments named alike used
    // to share one key and one value).
    let step = |i: i64| delayed!(add_k(i)).named("add-k");
    assert_eq!(step(1).key(), step(1).key());
    assert_ne!(step(1).key(), step(2).key());
    let mul_k = move |x: i64| x * k;
    assert_ne!(step(1).key(), delayed!(mul_k(1)).named("add-k").key());
    // Also over a literal past the key buffer (16 KiB), which used to
    // leave such a call without a key to name (a fresh one each time).
    let long = move |v: Vec<u8>| v.len() as i64 + k;
    let big = |n: usize| delayed!(long(vec![1_u8; n])).named("long");
    assert_eq!(big(20_000).key(), big(20_000).key());
    assert_ne!(big(20_000).key(), big(20_001).key());
    assert_ne!(
        delayed!(long(vec![1_u8; 20_000])).key(),
        delayed!(long(vec![1_u8; 20_000])).key()
    );
    // Unique work stays unique under a name.
    let once = || delayed!(add_k(1)).unique().named("add-k");
    assert_ne!(once().key(), once().key());
    let steps: Vec<_> = (0..3).map(step).collect();
    assert_eq!(rask::compute_with(&steps, &config).unwrap(), vec![7, 8, 9]);
    // Two nested functions of one name in different blocks share a path.
    let one = {
        fn h(x: i64) -> i64 {
            x + 1
        }
        delayed!(h(1))
    };
    let other = {
        fn h(x: i64) -> i64 {
            x * 10
        }
        delayed!(h(1))
    };
    assert_ne!(one.key(), other.key());
    assert_eq!(
        rask::compute_with((&one, &other), &config).unwrap(),
        (2, 10)
    );
}

#[test]
fn keys_depend_on_function_and_argument_order() {
    fn sub(x: i64, y: i64) -> i64 {
        x - y
    }
    let a = rask::value(1_i64);
    let b = rask::value(2_i64);
    assert_ne!(delayed!(add(&a, &b)).key(), delayed!(add(&b, &a)).key());
    assert_ne!(delayed!(add(&a, &b)).key(), delayed!(sub(&a, &b)).key());
    // A literal and a wrapped value of the same number are different inputs.
    assert_ne!(
        delayed!(inc(1)).key(),
        delayed!(inc(rask::value(1_i64))).key()
    );
    // A name is part of the key, beside the work's own: other work under
    // the same name, or the same work under another name, is another key.
    assert_eq!(
        delayed!(inc(1)).named("one").key(),
        delayed!(inc(1)).named("one").key()
    );
    assert_ne!(
        delayed!(inc(1)).named("one").key(),
        delayed!(inc(2)).named("one").key()
    );
    assert_ne!(
        delayed!(inc(1)).named("one").key(),
        delayed!(inc(1)).named("two").key()
    );
    assert_ne!(delayed!(inc(1)).named("one").key(), delayed!(inc(1)).key());
    // Unique keys.
    assert_ne!(
        delayed!(inc(1)).unique().key(),
        delayed!(inc(1)).unique().key()
    );
}

#[test]
fn merging_graphs_dedups_by_key() {
    let x = delayed!(inc(1));
    let t1 = delayed!(add(&x, 10));
    let t2 = delayed!(add(&delayed!(inc(1)), 20));
    let mut g = Graph::from_delayed(&t1);
    assert_eq!(g.len(), 2);
    g.merge(&Graph::from_delayed(&t2));
    assert_eq!(g.len(), 3, "inc(1) appears once");
    assert_eq!(
        g.compute_with::<i64>(t2.key().key(), &Config::synchronous())
            .unwrap(),
        22
    );
}

/// Two hand-assembled graphs with tasks of the same names over other data
/// are other work when they meet: in one computation and in one client.
/// Their nodes were keyed by their names, so one graph's value was taken
/// for the other's (`a` + `b` summed to 4 where 5 was due, and a client
/// gave the first graph's result for the second).
#[test]
fn graphs_with_the_same_names_keep_their_own_values() {
    let inc = |v: &[rask::Value]| v[0].downcast_ref::<i64>().copied().unwrap_or(0) + 1;
    let graph = |data: i64| {
        let mut g = Graph::new();
        let a = g.insert_value("a", data);
        let b = g.insert_task("b", &[a], inc);
        (g, b)
    };
    let (first, b) = graph(1);
    let (second, also_b) = graph(2);
    assert_eq!(b, also_b, "a graph's keys are its names");
    let config = Config::synchronous();
    let one = first.delayed::<i64>(b).unwrap();
    let two = second.delayed::<i64>(b).unwrap();
    assert_ne!(one.key(), two.key());
    fn add(x: i64, y: i64) -> i64 {
        x + y
    }
    assert_eq!(
        delayed!(add(&one, &two)).compute_with(&config).unwrap(),
        2 + 3
    );
    let client = rask::Client::with_config(&config).unwrap();
    let futures = [client.compute(&one).unwrap(), client.compute(&two).unwrap()];
    assert_eq!(client.gather(&futures).unwrap(), vec![2, 3]);
    // One graph's node is one node however often it is asked for.
    assert_eq!(first.delayed::<i64>(b).unwrap().key(), one.key());
    assert_eq!(first.clone().delayed::<i64>(b).unwrap().key(), one.key());
}

/// A hand-assembled task's name is its key: a second task under a name
/// already given is an error, not dropped in favour of the first (it was:
/// the graph computed the first task's value for both).
#[test]
fn a_name_given_to_two_tasks_is_an_error() {
    let config = Config::synchronous();
    let mut g = Graph::new();
    let a = g.insert_value("a", 1_i64);
    let b = g.insert_task("b", &[a], |v| {
        v[0].downcast_ref::<i64>().copied().unwrap_or(0) + 1
    });
    assert_eq!(g.compute_with::<i64>(b, &config).unwrap(), 2);
    let mut twice = g.clone();
    twice.insert_task("b", &[a], |_| 100_i64);
    let err = twice.validate().unwrap_err();
    assert!(
        matches!(&err, Error::NameGivenTwice(task) if task.name() == "b"),
        "{err}"
    );
    assert!(err.to_string().contains("named `b`"), "{err}");
    assert!(twice.compute_with::<i64>(b, &config).is_err());
    let mut twice = g.clone();
    twice.insert_value("a", 5_i64);
    assert!(matches!(twice.validate(), Err(Error::NameGivenTwice(_))));

    // Merged: the same tasks (a clone) are one; another task of the same
    // name is the error.
    let mut same = g.clone();
    same.merge(&g);
    assert_eq!(same.compute_with::<i64>(b, &config).unwrap(), 2);
    let mut other = Graph::new();
    other.insert_value("a", 10_i64);
    let mut merged = g.clone();
    merged.merge(&other);
    assert!(matches!(merged.validate(), Err(Error::NameGivenTwice(t)) if t.name() == "a"));
    // A `value_named` value is keyed by its data too: another value than
    // the graph's task of that name, not the same name given twice.
    let mut wrapped = g.clone();
    let seven = wrapped.insert(&rask::value_named("a", 7_i64));
    assert_ne!(seven, named_key("a"));
    wrapped.validate().unwrap();
    assert_eq!(wrapped.compute_with::<i64>(b, &config).unwrap(), 2);
    assert_eq!(wrapped.compute_with::<i64>(seven, &config).unwrap(), 7);
    // The error travels with a merge, too.
    let mut carried = Graph::new();
    carried.merge(&twice);
    assert!(matches!(carried.validate(), Err(Error::NameGivenTwice(_))));
}

#[test]
fn hand_made_graphs_are_validated() {
    let mut g = Graph::new();
    g.insert_task("a", &[named_key("b")], |_| 1_i64);
    g.insert_task("b", &[named_key("c")], |_| 1_i64);
    g.insert_task("c", &[named_key("a")], |_| 1_i64);
    let err = g.validate().unwrap_err();
    assert!(matches!(err, Error::Cycle(_)), "{err}");
    assert!(
        err.to_string().starts_with("graph has a cycle through "),
        "{err}"
    );
    assert!(g
        .compute_with::<i64>(named_key("a"), &Config::synchronous())
        .is_err());

    let mut g = Graph::new();
    g.insert_task("lonely", &[named_key("nowhere")], |_| 1_i64);
    assert!(matches!(g.validate(), Err(Error::MissingDependency { .. })));
    assert!(matches!(
        g.compute_with::<i64>(named_key("absent"), &Config::synchronous()),
        Err(Error::UnknownKey(_))
    ));

    let mut g = Graph::new();
    let a = g.insert_value("a", 2_i64);
    let sq = g.insert_task("sq", &[a, a], |v| {
        v[0].downcast_ref::<i64>().unwrap() * v[1].downcast_ref::<i64>().unwrap()
    });
    assert_eq!(
        g.compute_with::<i64>(sq, &Config::synchronous()).unwrap(),
        4
    );
    assert!(matches!(
        g.compute_with::<String>(sq, &Config::synchronous()),
        Err(Error::WrongType { .. })
    ));
    let dot = g.to_dot().unwrap();
    assert!(
        dot.contains("shape=box") && dot.contains("shape=ellipse"),
        "{dot}"
    );
}

#[test]
fn to_dot_shows_tasks_and_edges() {
    let x = delayed!(inc(1));
    let total = delayed!(add(&x, &rask::value(3_i64)));
    let dot = total.to_dot();
    assert!(
        dot.contains(&format!("label=\"{}\", shape=ellipse", x.key())),
        "{dot}"
    );
    assert!(dot.contains("shape=box"), "{dot}");
    assert_eq!(dot.matches("->").count(), 2, "{dot}");
}

#[test]
fn fallible_tasks_report_their_error() {
    fn parse(s: String) -> Result<i64, std::num::ParseIntError> {
        s.parse()
    }
    let bad = delayed!(parse("nope".to_string())?);
    let err = delayed!(inc(&bad))
        .compute_with(&Config::synchronous())
        .unwrap_err();
    match err {
        Error::Task {
            key,
            panicked,
            message,
            ..
        } => {
            assert_eq!(key, bad.key());
            assert!(!panicked);
            assert_eq!(message, "invalid digit found in string");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn untraversed_collections_reach_the_function_as_handles() {
    fn keys(parts: Vec<Delayed<i64>>) -> Vec<String> {
        parts.iter().map(|p| p.key().to_string()).collect()
    }
    let parts = vec![delayed!(inc(1)), delayed!(inc(2))];
    let got = delayed!(keys(rask::Untraversed(parts.clone())))
        .compute_with(&Config::synchronous())
        .unwrap();
    assert_eq!(
        got,
        vec![parts[0].key().to_string(), parts[1].key().to_string()]
    );
}

#[test]
fn environment_variable_picks_the_executor_and_rejects_junk() {
    // The only test in this binary that reads the environment.
    std::env::set_var("RASK_SCHEDULER", "sync");
    assert_eq!(
        Config::new().resolve().unwrap(),
        rask::ExecutorKind::Synchronous
    );
    std::env::set_var("RASK_SCHEDULER", "threads:3");
    assert_eq!(
        Config::new().resolve().unwrap(),
        rask::ExecutorKind::Threads(Some(3))
    );
    // Scoped beats the environment; explicit beats scoped.
    {
        let _g = rask::config::set(Config::synchronous());
        assert_eq!(
            Config::new().resolve().unwrap(),
            rask::ExecutorKind::Synchronous
        );
        assert_eq!(
            Config::threads(2).resolve().unwrap(),
            rask::ExecutorKind::Threads(Some(2))
        );
    }
    std::env::set_var("RASK_SCHEDULER", "bogus");
    let err = delayed!(inc(1)).compute().unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("threads:N"), "{err}");
    // A value that is not UTF-8 is an error naming the variable, not a
    // setting taken for unset (it fell back to the default before).
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let junk = std::ffi::OsStr::from_bytes(b"sync\xff");
        std::env::set_var("RASK_SCHEDULER", junk);
        let err = Config::new().resolve().unwrap_err();
        assert!(err.to_string().contains("RASK_SCHEDULER"), "{err}");
        std::env::remove_var("RASK_SCHEDULER");
        std::env::set_var("RASK_OPTIMIZE", junk);
        let err = delayed!(inc(1)).compute().unwrap_err();
        assert!(err.to_string().contains("RASK_OPTIMIZE"), "{err}");
        std::env::remove_var("RASK_OPTIMIZE");
    }
    std::env::remove_var("RASK_SCHEDULER");
}

/// The child of [`a_bad_setting_is_refused_whatever_else_is_set`]: computes
/// and persists a graph with the environment it was given, printing what
/// each gave. Idle unless `RASK_GRAPH_TEST_SETTINGS` is set.
#[test]
fn settings_child() {
    if std::env::var_os("RASK_GRAPH_TEST_SETTINGS").is_none() {
        return;
    }
    let show = |r: Result<i64, Error>| match r {
        Ok(v) => format!("ok {v}"),
        Err(e) => format!("error: {e}"),
    };
    println!("compute: {}", show(delayed!(inc(1)).compute()));
    let persisted = rask::persist(&[delayed!(inc(2))]).map(|p| p[0].clone());
    println!("persist: {}", show(persisted.and_then(|p| p.compute())));
}

/// A bad setting is refused by `compute` and `persist` on every executor,
/// whether or not what it tunes is in use: `RASK_SPIN` without a client
/// (it was read only when one was made), the cache's settings without
/// `RASK_CACHE` (read only with it). A child process each, as the
/// environment is the process's (found by a user pass).
#[test]
fn a_bad_setting_is_refused_whatever_else_is_set() {
    let schedulers: &[&str] = if cfg!(feature = "distributed") {
        &["sync", "threads", "local:1"]
    } else {
        &["sync", "threads"]
    };
    let bad = [
        ("RASK_SPIN", "bogus", "expected `1`, `true`"),
        ("RASK_CACHE_ALL", "bogus", "expected `1`, `true`"),
        ("RASK_CACHE_STRICT", "maybe", "expected `1`, `true`"),
        (
            "RASK_CACHE_MAX_BYTES",
            "10GB",
            "expected a whole number of bytes",
        ),
    ];
    for scheduler in schedulers {
        for (name, value, expected) in bad {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "settings_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("RASK_GRAPH_TEST_SETTINGS", "1")
                .env("RASK_SCHEDULER", scheduler)
                .env(name, value)
                .env_remove("RASK_CACHE")
                .env_remove("RASK_CONFIG")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{name}={value} on {scheduler}: {text}"
            );
            let message = format!("error: invalid value `{value}` for {name}: {expected}");
            for call in ["compute", "persist"] {
                assert!(
                    text.contains(&format!("{call}: {message}")),
                    "{name}={value} on {scheduler}, {call}: {text}"
                );
            }
        }
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Delayed<i64>>();
    check::<Graph>();
    check::<Error>();
    check::<Config>();
    check::<rask::TaskKey>();
}

/// Nested arguments (#16): shapes over a pool of three inputs.
mod nested_keys {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;
    use rask::{delayed, value, Delayed};

    type Shape = Vec<Vec<Option<usize>>>;
    type Named = BTreeMap<String, Vec<usize>>;

    fn grid(x: Vec<Vec<Option<i64>>>) -> usize {
        x.len()
    }

    fn named(x: BTreeMap<String, Vec<i64>>) -> usize {
        x.len()
    }

    fn hashed(x: HashMap<String, Vec<i64>>) -> usize {
        x.len()
    }

    fn pool() -> Vec<Delayed<i64>> {
        (0..3).map(value).collect()
    }

    fn shape() -> impl Strategy<Value = Shape> {
        prop::collection::vec(
            prop::collection::vec(prop::option::of(0..3_usize), 0..3),
            0..3,
        )
    }

    fn table() -> impl Strategy<Value = Named> {
        prop::collection::btree_map("[ab]{0,2}", prop::collection::vec(0..3_usize, 0..3), 0..3)
    }

    fn grid_key(s: &Shape) -> rask::TaskKey {
        let p = pool();
        let arg: Vec<Vec<Option<&Delayed<i64>>>> = s
            .iter()
            .map(|row| row.iter().map(|c| c.map(|i| &p[i])).collect())
            .collect();
        delayed!(grid(arg)).key()
    }

    fn with_inputs(t: &Named) -> BTreeMap<String, Vec<Delayed<i64>>> {
        let p = pool();
        t.iter()
            .map(|(k, v)| (k.clone(), v.iter().map(|&i| p[i].clone()).collect()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        /// Distinct structures never share a key; equal ones always do.
        #[test]
        fn distinct_shapes_never_share_a_key(a in shape(), b in shape()) {
            prop_assert_eq!(grid_key(&a) == grid_key(&b), a == b, "{:?} {:?}", a, b);
            prop_assert_eq!(grid_key(&a), grid_key(&a));
        }

        /// Map keys and values are part of the key; a `HashMap`'s key does
        /// not depend on its iteration order.
        #[test]
        fn distinct_maps_never_share_a_key(a in table(), b in table()) {
            let ka = delayed!(named(with_inputs(&a))).key();
            let kb = delayed!(named(with_inputs(&b))).key();
            prop_assert_eq!(ka == kb, a == b, "{:?} {:?}", a, b);
            let h1: HashMap<_, _> = with_inputs(&a).into_iter().collect();
            let mut h2: HashMap<_, _> = HashMap::with_capacity(64);
            h2.extend(with_inputs(&a).into_iter().rev());
            prop_assert_eq!(delayed!(hashed(h1)).key(), delayed!(hashed(h2)).key());
        }
    }

    /// A list and an array of the same inputs make the same value and key;
    /// a literal and the same value as inputs do not share a key.
    #[test]
    fn same_value_same_key_across_list_kinds() {
        fn three(x: Vec<i64>) -> i64 {
            x.iter().sum()
        }
        let p = pool();
        let a = delayed!(three(vec![&p[0], &p[1], &p[2]]));
        let b = delayed!(three([&p[0], &p[1], &p[2]]));
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), delayed!(three(vec![0, 1, 2])).key());
        assert_ne!(a.key(), delayed!(three(vec![&p[0], &p[1]])).key());
    }
}

/// A map key whose serialization always fails.
#[derive(Clone, PartialEq, Eq, Hash, serde::Deserialize)]
struct Unsendable(u8);

impl serde::Serialize for Unsendable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this key never serializes"))
    }
}

fn table() -> std::collections::HashMap<Unsendable, i64> {
    std::collections::HashMap::from([(Unsendable(1), 10)])
}

/// A lookup whose key cannot be serialized fails as a task, under a key of
/// its own: not one a name gives (`getitem-N` once was), which a task
/// named so would have shared, one of the two then giving the other's
/// result.
#[test]
fn a_lookup_that_cannot_be_keyed_shares_no_key_with_a_name() {
    let map = delayed!(table());
    let bad = map.item(Unsendable(1));
    let again = map.item(Unsendable(1));
    assert_ne!(
        bad.key(),
        again.key(),
        "each failing lookup is its own task"
    );
    for n in 0..10_000 {
        assert_ne!(bad.key().key(), named_key(&format!("getitem-{n}")));
    }
    let err = bad.compute().unwrap_err();
    assert!(
        format!("{err:#}").contains("could not be serialized"),
        "{err:#}"
    );
}

/// Names given to work: a name is part of a task's key beside its
/// work, so keys are equal exactly when function, input and names are.
mod named_keys {
    use proptest::prelude::*;
    use rask::delayed;

    fn inc(x: i64) -> i64 {
        x + 1
    }

    fn dec(x: i64) -> i64 {
        x - 1
    }

    /// Which function, its literal input, and the names given in turn.
    type Work = (bool, i64, Vec<String>);

    fn work() -> impl Strategy<Value = Work> {
        (
            any::<bool>(),
            0..3_i64,
            prop::collection::vec("[ab]{0,2}", 0..3),
        )
    }

    fn key((up, x, names): &Work) -> rask::TaskKey {
        let mut d = if *up {
            delayed!(inc(*x))
        } else {
            delayed!(dec(*x))
        };
        for name in names {
            d = d.named(name.clone());
        }
        d.key()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn named_work_shares_a_key_only_with_the_same_work_and_names(a in work(), b in work()) {
            prop_assert_eq!(key(&a) == key(&b), a == b, "{:?} {:?}", a, b);
            prop_assert_eq!(key(&a), key(&a));
        }

        /// A value wrapped under a name is keyed by both: one name over
        /// other data is another key (it was the name's alone), and
        /// `value` is `value_named` under the name `value`.
        #[test]
        fn named_values_share_a_key_only_with_the_same_name_and_data(
            a in ("[ab]{0,2}|value", prop::collection::vec(0..3_i64, 0..3)),
            b in ("[ab]{0,2}|value", prop::collection::vec(0..3_i64, 0..3)),
        ) {
            let key = |(name, data): &(String, Vec<i64>)| rask::value_named(name.clone(), data.clone()).key();
            prop_assert_eq!(key(&a) == key(&b), a == b, "{:?} {:?}", a, b);
            prop_assert_eq!(key(&a) == rask::value(a.1.clone()).key(), a.0 == "value");
        }
    }
}

/// An untraversed value's key is its serialization, not its `Hash`: a type
/// whose `Hash` leaves fields out (here all but `id`) used to give two
/// different values one key, and one value for both.
mod untraversed_keys {
    use rask::{delayed, Config, Untraversed};

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct Job {
        id: u32,
        weights: Vec<f64>,
    }

    impl std::hash::Hash for Job {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            self.id.hash(state);
        }
    }

    fn total(job: Job) -> f64 {
        job.weights.iter().sum()
    }

    fn add(x: f64, y: f64) -> f64 {
        x + y
    }

    #[test]
    fn values_that_differ_only_where_hash_does_not_look_get_their_own_keys() {
        let job = |w: f64| Job {
            id: 1,
            weights: vec![w, 1.0],
        };
        let a = delayed!(total(Untraversed(job(1.0))));
        let b = delayed!(total(Untraversed(job(2.0))));
        assert_ne!(a.key(), b.key());
        assert_eq!(a.key(), delayed!(total(Untraversed(job(1.0)))).key());
        let both = delayed!(add(&a, &b));
        assert_eq!(both.compute_with(&Config::synchronous()).unwrap(), 5.0);
        // Floats in an untraversed value, which `Hash` refused: -0.0 and
        // 0.0 are different values.
        assert_ne!(
            delayed!(total(Untraversed(job(0.0)))).key(),
            delayed!(total(Untraversed(job(-0.0)))).key()
        );
    }
}

/// Shows a JSON value as text.
fn shown(v: serde_json::Value) -> String {
    v.to_string()
}

/// A number of two widths, written without its variant (`untagged`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Width {
    Small(u8),
    Big(u64),
}

fn width(w: Width) -> String {
    format!("{w:?}")
}

/// Two optional fields, each left out of the encoding when empty.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Sparse {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    a: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    b: Option<u32>,
}

fn sparse(s: Sparse) -> String {
    format!("{s:?}")
}

/// Distinct literals of one type whose compact encodings are the same
/// bytes are distinct work: keys hash what each value's `Serialize` does,
/// not its postcard bytes. They shared a key, and computed together each
/// got the first one's value (`false` for JSON's `0`, `""`, `[]` and `{}`).
#[test]
fn literals_whose_compact_encodings_agree_are_distinct_work() {
    use serde_json::json;
    let json = [
        json!(false),
        json!(0),
        json!(""),
        json!([]),
        json!({}),
        json!(null),
    ];
    let tasks: Vec<Delayed<String>> = json.iter().map(|v| delayed!(shown(v.clone()))).collect();
    let want: Vec<String> = json.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        rask::compute_with(tasks, &Config::synchronous()).unwrap(),
        want
    );
    let widths = [Width::Small(1), Width::Big(1)];
    let tasks: Vec<Delayed<String>> = widths.iter().map(|w| delayed!(width(w.clone()))).collect();
    let got = rask::compute_with(tasks, &Config::synchronous()).unwrap();
    assert_eq!(got, ["Small(1)", "Big(1)"]);
    let values: Vec<Delayed<Width>> = widths.iter().map(|w| rask::value(w.clone())).collect();
    assert_ne!(values[0].key(), values[1].key());
    let one = Sparse {
        a: Some(5),
        b: None,
    };
    let other = Sparse {
        a: None,
        b: Some(5),
    };
    let tasks = vec![
        delayed!(sparse(one.clone())),
        delayed!(sparse(other.clone())),
    ];
    let got = rask::compute_with(tasks, &Config::synchronous()).unwrap();
    assert_eq!(got, [format!("{one:?}"), format!("{other:?}")]);
}

/// A value whose `Serialize` always fails.
#[derive(Clone, Debug)]
struct Refuses;

impl serde::Serialize for Refuses {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to be written"))
    }
}

impl<'de> serde::Deserialize<'de> for Refuses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| Refuses)
    }
}

fn after(_: Refuses, x: i64) -> i64 {
    x
}

/// A call whose argument could not be hashed shares its key with no other
/// call: its key held what was hashed before the failure, which another
/// call could hash too, and computed together the broken call's failure
/// or the other's value went to both.
#[test]
fn a_call_whose_argument_cannot_be_hashed_shares_its_key_with_nothing() {
    let one = delayed!(after(Refuses, 1));
    let again = delayed!(after(Refuses, 1));
    assert_ne!(one.key(), again.key());
    let err = one.compute_with(&Config::synchronous()).unwrap_err();
    assert!(err.to_string().contains("refuses to be written"), "{err}");
}
