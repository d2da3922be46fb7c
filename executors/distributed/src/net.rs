//! The transport every role shares: framed TCP connections with handshakes,
//! per-connection writer tasks that coalesce frames, and the pool of
//! connections to workers' data ports that clients and workers fetch from.
//!
//! This module knows messages only through [`protocol`](crate::protocol);
//! the scheduler, worker and client use it and never each other.
//!
//! Rules:
//!
//! 1. Every socket has `TCP_NODELAY`: batches are already coalesced by the
//!    writer task, so Nagle's algorithm would only add latency.
//! 2. A writer task owns the write half; senders hand it whole frames through
//!    an unbounded channel and never wait for the network.
//! 3. A connection is closed by dropping its writer channel and its reader;
//!    every fetch in flight on a closed data connection is reported lost.
//! 4. Handshakes carry the sender's [`BuildId`]; [`connect`] and [`accept`]
//!    give the caller the peer's and leave the decision to it. The one
//!    decision taken here: a data port whose answer names another build
//!    than the reader's is not read from (its fetches are lost).
//! 5. [`connect`] and [`accept`] return only once the handshake's
//!    authentication passed (`auth.rs` rules 2 to 4, `handshake.rs`):
//!    whatever is read or written on a connection after they return is
//!    between processes that proved the cluster's token, or that both run
//!    without one. A [`PeerPool`] proves the token of the process it
//!    belongs to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::handshake;
use crate::protocol::{
    decode_checked, frame_len, Batch, FromPeer, Handshake, ProtocolError, Role, ToPeer, WireKey,
    WorkerId,
};
use crate::{Auth, BuildId};

/// How long connecting to a peer's data port may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs a line on stderr with the crate's prefix, in one write: stderr is
/// unbuffered, and an `eprintln!` written in pieces could mix with what
/// tasks of the same process print at the same moment.
macro_rules! log {
    ($($arg:tt)*) => {
        {
            let line = format!("rask-distributed: {}\n", format_args!($($arg)*));
            eprint!("{line}")
        }
    };
}
pub(crate) use log;

/// An error and its sources, for log lines: `malformed message: …`.
pub(crate) struct Chain<'a>(pub(crate) &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Reads frames from a stream, one at a time.
///
/// Cancel-safe: progress through a frame is kept in `self`, so `next` can sit
/// in a `select!` beside other branches without losing bytes.
pub(crate) struct FrameReader<R> {
    inner: R,
    prefix: [u8; 4],
    prefix_len: usize,
    /// The frame being read, once its length is known.
    want: Option<usize>,
    body: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        FrameReader {
            inner,
            prefix: [0; 4],
            prefix_len: 0,
            want: None,
            body: Vec::new(),
        }
    }

    /// Reads the next frame; `Ok(false)` on a clean end of stream between
    /// frames. The frame's body is then [`FrameReader::frame`].
    pub(crate) async fn next(&mut self) -> Result<bool, ProtocolError> {
        loop {
            match self.want {
                None if self.prefix_len == 4 => {
                    let len = frame_len(self.prefix)?;
                    // Shrink after big frames; grow as bytes arrive rather
                    // than trusting the announced length up front.
                    if self.body.capacity() > (16 << 20) {
                        self.body = Vec::new();
                    }
                    self.body.clear();
                    self.want = Some(len);
                }
                None => {
                    let n = self
                        .inner
                        .read(&mut self.prefix[self.prefix_len..])
                        .await
                        .map_err(ProtocolError::Io)?;
                    if n == 0 {
                        return if self.prefix_len == 0 {
                            Ok(false)
                        } else {
                            Err(ProtocolError::Closed)
                        };
                    }
                    self.prefix_len += n;
                }
                Some(len) if self.body.len() == len => {
                    self.want = None;
                    self.prefix_len = 0;
                    return Ok(true);
                }
                Some(len) => {
                    let remaining = len - self.body.len();
                    self.body.reserve(remaining.min(1 << 20));
                    let n = (&mut self.inner)
                        .take(remaining as u64)
                        .read_buf(&mut self.body)
                        .await
                        .map_err(ProtocolError::Io)?;
                    if n == 0 {
                        return Err(ProtocolError::Closed);
                    }
                }
            }
        }
    }

    /// The body of the frame `next` just read.
    pub(crate) fn frame(&self) -> &[u8] {
        &self.body
    }
}

/// The reading half of a TCP connection, buffered.
pub(crate) type Reader = BufReader<OwnedReadHalf>;

/// How long a TCP connection may sit idle before the kernel probes the peer.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Between unanswered probes; the kernel gives up after a few (Linux: 9).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Nagle off, keepalive on (see [`tcp_halves`]).
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        log!("cannot turn TCP keepalive on: {e}");
    }
}

/// Splits a TCP stream into its halves, with Nagle off and keepalive on: a
/// peer whose machine vanished (powered off, unplugged) without closing
/// the connection is noticed by the kernel within a few minutes and the
/// connection fails, for clients too (workers also send heartbeats, which
/// catch a hung process sooner).
fn tcp_halves(stream: TcpStream) -> (Reader, OwnedWriteHalf) {
    tune(&stream);
    let (read, write) = stream.into_split();
    (BufReader::with_capacity(64 << 10, read), write)
}

/// One end of an in-memory connection between a client and the scheduler
/// of one process: whole frames (length prefix included) are handed over as
/// they are, with no bytes copied through a pipe and no handshake (both ends
/// are the same build). Dropping an end closes the connection, as closing a
/// socket does.
pub(crate) struct LocalEnd {
    /// Frames to the other end.
    pub(crate) send: mpsc::UnboundedSender<Vec<u8>>,
    /// Frames from the other end.
    pub(crate) recv: mpsc::UnboundedReceiver<Vec<u8>>,
}

/// The two ends of an in-memory connection.
pub(crate) fn local_pair() -> (LocalEnd, LocalEnd) {
    let (a_send, b_recv) = mpsc::unbounded_channel();
    let (b_send, a_recv) = mpsc::unbounded_channel();
    (
        LocalEnd {
            send: a_send,
            recv: a_recv,
        },
        LocalEnd {
            send: b_send,
            recv: b_recv,
        },
    )
}

/// Where a connection's frames come from: a socket, or the other end of an
/// in-memory connection ([`LocalEnd`]).
pub(crate) enum Frames {
    Stream(FrameReader<Reader>),
    Local {
        recv: mpsc::UnboundedReceiver<Vec<u8>>,
        /// The last frame received, length prefix included.
        current: Vec<u8>,
    },
}

impl Frames {
    pub(crate) fn stream(read: Reader) -> Frames {
        Frames::Stream(FrameReader::new(read))
    }

    pub(crate) fn local(recv: mpsc::UnboundedReceiver<Vec<u8>>) -> Frames {
        Frames::Local {
            recv,
            current: Vec::new(),
        }
    }

    /// As [`FrameReader::next`]; cancel-safe in both forms.
    pub(crate) async fn next(&mut self) -> Result<bool, ProtocolError> {
        match self {
            Frames::Stream(reader) => reader.next().await,
            Frames::Local { recv, current } => match recv.recv().await {
                Some(frame) => {
                    *current = frame;
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }

    /// The body of the frame `next` just read.
    pub(crate) fn frame(&self) -> &[u8] {
        match self {
            Frames::Stream(reader) => reader.frame(),
            Frames::Local { current, .. } => current.get(4..).unwrap_or_default(),
        }
    }
}

/// Opens a connection as `role` of `build` proving `auth`, and checks the
/// answer comes from `expect` and proves the same (rule 5); also returns
/// this end's address and the peer's build (rule 4).
pub(crate) async fn connect(
    address: &str,
    role: Role,
    expect: Role,
    build: BuildId,
    auth: &Auth,
    timeout: Duration,
) -> Result<(Reader, OwnedWriteHalf, SocketAddr, BuildId), ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => return Err(ConnectError::Timeout),
    };
    let local = stream.local_addr().map_err(ConnectError::Io)?;
    let (mut read, mut write) = tcp_halves(stream);
    let theirs = handshake::connector(&mut read, &mut write, role, expect, build, auth)
        .await
        .map_err(ConnectError::Handshake)?;
    Ok((read, write, local, theirs.build))
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Io(std::io::Error),
    Timeout,
    Handshake(ProtocolError),
}

impl ConnectError {
    /// The crate's error for a failed connection to the `peer` at `addr`:
    /// an authentication failure names what to set (`Error::Auth`).
    pub(crate) fn into_error(self, addr: &str, peer: Role) -> crate::Error {
        let addr = addr.to_owned();
        match self {
            ConnectError::Io(source) => crate::Error::Connection { addr, source },
            ConnectError::Timeout => crate::Error::Timeout {
                what: "the scheduler to accept the connection",
                after: CONNECT_TIMEOUT,
            },
            ConnectError::Handshake(ProtocolError::Auth(reason)) => {
                crate::Error::Auth { addr, peer, reason }
            }
            ConnectError::Handshake(reason) => crate::Error::Handshake { addr, reason },
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::Timeout => write!(f, "timed out after {CONNECT_TIMEOUT:?}"),
            ConnectError::Handshake(e) => write!(f, "handshake failed: {}", Chain(e)),
        }
    }
}

/// Checks an accepted connection's handshake and answers it as `me` of
/// `build`, requiring the peer to prove `auth` (rule 5). Returns the peer's
/// handshake, whose role and build the caller must check (rule 4).
pub(crate) async fn accept(
    stream: TcpStream,
    me: Role,
    build: BuildId,
    auth: &Auth,
) -> Result<(Handshake, Reader, OwnedWriteHalf), ProtocolError> {
    let (mut read, mut write) = tcp_halves(stream);
    let theirs = handshake::acceptor(&mut read, &mut write, me, build, auth).await?;
    Ok((theirs, read, write))
}

/// Frames smaller than this are copied together before a write.
const COALESCE: usize = 1 << 20;

/// Spawns the task that writes frames to `write`, coalescing whatever is
/// queued into one write. The task ends when every sender is dropped or the
/// socket fails.
pub(crate) fn spawn_writer(mut write: OwnedWriteHalf) -> mpsc::UnboundedSender<Vec<u8>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        while let Some(first) = rx.recv().await {
            let result = if first.len() >= COALESCE {
                write.write_all(&first).await
            } else {
                // Coalesce whatever else is queued into one syscall.
                buf.extend_from_slice(&first);
                while buf.len() < COALESCE {
                    match rx.try_recv() {
                        Ok(f) => buf.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                let r = write.write_all(&buf).await;
                buf.clear();
                r
            };
            if result.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    });
    tx
}

/// Sends a batch's frames to a writer; false if the connection is gone.
pub(crate) fn send_batch(writer: &mpsc::UnboundedSender<Vec<u8>>, batch: &mut Batch) -> bool {
    let mut ok = true;
    for frame in batch.take_frames() {
        ok &= writer.send(frame).is_ok();
    }
    ok
}

/// What a data fetch produced.
#[derive(Debug)]
pub(crate) enum FetchResult {
    /// The value's bytes.
    Data(std::sync::Arc<[u8]>),
    /// The holder answered that it does not hold the key.
    Missing,
    /// The connection to the holder failed before the answer came.
    Lost,
}

/// One fetch answer, delivered to the pool's owner.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) from: WorkerId,
    pub(crate) key: WireKey,
    pub(crate) result: FetchResult,
}

/// Connections to workers' data ports, one per worker, opened on first use.
///
/// Requests are batched: [`PeerPool::request`] only queues; [`PeerPool::flush`]
/// sends one `GetData` per worker. Answers arrive on the channel given to
/// [`PeerPool::new`]; every requested key gets exactly one answer.
pub(crate) struct PeerPool {
    addresses: HashMap<WorkerId, String>,
    conns: HashMap<WorkerId, mpsc::UnboundedSender<Vec<WireKey>>>,
    pending: HashMap<WorkerId, Vec<WireKey>>,
    answers: mpsc::UnboundedSender<Fetched>,
    /// The build this process announces, and expects of data ports.
    build: BuildId,
    /// What this process proves to data ports (rule 5).
    auth: std::sync::Arc<Auth>,
}

impl PeerPool {
    /// A pool for a process of `build` proving `auth`.
    pub(crate) fn new(
        answers: mpsc::UnboundedSender<Fetched>,
        build: BuildId,
        auth: std::sync::Arc<Auth>,
    ) -> PeerPool {
        PeerPool {
            addresses: HashMap::new(),
            conns: HashMap::new(),
            pending: HashMap::new(),
            answers,
            build,
            auth,
        }
    }

    pub(crate) fn add_peer(&mut self, id: WorkerId, address: String) {
        self.addresses.insert(id, address);
    }

    /// Forgets a peer: its connection closes and its fetches are lost.
    pub(crate) fn remove_peer(&mut self, id: WorkerId) {
        self.addresses.remove(&id);
        self.conns.remove(&id);
    }

    pub(crate) fn request(&mut self, from: WorkerId, key: WireKey) {
        self.pending.entry(from).or_default().push(key);
    }

    pub(crate) fn flush(&mut self) {
        let pending: Vec<_> = self.pending.drain().collect();
        for (peer, keys) in pending {
            if let Some(conn) = self.conns.get(&peer) {
                match conn.send(keys) {
                    Ok(()) => continue,
                    Err(mpsc::error::SendError(keys)) => {
                        self.conns.remove(&peer);
                        self.open(peer, keys);
                    }
                }
            } else {
                self.open(peer, keys);
            }
        }
    }

    fn open(&mut self, peer: WorkerId, keys: Vec<WireKey>) {
        let Some(address) = self.addresses.get(&peer).cloned() else {
            for key in keys {
                let _ = self.answers.send(Fetched {
                    from: peer,
                    key,
                    result: FetchResult::Lost,
                });
            }
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(keys);
        self.conns.insert(peer, tx);
        tokio::spawn(peer_connection(
            peer,
            address,
            self.build,
            self.auth.clone(),
            rx,
            self.answers.clone(),
        ));
    }
}

/// One connection to a data port: sends `GetData` batches, forwards answers.
async fn peer_connection(
    peer: WorkerId,
    address: String,
    build: BuildId,
    auth: std::sync::Arc<Auth>,
    mut requests: mpsc::UnboundedReceiver<Vec<WireKey>>,
    answers: mpsc::UnboundedSender<Fetched>,
) {
    // Keys asked for and not yet answered, with their multiplicity (a key
    // can be asked twice if a first answer is still on its way).
    let mut in_flight: HashMap<WireKey, u32> = HashMap::new();
    let lose_all = |in_flight: &mut HashMap<WireKey, u32>,
                    requests: &mut mpsc::UnboundedReceiver<Vec<WireKey>>| {
        requests.close();
        while let Ok(keys) = requests.try_recv() {
            for key in keys {
                *in_flight.entry(key).or_default() += 1;
            }
        }
        for (key, n) in in_flight.drain() {
            for _ in 0..n {
                let _ = answers.send(Fetched {
                    from: peer,
                    key,
                    result: FetchResult::Lost,
                });
            }
        }
    };
    let Some(first) = requests.recv().await else {
        return;
    };
    for &key in &first {
        *in_flight.entry(key).or_default() += 1;
    }
    let (read, mut write, _, theirs) = match connect(
        &address,
        Role::Peer,
        Role::DataServer,
        build,
        &auth,
        CONNECT_TIMEOUT,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            log!("could not fetch data from {peer} at {address}: {e}");
            lose_all(&mut in_flight, &mut requests);
            return;
        }
    };
    if theirs != build {
        // Rule 4: its values come from other code. The scheduler names only
        // workers of this build, so this is a stale address reused.
        let e = ProtocolError::Build {
            ours: build,
            theirs,
        };
        log!("could not fetch data from {peer} at {address}: {e}");
        lose_all(&mut in_flight, &mut requests);
        return;
    }
    let mut out = Batch::default();
    out.push(&ToPeer::GetData { keys: first });
    let mut read = FrameReader::new(read);
    let mut pending_write: Vec<Vec<u8>> = out.take_frames();
    loop {
        for frame in pending_write.drain(..) {
            if write.write_all(&frame).await.is_err() {
                lose_all(&mut in_flight, &mut requests);
                return;
            }
        }
        tokio::select! {
            req = requests.recv() => {
                let Some(keys) = req else {
                    lose_all(&mut in_flight, &mut requests);
                    return;
                };
                for &key in &keys {
                    *in_flight.entry(key).or_default() += 1;
                }
                out.push(&ToPeer::GetData { keys });
                while let Ok(keys) = requests.try_recv() {
                    for &key in &keys {
                        *in_flight.entry(key).or_default() += 1;
                    }
                    out.push(&ToPeer::GetData { keys });
                }
                pending_write = out.take_frames();
            }
            got = read.next() => {
                let msgs = match got {
                    Ok(true) => decode_checked::<FromPeer>(read.frame()),
                    Ok(false) => Err(ProtocolError::Closed),
                    Err(e) => Err(e),
                };
                let msgs = match msgs {
                    Ok(m) => m,
                    Err(e) => {
                        if !in_flight.is_empty() {
                            log!("lost data connection to {peer} at {address}: {}", Chain(&e));
                        }
                        lose_all(&mut in_flight, &mut requests);
                        return;
                    }
                };
                for msg in msgs {
                    let (key, result) = match msg {
                        FromPeer::Data { key, bytes } => (key, FetchResult::Data(bytes)),
                        FromPeer::Missing { key } => (key, FetchResult::Missing),
                    };
                    match in_flight.get_mut(&key) {
                        Some(n) if *n > 1 => *n -= 1,
                        Some(_) => {
                            in_flight.remove(&key);
                        }
                        None => continue, // not asked for: ignore
                    }
                    let _ = answers.send(Fetched { from: peer, key, result });
                }
            }
        }
    }
}

/// Binds a std listener (so errors surface synchronously) and hands it to
/// tokio.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Builds the single-threaded runtime each role runs on.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_connections_probe_idle_peers() {
        let rt = runtime().unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let (dialed, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
            for stream in [dialed.unwrap(), accepted.unwrap().0] {
                tune(&stream);
                let socket = socket2::SockRef::from(&stream);
                assert!(socket.keepalive().unwrap());
                assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
                assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
                assert!(stream.nodelay().unwrap());
            }
        });
    }
}
