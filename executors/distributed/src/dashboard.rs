//! The scheduler's web dashboard (Dask's `/status`): a small HTTP server
//! on its own address, answering from a [`Board`] the scheduler fills.
//!
//! Routes (GET and HEAD only):
//!
//! | path | answer |
//! |---|---|
//! | `/`, `/status` | the page ([`STATUS_PAGE`]) |
//! | `/api/status` | the [`Snapshot`] now, JSON |
//! | `/api/tasks?since=SEQ` | `{"next": SEQ, "tasks": [TaskRecord…]}`: the task runs numbered `SEQ` and up that are still kept |
//! | `/api/events` | server-sent events: every 250 ms an `update` whose data is an [`Update`]: the snapshot and the task runs since the previous one |
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
//!    [`MAX_CONNECTIONS`] connections are served at once, the others are
//!    closed at once; a stream whose reader stops reading for
//!    [`WRITE_TIMEOUT`] is dropped.
//! 3. The dashboard never slows the scheduler: the scheduler publishes to
//!    the board on its own schedule (a snapshot every few hundred
//!    milliseconds, task runs as they finish, into a bounded ring), and the
//!    server only reads it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rask_executor::diagnostics::{Snapshot, TaskRecord, Update, STATUS_PAGE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Token;

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
    state: Mutex<BoardState>,
}

#[derive(Default)]
struct BoardState {
    snapshot: Option<Snapshot>,
    /// The newest task runs, oldest first, numbered from `first_seq`.
    tasks: VecDeque<TaskRecord>,
    next_seq: u64,
}

impl Board {
    /// Replaces the snapshot.
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        self.lock().snapshot = Some(snapshot);
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
        state.tasks.push_back(record);
    }

    /// The task runs numbered `since` and up that are kept, at most
    /// `limit`, and the number to ask from next.
    pub(crate) fn tasks_since(&self, since: u64, limit: usize) -> (Vec<TaskRecord>, u64) {
        let state = self.lock();
        let first = state.tasks.front().map_or(state.next_seq, |t| t.seq);
        let skip = since.saturating_sub(first) as usize;
        let tasks: Vec<TaskRecord> = state.tasks.iter().skip(skip).take(limit).cloned().collect();
        let next = tasks
            .last()
            .map_or(state.next_seq.min(since.max(first)), |t| t.seq + 1);
        (tasks, next)
    }

    /// The snapshot now.
    pub(crate) fn snapshot(&self) -> Option<Snapshot> {
        self.lock().snapshot.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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

/// Serves the dashboard on `listener` until the runtime stops.
pub(crate) async fn serve(listener: TcpListener, board: Arc<Board>, access: Access) {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("dashboard: accept failed: {e}");
                // Out of file descriptors, most likely: let some close.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::AcqRel);
            drop(stream);
            continue;
        }
        let (board, access, live) = (board.clone(), access.clone(), live.clone());
        tokio::spawn(async move {
            let _ = peer;
            serve_one(stream, &board, &access).await;
            live.fetch_sub(1, Ordering::AcqRel);
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

/// Serves one request (rule 2), then closes the connection.
async fn serve_one(mut stream: TcpStream, board: &Board, access: &Access) {
    let request = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
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
            let json = board
                .snapshot()
                .map_or_else(|| "null".to_owned(), |s| to_json(&s));
            response(200, "application/json", json.as_bytes())
        }
        "/api/tasks" => {
            let since = query_value(&request.query, "since")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let (tasks, next) = board.tasks_since(since, KEPT_TASKS);
            let json = format!(r#"{{"next":{next},"tasks":{}}}"#, to_json(&tasks));
            response(200, "application/json", json.as_bytes())
        }
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
        let Some(status) = board.snapshot() else {
            continue;
        };
        let (tasks, after) = board.tasks_since(next, TASKS_PER_UPDATE);
        next = after;
        let data = to_json(&Update { status, tasks });
        let event = format!("event: update\ndata: {data}\n\n");
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
    use rask_executor::diagnostics::RecordStatus;

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
