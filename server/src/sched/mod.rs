//! Per-model scheduling: a bounded batch queue shared by the model's instance threads.
//! An idle instance cuts the next batch itself, so a batch is formed at the last moment
//! an instance can take it and grows while every instance is busy.

pub mod pool;
pub mod queue;

use crate::backend::{Backend, BatchInput};
use crate::error::Error;
use crate::request::{Origin, TraceContext};
use crate::rt::priority;
use crate::telemetry::metrics::{InstanceMetrics, ModelMetrics};
use crate::telemetry::stats::ModelStats;
use parking_lot::{Condvar, Mutex, MutexGuard};
use queue::{BatchPolicy, BatchQueue, Item, Poll};
use sluice_ops::Tensor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A request's outputs and the backend time of the batch it ran in.
pub struct Computed {
    pub outputs: Vec<Tensor>,
    pub compute: Duration,
    /// How long the request waited in the queue.
    pub queued: Duration,
    /// Rows of the batch it ran in (padding included).
    pub batch_rows: usize,
}

pub type Reply = Result<Computed, Error>;

/// A pipeline node's overrides of its model's batching, for the items it submits.
#[derive(Debug, Clone, Copy, Default)]
pub struct ItemLimits {
    /// Cut the batch once this item has waited this long.
    pub max_queue_delay: Option<Duration>,
    /// Run this item in batches of at most this many rows.
    pub max_batch_size: Option<usize>,
}

/// One request waiting for its batch.
pub struct Pending {
    inputs: Vec<Tensor>,
    rows: usize,
    key: Vec<Vec<usize>>,
    enqueued: Instant,
    deadline: Option<Instant>,
    max_delay: Option<Duration>,
    max_batch: Option<usize>,
    reply: oneshot::Sender<Reply>,
    span: tracing::Span,
    origin: Arc<Origin>,
}

impl Item for Pending {
    fn rows(&self) -> usize {
        self.rows
    }
    fn batch_key(&self) -> &[Vec<usize>] {
        &self.key
    }
    fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
    fn max_delay(&self) -> Option<Duration> {
        self.max_delay
    }
    fn max_batch(&self) -> Option<usize> {
        self.max_batch
    }
}

struct Shared {
    name: String,
    /// For error messages.
    output_names: Vec<String>,
    batching: bool,
    /// Sorted; empty: batches run at the size they were cut.
    allowed_sizes: Vec<usize>,
    queue: Mutex<BatchQueue<Pending>>,
    wake: Condvar,
    stopping: AtomicBool,
    /// Items in the queue, readable without the lock (for the idle watch).
    queued: AtomicUsize,
    stats: Arc<ModelStats>,
    metrics: ModelMetrics,
}

impl Shared {
    /// The size a batch of `rows` runs at: the smallest allowed size that holds it.
    fn padded_size(&self, rows: usize) -> usize {
        self.allowed_sizes.iter().copied().find(|&s| s >= rows).unwrap_or(rows)
    }

    /// Publishes the queue length: to the gauge, and to the idle watch without the lock.
    fn set_depth(&self, q: &BatchQueue<Pending>) {
        self.queued.store(q.len(), Ordering::Release);
        self.metrics.queue_depth.set(q.len() as i64);
    }
}

/// Handle to a model's queue and instance threads. Dropping it drains the queue and
/// joins the threads.
pub struct ModelScheduler {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl ModelScheduler {
    pub fn start(
        name: &str,
        instances: Vec<(Box<dyn Backend>, InstanceMetrics)>,
        policy: BatchPolicy,
        allowed_sizes: Vec<usize>,
        output_names: Vec<String>,
        stats: Arc<ModelStats>,
        metrics: ModelMetrics,
    ) -> Result<ModelScheduler, (String, std::io::Error)> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            output_names,
            batching: policy.max_batch_size > 0,
            allowed_sizes: {
                let mut a = allowed_sizes;
                a.sort_unstable();
                a
            },
            queue: Mutex::new(BatchQueue::new(policy)),
            wake: Condvar::new(),
            stopping: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            stats,
            metrics,
        });
        let mut scheduler = ModelScheduler { shared, threads: Vec::with_capacity(instances.len()) };
        for (i, (backend, im)) in instances.into_iter().enumerate() {
            let shared = scheduler.shared.clone();
            let thread = format!("model-{name}-{i}");
            // At normal priority even when a background reload loads the model.
            let builder = std::thread::Builder::new().name(thread.clone());
            // On failure, dropping the scheduler stops and joins the threads started so far.
            let handle =
                priority::spawn(builder, move || instance_loop(&shared, backend, &im)).map_err(|e| (thread, e))?;
            scheduler.threads.push(handle);
        }
        Ok(scheduler)
    }

    /// Queues one request; `inputs` are in the model's input order and already checked.
    /// Fails at once when the queue is full.
    #[cfg(test)]
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Reply>, Error> {
        self.submit_with(inputs, rows, deadline, ItemLimits::default(), Arc::default())
    }

    /// [`submit`](Self::submit) with this item's own batching limits, for `origin` (its
    /// request's id and trace, which remote calls carry on).
    pub fn submit_with(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Option<Instant>,
        limits: ItemLimits,
        origin: Arc<Origin>,
    ) -> Result<oneshot::Receiver<Reply>, Error> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let (tx, rx) = oneshot::channel();
        let key =
            if self.shared.batching { inputs.iter().map(|t| t.shape[1..].to_vec()).collect() } else { Vec::new() };
        let item = Pending {
            inputs,
            rows,
            key,
            enqueued: Instant::now(),
            deadline,
            max_delay: limits.max_queue_delay,
            max_batch: limits.max_batch_size,
            reply: tx,
            span: tracing::Span::current(),
            origin,
        };
        let mut q = self.shared.queue.lock();
        if q.push(item).is_err() {
            return Err(Error::QueueFull { model: self.shared.name.clone(), capacity: q.len() });
        }
        self.shared.set_depth(&q);
        drop(q);
        self.shared.wake.notify_one();
        Ok(rx)
    }
}

impl Drop for ModelScheduler {
    fn drop(&mut self) {
        // Under the lock, so no instance can check the flag and then park after this.
        let q = self.shared.queue.lock();
        self.shared.stopping.store(true, Ordering::Release);
        drop(q);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn instance_loop(shared: &Shared, mut backend: Box<dyn Backend>, im: &InstanceMetrics) {
    // Requests answered by this instance's last batch: their senders may send again, which
    // the adaptive hold waits for. Told to the queue under the lock taken for the next batch.
    let mut answered = 0;
    loop {
        let batch = {
            let mut q = shared.queue.lock();
            if answered > 0 {
                q.completed(Instant::now(), answered);
            }
            loop {
                let stopping = shared.stopping.load(Ordering::Acquire);
                let before = q.abandoned();
                let poll = q.poll(Instant::now(), stopping);
                let dropped = q.abandoned() - before;
                if dropped > 0 {
                    shared.metrics.abandoned.inc_by(dropped);
                }
                // Cutting a batch or dropping abandoned items both change the depth; a stale
                // count would keep the idle watch from ever parking.
                shared.set_depth(&q);
                match poll {
                    Poll::Batch(b) => break b,
                    Poll::Wait(_) if stopping => return,
                    Poll::Wait(Some(t)) => {
                        shared.wake.wait_until(&mut q, t);
                    }
                    Poll::Wait(None) => {
                        let found = MutexGuard::unlocked(&mut q, || watch_for_work(shared));
                        // Re-check under the lock: an item pushed after the watch gave up has
                        // already sent its notification.
                        if !found && q.is_empty() && !shared.stopping.load(Ordering::Acquire) {
                            shared.wake.wait(&mut q);
                        }
                    }
                }
            }
        };
        answered = batch.len();
        run_batch(shared, backend.as_mut(), batch, im);
    }
}

/// How long an idle instance keeps watching for new work before it parks. A parked
/// thread costs the next request a futex wake-up (~30 µs here), more than a small
/// model's whole run; the watch yields the core on every turn, so it only takes
/// CPU time nothing else wants.
const IDLE_WATCH: Duration = Duration::from_micros(250);

/// Watches for up to [`IDLE_WATCH`] until something is queued; true if it was. Gives up
/// early when the core is contended.
fn watch_for_work(shared: &Shared) -> bool {
    let start = Instant::now();
    loop {
        if shared.queued.load(Ordering::Acquire) > 0 || shared.stopping.load(Ordering::Acquire) {
            return true;
        }
        if start.elapsed() >= IDLE_WATCH {
            return false;
        }
        if !crate::rt::yield_uncontended(crate::rt::CONTENDED_YIELD) {
            return shared.queued.load(Ordering::Acquire) > 0;
        }
    }
}

fn run_batch(shared: &Shared, backend: &mut dyn Backend, batch: Vec<Pending>, im: &InstanceMetrics) {
    let start = Instant::now();
    // Work whose caller's deadline has passed is not worth computing.
    let (batch, late): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| p.deadline.is_none_or(|d| d > start));
    for p in late {
        // Their wait counts in the queue-time metrics: under overload these are the
        // longest waits, which autoscaling on queue time must see.
        shared.metrics.queue_duration.observe((start - p.enqueued).as_secs_f64());
        let _ = p.reply.send(Err(Error::DeadlineExceeded { model: shared.name.clone() }));
    }
    if batch.is_empty() {
        return;
    }
    let rows: usize = batch.iter().map(|p| p.rows).sum();
    let executed = shared.padded_size(rows);
    let pad = executed - rows;
    // The batch's span is a child of one of its requests (the first sampled one: its
    // trace is the one a remote call continues; else the first traced: `min_by_key`
    // keeps the first of equals) and links to the others.
    let lead = batch
        .iter()
        .filter(|p| p.origin.trace.is_some())
        .min_by_key(|p| !p.origin.trace.as_ref().is_some_and(TraceContext::sampled));
    let span = match lead {
        Some(l) => tracing::debug_span!(parent: &l.span, "batch", model = %shared.name, rows, requests = batch.len()),
        None => tracing::debug_span!("batch", model = %shared.name, rows, requests = batch.len()),
    };
    // What a remote call carries: this span's context when spans are exported, else the
    // lead request's as it came (gathered only for backends that pass it on).
    let trace = backend.passes_callers().then(|| {
        let lead_trace = lead.and_then(|l| l.origin.trace.clone());
        crate::telemetry::otlp::adopt(&span, None)
            .map(|own| TraceContext { state: lead_trace.as_ref().and_then(|t| t.state.clone()), ..own })
            .or(lead_trace)
    });
    for p in &batch {
        if !lead.is_some_and(|l| std::ptr::eq(l, p)) {
            span.follows_from(p.span.id());
        }
        let waited = start - p.enqueued;
        shared.stats.queue.add(waited);
        shared.metrics.queue_duration.observe(waited.as_secs_f64());
    }
    let _enter = span.enter();

    let result = catch_unwind(AssertUnwindSafe(|| -> Result<_, Error> {
        let t_input = Instant::now();
        let inputs: Vec<BatchInput<'_>> = (0..batch[0].inputs.len())
            .map(|i| BatchInput { parts: batch.iter().map(|p| &p.inputs[i]).collect(), pad })
            .collect();
        let mut t_infer = t_input;
        if let Some(trace) = &trace {
            // The batch is worth computing until its last caller's deadline.
            let deadlines: Option<Vec<Instant>> = batch.iter().map(|p| p.deadline).collect();
            let origins: Vec<&Origin> = batch.iter().map(|p| &*p.origin).collect();
            backend.set_callers(deadlines.and_then(|d| d.into_iter().max()), &origins, trace.as_ref());
        }
        let outputs = backend
            .run_batch(&inputs, &mut || t_infer = Instant::now())
            .map_err(|e| Error::Backend { model: shared.name.clone(), message: e.0 })?;
        let t_output = Instant::now();
        let per_item = split(shared, &batch, outputs, pad)?;
        let t_end = Instant::now();
        Ok((per_item, t_infer - t_input, t_output - t_infer, t_end - t_output))
    }))
    .unwrap_or_else(|panic| {
        let msg = crate::error::panic_message(panic);
        tracing::error!(model = %shared.name, "backend panicked: {msg}");
        Err(Error::Backend { model: shared.name.clone(), message: format!("panicked: {msg}") })
    });

    let busy = start.elapsed().as_secs_f64();
    shared.metrics.busy.inc_by(busy);
    im.busy.inc_by(busy);
    im.executions.inc();
    im.inferences.inc_by(rows as u64);
    match result {
        Ok((per_item, input, infer, output)) => {
            shared.stats.record_batch(rows, executed, batch.len(), input, infer, output);
            shared.metrics.batch_size.observe(executed as f64);
            shared.metrics.compute_duration.observe(infer.as_secs_f64());
            for (p, outputs) in batch.into_iter().zip(per_item) {
                let queued = start - p.enqueued;
                let _ = p.reply.send(Ok(Computed { outputs, compute: infer, queued, batch_rows: executed }));
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Splits each output back into per-request pieces (zero-copy slices), dropping the
/// `pad` rows of padding at the end.
fn split(shared: &Shared, batch: &[Pending], outputs: Vec<Tensor>, pad: usize) -> Result<Vec<Vec<Tensor>>, Error> {
    if shared.batching {
        // Checked for every batch, not only shared ones, so a model whose output is not
        // batched fails the same way alone as it would together with others.
        let executed: usize = batch.iter().map(|p| p.rows).sum::<usize>() + pad;
        for (i, out) in outputs.iter().enumerate() {
            if out.shape.first() != Some(&executed) {
                return Err(Error::Backend {
                    model: shared.name.clone(),
                    message: format!(
                        "output '{}' has shape {:?} for a batch of {executed}: its first dimension is not the batch \
                         dimension (set max_batch_size: 0 for this model)",
                        shared.output_names.get(i).map_or("?", String::as_str),
                        out.shape
                    ),
                });
            }
        }
    }
    if batch.len() == 1 && pad == 0 {
        return Ok(vec![outputs]);
    }
    let mut rows: Vec<usize> = batch.iter().map(|p| p.rows).collect();
    rows.push(pad);
    let mut per_item: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outputs.len()); batch.len()];
    for out in outputs {
        let pieces = out.split_batch(&rows).map_err(|e| Error::Backend {
            model: shared.name.clone(),
            message: format!("cannot split output along the batch dimension: {e}"),
        })?;
        for (dst, piece) in per_item.iter_mut().zip(pieces) {
            dst.push(piece);
        }
    }
    Ok(per_item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use crate::telemetry::metrics::Metrics;

    /// Returns its input doubled, so results show which rows went where.
    struct Doubler;
    impl Backend for Doubler {
        fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            let v: Vec<f32> = inputs[0].to_f32().unwrap().iter().map(|x| x * 2.0).collect();
            Ok(vec![Tensor::from_f32(inputs[0].shape.clone(), &v)])
        }
        fn device(&self) -> String {
            "test".into()
        }
    }

    fn scheduler(delay_ms: u64, allowed: Vec<usize>) -> ModelScheduler {
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(delay_ms),
            preferred: vec![],
            max_queue_size: 16,
            adaptive: true,
        };
        let all = Metrics::new();
        let (metrics, mut instance) = (all.for_model("m"), vec![all.for_instance("m", 0)]);
        let instances: Vec<(Box<dyn Backend>, _)> = vec![(Box::new(Doubler), instance.remove(0))];
        ModelScheduler::start("m", instances, policy, allowed, vec!["y".into()], Arc::default(), metrics).unwrap()
    }

    #[tokio::test]
    async fn padded_batches_split_back_per_request() {
        let s = scheduler(30, vec![8]);
        let a = s.submit(vec![Tensor::from_f32(vec![1, 2], &[1.0, 2.0])], 1, None).unwrap();
        let b = s.submit(vec![Tensor::from_f32(vec![2, 2], &[3.0, 4.0, 5.0, 6.0])], 2, None).unwrap();
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!(a.outputs[0].to_f32().unwrap(), vec![2.0, 4.0]);
        assert_eq!(b.outputs[0].to_f32().unwrap(), vec![6.0, 8.0, 10.0, 12.0]);
        let batches = s.shared.stats.batches.lock().clone();
        assert_eq!(batches.keys().copied().collect::<Vec<_>>(), vec![8], "3 rows run padded to 8");
    }

    /// Always answers one row, whatever the batch: its output is not batched.
    struct OneRow;
    impl Backend for OneRow {
        fn run(&mut self, _: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            Ok(vec![Tensor::from_f32(vec![1, 2], &[0.0, 0.0])])
        }
        fn device(&self) -> String {
            "test".into()
        }
    }

    #[tokio::test]
    async fn an_output_without_the_batch_dimension_is_named_in_the_error() {
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_queue_delay: Duration::ZERO,
            preferred: vec![],
            max_queue_size: 4,
            adaptive: true,
        };
        let all = Metrics::new();
        let s = ModelScheduler::start(
            "m",
            vec![(Box::new(OneRow), all.for_instance("m", 0))],
            policy,
            vec![],
            vec!["y".into()],
            Arc::default(),
            all.for_model("m"),
        )
        .unwrap();
        let rx = s.submit(vec![Tensor::from_f32(vec![2, 2], &[1.0; 4])], 2, None).unwrap();
        let err = rx.await.unwrap().err().expect("a batch-of-2 request cannot get one row back");
        assert!(err.to_string().contains("output 'y' has shape [1, 2] for a batch of 2"), "{err}");
    }

    #[tokio::test]
    async fn abandoned_items_leave_the_queue_and_the_instance_parks() {
        let s = scheduler(20, vec![]);
        let rx = s.submit(vec![Tensor::from_f32(vec![1, 2], &[1.0, 2.0])], 1, None).unwrap();
        drop(rx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.shared.queued.load(Ordering::Acquire), 0);
        assert_eq!(s.shared.queue.lock().abandoned(), 1);
        // Dropping joins the instance thread: this returns only if it was not stuck.
        drop(s);
    }
}
