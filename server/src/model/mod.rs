//! A loaded model version: its instances (one backend each) behind one batching
//! scheduler, how it is loaded and warmed up, and how a request to it runs.

pub mod check;

/// The most a warm-up input may take: a file must not make a load allocate without bound.
const MAX_WARMUP_BYTES: usize = 1 << 30;

use crate::backend::{self, Backend};
use crate::error::Error;
use crate::repository::{
    model_yaml::{BackendKind, Hold, Warmup},
    ModelSpec,
};
use crate::request::{InferRequest, InferResponse, NamedTensor, Origin, StepTiming};
use crate::sched::{queue::BatchPolicy, Computed, ItemLimits, ModelScheduler, Reply};
use crate::telemetry::metrics::{Metrics, ModelMetrics};
use crate::telemetry::stats::ModelStats;
use sluice_ops::tensor::Dims;
use sluice_ops::{DataType, Tensor};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub struct LoadedModel {
    pub spec: ModelSpec,
    pub metrics: ModelMetrics,
    pub stats: Arc<ModelStats>,
    /// What each instance runs on ("cpu", "cuda:0").
    pub devices: Vec<String>,
    /// `backend: remote`: its endpoints, for views.
    pub remote: Option<Arc<backend::remote::Remote>>,
    scheduler: ModelScheduler,
}

/// Why a model version did not load.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// ONNX Runtime (or another backend) refused the model or its settings.
    #[error("{0}")]
    Backend(String),
    #[error("warm-up: {0}")]
    WarmupInput(String),
    #[error("warm-up with batch size {batch_size} failed: {message}")]
    Warmup { batch_size: usize, message: String },
    /// The operating system refused a thread (an instance's, or the load's own).
    #[error("cannot start thread '{thread}': {message}")]
    Thread { thread: String, message: String },
    #[error("loading panicked: {0}")]
    Panicked(String),
}

impl LoadedModel {
    /// Loads every instance of `spec` (per GPU for GPU providers), warms each up, and
    /// starts the model's batcher and instance threads.
    pub fn load(spec: ModelSpec, ort_dylib: &Path, metrics: &Metrics) -> Result<LoadedModel, LoadError> {
        let cfg = &spec.config;
        let mut instances: Vec<Box<dyn Backend>> = Vec::with_capacity(cfg.instances);
        let mut devices = Vec::with_capacity(cfg.instances);
        let mut remote_of = None;
        match cfg.backend {
            BackendKind::Onnxruntime => {
                // `instances` per GPU for GPU providers; CPU models have one "device".
                let gpus = if cfg.wants_gpu() { cfg.devices() } else { vec![0] };
                let source =
                    backend::ort::ModelSource::prepare(ort_dylib, &spec.onnx_path, cfg).map_err(LoadError::Backend)?;
                for &gpu in &gpus {
                    for _ in 0..cfg.instances {
                        let mut b = backend::ort::load(ort_dylib, &source, cfg, gpu, &spec.inputs, &spec.outputs)
                            .map_err(LoadError::Backend)?;
                        warm_up(&spec, &mut b)?;
                        devices.push(b.device());
                        instances.push(Box::new(b));
                    }
                    if devices.iter().all(|d| d == "cpu") {
                        break; // fell back to CPU: `instances` in all, not per listed GPU
                    }
                }
            }
            #[cfg(feature = "tract")]
            BackendKind::Tract => {
                // Planned once; the instances share the plans (and the weights).
                let model = backend::tract::TractModel::load(&spec.onnx_path, cfg, &spec.inputs, &spec.outputs)
                    .map_err(LoadError::Backend)?;
                for _ in 0..cfg.instances {
                    let mut b = model.instance().map_err(LoadError::Backend)?;
                    warm_up(&spec, &mut b)?;
                    devices.push(b.device());
                    instances.push(Box::new(b));
                }
            }
            BackendKind::Remote => {
                let r = spec.config.remote.as_ref().ok_or_else(|| LoadError::Backend("no `remote:`".into()))?;
                let remote = backend::remote::Remote::start(&spec.name, r, &spec.outputs, Some(metrics))
                    .map_err(LoadError::Backend)?;
                for _ in 0..cfg.instances {
                    let mut b = backend::remote::RemoteInstance::new(remote.clone(), &spec.inputs)
                        .map_err(LoadError::Backend)?;
                    warm_up(&spec, &mut b)?;
                    devices.push(b.device());
                    instances.push(Box::new(b));
                }
                remote_of = Some(remote);
            }
            #[cfg(not(feature = "tract"))]
            BackendKind::Tract => {
                return Err(LoadError::Backend(format!(
                    "{}: backend: tract, but this sluice was built without tract (cargo build --features tract)",
                    spec.dir.join("model.yaml").display()
                )))
            }
        }
        let stats = Arc::new(ModelStats::default());
        let policy = BatchPolicy {
            max_batch_size: cfg.max_batch_size,
            max_queue_delay: Duration::from_micros(cfg.dynamic_batching.max_queue_delay_us),
            preferred: cfg.dynamic_batching.preferred_batch_sizes.clone(),
            max_queue_size: cfg.max_queue_size,
            adaptive: cfg.dynamic_batching.hold == Hold::Adaptive,
        };
        let model_metrics = metrics.for_model(&spec.name);
        let allowed = cfg.dynamic_batching.allowed_batch_sizes.clone();
        let outputs = spec.outputs.iter().map(|o| o.name.clone()).collect();
        let instances: Vec<_> =
            instances.into_iter().enumerate().map(|(i, b)| (b, metrics.for_instance(&spec.name, i))).collect();
        let count = instances.len();
        let scheduler = ModelScheduler::start(
            &spec.name,
            instances,
            policy,
            allowed,
            outputs,
            stats.clone(),
            model_metrics.clone(),
        )
        .map_err(|(thread, e)| LoadError::Thread { thread, message: e.to_string() })?;
        metrics.instances.with_label_values(&[&spec.name]).set(count as i64);
        Ok(LoadedModel { spec, metrics: model_metrics, stats, devices, remote: remote_of, scheduler })
    }

    /// Queues already checked tensors (in the model's input order) for a batch, with
    /// the item's own batching limits (a pipeline node's overrides).
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Option<Instant>,
        limits: ItemLimits,
        origin: Arc<Origin>,
    ) -> Result<oneshot::Receiver<Reply>, Error> {
        self.scheduler.submit_with(inputs, rows, deadline, limits, origin)
    }

    /// What a request gets when the instance that held its batch went away.
    pub fn stopped(&self) -> Error {
        Error::Internal(format!("model '{}': instance stopped", self.spec.name))
    }

    /// Runs one request through the batcher; returns the response and the backend time
    /// of its batch.
    pub async fn infer(
        &self,
        req: InferRequest,
        deadline: Option<Instant>,
    ) -> Result<(InferResponse, Duration), Error> {
        let spec = &self.spec;
        let origin = req.origin();
        let (inputs, rows) = check::model_inputs(spec, req.inputs)?;
        let wanted =
            check::select_outputs(&spec.name, "model", spec.outputs.iter().map(|o| o.name.as_str()), &req.outputs)?;
        let rx = self.scheduler.submit_with(inputs, rows, deadline, ItemLimits::default(), origin)?;
        let reply = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), rx)
                .await
                .map_err(|_| Error::DeadlineExceeded { model: spec.name.clone() })?,
            None => rx.await,
        };
        let computed: Computed = reply.map_err(|_| self.stopped())??;
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
}

/// Runs the model.yaml's warm-up batches (zero-filled) on one instance.
fn warm_up(spec: &ModelSpec, backend: &mut dyn Backend) -> Result<(), LoadError> {
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
                            _ => Err(LoadError::WarmupInput(format!(
                                "input '{}' has variable dims {}; give its full shape under warmup[].shapes",
                                info.name,
                                Dims(&info.dims)
                            ))),
                        })
                        .collect::<Result<_, _>>()?,
                };
                let size = info.dtype.size().ok_or_else(|| {
                    LoadError::WarmupInput(format!(
                        "input '{}' is {}, which cannot be zero-filled",
                        info.name,
                        DataType::Bytes
                    ))
                })?;
                // Sizes come from a file: checked, and bounded, before anything is allocated.
                let bytes = shape
                    .iter()
                    .try_fold(size, |acc, &d| acc.checked_mul(d))
                    .filter(|&b| b <= MAX_WARMUP_BYTES)
                    .ok_or_else(|| {
                        LoadError::WarmupInput(format!(
                            "input '{}' of shape {shape:?} would take over {} MiB to warm up",
                            info.name,
                            MAX_WARMUP_BYTES >> 20
                        ))
                    })?;
                let data = sluice_ops::memory::try_zeroed(bytes).map_err(|e| LoadError::WarmupInput(e.to_string()))?;
                Ok(Tensor { dtype: info.dtype, shape, data: data.into() })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        backend.run(&inputs).map_err(|e| LoadError::Warmup { batch_size: w.batch_size, message: e.to_string() })?;
    }
    Ok(())
}
