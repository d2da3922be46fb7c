//! The distributed executor end to end, in one process: a scheduler, workers
//! on background threads and clients, all on 127.0.0.1 with OS-chosen ports.
//! Every wait has a timeout (`support::TIMEOUT`).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rask_distributed::protocol::{self, FromPeer, Handshake, Role, ToPeer, ToScheduler};
use rask_distributed::{worker, Auth, BuildId, Client, LoopTables, Token, WorkerHandle};
use rask_executor::{FailureKind, Op, OpError, Plan, Registry, Value, WireError, WireTask};
use support::{
    fetch_int, fetch_len, raw, raw_as, read_until_closed, remote, Cluster, Collect, Graph, Keep,
    TestRegistry, TIMEOUT,
};

/// a = 1; b = a + 1; c = a + 1; d = b + c.
fn diamond(cluster: &Cluster, client: &rask_distributed::Client, salt: u64) {
    diamond_of(client, Graph::salted(&cluster.shared, salt));
}

/// [`diamond`] built with `g`.
fn diamond_of(client: &rask_distributed::Client, mut g: Graph) {
    let a = g.value(1);
    let b = g.op("inc", 0, &[a]);
    let c = g.op("add", 1, &[a]);
    let d = g.op("add", 0, &[b, c]);
    g.output(d);
    g.output(a);
    let got = Collect::new(2);
    got.submit(client, g.build());
    assert_eq!(got.wait(), vec![Ok(4), Ok(1)]);
}

#[test]
fn diamond_graph() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    diamond(&cluster, &client, 0);
    // Everything is released once the outputs were reported.
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn an_in_process_client_works_beside_a_tcp_one() {
    let cluster = Cluster::new(2, 1);
    let (memory, tcp) = (cluster.memory_client(), cluster.client());
    diamond(&cluster, &memory, 0);
    // The same keys from a TCP client: answered from memory, nothing runs
    // twice, and both see the same values.
    diamond(&cluster, &tcp, 0);
    diamond(&cluster, &memory, 1);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn dropping_an_in_process_client_cancels_its_submissions_and_releases_its_keys() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.memory_client();
    drop_while_running(&cluster, client);
}

#[test]
fn a_stopped_scheduler_refuses_in_process_clients() {
    let mut scheduler = rask_distributed::scheduler::serve("127.0.0.1:0".parse().unwrap()).unwrap();
    scheduler.shutdown();
    match rask_distributed::in_process_client(&scheduler) {
        Err(rask_distributed::Error::Connection { .. }) => {}
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

#[test]
fn inputs_are_given_in_dependency_order() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(10);
    let b = g.value(3);
    // "sleep_inc" takes only its first input: the order must be kept, and a
    // repeated input must arrive twice.
    let first = g.task("sleep_inc", postcard::to_stdvec(&0u64).unwrap(), &[b, a]);
    let twice = g.op("add", 0, &[a, a, b]);
    g.output(first);
    g.output(twice);
    let got = Collect::new(2);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok(4), Ok(23)]);
}

#[test]
fn shared_keys_across_submissions_and_clients_run_once() {
    let cluster = Cluster::new(2, 1);
    let (one, two) = (cluster.client(), cluster.client());
    // The gate, then a count; `extra` adds an output of its own.
    let plan = |extra: bool| {
        let mut g = Graph::new(&cluster.shared);
        let a = g.value(5);
        let slow = g.op("gate", 0, &[a]);
        let counted = g.op("count", 1, &[slow]);
        g.output(counted);
        if extra {
            let own = g.value(6);
            g.output(own);
        }
        g.build()
    };
    let first = Collect::new(1);
    first.submit(&one, plan(false));
    cluster.wait_started();
    assert_eq!(cluster.scheduler.tasks(), 3);
    // While the first runs: the same keys from the same client and another.
    let second = Collect::new(1);
    second.submit(&one, plan(false));
    let third = Collect::new(2);
    let arrived = third.progress();
    third.submit(&two, plan(true));
    // The other client's graph reached the scheduler before the gate opens:
    // its own output arrived; the same client's comes before that client's
    // release of the first, on one connection.
    assert_eq!(arrived.recv_timeout(TIMEOUT), Ok(1));
    cluster.shared.open_gate(1);
    assert_eq!(first.wait(), vec![Ok(6)]);
    assert_eq!(second.wait(), vec![Ok(6)]);
    assert_eq!(third.wait(), vec![Ok(6), Ok(6)]);
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), 1);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn failure_propagates_and_names_the_failed_task() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let bad = g.op("fail", 0, &[]);
    let after = g.op("inc", 0, &[bad]);
    let later = g.op("add", 7, &[after]);
    let fine = g.value(9);
    let bad_key = g.key(bad);
    g.output(later);
    g.output(fine);
    let got = Collect::new(2);
    got.submit(&client, g.build());
    let out = got.wait();
    let failure = out[0].clone().unwrap_err();
    assert_eq!(failure.key, bad_key);
    assert_eq!(&*failure.name, "fail");
    assert_eq!(failure.kind, FailureKind::Failed);
    assert_eq!(failure.message, "nope");
    assert_eq!(out[1], Ok(9));
    assert_eq!(client.loop_tables().unwrap(), LoopTables::default());
}

#[test]
fn a_panicking_task_fails_only_itself() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let boom = g.op("panic", 0, &[]);
    let one = g.value(1);
    let two = g.op("inc", 0, &[one]);
    g.output(boom);
    g.output(two);
    let got = Collect::new(2);
    got.submit(&client, g.build());
    let out = got.wait();
    let failure = out[0].clone().unwrap_err();
    assert_eq!(failure.kind, FailureKind::Panicked);
    assert_eq!(failure.message, "kaboom");
    assert_eq!(out[1], Ok(2));
    // The worker survived.
    diamond(&cluster, &client, 1);
}

/// Runs `function` with `payload` alone and waits: `Ok(1)` if it ran on
/// the worker's network thread, `Ok(0)` on a compute thread.
fn run_where(
    cluster: &Cluster,
    client: &rask_distributed::Client,
    function: &str,
    payload: i64,
    salt: u64,
) -> Result<i64, rask_executor::Failure> {
    let mut g = Graph::salted(&cluster.shared, salt);
    let t = g.op(function, payload, &[]);
    g.output(t);
    let got = Collect::new(1);
    got.submit(client, g.build());
    got.wait().remove(0)
}

#[test]
fn short_functions_move_to_the_network_thread_and_long_ones_stay_on_the_pool() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let first: Vec<i64> = (0..4)
        .map(|salt| run_where(&cluster, &client, "where", 0, salt).unwrap())
        .collect();
    // Four fast runs make a streak; until then the pool runs the function.
    assert_eq!(first, [0, 0, 0, 0]);
    // Then the network thread does (a slow run on a busy machine starts
    // the streak over).
    make_where_fast(&cluster, &client, 1);
    // 200 µs is over the limit: never on the network thread.
    for salt in 0..8 {
        assert_eq!(run_where(&cluster, &client, "where_slow", 200, salt), Ok(0));
    }
}

/// Runs `where` until a run of it is on the worker's network thread: its
/// function is fast there from then on (rule 5 of `worker`), until one of
/// its runs is slow. Each `attempt` runs it over its own salts (keys no
/// other call of a test uses).
fn make_where_fast(cluster: &Cluster, client: &rask_distributed::Client, attempt: u64) {
    let salts = 10_000 + 100 * attempt..;
    let inline = salts
        .take(50)
        .any(|salt| run_where(cluster, client, "where", 0, salt) == Ok(1));
    assert!(inline, "`where` never ran on the network thread");
}

#[test]
fn many_short_tasks_at_once_are_shared_between_the_network_thread_and_the_pool() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    // Far more than one turn's budget: the network thread hands the rest to
    // the pool. One slow run of `where` (a busy machine preempting it) sends
    // its function back to the pool until it is fast again, and a burst
    // routed meanwhile all goes there: a few bursts, each after `where` ran
    // on the network thread again.
    const TASKS: usize = 5_000;
    let mut shares = Vec::new();
    for burst in 0..5 {
        make_where_fast(&cluster, &client, burst);
        let mut g = Graph::salted(&cluster.shared, 1000 + burst);
        for i in 0..TASKS {
            // Distinct inputs make distinct keys; `where` ignores them.
            let input = g.value(i as i64);
            let t = g.op("where", 0, &[input]);
            g.output(t);
        }
        let got = Collect::new(TASKS);
        got.submit(&client, g.build());
        let out: Vec<i64> = got.wait().into_iter().map(Result::unwrap).collect();
        let on_network = out.iter().filter(|&&v| v == 1).count();
        assert!(
            on_network < TASKS,
            "{on_network} of {TASKS}: none on the pool"
        );
        shares.push(on_network);
        if on_network > 0 {
            return;
        }
    }
    panic!("no burst of {TASKS} ran on the network thread at all: {shares:?}");
}

#[test]
fn a_silent_worker_is_taken_for_dead_and_its_task_runs_elsewhere() {
    let timeout = Duration::from_secs(1);
    let options = rask_distributed::scheduler::Options::default().worker_timeout(timeout);
    let mut cluster = Cluster::with_options(0, 1, options);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let b = g.op("inc", 0, &[a]);
    g.output(b);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    // A worker that takes the task, then sends nothing, not even a
    // heartbeat: a hung process.
    let (mut s, mut msgs) = raw_worker(&cluster);
    while !msgs
        .iter()
        .any(|m| matches!(m, protocol::ToWorker::Compute { .. }))
    {
        msgs = read_frame(&mut s);
    }
    cluster.add_worker(1);
    // After `timeout` the scheduler takes it for dead, closes it and runs
    // the task again on the real worker.
    assert_eq!(got.wait(), vec![Ok(2)]);
    wait_closed(&mut s);
    assert_eq!(cluster.scheduler.workers(), 1);
    // The rest carries on, heartbeats and all, past the timeout.
    std::thread::sleep(2 * timeout);
    diamond(&cluster, &client, 3);
    assert_eq!(cluster.scheduler.workers(), 1);
}

#[test]
fn a_thread_stuck_in_a_cancelled_task_is_replaced_and_its_worker_takes_new_work() {
    // One worker, one thread: only a replacement thread can run anything
    // while the first one hangs.
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let stuck = g.op("hang", 0, &[]);
    g.output(stuck);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    cluster.eventually("the task to hang", |c| {
        c.shared.hanging.load(Ordering::SeqCst) == 1
    });
    // Cancelled: the scheduler releases it on its worker, which it never
    // notices.
    got.cancel.store(true, Ordering::SeqCst);
    assert_eq!(
        got.wait()[0].clone().unwrap_err().kind,
        FailureKind::Cancelled
    );
    // Ten more tasks for the same worker all complete, while the first
    // still hangs on its thread.
    let mut g = Graph::salted(&cluster.shared, 1);
    for i in 0..10 {
        let v = g.value(i);
        let t = g.op("add", 100, &[v]);
        g.output(t);
    }
    let got = Collect::new(10);
    got.submit(&client, g.build());
    let want: Vec<_> = (0..10).map(|i| Ok(100 + i)).collect();
    assert_eq!(got.wait(), want);
    assert_eq!(cluster.shared.hanging.load(Ordering::SeqCst), 1);
    assert_eq!(cluster.scheduler.workers(), 1);
    // Once it returns, its late result is dropped, and nothing is left
    // running.
    cluster.shared.end_hangs();
    cluster.eventually("the task to return", |c| {
        c.shared.hanging.load(Ordering::SeqCst) == 0
    });
    diamond(&cluster, &client, 2);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn a_fast_function_that_hangs_on_the_network_thread_does_not_take_its_worker_out() {
    // A worker silent for this long would be taken for dead.
    let timeout = Duration::from_secs(1);
    let options = rask_distributed::scheduler::Options::default().worker_timeout(timeout);
    let cluster = Cluster::with_options(1, 1, options);
    let client = cluster.client();
    let held = keep_big(&cluster, &client, 5);
    // The next call of that fast function hangs, on the network thread;
    // unless a slow run (a busy machine) just sent `where` back to the
    // pool: then that call is let go and another one tried.
    let hung = (0..5)
        .find_map(|attempt| {
            make_where_fast(&cluster, &client, attempt);
            let mut g = Graph::salted(&cluster.shared, 100 + attempt);
            let t = g.op("where", -2, &[]);
            g.output(t);
            let hung = Collect::new(1);
            hung.submit(&client, g.build());
            cluster.eventually("the task to hang", |c| {
                c.shared.hanging.load(Ordering::SeqCst) == 1
            });
            if cluster.shared.hanging_on_network.load(Ordering::SeqCst) == 1 {
                return Some(hung);
            }
            cluster.shared.end_one_hang();
            assert_eq!(hung.wait(), vec![Ok(0)]);
            None
        })
        .expect("a call of `where` to hang on the network thread");
    // The worker goes on: it runs other tasks, serves its data and sends
    // heartbeats past the scheduler's timeout.
    diamond(&cluster, &client, 6);
    assert_eq!(fetch_len(&held[0]), BIG as usize);
    assert_eq!(len_of(&cluster, &client, &held[0]), BIG as i64 + 5);
    std::thread::sleep(2 * timeout);
    diamond(&cluster, &client, 7);
    assert_eq!(cluster.scheduler.workers(), 1);
    assert!(!cluster.workers[0].as_ref().unwrap().is_finished());
    assert_eq!(cluster.shared.hanging.load(Ordering::SeqCst), 1);
    // Released, the hung call reports its value (it was still wanted), run
    // on the thread that was the network thread.
    cluster.shared.end_hangs();
    assert_eq!(hung.wait(), vec![Ok(1)]);
    // Its function starts over on the pool.
    assert_eq!(run_where(&cluster, &client, "where", 0, 200), Ok(0));
    drop(held);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn a_panic_on_the_network_thread_fails_only_its_task() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    make_where_fast(&cluster, &client, 0);
    let failure = run_where(&cluster, &client, "where", -1, 0).unwrap_err();
    assert_eq!(failure.kind, FailureKind::Panicked);
    assert_eq!(failure.message, "kaboom");
    // The worker survived.
    diamond(&cluster, &client, 1);
    assert!(run_where(&cluster, &client, "where", 0, 99).is_ok());
}

/// Worker rule 16: values whose `Drop` panics, released on their worker
/// (a result the client fetched, and an intermediate value once its
/// reader ran), are dropped quietly on the network thread, and the worker
/// goes on. Before, the panic ended the worker (a worker process exits
/// then: `run_with` raises the panic again), and the next graph waited for
/// a worker until the test's timeout.
#[test]
fn released_values_whose_drop_panics_leave_their_worker_running() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let result = g.op("boom", 5, &[]);
    let intermediate = g.op("boom", 7, &[]);
    let reader = g.op("add", 1, &[intermediate]);
    g.output(result);
    g.output(reader);
    let got = Collect::new(2);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok(5), Ok(8)]);
    // The scheduler forgot them, so it sent their releases before the
    // next graph's tasks, on the same connection.
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
    let more = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        diamond(&cluster, &client, 1);
    }));
    if more.is_err() || cluster.workers[0].as_ref().unwrap().is_finished() {
        // Dropping a dead worker's handle would wait for its end for
        // ever: left as it is, the test ends.
        std::mem::forget((cluster, client));
        panic!("the worker died of a value's drop");
    }
    assert_eq!(cluster.scheduler.workers(), 1);
}

#[test]
fn cancel_reports_cancelled_and_releases() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let slow = g.op("gate", 0, &[a]);
    let after = g.op("inc", 0, &[slow]);
    g.output(after);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    cluster.wait_started();
    got.cancel.store(true, Ordering::SeqCst);
    let out = got.wait();
    assert_eq!(out[0].clone().unwrap_err().kind, FailureKind::Cancelled);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
    cluster.shared.open_gate(1);
    // The cluster is still usable.
    diamond(&cluster, &client, 2);
    assert_eq!(client.loop_tables().unwrap(), LoopTables::default());
}

#[test]
fn map_of_ten_thousand_tasks() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let n = 10_000;
    let base = g.value(0);
    for i in 0..n {
        let t = g.op("add", i, &[base]);
        g.output(t);
    }
    let got = Collect::new(n as usize);
    got.submit(&client, g.build());
    let out = got.wait();
    assert_eq!(out.len(), n as usize);
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, Ok(i as i64));
    }
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn several_submissions_in_flight_on_one_client() {
    let cluster = Cluster::new(2, 2);
    let client = cluster.client();
    let runs: Vec<_> = (0..20)
        .map(|i| {
            let mut g = Graph::new(&cluster.shared);
            let a = g.value(i);
            let b = g.op("inc", 0, &[a]);
            g.output(b);
            let got = Collect::new(1);
            got.submit(&client, g.build());
            (i, got)
        })
        .collect();
    for (i, got) in runs {
        assert_eq!(got.wait(), vec![Ok(i + 1)]);
    }
}

#[test]
fn killed_worker_mid_run_every_result_still_arrives() {
    let mut cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let n = 400;
    let mut mapped = Vec::new();
    for i in 0..n {
        let v = g.value(i);
        // 500 µs each: long enough to be mid-run when the worker dies.
        let t = g.task("sleep_inc", postcard::to_stdvec(&500u64).unwrap(), &[v]);
        mapped.push(t);
        g.output(t);
    }
    // A reduction over everything: needs values held by both workers, so
    // those held by the dead one must be recomputed.
    let total = g.op("add", 0, &mapped);
    g.output(total);
    let out = lose_worker_0_midway(&mut cluster, &client, g, n as usize + 1, n as usize / 4);
    for (i, v) in out.iter().take(n as usize).enumerate() {
        assert_eq!(*v, Ok(i as i64 + 1), "output {i}");
    }
    assert_eq!(out[n as usize], Ok((1..=n).sum()));
    assert_eq!(client.loop_tables().unwrap(), LoopTables::default());
}

#[test]
fn killed_worker_mid_chain_the_chain_still_completes() {
    // Links go early to the worker computing their input (scheduler rule
    // S9) and wait there: a death must send them back to be recomputed.
    let mut cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let n = 200;
    let mut link = g.value(0);
    for _ in 0..n {
        link = g.task("sleep_inc", postcard::to_stdvec(&500u64).unwrap(), &[link]);
        g.output(link);
    }
    let out = lose_worker_0_midway(&mut cluster, &client, g, n as usize, n as usize / 4);
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, Ok(i as i64 + 1), "link {i}");
    }
    assert_eq!(client.loop_tables().unwrap(), LoopTables::default());
}

/// Submits `g` (with `outputs` outputs), stops worker 0 abruptly (its
/// connections dropped as by a crash) once `after` outputs arrived, and
/// returns every output.
fn lose_worker_0_midway(
    cluster: &mut Cluster,
    client: &rask_distributed::Client,
    g: Graph,
    outputs: usize,
    after: usize,
) -> Vec<Result<i64, rask_executor::Failure>> {
    let got = Collect::new(outputs);
    let progress = got.progress();
    got.submit(client, g.build());
    for _ in 0..after {
        progress.recv_timeout(TIMEOUT).expect("progress");
    }
    cluster.workers[0].take().unwrap().stop();
    got.wait()
}

/// Client rule 2: a result the client has is released on the cluster at
/// once, so the scheduler keeps only what is pending, and a worker that
/// dies afterwards costs no recomputation of it.
#[test]
fn results_the_client_has_are_released_and_never_recomputed() {
    let mut cluster = Cluster::new(2, 1);
    let client = cluster.client();
    for keep in [false, true] {
        let mut g = Graph::new(&cluster.shared);
        for i in 0..200 {
            let t = g.op("count", i, &[]);
            g.output(t);
        }
        let before = cluster.shared.runs.load(Ordering::SeqCst);
        let values = if keep {
            let kept = Keep::new(200, true);
            kept.submit(&client, g.build());
            kept.wait()
                .into_iter()
                .map(|v| fetch_int(&v.unwrap()))
                .collect()
        } else {
            let got = Collect::new(200);
            got.submit(&client, g.build());
            got.wait()
                .into_iter()
                .map(|v| v.unwrap())
                .collect::<Vec<i64>>()
        };
        assert_eq!(values, (0..200).collect::<Vec<i64>>());
        assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), before + 200);
        // Nothing stays on the cluster for results the client has, even
        // while handles to them live (`values` came from them).
        cluster.eventually("the results released", |c| c.scheduler.tasks() == 0);
    }
    let runs = cluster.shared.runs.load(Ordering::SeqCst);
    cluster.workers[0].take().unwrap().stop();
    cluster.eventually("the worker gone", |c| c.scheduler.workers() == 1);
    diamond(&cluster, &client, 5);
    // The diamond ran (it counts no runs): none of the results the dead
    // worker held was computed again.
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), runs);
}

/// Waits (bounded) in another thread for `worker` to stop by itself.
fn joined(worker: WorkerHandle) -> Result<(), rask_distributed::Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(worker.join());
    });
    rx.recv_timeout(TIMEOUT).expect("the worker should exit")
}

/// Whether the data port at `data` holds `key`: it answers with the value,
/// or says it is missing. The reader proves `auth`.
fn data_port_holds(auth: &Auth, data: SocketAddr, key: [u8; 32]) -> bool {
    let mut s = raw(data, Role::Peer, auth);
    s.write_all(&protocol::frame(&ToPeer::GetData { keys: vec![key] }))
        .unwrap();
    match read_frame::<FromPeer>(&mut s).as_slice() {
        [FromPeer::Data { key: k, .. }] if *k == key => true,
        [FromPeer::Missing { key: k }] if *k == key => false,
        other => panic!("unexpected {other:?}"),
    }
}

/// A free port on 127.0.0.1 that nobody listens on now (bound, noted,
/// closed).
fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn a_worker_without_a_death_timeout_exits_with_its_scheduler() {
    let mut cluster = Cluster::new(0, 1);
    cluster.add_worker_with(worker::Options::default().death_timeout(Duration::ZERO));
    let worker = cluster.workers[0].take().unwrap();
    cluster.scheduler.shutdown();
    // `join` returns only once the worker stopped by itself.
    assert!(joined(worker).is_ok());
}

#[test]
fn a_worker_that_cannot_reach_its_scheduler_again_exits_after_its_death_timeout() {
    let death_timeout = Duration::from_millis(300);
    let mut cluster = Cluster::new(0, 1);
    cluster.add_worker_with(worker::Options::default().death_timeout(death_timeout));
    let worker = cluster.workers[0].take().unwrap();
    let lost = std::time::Instant::now();
    cluster.scheduler.shutdown();
    assert!(joined(worker).is_ok());
    // Not a timing assertion: its last attempt is made at the deadline, so
    // it cannot have given up any earlier.
    assert!(lost.elapsed() >= death_timeout, "{:?}", lost.elapsed());
}

#[test]
fn a_worker_started_before_its_scheduler_registers_once_it_is_up() {
    let address = free_address();
    let (shared, started) = support::Shared::new();
    let registry = Arc::new(TestRegistry {
        shared: shared.clone(),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let target = format!("tcp://{address}");
    let auth = Auth::Token(Token::generate().unwrap());
    let options = worker::Options::default()
        .death_timeout(TIMEOUT)
        .auth(auth.clone());
    std::thread::spawn(move || {
        let _ = tx.send(worker::spawn_with(&target, registry, options));
    });
    // Nothing listens yet: the worker waits rather than failing at once.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    let options = rask_distributed::scheduler::Options::default().auth(auth.clone());
    let scheduler = rask_distributed::scheduler::serve_with(address, options).unwrap();
    let worker = rx
        .recv_timeout(TIMEOUT)
        .expect("the worker registers")
        .unwrap();
    let cluster = Cluster {
        workers: vec![Some(worker)],
        shared,
        started,
        scheduler,
        address: format!("tcp://{address}"),
        auth,
    };
    assert_eq!(cluster.scheduler.workers(), 1);
    diamond(&cluster, &cluster.client(), 0);
}

/// 100 kB of sevens (`big`, which counts its runs): a value large enough
/// for a client to leave it on the worker (not fetched at once).
fn big(g: &mut Graph) -> u32 {
    g.task("big", postcard::to_stdvec(&100_000u64).unwrap(), &[])
}

#[test]
fn a_worker_registers_again_with_a_restarted_scheduler_and_computes_for_it() {
    let mut cluster = Cluster::new(0, 1);
    // Long enough never to run out in this test: `stop` ends it below.
    cluster.add_worker_with(worker::Options::default().death_timeout(4 * TIMEOUT));
    let worker = cluster.workers[0].take().unwrap();
    let data = worker.data_address();
    let address = cluster.scheduler.address();
    // The worker computes and holds a value for a client of the first
    // scheduler.
    let first = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let t = big(&mut g);
    g.output(t);
    let kept = Keep::new(1, true);
    kept.submit(&first, g.build());
    let held = kept.wait().pop().unwrap().unwrap();
    let key = remote(&held).key().0;
    assert!(data_port_holds(&cluster.auth, data, key));
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), 1);

    // The scheduler stops, and another starts at the same address.
    cluster.scheduler.shutdown();
    cluster.scheduler =
        rask_distributed::scheduler::serve_with(address, cluster.options()).unwrap();
    cluster.eventually("the worker to register again", |c| {
        c.scheduler.workers() == 1
    });
    assert!(!worker.is_finished());
    // What it held for the first scheduler is gone; its data port is up
    // and says so.
    assert!(!data_port_holds(&cluster.auth, data, key));
    drop((held, first));

    // A client of the new scheduler computes on it; the value held before
    // is computed again, since the new scheduler never saw it.
    let second = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let t = big(&mut g);
    let len = g.op("len", 1, &[t]);
    g.output(len);
    let got = Collect::new(1);
    got.submit(&second, g.build());
    assert_eq!(got.wait(), vec![Ok(100_001)]);
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), 2);

    // A worker waiting for its scheduler stops at once when told to,
    // well within its death timeout.
    cluster.scheduler.shutdown();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        worker.stop();
        let _ = tx.send(());
    });
    rx.recv_timeout(TIMEOUT).expect("the worker stops");
}

#[test]
fn lost_scheduler_fails_open_submissions() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    lose_the_scheduler(&mut cluster, &client);
}

#[test]
fn lost_scheduler_fails_open_submissions_of_an_in_process_client() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.memory_client();
    lose_the_scheduler(&mut cluster, &client);
}

/// Shuts the scheduler down while `client` waits for a task: the
/// submission fails, and so do later ones.
fn lose_the_scheduler(cluster: &mut Cluster, client: &rask_distributed::Client) {
    assert!(client.is_connected());
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let slow = g.op("gate", 0, &[a]);
    g.output(slow);
    let got = Collect::new(1);
    got.submit(client, g.build());
    cluster.wait_started();
    cluster.scheduler.shutdown();
    let failure = got.wait()[0].clone().unwrap_err();
    assert!(failure.message.contains("lost the connection"), "{failure}");
    assert!(!client.is_connected());
    // Later submissions fail at once too.
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    g.output(a);
    let got = Collect::new(1);
    got.submit(client, g.build());
    assert!(got.wait()[0].is_err());
}

/// Client rule 10: a TCP client outlives a scheduler restart. What was open
/// fails; once the scheduler is back, every submission succeeds, the first
/// one included (it waits for the client to connect again). A handle of
/// the old connection without its bytes says it is lost from the moment
/// the loss is seen; one with its bytes, or of the new connection, never.
#[test]
fn a_client_connects_again_after_a_scheduler_restart() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let kept = keep_big(&cluster, &client, 3);
    let mut g = Graph::salted(&cluster.shared, 4);
    let a = g.value(20);
    let b = g.op("count", 1, &[a]);
    g.output(b);
    let small = Keep::new(1, true);
    small.submit(&client, g.build());
    let small = small.wait().pop().unwrap().unwrap();
    assert!(remote(&kept[0]).lost().is_none());
    assert!(remote(&small).lost().is_none());
    lose_the_scheduler(&mut cluster, &client);
    // Seen lost, not yet connected again: the value is gone already.
    let lost = remote(&kept[0]).lost().expect("lost with its connection");
    assert!(
        lost.to_string().contains("lost with the connection"),
        "{lost}"
    );
    assert!(remote(&small).lost().is_none(), "its bytes are here");
    let address: std::net::SocketAddr = cluster
        .address
        .trim_start_matches("tcp://")
        .parse()
        .unwrap();
    cluster.workers.clear();
    cluster.scheduler =
        rask_distributed::scheduler::serve_with(address, cluster.options()).unwrap();
    cluster.add_worker(1);
    for salt in 0..3 {
        diamond(&cluster, &client, 100 + salt);
    }
    assert!(client.is_connected());
    // A value held through the old connection is gone with it: its fetch
    // fails with a clear error, not a hang.
    let err = remote(&kept[0]).fetch().unwrap_err().to_string();
    assert!(err.contains("lost with the connection"), "{err}");
    assert!(remote(&kept[0]).lost().is_some());
    assert_eq!(fetch_int(&small), 21);
    // The same key computed again on the new connection is held there.
    let again = keep_big(&cluster, &client, 3);
    assert!(remote(&again[0]).lost().is_none());
    assert_eq!(fetch_len(&again[0]), BIG as usize);
    drop((kept, again, small));
    assert_eq!(client.loop_tables().unwrap(), LoopTables::default());
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

/// Client rule 10, with a scheduler restarted under another token: the
/// client keeps trying, and what it cannot send fails saying it was
/// refused, not that the scheduler cannot be reached.
#[test]
fn a_scheduler_back_with_another_token_refuses_the_client_and_says_so() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    lose_the_scheduler(&mut cluster, &client);
    let address: std::net::SocketAddr = cluster
        .address
        .trim_start_matches("tcp://")
        .parse()
        .unwrap();
    cluster.workers.clear();
    let other = Auth::Token(Token::generate().unwrap());
    let options = rask_distributed::scheduler::Options::default().auth(other);
    cluster.scheduler = rask_distributed::scheduler::serve_with(address, options).unwrap();
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    g.output(a);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    let failure = got.wait()[0].clone().unwrap_err();
    assert!(
        failure
            .message
            .contains("it refused this client (wrong token")
            && failure.message.contains("keeps the token it started with"),
        "{failure}"
    );
    assert!(!client.is_connected());
}

#[test]
fn unregistered_function_is_a_clear_error() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let nope = g.op("nope", 0, &[a]);
    let after = g.op("inc", 0, &[nope]);
    let nope_key = g.key(nope);
    g.output(after);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    let failure = got.wait()[0].clone().unwrap_err();
    assert_eq!(failure.key, nope_key);
    assert!(
        failure.message.contains("`nope` is not registered"),
        "{failure}"
    );
}

#[test]
fn a_task_that_cannot_leave_the_process_fails_at_submit() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let local = g.op("local_only", 0, &[a]);
    let local_key = g.key(local);
    g.output(local);
    g.output(a);
    let got = Collect::new(2);
    got.submit(&client, g.build());
    let out = got.wait();
    for o in out {
        let failure = o.unwrap_err();
        assert_eq!(failure.key, local_key);
        assert!(failure.message.contains("cannot be sent"), "{failure}");
    }
}

#[test]
fn bad_addresses_and_dead_ports_are_errors() {
    assert!(matches!(
        rask_distributed::Client::connect("http://x"),
        Err(rask_distributed::Error::Address { .. })
    ));
    // A port nobody listens on (bind, read the port, close).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let insecure =
        rask_distributed::Client::connect_with(&format!("127.0.0.1:{port}"), Auth::Insecure);
    assert!(matches!(
        insecure,
        Err(rask_distributed::Error::Connection { .. })
    ));
}

/// Writes `bytes` to `addr` and expects the server to close the connection
/// within the timeout, after sending at most its handshake answer (its
/// hello, and its proof or a version-4 refusal).
fn expect_closed(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let _ = s.write_all(bytes);
    let sink = read_until_closed(&mut s);
    assert!(
        sink.len() <= protocol::HANDSHAKE_FRAME + protocol::PROOF_FRAME,
        "got {sink:?}"
    );
}

/// Connects to `addr` as `role` proving `auth`, writes `bytes` and expects
/// the server to close the connection without sending anything more than
/// what it greets every client with (where the workers are).
fn expect_closed_after_handshake(addr: SocketAddr, role: Role, auth: &Auth, bytes: &[u8]) {
    let mut s = raw(addr, role, auth);
    let _ = s.write_all(bytes);
    let sink = read_until_closed(&mut s);
    if role != Role::Client {
        assert!(sink.is_empty(), "got {sink:?}");
        return;
    }
    let mut rest = &sink[..];
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let msgs: Vec<protocol::ToClient> = protocol::decode_batch(&rest[4..4 + len]).unwrap();
        for msg in msgs {
            assert!(
                matches!(msg, protocol::ToClient::WorkerJoined { .. }),
                "{msg:?}"
            );
        }
        rest = &rest[4 + len..];
    }
}

/// Bytes that are no handshake of this protocol.
fn bad_handshakes(role: Role) -> Vec<Vec<u8>> {
    let hello = Handshake::new(role, BuildId::current(), [1; 32], true).to_frame();
    let mut wrong_version = hello;
    wrong_version[8] = 0xee;
    let mut wrong_flags = hello;
    wrong_flags[11] = 0x80;
    // A version-4 handshake: 40 bytes of body, no nonce.
    let mut v4 = vec![40, 0, 0, 0, b'R', b'A', b'S', b'K', 4, 0, 1, 0];
    v4.extend([0; 32]);
    vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0x08, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        wrong_version.to_vec(),
        wrong_flags.to_vec(),
        v4,
    ]
}

/// Frames no peer may send after its handshake.
fn bad_frames() -> Vec<Vec<u8>> {
    vec![
        u32::MAX.to_le_bytes().to_vec(),
        vec![3, 0, 0, 0, 0xff, 0xff, 0xff],
    ]
}

#[test]
fn junk_on_the_scheduler_port_closes_only_that_connection() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let addr = cluster.scheduler.address();
    for junk in bad_handshakes(Role::Client) {
        expect_closed(addr, &junk);
    }
    for junk in bad_frames() {
        expect_closed_after_handshake(addr, Role::Client, &cluster.auth, &junk);
    }
    // A client sending a worker's message is closed as well.
    let wrong = protocol::frame(&ToScheduler::TaskAbandoned {
        key: [0; 32],
        run: 1,
    });
    expect_closed_after_handshake(addr, Role::Client, &cluster.auth, &wrong);
    // A peer's role is not served on the scheduler port.
    expect_closed_after_handshake(addr, Role::Peer, &cluster.auth, &[]);
    diamond(&cluster, &client, 3);
    diamond(&cluster, &cluster.client(), 4);
}

#[test]
fn junk_on_a_worker_data_port_closes_only_that_connection() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let data = cluster.workers[0].as_ref().unwrap().data_address();
    for junk in bad_handshakes(Role::Peer) {
        expect_closed(data, &junk);
    }
    for junk in bad_frames() {
        expect_closed_after_handshake(data, Role::Peer, &cluster.auth, &junk);
    }
    expect_closed_after_handshake(data, Role::Client, &cluster.auth, &[]);
    // Both workers still serve data: a reduction over values spread on both.
    let mut g = Graph::new(&cluster.shared);
    let vs: Vec<u32> = (0..8).map(|i| g.value(i)).collect();
    let incs: Vec<u32> = vs.iter().map(|&v| g.op("inc", 0, &[v])).collect();
    let total = g.op("add", 0, &incs);
    g.output(total);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok((1..=8).sum())]);
}

#[test]
fn a_silent_peer_is_dropped_after_the_handshake_timeout_without_blocking_others() {
    let cluster = Cluster::new(1, 1);
    // Connects and says nothing: must not block anyone else meanwhile.
    let _silent = TcpStream::connect(cluster.scheduler.address()).unwrap();
    let client = cluster.client();
    diamond(&cluster, &client, 5);
}

/// Random DAGs on 3 workers, one of which is stopped mid-run: the results
/// equal the synchronous executor's.
#[test]
fn random_dags_survive_a_dying_worker_and_agree_with_synchronous() {
    use rask_executor::{Executor, Synchronous};
    for seed in 1..=4u64 {
        let mut cluster = Cluster::new(3, 1);
        let client = cluster.client();
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let build = |next: &mut dyn FnMut(u64) -> u64| {
            let mut g = Graph::salted(&cluster.shared, 1000 + seed);
            let mut nodes: Vec<u32> = (0..10).map(|i| g.value(i)).collect();
            for i in 0..250 {
                let k = 1 + next(3) as usize;
                let deps: Vec<u32> = (0..k)
                    .map(|_| nodes[nodes.len() - 1 - next(nodes.len().min(30) as u64) as usize])
                    .collect();
                nodes.push(g.op("sleep_add", i % 7, &deps));
            }
            for &n in nodes.iter().rev().take(20) {
                g.output(n);
            }
            g.build()
        };
        let mut replay = next; // a copy: the same sequence again
        let plan = build(&mut next);
        let reference = Collect::new(20);
        Synchronous.submit(build(&mut replay), reference.clone());
        let expected = reference.wait();

        let got = Collect::new(20);
        got.submit(&client, plan);
        // Not a wait for a condition: this picks the moment of the crash,
        // a different one per seed, while the graph (~20 ms of work) runs.
        std::thread::sleep(Duration::from_millis(3 * seed));
        cluster.workers[(seed % 3) as usize].take().unwrap().stop();
        assert_eq!(got.wait(), expected, "seed {seed}");
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<rask_distributed::Client>();
    check::<rask_distributed::LocalCluster>();
    check::<rask_distributed::scheduler::SchedulerHandle>();
    check::<rask_distributed::WorkerHandle>();
    check::<rask_distributed::Error>();
}

#[test]
fn dropping_the_client_cancels_its_open_submissions_and_releases_its_keys() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    drop_while_running(&cluster, client);
}

/// Drops `client` while its task runs: the task is reported cancelled and
/// the scheduler forgets every key.
fn drop_while_running(cluster: &Cluster, client: rask_distributed::Client) {
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let slow = g.op("gate", 0, &[a]);
    g.output(slow);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    cluster.wait_started();
    drop(client);
    assert_eq!(
        got.wait()[0].clone().unwrap_err().kind,
        FailureKind::Cancelled
    );
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

/// Bytes over the client's eager-fetch limit: handles come unfetched.
const BIG: u64 = 100_000;

/// `big` (counted) kept on the cluster: outputs it twice, and a failure.
fn keep_big(cluster: &Cluster, client: &rask_distributed::Client, salt: u64) -> Vec<Value> {
    let mut g = Graph::salted(&cluster.shared, salt);
    let big = g.task("big", postcard::to_stdvec(&BIG).unwrap(), &[]);
    let bad = g.op("fail", 0, &[]);
    let big_key = g.key(big);
    g.output(big);
    g.output(big);
    g.output(bad);
    let kept = Keep::new(3, true);
    kept.submit(client, g.build());
    let mut out = kept.wait();
    assert_eq!(out.pop().unwrap().unwrap_err().message, "nope");
    let values: Vec<Value> = out.into_iter().map(|o| o.unwrap()).collect();
    assert_eq!(remote(&values[0]).key(), big_key);
    values
}

/// `len(held) + 5` on `client`: uses the kept value by reference.
fn len_of(cluster: &Cluster, client: &rask_distributed::Client, held: &Value) -> i64 {
    let mut g = Graph::new(&cluster.shared);
    let b = g.held(held.clone());
    let c = g.op("len", 5, &[b]);
    g.output(c);
    let got = Collect::new(1);
    got.submit(client, g.build());
    got.wait()[0].clone().unwrap()
}

#[test]
fn keep_remote_reports_handles_that_stay_held_until_dropped() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let values = keep_big(&cluster, &client, 10);
    // One handle per key, shared by the slots with that key.
    assert!(Arc::ptr_eq(&remote(&values[0]).0, &remote(&values[1]).0));
    // The failed output was released with the submission; `big` stays.
    cluster.eventually("the failed key released", |c| c.scheduler.tasks() == 1);
    // Later graphs use the held value in place: not sent, not recomputed.
    assert_eq!(len_of(&cluster, &client, &values[0]), BIG as i64 + 5);
    assert_eq!(len_of(&cluster, &client, &values[1]), BIG as i64 + 5);
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), 1);
    // The bytes come over on demand, from any thread but the client's.
    assert_eq!(fetch_len(&values[0]), BIG as usize);
    assert_eq!(fetch_len(&values[1]), BIG as usize);
    // Dropping the handle releases the key.
    drop(values);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn small_kept_outputs_arrive_with_their_bytes_and_stay_held() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let mut g = Graph::salted(&cluster.shared, 50);
    let a = g.value(20);
    let b = g.op("count", 1, &[a]);
    g.output(b);
    let kept = Keep::new(1, true);
    kept.submit(&client, g.build());
    let value = kept.wait().pop().unwrap().unwrap();
    // Held on the cluster: a later graph uses it there.
    let mut g = Graph::salted(&cluster.shared, 50);
    let held = g.held(value.clone());
    let c = g.op("add", 100, &[held]);
    g.output(c);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok(121)]);
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), 1);
    // Its bytes came with it: they outlive the client.
    drop(client);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
    assert_eq!(fetch_int(&value), 21);
}

#[test]
fn a_client_keeps_nothing_per_key_once_its_work_is_done_and_its_handles_dropped() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    // Small kept outputs: their bytes come with them, and they hold nothing.
    let mut g = Graph::salted(&cluster.shared, 60);
    for i in 0..50 {
        let a = g.value(i);
        let b = g.op("inc", 0, &[a]);
        g.output(b);
    }
    let kept = Keep::new(50, true);
    kept.submit(&client, g.build());
    let small: Vec<Value> = kept.wait().into_iter().map(|o| o.unwrap()).collect();
    assert_eq!(fetch_int(&small[7]), 8);
    // Big kept outputs: held on the cluster and fetched on demand.
    let big = keep_big(&cluster, &client, 61);
    assert_eq!(fetch_len(&big[0]), BIG as usize);
    let busy = client.loop_tables().unwrap();
    assert_eq!((busy.holders, busy.held), (1, 1), "{busy:?}");
    drop(small);
    drop(big);
    // The handles' releases reach the loop before the question does.
    assert_eq!(client.loop_tables().unwrap(), LoopTables::default());
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn a_handle_from_another_cluster_is_sent_as_bytes() {
    let one = Cluster::new(1, 1);
    let two = Cluster::new(1, 1);
    let owner = one.client();
    let values = keep_big(&one, &owner, 20);
    assert_eq!(len_of(&two, &two.client(), &values[0]), BIG as i64 + 5);
    drop(values);
    one.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn a_held_value_lost_with_its_worker_is_recomputed_for_a_fetch() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let values = keep_big(&cluster, &client, 30);
    let registry = Arc::new(support::TestRegistry {
        shared: cluster.shared.clone(),
    });
    let options = worker::Options::default().auth(cluster.auth.clone());
    let spare = rask_distributed::worker::spawn_with(&cluster.address, registry, options).unwrap();
    cluster.eventually("a second worker", |c| c.scheduler.workers() == 2);
    cluster.workers[0].take().unwrap().stop();
    assert_eq!(fetch_len(&values[0]), BIG as usize);
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), 2);
    drop(values);
    assert_eq!(client.loop_tables().unwrap(), LoopTables::default());
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
    spare.stop();
}

#[test]
fn a_handle_fails_to_fetch_once_its_client_is_gone() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    // A big output's handle comes without its bytes.
    let values = keep_big(&cluster, &client, 40);
    drop(client);
    // The scheduler drops a closed client's references, handles or not.
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
    match remote(&values[0]).fetch() {
        Err(WireError::Fetch { key, reason }) => {
            assert_eq!(key, remote(&values[0]).key());
            assert!(reason.contains("closed"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// The messages of the next frame on `s`.
fn read_frame<M: serde::de::DeserializeOwned>(s: &mut TcpStream) -> Vec<M> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    protocol::decode_batch(&body).unwrap()
}

/// Waits until the other side closes `s`, whatever it still sends first.
fn wait_closed(s: &mut TcpStream) {
    read_until_closed(s);
}

#[test]
fn a_worker_announcing_threads_or_an_address_out_of_range_is_closed() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    for (threads, address) in [
        (u32::MAX, "127.0.0.1:1".to_owned()),
        (protocol::MAX_THREADS + 1, "127.0.0.1:1".to_owned()),
        (0, "127.0.0.1:1".to_owned()),
        (1, "h".repeat(protocol::MAX_ADDRESS + 1)),
    ] {
        let register = protocol::frame(&ToScheduler::RegisterWorker {
            address,
            threads,
            resources: Default::default(),
            name: "out-of-range".into(),
        });
        // Closed with nothing after the handshake: never registered.
        let addr = cluster.scheduler.address();
        expect_closed_after_handshake(addr, Role::Worker, &cluster.auth, &register);
    }
    assert_eq!(cluster.scheduler.workers(), 1);
    // The scheduler placed nothing on them and still works, for old and
    // new clients and workers.
    diamond(&cluster, &client, 6);
    cluster.add_worker(protocol::MAX_THREADS as usize);
    cluster.eventually("two workers", |c| c.scheduler.workers() == 2);
    diamond(&cluster, &cluster.client(), 7);
}

/// A worker of the test's own making: registers on `cluster`'s scheduler
/// with one thread; returns the connection and the first frame it was
/// sent (its registration, and what came with it).
fn raw_worker(cluster: &Cluster) -> (TcpStream, Vec<protocol::ToWorker>) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = raw(cluster.scheduler.address(), Role::Worker, &cluster.auth);
    s.write_all(&protocol::frame(&ToScheduler::RegisterWorker {
        address: "127.0.0.1:1".into(),
        threads: 1,
        resources: Default::default(),
        name: format!("raw-{n}"),
    }))
    .unwrap();
    let first = read_frame::<protocol::ToWorker>(&mut s);
    assert!(matches!(first[0], protocol::ToWorker::Registered { .. }));
    (s, first)
}

/// A `TaskFinished` for run `run` of `key` with these figures and
/// `inline` bytes.
fn report(key: [u8; 32], run: u64, nbytes: u64, duration_ns: u64, inline: usize) -> Vec<u8> {
    protocol::frame(&ToScheduler::TaskFinished {
        key,
        run,
        nbytes,
        duration_ns,
        value: (inline > 0).then(|| Arc::from(vec![0u8; inline])),
        thread: 0,
    })
}

/// Reads from a raw worker's connection until `pick` finds a message.
fn read_until<T>(s: &mut TcpStream, mut pick: impl FnMut(protocol::ToWorker) -> Option<T>) -> T {
    loop {
        for msg in read_frame::<protocol::ToWorker>(s) {
            if let Some(found) = pick(msg) {
                return found;
            }
        }
    }
}

/// Scheduler rule S6 over a real connection: a worker's report of a run
/// released before the key was sent to it again is not the new run's. A
/// raw worker is sent a task, the client lets go of it and asks again;
/// the first run's failure (sent, as it were, before the worker read the
/// release) arrives after the second `Compute`. Before runs were named,
/// the client got that failure; now it gets the second run's value.
#[test]
fn a_failure_of_a_released_run_is_not_the_next_runs_on_the_same_worker() {
    let cluster = Cluster::new(0, 1);
    let client = cluster.client();
    let (mut s, _) = raw_worker(&cluster);
    let plan = || {
        let mut g = Graph::new(&cluster.shared);
        let a = g.value(7);
        g.output(a);
        (g.key(a).0, g.build())
    };
    let (key, first_plan) = plan();
    let compute_of = |s: &mut TcpStream| {
        read_until(s, |m| match m {
            protocol::ToWorker::Compute { key: k, run, .. } if k == key => Some(run),
            _ => None,
        })
    };
    let first = Collect::new(1);
    first.submit(&client, first_plan);
    let first_run = compute_of(&mut s);
    first.cancel.store(true, Ordering::SeqCst);
    assert_eq!(
        first.wait()[0].clone().unwrap_err().kind,
        FailureKind::Cancelled
    );
    read_until(&mut s, |m| {
        matches!(m, protocol::ToWorker::Release { key: k } if k == key).then_some(())
    });
    let second = Collect::new(1);
    second.submit(&client, plan().1);
    let second_run = compute_of(&mut s);
    assert_ne!(first_run, second_run, "each Compute names a new run");
    let stale = ToScheduler::TaskErred {
        key,
        run: first_run,
        failure: protocol::WireFailure::new(
            key,
            "value".into(),
            protocol::WireFailureKind::TimedOut { after_ms: 1 },
            "the first run timed out".into(),
        ),
    };
    let done = ToScheduler::TaskFinished {
        key,
        run: second_run,
        nbytes: 1,
        duration_ns: 1_000,
        value: Some(Arc::from(postcard::to_stdvec(&7i64).unwrap())),
        thread: 1,
    };
    s.write_all(&protocol::frame(&stale)).unwrap();
    s.write_all(&protocol::frame(&done)).unwrap();
    assert_eq!(second.wait(), vec![Ok(7)]);
}

#[test]
fn a_worker_reporting_sizes_or_durations_out_of_range_is_closed_and_its_task_runs_elsewhere() {
    let mut cluster = Cluster::new(0, 1);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let b = g.op("inc", 0, &[a]);
    let c = g.op("add", 0, &[a, b]);
    g.output(c);
    let first = g.key(a).0;
    let got = Collect::new(1);
    got.submit(&client, g.build());
    // Twice (a third death would fail the task, scheduler rule S7): a
    // worker answers the first task it is sent with an impossible report.
    for (nbytes, duration_ns) in [(u64::MAX, u64::MAX), (u64::MAX, 1_000)] {
        let (mut s, mut msgs) = raw_worker(&cluster);
        let (key, run) = loop {
            let compute = msgs.into_iter().find_map(|m| match m {
                protocol::ToWorker::Compute { key, run, .. } => Some((key, run)),
                _ => None,
            });
            if let Some(compute) = compute {
                break compute;
            }
            msgs = read_frame(&mut s);
        };
        assert_eq!(key, first, "the graph's ready task");
        s.write_all(&report(key, run, nbytes, duration_ns, 0))
            .unwrap();
        wait_closed(&mut s);
        cluster.eventually("the worker to be dropped", |c| c.scheduler.workers() == 0);
    }
    // A real worker computes the graph from the start.
    cluster.add_worker(1);
    assert_eq!(got.wait(), vec![Ok(3)]);
    // Any report out of range closes its worker, asked for or not.
    let max_ns = protocol::MAX_TASK_DURATION.as_nanos() as u64;
    let too_long = protocol::INLINE_BYTES + 1;
    for (nbytes, duration_ns, inline) in [
        (protocol::MAX_FRAME as u64 + 1, 1_000, 0),
        (8, u64::MAX, 0),
        (8, max_ns + 1, 0),
        (too_long as u64, 1_000, too_long),
    ] {
        let (mut s, _) = raw_worker(&cluster);
        s.write_all(&report(first, 1, nbytes, duration_ns, inline))
            .unwrap();
        wait_closed(&mut s);
        cluster.eventually("the worker to be dropped", |c| c.scheduler.workers() == 1);
    }
    diamond(&cluster, &client, 8);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

/// `scale`: its payload's i64 times `factor`. Two registries with different
/// factors stand for two builds of one program that disagree on what
/// `scale` computes (an edited function, same path).
struct Scale {
    factor: i64,
    payload: Vec<u8>,
}

impl Op for Scale {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        let x: i64 = postcard::from_bytes(&self.payload)
            .map_err(|e| OpError::failed(format!("bad payload: {e}")))?;
        // Over the client's eager fetch size, so a kept handle leaves the
        // value on the cluster and holds its key there; the encoding starts
        // with the i64, which is all `int` reads.
        Ok(Arc::new((x * self.factor, vec![0u8; 70 << 10])))
    }

    fn name(&self) -> &str {
        "scale"
    }
}

/// The test registry, with `scale` of a given factor.
struct Versioned {
    factor: i64,
    rest: TestRegistry,
}

impl Registry for Versioned {
    fn resolve(&self, task: &WireTask) -> Result<Arc<dyn Op>, WireError> {
        if task.function == "scale" {
            return Ok(Arc::new(Scale {
                factor: self.factor,
                payload: task.payload.clone(),
            }));
        }
        self.rest.resolve(task)
    }
}

/// A worker of `build` whose `scale` multiplies by `factor`.
fn worker_of(cluster: &Cluster, build: BuildId, factor: i64) -> WorkerHandle {
    let registry = Arc::new(Versioned {
        factor,
        rest: TestRegistry {
            shared: cluster.shared.clone(),
        },
    });
    let options = worker::Options::default()
        .threads(1)
        .auth(cluster.auth.clone());
    worker::spawn_as(&cluster.address, registry, options, build).unwrap()
}

/// `scale(x)` for each of `xs`, one output each: the same keys whoever
/// builds it.
fn scale(cluster: &Cluster, xs: &[i64]) -> Arc<Plan> {
    let mut g = Graph::new(&cluster.shared);
    for &x in xs {
        let t = g.op("scale", x, &[]);
        g.output(t);
    }
    g.build()
}

const OLD: BuildId = BuildId::from_bytes([1; 32]);
const NEW: BuildId = BuildId::from_bytes([2; 32]);

/// A scheduler with one worker of build `OLD` (`scale` is `x * 1`) and one
/// of `NEW` (`x * 1000`), and a client of each build.
fn two_builds() -> (Cluster, [WorkerHandle; 2], [Client; 2]) {
    let cluster = Cluster::new(0, 1);
    let workers = [worker_of(&cluster, OLD, 1), worker_of(&cluster, NEW, 1000)];
    let clients =
        [OLD, NEW].map(|b| Client::connect_as(&cluster.address, cluster.auth.clone(), b).unwrap());
    assert_eq!(cluster.scheduler.workers(), 2);
    (cluster, workers, clients)
}

/// `scale(41)` kept on the cluster by `client`: its handle.
fn keep_scale_41(cluster: &Cluster, client: &Client) -> Value {
    let kept = Keep::new(1, true);
    kept.submit(client, scale(cluster, &[41]));
    kept.wait().pop().unwrap().unwrap()
}

#[test]
fn builds_with_the_same_keys_each_get_their_own_value() {
    let (cluster, _workers, [old, new]) = two_builds();
    // The old build computes `scale(41)` and keeps it in memory.
    let old_value = keep_scale_41(&cluster, &old);
    assert_eq!(fetch_int(&old_value), 41);
    // The same key from the new build is computed by the new build's
    // worker: never answered with the old build's value.
    let got = Collect::new(1);
    got.submit(&new, scale(&cluster, &[41]));
    assert_eq!(got.wait(), vec![Ok(41_000)]);
    // Both kept at once: one task per build under the same key.
    let new_value = keep_scale_41(&cluster, &new);
    assert_eq!(remote(&new_value).key(), remote(&old_value).key());
    assert_eq!(fetch_int(&new_value), 41_000);
    assert_eq!(cluster.scheduler.tasks(), 2);
    // And the old build still gets its own, from its own memory.
    let got = Collect::new(1);
    got.submit(&old, scale(&cluster, &[41]));
    assert_eq!(got.wait(), vec![Ok(41)]);
    drop((old_value, new_value));
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn a_worker_closes_a_scheduler_that_asks_for_a_heartbeat_out_of_range() {
    use protocol::{ProtocolError, ToWorker, WorkerId};
    for every_ms in [0, protocol::MAX_HEARTBEAT.as_millis() as u64 + 1, u64::MAX] {
        // A scheduler of its own making, on a plain socket.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("tcp://{}", listener.local_addr().unwrap());
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut hello = [0u8; protocol::HANDSHAKE_FRAME];
            s.read_exact(&mut hello).unwrap();
            let hello = Handshake::parse(&hello).unwrap();
            assert_eq!((hello.role, hello.authenticates), (Role::Worker, false));
            let answer = Handshake::new(Role::Scheduler, BuildId::NONE, [2; 32], false);
            s.write_all(&answer.to_frame()).unwrap();
            let register = read_frame::<ToScheduler>(&mut s);
            assert!(matches!(
                register[..],
                [ToScheduler::RegisterWorker { threads: 1, .. }]
            ));
            s.write_all(&protocol::frame(&ToWorker::Registered { id: WorkerId(7) }))
                .unwrap();
            s.write_all(&protocol::frame(&ToWorker::Heartbeat { every_ms }))
                .unwrap();
            wait_closed(&mut s);
        });
        let (shared, _) = support::Shared::new();
        let registry = Arc::new(support::TestRegistry { shared });
        // Without authentication, which the fake scheduler does not do.
        let options = worker::Options::default().auth(Auth::Insecure);
        let worker = worker::spawn_with(&address, registry, options).unwrap();
        assert_eq!(worker.id(), 7);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(worker.join()));
        match rx.recv_timeout(TIMEOUT).expect("the worker to stop") {
            Err(rask_distributed::Error::Protocol {
                reason:
                    ProtocolError::OutOfRange {
                        what: "Heartbeat.every_ms",
                        value,
                        ..
                    },
            }) => assert_eq!(value, every_ms),
            other => panic!("every_ms = {every_ms}: {other:?}"),
        }
        fake.join().unwrap();
    }
}

/// The scheduler's default task timeout fails a task that runs too long;
/// the worker's thread is not held by it, and other work goes on.
#[test]
fn the_scheduler_default_timeout_fails_a_hung_task() {
    let options =
        rask_distributed::scheduler::Options::default().task_timeout(Duration::from_millis(50));
    let cluster = Cluster::with_options(1, 1, options);
    let client = cluster.client();
    let mut g = Graph::new(&cluster.shared);
    let hung = g.op("gate", 0, &[]);
    g.output(hung);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    match &got.wait()[0] {
        Err(f) => assert_eq!(f.kind, FailureKind::TimedOut(Duration::from_millis(50))),
        Ok(v) => panic!("a hung task gave {v}"),
    }
    // The only worker thread is free again: a graph of fresh tasks runs
    // (each with a timeout of its own: a busy machine may delay a task by
    // the default's 50 ms).
    diamond_of(&client, Graph::salted(&cluster.shared, 77).timed(TIMEOUT));
    cluster.shared.open_gate(1);
}

/// A refused graph leaves the client's earlier references alone: the
/// client releases every wanted key once, refused or not.
#[test]
fn a_refused_graph_does_not_drop_a_reference_held_before() {
    let (cluster, [old_worker, _new_worker], [old, _new]) = two_builds();
    let held = keep_scale_41(&cluster, &old);
    old_worker.stop();
    cluster.eventually("the old worker gone", |c| c.scheduler.workers() == 1);
    let got = Collect::new(1);
    got.submit(&old, scale(&cluster, &[41]));
    assert!(got.wait()[0].is_err());
    // The refused submission ended and released its key; a second one,
    // answered after that release (one connection is handled in order),
    // finds the handle's reference still keeping the task remembered.
    let after = Collect::new(1);
    after.submit(&old, scale(&cluster, &[99]));
    assert!(after.wait()[0].is_err());
    assert_eq!(cluster.scheduler.tasks(), 1);
    drop(held);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

#[test]
fn a_build_without_workers_gets_an_error_naming_the_builds() {
    let (cluster, _workers, [old, _new]) = two_builds();
    let _held = keep_scale_41(&cluster, &old);
    let stray = BuildId::from_bytes([3; 32]);
    let client = Client::connect_as(&cluster.address, cluster.auth.clone(), stray).unwrap();
    let plan = scale(&cluster, &[41, 42]);
    let keys: Vec<_> = plan.outputs().iter().map(|&t| *plan.key(t)).collect();
    let got = Collect::new(2);
    got.submit(&client, plan);
    for (out, key) in got.wait().into_iter().zip(keys) {
        let failure = out.unwrap_err();
        assert_eq!(failure.key, key);
        assert_eq!(&*failure.name, "scale");
        let message = &failure.message;
        assert!(
            message.starts_with(&format!(
                "no worker runs this program's build: client {stray}, workers "
            )),
            "{message}"
        );
        for build in [OLD, NEW] {
            assert!(message.contains(&format!("{build} (1)")), "{message}");
        }
        // And what to do about it.
        assert!(
            message.contains("start workers of this build, `RASK_WORKER=ADDRESS ./program`")
                && message.contains("RASK_SCHEDULER=local:N"),
            "{message}"
        );
    }
    // Refused, not added: only the old build's kept task is remembered.
    assert_eq!(cluster.scheduler.tasks(), 1);
}

#[test]
fn with_no_worker_at_all_a_graph_waits_for_one_of_its_build() {
    let cluster = Cluster::new(0, 1);
    let client = Client::connect_as(&cluster.address, cluster.auth.clone(), NEW).unwrap();
    let got = Collect::new(1);
    got.submit(&client, scale(&cluster, &[41]));
    cluster.eventually("the graph to be accepted", |c| c.scheduler.tasks() == 1);
    let _worker = worker_of(&cluster, NEW, 1000);
    assert_eq!(got.wait(), vec![Ok(41_000)]);
}

#[test]
fn a_data_port_serves_only_readers_of_its_build() {
    let (cluster, [old_worker, _], [old, _]) = two_builds();
    let held = keep_scale_41(&cluster, &old);
    let key = remote(&held).key().0;
    let data = old_worker.data_address();
    let get = protocol::frame(&ToPeer::GetData { keys: vec![key] });
    // A reader of another build: closed after the handshake, sent nothing.
    let mut foreign = raw_as(data, Role::Peer, NEW, &cluster.auth);
    let _ = foreign.write_all(&get);
    assert!(read_until_closed(&mut foreign).is_empty());
    // A reader of the worker's build is served, by a data server that
    // names that build.
    let mut s = TcpStream::connect(data).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let hello = match support::shake(&mut s, Role::Peer, OLD, Some(cluster.token())) {
        support::Shook::Done(hello) => hello,
        other => panic!("{other:?}"),
    };
    assert_eq!((hello.role, hello.build), (Role::DataServer, OLD));
    s.write_all(&get).unwrap();
    match read_frame::<FromPeer>(&mut s).as_slice() {
        [FromPeer::Data { key: k, bytes }] => {
            assert_eq!(*k, key);
            assert_eq!(postcard::from_bytes::<i64>(bytes).unwrap(), 41);
        }
        other => panic!("unexpected {other:?}"),
    }
    // The worker keeps computing for its build.
    let got = Collect::new(1);
    got.submit(&old, scale(&cluster, &[7]));
    assert_eq!(got.wait(), vec![Ok(7)]);
}

#[test]
fn the_scheduler_announces_no_build() {
    let cluster = Cluster::new(0, 1);
    let mut s = TcpStream::connect(cluster.scheduler.address()).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let hello = match support::shake(&mut s, Role::Client, OLD, Some(cluster.token())) {
        support::Shook::Done(hello) => hello,
        other => panic!("{other:?}"),
    };
    assert_eq!((hello.role, hello.build), (Role::Scheduler, BuildId::NONE));
}

// ----- issue #14: a cluster that lets no one in -----

/// The ways into a port without the cluster's token: no token at all, a
/// token of another cluster, and a handshake of protocol version 4 (which
/// had no authentication). Each connects to `addr` as `role`, finishes
/// what handshake it can, sends `then`, and returns everything it received
/// until the port closed the connection.
fn without_the_token(addr: SocketAddr, role: Role, then: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut got = Vec::new();
    for way in ["no token", "wrong token", "version 4"] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut received = Vec::new();
        match way {
            "no token" => match support::shake(&mut s, role, BuildId::current(), None) {
                support::Shook::Refused(hello) => {
                    assert!(hello.authenticates);
                    received.extend(hello.to_frame());
                }
                other => panic!("{way}: {other:?}"),
            },
            "wrong token" => {
                let stranger = Token::generate().unwrap();
                match support::shake(&mut s, role, BuildId::current(), Some(&stranger)) {
                    support::Shook::WrongProof => {}
                    other => panic!("{way}: {other:?}"),
                }
                // Goes on regardless, with a proof of its own making.
                let _ = s.write_all(&[32, 0, 0, 0]);
                let _ = s.write_all(&[0xab; 32]);
            }
            _ => {
                let mut v4 = vec![40, 0, 0, 0, b'R', b'A', b'S', b'K', 4, 0];
                v4.extend([if role == Role::Peer { 3 } else { 1 }, 0]);
                v4.extend(BuildId::current().as_bytes());
                let _ = s.write_all(&v4);
            }
        }
        let _ = s.write_all(then);
        received.extend(read_until_closed(&mut s));
        got.push((way, received));
    }
    got
}

/// Checks what `without_the_token` received: the port's hello and
/// nothing it would only tell a process of the cluster.
fn nothing_but_refusals(got: Vec<(&'static str, Vec<u8>)>) {
    for (way, received) in got {
        match way {
            // The hello it was answered (read by `shake`), nothing after.
            "no token" => assert_eq!(received.len(), protocol::HANDSHAKE_FRAME, "{way}"),
            // Only what was read by `shake`: nothing after its proof.
            "wrong token" => assert!(received.is_empty(), "{way}: {received:?}"),
            // A version-4 handshake naming this version, nothing after.
            _ => {
                assert_eq!(received.len(), 44, "{way}: {received:?}");
                assert_eq!(&received[8..10], &protocol::VERSION.to_le_bytes());
            }
        }
    }
}

#[test]
fn a_client_without_the_token_gets_no_value_not_even_a_small_one() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    // x = 41 + 1 stays in memory, its bytes at the scheduler (a small
    // value travels with its report), while `gate` waits on it.
    let mut g = Graph::new(&cluster.shared);
    let v = g.value(41);
    let x = g.op("inc", 0, &[v]);
    let y = g.op("gate", 0, &[x]);
    g.output(y);
    let secret = g.key(x).0;
    let got = Collect::new(1);
    got.submit(&client, g.build());
    cluster.wait_started();
    // Another client of the cluster is told x's value, bytes and all:
    // what an outsider must not get.
    let insider = support::raw(cluster.scheduler.address(), Role::Client, &cluster.auth);
    let ask = protocol::frame(&ToScheduler::UpdateGraph {
        tasks: Vec::new(),
        wanted: vec![secret],
    });
    let mut insider = insider;
    insider.write_all(&ask).unwrap();
    let told = loop {
        let msgs = read_frame::<protocol::ToClient>(&mut insider);
        if let Some(m) = msgs
            .into_iter()
            .find(|m| matches!(m, protocol::ToClient::KeyInMemory { .. }))
        {
            break m;
        }
    };
    assert!(
        matches!(&told, protocol::ToClient::KeyInMemory { key, value: Some(_), .. } if *key == secret),
        "{told:?}"
    );
    // Outsiders asking the same get the scheduler's hello, and nothing.
    nothing_but_refusals(without_the_token(
        cluster.scheduler.address(),
        Role::Client,
        &ask,
    ));
    cluster.shared.open_gate(1);
    assert_eq!(got.wait(), vec![Ok(42)]);
}

#[test]
fn a_data_port_gives_nothing_to_a_reader_without_the_token() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let values = keep_big(&cluster, &client, 50);
    let key = remote(&values[0]).key().0;
    let data = cluster.workers[0].as_ref().unwrap().data_address();
    // With the token, the value is there to take.
    assert!(data_port_holds(&cluster.auth, data, key));
    let get = protocol::frame(&ToPeer::GetData { keys: vec![key] });
    nothing_but_refusals(without_the_token(data, Role::Peer, &get));
    // The worker still serves the cluster.
    assert_eq!(fetch_len(&values[0]), BIG as usize);
}

#[test]
fn a_worker_without_the_token_cannot_register() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let register = protocol::frame(&ToScheduler::RegisterWorker {
        address: "127.0.0.1:1".into(),
        threads: 1,
        resources: Default::default(),
        name: "no-token".into(),
    });
    nothing_but_refusals(without_the_token(
        cluster.scheduler.address(),
        Role::Worker,
        &register,
    ));
    assert_eq!(cluster.scheduler.workers(), 1);
    // A real worker process without the token, or with another, is
    // refused with an error saying so, and is not retried.
    for (auth, expected) in [
        (Auth::Insecure, rask_distributed::AuthError::TokenRequired),
        (
            Auth::Token(Token::generate().unwrap()),
            rask_distributed::AuthError::WrongToken,
        ),
    ] {
        let options = worker::Options::default().auth(auth).death_timeout(TIMEOUT);
        match worker::spawn_with(&cluster.address, cluster.registry(), options) {
            Err(rask_distributed::Error::Auth { reason, .. }) => assert_eq!(reason, expected),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let err = worker::spawn_with(
        &cluster.address,
        cluster.registry(),
        worker::Options::default().auth(Auth::Insecure),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!(
            "the scheduler at {} requires a token; set RASK_TOKEN",
            cluster.scheduler.address()
        )),
        "{err}"
    );
    assert_eq!(cluster.scheduler.workers(), 1);
    diamond(&cluster, &client, 60);
}

#[test]
fn a_forged_copy_and_a_forged_failed_fetch_do_not_make_a_client_read_forged_bytes() {
    let cluster = Cluster::new(1, 1);
    let owner = cluster.client();
    let values = keep_big(&cluster, &owner, 70);
    let key = remote(&values[0]).key().0;
    let honest = protocol::WorkerId(cluster.workers[0].as_ref().unwrap().id());
    // A data port of the rogue's: anyone who reads from it gets forged
    // bytes, as the issue observed.
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    fake.set_nonblocking(true).unwrap();
    let fake_address = fake.local_addr().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let contacted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forger = {
        let (stop, contacted, token) = (stop.clone(), contacted.clone(), cluster.token().clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + TIMEOUT;
            while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                let Ok((mut s, _)) = fake.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                contacted.store(true, Ordering::SeqCst);
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                if support::accept_shake(&mut s, Role::DataServer, &token) {
                    let forged = postcard::to_stdvec(&vec![6u8; BIG as usize]).unwrap();
                    let _ = read_frame::<ToPeer>(&mut s);
                    let _ = s.write_all(&protocol::frame(&FromPeer::Data {
                        key,
                        bytes: forged.into(),
                    }));
                }
            }
        })
    };
    // The rogue holds the token (an insider, at worst a buggy worker): it
    // registers with the fake port, claims a copy of the owner's key it
    // was never asked to fetch, and says the honest holder failed it. An
    // unknown key's copy, last, is answered with a `Release` once the
    // scheduler handled all three.
    let mut rogue = raw(cluster.scheduler.address(), Role::Worker, &cluster.auth);
    rogue
        .write_all(&protocol::frame(&ToScheduler::RegisterWorker {
            address: fake_address.to_string(),
            threads: 1,
            resources: Default::default(),
            name: "rogue".into(),
        }))
        .unwrap();
    let _ = read_frame::<protocol::ToWorker>(&mut rogue);
    let barrier = [0xee; 32];
    let mut forged = Vec::new();
    for msg in [
        ToScheduler::DataAdded { key },
        ToScheduler::FetchFailed {
            key,
            holder: honest,
        },
        ToScheduler::DataAdded { key: barrier },
    ] {
        forged.extend(protocol::frame(&msg));
    }
    rogue.write_all(&forged).unwrap();
    let mut released = Vec::new();
    while !released.contains(&barrier) {
        for msg in read_frame::<protocol::ToWorker>(&mut rogue) {
            if let protocol::ToWorker::Release { key } = msg {
                released.push(key);
            }
        }
    }
    // Its claimed copy was refused: it was told to drop it.
    assert_eq!(released, vec![key, barrier]);
    // A fresh client asking for the key reads the honest worker's bytes.
    let fresh = cluster.client();
    let mut g = Graph::salted(&cluster.shared, 70);
    let big = g.task("big", postcard::to_stdvec(&BIG).unwrap(), &[]);
    assert_eq!(g.key(big).0, key);
    g.output(big);
    let kept = Keep::new(1, false);
    kept.submit(&fresh, g.build());
    let value = kept.wait().pop().unwrap().unwrap();
    let bytes: Vec<u8> = match value.downcast_ref::<rask_executor::Encoded>() {
        Some(e) => postcard::from_bytes(&e.0).unwrap(),
        None => panic!("not fetched: {value:?}"),
    };
    assert_eq!(bytes.len(), BIG as usize);
    assert!(
        bytes.iter().all(|&b| b == 7),
        "forged bytes reached a client"
    );
    assert!(
        !contacted.load(Ordering::SeqCst),
        "a client read from the rogue"
    );
    assert_eq!(
        cluster.shared.runs.load(Ordering::SeqCst),
        1,
        "never recomputed"
    );
    stop.store(true, Ordering::SeqCst);
    forger.join().unwrap();
    drop(values);
}

// ---------------------------------------------------------------------------
// Limits before trust (issue #14): what a peer can make a process hold.
// ---------------------------------------------------------------------------

/// Set in a copy of this test binary that runs one test alone.
const ISOLATED_ENV: &str = "RASK_TEST_ISOLATED";

/// What an isolated test prints last, so the parent knows it ran.
const ISOLATED_OK: &str = "rask-isolated-test-passed";

/// Runs `body` as the test `name` alone in a fresh process (this test
/// binary, filtered down to it): memory figures of the process are then
/// the test's own, not those of tests running beside it.
fn isolated(name: &str, body: impl FnOnce()) {
    if std::env::var(ISOLATED_ENV).as_deref() == Ok(name) {
        body();
        println!("{ISOLATED_OK}");
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(ISOLATED_ENV, name)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = done.send(text);
    });
    // Three test timeouts: the body waits with `TIMEOUT` at most a few times.
    let text = match output.recv_timeout(3 * TIMEOUT) {
        Ok(text) => text,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not finish in its own process");
        }
    };
    let status = child.wait().unwrap();
    assert!(status.success(), "{name} failed in its own process: {text}");
    assert!(text.contains(ISOLATED_OK), "{name} did not run: {text}");
}

/// This process's resident memory, in bytes (`VmRSS`).
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

const MIB: u64 = 1 << 20;

/// Sends `prefix`, then junk up to `total` bytes, until done or the other
/// side closes; returns the bytes it got through.
fn flood(addr: SocketAddr, prefix: Vec<u8>, total: usize) -> std::thread::JoinHandle<usize> {
    flood_as(addr, None, prefix, total)
}

/// [`flood`], after a handshake proving `auth` when given.
fn flood_as(
    addr: SocketAddr,
    auth: Option<Auth>,
    prefix: Vec<u8>,
    total: usize,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut s = match &auth {
            Some(auth) => raw(addr, Role::Client, auth),
            None => TcpStream::connect(addr).unwrap(),
        };
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        if s.write_all(&prefix).is_err() {
            return 0;
        }
        let chunk = vec![0xffu8; 1 << 20];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            if s.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n;
        }
        // Wait for the verdict: the scheduler closes the connection.
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        sent
    })
}

/// A frame prefix announcing `len` bytes.
fn announce(len: usize) -> Vec<u8> {
    (len as u32).to_le_bytes().to_vec()
}

/// The peak of this process's resident memory while `floods` run, and
/// whether `meanwhile` succeeded while they ran.
fn peak_while(floods: Vec<std::thread::JoinHandle<usize>>, meanwhile: impl FnOnce()) -> u64 {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let sampler = std::thread::spawn(move || {
        let mut peak = resident();
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(Duration::from_millis(2))
        {
            peak = peak.max(resident());
        }
        peak
    });
    meanwhile();
    for f in floods {
        f.join().unwrap();
    }
    drop(stop);
    sampler.join().unwrap()
}

#[test]
fn floods_of_big_frames_before_and_after_the_handshake_keep_the_scheduler_small() {
    isolated(
        "floods_of_big_frames_before_and_after_the_handshake_keep_the_scheduler_small",
        || {
            // A budget of 64 MiB for frames over 64 KiB, half of it the
            // lane: the 32 MiB frames below share the pool as they arrive,
            // and go through the lane one at a time once it is spent.
            let options = rask_distributed::scheduler::Options::default().frame_budget(64 << 20);
            let cluster = Cluster::with_options(1, 1, options);
            let client = cluster.client();
            diamond(&cluster, &client, 0);
            let addr = cluster.scheduler.address();
            let before = resident();
            // Three connections each, announcing 300 MiB without a
            // handshake, or after an authenticated one (over half the
            // budget: refused at once), and 32 MiB after one, sent whole:
            // at most the budget's worth of them is read at once, each ends
            // the connection as malformed.
            let auth = || Some(cluster.auth.clone());
            let floods: Vec<_> = (0..3)
                .flat_map(|_| {
                    [
                        flood(addr, announce(300 << 20), 300 << 20),
                        flood_as(addr, auth(), announce(300 << 20), 300 << 20),
                        flood_as(addr, auth(), announce(32 << 20), 32 << 20),
                    ]
                })
                .collect();
            // The scheduler serves a client while the frames wait: small
            // frames never wait for the budget.
            let peak = peak_while(floods, || diamond(&cluster, &client, 1));
            let grown = peak.saturating_sub(before);
            assert!(
                grown < 100 * MIB,
                "the scheduler's process grew by {} MiB",
                grown / MIB
            );
            diamond(&cluster, &cluster.client(), 2);
        },
    );
}

/// A client of another build: each graph it sends is refused at once
/// (scheduler rule 6), with one failure per wanted key.
fn foreign_client(addr: SocketAddr, auth: &Auth) -> TcpStream {
    let foreign = BuildId::from_bytes([0x5a; 32]);
    support::raw_as(addr, Role::Client, foreign, auth)
}

#[test]
fn a_client_that_never_reads_is_closed_and_the_scheduler_stays_small() {
    isolated(
        "a_client_that_never_reads_is_closed_and_the_scheduler_stays_small",
        || {
            let options = rask_distributed::scheduler::Options::default()
                .stall_timeout(Duration::from_secs(1));
            let cluster = Cluster::with_options(1, 1, options);
            let client = cluster.client();
            diamond(&cluster, &client, 0);
            let before = resident();
            let mut s = foreign_client(cluster.scheduler.address(), &cluster.auth);
            cluster.eventually("two clients", |c| c.scheduler.clients() == 2);
            // 500 wanted keys of tasks named with 2 KiB each: a frame of
            // 1 MB, answered with as much in failures. 400 of them would
            // queue 400 MB unbounded.
            let name: Arc<str> = "n".repeat(2 << 10).into();
            let keys: Vec<[u8; 32]> = (0..500u32)
                .map(|i| {
                    let mut key = [0u8; 32];
                    key[..4].copy_from_slice(&i.to_le_bytes());
                    key
                })
                .collect();
            let graph = protocol::frame(&ToScheduler::UpdateGraph {
                tasks: keys
                    .iter()
                    .map(|&key| protocol::TaskSpec {
                        key,
                        name: name.clone(),
                        function: "inc".into(),
                        payload: Arc::from(&[][..]),
                        deps: Vec::new(),
                        timeout_ms: None,
                        retries: 0,
                        annotations: Default::default(),
                    })
                    .collect(),
                wanted: keys,
            });
            s.set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut peak = before;
            let mut sent = 0;
            // The scheduler stops reading the client once its answers pile
            // up: then a write blocks past its timeout.
            while sent < 400 && s.write_all(&graph).is_ok() {
                sent += 1;
                peak = peak.max(resident());
            }
            assert!(sent < 400, "the scheduler read every graph");
            // Closed once it read nothing for the stall timeout; never
            // read from here, or it would drain its backlog.
            cluster.eventually("the client to be closed", |c| c.scheduler.clients() == 1);
            peak = peak.max(resident());
            let grown = peak.saturating_sub(before);
            assert!(
                grown < 160 * MIB,
                "the scheduler's process grew by {} MiB",
                grown / MIB
            );
            diamond(&cluster, &client, 1);
        },
    );
}

#[test]
fn a_frame_trickled_byte_by_byte_is_closed_after_the_stall_timeout() {
    let options =
        rask_distributed::scheduler::Options::default().stall_timeout(Duration::from_millis(500));
    let cluster = Cluster::with_options(1, 1, options);
    let client = cluster.client();
    let mut s = raw(cluster.scheduler.address(), Role::Client, &cluster.auth);
    cluster.eventually("two clients", |c| c.scheduler.clients() == 2);
    // A frame of 1 000 bytes at a byte every 200 ms would take 200 s.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let mut w = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        let _ = w.write_all(&1000u32.to_le_bytes());
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(Duration::from_millis(200))
        {
            if w.write_all(&[0]).is_err() {
                break;
            }
        }
    });
    cluster.eventually("the slow client to be closed", |c| {
        c.scheduler.clients() == 1
    });
    wait_closed(&mut s);
    drop(stop);
    trickle.join().unwrap();
    diamond(&cluster, &client, 1);
}

#[test]
fn a_silent_client_is_closed_and_an_idle_one_kept_by_its_heartbeats() {
    let timeout = Duration::from_secs(3);
    let options = rask_distributed::scheduler::Options::default().client_timeout(timeout);
    let cluster = Cluster::with_options(1, 1, options);
    let client = cluster.client();
    // A task in flight for the idle client: were its connection dropped,
    // the output would fail as lost.
    let mut g = Graph::new(&cluster.shared);
    let a = g.value(1);
    let slow = g.op("gate", 0, &[a]);
    g.output(slow);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    cluster.wait_started();
    // A client that passes its handshake, then says nothing.
    let mut silent = raw(cluster.scheduler.address(), Role::Client, &cluster.auth);
    cluster.eventually("two clients", |c| c.scheduler.clients() == 2);
    wait_closed(&mut silent);
    assert_eq!(cluster.scheduler.clients(), 1);
    // The real client, idle all along, is kept past twice the timeout.
    std::thread::sleep(2 * timeout);
    assert_eq!(cluster.scheduler.clients(), 1);
    cluster.shared.open_gate(1);
    assert_eq!(got.wait(), vec![Ok(1)]);
    diamond(&cluster, &client, 1);
}

/// Scheduler rule 4 and `net` rule 9: a client whose one frame takes
/// longer than the client timeout to arrive, faster than the minimum rate,
/// is not silent: its bytes count as heard, and its frame is handled.
/// Before, only a whole frame counted, and the client was closed as
/// silent in the middle of it.
#[test]
fn a_client_sending_one_frame_for_longer_than_the_client_timeout_is_heard_and_answered() {
    let timeout = Duration::from_secs(2);
    let options = rask_distributed::scheduler::Options::default().client_timeout(timeout);
    let cluster = Cluster::with_options(1, 1, options);
    // Of another build than the workers: its graph is refused at once
    // (scheduler rule 6), one `KeyErred` per wanted key, so the answer
    // says the frame was handled without running anything.
    let mut s = foreign_client(cluster.scheduler.address(), &cluster.auth);
    let key = [9; 32];
    let graph = protocol::frame(&ToScheduler::UpdateGraph {
        tasks: vec![protocol::TaskSpec {
            key,
            name: "big".into(),
            function: "inc".into(),
            payload: Arc::from(vec![7; 8 << 20]),
            deps: Vec::new(),
            timeout_ms: None,
            retries: 0,
            annotations: Default::default(),
        }],
        wanted: vec![key],
    });
    // 8 MiB in 40 pieces, one each 100 ms: 4 s, twice the client timeout,
    // at 2 MiB/s, twice the minimum rate; and no heartbeat meanwhile.
    let started = std::time::Instant::now();
    for piece in graph.chunks(graph.len().div_ceil(40)) {
        std::thread::sleep(Duration::from_millis(100));
        if let Err(e) = s.write_all(piece) {
            panic!("closed {:?} into the frame: {e}", started.elapsed());
        }
    }
    let answer = loop {
        let mut len = [0u8; 4];
        if let Err(e) = s.read_exact(&mut len) {
            panic!(
                "no answer, {:?} after the frame began: {e}",
                started.elapsed()
            );
        }
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        let msgs: Vec<protocol::ToClient> = protocol::decode_batch(&body).unwrap();
        if let Some(m) = msgs
            .into_iter()
            .find(|m| matches!(m, protocol::ToClient::KeyErred { .. }))
        {
            break m;
        }
    };
    assert!(
        matches!(&answer, protocol::ToClient::KeyErred { key: k, .. } if *k == key),
        "{answer:?}"
    );
}

#[test]
fn a_data_port_answers_a_reader_that_stops_reading_one_value_at_a_time() {
    isolated(
        "a_data_port_answers_a_reader_that_stops_reading_one_value_at_a_time",
        || {
            let cluster = Cluster::new(1, 1);
            let client = cluster.client();
            // A value of 4 MiB, held on the worker.
            const SIZE: u64 = 4 << 20;
            let mut g = Graph::new(&cluster.shared);
            let big = g.task("rask.value", vec![7; SIZE as usize], &[]);
            g.output(big);
            let kept = Keep::new(1, true);
            kept.submit(&client, g.build());
            let held = kept.wait().pop().unwrap().unwrap();
            let key = remote(&held).key().0;
            let data = cluster.workers[0].as_ref().unwrap().data_address();
            let before = resident();
            // 100 copies asked for at once, 400 MiB, and nothing read.
            let mut s = raw(data, Role::Peer, &cluster.auth);
            s.write_all(&protocol::frame(&ToPeer::GetData {
                keys: vec![key; 100],
            }))
            .unwrap();
            // The worker stops at its queue limit, whenever we look.
            let mut peak = before;
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(20));
                peak = peak.max(resident());
            }
            let grown = peak.saturating_sub(before);
            assert!(
                grown < 100 * MIB,
                "the worker's process grew by {} MiB",
                grown / MIB
            );
            // Read, and every answer comes: the data port carries on where
            // it stopped.
            let mut answers = 0;
            while answers < 100 {
                for msg in read_frame::<FromPeer>(&mut s) {
                    match msg {
                        FromPeer::Data { key: k, bytes } => {
                            assert_eq!(k, key);
                            assert_eq!(bytes.len() as u64, SIZE);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                    answers += 1;
                }
            }
            diamond(&cluster, &client, 1);
        },
    );
}

/// Set in the scheduler process of
/// `idle_connections_past_the_file_limit_leave_room_for_a_new_client`.
const LIMITED_ENV: &str = "RASK_TEST_LIMITED_SCHEDULER";

/// The file limit that test runs its scheduler under.
const FILE_LIMIT: usize = 1024;

/// In a process under a file limit: a scheduler, its address on stdout,
/// until stdin closes. Run normally, it does nothing.
#[test]
fn limited_scheduler_entry() {
    if std::env::var_os(LIMITED_ENV).is_none() {
        return;
    }
    // Its log lines on stderr, for the test to count.
    rask_distributed::init_logging();
    // The test's token, in the test's variable.
    let token = Token::parse(&std::env::var(LIMITED_ENV).unwrap()).unwrap();
    let options = rask_distributed::scheduler::Options::default().auth(Auth::Token(token));
    let scheduler =
        rask_distributed::scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap();
    println!("tcp://{}", scheduler.address());
    std::io::stdout().flush().unwrap();
    // Until the test closes stdin, or ends and so closes it.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// How to start a program under a limit of `FILE_LIMIT` open files:
/// `prlimit` (util-linux) or `sh -c 'ulimit -n …'`; `None` when neither
/// works here.
fn under_file_limit(program: &std::path::Path) -> Option<std::process::Command> {
    let works = |c: &mut std::process::Command| {
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let limit = format!("--nofile={FILE_LIMIT}");
    if works(std::process::Command::new("prlimit").args([&limit, "true"])) {
        let mut c = std::process::Command::new("prlimit");
        c.arg(limit).arg(program);
        return Some(c);
    }
    let script = format!("ulimit -n {FILE_LIMIT} && exec \"$0\" \"$@\"");
    if works(std::process::Command::new("sh").args(["-c", &script, "true"])) {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &script]).arg(program);
        return Some(c);
    }
    None
}

/// This process's limit of open files, from `/proc/self/limits`.
fn open_files() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line.split_whitespace().nth(3)? {
        "unlimited" => Some(usize::MAX),
        n => n.parse().ok(),
    }
}

#[test]
fn idle_connections_past_the_file_limit_leave_room_for_a_new_client() {
    const IDLE: usize = 1100;
    const HANDSHAKEN: usize = 100;
    let exe = std::env::current_exe().unwrap();
    let Some(mut command) = under_file_limit(&exe) else {
        eprintln!(
            "skipped: neither `prlimit` nor `sh -c 'ulimit -n'` can lower the file limit here"
        );
        return;
    };
    // This process holds the idle connections' own ends.
    if open_files().is_none_or(|n| n < IDLE + 256) {
        eprintln!("skipped: this process may not open {IDLE} connections");
        return;
    }
    let token = Token::generate().unwrap();
    let auth = Auth::Token(token.clone());
    let started = std::time::Instant::now();
    let mut scheduler = command
        .args([
            "--exact",
            "limited_scheduler_entry",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(LIMITED_ENV, token.expose_secret())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr, read all along: a scheduler logging without limits would
    // otherwise block on a full pipe.
    let mut stderr = scheduler.stderr.take().unwrap();
    let logged = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = std::io::BufReader::new(scheduler.stdout.take().unwrap());
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut stdout, &mut line).is_ok_and(|n| n > 0) {
            // The harness may have written the test's name on this line.
            if let Some(at) = line.find("tcp://") {
                let _ = found.send(line[at..].trim().to_owned());
            }
            // Read on to the end: the harness writes more.
            line.clear();
        }
    });
    let address = address
        .recv_timeout(TIMEOUT)
        .expect("the scheduler's address");
    let addr: SocketAddr = address["tcp://".len()..].parse().unwrap();
    // More idle connections than the scheduler may open files: most say
    // nothing, some pass their handshake as clients and then say nothing.
    let mut idle = Vec::new();
    for i in 0..IDLE {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            continue;
        };
        if i < HANDSHAKEN {
            let _ = s.set_read_timeout(Some(TIMEOUT));
            if !matches!(
                support::shake(&mut s, Role::Client, BuildId::current(), Some(&token)),
                support::Shook::Done(_)
            ) {
                continue;
            }
        }
        idle.push(s);
    }
    assert!(
        idle.len() > FILE_LIMIT,
        "only {} connections opened",
        idle.len()
    );
    // A new worker and a new client get in, and compute.
    let (shared, _) = support::Shared::new();
    let registry = Arc::new(TestRegistry {
        shared: shared.clone(),
    });
    let options = worker::Options::default().auth(auth.clone());
    let worker = worker::spawn_with(&address, registry, options).unwrap();
    let client = Client::connect_with(&address, auth).unwrap();
    let mut g = Graph::new(&shared);
    let a = g.value(20);
    let b = g.op("inc", 0, &[a]);
    let c = g.op("add", 1, &[a, b]);
    g.output(c);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok(42)]);
    drop((client, worker, idle));
    drop(scheduler.stdin.take());
    let deadline = std::time::Instant::now() + TIMEOUT;
    while scheduler.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = scheduler.kill();
            let _ = scheduler.wait();
            panic!("the scheduler did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Hundreds of connections were closed to make room, some logged: at
    // most ten lines of a kind in a window of a second (the next one saying
    // how many were left out), for the few kinds there are: refused,
    // closing, accept failed, client connected, client left, worker joined.
    let logged = logged.join().unwrap();
    let lines = logged
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" INFO "))
        .count();
    let windows = started.elapsed().as_secs() as usize + 2;
    assert!(
        lines <= 6 * 10 * windows,
        "{lines} lines in {windows} windows:\n{logged}"
    );
    assert!(
        logged.contains("closed to make room"),
        "no connection closed to make room:\n{logged}"
    );
}

/// Retirement (scheduler rule S16): a worker running a task and holding a
/// kept value is retired while a named one stays; the task finishes where
/// it runs, the value moves, the retired worker's `join` returns, and
/// nothing runs twice.
#[test]
fn a_retired_worker_finishes_its_task_hands_its_values_over_and_exits() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let values = keep_big(&cluster, &client, 40);
    // A task running on the first worker while it is retired.
    let mut g = Graph::salted(&cluster.shared, 40);
    let a = g.value(5);
    let slow = g.op("gate", 0, &[a]);
    g.output(slow);
    let gated = Keep::new(1, true);
    gated.submit(&client, g.build());
    cluster.wait_started();
    let runs = cluster.shared.runs.load(Ordering::SeqCst);
    let stays = worker::Options::default().name("stays").unwrap();
    cluster.add_worker_with(stays);
    cluster.eventually("two workers", |c| c.scheduler.workers() == 2);
    let info = client.info().unwrap();
    let leaving = info
        .workers
        .iter()
        .find(|w| w.name != "stays")
        .expect("the first worker")
        .name
        .clone();
    assert!(!leaving.is_empty());
    let retiring = {
        let client = client.clone();
        let leaving = leaving.clone();
        std::thread::spawn(move || client.retire_workers(&[leaving]))
    };
    // It waits for the running task, which nothing reruns elsewhere.
    std::thread::sleep(Duration::from_millis(50));
    if retiring.is_finished() {
        // Say what came back: an error, or a retirement that did not wait.
        panic!("retired before the task ended: {:?}", retiring.join());
    }
    cluster.shared.open_gate(1);
    retiring.join().unwrap().unwrap();
    let names: Vec<String> = client
        .info()
        .unwrap()
        .workers
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["stays"]);
    // Told to exit: its worker ends by itself, without an error.
    let (tx, rx) = std::sync::mpsc::channel();
    let first = cluster.workers[0].take().unwrap();
    std::thread::spawn(move || tx.send(first.join()));
    rx.recv_timeout(TIMEOUT)
        .expect("the retired worker ends")
        .unwrap();
    // Everything it held is read from the worker that stays.
    assert_eq!(fetch_len(&values[0]), BIG as usize);
    let slow = gated.wait().pop().unwrap().unwrap();
    assert_eq!(fetch_int(&slow), 5);
    assert_eq!(cluster.shared.runs.load(Ordering::SeqCst), runs);
    assert_eq!(len_of(&cluster, &client, &values[0]), BIG as i64 + 5);
    // Bad requests retire nothing and say why.
    match client.retire_workers(&["nobody"]) {
        Err(rask_distributed::Error::Retire { reason }) => {
            assert!(
                reason.contains("\"nobody\"") && reason.contains("stays"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    match client.retire_workers(&["stays"]) {
        Err(rask_distributed::Error::Retire { reason }) => {
            assert!(reason.contains("none to hold their values"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(cluster.scheduler.workers(), 1);
    drop((values, slow));
}

#[test]
fn a_second_worker_of_the_same_name_is_refused() {
    let mut cluster = Cluster::new(0, 1);
    cluster.add_worker_with(worker::Options::default().name("twin").unwrap());
    let options = worker::Options::default()
        .name("twin")
        .unwrap()
        .auth(cluster.auth.clone());
    match worker::spawn_with(&cluster.address, cluster.registry(), options) {
        Err(rask_distributed::Error::Refused { reason }) => {
            assert!(reason.contains("\"twin\" is taken"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(cluster.scheduler.workers(), 1);
    // The refused connection left nothing behind: a new name joins.
    cluster.add_worker_with(worker::Options::default().name("other").unwrap());
    cluster.eventually("two workers", |c| c.scheduler.workers() == 2);
    let client = cluster.client();
    let mut names: Vec<String> = client
        .info()
        .unwrap()
        .workers
        .into_iter()
        .map(|w| w.name)
        .collect();
    names.sort();
    assert_eq!(names, ["other", "twin"]);
}

/// A directory of its own for a test's Unix socket, removed at the end.
#[cfg(unix)]
struct SocketDir(std::path::PathBuf);

#[cfg(unix)]
impl SocketDir {
    fn new(test: &str) -> SocketDir {
        let dir = std::env::temp_dir().join(format!("rask-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SocketDir(dir)
    }
}

#[cfg(unix)]
impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cluster`'s scheduler reached at `address`: workers added from now on
/// and clients of the cluster connect there.
#[cfg(unix)]
fn over(mut cluster: Cluster, address: String) -> Cluster {
    cluster.address = address;
    cluster
}

/// Workers and clients reach a scheduler through its Unix socket, proving
/// its token there as over TCP; the file goes at shutdown.
#[cfg(unix)]
#[test]
fn workers_and_clients_connect_through_a_unix_socket_with_the_token() {
    let dir = SocketDir::new("unix-socket");
    let path = dir.0.join("scheduler.sock");
    let options = rask_distributed::scheduler::Options::default().unix(&path);
    let cluster = Cluster::with_options(0, 1, options);
    assert_eq!(cluster.scheduler.unix(), Some(path.as_path()));
    let address = format!("unix:{}", path.display());
    let mut cluster = over(cluster, address.clone());
    cluster.add_worker(1);
    cluster.add_worker(1);
    assert_eq!(cluster.scheduler.workers(), 2);
    let client = cluster.client();
    diamond(&cluster, &client, 0);
    // Values travel between workers' data ports (TCP) as before.
    let tcp = Client::connect_with(
        &format!("tcp://{}", cluster.scheduler.address()),
        cluster.auth.clone(),
    )
    .unwrap();
    diamond(&cluster, &tcp, 1);
    // Another token, or none: refused, as over TCP.
    let wrong = Auth::Token(Token::generate().unwrap());
    let err = Client::connect_with(&address, wrong).unwrap_err();
    assert!(err.to_string().starts_with("wrong token"), "{err}");
    let err = Client::connect_with(&address, Auth::Insecure).unwrap_err();
    assert!(err.to_string().contains("requires a token"), "{err}");
    drop((client, tcp));
    cluster.scheduler.shutdown();
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

/// A socket file nothing listens on (its scheduler was killed) is taken
/// over; a socket something answers on, or another file, is not.
#[cfg(unix)]
#[test]
fn a_stale_unix_socket_is_taken_over_and_a_live_one_or_a_file_is_not() {
    use rask_distributed::scheduler::{serve_with, Options};
    let dir = SocketDir::new("unix-stale");
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let stale = dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let live = serve_with(loopback, Options::default().unix(&stale)).unwrap();
    assert_eq!(live.unix(), Some(stale.as_path()));
    // Now something answers there: a second scheduler is refused, and the
    // first keeps its socket.
    let err = serve_with(loopback, Options::default().unix(&stale)).unwrap_err();
    match &err {
        rask_distributed::Error::Io(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(stale.exists());
    drop(live);
    assert!(!stale.exists());
    let file = dir.0.join("file");
    std::fs::write(&file, b"not a socket").unwrap();
    assert!(serve_with(loopback, Options::default().unix(&file)).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

/// On Linux, `@NAME` is a socket of the abstract namespace: no file.
#[cfg(target_os = "linux")]
#[test]
fn a_unix_socket_of_the_abstract_namespace_serves_workers_and_clients() {
    let name = format!("@rask-test-abstract-{}", std::process::id());
    let options = rask_distributed::scheduler::Options::default().unix(&name);
    let cluster = Cluster::with_options(0, 1, options);
    let mut cluster = over(cluster, format!("unix:{name}"));
    cluster.add_worker(1);
    let client = cluster.client();
    diamond(&cluster, &client, 0);
    assert!(!std::path::Path::new(&name).exists());
}

/// A scheduler over TLS listens on no Unix socket: refused, not served in
/// plain.
#[test]
fn tls_and_a_unix_socket_are_refused_together() {
    let options = rask_distributed::scheduler::Options::default()
        .unix("/nonexistent/never.sock")
        .tls(rask_distributed::Tls::new());
    let err = rask_distributed::scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options)
        .unwrap_err();
    assert!(err.to_string().contains("Unix socket"), "{err}");
}

#[test]
fn a_held_value_whose_first_holder_died_is_fetched_from_a_copy() {
    let mut cluster = Cluster::new(2, 1);
    let client = cluster.client();
    // 200 000 bytes, held on the cluster: the handle holds the key.
    let mut g = Graph::salted(&cluster.shared, 77);
    let big = g.task("big", postcard::to_stdvec(&200_000u64).unwrap(), &[]);
    let key = g.key(big);
    g.output(big);
    let kept = Keep::new(1, true);
    kept.submit(&client, g.build());
    let value = kept.wait().pop().unwrap().unwrap();
    let first = client.who_has(&[key]).unwrap()[0].clone();
    assert_eq!(first.len(), 1);
    // A copy on the other worker, then the first holder goes away.
    client.replicate(&[key]).unwrap();
    cluster.eventually("a copy", |_| client.who_has(&[key]).unwrap()[0].len() == 2);
    let index = cluster
        .workers
        .iter()
        .position(|w| w.as_ref().unwrap().data_address().to_string() == first[0])
        .expect("the first holder is a worker");
    cluster.workers[index].take().unwrap().stop();
    // Once the scheduler answers with one holder, this client has heard
    // that the first left (one connection, in order): it knows of no
    // holder now, though the scheduler does.
    cluster.eventually("the first holder to be gone", |_| {
        client.who_has(&[key]).unwrap()[0].len() == 1
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fetch_len(&value));
    });
    // Before, the fetch waited for a `KeyInMemory` that never came (600 s).
    assert_eq!(rx.recv_timeout(TIMEOUT), Ok(200_000));
}

/// As `rask`'s reference to a pending future: sent as a reference to
/// `key` while the client holds it (client rule 7), run here otherwise,
/// which this one refuses, so the test sees which happened.
struct HeldRef(rask_executor::Key);

impl Op for HeldRef {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        Err(OpError::failed("inlined: the client did not hold the key"))
    }
    fn name(&self) -> &str {
        "held-ref"
    }
    fn is_work(&self) -> bool {
        false
    }
    fn to_wire(&self) -> Result<WireTask, WireError> {
        Ok(WireTask {
            function: rask_executor::REMOTE_FUNCTION.to_owned(),
            payload: self.0 .0.to_vec(),
        })
    }
}

#[test]
fn a_submission_made_while_disconnected_holds_its_keys_once_connected() {
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let address = cluster.scheduler.address();
    // The scheduler back while the client still waits to try again.
    let mut tries = 0;
    loop {
        cluster.scheduler.shutdown();
        cluster.eventually("the client to notice", |_| !client.is_connected());
        cluster.workers.clear();
        // The client tries at once, then 0.1, 0.3, 0.7, 1.5 and 3.1 s
        // after: 2.3 s is between two tries.
        std::thread::sleep(Duration::from_millis(2300));
        cluster.scheduler =
            rask_distributed::scheduler::serve_with(address, cluster.options()).unwrap();
        if !client.is_connected() {
            break;
        }
        tries += 1;
        assert!(
            tries < 3,
            "the client connected again before every submission"
        );
    }
    // Made while disconnected: parked, it goes out with the attempt it
    // makes at once; it hangs until told, holding its key (rule 7).
    let mut g = Graph::salted(&cluster.shared, 2);
    let a = g.value(1);
    let hang = g.op("hang", 0, &[a]);
    let key = g.key(hang);
    g.output(hang);
    let kept = Keep::new(1, true);
    kept.submit(&client, g.build());
    cluster.add_worker(1);
    cluster.eventually("the client to connect again", |_| client.is_connected());
    assert_eq!(client.loop_tables().unwrap().held, 1, "its key is held");
    // So a graph referring to the key refers to it on the cluster, and gets
    // its value once the hang ends.
    let mut b = rask_executor::PlanBuilder::new();
    let r = b.push(key, Arc::new(HeldRef(key)), &[]);
    b.output(r);
    let got = Collect::new(1);
    got.submit(&client, Arc::new(b.build()));
    cluster.shared.end_one_hang();
    assert!(kept.wait()[0].is_ok());
    assert_eq!(got.wait(), vec![Ok(1)]);
}

/// A scheduler asked for a frame budget of 0 (or any below 16 MiB) takes
/// 16 MiB, and computes: before, what a connection's first frame took
/// decoded could never be covered, and every connection was closed at its
/// first frame (a reviewer's finding).
#[test]
fn a_scheduler_with_a_frame_budget_of_zero_still_computes() {
    let options = rask_distributed::scheduler::Options::default().frame_budget(0);
    let cluster = Cluster::with_options(1, 1, options);
    diamond(&cluster, &cluster.client(), 0);
}

/// Warnings logged by any thread of this test binary, once
/// [`record_warnings`] installed their recorder.
#[derive(Clone, Default)]
struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0.lock().unwrap().push(message.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The process-wide recorder of warnings (installed once).
fn record_warnings() -> Warnings {
    static WARNINGS: std::sync::OnceLock<Warnings> = std::sync::OnceLock::new();
    WARNINGS
        .get_or_init(|| {
            let warnings = Warnings::default();
            tracing::subscriber::set_global_default(warnings.clone())
                .expect("no other global subscriber in this binary");
            warnings
        })
        .clone()
}

/// Client rule 10: a client that loses its scheduler (here shut down
/// under it) says so as a warning — a real loss stays loud; only a
/// worker's nested client that ends with its scheduler logs it at `debug`
/// (`nested` rule 5; `nested_computation_on_one_thread_workers` in
/// `tests/distributed.rs` checks that side).
#[test]
fn a_client_that_loses_its_scheduler_warns() {
    let warnings = record_warnings();
    let mut cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let want = format!(
        "client: lost the connection to the scheduler at {}; connecting again",
        cluster.address
    );
    lose_the_scheduler(&mut cluster, &client);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !warnings.0.lock().unwrap().iter().any(|w| w == &want) {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning {want:?} in {:?}",
            warnings.0.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
