//! tract-onnx (`backend: tract`): models run in Rust, in the instance's own thread, with
//! no shared library to install. tract plans a model for concrete shapes, so a model
//! gets one optimised plan per allowed batch size (the sizes the batcher pads to), made
//! once per load and shared by its instances; each instance keeps its own run state.

use super::{normalize_bools, Backend, BackendError, BatchInput};
use crate::onnx::signature::TensorInfo;
use crate::repository::model_yaml::ModelYaml;
use sluice_ops::tensor::Dims;
use sluice_ops::{DataType, Tensor};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::{
    tvec, DatumType, DatumTypeExt, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec,
    Tensor as TractTensor, TypedSimplePlan, TypedSimpleState,
};

/// A model planned for each batch size it runs at; shared by its instances.
pub struct TractModel {
    /// `(Some(batch size), plan)` per planned size, sorted, or one `(None, plan)` for a
    /// model without a batch dimension.
    plans: Vec<(Option<usize>, Arc<TypedSimplePlan>)>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<String>,
    file: std::path::PathBuf,
}

/// tract's element type for one of sluice's (tract has no bfloat16 and no strings).
fn datum(dtype: DataType) -> Option<DatumType> {
    Some(match dtype {
        DataType::Bool => DatumType::Bool,
        DataType::U8 => DatumType::U8,
        DataType::U16 => DatumType::U16,
        DataType::U32 => DatumType::U32,
        DataType::U64 => DatumType::U64,
        DataType::I8 => DatumType::I8,
        DataType::I16 => DatumType::I16,
        DataType::I32 => DatumType::I32,
        DataType::I64 => DatumType::I64,
        DataType::F16 => DatumType::F16,
        DataType::F32 => DatumType::F32,
        DataType::F64 => DatumType::F64,
        DataType::BF16 | DataType::Bytes => return None,
    })
}

fn data_type(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        DatumType::I64 => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        _ => return None,
    })
}

/// The batch sizes to plan for: the allowed ones, else 1 alone. A batch runs as chunks
/// of planned sizes: on x86 tract's batch-1 plans are the fastest per item (a batch of 4
/// takes 1.4-2x the time of four single runs, BENCHMARKS.md), so by default a batch
/// runs row by row and batching saves only the queueing.
fn batch_sizes(cfg: &ModelYaml) -> Vec<Option<usize>> {
    let allowed = &cfg.dynamic_batching.allowed_batch_sizes;
    if cfg.max_batch_size == 0 {
        vec![None]
    } else if allowed.is_empty() {
        vec![Some(1)]
    } else {
        let mut sizes = allowed.clone();
        sizes.sort_unstable();
        sizes.dedup();
        sizes.into_iter().map(Some).collect()
    }
}

impl TractModel {
    /// Reads and plans `file` for every batch size the model runs at. Fails naming the
    /// file and what tract cannot do: an operator it does not implement, an input whose
    /// dims are not all fixed, an element type it lacks.
    pub fn load(
        file: &Path,
        cfg: &ModelYaml,
        inputs: &[TensorInfo],
        outputs: &[TensorInfo],
    ) -> Result<TractModel, String> {
        let at = file.display();
        for t in inputs.iter().chain(outputs) {
            if datum(t.dtype).is_none() {
                return Err(format!("{at}: '{}' is {}, which the tract backend does not support", t.name, t.dtype));
            }
        }
        let batched = cfg.max_batch_size > 0;
        for t in inputs {
            if t.dims.iter().skip(usize::from(batched)).any(|&d| d < 0) {
                return Err(format!(
                    "{at}: input '{}' has variable dims {}; tract plans for fixed shapes: give them under \
                     `inputs:` in model.yaml (only the batch dimension may vary), or use backend: onnxruntime",
                    t.name,
                    Dims(&t.dims)
                ));
            }
        }
        let model =
            tract_onnx::onnx().model_for_path(file).map_err(|e| format!("{at}: tract cannot read the model: {e:#}"))?;
        // Operators tract-onnx has no translation for load as placeholders and fail later
        // with a less direct message: name them all here.
        let missing: Vec<String> = model
            .nodes()
            .iter()
            .filter_map(|n| {
                let op = n.op.name();
                op.strip_prefix("Unimplemented(")
                    .and_then(|o| o.strip_suffix(')'))
                    .map(|o| format!("{o} (node '{}')", n.name))
            })
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{at}: tract does not implement the ONNX operator(s) {}; serve this model with backend: onnxruntime",
                missing.join(", ")
            ));
        }
        // The file's inputs and outputs, in order, must be the ones read from it earlier.
        let names = |outlets: &[tract_onnx::prelude::OutletId]| -> Vec<String> {
            outlets.iter().map(|o| model.node(o.node).name.clone()).collect()
        };
        let model_inputs = names(model.input_outlets().map_err(|e| format!("{at}: {e}"))?);
        let wanted: Vec<String> = inputs.iter().map(|t| t.name.clone()).collect();
        if model_inputs != wanted {
            return Err(format!("{at}: tract sees inputs {model_inputs:?}, the signature {wanted:?}"));
        }
        if model.output_outlets().map_err(|e| format!("{at}: {e}"))?.len() != outputs.len() {
            return Err(format!(
                "{at}: tract sees a different number of outputs than the signature's {}",
                outputs.len()
            ));
        }
        let mut plans = Vec::new();
        for size in batch_sizes(cfg) {
            let mut m = model.clone();
            for (i, t) in inputs.iter().enumerate() {
                let shape: Vec<usize> = t
                    .dims
                    .iter()
                    .enumerate()
                    .map(|(k, &d)| if k == 0 && batched { size.unwrap_or(1) } else { d as usize })
                    .collect();
                let dt = datum(t.dtype).unwrap_or(DatumType::F32);
                m.set_input_fact(i, InferenceFact::from(dt.fact(&*shape)))
                    .map_err(|e| format!("{at}: input '{}': {e}", t.name))?;
            }
            let what = size.map_or_else(|| "the model".to_string(), |s| format!("batch size {s}"));
            let plan = m
                .into_optimized()
                .and_then(|m| m.into_runnable())
                .map_err(|e| format!("{at}: tract cannot plan {what}: {e:#}"))?;
            plans.push((size, plan));
        }
        Ok(TractModel {
            plans,
            inputs: inputs.to_vec(),
            outputs: outputs.iter().map(|t| t.name.clone()).collect(),
            file: file.to_path_buf(),
        })
    }

    /// One instance: the shared plans, each with a run state of its own.
    pub fn instance(&self) -> Result<TractBackend, String> {
        let states = self
            .plans
            .iter()
            .map(|(size, plan)| {
                plan.spawn().map(|s| (*size, s)).map_err(|e| format!("{}: tract: {e}", self.file.display()))
            })
            .collect::<Result<_, _>>()?;
        Ok(TractBackend { states, inputs: self.inputs.clone(), outputs: self.outputs.clone() })
    }
}

/// One input of a batch: its rows in batch order (`None`: a padding row), and the shape
/// of a row (of the whole input, for models without a batch dimension: one "row").
struct Rows<'a> {
    rows: Vec<Option<&'a [u8]>>,
    shape: Vec<usize>,
}

pub struct TractBackend {
    states: Vec<(Option<usize>, TypedSimpleState)>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<String>,
}

impl TractBackend {
    /// The plan for a chunk of `rows` rows: the smallest planned size that holds them,
    /// else the largest (the chunk is then cut to it). Returns its index and size.
    fn plan_for(&self, rows: usize) -> (usize, usize) {
        let at = self.states.iter().position(|(s, _)| s.is_none_or(|s| s >= rows)).unwrap_or(self.states.len() - 1);
        (at, self.states[at].0.unwrap_or(rows))
    }
}

impl Backend for TractBackend {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        let batch: Vec<BatchInput<'_>> = inputs.iter().map(|t| BatchInput { parts: vec![t], pad: 0 }).collect();
        self.run_batch(&batch, &mut || {})
    }

    /// Runs the batch as chunks of planned sizes (one chunk when the batcher padded it
    /// to an allowed size): each chunk's rows are copied from the requests' tensors
    /// straight into tract's inputs (zero rows for padding), and its outputs, cut to
    /// the chunk's rows, are joined back in order.
    fn run_batch(&mut self, inputs: &[BatchInput<'_>], staged: &mut dyn FnMut()) -> Result<Vec<Tensor>, BackendError> {
        let batched = self.states.first().is_some_and(|(s, _)| s.is_some());
        let total = if batched { inputs.first().map_or(1, |i| i.shape()[0]) } else { 1 };
        let mut rows: Vec<Rows<'_>> = Vec::with_capacity(inputs.len());
        for input in inputs {
            let shape = input.shape();
            if !batched {
                rows.push(Rows { rows: input.parts.iter().map(|p| Some(&p.data[..])).collect(), shape });
                continue;
            }
            let mut list = Vec::with_capacity(total);
            for part in &input.parts {
                let n = part.shape[0];
                let width = part.data.len().checked_div(n).unwrap_or(0);
                list.extend((0..n).map(|r| Some(&part.data[r * width..(r + 1) * width])));
            }
            list.resize(total, None);
            rows.push(Rows { rows: list, shape: shape[1..].to_vec() });
        }
        staged();
        let mut joined: Vec<(DataType, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut done = 0;
        while done < total {
            let (plan, planned) = self.plan_for(total - done);
            let take = planned.min(total - done);
            let mut values: TVec<TValue> = tvec![];
            for (input, info) in rows.iter().zip(&self.inputs) {
                let mut shape = input.shape.clone();
                if batched {
                    shape.insert(0, planned);
                }
                let dt = datum(info.dtype).ok_or_else(|| BackendError(format!("'{}': unsupported type", info.name)))?;
                let mut t =
                    TractTensor::zero_dt(dt, &shape).map_err(|e| BackendError(format!("'{}': {e}", info.name)))?;
                let dst = t.as_bytes_mut();
                let mut at = 0;
                for row in input.rows.iter().skip(done).take(take) {
                    let Some(row) = row else { break }; // padding rows stay zero
                    let Some(slot) = dst.get_mut(at..at + row.len()) else {
                        return Err(BackendError(format!(
                            "input '{}': rows larger than its shape {shape:?}",
                            info.name
                        )));
                    };
                    slot.copy_from_slice(row);
                    at += row.len();
                }
                if dt == DatumType::Bool {
                    normalize_bools(dst);
                }
                values.push(t.into_tvalue());
            }
            let outputs = self.states[plan].1.run(values).map_err(|e| BackendError(format!("tract: {e:#}")))?;
            for (k, v) in outputs.iter().enumerate() {
                let name = self.outputs.get(k).map_or("?", String::as_str);
                let (dtype, shape, bytes) = output_rows(name, v, batched.then_some((take, planned)))?;
                match joined.get_mut(k) {
                    Some((_, s, b)) => {
                        s[0] += shape[0];
                        b.extend_from_slice(bytes);
                    }
                    None => {
                        let mut b = Vec::new();
                        b.try_reserve_exact(bytes.len() / take.max(1) * total)
                            .map_err(|_| BackendError("out of memory for the outputs".into()))?;
                        b.extend_from_slice(bytes);
                        joined.push((dtype, shape, b));
                    }
                }
            }
            done += take;
        }
        Ok(joined.into_iter().map(|(dtype, shape, b)| Tensor { dtype, shape, data: b.into() }).collect())
    }

    fn device(&self) -> String {
        "cpu".into()
    }
}

/// A tract output's type, shape and bytes; with `(take, planned)`, cut to its first
/// `take` rows when the plan ran `planned`.
fn output_rows<'t>(
    name: &str,
    t: &'t TractTensor,
    chunk: Option<(usize, usize)>,
) -> Result<(DataType, Vec<usize>, &'t [u8]), BackendError> {
    let dtype = data_type(t.datum_type())
        .ok_or_else(|| BackendError(format!("output '{name}': tract gave type {:?}", t.datum_type())))?;
    let mut shape = t.shape().to_vec();
    let mut bytes = t.as_bytes();
    if let Some((take, planned)) = chunk {
        match shape.first_mut() {
            Some(first) if *first == planned && planned > 0 => {
                bytes = &bytes[..bytes.len() / planned * take];
                *first = take;
            }
            _ => {
                return Err(BackendError(format!(
                    "output '{name}' of shape {shape:?} has no batch dimension (the plan ran {planned} rows); \
                     set max_batch_size: 0 for models without one"
                )))
            }
        }
    }
    Ok((dtype, shape, bytes))
}
