//! Persist, as in the Dask tutorial: data loaded in chunks from a file.
//! Two computations without persist (each one loads the file again), then
//! the chunks are persisted and two more computations start from memory.
//!
//! ```text
//! cargo run --release --example persist
//! RASK_SCHEDULER=sync cargo run --example persist
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rask::prelude::*;

const CHUNKS: usize = 8;
const PER_CHUNK: usize = 250_000;

/// Loads chunk `index` of the text file: one number per line.
#[rask::task]
fn load(path: String, index: usize) -> Result<Vec<f64>, String> {
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .skip(index * PER_CHUNK)
        .take(PER_CHUNK)
        .map(|line| line.parse::<f64>().map_err(|e| format!("{path}: {e}")))
        .collect()
}

#[rask::task]
fn chunk_sum(chunk: Arc<Vec<f64>>) -> f64 {
    chunk.iter().sum()
}

#[rask::task]
fn chunk_max(chunk: Arc<Vec<f64>>) -> f64 {
    chunk.iter().copied().fold(f64::MIN, f64::max)
}

#[rask::task]
fn total(parts: Vec<f64>) -> f64 {
    parts.iter().sum()
}

#[rask::task]
fn largest(parts: Vec<f64>) -> f64 {
    parts.iter().copied().fold(f64::MIN, f64::max)
}

/// Writes `CHUNKS × PER_CHUNK` pseudo-random numbers, one per line.
fn create_data() -> std::io::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("rask-persist-{}.txt", std::process::id()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut state = 7u64;
    for _ in 0..CHUNKS * PER_CHUNK {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        writeln!(
            out,
            "{:.6}",
            (state >> 11) as f64 / (1u64 << 53) as f64 * 100.0
        )?;
    }
    out.flush()?;
    Ok(path)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rask::init();
    let path = create_data()?;
    let file = path.to_string_lossy().into_owned();
    println!("data: {file} ({CHUNKS} chunks of {PER_CHUNK} numbers)");

    let chunks: Vec<Delayed<Vec<f64>>> = (0..CHUNKS)
        .map(|i| delayed!(load(file.clone(), i)?))
        .collect();
    let sum_of = |chunks: &[Delayed<Vec<f64>>]| {
        let parts: Vec<Delayed<f64>> = chunks.iter().map(|c| delayed!(chunk_sum(c))).collect();
        delayed!(total(parts))
    };
    let max_of = |chunks: &[Delayed<Vec<f64>>]| {
        let parts: Vec<Delayed<f64>> = chunks.iter().map(|c| delayed!(chunk_max(c))).collect();
        delayed!(largest(parts))
    };

    // Without persist: every compute loads the data again.
    let t = Instant::now();
    let sum = sum_of(&chunks).compute()?;
    let a = t.elapsed();
    let t = Instant::now();
    let max = max_of(&chunks).compute()?;
    let b = t.elapsed();
    println!("without persist: sum {sum:.1} in {a:?}, max {max:.3} in {b:?}");

    // Persist the chunks once: later graphs start from the data in memory.
    let client = Client::new()?;
    let t = Instant::now();
    let futures: Vec<Future<Vec<f64>>> = chunks
        .iter()
        .map(|c| client.submit(c))
        .collect::<Result<_, _>>()?;
    println!("submit (persist) returned after {:?}", t.elapsed());
    // A bar on stderr that does not block (Dask's `progress`); a plain line
    // at the end when stderr is not a terminal.
    rask::progress(&futures);
    rask::wait(&futures); // the loads run in the background; wait for them
    println!("chunks loaded and held after {:?}", t.elapsed());
    let kept: Vec<Delayed<Vec<f64>>> = futures.iter().map(Future::to_delayed).collect();

    let t = Instant::now();
    let sum2 = sum_of(&kept).compute()?;
    let c = t.elapsed();
    let t = Instant::now();
    let max2 = max_of(&kept).compute()?;
    let d = t.elapsed();
    println!("with persist:    sum {sum2:.1} in {c:?}, max {max2:.3} in {d:?}");
    assert_eq!((sum, max), (sum2, max2));

    println!("\ntimings: {a:?}  {b:?}  |  {c:?}  {d:?}");
    std::fs::remove_file(&path)?;
    Ok(())
}
