//! The protocol layer: gRPC and HTTP served together over one engine. Handlers only
//! translate wire types and map errors (`error`); everything else is the engine's.

pub mod error;
pub mod grpc;
pub mod http;
pub mod views;

use crate::engine::Engine;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    /// Deadline for requests that carry none; `None`: no deadline.
    pub default_timeout: Option<Duration>,
}

impl AppState {
    pub fn ready(&self) -> bool {
        self.engine.ready()
    }
}

/// The request's own timeout, else the server default, as an instant.
pub(crate) fn deadline_after(own: Option<Duration>, default: Option<Duration>) -> Option<Instant> {
    own.or(default).map(|d| Instant::now() + d)
}

pub(crate) fn parse_shape(shape: &[i64]) -> Result<Vec<usize>, String> {
    shape.iter().map(|&d| usize::try_from(d).map_err(|_| format!("shape {shape:?} has a negative dimension"))).collect()
}
