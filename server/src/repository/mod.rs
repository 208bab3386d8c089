//! The model repository on disk. A model is a folder `models/<name>/` with its
//! `model.yaml` and either one `model.onnx` (served as version 1) or numbered version
//! folders `<n>/model.onnx`, of which the model.yaml's `version_policy` picks the served
//! ones. Scanning checks everything that can be checked without running a model, so
//! `sluice check` and the server report the same errors.

pub mod model_yaml;
pub mod remote;

use crate::onnx::signature::{OnnxSignature, TensorInfo};
use model_yaml::ModelYaml;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A model version as described on disk, validated but not loaded.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    pub dir: PathBuf,
    pub onnx_path: PathBuf,
    pub config: ModelYaml,
    /// Inputs and outputs from the ONNX file with the YAML's dim overrides applied.
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub metadata: Vec<(String, String)>,
    /// What the files looked like when read: a reload loads the version again only
    /// when this changes.
    pub fingerprint: Fingerprint,
}

/// Identifies one state of a model version's files: the model.yaml text and the ONNX
/// file's size, modification time and inode (a file replaced by rename has a new inode
/// even when the rest matches). Cheap to take, so every reload checks every model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    yaml: String,
    onnx: Option<(u64, SystemTime, u64)>,
}

impl Fingerprint {
    pub fn of(yaml: &str, onnx: &Path) -> Fingerprint {
        let onnx = std::fs::metadata(onnx).ok().map(|m| {
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let ino = 0;
            (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH), ino)
        });
        Fingerprint { yaml: yaml.to_string(), onnx }
    }
}

/// A model folder: its configuration and the versions its policy serves.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub name: String,
    pub dir: PathBuf,
    pub yaml_path: PathBuf,
    pub yaml_text: String,
    pub config: ModelYaml,
    /// Served versions, ascending, each with its ONNX file or why it is missing.
    pub versions: Vec<(u64, Result<PathBuf, String>)>,
}

impl ModelDir {
    pub fn fingerprint(&self, onnx: &Path) -> Fingerprint {
        Fingerprint::of(&self.yaml_text, onnx)
    }
}

/// One entry of the repository: a model folder, or why it cannot be served.
pub type Scanned = (String, Result<ModelDir, String>);

/// Lists `dir`'s model folders (sorted by name) and reads each one's configuration.
pub fn scan(dir: &Path) -> Result<Vec<Scanned>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read model repository {}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| {
            let m = read_dir(&dir.join(&name), &name);
            (name, m)
        })
        .collect())
}

/// ONNX files are protobuf messages, which cannot exceed 2 GiB (weights beyond that live
/// in external data files, which ONNX Runtime reads itself).
pub const MAX_ONNX_BYTES: u64 = 2 << 30;

/// Reads a model.onnx of at most [`MAX_ONNX_BYTES`].
pub fn read_onnx(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > MAX_ONNX_BYTES {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file of at most 2 GiB"));
    }
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(meta.len() as usize).map_err(|_| Error::new(ErrorKind::OutOfMemory, "no memory"))?;
    file.take(MAX_ONNX_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_ONNX_BYTES {
        return Err(Error::new(ErrorKind::InvalidInput, "larger than 2 GiB"));
    }
    Ok(bytes)
}

/// The largest model.yaml or pipeline file read.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// The deepest nesting of lists and maps a model.yaml or pipeline file may have.
pub const MAX_NESTING: usize = 64;

/// Reads a model.yaml or pipeline file: a regular file of at most [`MAX_CONFIG_BYTES`].
pub fn read_config(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::new(ErrorKind::InvalidInput, format!("larger than {} MiB", MAX_CONFIG_BYTES >> 20)));
    }
    Ok(text)
}

/// Refuses YAML nested deeper than [`MAX_NESTING`] before the parser sees it: the
/// parser's time grows with the square of the depth, and the deep forms are cheap to
/// write: flow brackets (`[[[`) and compact block entries on one line (`- - -`, `? ? ?`).
/// Brackets are counted across lines (flow collections span lines), outside comments
/// (`#` at the start or after a space); quotes are not tracked, so brackets inside
/// strings count too (real files never hold 64 unclosed ones). Deep indentation needs
/// file size quadratic in the depth, which the size cap bounds. Returns the 1-based
/// line where the limit is crossed.
pub fn check_nesting(text: &str) -> Result<(), (usize, String)> {
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let too_deep = |depth: usize| (n + 1, format!("nested {depth} levels deep; at most {MAX_NESTING}"));
        let mut rest = line.trim_start_matches([' ', '\t']);
        let mut compact = 0;
        while let Some(r) = ["- ", "? "].iter().find_map(|p| rest.strip_prefix(p)) {
            compact += 1;
            rest = r.trim_start_matches([' ', '\t']);
        }
        if flow + compact > MAX_NESTING {
            return Err(too_deep(flow + compact));
        }
        let mut prev_blank = true;
        for c in rest.chars() {
            match c {
                '#' if prev_blank => break,
                '[' | '{' => {
                    flow += 1;
                    if flow + compact > MAX_NESTING {
                        return Err(too_deep(flow + compact));
                    }
                }
                ']' | '}' => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev_blank = c == ' ' || c == '\t';
        }
    }
    Ok(())
}

/// Reads one model folder's model.yaml and finds its versions.
pub fn read_dir(dir: &Path, name: &str) -> Result<ModelDir, String> {
    let yaml_path = dir.join("model.yaml");
    let yaml_text = match read_config(&yaml_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", yaml_path.display())),
    };
    let config = ModelYaml::parse(&yaml_path, &yaml_text)?;
    if config.backend == model_yaml::BackendKind::Remote {
        // Served elsewhere: one version, described by the servers when it loads.
        let versions = vec![(1, Ok(yaml_path.clone()))];
        return Ok(ModelDir { name: name.to_string(), dir: dir.to_path_buf(), yaml_path, yaml_text, config, versions });
    }
    let flat = dir.join("model.onnx");
    let mut numbered: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.onnx").is_file())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbered.sort_unstable();
    let versions = match (flat.is_file(), numbered.is_empty()) {
        (true, true) => vec![(1, Ok(flat))],
        (true, false) => {
            return Err(format!(
                "{}: has both model.onnx and version folders ({numbered:?}); keep one layout",
                dir.display()
            ))
        }
        (false, true) => {
            return Err(format!("{}: no model.onnx and no version folders (<n>/model.onnx)", dir.display()))
        }
        (false, false) => {
            let (served, missing) = config.version_policy.select(&numbered);
            let mut v: Vec<(u64, Result<PathBuf, String>)> =
                served.into_iter().map(|v| (v, Ok(dir.join(v.to_string()).join("model.onnx")))).collect();
            v.extend(missing.into_iter().map(|m| {
                (
                    m,
                    Err(format!(
                        "{}: version_policy names version {m}, which has no {m}/model.onnx",
                        yaml_path.display()
                    )),
                )
            }));
            v.sort_by_key(|(v, _)| *v);
            v
        }
    };
    Ok(ModelDir { name: name.to_string(), dir: dir.to_path_buf(), yaml_path, yaml_text, config, versions })
}

/// Reads and validates one version's ONNX file against the folder's configuration.
pub fn read_spec(m: &ModelDir, version: u64, onnx_path: &Path) -> Result<ModelSpec, String> {
    // Taken before reading, so a file replaced while being read shows as changed later.
    let fingerprint = m.fingerprint(onnx_path);
    let yaml_path = &m.yaml_path;
    let mut config = m.config.clone();
    let at_yaml = |e: String| format!("{}: {e}", yaml_path.display());
    let mut sig = match &config.remote {
        Some(r) => {
            let sig = remote::fetch_signature(&m.name, r).map_err(at_yaml)?;
            tracing::info!(model = %m.name, from = %sig.from, "remote model described by its endpoint");
            // The batcher here forms the batches the remote runs: at most its size.
            // A remote that says 0 may still take a variable first dimension (a Triton
            // ONNX model without batching): the dims are checked below.
            match (config.max_batch_size, sig.max_batch_size) {
                (0, there) => config.max_batch_size = there,
                (here, there) if there > 0 && here > there => {
                    return Err(at_yaml(format!("max_batch_size {here}, but the remote model takes at most {there}")))
                }
                _ => {}
            }
            config.check().map_err(at_yaml)?;
            OnnxSignature { inputs: sig.inputs, outputs: sig.outputs, metadata: vec![] }
        }
        None => {
            let bytes = read_onnx(onnx_path).map_err(|e| format!("{}: {e}", onnx_path.display()))?;
            crate::onnx::signature::read_signature(&bytes).map_err(|e| format!("{}: {e}", onnx_path.display()))?
        }
    };
    let metadata = std::mem::take(&mut sig.metadata);
    let (inputs, outputs) = apply_overrides(&config, sig).map_err(at_yaml)?;
    check_batch_dims(&config, &inputs, &outputs).map_err(at_yaml)?;
    check_warmup(&config, &inputs).map_err(at_yaml)?;
    if config.remote.is_none() {
        check_profile(&config, &inputs).map_err(at_yaml)?;
    }
    Ok(ModelSpec {
        name: m.name.clone(),
        version,
        dir: m.dir.clone(),
        onnx_path: onnx_path.to_path_buf(),
        config,
        inputs,
        outputs,
        metadata,
        fingerprint,
    })
}

fn apply_overrides(cfg: &ModelYaml, sig: OnnxSignature) -> Result<(Vec<TensorInfo>, Vec<TensorInfo>), String> {
    let apply = |mut tensors: Vec<TensorInfo>, overrides: &[model_yaml::TensorOverride], what: &str| {
        for o in overrides {
            let Some(t) = tensors.iter_mut().find(|t| t.name == o.name) else {
                let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
                return Err(format!("{what} '{}' is not in the ONNX model ({what}s: {})", o.name, names.join(", ")));
            };
            if !t.dims.is_empty() && t.dims.len() != o.dims.len() {
                return Err(format!(
                    "{what} '{}': dims {:?} have rank {}, the ONNX model says rank {} ({:?})",
                    o.name,
                    o.dims,
                    o.dims.len(),
                    t.dims.len(),
                    t.dims
                ));
            }
            t.dims = o.dims.clone();
        }
        Ok(tensors)
    };
    Ok((apply(sig.inputs, &cfg.inputs, "input")?, apply(sig.outputs, &cfg.outputs, "output")?))
}

fn check_batch_dims(cfg: &ModelYaml, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Result<(), String> {
    if cfg.max_batch_size == 0 {
        return Ok(());
    }
    for (what, t) in inputs.iter().map(|t| ("input", t)).chain(outputs.iter().map(|t| ("output", t))) {
        match t.dims.first() {
            Some(-1) => {}
            Some(d) => {
                return Err(format!(
                    "max_batch_size is {} but {what} '{}' has a fixed first dimension {d}; export the model with a \
                     dynamic batch axis or set max_batch_size: 0",
                    cfg.max_batch_size, t.name
                ))
            }
            None => {
                return Err(format!(
                    "max_batch_size is {} but {what} '{}' is a scalar with no batch dimension",
                    cfg.max_batch_size, t.name
                ))
            }
        }
    }
    Ok(())
}

fn check_warmup(cfg: &ModelYaml, inputs: &[TensorInfo]) -> Result<(), String> {
    for (i, w) in cfg.warmup.iter().enumerate() {
        for (name, shape) in &w.shapes {
            let info = inputs.iter().find(|t| &t.name == name).ok_or_else(|| {
                let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
                format!("warmup[{i}]: '{name}' is not an input (inputs: {})", names.join(", "))
            })?;
            if shape.len() != info.dims.len() {
                return Err(format!(
                    "warmup[{i}]: shape {shape:?} for '{name}' has rank {}, the input has rank {}",
                    shape.len(),
                    info.dims.len()
                ));
            }
        }
    }
    Ok(())
}

/// The TensorRT profile names real inputs with their rank, and, once given, covers every
/// input with variable dims (TensorRT needs a range for each).
fn check_profile(cfg: &ModelYaml, inputs: &[TensorInfo]) -> Result<(), String> {
    let profile = &cfg.tensorrt.profile;
    if profile.is_empty() {
        return Ok(());
    }
    for (name, p) in profile {
        let info = inputs.iter().find(|t| &t.name == name).ok_or_else(|| {
            let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
            format!("tensorrt.profile: '{name}' is not an input (inputs: {})", names.join(", "))
        })?;
        if name.contains([':', ',']) {
            return Err(format!("tensorrt.profile: ONNX Runtime cannot take an input named '{name}' (':' or ',')"));
        }
        if p.min.len() != info.dims.len() {
            return Err(format!(
                "tensorrt.profile.{name}: shapes have rank {}, the input has rank {}",
                p.min.len(),
                info.dims.len()
            ));
        }
    }
    match inputs.iter().find(|t| t.dims.iter().any(|&d| d < 0) && !profile.contains_key(&t.name)) {
        Some(t) => {
            Err(format!("tensorrt.profile: input '{}' has variable dims {:?} and needs a range too", t.name, t.dims))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tensorrt_profile_must_fit_the_inputs() {
        let input = |name: &str, dims: &[i64]| TensorInfo {
            name: name.into(),
            dtype: sluice_ops::DataType::F32,
            dims: dims.to_vec(),
        };
        let inputs = [input("x", &[-1, 3, 224, 224]), input("mask", &[-1, 1])];
        let cfg = |yaml: &str| ModelYaml::parse(Path::new("m/model.yaml"), yaml).unwrap();
        let full = "tensorrt:\n  profile:\n    x: {min: [1, 3, 224, 224], opt: [8, 3, 224, 224], max: [32, 3, 224, 224]}\n    \
                    mask: {min: [1, 1], opt: [8, 1], max: [32, 1]}\n";
        assert_eq!(check_profile(&cfg(full), &inputs), Ok(()));
        assert_eq!(check_profile(&cfg(""), &inputs), Ok(()));
        for (yaml, says) in [
            ("tensorrt:\n  profile:\n    y: {min: [1], opt: [1], max: [1]}\n", "'y' is not an input"),
            ("tensorrt:\n  profile:\n    x: {min: [1, 3], opt: [1, 3], max: [1, 3]}\n", "rank 2, the input has rank 4"),
            (
                "tensorrt:\n  profile:\n    x: {min: [1, 3, 224, 224], opt: [8, 3, 224, 224], max: [32, 3, 224, 224]}\n",
                "input 'mask' has variable dims",
            ),
        ] {
            let e = check_profile(&cfg(yaml), &inputs).unwrap_err();
            assert!(e.contains(says), "{yaml}: {e}");
        }
    }

    fn folder(files: &[&str], yaml: &str) -> (tempfile::TempDir, Result<ModelDir, String>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.yaml"), yaml).unwrap();
        for f in files {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let m = read_dir(d.path(), "m");
        (d, m)
    }

    fn versions(m: &ModelDir) -> Vec<(u64, bool)> {
        m.versions.iter().map(|(v, p)| (*v, p.is_ok())).collect()
    }

    #[test]
    fn layouts_and_policies() {
        let (_d, flat) = folder(&["model.onnx"], "");
        assert_eq!(versions(&flat.unwrap()), vec![(1, true)]);
        let (_d, latest) = folder(&["1/model.onnx", "2/model.onnx", "10/model.onnx", "notes/model.onnx"], "");
        assert_eq!(versions(&latest.unwrap()), vec![(10, true)]);
        let (_d, specific) = folder(&["1/model.onnx", "3/model.onnx"], "version_policy: {specific: [1, 2]}\n");
        assert_eq!(versions(&specific.unwrap()), vec![(1, true), (2, false)]);
        let (_d, both) = folder(&["model.onnx", "2/model.onnx"], "");
        assert!(both.unwrap_err().contains("keep one layout"));
        let (_d, none) = folder(&["2/weights.bin"], "");
        assert!(none.unwrap_err().contains("no model.onnx and no version folders"));
    }

    #[test]
    fn fingerprints_change_with_the_file_or_the_yaml() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.onnx");
        std::fs::write(&p, b"one").unwrap();
        let a = Fingerprint::of("max_batch_size: 4\n", &p);
        assert_eq!(a, Fingerprint::of("max_batch_size: 4\n", &p));
        assert_ne!(a, Fingerprint::of("max_batch_size: 8\n", &p));
        let tmp = d.path().join("new");
        std::fs::write(&tmp, b"two").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_ne!(a, Fingerprint::of("max_batch_size: 4\n", &p));
    }
}
