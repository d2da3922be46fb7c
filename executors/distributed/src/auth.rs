//! Who may join a cluster: the [`Token`] its processes share, where a
//! process finds it ([`Auth::from_env`]), and the proofs its handshakes
//! exchange (the exchange itself is `handshake.rs`).
//!
//! Rules:
//!
//! 1. **A token is 32 random bytes**, written as 64 hex digits: the text
//!    users copy (`RASK_TOKEN`, a token file). The key the handshake uses
//!    is `blake3::derive_key("rask token v1", bytes)`. Neither the text nor
//!    the key ever crosses the wire. Only 64 hex digits are accepted: a
//!    passphrase a person chose could be guessed offline from one recorded
//!    handshake, 256 random bits cannot. The dashboard's key
//!    ([`Token::dashboard_key`]) is `blake3::derive_key("rask dashboard
//!    link v1", bytes)`: it opens the dashboard only, and neither the token
//!    nor the handshake key can be computed from it.
//! 2. **Mutual challenge–response.** Each side's hello carries a fresh
//!    32-byte nonce and a flag saying whether it authenticates. The
//!    acceptor answers the connector's hello with its own and its proof,
//!    keyed blake3 of `"rask acceptor proof v1"` followed by both hellos'
//!    bodies (connector's first); the connector checks it before it sends
//!    its own proof (`"rask connector proof v1"`, the same hellos). Both
//!    nonces are fresh, so no proof can be replayed; both roles and builds
//!    are in the hellos, so a proof made for one role or build is worth
//!    nothing for another; the two domains differ, so a proof cannot be
//!    sent back to the side that made it.
//! 3. **Nothing before the proofs.** Neither side reads or sends anything
//!    but the handshake until its peer's proof checked out: for the
//!    acceptor, until `net::accept_detached` returns; for the connector, until
//!    `net::connect` returns. An in-memory connection of one process
//!    (`net::LocalEnd`) has no handshake: both ends are the same process.
//! 4. **Both sides agree or neither goes on.** A process with a token
//!    refuses a peer without one, a process without one (insecure) refuses
//!    a peer with one, and either refuses a wrong proof. The refusing side
//!    sends at most its own hello (so the other side can tell what is
//!    wrong), closes, and, when it is the accepting side, logs one line.
//! 5. Proofs are compared as [`blake3::Hash`]es, whose equality takes
//!    constant time.
//! 6. Nonces and tokens are read from `/dev/urandom` (no dependency; Linux
//!    and the BSDs have it; another platform would need the `getrandom`
//!    crate here).
//! 7. **Where a client or worker finds its token** ([`Auth::from_env`]):
//!    [`TOKEN_ENV`], else the file [`TOKEN_FILE_ENV`] names, else the
//!    per-user file [`Token::default_path`] (`$HOME/.rask/token`) if it
//!    exists; [`INSECURE_ENV`]`=1` for a cluster without authentication
//!    (set together with a token, it is an error: one of them is a
//!    mistake). A scheduler ([`crate::scheduler::Options::auth`], the
//!    `rask-scheduler` binary) creates the per-user file when it is
//!    missing; clients and workers never create one.
//! 8. A token file is created with mode 0600 in a directory created with
//!    mode 0700, and linked into place whole, so two processes creating it
//!    at once agree on one token and no reader sees half of one.
//! 9. A token file others may read (any group or other permission bit) is
//!    still used, with a warning naming the file and `chmod 600`: whoever
//!    can read it is a member of the cluster.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use crate::Error;

/// The environment variable holding a cluster's token: 64 hex digits, as
/// `rask-scheduler` writes them to its token file.
pub const TOKEN_ENV: &str = "RASK_TOKEN";

/// The environment variable naming a file that holds the cluster's token
/// (read when [`TOKEN_ENV`] is not set).
pub const TOKEN_FILE_ENV: &str = "RASK_TOKEN_FILE";

/// The environment variable that turns authentication off: `1` for a
/// cluster whose scheduler runs with `--insecure`.
pub const INSECURE_ENV: &str = "RASK_INSECURE";

/// The key derivation context of rule 1.
const TOKEN_CONTEXT: &str = "rask token v1";

/// The dashboard key's derivation context (rule 1).
const DASHBOARD_CONTEXT: &str = "rask dashboard link v1";

/// The acceptor's proof domain (rule 2).
const ACCEPTOR_DOMAIN: &[u8] = b"rask acceptor proof v1";

/// The connector's proof domain (rule 2).
const CONNECTOR_DOMAIN: &[u8] = b"rask connector proof v1";

/// A cluster's shared secret: every process of an authenticated cluster
/// holds the same one, and proves it in each handshake without sending it
/// (module rules 1 and 2).
///
/// Its `Debug` form never shows the secret; [`Token::expose_secret`] does,
/// for handing it to another process.
///
/// # Examples
///
/// ```
/// use rask_distributed::Token;
/// let token = Token::generate()?;
/// let text = token.expose_secret();            // what RASK_TOKEN holds
/// assert_eq!(text.len(), 64);
/// let again: Token = text.parse()?;
/// assert_eq!(again.expose_secret(), text);
/// assert_eq!(format!("{token:?}"), "Token(..)");
/// # Ok::<(), rask_distributed::Error>(())
/// ```
#[derive(Clone)]
pub struct Token {
    /// The random bytes the text spells.
    secret: [u8; 32],
    /// The handshake key derived from them (rule 1).
    key: [u8; 32],
}

impl Token {
    /// A fresh token: 32 bytes from `/dev/urandom`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if `/dev/urandom` cannot be read.
    ///
    /// # Examples
    ///
    /// ```
    /// let a = rask_distributed::Token::generate()?;
    /// let b = rask_distributed::Token::generate()?;
    /// assert_ne!(a.expose_secret(), b.expose_secret());
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn generate() -> Result<Token, Error> {
        let mut secret = [0u8; 32];
        random(&mut secret).map_err(Error::Io)?;
        Ok(Token::from_secret(secret))
    }

    fn from_secret(secret: [u8; 32]) -> Token {
        Token {
            secret,
            key: blake3::derive_key(TOKEN_CONTEXT, &secret),
        }
    }

    /// Parses a token's text: 64 hex digits (either case), with
    /// surrounding whitespace ignored (a token file ends with a newline).
    ///
    /// # Errors
    ///
    /// [`Error::BadToken`] for anything else; the error does not repeat
    /// the text, which may be a secret mistyped.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::Token;
    /// assert!(Token::parse(&"ab".repeat(32)).is_ok());
    /// assert!(Token::parse("my secret").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Token, Error> {
        parse_from(text, "the text given")
    }

    /// The token's text, 64 lowercase hex digits: what another process of
    /// the cluster needs in [`TOKEN_ENV`] or a token file. It is the
    /// secret itself: whoever reads it can join the cluster.
    ///
    /// # Examples
    ///
    /// ```
    /// let token = rask_distributed::Token::generate()?;
    /// let mut worker = std::process::Command::new("my-app");
    /// worker.env(rask_distributed::TOKEN_ENV, token.expose_secret());
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn expose_secret(&self) -> String {
        hex(&self.secret)
    }

    /// The key that opens the scheduler's web dashboard off loopback, 64
    /// lowercase hex digits: `rask-scheduler` prints the link that carries
    /// it (`/status?key=…`). It is derived one way from the token (rule 1):
    /// whoever reads it (in a proxy's log, a browser's history) can watch
    /// the dashboard, and cannot join the cluster. The dashboard refuses the
    /// token itself.
    ///
    /// # Examples
    ///
    /// ```
    /// let token = rask_distributed::Token::generate()?;
    /// let key = token.dashboard_key();
    /// assert_eq!(key.len(), 64);
    /// assert_ne!(key, token.expose_secret());
    /// let link = format!("http://10.0.0.5:8787/status?key={key}");
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn dashboard_key(&self) -> String {
        hex(&blake3::derive_key(DASHBOARD_CONTEXT, &self.secret))
    }

    /// Reads the token in the file at `path`.
    ///
    /// # Errors
    ///
    /// [`Error::TokenFile`] if the file cannot be read, [`Error::BadToken`]
    /// if it does not hold a token.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let token = rask_distributed::Token::load("/etc/rask/token".as_ref())?;
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn load(path: &Path) -> Result<Token, Error> {
        let text = std::fs::read_to_string(path).map_err(|reason| Error::TokenFile {
            path: path.to_owned(),
            reason,
        })?;
        let token = parse_from(&text, &path.display().to_string())?;
        if let Some(mode) = readable_by_others(path) {
            tracing::warn!(
                path = %path.display(),
                "the token file {} has mode {mode:o}: other users may read it and join the \
                 cluster; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        Ok(token)
    }

    /// Reads the token in the file at `path`, or creates the file with a
    /// fresh token if there is none (rule 8: the file 0600, a missing
    /// directory 0700). Returns the token and whether it was created.
    ///
    /// # Errors
    ///
    /// As [`Token::load`]; [`Error::TokenFile`] if the file or its
    /// directory cannot be created; [`Error::Io`] if `/dev/urandom` cannot
    /// be read.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("rask-doc-{}", std::process::id()));
    /// use rask_distributed::Token;
    /// let path = dir.join("token");
    /// let (token, created) = Token::load_or_create(&path)?;
    /// assert!(created);
    /// let (again, created) = Token::load_or_create(&path)?;
    /// assert!(!created);
    /// assert_eq!(again.expose_secret(), token.expose_secret());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn load_or_create(path: &Path) -> Result<(Token, bool), Error> {
        match std::fs::metadata(path) {
            Ok(_) => return Token::load(path).map(|t| (t, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(reason) => {
                return Err(Error::TokenFile {
                    path: path.to_owned(),
                    reason,
                })
            }
        }
        let token = Token::generate()?;
        let file_error = |reason| Error::TokenFile {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(file_error)?;
        }
        // Written beside its final name, then linked there: `hard_link`
        // fails if the name exists, so of two processes creating the file
        // at once the second reads the first's token (rule 8).
        let mut tag = [0u8; 8];
        random(&mut tag).map_err(Error::Io)?;
        let mut staged = path.as_os_str().to_owned();
        staged.push(format!(".{}.new", u64::from_le_bytes(tag)));
        let staged = PathBuf::from(staged);
        let written =
            write_private(&staged, &token).and_then(|()| match std::fs::hard_link(&staged, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            });
        let _ = std::fs::remove_file(&staged);
        if written.map_err(file_error)? {
            Ok((token, true))
        } else {
            Token::load(path).map(|t| (t, false))
        }
    }

    /// The per-user token file, `$HOME/.rask/token`; `None` when `HOME`
    /// is not set.
    ///
    /// # Examples
    ///
    /// ```
    /// if let Some(path) = rask_distributed::Token::default_path() {
    ///     assert!(path.ends_with(".rask/token"));
    /// }
    /// ```
    pub fn default_path() -> Option<PathBuf> {
        default_path_in(std::env::var_os("HOME"))
    }

    /// The key the handshake proves (rule 1).
    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl std::str::FromStr for Token {
    type Err = Error;

    fn from_str(text: &str) -> Result<Token, Error> {
        Token::parse(text)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// [`Token::parse`], naming `from` in the error.
/// `bytes` as lowercase hex digits.
fn hex(bytes: &[u8; 32]) -> String {
    let mut text = String::with_capacity(64);
    for b in bytes {
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    text
}

fn parse_from(text: &str, from: &str) -> Result<Token, Error> {
    let bad = || Error::BadToken {
        from: from.to_owned(),
    };
    let text = text.trim().as_bytes();
    if text.len() != 64 {
        return Err(bad());
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    let mut secret = [0u8; 32];
    for (byte, pair) in secret.iter_mut().zip(text.chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (digit(pair[0]), digit(pair[1])) else {
            return Err(bad());
        };
        // Two hex digits make at most 255.
        *byte = (hi * 16 + lo) as u8;
    }
    Ok(Token::from_secret(secret))
}

fn default_path_in(home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let home = PathBuf::from(home.filter(|h| !h.is_empty())?);
    Some(home.join(".rask").join("token"))
}

/// Creates `dir` and its missing parents, the last with mode 0700 (rule
/// 8); an existing directory is left as it is.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes `token` to a new file at `path`, mode 0600 (rule 8).
fn write_private(path: &Path, token: &Token) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(format!("{}\n", token.expose_secret()).as_bytes())?;
    file.sync_all()
}

/// Fills `buf` from `/dev/urandom` (rule 6).
pub(crate) fn random(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// How a process takes part in its cluster's handshakes: with a token, or
/// (explicitly) without authentication.
///
/// # Examples
///
/// ```
/// use rask_distributed::{Auth, Token};
/// let auth = Auth::Token(Token::generate()?);
/// assert!(auth.token().is_some());
/// assert!(Auth::Insecure.token().is_none());
/// # Ok::<(), rask_distributed::Error>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Auth {
    /// Prove this token in every handshake, and require peers to prove it.
    Token(Token),
    /// No authentication: for a cluster whose every process runs so (a
    /// scheduler started with `--insecure`). Anyone who can connect can
    /// run the program's registered functions and read every value.
    Insecure,
}

impl Auth {
    /// The token, unless insecure.
    pub fn token(&self) -> Option<&Token> {
        match self {
            Auth::Token(t) => Some(t),
            Auth::Insecure => None,
        }
    }

    /// What the environment says (rule 7): [`INSECURE_ENV`]`=1`, else the
    /// token in [`TOKEN_ENV`], else the one in the file [`TOKEN_FILE_ENV`]
    /// names, else the one in [`Token::default_path`] if that file exists.
    /// `None` when none of these is set or there: a client or worker then
    /// refuses to start ([`Error::NoToken`]).
    ///
    /// # Errors
    ///
    /// [`Error::Env`] for an [`INSECURE_ENV`] other than `1` or `0`,
    /// [`Error::AuthConflict`] when it is `1` and a token is given too,
    /// [`Error::BadToken`] or [`Error::TokenFile`] for a token that cannot
    /// be read.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use rask_distributed::{Auth, Error};
    /// let auth = Auth::from_env()?.ok_or_else(|| Error::NoToken {
    ///     default_path: rask_distributed::Token::default_path(),
    /// })?;
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn from_env() -> Result<Option<Auth>, Error> {
        Auth::with_env(|name| std::env::var_os(name))
    }

    /// [`Auth::from_env`] with the variables `var` gives, for a program
    /// with settings of its own: rask takes `RASK_TOKEN_FILE` from its
    /// config file when the variable is unset.
    ///
    /// # Errors
    ///
    /// As [`Auth::from_env`].
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::{Auth, INSECURE_ENV};
    /// let auth = Auth::from_vars(|name| (name == INSECURE_ENV).then(|| "1".into()))?;
    /// assert!(matches!(auth, Some(Auth::Insecure)));
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn from_vars(
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Option<Auth>, Error> {
        Auth::with_env(var)
    }

    /// [`Auth::from_env`] with the variables `var` gives.
    pub(crate) fn with_env(
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Option<Auth>, Error> {
        // An empty variable counts as unset, as `RASK_TOKEN= cmd` means.
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let insecure = match set(INSECURE_ENV) {
            None => false,
            Some(value) => match value.to_str().map(str::trim) {
                Some("1") => true,
                Some("0") => false,
                _ => {
                    return Err(Error::Env {
                        name: INSECURE_ENV,
                        value: value.to_string_lossy().into_owned(),
                        expected: "`1` or `0`",
                    })
                }
            },
        };
        let token = if let Some(text) = set(TOKEN_ENV) {
            // Not `to_str`: a token that is not UTF-8 is no token either.
            Some(parse_from(&text.to_string_lossy(), TOKEN_ENV)?)
        } else if let Some(path) = set(TOKEN_FILE_ENV) {
            Some(Token::load(Path::new(&path))?)
        } else {
            None
        };
        match (insecure, token) {
            (true, Some(_)) => Err(Error::AuthConflict),
            (true, None) => Ok(Some(Auth::Insecure)),
            (false, Some(token)) => Ok(Some(Auth::Token(token))),
            (false, None) => match default_path_in(var("HOME")) {
                Some(path) if path.exists() => Token::load(&path).map(|t| Some(Auth::Token(t))),
                _ => Ok(None),
            },
        }
    }
}

/// Which side of a handshake a proof is from (rule 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The side that accepted the connection; it proves first.
    Acceptor,
    /// The side that opened it.
    Connector,
}

/// The proof `side` sends: keyed blake3, under `token`'s key, of its
/// domain and both hello bodies, the connector's first (rule 2).
pub(crate) fn proof(token: &Token, side: Side, connector: &[u8], acceptor: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(token.key());
    hasher.update(match side {
        Side::Acceptor => ACCEPTOR_DOMAIN,
        Side::Connector => CONNECTOR_DOMAIN,
    });
    hasher.update(connector);
    hasher.update(acceptor);
    hasher.finalize()
}

/// Why a handshake's authentication failed (module rule 4), as the side
/// that noticed sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The peer requires a token, and this process has none.
    #[error("the peer requires a token, and this process has none")]
    TokenRequired,
    /// The peer has no token, and this process requires one.
    #[error("the peer has no token, and this process requires one")]
    NoToken,
    /// The peer runs without authentication, and this process has a token.
    #[error("the peer runs without authentication, and this process has a token")]
    PeerInsecure,
    /// The peer has a token, and this process runs without authentication.
    #[error("the peer has a token, and this process runs without authentication")]
    TokenUnwanted,
    /// The peer's proof does not match this process's token.
    #[error("wrong token: the peer's proof does not match this process's token")]
    WrongToken,
    /// The peer closed the connection instead of proving its token, after
    /// this process proved its own: the peer holds another token.
    #[error("wrong token: the peer did not accept this process's proof")]
    ProofRefused,
}

impl AuthError {
    /// The message a client or worker shows when the `peer` at `addr`
    /// refused it, with what to do about it.
    pub(crate) fn describe(&self, peer: crate::protocol::Role, addr: &str) -> String {
        match self {
            AuthError::TokenRequired => format!(
                "the {peer} at {addr} requires a token; set {TOKEN_ENV} to its token, or \
                 {TOKEN_FILE_ENV} to a file holding it (rask-scheduler prints where its token is)"
            ),
            AuthError::PeerInsecure => format!(
                "the {peer} at {addr} runs without authentication (--insecure); set \
                 {INSECURE_ENV}=1 to connect to it without a token"
            ),
            AuthError::WrongToken | AuthError::ProofRefused => format!(
                "wrong token for the {peer} at {addr}: it holds another token than this process"
            ),
            AuthError::NoToken | AuthError::TokenUnwanted => {
                format!("the {peer} at {addr} refused the handshake: {self}")
            }
        }
    }
}

/// The permission bits of the file at `path` when its group or others may
/// read or write it (rule 9); `None` when only its owner may, or where the
/// platform has no such bits.
fn readable_by_others(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "rask-auth-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_others_may_read_is_used_and_flagged() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("mode");
        let path = dir.join("token");
        let (token, created) = Token::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(readable_by_others(&path), None, "created 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(readable_by_others(&path), Some(0o644));
        // Still the same token: a warning, not a refusal.
        let again = Token::load(&path).unwrap();
        assert_eq!(again.expose_secret(), token.expose_secret());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_key_is_derived_from_the_secret_bytes() {
        let text = "00".repeat(31) + "ff";
        let token = Token::parse(&text).unwrap();
        let mut secret = [0u8; 32];
        secret[31] = 0xff;
        assert_eq!(token.key(), &blake3::derive_key("rask token v1", &secret));
        // Case and surrounding whitespace do not matter: the bytes do.
        let upper = Token::parse(&format!("  {}\n", text.to_uppercase())).unwrap();
        assert_eq!(upper.key(), token.key());
        assert_eq!(upper.expose_secret(), text);
    }

    #[test]
    fn the_dashboard_key_is_derived_one_way_in_a_context_of_its_own() {
        let text = "00".repeat(31) + "ff";
        let token = Token::parse(&text).unwrap();
        let mut secret = [0u8; 32];
        secret[31] = 0xff;
        let derived = blake3::derive_key("rask dashboard link v1", &secret);
        assert_eq!(token.dashboard_key(), hex(&derived));
        assert_ne!(token.dashboard_key(), text);
        assert_ne!(token.dashboard_key(), hex(token.key()));
    }

    #[test]
    fn only_64_hex_digits_are_a_token() {
        for bad in [
            String::new(),
            "secret".to_owned(),
            "a".repeat(63),
            "a".repeat(65),
            "g".repeat(64),
            format!("{}é", "a".repeat(62)),
        ] {
            let err = Token::parse(&bad).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("64 hex digits"), "{text}");
            if !bad.is_empty() {
                assert!(!text.contains(&bad), "the error repeats the text: {text}");
            }
        }
    }

    #[test]
    fn generated_tokens_are_fresh() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.key(), b.key());
        assert_eq!(format!("{a:?}"), "Token(..)");
    }

    #[test]
    fn proofs_bind_the_side_and_every_byte_of_both_hellos() {
        let token = Token::generate().unwrap();
        let (c, a) = ([1u8; 72], [2u8; 72]);
        let acceptor = proof(&token, Side::Acceptor, &c, &a);
        assert_eq!(acceptor, proof(&token, Side::Acceptor, &c, &a));
        assert_ne!(acceptor, proof(&token, Side::Connector, &c, &a));
        assert_ne!(acceptor, proof(&token, Side::Acceptor, &a, &c));
        let other = Token::generate().unwrap();
        assert_ne!(acceptor, proof(&other, Side::Acceptor, &c, &a));
        for i in 0..72 {
            let mut c2 = c;
            c2[i] ^= 1;
            assert_ne!(acceptor, proof(&token, Side::Acceptor, &c2, &a));
            let mut a2 = a;
            a2[i] ^= 1;
            assert_ne!(acceptor, proof(&token, Side::Acceptor, &c, &a2));
        }
    }

    #[test]
    fn the_environment_is_read_in_order() {
        let token = Token::generate().unwrap().expose_secret();
        let dir = temp_dir("env");
        std::fs::create_dir_all(dir.join(".rask")).unwrap();
        let file = dir.join("other");
        let other = Token::generate().unwrap().expose_secret();
        std::fs::write(&file, format!("{other}\n")).unwrap();
        let home = dir.to_str().unwrap();
        let secret = |auth: Option<Auth>| match auth {
            Some(Auth::Token(t)) => Some(t.expose_secret()),
            _ => None,
        };
        let file_str = file.to_str().unwrap();

        // Nothing set, no default file: none.
        assert!(Auth::with_env(env(&[("HOME", home)])).unwrap().is_none());
        assert!(Auth::with_env(env(&[])).unwrap().is_none());
        // The default file once it exists.
        let default = dir.join(".rask").join("token");
        let (created, _) = Token::load_or_create(&default).unwrap();
        let got = Auth::with_env(env(&[("HOME", home)])).unwrap();
        assert_eq!(secret(got), Some(created.expose_secret()));
        // RASK_TOKEN_FILE before it, RASK_TOKEN before both.
        let got = Auth::with_env(env(&[("HOME", home), (TOKEN_FILE_ENV, file_str)])).unwrap();
        assert_eq!(secret(got), Some(other.clone()));
        let got = Auth::with_env(env(&[
            ("HOME", home),
            (TOKEN_FILE_ENV, file_str),
            (TOKEN_ENV, &token),
        ]))
        .unwrap();
        assert_eq!(secret(got), Some(token.clone()));
        // Empty counts as unset.
        let got = Auth::with_env(env(&[("HOME", home), (TOKEN_ENV, "")])).unwrap();
        assert_eq!(secret(got), Some(created.expose_secret()));
        // Insecure, explicitly; alone it wins over the default file.
        let got = Auth::with_env(env(&[("HOME", home), (INSECURE_ENV, "1")])).unwrap();
        assert!(matches!(got, Some(Auth::Insecure)));
        let got = Auth::with_env(env(&[("HOME", home), (INSECURE_ENV, "0")])).unwrap();
        assert_eq!(secret(got), Some(created.expose_secret()));
        // With a token too it is a mistake, and so is a value not 0 or 1.
        let err = Auth::with_env(env(&[(INSECURE_ENV, "1"), (TOKEN_ENV, &token)])).unwrap_err();
        assert!(matches!(err, Error::AuthConflict), "{err}");
        let err = Auth::with_env(env(&[(INSECURE_ENV, "yes")])).unwrap_err();
        assert!(matches!(err, Error::Env { .. }), "{err}");
        // A bad token names where it came from, and not its text.
        let err = Auth::with_env(env(&[(TOKEN_ENV, "hunter2")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "RASK_TOKEN does not hold a rask token (64 hex digits, as rask-scheduler writes)"
        );
        let missing = dir.join("missing");
        let err = Auth::with_env(env(&[(TOKEN_FILE_ENV, missing.to_str().unwrap())])).unwrap_err();
        assert!(matches!(err, Error::TokenFile { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_created_token_file_is_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("create");
        let path = dir.join("deeper").join("token");
        let (token, created) = Token::load_or_create(&path).unwrap();
        assert!(created);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", token.expose_secret())
        );
        // Read again, not replaced; nothing staged is left beside it.
        let (again, created) = Token::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.expose_secret(), token.expose_secret());
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        // Racing creators agree on one token.
        let racing = dir.join("race").join("token");
        let tokens: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| Token::load_or_create(&racing).unwrap().0.expose_secret()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
