//! A repository of tract models serves from the binary alone: no ONNX Runtime library
//! anywhere (cargo feature `tract`). A process of its own: ONNX Runtime, once loaded by
//! any test in a process, stays loaded.
#![cfg(feature = "tract")]

use sluice_client::{InferOptions, Tensor};
use sluice_tests::{start, tiny_classifier, Repo};
use std::path::PathBuf;

/// With no ONNX Runtime library anywhere, tract models load and serve; a model that
/// needs ONNX Runtime fails its own load, saying so, and the server still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tract_models_serve_without_onnx_runtime() {
    let repo = Repo::new();
    repo.add("tiny_tract", &tiny_classifier(), "backend: tract\nmax_batch_size: 2\n");
    repo.add("tiny_ort", &tiny_classifier(), "max_batch_size: 2\n");
    let mut cfg = repo.config();
    cfg.ort_dylib = PathBuf::from("/nonexistent/libonnxruntime.so");
    let s = start(cfg).await;
    let c = &s.client;
    assert!(c.model_ready("tiny_tract").await.unwrap());
    assert!(!c.model_ready("tiny_ort").await.unwrap());
    let index = c.repository_index().await.unwrap();
    let why = &index.iter().find(|m| m.name == "tiny_ort").unwrap().reason;
    assert!(why.contains("ONNX Runtime library not found"), "{why}");

    // A grey image of mean 0.5 in every channel: logit k = sum over c of 0.5 * w(c, k).
    let t = Tensor::from_f32(vec![1, 3, 224, 224], &vec![0.5; 3 * 224 * 224]);
    let out = c.infer("tiny_tract", &[("input", &t)], InferOptions::default()).await.unwrap();
    let logits = out[0].1.to_f32().unwrap();
    for (k, v) in logits.iter().enumerate() {
        let want: f32 = (0..3).map(|ch| 0.5 * sluice_tests::tiny_classifier_weight(ch, k)).sum();
        assert!((v - want).abs() < 1e-4, "logit {k}: {v} != {want}");
    }
    s.server.shutdown().await;
}
