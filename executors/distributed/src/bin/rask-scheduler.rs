//! `rask-scheduler [--host 127.0.0.1] [--port 8786] [--worker-timeout 5]
//! [--client-timeout 60] [--task-timeout SECONDS] [--token-file PATH | --insecure]
//! [--tls-cert PEM --tls-key PEM [--tls-ca PEM]] [--unix PATH]`:
//! runs a rask scheduler until stopped. With `--port 0` the OS picks the
//! port; the first line on stdout is always the address clients and
//! workers use, `tcp://HOST:PORT` (`tls://HOST:PORT` with TLS).
//!
//! **The address printed.** For a `--host` that is one address, `HOST` is
//! that address. For `0.0.0.0` or `::` (every interface), it is the IP of
//! the interface this machine would reach the internet by: the local end
//! of a UDP socket connected to a documentation address (192.0.2.1, or
//! 2001:db8::1 for `::`), which sends nothing; when there is none, the
//! machine's hostname; failing that, the loopback address. With TLS,
//! clients check that the certificate names the host they dial, so the
//! first of these that the certificate names is printed: that IP, the
//! hostname, `localhost`, the loopback address; when it names none of
//! them, the IP is printed and a warning on stderr says clients must use
//! a name the certificate holds.
//!
//! **TLS.** `--tls-cert PEM --tls-key PEM` serve TLS with that certificate
//! (chain) and key: clients and workers then connect with `tls://`
//! addresses, verifying the certificate with the CA in their
//! `RASK_TLS_CA`. `--tls-ca PEM` in addition requires every client and
//! worker to present a certificate signed by that CA (`RASK_TLS_CERT`,
//! `RASK_TLS_KEY`): mutual TLS. The token is proved inside TLS as without
//! it. A worker not heard from for `--worker-timeout`
//! seconds is taken for dead and its work goes elsewhere; a client not
//! heard from for `--client-timeout` seconds (clients send a heartbeat
//! every second) is taken as disconnected. A task without a timeout of its
//! own fails as timed out after `--task-timeout` seconds (default: no
//! limit; each task of a chain sent as one fused task counts alone). A task running on `--allowed-failures` workers when they died
//! (default 3) fails instead of being run again; after its first such
//! death it runs alone on a worker, so a task that only ran beside one
//! that crashes its process does not fail with it.
//!
//! Every client and worker must prove the scheduler's token. It is, in
//! order: the one in `--token-file PATH`, the one in `RASK_TOKEN`, the one
//! in the file `RASK_TOKEN_FILE` names, the one in `$HOME/.rask/token`; a
//! file that does not exist is created with a fresh token (mode 0600, its
//! directory 0700). A line on stderr says where the token is.
//! `--insecure` turns authentication off, with a warning; so does
//! `RASK_INSECURE=1`, but only on a loopback address: to listen on any
//! other without authentication, `--insecure` must be given.
//!
//! **Unix socket.** `--unix PATH` also listens on a Unix socket at PATH
//! (`@NAME`: NAME in Linux's abstract namespace), which workers and
//! clients of this machine reach with `unix:PATH`, proving the same token;
//! each message then costs less than over TCP on loopback. A line on
//! stderr says so. Not with TLS.
//!
//! The web dashboard is served on `--dashboard ADDR` (default
//! `127.0.0.1:8787`; `:PORT` means 127.0.0.1, `:0` picks a free port; when
//! the default port is taken, a free one is picked with a warning), or not
//! at all with `--no-dashboard`. The second line on stdout is then
//! `dashboard: http://HOST:PORT/status`, with `HOST` picked as for the
//! address printed: for `0.0.0.0` or `::`, the IP (or hostname, or
//! loopback address) above, which a browser can open. On loopback it asks
//! for no key: any process of the machine may read it. Off loopback, it
//! asks for a key derived from the token (never the token itself, which
//! its plain HTTP would show to whoever watches the network): a line on
//! stderr gives the link to open once, `http://HOST:PORT/status?key=KEY`.
//!
//! **Stopping.** SIGTERM or SIGINT (Ctrl-C) stops the scheduler: every
//! connection is closed (its clients' pending work fails; its workers try
//! to reach it again for their death timeout, 60 s by default, then exit),
//! the dashboard stops, the Unix socket's file is removed, and the process
//! exits with status 0. A second signal while it stops exits at once, with
//! status 1.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use rask_distributed::{Auth, Tls, Token, INSECURE_ENV, TOKEN_ENV, TOKEN_FILE_ENV};

const USAGE: &str =
    "usage: rask-scheduler [--host 127.0.0.1] [--port 8786] [--worker-timeout SECONDS (5)] \
     [--client-timeout SECONDS (60)] [--task-timeout SECONDS (none)] [--allowed-failures N (3)] \
     [--token-file PATH ($HOME/.rask/token) | --insecure] [--unix PATH] \
     [--dashboard HOST:PORT (127.0.0.1:8787) | --no-dashboard] \
     [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]";

/// Where the dashboard answers unless told otherwise.
const DEFAULT_DASHBOARD: ([u8; 4], u16) = ([127, 0, 0, 1], 8787);

fn main() -> ExitCode {
    // The cluster's life on stderr, as RUST_LOG filters it (info by default).
    rask_distributed::init_logging();
    let mut host: IpAddr = [127, 0, 0, 1].into();
    let mut port: u16 = 8786;
    let mut options = rask_distributed::scheduler::Options::default();
    let mut token_file: Option<PathBuf> = None;
    let mut insecure = false;
    // `None`: the default; `Some(None)`: none.
    let mut dashboard: Option<Option<SocketAddr>> = None;
    let (mut tls_cert, mut tls_key, mut tls_ca): (Option<PathBuf>, _, _) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        match flag.as_str() {
            "--host" => match value().map(|v| v.parse()) {
                Some(Ok(h)) => host = h,
                _ => return usage("--host needs an IP address"),
            },
            "--port" => match value().map(|v| v.parse()) {
                Some(Ok(p)) => port = p,
                _ => return usage("--port needs a number from 0 to 65535"),
            },
            "--worker-timeout" => match value().map(|v| v.parse::<f64>()) {
                Some(Ok(s)) if s.is_finite() && s > 0.0 && s <= 1e6 => {
                    options.worker_timeout = std::time::Duration::from_secs_f64(s);
                }
                _ => return usage("--worker-timeout needs a number of seconds above 0"),
            },
            "--client-timeout" => match value().map(|v| v.parse::<f64>()) {
                Some(Ok(s)) if s.is_finite() && s > 0.0 && s <= 1e9 => {
                    options.client_timeout = std::time::Duration::from_secs_f64(s);
                }
                _ => return usage("--client-timeout needs a number of seconds above 0"),
            },
            "--allowed-failures" => match value().map(|v| v.parse::<u8>()) {
                Some(Ok(n)) if n > 0 => options.allowed_failures = n,
                _ => return usage("--allowed-failures needs a number from 1 to 255"),
            },
            "--task-timeout" => match value().map(|v| v.parse::<f64>()) {
                Some(Ok(s)) if s.is_finite() && s > 0.0 && s <= 1e9 => {
                    options.task_timeout = Some(std::time::Duration::from_secs_f64(s));
                }
                _ => return usage("--task-timeout needs a number of seconds above 0"),
            },
            "--token-file" => match value().filter(|v| !v.is_empty()) {
                Some(path) => token_file = Some(path.into()),
                None => return usage("--token-file needs a path"),
            },
            "--insecure" if inline.is_none() => insecure = true,
            "--dashboard" => match value().as_deref().map(dashboard_address) {
                Some(Some(at)) => dashboard = Some(Some(at)),
                _ => return usage("--dashboard needs HOST:PORT with an IP address, or :PORT"),
            },
            "--no-dashboard" if inline.is_none() => dashboard = Some(None),
            "--unix" => match value().filter(|v| !v.is_empty()) {
                Some(path) => options.unix = Some(path.into()),
                None => return usage("--unix needs a path (or @NAME)"),
            },
            "--tls-cert" | "--tls-key" | "--tls-ca" => {
                let Some(path) = value().filter(|v| !v.is_empty()) else {
                    return usage(&format!("{flag} needs a path to a PEM file"));
                };
                let slot = match flag.as_str() {
                    "--tls-cert" => &mut tls_cert,
                    "--tls-key" => &mut tls_key,
                    _ => &mut tls_ca,
                };
                *slot = Some(PathBuf::from(path));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument `{other}`")),
        }
    }
    if insecure && token_file.is_some() {
        return usage("--insecure and --token-file contradict each other: give one");
    }
    let tls = match (tls_cert, tls_key, tls_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), ca) => {
            let tls = Tls::new().identity(&cert, &key).and_then(|tls| match ca {
                Some(ca) => tls.trust(&ca),
                None => Ok(tls),
            });
            match tls {
                Ok(tls) => Some(tls),
                Err(e) => {
                    eprintln!("rask-scheduler: {e}{}", with_source(&e));
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => return usage("--tls-cert and --tls-key go together, and --tls-ca needs them"),
    };
    let (auth, whence) = match credentials(insecure, token_file, host) {
        Ok(found) => found,
        Err(problem) => {
            eprintln!("rask-scheduler: {problem}");
            return ExitCode::FAILURE;
        }
    };
    // The dashboard's link carries a key derived from the token, never the
    // token: its plain HTTP can be read on the way.
    let dashboard_key = auth.token().map(|t| t.dashboard_key());
    options.auth = Some(auth);
    options.tls = tls.clone();
    let default_dashboard = dashboard.is_none();
    options.dashboard = dashboard.unwrap_or(Some(DEFAULT_DASHBOARD.into()));
    let at = SocketAddr::new(host, port);
    let scheduler = match rask_distributed::scheduler::serve_with(at, options.clone()) {
        Err(rask_distributed::Error::Dashboard { reason, .. })
            if default_dashboard && reason.kind() == std::io::ErrorKind::AddrInUse =>
        {
            // The default dashboard's port is taken: try the dashboard on
            // a free port.
            let picked = options.dashboard(SocketAddr::from(([127, 0, 0, 1], 0)));
            let again = rask_distributed::scheduler::serve_with(at, picked);
            if again.is_ok() {
                eprintln!(
                    "rask-scheduler: warning: port {} is taken; the dashboard is on a free port",
                    DEFAULT_DASHBOARD.1
                );
            }
            again
        }
        other => other,
    };
    let scheduler = match scheduler {
        Ok(s) => s,
        // The dashboard's address, not the scheduler's: its own setting.
        Err(e @ rask_distributed::Error::Dashboard { .. }) => {
            eprintln!(
                "rask-scheduler: {e} (--dashboard); give --dashboard a free HOST:PORT (:0 \
                 picks one), or pass --no-dashboard"
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!(
                "rask-scheduler: cannot listen on {host}:{port}: {e}: {}",
                source(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    let address = scheduler.address();
    let (scheme, host) = match &tls {
        None => ("tcp", usable_host(address.ip())),
        Some(tls) => ("tls", tls_host(address.ip(), tls)),
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{scheme}://{}", join(&host, address.port()));
    if let Some(dashboard) = scheduler.dashboard() {
        // A browser elsewhere cannot open `0.0.0.0`: the same host as the
        // scheduler's own address would be on that address.
        let link = join(&usable_host(dashboard.ip()), dashboard.port());
        let _ = writeln!(stdout, "dashboard: http://{link}/status");
        if let Some(key) = dashboard_key.filter(|_| !dashboard.ip().is_loopback()) {
            eprintln!(
                "rask-scheduler: the dashboard asks for its key (not the cluster's token): \
                 open http://{link}/status?key={key} once"
            );
        }
    }
    let _ = stdout.flush();
    eprintln!("rask-scheduler: {}", whence.describe(address));
    if let Some(path) = scheduler.unix() {
        eprintln!(
            "rask-scheduler: workers and clients of this machine may connect to unix:{}",
            path.display()
        );
    }
    if let Some(tls) = &tls {
        eprintln!(
            "rask-scheduler: TLS on: clients and workers connect to {scheme}://{} with \
             RASK_TLS_CA set to the CA of its certificate{}",
            join(&host, address.port()),
            if tls.has_ca() {
                ", and must present a certificate signed by --tls-ca (RASK_TLS_CERT, \
                 RASK_TLS_KEY)"
            } else {
                ""
            }
        );
    }
    run_until_stopped(scheduler)
}

/// Waits for SIGTERM or SIGINT, then shuts `scheduler` down (the module's
/// "Stopping"); the scheduler itself lives on its own thread.
#[cfg(unix)]
fn run_until_stopped(mut scheduler: rask_distributed::scheduler::SchedulerHandle) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let watched = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .and_then(|runtime| {
            let _entered = runtime.enter();
            let term = signal(SignalKind::terminate())?;
            let int = signal(SignalKind::interrupt())?;
            Ok((runtime, term, int))
        });
    let (runtime, mut term, mut int) = match watched {
        Ok(watched) => watched,
        Err(e) => {
            eprintln!(
                "rask-scheduler: warning: cannot watch for SIGTERM and SIGINT ({e}): it runs \
                 until killed, and leaves its Unix socket's file behind"
            );
            loop {
                std::thread::park();
            }
        }
    };
    runtime.block_on(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        eprintln!("rask-scheduler: {name}: stopping (a second signal stops at once)");
        let (stopped, done) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            scheduler.shutdown();
            let _ = stopped.send(());
        });
        tokio::select! {
            _ = done => {
                eprintln!("rask-scheduler: stopped");
                ExitCode::SUCCESS
            }
            _ = term.recv() => ExitCode::FAILURE,
            _ = int.recv() => ExitCode::FAILURE,
        }
    })
}

/// Runs until killed: the scheduler lives on its own thread.
#[cfg(not(unix))]
fn run_until_stopped(_scheduler: rask_distributed::scheduler::SchedulerHandle) -> ExitCode {
    loop {
        std::thread::park();
    }
}

/// `HOST:PORT`, or `:PORT` on 127.0.0.1.
fn dashboard_address(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix(':') {
        Some(port) => Some(SocketAddr::from(([127, 0, 0, 1], port.parse().ok()?))),
        None => text.parse().ok(),
    }
}

/// The host clients reach a scheduler listening on `ip` by, as the module
/// docs say.
fn usable_host(ip: IpAddr) -> String {
    if !ip.is_unspecified() {
        return ip.to_string();
    }
    primary_ip(ip)
        .map(|ip| ip.to_string())
        .or_else(hostname)
        .unwrap_or_else(|| loopback(ip).to_string())
}

/// [`usable_host`] for a TLS scheduler: the first candidate its
/// certificate names.
fn tls_host(ip: IpAddr, tls: &Tls) -> String {
    let first = usable_host(ip);
    let mut candidates = vec![first.clone()];
    if ip.is_unspecified() {
        candidates.extend(hostname());
        candidates.push("localhost".to_owned());
        candidates.push(loopback(ip).to_string());
    }
    if let Some(named) = candidates.into_iter().find(|c| tls.names(c)) {
        return named;
    }
    eprintln!(
        "rask-scheduler: warning: the certificate does not name {first}: clients and workers \
         must connect by a name it holds"
    );
    first
}

/// The IP this machine would reach the internet by: the local end of a UDP
/// socket connected (nothing is sent) to a documentation address.
fn primary_ip(unspecified: IpAddr) -> Option<IpAddr> {
    let (bind, probe): (SocketAddr, SocketAddr) = if unspecified.is_ipv4() {
        (([0, 0, 0, 0], 0).into(), ([192, 0, 2, 1], 9).into())
    } else {
        let probe = IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
        ((IpAddr::from([0u16; 8]), 0).into(), (probe, 9).into())
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// This machine's hostname (Linux), if it has one.
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty() && name != "localhost").then(|| name.to_owned())
}

/// The loopback address of `ip`'s family.
fn loopback(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() {
        [127, 0, 0, 1].into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    }
}

/// `host:port`, with an IPv6 address in brackets.
fn join(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `": source"` for an error with a source, else nothing.
fn with_source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| format!(": {s}")).unwrap_or_default()
}

/// Where the scheduler's token came from, for the line on stderr.
enum Whence {
    Insecure,
    Env,
    File { path: PathBuf, created: bool },
}

impl Whence {
    fn describe(&self, address: SocketAddr) -> String {
        match self {
            Whence::Insecure => format!(
                "warning: authentication is off: anyone who can connect to {address} can run \
                 this cluster's registered functions and read every value; clients and workers \
                 need {INSECURE_ENV}=1"
            ),
            Whence::Env => format!(
                "clients and workers must prove the token given in {TOKEN_ENV} (set it to the \
                 same value for them)"
            ),
            Whence::File { path, created } => format!(
                "{} token in {path}: clients and workers on this machine read it there; \
                 elsewhere, set {TOKEN_ENV} to its contents or {TOKEN_FILE_ENV} to a copy of it",
                if *created { "created a" } else { "the" },
                path = path.display()
            ),
        }
    }
}

/// The scheduler's credentials, as the module docs list them; an error
/// to print when there are none it may use on `host`.
fn credentials(
    insecure: bool,
    token_file: Option<PathBuf>,
    host: IpAddr,
) -> Result<(Auth, Whence), String> {
    if insecure {
        return Ok((Auth::Insecure, Whence::Insecure));
    }
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let insecure_env = match set(INSECURE_ENV).as_ref().and_then(|v| v.to_str()) {
        None | Some("0") => false,
        Some("1") => true,
        Some(other) => return Err(format!("{INSECURE_ENV}={other:?} is not `1` or `0`")),
    };
    let from_env = token_file.is_none() && set(TOKEN_ENV).is_some();
    if insecure_env {
        if token_file.is_some() || from_env || set(TOKEN_FILE_ENV).is_some() {
            return Err(rask_distributed::Error::AuthConflict.to_string());
        }
        if !host.is_loopback() {
            return Err(format!(
                "refusing to listen on {host} without authentication because {INSECURE_ENV}=1 \
                 is set: pass --insecure to mean it, or unset {INSECURE_ENV}"
            ));
        }
        return Ok((Auth::Insecure, Whence::Insecure));
    }
    if from_env {
        let text = set(TOKEN_ENV).unwrap_or_default();
        return match Token::parse(&text.to_string_lossy()) {
            Ok(token) => Ok((Auth::Token(token), Whence::Env)),
            // `parse` names "the text given": name the variable instead.
            Err(_) => Err(rask_distributed::Error::BadToken {
                from: TOKEN_ENV.to_owned(),
            }
            .to_string()),
        };
    }
    let path = match token_file
        .or_else(|| set(TOKEN_FILE_ENV).map(PathBuf::from))
        .or_else(Token::default_path)
    {
        Some(path) => path,
        None => {
            return Err(format!(
                "no token file: HOME is not set; pass --token-file PATH or set {TOKEN_ENV}"
            ))
        }
    };
    match Token::load_or_create(&path) {
        Ok((token, created)) => Ok((Auth::Token(token), Whence::File { path, created })),
        Err(e) => {
            let cause = source(&e);
            let cause = if cause.is_empty() {
                cause
            } else {
                format!(": {cause}")
            };
            Err(format!(
                "{e}{cause}; pass --token-file PATH or set {TOKEN_ENV}"
            ))
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("rask-scheduler: {problem}\n{USAGE}");
    ExitCode::from(2)
}

fn source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}
