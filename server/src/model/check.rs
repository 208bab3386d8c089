//! Checking a request's tensors against what a model or pipeline takes: one rule for
//! names, duplicates, missing inputs, dtypes, the batch dimension and output names, so
//! both answer a bad request with the same words.

use crate::error::Error;
use crate::repository::ModelSpec;
use crate::request::NamedTensor;
use sluice_ops::tensor::{fits, Dims};
use sluice_ops::{DataType, Tensor};

/// One input a model or pipeline declares.
pub struct Expected<'a> {
    pub name: &'a str,
    pub dtype: DataType,
    pub dims: &'a [i64],
    /// The request carries a batch dimension before `dims` (a batched pipeline's items):
    /// messages show it as -1.
    pub batch_dim: bool,
}

impl Expected<'_> {
    /// The dims a request must have, as messages print them.
    pub fn shown_dims(&self) -> String {
        match self.batch_dim {
            false => Dims(self.dims).to_string(),
            true => Dims(&[&[-1], self.dims].concat()).to_string(),
        }
    }
}

/// Puts the request's tensors in the declared order and checks their dtypes. `kind`
/// ("model", "pipeline") and `name` are for the messages.
pub fn bind_inputs(
    name: &str,
    kind: &str,
    expected: &[Expected<'_>],
    given: Vec<NamedTensor>,
) -> Result<Vec<Tensor>, Error> {
    let mut slots: Vec<Option<Tensor>> = vec![None; expected.len()];
    for nt in given {
        let i = expected.iter().position(|e| e.name == nt.name).ok_or_else(|| {
            let names: Vec<&str> = expected.iter().map(|e| e.name).collect();
            Error::invalid(name, format!("unknown input '{}'; the {kind}'s inputs are: {}", nt.name, names.join(", ")))
        })?;
        if slots[i].replace(nt.tensor).is_some() {
            return Err(Error::invalid(name, format!("input '{}' is given more than once", nt.name)));
        }
    }
    expected
        .iter()
        .zip(slots)
        .map(|(e, slot)| {
            let t = slot.ok_or_else(|| {
                Error::invalid(name, format!("missing input '{}' ({} {})", e.name, e.dtype, e.shown_dims()))
            })?;
            if t.dtype != e.dtype {
                return Err(Error::invalid(
                    name,
                    format!("input '{}': expected datatype {}, got {}", e.name, e.dtype, t.dtype),
                ));
            }
            Ok(t)
        })
        .collect()
}

/// Checks the size of an input's batch dimension against `max_batch_size` and against
/// the other inputs' (`rows`, the first one's).
pub fn batch_rows(name: &str, input: &str, given: usize, max: usize, rows: &mut Option<usize>) -> Result<(), Error> {
    if given == 0 || given > max {
        return Err(Error::invalid(
            name,
            format!("input '{input}': batch size {given} is outside 1..={max} (max_batch_size)"),
        ));
    }
    if *rows.get_or_insert(given) != given {
        return Err(Error::invalid(name, "inputs disagree on the batch size (dimension 0)"));
    }
    Ok(())
}

/// Indices of the requested outputs among `outputs`; all of them when none are named.
pub fn select_outputs<'a>(
    name: &str,
    kind: &str,
    outputs: impl ExactSizeIterator<Item = &'a str> + Clone,
    requested: &[String],
) -> Result<Vec<usize>, Error> {
    if requested.is_empty() {
        return Ok((0..outputs.len()).collect());
    }
    requested
        .iter()
        .map(|r| {
            outputs.clone().position(|o| o == r).ok_or_else(|| {
                let names: Vec<&str> = outputs.clone().collect();
                Error::invalid(name, format!("unknown output '{r}'; the {kind}'s outputs are: {}", names.join(", ")))
            })
        })
        .collect()
}

/// Orders a model request's tensors as the model expects them and checks names, dtypes
/// and shapes; returns them with the request's batch size (1 for models without
/// batching).
pub fn model_inputs(spec: &ModelSpec, given: Vec<NamedTensor>) -> Result<(Vec<Tensor>, usize), Error> {
    let m = &spec.name;
    let expected: Vec<Expected> = spec
        .inputs
        .iter()
        .map(|t| Expected { name: &t.name, dtype: t.dtype, dims: &t.dims, batch_dim: false })
        .collect();
    let tensors = bind_inputs(m, "model", &expected, given)?;
    let mut rows = None;
    for (info, t) in spec.inputs.iter().zip(&tensors) {
        if !fits(&t.shape, &info.dims) {
            let shape: Vec<i64> = t.shape.iter().map(|&s| s as i64).collect();
            return Err(Error::invalid(
                m,
                format!(
                    "input '{}': shape {} does not match the model's {} (-1 is any size)",
                    info.name,
                    Dims(&shape),
                    Dims(&info.dims)
                ),
            ));
        }
        let skip = usize::from(spec.config.max_batch_size > 0);
        within_max_dim(spec, &info.name, &t.shape[skip..], &info.dims[skip..], skip)?;
        // Byte lengths were checked when the tensor was built from the wire.
        debug_assert!(t.validate().is_ok());
        if spec.config.max_batch_size > 0 {
            batch_rows(m, &info.name, t.shape[0], spec.config.max_batch_size, &mut rows)?;
        }
    }
    Ok((tensors, rows.unwrap_or(1)))
}

/// Checks a request's sizes of an input's variable dims against the model's `max_dim`
/// (the batch dimension is bounded by max_batch_size instead). `shape` and `dims` are
/// aligned and start at dimension `first_axis`.
pub fn within_max_dim(
    spec: &ModelSpec,
    input: &str,
    shape: &[usize],
    dims: &[i64],
    first_axis: usize,
) -> Result<(), Error> {
    for (i, (&given, &declared)) in shape.iter().zip(dims).enumerate() {
        if declared < 0 && given > spec.config.max_dim {
            let m = &spec.name;
            return Err(Error::TooLarge(format!(
                "model '{m}': input '{input}' has size {given} in dimension {}, over the model's max_dim of {} \
                 (max_dim in models/{m}/model.yaml)",
                first_axis + i,
                spec.config.max_dim
            )));
        }
    }
    Ok(())
}
