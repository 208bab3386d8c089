//! sluice: an inference server for multi-model vision pipelines.
//!
//! Data flows one way: `api` (gRPC, HTTP) -> `engine` (the loaded models, request
//! checks) -> `sched` (per-model batch queue, instance threads) -> `backend` (ONNX
//! Runtime). `repository` reads the model folders, `reload` swaps in new snapshots of
//! them while serving; `server` wires it all together.

pub mod api;
pub mod backend;
pub mod dashboard;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod metrics;
pub mod otlp;
pub mod pipeline;
pub mod reload;
pub mod repository;
pub mod sched;
pub mod server;
pub mod stats;
pub mod tls;

pub use error::Error;
pub use server::{RunningServer, ServerConfig};
