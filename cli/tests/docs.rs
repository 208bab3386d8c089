//! The docs say what the code does: every op of the registry has a row in
//! docs/pipelines.md naming its ports and params (and no row names an op that does not
//! exist), `sluice ops` prints the same, and every `sluice serve` flag is in the README.

use sluice_server::OpRegistry;
use std::collections::BTreeSet;
use std::process::Command;

fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The op table's rows: op name -> the whole row.
fn op_rows(doc: &str) -> Vec<(String, String)> {
    let table = doc.split("## Ops").nth(1).expect("docs/pipelines.md has an `## Ops` section");
    table
        .lines()
        .skip_while(|l| !l.starts_with("| op "))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let name = l.split('|').nth(1).unwrap_or("").trim().trim_matches('`').to_string();
            (name, l.to_string())
        })
        .collect()
}

#[test]
fn the_op_table_in_the_docs_matches_the_registry() {
    let doc = repo_file("docs/pipelines.md");
    let rows = op_rows(&doc);
    let registry = OpRegistry::builtin();
    let documented: BTreeSet<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    let registered: BTreeSet<&str> = registry.iter().map(|s| s.name).collect();
    assert_eq!(documented, registered, "ops in docs/pipelines.md vs the registry");
    let mut problems = Vec::new();
    for spec in registry.iter() {
        let row = &rows.iter().find(|(n, _)| n == spec.name).expect("checked above").1;
        let (inputs, outputs) = spec.ports().unwrap();
        for port in inputs.iter().chain(&outputs) {
            if !row.contains(&format!("`{}`", port.name)) {
                problems.push(format!("{}: port `{}` is not named", spec.name, port.name));
            }
        }
        for p in spec.params {
            if !row.contains(&format!("`{}", p.name)) {
                problems.push(format!("{}: param `{}` is not named", spec.name, p.name));
            }
        }
    }
    assert!(problems.is_empty(), "docs/pipelines.md is out of date:\n{}", problems.join("\n"));
}

#[test]
fn sluice_ops_lists_every_op_with_its_ports_and_params() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("ops").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for spec in OpRegistry::builtin().iter() {
        assert!(text.contains(&format!("{}: {}", spec.name, spec.summary)), "{}:\n{text}", spec.name);
        for p in spec.params {
            assert!(text.contains(&format!("param {} (default {})", p.name, p.default)), "{}:\n{text}", p.name);
        }
    }
    assert!(text.contains("resize: image -> image"), "{text}");
    assert!(text.contains("  inputs:  image (image)"), "{text}");
}

#[test]
fn every_serve_flag_is_in_the_readme() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let readme = repo_file("README.md");
    let flags: BTreeSet<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|f| *f != "--help" && *f != "--version")
        .collect();
    assert!(flags.contains("--models"), "{help}");
    // Flags the README names in code spans: "`--pool name=...`", "`--tls-cert FILE".
    let named: BTreeSet<&str> = readme
        .split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|span| span.split([' ', '/', '=']))
        .filter(|w| w.starts_with("--"))
        .collect();
    let missing: Vec<&&str> = flags.iter().filter(|f| !named.contains(**f)).collect();
    assert!(missing.is_empty(), "README.md does not mention {missing:?}");
}
