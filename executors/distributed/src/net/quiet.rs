//! Unix sockets that wake their process only for what it waits for
//! (`net` rule 1).
//!
//! tokio registers a socket with its reactor for reading *and* writing,
//! edge-triggered, and the kernel reports a Unix socket writable again each
//! time its peer reads from it: every message a peer consumes wakes the
//! sender's reactor for nothing (an `EPOLLOUT` event no task waits for),
//! and the peer's read pays for that wake-up. On a local cluster that is a
//! wasted wake-up of a worker for every result the scheduler reads, on a
//! machine whose cores the workers share with the scheduler. (A TCP socket
//! reports itself writable only after it was full: it keeps tokio's
//! registration.)
//!
//! A socket [`split`] here is registered for reading only. A write goes
//! straight to the socket; only when the socket's buffer is full does the
//! writer register a second descriptor of the same socket for writing
//! ([`Wait::Room`]), wait on it, and keep it until a write goes through
//! whole again. So a writer that never fills its socket is never woken by
//! its peer's reads, and one that does waits as tokio's sockets do. Should
//! the process have no descriptor to spare for that, the writer tries
//! again every [`RETRY`] instead of failing its connection.

// The one module of the crate with `unsafe` (the crate's `Cargo.toml`):
// registering a descriptor with the reactor and reading into memory not
// yet initialised, as tokio's own sockets do; each block says why it holds.
#![allow(unsafe_code)]

use std::future::Future;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::runtime::Handle;
use tokio::time::Sleep;

/// How often a writer with no descriptor to wait on tries again.
const RETRY: Duration = Duration::from_millis(1);

/// The reading half of a Unix socket registered with the reactor for
/// reading only (the module's documentation); it shares the registration
/// with its [`Writing`] half.
#[derive(Debug)]
pub(crate) struct Reading {
    socket: Arc<AsyncFd<UnixStream>>,
}

/// The writing half of a socket [`split`] here. It shuts the socket's
/// sending side when it is dropped, as a tokio write half does, so the
/// peer reads the end of the stream even while this side still reads.
#[derive(Debug)]
pub(crate) struct Writing {
    socket: Arc<AsyncFd<UnixStream>>,
    /// The runtime the socket is registered with: the second descriptor
    /// is registered there too, whoever polls this half.
    runtime: Handle,
    /// What it waits on while its socket is full.
    wait: Wait,
}

/// What a writing half waits on.
#[derive(Debug, Default)]
enum Wait {
    /// Nothing: its last write went through whole.
    #[default]
    Idle,
    /// A second descriptor of the socket, registered for writing.
    Room(AsyncFd<OwnedFd>),
    /// The next try, the process having no descriptor to spare.
    Retry(Pin<Box<Sleep>>),
}

/// Splits a connected socket into its reading and writing halves,
/// registered with the reactor of the runtime this runs in for reading
/// only.
///
/// # Errors
///
/// If the socket cannot be made non-blocking or registered.
///
/// # Panics
///
/// Outside a tokio runtime.
pub(crate) fn split(socket: UnixStream) -> std::io::Result<(Reading, Writing)> {
    socket.set_nonblocking(true)?;
    // SAFETY: `socket` owns its descriptor, open until it is dropped, and
    // the `AsyncFd` owns `socket` from here on: the descriptor stays open
    // and the same for the whole registration, which ends when the
    // `AsyncFd` drops (before `socket` does).
    let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let socket = Arc::new(socket);
    let writing = Writing {
        socket: Arc::clone(&socket),
        runtime: Handle::current(),
        wait: Wait::Idle,
    };
    Ok((Reading { socket }, writing))
}

impl Writing {
    /// Starts waiting for room: a second descriptor of the socket,
    /// registered for writing (it reports the socket's state at once, so
    /// room that came since the failed write is not missed), or, with no
    /// descriptor to spare, a timer.
    fn start_waiting(&mut self) -> std::io::Result<()> {
        let _runtime = self.runtime.enter();
        let room = self.socket.get_ref().as_fd().try_clone_to_owned();
        self.wait = match room {
            Ok(fd) => {
                // SAFETY: `fd` is a descriptor of its own (a duplicate,
                // owned), open until it is dropped, and the `AsyncFd` owns it
                // from here on: it stays open and the same for the whole
                // registration.
                let room = unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }
                    .map_err(|e| e.into_parts().1)?;
                Wait::Room(room)
            }
            Err(e) if out_of_descriptors(&e) => Wait::Retry(Box::pin(tokio::time::sleep(RETRY))),
            Err(e) => return Err(e),
        };
        Ok(())
    }

    /// One write to the socket: what it took, `None` if it is full.
    fn try_write(&self, buf: &[u8]) -> Option<std::io::Result<usize>> {
        loop {
            match self.socket.get_ref().write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                written => return Some(written),
            }
        }
    }
}

/// Whether `e` says this process (or the system) has no descriptor left.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == 24 || code == 23) // EMFILE, ENFILE
}

impl Drop for Writing {
    fn drop(&mut self) {
        // The peer may have gone already: nothing to tell it then.
        let _ = self.socket.get_ref().shutdown(Shutdown::Write);
    }
}

impl AsyncRead for Reading {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.socket.poll_read_ready(cx))?;
            let socket = socket2::SockRef::from(self.socket.get_ref());
            // SAFETY: `recv` only writes to the memory it is given, never
            // de-initialises it.
            let unfilled = unsafe { buf.unfilled_mut() };
            let wanted = unfilled.len();
            match socket.recv(unfilled) {
                Ok(n) => {
                    // Less than there was room for: the socket is drained
                    // (as tokio's sockets assume), and the next bytes to
                    // arrive bring a new event. Clearing the readiness
                    // spares the read that would only find nothing.
                    if 0 < n && n < wanted {
                        guard.clear_ready();
                    }
                    // SAFETY: `recv` wrote the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Writing {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let written = match &mut this.wait {
                Wait::Idle => match this.try_write(buf) {
                    Some(written) => written,
                    None => {
                        this.start_waiting()?;
                        continue;
                    }
                },
                Wait::Room(room) => {
                    let mut guard = ready!(room.poll_write_ready(cx))?;
                    let socket = &this.socket;
                    match guard.try_io(|_| socket.get_ref().write(buf)) {
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Ok(written) => written,
                        // Still full: the readiness was cleared, wait for
                        // the next.
                        Err(_would_block) => continue,
                    }
                }
                Wait::Retry(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    // Tried again as though nothing was waited for.
                    this.wait = Wait::Idle;
                    continue;
                }
            };
            if matches!(written, Ok(n) if n == buf.len()) {
                // Room again: stop listening for it.
                this.wait = Wait::Idle;
            }
            return Poll::Ready(written);
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Nothing is buffered on this side.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Long enough for anything here on a loaded machine, short enough to
    /// end a test that hangs.
    const BOUND: Duration = Duration::from_secs(30);

    fn run(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { tokio::time::timeout(BOUND, test).await.expect("in time") });
    }

    /// Bytes no two places of which are likely to be mixed up.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A write to a socket whose buffer is full waits (`Pending`), with the
    /// second descriptor registered for writing, and goes on as the peer
    /// reads: every byte arrives, in order, and the waiting descriptor is
    /// let go once a write went through.
    #[test]
    fn a_full_socket_waits_for_room_and_every_byte_arrives_in_order() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        run(async move {
            let (_read, mut write) = split(ours).unwrap();
            let (mut peer, _peer_write) = split(theirs).unwrap();
            let bytes = pattern(16 << 20);
            // Write until the socket is full: a write returns Pending.
            let mut sent = 0;
            std::future::poll_fn(|cx| loop {
                match Pin::new(&mut write).poll_write(cx, &bytes[sent..]) {
                    Poll::Ready(Ok(n)) => {
                        assert!(n > 0);
                        sent += n;
                        assert!(sent < bytes.len(), "16 MiB fit in a socket");
                    }
                    Poll::Ready(Err(e)) => panic!("{e}"),
                    Poll::Pending => return Poll::Ready(()),
                }
            })
            .await;
            assert!(
                matches!(write.wait, Wait::Room(_)),
                "waits on its second descriptor"
            );
            let reading = tokio::spawn(async move {
                let mut got = vec![0; bytes.len()];
                peer.read_exact(&mut got).await.unwrap();
                got
            });
            let rest = pattern(16 << 20);
            write.write_all(&rest[sent..]).await.unwrap();
            assert!(
                matches!(write.wait, Wait::Idle),
                "room again, nothing to wait on"
            );
            assert!(reading.await.unwrap() == pattern(16 << 20), "bytes differ");
        });
    }

    /// A read that drains the socket (fewer bytes than there was room for)
    /// clears the readiness; bytes that arrive later still wake the reader.
    #[test]
    fn bytes_that_arrive_after_the_socket_was_drained_are_read() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        run(async move {
            let (mut read, _write) = split(ours).unwrap();
            let (_peer_read, mut peer) = split(theirs).unwrap();
            let mut buf = [0u8; 64];
            for round in 0..20u8 {
                peer.write_all(&[round, round]).await.unwrap();
                let mut got = 0;
                while got < 2 {
                    let n = read.read(&mut buf[got..]).await.unwrap();
                    assert!(n > 0, "the stream ended early");
                    got += n;
                }
                assert_eq!(buf[..2], [round, round]);
                // The reader waits with nothing to read before the next
                // bytes come.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }

    /// Dropping the writing half ends the peer's stream at once, while this
    /// side's reading half goes on reading what the peer sends.
    #[test]
    fn dropping_the_writing_half_ends_the_peers_stream_while_this_side_reads_on() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        run(async move {
            let (mut read, write) = split(ours).unwrap();
            let (mut peer_read, mut peer_write) = split(theirs).unwrap();
            drop(write);
            let mut buf = [0u8; 8];
            assert_eq!(peer_read.read(&mut buf).await.unwrap(), 0, "no end");
            peer_write.write_all(b"after").await.unwrap();
            read.read_exact(&mut buf[..5]).await.unwrap();
            assert_eq!(&buf[..5], b"after");
        });
    }

    /// With no descriptor to spare, the writer of a full socket tries
    /// again every `RETRY` instead of failing its connection, and every
    /// byte arrives. Run in a child process whose limit of open files is
    /// low (`prlimit`), so that the test can use up every descriptor.
    #[test]
    fn a_writer_with_no_descriptor_to_spare_tries_again_and_every_byte_arrives() {
        const CHILD: &str = "RASK_QUIET_TEST_CHILD";
        const NAME: &str = "net::quiet::tests::a_writer_with_no_descriptor_to_spare_tries_again_and_every_byte_arrives";
        if std::env::var_os(CHILD).is_none() {
            let status = std::process::Command::new("prlimit")
                .arg("--nofile=256:256")
                .arg(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads=1"])
                .env(CHILD, "1")
                .status()
                .expect("run prlimit (util-linux)");
            assert!(status.success(), "the child's test failed: {status}");
            return;
        }
        run(async {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let (_read, mut write) = split(ours).unwrap();
            let (mut peer, _peer_write) = split(theirs).unwrap();
            // Every descriptor left, taken.
            let mut held = Vec::new();
            loop {
                match std::fs::File::open("/dev/null") {
                    Ok(file) => held.push(file),
                    Err(e) if out_of_descriptors(&e) => break,
                    Err(e) => panic!("open /dev/null: {e}"),
                }
            }
            let bytes = pattern(16 << 20);
            let mut sent = 0;
            std::future::poll_fn(|cx| loop {
                match Pin::new(&mut write).poll_write(cx, &bytes[sent..]) {
                    Poll::Ready(Ok(n)) => {
                        sent += n;
                        assert!(sent < bytes.len(), "16 MiB fit in a socket");
                    }
                    Poll::Ready(Err(e)) => panic!("{e}"),
                    Poll::Pending => return Poll::Ready(()),
                }
            })
            .await;
            assert!(matches!(write.wait, Wait::Retry(_)), "{:?}", write.wait);
            let reading = tokio::spawn(async move {
                let mut got = vec![0; 16 << 20];
                peer.read_exact(&mut got).await.unwrap();
                got
            });
            write.write_all(&bytes[sent..]).await.unwrap();
            assert!(matches!(write.wait, Wait::Idle));
            assert!(reading.await.unwrap() == bytes, "bytes differ");
            drop(held);
        });
    }
}
