//! Compatibility with Triton's own tools, installed by scripts/setup.sh: the Python
//! `tritonclient` (gRPC and HTTP) and the `perf_analyzer` load generator.

use sluice_tests::{affine_model, config, repo_root, start, Repo};
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
