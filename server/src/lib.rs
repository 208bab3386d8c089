//! sluice: an inference server for multi-model vision pipelines.
//!
//! Dependencies point one way (checked by `tests/layering.rs`): `api` -> `engine` ->
//! {`pipeline`, `model`} -> `sched` -> `backend` -> `repository`; `request`, `error`,
//! `telemetry`, `rt`, `onnx` and `tls` are leaves that any module may use. `server`
//! wires it all together, `housekeeping` runs the thread that watches, reaps and samples.
//! See docs/ARCHITECTURE.md.
//!
//! The crate exports what the `sluice` command, embedding programs and the tests need;
//! everything else is private, so the compiler reports what nothing uses.

mod api;
pub mod backend;
mod engine;
mod error;
/// Entry points for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub mod fuzzing;
mod housekeeping;
mod model;
mod onnx;
mod pipeline;
mod repository;
mod request;
mod rt;
mod sched;
mod server;
mod telemetry;
mod tls;

pub use api::access::{ApiGroup, ModelControl, Restriction};
pub use error::Error;
pub use housekeeping::ReloadMode;
pub use sched::pool::PoolConfig;
pub use server::{start, AccessConfig, Limits, RunningServer, ServerConfig, StartError};
pub use sluice_ops::op::{OpRegistry, OpSpec};
pub use tls::TlsFiles;

/// Span export to OpenTelemetry collectors (`--otlp-endpoint`).
pub use telemetry::otlp;

/// Reading a repository without serving it: `sluice check`, `sluice graph`.
pub mod offline {
    pub use crate::onnx::fold::fold;
    pub use crate::onnx::signature::{read_signature, TensorInfo};
    pub use crate::pipeline::catalog::ScannedRepo;
    pub use crate::pipeline::compile::{Diagnostic, Located};
    pub use crate::pipeline::{compile, list_files, CompileError, Plan};
    pub use crate::repository::model_yaml::ModelYaml;
    pub use crate::repository::{read_dir as read_model_dir, read_spec, ModelSpec};
}

/// For tests: how many model loads ran at background priority.
#[doc(hidden)]
pub use rt::exit_now;
pub use rt::priority::background_runs;
