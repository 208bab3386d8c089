//! Helpers for the end-to-end tests: tiny ONNX models written here (so their math is
//! known exactly), throwaway model repositories, and servers on ephemeral loopback ports.

use prost::Message;
use sluice_client::Client;
use sluice_server::{RunningServer, ServerConfig};
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
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        /// 7: INTS
        #[prost(int32, tag = "20")]
        pub r#type: i32,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(int64, repeated, tag = "7")]
        pub int64_data: Vec<i64>,
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

    pub const INT64: i32 = 7;

    pub fn scalar(name: &str, v: f32) -> TensorProto {
        floats(name, &[], &[v])
    }

    pub fn floats(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: FLOAT,
            float_data: v.to_vec(),
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn int64s(name: &str, v: &[i64]) -> TensorProto {
        TensorProto {
            dims: vec![v.len() as i64],
            data_type: INT64,
            int64_data: v.to_vec(),
            name: name.into(),
            ..Default::default()
        }
    }

    /// `node` with an INTS attribute.
    pub fn with_ints(mut n: NodeProto, name: &str, v: &[i64]) -> NodeProto {
        n.attribute.push(AttributeProto { name: name.into(), ints: v.to_vec(), r#type: 7 });
        n
    }

    pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: format!("{op}_{}", outputs[0]),
            op_type: op.into(),
            attribute: vec![],
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
    linear_model(width, 2.0, 1.0)
}

/// `y = a x + b` and `neg = -x` over x: FP32 [N, width]; models that differ only in
/// what they compute, for swapping one for another.
pub fn linear_model(width: i64, a: f32, b: f32) -> Vec<u8> {
    use onnx::*;
    model(GraphProto {
        name: "affine".into(),
        node: vec![
            node("Mul", &["x", "two"], &["twice"]),
            node("Add", &["twice", "one"], &["y"]),
            node("Neg", &["x"], &["neg"]),
        ],
        initializer: vec![scalar("two", a), scalar("one", b)],
        input: vec![value("x", &[None, Some(width)])],
        output: vec![value("y", &[None, Some(width)]), value("neg", &[None, Some(width)])],
    })
    .encode_to_vec()
}

/// The reference for [`affine_model`], computed independently of any model.
pub fn affine_reference(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    (x.iter().map(|v| 2.0 * v + 1.0).collect(), x.iter().map(|v| -v).collect())
}

/// Weights of [`tiny_classifier`]: logit k = sum over channels c of mean(c) * w(c, k).
pub fn tiny_classifier_weight(c: usize, k: usize) -> f32 {
    ((k + 1) as f32 * (c + 1) as f32 * 0.37).sin() * 5.0
}

/// A stand-in for ResNet-50 with its interface and almost none of its cost: "input"
/// FP32 [N,3,224,224] -> global average pool -> a fixed [3,1000] matrix -> "logits"
/// FP32 [N,1000]. Its classes depend on the image's mean colour.
pub fn tiny_classifier() -> Vec<u8> {
    tiny_classifier_scaled(1.0)
}

/// [`tiny_classifier`] with every weight times `scale`: a second classifier of the same
/// interface whose answers differ (with -1, its best classes are the other's worst).
pub fn tiny_classifier_scaled(scale: f32) -> Vec<u8> {
    use onnx::*;
    let w: Vec<f32> = (0..3).flat_map(|c| (0..1000).map(move |k| tiny_classifier_weight(c, k) * scale)).collect();
    model(GraphProto {
        name: "tiny_classifier".into(),
        node: vec![
            node("GlobalAveragePool", &["input"], &["gap"]),
            node("Flatten", &["gap"], &["flat"]),
            node("MatMul", &["flat", "w"], &["logits"]),
        ],
        initializer: vec![floats("w", &[3, 1000], &w)],
        input: vec![value("input", &[None, Some(3), Some(224), Some(224)])],
        output: vec![value("logits", &[None, Some(1000)])],
    })
    .encode_to_vec()
}

/// A stand-in detector with the example detector's interface whose detections are
/// known: "images" FP32 [N,3,320,320] is cut into 10x10 cells of 32 pixels; each cell
/// is one prediction row (centre x, centre y, 32, 32, objectness = mean red, class 0 =
/// 1 - mean green, class 1 = mean green) -> "predictions" FP32 [N,100,7]. A pure red
/// cell is a detection of class 0 with score 1 and exactly the cell as its box.
pub fn tiny_detector() -> Vec<u8> {
    use onnx::*;
    let mut a = vec![0f32; 3 * 7];
    a[4] = 1.0; // red -> objectness
    a[7 + 5] = -1.0; // green -> class 0 = 1 - green
    a[7 + 6] = 1.0; // green -> class 1
    let b: Vec<f32> = (0..100)
        .flat_map(|k| {
            let (x, y) = ((k % 10) as f32, (k / 10) as f32);
            [(x + 0.5) * 32.0, (y + 0.5) * 32.0, 32.0, 32.0, 0.0, 1.0, 0.0]
        })
        .collect();
    let pool = with_ints(node("AveragePool", &["images"], &["cells"]), "kernel_shape", &[32, 32]);
    model(GraphProto {
        name: "tiny_detector".into(),
        node: vec![
            with_ints(pool, "strides", &[32, 32]),
            node("Reshape", &["cells", "shape"], &["flat"]),
            with_ints(node("Transpose", &["flat"], &["rows"]), "perm", &[0, 2, 1]),
            node("MatMul", &["rows", "a"], &["mixed"]),
            node("Add", &["mixed", "b"], &["predictions"]),
        ],
        initializer: vec![int64s("shape", &[0, 3, 100]), floats("a", &[3, 7], &a), floats("b", &[100, 7], &b)],
        input: vec![value("images", &[None, Some(3), Some(320), Some(320)])],
        output: vec![value("predictions", &[None, Some(100), Some(7)])],
    })
    .encode_to_vec()
}

/// A model that takes real compute time: "x" FP32 [1,512] multiplied `rounds` times by
/// one 512x512 permutation matrix (so values stay as they are) -> "y" FP32 [1,512].
/// No batch dimension (max_batch_size 0).
pub fn busy_model(rounds: usize) -> Vec<u8> {
    use onnx::*;
    let n = 512;
    let perm: Vec<f32> = (0..n * n).map(|i| if (i / n + 1) % n == i % n { 1.0 } else { 0.0 }).collect();
    let names: Vec<String> = (0..=rounds)
        .map(|i| {
            if i == 0 {
                "x".into()
            } else if i == rounds {
                "y".into()
            } else {
                format!("h{i}")
            }
        })
        .collect();
    let nodes = (0..rounds).map(|i| node("MatMul", &[names[i].as_str(), "p"], &[names[i + 1].as_str()])).collect();
    model(GraphProto {
        name: "busy".into(),
        node: nodes,
        initializer: vec![floats("p", &[n as i64, n as i64], &perm)],
        input: vec![value("x", &[Some(1), Some(n as i64)])],
        output: vec![value("y", &[Some(1), Some(n as i64)])],
    })
    .encode_to_vec()
}

/// The value of a Prometheus series (`name{labels}` as the server renders it).
pub async fn metric(http: &str, series_prefix: &str, labels: &[&str]) -> f64 {
    let text = reqwest::get(format!("{http}/metrics")).await.expect("GET /metrics").text().await.expect("metrics body");
    series_value(&text, series_prefix, labels)
        .unwrap_or_else(|| panic!("no series {series_prefix} {labels:?} in /metrics"))
}

/// The value of a series in a Prometheus text exposition, if it is there.
pub fn series_value(text: &str, series_prefix: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series_prefix) && labels.iter().all(|lab| l.contains(lab)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// An example pipeline file of `pipelines/`, as text.
pub fn example_pipeline(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("pipelines").join(format!("{name}.yaml"))).expect("example pipeline")
}

/// A 320x320 black PNG with one coloured 32-pixel cell per entry: (cell x, cell y, rgb).
/// For [`tiny_detector`], red is class 0, yellow (red and green) class 1, and the red
/// level is the box's score.
pub fn cells_png(cells: &[(u32, u32, [u8; 3])]) -> Vec<u8> {
    let mut img = sluice_ops::Image::filled(320, 320, [0, 0, 0]);
    for &(cx, cy, rgb) in cells {
        for y in cy * 32..cy * 32 + 32 {
            for x in cx * 32..cx * 32 + 32 {
                let p = ((y * 320 + x) * 3) as usize;
                img.data[p..p + 3].copy_from_slice(&rgb);
            }
        }
    }
    png(&img)
}

/// A repository with the set-up step's OCR models and the example `ocr` pipeline.
pub fn ocr_repo() -> Repo {
    let repo = Repo::new();
    for m in ["ocr_det", "ocr_cls", "ocr_rec"] {
        let dir = repo_root().join("models").join(m);
        let onnx = std::fs::read(dir.join("model.onnx"))
            .unwrap_or_else(|e| panic!("{}/model.onnx: {e}: run scripts/setup.sh first", dir.display()));
        repo.add(m, &onnx, &std::fs::read_to_string(dir.join("model.yaml")).expect("model.yaml"));
    }
    let pipeline = std::fs::read_to_string(repo_root().join("pipelines/ocr.yaml")).expect("pipelines/ocr.yaml");
    repo.pipeline("ocr", &pipeline);
    repo
}

/// Renders the OCR test images (tests/python/render_text.py) into `dir`; returns each
/// file with the lines it shows, in reading order.
pub fn render_text(dir: &Path) -> Vec<(String, Vec<String>)> {
    let out = std::process::Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tests/python/render_text.py"))
        .arg(dir)
        .output()
        .expect("the set-up step's Python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).expect("cases.json")).expect("JSON");
    cases
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| {
            let lines =
                c["lines"].as_array().expect("lines").iter().map(|l| l.as_str().unwrap_or("").to_string()).collect();
            (c["file"].as_str().unwrap_or("").to_string(), lines)
        })
        .collect()
}

/// An RGB image as PNG bytes.
pub fn png(img: &sluice_ops::Image) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, img.width, img.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().and_then(|mut w| w.write_image_data(&img.data)).expect("PNG encoding");
    out
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

/// A model repository (and a pipelines folder) in temporary folders.
pub struct Repo {
    pub dir: tempfile::TempDir,
    pub pipelines: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Repo {
        Repo { dir: tempfile::tempdir().expect("temp dir"), pipelines: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pipelines_path(&self) -> &Path {
        self.pipelines.path()
    }

    /// Writes `pipelines/<name>.yaml`.
    pub fn pipeline(&self, name: &str, yaml: &str) -> &Self {
        std::fs::write(self.pipelines.path().join(format!("{name}.yaml")), yaml).expect("pipeline file");
        self
    }

    /// The server config for this repository with its pipelines.
    pub fn config(&self) -> ServerConfig {
        ServerConfig { pipelines_dir: Some(self.pipelines_path().to_path_buf()), ..config(self.path()) }
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
    ServerConfig {
        ort_dylib: ort_dylib(),
        max_message_bytes: 16 << 20,
        request_timeout: Some(Duration::from_secs(30)),
        // Tests that change files under a running server ask for `Watch` themselves.
        reload: sluice_server::ReloadMode::Explicit,
        reload_debounce: Duration::from_millis(200),
        ..ServerConfig::new(models)
    }
}

/// Starts a server on ephemeral loopback ports and connects the project's client to it.
pub async fn start(cfg: ServerConfig) -> TestServer {
    let server = sluice_server::start(cfg).await.expect("server starts");
    let client = Client::connect(format!("http://{}", server.grpc_addr)).await.expect("client connects");
    let http = format!("http://{}", server.http_addr);
    TestServer { server, client, http }
}

/// Certificates for TLS tests, made per run (nothing secret is committed): a CA, a server
/// certificate for localhost and 127.0.0.1, a client certificate, and a stranger CA with
/// a client certificate of its own. Certificates and keys are PEM.
pub mod pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    pub struct Pki {
        pub ca_pem: String,
        /// For "localhost" and 127.0.0.1.
        pub server: (String, String),
        pub client: (String, String),
        /// A CA nobody trusts, and a client certificate it signed.
        pub stranger_ca_pem: String,
        pub stranger_client: (String, String),
    }

    fn leaf(names: &[&str], ca: &CertifiedIssuer<'_, KeyPair>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        (params.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
    }

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    pub fn pki() -> Pki {
        let (ca, stranger) = (ca(), ca());
        Pki {
            ca_pem: ca.pem(),
            server: leaf(&["localhost", "127.0.0.1"], &ca),
            client: leaf(&["a-client"], &ca),
            stranger_ca_pem: stranger.pem(),
            stranger_client: leaf(&["someone"], &stranger),
        }
    }

    impl Pki {
        /// Writes the server's files into `dir`: server.pem, server.key, and ca.pem (the
        /// client CA too when `mutual`).
        pub fn write(&self, dir: &std::path::Path, mutual: bool) -> sluice_server::TlsFiles {
            std::fs::write(dir.join("server.pem"), &self.server.0).expect("server.pem");
            std::fs::write(dir.join("server.key"), &self.server.1).expect("server.key");
            std::fs::write(dir.join("ca.pem"), &self.ca_pem).expect("ca.pem");
            sluice_server::TlsFiles {
                cert: dir.join("server.pem"),
                key: dir.join("server.key"),
                client_ca: mutual.then(|| dir.join("ca.pem")),
            }
        }
    }
}

/// Docker for the tests that run the image (deploy, hostile): the image built once,
/// commands that must succeed.
pub mod docker {
    use std::process::Command;

    /// The image the tests run; scripts/test.sh builds it first.
    pub const IMAGE: &str = "sluice:test";

    /// SLUICE_SKIP_DOCKER_TESTS=1 skips the container tests where there is no Docker.
    pub fn skip() -> bool {
        std::env::var("SLUICE_SKIP_DOCKER_TESTS").is_ok_and(|v| v == "1")
    }

    /// Runs a command to its end; panics with its output unless it succeeds.
    pub fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{cmd:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
        text
    }

    pub fn docker(args: &[&str]) -> String {
        run(Command::new("docker").args(args)).trim().to_string()
    }

    /// Builds [`IMAGE`] (cached: a no-op when the binary and base are unchanged).
    /// Without the variables cargo sets for a test: a build script (ring's) tracks
    /// CARGO_MANIFEST_DIR, and a changed value would rebuild half the release tree here
    /// and again in test.sh.
    pub fn build_image() {
        let root = super::repo_root();
        let mut image = Command::new(root.join("scripts/image.sh"));
        for (k, _) in std::env::vars() {
            let set_by_cargo_for_tests = k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_")
                || matches!(
                    k.as_str(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                );
            if set_by_cargo_for_tests {
                image.env_remove(k);
            }
        }
        run(image.env("SLUICE_IMAGE", IMAGE).current_dir(&root));
    }

    /// A container's address on its (only) network.
    pub fn ip(name: &str) -> String {
        docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name])
    }

    /// The last lines of a container's output, for failure messages.
    pub fn logs(name: &str, lines: usize) -> String {
        let out = Command::new("docker").args(["logs", "--tail", &lines.to_string(), name]).output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}
