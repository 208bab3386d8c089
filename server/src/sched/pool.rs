//! CPU pools: named sets of threads that run pipeline ops, apart from the async runtime
//! and from the model instances, so a slow CPU stage never takes a model's thread.
//! Each pool has one bounded queue; when it is full, work is rejected at once.

use crate::error::Error;
use crate::telemetry::metrics::Metrics;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use prometheus::{Counter, IntGauge};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A pool as configured: `--pool name=threads[:queue]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub threads: usize,
    pub queue: usize,
}

impl PoolConfig {
    pub const DEFAULT_NAME: &'static str = "default";

    /// The pool nodes run on unless they name another: one thread per core.
    pub fn default_pool() -> PoolConfig {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        PoolConfig { name: Self::DEFAULT_NAME.into(), threads, queue: 1024 }
    }

    /// Parses `name=threads[:queue]`.
    pub fn parse(s: &str) -> Result<PoolConfig, String> {
        let bad = || format!("pool '{s}': expected name=threads[:queue], for example pre=4:512");
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        let (threads, queue) = match rest.split_once(':') {
            Some((t, q)) => (t, q.parse().map_err(|_| bad())?),
            None => (rest, 1024),
        };
        let threads: usize = threads.parse().map_err(|_| bad())?;
        if name.is_empty() || threads == 0 || queue == 0 {
            return Err(bad());
        }
        Ok(PoolConfig { name: name.into(), threads, queue })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// What a job reports besides its result: how long it waited and ran.
pub struct Timed<T> {
    pub value: T,
    pub queued: Duration,
    pub ran: Duration,
}

/// A job's outcome: its value, or the panic message if it panicked.
pub type JobResult<T> = Result<Timed<T>, String>;

pub struct CpuPool {
    pub config: PoolConfig,
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    depth: IntGauge,
    busy: Counter,
}

impl CpuPool {
    /// Jobs waiting for a thread now.
    pub fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, Sender::len)
    }

    /// Starts the pool's threads; fails when the system refuses one (those started end
    /// with the pool's queue).
    pub fn start(config: PoolConfig, metrics: &Metrics) -> std::io::Result<CpuPool> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue);
        let depth = metrics.pool_depth.with_label_values(&[&config.name]);
        let busy = metrics.pool_busy.with_label_values(&[&config.name]);
        let threads = (0..config.threads)
            .map(|i| {
                let rx: Receiver<Job> = rx.clone();
                let depth = depth.clone();
                std::thread::Builder::new().name(format!("pool-{}-{i}", config.name)).spawn(move || {
                    for job in rx.iter() {
                        depth.set(rx.len() as i64);
                        job();
                    }
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(CpuPool { config, tx: Some(tx), threads, depth, busy })
    }

    /// Queues `f`; the receiver gets its value with timings, or the panic message. A job
    /// whose receiver was dropped (the request was cancelled) or whose deadline has passed
    /// by the time a thread takes it is skipped.
    pub fn spawn<T: Send + 'static>(
        &self,
        deadline: Option<Instant>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<JobResult<T>>, Error> {
        let (reply, rx) = oneshot::channel();
        let queued_at = Instant::now();
        let busy = self.busy.clone();
        let job: Job = Box::new(move || {
            let start = Instant::now();
            if reply.is_closed() || deadline.is_some_and(|d| d <= start) {
                return; // the receiver sees the sender dropped
            }
            let out = catch_unwind(AssertUnwindSafe(f)).map_err(crate::error::panic_message);
            let ran = start.elapsed();
            busy.inc_by(ran.as_secs_f64());
            let _ = reply.send(out.map(|value| Timed { value, queued: start - queued_at, ran }));
        });
        let tx = self.tx.as_ref().ok_or(Error::ShuttingDown)?;
        match tx.try_send(job) {
            Ok(()) => {
                self.depth.set(tx.len() as i64);
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => {
                Err(Error::PoolFull { pool: self.config.name.clone(), capacity: self.config.queue })
            }
            Err(TrySendError::Disconnected(_)) => Err(Error::ShuttingDown),
        }
    }
}

impl Drop for CpuPool {
    /// Runs what is queued, then joins the threads.
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_configs_parse() {
        assert_eq!(PoolConfig::parse("pre=4:64").unwrap(), PoolConfig { name: "pre".into(), threads: 4, queue: 64 });
        assert_eq!(PoolConfig::parse("post=2").unwrap().queue, 1024);
        for bad in ["pre", "pre=0", "=2", "pre=x", "pre=2:0"] {
            assert!(PoolConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_rejects_and_panics_are_caught() {
        let metrics = Metrics::new();
        let pool = CpuPool::start(PoolConfig { name: "p".into(), threads: 1, queue: 1 }, &metrics).unwrap();
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let first = pool.spawn(None, move || release.recv().is_ok()).unwrap();
        // Wait until the thread has taken the first job, so the queue is empty again.
        while !pool.tx.as_ref().unwrap().is_empty() {
            std::thread::yield_now();
        }
        let second = pool.spawn(None, || panic!("boom")).unwrap();
        let third = pool.spawn(None, || 3);
        assert!(matches!(third, Err(Error::PoolFull { .. })), "one thread busy, one job queued: full");
        hold.send(()).unwrap();
        assert!(first.await.unwrap().unwrap().value);
        assert_eq!(second.await.unwrap().err().as_deref(), Some("boom"));
    }
}
