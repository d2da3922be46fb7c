//! The transport every role shares: framed TCP connections with handshakes,
//! per-connection writer tasks that coalesce frames, the pool of
//! connections to workers' data ports that clients and workers fetch from,
//! and the limits that keep a peer, trusted or not, from taking more of a
//! process than its share.
//!
//! This module knows messages only through [`protocol`](crate::protocol);
//! the scheduler, worker and client use it and never each other.
//!
//! Rules:
//!
//! 1. Every TCP socket has `TCP_NODELAY`: batches are already coalesced by
//!    the writer task, so Nagle's algorithm would only add latency. A Unix
//!    socket ([`Scheme::Unix`]) carries the same frames and handshakes as
//!    plain TCP, for peers on one machine: a message then costs no TCP/IP
//!    processing on either side. Once its handshakes are done, a Unix
//!    socket is registered with the reactor **for reading only**
//!    ([`quiet`]): a peer reading what this side sent wakes nothing here
//!    (the kernel reports a Unix socket writable each time its peer reads,
//!    and tokio's sockets, registered for writing too, wake their reactor
//!    for it), and a write waits for room only when the socket is full.
//!    A TCP socket reports itself writable only after it was full, so it
//!    keeps tokio's registration.
//! 2. A writer task owns the write half; senders hand it whole frames
//!    through a [`Writer`] and never wait for the network.
//! 3. A connection is closed by dropping its writer and its reader; every
//!    fetch in flight on a closed data connection is reported lost.
//! 4. Handshakes carry the sender's [`BuildId`]; [`connect`] and
//!    [`accept_detached`] give the caller the peer's and leave the decision
//!    to it. The one decision taken here: a data port whose answer names
//!    another build than the reader's is not read from (its fetches are
//!    lost).
//! 5. **Logs a peer can trigger are rate-limited** ([`log_limited!`]): at
//!    most [`LOG_BURST`] lines of a kind per [`LOG_WINDOW`], and the next
//!    line printed says how many were left out. A failing `accept` backs
//!    off from 10 ms to 1 s ([`Backoff`]) instead of spinning.
//! 6. **Before authentication.** An accepted connection is *pre-auth* until
//!    [`accept_detached`] (rule 12) returns `Ok`: the single place where a
//!    connection becomes authenticated (its handshake passed, token proofs
//!    included) and its limits switch
//!    from these to those of the rules that follow. Pre-auth, nothing but the
//!    handshake is read, straight from the socket into the fixed arrays of
//!    `handshake.rs`: no read buffer, no frame, nothing sized by the peer.
//!    Over TLS, the TLS handshake comes first (`tls.rs` rule 2), and rustls
//!    holds what it reads in buffers of its own, bounded by TLS's record
//!    and handshake-message sizes (16 KiB and 64 KiB), not by anything the
//!    peer announces. Both handshakes together must be over within
//!    [`HANDSHAKE_TIMEOUT`](handshake::HANDSHAKE_TIMEOUT), and at most
//!    [`Caps::pre_auth`] connections are pre-auth at once: a new one closes
//!    the oldest ([`Gate`]), so sockets left idle before their handshake
//!    cannot lock out a peer that completes its own in one round trip.
//! 7. **Connection caps.** A listening socket takes at most
//!    [`Caps::total`] connections, derived from the process's limit of
//!    open files; each role at most [`Caps::per_role`], leaving room for
//!    the others.
//! 8. **Frame budget.** A frame body is at most
//!    [`MAX_FRAME`](crate::protocol::MAX_FRAME). The bytes of every frame
//!    over [`SMALL_FRAME`] are granted from the [`Budget`] of the process
//!    ([`FRAME_BUDGET`] unless a scheduler's options say otherwise) before
//!    they are read, and a grant lasts until its frame's messages were
//!    handled. The budget is a *pool* and a *lane*, half of it (at most
//!    `MAX_FRAME`), which is also the biggest frame read: a larger one
//!    closes its connection at once. A frame is granted **as its bytes
//!    arrive**: a step at a time from the pool, each once the step before
//!    arrived, as much as arrived already (at least [`SMALL_FRAME`], at
//!    most [`GRANT_STEP`]). So a peer that announces a big frame and sends
//!    little of it holds little ([`SMALL_FRAME`] if it sent nothing more),
//!    however long it takes, and no frame holds more of the pool than
//!    twice what arrived of it, plus [`SMALL_FRAME`]. When the pool has no
//!    room for the next step, the frame waits in the lane's line (first
//!    come, first served) for *all* it still lacks at once, and its
//!    connection is not read meanwhile (back-pressure, nothing allocated);
//!    what it is granted from the lane it holds before the bytes arrive,
//!    for at most the stall timeout and a second per [`MIN_FRAME_RATE`]
//!    bytes that arrived since (rule 9). Small frames (heartbeats, most
//!    batches) are read without waiting, so a big frame waiting for room
//!    does not silence its process; they cost at most [`SMALL_FRAME`] per
//!    connection, and connections are capped (rule 7).
//!    Once decoded, every frame, small or big, of every connection of
//!    every process (the scheduler's; a worker's, from its scheduler and
//!    on its data port; a client's, from its scheduler; the answers of
//!    data ports a [`PeerPool`] reads, for either) holds from the budget
//!    what its messages take ([`FrameReader::next_messages`], the one
//!    place that decodes what a connection brought: its length plus what
//!    `protocol` rule 5 charged, from the pool or else the lane if either
//!    has room now) until they were handled (by the scheduler's state
//!    loop, a worker's network loop, a client's loop; a fetch's answer
//!    until the pool's owner dropped it), however much more than its
//!    length that is. A frame whose messages would take more than the
//!    whole budget closes its connection
//!    ([`ProtocolError::OutOfRange`]): its decoding stops there, before
//!    they take more. When neither has room, the messages are dropped, the
//!    frame lets go of its whole grant and waits for the whole in line
//!    ([`FrameReader::start_cover`]: what the pool holds of it in the
//!    pool's line, then the rest in the lane's), its connection not read
//!    meanwhile, and is decoded again once granted: what waits outside the
//!    budget is the frame's body, one per connection. That wait is
//!    cancel-safe, kept in the reader with the frame's place in line, so a
//!    loop waits for it beside its other work, never instead of it. A data
//!    port's requests hold what they take from a budget of their
//!    connection's own ([`Limits::requests`]).
//!
//!    **No deadlock.** A frame waits while holding part of the budget only
//!    in the lane's line, holding pool; nothing waits while holding lane,
//!    and what waits in the pool's line holds nothing. (a) Whatever holds
//!    lane lacks nothing: its frame is being received, which rule 9 bounds
//!    in time, or handled, which never waits for a grant (a frame whose
//!    messages need more lets go of everything before it waits, and a loop
//!    handles what it holds while another of its frames waits). So the
//!    lane is given back in the end, and its line, each of whose frames
//!    lacks at most the lane, moves. (b) Whatever holds pool is being
//!    received, or handled, or waits in the lane's line, which moves by
//!    (a): it too gives the pool back in the end. While anything waits in
//!    the pool's line, nothing takes a step from the pool (the line is
//!    fair: what is given back goes to it first), so the pool's line moves
//!    too. The price: when the pool runs out, big frames go through the
//!    lane one after the other, as much of them at a time as fits.
//! 9. **Stalls.** A frame must arrive at [`MIN_FRAME_RATE`] at least,
//!    after a head start of [`STALL_TIMEOUT`] (a scheduler's
//!    `stall_timeout`): its `k`-th byte within the stall timeout plus
//!    `k / MIN_FRAME_RATE` seconds of its start, or, for what it still
//!    lacked when it was granted from the lane, of that grant. The
//!    deadline moves with the bytes received (a *progress deadline*): a
//!    peer that trickles a frame (slow-loris), or sends its head and then
//!    little, is closed the stall timeout after its start plus the time
//!    its bytes so far earned, however long the frame it announced; it
//!    cannot hold what it was granted (the lane's bytes, rule 8) for the
//!    whole frame's time while sending nothing. A frame whose bytes keep
//!    up with the minimum rate is never closed, and has, as before, the
//!    stall timeout plus a second per [`MIN_FRAME_RATE`] bytes of its
//!    length in all. The time counts from the first read of the frame (or
//!    of what it lacked at its grant) that has to wait for bytes, so a
//!    frame that arrived whole costs no clock and no timer; a frame that
//!    waits costs one clock reading, and one timer reset each time it
//!    waits again. Bytes of a frame under way are news from the peer
//!    before the frame is whole: each time the frame waits for more, its
//!    reader moves a count ([`Heard`], one atomic add; none for a frame
//!    that arrived whole), so that a process that closes silent peers
//!    (the scheduler's rule 4) does not close one whose big frame takes
//!    longer than its silence timeout and keeps up with this rule. A
//!    writer whose peer takes no byte for the stall timeout while
//!    something is queued for it gives up, and the connection closes: the
//!    peer stopped reading.
//! 10. **Backlog.** A writer counts the bytes queued for its peer and not yet
//!     taken by the socket. Above [`QUEUE_LIMIT`], a server stops reading
//!     that peer's requests until the backlog drains ([`Writer::room`]): a
//!     peer cannot make a process answer faster than it reads the answers.
//!     A writer given a cap ([`spawn_writer`]) refuses a frame once more
//!     than the cap is queued, and its connection closes.
//! 11. **Authentication.** [`connect`] and [`accept_detached`] return only
//!     once the handshake's authentication passed (`auth.rs` rules 2 to 4,
//!     `handshake.rs`): whatever is read or written on a connection after
//!     they return is between processes that proved the cluster's token, or
//!     that both run without one. A [`PeerPool`] proves the token of the
//!     process it belongs to.
//! 12. **Handshakes elsewhere.** A process takes the connections it
//!     accepts through their handshakes on a runtime other than the one
//!     that serves them ([`accept_detached`]): the scheduler, and a worker
//!     for its data port, each on a thread of its own ([`Handshakes`]), so
//!     that no peer that has not authenticated spends the scheduler's state
//!     thread or the worker's network thread. The authenticated connection
//!     is then deregistered from the first runtime's reactor and registered
//!     with the second's ([`Detached::attach`]); a TLS session moves whole,
//!     its socket swapped under it ([`Tcp`]). Nothing is read or written in
//!     between: what the peer sent meanwhile waits in the socket or,
//!     decrypted already, in the TLS session.

#[cfg(unix)]
mod quiet;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::Poll;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, AcquireError, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsStream;

use crate::handshake;
use crate::protocol::{
    decode_checked, decode_sized, frame_len, Batch, Bounded, FromPeer, Handshake, ProtocolError,
    Role, Scheme, ToPeer, WireKey, WorkerId, PAST_THE_BUDGET,
};
use crate::tls::{self, Acceptor, Connector};
use crate::{Auth, BuildId};

/// How long connecting to a peer may take, and how long the peer may take
/// to answer the handshake.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames up to this many bytes are read without a grant from the budget
/// (rule 8): heartbeats, reports and most batches. Also the first step of a
/// bigger frame's grant.
pub(crate) const SMALL_FRAME: usize = 64 << 10;

/// A deadline that is never reached (rule 9), for a stall timeout past
/// what a clock counts.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The smallest frame budget a scheduler takes (rule 8): what the biggest
/// small frame can take decoded, with room to spare. A smaller one, asked
/// for, counts as this: below it, a connection's first frame could not be
/// covered and closed the connection (a budget of 0 closed every one).
pub(crate) const MIN_FRAME_BUDGET: usize = 16 << 20;

/// The most keys one `GetData` names: 1 024 keys encode to 32 KiB and a
/// few bytes, so the frames of a data port's requests stay within
/// [`SMALL_FRAME`] ([`push_requests`]) and the data port reads them
/// without a grant from any budget ([`Limits::requests`]).
pub(crate) const REQUEST_KEYS: usize = 1024;

/// The biggest step of a frame's grant from the pool (rule 8): a frame is
/// granted what already arrived of it again, at least [`SMALL_FRAME`] and
/// at most this, so it holds at most twice its bytes that arrived, plus
/// [`SMALL_FRAME`].
pub(crate) const GRANT_STEP: usize = 1 << 20;

/// The bytes of frames over [`SMALL_FRAME`] a process receives and handles
/// at once (rule 8), 1 GiB: twice [`MAX_FRAME`](crate::protocol::MAX_FRAME),
/// so the lane, half of it, takes the biggest frame, and a process's
/// memory for frames stays bounded however many peers send them.
pub(crate) const FRAME_BUDGET: usize = 1 << 30;

/// The head start of a frame's progress deadline: its bytes must arrive
/// within this plus one second per [`MIN_FRAME_RATE`] of them (rule 9).
/// Also the longest a peer may leave bytes queued for it unread. A healthy
/// peer never stops for this long.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The slowest a frame may arrive, after [`STALL_TIMEOUT`] (rule 9), in
/// bytes per second: 1 MiB/s, so the biggest frame may take about 9
/// minutes, a frame of a few bytes the stall timeout, and a peer that
/// sends the head of a frame and then little is closed the stall timeout
/// plus a second per MiB of that head after the frame's start.
pub(crate) const MIN_FRAME_RATE: usize = 1 << 20;

/// The bytes queued for one peer above which a server stops reading that
/// peer's requests (rule 10), 64 MiB.
pub(crate) const QUEUE_LIMIT: usize = 64 << 20;

/// How many lines of one kind [`log_limited!`] prints per [`LOG_WINDOW`].
pub(crate) const LOG_BURST: u32 = 10;

/// The window of [`LOG_BURST`].
pub(crate) const LOG_WINDOW: Duration = Duration::from_secs(1);

/// The first wait after a failed `accept` (rule 5); it doubles after each
/// failure in a row, up to [`ACCEPT_BACKOFF_MAX`].
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The longest wait after a failed `accept`.
pub(crate) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Connections at most pre-auth on one listening socket (rule 6), unless
/// the open-file limit allows fewer ([`Caps::for_files`]).
pub(crate) const PRE_AUTH_LIMIT: usize = 256;

/// How long a reader keeps a data connection with nothing in flight before
/// it closes it (a later fetch opens another). Shorter than a data port's
/// own idle timeout, so in the normal course a reader closes its idle
/// connections itself and never races a server closing them.
pub(crate) const PEER_IDLE: Duration = Duration::from_secs(30);

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

/// A warning a peer can make this process log (rule 5), through
/// `tracing`: at most [`LOG_BURST`] of `kind` per [`LOG_WINDOW`]; the next
/// one logged after some were left out says how many in its `left_out`
/// field.
macro_rules! log_limited {
    ($kind:expr, $($arg:tt)*) => {
        if let Some(left_out) = $crate::net::log_admit($kind) {
            if left_out == 0 {
                tracing::warn!($($arg)*)
            } else {
                tracing::warn!(left_out, $($arg)*)
            }
        }
    };
}
pub(crate) use log_limited;

/// [`log_limited!`] at `info`: news a peer can make this process log often
/// (a connection made or closed), limited the same way (rule 5).
macro_rules! info_limited {
    ($kind:expr, $($arg:tt)*) => {
        if let Some(left_out) = $crate::net::log_admit($kind) {
            if left_out == 0 {
                tracing::info!($($arg)*)
            } else {
                tracing::info!(left_out, $($arg)*)
            }
        }
    };
}
pub(crate) use info_limited;

/// How many lines of one kind were printed in the current window, and how
/// many were left out since the last one printed (rule 5). Pure: the
/// caller gives the time.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    window: Option<std::time::Instant>,
    printed: u32,
    left_out: u64,
}

impl RateLimit {
    /// A line at `now`: `Some(n)` to print it, `n` lines having been left
    /// out since the last one printed; `None` to leave it out.
    pub(crate) fn admit(&mut self, now: std::time::Instant) -> Option<u64> {
        let fresh = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= LOG_WINDOW);
        if fresh {
            self.window = Some(now);
            self.printed = 0;
        }
        if self.printed < LOG_BURST {
            self.printed += 1;
            Some(std::mem::take(&mut self.left_out))
        } else {
            self.left_out += 1;
            None
        }
    }
}

/// The rate limits of every kind of line, for the whole process: a flood
/// of one kind is one flood, whichever role's socket it comes through.
static LOG_LIMITS: Mutex<Vec<(&'static str, RateLimit)>> = Mutex::new(Vec::new());

/// [`RateLimit::admit`] for a line of `kind`, now.
pub(crate) fn log_admit(kind: &'static str) -> Option<u64> {
    let mut limits = LOG_LIMITS.lock().unwrap_or_else(PoisonError::into_inner);
    let now = std::time::Instant::now();
    if let Some((_, limit)) = limits.iter_mut().find(|(k, _)| *k == kind) {
        return limit.admit(now);
    }
    let mut limit = RateLimit::default();
    let verdict = limit.admit(now);
    limits.push((kind, limit));
    verdict
}

/// The wait after each failed `accept` in a row (rule 5): from
/// [`ACCEPT_BACKOFF`], doubling up to [`ACCEPT_BACKOFF_MAX`]; a success
/// starts over. Pure.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: ACCEPT_BACKOFF,
        }
    }
}

impl Backoff {
    /// An attempt failed: how long to wait before the next.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(ACCEPT_BACKOFF_MAX);
        wait
    }

    /// An attempt succeeded.
    pub(crate) fn succeeded(&mut self) {
        self.next = ACCEPT_BACKOFF;
    }
}

/// A grant of budget for one frame (rule 8): its part of the pool and of
/// the lane, which return to the budget when it is dropped.
#[derive(Debug, Default)]
pub(crate) struct Grant {
    pool: Option<OwnedSemaphorePermit>,
    lane: Option<OwnedSemaphorePermit>,
}

impl Grant {
    /// The bytes it grants.
    pub(crate) fn bytes(&self) -> usize {
        let permits = |part: &Option<OwnedSemaphorePermit>| {
            part.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
        };
        permits(&self.pool) + permits(&self.lane)
    }

    fn add_pool(&mut self, more: OwnedSemaphorePermit) {
        add(&mut self.pool, more);
    }

    fn add_lane(&mut self, more: OwnedSemaphorePermit) {
        add(&mut self.lane, more);
    }
}

/// Adds `more` to a part of a grant; both come from the same semaphore.
fn add(part: &mut Option<OwnedSemaphorePermit>, more: OwnedSemaphorePermit) {
    match part {
        Some(part) => part.merge(more),
        None => *part = Some(more),
    }
}

/// The bytes of big frames a process may hold at once (rule 8), shared by
/// the connections of one scheduler, one worker or one client: a pool,
/// granted a step at a time as a frame's bytes arrive, and a lane, which
/// grants a frame all it still lacks when the pool has no room.
#[derive(Clone, Debug)]
pub(crate) struct Budget {
    pool: Arc<Semaphore>,
    lane: Arc<Semaphore>,
    /// The pool's bytes.
    pool_bytes: usize,
    /// The lane's bytes: half the budget, at most
    /// [`MAX_FRAME`](crate::protocol::MAX_FRAME), and the biggest frame
    /// read.
    lane_bytes: usize,
    total: usize,
}

impl Budget {
    /// A budget of `bytes` (at most what a semaphore counts: far more than
    /// any memory), half of it (at most
    /// [`MAX_FRAME`](crate::protocol::MAX_FRAME)) the lane.
    pub(crate) fn new(bytes: usize) -> Budget {
        let total = bytes.min(Semaphore::MAX_PERMITS);
        let lane_bytes = (total / 2).min(crate::protocol::MAX_FRAME);
        let pool_bytes = total - lane_bytes;
        Budget {
            pool: Arc::new(Semaphore::new(pool_bytes)),
            lane: Arc::new(Semaphore::new(lane_bytes)),
            pool_bytes,
            lane_bytes,
            total,
        }
    }

    /// The biggest frame read within this budget; a bigger one closes its
    /// connection (rule 8).
    pub(crate) fn largest_frame(&self) -> usize {
        self.lane_bytes
    }

    /// The bytes no frame holds now, in the pool and the lane.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.pool.available_permits() + self.lane.available_permits()
    }
}

/// What a process allows its authenticated connections (rules 8 and 9).
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) budget: Budget,
    /// [`STALL_TIMEOUT`] unless a scheduler's options say otherwise.
    pub(crate) stall: Duration,
}

impl Limits {
    /// A budget of `budget` bytes and a stall timeout of `stall`.
    pub(crate) fn new(budget: usize, stall: Duration) -> Limits {
        Limits {
            budget: Budget::new(budget),
            stall,
        }
    }

    /// The defaults: [`FRAME_BUDGET`] and [`STALL_TIMEOUT`].
    pub(crate) fn standard() -> Limits {
        Limits::new(FRAME_BUDGET, STALL_TIMEOUT)
    }

    /// What a data port allows the requests it reads (worker rule 13):
    /// frames of at most [`SMALL_FRAME`] (a budget of two of them, whose
    /// lane is one), read without a grant, and this stall timeout. Each
    /// call makes a budget of its own, for one connection: a request frame
    /// never holds the process's budget, so a reader that takes its
    /// answers slowly holds no grant the other frames wait for. What a
    /// frame's requests take decoded is held from the connection's budget
    /// (rule 8); a frame whose requests take more than all of it, or a
    /// bigger frame, closes the connection (requesters split their
    /// `GetData`s: [`push_requests`]).
    pub(crate) fn requests(&self) -> Limits {
        Limits::new(2 * SMALL_FRAME, self.stall)
    }

    /// The time a frame may have taken when `received` of its bytes
    /// arrived (rule 9): the stall timeout, and what they earned at
    /// [`MIN_FRAME_RATE`].
    fn allowed(&self, received: usize) -> Duration {
        self.stall.saturating_add(earned(received))
    }
}

/// The time `bytes` earn a frame at [`MIN_FRAME_RATE`] (rule 9), to the
/// nanosecond.
fn earned(bytes: usize) -> Duration {
    let rate = MIN_FRAME_RATE as u64;
    let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
    // The remainder is below 2^20, so times 10^9 it fits a u64.
    Duration::from_secs(bytes / rate) + Duration::from_nanos((bytes % rate) * 1_000_000_000 / rate)
}

/// Set while a connection's reader waits for something this side decides
/// (a grant, room in its writer): the peer is not to be blamed for the
/// silence meanwhile.
pub(crate) type Held = Arc<AtomicBool>;

/// Moved by a connection's reader each time a frame under way, some of
/// whose bytes arrived, has to wait for more (rule 9): a count that moved
/// since it was last looked at means bytes of a frame arrived meanwhile,
/// though the frame is not whole yet. Whole frames are news of their own.
pub(crate) type Heard = Arc<AtomicU64>;

/// A grant being waited for in the lane's line, kept across cancellations
/// so the frame keeps its place (rule 8).
type Waiting = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The grant a frame's messages wait for (rule 8), in the pool's line and
/// then the lane's, kept across cancellations so the frame keeps its
/// place ([`FrameReader::next_messages`]).
type Covering = Pin<Box<dyn Future<Output = Result<Grant, AcquireError>> + Send>>;

/// The messages of one frame, decoded and checked (`protocol` rule 5),
/// with what they take from the budget (rule 8).
#[derive(Debug)]
pub(crate) struct Messages<M> {
    pub(crate) msgs: Vec<M>,
    /// What the messages take decoded, given back to the budget when
    /// dropped: kept until they were handled. `None` when the frame holds
    /// nothing (an in-memory connection's).
    pub(crate) grant: Option<Grant>,
}

/// Reads frames from a stream, one at a time, within the limits of rules 8
/// and 9.
///
/// Cancel-safe: progress through a frame (and a grant being waited for) is
/// kept in `self`, so `next` can sit in a `select!` beside other branches
/// without losing bytes or its place.
pub(crate) struct FrameReader<R> {
    inner: R,
    prefix: [u8; 4],
    prefix_len: usize,
    /// The frame being read, once its length is known and admitted.
    want: Option<usize>,
    body: Vec<u8>,
    limits: Limits,
    /// The budget of the frame being read (as much of it as arrived, a
    /// step more), or of the one just returned.
    grant: Grant,
    waiting: Option<Waiting>,
    /// While a frame is under way, the length of its body from which its
    /// bytes earn it time (rule 9): none of it at its start, what had
    /// arrived when it was granted from the lane's line; `None` between
    /// frames.
    counted_from: Option<usize>,
    /// When its time started: the first read of it (since that grant) that
    /// had to wait, so a frame already buffered costs no clock and no
    /// timer. Its deadline is this plus [`Limits::allowed`] for its bytes
    /// received since.
    origin: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    timer_at: Option<Instant>,
    /// Whether `next` returned a frame not released yet.
    returned: bool,
    /// The grant the frame returned waits for, when its messages needed
    /// more than the budget had room for ([`FrameReader::next_messages`]).
    covering: Option<Covering>,
    held: Option<Held>,
    heard: Option<Heard>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of `inner` within `limits`.
    pub(crate) fn new(inner: R, limits: Limits) -> Self {
        FrameReader {
            inner,
            prefix: [0; 4],
            prefix_len: 0,
            want: None,
            body: Vec::new(),
            limits,
            grant: Grant::default(),
            waiting: None,
            counted_from: None,
            origin: None,
            timer: None,
            timer_at: None,
            returned: false,
            covering: None,
            held: None,
            heard: None,
        }
    }

    /// Sets `held` while the reader waits for a grant.
    pub(crate) fn held_by(mut self, held: Held) -> Self {
        self.held = Some(held);
        self
    }

    /// Moves `heard` each time a frame under way waits for more bytes
    /// (rule 9).
    pub(crate) fn heard_by(mut self, heard: Heard) -> Self {
        self.heard = Some(heard);
        self
    }

    /// Reads the next frame; `Ok(false)` on a clean end of stream between
    /// frames. The frame's body is then [`FrameReader::frame`]; its grant
    /// is released by the next call, unless [`FrameReader::take_grant`]
    /// took it along with the frame's messages.
    pub(crate) async fn next(&mut self) -> Result<bool, ProtocolError> {
        self.release();
        loop {
            match self.want {
                None if self.prefix_len == 4 => {
                    let len = frame_len(self.prefix)?;
                    self.admit(len)?;
                    self.body.clear();
                    self.want = Some(len);
                }
                None => {
                    let n = self.read_prefix().await?;
                    if n == 0 {
                        return if self.prefix_len == 0 {
                            Ok(false)
                        } else {
                            Err(ProtocolError::Closed)
                        };
                    }
                    if self.prefix_len == 0 {
                        // A frame starts: its time counts (rule 9).
                        self.counted_from = Some(0);
                    }
                    self.prefix_len += n;
                }
                Some(len) if self.body.len() == len => {
                    self.want = None;
                    self.prefix_len = 0;
                    self.counted_from = None;
                    self.origin = None;
                    self.returned = true;
                    return Ok(true);
                }
                Some(len) => {
                    let mut until = len;
                    if len > SMALL_FRAME {
                        // Granted as its bytes arrive (rule 8).
                        if self.body.len() >= self.grant.bytes() {
                            self.grow(len).await?;
                        }
                        until = self.grant.bytes().min(len);
                    }
                    let remaining = until - self.body.len();
                    self.body.reserve(remaining.min(1 << 20));
                    let n = self.read_body(remaining).await?;
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

    /// The grant of the frame `next` just read, to keep until its messages
    /// were handled (rule 8); `None` if it holds nothing.
    pub(crate) fn take_grant(&mut self) -> Option<Grant> {
        Some(std::mem::take(&mut self.grant)).filter(|grant| grant.bytes() > 0)
    }

    /// Reads the next frame, as [`FrameReader::next`], and decodes its
    /// messages, which hold from the budget what they take decoded (rule
    /// 8): the frame's grant made to cover that, given with them to keep
    /// until they were handled. `None` on a clean end of stream between
    /// frames. When neither the pool nor the lane has room now, the
    /// messages are dropped, the frame lets go of its whole grant and
    /// waits in line for all of it ([`FrameReader::start_cover`]), its
    /// connection not read meanwhile, and is decoded again once granted.
    ///
    /// Cancel-safe, as `next`: a frame under way, and one waiting for its
    /// grant, are kept in `self`, and the next call goes on with them
    /// (keeping the frame's place in line).
    ///
    /// # Errors
    ///
    /// As [`FrameReader::next`], and as [`decode_sized`] for the frame's
    /// body: [`ProtocolError::OutOfRange`] when its messages would take
    /// more than the whole budget, found before they take it.
    pub(crate) async fn next_messages<M: DeserializeOwned + Bounded>(
        &mut self,
    ) -> Result<Option<Messages<M>>, ProtocolError> {
        if self.covering.is_none() {
            if !self.next().await? {
                return Ok(None);
            }
            let (msgs, bytes) = decode_sized::<M>(&self.body, self.limits.budget.total)?;
            if self.try_cover(bytes)? {
                let grant = self.take_grant();
                return Ok(Some(Messages { msgs, grant }));
            }
            drop(msgs);
            self.start_cover(bytes)?;
        }
        self.await_cover().await?;
        let (msgs, _) = decode_sized::<M>(&self.body, self.limits.budget.total)?;
        let grant = self.take_grant();
        Ok(Some(Messages { msgs, grant }))
    }

    /// Makes the grant of the frame `next` just read cover `bytes`, what
    /// its messages take decoded (rule 8), if the budget has room now, in
    /// the pool or else in the lane: `Ok(false)` when it has not, and
    /// [`FrameReader::start_cover`] puts it in line. No lock and no
    /// allocation: an atomic operation on the budget, two when the pool has
    /// no room.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::OutOfRange`] if `bytes` is more than the whole
    /// budget.
    fn try_cover(&mut self, bytes: usize) -> Result<bool, ProtocolError> {
        let has = self.grant.bytes();
        let Some(more) = bytes.checked_sub(has).filter(|&more| more > 0) else {
            return Ok(true);
        };
        self.coverable(bytes)?;
        // At most `bytes`, which fits a u32.
        let more = more as u32;
        let budget = &self.limits.budget;
        if let Ok(granted) = budget.pool.clone().try_acquire_many_owned(more) {
            self.grant.add_pool(granted);
            return Ok(true);
        }
        // Taking from the lane here waits for nothing: the frame then
        // lacks nothing, as rule 8 has it of whatever holds the lane.
        if let Ok(granted) = budget.lane.clone().try_acquire_many_owned(more) {
            self.grant.add_lane(granted);
            return Ok(true);
        }
        Ok(false)
    }

    /// Puts the frame `next` just read in line for `bytes` (rule 8), after
    /// [`FrameReader::try_cover`] found no room: what the frame held is
    /// given back first, so that a frame waiting holds no grant; then it
    /// waits in the pool's line for as much of `bytes` as the pool holds,
    /// and in the lane's line for the rest (rule 8's argument against
    /// deadlock), in [`FrameReader::await_cover`]. Sets `held` until it is
    /// granted: the peer is not to blame.
    ///
    /// # Errors
    ///
    /// As [`FrameReader::try_cover`].
    fn start_cover(&mut self, bytes: usize) -> Result<(), ProtocolError> {
        self.grant = Grant::default();
        self.coverable(bytes)?;
        let budget = self.limits.budget.clone();
        // `bytes` fits a u32 and the whole budget: the pool's part does,
        // and the rest fits the lane.
        let from_pool = bytes.min(budget.pool_bytes);
        let from_lane = bytes - from_pool;
        self.covering = Some(Box::pin(async move {
            let mut grant = Grant::default();
            if from_pool > 0 {
                let pool = budget.pool.acquire_many_owned(from_pool as u32);
                grant.pool = Some(pool.await?);
            }
            if from_lane > 0 {
                let lane = budget.lane.acquire_many_owned(from_lane as u32);
                grant.lane = Some(lane.await?);
            }
            Ok(grant)
        }));
        if let Some(held) = &self.held {
            held.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Waits for the grant [`FrameReader::start_cover`] put the frame in
    /// line for, and makes it the frame's. Cancel-safe: the wait stays in
    /// `self`.
    async fn await_cover(&mut self) -> Result<(), ProtocolError> {
        let Some(covering) = self.covering.as_mut() else {
            return Ok(());
        };
        let granted = covering.await;
        self.covering = None;
        if let Some(held) = &self.held {
            held.store(false, Ordering::Release);
        }
        // The semaphores are never closed.
        self.grant = granted.map_err(|_| ProtocolError::Closed)?;
        Ok(())
    }

    /// Whether a frame's messages taking `bytes` can be covered at all: at
    /// most the whole budget, and a u32.
    fn coverable(&self, bytes: usize) -> Result<(), ProtocolError> {
        let total = self.limits.budget.total;
        if bytes <= total && u32::try_from(bytes).is_ok() {
            return Ok(());
        }
        Err(ProtocolError::OutOfRange {
            what: PAST_THE_BUDGET,
            value: u64::try_from(bytes).unwrap_or(u64::MAX),
            min: 0,
            max: u64::try_from(total).unwrap_or(u64::MAX),
        })
    }

    /// Whether a frame is under way: some of it was read, or it waits for
    /// its grant.
    pub(crate) fn in_frame(&self) -> bool {
        self.prefix_len > 0 && !self.returned
    }

    /// Lets go of the frame returned last: its grant, and its buffer if it
    /// was big, so an idle connection holds at most [`SMALL_FRAME`].
    fn release(&mut self) {
        if std::mem::take(&mut self.returned) {
            self.grant = Grant::default();
            // A frame left waiting for its grant (a caller that went on to
            // the next frame) waits no more.
            if self.covering.take().is_some() {
                if let Some(held) = &self.held {
                    held.store(false, Ordering::Release);
                }
            }
            if self.body.capacity() > SMALL_FRAME {
                self.body = Vec::new();
            }
        }
    }

    /// Admits a frame of `len` bytes (rule 8): any up to the budget's
    /// largest, granted later as its bytes arrive ([`FrameReader::grow`]).
    /// Its time (rule 9) goes on counting from its start: its length earns
    /// it nothing, its bytes do as they arrive.
    fn admit(&self, len: usize) -> Result<(), ProtocolError> {
        let largest = self.limits.budget.largest_frame();
        if len > SMALL_FRAME && len > largest {
            return Err(ProtocolError::FrameTooLarge { len, max: largest });
        }
        Ok(())
    }

    /// The time since its origin the frame under way may have taken by now
    /// (rule 9): the stall timeout, plus what its bytes received since the
    /// origin earned. `None` between frames.
    fn allowed(&self) -> Option<Duration> {
        let from = self.counted_from?;
        // Until its length is known, the body holds the frame before.
        let received = match self.want {
            Some(_) => self.body.len().saturating_sub(from),
            None => 0,
        };
        Some(self.limits.allowed(received))
    }

    /// Grants the frame of `len` bytes under way, all of whose granted
    /// bytes arrived, its next step (rule 8): from the pool, if it has room
    /// now, what arrived again (at least [`SMALL_FRAME`], at most
    /// [`GRANT_STEP`]); else all the frame still lacks, from the lane,
    /// waiting in its line if need be. Sets `held` while it waits: the peer
    /// is not to blame, and the frame's time counts again from the grant,
    /// its bytes earning time from there (rule 9).
    async fn grow(&mut self, len: usize) -> Result<(), ProtocolError> {
        let has = self.grant.bytes();
        // At most the lane (`admit`), far below u32::MAX.
        let lacks = (len - has) as u32;
        if self.waiting.is_none() {
            let budget = &self.limits.budget;
            let step = has.clamp(SMALL_FRAME, GRANT_STEP) as u32;
            if let Ok(granted) = budget.pool.clone().try_acquire_many_owned(step.min(lacks)) {
                self.grant.add_pool(granted);
                return Ok(());
            }
            match budget.lane.clone().try_acquire_many_owned(lacks) {
                Ok(granted) => {
                    self.grant.add_lane(granted);
                    return Ok(());
                }
                Err(_) => {
                    let lane = budget.lane.clone();
                    self.waiting = Some(Box::pin(lane.acquire_many_owned(lacks)));
                }
            }
        }
        if let Some(waiting) = self.waiting.as_mut() {
            if let Some(held) = &self.held {
                held.store(true, Ordering::Release);
            }
            let granted = waiting.await;
            self.waiting = None;
            if let Some(held) = &self.held {
                held.store(false, Ordering::Release);
            }
            // The semaphore is never closed.
            self.grant
                .add_lane(granted.map_err(|_| ProtocolError::Closed)?);
            self.origin = None;
            self.counted_from = Some(self.body.len());
        }
        Ok(())
    }

    async fn read_prefix(&mut self) -> Result<usize, ProtocolError> {
        let allowed = self.allowed();
        let FrameReader {
            inner,
            prefix,
            prefix_len,
            origin,
            timer,
            timer_at,
            heard,
            ..
        } = self;
        let read = inner.read(&mut prefix[*prefix_len..]);
        let clock = Clock {
            origin,
            timer,
            timer_at,
            heard: heard.as_deref(),
        };
        within(read, allowed, clock).await
    }

    async fn read_body(&mut self, remaining: usize) -> Result<usize, ProtocolError> {
        let allowed = self.allowed();
        let FrameReader {
            inner,
            body,
            origin,
            timer,
            timer_at,
            heard,
            ..
        } = self;
        let mut limited = inner.take(remaining as u64);
        let read = limited.read_buf(body);
        let clock = Clock {
            origin,
            timer,
            timer_at,
            heard: heard.as_deref(),
        };
        within(read, allowed, clock).await
    }
}

/// The time of a read or a write (rule 9), borrowed from its reader or
/// writer for [`within`].
struct Clock<'a> {
    /// When its time started; `None` until something had to wait.
    origin: &'a mut Option<Instant>,
    timer: &'a mut Option<Pin<Box<Sleep>>>,
    timer_at: &'a mut Option<Instant>,
    /// A reader's [`Heard`], moved when a read of a frame under way first
    /// has to wait.
    heard: Option<&'a AtomicU64>,
}

/// Runs `io` (a read or a write) until it completes or the time `allowed`
/// since the clock's origin is up (rule 9): the origin is set, to now, by
/// the first poll that has to wait, unless an earlier operation set it,
/// and the timer armed only then, so an operation that completes at once
/// costs neither a clock nor a timer. A frame's reads share its origin
/// and are allowed more as its bytes arrive: its deadline moves with them.
/// Each read that has to wait moves the clock's [`Heard`] once.
async fn within<F: Future<Output = std::io::Result<usize>>>(
    io: F,
    allowed: Option<Duration>,
    clock: Clock<'_>,
) -> Result<usize, ProtocolError> {
    let Clock {
        origin,
        timer,
        timer_at,
        mut heard,
    } = clock;
    let mut io = std::pin::pin!(io);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = io.as_mut().poll(cx) {
            return Poll::Ready(result.map_err(ProtocolError::Io));
        }
        let Some(allowed) = allowed else {
            return Poll::Pending;
        };
        if let Some(heard) = heard.take() {
            heard.fetch_add(1, Ordering::Relaxed);
        }
        let origin = *origin.get_or_insert_with(Instant::now);
        // A stall timeout past what a clock counts (an option set to
        // `Duration::MAX`) is never reached: a deadline a century away.
        let at = origin
            .checked_add(allowed)
            .unwrap_or_else(|| origin + NEVER);
        let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if *timer_at != Some(at) {
            sleep.as_mut().reset(at);
            *timer_at = Some(at);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(ProtocolError::Stalled(allowed))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The reading half of a connection, buffered.
pub(crate) type Reader = BufReader<ReadHalf>;

/// A connection's bytes: plain TCP, TLS over TCP (`tls.rs`), or a Unix
/// socket (rule 1). An enum rather than a boxed trait object, so that a
/// plain socket costs one branch per read or write and no allocation or
/// dynamic call.
pub(crate) enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS stream is much bigger than a socket.
    Tls(Box<TlsStream<Tcp>>),
    #[cfg(unix)]
    Unix(UnixStream),
}

/// The reading half of a [`Stream`].
pub(crate) enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<Tcp>>),
    /// Registered for reading only (rule 1).
    #[cfg(unix)]
    Unix(quiet::Reading),
}

/// The writing half of a [`Stream`].
pub(crate) enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<Tcp>>),
    /// Registered for reading only (rule 1).
    #[cfg(unix)]
    Unix(quiet::Writing),
}

/// The TCP socket under a TLS session. tokio's sockets belong to the
/// reactor of the runtime that registered them, and tokio-rustls's streams
/// cannot be taken apart and put together again, so a session that moves
/// from one runtime to another ([`Detached`]) keeps its state and swaps the
/// socket under it: deregistered from the first runtime's reactor
/// ([`Tcp::Moving`]), registered with the second's.
pub(crate) enum Tcp {
    Registered(TcpStream),
    /// Between runtimes: read and written by neither.
    Moving(std::net::TcpStream),
    /// Lost on the way (deregistering or registering failed).
    Lost,
}

impl Tcp {
    /// Deregisters the socket from its runtime's reactor.
    fn detach(&mut self) -> std::io::Result<()> {
        if let Tcp::Registered(stream) = std::mem::replace(self, Tcp::Lost) {
            *self = Tcp::Moving(stream.into_std()?);
        }
        Ok(())
    }

    /// Registers the socket with the reactor of the runtime this runs in.
    fn attach(&mut self) -> std::io::Result<()> {
        if let Tcp::Moving(stream) = std::mem::replace(self, Tcp::Lost) {
            *self = Tcp::Registered(TcpStream::from_std(stream)?);
        }
        Ok(())
    }

    fn registered(&mut self) -> std::io::Result<Pin<&mut TcpStream>> {
        match self {
            Tcp::Registered(stream) => Ok(Pin::new(stream)),
            Tcp::Moving(_) | Tcp::Lost => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().registered() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().registered() {
            Ok(stream) => stream.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().registered() {
            Ok(stream) => stream.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().registered() {
            Ok(stream) => stream.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Who is at the other end of a connection, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerAddr {
    /// A TCP peer at this address.
    Tcp(SocketAddr),
    /// A process of this machine, through a Unix socket.
    #[cfg(unix)]
    Unix,
    /// A client of this process, through memory.
    Memory,
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Tcp(address) => write!(f, "{address}"),
            #[cfg(unix)]
            PeerAddr::Unix => f.write_str("a local process (Unix socket)"),
            PeerAddr::Memory => f.write_str("this process"),
        }
    }
}

impl WriteHalf {
    /// Whether what `write` took may wait in a buffer of this side until a
    /// flush (TLS records not yet sent).
    fn buffers(&self) -> bool {
        matches!(self, WriteHalf::Tls(_))
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls(r) => Pin::new(r).poll_read(cx, buf),
            #[cfg(unix)]
            ReadHalf::Unix(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Tls(w) => Pin::new(w).poll_write(cx, buf),
            #[cfg(unix)]
            WriteHalf::Unix(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_flush(cx),
            #[cfg(unix)]
            WriteHalf::Unix(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_shutdown(cx),
            #[cfg(unix)]
            WriteHalf::Unix(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Runs the connecting side of the token handshake on this stream.
    async fn connector(
        &mut self,
        role: Role,
        expect: Role,
        build: BuildId,
        auth: &Auth,
    ) -> Result<Handshake, ProtocolError> {
        // Straight from the socket (or the TLS session): the handshake
        // reads exactly its fixed frames, so nothing of the peer's first
        // batch is consumed here.
        match self {
            Stream::Plain(s) => {
                let (mut read, mut write) = s.split();
                handshake::connector(&mut read, &mut write, role, expect, build, auth).await
            }
            Stream::Tls(s) => {
                let (mut read, mut write) = tokio::io::split(&mut **s);
                handshake::connector(&mut read, &mut write, role, expect, build, auth).await
            }
            #[cfg(unix)]
            Stream::Unix(s) => {
                let (mut read, mut write) = s.split();
                handshake::connector(&mut read, &mut write, role, expect, build, auth).await
            }
        }
    }

    /// Runs the accepting side of the token handshake on this stream.
    async fn acceptor(
        &mut self,
        me: Role,
        build: BuildId,
        auth: &Auth,
    ) -> Result<Handshake, ProtocolError> {
        // Straight from the socket into the handshake's fixed frames: no
        // read buffer of this side, nothing sized by the peer (rule 6).
        match self {
            Stream::Plain(s) => {
                let (mut read, mut write) = s.split();
                handshake::acceptor(&mut read, &mut write, me, build, auth).await
            }
            Stream::Tls(s) => {
                let (mut read, mut write) = tokio::io::split(&mut **s);
                handshake::acceptor(&mut read, &mut write, me, build, auth).await
            }
            #[cfg(unix)]
            Stream::Unix(s) => {
                let (mut read, mut write) = s.split();
                handshake::acceptor(&mut read, &mut write, me, build, auth).await
            }
        }
    }

    /// Splits the stream into its read half, buffered ([`reader`]), and its
    /// write half; a Unix socket registered for reading only (rule 1,
    /// [`quiet`]).
    ///
    /// # Errors
    ///
    /// If a Unix socket cannot be taken from the reactor, made
    /// non-blocking, or registered again.
    fn into_halves(self) -> std::io::Result<(Reader, WriteHalf)> {
        Ok(match self {
            Stream::Plain(s) => {
                let (read, write) = s.into_split();
                (reader(ReadHalf::Plain(read)), WriteHalf::Plain(write))
            }
            Stream::Tls(s) => {
                let (read, write) = tokio::io::split(*s);
                (reader(ReadHalf::Tls(read)), WriteHalf::Tls(write))
            }
            #[cfg(unix)]
            Stream::Unix(s) => unix_halves(s.into_std()?)?,
        })
    }
}

impl Stream {
    /// Deregisters the stream from the reactor of the runtime it was
    /// accepted on (rule 12).
    fn detach(self) -> std::io::Result<Loose> {
        match self {
            Stream::Plain(s) => Ok(Loose::Plain(s.into_std()?)),
            Stream::Tls(mut s) => {
                s.get_mut().0.detach()?;
                Ok(Loose::Tls(s))
            }
            #[cfg(unix)]
            Stream::Unix(s) => Ok(Loose::Unix(s.into_std()?)),
        }
    }
}

/// A [`Stream`] between runtimes (rule 12): its socket belongs to no
/// reactor; a TLS session keeps its state.
enum Loose {
    Plain(std::net::TcpStream),
    Tls(Box<TlsStream<Tcp>>),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream),
}

impl Loose {
    /// Registers the stream with the reactor of the runtime this runs in,
    /// split as [`Stream::into_halves`] splits it: a Unix socket is
    /// registered once, for reading only (rule 1), not first as a tokio
    /// socket.
    fn into_halves(self) -> std::io::Result<(Reader, WriteHalf)> {
        match self {
            Loose::Plain(s) => Stream::Plain(TcpStream::from_std(s)?).into_halves(),
            Loose::Tls(mut s) => {
                s.get_mut().0.attach()?;
                Stream::Tls(s).into_halves()
            }
            #[cfg(unix)]
            Loose::Unix(s) => unix_halves(s),
        }
    }
}

/// A Unix socket's halves, registered for reading only (rule 1,
/// [`quiet`]).
#[cfg(unix)]
fn unix_halves(socket: std::os::unix::net::UnixStream) -> std::io::Result<(Reader, WriteHalf)> {
    let (read, write) = quiet::split(socket)?;
    Ok((reader(ReadHalf::Unix(read)), WriteHalf::Unix(write)))
}

/// How long a TCP connection may sit idle before the kernel probes the peer.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Between unanswered probes; the kernel gives up after a few (Linux: 9).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Nagle off, keepalive on (see [`Stream::into_halves`]).
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::warn!("cannot turn TCP keepalive on: {e}");
    }
}

/// The buffered reader of a connection's reading half. Its socket is
/// already [`tune`]d (Nagle off, keepalive on): a peer whose machine
/// vanished (powered off, unplugged) without closing the connection is
/// noticed by the kernel within a few minutes and the connection fails,
/// for clients too (workers also send heartbeats, which catch a hung
/// process sooner). The read buffer is allocated here, after the handshake
/// (rule 6).
fn reader(read: ReadHalf) -> Reader {
    BufReader::with_capacity(64 << 10, read)
}

/// One end of an in-memory connection between a client and the scheduler
/// of one process: whole frames (length prefix included) are handed over as
/// they are, with no bytes copied through a pipe and no handshake (both ends
/// are the same build). Dropping an end closes the connection, as closing a
/// socket does. Nothing here is limited: both ends are the same program.
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
    /// Boxed: a reader is much bigger than an in-memory end.
    Stream(Box<FrameReader<Reader>>),
    Local {
        recv: mpsc::UnboundedReceiver<Vec<u8>>,
        /// The last frame received, length prefix included.
        current: Vec<u8>,
    },
}

impl Frames {
    pub(crate) fn stream(read: FrameReader<Reader>) -> Frames {
        Frames::Stream(Box::new(read))
    }

    pub(crate) fn local(recv: mpsc::UnboundedReceiver<Vec<u8>>) -> Frames {
        Frames::Local {
            recv,
            current: Vec::new(),
        }
    }

    /// Frames of no connection, none ever: what a connection's reader is
    /// replaced with once this side closed it, so that what the reader
    /// held or waited for from the budget (rule 8) goes with it.
    pub(crate) fn closed() -> Frames {
        Frames::local(mpsc::unbounded_channel().1)
    }

    /// As [`FrameReader::next_messages`]; cancel-safe in both forms. An
    /// in-memory connection's frames are this process's own: they hold no
    /// grant.
    pub(crate) async fn next_messages<M: DeserializeOwned + Bounded>(
        &mut self,
    ) -> Result<Option<Messages<M>>, ProtocolError> {
        match self {
            Frames::Stream(reader) => reader.next_messages().await,
            Frames::Local { recv, current } => match recv.recv().await {
                Some(frame) => {
                    *current = frame;
                    let body = current.get(4..).unwrap_or_default();
                    let msgs = decode_checked(body)?;
                    Ok(Some(Messages { msgs, grant: None }))
                }
                None => Ok(None),
            },
        }
    }

    /// The body of the frame `next_messages` just read.
    pub(crate) fn frame(&self) -> &[u8] {
        match self {
            Frames::Stream(reader) => reader.frame(),
            Frames::Local { current, .. } => current.get(4..).unwrap_or_default(),
        }
    }
}

/// A connection opened by [`connect`].
pub(crate) struct Connected {
    /// Its frames, within the limits given to `connect`.
    pub(crate) read: FrameReader<Reader>,
    /// Its write half, for [`spawn_writer`].
    pub(crate) write: WriteHalf,
    /// This end's address.
    pub(crate) local: SocketAddr,
    /// The peer's build (rule 4).
    pub(crate) build: BuildId,
}

/// Opens a connection to `address` (`host:port`, or a path for
/// [`Scheme::Unix`]), over TLS when given a
/// connector (the server's certificate must name `host`), as `role` of
/// `build` proving `auth`, and checks the answer comes from `expect` and
/// proves the same (rule 11); its frames are read within `limits`.
/// `timeout` bounds the connection,
/// [`HANDSHAKE_TIMEOUT`](handshake::HANDSHAKE_TIMEOUT) the TLS handshake
/// and the token handshake, each.
pub(crate) async fn connect(
    (scheme, address, tls): (Scheme, &str, Option<&Connector>),
    role: Role,
    expect: Role,
    build: BuildId,
    auth: &Auth,
    timeout: Duration,
    limits: &Limits,
) -> Result<Connected, ConnectError> {
    if scheme == Scheme::Unix {
        #[cfg(not(unix))]
        return Err(ConnectError::Io(unix_unsupported()));
        #[cfg(unix)]
        {
            let stream = match tokio::time::timeout(timeout, connect_unix(address)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(ConnectError::Io(e)),
                Err(_) => return Err(ConnectError::Timeout),
            };
            // This machine: what this side binds for others is on loopback.
            let local = SocketAddr::from(([127, 0, 0, 1], 0));
            let stream = Stream::Unix(stream);
            return handshake_as(stream, local, (role, expect, build, auth), limits).await;
        }
    }
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => return Err(ConnectError::Timeout),
    };
    let local = tcp.local_addr().map_err(ConnectError::Io)?;
    tune(&tcp);
    let stream = match tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let name = tls::server_name(address).map_err(ConnectError::Io)?;
            let dial = tls.connector.connect(name, Tcp::Registered(tcp));
            match tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, dial).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(TlsStream::Client(s))),
                Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                Err(_) => {
                    let after = handshake::HANDSHAKE_TIMEOUT;
                    return Err(ConnectError::Handshake(ProtocolError::Timeout(after)));
                }
            }
        }
    };
    handshake_as(stream, local, (role, expect, build, auth), limits).await
}

/// The token handshake of [`connect`] on `stream`, whose local end is at
/// `local`.
async fn handshake_as(
    mut stream: Stream,
    local: SocketAddr,
    (role, expect, build, auth): (Role, Role, BuildId, &Auth),
    limits: &Limits,
) -> Result<Connected, ConnectError> {
    let theirs = stream
        .connector(role, expect, build, auth)
        .await
        .map_err(|e| match e {
            // With TLS 1.3 a server checks the client's certificate after
            // the client's side of the TLS handshake is done: its refusal
            // arrives as the answer to the hello.
            ProtocolError::Io(e) if tls::is_tls(&e) => ConnectError::Tls(e),
            e => ConnectError::Handshake(e),
        })?;
    let (read, write) = stream.into_halves().map_err(ConnectError::Io)?;
    Ok(Connected {
        read: FrameReader::new(read, limits.clone()),
        write,
        local,
        build: theirs.build,
    })
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Io(std::io::Error),
    Timeout,
    /// The TLS handshake failed, or the peer refused this side's
    /// certificate.
    Tls(std::io::Error),
    Handshake(ProtocolError),
}

impl ConnectError {
    /// The crate's error for a failed connection to the `peer` at `addr`:
    /// an authentication failure names what to set (`Error::Auth`).
    pub(crate) fn into_error(self, addr: &str, peer: Role) -> crate::Error {
        let addr = addr.to_owned();
        match self {
            ConnectError::Io(reason) => crate::Error::Connection { addr, reason },
            ConnectError::Timeout => crate::Error::Timeout {
                what: "the scheduler to accept the connection",
                after: CONNECT_TIMEOUT,
            },
            ConnectError::Tls(reason) => crate::Error::Tls {
                addr,
                hint: tls::hint(&reason),
                reason,
            },
            ConnectError::Handshake(ProtocolError::TlsPeer) => crate::Error::TlsRequired { addr },
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
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}{}", tls::hint(e)),
            ConnectError::Handshake(e) => write!(f, "handshake failed: {}", Chain(e)),
        }
    }
}

/// An authenticated connection, as [`Detached::attach`] returns it.
pub(crate) struct Accepted {
    /// The peer's handshake: its role is one the caller serves; its build
    /// is the caller's to check (rule 4).
    pub(crate) hello: Handshake,
    /// Its frames, within the limits given to `attach`.
    pub(crate) read: FrameReader<Reader>,
    /// Its write half, for [`spawn_writer`].
    pub(crate) write: WriteHalf,
    /// Its place among the connections of its role (rule 7): keep it as
    /// long as the connection.
    pub(crate) slot: Slot,
}

/// Takes an accepted connection, pre-auth under `ticket`, through its
/// handshakes: TLS first when given an acceptor (`tls.rs` rule 2), then
/// the token handshake: checks the peer's, answers as `me` of `build`, requires the
/// peer to prove `auth` (rule 11) and, if the peer's role is one of
/// `serves` and has room, authenticates it. This is
/// the one place a connection switches from the limits of rule 6 to those
/// of the rules that follow. It runs on a runtime other than the one that
/// is to serve the connection (rule 12): the authenticated connection
/// comes back detached, to be [attached](Detached::attach) there, and its
/// frames are then read within the limits given to `attach`.
///
/// # Errors
///
/// Why the connection is to be closed: a bad, slow or refused handshake
/// ([`ProtocolError::Timeout`] after
/// [`HANDSHAKE_TIMEOUT`](handshake::HANDSHAKE_TIMEOUT) for both), a TLS
/// handshake failed ([`ProtocolError::Tls`]), a token not proved
/// ([`ProtocolError::Auth`]), eviction by a
/// newer connection ([`ProtocolError::Evicted`]), a role not served
/// ([`ProtocolError::Role`]) or full ([`ProtocolError::Full`]), or a socket
/// that cannot be deregistered ([`ProtocolError::Io`]).
pub(crate) async fn accept_detached(
    incoming: Incoming<'_>,
    ticket: PreAuth,
    me: Role,
    build: BuildId,
    auth: &Auth,
    serves: &[Role],
) -> Result<Detached, ProtocolError> {
    let (hello, stream, slot) = authenticate(incoming, ticket, (me, build, auth), serves).await?;
    Ok(Detached {
        hello,
        stream: stream.detach().map_err(ProtocolError::Io)?,
        slot,
    })
}

/// An authenticated connection between the runtime that accepted it and
/// the one that is to serve it (rule 12), from [`accept_detached`].
pub(crate) struct Detached {
    hello: Handshake,
    stream: Loose,
    slot: Slot,
}

impl Detached {
    /// The peer's handshake: its role is one the caller serves; its build
    /// is the caller's to check (rule 4), before the connection moves.
    pub(crate) fn hello(&self) -> &Handshake {
        &self.hello
    }

    /// The connection, registered with the reactor of the runtime this
    /// runs in; its frames are read within `limits`.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::Io`] if the socket cannot be registered.
    pub(crate) fn attach(self, limits: &Limits) -> Result<Accepted, ProtocolError> {
        let (read, write) = self.stream.into_halves().map_err(ProtocolError::Io)?;
        Ok(Accepted {
            hello: self.hello,
            read: FrameReader::new(read, limits.clone()),
            write,
            slot: self.slot,
        })
    }
}

/// The handshakes of [`accept_detached`]: the peer's hello, its stream and
/// its slot, once it authenticated as a role of `serves` that has room.
async fn authenticate(
    incoming: Incoming<'_>,
    ticket: PreAuth,
    (me, build, auth): (Role, BuildId, &Auth),
    serves: &[Role],
) -> Result<(Handshake, Stream, Slot), ProtocolError> {
    let PreAuth {
        id,
        gate,
        mut evicted,
    } = ticket;
    // Dropped on every way out, which takes the ticket out of the line.
    let ticket = Ticket { id, gate };
    let exchange = async {
        let mut stream = match incoming {
            Incoming::Tcp(stream, tls) => {
                tune(&stream);
                match tls {
                    None => Stream::Plain(stream),
                    Some(tls) => match tls.acceptor.accept(Tcp::Registered(stream)).await {
                        Ok(s) => Stream::Tls(Box::new(TlsStream::Server(s))),
                        Err(e) => return Err(ProtocolError::Tls(e)),
                    },
                }
            }
            #[cfg(unix)]
            Incoming::Unix(stream) => Stream::Unix(stream),
        };
        let theirs = stream.acceptor(me, build, auth).await?;
        Ok((stream, theirs))
    };
    // One deadline for both handshakes (rule 6).
    let (stream, theirs) = tokio::select! {
        done = tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, exchange) => match done {
            Ok(done) => done?,
            Err(_) => return Err(ProtocolError::Timeout(handshake::HANDSHAKE_TIMEOUT)),
        },
        _ = &mut evicted => return Err(ProtocolError::Evicted(ticket.gate.caps.pre_auth)),
    };
    if !serves.contains(&theirs.role) {
        return Err(ProtocolError::Role(theirs.role));
    }
    // Authenticated from here on (rule 6).
    let slot = ticket.authenticated(theirs.role)?;
    Ok((theirs, stream, slot))
}

/// A connection just accepted, for [`accept_detached`].
pub(crate) enum Incoming<'a> {
    /// Over TCP, through TLS when given an acceptor.
    Tcp(TcpStream, Option<&'a Acceptor>),
    /// Over a Unix socket, which has no TLS: a scheduler over TLS listens
    /// on none.
    #[cfg(unix)]
    Unix(UnixStream),
}

/// How many connections one listening socket takes (rules 6 and 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Connections of every kind at once.
    pub(crate) total: usize,
    /// Connections still in their handshake: room always kept for them.
    pub(crate) pre_auth: usize,
    /// Authenticated connections of one role: an eighth of the room for
    /// authenticated ones stays for the other roles.
    pub(crate) per_role: usize,
}

impl Caps {
    /// The caps of a socket that may use `1/share` of the open files of a
    /// process allowed `files` of them. Some files stay for everything else
    /// a process opens (its listeners, its runtime, its own files; a
    /// worker's tasks): an eighth of them, at least 64.
    pub(crate) fn for_files(files: usize, share: usize) -> Caps {
        let spare = (files / 8).max(64);
        let total = (files.saturating_sub(spare) / share.max(1)).max(16);
        let pre_auth = (total / 4).clamp(1, PRE_AUTH_LIMIT);
        let authenticated = total - pre_auth;
        Caps {
            total,
            pre_auth,
            per_role: authenticated - authenticated / 8,
        }
    }

    /// The caps for this process (see [`open_files`]).
    pub(crate) fn for_this_process(share: usize) -> Caps {
        Caps::for_files(open_files(), share)
    }
}

/// How many files this process may open (its soft `RLIMIT_NOFILE`, read
/// from `/proc/self/limits`); 1024, the usual default, where that cannot be
/// read, and at most 1 048 576.
pub(crate) fn open_files() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| parse_open_files(&text))
        .unwrap_or(1024)
        .min(1 << 20)
}

/// The soft limit of open files in the text of `/proc/self/limits`.
fn parse_open_files(text: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(usize::MAX);
    }
    soft.parse().ok()
}

/// The connections of one listening socket (rules 6 and 7): those in their
/// handshake, oldest first, and the authenticated ones by role.
#[derive(Clone, Debug)]
pub(crate) struct Gate {
    caps: Caps,
    state: Arc<Mutex<GateState>>,
}

#[derive(Debug, Default)]
struct GateState {
    next: u64,
    /// Pre-auth connections by age; dropping a sender closes its
    /// connection.
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
    /// Authenticated connections by role.
    roles: Vec<(Role, usize)>,
}

impl GateState {
    fn authenticated(&self) -> usize {
        self.roles.iter().map(|&(_, n)| n).sum()
    }

    fn role(&mut self, role: Role) -> &mut usize {
        let at = match self.roles.iter().position(|&(r, _)| r == role) {
            Some(at) => at,
            None => {
                self.roles.push((role, 0));
                self.roles.len() - 1
            }
        };
        &mut self.roles[at].1
    }
}

impl Gate {
    /// A gate with these caps.
    pub(crate) fn new(caps: Caps) -> Gate {
        Gate {
            caps,
            state: Arc::new(Mutex::new(GateState::default())),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a connection just accepted in, pre-auth: when the pre-auth
    /// connections are at their cap, or every connection is, the oldest
    /// pre-auth one is closed to make room (rule 6).
    ///
    /// # Errors
    ///
    /// [`ProtocolError::Full`] when every connection is authenticated and
    /// the total is reached: the new one is to be closed.
    pub(crate) fn admit(&self) -> Result<PreAuth, ProtocolError> {
        let mut state = self.state();
        let open = state.waiting.len() + state.authenticated();
        if (state.waiting.len() >= self.caps.pre_auth || open >= self.caps.total)
            && state.waiting.pop_first().is_none()
        {
            return Err(ProtocolError::Full {
                role: None,
                count: open,
                max: self.caps.total,
            });
        }
        let id = state.next;
        state.next += 1;
        let (evict, evicted) = oneshot::channel();
        state.waiting.insert(id, evict);
        Ok(PreAuth {
            id,
            gate: self.clone(),
            evicted,
        })
    }

    /// Closes the oldest connection still in its handshake, if any: the
    /// process ran out of file descriptors.
    pub(crate) fn evict_oldest(&self) -> bool {
        self.state().waiting.pop_first().is_some()
    }

    /// Connections open now: pre-auth, and authenticated of each role.
    #[cfg(test)]
    fn counts(&self) -> (usize, Vec<(Role, usize)>) {
        let state = self.state();
        (state.waiting.len(), state.roles.clone())
    }
}

/// A connection's place in line while it is pre-auth (rule 6), from
/// [`Gate::admit`] to [`accept_detached`].
pub(crate) struct PreAuth {
    id: u64,
    gate: Gate,
    /// Resolves when the gate closed this connection to make room.
    evicted: oneshot::Receiver<()>,
}

/// A pre-auth connection's entry in its gate, taken out when dropped.
struct Ticket {
    id: u64,
    gate: Gate,
}

impl Ticket {
    /// The connection passed its handshake as `role`: its slot, if the
    /// role has room (rule 7).
    fn authenticated(self, role: Role) -> Result<Slot, ProtocolError> {
        let caps = self.gate.caps;
        let mut state = self.gate.state();
        state.waiting.remove(&self.id);
        let authenticated = state.authenticated();
        let of_role = state.role(role);
        let full = if *of_role >= caps.per_role {
            Some((Some(role), *of_role, caps.per_role))
        } else if authenticated >= caps.total - caps.pre_auth {
            Some((None, authenticated, caps.total - caps.pre_auth))
        } else {
            None
        };
        if let Some((role, count, max)) = full {
            return Err(ProtocolError::Full { role, count, max });
        }
        *of_role += 1;
        drop(state);
        Ok(Slot {
            role,
            gate: self.gate.clone(),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.state().waiting.remove(&self.id);
    }
}

/// An authenticated connection's place among those of its role (rule 7),
/// given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    role: Role,
    gate: Gate,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        let of_role = state.role(self.role);
        *of_role = of_role.saturating_sub(1);
    }
}

/// Accepts connections on `listener` for ever, each pre-auth under a
/// ticket of `gate`, and hands them to `serve` (rule 6). Refusals and
/// failures are logged as `who` (rule 5); a failing `accept` backs off,
/// and when the process is out of file descriptors the oldest pre-auth
/// connection makes room.
pub(crate) async fn accept_loop<L: Listen>(
    listener: L,
    gate: Gate,
    who: &'static str,
    mut serve: impl FnMut(L::Stream, PeerAddr, PreAuth),
) {
    let mut backoff = Backoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff.succeeded();
                match gate.admit() {
                    Ok(ticket) => serve(stream, peer, ticket),
                    Err(e) => {
                        log_limited!("refused", "{who}: refusing connection from {peer}: {e}")
                    }
                }
            }
            Err(e) => {
                // EMFILE and ENFILE (the same numbers on Linux and macOS):
                // std has no stable kind for them yet.
                if matches!(e.raw_os_error(), Some(23 | 24)) {
                    gate.evict_oldest();
                }
                log_limited!("accept failed", "{who}: accept failed: {e}");
                tokio::time::sleep(backoff.failed()).await;
            }
        }
    }
}

/// A listening socket, for [`accept_loop`]: TCP or Unix.
pub(crate) trait Listen {
    /// What it accepts.
    type Stream;
    /// The next connection, and its peer for logs.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, PeerAddr)>> + Send;
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> std::io::Result<(TcpStream, PeerAddr)> {
        let (stream, address) = TcpListener::accept(self).await?;
        Ok((stream, PeerAddr::Tcp(address)))
    }
}

#[cfg(unix)]
impl Listen for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> std::io::Result<(UnixStream, PeerAddr)> {
        // A connecting Unix socket is unnamed: the peer is this machine.
        let (stream, _) = UnixListener::accept(self).await?;
        Ok((stream, PeerAddr::Unix))
    }
}

/// Frames smaller than this are copied together before a write.
const COALESCE: usize = 1 << 20;

/// A writer's count of the bytes queued for its peer (rule 10), and why it
/// gave up, if it did.
#[derive(Debug, Default)]
struct Queue {
    bytes: AtomicUsize,
    /// Woken when the backlog falls to [`QUEUE_LIMIT`], and when the writer
    /// ends.
    room: Notify,
    /// Set when the peer stopped reading (rule 9).
    stalled: OnceLock<(usize, Duration)>,
}

/// Hands whole frames to a connection's writer task (rule 2), counting the
/// bytes queued for the peer (rule 10); or to the other end of an in-memory
/// connection, uncounted.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// `None` for an in-memory connection.
    queue: Option<Arc<Queue>>,
    /// Bytes queued beyond which a frame is refused (rule 10).
    cap: Option<usize>,
}

impl Writer {
    /// A writer to the other end of an in-memory connection ([`LocalEnd`]).
    pub(crate) fn local(tx: mpsc::UnboundedSender<Vec<u8>>) -> Writer {
        Writer {
            tx,
            queue: None,
            cap: None,
        }
    }

    /// Queues `frame` (length prefix included).
    ///
    /// # Errors
    ///
    /// [`ProtocolError::Backlog`] when more than the writer's cap is queued
    /// already (rule 10); [`ProtocolError::NotReading`] when the writer gave
    /// up on a peer that stopped reading; [`ProtocolError::Closed`] when the
    /// connection is gone. Each means the connection is to be closed.
    pub(crate) fn send(&self, frame: Vec<u8>) -> Result<(), ProtocolError> {
        if let Some(queue) = &self.queue {
            let queued = queue.bytes.fetch_add(frame.len(), Ordering::AcqRel);
            if let Some(max) = self.cap.filter(|&max| queued > max) {
                queue.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
                return Err(ProtocolError::Backlog { queued, max });
            }
        }
        self.tx
            .send(frame)
            .map_err(|_| self.gone().unwrap_or(ProtocolError::Closed))
    }

    /// The bytes queued and not yet taken by the socket.
    pub(crate) fn queued(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| q.bytes.load(Ordering::Acquire))
    }

    /// Whether the backlog is within [`QUEUE_LIMIT`] (rule 10).
    pub(crate) fn has_room(&self) -> bool {
        self.queued() <= QUEUE_LIMIT
    }

    /// Waits until the backlog is within [`QUEUE_LIMIT`] (rule 10).
    ///
    /// # Errors
    ///
    /// Why the writer ended meanwhile, as [`Writer::send`] says.
    pub(crate) async fn room(&self) -> Result<(), ProtocolError> {
        let Some(queue) = &self.queue else {
            return Ok(());
        };
        loop {
            let notified = queue.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.tx.is_closed() {
                return Err(self.gone().unwrap_or(ProtocolError::Closed));
            }
            if self.has_room() {
                return Ok(());
            }
            notified.await;
        }
    }

    /// Resolves when the connection's writing side ended, with the reason
    /// when this side gave up on the peer (rule 9): `None` when the socket
    /// failed or closed, which its reader sees too.
    pub(crate) async fn closed(&self) -> Option<ProtocolError> {
        self.tx.closed().await;
        self.gone()
    }

    fn gone(&self) -> Option<ProtocolError> {
        let &(queued, after) = self.queue.as_ref()?.stalled.get()?;
        Some(ProtocolError::NotReading { queued, after })
    }
}

/// Spawns the task that writes frames to `write`, coalescing whatever is
/// queued into one write, and gives up on a peer that takes no byte for
/// `limits.stall` (rule 9). With a `cap`, [`Writer::send`] refuses frames
/// once more than `cap` bytes are queued (rule 10): for peers whose answers
/// are small, so that only a peer that stopped reading gets there. The task
/// ends when every sender is dropped or the socket fails.
pub(crate) fn spawn_writer(mut write: WriteHalf, limits: &Limits, cap: Option<usize>) -> Writer {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let queue = Arc::new(Queue::default());
    let stall = limits.stall;
    let counted = queue.clone();
    tokio::spawn(async move {
        let queue = counted;
        let mut out = Out {
            write: &mut write,
            queue: &queue,
            stall,
            timer: None,
            timer_at: None,
        };
        let mut buf: Vec<u8> = Vec::new();
        while let Some(first) = rx.recv().await {
            let result = if first.len() >= COALESCE {
                out.write_counted(&first).await
            } else {
                // Coalesce whatever else is queued into one syscall.
                buf.extend_from_slice(&first);
                while buf.len() < COALESCE {
                    match rx.try_recv() {
                        Ok(f) => buf.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                let r = out.write_counted(&buf).await;
                buf.clear();
                r
            };
            if result.is_err() {
                break;
            }
        }
        drop(out);
        // Later sends fail, and what was queued is freed now.
        rx.close();
        while rx.try_recv().is_ok() {}
        drop(rx);
        queue.room.notify_waiters();
        let _ = write.shutdown().await;
    });
    Writer {
        tx,
        queue: Some(queue),
        cap,
    }
}

/// A writer task's socket, its count and its stall timer.
struct Out<'a> {
    write: &'a mut WriteHalf,
    queue: &'a Queue,
    stall: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    timer_at: Option<Instant>,
}

impl Out<'_> {
    /// Writes `buf`, taking each chunk the socket accepts off the backlog
    /// (rule 10); fails when the socket does, or takes nothing for the
    /// stall timeout (rule 9).
    async fn write_counted(&mut self, mut buf: &[u8]) -> Result<(), ()> {
        while !buf.is_empty() {
            // Each write may wait the stall timeout: progress is what counts.
            let mut origin = None;
            let Out {
                write,
                queue,
                stall,
                timer,
                timer_at,
            } = self;
            let clock = Clock {
                origin: &mut origin,
                timer,
                timer_at,
                heard: None,
            };
            let written = within(write.write(buf), Some(*stall), clock);
            let n = match written.await {
                Ok(n) if n > 0 => n,
                Err(ProtocolError::Stalled(after)) => {
                    let queued = queue.bytes.load(Ordering::Acquire);
                    let _ = queue.stalled.set((queued, after));
                    return Err(());
                }
                _ => return Err(()),
            };
            buf = &buf[n..];
            let before = queue.bytes.fetch_sub(n, Ordering::AcqRel);
            if before > QUEUE_LIMIT && before - n <= QUEUE_LIMIT {
                queue.room.notify_waiters();
            }
        }
        if self.write.buffers() {
            // TLS keeps the records the socket did not take yet: they go
            // out now, not with the next frame, within the stall timeout.
            let mut origin = None;
            let Out {
                write,
                stall,
                timer,
                timer_at,
                ..
            } = self;
            let flushed = async { write.flush().await.map(|()| 0) };
            let clock = Clock {
                origin: &mut origin,
                timer,
                timer_at,
                heard: None,
            };
            within(flushed, Some(*stall), clock).await.map_err(|_| ())?;
        }
        Ok(())
    }
}

/// Sends a batch's frames to a writer.
///
/// # Errors
///
/// As [`Writer::send`], for the first frame refused; the rest are dropped.
pub(crate) fn send_batch(writer: &Writer, batch: &mut Batch) -> Result<(), ProtocolError> {
    for frame in batch.take_frames() {
        writer.send(frame)?;
    }
    Ok(())
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
    /// What the answers of its frame take decoded, held from the budget
    /// (rule 8) until every one of them was handled: dropped; `None` for
    /// an answer that came with no frame (a lost fetch).
    pub(crate) _grant: Option<Arc<Grant>>,
}

/// Connections to workers' data ports, one per worker, opened on first use
/// and closed after [`PEER_IDLE`] with nothing in flight (a data port closes
/// idle connections too, later: the next request opens another).
///
/// Requests are batched: [`PeerPool::request`] only queues; [`PeerPool::flush`]
/// sends one `GetData` per worker. Answers arrive on the channel given to
/// [`PeerPool::new`] (or returned by [`PeerPool::renewed`]); every
/// requested key gets exactly one answer.
pub(crate) struct PeerPool {
    addresses: HashMap<WorkerId, String>,
    conns: HashMap<WorkerId, mpsc::UnboundedSender<Vec<WireKey>>>,
    pending: HashMap<WorkerId, Vec<WireKey>>,
    answers: mpsc::UnboundedSender<Fetched>,
    /// The build this process announces, and expects of data ports.
    build: BuildId,
    /// What this process proves to data ports (rule 11).
    auth: Arc<Auth>,
    /// Set when the cluster is TLS (`tls.rs` rule 1).
    tls: Option<Connector>,
    /// The process's limits, for the values it reads.
    limits: Limits,
    /// How long a connection with nothing in flight stays open.
    idle: Duration,
}

impl PeerPool {
    /// A pool for a process of `build` proving `auth`, over TLS when given
    /// a connector, reading within `limits`.
    pub(crate) fn new(
        answers: mpsc::UnboundedSender<Fetched>,
        build: BuildId,
        auth: Arc<Auth>,
        tls: Option<Connector>,
        limits: Limits,
    ) -> PeerPool {
        PeerPool {
            addresses: HashMap::new(),
            conns: HashMap::new(),
            pending: HashMap::new(),
            answers,
            build,
            auth,
            tls,
            limits,
            idle: PEER_IDLE,
        }
    }

    /// An empty pool made as this one was, with the channel its fetches
    /// answer on: none of this pool's answers, early or late, arrive there.
    pub(crate) fn renewed(&self) -> (PeerPool, mpsc::UnboundedReceiver<Fetched>) {
        let (answers, receiver) = mpsc::unbounded_channel();
        let pool = PeerPool {
            idle: self.idle,
            ..PeerPool::new(
                answers,
                self.build,
                self.auth.clone(),
                self.tls.clone(),
                self.limits.clone(),
            )
        };
        (pool, receiver)
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
                    _grant: None,
                });
            }
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(keys);
        self.conns.insert(peer, tx);
        tokio::spawn(peer_connection(
            Peer {
                id: peer,
                address,
                build: self.build,
                auth: self.auth.clone(),
                tls: self.tls.clone(),
                limits: self.limits.clone(),
                idle: self.idle,
            },
            rx,
            self.answers.clone(),
        ));
    }
}

/// Where and how to reach one data port.
struct Peer {
    id: WorkerId,
    address: String,
    build: BuildId,
    auth: Arc<Auth>,
    tls: Option<Connector>,
    limits: Limits,
    idle: Duration,
}

/// Appends `keys` to `out` as `GetData`s of at most [`REQUEST_KEYS`] keys
/// each, none sharing a frame past [`SMALL_FRAME`]: what a data port reads
/// ([`Limits::requests`]).
pub(crate) fn push_requests(out: &mut Batch, keys: Vec<WireKey>) {
    if keys.len() <= REQUEST_KEYS {
        return out.push_within(&ToPeer::GetData { keys }, SMALL_FRAME);
    }
    for part in keys.chunks(REQUEST_KEYS) {
        let keys = part.to_vec();
        out.push_within(&ToPeer::GetData { keys }, SMALL_FRAME);
    }
}

/// One connection to a data port: sends `GetData` batches, forwards
/// answers; closes itself once idle for `peer.idle`.
async fn peer_connection(
    peer: Peer,
    mut requests: mpsc::UnboundedReceiver<Vec<WireKey>>,
    answers: mpsc::UnboundedSender<Fetched>,
) {
    let Peer {
        id: from,
        address,
        build,
        auth,
        tls,
        limits,
        idle,
    } = peer;
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
                    from,
                    key,
                    result: FetchResult::Lost,
                    _grant: None,
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
    let connected = match connect(
        (Scheme::Tcp, &address, tls.as_ref()),
        Role::Peer,
        Role::DataServer,
        build,
        &auth,
        CONNECT_TIMEOUT,
        &limits,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            log_limited!(
                "fetch failed",
                "could not fetch data from {from} at {address}: {e}"
            );
            lose_all(&mut in_flight, &mut requests);
            return;
        }
    };
    if connected.build != build {
        // Rule 4: its values come from other code. The scheduler names only
        // workers of this build, so this is a stale address reused.
        let e = ProtocolError::Build {
            ours: build,
            theirs: connected.build,
        };
        log_limited!(
            "fetch failed",
            "could not fetch data from {from} at {address}: {e}"
        );
        lose_all(&mut in_flight, &mut requests);
        return;
    }
    // Requests go through a writer task, so answers are read while a big
    // request is written (rule 10: a data port stops reading requests while
    // its answers pile up).
    let writer = spawn_writer(connected.write, &limits, None);
    let mut read = connected.read;
    let mut out = Batch::default();
    push_requests(&mut out, first);
    let _ = send_batch(&writer, &mut out);
    let mut last_active = Instant::now();
    // Set once idle: no new request is taken; ends when nothing is in
    // flight.
    let mut closing = false;
    loop {
        if closing && in_flight.is_empty() {
            return;
        }
        let idle_at = last_active + idle;
        tokio::select! {
            req = requests.recv(), if !closing => {
                let Some(keys) = req else {
                    lose_all(&mut in_flight, &mut requests);
                    return;
                };
                for &key in &keys {
                    *in_flight.entry(key).or_default() += 1;
                }
                push_requests(&mut out, keys);
                while let Ok(keys) = requests.try_recv() {
                    for &key in &keys {
                        *in_flight.entry(key).or_default() += 1;
                    }
                    push_requests(&mut out, keys);
                }
                let _ = send_batch(&writer, &mut out);
                last_active = Instant::now();
            }
            // What the answers take decoded is held from the budget until
            // the pool's owner handled them (rule 8); a frame waiting for
            // its grant keeps its place while requests go out.
            got = read.next_messages::<FromPeer>() => {
                let got = match got {
                    Ok(Some(got)) => Ok(got),
                    Ok(None) => Err(ProtocolError::Closed),
                    Err(e) => Err(e),
                };
                let Messages { msgs, grant } = match got {
                    Ok(got) => got,
                    Err(e) => {
                        if !in_flight.is_empty() {
                            log_limited!(
                                "data connection lost",
                                "lost data connection to {from} at {address}: {}",
                                Chain(&e)
                            );
                        }
                        lose_all(&mut in_flight, &mut requests);
                        return;
                    }
                };
                last_active = Instant::now();
                let grant = grant.map(Arc::new);
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
                    let _grant = grant.clone();
                    let _ = answers.send(Fetched { from, key, result, _grant });
                }
            }
            why = writer.closed() => {
                if let Some(e) = why {
                    log_limited!(
                        "data connection lost",
                        "lost data connection to {from} at {address}: {e}"
                    );
                }
                lose_all(&mut in_flight, &mut requests);
                return;
            }
            () = tokio::time::sleep_until(idle_at), if in_flight.is_empty() && !closing => {
                // Idle: take no more requests (the pool opens another
                // connection for the next), but answer any that raced in.
                closing = true;
                requests.close();
                while let Ok(keys) = requests.try_recv() {
                    for &key in &keys {
                        *in_flight.entry(key).or_default() += 1;
                    }
                    push_requests(&mut out, keys);
                }
                let _ = send_batch(&writer, &mut out);
            }
        }
    }
}

/// A bound Unix socket, as [`listen_unix`] makes it; none exists on a
/// system without Unix sockets.
#[cfg(unix)]
pub(crate) type UnixBound = std::os::unix::net::UnixListener;
/// A bound Unix socket; none exists on a system without Unix sockets.
#[cfg(not(unix))]
pub(crate) type UnixBound = std::convert::Infallible;

/// A Unix socket's listener, for [`accept_loop`].
#[cfg(unix)]
pub(crate) type UnixListening = UnixListener;
/// A Unix socket's listener; none exists on a system without them.
#[cfg(not(unix))]
pub(crate) type UnixListening = std::convert::Infallible;

/// `bound`, for tokio (on the runtime that will serve it).
pub(crate) fn listening(bound: UnixBound) -> std::io::Result<UnixListening> {
    #[cfg(unix)]
    return UnixListener::from_std(bound);
    #[cfg(not(unix))]
    match bound {}
}

/// Unix sockets, on a system that has none.
#[cfg(not(unix))]
pub(crate) fn unix_unsupported() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "Unix sockets need a Unix system: use a `tcp://` address",
    )
}

/// Binds a Unix socket at `path`, non-blocking for tokio, with the guard
/// that removes its file. On Linux, a path `@NAME` is NAME in the abstract
/// namespace ([`ABSTRACT`]): no file, nothing to remove. A socket file
/// nothing listens on any more (its process was killed) is taken over; one
/// something answers on, or any other file, is an error.
#[cfg(unix)]
pub(crate) fn listen_unix(
    path: &std::path::Path,
) -> std::io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    use std::os::unix::net::UnixListener;
    #[cfg(target_os = "linux")]
    if let Some(name) = abstract_name(path) {
        use std::os::linux::net::SocketAddrExt as _;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        let listener = UnixListener::bind_addr(&address)?;
        listener.set_nonblocking(true)?;
        return Ok((listener, SocketFile(None)));
    }
    let listener = match UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && is_stale_socket(path) => {
            std::fs::remove_file(path)?;
            UnixListener::bind(path)?
        }
        bound => bound?,
    };
    let file = SocketFile(Some(path.to_owned()));
    listener.set_nonblocking(true)?;
    Ok((listener, file))
}

/// `path` as processes started anywhere find it: absolute (an abstract
/// name as it is).
#[cfg(unix)]
pub(crate) fn unix_path(path: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    match abstract_name(path) {
        Some(_) => Ok(path.to_owned()),
        None => std::path::absolute(path),
    }
}

/// How a Unix socket path names a socket of Linux's abstract namespace:
/// `@NAME` (as `ss` shows them).
pub(crate) const ABSTRACT: char = '@';

/// The name of an abstract socket `path` stands for, on Linux.
#[cfg(unix)]
fn abstract_name(path: &std::path::Path) -> Option<&[u8]> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let bytes = path.as_os_str().as_encoded_bytes();
    bytes.strip_prefix(&[ABSTRACT as u8])
}

/// Connects to the Unix socket at `path` (see [`listen_unix`] for `@NAME`).
#[cfg(unix)]
async fn connect_unix(path: &str) -> std::io::Result<UnixStream> {
    match abstract_name(path.as_ref()) {
        // Tokio reads a leading NUL as the abstract namespace.
        Some(name) => {
            use std::os::unix::ffi::OsStrExt as _;
            let nul = [&[0], name].concat();
            UnixStream::connect(std::ffi::OsStr::from_bytes(&nul)).await
        }
        None => UnixStream::connect(path).await,
    }
}

/// Whether `path` is a Unix socket that refuses connections: its
/// listener is gone.
#[cfg(unix)]
fn is_stale_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    is_socket
        && std::os::unix::net::UnixStream::connect(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The file of a Unix socket [`listen_unix`] bound (none in the abstract
/// namespace), removed when dropped.
#[derive(Debug)]
pub(crate) struct SocketFile(Option<std::path::PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
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

/// A thread of its own, `rask-handshake`, whose single-threaded runtime
/// accepts a process's connections and takes them through their
/// handshakes ([`accept_detached`], rule 12). Dropping it stops the
/// runtime, which closes the listening sockets and the connections still
/// in their handshakes, and waits for the thread to end.
pub(crate) struct Handshakes {
    runtime: tokio::runtime::Handle,
    /// Dropped to stop the runtime.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handshakes {
    /// Starts the thread.
    ///
    /// # Errors
    ///
    /// If the runtime cannot be built or the thread started.
    pub(crate) fn start() -> std::io::Result<Handshakes> {
        let runtime = runtime()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rask-handshake".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                });
            })?;
        Ok(Handshakes {
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The thread's runtime: listening sockets are to be registered with
    /// its reactor ([`tokio::runtime::Handle::enter`]), their accept loops
    /// spawned on it.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }
}

impl Drop for Handshakes {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // Nothing on the thread holds this; should it ever, it cannot
            // wait for itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame;

    /// Every wait in these tests gives up after this long.
    const WAIT: Duration = Duration::from_secs(30);

    /// Runs `test` on a runtime like the roles', bounded by [`WAIT`].
    fn run<F: Future<Output = ()>>(test: F) {
        runtime().unwrap().block_on(async {
            tokio::time::timeout(WAIT, test)
                .await
                .expect("the test finished in time");
        });
    }

    /// A frame of `len` bytes of junk, prefix included.
    fn junk(len: usize) -> Vec<u8> {
        let mut bytes = (len as u32).to_le_bytes().to_vec();
        bytes.resize(4 + len, 0xab);
        bytes
    }

    #[test]
    fn a_kind_of_line_prints_a_burst_a_window_then_says_what_it_left_out() {
        let t0 = std::time::Instant::now();
        let mut limit = RateLimit::default();
        for _ in 0..LOG_BURST {
            assert_eq!(limit.admit(t0), Some(0));
        }
        for i in 0..500u32 {
            assert_eq!(limit.admit(t0 + Duration::from_micros(u64::from(i))), None);
        }
        let later = t0 + LOG_WINDOW;
        assert_eq!(limit.admit(later), Some(500));
        assert_eq!(limit.admit(later), Some(0));
        // A quiet kind prints every line.
        let mut quiet = RateLimit::default();
        for s in 0..30 {
            assert_eq!(quiet.admit(t0 + Duration::from_secs(s)), Some(0));
        }
    }

    #[test]
    fn accept_backs_off_from_10_ms_to_a_second_and_starts_over_on_success() {
        let mut backoff = Backoff::default();
        let waits: Vec<u64> = (0..10)
            .map(|_| backoff.failed().as_millis() as u64)
            .collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), ACCEPT_BACKOFF);
    }

    #[test]
    fn the_file_limit_is_the_soft_one_of_proc_self_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files(text), Some(1024));
        let unlimited = text.replace("1024  ", "unlimited");
        assert_eq!(parse_open_files(&unlimited), Some(usize::MAX));
        assert_eq!(parse_open_files("Max processes 10 10"), None);
        // This machine's, whatever it is.
        assert!(open_files() >= 16);
    }

    #[test]
    fn connection_caps_follow_the_file_limit() {
        // The usual default: an eighth kept for the rest of the process.
        let caps = Caps::for_files(1024, 1);
        assert_eq!(caps.total, 896);
        assert_eq!(caps.pre_auth, 224);
        assert_eq!(caps.per_role, 672 - 84);
        // A data port takes half of what is left.
        assert_eq!(Caps::for_files(1024, 2).total, 448);
        // Many files: at most 256 pre-auth.
        let big = Caps::for_files(1 << 20, 1);
        assert_eq!(big.pre_auth, PRE_AUTH_LIMIT);
        assert!(big.per_role < big.total - big.pre_auth);
        // Hardly any: still some room for everyone.
        let tiny = Caps::for_files(10, 1);
        assert_eq!((tiny.total, tiny.pre_auth), (16, 4));
        assert!(tiny.per_role > 0);
    }

    #[test]
    fn a_new_connection_closes_the_oldest_one_still_in_its_handshake() {
        let caps = Caps {
            total: 6,
            pre_auth: 2,
            per_role: 3,
        };
        let gate = Gate::new(caps);
        let mut first = gate.admit().unwrap();
        let mut second = gate.admit().unwrap();
        assert!(first
            .evicted
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
        let third = gate.admit().unwrap();
        // The first one is closed; the others wait on.
        assert_eq!(
            first.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(
            second.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(gate.counts().0, 2);
        // Authenticated: out of the line, into its role's count.
        let ticket = |t: PreAuth| Ticket {
            id: t.id,
            gate: t.gate,
        };
        let worker = ticket(second).authenticated(Role::Worker).unwrap();
        let client = ticket(third).authenticated(Role::Client).unwrap();
        assert_eq!(
            gate.counts(),
            (0, vec![(Role::Worker, 1), (Role::Client, 1)])
        );
        drop((worker, client, first));
        assert_eq!(
            gate.counts(),
            (0, vec![(Role::Worker, 0), (Role::Client, 0)])
        );
    }

    #[test]
    fn authenticated_connections_are_capped_per_role_and_in_total() {
        let caps = Caps {
            total: 6,
            pre_auth: 2,
            per_role: 3,
        };
        let gate = Gate::new(caps);
        let auth = |role| {
            let t = gate.admit().unwrap();
            Ticket {
                id: t.id,
                gate: t.gate,
            }
            .authenticated(role)
        };
        let clients: Vec<Slot> = (0..3).map(|_| auth(Role::Client).unwrap()).collect();
        // A fourth client: its role is full; a worker still gets in.
        assert!(matches!(
            auth(Role::Client),
            Err(ProtocolError::Full {
                role: Some(Role::Client),
                count: 3,
                max: 3
            })
        ));
        let worker = auth(Role::Worker).unwrap();
        // Four authenticated of at most six, two kept for handshakes: full.
        assert!(matches!(
            auth(Role::Worker),
            Err(ProtocolError::Full { role: None, .. })
        ));
        // New connections still get in line, pre-auth.
        let waiting: Vec<PreAuth> = (0..2).map(|_| gate.admit().unwrap()).collect();
        assert!(gate.admit().is_ok(), "the oldest makes room");
        drop((clients, worker, waiting));
        assert!(auth(Role::Client).is_ok());
    }

    /// A reader of `bytes` (kept open after them: no end of stream)
    /// within `limits`, and what it sets while it waits for a grant.
    fn reader_of(bytes: Vec<u8>, limits: &Limits) -> (FrameReader<tokio::io::DuplexStream>, Held) {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let held = Held::default();
        let read = FrameReader::new(rx, limits.clone()).held_by(held.clone());
        tokio::spawn(async move {
            let _ = tx.write_all(&bytes).await;
            std::future::pending::<()>().await;
        });
        (read, held)
    }

    /// Waits (within the test's bound) until `done`.
    async fn until(mut done: impl FnMut() -> bool) {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn big_frames_are_granted_as_they_arrive_wait_in_the_lane_and_too_big_ones_are_refused() {
        run(async {
            // A pool of two small frames' worth and a lane as big.
            let limits = Limits::new(4 * SMALL_FRAME, Duration::from_secs(30));
            let budget = limits.budget.clone();
            let big = 2 * SMALL_FRAME;
            assert_eq!(budget.largest_frame(), big);
            // Announced, a few bytes sent: it holds one step, not its length.
            let mut announced = junk(big);
            announced.truncate(10);
            let (mut part, _) = reader_of(announced, &limits);
            let waiting = tokio::time::timeout(Duration::from_millis(50), part.next()).await;
            assert!(waiting.is_err());
            assert!(part.in_frame());
            assert_eq!(budget.available(), 4 * SMALL_FRAME - SMALL_FRAME);
            drop(part);
            assert_eq!(budget.available(), 4 * SMALL_FRAME);
            // Sent whole: granted step by step from the pool, all of it.
            let (mut a, _) = reader_of(junk(big), &limits);
            assert!(a.next().await.unwrap());
            assert_eq!(a.frame().len(), big);
            let a_grant = a.take_grant().expect("a big frame holds a grant");
            assert_eq!(a_grant.bytes(), big);
            assert_eq!(budget.pool.available_permits(), 0);
            // The pool has no room: the lane grants all `b` lacks at once.
            let (mut b, _) = reader_of(junk(big), &limits);
            assert!(b.next().await.unwrap());
            let b_grant = b.take_grant().expect("a big frame holds a grant");
            assert_eq!(budget.lane.available_permits(), 0);
            // `c` fits nowhere: it waits in the lane's line, held, unread.
            let (mut c, held) = reader_of(junk(big), &limits);
            let waiting = tokio::time::timeout(Duration::from_millis(50), c.next()).await;
            assert!(waiting.is_err());
            assert!(held.load(Ordering::Acquire));
            assert!(c.in_frame());
            // A small frame does not wait.
            let (mut small, _) = reader_of(junk(SMALL_FRAME), &limits);
            assert!(small.next().await.unwrap());
            assert!(small.take_grant().is_none());
            // Once `b`'s messages were handled, `c` goes on where it was.
            drop(b_grant);
            assert!(c.next().await.unwrap());
            assert_eq!(c.frame().len(), big);
            assert!(!held.load(Ordering::Acquire));
            drop(a_grant);
            // Bigger than the lane: refused before anything is read.
            let (mut huge, _) = reader_of(junk(big + 1), &limits);
            assert!(matches!(
                huge.next().await,
                Err(ProtocolError::FrameTooLarge { max, .. }) if max == big
            ));
        });
    }

    /// Rule 8's argument against deadlock: two frames each holding half
    /// the pool and lacking more, while a third holds the lane, would wait
    /// on each other for ever if they waited for steps from the pool; in
    /// the lane's line they are read once the third was handled.
    #[test]
    fn frames_holding_the_pool_between_them_finish_through_the_lane() {
        run(async {
            // Each frame is granted a step, then, once it arrived, another
            // as big: half the pool.
            let limits = Limits::new(8 * SMALL_FRAME, Duration::from_secs(30));
            let budget = limits.budget.clone();
            let big = 4 * SMALL_FRAME;
            let mut starts = Vec::new();
            let mut readers = Vec::new();
            for _ in 0..2 {
                let (mut tx, rx) = tokio::io::duplex(1 << 20);
                let (go, start) = oneshot::channel::<()>();
                let bytes = junk(big);
                tokio::spawn(async move {
                    // The first step, then the rest once told.
                    let _ = tx.write_all(&bytes[..4 + SMALL_FRAME]).await;
                    let _ = start.await;
                    let _ = tx.write_all(&bytes[4 + SMALL_FRAME..]).await;
                    std::future::pending::<()>().await;
                });
                let held = Held::default();
                let mut read = FrameReader::new(rx, limits.clone()).held_by(held.clone());
                readers.push((
                    tokio::spawn(async move {
                        let got = read.next().await;
                        (got, read.frame().len())
                    }),
                    held,
                ));
                starts.push(go);
            }
            // Each holds two steps, one arrived: the pool is theirs.
            until(|| budget.pool.available_permits() == 0).await;
            let (mut third, _) = reader_of(junk(big), &limits);
            assert!(third.next().await.unwrap());
            let lane = third.take_grant().expect("a big frame holds a grant");
            assert_eq!(budget.lane.available_permits(), 0);
            // The rest of both: neither has room for its next step.
            for go in starts {
                let _ = go.send(());
            }
            until(|| readers.iter().all(|(_, held)| held.load(Ordering::Acquire))).await;
            drop(lane);
            for (reading, _) in readers {
                let (got, len) = reading.await.unwrap();
                assert!(got.unwrap());
                assert_eq!(len, big);
            }
        });
    }

    #[test]
    fn a_frame_trickled_byte_by_byte_stalls_and_one_sent_whole_does_not() {
        run(async {
            let stall = Duration::from_millis(200);
            let limits = Limits::new(FRAME_BUDGET, stall);
            let (mut tx, rx) = tokio::io::duplex(1 << 10);
            let mut read = FrameReader::new(rx, limits.clone());
            tokio::spawn(async move {
                let _ = tx.write_all(&1000u32.to_le_bytes()).await;
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.write_all(&[0]).await.is_err() {
                        return;
                    }
                }
            });
            // Its bytes earned it a microsecond each.
            assert!(matches!(
                read.next().await,
                Err(ProtocolError::Stalled(allowed))
                    if allowed >= stall && allowed < stall + Duration::from_millis(1)
            ));
            // Idle between frames is no stall: only a frame started counts.
            let (mut tx, rx) = tokio::io::duplex(1 << 10);
            let mut read = FrameReader::new(rx, limits);
            tokio::spawn(async move {
                tokio::time::sleep(3 * stall).await;
                let _ = tx
                    .write_all(&frame(&ToPeer::GetData { keys: vec![] }))
                    .await;
                std::future::pending::<()>().await;
            });
            assert!(read.next().await.unwrap());
        });
    }

    /// Rule 9 with a stall timeout past what a clock counts
    /// (`Options::stall_timeout(Duration::MAX)`, "never"): a frame that has
    /// to wait for its bytes is read whole. Before, its deadline overflowed
    /// the clock and the reader panicked (a reviewer's finding).
    #[test]
    fn a_stall_timeout_of_duration_max_never_stalls_and_never_panics() {
        run(async {
            let limits = Limits::new(FRAME_BUDGET, Duration::MAX);
            let (mut tx, rx) = tokio::io::duplex(1 << 10);
            let mut read = FrameReader::new(rx, limits);
            let whole = frame(&ToPeer::GetData {
                keys: vec![[3; 32]],
            });
            let (first, rest) = whole.split_at(6);
            tx.write_all(first).await.unwrap();
            let rest = rest.to_vec();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.write_all(&rest).await;
                std::future::pending::<()>().await;
            });
            assert!(read.next().await.unwrap());
            let msgs = crate::protocol::decode_checked::<ToPeer>(read.frame()).unwrap();
            assert!(matches!(&msgs[..], [ToPeer::GetData { keys }] if keys == &[[3; 32]]));
        });
    }

    /// Rule 9's progress deadline, on a real socket: a peer that sends the
    /// head of a big frame and then trickles it, far below the minimum
    /// rate, is closed once the stall timeout and what its head earned are
    /// up, not after the whole frame's allowance. Before, a frame had the
    /// stall timeout and a second per MiB of its length from its start
    /// whatever arrived of it: 32.5 s here.
    #[test]
    fn a_frame_whose_head_arrived_and_then_trickles_is_closed_after_what_its_bytes_earned() {
        run(async {
            let stall = Duration::from_millis(500);
            let len = 32 << 20;
            let head = 256 << 10;
            let limits = Limits::new(2 * len, stall);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let (dialed, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
            let mut peer = dialed.unwrap();
            let (read, _write) = accepted.unwrap().0.into_split();
            let mut read = FrameReader::new(reader(ReadHalf::Plain(read)), limits.clone());
            tokio::spawn(async move {
                let mut bytes = u32::try_from(len).unwrap().to_le_bytes().to_vec();
                bytes.resize(4 + head, 0xab);
                let _ = peer.write_all(&bytes).await;
                // 20 bytes a second.
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if peer.write_all(&[0]).await.is_err() {
                        return;
                    }
                }
            });
            let whole = limits.allowed(len);
            let bound = Duration::from_secs(10);
            match tokio::time::timeout(bound, read.next()).await {
                Ok(Err(ProtocolError::Stalled(allowed))) => {
                    assert!(allowed >= stall && allowed < whole, "{allowed:?}");
                }
                Ok(other) => panic!("not stalled: {other:?}"),
                Err(_) => panic!("not closed within {bound:?} (its whole allowance: {whole:?})"),
            }
        });
    }

    /// A connected pair of sockets: this end's write half, the peer's
    /// stream (which the test reads, or not).
    async fn socket_pair() -> (WriteHalf, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (_read, write) = dialed.unwrap().into_split();
        // Dropping the read half leaves the socket open for writing.
        (WriteHalf::Plain(write), accepted.unwrap().0)
    }

    #[test]
    fn a_writer_counts_its_backlog_refuses_past_its_cap_and_gives_up_on_a_peer_that_reads_nothing()
    {
        run(async {
            let stall = Duration::from_millis(300);
            let limits = Limits::new(FRAME_BUDGET, stall);
            let (write, peer) = socket_pair().await;
            let cap = 2 * QUEUE_LIMIT;
            let writer = spawn_writer(write, &limits, Some(cap));
            // Far more than the socket holds, and not read.
            let chunk = 8 << 20;
            while writer.queued() <= cap {
                writer.send(vec![1; chunk]).unwrap();
            }
            assert!(!writer.has_room());
            assert!(matches!(
                writer.send(vec![1; 10]),
                Err(ProtocolError::Backlog { max, .. }) if max == cap
            ));
            // Given up after the stall timeout: the reason, and no room.
            let why = writer.closed().await;
            assert!(matches!(why, Some(ProtocolError::NotReading { after, .. }) if after == stall));
            assert!(matches!(
                writer.room().await,
                Err(ProtocolError::NotReading { .. })
            ));
            assert!(writer.send(vec![1; 10]).is_err());
            drop(peer);
        });
    }

    #[test]
    fn a_writer_whose_peer_reads_makes_room_again() {
        run(async {
            let limits = Limits::standard();
            let (write, mut peer) = socket_pair().await;
            let writer = spawn_writer(write, &limits, None);
            let total = QUEUE_LIMIT + (16 << 20);
            for _ in 0..total / (8 << 20) {
                writer.send(vec![1; 8 << 20]).unwrap();
            }
            assert!(!writer.has_room());
            let reading = tokio::spawn(async move {
                let mut sink = vec![0; 1 << 20];
                let mut got = 0;
                while got < total {
                    got += peer.read(&mut sink).await.unwrap();
                }
            });
            writer.room().await.unwrap();
            assert!(writer.has_room());
            reading.await.unwrap();
            // Everything written is off the books.
            while writer.queued() > 0 {
                tokio::task::yield_now().await;
            }
        });
    }

    #[test]
    fn a_reader_closes_its_idle_data_connection_and_opens_another_when_needed() {
        run(async {
            // A data port that answers `Missing` to everything and counts
            // its connections and their ends.
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap().to_string();
            let (events, mut seen) = mpsc::unbounded_channel::<&'static str>();
            let auth = Arc::new(Auth::Token(crate::Token::generate().unwrap()));
            let theirs = auth.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let gate = Gate::new(Caps::for_files(1024, 1));
                    let events = events.clone();
                    let limits = Limits::standard();
                    let auth = theirs.clone();
                    tokio::spawn(async move {
                        let serves = [Role::Peer];
                        let ticket = gate.admit().unwrap();
                        let build = BuildId::NONE;
                        let me = Role::DataServer;
                        let c = accept_detached(
                            Incoming::Tcp(stream, None),
                            ticket,
                            me,
                            build,
                            &auth,
                            &serves,
                        )
                        .await
                        .unwrap()
                        .attach(&limits)
                        .unwrap();
                        let _ = events.send("opened");
                        let writer = spawn_writer(c.write, &limits, None);
                        let mut read = c.read;
                        while let Ok(true) = read.next().await {
                            let msgs = decode_checked::<ToPeer>(read.frame()).unwrap();
                            let mut out = Batch::default();
                            for ToPeer::GetData { keys } in msgs {
                                for key in keys {
                                    out.push(&FromPeer::Missing { key });
                                }
                            }
                            send_batch(&writer, &mut out).unwrap();
                        }
                        let _ = events.send("closed");
                    });
                }
            });
            let (answers, mut answered) = mpsc::unbounded_channel();
            let mut pool = PeerPool::new(answers, BuildId::NONE, auth, None, Limits::standard());
            pool.idle = Duration::from_millis(100);
            pool.add_peer(WorkerId(1), address);
            for round in 0..2u8 {
                pool.request(WorkerId(1), [round; 32]);
                pool.flush();
                let got = answered.recv().await.unwrap();
                assert_eq!(got.key, [round; 32]);
                assert!(matches!(got.result, FetchResult::Missing));
                // The reader closes it once idle; the next fetch opens
                // another.
                assert_eq!(seen.recv().await, Some("opened"));
                assert_eq!(seen.recv().await, Some("closed"));
            }
        });
    }

    /// A frame of `n` copies of `msg` (length prefix included): what no
    /// honest sender coalesces.
    fn frame_of<M: serde::Serialize>(msg: &M, n: usize) -> Vec<u8> {
        let body = frame(msg)[4..].repeat(n);
        let mut frame = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
        frame.extend(body);
        frame
    }

    /// Rule 8: a frame whose messages find no room in the budget waits
    /// for its grant without being read further, holding nothing, and
    /// keeps its place (and its frame) however often the wait is
    /// cancelled, as a loop's `select!` does while it goes on with its
    /// other work; once granted, it is decoded and holds what its messages
    /// take, and the next frame comes after it. A frame whose messages
    /// would take more than the whole budget is refused, its decoding
    /// stopped there.
    #[test]
    fn a_frame_with_no_room_waits_for_its_grant_in_place_however_often_cancelled() {
        run(async {
            const BUDGET: usize = 1 << 20;
            let limits = Limits::new(BUDGET, WAIT);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let (dialed, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
            let mut peer = dialed.unwrap();
            let (read, _write) = accepted.unwrap().0.into_split();
            let held = Held::default();
            let mut read = FrameReader::new(reader(ReadHalf::Plain(read)), limits.clone())
                .held_by(held.clone());
            // 10 000 empty requests: 20 KB, 0.4 MB decoded.
            let empty = ToPeer::GetData { keys: Vec::new() };
            let flood = frame_of(&empty, 10_000);
            let (_, decoded) = decode_sized::<ToPeer>(&flood[4..], usize::MAX).unwrap();
            assert!(decoded > 4 * flood.len() && decoded < BUDGET);
            let after = frame(&ToPeer::GetData {
                keys: vec![[1; 32]],
            });
            // Everything else holds the budget, but for room for a small
            // frame's messages.
            let budget = &limits.budget;
            let room = 4 << 10;
            let hogs = (
                (budget.pool.clone())
                    .try_acquire_many_owned((budget.pool_bytes - room) as u32)
                    .unwrap(),
                budget
                    .lane
                    .clone()
                    .try_acquire_many_owned(budget.lane_bytes as u32)
                    .unwrap(),
            );
            peer.write_all(&[flood, after].concat()).await.unwrap();
            let mut cancelled = 0;
            while cancelled < 10 {
                tokio::select! {
                    got = read.next_messages::<ToPeer>() => panic!("read with no room: {got:?}"),
                    () = tokio::task::yield_now() => {}
                }
                if held.load(Ordering::Acquire) {
                    cancelled += 1;
                }
            }
            drop(hogs);
            let got = read.next_messages::<ToPeer>().await.unwrap().unwrap();
            assert_eq!(got.msgs.len(), 10_000);
            let grant = got.grant.expect("its messages hold a grant");
            assert_eq!(grant.bytes(), decoded);
            assert_eq!(budget.available(), BUDGET - decoded);
            assert!(!held.load(Ordering::Acquire));
            drop(grant);
            let next = read.next_messages::<ToPeer>().await.unwrap().unwrap();
            assert_eq!(
                next.msgs,
                [ToPeer::GetData {
                    keys: vec![[1; 32]]
                }]
            );
            drop(next);
            // 40 000 of them: 80 KB, within what protocol rule 5 lets a
            // frame of that length take, 1.6 MB, past the whole budget.
            let past = frame_of(&empty, 40_000);
            assert!(crate::protocol::decode_checked::<ToPeer>(&past[4..]).is_ok());
            peer.write_all(&past).await.unwrap();
            match read.next_messages::<ToPeer>().await {
                Err(ProtocolError::OutOfRange { what, .. }) => assert_eq!(what, PAST_THE_BUDGET),
                other => panic!("not refused: {other:?}"),
            }
            drop(read);
            assert_eq!(budget.available(), BUDGET);
        });
    }

    /// Rule 8 on the answers of data ports, which workers and clients read
    /// through a [`PeerPool`], as a reviewer found it: they were decoded
    /// outside the budget. A frame of 3 500 `Missing` answers, 115 KB,
    /// decodes to far more: an authenticated data port, buggy or hostile,
    /// could make the process allocate many times its budget. Now a frame
    /// whose answers take more than the whole budget closes the connection
    /// and its fetches are lost; before, the key asked for was answered
    /// `Missing`. Answers that fit hold their grant until the pool's owner
    /// dropped them (handled).
    #[test]
    fn data_port_answers_hold_what_they_take_decoded_until_handled() {
        run(async {
            const BUDGET: usize = 256 << 10;
            let (flooded, fetched) = ([1; 32], [2; 32]);
            let flood = frame_of(&FromPeer::Missing { key: flooded }, 3_500);
            let (_, decoded) = decode_sized::<FromPeer>(&flood[4..], usize::MAX).unwrap();
            assert!(flood.len() < BUDGET / 2 && decoded > BUDGET);
            let value: Arc<[u8]> = Arc::from(vec![7; 100 << 10]);
            // A data port that answers `flooded` with the flood and
            // `fetched` with its value.
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap().to_string();
            let auth = Arc::new(Auth::Token(crate::Token::generate().unwrap()));
            let theirs = auth.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let (auth, flood, value) = (theirs.clone(), flood.clone(), value.clone());
                    tokio::spawn(async move {
                        let gate = Gate::new(Caps::for_files(1024, 1));
                        let limits = Limits::standard();
                        let c = accept_detached(
                            Incoming::Tcp(stream, None),
                            gate.admit().unwrap(),
                            Role::DataServer,
                            BuildId::NONE,
                            &auth,
                            &[Role::Peer],
                        )
                        .await
                        .unwrap()
                        .attach(&limits)
                        .unwrap();
                        let writer = spawn_writer(c.write, &limits, None);
                        let mut read = c.read;
                        while let Ok(Some(got)) = read.next_messages::<ToPeer>().await {
                            for ToPeer::GetData { keys } in got.msgs {
                                for key in keys {
                                    if key == flooded {
                                        let _ = writer.send(flood.clone());
                                    } else {
                                        let mut out = Batch::default();
                                        out.push(&FromPeer::Data {
                                            key,
                                            bytes: value.clone(),
                                        });
                                        let _ = send_batch(&writer, &mut out);
                                    }
                                }
                            }
                        }
                    });
                }
            });
            let limits = Limits::new(BUDGET, WAIT);
            let (answers, mut answered) = mpsc::unbounded_channel();
            let mut pool = PeerPool::new(answers, BuildId::NONE, auth, None, limits.clone());
            pool.add_peer(WorkerId(1), address);
            pool.request(WorkerId(1), flooded);
            pool.flush();
            let got = answered.recv().await.unwrap();
            assert_eq!(got.key, flooded);
            assert!(
                matches!(got.result, FetchResult::Lost),
                "the flood was read: {:?}",
                got.result
            );
            drop(got);
            // Another connection, answers that fit: held until dropped.
            pool.request(WorkerId(1), fetched);
            pool.flush();
            let got = answered.recv().await.unwrap();
            assert_eq!(got.key, fetched);
            assert!(matches!(&got.result, FetchResult::Data(bytes) if bytes.len() == 100 << 10));
            let granted = got._grant.as_ref().map_or(0, |grant| grant.bytes());
            assert!(granted > 100 << 10, "{granted}");
            assert_eq!(limits.budget.available(), BUDGET - granted);
            drop(got);
            assert_eq!(limits.budget.available(), BUDGET);
        });
    }

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
                // Windows sets the probe timings but cannot read them back.
                #[cfg(unix)]
                {
                    assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
                    assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
                }
                assert!(stream.nodelay().unwrap());
            }
        });
    }
}
