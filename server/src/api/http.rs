//! HTTP/REST: the v2 protocol's JSON endpoints plus the binary tensor data extension
//! (`Inference-Header-Content-Length`: a JSON header followed by raw tensor bytes).

use super::{
    deadline_after, named_input, request_id, request_span, tensor_header, timing_params, views, AppState,
    REQUEST_ID_HEADER, TIMING_PARAM, TRACEPARENT_HEADER, TRACESTATE_HEADER,
};
use crate::error::Error;
use crate::request::{InferRequest, InferResponse};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{BufMut, BytesMut};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::time::Duration;
use tracing::Instrument;

const HEADER_LEN: &str = "inference-header-content-length";
/// Per-request deadline in milliseconds (the gRPC API uses `grpc-timeout`).
const TIMEOUT_HEADER: &str = "sluice-timeout-ms";

pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        // Kubernetes' startup probe: passes once every model that should load has loaded
        // or failed (readiness may still be false then; liveness is checked only after).
        .route("/v2/health/startup", get(server_started))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/versions/{version}/config", get(model_config_v))
        .route("/v2/models/{model}/stats", get(model_stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(model_stats_v))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route("/v2/repository/models/{model}/unload", post(repository_unload))
        .route("/v2/repository/reload", post(repository_reload))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(|| async { axum::response::Html(super::dashboard::PAGE) }))
        .route("/dashboard/data", get(dashboard_data))
        .route("/dashboard/events", get(dashboard_events))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": views::SERVER_NAME,
        "version": views::SERVER_VERSION,
        "extensions": views::EXTENSIONS,
    }))
}

async fn server_ready(State(s): State<AppState>) -> StatusCode {
    if s.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_started(State(s): State<AppState>) -> StatusCode {
    if s.engine.started() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_metadata(State(s): State<AppState>, Path(m): Path<String>) -> Result<Json<Value>, Error> {
    model_metadata_v(State(s), Path((m, String::new()))).await
}
async fn model_metadata_v(
    State(s): State<AppState>,
    Path((m, v)): Path<(String, String)>,
) -> Result<Json<Value>, Error> {
    let snapshot = s.engine.snapshot();
    let e = snapshot.servable(&m, &v)?;
    Ok(Json(views::metadata_json(&views::metadata(&snapshot, &e))))
}

async fn model_ready(State(s): State<AppState>, Path(m): Path<String>) -> StatusCode {
    model_ready_v(State(s), Path((m, String::new()))).await
}
async fn model_ready_v(State(s): State<AppState>, Path((m, v)): Path<(String, String)>) -> StatusCode {
    match s.engine.snapshot().servable(&m, &v).map_err(|e| s.engine.starting(e)) {
        Ok(_) if !s.draining() => StatusCode::OK,
        Err(Error::ModelNotFound { .. }) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn model_config(State(s): State<AppState>, Path(m): Path<String>) -> Result<Json<Value>, Error> {
    model_config_v(State(s), Path((m, String::new()))).await
}
async fn model_config_v(State(s): State<AppState>, Path((m, v)): Path<(String, String)>) -> Result<Json<Value>, Error> {
    let snapshot = s.engine.snapshot();
    let e = snapshot.servable(&m, &v)?;
    Ok(Json(views::config_json(&views::config(&e))))
}

async fn all_stats(State(s): State<AppState>) -> Result<Json<Value>, Error> {
    Ok(Json(views::statistics_json(&views::statistics(&s.engine.snapshot(), "", "")?)))
}
async fn model_stats(State(s): State<AppState>, Path(m): Path<String>) -> Result<Json<Value>, Error> {
    model_stats_v(State(s), Path((m, String::new()))).await
}
async fn model_stats_v(State(s): State<AppState>, Path((m, v)): Path<(String, String)>) -> Result<Json<Value>, Error> {
    Ok(Json(views::statistics_json(&views::statistics(&s.engine.snapshot(), &m, &v)?)))
}

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(State(s): State<AppState>, body: Bytes) -> Result<Json<Value>, Error> {
    let req: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| Error::BadRequest(format!("repository index request: {e}")))?
    };
    let models: Vec<Value> = views::repository_index(&s.engine.snapshot(), req.ready)
        .into_iter()
        .map(|m| {
            let mut v = json!({"name": m.name, "version": m.version, "state": m.state});
            if !m.reason.is_empty() {
                v["reason"] = json!(m.reason);
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(models)))
}

/// Loads (or loads again) a model or pipeline; 200 with `{"changed": [...]}` when it
/// serves, else the error (400 when its files fail to load, 404 when there are none).
async fn repository_load(State(s): State<AppState>, Path(m): Path<String>) -> Result<Json<Value>, Error> {
    s.load_or_unload(m, false).await.map(|r| Json(json!({ "changed": changed(&r) })))
}

async fn repository_unload(State(s): State<AppState>, Path(m): Path<String>) -> Result<Json<Value>, Error> {
    s.load_or_unload(m, true).await.map(|r| Json(json!({ "changed": changed(&r) })))
}

/// sluice's extension: reload the whole repository now; lists what changed and failed.
async fn repository_reload(State(s): State<AppState>) -> Result<Json<Value>, Error> {
    let r = s.load_or_unload(String::new(), false).await?;
    let failed: Vec<Value> = r.failed.iter().map(|f| json!({"name": f.subject.label(), "reason": f.reason})).collect();
    Ok(Json(json!({ "changed": changed(&r), "failed": failed })))
}

async fn dashboard_data(State(s): State<AppState>) -> Json<Value> {
    Json(super::dashboard::frame(&s.engine))
}

/// A frame every second, as server-sent events, for as long as the page is open.
async fn dashboard_events(
    State(s): State<AppState>,
) -> axum::response::Sse<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    let mut stopping = s.stopping.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let frames = tokio_stream::StreamExt::map(ticks, move |_| {
        Ok(Event::default().data(super::dashboard::frame(&s.engine).to_string()))
    });
    Sse::new(futures::StreamExt::take_until(frames, stopped)).keep_alive(KeepAlive::default())
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.engine.telemetry().metrics.render())
}

#[derive(Deserialize)]
struct JsonInferRequest {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<JsonInput>,
    #[serde(default)]
    outputs: Vec<JsonOutput>,
}

#[derive(Deserialize)]
struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

async fn infer(state: State<AppState>, Path(m): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    infer_v(state, Path((m, String::new())), headers, body).await
}

async fn infer_v(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_id = headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok());
    // The id an error is answered with when the body never got parsed: the header's, or a new one.
    let mut id = None;
    let run = async {
        let timeout = headers
            .get(TIMEOUT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let started = std::time::Instant::now();
        let (mut req, binary_out) = parse_infer(&model, &version, &headers, body)
            .inspect_err(|e| s.engine.record_rejected(&model, &version, e))?;
        req.id = request_id(std::mem::take(&mut req.id), header_id);
        id = Some(req.id.clone());
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let (span, trace) =
            request_span(&req.model_name, &req.id, header(TRACEPARENT_HEADER), header(TRACESTATE_HEADER));
        req.trace = trace;
        let resp = s.engine.infer(req, deadline_after(timeout, s.default_timeout)).instrument(span).await?;
        encode_infer(resp, &binary_out, started)
    };
    match run.await {
        Ok(r) => r,
        Err(e) => {
            let mut r = e.into_response();
            let id = id.unwrap_or_else(|| request_id(String::new(), header_id));
            if let Ok(v) = header::HeaderValue::from_str(&id) {
                r.headers_mut().insert(REQUEST_ID_HEADER, v);
            }
            r
        }
    }
}

/// Which outputs go back as binary: by name, plus a default for the unnamed.
pub(crate) struct BinaryOutputs {
    default: bool,
    named: Vec<(String, bool)>,
}

impl BinaryOutputs {
    fn is_binary(&self, name: &str) -> bool {
        self.named.iter().find(|(n, _)| n == name).map_or(self.default, |(_, b)| *b)
    }
}

pub(crate) fn parse_infer(
    model: &str,
    version: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(InferRequest, BinaryOutputs), Error> {
    let invalid = |m: String| Error::InvalidInput { model: model.to_string(), message: m };
    let header_len = match headers.get(HEADER_LEN) {
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| invalid(format!("bad {HEADER_LEN} header")))?;
            if n > body.len() {
                return Err(invalid(format!("{HEADER_LEN} is {n} but the body has only {} bytes", body.len())));
            }
            n
        }
        None => body.len(),
    };
    let req: JsonInferRequest =
        serde_json::from_slice(&body[..header_len]).map_err(|e| invalid(format!("request JSON: {e}")))?;
    let mut binary = body.slice(header_len..);
    let inputs =
        req.inputs
            .into_iter()
            .map(|i| {
                let (dtype, shape) = tensor_header(&i.name, &i.datatype, &i.shape).map_err(invalid)?;
                let data = match i.parameters.get("binary_data_size") {
                    Some(n) => {
                        let n = n.as_u64().ok_or_else(|| {
                            invalid(format!("input '{}': binary_data_size must be an integer", i.name))
                        })? as usize;
                        if n > binary.len() {
                            return Err(invalid(format!(
                                "input '{}': binary_data_size is {n} but only {} binary bytes remain",
                                i.name,
                                binary.len()
                            )));
                        }
                        binary.split_to(n)
                    }
                    None => {
                        let data = i.data.as_ref().ok_or_else(|| {
                            invalid(format!("input '{}' has neither data nor binary_data_size", i.name))
                        })?;
                        sluice_ops::tensor::json_to_bytes(dtype, data)
                            .map_err(|e| invalid(format!("input '{}': {e}", i.name)))?
                    }
                };
                named_input(i.name, dtype, shape, data).map_err(invalid)
            })
            .collect::<Result<Vec<_>, Error>>()?;
    if !binary.is_empty() {
        return Err(invalid(format!("{} binary bytes after the last input are unaccounted for", binary.len())));
    }
    let flag = |p: &Map<String, Value>, k: &str| p.get(k).and_then(Value::as_bool);
    let binary_out = BinaryOutputs {
        default: flag(&req.parameters, "binary_data_output").unwrap_or(false),
        named: req
            .outputs
            .iter()
            .filter_map(|o| flag(&o.parameters, "binary_data").map(|b| (o.name.clone(), b)))
            .collect(),
    };
    Ok((
        InferRequest {
            model_name: model.to_string(),
            model_version: version.to_string(),
            id: req.id,
            inputs,
            outputs: req.outputs.into_iter().map(|o| o.name).collect(),
            timing: flag(&req.parameters, TIMING_PARAM).unwrap_or(false),
            parameters: req
                .parameters
                .iter()
                .filter_map(|(k, v)| {
                    use crate::request::Scalar;
                    let v = match v {
                        Value::Bool(b) => Scalar::Bool(*b),
                        Value::Number(n) => Scalar::Num(n.as_f64()?),
                        Value::String(s) => Scalar::Str(s.clone()),
                        _ => return None,
                    };
                    Some((k.clone(), v))
                })
                .collect(),
            trace: None,
        },
        binary_out,
    ))
}

fn encode_infer(resp: InferResponse, binary: &BinaryOutputs, started: std::time::Instant) -> Result<Response, Error> {
    let mut blobs = Vec::new();
    let outputs: Vec<Value> = resp
        .outputs
        .iter()
        .map(|o| {
            let mut v = json!({
                "name": o.name,
                "datatype": o.tensor.dtype.as_str(),
                "shape": o.tensor.shape,
            });
            if binary.is_binary(&o.name) {
                v["parameters"] = json!({"binary_data_size": o.tensor.data.len()});
                blobs.push(o.tensor.data.clone());
            } else {
                v["data"] = o.tensor.to_json();
            }
            v
        })
        .collect();
    let mut head = json!({
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "id": resp.id,
        "outputs": outputs,
    });
    if let Some(steps) = &resp.timing {
        let params: Map<String, Value> =
            timing_params(steps, started.elapsed()).into_iter().map(|(k, v)| (k, json!(v))).collect();
        head["parameters"] = Value::Object(params);
    }
    let header = serde_json::to_vec(&head).map_err(|e| Error::Internal(format!("encoding the response: {e}")))?;
    // An id that is not a valid header value (control characters) stays in the body only.
    let id = if header::HeaderValue::from_str(&resp.id).is_ok() { resp.id.clone() } else { String::new() };
    let id_header = (header::HeaderName::from_static(REQUEST_ID_HEADER), id);
    if blobs.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json".to_string()), id_header], header).into_response());
    }
    let header_len = header.len();
    let mut body = BytesMut::with_capacity(header_len + blobs.iter().map(|b| b.len()).sum::<usize>());
    body.put_slice(&header);
    for b in blobs {
        body.put_slice(&b);
    }
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static(HEADER_LEN), header_len.to_string()),
            id_header,
        ],
        body.freeze(),
    )
        .into_response())
}

/// What a repository call changed, as the API reports it: "model m v2 loaded", ...
fn changed(r: &crate::engine::reload::ReloadReport) -> Vec<String> {
    r.changed.iter().map(ToString::to_string).collect()
}
