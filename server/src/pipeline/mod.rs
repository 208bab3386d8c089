//! Pipelines: YAML files compiled into checked DAGs of CPU ops and models, served as
//! models of the v2 protocol.

pub mod catalog;
pub mod compile;
pub mod cond;
pub mod exec;
pub mod params;
pub mod schema;

pub use compile::{compile, Catalog, CompileError, ModelSig, Plan};

use std::path::{Path, PathBuf};

/// The pipeline files of `dir` (`<name>.yaml`, sorted by name). A missing folder has none.
pub fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read pipeline folder {}: {e}", dir.display())),
    };
    let mut files: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")))
        .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p)))
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    files.sort();
    Ok(files)
}

/// The file of pipeline `name` in `dir` (`<name>.yaml` or `.yml`), if there is one.
pub fn file_of(dir: &Path, name: &str) -> Option<PathBuf> {
    ["yaml", "yml"].iter().map(|ext| dir.join(format!("{name}.{ext}"))).find(|p| p.is_file())
}
