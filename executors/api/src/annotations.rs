//! What a task asks of the scheduler besides its work: a priority, resources
//! and the workers it may run on (Dask's `priority=`, `resources=`,
//! `workers=`). None of it changes a task's key or value.
//!
//! Rules:
//!
//! 1. **Amounts are exact.** A resource amount is kept in thousandths of a
//!    unit (`GPU=0.5` is 500), so sums and differences of what runs on a
//!    worker never drift the way floats would. Amounts are at least 0 and at
//!    most [`MAX_AMOUNT`] units; names are 1 to [`MAX_RESOURCE_NAME`] bytes
//!    of letters, digits, `_`, `-`, `.` and `/`.
//! 2. **One entry per name.** [`Resources`] keeps its entries sorted by name,
//!    each name once (a repeated name is an error when parsing, and the
//!    last amount wins when built from pairs), and drops zero amounts: a
//!    request for none of something is no request.
//! 3. **Only cluster executors use them.** `sync`, `threads` and `sim:SEED`
//!    run everything in one process, which has no declared resources and no
//!    named workers: they ignore annotations.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The largest amount of one resource, in units: 10^15 (a petabyte of
/// memory counted in bytes), so thousandths still fit a `u64` with room for
/// sums.
pub const MAX_AMOUNT: f64 = 1e15;

/// The longest resource name, in bytes.
pub const MAX_RESOURCE_NAME: usize = 64;

/// The most resources a worker declares or a task asks for.
pub const MAX_RESOURCES: usize = 64;

/// Thousandths per unit (rule 1).
const MILLI: f64 = 1000.0;

/// Amounts of named resources (rules 1 and 2), as a worker declares them
/// (`RASK_WORKER_RESOURCES=GPU=2,MEM=64e9`) or a task asks for them.
///
/// # Examples
///
/// ```
/// use rask_executor::Resources;
/// let r = Resources::parse("GPU=2, MEM=64e9")?;
/// assert_eq!(r.to_string(), "GPU=2,MEM=64000000000");
/// assert!(Resources::parse("GPU=-1").is_err());
/// # Ok::<(), rask_executor::ResourceError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "Vec<(String, u64)>", into = "Vec<(String, u64)>")]
pub struct Resources {
    /// `(name, thousandths)`, sorted by name, names unique, amounts > 0.
    entries: Vec<(String, u64)>,
}

/// Why a resource list was refused; the message names the entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad resource `{entry}`: {why} (expected NAME=AMOUNT[,NAME=AMOUNT…], e.g. GPU=2,MEM=64e9)")]
pub struct ResourceError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub why: String,
}

impl Resources {
    /// No resources.
    pub fn new() -> Resources {
        Resources::default()
    }

    /// Parses `NAME=AMOUNT` entries separated by commas (spaces around
    /// them allowed; an empty string is no resources).
    ///
    /// # Errors
    ///
    /// [`ResourceError`] naming the first bad entry: no `=`, a bad name, an
    /// amount that is not a number in `0..=`[`MAX_AMOUNT`], a name given
    /// twice, or more than [`MAX_RESOURCES`] entries.
    pub fn parse(text: &str) -> Result<Resources, ResourceError> {
        let mut entries: Vec<(String, u64)> = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |why: &str| ResourceError {
                entry: entry.to_owned(),
                why: why.to_owned(),
            };
            let (name, amount) = entry.split_once('=').ok_or_else(|| bad("no `=`"))?;
            let name = name.trim();
            check_name(name).map_err(|why| bad(&why))?;
            let amount: f64 = amount
                .trim()
                .parse()
                .map_err(|_| bad("the amount is not a number"))?;
            let milli = to_milli(amount).map_err(|why| bad(&why))?;
            if entries.iter().any(|(n, _)| n == name) {
                return Err(bad("the name is given twice"));
            }
            entries.push((name.to_owned(), milli));
        }
        if entries.len() > MAX_RESOURCES {
            return Err(ResourceError {
                entry: text.to_owned(),
                why: format!("more than {MAX_RESOURCES} resources"),
            });
        }
        Ok(Resources::from_milli(entries))
    }

    /// Resources from `(name, amount)` pairs, checked as
    /// [`parse`](Resources::parse) checks them; a repeated name takes the
    /// last amount.
    ///
    /// # Errors
    ///
    /// [`ResourceError`] naming the first bad pair.
    pub fn from_pairs<N: AsRef<str>>(
        pairs: impl IntoIterator<Item = (N, f64)>,
    ) -> Result<Resources, ResourceError> {
        let mut entries: Vec<(String, u64)> = Vec::new();
        for (name, amount) in pairs {
            let name = name.as_ref();
            let bad = |why: String| ResourceError {
                entry: format!("{name}={amount}"),
                why,
            };
            check_name(name).map_err(bad)?;
            let milli = to_milli(amount).map_err(bad)?;
            entries.retain(|(n, _)| n != name);
            entries.push((name.to_owned(), milli));
        }
        if entries.len() > MAX_RESOURCES {
            return Err(ResourceError {
                entry: String::new(),
                why: format!("more than {MAX_RESOURCES} resources"),
            });
        }
        Ok(Resources::from_milli(entries))
    }

    /// Resources from `(name, thousandths)` entries as they travel; names
    /// are not checked (a receiver bounds them, see the protocol), zero
    /// amounts are dropped and a repeated name takes the last amount.
    pub fn from_milli(entries: Vec<(String, u64)>) -> Resources {
        // O(n log n) whatever a peer sends: a stable sort keeps a repeated
        // name's entries in order, and the last of each run wins.
        let mut entries = entries;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, u64)> = Vec::with_capacity(entries.len());
        for (name, milli) in entries {
            if out.last().is_some_and(|(n, _)| *n == name) {
                out.pop();
            }
            out.push((name, milli));
        }
        out.retain(|&(_, milli)| milli > 0);
        Resources { entries: out }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as `(name, thousandths)`, sorted by name.
    pub fn milli(&self) -> &[(String, u64)] {
        &self.entries
    }

    /// The amount of `name`, in thousandths (0 if absent).
    pub fn get_milli(&self, name: &str) -> u64 {
        self.entries
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .map_or(0, |i| self.entries[i].1)
    }

    /// Whether every amount of `request` is at most this one's.
    pub fn covers(&self, request: &Resources) -> bool {
        request.entries.iter().all(|(n, a)| self.get_milli(n) >= *a)
    }
}

/// Normalized as it is read (rule 2), whatever a peer sent.
impl From<Vec<(String, u64)>> for Resources {
    fn from(entries: Vec<(String, u64)>) -> Resources {
        Resources::from_milli(entries)
    }
}

impl From<Resources> for Vec<(String, u64)> {
    fn from(resources: Resources) -> Vec<(String, u64)> {
        resources.entries
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, milli)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let (units, frac) = (milli / 1000, milli % 1000);
            if frac == 0 {
                write!(f, "{name}={units}")?;
            } else {
                let frac = format!("{frac:03}");
                write!(f, "{name}={units}.{}", frac.trim_end_matches('0'))?;
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_RESOURCE_NAME {
        return Err(format!("a name is 1 to {MAX_RESOURCE_NAME} bytes"));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/');
    if !name.chars().all(ok) {
        return Err("a name is letters, digits, `_`, `-`, `.` and `/`".into());
    }
    Ok(())
}

fn to_milli(amount: f64) -> Result<u64, String> {
    if !(0.0..=MAX_AMOUNT).contains(&amount) {
        return Err(format!("the amount must be from 0 to {MAX_AMOUNT:e}"));
    }
    // In range: at most 10^18 thousandths, below u64::MAX.
    Ok((amount * MILLI).round() as u64)
}

/// What a task asks of the scheduler besides its work; see the module
/// rules. The default asks for nothing: priority 0, no resources, any
/// worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Annotations {
    /// Among tasks ready at the same time, higher runs first (Dask's
    /// `priority=`); ties go to the task submitted first.
    pub priority: i32,
    /// What the task holds on its worker while it runs.
    pub resources: Resources,
    /// The workers it may run on, by address (`host:port`) or name; empty:
    /// any worker.
    pub workers: Vec<String>,
}

impl Annotations {
    /// Whether the task runs only on some workers: it asks for resources or
    /// names workers.
    pub fn is_restricted(&self) -> bool {
        !self.resources.is_empty() || !self.workers.is_empty()
    }

    /// The restrictions as people read them: `resources GPU=1, workers
    /// [a, b]`.
    pub fn describe_restrictions(&self) -> String {
        let mut parts = Vec::new();
        if !self.resources.is_empty() {
            parts.push(format!("resources {}", self.resources));
        }
        if !self.workers.is_empty() {
            parts.push(format!("workers [{}]", self.workers.join(", ")));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_exact_and_names_the_bad_entry() {
        let r = Resources::parse(" MEM=64e9 ,GPU=0.5,CPU=0").unwrap();
        assert_eq!(
            r.milli(),
            &[("GPU".into(), 500), ("MEM".into(), 64_000_000_000_000)]
        );
        assert_eq!(r.to_string(), "GPU=0.5,MEM=64000000000");
        assert_eq!(Resources::parse("").unwrap(), Resources::new());
        for bad in [
            "GPU", "GPU=x", "GPU=-1", "GPU=NaN", "GPU=inf", "G PU=1", "=1", "A=1,A=2",
        ] {
            let e = Resources::parse(bad).unwrap_err();
            assert!(e.to_string().contains("bad resource"), "{bad}: {e}");
        }
        assert!(Resources::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn covers_compares_every_requested_amount() {
        let worker = Resources::parse("GPU=2,MEM=10").unwrap();
        assert!(worker.covers(&Resources::parse("GPU=2").unwrap()));
        assert!(worker.covers(&Resources::new()));
        assert!(!worker.covers(&Resources::parse("GPU=2.001").unwrap()));
        assert!(!worker.covers(&Resources::parse("TPU=1").unwrap()));
        let pairs = Resources::from_pairs([("GPU", 1.0), ("GPU", 2.0)]).unwrap();
        assert_eq!(pairs.get_milli("GPU"), 2000);
    }
}
