//! The model repository on disk: `models/<name>/model.onnx` + `models/<name>/model.yaml`.
//! Scanning checks everything that can be checked without running a model, so
//! `sluice check` and the server report the same errors.

pub mod model_yaml;
pub mod onnx;

use model_yaml::ModelYaml;
use onnx::{OnnxSignature, TensorInfo};
use std::path::{Path, PathBuf};

/// A model as described on disk, validated but not loaded.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub dir: PathBuf,
    pub onnx_path: PathBuf,
    pub config: ModelYaml,
    /// Inputs and outputs from the ONNX file with the YAML's dim overrides applied.
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub metadata: Vec<(String, String)>,
}

impl ModelSpec {
    /// What a pipeline node sees of the model.
    pub fn signature(&self) -> crate::pipeline::ModelSig {
        crate::pipeline::ModelSig {
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            max_batch_size: self.config.max_batch_size,
            metadata: self.metadata.clone(),
        }
    }
}

/// One entry of the repository: a spec, or why it cannot be served.
pub type Scanned = (String, Result<ModelSpec, String>);

/// Lists `dir`'s model folders (sorted by name) and checks each.
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
            let spec = read_spec(&dir.join(&name), &name);
            (name, spec)
        })
        .collect())
}

/// Reads and validates one model folder.
pub fn read_spec(dir: &Path, name: &str) -> Result<ModelSpec, String> {
    let yaml_path = dir.join("model.yaml");
    let onnx_path = dir.join("model.onnx");
    let config = match std::fs::read_to_string(&yaml_path) {
        Ok(text) => ModelYaml::parse(&yaml_path, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModelYaml::parse(&yaml_path, "")?,
        Err(e) => return Err(format!("{}: {e}", yaml_path.display())),
    };
    let bytes = std::fs::read(&onnx_path).map_err(|e| format!("{}: {e}", onnx_path.display()))?;
    let sig = onnx::read_signature(&bytes).map_err(|e| format!("{}: {e}", onnx_path.display()))?;
    let (inputs, outputs) =
        apply_overrides(&config, sig.clone()).map_err(|e| format!("{}: {e}", yaml_path.display()))?;
    check_batch_dims(&config, &inputs, &outputs).map_err(|e| format!("{}: {e}", yaml_path.display()))?;
    check_warmup(&config, &inputs).map_err(|e| format!("{}: {e}", yaml_path.display()))?;
    Ok(ModelSpec {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        onnx_path,
        config,
        inputs,
        outputs,
        metadata: sig.metadata,
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
