//! [`Client`]: a connection to a scheduler, and an [`Executor`].
//!
//! Rules:
//!
//! 1. `submit` lowers the plan to task specs on the caller's thread and
//!    returns; one background thread per client (its own single-threaded
//!    runtime) talks to the scheduler and to workers' data ports.
//! 2. Each submission holds one reference per distinct output key at the
//!    scheduler, taken with its graph and dropped (`ReleaseKeys`) as soon as
//!    that output was reported (or stopped), unless a handle left the value
//!    on the cluster (rule 5): the scheduler keeps what is still pending,
//!    not every result a client already has, and never recomputes a result
//!    a client has when a worker dies.
//! 3. Values are fetched from a worker that holds them, never through the
//!    scheduler; a failed fetch is reported to the scheduler, which points the
//!    client at another holder or recomputes the key. A key whose known
//!    holders all left is reported the same way, naming no worker
//!    ([`NO_HOLDER`]): the scheduler may know of a copy elsewhere. The exception is a
//!    value of at most [`INLINE_BYTES`](crate::protocol::INLINE_BYTES): it
//!    comes with `KeyInMemory`, saving a round trip to a worker per result.
//! 4. Every output is reported exactly once, then `finished` is called after
//!    the plan was dropped — also when the scheduler connection is lost (the
//!    outputs fail) and when the client is dropped (they are cancelled). On
//!    success the plan is dropped before the last output is reported, so a
//!    caller that has every output holds the only references left to the
//!    plan's inputs. Wherever this client lets go of a plan (its loop's
//!    thread, mostly), the plan drops its ops and the user's literal
//!    arguments they hold quietly (`rask_executor` dropping rule 5).
//! 5. A submission whose reporter asks to [`keep_remote`](Reporter::keep_remote)
//!    gets each output, once in memory, as a [`Remote`] handle: one handle
//!    per distinct key, shared by the slots with that key. Outputs over
//!    [`EAGER_FETCH`] bytes are reported unfetched: the handle holds the key
//!    on the cluster (the submission's reference passes to it, rule 2) until
//!    it is dropped, and [`RemoteValue::fetch`] asks this client's thread
//!    for the bytes (as rule 3, from the key's latest holders) and blocks
//!    until they arrive; it refuses to run on that thread itself. Smaller
//!    outputs are fetched first, as without `keep_remote`: their handles
//!    hold the bytes and not the key, which is released at once (rule 2),
//!    so gathering many small results costs no round trip each, and a later
//!    graph sends the bytes (rule 6). The loop keeps a key's latest holders
//!    only while a handle that holds the key lives: once a submission's work
//!    is done and its handles are dropped, the loop keeps nothing of it
//!    ([`Client::loop_tables`]).
//! 6. A task that refers to a held key ([`REMOTE_FUNCTION`]) is sent as such
//!    only while this client holds a handle for that key — it is then used
//!    in place, since the scheduler never re-adds a known key. A handle of
//!    another client (another cluster) is fetched and sent as bytes instead.
//!    A submission that relies on held keys is queued while the table of
//!    handles is locked, so a handle dropped meanwhile releases its key only
//!    after the graph that uses it reached the scheduler.
//! 7. An open `keep_remote` submission counts as holding its output keys
//!    (its handles will), so a later graph may refer to a key that is still
//!    being computed: the scheduler makes it wait for that key, and a chain
//!    of submits costs no client round trip per link. If the key fails or
//!    is cancelled and released meanwhile, the reference fails with "no
//!    longer holds". Releases keep the order of events: every command is
//!    numbered as it is sent, and the release of a reported output's key
//!    goes out after the commands sent before the report (a submission
//!    that found the key held among them) and before those sent after it
//!    (a resubmission of the key then finds it released).
//! 8. A reporter can stop one output ([`Reporter::stop_with`]): the output
//!    is reported cancelled at once and its key released at the scheduler,
//!    which stops the task on its worker if nothing else needs it (the
//!    task's `rask::cancelled()` turns true there). An output of a
//!    submission waiting for a connection (rule 10) is reported cancelled
//!    at once too, and its key left out of the graph sent; a submission
//!    with no output left is never sent.
//! 9. Work that depends on a recorded failure ([`FAIL_FUNCTION`]: an input
//!    that failed or was cancelled) fails in this process, at once, with
//!    that failure, and is not sent: a recorded failure never reaches the
//!    scheduler, where a key still held or being computed would give its
//!    value to dependents that must fail. The rest of the submission goes
//!    out as usual.
//! 10. A client connected over TCP outlives its connection: when it is
//!     lost, every open output fails ("lost the connection to the
//!     scheduler"), and the client connects again at once, then with a
//!     backoff (100 ms doubling to 2 s) for as long as it lives. A
//!     submission made while it is disconnected waits for one attempt,
//!     made at once, and goes out if it succeeds or fails if it does not.
//!     The loss is logged as a warning, save by the nested client of a
//!     worker that ends with its scheduler (a local cluster's: `nested`
//!     rule 5), which logs it at `debug`: the cluster's end is no incident.
//!     A new connection is a new *epoch*: what the old one held is gone,
//!     handles of it hold nothing (a fetch fails unless they have their
//!     bytes), and graphs referring to their keys send their bytes or fail.
//!     A handle without its bytes says it is [`lost`](RemoteValue::lost)
//!     from the moment its connection is seen lost (or its client
//!     closed), before a new one is made: the test a fetch makes, without
//!     the round trip, so a fetch and `lost` never disagree, and a handle
//!     of the new epoch (the same key computed again) is never lost. Its
//!     holder then computes the work again instead of using it (`rask`'s
//!     futures rule 7). A graph that took a handle before the loss was
//!     seen is one in flight at the loss: it fails, as the open outputs do.
//!     Answers of the old connection's data ports are never read: each
//!     epoch's fetches answer on a channel of their own.
//! 11. A client proves its [`Auth`] to the scheduler and to every data
//!     port it reads from, and connects only to ones that prove the same
//!     (`auth.rs` rules): a scheduler or worker without the client's token
//!     never sees its graphs and never sends it a value. A client of a
//!     scheduler in this process proves that scheduler's token to data
//!     ports.
//! 12. A client connected over TCP sends `Heartbeat` every
//!     [`HEARTBEAT`] in which it sent nothing else, so its scheduler tells
//!     an idle client from a vanished one (scheduler rule 4). Its
//!     connections read within one budget for big frames and the stall
//!     timeout (`net` rules 8 and 9); a scheduler that stops reading what
//!     the client sends for that long is taken as lost (rule 10 of `net`).
//!     Every frame it reads, from the scheduler or a data port, holds from
//!     that budget what its messages take decoded until the loop handled
//!     them; a frame waiting for room keeps its place while the loop goes
//!     on with the rest, and one that would take more than the whole
//!     budget closes its connection (a scheduler's is then lost, rule 10,
//!     its reader dropped at once).
//! 13. While this process listens for task events
//!     (`rask_executor::events`), the client asks the scheduler for the
//!     events of its build's tasks (`Watch`) and hands them on, with the
//!     worker and thread that ran each task; it emits `Queued` itself for
//!     the tasks it submits. When nobody listens, neither side builds any.
//! 14. Questions ([`Client::info`], [`Client::who_has`]) are numbered and
//!     answered by number; a lost connection answers every open one with
//!     an error.
//! 15. Work that waits 5 s while the scheduler has no worker of this
//!     program's build is reported once, naming the scheduler.
//! 16. [`Client::replicate`] asks for copies of held keys on every worker
//!     (Dask's `replicate`) and returns at once: nothing answers it, and
//!     [`Client::who_has`] shows the copies as they arrive. Sent while
//!     disconnected, it is dropped.
//! 17. [`Client::retire_workers`] is a question (rule 14) answered once the
//!     workers named are gone, however long their retirement takes (the
//!     scheduler's rule S16), or at once when the scheduler refuses it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use rask_executor::{
    Encoded, Executor, Failure, FailureKind, Key, Outcome, Plan, Remote, RemoteValue, Reporter,
    Value, WireError, WireTask, FAIL_FUNCTION, REMOTE_FUNCTION, VALUE_FUNCTION,
};
use tokio::sync::mpsc;

use crate::net::{self, Chain, ConnectError, FetchResult, Fetched, PeerPool};
use crate::protocol::{
    decode_checked, parse_address, Batch, KeyMap, Scheme, TaskSpecRef, ToClient, ToScheduler,
    ToSchedulerRef, WireEvent, WireEventKind, WireKey, WorkerId, MAX_FRAME, NO_HOLDER,
};
use crate::tls::Connector;
use crate::{Auth, BuildId, Error, Tls, Token};
use rask_executor::diagnostics::Snapshot;

/// How often open submissions are asked whether they were cancelled, when
/// no message arrives meanwhile.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// How long [`Client::info`] and [`Client::who_has`] wait for their answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long work waits with no worker before the client says so (rule 15).
const NO_WORKERS_WARNING: Duration = Duration::from_secs(5);

/// Kept-remote outputs of at most this many bytes are fetched at once
/// (rule 5): bringing them over costs less than a round trip later.
const EAGER_FETCH: u64 = 64 << 10;

/// How often a client connected over TCP says it is alive, when it sends
/// nothing else (rule 12).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long [`RemoteValue::fetch`] waits for a held value's bytes before it
/// gives up (a safety net: a lost connection fails the fetch at once).
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// A connection to a scheduler. Cheap to clone; the connection closes (and
/// the scheduler releases this client's keys) when the last clone is
/// dropped.
///
/// # Examples
///
/// ```no_run
/// use rask_distributed::Client;
/// // The token comes from RASK_TOKEN, RASK_TOKEN_FILE or ~/.rask/token.
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
    commands: mpsc::UnboundedSender<Sequenced>,
    thread: Mutex<Option<Ending>>,
    link: Arc<Link>,
    /// Tells the loop when this process starts or stops listening for
    /// task events (rule 13).
    _watch: rask_executor::events::ChangeHook,
}

/// How to wait for a client's network loop to end.
enum Ending {
    /// The loop has a thread of its own.
    Thread(JoinHandle<()>),
    /// The loop is a task on another runtime's thread (a local cluster's
    /// scheduler): this disconnects once it ended, or was dropped with its
    /// runtime.
    Task(std::sync::mpsc::Receiver<()>),
}

impl Ending {
    /// Waits until the loop ended.
    fn wait(self) {
        match self {
            Ending::Thread(thread) => {
                let _ = thread.join();
            }
            Ending::Task(ended) => {
                let _ = ended.recv();
            }
        }
    }
}

/// What the client, its thread and its [`KeyHandle`]s share.
struct Link {
    address: String,
    /// Weak, so that live handles do not keep the client thread running.
    commands: mpsc::WeakUnboundedSender<Sequenced>,
    /// Live handles per key (rules 5 and 6).
    held: Mutex<KeyMap<WireKey, usize>>,
    /// The client thread, where a fetch must not block.
    thread_id: ThreadId,
    /// Cleared when the scheduler connection is lost or the loop ends.
    connected: AtomicBool,
    /// The id of the next submission (ids are given out by `submit`, so a
    /// reporter can name its submission before the loop has seen it).
    next_id: AtomicU64,
    /// Commands sent so far: each command's sequence number is the count
    /// before it (rule 7).
    sent: Mutex<u64>,
    /// The connection the client is on: bumped at each reconnection
    /// (rule 10), under the `held` lock.
    epoch: AtomicU64,
}

impl Link {
    /// The link of a loop on this thread, connected, reached at `address`
    /// through `commands`.
    fn new(address: String, commands: mpsc::WeakUnboundedSender<Sequenced>) -> Link {
        Link {
            address,
            commands,
            held: Mutex::new(KeyMap::default()),
            thread_id: std::thread::current().id(),
            connected: AtomicBool::new(true),
            next_id: AtomicU64::new(0),
            sent: Mutex::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// Sends `cmd` with the next sequence number; numbering and sending
    /// happen under one lock, so the channel holds commands in number
    /// order. Gives the command back if the loop is gone.
    fn send(
        &self,
        commands: &mpsc::UnboundedSender<Sequenced>,
        cmd: Command,
    ) -> Result<(), Command> {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        match commands.send((*sent, cmd)) {
            Ok(()) => {
                *sent += 1;
                Ok(())
            }
            Err(mpsc::error::SendError((_, cmd))) => Err(cmd),
        }
    }

    /// The number of commands sent so far.
    fn sent(&self) -> u64 {
        *self.sent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn held(&self) -> MutexGuard<'_, KeyMap<WireKey, usize>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One more count for `key` in a table of held keys ([`Link::held`]).
fn hold(held: &mut KeyMap<WireKey, usize>, key: WireKey) {
    *held.entry(key).or_insert(0) += 1;
}

/// One count fewer for `key`; the entry goes with its last count.
fn unhold(held: &mut KeyMap<WireKey, usize>, key: WireKey) {
    if let Some(n) = held.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            held.remove(&key);
        }
    }
}

/// A key held on the cluster for one submission's outputs (rule 5).
struct KeyHandle {
    key: WireKey,
    link: Arc<Link>,
    /// The bytes, once fetched.
    bytes: OnceLock<Arc<[u8]>>,
    /// Whether it holds its key on the cluster: only a handle whose bytes
    /// are not here does (rule 5).
    holds: bool,
    /// The connection it was made on (rule 10).
    epoch: u64,
}

impl KeyHandle {
    /// A handle of a value left on the cluster: it holds the key there.
    fn holding(key: WireKey, link: Arc<Link>) -> KeyHandle {
        let epoch = {
            let mut held = link.held();
            hold(&mut held, key);
            link.epoch.load(Ordering::Acquire)
        };
        KeyHandle {
            key,
            link,
            bytes: OnceLock::new(),
            holds: true,
            epoch,
        }
    }

    /// A handle of a value whose bytes are here: the cluster need not keep
    /// it, and a later graph sends the bytes (rule 5).
    fn with_bytes(key: WireKey, link: Arc<Link>, bytes: Arc<[u8]>) -> KeyHandle {
        let epoch = link.epoch.load(Ordering::Acquire);
        KeyHandle {
            key,
            link,
            bytes: OnceLock::from(bytes),
            holds: false,
            epoch,
        }
    }
}

impl RemoteValue for KeyHandle {
    fn key(&self) -> Key {
        Key(self.key)
    }

    fn fetch(&self) -> Result<Arc<[u8]>, WireError> {
        if let Some(bytes) = self.bytes.get() {
            return Ok(bytes.clone());
        }
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        let fail = |reason: String| WireError::Fetch {
            key: Key(self.key),
            reason,
        };
        if std::thread::current().id() == self.link.thread_id {
            return Err(fail(
                "a value cannot be fetched on its client's own network thread".into(),
            ));
        }
        let closed = || fail(closed_client(&self.link.address));
        let (reply, answer) = std::sync::mpsc::channel();
        let sent = self.link.commands.upgrade().is_some_and(|commands| {
            self.link
                .send(
                    &commands,
                    Command::Fetch {
                        key: self.key,
                        epoch: self.epoch,
                        reply,
                    },
                )
                .is_ok()
        });
        if !sent {
            return Err(closed());
        }
        match answer.recv_timeout(FETCH_TIMEOUT) {
            Ok(Ok(bytes)) => Ok(self.bytes.get_or_init(|| bytes).clone()),
            Ok(Err(reason)) => Err(fail(reason)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(fail(format!("no answer within {FETCH_TIMEOUT:?}")))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(closed()),
        }
    }

    /// Lost once the connection it was made on is (rule 10), the client's
    /// own closing included, unless its bytes are here: the same test as the loop's for a fetch
    /// ([`Loop::fetch`]), made with no round trip. `connected` is read
    /// before the epoch: a reconnection bumps the epoch before it sets
    /// `connected` again, so a connection seen up is either this handle's
    /// (the epoch read next is its own) or a later one's (the epoch read
    /// next is not).
    fn lost(&self) -> Option<WireError> {
        if self.bytes.get().is_some() {
            return None;
        }
        let live = self.link.connected.load(Ordering::Acquire)
            && self.link.epoch.load(Ordering::Acquire) == self.epoch;
        if live {
            return None;
        }
        // A connection the client itself closed (it was dropped) says so.
        let reason = match self.link.commands.upgrade() {
            Some(_) => lost_with_connection(&self.link.address),
            None => closed_client(&self.link.address),
        };
        Some(WireError::Fetch {
            key: Key(self.key),
            reason,
        })
    }
}

/// Why a value of a connection that is gone cannot be fetched (rule 10).
fn lost_with_connection(address: &str) -> String {
    format!("the value was lost with the connection to the scheduler at {address}")
}

/// Why a value of a client that was dropped cannot be fetched.
fn closed_client(address: &str) -> String {
    format!("the client of {address} is closed")
}

impl Drop for KeyHandle {
    fn drop(&mut self) {
        if !self.holds {
            return;
        }
        // The release is queued under the lock, so it cannot overtake a
        // submission that found the key held (rule 6).
        let mut held = self.link.held();
        // A handle of an earlier connection holds nothing any more (rule 10).
        if self.epoch != self.link.epoch.load(Ordering::Acquire) {
            return;
        }
        unhold(&mut held, self.key);
        if let Some(commands) = self.link.commands.upgrade() {
            let _ = self.link.send(&commands, Command::Release(self.key));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping `commands` (after this body) ends the loop; wait for it
        // unless this is the client thread itself (a reporter held the last
        // clone).
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.commands, tx));
        if std::thread::current().id() != self.link.thread_id {
            let ending = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(ending) = ending {
                ending.wait();
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

/// A command with its place in the order commands were sent (rule 7).
type Sequenced = (u64, Command);

enum Command {
    Submit(Box<Submission>),
    /// A handle was dropped: drop its reference to the key.
    Release(WireKey),
    /// A handle wants its value's bytes.
    Fetch {
        key: WireKey,
        /// The connection the handle was made on (rule 10).
        epoch: u64,
        reply: Reply,
    },
    /// Nobody wants output `slot` of submission `id` any more (rule 8).
    Stop {
        id: u64,
        slot: usize,
    },
    /// Whether this process listens for task events may have changed
    /// (rule 13).
    Watch,
    /// A question for the scheduler (rule 14).
    Ask(Ask, AskReply),
    /// Ask for a copy of these keys on every worker (rule 16).
    Replicate(Vec<WireKey>),
}

/// A question for the scheduler ([`Client::info`], [`Client::who_has`]).
enum Ask {
    Info,
    WhoHas(Vec<WireKey>),
    /// Retire the workers of these names (rule 17).
    Retire(Vec<String>),
    /// The sizes of the loop's own tables: answered by the loop, not the
    /// scheduler ([`Client::loop_tables`]).
    Tables,
}

/// The scheduler's answer to an [`Ask`], or why there is none.
enum Answer {
    Info(Box<Snapshot>),
    /// For each key asked, the data ports of the workers holding it.
    WhoHas(Vec<Vec<String>>),
    /// The workers are gone, or why none was retired.
    Retired(Option<String>),
    Tables(LoopTables),
}

/// How many entries a client's network loop keeps in each of its tables
/// ([`Client::loop_tables`]): each shrinks back to 0 once the work it was
/// given is done and its handles are dropped.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopTables {
    /// Submissions not finished yet.
    pub open: usize,
    /// Keys some output or handle waits for.
    pub waiting: usize,
    /// Keys being fetched from a worker.
    pub fetching: usize,
    /// Keys whose holders are kept for the handles that may fetch them.
    pub holders: usize,
    /// Keys held on the cluster for open submissions and live handles.
    pub held: usize,
}

/// Where an [`Ask`] is answered.
type AskReply = std::sync::mpsc::Sender<Result<Answer, String>>;

/// Hands task events from the scheduler to this process's subscribers
/// (rule 13).
pub(crate) fn emit_events(events: &[WireEvent]) {
    use rask_executor::events::{emit, Event, EventKind, Place};
    for e in events {
        let place = |worker: WorkerId, thread: u32| Place {
            worker: Some(worker.0),
            thread,
        };
        let kind = match e.kind {
            WireEventKind::Started { worker } => EventKind::Started {
                place: place(worker, 0),
            },
            WireEventKind::Finished {
                worker,
                thread,
                duration_ns,
                nbytes,
            } => EventKind::Finished {
                place: place(worker, thread),
                duration: Duration::from_nanos(duration_ns),
                nbytes: Some(nbytes),
            },
            WireEventKind::Erred { worker } => {
                // The failure itself reaches the futures that want the key;
                // the event only says that the task erred, and where.
                let failure = Failure::new(
                    Key(e.key),
                    e.name.clone(),
                    FailureKind::Failed,
                    "failed on the cluster".into(),
                );
                emit(&Event::new(
                    Key(e.key),
                    &e.name,
                    EventKind::Erred {
                        place: worker.map(|w| place(w, 0)),
                        failure: &failure,
                    },
                ));
                continue;
            }
            WireEventKind::Released => EventKind::Released,
            WireEventKind::Lost { worker } => EventKind::Lost { worker: worker.0 },
        };
        emit(&Event::new(Key(e.key), &e.name, kind));
    }
}

/// Where a fetch for a handle is answered: the bytes or why not.
type Reply = std::sync::mpsc::Sender<Result<Arc<[u8]>, String>>;

struct Submission {
    id: u64,
    /// Whether outputs repeat a key (rule 2).
    repeats: bool,
    /// Output slots already reported, failed here (rule 9), ascending.
    early: Vec<usize>,
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    frames: Vec<Vec<u8>>,
    /// The key of each output slot as the scheduler knows it (rule 9).
    outputs: Vec<WireKey>,
    keep_remote: bool,
    /// Its output keys, held while it is open (rule 7): one per key, on
    /// the key's first output slot.
    holds: Vec<Option<Hold>>,
}

/// One count in [`Link::held`] for a key an open submission will hand out
/// as a handle (rule 7). Dropping it only lowers the count: releasing the
/// key at the scheduler stays the submission's (or its handles') business.
struct Hold {
    key: WireKey,
    /// `None` once the count was taken back by [`drop_hold`].
    link: Option<Arc<Link>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            unhold(&mut link.held(), self.key);
        }
    }
}

/// Drops the hold of `key` among `holds`, and gives the number of commands
/// sent by then: the mark of its release (rule 7). Both happen under the
/// `held` lock, which a submission keeps from finding the key held until it
/// was sent: such a submission is numbered below the mark.
fn drop_hold(link: &Link, holds: &mut [Option<Hold>], slot: usize, key: WireKey) -> u64 {
    let mut held = link.held();
    // The hold is on the key's first slot: this one, unless keys repeat.
    let at = match holds.get(slot) {
        Some(Some(h)) if h.key == key => Some(slot),
        _ => holds
            .iter()
            .position(|h| h.as_ref().is_some_and(|h| h.key == key)),
    };
    if let Some(mut hold) = at.and_then(|at| holds[at].take()) {
        hold.link = None;
        unhold(&mut held, key);
    }
    link.sent()
}

impl Client {
    /// Connects to the scheduler at `address` (`tcp://host:port`,
    /// `tls://host:port`, `host:port`, or `unix:PATH` for its Unix socket,
    /// [`scheduler::Options::unix`](crate::scheduler::Options::unix)) as a
    /// client of this program's build
    /// ([`BuildId::current`]): only workers of that build run its tasks.
    /// The token it proves is the one [`Auth::from_env`] finds (rule 11);
    /// a `tls://` address is reached with the settings [`Tls::from_env`]
    /// finds.
    ///
    /// # Errors
    ///
    /// [`Error::Address`] for a malformed address; [`Error::NoToken`] when
    /// the environment gives no token and does not say the cluster is
    /// insecure, or an error of [`Auth::from_env`]; otherwise as
    /// [`Client::connect_with`].
    pub fn connect(address: &str) -> Result<Client, Error> {
        // A malformed address is the first thing to say.
        parse_address(address).ok_or_else(|| Error::Address {
            address: address.to_owned(),
        })?;
        let auth = Auth::from_env()?.ok_or_else(|| Error::NoToken {
            default_path: Token::default_path(),
        })?;
        Client::connect_with(address, auth)
    }

    /// [`Client::connect`] proving `auth` rather than what the environment
    /// says.
    ///
    /// # Errors
    ///
    /// [`Error::Address`] for a malformed address, [`Error::Connection`] when
    /// nothing accepts the connection, [`Error::Timeout`] when it takes over
    /// ten seconds, [`Error::Auth`] when the scheduler requires a token and
    /// `auth` has none, runs without one and `auth` has one, or holds
    /// another, [`Error::Handshake`] when the other side is not a rask
    /// scheduler of this protocol version.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::{scheduler, Auth, Client, Token};
    /// let sched = scheduler::serve("127.0.0.1:0".parse().unwrap())?;
    /// let address = format!("tcp://{}", sched.address());
    /// let wrong = Client::connect_with(&address, Auth::Token(Token::generate()?));
    /// assert!(wrong.unwrap_err().to_string().starts_with("wrong token"));
    /// let right = Auth::Token(sched.token().unwrap().clone());
    /// let client = Client::connect_with(&address, right)?;
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    ///
    /// A `tls://` address is reached with the settings [`Tls::from_env`]
    /// finds; [`Client::connect_tls`] takes them as an argument.
    pub fn connect_with(address: &str, auth: Auth) -> Result<Client, Error> {
        let tls = connector(address, None)?;
        Client::start(address, None, BuildId::current(), Arc::new(auth), tls)
    }

    /// [`Client::connect_with`] over TLS with `tls`: `address` is
    /// `tls://host:port`, and the scheduler's certificate must be signed by
    /// `tls`'s CA and name `host`. With mutual TLS, `tls` also holds the
    /// client's certificate. The client reaches workers' data ports with
    /// the same settings (`tls.rs` rule 1).
    ///
    /// # Errors
    ///
    /// As [`Client::connect_with`]; [`Error::TlsSettings`] when `tls` has
    /// no CA, [`Error::Tls`] when the TLS handshake fails (the message says
    /// why: an unknown CA, a certificate not naming `host`, a client
    /// certificate required or refused, a port that does not speak TLS).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use rask_distributed::{Auth, Client, Tls};
    /// let tls = Tls::new().trust("ca.pem".as_ref())?;
    /// let auth = Auth::from_env()?.expect("a token");
    /// let client = Client::connect_tls("tls://sched.example:8786", auth, tls)?;
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn connect_tls(address: &str, auth: Auth, tls: Tls) -> Result<Client, Error> {
        let tls = connector(address, Some(tls))?;
        Client::start(address, None, BuildId::current(), Arc::new(auth), tls)
    }

    /// A client of the cluster whose worker runs the current task, as
    /// that worker: its build, its token, its TLS settings (`nested`
    /// rule 3). What a task's nested computations run through.
    ///
    /// # Errors
    ///
    /// As [`Client::connect_with`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// // Inside a task running on a worker:
    /// if let Some(cluster) = rask_distributed::task_cluster() {
    ///     let client = rask_distributed::Client::for_task_cluster(&cluster)?;
    /// }
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn for_task_cluster(cluster: &crate::TaskCluster) -> Result<Client, Error> {
        Client::start_ending(
            &cluster.address,
            None,
            cluster.build,
            (cluster.auth.clone(), cluster.tls.clone()),
            cluster.ends_with_scheduler,
        )
    }

    /// [`Client::connect_with`], announcing `build` instead of this
    /// process's build: tests run clients of several "programs" in one
    /// process this way (see [`worker::spawn_as`](crate::worker::spawn_as)).
    ///
    /// # Errors
    ///
    /// As [`Client::connect_with`].
    #[doc(hidden)]
    pub fn connect_as(address: &str, auth: Auth, build: BuildId) -> Result<Client, Error> {
        let tls = connector(address, None)?;
        Client::start(address, None, build, Arc::new(auth), tls)
    }

    /// [`Client::connect`] to a scheduler of this process, through `local`
    /// (see `SchedulerHandle::local`), with the network loop a task on the
    /// scheduler's thread (`runtime`) instead of a thread of its own:
    /// messages between the two then cost no thread hand-off and no copy
    /// through a socket, which is most of what a small task costs on a busy
    /// machine.
    ///
    /// # Errors
    ///
    /// As [`Client::connect`].
    pub(crate) fn connect_on(
        address: &str,
        runtime: &tokio::runtime::Handle,
        local: net::LocalEnd,
        auth: Arc<Auth>,
        tls: Option<Connector>,
    ) -> Result<Client, Error> {
        // The scheduler files `local` under this process's build too.
        Client::start(
            address,
            Some((runtime, local)),
            BuildId::current(),
            auth,
            tls,
        )
    }

    /// Connects over TCP (TLS with `tls`), or over `local` (an in-memory
    /// connection to the scheduler) when given, as a process of `build`
    /// proving `auth`; the loop runs on its own thread, or as a task on the
    /// given runtime. Data ports are reached with `tls` too.
    fn start(
        address: &str,
        on: Option<(&tokio::runtime::Handle, net::LocalEnd)>,
        build: BuildId,
        auth: Arc<Auth>,
        tls: Option<Connector>,
    ) -> Result<Client, Error> {
        Client::start_ending(address, on, build, (auth, tls), false)
    }

    /// [`Client::start`]; `ends_with_scheduler` for the nested client of a
    /// worker that ends when it loses its scheduler: the loss is then
    /// logged at `debug` (rule 10, `nested` rule 5).
    fn start_ending(
        address: &str,
        on: Option<(&tokio::runtime::Handle, net::LocalEnd)>,
        build: BuildId,
        (auth, tls): (Arc<Auth>, Option<Connector>),
        ends_with_scheduler: bool,
    ) -> Result<Client, Error> {
        let (on, local) = on.unzip();
        let in_process = local.is_some();
        let target = parse_address(address)
            .map(|(scheme, rest)| Target {
                scheme,
                address: rest.to_owned(),
            })
            .ok_or_else(|| Error::Address {
                address: address.to_owned(),
            })?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let weak = commands.downgrade();
        let name = address.to_owned();
        let limits = net::Limits::standard();
        let body = async move {
            let conn = match local {
                Some(end) => Ok((net::Frames::local(end.recv), net::Writer::local(end.send))),
                None => connect(&target, tls.as_ref(), build, &auth, &limits).await,
            };
            match conn {
                Ok((frames, writer)) => {
                    let link = Arc::new(Link::new(name, weak));
                    let _ = ready_tx.send(Ok(link.clone()));
                    // A client of a scheduler in this process does not
                    // outlive it: only TCP clients connect again.
                    let again = (!in_process).then(|| target.clone());
                    let (to_loop, answers) = mpsc::unbounded_channel();
                    let peers =
                        PeerPool::new(to_loop, build, auth.clone(), tls.clone(), limits.clone());
                    let mut run = Loop::new(link, writer, again, (peers, answers));
                    run.ends_with_scheduler = ends_with_scheduler;
                    run.run(frames, commands_rx, build, auth, tls, limits).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(
                        e.into_error(&target.address, crate::protocol::Role::Scheduler)
                    ));
                }
            }
        };
        let ending = match on {
            Some(runtime) => {
                let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
                runtime.spawn(async move {
                    body.await;
                    drop(ended_tx);
                });
                Ending::Task(ended)
            }
            None => {
                let runtime = net::runtime().map_err(Error::Io)?;
                let thread = std::thread::Builder::new()
                    .name("rask-client".into())
                    .spawn(move || runtime.block_on(body))
                    .map_err(Error::Io)?;
                Ending::Thread(thread)
            }
        };
        match ready_rx.recv() {
            Ok(Ok(link)) => {
                let hook = {
                    let link = link.clone();
                    move || {
                        if let Some(commands) = link.commands.upgrade() {
                            let _ = link.send(&commands, Command::Watch);
                        }
                    }
                };
                // Listening already: ask at once.
                if rask_executor::events::listening() {
                    hook();
                }
                let watch = rask_executor::events::on_change(hook);
                Ok(Client {
                    inner: Arc::new(Inner {
                        address: address.to_owned(),
                        commands,
                        thread: Mutex::new(Some(ending)),
                        link,
                        _watch: watch,
                    }),
                })
            }
            Ok(Err(e)) => {
                ending.wait();
                Err(e)
            }
            Err(_) => {
                ending.wait();
                Err(Error::Connection {
                    addr: address.to_owned(),
                    reason: std::io::Error::other("the client thread ended"),
                })
            }
        }
    }

    /// The address this client was connected to, as given.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// Whether the connection to the scheduler is up. A client connected
    /// over TCP that lost it (the scheduler restarted, the network failed)
    /// connects again by itself (rule 10); a client of a scheduler in this
    /// process stays disconnected.
    ///
    /// ```no_run
    /// let client = rask_distributed::Client::connect("tcp://127.0.0.1:8786")?;
    /// if !client.is_connected() {
    ///     // the scheduler went away: connect again
    /// }
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn is_connected(&self) -> bool {
        self.inner.link.connected.load(Ordering::Acquire)
    }

    /// What the cluster looks like now, for this program's build: its
    /// workers (threads, tasks running, memory, data held, last heartbeat)
    /// and its tasks per function and state (Dask's `scheduler_info`).
    ///
    /// # Errors
    ///
    /// [`Error::Connection`] when the client is not connected, or the
    /// scheduler does not answer within 10 s.
    pub fn info(&self) -> Result<Snapshot, Error> {
        match self.ask(Ask::Info, ASK_TIMEOUT)? {
            Answer::Info(snapshot) => Ok(*snapshot),
            _ => Err(self.no_answer("a wrong answer")),
        }
    }

    /// For each key, the data ports (`host:port`) of the workers holding
    /// its value; empty for a key not in memory (Dask's `who_has`).
    ///
    /// # Errors
    ///
    /// As [`Client::info`].
    pub fn who_has(&self, keys: &[Key]) -> Result<Vec<Vec<String>>, Error> {
        let keys = keys.iter().map(|k| k.0).collect();
        match self.ask(Ask::WhoHas(keys), ASK_TIMEOUT)? {
            Answer::WhoHas(holders) => Ok(holders),
            _ => Err(self.no_answer("a wrong answer")),
        }
    }

    /// Retires the workers of these names, gracefully (Dask's
    /// `retire_workers`), and returns once they are gone: the scheduler
    /// gives them no new task, lets them finish the tasks they were sent,
    /// has every value only they hold copied to a worker that stays, then
    /// tells them to exit (their processes end). Nothing is computed again
    /// and no value is lost. Names are those [`Client::info`] lists
    /// (`--name`, `RASK_WORKER_NAME`), among this program's workers.
    ///
    /// # Errors
    ///
    /// [`Error::Retire`] when a name is not one of this program's
    /// workers, or when no other worker would be left to hold their
    /// values (none is retired then); [`Error::Connection`] when the
    /// connection is lost first.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), rask_distributed::Error> {
    /// # let client: rask_distributed::Client = unimplemented!();
    /// let names: Vec<String> = client.info()?.workers.iter().map(|w| w.name.clone()).collect();
    /// client.retire_workers(&names[..1])?;
    /// assert_eq!(client.info()?.workers.len(), names.len() - 1);
    /// # Ok(()) }
    /// ```
    pub fn retire_workers<S: AsRef<str>>(&self, names: &[S]) -> Result<(), Error> {
        let names = names.iter().map(|n| n.as_ref().to_owned()).collect();
        match self.ask(Ask::Retire(names), Duration::MAX)? {
            Answer::Retired(None) => Ok(()),
            Answer::Retired(Some(reason)) => Err(Error::Retire { reason }),
            _ => Err(self.no_answer("a wrong answer")),
        }
    }

    /// Asks the scheduler for a copy of each of `keys` on every worker of
    /// this program's build (Dask's `replicate`), for keys this client
    /// holds in memory there; others are skipped. Returns once the request
    /// is queued, before any copy arrived: [`Client::who_has`] shows them
    /// (rule 16). A worker that joins later gets no copy.
    ///
    /// # Errors
    ///
    /// [`Error::Connection`] when the client is closed.
    pub fn replicate(&self, keys: &[Key]) -> Result<(), Error> {
        let keys = keys.iter().map(|k| k.0).collect();
        self.inner
            .link
            .send(&self.inner.commands, Command::Replicate(keys))
            .map_err(|_| self.no_answer("the client is closed"))
    }

    /// Asks the scheduler; waits `timeout` at most for the answer.
    fn ask(&self, ask: Ask, timeout: Duration) -> Result<Answer, Error> {
        if std::thread::current().id() == self.inner.link.thread_id {
            return Err(self.no_answer("asked on the client's own thread"));
        }
        let (reply, answer) = std::sync::mpsc::channel();
        self.inner
            .link
            .send(&self.inner.commands, Command::Ask(ask, reply))
            .map_err(|_| self.no_answer("the client is closed"))?;
        let answer = match Instant::now().checked_add(timeout) {
            Some(deadline) => answer.recv_timeout(deadline - Instant::now()),
            // No deadline: a lost connection answers (rule 14).
            None => answer
                .recv()
                .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(why)) => Err(self.no_answer(&why)),
            Err(_) => Err(self.no_answer(&format!("no answer within {timeout:?}"))),
        }
    }

    /// How many entries this client's network loop keeps in each of its
    /// tables: for tests that check it keeps nothing once the work it was
    /// given is done and its handles are dropped.
    ///
    /// # Errors
    ///
    /// As [`Client::info`].
    #[doc(hidden)]
    pub fn loop_tables(&self) -> Result<LoopTables, Error> {
        match self.ask(Ask::Tables, ASK_TIMEOUT)? {
            Answer::Tables(tables) => Ok(tables),
            _ => Err(self.no_answer("a wrong answer")),
        }
    }

    fn no_answer(&self, why: &str) -> Error {
        Error::Connection {
            addr: self.inner.address.clone(),
            reason: std::io::Error::other(why.to_owned()),
        }
    }
}

impl Executor for Client {
    fn submit(&self, plan: Arc<Plan>, reporter: Arc<dyn Reporter>) {
        if plan.outputs().is_empty() {
            drop(plan);
            reporter.finished();
            return;
        }
        let keep_remote = reporter.keep_remote();
        if rask_executor::events::listening() {
            rask_executor::events::queued(&plan);
        }
        let mut wires = Vec::with_capacity(plan.len());
        // Tasks that refer to a held key (rule 6).
        let mut remote = Vec::new();
        for (i, task) in plan.tasks().iter().enumerate() {
            let wire = match task.op().to_wire() {
                Ok(w) => w,
                Err(e) => {
                    let failure = Arc::new(plan.failed(i as u32, e.to_string()));
                    return fail_all(plan, &*reporter, &failure);
                }
            };
            if wire.function == REMOTE_FUNCTION {
                remote.push(i);
            }
            wires.push(wire);
        }
        // Rule 6: a held key travels as a reference only while this client
        // holds it; the lock is kept until the submission is queued.
        let held = loop {
            if remote.is_empty() {
                break None;
            }
            let held = self.inner.link.held();
            let foreign: Vec<usize> = remote
                .iter()
                .copied()
                .filter(|&i| !held.contains_key(&plan.key(i as u32).0))
                .collect();
            if foreign.is_empty() {
                break Some(held);
            }
            drop(held);
            for &i in &foreign {
                match inline_value(&plan, i) {
                    Ok(wire) => wires[i] = wire,
                    Err(failure) => return fail_all(plan, &*reporter, &failure),
                }
            }
            remote.retain(|i| !foreign.contains(i));
        };
        // Rule 9: work that depends on a recorded failure fails here, at
        // once, and is not sent.
        let mut failed: Vec<Option<Arc<Failure>>> = Vec::with_capacity(plan.len());
        for (i, wire) in wires.iter().enumerate() {
            let failure = if wire.function == FAIL_FUNCTION {
                let recorded = rask_executor::decode_failure(&wire.payload)
                    .unwrap_or_else(|e| plan.failed(i as u32, e.to_string()));
                Some(Arc::new(recorded))
            } else {
                plan.deps(i as u32)
                    .iter()
                    .find_map(|&d| failed[d as usize].clone())
            };
            failed.push(failure);
        }
        let early: Vec<(usize, Arc<Failure>)> = plan
            .outputs()
            .iter()
            .enumerate()
            .filter_map(|(slot, &t)| failed[t as usize].clone().map(|f| (slot, f)))
            .collect();
        if early.len() == plan.outputs().len() {
            drop(held);
            let failures = early.into_iter().map(|(_, f)| f).collect();
            return fail_each(plan, &*reporter, failures, &[]);
        }
        let outputs: Vec<WireKey> = plan.outputs().iter().map(|&t| plan.key(t).0).collect();
        let mut wanted: Vec<WireKey> = plan
            .outputs()
            .iter()
            .filter(|&&t| failed[t as usize].is_none())
            .map(|&t| plan.key(t).0)
            .collect();
        // Each key once, in the plan's order: the scheduler activates them
        // in this order, and its ready queue costs least when work becomes
        // ready in submission order (`scheduler::ready`).
        if wanted.len() > 1 {
            let mut seen: std::collections::HashSet<WireKey, foldhash::fast::RandomState> =
                std::collections::HashSet::with_capacity_and_hasher(
                    wanted.len(),
                    Default::default(),
                );
            wanted.retain(|key| seen.insert(*key));
        }
        // Whether outputs repeat a key (rule 2 counts them then).
        let repeats = wanted.len() + early.len() < outputs.len();
        // Encoded from the plan and the wire forms as they are, with no
        // copy of each task first.
        let frames = {
            let tasks: Vec<TaskSpecRef<'_>> = wires
                .iter()
                .enumerate()
                .filter(|(i, _)| failed[*i].is_none())
                .map(|(i, wire)| TaskSpecRef::of(&plan, i as u32, wire))
                .collect();
            let mut batch = Batch::default();
            batch.push(&ToSchedulerRef::UpdateGraph {
                tasks: &tasks,
                wanted: &wanted,
            });
            batch.take_frames()
        };
        drop(wires);
        if let Some(big) = frames.iter().find(|f| f.len() - 4 > MAX_FRAME) {
            drop(held);
            let failure = Arc::new(plan.failed(
                plan.outputs()[0],
                format!(
                    "the graph encodes to {} bytes, over the {MAX_FRAME} byte limit of one message; \
                     scatter big arguments instead of embedding them",
                    big.len() - 4
                ),
            ));
            return fail_all(plan, &*reporter, &failure);
        }
        // Rule 7: while it is open, a submission whose outputs become handles
        // holds its keys, so later graphs may refer to them before they are
        // computed (a chain of submits costs no round trip per link).
        let mut held = held;
        let holds = if keep_remote {
            let guard = held.get_or_insert_with(|| self.inner.link.held());
            // One per key, on the first output slot with that key; none for
            // outputs that failed here (rule 9).
            let mut first = repeats.then(std::collections::HashSet::new);
            outputs
                .iter()
                .enumerate()
                .map(|(slot, &key)| {
                    if early.binary_search_by_key(&slot, |&(s, _)| s).is_ok()
                        || first.as_mut().is_some_and(|seen| !seen.insert(key))
                    {
                        return None;
                    }
                    hold(guard, key);
                    Some(Hold {
                        key,
                        link: Some(self.inner.link.clone()),
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        // Rule 8: the reporter can stop one output.
        let id = self.inner.link.next_id.fetch_add(1, Ordering::Relaxed);
        let link = self.inner.link.clone();
        reporter.stop_with(Arc::new(move |slot| {
            if let Some(commands) = link.commands.upgrade() {
                let _ = link.send(&commands, Command::Stop { id, slot });
            }
        }));
        // Outputs that failed here are reported now, before the loop can
        // report the others and finish (rule 9).
        let early: Vec<usize> = early
            .into_iter()
            .map(|(slot, failure)| {
                reporter.output(slot, Err(failure));
                slot
            })
            .collect();
        let submission = Submission {
            id,
            repeats,
            early,
            plan,
            reporter,
            frames,
            outputs,
            keep_remote,
            holds,
        };
        let sent = self
            .inner
            .link
            .send(&self.inner.commands, Command::Submit(Box::new(submission)));
        drop(held);
        if let Err(Command::Submit(s)) = sent {
            let failures = lost(&s.plan, &self.inner.address);
            fail_each(s.plan, &*s.reporter, failures, &s.early);
        }
    }
}

/// Task `i`, a reference to a key this client does not hold (rule 6), as
/// the value it stands for: its op gives the value (a handle of another
/// client is fetched through that client) or the failure recorded for it
/// (the key failed or was cancelled meanwhile), which travels as such.
fn inline_value(plan: &Plan, i: usize) -> Result<WireTask, Arc<Failure>> {
    let failure = |message: String| Arc::new(plan.failed(i as u32, message));
    if !plan.deps(i as u32).is_empty() {
        return Err(failure(format!(
            "a `{REMOTE_FUNCTION}` task has inputs; it must stand for a value"
        )));
    }
    let value = match rask_executor::run_task(plan, i as u32, &mut []) {
        Ok(value) => value,
        Err(recorded) => {
            return rask_executor::encode_failure(&recorded)
                .map(|payload| WireTask {
                    function: FAIL_FUNCTION.to_owned(),
                    payload,
                })
                .map_err(|e| failure(e.to_string()))
        }
    };
    let bytes = match value.downcast_ref::<Remote>() {
        Some(remote) => remote.fetch(),
        None => value.encode().map(Arc::from),
    };
    bytes
        .map(|bytes| WireTask {
            function: VALUE_FUNCTION.to_owned(),
            payload: bytes.to_vec(),
        })
        .map_err(|e| failure(e.to_string()))
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
/// Slots in `reported` were reported already (rule 9) and are skipped.
fn fail_each(
    plan: Arc<Plan>,
    reporter: &dyn Reporter,
    failures: Vec<Arc<Failure>>,
    reported: &[usize],
) {
    drop(plan);
    for (slot, failure) in failures.into_iter().enumerate() {
        if reported.binary_search(&slot).is_err() {
            reporter.output(slot, Err(failure));
        }
    }
    reporter.finished();
}

/// `frames`, a graph, with `key` no longer among its wanted keys (rule 8).
/// Frames that do not decode are kept as they are; this client encoded
/// them, so they always do.
fn unwant(frames: Vec<Vec<u8>>, key: WireKey) -> Vec<Vec<u8>> {
    let mut batch = Batch::default();
    for frame in &frames {
        let Some(Ok(msgs)) = frame.get(4..).map(decode_checked::<ToScheduler>) else {
            return frames;
        };
        for mut msg in msgs {
            if let ToScheduler::UpdateGraph { wanted, .. } = &mut msg {
                wanted.retain(|k| *k != key);
            }
            batch.push(&msg);
        }
    }
    batch.take_frames()
}

/// Each output's failure when the scheduler connection is gone.
fn lost(plan: &Plan, address: &str) -> Vec<Arc<Failure>> {
    plan.outputs()
        .iter()
        .map(|&t| {
            Arc::new(plan.failed(
                t,
                format!("lost the connection to the scheduler at {address}"),
            ))
        })
        .collect()
}

/// A submission in flight.
struct Open {
    plan: Arc<Plan>,
    reporter: Arc<dyn Reporter>,
    reported: Vec<bool>,
    unreported: usize,
    /// The key of each output slot as the scheduler knows it (rule 9).
    outputs: Vec<WireKey>,
    /// For a submission with several outputs of one key: the outputs of
    /// each such key not reported yet (rule 2); `None` when every output
    /// has a key of its own, the usual case.
    shared_keys: Option<KeyMap<WireKey, u32>>,
    keep_remote: bool,
    /// Handles reported so far, by key (rule 5); their keys are released
    /// when the handles are dropped, not with the submission.
    handles: KeyMap<WireKey, Arc<KeyHandle>>,
    /// Its output keys, held while it is open (rule 7), each until its
    /// output was reported.
    holds: Vec<Option<Hold>>,
}

/// Who waits for a key's value.
enum Waiter {
    /// Output `slot` of submission `id`.
    Slot(u64, usize),
    /// A handle's fetch.
    Fetch(Reply),
}

/// A fetch in flight for a key some submission waits for.
struct Fetching {
    current: WorkerId,
    others: Vec<WorkerId>,
}

/// The client thread's state.
struct Loop {
    address: String,
    link: Arc<Link>,
    writer: Writer,
    connected: bool,
    open: KeyMap<u64, Open>,
    /// Output slots and fetches waiting for each key.
    waiting: KeyMap<WireKey, Vec<Waiter>>,
    fetching: KeyMap<WireKey, Fetching>,
    /// The latest holders of each key a live handle refers to (rule 5).
    holders: KeyMap<WireKey, Vec<WorkerId>>,
    /// Keys whose handles were dropped, released at the next flush.
    releases: Vec<WireKey>,
    /// Keys whose outputs were reported this turn, each with the number of
    /// commands sent by then; released ahead of later commands (rule 7).
    ended: std::collections::VecDeque<(u64, WireKey)>,
    /// The data ports of this connection's epoch, and where their fetches
    /// answer: both are replaced on connecting again (rule 10).
    peers: PeerPool,
    answers: mpsc::UnboundedReceiver<Fetched>,
    out: Batch,
    last_poll: Instant,
    /// Where to connect again when the connection is lost (rule 10);
    /// `None` for a client of a scheduler in this process.
    target: Option<Target>,
    /// The nested client of a worker that ends with its scheduler: the
    /// loss of the connection is the end of this process, logged at
    /// `debug` (rule 10, `nested` rule 5).
    ends_with_scheduler: bool,
    /// When to try connecting again, while disconnected (rule 10).
    next_attempt: Option<Instant>,
    /// The wait before the next attempt after a failed one.
    backoff: Duration,
    /// Submissions made while disconnected, waiting for the attempt in
    /// flight (rule 10).
    parked: Vec<Submission>,
    /// When the last frame went to the scheduler (rule 12).
    last_sent: Instant,
    /// Whether the scheduler was asked for task events (rule 13).
    watching: bool,
    /// Questions sent and not answered, by id (rule 14).
    asks: KeyMap<u64, AskReply>,
    next_ask: u64,
    /// The data ports of the workers the scheduler told of.
    workers: KeyMap<WorkerId, String>,
    /// Since when work has been open with no worker to run it, and whether
    /// that was said (rule 15).
    no_workers_since: Option<Instant>,
    warned: bool,
}

/// The first wait between attempts to connect again (rule 10); it doubles
/// up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between attempts to connect again (rule 10).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A connection attempt in flight (rule 10).
type Attempt = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(net::Frames, Writer), ConnectError>> + Send>,
>;

/// Where a connection's frames go.
type Writer = net::Writer;

/// The TLS connector for `address`: none for a `tcp://` one; for a
/// `tls://` one, from `tls`, else from the environment (`tls.rs` rule 1).
fn connector(address: &str, tls: Option<Tls>) -> Result<Option<Connector>, Error> {
    let Some((scheme, _)) = parse_address(address) else {
        return Err(Error::Address {
            address: address.to_owned(),
        });
    };
    if scheme != Scheme::Tls {
        return Ok(None);
    }
    let tls = match tls {
        Some(tls) => tls,
        None => Tls::from_env()?.ok_or(Error::TlsSettings {
            problem: "a `tls://` address needs TLS settings: set RASK_TLS_CA to the CA that \
                      signed the scheduler's certificate (and RASK_TLS_CERT and RASK_TLS_KEY \
                      for mutual TLS)",
            source: None,
        })?,
    };
    tls.connector().map(Some)
}

/// Where a client connects to: a scheduler's `host:port` (a path for
/// `unix:`), and how it is reached.
#[derive(Clone)]
struct Target {
    scheme: Scheme,
    address: String,
}

/// Connects to the scheduler at `target` (TLS with `tls`), as a
/// client of `build`, reading within `limits`.
async fn connect(
    target: &Target,
    tls: Option<&Connector>,
    build: BuildId,
    auth: &Auth,
    limits: &net::Limits,
) -> Result<(net::Frames, Writer), ConnectError> {
    let (me, scheduler) = (
        crate::protocol::Role::Client,
        crate::protocol::Role::Scheduler,
    );
    let c = net::connect(
        (target.scheme, &target.address, tls),
        me,
        scheduler,
        build,
        auth,
        net::CONNECT_TIMEOUT,
        limits,
    )
    .await?;
    Ok((
        net::Frames::stream(c.read),
        net::spawn_writer(c.write, limits, None),
    ))
}

/// A loop dropped before it ended, with the runtime it ran on (a local
/// cluster's scheduler shutting down), still reports every open
/// submission's outputs as lost (rule 4).
impl Drop for Loop {
    fn drop(&mut self) {
        self.target = None;
        if self.connected {
            self.disconnected();
        }
        self.fail_parked("the client was closed");
    }
}

impl Loop {
    /// A loop fetching from data ports with `peers`, whose fetches answer
    /// on `answers`.
    fn new(
        link: Arc<Link>,
        writer: Writer,
        target: Option<Target>,
        (peers, answers): (PeerPool, mpsc::UnboundedReceiver<Fetched>),
    ) -> Loop {
        Loop {
            target,
            ends_with_scheduler: false,
            next_attempt: None,
            backoff: FIRST_BACKOFF,
            parked: Vec::new(),
            last_sent: Instant::now(),
            address: link.address.clone(),
            link,
            writer,
            connected: true,
            open: KeyMap::default(),
            waiting: KeyMap::default(),
            fetching: KeyMap::default(),
            holders: KeyMap::default(),
            releases: Vec::new(),
            ended: std::collections::VecDeque::new(),
            peers,
            answers,
            out: Batch::default(),
            last_poll: Instant::now(),
            watching: false,
            asks: KeyMap::default(),
            next_ask: 0,
            workers: KeyMap::default(),
            no_workers_since: None,
            warned: false,
        }
    }

    /// Runs until the last `Client` is gone; connects again as a process
    /// of `build` proving `auth` (rules 10 and 11), reading within `limits`
    /// (data ports are reached as its pool was made to).
    async fn run(
        mut self,
        mut read: net::Frames,
        mut commands: mpsc::UnboundedReceiver<Sequenced>,
        build: BuildId,
        auth: Arc<Auth>,
        tls: Option<Connector>,
        limits: net::Limits,
    ) {
        let mut tick = tokio::time::interval(CANCEL_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Rule 12; a client of a scheduler in this process sends none.
        let beats = self.target.is_some();
        // Ticks twice per period: a heartbeat goes at most 1.5 periods
        // after the last frame.
        let mut heartbeat = tokio::time::interval(HEARTBEAT / 2);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attempt: Option<Attempt> = None;
        loop {
            let open = !self.open.is_empty();
            let retry_at = match (&attempt, self.next_attempt) {
                (None, Some(at)) if !self.connected => Some(at),
                _ => None,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now).into()),
                    if retry_at.is_some() =>
                {
                    self.next_attempt = None;
                    if let Some(target) = self.target.clone() {
                        let auth = auth.clone();
                        let limits = limits.clone();
                        let tls = tls.clone();
                        attempt = Some(Box::pin(async move {
                            connect(&target, tls.as_ref(), build, &auth, &limits).await
                        }));
                    }
                }
                done = async { attempt.as_mut().expect("guarded").await }, if attempt.is_some() => {
                    attempt = None;
                    match done {
                        Ok((frames, writer)) => {
                            read = frames;
                            self.reconnected(writer);
                        }
                        Err(e) => self.reconnect_failed(&e),
                    }
                }
                cmd = commands.recv() => match cmd {
                    Some((seq, cmd)) => {
                        self.command(seq, cmd);
                        while let Ok((seq, cmd)) = commands.try_recv() {
                            self.command(seq, cmd);
                        }
                    }
                    None => break,
                },
                // What the messages take decoded is held from the budget
                // until the loop handled them (net rule 8); a frame waiting
                // for its grant keeps its place while the loop goes on.
                got = read.next_messages::<ToClient>(), if self.connected => {
                    let got = match got {
                        Ok(Some(got)) => Ok(got),
                        Ok(None) => Err(crate::protocol::ProtocolError::Closed),
                        Err(e) => Err(e),
                    };
                    match got {
                        Ok(net::Messages { msgs, grant }) => {
                            for msg in msgs {
                                self.message(msg);
                            }
                            drop(grant);
                        }
                        Err(e) => {
                            if !matches!(e, crate::protocol::ProtocolError::Closed) {
                                tracing::warn!("client: closing the scheduler connection: {}", Chain(&e));
                            }
                            // What the reader holds goes now (net rule 8).
                            read = net::Frames::closed();
                            self.disconnected();
                        }
                    }
                }
                Some(f) = self.answers.recv() => {
                    self.fetched(f);
                    while let Ok(f) = self.answers.try_recv() {
                        self.fetched(f);
                    }
                }
                why = self.writer.closed(), if self.connected => {
                    // The scheduler stopped reading (net rule 9), or the
                    // socket failed: the connection is lost (rule 10).
                    if let Some(e) = why {
                        tracing::warn!("client: closing the scheduler connection: {e}");
                    }
                    // What the reader holds or waits for goes now (net
                    // rule 8).
                    read = net::Frames::closed();
                    self.disconnected();
                }
                _ = heartbeat.tick(), if beats => {
                    if self.connected && self.last_sent.elapsed() >= HEARTBEAT {
                        self.out.push(&ToScheduler::Heartbeat);
                    }
                }
                _ = tick.tick(), if open => {}
            }
            // Commands sent before this turn's releases go ahead of them
            // (rule 7).
            while let Ok((seq, cmd)) = commands.try_recv() {
                self.command(seq, cmd);
            }
            self.poll_cancelled();
            self.no_workers();
            self.flush();
        }
        // The last `Client` is gone: cancel what is still open (rule 4).
        let ids: Vec<u64> = self.open.keys().copied().collect();
        for id in ids {
            self.cancel(id);
        }
        self.fail_parked("the client was closed");
        self.flush();
    }

    /// Handles command number `seq`, after sending the releases made
    /// before it was sent (rule 7).
    fn command(&mut self, seq: u64, cmd: Command) {
        // Marks never decrease, so the releases due come first.
        let due = self
            .ended
            .iter()
            .take_while(|&&(mark, _)| mark <= seq)
            .count();
        if due > 0 {
            let now: Vec<_> = self.ended.drain(..due).collect();
            self.release_ended(now);
        }
        match cmd {
            Command::Submit(s) => self.submit(*s),
            Command::Release(key) => self.release(key),
            Command::Fetch { key, epoch, reply } => self.fetch(key, epoch, reply),
            Command::Stop { id, slot } => self.stop(id, slot),
            Command::Watch => self.watch(),
            Command::Ask(ask, reply) => self.ask(ask, reply),
            Command::Replicate(keys) => {
                // Lost with the connection, like any request: the caller
                // sees no copies and may ask again (rule 16).
                if self.connected {
                    self.out.push(&ToScheduler::Replicate { keys });
                }
            }
        }
    }

    /// Says so once when work has waited [`NO_WORKERS_WARNING`] with no
    /// worker of this program's build on the cluster (rule 15).
    fn no_workers(&mut self) {
        if self.open.is_empty() || !self.workers.is_empty() || !self.connected {
            self.no_workers_since = None;
            return;
        }
        let since = *self.no_workers_since.get_or_insert_with(Instant::now);
        if !self.warned && since.elapsed() >= NO_WORKERS_WARNING {
            self.warned = true;
            tracing::warn!(
                "client: work has waited {} s and the scheduler at {} has no worker of this \
                 program's build; start some with RASK_WORKER={} (and the cluster's token)",
                NO_WORKERS_WARNING.as_secs(),
                self.address,
                self.address
            );
        }
    }

    /// Asks the scheduler for task events while this process listens, and
    /// stops when it does not (rule 13).
    fn watch(&mut self) {
        let on = rask_executor::events::listening();
        if on != self.watching && self.connected {
            self.out.push(&ToScheduler::Watch { on });
        }
        self.watching = on;
    }

    /// Sends a question; its answer goes to `reply` (rule 14). The loop
    /// answers for its own tables itself, connected or not.
    fn ask(&mut self, ask: Ask, reply: AskReply) {
        let id = self.next_ask;
        let message = match ask {
            Ask::Tables => {
                let _ = reply.send(Ok(Answer::Tables(LoopTables {
                    open: self.open.len(),
                    waiting: self.waiting.len(),
                    fetching: self.fetching.len(),
                    holders: self.holders.len(),
                    held: self.link.held().len(),
                })));
                return;
            }
            _ if !self.connected => {
                let _ = reply.send(Err(format!(
                    "not connected to the scheduler at {}",
                    self.address
                )));
                return;
            }
            Ask::Info => ToScheduler::Info { id },
            Ask::WhoHas(keys) => ToScheduler::WhoHas { id, keys },
            Ask::Retire(names) => ToScheduler::RetireWorkers { id, names },
        };
        self.next_ask += 1;
        self.out.push(&message);
        self.asks.insert(id, reply);
    }

    /// A handle for `key` was dropped (rule 5).
    fn release(&mut self, key: WireKey) {
        if !self.link.held().contains_key(&key) {
            // No handle for the key is left: nobody fetches it any more.
            self.holders.remove(&key);
            if let Some(waiters) = self.waiting.get_mut(&key) {
                waiters.retain(|w| matches!(w, Waiter::Slot(..)));
                if waiters.is_empty() {
                    self.waiting.remove(&key);
                    self.fetching.remove(&key);
                }
            }
        }
        if self.connected {
            self.releases.push(key);
        }
    }

    /// A handle wants the bytes of `key` (rule 5).
    fn fetch(&mut self, key: WireKey, epoch: u64, reply: Reply) {
        if !self.connected || epoch != self.link.epoch.load(Ordering::Acquire) {
            let _ = reply.send(Err(lost_with_connection(&self.address)));
            return;
        }
        self.waiting
            .entry(key)
            .or_default()
            .push(Waiter::Fetch(reply));
        if self.fetching.contains_key(&key) {
            return;
        }
        match self.holders.get(&key) {
            Some(holders) if !holders.is_empty() => self.start_fetch(key, holders.clone()),
            // Its holders this client knew of left: the scheduler names
            // another that holds a copy, or sends `KeyInMemory` once it
            // recomputed the key (rule 3). Waiting without asking would
            // wait for ever when a copy was elsewhere all along.
            _ => self.out.push(&ToScheduler::FetchFailed {
                key,
                holder: NO_HOLDER,
            }),
        }
    }

    /// Asks the first of `holders` for `key`, keeping the others in reserve.
    fn start_fetch(&mut self, key: WireKey, mut holders: Vec<WorkerId>) {
        holders.reverse();
        if let Some(first) = holders.pop() {
            self.peers.request(first, key);
            self.fetching.insert(
                key,
                Fetching {
                    current: first,
                    others: holders,
                },
            );
        }
    }

    /// A handle of submission `id` for `key`, whose bytes are `bytes` if
    /// known: the submission's first for the key makes it (rule 5).
    fn handle(
        &mut self,
        id: u64,
        key: WireKey,
        holders: &[WorkerId],
        bytes: Option<&Arc<[u8]>>,
    ) -> Option<Value> {
        let open = self.open.get_mut(&id)?;
        let link = &self.link;
        let make = || {
            Arc::new(match bytes {
                Some(bytes) => KeyHandle::with_bytes(key, link.clone(), bytes.clone()),
                None => KeyHandle::holding(key, link.clone()),
            })
        };
        // The key's only output, with its bytes: a handle nobody looks up
        // again (`report` looks up handles that hold their key).
        let handle: Arc<dyn RemoteValue> = if bytes.is_some() && open.shared_keys.is_none() {
            make()
        } else {
            open.handles.entry(key).or_insert_with(make).clone()
        };
        if bytes.is_none() {
            // Kept until its last holding handle is dropped (`release`): a
            // handle with its bytes never fetches.
            let known = self.holders.entry(key).or_default();
            if !holders.is_empty() {
                *known = holders.to_vec();
            }
        }
        Some(Arc::new(Remote(handle)))
    }

    /// Whether submission `id` wants handles rather than bytes.
    fn keeps_remote(&self, id: u64) -> bool {
        self.open.get(&id).is_some_and(|o| o.keep_remote)
    }

    fn submit(&mut self, s: Submission) {
        if !self.connected {
            if self.target.is_some() {
                // Rule 10: it goes out once an attempt to connect, made now,
                // succeeds; it fails if that attempt fails.
                self.parked.push(s);
                if self.next_attempt.is_some() {
                    self.next_attempt = Some(Instant::now());
                }
                return;
            }
            let failures = lost(&s.plan, &self.address);
            return fail_each(s.plan, &*s.reporter, failures, &s.early);
        }
        let id = s.id;
        for (slot, &key) in s.outputs.iter().enumerate() {
            if s.early.binary_search(&slot).is_err() {
                self.waiting
                    .entry(key)
                    .or_default()
                    .push(Waiter::Slot(id, slot));
            }
        }
        // Messages leave in the order of their commands: a release queued
        // before this submission reaches the scheduler before its graph.
        // Releases of submissions that ended this turn wait for the turn's
        // end (rule 7).
        self.flush_out();
        for frame in s.frames {
            let _ = self.writer.send(frame);
        }
        let n = s.outputs.len();
        let shared_keys = s.repeats.then(|| {
            let mut counts = KeyMap::default();
            // Slots reported already (rules 8 and 9) release nothing.
            for (slot, &key) in s.outputs.iter().enumerate() {
                if s.early.binary_search(&slot).is_err() {
                    *counts.entry(key).or_insert(0) += 1;
                }
            }
            counts
        });
        self.open.insert(
            id,
            Open {
                plan: s.plan,
                reporter: s.reporter,
                reported: (0..n)
                    .map(|slot| s.early.binary_search(&slot).is_ok())
                    .collect(),
                unreported: n - s.early.len(),
                outputs: s.outputs,
                shared_keys,
                keep_remote: s.keep_remote,
                handles: KeyMap::default(),
                holds: s.holds,
            },
        );
    }

    /// Nobody wants output `slot` of submission `id` (rule 8): it is
    /// reported cancelled, and its key released at the scheduler unless
    /// another open output of the submission has the same key.
    fn stop(&mut self, id: u64, slot: usize) {
        let Some(open) = self.open.get_mut(&id) else {
            return self.stop_parked(id, slot);
        };
        if open.reported.get(slot).copied().unwrap_or(true) {
            return;
        }
        let key = open.outputs[slot];
        let failure = open.plan.cancelled_output(slot);
        if let Some(waiters) = self.waiting.get_mut(&key) {
            waiters.retain(|w| !matches!(w, Waiter::Slot(sid, s) if *sid == id && *s == slot));
            if waiters.is_empty() {
                self.waiting.remove(&key);
                self.fetching.remove(&key);
            }
        }
        self.report(id, slot, Err(failure));
    }

    /// Rule 8 for a submission parked until a connection (rule 10): the
    /// output is reported cancelled at once and its key is no longer wanted
    /// by the graph sent, unless another of its outputs wants it; a
    /// submission with no output left is dropped, never sent.
    fn stop_parked(&mut self, id: u64, slot: usize) {
        let Some(at) = self.parked.iter().position(|s| s.id == id) else {
            return;
        };
        let s = &mut self.parked[at];
        // Reported already: failed here (rule 9), or stopped before.
        let Err(place) = s.early.binary_search(&slot) else {
            return;
        };
        let Some(&key) = s.outputs.get(slot) else {
            return;
        };
        s.early.insert(place, slot);
        let failure = s.plan.cancelled_output(slot);
        if s.early.len() == s.outputs.len() {
            let Submission {
                plan,
                reporter,
                holds,
                ..
            } = self.parked.remove(at);
            // As for an open one (rule 4): the plan goes first.
            drop(plan);
            drop(holds);
            reporter.output(slot, Err(failure));
            reporter.finished();
            return;
        }
        let wanted = (s.outputs.iter().enumerate())
            .any(|(i, &k)| k == key && s.early.binary_search(&i).is_err());
        if !wanted {
            // Nothing is sent yet, so no release needs a mark (rule 7).
            drop_hold(&self.link, &mut s.holds, slot, key);
            s.frames = unwant(std::mem::take(&mut s.frames), key);
        }
        s.reporter.output(slot, Err(failure));
    }

    fn message(&mut self, msg: ToClient) {
        match msg {
            ToClient::WorkerJoined { id, address } => {
                self.workers.insert(id, address.clone());
                self.peers.add_peer(id, address);
            }
            ToClient::WorkerLeft { id } => {
                self.workers.remove(&id);
                self.peers.remove_peer(id);
                for holders in self.holders.values_mut() {
                    holders.retain(|&h| h != id);
                }
            }
            ToClient::KeyInMemory {
                key,
                holders,
                nbytes,
                value,
            } => {
                if let Some(known) = self.holders.get_mut(&key) {
                    known.clone_from(&holders);
                }
                // A submission nobody waits for any more (its futures were
                // dropped, as each link of a submit chain is) is cancelled
                // now rather than at the next poll: fetching its value would
                // be for nobody.
                let cancelled: Vec<u64> = self
                    .waiting
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|w| match w {
                        Waiter::Slot(id, _) => Some(*id),
                        Waiter::Fetch(_) => None,
                    })
                    .filter(|id| self.open.get(id).is_some_and(|o| o.reporter.cancelled()))
                    .collect();
                for id in cancelled {
                    self.cancel(id);
                }
                // Rule 3: a small value came with the answer; no fetch.
                if let (Some(bytes), Some(&from)) = (value, holders.first()) {
                    self.fetching.remove(&key);
                    self.answer(key, Ok((bytes, from)));
                    return;
                }
                let Some(waiters) = self.waiting.remove(&key) else {
                    return; // nobody waits any more (cancelled, or answered)
                };
                // Rule 5: big keep-remote outputs get their handle unfetched.
                let (remote, rest): (Vec<Waiter>, Vec<Waiter>) =
                    waiters.into_iter().partition(|w| match w {
                        Waiter::Slot(id, _) => nbytes > EAGER_FETCH && self.keeps_remote(*id),
                        Waiter::Fetch(_) => false,
                    });
                if !rest.is_empty() {
                    self.waiting.insert(key, rest);
                }
                for waiter in remote {
                    if let Waiter::Slot(id, slot) = waiter {
                        if let Some(value) = self.handle(id, key, &holders, None) {
                            self.report(id, slot, Ok(value));
                        }
                    }
                }
                if !self.waiting.contains_key(&key) {
                    return;
                }
                if let Some(f) = self.fetching.get_mut(&key) {
                    for h in holders {
                        if h != f.current && !f.others.contains(&h) {
                            f.others.push(h);
                        }
                    }
                    return;
                }
                self.start_fetch(key, holders);
            }
            ToClient::KeyErred { key, failure } => {
                self.fetching.remove(&key);
                self.answer(key, Err(Arc::new(Failure::from(&failure))));
            }
            ToClient::TaskEvents { events } => {
                if self.watching {
                    emit_events(&events);
                }
            }
            ToClient::Info { id, snapshot } => {
                if let Some(reply) = self.asks.remove(&id) {
                    let _ = reply.send(Ok(Answer::Info(Box::new(snapshot))));
                }
            }
            ToClient::Retired { id, error } => {
                if let Some(reply) = self.asks.remove(&id) {
                    let _ = reply.send(Ok(Answer::Retired(error)));
                }
            }
            ToClient::WhoHas { id, holders } => {
                if let Some(reply) = self.asks.remove(&id) {
                    let addresses = holders
                        .iter()
                        .map(|ids| {
                            ids.iter()
                                .filter_map(|id| self.workers.get(id).cloned())
                                .collect()
                        })
                        .collect();
                    let _ = reply.send(Ok(Answer::WhoHas(addresses)));
                }
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
                self.answer(f.key, Ok((bytes, f.from)));
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
                    self.peers.request(next, f.key);
                } else {
                    self.fetching.remove(&f.key);
                }
            }
        }
    }

    /// Reports `key`'s bytes (and the worker they came from) or failure to
    /// everyone waiting for it.
    fn answer(&mut self, key: WireKey, result: Result<(Arc<[u8]>, WorkerId), Arc<Failure>>) {
        let Some(waiters) = self.waiting.remove(&key) else {
            return;
        };
        let outcome: Outcome = match &result {
            Ok((bytes, _)) => Ok(Arc::new(Encoded::new(bytes.clone()))),
            Err(failure) => Err(failure.clone()),
        };
        for waiter in waiters {
            match waiter {
                Waiter::Slot(id, slot) => {
                    let outcome = match &result {
                        // A small kept-remote output: a handle with its bytes.
                        Ok((bytes, from)) if self.keeps_remote(id) => {
                            match self.handle(id, key, &[*from], Some(bytes)) {
                                Some(value) => Ok(value),
                                None => continue,
                            }
                        }
                        _ => outcome.clone(),
                    };
                    self.report(id, slot, outcome);
                }
                Waiter::Fetch(reply) => {
                    let bytes = result.as_ref().map(|(b, _)| b.clone());
                    let _ = reply.send(bytes.map_err(|f| f.to_string()));
                }
            }
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
        // Rule 2: once no open output of this submission has the key, the
        // scheduler need not keep it for it, unless a handle left the value
        // there (rule 5).
        let key = open.outputs[slot];
        let last_of_key = match open.shared_keys.as_mut().and_then(|c| c.get_mut(&key)) {
            Some(left) => {
                *left -= 1;
                *left == 0
            }
            None => true,
        };
        let release = last_of_key && !open.handles.get(&key).is_some_and(|h| h.holds);
        // The release is placed before the output is reported: whatever
        // the caller sends once it has the output comes after it (rule 7).
        if release {
            let mark = drop_hold(&self.link, &mut open.holds, slot, key);
            if self.connected {
                self.ended.push_back((mark, key));
            }
        }
        if open.unreported > 0 {
            open.reporter.output(slot, outcome);
        } else {
            self.complete(id, slot, outcome);
        }
    }

    /// Reports a submission's last output and finishes it (rule 2).
    fn complete(&mut self, id: u64, slot: usize, outcome: Outcome) {
        let Some(open) = self.open.remove(&id) else {
            return;
        };
        let Open {
            plan,
            reporter,
            handles,
            holds,
            ..
        } = open;
        // The plan goes before the last output is reported: a caller that
        // has every output then finds the plan's own references (futures
        // among its inputs) released.
        drop(plan);
        reporter.output(slot, outcome);
        drop(holds);
        // The reporter holds the handles it still wants.
        drop(handles);
        reporter.finished();
    }

    fn poll_cancelled(&mut self) {
        // Many open submissions (one per future, say) are polled on the tick
        // only, so a burst of messages does not cost O(messages × open).
        if self.open.len() > 64 && self.last_poll.elapsed() < CANCEL_POLL {
            return;
        }
        self.last_poll = Instant::now();
        // Rule 8 for parked submissions (rule 10): nothing of them is sent.
        for s in std::mem::take(&mut self.parked) {
            if !s.reporter.cancelled() {
                self.parked.push(s);
                continue;
            }
            let failures = (0..s.outputs.len())
                .map(|slot| s.plan.cancelled_output(slot))
                .collect();
            fail_each(s.plan, &*s.reporter, failures, &s.early);
        }
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
        let keys = open.outputs.clone();
        let failures: Vec<_> = (0..keys.len()).map(|s| plan.cancelled_output(s)).collect();
        for key in keys {
            if let Some(slots) = self.waiting.get_mut(&key) {
                slots.retain(|w| !matches!(w, Waiter::Slot(sid, _) if *sid == id));
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
    /// Connected again (rule 10): a new connection, a new epoch; what the
    /// old one held is gone; parked submissions go out.
    fn reconnected(&mut self, writer: Writer) {
        tracing::warn!(
            "client: connected again to the scheduler at {}",
            self.address
        );
        {
            let mut held = self.link.held();
            held.clear();
            self.link.epoch.fetch_add(1, Ordering::AcqRel);
            // Parked submissions go out on this connection: their holds
            // count here (rule 7), and each `Hold` takes its count back
            // from this table when dropped.
            for s in &self.parked {
                for h in s.holds.iter().flatten() {
                    hold(&mut held, h.key);
                }
            }
        }
        self.writer = writer;
        // The old pool goes with its answers, on a channel of its own: a
        // late `Lost` of it would pass for this epoch's fetch of the same
        // key from the same worker number, and the scheduler would drop
        // that worker's good copy.
        (self.peers, self.answers) = self.peers.renewed();
        self.out = Batch::default();
        self.connected = true;
        self.link.connected.store(true, Ordering::Release);
        self.backoff = FIRST_BACKOFF;
        self.workers.clear();
        if self.watching {
            self.out.push(&ToScheduler::Watch { on: true });
        }
        for s in std::mem::take(&mut self.parked) {
            self.submit(s);
        }
    }

    /// An attempt to connect again failed (rule 10): parked submissions
    /// fail, the next attempt is after the backoff.
    fn reconnect_failed(&mut self, e: &ConnectError) {
        let message = match e {
            // A scheduler that came back with another token, or without
            // authentication: time alone will not fix it, so say so.
            ConnectError::Handshake(crate::protocol::ProtocolError::Auth(reason)) => format!(
                "not connected to the scheduler at {}: it refused this client ({reason}); \
                 a restarted scheduler may hold another token — trying again, but this client \
                 keeps the token it started with",
                self.address
            ),
            _ => format!(
                "not connected to the scheduler at {} (it cannot be reached: {e}; trying again)",
                self.address
            ),
        };
        self.fail_parked(&message);
        self.next_attempt = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Fails every parked submission with `message` (rules 4 and 10).
    fn fail_parked(&mut self, message: &str) {
        for s in std::mem::take(&mut self.parked) {
            let failures = s
                .plan
                .outputs()
                .iter()
                .map(|&t| Arc::new(s.plan.failed(t, message.to_owned())))
                .collect();
            fail_each(s.plan, &*s.reporter, failures, &s.early);
        }
    }

    fn disconnected(&mut self) {
        self.connected = false;
        self.link.connected.store(false, Ordering::Release);
        if self.target.is_some() {
            if self.ends_with_scheduler {
                // This process's worker ends with its scheduler (`nested`
                // rule 5): the cluster ended, nothing to warn of.
                tracing::debug!(
                    "client: lost the connection to the scheduler at {}, which this worker \
                     ends with; connecting again",
                    self.address
                );
            } else {
                tracing::warn!(
                    "client: lost the connection to the scheduler at {}; connecting again",
                    self.address
                );
            }
            self.next_attempt = Some(Instant::now());
        }
        let gone = format!("lost the connection to the scheduler at {}", self.address);
        for (_, reply) in self.asks.drain() {
            let _ = reply.send(Err(gone.clone()));
        }
        for (_, waiters) in self.waiting.drain() {
            for waiter in waiters {
                if let Waiter::Fetch(reply) = waiter {
                    let _ = reply.send(Err(gone.clone()));
                }
            }
        }
        self.fetching.clear();
        self.holders.clear();
        self.releases.clear();
        self.ended.clear();
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

    /// Queues the release of keys in `ended` (rule 7) and sends what is
    /// queued.
    fn release_ended(&mut self, ended: Vec<(u64, WireKey)>) {
        if self.connected && !ended.is_empty() {
            let keys = ended.into_iter().map(|(_, key)| key).collect();
            self.out.push(&ToScheduler::ReleaseKeys { keys });
        }
        self.flush_out();
    }

    fn flush(&mut self) {
        let ended = std::mem::take(&mut self.ended).into();
        self.release_ended(ended);
        self.peers.flush();
    }

    /// Sends the queued messages to the scheduler.
    fn flush_out(&mut self) {
        if !self.releases.is_empty() {
            let keys = std::mem::take(&mut self.releases);
            self.out.push(&ToScheduler::ReleaseKeys { keys });
        }
        if !self.out.is_empty() {
            if self.connected {
                // A refusal is the connection failing: `run` sees it go.
                let _ = net::send_batch(&self.writer, &mut self.out);
                self.last_sent = Instant::now();
            } else {
                self.out.take_frames();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::{Op, OpError, PlanBuilder};

    #[derive(Default)]
    struct Rec {
        outs: Mutex<Vec<(usize, String)>>,
        finished: AtomicBool,
    }

    impl Reporter for Rec {
        fn output(&self, index: usize, outcome: Outcome) {
            let what = match outcome {
                Ok(_) => "value".to_owned(),
                Err(f) => format!("{:?}", f.kind),
            };
            // A failed assertion must not make the loop's drop panic too.
            let mut outs = self.outs.lock().unwrap_or_else(PoisonError::into_inner);
            outs.push((index, what));
        }

        fn finished(&self) {
            self.finished.store(true, Ordering::Relaxed);
        }
    }

    impl Rec {
        fn outs(&self) -> Vec<(usize, String)> {
            self.outs.lock().unwrap().clone()
        }
    }

    struct Const;

    impl Op for Const {
        fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
            Ok(Arc::new(1i64))
        }

        fn name(&self) -> &str {
            "const"
        }
    }

    /// A loop of a TCP client, with what its commands come on and what the
    /// data ports of its first epoch answer on, as `Client::start` makes
    /// them.
    fn a_loop() -> (
        Loop,
        mpsc::UnboundedSender<Sequenced>,
        mpsc::UnboundedSender<Fetched>,
    ) {
        let (tx, _rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link::new("tcp://127.0.0.1:1".into(), tx.downgrade()));
        let (wtx, _wrx) = mpsc::unbounded_channel();
        let target = Target {
            scheme: Scheme::Tcp,
            address: "127.0.0.1:1".into(),
        };
        let (answer, answers) = mpsc::unbounded_channel();
        let peers = PeerPool::new(
            answer.clone(),
            BuildId::NONE,
            Arc::new(Auth::Insecure),
            None,
            net::Limits::standard(),
        );
        let lp = Loop::new(
            link,
            net::Writer::local(wtx),
            Some(target),
            (peers, answers),
        );
        (lp, tx, answer)
    }

    /// The messages sent on the scheduler connection whose frames are read
    /// from `frames`.
    fn sent(frames: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<ToScheduler> {
        let mut sent = Vec::new();
        while let Ok(frame) = frames.try_recv() {
            sent.extend(decode_checked::<ToScheduler>(&frame[4..]).unwrap());
        }
        sent
    }

    /// A submission of one task per key in `keys`, each an output, as
    /// `submit` lowers it.
    fn submission(id: u64, keys: &[u8], reporter: Arc<Rec>) -> Submission {
        let mut b = PlanBuilder::new();
        for &k in keys {
            let t = b.push(Key([k; 32]), Arc::new(Const), &[]);
            b.output(t);
        }
        let outputs: Vec<WireKey> = keys.iter().map(|&k| [k; 32]).collect();
        let mut batch = Batch::default();
        batch.push(&ToScheduler::UpdateGraph {
            tasks: Vec::new(),
            wanted: outputs.clone(),
        });
        Submission {
            id,
            repeats: false,
            early: Vec::new(),
            plan: Arc::new(b.build()),
            reporter,
            frames: batch.take_frames(),
            outputs,
            keep_remote: false,
            holds: Vec::new(),
        }
    }

    /// Rules 8 and 10: an output stopped while its submission is parked
    /// (disconnected, an attempt to connect in flight) is reported
    /// cancelled at once and not asked for once connected; a submission
    /// with every output stopped is never sent. Before, the stop was
    /// dropped: the whole graph went out, and the stopped output was
    /// computed and reported as a value.
    #[test]
    fn a_parked_submission_stopped_before_reconnect() {
        let rt = net::runtime().unwrap();
        let _g = rt.enter();
        let (mut lp, _tx, _) = a_loop();
        lp.disconnected(); // connection lost; an attempt is due
        lp.next_attempt = None; // ... and now in flight
        let two = Arc::new(Rec::default());
        let one = Arc::new(Rec::default());
        lp.submit(submission(0, &[1, 2], two.clone()));
        lp.submit(submission(1, &[3], one.clone()));
        assert_eq!(lp.parked.len(), 2);
        // The callers stop output 0 of each (its future was dropped).
        lp.command(0, Command::Stop { id: 0, slot: 0 });
        lp.command(1, Command::Stop { id: 1, slot: 0 });
        let cancelled = vec![(0, "Cancelled".to_owned())];
        assert_eq!(two.outs(), cancelled, "reported at once");
        assert_eq!(one.outs(), cancelled, "reported at once");
        assert!(one.finished.load(Ordering::Relaxed));
        // The attempt succeeds.
        let (wtx, mut wrx) = mpsc::unbounded_channel();
        lp.reconnected(net::Writer::local(wtx));
        let wanted: Vec<WireKey> = sent(&mut wrx)
            .into_iter()
            .flat_map(|m| match m {
                ToScheduler::UpdateGraph { wanted, .. } => wanted,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            wanted,
            vec![[2; 32]],
            "only the output not stopped is asked for"
        );
        assert!(
            !lp.open.contains_key(&1),
            "a submission with nothing left is dropped"
        );
        // Were key 1 computed all the same, nothing more is reported.
        for key in [1, 2] {
            lp.message(ToClient::KeyInMemory {
                key: [key; 32],
                holders: vec![WorkerId(0)],
                nbytes: 2,
                value: Some(Arc::from(&[2u8, 0][..])),
            });
        }
        assert_eq!(
            two.outs(),
            vec![(0, "Cancelled".to_owned()), (1, "value".to_owned())]
        );
        assert!(two.finished.load(Ordering::Relaxed));
        assert_eq!(one.outs(), cancelled);
    }

    /// Net rule 8 on the client's scheduler connection, as a reviewer
    /// found it: the client decoded its scheduler's frames outside its
    /// frame budget. A frame of 8 000 `WorkerLeft`s, 16 KB sent (a small
    /// frame: no grant), decodes to far more than a budget of 1 MiB, within
    /// what protocol rule 5 lets a frame of that length take: an
    /// authenticated scheduler, buggy or hostile, could make a client
    /// allocate many times its budget. Now every frame holds what its
    /// messages take decoded until the loop handled them, and one that
    /// takes more than the whole budget closes the connection (its
    /// outputs fail as lost, rule 10), so the value sent after it is never
    /// read. Before, the loop handled the frame, then reported the value.
    #[test]
    fn a_scheduler_frame_that_decodes_past_the_budget_closes_the_connection() {
        use tokio::io::AsyncWriteExt;
        const BUDGET: usize = 1 << 20;
        let one = crate::protocol::frame(&ToClient::WorkerLeft { id: WorkerId(9) });
        let body = one[4..].repeat(8_000);
        let mut flood = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
        flood.extend(body);
        // What the old code read: within rule 5, past the budget.
        let (_, decoded) =
            crate::protocol::decode_sized::<ToClient>(&flood[4..], usize::MAX).unwrap();
        assert!(flood.len() < net::SMALL_FRAME && decoded > BUDGET);
        let value = crate::protocol::frame(&ToClient::KeyInMemory {
            key: [1; 32],
            holders: vec![WorkerId(0)],
            nbytes: 2,
            value: Some(Arc::from(&[2u8, 0][..])),
        });
        let rt = net::runtime().unwrap();
        let outs = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let (dialed, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
            let mut scheduler = accepted.unwrap().0;
            let (read, _write) = dialed.unwrap().into_split();
            let limits = net::Limits::new(BUDGET, Duration::from_secs(30));
            let frames = net::Frames::stream(net::FrameReader::new(
                tokio::io::BufReader::new(net::ReadHalf::Plain(read)),
                limits.clone(),
            ));
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let link = Arc::new(Link::new(format!("tcp://{address}"), commands.downgrade()));
            let (wtx, _wrx) = mpsc::unbounded_channel();
            let (answer, answers) = mpsc::unbounded_channel();
            let auth = Arc::new(Auth::Insecure);
            let peers = PeerPool::new(answer, BuildId::NONE, auth.clone(), None, limits.clone());
            let lp = Loop::new(link, net::Writer::local(wtx), None, (peers, answers));
            let rec = Arc::new(Rec::default());
            let submit = Command::Submit(Box::new(submission(0, &[1], rec.clone())));
            commands.send((0, submit)).unwrap();
            let running =
                tokio::spawn(lp.run(frames, commands_rx, BuildId::NONE, auth, None, limits));
            scheduler.write_all(&[flood, value].concat()).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !rec.finished.load(Ordering::Acquire) {
                assert!(Instant::now() < deadline, "the output was never reported");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(commands);
            running.await.unwrap();
            rec.outs()
        });
        assert_eq!(
            outs,
            vec![(0, "Failed".to_owned())],
            "the frame was handled and the value after it read"
        );
    }

    /// Rule 10: a late answer of the old connection's data ports is never
    /// taken for the new epoch's fetch of the same key from the same worker
    /// number. Before, both epochs' pools answered on one channel: the old
    /// `Lost` failed the new fetch, and the client told the scheduler that
    /// the worker had lost the key (`FetchFailed`), so the scheduler
    /// dropped that worker's good copy and computed the key again.
    #[test]
    fn a_late_answer_of_the_old_connection_fails_no_fetch_of_the_new() {
        let rt = net::runtime().unwrap();
        let _g = rt.enter();
        let (mut lp, _tx, old_port) = a_loop();
        let key = [1; 32];
        let worker = WorkerId(0);
        // Too big to come with the answer: fetched from worker 0.
        let in_memory = || ToClient::KeyInMemory {
            key,
            holders: vec![worker],
            nbytes: 2,
            value: None,
        };
        let first = Arc::new(Rec::default());
        lp.submit(submission(0, &[1], first.clone()));
        lp.message(in_memory());
        assert_eq!(lp.fetching.get(&key).map(|f| f.current), Some(worker));
        // The connection is lost with that fetch in flight, and made again.
        lp.disconnected();
        assert_eq!(first.outs(), vec![(0, "Failed".to_owned())]);
        lp.next_attempt = None;
        let (wtx, mut wrx) = mpsc::unbounded_channel();
        lp.reconnected(net::Writer::local(wtx));
        // The new epoch fetches the same key from the same worker number.
        let second = Arc::new(Rec::default());
        lp.submit(submission(1, &[1], second.clone()));
        lp.message(in_memory());
        assert_eq!(lp.fetching.get(&key).map(|f| f.current), Some(worker));
        // The old data port's connection fails now, and says so late (its
        // channel may be gone: then nothing arrives at all).
        let _ = old_port.send(Fetched {
            from: worker,
            key,
            result: FetchResult::Lost,
            _grant: None,
        });
        // What `run` does with the answers that came, then its flush.
        while let Ok(f) = lp.answers.try_recv() {
            lp.fetched(f);
        }
        lp.flush_out();
        let failed: Vec<ToScheduler> = sent(&mut wrx)
            .into_iter()
            .filter(|m| matches!(m, ToScheduler::FetchFailed { .. }))
            .collect();
        assert!(
            failed.is_empty(),
            "the scheduler was told of a lost copy: {failed:?}"
        );
        assert_eq!(
            lp.fetching.get(&key).map(|f| f.current),
            Some(worker),
            "the new fetch waits for its own answer"
        );
        assert!(second.outs().is_empty(), "{:?}", second.outs());
    }
}
