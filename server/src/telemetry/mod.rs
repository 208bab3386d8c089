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
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

/// The server-wide recorders.
pub struct Telemetry {
    pub metrics: Metrics,
    /// Recent latencies and counter samples for the dashboard.
    pub live: Live,
    /// NVML, when the host has it, and the last sample of every GPU (for the dashboard).
    gpus: Gpus,
    gpu_samples: Mutex<Vec<GpuSample>>,
    /// Per model, the queue-time histogram's (sum, count) at each of the last samples.
    queue_window: Mutex<HashMap<String, VecDeque<(f64, u64)>>>,
}

/// Samples (one a second) the mean queue time is taken over: 10 s.
const QUEUE_WINDOW: usize = 11;

impl Telemetry {
    pub fn new(metrics: Metrics) -> Telemetry {
        Telemetry {
            metrics,
            live: Live::default(),
            gpus: Gpus::open(),
            gpu_samples: Mutex::new(Vec::new()),
            queue_window: Mutex::new(HashMap::new()),
        }
    }

    /// Sets each model's mean queue time over the last 10 s (once a second, from the
    /// housekeeping thread), from its queue-time histogram's running sum and count.
    /// Models gone from `models` lose their series.
    pub fn sample_queue_time<'a>(&self, models: impl Iterator<Item = &'a str>) {
        let mut window = self.queue_window.lock();
        let mut seen = HashSet::new();
        for model in models {
            seen.insert(model);
            let h = self.metrics.queue_duration.with_label_values(&[model]);
            let samples = window.entry(model.to_string()).or_default();
            samples.push_back((h.get_sample_sum(), h.get_sample_count()));
            if samples.len() > QUEUE_WINDOW {
                samples.pop_front();
            }
            self.metrics.queue_time_mean.with_label_values(&[model]).set(window_mean(samples));
        }
        window.retain(|model, _| {
            let keep = seen.contains(model.as_str());
            if !keep {
                let _ = self.metrics.queue_time_mean.remove_label_values(&[model]);
            }
            keep
        });
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

/// Mean of what was added to a (sum, count) series from its first sample to its last;
/// 0 when nothing was.
fn window_mean(samples: &VecDeque<(f64, u64)>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some(&(s0, c0)), Some(&(s1, c1))) if c1 > c0 => (s1 - s0) / (c1 - c0) as f64,
        _ => 0.0,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_time_is_the_mean_over_the_window_and_forgets_old_samples() {
        let t = Telemetry::new(Metrics::new());
        let h = t.metrics.queue_duration.with_label_values(&["m"]);
        let mean = || t.metrics.queue_time_mean.with_label_values(&["m"]).get();
        t.sample_queue_time(["m"].into_iter());
        assert_eq!(mean(), 0.0, "no requests: no queue time");
        h.observe(0.010);
        h.observe(0.030);
        t.sample_queue_time(["m"].into_iter());
        assert!((mean() - 0.020).abs() < 1e-9, "{}", mean());
        // Ten quiet seconds push those two out of the window.
        for _ in 0..QUEUE_WINDOW - 1 {
            t.sample_queue_time(["m"].into_iter());
        }
        assert_eq!(mean(), 0.0);
        // A model that is gone loses its series.
        t.sample_queue_time(std::iter::empty());
        let text = t.metrics.render();
        assert!(!text.contains("sluice_queue_time_mean_seconds{model=\"m\"}"), "{text}");
    }
}
