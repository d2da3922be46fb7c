//! Where the cluster's log lines go.
//!
//! Everything this crate has to say — a worker joined, died or was
//! restarted, a client connected or left, a connection was refused, a task
//! erred or was lost and recomputed — is a `tracing` event, with the
//! crate's module as its target. A library prints nothing by itself: a
//! program sees these lines once it installs a subscriber, its own or the
//! one [`init_logging`] installs. `rask-scheduler` and worker processes
//! started by rask call [`init_logging`] first thing.

use std::str::FromStr;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

/// The environment variable [`init_logging`] reads its filter from.
pub const LOG_ENV: &str = "RUST_LOG";

/// Prints `tracing` events on stderr, one human-readable line each (time,
/// level, target, message and fields), keeping those `RUST_LOG` lets
/// through: a level (`debug`), targets with levels
/// (`rask_distributed=debug,warn`), or both. Without `RUST_LOG`, events
/// at `info` and above. A `RUST_LOG` that does not parse is said once on
/// stderr and the default used.
///
/// Returns `false`, and changes nothing, when the process already has a
/// global subscriber: a program's own choice wins.
///
/// # Examples
///
/// ```
/// // In `main`, before anything else logs.
/// rask_distributed::init_logging();
/// ```
pub fn init_logging() -> bool {
    let filter = match std::env::var(LOG_ENV) {
        Ok(text) if !text.trim().is_empty() => match parse_filter(&text) {
            Ok(filter) => filter,
            Err(why) => {
                eprintln!("{LOG_ENV}={text:?} is not a filter ({why}); logging at info");
                default_filter()
            }
        },
        _ => default_filter(),
    };
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .try_init()
        .is_ok()
}

/// `info` and above, from every target.
fn default_filter() -> Targets {
    Targets::new().with_default(LevelFilter::INFO)
}

/// The filter `text` describes, in `RUST_LOG`'s syntax without regexes.
fn parse_filter(text: &str) -> Result<Targets, String> {
    Targets::from_str(text.trim()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn filters_parse_levels_and_targets_and_refuse_junk() {
        let level = parse_filter("debug").unwrap();
        assert!(level.would_enable("anything", &Level::DEBUG));
        assert!(!level.would_enable("anything", &Level::TRACE));
        let targets = parse_filter("rask_distributed::scheduler=debug,warn").unwrap();
        assert!(targets.would_enable("rask_distributed::scheduler::state", &Level::DEBUG));
        assert!(!targets.would_enable("rask_distributed::worker", &Level::INFO));
        assert!(targets.would_enable("rask_distributed::worker", &Level::WARN));
        assert!(parse_filter("rask=loud").is_err());
        assert!(default_filter().would_enable("x", &Level::INFO));
        assert!(!default_filter().would_enable("x", &Level::DEBUG));
    }
}
