//! The handshake of every TCP connection, on both sides: hellos, then the
//! proofs of `auth.rs` (its rules 2 to 4) when both sides authenticate.
//!
//! ```text
//! connector                                     acceptor
//!   hello(role, build, nonce_c, auth?)   ──▶
//!                                        ◀──   hello(role, build, nonce_a, auth?)
//!                                        ◀──   proof_a   (both authenticate)
//!   checks proof_a, then
//!   proof_c                              ──▶   checks proof_c
//!   batches …                            ──▶   (only now read)
//! ```
//!
//! Every byte here has a fixed size (hello 76, proof 36): nothing is
//! allocated from a length a peer announced. The whole exchange is bounded
//! by [`HANDSHAKE_TIMEOUT`] on each side. Each side's nonce is fresh for
//! the connection (`auth.rs` rule 6).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::{self, Auth, AuthError, Side};
use crate::protocol::{
    old_handshake, proof_frame, v4_refusal, Handshake, ProtocolError, Role, HANDSHAKE_BODY,
    HANDSHAKE_FRAME, HANDSHAKE_PREFIX, OLD_HANDSHAKE_PREFIX, PROOF_FRAME, PROOF_LEN, PROOF_PREFIX,
    V4_HANDSHAKE_BODY, V4_HANDSHAKE_PREFIX,
};
use crate::BuildId;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The first byte of a TLS alert record.
const TLS_ALERT_RECORD: u8 = 0x15;

/// How long a whole handshake may take, proofs included.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connecting side: sends this process's hello as `role` of `build`,
/// checks the answer comes from `expect`, and when both sides
/// authenticate checks the acceptor's proof before sending its own.
/// Returns the acceptor's hello; the connection is authenticated (or
/// agreed insecure) from then on.
pub(crate) async fn connector<R, W>(
    read: &mut R,
    write: &mut W,
    role: Role,
    expect: Role,
    build: BuildId,
    auth: &Auth,
) -> Result<Handshake, ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let exchange = async {
        let token = auth.token();
        let ours = Handshake::new(role, build, nonce()?, token.is_some()).to_frame();
        send(write, &ours).await?;
        let (theirs, their_frame) = read_hello(read, None::<(&mut W, Role)>).await?;
        if theirs.role != expect {
            return Err(ProtocolError::Role(theirs.role));
        }
        let token = match (token, theirs.authenticates) {
            (None, false) => return Ok(theirs),
            (None, true) => return Err(AuthError::TokenRequired.into()),
            (Some(_), false) => return Err(AuthError::PeerInsecure.into()),
            (Some(token), true) => token,
        };
        let (c, a) = (&ours[4..], &their_frame[4..]);
        let proof = read_proof(read).await?;
        if proof != auth::proof(token, Side::Acceptor, c, a) {
            return Err(AuthError::WrongToken.into());
        }
        let mine = auth::proof(token, Side::Connector, c, a);
        send(write, &proof_frame(mine.as_bytes())).await?;
        Ok(theirs)
    };
    bounded(exchange).await
}

/// The accepting side: reads the connector's hello, answers as `me` of
/// `build`, and when both sides authenticate sends this side's proof and
/// checks the connector's. Returns the connector's hello, whose role and
/// build the caller must check; the connection is authenticated (or
/// agreed insecure) from then on, and not before.
pub(crate) async fn acceptor<R, W>(
    read: &mut R,
    write: &mut W,
    me: Role,
    build: BuildId,
    auth: &Auth,
) -> Result<Handshake, ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let exchange = async {
        let (theirs, their_frame) = read_hello(read, Some((&mut *write, me))).await?;
        let token = auth.token();
        let ours = Handshake::new(me, build, nonce()?, token.is_some()).to_frame();
        // Answered even when refused (rule 4): the connector can then say
        // what is wrong rather than that the connection closed.
        send(write, &ours).await?;
        let token = match (token, theirs.authenticates) {
            (None, false) => return Ok(theirs),
            (Some(_), false) => return Err(AuthError::NoToken.into()),
            (None, true) => return Err(AuthError::TokenUnwanted.into()),
            (Some(token), true) => token,
        };
        let (c, a) = (&their_frame[4..], &ours[4..]);
        let mine = auth::proof(token, Side::Acceptor, c, a);
        send(write, &proof_frame(mine.as_bytes())).await?;
        let proof = match read_proof(read).await {
            Ok(proof) => proof,
            // The connector checked this side's proof and left (rule 4).
            Err(ProtocolError::Closed) => return Err(AuthError::ProofRefused.into()),
            Err(e) => return Err(e),
        };
        if proof != auth::proof(token, Side::Connector, c, a) {
            return Err(AuthError::WrongToken.into());
        }
        Ok(theirs)
    };
    bounded(exchange).await
}

/// `exchange`, or [`ProtocolError::Timeout`] after [`HANDSHAKE_TIMEOUT`].
async fn bounded<T>(
    exchange: impl std::future::Future<Output = Result<T, ProtocolError>>,
) -> Result<T, ProtocolError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ProtocolError::Timeout(HANDSHAKE_TIMEOUT)),
    }
}

/// Writes `frame` whole and flushes it: over TLS, what `write` took may
/// otherwise wait in the session for the next write (none comes before
/// the peer's answer). A no-op on a plain socket.
async fn send<W: AsyncWrite + Unpin>(write: &mut W, frame: &[u8]) -> Result<(), ProtocolError> {
    write.write_all(frame).await.map_err(ProtocolError::Io)?;
    write.flush().await.map_err(ProtocolError::Io)
}

/// A fresh nonce (`auth.rs` rule 6).
fn nonce() -> Result<[u8; 32], ProtocolError> {
    let mut nonce = [0u8; 32];
    auth::random(&mut nonce).map_err(ProtocolError::Io)?;
    Ok(nonce)
}

fn eof_is_closed(e: std::io::Error) -> ProtocolError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed
    } else {
        ProtocolError::Io(e)
    }
}

/// Reads the peer's hello, and its frame as sent (the proofs cover it).
/// An acceptor passes its writer and role: a peer of protocol version 4 is
/// then answered in its own layout (`protocol` rule 2).
async fn read_hello<R, W>(
    reader: &mut R,
    answer_old: Option<(&mut W, Role)>,
) -> Result<(Handshake, [u8; HANDSHAKE_FRAME]), ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frame = [0u8; HANDSHAKE_FRAME];
    // The length prefix alone tells a rask peer from junk: refuse early
    // rather than wait for bytes that will never come.
    reader
        .read_exact(&mut frame[..4])
        .await
        .map_err(eof_is_closed)?;
    let prefix = [frame[0], frame[1], frame[2], frame[3]];
    if prefix == OLD_HANDSHAKE_PREFIX || prefix == V4_HANDSHAKE_PREFIX {
        // A rask process of an older protocol: name its version.
        let len = if prefix == OLD_HANDSHAKE_PREFIX {
            8
        } else {
            V4_HANDSHAKE_BODY
        };
        let mut body = [0u8; V4_HANDSHAKE_BODY];
        reader
            .read_exact(&mut body[..len])
            .await
            .map_err(eof_is_closed)?;
        let refused = old_handshake(&body[..len]);
        if let (Some((write, me)), V4_HANDSHAKE_PREFIX) = (answer_old, prefix) {
            let _ = send(write, &v4_refusal(me)).await;
        }
        return Err(refused);
    }
    if prefix != HANDSHAKE_PREFIX {
        // A TLS record (content type, then version 3.x): a TLS client on a
        // plain port, or a TLS server's alert answering a plain hello.
        return Err(match (prefix[0], prefix[1], &answer_old) {
            (TLS_HANDSHAKE_RECORD, 3, Some(_)) => ProtocolError::TlsOnPlain,
            (TLS_ALERT_RECORD | TLS_HANDSHAKE_RECORD, 3, None) => ProtocolError::TlsPeer,
            _ => ProtocolError::NotRask,
        });
    }
    reader
        .read_exact(&mut frame[4..])
        .await
        .map_err(eof_is_closed)?;
    debug_assert_eq!(frame.len(), 4 + HANDSHAKE_BODY);
    Ok((Handshake::parse(&frame)?, frame))
}

/// Reads a proof frame.
async fn read_proof<R: AsyncRead + Unpin>(reader: &mut R) -> Result<blake3::Hash, ProtocolError> {
    let mut frame = [0u8; PROOF_FRAME];
    reader.read_exact(&mut frame).await.map_err(eof_is_closed)?;
    if frame[..4] != PROOF_PREFIX {
        return Err(ProtocolError::NotRask);
    }
    let mut proof = [0u8; PROOF_LEN];
    proof.copy_from_slice(&frame[4..]);
    Ok(blake3::Hash::from_bytes(proof))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Token;

    /// Runs a connector with `c` against an acceptor with `a` over an
    /// in-memory pipe; both results.
    fn pair(
        c: Auth,
        a: Auth,
    ) -> (
        Result<Handshake, ProtocolError>,
        Result<Handshake, ProtocolError>,
    ) {
        let rt = crate::net::runtime().unwrap();
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(1024);
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut sr, mut sw) = tokio::io::split(server);
            let build = BuildId::from_bytes([3; 32]);
            let connect = async {
                let r = connector(&mut cr, &mut cw, Role::Client, Role::Scheduler, build, &c).await;
                // Leaving closes this end, as dropping a socket would.
                drop((cr, cw));
                r
            };
            let accept = async {
                let r = acceptor(&mut sr, &mut sw, Role::Scheduler, BuildId::NONE, &a).await;
                drop((sr, sw));
                r
            };
            tokio::join!(connect, accept)
        })
    }

    fn auth_error(r: Result<Handshake, ProtocolError>) -> AuthError {
        match r {
            Err(ProtocolError::Auth(e)) => e,
            other => panic!("expected an authentication error, got {other:?}"),
        }
    }

    #[test]
    fn the_same_token_passes_both_ways() {
        let token = Token::generate().unwrap();
        let (c, a) = pair(Auth::Token(token.clone()), Auth::Token(token));
        let (c, a) = (c.unwrap(), a.unwrap());
        assert_eq!(c.role, Role::Scheduler);
        assert!(c.authenticates);
        assert_eq!(a.role, Role::Client);
        assert_eq!(a.build, BuildId::from_bytes([3; 32]));
        assert_ne!(a.nonce, c.nonce);
    }

    #[test]
    fn insecure_sides_agree_without_proofs() {
        let (c, a) = pair(Auth::Insecure, Auth::Insecure);
        assert!(!c.unwrap().authenticates);
        assert!(!a.unwrap().authenticates);
    }

    #[test]
    fn every_mismatch_is_refused_on_both_sides() {
        let token = || Auth::Token(Token::generate().unwrap());
        let (c, a) = pair(Auth::Insecure, token());
        assert_eq!(auth_error(c), AuthError::TokenRequired);
        assert_eq!(auth_error(a), AuthError::NoToken);
        let (c, a) = pair(token(), Auth::Insecure);
        assert_eq!(auth_error(c), AuthError::PeerInsecure);
        assert_eq!(auth_error(a), AuthError::TokenUnwanted);
        let (c, a) = pair(token(), token());
        assert_eq!(auth_error(c), AuthError::WrongToken);
        assert_eq!(auth_error(a), AuthError::ProofRefused);
    }

    /// One connection to an acceptor holding `token`, by a connector that
    /// sends a fixed hello and then the proof `answer` makes of the
    /// acceptor's hello and proof frames; the acceptor's result and the
    /// proof sent.
    fn exchange(
        token: &Token,
        answer: impl FnOnce(&[u8], &[u8]) -> [u8; PROOF_LEN],
    ) -> (Result<Handshake, ProtocolError>, [u8; PROOF_LEN]) {
        let rt = crate::net::runtime().unwrap();
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(1024);
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut sr, mut sw) = tokio::io::split(server);
            let a = Auth::Token(token.clone());
            let hello = Handshake::new(Role::Worker, BuildId::NONE, [9; 32], true).to_frame();
            let rogue = async {
                cw.write_all(&hello).await.unwrap();
                let mut got = [0u8; HANDSHAKE_FRAME + PROOF_FRAME];
                cr.read_exact(&mut got).await.unwrap();
                let sent = answer(&hello[4..], &got);
                cw.write_all(&proof_frame(&sent)).await.unwrap();
                sent
            };
            let (sent, accepted) = tokio::join!(
                rogue,
                acceptor(&mut sr, &mut sw, Role::Scheduler, BuildId::NONE, &a)
            );
            (accepted, sent)
        })
    }

    #[test]
    fn a_replayed_or_reflected_proof_is_refused() {
        let token = Token::generate().unwrap();
        // A peer that holds the token proves it over both hellos.
        let (accepted, recorded) = exchange(&token, |hello, got| {
            let theirs = &got[4..HANDSHAKE_FRAME];
            *auth::proof(&token, Side::Connector, hello, theirs).as_bytes()
        });
        assert_eq!(accepted.unwrap().role, Role::Worker);
        // Replayed on a new connection with the same hello, that proof is
        // worth nothing: the acceptor's nonce is new.
        let (accepted, _) = exchange(&token, |_, _| recorded);
        assert_eq!(auth_error(accepted), AuthError::WrongToken);
        // Nor is the acceptor's own proof, sent back (reflection).
        let (accepted, _) = exchange(&token, |_, got| {
            let mut p = [0u8; PROOF_LEN];
            p.copy_from_slice(&got[HANDSHAKE_FRAME + 4..]);
            p
        });
        assert_eq!(auth_error(accepted), AuthError::WrongToken);
    }
}
