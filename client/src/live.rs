//! A load generator whose load can be changed while it runs (`sluice bench --live`): the
//! way to find a server's knee, the rate where p99 takes off, in one sitting.
//!
//! [`LiveRun`] offers load in the background (open loop at a rate, Poisson or evenly
//! spaced, or closed loop at a concurrency) and keeps a per-second timeline: requests
//! offered and answered, errors, latency percentiles over a sliding window, and the
//! server's own queue and compute time per request (from its statistics). Latency is
//! measured from each request's scheduled send, as in [`crate::bench`]. Every change of
//! load is logged with its time and starts a new segment; at the end each segment is
//! summarised as a [`Step`], so the tables, CSV, JSON and plots of `sluice bench` apply.

use crate::bench::{Load, Step};
use crate::{Client, InferOptions, Tensor};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What to send.
#[derive(Clone)]
pub struct LiveSpec {
    pub model: String,
    /// One request's inputs.
    pub inputs: Vec<(String, Tensor)>,
    /// Per-request deadline sent to the server.
    pub timeout: Option<Duration>,
    /// Items per request (the inputs' batch size).
    pub batch: usize,
    /// The sliding window for the percentiles shown each second.
    pub window: Duration,
}

/// One second of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Second {
    /// Seconds since the start: this is the second [at_s - 1, at_s).
    pub at_s: u64,
    /// The load being offered at the end of the second.
    pub load: Load,
    pub paused: bool,
    /// Requests sent in the second.
    pub offered: u64,
    /// Requests answered successfully in the second.
    pub achieved: u64,
    pub errors: u64,
    /// Over the sliding window ending with this second (`None` before any answer).
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The server's queue and compute time per request it finished in the second.
    pub server_queue_ms: Option<f64>,
    pub server_compute_ms: Option<f64>,
    /// Requests sent and not yet answered at the end of the second.
    pub in_flight: usize,
}

/// A change made while running: the load, a pause, or a mark.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Seconds since the start.
    pub at_s: f64,
    pub what: String,
    /// For a change of load, the load before it.
    pub load_from: Option<Load>,
}

/// Changes of load closer together than this are one change.
const COALESCE: Duration = Duration::from_millis(500);

/// What a finished run gives.
#[derive(Debug, Clone)]
pub struct LiveReport {
    pub seconds: Vec<Second>,
    pub changes: Vec<Change>,
    /// One per stretch of constant load (between changes), in order.
    pub segments: Vec<Step>,
    /// When each segment started, seconds since the start (parallel to `segments`).
    pub segment_starts: Vec<f64>,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
}

impl LiveReport {
    /// The segment of the highest throughput whose p99 stayed within `slo_ms` without
    /// errors: the knee's safe side. Segments shorter than a second (a key pressed twice
    /// in a row) say too little to count.
    pub fn knee(&self, slo_ms: f64) -> Option<&Step> {
        self.segments
            .iter()
            .filter(|s| s.seconds >= 1.0 && s.requests > 0 && s.errors == 0 && s.p99_ms <= slo_ms)
            .max_by(|a, b| a.throughput.total_cmp(&b.throughput))
    }

    /// The whole run as JSON: totals, segments, changes and the per-second timeline.
    pub fn to_json(&self, slo_ms: Option<f64>) -> Value {
        let knee = slo_ms.and_then(|slo| self.knee(slo)).map(crate::bench::step_json);
        json!({
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "p99_slo_ms": slo_ms,
            "knee": knee,
            "segments": self.segments.iter().zip(&self.segment_starts).map(|(s, at)| {
                let mut v = crate::bench::step_json(s);
                v["from_s"] = json!(at);
                v
            }).collect::<Vec<_>>(),
            "changes": self.changes.iter().map(|c| json!({"at_s": c.at_s, "what": c.what})).collect::<Vec<_>>(),
            "seconds": self.seconds.iter().map(|s| json!({
                "at_s": s.at_s, "offered": s.offered, "achieved": s.achieved, "errors": s.errors,
                "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms,
                "server_queue_ms": s.server_queue_ms, "server_compute_ms": s.server_compute_ms,
                "in_flight": s.in_flight, "paused": s.paused,
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
struct Control {
    load: Load,
    paused: bool,
    stopping: bool,
}

/// Latencies of one segment, and its counts.
struct Segment {
    load: Load,
    batch: usize,
    /// A stretch while paused: no load offered, left out of the report.
    paused: bool,
    start: Instant,
    end: Option<Instant>,
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    sent: u64,
    first_error: Option<String>,
    /// Server time summed over the seconds of the segment: (requests, queue ms, compute ms).
    server: (u64, f64, f64),
}

struct State {
    start: Instant,
    segments: Vec<Segment>,
    changes: Vec<Change>,
    /// Counts of the second under way.
    offered: u64,
    achieved: u64,
    errors: u64,
    /// Answered latencies per second, for the sliding window.
    recent: VecDeque<Histogram<u64>>,
    seconds: Vec<Second>,
    sent: u64,
    ok: u64,
    failed: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// A running live benchmark. Dropping it without [`stop`](LiveRun::stop) aborts the load.
pub struct LiveRun {
    control: watch::Sender<Control>,
    state: Arc<Mutex<State>>,
    in_flight: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl LiveRun {
    /// Starts offering `load` on the current tokio runtime.
    pub fn start(clients: Vec<Client>, spec: LiveSpec, load: Load) -> LiveRun {
        assert!(!clients.is_empty(), "LiveRun needs a client");
        let start = Instant::now();
        let state = Arc::new(Mutex::new(State {
            start,
            segments: vec![Segment::new(load, spec.batch, start)],
            changes: Vec::new(),
            offered: 0,
            achieved: 0,
            errors: 0,
            recent: VecDeque::from([histogram()]),
            seconds: Vec::new(),
            sent: 0,
            ok: 0,
            failed: 0,
        }));
        let (control, rx) = watch::channel(Control { load, paused: false, stopping: false });
        let in_flight = Arc::new(AtomicUsize::new(0));
        let sender = Sender {
            clients: Arc::new(clients),
            spec: Arc::new(spec),
            state: state.clone(),
            in_flight: in_flight.clone(),
        };
        let tasks = vec![tokio::spawn(generate(sender.clone(), rx.clone())), tokio::spawn(tick(sender, rx))];
        LiveRun { control, state, in_flight, tasks }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log(&self, what: String) {
        let mut st = self.lock();
        let at_s = st.start.elapsed().as_secs_f64();
        st.changes.push(Change { at_s, what, load_from: None });
    }

    /// The load being offered now, and whether it is paused.
    pub fn load(&self) -> (Load, bool) {
        let c = *self.control.borrow();
        (c.load, c.paused)
    }

    /// Offers `load` from now on: logged, and a new segment. Changes within half a
    /// second of the last one (a key pressed several times) make one change.
    pub fn set_load(&self, load: Load) {
        let (old, _) = self.load();
        if old == load {
            return;
        }
        {
            let mut st = self.lock();
            let now = Instant::now();
            let at_s = (now - st.start).as_secs_f64();
            let recent = st.segments.len() > 1 && st.segments.last().is_some_and(|s| now - s.start < COALESCE);
            let from = match (recent, st.changes.last()) {
                (true, Some(c)) if c.load_from.is_some() => c.load_from,
                _ => None,
            };
            match from {
                Some(from) => {
                    // Fold into the change just made: its segment takes the new load.
                    let last = st.changes.last_mut().expect("matched above");
                    last.what = format!("{} -> {}", describe(&from), describe(&load));
                    if let Some(s) = st.segments.last_mut() {
                        s.load = load;
                    }
                }
                None => {
                    st.changes.push(Change {
                        at_s,
                        what: format!("{} -> {}", describe(&old), describe(&load)),
                        load_from: Some(old),
                    });
                    if let Some(last) = st.segments.last_mut() {
                        last.end = Some(now);
                    }
                    let batch = st.segments.last().map_or(1, |s| s.batch);
                    st.segments.push(Segment::new(load, batch, now));
                }
            }
        }
        self.control.send_modify(|c| c.load = load);
    }

    /// Stops (or resumes) offering load; requests in flight finish. The paused stretch
    /// is a segment of its own, left out of the report.
    pub fn set_paused(&self, paused: bool) {
        let (load, was) = self.load();
        if was == paused {
            return;
        }
        self.log(if paused { "paused".into() } else { "resumed".into() });
        {
            let mut st = self.lock();
            let now = Instant::now();
            let batch = st.segments.last().map_or(1, |s| s.batch);
            if let Some(last) = st.segments.last_mut() {
                last.end = Some(now);
            }
            let mut next = Segment::new(load, batch, now);
            next.paused = paused;
            st.segments.push(next);
        }
        self.control.send_modify(|c| c.paused = paused);
    }

    /// Marks this moment in the log (a note for the timeline).
    pub fn mark(&self, note: &str) {
        self.log(format!("mark: {note}"));
    }

    /// The seconds so far.
    pub fn seconds(&self) -> Vec<Second> {
        self.lock().seconds.clone()
    }

    pub fn changes(&self) -> Vec<Change> {
        self.lock().changes.clone()
    }

    /// Requests sent, answered and failed so far.
    pub fn totals(&self) -> (u64, u64, u64) {
        let st = self.lock();
        (st.sent, st.ok, st.failed)
    }

    /// Stops offering load, waits (at most `grace`) for the requests in flight, and
    /// summarises the run.
    pub async fn stop(mut self, grace: Duration) -> LiveReport {
        let stopped = Instant::now();
        self.control.send_modify(|c| c.stopping = true);
        let deadline = stopped + grace;
        // The generator ends at once: after it, no request is started, and every one
        // started is counted in `in_flight` (closed-loop workers end after theirs).
        if let Some(generator) = self.tasks.first_mut() {
            let _ = tokio::time::timeout(grace, generator).await;
        }
        while self.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in &self.tasks {
            t.abort();
        }
        let mut st = self.lock();
        // The last segment ends when the load stopped, not after the wait.
        if let Some(last) = st.segments.last_mut() {
            last.end.get_or_insert(stopped);
        }
        let t0 = st.start;
        let (segments, segment_starts) = st
            .segments
            .iter()
            .filter(|s| !s.paused && s.end.is_some_and(|e| e > s.start))
            .map(|s| (s.to_step(), (s.start - t0).as_secs_f64()))
            .unzip();
        LiveReport {
            seconds: st.seconds.clone(),
            changes: std::mem::take(&mut st.changes),
            segments,
            segment_starts,
            sent: st.sent,
            ok: st.ok,
            errors: st.failed,
        }
    }
}

impl Drop for LiveRun {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// "rate 120/s (Poisson)", "concurrency 8".
pub fn describe(load: &Load) -> String {
    match load {
        Load::Closed(n) => format!("concurrency {n}"),
        Load::Open { rate, poisson } => {
            format!("rate {}/s ({})", trim(*rate), if *poisson { "Poisson" } else { "even" })
        }
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Segment {
    fn new(load: Load, batch: usize, start: Instant) -> Segment {
        Segment {
            load,
            batch,
            paused: false,
            start,
            end: None,
            hist: histogram(),
            ok: 0,
            errors: 0,
            sent: 0,
            first_error: None,
            server: (0, 0.0, 0.0),
        }
    }

    fn to_step(&self) -> Step {
        let secs = self.end.map_or(0.0, |e| (e - self.start).as_secs_f64()).max(1e-9);
        let h = &self.hist;
        let ms = |us: u64| us as f64 / 1000.0;
        let throughput = self.ok as f64 / secs;
        let (n, q, c) = self.server;
        Step {
            load: self.load,
            batch: self.batch,
            requests: self.ok,
            errors: self.errors,
            sent: self.sent,
            seconds: secs,
            throughput,
            items_per_second: throughput * self.batch as f64,
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p80_ms: ms(h.value_at_quantile(0.8)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            service_rate: match self.load {
                Load::Open { rate, .. } => Some(throughput / rate),
                Load::Closed(_) => None,
            },
            p50_first_third_ms: ms(h.value_at_quantile(0.5)),
            p50_last_third_ms: ms(h.value_at_quantile(0.5)),
            server_queue_ms: (n > 0).then(|| q / n as f64),
            server_compute_ms: (n > 0).then(|| c / n as f64),
            first_error: self.first_error.clone(),
            samples: Vec::new(),
            server_steps: Vec::new(),
        }
    }
}

/// What a request needs to be sent and recorded.
#[derive(Clone)]
struct Sender {
    clients: Arc<Vec<Client>>,
    spec: Arc<LiveSpec>,
    state: Arc<Mutex<State>>,
    in_flight: Arc<AtomicUsize>,
}

impl Sender {
    /// Counts a request about to be sent (in the segment current now); returns that
    /// segment. Called before the request's task is spawned, so `stop` never misses it.
    fn begin(&self) -> usize {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.offered += 1;
        st.sent += 1;
        let i = st.segments.len() - 1;
        st.segments[i].sent += 1;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        i
    }

    /// Sends one request counted by [`begin`](Self::begin), scheduled at `scheduled`,
    /// and records it in `segment`.
    async fn send(&self, k: usize, segment: usize, scheduled: Instant) {
        let client = &self.clients[k % self.clients.len()];
        let inputs: Vec<(&str, &Tensor)> = self.spec.inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let opts = InferOptions { timeout: self.spec.timeout, ..Default::default() };
        let result = client.infer_detailed(&self.spec.model, &inputs, opts).await;
        let us = scheduled.elapsed().as_micros().max(1) as u64;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        let seg = &mut st.segments[segment];
        match result {
            Ok(_) => {
                seg.ok += 1;
                seg.hist.saturating_record(us);
                st.achieved += 1;
                st.ok += 1;
                if let Some(h) = st.recent.back_mut() {
                    h.saturating_record(us);
                }
            }
            Err(e) => {
                seg.errors += 1;
                seg.first_error.get_or_insert_with(|| e.to_string());
                st.errors += 1;
                st.failed += 1;
            }
        }
    }
}

/// The closed loop's workers: worker `id` runs while `id < target`. Which ids run is
/// kept under one lock with the target, so raising the target again never loses or
/// doubles a worker, and lowering it ends only the workers above it.
#[derive(Clone, Default)]
struct Workers {
    target: Arc<Mutex<(usize, std::collections::BTreeSet<usize>)>>,
}

impl Workers {
    fn set(&self, n: usize, sender: &Sender) {
        let mut guard = self.target.lock().unwrap_or_else(|p| p.into_inner());
        guard.0 = n;
        for id in 0..n {
            if guard.1.insert(id) {
                let (sender, workers) = (sender.clone(), self.clone());
                tokio::spawn(async move {
                    while workers.keeps(id) {
                        let segment = sender.begin();
                        sender.send(id, segment, Instant::now()).await;
                    }
                });
            }
        }
    }

    /// Whether worker `id` goes on; if not, it is taken off the running set.
    fn keeps(&self, id: usize) -> bool {
        let mut guard = self.target.lock().unwrap_or_else(|p| p.into_inner());
        let keep = id < guard.0;
        if !keep {
            guard.1.remove(&id);
        }
        keep
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // The generator ended (stopped, or its task aborted): so do the workers.
        self.workers.target.lock().unwrap_or_else(|p| p.into_inner()).0 = 0;
    }
}

struct Generator {
    workers: Workers,
}

/// Offers the load the control says, following its changes.
async fn generate(sender: Sender, mut control: watch::Receiver<Control>) {
    let mut rng = crate::bench::SplitMix(0x5eed);
    let generator = Generator { workers: Workers::default() };
    let mut k = 0usize;
    loop {
        let c = *control.borrow_and_update();
        if c.stopping {
            return;
        }
        match (c.paused, c.load) {
            (false, Load::Closed(n)) => generator.workers.set(n, &sender),
            (true, _) => generator.workers.set(0, &sender),
            (false, Load::Open { rate, poisson }) => {
                generator.workers.set(0, &sender);
                // The new rate's schedule starts now: no burst to catch up. A rate too
                // low to schedule is clamped (the CLI refuses it before).
                let rate = if rate.is_finite() { rate.max(0.01) } else { 0.01 };
                let mut next = Instant::now();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next.into()) => {
                            let (s, scheduled, segment) = (sender.clone(), next, sender.begin());
                            k += 1;
                            tokio::spawn(async move { s.send(k, segment, scheduled).await });
                            let gap = if poisson { -(1.0 - rng.next_f64()).ln() / rate } else { 1.0 / rate };
                            next += Duration::from_secs_f64(gap.clamp(0.0, 100.0));
                        }
                        changed = control.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            break;
                        }
                    }
                }
                continue;
            }
        }
        if control.changed().await.is_err() {
            return;
        }
    }
}

/// Closes each second: its counts, the window's percentiles and the server's split.
async fn tick(sender: Sender, control: watch::Receiver<Control>) {
    let start = sender.state.lock().unwrap_or_else(|p| p.into_inner()).start;
    let window = sender.spec.window.as_secs().max(1) as usize;
    // The server's statistics, unless they take long to come (a busy server must not
    // hold the timeline up).
    let counts = || async {
        let asked = crate::bench::server_counts(&sender.clients[0], &sender.spec.model);
        tokio::time::timeout(Duration::from_millis(300), asked).await.ok().flatten()
    };
    let mut before = counts().await;
    for at_s in 1u64.. {
        tokio::time::sleep_until((start + Duration::from_secs(at_s)).into()).await;
        let after = counts().await;
        let server = match (before, after) {
            (Some(b), Some(a)) if a.0 > b.0 => {
                let n = a.0 - b.0;
                Some((n, (a.1 - b.1) as f64 / 1e6, (a.2 - b.2) as f64 / 1e6))
            }
            _ => None,
        };
        before = after.or(before);
        let c = *control.borrow();
        let mut st = sender.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = histogram();
        for h in &st.recent {
            let _ = all.add(h);
        }
        let pct = |q: f64| (!all.is_empty()).then(|| all.value_at_quantile(q) as f64 / 1000.0);
        if let (Some((n, q, cpt)), Some(seg)) = (server, st.segments.last_mut()) {
            seg.server = (seg.server.0 + n, seg.server.1 + q, seg.server.2 + cpt);
        }
        let second = Second {
            at_s,
            load: c.load,
            paused: c.paused,
            offered: std::mem::take(&mut st.offered),
            achieved: std::mem::take(&mut st.achieved),
            errors: std::mem::take(&mut st.errors),
            p50_ms: pct(0.5),
            p90_ms: pct(0.9),
            p99_ms: pct(0.99),
            server_queue_ms: server.map(|(n, q, _)| q / n as f64),
            server_compute_ms: server.map(|(n, _, c)| c / n as f64),
            in_flight: sender.in_flight.load(Ordering::Acquire),
        };
        st.seconds.push(second);
        st.recent.push_back(histogram());
        while st.recent.len() > window {
            st.recent.pop_front();
        }
    }
}

/// The run as an SVG plot over time: requests/s offered and answered (top) and p99
/// (bottom, with the SLO when given), a dashed line at each change, labelled.
pub fn svg_timeline(report: &LiveReport, title: &str, slo_ms: Option<f64>) -> Result<String, String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    let s = &report.seconds;
    if s.is_empty() {
        return Err("plot: the run lasted less than a second".into());
    }
    let t_max = s.last().map_or(1.0, |x| x.at_s as f64).max(1.0);
    let top = |v: f64| if v > 0.0 { v * 1.15 } else { 1.0 };
    let rate_max = top(s.iter().map(|x| x.offered.max(x.achieved) as f64).fold(0.0, f64::max));
    let p99_max = top(s.iter().filter_map(|x| x.p99_ms).fold(slo_ms.unwrap_or(0.0), f64::max));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(|e| err(&e))?;
        let (upper, lower) = root.split_vertically(300);
        let marks = |c: &mut ChartContext<
            '_,
            SVGBackend<'_>,
            Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
        >,
                     y_max: f64,
                     labels: bool|
         -> Result<(), String> {
            for (k, ch) in report.changes.iter().enumerate() {
                let dashes = (0..20).map(|i| {
                    let y0 = y_max * i as f64 / 20.0;
                    PathElement::new(vec![(ch.at_s, y0), (ch.at_s, y0 + y_max / 40.0)], BLACK.mix(0.5))
                });
                c.draw_series(dashes).map_err(|e| err(&e))?;
                if labels {
                    let y = y_max * (0.95 - 0.07 * (k % 4) as f64);
                    let text = Text::new(ch.what.clone(), (ch.at_s, y), ("sans-serif", 12).into_font());
                    c.draw_series(std::iter::once(text)).map_err(|e| err(&e))?;
                }
            }
            Ok(())
        };
        let mut c = ChartBuilder::on(&upper)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_max, 0.0..rate_max)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc("seconds").y_desc("requests/s").draw().map_err(|e| err(&e))?;
        for (name, color, pick) in [
            ("offered", BLUE, (|x: &Second| x.offered as f64) as fn(&Second) -> f64),
            ("achieved", RGBColor(0, 150, 70), |x: &Second| x.achieved as f64),
        ] {
            let pts: Vec<(f64, f64)> = s.iter().map(|x| (x.at_s as f64, pick(x))).collect();
            c.draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        marks(&mut c, rate_max, true)?;
        c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;

        let mut c = ChartBuilder::on(&lower)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_max, 0.0..p99_max)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc("seconds").y_desc("p99 ms").draw().map_err(|e| err(&e))?;
        let pts: Vec<(f64, f64)> = s.iter().filter_map(|x| Some((x.at_s as f64, x.p99_ms?))).collect();
        c.draw_series(LineSeries::new(pts, RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("p99")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
        if let Some(slo) = slo_ms {
            c.draw_series(LineSeries::new(vec![(0.0, slo), (t_max, slo)], RGBColor(230, 150, 0).stroke_width(1)))
                .map_err(|e| err(&e))?
                .label(format!("p99 SLO {slo} ms"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RGBColor(230, 150, 0)));
        }
        marks(&mut c, p99_max, false)?;
        c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// The timeline as CSV: one row per second.
pub fn seconds_csv(seconds: &[Second]) -> String {
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.3}"));
    let mut out = String::from(
        "at_s,load,paused,offered,achieved,errors,p50_ms,p90_ms,p99_ms,server_queue_ms,server_compute_ms,in_flight\n",
    );
    for s in seconds {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}\n",
            s.at_s,
            describe(&s.load),
            u8::from(s.paused),
            s.offered,
            s.achieved,
            s.errors,
            opt(s.p50_ms),
            opt(s.p90_ms),
            opt(s.p99_ms),
            opt(s.server_queue_ms),
            opt(s.server_compute_ms),
            s.in_flight
        ));
    }
    out
}
