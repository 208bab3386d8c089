//! gRPC: `inference.GRPCInferenceService`, translating protocol messages to engine calls.

use super::{
    deadline_after, named_input, request_id, request_span, tensor_header, timing_params, views, AppState,
    REQUEST_ID_HEADER, TIMING_PARAM, TRACEPARENT_HEADER, TRACESTATE_HEADER,
};
use crate::error::Error;
use crate::request::InferRequest;
use bytes::{BufMut, Bytes, BytesMut};
use sluice_ops::DataType;
use sluice_proto as pb;
use sluice_proto::grpc_inference_service_server::GrpcInferenceService;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub struct GrpcApi {
    pub state: AppState,
}

/// Parses the `grpc-timeout` header ("100m", "5S", ...), as the gRPC spec writes it.
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    // The spec allows at most 8 digits, which also keeps the arithmetic below in range.
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Typed `contents` to the little-endian bytes raw contents would carry.
fn typed_contents(name: &str, dtype: DataType, c: pb::InferTensorContents) -> Result<Bytes, String> {
    fn pack<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Bytes {
        let mut b = BytesMut::with_capacity(v.len() * N);
        for &x in v {
            b.put_slice(&f(x));
        }
        b.freeze()
    }
    let out_of_range = |t: &str| format!("input '{name}': a value does not fit {t}");
    Ok(match dtype {
        DataType::Bool => pack(&c.bool_contents, |b| [b as u8]),
        DataType::I8 => pack(
            &c.int_contents
                .iter()
                .map(|&v| i8::try_from(v))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| out_of_range("INT8"))?,
            i8::to_le_bytes,
        ),
        DataType::I16 => pack(
            &c.int_contents
                .iter()
                .map(|&v| i16::try_from(v))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| out_of_range("INT16"))?,
            i16::to_le_bytes,
        ),
        DataType::I32 => pack(&c.int_contents, i32::to_le_bytes),
        DataType::I64 => pack(&c.int64_contents, i64::to_le_bytes),
        DataType::U8 => pack(
            &c.uint_contents
                .iter()
                .map(|&v| u8::try_from(v))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| out_of_range("UINT8"))?,
            u8::to_le_bytes,
        ),
        DataType::U16 => pack(
            &c.uint_contents
                .iter()
                .map(|&v| u16::try_from(v))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| out_of_range("UINT16"))?,
            u16::to_le_bytes,
        ),
        DataType::U32 => pack(&c.uint_contents, u32::to_le_bytes),
        DataType::U64 => pack(&c.uint64_contents, u64::to_le_bytes),
        DataType::F32 => pack(&c.fp32_contents, f32::to_le_bytes),
        DataType::F64 => pack(&c.fp64_contents, f64::to_le_bytes),
        DataType::Bytes => sluice_ops::tensor::encode_bytes_elements(&c.bytes_contents),
        DataType::F16 | DataType::BF16 => {
            return Err(format!("input '{name}': {dtype} has no typed contents field; send it in raw_input_contents"))
        }
    })
}

pub(crate) fn to_engine_request(req: pb::ModelInferRequest) -> Result<InferRequest, Error> {
    let model = req.model_name.clone();
    let invalid = |m: String| Error::InvalidInput { model: model.clone(), message: m };
    let raw = req.raw_input_contents;
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs; every input must be in it",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let inputs = req
        .inputs
        .into_iter()
        .map(|i| {
            let (dtype, shape) = tensor_header(&i.name, &i.datatype, &i.shape).map_err(invalid)?;
            let data = match (raw.next(), i.contents) {
                (Some(_), Some(_)) => {
                    return Err(invalid(format!("input '{}' has both raw and typed contents; send one", i.name)))
                }
                (Some(b), None) => b,
                (None, Some(c)) => typed_contents(&i.name, dtype, c).map_err(invalid)?,
                (None, None) => return Err(invalid(format!("input '{}' has no data", i.name))),
            };
            named_input(i.name, dtype, shape, data).map_err(invalid)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let timing = matches!(
        req.parameters.get(TIMING_PARAM).and_then(|p| p.parameter_choice.as_ref()),
        Some(pb::infer_parameter::ParameterChoice::BoolParam(true))
    );
    use crate::request::Scalar;
    use pb::infer_parameter::ParameterChoice as P;
    let parameters = req
        .parameters
        .into_iter()
        .filter_map(|(k, v)| {
            let v = match v.parameter_choice? {
                P::BoolParam(b) => Scalar::Bool(b),
                P::Int64Param(i) => Scalar::Num(i as f64),
                P::Uint64Param(u) => Scalar::Num(u as f64),
                P::DoubleParam(d) => Scalar::Num(d),
                P::StringParam(s) => Scalar::Str(s),
            };
            Some((k, v))
        })
        .collect();
    Ok(InferRequest {
        model_name: req.model_name,
        model_version: req.model_version,
        id: req.id,
        inputs,
        outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        timing,
        parameters,
        trace: None,
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcApi {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse { ready: self.state.ready() }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let ready = self.state.servable_ready(&r.name, &r.version);
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: views::SERVER_NAME.into(),
            version: views::SERVER_VERSION.into(),
            extensions: views::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let snapshot = self.state.engine.snapshot();
        let e = snapshot.servable(&r.name, &r.version)?;
        Ok(Response::new(views::metadata(&snapshot, &e)))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = deadline_after(grpc_timeout(&req), self.state.default_timeout);
        let header = |name| req.metadata().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (header_id, traceparent, tracestate) =
            (header(REQUEST_ID_HEADER), header(TRACEPARENT_HEADER), header(TRACESTATE_HEADER));
        let started = std::time::Instant::now();
        let mut req = req.into_inner();
        req.id = request_id(std::mem::take(&mut req.id), header_id.as_deref());
        let id = req.id.clone();
        // Failures carry the request's id too, so a client can find them in the logs.
        let with_id = |e: crate::error::Error| {
            let mut status = Status::from(e);
            if let Ok(v) = id.parse() {
                status.metadata_mut().insert(REQUEST_ID_HEADER, v);
            }
            status
        };
        let (span, trace) = request_span(&req.model_name, &req.id, traceparent.as_deref(), tracestate.as_deref());
        let (model, version) = (req.model_name.clone(), req.model_version.clone());
        let mut engine_req = to_engine_request(req)
            .inspect_err(|e| self.state.engine.record_rejected(&model, &version, e))
            .map_err(with_id)?;
        engine_req.trace = trace;
        let resp = self.state.engine.infer(engine_req, deadline).instrument(span).await.map_err(with_id)?;
        let mut raw = Vec::with_capacity(resp.outputs.len());
        let outputs = resp
            .outputs
            .into_iter()
            .map(|o| {
                raw.push(o.tensor.data);
                pb::model_infer_response::InferOutputTensor {
                    name: o.name,
                    datatype: o.tensor.dtype.as_str().to_string(),
                    shape: o.tensor.shape.iter().map(|&d| d as i64).collect(),
                    ..Default::default()
                }
            })
            .collect();
        let parameters = resp
            .timing
            .as_deref()
            .map(|steps| {
                timing_params(steps, started.elapsed())
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            pb::InferParameter {
                                parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(v)),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut response = Response::new(pb::ModelInferResponse {
            model_name: resp.model_name,
            model_version: resp.model_version,
            id: resp.id.clone(),
            parameters,
            outputs,
            raw_output_contents: raw,
        });
        if let Ok(v) = resp.id.parse() {
            response.metadata_mut().insert(REQUEST_ID_HEADER, v);
        }
        Ok(response)
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let snapshot = self.state.engine.snapshot();
        let e = snapshot.servable(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelConfigResponse { config: Some(views::config(&e)) }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::ModelStatisticsResponse {
            model_stats: views::statistics(&self.state.engine.snapshot(), &r.name, &r.version)?,
        }))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        Ok(Response::new(pb::RepositoryIndexResponse {
            models: views::repository_index(&self.state.engine.snapshot(), req.into_inner().ready),
        }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.state.load_or_unload(req.into_inner().model_name, false).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.state.load_or_unload(req.into_inner().model_name, true).await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}
