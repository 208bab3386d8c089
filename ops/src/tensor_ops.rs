//! Tensor ops: softmax, top-k with labels, gather (stack a list), count, delay.

use crate::op::{input, param, port, BuildContext, NoParams, Op, OpError, OpResult, OpSpec, Port};
use crate::tensor::{DataType, Tensor};
use crate::value::{Value, ValueType};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The tensor ops, for [`OpRegistry::builtin`](crate::op::OpRegistry::builtin).
pub(crate) const OPS: &[OpSpec] = &[
    OpSpec {
        name: "softmax",
        summary: "FP32 tensor -> softmax along the last axis",
        params: &[],
        example: "{}",
        build: build_softmax,
    },
    OpSpec {
        name: "topk",
        summary: "FP32 scores -> the k best: scores, classes, labels",
        params: &[
            param("k", "required", "how many"),
            param("labels", "none", "text file, one label per line, in the pipeline's folder (at most 16 MiB)"),
            param("softmax", "false", "apply softmax first (for logits)"),
        ],
        example: r#"{"k": 5}"#,
        build: build_topk,
    },
    OpSpec {
        name: "gather",
        summary: "list of tensors -> one tensor stacked along a new first axis",
        params: &[],
        example: "{}",
        build: build_gather,
    },
    OpSpec {
        name: "count",
        summary: "list -> its length as INT64 [1]",
        params: &[],
        example: "{}",
        build: build_count,
    },
    OpSpec {
        name: "delay",
        summary: "passes its input through after a fixed time (tests, benchmarks)",
        params: &[
            param("ms", "required", "milliseconds"),
            param("busy", "false", "spin on the CPU instead of sleeping"),
        ],
        example: r#"{"ms": 1}"#,
        build: build_delay,
    },
];

fn f32_in(inputs: &[Value], i: usize) -> Result<(&Tensor, Vec<f32>), OpError> {
    let t = input(inputs, i, "a tensor", Value::as_tensor)?;
    let v = t.to_f32().ok_or_else(|| OpError::Invalid(format!("expected an FP32 tensor, got {}", t.dtype)))?;
    Ok((t, v))
}

struct Softmax;

pub(crate) fn build_softmax(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    ctx.params::<NoParams>()?;
    Ok(Box::new(Softmax))
}

/// Softmax of each row (last axis), computed stably.
pub fn softmax_rows(v: &mut [f32], row: usize) {
    for r in v.chunks_mut(row.max(1)) {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for x in r.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        r.iter_mut().for_each(|x| *x /= sum);
    }
}

impl Op for Softmax {
    fn inputs(&self) -> Vec<Port> {
        vec![port("tensor", ValueType::tensor_of(DataType::F32))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("tensor", ValueType::tensor_of(DataType::F32))]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        Ok(vec![inputs[0].clone()])
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let (t, mut v) = f32_in(inputs, 0)?;
        softmax_rows(&mut v, t.shape.last().copied().unwrap_or(1));
        Ok(vec![Value::Tensor(Tensor::from_f32_vec(t.shape.clone(), v))])
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopkParams {
    k: usize,
    /// A text file with one label per line (line i names class i), relative to the pipeline file.
    #[serde(default)]
    labels: Option<String>,
    /// Apply softmax first (for models that output logits).
    #[serde(default)]
    softmax: bool,
}

/// The k largest scores of a 1-D (or [1, n]) tensor, best first.
struct Topk {
    k: usize,
    labels: Option<Vec<String>>,
    softmax: bool,
}

pub(crate) fn build_topk(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: TopkParams = ctx.params()?;
    if p.k == 0 {
        return Err("bad params: k must be > 0".into());
    }
    let labels = match &p.labels {
        Some(file) => {
            let text = ctx.read_text(file).map_err(|e| format!("labels file {e}"))?;
            Some(text.lines().map(|l| l.trim().to_string()).collect())
        }
        None => None,
    };
    Ok(Box::new(Topk { k: p.k, labels, softmax: p.softmax }))
}

impl Op for Topk {
    fn inputs(&self) -> Vec<Port> {
        vec![port("scores", ValueType::tensor_of(DataType::F32))]
    }
    fn outputs(&self) -> Vec<Port> {
        let k = self.k as i64;
        vec![
            port("scores", ValueType::tensor(DataType::F32, vec![k])),
            port("classes", ValueType::tensor(DataType::I64, vec![k])),
            port("labels", ValueType::tensor(DataType::Bytes, vec![k])),
        ]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        if let ValueType::Tensor { dims: Some(d), .. } = &inputs[0] {
            let classes: i64 = d.iter().product();
            if d.iter().all(|&x| x > 0) && (d.len() > 2 || (d.len() == 2 && d[0] != 1)) {
                return Err(format!("expects scores [n] or [1,n], got {}", crate::tensor::Dims(d)));
            }
            if classes > 0 && (classes as usize) < self.k {
                return Err(format!("k = {} but there are only {classes} scores", self.k));
            }
        }
        Ok(self.outputs().into_iter().map(|p| p.ty).collect())
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let (t, mut v) = f32_in(inputs, 0)?;
        if t.shape.len() > 2 || (t.shape.len() == 2 && t.shape[0] != 1) || v.len() < self.k {
            return Err(OpError::Invalid(format!(
                "expects at least {} scores as [n] or [1,n], got {:?}",
                self.k, t.shape
            )));
        }
        if self.softmax {
            softmax_rows(&mut v, usize::MAX);
        }
        let mut idx: Vec<usize> = (0..v.len()).collect();
        // Ties keep the lower class first, as a stable sort on the score does.
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
        idx.truncate(self.k);
        let scores: Vec<f32> = idx.iter().map(|&i| v[i]).collect();
        let classes: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let labels: Vec<String> = idx
            .iter()
            .map(|&i| self.labels.as_ref().and_then(|l| l.get(i).cloned()).unwrap_or_else(|| i.to_string()))
            .collect();
        Ok(vec![
            Value::Tensor(Tensor::from_f32(vec![self.k], &scores)),
            Value::Tensor(Tensor::from_i64(vec![self.k], &classes)),
            Value::Tensor(Tensor::from_bytes_elements(vec![self.k], &labels)),
        ])
    }
}

/// Stacks a list of same-shaped tensors along a new first axis: the gather after a
/// fan-out. An empty list gives [0, ...] with the element shape known at compile time.
struct Gather {
    element: Option<(DataType, Vec<usize>)>,
}

pub(crate) fn build_gather(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    ctx.params::<NoParams>()?;
    Ok(Box::new(Gather { element: None }))
}

impl Op for Gather {
    fn inputs(&self) -> Vec<Port> {
        vec![port("list", ValueType::List(Box::new(ValueType::any_tensor())))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("tensor", ValueType::any_tensor())]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        let ValueType::List(el) = &inputs[0] else { return Ok(vec![ValueType::any_tensor()]) };
        match el.as_ref() {
            ValueType::Tensor { dtype: Some(dt), dims: Some(d) } => {
                if d.iter().all(|&x| x >= 0) {
                    self.element = Some((*dt, d.iter().map(|&x| x as usize).collect()));
                }
                let mut dims = vec![-1];
                dims.extend(d);
                Ok(vec![ValueType::tensor(*dt, dims)])
            }
            ValueType::Tensor { dtype, .. } => Ok(vec![ValueType::Tensor { dtype: *dtype, dims: None }]),
            _ => Ok(vec![ValueType::any_tensor()]),
        }
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let list = input(inputs, 0, "a list", Value::as_list)?;
        if list.is_empty() {
            let (dtype, dims) = self.element.clone().ok_or_else(|| {
                OpError::Internal("gather of an empty list whose element shape is not known statically".into())
            })?;
            let mut shape = vec![0];
            shape.extend(dims);
            return Ok(vec![Value::Tensor(Tensor { dtype, shape, data: Default::default() })]);
        }
        let rows: Vec<Tensor> = list
            .iter()
            .map(|v| {
                let t = v.as_tensor().ok_or_else(|| OpError::Invalid(format!("gather: element is {}", v.kind())))?;
                let mut shape = vec![1];
                shape.extend(&t.shape);
                Ok(Tensor { dtype: t.dtype, shape, data: t.data.clone() })
            })
            .collect::<Result<_, OpError>>()?;
        let refs: Vec<&Tensor> = rows.iter().collect();
        let t = Tensor::concat_batch(&refs).map_err(|e| OpError::Invalid(format!("gather: {e}")))?;
        Ok(vec![Value::Tensor(t)])
    }
}

struct Count;

pub(crate) fn build_count(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    ctx.params::<NoParams>()?;
    Ok(Box::new(Count))
}

impl Op for Count {
    fn inputs(&self) -> Vec<Port> {
        vec![port("list", ValueType::List(Box::new(ValueType::Any)))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("count", ValueType::tensor(DataType::I64, vec![1]))]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let list = input(inputs, 0, "a list", Value::as_list)?;
        Ok(vec![Value::Tensor(Tensor::from_i64(vec![1], &[list.len() as i64]))])
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayParams {
    ms: f64,
    /// Spin on the CPU instead of sleeping (models a CPU-bound stage).
    #[serde(default)]
    busy: bool,
}

/// Passes its input through unchanged after `ms`: a stand-in for a slow stage.
struct Delay {
    wait: Duration,
    busy: bool,
}

pub(crate) fn build_delay(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: DelayParams = ctx.params()?;
    if !(0.0..=60_000.0).contains(&p.ms) {
        return Err("bad params: ms must be in 0..=60000".into());
    }
    Ok(Box::new(Delay { wait: Duration::from_secs_f64(p.ms / 1000.0), busy: p.busy }))
}

impl Op for Delay {
    fn inputs(&self) -> Vec<Port> {
        vec![port("value", ValueType::Any)]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("value", ValueType::Any)]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        Ok(vec![inputs[0].clone()])
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let start = Instant::now();
        if self.busy {
            while start.elapsed() < self.wait {
                std::hint::spin_loop();
            }
        } else {
            std::thread::sleep(self.wait);
        }
        Ok(vec![inputs[0].clone()])
    }
}

/// A list value from its elements.
pub fn list(values: Vec<Value>) -> Value {
    Value::List(Arc::new(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_matches_the_closed_form() {
        let mut v = vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0];
        softmax_rows(&mut v, 3);
        // e^1, e^2, e^3 over their sum (numpy: scipy.special.softmax([1, 2, 3])).
        let want = [0.09003057, 0.24472847, 0.66524096, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
        assert!(v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{v:?}");
    }

    #[test]
    fn topk_orders_best_first_with_labels() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("l.txt"), "cat\ndog\nbird\nfish\n").unwrap();
        let ctx = BuildContext::new(serde_json::json!({"k": 2, "labels": "l.txt"}), dir.path());
        let op = build_topk(&ctx).unwrap();
        let scores = Tensor::from_f32(vec![1, 4], &[0.1, 0.7, 0.05, 0.15]);
        let out = op.run(&[Value::Tensor(scores)]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().to_f32().unwrap(), vec![0.7, 0.15]);
        assert_eq!(out[1].as_tensor().unwrap().to_i64().unwrap(), vec![1, 3]);
        let labels = out[2].as_tensor().unwrap().bytes_elements().unwrap();
        assert_eq!(labels, vec![&b"dog"[..], &b"fish"[..]]);
        let too_few = Tensor::from_f32(vec![1], &[0.5]);
        assert!(matches!(op.run(&[Value::Tensor(too_few)]), Err(OpError::Invalid(_))));
    }

    #[test]
    fn label_files_must_be_small_regular_files_inside_the_pipeline_folder() {
        let root = tempfile::tempdir().unwrap();
        let pipes = root.path().join("pipelines");
        std::fs::create_dir(&pipes).unwrap();
        std::fs::write(root.path().join("secret.txt"), "a\n").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret.txt"), pipes.join("link.txt")).unwrap();
        std::fs::write(pipes.join("big.txt"), vec![b'x'; (crate::op::MAX_PARAM_FILE_BYTES + 1) as usize]).unwrap();
        for (file, says) in [
            ("../secret.txt", "inside its folder"),
            ("link.txt", "inside its folder"),
            ("/etc/passwd", "inside its folder"),
            ("/dev/zero", "inside its folder"),
            (".", "not a regular file"),
            ("big.txt", "larger than 16 MiB"),
            ("missing.txt", "No such file"),
        ] {
            let ctx = BuildContext::new(serde_json::json!({"k": 2, "labels": file}), &pipes);
            let e = build_topk(&ctx).err().unwrap();
            assert!(e.starts_with("labels file") && e.contains(says), "{file}: {e}");
        }
    }

    #[test]
    fn gather_stacks_in_order_and_handles_empty_lists() {
        let mut op = Gather { element: None };
        let el = ValueType::tensor(DataType::F32, vec![2]);
        let ty = op.infer(&[ValueType::List(Box::new(el))]).unwrap();
        assert_eq!(ty[0], ValueType::tensor(DataType::F32, vec![-1, 2]));
        let l = list(vec![
            Value::Tensor(Tensor::from_f32(vec![2], &[1.0, 2.0])),
            Value::Tensor(Tensor::from_f32(vec![2], &[3.0, 4.0])),
        ]);
        let t = op.run(&[l]).unwrap()[0].as_tensor().unwrap().clone();
        assert_eq!((t.shape.clone(), t.to_f32().unwrap()), (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
        let t = op.run(&[list(vec![])]).unwrap()[0].as_tensor().unwrap().clone();
        assert_eq!(t.shape, vec![0, 2]);
    }
}
