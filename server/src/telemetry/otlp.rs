//! Exporting the request, node and batch spans to an OpenTelemetry collector, over
//! OTLP/HTTP with protobuf bodies (`sluice --otlp-endpoint`). Spans are batched and sent
//! from the exporter's own thread; [`Flush`] sends what is left when it is dropped.

use crate::request::TraceContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A `tracing` layer that turns spans into OpenTelemetry spans for `endpoint` (the
/// collector's base URL; spans go to `<endpoint>/v1/traces`).
#[cfg(feature = "otlp")]
pub fn layer<S>(endpoint: &str) -> Result<(Box<dyn Layer<S> + Send + Sync>, Flush), String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("sluice").build())
        .build();
    let tracer = provider.tracer("sluice");
    Ok((tracing_opentelemetry::layer().with_tracer(tracer).boxed(), Flush(provider)))
}

/// Without the `otlp` feature there is no exporter to make.
#[cfg(not(feature = "otlp"))]
pub fn layer<S>(endpoint: &str) -> Result<(Box<dyn Layer<S> + Send + Sync>, Flush), String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    Err(format!("cannot export spans to {endpoint}: this sluice was built without the `otlp` feature"))
}

/// Makes `span` (not yet entered) a child of the caller's span `incoming` and returns
/// the context to pass on: this span's, when spans are exported; else the caller's as
/// it came (a hop that records nothing passes the parent on unchanged).
#[cfg(feature = "otlp")]
pub fn adopt(span: &tracing::Span, incoming: Option<TraceContext>) -> Option<TraceContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let Some(t) = &incoming {
        let parent = SpanContext::new(
            TraceId::from(t.trace_id),
            SpanId::from(t.span_id),
            TraceFlags::new(t.flags),
            true,
            TraceState::NONE,
        );
        // Fails only where no exporter is installed, or the span is off: nothing to join.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    if !own.is_valid() {
        return incoming;
    }
    Some(TraceContext {
        trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(own.span_id().to_bytes()),
        flags: own.trace_flags().to_u8(),
        state: incoming.and_then(|t| t.state),
    })
}

/// Without span export a request's trace context is passed on as it came.
#[cfg(not(feature = "otlp"))]
pub fn adopt(_span: &tracing::Span, incoming: Option<TraceContext>) -> Option<TraceContext> {
    incoming
}

/// Sends the spans not yet exported when dropped (at the end of the command).
#[cfg(feature = "otlp")]
pub struct Flush(opentelemetry_sdk::trace::SdkTracerProvider);

#[cfg(not(feature = "otlp"))]
pub struct Flush;

#[cfg(feature = "otlp")]
impl Drop for Flush {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("sluice: exporting the last spans failed: {e}");
        }
    }
}
