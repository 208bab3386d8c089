//! The `Op` trait every CPU operation implements, and the registry that builds ops from
//! their name and parameters (as written in a pipeline file).

use crate::value::{Value, ValueType};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Why an op failed on one input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    /// The input data is bad (a corrupt image, a tensor of the wrong shape): the caller's fault.
    #[error("{0}")]
    Invalid(String),
    /// The input is well formed but over a size limit (pixels per image, dims): the
    /// message names the limit and the flag or key that raises it.
    #[error("{0}")]
    TooLarge(String),
    /// The server is short of a shared resource (the image memory budget) right now:
    /// the same request may succeed when others finish.
    #[error("{0}")]
    Busy(String),
    /// Something the input cannot explain.
    #[error("{0}")]
    Internal(String),
}

pub type OpResult = Result<Vec<Value>, OpError>;

/// A named input or output of an op with the type it takes or gives.
#[derive(Debug, Clone)]
pub struct Port {
    pub name: &'static str,
    pub ty: ValueType,
}

pub fn port(name: &'static str, ty: ValueType) -> Port {
    Port { name, ty }
}

/// A CPU operation: named, typed inputs to named, typed outputs. Ops are built once per
/// pipeline node and then shared by every request, so `run` takes `&self`.
pub trait Op: Send + Sync + 'static {
    fn inputs(&self) -> Vec<Port>;
    fn outputs(&self) -> Vec<Port>;

    /// Output types given the (already accepted) input types, for checking the nodes
    /// downstream. An op may keep what it learns (the element shape a gather produces
    /// for an empty list). The default is the declared output ports.
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        let _ = inputs;
        Ok(self.outputs().into_iter().map(|p| p.ty).collect())
    }

    /// Runs on one set of inputs, in the order of `inputs()`.
    fn run(&self, inputs: &[Value]) -> OpResult;
}

/// Looks up a model's ONNX metadata value: (model, key) -> value.
pub type MetadataLookup<'a> = &'a dyn Fn(&str, &str) -> Option<String>;

/// What the registry passes to an op's constructor.
/// The largest file an op parameter may name.
pub const MAX_PARAM_FILE_BYTES: u64 = 16 << 20;

pub struct BuildContext<'a> {
    /// Parameters as written in the pipeline file (null when none).
    pub params: serde_json::Value,
    /// Folder of the pipeline file: relative paths in parameters (label files) resolve here.
    pub base_dir: &'a Path,
    /// The repository's model metadata, for ops configured from a model (a recogniser's
    /// character list); `None` where no repository is at hand.
    pub metadata: Option<MetadataLookup<'a>>,
}

impl<'a> BuildContext<'a> {
    pub fn new(params: serde_json::Value, base_dir: &'a Path) -> BuildContext<'a> {
        BuildContext { params, base_dir, metadata: None }
    }

    pub fn with_metadata(mut self, lookup: MetadataLookup<'a>) -> BuildContext<'a> {
        self.metadata = Some(lookup);
        self
    }

    /// A model's metadata value, or an error saying which is missing.
    pub fn model_metadata(&self, model: &str, key: &str) -> Result<String, String> {
        let lookup = self.metadata.ok_or_else(|| format!("no model repository to read '{model}' metadata from"))?;
        lookup(model, key)
            .ok_or_else(|| format!("model '{model}' has no metadata '{key}' (or is not in the repository)"))
    }

    /// Reads a text file a parameter names (labels), relative to the pipeline's folder.
    /// It must be a regular file inside that folder (no absolute paths, no `..` or
    /// symlinks out of it) of at most [`MAX_PARAM_FILE_BYTES`]: a pipeline file must
    /// not turn the server into a reader of other files or of endless ones.
    pub fn read_text(&self, name: &str) -> Result<String, String> {
        use std::io::Read;
        let base = self.base_dir.canonicalize().map_err(|e| format!("{}: {e}", self.base_dir.display()))?;
        let joined = self.base_dir.join(name);
        let path = joined.canonicalize().map_err(|e| format!("{}: {e}", joined.display()))?;
        if !path.starts_with(&base) {
            return Err(format!("{name}: files a pipeline names must be inside its folder {}", base.display()));
        }
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", joined.display()))?;
        let meta = file.metadata().map_err(|e| format!("{}: {e}", joined.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", joined.display()));
        }
        let mut text = String::new();
        file.take(MAX_PARAM_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", joined.display()))?;
        if text.len() as u64 > MAX_PARAM_FILE_BYTES {
            return Err(format!("{}: larger than {} MiB", joined.display(), MAX_PARAM_FILE_BYTES >> 20));
        }
        Ok(text)
    }

    /// Decodes the parameters into an op's typed parameter struct.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, String> {
        let v = match &self.params {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v => v.clone(),
        };
        serde_json::from_value(v).map_err(|e| format!("bad params: {e}"))
    }
}

/// Builds an op from its parameters.
pub type Builder = fn(&BuildContext) -> Result<Box<dyn Op>, String>;

/// Parameters of ops that take none: any given is an error.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParams {}

/// `#[serde(default = "crate::op::yes")]`: a flag that is on unless turned off.
pub(crate) fn yes() -> bool {
    true
}

/// One parameter of an op, as `sluice ops` and the docs list it.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    /// The default as written in a pipeline file, or "required".
    pub default: &'static str,
    pub help: &'static str,
}

/// Shorthand for the registry tables.
pub const fn param(name: &'static str, default: &'static str, help: &'static str) -> Param {
    Param { name, default, help }
}

/// Everything the registry knows of one op.
#[derive(Clone)]
pub struct OpSpec {
    pub name: &'static str,
    pub summary: &'static str,
    pub params: &'static [Param],
    /// Params (JSON) it builds with, to show its ports: some ports depend on params.
    pub example: &'static str,
    pub build: Builder,
}

impl OpSpec {
    /// An op with no documented params (an embedding program's own ops).
    pub fn new(name: &'static str, summary: &'static str, build: Builder) -> OpSpec {
        OpSpec { name, summary, params: &[], example: "{}", build }
    }

    /// The op built with its example params: its inputs and outputs.
    pub fn ports(&self) -> Result<(Vec<Port>, Vec<Port>), String> {
        let params = serde_json::from_str(self.example).map_err(|e| format!("example params: {e}"))?;
        // Ports never depend on a model's metadata values: any will do.
        let any_metadata = |_: &str, _: &str| Some(String::from("a"));
        let op = (self.build)(&BuildContext::new(params, Path::new(".")).with_metadata(&any_metadata))?;
        Ok((op.inputs(), op.outputs()))
    }
}

/// The ops a pipeline can name: a value, so every server (and every test) has its own
/// set, and an embedding program adds its ops to the set it passes to its server.
#[derive(Clone, Default)]
pub struct OpRegistry {
    /// In registration order: families in turn, built-in before added.
    ops: Vec<OpSpec>,
}

impl std::fmt::Debug for OpRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ops.iter().map(|s| s.name)).finish()
    }
}

impl OpRegistry {
    pub fn empty() -> OpRegistry {
        OpRegistry::default()
    }

    /// Every op sluice ships.
    pub fn builtin() -> OpRegistry {
        let mut r = OpRegistry::empty();
        for family in
            [crate::image_ops::OPS, crate::tensor_ops::OPS, crate::detect::OPS, crate::filter::OPS, crate::ocr::OPS]
        {
            for spec in family {
                r.ops.push(spec.clone());
            }
        }
        r
    }

    /// Adds an op; names already taken are refused.
    pub fn add(&mut self, spec: OpSpec) -> Result<(), String> {
        if self.get(spec.name).is_some() {
            return Err(format!("an op named '{}' already exists", spec.name));
        }
        self.ops.push(spec);
        Ok(())
    }

    /// [`add`](Self::add), by value.
    pub fn with(mut self, spec: OpSpec) -> Result<OpRegistry, String> {
        self.add(spec)?;
        Ok(self)
    }

    pub fn get(&self, name: &str) -> Option<&OpSpec> {
        self.ops.iter().find(|s| s.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &OpSpec> {
        self.ops.iter()
    }

    /// Builds the op `name` with its parameters.
    pub fn build(&self, name: &str, ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
        match self.get(name) {
            Some(spec) => (spec.build)(ctx),
            None => {
                let names: Vec<&str> = self.ops.iter().map(|s| s.name).collect();
                Err(format!("unknown op '{name}'; known ops: {}", names.join(", ")))
            }
        }
    }
}

/// The `i`th input, picked out as the op needs it (`Value::as_tensor`,
/// `Value::as_image`, ...); `what` names the expected kind in the error. The executor
/// hands an op inputs of the kinds its ports declare, so a mismatch is an
/// [`OpError::Invalid`] naming both.
pub fn input<'a, T>(
    inputs: &'a [Value],
    i: usize,
    what: &str,
    pick: impl Fn(&'a Value) -> Option<T>,
) -> Result<T, OpError> {
    let v = inputs.get(i).ok_or_else(|| OpError::Internal(format!("missing input {i}")))?;
    pick(v).ok_or_else(|| OpError::Invalid(format!("expected {what}, got {}", v.kind())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_op_builds_from_its_example() {
        for spec in OpRegistry::builtin().iter() {
            let (inputs, outputs) = spec.ports().unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            assert!(!inputs.is_empty() && !outputs.is_empty(), "{}", spec.name);
        }
    }

    /// The params the registry lists are exactly the fields the op's params struct
    /// accepts: serde names the accepted fields when it meets an unknown one.
    #[test]
    fn listed_params_are_the_ones_the_op_accepts() {
        for spec in OpRegistry::builtin().iter() {
            let probe = serde_json::json!({"no_such_param": 0});
            let err = match (spec.build)(&BuildContext::new(probe, Path::new("."))) {
                Ok(_) => panic!("{}: an unknown param was accepted", spec.name),
                Err(e) => e,
            };
            // "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`", or
            // "there are no fields".
            let expected = err.split_once("expected ").map_or("", |(_, rest)| rest);
            let accepted: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            assert!(!accepted.is_empty() || err.contains("there are no fields"), "{}: {err}", spec.name);
            let mut listed: Vec<&str> = spec.params.iter().map(|p| p.name).collect();
            let mut accepted = accepted;
            listed.sort_unstable();
            accepted.sort_unstable();
            assert_eq!(listed, accepted, "{}: {err}", spec.name);
        }
    }

    #[test]
    fn names_are_unique_and_added_ops_cannot_take_one() {
        let r = OpRegistry::builtin();
        let mut names: Vec<&str> = r.iter().map(|s| s.name).collect();
        let n = names.len();
        names.dedup();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        let taken = OpSpec::new("resize", "again", |_| Err("never built".into()));
        assert!(r.clone().with(taken).is_err());
        let err = r.build("nope", &BuildContext::new(serde_json::Value::Null, Path::new("."))).err().unwrap();
        assert!(err.starts_with("unknown op 'nope'; known ops: decode_image, resize"), "{err}");
    }
}
