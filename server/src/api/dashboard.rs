//! The live dashboard: `/dashboard` (one page embedded in the binary), `/dashboard/data`
//! (the current frame as JSON) and `/dashboard/events` (a frame every second as
//! server-sent events).
//!
//! A frame has, per model and pipeline, the totals (the same counters as /metrics), the
//! request rate, error rate and latency percentiles over the last [`WINDOW_S`] seconds,
//! and per pipeline node its queue, in-flight items, batch size and busy fraction, with
//! the graph's edges so the page can draw it. Latencies come from per-second HDR
//! histograms; rates from cumulative counters sampled once a second.

use crate::engine::{Engine, ModelSlot, PipelineSlot, Servable};
use crate::pipeline::compile::{Choice, NodeKind, Plan, Src};
use crate::telemetry::live::WINDOW_S;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// The page: plain HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere.
pub const PAGE: &str = include_str!("dashboard.html");

/// The dashboard's data now.
pub fn frame(engine: &Engine) -> Value {
    let live = &engine.telemetry().live;
    let snapshot = engine.snapshot();
    let now = snapshot.counters();
    let base = live.baseline();
    let dt = base.as_ref().map_or(0.0, |(at, _)| at.elapsed().as_secs_f64());
    // Per-second rate of a counter over the window (0 until there is a baseline).
    let rate = |k: &str| match &base {
        Some((_, old)) if dt > 0.2 => (now.get(k).copied().unwrap_or(0.0) - old.get(k).copied().unwrap_or(0.0)) / dt,
        _ => 0.0,
    };
    // Mean of a histogram's recent observations: delta sum / delta count.
    let mean = |k: &str, sum: &str, count: &str| {
        let n = rate(&format!("{k}/{count}"));
        (n > 0.0).then(|| rate(&format!("{k}/{sum}")) / n)
    };
    let endpoint = |name: &str, kind: &str, e: Servable| {
        let sinks = e.sinks();
        let (stats, metrics) = (sinks.stats, sinks.metrics);
        let (rps, error_rate, pct) = live.summary(name);
        json!({
            "name": name,
            "kind": kind,
            "requests_total": metrics.requests.get(),
            "failures_total": stats.fail.get().0,
            "rps": rps,
            "error_rate": error_rate,
            "p50_ms": pct.map(|p| p[0]),
            "p90_ms": pct.map(|p| p[1]),
            "p99_ms": pct.map(|p| p[2]),
        })
    };

    let mut models = Vec::new();
    for (name, e) in snapshot.models() {
        let Some(m) = e.ready(None) else { continue };
        let mut v = endpoint(name, "model", Servable::Model(m.clone()));
        let k = format!("model/{name}");
        v["version"] = json!(m.spec.version);
        v["versions"] = json!(e
            .versions
            .iter()
            .filter(|(_, s)| matches!(s, ModelSlot::Ready { .. }))
            .map(|(v, _)| *v)
            .collect::<Vec<_>>());
        v["instances"] = json!(m.devices.len());
        if let Some(r) = &m.remote {
            v["endpoints"] = json!(r
                .endpoints()
                .into_iter()
                .map(|(addr, ejected, in_flight)| json!({"addr": addr, "ejected": ejected, "in_flight": in_flight}))
                .collect::<Vec<_>>());
        }
        v["devices"] = json!(m.devices);
        v["queue_depth"] = json!(m.metrics.queue_depth.get());
        v["busy"] = json!(rate(&format!("{k}/busy")) / m.devices.len().max(1) as f64);
        v["batch_size"] = json!(mean(&k, "rows", "executions"));
        models.push(v);
    }

    let mut pipelines = Vec::new();
    for (name, s) in snapshot.pipelines() {
        let PipelineSlot::Ready { pipeline, .. } = s else { continue };
        let mut v = endpoint(name, "pipeline", Servable::Pipeline(pipeline.clone()));
        let plan = &pipeline.plan;
        let depth = columns(plan);
        let nodes: Vec<Value> = pipeline
            .nodes()
            .enumerate()
            .map(|(i, nv)| {
                let n = nv.node;
                let k = format!("node/{name}/{}", n.name);
                let src_key = |s: &Src| match s {
                    Src::Node { node, .. } => Some(plan.nodes[*node].name.clone()),
                    Src::Input(i) => Some(format!("input:{}", plan.inputs[*i].name)),
                    Src::Param(_) => None,
                };
                let inputs: Vec<String> = n.inputs.iter().filter_map(src_key).collect();
                // What its condition and its route read: drawn as conditional edges.
                let conditions: Vec<String> = n.reads().skip(n.inputs.len()).filter_map(src_key).collect();
                let branches: Vec<Value> = nv
                    .branches
                    .iter()
                    .map(|(label, _, m)| {
                        json!({
                            "label": label,
                            "items_total": m.items.get(),
                            "items_per_s": rate(&format!("{k}/branch/{label}")),
                            "failures_total": m.failures.get(),
                        })
                    })
                    .collect();
                let kind = match &n.kind {
                    NodeKind::Op(_) => "op",
                    NodeKind::Model { .. } => "model",
                    NodeKind::Branches { choice: Choice::Route { .. }, .. } => "route",
                    NodeKind::Branches { choice: Choice::Split { .. }, .. } => "split",
                };
                let (queue_depth, busy) = match (nv.model, nv.pool) {
                    (Some(m), _) => (
                        m.metrics.queue_depth.get() as f64,
                        rate(&format!("model/{}/busy", m.spec.name)) / m.devices.len().max(1) as f64,
                    ),
                    (None, Some(p)) => {
                        (p.queued() as f64, rate(&format!("{k}/compute_sum")) / p.config.threads.max(1) as f64)
                    }
                    (None, None) => (0.0, 0.0),
                };
                json!({
                    "name": n.name,
                    "kind": kind,
                    "what": n.what,
                    "conditions": conditions,
                    "when": n.when.as_ref().map(|w| w.text.clone()),
                    "may_skip": n.may_skip,
                    "skipped_total": nv.metrics.skipped.get(),
                    "skipped_per_s": rate(&format!("{k}/skipped")),
                    "branches": branches,
                    "pool": nv.pool.map(|p| p.config.name.clone()),
                    "mapped": n.mapped,
                    "inputs": inputs,
                    "depth": depth[i],
                    "items_total": nv.metrics.items.get(),
                    "items_per_s": rate(&format!("{k}/items")),
                    "in_flight": nv.metrics.in_flight.get(),
                    "queue_depth": queue_depth,
                    "queue_ms": mean(&k, "queue_sum", "queue_count").map(|s| s * 1000.0),
                    "compute_ms": mean(&k, "compute_sum", "queue_count").map(|s| s * 1000.0),
                    "batch_size": mean(&k, "batch_sum", "batch_count"),
                    "busy": busy,
                })
            })
            .collect();
        v["inputs"] = json!(plan.inputs.iter().map(|i| i.name.clone()).collect::<Vec<_>>());
        v["outputs"] = json!(plan
            .outputs
            .iter()
            .map(|o| json!({
                "name": o.name,
                "from": match o.src {
                    Src::Node { node, .. } => plan.nodes[node].name.clone(),
                    Src::Input(i) => format!("input:{}", plan.inputs[i].name),
                    Src::Param(p) => format!("parameter:{}", plan.params[p].name),
                },
            }))
            .collect::<Vec<_>>());
        v["nodes"] = Value::Array(nodes);
        pipelines.push(v);
    }

    let pools: Vec<Value> = engine
        .pools()
        .into_iter()
        .map(|(n, p)| json!({"name": n, "threads": p.config.threads, "queue_depth": p.queued()}))
        .collect();
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    json!({
        "time_ms": unix_ms,
        "window_s": WINDOW_S,
        "rate_window_s": dt,
        "models": models,
        "pipelines": pipelines,
        "pools": pools,
        "gpus": engine.telemetry().gpu_samples(),
    })
}

/// Columns for drawing: a node sits one right of the deepest node it reads from. One
/// pass, as the plan's nodes are in topological order.
fn columns(plan: &Plan) -> Vec<usize> {
    let mut depth = vec![0usize; plan.nodes.len()];
    for (i, n) in plan.nodes.iter().enumerate() {
        depth[i] = n
            .reads()
            .filter_map(|s| match s {
                Src::Node { node, .. } => Some(depth[*node] + 1),
                Src::Input(_) | Src::Param(_) => None,
            })
            .max()
            .unwrap_or(1);
    }
    depth
}
