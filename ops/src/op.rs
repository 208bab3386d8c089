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

/// Ops registered at run time by programs that embed sluice (custom ops).
static CUSTOM: std::sync::RwLock<Vec<(&str, Builder, &str)>> = std::sync::RwLock::new(Vec::new());

/// Adds a custom op under `name` for pipelines compiled from now on. Names of built-in
/// or already registered ops are refused.
pub fn register(name: &'static str, description: &'static str, build: Builder) -> Result<(), String> {
    let mut custom = CUSTOM.write().unwrap_or_else(|e| e.into_inner());
    if REGISTRY.iter().chain(custom.iter()).any(|(n, _, _)| *n == name) {
        return Err(format!("an op named '{name}' already exists"));
    }
    custom.push((name, build, description));
    Ok(())
}

/// Every op a pipeline can name, with a one-line description.
const REGISTRY: &[(&str, Builder, &str)] = &[
    ("decode_image", crate::image_ops::build_decode, "encoded JPEG/PNG bytes -> RGB image (EXIF orientation applied)"),
    ("resize", crate::image_ops::build_resize, "image -> image: stretch, letterbox, shorter_side_crop, fit_multiple"),
    ("normalize", crate::image_ops::build_normalize, "image -> FP32 tensor (NCHW/NHWC, mean/std, RGB/BGR)"),
    ("to_tensor", crate::image_ops::build_to_tensor, "image -> UINT8 tensor [H,W,3]"),
    ("rotate180", crate::image_ops::build_rotate180, "image -> image turned upside down"),
    ("crop_boxes", crate::image_ops::build_crop_boxes, "image + boxes [n,4] -> list of n crops"),
    ("crop_quads", crate::image_ops::build_crop_quads, "image + quads [n,4,2] -> list of n perspective-warped crops"),
    ("from_tensor", crate::image_ops::build_from_tensor, "UINT8 tensor [H,W,3] -> image"),
    ("softmax", crate::tensor_ops::build_softmax, "FP32 tensor -> softmax along the last axis"),
    ("topk", crate::tensor_ops::build_topk, "FP32 scores -> the k best: scores, classes, labels"),
    ("gather", crate::tensor_ops::build_gather, "list of tensors -> one tensor stacked along a new first axis"),
    ("count", crate::tensor_ops::build_count, "list -> its length as INT64 [1]"),
    ("delay", crate::tensor_ops::build_delay, "passes its input through after a fixed time (tests, benchmarks)"),
    ("detect_yolo", crate::detect::build_detect_yolo, "YOLO-style predictions -> boxes, scores, classes after NMS"),
    ("db_postprocess", crate::ocr::build_db_postprocess, "text probability map -> text quads in reading order (DB)"),
    (
        "text_line_tensor",
        crate::ocr::build_text_line_tensor,
        "text line image -> FP32 [3,48,W] for classifier/recogniser",
    ),
    ("orient180", crate::ocr::build_orient180, "image + direction probabilities -> image turned upright"),
    ("ctc_decode", crate::ocr::build_ctc_decode, "recogniser probabilities -> text and confidence (CTC greedy)"),
    ("ocr_lines", crate::ocr::build_ocr_lines, "quads + texts + scores -> the confident lines"),
];

/// Builds the op `name` with its parameters.
pub fn build(name: &str, ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let found = REGISTRY.iter().find(|(n, _, _)| *n == name).map(|(_, b, _)| *b).or_else(|| {
        let custom = CUSTOM.read().unwrap_or_else(|e| e.into_inner());
        custom.iter().find(|(n, _, _)| *n == name).map(|(_, b, _)| *b)
    });
    match found {
        Some(build) => build(ctx),
        None => Err(format!("unknown op '{name}'; known ops: {}", op_names().join(", "))),
    }
}

pub fn op_names() -> Vec<&'static str> {
    op_list().into_iter().map(|(n, _)| n).collect()
}

/// (name, description) of every op, built-in first.
pub fn op_list() -> Vec<(&'static str, &'static str)> {
    let custom = CUSTOM.read().unwrap_or_else(|e| e.into_inner());
    REGISTRY.iter().chain(custom.iter()).map(|(n, _, d)| (*n, *d)).collect()
}

/// The `i`th input, which the executor guarantees has the declared kind.
pub(crate) fn input<'a, T>(
    inputs: &'a [Value],
    i: usize,
    what: &str,
    pick: impl Fn(&'a Value) -> Option<T>,
) -> Result<T, OpError> {
    let v = inputs.get(i).ok_or_else(|| OpError::Internal(format!("missing input {i}")))?;
    pick(v).ok_or_else(|| OpError::Invalid(format!("expected {what}, got {}", v.kind())))
}
