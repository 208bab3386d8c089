//! Prometheus metrics. Every name is defined here, `sluice_<what>_<unit>[_total]`.
//! Each server owns its registry, so several servers in one process (tests) stay apart.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Fine buckets for what the server adds on top of the model (5 µs to 10 ms).
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.00002, 0.00003, 0.00004, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075,
    0.001, 0.002, 0.005, 0.01,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

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
    pub abandoned: IntCounterVec,
    pub model_loads: IntCounterVec,
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
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["model"])
                .expect("valid metric. This is a bug.");
            registry.register(Box::new(h.clone())).expect("unique metric. This is a bug.");
            h
        };
        let queue_depth = IntGaugeVec::new(
            Opts::new("sluice_queue_depth", "Requests waiting in the model's batch queue."),
            &["model"],
        )
        .expect("valid metric. This is a bug.");
        registry.register(Box::new(queue_depth.clone())).expect("unique metric. This is a bug.");
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
            abandoned: counter(
                "sluice_abandoned_items_total",
                "Queued items dropped before compute because their caller went away.",
                &["model"],
            ),
            model_loads: counter(
                "sluice_model_loads_total",
                "Model load attempts, by outcome (ok, error).",
                &["model", "outcome"],
            ),
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
            failures: self.failures.clone(),
            model: model.to_string(),
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
    failures: IntCounterVec,
    model: String,
}

impl ModelMetrics {
    pub fn failure(&self, error_type: &str) {
        self.failures.with_label_values(&[&self.model, error_type]).inc();
    }
}
