//! The `sluice` binary itself: `check`, and `serve` stopping gracefully on SIGTERM (also
//! during the first load, and at once on a second signal).

use sluice_client::{Client, InferOptions, Tensor};
use sluice_tests::{affine_model, affine_reference, ort_dylib, Repo};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

#[test]
fn check_reports_every_bad_model_with_its_file_and_line() {
    let repo = Repo::new();
    repo.add("good", &affine_model(4), "max_batch_size: 4\n");
    let ok = sluice().args(["check", "--models"]).arg(repo.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains("ok     good v1: max_batch_size 4, inputs [x FP32[-1, 4]]"), "{stdout}");

    repo.add("typo", &affine_model(4), "max_batch_size: 4\ninstance: 2\n");
    repo.add("corrupt", b"garbage", "");
    let bad = sluice().args(["check", "--models"]).arg(repo.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(stdout.contains("typo/model.yaml:2:1: unknown field `instance`"), "{stdout}");
    assert!(stdout.contains("corrupt/model.onnx: not a valid ONNX file"), "{stdout}");
    assert!(stdout.contains("ok     good"), "{stdout}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("error: 2 of 3 models and pipelines have errors"));
}

#[test]
fn check_compiles_pipelines_and_graph_prints_them() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 4\n");
    let good = "max_batch_size: 0\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: m.y}\nnodes:\n  - name: m\n    model: affine\n    inputs: {x: x}\n  - name: spare\n    op: softmax\n    inputs: {tensor: m.neg}\n";
    repo.pipeline("good", good);
    let run = |args: &[&str]| {
        sluice()
            .args(args)
            .arg("--models")
            .arg(repo.path())
            .arg("--pipelines")
            .arg(repo.pipelines_path())
            .output()
            .unwrap()
    };
    let ok = run(&["check"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains("ok     pipeline good: 1 nodes"), "{stdout}");
    assert!(
        stdout.contains("good.yaml:10: node 'spare': unused: its outputs feed nothing; it will not run"),
        "{stdout}"
    );

    let dot = run(&["graph", "good"]);
    let text = String::from_utf8_lossy(&dot.stdout);
    assert!(dot.status.success(), "{text}");
    assert!(text.starts_with("digraph {"), "{text}");
    assert!(text.contains("model affine") && text.contains("x: tensor FP32 [4]"), "{text}");

    // A split and a condition show in the graph: the branches with their shares, the
    // condition on its node, the values that may be absent on their edges.
    repo.add("affine2", &affine_model(4), "max_batch_size: 4\n");
    let choosing = "max_batch_size: 0\nparameters:\n  - {name: on, type: bool, default: true}\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: m.y, default: [0, 0, 0, 0]}\nnodes:\n  - name: m\n    split:\n      - {model: affine, weight: 3}\n      - {model: affine2, weight: 1}\n    inputs: {x: x}\n    when: $on\n";
    repo.pipeline("choosing", choosing);
    let dot = run(&["graph", "choosing"]);
    let text = String::from_utf8_lossy(&dot.stdout);
    assert!(dot.status.success(), "{text}");
    assert!(text.contains("split: affine 75%, affine2 25%"), "{text}");
    assert!(text.contains("when $on") && text.contains("(may be absent)"), "{text}");
    std::fs::remove_file(repo.pipelines_path().join("choosing.yaml")).unwrap();
    std::fs::remove_dir_all(repo.path().join("affine2")).unwrap();

    repo.pipeline("bad", &good.replace("from: m.y", "from: m.z").replace("model: affine", "model: afine"));
    let bad = run(&["check"]);
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(stdout.contains("bad.yaml:8: node 'm': unknown model 'afine'"), "{stdout}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("error: 1 of 3 models and pipelines have errors"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocr_prints_the_lines_a_server_reads() {
    let repo = sluice_tests::ocr_repo();
    let images = tempfile::tempdir().unwrap();
    sluice_tests::render_text(images.path());
    let s = sluice_tests::start(repo.config()).await;
    let url = format!("http://{}", s.server.grpc_addr);
    let (a, b) = (images.path().join("three_lines.png"), images.path().join("chinese.png"));
    let run =
        |args: Vec<std::ffi::OsString>| tokio::task::spawn_blocking(move || sluice().args(args).output().unwrap());
    let out =
        run(vec!["ocr".into(), "--url".into(), url.clone().into(), a.clone().into(), b.clone().into()]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], a.display().to_string());
    assert!(lines[1].ends_with("  First line here") && lines[3].ends_with("  Third 3"), "{stdout}");
    assert!(lines[5].ends_with("  你好世界"), "{stdout}");
    let out = run(vec!["ocr".into(), "--json".into(), "--url".into(), url.into(), b.into()]).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["lines"][0]["text"], "你好世界");
    assert_eq!(v[0]["lines"][0]["box"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_states_and_infer_prints_json_outputs() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 4\n");
    repo.add("resnet50", &sluice_tests::tiny_classifier(), "max_batch_size: 8\n");
    repo.pipeline(
        "classify",
        &std::fs::read_to_string(sluice_tests::repo_root().join("pipelines/classify.yaml")).unwrap(),
    );
    repo.pipeline("typo", "inputs: []\noutputs: []\nnodes: []\n");
    let s = sluice_tests::start(repo.config()).await;
    let url = format!("http://{}", s.server.grpc_addr);
    let run = |args: Vec<String>| tokio::task::spawn_blocking(move || sluice().args(args).output().unwrap());
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();

    let out = run(vec!["models".into(), "--url".into(), url.clone()]).await.unwrap();
    assert!(out.status.success());
    let listing = text(&out);
    assert!(listing.lines().any(|l| l.starts_with("affine") && l.contains("READY")), "{listing}");
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("typo") && l.contains("UNAVAILABLE") && l.contains("needs at least one input")),
        "{listing}"
    );

    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.json");
    std::fs::write(&x, r#"{"datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}"#).unwrap();
    let out = run(vec![
        "infer".into(),
        "--url".into(),
        url.clone(),
        "affine".into(),
        "--input".into(),
        format!("x={}", x.display()),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&text(&out)).unwrap();
    assert_eq!(v["outputs"][0]["name"], "y");
    assert_eq!(v["outputs"][0]["data"], serde_json::json!([3.0, 5.0, 7.0, 9.0]));

    let img = dir.path().join("a.png");
    std::fs::write(&img, sluice_tests::png(&sluice_ops::Image::filled(40, 30, [200, 30, 90]))).unwrap();
    let out = run(vec![
        "infer".into(),
        "--url".into(),
        url.clone(),
        "classify".into(),
        "--image".into(),
        img.display().to_string(),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&text(&out)).unwrap();
    assert_eq!(v["outputs"][1]["name"], "classes");
    assert_eq!(v["outputs"][1]["shape"], serde_json::json!([1, 5]));

    std::fs::write(&x, r#"{"datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}"#).unwrap();
    let out = run(vec![
        "infer".into(),
        "--url".into(),
        url.clone(),
        "affine".into(),
        "--input".into(),
        format!("x={}", x.display()),
    ])
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `sluice reload`: the fixed pipeline loads; names load or unload one at a time.
    let fixed = "max_batch_size: 0\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: m.y}\nnodes:\n  - name: m\n    model: affine\n    inputs: {x: x}\n";
    repo.pipeline("typo", fixed);
    let out = run(vec!["reload".into(), "--url".into(), url.clone()]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text(&out).contains("reloaded the repository"), "{}", text(&out));
    let listing = text(&run(vec!["models".into(), "--url".into(), url.clone()]).await.unwrap());
    assert!(listing.lines().any(|l| l.starts_with("typo") && l.contains("READY")), "{listing}");
    let out = run(vec!["reload".into(), "--url".into(), url.clone(), "--unload".into(), "typo".into()]).await.unwrap();
    assert!(out.status.success() && text(&out).contains("unloaded typo"), "{}", text(&out));
    assert!(text(&out).contains("typo  UNAVAILABLE: unloaded"), "{}", text(&out));
    let out = run(vec!["reload".into(), "--url".into(), url.clone(), "nope".into()]).await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model 'nope' is not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sweeps_concurrency_and_batch_size_and_writes_tables() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    let s = sluice_tests::start(repo.config()).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("out.csv");
    let svg = dir.path().join("plot.svg");
    let args: Vec<String> = [
        "bench",
        "affine",
        "--concurrency",
        "1,2",
        "--batch",
        "1,3",
        "--seconds",
        "0.5",
        "--warmup",
        "0.1",
        "--format",
        "markdown",
        "--timing",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--url".into(),
        format!("http://{}", s.server.grpc_addr),
        "--out".into(),
        csv.display().to_string(),
        "--plot".into(),
        svg.display().to_string(),
    ])
    .collect();
    let out = tokio::task::spawn_blocking(move || sluice().args(args).output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().collect();
    assert!(rows[0].starts_with("| concurrency | batch | requests |"), "{stdout}");
    let leads: Vec<String> = rows[2..6].iter().map(|r| r.split(" | ").take(2).collect::<Vec<_>>().join(",")).collect();
    assert_eq!(leads, ["| 1,1", "| 2,1", "| 1,3", "| 2,3"], "{stdout}");
    let written = std::fs::read_to_string(&csv).unwrap();
    assert!(written.starts_with("concurrency,batch,requests,errors,req/s,items/s"), "{written}");
    assert_eq!(written.lines().count(), 5);
    // Batch-3 requests reach the server with three items each (its own timing says so),
    // and items/s is three times req/s.
    let per_step: Vec<&str> = stdout.lines().filter(|l| l.contains(" | affine | ")).collect();
    assert_eq!(per_step.len(), 4, "{stdout}");
    for l in per_step {
        let f: Vec<&str> = l.split(" | ").collect();
        assert_eq!(f[3], if f[1] == "3" { "3.00" } else { "1.00" }, "items per request at batch {}: {l}", f[1]);
    }
    for line in written.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (batch, rps, items): (f64, f64, f64) =
            (f[1].parse().unwrap(), f[4].parse().unwrap(), f[5].parse().unwrap());
        assert!(rps > 0.0 && (items - rps * batch).abs() < 0.02 * items + 0.01, "{line}");
    }
    // The plot is well-formed SVG (checked with Python's XML parser).
    let check = std::process::Command::new(sluice_tests::repo_root().join(".venv/bin/python"))
        .args(["-c", "import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); assert r.tag.endswith('svg'), r.tag; print(len(list(r.iter())))"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let elements: usize = String::from_utf8_lossy(&check.stdout).trim().parse().unwrap();
    assert!(elements > 20, "a plot with axes and series, not an empty page ({elements} elements)");

    // --timing: the server's time per request, by step, below the table.
    let url = format!("http://{}", s.server.grpc_addr);
    let args =
        ["bench", "affine", "--concurrency", "1", "--seconds", "0.3", "--warmup", "0", "--timing", "--url", &url]
            .map(String::from);
    let out = tokio::task::spawn_blocking(move || sluice().args(args).output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let step = stdout.lines().skip_while(|l| !l.starts_with("server time per request, by step")).nth(4);
    assert!(step.is_some_and(|l| l.starts_with("| 1 | 1 | affine | 1.00 | ")), "{stdout}");
}

/// `sluice serve` on ephemeral loopback ports with `extra` flags; returns the child and
/// its gRPC and HTTP addresses, read from the line it prints once serving.
fn serve(repo: &Repo, extra: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String, String) {
    let mut child = sluice()
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--models"])
        .arg(repo.path())
        .arg("--ort-dylib")
        .arg(ort_dylib())
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "sluice serving gRPC on 127.0.0.1:PORT and HTTP on 127.0.0.1:PORT"
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words.len() > 8, "not the serving line: {line}");
    (child, words[4].to_string(), words[8].to_string())
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits() {
    let repo = Repo::new();
    repo.add(
        "held",
        &affine_model(4),
        "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 500000\n  hold: delay\n",
    );
    let (mut child, grpc, http) = serve(&repo, &[], &[]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(format!("http://{grpc}")).await.unwrap();
        let v = [1.0f32, 2.0, 3.0, 4.0];
        let t = Tensor::from_f32(vec![1, 4], &v);
        let call = tokio::spawn(async move { client.infer("held", &[("x", &t)], InferOptions::default()).await });
        let addr = http.clone();
        tokio::task::spawn_blocking(move || wait_until_queued(&addr)).await.unwrap();
        let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let out = call.await.unwrap().expect("the in-flight request completes");
        assert_eq!(out[0].1.to_f32().unwrap(), affine_reference(&v).0);
    });
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The HTTP status of a GET (plain HTTP/1.0), or None while nothing accepts.
fn http_get_status(http: &str, path: &str) -> Option<u16> {
    let mut conn = std::net::TcpStream::connect(http).ok()?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut head = String::new();
    BufReader::new(conn).read_line(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// Waits up to `limit` for the child to exit.
fn exit_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("still running {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn term(child: &std::process::Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
}

#[test]
fn sigterm_during_the_first_load_exits_at_once() {
    let repo = Repo::new();
    // A load that takes seconds: a slow model warmed up many times.
    let warmups = "  - {batch_size: 1}\n".repeat(200);
    repo.add("busy", &sluice_tests::busy_model(400), &format!("max_batch_size: 0\nwarmup:\n{warmups}"));
    let http = free_port();
    let mut child = sluice()
        .args(["serve", "--grpc-addr", &free_port(), "--http-addr", &http, "--drain-delay-s", "30", "--models"])
        .arg(repo.path())
        .arg("--ort-dylib")
        .arg(ort_dylib())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Loading: the startup probe says 503.
    let mut loading = false;
    for _ in 0..500 {
        match http_get_status(&http, "/v2/health/startup") {
            Some(503) => {
                loading = true;
                break;
            }
            Some(other) => panic!("startup probe answered {other} before the load could be seen"),
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(loading, "the startup probe never answered");
    term(&child);
    let status = exit_within(&mut child, Duration::from_secs(3));
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_drains_with_aliases_from_the_environment_and_a_second_signal_exits_at_once() {
    let repo = Repo::new();
    repo.add("held", &affine_model(4), "max_batch_size: 8\n");
    let (mut child, _, http) =
        serve(&repo, &["--drain-delay-s", "30"], &[("SLUICE_MODEL_ALIAS", "first=held,second=held")]);
    assert_eq!(http_get_status(&http, "/v2/models/first/ready"), Some(200));
    assert_eq!(http_get_status(&http, "/v2/models/second/ready"), Some(200));
    assert_eq!(http_get_status(&http, "/v2/health/ready"), Some(200));

    term(&child);
    let mut draining = false;
    for _ in 0..200 {
        if http_get_status(&http, "/v2/health/ready") == Some(503) {
            draining = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(draining, "not ready after SIGTERM");
    assert_eq!(http_get_status(&http, "/v2/health/live"), Some(200), "still serving during the drain delay");
    term(&child);
    let status = exit_within(&mut child, Duration::from_secs(3));
    assert_eq!(status.code(), Some(130), "the second signal exits at once: {status:?}");
}

/// Polls the server's /metrics (plain HTTP/1.0) until the held request is queued.
fn wait_until_queued(http: &str) {
    for _ in 0..1000 {
        let mut conn = std::net::TcpStream::connect(http).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).unwrap();
        if body.contains("sluice_queue_depth{model=\"held\"} 1") {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the request never reached the queue");
}

/// Requests a stand-in collector received: (path, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A stand-in OpenTelemetry collector: answers every HTTP request with 200 and keeps it.
fn fake_collector() -> (String, Received) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut request_line, mut len) = (String::new(), 0usize);
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
            keep.lock().unwrap().push((path, body));
            let mut conn = conn;
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, got)
}

#[test]
fn serve_exports_request_spans_over_otlp() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    let (collector, got) = fake_collector();
    let (mut child, grpc, _) = serve(&repo, &["--otlp-endpoint", &collector], &[]);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = Client::connect(format!("http://{grpc}")).await.unwrap();
        let t = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
        let opts = InferOptions { id: "otlp-check-7".into(), ..Default::default() };
        client.infer("affine", &[("x", &t)], opts).await.unwrap();
    });
    // Spans go out in batches; the rest on exit.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    let got = got.lock().unwrap();
    let traces: Vec<&Vec<u8>> = got.iter().filter(|(p, _)| p == "/v1/traces").map(|(_, b)| b).collect();
    let has = |needle: &[u8]| traces.iter().any(|b| b.windows(needle.len()).any(|w| w == needle));
    assert!(!traces.is_empty(), "no POST to /v1/traces: {:?}", got.iter().map(|(p, _)| p).collect::<Vec<_>>());
    assert!(
        has(b"request") && has(b"otlp-check-7") && has(b"affine") && has(b"sluice"),
        "the request span is exported"
    );
    assert!(has(b"batch"), "the model's batch span is exported too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_speak_tls_with_the_given_ca_and_certificate() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 4\n");
    let pki = sluice_tests::pki::pki();
    let mut cfg = repo.config();
    cfg.tls = Some(pki.write(repo.path(), true));
    let s = sluice_server::start(cfg).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (ca, cert, key) = (file("ca.pem", &pki.ca_pem), file("c.pem", &pki.client.0), file("c.key", &pki.client.1));
    let url = format!("https://localhost:{}", s.grpc_addr.port());
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let mut cmd = sluice();
            // A developer's own settings must not leak into the test.
            for v in
                ["SLUICE_URL", "SLUICE_TLS_CA", "SLUICE_TLS_DOMAIN", "SLUICE_CLIENT_TLS_CERT", "SLUICE_CLIENT_TLS_KEY"]
            {
                cmd.env_remove(v);
            }
            cmd.args(args).output().unwrap()
        })
    };
    let models = |extra: &[&str]| {
        ["models", "--url", url.as_str()].iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>()
    };

    let ok = run(models(&["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key])).await.unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("affine"));

    // The system's roots do not know the test CA; the server wants a client certificate.
    for extra in [&[][..], &["--tls-ca", &ca][..]] {
        let out = run(models(extra)).await.unwrap();
        assert!(!out.status.success(), "served without {extra:?}");
    }
    // A certificate without its key is a usage error.
    let out = run(models(&["--tls-ca", &ca, "--tls-cert", &cert])).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"), "{}", String::from_utf8_lossy(&out.stderr));
    s.shutdown().await;
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn out_of_file_descriptors_the_server_waits_instead_of_spinning() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    // More connections allowed than the process has descriptors for: accepts fail.
    let (mut child, grpc, http) = serve(&repo, &["--max-connections", "1000"], &[]);
    let pid = child.id();
    let limited = Command::new("prlimit").args(["--pid", &pid.to_string(), "--nofile=64:64"]).status().unwrap();
    assert!(limited.success());
    let mut held = Vec::new();
    // 200 in all: some accepted until descriptors run out, the rest left in the listen
    // backlogs (128 each), none refused.
    for addr in [&grpc, &http] {
        for _ in 0..100 {
            match std::net::TcpStream::connect(addr.as_str()) {
                Ok(c) => held.push(c),
                Err(e) => panic!("connect: {e}"),
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_seconds(pid) - before;
    assert!(spent < 0.3, "the server used {spent:.2} s of CPU in 2 s while out of descriptors");
    drop(held);
    // Served again once the connections are gone.
    let t0 = std::time::Instant::now();
    loop {
        let ok = Command::new("curl")
            .args(["-sf", "-m", "1", &format!("http://{http}/v2/health/live")])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "not served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// One exported span: its name, ids and the `model` and `id` fields of a request span.
#[derive(Debug)]
struct SpanSeen {
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    model: String,
    request: String,
}

/// The spans a stand-in collector received.
fn exported_spans(got: &Received) -> Vec<SpanSeen> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;
    let mut spans = Vec::new();
    for (path, body) in got.lock().unwrap().iter().filter(|(p, _)| p == "/v1/traces") {
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap_or_else(|e| panic!("{path}: {e}"));
        for s in req.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
            let field = |k: &str| {
                s.attributes
                    .iter()
                    .find(|a| a.key == k)
                    .and_then(|a| a.value.as_ref()?.value.as_ref())
                    .map(|v| match v {
                        Value::StringValue(v) => v.clone(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default()
            };
            spans.push(SpanSeen {
                name: s.name.clone(),
                trace: s.trace_id.clone(),
                id: s.span_id.clone(),
                parent: s.parent_span_id.clone(),
                model: field("model"),
                request: field("id"),
            });
        }
    }
    spans
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_trace_and_request_ids_cross_to_the_model_tier() {
    let (collector, got) = fake_collector();
    let otlp = ["--otlp-endpoint", collector.as_str()];
    let model_repo = Repo::new();
    model_repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    let (model_tier, model_grpc, _) = serve(&model_repo, &otlp, &[]);
    // The CPU tier: the model remote, and a pipeline over it.
    let cpu_repo = Repo::new();
    let d = cpu_repo.path().join("affine");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("model.yaml"), format!("backend: remote\nremote:\n  endpoints: [{model_grpc}]\n")).unwrap();
    cpu_repo.pipeline(
        "pipe",
        "max_batch_size: 8\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: m.y}\nnodes:\n  - name: m\n    model: affine\n    inputs: {x: x}\n",
    );
    let pipelines = cpu_repo.pipelines_path().display().to_string();
    let cpu_args = [&otlp[..], &["--pipelines", pipelines.as_str()]].concat();
    let (cpu_tier, cpu_grpc, cpu_http) = serve(&cpu_repo, &cpu_args, &[]);
    // Killed if the test fails before it stops them itself.
    let mut servers = KillOnDrop(vec![cpu_tier, model_tier]);

    let (t1, p1) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (t2, p2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = Client::connect(format!("http://{cpu_grpc}")).await.unwrap();
        // The remote model loads once it has read the model tier's signature.
        for _ in 0..200 {
            if client.model_ready("pipe").await.unwrap_or(false) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let x = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
        let traced =
            InferOptions { id: "trace-check-1".into(), traceparent: format!("00-{t1}-{p1}-01"), ..Default::default() };
        client.infer("pipe", &[("x", &x)], traced).await.unwrap();
        let untraced = InferOptions { id: "trace-check-3".into(), ..Default::default() };
        client.infer("affine", &[("x", &x)], untraced).await.unwrap();
    });
    // Over HTTP, the id and the trace in headers.
    let mut conn = std::net::TcpStream::connect(&cpu_http).unwrap();
    let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}"#;
    write!(
        conn,
        "POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-request-id: trace-check-2\r\ntraceparent: 00-{t2}-{p2}-01\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The rest of the spans go out as each server exits.
    for child in servers.0.iter_mut() {
        assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
        assert!(child.wait().unwrap().success());
    }
    let all = exported_spans(&got);
    let spans: Vec<&SpanSeen> = all.iter().filter(|s| s.name == "request").collect();
    // The spans from `s` up to its root, by parent ids.
    let ancestors = |s: &SpanSeen| {
        let mut chain = Vec::new();
        let mut at = all.iter().find(|p| p.id == s.parent);
        while let Some(p) = at.filter(|_| chain.len() < 16) {
            chain.push(p);
            at = all.iter().find(|q| q.id == p.parent);
        }
        chain
    };
    for (model, id, trace, parent) in [("pipe", "trace-check-1", t1, p1), ("affine", "trace-check-2", t2, p2)] {
        // The CPU tier joins the caller's trace under the caller's span ...
        let cpu = spans
            .iter()
            .find(|s| s.request.contains(id) && hex(&s.parent) == parent)
            .unwrap_or_else(|| panic!("no CPU-tier span for {id} under {parent}: {spans:#?}"));
        assert_eq!((cpu.model.as_str(), hex(&cpu.trace)), (model, trace.to_string()));
        // ... and the model tier's span for the same request is in the same trace, under
        // the CPU tier's batch span, which is under the request (for a pipeline, its node).
        let remote = spans
            .iter()
            .find(|s| s.model == "affine" && s.request.contains(id) && !std::ptr::eq(*s, cpu))
            .unwrap_or_else(|| panic!("no model-tier span for {id}: {spans:#?}"));
        assert_eq!(hex(&remote.trace), trace);
        let up = ancestors(remote);
        assert_eq!(up.first().map(|s| s.name.as_str()), Some("batch"), "{up:#?}");
        assert!(up.iter().any(|s| s.id == cpu.id), "the CPU tier's request is above it: {up:#?}");
    }
    // A request that came with no trace starts one, which the model tier joins.
    let untraced: Vec<&&SpanSeen> = spans.iter().filter(|s| s.request.contains("trace-check-3")).collect();
    assert_eq!(untraced.len(), 2, "{spans:#?}");
    let root = untraced.iter().find(|s| s.parent.is_empty()).expect("the CPU tier's span is a root");
    let child = untraced.iter().find(|s| !s.parent.is_empty()).expect("the model tier's span");
    assert_eq!(child.trace, root.trace);
    assert!(ancestors(child).iter().any(|s| s.id == root.id), "the model tier's span is under the CPU tier's");
}

/// Child processes killed when dropped (a failing test must not leave servers behind).
struct KillOnDrop(Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
