//! The scheduler's web dashboard (Dask's `/status`): a small HTTP server
//! on its own address and thread, answering from a [`Board`] the scheduler
//! fills.
//!
//! Routes (GET and HEAD only):
//!
//! | path | answer |
//! |---|---|
//! | `/`, `/status` | the page ([`STATUS_PAGE`]) |
//! | `/api/status` | the [`Snapshot`] now, JSON |
//! | `/api/tasks?since=SEQ` | `{"next": SEQ, "tasks": [TaskRecord…]}`: the task runs numbered `SEQ` and up that are still kept (no `since`: 0; one that is not a whole number from 0 up: `400 Bad Request`) |
//! | `/api/events` | server-sent events: every 250 ms an `update` whose data is an [`Update`](rask_executor::diagnostics::Update): the snapshot and the task runs since the previous one |
//!
//! Rules:
//!
//! 1. It answers only on the address it was given. On a loopback address
//!    it asks for no key: any process or user of the machine may look
//!    (unlike the scheduler's own port, which asks every peer for the
//!    token), but only by that address: a request must name a loopback host
//!    (`Host: 127.0.0.1:…`, `localhost:…`, `[::1]:…`) or none, else it
//!    gets `403` — a web page of another site whose name it points at
//!    127.0.0.1 (DNS rebinding) names its own host, and reads nothing.
//!    Off loopback, every request needs the dashboard's key
//!    ([`Token::dashboard_key`], derived one way from the cluster's token),
//!    never the token: the plain HTTP this server speaks can be read on
//!    the way, and the key read there opens this page and nothing else. A
//!    link that carries the key once (`/status?key=…`, as `rask-scheduler`
//!    prints it) sets a cookie holding it and redirects to the same page
//!    without it; a request with neither gets `401` and nothing else, and
//!    so does one carrying the token (`?token=`, `?key=TOKEN`). Keys are
//!    compared in constant time.
//! 2. Nothing a browser sends is trusted: a request head is at most
//!    [`MAX_HEAD`] bytes and must arrive within [`READ_TIMEOUT`]; at most
//!    [`MAX_CONNECTIONS`] connections are served at once. When all are
//!    taken, a newcomer closes the oldest connection whose request has not
//!    arrived whole (as `net::Gate` does for the scheduler's port), so a
//!    peer holding every connection with unfinished requests locks nobody
//!    out; only when every connection is being answered is the newcomer
//!    closed at once. A stream whose reader stops reading for
//!    [`WRITE_TIMEOUT`] is dropped.
//! 3. The dashboard never slows the scheduler. Its server runs on a thread
//!    of its own, `rask-dashboard`, with its own runtime ([`Server`]),
//!    started with the scheduler and stopped with it (nothing of it stays
//!    open): no request is read, answered or rendered on the scheduler's
//!    thread. The scheduler publishes to the board on its own schedule (a
//!    snapshot every few hundred milliseconds, task runs as they finish,
//!    into a bounded ring) and renders nothing. The first reader after a
//!    publish renders the snapshot as JSON, and every request and stream
//!    until the next publish shares that rendering; a reader holds the
//!    lock the scheduler publishes under only to copy pointers out (at
//!    most [`KEPT_TASKS`]), and renders task runs outside it. What the
//!    server does take is CPU: on a machine with fewer cores than busy
//!    threads, a flood of requests competes with the scheduler for them, as
//!    any other process would.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rask_executor::diagnostics::{Snapshot, TaskRecord, STATUS_PAGE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::{net, Token};

/// The longest request head served.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// How long a request head may take to arrive.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a browser may wait for it to read.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Task runs kept for `/api/tasks` and new streams.
pub(crate) const KEPT_TASKS: usize = 20_000;
/// How often a stream sends an update.
pub(crate) const UPDATE_EVERY: Duration = Duration::from_millis(250);
/// Task runs per update at most; the rest follow in the next ones.
const TASKS_PER_UPDATE: usize = 5_000;

/// What the dashboard shows, as the scheduler last published it.
#[derive(Default)]
pub(crate) struct Board {
    /// What the scheduler published; it holds this lock only to publish or
    /// record, and readers only to copy pointers out (rule 3).
    state: Mutex<BoardState>,
    /// The latest snapshot as JSON, rendered by the first reader after
    /// each publish. Only readers take this lock, never the scheduler, so
    /// a render does not hold up a publish.
    rendered: Mutex<Option<Rendered>>,
    /// Snapshots rendered so far.
    #[cfg(test)]
    renders: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct BoardState {
    snapshot: Option<Arc<Snapshot>>,
    /// Snapshots published so far: which one a rendering is of.
    published: u64,
    /// The newest task runs, oldest first, numbered from `first_seq`.
    tasks: VecDeque<Arc<TaskRecord>>,
    next_seq: u64,
}

/// A snapshot rendered as JSON.
struct Rendered {
    /// [`BoardState::published`] when it was the latest.
    published: u64,
    json: Arc<str>,
}

impl Board {
    /// Replaces the snapshot. Renders nothing: the dashboard's thread does
    /// that when a reader asks (rule 3).
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        let mut state = self.lock();
        let old = state.snapshot.replace(Arc::new(snapshot));
        state.published += 1;
        drop(state);
        drop(old);
    }

    /// Appends a task run, numbering it; the oldest run is dropped past
    /// [`KEPT_TASKS`].
    pub(crate) fn record(&self, mut record: TaskRecord) {
        let mut state = self.lock();
        record.seq = state.next_seq;
        state.next_seq += 1;
        if state.tasks.len() == KEPT_TASKS {
            state.tasks.pop_front();
        }
        state.tasks.push_back(Arc::new(record));
    }

    /// The task runs numbered `since` and up that are kept, at most
    /// `limit`, and the number to ask from next.
    pub(crate) fn tasks_since(&self, since: u64, limit: usize) -> (Vec<Arc<TaskRecord>>, u64) {
        let state = self.lock();
        let first = state.tasks.front().map_or(state.next_seq, |t| t.seq);
        let skip = since.saturating_sub(first) as usize;
        let tasks: Vec<_> = state.tasks.iter().skip(skip).take(limit).cloned().collect();
        let next = tasks
            .last()
            .map_or(state.next_seq.min(since.max(first)), |t| t.seq + 1);
        (tasks, next)
    }

    /// The latest snapshot as JSON, rendered once per publish: by the first
    /// reader after it, outside the scheduler's lock; later readers share
    /// that rendering.
    pub(crate) fn snapshot_json(&self) -> Option<Arc<str>> {
        let mut rendered = self.rendered.lock().unwrap_or_else(PoisonError::into_inner);
        let (published, snapshot) = {
            let state = self.lock();
            (state.published, state.snapshot.clone()?)
        };
        if let Some(done) = rendered.as_ref().filter(|r| r.published == published) {
            return Some(done.json.clone());
        }
        let json: Arc<str> = to_json(&*snapshot).into();
        #[cfg(test)]
        self.renders
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *rendered = Some(Rendered {
            published,
            json: json.clone(),
        });
        Some(json)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The dashboard's server on a thread of its own, `rask-dashboard`, with
/// its own runtime (rule 3). Dropping it stops the server and waits for
/// its thread: the listener and every connection are closed by then.
pub(crate) struct Server {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `board` on `listener` (non-blocking, as `net::listen` makes
    /// it) to whom `access` lets in.
    pub(crate) fn start(
        listener: std::net::TcpListener,
        board: Arc<Board>,
        access: Access,
    ) -> std::io::Result<Server> {
        let runtime = net::runtime()?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rask-dashboard".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // Also when the sender is dropped without a word.
                    tokio::select! {
                        () = serve(listener, board, access) => {}
                        _ = stopped => {}
                    }
                });
                // The runtime goes with this thread, and with it the task
                // of every connection still open.
            })?;
        Ok(Server {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the server and waits for its thread. Calling it again does
    /// nothing.
    pub(crate) fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Who may look (rule 1).
#[derive(Clone)]
pub(crate) enum Access {
    /// Anyone on this machine, by a loopback host name: the address is
    /// loopback.
    Local,
    /// Anyone who can connect: off loopback with no token (an insecure
    /// scheduler).
    Open,
    /// Requests must carry the dashboard's key, once as `?key=`, then in
    /// the cookie. The token itself is not held here.
    Keyed {
        /// [`Token::dashboard_key`].
        key: String,
    },
}

impl Access {
    /// Local on a loopback address, else closed behind `token`'s dashboard
    /// key, or open without a token.
    pub(crate) fn for_address(address: SocketAddr, token: Option<&Token>) -> Access {
        match token {
            _ if address.ip().is_loopback() => Access::Local,
            Some(token) => Access::Keyed {
                key: token.dashboard_key(),
            },
            None => Access::Open,
        }
    }
}

/// The connections served now (rule 2).
#[derive(Default)]
struct Slots {
    live: usize,
    next: u64,
    /// Connections whose request has not arrived whole, oldest first;
    /// dropping a sender closes its connection.
    reading: BTreeMap<u64, oneshot::Sender<()>>,
}

/// A connection's place in [`Slots`], given back when it is dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    id: u64,
}

impl Slot {
    /// Takes a place for a newcomer, closing the oldest unfinished request
    /// when every place is taken; `None` when every place is being
    /// answered. Also the receiver that says the connection was closed so.
    fn take(slots: &Arc<Mutex<Slots>>) -> Option<(Slot, oneshot::Receiver<()>)> {
        let mut state = slots.lock().unwrap_or_else(PoisonError::into_inner);
        if state.live >= MAX_CONNECTIONS {
            // Its place is given back when its task ends, at its next poll;
            // until then one more is served than the cap.
            state.reading.pop_first()?;
        }
        let id = state.next;
        state.next += 1;
        state.live += 1;
        let (evict, evicted) = oneshot::channel();
        state.reading.insert(id, evict);
        let slot = Slot {
            slots: slots.clone(),
            id,
        };
        Some((slot, evicted))
    }

    /// Its request arrived whole: no newcomer closes it now.
    fn read(&self) {
        self.lock().reading.remove(&self.id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.lock();
        state.live -= 1;
        state.reading.remove(&self.id);
    }
}

/// Serves the dashboard on `listener` until the runtime stops.
async fn serve(listener: TcpListener, board: Arc<Board>, access: Access) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("dashboard: accept failed: {e}");
                // Out of file descriptors, most likely: let some close.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((slot, evicted)) = Slot::take(&slots) else {
            drop(stream);
            continue;
        };
        let (board, access) = (board.clone(), access.clone());
        tokio::spawn(async move {
            serve_one(stream, &board, &access, &slot, evicted).await;
            drop(slot);
        });
    }
}

/// A parsed request: what the server needs of it.
struct Request {
    head_only: bool,
    path: String,
    query: String,
    cookie: Option<String>,
    /// Its `Host` header, if any.
    host: Option<String>,
}

/// Whether `host` (a `Host` header: a name or address, and maybe a port)
/// names this machine's loopback (rule 1).
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[::1]:8787`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether two secrets are equal, in time that does not depend on where
/// they differ (blake3's digests compare in constant time).
fn same_secret(given: &str, expected: &str) -> bool {
    blake3::hash(given.as_bytes()) == blake3::hash(expected.as_bytes())
}

/// Serves one request (rule 2), then closes the connection; closes it at
/// once if `evicted` fires before the request arrived whole.
async fn serve_one(
    mut stream: TcpStream,
    board: &Board,
    access: &Access,
    slot: &Slot,
    evicted: oneshot::Receiver<()>,
) {
    let reading = tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream));
    let request = tokio::select! {
        read = reading => read,
        _ = evicted => return,
    };
    slot.read();
    let request = match request {
        Ok(Ok(request)) => request,
        Ok(Err(status)) => {
            let _ = write_all(&mut stream, &plain(status, status_text(status))).await;
            return;
        }
        Err(_) => return,
    };
    if matches!(access, Access::Local) && !request.host.as_deref().is_none_or(loopback_host) {
        let text = "this dashboard answers to its loopback address only (127.0.0.1, localhost)";
        let _ = write_all(&mut stream, &plain(403, text)).await;
        return;
    }
    if let Access::Keyed { key } = access {
        let given = query_value(&request.query, "key");
        if given.is_some_and(|given| same_secret(&given, key)) {
            let answer = format!(
                "HTTP/1.1 303 See Other\r\nLocation: {}\r\nSet-Cookie: rask_dashboard={key}; \
                 HttpOnly; SameSite=Strict; Path=/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                request.path
            );
            let _ = write_all(&mut stream, answer.as_bytes()).await;
            return;
        }
        if !request
            .cookie
            .as_deref()
            .is_some_and(|given| same_secret(given, key))
        {
            let text = "this dashboard needs its key: open the link rask-scheduler printed \
                        (/status?key=…); the cluster's token is not accepted here";
            let _ = write_all(&mut stream, &plain(401, text)).await;
            return;
        }
    }
    let answer = match request.path.as_str() {
        "/" | "/status" => response(200, "text/html; charset=utf-8", STATUS_PAGE.as_bytes()),
        "/api/status" => {
            let json = board.snapshot_json().unwrap_or_else(|| "null".into());
            response(200, "application/json", json.as_bytes())
        }
        "/api/tasks" => match since(&request.query) {
            Ok(since) => {
                let (tasks, next) = board.tasks_since(since, KEPT_TASKS);
                let json = format!(r#"{{"next":{next},"tasks":{}}}"#, to_json(&tasks));
                response(200, "application/json", json.as_bytes())
            }
            Err(reason) => plain(400, &reason),
        },
        "/api/events" if !request.head_only => {
            stream_updates(stream, board).await;
            return;
        }
        "/api/events" => response(200, "text/event-stream", b""),
        _ => plain(404, "not found"),
    };
    let answer = if request.head_only {
        strip_body(answer)
    } else {
        answer
    };
    let _ = write_all(&mut stream, &answer).await;
}

/// The live stream: an update every [`UPDATE_EVERY`] until the browser
/// goes away or stops reading (rule 2).
async fn stream_updates(mut stream: TcpStream, board: &Board) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                Connection: keep-alive\r\nX-Accel-Buffering: no\r\n\r\nretry: 1000\n\n";
    if write_all(&mut stream, head.as_bytes()).await.is_err() {
        return;
    }
    // A new stream starts from the task runs still kept.
    let mut next = 0;
    let mut tick = tokio::time::interval(UPDATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(status) = board.snapshot_json() else {
            continue;
        };
        let (tasks, after) = board.tasks_since(next, TASKS_PER_UPDATE);
        next = after;
        let event = format!("event: update\ndata: {}\n\n", update_json(&status, &tasks));
        if write_all(&mut stream, event.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Reads and parses one request head; `Err` holds the status to answer.
async fn read_request(stream: &mut TcpStream) -> Result<Request, u16> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buffer.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buffer) {
            Ok(httparse::Status::Complete(_)) => {
                let head_only = match parsed.method {
                    Some("GET") => false,
                    Some("HEAD") => true,
                    _ => return Err(405),
                };
                let target = parsed.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let cookie = parsed
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
                    .filter_map(|h| std::str::from_utf8(h.value).ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|c| c.trim().strip_prefix("rask_dashboard="))
                    .map(str::to_owned)
                    .next();
                let host = parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_owned());
                return Ok(Request {
                    head_only,
                    path: path.to_owned(),
                    query: query.to_owned(),
                    cookie,
                    host,
                });
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err(431),
            Err(_) => return Err(400),
        }
    }
}

/// The value of `name` in a query string, if present (no percent-decoding:
/// tokens and numbers need none).
fn query_value(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The `since` of `/api/tasks`: a task run's number, 0 when it is missing;
/// anything else is refused with the one-line reason, never read as 0
/// (which answered `since=abc` with every run kept).
fn since(query: &str) -> Result<u64, String> {
    let Some(text) = query_value(query, "since") else {
        return Ok(0);
    };
    text.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| {
            format!("invalid value `{text}` for since: expected a task run's number, 0 or more")
        })
}

/// An [`Update`](rask_executor::diagnostics::Update) as JSON, its snapshot
/// already rendered: each stream shares the rendering of the snapshot,
/// and renders only its own task runs.
fn update_json(status: &str, tasks: &[Arc<TaskRecord>]) -> String {
    format!(r#"{{"status":{status},"tasks":{}}}"#, to_json(&tasks))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        status_text(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn plain(status: u16, text: &str) -> Vec<u8> {
    response(
        status,
        "text/plain; charset=utf-8",
        format!("{text}\n").as_bytes(),
    )
}

/// A response without its body, for HEAD (the head ends at the blank line).
fn strip_body(mut answer: Vec<u8>) -> Vec<u8> {
    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
        answer.truncate(end + 4);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_executor::diagnostics::{RecordStatus, Update};
    use std::io::ErrorKind;

    fn record(function: &str) -> TaskRecord {
        TaskRecord {
            seq: 0,
            key: "00".into(),
            function: function.into(),
            worker: 1,
            thread: 0,
            start_ms: 0.0,
            end_ms: 1.0,
            status: RecordStatus::Memory,
        }
    }

    #[test]
    fn the_board_numbers_runs_and_keeps_the_newest() {
        let board = Board::default();
        for _ in 0..KEPT_TASKS + 5 {
            board.record(record("inc"));
        }
        let (tasks, next) = board.tasks_since(0, 10);
        assert_eq!(
            tasks.first().map(|t| t.seq),
            Some(5),
            "the oldest five were dropped"
        );
        assert_eq!(next, 15);
        let (tasks, next) = board.tasks_since(KEPT_TASKS as u64 + 3, 10);
        assert_eq!(
            tasks.iter().map(|t| t.seq).collect::<Vec<_>>(),
            vec![KEPT_TASKS as u64 + 3, KEPT_TASKS as u64 + 4]
        );
        assert_eq!(next, KEPT_TASKS as u64 + 5);
        let (tasks, next) = board.tasks_since(next, 10);
        assert!(tasks.is_empty());
        assert_eq!(next, KEPT_TASKS as u64 + 5);
    }

    #[test]
    fn queries_are_read_without_decoding() {
        assert_eq!(
            query_value("since=12&token=ab", "token").as_deref(),
            Some("ab")
        );
        assert_eq!(query_value("since=12", "token"), None);
        assert_eq!(query_value("", "since"), None);
    }

    #[test]
    fn the_key_is_the_dashboard_key_and_only_off_loopback() {
        let token = Token::parse(&"ab".repeat(32)).unwrap();
        let local = Access::for_address("127.0.0.1:1".parse().unwrap(), Some(&token));
        assert!(matches!(local, Access::Local));
        let insecure = Access::for_address("10.0.0.1:1".parse().unwrap(), None);
        assert!(matches!(insecure, Access::Open));
        match Access::for_address("10.0.0.1:1".parse().unwrap(), Some(&token)) {
            Access::Keyed { key } => {
                assert_eq!(key, token.dashboard_key());
                assert_ne!(key, token.expose_secret());
            }
            _ => panic!("off loopback with a token must be closed"),
        }
    }

    /// Every wait in these tests gives up after this long.
    const WAIT: Duration = Duration::from_secs(30);

    /// A GET of `target` on `address`, blocking, bounded by [`WAIT`]: its
    /// status line and its body, or what went wrong.
    fn get(address: SocketAddr, target: &str) -> std::io::Result<(String, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address)?;
        stream.set_read_timeout(Some(WAIT))?;
        write!(stream, "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head.lines().next().unwrap_or("").to_owned();
        Ok((status, body.to_owned()))
    }

    /// A GET of `/status` on `address`: its status line.
    fn get_status(address: SocketAddr) -> std::io::Result<String> {
        get(address, "/status").map(|(status, _)| status)
    }

    /// A scheduler on `127.0.0.1:0` serving its dashboard there too.
    fn scheduler() -> crate::scheduler::SchedulerHandle {
        let local = "127.0.0.1:0".parse().unwrap();
        let options = crate::scheduler::Options::default().dashboard(local);
        crate::scheduler::serve_with(local, options).unwrap()
    }

    /// Rule 3: the scheduler's thread held up does not hold up the
    /// dashboard, whose server runs on a thread of its own.
    #[test]
    fn the_dashboard_answers_while_the_scheduler_is_held_up() {
        let scheduler = scheduler();
        let address = scheduler.dashboard().unwrap();
        // A task that holds the scheduler's thread until released; longer
        // than a request waits for its answer, so that a dashboard served
        // on that thread fails the request below.
        let (holding, held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        scheduler.runtime().spawn(async move {
            let _ = holding.send(());
            let _ = released.recv_timeout(2 * WAIT);
        });
        held.recv_timeout(WAIT).unwrap();
        let answer = get(address, "/api/status");
        let _ = release.send(());
        assert_eq!(answer.unwrap().0, "HTTP/1.1 200 OK");
    }

    fn snapshot(scheduler: &str) -> Snapshot {
        Snapshot {
            version: rask_executor::diagnostics::SCHEMA_VERSION,
            scheduler: scheduler.into(),
            uptime_ms: 1,
            clients: 0,
            tasks_per_second: 0.0,
            totals: Default::default(),
            functions: Vec::new(),
            workers: Vec::new(),
            unrunnable: Vec::new(),
        }
    }

    /// A dashboard serving `board` on `127.0.0.1:0`, and its address.
    fn server(board: &Arc<Board>) -> (Server, SocketAddr) {
        let listener = net::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let server = Server::start(listener, board.clone(), Access::Local).unwrap();
        (server, address)
    }

    /// The first update of a live stream from `address`.
    fn first_update(address: SocketAddr) -> Update {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let data = std::io::BufReader::new(stream)
            .lines()
            .map(Result::unwrap)
            .find_map(|line| line.strip_prefix("data: ").map(str::to_owned))
            .unwrap();
        serde_json::from_str(&data).unwrap()
    }

    /// `/api/tasks` answers a `since` that is not a run's number with 400
    /// and a one-line reason, where it answered it as `since=0` (found by a
    /// user pass); a missing `since` is 0.
    #[test]
    fn a_since_that_is_not_a_number_is_a_bad_request() {
        let board = Arc::new(Board::default());
        board.record(record("inc"));
        board.record(record("inc"));
        let (_server, address) = server(&board);
        let runs = |target: &str| {
            let (status, body) = get(address, target).unwrap();
            assert_eq!(status, "HTTP/1.1 200 OK", "{target}: {body}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            body["tasks"].as_array().unwrap().len()
        };
        assert_eq!(runs("/api/tasks"), 2);
        assert_eq!(runs("/api/tasks?since=0"), 2);
        assert_eq!(runs("/api/tasks?since=1"), 1);
        for bad in ["abc", "-1", "+1", "", "1.5", "1%20", "18446744073709551616"] {
            let target = format!("/api/tasks?since={bad}");
            let (status, body) = get(address, &target).unwrap();
            assert_eq!(status, "HTTP/1.1 400 Bad Request", "{target}: {body}");
            assert_eq!(
                body,
                format!(
                    "invalid value `{bad}` for since: expected a task run's number, 0 or more\n"
                )
            );
        }
    }

    /// Rule 3: a snapshot is rendered once, by the first reader after its
    /// publish, however many requests and streams read it.
    #[test]
    fn many_reads_between_two_publishes_render_the_snapshot_once() {
        let board = Arc::new(Board::default());
        board.record(record("inc"));
        let (_server, address) = server(&board);
        let renders = || board.renders.load(std::sync::atomic::Ordering::Relaxed);
        for name in ["first", "second"] {
            board.publish(snapshot(name));
            for _ in 0..5 {
                let (status, body) = get(address, "/api/status").unwrap();
                assert_eq!(status, "HTTP/1.1 200 OK");
                let shown: Snapshot = serde_json::from_str(&body).unwrap();
                assert_eq!(shown, snapshot(name));
            }
            let update = first_update(address);
            assert_eq!(update.status, snapshot(name));
            assert_eq!(update.tasks.len(), 1);
        }
        assert_eq!(renders(), 2, "one per publish");
    }

    /// The server's thread ends with the scheduler: its port refuses, and
    /// a live stream open meanwhile ends too.
    #[test]
    fn the_dashboard_stops_with_the_scheduler() {
        use std::io::{Read, Write};
        let scheduler = scheduler();
        let address = scheduler.dashboard().unwrap();
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut head = [0; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        drop(scheduler);
        let mut rest = Vec::new();
        if let Err(e) = stream.read_to_end(&mut rest) {
            // Closed, not still open when the wait gave up.
            let open = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
            assert!(!open, "the stream is still open: {e}");
        }
        let refused = std::net::TcpStream::connect(address).map(drop);
        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionRefused)
        );
    }

    #[test]
    fn an_update_renders_as_its_type_does() {
        let status = snapshot("s");
        let tasks = vec![Arc::new(record("inc"))];
        let update = Update {
            status: status.clone(),
            tasks: vec![record("inc")],
        };
        assert_eq!(update_json(&to_json(&status), &tasks), to_json(&update));
    }

    #[test]
    fn a_newcomer_closes_the_oldest_unfinished_request_when_all_are_taken() {
        use std::io::{Read, Write};
        let (server, address) = server(&Arc::default());
        // A peer takes every connection with a request it never finishes.
        let mut held: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(address).unwrap();
                stream.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
                stream
            })
            .collect();
        // Served all the same, well before the held requests time out.
        assert_eq!(get_status(address).unwrap(), "HTTP/1.1 200 OK");
        // The oldest held connection was closed for it, with nothing sent.
        let oldest = &mut held[0];
        oldest
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(oldest.read_to_end(&mut rest).unwrap_or(0), 0);
        assert!(rest.is_empty());
        drop(held);
        drop(server);
    }

    #[test]
    fn only_loopback_hosts_are_local() {
        for host in [
            "127.0.0.1:8787",
            "127.0.0.1",
            "localhost:8787",
            "LOCALHOST",
            "[::1]:8787",
            "127.1.2.3:80",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8787",
            "evil.example",
            "10.0.0.5:8787",
            "[2001:db8::1]:8787",
            "localhost.evil.example:8787",
            "",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
    }
}
