//! A remote model's signature, read from one of its servers when it loads: the v2
//! metadata (inputs, outputs) and configuration (max batch size) of the model there.
//! Blocking, on a thread of its own: loads run on the reload thread, never on the
//! async runtime.

use super::model_yaml::RemoteYaml;
use crate::onnx::signature::TensorInfo;
use sluice_ops::DataType;
use sluice_proto::inference as pb;
use std::net::ToSocketAddrs;
use std::time::Duration;

/// How long one endpoint gets to answer when the signature is read.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the servers say of the model.
#[derive(Debug, Clone)]
pub struct RemoteSignature {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub max_batch_size: usize,
    /// The endpoint that answered.
    pub from: String,
}

/// The endpoints of `r` now: its list, or its DNS name's addresses.
pub fn endpoints(r: &RemoteYaml) -> Result<Vec<String>, String> {
    match &r.dns {
        None => Ok(r.endpoints.clone()),
        Some(name) => {
            let addrs = name.to_socket_addrs().map_err(|e| format!("remote: cannot resolve '{name}': {e}"))?;
            Ok(address_list(addrs))
        }
    }
}

/// A DNS name's addresses as endpoints: sorted, each once, at most
/// [`MAX_ENDPOINTS`](super::model_yaml::MAX_ENDPOINTS).
pub fn address_list(addrs: impl Iterator<Item = std::net::SocketAddr>) -> Vec<String> {
    let mut v: Vec<String> = addrs.map(|a| a.to_string()).collect();
    v.sort();
    v.dedup();
    v.truncate(super::model_yaml::MAX_ENDPOINTS);
    v
}

/// Asks the endpoints in turn until one describes the model `name` (this model's name;
/// `r.model` overrides it); the errors of all when none does.
pub fn fetch_signature(name: &str, r: &RemoteYaml) -> Result<RemoteSignature, String> {
    let model = r.model.clone().unwrap_or_else(|| name.to_string());
    let version = r.version.map(|v| v.to_string()).unwrap_or_default();
    let mut errors = Vec::new();
    for ep in endpoints(r)? {
        let (m, v) = (model.clone(), version.clone());
        let asked = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("sluice-remote-load".into())
                .spawn_scoped(s, || ask(&ep, &m, &v))
                .map_err(|e| e.to_string())?
                .join()
                .map_err(|_| "panicked".to_string())?
        });
        match asked {
            Ok(sig) => return Ok(sig),
            Err(e) => errors.push(format!("{ep}: {e}")),
        }
    }
    if errors.is_empty() {
        return Err("remote: no endpoints".into());
    }
    Err(format!("remote model '{model}': no endpoint describes it ({})", errors.join("; ")))
}

fn ask(ep: &str, model: &str, version: &str) -> Result<RemoteSignature, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{ep}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(ASK_TIMEOUT)
            .timeout(ASK_TIMEOUT)
            .connect()
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut c = pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(64 << 20);
        let md = c
            .model_metadata(pb::ModelMetadataRequest { name: model.into(), version: version.into() })
            .await
            .map_err(|s| format!("metadata: {}", s.message()))?
            .into_inner();
        let cfg = c
            .model_config(pb::ModelConfigRequest { name: model.into(), version: version.into() })
            .await
            .map_err(|s| format!("config: {}", s.message()))?
            .into_inner();
        let max_batch_size = cfg.config.map_or(0, |c| c.max_batch_size.max(0) as usize);
        let tensors = |ts: Vec<pb::model_metadata_response::TensorMetadata>| {
            ts.into_iter()
                .map(|t| {
                    let dtype = DataType::parse(&t.datatype)
                        .ok_or_else(|| format!("tensor '{}': unknown datatype '{}'", t.name, t.datatype))?;
                    if t.shape.iter().any(|&d| d < -1) {
                        return Err(format!("tensor '{}': bad shape {:?}", t.name, t.shape));
                    }
                    Ok(TensorInfo { name: t.name, dtype, dims: t.shape })
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(RemoteSignature {
            inputs: tensors(md.inputs)?,
            outputs: tensors(md.outputs)?,
            max_batch_size,
            from: ep.to_string(),
        })
    })
}
