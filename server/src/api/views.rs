//! What the metadata, config, statistics and index endpoints report, built once from the
//! engine in protocol types; HTTP renders the same values as JSON.

use crate::engine::{ModelSlot, PipelineSlot, Servable, Snapshot};
use crate::model::LoadedModel;
use crate::pipeline::exec::Pipeline;
use crate::request::DEFAULT_VERSION;
use serde_json::{json, Value};
use sluice_ops::DataType;
use sluice_proto as pb;
use std::sync::atomic::Ordering::Relaxed;

pub const SERVER_NAME: &str = "sluice";
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Only what is implemented in full.
pub const EXTENSIONS: &[&str] = &["model_configuration", "model_repository", "statistics", "binary_tensor_data"];
/// Pipelines are served as models of this platform (not Triton's "ensemble", which makes
/// clients such as perf_analyzer look for ensemble steps in the config).
pub const PIPELINE_PLATFORM: &str = "sluice_pipeline";

/// Metadata of what `e` names; a model's lists every version the snapshot serves.
pub fn metadata(snapshot: &Snapshot, e: &Servable) -> pb::ModelMetadataResponse {
    match e {
        Servable::Model(m) => {
            let mut md = model_metadata(m);
            if let Some((_, entry)) = snapshot.models().find(|(n, _)| *n == m.spec.name) {
                md.versions = entry
                    .versions
                    .iter()
                    .filter(|(_, s)| matches!(s, ModelSlot::Ready { .. }))
                    .map(|(v, _)| v.to_string())
                    .collect();
            }
            md
        }
        Servable::Pipeline(p) => pipeline_metadata(p),
    }
}

pub fn config(e: &Servable) -> pb::ModelConfig {
    match e {
        Servable::Model(m) => model_config(m),
        Servable::Pipeline(p) => pipeline_config(p),
    }
}

/// A pipeline's full shapes: its item dims, after -1 for the item count when batched.
fn pipeline_dims(p: &Pipeline, item: &[i64]) -> Vec<i64> {
    let batch = (p.plan.max_batch_size > 0).then_some(-1);
    batch.into_iter().chain(item.iter().copied()).collect()
}

fn pipeline_metadata(p: &Pipeline) -> pb::ModelMetadataResponse {
    let plan = &p.plan;
    let t = |name: &str, dtype: DataType, dims: &[i64]| pb::model_metadata_response::TensorMetadata {
        name: name.to_string(),
        datatype: dtype.as_str().to_string(),
        shape: pipeline_dims(p, dims),
    };
    pb::ModelMetadataResponse {
        name: plan.name.clone(),
        versions: vec![DEFAULT_VERSION.to_string()],
        platform: PIPELINE_PLATFORM.to_string(),
        inputs: plan.inputs.iter().map(|i| t(&i.name, i.dtype, &i.dims)).collect(),
        outputs: plan.outputs.iter().map(|o| t(&o.name, o.dtype, &o.dims)).collect(),
    }
}

fn pipeline_config(p: &Pipeline) -> pb::ModelConfig {
    let plan = &p.plan;
    pb::ModelConfig {
        name: plan.name.clone(),
        platform: PIPELINE_PLATFORM.to_string(),
        backend: "sluice".to_string(),
        max_batch_size: plan.max_batch_size as i32,
        input: plan
            .inputs
            .iter()
            .map(|i| pb::ModelInput {
                name: i.name.clone(),
                data_type: config_type(i.dtype) as i32,
                dims: i.dims.clone(),
            })
            .collect(),
        output: plan
            .outputs
            .iter()
            .map(|o| pb::ModelOutput {
                name: o.name.clone(),
                data_type: config_type(o.dtype) as i32,
                dims: o.dims.clone(),
            })
            .collect(),
        ..Default::default()
    }
}

pub fn model_metadata(m: &LoadedModel) -> pb::ModelMetadataResponse {
    let t = |t: &crate::onnx::signature::TensorInfo| pb::model_metadata_response::TensorMetadata {
        name: t.name.clone(),
        datatype: t.dtype.as_str().to_string(),
        shape: t.dims.clone(),
    };
    pb::ModelMetadataResponse {
        name: m.spec.name.clone(),
        versions: vec![m.spec.version.to_string()],
        platform: m.spec.config.backend.platform().to_string(),
        inputs: m.spec.inputs.iter().map(t).collect(),
        outputs: m.spec.outputs.iter().map(t).collect(),
    }
}

pub fn metadata_json(md: &pb::ModelMetadataResponse) -> Value {
    let t = |ts: &[pb::model_metadata_response::TensorMetadata]| -> Vec<Value> {
        ts.iter().map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape})).collect()
    };
    json!({
        "name": md.name,
        "versions": md.versions,
        "platform": md.platform,
        "inputs": t(&md.inputs),
        "outputs": t(&md.outputs),
    })
}

fn config_type(d: DataType) -> pb::DataType {
    match d {
        DataType::Bool => pb::DataType::TypeBool,
        DataType::U8 => pb::DataType::TypeUint8,
        DataType::U16 => pb::DataType::TypeUint16,
        DataType::U32 => pb::DataType::TypeUint32,
        DataType::U64 => pb::DataType::TypeUint64,
        DataType::I8 => pb::DataType::TypeInt8,
        DataType::I16 => pb::DataType::TypeInt16,
        DataType::I32 => pb::DataType::TypeInt32,
        DataType::I64 => pb::DataType::TypeInt64,
        DataType::F16 => pb::DataType::TypeFp16,
        DataType::BF16 => pb::DataType::TypeBf16,
        DataType::F32 => pb::DataType::TypeFp32,
        DataType::F64 => pb::DataType::TypeFp64,
        DataType::Bytes => pb::DataType::TypeString,
    }
}

/// The model's configuration in Triton's shape: with batching on, dims leave out the
/// batch dimension, as clients such as perf_analyzer expect.
pub fn model_config(m: &LoadedModel) -> pb::ModelConfig {
    let cfg = &m.spec.config;
    let skip = usize::from(cfg.max_batch_size > 0);
    let dims = |d: &[i64]| d.iter().skip(skip).copied().collect::<Vec<_>>();
    // Where the instances actually run (a GPU provider may have fallen back to CPU).
    let gpu = m.devices.iter().any(|d| d != "cpu");
    pb::ModelConfig {
        name: m.spec.name.clone(),
        platform: cfg.backend.platform().to_string(),
        backend: cfg.backend.as_str().to_string(),
        max_batch_size: cfg.max_batch_size as i32,
        input: m
            .spec
            .inputs
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: config_type(t.dtype) as i32,
                dims: dims(&t.dims),
            })
            .collect(),
        output: m
            .spec
            .outputs
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: config_type(t.dtype) as i32,
                dims: dims(&t.dims),
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: m.spec.name.clone(),
            count: cfg.instances as i32,
            gpus: if gpu { cfg.devices() } else { vec![] },
            kind: if gpu { pb::model_instance_group::Kind::Gpu } else { pb::model_instance_group::Kind::Cpu } as i32,
        }],
        default_model_filename: "model.onnx".to_string(),
        scheduling_choice: (cfg.max_batch_size > 0).then(|| {
            pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
                preferred_batch_size: cfg.dynamic_batching.preferred_batch_sizes.iter().map(|&s| s as i32).collect(),
                max_queue_delay_microseconds: cfg.dynamic_batching.max_queue_delay_us,
                preserve_ordering: false,
                default_queue_policy: Some(pb::ModelQueuePolicy { max_queue_size: cfg.max_queue_size as u32 }),
            })
        }),
    }
}

fn type_name(code: i32) -> &'static str {
    pb::DataType::try_from(code).map_or("TYPE_INVALID", |t| t.as_str_name())
}

/// The config as Triton's HTTP endpoint renders it (protobuf JSON field names).
pub fn config_json(c: &pb::ModelConfig) -> Value {
    let io = |name: &str, code: i32, dims: &[i64]| json!({"name": name, "data_type": type_name(code), "dims": dims});
    let mut v = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| io(&i.name, i.data_type, &i.dims)).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| io(&o.name, o.data_type, &o.dims)).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| json!({
            "name": g.name,
            "count": g.count,
            "gpus": g.gpus,
            "kind": pb::model_instance_group::Kind::try_from(g.kind).map_or("KIND_AUTO", |k| k.as_str_name()),
        })).collect::<Vec<_>>(),
        "default_model_filename": c.default_model_filename,
    });
    if let Some(pb::model_config::SchedulingChoice::DynamicBatching(db)) = &c.scheduling_choice {
        v["dynamic_batching"] = json!({
            "preferred_batch_size": db.preferred_batch_size,
            "max_queue_delay_microseconds": db.max_queue_delay_microseconds,
            "preserve_ordering": db.preserve_ordering,
            "default_queue_policy": {"max_queue_size": db.default_queue_policy.as_ref().map_or(0, |p| p.max_queue_size)},
        });
    }
    v
}

fn duration(d: &crate::telemetry::stats::Duration64) -> pb::StatisticDuration {
    let (count, ns) = d.get();
    pb::StatisticDuration { count, ns }
}

pub fn statistics_of(e: &Servable) -> pb::ModelStatistics {
    match e {
        Servable::Model(m) => model_statistics(&m.spec.name, &m.spec.version.to_string(), &m.stats),
        Servable::Pipeline(p) => model_statistics(&p.plan.name, DEFAULT_VERSION, &p.stats),
    }
}

pub fn model_statistics(name: &str, version: &str, s: &crate::telemetry::stats::ModelStats) -> pb::ModelStatistics {
    pb::ModelStatistics {
        name: name.to_string(),
        version: version.to_string(),
        last_inference: s.last_inference_ms.load(Relaxed),
        inference_count: s.inference_count.load(Relaxed),
        execution_count: s.execution_count.load(Relaxed),
        inference_stats: Some(pb::InferStatistics {
            success: Some(duration(&s.success)),
            fail: Some(duration(&s.fail)),
            queue: Some(duration(&s.queue)),
            compute_input: Some(duration(&s.compute_input)),
            compute_infer: Some(duration(&s.compute_infer)),
            compute_output: Some(duration(&s.compute_output)),
            cache_hit: Some(pb::StatisticDuration::default()),
            cache_miss: Some(pb::StatisticDuration::default()),
        }),
        batch_stats: s
            .batches
            .lock()
            .iter()
            .map(|(&size, b)| pb::InferBatchStatistics {
                batch_size: size as u64,
                compute_input: Some(pb::StatisticDuration { count: b.count, ns: b.input_ns }),
                compute_infer: Some(pb::StatisticDuration { count: b.count, ns: b.infer_ns }),
                compute_output: Some(pb::StatisticDuration { count: b.count, ns: b.output_ns }),
            })
            .collect(),
    }
}

pub fn statistics_json(stats: &[pb::ModelStatistics]) -> Value {
    let d = |d: &Option<pb::StatisticDuration>| {
        let d = d.unwrap_or_default();
        json!({"count": d.count, "ns": d.ns})
    };
    let models: Vec<Value> = stats
        .iter()
        .map(|s| {
            let i = s.inference_stats.unwrap_or_default();
            json!({
                "name": s.name,
                "version": s.version,
                "last_inference": s.last_inference,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": d(&i.success), "fail": d(&i.fail), "queue": d(&i.queue),
                    "compute_input": d(&i.compute_input), "compute_infer": d(&i.compute_infer),
                    "compute_output": d(&i.compute_output), "cache_hit": d(&i.cache_hit),
                    "cache_miss": d(&i.cache_miss),
                },
                "batch_stats": s.batch_stats.iter().map(|b| json!({
                    "batch_size": b.batch_size,
                    "compute_input": d(&b.compute_input),
                    "compute_infer": d(&b.compute_infer),
                    "compute_output": d(&b.compute_output),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "model_stats": models })
}

/// Statistics for one model, or for every ready model version and pipeline when `name`
/// is empty.
pub fn statistics(
    snapshot: &Snapshot,
    name: &str,
    version: &str,
) -> Result<Vec<pb::ModelStatistics>, crate::error::Error> {
    if name.is_empty() {
        let models = snapshot.models().flat_map(|(_, e)| {
            e.versions.values().filter_map(|s| match s {
                ModelSlot::Ready { model, .. } => Some(statistics_of(&Servable::Model(model.clone()))),
                ModelSlot::Unavailable(_) => None,
            })
        });
        let pipelines = snapshot.pipelines().filter_map(|(_, s)| match s {
            PipelineSlot::Ready { pipeline, .. } => Some(statistics_of(&Servable::Pipeline(pipeline.clone()))),
            PipelineSlot::Unavailable { .. } => None,
        });
        let mut all: Vec<_> = models.chain(pipelines).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        return Ok(all);
    }
    Ok(vec![statistics_of(&snapshot.servable(name, version)?)])
}

/// One row per model version and pipeline, sorted by name: READY (with a reason when
/// newer files on disk failed and the loaded version keeps serving) or UNAVAILABLE with
/// the reason; names unloaded through the API are UNAVAILABLE, "unloaded".
pub fn repository_index(snapshot: &Snapshot, ready_only: bool) -> Vec<pb::repository_index_response::ModelIndex> {
    let row =
        |name: &str, version: String, ready: bool, reason: Option<&str>| pb::repository_index_response::ModelIndex {
            name: name.to_string(),
            version,
            state: if ready { "READY" } else { "UNAVAILABLE" }.to_string(),
            reason: reason.unwrap_or_default().to_string(),
        };
    let mut all = Vec::new();
    for (name, e) in snapshot.models() {
        let problem = e.problem.as_deref();
        if e.versions.is_empty() {
            all.push(row(name, String::new(), false, problem));
        }
        for (v, s) in &e.versions {
            all.push(match s {
                ModelSlot::Ready { stale, .. } => {
                    row(name, v.to_string(), true, stale.as_ref().map(|f| f.reason.as_str()).or(problem))
                }
                ModelSlot::Unavailable(f) => row(name, v.to_string(), false, Some(&f.reason)),
            });
        }
    }
    for (name, s) in snapshot.pipelines() {
        all.push(match s {
            PipelineSlot::Ready { stale, .. } => row(name, DEFAULT_VERSION.into(), true, stale.as_deref()),
            PipelineSlot::Unavailable { reason } => row(name, DEFAULT_VERSION.into(), false, Some(reason)),
        });
    }
    all.extend(snapshot.unloaded().map(|n| row(n, String::new(), false, Some("unloaded"))));
    all.retain(|m| !ready_only || m.state == "READY");
    // Versions in numeric order ("2" before "10").
    all.sort_by_cached_key(|m| (m.name.clone(), m.version.len(), m.version.clone()));
    all
}
