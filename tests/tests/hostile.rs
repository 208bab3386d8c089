//! What an attacker or a careless client or file author sends, against the image serving
//! the example repository in a container capped at 4 GiB, while a canary client sends a
//! valid request every 100 ms: each attack is answered (an error or a result), the
//! canary never fails, nor is it shed while the attack's large bodies fill the in-flight
//! budget (a part is kept for small requests), the container is never killed, and memory
//! comes back down.
//!
//! Needs Docker. Set SLUICE_SKIP_DOCKER_TESTS=1 to skip where there is none.

use sluice_client::{Client, InferOptions, Tensor};
use sluice_tests::docker::{build_image, docker, run, skip, IMAGE};
use sluice_tests::repo_root;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MEMORY_CAP: u64 = 4 << 30;

struct Cleanup {
    container: String,
    network: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.container]).output();
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}

/// A grey PNG: tiny on the wire however large its pixels.
fn grey_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let pixels = vec![128u8; w as usize * h as usize];
    enc.write_header().and_then(|mut wr| wr.write_image_data(&pixels)).unwrap();
    out
}

/// A grey JPEG.
fn grey_jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = jpeg_encoder::Encoder::new(&mut out, 80);
    enc.encode(&vec![128u8; w as usize * h as usize], w, h, jpeg_encoder::ColorType::Luma).unwrap();
    out
}

/// A picture with some structure (so OCR's detector has edges to look at), as a JPEG.
fn photo_jpeg(w: u16, h: u16) -> Vec<u8> {
    let data: Vec<u8> = (0..w as u32 * h as u32)
        .flat_map(|i| {
            let (x, y) = (i % w as u32, i / w as u32);
            let v = if (x / 16 + y / 16) % 2 == 0 { 30 } else { 220 };
            [v, (x % 256) as u8, (y % 256) as u8]
        })
        .collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 85).encode(&data, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

/// The server's resident memory (PID 1 in its container), in bytes.
fn rss_of(container: &str) -> u64 {
    let status = docker(&["exec", container, "cat", "/proc/1/status"]);
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kb.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// A picture with some structure (so OCR's detector has edges to look at).
fn photo(w: u32, h: u32) -> Vec<u8> {
    let data = (0..w * h).flat_map(|i| {
        let (x, y) = (i % w, i / w);
        let v = if (x / 16 + y / 16) % 2 == 0 { 30 } else { 220 };
        [v, (x % 256) as u8, (y % 256) as u8]
    });
    sluice_tests::png(&sluice_ops::Image::new(w, h, data.collect()))
}

/// The container's memory now (`peak: false`) or at its highest, from its cgroup (v2,
/// or v1's memory controller).
fn memory_of(container: &str, peak: bool) -> u64 {
    let files = if peak {
        ["memory.peak", "memory/memory.max_usage_in_bytes"]
    } else {
        ["memory.current", "memory/memory.usage_in_bytes"]
    };
    for f in files {
        let out = Command::new("docker").args(["exec", container, "cat", &format!("/sys/fs/cgroup/{f}")]).output();
        if let Some(v) = out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()) {
            return v;
        }
    }
    0
}

/// HTTP infer with one BYTES input holding `data` (the binary tensor extension).
async fn http_image(http: &reqwest::Client, base: &str, pipeline: &str, data: &[u8]) -> (u16, String) {
    let header = serde_json::json!({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                    "parameters": {"binary_data_size": data.len() + 4}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&(data.len() as u32).to_le_bytes());
    body.extend_from_slice(data);
    http_post(http, &format!("{base}/v2/models/{pipeline}/infer"), header.len(), body).await
}

async fn http_post(http: &reqwest::Client, url: &str, header_len: usize, body: Vec<u8>) -> (u16, String) {
    match http.post(url).header("Inference-Header-Content-Length", header_len.to_string()).body(body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            (status, text.chars().take(400).collect())
        }
        Err(e) => (0, format!("no answer: {e}")),
    }
}

/// HTTP infer of one FP32 input of `shape`, zeros.
async fn http_f32(http: &reqwest::Client, base: &str, model: &str, input: &str, shape: &[usize]) -> (u16, String) {
    let n: usize = shape.iter().product();
    let header = serde_json::json!({
        "inputs": [{"name": input, "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": n * 4}}]
    })
    .to_string();
    let mut body = Vec::with_capacity(header.len() + n * 4);
    body.extend_from_slice(header.as_bytes());
    body.resize(header.len() + n * 4, 0);
    http_post(http, &format!("{base}/v2/models/{model}/infer"), header.len(), body).await
}

#[derive(Default)]
struct Canary {
    ok: AtomicU64,
    /// Refused because other requests' bytes held the in-flight budget ("retry later"):
    /// counted apart, and must not happen, since large bodies leave a reserve for small ones.
    shed: AtomicU64,
    failed: Mutex<Vec<String>>,
}

async fn canary(grpc: String, stop: Arc<AtomicBool>, tally: Arc<Canary>) {
    let image = photo(64, 48);
    let input = Tensor::from_bytes_elements(vec![1, 1], &[image.as_slice()]);
    let client = Client::connect(grpc).await.expect("canary connects");
    while !stop.load(Ordering::Relaxed) {
        let opts = InferOptions { timeout: Some(Duration::from_secs(20)), ..Default::default() };
        match client.infer("classify", &[("image", &input)], opts).await {
            Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) if e.code() == Some(tonic::Code::ResourceExhausted) && e.to_string().contains("bytes in flight") => {
                tally.shed.fetch_add(1, Ordering::Relaxed)
            }
            Err(e) => {
                tally.failed.lock().unwrap().push(e.to_string());
                0
            }
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-r").arg(from).arg(to));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_and_files_fail_alone_in_a_4_gib_container() {
    if skip() {
        eprintln!("SLUICE_SKIP_DOCKER_TESTS=1: skipped");
        return;
    }
    build_image();
    let root = repo_root();
    // Writable copies: the test adds hostile files while the server watches them.
    let files = tempfile::tempdir().unwrap();
    let (models, pipelines) = (files.path().join("models"), files.path().join("pipelines"));
    copy_dir(&root.join("models"), &models);
    copy_dir(&root.join("pipelines"), &pipelines);
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(files.path()));

    let network = format!("sluice-hostile-{}", std::process::id());
    let name = format!("{network}-server");
    let _cleanup = Cleanup { container: name.clone(), network: network.clone() };
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    let _ = Command::new("docker").args(["network", "rm", &network]).output();
    docker(&["network", "create", "--internal", &network]);
    let cap = format!("{}", MEMORY_CAP);
    run(Command::new("docker")
        .args(["run", "-d", "--name", &name, "--network", &network, "--memory", &cap, "--memory-swap", &cap])
        .args(["-v", &format!("{}:/srv/sluice/models:ro", models.display())])
        .args(["-v", &format!("{}:/srv/sluice/pipelines:ro", pipelines.display())])
        .args([IMAGE, "--reload-debounce-ms", "200"]));
    let ip = sluice_tests::docker::ip(&name);
    let (base, grpc) = (format!("http://{ip}:8000"), format!("http://{ip}:8001"));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/v2/health/ready")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "not ready:\n{}", sluice_tests::docker::logs(&name, 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let baseline = memory_of(&name, false);
    let baseline_rss = rss_of(&name);
    eprintln!("ready in {:?}; memory {} MiB, RSS {} MiB", t0.elapsed(), baseline >> 20, baseline_rss >> 20);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Canary::default());
    let canary_task = tokio::spawn(canary(grpc.clone(), stop.clone(), tally.clone()));

    // (what, status, what the answer must say)
    let mut answers: Vec<(&str, u16, String)> = Vec::new();

    // Images whose pixels, or whose resize, would not fit.
    let (s, b) = http_image(&http, &base, "classify", &grey_png(1, 65_500)).await;
    answers.push(("1x65500 PNG into classify", s, b));
    let (s, b) = http_image(&http, &base, "classify", &grey_jpeg(1, 65_500)).await;
    answers.push(("1x65500 JPEG into classify", s, b));
    let (s, b) = http_image(&http, &base, "classify", &grey_png(1, 67_108_864)).await;
    answers.push(("1x67108864 PNG into classify", s, b));
    let (s, b) = http_image(&http, &base, "classify", &grey_png(9000, 9000)).await;
    answers.push(("9000x9000 PNG into classify", s, b));
    let (s, b) = http_image(&http, &base, "ocr", &grey_png(8000, 8000)).await;
    answers.push(("8000x8000 PNG into ocr", s, b));
    // Model inputs beyond their max_dim.
    let (s, b) = http_f32(&http, &base, "ocr_rec", "x", &[1, 3, 48, 200_000]).await;
    answers.push(("ocr_rec 1x3x48x200000", s, b));
    let (s, b) = http_f32(&http, &base, "ocr_det", "x", &[1, 3, 4096, 4096]).await;
    answers.push(("ocr_det 1x3x4096x4096 (192 MiB)", s, b));
    // A body just under the message limit, right after another large one.
    let (s, b) = http_f32(&http, &base, "resnet50", "input", &[1, 3, 4096, 5400]).await;
    answers.push(("resnet50 250 MiB body", s, b));
    for (what, status, body) in &answers {
        eprintln!("{what}: {status} {body}");
    }
    let expect = |what: &str, status: u16, says: &str| {
        let (_, s, b) = answers.iter().find(|(w, _, _)| *w == what).unwrap();
        assert!(*s == status && b.contains(says), "{what}: expected {status} saying '{says}', got {s} {b}");
    };
    expect("1x65500 PNG into classify", 413, "--max-image-pixels");
    expect("1x65500 JPEG into classify", 413, "--max-image-pixels");
    expect("1x67108864 PNG into classify", 413, "--max-image-pixels");
    expect("9000x9000 PNG into classify", 413, "--max-image-pixels");
    expect("8000x8000 PNG into ocr", 200, "texts");
    expect("ocr_rec 1x3x48x200000", 413, "max_dim");
    expect("ocr_det 1x3x4096x4096 (192 MiB)", 413, "max_dim");
    expect("resnet50 250 MiB body", 400, "does not match");

    // Eight 200 MiB gRPC messages at once: the large bodies' share of the in-flight budget
    // (448 of 512 MiB) cannot hold them all; those it cannot are refused as their bytes
    // arrive, while the canary's small requests use the rest.
    let big = Tensor::from_f32(vec![1, 3, 4096, 4267], &vec![0.0; 3 * 4096 * 4267]);
    let big = Arc::new(big);
    let sends = (0..8).map(|_| {
        let (grpc, big) = (grpc.clone(), big.clone());
        tokio::spawn(async move {
            let client = Client::connect(grpc).await.unwrap();
            client.infer("resnet50", &[("input", &big)], InferOptions::default()).await.map(|_| ())
        })
    });
    let results: Vec<_> = futures::future::join_all(sends).await.into_iter().map(|r| r.unwrap()).collect();
    let codes: Vec<Option<tonic::Code>> = results.iter().map(|r| r.as_ref().err().and_then(|e| e.code())).collect();
    eprintln!("8 x 200 MiB over gRPC: {codes:?}");
    assert!(codes.iter().all(|c| matches!(c, Some(tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument))));
    assert!(codes.contains(&Some(tonic::Code::ResourceExhausted)), "the budget refused some");
    drop(big);

    // A 1 MB metadata value: refused, and the server goes on.
    let mut raw =
        sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(grpc.clone()).await.unwrap();
    let mut req = tonic::Request::new(sluice_proto::ServerReadyRequest {});
    req.metadata_mut().insert("x-junk", "a".repeat(1 << 20).parse().unwrap());
    assert!(raw.server_ready(req).await.is_err(), "1 MB of metadata is refused");
    // h2 answers a header flood by closing that connection (GOAWAY ENHANCE_YOUR_CALM);
    // the client's channel connects again and is served.
    let mut served = false;
    for _ in 0..20 {
        if raw.server_ready(sluice_proto::ServerReadyRequest {}).await.is_ok_and(|r| r.into_inner().ready) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the same client is served again");

    // Hostile files, added while serving: each fails its own load, with its reason.
    let chain: String = (1..50_000).fold(
        "inputs:\n  - {name: image, dtype: BYTES, dims: [1]}\noutputs:\n  - {name: o, from: n49999.image}\nnodes:\n  - {name: n0, op: decode_image, inputs: {bytes: image}}\n".to_string(),
        |mut t, i| {
            t.push_str(&format!("  - {{name: n{i}, op: rotate180, inputs: {{image: n{}.image}}}}\n", i - 1));
            t
        },
    );
    std::fs::write(pipelines.join("chain.yaml"), chain).unwrap();
    std::fs::write(pipelines.join("nested.yaml"), format!("outputs: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)))
        .unwrap();
    let labelled = |file: &str| {
        std::fs::read_to_string(root.join("pipelines/classify.yaml"))
            .unwrap()
            .replace("params: {k: 5, softmax: true}", &format!("params: {{k: 5, softmax: true, labels: {file}}}"))
    };
    std::fs::write(pipelines.join("zero_labels.yaml"), labelled("/dev/zero")).unwrap();
    std::fs::write(pipelines.join("passwd_labels.yaml"), labelled("../../../etc/passwd")).unwrap();
    for (dir, yaml) in [
        ("bad_instances", "instances: 100000\n"),
        ("bad_warmup", "warmup:\n  - batch_size: 2000000000\n"),
        ("bad_batch", "max_batch_size: 2000000000\n"),
    ] {
        std::fs::create_dir(models.join(dir)).unwrap();
        std::fs::copy(models.join("ocr_cls/model.onnx"), models.join(dir).join("model.onnx")).unwrap();
        std::fs::write(models.join(dir).join("model.yaml"), yaml).unwrap();
    }
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(files.path()));
    let wanted = ["chain", "nested", "zero_labels", "passwd_labels", "bad_instances", "bad_warmup", "bad_batch"];
    let t0 = Instant::now();
    let index = loop {
        let r = http.post(format!("{base}/v2/repository/index")).body("{}").send().await;
        if let Ok(r) = r {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            let entries = v.as_array().cloned().unwrap_or_default();
            let failed = |n: &str| entries.iter().any(|e| e["name"] == n && e["state"] == "UNAVAILABLE");
            if wanted.iter().all(|n| failed(n)) {
                break entries;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "hostile files not all reported failed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let reason = |n: &str| {
        let e = index.iter().find(|e| e["name"] == n).unwrap();
        e["reason"].as_str().unwrap_or_default().to_string()
    };
    for (n, says) in [
        ("chain", "at most 1000"),
        ("nested", "at most 64"),
        ("zero_labels", "inside its folder"),
        ("passwd_labels", "inside its folder"),
        ("bad_instances", "at most"),
        ("bad_warmup", "between 1 and max_batch_size"),
        ("bad_batch", "over the limit of 4096"),
    ] {
        let r = reason(n);
        assert!(r.contains(says), "{n}: {r}");
    }

    // Ordinary photos of 40 sizes through OCR, twice: memory after the second round is
    // no higher than after the first (nothing per shape is kept for life).
    let sizes: Vec<(u16, u16)> = (0..40).map(|i| (320 + 61 * i, 1600 - 29 * i)).collect();
    let photos: Vec<Vec<u8>> = sizes.iter().map(|&(w, h)| photo_jpeg(w, h)).collect();
    let mut after = Vec::new();
    for round in 0..2 {
        for (p, (w, h)) in photos.iter().zip(&sizes) {
            let (s, b) = http_image(&http, &base, "ocr", p).await;
            assert_eq!(s, 200, "ocr {w}x{h}: {b}");
        }
        after.push(rss_of(&name));
        eprintln!("after OCR round {round}: RSS {} MiB", after[round] >> 20);
    }
    assert!(
        after[1] <= after[0] + (128 << 20),
        "RSS grew from {} to {} MiB between two identical rounds",
        after[0] >> 20,
        after[1] >> 20
    );

    // Reloading a model over and over (as a file watcher or an operator would) leaves no
    // memory behind: model control from inside the container, as a sidecar would.
    let before_reloads = rss_of(&name);
    for _ in 0..20 {
        docker(&["exec", &name, "sluice", "reload", "ocr_det"]);
    }
    let after_reloads = rss_of(&name);
    eprintln!("20 reloads of ocr_det: RSS {} -> {} MiB", before_reloads >> 20, after_reloads >> 20);
    assert!(after_reloads <= before_reloads + (100 << 20), "reloads left memory behind");

    stop.store(true, Ordering::Relaxed);
    canary_task.await.unwrap();
    let failed = tally.failed.lock().unwrap().clone();
    let peak = memory_of(&name, true);
    let final_rss = rss_of(&name);
    let state = docker(&["inspect", "-f", "{{.State.Running}} {{.State.OOMKilled}} {{.RestartCount}}", &name]);
    eprintln!(
        "canary: {} ok, {} shed, {} failed; cgroup memory peak {} MiB, now {} MiB (baseline {} MiB); RSS {} MiB \
         (baseline {} MiB); state {state}",
        tally.ok.load(Ordering::Relaxed),
        tally.shed.load(Ordering::Relaxed),
        failed.len(),
        peak >> 20,
        memory_of(&name, false) >> 20,
        baseline >> 20,
        final_rss >> 20,
        baseline_rss >> 20
    );
    assert_eq!(state, "true false 0", "the server was killed:\n{}", sluice_tests::docker::logs(&name, 40));
    assert!(failed.is_empty(), "canary failures: {failed:?}");
    assert!(tally.ok.load(Ordering::Relaxed) > 20);
    // The eight 200 MiB messages fill the large requests' share, never the reserve.
    let (ok, shed) = (tally.ok.load(Ordering::Relaxed), tally.shed.load(Ordering::Relaxed));
    assert_eq!(shed, 0, "the canary was shed {shed} times (served {ok}) while large bodies arrived");
    // Back near where it started: the models' arenas for the shapes last used, no more.
    assert!(
        final_rss < baseline_rss + (768 << 20),
        "RSS {} MiB after, {} MiB before",
        final_rss >> 20,
        baseline_rss >> 20
    );
    assert!(peak > baseline, "the cgroup's memory could not be read ({peak})");
    assert!(peak < MEMORY_CAP - (512 << 20), "peak {} MiB: too close to the cap", peak >> 20);
}
