//! `backend: remote` over loopback: a CPU tier serving `detect_crop_classify` whose
//! detector and classifier are remote models on two model-tier servers. Its answers
//! equal the all-local pipeline's; one model-tier server stopped under load costs no
//! request, and is ejected while the other takes the traffic.

use sluice_client::{InferOptions, Tensor};
use sluice_tests::{cells_png, example_pipeline, metric, start, tiny_classifier, tiny_detector, Repo, TestServer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CLASSIFIER_YAML: &str = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 2000\n";
const DETECTOR_YAML: &str = "max_batch_size: 4\ndynamic_batching:\n  max_queue_delay_us: 2000\n";

/// The stand-in models, served locally.
fn model_tier() -> Repo {
    let repo = Repo::new();
    repo.add("resnet50", &tiny_classifier(), CLASSIFIER_YAML);
    repo.add("detector", &tiny_detector(), DETECTOR_YAML);
    repo
}

/// A model folder with only a model.yaml: the model lives on `endpoints`.
fn add_remote(repo: &Repo, name: &str, endpoints: &[SocketAddr]) {
    let list: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let yaml = format!(
        "backend: remote\ninstances: 4\ndynamic_batching:\n  max_queue_delay_us: 2000\nremote:\n  endpoints: [{}]\n  health_interval_ms: 200\n  timeout_ms: 5000\n",
        list.join(", ")
    );
    let d = repo.path().join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("model.yaml"), yaml).unwrap();
}

fn cells(cells: &[(u32, u32, [u8; 3])]) -> Tensor {
    sluice_client::encoded_images(&[cells_png(cells)])
}

async fn call(s: &TestServer, input: &Tensor) -> Result<HashMap<String, Tensor>, sluice_client::ClientError> {
    let out = s.client.infer("detect_crop_classify", &[("image", input)], InferOptions::default()).await?;
    Ok(out.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_models_answer_like_local_ones_and_survive_a_replica_going_away() {
    let _machine = crate::loads_the_machine().await;
    let (repo_a, repo_b) = (model_tier(), model_tier());
    let a = start(repo_a.config()).await;
    let b = start(repo_b.config()).await;
    let endpoints = [a.server.grpc_addr, b.server.grpc_addr];

    // The CPU tier: the same pipeline file, its models remote.
    let cpu_repo = Repo::new();
    add_remote(&cpu_repo, "detector", &endpoints);
    add_remote(&cpu_repo, "resnet50", &endpoints);
    cpu_repo.pipeline("detect_crop_classify", &example_pipeline("detect_crop_classify"));
    let cpu = start(cpu_repo.config()).await;
    // The reference: everything local.
    let local_repo = model_tier();
    local_repo.pipeline("detect_crop_classify", &example_pipeline("detect_crop_classify"));
    let local = start(local_repo.config()).await;

    // The remote model reads its signature and batch size from the model tier.
    let md = cpu.client.model_metadata("resnet50").await.unwrap();
    assert_eq!(md.inputs[0].shape, vec![-1, 3, 224, 224]);
    assert_eq!(md.platform, "remote");

    let inputs: Vec<Tensor> =
        [vec![(0, 0, [255, 0, 0]), (5, 1, [255, 0, 90]), (2, 7, [255, 0, 180])], vec![(1, 1, [255, 0, 30])], vec![]]
            .iter()
            .map(|c| cells(c))
            .collect();
    for input in &inputs {
        let (got, want) = (call(&cpu, input).await.unwrap(), call(&local, input).await.unwrap());
        for k in ["boxes", "box_scores", "box_classes", "crop_scores", "crop_classes", "count"] {
            assert_eq!(got[k], want[k], "output {k}");
        }
    }

    // Load from 4 clients; stop replica A halfway. No request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (client, input) = (cpu.client.clone(), inputs[w % inputs.len()].clone());
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.infer("detect_crop_classify", &[("image", &input)], InferOptions::default()).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = done.load(Ordering::Relaxed);
    a.server.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request fails when a replica goes away");
    assert!(before > 0 && after > before, "traffic goes on: {before} then {after}");

    // A is out of the rotation; B took the calls.
    let ea = format!("endpoint=\"{}\"", endpoints[0]);
    let eb = format!("endpoint=\"{}\"", endpoints[1]);
    let model = "model=\"resnet50\"";
    assert_eq!(metric(&cpu.http, "sluice_remote_ejected", &[model, &ea]).await, 1.0);
    assert_eq!(metric(&cpu.http, "sluice_remote_ejected", &[model, &eb]).await, 0.0);
    assert!(metric(&cpu.http, "sluice_remote_requests_total", &[model, &eb]).await > 0.0);
    let out = call(&cpu, &inputs[0]).await.unwrap();
    assert_eq!(out["count"].to_i64().unwrap(), vec![3]);
    // The dashboard lists the remote model's endpoints and which is out.
    let frame: serde_json::Value =
        reqwest::get(format!("{}/dashboard/data", cpu.http)).await.unwrap().json().await.unwrap();
    let m = frame["models"].as_array().unwrap().iter().find(|m| m["name"] == "resnet50").unwrap();
    let eps: Vec<(String, bool)> = m["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["addr"].as_str().unwrap().to_string(), e["ejected"].as_bool().unwrap()))
        .collect();
    assert_eq!(eps, vec![(endpoints[0].to_string(), true), (endpoints[1].to_string(), false)]);
}

/// A remote model whose endpoints do not answer fails to load with a reason naming
/// them; one whose batch size exceeds the remote's is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_model_that_cannot_be_described_does_not_load() {
    let tier = model_tier();
    let t = start(tier.config()).await;
    let repo = Repo::new();
    let dead: SocketAddr = "127.0.0.1:9".parse().unwrap();
    add_remote(&repo, "detector", &[dead]);
    let d = repo.path().join("resnet50");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("model.yaml"),
        format!("backend: remote\nmax_batch_size: 64\nremote:\n  endpoints: [\"{}\"]\n", t.server.grpc_addr),
    )
    .unwrap();
    let s = start(repo.config()).await;
    let index = s.client.repository_index().await.unwrap();
    let reason = |m: &str| index.iter().find(|e| e.name == m).map(|e| e.reason.clone()).unwrap();
    assert!(reason("detector").contains("127.0.0.1:9: cannot connect"), "{}", reason("detector"));
    assert!(
        reason("resnet50").contains("max_batch_size 64, but the remote model takes at most 8"),
        "{}",
        reason("resnet50")
    );
}

/// A remote model whose servers are not up yet loads by itself once they are, with the
/// pipeline that uses it: CPU and model tiers may start in any order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_model_loads_when_its_server_comes_up_later() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cpu_repo = Repo::new();
    add_remote(&cpu_repo, "detector", &[free]);
    add_remote(&cpu_repo, "resnet50", &[free]);
    cpu_repo.pipeline("detect_crop_classify", &example_pipeline("detect_crop_classify"));
    let cpu = start(cpu_repo.config()).await;
    assert!(!cpu.client.model_ready("detect_crop_classify").await.unwrap_or(false));

    let tier = model_tier();
    let _t = start(sluice_server::ServerConfig { grpc_addr: free, ..tier.config() }).await;
    let t0 = std::time::Instant::now();
    while !cpu.client.model_ready("detect_crop_classify").await.unwrap_or(false) {
        assert!(t0.elapsed() < Duration::from_secs(15), "the pipeline did not load after its models' server came up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = call(&cpu, &cells(&[(3, 3, [255, 0, 0])])).await.unwrap();
    assert_eq!(out["count"].to_i64().unwrap(), vec![1]);
}
