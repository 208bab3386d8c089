//! The `sluice` command: one module per subcommand, dispatched from one enum.
//!
//! Also a library, for programs that serve sluice with ops of their own: their `main`
//! is `sluice_cli::main_with(ops)`, with the built-in registry plus their ops, and they
//! get the whole command (`serve`, `check`, `graph`, `ops`, ...) with those ops in it.
//! See `examples/custom-op/` and docs/pipelines.md ("Your own ops").

mod bench;
mod live;
mod remote;
mod repo;
mod serve;
mod telemetry;

use clap::{Parser, Subcommand};
pub use sluice_server::{OpRegistry, OpSpec};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sluice", version, about = "An inference server for multi-model vision pipelines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    telemetry: telemetry::Args,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every model of the repository over gRPC and HTTP (KServe v2 protocol).
    Serve(serve::Args),
    /// Validate the model repository and the pipeline files without serving.
    Check(repo::CheckArgs),
    /// Print a pipeline's compiled graph in Graphviz DOT (`| dot -Tsvg > p.svg`).
    Graph(repo::GraphArgs),
    /// Write an ONNX model with the exact rewrites `fold_graph` applies at load time, to
    /// inspect them or to run the same graph elsewhere.
    Fold(repo::FoldArgs),
    /// List every op a pipeline can use, with its inputs, outputs and params.
    Ops(repo::OpsArgs),
    /// Read the text in images with a running server's OCR pipeline and print the lines.
    Ocr(remote::OcrArgs),
    /// List a running server's models and pipelines with their state.
    Models(remote::ModelsArgs),
    /// Make a running server reload its repository now, or load or unload named models
    /// and pipelines (the v2 repository API).
    Reload(remote::ReloadArgs),
    /// Send images or tensors from files to a model or pipeline; print the outputs as JSON.
    Infer(remote::InferArgs),
    /// Load-test a model or pipeline on any v2 server (sluice, Triton): closed loop over
    /// concurrencies or open loop over request rates.
    Bench(bench::Args),
}

/// Runs the `sluice` command line (the process's arguments) with the ops of `ops`: what
/// `sluice serve` serves pipelines with, and what `check`, `graph` and `ops` know.
pub fn main_with(ops: OpRegistry) -> ExitCode {
    #[cfg(feature = "opencv")]
    sluice_opencv::install();
    // Named as invoked: a build with its own ops (`sluice-custom`) says so in its help.
    let bin = std::env::args_os()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "sluice".into());
    let matches = <Cli as clap::CommandFactory>::command().bin_name(bin.clone()).display_name(bin).get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = telemetry::init(&cli.telemetry).and_then(|_flush| match cli.command {
        Command::Serve(a) => serve::run(a, ops),
        Command::Check(a) => repo::check(a, ops),
        Command::Graph(a) => repo::graph(a, ops),
        Command::Fold(a) => repo::fold(a),
        Command::Ops(a) => repo::ops(a, &ops),
        Command::Ocr(a) => remote::ocr(a),
        Command::Models(a) => remote::models(a),
        Command::Reload(a) => remote::reload(a),
        Command::Infer(a) => remote::infer(a),
        Command::Bench(a) => bench::run(a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message chain alone: users need what went wrong, not a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
