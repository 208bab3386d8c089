//! Exporting the request, node and batch spans to an OpenTelemetry collector, over
//! OTLP/HTTP with protobuf bodies (`sluice --otlp-endpoint`). Spans are batched and sent
//! from the exporter's own thread; [`Flush`] sends what is left when it is dropped.

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
