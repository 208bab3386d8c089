//! Per-model statistics in the shape of the v2 statistics extension: cumulative counts
//! and nanoseconds since the model was loaded.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Default, Debug)]
pub struct Duration64 {
    pub count: AtomicU64,
    pub ns: AtomicU64,
}

impl Duration64 {
    pub fn add(&self, d: Duration) {
        self.add_n(1, d);
    }
    pub fn add_n(&self, n: u64, d: Duration) {
        self.count.fetch_add(n, Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64 * n, Relaxed);
    }
    pub fn get(&self) -> (u64, u64) {
        (self.count.load(Relaxed), self.ns.load(Relaxed))
    }
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStat {
    pub count: u64,
    pub input_ns: u64,
    pub infer_ns: u64,
    pub output_ns: u64,
}

#[derive(Default, Debug)]
pub struct ModelStats {
    pub success: Duration64,
    pub fail: Duration64,
    pub queue: Duration64,
    pub compute_input: Duration64,
    pub compute_infer: Duration64,
    pub compute_output: Duration64,
    /// Rows inferred (a batch of 8 counts 8).
    pub inference_count: AtomicU64,
    /// Backend runs.
    pub execution_count: AtomicU64,
    /// Milliseconds since the epoch of the last completed request.
    pub last_inference_ms: AtomicU64,
    pub batches: Mutex<BTreeMap<usize, BatchStat>>,
}

impl ModelStats {
    /// Records one batch of `rows` rows made of `items` requests, run at size `executed`
    /// (more than `rows` when padded to an allowed batch size).
    pub fn record_batch(
        &self,
        rows: usize,
        executed: usize,
        items: usize,
        input: Duration,
        infer: Duration,
        output: Duration,
    ) {
        self.inference_count.fetch_add(rows as u64, Relaxed);
        self.execution_count.fetch_add(1, Relaxed);
        // Per request, as in Triton: each request of the batch spent the batch's compute time.
        let n = items as u64;
        self.compute_input.add_n(n, input);
        self.compute_infer.add_n(n, infer);
        self.compute_output.add_n(n, output);
        let mut b = self.batches.lock();
        let e = b.entry(executed).or_default();
        e.count += 1;
        e.input_ns += input.as_nanos() as u64;
        e.infer_ns += infer.as_nanos() as u64;
        e.output_ns += output.as_nanos() as u64;
    }

    pub fn record_request(&self, ok: bool, total: Duration) {
        if ok {
            self.success.add(total);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            self.last_inference_ms.store(now.as_millis() as u64, Relaxed);
        } else {
            self.fail.add(total);
        }
    }
}
