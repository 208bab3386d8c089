//! The live dashboard: `/dashboard` (one page embedded in the binary), `/dashboard/data`
//! (the current frame as JSON) and `/dashboard/events` (a frame every second as
//! server-sent events).
//!
//! A frame has, per model and pipeline, the totals (the same counters as /metrics), the
//! request rate, error rate and latency percentiles over the last [`WINDOW_S`] seconds,
//! and per pipeline node its queue, in-flight items, batch size and busy fraction, with
//! the graph's edges so the page can draw it. Latencies come from per-second HDR
//! histograms; rates from cumulative counters sampled once a second.

use crate::engine::{Endpoint, Engine, ModelSlot, PipelineSlot, Snapshot};
use crate::pipeline::compile::Src;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The sliding window, in seconds, for rates and percentiles.
pub const WINDOW_S: u64 = 10;

/// The page: plain HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere.
pub const PAGE: &str = include_str!("dashboard.html");

/// Latencies of the last seconds per model or pipeline, one histogram per second.
pub struct Live {
    start: Instant,
    windows: Mutex<HashMap<String, VecDeque<Second>>>,
    /// Cumulative counters once a second, for rates over the window.
    samples: Mutex<VecDeque<(Instant, HashMap<String, f64>)>>,
}

struct Second {
    at: u64,
    latency_us: Histogram<u64>,
    ok: u64,
    failed: u64,
}

impl Default for Live {
    fn default() -> Self {
        Live { start: Instant::now(), windows: Mutex::default(), samples: Mutex::default() }
    }
}

impl Live {
    /// Records one finished request of the model or pipeline `name`.
    pub fn record(&self, name: &str, latency: Duration, ok: bool) {
        let now = self.start.elapsed().as_secs();
        let mut windows = self.windows.lock();
        let seconds = match windows.get_mut(name) {
            Some(w) => w,
            None => windows.entry(name.to_string()).or_default(),
        };
        if seconds.back().is_none_or(|s| s.at != now) {
            while seconds.front().is_some_and(|s| s.at + WINDOW_S < now) {
                seconds.pop_front();
            }
            let h = Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds");
            seconds.push_back(Second { at: now, latency_us: h, ok: 0, failed: 0 });
        }
        let s = seconds.back_mut().expect("pushed above");
        s.latency_us.saturating_record(latency.as_micros().max(1) as u64);
        if ok {
            s.ok += 1;
        } else {
            s.failed += 1;
        }
    }

    /// (requests/s, error fraction, p50, p90, p99 ms) over the window: the last
    /// [`WINDOW_S`] whole seconds (the one under way would make the rate read low), or
    /// the first second itself while there is no whole one yet.
    fn summary(&self, name: &str) -> (f64, f64, Option<[f64; 3]>) {
        let up = self.start.elapsed();
        let now = up.as_secs();
        let (from, until, span) = match now {
            0 => (0, 1, up.as_secs_f64().max(0.001)),
            n => (n.saturating_sub(WINDOW_S), n, n.min(WINDOW_S) as f64),
        };
        let windows = self.windows.lock();
        let Some(seconds) = windows.get(name) else { return (0.0, 0.0, None) };
        let mut all = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds");
        let (mut ok, mut failed) = (0, 0);
        for s in seconds.iter().filter(|s| s.at >= from && s.at < until) {
            let _ = all.add(&s.latency_us);
            ok += s.ok;
            failed += s.failed;
        }
        drop(windows);
        let n = ok + failed;
        let error_rate = if n > 0 { failed as f64 / n as f64 } else { 0.0 };
        let pct = (!all.is_empty()).then(|| [0.5, 0.9, 0.99].map(|q| all.value_at_quantile(q) as f64 / 1000.0));
        (n as f64 / span, error_rate, pct)
    }

    /// Takes this second's sample of the cumulative counters (called once a second).
    pub fn sample(&self, snapshot: &Snapshot) {
        let now = Instant::now();
        let mut samples = self.samples.lock();
        samples.push_back((now, counters(snapshot)));
        while samples.len() > WINDOW_S as usize + 1 {
            samples.pop_front();
        }
    }

    /// The oldest sample in the window, to take rates against.
    fn baseline(&self) -> Option<(Instant, HashMap<String, f64>)> {
        self.samples.lock().front().cloned()
    }
}

/// Every cumulative counter a frame takes a rate of, by key.
fn counters(snapshot: &Snapshot) -> HashMap<String, f64> {
    let mut c = HashMap::new();
    for (name, e) in snapshot.models() {
        if let Some(m) = e.ready(None) {
            c.insert(format!("model/{name}/busy"), m.metrics.busy.get());
            c.insert(format!("model/{name}/executions"), m.stats.execution_count.load(Relaxed) as f64);
            c.insert(format!("model/{name}/rows"), m.stats.inference_count.load(Relaxed) as f64);
        }
    }
    for (name, s) in snapshot.pipelines() {
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
        }
    }
    c
}

/// The dashboard's data now.
pub fn frame(engine: &Engine, live: &Live) -> Value {
    let snapshot = engine.snapshot();
    let now = counters(&snapshot);
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
    let endpoint = |name: &str, kind: &str, e: Endpoint| {
        let (stats, metrics) = match e {
            Endpoint::Model(m) => (&m.stats, &m.metrics),
            Endpoint::Pipeline(p) => (&p.stats, &p.metrics),
        };
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
        let mut v = endpoint(name, "model", Endpoint::Model(m));
        let k = format!("model/{name}");
        v["version"] = json!(m.spec.version);
        v["versions"] = json!(e
            .versions
            .iter()
            .filter(|(_, s)| matches!(s, ModelSlot::Ready { .. }))
            .map(|(v, _)| *v)
            .collect::<Vec<_>>());
        v["instances"] = json!(m.devices.len());
        v["devices"] = json!(m.devices);
        v["queue_depth"] = json!(m.metrics.queue_depth.get());
        v["busy"] = json!(rate(&format!("{k}/busy")) / m.devices.len().max(1) as f64);
        v["batch_size"] = json!(mean(&k, "rows", "executions"));
        models.push(v);
    }

    let mut pipelines = Vec::new();
    for (name, s) in snapshot.pipelines() {
        let PipelineSlot::Ready { pipeline, .. } = s else { continue };
        let mut v = endpoint(name, "pipeline", Endpoint::Pipeline(pipeline));
        let plan = &pipeline.plan;
        // Columns for drawing: a node sits one right of the deepest node it reads from.
        let mut depth = vec![0usize; plan.nodes.len()];
        for _ in 0..plan.nodes.len() {
            for (i, n) in plan.nodes.iter().enumerate() {
                let d = n
                    .inputs
                    .iter()
                    .filter_map(|s| match s {
                        Src::Node { node, .. } => Some(depth[*node] + 1),
                        Src::Input(_) => None,
                    })
                    .max()
                    .unwrap_or(1);
                depth[i] = depth[i].max(d);
            }
        }
        let nodes: Vec<Value> = pipeline
            .nodes()
            .enumerate()
            .map(|(i, nv)| {
                let n = nv.node;
                let k = format!("node/{name}/{}", n.name);
                let inputs: Vec<String> = n
                    .inputs
                    .iter()
                    .map(|s| match s {
                        Src::Node { node, .. } => plan.nodes[*node].name.clone(),
                        Src::Input(i) => format!("input:{}", plan.inputs[*i].name),
                    })
                    .collect();
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
                    "kind": if nv.model.is_some() { "model" } else { "op" },
                    "what": n.what,
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
                },
            }))
            .collect::<Vec<_>>());
        v["nodes"] = Value::Array(nodes);
        pipelines.push(v);
    }

    let pools: Vec<Value> = {
        let mut names: Vec<&String> = engine.pools.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let p = &engine.pools[n];
                json!({"name": n, "threads": p.config.threads, "queue_depth": p.queued()})
            })
            .collect()
    };
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    json!({
        "time_ms": unix_ms,
        "window_s": WINDOW_S,
        "rate_window_s": dt,
        "models": models,
        "pipelines": pipelines,
        "pools": pools,
        "gpus": engine.gpu_samples(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_counts_whole_seconds() {
        let live = Live { start: Instant::now() - Duration::from_millis(3500), ..Default::default() };
        // Two whole seconds ago and one a second ago: 30 and 10 requests; 5 in the current one.
        {
            let mut w = live.windows.lock();
            let h = || Histogram::new_with_bounds(1, 3_600_000_000, 2).unwrap();
            let s = |at, ok| Second { at, latency_us: h(), ok, failed: 0 };
            w.insert("m".into(), VecDeque::from([s(0, 20), s(1, 10), s(2, 10), s(3, 5)]));
        }
        let (rps, _, _) = live.summary("m");
        assert!((rps - 40.0 / 3.0).abs() < 1e-9, "{rps}");
    }

    #[test]
    fn the_window_summarises_recorded_requests() {
        let live = Live::default();
        for ms in 1..=100 {
            live.record("m", Duration::from_millis(ms), ms != 100);
        }
        let (rps, error_rate, pct) = live.summary("m");
        assert!(rps > 0.0);
        assert!((error_rate - 0.01).abs() < 1e-9);
        let [p50, p90, p99] = pct.unwrap();
        assert!((49.0..=51.0).contains(&p50) && (89.0..=91.0).contains(&p90) && (98.0..=100.0).contains(&p99));
        assert_eq!(live.summary("other").2, None);
    }
}
