//! The runner of test binaries with their own `main` (`harness = false`):
//! their workers are the test binary itself, which must call `rask::init`
//! before anything else, so libtest cannot drive them.
#![allow(dead_code, unreachable_pub)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// Gives this run a fresh token in `RASK_TOKEN`, as a user gives one to
/// every process of a cluster: the schedulers these tests start require
/// it (`Auth::from_env`), and the clients (`rask::Client::connect`) and the
/// worker processes (which inherit the environment) find it there. Call it
/// first thing in `main`, after `rask::init`, while this process has one
/// thread: the environment is not to be changed once others run.
pub fn token_for_this_run() {
    let token = rask_distributed::Token::generate().expect("a fresh token");
    std::env::set_var(rask_distributed::TOKEN_ENV, token.expose_secret());
    std::env::remove_var(rask_distributed::TOKEN_FILE_ENV);
    std::env::remove_var(rask_distributed::INSECURE_ENV);
}

/// The credentials of this run (see [`token_for_this_run`]).
pub fn auth() -> rask_distributed::Auth {
    rask_distributed::Auth::from_env()
        .expect("valid token settings")
        .expect("a token: call `token_for_this_run` first in main")
}

/// Runs the tests whose names contain one of the arguments (all without
/// any), printing a libtest-like line for each; exits with status 1 if one
/// failed.
pub fn run(tests: &[(&str, fn())]) {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        match catch_unwind(AssertUnwindSafe(test)) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1?})", started.elapsed());
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
