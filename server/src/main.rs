//! The `sluice` command: serve a model repository, or check one without serving.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use sluice_server::pipeline::{self, compile::Located, Catalog, ModelSig};
use sluice_server::repository;
use sluice_server::sched::pool::PoolConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sluice", version, about = "An inference server for multi-model vision pipelines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every model of the repository over gRPC and HTTP (KServe v2 protocol).
    Serve(ServeArgs),
    /// Validate the model repository and the pipeline files without serving.
    Check(CheckArgs),
    /// Print a pipeline's compiled graph in Graphviz DOT (`| dot -Tsvg > p.svg`).
    Graph(GraphArgs),
}

#[derive(Args)]
struct GraphArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The pipeline's name (its file `pipelines/<name>.yaml`) or a path to a pipeline file.
    pipeline: String,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
        Command::Graph(args) => graph(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = sluice_server::ServerConfig {
        models_dir: args.repo.models,
        pipelines_dir: Some(args.repo.pipelines),
        pools: args.repo.pools,
        ort_dylib: args.ort_dylib,
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        max_message_bytes: args.max_message_mb.saturating_mul(1024 * 1024),
        request_timeout: (args.request_timeout_ms > 0).then(|| Duration::from_millis(args.request_timeout_ms)),
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

/// Signatures for compiling pipelines without loading models: the scanned repository.
struct Scanned {
    models: Vec<repository::Scanned>,
    pools: Vec<String>,
}

impl Scanned {
    fn new(repo: &RepoArgs) -> anyhow::Result<Scanned> {
        let models = repository::scan(&repo.models).map_err(anyhow::Error::msg)?;
        let mut pools: Vec<String> = repo.pools.iter().map(|p| p.name.clone()).collect();
        if !pools.iter().any(|p| p == PoolConfig::DEFAULT_NAME) {
            pools.push(PoolConfig::DEFAULT_NAME.to_string());
        }
        Ok(Scanned { models, pools })
    }
}

impl Catalog for Scanned {
    fn model(&self, name: &str) -> Option<Result<ModelSig, String>> {
        self.models
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, spec)| spec.as_ref().map(|s| s.signature()).map_err(Clone::clone))
    }
    fn pools(&self) -> Vec<String> {
        self.pools.clone()
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let scanned = Scanned::new(&args.repo)?;
    let mut failed = 0;
    for (name, spec) in &scanned.models {
        match spec {
            Ok(s) => {
                let io = |ts: &[repository::onnx::TensorInfo]| {
                    ts.iter().map(|t| format!("{} {}{:?}", t.name, t.dtype, t.dims)).collect::<Vec<_>>().join(", ")
                };
                println!(
                    "ok     {name}: max_batch_size {}, inputs [{}], outputs [{}]",
                    s.config.max_batch_size,
                    io(&s.inputs),
                    io(&s.outputs)
                );
            }
            Err(e) => {
                failed += 1;
                println!("error  {name}: {e}");
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
