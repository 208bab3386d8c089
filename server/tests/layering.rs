//! The dependency direction of docs/ARCHITECTURE.md, checked on the sources: a module
//! may use modules below it, never one above or beside it, and the leaves use only
//! leaves. Test modules (`#[cfg(test)]`) are left out: a test may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules from the top down; a module may use those after it. (`fuzzing`
/// only hands bytes to the parsers of the layers below.)
const LAYERS: &[&str] =
    &["fuzzing", "server", "api", "housekeeping", "engine", "pipeline", "model", "sched", "backend", "repository"];
/// Used by anything, using only each other.
const LEAVES: &[&str] = &["request", "error", "telemetry", "rt", "onnx", "tls"];

fn rank(module: &str) -> Option<usize> {
    match LAYERS.iter().position(|m| *m == module) {
        Some(i) => Some(LAYERS.len() - i),
        None => LEAVES.contains(&module).then_some(0),
    }
}

/// Why `from` may not use `to`, if it may not.
fn violation(from: &str, to: &str) -> Option<String> {
    if from == to {
        return None;
    }
    match (rank(from), rank(to)) {
        (_, None) => Some(format!("'{to}' is in no layer: add it to LAYERS or LEAVES")),
        (None, _) => Some(format!("'{from}' is in no layer: add it to LAYERS or LEAVES")),
        (Some(0), Some(0)) => None,
        (Some(a), Some(b)) if a > b => None,
        _ => Some(format!("'{from}' uses '{to}', which is above it or beside it")),
    }
}

/// The source without comments and without `#[cfg(test)]` items.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[cfg(test)]") {
            // Skip the item that follows: up to its matching closing brace, or a `;`.
            let mut depth = 0i32;
            let mut opened = false;
            for l in lines.by_ref() {
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                opened |= l.contains('{');
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level modules a file's code names through `crate::` (a glob, `crate::*`, is
/// named "*", which no layer allows). `super::` is checked apart, in `uses_of`.
fn used_modules(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        // `use crate::{a, b::{c, d}}` names a and b: the group's top-level items.
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => top_level_items(group),
            None => vec![rest],
        };
        for n in names {
            let n = n.trim();
            let end = n.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(n.len());
            match (end, n.starts_with('*')) {
                (0, true) => {
                    used.insert("*".to_string());
                }
                (0, false) => {}
                _ => {
                    used.insert(n[..end].to_string());
                }
            }
        }
    }
    used
}

/// The comma-separated items of a `{...}` group (its opening brace already taken), each
/// with its own nested groups, up to the group's closing brace.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut depth, mut from, mut items) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[from..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[from..]);
    items
}

fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a path").as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every file's uses of other top-level modules: (module, file) -> used modules.
fn edges() -> BTreeMap<(String, String), BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = BTreeMap::new();
    for f in files {
        let module = module_of(&src, &f);
        if module == "lib" {
            continue; // the crate root re-exports; it is no layer
        }
        let code = production_code(&std::fs::read_to_string(&f).unwrap());
        let rel = f.strip_prefix(&src).unwrap().display().to_string();
        let mut used = used_modules(&code);
        // In a file at the crate's top, `super::` is `crate::`: nothing may hide there.
        if !rel.contains('/') && code.contains("super::") {
            used.insert("super (use crate:: instead)".to_string());
        }
        edges.insert((module, rel), used);
    }
    edges
}

#[test]
fn modules_depend_one_way() {
    let edges = edges();
    assert!(edges.len() > 20 && edges.keys().any(|(m, _)| m == "engine"), "the sources were not found");
    let mut problems = Vec::new();
    for ((module, file), used) in edges {
        for to in &used {
            if let Some(why) = violation(&module, to) {
                problems.push(format!("src/{file}: {why}"));
            }
        }
    }
    assert!(problems.is_empty(), "dependencies against the layering:\n{}", problems.join("\n"));
}

#[test]
fn the_checker_catches_a_wrong_way_import() {
    let code = production_code(
        "//! uses crate::engine in a comment only\nuse crate::{model::LoadedModel, engine::Engine};\n\
         fn f() { crate::error::panic_message(todo()) }\n#[cfg(test)]\nmod tests {\n    use crate::server;\n}\n",
    );
    let used = used_modules(&code);
    assert_eq!(used, ["engine", "error", "model"].map(String::from).into());
    let nested = used_modules("use crate::{a::{b, c}, engine::{self, X}};\nuse crate::*;");
    assert_eq!(nested, ["*", "a", "engine"].map(String::from).into());
    assert!(violation("model", "*").is_some());
    assert!(violation("pipeline", "engine").is_some());
    assert!(violation("pipeline", "model").is_none());
    assert!(violation("telemetry", "engine").is_some());
    assert!(violation("telemetry", "error").is_none());
    assert!(violation("api", "nowhere").is_some());
}

/// Prints the module graph (`cargo test -p sluice-server --test layering -- --nocapture
/// module_graph`), the one drawn in docs/ARCHITECTURE.md.
#[test]
fn module_graph() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((module, _), used) in edges() {
        graph.entry(module.clone()).or_default().extend(used.into_iter().filter(|u| *u != module));
    }
    for (m, used) in &graph {
        println!("{m:>12} -> {}", used.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    assert!(graph.contains_key("engine"));
}
