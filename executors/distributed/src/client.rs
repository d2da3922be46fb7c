//! [`Client`]: a connection to a scheduler, and an [`Executor`].
//!
//! Rules:
//!
//! 1. `submit` lowers the plan to task specs on the caller's thread and
//!    returns; one background thread per client (its own single-threaded
//!    runtime) talks to the scheduler and to workers' data ports.
//! 2. Each submission holds one reference per distinct output key at the
//!    scheduler, taken with its graph and dropped (`ReleaseKeys`) once every
//!    output was reported or the submission was cancelled.
//! 3. Values are fetched from a worker that holds them, never through the
//!    scheduler; a failed fetch is reported to the scheduler, which points the
//!    client at another holder or recomputes the key.
//! 4. Every output is reported exactly once, then `finished` is called after
//!    the plan was dropped — also when the scheduler connection is lost (the
//!    outputs fail) and when the client is dropped (they are cancelled).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use rask_executor::{Encoded, Executor, Failure, FailureKind, Outcome, Plan, Reporter};
use tokio::sync::mpsc;

use crate::net::{self, log, Chain, ConnectError, FetchResult, Fetched, FrameReader, PeerPool};
use crate::protocol::{
    decode_batch, strip_scheme, Batch, TaskSpec, ToClient, ToScheduler, WireKey, WorkerId,
    MAX_FRAME,
};
use crate::Error;

/// How often open submissions are asked whether they were cancelled, when
/// no message arrives meanwhile.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// A connection to a scheduler. Cheap to clone; the connection closes (and
/// the scheduler releases this client's keys) when the last clone is
/// dropped.
///
/// # Examples
///
/// ```no_run
/// use rask_distributed::Client;
/// let client = Client::connect("tcp://127.0.0.1:8786")?;
/// assert_eq!(client.address(), "tcp://127.0.0.1:8786");
/// // `client` is a `rask_executor::Executor`: `client.submit(plan, reporter)`.
/// # Ok::<(), rask_distributed::Error>(())
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    address: String,
    commands: mpsc::UnboundedSender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping `commands` (after this body) ends the loop; wait for it
        // unless this is the client thread itself (a reporter held the last
        // clone).
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.commands, tx));
        if std::thread::current().id() != self.thread_id {
            let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.inner.address)
            .finish()
    }
}

enum Command {
    Submit(Submission),
}

struct Submission {
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    frames: Vec<Vec<u8>>,
    wanted: Vec<WireKey>,
}

impl Client {
    /// Connects to the scheduler at `address` (`tcp://host:port` or
    /// `host:port`).
    ///
    /// # Errors
    ///
    /// [`Error::Address`] for a malformed address, [`Error::Connection`] when
    /// nothing accepts the connection, [`Error::Timeout`] when it takes over
    /// ten seconds, [`Error::Handshake`] when the other side is not a rask
    /// scheduler of this protocol version.
    pub fn connect(address: &str) -> Result<Client, Error> {
        let target = strip_scheme(address)
            .ok_or_else(|| Error::Address {
                address: address.to_owned(),
            })?
            .to_owned();
        let runtime = net::runtime().map_err(Error::Io)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let name = address.to_owned();
        let thread = std::thread::Builder::new()
            .name("rask-client".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let conn = net::connect(
                        &target,
                        crate::protocol::Role::Client,
                        crate::protocol::Role::Scheduler,
                        net::CONNECT_TIMEOUT,
                    )
                    .await;
                    match conn {
                        Ok((read, write)) => {
                            let _ = ready_tx.send(Ok(()));
                            let writer = net::spawn_writer(write);
                            Loop::new(name, writer)
                                .run(FrameReader::new(read), commands_rx)
                                .await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(match e {
                                ConnectError::Io(source) => Error::Connection {
                                    addr: target,
                                    source,
                                },
                                ConnectError::Timeout => Error::Timeout {
                                    what: "the scheduler to accept the connection",
                                    after: net::CONNECT_TIMEOUT,
                                },
                                ConnectError::Handshake(reason) => Error::Handshake {
                                    addr: target,
                                    reason,
                                },
                            }));
                        }
                    }
                });
            })
            .map_err(Error::Io)?;
        let thread_id = thread.thread().id();
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Client {
                inner: Arc::new(Inner {
                    address: address.to_owned(),
                    commands,
                    thread: Mutex::new(Some(thread)),
                    thread_id,
                }),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::Connection {
                    addr: address.to_owned(),
                    source: std::io::Error::other("the client thread ended"),
                })
            }
        }
    }

    /// The address this client was connected to, as given.
    pub fn address(&self) -> &str {
        &self.inner.address
    }
}

impl Executor for Client {
    fn submit(&self, plan: Arc<Plan>, reporter: Arc<dyn Reporter>) {
        if plan.outputs().is_empty() {
            drop(plan);
            reporter.finished();
            return;
        }
        let mut tasks = Vec::with_capacity(plan.len());
        for (i, task) in plan.tasks().iter().enumerate() {
            let wire = match task.op.to_wire() {
                Ok(w) => w,
                Err(e) => {
                    let failure = Arc::new(Failure {
                        key: task.key,
                        name: task.op.name().into(),
                        kind: FailureKind::Failed,
                        message: e.to_string(),
                    });
                    return fail_all(plan, &*reporter, &failure);
                }
            };
            tasks.push(TaskSpec {
                key: task.key.0,
                name: task.op.name().into(),
                function: wire.function.into(),
                payload: wire.payload.into(),
                deps: plan
                    .deps(i as u32)
                    .iter()
                    .map(|&d| plan.task(d).key.0)
                    .collect(),
            });
        }
        let mut wanted: Vec<WireKey> = plan.outputs().iter().map(|&t| plan.task(t).key.0).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut batch = Batch::default();
        batch.push(&ToScheduler::UpdateGraph {
            tasks,
            wanted: wanted.clone(),
        });
        let frames = batch.take_frames();
        if let Some(big) = frames.iter().find(|f| f.len() - 4 > MAX_FRAME) {
            let slot0 = &plan.tasks()[plan.outputs()[0] as usize];
            let failure = Arc::new(Failure {
                key: slot0.key,
                name: slot0.op.name().into(),
                kind: FailureKind::Failed,
                message: format!(
                    "the graph encodes to {} bytes, over the {MAX_FRAME} byte limit of one message; \
                     scatter big arguments instead of embedding them",
                    big.len() - 4
                ),
            });
            return fail_all(plan, &*reporter, &failure);
        }
        let submission = Submission {
            plan,
            reporter,
            frames,
            wanted,
        };
        if let Err(mpsc::error::SendError(Command::Submit(s))) =
            self.inner.commands.send(Command::Submit(submission))
        {
            let failures = lost(&s.plan, &self.inner.address);
            fail_each(s.plan, &*s.reporter, failures);
        }
    }
}

/// Reports `failure` for every output, then finishes.
fn fail_all(plan: Arc<Plan>, reporter: &dyn Reporter, failure: &Arc<Failure>) {
    for slot in 0..plan.outputs().len() {
        reporter.output(slot, Err(failure.clone()));
    }
    drop(plan);
    reporter.finished();
}

/// Reports `failures[slot]` for every output, drops the plan, finishes.
fn fail_each(plan: Arc<Plan>, reporter: &dyn Reporter, failures: Vec<Arc<Failure>>) {
    drop(plan);
    for (slot, failure) in failures.into_iter().enumerate() {
        reporter.output(slot, Err(failure));
    }
    reporter.finished();
}

/// Each output's failure when the scheduler connection is gone.
fn lost(plan: &Plan, address: &str) -> Vec<Arc<Failure>> {
    plan.outputs()
        .iter()
        .map(|&t| {
            let task = plan.task(t);
            Arc::new(Failure {
                key: task.key,
                name: task.op.name().into(),
                kind: FailureKind::Failed,
                message: format!("lost the connection to the scheduler at {address}"),
            })
        })
        .collect()
}

/// A submission in flight.
struct Open {
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    reported: Vec<bool>,
    unreported: usize,
    wanted: Vec<WireKey>,
}

/// A fetch in flight for a key some submission waits for.
struct Fetching {
    current: WorkerId,
    others: Vec<WorkerId>,
}

/// The client thread's state.
struct Loop {
    address: String,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    connected: bool,
    open: HashMap<u64, Open>,
    next_id: u64,
    /// Output slots waiting for each key.
    waiting: HashMap<WireKey, Vec<(u64, usize)>>,
    fetching: HashMap<WireKey, Fetching>,
    peers: Option<PeerPool>,
    out: Batch,
    last_poll: Instant,
}

impl Loop {
    fn new(address: String, writer: mpsc::UnboundedSender<Vec<u8>>) -> Loop {
        Loop {
            address,
            writer,
            connected: true,
            open: HashMap::new(),
            next_id: 0,
            waiting: HashMap::new(),
            fetching: HashMap::new(),
            peers: None,
            out: Batch::default(),
            last_poll: Instant::now(),
        }
    }

    async fn run(
        mut self,
        mut read: FrameReader<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let (fetch_tx, mut fetched) = mpsc::unbounded_channel::<Fetched>();
        self.peers = Some(PeerPool::new(fetch_tx));
        let mut tick = tokio::time::interval(CANCEL_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let open = !self.open.is_empty();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Submit(s)) => {
                        self.submit(s);
                        while let Ok(Command::Submit(s)) = commands.try_recv() {
                            self.submit(s);
                        }
                    }
                    None => break,
                },
                got = read.next(), if self.connected => {
                    let msgs = match got {
                        Ok(true) => decode_batch::<ToClient>(read.frame()),
                        Ok(false) => Err(crate::protocol::ProtocolError::Closed),
                        Err(e) => Err(e),
                    };
                    match msgs {
                        Ok(msgs) => {
                            for msg in msgs {
                                self.message(msg);
                            }
                        }
                        Err(e) => {
                            if !matches!(e, crate::protocol::ProtocolError::Closed) {
                                log!("client: closing the scheduler connection: {}", Chain(&e));
                            }
                            self.disconnected();
                        }
                    }
                }
                Some(f) = fetched.recv() => {
                    self.fetched(f);
                    while let Ok(f) = fetched.try_recv() {
                        self.fetched(f);
                    }
                }
                _ = tick.tick(), if open => {}
            }
            self.poll_cancelled();
            self.flush();
        }
        // The last `Client` is gone: cancel what is still open (rule 4).
        let ids: Vec<u64> = self.open.keys().copied().collect();
        for id in ids {
            self.cancel(id);
        }
        self.flush();
    }

    fn submit(&mut self, s: Submission) {
        if !self.connected {
            let failures = lost(&s.plan, &self.address);
            return fail_each(s.plan, &*s.reporter, failures);
        }
        let id = self.next_id;
        self.next_id += 1;
        for (slot, &t) in s.plan.outputs().iter().enumerate() {
            self.waiting
                .entry(s.plan.task(t).key.0)
                .or_default()
                .push((id, slot));
        }
        for frame in s.frames {
            let _ = self.writer.send(frame);
        }
        let n = s.plan.outputs().len();
        self.open.insert(
            id,
            Open {
                plan: s.plan,
                reporter: s.reporter,
                reported: vec![false; n],
                unreported: n,
                wanted: s.wanted,
            },
        );
    }

    fn message(&mut self, msg: ToClient) {
        match msg {
            ToClient::WorkerJoined { id, address } => {
                if let Some(p) = self.peers.as_mut() {
                    p.add_peer(id, address)
                }
            }
            ToClient::WorkerLeft { id } => {
                if let Some(p) = self.peers.as_mut() {
                    p.remove_peer(id)
                }
            }
            ToClient::KeyInMemory { key, holders, .. } => {
                if !self.waiting.contains_key(&key) {
                    return; // nobody waits any more (cancelled, or answered)
                }
                if let Some(f) = self.fetching.get_mut(&key) {
                    for h in holders {
                        if h != f.current && !f.others.contains(&h) {
                            f.others.push(h);
                        }
                    }
                    return;
                }
                let mut holders = holders;
                holders.reverse();
                if let Some(first) = holders.pop() {
                    if let Some(p) = self.peers.as_mut() {
                        p.request(first, key)
                    }
                    self.fetching.insert(
                        key,
                        Fetching {
                            current: first,
                            others: holders,
                        },
                    );
                }
            }
            ToClient::KeyErred { key, failure } => {
                self.fetching.remove(&key);
                let failure = Arc::new(Failure::from(&failure));
                self.answer(key, |_| Err(failure.clone()));
            }
        }
    }

    fn fetched(&mut self, f: Fetched) {
        match self.fetching.get(&f.key) {
            Some(fetch) if fetch.current == f.from => {}
            _ => return,
        }
        match f.result {
            FetchResult::Data(bytes) => {
                self.fetching.remove(&f.key);
                let value: rask_executor::Value = Arc::new(Encoded(bytes));
                self.answer(f.key, |_| Ok(value.clone()));
            }
            FetchResult::Missing | FetchResult::Lost => {
                // Rule 3: the scheduler answers with another holder, or
                // with `KeyInMemory` again once the key is recomputed.
                self.out.push(&ToScheduler::FetchFailed {
                    key: f.key,
                    holder: f.from,
                });
                let fetch = self.fetching.get_mut(&f.key).expect("checked above");
                if let Some(next) = fetch.others.pop() {
                    fetch.current = next;
                    if let Some(p) = self.peers.as_mut() {
                        p.request(next, f.key)
                    }
                } else {
                    self.fetching.remove(&f.key);
                }
            }
        }
    }

    /// Reports `key`'s outcome to every slot waiting for it.
    fn answer(&mut self, key: WireKey, outcome: impl Fn(usize) -> Outcome) {
        let Some(slots) = self.waiting.remove(&key) else {
            return;
        };
        for (id, slot) in slots {
            self.report(id, slot, outcome(slot));
        }
    }

    fn report(&mut self, id: u64, slot: usize, outcome: Outcome) {
        let Some(open) = self.open.get_mut(&id) else {
            return;
        };
        if std::mem::replace(&mut open.reported[slot], true) {
            return;
        }
        open.unreported -= 1;
        open.reporter.output(slot, outcome);
        if open.unreported == 0 {
            self.complete(id);
        }
    }

    /// Releases a finished submission's keys and finishes it (rule 2).
    fn complete(&mut self, id: u64) {
        let Some(open) = self.open.remove(&id) else {
            return;
        };
        if self.connected {
            self.out
                .push(&ToScheduler::ReleaseKeys { keys: open.wanted });
        }
        let reporter = open.reporter;
        drop(open.plan);
        reporter.finished();
    }

    fn poll_cancelled(&mut self) {
        // Many open submissions (one per future, say) are polled on the tick
        // only, so a burst of messages does not cost O(messages × open).
        if self.open.len() > 64 && self.last_poll.elapsed() < CANCEL_POLL {
            return;
        }
        self.last_poll = Instant::now();
        let cancelled: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, o)| o.reporter.cancelled())
            .map(|(&id, _)| id)
            .collect();
        for id in cancelled {
            self.cancel(id);
        }
    }

    fn cancel(&mut self, id: u64) {
        let Some(open) = self.open.get(&id) else {
            return;
        };
        // No clone of the plan may outlive `finished` (rule 4): copy out
        // what is needed first.
        let plan = &open.plan;
        let keys: Vec<WireKey> = plan.outputs().iter().map(|&t| plan.task(t).key.0).collect();
        let failures: Vec<_> = (0..keys.len()).map(|s| plan.cancelled_output(s)).collect();
        for key in keys {
            if let Some(slots) = self.waiting.get_mut(&key) {
                slots.retain(|&(sid, _)| sid != id);
                if slots.is_empty() {
                    self.waiting.remove(&key);
                    self.fetching.remove(&key);
                }
            }
        }
        for (slot, failure) in failures.into_iter().enumerate() {
            self.report(id, slot, Err(failure));
        }
    }

    /// The scheduler connection is gone: every open output fails (rule 4).
    fn disconnected(&mut self) {
        self.connected = false;
        self.waiting.clear();
        self.fetching.clear();
        let ids: Vec<u64> = self.open.keys().copied().collect();
        for id in ids {
            let Some(open) = self.open.get(&id) else {
                continue;
            };
            let failures = lost(&open.plan, &self.address);
            for (slot, failure) in failures.into_iter().enumerate() {
                self.report(id, slot, Err(failure));
            }
        }
    }

    fn flush(&mut self) {
        if !self.out.is_empty() {
            if self.connected {
                net::send_batch(&self.writer, &mut self.out);
            } else {
                self.out.take_frames();
            }
        }
        if let Some(p) = self.peers.as_mut() {
            p.flush();
        }
    }
}
