//! `sluice bench`: load-test a model or pipeline on any v2 server, closed or open loop.

use crate::remote::{connect, parse_named_file, read_files, read_tensor_files, ConnArgs};
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
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
    /// Image files for the model's BYTES input: each request carries them in turn, as many
    /// as its batch holds (repeated when the batch is larger).
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
    /// A request parameter sent with every request, NAME=VALUE (as `sluice infer --param`).
    #[arg(long = "param", value_parser = crate::remote::parse_param)]
    params: Vec<(String, sluice_client::Parameter)>,
    /// Write every measured request as CSV (step, load, batch, at_s from the window's
    /// start, latency_ms from its scheduled send, ok), for latency over time.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Watch it live and change the load while it runs (keys: up/down, *, /, p, space, m,
    /// q), starting from one --rate (open loop) or one --concurrency (closed loop). Each
    /// change starts a new row of the exit table. Without a terminal: a line per second.
    #[arg(long)]
    live: bool,
    /// With --live: report the knee, the highest throughput whose p99 stayed within this.
    #[arg(long)]
    p99_slo: Option<f64>,
    /// With --live: requests/s added or taken per up/down key (default: a tenth of --rate).
    #[arg(long)]
    rate_step: Option<f64>,
    /// With --live: the factor of the * and / keys.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    /// With --live: seconds of the sliding window for the percentiles shown.
    #[arg(long, default_value_t = 5)]
    window: u64,
    /// With --live: stop after this many seconds (default: on q in a terminal; 30 without one).
    #[arg(long)]
    duration: Option<f64>,
}

/// The server under test: connections, and what a request to the model needs.
struct Target {
    clients: Vec<sluice_client::Client>,
    metadata: sluice_client::proto::ModelMetadataResponse,
    batched: bool,
    files: Vec<(String, sluice_client::Tensor)>,
    images: Vec<Vec<u8>>,
}

impl Target {
    /// Opens `--connections` connections and reads the model's metadata and the input files.
    async fn connect(args: &Args) -> anyhow::Result<Target> {
        let mut clients = Vec::new();
        for _ in 0..args.connections {
            clients.push(connect(&args.conn).await?);
        }
        let metadata = clients[0].model_metadata(&args.model).await?;
        let batched = clients[0].model_config(&args.model).await.map(|c| c.max_batch_size > 0).unwrap_or(true);
        let files = read_tensor_files(&args.inputs)?;
        let images = read_files(&args.images)?;
        Ok(Target { clients, metadata, batched, files, images })
    }

    fn inputs(&self, args: &Args, batch: usize) -> anyhow::Result<Vec<(String, sluice_client::Tensor)>> {
        bench_inputs(args, &self.metadata, self.batched, batch, &self.files, &self.images)
    }
}

/// Prints the report in `--format` and writes `--out` in the format its extension names.
fn write_report(args: &Args, render: impl Fn(&str) -> anyhow::Result<String>) -> anyhow::Result<()> {
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
    Ok(())
}

/// One request's inputs for `sluice bench` at a batch size: the given tensor files, the
/// images for a BYTES input, generated data for the rest.
fn bench_inputs(
    args: &Args,
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

pub fn run(args: Args) -> anyhow::Result<()> {
    use sluice_client::bench::{self, BenchSpec, Load};
    if args.live {
        return run_live(args);
    }
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
        let target = Target::connect(&args).await?;
        let clients = &target.clients;
        let runs: Vec<(usize, Load)> = args.batch.iter().flat_map(|&b| loads.iter().map(move |&l| (b, l))).collect();
        let mut steps = Vec::new();
        for (k, &(batch, load)) in runs.iter().enumerate() {
            let spec = BenchSpec {
                model: args.model.clone(),
                inputs: target.inputs(&args, batch)?,
                warmup: Duration::from_secs_f64(args.warmup),
                duration: Duration::from_secs_f64(args.seconds),
                timeout: None,
                batch,
                keep_samples: args.samples.is_some(),
                timing: args.timing,
                parameters: args.params.clone(),
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
            let step = bench::run_step(clients, &spec, load).await;
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
    write_report(&args, render)?;
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

/// `--live`: one load that the keys change, shown as it runs; the segments between
/// changes are the exit table's rows.
fn run_live(args: Args) -> anyhow::Result<()> {
    use sluice_client::bench::{self, Load};
    use sluice_client::live::{self, LiveRun, LiveSpec};
    use std::io::IsTerminal;
    let load = match (args.rate.as_slice(), args.concurrency.as_slice()) {
        ([], []) => Load::Closed(1),
        ([rate], []) if rate.is_finite() && *rate > 0.0 => Load::Open { rate: *rate, poisson: args.poisson },
        ([], [n]) if (1..=10_000).contains(n) => Load::Closed(*n),
        _ => bail!("--live starts from one positive --rate or --concurrency; the keys change it while it runs"),
    };
    let batch = match args.batch.as_slice() {
        [b] if *b > 0 => *b,
        _ => bail!("--live takes one --batch"),
    };
    if args.connections == 0 || args.window == 0 || !(args.factor.is_finite() && args.factor > 1.0) {
        bail!("--connections and --window must be positive and --factor above 1");
    }
    if args.rate_step.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        bail!("--rate-step must be positive");
    }
    if !["table", "markdown", "md", "csv", "json"].contains(&args.format.as_str()) {
        bail!("unknown format '{}' (table, markdown, csv, json)", args.format);
    }
    if args.samples.is_some() || args.timing || !args.params.is_empty() {
        bail!(
            "--samples, --timing and --param are for stepped runs; --live keeps a per-second timeline (--out FILE.csv)"
        );
    }
    let keys = crate::live::Keys {
        rate_step: args.rate_step.unwrap_or(match load {
            Load::Open { rate, .. } => (rate / 10.0).max(0.1),
            Load::Closed(_) => 1.0,
        }),
        factor: args.factor,
    };
    let tty = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    let limit = match args.duration {
        None => None,
        Some(s) if s > 0.0 => Some(Duration::try_from_secs_f64(s).context("--duration")?),
        Some(_) => bail!("--duration must be positive"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let report = rt.block_on(async {
        let target = Target::connect(&args).await?;
        let spec = LiveSpec {
            model: args.model.clone(),
            inputs: target.inputs(&args, batch)?,
            timeout: None,
            batch,
            window: Duration::from_secs(args.window),
        };
        let run = LiveRun::start(target.clients, spec, load);
        if tty {
            let view = crate::live::View { title: &args.model, slo_ms: args.p99_slo, window_s: args.window };
            crate::live::tui(&run, view, keys, limit).await;
        } else {
            crate::live::lines(&run, limit.unwrap_or(Duration::from_secs(30))).await;
        }
        anyhow::Ok(run.stop(Duration::from_secs(10)).await)
    })?;
    let render = |format: &str| -> anyhow::Result<String> {
        Ok(match format {
            "table" => crate::live::summary(&report, &bench::table(&report.segments), args.p99_slo),
            "markdown" | "md" => crate::live::summary(&report, &bench::markdown(&report.segments), args.p99_slo),
            "csv" => live::seconds_csv(&report.seconds),
            "json" => serde_json::to_string_pretty(&report.to_json(args.p99_slo))?,
            other => bail!("unknown format '{other}' (table, markdown, csv, json)"),
        })
    };
    write_report(&args, render)?;
    if let Some(plot) = &args.plot {
        let title = format!("sluice bench --live: {}", args.model);
        let svg = live::svg_timeline(&report, &title, args.p99_slo).map_err(anyhow::Error::msg)?;
        std::fs::write(plot, svg).with_context(|| format!("writing {}", plot.display()))?;
    }
    Ok(())
}
