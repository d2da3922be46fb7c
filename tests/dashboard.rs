//! The live dashboard and the cluster's introspection, with real worker
//! processes: its JSON API and its event stream read over HTTP, and its
//! page rendered by headless Chromium while a Rosenbrock search runs.
//! Runs with its own `main` (`harness = false`): workers are this binary.
//!
//! The browser test needs `chromium` on the PATH. Without it the test says
//! so and passes, unless `RASK_BROWSER_TEST=required` (as `.ci/run` sets,
//! after installing it): then it fails.

#[path = "support/harness.rs"]
mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rask::diagnostics::{Snapshot, TaskRecord};
use rask::{as_completed, delayed, Client};

/// The Rosenbrock function of the tutorial, 3 ms of work each.
fn rosenbrock(point: (f64, f64)) -> ((f64, f64), f64) {
    std::thread::sleep(Duration::from_millis(3));
    let (x, y) = point;
    ((x, y), (1.0 - x).powi(2) + 2.0 * (y - x * x).powi(2))
}

/// A second function: rounds a score for a report.
fn summarise(result: ((f64, f64), f64)) -> i64 {
    std::thread::sleep(Duration::from_millis(1));
    (result.1 * 1000.0).round() as i64
}

fn inc(x: i64) -> i64 {
    x + 1
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        low + (high - low) * (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The tutorial's search: `evaluations` points, each submitted as one
/// finishes, around the best so far; then every result summarised.
fn search(client: &Client, evaluations: usize) -> Vec<i64> {
    let mut rng = Rng(7);
    let mut scale = 5.0;
    let mut best = ((0.0, 0.0), f64::INFINITY);
    let starts: Vec<(f64, f64)> = (0..8)
        .map(|_| (rng.uniform(-scale, scale), rng.uniform(-scale, scale)))
        .collect();
    let mut pending = as_completed(client.map(rosenbrock, starts).unwrap());
    let mut done = Vec::new();
    while let Some(f) = pending.next() {
        let (point, score) = f.result().unwrap();
        if score < best.1 {
            best = (point, score);
        }
        done.push(f);
        if done.len() + pending.len() < evaluations {
            let (x, y) = best.0;
            let next = (
                x + rng.uniform(-scale, scale),
                y + rng.uniform(-scale, scale),
            );
            pending.add(client.submit(delayed!(rosenbrock(next))).unwrap());
            scale *= 0.99;
        }
    }
    let summaries: Vec<_> = done
        .iter()
        .map(|f| client.submit(delayed!(summarise(f))).unwrap())
        .collect();
    client.gather(&summaries).unwrap()
}

/// A GET over plain HTTP: the status code and the body.
fn get(base: &str, path: &str) -> (u16, String) {
    get_as(base, path, base.trim_start_matches("http://"))
}

/// A GET naming `host` in its `Host` header, as a browser does for the
/// site whose page sends it.
fn get_as(base: &str, path: &str, host: &str) -> (u16, String) {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The dashboard's address, from the client's link.
fn base(client: &Client) -> String {
    let link = client
        .dashboard_link()
        .expect("RASK_DASHBOARD is set in main");
    link.trim_end_matches("/status").to_owned()
}

/// `/api/status` and `/api/tasks` tell what ran: per function, on which
/// workers and threads; the event stream sends updates; the rest is 404.
fn json_api_tells_what_ran() {
    let client = Client::local(2).unwrap();
    let base = base(&client);
    let xs = client.map(inc, 0..300).unwrap();
    assert_eq!(client.gather(&xs).unwrap().len(), 300);
    // The board's snapshot is refreshed four times a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let snapshot = loop {
        let (status, body) = get(&base, "/api/status");
        assert_eq!(status, 200);
        let snapshot: Snapshot = serde_json::from_str(&body).unwrap();
        let inc = snapshot.functions.iter().find(|f| f.name == "inc");
        if inc.is_some_and(|f| f.counts.done == 300) || Instant::now() > deadline {
            break snapshot;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let incs = snapshot.functions.iter().find(|f| f.name == "inc").unwrap();
    assert_eq!(incs.counts.done, 300, "{snapshot:?}");
    assert_eq!(snapshot.workers.len(), 2, "{snapshot:?}");
    assert!(snapshot.workers.iter().all(|w| w.threads >= 1));
    assert!(snapshot.clients >= 1);
    let worker_ids: Vec<u32> = snapshot.workers.iter().map(|w| w.id).collect();
    let (status, body) = get(&base, "/api/tasks?since=0");
    assert_eq!(status, 200);
    let tasks: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tasks: Vec<TaskRecord> = serde_json::from_value(tasks["tasks"].clone()).unwrap();
    let incs: Vec<&TaskRecord> = tasks.iter().filter(|t| t.function == "inc").collect();
    assert_eq!(incs.len(), 300);
    assert!(incs
        .iter()
        .all(|t| worker_ids.contains(&t.worker) && t.end_ms >= t.start_ms));
    // Values a client sent in place of finished work are not tasks.
    let again: Vec<_> = xs
        .iter()
        .map(|x| client.submit(delayed!(inc(x))).unwrap())
        .collect();
    assert_eq!(client.gather(&again).unwrap().len(), 300);
    std::thread::sleep(Duration::from_millis(600));
    let (_, body) = get(&base, "/api/status");
    let later: Snapshot = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = later.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["inc"], "{later:?}");
    // A page of another site whose name was pointed at 127.0.0.1 (DNS
    // rebinding) sends its own host: it reads nothing. `localhost` does.
    let port = base.rsplit(':').next().unwrap();
    let (status, body) = get_as(&base, "/api/status", &format!("evil.example:{port}"));
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("inc"), "{body}");
    let (status, _) = get_as(&base, "/api/status", &format!("localhost:{port}"));
    assert_eq!(status, 200);
    // Introspection answers the same.
    let info = client.scheduler_info().unwrap();
    assert_eq!(info.workers.len(), 2);
    client.wait_for_workers(2, Duration::from_secs(5)).unwrap();
    let held = client.who_has(&xs[..3]).unwrap();
    assert_eq!(held.len(), 3);
    // The live stream: a first update within a second.
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /api/events HTTP/1.1\r\nHost: {address}\r\n\r\n"
    )
    .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let data = lines
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .expect("an update");
    let update: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        update["status"]["workers"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(get(&base, "/nowhere").0, 404);
    assert_eq!(get(&base, "/status").0, 200);
}

/// Headless Chromium renders `/status` while a Rosenbrock search and its
/// summaries run: both functions show in the task stream, and their
/// progress rows read done. The screenshot is kept in `target/`.
fn the_page_shows_the_search_in_a_browser() {
    let Some(chromium) = browser() else {
        return;
    };
    let client = Client::local(2).unwrap();
    let base = base(&client);
    let summaries = search(&client, 800);
    assert_eq!(summaries.len(), 800);
    // Tasks named one by one: one legend entry and colour, their group's.
    let steps: Vec<_> = (0..40)
        .map(|i| client.submit(delayed!(inc(i)).named(format!("step-{i}"))))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(client.gather(&steps).unwrap()[39], 40);
    let page = format!("{base}/status?poll");
    let dom = run_browser(
        &chromium,
        &["--virtual-time-budget=4000", "--dump-dom", &page],
    );
    for function in ["rosenbrock", "summarise"] {
        assert!(
            dom.contains(&format!(r#"class="task" data-function="{function}""#))
                || dom.contains(&format!(r#"data-function="{function}" class="task""#)),
            "no {function} bar in the task stream"
        );
        let row = dom
            .split(r#"class="fn""#)
            .find(|r| r.contains(&format!(r#"data-function="{function}""#)))
            .unwrap_or_else(|| panic!("no progress row for {function}"));
        assert!(
            row.contains(r#"data-state="done""#),
            "{function} is not done: {row}"
        );
    }
    let legend = dom
        .split(r#"id="legend">"#)
        .nth(1)
        .and_then(|rest| rest.split("</h2>").next())
        .unwrap_or_else(|| panic!("no legend in the page"));
    assert!(legend.contains("</i>step</span>"), "no step in {legend}");
    assert!(!legend.contains("step-"), "a task's own name in {legend}");
    let shot = screenshot_path();
    let arg = format!("--screenshot={}", shot.display());
    run_browser(
        &chromium,
        &[
            "--hide-scrollbars",
            "--window-size=1280,800",
            "--virtual-time-budget=4000",
            &arg,
            &page,
        ],
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot"
    );
    println!("screenshot: {}", shot.display());
}

/// `chromium` if it is installed; `None` (the test passes, saying why)
/// when it is not and not required.
fn browser() -> Option<String> {
    let found = Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("chromium".into());
    }
    let required = std::env::var("RASK_BROWSER_TEST").is_ok_and(|v| v == "required");
    assert!(
        !required,
        "RASK_BROWSER_TEST=required, and chromium is not installed"
    );
    println!("chromium is not installed: the browser test is skipped");
    None
}

/// Runs headless Chromium with `args`, bounded; its stdout.
fn run_browser(chromium: &str, args: &[&str]) -> String {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium ran over a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// `RASK_DASHBOARD` at a taken port: the error names the address, the
/// setting and the OS's reason, and no worker starts.
fn a_taken_dashboard_port_names_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap();
    std::env::set_var("RASK_DASHBOARD", at.to_string());
    let started = Client::local(2);
    std::env::set_var("RASK_DASHBOARD", "127.0.0.1:0");
    let Err(err) = started else {
        panic!("the dashboard's port is taken");
    };
    let text = err.to_string();
    assert!(matches!(err, rask::Error::Dashboard { .. }), "{err:?}");
    assert!(
        text.starts_with(&format!(
            "cannot serve the dashboard on {at} (set by RASK_DASHBOARD): "
        )),
        "{text}"
    );
    assert!(text.contains("in use"), "{text}");
    assert!(text.ends_with("set RASK_DASHBOARD to a free port (`:0` picks one), or unset it"));
    // The reason is in the message once, also printed as a chain.
    assert_eq!(format!("{err:#}"), text);
}

/// `target/dashboard.png`, beside the build's output.
fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("dashboard.png")
}

fn main() {
    rask::init_with(rask::tasks![rosenbrock, summarise, inc]);
    harness::token_for_this_run();
    // Every local cluster of this run serves a dashboard on a free port.
    std::env::set_var("RASK_DASHBOARD", "127.0.0.1:0");
    harness::run(&[
        (
            "a_taken_dashboard_port_names_the_setting",
            a_taken_dashboard_port_names_the_setting,
        ),
        ("json_api_tells_what_ran", json_api_tells_what_ran),
        (
            "the_page_shows_the_search_in_a_browser",
            the_page_shows_the_search_in_a_browser,
        ),
    ]);
}
