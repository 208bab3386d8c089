//! The ops against independent references: fixtures written by OpenCV, Pillow and numpy
//! (scripts/gen_op_fixtures.py), the libraries models are trained with.

use sluice_ops::image_ops::{decode_image, resize_to};
use sluice_ops::op::{BuildContext, OpRegistry};
use sluice_ops::{Image, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture(name: &str) -> Vec<u8> {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn decode(name: &str) -> Image {
    decode_image(&fixture(name), 1 << 24).unwrap()
}

/// Largest and mean absolute difference between two 8-bit buffers.
fn diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len(), "sizes differ");
    let d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    (*d.iter().max().unwrap(), d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64)
}

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

/// quad.json: the crop's expected size, and the quad's corners as x, y pairs.
fn quad_fixture() -> (serde_json::Value, Vec<f32>) {
    let spec: serde_json::Value = serde_json::from_slice(&fixture("quad.json")).unwrap();
    let q = spec["quad"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| [p[0].as_f64().unwrap() as f32, p[1].as_f64().unwrap() as f32])
        .collect();
    (spec, q)
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

fn run_op(name: &str, params: serde_json::Value, inputs: &[Value]) -> Vec<Value> {
    OpRegistry::builtin().build(name, &BuildContext::new(params, Path::new("."))).unwrap().run(inputs).unwrap()
}

fn image_out(v: &[Value]) -> Arc<Image> {
    v[0].as_image().unwrap().clone()
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

/// `engine: opencv` against the same fixtures, at the same tolerances as the pure-Rust
/// engine, and OpenCV's other kernels against cv2's output.
#[cfg(feature = "opencv")]
mod opencv_engine {
    use super::*;
    use opencv::core::{Mat, Vec3b};
    use opencv::prelude::*;
    use sluice_ops::cv::{decode as cv_decode, reduction, resize as cv_resize};
    use sluice_ops::image_ops::Interpolation;
    use sluice_ops::OpError;

    fn decode_cv(name: &str, params: serde_json::Value) -> Arc<Image> {
        let bytes = Value::Bytes(fixture(name).into());
        image_out(&run_op("decode_image", params, &[bytes]))
    }

    #[test]
    fn the_reduction_keeps_the_longer_side_at_least_max_side() {
        assert_eq!(reduction(4032, 3024, 320), 8, "504 >= 320");
        assert_eq!(reduction(4032, 3024, 640), 4, "1008 >= 640, 504 is not");
        assert_eq!(reduction(1920, 1080, 640), 2, "960 >= 640");
        assert_eq!(reduction(1920, 1080, 1000), 1, "960 < 1000: full size");
        assert_eq!(reduction(1001, 10, 126), 8, "libjpeg rounds up: 1001 / 8 -> 126");
    }

    fn photo_jpeg(w: u32, h: u32) -> Vec<u8> {
        encode(w, h, false)
    }

    /// A gradient as a JPEG, baseline or progressive.
    fn encode(w: u32, h: u32, progressive: bool) -> Vec<u8> {
        let data: Vec<u8> = (0..w * h).flat_map(|i| [(i % w * 255 / w) as u8, (i / w * 255 / h) as u8, 90]).collect();
        let src = Mat::new_rows_cols_with_bytes::<Vec3b>(h as i32, w as i32, &data).unwrap();
        let mut buf = opencv::core::Vector::<u8>::new();
        let params = opencv::core::Vector::<i32>::from_slice(&[
            opencv::imgcodecs::IMWRITE_JPEG_PROGRESSIVE,
            i32::from(progressive),
        ]);
        opencv::imgcodecs::imencode(".jpg", &src, &mut buf, &params).unwrap();
        buf.to_vec()
    }

    #[test]
    fn odd_sizes_round_up_as_libjpeg_does_and_progressive_files_decode_reduced() {
        // 201 / 8 and 121 / 8 round up: 26x16.
        for progressive in [false, true] {
            let img = cv_decode(&encode(201, 121, progressive), 1 << 20, Some(26)).unwrap();
            assert_eq!((img.width, img.height, img.source_size()), (26, 16, (201, 121)), "progressive {progressive}");
        }
        let (a, b) = (encode(201, 121, false), encode(201, 121, true));
        assert!(a[2..].windows(2).any(|m| m == [0xFF, 0xC0]) && b[2..].windows(2).any(|m| m == [0xFF, 0xC2]));
    }

    #[test]
    fn a_degenerate_quad_is_invalid_input_on_opencv_too() {
        let src = Value::Image(Arc::new(decode("src.png")));
        let flat =
            Value::Tensor(sluice_ops::Tensor::from_f32(vec![1, 8], &[1.0, 1.0, 9.0, 9.0, 17.0, 17.0, 25.0, 25.0]));
        let op = OpRegistry::builtin()
            .build("crop_quads", &BuildContext::new(serde_json::json!({"engine": "opencv"}), Path::new(".")))
            .unwrap();
        let e = op.run(&[src, flat]).unwrap_err();
        assert!(matches!(&e, OpError::Invalid(m) if m.contains("degenerate")), "{e}");
    }

    #[test]
    fn a_reduced_decode_is_smaller_and_remembers_the_full_size() {
        let jpeg = photo_jpeg(200, 120);
        let full = cv_decode(&jpeg, 1 << 20, None).unwrap();
        assert_eq!((full.width, full.height, full.source_size()), (200, 120, (200, 120)));
        let quarter = cv_decode(&jpeg, 1 << 20, Some(50)).unwrap();
        assert_eq!((quarter.width, quarter.height), (50, 30));
        assert_eq!(quarter.source_size(), (200, 120));
        assert_eq!(quarter.source_scale(), (0.25, 0.25));
        // The same picture: the reduced decode against the full one shrunk by area.
        let mut shrunk = Image::alloc(50, 30).unwrap();
        cv_resize(&full, (0, 0, 200, 120), &mut shrunk, (0, 0, 50, 30), Interpolation::Area).unwrap();
        let mean = quarter.data.iter().zip(&shrunk.data).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>()
            / quarter.data.len() as f64;
        assert!(mean < 3.0, "mean difference {mean:.2} levels");
    }

    #[test]
    fn the_caps_hold_before_opencv_allocates_and_bad_data_is_invalid() {
        let jpeg = photo_jpeg(200, 120);
        assert!(matches!(cv_decode(&jpeg, 1000, Some(50)), Err(OpError::TooLarge(_))), "caps apply to the full size");
        let mut cut = jpeg.clone();
        cut.truncate(40);
        assert!(matches!(cv_decode(&cut, 1 << 20, None), Err(OpError::Invalid(_))));
    }

    #[test]
    fn resize_matches_opencv_inter_linear_and_inter_area() {
        let src = Value::Image(Arc::new(decode("src.png")));
        for (name, w, h, interpolation) in [
            ("resize_up.rgb", 53, 31, "linear"),
            ("resize_down.rgb", 17, 11, "linear"),
            ("resize_down_area.rgb", 17, 11, "area"),
        ] {
            let params = serde_json::json!({"mode": "stretch", "width": w, "height": h, "engine": "opencv",
                "interpolation": interpolation});
            let ours = image_out(&run_op("resize", params, std::slice::from_ref(&src)));
            let (max, mean) = diff(&ours.data, &fixture(name));
            assert!(max <= 1, "{name}: max difference {max} levels (mean {mean:.3})");
        }
    }

    #[test]
    fn resize_modes_match_opencv_with_numpy_crops_and_padding() {
        let src = Value::Image(Arc::new(decode("src.png")));
        let lb = image_out(&run_op(
            "resize",
            serde_json::json!({"mode": "letterbox", "width": 32, "height": 32, "pad": 114, "engine": "opencv"}),
            std::slice::from_ref(&src),
        ));
        let (max, _) = diff(&lb.data, &fixture("letterbox_32x32.rgb"));
        assert!(max <= 1, "letterbox: {max}");
        let crop = image_out(&run_op(
            "resize",
            serde_json::json!({"mode": "shorter_side_crop", "shorter": 20, "width": 16, "height": 16,
                "engine": "opencv"}),
            std::slice::from_ref(&src),
        ));
        let (max, _) = diff(&crop.data, &fixture("shorter_crop_16.rgb"));
        assert!(max <= 1, "shorter side + centre crop: {max}");
    }

    #[test]
    fn jpeg_decoding_matches_libjpeg_with_orientation_and_at_half_size() {
        let full = decode_cv("photo.jpg", serde_json::json!({"engine": "opencv"}));
        let (max, mean) = diff(&full.data, &fixture("photo.rgb"));
        assert!(max <= 3 && mean < 0.05, "max {max}, mean {mean:.3}");
        let upright = decode_cv("photo_orient6.jpg", serde_json::json!({"engine": "opencv"}));
        assert_eq!((upright.width, upright.height), (48, 64));
        let (max, mean) = diff(&upright.data, &fixture("photo_orient6.rgb"));
        assert!(max <= 3 && mean < 0.05, "max {max}, mean {mean:.3}");
        // max_side 30: 1/2 (32 wide) is the smallest scale still at least 30 wide.
        let half = decode_cv("photo.jpg", serde_json::json!({"engine": "opencv", "max_side": 30}));
        assert_eq!((half.width, half.height, half.source_size()), (32, 24, (64, 48)));
        let (max, mean) = diff(&half.data, &fixture("photo_half.rgb"));
        assert!(max <= 3 && mean < 0.05, "max {max}, mean {mean:.3}");
        // The same half-size decode of the turned photo is upright and knows its full size.
        let half = decode_cv("photo_orient6.jpg", serde_json::json!({"engine": "opencv", "max_side": 30}));
        assert_eq!((half.width, half.height, half.source_size()), (24, 32, (48, 64)));
    }

    #[test]
    fn quad_crops_match_opencv_warp_perspective_linear_and_cubic() {
        let src = Value::Image(Arc::new(decode("src.png")));
        let (_, q) = quad_fixture();
        let quads = Value::Tensor(sluice_ops::Tensor::from_f32(vec![1, 4, 2], &q));
        // Per kernel, the largest difference allowed (bicubic's weights span more levels).
        for (name, interpolation, tolerance) in [("quad.rgb", "linear", 3), ("quad_cubic.rgb", "cubic", 6)] {
            let params = serde_json::json!({"engine": "opencv", "interpolation": interpolation});
            let out = run_op("crop_quads", params, &[src.clone(), quads.clone()]);
            let crop = out[0].as_list().unwrap()[0].as_image().unwrap().clone();
            let (max, mean) = diff(&crop.data, &fixture(name));
            // The pure-Rust warp's tolerance: the fixtures' cv2 (PyPI) is a newer OpenCV
            // than the Debian one linked here, and rounds a few warped pixels differently.
            assert!(max <= tolerance && mean < 0.5, "{name}: max {max}, mean {mean:.3}");
        }
    }

    #[test]
    fn crops_of_a_reduced_decode_fall_where_the_boxes_are() {
        let full = decode_cv("photo.jpg", serde_json::json!({"engine": "opencv"}));
        let half = decode_cv("photo.jpg", serde_json::json!({"engine": "opencv", "max_side": 30}));
        // A box in the photo's full-size pixels, cropped from both and resized alike.
        let boxes = Value::Tensor(sluice_ops::Tensor::from_f32(vec![1, 4], &[8.0, 8.0, 40.0, 32.0]));
        let params = serde_json::json!({"resize": [16, 12], "engine": "opencv", "interpolation": "area"});
        let a = run_op("crop_boxes", params.clone(), &[Value::Image(full), boxes.clone()]);
        let b = run_op("crop_boxes", params, &[Value::Image(half), boxes]);
        let (a, b) = (a[0].as_list().unwrap()[0].as_image().unwrap(), b[0].as_list().unwrap()[0].as_image().unwrap());
        let (_, mean) = diff(&a.data, &b.data);
        assert!(mean < 4.0, "the same region: mean difference {mean:.2} levels");
    }
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
    let e = build("decode_image", serde_json::json!({"engine": "opencv"}));
    if cfg!(feature = "opencv") {
        assert_eq!(e, "", "this build has OpenCV");
    } else {
        assert!(e.contains("`opencv` cargo feature"), "{e}");
    }
}
