//! Detection post-processing: YOLO-style decode and class-wise non-maximum suppression,
//! with boxes mapped back to the original image.

use crate::image_ops::letterbox_geometry;
use crate::op::{input, param, port, BuildContext, Op, OpError, OpResult, OpSpec, Port};
use crate::tensor::{DataType, Tensor};
use crate::value::{Value, ValueType};
use serde::Deserialize;

/// The detection ops, for [`OpRegistry::builtin`](crate::op::OpRegistry::builtin).
pub(crate) const OPS: &[OpSpec] = &[OpSpec {
    name: "detect_yolo",
    summary: "YOLO-style predictions -> boxes, scores, classes after NMS",
    params: &[
        param("width", "required", "the model's input width"),
        param("height", "required", "the model's input height"),
        param("letterbox", "true", "the image was letterboxed rather than stretched"),
        param("score_threshold", "0.25", "objectness x best class below this is dropped"),
        param("iou_threshold", "0.45", "class-wise NMS overlap"),
        param("max_detections", "100", "kept at most"),
    ],
    example: r#"{"width": 640, "height": 640}"#,
    build: build_detect_yolo,
}];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetectParams {
    /// The model's input size, to map boxes back to the original image.
    width: u32,
    height: u32,
    /// The image was letterboxed (`resize` mode letterbox) rather than stretched.
    #[serde(default = "crate::op::yes")]
    letterbox: bool,
    #[serde(default = "default_score")]
    score_threshold: f32,
    #[serde(default = "default_iou")]
    iou_threshold: f32,
    #[serde(default = "default_max")]
    max_detections: usize,
}

fn default_score() -> f32 {
    0.25
}
fn default_iou() -> f32 {
    0.45
}
fn default_max() -> usize {
    100
}

/// Predictions [n, 5 + classes] (or [1, n, 5 + classes]): centre x, centre y, width,
/// height in model-input pixels, objectness, then per-class scores. A candidate's score
/// is objectness times its best class score.
struct DetectYolo {
    p: DetectParams,
}

pub(crate) fn build_detect_yolo(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: DetectParams = ctx.params()?;
    if p.width == 0 || p.height == 0 || !(0.0..=1.0).contains(&p.iou_threshold) {
        return Err("bad params: width, height > 0 and iou_threshold in 0..=1 are required".into());
    }
    Ok(Box::new(DetectYolo { p }))
}

/// A detection: box (x1, y1, x2, y2), score, class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub bbox: [f32; 4],
    pub score: f32,
    pub class: usize,
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Greedy NMS per class: keeps the best box, drops same-class boxes overlapping it by
/// more than `iou_threshold`, repeats. Output is sorted by score, best first.
pub fn nms(mut dets: Vec<Detection>, iou_threshold: f32, max: usize) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for d in dets {
        if kept.len() == max {
            break;
        }
        if kept.iter().all(|k| k.class != d.class || iou(&k.bbox, &d.bbox) <= iou_threshold) {
            kept.push(d);
        }
    }
    kept
}

impl DetectYolo {
    fn decode(&self, preds: &[f32], width: usize, img_w: u32, img_h: u32) -> Vec<Detection> {
        let p = &self.p;
        let (sx, sy, ox, oy) = if p.letterbox {
            let (scale, left, top, _, _) = letterbox_geometry(img_w, img_h, p.width, p.height);
            (scale, scale, left as f32, top as f32)
        } else {
            (p.width as f32 / img_w as f32, p.height as f32 / img_h as f32, 0.0, 0.0)
        };
        let (max_x, max_y) = (img_w as f32, img_h as f32);
        let mut dets = Vec::new();
        for row in preds.chunks_exact(width) {
            let obj = row[4];
            let Some((class, cls)) = row[5..].iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)) else {
                continue;
            };
            let score = obj * cls;
            if score < p.score_threshold || !score.is_finite() {
                continue;
            }
            let (cx, cy, w, h) = (row[0], row[1], row[2], row[3]);
            let x = |v: f32| ((v - ox) / sx).clamp(0.0, max_x);
            let y = |v: f32| ((v - oy) / sy).clamp(0.0, max_y);
            let bbox = [x(cx - w / 2.0), y(cy - h / 2.0), x(cx + w / 2.0), y(cy + h / 2.0)];
            dets.push(Detection { bbox, score, class });
        }
        nms(dets, p.iou_threshold, p.max_detections)
    }
}

impl Op for DetectYolo {
    fn inputs(&self) -> Vec<Port> {
        vec![port("predictions", ValueType::tensor_of(DataType::F32)), port("image", ValueType::image())]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![
            port("boxes", ValueType::tensor(DataType::F32, vec![-1, 4])),
            port("scores", ValueType::tensor(DataType::F32, vec![-1])),
            port("classes", ValueType::tensor(DataType::I64, vec![-1])),
        ]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let t: &Tensor = input(inputs, 0, "a tensor", Value::as_tensor)?;
        let img = input(inputs, 1, "an image", Value::as_image)?;
        let width = *t.shape.last().unwrap_or(&0);
        let rows_ok = t.shape.len() == 2 || (t.shape.len() == 3 && t.shape[0] == 1);
        let preds = t.to_f32().filter(|_| rows_ok && width > 5).ok_or_else(|| {
            OpError::Invalid(format!("predictions must be FP32 [n, 5+classes], got {} {:?}", t.dtype, t.shape))
        })?;
        let dets = self.decode(&preds, width, img.width, img.height);
        let n = dets.len();
        // Boxes in the picture's full-size frame, also when it was decoded reduced (NMS
        // is unchanged by scaling the axes: IoU is a ratio of areas).
        let (sx, sy) = img.source_scale();
        let (sw, sh) = img.source_size();
        let x = |v: f32| (v / sx).min(sw as f32);
        let y = |v: f32| (v / sy).min(sh as f32);
        let boxes: Vec<f32> =
            dets.iter().flat_map(|d| [x(d.bbox[0]), y(d.bbox[1]), x(d.bbox[2]), y(d.bbox[3])]).collect();
        let scores: Vec<f32> = dets.iter().map(|d| d.score).collect();
        let classes: Vec<i64> = dets.iter().map(|d| d.class as i64).collect();
        Ok(vec![
            Value::Tensor(Tensor::from_f32(vec![n, 4], &boxes)),
            Value::Tensor(Tensor::from_f32(vec![n], &scores)),
            Value::Tensor(Tensor::from_i64(vec![n], &classes)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Image;
    use std::sync::Arc;

    fn det(b: [f32; 4], score: f32, class: usize) -> Detection {
        Detection { bbox: b, score, class }
    }

    #[test]
    fn nms_is_per_class() {
        let d = vec![
            det([0.0, 0.0, 10.0, 10.0], 0.9, 0),
            det([1.0, 1.0, 10.0, 10.0], 0.8, 0), // IoU 0.81 with the first: dropped
            det([1.0, 1.0, 10.0, 10.0], 0.7, 1), // other class: kept
            det([20.0, 20.0, 30.0, 30.0], 0.6, 0),
        ];
        let kept = nms(d, 0.5, 10);
        let scores: Vec<f32> = kept.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.9, 0.7, 0.6]);
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[1.0, 1.0, 10.0, 10.0]) - 0.81).abs() < 1e-6);
    }

    #[test]
    fn boxes_map_back_through_the_letterbox() {
        let ctx = BuildContext::new(
            serde_json::json!({"width": 64, "height": 64, "score_threshold": 0.5}),
            std::path::Path::new("."),
        );
        let op = build_detect_yolo(&ctx).unwrap();
        // A 128x64 image letterboxed into 64x64: scale 0.5, 16 rows of padding on top.
        // One confident box centred at (32, 32) sized 20x10, one below the threshold.
        let preds =
            Tensor::from_f32(vec![2, 7], &[32.0, 32.0, 20.0, 10.0, 0.9, 1.0, 0.2, 5.0, 5.0, 2.0, 2.0, 0.3, 0.9, 0.9]);
        let img = Value::Image(Arc::new(Image::filled(128, 64, [0; 3])));
        let out = op.run(&[Value::Tensor(preds), img]).unwrap();
        let boxes = out[0].as_tensor().unwrap();
        assert_eq!(boxes.shape, vec![1, 4]);
        assert_eq!(boxes.to_f32().unwrap(), vec![44.0, 22.0, 84.0, 42.0]);
        assert_eq!(out[2].as_tensor().unwrap().to_i64().unwrap(), vec![0]);
        assert!((out[1].as_tensor().unwrap().to_f32().unwrap()[0] - 0.9).abs() < 1e-6);
    }
}
