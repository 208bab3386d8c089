//! Filters: keep the detections whose fields pass a condition (score, class, box area,
//! aspect), with the indices kept, and pick items of a list or rows of a tensor by
//! index. A filter before a fan-out means the nodes after it run only on what is kept.

use crate::op::{input, param, port, BuildContext, NoParams, Op, OpError, OpResult, OpSpec, Port};
use crate::tensor::{DataType, Tensor};
use crate::value::{Value, ValueType};
use serde::Deserialize;
use std::sync::Arc;

/// The filter ops, for [`OpRegistry::builtin`](crate::op::OpRegistry::builtin).
pub(crate) const OPS: &[OpSpec] = &[
    OpSpec {
        name: "filter_boxes",
        summary: "detections -> those that pass every condition, and their indices",
        params: &[
            param("min_score", "0", "scores below this are dropped"),
            param("classes", "all", "class ids kept, e.g. [0, 2]"),
            param("min_area", "0", "box area in pixels below this is dropped"),
            param("max_area", "none", "box area in pixels above this is dropped"),
            param("min_aspect", "none", "width / height below this is dropped"),
            param("max_aspect", "none", "width / height above this is dropped"),
        ],
        example: r#"{"min_score": 0.5, "classes": [0]}"#,
        build: build_filter_boxes,
    },
    OpSpec {
        name: "select",
        summary: "list or tensor, indices -> the items (rows) at those indices, in their order",
        params: &[],
        example: "{}",
        build: build_select,
    },
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterParams {
    #[serde(default)]
    min_score: f32,
    #[serde(default)]
    classes: Option<Vec<i64>>,
    #[serde(default)]
    min_area: f32,
    #[serde(default)]
    max_area: Option<f32>,
    #[serde(default)]
    min_aspect: Option<f32>,
    #[serde(default)]
    max_aspect: Option<f32>,
}

struct FilterBoxes {
    p: FilterParams,
}

pub(crate) fn build_filter_boxes(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: FilterParams = ctx.params()?;
    let numbers = [Some(p.min_score), Some(p.min_area), p.max_area, p.min_aspect, p.max_aspect];
    if numbers.iter().flatten().any(|v| !v.is_finite()) {
        return Err("bad params: every bound must be a finite number".into());
    }
    if p.max_area.is_some_and(|m| m < p.min_area) {
        return Err("bad params: max_area is below min_area, so nothing could pass".into());
    }
    if let (Some(lo), Some(hi)) = (p.min_aspect, p.max_aspect) {
        if hi < lo {
            return Err("bad params: max_aspect is below min_aspect, so nothing could pass".into());
        }
    }
    if p.classes.as_ref().is_some_and(Vec::is_empty) {
        return Err("bad params: classes is empty, so nothing could pass (leave it out to keep every class)".into());
    }
    Ok(Box::new(FilterBoxes { p }))
}

impl FilterBoxes {
    fn keeps(&self, b: &[f32], score: f32, class: i64) -> bool {
        let (w, h) = ((b[2] - b[0]).max(0.0), (b[3] - b[1]).max(0.0));
        let aspect = if h > 0.0 { w / h } else { f32::INFINITY };
        let p = &self.p;
        score >= p.min_score
            && p.classes.as_ref().is_none_or(|c| c.contains(&class))
            && w * h >= p.min_area
            && p.max_area.is_none_or(|m| w * h <= m)
            && p.min_aspect.is_none_or(|m| aspect >= m)
            && p.max_aspect.is_none_or(|m| aspect <= m)
    }
}

impl Op for FilterBoxes {
    fn inputs(&self) -> Vec<Port> {
        vec![
            port("boxes", ValueType::tensor(DataType::F32, vec![-1, 4])),
            port("scores", ValueType::tensor(DataType::F32, vec![-1])),
            port("classes", ValueType::tensor(DataType::I64, vec![-1])),
        ]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![
            port("boxes", ValueType::tensor(DataType::F32, vec![-1, 4])),
            port("scores", ValueType::tensor(DataType::F32, vec![-1])),
            port("classes", ValueType::tensor(DataType::I64, vec![-1])),
            port("indices", ValueType::tensor(DataType::I64, vec![-1])),
        ]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let tensor = |i, what| input(inputs, i, what, Value::as_tensor);
        let (boxes, scores, classes) = (tensor(0, "boxes")?, tensor(1, "scores")?, tensor(2, "classes")?);
        let n = scores.shape.first().copied().unwrap_or(0);
        let wrong = |what: &str, t: &Tensor| OpError::Invalid(format!("{what} of shape {:?} for {n} scores", t.shape));
        if scores.shape.len() != 1 {
            return Err(OpError::Invalid(format!("scores must be [n], not of shape {:?}", scores.shape)));
        }
        if boxes.shape != [n, 4] {
            return Err(wrong("boxes", boxes));
        }
        if classes.shape != [n] {
            return Err(wrong("classes", classes));
        }
        let b = boxes.to_f32().ok_or_else(|| OpError::Invalid(format!("boxes must be FP32, not {}", boxes.dtype)))?;
        let s =
            scores.to_f32().ok_or_else(|| OpError::Invalid(format!("scores must be FP32, not {}", scores.dtype)))?;
        let c = classes
            .to_i64()
            .ok_or_else(|| OpError::Invalid(format!("classes must be INT64, not {}", classes.dtype)))?;
        let kept: Vec<usize> = (0..n).filter(|&i| self.keeps(&b[i * 4..i * 4 + 4], s[i], c[i])).collect();
        let m = kept.len();
        Ok(vec![
            Value::Tensor(Tensor::from_f32_vec(
                vec![m, 4],
                kept.iter().flat_map(|&i| b[i * 4..i * 4 + 4].to_vec()).collect(),
            )),
            Value::Tensor(Tensor::from_f32_vec(vec![m], kept.iter().map(|&i| s[i]).collect())),
            Value::Tensor(Tensor::from_i64(vec![m], &kept.iter().map(|&i| c[i]).collect::<Vec<_>>())),
            Value::Tensor(Tensor::from_i64(vec![m], &kept.iter().map(|&i| i as i64).collect::<Vec<_>>())),
        ])
    }
}

struct Select;

pub(crate) fn build_select(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    ctx.params::<NoParams>()?;
    Ok(Box::new(Select))
}

impl Op for Select {
    fn inputs(&self) -> Vec<Port> {
        vec![port("value", ValueType::Any), port("indices", ValueType::tensor(DataType::I64, vec![-1]))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("value", ValueType::Any)]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        match &inputs[0] {
            ValueType::List(_) | ValueType::Any => Ok(vec![inputs[0].clone()]),
            ValueType::Tensor { dtype: Some(DataType::Bytes), .. } => {
                Err("select picks rows of fixed-size tensors, not BYTES (select from a list instead)".into())
            }
            ValueType::Tensor { dtype, dims } => {
                // Rows are picked: the first dim becomes variable.
                let dims =
                    dims.as_ref().map(|d| d.iter().enumerate().map(|(i, &x)| if i == 0 { -1 } else { x }).collect());
                if dims.as_ref().is_some_and(|d: &Vec<i64>| d.is_empty()) {
                    return Err("select: a scalar tensor has no rows to pick".into());
                }
                Ok(vec![ValueType::Tensor { dtype: *dtype, dims }])
            }
            other => Err(format!("select picks items of a list or rows of a tensor, not {other}")),
        }
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let idx = input(inputs, 1, "a tensor", Value::as_tensor)?;
        let idx = idx.to_i64().ok_or_else(|| OpError::Invalid(format!("indices must be INT64, not {}", idx.dtype)))?;
        let len = match &inputs[0] {
            Value::List(l) => l.len(),
            Value::Tensor(t) => *t.shape.first().ok_or_else(|| OpError::Invalid("a scalar has no rows".into()))?,
            v => return Err(OpError::Invalid(format!("expected a list or a tensor, got {}", v.kind()))),
        };
        // At most as many as there are items: the output is never larger than the input
        // (indices may repeat, and would otherwise ask for memory without bound).
        if idx.len() > len {
            return Err(OpError::Invalid(format!(
                "{} indices for {len} items: select keeps at most every item once",
                idx.len()
            )));
        }
        let picked: Vec<usize> = idx
            .iter()
            .map(|&i| usize::try_from(i).ok().filter(|&i| i < len))
            .collect::<Option<_>>()
            .ok_or_else(|| OpError::Invalid(format!("indices {idx:?} out of range for {len} items")))?;
        Ok(vec![match &inputs[0] {
            Value::List(l) => Value::List(Arc::new(picked.iter().map(|&i| l[i].clone()).collect())),
            Value::Tensor(t) if t.dtype == DataType::Bytes => {
                return Err(OpError::Invalid("select picks rows of fixed-size tensors, not BYTES".into()))
            }
            Value::Tensor(t) => {
                let row = t.data.len() / len.max(1);
                let mut data = Vec::with_capacity(row * picked.len());
                for &i in &picked {
                    data.extend_from_slice(&t.data[i * row..(i + 1) * row]);
                }
                let mut shape = t.shape.clone();
                shape[0] = picked.len();
                Value::Tensor(Tensor { dtype: t.dtype, shape, data: data.into() })
            }
            v => return Err(OpError::Invalid(format!("expected a list or a tensor, got {}", v.kind()))),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn build(spec: &str, params: serde_json::Value) -> Result<Box<dyn Op>, String> {
        crate::op::OpRegistry::builtin().build(spec, &BuildContext::new(params, Path::new(".")))
    }

    fn detections() -> Vec<Value> {
        // Box 0: 10x10 class 0 score 0.9; box 1: 40x10 class 1 score 0.4; box 2: 10x30 class 0 score 0.6.
        let boxes = [0.0, 0.0, 10.0, 10.0, 0.0, 0.0, 40.0, 10.0, 5.0, 5.0, 15.0, 35.0];
        vec![
            Value::Tensor(Tensor::from_f32(vec![3, 4], &boxes)),
            Value::Tensor(Tensor::from_f32(vec![3], &[0.9, 0.4, 0.6])),
            Value::Tensor(Tensor::from_i64(vec![3], &[0, 1, 0])),
        ]
    }

    fn kept(params: serde_json::Value) -> Vec<i64> {
        let out = build("filter_boxes", params).unwrap().run(&detections()).unwrap();
        let idx = out[3].as_tensor().unwrap().to_i64().unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape, vec![idx.len(), 4]);
        assert_eq!(out[2].as_tensor().unwrap().to_i64().unwrap().len(), idx.len());
        idx
    }

    #[test]
    fn each_condition_keeps_what_passes_in_order() {
        use serde_json::json;
        assert_eq!(kept(json!({})), vec![0, 1, 2]);
        assert_eq!(kept(json!({"min_score": 0.5})), vec![0, 2]);
        assert_eq!(kept(json!({"classes": [1]})), vec![1]);
        assert_eq!(kept(json!({"min_area": 350})), vec![1]);
        assert_eq!(kept(json!({"max_area": 100})), vec![0]);
        assert_eq!(kept(json!({"min_aspect": 2.0})), vec![1]);
        assert_eq!(kept(json!({"max_aspect": 0.5})), vec![2]);
        assert_eq!(kept(json!({"min_score": 0.5, "classes": [0], "max_aspect": 1.0})), vec![0, 2]);
        assert_eq!(kept(json!({"min_score": 2.0})), Vec::<i64>::new());
        let out = build("filter_boxes", json!({"classes": [0]})).unwrap().run(&detections()).unwrap();
        assert_eq!(out[1].as_tensor().unwrap().to_f32().unwrap(), vec![0.9, 0.6]);
        assert_eq!(out[0].as_tensor().unwrap().to_f32().unwrap()[4..], [5.0, 5.0, 15.0, 35.0]);
    }

    #[test]
    fn bounds_that_pass_nothing_and_mismatched_inputs_are_errors() {
        use serde_json::json;
        for bad in
            [json!({"classes": []}), json!({"min_area": 10, "max_area": 5}), json!({"min_aspect": 2, "max_aspect": 1})]
        {
            assert!(build("filter_boxes", bad.clone()).is_err(), "{bad}");
        }
        let mut d = detections();
        d[2] = Value::Tensor(Tensor::from_i64(vec![2], &[0, 1]));
        let err = build("filter_boxes", json!({})).unwrap().run(&d).unwrap_err();
        assert!(err.to_string().contains("classes of shape [2] for 3 scores"), "{err}");
    }

    #[test]
    fn select_picks_list_items_and_tensor_rows() {
        let op = build("select", serde_json::Value::Null).unwrap();
        let list = Value::List(Arc::new((0..4).map(|i| Value::Tensor(Tensor::from_i64(vec![1], &[i]))).collect()));
        let idx = Value::Tensor(Tensor::from_i64(vec![2], &[3, 1]));
        let out = op.run(&[list, idx.clone()]).unwrap();
        let items: Vec<i64> =
            out[0].as_list().unwrap().iter().map(|v| v.as_tensor().unwrap().to_i64().unwrap()[0]).collect();
        assert_eq!(items, vec![3, 1]);
        let t = Value::Tensor(Tensor::from_f32(vec![4, 2], &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]));
        let out = op.run(&[t.clone(), idx]).unwrap();
        let rows = out[0].as_tensor().unwrap();
        assert_eq!((rows.shape.clone(), rows.to_f32().unwrap()), (vec![2, 2], vec![3.0, 3.5, 1.0, 1.5]));
        let err = op.run(&[t.clone(), Value::Tensor(Tensor::from_i64(vec![1], &[4]))]).unwrap_err();
        assert!(err.to_string().contains("out of range for 4 items"), "{err}");
        let err = op.run(&[t, Value::Tensor(Tensor::from_i64(vec![5], &[0; 5]))]).unwrap_err();
        assert!(err.to_string().contains("5 indices for 4 items"), "{err}");
    }
}
