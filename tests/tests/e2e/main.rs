//! The end-to-end tests that start servers in this process and share it freely, as one
//! test binary: every test binary of this crate links the server and compiles the
//! client and runtime code it calls, about 45 s of a release build on 2 cores each.
//! Tests that need a process to themselves stay binaries of their own (tests/tests/*.rs):
//! ONNX Runtime absent, thread priorities and busy fractions read process-wide, and the
//! container tests.
//!
//! Tests from different files now run side by side (two at a time on 2 cores), so the
//! few that load the machine (perf_analyzer, Chromium, a load generator, ResNet-50 under
//! load) and the few that assert on wall-clock time take [`MACHINE`]: a loaded machine
//! never runs a timed test.

mod access;
mod bench;
mod branches;
mod connections;
mod dashboard;
mod health;
mod ocr;
mod opencv;
mod pipelines;
mod remote;
mod serving;
mod tls;
mod tract;
mod triton_tools;

/// Held for writing by a test that loads the machine, for reading by a test that asserts
/// on wall-clock time (tokio's lock, fair between the two, and held across awaits).
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// For a test that loads the machine: it runs beside no timed test and no other such test.
async fn loads_the_machine() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// For a test that asserts on wall-clock time: it runs beside no test that loads the machine.
async fn timed() -> tokio::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}
