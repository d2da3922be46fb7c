//! The futures tour of the Dask tutorial, in Rust: `submit` returns at once,
//! `progress` draws a bar and `wait` waits, `gather` fetches, `compute` of
//! a delayed graph gives a future, the same graph rebuilt with `submit`
//! and futures as arguments, `map`, identical work resubmitted is instant,
//! `scatter` places data once for tasks to share, and dropping futures
//! releases results.
//!
//! ```text
//! cargo run --example futures_tour
//! RASK_SCHEDULER=local:4 cargo run --example futures_tour   # Client(n_workers=4)
//! RASK_SCHEDULER=sync cargo run --example futures_tour
//! ```
//!
//! The tutorial sleeps 5, 3 and 7 seconds; here 500, 300 and 700 ms.

use std::thread::sleep;
use std::time::{Duration, Instant};

use rask::prelude::*;

#[rask::task]
fn inc(x: i64) -> i64 {
    sleep(Duration::from_millis(500));
    x + 1
}

#[rask::task]
fn dec(x: i64) -> i64 {
    sleep(Duration::from_millis(300));
    x - 1
}

#[rask::task]
fn add(x: i64, y: i64) -> i64 {
    sleep(Duration::from_millis(700));
    x + y
}

#[rask::task]
fn sum_of(values: std::sync::Arc<Vec<i64>>) -> i64 {
    values.iter().sum()
}

#[rask::task]
fn count_over(values: std::sync::Arc<Vec<i64>>, limit: i64) -> usize {
    values.iter().filter(|&&v| v > limit).count()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Worker processes (`local:N`, `tcp://`) stop here and run the
    // functions marked `#[rask::task]`.
    rask::init();
    // `Client(n_workers=4)`: the executor comes from RASK_SCHEDULER
    // (default: a thread pool with one thread per core).
    let client = Client::new()?;
    println!("client on {}", client.executor());

    // submit returns a future at once; the work runs in the background.
    let t = Instant::now();
    let mut fut = client.submit(delayed!(inc(1)))?;
    println!("submit returned after {:?}: {fut:?}", t.elapsed());
    // `progress(fut)`: a bar on stderr (when it is a terminal), returned at
    // once; `wait` blocks until the future is done.
    let bar = rask::progress(std::slice::from_ref(&fut));
    rask::wait(std::slice::from_ref(&fut));
    bar.wait();
    println!("after wait: {fut:?}  ({:?})", t.elapsed());
    println!(
        "gather: {}  (after {:?})",
        client.gather(std::slice::from_ref(&fut))?[0],
        t.elapsed()
    );
    println!("now: {fut:?}");

    // compute of a delayed graph returns a future too.
    let x = delayed!(inc(1));
    let y = delayed!(dec(2));
    let total = delayed!(add(&x, &y));
    let t = Instant::now();
    // Assigning drops the previous future, which releases its result.
    fut = client.compute(&total)?;
    println!("\ncompute(total) returned after {:?}: {fut:?}", t.elapsed());
    println!("total = {}  (after {:?})", fut.result()?, t.elapsed());

    // The same graph with submit: futures are arguments, so the
    // computation moves to the data and intermediates never come back.
    // (Dropping `fut` first: otherwise `total` would have its key and be
    // ready at once.)
    drop(fut);
    let t = Instant::now();
    let x = client.submit(delayed!(inc(1)))?;
    let y = client.submit(delayed!(dec(2)))?;
    let total = client.submit(delayed!(add(&x, &y)))?;
    println!("\n{total:?}  (still a future)");
    println!("total = {}  (after {:?})", total.result()?, t.elapsed());

    // map: one future per input.
    let t = Instant::now();
    let futures = client.map(inc, 0..8)?;
    println!(
        "\nmap returned after {:?}; keys {} … {}",
        t.elapsed(),
        futures[0].key(),
        futures[7].key()
    );
    println!(
        "gather(map) = {:?}  (after {:?})",
        client.gather(&futures)?,
        t.elapsed()
    );

    // The same calculation again: same keys, results still held, instant.
    let t = Instant::now();
    let again = client.map(inc, 0..8)?;
    let values = client.gather(&again)?;
    println!("\nsame map again: {values:?} in {:?}", t.elapsed());
    println!(
        "same keys: {}",
        again.iter().zip(&futures).all(|(a, b)| a.key() == b.key())
    );

    // scatter: data from this process placed once (on a cluster, on one
    // worker), then passed to tasks as a future; it never travels with
    // each task again.
    let numbers = client.scatter((1..=1000).collect::<Vec<i64>>())?;
    let sum = client.submit(delayed!(sum_of(&numbers)))?;
    let big = client.submit(delayed!(count_over(&numbers, 500)))?;
    println!(
        "\nscattered {}: sum {}, over 500: {}",
        numbers.key(),
        sum.result()?,
        big.result()?
    );
    drop((numbers, sum, big));

    // Dropping futures releases their results (Python's `del`).
    println!("\nkeys held: {}", client.stats().keys_held);
    drop(futures);
    drop(again);
    println!(
        "after dropping the map futures: {}",
        client.stats().keys_held
    );
    drop((x, y, total));
    println!("after dropping the rest: {}", client.stats().keys_held);
    Ok(())
}
