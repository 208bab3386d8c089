//! Entry points for the fuzz targets (`fuzz/`): each takes bytes as a client or a file
//! would send them and must return, never panic, abort or allocate without bound.

use crate::pipeline::{Catalog, ModelSig};
use crate::repository::model_yaml::ModelYaml;
use sluice_ops::{DataType, OpRegistry};
use std::path::Path;

/// An HTTP infer body, with an optional `Inference-Header-Content-Length` value.
pub fn http_infer(header_len: Option<&[u8]>, body: &[u8]) {
    let mut headers = axum::http::HeaderMap::new();
    if let Some(v) = header_len.and_then(|v| axum::http::HeaderValue::from_bytes(v).ok()) {
        headers.insert("inference-header-content-length", v);
    }
    let _ = crate::api::http::parse_infer("m", "", &headers, bytes::Bytes::copy_from_slice(body));
}

/// A protobuf ModelInferRequest, as the gRPC server receives it.
pub fn grpc_infer(message: &[u8]) {
    use prost::Message;
    if let Ok(req) = sluice_proto::ModelInferRequest::decode(message) {
        let _ = crate::api::grpc::to_engine_request(req);
    }
}

/// Encoded image bytes through `decode_image`.
pub fn decode_image(data: &[u8]) {
    let _ = sluice_ops::image_ops::decode_image(data, sluice_ops::memory::max_image_pixels());
}

/// A model.yaml.
pub fn model_yaml(text: &str) {
    let _ = ModelYaml::parse(Path::new("models/m/model.yaml"), text);
}

/// A pipeline file, compiled against the built-in ops and one model `m` (FP32
/// [N,3,-1,-1] -> FP32 [N,-1]).
pub fn pipeline(text: &str) {
    struct Fixed(OpRegistry);
    impl Catalog for Fixed {
        fn model(&self, name: &str, _version: Option<u64>) -> Option<Result<ModelSig, String>> {
            let t = |name: &str, dims: &[i64]| crate::onnx::signature::TensorInfo {
                name: name.into(),
                dtype: DataType::F32,
                dims: dims.to_vec(),
            };
            (name == "m").then(|| {
                Ok(ModelSig {
                    version: 1,
                    inputs: vec![t("x", &[-1, 3, -1, -1])],
                    outputs: vec![t("y", &[-1, -1])],
                    max_batch_size: 8,
                    metadata: vec![],
                })
            })
        }
        fn pools(&self) -> Vec<String> {
            vec!["default".into()]
        }
        fn ops(&self) -> &OpRegistry {
            &self.0
        }
    }
    let dir = std::env::temp_dir();
    let _ = crate::pipeline::compile("p", &dir.join("p.yaml"), text, &Fixed(OpRegistry::builtin()));
}

/// An ONNX file through the graph rewrite run before ONNX Runtime loads it.
pub fn onnx_fold(bytes: &[u8]) {
    let _ = crate::onnx::fold::fold(bytes);
}
