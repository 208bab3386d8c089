//! Everything the server records about itself, in one place that the request path
//! records into and the API layer reads: Prometheus metrics, the Triton statistics
//! extension, the dashboard's live windows, GPU samples and span export. It imports
//! nothing above it.

pub mod gpu;
pub mod live;
pub mod metrics;
pub mod otlp;
pub mod stats;

use crate::error::Error;
use gpu::{GpuSample, Gpus};
use live::Live;
use metrics::{Metrics, ModelMetrics};
use parking_lot::Mutex;
use stats::ModelStats;
use std::time::Duration;

/// The server-wide recorders.
pub struct Telemetry {
    pub metrics: Metrics,
    /// Recent latencies and counter samples for the dashboard.
    pub live: Live,
    /// NVML, when the host has it, and the last sample of every GPU (for the dashboard).
    gpus: Gpus,
    gpu_samples: Mutex<Vec<GpuSample>>,
}

impl Telemetry {
    pub fn new(metrics: Metrics) -> Telemetry {
        Telemetry { metrics, live: Live::default(), gpus: Gpus::open(), gpu_samples: Mutex::new(Vec::new()) }
    }

    /// Reads every GPU's utilisation and memory into the metrics (once a second, from
    /// the housekeeping thread); nothing on hosts without NVML.
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
    pub fn gpu_samples(&self) -> Vec<GpuSample> {
        self.gpu_samples.lock().clone()
    }
}

/// How a request to a model or pipeline ended.
pub enum Outcome<'a> {
    /// Answered; with the backend time of its batch when a model computed it (what
    /// the request spent beyond it is the server's overhead).
    Answered {
        elapsed: Duration,
        compute: Option<Duration>,
    },
    Failed {
        elapsed: Duration,
        error: &'a Error,
    },
    /// Malformed on the wire: it never reached the model or pipeline.
    Rejected(&'a Error),
}

/// The per-model (or per-pipeline) recorders a finished request goes to.
pub struct RequestSinks<'a> {
    pub name: &'a str,
    pub stats: &'a ModelStats,
    pub metrics: &'a ModelMetrics,
}

impl RequestSinks<'_> {
    /// Records one request in every sink: statistics, Prometheus and the live window.
    pub fn record(&self, live: &Live, outcome: Outcome<'_>) {
        let (elapsed, ok) = match outcome {
            Outcome::Answered { elapsed, .. } => (elapsed, true),
            Outcome::Failed { elapsed, .. } => (elapsed, false),
            Outcome::Rejected(_) => (Duration::ZERO, false),
        };
        self.stats.record_request(ok, elapsed);
        self.metrics.requests.inc();
        match outcome {
            Outcome::Answered { compute, .. } => {
                self.metrics.request_duration.observe(elapsed.as_secs_f64());
                if let Some(compute) = compute {
                    self.metrics.overhead.observe(elapsed.saturating_sub(compute).as_secs_f64());
                }
            }
            Outcome::Failed { error, .. } => {
                self.metrics.request_duration.observe(elapsed.as_secs_f64());
                self.metrics.failure(error.error_type());
            }
            Outcome::Rejected(error) => self.metrics.failure(error.error_type()),
        }
        live.record(self.name, elapsed, ok);
    }
}
