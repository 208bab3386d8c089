//! The server's housekeeping threads: the `notify` watcher and its debounce (`--reload
//! watch`) and the reaping of replaced models off the async runtime on one; the
//! once-a-second samples for the dashboard, the queue-time gauge and the GPU metrics on
//! another.

use crate::engine::reload::Scope;
use crate::engine::Engine;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often loads that may succeed later (remote models) are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// How the server picks up changes to the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ReloadMode {
    /// Watch the folders and reload on changes; the load/unload API works too.
    Watch,
    /// Reload only when asked (the repository load/unload API, `sluice reload`).
    Explicit,
    /// Serve what was there at start.
    None,
}

/// The server's housekeeping threads: one watches the repository (in `watch` mode) and
/// reloads after changes settle, and drops replaced models once their last request is
/// done; another samples the dashboard's counters, the queue-time gauge and the GPUs
/// once a second.
pub struct Housekeeper {
    /// Dropped to stop both threads (a disconnected channel is ready in `select!`).
    stop: Option<crossbeam_channel::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Housekeeper {
    pub fn start(engine: Arc<Engine>, mode: ReloadMode, debounce: Duration) -> Result<Housekeeper, String> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        // Events only set a flag's time: a burst of writes is one reload.
        let (tx, events) = crossbeam_channel::unbounded::<()>();
        let watcher = match mode {
            ReloadMode::Watch => Some(watch(&engine, tx.clone())?),
            ReloadMode::Explicit | ReloadMode::None => None,
        };
        let sample_engine = engine.clone();
        let sample_stopped = stopped.clone();
        let thread = std::thread::Builder::new()
            // Linux keeps 15 bytes of a thread name.
            .name("sluice-keeper".into())
            .spawn(move || {
                // Held so `events` never disconnects (a disconnected channel is always
                // ready in `select!`) when nothing watches.
                let _tx = tx;
                let tick = crossbeam_channel::tick(Duration::from_millis(100));
                let mut dirty_since: Option<Instant> = None;
                let mut retried = Instant::now();
                loop {
                    crossbeam_channel::select! {
                        recv(stopped) -> _ => break,
                        recv(events) -> e => if e.is_ok() { dirty_since = Some(Instant::now()) },
                        recv(tick) -> _ => {}
                    }
                    if dirty_since.is_some_and(|t| t.elapsed() >= debounce) {
                        dirty_since = None;
                        let _ = engine.reload(&Scope::All);
                    } else if retried.elapsed() >= RETRY_EVERY && engine.snapshot().wants_retry() {
                        // A remote model whose servers were down: try again.
                        retried = Instant::now();
                        let _ = engine.reload(&Scope::All);
                    }
                    engine.reap();
                }
            })
            .map_err(|e| format!("cannot start the housekeeping thread: {e}"))?;
        // The once-a-second samples (dashboard, queue-time gauge, GPUs) on a thread of
        // their own: a reload that takes minutes must not freeze what autoscaling reads.
        let sampler = std::thread::Builder::new().name("sluice-sampler".into()).spawn(move || {
            let tick = crossbeam_channel::tick(Duration::from_secs(1));
            sample_engine.sample();
            loop {
                crossbeam_channel::select! {
                    recv(sample_stopped) -> _ => break,
                    recv(tick) -> _ => sample_engine.sample(),
                }
            }
        });
        let sampler = match sampler {
            Ok(t) => t,
            Err(e) => {
                drop(stop);
                let _ = thread.join();
                return Err(format!("cannot start the sampling thread: {e}"));
            }
        };
        Ok(Housekeeper { stop: Some(stop), threads: vec![thread, sampler], _watcher: watcher })
    }
}

impl Drop for Housekeeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A watcher on the model repository and the pipelines folder that pings `tx` on every
/// change to their files (reads are not changes).
fn watch(engine: &Engine, tx: crossbeam_channel::Sender<()>) -> Result<notify::RecommendedWatcher, String> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
        Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => {}
        Ok(_) => {
            let _ = tx.send(());
        }
        Err(e) => tracing::warn!("watching the repository: {e}"),
    })
    .map_err(|e| format!("cannot watch the repository: {e}"))?;
    let cfg = engine.config();
    let mut dirs = vec![cfg.models_dir.clone()];
    dirs.extend(cfg.pipelines_dir.iter().filter(|d| d.is_dir()).cloned());
    for d in &dirs {
        watcher.watch(d, RecursiveMode::Recursive).map_err(|e| format!("cannot watch {}: {e}", d.display()))?;
    }
    tracing::info!(dirs = ?dirs, "watching the repository for changes");
    Ok(watcher)
}
