//! Property tests of the scheduler's socket shell against peers that hold
//! the token but send whatever they like (scheduler rules S6, S10–S12,
//! S17): a worker that was asked for nothing reports results, failures,
//! copies and failed fetches about the keys of a graph being computed, a
//! client that wants nothing releases, replicates and reports failed
//! fetches of them, and both end with junk or a message of the other
//! role. The graph's results must be the right ones, the rogue worker
//! must be sent no task, and the cluster must carry on.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rask_distributed::protocol::{self, Role, ToScheduler, ToWorker, WireFailure, WorkerId};
use rask_executor::diagnostics::Spill;
use support::{raw, read_until_closed, Cluster, Collect, Graph};

/// One frame holding `msgs`.
fn frame_of(msgs: &[ToScheduler]) -> Vec<u8> {
    let mut body = Vec::new();
    for m in msgs {
        body = postcard::to_extend(m, body).unwrap();
    }
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(body);
    frame
}

/// The frames in `bytes`, decoded.
fn frames(mut bytes: &[u8]) -> Vec<ToWorker> {
    let mut msgs = Vec::new();
    while bytes.len() >= 4 {
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        msgs.extend(protocol::decode_batch::<ToWorker>(&bytes[4..4 + len]).unwrap());
        bytes = &bytes[4 + len..];
    }
    msgs
}

/// A worker's report about key `key` (an index into the graph's keys, or
/// a key of no graph when out of range), naming a run when it reports one
/// (a guess: the scheduler's runs are its ticks, small numbers here).
#[derive(Clone, Debug)]
enum Report {
    Finished(usize, u64, i64),
    Erred(usize, u64),
    Abandoned(usize, u64),
    DataAdded(usize),
    Seceded(usize, u64),
    FetchFailed(usize, u32),
    GivenUp(usize, u64),
    Kept(usize, u64),
    Heartbeat,
    Resources(u64),
}

/// A client's message about key `key`, as in [`Report`].
#[derive(Clone, Debug)]
enum Ask {
    Release(usize),
    FetchFailed(usize, u32),
    Replicate(usize),
    WhoHas(usize),
    Info,
}

/// How a rogue leaves.
#[derive(Clone, Debug)]
enum Ending {
    /// It closes its side.
    Close,
    /// A frame of junk.
    Junk(Vec<u8>),
    /// A message of the other role (or a second registration).
    Wrong,
}

fn report() -> impl Strategy<Value = Report> {
    prop_oneof![
        4 => (0..12usize, 0..64u64, any::<i64>()).prop_map(|(k, r, v)| Report::Finished(k, r, v)),
        2 => (0..12usize, 0..64u64).prop_map(|(k, r)| Report::Erred(k, r)),
        2 => (0..12usize, 0..64u64).prop_map(|(k, r)| Report::Abandoned(k, r)),
        2 => (0..12usize).prop_map(Report::DataAdded),
        1 => (0..12usize, 0..64u64).prop_map(|(k, r)| Report::Seceded(k, r)),
        2 => (0..12usize, 0..16u32).prop_map(|(k, h)| Report::FetchFailed(k, h)),
        1 => (0..12usize, 0..64u64).prop_map(|(k, id)| Report::GivenUp(k, id)),
        1 => (0..12usize, 0..64u64).prop_map(|(k, id)| Report::Kept(k, id)),
        1 => Just(Report::Heartbeat),
        1 => (0..1u64 << 40).prop_map(Report::Resources),
    ]
}

fn ask() -> impl Strategy<Value = Ask> {
    prop_oneof![
        (0..12usize).prop_map(Ask::Release),
        (0..12usize, 0..16u32).prop_map(|(k, h)| Ask::FetchFailed(k, h)),
        (0..12usize).prop_map(Ask::Replicate),
        (0..12usize).prop_map(Ask::WhoHas),
        Just(Ask::Info),
    ]
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        Just(Ending::Close),
        proptest::collection::vec(any::<u8>(), 1..48).prop_map(Ending::Junk),
        Just(Ending::Wrong),
    ]
}

/// Ends `s` as `ending` says, then waits for the scheduler to close it;
/// what it was sent.
fn end(mut s: TcpStream, ending: &Ending, wrong: ToScheduler) -> Vec<u8> {
    match ending {
        Ending::Close => {}
        Ending::Junk(body) => {
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend(body);
            let _ = s.write_all(&frame);
        }
        Ending::Wrong => {
            let _ = s.write_all(&frame_of(&[wrong]));
        }
    }
    // Junk that happens to decode is not closed for: the end of the
    // stream is.
    let _ = s.shutdown(Shutdown::Write);
    read_until_closed(&mut s)
}

#[test]
fn rogue_peers_change_no_result_and_are_sent_no_task() {
    let cluster = Cluster::new(2, 1);
    let client = cluster.client();
    let addr = cluster.scheduler.address();
    let cases = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        // Each case is a graph on a live cluster: a few dozen of them.
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(report(), 1..24),
        proptest::collection::vec(ask(), 0..8),
        ending(),
        ending(),
    );
    runner
        .run(&strategy, |(reports, asks, worker_end, client_end)| {
            let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            // A worker that holds back every task (S17) from its first
            // frame, before any task of this graph exists: the scheduler
            // asks nothing of it.
            let mut rogue = raw(addr, Role::Worker, &cluster.auth);
            let register = ToScheduler::RegisterWorker {
                address: "127.0.0.1:1".into(),
                threads: 4,
                resources: Default::default(),
                name: format!("rogue-{case}"),
            };
            let pause = ToScheduler::Memory {
                spill: Spill {
                    limit_bytes: 1 << 30,
                    memory_bytes: 1 << 30,
                    paused: true,
                    ..Spill::default()
                },
            };
            rogue
                .write_all(&frame_of(&[register, pause.clone()]))
                .unwrap();
            let mut len = [0u8; 4];
            rogue.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            rogue.read_exact(&mut body).unwrap();
            let first = protocol::decode_batch::<ToWorker>(&body).unwrap();
            prop_assert!(matches!(first[0], ToWorker::Registered { .. }), "{first:?}");
            let mut thief = raw(addr, Role::Client, &cluster.auth);

            // a = 1, b = a + 1, c = a + 2, then a chain of sums.
            let mut g = Graph::salted(&cluster.shared, 10_000 + case);
            let a = g.value(1);
            let b = g.op("inc", 0, &[a]);
            let c = g.op("add", 2, &[a]);
            let mut nodes = vec![a, b, c];
            for i in 0..8 {
                let n = nodes.len();
                nodes.push(g.op("sleep_add", i, &[nodes[n - 1], nodes[n - 2]]));
            }
            let last = *nodes.last().unwrap();
            g.output(last);
            g.output(b);
            let keys: Vec<[u8; 32]> = nodes.iter().map(|&t| g.key(t).0).collect();
            let key = |i: usize| keys.get(i).copied().unwrap_or([0xee; 32]);
            let got = Collect::new(2);
            got.submit(&client, g.build());

            // While it runs: every report of the rogue worker, then every
            // message of the rogue client, each in a frame of its own.
            for r in &reports {
                let msg = match *r {
                    Report::Finished(k, run, v) => ToScheduler::TaskFinished {
                        key: key(k),
                        run,
                        nbytes: 8,
                        duration_ns: 1_000,
                        value: Some(Arc::from(postcard::to_stdvec(&v).unwrap())),
                        thread: 1,
                    },
                    Report::Erred(k, run) => ToScheduler::TaskErred {
                        key: key(k),
                        run,
                        failure: WireFailure::new(
                            key(k),
                            "forged".into(),
                            protocol::WireFailureKind::Failed,
                            "forged".into(),
                        ),
                    },
                    Report::Abandoned(k, run) => ToScheduler::TaskAbandoned { key: key(k), run },
                    Report::DataAdded(k) => ToScheduler::DataAdded { key: key(k) },
                    Report::Seceded(k, run) => ToScheduler::TaskSeceded { key: key(k), run },
                    Report::FetchFailed(k, h) => ToScheduler::FetchFailed {
                        key: key(k),
                        holder: WorkerId(h),
                    },
                    Report::GivenUp(k, id) => ToScheduler::TaskGivenUp { key: key(k), id },
                    Report::Kept(k, id) => ToScheduler::TaskKept { key: key(k), id },
                    Report::Heartbeat => ToScheduler::Heartbeat,
                    Report::Resources(memory_bytes) => ToScheduler::Resources { memory_bytes },
                };
                // Still paused, whatever else it says.
                rogue.write_all(&frame_of(&[msg, pause.clone()])).unwrap();
            }
            for a in &asks {
                let msg = match *a {
                    Ask::Release(k) => ToScheduler::ReleaseKeys { keys: vec![key(k)] },
                    Ask::FetchFailed(k, h) => ToScheduler::FetchFailed {
                        key: key(k),
                        holder: WorkerId(h),
                    },
                    Ask::Replicate(k) => ToScheduler::Replicate { keys: vec![key(k)] },
                    Ask::WhoHas(k) => ToScheduler::WhoHas {
                        id: k as u64,
                        keys: vec![key(k)],
                    },
                    Ask::Info => ToScheduler::Info { id: 1 },
                };
                thief.write_all(&frame_of(&[msg])).unwrap();
            }

            // The right values, whatever was said (S10).
            let expected = {
                let mut v = vec![1i64, 2, 3];
                for i in 0..8 {
                    let n = v.len();
                    v.push(v[n - 1] + v[n - 2] + i);
                }
                v
            };
            prop_assert_eq!(
                got.wait(),
                vec![Ok(*expected.last().unwrap()), Ok(expected[1])]
            );
            let sent = frames(&end(
                rogue,
                &worker_end,
                ToScheduler::ReleaseKeys { keys: keys.clone() },
            ));
            end(thief, &client_end, ToScheduler::DataAdded { key: keys[0] });
            // Paused from its first frame: asked for nothing (S17), told
            // at most to drop what it claimed to hold (S6).
            for msg in &sent {
                prop_assert!(
                    matches!(
                        msg,
                        ToWorker::Release { .. }
                            | ToWorker::PeerJoined { .. }
                            | ToWorker::PeerLeft { .. }
                            | ToWorker::Heartbeat { .. }
                    ),
                    "the rogue worker was sent {msg:?}"
                );
            }
            Ok::<(), TestCaseError>(())
        })
        .unwrap();
    // Every rogue is gone; the two workers compute on, and every task is
    // forgotten once its client holds nothing.
    cluster.eventually("the rogues to be dropped", |c| c.scheduler.workers() == 2);
    assert_eq!(inc(&cluster, &client, 1, 20), 21);
    cluster.eventually("release", |c| c.scheduler.tasks() == 0);
}

/// `inc(x)` computed on `cluster` for `client`, under `salt`: the cluster
/// still serves.
fn inc(cluster: &Cluster, client: &rask_distributed::Client, salt: u64, x: i64) -> i64 {
    let mut g = Graph::salted(&cluster.shared, salt);
    let a = g.value(x);
    let b = g.op("inc", 0, &[a]);
    g.output(b);
    let got = Collect::new(1);
    got.submit(client, g.build());
    match got.wait().pop() {
        Some(Ok(v)) => v,
        other => panic!("inc({x}): {other:?}"),
    }
}

/// A frame that decodes to far more memory than its length (2 MiB of
/// one-byte `Heartbeat`s: 400 MiB of messages before the bound of
/// protocol rule 5) closes its connection, from a client or a worker, and
/// the scheduler serves on.
#[test]
fn a_frame_of_tiny_messages_is_refused_not_decoded() {
    let cluster = Cluster::new(1, 1);
    let client = cluster.client();
    let addr = cluster.scheduler.address();
    let heartbeat = frame_of(&[ToScheduler::Heartbeat])[4];
    let body = vec![heartbeat; 2 << 20];
    let mut flood = (body.len() as u32).to_le_bytes().to_vec();
    flood.extend(body);
    for role in [Role::Client, Role::Worker] {
        let mut s = raw(addr, role, &cluster.auth);
        s.write_all(&flood).unwrap();
        // Closed at once, not at the end of the stream.
        read_until_closed(&mut s);
    }
    assert_eq!(inc(&cluster, &client, 2, 41), 42);
    assert_eq!(cluster.scheduler.workers(), 1);
}

/// Questions asked in one frame are each answered, with one census of the
/// cluster between them: a frame of a thousand `Info`s costs what one
/// does, and a client asking without reading is closed once its answers
/// pass the backlog, before more are built.
#[test]
fn a_frame_of_questions_gets_one_answer_each() {
    use rask_distributed::protocol::ToClient;
    let cluster = Cluster::new(1, 1);
    let addr = cluster.scheduler.address();
    let mut s = raw(addr, Role::Client, &cluster.auth);
    let asked: Vec<ToScheduler> = (1..=1000).map(|id| ToScheduler::Info { id }).collect();
    s.write_all(&frame_of(&asked)).unwrap();
    s.set_read_timeout(Some(support::TIMEOUT)).unwrap();
    let mut answers = Vec::new();
    while answers.len() < asked.len() {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        for msg in protocol::decode_batch::<ToClient>(&body).unwrap() {
            if let ToClient::Info { id, snapshot } = msg {
                answers.push((id, snapshot));
            }
        }
    }
    let ids: Vec<u64> = answers.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=1000).collect::<Vec<u64>>());
    assert!(answers
        .iter()
        .all(|(_, snapshot)| snapshot.workers.len() == 1));
}
