//! The result cache on a cluster (`local:2`): cached tasks upstream of a
//! `persist`, cached tasks persisted themselves, and a `Client::compute`.
//! Each test runs this binary twice as a child program on one cache
//! directory; the tasks count themselves in a file as they run, on the
//! workers (which are this binary too). Runs with its own `main`
//! (`harness = false`), because a worker process must call `rask::init`
//! before anything else.

#[path = "support/harness.rs"]
mod harness;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use rask::{delayed, Client, Delayed};

/// Set in a run of this binary as a child program: which pipeline its
/// `main` runs instead of the tests.
const CHILD_ENV: &str = "RASK_CLUSTER_CACHE_CHILD";

/// The file each task appends its name to (inherited by the workers).
const COUNT_ENV: &str = "RASK_CLUSTER_CACHE_COUNT";

/// Appends `what` to the count file.
fn count(what: &str) {
    let path = std::env::var_os(COUNT_ENV).expect("the count file");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("the count file opens");
    // One write per line: several processes append at once.
    file.write_all(format!("{what}\n").as_bytes())
        .expect("the count file takes a line");
}

#[rask::task]
fn chunk(i: u64) -> Vec<u64> {
    count("chunk");
    (0..20_000).map(|x| x * (i + 1)).collect()
}

#[rask::task(cache)]
fn scaled(values: Vec<u64>, by: u64) -> Vec<u64> {
    count("scaled");
    values.iter().map(|v| v * by).collect()
}

#[rask::task]
fn chunk_sum(values: Vec<u64>) -> u64 {
    count("chunk_sum");
    values.iter().sum()
}

#[rask::task]
fn total(parts: Vec<u64>) -> u64 {
    count("total");
    parts.iter().sum()
}

#[rask::task]
fn flat_total(parts: Vec<Vec<u64>>) -> u64 {
    count("total");
    parts.iter().flatten().sum()
}

fn scaled_chunks(by: u64) -> Vec<Delayed<Vec<u64>>> {
    (0..4)
        .map(|i| delayed!(scaled(delayed!(chunk(i)), by)))
        .collect()
}

/// The child program: on `RASK_SCHEDULER` (`local:2`) with the cache
/// `RASK_CACHE`, runs the pipeline `which` names and prints its values.
fn child(which: &str) {
    let values: Vec<u64> = match which {
        // Cached tasks upstream of what is persisted, then a total over
        // the persisted values.
        "upstream" => {
            let sums: Vec<_> = scaled_chunks(3)
                .into_iter()
                .map(|s| delayed!(chunk_sum(s)))
                .collect();
            let sums = rask::persist(&sums).expect("the persist");
            vec![delayed!(total(&sums)).compute().expect("the total")]
        }
        // Cached tasks persisted themselves: loaded, they are placed on
        // the cluster and the total runs there.
        "persisted" => {
            let parts = rask::persist(&scaled_chunks(5)).expect("the persist");
            vec![delayed!(flat_total(&parts)).compute().expect("the total")]
        }
        // Through the futures API.
        "client" => {
            let client = Client::new().expect("a client from RASK_SCHEDULER");
            let root = delayed!(flat_total(scaled_chunks(7)));
            let value = client
                .compute(&root)
                .expect("the compute")
                .result()
                .expect("the result");
            // Written in the background: wait for it before the process ends.
            rask::cache::flush();
            vec![value]
        }
        other => panic!("no pipeline {other}"),
    };
    println!("values={values:?}");
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("rask-cluster-cache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the child `which` on the cache `dir`; its values line.
fn run_child(which: &str, dir: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, which)
        .env(COUNT_ENV, dir.join("counts"))
        .env("RASK_CACHE", dir.join("cache"))
        .env("RASK_SCHEDULER", "local:2")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    stdout
        .lines()
        .find(|l| l.starts_with("values="))
        .unwrap_or_else(|| panic!("no values in:\n{stdout}\n{stderr}"))
        .to_owned()
}

/// How many times each task ran, by name, in the order of `names`.
fn counted(dir: &Path, names: &[&str]) -> Vec<usize> {
    let text = std::fs::read_to_string(dir.join("counts")).unwrap_or_default();
    names
        .iter()
        .map(|n| text.lines().filter(|l| l == n).count())
        .collect()
}

const NAMES: [&str; 4] = ["chunk", "scaled", "chunk_sum", "total"];

/// Runs `which` twice on one cache: the counts after the first run and
/// what the second one added.
fn twice(which: &str) -> (Vec<usize>, Vec<usize>) {
    let dir = scratch(which);
    let first = run_child(which, &dir);
    let after_first = counted(&dir, &NAMES);
    let second = run_child(which, &dir);
    assert_eq!(first, second, "the second run got other values");
    let after_second = counted(&dir, &NAMES);
    let added = after_second
        .iter()
        .zip(&after_first)
        .map(|(b, a)| b - a)
        .collect();
    assert_eq!(
        rask::cache::info(&dir.join("cache")).unwrap().entries,
        4,
        "one entry per cached task"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    (after_first, added)
}

fn cached_tasks_upstream_of_a_persist_hit_in_a_second_process() {
    let (first, second) = twice("upstream");
    assert_eq!(first, [4, 4, 4, 1], "first run: every task once");
    // The four cached tasks load, and their chunks are not even made; the
    // sums over them run (not cached), on the workers.
    assert_eq!(second, [0, 0, 4, 1], "second run");
}

fn cached_tasks_persisted_on_a_cluster_hit_in_a_second_process() {
    let (first, second) = twice("persisted");
    assert_eq!(first, [4, 4, 0, 1], "first run: every task once");
    assert_eq!(second, [0, 0, 0, 1], "second run");
}

fn client_compute_uses_the_cache() {
    let (first, second) = twice("client");
    assert_eq!(first, [4, 4, 0, 1], "first run: every task once");
    assert_eq!(second, [0, 0, 0, 1], "second run");
}

fn main() {
    rask::init();
    if let Ok(which) = std::env::var(CHILD_ENV) {
        child(&which);
        return;
    }
    harness::run(&[
        (
            "cached_tasks_upstream_of_a_persist_hit_in_a_second_process",
            cached_tasks_upstream_of_a_persist_hit_in_a_second_process,
        ),
        (
            "cached_tasks_persisted_on_a_cluster_hit_in_a_second_process",
            cached_tasks_persisted_on_a_cluster_hit_in_a_second_process,
        ),
        (
            "client_compute_uses_the_cache",
            client_compute_uses_the_cache,
        ),
    ]);
}
