//! Logs and span export, set up once for every subcommand.

use clap::ValueEnum;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(clap::Args)]
pub struct Args {
    /// Log lines as plain text or as JSON objects (one per line, with the span fields:
    /// request id, model, pipeline node). Levels: SLUICE_LOG, e.g. `info,sluice_server=debug`.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
    /// Export spans (request, node, batch) over OpenTelemetry's OTLP/HTTP (protobuf) to
    /// this collector, e.g. http://127.0.0.1:4318 (spans go to its /v1/traces).
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

/// Installs the subscriber; what it returns flushes the span exporter when dropped.
pub fn init(args: &Args) -> anyhow::Result<Option<sluice_server::otlp::Flush>> {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info,ort=warn".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match args.log_format {
        LogFormat::Plain => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).boxed(),
    };
    // Spans to an OpenTelemetry collector, with a filter of their own (node and batch
    // spans are debug level: made only when exported).
    let (otlp, flush) = match &args.otlp_endpoint {
        Some(endpoint) => {
            let (layer, flush) = sluice_server::otlp::layer(endpoint).map_err(anyhow::Error::msg)?;
            let spans =
                EnvFilter::try_from_env("SLUICE_OTLP_LOG").unwrap_or_else(|_| "info,sluice_server=debug".into());
            (Some(layer.with_filter(spans)), Some(flush))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(otlp).init();
    Ok(flush)
}
