//! Reaching the scheduler (worker rule 1): one attempt (connect, handshake,
//! register), and the attempts again within the worker's death timeout.
//! Which failures are worth another attempt is [`retried`]'s decision, when
//! to make it [`Retry`]'s: both are pure, so they are tested without
//! sockets or clocks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::memory::Store;
use super::serve_data;
use super::watchdog::Seconds;
use crate::net::{self, Chain, FrameReader, Reader};
use crate::protocol::{Batch, ProtocolError, Role, Scheme, ToScheduler, ToWorker, WorkerId};
use crate::tls::Connector;
use crate::{Auth, BuildId, Error, Tls};

/// The wait after the first failed attempt; it doubles after each failure,
/// up to [`MAX_RETRY`].
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest wait between two attempts.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(2);

/// How long a worker waits for its scheduler to accept its registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and as what the worker registers: the same for every connection.
pub(crate) struct Link {
    /// The scheduler's `host:port` (its socket's path for `unix:`).
    pub(crate) address: String,
    /// How the scheduler is reached: TCP, TLS (then `tls` is set) or a
    /// Unix socket.
    pub(crate) scheme: Scheme,
    /// Set for a `tls://` scheduler (`tls.rs` rule 1).
    pub(crate) tls: Option<LinkTls>,
    /// The build the worker announces (rule 8).
    pub(crate) build: BuildId,
    /// The thread count it announces, within the protocol's range.
    pub(crate) threads: usize,
    /// The resources it declares (`Options::resources`).
    pub(crate) resources: rask_executor::Resources,
    /// The name it announces (valid: `Options::name` checked it).
    pub(crate) name: String,
    /// What it proves to its scheduler, requires of its data port's
    /// readers and proves to its peers' data ports (rule 12).
    pub(crate) auth: Arc<Auth>,
    /// The limits of the worker's connections (`net` rules 8 to 10), one
    /// budget for all of them.
    pub(crate) limits: net::Limits,
    /// The runtime of the thread that accepts the data port's connections
    /// and takes them through their handshakes (rule 13); the thread is
    /// the worker's `Net`'s.
    pub(crate) handshakes: tokio::runtime::Handle,
}

/// How a worker of a TLS cluster connects, and what its data port serves.
pub(crate) struct LinkTls {
    pub(crate) connector: Connector,
    pub(crate) settings: Tls,
}

impl Link {
    /// The TLS connector to the scheduler and to peers' data ports, if the
    /// cluster is TLS.
    pub(crate) fn connector(&self) -> Option<Connector> {
        self.tls.as_ref().map(|t| t.connector.clone())
    }
}

/// A registered scheduler connection, for the network loop.
pub(crate) struct Connection {
    /// The id the scheduler gave the worker.
    pub(crate) id: WorkerId,
    /// The worker's data port (rule 4), bound by the first connection.
    pub(crate) data_address: SocketAddr,
    pub(crate) read: FrameReader<Reader>,
    pub(crate) writer: net::Writer,
    /// What followed `Registered` in the scheduler's first frame.
    pub(crate) first: Vec<ToWorker>,
    /// What the first frame's messages take decoded, held from the frame
    /// budget until the network loop handled `first` (`net` rule 8).
    pub(crate) grant: Option<net::Grant>,
}

/// When to attempt again: after a failure, wait [`FIRST_RETRY`], doubling
/// each time up to [`MAX_RETRY`], and never past the deadline, so the last
/// attempt is made at the deadline itself; once a failure ends at or after
/// the deadline, give up. An attempt runs to its own limits (10 s to
/// connect, 10 s for the handshake, 30 s to register), so a worker may give
/// up that much after its deadline when its scheduler's machine does not
/// answer at all; a refused connection fails at once.
#[derive(Debug)]
pub(crate) struct Retry {
    /// `None`: a limit too far away to be an `Instant`, never reached.
    deadline: Option<Instant>,
    wait: Duration,
}

impl Retry {
    /// The schedule of a worker that started trying at `start` and may go
    /// on for `limit`.
    pub(crate) fn new(start: Instant, limit: Duration) -> Retry {
        Retry {
            deadline: start.checked_add(limit),
            wait: FIRST_RETRY,
        }
    }

    /// An attempt failed at `now`: how long to wait before the next one,
    /// or `None` when the time is up.
    pub(crate) fn after_failure(&mut self, now: Instant) -> Option<Duration> {
        let left = match self.deadline {
            Some(deadline) => deadline.saturating_duration_since(now),
            None => Duration::MAX,
        };
        if left.is_zero() {
            return None;
        }
        let wait = self.wait.min(left);
        self.wait = (self.wait * 2).min(MAX_RETRY);
        Some(wait)
    }
}

/// Whether an attempt that failed with `e` is worth another (rule 1): yes
/// when nothing answered at the address or the answer broke off, since a
/// scheduler that is starting, restarting or briefly unreachable answers
/// later; no when something answered and refused for a reason that time
/// does not change.
///
/// - Retried: a connection refused, reset or unreachable, or a name that
///   does not resolve (yet) ([`Error::Connection`]); a connection, a
///   handshake or a registration that timed out ([`Error::Timeout`],
///   [`ProtocolError::Timeout`]); a connection closed or failed during the
///   handshake or before the registration was answered
///   ([`ProtocolError::Closed`], [`ProtocolError::Io`]): a scheduler going
///   down, or one whose port was opened before it was ready.
/// - Not retried: an address that cannot be a socket address (an
///   [`Error::Connection`] of kind `InvalidInput`, e.g. a port that is not a
///   number); anything but a rask scheduler of this protocol version at the
///   address (not rask, another version, another role); a scheduler that
///   broke the protocol in its answer; a scheduler that refused the
///   worker's token, or its lack of one ([`Error::Auth`]); a failed TLS
///   handshake ([`Error::Tls`]: certificates and CAs do not change by
///   waiting); a local failure ([`Error::Io`]).
pub(crate) fn retried(e: &Error) -> bool {
    let transient = |reason: &ProtocolError| {
        matches!(
            reason,
            ProtocolError::Closed | ProtocolError::Io(_) | ProtocolError::Timeout(_)
        )
    };
    match e {
        Error::Connection { reason, .. } => reason.kind() != std::io::ErrorKind::InvalidInput,
        Error::Timeout { .. } => true,
        Error::Handshake { reason, .. } | Error::Protocol { reason } => transient(reason),
        _ => false,
    }
}

/// Attempts to register with the scheduler of `link` until an attempt
/// succeeds, one fails for a reason not [`retried`], or `limit` passed
/// since `start` ([`Retry`]); with a zero `limit`, once. Binds the data
/// port in `data` on the first connection, and reuses it after (rule 4).
/// When `announce`, says on stderr when it starts waiting. After a loss
/// (`after_loss`), a refusal of the worker's name is retried too: the
/// worker holding it may be this one's old connection, which the
/// scheduler has not found dead yet.
///
/// # Errors
///
/// The last attempt's, as [`super::run_with`] lists them.
pub(crate) async fn reach(
    link: &Link,
    store: &Store,
    data: &mut Option<SocketAddr>,
    start: Instant,
    limit: Duration,
    announce: bool,
    after_loss: bool,
) -> Result<Connection, Error> {
    let mut retry = Retry::new(start, limit);
    let mut waited = false;
    loop {
        let error = match attempt(link, store, data).await {
            Ok(connection) => return Ok(connection),
            Err(e @ Error::Refused { .. }) if after_loss => e,
            Err(e) if !retried(&e) => return Err(e),
            Err(e) => e,
        };
        let Some(wait) = retry.after_failure(Instant::now()) else {
            return Err(error);
        };
        if announce && !std::mem::replace(&mut waited, true) {
            tracing::warn!(
                "worker: waiting for the scheduler at {} (up to {})",
                link.address,
                Seconds(limit)
            );
        }
        tokio::time::sleep(wait).await;
    }
}

/// One attempt: connects, binds the data port if `data` has none yet, and
/// registers.
async fn attempt(
    link: &Link,
    store: &Store,
    data: &mut Option<SocketAddr>,
) -> Result<Connection, Error> {
    let address = link.address.as_str();
    let connected = net::connect(
        (
            link.scheme,
            address,
            link.tls.as_ref().map(|t| &t.connector),
        ),
        Role::Worker,
        Role::Scheduler,
        link.build,
        &link.auth,
        net::CONNECT_TIMEOUT,
        &link.limits,
    )
    .await
    .map_err(|e| e.into_error(address, Role::Scheduler))?;
    let local = connected.local;
    let data_address = match *data {
        Some(bound) => bound,
        None => {
            let listener = net::listen(SocketAddr::new(local.ip(), 0)).map_err(Error::Io)?;
            let bound = listener.local_addr().map_err(Error::Io)?;
            // Mutual TLS when the scheduler asked this worker for its
            // certificate (`tls.rs` rule 4).
            let acceptor = match &link.tls {
                Some(tls) => Some(tls.settings.acceptor(tls.connector.was_asked())?),
                None => None,
            };
            // Accepted on the handshakes' thread, served on this one, the
            // network thread's (rule 13).
            let listener = {
                let _handshakes = link.handshakes.enter();
                TcpListener::from_std(listener).map_err(Error::Io)?
            };
            link.handshakes.spawn(serve_data(
                listener,
                store.clone(),
                link.build,
                (link.auth.clone(), acceptor),
                link.limits.clone(),
                tokio::runtime::Handle::current(),
            ));
            *data = Some(bound);
            bound
        }
    };
    let writer = net::spawn_writer(connected.write, &link.limits, None);
    let mut batch = Batch::default();
    batch.push(&ToScheduler::RegisterWorker {
        address: data_address.to_string(),
        threads: link.threads as u32,
        resources: link.resources.clone(),
        name: link.name.clone(),
    });
    let _ = net::send_batch(&writer, &mut batch);

    let mut read = connected.read;
    let protocol = |reason| Error::Protocol { reason };
    // What the messages take decoded is held from the budget until they
    // were handled (`net` rule 8), as every frame the worker reads.
    let registering = read.next_messages::<ToWorker>();
    let (first, grant) = match tokio::time::timeout(REGISTER_TIMEOUT, registering).await {
        Ok(Ok(Some(net::Messages { msgs, grant }))) => (msgs, grant),
        Ok(Ok(None)) => return Err(protocol(ProtocolError::Closed)),
        Ok(Err(e @ (ProtocolError::Closed | ProtocolError::Io(_) | ProtocolError::Stalled(_)))) => {
            return Err(protocol(e))
        }
        Ok(Err(e)) => {
            tracing::warn!("worker: closing the scheduler connection: {}", Chain(&e));
            return Err(protocol(e));
        }
        Err(_) => {
            return Err(Error::Timeout {
                what: "the scheduler to register the worker",
                after: REGISTER_TIMEOUT,
            })
        }
    };
    let mut first = first.into_iter();
    let id = match first.next() {
        Some(ToWorker::Registered { id }) => id,
        Some(ToWorker::Refused { reason }) => return Err(Error::Refused { reason }),
        _ => {
            return Err(protocol(ProtocolError::Unexpected(
                "the scheduler did not answer the registration",
            )))
        }
    };
    Ok(Connection {
        id,
        data_address,
        read,
        writer,
        first: first.collect(),
        grant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn attempts_back_off_from_100_ms_to_2_s_and_stop_at_the_deadline() {
        let t0 = Instant::now();
        let mut retry = Retry::new(t0, Duration::from_secs(10));
        let ms = Duration::from_millis;
        // Attempts that fail at once, each right after its wait.
        let mut now = t0;
        let mut waits = Vec::new();
        while let Some(wait) = retry.after_failure(now) {
            waits.push(wait);
            now += wait;
        }
        assert_eq!(
            waits,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(2000),
                ms(2000),
                ms(2000),
                // Cut to the deadline: the last attempt is made at it.
                ms(900)
            ]
        );
        assert_eq!(now, t0 + Duration::from_secs(10));
        // An attempt that ends past the deadline is the last one.
        let mut retry = Retry::new(t0, Duration::from_secs(1));
        assert_eq!(retry.after_failure(t0 + ms(999)), Some(ms(1)));
        assert_eq!(retry.after_failure(t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn a_zero_limit_allows_one_attempt_and_a_huge_one_never_ends() {
        let t0 = Instant::now();
        assert_eq!(Retry::new(t0, Duration::ZERO).after_failure(t0), None);
        let mut forever = Retry::new(t0, Duration::MAX);
        let late = t0 + Duration::from_secs(1 << 40);
        assert_eq!(forever.after_failure(late), Some(FIRST_RETRY));
        for _ in 0..100 {
            assert!(forever.after_failure(late).is_some());
        }
        assert_eq!(forever.after_failure(late), Some(MAX_RETRY));
    }

    #[test]
    fn only_failures_that_time_may_cure_are_retried() {
        let io = |kind| std::io::Error::new(kind, "test");
        let connection = |kind| Error::Connection {
            addr: "127.0.0.1:1".into(),
            reason: io(kind),
        };
        let handshake = |reason| Error::Handshake {
            addr: "127.0.0.1:1".into(),
            reason,
        };
        let protocol = |reason| Error::Protocol { reason };
        let version = || ProtocolError::Version { ours: 5, theirs: 4 };
        for (error, again) in [
            (connection(ErrorKind::ConnectionRefused), true),
            (connection(ErrorKind::ConnectionReset), true),
            (connection(ErrorKind::HostUnreachable), true),
            // What a name that does not resolve gives.
            (connection(ErrorKind::Other), true),
            (connection(ErrorKind::InvalidInput), false),
            (
                Error::Timeout {
                    what: "the scheduler to accept the connection",
                    after: net::CONNECT_TIMEOUT,
                },
                true,
            ),
            (handshake(ProtocolError::Closed), true),
            (
                handshake(ProtocolError::Io(io(ErrorKind::BrokenPipe))),
                true,
            ),
            (
                handshake(ProtocolError::Timeout(Duration::from_secs(10))),
                true,
            ),
            (handshake(ProtocolError::NotRask), false),
            (handshake(version()), false),
            (handshake(ProtocolError::Role(Role::DataServer)), false),
            (protocol(ProtocolError::Closed), true),
            (
                protocol(ProtocolError::Io(io(ErrorKind::ConnectionReset))),
                true,
            ),
            (
                protocol(ProtocolError::Unexpected("no registration")),
                false,
            ),
            (
                protocol(ProtocolError::FrameTooLarge { len: 1, max: 0 }),
                false,
            ),
            (Error::Io(io(ErrorKind::AddrInUse)), false),
            (
                Error::Address {
                    address: "x".into(),
                },
                false,
            ),
        ] {
            assert_eq!(retried(&error), again, "{error:?}");
        }
    }
}
