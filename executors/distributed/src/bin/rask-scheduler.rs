//! `rask-scheduler [--host 127.0.0.1] [--port 8786] [--worker-timeout 5]
//! [--client-timeout 60] [--task-timeout SECONDS]`: runs a rask scheduler
//! until killed. With `--port 0` the OS picks the port; the first line on
//! stdout is always the bound address, `tcp://HOST:PORT`. A worker not heard from for
//! `--worker-timeout` seconds is taken for dead and its work goes
//! elsewhere; a client not heard from for `--client-timeout` seconds
//! (clients send a heartbeat every second) is taken as disconnected. A
//! task without a timeout of its own fails as timed out after
//! `--task-timeout` seconds (default: no limit). A task running on
//! `--allowed-failures` workers when they died (default 3) fails instead of
//! being run again.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

const USAGE: &str =
    "usage: rask-scheduler [--host 127.0.0.1] [--port 8786] [--worker-timeout SECONDS (5)] \
     [--client-timeout SECONDS (60)] [--task-timeout SECONDS (none)] [--allowed-failures N (3)]";

fn main() -> ExitCode {
    let mut host: IpAddr = [127, 0, 0, 1].into();
    let mut port: u16 = 8786;
    let mut options = rask_distributed::scheduler::Options::default();
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
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument `{other}`")),
        }
    }
    let scheduler =
        match rask_distributed::scheduler::serve_with(SocketAddr::new(host, port), options) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "rask-scheduler: cannot listen on {host}:{port}: {e}: {}",
                    source(&e)
                );
                return ExitCode::FAILURE;
            }
        };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "tcp://{}", scheduler.address());
    let _ = stdout.flush();
    // Runs until killed: the scheduler lives on its own thread.
    loop {
        std::thread::park();
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("rask-scheduler: {problem}\n{USAGE}");
    ExitCode::from(2)
}

fn source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}
