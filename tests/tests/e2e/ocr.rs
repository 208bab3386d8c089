//! The OCR pipeline end to end with the real PaddleOCR models (installed by
//! scripts/setup.sh from the rapidocr-onnxruntime wheel): images rendered here with known
//! text come back with that text, over gRPC (tensors) and HTTP (JSON).

use serde_json::{json, Value};
use sluice_client::{encoded_images, InferOptions, Tensor};
use sluice_tests::{ocr_repo, render_text as render, start};
use std::collections::HashMap;

/// Character error rate: edit distance over the reference's length.
fn cer(got: &str, want: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (got.chars().collect(), want.chars().collect());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()] as f64 / b.len().max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocr_reads_rendered_text_in_reading_order() {
    let repo = ocr_repo();
    let images = tempfile::tempdir().unwrap();
    let cases = render(images.path());
    let s = start(repo.config()).await;
    // Clear, horizontal text in a proportional font: exact. The rest: a small error rate
    // (monospace gaps and small bold text split or merge words).
    let exact = ["sans", "serif", "chinese", "chinese_long", "upside_down", "three_lines", "two_columns", "blank"];
    let mut report = Vec::new();
    for (file, want) in &cases {
        let png = std::fs::read(images.path().join(file)).unwrap();
        let out = s.client.infer("ocr", &[("image", &encoded_images(&[png]))], InferOptions::default()).await.unwrap();
        let out: HashMap<String, Tensor> = out.into_iter().collect();
        let texts: Vec<String> =
            out["texts"].bytes_elements().unwrap().iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect();
        assert_eq!(out["boxes"].shape, vec![1, texts.len(), 4, 2], "{file}");
        let scores = out["scores"].to_f32().unwrap();
        assert!(scores.iter().all(|&s| (0.5..=1.0).contains(&s)), "{file}: {scores:?}");
        let name = file.trim_end_matches(".png");
        if exact.contains(&name) {
            assert_eq!(&texts, want, "{file}");
        } else {
            let rate = cer(&texts.join(" "), &want.join(" "));
            report.push(format!("{file}: {texts:?} vs {want:?}, CER {rate:.3}"));
            assert!(rate <= 0.2, "{file}: {texts:?} vs {want:?}");
        }
    }
    eprintln!("character error rates:\n{}", report.join("\n"));

    // Several images in one request: lines per image, padded to the longest list.
    let pngs: Vec<Vec<u8>> =
        ["three_lines.png", "blank.png"].iter().map(|f| std::fs::read(images.path().join(f)).unwrap()).collect();
    let out = s.client.infer("ocr", &[("image", &encoded_images(&pngs))], InferOptions::default()).await.unwrap();
    let texts = &out.iter().find(|(n, _)| n == "texts").unwrap().1;
    assert_eq!(texts.shape, vec![2, 3]);
    let all = texts.bytes_elements().unwrap();
    assert_eq!((&all[0][..], &all[3][..]), (&b"First line here"[..], &b""[..]), "the blank page's rows are padding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocr_over_http_returns_json_lines() {
    let repo = ocr_repo();
    let images = tempfile::tempdir().unwrap();
    render(images.path());
    let s = start(repo.config()).await;
    let png = std::fs::read(images.path().join("sans.png")).unwrap();
    // The binary tensor extension for the image in, plain JSON out.
    let header = json!({
        "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": png.len() + 4}}],
        "outputs": [{"name": "texts"}, {"name": "boxes"}, {"name": "scores"}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend((png.len() as u32).to_le_bytes());
    body.extend(&png);
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/models/ocr/infer", s.http))
        .header("Inference-Header-Content-Length", header.len())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let out = |n: &str| v["outputs"].as_array().unwrap().iter().find(|o| o["name"] == n).unwrap().clone();
    assert_eq!(out("texts")["data"], json!(["Hello sluice 2026"]));
    assert_eq!(out("boxes")["shape"], json!([1, 1, 4, 2]));
    let corners: Vec<f64> = out("boxes")["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    // The text was drawn at (40, 120) in 44 px DejaVu Sans: its box is around it.
    assert!(corners[0] > 30.0 && corners[0] < 50.0 && corners[1] > 115.0 && corners[1] < 135.0, "{corners:?}");
}

/// `fold_graph` rewrites the PaddleOCR models (affine blocks, hard-swish): the rewritten
/// graphs must compute what the files do, up to float rounding.
#[test]
fn folded_ocr_models_compute_what_the_files_do() {
    use sluice_server::backend::{ort, Backend};
    use sluice_server::offline::{read_signature, ModelYaml};
    let repo = ocr_repo();
    for (m, shape) in [("ocr_det", [1, 3, 96, 160]), ("ocr_cls", [3, 3, 48, 192]), ("ocr_rec", [2, 3, 48, 160])] {
        let file = repo.path().join(m).join("model.onnx");
        let sig = read_signature(&std::fs::read(&file).unwrap()).unwrap();
        let mut cfg = ModelYaml::parse(&file.with_file_name("model.yaml"), "").unwrap();
        // Text-like input: dark strokes on a light page, in the models' [-1, 1] range.
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|i| if (i * 7 / 5 + i / 97) % 11 < 3 { -0.8 } else { 0.9 }).collect();
        let x = Tensor::from_f32(shape.to_vec(), &x);
        let mut outputs = Vec::new();
        for fold in [true, false] {
            cfg.fold_graph = fold;
            let source = ort::ModelSource::prepare(&sluice_tests::ort_dylib(), &file, &cfg).unwrap();
            assert_eq!(source.folded.is_some(), fold, "{m}: folding applied");
            let mut b = ort::load(&sluice_tests::ort_dylib(), &source, &cfg, 0, &sig.inputs, &sig.outputs).unwrap();
            outputs.push(b.run(std::slice::from_ref(&x)).unwrap().remove(0).to_f32().unwrap());
        }
        let (folded, file_out) = (&outputs[0], &outputs[1]);
        assert_eq!(folded.len(), file_out.len());
        let worst = folded.iter().zip(file_out).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-4, "{m}: outputs differ by up to {worst}");
    }
}
