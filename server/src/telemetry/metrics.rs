//! Prometheus metrics. Every name is defined here, `sluice_<what>_<unit>[_total]`.
//! Each server owns its registry, so several servers in one process (tests) stay apart.

use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Latency buckets from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Fine buckets for what the server adds on top of the model (5 µs to 10 ms).
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.00002, 0.00003, 0.00004, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075,
    0.001, 0.002, 0.005, 0.01,
];
/// Remote calls: fine around the hop's own cost (tens to hundreds of µs), then coarse up
/// to the seconds a big batch on a busy model tier takes.
const REMOTE_BUCKETS: &[f64] = &[
    0.00005, 0.000075, 0.0001, 0.000125, 0.00015, 0.000175, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005, 0.00075, 0.001,
    0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const FANOUT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub failures: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub compute_duration: HistogramVec,
    pub overhead: HistogramVec,
    pub batch_size: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub queue_time_mean: prometheus::GaugeVec,
    pub abandoned: IntCounterVec,
    pub model_loads: IntCounterVec,
    pub pipeline_loads: IntCounterVec,
    pub reloads: IntCounterVec,
    pub reload_duration: Histogram,
    pub model_busy: prometheus::CounterVec,
    pub node_queue: HistogramVec,
    pub node_compute: HistogramVec,
    pub node_batch_size: HistogramVec,
    pub node_items: IntCounterVec,
    pub node_errors: IntCounterVec,
    pub node_duration: HistogramVec,
    pub node_in_flight: IntGaugeVec,
    pub node_fanout: HistogramVec,
    pub node_skipped: IntCounterVec,
    pub node_branch_items: IntCounterVec,
    pub node_branch_failures: IntCounterVec,
    pub node_branch_duration: HistogramVec,
    pub remote_requests: IntCounterVec,
    pub remote_failures: IntCounterVec,
    pub remote_duration: HistogramVec,
    pub remote_in_flight: IntGaugeVec,
    pub remote_ejected: IntGaugeVec,
    /// Holders of each remote endpoint's series (model, endpoint): the last one gone
    /// removes them, so addresses that come and go (pods) do not pile up series, and a
    /// reloaded model's new endpoints keep the series its old ones shared.
    remote_holders: Arc<Mutex<HashMap<(String, String), usize>>>,
    pub instance_busy: prometheus::CounterVec,
    pub instance_executions: IntCounterVec,
    pub instance_inferences: IntCounterVec,
    pub instances: IntGaugeVec,
    pub pool_depth: IntGaugeVec,
    pub pool_busy: prometheus::CounterVec,
    pub gpu_utilization: prometheus::GaugeVec,
    pub gpu_memory_used: IntGaugeVec,
    pub gpu_memory_total: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric. This is a bug.");
            registry.register(Box::new(c.clone())).expect("unique metric. This is a bug.");
            c
        };
        let histogram_by = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
                .expect("valid metric. This is a bug.");
            registry.register(Box::new(h.clone())).expect("unique metric. This is a bug.");
            h
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| histogram_by(name, help, buckets, &["model"]);
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric. This is a bug.");
            registry.register(Box::new(g.clone())).expect("unique metric. This is a bug.");
            g
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric. This is a bug.");
            registry.register(Box::new(g.clone())).expect("unique metric. This is a bug.");
            g
        };
        let seconds = |name: &str, help: &str, labels: &[&str]| {
            let c = prometheus::CounterVec::new(Opts::new(name, help), labels).expect("valid metric. This is a bug.");
            registry.register(Box::new(c.clone())).expect("unique metric. This is a bug.");
            c
        };
        // CPU seconds, resident and virtual memory, open files, threads of this process,
        // as sluice_process_*.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "sluice",
            )))
            .expect("unique metric. This is a bug.");
        let queue_depth = gauge("sluice_queue_depth", "Requests waiting in the model's batch queue.", &["model"]);
        let node = &["pipeline", "node"];
        Metrics {
            requests: counter("sluice_requests_total", "Inference requests received.", &["model"]),
            failures: counter(
                "sluice_request_failures_total",
                "Inference requests that failed, by error type.",
                &["model", "error_type"],
            ),
            request_duration: histogram(
                "sluice_request_duration_seconds",
                "Request time in the engine: decoded request in, outputs ready (wire decode and encode excluded).",
                LATENCY_BUCKETS,
            ),
            queue_duration: histogram(
                "sluice_queue_duration_seconds",
                "Time an item waited for its batch and a free instance.",
                LATENCY_BUCKETS,
            ),
            compute_duration: histogram(
                "sluice_compute_duration_seconds",
                "Backend run time per batch.",
                LATENCY_BUCKETS,
            ),
            overhead: histogram(
                "sluice_request_overhead_seconds",
                "Request time inside the server minus the backend run of its batch: what sluice adds.",
                OVERHEAD_BUCKETS,
            ),
            batch_size: histogram("sluice_batch_size", "Rows per executed batch.", BATCH_BUCKETS),
            queue_depth,
            queue_time_mean: fgauge(
                "sluice_queue_time_mean_seconds",
                "Mean time requests waited in the model's batch queue over the last 10 s: the signal to scale \
                 replicas on (it rises only when demand exceeds what the replica can batch).",
                &["model"],
            ),
            abandoned: counter(
                "sluice_abandoned_items_total",
                "Queued items dropped before compute because their caller went away.",
                &["model"],
            ),
            model_loads: counter(
                "sluice_model_loads_total",
                "Model version load attempts, at start and on reloads, by outcome (ok, error); version is empty when \
                 the model's folder or model.yaml failed.",
                &["model", "version", "outcome"],
            ),
            pipeline_loads: counter(
                "sluice_pipeline_loads_total",
                "Pipeline compile-and-bind attempts, at start and on reloads, by outcome (ok, error).",
                &["pipeline", "outcome"],
            ),
            reloads: counter(
                "sluice_reloads_total",
                "Repository reloads (start, file changes, load/unload calls), by outcome: error when anything \
                 failed to load (what was serving stays).",
                &["outcome"],
            ),
            reload_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("sluice_reload_duration_seconds", "Time a reload took, loading included.")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .expect("valid metric. This is a bug.");
                registry.register(Box::new(h.clone())).expect("unique metric. This is a bug.");
                h
            },
            model_busy: seconds(
                "sluice_model_busy_seconds_total",
                "Time the model's instances spent running batches (summed over instances): busy fraction = rate / instances.",
                &["model"],
            ),
            node_queue: histogram_by(
                "sluice_node_queue_seconds",
                "Time a pipeline node's work waited for a CPU pool thread or its model's batch.",
                LATENCY_BUCKETS,
                node,
            ),
            node_compute: histogram_by(
                "sluice_node_compute_seconds",
                "Run time of a pipeline node's op, or of the model batch its item ran in.",
                LATENCY_BUCKETS,
                node,
            ),
            node_batch_size: histogram_by(
                "sluice_node_batch_size",
                "Rows of the model batch each item of a model node ran in.",
                BATCH_BUCKETS,
                node,
            ),
            node_items: counter("sluice_node_items_total", "Items a pipeline node processed.", node),
            node_errors: counter(
                "sluice_node_errors_total",
                "Items a pipeline node failed, by error type.",
                &["pipeline", "node", "error_type"],
            ),
            node_duration: histogram_by(
                "sluice_node_duration_seconds",
                "Time from a pipeline node's item being ready to its result (queue and compute).",
                LATENCY_BUCKETS,
                node,
            ),
            node_in_flight: gauge(
                "sluice_node_in_flight_items",
                "Items a pipeline node is working on or waiting for, now.",
                node,
            ),
            node_fanout: histogram_by(
                "sluice_node_fanout_items",
                "Elements of the list a mapped (fan-out) node ran over, per item.",
                FANOUT_BUCKETS,
                node,
            ),
            node_skipped: counter(
                "sluice_node_skipped_total",
                "Items a pipeline node did not run on: its `when:` did not hold, or what it reads was absent.",
                node,
            ),
            node_branch_items: counter(
                "sluice_node_branch_items_total",
                "Items a route or split node sent to each of its branches (models).",
                &["pipeline", "node", "branch"],
            ),
            node_branch_failures: counter(
                "sluice_node_branch_failures_total",
                "Items that failed on each branch of a route or split node.",
                &["pipeline", "node", "branch"],
            ),
            remote_requests: counter(
                "sluice_remote_requests_total",
                "Calls (batches) a remote model made to each endpoint, retries included.",
                &["model", "endpoint"],
            ),
            remote_failures: counter(
                "sluice_remote_failures_total",
                "Calls to each endpoint of a remote model that failed.",
                &["model", "endpoint"],
            ),
            remote_duration: histogram_by(
                "sluice_remote_duration_seconds",
                "Time per call to each endpoint of a remote model (the remote's compute and the hop).",
                REMOTE_BUCKETS,
                &["model", "endpoint"],
            ),
            remote_in_flight: gauge(
                "sluice_remote_in_flight_calls",
                "Calls to each endpoint of a remote model in flight now.",
                &["model", "endpoint"],
            ),
            remote_ejected: gauge(
                "sluice_remote_ejected",
                "1 while an endpoint of a remote model is out of the rotation.",
                &["model", "endpoint"],
            ),
            remote_holders: Arc::default(),
            node_branch_duration: histogram_by(
                "sluice_node_branch_duration_seconds",
                "Time per item on each branch of a route or split node (queue and compute), to compare them.",
                LATENCY_BUCKETS,
                &["pipeline", "node", "branch"],
            ),
            instance_busy: seconds(
                "sluice_instance_busy_seconds_total",
                "Time one model instance spent running batches: busy fraction = rate.",
                &["model", "instance"],
            ),
            instance_executions: counter(
                "sluice_instance_executions_total",
                "Batches one model instance ran.",
                &["model", "instance"],
            ),
            instance_inferences: counter(
                "sluice_instance_inferences_total",
                "Rows (requests' items, padding not counted) one model instance ran.",
                &["model", "instance"],
            ),
            instances: gauge("sluice_model_instances", "Instances of the model serving now.", &["model"]),
            pool_depth: gauge("sluice_pool_queue_depth", "Jobs waiting for a thread of the CPU pool.", &["pool"]),
            pool_busy: seconds(
                "sluice_pool_busy_seconds_total",
                "Time the CPU pool's threads spent running ops (summed over threads).",
                &["pool"],
            ),
            gpu_utilization: fgauge(
                "sluice_gpu_utilization",
                "Fraction of NVML's last sample period (1/6 to 1 s) in which a kernel ran on the GPU.",
                &["gpu"],
            ),
            gpu_memory_used: gauge("sluice_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).", &["gpu"]),
            gpu_memory_total: gauge("sluice_gpu_memory_total_bytes", "GPU memory in all (NVML).", &["gpu"]),
            registry,
        }
    }

    /// One model's series, resolved once so the request path does no label lookups.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        let l = [model];
        ModelMetrics {
            requests: self.requests.with_label_values(&l),
            request_duration: self.request_duration.with_label_values(&l),
            queue_duration: self.queue_duration.with_label_values(&l),
            compute_duration: self.compute_duration.with_label_values(&l),
            overhead: self.overhead.with_label_values(&l),
            batch_size: self.batch_size.with_label_values(&l),
            queue_depth: self.queue_depth.with_label_values(&l),
            abandoned: self.abandoned.with_label_values(&l),
            busy: self.model_busy.with_label_values(&l),
            failures: self.failures.clone(),
            model: model.to_string(),
        }
    }

    /// One pipeline node's series.
    pub fn for_node(&self, pipeline: &str, node: &str) -> NodeMetrics {
        let l = [pipeline, node];
        NodeMetrics {
            queue: self.node_queue.with_label_values(&l),
            compute: self.node_compute.with_label_values(&l),
            batch_size: self.node_batch_size.with_label_values(&l),
            items: self.node_items.with_label_values(&l),
            duration: self.node_duration.with_label_values(&l),
            in_flight: self.node_in_flight.with_label_values(&l),
            fanout: self.node_fanout.with_label_values(&l),
            skipped: self.node_skipped.with_label_values(&l),
            errors: self.node_errors.clone(),
            labels: [pipeline.to_string(), node.to_string()],
        }
    }

    /// One branch of a route or split node.
    pub fn for_branch(&self, pipeline: &str, node: &str, branch: &str) -> BranchMetrics {
        let l = [pipeline, node, branch];
        BranchMetrics {
            items: self.node_branch_items.with_label_values(&l),
            failures: self.node_branch_failures.with_label_values(&l),
            duration: self.node_branch_duration.with_label_values(&l),
        }
    }

    /// One endpoint of a remote model. Its series live while some endpoint of that model
    /// and address holds them.
    pub fn for_remote(&self, model: &str, endpoint: &str) -> RemoteMetrics {
        let l = [model, endpoint];
        *self.remote_holders.lock().entry((model.to_string(), endpoint.to_string())).or_default() += 1;
        RemoteMetrics {
            _held: Arc::new(RemoteHold { metrics: self.clone(), model: model.into(), endpoint: endpoint.into() }),
            requests: self.remote_requests.with_label_values(&l),
            failures: self.remote_failures.with_label_values(&l),
            duration: self.remote_duration.with_label_values(&l),
            in_flight: self.remote_in_flight.with_label_values(&l),
            ejected: self.remote_ejected.with_label_values(&l),
        }
    }

    /// One model instance's series.
    pub fn for_instance(&self, model: &str, instance: usize) -> InstanceMetrics {
        let i = instance.to_string();
        let l = [model, i.as_str()];
        InstanceMetrics {
            busy: self.instance_busy.with_label_values(&l),
            executions: self.instance_executions.with_label_values(&l),
            inferences: self.instance_inferences.with_label_values(&l),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail. This is a bug.");
        String::from_utf8(buf).expect("Prometheus text is UTF-8. This is a bug.")
    }
}

/// The series of one model.
#[derive(Clone)]
pub struct ModelMetrics {
    pub requests: IntCounter,
    pub request_duration: Histogram,
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub overhead: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    pub abandoned: IntCounter,
    pub busy: prometheus::Counter,
    failures: IntCounterVec,
    model: String,
}

impl ModelMetrics {
    pub fn failure(&self, error_type: &str) {
        self.failures.with_label_values(&[&self.model, error_type]).inc();
    }
}

/// The series of one pipeline node.
#[derive(Clone)]
pub struct NodeMetrics {
    pub queue: Histogram,
    pub compute: Histogram,
    pub batch_size: Histogram,
    pub items: IntCounter,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    pub fanout: Histogram,
    pub skipped: IntCounter,
    errors: IntCounterVec,
    labels: [String; 2],
}

impl NodeMetrics {
    pub fn failure(&self, error_type: &str) {
        self.errors.with_label_values(&[&self.labels[0], &self.labels[1], error_type]).inc();
    }
}

/// The series of one branch of a route or split node.
#[derive(Clone)]
pub struct BranchMetrics {
    pub items: IntCounter,
    pub failures: IntCounter,
    pub duration: Histogram,
}

/// The series of one endpoint of a remote model.
#[derive(Clone)]
pub struct RemoteMetrics {
    pub requests: IntCounter,
    pub failures: IntCounter,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    pub ejected: IntGauge,
    _held: Arc<RemoteHold>,
}

/// One holder of a remote endpoint's series; the last to go removes them.
struct RemoteHold {
    metrics: Metrics,
    model: String,
    endpoint: String,
}

impl Drop for RemoteHold {
    fn drop(&mut self) {
        let m = &self.metrics;
        let mut holders = m.remote_holders.lock();
        let key = (std::mem::take(&mut self.model), std::mem::take(&mut self.endpoint));
        let Some(n) = holders.get_mut(&key) else { return };
        *n -= 1;
        if *n == 0 {
            holders.remove(&key);
            let l = [key.0.as_str(), key.1.as_str()];
            let _ = m.remote_requests.remove_label_values(&l);
            let _ = m.remote_failures.remove_label_values(&l);
            let _ = m.remote_duration.remove_label_values(&l);
            let _ = m.remote_in_flight.remove_label_values(&l);
            let _ = m.remote_ejected.remove_label_values(&l);
        }
    }
}

/// The series of one model instance.
#[derive(Clone)]
pub struct InstanceMetrics {
    pub busy: prometheus::Counter,
    pub executions: IntCounter,
    pub inferences: IntCounter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_endpoints_series_live_while_something_holds_them() {
        let m = Metrics::new();
        let (a, b) = (m.for_remote("m", "10.0.0.1:8001"), m.for_remote("m", "10.0.0.1:8001"));
        let other = m.for_remote("m", "10.0.0.2:8001");
        a.requests.inc();
        other.requests.inc();
        let has = |addr: &str| {
            m.render().contains(&format!("sluice_remote_requests_total{{endpoint=\"{addr}\",model=\"m\"}}"))
        };
        assert!(has("10.0.0.1:8001") && has("10.0.0.2:8001"));
        // A reloaded model's new endpoint shares the series: the old one going keeps them.
        drop(a);
        assert!(has("10.0.0.1:8001"));
        drop(b);
        assert!(!has("10.0.0.1:8001"), "the last holder removes them");
        assert!(has("10.0.0.2:8001"));
        // Held again later (the address came back): counted from zero.
        let again = m.for_remote("m", "10.0.0.1:8001");
        assert_eq!(again.requests.get(), 0);
        drop(other);
    }
}
