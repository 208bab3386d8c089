//! A load generator for any KServe v2 server (sluice, Triton): closed loop (a fixed number
//! of requests in flight) and open loop (requests sent on a schedule, Poisson or evenly
//! spaced, whatever the server does). Open-loop latency is measured from each request's
//! scheduled send time, so a server that falls behind shows it in its latency instead
//! of quietly slowing the client down (coordinated omission).

use crate::{Client, InferOptions, Tensor};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How load is offered in one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// `n` requests in flight at all times.
    Closed(usize),
    /// `rate` requests per second on a schedule: Poisson arrivals, or evenly spaced.
    Open { rate: f64, poisson: bool },
}

/// What to send, and for how long.
#[derive(Clone)]
pub struct BenchSpec {
    pub model: String,
    /// One request's inputs.
    pub inputs: Vec<(String, Tensor)>,
    /// Load is offered but not measured for this long first.
    pub warmup: Duration,
    pub duration: Duration,
    /// Per-request deadline sent to the server.
    pub timeout: Option<Duration>,
    /// Items per request (for the items/s column): the inputs' batch size.
    pub batch: usize,
    /// Keep every measured request in [`Step::samples`] (for latency over time).
    pub keep_samples: bool,
    /// Ask the server (sluice) for each request's per-step timing: [`Step::server_steps`].
    pub timing: bool,
    /// Request parameters sent with every request.
    pub parameters: Vec<(String, crate::Parameter)>,
}

/// The server's time per request in one step of the model or pipeline (its queue and
/// compute summed over the step's items), averaged over the measured requests.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTime {
    pub step: String,
    pub queue_ms: f64,
    pub compute_ms: f64,
    /// Items the step ran per request (fan-out nodes run many).
    pub items: f64,
}

/// One measured request: when it was scheduled (seconds into the measured window), its
/// latency from that moment, and whether it succeeded.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_s: f64,
    pub latency_ms: f64,
    pub ok: bool,
}

/// The measurements of one step.
#[derive(Debug, Clone)]
pub struct Step {
    pub load: Load,
    /// Items per request ([`BenchSpec::batch`]).
    pub batch: usize,
    /// Requests scheduled in the measured window that succeeded (some may finish after it:
    /// their latency counts, their completion does not count towards throughput).
    pub requests: u64,
    pub errors: u64,
    /// Every request sent, warm-up included (what the server saw).
    pub sent: u64,
    pub seconds: f64,
    /// Requests per second that succeeded within the window.
    pub throughput: f64,
    pub items_per_second: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p80_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Open loop: throughput / the requested rate.
    pub service_rate: Option<f64>,
    /// Open loop: p50 of the requests scheduled in the first and last third of the window
    /// (rising when the server cannot keep up).
    pub p50_first_third_ms: f64,
    pub p50_last_third_ms: f64,
    /// From the server's statistics over the step, per request, when it reports them.
    pub server_queue_ms: Option<f64>,
    pub server_compute_ms: Option<f64>,
    pub first_error: Option<String>,
    /// Every measured request, in completion order, when [`BenchSpec::keep_samples`].
    pub samples: Vec<Sample>,
    /// With [`BenchSpec::timing`]: where the server spent each request's time, per step.
    pub server_steps: Vec<StepTime>,
}

struct Recorder {
    all: Histogram<u64>,
    thirds: [Histogram<u64>; 3],
    errors: u64,
    sent: u64,
    /// Successes that also finished inside the window: the throughput.
    done_in_window: u64,
    first_error: Option<String>,
    samples: Vec<Sample>,
    /// Per step: sums of queue µs, compute µs and items over the timed requests.
    steps: Vec<(String, i64, i64, i64)>,
    timed: u64,
}

impl Recorder {
    fn new() -> Recorder {
        let h = || Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Recorder {
            all: h(),
            thirds: [h(), h(), h()],
            errors: 0,
            sent: 0,
            done_in_window: 0,
            first_error: None,
            samples: Vec::new(),
            steps: Vec::new(),
            timed: 0,
        }
    }
}

/// The server's cumulative (requests, queue ns, compute ns) for the model, if it reports them.
pub(crate) async fn server_counts(client: &Client, model: &str) -> Option<(u64, u64, u64)> {
    let stats = client.model_statistics(model).await.ok()?;
    let s = stats.first()?.inference_stats?;
    let (q, c) = (s.queue?, s.compute_infer?);
    Some((s.success?.count, q.ns, c.ns))
}

/// Runs one step against `clients` (several connections, used in turn).
pub async fn run_step(clients: &[Client], spec: &BenchSpec, load: Load) -> Step {
    let rec = Arc::new(Mutex::new(Recorder::new()));
    let before = server_counts(&clients[0], &spec.model).await;
    let t0 = Instant::now();
    let measure_from = t0 + spec.warmup;
    let end = measure_from + spec.duration;
    let third = spec.duration.as_secs_f64() / 3.0;
    let spec = Arc::new(spec.clone());

    // Sends one request; records it if it was scheduled inside the measured window.
    let (rec_all, spec_all) = (rec.clone(), spec.clone());
    let send = move |client: Client, scheduled: Instant| {
        let rec = rec_all.clone();
        let spec = spec_all.clone();
        async move {
            let inputs: Vec<(&str, &Tensor)> = spec.inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let opts = InferOptions {
                timeout: spec.timeout,
                timing: spec.timing,
                parameters: spec.parameters.clone(),
                ..Default::default()
            };
            let result = client.infer_detailed(&spec.model, &inputs, opts).await;
            let done = Instant::now();
            let latency = done - scheduled;
            let mut r = rec.lock().await;
            r.sent += 1;
            if scheduled < measure_from || scheduled >= end {
                return;
            }
            if spec.keep_samples {
                let at_s = (scheduled - measure_from).as_secs_f64();
                let sample = Sample { at_s, latency_ms: latency.as_secs_f64() * 1000.0, ok: result.is_ok() };
                r.samples.push(sample);
            }
            match result {
                Ok(resp) => {
                    if !resp.timing.is_empty() {
                        r.timed += 1;
                        for t in resp.timing {
                            match r.steps.iter_mut().find(|s| s.0 == t.step) {
                                Some(s) => {
                                    s.1 += t.queue_us;
                                    s.2 += t.compute_us;
                                    s.3 += t.items;
                                }
                                None => r.steps.push((t.step, t.queue_us, t.compute_us, t.items)),
                            }
                        }
                    }
                    r.done_in_window += u64::from(done < end);
                    let us = latency.as_micros().max(1) as u64;
                    r.all.saturating_record(us);
                    let k = (((scheduled - measure_from).as_secs_f64() / third) as usize).min(2);
                    r.thirds[k].saturating_record(us);
                }
                Err(e) => {
                    r.errors += 1;
                    r.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    };

    match load {
        Load::Closed(n) => {
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let client = clients[i % clients.len()].clone();
                    let send = send.clone();
                    tokio::spawn(async move {
                        while Instant::now() < end {
                            send(client.clone(), Instant::now()).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        }
        Load::Open { rate, poisson } => {
            let mut rng = SplitMix(0x5eed ^ rate.to_bits());
            let mut next = t0;
            let mut in_flight = Vec::new();
            let mut k = 0usize;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                in_flight.push(tokio::spawn(send(clients[k % clients.len()].clone(), next)));
                k += 1;
                let gap = if poisson { -(1.0 - rng.next_f64()).ln() / rate } else { 1.0 / rate };
                next += Duration::from_secs_f64(gap);
                in_flight.retain(|h| !h.is_finished());
            }
            for h in in_flight {
                let _ = h.await;
            }
        }
    }

    let after = server_counts(&clients[0], &spec.model).await;
    let r = rec.lock().await;
    let ms = |us: u64| us as f64 / 1000.0;
    let secs = spec.duration.as_secs_f64();
    let requests = r.all.len();
    let throughput = r.done_in_window as f64 / secs;
    let (server_queue_ms, server_compute_ms) = match (before, after) {
        (Some(b), Some(a)) if a.0 > b.0 => {
            let n = (a.0 - b.0) as f64;
            (Some((a.1 - b.1) as f64 / n / 1e6), Some((a.2 - b.2) as f64 / n / 1e6))
        }
        _ => (None, None),
    };
    Step {
        load,
        batch: spec.batch,
        requests,
        errors: r.errors,
        sent: r.sent,
        seconds: secs,
        throughput,
        items_per_second: throughput * spec.batch as f64,
        mean_ms: r.all.mean() / 1000.0,
        p50_ms: ms(r.all.value_at_quantile(0.5)),
        p80_ms: ms(r.all.value_at_quantile(0.8)),
        p90_ms: ms(r.all.value_at_quantile(0.9)),
        p99_ms: ms(r.all.value_at_quantile(0.99)),
        max_ms: ms(r.all.max()),
        service_rate: match load {
            Load::Open { rate, .. } => Some(throughput / rate),
            Load::Closed(_) => None,
        },
        p50_first_third_ms: ms(r.thirds[0].value_at_quantile(0.5)),
        p50_last_third_ms: ms(r.thirds[2].value_at_quantile(0.5)),
        server_queue_ms,
        server_compute_ms,
        first_error: r.first_error.clone(),
        samples: r.samples.clone(),
        server_steps: r
            .steps
            .iter()
            .map(|(step, q, c, n)| {
                let per = r.timed.max(1) as f64;
                StepTime {
                    step: step.clone(),
                    queue_ms: *q as f64 / per / 1000.0,
                    compute_ms: *c as f64 / per / 1000.0,
                    items: *n as f64 / per,
                }
            })
            .collect(),
    }
}

/// Samples as CSV: `at_s,latency_ms,ok`.
pub fn samples_csv(samples: &[Sample]) -> String {
    let mut out = String::from("at_s,latency_ms,ok\n");
    for s in samples {
        out.push_str(&format!("{:.6},{:.3},{}\n", s.at_s, s.latency_ms, u8::from(s.ok)));
    }
    out
}

/// A small, seedable generator for arrival gaps (no need for a crate).
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn load_label(l: &Load) -> (String, String) {
    match l {
        Load::Closed(n) => ("concurrency".into(), n.to_string()),
        Load::Open { rate, poisson } => {
            (if *poisson { "poisson rate/s" } else { "constant rate/s" }.into(), format!("{rate}"))
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

const COLUMNS: &[&str] = &[
    "requests",
    "errors",
    "req/s",
    "items/s",
    "mean ms",
    "p50 ms",
    "p80 ms",
    "p90 ms",
    "p99 ms",
    "service rate",
    "server queue ms",
    "server compute ms",
];

fn row(s: &Step) -> Vec<String> {
    vec![
        s.requests.to_string(),
        s.errors.to_string(),
        format!("{:.2}", s.throughput),
        format!("{:.2}", s.items_per_second),
        format!("{:.2}", s.mean_ms),
        format!("{:.2}", s.p50_ms),
        format!("{:.2}", s.p80_ms),
        format!("{:.2}", s.p90_ms),
        format!("{:.2}", s.p99_ms),
        opt(s.service_rate, 3),
        opt(s.server_queue_ms, 3),
        opt(s.server_compute_ms, 3),
    ]
}

/// The header of the leading columns: the load's kind, then the batch size.
fn lead_header(steps: &[Step]) -> Vec<String> {
    vec![steps.first().map(|s| load_label(&s.load).0).unwrap_or_default(), "batch".into()]
}

fn lead(s: &Step) -> Vec<String> {
    vec![load_label(&s.load).1, s.batch.to_string()]
}

fn header(steps: &[Step]) -> Vec<String> {
    lead_header(steps).into_iter().chain(COLUMNS.iter().map(|c| c.to_string())).collect()
}

fn full_row(s: &Step) -> Vec<String> {
    lead(s).into_iter().chain(row(s)).collect()
}

/// The steps as a Markdown table.
pub fn markdown(steps: &[Step]) -> String {
    let head = header(steps);
    let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for s in steps {
        out += &format!("| {} |\n", full_row(s).join(" | "));
    }
    out
}

/// The per-step server timing of each load step (empty unless asked for), as Markdown:
/// one row per load step and model/pipeline step, time per request in ms.
pub fn steps_markdown(steps: &[Step]) -> String {
    if steps.iter().all(|s| s.server_steps.is_empty()) {
        return String::new();
    }
    let [first, batch] = <[String; 2]>::try_from(lead_header(steps)).expect("two lead columns");
    let mut out =
        format!("| {first} | {batch} | step | items/request | queue ms | compute ms |\n|---|---|---|---|---|---|\n");
    for s in steps {
        for t in &s.server_steps {
            out += &format!(
                "| {} | {} | {:.2} | {:.3} | {:.3} |\n",
                lead(s).join(" | "),
                t.step,
                t.items,
                t.queue_ms,
                t.compute_ms
            );
        }
    }
    out
}

/// The steps as an aligned terminal table.
pub fn table(steps: &[Step]) -> String {
    let mut rows = vec![header(steps)];
    rows.extend(steps.iter().map(full_row));
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| r.iter().zip(&widths).map(|(v, w)| format!("{v:>w$}")).collect::<Vec<_>>().join("  ") + "\n")
        .collect()
}

/// The steps as CSV, one row per step.
pub fn csv(steps: &[Step]) -> String {
    let mut out = header(steps).join(",") + "\n";
    for s in steps {
        out += &(full_row(s).join(",") + "\n");
    }
    out
}

/// The steps as JSON.
pub fn to_json(steps: &[Step]) -> Value {
    Value::Array(steps.iter().map(step_json).collect())
}

/// One step as JSON.
pub(crate) fn step_json(s: &Step) -> Value {
    let (kind, value) = load_label(&s.load);
    json!({
        "load": kind, "value": value, "batch": s.batch, "requests": s.requests, "errors": s.errors, "sent": s.sent,
        "seconds": s.seconds, "throughput": s.throughput, "items_per_second": s.items_per_second,
        "mean_ms": s.mean_ms, "p50_ms": s.p50_ms, "p80_ms": s.p80_ms, "p90_ms": s.p90_ms,
        "p99_ms": s.p99_ms, "max_ms": s.max_ms, "service_rate": s.service_rate,
        "p50_first_third_ms": s.p50_first_third_ms, "p50_last_third_ms": s.p50_last_third_ms,
        "server_queue_ms": s.server_queue_ms, "server_compute_ms": s.server_compute_ms,
        "first_error": s.first_error,
        "server_steps": s.server_steps.iter().map(|t| json!({
            "step": t.step, "items": t.items, "queue_ms": t.queue_ms, "compute_ms": t.compute_ms,
        })).collect::<Vec<_>>(),
    })
}

/// The steps as an SVG plot: throughput in items/s (top) and latency percentiles
/// (bottom) against the offered load (concurrency or rate), one line per batch size.
pub fn svg_plot(steps: &[Step], title: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    if steps.is_empty() {
        return Err("plot: no steps".into());
    }
    let x_of = |s: &Step| match s.load {
        Load::Closed(n) => n as f64,
        Load::Open { rate, .. } => rate,
    };
    let mut batches: Vec<usize> = steps.iter().map(|s| s.batch).collect();
    batches.sort_unstable();
    batches.dedup();
    // Each batch size's steps, in load order.
    let lines: Vec<(usize, Vec<&Step>)> = batches
        .iter()
        .map(|&b| {
            let mut v: Vec<&Step> = steps.iter().filter(|s| s.batch == b).collect();
            v.sort_by(|a, b| x_of(a).total_cmp(&x_of(b)));
            (b, v)
        })
        .collect();
    let palette = [BLUE, RGBColor(230, 120, 0), RGBColor(0, 150, 70), MAGENTA, CYAN, BLACK];
    let x_label = load_label(&steps[0].load).0;
    let (x0, x1) = steps.iter().map(x_of).fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let x_range = if x1 > x0 { x0..x1 } else { x0 - 1.0..x1 + 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(300);

        let max_tp = steps.iter().map(|s| s.items_per_second).fold(0.0, f64::max).max(1e-9) * 1.1;
        let mut c = ChartBuilder::on(&top)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), 0.0..max_tp)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc(x_label.as_str()).y_desc("items/s").draw().map_err(|e| err(&e))?;
        for (k, (batch, line)) in lines.iter().enumerate() {
            let color = palette[k % palette.len()];
            let pts: Vec<(f64, f64)> = line.iter().map(|s| (x_of(s), s.items_per_second)).collect();
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("batch {batch}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
        }
        if lines.len() > 1 {
            c.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }

        let max_lat = steps.iter().map(|s| s.p99_ms).fold(0.0, f64::max).max(1e-9) * 1.1;
        let mut c = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range, 0.0..max_lat)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc(x_label.as_str()).y_desc("latency ms").draw().map_err(|e| err(&e))?;
        type Pick = fn(&Step) -> f64;
        // One batch size: p50, p90 and p99 in their own colours. Several: p50 (thin) and
        // p99 (thick) in each batch size's colour.
        let series: Vec<(String, RGBColor, u32, Pick, &Vec<&Step>)> = match lines.as_slice() {
            [(_, line)] => vec![
                ("p50".into(), GREEN, 2, |s: &Step| s.p50_ms, line),
                ("p90".into(), RGBColor(230, 150, 0), 2, |s: &Step| s.p90_ms, line),
                ("p99".into(), RED, 2, |s: &Step| s.p99_ms, line),
            ],
            _ => lines
                .iter()
                .enumerate()
                .flat_map(|(k, (b, line))| {
                    let color = palette[k % palette.len()];
                    [
                        (format!("batch {b} p50"), color, 1, (|s: &Step| s.p50_ms) as Pick, line),
                        (format!("batch {b} p99"), color, 3, (|s: &Step| s.p99_ms) as Pick, line),
                    ]
                })
                .collect(),
        };
        for (name, color, width, pick, line) in series {
            let pts: Vec<(f64, f64)> = line.iter().map(|s| (x_of(s), pick(s))).collect();
            c.draw_series(LineSeries::new(pts, color.stroke_width(width)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(width)));
        }
        c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_gaps_average_to_the_rate() {
        let mut rng = SplitMix(1);
        let rate = 200.0;
        let n = 20_000;
        let total: f64 = (0..n).map(|_| -(1.0 - rng.next_f64()).ln() / rate).sum();
        assert!((total / n as f64 * rate - 1.0).abs() < 0.03, "mean gap {} s", total / n as f64);
    }
}
