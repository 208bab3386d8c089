//! The serving core end to end: a real server on loopback ports, driven over gRPC with
//! the project's client and over HTTP with plain requests.

use serde_json::{json, Value};
use sluice_client::{proto, InferOptions, Tensor};
use sluice_tests::{affine_model, affine_reference, config, start, Repo};
use std::time::Duration;
use tonic::Code;

const AFFINE_YAML: &str = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 20000\n  hold: delay\n";

fn affine_repo() -> Repo {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), AFFINE_YAML);
    repo
}

fn x(rows: usize, seed: f32) -> (Vec<f32>, Tensor) {
    let v: Vec<f32> = (0..rows * 4).map(|i| seed + i as f32 * 0.25).collect();
    let t = Tensor::from_f32(vec![rows, 4], &v);
    (v, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_config_over_grpc_and_http() {
    let repo = affine_repo();
    let s = start(config(repo.path())).await;
    assert!(s.client.server_live().await.unwrap());
    assert!(s.client.server_ready().await.unwrap());
    assert!(s.client.model_ready("affine").await.unwrap());

    let md = s.client.model_metadata("affine").await.unwrap();
    assert_eq!(md.name, "affine");
    assert_eq!(md.platform, "onnxruntime_onnx");
    assert_eq!(md.inputs.len(), 1);
    assert_eq!((md.inputs[0].name.as_str(), md.inputs[0].datatype.as_str()), ("x", "FP32"));
    assert_eq!(md.inputs[0].shape, vec![-1, 4]);
    let outs: Vec<&str> = md.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outs, vec!["y", "neg"]);

    let cfg = s.client.model_config("affine").await.unwrap();
    assert_eq!(cfg.max_batch_size, 8);
    assert_eq!(cfg.input[0].dims, vec![4], "config dims leave out the batch dimension");
    assert_eq!(cfg.input[0].data_type, proto::DataType::TypeFp32 as i32);
    match cfg.scheduling_choice {
        Some(proto::model_config::SchedulingChoice::DynamicBatching(db)) => {
            assert_eq!(db.max_queue_delay_microseconds, 20000)
        }
        other => panic!("expected dynamic batching, got {other:?}"),
    }

    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", s.http)).send();
    assert_eq!(get("/v2/health/live").await.unwrap().status(), 200);
    assert_eq!(get("/v2/health/ready").await.unwrap().status(), 200);
    assert_eq!(get("/v2/models/affine/ready").await.unwrap().status(), 200);
    let server: Value = get("/v2").await.unwrap().json().await.unwrap();
    assert_eq!(server["name"], "sluice");
    let md: Value = get("/v2/models/affine").await.unwrap().json().await.unwrap();
    assert_eq!(md["inputs"][0], json!({"name": "x", "datatype": "FP32", "shape": [-1, 4]}));
    let md1: Value = get("/v2/models/affine/versions/1").await.unwrap().json().await.unwrap();
    assert_eq!(md, md1);
    let cfg: Value = get("/v2/models/affine/config").await.unwrap().json().await.unwrap();
    assert_eq!(cfg["max_batch_size"], 8);
    assert_eq!(cfg["input"][0], json!({"name": "x", "data_type": "TYPE_FP32", "dims": [4]}));
    assert_eq!(cfg["dynamic_batching"]["max_queue_delay_microseconds"], 20000);
    let index: Value = http.post(format!("{}/v2/repository/index", s.http)).send().await.unwrap().json().await.unwrap();
    assert_eq!(index, json!([{"name": "affine", "version": "1", "state": "READY"}]));
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_matches_the_reference_over_grpc_and_http() {
    let repo = affine_repo();
    let s = start(config(repo.path())).await;
    let (v, t) = x(3, -1.5);
    let (want_y, want_neg) = affine_reference(&v);

    let out = s.client.infer("affine", &[("x", &t)], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].0, "y");
    assert_eq!(out[0].1.shape, vec![3, 4]);
    assert_eq!(out[0].1.to_f32().unwrap(), want_y);
    assert_eq!(out[1].1.to_f32().unwrap(), want_neg);

    // Only the requested output comes back.
    let opts = InferOptions { outputs: vec!["neg".into()], ..Default::default() };
    let out = s.client.infer("affine", &[("x", &t)], opts).await.unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "neg");

    // Typed contents instead of raw bytes.
    let mut req = sluice_client::infer_request("affine", &[("x", &t)], &InferOptions::default());
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(proto::InferTensorContents { fp32_contents: v.clone(), ..Default::default() });
    let resp = s.client.raw().model_infer(req).await.unwrap().into_inner();
    let out = sluice_client::decode_outputs(resp).unwrap();
    assert_eq!(out[0].1.to_f32().unwrap(), want_y);

    // HTTP with JSON tensors (nested arrays are accepted).
    let http = reqwest::Client::new();
    let nested: Vec<Vec<f32>> = v.chunks(4).map(|c| c.to_vec()).collect();
    let body = json!({"id": "r1", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": nested}]});
    let resp: Value =
        http.post(format!("{}/v2/models/affine/infer", s.http)).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(resp["id"], "r1");
    assert_eq!(resp["outputs"][0]["name"], "y");
    assert_eq!(resp["outputs"][0]["shape"], json!([3, 4]));
    let got: Vec<f32> = serde_json::from_value(resp["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(got, want_y);

    // HTTP with the binary tensor extension, both ways.
    let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "neg", "parameters": {"binary_data": true}}],
    }))
    .unwrap();
    let mut body = header.clone();
    body.extend_from_slice(&raw);
    let resp = http
        .post(format!("{}/v2/models/affine/infer", s.http))
        .header("Inference-Header-Content-Length", header.len())
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json_len: usize = resp.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = resp.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 48);
    let got: Vec<f32> = bytes[json_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, want_neg);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_match_unbatched_results() {
    let repo = affine_repo();
    let s = start(config(repo.path())).await;
    const N: usize = 24;
    let calls = (0..N).map(|i| {
        let client = s.client.clone();
        async move {
            let (v, t) = x(1, i as f32 * 10.0);
            let out = client.infer("affine", &[("x", &t)], InferOptions::default()).await.unwrap();
            (v, out)
        }
    });
    for (v, out) in futures::future::join_all(calls).await {
        let (want_y, want_neg) = affine_reference(&v);
        assert_eq!(out[0].1.to_f32().unwrap(), want_y, "a batched item got another item's rows");
        assert_eq!(out[1].1.to_f32().unwrap(), want_neg);
    }
    let stats = &s.client.model_statistics("affine").await.unwrap()[0];
    assert_eq!(stats.inference_count, N as u64);
    assert!(
        stats.execution_count < N as u64,
        "{N} concurrent requests ran in {} separate executions: nothing was batched",
        stats.execution_count
    );
    assert!(stats.batch_stats.iter().any(|b| b.batch_size > 1), "{:?}", stats.batch_stats);
    let rows: u64 = stats.batch_stats.iter().map(|b| b.batch_size * b.compute_infer.unwrap().count).sum();
    assert_eq!(rows, N as u64, "batch statistics account for every row");
    let inf = stats.inference_stats.unwrap();
    assert_eq!(inf.success.unwrap().count, N as u64);
    assert_eq!(inf.queue.unwrap().count, N as u64);

    let metrics = reqwest::get(format!("{}/metrics", s.http)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("sluice_requests_total{{model=\"affine\"}} {N}")), "{metrics}");
    assert!(metrics.contains("sluice_batch_size_bucket{model=\"affine\""), "{metrics}");
    assert!(metrics.contains("sluice_queue_depth{model=\"affine\"} 0"), "{metrics}");
    s.server.shutdown().await;
}

/// The value of one Prometheus series in a text exposition (`name{labels}`).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Waits until `model`'s queue holds `depth` requests.
async fn wait_for_depth(http: &str, model: &str, depth: usize) {
    let series = format!("sluice_queue_depth{{model=\"{model}\"}}");
    for _ in 0..1000 {
        let m = reqwest::get(format!("{http}/metrics")).await.unwrap().text().await.unwrap();
        if m.lines().any(|l| l.strip_prefix(series.as_str()).is_some_and(|v| v.trim() == depth.to_string())) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the queue of {model} never reached {depth}");
}

async fn expect_error(s: &sluice_tests::TestServer, req: proto::ModelInferRequest, code: Code, needle: &str) {
    let err = s.client.raw().model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(err.message().contains(needle), "message {:?} lacks {needle:?}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors_and_the_server_keeps_serving() {
    let repo = affine_repo();
    let s = start(config(repo.path())).await;
    let (_, t) = x(1, 0.0);
    let good = || sluice_client::infer_request("affine", &[("x", &t)], &InferOptions::default());

    let mut r = good();
    r.model_name = "nope".into();
    expect_error(&s, r, Code::NotFound, "model 'nope' is not found").await;

    let mut r = good();
    r.model_version = "7".into();
    expect_error(&s, r, Code::NotFound, "(version 7)").await;

    let mut r = good();
    r.inputs[0].datatype = "INT32".into();
    expect_error(&s, r, Code::InvalidArgument, "input 'x': expected datatype FP32, got INT32").await;

    let mut r = good();
    r.inputs[0].datatype = "FLOAT".into();
    expect_error(&s, r, Code::InvalidArgument, "unknown datatype 'FLOAT'").await;

    let five = Tensor::from_f32(vec![1, 5], &[0.0; 5]);
    let r = sluice_client::infer_request("affine", &[("x", &five)], &InferOptions::default());
    expect_error(&s, r, Code::InvalidArgument, "shape [1,5] does not match the model's [-1,4]").await;

    let mut r = good();
    r.raw_input_contents[0] = r.raw_input_contents[0].slice(..12);
    expect_error(&s, r, Code::InvalidArgument, "needs 16 bytes, got 12").await;

    let mut r = good();
    r.inputs[0].name = "image".into();
    expect_error(&s, r, Code::InvalidArgument, "unknown input 'image'; the model's inputs are: x").await;

    let mut r = good();
    r.outputs.push(proto::model_infer_request::InferRequestedOutputTensor { name: "z".into(), ..Default::default() });
    expect_error(&s, r, Code::InvalidArgument, "unknown output 'z'").await;

    let big = Tensor::from_f32(vec![9, 4], &[0.0; 36]);
    let r = sluice_client::infer_request("affine", &[("x", &big)], &InferOptions::default());
    expect_error(&s, r, Code::InvalidArgument, "batch size 9 is outside 1..=8").await;

    // Past the server's 16 MiB message limit.
    let huge = Tensor::from_f32(vec![1, 4], &[0.0; 4]);
    let mut r = sluice_client::infer_request("affine", &[("x", &huge)], &InferOptions::default());
    r.raw_input_contents[0] = vec![0u8; 17 << 20].into();
    let err = s.client.raw().model_infer(r).await.unwrap_err();
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{:?}: {}", err.code(), err.message());
    assert!(err.message().contains("message length too large"), "{}", err.message());

    // HTTP: the same checks answer with v2 error bodies and matching statuses.
    let http = reqwest::Client::new();
    let post = |model: &str, body: Value| http.post(format!("{}/v2/models/{model}/infer", s.http)).json(&body).send();
    let resp = post("nope", json!({"inputs": []})).await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp =
        post("affine", json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}))
            .await
            .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("needs 16 bytes, got 12"), "{body}");
    let resp = http.post(format!("{}/v2/models/affine/infer", s.http)).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("request JSON"), "{body}");
    // Oversized: 413 once the body passes the limit. (A client still writing the rest
    // may see the connection close first, so speak HTTP by hand and stop writing just
    // past the limit.)
    let mut tcp = tokio::net::TcpStream::connect(s.server.http_addr).await.unwrap();
    let head = format!(
        "POST /v2/models/affine/infer HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        17 << 20
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &vec![b' '; (16 << 20) + (64 << 10)]).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n =
        tokio::time::timeout(std::time::Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut tcp, &mut answer))
            .await
            .expect("answered before the whole body")
            .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // And the server still answers good requests.
    let out = s.client.infer("affine", &[("x", &t)], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].1.to_f32().unwrap(), vec![1.0, 1.5, 2.0, 2.5]);
    // Every malformed request for the model counts as a failure, wherever it was caught.
    let stats = s.client.model_statistics("affine").await.unwrap()[0].inference_stats.unwrap();
    assert_eq!((stats.success.unwrap().count, stats.fail.unwrap().count), (1, 9));
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_rejects_at_once() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    // A long batching delay keeps the first requests queued: the queue is full at 2.
    repo.add(
        "held",
        &affine_model(4),
        "max_batch_size: 8\nmax_queue_size: 2\ndynamic_batching:\n  max_queue_delay_us: 1500000\n  hold: delay\n",
    );
    let s = start(config(repo.path())).await;
    let (_, t) = x(1, 0.0);
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let client = s.client.clone();
            let t = t.clone();
            tokio::spawn(async move { client.infer("held", &[("x", &t)], InferOptions::default()).await })
        })
        .collect();
    // Wait until both are queued (the gauge says so), then overflow.
    wait_for_depth(&s.http, "held", 2).await;
    let started = std::time::Instant::now();
    let err = s.client.infer("held", &[("x", &t)], InferOptions::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("queue is full"), "{err}");
    assert!(started.elapsed() < Duration::from_millis(500), "rejection was not immediate");
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/models/held/infer", s.http))
        .json(&json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    // The queued ones still complete, together, once the delay passes.
    for q in queued {
        q.await.unwrap().unwrap();
    }
    let stats = &s.client.model_statistics("held").await.unwrap()[0];
    assert_eq!((stats.inference_count, stats.execution_count), (2, 1));
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_models_are_reported_and_the_others_still_load() {
    let repo = affine_repo();
    repo.add("corrupt", b"this is not an onnx file at all \xff\xff", "max_batch_size: 8\n");
    repo.add("typo", &affine_model(4), "max_batch_size: 8\nmax_batch_delay: 5\n");
    let s = start(config(repo.path())).await;

    let index = s.client.repository_index().await.unwrap();
    let state = |n: &str| index.iter().find(|m| m.name == n).unwrap().clone();
    assert_eq!(state("affine").state, "READY");
    assert_eq!(state("corrupt").state, "UNAVAILABLE");
    assert!(state("corrupt").reason.contains("corrupt/model.onnx: not a valid ONNX file"), "{:?}", state("corrupt"));
    assert_eq!(state("typo").state, "UNAVAILABLE");
    assert!(
        state("typo").reason.contains("typo/model.yaml:2:1: unknown field `max_batch_delay`"),
        "{:?}",
        state("typo")
    );
    assert!(!s.client.model_ready("corrupt").await.unwrap());
    assert!(!s.client.server_ready().await.unwrap(), "ready means every model is ready");

    let (_, t) = x(1, 0.0);
    let err = s.client.infer("corrupt", &[("x", &t)], InferOptions::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert!(err.to_string().contains("model 'corrupt' is not ready"), "{err}");
    s.client.infer("affine", &[("x", &t)], InferOptions::default()).await.unwrap();

    let resp = reqwest::get(format!("{}/v2/models/typo/ready", s.http)).await.unwrap();
    assert_eq!(resp.status(), 503);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadlines_fail_fast_and_are_not_computed() {
    let repo = Repo::new();
    repo.add(
        "held",
        &affine_model(4),
        "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 400000\n  hold: delay\n",
    );
    let s = start(config(repo.path())).await;
    let (_, t) = x(1, 0.0);
    let opts = InferOptions { timeout: Some(Duration::from_millis(50)), ..Default::default() };
    // tonic's client enforces the deadline too, so it may report it first (as Cancelled).
    let err = s.client.infer("held", &[("x", &t)], opts).await.unwrap_err();
    assert!(matches!(err.code(), Some(Code::DeadlineExceeded | Code::Cancelled)), "{err}");
    // Over HTTP the deadline is a header, and the server's answer is what we see.
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/models/held/infer", s.http))
        .header("sluice-timeout-ms", "50")
        .json(&json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("deadline exceeded"), "{body}");
    // Once the batch would have been cut, the abandoned items are dropped, not run.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stats = &s.client.model_statistics("held").await.unwrap()[0];
    assert_eq!(stats.execution_count, 0);
    // The HTTP request surely failed inside the server; the gRPC one may have been
    // cancelled by tonic's own timer first, which the engine never sees.
    assert!(stats.inference_stats.unwrap().fail.unwrap().count >= 1);
    let m = reqwest::get(format!("{}/metrics", s.http)).await.unwrap().text().await.unwrap();
    assert!(metric(&m, "sluice_abandoned_items_total{model=\"held\"}") >= 1.0, "{m}");
    assert!(metric(&m, "sluice_request_failures_total{error_type=\"deadline_exceeded\",model=\"held\"}") >= 1.0, "{m}");
    assert_eq!(metric(&m, "sluice_queue_depth{model=\"held\"}"), 0.0, "dropped items must leave the queue depth");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let repo = Repo::new();
    repo.add(
        "held",
        &affine_model(4),
        "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 300000\n  hold: delay\n",
    );
    let s = start(config(repo.path())).await;
    let (v, t) = x(1, 3.0);
    let client = s.client.clone();
    let in_flight = tokio::spawn(async move { client.infer("held", &[("x", &t)], InferOptions::default()).await });
    wait_for_depth(&s.http, "held", 1).await;
    let grpc_addr = s.server.grpc_addr;
    s.server.shutdown().await;
    let out = in_flight.await.unwrap().expect("the in-flight request completes");
    assert_eq!(out[0].1.to_f32().unwrap(), affine_reference(&v).0);
    assert!(
        tokio::net::TcpStream::connect(grpc_addr).await.is_err(),
        "the server still accepts connections after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_padded_to_allowed_sizes_and_padding_is_dropped() {
    let repo = Repo::new();
    repo.add("padded", &affine_model(4), "max_batch_size: 8\ndynamic_batching:\n  allowed_batch_sizes: [4, 8]\n");
    let s = start(config(repo.path())).await;
    let (v, t) = x(3, 0.5);
    let out = s.client.infer("padded", &[("x", &t)], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].1.shape, vec![3, 4], "padding rows leaked into the response");
    assert_eq!(out[0].1.to_f32().unwrap(), affine_reference(&v).0);
    let stats = &s.client.model_statistics("padded").await.unwrap()[0];
    assert_eq!(stats.inference_count, 3, "padding rows are not inferences");
    let sizes: Vec<u64> = stats.batch_stats.iter().map(|b| b.batch_size).collect();
    assert_eq!(sizes, vec![4], "3 rows run as an allowed batch of 4");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_gpu_provider_fails_the_load_unless_fallback_is_allowed() {
    // The CPU build of ONNX Runtime the set-up installs has no CUDA provider.
    let repo = Repo::new();
    repo.add("strict", &affine_model(4), "max_batch_size: 8\nexecution_provider: cuda\n");
    repo.add("lenient", &affine_model(4), "max_batch_size: 8\nexecution_provider: cuda\nallow_fallback: true\n");
    // A preference list with every GPU option set: on this host it runs on its last entry.
    let listed = "max_batch_size: 8\nexecution_providers: [tensorrt, cuda, cpu]\ndevice_ids: [0, 1]\ninstances: 1\n\
                  tensorrt:\n  fp16: true\n  engine_cache: trt-cache\n  workspace_mb: 1024\n  profile:\n    \
                  x: {min: [1, 4], opt: [4, 4], max: [8, 4]}\ncuda:\n  memory_limit_mb: 2048\n  \
                  arena_extend_strategy: same_as_requested\n  tf32: false\n";
    repo.add("listed", &affine_model(4), listed);
    repo.add("gpus_only", &affine_model(4), "max_batch_size: 8\nexecution_providers: [tensorrt, cuda]\n");
    let s = start(config(repo.path())).await;
    let index = s.client.repository_index().await.unwrap();
    let strict = index.iter().find(|m| m.name == "strict").unwrap();
    assert_eq!(strict.state, "UNAVAILABLE");
    assert!(
        strict.reason.contains("execution provider 'cuda' is not available")
            && strict.reason.contains("allow_fallback"),
        "{strict:?}"
    );
    // Every provider's reason, in order.
    let gpus_only = index.iter().find(|m| m.name == "gpus_only").unwrap();
    assert_eq!(gpus_only.state, "UNAVAILABLE");
    let (trt, cuda) = (gpus_only.reason.find("'tensorrt'"), gpus_only.reason.find("'cuda'"));
    assert!(trt.is_some() && cuda.is_some() && trt < cuda, "{gpus_only:?}");
    let (v, t) = x(1, 2.0);
    for name in ["lenient", "listed"] {
        let out = s.client.infer(name, &[("x", &t)], InferOptions::default()).await.unwrap();
        assert_eq!(out[0].1.to_f32().unwrap(), affine_reference(&v).0, "{name}");
    }
    // It fell back to CPU: Triton's config shows a CPU instance group, and `instances`
    // are made once, not once per listed GPU.
    let cfg = s.client.model_config("listed").await.unwrap();
    let group = &cfg.instance_group[0];
    assert_eq!((group.kind, group.gpus.len()), (proto::model_instance_group::Kind::Cpu as i32, 0), "{group:?}");
    let stats = reqwest::get(format!("{}/dashboard/data", s.http)).await.unwrap().json::<Value>().await.unwrap();
    let listed = stats["models"].as_array().unwrap().iter().find(|m| m["name"] == "listed").unwrap();
    assert_eq!(listed["devices"], json!(["cpu"]), "{listed}");
    assert!(stats["gpus"].is_array(), "GPUs are listed (none without NVML)");
    s.server.shutdown().await;
}

#[test]
fn the_onnx_runtime_backend_stages_batches_from_their_parts() {
    use sluice_server::backend::{Backend, BatchInput};
    let repo = affine_repo();
    let dir = repo.path().join("affine");
    let sig = sluice_server::offline::read_signature(&std::fs::read(dir.join("model.onnx")).unwrap()).unwrap();
    let cfg = sluice_server::offline::ModelYaml::parse(&dir.join("model.yaml"), AFFINE_YAML).unwrap();
    let mut b = sluice_server::backend::ort::load(
        &sluice_tests::ort_dylib(),
        &sluice_server::backend::ort::ModelSource::prepare(&sluice_tests::ort_dylib(), &dir.join("model.onnx"), &cfg)
            .unwrap(),
        &cfg,
        0,
        &sig.inputs,
        &sig.outputs,
    )
    .unwrap();
    let (a, ta) = x(1, 1.0);
    let (c, tc) = x(2, -3.0);
    // Shapes 3+2 pad, then 1, then 3+2 again (a staged buffer reused with new data).
    for (parts, pad) in [(vec![&ta, &tc], 2), (vec![&ta], 0), (vec![&tc, &ta], 2)] {
        let mut staged = 0;
        let out = b.run_batch(&[BatchInput { parts: parts.clone(), pad }], &mut || staged += 1).unwrap();
        assert_eq!(staged, 1);
        let rows: usize = parts.iter().map(|p| p.shape[0]).sum::<usize>() + pad;
        assert_eq!(out[0].shape, vec![rows, 4]);
        let mut want: Vec<f32> = Vec::new();
        for p in &parts {
            let v = if std::ptr::eq(*p, &ta) { &a } else { &c };
            want.extend(affine_reference(v).0);
        }
        want.extend(std::iter::repeat_n(1.0, pad * 4)); // zero rows: 2 * 0 + 1
        assert_eq!(out[0].to_f32().unwrap(), want, "parts {} pad {pad}", parts.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_without_a_batch_dimension_take_scalars() {
    use prost::Message;
    use sluice_tests::onnx::*;
    let scalar = model(GraphProto {
        name: "scalar".into(),
        node: vec![node("Mul", &["x", "two"], &["twice"]), node("Add", &["twice", "one"], &["y"])],
        initializer: vec![scalar("two", 2.0), scalar("one", 1.0)],
        input: vec![value("x", &[])],
        output: vec![value("y", &[])],
    })
    .encode_to_vec();
    let repo = Repo::new();
    repo.add("scalar", &scalar, "max_batch_size: 0\n");
    let s = start(config(repo.path())).await;
    for v in [3.0f32, -0.5] {
        let out = s.client.infer("scalar", &[("x", &Tensor::from_f32(vec![], &[v]))], InferOptions::default()).await;
        let out = out.unwrap();
        assert_eq!((out[0].1.shape.clone(), out[0].1.to_f32().unwrap()), (vec![], vec![2.0 * v + 1.0]));
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_gzipped_only_when_the_server_is_told_to_and_gzipped_requests_always_work() {
    use tonic::codec::CompressionEncoding::Gzip;
    let repo = affine_repo();
    for compress in [false, true] {
        let s = start(sluice_server::ServerConfig { grpc_compress_responses: compress, ..config(repo.path()) }).await;
        let (v, t) = x(1, 0.0);
        let want = affine_reference(&v).0;
        let req = || sluice_client::infer_request("affine", &[("x", &t)], &InferOptions::default());
        // As tritonclient and perf_analyzer do: gzip listed as acceptable on every call.
        let resp = s.client.raw().accept_compressed(Gzip).model_infer(req()).await.unwrap();
        let encoding = resp.metadata().get("grpc-encoding").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(encoding.as_deref(), compress.then_some("gzip"), "compress responses: {compress}");
        let out = sluice_client::decode_outputs(resp.into_inner()).unwrap();
        assert_eq!(out.iter().find(|(n, _)| n == "y").unwrap().1.to_f32().unwrap(), want);
        // A gzipped request is read either way.
        let resp = s.client.raw().send_compressed(Gzip).model_infer(req()).await.unwrap();
        let out = sluice_client::decode_outputs(resp.into_inner()).unwrap();
        assert_eq!(out.iter().find(|(n, _)| n == "y").unwrap().1.to_f32().unwrap(), want);
        s.server.shutdown().await;
    }
}
