//! The engine: the loaded models and the one entry point every protocol calls. It knows
//! nothing of gRPC or HTTP; `api` translates wire types to and from these.

use crate::backend::{self, Backend};
use crate::error::Error;
use crate::metrics::{Metrics, ModelMetrics};
use crate::pipeline::exec::Pipeline;
use crate::repository::{model_yaml::Warmup, onnx::TensorInfo, Fingerprint, ModelSpec};
use crate::sched::pool::{CpuPool, PoolConfig};
use crate::sched::{queue::BatchPolicy, ModelScheduler};
use crate::stats::ModelStats;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sluice_ops::{DataType, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The only version a flat `models/<name>/` folder has.
pub const DEFAULT_VERSION: &str = "1";

#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model_name: String,
    /// Empty: the default version.
    pub model_version: String,
    pub id: String,
    pub inputs: Vec<NamedTensor>,
    /// Outputs to return; empty: all of them.
    pub outputs: Vec<String>,
    /// Return where the request's time went ([`InferResponse::timing`]).
    pub timing: bool,
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<NamedTensor>,
    /// When asked for: per step (each pipeline node, or the model itself) the time its
    /// work waited (for a pool thread or a batch) and computed, summed over its items.
    pub timing: Option<Vec<StepTiming>>,
}

/// Where one step of a request spent its time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTiming {
    /// The pipeline node, or the model's name.
    pub step: String,
    pub queue: Duration,
    pub compute: Duration,
    /// Items (and fan-out elements) the step ran for this request.
    pub items: u64,
}

pub struct LoadedModel {
    pub spec: ModelSpec,
    pub metrics: ModelMetrics,
    pub stats: Arc<ModelStats>,
    /// What each instance runs on ("cpu", "cuda:0").
    pub devices: Vec<String>,
    scheduler: ModelScheduler,
}

impl LoadedModel {
    /// Queues already checked tensors (in the model's input order) for a batch, with
    /// the item's own batching limits (a pipeline node's overrides).
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Option<Instant>,
        limits: crate::sched::ItemLimits,
    ) -> Result<tokio::sync::oneshot::Receiver<crate::sched::Reply>, Error> {
        self.scheduler.submit_with(inputs, rows, deadline, limits)
    }
}

/// Why something in the repository cannot be served (or not in its newest form), and
/// the files that failed, so a reload does not retry files that have not changed.
#[derive(Clone, Debug)]
pub struct Failure {
    pub reason: String,
    pub(crate) fingerprint: Option<Fingerprint>,
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

/// What a request or metadata call names: a model or a pipeline (served alike).
#[derive(Clone, Copy)]
pub enum Endpoint<'a> {
    Model(&'a Arc<LoadedModel>),
    Pipeline(&'a Arc<Pipeline>),
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

    pub fn unloaded(&self) -> impl Iterator<Item = &str> {
        self.unloaded.iter().map(String::as_str)
    }

    /// A ready model or pipeline by name and version ("" for the default).
    pub fn endpoint(&self, name: &str, version: &str) -> Result<Endpoint<'_>, Error> {
        match self.pipelines.get(name) {
            None => self.model(name, version).map(Endpoint::Model),
            Some(_) if !version.is_empty() && version != DEFAULT_VERSION => {
                Err(Error::ModelNotFound { model: name.to_string(), version: Some(version.to_string()) })
            }
            Some(PipelineSlot::Ready { pipeline, .. }) => Ok(Endpoint::Pipeline(pipeline)),
            Some(PipelineSlot::Unavailable { reason }) => {
                Err(Error::ModelNotReady { model: name.to_string(), reason: reason.clone() })
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
        let not_found = || Error::ModelNotFound {
            model: name.to_string(),
            version: (!version.is_empty()).then(|| version.to_string()),
        };
        let entry = self.models.get(name).ok_or_else(not_found)?;
        if version.is_empty() {
            return entry
                .ready(None)
                .ok_or_else(|| Error::ModelNotReady { model: name.to_string(), reason: entry.reason() });
        }
        let v: u64 = version.parse().map_err(|_| not_found())?;
        match entry.versions.get(&v) {
            Some(ModelSlot::Ready { model, .. }) => Ok(model),
            Some(ModelSlot::Unavailable(f)) => {
                Err(Error::ModelNotReady { model: format!("{name}' version '{v}"), reason: f.reason.clone() })
            }
            None => Err(not_found()),
        }
    }
}

pub struct Engine {
    current: ArcSwap<Snapshot>,
    pub(crate) cfg: EngineConfig,
    pub(crate) pools: HashMap<String, Arc<CpuPool>>,
    pub metrics: Metrics,
    /// Held while a reload builds its snapshot: one reload at a time.
    pub(crate) reloading: Mutex<()>,
    /// Models and pipelines replaced by a reload that requests may still be using. Their
    /// last owner drops them here, off the async runtime (dropping a model joins its
    /// instance threads).
    pub(crate) retired: Mutex<Vec<Retired>>,
    /// Recent latencies and counter samples for the dashboard.
    pub live: crate::dashboard::Live,
    /// Set once the first load is done: later loads run at low CPU priority so that
    /// serving keeps the CPU (see sched::threads).
    pub(crate) serving: std::sync::atomic::AtomicBool,
    /// NVML, when the host has it, and the last sample of every GPU (for the dashboard).
    gpus: crate::gpu::Gpus,
    gpu_samples: Mutex<Vec<crate::gpu::GpuSample>>,
}

pub(crate) enum Retired {
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
    /// Loads every model and pipeline of the repository. One that fails is kept as
    /// unavailable, with its reason, and the others still load.
    pub fn load(cfg: EngineConfig, metrics: Metrics) -> Result<Engine, String> {
        let pools = cfg.pools.iter().map(|p| (p.name.clone(), Arc::new(CpuPool::start(p.clone(), &metrics)))).collect();
        let engine = Engine {
            current: ArcSwap::from_pointee(Snapshot::default()),
            cfg,
            pools,
            metrics,
            reloading: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
            live: Default::default(),
            serving: Default::default(),
            gpus: crate::gpu::Gpus::open(),
            gpu_samples: Mutex::new(Vec::new()),
        };
        // ONNX Runtime is loaded here, at normal priority, not by a later background load
        // (whose priority the library's own threads would keep). A missing library shows
        // up as each model's load error.
        let _ = crate::backend::ort::init(&engine.cfg.ort_dylib);
        engine.reload(&crate::reload::Scope::All)?;
        engine.serving.store(true, std::sync::atomic::Ordering::Release);
        Ok(engine)
    }

    /// Reads every GPU's utilisation and memory into the metrics (once a second, from
    /// the reload thread); nothing on hosts without NVML.
    pub fn sample_gpus(&self) {
        if !self.gpus.available() {
            return;
        }
        let samples = self.gpus.sample();
        for s in &samples {
            let gpu = s.index.to_string();
            self.metrics.gpu_utilization.with_label_values(&[&gpu]).set(s.utilization);
            self.metrics.gpu_memory_used.with_label_values(&[&gpu]).set(s.memory_used_bytes as i64);
            self.metrics.gpu_memory_total.with_label_values(&[&gpu]).set(s.memory_total_bytes as i64);
        }
        *self.gpu_samples.lock() = samples;
    }

    /// The last sample of every GPU (empty without NVML).
    pub fn gpu_samples(&self) -> Vec<crate::gpu::GpuSample> {
        self.gpu_samples.lock().clone()
    }

    /// What is served now. Hold it only as long as a request needs it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub(crate) fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        self.current.swap(Arc::new(next))
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<CpuPool>> {
        self.pools.get(name)
    }

    /// Drops replaced models and pipelines that no request uses any more.
    pub fn reap(&self) {
        // Pipelines go first and free their models for the next call.
        let mut retired = std::mem::take(&mut *self.retired.lock());
        retired.retain(Retired::in_use);
        self.retired.lock().extend(retired);
    }

    /// Counts a request for `model` that was malformed on the wire and never reached it,
    /// so statistics and metrics see every failure. Unknown models are not counted: their
    /// names come from clients and would make unbounded metric labels.
    pub fn record_rejected(&self, model: &str, version: &str, e: &Error) {
        let snapshot = self.current.load();
        let (stats, metrics) = match snapshot.endpoint(model, version) {
            Ok(Endpoint::Model(m)) => (&m.stats, &m.metrics),
            Ok(Endpoint::Pipeline(p)) => (&p.stats, &p.metrics),
            Err(_) => return,
        };
        stats.record_request(false, Duration::ZERO);
        metrics.requests.inc();
        metrics.failure(e.error_type());
        self.live.record(model, Duration::ZERO, false);
    }

    /// Runs one inference request through the model's batcher (or the pipeline), on
    /// the snapshot current when it starts.
    pub async fn infer(&self, req: InferRequest, deadline: Option<Instant>) -> Result<InferResponse, Error> {
        let model = {
            let snapshot = self.current.load();
            match snapshot.endpoint(&req.model_name, &req.model_version)? {
                Endpoint::Pipeline(p) => Err(p.clone()),
                Endpoint::Model(m) => Ok(m.clone()),
            }
        };
        let model = match model {
            Ok(m) => m,
            Err(pipeline) => {
                let start = Instant::now();
                let result = pipeline.infer(req, deadline).await;
                self.live.record(&pipeline.plan.name, start.elapsed(), result.is_ok());
                return result;
            }
        };
        let start = Instant::now();
        let result = run(&model, req, deadline).await;
        let elapsed = start.elapsed();
        self.live.record(&model.spec.name, elapsed, result.is_ok());
        model.stats.record_request(result.is_ok(), elapsed);
        let m = &model.metrics;
        m.requests.inc();
        m.request_duration.observe(elapsed.as_secs_f64());
        match result {
            Ok((resp, compute)) => {
                m.overhead.observe(elapsed.saturating_sub(compute).as_secs_f64());
                Ok(resp)
            }
            Err(e) => {
                m.failure(e.error_type());
                Err(e)
            }
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

/// Runs the request; returns the response and the backend time of its batch.
async fn run(
    model: &LoadedModel,
    req: InferRequest,
    deadline: Option<Instant>,
) -> Result<(InferResponse, Duration), Error> {
    let spec = &model.spec;
    let (inputs, rows) = check_inputs(spec, req.inputs)?;
    let wanted = check_outputs(spec, &req.outputs)?;
    let rx = model.scheduler.submit(inputs, rows, deadline)?;
    let reply = match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), rx)
            .await
            .map_err(|_| Error::DeadlineExceeded { model: spec.name.clone() })?,
        None => rx.await,
    };
    let computed = reply.map_err(|_| Error::Internal(format!("model '{}': instance stopped", spec.name)))??;
    let timing = req.timing.then(|| {
        vec![StepTiming {
            step: spec.name.clone(),
            queue: computed.queued,
            compute: computed.compute,
            items: rows as u64,
        }]
    });
    let resp = InferResponse {
        model_name: spec.name.clone(),
        model_version: spec.version.to_string(),
        id: req.id,
        timing,
        outputs: spec
            .outputs
            .iter()
            .zip(computed.outputs)
            .enumerate()
            .filter(|(i, _)| wanted.contains(i))
            .map(|(_, (info, tensor))| NamedTensor { name: info.name.clone(), tensor })
            .collect(),
    };
    Ok((resp, computed.compute))
}

fn dims_str(dims: &[i64]) -> String {
    let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", d.join(","))
}

/// Orders the request's tensors as the model expects them and checks names, dtypes and
/// shapes; returns them with the request's batch size (1 for models without batching).
fn check_inputs(spec: &ModelSpec, given: Vec<NamedTensor>) -> Result<(Vec<Tensor>, usize), Error> {
    let m = &spec.name;
    let expected: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
    let mut slots: Vec<Option<Tensor>> = vec![None; spec.inputs.len()];
    for nt in given {
        let i = spec.inputs.iter().position(|t| t.name == nt.name).ok_or_else(|| {
            Error::invalid(m, format!("unknown input '{}'; the model's inputs are: {}", nt.name, expected.join(", ")))
        })?;
        if slots[i].replace(nt.tensor).is_some() {
            return Err(Error::invalid(m, format!("input '{}' is given more than once", nt.name)));
        }
    }
    let mut rows = None;
    let mut out = Vec::with_capacity(slots.len());
    for (info, slot) in spec.inputs.iter().zip(slots) {
        let t = slot.ok_or_else(|| {
            Error::invalid(m, format!("missing input '{}' ({} {})", info.name, info.dtype, dims_str(&info.dims)))
        })?;
        check_tensor(spec, info, &t)?;
        if spec.config.max_batch_size > 0 {
            let r = t.shape[0];
            if r == 0 || r > spec.config.max_batch_size {
                return Err(Error::invalid(
                    m,
                    format!(
                        "input '{}': batch size {r} is outside 1..={} (max_batch_size)",
                        info.name, spec.config.max_batch_size
                    ),
                ));
            }
            if *rows.get_or_insert(r) != r {
                return Err(Error::invalid(m, "inputs disagree on the batch size (dimension 0)".to_string()));
            }
        }
        out.push(t);
    }
    Ok((out, rows.unwrap_or(1)))
}

fn check_tensor(spec: &ModelSpec, info: &TensorInfo, t: &Tensor) -> Result<(), Error> {
    let m = &spec.name;
    if t.dtype != info.dtype {
        return Err(Error::invalid(
            m,
            format!("input '{}': expected datatype {}, got {}", info.name, info.dtype, t.dtype),
        ));
    }
    let fits =
        t.shape.len() == info.dims.len() && t.shape.iter().zip(&info.dims).all(|(&s, &d)| d < 0 || s as i64 == d);
    if !fits {
        let shape: Vec<i64> = t.shape.iter().map(|&s| s as i64).collect();
        return Err(Error::invalid(
            m,
            format!(
                "input '{}': shape {} does not match the model's {} (-1 is any size)",
                info.name,
                dims_str(&shape),
                dims_str(&info.dims)
            ),
        ));
    }
    // Byte lengths were checked when the tensor was built from the wire.
    debug_assert!(t.validate().is_ok());
    Ok(())
}

/// Indices of the requested outputs; all of them when none are named.
fn check_outputs(spec: &ModelSpec, requested: &[String]) -> Result<Vec<usize>, Error> {
    if requested.is_empty() {
        return Ok((0..spec.outputs.len()).collect());
    }
    requested
        .iter()
        .map(|r| {
            spec.outputs.iter().position(|o| &o.name == r).ok_or_else(|| {
                let names: Vec<&str> = spec.outputs.iter().map(|o| o.name.as_str()).collect();
                Error::invalid(
                    &spec.name,
                    format!("unknown output '{r}'; the model's outputs are: {}", names.join(", ")),
                )
            })
        })
        .collect()
}

pub(crate) fn load_model(spec: ModelSpec, ort_dylib: &Path, metrics: &Metrics) -> Result<LoadedModel, String> {
    let cfg = &spec.config;
    let mut instances: Vec<Box<dyn Backend>> = Vec::with_capacity(cfg.instances);
    let mut devices = Vec::with_capacity(cfg.instances);
    // `instances` per GPU for GPU providers; CPU models have one "device".
    let gpus = if cfg.wants_gpu() { cfg.devices() } else { vec![0] };
    let source = backend::ort::ModelSource::prepare(ort_dylib, &spec.onnx_path, cfg)?;
    for &gpu in &gpus {
        for _ in 0..cfg.instances {
            let mut b = backend::ort::load(ort_dylib, &source, cfg, gpu, &spec.inputs, &spec.outputs)?;
            warm_up(&spec, &mut b)?;
            devices.push(b.device());
            instances.push(Box::new(b));
        }
        if devices.iter().all(|d| d == "cpu") {
            break; // fell back to CPU: `instances` in all, not per listed GPU
        }
    }
    let stats = Arc::new(ModelStats::default());
    let policy = BatchPolicy {
        max_batch_size: cfg.max_batch_size,
        max_queue_delay: Duration::from_micros(cfg.dynamic_batching.max_queue_delay_us),
        preferred: cfg.dynamic_batching.preferred_batch_sizes.clone(),
        max_queue_size: cfg.max_queue_size,
    };
    let model_metrics = metrics.for_model(&spec.name);
    let allowed = cfg.dynamic_batching.allowed_batch_sizes.clone();
    let outputs = spec.outputs.iter().map(|o| o.name.clone()).collect();
    metrics.instances.with_label_values(&[&spec.name]).set(instances.len() as i64);
    let instances = instances.into_iter().enumerate().map(|(i, b)| (b, metrics.for_instance(&spec.name, i))).collect();
    let scheduler =
        ModelScheduler::start(&spec.name, instances, policy, allowed, outputs, stats.clone(), model_metrics.clone());
    Ok(LoadedModel { spec, metrics: model_metrics, stats, devices, scheduler })
}

/// Runs the model.yaml's warm-up batches (zero-filled) on one instance.
fn warm_up(spec: &ModelSpec, backend: &mut dyn Backend) -> Result<(), String> {
    // Every allowed batch size is a shape the model will see: warm each one up too,
    // borrowing the first warm-up entry's shapes for variable dims.
    let mut runs = spec.config.warmup.clone();
    for &size in &spec.config.dynamic_batching.allowed_batch_sizes {
        if runs.iter().all(|w| w.batch_size != size) {
            let mut shapes = runs.first().map(|w| w.shapes.clone()).unwrap_or_default();
            shapes.values_mut().filter_map(|s| s.first_mut()).for_each(|d| *d = size);
            runs.push(Warmup { batch_size: size, shapes });
        }
    }
    for w in &runs {
        let inputs = spec
            .inputs
            .iter()
            .map(|info| {
                let shape: Vec<usize> = match w.shapes.get(&info.name) {
                    Some(s) => s.clone(),
                    None => info
                        .dims
                        .iter()
                        .enumerate()
                        .map(|(i, &d)| match d {
                            d if d > 0 => Ok(d as usize),
                            _ if i == 0 && spec.config.max_batch_size > 0 => Ok(w.batch_size),
                            _ => Err(format!(
                                "warm-up: input '{}' has variable dims {}; give its full shape under warmup[].shapes",
                                info.name,
                                dims_str(&info.dims)
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                };
                let size = info.dtype.size().ok_or_else(|| {
                    format!("warm-up: input '{}' is {}, which cannot be zero-filled", info.name, DataType::Bytes)
                })?;
                let n = sluice_ops::tensor::element_count(&shape);
                Ok(Tensor { dtype: info.dtype, shape, data: vec![0u8; n * size].into() })
            })
            .collect::<Result<Vec<_>, String>>()?;
        backend.run(&inputs).map_err(|e| format!("warm-up with batch size {} failed: {e}", w.batch_size))?;
    }
    Ok(())
}
