//! The raw-backend baseline for BENCHMARKS.md: one ONNX Runtime session, created exactly
//! as the server creates its instances, called in a loop at several batch sizes with no
//! server around it.
//!
//! cargo run --release --example ort_bench -- MODEL_DIR [--batches 1,2,4,8] [--seconds 10]

use sluice_server::backend::{self, Backend};
use sluice_server::offline;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
use common::inputs_for;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next().ok_or_else(|| anyhow::anyhow!("usage: ort_bench MODEL_DIR [--batches 1,2,4,8] [--seconds 10]"))?,
    );
    let mut batches = vec![1usize, 2, 4, 8];
    let mut seconds = 10u64;
    while let Some(a) = args.next() {
        let v = args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?;
        match a.as_str() {
            "--batches" => batches = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--seconds" => seconds = v.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let dylib = std::env::var_os("ORT_DYLIB_PATH")
        .map_or_else(|| PathBuf::from(".sluice/lib/libonnxruntime.so"), PathBuf::from);
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
    let model = offline::read_model_dir(&dir, &name).map_err(anyhow::Error::msg)?;
    let (version, onnx) = model.versions.last().ok_or_else(|| anyhow::anyhow!("{name}: no version"))?;
    let onnx = onnx.clone().map_err(anyhow::Error::msg)?;
    let spec = offline::read_spec(&model, *version, &onnx).map_err(anyhow::Error::msg)?;
    let mut b = backend::ort::load(
        &dylib,
        &backend::ort::ModelSource::prepare(&dylib, &spec.onnx_path, &spec.config).map_err(anyhow::Error::msg)?,
        &spec.config,
        spec.config.devices()[0],
        &spec.inputs,
        &spec.outputs,
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "model {name} on {}, intra_op_threads {}, {seconds} s per batch size",
        b.device(),
        spec.config.intra_op_threads
    );
    println!("| batch | items/s | p50 ms/batch |");
    println!("|---|---|---|");
    for &n in &batches {
        let inputs = inputs_for(&spec.inputs, spec.config.max_batch_size > 0, n);
        b.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?; // warm-up
        let mut lat = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            let t = Instant::now();
            b.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            lat.push(t.elapsed());
        }
        let total = start.elapsed();
        lat.sort();
        let p50 = lat[lat.len() / 2];
        println!("| {n} | {:.2} | {:.2} |", (lat.len() * n) as f64 / total.as_secs_f64(), p50.as_secs_f64() * 1e3);
    }
    Ok(())
}
