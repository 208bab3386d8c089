//! Loading a model while serving, without slowing serving down.
//!
//! A reload that loads a model (ONNX Runtime optimising the graph, then the warm-up runs)
//! runs on a thread at the lowest CPU priority (nice 19), so on a busy machine it gets
//! the CPU that serving leaves idle instead of half of it. The threads such a load starts
//! for serving (the model's instance threads, ONNX Runtime's intra-op pool) must not carry
//! that priority: on Linux a thread inherits its creator's nice value, and an unprivileged
//! process cannot lower it again. So while on a background thread, [`spawn`] has them
//! created by one long-lived spawner thread that runs at normal priority.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::{Builder, JoinHandle};

/// The default nice value of background loads: the lowest priority (Linux weight 15
/// against 1024 for nice 0: about 1.5% of a contended core, all of an idle one).
pub const BACKGROUND_NICE: i32 = 19;

static RUNS: AtomicU64 = AtomicU64::new(0);

/// How many closures [`in_background`] has run in this process (for tests).
#[doc(hidden)]
pub fn background_runs() -> u64 {
    RUNS.load(Ordering::Relaxed)
}

type Job = Box<dyn FnOnce() + Send>;

static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

thread_local! {
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Starts the spawner from the calling thread (whose priority its threads get), once.
fn spawner() -> io::Result<&'static mpsc::Sender<Job>> {
    if let Some(tx) = SPAWNER.get() {
        return Ok(tx);
    }
    let (tx, rx) = mpsc::channel::<Job>();
    Builder::new().name("sluice-spawner".into()).spawn(move || {
        for job in rx {
            // A job only spawns a thread; should that ever panic, keep serving the others.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    })?;
    // Two first callers at once: one spawner wins, the other's thread ends with its channel.
    Ok(SPAWNER.get_or_init(|| tx))
}

/// Spawns a thread at normal priority, also when called from a background load.
pub fn spawn<F, T>(builder: Builder, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if !BACKGROUND.get() {
        return builder.spawn(f);
    }
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(f));
    });
    // The spawner was started by `in_background` before this thread existed.
    spawner()?.send(job).map_err(|_| io::Error::other("the thread spawner has stopped"))?;
    rx.recv().unwrap_or_else(|_| Err(io::Error::other("the thread spawner dropped a request")))
}

/// Runs `f` on a new thread at nice value `nice` (`--load-nice`: 1..=19, higher takes
/// less from serving on a busy machine) and waits for it. A panic in `f` propagates to
/// the caller. With `nice` 0, or when no thread can be started, `f` runs on the calling
/// thread.
pub fn in_background<T: Send>(nice: i32, f: impl FnOnce() -> T + Send) -> T {
    let nice = nice.clamp(0, 19);
    // The spawner must exist before any thread is lowered: it takes the caller's priority.
    if nice == 0 || spawner().is_err() {
        return f();
    }
    RUNS.fetch_add(1, Ordering::Relaxed);
    let f = std::sync::Mutex::new(Some(f));
    let take = || f.lock().unwrap_or_else(|p| p.into_inner()).take();
    std::thread::scope(|s| {
        let spawned = Builder::new().name("sluice-load".into()).spawn_scoped(s, || {
            lower_priority(nice);
            BACKGROUND.set(true);
            (take().expect("run once"))()
        });
        match spawned {
            Ok(worker) => worker.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(_) => (take().expect("not run"))(),
        }
    })
}

#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    // On Linux, PRIO_PROCESS with who = 0 sets the calling thread's nice value, not the
    // whole process's (threads are tasks with their own nice value).
    // SAFETY: setpriority only reads its integer arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::debug!("cannot lower the load thread's priority: {}", io::Error::last_os_error());
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_background() -> bool {
        BACKGROUND.get()
    }

    #[cfg(target_os = "linux")]
    fn own_nice() -> i32 {
        // SAFETY: getpriority only reads its integer arguments.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn background_runs_low_but_the_threads_it_starts_do_not() {
        let base = own_nice();
        let (inside, started, direct) = in_background(BACKGROUND_NICE, || {
            assert!(is_background());
            let started = spawn(Builder::new().name("t-normal".into()), own_nice).unwrap().join().unwrap();
            // A plain std spawn from here inherits the low priority: what `spawn` avoids.
            let direct = std::thread::spawn(own_nice).join().unwrap();
            (own_nice(), started, direct)
        });
        assert_eq!(inside, BACKGROUND_NICE);
        assert_eq!(direct, BACKGROUND_NICE);
        assert_eq!(started, base, "threads started by a background load run at normal priority");
        assert_eq!(own_nice(), base, "the caller's priority is untouched");
        assert!(!is_background());
    }

    #[test]
    fn background_returns_and_propagates_panics() {
        assert_eq!(in_background(BACKGROUND_NICE, || 6 * 7), 42);
        let caught = std::panic::catch_unwind(|| in_background(BACKGROUND_NICE, || panic!("load failed")));
        assert!(caught.is_err());
    }

    #[test]
    fn spawn_outside_background_is_a_plain_thread() {
        let name = spawn(Builder::new().name("t-plain".into()), || std::thread::current().name().map(String::from))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(name.as_deref(), Some("t-plain"));
    }
}
