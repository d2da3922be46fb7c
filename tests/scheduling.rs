//! Priorities, resources and worker restrictions with real worker
//! processes: a scheduler in this process and workers of this test binary
//! started by hand (`RASK_WORKER=tcp://…`), some declaring resources with
//! `RASK_WORKER_RESOURCES`. Runs with its own `main` (`harness = false`)
//! because a worker process must call `rask::init` first.

#[path = "support/harness.rs"]
mod harness;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rask::{delayed, Annotations, Client};
use rask_distributed::scheduler::SchedulerHandle;

/// Tasks holding the GPU in this worker process right now.
static HOLDING: AtomicUsize = AtomicUsize::new(0);

/// Holds "the GPU" for 20 ms; fails if another task of this process holds
/// it too. Returns the worker's process id.
fn on_gpu(_i: i64) -> Result<u32, String> {
    if HOLDING.fetch_add(1, Ordering::SeqCst) > 0 {
        HOLDING.fetch_sub(1, Ordering::SeqCst);
        return Err("two GPU tasks at once".into());
    }
    std::thread::sleep(Duration::from_millis(20));
    HOLDING.fetch_sub(1, Ordering::SeqCst);
    Ok(std::process::id())
}

/// The worker's process id.
fn pid(_i: i64) -> u32 {
    std::process::id()
}

/// Waits (at most 30 s) until the file `path` exists.
fn blocker(path: String) -> i64 {
    // Says it started, for tests that must not act before it runs.
    let _ = std::fs::write(format!("{path}.started"), b"");
    wait_for_file(&path);
    0
}

/// Waits until the file `path` exists, at most 30 s.
fn wait_for_file(path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::path::Path::new(path).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Appends `i` to the file `path`, one line per task, in the order tasks run.
fn record(path: String, i: i64) -> i64 {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .expect("the order file opens");
    writeln!(f, "{i}").expect("the order file is written");
    i
}

/// On the worker named `slow`, waits (at most 30 s) for the file
/// `{path}.gate`; on any other, sleeps 2 ms. Then appends `i name` to the
/// file `path` (one line per run) and returns the worker's name.
fn uneven(path: String, i: i64) -> String {
    use std::io::Write as _;
    let name = std::env::var(rask_distributed::WORKER_NAME_ENV).unwrap_or_default();
    if name == "slow" {
        wait_for_file(&format!("{path}.gate"));
    } else {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .expect("the runs file opens");
    // One write per line: appends of a few bytes do not interleave.
    f.write_all(format!("{i} {name}\n").as_bytes())
        .expect("the runs file is written");
    name
}

/// `n` bytes, to fill a worker's memory.
fn blob(n: i64) -> Vec<u8> {
    vec![7; n as usize]
}

/// The name of the worker it runs on.
fn name_of(_i: i64) -> String {
    std::env::var(rask_distributed::WORKER_NAME_ENV).unwrap_or_default()
}

/// A worker to start: threads, resources, name (`""`: the default).
type WorkerSpec<'a> = (u32, &'a str, &'a str);

/// A cluster: a scheduler here and one worker process per entry of
/// `workers` (threads, resources), all registered; workers exit with the
/// scheduler (no death timeout) and are killed when the cluster is dropped.
struct Cluster {
    scheduler: SchedulerHandle,
    workers: Vec<Child>,
}

impl Cluster {
    fn start(workers: &[(u32, &str)]) -> Cluster {
        let named: Vec<(u32, &str, &str)> = workers.iter().map(|&(t, r)| (t, r, "")).collect();
        Cluster::start_named(&named)
    }

    /// As `start`, each worker named as given (`""`: the default name).
    fn start_named(workers: &[(u32, &str, &str)]) -> Cluster {
        let plain: Vec<_> = workers.iter().map(|&w| (w, Vec::new())).collect();
        Cluster::start_with(&plain)
    }

    /// As `start_named`, each worker with environment variables of its own.
    fn start_with(workers: &[(WorkerSpec<'_>, Vec<(&str, String)>)]) -> Cluster {
        let options = rask_distributed::scheduler::Options::default().auth(harness::auth());
        let scheduler =
            rask_distributed::scheduler::serve_with("127.0.0.1:0".parse().unwrap(), options)
                .expect("the scheduler starts");
        let workers: Vec<Child> = workers
            .iter()
            .map(|((threads, resources, name), env)| {
                let (threads, resources, name) = (*threads, *resources, *name);
                let mut command = Command::new(std::env::current_exe().expect("this test's path"));
                if !name.is_empty() {
                    command.env(rask_distributed::WORKER_NAME_ENV, name);
                }
                command.envs(env.iter().map(|(k, v)| (k, v)));
                command
                    .env(
                        rask_distributed::WORKER_ENV,
                        format!("tcp://{}", scheduler.address()),
                    )
                    .env(rask_distributed::DEATH_TIMEOUT_ENV, "0")
                    .env("RASK_WORKER_THREADS", threads.to_string())
                    .env(rask_distributed::RESOURCES_ENV, resources)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("the worker starts")
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while scheduler.workers() < workers.len() {
            assert!(Instant::now() < deadline, "the workers never registered");
            std::thread::sleep(Duration::from_millis(5));
        }
        Cluster { scheduler, workers }
    }

    fn client(&self) -> Client {
        Client::connect(&format!("tcp://{}", self.scheduler.address()))
            .expect("the client connects")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

fn resources_are_never_exceeded_and_restrictions_hold() {
    // Worker 0: GPU=1 and 2 threads; worker 1: 2 threads, no GPU.
    let cluster = Cluster::start(&[(2, "GPU=1"), (2, "")]);
    let gpu_pid = cluster.workers[0].id();
    let client = cluster.client();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let task = delayed!(on_gpu(i)?).resources([("GPU", 1.0)]).unwrap();
            client.submit(task).unwrap()
        })
        .collect();
    // Every GPU task ran on the GPU worker, one at a time (`on_gpu` fails
    // when two overlap in its process).
    for t in &tasks {
        assert_eq!(t.result().unwrap(), gpu_pid);
    }
    // `.workers([…])` by address: the data addresses the cluster lists.
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.workers.len(), 2);
    let gpu_row = info
        .workers
        .iter()
        .find(|w| w.resources == "GPU=1")
        .expect("listed with GPU=1");
    let plain = info
        .workers
        .iter()
        .find(|w| w.resources.is_empty())
        .expect("listed");
    for i in 0..6 {
        let f = client
            .submit(delayed!(pid(100 + i)).workers([plain.address.clone()]))
            .unwrap();
        assert_ne!(f.result().unwrap(), gpu_pid);
        let f = client
            .submit(delayed!(pid(200 + i)).workers([gpu_row.address.clone()]))
            .unwrap();
        assert_eq!(f.result().unwrap(), gpu_pid);
    }
    // Through the client: every task of `map` gets the annotations.
    let on_gpu_worker = client.annotate(Annotations {
        workers: vec![gpu_row.address.clone()],
        ..Annotations::default()
    });
    let fs = on_gpu_worker.map(pid, 300..306).unwrap();
    assert!(client.gather(&fs).unwrap().iter().all(|&p| p == gpu_pid));
}

fn an_impossible_request_fails_at_once_naming_it() {
    let cluster = Cluster::start(&[(1, "GPU=1")]);
    let client = cluster.client();
    let tpu = client
        .submit(delayed!(pid(1)).resources([("TPU", 1.0)]).unwrap())
        .unwrap();
    let err = tpu.result().unwrap_err().to_string();
    assert!(err.contains("asks for resources TPU=1"), "{err}");
    assert!(err.contains("GPU=1"), "{err}: lists what the workers have");
    let two = client
        .submit(delayed!(pid(2)).resources([("GPU", 2.0)]).unwrap())
        .unwrap();
    assert!(two.result().unwrap_err().to_string().contains("GPU=2"));
    let nowhere = client
        .submit(delayed!(pid(3)).workers(["nowhere:1"]))
        .unwrap();
    let err = nowhere.result().unwrap_err().to_string();
    assert!(err.contains("workers [nowhere:1]"), "{err}");
    // The cluster goes on.
    assert_eq!(
        client.submit(delayed!(pid(4))).unwrap().result().unwrap(),
        cluster.workers[0].id()
    );
}

fn a_task_whose_worker_left_waits_with_a_reason() {
    let mut cluster = Cluster::start(&[(1, ""), (1, "GPU=1")]);
    let client = cluster.client();
    // GPU tasks submitted while the GPU worker is there, which then goes
    // away (kill -9): they wait, and `scheduler_info` says why.
    let dir = std::env::temp_dir().join(format!("rask-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gate = dir.join("gate");
    let _ = std::fs::remove_file(&gate);
    let held = client
        .submit(
            delayed!(blocker(gate.display().to_string()))
                .resources([("GPU", 1.0)])
                .unwrap(),
        )
        .unwrap();
    let waiting = client
        .submit(delayed!(pid(7)).resources([("GPU", 1.0)]).unwrap())
        .unwrap();
    // Only once the GPU worker runs the blocker: a graph that reached the
    // scheduler after the worker was gone would fail at once instead
    // (an impossible request), which is another test's case.
    let started = dir.join("gate.started");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the blocker never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let gpu = &mut cluster.workers[1];
    gpu.kill().unwrap();
    gpu.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = client.scheduler_info().unwrap();
        if info
            .unrunnable
            .iter()
            .any(|l| l.contains("task(s) wait for a worker with resources GPU=1"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reason shown: {:?}",
            info.unrunnable
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!waiting.done() && !held.done());
    std::fs::write(&gate, b"").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn higher_priority_runs_first_on_a_busy_worker() {
    let cluster = Cluster::start(&[(1, "")]);
    let client = cluster.client();
    let dir = std::env::temp_dir().join(format!("rask-prio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (gate, order) = (dir.join("gate"), dir.join("order"));
    let _ = std::fs::remove_file(&gate);
    let _ = std::fs::remove_file(&order);
    let path = order.display().to_string();
    // The worker's one thread is held by the blocker while 10 tasks of
    // priority 0, then 10 of priority 5, are submitted.
    let block = client
        .submit(delayed!(blocker(gate.display().to_string())))
        .unwrap();
    let low = client
        .map_zip(record, (std::iter::repeat(path.clone()), 0..10))
        .unwrap();
    let urgent = client.annotate(Annotations {
        priority: 5,
        ..Annotations::default()
    });
    let high = urgent
        .map_zip(record, (std::iter::repeat(path.clone()), 100..110))
        .unwrap();
    // A question asked on the same connection is answered after the
    // scheduler took both maps (one connection's frames are handled in
    // order): only then does the blocker end.
    client.scheduler_info().unwrap();
    std::fs::write(&gate, b"").unwrap();
    block.result().unwrap();
    client.gather(&low).unwrap();
    client.gather(&high).unwrap();
    let ran: Vec<i64> = std::fs::read_to_string(&order)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let last_high = ran.iter().rposition(|&i| i >= 100).unwrap();
    // Lows already in the worker's window when the highs came (at most 2)
    // may run first; every other low runs after every high.
    let lows_before = ran[..last_high].iter().filter(|&&i| i < 100).count();
    assert!(lows_before <= 2, "{ran:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn an_idle_worker_takes_queued_work_and_each_task_runs_once() {
    let cluster = Cluster::start_named(&[(1, "", "slow"), (1, "", "fast")]);
    let client = cluster.client();
    // Short tasks first make the windows large (64 tasks per thread), so
    // the next map goes out at once, half to each worker: a task on `fast`
    // takes 2 ms, one on `slow` waits for a gate. Once `fast` ran its
    // half, it takes `slow`'s queued tasks, each once `slow` gave it up
    // (whatever the windows: `slow`'s one thread is held by a task for
    // longer than `STUCK_MS`, and what waits behind it moves).
    let warm = client.map(pid, 0..300).unwrap();
    client.gather(&warm).unwrap();
    let dir = std::env::temp_dir().join(format!("rask-move-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let runs = dir.join("runs");
    let _ = std::fs::remove_file(&runs);
    let path = runs.display().to_string();
    let n = 40;
    let fs = client
        .map_zip(uneven, (std::iter::repeat(path.clone()), 0..n))
        .unwrap();
    // Every task but the one `slow` is stuck in runs elsewhere; then the
    // gate opens.
    let lines = || std::fs::read_to_string(&runs).map_or(0, |t| t.lines().count());
    let deadline = Instant::now() + Duration::from_secs(30);
    while lines() < n as usize - 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(format!("{path}.gate"), b"").unwrap();
    let names: Vec<String> = client.gather(&fs).unwrap();
    let ran: Vec<(i64, String)> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|l| {
            let (i, name) = l.split_once(' ').expect("`i name`");
            (i.parse().unwrap(), name.to_owned())
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    // Every task ran exactly once, and its result is that run's.
    let mut once: Vec<i64> = ran.iter().map(|(i, _)| *i).collect();
    once.sort_unstable();
    assert_eq!(once, (0..n).collect::<Vec<_>>(), "runs: {ran:?}");
    for (i, name) in &ran {
        assert_eq!(&names[*i as usize], name);
    }
    // Work moved: `fast` ran more than its half.
    let fast = names.iter().filter(|n| *n == "fast").count();
    assert!(cluster.scheduler.moved() > 0, "nothing moved: {ran:?}");
    assert!(fast > n as usize / 2, "fast ran {fast} of {n}: {ran:?}");
}

fn a_paused_worker_is_sent_no_task() {
    // `full` has a memory limit of 1 MiB and a spill directory it cannot
    // make (under a regular file): once it holds a 1 MiB value it pauses
    // for good, and says so at once.
    let dir = std::env::temp_dir().join(format!("rask-paused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let limited = vec![
        (rask_distributed::MEMORY_LIMIT_ENV, "1MiB".to_owned()),
        (
            rask_distributed::SPILL_DIR_ENV,
            not_a_dir.join("spill").display().to_string(),
        ),
    ];
    let cluster = Cluster::start_with(&[((1, "", "full"), limited), ((1, "", "free"), vec![])]);
    let client = cluster.client();
    let held = client
        .submit(delayed!(blob(1 << 20)).workers(["full"]))
        .unwrap();
    rask::wait_timeout(std::slice::from_ref(&held), Duration::from_secs(30)).unwrap();
    // Every task goes to `free`: one sent to `full` would wait there for
    // good (the wait below would time out).
    let fs = client.map(name_of, 0..20).unwrap();
    rask::wait_timeout(&fs, Duration::from_secs(30)).expect("no task waits on the paused worker");
    let names = client.gather(&fs).unwrap();
    assert!(names.iter().all(|n| n == "free"), "{names:?}");
    let info = client.scheduler_info().unwrap();
    let full = info.workers.iter().find(|w| w.name == "full").unwrap();
    assert!(full.spill.is_some_and(|s| s.paused), "{full:?}");
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    rask::init_with(rask::tasks![
        on_gpu?, pid, blocker, record, uneven, blob, name_of
    ]);
    harness::token_for_this_run();
    let tests: &[(&str, fn())] = &[
        (
            "resources_are_never_exceeded_and_restrictions_hold",
            resources_are_never_exceeded_and_restrictions_hold,
        ),
        (
            "an_impossible_request_fails_at_once_naming_it",
            an_impossible_request_fails_at_once_naming_it,
        ),
        (
            "a_task_whose_worker_left_waits_with_a_reason",
            a_task_whose_worker_left_waits_with_a_reason,
        ),
        (
            "higher_priority_runs_first_on_a_busy_worker",
            higher_priority_runs_first_on_a_busy_worker,
        ),
        (
            "an_idle_worker_takes_queued_work_and_each_task_runs_once",
            an_idle_worker_takes_queued_work_and_each_task_runs_once,
        ),
        (
            "a_paused_worker_is_sent_no_task",
            a_paused_worker_is_sent_no_task,
        ),
    ];
    harness::run(tests);
}
