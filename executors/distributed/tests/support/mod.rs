//! A test registry, plan builders and a reporter that waits with timeouts.
#![allow(dead_code, unreachable_pub)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rask_distributed::protocol::{self, Handshake, Role};
use rask_distributed::scheduler::{self, SchedulerHandle};
use rask_distributed::{worker, Auth, BuildId, Client, Token, WorkerHandle};
use rask_executor::{
    Encoded, Executor, Failure, Key, Op, OpError, Outcome, Plan, PlanBuilder, Registry, Remote,
    Reporter, Value, WireError, WireTask, REMOTE_FUNCTION, VALUE_FUNCTION,
};

/// Every wait in these tests gives up after this long.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// A user's number whose `Drop` panics (the `boom` op makes them): a
/// worker must drop it quietly, wherever it lets it go. It encodes as its
/// `i64`, so clients read it as one.
pub struct Boom(pub i64);

impl Drop for Boom {
    fn drop(&mut self) {
        panic!("a Boom of {} was dropped", self.0);
    }
}

impl serde::Serialize for Boom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// An `i64` from a value computed here (typed, or a [`Boom`]) or fetched
/// (encoded).
pub fn int(v: &Value) -> i64 {
    if let Some(x) = v.downcast_ref::<i64>() {
        *x
    } else if let Some(b) = v.downcast_ref::<Boom>() {
        b.0
    } else if let Some(e) = v.downcast_ref::<Encoded>() {
        postcard::from_bytes(&e.0).expect("an encoded i64")
    } else {
        panic!("not an i64: {v:?}")
    }
}

/// The length of a `Vec<u8>` computed here (typed) or fetched (encoded).
pub fn bytes_len(v: &Value) -> usize {
    if let Some(x) = v.downcast_ref::<Vec<u8>>() {
        x.len()
    } else if let Some(e) = v.downcast_ref::<Encoded>() {
        postcard::from_bytes::<Vec<u8>>(&e.0)
            .expect("encoded bytes")
            .len()
    } else {
        panic!("not bytes: {v:?}")
    }
}

/// The period of a chunk's bytes.
pub const BLOCK: u64 = 4096;

/// The bytes of chunk `i` of `n` bytes (the `chunk` op): a block of
/// [`BLOCK`] bytes that differ, repeated, so chunks differ from each other
/// and are cheap to make in a debug build.
pub fn chunk(i: u64, n: u64) -> Vec<u8> {
    let block: Vec<u8> = (0..BLOCK)
        .map(|j| ((i * 131 + j * 7) % 251) as u8)
        .collect();
    let mut out = Vec::with_capacity(n as usize);
    while (out.len() as u64) < n {
        let take = (n - out.len() as u64).min(BLOCK) as usize;
        out.extend_from_slice(&block[..take]);
    }
    out
}

/// The wrapping sum of `bytes` read as little-endian `u64` words (the last
/// one padded with zeros): what `bytesum` computes, 8 bytes a step.
pub fn word_sum(bytes: &[u8]) -> i64 {
    bytes
        .chunks(8)
        .map(|c| {
            let mut word = [0u8; 8];
            word[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(word)
        })
        .fold(0u64, u64::wrapping_add) as i64
}

/// Bytes that encode as one run (postcard: a length, then the bytes), the
/// same encoding as a `Vec<u8>` but in one copy, not a call per byte.
pub struct Bytes(pub Vec<u8>);

impl serde::Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

/// The bytes of a [`Bytes`] computed here (typed) or fetched (encoded).
pub fn byte_slice(v: &Value) -> &[u8] {
    if let Some(x) = v.downcast_ref::<Bytes>() {
        &x.0
    } else if let Some(e) = v.downcast_ref::<Encoded>() {
        postcard::from_bytes::<&[u8]>(&e.0).expect("encoded bytes")
    } else {
        panic!("not bytes: {v:?}")
    }
}

/// Shared by every op of a registry: run counts and the gate.
#[derive(Default)]
pub struct Shared {
    /// Runs of `count` ops.
    pub runs: AtomicUsize,
    /// Tokens that let `gate` ops finish.
    gate: Mutex<Option<Receiver<()>>>,
    gate_tx: Mutex<Option<Sender<()>>>,
    /// Told each time a `gate` op starts.
    started: Mutex<Option<Sender<()>>>,
    /// Tokens that let `hang` ops return; dropped, it lets every one return.
    hang: Mutex<Option<Receiver<()>>>,
    hang_tx: Mutex<Option<Sender<()>>>,
    /// `hang` ops running now.
    pub hanging: AtomicUsize,
    /// `where` calls hanging (payload -2) on a worker's network thread now.
    pub hanging_on_network: AtomicUsize,
}

impl Shared {
    pub fn new() -> (Arc<Shared>, Receiver<()>) {
        let (tx, rx) = channel();
        let (started_tx, started_rx) = channel();
        let (hang_tx, hang_rx) = channel();
        let shared = Shared {
            gate: Mutex::new(Some(rx)),
            gate_tx: Mutex::new(Some(tx)),
            started: Mutex::new(Some(started_tx)),
            hang: Mutex::new(Some(hang_rx)),
            hang_tx: Mutex::new(Some(hang_tx)),
            ..Default::default()
        };
        (Arc::new(shared), started_rx)
    }

    /// Lets every `hang` op return, now and from now on.
    pub fn end_hangs(&self) {
        *self.hang_tx.lock().unwrap() = None;
    }

    /// Lets one `hang` op return (the first to take the token).
    pub fn end_one_hang(&self) {
        if let Some(tx) = &*self.hang_tx.lock().unwrap() {
            let _ = tx.send(());
        }
    }

    /// Waits, ignoring cancellation, until [`Shared::end_hangs`] (or four
    /// times `TIMEOUT`: longer than any wait of a test).
    fn hang(&self) {
        self.hanging.fetch_add(1, Ordering::SeqCst);
        if let Some(rx) = &*self.hang.lock().unwrap() {
            let _ = rx.recv_timeout(4 * TIMEOUT);
        }
        self.hanging.fetch_sub(1, Ordering::SeqCst);
    }

    /// Lets `n` gate ops finish.
    pub fn open_gate(&self, n: usize) {
        if let Some(tx) = &*self.gate_tx.lock().unwrap() {
            for _ in 0..n {
                let _ = tx.send(());
            }
        }
    }
}

/// Test ops: `rask.value` (payload = value bytes), `inc`, `add` (sum of the
/// inputs plus the payload's i64), `count` (like add, counting runs),
/// `sleep_inc` (sleeps payload µs, then inc), `gate` (waits for a token,
/// then add), `fail`, `panic`, `big` (payload n: `vec![7u8; n]`, counting
/// runs), `len` (the input's length plus the payload's i64), `chunk`
/// (payload `(i, n)`: [`chunk`]`(i, n)` as [`Bytes`], counting runs),
/// `bytesum` (the [`word_sum`]s of its byte inputs plus the payload's i64,
/// wrapping), `boom` (like add, as a [`Boom`]), `rask.remote`
/// (fails: it runs only when the key it names is not held), `where` and
/// `where_slow` (payload n: panics if n = -1, hangs like `hang` if n = -2,
/// else sleeps n µs; then 1 if it ran on an in-process worker's network
/// thread, else 0), `hang` (ignores cancellation and waits for
/// `Shared::end_hangs`, then add). Anything else is unregistered.
pub struct TestOp {
    pub function: String,
    pub payload: Vec<u8>,
    pub shared: Arc<Shared>,
}

impl Op for TestOp {
    fn run(&self, inputs: &mut [Option<Value>]) -> Result<Value, OpError> {
        let sum = || -> i64 {
            let c: i64 = postcard::from_bytes(&self.payload).unwrap_or(0);
            c + inputs.iter().map(|v| int(v.as_ref().unwrap())).sum::<i64>()
        };
        match self.function.as_str() {
            "rask.value" => Ok(Arc::new(Encoded::new(self.payload.clone().into()))),
            "inc" => Ok(Arc::new(int(inputs[0].as_ref().unwrap()) + 1)),
            "add" => Ok(Arc::new(sum())),
            "sleep_add" => {
                std::thread::sleep(Duration::from_micros(200));
                Ok(Arc::new(sum()))
            }
            "count" => {
                self.shared.runs.fetch_add(1, Ordering::SeqCst);
                Ok(Arc::new(sum()))
            }
            "sleep_inc" => {
                let micros: u64 = postcard::from_bytes(&self.payload).unwrap_or(0);
                std::thread::sleep(Duration::from_micros(micros));
                Ok(Arc::new(int(inputs[0].as_ref().unwrap()) + 1))
            }
            "gate" => {
                if let Some(s) = &*self.shared.started.lock().unwrap() {
                    let _ = s.send(());
                }
                let gate = self.shared.gate.lock().unwrap();
                match gate.as_ref().map(|g| g.recv_timeout(TIMEOUT)) {
                    Some(Ok(())) => Ok(Arc::new(sum())),
                    _ => Err(OpError::failed("the gate never opened")),
                }
            }
            "big" => {
                self.shared.runs.fetch_add(1, Ordering::SeqCst);
                let n: u64 = postcard::from_bytes(&self.payload).unwrap_or(0);
                Ok(Arc::new(vec![7u8; n as usize]))
            }
            "chunk" => {
                self.shared.runs.fetch_add(1, Ordering::SeqCst);
                let (i, n): (u64, u64) = postcard::from_bytes(&self.payload).unwrap_or((0, 0));
                Ok(Arc::new(Bytes(chunk(i, n))))
            }
            "bytesum" => {
                let c: i64 = postcard::from_bytes(&self.payload).unwrap_or(0);
                let sum = inputs
                    .iter()
                    .map(|v| word_sum(byte_slice(v.as_ref().unwrap())))
                    .fold(c, i64::wrapping_add);
                Ok(Arc::new(sum))
            }
            "len" => {
                let c: i64 = postcard::from_bytes(&self.payload).unwrap_or(0);
                Ok(Arc::new(bytes_len(inputs[0].as_ref().unwrap()) as i64 + c))
            }
            "hang" => {
                self.shared.hang();
                Ok(Arc::new(sum()))
            }
            "boom" => Ok(Arc::new(Boom(sum()))),
            "fail" => Err(OpError::failed("nope")),
            REMOTE_FUNCTION => Err(OpError::failed("the cluster no longer holds the value")),
            "panic" => panic!("kaboom"),
            "where" | "where_slow" => {
                // `worker::spawn` names the network thread; compute
                // threads are `rask-worker-N`.
                let network = std::thread::current().name() == Some("rask-worker");
                let micros: i64 = postcard::from_bytes(&self.payload).unwrap_or(0);
                match micros {
                    -2 if network => {
                        let here = &self.shared.hanging_on_network;
                        here.fetch_add(1, Ordering::SeqCst);
                        self.shared.hang();
                        here.fetch_sub(1, Ordering::SeqCst);
                    }
                    -2 => self.shared.hang(),
                    ..0 => panic!("kaboom"),
                    _ => std::thread::sleep(Duration::from_micros(micros as u64)),
                }
                Ok(Arc::new(i64::from(network)))
            }
            other => Err(OpError::failed(format!("cannot run {other}"))),
        }
    }

    fn name(&self) -> &str {
        &self.function
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        if self.function == "local_only" {
            return Err(WireError::NotSerializable {
                what: "task `local_only`".into(),
            });
        }
        Ok(WireTask {
            function: self.function.clone(),
            payload: self.payload.clone(),
        })
    }
}

pub struct TestRegistry {
    pub shared: Arc<Shared>,
}

impl Registry for TestRegistry {
    fn resolve(&self, task: &WireTask) -> Result<Arc<dyn Op>, WireError> {
        match task.function.as_str() {
            "rask.value" | "inc" | "add" | "sleep_add" | "count" | "sleep_inc" | "gate"
            | "fail" | "panic" | "big" | "len" | "where" | "where_slow" | "hang" | "chunk"
            | "bytesum" | "boom" | REMOTE_FUNCTION => Ok(Arc::new(TestOp {
                function: task.function.clone(),
                payload: task.payload.clone(),
                shared: self.shared.clone(),
            })),
            f => Err(WireError::Unregistered {
                function: f.to_owned(),
            }),
        }
    }
}

/// Builds plans whose keys are hashes of (function, payload, input keys).
pub struct Graph {
    b: PlanBuilder,
    keys: Vec<Key>,
    shared: Arc<Shared>,
    salt: u64,
    /// Each task's own timeout, over the scheduler's default.
    timeout: Option<Duration>,
}

impl Graph {
    pub fn new(shared: &Arc<Shared>) -> Graph {
        Graph::salted(shared, 0)
    }

    /// A salt makes keys differ from other tests' on a shared cluster.
    pub fn salted(shared: &Arc<Shared>, salt: u64) -> Graph {
        Graph {
            b: PlanBuilder::new(),
            keys: Vec::new(),
            shared: shared.clone(),
            salt,
            timeout: None,
        }
    }

    /// Tasks added from now on carry `timeout` as their own, over any
    /// default of the scheduler's.
    pub fn timed(mut self, timeout: Duration) -> Graph {
        self.timeout = Some(timeout);
        self
    }

    pub fn task(&mut self, function: &str, payload: Vec<u8>, deps: &[u32]) -> u32 {
        let mut key = [0u8; 32];
        for (i, chunk) in key.chunks_mut(8).enumerate() {
            let mut h = DefaultHasher::new();
            (i, self.salt, function, &payload).hash(&mut h);
            for &d in deps {
                self.keys[d as usize].0.hash(&mut h);
            }
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        let op = Arc::new(TestOp {
            function: function.to_owned(),
            payload,
            shared: self.shared.clone(),
        });
        let op = rask_executor::with_limits(op, self.timeout, 0);
        self.keys.push(Key(key));
        self.b.push(Key(key), op, deps)
    }

    pub fn value(&mut self, v: i64) -> u32 {
        self.task("rask.value", postcard::to_stdvec(&v).unwrap(), &[])
    }

    pub fn op(&mut self, function: &str, constant: i64, deps: &[u32]) -> u32 {
        self.task(function, postcard::to_stdvec(&constant).unwrap(), deps)
    }

    /// A task standing for a value this process holds, as the `rask` crate
    /// builds them: a [`Remote`] travels as a reference to its key.
    pub fn held(&mut self, value: Value) -> u32 {
        let key = match value.downcast_ref::<Remote>() {
            Some(remote) => remote.key(),
            None => return self.task("rask.value", value.encode().unwrap(), &[]),
        };
        self.keys.push(key);
        self.b.push(key, Arc::new(HeldOp(value)), &[])
    }

    pub fn key(&self, t: u32) -> Key {
        self.keys[t as usize]
    }

    pub fn output(&mut self, t: u32) -> usize {
        self.b.output(t)
    }

    pub fn build(self) -> Arc<Plan> {
        Arc::new(self.b.build())
    }
}

/// A held value inside a plan, like the `rask` crate's.
pub struct HeldOp(pub Value);

impl Op for HeldOp {
    fn run(&self, _: &mut [Option<Value>]) -> Result<Value, OpError> {
        Ok(self.0.clone())
    }

    fn name(&self) -> &str {
        "held"
    }

    fn to_wire(&self) -> Result<WireTask, WireError> {
        Ok(match self.0.downcast_ref::<Remote>() {
            Some(remote) => WireTask {
                function: REMOTE_FUNCTION.to_owned(),
                payload: remote.key().0.to_vec(),
            },
            None => WireTask {
                function: VALUE_FUNCTION.to_owned(),
                payload: self.0.encode()?,
            },
        })
    }
}

/// Keeps the outcomes as reported (values, not numbers), and asks for
/// remote handles when `remote`.
pub struct Keep {
    outs: Mutex<Vec<Option<Outcome>>>,
    remote: bool,
    done: Mutex<Option<Sender<()>>>,
    done_rx: Mutex<Receiver<()>>,
}

impl Keep {
    pub fn new(n: usize, remote: bool) -> Arc<Keep> {
        let (tx, rx) = channel();
        Arc::new(Keep {
            outs: Mutex::new(vec![None; n]),
            remote,
            done: Mutex::new(Some(tx)),
            done_rx: Mutex::new(rx),
        })
    }

    pub fn submit(self: &Arc<Self>, client: &Client, plan: Arc<Plan>) {
        client.submit(plan, self.clone());
    }

    /// Waits for `finished` and takes the outcomes out.
    pub fn wait(&self) -> Vec<Outcome> {
        self.done_rx
            .lock()
            .unwrap()
            .recv_timeout(TIMEOUT)
            .expect("finished in time");
        std::mem::take(&mut *self.outs.lock().unwrap())
            .into_iter()
            .map(|o| o.expect("every output reported"))
            .collect()
    }
}

impl Reporter for Keep {
    fn output(&self, index: usize, outcome: Outcome) {
        self.outs.lock().unwrap()[index] = Some(outcome);
    }

    fn keep_remote(&self) -> bool {
        self.remote
    }

    fn finished(&self) {
        if let Some(tx) = self.done.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}

/// The handle behind a value reported by a keep-remote submission.
pub fn remote(v: &Value) -> &Remote {
    v.downcast_ref::<Remote>()
        .unwrap_or_else(|| panic!("not a remote handle: {v:?}"))
}

/// An `i64` fetched through a remote handle.
pub fn fetch_int(v: &Value) -> i64 {
    postcard::from_bytes(&remote(v).fetch().expect("fetch")).expect("an encoded i64")
}

/// The length of a `Vec<u8>` fetched through a remote handle.
pub fn fetch_len(v: &Value) -> usize {
    postcard::from_bytes::<Vec<u8>>(&remote(v).fetch().expect("fetch"))
        .expect("encoded bytes")
        .len()
}

/// Collects outputs; `wait` returns them once `finished` was called.
pub struct Collect {
    outs: Mutex<Vec<Option<Result<i64, Failure>>>>,
    extra: AtomicUsize,
    pub cancel: AtomicBool,
    progress: Mutex<Option<Sender<usize>>>,
    done: Mutex<Option<Sender<()>>>,
    done_rx: Mutex<Receiver<()>>,
    plan_dropped: Mutex<Option<std::sync::Weak<Plan>>>,
}

impl Collect {
    pub fn new(n: usize) -> Arc<Collect> {
        let (tx, rx) = channel();
        Arc::new(Collect {
            outs: Mutex::new(vec![None; n]),
            extra: AtomicUsize::new(0),
            cancel: AtomicBool::new(false),
            progress: Mutex::new(None),
            done: Mutex::new(Some(tx)),
            done_rx: Mutex::new(rx),
            plan_dropped: Mutex::new(None),
        })
    }

    /// A channel told the slot of every output as it arrives.
    pub fn progress(&self) -> Receiver<usize> {
        let (tx, rx) = channel();
        *self.progress.lock().unwrap() = Some(tx);
        rx
    }

    /// Submits `plan` to `client`, checking at `finished` that the plan was
    /// dropped (rule 4).
    pub fn submit(self: &Arc<Self>, client: &Client, plan: Arc<Plan>) {
        *self.plan_dropped.lock().unwrap() = Some(Arc::downgrade(&plan));
        client.submit(plan, self.clone());
    }

    /// Waits for `finished`; panics after `TIMEOUT`.
    #[allow(clippy::result_large_err)] // a test's results, compared whole
    pub fn wait(&self) -> Vec<Result<i64, Failure>> {
        match self.done_rx.lock().unwrap().recv_timeout(TIMEOUT) {
            Ok(()) => {}
            Err(RecvTimeoutError::Timeout) => {
                // Counted outside the panic: a poisoned lock would make the
                // client's late reports panic too, and abort the tests.
                let (missing, all) = {
                    let outs = self.outs.lock().unwrap();
                    (outs.iter().filter(|o| o.is_none()).count(), outs.len())
                };
                panic!("timed out: {missing} of {all} outputs missing")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("finished twice?"),
        }
        assert_eq!(
            self.extra.load(Ordering::SeqCst),
            0,
            "an output was reported twice"
        );
        self.outs
            .lock()
            .unwrap()
            .iter()
            .map(|o| {
                o.clone()
                    .expect("finished before every output was reported")
            })
            .collect()
    }
}

impl Reporter for Collect {
    fn output(&self, index: usize, outcome: Outcome) {
        let v = outcome.map(|v| int(&v)).map_err(|f| (*f).clone());
        let mut outs = self.outs.lock().unwrap();
        if outs[index].is_some() {
            self.extra.fetch_add(1, Ordering::SeqCst);
        }
        outs[index] = Some(v);
        drop(outs);
        if let Some(p) = &*self.progress.lock().unwrap() {
            let _ = p.send(index);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn finished(&self) {
        if let Some(weak) = &*self.plan_dropped.lock().unwrap() {
            assert_eq!(
                weak.strong_count(),
                0,
                "the plan is still held at `finished`"
            );
        }
        if let Some(tx) = self.done.lock().unwrap().take() {
            let _ = tx.send(());
        } else {
            self.extra.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A scheduler and in-process workers sharing one registry, and the
/// scheduler's credentials, which its workers and clients prove.
pub struct Cluster {
    pub workers: Vec<Option<WorkerHandle>>,
    pub shared: Arc<Shared>,
    pub started: Receiver<()>,
    pub scheduler: SchedulerHandle,
    pub address: String,
    pub auth: Auth,
}

impl Cluster {
    pub fn new(workers: usize, threads: usize) -> Cluster {
        Cluster::with_options(workers, threads, scheduler::Options::default())
    }

    /// A cluster whose scheduler runs with `options`; with no
    /// `options.auth`, with the fresh token the scheduler makes.
    pub fn with_options(workers: usize, threads: usize, options: scheduler::Options) -> Cluster {
        let scheduler = scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap();
        let address = format!("tcp://{}", scheduler.address());
        let auth = match scheduler.token() {
            Some(token) => Auth::Token(token.clone()),
            None => Auth::Insecure,
        };
        let (shared, started) = Shared::new();
        let mut cluster = Cluster {
            workers: Vec::new(),
            shared,
            started,
            scheduler,
            address,
            auth,
        };
        for _ in 0..workers {
            cluster.add_worker(threads);
        }
        cluster
    }

    /// The cluster's token (panics for an insecure cluster).
    pub fn token(&self) -> &Token {
        self.auth.token().expect("an authenticated cluster")
    }

    /// Scheduler options with this cluster's credentials, to start its
    /// scheduler again.
    pub fn options(&self) -> scheduler::Options {
        scheduler::Options::default().auth(self.auth.clone())
    }

    /// Starts one more worker; returns once it registered.
    pub fn add_worker(&mut self, threads: usize) {
        self.add_worker_with(worker::Options::default().threads(threads));
    }

    /// Starts one more worker with `options`, proving the cluster's
    /// credentials unless they say otherwise; returns once it registered.
    pub fn add_worker_with(&mut self, mut options: worker::Options) {
        if options.auth.is_none() {
            options = options.auth(self.auth.clone());
        }
        let worker = worker::spawn_with(&self.address, self.registry(), options).unwrap();
        self.workers.push(Some(worker));
    }

    /// The registry of this cluster's workers.
    pub fn registry(&self) -> Arc<TestRegistry> {
        Arc::new(TestRegistry {
            shared: self.shared.clone(),
        })
    }

    pub fn client(&self) -> Client {
        Client::connect_with(&self.address, self.auth.clone()).unwrap()
    }

    /// A client in this process that reaches the scheduler through memory.
    pub fn memory_client(&self) -> Client {
        rask_distributed::in_process_client(&self.scheduler).unwrap()
    }

    /// Waits until a gate op started.
    pub fn wait_started(&self) {
        self.started
            .recv_timeout(TIMEOUT)
            .expect("a gate op should have started");
    }

    /// Polls `cond` until it holds, up to `TIMEOUT`.
    pub fn eventually(&self, what: &str, cond: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Unblock any gate or hang op still waiting so its thread ends.
        self.shared.open_gate(64);
        *self.shared.gate_tx.lock().unwrap() = None;
        self.shared.end_hangs();
    }
}

/// The handshake key of `token`, derived as `auth.rs` rule 1 says, from its
/// text: written out again here so these tests check the specification,
/// not the crate's code against itself.
pub fn handshake_key(token: &Token) -> [u8; 32] {
    let text = token.expose_secret();
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    blake3::derive_key("rask token v1", &bytes)
}

/// A proof as `auth.rs` rule 2 says: keyed blake3 of a domain, then the
/// connector's hello body, then the acceptor's.
pub fn handshake_proof(token: &Token, domain: &str, connector: &[u8], acceptor: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(&handshake_key(token));
    hasher.update(domain.as_bytes());
    hasher.update(connector);
    hasher.update(acceptor);
    *hasher.finalize().as_bytes()
}

/// What a raw handshake ended with.
#[derive(Debug)]
pub enum Shook {
    /// Both sides proved the token (or both run without one): the peer's
    /// hello.
    Done(Handshake),
    /// The peer answered with its hello (an authenticating one when
    /// `true`), sent no proof this side could check, and this side stopped.
    Refused(Handshake),
    /// The peer's proof did not match `token`.
    WrongProof,
}

/// The connector's side of a handshake on `s`, by hand: a hello as `role`
/// of `build`, authenticating with `token` if given; then, if both sides
/// authenticate, checks the acceptor's proof and sends this side's.
pub fn shake(s: &mut TcpStream, role: Role, build: BuildId, token: Option<&Token>) -> Shook {
    let nonce = *blake3::hash(format!("{:?}", std::time::Instant::now()).as_bytes()).as_bytes();
    let ours = Handshake::new(role, build, nonce, token.is_some()).to_frame();
    s.write_all(&ours).unwrap();
    let mut theirs = [0u8; protocol::HANDSHAKE_FRAME];
    s.read_exact(&mut theirs).unwrap();
    let hello = Handshake::parse(&theirs).unwrap();
    let Some(token) = token.filter(|_| hello.authenticates) else {
        return if hello.authenticates || token.is_some() {
            Shook::Refused(hello)
        } else {
            Shook::Done(hello)
        };
    };
    let mut proof = [0u8; protocol::PROOF_FRAME];
    s.read_exact(&mut proof).unwrap();
    assert_eq!(proof[..4], [32, 0, 0, 0], "a proof frame");
    let (c, a) = (&ours[4..], &theirs[4..]);
    if proof[4..] != handshake_proof(token, "rask acceptor proof v1", c, a) {
        return Shook::WrongProof;
    }
    let mine = handshake_proof(token, "rask connector proof v1", c, a);
    let mut frame = vec![32, 0, 0, 0];
    frame.extend(mine);
    s.write_all(&frame).unwrap();
    Shook::Done(hello)
}

/// A raw connection to `addr` as `role` of this build, past a handshake
/// proving `auth` (which must succeed).
pub fn raw(addr: std::net::SocketAddr, role: Role, auth: &Auth) -> TcpStream {
    raw_as(addr, role, BuildId::current(), auth)
}

/// [`raw`], announcing `build`.
pub fn raw_as(addr: std::net::SocketAddr, role: Role, build: BuildId, auth: &Auth) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    match shake(&mut s, role, build, auth.token()) {
        Shook::Done(_) => s,
        other => panic!("handshake with {addr} failed: {other:?}"),
    }
}

/// Waits until the other side closes `s`; what it sent first.
pub fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connection not closed: {e}"),
    }
    sink
}

/// The accepting side of a handshake on `s`, by hand, as `me` proving
/// `token`: reads the connector's hello, answers with a hello and proof,
/// checks the connector's proof. Whether the connector proved the token.
pub fn accept_shake(s: &mut TcpStream, me: Role, token: &Token) -> bool {
    let mut theirs = [0u8; protocol::HANDSHAKE_FRAME];
    if s.read_exact(&mut theirs).is_err() {
        return false;
    }
    let nonce = *blake3::hash(format!("{:?}", std::time::Instant::now()).as_bytes()).as_bytes();
    let ours = Handshake::new(me, BuildId::current(), nonce, true).to_frame();
    let (c, a) = (&theirs[4..], &ours[4..]);
    let mut answer = ours.to_vec();
    answer.extend([32, 0, 0, 0]);
    answer.extend(handshake_proof(token, "rask acceptor proof v1", c, a));
    if s.write_all(&answer).is_err() {
        return false;
    }
    let mut proof = [0u8; protocol::PROOF_FRAME];
    s.read_exact(&mut proof).is_ok()
        && proof[4..] == handshake_proof(token, "rask connector proof v1", c, a)
}
