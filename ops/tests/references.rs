//! The ops against independent references: fixtures written by OpenCV, Pillow and numpy
//! (scripts/gen_op_fixtures.py), the libraries models are trained with.

mod common;

use common::*;
use sluice_ops::image_ops::resize_to;
use sluice_ops::op::{BuildContext, OpRegistry};
use sluice_ops::Value;
use std::path::Path;
use std::sync::Arc;

#[test]
fn png_decoding_is_lossless() {
    let img = decode("src.png");
    assert_eq!((img.width, img.height), (37, 23));
}

#[test]
fn bilinear_resize_matches_opencv_inter_linear_within_one_level() {
    let src = decode("src.png");
    for (name, w, h) in [("resize_up.rgb", 53, 31), ("resize_down.rgb", 17, 11)] {
        let ours = resize_to(&src, w, h).unwrap();
        let (max, mean) = diff(&ours.data, &fixture(name));
        assert!(max <= 1, "{name}: max difference {max} levels (mean {mean:.3})");
    }
}

#[test]
fn jpeg_decoding_matches_libjpeg() {
    let ours = decode("photo.jpg");
    assert_eq!((ours.width, ours.height), (64, 48));
    let (max, mean) = diff(&ours.data, &fixture("photo.rgb"));
    // Decoders round their IDCT differently: a few pixels differ by up to 3 levels.
    assert!(max <= 3 && mean < 0.05, "max {max}, mean {mean:.3}");
}

#[test]
fn exif_orientation_matches_pillow_exif_transpose() {
    let ours = decode("photo_orient6.jpg");
    assert_eq!((ours.width, ours.height), (48, 64), "orientation 6 turns the image upright");
    let (max, mean) = diff(&ours.data, &fixture("photo_orient6.rgb"));
    assert!(max <= 3 && mean < 0.05, "max {max}, mean {mean:.3}");
}

#[test]
fn normalize_matches_numpy() {
    let src = decode("src.png");
    let params = serde_json::json!({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]});
    let op = OpRegistry::builtin().build("normalize", &BuildContext::new(params, Path::new("."))).unwrap();
    let out = op.run(&[Value::Image(Arc::new(src))]).unwrap();
    let t = out[0].as_tensor().unwrap();
    assert_eq!(t.shape, vec![3, 23, 37]);
    let want: Vec<f32> =
        fixture("normalize_nchw.f32").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let got = t.to_f32().unwrap();
    let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(max < 1e-5, "max difference {max}");
}

#[test]
fn quad_crops_match_opencv_warp_perspective() {
    let src = decode("src.png");
    let (spec, q) = quad_fixture();
    let ours = sluice_ops::image_ops::warp_quad(&src, std::array::from_fn(|i| (q[2 * i], q[2 * i + 1]))).unwrap();
    assert_eq!(
        (ours.width as u64, ours.height as u64),
        (spec["width"].as_u64().unwrap(), spec["height"].as_u64().unwrap())
    );
    let (max, mean) = diff(&ours.data, &fixture("quad.rgb"));
    // OpenCV samples at 1/32 pixel steps with fixed-point weights; this samples exactly.
    assert!(max <= 3 && mean < 0.5, "max {max}, mean {mean:.3}");
}

#[test]
fn resize_modes_match_opencv_with_numpy_crops_and_padding() {
    let src = Value::Image(Arc::new(decode("src.png")));
    let lb = image_out(&run_op(
        "resize",
        serde_json::json!({"mode": "letterbox", "width": 32, "height": 32, "pad": 114}),
        std::slice::from_ref(&src),
    ));
    let (max, _) = diff(&lb.data, &fixture("letterbox_32x32.rgb"));
    assert!(max <= 1, "letterbox: {max}");
    let crop = image_out(&run_op(
        "resize",
        serde_json::json!({"mode": "shorter_side_crop", "shorter": 20, "width": 16, "height": 16}),
        std::slice::from_ref(&src),
    ));
    let (max, _) = diff(&crop.data, &fixture("shorter_crop_16.rgb"));
    assert!(max <= 1, "shorter side + centre crop: {max}");
    let r = image_out(&run_op("rotate180", serde_json::Value::Null, &[src]));
    assert_eq!(r.data, fixture("rotate180.rgb"));
}

#[test]
fn softmax_topk_and_nms_match_numpy_and_opencv() {
    let d: serde_json::Value = serde_json::from_slice(&fixture("tensors.json")).unwrap();
    let f32s = |k: &str| -> Vec<f32> { d[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect() };
    let ints = |k: &str| -> Vec<i64> { d[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect() };
    let logits = sluice_ops::Tensor::from_f32(vec![50], &f32s("logits"));
    let sm = run_op("softmax", serde_json::Value::Null, &[Value::Tensor(logits.clone())]);
    let got = sm[0].as_tensor().unwrap().to_f32().unwrap();
    assert!(got.iter().zip(f32s("softmax")).all(|(a, b)| (a - b).abs() < 1e-6));
    let top = run_op("topk", serde_json::json!({"k": 5, "softmax": true}), &[Value::Tensor(logits)]);
    assert_eq!(top[1].as_tensor().unwrap().to_i64().unwrap(), ints("top5"));

    let boxes = f32s("boxes");
    let scores = f32s("scores");
    let classes = ints("classes");
    let dets: Vec<sluice_ops::detect::Detection> = (0..scores.len())
        .map(|i| sluice_ops::detect::Detection {
            bbox: [boxes[4 * i], boxes[4 * i + 1], boxes[4 * i + 2], boxes[4 * i + 3]],
            score: scores[i],
            class: classes[i] as usize,
        })
        .collect();
    let kept = sluice_ops::detect::nms(dets.clone(), 0.45, 1000);
    let kept_idx: Vec<i64> = kept.iter().map(|k| dets.iter().position(|d| d == k).unwrap() as i64).collect();
    assert!(kept.len() < dets.len(), "the fixture has overlapping boxes");
    assert_eq!(kept_idx, ints("nms_kept"), "same boxes kept, best first, as cv2.dnn.NMSBoxesBatched");
}

#[test]
fn engine_params_are_checked_when_the_pipeline_loads() {
    let build = |name: &str, params: serde_json::Value| {
        OpRegistry::builtin().build(name, &BuildContext::new(params, Path::new("."))).err().unwrap_or_default()
    };
    let e = build("resize", serde_json::json!({"mode": "stretch", "width": 4, "height": 4, "interpolation": "area"}));
    assert!(e.contains("interpolation: area needs engine: opencv"), "{e}");
    let e = build("decode_image", serde_json::json!({"max_side": 320}));
    assert!(e.contains("max_side") && e.contains("engine: opencv"), "{e}");
    let e = build("crop_quads", serde_json::json!({"interpolation": "area"}));
    assert!(e.contains("a warp takes linear, cubic or nearest"), "{e}");
    let e = build("crop_boxes", serde_json::json!({"engine": "cuda"}));
    assert!(e.contains("cuda"), "{e}");
    // Without OpenCV's kernels installed (sluice-opencv's tests check them installed).
    let e = build("decode_image", serde_json::json!({"engine": "opencv"}));
    assert!(e.contains("`opencv` cargo feature"), "{e}");
}
