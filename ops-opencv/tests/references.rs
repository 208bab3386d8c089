//! `engine: opencv` against the fixtures of sluice-ops's reference tests
//! (ops/tests/references.rs), at the same tolerances as the pure-Rust engine, and
//! OpenCV's other kernels against cv2's output. Each test installs the kernels first, as
//! the `sluice` command does at start-up.

#[path = "../../ops/tests/common/mod.rs"]
mod common;

use common::*;
use opencv::core::{Mat, Vec3b};
use opencv::prelude::*;
use sluice_opencv::{decode as cv_decode, reduction, resize as cv_resize};
use sluice_ops::image_ops::Interpolation;
use sluice_ops::op::{BuildContext, OpRegistry};
use sluice_ops::{Image, OpError, Value};
use std::path::Path;
use std::sync::Arc;

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
    let params =
        opencv::core::Vector::<i32>::from_slice(&[opencv::imgcodecs::IMWRITE_JPEG_PROGRESSIVE, i32::from(progressive)]);
    opencv::imgcodecs::imencode(".jpg", &src, &mut buf, &params).unwrap();
    buf.to_vec()
}

#[test]
fn odd_sizes_round_up_as_libjpeg_does_and_progressive_files_decode_reduced() {
    sluice_opencv::install();
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
    sluice_opencv::install();
    let src = Value::Image(Arc::new(decode("src.png")));
    let flat = Value::Tensor(sluice_ops::Tensor::from_f32(vec![1, 8], &[1.0, 1.0, 9.0, 9.0, 17.0, 17.0, 25.0, 25.0]));
    let op = OpRegistry::builtin()
        .build("crop_quads", &BuildContext::new(serde_json::json!({"engine": "opencv"}), Path::new(".")))
        .unwrap();
    let e = op.run(&[src, flat]).unwrap_err();
    assert!(matches!(&e, OpError::Invalid(m) if m.contains("degenerate")), "{e}");
}

#[test]
fn a_reduced_decode_is_smaller_and_remembers_the_full_size() {
    sluice_opencv::install();
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
    sluice_opencv::install();
    let jpeg = photo_jpeg(200, 120);
    assert!(matches!(cv_decode(&jpeg, 1000, Some(50)), Err(OpError::TooLarge(_))), "caps apply to the full size");
    let mut cut = jpeg.clone();
    cut.truncate(40);
    assert!(matches!(cv_decode(&cut, 1 << 20, None), Err(OpError::Invalid(_))));
}

#[test]
fn resize_matches_opencv_inter_linear_and_inter_area() {
    sluice_opencv::install();
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
    sluice_opencv::install();
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
    sluice_opencv::install();
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
    sluice_opencv::install();
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
    sluice_opencv::install();
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

#[test]
fn engine_opencv_loads_once_installed() {
    sluice_opencv::install();
    let built = OpRegistry::builtin()
        .build("decode_image", &BuildContext::new(serde_json::json!({"engine": "opencv"}), Path::new(".")));
    assert!(built.is_ok(), "{:?}", built.err());
}
