//! Chaos: real worker processes killed, stopped and orphaned while they
//! work, and a scheduler restarted under a live client. Every result must
//! still arrive, and be right. Runs with its own `main` (`harness =
//! false`): the workers are this binary in worker mode.

#[path = "support/chaos.rs"]
mod chaos;
#[path = "support/harness.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos::Churn;
use rask::{delayed, Error};
use rask_distributed::scheduler::Options;

/// A 2 ms task.
fn work(x: i64) -> i64 {
    chaos::count_run();
    std::thread::sleep(Duration::from_millis(2));
    x * 2
}

/// A task that takes its worker process down with it.
fn crash(x: i64) -> i64 {
    std::process::exit(i32::try_from(x).unwrap_or(1))
}

/// Takes its worker process down for 0; a 2 ms task otherwise.
fn crash_at_zero(x: i64) -> i64 {
    if x == 0 {
        std::process::exit(3);
    }
    work(x)
}

/// Waits, at most `limit`, for every future, then gathers them.
fn gather_within(
    client: &rask::Client,
    fs: &[rask::Future<i64>],
    limit: Duration,
) -> rask::Result<Vec<i64>> {
    rask::wait_timeout(fs, limit)?;
    client.gather(fs)
}

/// kill -9 a random one of 4 workers every 0.5 s during a map of 10 000
/// tasks of 2 ms; a keeper starts each dead worker again.
fn a_worker_killed_every_half_second_loses_nothing() {
    let churn = Arc::new(Churn::start(4, Options::default(), false));
    let client = churn.client();
    let done = Arc::new(AtomicBool::new(false));
    let killer = chaos::kill_every(churn.clone(), Duration::from_millis(500), 4, done.clone());
    let fs = client.map(work, 0..10_000).unwrap();
    let got = gather_within(&client, &fs, Duration::from_secs(240));
    done.store(true, Ordering::SeqCst);
    let kills = killer.join().unwrap();
    assert_eq!(
        got.unwrap(),
        (0..10_000).map(|x| x * 2).collect::<Vec<i64>>()
    );
    assert!(kills > 0, "no worker was killed");
}

/// A worker stopped with SIGSTOP is taken for dead after the worker
/// timeout; its work runs elsewhere. Continued, it is no harm.
fn a_stopped_worker_holds_nothing_up() {
    let options = Options::default().worker_timeout(Duration::from_secs(2));
    let churn = Churn::start(3, options, false);
    let client = churn.client();
    let fs = client.map(work, 0..3_000).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs.iter().filter(|f| f.done()).count() < 300 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = churn.pid(0).expect("worker 0 runs");
    Churn::signal(pid, "STOP");
    let got = gather_within(&client, &fs, Duration::from_secs(120));
    Churn::signal(pid, "CONT");
    assert_eq!(
        got.unwrap(),
        (0..3_000).map(|x| x * 2).collect::<Vec<i64>>()
    );
    // The cluster goes on with the continued worker or its replacement.
    let more = client.map(work, 5_000..5_100).unwrap();
    assert_eq!(
        gather_within(&client, &more, Duration::from_secs(60)).unwrap(),
        (5_000..5_100).map(|x| x * 2).collect::<Vec<i64>>()
    );
}

/// The scheduler restarts under a long-lived client: what was open fails
/// with a clear error; every submission made while the scheduler is up
/// succeeds.
fn a_restarted_scheduler_keeps_a_client_working() {
    let mut churn = Churn::start(2, Options::default(), false);
    let client = churn.client();
    for round in 0..3 {
        let base = round * 1_000;
        let fs = client.map(work, base..base + 200).unwrap();
        assert_eq!(
            gather_within(&client, &fs, Duration::from_secs(60)).unwrap(),
            (base..base + 200).map(|x| x * 2).collect::<Vec<i64>>(),
            "round {round}"
        );
        // Work open while it goes down fails, naming the lost connection.
        let open = client
            .submit(delayed!(work(base + 999_000)).named(format!("open-{round}")))
            .unwrap();
        churn.restart_scheduler();
        match open.result() {
            Ok(v) => assert_eq!(v, (base + 999_000) * 2),
            Err(e) => assert!(format!("{e:#}").contains("connection"), "{e:#}"),
        }
    }
    // Up again: a fresh submission succeeds at once.
    let fs = client.map(work, 7_000..7_050).unwrap();
    assert_eq!(
        gather_within(&client, &fs, Duration::from_secs(60)).unwrap(),
        (7_000..7_050).map(|x| x * 2).collect::<Vec<i64>>()
    );
}

/// A task that exits its worker fails after the allowed failures, naming
/// what happened; the rest of the work is not disturbed.
fn a_task_that_exits_fails_alone() {
    let churn = Churn::start(3, Options::default(), false);
    let client = churn.client();
    let bad = client.submit(delayed!(crash(3))).unwrap();
    let fs = client.map(work, 0..1_000).unwrap();
    assert_eq!(
        gather_within(&client, &fs, Duration::from_secs(120)).unwrap(),
        (0..1_000).map(|x| x * 2).collect::<Vec<i64>>()
    );
    rask::wait_timeout(std::slice::from_ref(&bad), Duration::from_secs(120)).unwrap();
    match bad.result() {
        Err(Error::Task { key, message, .. }) => {
            assert_eq!(key, bad.key());
            assert!(
                message.contains("workers died while running this task"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// On a one-thread worker (which runs a second task on its network
/// thread), the task sent beside a crashing one is taken for running when
/// the worker dies, but does not fail with it: after that death each of
/// the two runs alone, so the later deaths count against the crashing
/// task only. One map, so both are sent to the worker together.
fn a_task_beside_a_crashing_one_does_not_fail_with_it() {
    let churn = Churn::start(1, Options::default(), false);
    let client = churn.client();
    let fs = client.map(crash_at_zero, 0..20).unwrap();
    rask::wait_timeout(&fs, Duration::from_secs(120)).unwrap();
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
    assert_eq!(rest, (1..20).map(|x| x * 2).collect::<Vec<i64>>());
    assert!(
        churn.started.load(Ordering::SeqCst) >= 4,
        "three deaths, three restarts"
    );
}

fn main() {
    rask::init_with(rask::tasks![work, crash, crash_at_zero]);
    harness::token_for_this_run();
    let tests: &[(&str, fn())] = &[
        (
            "a_worker_killed_every_half_second_loses_nothing",
            a_worker_killed_every_half_second_loses_nothing,
        ),
        (
            "a_stopped_worker_holds_nothing_up",
            a_stopped_worker_holds_nothing_up,
        ),
        (
            "a_restarted_scheduler_keeps_a_client_working",
            a_restarted_scheduler_keeps_a_client_working,
        ),
        (
            "a_task_that_exits_fails_alone",
            a_task_that_exits_fails_alone,
        ),
        (
            "a_task_beside_a_crashing_one_does_not_fail_with_it",
            a_task_beside_a_crashing_one_does_not_fail_with_it,
        ),
    ];
    harness::run(tests);
}
