//! The result cache: a pipeline over a file it creates, whose values
//! outlive the process. Run it twice: the first run runs every task, the
//! second loads the result and runs none.
//!
//! ```sh
//! cargo run --example cache    # ran 9 of 9 tasks
//! cargo run --example cache    # ran 0 of 9 tasks
//! RASK_CACHE=/tmp/other RASK_SCHEDULER=local:2 cargo run --example cache
//! ```
//!
//! The cache is the directory `RASK_CACHE` names, or one under the system's
//! temporary directory. Edit `summarize` and run again: its four tasks and
//! `combine` run, the loads do not.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rask::{delayed, Config};

const CHUNKS: u64 = 4;
const LINES_PER_CHUNK: u64 = 25_000;

/// The sums of a chunk of numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Summary {
    count: u64,
    sum: f64,
    sum_of_squares: f64,
}

/// One chunk of the file's numbers. The file's length and modification
/// time are arguments, so they are part of the key: a changed file is
/// read again, not served from the cache.
#[rask::task(cache)]
fn load(path: String, stamp: (u64, u64), chunk: u64) -> std::io::Result<Vec<f64>> {
    let _ = stamp;
    let file = BufReader::new(std::fs::File::open(path)?);
    let first = chunk * LINES_PER_CHUNK;
    let mut values = Vec::new();
    for line in file
        .lines()
        .skip(first as usize)
        .take(LINES_PER_CHUNK as usize)
    {
        values.push(line?.trim().parse().unwrap_or(0.0));
    }
    Ok(values)
}

#[rask::task(cache)]
fn summarize(values: Vec<f64>) -> Summary {
    let weight = 1.0;
    Summary {
        count: values.len() as u64,
        sum: weight * values.iter().sum::<f64>(),
        sum_of_squares: weight * values.iter().map(|v| v * v).sum::<f64>(),
    }
}

#[rask::task(cache)]
fn combine(parts: Vec<Summary>) -> Summary {
    parts.iter().fold(Summary::default(), |a, b| Summary {
        count: a.count + b.count,
        sum: a.sum + b.sum,
        sum_of_squares: a.sum_of_squares + b.sum_of_squares,
    })
}

/// Writes the data file once; later runs find it unchanged.
fn data_file(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("numbers.txt");
    if !path.exists() {
        std::fs::create_dir_all(dir)?;
        let text: String = (0..CHUNKS * LINES_PER_CHUNK)
            .map(|i| format!("{}\n", (i * 7919) % 1000))
            .collect();
        let temporary = dir.join(format!("numbers.{}.tmp", std::process::id()));
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, &path)?;
    }
    Ok(path)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A damaged cache entry is a miss with a warning: print warnings.
    rask::init_logging();
    rask::init();
    let here = std::env::temp_dir().join("rask-cache-example");
    let path = data_file(&here)?;
    let meta = std::fs::metadata(&path)?;
    let modified = meta.modified()?.duration_since(std::time::UNIX_EPOCH)?;
    let stamp = (meta.len(), modified.as_secs());

    let mut config = Config::new();
    if std::env::var_os("RASK_CACHE").is_none_or(|v| v.is_empty()) {
        config = config.cache(here.join("cache"));
    }
    let name = path.to_string_lossy().into_owned();
    let parts: Vec<_> = (0..CHUNKS)
        .map(|i| delayed!(summarize(delayed!(load(name.clone(), stamp, i)?))))
        .collect();
    let total = delayed!(combine(parts));
    let tasks = 2 * CHUNKS + 1;

    let before = rask::cache::stats();
    let summary = total.compute_with(&config)?;
    let after = rask::cache::stats();
    let mean = summary.sum / summary.count as f64;
    println!(
        "{} numbers, mean {mean:.3}, mean square {:.1}",
        summary.count,
        summary.sum_of_squares / summary.count as f64
    );
    println!(
        "ran {} of {tasks} tasks ({} loaded from the cache)",
        after.misses - before.misses,
        after.hits - before.hits
    );
    Ok(())
}
