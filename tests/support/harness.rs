//! The runner of test binaries with their own `main` (`harness = false`):
//! their workers are the test binary itself, which must call `rask::init`
//! before anything else, so libtest cannot drive them.
#![allow(dead_code, unreachable_pub)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

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
