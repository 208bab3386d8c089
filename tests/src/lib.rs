//! Helpers for the end-to-end tests: tiny ONNX models written here (so their math is
//! known exactly), throwaway model repositories, and servers on ephemeral loopback ports.

use prost::Message;
use sluice_client::Client;
use sluice_server::{server, RunningServer, ServerConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod onnx {
    //! Just enough of the ONNX protobuf to write small models.
    use prost::Message;

    #[derive(Clone, PartialEq, Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OpsetId>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct OpsetId {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfo>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfo>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(string, tag = "8")]
        pub name: String,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct ValueInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TensorType>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct TensorType {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<Shape>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct Shape {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dim>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct Dim {
        #[prost(int64, optional, tag = "1")]
        pub dim_value: Option<i64>,
        #[prost(string, optional, tag = "2")]
        pub dim_param: Option<String>,
    }

    pub const FLOAT: i32 = 1;

    /// A float tensor value: dims with `None` for the symbolic batch dimension "N".
    pub fn value(name: &str, dims: &[Option<i64>]) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorType {
                    elem_type: FLOAT,
                    shape: Some(Shape {
                        dim: dims
                            .iter()
                            .map(|d| Dim { dim_value: *d, dim_param: d.is_none().then(|| "N".to_string()) })
                            .collect(),
                    }),
                }),
            }),
        }
    }

    pub fn scalar(name: &str, v: f32) -> TensorProto {
        TensorProto { dims: vec![], data_type: FLOAT, float_data: vec![v], name: name.into() }
    }

    pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: format!("{op}_{}", outputs[0]),
            op_type: op.into(),
        }
    }

    pub fn model(graph: GraphProto) -> ModelProto {
        ModelProto {
            ir_version: 8,
            graph: Some(graph),
            opset_import: vec![OpsetId { domain: String::new(), version: 13 }],
        }
    }
}

/// `y = 2x + 1` and `neg = -x` over x: FP32 [N, width].
pub fn affine_model(width: i64) -> Vec<u8> {
    use onnx::*;
    model(GraphProto {
        name: "affine".into(),
        node: vec![
            node("Mul", &["x", "two"], &["twice"]),
            node("Add", &["twice", "one"], &["y"]),
            node("Neg", &["x"], &["neg"]),
        ],
        initializer: vec![scalar("two", 2.0), scalar("one", 1.0)],
        input: vec![value("x", &[None, Some(width)])],
        output: vec![value("y", &[None, Some(width)]), value("neg", &[None, Some(width)])],
    })
    .encode_to_vec()
}

/// The reference for [`affine_model`], computed independently of any model.
pub fn affine_reference(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    (x.iter().map(|v| 2.0 * v + 1.0).collect(), x.iter().map(|v| -v).collect())
}

/// The ONNX Runtime library the set-up step installs (or `ORT_DYLIB_PATH`).
pub fn ort_dylib() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return p.into();
    }
    let p = repo_root().join(".sluice/lib/libonnxruntime.so");
    assert!(
        p.exists(),
        "ONNX Runtime is not installed at {}: run scripts/setup.sh first (the README's test command does)",
        p.display()
    );
    p
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A model repository in a temporary folder.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Repo {
        Repo { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `models/<name>/` with the given ONNX bytes and model.yaml text.
    pub fn add(&self, name: &str, onnx: &[u8], yaml: &str) -> &Self {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).expect("model dir");
        std::fs::write(d.join("model.onnx"), onnx).expect("model.onnx");
        std::fs::write(d.join("model.yaml"), yaml).expect("model.yaml");
        self
    }
}

impl Default for Repo {
    fn default() -> Self {
        Repo::new()
    }
}

pub struct TestServer {
    pub server: RunningServer,
    pub client: Client,
    /// "http://127.0.0.1:PORT"
    pub http: String,
}

pub fn config(models: &Path) -> ServerConfig {
    let any = "127.0.0.1:0".parse().expect("addr");
    ServerConfig {
        models_dir: models.to_path_buf(),
        pipelines_dir: None,
        pools: Vec::new(),
        ort_dylib: ort_dylib(),
        grpc_addr: any,
        http_addr: any,
        max_message_bytes: 16 << 20,
        request_timeout: Some(Duration::from_secs(30)),
    }
}

/// Starts a server on ephemeral loopback ports and connects the project's client to it.
pub async fn start(cfg: ServerConfig) -> TestServer {
    let server = server::start(cfg).await.expect("server starts");
    let client = Client::connect(format!("http://{}", server.grpc_addr)).await.expect("client connects");
    let http = format!("http://{}", server.http_addr);
    TestServer { server, client, http }
}
