//! Hot reload end to end: files change under a running server while clients send
//! requests; nothing fails, responses switch to the new behaviour, broken files are
//! reported while the previous version keeps answering.

use sluice_client::{Client, ClientError, InferOptions, Tensor};
use sluice_server::ReloadMode;
use sluice_tests::{linear_model, metric, start, Repo};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const X: [f32; 4] = [1.0, 2.0, -3.0, 0.5];

/// A pipeline over the `affine` model that returns the model output `out` (y or neg).
fn pipeline(out: &str) -> String {
    format!(
        "max_batch_size: 0\ninputs:\n  - {{name: x, dtype: FP32, dims: [4]}}\noutputs:\n  - {{name: y, from: m.{out}}}\nnodes:\n  - name: m\n    model: affine\n    inputs: {{x: x}}\n"
    )
}

/// Like [`pipeline`] with a model version pinned and a delay before the model.
fn pipeline_with(out: &str, version: Option<u64>, delay_ms: u64) -> String {
    let pin = version.map(|v| format!("    version: {v}\n")).unwrap_or_default();
    format!(
        "max_batch_size: 0\ninputs:\n  - {{name: x, dtype: FP32, dims: [4]}}\noutputs:\n  - {{name: y, from: m.{out}}}\nnodes:\n  - name: wait\n    op: delay\n    inputs: {{value: x}}\n    params: {{ms: {delay_ms}}}\n  - name: m\n    model: affine\n{pin}    inputs: {{x: wait.value}}\n"
    )
}

const MODEL_YAML: &str = "max_batch_size: 8\n";

fn linear(a: f32, b: f32) -> Vec<f32> {
    X.iter().map(|x| a * x + b).collect()
}

/// Calls a model (input [1,4]) or a pipeline (input [4]) and returns its first output.
async fn call(client: &Client, name: &str, version: &str, batched: bool) -> Result<Vec<f32>, ClientError> {
    let shape = if batched { vec![1, 4] } else { vec![4] };
    let x = Tensor::from_f32(shape, &X);
    let opts = InferOptions { version: version.into(), ..Default::default() };
    let out = client.infer(name, &[("x", &x)], opts).await?;
    Ok(out[0].1.to_f32().expect("FP32 output"))
}

/// Writes a file the way deploy tools do: a temporary file renamed over the old one.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Polls `check` until it is true (or fails the test after 20 s).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(std::time::Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reason_of(client: &Client, name: &str) -> String {
    let index = client.repository_index().await.expect("index");
    index.iter().filter(|m| m.name == name).map(|m| m.reason.clone()).collect::<Vec<_>>().join("; ")
}

async fn load_count(http: &str, model: &str, version: &str) -> f64 {
    metric(
        http,
        "sluice_model_loads_total",
        &[&format!("model=\"{model}\""), &format!("version=\"{version}\""), "outcome=\"ok\""],
    )
    .await
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    not_found: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_change_under_load_and_no_request_fails() {
    let repo = Repo::new();
    repo.add("affine", &linear_model(4, 2.0, 1.0), MODEL_YAML);
    repo.pipeline("calc", &pipeline("y"));
    repo.pipeline("gone", &pipeline("y"));
    let mut cfg = repo.config();
    cfg.reload = ReloadMode::Watch;
    let s = start(cfg).await;
    let (old_y, new_y, neg) = (linear(2.0, 1.0), linear(3.0, 0.0), linear(-1.0, 0.0));

    // Clients in a loop: every answer must be one of the behaviours the files ever had;
    // `gone` may answer NOT_FOUND once its file is removed, nothing else may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let gone_removed = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|i| {
            let (client, stop, tally, gone_removed) =
                (s.client.clone(), stop.clone(), tally.clone(), gone_removed.clone());
            let allowed = [old_y.clone(), new_y.clone(), neg.clone()];
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (name, batched) = [("affine", true), ("calc", false), ("gone", false)][i % 3];
                    let removed_before = gone_removed.load(Ordering::Acquire);
                    match call(&client, name, "", batched).await {
                        Ok(y) if allowed.contains(&y) => tally.ok.fetch_add(1, Ordering::Relaxed),
                        Ok(y) => {
                            tally.failures.lock().unwrap().push(format!("{name}: unexpected output {y:?}"));
                            0
                        }
                        Err(e) if name == "gone" && e.code() == Some(Code::NotFound) => {
                            // Only after the file went away.
                            if !removed_before && !gone_removed.load(Ordering::Acquire) {
                                tally.failures.lock().unwrap().push(format!("gone: NOT_FOUND before removal: {e}"));
                            }
                            tally.not_found.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            tally.failures.lock().unwrap().push(format!("{name}: {e}"));
                            0
                        }
                    };
                }
            })
        })
        .collect();
    let c = &s.client;
    assert_eq!(call(c, "calc", "", false).await.unwrap(), old_y);
    assert_eq!(load_count(&s.http, "affine", "1").await, 1.0);

    // A new model file: the model and the pipeline over it switch.
    let models = repo.path().to_path_buf();
    replace(&models.join("affine/model.onnx"), &linear_model(4, 3.0, 0.0));
    eventually("the new model answers", || async { call(c, "affine", "", true).await.ok() == Some(new_y.clone()) })
        .await;
    eventually("the pipeline runs the new model", || async {
        call(c, "calc", "", false).await.ok() == Some(new_y.clone())
    })
    .await;
    assert_eq!(load_count(&s.http, "affine", "1").await, 2.0);

    // A rewritten pipeline: it switches, and its model is not loaded again.
    replace(&repo.pipelines_path().join("calc.yaml"), pipeline("neg").as_bytes());
    eventually("the rewritten pipeline answers", || async {
        call(c, "calc", "", false).await.ok() == Some(neg.clone())
    })
    .await;
    assert_eq!(load_count(&s.http, "affine", "1").await, 2.0, "an unchanged model was loaded again");

    // A new pipeline appears; a removed one answers NOT_FOUND.
    replace(&repo.pipelines_path().join("added.yaml"), pipeline("y").as_bytes());
    eventually("the added pipeline answers", || async {
        call(c, "added", "", false).await.ok() == Some(new_y.clone())
    })
    .await;
    gone_removed.store(true, Ordering::Release);
    std::fs::remove_file(repo.pipelines_path().join("gone.yaml")).unwrap();
    eventually("the removed pipeline is gone", || async {
        matches!(call(c, "gone", "", false).await, Err(e) if e.code() == Some(Code::NotFound))
    })
    .await;

    // Broken files: reported, and what was serving keeps answering.
    std::fs::write(repo.pipelines_path().join("calc.yaml"), "nodes: [unclosed\n").unwrap();
    std::fs::write(models.join("affine/model.onnx"), b"not an onnx file").unwrap();
    eventually("the broken pipeline is reported", || async { reason_of(c, "calc").await.contains("calc.yaml:") }).await;
    eventually("the broken model is reported", || async { reason_of(c, "affine").await.contains("model.onnx") }).await;
    assert_eq!(call(c, "calc", "", false).await.unwrap(), neg);
    assert_eq!(call(c, "affine", "", true).await.unwrap(), new_y);
    assert!(c.server_ready().await.unwrap(), "the previous versions still serve");
    let failed = metric(&s.http, "sluice_reloads_total", &["outcome=\"error\""]).await;
    assert!(failed >= 1.0, "failed reloads are counted: {failed}");

    // Fixing the files makes them load.
    replace(&models.join("affine/model.onnx"), &linear_model(4, 2.0, 1.0));
    replace(&repo.pipelines_path().join("calc.yaml"), pipeline("y").as_bytes());
    eventually("the fixed files load", || async {
        call(c, "calc", "", false).await.ok() == Some(old_y.clone()) && reason_of(c, "calc").await.is_empty()
    })
    .await;
    assert!(reason_of(c, "affine").await.is_empty());

    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let failures = tally.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} failed requests: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let ok = tally.ok.load(Ordering::Relaxed);
    assert!(ok > 100 && tally.not_found.load(Ordering::Relaxed) > 0, "ok {ok}");
    // Every replaced model and pipeline is dropped once no request holds it.
    let engine = s.server.engine.clone();
    eventually("replaced models are dropped", || {
        let engine = engine.clone();
        async move { engine.retired() == 0 }
    })
    .await;
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_reloads_keep_unchanged_models_and_finish_running_requests_on_the_old_snapshot() {
    let repo = Repo::new();
    repo.add("affine", &linear_model(4, 2.0, 1.0), MODEL_YAML);
    repo.pipeline("slow", &pipeline_with("y", None, 1500));
    let s = start(repo.config()).await;
    let c = &s.client;

    // Explicit mode watches nothing: a changed file is not picked up on its own.
    let slow_started = std::time::Instant::now();
    let running = {
        let c = c.clone();
        tokio::spawn(async move { call(&c, "slow", "", false).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(repo.pipelines_path().join("slow.yaml"), pipeline_with("neg", None, 0)).unwrap();
    // Longer than the debounce: a watching server would have reloaded by now.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let slow_loads = || metric(&s.http, "sluice_pipeline_loads_total", &["pipeline=\"slow\"", "outcome=\"ok\""]);
    assert_eq!(slow_loads().await, 1.0, "explicit mode picked up a file change on its own");
    c.repository_load("").await.expect("reload");
    // New requests see the new pipeline; the one already running finishes on the old.
    assert_eq!(call(c, "slow", "", false).await.unwrap(), linear(-1.0, 0.0));
    assert!(slow_started.elapsed() < Duration::from_millis(1500), "the swap did not wait for running requests");
    assert_eq!(running.await.unwrap().unwrap(), linear(2.0, 1.0));
    assert_eq!(load_count(&s.http, "affine", "1").await, 1.0, "an unchanged model was loaded again");
    assert_eq!(slow_loads().await, 2.0);

    // Loading a model by name loads it again even unchanged, and its pipelines with it;
    // the replaced model is dropped once nothing holds it.
    c.repository_load("affine").await.expect("load affine");
    assert_eq!(load_count(&s.http, "affine", "1").await, 2.0);
    assert_eq!(slow_loads().await, 3.0);
    let engine = s.server.engine.clone();
    eventually("the replaced model and pipelines are dropped", || {
        let engine = engine.clone();
        async move { engine.retired() == 0 }
    })
    .await;

    // A pipeline that cannot compile for want of a model comes back when the model loads.
    repo.pipeline("later", &pipeline("y").replace("model: affine", "model: later_model"));
    c.repository_load("later").await.unwrap_err();
    repo.add("later_model", &linear_model(4, 5.0, 0.0), MODEL_YAML);
    c.repository_load("later_model").await.expect("load the model");
    assert_eq!(call(c, "later", "", false).await.unwrap(), linear(5.0, 0.0));

    // A forced load of a model whose model.yaml is broken says so every time.
    std::fs::write(repo.path().join("later_model/model.yaml"), "max_batch: 8\n").unwrap();
    for _ in 0..2 {
        let err = c.repository_load("later_model").await.unwrap_err();
        assert!(err.to_string().contains("unknown field `max_batch`"), "{err}");
    }
    assert_eq!(call(c, "later_model", "", true).await.unwrap(), linear(5.0, 0.0), "the loaded version serves on");

    // A load whose files fail says why, over gRPC and HTTP; the old version serves on.
    std::fs::write(repo.path().join("affine/model.onnx"), b"garbage").unwrap();
    let err = c.repository_load("affine").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("model.onnx"), "{err}");
    let http = reqwest::Client::new();
    let r = http.post(format!("{}/v2/repository/models/affine/load", s.http)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("model.onnx"));
    assert_eq!(call(c, "affine", "", true).await.unwrap(), linear(2.0, 1.0));

    // Unknown names, and unloading a model that a pipeline still uses.
    assert_eq!(c.repository_load("nope").await.unwrap_err().code(), Some(Code::NotFound));
    let err = c.repository_unload("affine").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("used by pipelines slow"), "{err}");

    // Unload over HTTP, then gRPC; both names then answer NOT_FOUND and show as unloaded.
    let r = http.post(format!("{}/v2/repository/models/slow/unload", s.http)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.repository_unload("affine").await.expect("unload affine");
    for (name, batched) in [("slow", false), ("affine", true)] {
        let err = call(c, name, "", batched).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound), "{err}");
        assert_eq!(reason_of(c, name).await, "unloaded");
    }
    // A full reload does not bring unloaded names back; loading them does.
    c.repository_load("").await.expect("reload");
    assert_eq!(call(c, "slow", "", false).await.unwrap_err().code(), Some(Code::NotFound));
    replace(&repo.path().join("affine/model.onnx"), &linear_model(4, 3.0, 0.0));
    c.repository_load("affine").await.expect("load affine");
    c.repository_load("slow").await.expect("load slow");
    assert_eq!(call(c, "slow", "", false).await.unwrap(), linear(-1.0, 0.0));
    assert_eq!(call(c, "affine", "", true).await.unwrap(), linear(3.0, 0.0));
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_model_control_load_and_unload_are_refused() {
    let repo = Repo::new();
    repo.add("affine", &linear_model(4, 2.0, 1.0), MODEL_YAML);
    let mut cfg = repo.config();
    cfg.reload = ReloadMode::None;
    let s = start(cfg).await;
    let err = s.client.repository_load("affine").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(err.to_string().contains("--reload none"), "{err}");
    assert_eq!(s.client.repository_unload("affine").await.unwrap_err().code(), Some(Code::PermissionDenied));
    assert_eq!(call(&s.client, "affine", "", true).await.unwrap(), linear(2.0, 1.0));
    s.server.shutdown().await;
}

/// Writes `models/affine/<v>/model.onnx` computing `y = a x + b`.
fn add_version(repo: &Repo, v: u64, a: f32, b: f32) {
    let dir = repo.path().join("affine").join(v.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    replace(&dir.join("model.onnx"), &linear_model(4, a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_versions_follow_the_policy_and_pipelines_may_pin_one() {
    let repo = Repo::new();
    std::fs::create_dir_all(repo.path().join("affine")).unwrap();
    std::fs::write(repo.path().join("affine/model.yaml"), format!("{MODEL_YAML}version_policy: {{latest: 2}}\n"))
        .unwrap();
    add_version(&repo, 1, 1.0, 0.0);
    add_version(&repo, 2, 2.0, 1.0);
    add_version(&repo, 3, 3.0, 0.0);
    repo.pipeline("latest", &pipeline("y"));
    repo.pipeline("pinned", &pipeline_with("y", Some(2), 0));
    let mut cfg = repo.config();
    cfg.reload = ReloadMode::Watch;
    let s = start(cfg).await;
    let c = &s.client;

    // latest 2: versions 2 and 3; the default is the newest.
    assert_eq!(call(c, "affine", "", true).await.unwrap(), linear(3.0, 0.0));
    assert_eq!(call(c, "affine", "2", true).await.unwrap(), linear(2.0, 1.0));
    assert_eq!(call(c, "affine", "1", true).await.unwrap_err().code(), Some(Code::NotFound));
    assert_eq!(c.model_metadata("affine").await.unwrap().versions, vec!["2", "3"]);
    let index = c.repository_index().await.unwrap();
    let rows: Vec<(&str, &str)> = index.iter().map(|m| (m.name.as_str(), m.version.as_str())).collect();
    assert!(rows.contains(&("affine", "2")) && rows.contains(&("affine", "3")), "{rows:?}");
    assert_eq!(call(c, "latest", "", false).await.unwrap(), linear(3.0, 0.0));
    assert_eq!(call(c, "pinned", "", false).await.unwrap(), linear(2.0, 1.0));

    // A broken new version folder does not take the serving ones down.
    let dir = repo.path().join("affine/4");
    std::fs::create_dir_all(&dir).unwrap();
    replace(&dir.join("model.onnx"), b"truncated upload");
    eventually("the broken version is reported", || async { reason_of(c, "affine").await.contains("4/model.onnx") })
        .await;
    assert_eq!(call(c, "affine", "", true).await.unwrap(), linear(3.0, 0.0));
    assert_eq!(call(c, "affine", "2", true).await.unwrap(), linear(2.0, 1.0));
    assert_eq!(call(c, "pinned", "", false).await.unwrap(), linear(2.0, 1.0));
    assert!(c.server_ready().await.unwrap());

    // The fixed version 4: the default and the unpinned pipeline move to it, the pinned
    // pipeline stays on version 2, which is no longer served; 3 is not loaded again.
    add_version(&repo, 4, 4.0, 0.0);
    eventually("version 4 serves", || async { call(c, "affine", "", true).await.ok() == Some(linear(4.0, 0.0)) }).await;
    eventually("the unpinned pipeline follows", || async {
        call(c, "latest", "", false).await.ok() == Some(linear(4.0, 0.0))
    })
    .await;
    // latest 2 is now versions 3 and 4: the pipeline pinned to 2 cannot compile and keeps
    // serving on its version, reported.
    assert_eq!(call(c, "pinned", "", false).await.unwrap(), linear(2.0, 1.0));
    assert!(reason_of(c, "pinned").await.contains("version 2 is not served"), "{}", reason_of(c, "pinned").await);
    assert_eq!(call(c, "affine", "2", true).await.unwrap_err().code(), Some(Code::NotFound));
    assert_eq!(load_count(&s.http, "affine", "3").await, 1.0);

    // Policy `all` brings every version back; the pinned pipeline compiles again.
    replace(&repo.path().join("affine/model.yaml"), format!("{MODEL_YAML}version_policy: all\n").as_bytes());
    eventually("version 1 serves again", || async {
        call(c, "affine", "1", true).await.ok() == Some(linear(1.0, 0.0))
    })
    .await;
    eventually("the pinned pipeline loads", || async { reason_of(c, "pinned").await.is_empty() }).await;
    assert_eq!(call(c, "pinned", "", false).await.unwrap(), linear(2.0, 1.0));
    s.server.shutdown().await;
}

/// (thread name, nice value) of every thread of this process whose name starts with one
/// of `prefixes`.
#[cfg(target_os = "linux")]
fn thread_nice(prefixes: &[&str]) -> Vec<(String, i64)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("stat")))
        else {
            continue; // the thread ended meanwhile
        };
        let comm = comm.trim().to_string();
        if !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        // Fields after the parenthesised name: state is field 3, nice field 19.
        let rest = &stat[stat.rfind(')').expect("stat has a name") + 2..];
        let nice: i64 = rest.split(' ').nth(16).expect("nice field").parse().expect("nice is a number");
        found.push((comm, nice));
    }
    found
}

/// The `prio` model's instance threads and ONNX Runtime's, once at least `instances`
/// instance threads have their names (up to 5 s). A thread takes its name when it first
/// runs, and on a busy machine one spawned a moment ago may not have run yet.
#[cfg(target_os = "linux")]
async fn instance_threads(instances: usize) -> Vec<(String, i64)> {
    let mut found = thread_nice(&["model-prio", "ort-intra-op"]);
    for _ in 0..250 {
        if found.iter().filter(|(n, _)| n.starts_with("model-prio")).count() >= instances {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        found = thread_nice(&["model-prio", "ort-intra-op"]);
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg(target_os = "linux")]
async fn a_model_reloaded_while_serving_loads_at_low_priority_but_serves_at_normal() {
    let repo = Repo::new();
    let yaml = "max_batch_size: 8\nintra_op_threads: 2\ninstances: 2\n";
    repo.add("prio", &linear_model(4, 2.0, 1.0), yaml);
    let s = start(repo.config()).await;
    let before = instance_threads(2).await;
    assert_eq!(before.iter().filter(|(n, _)| n.starts_with("model-prio")).count(), 2, "{before:?}");
    assert!(before.iter().any(|(n, _)| n == "ort-intra-op"), "ONNX Runtime's pool threads are named: {before:?}");

    repo.add("prio", &linear_model(4, 3.0, 0.0), yaml);
    let loads = sluice_server::background_runs();
    s.client.repository_load("prio").await.unwrap();
    assert!(sluice_server::background_runs() > loads, "the reload loaded in the background");
    assert_eq!(call(&s.client, "prio", "", true).await.unwrap(), linear(3.0, 0.0));
    // The load ran on a nice-19 thread; what it started for serving did not inherit that.
    let after = instance_threads(2).await;
    let base = before[0].1;
    assert!(after.iter().filter(|(n, _)| n.starts_with("model-prio")).count() >= 2, "{after:?}");
    assert!(after.iter().all(|(_, nice)| *nice == base), "serving threads run at the server's priority: {after:?}");
    s.server.shutdown().await;
}

/// Makes `dir` hold `files` the way the kubelet lays out a ConfigMap volume: the files
/// in a timestamped folder, `..data` a symlink to it, and each name a symlink through
/// `..data`. An update writes a new folder and swaps `..data` in one rename.
fn configmap_update(dir: &Path, generation: u32, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;
    let folder = format!("..2026_12_05_00_00_{generation:02}.000000000");
    std::fs::create_dir_all(dir.join(&folder)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(&folder).join(name), text).unwrap();
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    symlink(&folder, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if generation > 0 {
        let old = format!("..2026_12_05_00_00_{:02}.000000000", generation - 1);
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_volume_update_is_picked_up() {
    let repo = Repo::new();
    repo.add("affine", &linear_model(4, 2.0, 1.0), MODEL_YAML);
    let dir = repo.pipelines_path().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    configmap_update(&dir, 0, &[("calc.yaml", &pipeline("y"))]);
    let mut cfg = repo.config();
    cfg.reload = ReloadMode::Watch;
    let s = start(cfg).await;
    assert_eq!(call(&s.client, "calc", "", false).await.unwrap(), linear(2.0, 1.0));

    configmap_update(&dir, 1, &[("calc.yaml", &pipeline("neg"))]);
    let mut now = Vec::new();
    for _ in 0..100 {
        now = call(&s.client, "calc", "", false).await.unwrap();
        if now == linear(-1.0, 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(now, linear(-1.0, 0.0), "the pipeline from the swapped ConfigMap serves");
    assert_eq!(s.client.repository_index().await.unwrap().len(), 2, "no pipeline named after ..data or the folder");
}
