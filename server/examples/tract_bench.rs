//! tract against ONNX Runtime for BENCHMARKS.md: each model loaded by both backends
//! exactly as the server loads them, both on one thread (tract runs a plan on its
//! instance's thread; ONNX Runtime gets `intra_op_threads: 1` and the file as it is,
//! without `fold_graph`'s rewrite), called with the same
//! inputs at several batch sizes. tract runs twice: as the server runs it by default
//! (planned for batch 1, a batch run row by row) and with a plan per batch size (what
//! `allowed_batch_sizes` gives). They alternate in short rounds, so a machine whose
//! speed drifts slows all alike; the largest output difference is reported too.
//!
//! cargo run --release --features tract --example tract_bench -- MODEL_DIR... [--batches 1,4,8] [--rounds 6] [--round-seconds 1]

use sluice_ops::Tensor;
use sluice_server::backend::{self, Backend};
use sluice_server::offline;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
use common::inputs_for;

fn main() -> anyhow::Result<()> {
    let mut dirs = Vec::new();
    let mut batches = vec![1usize, 4, 8];
    let (mut rounds, mut round_seconds) = (6usize, 1.0f64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if !a.starts_with("--") {
            dirs.push(PathBuf::from(a));
            continue;
        }
        let v = args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?;
        match a.as_str() {
            "--batches" => batches = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--rounds" => rounds = v.parse()?,
            "--round-seconds" => round_seconds = v.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(
        !dirs.is_empty(),
        "usage: tract_bench MODEL_DIR... [--batches 1,4,8] [--rounds 6] [--round-seconds 1]"
    );
    let dylib = std::env::var_os("ORT_DYLIB_PATH")
        .map_or_else(|| PathBuf::from(".sluice/lib/libonnxruntime.so"), PathBuf::from);
    println!(
        "Both backends on one thread, the same files; p50 of {rounds} alternating rounds of {round_seconds} s each.\n"
    );
    println!("| model | batch | ONNX Runtime ms/batch | tract, row by row (default) | tract, plan per batch size | tract default / ORT time | max output difference |");
    println!("|---|---|---|---|---|---|---|");
    for dir in &dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
        let model = offline::read_model_dir(dir, &name).map_err(anyhow::Error::msg)?;
        let (version, onnx) = model.versions.last().ok_or_else(|| anyhow::anyhow!("{name}: no version"))?;
        let onnx = onnx.clone().map_err(anyhow::Error::msg)?;
        let mut spec = offline::read_spec(&model, *version, &onnx).map_err(anyhow::Error::msg)?;
        let batched = spec.config.max_batch_size > 0;
        let sizes = if batched { batches.clone() } else { vec![1] };
        spec.config.intra_op_threads = 1;
        // The same file for both (the server's default rewrites some graphs for ONNX Runtime).
        spec.config.fold_graph = false;
        spec.config.dynamic_batching.allowed_batch_sizes = if batched { sizes.clone() } else { Vec::new() };
        let cfg = &spec.config;
        let source = backend::ort::ModelSource::prepare(&dylib, &spec.onnx_path, cfg).map_err(anyhow::Error::msg)?;
        let mut ort =
            backend::ort::load(&dylib, &source, cfg, 0, &spec.inputs, &spec.outputs).map_err(anyhow::Error::msg)?;
        let tract_sized = backend::tract::TractModel::load(&spec.onnx_path, cfg, &spec.inputs, &spec.outputs)
            .map_err(anyhow::Error::msg)?;
        let mut sized = tract_sized.instance().map_err(anyhow::Error::msg)?;
        let mut default_cfg = cfg.clone();
        default_cfg.dynamic_batching.allowed_batch_sizes.clear();
        let tract_default =
            backend::tract::TractModel::load(&spec.onnx_path, &default_cfg, &spec.inputs, &spec.outputs)
                .map_err(anyhow::Error::msg)?;
        let mut tract = tract_default.instance().map_err(anyhow::Error::msg)?;
        for &n in &sizes {
            let inputs = inputs_for(&spec.inputs, batched, n);
            let a = ort.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            let b = tract.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            let c = sized.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            let diff = difference(&a, &b).max(difference(&a, &c));
            let (mut ort_times, mut tract_times, mut sized_times) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                ort_times.extend(time(&mut ort, &inputs, round_seconds)?);
                tract_times.extend(time(&mut tract, &inputs, round_seconds)?);
                sized_times.extend(time(&mut sized, &inputs, round_seconds)?);
            }
            let (o, t, z) = (p50(&mut ort_times), p50(&mut tract_times), p50(&mut sized_times));
            println!("| {name} | {n} | {:.2} | {:.2} | {:.2} | {:.2} | {diff:.1e} |", o * 1e3, t * 1e3, z * 1e3, t / o);
        }
    }
    Ok(())
}

/// The largest difference between two runs' outputs (relative above 1).
fn difference(a: &[Tensor], b: &[Tensor]) -> f32 {
    a.iter()
        .zip(b)
        .filter_map(|(x, y)| Some((x.to_f32()?, y.to_f32()?)))
        .flat_map(|(x, y)| x.into_iter().zip(y).map(|(p, q)| (p - q).abs() / p.abs().max(1.0)).collect::<Vec<_>>())
        .fold(0.0f32, f32::max)
}

/// Seconds per run over one round.
fn time(b: &mut dyn Backend, inputs: &[Tensor], seconds: f64) -> anyhow::Result<Vec<f64>> {
    let mut runs = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(seconds) || runs.is_empty() {
        let t = Instant::now();
        b.run(inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
        runs.push(t.elapsed().as_secs_f64());
    }
    Ok(runs)
}

fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
