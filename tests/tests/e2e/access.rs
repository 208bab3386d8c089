//! Access control over the wire, both protocols: API groups behind keys (none, wrong,
//! right), groups left open, model control from this host only by default, and
//! cross-origin browser requests refused by the repository API.

use sluice_proto as pb;
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use sluice_server::{AccessConfig, ModelControl, Restriction};
use sluice_tests::{affine_model, config, start, Repo};
use std::net::{IpAddr, SocketAddr};
use tonic::Code;

const YAML: &str = "max_batch_size: 8\n";

fn restriction(s: &str) -> Restriction {
    s.parse().unwrap()
}

fn infer_request() -> pb::ModelInferRequest {
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    pb::ModelInferRequest {
        model_name: "affine".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![data.into()],
        ..Default::default()
    }
}

/// A request with `header: value` in its metadata (none when `header` is empty).
fn with_header<T>(msg: T, header: &'static str, value: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if !header.is_empty() {
        r.metadata_mut().insert(header, value.parse().unwrap());
    }
    r
}

fn code<T>(r: Result<T, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

async fn http_code(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.expect("an answer").status().as_u16()
}

fn json_infer(http: &reqwest::Client, base: &str) -> reqwest::RequestBuilder {
    http.post(format!("{base}/v2/models/affine/infer")).json(&serde_json::json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_need_their_keys_on_both_protocols() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let mut cfg = config(repo.path());
    cfg.access = AccessConfig {
        grpc: vec![
            restriction("inference:authorization=Bearer tok"),
            restriction("model-repository,statistics:admin-key=s3cret"),
        ],
        http: vec![
            restriction("inference:authorization=Bearer tok"),
            restriction("model-repository,metrics,dashboard:admin-key=s3cret"),
        ],
        model_control: ModelControl::Loopback,
    };
    let s = start(cfg).await;
    let http = reqwest::Client::new();
    let base = &s.http;

    // HTTP: no key, wrong key, right key, per group; other groups stay open.
    assert_eq!(http_code(json_infer(&http, base)).await, 401);
    assert_eq!(http_code(json_infer(&http, base).header("authorization", "Bearer nope")).await, 401);
    assert_eq!(http_code(json_infer(&http, base).header("authorization", "Bearer tok")).await, 200);
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("'admin-key'"), "{body}");
    assert_eq!(http_code(http.get(format!("{base}/metrics")).header("admin-key", "s3cret")).await, 200);
    assert_eq!(http_code(http.get(format!("{base}/dashboard"))).await, 401);
    assert_eq!(http_code(http.get(format!("{base}/v2/health/ready"))).await, 200, "health is open");
    assert_eq!(http_code(http.get(format!("{base}/v2/models/affine"))).await, 200, "metadata is open");
    assert_eq!(http_code(http.get(format!("{base}/v2/models/stats"))).await, 200, "statistics is open on HTTP");
    let load = || http.post(format!("{base}/v2/repository/models/affine/load"));
    assert_eq!(http_code(load()).await, 401);
    assert_eq!(http_code(load().header("admin-key", "s3cret")).await, 200);
    // A page on another site cannot make a browser use the repository API, key or not.
    let forged = load().header("admin-key", "s3cret").header("origin", "http://evil.example");
    assert_eq!(http_code(forged).await, 403);
    let same_origin = load().header("admin-key", "s3cret").header("origin", base.as_str());
    assert_eq!(http_code(same_origin).await, 200);

    // gRPC: the same per method group.
    let mut g = GrpcInferenceServiceClient::connect(format!("http://{}", s.server.grpc_addr)).await.unwrap();
    assert_eq!(code(g.model_infer(with_header(infer_request(), "", "")).await), Some(Code::Unauthenticated));
    let wrong = with_header(infer_request(), "authorization", "Bearer nope");
    assert_eq!(code(g.model_infer(wrong).await), Some(Code::Unauthenticated));
    let right = with_header(infer_request(), "authorization", "Bearer tok");
    assert_eq!(code(g.model_infer(right).await), None);
    let stats = pb::ModelStatisticsRequest { name: "affine".into(), version: String::new() };
    assert_eq!(code(g.model_statistics(with_header(stats.clone(), "", "")).await), Some(Code::Unauthenticated));
    assert_eq!(code(g.model_statistics(with_header(stats, "admin-key", "s3cret")).await), None);
    let unload = pb::RepositoryModelUnloadRequest { model_name: "affine".into(), ..Default::default() };
    assert_eq!(code(g.repository_model_unload(with_header(unload.clone(), "", "")).await), Some(Code::Unauthenticated));
    assert_eq!(code(g.repository_model_unload(with_header(unload, "admin-key", "s3cret")).await), None);
    assert_eq!(code(g.server_ready(with_header(pb::ServerReadyRequest {}, "", "")).await), None, "health is open");
    let md = pb::ModelMetadataRequest { name: "affine".into(), version: String::new() };
    assert_eq!(code(g.model_metadata(md).await), Some(Code::NotFound), "metadata is open (the model was unloaded)");
    s.server.shutdown().await;
}

/// An address of this host other than loopback, to be a "remote" client from.
fn host_address() -> Option<IpAddr> {
    let out = std::process::Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .find(|a| a.is_ipv4())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_control_is_for_this_host_unless_opened() {
    let Some(host) = host_address() else {
        eprintln!("no non-loopback address on this host: skipped");
        return;
    };
    for (policy, local, remote) in
        [(ModelControl::Loopback, 200, 403), (ModelControl::Any, 200, 200), (ModelControl::Off, 403, 403)]
    {
        let repo = Repo::new();
        repo.add("affine", &affine_model(4), YAML);
        let mut cfg = config(repo.path());
        let any: SocketAddr = ([0, 0, 0, 0], 0).into();
        (cfg.grpc_addr, cfg.http_addr) = (any, any);
        cfg.access.model_control = policy;
        let s = start(cfg).await;
        let (hp, gp) = (s.server.http_addr.port(), s.server.grpc_addr.port());
        let http = reqwest::Client::new();
        for (ip, want) in [(IpAddr::from([127, 0, 0, 1]), local), (host, remote)] {
            let url = format!("http://{ip}:{hp}/v2/repository/models/affine/load");
            let r = http.post(url).send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert_eq!(status, want, "{policy:?} from {ip}: {body}");
            if want == 403 && policy == ModelControl::Loopback {
                assert!(body.contains("--model-control any") && body.contains(&host.to_string()), "{body}");
            }
            let mut g = GrpcInferenceServiceClient::connect(format!("http://{ip}:{gp}")).await.unwrap();
            let req = pb::RepositoryModelLoadRequest { model_name: "affine".into(), ..Default::default() };
            let got = g.repository_model_load(req).await.err().map(|e| e.code());
            let expected = (want == 403).then_some(Code::PermissionDenied);
            assert_eq!(got, expected, "{policy:?} over gRPC from {ip}");
            // Reading the index is not model control.
            let index = http.post(format!("http://{ip}:{hp}/v2/repository/index")).send().await.unwrap();
            assert_eq!(index.status().as_u16(), 200);
        }
        s.server.shutdown().await;
    }
}
