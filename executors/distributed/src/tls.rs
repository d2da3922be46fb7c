//! TLS for `tls://` addresses: the settings a process gives ([`Tls`]),
//! where a client or worker finds them ([`Tls::from_env`]), and the
//! rustls configurations `net.rs` connects and accepts with.
//!
//! Rules:
//!
//! 1. **The scheme decides.** A `tls://host:port` address is reached over
//!    TLS, a `tcp://host:port` (or bare `host:port`) one over plain TCP;
//!    TLS settings given with a `tcp://` address are not used. A process
//!    that reached its scheduler over TLS reaches workers' data ports over
//!    TLS too, and a worker that did serves its data port over TLS: one
//!    cluster is all TLS or not at all, so the addresses the scheduler hands
//!    out need no scheme.
//! 2. **TLS inside the pre-auth phase, the token inside TLS.** The TLS
//!    handshake is the first thing on a connection, within the handshake
//!    timeout and under the pre-auth cap of `net.rs` (its rule 6), and, on
//!    a scheduler and a worker's data port, on a handshakes' thread, not
//!    the scheduler's state thread nor the worker's network thread
//!    (scheduler rule 8, worker rule 13); the token handshake (`handshake.rs`) then runs inside the
//!    encrypted channel.
//!    TLS authenticates the channel (and, with client certificates, the
//!    process); the token stays the proof of membership. Both run when
//!    both are configured.
//! 3. **Names are checked.** A connector verifies the server's certificate
//!    against its CA ([`Tls::trust`]) and the host of the address it
//!    dialled: a scheduler's certificate must name the host clients and
//!    workers use, and a worker's the address its data port is reached at
//!    (the worker's IP as its scheduler connection sees it).
//! 4. **Mutual TLS is the scheduler's choice.** A scheduler given a CA
//!    requires a client certificate signed by it of every client and
//!    worker. A worker's data port requires client certificates exactly
//!    when the worker's scheduler asked the worker for one, so a cluster
//!    is mutual TLS everywhere or nowhere.
//! 5. **TLS 1.3 only**, on rustls with the `ring` provider: no OpenSSL, no
//!    C toolchain beyond `ring`'s. Every process of a cluster is rask, so no
//!    older peer has to be served.
//! 6. Files are read once, when the settings are made: a missing,
//!    unreadable or malformed file is an error naming it, and a key that
//!    does not match its certificate is refused then, not at the first
//!    connection.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::Error;

/// The environment variable naming the PEM file of the CA a client or
/// worker verifies its scheduler's (and data ports') certificates with.
pub const TLS_CA_ENV: &str = "RASK_TLS_CA";

/// The environment variable naming the PEM file of this process's
/// certificate (chain): a worker's data port presents it, and a client or
/// worker presents it as its client certificate when asked (mutual TLS).
pub const TLS_CERT_ENV: &str = "RASK_TLS_CERT";

/// The environment variable naming the PEM file of the private key of
/// [`TLS_CERT_ENV`]'s certificate.
pub const TLS_KEY_ENV: &str = "RASK_TLS_KEY";

/// A process's TLS settings: the CA it trusts and the certificate it
/// presents (module rules). What each needs:
///
/// | process | CA ([`Tls::trust`]) | certificate ([`Tls::identity`]) |
/// |---|---|---|
/// | scheduler | to require client certificates (mutual TLS) | always |
/// | worker | always (to verify the scheduler) | always (for its data port) |
/// | client | always (to verify the scheduler) | with mutual TLS |
///
/// Cheap to clone: the parsed files are shared.
///
/// # Examples
///
/// ```no_run
/// use rask_distributed::{Auth, Client, Tls};
/// let tls = Tls::new()
///     .trust("ca.pem".as_ref())?
///     .identity("client.pem".as_ref(), "client.key".as_ref())?;
/// let client = Client::connect_tls("tls://sched.example:8786", Auth::from_env()?.unwrap(), tls)?;
/// # Ok::<(), rask_distributed::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct Tls {
    ca: Option<Arc<RootCertStore>>,
    identity: Option<Arc<Identity>>,
}

/// A certificate chain and its key, checked to match.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The same, for client authentication.
    certified: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Tls")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// The crypto of every TLS connection (rule 5).
///
/// rustls deprecated `ring`'s provider for lacking post-quantum key
/// exchange (its `aws-lc-rs` provider has it). The trade-off is taken on
/// purpose: `aws-lc-rs` needs cmake and a C build on every machine that
/// builds rask, and a cluster's traffic is short-lived. Revisit once
/// `ring` gains ML-KEM or aws-lc-rs builds without cmake.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the file at `path`, for an error naming it as a `what` file.
fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|reason| Error::TlsFile {
        what,
        path: path.to_owned(),
        reason,
    })
}

/// The certificates in the PEM file at `path`, at least one.
fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read(path, what)?;
    let bad = || Error::BadPem {
        what: "certificate",
        path: path.to_owned(),
    };
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if certs.is_empty() {
        return Err(bad());
    }
    Ok(certs)
}

/// A settings error: `problem`, caused by `source`.
fn settings(problem: &'static str, source: impl std::fmt::Display) -> Error {
    Error::TlsSettings {
        problem,
        source: Some(std::io::Error::other(source.to_string())),
    }
}

impl Tls {
    /// No CA and no certificate yet: add them with [`Tls::trust`] and
    /// [`Tls::identity`].
    pub fn new() -> Tls {
        Tls::default()
    }

    /// These settings trusting the CA certificates in the PEM file at
    /// `ca`: servers this process connects to must present a certificate
    /// signed by one of them, and, on a scheduler, so must clients and
    /// workers (mutual TLS).
    ///
    /// # Errors
    ///
    /// [`Error::TlsFile`] if the file cannot be read, [`Error::BadPem`] if
    /// it holds no certificate, [`Error::TlsSettings`] if one cannot be a
    /// CA.
    pub fn trust(mut self, ca: &Path) -> Result<Tls, Error> {
        let mut roots = RootCertStore::empty();
        for cert in certificates(ca, "CA")? {
            roots
                .add(cert)
                .map_err(|e| settings("a CA certificate cannot be used", e))?;
        }
        self.ca = Some(Arc::new(roots));
        Ok(self)
    }

    /// These settings presenting the certificate (chain) in the PEM file
    /// at `cert`, whose private key is the PEM file at `key` (PKCS#8,
    /// PKCS#1 or SEC1).
    ///
    /// # Errors
    ///
    /// [`Error::TlsFile`] if a file cannot be read, [`Error::BadPem`] if
    /// `cert` holds no certificate or `key` no private key,
    /// [`Error::TlsSettings`] if the key does not match the certificate or
    /// is of a kind rustls cannot sign with.
    pub fn identity(mut self, cert: &Path, key: &Path) -> Result<Tls, Error> {
        let chain = certificates(cert, "certificate")?;
        let key_bytes = read(key, "key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| Error::BadPem {
            what: "private key",
            path: key.to_owned(),
        })?;
        let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|e| settings("the key does not go with the certificate", e))?;
        self.identity = Some(Arc::new(Identity {
            chain,
            key,
            certified: Arc::new(certified),
        }));
        Ok(self)
    }

    /// The settings the environment gives: the CA in the file
    /// [`TLS_CA_ENV`] names, the certificate and key in those
    /// [`TLS_CERT_ENV`] and [`TLS_KEY_ENV`] name. `None` when none of the
    /// three is set (an empty value counts as unset).
    ///
    /// # Errors
    ///
    /// [`Error::TlsSettings`] when only one of [`TLS_CERT_ENV`] and
    /// [`TLS_KEY_ENV`] is set; as [`Tls::trust`] and [`Tls::identity`]
    /// for the files.
    ///
    /// # Examples
    ///
    /// ```
    /// // Nothing set here: no TLS settings.
    /// # std::env::remove_var(rask_distributed::TLS_CA_ENV);
    /// # std::env::remove_var(rask_distributed::TLS_CERT_ENV);
    /// # std::env::remove_var(rask_distributed::TLS_KEY_ENV);
    /// assert!(rask_distributed::Tls::from_env()?.is_none());
    /// # Ok::<(), rask_distributed::Error>(())
    /// ```
    pub fn from_env() -> Result<Option<Tls>, Error> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let (ca, cert, key) = (var(TLS_CA_ENV), var(TLS_CERT_ENV), var(TLS_KEY_ENV));
        if ca.is_none() && cert.is_none() && key.is_none() {
            return Ok(None);
        }
        let mut tls = Tls::new();
        if let Some(ca) = ca {
            tls = tls.trust(Path::new(&ca))?;
        }
        match (cert, key) {
            (Some(cert), Some(key)) => tls = tls.identity(Path::new(&cert), Path::new(&key))?,
            (None, None) => {}
            _ => {
                return Err(Error::TlsSettings {
                    problem: "RASK_TLS_CERT and RASK_TLS_KEY go together: set both or neither",
                    source: None,
                })
            }
        }
        Ok(Some(tls))
    }

    /// Whether these settings trust a CA ([`Tls::trust`]).
    pub fn has_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// Whether these settings have a certificate ([`Tls::identity`]).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// Whether this process's certificate is valid for `host` (a DNS name
    /// or an IP address): whether a client connecting to `tls://host:…`
    /// would accept it, as far as names go. `false` without a certificate,
    /// or for a host that is neither.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(!rask_distributed::Tls::new().names("localhost"));
    /// ```
    pub fn names(&self, host: &str) -> bool {
        let Some(identity) = &self.identity else {
            return false;
        };
        let Ok(name) = ServerName::try_from(host) else {
            return false;
        };
        let Some(leaf) = identity.chain.first() else {
            return false;
        };
        match rustls::server::ParsedCertificate::try_from(leaf) {
            Ok(parsed) => rustls::client::verify_server_name(&parsed, &name).is_ok(),
            Err(_) => false,
        }
    }

    /// The connecting side of these settings (module rules 3 and 4).
    ///
    /// # Errors
    ///
    /// [`Error::TlsSettings`] without a CA to verify servers with.
    pub(crate) fn connector(&self) -> Result<Connector, Error> {
        let Some(roots) = self.ca.clone() else {
            return Err(Error::TlsSettings {
                problem: "a `tls://` address needs the CA that signed the server's certificate: \
                          set RASK_TLS_CA (or give one with Tls::trust)",
                source: None,
            });
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| settings("no TLS version in common", e))?
            .with_root_certificates(roots);
        let asked = Arc::new(AtomicBool::new(false));
        let config = match &self.identity {
            Some(identity) => builder.with_client_cert_resolver(Arc::new(Presented {
                key: identity.certified.clone(),
                asked: asked.clone(),
            })),
            None => builder.with_no_client_auth(),
        };
        Ok(Connector {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            asked,
        })
    }

    /// The accepting side of these settings: requires client certificates
    /// signed by the CA when `mutual` (module rule 4).
    ///
    /// # Errors
    ///
    /// [`Error::TlsSettings`] without a certificate to present, or, when
    /// `mutual`, without a CA to verify clients with.
    pub(crate) fn acceptor(&self, mutual: bool) -> Result<Acceptor, Error> {
        let Some(identity) = &self.identity else {
            return Err(Error::TlsSettings {
                problem: "serving TLS needs a certificate and its key: for a worker, set \
                          RASK_TLS_CERT and RASK_TLS_KEY (its data port presents them)",
                source: None,
            });
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| settings("no TLS version in common", e))?;
        let builder = match (&self.ca, mutual) {
            (Some(roots), true) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider(),
                )
                .build()
                .map_err(|e| settings("the CA cannot verify client certificates", e))?;
                builder.with_client_cert_verifier(verifier)
            }
            (None, true) => {
                return Err(Error::TlsSettings {
                    problem: "requiring client certificates needs the CA that signs them",
                    source: None,
                })
            }
            (_, false) => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| settings("the certificate cannot be served", e))?;
        Ok(Acceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// Presents this process's certificate when a server asks for one, and
/// remembers that one did (module rule 4).
#[derive(Debug)]
struct Presented {
    key: Arc<CertifiedKey>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for Presented {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Release);
        Some(self.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// How a process opens TLS connections: its rustls client, and whether a
/// server asked it for its certificate yet.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) connector: tokio_rustls::TlsConnector,
    asked: Arc<AtomicBool>,
}

impl Connector {
    /// Whether a server this connector reached asked for a client
    /// certificate (and was given one).
    pub(crate) fn was_asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }
}

/// How a process accepts TLS connections.
#[derive(Clone)]
pub(crate) struct Acceptor {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

/// The name a connector checks the server's certificate against: the host
/// of `address` (`host:port`, `[v6]:port`).
pub(crate) fn server_name(address: &str) -> Result<ServerName<'static>, std::io::Error> {
    let host = match address.rsplit_once(':') {
        Some((host, _port)) => host,
        None => address,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_owned()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the host is neither a DNS name nor an IP address",
        )
    })
}

/// What to tell the user about a TLS failure whose error is `e`: a hint
/// to append to its message, or nothing.
pub(crate) fn hint(e: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError};
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
    ) {
        return "; the peer closed the connection during the TLS handshake: is it a TLS port? \
                (a scheduler started without --tls-cert takes `tcp://` addresses)";
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "";
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "; the peer's certificate is not signed by the CA this process trusts (RASK_TLS_CA)"
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "; the peer's certificate does not name the host of this address: connect by a \
             name the certificate holds"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "; the peer requires a client certificate (mutual TLS): set RASK_TLS_CERT and \
             RASK_TLS_KEY"
        }
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA | AlertDescription::BadCertificate,
        ) => "; the peer refused this process's client certificate: is it signed by the CA the peer trusts?",
        _ => "",
    }
}

/// Whether `e` (of a read or write on a connection) is a TLS failure
/// rather than a plain I/O one.
pub(crate) fn is_tls(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
}

/// Certificates for tests in this crate: a throwaway CA, and a certificate
/// it signs for `127.0.0.1` (a server's and a client's), in a directory of
/// their own, removed on drop.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;

    use super::{Connector, Tls};

    pub(crate) struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        /// A new CA and certificate; `name` tells the test's directory.
        pub(crate) fn new(name: &str) -> Pki {
            let dir = std::env::temp_dir().join(format!(
                "rask-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
            std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
            let issuer = rcgen::Issuer::new(ca, ca_key);
            let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
            leaf.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = leaf.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
            std::fs::write(dir.join("cert.key"), key.serialize_pem()).unwrap();
            Pki { dir }
        }

        /// Settings presenting the certificate, trusting no CA: a server
        /// that asks for no client certificate.
        pub(crate) fn identity(&self) -> Tls {
            Tls::new()
                .identity(&self.dir.join("cert.pem"), &self.dir.join("cert.key"))
                .unwrap()
        }

        /// Settings presenting the certificate and trusting the CA: a
        /// worker's (it connects, and serves its data port).
        pub(crate) fn both(&self) -> Tls {
            self.identity().trust(&self.dir.join("ca.pem")).unwrap()
        }

        /// A connector trusting the CA, with no certificate of its own.
        pub(crate) fn connector(&self) -> Connector {
            Tls::new()
                .trust(&self.dir.join("ca.pem"))
                .unwrap()
                .connector()
                .unwrap()
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
