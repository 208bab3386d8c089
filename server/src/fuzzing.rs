//! Entry points for the fuzz targets (`fuzz/`): each takes bytes as a client or a file
//! would send them and must return, never panic, abort or allocate without bound.
//! [`TARGETS`] maps a target's name to its entry point; the unit test below replays the
//! committed corpus (`fuzz/corpus/<target>/`) through them on every test run.

use crate::pipeline::{Catalog, ModelSig};
use crate::repository::model_yaml::ModelYaml;
use sluice_ops::{DataType, OpRegistry};
use std::path::Path;

/// What a fuzz target calls with each input.
pub type EntryPoint = fn(&[u8]);

/// Every fuzz target: its name (the fuzz/fuzz_targets file and the corpus folder) and the
/// entry point it feeds the fuzzer's bytes to.
pub const TARGETS: &[(&str, EntryPoint)] = &[
    ("decode_image", decode_image),
    ("grpc_infer", grpc_infer),
    ("http_infer", http_infer_bytes),
    ("model_yaml", |data| std::str::from_utf8(data).map_or((), model_yaml)),
    ("onnx_fold", onnx_fold),
    ("pipeline", |data| std::str::from_utf8(data).map_or((), pipeline)),
];

/// The entry point of the fuzz target `name` ([`TARGETS`]).
pub fn target(name: &str) -> EntryPoint {
    TARGETS.iter().find(|t| t.0 == name).unwrap_or_else(|| panic!("no fuzz target {name}")).1
}

/// [`http_infer`] from one byte string: the first byte says whether an
/// `Inference-Header-Content-Length` header is sent and the next four its value.
fn http_infer_bytes(data: &[u8]) {
    let (header, body) = match data.split_first() {
        Some((&flag, rest)) if flag & 1 == 1 && rest.len() >= 4 => {
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) % (rest.len() as u32 + 8);
            (Some(n.to_string()), &rest[4..])
        }
        Some((_, rest)) => (None, rest),
        None => (None, data),
    };
    http_infer(header.as_deref().map(str::as_bytes), body);
}

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

#[cfg(test)]
mod tests {
    use super::TARGETS;
    use std::path::Path;

    /// Every input of the committed corpus through its target, in the ordinary test
    /// build: what the fuzzers found once stays fixed (scripts/fuzz.sh goes on to look for
    /// new inputs).
    #[test]
    fn the_committed_corpus_runs_through_every_target() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut dirs: Vec<String> = std::fs::read_dir(root.join("corpus"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .collect();
        dirs.sort();
        let mut names: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
        names.sort();
        assert_eq!(dirs, names, "a corpus folder for every target in TARGETS, and no other");
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        for (name, run) in TARGETS {
            assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml builds no target {name}");
            // Each target feeds the entry point of its own name.
            let source = std::fs::read_to_string(root.join("fuzz_targets").join(format!("{name}.rs"))).unwrap();
            assert!(
                source.contains(&format!("target(\"{name}\")")),
                "fuzz/fuzz_targets/{name}.rs calls another target"
            );
            let mut inputs = 0;
            for entry in std::fs::read_dir(root.join("corpus").join(name)).unwrap() {
                let data = std::fs::read(entry.unwrap().path()).unwrap();
                run(&data);
                inputs += 1;
            }
            assert!(inputs > 0, "fuzz/corpus/{name} is empty");
        }
    }
}
