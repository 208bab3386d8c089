//! Thread utilities the rest of the server builds on.

pub mod priority;

/// Returns memory that malloc holds free to the system (glibc keeps freed blocks in
/// per-thread arenas; `malloc_trim` releases their unused pages). A no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
