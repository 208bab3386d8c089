//! Observability end to end: /metrics after a known number of requests, the dashboard's
//! data endpoint, per-request timing and request ids, and the dashboard page itself in
//! headless Chromium under load.

use sluice_client::{InferOptions, Tensor};
use sluice_tests::{affine_model, metric, repo_root, start, Repo};

const PIPELINE: &str = "max_batch_size: 0\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: model.y}\nnodes:\n  - name: pre\n    op: delay\n    inputs: {value: x}\n    params: {ms: 1}\n  - name: model\n    model: affine\n    inputs: {x: pre.value}\n";

fn repo() -> Repo {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    repo.pipeline("p", PIPELINE);
    repo
}

fn x(batched: bool) -> Tensor {
    Tensor::from_f32(if batched { vec![1, 4] } else { vec![4] }, &[1.0, 2.0, 3.0, 4.0])
}

async fn data(http: &str) -> serde_json::Value {
    reqwest::get(format!("{http}/dashboard/data")).await.unwrap().json().await.unwrap()
}

fn find<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array().unwrap().iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no '{name}' in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_dashboard_data_count_every_request() {
    let s = start(repo().config()).await;
    let c = &s.client;
    for _ in 0..7 {
        c.infer("p", &[("x", &x(false))], InferOptions::default()).await.unwrap();
    }
    for _ in 0..5 {
        c.infer("affine", &[("x", &x(true))], InferOptions::default()).await.unwrap();
    }
    let bad = Tensor::from_f32(vec![3], &[1.0; 3]);
    assert!(c.infer("p", &[("x", &bad)], InferOptions::default()).await.is_err());

    let m = |name: &'static str, labels: Vec<String>| {
        let http = s.http.clone();
        async move {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            metric(&http, name, &labels).await
        }
    };
    let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(m("sluice_requests_total", l(&["model=\"p\""])).await, 8.0);
    assert_eq!(m("sluice_requests_total", l(&["model=\"affine\""])).await, 5.0);
    assert_eq!(m("sluice_request_failures_total", l(&["model=\"p\"", "error_type=\"invalid_input\""])).await, 1.0);
    for node in ["pre", "model"] {
        let n = format!("node=\"{node}\"");
        assert_eq!(m("sluice_node_items_total", l(&["pipeline=\"p\"", &n])).await, 7.0, "{node}");
        assert_eq!(m("sluice_node_duration_seconds_count", l(&["pipeline=\"p\"", &n])).await, 7.0, "{node}");
        assert_eq!(m("sluice_node_in_flight_items", l(&["pipeline=\"p\"", &n])).await, 0.0, "{node}");
    }
    // Every row the model ran, direct or from the pipeline, on its one instance.
    assert_eq!(m("sluice_instance_inferences_total", l(&["model=\"affine\"", "instance=\"0\""])).await, 12.0);
    let executions = m("sluice_instance_executions_total", l(&["model=\"affine\"", "instance=\"0\""])).await;
    assert!((1.0..=12.0).contains(&executions), "{executions}");
    assert!(m("sluice_instance_busy_seconds_total", l(&["model=\"affine\""])).await > 0.0);
    assert_eq!(m("sluice_model_instances", l(&["model=\"affine\""])).await, 1.0);
    assert!(m("sluice_process_resident_memory_bytes", vec![]).await > 1e6);
    assert!(m("sluice_process_cpu_seconds_total", vec![]).await >= 0.0, "whole seconds: present, perhaps 0");
    assert_eq!(m("sluice_reloads_total", l(&["outcome=\"ok\""])).await, 1.0, "the load at start");

    // The dashboard's data: the same counts, and the graph.
    let d = data(&s.http).await;
    let p = find(&d["pipelines"], "p");
    assert_eq!(p["requests_total"], 8);
    assert_eq!(p["failures_total"], 1);
    assert!(p["rps"].as_f64().unwrap() > 0.0 && p["p99_ms"].as_f64().unwrap() > 0.0, "{p}");
    assert!((p["error_rate"].as_f64().unwrap() - 1.0 / 8.0).abs() < 1e-9, "{p}");
    let pre = find(&p["nodes"], "pre");
    assert_eq!(
        (pre["kind"].as_str(), pre["what"].as_str(), pre["depth"].as_u64()),
        (Some("op"), Some("delay"), Some(1))
    );
    assert_eq!(pre["inputs"], serde_json::json!(["input:x"]));
    let node = find(&p["nodes"], "model");
    assert_eq!(
        (node["kind"].as_str(), node["depth"].as_u64(), node["items_total"].as_u64()),
        (Some("model"), Some(2), Some(7))
    );
    assert_eq!(node["inputs"], serde_json::json!(["pre"]));
    assert_eq!(find(&d["models"], "affine")["requests_total"], 5);

    // Rates over the window once the sampler has a baseline.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    for _ in 0..10 {
        c.infer("p", &[("x", &x(false))], InferOptions::default()).await.unwrap();
    }
    let d = data(&s.http).await;
    let node = find(&find(&d["pipelines"], "p")["nodes"], "model");
    assert!(node["items_per_s"].as_f64().unwrap() > 0.0, "{node}");
    assert_eq!(node["batch_size"].as_f64(), Some(1.0), "{node}");
    assert!(node["busy"].as_f64().unwrap() > 0.0, "{node}");
    assert!(find(&find(&d["pipelines"], "p")["nodes"], "pre")["compute_ms"].as_f64().unwrap() >= 1.0);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_ids_and_timing_on_request() {
    let s = start(repo().config()).await;
    let c = &s.client;
    // The timing: every node of the pipeline, the delay op computing at least 1 ms.
    let opts = InferOptions { timing: true, id: "req-1".into(), ..Default::default() };
    let r = c.infer_detailed("p", &[("x", &x(false))], opts).await.unwrap();
    assert_eq!(r.id, "req-1");
    let steps: Vec<&str> = r.timing.iter().map(|t| t.step.as_str()).collect();
    assert_eq!(steps, vec!["model", "pre"], "{:?}", r.timing);
    let pre = r.timing.iter().find(|t| t.step == "pre").unwrap();
    assert!(pre.compute_us >= 1000 && pre.items == 1, "{pre:?}");
    assert!(r.total_us.unwrap() >= pre.compute_us);
    // Without asking: no timing; without an id: one from the server.
    let r = c.infer_detailed("affine", &[("x", &x(true))], InferOptions::default()).await.unwrap();
    assert!(r.timing.is_empty() && r.total_us.is_none());
    assert!(r.id.starts_with("sluice-"), "{}", r.id);
    let timed = InferOptions { timing: true, ..Default::default() };
    let r = c.infer_detailed("affine", &[("x", &x(true))], timed).await.unwrap();
    assert_eq!(r.timing.len(), 1);
    assert_eq!(r.timing[0].step, "affine");

    // HTTP: the x-request-id header when the body has no id, timing in the parameters.
    let body = serde_json::json!({
        "parameters": {"sluice_timing": true},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}],
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/models/p/infer", s.http))
        .header("x-request-id", "from-header")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "from-header");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "from-header");
    assert!(v["parameters"]["sluice_timing.pre.compute_us"].as_i64().unwrap() >= 1000, "{v}");
    assert_eq!(v["parameters"]["sluice_timing.model.items"], 1);

    // Failures are answered with the id too: gRPC in the status's metadata, HTTP in the
    // header, whether the request was malformed, named an unknown model or was refused.
    let bad = Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]);
    let opts = InferOptions { id: "bad-1".into(), ..Default::default() };
    let Err(sluice_client::ClientError::Status(st)) = c.infer_detailed("p", &[("x", &bad)], opts).await else {
        panic!("a wrong shape is refused")
    };
    assert_eq!(st.metadata().get("x-request-id").map(|v| v.to_str().unwrap()), Some("bad-1"), "{st:?}");
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v2/models/p/infer", s.http))
        .header("x-request-id", "bad-2")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!((resp.status().as_u16(), &resp.headers()["x-request-id"]), (400, &"bad-2".parse().unwrap()));
    let resp = http.post(format!("{}/v2/models/nope/infer", s.http)).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert!(resp.headers()["x-request-id"].to_str().unwrap().starts_with("sluice-"), "{:?}", resp.headers());
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_page_shows_live_numbers_that_match_the_metrics() {
    let _machine = crate::loads_the_machine().await;
    let s = start(repo().config()).await;
    for _ in 0..3 {
        s.client.infer("affine", &[("x", &x(true))], InferOptions::default()).await.unwrap();
    }
    let page = reqwest::get(format!("{}/dashboard", s.http)).await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.unwrap().contains("EventSource(\"/dashboard/events\")"));

    let out = tempfile::tempdir().unwrap();
    let shot = out.path().join("dashboard.png");
    let body = r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]}"#;
    let python = repo_root().join(".venv/bin/python");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists() && python.exists(),
        "Chromium or the venv is missing: run scripts/setup.sh (the README's test command does)"
    );
    let (http, shot_arg) = (s.http.clone(), shot.clone());
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(repo_root().join("tests/python/dashboard_check.py"))
            .args([http.as_str(), "p", "affine", body])
            .arg(&shot_arg)
            .output()
            .expect("the dashboard check runs")
    })
    .await
    .unwrap();
    assert!(run.status.success(), "{}\n{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    if let Some(keep) = std::env::var_os("SLUICE_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_sends_frames_and_ends_at_shutdown() {
    let s = start(repo().config()).await;
    let mut events = reqwest::get(format!("{}/dashboard/events", s.http)).await.unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    // One frame, as an SSE `data:` line holding the same JSON as /dashboard/data.
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), events.chunk()).await.unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk.expect("a frame")));
    }
    let frame: serde_json::Value = serde_json::from_str(text.trim().strip_prefix("data:").unwrap().trim()).unwrap();
    assert_eq!(find(&frame["pipelines"], "p")["nodes"].as_array().unwrap().len(), 2);
    // A page left open must not hold up a graceful shutdown.
    tokio::time::timeout(std::time::Duration::from_secs(10), s.server.shutdown())
        .await
        .expect("shutdown finishes with an event stream open");
}
