//! Thread utilities the rest of the server builds on.

pub mod priority;

use std::time::{Duration, Instant};

/// A yield that takes this long or longer came back after another thread ran: the core
/// is wanted (the clients, the pipelines' ops, the I/O threads), so a watch should stop
/// taking its turns and sleep.
pub const CONTENDED_YIELD: Duration = Duration::from_micros(20);

/// One turn of a watch: gives the core to any other thread that wants it; false when
/// one took it (the yield came back after `contended` or later).
pub fn yield_uncontended(contended: Duration) -> bool {
    let before = Instant::now();
    std::thread::yield_now();
    before.elapsed() < contended
}

/// Returns memory that malloc holds free to the system (glibc keeps freed blocks in
/// per-thread arenas; `malloc_trim` releases their unused pages). A no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Ends the process at once, without exit handlers or the static destructors of loaded
/// libraries: other threads may still be inside ONNX Runtime (a load, a warm-up, a
/// batch), and its destructors would tear its state down under them (a SIGSEGV instead of
/// the exit code asked for). Standard output and error are flushed first.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit takes no pointers and does not return.
    unsafe { libc::_exit(code) }
}
