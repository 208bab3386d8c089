//! An op of your own, in a crate of your own: `normalize_boxes` turns detection boxes in
//! the picture's pixels into fractions of its width and height, in the box format a
//! client wants (corners, corner + size, or centre + size), the way many detection APIs
//! answer. It uses only sluice-ops' public API: the [`Op`] trait, typed [`Port`]s,
//! params read with serde through [`BuildContext::params`], and [`OpError`] for what
//! the input gets wrong.

use serde::Deserialize;
use sluice_cli::{OpRegistry, OpSpec};
use sluice_ops::op::{input, param, port, BuildContext, Op, OpError, OpResult, Param, Port};
use sluice_ops::{DataType, Tensor, Value, ValueType};

/// The ops this crate adds to the built-in ones.
pub fn registry() -> OpRegistry {
    // Names are unique: one already taken is an error here, at start-up, not later.
    OpRegistry::builtin().with(spec()).expect("no built-in op is named normalize_boxes")
}

/// What `sluice ops` lists, and how a pipeline node builds the op.
pub fn spec() -> OpSpec {
    const PARAMS: &[Param] = &[
        param("format", "xyxy", "xyxy (corners), xywh (top-left corner and size) or cxcywh (centre and size)"),
        param("clip", "true", "cut each box to the picture first"),
    ];
    OpSpec {
        name: "normalize_boxes",
        summary: "boxes [n,4] in the picture's pixels + image -> boxes as fractions of its width and height",
        params: PARAMS,
        example: r#"{"format": "cxcywh"}"#,
        build,
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Debug, Default)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Xyxy,
    Xywh,
    Cxcywh,
}

/// Params as written in the pipeline file; an unknown one fails the pipeline's load,
/// naming the file, line and node.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    format: Format,
    #[serde(default = "yes")]
    clip: bool,
}

fn yes() -> bool {
    true
}

/// Built once per pipeline node, then shared by every request (hence `run(&self)`).
struct NormalizeBoxes {
    p: Params,
}

/// Checks the params when the pipeline loads: a `String` error fails that load.
fn build(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(NormalizeBoxes { p: ctx.params()? }))
}

impl Op for NormalizeBoxes {
    /// Typed inputs, checked when the pipeline compiles: a node feeding something else
    /// is a load error naming both ends.
    fn inputs(&self) -> Vec<Port> {
        vec![port("boxes", ValueType::tensor(DataType::F32, vec![-1, 4])), port("image", ValueType::image())]
    }

    fn outputs(&self) -> Vec<Port> {
        vec![port("boxes", ValueType::tensor(DataType::F32, vec![-1, 4]))]
    }

    /// Runs on the node's CPU pool thread (not the async runtime), once per item (each
    /// image of a request, each element after a fan-out). An `Err` fails that request
    /// only: `Invalid` is the caller's fault (INVALID_ARGUMENT / HTTP 400); a panic is
    /// caught and fails it too (INTERNAL).
    fn run(&self, inputs: &[Value]) -> OpResult {
        let boxes = input(inputs, 0, "a tensor", Value::as_tensor)?;
        let image = input(inputs, 1, "an image", Value::as_image)?;
        let v = boxes.to_f32().filter(|_| boxes.shape.len() == 2 && boxes.shape[1] == 4).ok_or_else(|| {
            OpError::Invalid(format!("boxes must be FP32 [n,4], got {} {:?}", boxes.dtype, boxes.shape))
        })?;
        // The picture's own size: also right after a reduced decode (`max_side`).
        let (w, h) = image.source_size();
        let (w, h) = (w as f32, h as f32);
        // Cut to the picture before converting: a clipped centre and size describe the
        // visible part of the box.
        let clip = |x: f32| if self.p.clip { x.clamp(0.0, 1.0) } else { x };
        let out: Vec<f32> = v
            .chunks_exact(4)
            .flat_map(|b| {
                let (x1, y1, x2, y2) = (clip(b[0] / w), clip(b[1] / h), clip(b[2] / w), clip(b[3] / h));
                match self.p.format {
                    Format::Xyxy => [x1, y1, x2, y2],
                    Format::Xywh => [x1, y1, x2 - x1, y2 - y1],
                    Format::Cxcywh => [(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1],
                }
            })
            .collect();
        Ok(vec![Value::Tensor(Tensor::from_f32(boxes.shape.clone(), &out))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_ops::Image;
    use std::path::Path;
    use std::sync::Arc;

    fn run_shaped(params: &str, shape: Vec<usize>, boxes: &[f32]) -> Result<Vec<f32>, OpError> {
        let ctx = BuildContext::new(serde_json::from_str(params).unwrap(), Path::new("."));
        let op = registry().build("normalize_boxes", &ctx).unwrap();
        let t = Tensor::from_f32(shape, boxes);
        let out = op.run(&[Value::Tensor(t), Value::Image(Arc::new(Image::filled(200, 100, [0; 3])))])?;
        Ok(out[0].as_tensor().unwrap().to_f32().unwrap())
    }

    fn run(params: &str, boxes: &[f32]) -> Vec<f32> {
        run_shaped(params, vec![boxes.len() / 4, 4], boxes).unwrap()
    }

    fn close(got: Vec<f32>, want: [f32; 4]) {
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{got:?} != {want:?}");
    }

    #[test]
    fn each_format_in_fractions_of_the_picture() {
        let b = [20.0, 10.0, 120.0, 60.0];
        close(run("{}", &b), [0.1, 0.1, 0.6, 0.6]);
        close(run(r#"{"format": "xywh"}"#, &b), [0.1, 0.1, 0.5, 0.5]);
        close(run(r#"{"format": "cxcywh"}"#, &b), [0.35, 0.35, 0.5, 0.5]);
        close(run("{}", &[-20.0, 0.0, 400.0, 50.0]), [0.0, 0.0, 1.0, 0.5]);
        close(run(r#"{"clip": false}"#, &[-20.0, 0.0, 400.0, 50.0]), [-0.1, 0.0, 2.0, 0.5]);
        // Half outside the picture: the visible half's centre and size.
        close(run(r#"{"format": "cxcywh"}"#, &[100.0, 0.0, 300.0, 100.0]), [0.75, 0.5, 0.5, 1.0]);
    }

    #[test]
    fn a_reduced_decode_is_normalised_by_the_pictures_full_size() {
        // An image showing a 400x200 picture at half size: boxes are in the picture's pixels.
        let ctx = BuildContext::new(serde_json::json!({}), Path::new("."));
        let op = registry().build("normalize_boxes", &ctx).unwrap();
        let img = Image::filled(200, 100, [0; 3]).with_source_size(400, 200);
        let t = Tensor::from_f32(vec![1, 4], &[40.0, 20.0, 240.0, 120.0]);
        let out = op.run(&[Value::Tensor(t), Value::Image(Arc::new(img))]).unwrap();
        close(out[0].as_tensor().unwrap().to_f32().unwrap(), [0.1, 0.1, 0.6, 0.6]);
    }

    #[test]
    fn bad_params_fail_the_build_and_bad_inputs_the_request() {
        let ctx = BuildContext::new(serde_json::json!({"format": "yolo"}), Path::new("."));
        let e = registry().build("normalize_boxes", &ctx).err().unwrap();
        assert!(e.contains("unknown variant `yolo`"), "{e}");
        let e = run_shaped("{}", vec![1, 3], &[1.0, 2.0, 3.0]).unwrap_err();
        assert!(matches!(&e, OpError::Invalid(m) if m.contains("FP32 [n,4], got FP32 [1, 3]")), "{e}");
    }
}
