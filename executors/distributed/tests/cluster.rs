//! `LocalCluster` with real worker processes: this test binary is its own
//! worker, started in worker mode through `RASK_WORKER` (the same-binary
//! model the root crate uses).

mod support;

use std::process::Command;
use std::sync::Arc;

use rask_distributed::{worker, Error, LocalCluster, WORKER_ENV};
use support::{Collect, Graph, Shared, TestRegistry, TIMEOUT};

/// Worker mode: when started by a `LocalCluster`, this "test" is the worker
/// process's whole life. Run normally, it does nothing.
#[test]
fn worker_entry() {
    if let Ok(scheduler) = std::env::var(WORKER_ENV) {
        let (shared, _) = Shared::new();
        worker::run(&scheduler, Arc::new(TestRegistry { shared }), 1).unwrap();
    }
}

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

#[test]
fn rask_scheduler_binary_prints_its_address_and_serves() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
        .args(["--port", "0", "--worker-timeout", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Reaped however the test ends.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Reap(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(TIMEOUT).expect("the address line");
    let address = line.trim();
    assert!(address.starts_with("tcp://127.0.0.1:"), "{address}");

    let (shared, _) = Shared::new();
    // No death timeout: it ends with the scheduler, as it did before it
    // could wait for another.
    let w = worker::spawn_with(
        address,
        Arc::new(TestRegistry {
            shared: shared.clone(),
        }),
        worker::Options::default().death_timeout(std::time::Duration::ZERO),
    )
    .unwrap();
    let client = rask_distributed::Client::connect(address).unwrap();
    let mut g = Graph::new(&shared);
    let a = g.value(1);
    let b = g.op("inc", 0, &[a]);
    g.output(b);
    let got = Collect::new(1);
    got.submit(&client, g.build());
    assert_eq!(got.wait(), vec![Ok(2)]);
    drop(client);
    let _ = child.0.kill();
    let _ = child.0.wait();
    // The worker exits by itself once its scheduler is gone.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(w.join());
    });
    assert!(rx.recv_timeout(TIMEOUT).expect("worker exit").is_ok());
}

#[test]
fn rask_scheduler_binary_rejects_bad_arguments() {
    for args in [
        &["--port", "nope"][..],
        &["--worker-timeout", "0"],
        &["--worker-timeout", "soon"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rask-scheduler"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
    }
}
