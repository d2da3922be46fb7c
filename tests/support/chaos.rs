//! A cluster under faults: a scheduler in this process and worker processes
//! of this binary (in worker mode), kept running by a *keeper* that starts
//! a worker again as soon as it dies, while the caller kills workers
//! (`kill -9`), stops and continues them, and restarts the scheduler. Shared
//! by `tests/chaos.rs` and `benches/churn.rs`.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rask_distributed::scheduler::{self, Options, SchedulerHandle};

/// A keeper looks for dead workers this often.
const KEEPER_TICK: Duration = Duration::from_millis(20);

/// Set in worker processes to the path of the file `count_run` appends to.
pub const RUNS_ENV: &str = "RASK_CHURN_RUNS";

/// Notes one run of a task in the file [`RUNS_ENV`] names, if set: one
/// byte, appended, so the file's size counts runs across processes.
pub fn count_run() {
    if let Some(path) = std::env::var_os(RUNS_ENV) {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(b".");
        }
    }
}

/// A scheduler, `n` worker processes and their keeper.
pub struct Churn {
    pub address: SocketAddr,
    scheduler: Option<SchedulerHandle>,
    options: Options,
    workers: Arc<Mutex<Vec<Option<Child>>>>,
    stop: Arc<AtomicBool>,
    keeper: Option<JoinHandle<()>>,
    /// Worker processes started, the first `n` included.
    pub started: Arc<AtomicUsize>,
    runs: Option<std::path::PathBuf>,
}

fn spawn_worker(address: &SocketAddr, runs: &Option<std::path::PathBuf>) -> Option<Child> {
    let mut command = Command::new(std::env::current_exe().ok()?);
    command
        .env(rask_distributed::WORKER_ENV, format!("tcp://{address}"))
        .env("RASK_WORKER_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(runs) = runs {
        command.env(RUNS_ENV, runs);
    }
    command.spawn().ok()
}

impl Churn {
    /// Starts the scheduler with `options`, `n` workers and the keeper;
    /// returns once every worker registered. With `count_runs`, tasks that
    /// call [`count_run`] are counted ([`Churn::runs`]).
    /// The scheduler requires the token in this process's environment
    /// unless `options` say otherwise (see `harness::token_for_this_run`):
    /// the workers inherit it, and so does `rask::Client::connect`.
    pub fn start(n: usize, mut options: Options, count_runs: bool) -> Churn {
        if options.auth.is_none() {
            let auth = rask_distributed::Auth::from_env()
                .expect("valid token settings")
                .expect("a token in RASK_TOKEN: call `harness::token_for_this_run` in main");
            options = options.auth(auth);
        }
        let scheduler = scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options.clone())
            .expect("the scheduler starts");
        let address = scheduler.address();
        let runs = count_runs.then(|| {
            let path = std::env::temp_dir().join(format!(
                "rask-churn-{}-{}",
                std::process::id(),
                Instant::now().elapsed().as_nanos()
            ));
            let _ = std::fs::remove_file(&path);
            path
        });
        let started = Arc::new(AtomicUsize::new(0));
        let workers: Vec<Option<Child>> = (0..n)
            .map(|_| {
                started.fetch_add(1, Ordering::SeqCst);
                spawn_worker(&address, &runs)
            })
            .collect();
        let workers = Arc::new(Mutex::new(workers));
        let stop = Arc::new(AtomicBool::new(false));
        let keeper = {
            let (workers, stop, started, runs) =
                (workers.clone(), stop.clone(), started.clone(), runs.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    {
                        let mut workers = workers.lock().unwrap();
                        for slot in workers.iter_mut() {
                            let dead = match slot.as_mut() {
                                None => true,
                                Some(child) => !matches!(child.try_wait(), Ok(None)),
                            };
                            if dead {
                                started.fetch_add(1, Ordering::SeqCst);
                                *slot = spawn_worker(&address, &runs);
                            }
                        }
                    }
                    std::thread::sleep(KEEPER_TICK);
                }
            })
        };
        let churn = Churn {
            address,
            scheduler: Some(scheduler),
            options,
            workers,
            stop,
            keeper: Some(keeper),
            started,
            runs,
        };
        churn.wait_for_workers(n);
        churn
    }

    /// A client of the scheduler, over TCP.
    pub fn client(&self) -> rask::Client {
        rask::Client::connect(&format!("tcp://{}", self.address)).expect("the client connects")
    }

    /// Waits (at most a minute) until `n` workers are registered.
    pub fn wait_for_workers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.scheduler.as_ref().map_or(0, |s| s.workers()) < n {
            assert!(Instant::now() < deadline, "{n} workers never registered");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id of worker `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.workers.lock().unwrap()[i].as_ref().map(Child::id)
    }

    /// Kills worker `i` with SIGKILL (the keeper starts it again).
    pub fn kill(&self, i: usize) {
        if let Some(child) = self.workers.lock().unwrap()[i].as_mut() {
            let _ = child.kill();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process `pid`.
    pub fn signal(pid: u32, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }

    /// Stops the scheduler, then starts a new one on the same address
    /// (the workers and clients connect again).
    pub fn restart_scheduler(&mut self) {
        if let Some(mut s) = self.scheduler.take() {
            s.shutdown();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match scheduler::serve_with(self.address, self.options.clone()) {
                Ok(s) => {
                    self.scheduler = Some(s);
                    return;
                }
                // The port is briefly held while the old sockets close.
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot listen again: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Task runs counted so far (with `count_runs`).
    pub fn runs(&self) -> usize {
        self.runs
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len() as usize)
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        for child in self.workers.lock().unwrap().iter_mut().flatten() {
            // A stopped process dies of SIGKILL too.
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut s) = self.scheduler.take() {
            s.shutdown();
        }
        if let Some(p) = &self.runs {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A small deterministic random number generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Kills a random worker of `churn` every `every` until `done` is set,
/// on a thread of its own; returns how many it killed.
pub fn kill_every(
    churn: Arc<Churn>,
    every: Duration,
    workers: usize,
    done: Arc<AtomicBool>,
) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut kills = 0;
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(every);
            if done.load(Ordering::SeqCst) {
                break;
            }
            churn.kill(rng.below(workers));
            kills += 1;
        }
        kills
    })
}
