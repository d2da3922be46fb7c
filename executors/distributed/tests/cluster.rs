//! `LocalCluster` with real worker processes: this test binary is its own
//! worker, started in worker mode through `RASK_WORKER` (the same-binary
//! model the root crate uses).

mod support;
// One helper for both crates' tests: the root crate's.
#[path = "../../../tests/support/tmpfs.rs"]
mod tmpfs;

use std::process::Command;
use std::sync::Arc;

use rask_distributed::{
    scheduler, worker, Auth, AuthError, Client, Error, LocalCluster, Tls, Token, WORKER_ENV,
};
use rask_executor::{Key, Value};
use support::{Collect, Graph, Keep, Shared, TestRegistry, TIMEOUT};

/// Worker mode: when started by a `LocalCluster`, this "test" is the worker
/// process's whole life. Run normally, it does nothing.
#[test]
fn worker_entry() {
    if let Ok(scheduler) = std::env::var(WORKER_ENV) {
        if std::env::var_os(WORKER_LOG_ENV).is_some() {
            rask_distributed::init_logging();
        }
        let (shared, _) = Shared::new();
        worker::run(&scheduler, Arc::new(TestRegistry { shared }), 1).unwrap();
    }
}

/// Set for a worker whose log lines a test reads (on its stderr).
const WORKER_LOG_ENV: &str = "RASK_TEST_WORKER_LOG";

/// This test binary, filtered down to `worker_entry`.
fn worker_command() -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "worker_entry", "--test-threads=1", "--quiet"]);
    // The test harness's own chatter is not interesting here.
    c.stdout(std::process::Stdio::null());
    c
}

#[test]
fn local_cluster_runs_a_graph_and_survives_a_killed_worker() {
    let mut cluster = LocalCluster::start(2, worker_command).unwrap();
    assert_eq!(cluster.workers(), 2);
    assert!(cluster.address().starts_with("tcp://127.0.0.1:"));
    // On Linux the workers are on the Unix socket, so the kill below is
    // recovered from over it.
    if cfg!(target_os = "linux") {
        assert!(
            cluster.worker_address().starts_with("unix:@rask-"),
            "{}",
            cluster.worker_address()
        );
    }
    let client = cluster.client().unwrap();
    let (shared, _) = Shared::new();

    let mut g = Graph::new(&shared);
    let a = g.value(20);
    let b = g.op("inc", 0, &[a]);
    let c = g.op("add", 1, &[a, b]);
    g.output(c);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok(42)]);

    // SIGKILL a worker in the middle of a map with a reduction.
    let n = 300;
    let mut g = Graph::salted(&shared, 1);
    let mut mapped = Vec::new();
    for i in 0..n {
        let v = g.value(i);
        let t = g.task("sleep_inc", postcard::to_stdvec(&1_000u64).unwrap(), &[v]);
        mapped.push(t);
        g.output(t);
    }
    let total = g.op("add", 0, &mapped);
    g.output(total);
    let got = Collect::new(n as usize + 1);
    let progress = got.progress();
    got.submit(&client, g.build());
    for _ in 0..n / 4 {
        progress.recv_timeout(TIMEOUT).expect("progress");
    }
    cluster.kill_worker(0).unwrap();
    assert!(matches!(
        cluster.kill_worker(0),
        Err(Error::NoWorker { index: 0 })
    ));
    let out = got.wait();
    for (i, v) in out.iter().take(n as usize).enumerate() {
        assert_eq!(*v, Ok(i as i64 + 1), "output {i}");
    }
    assert_eq!(out[n as usize], Ok((1..=n).sum()));
}

/// `a + 1` on `client`.
fn compute_inc(client: &Client, shared: &Arc<Shared>, a: i64) -> i64 {
    submit_inc(client, shared, a).unwrap()
}

/// `inc(a)` on the cluster: its outcome, a failure included.
fn submit_inc(
    client: &Client,
    shared: &Arc<Shared>,
    a: i64,
) -> Result<i64, rask_executor::Failure> {
    let mut g = Graph::salted(shared, a as u64);
    let v = g.value(a);
    let b = g.op("inc", 0, &[v]);
    g.output(b);
    let got = Collect::new(1);
    got.submit(client, g.build());
    got.wait().pop().unwrap()
}

#[test]
fn a_local_cluster_has_a_token_of_its_own_that_lets_other_processes_in() {
    let one = LocalCluster::start(1, worker_command).unwrap();
    let two = LocalCluster::start(1, worker_command).unwrap();
    // Fresh for each cluster; its workers registered with it.
    assert_ne!(one.token().expose_secret(), two.token().expose_secret());
    let (shared, _) = Shared::new();
    // Another process would connect by address with the token.
    let by_address = Client::connect_with(&one.address(), Auth::Token(one.token().clone()));
    assert_eq!(compute_inc(&by_address.unwrap(), &shared, 1), 2);
    // Not with another cluster's token, and not with none.
    let err = Client::connect_with(&one.address(), Auth::Token(two.token().clone())).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Auth {
                reason: AuthError::WrongToken,
                ..
            }
        ),
        "{err}"
    );
    let err = Client::connect_with(&one.address(), Auth::Insecure).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "the scheduler at {} requires a token; set RASK_TOKEN",
            one.address().trim_start_matches("tcp://")
        )),
        "{text}"
    );
    // The in-process client needs none, and reads values from the
    // workers' data ports with the cluster's token.
    assert_eq!(compute_inc(&one.client().unwrap(), &shared, 2), 3);
}

/// A worker of this machine joins a local cluster at its worker address
/// (its Unix socket on Linux) with the cluster's token, and only with it.
#[test]
fn another_worker_joins_at_the_worker_address_with_the_token_only() {
    let cluster = LocalCluster::start(1, worker_command).unwrap();
    let client = cluster.client().unwrap();
    let workers = |client: &Client| client.info().unwrap().workers.len();
    assert_eq!(workers(&client), 1);
    let wait_for = |n: usize| {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while workers(&client) != n {
            assert!(std::time::Instant::now() < deadline, "{n} workers");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    // With another token: refused, and the worker process ends.
    let other = Token::generate().unwrap();
    let mut refused = worker_command()
        .env(WORKER_ENV, cluster.worker_address())
        .env(rask_distributed::TOKEN_ENV, other.expose_secret())
        .env(rask_distributed::DEATH_TIMEOUT_ENV, "0")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut refused);
    assert!(!status.success(), "{status}");
    assert_eq!(workers(&client), 1);
    // With the cluster's: it registers and computes.
    let mut joined = worker_command()
        .env(WORKER_ENV, cluster.worker_address())
        .env(rask_distributed::TOKEN_ENV, cluster.token().expose_secret())
        .spawn()
        .unwrap();
    wait_for(2);
    let (shared, _) = Shared::new();
    assert_eq!(compute_inc(&client, &shared, 41), 42);
    joined.kill().unwrap();
    joined.wait().unwrap();
    wait_for(1);
}

/// Waits for `child` to exit, up to `TIMEOUT` (then kills it and fails).
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_worker_that_exits_early_is_reported_and_writes_where_its_command_says() {
    // Workers write where their command points stdout and stderr: this
    // process's own by default, a file here.
    let path = std::env::temp_dir().join(format!("rask-early-exit-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let err = LocalCluster::start(1, move || {
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'no worker mode here' >&2; exit 3"]);
        c.stderr(file.try_clone().unwrap());
        c
    })
    .unwrap_err();
    match &err {
        Error::WorkerExited { index, status } => {
            assert_eq!(*index, 0);
            assert_eq!(status.code(), Some(3));
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("worker-mode setup"), "{text}");
    assert!(text.contains("stderr is printed above"), "{text}");
    let written = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(written, "no worker mode here\n");
}

/// A `rask-scheduler` process, killed and reaped however the test ends.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `rask-scheduler` with `args` and `env`; returns it with its
/// address (its first line on stdout), its first line on stderr, and its
/// later lines on stderr as they come.
fn start_scheduler(
    args: &[&str],
    env: &[(&str, &str)],
) -> (Reap, String, String, std::sync::mpsc::Receiver<String>) {
    start_scheduler_in(&std::env::current_dir().unwrap(), args, env)
}

/// [`start_scheduler`] in the working directory `dir`.
fn start_scheduler_in(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Reap, String, String, std::sync::mpsc::Receiver<String>) {
    let (child, stdout, stderr) = spawn_scheduler(dir, args, env);
    let address = stdout.recv_timeout(TIMEOUT).expect("the address line");
    let said = stderr.recv_timeout(TIMEOUT).expect("a line on stderr");
    (child, address.trim().to_owned(), said, stderr)
}

/// Starts `rask-scheduler` in `dir` with `args` and `env`; returns it with
/// its lines on stdout and on stderr as they come.
fn spawn_scheduler(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (
    Reap,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    // No dashboard unless asked: its default port may be taken by a test
    // beside this one, and its warning would come before the token's line.
    let quiet = (!args.iter().any(|a| a.starts_with("--dashboard"))).then_some("--no-dashboard");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
        .current_dir(dir)
        .args(args)
        .args(quiet)
        .env_remove(rask_distributed::TOKEN_ENV)
        .env_remove(rask_distributed::TOKEN_FILE_ENV)
        .env_remove(rask_distributed::INSECURE_ENV)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Every line read, so the scheduler never blocks on a full pipe; the
    // threads end when it exits.
    let lines = |from: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        rx
    };
    let stdout = lines(Box::new(child.stdout.take().unwrap()));
    let stderr = lines(Box::new(child.stderr.take().unwrap()));
    (Reap(child), stdout, stderr)
}

/// The next line of `lines` that contains `text`, skipping others.
fn line_with(lines: &std::sync::mpsc::Receiver<String>, text: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("no line with {text:?}"));
        if line.contains(text) {
            return line;
        }
    }
}

/// A directory of this test's own, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("rask-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn rask_scheduler_binary_prints_its_address_and_serves() {
    let dir = TempDir::new("scheduler-token");
    let path = dir.0.join("sub").join("token");
    let path_arg = path.to_str().unwrap();
    let args = [
        "--port",
        "0",
        "--worker-timeout",
        "30",
        "--token-file",
        path_arg,
    ];
    let (mut child, address, said, stderr) = start_scheduler(&args, &[]);
    assert!(address.starts_with("tcp://127.0.0.1:"), "{address}");
    // It made the token file, and says where it is.
    assert!(said.contains("created a token in"), "{said}");
    assert!(said.contains(path_arg), "{said}");
    let token = Token::load(&path).unwrap();
    let auth = Auth::Token(token);

    let (shared, _) = Shared::new();
    // No death timeout: it ends with the scheduler, as it did before it
    // could wait for another.
    let w = worker::spawn_with(
        &address,
        Arc::new(TestRegistry {
            shared: shared.clone(),
        }),
        worker::Options::default()
            .death_timeout(std::time::Duration::ZERO)
            .auth(auth.clone()),
    )
    .unwrap();
    let client = Client::connect_with(&address, auth).unwrap();
    assert_eq!(compute_inc(&client, &shared, 1), 2);
    // The cluster's life, as tracing events on the scheduler's stderr.
    let joined = line_with(&stderr, " joined from 127.0.0.1:");
    assert!(
        joined.contains(" INFO rask_distributed::scheduler: worker ")
            && joined.contains(": 1 threads, data port "),
        "{joined}"
    );
    let connected = line_with(&stderr, " connected from 127.0.0.1:");
    assert!(connected.contains(" INFO "), "{connected}");
    // Without the token, neither a client nor a worker gets in, and the
    // scheduler says so in one line each.
    let err = Client::connect_with(&address, Auth::Insecure).unwrap_err();
    assert!(err.to_string().contains("requires a token"), "{err}");
    let logged = line_with(&stderr, "refused");
    assert!(
        logged.contains("refused the connection from 127.0.0.1:")
            && logged.ends_with("the peer has no token, and this process requires one"),
        "{logged}"
    );
    let stranger = Auth::Token(Token::generate().unwrap());
    let options = worker::Options::default()
        .death_timeout(std::time::Duration::ZERO)
        .auth(stranger);
    let registry = Arc::new(TestRegistry {
        shared: shared.clone(),
    });
    match worker::spawn_with(&address, registry, options) {
        Err(Error::Auth {
            reason: AuthError::WrongToken,
            ..
        }) => {}
        other => panic!("a worker with another token: {other:?}"),
    }
    let logged = line_with(&stderr, "refused");
    assert!(logged.contains("wrong token"), "{logged}");
    drop(client);
    let left = line_with(&stderr, " disconnected: ");
    assert!(
        left.contains(" INFO ") && left.contains("client "),
        "{left}"
    );
    let _ = child.0.kill();
    let _ = child.0.wait();
    // The worker exits by itself once its scheduler is gone.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(w.join());
    });
    assert!(rx.recv_timeout(TIMEOUT).expect("worker exit").is_ok());

    // Started again, it reads the same file and keeps the token.
    let (_child, _, said, _) = start_scheduler(&args, &[]);
    assert!(
        said.starts_with(&format!("rask-scheduler: the token in {path_arg}: ")),
        "{said}"
    );
    assert_eq!(
        Token::load(&path).unwrap().expose_secret(),
        auth_text(&path)
    );
}

/// The token text in the file at `path`.
fn auth_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

#[test]
fn rask_scheduler_binary_takes_its_token_from_the_environment_or_runs_insecure_when_told() {
    let token = Token::generate().unwrap();
    let text = token.expose_secret();
    let (_child, address, said, _) = start_scheduler(&["--port", "0"], &[("RASK_TOKEN", &text)]);
    assert!(said.contains("token given in RASK_TOKEN"), "{said}");
    assert!(Client::connect_with(&address, Auth::Token(token)).is_ok());
    let other = Auth::Token(Token::generate().unwrap());
    let err = Client::connect_with(&address, other).unwrap_err();
    assert!(err.to_string().starts_with("wrong token"), "{err}");

    // Insecure, with a warning; a client with a token is refused there.
    let (_child, address, said, _) = start_scheduler(&["--port", "0", "--insecure"], &[]);
    assert!(said.contains("warning: authentication is off"), "{said}");
    let with_token = Auth::Token(Token::generate().unwrap());
    let err = Client::connect_with(&address, with_token).unwrap_err();
    assert!(err.to_string().contains("RASK_INSECURE=1"), "{err}");
    assert!(Client::connect_with(&address, Auth::Insecure).is_ok());
}

#[test]
fn rask_scheduler_binary_refuses_to_listen_beyond_loopback_insecure_unless_told() {
    // 192.0.2.1 is TEST-NET-1: never this machine's. The refusal comes
    // before any socket is bound, and nothing is sent anywhere.
    let out = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
        .args(["--host", "192.0.2.1", "--port", "0"])
        .env("RASK_INSECURE", "1")
        .env_remove(rask_distributed::TOKEN_ENV)
        .env_remove(rask_distributed::TOKEN_FILE_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 192.0.2.1 without authentication"),
        "{stderr}"
    );
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(out.stdout.is_empty());
    // A token given together with RASK_INSECURE=1 is a contradiction.
    let out = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
        .args(["--port", "0"])
        .env("RASK_INSECURE", "1")
        .env("RASK_TOKEN", Token::generate().unwrap().expose_secret())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unset one of them"));
}

/// `--unix PATH`: workers and clients of this machine connect there.
#[test]
fn rask_scheduler_binary_serves_a_unix_socket_when_asked() {
    let dir = TempDir::new("scheduler-unix");
    std::fs::create_dir_all(&dir.0).unwrap();
    let socket = dir.0.join("s.sock");
    let token = dir.0.join("token");
    let args = [
        "--port",
        "0",
        "--token-file",
        token.to_str().unwrap(),
        "--unix",
        socket.to_str().unwrap(),
    ];
    let (_child, _, _, stderr) = start_scheduler(&args, &[]);
    let address = format!("unix:{}", socket.display());
    let said = line_with(&stderr, "may connect to unix:");
    assert!(said.ends_with(&address), "{said}");
    // A relative path is made absolute: workers started elsewhere find it.
    let relative = [
        "--port",
        "0",
        "--token-file",
        token.to_str().unwrap(),
        "--unix",
        "r.sock",
    ];
    let (_other, _, _, other_stderr) = start_scheduler_in(&dir.0, &relative, &[]);
    let said = line_with(&other_stderr, "may connect to unix:");
    assert!(
        said.ends_with(&format!("unix:{}", dir.0.join("r.sock").display())),
        "{said}"
    );
    let auth = Auth::Token(Token::load(&token).unwrap());
    let (shared, _) = Shared::new();
    let registry = Arc::new(TestRegistry {
        shared: shared.clone(),
    });
    let options = worker::Options::default()
        .death_timeout(std::time::Duration::ZERO)
        .auth(auth.clone());
    let _worker = worker::spawn_with(&address, registry, options).unwrap();
    let client = Client::connect_with(&address, auth).unwrap();
    assert_eq!(compute_inc(&client, &shared, 1), 2);
    let joined = line_with(&stderr, " joined from a local process (Unix socket)");
    assert!(joined.contains(" INFO "), "{joined}");
}

/// SIGTERM and SIGINT stop `rask-scheduler` cleanly: status 0, its Unix
/// socket's file removed, and a client connected to it told its
/// connection ended (what it submits fails instead of waiting).
#[test]
fn rask_scheduler_binary_stops_on_sigterm_and_sigint_and_removes_its_socket_file() {
    let dir = TempDir::new("scheduler-signals");
    std::fs::create_dir_all(&dir.0).unwrap();
    for signal in ["TERM", "INT"] {
        let socket = dir.0.join(format!("{signal}.sock"));
        let args = [
            "--port",
            "0",
            "--insecure",
            "--unix",
            socket.to_str().unwrap(),
        ];
        let (mut child, _, _, stderr) = start_scheduler(&args, &[]);
        line_with(&stderr, "may connect to unix:");
        assert!(socket.exists(), "SIG{signal}: no socket file to begin with");
        let address = format!("unix:{}", socket.display());
        let client = Client::connect_with(&address, Auth::Insecure).unwrap();
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.0.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
        line_with(&stderr, &format!("SIG{signal}: stopping"));
        let status = wait_exit(&mut child.0);
        assert!(status.success(), "SIG{signal}: {status}");
        assert!(
            !socket.exists(),
            "SIG{signal}: the socket file was left behind"
        );
        // The client's connection ended with the scheduler: what it
        // submits now fails, nothing waits for a scheduler gone.
        let (shared, _) = Shared::new();
        let result = submit_inc(&client, &shared, 1);
        assert!(result.is_err(), "SIG{signal}: {result:?}");
    }
}

/// A worker the scheduler retired leaves with an `INFO` line saying so,
/// not the warning of a worker lost.
#[test]
fn rask_scheduler_binary_logs_a_retired_worker_as_retired_not_gone() {
    let (_child, address, _, stderr) = start_scheduler(&["--port", "0", "--insecure"], &[]);
    let (shared, _) = Shared::new();
    let registry = Arc::new(TestRegistry {
        shared: shared.clone(),
    });
    let worker = |name: &str| {
        let options = worker::Options::default()
            .name(name)
            .unwrap()
            .death_timeout(std::time::Duration::ZERO)
            .auth(Auth::Insecure);
        worker::spawn_with(&address, registry.clone(), options).unwrap()
    };
    let (_leaves, _stays) = (worker("leaves"), worker("stays"));
    let client = Client::connect_with(&address, Auth::Insecure).unwrap();
    assert_eq!(compute_inc(&client, &shared, 1), 2);
    client.retire_workers(&["leaves"]).unwrap();
    // Its line on leaving (not the one on joining, "(leaves) joined").
    let left = line_with(&stderr, "(leaves) at ");
    assert!(
        left.contains(" INFO ") && left.contains("retired and left"),
        "{left}"
    );
}

#[test]
fn rask_scheduler_binary_rejects_bad_arguments() {
    for args in [
        &["--port", "nope"][..],
        &["--worker-timeout", "0"],
        &["--worker-timeout", "soon"],
        &["--insecure", "--token-file", "/nonexistent/token"],
        &["--token-file"],
        &["--unix"],
        &["--unix", ""],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
    }
}

/// A throwaway CA, and certificates it signs, as PEM files in a directory
/// of the test's own.
struct Pki {
    dir: TempDir,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = TempDir::new(name);
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.0.join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            ca: rcgen::Issuer::new(params, key),
        }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.0.join("ca.pem")
    }

    /// A certificate for `names` (DNS names or IPs), good for servers and
    /// clients: its PEM file and its key's.
    fn issue(&self, file: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.0.join(format!("{file}.pem")),
            self.dir.0.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// Settings trusting this CA, with a certificate for 127.0.0.1.
    fn tls(&self, file: &str) -> Tls {
        let (cert, key) = self.issue(file, &["127.0.0.1", "localhost"]);
        Tls::new()
            .trust(&self.ca())
            .unwrap()
            .identity(&cert, &key)
            .unwrap()
    }
}

/// A TLS scheduler in this process (mutual TLS when `mutual`), and its
/// address and token.
fn tls_scheduler(pki: &Pki, mutual: bool) -> (scheduler::SchedulerHandle, String, Auth) {
    let (cert, key) = pki.issue("scheduler", &["127.0.0.1"]);
    let mut tls = Tls::new().identity(&cert, &key).unwrap();
    if mutual {
        tls = tls.trust(&pki.ca()).unwrap();
    }
    let options = scheduler::Options::default().tls(tls);
    let sched = scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap();
    let address = format!("tls://{}", sched.address());
    let auth = Auth::Token(sched.token().unwrap().clone());
    (sched, address, auth)
}

#[test]
fn mutual_tls_computes_and_workers_fetch_from_each_other_over_tls() {
    let pki = Pki::new("mtls");
    let (_sched, address, auth) = tls_scheduler(&pki, true);
    let (shared, _) = Shared::new();
    let registry = || {
        Arc::new(TestRegistry {
            shared: shared.clone(),
        })
    };
    let options = |file| {
        worker::Options::default()
            .auth(auth.clone())
            .tls(pki.tls(file))
            .death_timeout(std::time::Duration::ZERO)
    };
    let _workers = [
        worker::spawn_with(&address, registry(), options("worker-a")).unwrap(),
        worker::spawn_with(&address, registry(), options("worker-b")).unwrap(),
    ];
    let client = Client::connect_tls(&address, auth.clone(), pki.tls("client")).unwrap();
    assert_eq!(compute_inc(&client, &shared, 41), 42);
    // A map over both workers, then one sum: the worker running the sum
    // reads the other's values from its data port, over TLS.
    let n = 40;
    let mut g = Graph::salted(&shared, 7);
    let mapped: Vec<u32> = (0..n)
        .map(|i| {
            let v = g.value(i);
            g.task("sleep_inc", postcard::to_stdvec(&2_000u64).unwrap(), &[v])
        })
        .collect();
    let total = g.op("add", 0, &mapped);
    g.output(total);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok((1..=n).sum())]);
    // The client reads a big value from a data port, over TLS too.
    let mut g = Graph::salted(&shared, 8);
    let big = g.task("big", postcard::to_stdvec(&100_000u64).unwrap(), &[]);
    let len = g.op("len", 0, &[big]);
    g.output(len);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok(100_000)]);
}

#[test]
fn tls_refusals_name_the_address_and_the_reason() {
    let pki = Pki::new("tls-refusals");
    let (sched, address, auth) = tls_scheduler(&pki, true);
    let plain = sched.address().to_string();
    // No client certificate, to a scheduler that requires one.
    let no_cert = Tls::new().trust(&pki.ca()).unwrap();
    let err = Client::connect_tls(&address, auth.clone(), no_cert).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert!(text.contains(&plain), "{text}");
    assert!(text.contains("requires a client certificate"), "{text}");
    // Trusting another CA.
    let other = Pki::new("tls-other-ca");
    let err = Client::connect_tls(&address, auth.clone(), other.tls("client")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("TLS handshake with {plain} failed")),
        "{text}"
    );
    assert!(text.contains("not signed by the CA"), "{text}");
    // A certificate that does not name the host dialled.
    let (cert, key) = pki.issue("elsewhere", &["elsewhere.example"]);
    let tls = Tls::new().identity(&cert, &key).unwrap();
    let options = scheduler::Options::default().tls(tls);
    let misnamed = scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap();
    let at = format!("tls://{}", misnamed.address());
    let err = Client::connect_tls(&at, auth.clone(), pki.tls("client")).unwrap_err();
    assert!(err.to_string().contains("does not name the host"), "{err}");
    // `tcp://` to the TLS port: told to use `tls://`, not left hanging.
    let err = Client::connect_with(&format!("tcp://{plain}"), auth.clone()).unwrap_err();
    assert!(matches!(err, Error::TlsRequired { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("{plain} speaks TLS: connect with `tls://{plain}`")),
        "{err}"
    );
    // And `tls://` to a plain port.
    let plain_sched = scheduler::serve("127.0.0.1:0".parse().unwrap()).unwrap();
    let at = format!("tls://{}", plain_sched.address());
    let token = Auth::Token(plain_sched.token().unwrap().clone());
    let err = Client::connect_tls(&at, token, pki.tls("client")).unwrap_err();
    assert!(err.to_string().contains("is it a TLS port?"), "{err}");
    // A worker without a certificate cannot serve its data port over TLS.
    let (shared, _) = Shared::new();
    let options = worker::Options::default()
        .auth(auth)
        .tls(Tls::new().trust(&pki.ca()).unwrap());
    let err = worker::spawn_with(&address, Arc::new(TestRegistry { shared }), options).unwrap_err();
    assert!(err.to_string().contains("RASK_TLS_CERT"), "{err}");
}

#[test]
fn tls_files_that_cannot_be_used_are_named() {
    let pki = Pki::new("tls-files");
    let missing = pki.dir.0.join("missing.pem");
    let err = Tls::new().trust(&missing).unwrap_err();
    assert!(matches!(err, Error::TlsFile { .. }), "{err:?}");
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
    let junk = pki.dir.0.join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = Tls::new().trust(&junk).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} holds no certificate in PEM form", junk.display())
    );
    let (cert, key) = pki.issue("one", &["127.0.0.1"]);
    let err = Tls::new().identity(&cert, &junk).unwrap_err();
    assert!(err.to_string().contains("holds no private key"), "{err}");
    let (_, other_key) = pki.issue("two", &["127.0.0.1"]);
    let err = Tls::new().identity(&cert, &other_key).unwrap_err();
    assert!(
        err.to_string().contains("the key does not go with"),
        "{err}"
    );
    let tls = Tls::new().identity(&cert, &key).unwrap();
    assert!(tls.names("127.0.0.1"));
    assert!(!tls.names("10.1.2.3"));
}

#[test]
fn rask_scheduler_binary_serves_mutual_tls_to_a_worker_and_a_client() {
    let pki = Pki::new("scheduler-tls");
    let (cert, key) = pki.issue("scheduler", &["127.0.0.1"]);
    let ca = pki.ca();
    let token = Token::generate().unwrap();
    let text = token.expose_secret();
    let args = [
        "--port",
        "0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        ca.to_str().unwrap(),
    ];
    let (_child, address, _, stderr) = start_scheduler(&args, &[("RASK_TOKEN", &text)]);
    assert!(address.starts_with("tls://127.0.0.1:"), "{address}");
    let said = stderr.recv_timeout(TIMEOUT).expect("the TLS line");
    assert!(
        said.contains("TLS on") && said.contains("--tls-ca"),
        "{said}"
    );
    let auth = Auth::Token(token);
    let (shared, _) = Shared::new();
    let options = worker::Options::default()
        .death_timeout(std::time::Duration::ZERO)
        .auth(auth.clone())
        .tls(pki.tls("worker"));
    let registry = Arc::new(TestRegistry {
        shared: shared.clone(),
    });
    let _worker = worker::spawn_with(&address, registry, options).unwrap();
    let client = Client::connect_tls(&address, auth.clone(), pki.tls("client")).unwrap();
    assert_eq!(compute_inc(&client, &shared, 1), 2);
    // Without a client certificate: refused, and the scheduler says why.
    let no_cert = Tls::new().trust(&ca).unwrap();
    assert!(Client::connect_tls(&address, auth, no_cert).is_err());
    let logged = line_with(&stderr, "TLS handshake failed");
    assert!(logged.contains(" WARN "), "{logged}");
    // A key without its certificate is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
        .args(["--tls-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn rask_scheduler_binary_on_every_interface_prints_an_address_clients_can_use() {
    let args = ["--host", "0.0.0.0", "--port", "0", "--insecure"];
    let (_child, address, _, _) = start_scheduler(&args, &[]);
    assert!(address.starts_with("tcp://"), "{address}");
    assert!(!address.starts_with("tcp://0.0.0.0:"), "{address}");
    // Usable: a client connects by it.
    let client = Client::connect_with(&address, Auth::Insecure);
    assert!(client.is_ok(), "{address}: {:?}", client.err());
}

/// A GET of `target` on `127.0.0.1:port`, with `cookie` if given: the
/// status and the whole answer.
fn dashboard_get(port: u16, target: &str, cookie: Option<&str>) -> (u16, String) {
    dashboard_get_at(&format!("127.0.0.1:{port}"), target, cookie)
}

/// [`dashboard_get`] on `host` (`HOST:PORT`, as a link names it).
fn dashboard_get_at(host: &str, target: &str, cookie: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: rask_dashboard={c}\r\n"));
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    (status, answer)
}

#[test]
fn rask_scheduler_binary_dashboard_takes_its_key_and_refuses_the_token() {
    let dir = TempDir::new("dashboard-key");
    let path = dir.0.join("token");
    let args = [
        "--port",
        "0",
        "--token-file",
        path.to_str().unwrap(),
        // Off loopback, so the dashboard asks for its key; reached at
        // 127.0.0.1 below.
        "--dashboard",
        "0.0.0.0:0",
    ];
    let (_child, _, said, rest) = start_scheduler(&args, &[]);
    let printed = if said.contains("/status") {
        said
    } else {
        line_with(&rest, "/status")
    };
    let token = Token::load(&path).unwrap();
    let secret = token.expose_secret();
    let port: u16 = printed
        .split("http://")
        .nth(1)
        .and_then(|url| url.split('/').next())
        .and_then(|host| host.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no dashboard address in {printed:?}"));
    // The cluster's token in the link opens nothing: it is not the key.
    for target in [
        format!("/status?token={secret}"),
        format!("/status?key={secret}"),
    ] {
        let (status, answer) = dashboard_get(port, &target, None);
        assert_eq!(status, 401, "{target}: {answer}");
        assert!(!answer.contains("Set-Cookie"), "{answer}");
        assert!(
            answer.contains("the link rask-scheduler printed"),
            "{answer}"
        );
    }
    let (status, _) = dashboard_get(port, "/api/status", Some(&secret));
    assert_eq!(status, 401, "the token as the cookie");
    // The link printed carries the dashboard key, never the token.
    assert!(!printed.contains(&secret), "{printed}");
    let key = token.dashboard_key();
    assert!(
        printed.ends_with(&format!(":{port}/status?key={key} once")),
        "{printed}"
    );
    // The key opens the page once and sets the cookie, which opens the rest.
    let (status, answer) = dashboard_get(port, &format!("/status?key={key}"), None);
    assert_eq!(status, 303, "{answer}");
    assert!(answer.contains("Location: /status\r\n"), "{answer}");
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: rask_dashboard="))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no cookie in {answer}"));
    assert!(!cookie.contains(&secret));
    assert_eq!(dashboard_get(port, "/api/status", Some(cookie)).0, 200);
    assert_eq!(dashboard_get(port, "/status", Some(cookie)).0, 200);
    assert_eq!(dashboard_get(port, "/api/status", None).0, 401);
}

#[test]
fn rask_scheduler_binary_dashboard_on_every_interface_prints_a_link_a_browser_can_open() {
    let dir = TempDir::new("dashboard-link");
    let path = dir.0.join("token");
    let args = [
        "--port",
        "0",
        "--token-file",
        path.to_str().unwrap(),
        "--dashboard",
        "0.0.0.0:0",
    ];
    let here = std::env::current_dir().unwrap();
    let (_child, stdout, stderr) = spawn_scheduler(&here, &args, &[]);
    let _address = stdout.recv_timeout(TIMEOUT).expect("the address line");
    let printed = stdout.recv_timeout(TIMEOUT).expect("the dashboard's line");
    let host = printed
        .strip_prefix("dashboard: http://")
        .and_then(|rest| rest.strip_suffix("/status"))
        .unwrap_or_else(|| panic!("no dashboard link in {printed:?}"));
    assert!(!host.starts_with("0.0.0.0:"), "{printed}");
    // The link with the key, on stderr, names the same host.
    let key = Token::load(&path).unwrap().dashboard_key();
    let link = line_with(&stderr, "/status?key=");
    assert!(
        link.ends_with(&format!(" http://{host}/status?key={key} once")),
        "{link}"
    );
    // Usable: the page opens there (and sets its cookie).
    let (status, answer) = dashboard_get_at(host, &format!("/status?key={key}"), None);
    assert_eq!(status, 303, "{host}: {answer}");
}

/// Chunks of 16 MiB: 64 of them are 1 GiB.
const CHUNK: u64 = 16 << 20;

/// `bytesum` of chunk `i`, computed here: what a worker without a memory
/// limit computes (a chunk repeats one block, whose words align).
fn chunk_sum(i: u64) -> i64 {
    support::word_sum(&support::chunk(i, support::BLOCK))
        .wrapping_mul((CHUNK / support::BLOCK) as i64)
}

/// A fresh directory for the spill directories of one test's workers.
fn spill_parent(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rask-spill-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Worker processes with a 200 MiB memory limit, spilling under `parent`.
fn limited_workers(parent: std::path::PathBuf) -> impl Fn() -> Command + Send + 'static {
    move || {
        let mut c = worker_command();
        c.env(rask_distributed::MEMORY_LIMIT_ENV, "200MiB")
            .env(rask_distributed::SPILL_DIR_ENV, &parent);
        c
    }
}

/// Computes chunks `0..n` on `client`, kept on the cluster (persisted):
/// their remote handles and keys.
fn persist_chunks(client: &Client, shared: &Arc<Shared>, n: u64) -> (Vec<Value>, Vec<Key>) {
    let mut g = Graph::new(shared);
    let mut keys = Vec::new();
    for i in 0..n {
        let t = g.task("chunk", postcard::to_stdvec(&(i, CHUNK)).unwrap(), &[]);
        keys.push(g.key(t));
        g.output(t);
    }
    let kept = Keep::new(n as usize, true);
    kept.submit(client, g.build());
    let values = kept.wait().into_iter().map(|o| o.unwrap()).collect();
    (values, keys)
}

/// `bytesum` of each group of held chunks, one task per group.
fn sums(client: &Client, shared: &Arc<Shared>, groups: &[Vec<&Value>]) -> Vec<i64> {
    let mut g = Graph::salted(shared, 7);
    for group in groups {
        let inputs: Vec<u32> = group.iter().map(|v| g.held((*v).clone())).collect();
        let t = g.op("bytesum", 0, &inputs);
        g.output(t);
    }
    let got = Collect::new(groups.len());
    got.submit(client, g.build());
    got.wait().into_iter().map(|r| r.unwrap()).collect()
}

/// The spill figures of every worker, once each reported some spilled
/// bytes (they come with heartbeats); panics after `TIMEOUT`.
fn spilled(client: &Client, workers: usize) -> Vec<rask_executor::diagnostics::Spill> {
    spilled_until(client, workers, "a spill", |_| true)
}

/// The spill figures of every worker once each spilled and holds no more
/// than its spill level in memory (the spill thread is idle then); panics
/// after `TIMEOUT`.
fn settled(client: &Client, workers: usize) -> Vec<rask_executor::diagnostics::Spill> {
    spilled_until(client, workers, "the spilling to end", |spills| {
        spills
            .iter()
            .all(|s| s.memory_bytes <= s.spill_at_bytes && !s.paused)
    })
}

/// The spill figures of every worker, once each reported some spilled
/// bytes and `done` holds of them; panics after `TIMEOUT`, naming `what`
/// it waited for.
fn spilled_until(
    client: &Client,
    workers: usize,
    what: &str,
    done: impl Fn(&[rask_executor::diagnostics::Spill]) -> bool,
) -> Vec<rask_executor::diagnostics::Spill> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let info = client.info().unwrap();
        let spills: Vec<_> = info.workers.iter().filter_map(|w| w.spill).collect();
        if spills.len() == workers && spills.iter().all(|s| s.spilled_bytes > 0) && done(&spills) {
            return spills;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited {TIMEOUT:?} for {what}: {info:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn workers_over_their_memory_limit_spill_and_every_value_comes_back_right() {
    let parent = spill_parent("limit");
    let cluster = LocalCluster::start(2, limited_workers(parent.clone())).unwrap();
    let client = cluster.client().unwrap();
    let (shared, _) = Shared::new();
    // 1 GiB of persisted chunks on two workers limited to 200 MiB each.
    let n = 64;
    let (chunks, keys) = persist_chunks(&client, &shared, n);
    // Each worker spills until it holds no more than its spill level
    // (120 MiB), far below what it computed.
    let spills = settled(&client, 2);
    for s in &spills {
        assert_eq!(s.limit_bytes, 200 << 20);
        assert!(s.spills > 0 && s.spilled_keys > 0, "{s:?}");
    }
    let on_disk: u64 = spills.iter().map(|s| s.spilled_bytes).sum();
    assert!(on_disk >= 600 << 20, "{on_disk} bytes spilled");
    // The same sums as without a limit: each chunk read back by a task on
    // the worker holding it.
    let groups: Vec<Vec<&Value>> = chunks.iter().map(|c| vec![c]).collect();
    let expected: Vec<i64> = (0..n).map(chunk_sum).collect();
    assert_eq!(sums(&client, &shared, &groups), expected);
    // Dependents of chunks held by two workers: one of them is fetched
    // from the other's data port, from disk if spilled there.
    let holders = client.who_has(&keys).unwrap();
    // Chunks held by one worker only (a sum may have copied one).
    let (mut first, mut second): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (i, h) in holders.iter().enumerate() {
        match &h[..] {
            [one] if first.is_empty() || holders[first[0]][0] == *one => first.push(i),
            [_] => second.push(i),
            _ => {}
        }
    }
    assert!(!first.is_empty() && !second.is_empty(), "{holders:?}");
    let pairs: Vec<(usize, usize)> = first
        .iter()
        .copied()
        .zip(second.iter().copied())
        .take(8)
        .collect();
    let groups: Vec<Vec<&Value>> = pairs
        .iter()
        .map(|&(a, b)| vec![&chunks[a], &chunks[b]])
        .collect();
    let expected: Vec<i64> = pairs
        .iter()
        .map(|&(a, b)| chunk_sum(a as u64).wrapping_add(chunk_sum(b as u64)))
        .collect();
    assert_eq!(sums(&client, &shared, &groups), expected);
    // Every chunk gathered by this client, spilled ones from disk.
    for (i, chunk) in chunks.iter().enumerate() {
        let bytes = support::remote(chunk).fetch().unwrap();
        let got: &[u8] = postcard::from_bytes(&bytes).unwrap();
        assert!(
            got == support::chunk(i as u64, CHUNK),
            "chunk {i} came back wrong"
        );
    }
    // Read back for tasks and readers, and nothing lost.
    let spills = spilled(&client, 2);
    assert!(
        spills.iter().map(|s| s.unspills).sum::<u64>() > 0,
        "{spills:?}"
    );
    assert!(
        spills.iter().all(|s| s.lost == 0 && s.failed_spills == 0),
        "{spills:?}"
    );
    drop(chunks);
    drop(client);
    drop(cluster);
    // The killed workers' spill directories went with them.
    assert!(
        files_under(&parent).is_empty(),
        "{:?}",
        files_under(&parent)
    );
    std::fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn a_damaged_spill_file_is_never_read_as_a_value() {
    let parent = spill_parent("damaged");
    let cluster = LocalCluster::start(1, limited_workers(parent.clone())).unwrap();
    let client = cluster.client().unwrap();
    let (shared, _) = Shared::new();
    let n = 24;
    let (chunks, _) = persist_chunks(&client, &shared, n);
    let settled = settled(&client, 1)[0];
    // Flip one bit in the middle of every spilled value's file (not the
    // spill directory's lock file).
    let files: Vec<_> = files_under(&parent)
        .into_iter()
        .filter(|f| {
            let name = f.file_name().unwrap().to_string_lossy();
            !name.starts_with(".tmp") && name != "lock"
        })
        .collect();
    assert_eq!(files.len() as u64, settled.spilled_keys, "{files:?}");
    for file in &files {
        let mut raw = std::fs::read(file).unwrap();
        let middle = raw.len() / 2;
        raw[middle] ^= 0x20;
        std::fs::write(file, raw).unwrap();
    }
    // Half the chunks summed by a task on the worker (a damaged input is
    // given back and computed again), the other half gathered here (the
    // data port answers `Missing`, the scheduler computes it again): right
    // values either way.
    let half = chunks.len() / 2;
    let groups: Vec<Vec<&Value>> = chunks[..half].iter().map(|c| vec![c]).collect();
    let expected: Vec<i64> = (0..half as u64).map(chunk_sum).collect();
    assert_eq!(sums(&client, &shared, &groups), expected);
    for (i, chunk) in chunks.iter().enumerate().skip(half) {
        let bytes = support::remote(chunk).fetch().unwrap();
        let got: &[u8] = postcard::from_bytes(&bytes).unwrap();
        assert!(
            got == support::chunk(i as u64, CHUNK),
            "chunk {i} came back wrong"
        );
    }
    // Every damaged file was read once, and dropped. Spill figures come
    // with the worker's heartbeats: the last losses may not be reported yet.
    let after = spilled_until(&client, 1, "a report of every loss", |s| {
        s[0].lost >= files.len() as u64
    })[0];
    assert_eq!(after.lost, files.len() as u64, "{after:?}");
    drop(chunks);
    drop(client);
    drop(cluster);
    assert!(files_under(&parent).is_empty());
    std::fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn a_worker_whose_spill_disk_is_full_keeps_its_values_in_memory() {
    let parent = spill_parent("full");
    // 256 KiB: a directory fits, no chunk of 16 MiB does (ENOSPC).
    let Some(disk) = tmpfs::Tmpfs::mount(&parent.join("disk"), 256 << 10) else {
        return;
    };
    let log = parent.join("worker.log");
    let (spill_dir, log_file) = (disk.path().to_owned(), log.clone());
    // Limit 100 MiB: spills above 60 MiB, pauses above 95 MiB; 5 chunks
    // (80 MiB) are over the first and under the second.
    let cluster = LocalCluster::start(1, move || {
        let mut c = worker_command();
        c.env(rask_distributed::MEMORY_LIMIT_ENV, "100MiB")
            .env(rask_distributed::SPILL_DIR_ENV, &spill_dir)
            .env(WORKER_LOG_ENV, "1")
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(&log_file).unwrap());
        c
    })
    .unwrap();
    let client = cluster.client().unwrap();
    let (shared, _) = Shared::new();
    let n = 5;
    let (chunks, _) = persist_chunks(&client, &shared, n);
    // The spill thread tries, fails, and tries again a second later.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let spill = loop {
        let info = client.info().unwrap();
        if let Some(s) = info.workers.iter().find_map(|w| w.spill) {
            if s.failed_spills >= 2 {
                break s;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed spill: {info:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // Nothing went to disk; everything is held in memory, and the worker
    // is not paused.
    assert_eq!(
        (spill.spills, spill.spilled_keys, spill.spilled_bytes),
        (0, 0, 0),
        "{spill:?}"
    );
    assert!(spill.memory_bytes >= n * CHUNK, "{spill:?}");
    assert!(
        spill.memory_bytes > spill.spill_at_bytes && !spill.paused,
        "{spill:?}"
    );
    // The same sums as without a limit, and every chunk comes back whole.
    let groups: Vec<Vec<&Value>> = chunks.iter().map(|c| vec![c]).collect();
    let expected: Vec<i64> = (0..n).map(chunk_sum).collect();
    assert_eq!(sums(&client, &shared, &groups), expected);
    for (i, chunk) in chunks.iter().enumerate() {
        let bytes = support::remote(chunk).fetch().unwrap();
        let got: &[u8] = postcard::from_bytes(&bytes).unwrap();
        assert!(
            got == support::chunk(i as u64, CHUNK),
            "chunk {i} came back wrong"
        );
    }
    let after = client.info().unwrap().workers[0].spill.unwrap();
    assert_eq!((after.spills, after.lost), (0, 0), "{after:?}");
    drop(chunks);
    drop(client);
    drop(cluster);
    // The warning names the full disk (ENOSPC is os error 28), limited to
    // a few lines however often the spill was tried.
    let logged = std::fs::read_to_string(&log).unwrap();
    let warned: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("cannot spill a value to disk, it stays in memory"))
        .collect();
    assert!(!warned.is_empty(), "no warning:\n{logged}");
    assert!(warned.iter().all(|l| l.contains("os error 28")), "{logged}");
    // No temporary file was left, and the spill directory went with the
    // worker.
    assert!(
        files_under(disk.path()).is_empty(),
        "{:?}",
        files_under(disk.path())
    );
    drop(disk);
    std::fs::remove_dir_all(&parent).unwrap();
}

/// A port of this machine that is taken: by the listener returned.
fn taken_port() -> (std::net::TcpListener, std::net::SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    (listener, at)
}

#[test]
fn a_taken_dashboard_address_is_named_with_its_reason() {
    let (_taken, at) = taken_port();
    let options = scheduler::Options::default().dashboard(at);
    let err = scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Dashboard { addr, .. } if addr == at),
        "{err:?}"
    );
    assert!(
        text.starts_with(&format!("cannot serve the dashboard on {at}: ")),
        "{text}"
    );
    assert!(text.contains("in use"), "{text}");
    // The reason is in the message, not a source a chain would print twice.
    assert!(std::error::Error::source(&err).is_none());
}

#[test]
fn rask_scheduler_binary_blames_a_taken_dashboard_not_its_port() {
    let (_taken, at) = taken_port();
    let out = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
        .args(["--port", "0", "--insecure", "--dashboard", &at.to_string()])
        .env_remove(rask_distributed::TOKEN_ENV)
        .env_remove(rask_distributed::TOKEN_FILE_ENV)
        .env_remove(rask_distributed::INSECURE_ENV)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve the dashboard on {at}: ")),
        "{stderr}"
    );
    assert!(
        stderr.contains("in use") && stderr.contains("--dashboard"),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot listen on"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_worker_that_refuses_a_setting_is_not_asked_about_worker_mode() {
    let path = std::env::temp_dir().join(format!("rask-refused-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let err = LocalCluster::start(1, move || {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo 'RASK_WORKER_MEMORY_LIMIT=\"lots\" is not valid' >&2; exit 2",
        ]);
        c.stderr(file.try_clone().unwrap());
        c
    })
    .unwrap_err();
    let _ = std::fs::remove_file(&path);
    assert!(matches!(err, Error::WorkerExited { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("refused a setting"), "{text}");
    assert!(!text.contains("worker-mode setup"), "{text}");
}

#[test]
fn a_refused_connection_says_why() {
    // A port nothing listens on: taken, then given back.
    let at = taken_port().1;
    let err = Client::connect_with(&format!("tcp://{at}"), Auth::Insecure).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        text.starts_with(&format!("could not connect to {at}: ")),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");
    assert!(std::error::Error::source(&err).is_none());
}

#[test]
fn an_unreadable_token_or_tls_file_says_why() {
    let missing = std::path::Path::new("/nonexistent/rask-token");
    let err = Token::load(missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot use the token file /nonexistent/rask-token: No such file or directory (os \
         error 2)"
    );
    assert!(std::error::Error::source(&err).is_none());
    let err = Tls::new().trust(missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot read the TLS CA file /nonexistent/rask-token: No such file or directory (os \
         error 2)"
    );
    assert!(std::error::Error::source(&err).is_none());
}
