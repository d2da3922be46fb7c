//! The dynamic search of the Dask tutorial: minimise the Rosenbrock function
//! by random search around the best point so far, submitting a new point
//! each time one finishes (`as_completed` with `add`), while the search box
//! shrinks. Prints each new best; writes an SVG of the points tried as it
//! goes (open it in a browser and reload to watch the search), and on a
//! cluster prints the link to the live dashboard.
//!
//! ```text
//! cargo run --example rosenbrock
//! RASK_SCHEDULER=threads:2 cargo run --example rosenbrock
//! RASK_SCHEDULER=local:2 RASK_DASHBOARD=127.0.0.1:8787 cargo run --example rosenbrock
//! ```
//!
//! Each evaluation sleeps 5 ms (the tutorial: 100 ms) so the search takes a
//! few seconds; set `ROSENBROCK_SLEEP_MS` to change it.

use std::fmt::Write as _;
use std::time::Duration;

use rask::prelude::*;

/// The function of interest, with a pause standing for real work.
#[rask::task]
fn rosenbrock(point: (f64, f64)) -> ((f64, f64), f64) {
    let ms = std::env::var("ROSENBROCK_SLEEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    std::thread::sleep(Duration::from_millis(ms));
    let (x, y) = point;
    let score = (1.0 - x).powi(2) + 2.0 * (y - x * x).powi(2);
    (point, score)
}

/// A small deterministic generator (SplitMix64), so runs are reproducible.
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rask::init();
    let client = Client::new()?;
    println!("searching on {}", client.executor());
    if let Some(link) = client.dashboard_link() {
        println!("dashboard: {link}");
    }
    let mut rng = Rng(42);

    let mut scale = 5.0; // initial random perturbation scale
    let mut best_point = (0.0, 0.0); // initial guess
    let mut best_score = f64::INFINITY;
    let mut tried = Vec::new();
    let path = std::env::temp_dir().join("rosenbrock.svg");
    println!(
        "points tried, written as the search goes: {}",
        path.display()
    );

    // 10 random starting points, in flight at once.
    let starts: Vec<(f64, f64)> = (0..10)
        .map(|_| (rng.uniform(-scale, scale), rng.uniform(-scale, scale)))
        .collect();
    let mut iterator = as_completed(client.map(rosenbrock, starts)?);

    while let Some(done) = iterator.next() {
        // Take a completed point: is it an improvement?
        let (point, score) = done.result()?;
        tried.push(point);
        if score < best_score {
            (best_score, best_point) = (score, point);
            println!("{score:>12.6}  ({:.4}, {:.4})", point.0, point.1);
        }

        // Add a new point around the best one, computed while we go on.
        let (x, y) = best_point;
        let new = (
            x + rng.uniform(-scale, scale),
            y + rng.uniform(-scale, scale),
        );
        iterator.add(client.submit(delayed!(rosenbrock(new)))?);

        if tried.len() % 25 == 0 {
            write_svg(&path, &tried, best_point)?;
        }

        // Narrow the search and consider stopping.
        scale *= 0.99;
        if scale < 0.001 {
            break;
        }
    }
    println!(
        "best point ({:.3}, {:.3}) with score {best_score:.6} after {} evaluations",
        best_point.0,
        best_point.1,
        tried.len()
    );

    write_svg(&path, &tried, best_point)?;
    println!("points tried: {}", path.display());
    Ok(())
}

/// Replaces the SVG at `path` at once (written beside it, then renamed), so
/// a browser reloading it never reads half a file.
fn write_svg(
    path: &std::path::Path,
    points: &[(f64, f64)],
    best: (f64, f64),
) -> std::io::Result<()> {
    let partial = path.with_extension("svg.partial");
    std::fs::write(&partial, svg(points, best))?;
    std::fs::rename(&partial, path)
}

/// The log of the function as a background, the points tried in grey, the
/// best one in red, on the square [-5, 5]².
fn svg(points: &[(f64, f64)], best: (f64, f64)) -> String {
    const SIZE: f64 = 500.0;
    const CELLS: usize = 100;
    let to_px = |v: f64| (v + 5.0) / 10.0 * SIZE;
    let mut out =
        format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}">"#);
    let cell = SIZE / CELLS as f64;
    for i in 0..CELLS {
        for j in 0..CELLS {
            let x = -5.0 + 10.0 * (i as f64 + 0.5) / CELLS as f64;
            let y = 5.0 - 10.0 * (j as f64 + 0.5) / CELLS as f64;
            let d = ((1.0 - x).powi(2) + 2.0 * (y - x * x).powi(2)).ln();
            // ln d spans about -3 .. 9 here: blue (low) to yellow (high).
            let t = ((d + 3.0) / 12.0).clamp(0.0, 1.0);
            let (r, g, b) = (
                (40.0 + 215.0 * t) as u8,
                (60.0 + 160.0 * t) as u8,
                (160.0 - 120.0 * t) as u8,
            );
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="{cell:.1}" height="{cell:.1}" fill="rgb({r},{g},{b})"/>"#,
                i as f64 * cell,
                j as f64 * cell
            );
        }
    }
    for &(x, y) in points {
        let _ = write!(
            out,
            r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="grey"/>"#,
            to_px(x),
            SIZE - to_px(y)
        );
    }
    let _ = write!(
        out,
        r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="red" stroke="white"/></svg>"#,
        to_px(best.0),
        SIZE - to_px(best.1)
    );
    out
}
