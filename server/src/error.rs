//! The errors a request can meet. Each has a stable `error_type()` used in metric labels;
//! the mapping to gRPC codes and HTTP statuses lives in one place, `api::error`.

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("model '{model}' is not found{}", version_suffix(.version))]
    ModelNotFound { model: String, version: Option<String> },
    #[error("model '{model}'{} is not ready: {reason}", version_named(.version))]
    ModelNotReady { model: String, version: Option<String>, reason: String },
    #[error("model '{model}': {message}")]
    InvalidInput { model: String, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("model '{model}': queue is full ({capacity} requests waiting); retry later")]
    QueueFull { model: String, capacity: usize },
    /// Well formed but over a size limit; the message names the limit and what raises it.
    #[error("{0}")]
    TooLarge(String),
    /// Short of a shared resource now (memory budgets); the same request may succeed later.
    #[error("{0}")]
    Busy(String),
    #[error("CPU pool '{pool}' is full ({capacity} jobs waiting); retry later")]
    PoolFull { pool: String, capacity: usize },
    #[error("pipeline '{pipeline}', node '{node}': {message}")]
    NodeInvalid { pipeline: String, node: String, message: String },
    #[error("pipeline '{pipeline}', node '{node}': {message}")]
    NodeFailed { pipeline: String, node: String, message: String },
    #[error("model '{model}': deadline exceeded before the request completed")]
    DeadlineExceeded { model: String },
    #[error("model '{model}': backend failed: {message}")]
    Backend { model: String, message: String },
    /// A repository request (load, unload) that cannot be done as asked.
    #[error("{0}")]
    Repository(String),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The message of a caught panic (`&str` or `String` payloads; others have none).
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn version_suffix(v: &Option<String>) -> String {
    v.as_ref().map(|v| format!(" (version {v})")).unwrap_or_default()
}

fn version_named(v: &Option<String>) -> String {
    v.as_ref().map(|v| format!(" version '{v}'")).unwrap_or_default()
}

impl Error {
    /// A short, stable name for metric labels and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::ModelNotFound { .. } => "model_not_found",
            Error::ModelNotReady { .. } => "model_not_ready",
            Error::InvalidInput { .. } | Error::BadRequest(_) => "invalid_input",
            Error::QueueFull { .. } | Error::PoolFull { .. } => "queue_full",
            Error::TooLarge(_) => "too_large",
            Error::Busy(_) => "busy",
            Error::NodeInvalid { .. } => "invalid_input",
            Error::NodeFailed { .. } => "node_failed",
            Error::DeadlineExceeded { .. } => "deadline_exceeded",
            Error::Backend { .. } => "backend",
            Error::Repository(_) => "repository",
            Error::ShuttingDown => "shutting_down",
            Error::Internal(_) => "internal",
        }
    }

    pub(crate) fn invalid(model: &str, message: impl Into<String>) -> Error {
        Error::InvalidInput { model: model.to_string(), message: message.into() }
    }
}
