//! Helpers shared by the integration tests: random DAGs and a naive evaluator.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use proptest::prelude::*;
use rask::{delayed, Delayed};

/// A proptest runner of `cases` cases that writes no regression file
/// (the seeds of these tests are not kept between runs).
pub fn runner(cases: u32) -> proptest::test_runner::TestRunner {
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })
}

/// One node of a random DAG: a leaf literal or a combination of earlier nodes.
#[derive(Debug, Clone)]
pub enum Spec {
    Leaf(i64),
    /// `mix(deps, salt)`; fails when `fails` is set.
    Mix {
        deps: Vec<usize>,
        salt: i64,
        fails: bool,
    },
}

/// A random DAG: nodes in topological order (deps point backwards).
pub fn dag(max_nodes: usize, failure_rate: f64) -> impl Strategy<Value = Vec<Spec>> {
    (1..=max_nodes).prop_flat_map(move |n| {
        let nodes: Vec<BoxedStrategy<Spec>> = (0..n)
            .map(|i| {
                if i < 2 {
                    (0i64..4).prop_map(Spec::Leaf).boxed()
                } else {
                    prop_oneof![
                        1 => (0i64..4).prop_map(Spec::Leaf),
                        4 => (
                            proptest::collection::vec(0..i, 1..4),
                            0i64..3,
                            proptest::bool::weighted(failure_rate)
                        )
                            .prop_map(|(deps, salt, fails)| Spec::Mix { deps, salt, fails }),
                    ]
                    .boxed()
                }
            })
            .collect();
        nodes
    })
}

/// Executions per run id, so tests running in parallel count separately.
static EXECUTIONS: Mutex<Option<HashMap<u64, usize>>> = Mutex::new(None);
static RUN_IDS: AtomicU64 = AtomicU64::new(1);

/// A fresh run id; pass it to [`build`] to count that graph's executions.
pub fn run_id() -> u64 {
    RUN_IDS.fetch_add(1, Ordering::Relaxed)
}

pub fn executions(run: u64) -> usize {
    EXECUTIONS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(&run).copied())
        .unwrap_or(0)
}

fn count(run: u64) {
    *EXECUTIONS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(run)
        .or_default() += 1;
}

pub fn leaf(value: i64, run: u64) -> i64 {
    count(run);
    value
}

pub fn mix(inputs: Vec<i64>, salt: i64, fails: bool, run: u64) -> Result<i64, String> {
    count(run);
    if fails {
        return Err(format!("mix with salt {salt} failed"));
    }
    Ok(inputs
        .iter()
        .fold(salt, |acc, x| acc.wrapping_mul(31).wrapping_add(*x)))
}

/// Builds the DAG as `Delayed` values, one per spec node.
pub fn build(specs: &[Spec], run: u64) -> Vec<Delayed<i64>> {
    let mut out: Vec<Delayed<i64>> = Vec::with_capacity(specs.len());
    for spec in specs {
        let d = match spec {
            Spec::Leaf(v) => delayed!(leaf(*v, run)),
            Spec::Mix { deps, salt, fails } => {
                let inputs: Vec<Delayed<i64>> = deps.iter().map(|&d| out[d].clone()).collect();
                delayed!(mix(inputs, *salt, *fails, run)?)
            }
        };
        out.push(d);
    }
    out
}

/// Naive recursive evaluation: `Err(())` when a failing node is upstream.
pub fn eval(specs: &[Spec], i: usize) -> Result<i64, ()> {
    match &specs[i] {
        Spec::Leaf(v) => Ok(*v),
        Spec::Mix { deps, salt, fails } => {
            let inputs = deps
                .iter()
                .map(|&d| eval(specs, d))
                .collect::<Result<Vec<_>, _>>()?;
            if *fails {
                return Err(());
            }
            Ok(inputs
                .iter()
                .fold(*salt, |acc, x| acc.wrapping_mul(31).wrapping_add(*x)))
        }
    }
}

/// Checks a futures client against [`eval`] on the graph `specs` built
/// under `run`, with data leaves ([`build_with_values`]): its last node
/// through `client.compute`, every `step`-th node through `client.submit`.
pub fn client_agrees_with_eval(
    client: &rask::Client,
    specs: &[Spec],
    run: u64,
    step: usize,
) -> Result<(), TestCaseError> {
    let nodes = build_with_values(specs, run);
    let last = nodes.len() - 1;
    let root = client.compute(&nodes[last]).unwrap();
    let picked: Vec<usize> = (0..nodes.len()).step_by(step).collect();
    let futures: Vec<rask::Future<i64>> = picked
        .iter()
        .map(|&i| client.submit(&nodes[i]).unwrap())
        .collect();
    let want = |i: usize| eval(specs, i).ok();
    prop_assert_eq!(root.result().ok(), want(last));
    for (f, &i) in futures.iter().zip(&picked) {
        prop_assert_eq!(f.result().ok(), want(i), "node {}", i);
    }
    Ok(())
}

/// Indices of every node `i` depends on, itself included.
pub fn upstream(specs: &[Spec], i: usize) -> Vec<bool> {
    let mut seen = vec![false; specs.len()];
    let mut stack = vec![i];
    while let Some(j) = stack.pop() {
        if std::mem::replace(&mut seen[j], true) {
            continue;
        }
        if let Spec::Mix { deps, .. } = &specs[j] {
            stack.extend(deps.iter().copied());
        }
    }
    seen
}

/// `inc` of the tree workload.
pub fn tree_inc(x: i64) -> i64 {
    x + 1
}

/// `add` of the tree workload.
pub fn tree_add(x: i64, y: i64) -> i64 {
    x + y
}

/// The tree workload of `shared/bench/WORKLOADS.md`: `inc(i)` leaves reduced
/// pairwise by `add`.
pub fn tree(n: i64) -> Delayed<i64> {
    let mut level: Vec<Delayed<i64>> = (0..n).map(|i| delayed!(tree_inc(i))).collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => delayed!(tree_add(a, b)),
                [a] => a.clone(),
                _ => unreachable!(),
            })
            .collect();
    }
    level.pop().unwrap()
}

/// Like [`build`], but two leaves in three are data nodes, which the
/// optimizer folds into their consumers: `rask::value`s, and
/// `rask::value_named("leaf", …)`s, one name over other values. Data
/// leaves run no code, so they count no executions.
pub fn build_with_values(specs: &[Spec], run: u64) -> Vec<Delayed<i64>> {
    let mut out: Vec<Delayed<i64>> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let d = match spec {
            Spec::Leaf(v) if i % 3 == 0 => rask::value(*v),
            // One name for every such leaf, over their own values.
            Spec::Leaf(v) if i % 3 == 1 => rask::value_named("leaf", *v),
            Spec::Leaf(v) => delayed!(leaf(*v, run)),
            Spec::Mix { deps, salt, fails } => {
                let inputs: Vec<Delayed<i64>> = deps.iter().map(|&d| out[d].clone()).collect();
                delayed!(mix(inputs, *salt, *fails, run)?)
            }
        };
        out.push(d);
    }
    out
}

/// The chain workload of `shared/bench/WORKLOADS.md`: `x = inc(0)`, then
/// `x = inc(x)` `n - 1` times. `n` tasks; the result is `n`.
pub fn chain(n: usize) -> Delayed<i64> {
    fn inc(x: i64) -> i64 {
        x + 1
    }
    let mut x = delayed!(inc(0));
    for _ in 1..n {
        x = delayed!(inc(&x));
    }
    x
}

/// A scheduler and two workers (1 thread each) inside this test process, on
/// 127.0.0.1 with ports from the OS, started once per test binary; workers
/// find functions in `tasks` (the first list given wins). Returns the
/// configuration that computes on it. The scheduler requires the token a
/// client of this process finds ([`user_auth`]), so `RASK_SCHEDULER=tcp://…`
/// and `rask::Client::connect` reach it as they would a user's.
#[cfg(feature = "distributed")]
pub fn loopback_cluster(tasks: rask::Tasks) -> rask::Config {
    rask::Config::new().executor(rask::ExecutorKind::Tcp(loopback_address(tasks)))
}

/// The `host:port` of the cluster of [`loopback_cluster`].
#[cfg(feature = "distributed")]
pub fn loopback_address(tasks: rask::Tasks) -> String {
    use std::sync::OnceLock;
    type Cluster = (
        rask_distributed::scheduler::SchedulerHandle,
        Vec<rask_distributed::worker::WorkerHandle>,
    );
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    let (scheduler, _) = CLUSTER.get_or_init(|| {
        rask::init_with(tasks);
        let registry = rask::__private::registry().expect("registry installed");
        let auth = user_auth();
        let options = rask_distributed::scheduler::Options::default().auth(auth.clone());
        let scheduler = rask_distributed::scheduler::serve_with(
            "127.0.0.1:0".parse().expect("an address"),
            options,
        )
        .expect("scheduler starts");
        let address = format!("tcp://{}", scheduler.address());
        // One thread each: the case where a task computing a graph itself
        // must give its thread back (`nested_compute_inside_a_task`).
        let options = rask_distributed::worker::Options::default()
            .threads(1)
            .auth(auth);
        let workers = (0..2)
            .map(|_| {
                rask_distributed::worker::spawn_with(&address, registry.clone(), options.clone())
                    .expect("worker starts")
            })
            .collect();
        (scheduler, workers)
    });
    scheduler.address().to_string()
}

/// The credentials a client of this process finds, as a user's would
/// (`Auth::from_env`: `RASK_TOKEN`, `RASK_TOKEN_FILE`, then the per-user
/// file `$HOME/.rask/token`); when there are none, the per-user file is
/// created first, as `rask-scheduler` creates it. These test binaries run
/// many tests on threads at once, so they cannot set `RASK_TOKEN` for
/// themselves safely: the environment is not to be changed while other
/// threads read it.
#[cfg(feature = "distributed")]
pub fn user_auth() -> rask_distributed::Auth {
    use rask_distributed::{Auth, Token};
    match Auth::from_env().expect("valid token settings") {
        Some(auth) => auth,
        None => {
            let path = Token::default_path().expect("HOME is set");
            Auth::Token(Token::load_or_create(&path).expect("the token file").0)
        }
    }
}

/// Set in the child process that runs a test's body ([`in_child`]).
const CHILD_ENV: &str = "RASK_TEST_CHILD";

/// Runs `body` in a child process, this test binary again running only
/// the test `name` (which calls `in_child` again, there running `body`):
/// an abort (a panic on a pool thread, a panic in a destructor during
/// unwinding) then fails the test rather than ending the run. The child
/// gets 120 s.
pub fn in_child(name: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        body();
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the child ended with {}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
