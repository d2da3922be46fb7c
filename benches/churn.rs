//! Churn: a map of 10 000 tasks of 2 ms on a scheduler with 4 worker
//! processes of one thread, while a random worker is killed (`kill -9`)
//! every 0.5 s or every 2 s and a keeper starts it again, against the same
//! map without kills. Prints, per setting: wall time, task runs per task,
//! and the longest time without a result arriving.
//!
//! `cargo bench --bench churn` (add `-- N` for another number of tasks).

#[path = "../tests/support/chaos.rs"]
mod chaos;
#[path = "../tests/support/harness.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos::Churn;
use rask_distributed::scheduler::Options;

/// A 2 ms task; each run, finished or not, is counted.
fn work(x: i64) -> i64 {
    chaos::count_run();
    std::thread::sleep(Duration::from_millis(2));
    x * 2
}

/// One run: wall time, runs per task, longest gap between results, and
/// workers killed.
fn run(tasks: i64, kill_every: Option<Duration>) -> (Duration, f64, Duration, usize) {
    let churn = Arc::new(Churn::start(4, Options::default(), true));
    let client = churn.client();
    let done = Arc::new(AtomicBool::new(false));
    let killer = kill_every.map(|every| chaos::kill_every(churn.clone(), every, 4, done.clone()));
    let start = Instant::now();
    let fs = client.map(work, 0..tasks).expect("the map");
    let mut last = Instant::now();
    let mut gap = Duration::ZERO;
    let mut seen = 0;
    for f in rask::as_completed(fs) {
        let v = f.result().expect("every result arrives");
        assert_eq!(v % 2, 0);
        let now = Instant::now();
        gap = gap.max(now - last);
        last = now;
        seen += 1;
    }
    let wall = start.elapsed();
    done.store(true, Ordering::SeqCst);
    let kills = killer.map_or(0, |k| k.join().unwrap_or(0));
    let restarts = churn.started.load(Ordering::SeqCst) - 4;
    assert!(kill_every.is_none() || kills > 0);
    assert_eq!(seen, tasks);
    let runs = churn.runs() as f64 / tasks as f64;
    (wall, runs, gap, restarts)
}

fn main() {
    rask::init_with(rask::tasks![work]);
    harness::token_for_this_run();
    let tasks: i64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    println!("churn: {tasks} tasks of 2 ms, 4 workers of 1 thread");
    println!(
        "| kills | workers killed | wall time | runs per task | longest gap between results |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, every) in [
        ("none", None),
        ("every 2 s", Some(Duration::from_secs(2))),
        ("every 0.5 s", Some(Duration::from_millis(500))),
    ] {
        let (wall, runs, gap, killed) = run(tasks, every);
        println!("| {label} | {killed} | {wall:.2?} | {runs:.3} | {gap:.2?} |");
    }
}
