//! The 30-second tour of README.md: build a small graph, compute it, look
//! at its keys; operators, lazy comparisons, tuples split and lists
//! indexed as tasks; persist.
//!
//! ```text
//! cargo run --example quickstart
//! RASK_SCHEDULER=sync cargo run --example quickstart
//! RASK_SCHEDULER=threads:2 cargo run --example quickstart
//! ```

use std::process::ExitCode;

use rask::prelude::*;

#[rask::task]
fn inc(x: i64) -> i64 {
    x + 1
}

#[rask::task]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[rask::task]
fn sum(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

#[rask::task]
fn divmod(a: i64, b: i64) -> (i64, i64) {
    (a / b, a % b)
}

#[rask::task]
fn squares(n: i64) -> Vec<i64> {
    (0..n).map(|i| i * i).collect()
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let executor = rask::Config::new().resolve()?;
    println!("executor: {executor}");

    let x = delayed!(inc(1)); // nothing runs yet
    let y = delayed!(inc(2));
    let total = delayed!(add(&x, &y));
    println!("total = {}  (key {})", total.compute()?, total.key());

    // Several outputs in one graph: `x` and `y` run once.
    let (a, t) = rask::compute((&x, &total))?;
    println!("x = {a}, total = {t}");

    // Same work, same key.
    assert_eq!(delayed!(add(&x, &y)).key(), total.key());

    // Collections of Delayed values are traversed; operators build tasks.
    let incs: Vec<Delayed<i64>> = (0..10).map(|i| delayed!(inc(i))).collect();
    let s = delayed!(sum(incs));
    let scaled = &s * 2 + 1;
    println!(
        "sum of inc(0..10) = {}, scaled = {}",
        s.compute()?,
        scaled.compute()?
    );

    // Lazy comparisons, one task per tuple element, a list's element.
    let sum = &x + &y * 10;
    let less = x.lt(&y);
    let (q, r) = delayed!(divmod(17, 5)).split();
    let third = delayed!(squares(5)).item(3);
    let got = rask::compute((&sum, &less, &q, &r, &third))?;
    println!(
        "x + y * 10 = {}, x < y: {}, 17 divmod 5 = ({}, {}), 3² = {}",
        got.0, got.1, got.2, got.3, got.4
    );

    // Computed once and kept: dependents start from the value.
    let kept = total.persist()?;
    println!("inc(persisted total) = {}", delayed!(inc(&kept)).compute()?);

    let dot = std::env::temp_dir().join("rask-quickstart.dot");
    std::fs::write(&dot, scaled.to_dot())?;
    println!("graph written to {}", dot.display());
    Ok(())
}

fn main() -> ExitCode {
    // The functions marked `#[rask::task]` can run on a cluster
    // (RASK_SCHEDULER=local:2); a worker process stays in here.
    rask::init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
