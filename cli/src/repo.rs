//! Commands on a repository on disk, without a server: `check`, `graph`, `fold`, `ops`.

use anyhow::{bail, Context};
use sluice_server::offline::{compile, list_files, Located, ScannedRepo, TensorInfo};
use sluice_server::{OpRegistry, PoolConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The pipeline's name (its file `pipelines/<name>.yaml`) or a path to a pipeline file.
    pipeline: String,
}

#[derive(clap::Args)]
pub struct FoldArgs {
    /// The ONNX model to read.
    input: PathBuf,
    /// Where to write the rewritten model (written even when nothing applied: then a copy).
    output: PathBuf,
}

#[derive(clap::Args)]
pub struct RepoArgs {
    /// The model repository: one folder per model holding model.onnx and model.yaml.
    #[arg(long, env = "SLUICE_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// Folder of pipeline files (`<name>.yaml`), served as models of the same name.
    #[arg(long, env = "SLUICE_PIPELINES", default_value = "pipelines")]
    pub pipelines: PathBuf,
    /// A CPU pool for pipeline ops, `name=threads[:queue]`; repeat for more. A `default`
    /// pool with one thread per core is added unless one is given.
    #[arg(long = "pool", value_parser = PoolConfig::parse)]
    pub pools: Vec<PoolConfig>,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(clap::Args)]
pub struct OpsArgs {
    /// Print Markdown (the table in docs/pipelines.md) instead of text.
    #[arg(long)]
    markdown: bool,
}

/// The repository read and checked, with the pools a server started with these
/// arguments would have.
fn scan(repo: &RepoArgs, ops: OpRegistry) -> anyhow::Result<ScannedRepo> {
    let mut pools: Vec<String> = repo.pools.iter().map(|p| p.name.clone()).collect();
    if !pools.iter().any(|p| p == PoolConfig::DEFAULT_NAME) {
        pools.push(PoolConfig::DEFAULT_NAME.to_string());
    }
    ScannedRepo::scan(&repo.models, pools, ops).map_err(anyhow::Error::msg)
}

/// Every op of the registry: its summary, its ports (as built with its example params)
/// and its params with their defaults.
pub fn ops(args: OpsArgs, registry: &OpRegistry) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut out = String::new();
    if args.markdown {
        out.push_str("| op | inputs -> outputs | params |\n|---|---|---|\n");
    }
    for spec in registry.iter() {
        let (inputs, outputs) = spec.ports().map_err(|e| anyhow::anyhow!("op '{}': {e}", spec.name))?;
        let ports = |ps: &[sluice_ops::Port]| ps.iter().map(|p| format!("{} ({})", p.name, p.ty)).collect::<Vec<_>>();
        if args.markdown {
            let params: Vec<String> = spec.params.iter().map(|p| format!("`{}` ({})", p.name, p.default)).collect();
            let params = if params.is_empty() { "none".to_string() } else { params.join(", ") };
            let (i, o) = (ports(&inputs).join(", "), ports(&outputs).join(", "));
            writeln!(out, "| `{}` | {i} -> {o} | {params} |", spec.name)?;
            continue;
        }
        writeln!(out, "{}: {}", spec.name, spec.summary)?;
        writeln!(out, "  inputs:  {}", ports(&inputs).join(", "))?;
        writeln!(out, "  outputs: {}", ports(&outputs).join(", "))?;
        for p in spec.params {
            writeln!(out, "  param {} (default {}): {}", p.name, p.default, p.help)?;
        }
        if spec.params.is_empty() {
            writeln!(out, "  no params")?;
        }
    }
    print_all(&out)
}

/// Writes to stdout; a reader that stops early (`| head`) is not an error.
fn print_all(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn check(args: CheckArgs, ops: OpRegistry) -> anyhow::Result<()> {
    let scanned = scan(&args.repo, ops)?;
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
                    let io = |ts: &[TensorInfo]| {
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
    let files = list_files(&args.repo.pipelines).map_err(anyhow::Error::msg)?;
    for (name, file) in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        match compile(name, file, &text, &scanned) {
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

pub fn graph(args: GraphArgs, ops: OpRegistry) -> anyhow::Result<()> {
    let scanned = scan(&args.repo, ops)?;
    let as_path = PathBuf::from(&args.pipeline);
    let file = if as_path.is_file() { as_path } else { args.repo.pipelines.join(format!("{}.yaml", args.pipeline)) };
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("pipeline").to_string();
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let plan = compile(&name, &file, &text, &scanned)?;
    print!("{}", plan.to_dot());
    Ok(())
}

pub fn fold(args: FoldArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let (out, what) =
        match sluice_server::offline::fold(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))? {
            Some((out, what)) => (out, format!("folded {what}")),
            None => (bytes, "nothing to fold".to_string()),
        };
    std::fs::write(&args.output, out).with_context(|| format!("writing {}", args.output.display()))?;
    println!("{}: {what}", args.output.display());
    Ok(())
}
