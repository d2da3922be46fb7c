//! The result cache: what ran and what was loaded, across processes, under
//! damage and races, and that it never changes a result.
//!
//! The cross-process tests run this test binary again as a child (the
//! `child` test, idle unless `RASK_CACHE_TEST_CHILD` is set), which counts
//! each task it runs as a line in a file.

mod support;
#[path = "support/tmpfs.rs"]
mod tmpfs;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use rask::{delayed, Config};

/// A pool of threads when the feature is on, else a seeded order.
const POOL: &str = if cfg!(feature = "threaded") {
    "threads:2"
} else {
    "sim:5"
};

fn pool() -> Config {
    Config::new().executor(rask::ExecutorKind::parse(POOL).unwrap())
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rask-cache-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- the child's pipeline: 4 chunks (not cached), 4 sums and a total (cached)

/// Appends `what` to the count file, when there is one.
fn count(what: &str) {
    if let Some(path) = std::env::var_os("RASK_CACHE_TEST_COUNT") {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(format!("{what}\n").as_bytes()).unwrap();
    }
}

#[rask::task]
fn chunk(i: u64) -> Vec<u64> {
    count("chunk");
    (0..1000).map(|x| x * i).collect()
}

#[rask::task(cache)]
fn square_sum(values: Vec<u64>) -> u64 {
    count("square_sum");
    values.iter().map(|v| v * v).sum()
}

#[rask::task(cache)]
fn total(parts: Vec<u64>) -> u64 {
    count("total");
    parts.iter().sum()
}

fn pipeline() -> rask::Delayed<u64> {
    let parts: Vec<_> = (1..=4)
        .map(|i| delayed!(square_sum(delayed!(chunk(i)))))
        .collect();
    delayed!(total(parts))
}

/// 332833500 · (1 + 4 + 9 + 16)
const EXPECTED: u64 = 332_833_500 * 30;

/// Prints warnings on stderr, as a program's own subscriber would.
struct Warnings;

impl tracing::Subscriber for Warnings {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        eprintln!("WARN {}", message.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The child: computes the pipeline with the cache `RASK_CACHE` names.
#[test]
fn child() {
    if std::env::var_os("RASK_CACHE_TEST_CHILD").is_none() {
        return;
    }
    let _ = tracing::subscriber::set_global_default(Warnings);
    let value = pipeline().compute().unwrap();
    println!("result={value}");
}

/// Starts the child on the cache `dir`, counting into `counts`.
fn spawn_child(dir: &Path, counts: &Path, scheduler: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env("RASK_CACHE_TEST_CHILD", "1")
        .env("RASK_CACHE", dir)
        .env("RASK_CACHE_TEST_COUNT", counts)
        .env("RASK_SCHEDULER", scheduler)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The child's result and stderr, once it exited successfully.
fn finish(child: std::process::Child) -> (u64, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    );
    assert!(status.success(), "child failed:\n{stdout}\n{stderr}");
    let value: String = stdout
        .split_once("result=")
        .unwrap_or_else(|| panic!("no result in:\n{stdout}\n{stderr}"))
        .1
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (value.parse().unwrap(), stderr)
}

fn run_child(dir: &Path, counts: &Path, scheduler: &str) -> (u64, String) {
    finish(spawn_child(dir, counts, scheduler))
}

/// Lines of the count file: tasks run so far.
fn counted(counts: &Path) -> Vec<String> {
    std::fs::read_to_string(counts)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_second_process_runs_no_task_and_gets_the_same_value() {
    let dir = scratch("second");
    let (cache, counts) = (dir.join("cache"), dir.join("counts"));
    assert_eq!(run_child(&cache, &counts, "sync").0, EXPECTED);
    assert_eq!(counted(&counts).len(), 9, "first run: every task");
    for scheduler in ["sync", POOL, "sim:7"] {
        assert_eq!(run_child(&cache, &counts, scheduler).0, EXPECTED);
        assert_eq!(counted(&counts).len(), 9, "{scheduler}: a task ran again");
    }
    assert_eq!(rask::cache::info(&cache).unwrap().entries, 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_processes_racing_on_one_cache_agree() {
    let dir = scratch("race");
    let (cache, counts) = (dir.join("cache"), dir.join("counts"));
    for _ in 0..3 {
        let a = spawn_child(&cache, &counts, POOL);
        let b = spawn_child(&cache, &counts, POOL);
        assert_eq!(finish(a).0, EXPECTED);
        assert_eq!(finish(b).0, EXPECTED);
    }
    let ran = counted(&counts).len();
    assert!((9..=18).contains(&ran), "{ran} tasks ran");
    // Whole entries only: a third process runs nothing.
    assert_eq!(run_child(&cache, &counts, "sync").0, EXPECTED);
    assert_eq!(counted(&counts).len(), ran);
    let left: Vec<_> = walk(&cache)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// The key an entry's file is named after.
fn entry_key(path: &Path) -> rask::Key {
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut key = [0u8; 32];
    for (k, pair) in key.iter_mut().zip(name.as_bytes().chunks(2)) {
        *k = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
    }
    rask::Key(key)
}

#[test]
fn damaged_entries_are_misses_with_one_warning_each_then_written_again() {
    let dir = scratch("damage");
    let (cache, counts) = (dir.join("cache"), dir.join("counts"));
    run_child(&cache, &counts, "sync");
    let mut entries = walk(&cache);
    assert_eq!(entries.len(), 5);
    // The total's entry first, damaged, so that the next run reaches every
    // sum's entry: the one holding the total's value.
    let value = |path: &PathBuf| {
        let entry = rask_executor::entry::read(&cache, &entry_key(path), None).unwrap();
        postcard::from_bytes::<u64>(&entry.bytes).unwrap()
    };
    entries.sort_by_key(|path| value(path) != EXPECTED);
    assert_eq!(value(&entries[0]), EXPECTED);
    assert!(entries[1..].iter().all(|path| value(path) != EXPECTED));
    let (mut damaged, mut kept) = (0, 0);
    for (i, path) in entries.iter().enumerate() {
        let mut bytes = std::fs::read(path).unwrap();
        match i {
            0 => bytes.truncate(bytes.len() / 2),
            1 => *bytes.last_mut().unwrap() ^= 0x40,
            2 => bytes = b"not a rask entry at all".to_vec(),
            3 => {
                // A whole entry of another type.
                rask_executor::entry::write(
                    &cache,
                    &entry_key(path),
                    "alloc::string::String",
                    &[0],
                )
                .unwrap();
                damaged += 1;
                continue;
            }
            _ => {
                kept += 1;
                assert!(std::fs::metadata(path).unwrap().len() > 0);
                continue;
            }
        }
        std::fs::write(path, bytes).unwrap();
        damaged += 1;
    }
    assert_eq!((damaged, kept), (4, 1));
    let before = counted(&counts).len();
    let (value, stderr) = run_child(&cache, &counts, "sync");
    assert_eq!(value, EXPECTED);
    let warnings = stderr.matches("result cache: ignoring an entry").count();
    let reran = counted(&counts).len() - before;
    // Every damaged entry was reached (the total's is one of them) and
    // warned once; each of them ran again, the intact sum did not, nor its
    // chunk: 3 chunks, 3 sums and the total.
    assert_eq!(warnings, 4, "{warnings} warnings:\n{stderr}");
    assert_eq!(reran, 7, "{:?}", &counted(&counts)[before..]);
    // Written again: the next run loads everything.
    let before = counted(&counts).len();
    let (value, stderr) = run_child(&cache, &counts, "sync");
    assert_eq!(value, EXPECTED);
    assert_eq!(counted(&counts).len(), before, "entries were not rewritten");
    assert!(!stderr.contains("ignoring"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- a full disk: a child fills a 256 KiB tmpfs

/// A cached block of 100 000 bytes: an entry takes 25 pages of a tmpfs, so
/// two fit in 256 KiB (64 pages) and the third does not.
#[rask::task(cache)]
fn block(i: u64) -> Vec<u8> {
    count("block");
    vec![i as u8; 100_000]
}

#[rask::task(cache)]
fn block_sum(blocks: Vec<Vec<u8>>) -> u64 {
    count("block_sum");
    blocks.iter().flatten().map(|&b| u64::from(b)).sum()
}

/// 100 000 · (1 + 2 + 3 + 4)
const BLOCKS_EXPECTED: u64 = 1_000_000;

/// The child on a full disk: computes the blocks' sum three times with the
/// cache `RASK_CACHE` names, printing each round's value and what the
/// cache did.
#[test]
fn full_disk_child() {
    if std::env::var_os("RASK_CACHE_TEST_FULL_DISK").is_none() {
        return;
    }
    let _ = tracing::subscriber::set_global_default(Warnings);
    for round in 0..3 {
        let before = rask::cache::stats();
        let blocks: Vec<_> = (1..=4).map(|i| delayed!(block(i))).collect();
        let value = delayed!(block_sum(blocks)).compute().unwrap();
        let after = rask::cache::stats();
        println!(
            "round={round} value={value} hits={} written={}",
            after.hits - before.hits,
            after.written - before.written
        );
    }
}

/// One round of [`full_disk_child`]: its value, hits and entries written.
#[derive(Debug, PartialEq)]
struct Round {
    value: u64,
    hits: u64,
    written: u64,
}

/// Runs [`full_disk_child`] on the cache `dir`; its rounds and stderr.
fn run_full_disk_child(dir: &Path, counts: &Path, scheduler: &str) -> (Vec<Round>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "full_disk_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("RASK_CACHE_TEST_FULL_DISK", "1")
        .env("RASK_CACHE", dir)
        .env("RASK_CACHE_TEST_COUNT", counts)
        .env("RASK_SCHEDULER", scheduler)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let field = |line: &str, name: &str| -> u64 {
        let rest = line.split_once(&format!("{name}=")).unwrap().1;
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    // libtest's "test full_disk_child ... " may start the first line.
    let rounds = stdout
        .lines()
        .filter_map(|l| l.find("round=").map(|at| &l[at..]))
        .map(|l| Round {
            value: field(l, "value"),
            hits: field(l, "hits"),
            written: field(l, "written"),
        })
        .collect();
    (rounds, stderr)
}

#[test]
fn a_full_disk_turns_writing_off_with_one_warning_and_results_stay_right() {
    let dir = scratch("full");
    let counts = dir.join("counts");
    let Some(disk) = tmpfs::Tmpfs::mount(&dir.join("disk"), 256 << 10) else {
        return;
    };
    let cache = disk.path().join("cache");
    let full_warnings = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.contains("result cache: cannot write to") && l.contains("os error 28"))
            .count()
    };
    // An empty disk, filled by the first round: two blocks are written, the
    // third write finds no space (ENOSPC), and writing turns off for the
    // rest of the process with one warning. The later rounds load the two
    // entries, compute the rest and try no write: no other warning.
    let (rounds, stderr) = run_full_disk_child(&cache, &counts, "sync");
    assert_eq!(
        rounds,
        [
            Round {
                value: BLOCKS_EXPECTED,
                hits: 0,
                written: 2
            },
            Round {
                value: BLOCKS_EXPECTED,
                hits: 2,
                written: 0
            },
            Round {
                value: BLOCKS_EXPECTED,
                hits: 2,
                written: 0
            },
        ],
        "{stderr}"
    );
    assert_eq!(full_warnings(&stderr), 1, "{stderr}");
    // Each round ran the three tasks that have no entry: 5 + 3 + 3.
    assert_eq!(counted(&counts).len(), 11);
    let files = walk(&cache);
    assert_eq!(
        files.len(),
        2,
        "whole entries only, no temporary file: {files:?}"
    );
    assert_eq!(rask::cache::info(&cache).unwrap().entries, 2);
    // Another process, on the disk that is full from the start, on a pool
    // of threads: the same, its first write failing.
    let (rounds, stderr) = run_full_disk_child(&cache, &counts, POOL);
    assert!(
        rounds
            .iter()
            .all(|r| r.value == BLOCKS_EXPECTED && r.hits == 2 && r.written == 0),
        "{rounds:?}\n{stderr}"
    );
    assert_eq!(rounds.len(), 3);
    assert_eq!(full_warnings(&stderr), 1, "{stderr}");
    assert_eq!(walk(&cache).len(), 2);
    drop(disk);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- in this process

static LOADS: AtomicUsize = AtomicUsize::new(0);
static SQUARES: AtomicUsize = AtomicUsize::new(0);

fn load(seed: u64) -> Vec<u64> {
    LOADS.fetch_add(1, Ordering::SeqCst);
    (0..100).map(|x| x + seed).collect()
}

fn squares(v: Vec<u64>) -> Vec<u64> {
    SQUARES.fetch_add(1, Ordering::SeqCst);
    v.iter().map(|x| x * x).collect()
}

fn sum(v: Vec<u64>) -> u64 {
    v.iter().sum()
}

#[test]
fn a_hit_stands_for_everything_below_it_on_every_local_executor() {
    let dir = scratch("hit");
    let configs = [
        Config::synchronous(),
        pool(),
        Config::simulated(3),
        Config::synchronous().optimize(false),
    ];
    for (seed, config) in configs.into_iter().enumerate() {
        let config = config.cache(&dir);
        let (loads, squared) = (LOADS.load(Ordering::SeqCst), SQUARES.load(Ordering::SeqCst));
        let build = || delayed!(sum(delayed!(squares(delayed!(load(seed as u64)))).cache()));
        let first = build().compute_with(&config).unwrap();
        let second = build().compute_with(&config).unwrap();
        assert_eq!(first, second);
        // One load and one squaring in all: the second run found the
        // squares and did not even load their input.
        assert_eq!(LOADS.load(Ordering::SeqCst) - loads, 1, "{config:?}");
        assert_eq!(SQUARES.load(Ordering::SeqCst) - squared, 1);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

static NAMED_RUNS: AtomicUsize = AtomicUsize::new(0);

fn named_square(x: u64) -> u64 {
    NAMED_RUNS.fetch_add(1, Ordering::SeqCst);
    x * x
}

/// A name given to cached work is not its identity: the same name over
/// other inputs is other work, with its own entry (it was the name's
/// alone: `named_square(3)` named like `named_square(2)` got its value).
#[test]
fn named_work_over_other_inputs_is_another_entry() {
    let dir = scratch("named");
    let config = Config::synchronous().cache(&dir);
    let build = |x: u64| delayed!(named_square(x)).named("data").cache();
    assert_eq!(build(2).compute_with(&config).unwrap(), 4);
    assert_eq!(build(3).compute_with(&config).unwrap(), 9);
    assert_eq!(NAMED_RUNS.load(Ordering::SeqCst), 2);
    // The same work under the same name is still found again.
    assert_eq!(build(3).compute_with(&config).unwrap(), 9);
    assert_eq!(NAMED_RUNS.load(Ordering::SeqCst), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

static SUMMED_RUNS: AtomicUsize = AtomicUsize::new(0);

fn summed(v: Vec<u64>) -> u64 {
    SUMMED_RUNS.fetch_add(1, Ordering::SeqCst);
    v.iter().sum()
}

/// A cached task over a value wrapped under a name is found again for the
/// same data under that name only: a name was the value's key, so a file's
/// name over new contents found the result over the old contents.
#[test]
fn a_named_value_over_other_data_is_another_entry() {
    let dir = scratch("named-value");
    let config = Config::synchronous().cache(&dir);
    let build = |v: Vec<u64>| delayed!(summed(rask::value_named("input.csv", v))).cache();
    assert_eq!(build(vec![1, 2]).compute_with(&config).unwrap(), 3);
    rask::cache::flush();
    assert_eq!(build(vec![5, 5]).compute_with(&config).unwrap(), 10);
    rask::cache::flush();
    assert_eq!(SUMMED_RUNS.load(Ordering::SeqCst), 2);
    // The same data under the same name is found again.
    assert_eq!(build(vec![1, 2]).compute_with(&config).unwrap(), 3);
    assert_eq!(SUMMED_RUNS.load(Ordering::SeqCst), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Data whose serialization fails: it cannot be hashed into a key.
#[derive(Clone, serde::Deserialize)]
struct Unencodable(u64);

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("not encodable"))
    }
}

fn unwrap_unencodable(v: std::sync::Arc<Unencodable>) -> u64 {
    v.0
}

/// The child of [`unencodable_data_is_never_found_again`]: a cached task
/// over data that does not encode, the data from `RASK_CACHE_TEST_DATA`.
#[test]
fn unencodable_child() {
    let Some(data) = std::env::var_os("RASK_CACHE_TEST_DATA") else {
        return;
    };
    let data: u64 = data.to_str().unwrap().parse().unwrap();
    let wrapped = rask::value(Unencodable(data));
    let value = delayed!(unwrap_unencodable(&wrapped))
        .cache()
        .compute()
        .unwrap();
    println!("result={value}");
}

/// Data that cannot be hashed gets a key of its own in every process: it
/// used to be keyed by a counter's name (`value-0` for the first in each
/// process), so the next run found a cached task over the last run's data.
#[test]
fn unencodable_data_is_never_found_again() {
    let dir = scratch("unencodable");
    for data in [1, 2] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "unencodable_child", "--nocapture"])
            .env("RASK_CACHE_TEST_DATA", data.to_string())
            .env("RASK_CACHE", &dir)
            .env("RASK_SCHEDULER", "sync")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("result={data}\n")), "{stdout}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

static CLIENT_LOADS: AtomicUsize = AtomicUsize::new(0);
static CLIENT_SQUARES: AtomicUsize = AtomicUsize::new(0);

fn client_load(seed: u64) -> Vec<u64> {
    CLIENT_LOADS.fetch_add(1, Ordering::SeqCst);
    (0..100).map(|x| x + seed).collect()
}

fn client_squares(v: Vec<u64>) -> Vec<u64> {
    CLIENT_SQUARES.fetch_add(1, Ordering::SeqCst);
    v.iter().map(|x| x * x).collect()
}

#[test]
fn client_compute_uses_the_cache_on_every_local_executor() {
    let dir = scratch("client");
    let configs = [Config::synchronous(), pool(), Config::simulated(5)];
    for (i, config) in configs.into_iter().enumerate() {
        let client = rask::Client::with_config(&config.cache(&dir)).unwrap();
        let seed = 100 + i as u64;
        let build = || {
            let squared = delayed!(client_squares(delayed!(client_load(seed)))).cache();
            delayed!(sum(squared))
        };
        let (loads, squared) = (
            CLIENT_LOADS.load(Ordering::SeqCst),
            CLIENT_SQUARES.load(Ordering::SeqCst),
        );
        let first = client.compute(&build()).unwrap().result().unwrap();
        rask::cache::flush();
        // A new client, as another program would make: the entry is there.
        let again = rask::Client::with_config(&configs_again(i).cache(&dir)).unwrap();
        let second = again.compute(&build()).unwrap().result().unwrap();
        assert_eq!(first, second);
        assert_eq!(
            CLIENT_LOADS.load(Ordering::SeqCst) - loads,
            1,
            "executor {i}"
        );
        assert_eq!(
            CLIENT_SQUARES.load(Ordering::SeqCst) - squared,
            1,
            "executor {i}"
        );
        // A cached root whose future is dropped at once, before it ran:
        // held until it is written (on `sim`, `flush` runs it).
        let expected = client_squares(client_load(seed + 10));
        let root = delayed!(client_squares(delayed!(client_load(seed + 10)))).cache();
        drop(again.compute(&root).unwrap());
        rask::cache::flush();
        let squared = CLIENT_SQUARES.load(Ordering::SeqCst);
        let third = rask::Client::with_config(&configs_again(i).cache(&dir)).unwrap();
        assert_eq!(third.compute(&root).unwrap().result().unwrap(), expected);
        assert_eq!(
            CLIENT_SQUARES.load(Ordering::SeqCst),
            squared,
            "executor {i}"
        );
        // Two loads more: `expected`'s and the dropped compute's.
        let loads = loads + 2;
        // `submit` does not use the cache: it runs everything (once the
        // loaded value `compute` placed is let go).
        rask::cache::flush();
        let third = again.submit(build()).unwrap().result().unwrap();
        assert_eq!(third, first);
        assert_eq!(
            CLIENT_LOADS.load(Ordering::SeqCst) - loads,
            2,
            "executor {i}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn configs_again(i: usize) -> Config {
    [Config::synchronous(), pool(), Config::simulated(6)][i].clone()
}

#[test]
fn a_cache_that_cannot_be_written_leaves_results_alone() {
    let dir = scratch("unwritable");
    // A file where the cache's directory should be: every write fails.
    let cache = dir.join("cache");
    std::fs::write(&cache, b"in the way").unwrap();
    let config = pool().cache(&cache).cache_all(true);
    for _ in 0..2 {
        let total = delayed!(sum(delayed!(bytes_to_u64(delayed!(bytes_of(3))))));
        assert_eq!(total.compute_with(&config).unwrap(), 21);
    }
    assert_eq!(std::fs::read(&cache).unwrap(), b"in the way");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bytes_of(n: u64) -> Vec<u8> {
    vec![7; n as usize]
}

fn bytes_to_u64(v: Vec<u8>) -> Vec<u64> {
    v.into_iter().map(u64::from).collect()
}

#[test]
fn the_size_cap_removes_the_least_recently_used_entries() {
    let dir = scratch("cap");
    let config = Config::synchronous().cache(&dir).cache_all(true);
    // Three entries of about 10 kB, used in order a, b, c, then a again.
    for n in [10_000, 10_001, 10_002] {
        delayed!(bytes_of(n)).compute_with(&config).unwrap();
    }
    let info = rask::cache::info(&dir).unwrap();
    assert_eq!(info.entries, 3);
    // Mark every entry as used long ago, oldest first; then use `a`.
    let mut files = walk(&dir);
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for (i, path) in files.iter().enumerate() {
        let file = std::fs::File::options().append(true).open(path).unwrap();
        file.set_modified(past + std::time::Duration::from_secs(i as u64))
            .unwrap();
    }
    delayed!(bytes_of(10_000)).compute_with(&config).unwrap();
    // A fourth entry past the cap: `b`, the least recently used, goes.
    let capped = config.clone().cache_max_bytes(info.bytes + 1000);
    let before = rask::cache::stats();
    delayed!(bytes_of(10_003)).compute_with(&capped).unwrap();
    let after = rask::cache::info(&dir).unwrap();
    assert!(after.bytes <= info.bytes + 1000, "{after:?}");
    assert_eq!(after.entries, 3);
    assert!(
        !files[1].exists(),
        "the least recently used entry is still there"
    );
    assert!(files[0].exists() && files[2].exists());
    assert!(rask::cache::stats().evicted > before.evicted);
    std::fs::remove_dir_all(&dir).unwrap();
}

mod properties {
    use proptest::prelude::*;

    use crate::support::{self, build, eval, executions, run_id};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

        /// With every pure call cached, a cold and a warm run give what the
        /// graph means, failures included, on every local executor; the warm
        /// run runs nothing when the root succeeded.
        #[test]
        fn caching_never_changes_a_result(specs in support::dag(40, 0.08), which in 0..3usize) {
            let dir = crate::scratch(&format!("prop-{}", run_id()));
            let config = [
                rask::Config::synchronous(),
                crate::pool(),
                rask::Config::simulated(11),
            ][which].clone().cache(&dir).cache_all(true);
            let run = run_id();
            let want = eval(&specs, specs.len() - 1);
            for round in 0..2 {
                let nodes = build(&specs, run);
                let root = &nodes[nodes.len() - 1];
                let before = executions(run);
                let got = root.compute_with(&config);
                match (&got, want) {
                    (Ok(v), Ok(w)) => prop_assert_eq!(*v, w),
                    (Err(rask::Error::Task { .. }), Err(())) => {}
                    _ => prop_assert!(false, "round {}: got {:?}, want {:?}", round, got, want),
                }
                if round == 1 && want.is_ok() {
                    prop_assert_eq!(executions(run), before, "a warm run ran tasks");
                }
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// Steps of `search` before it has its answer.
#[cfg(feature = "threaded")]
const SEARCH_STEPS: i64 = 2_000;

/// A search that stops early when its work is given up, returning what it
/// has so far (the pattern `rask::cancelled` documents): `SEARCH_STEPS`
/// once it ran to its end.
#[cfg(feature = "threaded")]
fn search(seed: i64) -> i64 {
    for step in 0..SEARCH_STEPS {
        if rask::cancelled() {
            return seed + step;
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    seed + SEARCH_STEPS
}

#[cfg(feature = "threaded")]
fn check(ok: bool) -> Result<bool, String> {
    if ok {
        Ok(true)
    } else {
        Err("the check failed".into())
    }
}

/// A task cut short by its run's cancellation (a sibling output failed)
/// returns a partial value: no executor reports it as the task's value, so
/// the cache never keeps it. It was written, and the next run, whose
/// sibling succeeds, loaded it.
#[cfg(feature = "threaded")]
#[test]
fn a_value_returned_after_cancellation_is_never_cached() {
    let dir = scratch("cancelled-partial");
    let config = Config::threads(2).cache(&dir);
    // Also under a timeout: the task runs on a thread of its own.
    let long = std::time::Duration::from_secs(600);
    for found in [
        delayed!(search(0)).cache(),
        delayed!(search(1)).timeout(long).cache(),
    ] {
        let failed = rask::compute_with((&found, &delayed!(check(false)?)), &config);
        assert!(failed.is_err());
        let (value, ok) = rask::compute_with((&found, &delayed!(check(true)?)), &config).unwrap();
        assert!(ok);
        assert!(
            value >= SEARCH_STEPS,
            "the partial value {value} of the cancelled run"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- capturing closures, and a `Deserialize` that panics

fn squared(x: i64) -> i64 {
    x * x
}

/// Nothing that depends on a capturing closure's call is cached, even
/// named: the name stands for what the closure captured within a run, and
/// a later round capturing another step under the same name read the
/// first round's entry (100 where 225 is right).
#[test]
fn nothing_that_depends_on_a_capturing_closure_is_cached_even_named() {
    let dir = scratch("captured");
    let config = Config::synchronous().cache(&dir);
    for step in [2_i64, 3] {
        let scale = move |x: i64| x * step;
        let scaled = delayed!(scale(5)).named("scale");
        let out = delayed!(squared(&scaled))
            .cache()
            .compute_with(&config)
            .unwrap();
        assert_eq!(out, (5 * step) * (5 * step), "step {step}");
    }
    assert_eq!(rask::cache::info(&dir).unwrap().entries, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `Touchy`'s `Deserialize` panics.
static TOUCHY_PANICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A value whose hand-written `Deserialize` panics when told to.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
struct Touchy(u64);

impl<'de> serde::Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        assert!(!TOUCHY_PANICS.load(Ordering::SeqCst), "touchy");
        Ok(Touchy(n))
    }
}

fn touchy(n: u64) -> Touchy {
    Touchy(n * 2)
}

/// An entry whose type's `Deserialize` panics is a miss: the task runs
/// again and its value is returned (the panic went through `compute`).
#[test]
fn an_entry_whose_deserialize_panics_is_a_miss() {
    let dir = scratch("touchy");
    let config = Config::synchronous().cache(&dir);
    let work = || delayed!(touchy(21)).cache();
    assert_eq!(work().compute_with(&config).unwrap(), Touchy(42));
    assert_eq!(rask::cache::info(&dir).unwrap().entries, 1);
    TOUCHY_PANICS.store(true, Ordering::SeqCst);
    let again = work().compute_with(&config);
    TOUCHY_PANICS.store(false, Ordering::SeqCst);
    assert_eq!(again.unwrap(), Touchy(42));
    let _ = std::fs::remove_dir_all(&dir);
}
