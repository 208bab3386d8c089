//! Starting and stopping a server: bind both listeners, load the repository, serve
//! gRPC and HTTP over one engine, and on shutdown stop accepting, finish in-flight
//! requests, then drain the model queues.

use crate::api::access::{AccessLayer, AccessRules, ModelControl, Protocol, Restriction};
use crate::api::conn::{self, ConnLimits};
use crate::api::inflight::{InflightBudget, InflightLayer};
use crate::api::{grpc::GrpcApi, http, AppState};
use crate::engine::reload::ReloadError;
use crate::engine::{Engine, EngineConfig};
use crate::housekeeping::{Housekeeper, ReloadMode};
use crate::rt::priority::BACKGROUND_NICE;
use crate::sched::pool::PoolConfig;
use crate::telemetry::metrics::Metrics;
use crate::tls::{Tls, TlsFiles};
use axum::serve::ListenerExt;
use sluice_ops::OpRegistry;
use sluice_proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub models_dir: PathBuf,
    /// Folder of pipeline files; `None`: serve models only.
    pub pipelines_dir: Option<PathBuf>,
    /// CPU pools for pipeline ops; a `default` pool is added when none is named so.
    pub pools: Vec<PoolConfig>,
    pub ort_dylib: PathBuf,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Largest gRPC message and HTTP body accepted, in bytes.
    pub max_message_bytes: usize,
    /// Deadline for requests that carry none.
    pub request_timeout: Option<Duration>,
    /// How changes to the repository are picked up while serving.
    pub reload: ReloadMode,
    /// In watch mode, how long the files must stay unchanged before a reload starts
    /// (a model being copied in fires many events).
    pub reload_debounce: Duration,
    /// Serve both protocols over TLS with these files.
    pub tls: Option<TlsFiles>,
    /// Nice value (0-19) of model loads once serving: they take only the CPU requests
    /// leave idle. 0 loads at normal priority.
    pub load_nice: i32,
    /// Gzip gRPC responses for clients that accept it. Off: Triton's clients list gzip
    /// in every request, and deflating each response costs more than sending it on a LAN.
    pub grpc_compress_responses: bool,
    /// The ops pipelines may name: the built-in ones, plus an embedding program's own.
    pub ops: Arc<OpRegistry>,
    /// Other names for models and pipelines, alias -> name: KServe calls a model by its
    /// InferenceService's name.
    pub aliases: BTreeMap<String, String>,
    pub limits: Limits,
    /// Keys per API group and protocol, and who may load and unload.
    pub access: AccessConfig,
}

/// Access control (see `api::access` and docs/security.md).
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub grpc: Vec<Restriction>,
    pub http: Vec<Restriction>,
    pub model_control: ModelControl,
}

/// What one client, one request or a burst of them may take (see docs/security.md).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Pixels of any one image a pipeline decodes, resizes or crops.
    pub max_image_pixels: u64,
    /// Bytes of images alive at once across all requests; past it, requests are refused
    /// (RESOURCE_EXHAUSTED / 429) until others finish.
    pub image_memory_bytes: usize,
    /// Bytes of request bodies received and not yet answered, across all requests.
    pub max_inflight_bytes: usize,
    /// HTTP/2 streams a client may open at once on one connection (advertised).
    pub max_concurrent_streams: u32,
    /// Bytes of gRPC metadata / HTTP headers per request.
    pub max_header_bytes: u32,
    /// Open connections per listener; past it, new clients wait in the backlog.
    pub max_connections: usize,
    /// HTTP/1 clients must send a request's headers within this (and may stay idle
    /// between requests no longer).
    pub header_read_timeout: Duration,
    /// Clients must send a request's whole body (HTTP, or a gRPC message) within this.
    pub body_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_image_pixels: sluice_ops::memory::DEFAULT_MAX_IMAGE_PIXELS,
            image_memory_bytes: sluice_ops::memory::DEFAULT_IMAGE_MEMORY_BYTES,
            max_inflight_bytes: 512 << 20,
            max_concurrent_streams: 128,
            max_header_bytes: 64 << 10,
            // Below the usual 1024 open files per process, with room for model files.
            max_connections: 768,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
        }
    }
}

impl ServerConfig {
    /// Serves the models in `models_dir` (no pipelines) with the defaults of `sluice
    /// serve`, on ephemeral loopback ports.
    pub fn new(models_dir: impl Into<PathBuf>) -> ServerConfig {
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        ServerConfig {
            models_dir: models_dir.into(),
            pipelines_dir: None,
            pools: Vec::new(),
            ort_dylib: PathBuf::from(".sluice/lib/libonnxruntime.so"),
            grpc_addr: loopback,
            http_addr: loopback,
            max_message_bytes: 256 << 20,
            request_timeout: None,
            reload: ReloadMode::Watch,
            reload_debounce: Duration::from_millis(500),
            tls: None,
            load_nice: BACKGROUND_NICE,
            grpc_compress_responses: false,
            ops: Arc::new(OpRegistry::builtin()),
            aliases: BTreeMap::new(),
            limits: Limits::default(),
            access: AccessConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Repository(#[from] ReloadError),
    #[error("cannot start {what}: {message}")]
    Thread { what: &'static str, message: String },
    /// The housekeeping thread or the repository watcher could not start.
    #[error("{0}")]
    Housekeeping(String),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Config(String),
}

pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub engine: Arc<Engine>,
    stop: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    housekeeper: Housekeeper,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
}

/// Loads the repository and starts serving; returns once both listeners accept.
pub async fn start(cfg: ServerConfig) -> Result<RunningServer, StartError> {
    if cfg.limits.max_inflight_bytes < cfg.max_message_bytes {
        return Err(StartError::Config(format!(
            "--max-inflight-mb ({} MiB) must be at least --max-message-mb ({} MiB), or no message of the largest \
             size could ever be received",
            cfg.limits.max_inflight_bytes >> 20,
            cfg.max_message_bytes >> 20
        )));
    }
    sluice_ops::memory::set_max_image_pixels(cfg.limits.max_image_pixels);
    sluice_ops::memory::IMAGES.set_limit(cfg.limits.image_memory_bytes);

    // Bad TLS files fail the start before anything is loaded.
    let tls = cfg.tls.as_ref().map(Tls::load).transpose().map_err(StartError::Tls)?;
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        grpc_builder = grpc_builder.tls_config(tls.grpc()).map_err(|e| StartError::Tls(format!("TLS: {e}")))?;
    }
    let grpc_listener = bind(cfg.grpc_addr).await?;
    let http_listener = bind(cfg.http_addr).await?;
    let grpc_addr = grpc_listener.local_addr().map_err(|source| StartError::Bind { addr: cfg.grpc_addr, source })?;
    let http_addr = http_listener.local_addr().map_err(|source| StartError::Bind { addr: cfg.http_addr, source })?;

    let mut pools = cfg.pools.clone();
    if !pools.iter().any(|p| p.name == PoolConfig::DEFAULT_NAME) {
        pools.push(PoolConfig::default_pool());
    }
    let engine_cfg = EngineConfig {
        models_dir: cfg.models_dir.clone(),
        ort_dylib: cfg.ort_dylib.clone(),
        pipelines_dir: cfg.pipelines_dir.clone(),
        pools,
        ops: cfg.ops.clone(),
        load_nice: cfg.load_nice,
        aliases: cfg.aliases.clone(),
    };
    // The engine starts empty; the repository loads once both protocols answer, so that
    // liveness and the startup probe answer while a large repository loads.
    let engine = tokio::task::spawn_blocking(move || Engine::new(engine_cfg, Metrics::new()))
        .await
        .map_err(|e| StartError::Thread { what: "the engine", message: e.to_string() })??;
    let engine = Arc::new(engine);
    let (stop, stopped) = watch::channel(false);
    let inflight = InflightLayer::new(
        InflightBudget::new(cfg.limits.max_inflight_bytes, cfg.max_message_bytes),
        stopped.clone(),
        cfg.limits.body_read_timeout,
    );
    let draining = Arc::new(AtomicBool::new(false));
    let state = AppState {
        engine: engine.clone(),
        default_timeout: cfg.request_timeout,
        model_control: cfg.reload != ReloadMode::None,
        stopping: stopped.clone(),
        draining: draining.clone(),
    };

    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut grpc = GrpcInferenceServiceServer::new(GrpcApi { state: state.clone() })
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes)
        // tritonclient and perf_analyzer can compress requests with gzip.
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    // tonic compresses whenever a client lists gzip as acceptable, and Triton's clients
    // always do: only when the operator asks, as Triton does.
    if cfg.grpc_compress_responses {
        grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
    }
    // Connections are counted and set to nodelay as they are accepted (api::conn).

    let health = crate::api::health::service(state.clone());
    let conn_limits = ConnLimits {
        max_connections: cfg.limits.max_connections,
        header_read_timeout: cfg.limits.header_read_timeout,
        max_concurrent_streams: cfg.limits.max_concurrent_streams,
        max_header_bytes: cfg.limits.max_header_bytes,
    };
    let incoming = conn::grpc_incoming(grpc_listener, &conn_limits, stopped.clone());
    let grpc_stop = wait_stop(stopped.clone());
    let (limits, inflight_grpc) = (cfg.limits.clone(), inflight.clone());
    let model_control = if cfg.reload == ReloadMode::None { ModelControl::Off } else { cfg.access.model_control };
    let rules = |restrictions: &Vec<Restriction>| AccessRules { restrictions: restrictions.clone(), model_control };
    let grpc_access = AccessLayer::new(rules(&cfg.access.grpc), Protocol::Grpc);
    let http_access = AccessLayer::new(rules(&cfg.access.http), Protocol::Http);
    let grpc_task = tokio::spawn(async move {
        let served = grpc_builder
            // Image tensors are large: the 64 KiB HTTP/2 default window costs round trips.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .max_concurrent_streams(Some(limits.max_concurrent_streams))
            .http2_max_header_list_size(Some(limits.max_header_bytes))
            // Outermost first: refused callers send no bytes into the budget.
            .layer(grpc_access)
            .layer(inflight_grpc)
            .add_service(grpc)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, grpc_stop)
            .await;
        if let Err(e) = served {
            tracing::error!("gRPC server stopped: {e}");
        }
    });

    // Router layers wrap what came before: the access check runs first.
    let app = http::router(state, cfg.max_message_bytes).layer(inflight).layer(http_access);

    let http_stop = stopped;
    let http_task = match &tls {
        Some(tls) => {
            let listener =
                tls.http_listener(http_listener).map_err(|source| StartError::Bind { addr: cfg.http_addr, source })?;
            spawn_http(listener, app, conn_limits, http_stop)
        }
        None => spawn_http(
            http_listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
            conn_limits,
            http_stop,
        ),
    };

    let tasks = vec![grpc_task, http_task];

    // Loading runs models (warm-up): keep it off the async runtime's threads.
    let loader = engine.clone();
    let loaded = tokio::task::spawn_blocking(move || loader.load_repository())
        .await
        .map_err(|e| StartError::Thread { what: "the repository load", message: e.to_string() })
        .and_then(|r| r.map_err(StartError::from));
    let housekeeper = loaded.and_then(|()| {
        Housekeeper::start(engine.clone(), cfg.reload, cfg.reload_debounce).map_err(StartError::Housekeeping)
    });
    let housekeeper = match housekeeper {
        Ok(h) => h,
        Err(e) => {
            let _ = stop.send(true);
            for t in tasks {
                let _ = t.await;
            }
            // The engine's last owner: drop it (joining model threads) off the runtime.
            let _ = tokio::task::spawn_blocking(move || drop(engine)).await;
            return Err(e);
        }
    };
    tracing::info!(%grpc_addr, %http_addr, tls = tls.is_some(), "sluice is serving");
    Ok(RunningServer { grpc_addr, http_addr, engine, stop, draining, tasks, housekeeper })
}

fn spawn_http<L>(listener: L, app: axum::Router, limits: ConnLimits, stop: watch::Receiver<bool>) -> JoinHandle<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    tokio::spawn(conn::serve_http(listener, app, limits, stop))
}

impl RunningServer {
    /// Turns every readiness answer (HTTP, v2 gRPC, grpc.health.v1, per model) to
    /// not-ready while requests are still served.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The drain a rolling update needs: not ready at once, serving on for `delay`
    /// (while endpoints and balancers drop this replica), then `shutdown`.
    pub async fn drain(self, delay: Duration) {
        self.begin_drain();
        if !delay.is_zero() {
            tracing::info!("draining: not ready; serving for {} ms more", delay.as_millis());
            tokio::time::sleep(delay).await;
        }
        self.shutdown().await
    }

    /// Stops accepting, lets in-flight requests finish, then stops the model instances.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // The protocol servers are gone; the housekeeping thread (which may be loading a
        // model) goes next, so the engine's last owner is here: dropping it drains each
        // model's queue and joins its instance threads, off the runtime.
        let (engine, housekeeper) = (self.engine, self.housekeeper);
        let _ = tokio::task::spawn_blocking(move || {
            drop(housekeeper);
            drop(engine)
        })
        .await;
    }
}
