//! The distributed executor with real worker processes: each test starts a
//! local cluster whose workers are this test binary in worker mode. Runs
//! with its own `main` (`harness = false`), because a worker process must
//! call `rask::init` before anything else. Its functions are listed with
//! `rask::tasks!` (`tests/registration.rs` marks them instead).

#[path = "support/arguments.rs"]
mod arguments;
#[path = "support/futures_api.rs"]
mod futures_api;
#[path = "support/harness.rs"]
mod harness;
mod support;

use std::io::Write as _;
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rask::{as_completed, delayed, Client, Config, Delayed, Error, ExecutorKind, Future, Status};

// `inc` and `half` are both marked and listed in `main`: registered twice,
// which is no error, and every test here runs them on workers.
#[rask::task]
fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn sum(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

fn total_len(data: Arc<Vec<u8>>, extra: usize) -> usize {
    data.len() + extra
}

fn slow_inc(x: i64) -> i64 {
    std::thread::sleep(Duration::from_millis(4));
    x + 1
}

fn explode(x: i64) -> i64 {
    if x == 3 {
        panic!("exploded on {x}");
    }
    x
}

#[rask::task]
fn half(x: i64) -> Result<i64, String> {
    if x % 2 == 0 {
        Ok(x / 2)
    } else {
        Err(format!("{x} is odd"))
    }
}

fn lonely(x: i64) -> i64 {
    x
}

/// Set in a run of this binary as a child program: its `main` runs
/// [`output_scenario`] instead of the tests.
const OUTPUT_SCENARIO_ENV: &str = "RASK_TEST_OUTPUT_SCENARIO";

/// Tasks of [`output_scenario`].
const CHATTY_TASKS: i64 = 200;

/// Prints a line on stdout and one on stderr, wherever it runs.
fn chatty(i: i64) -> i64 {
    println!("out {i}");
    // Stderr is unbuffered: `eprintln!` writes "err ", the number and the
    // newline separately, and two workers writing at once could mix them
    // (see `LocalCluster::start`). One write keeps the line whole.
    let line = format!("err {i}\n");
    eprint!("{line}");
    i
}

/// Prints without a newline.
fn partial(i: i64) -> i64 {
    print!("partial {i}");
    i
}

/// The child program: on `RASK_SCHEDULER` (`local:2`), maps
/// [`CHATTY_TASKS`] tasks that print, gathers them, and returns from `main`
/// at once. Its cluster lives in a static that is never dropped. Before
/// that, one task prints without a newline on a cluster of its own, whose
/// worker is killed once the result is in.
fn output_scenario() {
    let client = Client::new().expect("a client from RASK_SCHEDULER");
    let fs = client.map(chatty, 0..CHATTY_TASKS).expect("the map");
    let got = client.gather(&fs).expect("the results");
    assert_eq!(got, (0..CHATTY_TASKS).collect::<Vec<i64>>());
    let own = Client::local(1).expect("a cluster of one worker");
    let done = own.submit(delayed!(partial(7))).expect("the submit");
    assert_eq!(done.result().expect("the result"), 7);
    // Kills the worker: only what it flushed before reporting is written.
    drop((done, own));
}

/// Set in a run of this binary as a child program: its `main` runs
/// [`stuck_scenario`] instead of the tests.
const STUCK_SCENARIO_ENV: &str = "RASK_TEST_STUCK_SCENARIO";

/// Writes a line to the file at `path`, then ignores its cancellation for
/// five minutes: longer than any wait of these tests, and bounded all the
/// same.
fn stubborn(path: String) -> i64 {
    stamp(path, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(10));
    }
    0
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The child program, run with a short grace period: on a cluster of one
/// worker process, a task that ignores its cancellation is cancelled. The
/// worker keeps working on a new thread, then, past the grace period,
/// exits to be restarted, and the cluster starts another process in its
/// place, which takes later submissions. Nothing is left running.
fn stuck_scenario() {
    // The cluster's life on stderr, for the parent to read.
    assert!(rask::init_logging(), "no subscriber before this one");
    let client = Client::local(1).expect("a cluster of one worker");
    let first = live_children();
    assert_eq!(first.len(), 1, "one worker process");
    let path = stamp_path("stuck");
    let stuck = client.submit(delayed!(stubborn(path.clone()))).unwrap();
    eventually("the stubborn task to start", || stamps(&path) == 1);
    stuck.cancel();
    assert!(matches!(stuck.result(), Err(Error::Cancelled { .. })));
    // Its only thread is stuck: a replacement runs these.
    let before = client.map(inc, 0..10).unwrap();
    assert_eq!(
        client.gather(&before).unwrap(),
        (1..=10).collect::<Vec<i64>>()
    );
    eventually("another worker process", || {
        let now = live_children();
        now.len() == 1 && now != first
    });
    let after = client.map(inc, 100..110).unwrap();
    assert_eq!(
        client.gather(&after).unwrap(),
        (101..=110).collect::<Vec<i64>>()
    );
    drop((before, after, stuck, client));
    let _ = std::fs::remove_file(&path);
    eventually("the worker processes to go", || live_children().is_empty());
}

/// Runs the crash scenario in the child program.
const CRASH_SCENARIO_ENV: &str = "RASK_TEST_CRASH_SCENARIO";

/// For 0, kills its own process with SIGKILL, as the kernel's
/// out-of-memory killer would; `2 x` otherwise.
fn kill_self_at_zero(x: i64) -> i64 {
    if x == 0 {
        let me = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-9", &me])
            .status();
        std::thread::sleep(Duration::from_secs(60)); // the signal comes first
    }
    2 * x
}

/// The child program: on a cluster of two worker processes of one thread,
/// a task that kills its own process takes a worker down three times, then
/// fails; the other 19 tasks of its map succeed, the cluster starts each
/// dead worker again, and later work runs. Nothing is left running.
fn crash_scenario() {
    // The cluster's life on stderr, for the parent to read.
    assert!(rask::init_logging(), "no subscriber before this one");
    let client = Client::local(2).expect("a cluster of two workers");
    let fs = client.map(kill_self_at_zero, 0..20).unwrap();
    rask::wait_timeout(&fs, Duration::from_secs(45)).unwrap();
    match fs[0].result() {
        Err(Error::Task { message, .. }) => assert!(
            message.contains(
                "3 workers died while running this task (the last one while it ran alone there"
            ),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let rest: Vec<i64> = fs[1..].iter().map(|f| f.result().unwrap()).collect();
    assert_eq!(rest, (1..20).map(|x| 2 * x).collect::<Vec<i64>>());
    eventually("two worker processes again", || live_children().len() == 2);
    let after = client.map(inc, 100..110).unwrap();
    assert_eq!(
        client.gather(&after).unwrap(),
        (101..=110).collect::<Vec<i64>>()
    );
    drop((fs, after, client));
    eventually("the worker processes to go", || live_children().is_empty());
}

fn a_local_cluster_starts_its_dead_workers_again() {
    let before = live_children().len();
    let (_, err) = run_child(&[(CRASH_SCENARIO_ENV, "1")]);
    let restarts = err
        .lines()
        .filter(|l| {
            l.contains(" WARN rask_distributed::cluster: worker process ")
                && l.contains(" died (signal: 9 (SIGKILL))")
                && l.ends_with("; started it again")
        })
        .count();
    assert_eq!(restarts, 3, "{err}");
    assert_eq!(live_children().len(), before);
}

/// Set in a worker started from a copy of this test binary: that "older
/// build of the program" has an older `scale`.
const OLD_VERSION_ENV: &str = "RASK_TEST_OLD_VERSION";

/// `x * 1000`; the older build computes `x + 1`.
fn scale(x: i64) -> i64 {
    if std::env::var_os(OLD_VERSION_ENV).is_some() {
        x + 1
    } else {
        x * 1000
    }
}

/// Appends a line to the file at `path`, from whichever process runs it, and
/// returns `x`: the file counts the runs across worker processes.
fn stamp(path: String, x: i64) -> i64 {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("the stamp file opens");
    writeln!(file, "{x}").expect("the stamp file is writable");
    x
}

/// 100 kB of `i`, big enough to stay on the worker that made it; each run
/// writes a line to the file at `path`.
fn stamped_block(path: String, i: i64) -> Vec<u8> {
    stamp(path, i);
    vec![i as u8; 100_000]
}

/// The block's length plus its first byte.
fn block_len(block: Vec<u8>) -> i64 {
    block.len() as i64 + i64::from(block.first().copied().unwrap_or(0))
}

/// Lines in the file at `path`: how often `stamp` ran on it.
fn stamps(path: &str) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

fn stamp_path(test: &str) -> String {
    let path = std::env::temp_dir().join(format!("rask-{test}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path.to_string_lossy().into_owned()
}

/// Serializations of `Counted` values in this process (workers count their
/// own, in their own processes).
static SERIALIZED: AtomicUsize = AtomicUsize::new(0);

/// Bytes that count how often this process serializes them.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
struct Counted(Vec<u8>);

impl serde::Serialize for Counted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        SERIALIZED.fetch_add(1, Ordering::SeqCst);
        self.0.serialize(s)
    }
}

fn counted_len(data: Arc<Counted>, extra: usize) -> usize {
    data.0.len() + extra
}

/// `n` bytes, made wherever it runs.
fn counted(n: usize) -> Counted {
    Counted(vec![7; n])
}

/// Set in a run of this binary as a child program: its `main` runs
/// [`nested_scenario`] instead of the tests.
const NESTED_SCENARIO_ENV: &str = "RASK_TEST_NESTED_SCENARIO";

/// Set in a run of this binary as a child program: its `main` runs
/// [`quiet_end_scenario`] instead of the tests.
const QUIET_END_SCENARIO_ENV: &str = "RASK_TEST_QUIET_END_SCENARIO";

/// This process's id, wherever it runs.
fn pid(_: i64) -> u32 {
    std::process::id()
}

/// Computes `pid` for `n` children through the cluster it runs on — the
/// default executor inside a task — and returns their processes' ids and
/// its own.
fn nested_pids(n: i64) -> Result<(Vec<u32>, u32), String> {
    let children: Vec<Delayed<u32>> = (0..n).map(|i| delayed!(pid(i))).collect();
    let pids = rask::compute(children).map_err(|e| format!("{e:#}"))?;
    Ok((pids, std::process::id()))
}

/// Submits `inc(0..n)` through a client of the cluster it runs on and
/// gathers them: a nested fan-out of futures.
fn fan_out(n: i64) -> Result<i64, String> {
    let client = Client::new().map_err(|e| format!("{e:#}"))?;
    let fs = client.map(inc, 0..n).map_err(|e| format!("{e:#}"))?;
    let got = client.gather(&fs).map_err(|e| format!("{e:#}"))?;
    Ok(got.iter().sum())
}

/// Two levels: `k` nested `fan_out`s, each a fan-out of its own.
fn fan_out_twice(k: i64) -> Result<i64, String> {
    let parts: Vec<Delayed<i64>> = (0..k).map(|i| delayed!(fan_out(3 + i)?)).collect();
    let sums = rask::compute(parts).map_err(|e| format!("{e:#}"))?;
    Ok(sums.iter().sum())
}

/// Halves every `x` in nested tasks: an odd one fails its child.
fn halves(xs: Vec<i64>) -> Result<i64, String> {
    let parts: Vec<Delayed<i64>> = xs.iter().map(|&x| delayed!(half(x)?)).collect();
    let got = rask::compute(parts).map_err(|e| format!("{e:#}"))?;
    Ok(got.iter().sum())
}

/// Computes the `Delayed`s it was given untraversed, through the
/// cluster it runs on, and sums them.
fn sum_given(parts: Vec<Delayed<i64>>) -> Result<i64, String> {
    let got = rask::compute(parts).map_err(|e| format!("{e:#}"))?;
    Ok(got.iter().sum())
}

/// Sleeps `ms` milliseconds, then returns `x`.
fn slow_value(ms: u64, x: i64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    x
}

/// Returns `x` once the file at `path` exists, or once the task is
/// cancelled; gives up after a minute, longer than any wait of these tests.
fn gated(path: String, x: i64) -> i64 {
    let started = Instant::now();
    while !Path::new(&path).exists()
        && !rask::cancelled()
        && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    x
}

/// The value of the future it was given untraversed, and `inc` of it
/// computed by a nested submission that takes the future as an argument.
fn use_future(f: Future<i64>) -> Result<(i64, i64), String> {
    let value = f.result().map_err(|e| format!("{e:#}"))?;
    let client = Client::new().map_err(|e| format!("{e:#}"))?;
    let nested = client
        .submit(delayed!(inc(&f)))
        .and_then(|n| n.result())
        .map_err(|e| format!("{e:#}"))?;
    Ok((value, nested))
}

/// The length of the value of the future it was given untraversed.
fn len_given(f: Future<Vec<u8>>) -> Result<usize, String> {
    f.result().map(|v| v.len()).map_err(|e| format!("{e:#}"))
}

/// Stamps the file at `path`, naps 50 ms and returns `i`.
fn slow_stamp(path: String, i: i64) -> i64 {
    stamp(path, i);
    std::thread::sleep(Duration::from_millis(50));
    i
}

/// A nested fan-out of `n` `slow_stamp`s.
fn slow_fan_out(path: String, n: i64) -> Result<i64, String> {
    let parts: Vec<Delayed<i64>> = (0..n)
        .map(|i| delayed!(slow_stamp(path.clone(), i)))
        .collect();
    let got = rask::compute(parts).map_err(|e| format!("{e:#}"))?;
    Ok(got.iter().sum())
}

/// The child program, with `RASK_WORKER_THREADS=1`: nested computation on
/// `Client::local(2)`, two worker processes of one thread each, where a
/// task that waits for its nested work holds the only thread of its
/// worker unless it gives it back. Each part prints `ok NAME`.
/// The child program, under `RASK_SCHEDULER=local:2`: the README's
/// nested computation on the process-wide cluster, which ends with this
/// program (it is never dropped).
fn quiet_end_scenario() {
    let sums: Vec<Delayed<i64>> = (1..4).map(|n| delayed!(fan_out(n)?)).collect();
    assert_eq!(rask::compute(sums).unwrap(), vec![1, 3, 6]);
    let (pids, _) = delayed!(nested_pids(3)?).compute().unwrap();
    assert_eq!(pids.len(), 3);
    println!("ok nested");
}

fn nested_scenario() {
    let client = Client::local(2).expect("a cluster of two workers");
    let threads: Vec<u32> = client
        .scheduler_info()
        .unwrap()
        .workers
        .iter()
        .map(|w| w.threads)
        .collect();
    assert_eq!(threads, [1, 1]);
    let workers = live_children();
    assert_eq!(workers.len(), 2);

    // The default executor inside a task is its worker's cluster: the
    // children ran in the worker processes (this program's environment,
    // which the workers inherit, says `local:2`: another cluster).
    let outer: Vec<Future<(Vec<u32>, u32)>> = (0..4)
        .map(|i| client.submit(delayed!(nested_pids(4 + i)?)).unwrap())
        .collect();
    for (i, f) in outer.iter().enumerate() {
        let (pids, own) = f.result().unwrap();
        assert_eq!(pids.len(), 4 + i);
        assert!(workers.contains(&own), "{own} is no worker of {workers:?}");
        assert!(
            pids.iter().all(|p| workers.contains(p)),
            "{pids:?} vs {workers:?}"
        );
    }
    println!("ok default executor");

    // A task with a timeout runs its attempt on a thread of its own: its
    // nested work still runs on its cluster (it ran on a thread pool in
    // the worker's process, or on the cluster the environment names).
    let timed = delayed!(nested_pids(3)?).timeout(Duration::from_secs(60));
    let (pids, own) = client.submit(timed).unwrap().result().unwrap();
    assert!(workers.contains(&own), "{own} is no worker of {workers:?}");
    assert!(
        pids.len() == 3 && pids.iter().all(|p| workers.contains(p)),
        "{pids:?} vs {workers:?}"
    );
    println!("ok timed task's nested work");

    // A fan-out of futures from 6 tasks on 2 threads.
    let sums: Vec<Future<i64>> = (1..7)
        .map(|n| client.submit(delayed!(fan_out(n)?)).unwrap())
        .collect();
    let want: Vec<i64> = (1..7).map(|n| n * (n + 1) / 2).collect();
    assert_eq!(client.gather(&sums).unwrap(), want);
    println!("ok fan-out");

    // Two levels deep: tasks whose nested tasks nest again.
    let deep: Vec<Future<i64>> = (1..4)
        .map(|k| client.submit(delayed!(fan_out_twice(k)?)).unwrap())
        .collect();
    let level = |k: i64| (0..k).map(|i| (3 + i) * (4 + i) / 2).sum::<i64>();
    assert_eq!(
        client.gather(&deep).unwrap(),
        [level(1), level(2), level(3)]
    );
    println!("ok two levels");

    // A failing child fails its outer task, with the child's message.
    let outer = client.submit(delayed!(halves(vec![2, 4, 7, 8])?)).unwrap();
    match outer.result() {
        Err(Error::Task { key, message, .. }) => {
            assert_eq!(key, outer.key());
            assert!(message.contains("7 is odd"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let fine = client.submit(delayed!(halves(vec![2, 4])?)).unwrap();
    assert_eq!(fine.result().unwrap(), 3);
    println!("ok failing child");

    // A cancelled outer task stops waiting: its nested work is released,
    // and both one-thread workers take new work.
    let path = stamp_path("nested-cancel");
    let slow = client
        .submit(delayed!(slow_fan_out(path.clone(), 400)?))
        .unwrap();
    eventually("the nested work to start", || stamps(&path) >= 2);
    slow.cancel();
    assert!(matches!(slow.result(), Err(Error::Cancelled { .. })));
    let after = client.map(inc, 0..20).unwrap();
    assert_eq!(
        client.gather(&after).unwrap(),
        (1..=20).collect::<Vec<i64>>()
    );
    let _ = std::fs::remove_file(&path);
    println!("ok cancel");

    // A worker killed (SIGKILL) during nested fan-outs: every outer task
    // still gives its right value, or a clear error, well within the
    // child's minute.
    let path = stamp_path("nested-kill");
    let outer: Vec<Future<i64>> = (0..4)
        .map(|k| {
            client
                .submit(delayed!(slow_fan_out(path.clone(), 10 + k)?))
                .unwrap()
        })
        .collect();
    eventually("the nested work to start", || stamps(&path) >= 4);
    client.__kill_worker(0).unwrap();
    for (k, f) in outer.iter().enumerate() {
        let n = 10 + k as i64;
        match f.result() {
            Ok(sum) => assert_eq!(sum, n * (n - 1) / 2),
            Err(e) => panic!("outer task {k} failed: {e:#}"),
        }
    }
    let _ = std::fs::remove_file(&path);
    println!("ok kill");

    // `Delayed`s given untraversed travel as their graphs and are computed
    // by the task, on the cluster; one calling an unregistered function is
    // refused at submit, naming it.
    let a = delayed!(inc(1));
    let parts = vec![a.clone(), delayed!(add(&a, delayed!(slow_inc(&a))))];
    let given = delayed!(sum_given(rask::Untraversed(parts))?);
    assert_eq!(client.submit(given).unwrap().result().unwrap(), 2 + 5);
    let stray = delayed!(sum_given(rask::Untraversed(vec![delayed!(lonely(3))]))?);
    let err = client.submit(stray).and_then(|f| f.result()).unwrap_err();
    assert!(err.to_string().contains("lonely"), "{err}");
    // A `Delayed` built on futures of this client travels with their
    // values: the task's own connection to the cluster holds none of this
    // client's keys (it failed, "the cluster no longer holds value").
    let small = client.submit(delayed!(inc(1))).unwrap();
    let big = client.scatter(vec![3u8; 200_000]).unwrap();
    let parts = vec![
        delayed!(inc(&small)),
        small.to_delayed(),
        delayed!(block_len(&big)),
    ];
    let given = delayed!(sum_given(rask::Untraversed(parts))?);
    assert_eq!(
        client.submit(given).unwrap().result().unwrap(),
        3 + 2 + 200_003
    );
    println!("ok untraversed");

    // Futures given untraversed reach the task as futures it can read and
    // pass on to nested work; the submitter's own future dropped before
    // the task runs changes nothing; a failed one fails the task with its
    // failure; a big value stays on the cluster until the task reads it.
    let pending = client.submit(delayed!(slow_value(300, 41))).unwrap();
    let used = client
        .submit(delayed!(use_future(rask::Untraversed(pending.clone()))?))
        .unwrap();
    drop(pending);
    assert_eq!(used.result().unwrap(), (41, 42));
    let big = client.scatter(vec![3u8; 200_000]).unwrap();
    let len = client
        .submit(delayed!(len_given(rask::Untraversed(big.clone()))?))
        .unwrap();
    drop(big);
    assert_eq!(len.result().unwrap(), 200_000);
    let bad = client.submit(delayed!(half(7)?)).unwrap();
    let failed = client
        .submit(delayed!(use_future(rask::Untraversed(bad.clone()))?))
        .unwrap();
    match failed.result() {
        Err(Error::Task { key, message, .. }) => {
            assert_eq!(key, bad.key());
            assert!(message.contains("7 is odd"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    println!("ok untraversed future");
    drop((outer, client));
}

/// Two clients of one configuration share the cluster's connection. A
/// graph of the first takes a pending future of the second, and waits for
/// one of its own keys too: `submit` returns at once (it waited for the
/// other future before), and once its own key is done, the graph waits
/// for the other future without holding the connection's thread, whose
/// work delivers that very future (it froze the connection for every
/// client before: `futures::client` rule 3). Twice: with the own key as a
/// future, and as a call the first client computes.
fn a_graph_on_another_clients_pending_future_waits_without_freezing_the_connection() {
    let config = local2();
    let (a, b) = (
        Client::with_config(&config).unwrap(),
        Client::with_config(&config).unwrap(),
    );
    let within = Duration::from_secs(20);
    for own_as_future in [true, false] {
        let (own_gate, other_gate) = (stamp_path("cross-own"), stamp_path("cross-other"));
        let other = b.submit(delayed!(gated(other_gate.clone(), 10))).unwrap();
        let own_call = delayed!(gated(own_gate.clone(), 20));
        let own = a.submit(own_call.clone()).unwrap();
        let both = if own_as_future {
            a.submit(delayed!(add(&own, &other))).unwrap()
        } else {
            a.submit(delayed!(add(&own_call, &other))).unwrap()
        };
        assert_eq!(other.status(), Status::Pending, "submit waited for it");
        stamp(own_gate.clone(), 0);
        assert_eq!(own.result_timeout(within).unwrap(), 20);
        // The connection serves both clients meanwhile.
        let (x, y) = (
            a.submit(delayed!(inc(1))).unwrap(),
            b.submit(delayed!(inc(2))).unwrap(),
        );
        assert_eq!(x.result_timeout(within).unwrap(), 2);
        assert_eq!(y.result_timeout(within).unwrap(), 3);
        assert_eq!(both.status(), Status::Pending);
        stamp(other_gate.clone(), 0);
        assert_eq!(other.result_timeout(within).unwrap(), 10);
        assert_eq!(both.result_timeout(within).unwrap(), 30);
        for path in [own_gate, other_gate] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A `Delayed` inside a task's argument inside a travelling `Delayed`, and
/// so on, nests at most 64 deep (`travel.rs` rule 4): deeper, sending it
/// is refused with an error naming the depth, where decoding it on a
/// worker overflowed the worker's stack and aborted the process. Three
/// levels compute as ever.
fn a_delayed_nested_past_the_limit_is_refused_not_a_crash() {
    let nest = |levels: usize| {
        let mut d = delayed!(inc(1));
        for _ in 0..levels {
            d = delayed!(sum_given(rask::Untraversed(vec![d]))?);
        }
        d
    };
    assert_eq!(nest(3).compute_with(&local2()).unwrap(), 2);
    let err = nest(70).compute_with(&local2()).unwrap_err();
    assert!(format!("{err:#}").contains("at most 64 levels"), "{err:#}");
}

fn local2() -> Config {
    Config::new().executor(ExecutorKind::Local(2))
}

fn graphs_compute_like_the_sync_executor() {
    let x = delayed!(inc(1));
    let y = delayed!(inc(2));
    let total = delayed!(add(&x, &y));
    assert_eq!(total.compute_with(&local2()).unwrap(), 5);
    let parts: Vec<Delayed<i64>> = (0..50).map(|i| delayed!(inc(i))).collect();
    let s = delayed!(sum(&parts));
    assert_eq!(s.compute_with(&local2()).unwrap(), 1275);
    let (a, b) = rask::compute_with((&s, &total), &local2()).unwrap();
    assert_eq!((a, b), (1275, 5));
    // Operators are registered for primitive types.
    assert_eq!((&x * 10 + &y).compute_with(&local2()).unwrap(), 23);
    // A large value travels once and is shared by reference.
    let data = rask::value(vec![1u8; 100_000]);
    assert_eq!(
        delayed!(total_len(&data, 5))
            .compute_with(&local2())
            .unwrap(),
        100_005
    );
    let n = 2000;
    assert_eq!(
        support::tree(n).compute_with(&local2()).unwrap(),
        n * (n + 1) / 2
    );
}

fn failures_name_the_task_and_spare_the_cluster() {
    let bad = delayed!(explode(3));
    let after = delayed!(add(&bad, 1));
    match after.compute_with(&local2()).unwrap_err() {
        Error::Task {
            key,
            panicked,
            message,
            location,
            ..
        } => {
            assert_eq!(key, bad.key());
            assert!(panicked);
            assert!(message.contains("exploded on 3"), "{message}");
            // The panic's location came across from the worker.
            let location = location.expect("a panic location");
            assert!(location.starts_with("tests/distributed.rs:"), "{location}");
        }
        other => panic!("unexpected {other}"),
    }
    let odd = delayed!(half(7)?);
    let err = odd.compute_with(&local2()).unwrap_err();
    // Across processes the error keeps its message and type name, once.
    assert!(format!("{err:#}").ends_with("failed: 7 is odd"), "{err:#}");
    let remote = std::error::Error::source(&err)
        .and_then(|e| e.downcast_ref::<rask::RemoteError>())
        .expect("the task's error");
    assert_eq!(remote.to_string(), "7 is odd");
    assert_eq!(remote.type_name(), "alloc::string::String");
    // The workers survived.
    assert_eq!(delayed!(inc(41)).compute_with(&local2()).unwrap(), 42);
}

fn unregistered_functions_are_a_clear_error() {
    let err = delayed!(lonely(1)).compute_with(&local2()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("lonely") && text.contains("not registered"),
        "{text}"
    );
    // A closure that captures variables can never run elsewhere: its
    // captured values would not travel with it.
    let k = 3_i64;
    let add_k = move |x: i64| x + k;
    let err = delayed!(add_k(1)).compute_with(&local2()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("captures variables"), "{text}");
}

/// A scheduler in this process on `addr`, requiring this run's token
/// (`harness::token_for_this_run`), which its clients and the worker
/// processes of these tests find in their environment.
fn serve(addr: std::net::SocketAddr) -> rask_distributed::scheduler::SchedulerHandle {
    let options = rask_distributed::scheduler::Options::default().auth(harness::auth());
    rask_distributed::scheduler::serve_with(addr, options).expect("the scheduler starts")
}

/// A scheduler in this process on `addr`, and one worker process of this
/// test binary started by hand as the README says (`RASK_WORKER=tcp://…`),
/// registered. With no death timeout, the worker exits with its scheduler.
fn scheduler_with_a_worker(
    addr: std::net::SocketAddr,
) -> (
    rask_distributed::scheduler::SchedulerHandle,
    std::process::Child,
) {
    let scheduler = serve(addr);
    let worker = std::process::Command::new(std::env::current_exe().expect("this test's path"))
        .env(
            rask_distributed::WORKER_ENV,
            format!("tcp://{}", scheduler.address()),
        )
        .env(rask_distributed::DEATH_TIMEOUT_ENV, "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the worker starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while scheduler.workers() < 1 {
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(5));
    }
    (scheduler, worker)
}

fn a_restarted_scheduler_is_reconnected() {
    let (mut scheduler, mut worker) = scheduler_with_a_worker("127.0.0.1:0".parse().unwrap());
    let addr = scheduler.address();
    let config = Config::new().executor(ExecutorKind::Tcp(addr.to_string()));
    assert_eq!(delayed!(inc(1)).compute_with(&config).unwrap(), 2);
    // The scheduler goes away, and its worker with it (it has no death
    // timeout); a new one comes up at the same address.
    scheduler.shutdown();
    assert!(worker.wait().expect("the worker exits").success());
    let (mut scheduler, mut worker) = scheduler_with_a_worker(addr);
    // The connection kept from the first compute is lost: a new one is made.
    assert_eq!(delayed!(inc(2)).compute_with(&config).unwrap(), 3);
    scheduler.shutdown();
    assert!(worker.wait().expect("the worker exits").success());
}

/// What a restarted scheduler held is lost with it (client rule 10), and
/// the futures table knows it (futures rule 8): the work behind a value
/// left on the cluster runs again when it is submitted again, directly or
/// as a node of a new graph; the old future fails, saying so, until the
/// same work submitted directly gives it the new value. A value whose
/// bytes came over with its report is not lost: it is sent as data.
fn a_restarted_scheduler_recomputes_what_it_held() {
    let (mut scheduler, mut worker) = scheduler_with_a_worker("127.0.0.1:0".parse().unwrap());
    let addr = scheduler.address();
    let client = Client::connect(&format!("tcp://{addr}")).unwrap();
    let (big_path, small_path) = (stamp_path("lost-big"), stamp_path("lost-small"));
    let within = Duration::from_secs(30);
    let lost = |e: Error| {
        let text = format!("{e:#}");
        assert!(text.contains("lost with the connection"), "{text}");
    };
    // 100 kB stays on the cluster, its handle holding the key; an `i64`
    // comes over with its report.
    let big = client
        .submit(delayed!(stamped_block(big_path.clone(), 1)))
        .unwrap();
    let small = client
        .submit(delayed!(stamp(small_path.clone(), 5)))
        .unwrap();
    rask::wait_timeout(std::slice::from_ref(&big), within).unwrap();
    rask::wait_timeout(std::slice::from_ref(&small), within).unwrap();
    assert_eq!(stamps(&big_path), 1);
    assert_eq!(client.stats().on_cluster, 2);
    // The scheduler goes away with the value, and its worker with it; a
    // new one comes up at the same address.
    scheduler.shutdown();
    assert!(worker.wait().expect("the worker exits").success());
    // Once the client saw the loss, the big value no longer counts as on
    // the cluster; the small one, here, does.
    let deadline = Instant::now() + within;
    while client.stats().on_cluster != 1 {
        assert!(Instant::now() < deadline, "the loss was never seen");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut scheduler, mut worker) = scheduler_with_a_worker(addr);
    // The old future as an argument: its value is gone, and the graph
    // fails saying so (it has no work to run again).
    let on_old = client.submit(delayed!(block_len(&big))).unwrap();
    lost(on_old.result_timeout(within).unwrap_err());
    // Dropped, for the graphs below share its key (the same function of
    // the same input) and would share its failure.
    drop(on_old);
    // The same work as a node of a new graph is computed again.
    let through = client
        .submit(delayed!(block_len(delayed!(stamped_block(
            big_path.clone(),
            1
        )))))
        .unwrap();
    assert_eq!(through.result_timeout(within).unwrap(), 100_001);
    assert_eq!(stamps(&big_path), 2);
    // That graph computed it for itself: the old future is still lost, and
    // its work was not kept to be retried.
    lost(big.result_timeout(within).unwrap_err());
    lost(client.retry(&big).unwrap_err());
    // The same work submitted directly runs again, and the old future,
    // which shares its key, gets the new value.
    let again = client
        .submit(delayed!(stamped_block(big_path.clone(), 1)))
        .unwrap();
    assert_eq!(again.result_timeout(within).unwrap().len(), 100_000);
    assert_eq!(stamps(&big_path), 3);
    assert_eq!(big.result_timeout(within).unwrap().len(), 100_000);
    drop(through);
    let on_new = client.submit(delayed!(block_len(&big))).unwrap();
    assert_eq!(on_new.result_timeout(within).unwrap(), 100_001);
    assert_eq!(stamps(&big_path), 3);
    // The small value is here: it works, is sent as data, and its work
    // submitted again shares it, never running again.
    assert_eq!(small.result_timeout(within).unwrap(), 5);
    let on_small = client.submit(delayed!(add(&small, 1))).unwrap();
    assert_eq!(on_small.result_timeout(within).unwrap(), 6);
    let small_again = client
        .submit(delayed!(stamp(small_path.clone(), 5)))
        .unwrap();
    assert_eq!(small_again.result_timeout(within).unwrap(), 5);
    assert_eq!(stamps(&small_path), 1);
    drop((big, small, again, on_new, on_small, small_again));
    drop(client);
    scheduler.shutdown();
    assert!(worker.wait().expect("the worker exits").success());
    let _ = std::fs::remove_file(&big_path);
    let _ = std::fs::remove_file(&small_path);
}

/// A worker process, killed and reaped when dropped, so a failed assertion
/// leaves none behind.
struct WorkerProcess(Child);

impl WorkerProcess {
    /// Starts `program` in worker mode for the scheduler at `address`,
    /// with no death timeout (it exits with its scheduler) unless `env`
    /// gives one; `env` is set last.
    fn start(program: &Path, address: &str, env: &[(&str, &str)]) -> WorkerProcess {
        let mut command = Command::new(program);
        command
            .env(rask_distributed::WORKER_ENV, address)
            .env(rask_distributed::DEATH_TIMEOUT_ENV, "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // A file just written can be busy for a moment: a child forked
        // meanwhile holds the writer's descriptor until it execs.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match command.spawn() {
                Ok(child) => return WorkerProcess(child),
                Err(e)
                    if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot start {}: {e}", program.display()),
            }
        }
    }

    /// Waits (bounded) for the process to exit by itself; whether it
    /// succeeded.
    fn exits(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().expect("the worker can be waited for") {
                return status.success();
            }
            assert!(Instant::now() < deadline, "the worker did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until the scheduler has `count` workers.
fn workers_registered(scheduler: &rask_distributed::scheduler::SchedulerHandle, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while scheduler.workers() < count {
        assert!(Instant::now() < deadline, "the workers never registered");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn an_older_build_of_the_program_never_answers_for_this_one() {
    // A rebuilt program, the other way round: a copy of this binary with
    // bytes appended is another build of "the same program".
    let exe = std::env::current_exe().expect("this test's path");
    let copy = TempFile(std::env::temp_dir().join(format!("rask-older-{}", std::process::id())));
    std::fs::copy(&exe, &copy.0).expect("the test binary copies");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&copy.0)
        .and_then(|mut f| f.write_all(b"an older build"))
        .expect("the copy is writable");
    // Fingerprints as errors show them: the first 8 hex digits of blake3.
    let older = std::fs::read(&copy.0).expect("the copy is readable");
    let older = blake3::hash(&older).to_hex()[..8].to_owned();
    let this = rask_distributed::BuildId::current().to_string();
    assert_ne!(older, this);

    let mut scheduler = serve("127.0.0.1:0".parse().unwrap());
    let address = format!("tcp://{}", scheduler.address());
    let mut old_worker = WorkerProcess::start(&copy.0, &address, &[(OLD_VERSION_ENV, "1")]);
    workers_registered(&scheduler, 1);
    let client = Client::connect(&address).unwrap();
    // Its `scale(41)` would be 42: the older build's worker must not run it.
    match client.submit(delayed!(scale(41))).unwrap().result() {
        Err(Error::Task { message, .. }) => {
            assert!(
                message.contains(&format!(
                    "no worker runs this program's build: client {this}, workers {older} (1)"
                )),
                "{message}"
            );
        }
        other => panic!("expected the build error, got {other:?}"),
    }
    // A worker of this build computes it.
    let mut new_worker = WorkerProcess::start(&exe, &address, &[]);
    workers_registered(&scheduler, 2);
    let scaled = client.submit(delayed!(scale(41))).unwrap();
    assert_eq!(scaled.result().unwrap(), 41_000);
    drop((scaled, client));
    // Workers with no death timeout exit when their scheduler goes away.
    scheduler.shutdown();
    assert!(old_worker.exits());
    assert!(new_worker.exits());
}

fn a_worker_started_by_hand_survives_a_scheduler_restart() {
    let exe = std::env::current_exe().expect("this test's path");
    let mut scheduler = serve("127.0.0.1:0".parse().unwrap());
    let addr = scheduler.address();
    let address = format!("tcp://{addr}");
    // Longer than any wait here: the worker never gives up in this test.
    let worker = WorkerProcess::start(
        &exe,
        &address,
        &[(rask_distributed::DEATH_TIMEOUT_ENV, "120")],
    );
    workers_registered(&scheduler, 1);
    let client = Client::connect(&address).unwrap();
    assert_eq!(
        client.submit(delayed!(inc(1))).unwrap().result().unwrap(),
        2
    );
    drop(client);
    // The scheduler stops, and another comes up at the same address.
    scheduler.shutdown();
    let scheduler = serve(addr);
    workers_registered(&scheduler, 1);
    let mut worker = worker;
    assert!(
        worker
            .0
            .try_wait()
            .expect("the worker can be waited for")
            .is_none(),
        "the worker process exited"
    );
    // The only worker, so the one that computes: for a client that never
    // saw the first scheduler.
    let client = Client::connect(&address).unwrap();
    assert_eq!(
        client.submit(delayed!(inc(41))).unwrap().result().unwrap(),
        42
    );
    drop(client);
    let pid = worker.0.id();
    // Killed and reaped.
    drop(worker);
    assert!(!live_children().contains(&pid));
}

/// Waits until this process has at most `count` live children.
fn children_settle_to(count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_children().len() > count {
        assert!(
            Instant::now() < deadline,
            "worker processes left running: {:?}",
            live_children()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn futures_api_on_a_cluster() {
    let before = live_children().len();
    let client = Client::local(2).unwrap();
    assert_eq!(live_children().len(), before + 2, "two worker processes");
    let f = client.submit(delayed!(inc(1))).unwrap();
    let g = client.submit(delayed!(add(&f, 10))).unwrap();
    assert_eq!(g.result().unwrap(), 12);
    let fs = client.map(inc, 0..300).unwrap();
    assert_eq!(client.gather(&fs).unwrap(), (1..=300).collect::<Vec<i64>>());
    let again = client.map(inc, 0..300).unwrap();
    assert!(
        again.iter().all(|f| f.status() == Status::Finished),
        "resubmission is instant"
    );
    let mut seq = as_completed(client.map(inc, 0..5).unwrap());
    let mut seen = 0;
    while let Some(done) = seq.next() {
        let v = done.result().unwrap();
        seen += 1;
        if v < 3 {
            seq.add(client.submit(delayed!(add(v, 100))).unwrap());
        }
    }
    assert_eq!(seen, 7);
    let held = client.stats().keys_held;
    drop((fs, again));
    assert!(client.stats().keys_held < held);
    let data = client.scatter(vec![7u8; 1000]).unwrap();
    assert_eq!(
        client
            .submit(delayed!(total_len(&data, 0)))
            .unwrap()
            .result()
            .unwrap(),
        1000
    );
    drop((data, f, g, client));
    children_settle_to(before);
}

/// Polls `fut` on this thread until it is ready, parking in between.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

fn held_results_stay_on_the_cluster() {
    // The shared `local:2` cluster used below lives until exit: start it first.
    assert_eq!(delayed!(inc(1)).compute_with(&local2()).unwrap(), 2);
    let before = live_children().len();
    let path = stamp_path("held");
    let client = Client::local(2).unwrap();
    let f = client.submit(delayed!(stamp(path.clone(), 20))).unwrap();
    let g = client.submit(delayed!(add(&f, 1))).unwrap();
    assert_eq!(g.result().unwrap(), 21);
    assert_eq!(client.stats().on_cluster, 2, "nothing fetched");
    // The value comes over on demand, as often as asked.
    assert_eq!(f.result().unwrap(), 20);
    assert_eq!(f.result().unwrap(), 20);
    assert_eq!(block_on(g.clone()).unwrap(), 21);
    assert_eq!(client.stats().on_cluster, 2);
    // Later graphs refer to it by key: it is used where it is, not run again.
    let more = client.map(inc, [&f, &g]).unwrap();
    assert_eq!(client.gather(&more).unwrap(), vec![21, 22]);
    let persisted = client.persist(&delayed!(add(&f, 100))).unwrap();
    let on_top = client.submit(delayed!(add(&persisted, &g))).unwrap();
    assert_eq!(on_top.result().unwrap(), 141);
    // Another cluster (the shared `local:2`) gets the value's bytes instead.
    assert_eq!(
        delayed!(add(&persisted, 1))
            .compute_with(&local2())
            .unwrap(),
        121
    );
    assert_eq!(stamps(&path), 1);
    // Release on drop frees the value on the cluster: the same work submitted
    // again runs again.
    drop((f, g, more, persisted, on_top));
    assert_eq!(client.stats().keys_held, 0);
    let again = client.submit(delayed!(stamp(path.clone(), 20))).unwrap();
    assert_eq!(again.result().unwrap(), 20);
    assert_eq!(stamps(&path), 2);
    // Scattered data is serialized and sent once, then used where it is.
    let data = client.scatter(Counted(vec![7; 1 << 20])).unwrap();
    assert!(data.done());
    assert_eq!(client.stats().on_cluster, 2, "`again` and the data");
    let sent = SERIALIZED.load(Ordering::SeqCst);
    for extra in 0..3 {
        let total = client.submit(delayed!(counted_len(&data, extra))).unwrap();
        assert_eq!(total.result().unwrap(), (1 << 20) + extra);
    }
    assert_eq!(SERIALIZED.load(Ordering::SeqCst), sent, "sent again");
    drop((again, data, client));
    let _ = std::fs::remove_file(&path);
    children_settle_to(before);
}

fn persist_on_a_cluster_keeps_the_values_there() {
    let path = stamp_path("persist");
    let stamped = delayed!(stamp(path.clone(), 5))
        .persist_with(&local2())
        .unwrap();
    let data = rask::persist_with(&[delayed!(counted(1 << 20))], &local2()).unwrap();
    let (stamped, data) = (&stamped, &data[0]);
    // Each stands for a result held on the cluster, not for a value carried
    // inside every later graph.
    for held in [
        rask::explain(stamped, &Config::new()),
        rask::explain(data, &Config::new()),
    ] {
        assert!(!held.unwrap().tasks().any(|t| t.is_data()));
    }
    let sent = SERIALIZED.load(Ordering::SeqCst);
    for extra in 0..3 {
        let total = delayed!(counted_len(data, extra)).compute_with(&local2());
        assert_eq!(total.unwrap(), (1 << 20) + extra);
        assert_eq!(
            delayed!(add(stamped, 1)).compute_with(&local2()).unwrap(),
            6
        );
    }
    // Used where it is: never brought here and sent back, never run again.
    assert_eq!(SERIALIZED.load(Ordering::SeqCst), sent, "sent from here");
    assert_eq!(stamps(&path), 1);
    // Another executor gets the bytes.
    let sync = Config::new().executor(ExecutorKind::Synchronous);
    assert_eq!(
        delayed!(counted_len(data, 1)).compute_with(&sync).unwrap(),
        (1 << 20) + 1
    );
    // A failure is the error of `persist`, as of `compute`.
    let err = rask::persist_with(&[delayed!(explode(3))], &local2()).unwrap_err();
    assert!(err.to_string().contains("exploded on 3"), "{err}");
    let _ = std::fs::remove_file(&path);
}

fn compute_uses_values_its_cluster_holds() {
    // A client on the shared `local:2` cluster, as `RASK_SCHEDULER=local:2`
    // gives: `compute` on the same cluster uses its held values in place.
    let path = stamp_path("compute");
    let client = Client::with_config(&local2()).unwrap();
    let chunk = client.submit(delayed!(stamp(path.clone(), 7))).unwrap();
    let kept: Delayed<i64> = chunk.to_delayed();
    for i in 0..3 {
        assert_eq!(
            delayed!(add(&kept, i)).compute_with(&local2()).unwrap(),
            7 + i
        );
    }
    assert_eq!(stamps(&path), 1);
    // Computed in this process, the value is fetched.
    assert_eq!(
        delayed!(add(&kept, 1))
            .compute_with(&Config::synchronous())
            .unwrap(),
        8
    );
    drop((kept, chunk));
    let again = client.submit(delayed!(stamp(path.clone(), 7))).unwrap();
    assert_eq!(again.result().unwrap(), 7);
    assert_eq!(stamps(&path), 2, "released on drop");
    let _ = std::fs::remove_file(&path);
}

/// Nested computation with real worker processes of one thread each
/// ([`nested_scenario`], in a child program so that its workers get
/// `RASK_WORKER_THREADS=1`): the default executor inside a task, fan-outs
/// one and two levels deep, a failing child, a cancelled outer task, and a
/// worker killed mid-fan-out. None deadlocks: each would without the
/// thread given back.
fn nested_computation_on_one_thread_workers() {
    let (out, err) = run_child(&[
        (NESTED_SCENARIO_ENV, "1"),
        ("RASK_WORKER_THREADS", "1"),
        ("RASK_SCHEDULER", "local:2"),
    ]);
    let done: Vec<&str> = out.lines().filter(|l| l.starts_with("ok ")).collect();
    assert_eq!(
        done,
        [
            "ok default executor",
            "ok timed task's nested work",
            "ok fan-out",
            "ok two levels",
            "ok failing child",
            "ok cancel",
            "ok kill",
            "ok untraversed",
            "ok untraversed future"
        ],
        "{out}\n{err}"
    );
}

/// A local cluster ending with its program ends quietly, found by a user
/// pass: the workers' nested clients lose their scheduler then, which
/// they said as a warning (`lost the connection to the scheduler …;
/// connecting again`) at the end of every successful run. They end with
/// it and log it at `debug` (`nested` rule 5); a client that loses its
/// scheduler otherwise still warns (`a_client_that_loses_its_scheduler_warns`
/// in `executors/distributed/tests/loopback.rs`).
fn a_local_cluster_ending_with_its_program_warns_of_nothing() {
    let (out, err) = run_child(&[
        (QUIET_END_SCENARIO_ENV, "1"),
        ("RASK_SCHEDULER", "local:2"),
        ("RUST_LOG", "info"),
    ]);
    assert!(out.contains("ok nested"), "{out}\n{err}");
    assert!(
        !err.contains("lost the connection to the scheduler"),
        "an orderly end warns:\n{err}"
    );
}

fn a_killed_worker_loses_no_result() {
    let before = live_children().len();
    let client = Client::local(2).unwrap();
    let fs = client.map(slow_inc, 0..400).unwrap();
    // Wait until some results exist, then kill a worker mid-map.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs.iter().filter(|f| f.done()).count() < 20 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    client.__kill_worker(0).unwrap();
    assert_eq!(client.gather(&fs).unwrap(), (1..=400).collect::<Vec<i64>>());
    // The cluster still works with one worker.
    assert_eq!(
        client.submit(delayed!(inc(1))).unwrap().result().unwrap(),
        2
    );
    drop((fs, client));
    children_settle_to(before);
}

/// The numbers of the lines `<prefix> <n>` of `text`, sorted; other lines
/// are returned apart.
fn numbered(text: &str, prefix: &str) -> (Vec<i64>, Vec<String>) {
    let (mut numbers, mut other) = (Vec::new(), Vec::new());
    for line in text.lines() {
        match line
            .strip_prefix(prefix)
            .and_then(|n| n.strip_prefix(' '))
            .and_then(|n| n.parse().ok())
        {
            Some(n) => numbers.push(n),
            None => other.push(line.to_owned()),
        }
    }
    numbers.sort_unstable();
    (numbers, other)
}

/// Runs this binary as a child program doing [`output_scenario`] on
/// `local:2`; returns its stdout and stderr once every process writing to
/// them (the child and its workers) is gone.
fn run_output_scenario() -> (String, String) {
    run_child(&[(OUTPUT_SCENARIO_ENV, "1"), ("RASK_SCHEDULER", "local:2")])
}

/// Runs this binary as a child program with `env`, and checks it
/// succeeded; returns its stdout and stderr once every process writing to
/// them (the child and its workers) is gone.
fn run_child(env: &[(&str, &str)]) -> (String, String) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().expect("this test's path"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child program starts");
    // The pipes end once the child and both its workers exited (workers
    // exit when they lose the child's scheduler): reading to the end is
    // waiting for all three.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = out_tx.send((1, text));
    });
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send((2, text));
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child program did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut out, mut err) = (None, None);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_secs(10))) {
            Ok((1, text)) => out = Some(text),
            Ok((_, text)) => err = Some(text),
            Err(_) => panic!("the child's workers still hold its output open"),
        }
    }
    let (out, err) = (out.expect("stdout"), err.expect("stderr"));
    assert!(status.success(), "child program: {status}\n{err}");
    (out, err)
}

fn task_output_reaches_the_program_under_local_n() {
    // One core kept busy, as under a loaded CI machine; bounded in time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        })
    };
    let all: Vec<i64> = (0..CHATTY_TASKS).collect();
    let result = catch_unwind(|| {
        for run in 0..10 {
            let (out, err) = run_output_scenario();
            let (lines, other) = numbered(&out, "out");
            assert_eq!(
                lines, all,
                "run {run}: stdout lines; other lines: {other:?}"
            );
            assert_eq!(other, ["partial 7"], "run {run}: other stdout");
            assert!(out.ends_with("\npartial 7"), "run {run}: {out:?}");
            let (lines, other) = numbered(&err, "err");
            assert_eq!(
                lines, all,
                "run {run}: stderr lines; other lines: {other:?}"
            );
        }
    });
    stop.store(true, Ordering::Relaxed);
    busy.join().expect("the busy thread ends");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn a_worker_stuck_in_a_cancelled_task_is_restarted_by_its_cluster() {
    let before = live_children().len();
    let (_, err) = run_child(&[
        (STUCK_SCENARIO_ENV, "1"),
        (rask_distributed::GRACE_ENV, "0.5"),
    ]);
    // One line when the worker gave up on its thread, one when the cluster
    // started it again.
    let unhealthy: Vec<&str> = err.lines().filter(|l| l.contains("unhealthy")).collect();
    assert_eq!(unhealthy.len(), 1, "{err}");
    assert!(
        unhealthy[0].contains(" WARN rask_distributed::worker::watchdog: worker ")
            && unhealthy[0].contains(": unhealthy: task ")
            && unhealthy[0].contains("stubborn-")
            && unhealthy[0].contains("ignored its cancellation for ")
            && unhealthy[0].ends_with(" s; exiting to be restarted"),
        "{err}"
    );
    assert!(
        err.contains(
            " WARN rask_distributed::cluster: worker process 0 asked to be restarted \
             (exit status: 75); started it again"
        ),
        "{err}"
    );
    assert_eq!(live_children().len(), before);
}

fn random_graphs_agree_with_the_sync_executor() {
    let mut runner = support::runner(12);
    runner
        .run(&support::dag(40, 0.05), |specs| {
            let nodes = support::build(&specs, 0);
            let root = nodes.len() - 1;
            let want = nodes[root].compute_with(&Config::synchronous());
            let got = nodes[root].compute_with(&local2());
            match (want, got) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(Error::Task { .. }), Err(Error::Task { .. })) => {}
                (a, b) => prop_assert!(false, "sync {:?} vs local:2 {:?}", a, b),
            }
            Ok(())
        })
        .unwrap();
}

/// `Client::compute` and `Client::submit` on `local:2` give `sync`'s
/// results on random graphs (a few cases: each costs round trips).
fn random_graphs_through_the_client_agree_with_the_sync_executor() {
    let client = Client::with_config(&local2()).unwrap();
    let mut runner = support::runner(8);
    runner
        .run(&support::dag(30, 0.05), |specs| {
            support::client_agrees_with_eval(&client, &specs, 0, 4)
        })
        .unwrap();
}

/// One step of the chains of [`a_chain_through_the_client_reaches_the_cluster_as_one_task`].
fn fused_step(x: i64) -> i64 {
    x + 1
}

/// Through the client, a chain with a literal at its bottom reaches the
/// cluster as one task: the cluster reports one finished task, named after
/// its steps (a literal folded in is not named), where the unoptimized
/// client sends one task per step.
fn a_chain_through_the_client_reaches_the_cluster_as_one_task() {
    static START: AtomicUsize = AtomicUsize::new(0);
    for optimize in [true, false] {
        let client = Client::with_config(&local2().optimize(optimize)).unwrap();
        let heard: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let sink = heard.clone();
        let _listening = rask::events::subscribe(move |e: &rask::events::Event<'_>| {
            if matches!(e.kind, rask::events::EventKind::Finished { .. })
                && e.name.contains("fused_step")
            {
                sink.lock().unwrap().push(e.name.to_owned());
            }
        });
        // A fresh literal each time: keys the cluster never saw.
        let start =
            i64::from(std::process::id()) * 1000 + START.fetch_add(1, Ordering::Relaxed) as i64;
        let chain = delayed!(fused_step(delayed!(fused_step(delayed!(fused_step(
            rask::value(start)
        ))))));
        assert_eq!(client.compute(&chain).unwrap().result().unwrap(), start + 3);
        // The cluster reports events in batches, the chain's top one last.
        let want: Vec<String> = if optimize {
            vec!["fused_step+fused_step+fused_step".to_owned()]
        } else {
            vec!["fused_step".to_owned(); 3]
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while heard.lock().unwrap().len() < want.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(*heard.lock().unwrap(), want, "optimize: {optimize}");
    }
}

/// Sleeps `ms`, then adds one.
fn nap_step(x: i64, ms: u64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    x + 1
}

/// A cluster's default task timeout (`rask-scheduler --task-timeout`)
/// holds for each task of a chain fused into one wire task, as for tasks
/// sent alone: ten steps of 300 ms under a default of 2 s succeed (the
/// chain was held to 2 s as a whole and failed), and a step of 5 s fails.
fn a_default_timeout_holds_for_each_step_of_a_fused_chain() {
    let auth = support::user_auth();
    let options = rask_distributed::scheduler::Options::default()
        .auth(auth.clone())
        .task_timeout(Duration::from_secs(2));
    let scheduler =
        rask_distributed::scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap();
    let address = format!("tcp://{}", scheduler.address());
    let registry = rask::__private::registry().unwrap();
    let options = rask_distributed::worker::Options::default()
        .threads(1)
        .auth(auth);
    let _worker = rask_distributed::worker::spawn_with(&address, registry, options).unwrap();
    let config = Config::new().executor(ExecutorKind::Tcp(
        address.trim_start_matches("tcp://").into(),
    ));
    // A fresh literal: keys the cluster never saw.
    let start = i64::from(std::process::id()) * 1000;
    let mut chain = delayed!(nap_step(start, 300));
    for _ in 1..10 {
        chain = delayed!(nap_step(&chain, 300));
    }
    assert_eq!(
        rask::explain(&chain, &config).unwrap().len(),
        1,
        "one wire task"
    );
    assert_eq!(chain.compute_with(&config).unwrap(), start + 10);
    let long = delayed!(nap_step(&delayed!(nap_step(start, 5000)), 0));
    match long.compute_with(&config) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("a step of 5 s under a default of 2 s: {other:?}"),
    }
}

/// Child processes of this process that are still alive.
fn live_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, ...
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[1] == me.to_string() && fields[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

/// Arguments and operators (#16) on real worker processes.
fn arguments_on_local_2() {
    arguments::nested_structures(&local2());
    arguments::futures_in_structures(&local2());
    arguments::operators(&local2());
    arguments::parts(&local2());
}

/// A wait for a cluster's future watches the client's table before it
/// sleeps (`futures::spin`). Whether the future ends during the watch or
/// after it, fails, or is cancelled, and whether a `gather` ends at its
/// last future or at a failure before it, each wait ends with what its
/// futures say.
fn waits_on_a_cluster_end_as_their_futures_do() {
    let client = Client::local(2).unwrap();
    // Round trips of a tiny task: most end while the thread watches.
    let mut x = 0;
    for _ in 0..300 {
        x = client.submit(delayed!(inc(x))).unwrap().result().unwrap();
    }
    assert_eq!(x, 300);
    let err = client
        .submit(delayed!(half(7)?))
        .unwrap()
        .result()
        .unwrap_err();
    assert!(format!("{err:#}").ends_with("7 is odd"), "{err:#}");
    // A wait longer than any watch: the thread sleeps and is woken.
    let path = stamp_path("waits-gate");
    let late = client.submit(delayed!(gated(path.clone(), 5))).unwrap();
    let opener = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            stamp(path, 0)
        })
    };
    assert_eq!(late.result().unwrap(), 5);
    opener.join().unwrap();
    // Many round trips again, then a gather that ends at a failure in the
    // middle while its last future waits at a gate: it does not wait for
    // that one. (Its failing future may be sent to the worker that runs
    // the gated task, behind it: it moves to the idle worker once the
    // gated one was out for `STUCK_MS`, scheduler rule S15.)
    for i in 0..100 {
        assert_eq!(
            client.submit(delayed!(inc(i))).unwrap().result().unwrap(),
            i + 1
        );
    }
    let shut = stamp_path("waits-shut");
    let held = client.submit(delayed!(gated(shut.clone(), 9))).unwrap();
    let fs = vec![
        client.submit(delayed!(half(4)?)).unwrap(),
        client.submit(delayed!(half(3)?)).unwrap(),
        held.clone(),
    ];
    let err = client.gather(&fs).unwrap_err();
    assert!(format!("{err:#}").ends_with("3 is odd"), "{err:#}");
    assert_eq!(held.status(), Status::Pending);
    // Cancelled while a thread waits for it: the wait ends, cancelled.
    let canceller = {
        let held = held.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            held.cancel();
        })
    };
    assert!(matches!(held.result(), Err(Error::Cancelled { .. })));
    canceller.join().unwrap();
    // And the gather of what finished gives every value.
    let fs: Vec<Future<i64>> = (0..50)
        .map(|i| client.submit(delayed!(inc(i))).unwrap())
        .collect();
    assert_eq!(client.gather(&fs).unwrap(), (1..=50).collect::<Vec<i64>>());
    let _ = std::fs::remove_file(&path);
}

/// The futures API of #16 on real worker processes.
fn futures_api_on_local_2() {
    let before = live_children().len();
    let client = Client::local(2).unwrap();
    futures_api::map_over_several_iterables(&client);
    futures_api::as_completed_is_a_stream(&client);
    futures_api::as_completed_in_batches(&client);
    futures_api::futures_of_different_types(&client);
    futures_api::scatter_broadcast(&client, 2);
    futures_api::small_broadcast_returns_at_once(&client);
    drop(client);
    children_settle_to(before);
}

/// Set in a run of this binary as a child program: its `main` prints what
/// [`threads_scenario`] finds instead of running the tests.
const THREADS_SCENARIO_ENV: &str = "RASK_TEST_THREADS_SCENARIO";

/// The child program: starts `Client::local(2)` under the environment it
/// was given and prints `threads A B` (each worker's threads) or `error
/// MESSAGE`.
fn threads_scenario() {
    match Client::local(2) {
        Ok(client) => {
            let mut threads: Vec<u32> = client
                .scheduler_info()
                .expect("the cluster answers")
                .workers
                .iter()
                .map(|w| w.threads)
                .collect();
            threads.sort_unstable();
            println!("threads {threads:?}");
        }
        Err(e) => println!("error {e}"),
    }
}

/// `Client::local(n)` splits the machine's cores between its workers;
/// `RASK_WORKER_THREADS` overrides it, and an invalid value is an error
/// naming it, from the client before any worker starts, and from a worker
/// started by hand.
fn worker_threads_split_the_cores() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let split = (cores / 2).max(1) as u32;
    let (out, _) = run_child(&[(THREADS_SCENARIO_ENV, "1")]);
    assert_eq!(out.trim(), format!("threads {:?}", [split, split]));
    let (out, _) = run_child(&[(THREADS_SCENARIO_ENV, "1"), ("RASK_WORKER_THREADS", "3")]);
    assert_eq!(out.trim(), "threads [3, 3]");
    for bad in ["0", "four", "-1", "", "4097"] {
        let (out, _) = run_child(&[(THREADS_SCENARIO_ENV, "1"), ("RASK_WORKER_THREADS", bad)]);
        assert_eq!(
            out.trim(),
            format!(
                "error RASK_WORKER_THREADS={bad:?} is not valid: expected a whole number of \
                 threads from 1 to 4096"
            )
        );
    }
    // A worker started by hand with a bad value refuses before connecting.
    let output = Command::new(std::env::current_exe().expect("this test's path"))
        .env(rask_distributed::WORKER_ENV, "tcp://127.0.0.1:9")
        .env("RASK_WORKER_THREADS", "many")
        .stdin(Stdio::null())
        .output()
        .expect("the worker runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r#"RASK_WORKER_THREADS="many" is not valid"#),
        "{stderr}"
    );
}

/// Twelve blocks of 100 000 bytes persisted on `client`'s cluster, each
/// stamping the file at `path` as it is computed; returns once the
/// cluster holds them all, each computed once.
fn persist_blocks(client: &Client, path: &str) -> Vec<Delayed<Vec<u8>>> {
    let persisted: Vec<Delayed<Vec<u8>>> = (0..12)
        .map(|i| {
            client
                .persist(&delayed!(stamped_block(path.to_owned(), i)))
                .unwrap()
        })
        .collect();
    // `persist` through a client returns at once (Dask's does too).
    eventually("the persisted values", || {
        let info = client.scheduler_info().unwrap();
        info.workers.iter().map(|w| w.keys).sum::<u64>() >= 12
    });
    assert_eq!(stamps(path), 12);
    persisted
}

/// Reads each block of [`persist_blocks`] through a task on the cluster,
/// checking its length and first byte.
fn read_blocks(client: &Client, persisted: &[Delayed<Vec<u8>>]) {
    for (i, held) in persisted.iter().enumerate() {
        let len = client.compute(&delayed!(block_len(held))).unwrap().result();
        assert_eq!(len.unwrap(), 100_000 + i as i64);
    }
}

/// Sends `signal` (`TERM`, `INT`, …) to process `pid`.
fn send_signal(signal: &str, pid: u32) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("`kill` runs");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// The worker process of `workers` that a worker named `name` runs in
/// (a worker's default name ends with its process id).
fn process_named(workers: &[WorkerProcess], name: &str) -> usize {
    workers
        .iter()
        .position(|w| name.ends_with(&format!("-{}", w.0.id())))
        .unwrap_or_else(|| panic!("no worker process is named {name}"))
}

/// `SIGTERM` to worker processes started by hand, as a supervisor stops
/// them (worker rule 17, scheduler rule S16a). Of two workers holding
/// persisted values, the one holding more, sent `SIGTERM`, hands its
/// values over and exits with success: every value stays readable and no
/// task runs again. The last worker, sent `SIGTERM`, leaves at once with
/// success; a worker started afterwards computes what it held again, right.
/// A worker that leaves while it runs a task waits for the task; a second
/// `SIGTERM` stops it at once, and the task runs elsewhere.
fn workers_sent_sigterm_hand_their_values_over_and_exit() {
    let exe = std::env::current_exe().expect("this test's path");
    let scheduler = serve("127.0.0.1:0".parse().unwrap());
    let address = format!("tcp://{}", scheduler.address());
    let one_thread = [(rask_distributed::WORKER_THREADS_ENV, "1")];
    let path = stamp_path("sigterm");
    let mut workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start(&exe, &address, &one_thread))
        .collect();
    workers_registered(&scheduler, 2);
    let client = Client::connect(&address).unwrap();
    let persisted = persist_blocks(&client, &path);
    let read_all = || read_blocks(&client, &persisted);

    // The worker holding more values leaves; nothing is computed again.
    let info = client.scheduler_info().unwrap();
    let most = info.workers.iter().max_by_key(|w| w.keys).unwrap();
    assert!(most.keys > 0, "{info:?}");
    let leaving = process_named(&workers, &most.name);
    send_signal("TERM", workers[leaving].0.id());
    assert!(workers[leaving].exits(), "a worker sent SIGTERM failed");
    workers.remove(leaving);
    eventually("the scheduler to let it go", || scheduler.workers() == 1);
    read_all();
    assert_eq!(stamps(&path), 12, "a task ran again");

    // The last worker leaves at once; a new one computes its values again.
    send_signal("TERM", workers[0].0.id());
    assert!(workers[0].exits(), "the last worker sent SIGTERM failed");
    workers.clear();
    eventually("the scheduler to have no worker", || {
        scheduler.workers() == 0
    });
    workers.push(WorkerProcess::start(&exe, &address, &one_thread));
    workers_registered(&scheduler, 1);
    read_all();
    assert_eq!(
        stamps(&path),
        24,
        "what the last worker held, computed again"
    );

    // Two one-thread workers, a task that waits for its gate on each.
    workers.insert(0, WorkerProcess::start(&exe, &address, &one_thread));
    workers_registered(&scheduler, 2);
    let gate = TempFile(PathBuf::from(format!("{path}.gate")));
    let gate_path = gate.0.to_string_lossy().into_owned();
    let waiting: Vec<Future<i64>> = [1, 2]
        .into_iter()
        .map(|x| {
            client
                .submit(delayed!(gated(gate_path.clone(), x)))
                .unwrap()
        })
        .collect();
    eventually("both tasks to run", || {
        let info = client.scheduler_info().unwrap();
        info.workers.len() == 2 && info.workers.iter().all(|w| w.running == 1)
    });
    // One leaves: it waits for its task; a second signal stops it at once.
    let mut first = workers.remove(0);
    send_signal("TERM", first.0.id());
    // Shown retiring, by `scheduler_info` and on the dashboard.
    let suffix = format!("-{}", first.0.id());
    eventually("it to show as retiring", || {
        let info = client.scheduler_info().unwrap();
        info.workers.len() == 2
            && info
                .workers
                .iter()
                .all(|w| w.retiring == w.name.ends_with(&suffix))
    });
    send_signal("TERM", first.0.id());
    assert!(first.exits(), "a second SIGTERM did not stop the worker");
    // Its task runs on the other worker once the gate opens.
    std::fs::write(&gate.0, b"open").unwrap();
    assert_eq!(client.gather(&waiting).unwrap(), vec![1, 2]);
    drop((persisted, waiting, client, workers));
    let _ = std::fs::remove_file(&path);
}

/// A local cluster's workers keep `SIGTERM`'s default (worker rule 17,
/// `RASK_WORKER_LEAVE_ON_SIGTERM=0`): the program owns them. The only
/// worker of `local:1`, sent `SIGTERM`, ends at once (it does not leave
/// as the last worker would, exiting with success, never to be started
/// again); the cluster starts another, which computes.
fn a_local_clusters_worker_sent_sigterm_is_started_again() {
    let before = live_children().len();
    let client = Client::local(1).unwrap();
    client.wait_for_workers(1, Duration::from_secs(30)).unwrap();
    assert_eq!(
        client.submit(delayed!(inc(1))).unwrap().result().unwrap(),
        2
    );
    let first = client.scheduler_info().unwrap().workers[0].name.clone();
    let pid: u32 = first
        .rsplit('-')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no process id in the name {first}"));
    assert!(live_children().contains(&pid), "{first} is not a child");
    send_signal("TERM", pid);
    eventually("another worker process", || {
        let info = client.scheduler_info().unwrap();
        info.workers.len() == 1 && info.workers[0].name != first
    });
    assert!(!live_children().contains(&pid));
    assert_eq!(
        client.submit(delayed!(inc(2))).unwrap().result().unwrap(),
        3
    );
    drop(client);
    children_settle_to(before);
}

/// Retirement with real processes: on a cluster of three workers, values
/// persisted all over it are kept while two workers are retired; the two
/// processes exit, every value stays readable, and no task runs again (each
/// run writes a line to a file).
fn retired_workers_hand_their_values_over_on_local_3() {
    let before = live_children().len();
    let path = stamp_path("retire");
    let client = Client::local(3).unwrap();
    client.wait_for_workers(3, Duration::from_secs(30)).unwrap();
    let children = live_children().len();
    let persisted = persist_blocks(&client, &path);
    let info = client.scheduler_info().unwrap();
    let mut names: Vec<String> = info.workers.iter().map(|w| w.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "three distinct names: {names:?}");
    // Values sit on every worker, so each retirement moves some.
    assert!(
        info.workers.iter().filter(|w| w.keys > 0).count() >= 2,
        "{info:?}"
    );
    client.retire_workers(&names[..2]).unwrap();
    let left: Vec<String> = client
        .scheduler_info()
        .unwrap()
        .workers
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(left, names[2..]);
    // The retired processes exit; the cluster does not start them again.
    eventually("the retired workers to exit", || {
        live_children().len() == children - 2
    });
    read_blocks(&client, &persisted);
    assert_eq!(stamps(&path), 12, "a task ran again");
    // A name it does not know, or the last worker: refused, nothing retired.
    for (bad, says) in [
        ("nobody", "no worker named \"nobody\""),
        (&*names[2], "none to hold"),
    ] {
        let err = client.retire_workers(&[bad]).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    }
    assert_eq!(client.scheduler_info().unwrap().workers.len(), 1);
    drop((persisted, client));
    let _ = std::fs::remove_file(&path);
    children_settle_to(before);
}

/// A worker started by hand takes `--nthreads` and `--name` (or their
/// variables), shown by `scheduler_info`; it runs one thread per core by
/// default; a bad argument or value is refused before it connects, naming
/// what it takes.
fn a_worker_started_by_hand_takes_its_options() {
    let exe = std::env::current_exe().expect("this test's path");
    let mut scheduler = serve("127.0.0.1:0".parse().unwrap());
    let address = format!("tcp://{}", scheduler.address());
    let start = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(&exe);
        command
            .args(args)
            .env(rask_distributed::WORKER_ENV, &address)
            .env(rask_distributed::DEATH_TIMEOUT_ENV, "0")
            .env_remove(rask_distributed::WORKER_THREADS_ENV)
            .env_remove(rask_distributed::WORKER_NAME_ENV)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        command
    };
    let mut by_hand = WorkerProcess(
        start(
            &[
                "--nthreads",
                "3",
                "--name=by-hand",
                "--resources",
                "GPU=2",
                "--memory-limit=200MiB",
            ],
            &[],
        )
        .spawn()
        .unwrap(),
    );
    let mut by_env = WorkerProcess(
        start(&[], &[(rask_distributed::WORKER_NAME_ENV, "by-env")])
            .spawn()
            .unwrap(),
    );
    workers_registered(&scheduler, 2);
    let client = Client::connect(&address).unwrap();
    let mut seen: Vec<(String, u32, String)> = client
        .scheduler_info()
        .unwrap()
        .workers
        .into_iter()
        .map(|w| (w.name, w.threads, w.resources))
        .collect();
    seen.sort();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    assert_eq!(
        seen,
        [
            ("by-env".to_owned(), cores, String::new()),
            ("by-hand".to_owned(), 3, "GPU=2".to_owned())
        ]
    );
    // A second worker of a taken name is refused, and says so.
    let twin = start(&["--name", "by-hand"], &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&twin.stderr);
    assert_eq!(twin.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the name \"by-hand\" is taken"), "{stderr}");
    for (args, says) in [
        (
            &["--nthreads", "0"][..],
            "expected a whole number of threads",
        ),
        (&["--nthreads"][..], "needs a value"),
        (&["--name", "two words"][..], "no whitespace"),
        (&["--threads", "2"][..], "not a worker option"),
        (&["--resources", "GPU"][..], "GPU"),
        (&["--memory-limit", "lots"][..], "expected a size"),
        (&["input.csv"][..], "not a worker option"),
    ] {
        let out = start(args, &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(says) && stderr.contains("--nthreads N"),
            "{stderr}"
        );
    }
    let out = start(&[], &[(rask_distributed::WORKER_NAME_ENV, "")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RASK_WORKER_NAME=\"\" is not valid"),
        "{stderr}"
    );
    drop(client);
    scheduler.shutdown();
    for worker in [&mut by_hand, &mut by_env] {
        assert!(worker.0.wait().unwrap().success());
    }
}

fn main() {
    rask::init_with(futures_api::register(arguments::register(rask::tasks![
        inc,
        fused_step,
        nap_step,
        add,
        sum,
        total_len,
        slow_inc,
        explode,
        half?,
        scale,
        stamp,
        stamped_block,
        block_len,
        counted_len,
        counted,
        support::leaf,
        support::mix?,
        support::tree_inc,
        support::tree_add,
        chatty,
        partial,
        stubborn,
        kill_self_at_zero,
        pid,
        nested_pids?,
        fan_out?,
        fan_out_twice?,
        halves?,
        slow_stamp,
        slow_fan_out?,
        sum_given?,
        slow_value,
        gated,
        use_future?,
        len_given?
    ])));
    if std::env::var_os(OUTPUT_SCENARIO_ENV).is_some() {
        output_scenario();
        return;
    }
    if std::env::var_os(STUCK_SCENARIO_ENV).is_some() {
        stuck_scenario();
        return;
    }
    if std::env::var_os(CRASH_SCENARIO_ENV).is_some() {
        crash_scenario();
        return;
    }
    if std::env::var_os(THREADS_SCENARIO_ENV).is_some() {
        threads_scenario();
        return;
    }
    if std::env::var_os(QUIET_END_SCENARIO_ENV).is_some() {
        quiet_end_scenario();
        return;
    }
    if std::env::var_os(NESTED_SCENARIO_ENV).is_some() {
        nested_scenario();
        return;
    }
    harness::token_for_this_run();
    let tests: &[(&str, fn())] = &[
        (
            "a_default_timeout_holds_for_each_step_of_a_fused_chain",
            a_default_timeout_holds_for_each_step_of_a_fused_chain,
        ),
        (
            "graphs_compute_like_the_sync_executor",
            graphs_compute_like_the_sync_executor,
        ),
        (
            "failures_name_the_task_and_spare_the_cluster",
            failures_name_the_task_and_spare_the_cluster,
        ),
        (
            "unregistered_functions_are_a_clear_error",
            unregistered_functions_are_a_clear_error,
        ),
        ("futures_api_on_a_cluster", futures_api_on_a_cluster),
        ("arguments_on_local_2", arguments_on_local_2),
        ("futures_api_on_local_2", futures_api_on_local_2),
        (
            "a_delayed_nested_past_the_limit_is_refused_not_a_crash",
            a_delayed_nested_past_the_limit_is_refused_not_a_crash,
        ),
        (
            "a_graph_on_another_clients_pending_future_waits_without_freezing_the_connection",
            a_graph_on_another_clients_pending_future_waits_without_freezing_the_connection,
        ),
        (
            "waits_on_a_cluster_end_as_their_futures_do",
            waits_on_a_cluster_end_as_their_futures_do,
        ),
        (
            "worker_threads_split_the_cores",
            worker_threads_split_the_cores,
        ),
        (
            "held_results_stay_on_the_cluster",
            held_results_stay_on_the_cluster,
        ),
        (
            "persist_on_a_cluster_keeps_the_values_there",
            persist_on_a_cluster_keeps_the_values_there,
        ),
        (
            "compute_uses_values_its_cluster_holds",
            compute_uses_values_its_cluster_holds,
        ),
        (
            "a_killed_worker_loses_no_result",
            a_killed_worker_loses_no_result,
        ),
        (
            "random_graphs_agree_with_the_sync_executor",
            random_graphs_agree_with_the_sync_executor,
        ),
        (
            "random_graphs_through_the_client_agree_with_the_sync_executor",
            random_graphs_through_the_client_agree_with_the_sync_executor,
        ),
        (
            "a_chain_through_the_client_reaches_the_cluster_as_one_task",
            a_chain_through_the_client_reaches_the_cluster_as_one_task,
        ),
        (
            "a_restarted_scheduler_is_reconnected",
            a_restarted_scheduler_is_reconnected,
        ),
        (
            "a_restarted_scheduler_recomputes_what_it_held",
            a_restarted_scheduler_recomputes_what_it_held,
        ),
        (
            "a_worker_started_by_hand_takes_its_options",
            a_worker_started_by_hand_takes_its_options,
        ),
        (
            "retired_workers_hand_their_values_over_on_local_3",
            retired_workers_hand_their_values_over_on_local_3,
        ),
        (
            "workers_sent_sigterm_hand_their_values_over_and_exit",
            workers_sent_sigterm_hand_their_values_over_and_exit,
        ),
        (
            "a_local_clusters_worker_sent_sigterm_is_started_again",
            a_local_clusters_worker_sent_sigterm_is_started_again,
        ),
        (
            "a_worker_started_by_hand_survives_a_scheduler_restart",
            a_worker_started_by_hand_survives_a_scheduler_restart,
        ),
        (
            "task_output_reaches_the_program_under_local_n",
            task_output_reaches_the_program_under_local_n,
        ),
        (
            "an_older_build_of_the_program_never_answers_for_this_one",
            an_older_build_of_the_program_never_answers_for_this_one,
        ),
        (
            "a_local_cluster_starts_its_dead_workers_again",
            a_local_cluster_starts_its_dead_workers_again,
        ),
        (
            "a_worker_stuck_in_a_cancelled_task_is_restarted_by_its_cluster",
            a_worker_stuck_in_a_cancelled_task_is_restarted_by_its_cluster,
        ),
        (
            "nested_computation_on_one_thread_workers",
            nested_computation_on_one_thread_workers,
        ),
        (
            "a_local_cluster_ending_with_its_program_warns_of_nothing",
            a_local_cluster_ending_with_its_program_warns_of_nothing,
        ),
    ];
    // Clusters started by `Client::local` are gone with their clients (the
    // tests check it); the shared `local:2` cluster lives until exit, and its
    // workers exit when the scheduler (in this process) goes away.
    harness::run(tests);
}
