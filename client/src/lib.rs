//! A client for sluice and any other KServe v2 server (Triton included): the gRPC client
//! generated from the project's protocol files, plus a typed layer that sends and
//! receives [`Tensor`]s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_client::ClientError> {
//! use sluice_client::{Client, Tensor};
//! let client = Client::connect("http://127.0.0.1:8001").await?;
//! let x = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
//! let outputs = client.infer("affine", &[("x", &x)], Default::default()).await?;
//! println!("{:?}", outputs[0].1.to_f32());
//! # Ok(()) }
//! ```
#![deny(unsafe_code)] // deny, not forbid: ndarray's `s!` macro allows it inside its own expansion

#[cfg(feature = "ndarray")]
pub mod array;
pub mod bench;
pub mod live;

use bytes::Bytes;
pub use sluice_ops::{DataType, Tensor};
pub use sluice_proto as proto;
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("malformed response: {0}")]
    Response(String),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("invalid request: {0}")]
    Request(String),
}

impl ClientError {
    /// The gRPC status code, when the server answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// Per-request options.
#[derive(Debug, Clone, Default)]
pub struct InferOptions {
    /// Outputs to return; empty: all.
    pub outputs: Vec<String>,
    /// Sent as the gRPC deadline; the server drops the work once it passes.
    pub timeout: Option<Duration>,
    pub id: String,
    /// Model version; empty: the server's default.
    pub version: String,
    /// Ask sluice for where the request's time went (see [`Inferred::timing`]).
    pub timing: bool,
    /// v2 request parameters: a pipeline reads the ones it declares (a threshold, a
    /// language) as values.
    pub parameters: Vec<(String, Parameter)>,
    /// The caller's W3C trace context (`00-<trace id>-<span id>-<flags>`), sent as
    /// `traceparent`: the request's spans, and those of the remote models it calls,
    /// join that trace. Empty: none.
    pub traceparent: String,
}

/// A request parameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Parameter {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
}

impl Parameter {
    /// Parses `text` as a boolean, an integer, a number, or else a string (the CLI's
    /// `--param name=value`); in double quotes, always a string (`lang="2"`).
    pub fn parse(text: &str) -> Parameter {
        // Double quotes make a string of what would read as a number or a boolean.
        if let Some(quoted) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            return Parameter::String(quoted.to_string());
        }
        match text {
            "true" => Parameter::Bool(true),
            "false" => Parameter::Bool(false),
            _ => text
                .parse::<i64>()
                .map(Parameter::Int)
                .or_else(|_| text.parse::<f64>().map(Parameter::Float))
                .unwrap_or_else(|_| Parameter::String(text.to_string())),
        }
    }

    fn to_proto(&self) -> proto::InferParameter {
        use proto::infer_parameter::ParameterChoice as P;
        let choice = match self {
            Parameter::Bool(b) => P::BoolParam(*b),
            Parameter::Int(i) => P::Int64Param(*i),
            Parameter::Float(f) => P::DoubleParam(*f),
            Parameter::String(s) => P::StringParam(s.clone()),
        };
        proto::InferParameter { parameter_choice: Some(choice) }
    }
}

/// Where one step of a request (a pipeline node, or the model) spent its time on the
/// server, summed over the step's items.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTiming {
    pub step: String,
    pub queue_us: i64,
    pub compute_us: i64,
    pub items: i64,
}

/// A response in full: outputs, the request id, and the timing when asked for.
#[derive(Debug, Clone)]
pub struct Inferred {
    pub outputs: Vec<(String, Tensor)>,
    pub id: String,
    /// Per step, sorted by step name (parameters have no order); empty unless asked for.
    pub timing: Vec<StepTiming>,
    /// The request's time inside the server, when timing was asked for.
    pub total_us: Option<i64>,
}

/// Request parameter asking sluice for the per-step timing.
pub const TIMING_PARAM: &str = "sluice_timing";

/// The per-step timing in a response's parameters (`sluice_timing.<step>.queue_us`, ...).
pub fn timing_of(resp: &proto::ModelInferResponse) -> (Vec<StepTiming>, Option<i64>) {
    use proto::infer_parameter::ParameterChoice;
    let prefix = format!("{TIMING_PARAM}.");
    let mut steps: Vec<StepTiming> = Vec::new();
    let mut total = None;
    let mut keys: Vec<&String> = resp.parameters.keys().filter(|k| k.starts_with(&prefix)).collect();
    keys.sort();
    for k in keys {
        let Some(ParameterChoice::Int64Param(v)) = resp.parameters[k].parameter_choice else { continue };
        let rest = &k[prefix.len()..];
        if rest == "total_us" {
            total = Some(v);
            continue;
        }
        let Some((step, field)) = rest.rsplit_once('.') else { continue };
        let i = match steps.iter().position(|s| s.step == step) {
            Some(i) => i,
            None => {
                steps.push(StepTiming { step: step.to_string(), ..Default::default() });
                steps.len() - 1
            }
        };
        match field {
            "queue_us" => steps[i].queue_us = v,
            "compute_us" => steps[i].compute_us = v,
            "items" => steps[i].items = v,
            _ => {}
        }
    }
    (steps, total)
}

/// How to reach the server: TLS and connection timeouts.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sluice_client::{Client, ConnectOptions, TlsOptions};
/// let tls = TlsOptions { ca_pem: Some(std::fs::read("ca.pem")?), ..Default::default() };
/// let opts = ConnectOptions { tls: Some(tls), ..Default::default() };
/// let client = Client::connect_with("https://sluice.internal:8001", opts).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// TLS settings; an `https://` address without them uses the system's roots.
    pub tls: Option<TlsOptions>,
    /// Give up connecting after this long (default: the OS's TCP timeout).
    pub connect_timeout: Option<Duration>,
    /// Send HTTP/2 pings this often so idle connections through proxies stay open.
    pub keep_alive: Option<Duration>,
}

/// TLS for a connection (rustls).
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM certificates to trust for the server; none: the system's root store.
    pub ca_pem: Option<Vec<u8>>,
    /// The name to check the server's certificate against (default: the address's host).
    pub domain: Option<String>,
    /// Client certificate chain and private key, PEM, for servers that require one (mTLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsOptions {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("domain", &self.domain)
            .field("identity", &self.identity.as_ref().map(|_| "(certificate and key)"))
            .finish()
    }
}

impl TlsOptions {
    fn to_tonic(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new();
        c = match &self.ca_pem {
            Some(pem) => c.ca_certificate(Certificate::from_pem(pem)),
            None => c.with_native_roots(),
        };
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        c
    }
}

/// Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct Client {
    inner: GrpcInferenceServiceClient<Channel>,
}

/// Large enough for batches of images; the server's own limit applies as well.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

impl Client {
    /// Connects to `addr` ("http://host:port"; "https://host:port" for TLS with the
    /// system's roots).
    pub async fn connect(addr: impl Into<String>) -> Result<Client, ClientError> {
        Client::connect_with(addr, ConnectOptions::default()).await
    }

    /// Connects with TLS or timeouts set (see [`ConnectOptions`]).
    pub async fn connect_with(addr: impl Into<String>, opts: ConnectOptions) -> Result<Client, ClientError> {
        let addr = addr.into();
        let mut ep = Endpoint::from_shared(addr.clone())?.tcp_nodelay(true);
        let https = ep.uri().scheme_str().is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let tls = match (&opts.tls, https) {
            (Some(t), true) => Some(t.to_tonic()),
            (Some(_), false) => {
                return Err(ClientError::Tls(format!("TLS options given for '{addr}': use an https:// address")))
            }
            (None, true) => Some(TlsOptions::default().to_tonic()),
            (None, false) => None,
        };
        if let Some(tls) = tls {
            ep = ep.tls_config(tls)?;
        }
        if let Some(t) = opts.connect_timeout {
            ep = ep.connect_timeout(t);
        }
        if let Some(t) = opts.keep_alive {
            ep = ep.http2_keep_alive_interval(t).keep_alive_while_idle(true);
        }
        Ok(Client::from_channel(ep.connect().await?))
    }

    pub fn from_channel(channel: Channel) -> Client {
        Client {
            inner: GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// The generated client, for any call the typed layer does not cover.
    pub fn raw(&self) -> GrpcInferenceServiceClient<Channel> {
        self.inner.clone()
    }

    pub async fn server_live(&self) -> Result<bool, ClientError> {
        Ok(self.raw().server_live(proto::ServerLiveRequest {}).await?.into_inner().live)
    }

    pub async fn server_ready(&self) -> Result<bool, ClientError> {
        Ok(self.raw().server_ready(proto::ServerReadyRequest {}).await?.into_inner().ready)
    }

    pub async fn model_ready(&self, model: &str) -> Result<bool, ClientError> {
        let req = proto::ModelReadyRequest { name: model.into(), version: String::new() };
        Ok(self.raw().model_ready(req).await?.into_inner().ready)
    }

    pub async fn model_metadata(&self, model: &str) -> Result<proto::ModelMetadataResponse, ClientError> {
        let req = proto::ModelMetadataRequest { name: model.into(), version: String::new() };
        Ok(self.raw().model_metadata(req).await?.into_inner())
    }

    pub async fn model_config(&self, model: &str) -> Result<proto::ModelConfig, ClientError> {
        let req = proto::ModelConfigRequest { name: model.into(), version: String::new() };
        self.raw()
            .model_config(req)
            .await?
            .into_inner()
            .config
            .ok_or_else(|| ClientError::Response("no config in ModelConfigResponse".into()))
    }

    /// Statistics of one model, or of all models when `model` is empty.
    pub async fn model_statistics(&self, model: &str) -> Result<Vec<proto::ModelStatistics>, ClientError> {
        let req = proto::ModelStatisticsRequest { name: model.into(), version: String::new() };
        Ok(self.raw().model_statistics(req).await?.into_inner().model_stats)
    }

    pub async fn repository_index(&self) -> Result<Vec<proto::repository_index_response::ModelIndex>, ClientError> {
        let req = proto::RepositoryIndexRequest { repository_name: String::new(), ready: false };
        Ok(self.raw().repository_index(req).await?.into_inner().models)
    }

    /// Loads, or loads again, a model or pipeline from the server's repository (and the
    /// pipelines that use it). sluice reloads the whole repository, loading only what
    /// changed, when `name` is empty. Errors name what failed to load and why.
    pub async fn repository_load(&self, name: &str) -> Result<(), ClientError> {
        let req = proto::RepositoryModelLoadRequest { model_name: name.into(), ..Default::default() };
        self.raw().repository_model_load(req).await?;
        Ok(())
    }

    /// Stops serving a model or pipeline; requests already running finish.
    pub async fn repository_unload(&self, name: &str) -> Result<(), ClientError> {
        let req = proto::RepositoryModelUnloadRequest { model_name: name.into(), ..Default::default() };
        self.raw().repository_model_unload(req).await?;
        Ok(())
    }

    /// Runs one inference; tensors travel as raw little-endian bytes. Returns the
    /// outputs in the server's order, by name.
    pub async fn infer(
        &self,
        model: &str,
        inputs: &[(&str, &Tensor)],
        opts: InferOptions,
    ) -> Result<Vec<(String, Tensor)>, ClientError> {
        Ok(self.infer_detailed(model, inputs, opts).await?.outputs)
    }

    /// [`Client::infer`] with the rest of the response: the request id (the one given,
    /// or the server's) and, with [`InferOptions::timing`], where its time went.
    pub async fn infer_detailed(
        &self,
        model: &str,
        inputs: &[(&str, &Tensor)],
        opts: InferOptions,
    ) -> Result<Inferred, ClientError> {
        let req = infer_request(model, inputs, &opts);
        let mut req = tonic::Request::new(req);
        if let Some(t) = opts.timeout {
            req.set_timeout(t);
        }
        if !opts.traceparent.is_empty() {
            let v = opts.traceparent.parse().map_err(|_| {
                ClientError::Request(format!("traceparent '{}' is not a header value", opts.traceparent))
            })?;
            req.metadata_mut().insert("traceparent", v);
        }
        let resp = self.raw().model_infer(req).await?.into_inner();
        let (timing, total_us) = timing_of(&resp);
        let id = resp.id.clone();
        Ok(Inferred { outputs: decode_outputs(resp)?, id, timing, total_us })
    }
}

/// Encoded files (JPEG, PNG) as a pipeline's image input: a BYTES tensor [n, 1], one
/// file per item.
pub fn encoded_images<B: AsRef<[u8]>>(files: &[B]) -> Tensor {
    let mut t = Tensor::from_bytes_elements(vec![files.len()], files);
    t.shape = vec![files.len(), 1];
    t
}

/// Builds the protocol request for `inputs`, data in `raw_input_contents`.
pub fn infer_request(model: &str, inputs: &[(&str, &Tensor)], opts: &InferOptions) -> proto::ModelInferRequest {
    proto::ModelInferRequest {
        model_name: model.into(),
        model_version: opts.version.clone(),
        id: opts.id.clone(),
        inputs: inputs
            .iter()
            .map(|(name, t)| proto::model_infer_request::InferInputTensor {
                name: name.to_string(),
                datatype: t.dtype.as_str().into(),
                shape: t.shape.iter().map(|&d| d as i64).collect(),
                ..Default::default()
            })
            .collect(),
        outputs: opts
            .outputs
            .iter()
            .map(|o| proto::model_infer_request::InferRequestedOutputTensor { name: o.clone(), ..Default::default() })
            .collect(),
        raw_input_contents: inputs.iter().map(|(_, t)| t.data.clone()).collect(),
        parameters: {
            let mut p: std::collections::HashMap<String, proto::InferParameter> =
                opts.parameters.iter().map(|(k, v)| (k.clone(), v.to_proto())).collect();
            if opts.timing {
                p.insert(TIMING_PARAM.to_string(), Parameter::Bool(true).to_proto());
            }
            p
        },
    }
}

/// Turns a response into tensors, checking each against its declared dtype and shape.
pub fn decode_outputs(resp: proto::ModelInferResponse) -> Result<Vec<(String, Tensor)>, ClientError> {
    if resp.raw_output_contents.len() != resp.outputs.len() {
        return Err(ClientError::Response(format!(
            "{} outputs but {} raw_output_contents",
            resp.outputs.len(),
            resp.raw_output_contents.len()
        )));
    }
    resp.outputs
        .into_iter()
        .zip(resp.raw_output_contents)
        .map(|(o, data): (_, Bytes)| {
            let dtype = DataType::parse(&o.datatype).ok_or_else(|| {
                ClientError::Response(format!("output '{}': unknown datatype {}", o.name, o.datatype))
            })?;
            let shape = o
                .shape
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| ClientError::Response(format!("output '{}': negative dimension", o.name)))?;
            let t = Tensor::new(dtype, shape, data)
                .map_err(|e| ClientError::Response(format!("output '{}': {e}", o.name)))?;
            Ok((o.name, t))
        })
        .collect()
}
