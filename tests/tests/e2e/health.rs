//! Health as orchestrators see it: grpc.health.v1 (overall and per model), the HTTP
//! startup / ready probes, names answered under an alias, and the drain that a rolling
//! update relies on (not ready at once, still serving, then stopped).

use sluice_client::{InferOptions, Tensor};
use sluice_tests::{affine_model, busy_model, config, metric, start, Repo};
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const YAML: &str = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 1000\n";

async fn health(grpc: std::net::SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await;
    HealthClient::new(channel.expect("health client connects"))
}

async fn check(h: &mut HealthClient<tonic::transport::Channel>, service: &str) -> Result<ServingStatus, Code> {
    let r = h.check(HealthCheckRequest { service: service.into() }).await.map_err(|s| s.code())?;
    Ok(ServingStatus::try_from(r.into_inner().status).unwrap())
}

async fn http_status(url: String) -> u16 {
    reqwest::get(url).await.expect("GET").status().as_u16()
}

fn input() -> Tensor {
    Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_startup_probe_and_aliases() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    // A model that cannot load: the server starts (startup passes), but is not ready.
    repo.add("broken", b"not an onnx file", YAML);
    let mut cfg = config(repo.path());
    cfg.aliases = [("my-isvc".to_string(), "affine".to_string()), ("ghost".to_string(), "nothing".to_string())].into();
    let s = start(cfg).await;
    let mut h = health(s.server.grpc_addr).await;

    assert_eq!(http_status(format!("{}/v2/health/startup", s.http)).await, 200, "every model loaded or failed");
    assert_eq!(http_status(format!("{}/v2/health/live", s.http)).await, 200);
    assert_eq!(http_status(format!("{}/v2/health/ready", s.http)).await, 503, "one model failed to load");
    assert_eq!(check(&mut h, "").await, Ok(ServingStatus::NotServing));
    assert_eq!(check(&mut h, "inference.GRPCInferenceService").await, Ok(ServingStatus::NotServing));
    assert_eq!(check(&mut h, "affine").await, Ok(ServingStatus::Serving));
    assert_eq!(check(&mut h, "broken").await, Ok(ServingStatus::NotServing));
    assert_eq!(check(&mut h, "nope").await, Err(Code::NotFound));
    assert_eq!(check(&mut h, "ghost").await, Err(Code::NotFound), "an alias of nothing names nothing");

    // The alias answers everywhere the name does.
    assert_eq!(check(&mut h, "my-isvc").await, Ok(ServingStatus::Serving));
    assert_eq!(http_status(format!("{}/v2/models/my-isvc/ready", s.http)).await, 200);
    assert!(s.client.model_ready("my-isvc").await.unwrap());
    let md: serde_json::Value =
        reqwest::get(format!("{}/v2/models/my-isvc", s.http)).await.unwrap().json().await.unwrap();
    assert_eq!(md["name"], "affine");
    let out = s.client.infer("my-isvc", &[("x", &input())], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].1.to_f32().unwrap(), vec![3.0, 5.0, 7.0, 9.0], "y = 2x + 1 through the alias");

    // Removing the broken model makes the server ready: the answer follows reloads.
    std::fs::remove_dir_all(repo.path().join("broken")).unwrap();
    s.client.repository_load("").await.expect("reload");
    let mut ready = false;
    for _ in 0..50 {
        if check(&mut h, "").await == Ok(ServingStatus::Serving) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "serving once every model is ready");
    assert_eq!(http_status(format!("{}/v2/health/ready", s.http)).await, 200);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_reports_not_ready_at_once_and_keeps_serving_until_the_delay_ends() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let s = start(config(repo.path())).await;
    let mut h = health(s.server.grpc_addr).await;
    let mut watch = h.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    // Some queue time to see in the autoscaling gauge.
    for _ in 0..5 {
        s.client.infer("affine", &[("x", &input())], InferOptions::default()).await.unwrap();
    }

    let (client, http, grpc) = (s.client.clone(), s.http.clone(), s.server.grpc_addr);
    s.server.begin_drain();
    let drained = tokio::spawn(s.server.drain(Duration::from_secs(4)));

    // Every readiness answer is false at once...
    assert_eq!(http_status(format!("{http}/v2/health/ready")).await, 503);
    assert_eq!(http_status(format!("{http}/v2/models/affine/ready")).await, 503);
    assert_eq!(http_status(format!("{http}/v2/health/live")).await, 200, "draining is alive");
    assert!(!client.server_ready().await.unwrap());
    assert!(!client.model_ready("affine").await.unwrap());
    let mut h2 = health(grpc).await;
    assert_eq!(check(&mut h2, "").await, Ok(ServingStatus::NotServing));
    assert_eq!(check(&mut h2, "affine").await, Ok(ServingStatus::NotServing));
    let changed = tokio::time::timeout(Duration::from_secs(2), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(changed.status, ServingStatus::NotServing as i32, "Watch tells balancers at once");
    // ...while requests are still answered, on old and new connections.
    let out = client.infer("affine", &[("x", &input())], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].1.to_f32().unwrap(), vec![3.0, 5.0, 7.0, 9.0]);
    let fresh = sluice_client::Client::connect(format!("http://{grpc}")).await.unwrap();
    fresh.infer("affine", &[("x", &input())], InferOptions::default()).await.unwrap();
    // The autoscaling gauge: sampled once a second, the mean queue wait of those requests.
    let mut queue_time = 0.0;
    for _ in 0..30 {
        queue_time = metric(&http, "sluice_queue_time_mean_seconds", &["model=\"affine\""]).await;
        if queue_time > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(queue_time > 0.0 && queue_time < 1.0, "mean queue time {queue_time}");

    // After the delay the server stops accepting and shuts down.
    tokio::time::timeout(Duration::from_secs(10), drained).await.expect("drain ends").unwrap();
    assert!(reqwest::get(format!("{http}/v2/health/live")).await.is_err(), "no longer accepting");
}

/// A free loopback port (bound and released; the server binds it a moment later).
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_repository_loads_the_server_is_live_but_not_started_and_models_are_unavailable() {
    let repo = Repo::new();
    // A load that takes a while: a slow model warmed up many times.
    let warmups = "  - {batch_size: 1}\n".repeat(80);
    repo.add("busy", &busy_model(400), &format!("max_batch_size: 0\nwarmup:\n{warmups}"));
    let mut cfg = config(repo.path());
    (cfg.grpc_addr, cfg.http_addr) = (free_port(), free_port());
    let (http, grpc) = (format!("http://{}", cfg.http_addr), cfg.grpc_addr);
    let starting = tokio::spawn(sluice_server::start(cfg));

    // Seen while loading: live, not started, not ready; the model is "not ready yet".
    let mut seen = false;
    while !starting.is_finished() {
        let Ok(r) = reqwest::get(format!("{http}/v2/health/startup")).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if r.status() != 503 {
            break;
        }
        assert_eq!(http_status(format!("{http}/v2/health/live")).await, 200);
        assert_eq!(http_status(format!("{http}/v2/health/ready")).await, 503);
        assert_eq!(http_status(format!("{http}/v2/models/busy/ready")).await, 503, "not 404 while loading");
        let client = sluice_client::Client::connect(format!("http://{grpc}")).await.unwrap();
        let x = Tensor::from_f32(vec![1, 512], &[1.0; 512]);
        let err = client.infer("busy", &[("x", &x)], InferOptions::default()).await.unwrap_err();
        if !starting.is_finished() {
            assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
            assert!(err.to_string().contains("still loading"), "{err}");
            seen = true;
        }
        break;
    }
    assert!(seen, "the load ended before the probes could be seen answering");
    let s = starting.await.unwrap().expect("the server starts");
    assert_eq!(http_status(format!("{http}/v2/health/startup")).await, 200);
    assert_eq!(http_status(format!("{http}/v2/health/ready")).await, 200);
    s.shutdown().await;
}
