//! `engine: opencv` end to end (cargo feature `opencv`): a detection pipeline whose
//! decode and letterbox run on OpenCV, and one that decodes its JPEG at a quarter of the
//! size (`max_side`), answer over the wire with the boxes of the pure-Rust pipeline, in
//! the photo's own pixels; a crop of the reduced decode lands on the same object
//! (tests/tests/e2e/pipelines.rs: OpenCV params without `engine: opencv` fail the load).
#![cfg(feature = "opencv")]

use sluice_client::{InferOptions, Tensor};
use sluice_tests::{start, tiny_detector, Repo};
use std::collections::HashMap;

const DETECTOR_YAML: &str = "max_batch_size: 4\ndynamic_batching:\n  max_queue_delay_us: 2000\n";

/// decode -> letterbox 320 -> the stand-in detector -> boxes, with `decode` and `resize`
/// params as given; also each box's crop as 8x8 pixels (crop_boxes on the decoded image,
/// so a reduced decode is cropped where the box is).
fn detect(decode: &str, resize: &str) -> String {
    format!(
        r#"inputs:
  - {{name: image, dtype: BYTES, dims: [1]}}
outputs:
  - {{name: boxes, from: nms.boxes}}
  - {{name: crops, from: crops.tensor}}
nodes:
  - {{name: decode, op: decode_image, inputs: {{bytes: image}}, params: {decode}}}
  - name: letterbox
    op: resize
    inputs: {{image: decode.image}}
    params: {{mode: letterbox, width: 320, height: 320, pad: 0{resize}}}
  - {{name: to_input, op: normalize, inputs: {{image: letterbox.image}}}}
  - {{name: detector, model: detector, inputs: {{images: to_input.tensor}}}}
  - name: nms
    op: detect_yolo
    inputs: {{predictions: detector.predictions, image: decode.image}}
    params: {{width: 320, height: 320, score_threshold: 0.5}}
  - {{name: crop, op: crop_boxes, inputs: {{image: decode.image, boxes: nms.boxes}}, params: {{resize: [8, 8]}}}}
  - {{name: pixels, op: to_tensor, inputs: {{image: crop.crops}}}}
  - {{name: crops, op: gather, inputs: {{list: pixels.tensor}}}}
"#
    )
}

/// A 1280x1280 black JPEG with pure red squares on the detector's 10x10 grid (128 source
/// pixels a cell): each is a class-0 detection of that exact cell.
fn red_cells_jpeg(cells: &[(u16, u16)]) -> Vec<u8> {
    let side = 1280u16;
    let mut px = vec![0u8; side as usize * side as usize * 3];
    for &(cx, cy) in cells {
        for y in cy * 128..cy * 128 + 128 {
            for x in cx * 128..cx * 128 + 128 {
                px[(y as usize * side as usize + x as usize) * 3] = 255;
            }
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&px, side, side, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

/// Boxes as sorted rows of whole pixels.
fn rows(t: &Tensor) -> Vec<[i64; 4]> {
    let v = t.to_f32().unwrap();
    let mut r: Vec<[i64; 4]> = v.chunks_exact(4).map(|b| std::array::from_fn(|i| b[i].round() as i64)).collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencv_pipelines_find_the_boxes_of_the_rust_one_in_the_photos_pixels() {
    sluice_opencv::install();
    let repo = Repo::new();
    repo.add("detector", &tiny_detector(), DETECTOR_YAML);
    repo.pipeline("rust", &detect("{}", ""));
    repo.pipeline("opencv", &detect("{engine: opencv}", ", engine: opencv"));
    // 1280 / 4 = 320 is the smallest scale still 320 wide: decoded at 320x320.
    repo.pipeline("reduced", &detect("{engine: opencv, max_side: 320}", ", engine: opencv, interpolation: area"));
    let s = start(repo.config()).await;
    let jpeg = red_cells_jpeg(&[(0, 0), (5, 1), (2, 7)]);
    let input = sluice_client::encoded_images(&[jpeg]);
    let mut answers = HashMap::new();
    for p in ["rust", "opencv", "reduced"] {
        let out: HashMap<String, Tensor> =
            s.client.infer(p, &[("image", &input)], InferOptions::default()).await.unwrap().into_iter().collect();
        answers.insert(p, out);
    }
    let want = vec![[0, 0, 128, 128], [256, 896, 384, 1024], [640, 128, 768, 256]];
    for p in ["rust", "opencv", "reduced"] {
        assert_eq!(rows(&answers[p]["boxes"]), want, "{p}: the red cells, in the 1280x1280 photo's pixels");
        // Every box's crop is red whichever size the photo was decoded at.
        let crops = &answers[p]["crops"];
        assert_eq!(crops.shape, vec![1, 3, 8, 8, 3], "{p}");
        for (i, crop) in crops.data.chunks_exact(8 * 8 * 3).enumerate() {
            let mean = |c: usize| crop.iter().skip(c).step_by(3).map(|&v| v as f64).sum::<f64>() / 64.0;
            let rgb = [mean(0), mean(1), mean(2)];
            assert!(rgb[0] > 200.0 && rgb[1] < 40.0 && rgb[2] < 40.0, "{p}: crop {i} colour {rgb:?}");
        }
    }
}
