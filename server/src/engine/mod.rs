//! The engine: what is served (a snapshot of models and pipelines, swapped whole by a
//! reload) and the one entry point every protocol calls. It knows nothing of gRPC or
//! HTTP; `api` translates wire types to and from these. `reload` builds the next
//! snapshot; it is a child module so that the engine's fields stay private.

pub mod reload;

use crate::error::Error;
use crate::model::LoadedModel;
use crate::pipeline::exec::Pipeline;
use crate::repository::Fingerprint;
use crate::request::{InferRequest, InferResponse, DEFAULT_VERSION};
use crate::sched::pool::{CpuPool, PoolConfig};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{Outcome, RequestSinks, Telemetry};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use reload::{ReloadError, ReloadReport, Scope};
use sluice_ops::OpRegistry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Why something in the repository cannot be served (or not in its newest form), and
/// the files that failed, so a reload does not retry files that have not changed.
#[derive(Clone, Debug)]
pub struct Failure {
    pub reason: String,
    fingerprint: Option<Fingerprint>,
    /// Loading again may succeed with the same files (a remote model whose servers were
    /// not up): every reload tries again, and housekeeping reloads while one is failing.
    retry: bool,
}

/// One version of a model.
#[derive(Clone)]
pub enum ModelSlot {
    /// Serving. `stale`: newer files on disk failed to load; this version keeps serving.
    Ready {
        model: Arc<LoadedModel>,
        stale: Option<Failure>,
    },
    Unavailable(Failure),
}

/// A model's served versions.
#[derive(Clone, Default)]
pub struct ModelEntry {
    pub versions: BTreeMap<u64, ModelSlot>,
    /// A problem with the whole model (its model.yaml, its folder) found by the last
    /// reload; the versions loaded before it keep serving.
    pub problem: Option<String>,
}

impl ModelEntry {
    /// The newest ready version, or the named one.
    pub fn ready(&self, version: Option<u64>) -> Option<&Arc<LoadedModel>> {
        fn ready(s: &ModelSlot) -> Option<&Arc<LoadedModel>> {
            match s {
                ModelSlot::Ready { model, .. } => Some(model),
                ModelSlot::Unavailable(_) => None,
            }
        }
        match version {
            Some(v) => self.versions.get(&v).and_then(ready),
            None => self.versions.values().rev().find_map(ready),
        }
    }

    /// Why no version can serve: the first failure there is.
    pub(crate) fn reason(&self) -> String {
        self.problem.clone().unwrap_or_else(|| {
            self.versions
                .values()
                .rev()
                .find_map(|s| match s {
                    ModelSlot::Unavailable(f) => Some(f.reason.clone()),
                    ModelSlot::Ready { .. } => None,
                })
                .unwrap_or_else(|| "no version is loaded".into())
        })
    }
}

pub struct EngineConfig {
    pub models_dir: PathBuf,
    pub ort_dylib: PathBuf,
    /// Folder of `<name>.yaml` pipeline files; `None`: models only.
    pub pipelines_dir: Option<PathBuf>,
    pub pools: Vec<PoolConfig>,
    /// The ops pipelines may name.
    pub ops: Arc<OpRegistry>,
    /// Nice value of model loads once serving (0: normal priority); see `rt::priority`.
    pub load_nice: i32,
    /// Other names for models and pipelines: alias -> name.
    pub aliases: BTreeMap<String, String>,
}

#[derive(Clone)]
pub enum PipelineSlot {
    /// Serving. `stale`: the file on disk changed and did not compile (or its models
    /// changed and it no longer fits them); this version keeps serving.
    Ready {
        pipeline: Arc<Pipeline>,
        stale: Option<String>,
    },
    Unavailable {
        reason: String,
    },
}

/// What a request or metadata call names: a model or a pipeline (served alike). A
/// request holds it, not the snapshot, to its end.
#[derive(Clone)]
pub enum Servable {
    Model(Arc<LoadedModel>),
    Pipeline(Arc<Pipeline>),
}

impl Servable {
    /// Where a request to it is recorded.
    pub fn sinks(&self) -> RequestSinks<'_> {
        match self {
            Servable::Model(m) => RequestSinks { name: &m.spec.name, stats: &m.stats, metrics: &m.metrics },
            Servable::Pipeline(p) => RequestSinks { name: &p.plan.name, stats: &p.stats, metrics: &p.metrics },
        }
    }
}

/// Everything served at one moment. Requests take the current snapshot when they
/// start and keep what they use of it to the end; a reload builds a new snapshot
/// and swaps it in whole.
#[derive(Default)]
pub struct Snapshot {
    // Pipelines hold the models they use: declared first, dropped first.
    pub(crate) pipelines: BTreeMap<String, PipelineSlot>,
    pub(crate) models: BTreeMap<String, ModelEntry>,
    /// Names unloaded through the API, kept out until loaded again.
    pub(crate) unloaded: BTreeSet<String>,
    /// Other names requests may use for a model or pipeline (`--model-alias`).
    pub(crate) aliases: Arc<BTreeMap<String, String>>,
}

impl Snapshot {
    /// Every pipeline, ready or not, sorted by name.
    pub fn pipelines(&self) -> impl Iterator<Item = (&str, &PipelineSlot)> {
        self.pipelines.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// Every model of the repository, ready or not, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelEntry)> {
        self.models.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// Whether a failed load is worth trying again with the same files.
    pub fn wants_retry(&self) -> bool {
        self.models.values().flat_map(|e| e.versions.values()).any(|s| match s {
            ModelSlot::Unavailable(f) | ModelSlot::Ready { stale: Some(f), .. } => f.retry,
            ModelSlot::Ready { stale: None, .. } => false,
        })
    }

    pub fn unloaded(&self) -> impl Iterator<Item = &str> {
        self.unloaded.iter().map(String::as_str)
    }

    /// The name `name` stands for: itself when a model or pipeline has it, else the
    /// target of the alias it is, else itself (and the lookup fails on it).
    pub fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        if self.pipelines.contains_key(name) || self.models.contains_key(name) {
            return name;
        }
        self.aliases.get(name).map_or(name, String::as_str)
    }

    /// A ready model or pipeline by name (or alias) and version ("" for the default).
    pub fn servable(&self, name: &str, version: &str) -> Result<Servable, Error> {
        let name = self.resolve(name);
        match self.pipelines.get(name) {
            None => self.model(name, version).map(|m| Servable::Model(m.clone())),
            Some(_) if !version.is_empty() && version != DEFAULT_VERSION => {
                Err(Error::ModelNotFound { model: name.to_string(), version: Some(version.to_string()) })
            }
            Some(PipelineSlot::Ready { pipeline, .. }) => Ok(Servable::Pipeline(pipeline.clone())),
            Some(PipelineSlot::Unavailable { reason }) => {
                Err(Error::ModelNotReady { model: name.to_string(), version: None, reason: reason.clone() })
            }
        }
    }

    /// The server is ready when every model has a version serving and every pipeline is
    /// serving (a new version that failed to load does not make it unready while the
    /// previous one serves).
    pub fn ready(&self) -> bool {
        self.models.values().all(|e| e.ready(None).is_some())
            && self.pipelines.values().all(|s| matches!(s, PipelineSlot::Ready { .. }))
    }

    /// A ready model by name and version ("" for the newest ready version).
    pub fn model(&self, name: &str, version: &str) -> Result<&Arc<LoadedModel>, Error> {
        let name = self.resolve(name);
        let not_found = || Error::ModelNotFound {
            model: name.to_string(),
            version: (!version.is_empty()).then(|| version.to_string()),
        };
        let entry = self.models.get(name).ok_or_else(not_found)?;
        if version.is_empty() {
            return entry.ready(None).ok_or_else(|| Error::ModelNotReady {
                model: name.to_string(),
                version: None,
                reason: entry.reason(),
            });
        }
        let v: u64 = version.parse().map_err(|_| not_found())?;
        match entry.versions.get(&v) {
            Some(ModelSlot::Ready { model, .. }) => Ok(model),
            Some(ModelSlot::Unavailable(f)) => Err(Error::ModelNotReady {
                model: name.to_string(),
                version: Some(v.to_string()),
                reason: f.reason.clone(),
            }),
            None => Err(not_found()),
        }
    }

    /// Every cumulative counter a frame takes a rate of, by key.
    pub fn counters(&self) -> HashMap<String, f64> {
        let mut c = HashMap::new();
        for (name, e) in self.models() {
            if let Some(m) = e.ready(None) {
                c.insert(format!("model/{name}/busy"), m.metrics.busy.get());
                c.insert(format!("model/{name}/executions"), m.stats.execution_count.load(Relaxed) as f64);
                c.insert(format!("model/{name}/rows"), m.stats.inference_count.load(Relaxed) as f64);
            }
        }
        for (name, s) in self.pipelines() {
            let PipelineSlot::Ready { pipeline, .. } = s else { continue };
            for v in pipeline.nodes() {
                let k = format!("node/{name}/{}", v.node.name);
                let m = v.metrics;
                c.insert(format!("{k}/items"), m.items.get() as f64);
                c.insert(format!("{k}/queue_sum"), m.queue.get_sample_sum());
                c.insert(format!("{k}/queue_count"), m.queue.get_sample_count() as f64);
                c.insert(format!("{k}/compute_sum"), m.compute.get_sample_sum());
                c.insert(format!("{k}/batch_sum"), m.batch_size.get_sample_sum());
                c.insert(format!("{k}/batch_count"), m.batch_size.get_sample_count() as f64);
                c.insert(format!("{k}/skipped"), m.skipped.get() as f64);
                for (label, _, b) in &v.branches {
                    c.insert(format!("{k}/branch/{label}"), b.items.get() as f64);
                }
            }
        }
        c
    }
}

pub struct Engine {
    current: ArcSwap<Snapshot>,
    cfg: EngineConfig,
    pools: HashMap<String, Arc<CpuPool>>,
    telemetry: Telemetry,
    /// Held while a reload builds its snapshot: one reload at a time.
    reloading: Mutex<()>,
    /// Models and pipelines replaced by a reload that requests may still be using. Their
    /// last owner drops them here, off the async runtime (dropping a model joins its
    /// instance threads).
    retired: Mutex<Vec<Retired>>,
    /// Set once the first load is done: later loads run at low CPU priority so that
    /// serving keeps the CPU (see rt::priority).
    serving: std::sync::atomic::AtomicBool,
}

enum Retired {
    Model(Arc<LoadedModel>),
    Pipeline(Arc<Pipeline>),
}

impl Retired {
    fn in_use(&self) -> bool {
        match self {
            Retired::Model(m) => Arc::strong_count(m) > 1,
            Retired::Pipeline(p) => Arc::strong_count(p) > 1,
        }
    }
}

impl Engine {
    /// An engine serving nothing yet: its CPU pools started, the repository not read.
    /// A server answers health probes with it while `load_repository` runs.
    pub fn new(cfg: EngineConfig, metrics: Metrics) -> Result<Engine, ReloadError> {
        let mut pools = HashMap::new();
        for p in &cfg.pools {
            let pool = CpuPool::start(p.clone(), &metrics).map_err(|e| ReloadError::Thread(e.to_string()))?;
            pools.insert(p.name.clone(), Arc::new(pool));
        }
        Ok(Engine {
            current: ArcSwap::from_pointee(Snapshot::default()),
            cfg,
            pools,
            telemetry: Telemetry::new(metrics),
            reloading: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
            serving: Default::default(),
        })
    }

    /// The first load of the whole repository, at normal CPU priority. One that fails is
    /// kept as unavailable, with its reason, and the others still load; once it returns
    /// every model that should load has loaded or failed (`started`).
    pub fn load_repository(&self) -> Result<(), ReloadError> {
        // ONNX Runtime is loaded here, at normal priority, not by a later background load
        // (whose priority the library's own threads would keep). A missing library shows
        // up as each model's load error.
        let _ = crate::backend::ort::init(&self.cfg.ort_dylib);
        self.reload(&Scope::All)?;
        for (alias, target) in &self.cfg.aliases {
            let snapshot = self.snapshot();
            if !snapshot.pipelines.contains_key(target) && !snapshot.models.contains_key(target) {
                tracing::warn!(%alias, %target, "--model-alias names no model or pipeline of the repository");
            }
        }
        self.serving.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// While the first load runs, "no such model" is "not ready yet" (UNAVAILABLE / 503,
    /// which clients retry), not a NOT_FOUND that looks final.
    pub fn starting(&self, e: Error) -> Error {
        match e {
            Error::ModelNotFound { model, version } if !self.started() => Error::ModelNotReady {
                model,
                version,
                reason: "the server is starting: the repository is still loading".into(),
            },
            e => e,
        }
    }

    /// Whether the first load of the repository has finished.
    pub fn started(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The CPU pools for pipeline ops, sorted by name.
    pub fn pools(&self) -> Vec<(&str, &Arc<CpuPool>)> {
        let mut pools: Vec<_> = self.pools.iter().map(|(n, p)| (n.as_str(), p)).collect();
        pools.sort_by_key(|(n, _)| *n);
        pools
    }

    /// Takes this second's samples for the dashboard and the GPU metrics.
    pub fn sample(&self) {
        let snapshot = self.snapshot();
        self.telemetry.live.sample(snapshot.counters());
        self.telemetry.sample_queue_time(snapshot.models().map(|(name, _)| name));
        self.telemetry.sample_gpus();
    }

    /// What is served now. Hold it only as long as a request needs it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        self.current.swap(Arc::new(next))
    }

    /// Drops replaced models and pipelines that no request uses any more.
    pub fn reap(&self) {
        // Pipelines go first and free their models for the next call.
        let mut retired = std::mem::take(&mut *self.retired.lock());
        let before = retired.len();
        retired.retain(Retired::in_use);
        let dropped = retired.len() < before;
        self.retired.lock().extend(retired);
        if dropped {
            // A model's sessions were freed on the threads that made them: hand the
            // memory back to the system now, or every reload leaves it in malloc's
            // per-thread arenas (+15 MB per reload of ocr_det until a plateau 500 MB up).
            crate::rt::release_free_memory();
        }
    }

    /// Counts a request for `model` that was malformed on the wire and never reached it,
    /// so statistics and metrics see every failure. Unknown models are not counted: their
    /// names come from clients and would make unbounded metric labels.
    pub fn record_rejected(&self, model: &str, version: &str, e: &Error) {
        let snapshot = self.current.load();
        if let Ok(servable) = snapshot.servable(model, version) {
            servable.sinks().record(&self.telemetry.live, Outcome::Rejected(e));
        }
    }

    /// Runs one inference request through the model's batcher (or the pipeline), on
    /// the snapshot current when it starts.
    pub async fn infer(&self, req: InferRequest, deadline: Option<Instant>) -> Result<InferResponse, Error> {
        let servable =
            self.current.load().servable(&req.model_name, &req.model_version).map_err(|e| self.starting(e))?;
        let start = Instant::now();
        let result = match &servable {
            Servable::Model(m) => m.infer(req, deadline).await.map(|(resp, compute)| (resp, Some(compute))),
            Servable::Pipeline(p) => p.infer(req, deadline).await.map(|resp| (resp, None)),
        };
        let elapsed = start.elapsed();
        let outcome = match &result {
            Ok((_, compute)) => Outcome::Answered { elapsed, compute: *compute },
            Err(error) => Outcome::Failed { elapsed, error },
        };
        servable.sinks().record(&self.telemetry.live, outcome);
        result.map(|(resp, _)| resp)
    }

    /// Runs a repository call (a reload, a load or an unload): blocking, it loads models.
    pub fn repository_call(&self, name: &str, unload: bool) -> Result<ReloadReport, Error> {
        if name.is_empty() && !unload {
            // sluice's own extension: an empty name reloads the whole repository.
            self.reload(&Scope::All).map_err(|e| Error::Internal(e.to_string()))
        } else if unload {
            self.unload(name)
        } else {
            self.load_named(name)
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Pipelines before the models they hold.
        self.current.store(Arc::new(Snapshot::default()));
        let retired = std::mem::take(&mut *self.retired.lock());
        let (pipelines, models): (Vec<_>, Vec<_>) =
            retired.into_iter().partition(|r| matches!(r, Retired::Pipeline(_)));
        drop(pipelines);
        drop(models);
    }
}
