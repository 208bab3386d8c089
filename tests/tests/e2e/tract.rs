//! `backend: tract` end to end (cargo feature `tract`): the same ONNX files served by
//! ONNX Runtime and by tract in one server give the same answers over the wire, a
//! pipeline on a tract model answers like the one on ONNX Runtime, and what tract cannot
//! run fails that model's load with the reason (tract_without_ort.rs: serving with no
//! ONNX Runtime at all).
#![cfg(feature = "tract")]

use sluice_client::{Client, InferOptions, Tensor};
use sluice_ops::Image;
use sluice_tests::{png, repo_root, start, tiny_classifier, Repo};
use std::path::PathBuf;

/// Outputs may differ by this much (absolute, or relative for values above 1).
const TOLERANCE: f32 = 1e-4;

/// Values in [-2, 2) from a seeded generator (xorshift), so every run sends the same.
fn noise(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 4000) as f32 / 1000.0 - 2.0
        })
        .collect()
}

fn example_model(name: &str) -> PathBuf {
    let p = repo_root().join("models").join(name).join("model.onnx");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first (the README's test command does)", p.display());
    p
}

/// The largest difference between two outputs, scaled for large values.
fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max)
}

async fn infer(c: &Client, model: &str, input: &str, t: &Tensor) -> Vec<(String, Tensor)> {
    c.infer(model, &[(input, t)], InferOptions::default()).await.unwrap_or_else(|e| panic!("{model}: {e}"))
}

async fn reason_of(client: &Client, name: &str) -> String {
    let index = client.repository_index().await.unwrap();
    index.iter().filter(|m| m.name == name).map(|m| m.reason.clone()).collect::<Vec<_>>().join("; ")
}

/// The tiny classifier, ResNet-50 and the OCR direction classifier, each served by ONNX
/// Runtime and by tract twice: as tract runs by default (a batch row by row on the
/// batch-1 plan) and with a plan per allowed size (batches padded, 1 -> 2, 3 -> 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tract_answers_like_onnx_runtime() {
    let repo = Repo::new();
    let resnet = std::fs::read(example_model("resnet50")).unwrap();
    let cls = std::fs::read(example_model("ocr_cls")).unwrap();
    let cls_inputs = "inputs:\n  - name: x\n    dims: [-1, 3, 48, 192]\n";
    for (name, onnx, extra) in [("tiny", tiny_classifier(), ""), ("resnet50", resnet, ""), ("ocr_cls", cls, cls_inputs)]
    {
        let yaml = format!("max_batch_size: 4\n{extra}");
        repo.add(name, &onnx, &yaml);
        repo.add(&format!("{name}_tract"), &onnx, &format!("backend: tract\n{yaml}"));
        // A plan per allowed size: batches padded by the batcher (1 -> 2, 3 -> 4).
        let sized = format!("backend: tract\n{yaml}dynamic_batching:\n  allowed_batch_sizes: [2, 4]\n");
        repo.add(&format!("{name}_tract_sized"), &onnx, &sized);
    }
    let s = start(repo.config()).await;
    let c = &s.client;

    let cfg = c.model_config("resnet50_tract").await.unwrap();
    assert_eq!((cfg.backend.as_str(), cfg.platform.as_str()), ("tract", "tract_onnx"));
    assert_eq!(c.model_metadata("tiny").await.unwrap().platform, "onnxruntime_onnx");

    let cases: [(&str, &str, &[usize]); 3] =
        [("tiny", "input", &[3, 224, 224]), ("resnet50", "input", &[3, 224, 224]), ("ocr_cls", "x", &[3, 48, 192])];
    for (model, input, item) in cases {
        for (rows, seed) in [(1, 1), (3, 2), (4, 3)] {
            let mut shape = vec![rows];
            shape.extend_from_slice(item);
            let t = Tensor::from_f32(shape.clone(), &noise(shape.iter().product(), seed));
            let ort = infer(c, model, input, &t).await;
            for served in [format!("{model}_tract"), format!("{model}_tract_sized")] {
                let tract = infer(c, &served, input, &t).await;
                assert_eq!(ort.len(), tract.len(), "{served}: outputs");
                for ((name, a), (tname, b)) in ort.iter().zip(&tract) {
                    assert_eq!((name, &a.shape), (tname, &b.shape), "{served}: output {name} at batch {rows}");
                    let d = max_difference(&b.to_f32().unwrap(), &a.to_f32().unwrap());
                    println!("{served} batch {rows}: {name} differs by at most {d:e}");
                    assert!(d <= TOLERANCE, "{served} batch {rows}: {name} differs by {d} (over {TOLERANCE})");
                }
            }
        }
    }
    s.server.shutdown().await;
}

/// classify (decode -> resize -> normalize -> ResNet-50 -> top-5) with the model on
/// tract answers like the same pipeline on ONNX Runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_on_tract_answers_like_onnx_runtime() {
    let repo = Repo::new();
    let resnet = std::fs::read(example_model("resnet50")).unwrap();
    repo.add("resnet50", &resnet, "max_batch_size: 4\n");
    repo.add("resnet50_tract", &resnet, "backend: tract\nmax_batch_size: 4\n");
    let classify = std::fs::read_to_string(repo_root().join("pipelines/classify.yaml")).unwrap();
    assert!(classify.contains("model: resnet50\n"));
    repo.pipeline("classify", &classify);
    repo.pipeline("classify_tract", &classify.replace("model: resnet50\n", "model: resnet50_tract\n"));
    let s = start(repo.config()).await;

    let images: Vec<Vec<u8>> = (0..3u32)
        .map(|seed| {
            let (w, h) = (300 + seed * 20, 260);
            let data = (0..h)
                .flat_map(|y| (0..w).flat_map(move |x| [(x % 256) as u8, (y * 3 % 256) as u8, (seed * 70) as u8]))
                .collect();
            png(&Image::new(w, h, data))
        })
        .collect();
    let t = sluice_client::encoded_images(&images);
    let ort = infer(&s.client, "classify", "image", &t).await;
    let tract = infer(&s.client, "classify_tract", "image", &t).await;
    assert_eq!(ort[1].1.to_i64().unwrap(), tract[1].1.to_i64().unwrap(), "the same top-5 classes");
    let d = max_difference(&tract[0].1.to_f32().unwrap(), &ort[0].1.to_f32().unwrap());
    assert!(d <= TOLERANCE, "top-5 scores differ by {d}");
    s.server.shutdown().await;
}

/// What tract cannot run fails that model's load with the file and the reason (an
/// operator it lacks, named; an input whose dims vary), and the rest still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_tract_cannot_run_fails_its_load_naming_why() {
    use prost::Message;
    use sluice_tests::onnx::*;
    let unknown = model(GraphProto {
        name: "unknown".into(),
        node: vec![node("FrobnicateHarder", &["x"], &["y"])],
        input: vec![value("x", &[None, Some(4)])],
        output: vec![value("y", &[None, Some(4)])],
        ..Default::default()
    })
    .encode_to_vec();
    let repo = Repo::new();
    repo.add("unknown", &unknown, "backend: tract\nmax_batch_size: 2\n");
    repo.add(
        "variable",
        &tiny_classifier(),
        "backend: tract\nmax_batch_size: 2\ninputs:\n  - name: input\n    dims: [-1, 3, -1, -1]\n",
    );
    repo.add("fine", &tiny_classifier(), "backend: tract\nmax_batch_size: 2\n");
    // Its input is declared batched but its output has no batch dimension, so its
    // batches could not be split back.
    let unbatched = "backend: tract\nmax_batch_size: 2\ninputs:\n  - name: x\n    dims: [-1, 512]\n";
    repo.add("unbatched", &sluice_tests::busy_model(2), unbatched);
    let s = start(repo.config()).await;
    let c = &s.client;
    let why = reason_of(c, "unknown").await;
    assert!(why.contains("does not implement the ONNX operator(s) FrobnicateHarder"), "{why}");
    assert!(why.contains("model.onnx"), "{why}");
    let why = reason_of(c, "unbatched").await;
    assert!(why.contains("output 'y' has a fixed first dimension 1"), "{why}");
    let why = reason_of(c, "variable").await;
    assert!(why.contains("'input'") && why.contains("inputs:"), "{why}");
    assert!(c.model_ready("fine").await.unwrap());
    s.server.shutdown().await;
}

/// A tract model reloads like any other: the new file is planned and warmed up, then
/// serves in place of the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tract_model_reloads() {
    let repo = Repo::new();
    repo.add("m", &tiny_classifier(), "backend: tract\nmax_batch_size: 2\n");
    let s = start(repo.config()).await;
    let c = &s.client;
    assert_eq!(c.model_metadata("m").await.unwrap().inputs[0].name, "input");
    repo.add("m", &sluice_tests::affine_model(4), "backend: tract\nmax_batch_size: 4\n");
    c.repository_load("m").await.unwrap();
    assert_eq!(c.model_config("m").await.unwrap().max_batch_size, 4);
    let x: Vec<f32> = noise(12, 9);
    let out = infer(c, "m", "x", &Tensor::from_f32(vec![3, 4], &x)).await;
    let (y, neg) = sluice_tests::affine_reference(&x);
    assert_eq!(out[0].1.to_f32().unwrap(), y);
    assert_eq!(out[1].1.to_f32().unwrap(), neg);
    s.server.shutdown().await;
}

/// Requests of 1, 3 and 4 rows arriving together share tract batches (several requests'
/// rows in one batch, run row by row or on a padded plan) and each gets its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_tract_batches_and_get_their_own_rows() {
    let repo = Repo::new();
    let batching = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 50000\n  hold: delay\n";
    repo.add("tiny", &tiny_classifier(), batching);
    repo.add("tiny_tract", &tiny_classifier(), &format!("backend: tract\n{batching}"));
    let sized = format!("backend: tract\n{batching}  allowed_batch_sizes: [4, 8]\n");
    repo.add("tiny_tract_sized", &tiny_classifier(), &sized);
    let s = start(repo.config()).await;
    let c = &s.client;
    let requests: Vec<Tensor> = [1usize, 3, 4]
        .iter()
        .enumerate()
        .map(|(k, &rows)| Tensor::from_f32(vec![rows, 3, 224, 224], &noise(rows * 3 * 224 * 224, k as u32 + 5)))
        .collect();
    for model in ["tiny", "tiny_tract", "tiny_tract_sized"] {
        let calls = requests.iter().map(|t| infer(c, model, "input", t));
        let answers = futures::future::join_all(calls).await;
        let want: Vec<Vec<f32>> = futures::future::join_all(requests.iter().map(|t| infer(c, "tiny", "input", t)))
            .await
            .into_iter()
            .map(|o| o[0].1.to_f32().unwrap())
            .collect();
        for (k, (got, want)) in answers.iter().zip(&want).enumerate() {
            assert_eq!(got[0].1.shape, vec![requests[k].shape[0], 1000], "{model} request {k}");
            let d = max_difference(&got[0].1.to_f32().unwrap(), want);
            assert!(d <= TOLERANCE, "{model} request {k}: differs by {d}");
        }
        let stats = c.model_statistics(model).await.unwrap();
        let largest = stats[0].batch_stats.iter().map(|b| b.batch_size).max().unwrap_or(0);
        assert!(largest >= 4, "{model}: requests shared a batch: {:?}", stats[0].batch_stats);
    }
    s.server.shutdown().await;
}

/// BOOL inputs from the wire may carry any byte; tract sees only 0 and 1 (as ONNX
/// Runtime does), and a model without a batch dimension runs as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bool_inputs_are_normalised_and_unbatched_models_run() {
    use prost::Message;
    use sluice_tests::onnx::*;
    let mut x = value("x", &[Some(1), Some(3)]);
    let mut y = value("y", &[Some(1), Some(3)]);
    for v in [&mut x, &mut y] {
        v.r#type.as_mut().unwrap().tensor_type.as_mut().unwrap().elem_type = 9; // BOOL
    }
    let not = model(GraphProto {
        name: "not".into(),
        node: vec![node("Not", &["x"], &["y"])],
        input: vec![x],
        output: vec![y],
        ..Default::default()
    })
    .encode_to_vec();
    let repo = Repo::new();
    repo.add("not", &not, "backend: tract\n");
    repo.add("busy", &sluice_tests::busy_model(2), "backend: tract\n");
    repo.add("busy_ort", &sluice_tests::busy_model(2), "");
    let s = start(repo.config()).await;
    let c = &s.client;
    let t = Tensor::new(sluice_client::DataType::Bool, vec![1, 3], vec![0u8, 7, 255].into()).unwrap();
    let out = infer(c, "not", "x", &t).await;
    assert_eq!(out[0].1.data.to_vec(), vec![1u8, 0, 0], "7 and 255 are true");
    let x = Tensor::from_f32(vec![1, 512], &noise(512, 4));
    let (a, b) = (infer(c, "busy", "x", &x).await, infer(c, "busy_ort", "x", &x).await);
    assert_eq!(a[0].1.shape, vec![1, 512]);
    assert!(max_difference(&a[0].1.to_f32().unwrap(), &b[0].1.to_f32().unwrap()) <= TOLERANCE);
    s.server.shutdown().await;
}
