//! A [`Catalog`] over a repository read from disk without loading any model: what
//! `sluice check` and `sluice graph` compile pipelines against. (The server compiles
//! against the models it has loaded; see `engine::reload`.)

use super::compile::{Catalog, ModelSig};
use crate::repository::{self, ModelSpec};
use sluice_ops::OpRegistry;
use std::path::Path;

/// One version of a model read and checked: its spec, or why it cannot be served.
pub type ScannedVersion = (u64, Result<ModelSpec, String>);

/// Every model of a repository with every served version read and checked.
pub struct ScannedRepo {
    /// By name, sorted: the versions, or why the model folder itself is unusable.
    pub models: Vec<(String, Result<Vec<ScannedVersion>, String>)>,
    pools: Vec<String>,
    ops: OpRegistry,
}

impl ScannedRepo {
    /// Reads `models_dir`; `pools` are the CPU pools pipelines may name.
    pub fn scan(models_dir: &Path, pools: Vec<String>, ops: OpRegistry) -> Result<ScannedRepo, String> {
        let models = repository::scan(models_dir)?
            .into_iter()
            .map(|(name, dir)| {
                let versions = dir.map(|dir| {
                    dir.versions
                        .iter()
                        .map(|(v, onnx)| (*v, onnx.clone().and_then(|path| repository::read_spec(&dir, *v, &path))))
                        .collect()
                });
                (name, versions)
            })
            .collect();
        Ok(ScannedRepo { models, pools, ops })
    }
}

impl Catalog for ScannedRepo {
    /// The named version, or the newest that reads without error (the newest of all if
    /// none does, for its error).
    fn model(&self, name: &str, version: Option<u64>) -> Option<Result<ModelSig, String>> {
        let (_, versions) = self.models.iter().find(|(n, _)| n == name)?;
        Some(versions.as_ref().map_err(Clone::clone).and_then(|versions| {
            let found = match version {
                Some(v) => versions.iter().find(|(n, _)| *n == v),
                None => versions.iter().rev().find(|(_, s)| s.is_ok()).or(versions.last()),
            };
            match found {
                Some((_, spec)) => spec.as_ref().map(ModelSig::from).map_err(Clone::clone),
                None => Err(format!("version {} is not served", version.unwrap_or(0))),
            }
        }))
    }
    fn pools(&self) -> Vec<String> {
        self.pools.clone()
    }
    fn ops(&self) -> &OpRegistry {
        &self.ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_without_a_readable_version_is_reported_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("m")).unwrap();
        std::fs::write(dir.path().join("m/model.onnx"), b"not onnx").unwrap();
        let repo = ScannedRepo::scan(dir.path(), vec!["default".into()], OpRegistry::builtin()).unwrap();
        let err = repo.model("m", None).unwrap().unwrap_err();
        assert!(err.contains("not a valid ONNX file"), "{err}");
        assert!(repo.model("m", Some(2)).unwrap().unwrap_err().contains("version 2 is not served"));
        assert!(repo.model("other", None).is_none());
        assert_eq!(repo.pools(), vec!["default".to_string()]);
    }
}
