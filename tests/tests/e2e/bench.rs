//! The load generator (`sluice_client::bench`, behind `sluice bench`) against a real server.

use sluice_client::bench::{self, BenchSpec, Load};
use sluice_client::Tensor;
use sluice_tests::{affine_model, start, Repo};
use std::time::Duration;

fn spec(model: &str, inputs: Vec<(String, Tensor)>, seconds: f64) -> BenchSpec {
    BenchSpec {
        model: model.into(),
        inputs,
        warmup: Duration::ZERO,
        duration: Duration::from_secs_f64(seconds),
        timeout: None,
        batch: 1,
        keep_samples: true,
        timing: false,
        parameters: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_match_the_servers_statistics() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    let s = start(repo.config()).await;
    let x = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let clients = vec![s.client.clone(), s.client.clone()];
    let step = bench::run_step(&clients, &spec("affine", vec![("x".into(), x)], 1.0), Load::Closed(4)).await;
    let stats = &s.client.model_statistics("affine").await.unwrap()[0];
    let served = stats.inference_stats.unwrap().success.unwrap().count;
    assert_eq!(step.errors, 0);
    assert!(step.requests > 50, "{step:?}");
    assert_eq!(step.requests, served, "every request the bench counted is one the server served");
    assert!(step.p50_ms > 0.0 && step.p50_ms <= step.p99_ms && step.p99_ms <= step.max_ms);
    assert!(step.server_compute_ms.is_some(), "the server-side split comes from its statistics");
    assert_eq!(step.samples.len() as u64, step.requests, "one sample per measured request");
    assert!(step.samples.iter().all(|x| x.ok && x.at_s >= 0.0 && x.at_s < 1.0 && x.latency_ms > 0.0));
    let md = bench::markdown(std::slice::from_ref(&step));
    assert!(md.starts_with("| concurrency | batch | requests | errors | req/s |"), "{md}");
    assert!(md.contains(&format!("| 4 | 1 | {} | 0 |", step.requests)), "{md}");
    assert_eq!(bench::csv(std::slice::from_ref(&step)).lines().count(), 2);
    assert_eq!(bench::to_json(&[step])[0]["requests"], served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_past_capacity_shows_a_low_service_rate_and_rising_latency() {
    let _machine = crate::loads_the_machine().await;
    let repo = Repo::new();
    // 20 ms of work on a one-thread pool: at most 50 requests/s.
    repo.pipeline(
        "slow",
        "max_batch_size: 0\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: wait.value}\nnodes:\n  - name: wait\n    op: delay\n    pool: one\n    inputs: {value: x}\n    params: {ms: 20}\n",
    );
    let mut cfg = repo.config();
    cfg.pools = vec![sluice_server::PoolConfig { name: "one".into(), threads: 1, queue: 1024 }];
    let s = start(cfg).await;
    let x = Tensor::from_f32(vec![4], &[1.0; 4]);
    let clients = vec![s.client.clone()];
    let load = Load::Open { rate: 150.0, poisson: true };
    let step = bench::run_step(&clients, &spec("slow", vec![("x".into(), x)], 1.5), load).await;
    let rate = step.service_rate.unwrap();
    assert!(rate < 0.6, "150/s offered to a 50/s server: service rate {rate:.2}");
    assert!(
        step.p50_last_third_ms > 2.0 * step.p50_first_third_ms,
        "latency measured from the schedule rises as the queue grows: {:.1} ms -> {:.1} ms",
        step.p50_first_third_ms,
        step.p50_last_third_ms
    );
}
