//! Recent latencies and counter samples per model and pipeline, for the dashboard's
//! per-second view: one HDR histogram per second over a sliding window of [`WINDOW_S`]
//! seconds, and the cumulative counters sampled once a second to take rates against.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The sliding window, in seconds, for rates and percentiles.
pub const WINDOW_S: u64 = 10;

/// Latencies of the last seconds per model or pipeline, one histogram per second.
pub struct Live {
    start: Instant,
    windows: Mutex<HashMap<String, VecDeque<Second>>>,
    /// Cumulative counters once a second, for rates over the window.
    samples: Mutex<VecDeque<(Instant, HashMap<String, f64>)>>,
}

struct Second {
    at: u64,
    latency_us: Histogram<u64>,
    ok: u64,
    failed: u64,
}

impl Default for Live {
    fn default() -> Self {
        Live { start: Instant::now(), windows: Mutex::default(), samples: Mutex::default() }
    }
}

impl Live {
    /// Records one finished request of the model or pipeline `name`.
    pub fn record(&self, name: &str, latency: Duration, ok: bool) {
        let now = self.start.elapsed().as_secs();
        let mut windows = self.windows.lock();
        let seconds = match windows.get_mut(name) {
            Some(w) => w,
            None => windows.entry(name.to_string()).or_default(),
        };
        if seconds.back().is_none_or(|s| s.at != now) {
            while seconds.front().is_some_and(|s| s.at + WINDOW_S < now) {
                seconds.pop_front();
            }
            let h = Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds");
            seconds.push_back(Second { at: now, latency_us: h, ok: 0, failed: 0 });
        }
        let s = seconds.back_mut().expect("pushed above");
        s.latency_us.saturating_record(latency.as_micros().max(1) as u64);
        if ok {
            s.ok += 1;
        } else {
            s.failed += 1;
        }
    }

    /// (requests/s, error fraction, p50, p90, p99 ms) over the window: the last
    /// [`WINDOW_S`] whole seconds (the one under way would make the rate read low), or
    /// the first second itself while there is no whole one yet.
    pub fn summary(&self, name: &str) -> (f64, f64, Option<[f64; 3]>) {
        let up = self.start.elapsed();
        let now = up.as_secs();
        let (from, until, span) = match now {
            0 => (0, 1, up.as_secs_f64().max(0.001)),
            n => (n.saturating_sub(WINDOW_S), n, n.min(WINDOW_S) as f64),
        };
        let windows = self.windows.lock();
        let Some(seconds) = windows.get(name) else { return (0.0, 0.0, None) };
        let mut all = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds");
        let (mut ok, mut failed) = (0, 0);
        for s in seconds.iter().filter(|s| s.at >= from && s.at < until) {
            let _ = all.add(&s.latency_us);
            ok += s.ok;
            failed += s.failed;
        }
        drop(windows);
        let n = ok + failed;
        let error_rate = if n > 0 { failed as f64 / n as f64 } else { 0.0 };
        let pct = (!all.is_empty()).then(|| [0.5, 0.9, 0.99].map(|q| all.value_at_quantile(q) as f64 / 1000.0));
        (n as f64 / span, error_rate, pct)
    }

    /// Takes this second's sample of the cumulative counters (called once a second).
    pub fn sample(&self, counters: HashMap<String, f64>) {
        let now = Instant::now();
        let mut samples = self.samples.lock();
        samples.push_back((now, counters));
        while samples.len() > WINDOW_S as usize + 1 {
            samples.pop_front();
        }
    }

    /// The oldest sample in the window, to take rates against.
    pub fn baseline(&self) -> Option<(Instant, HashMap<String, f64>)> {
        self.samples.lock().front().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_counts_whole_seconds() {
        let live = Live { start: Instant::now() - Duration::from_millis(3500), ..Default::default() };
        // Two whole seconds ago and one a second ago: 30 and 10 requests; 5 in the current one.
        {
            let mut w = live.windows.lock();
            let h = || Histogram::new_with_bounds(1, 3_600_000_000, 2).unwrap();
            let s = |at, ok| Second { at, latency_us: h(), ok, failed: 0 };
            w.insert("m".into(), VecDeque::from([s(0, 20), s(1, 10), s(2, 10), s(3, 5)]));
        }
        let (rps, _, _) = live.summary("m");
        assert!((rps - 40.0 / 3.0).abs() < 1e-9, "{rps}");
    }

    #[test]
    fn the_window_summarises_recorded_requests() {
        let live = Live::default();
        for ms in 1..=100 {
            live.record("m", Duration::from_millis(ms), ms != 100);
        }
        let (rps, error_rate, pct) = live.summary("m");
        assert!(rps > 0.0);
        assert!((error_rate - 0.01).abs() < 1e-9);
        let [p50, p90, p99] = pct.unwrap();
        assert!((49.0..=51.0).contains(&p50) && (89.0..=91.0).contains(&p90) && (98.0..=100.0).contains(&p99));
        assert_eq!(live.summary("other").2, None);
    }
}
