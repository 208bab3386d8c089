//! The deployment as shipped: the container image (scripts/image.sh) started the way the
//! rendered Helm chart says (args, env, ports, probes, security context, volumes, grace
//! period), two replicas on a private Docker network, and a rolling restart of both
//! under load with a client that fails over: no request may be lost.
//!
//! Needs Docker. Set SLUICE_SKIP_DOCKER_TESTS=1 to skip where there is none.

use serde_yaml_ng::Value;
use sluice_client::{Client, InferOptions, Tensor};
use sluice_tests::docker::{build_image, docker, run, skip, IMAGE};
use sluice_tests::repo_root;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An HTTP probe as the kubelet runs it.
#[derive(Debug, Clone)]
struct Probe {
    path: String,
    port: u16,
    period: Duration,
    failure_threshold: u32,
}

/// What the rendered Deployment says about the sluice container.
#[derive(Debug)]
struct Spec {
    args: Vec<String>,
    env: Vec<(String, String)>,
    http_port: u16,
    grpc_port: u16,
    startup: Probe,
    readiness: Probe,
    liveness: Probe,
    grace: Duration,
    user: String,
    read_only_root: bool,
    drop_all: bool,
    no_new_privileges: bool,
    replicas: u64,
    /// Mount path of each volume by kind: "repository" (a claim), "configMap", "emptyDir".
    repository_mount: PathBuf,
    pipelines_mount: PathBuf,
    empty_dirs: Vec<PathBuf>,
    /// The pipelines ConfigMap's data: file name -> text.
    pipelines: BTreeMap<String, String>,
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn num(v: &Value, default: u64) -> u64 {
    v.as_u64().unwrap_or(default)
}

/// The objects of a rendered multi-document YAML file.
fn documents(rendered: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(rendered).unwrap();
    text.split("\n---")
        .map(|d| serde_yaml_ng::from_str::<Value>(d).unwrap_or_else(|e| panic!("{}: {e}", rendered.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// A container's ports by name.
fn ports_of(c: &Value) -> BTreeMap<String, u16> {
    c["ports"].as_sequence().unwrap().iter().map(|p| (s(&p["name"]), num(&p["containerPort"], 0) as u16)).collect()
}

impl Probe {
    /// The container's `key` probe (an httpGet), its port by number or by name.
    fn of(c: &Value, key: &str) -> Probe {
        let p = &c[key];
        let port = match &p["httpGet"]["port"] {
            Value::String(name) => ports_of(c)[name],
            v => num(v, 0) as u16,
        };
        Probe {
            path: s(&p["httpGet"]["path"]),
            port,
            period: Duration::from_secs(num(&p["periodSeconds"], 10)),
            failure_threshold: num(&p["failureThreshold"], 3) as u32,
        }
    }
}

fn read_spec(rendered: &Path) -> Spec {
    let docs = documents(rendered);
    let of_kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k} rendered"));
    let deployment = of_kind("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().unwrap();
    let c = containers.iter().find(|c| c["name"] == "sluice").expect("a container named sluice");
    let ports = ports_of(c);
    let sc = &c["securityContext"];
    let volumes: BTreeMap<String, &Value> =
        pod["volumes"].as_sequence().unwrap().iter().map(|v| (s(&v["name"]), v)).collect();
    let (mut repository_mount, mut pipelines_mount, mut empty_dirs) = (None, None, Vec::new());
    for m in c["volumeMounts"].as_sequence().unwrap() {
        let path = PathBuf::from(s(&m["mountPath"]));
        let v = volumes[&s(&m["name"])];
        if v.get("persistentVolumeClaim").is_some() {
            repository_mount = Some(path);
        } else if v.get("configMap").is_some() {
            pipelines_mount = Some(path);
        } else if v.get("emptyDir").is_some() {
            empty_dirs.push(path);
        }
    }
    let configmap = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("the pipelines ConfigMap");
    let pipelines = configmap["data"].as_mapping().expect("ConfigMap data").iter().map(|(k, v)| (s(k), s(v))).collect();
    Spec {
        args: c["args"].as_sequence().unwrap().iter().map(s).collect(),
        env: c["env"]
            .as_sequence()
            .map(|e| e.iter().filter(|e| e.get("value").is_some()).map(|e| (s(&e["name"]), s(&e["value"]))).collect())
            .unwrap_or_default(),
        http_port: ports["http"],
        grpc_port: ports["grpc"],
        startup: Probe::of(c, "startupProbe"),
        readiness: Probe::of(c, "readinessProbe"),
        liveness: Probe::of(c, "livenessProbe"),
        grace: Duration::from_secs(num(&pod["terminationGracePeriodSeconds"], 30)),
        user: format!("{}:{}", num(&sc["runAsUser"], 0), num(&sc["runAsGroup"], 0)),
        read_only_root: sc["readOnlyRootFilesystem"] == true,
        drop_all: sc["capabilities"]["drop"].as_sequence().is_some_and(|d| d.iter().any(|c| c == "ALL")),
        no_new_privileges: sc["allowPrivilegeEscalation"] == false,
        replicas: num(&deployment["spec"]["replicas"], 1),
        repository_mount: repository_mount.expect("the repository volume is mounted"),
        pipelines_mount: pipelines_mount.expect("the pipelines ConfigMap is mounted"),
        empty_dirs,
        pipelines,
    }
}

/// Lays out `data` as the kubelet lays out a ConfigMap volume (names as symlinks through
/// `..data` into a timestamped folder), readable by the container's user.
fn configmap_dir(root: &Path, data: &BTreeMap<String, String>) -> PathBuf {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let dir = root.join("pipelines");
    let folder = "..2026_12_05_00_00_00.000000000";
    std::fs::create_dir_all(dir.join(folder)).unwrap();
    for (name, text) in data {
        std::fs::write(dir.join(folder).join(name), text).unwrap();
        symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
    symlink(folder, dir.join("..data")).unwrap();
    for d in [root, &dir, &dir.join(folder)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// One replica: a container started as the Deployment's pod template says.
struct Replica {
    name: String,
    ip: String,
}

impl Replica {
    fn start(name: &str, network: &str, spec: &Spec, pipelines: &Path) -> Replica {
        let _ = Command::new("docker").args(["rm", "-f", name]).output();
        let models = repo_root().join("models");
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d", "--name", name, "--network", network, "--user", &spec.user]);
        if spec.read_only_root {
            cmd.arg("--read-only");
        }
        if spec.drop_all {
            cmd.args(["--cap-drop", "ALL"]);
        }
        if spec.no_new_privileges {
            cmd.args(["--security-opt", "no-new-privileges"]);
        }
        for d in &spec.empty_dirs {
            cmd.args(["--tmpfs", &format!("{}:uid=10001,gid=10001", d.display())]);
        }
        // The claim holds the example repository's models/.
        cmd.args(["-v", &format!("{}:{}/models:ro", models.display(), spec.repository_mount.display())]);
        cmd.args(["-v", &format!("{}:{}:ro", pipelines.display(), spec.pipelines_mount.display())]);
        for (k, v) in &spec.env {
            cmd.args(["-e", &format!("{k}={v}")]);
        }
        cmd.arg(IMAGE).args(&spec.args);
        run(&mut cmd);
        let mut r = Replica { name: name.to_string(), ip: String::new() };
        r.refresh_ip();
        r
    }

    fn refresh_ip(&mut self) {
        self.ip = sluice_tests::docker::ip(&self.name);
    }

    fn url(&self, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.ip)
    }

    async fn probe(&self, p: &Probe) -> bool {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
        matches!(http.get(self.url(p.port, &p.path)).send().await, Ok(r) if r.status().is_success())
    }

    /// Waits as the kubelet would: until the probe passes, failing after its threshold.
    async fn wait_for(&self, p: &Probe) -> Duration {
        let t0 = Instant::now();
        let limit = p.period * p.failure_threshold;
        while !self.probe(p).await {
            assert!(t0.elapsed() < limit, "{}: {} failed for {limit:?}\n{}", self.name, p.path, self.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        t0.elapsed()
    }

    fn logs(&self) -> String {
        sluice_tests::docker::logs(&self.name, 40)
    }
}

/// The Service's endpoints as the test's client sees them: the replicas a request may go to.
type Endpoints = Arc<Mutex<Vec<String>>>;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    retried: AtomicU64,
    failed: Mutex<Vec<String>>,
}

/// A client that sends to the endpoints round robin and, when a replica fails it, retries
/// once on a fresh connection to another one (inference is idempotent).
async fn client_loop(endpoints: Endpoints, grpc_port: u16, stop: Arc<AtomicBool>, tally: Arc<Tally>, seed: usize) {
    let x = Tensor::from_f32(vec![1, 3, 48, 192], &vec![0.5; 3 * 48 * 192]);
    let mut conns: BTreeMap<String, Client> = BTreeMap::new();
    let mut turn = seed;
    while !stop.load(Ordering::Relaxed) {
        let eps = endpoints.lock().unwrap().clone();
        turn += 1;
        let mut last_err = String::new();
        let mut done = false;
        for attempt in 0..2 {
            let ip = &eps[(turn + attempt) % eps.len()];
            if attempt > 0 {
                // A fresh connection: the old one may be to a replica going away.
                conns.remove(ip);
                tally.retried.fetch_add(1, Ordering::Relaxed);
            }
            let client = match conns.get(ip) {
                Some(c) => c.clone(),
                None => match Client::connect(format!("http://{ip}:{grpc_port}")).await {
                    Ok(c) => conns.entry(ip.clone()).or_insert(c).clone(),
                    Err(e) => {
                        last_err = format!("{ip}: connect: {e}");
                        continue;
                    }
                },
            };
            match client.infer("ocr_cls", &[("x", &x)], InferOptions::default()).await {
                Ok(_) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    done = true;
                    break;
                }
                Err(e) => {
                    conns.remove(ip);
                    last_err = format!("{ip}: {e}");
                }
            }
        }
        if !done {
            tally.failed.lock().unwrap().push(last_err);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rendered_chart_runs_the_image_and_a_rolling_restart_loses_no_request() {
    if skip() {
        eprintln!("SLUICE_SKIP_DOCKER_TESTS=1: skipped");
        return;
    }
    let root = repo_root();
    build_image();
    // The manifests, rendered with real Helm and validated against Kubernetes' and
    // KServe's schemas (the script fails on any invalid object).
    let out = tempfile::tempdir().unwrap();
    let rendered = run(Command::new(root.join(".venv-deploy/bin/python"))
        .arg(root.join("scripts/render_manifests.py"))
        .arg("--out")
        .arg(out.path()));
    assert!(rendered.contains("all checks passed"), "{rendered}");
    let spec = read_spec(&out.path().join("examples.yaml"));
    assert_eq!(spec.replicas, 2, "the examples set runs two replicas");
    let drain = spec.args.iter().find_map(|a| a.strip_prefix("--drain-delay-s=")).expect("a drain delay");
    let drain = Duration::from_secs(drain.parse().unwrap());
    assert!(drain > Duration::ZERO && drain < spec.grace);

    let files = tempfile::tempdir().unwrap();
    let pipelines = configmap_dir(files.path(), &spec.pipelines);
    let network = format!("sluice-deploy-{}", std::process::id());
    let _ = Command::new("docker").args(["network", "rm", &network]).output();
    docker(&["network", "create", "--internal", &network]);
    let names = [format!("{network}-a"), format!("{network}-b")];
    let cleanup = Cleanup { containers: names.to_vec(), network: network.clone() };

    let t0 = Instant::now();
    let mut replicas: Vec<Replica> = names.iter().map(|n| Replica::start(n, &network, &spec, &pipelines)).collect();
    for r in &replicas {
        r.wait_for(&spec.startup).await;
        r.wait_for(&spec.readiness).await;
        assert!(r.probe(&spec.liveness).await);
    }
    let start_to_ready = t0.elapsed();
    eprintln!("two replicas from docker run to ready: {start_to_ready:?}");
    let top = docker(&["top", &replicas[0].name, "-eo", "pid,uid,gid,args"]);
    let ids: Vec<(&str, &str)> = top
        .lines()
        .skip(1)
        .filter_map(|l| Some((l.split_whitespace().nth(1)?, l.split_whitespace().nth(2)?)))
        .collect();
    assert!(!ids.is_empty() && ids.iter().all(|&id| id == ("10001", "10001")), "runs as 10001:10001:\n{top}");

    // Triton's own client through the container, checked against ONNX Runtime here.
    let check = run(Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/python/tritonclient_container_check.py"))
        .arg(format!("{}:{}", replicas[0].ip, spec.grpc_port))
        .arg(format!("{}:{}", replicas[0].ip, spec.http_port))
        .arg(root.join("models/ocr_cls/model.onnx")));
    assert!(check.trim_end().ends_with("ok"), "{check}");

    kserve_runtime_serves_under_the_inference_service_name(&out.path().join("kserve.yaml"), &network).await;

    // Load through a "Service" of both replicas, then a rolling restart.
    let endpoints: Endpoints = Arc::new(Mutex::new(replicas.iter().map(|r| r.ip.clone()).collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let loops: Vec<_> = (0..4)
        .map(|i| tokio::spawn(client_loop(endpoints.clone(), spec.grpc_port, stop.clone(), tally.clone(), i)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in replicas.iter_mut() {
        let before = tally.ok.load(Ordering::Relaxed);
        // `docker stop` sends SIGTERM, as the kubelet does when the pod is deleted, and
        // kills after the grace period. The endpoints drop the pod a while later.
        let name = r.name.clone();
        let grace = spec.grace.as_secs().to_string();
        let stopping = std::thread::spawn(move || {
            let t = Instant::now();
            docker(&["stop", "-t", &grace, &name]);
            t.elapsed()
        });
        let told = Instant::now();
        while r.probe(&spec.readiness).await {
            assert!(told.elapsed() < Duration::from_secs(5), "{}: still ready 5 s after docker stop", r.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(r.probe(&spec.liveness).await, "{}: alive while draining", r.name);
        // Requests still on their way (balancers that have not noticed yet) are served,
        // on new connections too.
        let late =
            Client::connect(format!("http://{}:{}", r.ip, spec.grpc_port)).await.expect("accepting while draining");
        let x = Tensor::from_f32(vec![1, 3, 48, 192], &vec![0.5; 3 * 48 * 192]);
        late.infer("ocr_cls", &[("x", &x)], InferOptions::default()).await.expect("served while draining");
        // Endpoints, kube-proxy and DNS take seconds to notice: requests keep coming.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ip = r.ip.clone();
        endpoints.lock().unwrap().retain(|e| *e != ip);
        let stopped_in = tokio::task::spawn_blocking(move || stopping.join().unwrap()).await.unwrap();
        let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &r.name]);
        eprintln!("{}: stopped in {stopped_in:?} (drain delay {drain:?}), exit code {code}", r.name);
        let logs = r.logs();
        eprintln!(
            "{}",
            logs.lines().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        assert!(stopped_in >= drain, "served on for the drain delay");
        assert!(stopped_in < spec.grace, "stopped within the grace period: {stopped_in:?}");
        assert_eq!(code, "0", "a clean exit:\n{}", r.logs());
        // The replacement comes up and joins the endpoints once ready.
        let restarted = Instant::now();
        docker(&["start", &r.name]);
        r.refresh_ip();
        r.wait_for(&spec.startup).await;
        r.wait_for(&spec.readiness).await;
        eprintln!("{}: docker start to ready under load: {:?}", r.name, restarted.elapsed());
        endpoints.lock().unwrap().push(r.ip.clone());
        assert!(tally.ok.load(Ordering::Relaxed) > before, "requests were answered while {} restarted", r.name);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let failed = tally.failed.lock().unwrap().clone();
    eprintln!(
        "rolling restart of {} replicas under load: {} requests answered, {} retried on the other replica, {} lost",
        replicas.len(),
        tally.ok.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(failed.is_empty(), "lost requests: {failed:?}");
    // The endpoints dropped each replica well within its drain delay, so no request even
    // needed the retry: without the drain, those in flight at SIGTERM would have.
    assert_eq!(tally.retried.load(Ordering::Relaxed), 0, "requests failed over during the drain");
    drop(cleanup);
}

/// The ClusterServingRuntime's container with the InferenceService's args appended (as
/// KServe does), the repository at /mnt/models: probes pass, and the pipeline answers
/// under the InferenceService's name.
async fn kserve_runtime_serves_under_the_inference_service_name(rendered: &Path, network: &str) {
    let docs = documents(rendered);
    let runtime = docs.iter().find(|d| d["kind"] == "ClusterServingRuntime").expect("the runtime");
    let isvc = docs.iter().find(|d| d["kind"] == "InferenceService").expect("the InferenceService");
    let c = &runtime["spec"]["containers"][0];
    assert_eq!(c["name"], "kserve-container");
    let mut args: Vec<String> = c["args"].as_sequence().unwrap().iter().map(s).collect();
    args.extend(isvc["spec"]["predictor"]["model"]["args"].as_sequence().unwrap().iter().map(s));
    let isvc_name = s(&isvc["metadata"]["name"]);
    let name = format!("{network}-kserve");
    let root = repo_root();
    let mut cmd = Command::new("docker");
    cmd.args(["run", "-d", "--name", &name, "--network", network, "--user", "10001:10001", "--read-only"]);
    cmd.args(["--tmpfs", "/tmp:uid=10001,gid=10001"]);
    for dir in ["models", "pipelines"] {
        cmd.args(["-v", &format!("{}:/mnt/models/{dir}:ro", root.join(dir).display())]);
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        cmd.args(["-e", &format!("{}={}", s(&e["name"]), s(&e["value"]))]);
    }
    cmd.arg(IMAGE).args(&args);
    run(&mut cmd);
    let _gone = Cleanup { containers: vec![name.clone()], network: String::new() };
    let mut r = Replica { name, ip: String::new() };
    r.refresh_ip();
    r.wait_for(&Probe::of(c, "startupProbe")).await;
    r.wait_for(&Probe::of(c, "readinessProbe")).await;
    let port = num(&c["ports"][0]["containerPort"], 0) as u16;
    let md: serde_json::Value =
        reqwest::get(r.url(port, &format!("/v2/models/{isvc_name}"))).await.unwrap().json().await.unwrap();
    assert_eq!(md["name"], "classify", "{isvc_name} answers as the pipeline it names: {md}");
    let ready = reqwest::get(r.url(port, &format!("/v2/models/{isvc_name}/ready"))).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}

/// Removes the test's containers and network, also when the test fails.
struct Cleanup {
    containers: Vec<String>,
    network: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        if !self.network.is_empty() {
            let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
        }
    }
}
