//! The CPU tier and the model tier on separate hosts: containers of the image on a
//! private Docker network. A CPU-tier sluice serves `detect_crop_classify` with the
//! detector and the classifier as remote models found by a DNS name (a network alias all
//! model-tier containers share, as a Kubernetes headless Service). Under load from
//! outside: its answers equal the all-local pipeline's; a model-tier replica killed
//! costs no request and latency recovers; a replica added to the name gets traffic
//! within the re-resolution interval; one cut off the network is ejected within the
//! health interval while traffic goes on; a rolling restart of the tier (with its drain)
//! costs no request.
//!
//! Needs Docker. Set SLUICE_SKIP_DOCKER_TESTS=1 to skip where there is none.

use sluice_client::{Client, InferOptions, Tensor};
use sluice_tests::docker::{build_image, docker, ip, logs, skip, IMAGE};
use sluice_tests::{cells_png, example_pipeline, series_value, start, tiny_classifier, tiny_detector, Repo};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ALIAS: &str = "modeltier";
const CLASSIFIER_YAML: &str = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 2000\n";
const DETECTOR_YAML: &str = "max_batch_size: 4\ndynamic_batching:\n  max_queue_delay_us: 2000\n";

/// The CPU tier's model.yaml for `model`, as the chart's two-tier values ship it
/// (deploy/helm/two-tiers/cpu-tier.yaml, rendered as `backend: remote` plus the entry),
/// with the model tier at this network's alias and intervals short enough for a test.
fn remote_yaml(model: &str) -> String {
    use serde_yaml_ng::Value;
    let path = sluice_tests::repo_root().join("deploy/helm/two-tiers/cpu-tier.yaml");
    let values: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut entry = values["remoteModels"][model].clone();
    let remote =
        entry["remote"].as_mapping_mut().unwrap_or_else(|| panic!("{}: no remote for {model}", path.display()));
    for (k, v) in [
        ("dns", Value::from(format!("{ALIAS}:8001"))),
        ("resolve_interval_ms", 500.into()),
        ("health_interval_ms", 200.into()),
        ("timeout_ms", 2000.into()),
    ] {
        remote.insert(k.into(), v);
    }
    entry.as_mapping_mut().unwrap().insert("backend".into(), "remote".into());
    serde_yaml_ng::to_string(&entry).unwrap()
}

/// Makes `dir` and everything in it readable by the containers' user.
fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
    }
}

fn model_repo() -> Repo {
    let repo = Repo::new();
    repo.add("resnet50", &tiny_classifier(), CLASSIFIER_YAML);
    repo.add("detector", &tiny_detector(), DETECTOR_YAML);
    repo
}

struct Net {
    name: String,
    containers: Mutex<Vec<String>>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in self.containers.lock().unwrap().iter() {
            let _ = std::process::Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = std::process::Command::new("docker").args(["network", "rm", &self.name]).output();
    }
}

impl Net {
    /// Starts a container of the image serving `models` (and `pipelines`), on the network
    /// under `alias` when given; returns its address.
    fn run(&self, name: &str, alias: Option<&str>, models: &Path, pipelines: &Path, extra: &[&str]) -> String {
        let _ = std::process::Command::new("docker").args(["rm", "-f", name]).output();
        let mut args = vec!["run", "-d", "--name", name, "--network", &self.name];
        if let Some(a) = alias {
            args.extend(["--network-alias", a]);
        }
        let (m, p) = (
            format!("{}:/srv/sluice/models:ro", models.display()),
            format!("{}:/srv/sluice/pipelines:ro", pipelines.display()),
        );
        args.extend(["-v", &m, "-v", &p, IMAGE]);
        args.extend(extra);
        docker(&args);
        self.containers.lock().unwrap().push(name.to_string());
        ip(name)
    }
}

async fn wait_ready(addr: &str, name: &str) {
    let t0 = Instant::now();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    loop {
        if let Ok(r) = http.get(format!("http://{addr}:8000/v2/health/ready")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{name} not ready:\n{}", logs(name, 40));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cells(cells: &[(u32, u32, [u8; 3])]) -> Tensor {
    sluice_client::encoded_images(&[cells_png(cells)])
}

/// Requests' (finish time, latency), and failures, from clients running until stopped.
#[derive(Default)]
struct Load {
    done: Mutex<Vec<(Instant, Duration)>>,
    failed: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Load {
    fn start(self: &Arc<Self>, client: &Client, input: &Tensor, clients: usize) -> Vec<tokio::task::JoinHandle<()>> {
        (0..clients)
            .map(|_| {
                let (load, client, input) = (self.clone(), client.clone(), input.clone());
                tokio::spawn(async move {
                    while !load.stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match client.infer("detect_crop_classify", &[("image", &input)], InferOptions::default()).await
                        {
                            Ok(_) => load.done.lock().unwrap().push((Instant::now(), t.elapsed())),
                            Err(e) => load.failed.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect()
    }

    fn failures(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }

    /// p99 latency of the requests that finished in [from, to).
    fn p99(&self, from: Instant, to: Instant) -> Option<Duration> {
        let mut l: Vec<Duration> =
            self.done.lock().unwrap().iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, l)| *l).collect();
        l.sort();
        (!l.is_empty()).then(|| l[(l.len() * 99 / 100).min(l.len() - 1)])
    }

    fn count_since(&self, from: Instant) -> usize {
        self.done.lock().unwrap().iter().filter(|(t, _)| *t >= from).count()
    }
}

/// A series' value, 0 while it does not exist yet.
async fn metric(http: &str, series: &str, labels: &[&str]) -> f64 {
    let Ok(r) = reqwest::get(format!("{http}/metrics")).await else { return 0.0 };
    series_value(&r.text().await.unwrap_or_default(), series, labels).unwrap_or(0.0)
}

/// Polls `f` until it holds or `limit` passes; how long it took.
async fn within<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> Duration {
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_model_tier_on_other_hosts_fails_over_scales_and_restarts_without_losing_a_request() {
    if skip() {
        eprintln!("SLUICE_SKIP_DOCKER_TESTS=1: skipped");
        return;
    }
    build_image();
    let models = model_repo();
    let cpu_models = Repo::new();
    for m in ["detector", "resnet50"] {
        let d = cpu_models.path().join(m);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("model.yaml"), remote_yaml(m)).unwrap();
    }
    cpu_models.pipeline("detect_crop_classify", &example_pipeline("detect_crop_classify"));
    let empty = tempfile::tempdir().unwrap();
    for d in [models.path(), cpu_models.path(), cpu_models.pipelines_path(), empty.path()] {
        open_up(d);
    }

    let net = Net { name: format!("sluice-tiers-{}", std::process::id()), containers: Mutex::new(vec![]) };
    let _ = std::process::Command::new("docker").args(["network", "rm", &net.name]).output();
    docker(&["network", "create", "--internal", &net.name]);
    let tier = |n: &str| format!("{}-{n}", net.name);
    // The model tier drains for 1 s on SIGTERM: not ready at once (the CPU tier's checks
    // eject it), serving on while calls in flight finish.
    let drain = ["--drain-delay-s=1"];
    let a = net.run(&tier("a"), Some(ALIAS), models.path(), empty.path(), &drain);
    let b = net.run(&tier("b"), Some(ALIAS), models.path(), empty.path(), &drain);
    wait_ready(&a, &tier("a")).await;
    wait_ready(&b, &tier("b")).await;
    let cpu = net.run(&tier("cpu"), None, cpu_models.path(), cpu_models.pipelines_path(), &[]);
    wait_ready(&cpu, &tier("cpu")).await;
    let client = Client::connect(format!("http://{cpu}:8001")).await.unwrap();
    let http = format!("http://{cpu}:8000");

    // Answers equal the all-local pipeline's.
    let local_repo = model_repo();
    local_repo.pipeline("detect_crop_classify", &example_pipeline("detect_crop_classify"));
    let local = start(local_repo.config()).await;
    let inputs =
        [cells(&[(0, 0, [255, 0, 0]), (5, 1, [255, 0, 90]), (2, 7, [255, 0, 180])]), cells(&[(1, 1, [255, 0, 30])])];
    for input in &inputs {
        let infer = |c: &Client| {
            let c = c.clone();
            let input = input.clone();
            async move {
                let out = c.infer("detect_crop_classify", &[("image", &input)], InferOptions::default()).await.unwrap();
                out.into_iter().collect::<HashMap<String, Tensor>>()
            }
        };
        let (got, want) = (infer(&client).await, infer(&local.client).await);
        assert_eq!(got, want, "the split tiers answer as one host does");
    }

    let load = Arc::new(Load::default());
    let workers = load.start(&client, &inputs[0], 4);
    let ep = |addr: &str| format!("endpoint=\"{addr}:8001\"");
    let classifier = "model=\"resnet50\"";
    let calls_to = |addr: String| {
        let http = http.clone();
        async move { metric(&http, "sluice_remote_requests_total", &[classifier, &ep(&addr)]).await }
    };

    // 1. Kill A under load: no request fails; p99 is back to normal within seconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    let normal = load.p99(killed - Duration::from_secs(1), killed).expect("requests before the kill");
    docker(&["kill", &tier("a")]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let recovered = load.p99(killed + Duration::from_secs(3), killed + Duration::from_secs(4)).expect("requests after");
    eprintln!("p99 before the kill {normal:?}, 3-4 s after {recovered:?}");
    assert!(recovered <= normal * 5 + Duration::from_millis(100), "p99 {recovered:?} vs {normal:?} before");
    assert_eq!(load.failures(), Vec::<String>::new(), "killing a replica fails no request");

    // 2. A third replica joins the name: it gets calls within the re-resolution interval.
    let c = net.run(&tier("c"), Some(ALIAS), models.path(), empty.path(), &drain);
    wait_ready(&c, &tier("c")).await;
    let took = within(Duration::from_secs(5), "the new replica gets calls", || {
        let f = calls_to(c.clone());
        async move { f.await > 0.0 }
    })
    .await;
    eprintln!("a new replica got calls {took:?} after it was ready");

    // 3. B cut off the network: ejected within the health interval; traffic goes on.
    let since = Instant::now();
    docker(&["network", "disconnect", &net.name, &tier("b")]);
    // Out of the rotation: ejected by its failing checks, or gone from the name first.
    let took = within(Duration::from_secs(3), "the cut-off replica is ejected", || {
        let http = http.clone();
        let b = format!("{b}:8001");
        async move {
            let Ok(r) = reqwest::get(format!("{http}/dashboard/data")).await else { return false };
            let frame: serde_json::Value = r.json().await.unwrap_or_default();
            let Some(m) = frame["models"].as_array().and_then(|ms| ms.iter().find(|m| m["name"] == "resnet50")) else {
                return false;
            };
            let eps = m["endpoints"].as_array().cloned().unwrap_or_default();
            eps.iter().all(|e| e["addr"] != b.as_str() || e["ejected"] == true)
        }
    })
    .await;
    eprintln!("ejected {took:?} after the disconnect");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(load.count_since(since + Duration::from_secs(2)) > 10, "traffic goes on");
    assert_eq!(load.failures(), Vec::<String>::new(), "a cut-off replica fails no request");
    // Gone from the name, it leaves no series behind (pod addresses come and go). (A's
    // address is no test of this: Docker gives it to C.)
    within(Duration::from_secs(5), "the cut-off replica's series are dropped", || {
        let (http, b) = (http.clone(), ep(&b));
        async move {
            let Ok(r) = reqwest::get(format!("{http}/metrics")).await else { return false };
            let text = r.text().await.unwrap_or_default();
            text.contains("sluice_remote_requests_total")
                && !text.lines().any(|l| l.starts_with("sluice_remote_") && l.contains(&b))
        }
    })
    .await;
    docker(&["network", "connect", "--alias", ALIAS, &net.name, &tier("b")]);

    // 4. Rolling restart of the tier (B and C), each drained by its SIGTERM.
    for r in [tier("b"), tier("c")] {
        docker(&["stop", "-t", "10", &r]);
        docker(&["start", &r]);
        let addr = ip(&r);
        wait_ready(&addr, &r).await;
        let before = calls_to(addr.clone()).await;
        within(Duration::from_secs(5), "the restarted replica gets calls again", || {
            let f = calls_to(addr.clone());
            async move { f.await > before }
        })
        .await;
    }
    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(load.failures(), Vec::<String>::new(), "a rolling restart fails no request");
    eprintln!("{} requests through the split tiers", load.done.lock().unwrap().len());
}
