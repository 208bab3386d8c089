//! What a request carries in and out of the engine, whatever protocol it came over:
//! named tensors, the request's options and, when asked for, where its time went.

use sluice_ops::Tensor;
use std::time::Duration;

/// The only version a flat `models/<name>/` folder has.
pub const DEFAULT_VERSION: &str = "1";

#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model_name: String,
    /// Empty: the default version.
    pub model_version: String,
    pub id: String,
    pub inputs: Vec<NamedTensor>,
    /// Outputs to return; empty: all of them.
    pub outputs: Vec<String>,
    /// Return where the request's time went ([`InferResponse::timing`]).
    pub timing: bool,
    /// The request's v2 `parameters` that are plain values (pipelines read the ones they
    /// declare; the rest are ignored).
    pub parameters: Vec<(String, Scalar)>,
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<NamedTensor>,
    /// When asked for: per step (each pipeline node, or the model itself) the time its
    /// work waited (for a pool thread or a batch) and computed, summed over its items.
    pub timing: Option<Vec<StepTiming>>,
}

/// Where one step of a request spent its time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTiming {
    /// The pipeline node, or the model's name.
    pub step: String,
    pub queue: Duration,
    pub compute: Duration,
    /// Items (and fan-out elements) the step ran for this request.
    pub items: u64,
}

/// A plain request parameter value (v2 `parameters`), as pipelines read it.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Num(f64),
    Str(String),
    Bool(bool),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Num(n) => write!(f, "{n}"),
            Scalar::Str(s) => write!(f, "'{s}'"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}
