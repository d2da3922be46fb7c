//! A property test that finds an ordering bug no single-threaded run shows.
//!
//! The pipeline squares chunks of numbers on a client and stitches the
//! chunks back together as they complete, with a planted bug: it assumes
//! chunks complete in the order they were submitted, which `sync` always
//! does and a pool or a cluster does not. Under `sim:SEED` the simulated
//! executor picks the completion order from the seed, so exploring seeds
//! finds an order that breaks it, and prints the line that replays it:
//!
//! ```text
//! cargo run --example property_test --features testing
//! seed = 3; replay: RASK_SCHEDULER=sim:3 cargo run --example property_test --features testing
//! ```
//!
//! `-- --fixed` runs the corrected pipeline, which passes every seed.

use rask::{as_completed, delayed, Client, Config};

fn squares(chunk: Vec<i64>) -> Vec<i64> {
    chunk.iter().map(|x| x * x).collect()
}

/// Squares `0..n` in chunks of 4 on `client`.
fn pipeline(client: &Client, n: i64, fixed: bool) -> rask::Result<Vec<i64>> {
    let chunks: Vec<Vec<i64>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(4)
        .map(<[i64]>::to_vec)
        .collect();
    let futures = chunks
        .iter()
        .map(|c| client.submit(delayed!(squares(c.clone()))))
        .collect::<rask::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    let mut parts = vec![Vec::new(); futures.len()];
    for done in as_completed(futures.clone()) {
        let part = done.result()?;
        if fixed {
            let at = futures.iter().position(|f| f.key() == done.key()).unwrap();
            parts[at] = part;
        } else {
            out.extend(part); // the planted bug: completion order is not submission order
        }
    }
    if fixed {
        out = parts.concat();
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixed = std::env::args().any(|a| a == "--fixed");
    if std::env::var_os(rask::testing::REPLAY_COMMAND_ENV_VAR).is_none() {
        std::env::set_var(
            rask::testing::REPLAY_COMMAND_ENV_VAR,
            "cargo run --example property_test --features testing",
        );
    }
    let expected: Vec<i64> = (0..20).map(|x| x * x).collect();
    // The reference run on `sync` passes: the bug hides there.
    assert_eq!(
        pipeline(&Client::with_config(&Config::synchronous())?, 20, fixed)?,
        expected
    );
    let explored = rask::testing::for_each_seed(0..200, |config| {
        let got = pipeline(
            &Client::with_config(&config).map_err(|e| e.to_string())?,
            20,
            fixed,
        )
        .map_err(|e| e.to_string())?;
        if got == expected {
            Ok(())
        } else {
            Err(format!("wrong result: {got:?}"))
        }
    });
    match explored {
        Ok(()) => {
            println!("every seed passed");
            Ok(())
        }
        Err(failure) => {
            println!("{}", failure.message);
            std::process::exit(1);
        }
    }
}
