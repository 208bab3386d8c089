//! The protocol layer: gRPC and HTTP served together over one engine. Handlers only
//! translate wire types and map errors (`error`); everything else is the engine's.

pub mod access;
pub mod conn;
pub mod dashboard;
pub mod error;
pub mod grpc;
pub mod health;
pub mod http;
pub mod inflight;
pub mod views;

use crate::engine::reload::ReloadReport;
use crate::engine::Engine;
use crate::error::Error;
use crate::request::{NamedTensor, StepTiming, TraceContext};
use bytes::Bytes;
use sluice_ops::{DataType, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    /// Deadline for requests that carry none; `None`: no deadline.
    pub default_timeout: Option<Duration>,
    /// Whether the repository's load and unload calls are allowed (`--reload` is not `none`).
    pub model_control: bool,
    /// Turns true when the server starts to shut down: endless responses (the dashboard's
    /// event stream) end then, so a graceful shutdown does not wait on them.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Set when a drain begins (SIGTERM): every readiness answer turns false at once
    /// while requests are still served, so balancers move traffic away first.
    pub draining: Arc<AtomicBool>,
}

impl AppState {
    /// Ready: the first repository load finished, every model and pipeline serves, and
    /// the server is not draining.
    pub fn ready(&self) -> bool {
        self.engine.started() && !self.draining() && self.engine.snapshot().ready()
    }

    /// Whether `name` (a model, pipeline or alias) can take requests now.
    pub fn servable_ready(&self, name: &str, version: &str) -> bool {
        !self.draining() && self.engine.snapshot().servable(name, version).is_ok()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Runs a repository load (`unload: false`) or unload off the async runtime: loading
    /// runs models.
    pub(crate) async fn load_or_unload(&self, name: String, unload: bool) -> Result<ReloadReport, Error> {
        if !self.model_control {
            return Err(Error::Repository("model control is off: the server runs with --reload none".into()));
        }
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.repository_call(&name, unload))
            .await
            .map_err(|e| Error::Internal(format!("repository call panicked: {e}")))?
    }
}

/// Request parameter (bool) asking for the per-step timing in the response.
pub const TIMING_PARAM: &str = "sluice_timing";
pub use crate::request::{REQUEST_ID_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// The request's span, in the caller's trace when `traceparent` names one, with the
/// trace id in its fields (so log lines can be matched to traces); and the trace
/// context the request passes on.
pub(crate) fn request_span(
    model: &str,
    id: &str,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> (tracing::Span, Option<TraceContext>) {
    let incoming = traceparent.and_then(|t| TraceContext::parse(t, tracestate));
    let span = tracing::info_span!("request", model = %model, id = ?id, trace_id = tracing::field::Empty);
    let trace = crate::telemetry::otlp::adopt(&span, incoming);
    if let Some(t) = &trace {
        span.record("trace_id", tracing::field::display(format_args!("{:032x}", t.trace_id)));
    }
    (span, trace)
}

/// The request's id: the one in its body, else its `x-request-id`, else a new one, so
/// every request can be found in the logs and is answered with its id.
pub(crate) fn request_id(given: String, header: Option<&str>) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    if !given.is_empty() {
        return given;
    }
    match header.filter(|h| !h.is_empty()) {
        Some(h) => h.to_string(),
        None => format!("sluice-{:x}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
    }
}

/// The response parameters of a request's timing: per step `sluice_timing.<step>.queue_us`,
/// `.compute_us` and `.items` (sums over the step's items), and `sluice_timing.total_us`.
pub(crate) fn timing_params(steps: &[StepTiming], total: Duration) -> Vec<(String, i64)> {
    let us = |d: Duration| d.as_micros().min(i64::MAX as u128) as i64;
    let mut out = vec![(format!("{TIMING_PARAM}.total_us"), us(total))];
    for s in steps {
        out.push((format!("{TIMING_PARAM}.{}.queue_us", s.step), us(s.queue)));
        out.push((format!("{TIMING_PARAM}.{}.compute_us", s.step), us(s.compute)));
        out.push((format!("{TIMING_PARAM}.{}.items", s.step), s.items as i64));
    }
    out
}

/// The request's own timeout, else the server default, as an instant.
pub(crate) fn deadline_after(own: Option<Duration>, default: Option<Duration>) -> Option<Instant> {
    own.or(default).and_then(|d| Instant::now().checked_add(d))
}

/// Reads a wire tensor's header, the same for every protocol: its datatype and shape.
pub(crate) fn tensor_header(name: &str, datatype: &str, shape: &[i64]) -> Result<(DataType, Vec<usize>), String> {
    let dtype = DataType::parse(datatype).ok_or_else(|| format!("input '{name}': unknown datatype '{datatype}'"))?;
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("input '{name}': shape {shape:?} has a negative dimension")))
        .collect::<Result<_, _>>()?;
    Ok((dtype, shape))
}

/// Builds a request input, checking that `data` is exactly what dtype and shape call for.
pub(crate) fn named_input(
    name: String,
    dtype: DataType,
    shape: Vec<usize>,
    data: Bytes,
) -> Result<NamedTensor, String> {
    let tensor = Tensor::new(dtype, shape, data).map_err(|e| format!("input '{name}': {e}"))?;
    Ok(NamedTensor { name, tensor })
}
