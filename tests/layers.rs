//! The layer rule of `src/` (lib.rs, Design): the folders `build/`,
//! `plan/`, `run/`, `futures/` and `testing/` (feature `testing`) are
//! layers, bottom to top, and code in a
//! layer never names a higher one. This test reads every `src/**/*.rs`
//! (not `src/macros/`, a crate of its own, nor `lib.rs`, the facade that
//! names every layer) and fails on each reference that points up.
//!
//! What counts as a reference, line by line:
//!
//! 1. `crate::LAYER…` in code: a `use` line or a path anywhere.
//! 2. `crate::Name` (and `crate::{A, B}`) where lib.rs re-exports `Name`
//!    from a layer: going through the facade does not hide the edge.
//! 3. `super::super::…` escaping a layer folder to the crate root, then
//!    naming a layer.
//!
//! Not counted: comments (doc links are resolved by rustdoc, not compiled
//! into a dependency), `$crate::` in macros (it expands in the user's
//! crate, against the facade), and `#[cfg(test)]` modules: a unit test may
//! run what it tests on an executor, and test code is not part of the
//! library. Since every edge points down, no cycle can run through two
//! layers; the test also prints the layer edges it found.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Bottom to top. Files beside `lib.rs` would be a base under all of them.
const LAYERS: [&str; 5] = ["build", "plan", "run", "futures", "testing"];

/// One reference to a layer.
#[derive(Debug, PartialEq, Eq)]
struct Upward {
    line: usize,
    to: &'static str,
    text: String,
}

fn rank(name: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == name)
}

/// Names lib.rs re-exports from a layer, e.g. `Client` → run's rank.
fn reexports(lib: &str) -> HashMap<String, usize> {
    let mut names = HashMap::new();
    let mut rest = lib;
    while let Some(at) = rest.find("pub use ") {
        rest = &rest[at + "pub use ".len()..];
        let end = rest.find(';').unwrap_or(rest.len());
        let statement: String = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
        rest = &rest[end..];
        let Some(layer) = statement.split("::").next().and_then(rank) else {
            continue;
        };
        let listed = match (statement.find('{'), statement.rfind('}')) {
            (Some(open), Some(close)) => statement[open + 1..close].to_owned(),
            _ => statement.clone(),
        };
        for item in listed.split(',') {
            let item = item.trim();
            let name = match item.rsplit_once(" as ") {
                Some((_, alias)) => alias,
                None => item.rsplit("::").next().unwrap_or(item),
            };
            if !name.is_empty() {
                names.insert(name.trim().to_owned(), layer);
            }
        }
    }
    names
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The layers `code` (one line, no comment) names through `crate::`.
fn named_layers(code: &str, roots: &HashMap<String, usize>, out: &mut Vec<usize>) {
    let mut search = 0;
    while let Some(found) = code[search..].find("crate::") {
        let at = search + found;
        search = at + "crate::".len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c == '$' || c.is_alphanumeric() || c == '_') {
            continue;
        }
        let after = &code[search..];
        if let Some(group) = after.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name = ident_at(item.trim());
                out.extend(rank(name).or_else(|| roots.get(name).copied()));
            }
            continue;
        }
        let name = ident_at(after);
        out.extend(rank(name).or_else(|| roots.get(name).copied()));
    }
}

/// `super::` chains that climb out of `module` (its path from the crate
/// root) and name a layer.
fn escapes(code: &str, module: &[&str], out: &mut Vec<usize>) {
    let mut search = 0;
    while let Some(found) = code[search..].find("super::") {
        let at = search + found;
        let before = code[..at].chars().next_back();
        let mut rest = &code[at..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        search = code.len() - rest.len();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if ups >= module.len() {
            out.extend(rank(ident_at(rest)));
        }
    }
}

/// The upward references of one file of layer `layer` (`None`: beside
/// lib.rs, under every layer), whose module path is `module`.
fn check(
    text: &str,
    layer: Option<usize>,
    module: &[&str],
    roots: &HashMap<String, usize>,
) -> Vec<Upward> {
    let mine = layer.map_or(-1, |l| l as isize);
    references(text, module, roots)
        .into_iter()
        .filter(|r| rank(r.to).is_some_and(|to| to as isize > mine))
        .collect()
}

/// Every layer the code of one file names (comments and test modules
/// left out), with its line.
fn references(text: &str, module: &[&str], roots: &HashMap<String, usize>) -> Vec<Upward> {
    let mut found = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let code = line.trim_start();
        if code == "#[cfg(test)]" {
            // Skip the test module up to its closing brace at its indent.
            let indent = &line[..line.len() - code.len()];
            let next = lines.peek().map(|(_, l)| l.trim_start());
            if next.is_some_and(|l| l.contains("mod ") && l.ends_with('{')) {
                let close = format!("{indent}}}");
                for (_, l) in lines.by_ref() {
                    if l == close {
                        break;
                    }
                }
            }
            continue;
        }
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        let mut targets = Vec::new();
        named_layers(code, roots, &mut targets);
        escapes(code, module, &mut targets);
        for to in targets {
            found.push(Upward {
                line: i + 1,
                to: LAYERS[to],
                text: code.trim().to_owned(),
            });
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            if !path.ends_with("macros") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_layer_names_a_higher_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let roots = reexports(&std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs"));
    assert!(roots.contains_key("Client"), "lib.rs re-exports were read");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut failures = Vec::new();
    let mut edges = BTreeSet::new();
    for path in files {
        let relative = path.strip_prefix(&src).expect("under src/");
        if relative == Path::new("lib.rs") {
            continue;
        }
        let parts: Vec<&str> = relative
            .iter()
            .map(|p| p.to_str().expect("UTF-8 path"))
            .collect();
        let layer = if parts.len() > 1 {
            let layer = rank(parts[0]);
            assert!(
                layer.is_some(),
                "{}: a folder of src/ that is not a layer ({LAYERS:?})",
                relative.display()
            );
            layer
        } else {
            None
        };
        let mut module: Vec<&str> = parts.iter().map(|p| p.trim_end_matches(".rs")).collect();
        if module.last() == Some(&"mod") {
            module.pop();
        }
        let text = std::fs::read_to_string(&path).expect("a source file");
        if let Some(from) = layer {
            let named = references(&text, &module, &roots);
            let to = named.iter().filter_map(|r| rank(r.to));
            edges.extend(to.filter(|&t| t != from).map(|t| (from, t)));
        }
        for up in check(&text, layer, &module, &roots) {
            failures.push(format!(
                "src/{}:{}: names the {} layer from {}: {}",
                relative.display(),
                up.line,
                up.to,
                layer.map_or("beside lib.rs", |l| LAYERS[l]),
                up.text
            ));
        }
    }
    // Every edge points down, so the layers form no cycle: printed for the
    // record (`cargo test --test layers -- --nocapture`).
    for (from, to) in &edges {
        println!("{} -> {}", LAYERS[*from], LAYERS[*to]);
        assert!(
            from > to || !failures.is_empty(),
            "an upward edge not reported"
        );
    }
    assert!(
        failures.is_empty(),
        "{} reference(s) point up a layer (bottom to top: {}):\n{}",
        failures.len(),
        LAYERS.join(" → "),
        failures.join("\n")
    );
}

#[test]
fn an_upward_reference_is_flagged_with_its_line() {
    let roots = reexports("pub use futures::client::{Client, ClientStats};\npub use run::config;");
    let sample = "\
//! Doc links are fine: [`Client`](crate::Client).
use crate::build::data::Data;
use crate::run::config::Config;
fn f() { let _ = crate::Client::new(); }
use crate::{Error, ClientStats};
fn g() { super::super::futures::x(); }
#[cfg(test)]
mod tests {
    use crate::futures::client::Client;
}
";
    let found = check(sample, Some(0), &["build", "delayed"], &roots);
    let lines: Vec<(usize, &str)> = found.iter().map(|u| (u.line, u.to)).collect();
    assert_eq!(
        lines,
        [(3, "run"), (4, "futures"), (5, "futures"), (6, "futures")]
    );
    assert!(check(sample, Some(3), &["futures", "x"], &roots).is_empty());
    assert!(check("use crate::run::config::Config;", Some(2), &["run"], &roots).is_empty());
    // A macro's `$crate::` expands in the user's crate.
    assert!(check("$crate::futures::x!()", Some(0), &["build"], &roots).is_empty());
}
