//! The standard gRPC health service (`grpc.health.v1.Health`), as Kubernetes' gRPC
//! probes, Envoy and gRPC's client-side balancers speak it. The service name "" (and the
//! v2 inference service's own name) is the whole server's readiness; a model, pipeline
//! or alias name is that one's. Answers are computed from the engine at each call, so
//! they cannot drift from the v2 ready calls after a reload or when a drain begins.

use super::AppState;
use crate::error::Error;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The v2 inference service's full name: a client may ask for it as for "".
const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";
/// How often a Watch looks for a change. Probes use Check; Watch is for balancers,
/// for which half a second is prompt.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

pub struct HealthApi {
    state: AppState,
}

pub fn service(state: AppState) -> HealthServer<HealthApi> {
    HealthServer::new(HealthApi { state })
}

impl HealthApi {
    /// `None`: no such service (no model, pipeline or alias of that name).
    fn status(&self, service: &str) -> Option<ServingStatus> {
        let serving = |yes: bool| if yes { ServingStatus::Serving } else { ServingStatus::NotServing };
        if service.is_empty() || service == INFERENCE_SERVICE {
            return Some(serving(self.state.ready()));
        }
        match self.state.engine.snapshot().servable(service, "") {
            Ok(_) => Some(serving(!self.state.draining())),
            Err(Error::ModelNotFound { .. }) => None,
            Err(_) => Some(ServingStatus::NotServing),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthApi {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        match self.status(&service) {
            Some(status) => Ok(Response::new(HealthCheckResponse { status: status as i32 })),
            None => Err(Status::not_found(format!("no model or pipeline named '{service}'"))),
        }
    }

    type WatchStream = WatchStream;

    /// Sends the status now and again whenever it changes; ends when the server stops.
    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let service = req.into_inner().service;
        let api = HealthApi { state: self.state.clone() };
        let mut stopping = self.state.stopping.clone();
        // A task feeds the stream; it ends when the client goes away or the server stops.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            loop {
                let now = api.status(&service).unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(now) {
                    last = Some(now);
                    if tx.send(Ok(HealthCheckResponse { status: now as i32 })).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopping.wait_for(|s| *s) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
