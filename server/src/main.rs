//! The `sluice` command: serve a model repository, or check one without serving.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use sluice_server::pipeline::{self, compile::Located, Catalog, ModelSig};
use sluice_server::reload::ReloadMode;
use sluice_server::repository::{self, ModelSpec};
use sluice_server::sched::pool::PoolConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sluice", version, about = "An inference server for multi-model vision pipelines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as plain text or as JSON objects (one per line, with the span fields:
    /// request id, model, pipeline node). Levels: SLUICE_LOG, e.g. `info,sluice_server=debug`.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
    /// Export spans (request, node, batch) over OpenTelemetry's OTLP/HTTP (protobuf) to
    /// this collector, e.g. http://127.0.0.1:4318 (spans go to its /v1/traces).
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every model of the repository over gRPC and HTTP (KServe v2 protocol).
    Serve(ServeArgs),
    /// Validate the model repository and the pipeline files without serving.
    Check(CheckArgs),
    /// Print a pipeline's compiled graph in Graphviz DOT (`| dot -Tsvg > p.svg`).
    Graph(GraphArgs),
    /// Write an ONNX model with the exact rewrites `fold_graph` applies at load time, to
    /// inspect them or to run the same graph elsewhere.
    Fold(FoldArgs),
    /// Read the text in images with a running server's OCR pipeline and print the lines.
    Ocr(OcrArgs),
    /// List a running server's models and pipelines with their state.
    Models(ModelsArgs),
    /// Make a running server reload its repository now, or load or unload named models
    /// and pipelines (the v2 repository API).
    Reload(ReloadArgs),
    /// Send images or tensors from files to a model or pipeline; print the outputs as JSON.
    Infer(InferArgs),
    /// Load-test a model or pipeline on any v2 server (sluice, Triton): closed loop over
    /// concurrencies or open loop over request rates.
    Bench(BenchArgs),
}

/// Where a client command finds the server, and how it authenticates it.
#[derive(Args)]
struct ConnArgs {
    /// The server's gRPC address (https://... for TLS).
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8001")]
    url: String,
    /// CA certificates (PEM) to trust for the server's certificate (default: the system's).
    #[arg(long, env = "SLUICE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the URL's host).
    #[arg(long, env = "SLUICE_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Client certificate (PEM) for servers that require one; needs --tls-key.
    #[arg(long, env = "SLUICE_CLIENT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SLUICE_CLIENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The model or pipeline.
    model: String,
    /// Closed loop: requests in flight, one step per value (default 1,2,4,8,16 unless --rate).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Open loop: requests per second, one step per value.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Open loop with Poisson arrivals (default: evenly spaced).
    #[arg(long)]
    poisson: bool,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured seconds before each step.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// gRPC connections to spread requests over.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Items per request along the batch dimension (generated inputs and images); several
    /// values sweep batch sizes, each over every concurrency or rate.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Image files for the model's BYTES input (one image per request, cycling is not needed: the same request repeats).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A tensor input: NAME=FILE with v2 JSON {"datatype", "shape", "data"}; other inputs are generated.
    #[arg(long = "input", value_parser = parse_named_file)]
    inputs: Vec<(String, PathBuf)>,
    /// Generated inputs are all zeros (default: values spread over [0, 1)); matches
    /// perf_analyzer's `--input-data zero` for a like-for-like comparison.
    #[arg(long)]
    zero_data: bool,
    /// table, markdown, csv or json.
    #[arg(long, default_value = "table")]
    format: String,
    /// Also write the result here (format from the extension: .md, .csv, .json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write an SVG plot of throughput and latency percentiles against the load.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Ask sluice for each request's per-step timing (pipeline nodes' queue and compute)
    /// and report its mean per step.
    #[arg(long)]
    timing: bool,
    /// Write every measured request as CSV (step, load, batch, at_s from the window's
    /// start, latency_ms from its scheduled send, ok), for latency over time.
    #[arg(long)]
    samples: Option<PathBuf>,
}

#[derive(Args)]
struct ReloadArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Unload the named models or pipelines instead of loading them.
    #[arg(long)]
    unload: bool,
    /// Models or pipelines to load again (even if unchanged); none: reload the whole
    /// repository, loading only what changed.
    names: Vec<String>,
}

#[derive(Args)]
struct ModelsArgs {
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
struct InferArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The model or pipeline.
    model: String,
    /// Image files, sent as one BYTES input [n, 1] (a pipeline's encoded images).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The input the images go to (default: the model's only BYTES input).
    #[arg(long)]
    image_input: Option<String>,
    /// A tensor input: NAME=FILE, the file holding v2 JSON: {"datatype", "shape", "data"}.
    #[arg(long = "input", value_parser = parse_named_file)]
    inputs: Vec<(String, PathBuf)>,
    /// Deadline in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
}

fn parse_named_file(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s.split_once('=').ok_or_else(|| format!("'{s}': expected NAME=FILE"))?;
    Ok((name.to_string(), PathBuf::from(file)))
}

#[derive(Args)]
struct OcrArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The pipeline to call (it takes `image` and gives `boxes`, `texts`, `scores`).
    #[arg(long, default_value = "ocr")]
    pipeline: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Image files (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct GraphArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The pipeline's name (its file `pipelines/<name>.yaml`) or a path to a pipeline file.
    pipeline: String,
}

#[derive(Args)]
struct FoldArgs {
    /// The ONNX model to read.
    input: PathBuf,
    /// Where to write the rewritten model (written even when nothing applied: then a copy).
    output: PathBuf,
}

#[derive(Args)]
struct RepoArgs {
    /// The model repository: one folder per model holding model.onnx and model.yaml.
    #[arg(long, env = "SLUICE_MODELS", default_value = "models")]
    models: PathBuf,
    /// Folder of pipeline files (`<name>.yaml`), served as models of the same name.
    #[arg(long, env = "SLUICE_PIPELINES", default_value = "pipelines")]
    pipelines: PathBuf,
    /// A CPU pool for pipeline ops, `name=threads[:queue]`; repeat for more. A `default`
    /// pool with one thread per core is added unless one is given.
    #[arg(long = "pool", value_parser = PoolConfig::parse)]
    pools: Vec<PoolConfig>,
}

#[derive(Args)]
struct ServeArgs {
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
    /// How long a graceful shutdown may wait for in-flight requests before exiting anyway.
    #[arg(long, env = "SLUICE_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    shutdown_timeout_s: u64,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    repo: RepoArgs,
}

fn main() {
    if let Err(e) = run() {
        // The message chain alone: users need what went wrong, not a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let cli = Cli::parse();
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info,ort=warn".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match cli.log_format {
        LogFormat::Plain => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).boxed(),
    };
    // Spans to an OpenTelemetry collector, with a filter of their own (node and batch
    // spans are debug level: made only when exported); flushed when the command returns.
    let (otlp, _flush) = match &cli.otlp_endpoint {
        Some(endpoint) => {
            let (layer, flush) = sluice_server::otlp::layer(endpoint).map_err(anyhow::Error::msg)?;
            let spans =
                EnvFilter::try_from_env("SLUICE_OTLP_LOG").unwrap_or_else(|_| "info,sluice_server=debug".into());
            (Some(layer.with_filter(spans)), Some(flush))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(otlp).init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
        Command::Graph(args) => graph(args),
        Command::Fold(args) => fold(args),
        Command::Ocr(args) => ocr(args),
        Command::Models(args) => models(args),
        Command::Reload(args) => reload(args),
        Command::Infer(args) => infer(args),
        Command::Bench(args) => bench(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    sluice_server::sched::threads::set_background_nice(args.load_nice);
    let cfg = sluice_server::ServerConfig {
        models_dir: args.repo.models,
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
            (Some(cert), Some(key)) => Some(sluice_server::tls::TlsFiles { cert, key, client_ca: args.tls_client_ca }),
            _ => None,
        },
    };
    // The runtime does I/O only; models run on their own instance threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-io")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let server = sluice_server::server::start(cfg).await?;
        println!("sluice serving gRPC on {} and HTTP on {}", server.grpc_addr, server.http_addr);
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests (a second signal exits at once)");
        tokio::spawn(async {
            shutdown_signal().await;
            eprintln!("second signal: exiting without finishing in-flight requests");
            std::process::exit(130);
        });
        match tokio::time::timeout(Duration::from_secs(args.shutdown_timeout_s), server.shutdown()).await {
            Ok(()) => tracing::info!("stopped"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within {} s; exiting", args.shutdown_timeout_s);
                std::process::exit(1);
            }
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

type VersionSpec = (u64, Result<ModelSpec, String>);

/// Signatures for compiling pipelines without loading models: the scanned repository,
/// every served version of every model read and checked.
struct Scanned {
    models: Vec<(String, Result<Vec<VersionSpec>, String>)>,
    pools: Vec<String>,
}

impl Scanned {
    fn new(repo: &RepoArgs) -> anyhow::Result<Scanned> {
        let models = repository::scan(&repo.models)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(|(name, dir)| {
                let versions = dir.map(|dir| {
                    dir.versions
                        .iter()
                        .map(|(v, onnx)| (*v, onnx.clone().and_then(|path| repository::read_spec(&dir, *v, &path))))
                        .collect()
                });
                (name, versions)
            })
            .collect();
        let mut pools: Vec<String> = repo.pools.iter().map(|p| p.name.clone()).collect();
        if !pools.iter().any(|p| p == PoolConfig::DEFAULT_NAME) {
            pools.push(PoolConfig::DEFAULT_NAME.to_string());
        }
        Ok(Scanned { models, pools })
    }
}

impl Catalog for Scanned {
    fn model(&self, name: &str, version: Option<u64>) -> Option<Result<ModelSig, String>> {
        let (_, versions) = self.models.iter().find(|(n, _)| n == name)?;
        Some(versions.as_ref().map_err(Clone::clone).and_then(|versions| {
            let found = match version {
                Some(v) => versions.iter().find(|(n, _)| *n == v),
                None => versions.iter().rev().find(|(_, s)| s.is_ok()).or(versions.last()),
            };
            match found {
                Some((_, spec)) => spec.as_ref().map(ModelSpec::signature).map_err(Clone::clone),
                None => Err(format!("version {} is not served", version.unwrap_or(0))),
            }
        }))
    }
    fn pools(&self) -> Vec<String> {
        self.pools.clone()
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let scanned = Scanned::new(&args.repo)?;
    let mut failed = 0;
    for (name, versions) in &scanned.models {
        let versions = match versions {
            Ok(v) => v,
            Err(e) => {
                failed += 1;
                println!("error  {name}: {e}");
                continue;
            }
        };
        for (v, spec) in versions {
            match spec {
                Ok(s) => {
                    let io = |ts: &[repository::onnx::TensorInfo]| {
                        ts.iter().map(|t| format!("{} {}{:?}", t.name, t.dtype, t.dims)).collect::<Vec<_>>().join(", ")
                    };
                    println!(
                        "ok     {name} v{v}: max_batch_size {}, inputs [{}], outputs [{}]",
                        s.config.max_batch_size,
                        io(&s.inputs),
                        io(&s.outputs)
                    );
                }
                Err(e) => {
                    failed += 1;
                    println!("error  {name} v{v}: {e}");
                }
            }
        }
    }
    let files = pipeline::list_files(&args.repo.pipelines).map_err(anyhow::Error::msg)?;
    for (name, file) in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        match pipeline::compile(name, file, &text, &scanned) {
            Ok(plan) => {
                println!("ok     pipeline {name}: {} nodes", plan.nodes.len());
                for w in &plan.warnings {
                    println!("warn   {}", Located(file, w));
                }
            }
            Err(e) => {
                failed += 1;
                for d in &e.errors {
                    println!("error  {}", Located(file, d));
                }
            }
        }
    }
    let total = scanned.models.len() + files.len();
    if failed > 0 {
        bail!("{failed} of {total} models and pipelines have errors");
    }
    println!("{} models and {} pipelines ok", scanned.models.len(), files.len());
    Ok(())
}

fn graph(args: GraphArgs) -> anyhow::Result<()> {
    let scanned = Scanned::new(&args.repo)?;
    let as_path = PathBuf::from(&args.pipeline);
    let file = if as_path.is_file() { as_path } else { args.repo.pipelines.join(format!("{}.yaml", args.pipeline)) };
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("pipeline").to_string();
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let plan = pipeline::compile(&name, &file, &text, &scanned).map_err(|e| anyhow::anyhow!("{e}"))?;
    print!("{}", plan.to_dot());
    Ok(())
}

fn fold(args: FoldArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let (out, what) = match sluice_server::repository::fold::fold(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?
    {
        Some((out, what)) => (out, format!("folded {what}")),
        None => (bytes, "nothing to fold".to_string()),
    };
    std::fs::write(&args.output, out).with_context(|| format!("writing {}", args.output.display()))?;
    println!("{}: {what}", args.output.display());
    Ok(())
}

/// One recognised line.
struct Line {
    text: String,
    score: f32,
    corners: Vec<(f32, f32)>,
}

fn ocr(args: OcrArgs) -> anyhow::Result<()> {
    use sluice_client::{encoded_images, InferOptions};
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let results = rt.block_on(async {
        let client = connect(&args.conn).await?;
        let calls = args.images.iter().map(|path| {
            let client = client.clone();
            let pipeline = args.pipeline.clone();
            async move {
                let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let out = client
                    .infer(&pipeline, &[("image", &encoded_images(&[data]))], InferOptions::default())
                    .await
                    .with_context(|| format!("{}", path.display()))?;
                let get = |name: &str| {
                    out.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
                        anyhow::anyhow!("pipeline '{pipeline}' gave no output '{name}' (it needs boxes, texts, scores)")
                    })
                };
                let texts = get("texts")?.bytes_elements().map_err(|e| anyhow::anyhow!("texts: {e}"))?;
                let scores = get("scores")?.to_f32().context("scores are not FP32")?;
                let boxes = get("boxes")?.to_f32().context("boxes are not FP32")?;
                let lines: Vec<Line> = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Line {
                        text: String::from_utf8_lossy(t).into_owned(),
                        score: scores.get(i).copied().unwrap_or(0.0),
                        corners: boxes.get(i * 8..i * 8 + 8).unwrap_or(&[]).chunks(2).map(|c| (c[0], c[1])).collect(),
                    })
                    .collect();
                anyhow::Ok(lines)
            }
        });
        anyhow::Ok(futures::future::join_all(calls).await)
    })?;
    let mut failed = 0;
    let mut json = Vec::new();
    for (path, result) in args.images.iter().zip(results) {
        match result {
            Ok(lines) if args.json => json.push(serde_json::json!({
                "image": path.display().to_string(),
                "lines": lines.iter().map(|l| serde_json::json!({
                    "text": l.text,
                    "score": l.score,
                    "box": l.corners.iter().map(|&(x, y)| [x, y]).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })),
            Ok(lines) => {
                println!("{}", path.display());
                for l in &lines {
                    let corners: Vec<String> = l.corners.iter().map(|(x, y)| format!("({x:.0},{y:.0})")).collect();
                    println!("  {:.3}  {}  {}", l.score, corners.join(" "), l.text);
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    if failed > 0 {
        bail!("{failed} of {} images failed", args.images.len());
    }
    Ok(())
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

async fn connect(conn: &ConnArgs) -> anyhow::Result<sluice_client::Client> {
    use sluice_client::{ConnectOptions, TlsOptions};
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = if conn.tls_ca.is_some() || conn.tls_domain.is_some() || conn.tls_cert.is_some() {
        let identity = match (&conn.tls_cert, &conn.tls_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Some(TlsOptions {
            ca_pem: conn.tls_ca.as_ref().map(read).transpose()?,
            domain: conn.tls_domain.clone(),
            identity,
        })
    } else {
        None
    };
    let opts = ConnectOptions { tls, connect_timeout: Some(Duration::from_secs(10)), ..Default::default() };
    let url = &conn.url;
    sluice_client::Client::connect_with(url.clone(), opts).await.with_context(|| format!("connecting to {url}"))
}

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    let index =
        client_runtime()?.block_on(async { anyhow::Ok(connect(&args.conn).await?.repository_index().await?) })?;
    let width = index.iter().map(|m| m.name.len()).max().unwrap_or(4).max(4);
    println!("{:width$}  {:7}  {:11}  REASON", "NAME", "VERSION", "STATE");
    for m in &index {
        // A reason can span lines (every compile error of a pipeline): indent the rest.
        let reason = m.reason.replace('\n', &format!("\n{:1$}", "", width + 24));
        println!("{:width$}  {:7}  {:11}  {reason}", m.name, m.version, m.state);
    }
    Ok(())
}

fn reload(args: ReloadArgs) -> anyhow::Result<()> {
    client_runtime()?.block_on(async {
        let client = connect(&args.conn).await?;
        if args.names.is_empty() {
            if args.unload {
                bail!("name the models or pipelines to unload");
            }
            client.repository_load("").await.context("reloading the repository")?;
            println!("reloaded the repository");
        }
        for name in &args.names {
            if args.unload {
                client.repository_unload(name).await.with_context(|| format!("unloading '{name}'"))?;
                println!("unloaded {name}");
            } else {
                client.repository_load(name).await.with_context(|| format!("loading '{name}'"))?;
                println!("loaded {name}");
            }
        }
        // What serves now, with the reason of anything that failed.
        let index = client.repository_index().await?;
        for m in index.iter().filter(|m| !m.reason.is_empty()) {
            println!("{} {} {}: {}", m.name, m.version, m.state, m.reason);
        }
        anyhow::Ok(())
    })
}

fn infer(args: InferArgs) -> anyhow::Result<()> {
    use sluice_client::{encoded_images, InferOptions, Tensor};
    let mut tensors = read_tensor_files(&args.inputs)?;
    let rt = client_runtime()?;
    let outputs = rt.block_on(async {
        let client = connect(&args.conn).await?;
        if !args.images.is_empty() {
            let name = match &args.image_input {
                Some(n) => n.clone(),
                None => {
                    let md = client.model_metadata(&args.model).await?;
                    let bytes: Vec<_> = md.inputs.iter().filter(|i| i.datatype == "BYTES").collect();
                    match bytes.as_slice() {
                        [one] => one.name.clone(),
                        _ => bail!("'{}' has {} BYTES inputs; name one with --image-input", args.model, bytes.len()),
                    }
                }
            };
            let files = args
                .images
                .iter()
                .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            tensors.push((name, encoded_images(&files)));
        }
        let inputs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let opts = InferOptions { timeout: args.timeout_ms.map(Duration::from_millis), ..Default::default() };
        anyhow::Ok(client.infer(&args.model, &inputs, opts).await?)
    })?;
    let json = serde_json::json!({
        "model": args.model,
        "outputs": outputs.iter().map(|(name, t)| serde_json::json!({
            "name": name,
            "datatype": t.dtype.as_str(),
            "shape": t.shape,
            "data": t.to_json(),
        })).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// One request's inputs for `sluice bench` at a batch size: the given tensor files, the
/// images for a BYTES input, generated data for the rest.
fn bench_inputs(
    args: &BenchArgs,
    md: &sluice_client::proto::ModelMetadataResponse,
    batched: bool,
    batch: usize,
    files: &[(String, sluice_client::Tensor)],
    images: &[Vec<u8>],
) -> anyhow::Result<Vec<(String, sluice_client::Tensor)>> {
    use sluice_client::{encoded_images, DataType, Tensor};
    if !batched && batch != 1 {
        bail!("'{}' has no batch dimension (max_batch_size 0): --batch must be 1", args.model);
    }
    // Tensor files hold one request's data: as given when their batch is the one asked
    // for, their single row repeated to fill it otherwise.
    let mut inputs = Vec::with_capacity(files.len());
    for (name, t) in files {
        let rows = t.shape.first().copied().unwrap_or(0);
        let t = match (batched, rows) {
            (false, _) => t.clone(),
            (true, r) if r == batch => t.clone(),
            (true, 1) => Tensor::concat_batch(&vec![t; batch]).map_err(|e| anyhow::anyhow!("input '{name}': {e}"))?,
            (true, r) => bail!("input '{name}': the file holds a batch of {r}; give one row to sweep --batch"),
        };
        inputs.push((name.clone(), t));
    }
    for i in &md.inputs {
        if inputs.iter().any(|(n, _)| n == &i.name) {
            continue;
        }
        let dtype =
            DataType::parse(&i.datatype).with_context(|| format!("input '{}': datatype {}", i.name, i.datatype))?;
        if dtype == DataType::Bytes {
            if images.is_empty() {
                bail!("input '{}' is BYTES: give --image FILE (or --input {}=FILE)", i.name, i.name);
            }
            // The images in turn, as many as the batch holds.
            let many: Vec<&Vec<u8>> = images.iter().cycle().take(batch).collect();
            inputs.push((i.name.clone(), encoded_images(&many)));
            continue;
        }
        // Generated data: the batch size for the batch dimension, 1 for other variable dims.
        let shape: Vec<usize> = i
            .shape
            .iter()
            .enumerate()
            .map(|(k, &d)| {
                if k == 0 && batched {
                    batch
                } else if d < 0 {
                    1
                } else {
                    d as usize
                }
            })
            .collect();
        let n: usize = shape.iter().product();
        let size = dtype.size().unwrap_or(1);
        // Deterministic values in [0, 1) for floats; zeros for other types.
        let data: Vec<u8> = if dtype == DataType::F32 && !args.zero_data {
            (0..n).flat_map(|k| ((k * 7919 % 1000) as f32 / 1000.0).to_le_bytes()).collect()
        } else {
            vec![0; n * size]
        };
        inputs.push((i.name.clone(), Tensor::new(dtype, shape, data.into()).map_err(|e| anyhow::anyhow!("{e}"))?));
    }
    Ok(inputs)
}

/// Tensors from v2 JSON files ({"datatype", "shape", "data"}), by input name.
fn read_tensor_files(files: &[(String, PathBuf)]) -> anyhow::Result<Vec<(String, sluice_client::Tensor)>> {
    use sluice_client::{DataType, Tensor};
    files
        .iter()
        .map(|(name, file)| {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
            let dtype_name = v["datatype"].as_str().with_context(|| format!("{}: no \"datatype\"", file.display()))?;
            let dtype = DataType::parse(dtype_name)
                .with_context(|| format!("{}: unknown datatype {dtype_name}", file.display()))?;
            let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())
                .with_context(|| format!("{}: bad \"shape\"", file.display()))?;
            let data = sluice_ops::tensor::json_to_bytes(dtype, &v["data"])
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let t = Tensor::new(dtype, shape, data).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            Ok((name.clone(), t))
        })
        .collect()
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use sluice_client::bench::{self, BenchSpec, Load};
    if args.seconds <= 0.0 || args.connections == 0 || args.batch.contains(&0) {
        bail!("--seconds, --connections and --batch must be positive");
    }
    for (flag, values) in [("--batch", &args.batch), ("--concurrency", &args.concurrency)] {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = values.iter().find(|v| !seen.insert(**v)) {
            bail!("{flag}: {dup} is given twice");
        }
    }
    let loads: Vec<Load> = if args.rate.is_empty() {
        let c = if args.concurrency.is_empty() { vec![1, 2, 4, 8, 16] } else { args.concurrency.clone() };
        c.into_iter().map(Load::Closed).collect()
    } else {
        args.rate.iter().map(|&rate| Load::Open { rate, poisson: args.poisson }).collect()
    };
    // The whole runtime is the client here: several threads so it is not the bottleneck.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let steps = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..args.connections {
            clients.push(connect(&args.conn).await?);
        }
        let md = clients[0].model_metadata(&args.model).await?;
        let batched = clients[0].model_config(&args.model).await.map(|c| c.max_batch_size > 0).unwrap_or(true);
        let files = read_tensor_files(&args.inputs)?;
        let images = args
            .images
            .iter()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let runs: Vec<(usize, Load)> = args.batch.iter().flat_map(|&b| loads.iter().map(move |&l| (b, l))).collect();
        let mut steps = Vec::new();
        for (k, &(batch, load)) in runs.iter().enumerate() {
            let spec = BenchSpec {
                model: args.model.clone(),
                inputs: bench_inputs(&args, &md, batched, batch, &files, &images)?,
                warmup: Duration::from_secs_f64(args.warmup),
                duration: Duration::from_secs_f64(args.seconds),
                timeout: None,
                batch,
                keep_samples: args.samples.is_some(),
                timing: args.timing,
            };
            let label = format!("bench: step {}/{} batch {batch} {load:?}", k + 1, runs.len());
            eprint!("{label} ... ");
            // On a terminal, a live progress line while the step runs.
            let total = (spec.warmup + spec.duration).as_secs_f64();
            let started = std::time::Instant::now();
            let ticker = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let label = label.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        let t = started.elapsed().as_secs_f64().min(total);
                        let done = (t / total * 30.0) as usize;
                        eprint!("\r{label} [{}{}] {t:.1}/{total:.1} s ", "#".repeat(done), " ".repeat(30 - done));
                    }
                })
            });
            let step = bench::run_step(&clients, &spec, load).await;
            if let Some(t) = ticker {
                t.abort();
                eprint!("\r{label} ... ");
            }
            eprintln!("{:.1} req/s, p50 {:.2} ms, {} errors", step.throughput, step.p50_ms, step.errors);
            if let Some(e) = &step.first_error {
                eprintln!("bench: first error: {e}");
            }
            steps.push(step);
        }
        anyhow::Ok(steps)
    })?;
    let with_steps = |table: String| match bench::steps_markdown(&steps) {
        per_step if per_step.is_empty() => table,
        per_step => format!("{table}\nserver time per request, by step:\n\n{per_step}"),
    };
    let render = |format: &str| -> anyhow::Result<String> {
        Ok(match format {
            // Where the server's time went, per step, below the table when asked for.
            "table" => with_steps(bench::table(&steps)),
            "markdown" | "md" => with_steps(bench::markdown(&steps)),
            "csv" => bench::csv(&steps),
            "json" => serde_json::to_string_pretty(&bench::to_json(&steps))?,
            other => bail!("unknown format '{other}' (table, markdown, csv, json)"),
        })
    };
    print!("{}", render(&args.format)?);
    if let Some(out) = &args.out {
        let format = match out.extension().and_then(|e| e.to_str()) {
            Some("md") => "markdown",
            Some("csv") => "csv",
            Some("json") => "json",
            _ => "table",
        };
        std::fs::write(out, render(format)?).with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(path) = &args.samples {
        // One file for all steps: each step's samples, after the step's number, load
        // (concurrency or rate) and batch size.
        let mut out = String::from("step,load,batch,at_s,latency_ms,ok\n");
        for (k, step) in steps.iter().enumerate() {
            let load = match step.load {
                Load::Closed(n) => n.to_string(),
                Load::Open { rate, .. } => rate.to_string(),
            };
            for line in bench::samples_csv(&step.samples).lines().skip(1) {
                out.push_str(&format!("{},{load},{},{line}\n", k + 1, step.batch));
            }
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(plot) = &args.plot {
        let svg = bench::svg_plot(&steps, &format!("sluice bench: {}", args.model)).map_err(anyhow::Error::msg)?;
        std::fs::write(plot, svg).with_context(|| format!("writing {}", plot.display()))?;
    }
    Ok(())
}
