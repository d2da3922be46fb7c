//! `rask::testing` (feature `testing`): generated graphs shrink to small
//! ones, futures scripts agree with `sync`, the event log counts runs, and
//! the replay line of `examples/property_test.rs` reproduces its failure.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestError, TestRunner};
use rask::testing::{self, dag, outcomes, script, Ops, Outcome, Shape};
use rask::{delayed, Client, Config, Delayed};

fn sum(xs: Vec<i64>) -> i64 {
    xs.iter().fold(0i64, |a, x| a.wrapping_add(*x))
}
fn neg(x: i64) -> i64 {
    x.wrapping_neg()
}
/// Fails on a negative input: tasks that fail, for agreement on failing keys.
fn check(x: i64) -> Result<i64, String> {
    if x < 0 {
        Err(format!("negative: {x}"))
    } else {
        Ok(x)
    }
}
/// A planted bug: wrong when it gets three or more inputs, one of them 7.
fn buggy_sum(xs: Vec<i64>) -> i64 {
    let s = sum(xs.clone());
    if xs.len() >= 3 && xs.contains(&7) {
        s + 1
    } else {
        s
    }
}

fn ops() -> Ops<i64> {
    Ops::new()
        .op("sum", 1..=4, |xs: Vec<Delayed<i64>>| delayed!(sum(xs)))
        .op("neg", 1..=1, |xs: Vec<Delayed<i64>>| delayed!(neg(&xs[0])))
        .op("check", 1..=1, |xs: Vec<Delayed<i64>>| {
            delayed!(check(&xs[0])?)
        })
}

/// The naive value of node `i`: what every executor must give.
fn eval(graph: &testing::Dag<i64>, i: usize, buggy: bool) -> i64 {
    match &graph.nodes()[i] {
        testing::DagNode::Leaf(v) => *v,
        testing::DagNode::Op { inputs, .. } => {
            let xs: Vec<i64> = inputs.iter().map(|&j| eval(graph, j, buggy)).collect();
            match (graph.op_name(i), buggy) {
                (Some("sum"), true) => buggy_sum(xs),
                (Some("sum"), false) => sum(xs),
                _ => unreachable!("only sums here"),
            }
        }
    }
}

#[test]
fn a_planted_bug_shrinks_to_at_most_five_nodes() {
    let ops = Ops::new().op("sum", 1..=4, |xs: Vec<Delayed<i64>>| {
        delayed!(buggy_sum(xs))
    });
    let shape = Shape {
        nodes: 1..=40,
        ..Shape::default()
    };
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig {
            cases: 512,
            failure_persistence: None,
            ..RunnerConfig::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let result = runner.run(&dag(0..10_i64, &ops, shape), |graph| {
        let outputs = graph.output_indices();
        let got = outcomes(&graph.outputs(), &Config::simulated(1));
        for (o, i) in got.iter().zip(outputs) {
            prop_assert_eq!(o, &Outcome::Value(eval(&graph, i, false)));
        }
        Ok(())
    });
    match result {
        Err(TestError::Fail(_, graph)) => {
            assert!(
                graph.len() <= 5,
                "shrunk to {} nodes: {graph:?}",
                graph.len()
            );
            // And it still shows the bug.
            assert!(graph
                .output_indices()
                .iter()
                .any(|&i| eval(&graph, i, true) != eval(&graph, i, false)));
        }
        other => panic!("the planted bug was not found: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, .. ProptestConfig::default() })]

    /// Same values and failing keys on `sync`, three seeds and a pool.
    #[test]
    fn executors_agree_on_generated_graphs(graph in dag(-3..10_i64, &ops(), Shape::default()), seed in any::<u64>()) {
        testing::assert_agree(&graph.outputs(), &[
            Config::synchronous(),
            Config::simulated(seed),
            Config::simulated(seed ^ 1),
            Config::threads(2).optimize(false),
        ]);
    }

    /// A futures script never gives a node another value than computing it.
    #[test]
    fn futures_scripts_agree_with_sync(
        graph in dag(-3..10_i64, &ops(), Shape { nodes: 1..=10, ..Shape::default() }),
        steps in script(1..=12),
        seed in any::<u64>(),
    ) {
        let reference: BTreeMap<usize, Outcome<i64>> =
            outcomes(&graph.build(), &Config::synchronous()).into_iter().enumerate().collect();
        for client in [Client::simulated(seed).unwrap(), Client::synchronous().unwrap()] {
            let seen = steps.run(&graph, &client);
            prop_assert!(seen.consistent_with(&reference).is_ok(), "{:?}", seen.consistent_with(&reference));
        }
    }

    /// The same seed replays the same script outcome, order included.
    #[test]
    fn a_seed_replays_a_script(
        graph in dag(0..10_i64, &ops(), Shape { nodes: 1..=8, ..Shape::default() }),
        steps in script(1..=8),
        seed in any::<u64>(),
    ) {
        let a = steps.run(&graph, &Client::simulated(seed).unwrap());
        let b = steps.run(&graph, &Client::simulated(seed).unwrap());
        prop_assert_eq!(a, b);
    }
}

fn tagged(x: i64, _tag: u64) -> i64 {
    x + 1
}

#[test]
fn the_event_log_counts_runs_and_cache_hits() {
    let tag = 0x7e57_u64;
    let config = Config::simulated(3).optimize(false);
    let log = testing::EventLog::record();
    let a = delayed!(tagged(1, tag));
    let b = delayed!(tagged(&a, tag));
    let c = delayed!(tagged(&a, tag + 1));
    assert_eq!(rask::compute_with((&b, &c), &config).unwrap(), (3, 3));
    log.assert_runs(&[(&a, 1), (&b, 1), (&c, 1)]);
    // A client holds `a`'s result: work on it does not run `a` again.
    let client = Client::with_config(&config).unwrap();
    let held = client.submit(&a).unwrap();
    held.result().unwrap();
    let log = testing::EventLog::record();
    let d = client.submit(delayed!(tagged(&held, tag + 2))).unwrap();
    assert_eq!(d.result().unwrap(), 3);
    assert!(log.cached(&a));
    assert_eq!(log.runs(&delayed!(tagged(&held, tag + 2))), 1);
}

/// `examples/property_test.rs` finds its planted bug, prints a replay line,
/// and that line reproduces the same failure.
#[test]
fn the_example_replay_reproduces_its_failure() {
    // Tests live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| {
            dir.join("examples")
                .join(format!("property_test{}", std::env::consts::EXE_SUFFIX))
        })
        .unwrap();
    assert!(
        example.exists(),
        "build it first: cargo build --example property_test --features testing"
    );
    let run = |scheduler: Option<&str>| {
        let mut cmd = std::process::Command::new(&example);
        cmd.env_remove("RASK_SCHEDULER")
            .env_remove(testing::REPLAY_COMMAND_ENV_VAR);
        if let Some(s) = scheduler {
            cmd.env("RASK_SCHEDULER", s);
        }
        cmd.output().unwrap()
    };
    let first = run(None);
    assert_eq!(first.status.code(), Some(1), "the planted bug is found");
    let stderr = String::from_utf8(first.stderr).unwrap();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("seed = "))
        .unwrap()
        .to_owned();
    let seed: u64 = line["seed = ".len()..line.find(';').unwrap()]
        .parse()
        .unwrap();
    assert_eq!(
        line,
        format!("seed = {seed}; replay: RASK_SCHEDULER=sim:{seed} cargo run --example property_test --features testing")
    );
    let replay = run(Some(&format!("sim:{seed}")));
    assert_eq!(replay.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(replay.stderr)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("seed = ")),
        Some(&*line)
    );
    assert_eq!(replay.stdout, first.stdout, "the same wrong result");
    // The fixed pipeline passes every seed.
    let fixed = std::process::Command::new(&example)
        .arg("--fixed")
        .env_remove("RASK_SCHEDULER")
        .output()
        .unwrap();
    assert!(fixed.status.success());
}
