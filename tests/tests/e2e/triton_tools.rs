//! Compatibility with Triton's own tools, installed by scripts/setup.sh: the Python
//! `tritonclient` (gRPC and HTTP) and the `perf_analyzer` load generator.

use sluice_client::{InferOptions, Tensor};
use sluice_tests::{affine_model, config, png, repo_root, start, tiny_classifier, Repo};
use std::path::PathBuf;
use std::process::Command;

fn tool(rel: &str) -> PathBuf {
    let p = repo_root().join(rel);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first (the README's test command does)", p.display());
    p
}

async fn run(mut cmd: Command) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("tool starts");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn affine_repo() -> Repo {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 1000\n");
    repo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_talks_to_sluice_over_grpc_and_http() {
    let repo = affine_repo();
    let s = start(config(repo.path())).await;
    let mut cmd = Command::new(tool(".venv/bin/python"));
    cmd.arg(repo_root().join("tests/python/tritonclient_check.py"))
        .arg(s.server.grpc_addr.to_string())
        .arg(s.server.http_addr.to_string())
        .arg("affine");
    let (ok, out) = run(cmd).await;
    assert!(ok, "tritonclient check failed:\n{out}");
    assert!(out.contains("all checks passed"), "{out}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_analyzer_load_tests_sluice_over_grpc() {
    let _machine = crate::loads_the_machine().await;
    let repo = affine_repo();
    let s = start(config(repo.path())).await;
    let mut cmd = Command::new(tool(".sluice/bin/perf_analyzer"));
    cmd.args(["-m", "affine", "-i", "grpc", "-u"]).arg(s.server.grpc_addr.to_string());
    cmd.args(["--concurrency-range", "1:4:3", "--measurement-interval", "1000", "-b", "1"]);
    // A compatibility check, not a benchmark: accept noisy windows on a busy CI machine.
    cmd.args(["--stability-percentage", "100", "--max-trials", "20"]);
    let (ok, out) = run(cmd).await;
    assert!(ok, "perf_analyzer failed:\n{out}");
    assert!(out.contains("Concurrency: 4, throughput:"), "{out}");
    // What perf_analyzer sent is what the server counted.
    let stats = &s.client.model_statistics("affine").await.unwrap()[0];
    assert!(stats.inference_count > 100, "perf_analyzer ran only {} inferences", stats.inference_count);
    assert_eq!(stats.inference_stats.unwrap().fail.unwrap().count, 0);
    s.server.shutdown().await;
}

/// The `classify` example pipeline with a stand-in classifier, and two PNG files.
fn classify_repo() -> (Repo, Vec<PathBuf>) {
    let repo = Repo::new();
    repo.add("resnet50", &tiny_classifier(), "max_batch_size: 8\n");
    let text = std::fs::read_to_string(repo_root().join("pipelines/classify.yaml")).unwrap();
    repo.pipeline("classify", &text);
    let files = (0..2u8)
        .map(|i| {
            let img = sluice_ops::Image::filled(64 + 32 * i as u32, 48, [200, 40 + 100 * i, 90]);
            let f = repo.pipelines_path().join(format!("img{i}.png"));
            std::fs::write(&f, png(&img)).unwrap();
            f
        })
        .collect();
    (repo, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_calls_a_pipeline_with_encoded_images() {
    let (repo, files) = classify_repo();
    let s = start(repo.config()).await;
    let blobs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut t = Tensor::from_bytes_elements(vec![2], &blobs);
    t.shape = vec![2, 1];
    let out = s.client.infer("classify", &[("image", &t)], InferOptions::default()).await.unwrap();
    let classes = out.iter().find(|(n, _)| n == "classes").unwrap().1.to_i64().unwrap();
    let rows: Vec<&[i64]> = classes.chunks(5).collect();
    let mut cmd = Command::new(tool(".venv/bin/python"));
    cmd.arg(repo_root().join("tests/python/tritonclient_pipeline_check.py"))
        .arg(s.server.grpc_addr.to_string())
        .arg(s.server.http_addr.to_string())
        .args(&files)
        .arg("--")
        .arg(serde_json::to_string(&rows).unwrap());
    let (ok, out) = run(cmd).await;
    assert!(ok, "tritonclient pipeline check failed:\n{out}");
    assert!(out.contains("all checks passed"), "{out}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_analyzer_load_tests_a_pipeline_with_image_data() {
    let _machine = crate::loads_the_machine().await;
    let (repo, files) = classify_repo();
    let s = start(repo.config()).await;
    // perf_analyzer takes BYTES data as base64 of the serialized tensor: each element's
    // 4-byte little-endian length, then its bytes.
    let blob = std::fs::read(&files[0]).unwrap();
    let mut raw = (blob.len() as u32).to_le_bytes().to_vec();
    raw.extend(&blob);
    let data = serde_json::json!({"data": [{"image": {"b64": b64(&raw), "shape": [1]}}]});
    let data_file = repo.pipelines_path().join("input.json");
    std::fs::write(&data_file, data.to_string()).unwrap();
    let mut cmd = Command::new(tool(".sluice/bin/perf_analyzer"));
    cmd.args(["-m", "classify", "-i", "grpc", "-u"]).arg(s.server.grpc_addr.to_string());
    cmd.arg("--input-data").arg(&data_file).args(["--shape", "image:1"]);
    cmd.args(["--concurrency-range", "2:2", "--measurement-interval", "1000", "-b", "1"]);
    cmd.args(["--stability-percentage", "100", "--max-trials", "20"]);
    let (ok, out) = run(cmd).await;
    assert!(ok, "perf_analyzer failed:\n{out}");
    assert!(out.contains("Concurrency: 2, throughput:"), "{out}");
    let stats = &s.client.model_statistics("classify").await.unwrap()[0];
    assert!(stats.inference_count > 20, "perf_analyzer ran only {} inferences", stats.inference_count);
    assert_eq!(stats.inference_stats.unwrap().fail.unwrap().count, 0);
    s.server.shutdown().await;
}

/// Standard base64 with padding (what perf_analyzer's "b64" expects).
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}
