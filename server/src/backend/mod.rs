//! Backends run one batch at a time on an instance thread. The trait is small and
//! synchronous: scheduling, batching and the async runtime live elsewhere.

pub mod ort;
pub mod remote;
#[cfg(feature = "tract")]
pub mod tract;

use sluice_ops::Tensor;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// One input of a batch as its requests' tensors, to be joined along dimension 0 and
/// followed by `pad` zero rows (padding up to an allowed batch size).
pub struct BatchInput<'a> {
    pub parts: Vec<&'a Tensor>,
    pub pad: usize,
}

impl BatchInput<'_> {
    /// The joined tensor's shape (one request's own shape when there is nothing to join:
    /// models without a batch dimension may take scalars).
    pub fn shape(&self) -> Vec<usize> {
        let mut shape = self.parts[0].shape.clone();
        if self.parts.len() > 1 || self.pad > 0 {
            shape[0] = self.parts.iter().map(|p| p.shape[0]).sum::<usize>() + self.pad;
        }
        shape
    }

    /// The joined tensor (a copy, unless it is one request's tensor without padding).
    pub fn join(&self) -> Result<Tensor, BackendError> {
        if let ([one], 0) = (self.parts.as_slice(), self.pad) {
            return Ok((*one).clone());
        }
        let padding = (self.pad > 0).then(|| zero_rows(self.parts[0], self.pad));
        let mut parts = self.parts.clone();
        parts.extend(padding.as_ref());
        Tensor::concat_batch(&parts).map_err(|e| BackendError(e.to_string()))
    }
}

/// BOOL elements from the wire may be any byte; ONNX Runtime, tract (and Rust's `bool`,
/// which outputs are read as) allow only 0 and 1.
pub(crate) fn normalize_bools(bytes: &mut [u8]) {
    bytes.iter_mut().for_each(|b| *b = u8::from(*b != 0));
}

/// `rows` zero rows shaped like `like`'s rows.
fn zero_rows(like: &Tensor, rows: usize) -> Tensor {
    let mut shape = like.shape.clone();
    shape[0] = rows;
    let elements = sluice_ops::tensor::element_count(&shape);
    // A BYTES element of zero length is its 4-byte length prefix alone.
    let bytes = elements * like.dtype.size().unwrap_or(4);
    Tensor { dtype: like.dtype, shape, data: vec![0u8; bytes].into() }
}

/// One loaded instance of a model. Inputs and outputs are in the order of the model's
/// signature; input shapes have already been checked against it.
pub trait Backend: Send {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError>;
    /// Runs a batch given as its requests' tensors. `staged` is called once the inputs
    /// are in place, before the model runs (it splits "compute input" from "infer" in
    /// the statistics). The default joins each input (one copy) and calls [`run`];
    /// backends with input buffers of their own copy the parts straight into them.
    ///
    /// [`run`]: Backend::run
    fn run_batch(&mut self, inputs: &[BatchInput<'_>], staged: &mut dyn FnMut()) -> Result<Vec<Tensor>, BackendError> {
        let joined = inputs.iter().map(BatchInput::join).collect::<Result<Vec<_>, _>>()?;
        staged();
        self.run(&joined)
    }
    /// What the instance actually runs on (for example "cuda:0", or "cpu" after a fallback).
    fn device(&self) -> String;
    /// Whether this backend passes on who a batch is for ([`set_callers`]); the others
    /// are spared gathering it for every batch.
    ///
    /// [`set_callers`]: Backend::set_callers
    fn passes_callers(&self) -> bool {
        false
    }
    /// Who the batch about to run is for: its latest deadline (`None`: some caller set
    /// none), each item's request, and the trace context the batch continues, for
    /// backends that pass them on (a remote call's timeout, request ids and trace).
    fn set_callers(
        &mut self,
        deadline: Option<std::time::Instant>,
        origins: &[&crate::request::Origin],
        trace: Option<&crate::request::TraceContext>,
    ) {
        let _ = (deadline, origins, trace);
    }
}
