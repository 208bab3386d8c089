//! The one table from engine errors to gRPC codes and HTTP statuses.

use crate::error::Error;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Code;

fn codes(e: &Error) -> (Code, StatusCode) {
    match e {
        Error::ModelNotFound { .. } => (Code::NotFound, StatusCode::NOT_FOUND),
        Error::ModelNotReady { .. } => (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
        Error::InvalidInput { .. } | Error::BadRequest(_) | Error::NodeInvalid { .. } => {
            (Code::InvalidArgument, StatusCode::BAD_REQUEST)
        }
        Error::QueueFull { .. } | Error::PoolFull { .. } | Error::Busy(_) => {
            (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS)
        }
        Error::TooLarge(_) => (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE),
        Error::DeadlineExceeded { .. } => (Code::DeadlineExceeded, StatusCode::GATEWAY_TIMEOUT),
        // Triton answers a load that fails with 400 too.
        Error::Repository(_) => (Code::FailedPrecondition, StatusCode::BAD_REQUEST),
        Error::ShuttingDown => (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
        Error::Backend { .. } | Error::Internal(_) | Error::NodeFailed { .. } => {
            (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        tonic::Status::new(codes(&e).0, e.to_string())
    }
}

/// HTTP errors carry the v2 protocol's `{"error": "..."}` body.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = codes(&self).1;
        (status, axum::Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_full_is_resource_exhausted_and_429() {
        let e = Error::QueueFull { model: "m".into(), capacity: 4 };
        assert_eq!(codes(&e), (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS));
        let s: tonic::Status = e.into();
        assert!(s.message().contains("queue is full"));
    }
}
