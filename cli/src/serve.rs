//! `sluice serve`: the server, until a signal stops it.

use crate::repo::RepoArgs;
use anyhow::Context;
use sluice_server::{AccessConfig, Limits, ModelControl, OpRegistry, ReloadMode, Restriction, ServerConfig, TlsFiles};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// gRPC listen address (Triton's default port, so its tools find sluice as is).
    #[arg(long, env = "SLUICE_GRPC_ADDR", default_value = "0.0.0.0:8001")]
    grpc_addr: SocketAddr,
    /// HTTP listen address.
    #[arg(long, env = "SLUICE_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    http_addr: SocketAddr,
    /// ONNX Runtime shared library, loaded at run time so the binary builds without it.
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = ".sluice/lib/libonnxruntime.so")]
    ort_dylib: PathBuf,
    /// Largest gRPC message / HTTP body in MiB: image batches outgrow gRPC's usual 4 MiB.
    #[arg(long, env = "SLUICE_MAX_MESSAGE_MB", default_value_t = 256)]
    max_message_mb: usize,
    /// Deadline in milliseconds for requests that carry none (0: no deadline).
    #[arg(long, env = "SLUICE_REQUEST_TIMEOUT_MS", default_value_t = 0)]
    request_timeout_ms: u64,
    /// How changes to the repository are picked up: watch the folders (and allow the
    /// load/unload API), explicit (only the load/unload API and `sluice reload`), or none.
    #[arg(long, env = "SLUICE_RELOAD", value_enum, default_value = "watch")]
    reload: ReloadMode,
    /// Nice value (1-19) of model loads while serving: they take only the CPU that
    /// requests leave idle, at the cost of slower reloads on a saturated machine. 0 loads
    /// at normal priority.
    #[arg(long, env = "SLUICE_LOAD_NICE", default_value_t = 19, value_parser = clap::value_parser!(i32).range(0..=19))]
    load_nice: i32,
    /// In watch mode, how long files must stay unchanged before a reload starts.
    #[arg(long, env = "SLUICE_RELOAD_DEBOUNCE_MS", default_value_t = 500)]
    reload_debounce_ms: u64,
    /// Serve gRPC and HTTP over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "SLUICE_SERVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "SLUICE_SERVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM): mutual TLS.
    #[arg(long, env = "SLUICE_SERVER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Gzip gRPC responses for clients that accept gzip (off: deflating costs more CPU
    /// per request than the bytes it saves on a LAN; requests may be gzipped either way).
    #[arg(long, env = "SLUICE_GRPC_COMPRESS_RESPONSES")]
    grpc_compress_responses: bool,
    /// On SIGTERM or Ctrl-C: report not-ready on every probe at once but keep serving for
    /// this many seconds (endpoints and balancers take seconds to drop a replica), then
    /// stop accepting and finish in-flight requests.
    #[arg(long, env = "SLUICE_DRAIN_DELAY_S", default_value_t = 0)]
    drain_delay_s: u64,
    /// How long a graceful shutdown may wait for in-flight requests (after the drain
    /// delay) before exiting anyway.
    #[arg(long, env = "SLUICE_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    shutdown_timeout_s: u64,
    /// Answer requests for ALIAS as for TARGET (a model or pipeline), `ALIAS=TARGET`;
    /// repeat for more. KServe calls a model by its InferenceService's name.
    #[arg(long = "model-alias", env = "SLUICE_MODEL_ALIAS", value_delimiter = ',', value_parser = parse_alias)]
    aliases: Vec<(String, String)>,
    /// Largest image, in pixels, any pipeline step may decode, resize or crop to
    /// (default 8192 x 8192).
    #[arg(long, env = "SLUICE_MAX_IMAGE_PIXELS", default_value_t = 64 << 20)]
    max_image_pixels: u64,
    /// MiB of decoded images alive at once, across all requests; past it, requests are
    /// refused (RESOURCE_EXHAUSTED / 429) until others finish.
    #[arg(long, env = "SLUICE_IMAGE_MEMORY_MB", default_value_t = 1024)]
    image_memory_mb: usize,
    /// MiB of request bodies received and not yet answered, across all requests; past
    /// it, requests are refused at once. At least --max-message-mb. An eighth (less where
    /// --max-message-mb would not fit in the rest) is kept for requests of at most 1/64 of
    /// it, so that a flood of large bodies leaves room for small requests.
    #[arg(long, env = "SLUICE_MAX_INFLIGHT_MB", default_value_t = 512)]
    max_inflight_mb: usize,
    /// HTTP/2 streams one client connection may have open at once (advertised to clients).
    #[arg(long = "max-streams", env = "SLUICE_MAX_STREAMS", default_value_t = 128)]
    max_concurrent_streams: u32,
    /// Open connections per listener (gRPC and HTTP each); past it, new clients wait in
    /// the kernel's backlog. Keep it below the process's open-file limit.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 768)]
    max_connections: usize,
    /// Seconds an HTTP/1 client has to send a request's headers (and may stay idle
    /// between requests).
    #[arg(long, env = "SLUICE_HTTP_HEADER_TIMEOUT_S", default_value_t = 10)]
    http_header_timeout_s: u64,
    /// Seconds a client has to send a request's whole body (HTTP body or gRPC message);
    /// a slow sender must not hold its share of --max-inflight-mb for long.
    #[arg(long, env = "SLUICE_HTTP_BODY_TIMEOUT_S", default_value_t = 60)]
    http_body_timeout_s: u64,
    /// Require a key for API groups over gRPC, as Triton's flag of the same name:
    /// `GROUP[,GROUP...]:HEADER=VALUE` (VALUE `@FILE` reads it from a file). Groups:
    /// inference, health, metadata, model-config, statistics, model-repository. Repeat
    /// for more; in the environment, separate them with ';'.
    #[arg(long, env = "SLUICE_GRPC_RESTRICTED_PROTOCOL", value_delimiter = ';')]
    grpc_restricted_protocol: Vec<Restriction>,
    /// The same for HTTP, as Triton's --http-restricted-api; groups also metrics and
    /// dashboard. For a bearer token: `GROUPS:authorization=Bearer TOKEN`.
    #[arg(long, env = "SLUICE_HTTP_RESTRICTED_API", value_delimiter = ';')]
    http_restricted_api: Vec<Restriction>,
    /// Who may load, unload and reload through the API: loopback (clients on this host),
    /// any (restrict it with a model-repository key), or off.
    #[arg(long, env = "SLUICE_MODEL_CONTROL", value_enum, default_value = "loopback")]
    model_control: ModelControl,
}

fn parse_alias(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((alias, target)) if !alias.is_empty() && !target.is_empty() => Ok((alias.into(), target.into())),
        _ => Err(format!("'{s}': expected ALIAS=TARGET, e.g. my-isvc=classify")),
    }
}

pub fn run(args: Args, ops: OpRegistry) -> anyhow::Result<()> {
    let cfg = ServerConfig {
        ops: std::sync::Arc::new(ops),
        pipelines_dir: Some(args.repo.pipelines),
        pools: args.repo.pools,
        ort_dylib: args.ort_dylib,
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        max_message_bytes: args.max_message_mb.saturating_mul(1024 * 1024),
        request_timeout: (args.request_timeout_ms > 0).then(|| Duration::from_millis(args.request_timeout_ms)),
        reload: args.reload,
        reload_debounce: Duration::from_millis(args.reload_debounce_ms),
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: args.tls_client_ca }),
            _ => None,
        },
        load_nice: args.load_nice,
        grpc_compress_responses: args.grpc_compress_responses,
        aliases: args.aliases.into_iter().collect(),
        limits: Limits {
            max_image_pixels: args.max_image_pixels,
            image_memory_bytes: args.image_memory_mb.saturating_mul(1 << 20),
            max_inflight_bytes: args.max_inflight_mb.saturating_mul(1 << 20),
            max_concurrent_streams: args.max_concurrent_streams,
            max_connections: args.max_connections.max(1),
            header_read_timeout: Duration::from_secs(args.http_header_timeout_s.max(1)),
            body_read_timeout: Duration::from_secs(args.http_body_timeout_s.max(1)),
            ..Limits::default()
        },
        access: AccessConfig {
            grpc: args.grpc_restricted_protocol,
            http: args.http_restricted_api,
            model_control: args.model_control,
        },
        ..ServerConfig::new(args.repo.models)
    };
    // The runtime does I/O only; models run on their own instance threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-io")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        // Handlers first: as a container's PID 1, a signal without one is dropped, and a
        // pod deleted during a long load would wait for its SIGKILL.
        let mut signals = Signals::new()?;
        let server = tokio::select! {
            started = sluice_server::start(cfg) => started?,
            _ = signals.recv() => {
                eprintln!("signal during start-up: exiting before serving");
                sluice_server::exit_now(0);
            }
        };
        println!("sluice serving gRPC on {} and HTTP on {}", server.grpc_addr, server.http_addr);
        signals.recv().await;
        tracing::info!(
            "shutting down: not ready from now on; finishing in-flight requests (a second signal exits at once)"
        );
        server.begin_drain();
        tokio::spawn(async move {
            signals.recv().await;
            eprintln!("second signal: exiting without finishing in-flight requests");
            sluice_server::exit_now(130);
        });
        let drain = Duration::from_secs(args.drain_delay_s);
        let stop = async move {
            if !drain.is_zero() {
                tracing::info!("draining: serving for {} s more while balancers drop this replica", drain.as_secs());
                tokio::time::sleep(drain).await;
            }
            tracing::info!("no longer accepting; waiting for in-flight requests");
            server.shutdown().await
        };
        match tokio::time::timeout(drain.saturating_add(Duration::from_secs(args.shutdown_timeout_s)), stop).await {
            Ok(()) => tracing::info!("stopped"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within {} s; exiting", args.shutdown_timeout_s);
                sluice_server::exit_now(1);
            }
        }
        Ok(())
    })
}

/// SIGINT and SIGTERM, installed once so that none is lost between two waits.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
