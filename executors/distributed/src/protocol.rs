//! Wire messages and framing: data only, no sockets.
//!
//! Every connection carries **frames**: a `u32` little-endian length, then
//! that many bytes of body. The first frame of every connection, in both
//! directions, is the [handshake](Handshake); every later frame is a
//! **batch**: one or more messages, each encoded with postcard, laid end to
//! end. Batching is what lets a worker report a thousand finished tasks with
//! one write.
//!
//! Rules:
//!
//! 1. A frame body is at most [`MAX_FRAME`] bytes. A peer that announces more
//!    is closed at once, before anything is allocated for it.
//! 2. The connecting side sends its handshake first; the accepting side checks
//!    magic and version, then answers with its own handshake. Any
//!    mismatch closes that one connection. Each handshake also carries the
//!    sender's [`BuildId`] (clients and workers send their program's, the
//!    scheduler [`BuildId::NONE`]); what it decides is the receiver's
//!    business: the scheduler keeps builds apart, a worker's data port
//!    serves only its own build. Each also carries a fresh nonce and
//!    whether the sender authenticates; when both do, the acceptor's
//!    handshake is followed by its [proof](PROOF_FRAME), and the
//!    connector's proof follows that, before any batch (`auth.rs` rules 2
//!    to 4). A handshake of protocol version 4 is answered with a version-4
//!    handshake naming the current version, so an old peer reports the version
//!    rather than a closed connection.
//! 3. Messages are named by direction: [`ToScheduler`] (from clients and
//!    workers), [`ToWorker`], [`ToClient`], and the data exchange between a
//!    worker's data port and its readers, [`ToPeer`] / [`FromPeer`]. Facts
//!    are past tense (`TaskFinished`), commands imperative (`Compute`).
//! 4. Keys travel as postcard bytes: their length (32, one byte), then
//!    their 32 raw bytes; a key of another length is malformed. A value's
//!    bytes are exactly what
//!    [`AnyValue::encode`](rask_executor::AnyValue::encode) produced.
//! 5. Nothing read from the wire is trusted. Every number a message carries
//!    that the receiver computes with (a thread count, a size, a duration,
//!    an interval, a length it fans out) has a documented range, checked as
//!    the frame is decoded: [`MAX_THREADS`], [`MAX_FRAME`] for sizes,
//!    [`INLINE_BYTES`] for values that travel with a report,
//!    [`MAX_TASK_DURATION`], [`MIN_HEARTBEAT`]..=[`MAX_HEARTBEAT`] and
//!    [`MAX_ADDRESS`]. A message out of range closes that connection with
//!    [`ProtocolError::OutOfRange`], like a malformed one. Counts of list
//!    entries are bounded by the frame they came in ([`MAX_FRAME`]), and ids,
//!    keys and priorities are only compared, never computed with. What a
//!    frame decodes to is bounded too: its messages, and the entries of
//!    lists that take far more memory than their encoding (strings,
//!    resources), at most [`DECODE_FACTOR`] times the
//!    frame's bytes plus [`DECODE_SLACK`], counted as they are decoded (the
//!    list of messages by the capacity it allocates, before it does); a
//!    frame past that is refused as out of range before it takes more (a
//!    one-byte `Heartbeat` is over 200 bytes decoded: a frame of them
//!    would otherwise make a process allocate 200 times its size). Senders
//!    stay within these ranges by construction (a worker clamps its thread
//!    count and the durations it reports, a scheduler its heartbeat
//!    interval).
//!
//! Changing any encoding here changes the golden frames tested below and
//! needs a new [`VERSION`].

use std::fmt;
use std::sync::Arc;

use rask_executor::diagnostics::{Snapshot, Spill};
use rask_executor::{Cause, Failure, FailureKind, Key};
use serde::{Deserialize, Serialize};

use crate::{AuthError, BuildId};

/// The first four bytes of every handshake body.
pub const MAGIC: [u8; 4] = *b"RASK";

/// The protocol version; peers with another version are refused.
///
/// Version 5: every connection proves the cluster's token in a mutual
/// challenge–response before anything else; clients send
/// `ToScheduler::Heartbeat` too, and a scheduler closes a client it hears
/// nothing from for its client timeout. Version 6: clients may ask for
/// copies on every worker (`ToScheduler::Replicate`), which the scheduler
/// asks of workers with `ToWorker::Fetch`. Version 7: workers with a
/// memory limit report it and what they spilled (`ToScheduler::Memory`),
/// and `Info` answers carry it; tasks carry annotations (a priority,
/// resources, workers; `TaskSpec::annotations`), workers declare resources
/// (`RegisterWorker::resources`), and a `Compute`'s priority is a
/// [`Priority`]; a worker announces its name in `RegisterWorker`, which the
/// scheduler may refuse (`ToWorker::Refused`); a client may retire workers
/// (`ToScheduler::RetireWorkers`, answered by `ToClient::Retired`), which
/// the scheduler tells to exit (`ToWorker::Retire`) once their values are
/// held elsewhere; the scheduler asks a worker to give a task up
/// (`ToWorker::GiveUp`, answered by `ToScheduler::TaskGivenUp` or
/// `ToScheduler::TaskKept`) before it moves it elsewhere. Version 8: a
/// `Compute` names its run (`ToWorker::Compute::run`, new at every
/// `Compute`), and each report of a run (`TaskFinished`, `TaskErred`,
/// `TaskAbandoned`, `TaskSeceded`) names it back: the scheduler takes a
/// report only for the run it last asked of that worker, never one of a
/// run it released meanwhile. Version 9: keys travel as postcard bytes,
/// a length byte (32) before their 32 bytes, instead of serde's form of an
/// array (rule 4); a worker asked to stop asks to be retired
/// (`ToScheduler::Leaving`).
pub const VERSION: u16 = 9;

/// Values whose encoding is at most this many bytes travel with their
/// report: in `TaskFinished` to the scheduler, and in `KeyInMemory` to the
/// clients that want them, which then need no fetch from a worker (a round
/// trip per result, most of the cost of a small future). The scheduler keeps
/// these bytes while the value is in memory, so a client asking later gets
/// them too; at this size that costs less than a task's own bookkeeping.
pub const INLINE_BYTES: usize = 1024;

/// Names no worker, in a client's [`ToScheduler::FetchFailed`]: its known
/// holders of the key all left, so it asks the scheduler for the key's
/// holders again (a worker id is a connection's number, and the scheduler
/// never gives a connection this one: scheduler rule 10).
pub const NO_HOLDER: WorkerId = WorkerId(u32::MAX);

/// The largest frame body accepted, in bytes (512 MiB).
pub const MAX_FRAME: usize = 512 << 20;

/// A batch is sealed into its own frame once it grows past this many bytes;
/// a message that would take the open frame past [`MAX_FRAME`] starts a
/// frame of its own. So no frame a sender builds is over [`MAX_FRAME`]
/// unless one message alone is.
pub(crate) const SOFT_FRAME: usize = 4 << 20;

/// Most compute threads a worker may announce in `RegisterWorker` (rule 5).
/// A worker started with more runs this many: far more than one machine's
/// cores, and small enough that a window (threads × up to 64 tasks) stays
/// far below `u32::MAX`.
pub const MAX_THREADS: u32 = 4096;

/// Longest task run a worker may report in `TaskFinished` (30 days; rule 5).
/// A worker reports a longer run as this long: the figure only steers how
/// many tasks a worker is sent at once, and a task that ran this long
/// already gets the smallest window.
pub const MAX_TASK_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Shortest heartbeat interval a scheduler may ask for in
/// `ToWorker::Heartbeat` (rule 5).
pub const MIN_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(1);

/// Longest heartbeat interval a scheduler may ask for in
/// `ToWorker::Heartbeat` (one hour; rule 5). A scheduler whose worker
/// timeout would call for a longer one asks for this.
pub const MAX_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Longest data address (`host:port`) a worker may announce, in bytes
/// (rule 5). Every peer and client is sent it; a DNS name is at most 253
/// bytes, so 1 KiB leaves room for anything real.
pub const MAX_ADDRESS: usize = 1024;

/// Longest worker name, in bytes (rule 5): `RegisterWorker.name`, and each
/// name of a `RetireWorkers`.
pub const MAX_WORKER_NAME: usize = 255;

/// What decoding a frame may take in memory beyond [`DECODE_SLACK`], as a
/// multiple of the frame's length (rule 5): each message counts its size
/// (`size_of`, about 200 bytes for the biggest variants), each entry of
/// a string list or resource list its own. Honest batches stay far below:
/// a message sent in numbers carries a key (33 bytes or more encoded, at
/// most 6.3 times that decoded), bar a few heartbeats per frame; the
/// rest of the factor is margin, so that a message type growing does not
/// make honest frames refused.
pub const DECODE_FACTOR: usize = 16;

/// What decoding any frame may take in memory whatever its length (rule
/// 5): room for some 20 000 of the smallest messages.
pub const DECODE_SLACK: usize = 4 << 20;

/// The largest memory figure a worker may report: 1 PiB.
pub const MAX_MEMORY: u64 = 1 << 50;

/// The longest task name in a [`WireEvent`], in bytes.
pub const MAX_NAME: usize = 4096;

/// Length of a handshake body: magic, version, role, flags, the sender's
/// build id, its nonce.
pub(crate) const HANDSHAKE_BODY: usize = 8 + 32 + 32;

/// Length of a whole handshake frame, prefix included.
pub const HANDSHAKE_FRAME: usize = 4 + HANDSHAKE_BODY;

/// The first four bytes of every handshake: its body's length. A peer that
/// starts otherwise is refused before anything more is read from it.
pub(crate) const HANDSHAKE_PREFIX: [u8; 4] = (HANDSHAKE_BODY as u32).to_le_bytes();

/// The first four bytes of a handshake of protocol versions 1 to 3, whose
/// body had no build id (8 bytes): such a peer is refused for its version,
/// not taken for junk ([`old_handshake`]).
pub(crate) const OLD_HANDSHAKE_PREFIX: [u8; 4] = 8u32.to_le_bytes();

/// Length of a handshake body of protocol version 4: magic, version, role,
/// a reserved byte, the build id; no nonce, no authentication.
pub(crate) const V4_HANDSHAKE_BODY: usize = 8 + 32;

/// The first four bytes of a handshake of protocol version 4: such a peer
/// is refused for its version ([`old_handshake`]).
pub(crate) const V4_HANDSHAKE_PREFIX: [u8; 4] = (V4_HANDSHAKE_BODY as u32).to_le_bytes();

/// Length of a proof: a keyed blake3 hash.
pub(crate) const PROOF_LEN: usize = 32;

/// Length of a whole proof frame: `20 00 00 00` (body length, 32), then
/// the proof, keyed blake3 of a domain and both handshakes' bodies (see
/// `auth.rs`). Sent by the acceptor right after its handshake, and by the
/// connector once it checked the acceptor's, when both authenticate.
pub const PROOF_FRAME: usize = 4 + PROOF_LEN;

/// The first four bytes of a proof frame.
pub(crate) const PROOF_PREFIX: [u8; 4] = (PROOF_LEN as u32).to_le_bytes();

/// The one flag a handshake defines: the sender authenticates.
const AUTHENTICATES: u8 = 1;

/// What a process is to the connection it opened or accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A client, connecting to the scheduler.
    Client,
    /// A worker, connecting to the scheduler.
    Worker,
    /// A reader of a worker's data port (another worker or a client).
    Peer,
    /// The scheduler, answering a client or worker.
    Scheduler,
    /// A worker's data port, answering a peer.
    DataServer,
}

impl Role {
    fn to_byte(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Worker => 2,
            Role::Peer => 3,
            Role::Scheduler => 4,
            Role::DataServer => 5,
        }
    }

    fn from_byte(byte: u8) -> Option<Role> {
        Some(match byte {
            1 => Role::Client,
            2 => Role::Worker,
            3 => Role::Peer,
            4 => Role::Scheduler,
            5 => Role::DataServer,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Peer => "peer",
            Role::Scheduler => "scheduler",
            Role::DataServer => "data server",
        })
    }
}

/// The first frame of every connection: who is talking, in which protocol,
/// from which build of which program, whether it authenticates, and its
/// challenge to the other side.
///
/// Its layout is fixed by hand rather than by serde so that it can never
/// change by accident: `48 00 00 00` (body length, 72), `RASK`, the version
/// as `u16` little-endian, the role byte, the flags byte (bit 0: the sender
/// authenticates; the other bits are zero), the 32 bytes of the sender's
/// [`BuildId`], then its 32-byte nonce, fresh for each connection.
///
/// # Examples
///
/// ```
/// use rask_distributed::protocol::{Handshake, Role, HANDSHAKE_FRAME};
/// use rask_distributed::BuildId;
/// let hello = Handshake::new(Role::Client, BuildId::current(), [7; 32], true);
/// let frame: [u8; HANDSHAKE_FRAME] = hello.to_frame();
/// assert_eq!(Handshake::parse(&frame)?, hello);
/// # Ok::<(), rask_distributed::ProtocolError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// The sender's protocol version.
    pub version: u16,
    /// The sender's role.
    pub role: Role,
    /// The sender's build ([`BuildId::NONE`] from the scheduler).
    pub build: BuildId,
    /// Whether the sender authenticates: it holds a token, and requires
    /// the other side to prove it holds the same.
    pub authenticates: bool,
    /// Random bytes the other side's proof must cover.
    pub nonce: [u8; 32],
}

impl Handshake {
    /// This protocol's handshake for `role`, from a process of `build`,
    /// with `nonce`; `authenticates` when the sender has a token.
    pub fn new(role: Role, build: BuildId, nonce: [u8; 32], authenticates: bool) -> Handshake {
        Handshake {
            version: VERSION,
            role,
            build,
            authenticates,
            nonce,
        }
    }

    /// The whole frame, length prefix included.
    pub fn to_frame(self) -> [u8; HANDSHAKE_FRAME] {
        let mut frame = [0u8; HANDSHAKE_FRAME];
        frame[..4].copy_from_slice(&HANDSHAKE_PREFIX);
        frame[4..8].copy_from_slice(&MAGIC);
        frame[8..10].copy_from_slice(&self.version.to_le_bytes());
        frame[10] = self.role.to_byte();
        frame[11] = if self.authenticates { AUTHENTICATES } else { 0 };
        frame[12..44].copy_from_slice(self.build.as_bytes());
        frame[44..].copy_from_slice(&self.nonce);
        frame
    }

    /// Parses and checks a handshake frame.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::NotRask`] for anything that is not a rask handshake,
    /// [`ProtocolError::Version`] for another protocol version.
    pub fn parse(frame: &[u8; HANDSHAKE_FRAME]) -> Result<Handshake, ProtocolError> {
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        if len as usize != HANDSHAKE_BODY || frame[4..8] != MAGIC {
            return Err(ProtocolError::NotRask);
        }
        let version = u16::from_le_bytes([frame[8], frame[9]]);
        if version != VERSION {
            return Err(ProtocolError::Version {
                ours: VERSION,
                theirs: version,
            });
        }
        let role = Role::from_byte(frame[10]).ok_or(ProtocolError::NotRask)?;
        let authenticates = match frame[11] {
            0 => false,
            AUTHENTICATES => true,
            _ => return Err(ProtocolError::NotRask),
        };
        let mut build = [0u8; 32];
        build.copy_from_slice(&frame[12..44]);
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&frame[44..]);
        Ok(Handshake {
            version,
            role,
            build: BuildId::from_bytes(build),
            authenticates,
            nonce,
        })
    }
}

/// Why a handshake of an older protocol version is refused, from its body
/// (the bytes after [`OLD_HANDSHAKE_PREFIX`] or [`V4_HANDSHAKE_PREFIX`],
/// which start alike): its version, or junk.
pub(crate) fn old_handshake(body: &[u8]) -> ProtocolError {
    match body {
        [m0, m1, m2, m3, v0, v1, ..] if [*m0, *m1, *m2, *m3] == MAGIC => ProtocolError::Version {
            ours: VERSION,
            theirs: u16::from_le_bytes([*v0, *v1]),
        },
        _ => ProtocolError::NotRask,
    }
}

/// The answer to a handshake of protocol version 4: a version-4 handshake
/// naming this version, which such a peer reports as a version mismatch.
pub(crate) fn v4_refusal(role: Role) -> [u8; 4 + V4_HANDSHAKE_BODY] {
    let mut frame = [0u8; 4 + V4_HANDSHAKE_BODY];
    frame[..4].copy_from_slice(&V4_HANDSHAKE_PREFIX);
    frame[4..8].copy_from_slice(&MAGIC);
    frame[8..10].copy_from_slice(&VERSION.to_le_bytes());
    frame[10] = role.to_byte();
    frame
}

/// A proof as its frame ([`PROOF_FRAME`]).
pub(crate) fn proof_frame(proof: &[u8; PROOF_LEN]) -> [u8; PROOF_FRAME] {
    let mut frame = [0u8; PROOF_FRAME];
    frame[..4].copy_from_slice(&PROOF_PREFIX);
    frame[4..].copy_from_slice(proof);
    frame
}

/// Why a connection was closed by this side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer's first bytes are not a rask handshake.
    #[error("peer is not a rask process (bad handshake)")]
    NotRask,
    /// The peer answered a plain connection with TLS: connect to it with a
    /// `tls://` address.
    #[error("peer speaks TLS: connect to it with a `tls://` address (and TLS settings)")]
    TlsPeer,
    /// The peer started a TLS handshake on a port that takes plain
    /// connections.
    #[error("peer started a TLS handshake; this port takes plain `tcp://` connections")]
    TlsOnPlain,
    /// The TLS handshake failed: the peer does not speak TLS, presented no
    /// certificate or one that is not trusted.
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {theirs}, this process speaks {ours}")]
    Version {
        /// This process's version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer's role is not one this connection serves.
    #[error("unexpected peer role: {0}")]
    Role(Role),
    /// The handshake's authentication failed (see [`AuthError`]).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The peer runs another build of the program (another [`BuildId`]),
    /// where only this process's own build is served.
    #[error("peer runs build {theirs}, this process runs build {ours}")]
    Build {
        /// This process's build.
        ours: BuildId,
        /// The peer's build.
        theirs: BuildId,
    },
    /// The peer announced a frame over [`MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame did not decode as the messages this side expects.
    #[error("malformed message")]
    Malformed(#[source] postcard::Error),
    /// A well-formed message that this connection may not send (now).
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// A message carried a number outside the range the protocol allows
    /// for it (rule 5).
    #[error("value out of range: {what} is {value}, allowed {min}..={max}")]
    OutOfRange {
        /// The field, as `Message.field`.
        what: &'static str,
        /// The value received (a length, for a field of bytes).
        value: u64,
        /// The least value allowed.
        min: u64,
        /// The greatest value allowed.
        max: u64,
    },
    /// The connection ended in the middle of a frame or before a handshake.
    #[error("connection closed")]
    Closed,
    /// Reading or writing the socket failed.
    #[error("i/o error")]
    Io(#[source] std::io::Error),
    /// The peer sent nothing for too long during the handshake.
    #[error("no handshake within {0:?}")]
    Timeout(std::time::Duration),
    /// A worker or client sent nothing, not even a heartbeat, for this
    /// long: it is taken for dead (hung, or its machine unreachable).
    #[error("nothing heard for {0:?}: taken for dead")]
    Silent(std::time::Duration),
    /// A frame arrived slower than the minimum rate allows (`net` rule
    /// 9): no more of it came within this long of its start, the stall
    /// timeout and what its bytes so far earned. A peer that trickles
    /// bytes (slow-loris) or stalled.
    #[error("frame stalled: no more of it within {0:?} of its start")]
    Stalled(std::time::Duration),
    /// The peer took none of the bytes queued for it for this long: it
    /// stopped reading.
    #[error("peer read nothing for {after:?} with {queued} bytes queued for it")]
    NotReading {
        /// Bytes waiting to be sent to it.
        queued: usize,
        /// How long it read nothing.
        after: std::time::Duration,
    },
    /// More bytes were queued for the peer than this side holds for one
    /// connection: it reads far slower than it asks.
    #[error("peer is not keeping up: {queued} bytes queued for it, limit {max}")]
    Backlog {
        /// Bytes waiting to be sent to it.
        queued: usize,
        /// The limit.
        max: usize,
    },
    /// A connection still in its handshake was closed to make room for a
    /// newer one: too many connections were waiting for theirs (at most
    /// the number given), or the process ran out of file descriptors.
    #[error(
        "closed to make room for a newer connection (at most {0} may wait for their handshake)"
    )]
    Evicted(usize),
    /// This side has as many connections as it takes (of this role, when
    /// named).
    #[error("connection limit reached: {count} connections{}, limit {max}", .role.map(|r| format!(" of role {r}")).unwrap_or_default())]
    Full {
        /// The role counted, or `None` for every connection.
        role: Option<Role>,
        /// Connections open.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A data connection with nothing in flight either way for this long
    /// was closed; its reader connects again when it needs to.
    #[error("idle for {0:?}")]
    Idle(std::time::Duration),
}

/// Identifies a worker for as long as its connection to the scheduler lives.
///
/// Ids are never reused by one scheduler, so a stale id can only name a
/// worker that is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

/// A key as it travels: its 32 bytes.
pub type WireKey = [u8; 32];

/// A map looked up once or more per task (by key, task id, function name,
/// connection, build or submission), hashed by a fast hash with a per-map
/// random seed: SipHash costs more than the rest of a lookup on 32-byte
/// keys, and keys read from the wire must not choose their buckets.
pub(crate) type KeyMap<K, V> = std::collections::HashMap<K, V, KeyHashing>;

/// [`KeyMap`]'s hashing: foldhash with a per-map random seed, a key's 32
/// bytes taken as two 128-bit words (two seeded multiplications, inlined)
/// instead of foldhash's out-of-line loop for byte strings longer than 16.
/// Every other input is foldhash's own.
#[derive(Clone, Default)]
pub(crate) struct KeyHashing(foldhash::fast::RandomState);

impl std::hash::BuildHasher for KeyHashing {
    type Hasher = KeyHasher;

    #[inline]
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0.build_hasher())
    }
}

/// The hasher of [`KeyHashing`].
pub(crate) struct KeyHasher(foldhash::fast::FoldHasher<'static>);

impl std::hash::Hasher for KeyHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        match <&[u8; 32]>::try_from(bytes) {
            Ok(key) => {
                let (low, high) = key.split_at(16);
                let word = |half: &[u8]| u128::from_le_bytes(half.try_into().unwrap_or([0; 16]));
                self.0.write_u128(word(low));
                self.0.write_u128(word(high));
            }
            Err(_) => self.0.write(bytes),
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.0.write_u8(i);
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.0.write_u32(i);
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0.write_u64(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.0.write_usize(i);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// Where a task stands among ready work: by the user's priority, higher
/// first (`Delayed::priority`, Dask's `priority=`), then by `order`, lower
/// first (the scheduler's submission order). [`Ord`] puts what runs first
/// first: `a < b` when `a` runs before `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Priority {
    /// The user's priority; 0 by default. Any value.
    pub user: i32,
    /// Submission order. Any value: it is only compared.
    pub order: u64,
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .user
            .cmp(&self.user)
            .then(self.order.cmp(&other.order))
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The most workers a task may name (`Annotations::workers`).
pub const MAX_WORKERS_NAMED: usize = 1024;

/// One task of a graph as a client sends it: enough to run it anywhere, and
/// to run it again if its value is lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's key.
    #[serde(with = "wire_key")]
    pub key: WireKey,
    /// The task's name (its op's name), for failures.
    #[serde(with = "name")]
    pub name: Arc<str>,
    /// The registered function that runs it.
    #[serde(with = "name")]
    pub function: Arc<str>,
    /// The function's arguments, opaque to everyone but the function.
    #[serde(with = "bytes")]
    pub payload: Arc<[u8]>,
    /// Keys of the task's inputs, in the order the op receives them.
    #[serde(with = "wire_keys")]
    pub deps: Vec<WireKey>,
    /// How long it may run, in milliseconds, before it fails as timed out
    /// (`Op::timeout`); `None`: the scheduler's default, if any. Any value:
    /// a deadline past the end of time is no deadline.
    pub timeout_ms: Option<u64>,
    /// How many times it runs again when it fails (`Op::retries`). Any
    /// value: a worker stops retrying a task nobody wants any more.
    pub retries: u32,
    /// Its priority, resources and workers (`Op::annotations`): at most
    /// [`MAX_RESOURCES`](rask_executor::MAX_RESOURCES) resources with
    /// names of at most [`MAX_RESOURCE_NAME`](rask_executor::MAX_RESOURCE_NAME)
    /// bytes, and [`MAX_WORKERS_NAMED`] workers of at most [`MAX_ADDRESS`]
    /// bytes each.
    #[serde(deserialize_with = "charged::annotations")]
    pub annotations: rask_executor::Annotations,
}

impl TaskSpec {
    /// Task `i` of `plan`, travelling as `wire`: its key, name, inputs'
    /// keys and limits as the plan has them ([`TaskSpecRef::of`], owned).
    pub(crate) fn of(
        plan: &rask_executor::Plan,
        i: u32,
        wire: rask_executor::WireTask,
    ) -> TaskSpec {
        let spec = TaskSpecRef::of(plan, i, &wire);
        TaskSpec {
            key: spec.key,
            name: spec.name.into(),
            function: spec.function.into(),
            payload: spec.payload.into(),
            deps: spec.deps.keys().collect(),
            timeout_ms: spec.timeout_ms,
            retries: spec.retries,
            annotations: spec.annotations.into_owned(),
        }
    }
}

/// [`TaskSpec`] borrowing from the plan it comes from and from the task's
/// [`WireTask`](rask_executor::WireTask), so a client encodes a graph
/// straight into its frame instead of copying each task's name, function
/// and payload first. Encodes exactly as `TaskSpec` does (tested).
#[derive(Serialize)]
pub(crate) struct TaskSpecRef<'a> {
    #[serde(with = "wire_key")]
    key: WireKey,
    name: &'a str,
    function: &'a str,
    /// As bytes, in one copy, as `TaskSpec` encodes its payload.
    #[serde(serialize_with = "bytes::serialize_slice")]
    payload: &'a [u8],
    deps: DepsRef<'a>,
    timeout_ms: Option<u64>,
    retries: u32,
    annotations: std::borrow::Cow<'a, rask_executor::Annotations>,
}

impl<'a> TaskSpecRef<'a> {
    /// Task `i` of `plan`, travelling as `wire`: its key, name, inputs'
    /// keys and limits as the plan has them.
    pub(crate) fn of(
        plan: &'a rask_executor::Plan,
        i: u32,
        wire: &'a rask_executor::WireTask,
    ) -> TaskSpecRef<'a> {
        let task = plan.task(i);
        TaskSpecRef {
            key: plan.key(i).0,
            name: task.op().name(),
            function: &wire.function,
            payload: &wire.payload,
            deps: DepsRef { plan, task: i },
            timeout_ms: task
                .op()
                .timeout()
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            retries: task.op().retries(),
            annotations: match task.op().annotations() {
                Some(a) => std::borrow::Cow::Borrowed(a),
                None => std::borrow::Cow::Owned(rask_executor::Annotations::default()),
            },
        }
    }
}

/// The keys of a plan task's inputs, encoded as the `Vec<WireKey>` of
/// [`TaskSpec::deps`] without collecting them first.
pub(crate) struct DepsRef<'a> {
    plan: &'a rask_executor::Plan,
    task: u32,
}

impl DepsRef<'_> {
    /// The inputs' keys, in argument order.
    fn keys(&self) -> impl Iterator<Item = WireKey> + '_ {
        let plan = self.plan;
        plan.deps(self.task).iter().map(|&d| plan.key(d).0)
    }
}

impl Serialize for DepsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.keys().map(wire_key::Owned))
    }
}

/// A [`Failure`] as it travels: everything but the error value itself,
/// whose type name and message chain go instead (the receiver rebuilds it
/// as a [`RemoteError`](rask_executor::RemoteError)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFailure {
    /// Key of the task where the failure started.
    #[serde(with = "wire_key")]
    pub key: WireKey,
    /// Name of that task.
    pub name: String,
    /// What kind of failure.
    pub kind: WireFailureKind,
    /// The error or panic message.
    pub message: String,
    /// The type of the error the task returned, if it returned one.
    pub error_type: Option<String>,
    /// The messages of that error's sources, outermost first.
    #[serde(deserialize_with = "charged::vec")]
    pub chain: Vec<String>,
    /// Where the task panicked (`file:line:column`).
    pub location: Option<String>,
    /// How many times the task ran (more than 1 with retries). Any value.
    pub attempts: u32,
}

impl WireFailure {
    /// A failure known by its message only.
    pub fn new(key: WireKey, name: String, kind: WireFailureKind, message: String) -> WireFailure {
        WireFailure {
            key,
            name,
            kind,
            message,
            error_type: None,
            chain: Vec::new(),
            location: None,
            attempts: 1,
        }
    }
}

/// [`FailureKind`] as it travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireFailureKind {
    /// The task returned an error (or could not be resolved or encoded).
    Failed,
    /// The task panicked.
    Panicked,
    /// The task was cancelled.
    Cancelled,
    /// The task ran past its timeout.
    TimedOut {
        /// The timeout, in milliseconds.
        after_ms: u64,
    },
}

impl From<&Failure> for WireFailure {
    fn from(f: &Failure) -> Self {
        WireFailure {
            key: f.key.0,
            name: f.name.to_string(),
            kind: match f.kind {
                FailureKind::Failed => WireFailureKind::Failed,
                FailureKind::Panicked => WireFailureKind::Panicked,
                FailureKind::Cancelled => WireFailureKind::Cancelled,
                FailureKind::TimedOut(after) => WireFailureKind::TimedOut {
                    after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                },
            },
            message: f.message.clone(),
            error_type: f.cause.as_ref().map(|c| c.type_name.to_string()),
            chain: f.cause.as_ref().map(|c| c.chain()).unwrap_or_default(),
            location: f.location.as_ref().map(|l| l.to_string()),
            attempts: f.attempts,
        }
    }
}

impl From<&WireFailure> for Failure {
    fn from(f: &WireFailure) -> Self {
        Failure {
            key: Key(f.key),
            name: f.name.as_str().into(),
            kind: match f.kind {
                WireFailureKind::Failed => FailureKind::Failed,
                WireFailureKind::Panicked => FailureKind::Panicked,
                WireFailureKind::Cancelled => FailureKind::Cancelled,
                WireFailureKind::TimedOut { after_ms } => {
                    FailureKind::TimedOut(std::time::Duration::from_millis(after_ms))
                }
            },
            message: f.message.clone(),
            cause: f
                .error_type
                .as_ref()
                .map(|t| Box::new(Cause::remote(t, &f.message, f.chain.clone()))),
            location: f.location.as_deref().map(Arc::from),
            attempts: f.attempts.max(1),
        }
    }
}

/// Messages to the scheduler, from clients and from workers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToScheduler {
    /// Client: add these tasks (already known keys are deduplicated) and
    /// hold one more reference to each `wanted` key for this client.
    UpdateGraph {
        /// The tasks, dependencies first.
        tasks: Vec<TaskSpec>,
        /// Keys this client wants; each is reported by `KeyInMemory` or
        /// `KeyErred` once known.
        #[serde(with = "wire_keys")]
        wanted: Vec<WireKey>,
    },
    /// Client: drop one reference to each key (one per earlier `wanted`).
    ReleaseKeys {
        /// The keys.
        #[serde(with = "wire_keys")]
        keys: Vec<WireKey>,
    },
    /// Worker, first message: where peers can fetch its data, and how many
    /// tasks it runs at once.
    RegisterWorker {
        /// `host:port` of the worker's data port; at most [`MAX_ADDRESS`]
        /// bytes.
        address: String,
        /// Number of compute threads: 1 to [`MAX_THREADS`].
        threads: u32,
        /// What it has for tasks that ask for resources (`--resources`,
        /// `RASK_WORKER_RESOURCES`): bounded as a task's are.
        #[serde(deserialize_with = "charged::resources")]
        resources: rask_executor::Resources,
        /// Its name, unique on the scheduler: 1 to [`MAX_WORKER_NAME`]
        /// bytes, no whitespace or control characters.
        name: String,
    },
    /// Worker: a task ran and its value is held here.
    TaskFinished {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The run it reports on: the `run` of the task's `Compute`.
        run: u64,
        /// Size of the value's encoding: at most [`MAX_FRAME`], since the
        /// value must fit a frame to be fetched.
        nbytes: u64,
        /// Time spent running the op, in nanoseconds: at most
        /// [`MAX_TASK_DURATION`].
        duration_ns: u64,
        /// The value's encoding when it is at most [`INLINE_BYTES`] long
        /// (longer is out of range).
        #[serde(with = "opt_bytes")]
        value: Option<Arc<[u8]>>,
        /// The lane of the thread that ran it, for the task stream: 0 for
        /// the worker's network thread, `i + 1` for compute thread `i`; at
        /// most [`MAX_THREADS`].
        thread: u32,
    },
    /// Worker: a task failed (its op failed or panicked, its function was
    /// not registered, or its value could not be encoded).
    TaskErred {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The run it reports on: the `run` of the task's `Compute`.
        run: u64,
        /// Why.
        failure: WireFailure,
    },
    /// Worker: a task was dropped without running because an input could not
    /// be fetched from any holder the worker knew of (see `FetchFailed`).
    TaskAbandoned {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The run it reports on: the `run` of the task's `Compute`.
        run: u64,
    },
    /// Worker: a copy of a key was fetched from a peer and is held here too.
    DataAdded {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
    },
    /// Client or worker: `holder` did not deliver `key` (it is gone, or said
    /// it does not hold it). A client whose known holders of `key` all
    /// left names [`NO_HOLDER`]: it asks where the key is now.
    FetchFailed {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The worker that failed to deliver it.
        holder: WorkerId,
    },
    /// Worker or client: it is alive. A worker sends it as often as
    /// `ToWorker::Heartbeat` asks; a client connected over TCP every second
    /// in which it sent nothing else, so a scheduler can tell an idle
    /// client from a vanished one.
    Heartbeat,
    /// Worker: what it uses, sent with its heartbeats.
    Resources {
        /// Its resident memory in bytes: at most [`MAX_MEMORY`].
        memory_bytes: u64,
    },
    /// Client: send [`ToClient::TaskEvents`] about the tasks of this
    /// client's build from now on (`on`), or stop.
    Watch {
        /// Whether to send them.
        on: bool,
    },
    /// Client: what the cluster looks like now; answered by
    /// [`ToClient::Info`] with the same `id`.
    Info {
        /// Chosen by the client, returned as is.
        id: u64,
    },
    /// Client: which workers hold `keys`; answered by
    /// [`ToClient::WhoHas`] with the same `id`.
    WhoHas {
        /// Chosen by the client, returned as is.
        id: u64,
        /// The keys.
        #[serde(with = "wire_keys")]
        keys: Vec<WireKey>,
    },
    /// Client: have every worker hold a copy of each of `keys` (Dask's
    /// `replicate`); keys this client does not want, or that are not in
    /// memory, are skipped. Nothing answers: [`ToScheduler::WhoHas`] shows
    /// the copies as they arrive.
    Replicate {
        /// The keys.
        #[serde(with = "wire_keys")]
        keys: Vec<WireKey>,
    },
    /// Worker with a memory limit: the limit, what it holds in memory and
    /// on disk, what it spilled, whether it paused; sent with its
    /// heartbeats. Its byte counts are at most [`MAX_MEMORY`]; the other
    /// counts are only shown.
    Memory {
        /// The figures.
        spill: Spill,
    },
    /// Worker: a task it runs waits for a nested computation and gave its
    /// thread back (`worker` rule 15): it no longer takes room in the
    /// worker's window until it ends.
    TaskSeceded {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The run it reports on: the `run` of the task's `Compute`.
        run: u64,
    },
    /// Client: retire the workers of these names (Dask's
    /// `retire_workers`): give them no more tasks, have the values only
    /// they hold copied to other workers, then tell them to exit. Answered
    /// by [`ToClient::Retired`] with the same `id` once every one of them
    /// is gone, or at once if one cannot be retired.
    RetireWorkers {
        /// Chosen by the client, returned as is.
        id: u64,
        /// The workers' names, each at most [`MAX_WORKER_NAME`] bytes.
        #[serde(deserialize_with = "charged::vec")]
        names: Vec<String>,
    },
    /// Worker, answering [`ToWorker::GiveUp`] with its `id`: the task had
    /// not started, and was dropped as by `Release`; it will not run here.
    TaskGivenUp {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The request's id.
        id: u64,
    },
    /// Worker, answering [`ToWorker::GiveUp`] with its `id`: the task had
    /// started (or ended, or was never here), and stays; its report, if
    /// any, comes as usual (before this answer, if it ended first).
    TaskKept {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The request's id.
        id: u64,
    },
    /// Worker: it was asked to stop (its process got `SIGTERM`): retire
    /// it as `RetireWorkers` would, answering nobody; the scheduler tells
    /// it to exit ([`ToWorker::Retire`]) once the values only it holds are
    /// held elsewhere, at once when no other worker stays to hold them.
    Leaving,
}

/// Messages from the scheduler to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Answer to `RegisterWorker`: the worker's id.
    Registered {
        /// The id.
        id: WorkerId,
    },
    /// Another worker's data port (sent for every worker, before any
    /// message that names it).
    PeerJoined {
        /// The peer.
        id: WorkerId,
        /// `host:port` of its data port; at most [`MAX_ADDRESS`] bytes.
        address: String,
    },
    /// A worker left; its data is gone.
    PeerLeft {
        /// The peer.
        id: WorkerId,
    },
    /// Run a task, fetching the inputs this worker does not hold.
    Compute {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// This run of it, chosen by the scheduler and new at every
        /// `Compute`: the worker's reports of the run carry it back, and
        /// the scheduler takes only those of the run it asked for.
        run: u64,
        /// Its name, for failures.
        #[serde(with = "name")]
        name: Arc<str>,
        /// Its registered function.
        #[serde(with = "name")]
        function: Arc<str>,
        /// The function's arguments.
        #[serde(with = "bytes")]
        payload: Arc<[u8]>,
        /// Its inputs in op order.
        #[serde(with = "wire_keys")]
        deps: Vec<WireKey>,
        /// Holders of the inputs this worker does not hold.
        #[serde(with = "who_has")]
        who_has: Vec<(WireKey, Vec<WorkerId>)>,
        /// Lesser runs first ([`Priority`]'s order).
        priority: Priority,
        /// How long it may run, in milliseconds, before it fails as timed
        /// out; `None`: as long as it takes.
        timeout_ms: Option<u64>,
        /// How many times it runs again when it fails.
        retries: u32,
    },
    /// Forget `key`: drop its value, or the task if it has not finished. No
    /// message about `key` follows unless a new `Compute` asks for it.
    Release {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
    },
    /// Send `ToScheduler::Heartbeat` every `every_ms` milliseconds: a worker
    /// the scheduler does not hear from for a few times that is taken for
    /// dead. Sent right after `Registered`.
    Heartbeat {
        /// The interval, in milliseconds: from [`MIN_HEARTBEAT`] to
        /// [`MAX_HEARTBEAT`].
        every_ms: u64,
    },
    /// Fetch `key` from one of `holders` and keep a copy (a replica, asked
    /// for by a client's [`ToScheduler::Replicate`]); report
    /// `ToScheduler::DataAdded` once it is held, `ToScheduler::FetchFailed`
    /// for each holder that does not deliver it.
    Fetch {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// Its holders, tried in turn.
        holders: Vec<WorkerId>,
    },
    /// Answer to `RegisterWorker` instead of `Registered`: the worker may
    /// not join (its name is taken); the scheduler closes the connection.
    Refused {
        /// Why, for the worker's error; at most [`MAX_NAME`] bytes.
        reason: String,
    },
    /// Exit: every value this worker held is held by another worker too,
    /// and it runs nothing for the scheduler any more (it was retired). The
    /// worker closes the connection and ends, without registering again.
    Retire,
    /// Give the task `key` up if it has not started: drop it as by
    /// `Release` and answer [`ToScheduler::TaskGivenUp`]; otherwise (it
    /// runs, or ended, or is unknown here) answer [`ToScheduler::TaskKept`].
    /// Both carry `id`. The scheduler sends the task to another worker only
    /// once it was given up (scheduler rule S15), so it never runs twice.
    GiveUp {
        /// The task.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// Chosen by the scheduler, returned as is.
        id: u64,
    },
}

/// Messages from the scheduler to a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToClient {
    /// A worker's data port (sent before any message naming the worker).
    WorkerJoined {
        /// The worker.
        id: WorkerId,
        /// `host:port` of its data port; at most [`MAX_ADDRESS`] bytes.
        address: String,
    },
    /// A worker left.
    WorkerLeft {
        /// The worker.
        id: WorkerId,
    },
    /// A wanted key is computed; fetch it from one of `holders`.
    KeyInMemory {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// Workers holding it.
        holders: Vec<WorkerId>,
        /// Size of its encoding: at most [`MAX_FRAME`].
        nbytes: u64,
        /// Its encoding when at most [`INLINE_BYTES`] long (longer is out
        /// of range): no fetch needed.
        #[serde(with = "opt_bytes")]
        value: Option<Arc<[u8]>>,
    },
    /// A wanted key failed.
    KeyErred {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The failure, naming the task where it started.
        failure: WireFailure,
    },
    /// What happened to tasks of the client's build, for a client that
    /// asked with [`ToScheduler::Watch`].
    TaskEvents {
        /// In the order they happened.
        events: Vec<WireEvent>,
    },
    /// Answer to [`ToScheduler::Info`].
    Info {
        /// The request's id.
        id: u64,
        /// The cluster: workers, tasks per state and per function.
        snapshot: Snapshot,
    },
    /// Answer to [`ToScheduler::WhoHas`]: for each key asked, in order, the
    /// workers holding it (none when it is not in memory or unknown).
    WhoHas {
        /// The request's id.
        id: u64,
        /// One entry per key asked. (Not charged to the frame's budget
        /// entry by entry: a key held nowhere is one byte here and 24
        /// decoded, and a client may ask about a million of them; this comes
        /// from the client's own scheduler.)
        holders: Vec<Vec<WorkerId>>,
    },
    /// Answer to [`ToScheduler::RetireWorkers`]: every worker named is
    /// gone (`error` is `None`), or why none was retired.
    Retired {
        /// The request's id.
        id: u64,
        /// Why the request was refused, if it was.
        error: Option<String>,
    },
}

/// Something that happened to a task on a cluster ([`ToClient::TaskEvents`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireEvent {
    /// The task.
    #[serde(with = "wire_key")]
    pub key: WireKey,
    /// Its name, e.g. `inc`: at most [`MAX_NAME`] bytes.
    #[serde(with = "name")]
    pub name: Arc<str>,
    /// What happened.
    pub kind: WireEventKind,
}

/// What happened to a task; see [`WireEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireEventKind {
    /// Sent to `worker` to run.
    Started {
        /// The worker.
        worker: WorkerId,
    },
    /// Finished on `worker`.
    Finished {
        /// The worker.
        worker: WorkerId,
        /// The lane of its thread (see `ToScheduler::TaskFinished`).
        thread: u32,
        /// How long its op ran: at most [`MAX_TASK_DURATION`].
        duration_ns: u64,
        /// Size of its value's encoding: at most [`MAX_FRAME`].
        nbytes: u64,
    },
    /// Failed, on `worker` if it ran.
    Erred {
        /// The worker, if it ran.
        worker: Option<WorkerId>,
    },
    /// Forgotten: nobody wants it.
    Released,
    /// Its value was lost with `worker`.
    Lost {
        /// The worker that died.
        worker: WorkerId,
    },
}

/// Messages to a worker's data port. They carry keys only: nothing the data
/// port computes with (rule 5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToPeer {
    /// Send these keys' values; each is answered by `Data` or `Missing`.
    GetData {
        /// The keys.
        #[serde(with = "wire_keys")]
        keys: Vec<WireKey>,
    },
}

/// Messages from a worker's data port. A value's bytes are bounded by the
/// frame they come in (rule 5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromPeer {
    /// A key's value.
    Data {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
        /// The value's encoding.
        #[serde(with = "bytes")]
        bytes: Arc<[u8]>,
    },
    /// This worker does not hold the key (any more).
    Missing {
        /// The key.
        #[serde(with = "wire_key")]
        key: WireKey,
    },
}

/// [`FromPeer::Data`] borrowing its bytes, so a data server encodes a value
/// straight into the frame. Encodes exactly as `FromPeer` does (tested).
#[derive(Serialize)]
pub(crate) enum FromPeerRef<'a> {
    Data {
        #[serde(serialize_with = "wire_key::serialize")]
        key: &'a WireKey,
        /// As bytes, in one copy, not byte by byte as a slice would be.
        #[serde(serialize_with = "bytes::serialize_slice")]
        bytes: &'a [u8],
    },
}

/// [`ToScheduler::UpdateGraph`] with borrowed tasks ([`TaskSpecRef`]), as
/// a client sends a graph. Encodes exactly as `ToScheduler` does (tested):
/// its one variant has `UpdateGraph`'s place, the first.
#[derive(Serialize)]
pub(crate) enum ToSchedulerRef<'a> {
    UpdateGraph {
        tasks: &'a [TaskSpecRef<'a>],
        #[serde(serialize_with = "wire_keys::serialize")]
        wanted: &'a [WireKey],
    },
}

/// The bytes a new frame reserves (`Batch::push`).
const OPEN_FRAME: usize = 512;

/// Messages collected into frames: appends each message to the open frame,
/// sealing a frame once it passes [`SOFT_FRAME`] bytes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    open: Vec<u8>,
    sealed: Vec<Vec<u8>>,
}

impl Batch {
    /// Appends one message.
    pub(crate) fn push<M: Serialize>(&mut self, msg: &M) {
        self.push_within(msg, MAX_FRAME);
    }

    /// Appends one message, in a frame of its own if the open frame would
    /// pass `max` bytes with it (a value of a few hundred MiB after a small
    /// one: one frame of both would be refused by its reader).
    pub(crate) fn push_within<M: Serialize>(&mut self, msg: &M, max: usize) {
        if self.open.is_empty() {
            // Room for a few small messages at once: postcard appends a
            // byte at a time, and growing from nothing reallocates five or
            // six times per frame.
            self.open.reserve(OPEN_FRAME);
            self.open.extend_from_slice(&[0; 4]);
        }
        let before = self.open.len();
        let buf = std::mem::take(&mut self.open);
        // Our messages have no maps of unknown length or failing Serialize
        // impls, so encoding into a Vec cannot fail.
        self.open = postcard::to_extend(msg, buf).expect("protocol messages always encode");
        if before > 4 && self.open.len() - 4 > max {
            // Rare (a message of hundreds of MiB), so one copy of it is
            // cheaper than sizing every message before encoding it.
            let message = self.open.split_off(before);
            self.seal();
            let mut open = Vec::with_capacity(message.len() + 4);
            open.extend_from_slice(&[0; 4]);
            open.extend_from_slice(&message);
            self.open = open;
        }
        if self.open.len() >= SOFT_FRAME {
            self.seal();
        }
    }

    fn seal(&mut self) {
        if self.open.len() > 4 {
            let mut frame = std::mem::take(&mut self.open);
            let len = (frame.len() - 4) as u32;
            frame[..4].copy_from_slice(&len.to_le_bytes());
            self.sealed.push(frame);
        }
    }

    /// The frames sealed so far (length prefixes included), leaving the
    /// open one: a sender that must not hold many bytes at once hands these
    /// over as it goes.
    pub(crate) fn take_sealed(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.sealed)
    }

    /// The bytes of the frames waiting, sealed and open.
    pub(crate) fn bytes(&self) -> usize {
        self.open.len() + self.sealed.iter().map(Vec::len).sum::<usize>()
    }

    /// Whether no message is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.open.is_empty() && self.sealed.is_empty()
    }

    /// The finished frames (length prefixes included), leaving the batch
    /// empty.
    pub(crate) fn take_frames(&mut self) -> Vec<Vec<u8>> {
        self.seal();
        std::mem::take(&mut self.sealed)
    }
}

/// One message as a whole frame (tests, and one-off messages).
pub fn frame<M: Serialize>(msg: &M) -> Vec<u8> {
    let mut batch = Batch::default();
    batch.push(msg);
    let mut frames = batch.take_frames();
    frames.pop().expect("one message makes one frame")
}

/// Decodes the messages of one frame body.
///
/// # Errors
///
/// [`ProtocolError::Malformed`] if the body is not a sequence of `M`s, or is
/// empty; [`ProtocolError::OutOfRange`] if its messages would take more
/// memory than [`DECODE_FACTOR`] times its length plus [`DECODE_SLACK`]
/// (rule 5), found before they take it.
pub fn decode_batch<'a, M: Deserialize<'a>>(body: &'a [u8]) -> Result<Vec<M>, ProtocolError> {
    decode_counted(body, usize::MAX).map(|(msgs, _)| msgs)
}

/// What a frame's messages take decoded, named when it is past the
/// reader's whole frame budget (`net` rule 8): in [`decode_sized`]'s
/// refusal, and in the frame reader's.
pub(crate) const PAST_THE_BUDGET: &str = "memory a frame decodes to, against the frame budget";

/// As [`decode_batch`], with the memory the messages take: the frame's
/// length (what their strings and bytes can take) plus what rule 5
/// charged, the list of messages by its capacity. Decoding stops, before
/// it takes more, once that is past `most` too (a reader's whole frame
/// budget, `net` rule 8), with [`PAST_THE_BUDGET`].
fn decode_counted<'a, M: Deserialize<'a>>(
    mut body: &'a [u8],
    most: usize,
) -> Result<(Vec<M>, usize), ProtocolError> {
    if body.is_empty() {
        return Err(ProtocolError::Malformed(
            postcard::Error::DeserializeUnexpectedEnd,
        ));
    }
    let len = body.len();
    let own = len
        .saturating_mul(DECODE_FACTOR)
        .saturating_add(DECODE_SLACK);
    // What may be charged beyond the frame's bytes: rule 5's bound, or
    // less when the caller's budget has less room in all.
    let room = most.saturating_sub(len);
    let limit = own.min(room);
    let frame = charged::Frame::start(limit);
    let too_big = || {
        let (what, max) = if room < own {
            (PAST_THE_BUDGET, most)
        } else {
            ("memory a frame decodes to", limit)
        };
        ProtocolError::OutOfRange {
            what,
            value: u64::try_from(max.saturating_add(1)).unwrap_or(u64::MAX),
            min: 0,
            max: u64::try_from(max).unwrap_or(u64::MAX),
        }
    };
    let mut out = Vec::new();
    while !body.is_empty() {
        if out.len() == out.capacity() {
            // The list grows as `Vec` would, doubling, but charged for what
            // it allocates before it does: a message charged alone left
            // up to as much again uncounted in the list's spare room.
            let more = out.capacity().max(4);
            if !charged::charge(more.saturating_mul(std::mem::size_of::<M>())) {
                return Err(too_big());
            }
            out.reserve_exact(more);
        }
        let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| {
            if frame.spent() {
                too_big()
            } else {
                ProtocolError::Malformed(e)
            }
        })?;
        out.push(msg);
        body = rest;
    }
    Ok((out, len.saturating_add(frame.charged())))
}

/// Decodes the messages of one frame body and checks every number in them
/// against its range (rule 5).
///
/// # Errors
///
/// As [`decode_batch`], and [`ProtocolError::OutOfRange`] for the first
/// field out of its range.
pub(crate) fn decode_checked<'a, M: Deserialize<'a> + Bounded>(
    body: &'a [u8],
) -> Result<Vec<M>, ProtocolError> {
    decode_sized(body, usize::MAX).map(|(msgs, _)| msgs)
}

/// As [`decode_checked`], with the memory the messages take decoded, to
/// charge against the frame budget until they were handled (`net` rule 8):
/// at most `most` (the reader's whole budget), or the frame is refused as
/// out of range ([`PAST_THE_BUDGET`]) before its messages take more.
pub(crate) fn decode_sized<'a, M: Deserialize<'a> + Bounded>(
    body: &'a [u8],
    most: usize,
) -> Result<(Vec<M>, usize), ProtocolError> {
    let (msgs, bytes) = decode_counted::<M>(body, most)?;
    msgs.iter().try_for_each(Bounded::check)?;
    Ok((msgs, bytes))
}

/// A message whose numbers have ranges (rule 5).
pub(crate) trait Bounded {
    /// `Ok` when every field is within its documented range.
    fn check(&self) -> Result<(), ProtocolError>;
}

/// `value` within `min..=max`, or the error naming `what`.
fn within(what: &'static str, value: u64, min: u64, max: u64) -> Result<(), ProtocolError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ProtocolError::OutOfRange {
            what,
            value,
            min,
            max,
        })
    }
}

/// Whether `name` may name a worker: 1 to [`MAX_WORKER_NAME`] bytes, none
/// of them whitespace or a control character, so it reads unquoted in log
/// lines and on the dashboard.
pub fn valid_worker_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_WORKER_NAME
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A length (of bytes or a string) of at most `max`.
fn length(what: &'static str, len: usize, max: usize) -> Result<(), ProtocolError> {
    // usize fits u64 on every target rask builds for; saturate regardless.
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    within(what, len, 0, max as u64)
}

/// Resources as they travel: at most `MAX_RESOURCES` entries with names of
/// at most `MAX_RESOURCE_NAME` bytes (amounts are any `u64`: sums saturate).
fn bounded_resources(
    what: &'static str,
    resources: &rask_executor::Resources,
) -> Result<(), ProtocolError> {
    let entries = resources.milli();
    length(what, entries.len(), rask_executor::MAX_RESOURCES)?;
    entries
        .iter()
        .try_for_each(|(name, _)| length(what, name.len(), rask_executor::MAX_RESOURCE_NAME))
}

/// The inline value of a report: at most [`INLINE_BYTES`].
fn inline(what: &'static str, value: &Option<Arc<[u8]>>) -> Result<(), ProtocolError> {
    match value {
        Some(bytes) => length(what, bytes.len(), INLINE_BYTES),
        None => Ok(()),
    }
}

impl Bounded for ToScheduler {
    fn check(&self) -> Result<(), ProtocolError> {
        match self {
            ToScheduler::RegisterWorker {
                address,
                threads,
                resources,
                name,
            } => {
                length("RegisterWorker.address length", address.len(), MAX_ADDRESS)?;
                bounded_resources("RegisterWorker.resources", resources)?;
                within(
                    "RegisterWorker.name length",
                    name.len() as u64,
                    1,
                    MAX_WORKER_NAME as u64,
                )?;
                if !valid_worker_name(name) {
                    return Err(ProtocolError::Unexpected(
                        "a worker name with whitespace or control characters",
                    ));
                }
                within(
                    "RegisterWorker.threads",
                    u64::from(*threads),
                    1,
                    u64::from(MAX_THREADS),
                )
            }
            ToScheduler::RetireWorkers { names, .. } => names
                .iter()
                .try_for_each(|n| length("RetireWorkers.names length", n.len(), MAX_WORKER_NAME)),
            ToScheduler::TaskFinished {
                nbytes,
                duration_ns,
                value,
                thread,
                ..
            } => {
                within("TaskFinished.nbytes", *nbytes, 0, MAX_FRAME as u64)?;
                within(
                    "TaskFinished.duration_ns",
                    *duration_ns,
                    0,
                    duration_ns_of(MAX_TASK_DURATION),
                )?;
                inline("TaskFinished.value length", value)?;
                within(
                    "TaskFinished.thread",
                    u64::from(*thread),
                    0,
                    u64::from(MAX_THREADS),
                )
            }
            ToScheduler::Resources { memory_bytes } => {
                within("Resources.memory_bytes", *memory_bytes, 0, MAX_MEMORY)
            }
            ToScheduler::Memory { spill } => {
                within("Memory.limit_bytes", spill.limit_bytes, 0, MAX_MEMORY)?;
                within("Memory.spill_at_bytes", spill.spill_at_bytes, 0, MAX_MEMORY)?;
                within("Memory.pause_at_bytes", spill.pause_at_bytes, 0, MAX_MEMORY)?;
                within("Memory.memory_bytes", spill.memory_bytes, 0, MAX_MEMORY)?;
                within("Memory.spilled_bytes", spill.spilled_bytes, 0, MAX_MEMORY)
            }
            ToScheduler::UpdateGraph { tasks, .. } => tasks.iter().try_for_each(|t| {
                let a = &t.annotations;
                bounded_resources("TaskSpec.annotations.resources", &a.resources)?;
                length(
                    "TaskSpec.annotations.workers count",
                    a.workers.len(),
                    MAX_WORKERS_NAMED,
                )?;
                a.workers.iter().try_for_each(|w| {
                    length("TaskSpec.annotations.workers length", w.len(), MAX_ADDRESS)
                })
            }),
            // Keys and worker ids are only looked up; list lengths are
            // bounded by the frame; failures are text.
            ToScheduler::ReleaseKeys { .. }
            | ToScheduler::TaskErred { .. }
            | ToScheduler::TaskAbandoned { .. }
            | ToScheduler::DataAdded { .. }
            | ToScheduler::FetchFailed { .. }
            | ToScheduler::Heartbeat
            | ToScheduler::Leaving
            | ToScheduler::Watch { .. }
            | ToScheduler::Info { .. }
            | ToScheduler::WhoHas { .. }
            | ToScheduler::Replicate { .. }
            | ToScheduler::TaskSeceded { .. }
            | ToScheduler::TaskGivenUp { .. }
            | ToScheduler::TaskKept { .. } => Ok(()),
        }
    }
}

impl Bounded for ToWorker {
    fn check(&self) -> Result<(), ProtocolError> {
        match self {
            ToWorker::PeerJoined { address, .. } => {
                length("PeerJoined.address length", address.len(), MAX_ADDRESS)
            }
            ToWorker::Heartbeat { every_ms } => within(
                "Heartbeat.every_ms",
                *every_ms,
                millis_of(MIN_HEARTBEAT),
                millis_of(MAX_HEARTBEAT),
            ),
            // Ids and keys are only looked up, a priority only compared.
            ToWorker::Registered { .. }
            | ToWorker::PeerLeft { .. }
            | ToWorker::Compute { .. }
            | ToWorker::Release { .. }
            | ToWorker::Fetch { .. }
            | ToWorker::Retire
            | ToWorker::GiveUp { .. } => Ok(()),
            ToWorker::Refused { reason } => length("Refused.reason length", reason.len(), MAX_NAME),
        }
    }
}

impl Bounded for ToClient {
    fn check(&self) -> Result<(), ProtocolError> {
        match self {
            ToClient::WorkerJoined { address, .. } => {
                length("WorkerJoined.address length", address.len(), MAX_ADDRESS)
            }
            ToClient::KeyInMemory { nbytes, value, .. } => {
                within("KeyInMemory.nbytes", *nbytes, 0, MAX_FRAME as u64)?;
                inline("KeyInMemory.value length", value)
            }
            ToClient::TaskEvents { events } => events.iter().try_for_each(|e| {
                length("WireEvent.name length", e.name.len(), MAX_NAME)?;
                match e.kind {
                    WireEventKind::Finished {
                        thread,
                        duration_ns,
                        nbytes,
                        ..
                    } => {
                        within(
                            "WireEvent.thread",
                            u64::from(thread),
                            0,
                            u64::from(MAX_THREADS),
                        )?;
                        within(
                            "WireEvent.duration_ns",
                            duration_ns,
                            0,
                            duration_ns_of(MAX_TASK_DURATION),
                        )?;
                        within("WireEvent.nbytes", nbytes, 0, MAX_FRAME as u64)
                    }
                    _ => Ok(()),
                }
            }),
            // Shown to people, not computed with; lists bounded by the frame.
            ToClient::WorkerLeft { .. }
            | ToClient::KeyErred { .. }
            | ToClient::Info { .. }
            | ToClient::WhoHas { .. }
            | ToClient::Retired { .. } => Ok(()),
        }
    }
}

/// Keys only: nothing to compute with.
impl Bounded for ToPeer {
    fn check(&self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

/// A value's bytes are bounded by their frame; nothing else is a number.
impl Bounded for FromPeer {
    fn check(&self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

/// `d` in whole milliseconds (the limits above are far below `u64::MAX` ms).
fn millis_of(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `d` in nanoseconds, saturating (30 days is about 2^51 ns).
pub(crate) fn duration_ns_of(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Reads a frame length prefix, enforcing [`MAX_FRAME`].
pub(crate) fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// How an address is reached (`tls.rs` rule 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// `tcp://host:port`, or a bare `host:port`.
    Tcp,
    /// `tls://host:port`.
    Tls,
    /// `unix:PATH` (or `unix://PATH`): a Unix socket of this machine, e.g.
    /// the one a [`LocalCluster`](crate::LocalCluster)'s workers reach
    /// their scheduler at. Cheaper per message than TCP over loopback: no
    /// TCP/IP stack on either side. Tokens are proved as over TCP.
    Unix,
}

impl Scheme {
    /// How an address of this scheme starts.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp://",
            Scheme::Tls => "tls://",
            Scheme::Unix => "unix:",
        }
    }
}

/// Parses `tcp://host:port`, `tls://host:port`, `host:port` or `unix:PATH`
/// into its scheme and `host:port` (the path for `unix:`).
pub(crate) fn parse_address(address: &str) -> Option<(Scheme, &str)> {
    if let Some(path) = address.strip_prefix("unix:") {
        // `unix:///run/x.sock` names the same path as `unix:/run/x.sock`.
        let path = match path.strip_prefix("//") {
            Some(rest) if rest.starts_with('/') => rest,
            _ => path,
        };
        if path.is_empty() || path.contains("://") {
            return None;
        }
        return Some((Scheme::Unix, path));
    }
    let (scheme, rest) = match address.strip_prefix("tls://") {
        Some(rest) => (Scheme::Tls, rest),
        None => (
            Scheme::Tcp,
            address.strip_prefix("tcp://").unwrap_or(address),
        ),
    };
    if rest.is_empty() || rest.contains("://") || !rest.contains(':') {
        return None;
    }
    Some((scheme, rest))
}

/// The memory budget of the frame being decoded (rule 5), on this thread:
/// [`decode_batch`] sets it, each message and each entry of a list that
/// takes far more memory than its encoding is charged to it as it is read,
/// so a frame is refused before it takes more. Outside `decode_batch`
/// nothing is charged.
mod charged {
    use std::cell::Cell;
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Error as _, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    thread_local! {
        /// Bytes left, while a frame is decoded; whether it ran out.
        static LEFT: Cell<Option<(usize, bool)>> = const { Cell::new(None) };
    }

    /// The budget of one frame, until dropped (then the one before, if
    /// frames are decoded within frames).
    pub(super) struct Frame {
        outer: Option<(usize, bool)>,
        budget: usize,
    }

    impl Frame {
        pub(super) fn start(bytes: usize) -> Frame {
            Frame {
                outer: LEFT.with(|l| l.replace(Some((bytes, false)))),
                budget: bytes,
            }
        }

        /// The bytes charged so far.
        pub(super) fn charged(&self) -> usize {
            LEFT.with(|l| l.get().map_or(0, |(left, _)| self.budget - left))
        }

        /// Whether the frame asked for more than its budget.
        pub(super) fn spent(&self) -> bool {
            LEFT.with(|l| l.get().is_some_and(|(_, spent)| spent))
        }
    }

    impl Drop for Frame {
        fn drop(&mut self) {
            LEFT.with(|l| l.set(self.outer));
        }
    }

    /// Takes `bytes` from the frame's budget; `false` once it is spent.
    pub(super) fn charge(bytes: usize) -> bool {
        LEFT.with(|l| match l.get() {
            None => true,
            Some((left, _)) => match left.checked_sub(bytes) {
                Some(rest) => {
                    l.set(Some((rest, false)));
                    true
                }
                None => {
                    l.set(Some((0, true)));
                    false
                }
            },
        })
    }

    /// `serde(deserialize_with)` for a list whose entries take far more
    /// memory than their encoding (an empty string: one byte, 24
    /// decoded): each entry is charged as it is read.
    pub(super) fn vec<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(Charged(PhantomData))
    }

    struct Charged<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Charged<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut entries = Vec::new();
            loop {
                if !charge(std::mem::size_of::<T>()) {
                    return Err(A::Error::custom("a frame decodes to too much memory"));
                }
                match seq.next_element()? {
                    Some(entry) => entries.push(entry),
                    None => return Ok(entries),
                }
            }
        }
    }

    /// [`Resources`](rask_executor::Resources) as they travel (a list of
    /// `(name, thousandths)`), charged as [`vec()`].
    pub(super) fn resources<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<rask_executor::Resources, D::Error> {
        vec::<D, (String, u64)>(d).map(rask_executor::Resources::from_milli)
    }

    /// [`Annotations`](rask_executor::Annotations) as they travel: the
    /// same fields in the same order, its lists charged.
    #[derive(Deserialize)]
    struct Annotations {
        priority: i32,
        #[serde(deserialize_with = "resources")]
        resources: rask_executor::Resources,
        #[serde(deserialize_with = "vec")]
        workers: Vec<String>,
    }

    pub(super) fn annotations<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<rask_executor::Annotations, D::Error> {
        Annotations::deserialize(d).map(|a| rask_executor::Annotations {
            priority: a.priority,
            resources: a.resources,
            workers: a.workers,
        })
    }
}

/// `serde(with)` for a [`WireKey`] as postcard bytes (rule 4): its length
/// (32, one byte) and its 32 bytes, written and read as one slice. Serde's
/// own form of an array takes its bytes one call each, a fifth of what a
/// scheduler spent decoding the frames of a `map` of 100 000 tasks.
mod wire_key {
    use std::fmt;

    use serde::de::Visitor;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::WireKey;

    /// Only a whole key: no other length can be written as one.
    pub(super) fn serialize<S: Serializer>(key: &WireKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(key)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WireKey, D::Error> {
        d.deserialize_bytes(KeyVisitor)
    }

    /// A key in a list or a tuple, in the same form.
    #[derive(Clone, Copy)]
    pub(super) struct Owned(pub(super) WireKey);

    impl Serialize for Owned {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Owned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Owned, D::Error> {
            deserialize(d).map(Owned)
        }
    }

    struct KeyVisitor;

    impl Visitor<'_> for KeyVisitor {
        type Value = WireKey;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a key's 32 bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<WireKey, E> {
            WireKey::try_from(v).map_err(|_| E::invalid_length(v.len(), &self))
        }
    }
}

/// `serde(with)` for a list of keys, each as [`wire_key`] writes it.
mod wire_keys {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::wire_key::Owned;
    use super::WireKey;

    pub(super) fn serialize<K: AsRef<[WireKey]> + ?Sized, S: Serializer>(
        keys: &K,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(keys.as_ref().iter().copied().map(Owned))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<WireKey>, D::Error> {
        // `Owned` is a `WireKey` in its layout: collected in place.
        Vec::<Owned>::deserialize(d).map(|keys| keys.into_iter().map(|k| k.0).collect())
    }
}

/// `serde(with)` for `ToWorker::Compute::who_has`: each key as
/// [`wire_key`] writes it, then its holders.
mod who_has {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::wire_key::Owned;
    use super::{WireKey, WorkerId};

    pub(super) fn serialize<S: Serializer>(
        entries: &[(WireKey, Vec<WorkerId>)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(entries.iter().map(|(key, holders)| (Owned(*key), holders)))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(WireKey, Vec<WorkerId>)>, D::Error> {
        Vec::<(Owned, Vec<WorkerId>)>::deserialize(d)
            .map(|entries| entries.into_iter().map(|(k, h)| (k.0, h)).collect())
    }
}

/// `serde(with)` for a task's name or function, `Arc<str>`, written as a
/// string. Read as bytes (postcard writes a string as its bytes), and
/// taken from the last few this thread read when it is one of them: the
/// tasks of a graph or a `map` share a handful of names, so most are then
/// neither checked as UTF-8 again nor allocated. Any other string is
/// checked and allocated as before.
mod name {
    use std::cell::RefCell;
    use std::fmt;
    use std::sync::Arc;

    use serde::de::Visitor;
    use serde::{Deserializer, Serializer};

    /// How many names a thread keeps.
    const KEPT: usize = 8;

    thread_local! {
        /// The names this thread read last, and where the next one goes.
        static LAST: RefCell<([Option<Arc<str>>; KEPT], usize)> =
            const { RefCell::new(([const { None }; KEPT], 0)) };
    }

    pub(super) fn serialize<S: Serializer>(name: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        d.deserialize_bytes(NameVisitor)
    }

    /// `bytes` as a name: one this thread read lately, or a new one.
    fn name(bytes: &[u8]) -> Result<Arc<str>, std::str::Utf8Error> {
        LAST.with(|last| {
            let (kept, next) = &mut *last.borrow_mut();
            if let Some(known) = kept.iter().flatten().find(|k| k.as_bytes() == bytes) {
                return Ok(known.clone());
            }
            let new: Arc<str> = Arc::from(std::str::from_utf8(bytes)?);
            kept[*next] = Some(new.clone());
            *next = (*next + 1) % KEPT;
            Ok(new)
        })
    }

    struct NameVisitor;

    impl Visitor<'_> for NameVisitor {
        type Value = Arc<str>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Arc<str>, E> {
            name(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(v), &self))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Arc<str>, E> {
            self.visit_bytes(v.as_bytes())
        }
    }
}

/// `serde(with)` for `Option<Arc<[u8]>>`: postcard's option tag, then the
/// bytes as [`bytes`] writes them.
mod opt_bytes {
    use std::fmt;
    use std::sync::Arc;

    use serde::de::Visitor;
    use serde::{Deserializer, Serialize, Serializer};

    struct Borrowed<'a>(&'a Arc<[u8]>);

    impl Serialize for Borrowed<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::bytes::serialize(self.0, s)
        }
    }

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Arc<[u8]>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            None => s.serialize_none(),
            Some(bytes) => s.serialize_some(&Borrowed(bytes)),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<[u8]>>, D::Error> {
        d.deserialize_option(OptionVisitor)
    }

    struct OptionVisitor;

    impl<'de> Visitor<'de> for OptionVisitor {
        type Value = Option<Arc<[u8]>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("optional bytes")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::bytes::deserialize(d).map(Some)
        }
    }
}

/// `serde(with)` for `Arc<[u8]>` as postcard bytes: one copy in, none out.
mod bytes {
    use std::fmt;
    use std::sync::Arc;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    /// As [`serialize`], for borrowed bytes.
    pub(super) fn serialize_slice<S: Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        d.deserialize_bytes(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Arc<[u8]>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok(Arc::from(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(v.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A key hashes by both of its halves, under its map's own seed: keys
    /// alike in one half still spread, and no key's bucket is the same in
    /// every map.
    #[test]
    fn key_maps_hash_both_halves_of_a_key_under_their_own_seed() {
        use std::hash::BuildHasher;
        let hashing = KeyHashing::default();
        let mut seen = std::collections::HashSet::new();
        for i in 0u16..512 {
            let mut high = [7u8; 32];
            high[16..18].copy_from_slice(&i.to_le_bytes());
            let mut low = [7u8; 32];
            low[..2].copy_from_slice(&i.to_le_bytes());
            assert!(
                seen.insert(hashing.hash_one(high)),
                "high half {i} repeats a hash"
            );
            assert!(
                seen.insert(hashing.hash_one(low)),
                "low half {i} repeats a hash"
            );
            assert_eq!(hashing.hash_one(high), hashing.hash_one(high));
        }
        let other = KeyHashing::default();
        assert_ne!(other.hash_one([7u8; 32]), hashing.hash_one([7u8; 32]));
        // Not a key: foldhash's own byte hashing, which also sees the length.
        assert_ne!(hashing.hash_one([7u8; 31]), hashing.hash_one([7u8; 33]));
        let key_of = |i: u16| {
            let mut key = [0u8; 32];
            key[30..].copy_from_slice(&i.to_le_bytes());
            key
        };
        let map: KeyMap<WireKey, u16> = (0u16..512).map(|i| (key_of(i), i)).collect();
        assert!((0u16..512).all(|i| map.get(&key_of(i)) == Some(&i)));
    }

    #[test]
    fn golden_handshake() {
        let build = BuildId::from_bytes([0xab; 32]);
        let frame = Handshake::new(Role::Worker, build, [0xcd; 32], true).to_frame();
        let expected = [
            "48000000", // body length: 72 bytes
            "5241534b", // RASK
            "0900",     // version 9
            "02",       // role: worker
            "01",       // flags: authenticates
            &"ab".repeat(32),
            &"cd".repeat(32),
        ]
        .concat();
        assert_eq!(hex(&frame), expected);
        assert_eq!(frame[..4], HANDSHAKE_PREFIX);
        let back = Handshake::parse(&frame).unwrap();
        assert_eq!(back, Handshake::new(Role::Worker, build, [0xcd; 32], true));
        assert_eq!(back.build, build);
        assert!(back.authenticates);
        let insecure = Handshake::new(Role::Client, build, [0; 32], false).to_frame();
        assert_eq!(insecure[11], 0);
        assert!(!Handshake::parse(&insecure).unwrap().authenticates);
    }

    #[test]
    fn golden_proof_frame() {
        let frame = proof_frame(&[0x5a; PROOF_LEN]);
        assert_eq!(hex(&frame), format!("20000000{}", "5a".repeat(32)));
        assert_eq!(frame[..4], PROOF_PREFIX);
    }

    #[test]
    fn old_handshakes_are_refused_for_their_version() {
        // A version-3 worker's handshake: 8-byte body, no build id.
        let old: [u8; 12] = [8, 0, 0, 0, b'R', b'A', b'S', b'K', 3, 0, 2, 0];
        assert_eq!(old[..4], OLD_HANDSHAKE_PREFIX);
        assert!(matches!(
            old_handshake(&old[4..]),
            ProtocolError::Version {
                ours: VERSION,
                theirs: 3
            }
        ));
        // A version-4 client's: a 40-byte body with a build id.
        let mut v4 = vec![40, 0, 0, 0, b'R', b'A', b'S', b'K', 4, 0, 1, 0];
        v4.extend([0xab; 32]);
        assert_eq!(v4[..4], V4_HANDSHAKE_PREFIX);
        assert_eq!(v4.len(), 4 + V4_HANDSHAKE_BODY);
        assert!(matches!(
            old_handshake(&v4[4..]),
            ProtocolError::Version {
                ours: VERSION,
                theirs: 4
            }
        ));
        let mut junk = old;
        junk[4] = b'X';
        assert!(matches!(old_handshake(&junk[4..]), ProtocolError::NotRask));
        // What a version-4 peer is answered: its own layout, naming 9.
        let answer = v4_refusal(Role::Scheduler);
        assert_eq!(
            hex(&answer),
            format!("280000005241534b09000400{}", "00".repeat(32))
        );
    }

    #[test]
    fn handshake_rejects_junk_and_other_versions() {
        let mut junk = [b'x'; HANDSHAKE_FRAME];
        junk[..12].copy_from_slice(b"GET / HTTP/1");
        assert!(matches!(
            Handshake::parse(&junk),
            Err(ProtocolError::NotRask)
        ));
        let hello = Handshake::new(Role::Client, BuildId::NONE, [0; 32], false);
        let mut other = hello.to_frame();
        other[8] = 99;
        assert!(matches!(
            Handshake::parse(&other),
            Err(ProtocolError::Version {
                ours: VERSION,
                theirs: 99
            })
        ));
        let mut role = hello.to_frame();
        role[10] = 77;
        assert!(matches!(
            Handshake::parse(&role),
            Err(ProtocolError::NotRask)
        ));
        let mut flags = hello.to_frame();
        flags[11] = 2;
        assert!(matches!(
            Handshake::parse(&flags),
            Err(ProtocolError::NotRask)
        ));
    }

    #[test]
    fn golden_compute_frame() {
        let msg = ToWorker::Compute {
            key: [1; 32],
            run: 300,
            name: "inc".into(),
            function: "inc".into(),
            payload: Arc::from(&[7u8, 8][..]),
            deps: vec![[2; 32]],
            who_has: vec![([2; 32], vec![WorkerId(3)])],
            priority: Priority {
                user: 0,
                order: 300,
            },
            timeout_ms: Some(1500),
            retries: 2,
        };
        let frame = frame(&msg);
        let expected = [
            "7c000000", // body length: 124 bytes
            "03",       // variant: Compute
            "20",       // the key: 32 bytes
            &"01".repeat(32),
            "ac02",     // run: 300 (varint)
            "03696e63", // name "inc"
            "03696e63", // function "inc"
            "020708",   // payload [7, 8]
            "01",       // one dep, 32 bytes
            "20",
            &"02".repeat(32),
            "01", // one who_has entry, its key
            "20",
            &"02".repeat(32),
            "0103",   // holders [3]
            "00ac02", // priority: user 0, order 300 (varints)
            "01dc0b", // timeout: some, 1500 ms
            "02",     // retries: 2
        ]
        .concat();
        assert_eq!(hex(&frame), expected);
        let back: Vec<ToWorker> = decode_batch(&frame[4..]).unwrap();
        assert_eq!(back, vec![msg]);
    }

    #[test]
    fn golden_replicate_and_fetch_frames() {
        let replicate = ToScheduler::Replicate {
            keys: vec![[4; 32]],
        };
        let expected = [
            "23000000", // body length: 35 bytes
            "0d",       // variant: Replicate
            "01",       // one key, 32 bytes
            "20",
            &"04".repeat(32),
        ]
        .concat();
        assert_eq!(hex(&frame(&replicate)), expected);
        let back: Vec<ToScheduler> = decode_checked(&frame(&replicate)[4..]).unwrap();
        assert_eq!(back, vec![replicate]);
        let fetch = ToWorker::Fetch {
            key: [5; 32],
            holders: vec![WorkerId(1), WorkerId(300)],
        };
        let expected = [
            "26000000", // body length: 38 bytes
            "06",       // variant: Fetch
            "20",       // the key: 32 bytes
            &"05".repeat(32),
            "02",     // two holders
            "01ac02", // 1, then 300 as a varint
        ]
        .concat();
        assert_eq!(hex(&frame(&fetch)), expected);
        let back: Vec<ToWorker> = decode_checked(&frame(&fetch)[4..]).unwrap();
        assert_eq!(back, vec![fetch]);
    }

    #[test]
    fn a_message_that_would_pass_the_frame_limit_starts_a_frame_of_its_own() {
        let small = FromPeer::Missing { key: [1; 32] };
        let big = FromPeer::Data {
            key: [2; 32],
            bytes: Arc::from(vec![7u8; 900]),
        };
        let mut batch = Batch::default();
        batch.push_within(&small, 1000);
        batch.push_within(&big, 1000);
        batch.push_within(&small, 1000);
        let frames = batch.take_frames();
        let lens: Vec<usize> = frames.iter().map(|f| f.len() - 4).collect();
        assert_eq!(frames.len(), 2, "{lens:?}");
        assert!(lens.iter().all(|&l| l <= 1000), "{lens:?}");
        let mut back: Vec<FromPeer> = Vec::new();
        for f in &frames {
            back.extend(decode_batch::<FromPeer>(&f[4..]).unwrap());
        }
        assert_eq!(back, vec![small.clone(), big, small.clone()]);
        // Within the limit, one frame as before.
        let mut batch = Batch::default();
        batch.push_within(&small, 1000);
        batch.push_within(&small, 1000);
        assert_eq!(batch.take_frames().len(), 1);
    }

    #[test]
    fn golden_task_finished_batch() {
        let mut batch = Batch::default();
        for i in 0..2u8 {
            batch.push(&ToScheduler::TaskFinished {
                key: [i; 32],
                run: 7 + u64::from(i),
                nbytes: 1,
                duration_ns: 1000,
                value: (i == 1).then(|| Arc::from(&[42u8][..])),
                thread: u32::from(i) * 200,
            });
        }
        let frames = batch.take_frames();
        assert_eq!(frames.len(), 1);
        // Variant, key (its length, 32, then its bytes), run (varint), nbytes, duration (varint), the
        // value: none, or some (01) and its bytes with their length; then
        // the thread's lane (varint: 0, then 200 as c8 01).
        let one = format!("0320{}0701e8070000", "00".repeat(32));
        let two = format!("0320{}0801e80701012ac801", "01".repeat(32));
        assert_eq!(hex(&frames[0]), format!("53000000{one}{two}"));
        let back: Vec<ToScheduler> = decode_batch(&frames[0][4..]).unwrap();
        assert_eq!(back.len(), 2);
        assert!(
            matches!(&back[1], ToScheduler::TaskFinished { value: Some(v), .. } if **v == [42])
        );
    }

    #[test]
    fn golden_data_frame() {
        let msg = FromPeer::Data {
            key: [9; 32],
            bytes: Arc::from(&[42u8][..]),
        };
        assert_eq!(
            hex(&frame(&msg)),
            format!("24000000 0020{}012a", "09".repeat(32)).replace(' ', "")
        );
    }

    #[test]
    fn a_key_of_another_length_is_malformed() {
        let good = frame(&ToScheduler::ReleaseKeys {
            keys: vec![[6; 32]],
        });
        // Variant, one key, its length, its bytes.
        let body = &good[4..];
        assert_eq!(body[1..3], [1, 32]);
        assert_eq!(
            decode_checked::<ToScheduler>(body).unwrap(),
            vec![ToScheduler::ReleaseKeys {
                keys: vec![[6; 32]]
            }]
        );
        for len in [0u8, 1, 31, 33, 64] {
            let mut bad = body[..2].to_vec();
            bad.push(len);
            bad.extend(std::iter::repeat_n(6, usize::from(len)));
            assert!(
                decode_checked::<ToScheduler>(&bad).is_err(),
                "a key of {len} bytes was taken"
            );
        }
    }

    #[test]
    fn names_read_lately_are_shared_and_every_name_reads_back_as_written() {
        let spec = |key: u8, name: &str| TaskSpec {
            key: [key; 32],
            name: name.into(),
            function: "f".into(),
            payload: Arc::from(&[][..]),
            deps: Vec::new(),
            timeout_ms: None,
            retries: 0,
            annotations: rask_executor::Annotations::default(),
        };
        // More names than a thread keeps, each twice, so some are
        // forgotten and read again.
        let names: Vec<String> = (0..20).map(|i| format!("task-{i}-é")).collect();
        let tasks: Vec<TaskSpec> = names
            .iter()
            .chain(&names)
            .enumerate()
            .map(|(i, n)| spec(i as u8, n))
            .collect();
        let sent = ToScheduler::UpdateGraph {
            tasks,
            wanted: Vec::new(),
        };
        let back = decode_checked::<ToScheduler>(&frame(&sent)[4..]).unwrap();
        assert_eq!(back, vec![sent.clone()]);
        let ToScheduler::UpdateGraph { tasks, .. } = &back[0] else {
            unreachable!()
        };
        // The same name in a row is one allocation.
        let pair = ToScheduler::UpdateGraph {
            tasks: vec![spec(1, "inc"), spec(2, "inc")],
            wanted: Vec::new(),
        };
        let back = decode_checked::<ToScheduler>(&frame(&pair)[4..]).unwrap();
        let ToScheduler::UpdateGraph { tasks: two, .. } = &back[0] else {
            unreachable!()
        };
        assert!(Arc::ptr_eq(&two[0].name, &two[1].name));
        assert!(Arc::ptr_eq(&two[0].function, &two[1].function));
        assert_eq!(tasks.len(), 40);
        // Bytes that are not UTF-8 are no name, known ones or not.
        let body = frame(&pair);
        let at = body
            .windows(4)
            .position(|w| w == b"\x03inc")
            .expect("the name's bytes");
        let mut bad = body[4..].to_vec();
        bad[at - 4 + 1] = 0xff;
        assert!(decode_checked::<ToScheduler>(&bad).is_err());
    }

    #[test]
    fn borrowed_data_encodes_like_owned() {
        let owned = FromPeer::Data {
            key: [3; 32],
            bytes: Arc::from(&[1u8, 2, 3][..]),
        };
        let borrowed = FromPeerRef::Data {
            key: &[3; 32],
            bytes: &[1, 2, 3],
        };
        assert_eq!(frame(&owned), frame(&borrowed));
    }

    /// A task with everything a `TaskSpec` carries, for the borrowed form.
    struct Full {
        name: &'static str,
        timeout: Option<std::time::Duration>,
        retries: u32,
        annotations: Option<rask_executor::Annotations>,
    }

    impl rask_executor::Op for Full {
        fn run(
            &self,
            _: &mut [Option<rask_executor::Value>],
        ) -> Result<rask_executor::Value, rask_executor::OpError> {
            Ok(Arc::new(()))
        }
        fn name(&self) -> &str {
            self.name
        }
        fn to_wire(&self) -> Result<rask_executor::WireTask, rask_executor::WireError> {
            Ok(rask_executor::WireTask {
                function: format!("fn::{}", self.name),
                payload: self.name.bytes().rev().collect(),
            })
        }
        fn timeout(&self) -> Option<std::time::Duration> {
            self.timeout
        }
        fn retries(&self) -> u32 {
            self.retries
        }
        fn annotations(&self) -> Option<&rask_executor::Annotations> {
            self.annotations.as_ref()
        }
    }

    #[test]
    fn a_borrowed_graph_encodes_like_owned() {
        let mut builder = rask_executor::PlanBuilder::with_capacity(4);
        let mut annotations = rask_executor::Annotations {
            priority: -3,
            resources: rask_executor::Resources::parse("GPU=2").unwrap(),
            workers: vec!["w1".into()],
        };
        let mut push =
            |i: u8, deps: &[u32], full: Full| builder.push(Key([i; 32]), Arc::new(full), deps);
        let a = push(
            1,
            &[],
            Full {
                name: "a",
                timeout: None,
                retries: 0,
                annotations: None,
            },
        );
        let b = push(
            2,
            &[],
            Full {
                name: "bee",
                timeout: Some(std::time::Duration::from_millis(1500)),
                retries: 2,
                annotations: Some(annotations.clone()),
            },
        );
        annotations.workers.clear();
        let c = push(
            3,
            &[a, b, a],
            Full {
                name: "",
                timeout: Some(std::time::Duration::MAX),
                retries: u32::MAX,
                annotations: Some(annotations),
            },
        );
        builder.output(c);
        builder.output(b);
        let plan = builder.build();
        let wires: Vec<_> = plan
            .tasks()
            .iter()
            .map(|t| t.op().to_wire().unwrap())
            .collect();
        let wanted = vec![[3; 32], [2; 32]];
        let owned = ToScheduler::UpdateGraph {
            tasks: (0..3)
                .map(|i| TaskSpec::of(&plan, i, wires[i as usize].clone()))
                .collect(),
            wanted: wanted.clone(),
        };
        let tasks: Vec<_> = (0..3)
            .map(|i| TaskSpecRef::of(&plan, i, &wires[i as usize]))
            .collect();
        let borrowed = ToSchedulerRef::UpdateGraph {
            tasks: &tasks,
            wanted: &wanted,
        };
        assert_eq!(frame(&owned), frame(&borrowed));
        // And it decodes to the owned message.
        let decoded = decode_batch::<ToScheduler>(&frame(&borrowed)[4..]).unwrap();
        assert_eq!(decoded, vec![owned]);
    }

    #[test]
    fn big_batches_are_split_into_frames() {
        let mut batch = Batch::default();
        let payload: Arc<[u8]> = vec![0u8; 1 << 20].into();
        for _ in 0..10 {
            batch.push(&FromPeer::Data {
                key: [0; 32],
                bytes: payload.clone(),
            });
        }
        let frames = batch.take_frames();
        assert!(frames.len() >= 2);
        let total: usize = frames
            .iter()
            .map(|f| decode_batch::<FromPeer>(&f[4..]).unwrap().len())
            .sum();
        assert_eq!(total, 10);
    }

    #[test]
    fn malformed_and_oversized_are_errors() {
        assert!(matches!(
            decode_batch::<ToScheduler>(&[0xff, 0xff]),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(decode_batch::<ToScheduler>(&[]).is_err());
        assert!(matches!(
            frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert_eq!(frame_len(16u32.to_le_bytes()).unwrap(), 16);
    }

    /// The field named by a decoding error, if it is out of range.
    fn out_of_range<M: Serialize + for<'a> Deserialize<'a> + Bounded>(
        msg: &M,
    ) -> Option<&'static str> {
        match decode_checked::<M>(&frame(msg)[4..]) {
            Ok(_) => None,
            Err(ProtocolError::OutOfRange { what, .. }) => Some(what),
            Err(e) => panic!("{e}"),
        }
    }

    fn finished(nbytes: u64, duration_ns: u64, value: usize) -> ToScheduler {
        ToScheduler::TaskFinished {
            key: [0; 32],
            run: 1,
            nbytes,
            duration_ns,
            value: (value > 0).then(|| Arc::from(vec![0u8; value])),
            thread: 0,
        }
    }

    #[test]
    fn numbers_out_of_their_range_are_refused_at_decoding() {
        let register = |threads, address: usize| ToScheduler::RegisterWorker {
            address: "a".repeat(address),
            threads,
            resources: Default::default(),
            name: "w-1".into(),
        };
        assert_eq!(out_of_range(&register(1, 14)), None);
        assert_eq!(out_of_range(&register(MAX_THREADS, MAX_ADDRESS)), None);
        for threads in [0, MAX_THREADS + 1, u32::MAX] {
            assert_eq!(
                out_of_range(&register(threads, 14)),
                Some("RegisterWorker.threads")
            );
        }
        assert_eq!(
            out_of_range(&register(1, MAX_ADDRESS + 1)),
            Some("RegisterWorker.address length")
        );
        let named = |name: &str| ToScheduler::RegisterWorker {
            address: "a:1".into(),
            threads: 1,
            resources: Default::default(),
            name: name.into(),
        };
        assert_eq!(out_of_range(&named(&"n".repeat(MAX_WORKER_NAME))), None);
        for bad in [String::new(), "n".repeat(MAX_WORKER_NAME + 1)] {
            assert_eq!(
                out_of_range(&named(&bad)),
                Some("RegisterWorker.name length")
            );
        }
        for bad in ["a b", "a\u{1b}[2J", "a\n"] {
            assert!(matches!(
                decode_checked::<ToScheduler>(&frame(&named(bad))[4..]),
                Err(ProtocolError::Unexpected(_))
            ));
        }
        let retire = |name: String| ToScheduler::RetireWorkers {
            id: 1,
            names: vec![name],
        };
        assert_eq!(out_of_range(&retire("n".repeat(MAX_WORKER_NAME))), None);
        assert_eq!(
            out_of_range(&retire("n".repeat(MAX_WORKER_NAME + 1))),
            Some("RetireWorkers.names length")
        );

        let max_ns = duration_ns_of(MAX_TASK_DURATION);
        assert_eq!(
            out_of_range(&finished(MAX_FRAME as u64, max_ns, INLINE_BYTES)),
            None
        );
        assert_eq!(
            out_of_range(&finished(MAX_FRAME as u64 + 1, 0, 0)),
            Some("TaskFinished.nbytes")
        );
        assert_eq!(
            out_of_range(&finished(u64::MAX, 0, 0)),
            Some("TaskFinished.nbytes")
        );
        assert_eq!(
            out_of_range(&finished(1, max_ns + 1, 0)),
            Some("TaskFinished.duration_ns")
        );
        assert_eq!(
            out_of_range(&finished(1, u64::MAX, 0)),
            Some("TaskFinished.duration_ns")
        );
        assert_eq!(
            out_of_range(&finished(1, 0, INLINE_BYTES + 1)),
            Some("TaskFinished.value length")
        );
        let on_lane = |lane| match finished(1, 0, 0) {
            ToScheduler::TaskFinished {
                key,
                run,
                nbytes,
                duration_ns,
                value,
                ..
            } => ToScheduler::TaskFinished {
                key,
                run,
                nbytes,
                duration_ns,
                value,
                thread: lane,
            },
            other => other,
        };
        assert_eq!(out_of_range(&on_lane(MAX_THREADS)), None);
        assert_eq!(
            out_of_range(&on_lane(MAX_THREADS + 1)),
            Some("TaskFinished.thread")
        );

        let beat = |every_ms| ToWorker::Heartbeat { every_ms };
        assert_eq!(out_of_range(&beat(1)), None);
        assert_eq!(out_of_range(&beat(3_600_000)), None);
        for every_ms in [0, 3_600_001, u64::MAX] {
            assert_eq!(out_of_range(&beat(every_ms)), Some("Heartbeat.every_ms"));
        }
        let peer = ToWorker::PeerJoined {
            id: WorkerId(1),
            address: "a".repeat(MAX_ADDRESS + 1),
        };
        assert_eq!(out_of_range(&peer), Some("PeerJoined.address length"));

        let joined = ToClient::WorkerJoined {
            id: WorkerId(1),
            address: "a".repeat(MAX_ADDRESS + 1),
        };
        assert_eq!(out_of_range(&joined), Some("WorkerJoined.address length"));
        let in_memory = |nbytes, value: usize| ToClient::KeyInMemory {
            key: [0; 32],
            holders: vec![WorkerId(u32::MAX)],
            nbytes,
            value: (value > 0).then(|| Arc::from(vec![0u8; value])),
        };
        assert_eq!(out_of_range(&in_memory(MAX_FRAME as u64, 1)), None);
        assert_eq!(
            out_of_range(&in_memory(u64::MAX, 0)),
            Some("KeyInMemory.nbytes")
        );
        assert_eq!(
            out_of_range(&in_memory(1, INLINE_BYTES + 1)),
            Some("KeyInMemory.value length")
        );
    }

    #[test]
    fn one_message_out_of_range_refuses_its_whole_frame() {
        let mut batch = Batch::default();
        batch.push(&ToScheduler::Heartbeat);
        batch.push(&finished(u64::MAX, 0, 0));
        let frames = batch.take_frames();
        assert!(decode_batch::<ToScheduler>(&frames[0][4..]).is_ok());
        let err = decode_checked::<ToScheduler>(&frames[0][4..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "value out of range: TaskFinished.nbytes is {}, allowed 0..={MAX_FRAME}",
                u64::MAX
            )
        );
    }

    #[test]
    fn failures_round_trip() {
        let mut f = Failure::new(
            Key([5; 32]),
            "boom".into(),
            FailureKind::Panicked,
            "oh no".into(),
        );
        f.location = Some("src/main.rs:3:5".into());
        assert_eq!(Failure::from(&WireFailure::from(&f)), f);
        let parse = "x".parse::<i64>().unwrap_err();
        let f = Failure::from_op(
            Key([6; 32]),
            "parse".into(),
            rask_executor::OpError::caused(Cause::new(parse.clone())),
        );
        let back = Failure::from(&WireFailure::from(&f));
        assert_eq!(back, f);
        let remote = std::error::Error::source(&back)
            .and_then(|e| e.downcast_ref::<rask_executor::RemoteError>())
            .expect("a remote error");
        assert_eq!(remote.to_string(), parse.to_string());
        assert!(remote.type_name().ends_with("ParseIntError"));
    }

    #[test]
    fn addresses() {
        let tcp = |a| Some((Scheme::Tcp, a));
        assert_eq!(parse_address("tcp://127.0.0.1:8786"), tcp("127.0.0.1:8786"));
        assert_eq!(parse_address("localhost:1"), tcp("localhost:1"));
        assert_eq!(
            parse_address("tls://sched.example:8786"),
            Some((Scheme::Tls, "sched.example:8786"))
        );
        assert_eq!(parse_address("http://x:1"), None);
        assert_eq!(parse_address("nope"), None);
        assert_eq!(parse_address("tcp://"), None);
        assert_eq!(parse_address("tls://"), None);
        assert_eq!(parse_address("tls://tcp://x:1"), None);
        let unix = |a| Some((Scheme::Unix, a));
        assert_eq!(parse_address("unix:/run/s.sock"), unix("/run/s.sock"));
        assert_eq!(parse_address("unix:///run/s.sock"), unix("/run/s.sock"));
        assert_eq!(parse_address("unix:s.sock"), unix("s.sock"));
        assert_eq!(parse_address("unix:"), None);
        assert_eq!(parse_address("unix:tcp://x:1"), None);
    }

    /// Whether decoding `body` as `M`s is refused for the memory it would
    /// take (rule 5).
    fn too_big<M: for<'a> Deserialize<'a> + Bounded>(body: &[u8]) -> bool {
        matches!(
            decode_checked::<M>(body),
            Err(ProtocolError::OutOfRange {
                what: "memory a frame decodes to",
                ..
            })
        )
    }

    /// Frames that decode to many times their length: 1 MiB of one-byte
    /// `Heartbeat`s was 208 MiB of messages (a 512 MiB frame, 100 GiB),
    /// a list of a million empty strings 24 MiB. Refused as they are
    /// decoded; honest batches of small messages are not.
    #[test]
    fn frames_decoding_to_far_more_than_their_bytes_are_refused() {
        let heartbeat = frame(&ToScheduler::Heartbeat)[4];
        assert!(too_big::<ToScheduler>(&vec![heartbeat; 1 << 20]));
        let retire = ToWorker::Retire;
        assert!(too_big::<ToWorker>(&vec![frame(&retire)[4]; 1 << 20]));
        let left = frame(&ToClient::WorkerLeft { id: WorkerId(0) });
        assert!(too_big::<ToClient>(&left[4..].repeat(1 << 19)));
        // A peer's smallest request, 2 bytes, decodes to 24: within the
        // factor, so a frame of them decodes, to a bounded size.
        let ask = frame(&ToPeer::GetData { keys: Vec::new() });
        assert_eq!(ask.len(), 6);
        assert!(std::mem::size_of::<ToPeer>() <= 2 * DECODE_FACTOR);
        assert!(decode_checked::<ToPeer>(&ask[4..].repeat(1 << 16)).is_ok());
        // One message, a long list of empty entries.
        let names = ToScheduler::RetireWorkers {
            id: 1,
            names: vec![String::new(); 1 << 20],
        };
        assert!(too_big::<ToScheduler>(&frame(&names)[4..]));
        let mut failure =
            WireFailure::new([1; 32], "t".into(), WireFailureKind::Failed, "x".into());
        failure.chain = vec![String::new(); 1 << 20];
        let erred = ToScheduler::TaskErred {
            key: [1; 32],
            run: 1,
            failure,
        };
        assert!(too_big::<ToScheduler>(&frame(&erred)[4..]));
        let entries = vec![(String::new(), 0u64); 1 << 20];
        let register = ToScheduler::RegisterWorker {
            address: "a:1".into(),
            threads: 1,
            resources: rask_executor::Resources::new(),
            name: "w".into(),
        };
        // Resources as a peer may send them: zero amounts and repeats,
        // which `Resources` itself would have dropped.
        let mut body = frame(&register)[4..].to_vec();
        let tail = body.split_off(body.len() - 3); // resources (empty), name
        assert_eq!(tail, [0, 1, b'w']);
        body.extend(postcard::to_stdvec(&entries).unwrap());
        body.extend([1, b'w']);
        // Two bytes an entry, 32 decoded: at the factor, not past it, so
        // decoded (to no resources: zero amounts are dropped).
        assert!(!too_big::<ToScheduler>(&body));
        let mut task = TaskSpec {
            key: [2; 32],
            name: "t".into(),
            function: "f".into(),
            payload: Arc::from(&[][..]),
            deps: Vec::new(),
            timeout_ms: None,
            retries: 0,
            annotations: Default::default(),
        };
        task.annotations.workers = vec![String::new(); 1 << 20];
        let graph = ToScheduler::UpdateGraph {
            tasks: vec![task],
            wanted: Vec::new(),
        };
        assert!(too_big::<ToScheduler>(&frame(&graph)[4..]));
        // A million keys held nowhere: an honest answer (`who_has` of a
        // map's futures before they ran), decoded.
        let who = ToClient::WhoHas {
            id: 1,
            holders: vec![Vec::new(); 1 << 20],
        };
        assert!(decode_checked::<ToClient>(&frame(&who)[4..]).is_ok());

        // Honest batches: 100 000 results without values, releases, and a
        // few thousand of the smallest messages.
        // Each batch is sent as `M` and decoded as `M`, frame by frame.
        fn all_decode<M: Serialize + for<'a> Deserialize<'a> + Bounded>(
            msgs: impl Iterator<Item = M>,
        ) -> bool {
            let mut batch = Batch::default();
            msgs.for_each(|m| batch.push(&m));
            batch
                .take_frames()
                .iter()
                .all(|f| decode_checked::<M>(&f[4..]).is_ok())
        }
        let key = |i: u64| [(i % 251) as u8; 32];
        let n = 100_000u64;
        assert!(all_decode((0..n).map(|i| ToScheduler::TaskFinished {
            key: key(i),
            run: i,
            nbytes: i,
            duration_ns: i,
            value: None,
            thread: 1,
        })));
        assert!(all_decode(
            (0..n).map(|i| ToWorker::Release { key: key(i) })
        ));
        // The smallest messages sent in numbers: one key each.
        assert!(all_decode(
            (0..n).map(|i| ToScheduler::DataAdded { key: key(i) })
        ));
        assert!(all_decode((0..n).map(|i| ToClient::KeyInMemory {
            key: key(i),
            holders: Vec::new(),
            nbytes: 0,
            value: None,
        })));
        // And with room to grow: a keyed message decodes to well under the
        // factor times its encoding (33 bytes at least).
        for size in [
            std::mem::size_of::<ToScheduler>(),
            std::mem::size_of::<ToWorker>(),
            std::mem::size_of::<ToClient>(),
        ] {
            assert!(2 * size <= 33 * DECODE_FACTOR, "{size} bytes a message");
        }
        let small = vec![heartbeat; 10_000];
        assert_eq!(decode_checked::<ToScheduler>(&small).unwrap().len(), 10_000);
        let lefts = left[4..].repeat(10_000);
        assert_eq!(decode_checked::<ToClient>(&lefts).unwrap().len(), 10_000);
    }

    /// Property tests of the decoding paths (rule 5): whatever bytes a peer
    /// sends, `decode_checked` returns messages within their ranges or an
    /// error, and never panics.
    mod props {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::TestCaseError;

        /// Something done to a valid frame body on the way.
        #[derive(Clone, Debug)]
        enum Mutation {
            /// XOR the byte at (index modulo the length) with a non-zero mask.
            Flip(usize, u8),
            /// Keep (index modulo length + 1) bytes.
            Truncate(usize),
            /// Append bytes.
            Extend(Vec<u8>),
            /// Insert a byte at (index modulo length + 1).
            Insert(usize, u8),
            /// Remove the byte at (index modulo the length).
            Remove(usize),
            /// Set a byte to a varint's largest first byte, or to a
            /// length-like value: lengths and tags are where decoders go
            /// wrong.
            Set(usize, u8),
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            prop_oneof![
                (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
                any::<usize>().prop_map(Mutation::Truncate),
                proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
                (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
                any::<usize>().prop_map(Mutation::Remove),
                (
                    any::<usize>(),
                    prop_oneof![Just(0xffu8), Just(0x80), Just(0x7f), Just(0), 0..40u8]
                )
                    .prop_map(|(i, b)| Mutation::Set(i, b)),
            ]
        }

        fn mutate(mut body: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
            for m in mutations {
                let len = body.len();
                match m {
                    Mutation::Flip(i, x) if len > 0 => body[i % len] ^= x,
                    Mutation::Truncate(n) => body.truncate(n % (len + 1)),
                    Mutation::Extend(bytes) => body.extend_from_slice(bytes),
                    Mutation::Insert(i, b) => body.insert(i % (len + 1), *b),
                    Mutation::Remove(i) if len > 0 => {
                        body.remove(i % len);
                    }
                    Mutation::Set(i, b) if len > 0 => body[i % len] = *b,
                    _ => {}
                }
            }
            body
        }

        /// The messages' encodings end to end, as a batch carries them.
        fn encode_all<M: Serialize>(msgs: &[M]) -> Vec<u8> {
            let mut body = Vec::new();
            for m in msgs {
                body = postcard::to_extend(m, body).unwrap();
            }
            body
        }

        /// What every frame body must come to, valid or not: an error of
        /// decoding or of range, or messages each within its ranges whose
        /// encoding decodes again to the same encoding.
        fn decodes_safely<M>(body: &[u8]) -> Result<(), TestCaseError>
        where
            M: Serialize + for<'a> Deserialize<'a> + Bounded + fmt::Debug,
        {
            let plain = decode_batch::<M>(body);
            match decode_checked::<M>(body) {
                Ok(msgs) => {
                    prop_assert!(!msgs.is_empty());
                    for m in &msgs {
                        prop_assert!(m.check().is_ok(), "{m:?} passed decoding out of range");
                    }
                    prop_assert_eq!(plain.map(|p| p.len()).ok(), Some(msgs.len()));
                    // What the frame takes decoded is bounded by its length.
                    prop_assert!(
                        msgs.len() * std::mem::size_of::<M>()
                            <= body.len() * DECODE_FACTOR + DECODE_SLACK
                    );
                    let again = encode_all(&msgs);
                    let back = decode_checked::<M>(&again);
                    prop_assert!(back.is_ok(), "re-encoded {msgs:?}: {back:?}");
                    prop_assert_eq!(encode_all(&back.unwrap()), again);
                }
                Err(ProtocolError::Malformed(_)) => prop_assert!(plain.is_err()),
                // A number out of its range, or a frame decoding to too
                // much memory (found by `decode_batch` itself).
                Err(ProtocolError::OutOfRange { .. }) => {}
                Err(ProtocolError::Unexpected(_)) => {
                    prop_assert!(
                        plain.is_ok(),
                        "a range error for a body that does not decode"
                    )
                }
                Err(e) => prop_assert!(false, "unexpected error: {e}"),
            }
            Ok(())
        }

        fn key() -> impl Strategy<Value = WireKey> {
            prop_oneof![(0..4u8).prop_map(|b| [b; 32]), any::<[u8; 32]>()]
        }

        fn keys() -> impl Strategy<Value = Vec<WireKey>> {
            proptest::collection::vec(key(), 0..4)
        }

        fn worker() -> impl Strategy<Value = WorkerId> {
            any::<u32>().prop_map(WorkerId)
        }

        fn bytes(max: usize) -> impl Strategy<Value = Arc<[u8]>> {
            proptest::collection::vec(any::<u8>(), 0..=max).prop_map(Arc::from)
        }

        fn resources() -> impl Strategy<Value = rask_executor::Resources> {
            proptest::collection::vec(("[A-Za-z_./-]{1,8}", any::<u64>()), 0..3)
                .prop_map(rask_executor::Resources::from_milli)
        }

        fn failure() -> impl Strategy<Value = WireFailure> {
            (
                key(),
                ".{0,8}",
                prop_oneof![
                    Just(WireFailureKind::Failed),
                    Just(WireFailureKind::Panicked),
                    Just(WireFailureKind::Cancelled),
                    any::<u64>().prop_map(|after_ms| WireFailureKind::TimedOut { after_ms }),
                ],
                ".{0,8}",
                proptest::option::of(".{0,8}"),
                proptest::collection::vec(".{0,4}", 0..2),
                any::<u32>(),
            )
                .prop_map(|(key, name, kind, message, error_type, chain, attempts)| {
                    WireFailure {
                        key,
                        name,
                        kind,
                        message,
                        error_type,
                        chain,
                        location: None,
                        attempts,
                    }
                })
        }

        fn task_spec() -> impl Strategy<Value = TaskSpec> {
            (
                key(),
                ".{0,8}",
                bytes(16),
                keys(),
                proptest::option::of(any::<u64>()),
                any::<u32>(),
                any::<i32>(),
                resources(),
                proptest::collection::vec("[a-z0-9:.]{0,12}", 0..3),
            )
                .prop_map(
                    |(
                        key,
                        name,
                        payload,
                        deps,
                        timeout_ms,
                        retries,
                        priority,
                        resources,
                        workers,
                    )| {
                        TaskSpec {
                            key,
                            name: name.as_str().into(),
                            function: "f".into(),
                            payload,
                            deps,
                            timeout_ms,
                            retries,
                            annotations: rask_executor::Annotations {
                                priority,
                                resources,
                                workers,
                            },
                        }
                    },
                )
        }

        /// Messages to the scheduler, every variant, every number within its
        /// range (rule 5).
        fn to_scheduler() -> impl Strategy<Value = ToScheduler> {
            prop_oneof![
                (proptest::collection::vec(task_spec(), 0..3), keys())
                    .prop_map(|(tasks, wanted)| ToScheduler::UpdateGraph { tasks, wanted }),
                keys().prop_map(|keys| ToScheduler::ReleaseKeys { keys }),
                (
                    "[a-z0-9.:]{0,24}",
                    1..=MAX_THREADS,
                    resources(),
                    "[a-zA-Z0-9_.-]{1,16}"
                )
                    .prop_map(|(address, threads, resources, name)| {
                        ToScheduler::RegisterWorker {
                            address,
                            threads,
                            resources,
                            name,
                        }
                    }),
                (
                    key(),
                    any::<u64>(),
                    0..=MAX_FRAME as u64,
                    0..=duration_ns_of(MAX_TASK_DURATION),
                    proptest::option::of(bytes(INLINE_BYTES)),
                    0..=MAX_THREADS
                )
                    .prop_map(|(key, run, nbytes, duration_ns, value, thread)| {
                        ToScheduler::TaskFinished {
                            key,
                            run,
                            nbytes,
                            duration_ns,
                            value,
                            thread,
                        }
                    }),
                (key(), any::<u64>(), failure())
                    .prop_map(|(key, run, failure)| ToScheduler::TaskErred { key, run, failure }),
                (key(), any::<u64>())
                    .prop_map(|(key, run)| ToScheduler::TaskAbandoned { key, run }),
                key().prop_map(|key| ToScheduler::DataAdded { key }),
                (key(), worker())
                    .prop_map(|(key, holder)| ToScheduler::FetchFailed { key, holder }),
                Just(ToScheduler::Heartbeat),
                Just(ToScheduler::Leaving),
                (0..=MAX_MEMORY).prop_map(|memory_bytes| ToScheduler::Resources { memory_bytes }),
                any::<bool>().prop_map(|on| ToScheduler::Watch { on }),
                any::<u64>().prop_map(|id| ToScheduler::Info { id }),
                (any::<u64>(), keys()).prop_map(|(id, keys)| ToScheduler::WhoHas { id, keys }),
                keys().prop_map(|keys| ToScheduler::Replicate { keys }),
                (
                    [
                        0..=MAX_MEMORY,
                        0..=MAX_MEMORY,
                        0..=MAX_MEMORY,
                        0..=MAX_MEMORY,
                        0..=MAX_MEMORY
                    ],
                    [
                        any::<u64>(),
                        any::<u64>(),
                        any::<u64>(),
                        any::<u64>(),
                        any::<u64>()
                    ],
                    any::<bool>()
                )
                    .prop_map(|(b, c, paused)| ToScheduler::Memory {
                        spill: Spill {
                            limit_bytes: b[0],
                            spill_at_bytes: b[1],
                            pause_at_bytes: b[2],
                            memory_bytes: b[3],
                            spilled_bytes: b[4],
                            spilled_keys: c[0],
                            spills: c[1],
                            unspills: c[2],
                            lost: c[3],
                            failed_spills: c[4],
                            paused,
                        },
                    }),
                (key(), any::<u64>()).prop_map(|(key, run)| ToScheduler::TaskSeceded { key, run }),
                (any::<u64>(), proptest::collection::vec(".{0,12}", 0..3))
                    .prop_map(|(id, names)| ToScheduler::RetireWorkers { id, names }),
                (key(), any::<u64>()).prop_map(|(key, id)| ToScheduler::TaskGivenUp { key, id }),
                (key(), any::<u64>()).prop_map(|(key, id)| ToScheduler::TaskKept { key, id }),
            ]
        }

        /// Messages to a worker, every variant, within range.
        fn to_worker() -> impl Strategy<Value = ToWorker> {
            prop_oneof![
                worker().prop_map(|id| ToWorker::Registered { id }),
                (worker(), "[a-z0-9.:]{0,24}")
                    .prop_map(|(id, address)| ToWorker::PeerJoined { id, address }),
                worker().prop_map(|id| ToWorker::PeerLeft { id }),
                (
                    (key(), any::<u64>()),
                    bytes(16),
                    keys(),
                    proptest::collection::vec(
                        (key(), proptest::collection::vec(worker(), 0..3)),
                        0..3
                    ),
                    any::<(i32, u64)>(),
                    proptest::option::of(any::<u64>()),
                    any::<u32>()
                )
                    .prop_map(
                        |(
                            (key, run),
                            payload,
                            deps,
                            who_has,
                            (user, order),
                            timeout_ms,
                            retries,
                        )| {
                            ToWorker::Compute {
                                key,
                                run,
                                name: "n".into(),
                                function: "f".into(),
                                payload,
                                deps,
                                who_has,
                                priority: Priority { user, order },
                                timeout_ms,
                                retries,
                            }
                        }
                    ),
                key().prop_map(|key| ToWorker::Release { key }),
                (millis_of(MIN_HEARTBEAT)..=millis_of(MAX_HEARTBEAT))
                    .prop_map(|every_ms| ToWorker::Heartbeat { every_ms }),
                (key(), proptest::collection::vec(worker(), 0..3))
                    .prop_map(|(key, holders)| ToWorker::Fetch { key, holders }),
                ".{0,16}".prop_map(|reason| ToWorker::Refused { reason }),
                Just(ToWorker::Retire),
                (key(), any::<u64>()).prop_map(|(key, id)| ToWorker::GiveUp { key, id }),
            ]
        }

        /// Messages to a client, every variant, within range (no NaN, so
        /// they compare equal to themselves).
        fn to_client() -> impl Strategy<Value = ToClient> {
            let event = (
                key(),
                ".{0,8}",
                prop_oneof![
                    worker().prop_map(|worker| WireEventKind::Started { worker }),
                    (
                        worker(),
                        0..=MAX_THREADS,
                        0..=duration_ns_of(MAX_TASK_DURATION),
                        0..=MAX_FRAME as u64
                    )
                        .prop_map(|(worker, thread, duration_ns, nbytes)| {
                            WireEventKind::Finished {
                                worker,
                                thread,
                                duration_ns,
                                nbytes,
                            }
                        }),
                    proptest::option::of(worker())
                        .prop_map(|worker| WireEventKind::Erred { worker }),
                    Just(WireEventKind::Released),
                    worker().prop_map(|worker| WireEventKind::Lost { worker }),
                ],
            )
                .prop_map(|(key, name, kind)| WireEvent {
                    key,
                    name: name.as_str().into(),
                    kind,
                });
            let snapshot = (any::<u32>(), ".{0,8}", any::<u64>(), 0.0..1e9f64).prop_map(
                |(clients, scheduler, uptime_ms, tasks_per_second)| Snapshot {
                    version: 1,
                    scheduler,
                    uptime_ms,
                    clients,
                    tasks_per_second,
                    totals: Default::default(),
                    functions: vec![rask_executor::diagnostics::FunctionCounts {
                        name: "inc".into(),
                        counts: Default::default(),
                        busy_ms: tasks_per_second,
                    }],
                    workers: Vec::new(),
                    unrunnable: vec!["x".into()],
                },
            );
            prop_oneof![
                (worker(), "[a-z0-9.:]{0,24}")
                    .prop_map(|(id, address)| ToClient::WorkerJoined { id, address }),
                worker().prop_map(|id| ToClient::WorkerLeft { id }),
                (
                    key(),
                    proptest::collection::vec(worker(), 0..3),
                    0..=MAX_FRAME as u64,
                    proptest::option::of(bytes(INLINE_BYTES))
                )
                    .prop_map(|(key, holders, nbytes, value)| {
                        ToClient::KeyInMemory {
                            key,
                            holders,
                            nbytes,
                            value,
                        }
                    }),
                (key(), failure()).prop_map(|(key, failure)| ToClient::KeyErred { key, failure }),
                proptest::collection::vec(event, 0..3)
                    .prop_map(|events| ToClient::TaskEvents { events }),
                (any::<u64>(), snapshot).prop_map(|(id, snapshot)| ToClient::Info { id, snapshot }),
                (
                    any::<u64>(),
                    proptest::collection::vec(proptest::collection::vec(worker(), 0..3), 0..3)
                )
                    .prop_map(|(id, holders)| ToClient::WhoHas { id, holders }),
                (any::<u64>(), proptest::option::of(".{0,8}"))
                    .prop_map(|(id, error)| ToClient::Retired { id, error }),
            ]
        }

        fn batch<M: fmt::Debug>(
            msg: impl Strategy<Value = M>,
        ) -> impl Strategy<Value = (Vec<M>, Vec<Mutation>)> {
            (
                proptest::collection::vec(msg, 1..4),
                proptest::collection::vec(mutation(), 1..4),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Junk never panics a decoder of any direction.
            #[test]
            fn arbitrary_bytes_decode_or_fail(body in proptest::collection::vec(any::<u8>(), 0..256)) {
                decodes_safely::<ToScheduler>(&body)?;
                decodes_safely::<ToWorker>(&body)?;
                decodes_safely::<ToClient>(&body)?;
                decodes_safely::<ToPeer>(&body)?;
                decodes_safely::<FromPeer>(&body)?;
            }

            /// Junk after a valid variant tag: decoding gets past the tag
            /// into every message's fields.
            #[test]
            fn arbitrary_fields_decode_or_fail(
                tag in 0..24u8,
                body in proptest::collection::vec(any::<u8>(), 0..128),
            ) {
                let body: Vec<u8> = std::iter::once(tag).chain(body).collect();
                decodes_safely::<ToScheduler>(&body)?;
                decodes_safely::<ToWorker>(&body)?;
                decodes_safely::<ToClient>(&body)?;
            }

            /// A batch of messages within range decodes to exactly those
            /// messages; damaged, it decodes safely.
            #[test]
            fn to_scheduler_frames_round_trip_and_damage_safely((msgs, muts) in batch(to_scheduler())) {
                let body = encode_all(&msgs);
                prop_assert_eq!(decode_checked::<ToScheduler>(&body).ok(), Some(msgs.clone()));
                let mut framed = Batch::default();
                msgs.iter().for_each(|m| framed.push(m));
                prop_assert_eq!(&framed.take_frames()[0][4..], &body[..]);
                decodes_safely::<ToScheduler>(&mutate(body, &muts))?;
            }

            #[test]
            fn to_worker_frames_round_trip_and_damage_safely((msgs, muts) in batch(to_worker())) {
                let body = encode_all(&msgs);
                prop_assert_eq!(decode_checked::<ToWorker>(&body).ok(), Some(msgs.clone()));
                decodes_safely::<ToWorker>(&mutate(body, &muts))?;
            }

            #[test]
            fn to_client_frames_round_trip_and_damage_safely((msgs, muts) in batch(to_client())) {
                let body = encode_all(&msgs);
                prop_assert_eq!(decode_checked::<ToClient>(&body).ok(), Some(msgs.clone()));
                decodes_safely::<ToClient>(&mutate(body, &muts))?;
            }

            #[test]
            fn data_port_frames_damage_safely(
                keys in keys(),
                values in proptest::collection::vec((key(), bytes(64)), 1..3),
                muts in proptest::collection::vec(mutation(), 1..4),
            ) {
                let asks = encode_all(&[ToPeer::GetData { keys }]);
                decodes_safely::<ToPeer>(&mutate(asks, &muts))?;
                let data: Vec<FromPeer> = values
                    .into_iter()
                    .map(|(key, bytes)| FromPeer::Data { key, bytes })
                    .collect();
                decodes_safely::<FromPeer>(&mutate(encode_all(&data), &muts))?;
            }

            /// A frame's length prefix: within `MAX_FRAME` or refused.
            #[test]
            fn frame_lengths_are_bounded(prefix in any::<[u8; 4]>()) {
                match frame_len(prefix) {
                    Ok(len) => prop_assert_eq!(len as u32, u32::from_le_bytes(prefix)),
                    Err(ProtocolError::FrameTooLarge { len, max }) => {
                        prop_assert!(len > max && max == MAX_FRAME)
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }

            /// A handshake frame parses only if it is exactly the frame of
            /// what it parses to; any other bytes are refused, never a panic.
            #[test]
            fn handshakes_parse_only_canonical_frames(
                nonce in any::<[u8; 32]>(),
                build in any::<[u8; 32]>(),
                auth in any::<bool>(),
                muts in proptest::collection::vec((0..HANDSHAKE_FRAME, 1..=255u8), 0..3),
            ) {
                let hello = Handshake::new(Role::Worker, BuildId::from_bytes(build), nonce, auth);
                let mut frame = hello.to_frame();
                for &(i, x) in &muts {
                    frame[i] ^= x;
                }
                match Handshake::parse(&frame) {
                    Ok(h) => prop_assert_eq!(h.to_frame(), frame),
                    Err(_) => prop_assert!(!muts.is_empty()),
                }
                let _ = old_handshake(&frame[4..]);
            }
        }
    }
}
