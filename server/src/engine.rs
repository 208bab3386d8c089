//! The engine: the loaded models and the one entry point every protocol calls. It knows
//! nothing of gRPC or HTTP; `api` translates wire types to and from these.

use crate::backend::{self, Backend};
use crate::error::Error;
use crate::metrics::{Metrics, ModelMetrics};
use crate::pipeline::{self, exec::Pipeline, Catalog, ModelSig};
use crate::repository::{self, model_yaml::Warmup, onnx::TensorInfo, ModelSpec};
use crate::sched::pool::{CpuPool, PoolConfig};
use crate::sched::{queue::BatchPolicy, ModelScheduler};
use crate::stats::ModelStats;
use sluice_ops::{DataType, Tensor};
use std::collections::{BTreeMap, HashMap};
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
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<NamedTensor>,
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

pub enum ModelSlot {
    Ready(Arc<LoadedModel>),
    Unavailable { reason: String },
}

pub struct EngineConfig {
    pub models_dir: PathBuf,
    pub ort_dylib: PathBuf,
    /// Folder of `<name>.yaml` pipeline files; `None`: models only.
    pub pipelines_dir: Option<PathBuf>,
    pub pools: Vec<PoolConfig>,
}

pub enum PipelineSlot {
    Ready(Arc<Pipeline>),
    Unavailable { reason: String },
}

/// What a request or metadata call names: a model or a pipeline (served alike).
#[derive(Clone, Copy)]
pub enum Endpoint<'a> {
    Model(&'a Arc<LoadedModel>),
    Pipeline(&'a Arc<Pipeline>),
}

pub struct Engine {
    // Pipelines hold the models and pools they use: declared first, dropped first.
    pipelines: BTreeMap<String, PipelineSlot>,
    models: BTreeMap<String, ModelSlot>,
    pools: HashMap<String, Arc<CpuPool>>,
    pub metrics: Metrics,
}

/// The signatures a pipeline compiles against: the engine's loaded models.
struct Loaded<'a> {
    models: &'a BTreeMap<String, ModelSlot>,
    pools: Vec<String>,
}

impl Catalog for Loaded<'_> {
    fn model(&self, name: &str) -> Option<Result<ModelSig, String>> {
        self.models.get(name).map(|slot| match slot {
            ModelSlot::Ready(m) => Ok(m.spec.signature()),
            ModelSlot::Unavailable { reason } => Err(reason.clone()),
        })
    }
    fn pools(&self) -> Vec<String> {
        self.pools.clone()
    }
}

impl Engine {
    /// Loads every model of the repository. A model that fails is kept as unavailable,
    /// with its reason, and the others still load.
    pub fn load(cfg: &EngineConfig, metrics: Metrics) -> Result<Engine, String> {
        let mut models = BTreeMap::new();
        for (name, spec) in repository::scan(&cfg.models_dir)? {
            let slot = match spec.and_then(|spec| load_model(spec, &cfg.ort_dylib, &metrics)) {
                Ok(m) => {
                    tracing::info!(model = %name, devices = ?m.devices, "model ready");
                    metrics.model_loads.with_label_values(&[&name, "ok"]).inc();
                    ModelSlot::Ready(Arc::new(m))
                }
                Err(reason) => {
                    tracing::error!(model = %name, "model failed to load: {reason}");
                    metrics.model_loads.with_label_values(&[&name, "error"]).inc();
                    ModelSlot::Unavailable { reason }
                }
            };
            models.insert(name, slot);
        }
        let mut pools = HashMap::new();
        for p in &cfg.pools {
            pools.insert(p.name.clone(), Arc::new(CpuPool::start(p.clone(), &metrics)));
        }
        let mut pipelines = BTreeMap::new();
        if let Some(dir) = &cfg.pipelines_dir {
            let catalog = Loaded { models: &models, pools: cfg.pools.iter().map(|p| p.name.clone()).collect() };
            for (name, file) in pipeline::list_files(dir)? {
                let slot = if models.contains_key(&name) {
                    Err(format!("{}: a model is named '{name}' too; rename one of them", file.display()))
                } else {
                    std::fs::read_to_string(&file)
                        .map_err(|e| format!("{}: {e}", file.display()))
                        .and_then(|text| pipeline::compile(&name, &file, &text, &catalog).map_err(|e| e.to_string()))
                        .and_then(|plan| Pipeline::bind(plan, &models, &pools, &metrics))
                };
                let slot = match slot {
                    Ok(p) => {
                        for w in &p.plan.warnings {
                            tracing::warn!("{}", pipeline::compile::Located(&file, w));
                        }
                        tracing::info!(pipeline = %name, nodes = p.plan.nodes.len(), "pipeline ready");
                        PipelineSlot::Ready(Arc::new(p))
                    }
                    Err(reason) => {
                        tracing::error!(pipeline = %name, "pipeline failed to load:\n{reason}");
                        PipelineSlot::Unavailable { reason }
                    }
                };
                pipelines.insert(name, slot);
            }
        }
        Ok(Engine { pipelines, models, pools, metrics })
    }

    /// Every pipeline, ready or not, sorted by name.
    pub fn pipelines(&self) -> impl Iterator<Item = (&str, &PipelineSlot)> {
        self.pipelines.iter().map(|(n, s)| (n.as_str(), s))
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<CpuPool>> {
        self.pools.get(name)
    }

    /// A ready model or pipeline by name and version ("" for the default).
    pub fn endpoint(&self, name: &str, version: &str) -> Result<Endpoint<'_>, Error> {
        match self.pipelines.get(name) {
            None => self.model(name, version).map(Endpoint::Model),
            Some(_) if !version.is_empty() && version != DEFAULT_VERSION => {
                Err(Error::ModelNotFound { model: name.to_string(), version: Some(version.to_string()) })
            }
            Some(PipelineSlot::Ready(p)) => Ok(Endpoint::Pipeline(p)),
            Some(PipelineSlot::Unavailable { reason }) => {
                Err(Error::ModelNotReady { model: name.to_string(), reason: reason.clone() })
            }
        }
    }

    /// Every model of the repository, ready or not, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelSlot)> {
        self.models.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// The server is ready when every model in the repository is.
    pub fn ready(&self) -> bool {
        self.models.values().all(|s| matches!(s, ModelSlot::Ready(_)))
            && self.pipelines.values().all(|s| matches!(s, PipelineSlot::Ready(_)))
    }

    /// A ready model by name and version ("" for the default).
    pub fn model(&self, name: &str, version: &str) -> Result<&Arc<LoadedModel>, Error> {
        let not_found = || Error::ModelNotFound {
            model: name.to_string(),
            version: (!version.is_empty()).then(|| version.to_string()),
        };
        if !version.is_empty() && version != DEFAULT_VERSION {
            return Err(not_found());
        }
        match self.models.get(name) {
            Some(ModelSlot::Ready(m)) => Ok(m),
            Some(ModelSlot::Unavailable { reason }) => {
                Err(Error::ModelNotReady { model: name.to_string(), reason: reason.clone() })
            }
            None => Err(not_found()),
        }
    }

    /// Counts a request for `model` that was malformed on the wire and never reached it,
    /// so statistics and metrics see every failure. Unknown models are not counted: their
    /// names come from clients and would make unbounded metric labels.
    pub fn record_rejected(&self, model: &str, version: &str, e: &Error) {
        let (stats, metrics) = match self.endpoint(model, version) {
            Ok(Endpoint::Model(m)) => (&m.stats, &m.metrics),
            Ok(Endpoint::Pipeline(p)) => (&p.stats, &p.metrics),
            Err(_) => return,
        };
        stats.record_request(false, Duration::ZERO);
        metrics.requests.inc();
        metrics.failure(e.error_type());
    }

    /// Runs one inference request through the model's batcher.
    pub async fn infer(&self, req: InferRequest, deadline: Option<Instant>) -> Result<InferResponse, Error> {
        let model = match self.endpoint(&req.model_name, &req.model_version)? {
            Endpoint::Pipeline(p) => return p.clone().infer(req, deadline).await,
            Endpoint::Model(m) => m.clone(),
        };
        let start = Instant::now();
        let result = run(&model, req, deadline).await;
        let elapsed = start.elapsed();
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
    let resp = InferResponse {
        model_name: spec.name.clone(),
        model_version: DEFAULT_VERSION.to_string(),
        id: req.id,
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

fn load_model(spec: ModelSpec, ort_dylib: &Path, metrics: &Metrics) -> Result<LoadedModel, String> {
    let cfg = &spec.config;
    let mut instances: Vec<Box<dyn Backend>> = Vec::with_capacity(cfg.instances);
    let mut devices = Vec::with_capacity(cfg.instances);
    for _ in 0..cfg.instances {
        let mut b = backend::ort::load(ort_dylib, &spec.onnx_path, cfg, &spec.inputs, &spec.outputs)?;
        warm_up(&spec, &mut b)?;
        devices.push(b.device());
        instances.push(Box::new(b));
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
