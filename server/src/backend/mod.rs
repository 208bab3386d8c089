//! Backends run one batch at a time on an instance thread. The trait is small and
//! synchronous: scheduling, batching and the async runtime live elsewhere.

pub mod ort;

use sluice_ops::Tensor;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// One loaded instance of a model. Inputs and outputs are in the order of the model's
/// signature; input shapes have already been checked against it.
pub trait Backend: Send {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError>;
    /// What the instance actually runs on (for example "cuda:0", or "cpu" after a fallback).
    fn device(&self) -> String;
}
