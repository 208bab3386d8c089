//! Text recognition ops (PaddleOCR's det -> cls -> rec flow): DB post-processing of the
//! detector's probability map into text quads, text-line tensors for the direction
//! classifier and the recogniser, the 180-degree fix, CTC greedy decoding, and the
//! final per-line filter. Written from the published algorithms; parameters default to
//! those PaddleOCR's models are tuned with.

use crate::image_ops::{resize_to, rotate_180};
use crate::op::{input, param, port, BuildContext, Op, OpError, OpResult, OpSpec, Port};
use crate::tensor::{DataType, Tensor};
use crate::value::{Value, ValueType};
use serde::Deserialize;
use std::sync::Arc;

/// The OCR ops, for [`OpRegistry::builtin`](crate::op::OpRegistry::builtin).
pub(crate) const OPS: &[OpSpec] = &[
    OpSpec {
        name: "db_postprocess",
        summary: "text probability map -> text quads in reading order (DB)",
        params: &[
            param("thresh", "0.3", "probability above which a pixel is text"),
            param("box_thresh", "0.5", "mean probability inside a box below which it is dropped"),
            param("unclip_ratio", "1.6", "how far boxes are grown"),
            param("use_dilation", "true", "dilate the text mask first"),
            param("max_candidates", "1000", "regions looked at, at most"),
        ],
        example: "{}",
        build: build_db_postprocess,
    },
    OpSpec {
        name: "text_line_tensor",
        summary: "text line image -> FP32 [3,48,W] for classifier/recogniser",
        params: &[
            param("height", "48", "the model's line height"),
            param("width", "none", "a fixed width (the direction classifier's 192)"),
            param("min_width", "320", "variable width: at least this"),
            param("width_multiple", "64", "variable width: rounded up to a multiple of this"),
            param("max_width", "3200", "variable width: at most this"),
        ],
        example: "{}",
        build: build_text_line_tensor,
    },
    OpSpec {
        name: "orient180",
        summary: "image + direction probabilities -> image turned upright",
        params: &[param("threshold", "0.9", "turned when the classifier says 180 above this")],
        example: "{}",
        build: build_orient180,
    },
    OpSpec {
        name: "ctc_decode",
        summary: "recogniser probabilities -> text and confidence (CTC greedy)",
        params: &[
            param("characters_from", "none", "a model whose ONNX metadata holds the character list"),
            param("metadata_key", "character", "the metadata key of that list"),
            param("characters", "none", "or a file, one character per line, relative to the pipeline file"),
        ],
        example: r#"{"characters_from": "rec"}"#,
        build: build_ctc_decode,
    },
    OpSpec {
        name: "ocr_lines",
        summary: "quads + texts + scores -> the confident lines",
        params: &[param("min_score", "0.5", "lines recognised with less confidence are dropped")],
        example: "{}",
        build: build_ocr_lines,
    },
];

// ---- DB post-processing ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DbParams {
    /// Probability above which a pixel is text.
    #[serde(default = "db_thresh")]
    thresh: f32,
    /// Mean probability inside a box below which it is dropped.
    #[serde(default = "db_box_thresh")]
    box_thresh: f32,
    /// How far boxes are grown (the network predicts shrunk text regions).
    #[serde(default = "db_unclip")]
    unclip_ratio: f32,
    /// Grow the text mask by one pixel right and down before finding regions.
    #[serde(default = "crate::op::yes")]
    use_dilation: bool,
    #[serde(default = "db_max")]
    max_candidates: usize,
}

fn db_thresh() -> f32 {
    0.3
}
fn db_box_thresh() -> f32 {
    0.5
}
fn db_unclip() -> f32 {
    1.6
}
fn db_max() -> usize {
    1000
}

/// Probability map [1,H,W] (of the resized image) + the original image -> text quads
/// [n,4,2] (corners clockwise from the top left, in original pixels) and their scores
/// [n], in reading order.
struct DbPostprocess {
    p: DbParams,
}

pub(crate) fn build_db_postprocess(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: DbParams = ctx.params()?;
    if !(0.0..1.0).contains(&p.thresh) || p.unclip_ratio < 0.0 {
        return Err("bad params: thresh must be in 0..1 and unclip_ratio >= 0".into());
    }
    Ok(Box::new(DbPostprocess { p }))
}

/// A rotated rectangle: centre, side lengths along `axis` and its normal.
#[derive(Debug, Clone, Copy)]
struct RotRect {
    cx: f64,
    cy: f64,
    w: f64,
    h: f64,
    /// Unit vector of the `w` side.
    axis: (f64, f64),
}

impl RotRect {
    fn corners(&self) -> [(f64, f64); 4] {
        let (ux, uy) = (self.axis.0 * self.w / 2.0, self.axis.1 * self.w / 2.0);
        let (vx, vy) = (-self.axis.1 * self.h / 2.0, self.axis.0 * self.h / 2.0);
        [
            (self.cx - ux - vx, self.cy - uy - vy),
            (self.cx + ux - vx, self.cy + uy - vy),
            (self.cx + ux + vx, self.cy + uy + vy),
            (self.cx - ux + vx, self.cy - uy + vy),
        ]
    }

    /// Corners as top-left, top-right, bottom-right, bottom-left: the two leftmost points
    /// (by x) are the left side, the upper of each pair comes first.
    fn ordered(&self) -> [(f64, f64); 4] {
        let mut p = self.corners();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (tl, bl) = if p[1].1 > p[0].1 { (p[0], p[1]) } else { (p[1], p[0]) };
        let (tr, br) = if p[3].1 > p[2].1 { (p[2], p[3]) } else { (p[3], p[2]) };
        [tl, tr, br, bl]
    }
}

/// Convex hull (Andrew's monotone chain), counter-clockwise, no collinear points.
fn convex_hull(mut pts: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    pts.dedup();
    if pts.len() < 3 {
        return pts;
    }
    let cross = |o: (f64, f64), a: (f64, f64), b: (f64, f64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut hull: Vec<(f64, f64)> = Vec::with_capacity(pts.len() * 2);
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(f64, f64)>> =
            if pass == 0 { Box::new(pts.iter()) } else { Box::new(pts.iter().rev()) };
        for &p in iter {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    hull
}

/// The smallest-area rectangle around the points (rotating calipers over the hull).
fn min_area_rect(pts: Vec<(f64, f64)>) -> Option<RotRect> {
    let hull = convex_hull(pts);
    if hull.len() < 3 {
        return None;
    }
    let mut best: Option<(f64, RotRect)> = None;
    for i in 0..hull.len() {
        let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
        let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        if len == 0.0 {
            continue;
        }
        let axis = ((b.0 - a.0) / len, (b.1 - a.1) / len);
        let (mut u0, mut u1, mut v0, mut v1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for p in &hull {
            let u = p.0 * axis.0 + p.1 * axis.1;
            let v = -p.0 * axis.1 + p.1 * axis.0;
            u0 = u0.min(u);
            u1 = u1.max(u);
            v0 = v0.min(v);
            v1 = v1.max(v);
        }
        let area = (u1 - u0) * (v1 - v0);
        if best.as_ref().is_none_or(|(a, _)| area < *a) {
            let (cu, cv) = ((u0 + u1) / 2.0, (v0 + v1) / 2.0);
            let rect =
                RotRect { cx: cu * axis.0 - cv * axis.1, cy: cu * axis.1 + cv * axis.0, w: u1 - u0, h: v1 - v0, axis };
            best = Some((area, rect));
        }
    }
    best.map(|(_, r)| r)
}

/// Mean of `prob` over the pixels inside the quad (corners truncated to whole pixels,
/// edges included), within its bounding box.
fn box_score(prob: &[f32], w: usize, h: usize, quad: &[(f64, f64); 4]) -> f32 {
    let q: Vec<(f64, f64)> = quad.iter().map(|p| (p.0.trunc(), p.1.trunc())).collect();
    let clamp = |v: f64, max: usize| (v.max(0.0) as usize).min(max - 1);
    let x0 = clamp(quad.iter().map(|p| p.0).fold(f64::MAX, f64::min).floor(), w);
    let x1 = clamp(quad.iter().map(|p| p.0).fold(f64::MIN, f64::max).ceil(), w);
    let y0 = clamp(quad.iter().map(|p| p.1).fold(f64::MAX, f64::min).floor(), h);
    let y1 = clamp(quad.iter().map(|p| p.1).fold(f64::MIN, f64::max).ceil(), h);
    // Inside a convex polygon: on the same side of every edge (half a pixel of slack so
    // pixels the edges pass through count, as a scan-line fill includes them).
    let area2: f64 = (0..4).map(|i| q[i].0 * q[(i + 1) % 4].1 - q[(i + 1) % 4].0 * q[i].1).sum();
    let sign = if area2 >= 0.0 { 1.0 } else { -1.0 };
    let inside = |x: f64, y: f64| {
        (0..4).all(|i| {
            let (a, b) = (q[i], q[(i + 1) % 4]);
            let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt().max(1e-9);
            sign * ((b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0)) / len >= -0.5
        })
    };
    let (mut sum, mut n) = (0.0f64, 0usize);
    for y in y0..=y1 {
        for x in x0..=x1 {
            if inside(x as f64, y as f64) {
                sum += prob[y * w + x] as f64;
                n += 1;
            }
        }
    }
    if n == 0 {
        0.0
    } else {
        (sum / n as f64) as f32
    }
}

/// Pixels of each 8-connected region of the mask, as the row extremes (all a convex
/// hull needs), in scan order of the regions' first pixels.
fn regions(mask: &[bool], w: usize, h: usize) -> Vec<Vec<(f64, f64)>> {
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        // Per row of this region: (min x, max x).
        let mut rows: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            let e = rows.entry(y).or_insert((x, x));
            e.0 = e.0.min(x);
            e.1 = e.1.max(x);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if mask[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(rows.iter().flat_map(|(&y, &(a, b))| [(a as f64, y as f64), (b as f64, y as f64)]).collect());
    }
    out
}

/// Sorts quads top to bottom, then left to right within a line (tops within 10 px).
pub fn reading_order(quads: &mut [([(f64, f64); 4], f32)]) {
    quads.sort_by(|a, b| a.0[0].1.total_cmp(&b.0[0].1).then(a.0[0].0.total_cmp(&b.0[0].0)));
    for i in 0..quads.len().saturating_sub(1) {
        for j in (0..=i).rev() {
            let (a, b) = (quads[j].0[0], quads[j + 1].0[0]);
            if (b.1 - a.1).abs() < 10.0 && b.0 < a.0 {
                quads.swap(j, j + 1);
            } else {
                break;
            }
        }
    }
}

impl DbPostprocess {
    fn boxes(&self, prob: &[f32], w: usize, h: usize, dest_w: u32, dest_h: u32) -> Vec<([(f64, f64); 4], f32)> {
        let p = &self.p;
        let bits: Vec<bool> = prob.iter().map(|&v| v > p.thresh).collect();
        let mask = if p.use_dilation {
            // A 2x2 dilation: a pixel is set if it or its left, upper or upper-left
            // neighbour is.
            (0..w * h)
                .map(|i| {
                    let (x, y) = (i % w, i / w);
                    bits[i] || (x > 0 && bits[i - 1]) || (y > 0 && bits[i - w]) || (x > 0 && y > 0 && bits[i - w - 1])
                })
                .collect()
        } else {
            bits
        };
        let mut out = Vec::new();
        for pts in regions(&mask, w, h).into_iter().take(p.max_candidates) {
            let Some(rect) = min_area_rect(pts) else { continue };
            if rect.w.min(rect.h) < 3.0 {
                continue;
            }
            let quad = rect.ordered();
            let score = box_score(prob, w, h, &quad);
            if score < p.box_thresh {
                continue;
            }
            // Grow by area * ratio / perimeter on every side: what offsetting the
            // rectangle's outline does, and its minimum-area rectangle keeps.
            let d = rect.w * rect.h * p.unclip_ratio as f64 / (2.0 * (rect.w + rect.h));
            let grown = RotRect { w: rect.w + 2.0 * d, h: rect.h + 2.0 * d, ..rect };
            if grown.w.min(grown.h) < 5.0 {
                continue;
            }
            let scale = |v: f64, from: usize, to: u32| (v / from as f64 * to as f64).round().clamp(0.0, to as f64);
            let q = grown.ordered().map(|(x, y)| (scale(x, w, dest_w), scale(y, h, dest_h)));
            out.push((q, score));
        }
        reading_order(&mut out);
        out
    }
}

impl Op for DbPostprocess {
    fn inputs(&self) -> Vec<Port> {
        vec![port("prob", ValueType::tensor_of(DataType::F32)), port("image", ValueType::image())]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![
            port("quads", ValueType::tensor(DataType::F32, vec![-1, 4, 2])),
            port("scores", ValueType::tensor(DataType::F32, vec![-1])),
        ]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let t = input(inputs, 0, "a tensor", Value::as_tensor)?;
        let img = input(inputs, 1, "an image", Value::as_image)?;
        let (h, w) = match t.shape.as_slice() {
            [1, h, w] | [h, w] => (*h, *w),
            s => return Err(OpError::Invalid(format!("expected a probability map [1,H,W], got {s:?}"))),
        };
        let prob = t.to_f32().ok_or_else(|| OpError::Invalid(format!("expected FP32, got {}", t.dtype)))?;
        // Quads in the picture's full-size frame, also when it was decoded reduced.
        let (sw, sh) = img.source_size();
        let boxes = self.boxes(&prob, w, h, sw, sh);
        let quads: Vec<f32> =
            boxes.iter().flat_map(|(q, _)| q.iter().flat_map(|&(x, y)| [x as f32, y as f32])).collect();
        let scores: Vec<f32> = boxes.iter().map(|(_, s)| *s).collect();
        Ok(vec![
            Value::Tensor(Tensor::from_f32(vec![boxes.len(), 4, 2], &quads)),
            Value::Tensor(Tensor::from_f32(vec![boxes.len()], &scores)),
        ])
    }
}

// ---- text-line tensors ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineParams {
    #[serde(default = "line_height")]
    height: u32,
    /// Fixed width (the direction classifier's 192): narrower lines are padded, wider
    /// ones squeezed.
    #[serde(default)]
    width: Option<u32>,
    /// Variable width (the recogniser): at least this ...
    #[serde(default = "min_width")]
    min_width: u32,
    /// ... rounded up to a multiple of this, so lines of similar length share a batch ...
    #[serde(default = "width_multiple")]
    width_multiple: u32,
    /// ... and at most this (longer lines are squeezed).
    #[serde(default = "max_width")]
    max_width: u32,
}

fn line_height() -> u32 {
    48
}
fn min_width() -> u32 {
    320
}
fn width_multiple() -> u32 {
    64
}
fn max_width() -> u32 {
    3200
}

/// A text line as the classifier or recogniser takes it: resized to `height` keeping its
/// aspect ratio, scaled to [-1, 1] ((x / 255 - 0.5) / 0.5) in BGR order, CHW, and padded
/// on the right with zeros (after scaling, as PaddleOCR pads) -> FP32 [3, height, width].
struct TextLineTensor {
    p: LineParams,
}

pub(crate) fn build_text_line_tensor(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: LineParams = ctx.params()?;
    if p.height == 0 || p.width == Some(0) || p.width_multiple == 0 || p.max_width < p.min_width.max(1) {
        return Err("bad params: sizes must be > 0 and max_width >= min_width".into());
    }
    Ok(Box::new(TextLineTensor { p }))
}

impl TextLineTensor {
    /// (resized width, padded width) for an image of `w` x `h`.
    fn widths(&self, w: u32, h: u32) -> (u32, u32) {
        let p = &self.p;
        let natural = ((p.height as f64 * w as f64 / h as f64).ceil() as u32).max(1);
        let padded = match p.width {
            Some(fixed) => fixed,
            None => natural.div_ceil(p.width_multiple).saturating_mul(p.width_multiple).clamp(p.min_width, p.max_width),
        };
        (natural.min(padded), padded)
    }
}

impl Op for TextLineTensor {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn outputs(&self) -> Vec<Port> {
        let w = self.p.width.map_or(-1, |w| w as i64);
        vec![port("tensor", ValueType::tensor(DataType::F32, vec![3, self.p.height as i64, w]))]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let img = input(inputs, 0, "an image", Value::as_image)?;
        let (rw, pw) = self.widths(img.width, img.height);
        let h = self.p.height as usize;
        let resized = resize_to(img, rw, self.p.height)?;
        let mut out = vec![0f32; 3 * h * pw as usize];
        for (c, src) in [2usize, 1, 0].into_iter().enumerate() {
            for y in 0..h {
                for x in 0..rw as usize {
                    let v = resized.data[(y * rw as usize + x) * 3 + src] as f32;
                    out[(c * h + y) * pw as usize + x] = v / 127.5 - 1.0;
                }
            }
        }
        Ok(vec![Value::Tensor(Tensor::from_f32_vec(vec![3, h, pw as usize], out))])
    }
}

// ---- direction fix ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrientParams {
    /// Turn the line when the classifier says "180" with more than this probability.
    #[serde(default = "orient_thresh")]
    threshold: f32,
}

fn orient_thresh() -> f32 {
    0.9
}

/// Image + the direction classifier's probabilities [2] (0 and 180 degrees) -> the image,
/// turned upright when it is upside down.
struct Orient180 {
    threshold: f32,
}

pub(crate) fn build_orient180(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: OrientParams = ctx.params()?;
    Ok(Box::new(Orient180 { threshold: p.threshold }))
}

impl Op for Orient180 {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image()), port("probs", ValueType::tensor(DataType::F32, vec![2]))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let img = input(inputs, 0, "an image", Value::as_image)?;
        let probs = input(inputs, 1, "a tensor", Value::as_tensor)?
            .to_f32()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| OpError::Invalid("expected FP32 [2] direction probabilities".into()))?;
        if probs[1] > probs[0] && probs[1] > self.threshold {
            return Ok(vec![Value::Image(Arc::new(rotate_180(img)?))]);
        }
        Ok(vec![Value::Image(img.clone())])
    }
}

// ---- CTC decoding ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtcParams {
    /// Read the character list from this model's ONNX metadata ...
    #[serde(default)]
    characters_from: Option<String>,
    /// ... under this key (PaddleOCR's recognisers: `character`), one per line ...
    #[serde(default = "ctc_key")]
    metadata_key: String,
    /// ... or from this file, one per line, relative to the pipeline file.
    #[serde(default)]
    characters: Option<String>,
}

fn ctc_key() -> String {
    "character".into()
}

/// The recogniser's per-step probabilities [T, classes] -> `text` BYTES [1] and its
/// confidence `score` FP32 [1] (the mean probability of the characters kept). Greedy:
/// the best class per step, repeats merged, blanks (class 0) dropped. Classes are
/// blank, the character list, then a space.
struct CtcDecode {
    chars: Vec<String>,
}

pub(crate) fn build_ctc_decode(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: CtcParams = ctx.params()?;
    let text = match (&p.characters_from, &p.characters) {
        (Some(model), None) => ctx.model_metadata(model, &p.metadata_key)?,
        (None, Some(file)) => {
            let path = ctx.base_dir.join(file);
            std::fs::read_to_string(&path).map_err(|e| format!("characters file {}: {e}", path.display()))?
        }
        _ => return Err("bad params: give one of characters_from (a model) or characters (a file)".into()),
    };
    let mut chars = vec![String::new()];
    chars.extend(text.split('\n').map(|l| l.trim_end_matches('\r').to_string()));
    if chars.last().is_some_and(|c| c.is_empty()) {
        chars.pop();
    }
    chars.push(" ".into());
    Ok(Box::new(CtcDecode { chars }))
}

impl CtcDecode {
    pub fn decode(&self, probs: &[f32], classes: usize) -> (String, f32) {
        let mut text = String::new();
        let (mut sum, mut n) = (0.0f64, 0usize);
        let mut prev = usize::MAX;
        for step in probs.chunks_exact(classes) {
            let (best, p) = step.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
            if best != 0 && best != prev {
                text.push_str(self.chars.get(best).map_or("", String::as_str));
                sum += p as f64;
                n += 1;
            }
            prev = best;
        }
        (text, if n == 0 { 0.0 } else { (sum / n as f64) as f32 })
    }
}

impl Op for CtcDecode {
    fn inputs(&self) -> Vec<Port> {
        vec![port("probs", ValueType::tensor(DataType::F32, vec![-1, -1]))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![
            port("text", ValueType::tensor(DataType::Bytes, vec![1])),
            port("score", ValueType::tensor(DataType::F32, vec![1])),
        ]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        if let ValueType::Tensor { dims: Some(d), .. } = &inputs[0] {
            if d.len() == 2 && d[1] > 0 && d[1] as usize != self.chars.len() {
                return Err(format!(
                    "the model gives {} classes but the character list makes {}",
                    d[1],
                    self.chars.len()
                ));
            }
        }
        Ok(self.outputs().into_iter().map(|p| p.ty).collect())
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let t = input(inputs, 0, "a tensor", Value::as_tensor)?;
        let classes = match t.shape.as_slice() {
            [_, c] if *c == self.chars.len() => *c,
            s => return Err(OpError::Invalid(format!("expected [T, {}] probabilities, got {s:?}", self.chars.len()))),
        };
        let probs = t.to_f32().ok_or_else(|| OpError::Invalid(format!("expected FP32, got {}", t.dtype)))?;
        let (text, score) = self.decode(&probs, classes);
        Ok(vec![
            Value::Tensor(Tensor::from_bytes_elements(vec![1], &[text])),
            Value::Tensor(Tensor::from_f32(vec![1], &[score])),
        ])
    }
}

// ---- the result ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinesParams {
    /// Lines recognised with less confidence are dropped.
    #[serde(default = "min_score")]
    min_score: f32,
}

fn min_score() -> f32 {
    0.5
}

/// Quads [n,4,2] + one text and score per quad (lists) -> the lines kept: `boxes`
/// [m,4,2], `texts` BYTES [m], `scores` FP32 [m], in the quads' (reading) order.
struct OcrLines {
    min_score: f32,
}

pub(crate) fn build_ocr_lines(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: LinesParams = ctx.params()?;
    Ok(Box::new(OcrLines { min_score: p.min_score }))
}

impl Op for OcrLines {
    fn inputs(&self) -> Vec<Port> {
        let one = |d| ValueType::List(Box::new(ValueType::tensor(d, vec![1])));
        vec![
            port("quads", ValueType::tensor(DataType::F32, vec![-1, 4, 2])),
            port("texts", one(DataType::Bytes)),
            port("scores", one(DataType::F32)),
        ]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![
            port("boxes", ValueType::tensor(DataType::F32, vec![-1, 4, 2])),
            port("texts", ValueType::tensor(DataType::Bytes, vec![-1])),
            port("scores", ValueType::tensor(DataType::F32, vec![-1])),
        ]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let quads = input(inputs, 0, "a tensor", Value::as_tensor)?.to_f32().unwrap_or_default();
        let texts = input(inputs, 1, "a list", Value::as_list)?;
        let scores = input(inputs, 2, "a list", Value::as_list)?;
        if texts.len() != scores.len() || quads.len() != texts.len() * 8 {
            return Err(OpError::Invalid(format!(
                "{} quads but {} texts and {} scores",
                quads.len() / 8,
                texts.len(),
                scores.len()
            )));
        }
        let (mut boxes, mut kept_texts, mut kept_scores) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (t, s)) in texts.iter().zip(scores.iter()).enumerate() {
            let score = s.as_tensor().and_then(|t| t.to_f32()).and_then(|v| v.first().copied()).unwrap_or(0.0);
            let text = t.as_tensor().and_then(|t| t.bytes_elements().ok()).and_then(|v| v.into_iter().next());
            if let (Some(text), true) = (text, score >= self.min_score) {
                boxes.extend_from_slice(&quads[i * 8..i * 8 + 8]);
                kept_texts.push(text);
                kept_scores.push(score);
            }
        }
        let m = kept_scores.len();
        Ok(vec![
            Value::Tensor(Tensor::from_f32(vec![m, 4, 2], &boxes)),
            Value::Tensor(Tensor::from_bytes_elements(vec![m], &kept_texts)),
            Value::Tensor(Tensor::from_f32(vec![m], &kept_scores)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Image;

    #[test]
    fn min_area_rect_of_a_rotated_rectangle() {
        // A 20x6 rectangle turned 30 degrees, sampled as its corners and edge points.
        let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
        let pts: Vec<(f64, f64)> = [(-10.0, -3.0), (10.0, -3.0), (10.0, 3.0), (-10.0, 3.0), (0.0, 3.0), (0.0, -3.0)]
            .iter()
            .map(|&(x, y)| (50.0 + x * c - y * s, 40.0 + x * s + y * c))
            .collect();
        let r = min_area_rect(pts).unwrap();
        let (long, short) = (r.w.max(r.h), r.w.min(r.h));
        assert!((long - 20.0).abs() < 1e-6 && (short - 6.0).abs() < 1e-6, "{r:?}");
        assert!((r.cx - 50.0).abs() < 1e-6 && (r.cy - 40.0).abs() < 1e-6);
        let q = r.ordered();
        assert!(q[0].0 < q[1].0 && q[3].0 < q[2].0 && q[0].1 < q[3].1, "clockwise from the top left: {q:?}");
    }

    #[test]
    fn db_finds_one_box_per_text_region_in_reading_order() {
        let (w, h) = (64, 32);
        let mut prob = vec![0f32; w * h];
        for (x0, x1, y0, y1) in [(40, 60, 4, 10), (4, 30, 5, 11), (10, 50, 20, 27)] {
            for y in y0..y1 {
                for x in x0..x1 {
                    prob[y * w + x] = 0.9;
                }
            }
        }
        let op = DbPostprocess {
            p: DbParams { thresh: 0.3, box_thresh: 0.5, unclip_ratio: 1.6, use_dilation: false, max_candidates: 100 },
        };
        // The original image is twice the map's size.
        let boxes = op.boxes(&prob, w, h, 128, 64);
        assert_eq!(boxes.len(), 3);
        let tops: Vec<(f64, f64)> = boxes.iter().map(|(q, _)| q[0]).collect();
        assert!(tops[0].0 < tops[1].0 && tops[1].1 < tops[2].1, "left box, right box, then the lower line: {tops:?}");
        for (_, s) in &boxes {
            assert!((s - 0.9).abs() < 1e-6);
        }
        // The region x 4..=29, y 5..=10 spans 25 x 5 between pixel centres; grown by
        // d = 25*5*1.6 / 60 = 3.33 on every side, then doubled.
        let q = boxes[0].0;
        assert_eq!((q[0], q[2]), ((1.0, 3.0), (65.0, 27.0)), "{q:?}");
    }

    #[test]
    fn ctc_merges_repeats_and_drops_blanks() {
        let op = CtcDecode { chars: vec!["".into(), "a".into(), "b".into(), " ".into()] };
        // Steps: a a blank a b b  -> "aab", mean of the kept steps' probabilities.
        let rows = [
            [0.1, 0.8, 0.05, 0.05],
            [0.1, 0.6, 0.2, 0.1],
            [0.9, 0.05, 0.05, 0.0],
            [0.2, 0.7, 0.1, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.1, 0.0, 0.9, 0.0],
        ];
        let probs: Vec<f32> = rows.iter().flatten().copied().collect();
        let (text, score) = op.decode(&probs, 4);
        assert_eq!(text, "aab");
        assert!((score - (0.8 + 0.7 + 1.0) / 3.0).abs() < 1e-6);
        assert_eq!(op.decode(&[1.0, 0.0, 0.0, 0.0], 4), (String::new(), 0.0));
    }

    #[test]
    fn text_lines_keep_their_ratio_and_pad_to_a_bucket() {
        let rec = TextLineTensor {
            p: LineParams { height: 48, width: None, min_width: 320, width_multiple: 64, max_width: 3200 },
        };
        assert_eq!(rec.widths(100, 10), (480, 512));
        assert_eq!(rec.widths(30, 30), (48, 320));
        let img = Arc::new(Image::filled(20, 10, [255, 0, 0]));
        let t = rec.run(&[Value::Image(img)]).unwrap()[0].as_tensor().unwrap().to_f32().unwrap();
        // BGR: channel 0 is blue (0 -> -1), channel 2 red (255 -> 1); padding stays 0.
        assert_eq!((t[0], t[2 * 48 * 320], t[319]), (-1.0, 1.0, 0.0));
    }
}
