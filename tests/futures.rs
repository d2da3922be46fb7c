#![cfg(feature = "threaded")]
//! The futures API as a user writes it: `Client`, `Future`, `as_completed`,
//! `wait`. Gates (a condition variable per test) prove "returns before the
//! task finished" without sleeping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};

#[path = "support/futures_api.rs"]
mod futures_api;
mod support;

use rask::{as_completed, delayed, wait, wait_first, Client, Delayed, Error, Status};

/// Gates tasks can wait on; tests open them.
static GATES: Mutex<Option<HashMap<u64, bool>>> = Mutex::new(None);
static GATE_CHANGED: Condvar = Condvar::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn new_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

fn open(gate: u64) {
    GATES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(gate, true);
    GATE_CHANGED.notify_all();
}

/// `n` futures on `client`, the `i`-th returning `i` once its own gate
/// opens, and their gates.
fn gated_futures(client: &Client, n: i64) -> (Vec<u64>, Vec<rask::Future<i64>>) {
    let gates: Vec<u64> = (0..n).map(|_| new_id()).collect();
    let futures = gates
        .iter()
        .zip(0..)
        .map(|(&g, i)| client.submit(delayed!(gated(g, i))).unwrap())
        .collect();
    (gates, futures)
}

/// Waits until `gate` is open, then returns `value`.
fn gated(gate: u64, value: i64) -> i64 {
    let mut gates = GATES.lock().unwrap();
    while !gates
        .get_or_insert_with(HashMap::new)
        .get(&gate)
        .copied()
        .unwrap_or(false)
    {
        gates = GATE_CHANGED.wait(gates).unwrap();
    }
    value
}

/// Executions per counter id.
static COUNTS: Mutex<Option<HashMap<u64, usize>>> = Mutex::new(None);

fn counted(counter: u64, x: i64) -> i64 {
    *COUNTS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(counter)
        .or_default() += 1;
    x + 1
}

fn count(counter: u64) -> usize {
    COUNTS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&counter)
        .copied()
        .unwrap_or(0)
}

fn inc(x: i64) -> i64 {
    x + 1
}

fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn fail_on(x: i64) -> Result<i64, String> {
    if x == 3 {
        Err(format!("no threes ({x})"))
    } else {
        Ok(x)
    }
}

fn total(v: Arc<Vec<u64>>) -> u64 {
    v.iter().sum()
}

/// Calls of `until_cancelled` that saw `rask::cancelled()`, by id.
static SAW_CANCEL: Mutex<Option<HashMap<u64, bool>>> = Mutex::new(None);

/// Runs until the task is cancelled (at most 30 s), noting when it starts
/// and whether it saw the cancellation.
fn until_cancelled(id: u64) -> i64 {
    SAW_CANCEL
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(id, false);
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        if rask::cancelled() {
            SAW_CANCEL
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .insert(id, true);
            return -1;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    0
}

fn started(id: u64) -> bool {
    SAW_CANCEL
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .contains_key(&id)
}

fn saw_cancel(id: u64) -> bool {
    SAW_CANCEL
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&id)
        .copied()
        .unwrap_or(false)
}

/// Waits for `gate`, ignoring cancellation: a hung task until the test
/// opens the gate.
fn sleepy(gate: u64, x: i64) -> i64 {
    gated(gate, x)
}

/// Fails the first `failures` calls with counter `id`, then returns `id`.
fn flaky(id: u64, failures: usize) -> Result<i64, String> {
    let n = {
        let mut counts = COUNTS.lock().unwrap();
        let n = counts
            .get_or_insert_with(HashMap::new)
            .entry(id)
            .or_default();
        *n += 1;
        *n
    };
    if n <= failures {
        Err(format!("attempt {n} failed"))
    } else {
        Ok(id as i64)
    }
}

/// The futures API on every executor: one thread, a pool, and (feature
/// `distributed`) a scheduler with two workers in this process.
fn clients() -> Vec<Client> {
    #[allow(unused_mut)]
    let mut clients = vec![
        Client::synchronous().unwrap(),
        Client::simulated(17).unwrap(),
        Client::threads(2).unwrap(),
    ];
    #[cfg(feature = "distributed")]
    clients.push(
        Client::connect(&support::loopback_address(futures_api::register(
            rask::tasks![
                counted,
                gated,
                inc,
                add,
                fail_on?,
                total,
                until_cancelled,
                at_once_or_until_cancelled,
                sleepy,
                flaky?,
                refuse?,
                bomb_plus
            ],
        )))
        .unwrap(),
    );
    clients
}

/// The clients that run work in the background, while the test thread
/// does something else: not `sync` (which runs it inside `submit`) nor
/// `sim:SEED` (which runs it inside the waits).
fn background_clients() -> Vec<Client> {
    clients()
        .into_iter()
        .filter(|c| {
            !matches!(
                c.executor(),
                rask::ExecutorKind::Synchronous | rask::ExecutorKind::Simulated(_)
            )
        })
        .collect()
}

#[test]
fn submit_returns_before_the_task_finished() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let f = client.submit(delayed!(gated(gate, 7))).unwrap();
    assert_eq!(f.status(), Status::Pending);
    assert!(!f.done());
    open(gate);
    assert_eq!(f.result().unwrap(), 7);
    assert_eq!(f.status(), Status::Finished);
}

/// A waiting thread is woken when the future it waits on ends, not when
/// any does (`Shared::wake`): each of several threads gets its own value
/// once its gate opens, whatever else finished meanwhile, and a wait whose
/// deadline lapsed before leaves nobody unwoken. A lost wake-up leaves a
/// thread asleep for good: this test then hangs (checked by dropping the
/// notification, with a 60-second deadline on these waits: on both
/// clients the threads slept until it).
#[test]
fn each_waiting_thread_wakes_when_its_own_future_ends() {
    use std::time::Duration;
    for client in background_clients() {
        let (gates, futures) = gated_futures(&client, 4);
        // Waits that end at their deadline: every gate is shut.
        for f in futures.iter().step_by(2) {
            assert!(f.result_timeout(Duration::from_millis(1)).is_err());
        }
        let waiters: Vec<_> = futures
            .iter()
            .cloned()
            .map(|f| std::thread::spawn(move || f.result()))
            .collect();
        // In reverse: every completion but the last ends a future that the
        // threads still waiting do not wait on.
        for &g in gates.iter().rev() {
            open(g);
        }
        let values: Vec<i64> = waiters
            .into_iter()
            .map(|w| w.join().unwrap().unwrap())
            .collect();
        assert_eq!(values, vec![0, 1, 2, 3], "{}", client.executor());
    }
}

#[test]
fn futures_are_arguments_even_while_running() {
    // Skips the synchronous client, where `submit` runs the work at once.
    for client in clients().into_iter().skip(1) {
        let gate = new_id();
        let x = client.submit(delayed!(gated(gate, 1))).unwrap();
        // On a cluster these graphs go out at once, referring to `x`'s key.
        let y = client.submit(delayed!(inc(&x))).unwrap();
        let total = client.submit(delayed!(add(&x, &y))).unwrap();
        assert_eq!(total.status(), Status::Pending);
        open(gate);
        assert_eq!(total.result().unwrap(), 3);
        // A delayed graph on futures also works through plain compute.
        let later = delayed!(add(&x, 100));
        assert_eq!(later.compute().unwrap(), 101);
    }
}

#[test]
fn map_and_gather_keep_order() {
    for client in clients() {
        let fs = client.map(inc, 0..500).unwrap();
        let got = client.gather(&fs).unwrap();
        assert_eq!(got, (1..=500).collect::<Vec<i64>>());
        // Futures as map items.
        let again = client.map(inc, &fs).unwrap();
        assert_eq!(
            client.gather(&again).unwrap(),
            (2..=501).collect::<Vec<i64>>()
        );
    }
}

/// Items that say there are far more of them than there are.
struct Boastful(std::ops::Range<i64>);

impl Iterator for Boastful {
    type Item = i64;
    fn next(&mut self) -> Option<i64> {
        self.0.next()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

#[test]
fn map_over_items_that_overstate_their_number_maps_them() {
    for client in clients() {
        let fs = client.map(inc, Boastful(0..3)).unwrap();
        assert_eq!(client.gather(&fs).unwrap(), vec![1, 2, 3]);
        // A map again over the same keys, and over more.
        let fs = client.map(inc, Boastful(0..5)).unwrap();
        assert_eq!(client.gather(&fs).unwrap(), vec![1, 2, 3, 4, 5]);
    }
}

#[test]
fn resubmitting_identical_work_runs_nothing() {
    for client in clients() {
        let counter = new_id() as i64;
        let fs: Vec<_> = (0..50)
            .map(|i| client.submit(delayed!(counted(counter as u64, i))).unwrap())
            .collect();
        client.gather(&fs).unwrap();
        let ran = count(counter as u64);
        let again: Vec<_> = (0..50)
            .map(|i| client.submit(delayed!(counted(counter as u64, i))).unwrap())
            .collect();
        assert!(
            again.iter().all(|f| f.done()),
            "resubmitted futures are done at once"
        );
        assert_eq!(fs[7].key(), again[7].key());
        assert_eq!(
            client.gather(&again).unwrap(),
            (1..=50).collect::<Vec<i64>>()
        );
        assert_eq!(count(counter as u64), ran, "resubmission ran tasks");
        // Impure work opts out of sharing.
        let a = client
            .submit(delayed!(counted(counter as u64, 0)).unique())
            .unwrap();
        a.result().unwrap();
        assert_eq!(count(counter as u64), ran + 1);
    }
}

#[test]
fn futures_a_finished_graph_took_are_released_when_dropped() {
    // The executor lets go of a run's graph before its last output wakes
    // the caller: dropping the futures the graph took as arguments releases
    // their results at once, on every executor (on `threads`, 30 to 97 % of
    // rounds still held them, for a while, before this was so).
    for client in clients() {
        for i in 0..100 {
            let a = client.submit(delayed!(inc(i))).unwrap();
            let b = client.submit(delayed!(inc(i + 1))).unwrap();
            let c = client.submit(delayed!(add(&a, &b))).unwrap();
            assert_eq!(c.result().unwrap(), 2 * i + 3);
            drop((a, b));
            assert_eq!(
                client.stats().keys_held,
                1,
                "{}: round {i} still holds the arguments",
                client.executor()
            );
        }
    }
}

#[test]
fn dropping_the_last_future_releases_the_result() {
    for client in clients() {
        let fs = client.map(inc, 0..10).unwrap();
        client.gather(&fs).unwrap();
        assert_eq!(client.stats().keys_held, 10);
        let keep = fs[3].clone();
        drop(fs);
        assert_eq!(client.stats().keys_held, 1, "a clone keeps its key");
        let persisted = client.persist(&delayed!(inc(100))).unwrap();
        assert_eq!(client.stats().keys_held, 2);
        assert_eq!(delayed!(add(&persisted, 1)).compute().unwrap(), 102);
        drop(keep);
        drop(persisted);
        assert_eq!(client.stats().keys_held, 0);
    }
}

#[test]
fn as_completed_with_added_work() {
    for client in clients() {
        let mut seq = as_completed(client.map(inc, 0..10).unwrap());
        let mut results = Vec::new();
        let mut added = 0;
        while let Some(done) = seq.next() {
            let v = done.result().unwrap();
            results.push(v);
            if added < 20 {
                added += 1;
                seq.add(client.submit(delayed!(add(v, 1000))).unwrap());
            }
        }
        assert_eq!(results.len(), 30);
        assert_eq!(results.iter().filter(|&&v| v >= 1000).count(), 20);
    }
}

#[test]
fn as_completed_yields_in_completion_order() {
    let client = Client::threads(2).unwrap();
    let (g1, g2) = (new_id(), new_id());
    let slow = client.submit(delayed!(gated(g1, 1))).unwrap();
    let fast = client.submit(delayed!(gated(g2, 2))).unwrap();
    let mut seq = as_completed(vec![slow.clone(), fast.clone()]).with_results();
    open(g2);
    let (first, r) = seq.next().unwrap();
    assert_eq!((first.key(), r.unwrap()), (fast.key(), 2));
    open(g1);
    let (second, r) = seq.next().unwrap();
    assert_eq!((second.key(), r.unwrap()), (slow.key(), 1));
    assert!(seq.next().is_none());
}

#[test]
fn wait_first_completed_and_all() {
    let client = Client::threads(2).unwrap();
    let (g1, g2) = (new_id(), new_id());
    let fs = vec![
        client.submit(delayed!(gated(g1, 1))).unwrap(),
        client.submit(delayed!(gated(g2, 2))).unwrap(),
    ];
    open(g2);
    let done = wait_first(&fs);
    assert_eq!(done.done.len(), 1);
    assert_eq!(done.done[0].key(), fs[1].key());
    assert_eq!(done.not_done.len(), 1);
    assert!(rask::wait_timeout(&fs, std::time::Duration::from_millis(1)).is_err());
    open(g1);
    wait(&fs);
    assert!(fs.iter().all(|f| f.done()));
}

#[test]
fn cancel_a_pending_future() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let f = client.submit(delayed!(gated(gate, 1))).unwrap();
    let dependent = client.submit(delayed!(inc(&f))).unwrap();
    f.cancel();
    assert_eq!(f.status(), Status::Cancelled);
    assert!(matches!(f.result(), Err(Error::Cancelled { .. })));
    assert!(matches!(f.exception(), Some(Error::Cancelled { .. })));
    assert!(matches!(dependent.result(), Err(Error::Cancelled { .. })));
    open(gate);
    // Resubmitting cancelled work computes it again.
    let again = client.submit(delayed!(gated(gate, 1))).unwrap();
    assert_eq!(again.result().unwrap(), 1);
}

/// Work submitted on a cancelled future fails at once as cancelled, on
/// every executor, and the cancelled task's value never reaches it (it used
/// to on a cluster, from the task still running there).
#[test]
fn work_on_a_cancelled_future_fails_at_once() {
    for client in clients().into_iter().skip(1) {
        let gate = new_id();
        let f = client.submit(delayed!(gated(gate, 10))).unwrap();
        f.cancel();
        let g = client.submit(delayed!(inc(&f))).unwrap();
        // Before the gate opens: it must not wait for the cancelled task.
        rask::wait_timeout(std::slice::from_ref(&g), std::time::Duration::from_secs(10))
            .expect("work on a cancelled future is answered at once");
        match g.result() {
            Err(Error::Cancelled { key }) => assert_eq!(key, f.key(), "{:?}", client.executor()),
            other => panic!("{:?}: {other:?}", client.executor()),
        }
        assert_eq!(g.status(), Status::Cancelled);
        // Also through a graph built on the future and computed plainly.
        let plain =
            delayed!(add(&f, 1)).compute_with(&rask::Config::new().executor(client.executor()));
        assert!(matches!(plain, Err(Error::Cancelled { .. })), "{plain:?}");
        open(gate);
        assert!(matches!(g.result(), Err(Error::Cancelled { .. })));
        // Resubmitted, the same work computes again.
        assert_eq!(
            client
                .submit(delayed!(gated(gate, 10)))
                .unwrap()
                .result()
                .unwrap(),
            10
        );
    }
    // The synchronous client finished the work inside `submit`: cancel does
    // nothing to it, and dependents use its value.
    let client = Client::synchronous().unwrap();
    let f = client.submit(delayed!(inc(1))).unwrap();
    f.cancel();
    assert_eq!(f.status(), Status::Finished);
    assert_eq!(
        client.submit(delayed!(inc(&f))).unwrap().result().unwrap(),
        3
    );
}

/// A graph that reaches a cancelled key through its own work, never
/// through the cancelled future, computes that work: the cancellation
/// belongs to the future. It failed as cancelled, naming the key.
#[test]
fn a_graph_that_never_took_a_cancelled_future_computes_its_key() {
    for client in clients().into_iter().skip(1) {
        let gate = new_id();
        let f = client.submit(delayed!(gated(gate, 5))).unwrap();
        f.cancel();
        // The same work as `f`, as a `Delayed` below the root.
        let g = client
            .submit(delayed!(inc(delayed!(gated(gate, 5)))))
            .unwrap();
        open(gate);
        match g.result_timeout(std::time::Duration::from_secs(30)) {
            Ok(v) => assert_eq!(v, 6, "{}", client.executor()),
            Err(e) => panic!("{}: {e:?}", client.executor()),
        }
        assert_eq!(f.status(), Status::Cancelled);
    }
}

/// Work submitted on a pending future that is cancelled afterwards fails
/// as cancelled, naming it, on every executor. On a cluster, which was
/// told of the future by key, it got the value the cancelled future's task
/// went on to compute there for it.
#[test]
fn work_on_a_future_cancelled_after_it_was_submitted_fails_as_cancelled() {
    work_on_a_cancelled_future_fails_as_cancelled(false);
}

/// The same, with the cancelled work submitted again before the work on it
/// is recorded: the cancellation still fails that work, on every executor
/// (on a cluster it used to be recorded `Ok`, with the value computed
/// there, while the threads failed it as cancelled: the cancellation was
/// looked for only in the future's state at recording time, which the new
/// submission had made pending again). The work submitted again computes.
#[test]
fn work_on_a_cancelled_future_stays_cancelled_when_the_future_is_resubmitted() {
    work_on_a_cancelled_future_fails_as_cancelled(true);
}

/// On every executor but the synchronous one (which finishes work inside
/// `submit`): `inc(f)` submitted on a pending `f`, then `f` cancelled (and
/// with `resubmit`, its work submitted again) before its task ends.
fn work_on_a_cancelled_future_fails_as_cancelled(resubmit: bool) {
    for client in clients().into_iter().skip(1) {
        let gate = new_id();
        let f = client.submit(delayed!(gated(gate, 10))).unwrap();
        let h = client.submit(delayed!(inc(&f))).unwrap();
        f.cancel();
        let again = resubmit.then(|| client.submit(delayed!(gated(gate, 10))).unwrap());
        open(gate);
        match h.result_timeout(std::time::Duration::from_secs(30)) {
            Err(Error::Cancelled { key }) => assert_eq!(key, f.key(), "{:?}", client.executor()),
            other => panic!("{:?}: {other:?}", client.executor()),
        }
        if let Some(again) = again {
            assert_eq!(again.key(), f.key());
            assert_eq!(again.result().unwrap(), 10, "{:?}", client.executor());
        }
    }
}

/// `scheduler_info` of a client in this process counts its futures by
/// state, as a scheduler counts tasks: work sent to the executor as
/// processing (and running on its threads), failed work as erred. Every
/// pending future counted as waiting, and no failure at all.
#[cfg(feature = "threaded")]
#[test]
fn scheduler_info_in_this_process_counts_running_and_failed_work() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let running = client.submit(delayed!(gated(gate, 1))).unwrap();
    let failed = client.submit(delayed!(fail_on(3)?)).unwrap();
    assert!(failed.result().is_err());
    let info = client.scheduler_info().unwrap();
    let t = &info.totals;
    assert_eq!((t.waiting, t.processing, t.erred, t.memory), (0, 1, 1, 0));
    assert_eq!(info.workers[0].running, 1);
    open(gate);
    assert_eq!(running.result().unwrap(), 1);
    let t = client.scheduler_info().unwrap().totals;
    assert_eq!((t.waiting, t.processing, t.erred, t.memory), (0, 0, 1, 1));
}

/// On a cluster, work on a cancelled future needs no worker: it fails in
/// the client, even while every worker thread is busy.
#[cfg(feature = "distributed")]
#[test]
fn work_on_a_cancelled_future_needs_no_worker() {
    let client = clients().pop().unwrap();
    let gate = new_id();
    // Two workers of two threads: four busy tasks fill them.
    let busy: Vec<_> = (0..4)
        .map(|i| client.submit(delayed!(gated(gate, i))).unwrap())
        .collect();
    let f = client.submit(delayed!(gated(gate, 100))).unwrap();
    f.cancel();
    let g = client.submit(delayed!(inc(&f))).unwrap();
    rask::wait_timeout(std::slice::from_ref(&g), std::time::Duration::from_secs(10))
        .expect("answered with every worker busy");
    assert!(matches!(g.result(), Err(Error::Cancelled { key }) if key == f.key()));
    open(gate);
    assert_eq!(client.gather(&busy).unwrap(), vec![0, 1, 2, 3]);
}

/// Two clients of one cluster that wrap other data under one name each get
/// a result over their own: the scheduler shares work by key, and a name
/// used to be a wrapped value's key, so the second client was handed the
/// first one's result over the first one's data.
#[cfg(feature = "distributed")]
#[test]
fn clients_of_one_cluster_keep_their_own_data_under_one_name() {
    let first = clients().pop().unwrap();
    let second = clients().pop().unwrap();
    let gate = new_id();
    // Pending on the cluster while the second client sends its own.
    let over = |i: i64| {
        delayed!(add(
            rask::value_named("shared-config", i),
            delayed!(gated(gate, 0))
        ))
    };
    let a = first.compute(&over(1)).unwrap();
    let b = second.compute(&over(2)).unwrap();
    open(gate);
    assert_eq!(a.result().unwrap(), 1);
    assert_eq!(b.result().unwrap(), 2);
}

/// A running task sees `rask::cancelled()` once its future is cancelled.
#[test]
fn a_running_task_sees_its_cancellation() {
    for client in background_clients() {
        let id = new_id();
        let f = client.submit(delayed!(until_cancelled(id))).unwrap();
        eventually("the task started", || started(id));
        f.cancel();
        eventually("the task saw the cancellation", || saw_cancel(id));
    }
}

/// Returns at once for `id` 0; runs until cancelled for any other
/// (`until_cancelled`).
fn at_once_or_until_cancelled(id: u64) -> i64 {
    if id == 0 {
        0
    } else {
        until_cancelled(id)
    }
}

/// The rest of a `map` stops once its outputs not finished are cancelled or
/// dropped, whatever finished before: a finished output counted as wanted
/// for ever, so the task of a cancelled one ran on and held a pool thread.
#[test]
fn the_rest_of_a_map_stops_once_its_finished_outputs_are_done() {
    for client in background_clients() {
        for drop_them in [false, true] {
            let id = new_id();
            let fs = client.map(at_once_or_until_cancelled, vec![0, id]).unwrap();
            assert_eq!(fs[0].result().unwrap(), 0);
            eventually("the task started", || started(id));
            if drop_them {
                drop(fs);
            } else {
                fs[1].cancel();
            }
            eventually("the task saw the cancellation", || saw_cancel(id));
        }
    }
}

/// A task past its timeout fails as timed out, and the rest goes on.
#[test]
fn timeouts_fail_the_task_and_spare_the_rest() {
    for client in clients().into_iter().skip(1) {
        let gate = new_id();
        let hung = delayed!(sleepy(gate, 1)).timeout(std::time::Duration::from_millis(50));
        let hung = client.submit(hung).unwrap();
        let after = client.submit(delayed!(inc(&hung))).unwrap();
        let others = client.map(inc, 0..8).unwrap();
        match after.result() {
            Err(Error::Timeout {
                task: Some(task),
                after,
            }) => {
                assert_eq!(task, hung.key());
                assert_eq!(after, std::time::Duration::from_millis(50));
            }
            other => panic!("{:?}: {other:?}", client.executor()),
        }
        assert_eq!(
            client.gather(&others).unwrap(),
            (1..9).collect::<Vec<i64>>()
        );
        // The hung task's thread was abandoned, not waited for.
        assert_eq!(client.map(inc, 10..14).unwrap().len(), 4);
        open(gate);
        // A timed task that finishes in time gives its value.
        let quick = delayed!(inc(41)).timeout(std::time::Duration::from_secs(60));
        assert_eq!(client.submit(quick).unwrap().result().unwrap(), 42);
    }
    // On the synchronous executor too.
    let quick = delayed!(inc(1)).timeout(std::time::Duration::from_secs(60));
    assert_eq!(quick.compute_with(&rask::Config::synchronous()).unwrap(), 2);
    let gate = new_id();
    let hung = delayed!(sleepy(gate, 1)).timeout(std::time::Duration::from_millis(20));
    let err = hung.compute_with(&rask::Config::synchronous()).unwrap_err();
    assert!(matches!(err, Error::Timeout { task: Some(_), .. }), "{err}");
    open(gate);
}

/// A task with retries runs again when it fails; a failure after every
/// attempt says how many there were; `Client::retry` runs failed work again.
#[test]
fn retries_and_retry() {
    for client in clients() {
        let id = new_id();
        let f = client.submit(delayed!(flaky(id, 2)?).retries(2)).unwrap();
        assert_eq!(f.result().unwrap(), id as i64);
        assert_eq!(count(id), 3);

        let id = new_id();
        let f = client.submit(delayed!(flaky(id, 5)?).retries(1)).unwrap();
        match f.result() {
            Err(Error::Task {
                attempts, message, ..
            }) => {
                assert_eq!(attempts, 2, "{:?}", client.executor());
                assert_eq!(message, "attempt 2 failed");
            }
            other => panic!("{:?}: {other:?}", client.executor()),
        }
        assert!(f
            .result()
            .unwrap_err()
            .to_string()
            .contains("after 2 attempts"));
        // Run again by hand: attempts 3 and 4 fail; then 5 fails and 6,
        // past the failures, gives the value.
        client.retry(&f).unwrap();
        assert!(f.result().is_err());
        assert_eq!(count(id), 4);
        client.retry(&f).unwrap();
        assert_eq!(f.result().unwrap(), id as i64);
        assert_eq!(count(id), 6);
        // A finished future is left alone.
        client.retry(&f).unwrap();
        assert_eq!(f.result().unwrap(), id as i64);
        assert_eq!(count(id), 6);
    }
}

/// Two clients of one thread share its pool. A graph of the first takes a
/// failed future of the second, whose work then runs again (`retry`)
/// behind the graph's task in the pool: the task uses the failure it
/// saw, never waits in the pool's only thread for the retried run (which
/// needs that thread). It waited for good before (`futures::client` rule
/// 3).
#[test]
fn a_graph_on_another_clients_future_never_waits_in_a_pool_thread() {
    let (a, b) = (Client::threads(1).unwrap(), Client::threads(1).unwrap());
    let failed = b.submit(delayed!(fail_on(3)?)).unwrap();
    assert!(failed.result().is_err());
    let gate = new_id();
    let busy = a.submit(delayed!(gated(gate, 1))).unwrap();
    let uses = a.submit(delayed!(add(&failed, 1))).unwrap();
    b.retry(&failed).unwrap();
    open(gate);
    assert_eq!(busy.result().unwrap(), 1);
    let err = uses
        .result_timeout(std::time::Duration::from_secs(20))
        .unwrap_err();
    assert!(format!("{err:#}").contains("no threes"), "{err:#}");
    assert!(failed.result().is_err(), "the retried run ends too");
}

/// Futures dropped while `as_completed` (or `wait_first`) tracked them
/// are released as any dropped future is: the iterator, once dropped,
/// keeps none alive. Before, each stayed held until its work ended.
#[test]
fn futures_dropped_after_as_completed_or_wait_first_are_released() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let fast = client.submit(delayed!(inc(1))).unwrap();
    let slow = client.submit(delayed!(gated(gate, 5))).unwrap();
    let first = wait_first(&[fast.clone(), slow.clone()]);
    assert_eq!(first.done.len(), 1);
    drop((first, slow));
    eventually("the slow future's key released", || {
        client.stats().keys_held == 1
    });
    // Its task, which does not look at its cancellation, gives its
    // thread back.
    open(gate);
    let (gates, futures) = gated_futures(&client, 3);
    let mut seq = as_completed(futures);
    open(gates[1]);
    assert_eq!(seq.next().unwrap().result().unwrap(), 1);
    drop(seq);
    eventually("the futures left in as_completed released", || {
        client.stats().keys_held == 1
    });
    for gate in [gates[0], gates[2]] {
        open(gate);
    }
    assert_eq!(fast.result().unwrap(), 2);
}

/// `as_completed` over futures of two simulated clients runs the work of
/// both: it ran only the first one's, then waited for good.
#[test]
fn as_completed_runs_the_work_of_every_simulated_client() {
    let (a, b) = (
        Client::with_config(&rask::Config::simulated(1)).unwrap(),
        Client::with_config(&rask::Config::simulated(2)).unwrap(),
    );
    let futures = vec![
        a.submit(delayed!(inc(1))).unwrap(),
        b.submit(delayed!(inc(2))).unwrap(),
        b.submit(delayed!(inc(3))).unwrap(),
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let got: Vec<i64> = as_completed(futures).map(|f| f.result().unwrap()).collect();
        let _ = tx.send(got);
    });
    let mut got = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("as_completed waited for work nobody ran");
    got.sort();
    assert_eq!(got, vec![2, 3, 4]);
}

/// `bar.wait()` on a thread of its own, given 20 s to return: `Err` if
/// it did not (the display waited for something that never came).
fn display_waited(bar: &rask::Progress) -> Result<(), std::sync::mpsc::RecvTimeoutError> {
    let waiting = bar.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        waiting.wait();
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
}

/// Waits (bounded) until `done` holds.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn fire_and_forget_runs_the_work_to_the_end_then_releases_it() {
    for client in clients()
        .into_iter()
        .filter(|c| !matches!(c.executor(), rask::ExecutorKind::Simulated(_)))
    {
        let counter = new_id();
        let gate = new_id();
        // The synchronous executor runs the work inside `submit`.
        let sync = client.executor() == rask::ExecutorKind::Synchronous;
        if sync {
            open(gate);
        }
        let gated_input = client.submit(delayed!(gated(gate, 1))).unwrap();
        // No handle is kept; the task still runs once its input is ready.
        rask::fire_and_forget(
            client
                .submit(delayed!(counted(counter, &gated_input)))
                .unwrap(),
        );
        drop(gated_input);
        if !sync {
            assert_eq!(count(counter), 0);
            open(gate);
        }
        eventually("the forgotten task ran", || count(counter) == 1);
        eventually("its result was released", || client.stats().keys_held == 0);
    }
}

/// Two closures mapped in one function are two functions: their results
/// never mix (they used to share a key and return the first one's values).
#[test]
fn map_with_two_closures_keeps_them_apart() {
    for client in [Client::synchronous().unwrap(), Client::threads(2).unwrap()] {
        let plus = client.map(|x: i64| x + 1, 0..3).unwrap();
        let times = client.map(|x: i64| x * 10, 0..3).unwrap();
        assert_eq!(client.gather(&plus).unwrap(), vec![1, 2, 3]);
        assert_eq!(client.gather(&times).unwrap(), vec![0, 10, 20]);
        let k = 100_i64;
        let shifted = client.map(move |x: i64| x + k, 0..3).unwrap();
        assert_eq!(client.gather(&shifted).unwrap(), vec![100, 101, 102]);
    }
}

#[test]
fn errors_reach_futures_and_gather() {
    for client in clients() {
        let bad = client.submit(delayed!(fail_on(3)?)).unwrap();
        let after = client.submit(delayed!(inc(&bad))).unwrap();
        let err = after.result().unwrap_err();
        match &err {
            Error::Task { key, message, .. } => {
                assert_eq!(key, &bad.key());
                assert_eq!(message, "no threes (3)");
            }
            other => panic!("{other}"),
        }
        assert_eq!(bad.status(), Status::Error);
        assert!(bad.exception().is_some());
        let good = client.submit(delayed!(fail_on(1)?)).unwrap();
        let err = client.gather(&[good, bad.clone()]).unwrap_err();
        assert!(matches!(err, Error::Gather { index: 1, .. }), "{err}");
    }
}

#[test]
fn scatter_and_compute_through_the_client() {
    for client in clients() {
        let data = client.scatter((0..1000u64).collect::<Vec<_>>()).unwrap();
        assert!(data.done());
        let t = client.submit(delayed!(total(&data))).unwrap();
        assert_eq!(t.result().unwrap(), 499_500);
        let graph: Delayed<i64> = delayed!(add(&delayed!(inc(1)), &delayed!(inc(2))));
        let fut = client.compute(&graph).unwrap();
        assert_eq!(fut.key(), graph.key());
        assert_eq!(fut.result().unwrap(), 5);
    }
}

/// Polls `fut` on this thread, parking it between polls.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[test]
fn futures_can_be_awaited() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let f = client.submit(delayed!(gated(gate, 40))).unwrap();
    let g = f.clone();
    let opener = std::thread::spawn(move || open(gate));
    let v = block_on(async move { g.await.unwrap() + 2 });
    opener.join().unwrap();
    assert_eq!(v, 42);
    assert_eq!(f.result().unwrap(), 40);
}

/// The clients a task of `nested` submits to: a simulated one and a pool.
fn inner_clients() -> &'static [Client; 2] {
    static INNER: std::sync::OnceLock<[Client; 2]> = std::sync::OnceLock::new();
    INNER.get_or_init(|| [Client::simulated(3).unwrap(), Client::threads(1).unwrap()])
}

/// Submits `inc(x)` to inner client `which` and waits for it `how`:
/// `result()`, `.await`, `as_completed` or `wait`.
fn nested(which: u64, how: u64, x: i64) -> i64 {
    let f = inner_clients()[which as usize]
        .submit(delayed!(inc(x)))
        .unwrap();
    match how {
        0 => f.result().unwrap(),
        1 => block_on(f).unwrap(),
        2 => as_completed(vec![f]).next().unwrap().result().unwrap(),
        _ => {
            wait(std::slice::from_ref(&f));
            f.result().unwrap()
        }
    }
}

/// A task of a synchronous client that waits for another client's future
/// gets its value, however it waits: the work it submitted is queued on
/// its thread until the outer submission is done, and a simulated
/// client's wait stepped its executor before handing that work over, then
/// slept for good; an `.await` never handed it over, on any client.
#[test]
fn a_task_of_a_synchronous_client_waits_for_another_clients_future() {
    for (which, how) in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1)] {
        let x = 10 * which as i64 + how as i64;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outer = Client::synchronous().unwrap();
            let got = outer
                .submit(delayed!(nested(which, how, x)))
                .and_then(|f| f.result());
            let _ = tx.send(got);
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("client {which}, wait {how}: never finished"));
        assert_eq!(got.unwrap(), x + 1, "client {which}, wait {how}");
    }
}

#[test]
fn a_chain_of_submits_does_not_recurse() {
    for client in clients() {
        // A cluster pays a round trip per link: a shorter chain proves the same.
        let n = if matches!(client.executor(), rask::ExecutorKind::Tcp(_)) {
            2_000
        } else {
            20_000
        };
        let mut f = client.submit(delayed!(inc(0))).unwrap();
        for _ in 1..n {
            f = client.submit(delayed!(inc(&f))).unwrap();
        }
        assert_eq!(f.result().unwrap(), n);
    }
}

/// A progress display counts every task behind the futures, inputs
/// included, per function, and finishes when they are done: each task the
/// executor runs, as `compute`'s display does. Unoptimized, a task per
/// node; optimized, a fused chain is one task, named after its steps, and
/// when one of its steps fails it counts as erred, never as done.
#[test]
fn progress_counts_the_tasks_behind_futures() {
    let by_name =
        |counts: Vec<rask::progress::FunctionProgress>| -> HashMap<String, (u64, u64, u64)> {
            counts
                .into_iter()
                .map(|c| (c.name.clone(), (c.total, c.done, c.erred)))
                .collect()
        };
    for optimize in [false, true] {
        let client = Client::with_config(&rask::Config::threads(2).optimize(optimize)).unwrap();
        let gate = new_id();
        let parts: Vec<Delayed<i64>> = (0..10).map(|i| delayed!(gated(gate, i))).collect();
        let bad = delayed!(refuse(gate)?);
        let sum = delayed!(add(delayed!(total_of(&parts)), 1));
        let good = client.submit(&sum).unwrap();
        let failing = client.submit(delayed!(add(&bad, 1))).unwrap();
        let bar = rask::progress(&[good.clone(), failing.clone()]);
        assert!(!bar.done(), "returns before the work is done");
        let before = by_name(bar.counts());
        assert_eq!(before["gated"], (10, 0, 0));
        let (sum_task, failing_task) = if optimize {
            // `total_of` is `add`'s only input once the literal is folded in.
            ("total_of+add", "refuse+add")
        } else {
            assert_eq!(before["refuse"].0, 1);
            ("total_of", "add")
        };
        assert_eq!(before[sum_task].0, 1, "{before:?}");
        assert_eq!(
            before[failing_task].0,
            if optimize { 1 } else { 2 },
            "{before:?}"
        );
        open(gate);
        bar.wait();
        assert!(good.done() && failing.done());
        let after = bar.counts();
        for c in &after {
            assert_eq!(c.done + c.erred, c.total, "{c:?}");
        }
        let after = by_name(after);
        let erred: u64 = after.values().map(|c| c.2).sum();
        if optimize {
            assert_eq!(after["refuse+add"], (1, 0, 1), "{after:?}");
            assert_eq!(erred, 1, "{after:?}");
        } else {
            assert_eq!(after["refuse"], (1, 0, 1), "{after:?}");
            assert_eq!(
                erred, 2,
                "refuse, and the `add` that needs it, erred: {after:?}"
            );
        }
        assert_eq!(good.result().unwrap(), 46);
    }
}

/// A graph that waits for another future has no plan yet when a progress
/// display starts: the display counts its nodes, and the run it gets later
/// keeps each of them a task of its own, so that a step failing inside
/// what would have been one fused task still counts as erred.
#[test]
fn progress_counts_a_waiting_graph_node_by_node() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let x = client.submit(delayed!(gated(gate, 1))).unwrap();
    // add(x, 2) = 3, which `fail_on` refuses; `inc` then does not run.
    let chain = delayed!(inc(delayed!(fail_on(delayed!(add(&x, 2)))?)));
    let failing = client.submit(&chain).unwrap();
    let bar = rask::progress(&failing);
    let before: Vec<(String, u64)> = bar
        .counts()
        .into_iter()
        .map(|c| (c.name, c.total))
        .collect();
    assert_eq!(
        before,
        [("inc", 1), ("fail_on", 1), ("add", 1), ("gated", 1)].map(|(n, t)| (n.to_owned(), t)),
    );
    open(gate);
    bar.wait();
    assert!(failing.result().is_err());
    let after: HashMap<String, (u64, u64)> = bar
        .counts()
        .into_iter()
        .map(|c| (c.name, (c.done, c.erred)))
        .collect();
    assert_eq!(after["gated"], (1, 0));
    assert_eq!(after["add"], (1, 0));
    assert_eq!(after["fail_on"], (0, 1), "the failed step counts as erred");
    assert_eq!(after["inc"], (0, 1));
}

/// A node a finished future stands for, moved into a new graph as the
/// only input of a chain, is not computed again: the client uses the
/// future's value. (The node's `Arc` is the new graph's alone by then,
/// which is what chain absorption looks for.)
#[test]
fn a_node_a_finished_future_holds_is_not_computed_again() {
    for client in [Client::synchronous().unwrap(), Client::threads(2).unwrap()] {
        let counter = new_id();
        let x = delayed!(counted(counter, 1));
        let held = client.submit(&x).unwrap();
        assert_eq!(held.result().unwrap(), 2);
        assert_eq!(count(counter), 1);
        let top = delayed!(inc(delayed!(inc(x))));
        assert_eq!(client.submit(&top).unwrap().result().unwrap(), 4);
        assert_eq!(count(counter), 1, "the held node ran again");
        // The same through `compute`, on a node with no future at all: it runs.
        let y = delayed!(counted(counter, 10));
        let top = delayed!(inc(delayed!(inc(y))));
        assert_eq!(client.compute(&top).unwrap().result().unwrap(), 13);
        assert_eq!(count(counter), 2);
    }
}

/// Results through the client equal `sync`'s on random graphs, several
/// roots per submission, unoptimized and optimized.
#[test]
fn random_graphs_through_the_client_agree_with_sync() {
    let clients = [
        Client::threads(2).unwrap(),
        Client::with_config(&rask::Config::threads(2).optimize(false)).unwrap(),
        Client::synchronous().unwrap(),
    ];
    let mut runner = support::runner(48);
    runner
        .run(&support::dag(40, 0.05), |specs| {
            for client in &clients {
                support::client_agrees_with_eval(client, &specs, support::run_id(), 3)?;
            }
            Ok(())
        })
        .unwrap();
}

/// Gates whose `refuse_when_open` task has started.
static REFUSING: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Says it started, then fails once gate `id` opens.
fn refuse_when_open(id: u64) -> Result<i64, String> {
    REFUSING.lock().unwrap().push(id);
    refuse(id)
}

/// A task already running when someone starts listening to task events
/// still reports its failure: a progress display started meanwhile must not
/// count it as done. (Other tests of this binary may listen at the same
/// time; alone, this one failed before the fix.)
#[test]
fn a_task_running_before_anyone_listened_reports_its_failure() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let bad = delayed!(refuse_when_open(gate)?);
    let key = bad.key().key();
    let failing = client.submit(&bad).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !REFUSING.lock().unwrap().contains(&gate) {
        assert!(
            std::time::Instant::now() < deadline,
            "the task never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let erred = Arc::new(AtomicU64::new(0));
    let sink = erred.clone();
    let subscription = rask::events::subscribe(move |e: &rask::events::Event<'_>| {
        if e.key == key && matches!(e.kind, rask::events::EventKind::Erred { .. }) {
            sink.fetch_add(1, Ordering::Relaxed);
        }
    });
    open(gate);
    assert!(failing.result().is_err());
    // The event is emitted before the future learns the outcome.
    drop(subscription);
    assert_eq!(erred.load(Ordering::Relaxed), 1);
}

/// Futures already done give a display that is done at once, with nothing
/// to count.
#[test]
fn progress_of_finished_futures_is_done_at_once() {
    let client = Client::synchronous().unwrap();
    let f = client.submit(delayed!(inc(new_id() as i64))).unwrap();
    let bar = rask::progress(&f);
    assert!(bar.done());
    assert!(bar.counts().is_empty());
}

/// On a simulated client nothing runs unless someone waits: the
/// display's `wait` runs the work it watches (it slept for good, never
/// done, until `result()` ran the work).
#[test]
fn progress_wait_runs_a_simulated_client() {
    let client = Client::simulated(1).unwrap();
    let futures = client.map(inc, 0..5).unwrap();
    let bar = rask::progress(&futures);
    display_waited(&bar).expect("the display waited for work nobody ran");
    for c in bar.counts() {
        assert_eq!((c.done, c.erred), (c.total, 0), "{c:?}");
    }
    let got: Vec<i64> = futures.iter().map(|f| f.result().unwrap()).collect();
    assert_eq!(got, [1, 2, 3, 4, 5]);
}

/// Futures cancelled before their work ran: the display counts that work
/// as not run, never as done (every task it had not heard of counted as
/// done, so 5 cancelled futures read 5 of 5 done).
#[test]
fn progress_of_cancelled_futures_counts_their_work_as_not_run() {
    let client = Client::threads(1).unwrap();
    let (gates, futures) = gated_futures(&client, 5);
    let bar = rask::progress(&futures);
    for f in &futures {
        f.cancel();
    }
    let waited = display_waited(&bar);
    for gate in gates {
        open(gate);
    }
    waited.expect("the display of cancelled futures never finished");
    let counts = bar.counts();
    let total: u64 = counts.iter().map(|c| c.total).sum();
    let done: u64 = counts.iter().map(|c| c.done).sum();
    let not_run: u64 = counts.iter().map(|c| c.not_run).sum();
    assert_eq!(total, 5, "{counts:?}");
    assert_eq!(done, 0, "nothing ran to the end: {counts:?}");
    assert!(not_run >= 4, "{counts:?}");
}

/// What each gate's `stoppable` call saw so far: `false` once it
/// started, `true` once its work was given up.
static STOPPABLE: Mutex<Option<HashMap<u64, bool>>> = Mutex::new(None);

fn stoppable_saw(gate: u64) -> Option<bool> {
    STOPPABLE
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&gate)
        .copied()
}

fn gate_is_open(gate: u64) -> bool {
    GATES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&gate)
        .copied()
        .unwrap_or(false)
}

/// Returns 1 once gate `gate` opens. Given up first, it notes so and
/// returns once the gate opens, a value dropped as cancelled (at most 30 s
/// either way).
fn stoppable(gate: u64) -> i64 {
    let note = |saw| {
        STOPPABLE
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(gate, saw);
    };
    note(false);
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        if rask::cancelled() {
            note(true);
            gated(gate, 0);
            return 0;
        }
        if gate_is_open(gate) {
            return 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    0
}

/// A future cancelled while its task ran, then submitted again (the same
/// key): a display of the new future counts the new run's task, not the
/// cancelled run's (it counted the old run's cancellation as an error of
/// the new run, which succeeded: 1 erred, 0 done).
#[test]
fn progress_counts_only_its_own_runs_of_a_resubmitted_key() {
    // One thread: the cancelled run's task ends before the new run's starts.
    let client = Client::threads(1).unwrap();
    let gate = new_id();
    let work = delayed!(stoppable(gate));
    let old = client.submit(&work).unwrap();
    eventually("the first run started", || stoppable_saw(gate).is_some());
    old.cancel();
    eventually("the first run saw it was given up", || {
        stoppable_saw(gate) == Some(true)
    });
    let new = client.submit(&work).unwrap();
    let bar = rask::progress(&new);
    open(gate);
    assert_eq!(new.result().unwrap(), 1);
    display_waited(&bar).expect("the display never finished");
    let counts = bar.counts();
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(
        (
            counts[0].total,
            counts[0].done,
            counts[0].erred,
            counts[0].not_run
        ),
        (1, 1, 0, 0),
        "{counts:?}"
    );
}

/// Tasks of `ran_before` that started, by gate.
static RAN_BEFORE: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Notes that it started, then returns 2 once gate `gate` opens.
fn ran_before(gate: u64) -> i64 {
    RAN_BEFORE.lock().unwrap().push(gate);
    gated(gate, 2)
}

/// A task of a failing future's graph that was already running when the
/// display started, and then succeeded, counts as done: it reports its
/// `Finished` to whoever listens when it ends (it counted as not run, as
/// it reported nothing). (Other tests of this binary may listen at the
/// same time; alone, this one failed before the fix.)
#[test]
fn progress_counts_a_task_running_before_it_started_that_succeeded() {
    let client = Client::threads(2).unwrap();
    let (before, failure) = (new_id(), new_id());
    let failing = client
        .submit(delayed!(add(
            delayed!(ran_before(before)),
            delayed!(refuse(failure)?)
        )))
        .unwrap();
    eventually("the task started", || {
        RAN_BEFORE.lock().unwrap().contains(&before)
    });
    let bar = rask::progress(&failing);
    open(before);
    open(failure);
    assert!(failing.result().is_err());
    display_waited(&bar).expect("the display never finished");
    let counts: HashMap<String, (u64, u64, u64)> = bar
        .counts()
        .into_iter()
        .map(|c| (c.name, (c.done, c.erred, c.not_run)))
        .collect();
    assert_eq!(counts["ran_before"], (1, 0, 0), "{counts:?}");
    assert_eq!(counts["refuse"], (0, 1, 0), "{counts:?}");
    assert_eq!(counts["add"], (0, 1, 0), "{counts:?}");
}

fn total_of(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Fails once gate `id` opens: after the progress display that counts it
/// started (one that starts after a task ended cannot hear how it ended).
fn refuse(id: u64) -> Result<i64, String> {
    gated(id, 0);
    Err(format!("refused {id}"))
}

// The futures API of #16 (`tests/support/futures_api.rs`) on every client;
// `tests/distributed.rs` runs it on `local:2`.

#[test]
fn map_over_several_iterables() {
    for client in clients() {
        futures_api::map_over_several_iterables(&client);
    }
}

#[test]
fn as_completed_is_a_stream() {
    for client in clients() {
        futures_api::as_completed_is_a_stream(&client);
    }
}

#[test]
fn as_completed_in_batches() {
    for client in clients() {
        futures_api::as_completed_in_batches(&client);
    }
}

#[test]
fn futures_of_different_types() {
    for client in clients() {
        futures_api::futures_of_different_types(&client);
    }
}

/// A stream waiting for a running task is woken by its completion, not
/// polled in a loop.
#[test]
fn a_stream_sleeps_until_a_future_completes() {
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let seq = as_completed(vec![client.submit(delayed!(gated(gate, 5))).unwrap()]);
    let opener = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        open(gate);
    });
    let (done, polls) = futures_api::drain(seq);
    opener.join().unwrap();
    assert_eq!(done[0].result().unwrap(), 5);
    assert!(polls <= 3, "{polls} polls: pending, woken, then the end");
}

/// Batches gather what completed while the caller was busy.
#[test]
fn a_batch_holds_every_future_done_so_far() {
    let client = Client::threads(2).unwrap();
    let (g1, g2) = (new_id(), new_id());
    let fs = vec![
        client.submit(delayed!(gated(g1, 1))).unwrap(),
        client.submit(delayed!(gated(g1, 2))).unwrap(),
        client.submit(delayed!(gated(g2, 3))).unwrap(),
    ];
    let mut seq = as_completed(fs.clone());
    // A completion reaches its sequences in the order they were made: once
    // this one saw both, `seq` holds both (`rask::wait` may return while a
    // completing thread has yet to tell `seq`).
    let probe = as_completed(fs[..2].to_vec());
    open(g1);
    assert_eq!(probe.count(), 2);
    let first = seq.next_batch().unwrap();
    assert_eq!(first.len(), 2);
    open(g2);
    assert_eq!(seq.next_batch().unwrap()[0].key(), fs[2].key());
    assert!(seq.next_batch().is_none());
}

#[test]
fn scatter_broadcast_reaches_every_worker() {
    for client in clients() {
        // The loopback cluster has two workers; the others are one process.
        let workers = if matches!(client.executor(), rask::ExecutorKind::Tcp(_)) {
            2
        } else {
            1
        };
        futures_api::scatter_broadcast(&client, workers);
        futures_api::small_broadcast_returns_at_once(&client);
    }
}

/// `gather` waits for its futures together (one wake-up when they end in
/// order) in any order they end, and stops at the first failure by
/// position without waiting for the futures after it.
#[test]
fn gather_waits_for_all_in_any_order_and_stops_at_a_failure() {
    for client in background_clients() {
        let (gates, futures) = gated_futures(&client, 6);
        let waiting = futures.clone();
        let gathering = {
            let client = client.clone();
            std::thread::spawn(move || client.gather(&waiting))
        };
        // The last first (the key the gather sleeps on), then from both
        // ends and the middle.
        for i in [5, 0, 3, 1, 4, 2] {
            open(gates[i]);
        }
        let got = gathering.join().unwrap().unwrap();
        assert_eq!(got, (0..6).collect::<Vec<i64>>(), "{}", client.executor());
        rask::wait(&futures);

        // A failure in the middle, while the gather sleeps, ends it while
        // the last future (the one it sleeps on) still runs. Were the
        // gather to wait for it, it would return only once the gate opens
        // below, 60 s from now, and the last future would be done.
        let (first, middle, last) = (new_id(), new_id(), new_id());
        let futures = [
            client.submit(delayed!(gated(first, 1))).unwrap(),
            client.submit(delayed!(refuse(middle)?)).unwrap(),
            client.submit(delayed!(gated(last, 2))).unwrap(),
        ];
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let opener = std::thread::spawn(move || {
            let _ = stopped.recv_timeout(std::time::Duration::from_secs(60));
            open(last);
        });
        let waiting = futures.clone();
        let gathering = {
            let client = client.clone();
            std::thread::spawn(move || client.gather(&waiting))
        };
        // Most often the gather is asleep by now; either way the result
        // is the same.
        std::thread::sleep(std::time::Duration::from_millis(20));
        open(first);
        open(middle);
        let err = gathering.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::Gather { index: 1, .. }), "{err}");
        assert!(!futures[2].done(), "{}", client.executor());
        // `wait` does not stop at the failure.
        drop(stop);
        rask::wait(&futures);
        assert!(futures.iter().all(|f| f.done()));
        assert_eq!(futures[2].result().unwrap(), 2);
        opener.join().unwrap();
    }
}

/// A map longer than one submission (4096 calls each): results in order,
/// and an item repeated in a later submission is the same future.
#[test]
fn a_long_map_keeps_order_and_shares_keys_across_its_submissions() {
    for client in clients() {
        let items: Vec<i64> = (0..10_000).map(|i| i % 6_000).collect();
        let futures = client.map(inc, items.clone()).unwrap();
        let want: Vec<i64> = items.iter().map(|i| i + 1).collect();
        assert_eq!(
            client.gather(&futures).unwrap(),
            want,
            "{}",
            client.executor()
        );
        assert_eq!(futures[7_000].key(), futures[1_000].key());
        assert_eq!(client.stats().keys_held, 6_000, "{}", client.executor());
    }
}

/// Not registered with the cluster: a graph using it cannot travel there.
fn unlisted(x: i64) -> i64 {
    x
}

/// A map whose last item cannot be sent to the cluster fails before any
/// of it is submitted, although its calls go out in parts: none of the
/// earlier calls runs.
#[cfg(feature = "distributed")]
#[test]
fn a_map_that_cannot_travel_submits_nothing() {
    let client = clients().pop().unwrap();
    let counter = new_id();
    let mut items: Vec<_> = (0..5_000).map(|i| delayed!(counted(counter, i))).collect();
    items.push(delayed!(unlisted(1)));
    let err = client.map(inc, items).unwrap_err();
    assert!(matches!(err, Error::Unsendable { .. }), "{err}");
    // Later work runs after what was submitted before it: had the first
    // part gone out, its calls would have run by the end of this one.
    let after = client.submit(delayed!(counted(new_id(), 1))).unwrap();
    assert_eq!(after.result().unwrap(), 2);
    assert_eq!(count(counter), 0);
}

/// Armed bombs dropped so far: each one's `Drop` panicked.
static BOMBS_DROPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A user's number whose `Drop` panics while it is armed (after counting
/// itself in [`BOMBS_DROPPED`]): the client and its executor must drop
/// it quietly wherever they let it go, never where the panic aborts the
/// process (a pool thread) or unwinds into their own bookkeeping. A clone
/// is disarmed, and so is a copy decoded on a cluster's worker: a task
/// that takes a `Bomb` by value drops its own copy harmlessly.
#[derive(serde::Serialize, serde::Deserialize)]
struct Bomb {
    n: i64,
    #[serde(skip)]
    armed: bool,
}

impl Bomb {
    fn armed(n: i64) -> Bomb {
        Bomb { n, armed: true }
    }
}

impl Clone for Bomb {
    fn clone(&self) -> Bomb {
        Bomb {
            n: self.n,
            armed: false,
        }
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.armed {
            BOMBS_DROPPED.fetch_add(1, Ordering::SeqCst);
            panic!("a Bomb of {} was dropped", self.n);
        }
    }
}

/// An armed `Bomb` of `n` once `gate` opens: a task's value that panics
/// when the client lets it go.
fn make_bomb(gate: u64, n: i64) -> Bomb {
    Bomb::armed(gated(gate, n))
}

/// A `Bomb`'s number. The task disarms its copy when it holds the last
/// reference: its own code drops it then, and would fail as panicked.
fn bomb_n(b: Arc<Bomb>) -> i64 {
    let n = b.n;
    if let Some(mut last) = Arc::into_inner(b) {
        last.armed = false;
    }
    n
}

/// A `Bomb` literal's number plus `x` and `y`.
fn bomb_plus(b: Bomb, x: i64, y: i64) -> i64 {
    b.n + x + y
}

/// Waits (bounded) until `n` armed bombs were dropped in all, on
/// whichever thread drops them.
fn bombs_dropped(n: usize) {
    eventually("the bombs were dropped", || {
        BOMBS_DROPPED.load(Ordering::SeqCst) >= n
    });
}

/// Calls of [`meet`] running now, by id.
static MEETING: Mutex<Option<HashMap<u64, usize>>> = Mutex::new(None);
static MET: Condvar = Condvar::new();

/// Returns `1` once `n` calls with `id` run at once (`0` if they did not
/// within 20 s). `_i` tells the calls apart (a key each).
fn meet(id: u64, n: usize, _i: usize) -> i64 {
    let mut meeting = MEETING.lock().unwrap();
    *meeting
        .get_or_insert_with(HashMap::new)
        .entry(id)
        .or_default() += 1;
    MET.notify_all();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while meeting.as_ref().and_then(|m| m.get(&id)).copied() < Some(n) {
        let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
            return 0;
        };
        meeting = MET.wait_timeout(meeting, left).unwrap().0;
    }
    1
}

/// Runs a task on each of the `threads` threads of `client`'s pool at
/// once: each of them took a task again after what it did before, so
/// none is unwinding from a panic (which aborts the process once it
/// leaves the thread's job). Without it, a test could pass while an
/// abort is under way.
fn every_pool_thread_runs(client: &Client, threads: usize) {
    let id = new_id();
    let calls: Vec<_> = (0..threads)
        .map(|i| client.submit(delayed!(meet(id, threads, i))).unwrap())
        .collect();
    assert_eq!(client.gather(&calls).unwrap(), vec![1; threads]);
}

/// Wakes nobody: it panics (a user's `Waker`).
struct PanickingWaker;

impl Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("a waker that panics");
    }
}

/// Counts its wakes.
#[derive(Default)]
struct CountingWaker(std::sync::atomic::AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Values and graphs whose `Drop` panics, let go by the client on a pool
/// thread, and a user's waker that panics there: none of it crashes the
/// process (the pool aborted it: found by review), and what the client
/// does after it on that thread still happens.
///
/// 1. `fire_and_forget`'s handle, let go once its work is done, drops
///    the value; a graph waiting for the same work, and a thread asleep
///    on that graph, still go on.
/// 2. A waker that panics: the wakers after it are woken, a thread asleep
///    on the future and a graph waiting for it go on.
/// 3. A graph that took a future: its run's last output completes once
///    the executor let go of the plan, and the client then holds the last
///    reference to the graph (its literal argument).
/// 4. A graph released while it waited for a future: it is let go when
///    that future is done.
#[test]
fn values_and_wakers_that_panic_never_crash_a_client() {
    support::in_child(
        "values_and_wakers_that_panic_never_crash_a_client",
        values_and_wakers_that_panic,
    );
}

fn values_and_wakers_that_panic() {
    use std::future::Future as _;
    let secs = std::time::Duration::from_secs;
    let client = Client::threads(2).unwrap();

    // 1.
    let before = BOMBS_DROPPED.load(Ordering::SeqCst);
    let gate = new_id();
    let f = client.submit(delayed!(make_bomb(gate, 5))).unwrap();
    let g = client
        .submit(delayed!(bomb_n(delayed!(make_bomb(gate, 5)))))
        .unwrap();
    let sleeper = {
        let g = g.clone();
        std::thread::spawn(move || g.result_timeout(secs(20)).map_err(|e| e.to_string()))
    };
    rask::fire_and_forget(f);
    open(gate);
    assert_eq!(sleeper.join().unwrap(), Ok(5));
    assert_eq!(g.result().unwrap(), 5);
    drop(g);
    // `f`'s value (`g` computed its own again once `f` was released).
    bombs_dropped(before + 1);

    // 2.
    let gate = new_id();
    let mut f = client.submit(delayed!(gated(gate, 7))).unwrap();
    let counting = Arc::new(CountingWaker::default());
    for waker in [
        Waker::from(Arc::new(PanickingWaker)),
        Waker::from(counting.clone()),
    ] {
        let poll = std::pin::Pin::new(&mut f).poll(&mut Context::from_waker(&waker));
        assert!(poll.is_pending());
    }
    let sleeper = {
        let f = f.clone();
        std::thread::spawn(move || f.result_timeout(secs(20)).map_err(|e| e.to_string()))
    };
    let after = client.submit(delayed!(inc(&f))).unwrap();
    open(gate);
    assert_eq!(sleeper.join().unwrap(), Ok(7));
    assert_eq!(after.result_timeout(secs(20)).unwrap(), 8);
    eventually("the waker after the one that panicked was woken", || {
        counting.0.load(Ordering::SeqCst) == 1
    });

    // 3.
    let x = client.submit(delayed!(inc(1))).unwrap();
    assert_eq!(x.result().unwrap(), 2);
    let before = BOMBS_DROPPED.load(Ordering::SeqCst);
    let gate = new_id();
    let graph = delayed!(bomb_plus(Bomb::armed(10), &x, delayed!(gated(gate, 0))));
    let f = client.submit(&graph).unwrap();
    drop(graph);
    open(gate);
    assert_eq!(f.result_timeout(secs(20)).unwrap(), 12);
    bombs_dropped(before + 1);

    // 4.
    let before = BOMBS_DROPPED.load(Ordering::SeqCst);
    let gate = new_id();
    let input = client.submit(delayed!(gated(gate, 1))).unwrap();
    let graph = delayed!(bomb_plus(Bomb::armed(20), &input, 0));
    drop(client.submit(&graph).unwrap());
    drop(graph);
    let later = client.submit(delayed!(inc(&input))).unwrap();
    open(gate);
    assert_eq!(later.result_timeout(secs(20)).unwrap(), 2);
    bombs_dropped(before + 1);

    // The pool goes on, every thread of it.
    let more = client.map(inc, 0..20).unwrap();
    assert_eq!(client.gather(&more).unwrap().len(), 20);
    every_pool_thread_runs(&client, 2);
}

/// A literal argument whose `Drop` panics, whose graph the client let go
/// once submitted: the executor's plan holds its last reference, and the
/// run drops it (on a pool thread, which aborted the process after the
/// future's result was returned: found by review; a simulated client's
/// wait panicked). Dropped quietly, as the executors drop values.
#[test]
fn a_literal_argument_whose_drop_panics_never_crashes_the_executor() {
    support::in_child(
        "a_literal_argument_whose_drop_panics_never_crashes_the_executor",
        literal_arguments_that_panic,
    );
}

fn literal_arguments_that_panic() {
    let secs = std::time::Duration::from_secs;
    for client in clients()
        .into_iter()
        .filter(|c| c.executor() != rask::ExecutorKind::Synchronous)
    {
        let before = BOMBS_DROPPED.load(Ordering::SeqCst);
        let gate = new_id();
        if matches!(client.executor(), rask::ExecutorKind::Simulated(_)) {
            // It runs the work inside the wait below.
            open(gate);
        }
        let graph = delayed!(bomb_plus(Bomb::armed(30), delayed!(gated(gate, 1)), 0));
        let f = client.submit(&graph).unwrap();
        drop(graph);
        open(gate);
        assert_eq!(
            f.result_timeout(secs(20)).unwrap(),
            31,
            "{}",
            client.executor()
        );
        bombs_dropped(before + 1);
        let more = client.submit(delayed!(inc(41))).unwrap();
        assert_eq!(
            more.result_timeout(secs(20)).unwrap(),
            42,
            "{}",
            client.executor()
        );
        if let rask::ExecutorKind::Threads(Some(threads)) = client.executor() {
            every_pool_thread_runs(&client, threads);
        }
    }
}

/// `Duration::MAX` as a timeout is no deadline at all: the waits return
/// when the work is done (they panicked at once, "overflow when adding
/// duration to instant": found by review).
#[test]
fn a_timeout_of_duration_max_is_no_deadline() {
    let max = std::time::Duration::MAX;
    let client = Client::threads(2).unwrap();
    let gate = new_id();
    let f = client.submit(delayed!(gated(gate, 3))).unwrap();
    let (tell, told) = std::sync::mpsc::channel();
    for wait_all in [false, true] {
        let (f, tell) = (f.clone(), tell.clone());
        std::thread::spawn(move || {
            let got = if wait_all {
                rask::wait_timeout(std::slice::from_ref(&f), max).and_then(|()| f.result())
            } else {
                f.result_timeout(max)
            };
            let _ = tell.send(got.map_err(|e| e.to_string()));
        });
    }
    drop(tell);
    open(gate);
    for _ in 0..2 {
        let got = told.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(got, Ok(Ok(3)), "a wait panicked or never returned");
    }
    // One worker, this process: there at once, and never a second one.
    assert!(client.wait_for_workers(1, max).is_ok());
    let err = client.wait_for_workers(2, max).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
}

/// A graph let go whose nodes hold several literals whose `Drop` panics
/// (each in a node of its own, below a root with none): each panic is
/// caught and logged as the graph is freed, and none meets another
/// unwinding, which aborted the process. In a child process.
#[test]
fn a_graph_let_go_with_literals_whose_drop_panics_never_aborts() {
    support::in_child(
        "a_graph_let_go_with_literals_whose_drop_panics_never_aborts",
        || {
            let before = BOMBS_DROPPED.load(Ordering::SeqCst);
            let leaf = |n| delayed!(bomb_plus(Bomb::armed(n), 0, 0));
            let graph = delayed!(add(
                delayed!(add(leaf(1), leaf(2))),
                delayed!(add(leaf(3), leaf(4)))
            ));
            drop(graph);
            assert_eq!(BOMBS_DROPPED.load(Ordering::SeqCst), before + 4);
        },
    );
}
