//! Pipelines end to end: the example pipeline files served by a real server, checked
//! against the same steps run by hand (the ops called directly, the models run in ONNX
//! Runtime directly), over the wire with the project's client.
//!
//! The models are small stand-ins with the example models' interfaces (see
//! `tiny_classifier` and `tiny_detector`), so the tests run the real pipeline files
//! without ResNet-50's cost.

use sluice_client::{ClientError, InferOptions, Tensor};
use sluice_ops::{op, BuildContext, Image, Op, OpRegistry, OpSpec, Value};
use sluice_server::backend::Backend;
use sluice_server::offline::{read_signature, ModelYaml};
use sluice_server::ServerConfig;
use sluice_tests::{metric, ort_dylib, png, repo_root, start, tiny_classifier, tiny_detector, Repo};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const CLASSIFIER_YAML: &str = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 5000\n  hold: delay\n";
const DETECTOR_YAML: &str = "max_batch_size: 4\ndynamic_batching:\n  max_queue_delay_us: 2000\n  hold: delay\n";

fn example(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("pipelines").join(format!("{name}.yaml"))).expect("example pipeline")
}

/// A repository with the stand-in models under the example models' names.
fn example_repo(pipelines: &[&str]) -> Repo {
    let repo = Repo::new();
    repo.add("resnet50", &tiny_classifier(), CLASSIFIER_YAML);
    repo.add("detector", &tiny_detector(), DETECTOR_YAML);
    for p in pipelines {
        repo.pipeline(p, &example(p));
    }
    repo
}

/// The steps of a pipeline file, run by hand: its ops built from the file's params.
struct ByHand {
    ops: HashMap<String, Box<dyn Op>>,
    models: HashMap<String, Box<dyn Backend>>,
}

impl ByHand {
    fn new(pipeline: &str, repo: &Repo) -> ByHand {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&example(pipeline)).unwrap();
        let mut ops = HashMap::new();
        let mut models: HashMap<String, Box<dyn Backend>> = HashMap::new();
        let pipelines_dir = repo_root().join("pipelines");
        for n in doc["nodes"].as_sequence().unwrap() {
            let name = n["name"].as_str().unwrap().to_string();
            if let Some(o) = n["op"].as_str() {
                let params = serde_json::to_value(&n["params"]).unwrap();
                let ctx = BuildContext::new(params, &pipelines_dir);
                ops.insert(name, OpRegistry::builtin().build(o, &ctx).unwrap());
            } else {
                let m = n["model"].as_str().unwrap();
                let dir = repo.path().join(m);
                let sig = read_signature(&std::fs::read(dir.join("model.onnx")).unwrap()).unwrap();
                let cfg = ModelYaml::parse(&dir.join("model.yaml"), "").unwrap();
                let b = sluice_server::backend::ort::load(
                    &ort_dylib(),
                    &sluice_server::backend::ort::ModelSource::prepare(&ort_dylib(), &dir.join("model.onnx"), &cfg)
                        .unwrap(),
                    &cfg,
                    0,
                    &sig.inputs,
                    &sig.outputs,
                )
                .unwrap();
                models.insert(name, Box::new(b));
            }
        }
        ByHand { ops, models }
    }

    fn op(&self, node: &str, inputs: &[Value]) -> Vec<Value> {
        self.ops[node].run(inputs).unwrap_or_else(|e| panic!("{node}: {e}"))
    }

    /// Runs a model node on one item (adding and removing the batch dimension).
    fn model(&mut self, node: &str, item: &Value) -> Vec<Tensor> {
        let t = item.as_tensor().unwrap();
        let mut shape = vec![1];
        shape.extend(&t.shape);
        let batch = Tensor { dtype: t.dtype, shape, data: t.data.clone() };
        let outs = self.models.get_mut(node).unwrap().run(&[batch]).unwrap();
        outs.into_iter().map(|o| Tensor { dtype: o.dtype, shape: o.shape[1..].to_vec(), data: o.data }).collect()
    }
}

fn tensor(v: &Value) -> &Tensor {
    v.as_tensor().unwrap()
}

fn bytes_input(images: &[Vec<u8>]) -> Tensor {
    sluice_client::encoded_images(images)
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{what}[{i}]: got {g}, want {w}");
    }
}

/// A test image: a colour gradient that differs per seed (so classes differ).
fn picture(w: u32, h: u32, seed: u32) -> Image {
    let data = (0..h)
        .flat_map(|y| {
            (0..w).flat_map(move |x| {
                [
                    ((x * 255 / w + seed * 40) % 256) as u8,
                    ((y * 255 / h + seed * 90) % 256) as u8,
                    (seed * 67 % 256) as u8,
                ]
            })
        })
        .collect();
    Image::new(w, h, data)
}

/// classify's steps by hand: (top-5 scores, top-5 classes).
fn classify_by_hand(h: &mut ByHand, encoded: &[u8]) -> (Vec<f32>, Vec<i64>) {
    let img = h.op("decode", &[Value::Bytes(encoded.to_vec().into())]);
    let img = h.op("resize", &img);
    let x = h.op("normalize", &img);
    let logits = h.model("classifier", &x[0]);
    let top = h.op("top5", &[Value::Tensor(logits[0].clone())]);
    (tensor(&top[0]).to_f32().unwrap(), tensor(&top[1]).to_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_matches_the_steps_run_by_hand_in_input_order_under_concurrency() {
    let repo = example_repo(&["classify"]);
    let s = start(repo.config()).await;
    let mut by_hand = ByHand::new("classify", &repo);
    let images: Vec<Vec<u8>> = (0..12).map(|i| png(&picture(200 + i * 16, 300 - i * 8, i))).collect();
    let want: Vec<(Vec<f32>, Vec<i64>)> = images.iter().map(|i| classify_by_hand(&mut by_hand, i)).collect();
    assert!(want.windows(2).any(|w| w[0].1 != w[1].1), "the test images should not all classify alike");

    // One request with three images: outputs come back per image, in order.
    let batch = bytes_input(&images[..3]);
    let out = s.client.infer("classify", &[("image", &batch)], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].0, "scores");
    assert_eq!(out[0].1.shape, vec![3, 5]);
    let (scores, classes) = (out[0].1.to_f32().unwrap(), out[1].1.to_i64().unwrap());
    for (k, (ws, wc)) in want[..3].iter().enumerate() {
        assert_eq!(&classes[k * 5..k * 5 + 5], &wc[..], "image {k}");
        assert_close(&scores[k * 5..k * 5 + 5], ws, &format!("image {k}"));
    }

    // Twelve concurrent requests: each gets its own image's result, and the model's
    // batches mixed items of different requests.
    let calls = images.iter().map(|img| {
        let client = s.client.clone();
        let t = bytes_input(std::slice::from_ref(img));
        async move { client.infer("classify", &[("image", &t)], InferOptions::default()).await }
    });
    let results = futures::future::join_all(calls).await;
    for (k, (r, (ws, wc))) in results.into_iter().zip(&want).enumerate() {
        let out = r.unwrap();
        assert_eq!(out[1].1.to_i64().unwrap(), *wc, "request {k}");
        assert_close(&out[0].1.to_f32().unwrap(), ws, &format!("request {k}"));
    }
    let stats = s.client.model_statistics("resnet50").await.unwrap();
    let max_batch = stats[0].batch_stats.iter().map(|b| b.batch_size).max().unwrap();
    assert!(max_batch > 1, "items of concurrent requests share batches: {:?}", stats[0].batch_stats);
    let pstats = s.client.model_statistics("classify").await.unwrap();
    assert_eq!(pstats[0].inference_stats.unwrap().success.unwrap().count, 13);
}

/// A 320x320 black image with pure red cells (10x10 grid of 32 px), each with its own
/// blue level so the crops classify differently.
fn cells_image(cells: &[(u32, u32)]) -> Image {
    let mut img = Image::filled(320, 320, [0, 0, 0]);
    for (i, &(cx, cy)) in cells.iter().enumerate() {
        for y in cy * 32..cy * 32 + 32 {
            for x in cx * 32..cx * 32 + 32 {
                let p = ((y * 320 + x) * 3) as usize;
                img.data[p..p + 3].copy_from_slice(&[255, 0, (i as u8) * 90]);
            }
        }
    }
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_crop_classify_fans_out_over_zero_one_and_many_boxes() {
    let repo = example_repo(&["detect_crop_classify"]);
    let s = start(repo.config()).await;
    let mut h = ByHand::new("detect_crop_classify", &repo);
    let layouts: [&[(u32, u32)]; 3] = [&[], &[(2, 3)], &[(0, 0), (5, 1), (9, 9)]];
    let images: Vec<Vec<u8>> = layouts.iter().map(|l| png(&cells_image(l))).collect();

    for (layout, encoded) in layouts.iter().zip(&images) {
        // By hand: decode, letterbox, normalize, detector, NMS, then per crop.
        let img = h.op("decode", &[Value::Bytes(encoded.clone().into())]);
        let lb = h.op("letterbox", &img);
        let x = h.op("to_input", &lb);
        let preds = h.model("detector", &x[0]);
        let nms = h.op("nms", &[Value::Tensor(preds[0].clone()), img[0].clone()]);
        let crops = h.op("crop", &[img[0].clone(), nms[0].clone()]);
        let mut crop_scores = Vec::new();
        let mut crop_classes = Vec::new();
        for c in crops[0].as_list().unwrap().iter() {
            let x = h.op("crop_input", std::slice::from_ref(c));
            let logits = h.model("classifier", &x[0]);
            let top = h.op("top5", &[Value::Tensor(logits[0].clone())]);
            crop_scores.extend(tensor(&top[0]).to_f32().unwrap());
            crop_classes.extend(tensor(&top[1]).to_i64().unwrap());
        }

        let out = s
            .client
            .infer(
                "detect_crop_classify",
                &[("image", &bytes_input(std::slice::from_ref(encoded)))],
                InferOptions::default(),
            )
            .await
            .unwrap();
        let out: HashMap<String, Tensor> = out.into_iter().collect();
        let n = layout.len();
        assert_eq!(out["count"].to_i64().unwrap(), vec![n as i64]);
        assert_eq!(out["boxes"].shape, vec![1, n, 4]);
        // The stand-in detector's boxes are exactly the red cells, best (all 1.0) first
        // in cell order.
        let want_boxes: Vec<f32> = layout
            .iter()
            .flat_map(|&(cx, cy)| [cx * 32, cy * 32, cx * 32 + 32, cy * 32 + 32].map(|v| v as f32))
            .collect();
        assert_eq!(out["boxes"].to_f32().unwrap(), want_boxes);
        assert_eq!(out["boxes"].to_f32().unwrap(), tensor(&nms[0]).to_f32().unwrap());
        assert_eq!(out["box_classes"].to_i64().unwrap(), vec![0; n]);
        assert_eq!(out["crop_scores"].shape, vec![1, n, 5]);
        assert_eq!(out["crop_classes"].to_i64().unwrap(), crop_classes);
        assert_close(&out["crop_scores"].to_f32().unwrap(), &crop_scores, "crop scores");
        if n == 3 {
            assert_ne!(crop_classes[..5], crop_classes[5..10], "crops differ, so order is visible");
        }
    }

    // All three images in one request: per-image results padded to the longest list.
    let out = s
        .client
        .infer("detect_crop_classify", &[("image", &bytes_input(&images))], InferOptions::default())
        .await
        .unwrap();
    let out: HashMap<String, Tensor> = out.into_iter().collect();
    assert_eq!(out["count"].to_i64().unwrap(), vec![0, 1, 3]);
    assert_eq!(out["boxes"].shape, vec![3, 3, 4]);
    let boxes = out["boxes"].to_f32().unwrap();
    assert_eq!(&boxes[..12], &[0.0; 12], "image 0 has no boxes: all padding");
    assert_eq!(&boxes[12..16], &[64.0, 96.0, 96.0, 128.0]);
    assert_eq!(&boxes[24..28], &[0.0, 0.0, 32.0, 32.0]);

    // Six images went through, with 0, 1 and 3 boxes twice: the fan-out histogram of
    // each node mapped over the crops says so.
    let labels = ["pipeline=\"detect_crop_classify\"", "node=\"classifier\""];
    assert_eq!(metric(&s.http, "sluice_node_fanout_items_count", &labels).await, 6.0);
    assert_eq!(metric(&s.http, "sluice_node_fanout_items_sum", &labels).await, 8.0);
}

/// detect_crop_classify with a `filter_boxes` node (`params`) between NMS and the crops.
fn filtered_detect_crop_classify(params: &str) -> String {
    let text = example("detect_crop_classify")
        .replace("from: nms.boxes}", "from: keep.boxes}")
        .replace("from: nms.scores}", "from: keep.scores}")
        .replace("from: nms.classes}", "from: keep.classes}")
        .replace("boxes: nms.boxes}", "boxes: keep.boxes}")
        .replace(
            "  - name: crop\n",
            &format!(
                "  - name: keep\n    op: filter_boxes\n    inputs: {{boxes: nms.boxes, scores: nms.scores, classes: nms.classes}}\n    params: {params}\n  - name: crop\n"
            ),
        );
    assert_eq!(text.matches("keep.").count(), 4, "the example changed: {text}");
    text
}

/// A filter before the fan-out decides what the classifier sees: one that drops every
/// box leaves the classifier's counters at zero; one that keeps class 1 sends it exactly
/// the class-1 box, and the outputs are that box's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_runs_the_classifier_only_on_the_boxes_it_keeps() {
    let repo = example_repo(&[]);
    repo.pipeline("drop_all", &filtered_detect_crop_classify("{min_score: 1.5}"));
    repo.pipeline("class_1", &filtered_detect_crop_classify("{classes: [1], min_score: 0.5}"));
    let s = start(repo.config()).await;
    // Red cells are class 0 for the stand-in detector; a yellow one (red and green) is class 1.
    let mut img = cells_image(&[(0, 0), (5, 1), (2, 7)]);
    for y in 7 * 32..8 * 32 {
        for x in 2 * 32..3 * 32 {
            img.data[((y * 320 + x) * 3 + 1) as usize] = 255;
        }
    }
    let input = bytes_input(&[png(&img)]);
    let c = &s.client;
    let call = |p: &'static str| {
        let input = input.clone();
        async move { c.infer(p, &[("image", &input)], InferOptions::default()).await.unwrap() }
    };
    let classified = |m: &'static str| async move { c.model_statistics(m).await.unwrap()[0].inference_count };

    let out: HashMap<String, Tensor> = call("drop_all").await.into_iter().collect();
    assert_eq!(out["count"].to_i64().unwrap(), vec![0]);
    assert_eq!(out["boxes"].shape, vec![1, 0, 4]);
    assert_eq!((classified("detector").await, classified("resnet50").await), (1, 0), "the classifier never ran");

    let out: HashMap<String, Tensor> = call("class_1").await.into_iter().collect();
    assert_eq!(out["count"].to_i64().unwrap(), vec![1]);
    assert_eq!(out["box_classes"].to_i64().unwrap(), vec![1]);
    assert_eq!(out["boxes"].to_f32().unwrap(), vec![64.0, 224.0, 96.0, 256.0]);
    assert_eq!(out["crop_classes"].shape, vec![1, 1, 5]);
    assert_eq!(classified("resnet50").await, 1, "one crop classified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_image_fails_only_its_request_naming_the_node() {
    let repo = example_repo(&["classify"]);
    let s = start(repo.config()).await;
    let good = png(&picture(64, 48, 1));
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    for (bad, says) in [(b"not an image".to_vec(), "not a JPEG or PNG"), (truncated, "cannot decode PNG")] {
        let err =
            s.client.infer("classify", &[("image", &bytes_input(&[bad]))], InferOptions::default()).await.unwrap_err();
        let ClientError::Status(st) = &err else { panic!("{err}") };
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
        assert!(st.message().contains("pipeline 'classify', node 'decode'"), "{}", st.message());
        assert!(st.message().contains(says), "{}", st.message());
    }
    // One bad image in a request of two fails that request; the server keeps serving.
    let mixed = bytes_input(&[good.clone(), b"junk".to_vec()]);
    assert!(s.client.infer("classify", &[("image", &mixed)], InferOptions::default()).await.is_err());
    let ok = s.client.infer("classify", &[("image", &bytes_input(&[good]))], InferOptions::default()).await.unwrap();
    assert_eq!(ok[1].1.shape, vec![1, 5]);
    // Wrong inputs are the request's fault too.
    let wrong = Tensor::from_f32(vec![1, 1], &[0.0]);
    let err = s.client.infer("classify", &[("image", &wrong)], InferOptions::default()).await.unwrap_err();
    assert!(err.to_string().contains("input 'image': expected datatype BYTES, got FP32"), "{err}");
}

/// A custom op (registered at run time, as an embedding program would) that passes its
/// input through after calling `f`.
struct PassThrough(fn());
impl Op for PassThrough {
    fn inputs(&self) -> Vec<sluice_ops::Port> {
        vec![op::port("value", sluice_ops::ValueType::Any)]
    }
    fn outputs(&self) -> Vec<sluice_ops::Port> {
        vec![op::port("value", sluice_ops::ValueType::Any)]
    }
    fn infer(&mut self, inputs: &[sluice_ops::ValueType]) -> Result<Vec<sluice_ops::ValueType>, String> {
        Ok(inputs.to_vec())
    }
    fn run(&self, inputs: &[Value]) -> op::OpResult {
        (self.0)();
        Ok(inputs.to_vec())
    }
}

const TENSOR_PIPELINE: &str = "max_batch_size: 0\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: last.value}\nnodes:\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_panic_fails_its_request_with_internal_and_the_server_keeps_serving() {
    let panics = OpSpec::new("test_panics", "panics", |_| {
        Ok(Box::new(PassThrough(|| panic!("index out of bounds in a custom op"))))
    });
    let repo = Repo::new();
    repo.pipeline("boom", &format!("{TENSOR_PIPELINE}  - name: last\n    op: test_panics\n    inputs: {{value: x}}\n"));
    repo.pipeline(
        "fine",
        &format!("{TENSOR_PIPELINE}  - name: last\n    op: delay\n    inputs: {{value: x}}\n    params: {{ms: 0}}\n"),
    );
    // The server's own op set: built-in ops and this one.
    let cfg = ServerConfig { ops: Arc::new(OpRegistry::builtin().with(panics).unwrap()), ..repo.config() };
    let s = start(cfg).await;
    let x = Tensor::from_f32(vec![4], &[1.0, 2.0, 3.0, 4.0]);
    for _ in 0..3 {
        let err = s.client.infer("boom", &[("x", &x)], InferOptions::default()).await.unwrap_err();
        let ClientError::Status(st) = &err else { panic!("{err}") };
        assert_eq!(st.code(), Code::Internal, "{}", st.message());
        assert_eq!(st.message(), "pipeline 'boom', node 'last': op panicked: index out of bounds in a custom op");
    }
    let out = s.client.infer("fine", &[("x", &x)], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].1.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

/// A custom op that declares one output and returns none: an op author's bug.
struct ReturnsNothing;
impl Op for ReturnsNothing {
    fn inputs(&self) -> Vec<sluice_ops::Port> {
        vec![op::port("value", sluice_ops::ValueType::Any)]
    }
    fn outputs(&self) -> Vec<sluice_ops::Port> {
        vec![op::port("value", sluice_ops::ValueType::Any)]
    }
    fn infer(&mut self, inputs: &[sluice_ops::ValueType]) -> Result<Vec<sluice_ops::ValueType>, String> {
        Ok(inputs.to_vec())
    }
    fn run(&self, _: &[Value]) -> op::OpResult {
        Ok(vec![])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_op_that_breaks_its_contract_fails_its_request_or_its_load_not_the_server() {
    let nothing = OpSpec::new("test_returns_nothing", "returns no outputs", |_| Ok(Box::new(ReturnsNothing)));
    let panics = OpSpec::new("test_build_panics", "panics when built", |_| panic!("a constructor's bug"));
    let repo = Repo::new();
    let node = |op: &str| format!("{TENSOR_PIPELINE}  - name: last\n    op: {op}\n    inputs: {{value: x}}\n");
    repo.pipeline("short", &node("test_returns_nothing"));
    repo.pipeline("unbuildable", &node("test_build_panics"));
    repo.pipeline(
        "fine",
        &node("test_returns_nothing")
            .replace("test_returns_nothing", "softmax")
            .replace("value: x", "tensor: x")
            .replace("last.value", "last.tensor"),
    );
    let ops = OpRegistry::builtin().with(nothing).unwrap().with(panics).unwrap();
    let s = start(ServerConfig { ops: Arc::new(ops), ..repo.config() }).await;
    let x = Tensor::from_f32(vec![4], &[1.0, 2.0, 3.0, 4.0]);
    let err = s.client.infer("short", &[("x", &x)], InferOptions::default()).await.unwrap_err();
    let ClientError::Status(st) = &err else { panic!("{err}") };
    assert_eq!(st.code(), Code::Internal, "{}", st.message());
    assert_eq!(st.message(), "pipeline 'short', node 'last': op returned 0 outputs, but declares 1 (value)");
    let index = s.client.repository_index().await.unwrap();
    let broken = index.iter().find(|m| m.name == "unbuildable").unwrap();
    assert_eq!(broken.state, "UNAVAILABLE");
    assert!(broken.reason.contains("compiling panicked: a constructor's bug"), "{}", broken.reason);
    assert!(s.client.infer("fine", &[("x", &x)], InferOptions::default()).await.is_ok(), "the server keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_pipeline_is_reported_and_the_others_still_serve() {
    let repo = Repo::new();
    repo.pipeline(
        "fine",
        &format!("{TENSOR_PIPELINE}  - name: last\n    op: delay\n    inputs: {{value: x}}\n    params: {{ms: 0}}\n"),
    );
    repo.pipeline("typo", &format!("{TENSOR_PIPELINE}  - name: last\n    op: dealy\n    inputs: {{value: x}}\n"));
    let s = start(repo.config()).await;
    let index = s.client.repository_index().await.unwrap();
    let typo = index.iter().find(|m| m.name == "typo").unwrap();
    assert_eq!(typo.state, "UNAVAILABLE");
    assert!(typo.reason.contains("typo.yaml:8: node 'last': op 'dealy': unknown op 'dealy'"), "{}", typo.reason);
    let err = s.client.infer("typo", &[], InferOptions::default()).await.unwrap_err();
    assert!(err.to_string().contains("unknown op 'dealy'"), "{err}");
    let x = Tensor::from_f32(vec![4], &[1.0; 4]);
    assert!(s.client.infer("fine", &[("x", &x)], InferOptions::default()).await.is_ok());
    assert!(!s.client.server_ready().await.unwrap(), "a server with a broken pipeline is not ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_fails_and_its_remaining_work_is_skipped() {
    let repo = Repo::new();
    let slow = "  - name: first\n    op: delay\n    inputs: {value: x}\n    params: {ms: 300}\n  - name: last\n    op: delay\n    inputs: {value: first.value}\n    params: {ms: 0}\n";
    repo.pipeline("slow", &format!("{TENSOR_PIPELINE}{slow}"));
    // The server's default deadline (a client-side timeout would race it).
    let cfg = sluice_server::ServerConfig { request_timeout: Some(Duration::from_millis(100)), ..repo.config() };
    let s = start(cfg).await;
    let x = Tensor::from_f32(vec![4], &[1.0; 4]);
    let err = s.client.infer("slow", &[("x", &x)], InferOptions::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let metrics = reqwest::get(format!("{}/metrics", s.http)).await.unwrap().text().await.unwrap();
    let items = |node: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("sluice_node_items_total") && l.contains(&format!("node=\"{node}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(items("first"), Some(1));
    assert_eq!(items("last"), Some(0), "the node after the deadline never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fused_layout_gives_the_same_results_as_the_split_one() {
    let repo = example_repo(&["classify", "detect_crop_classify"]);
    repo.pipeline("classify_fused", &format!("layout: fused\n{}", example("classify")));
    repo.pipeline("dcc_fused", &format!("layout: fused\n{}", example("detect_crop_classify")));
    let s = start(repo.config()).await;
    let images: Vec<Vec<u8>> = (0..3).map(|i| png(&picture(120, 90, i))).collect();
    let input = bytes_input(&images);
    let split = s.client.infer("classify", &[("image", &input)], InferOptions::default()).await.unwrap();
    let fused = s.client.infer("classify_fused", &[("image", &input)], InferOptions::default()).await.unwrap();
    assert_eq!(split[1].1.to_i64().unwrap(), fused[1].1.to_i64().unwrap());
    assert_close(&fused[0].1.to_f32().unwrap(), &split[0].1.to_f32().unwrap(), "scores");
    let cells = bytes_input(&[png(&cells_image(&[(1, 1), (4, 4)]))]);
    let split = s.client.infer("detect_crop_classify", &[("image", &cells)], InferOptions::default()).await.unwrap();
    let fused = s.client.infer("dcc_fused", &[("image", &cells)], InferOptions::default()).await.unwrap();
    for ((name, a), (_, b)) in split.iter().zip(&fused) {
        assert_eq!(a.shape, b.shape, "{name}");
        if a.dtype == sluice_ops::DataType::I64 {
            assert_eq!(a.to_i64(), b.to_i64(), "{name}");
        } else {
            assert_close(&b.to_f32().unwrap(), &a.to_f32().unwrap(), name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_node_may_shorten_its_models_batching_delay() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    // The model waits up to 2 s for a batch to fill; the pipeline's node will not.
    repo.add(
        "affine",
        &sluice_tests::affine_model(4),
        "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 2000000\n  hold: delay\n",
    );
    let node = |delay: &str| {
        format!("max_batch_size: 0\ninputs:\n  - {{name: x, dtype: FP32, dims: [4]}}\noutputs:\n  - {{name: y, from: m.y}}\nnodes:\n  - name: m\n    model: affine\n    inputs: {{x: x}}\n{delay}")
    };
    repo.pipeline("eager", &node("    max_queue_delay_us: 0\n"));
    let s = start(repo.config()).await;
    let x = Tensor::from_f32(vec![4], &[1.0, 2.0, 3.0, 4.0]);
    let t0 = std::time::Instant::now();
    let out = s.client.infer("eager", &[("x", &x)], InferOptions::default()).await.unwrap();
    assert_eq!(out[0].1.to_f32().unwrap(), vec![3.0, 5.0, 7.0, 9.0]);
    assert!(t0.elapsed() < Duration::from_secs(1), "the node's 0 µs limit cut the batch, not the model's 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_node_may_cap_its_batch_size() {
    let repo = Repo::new();
    repo.add(
        "affine",
        &sluice_tests::affine_model(4),
        "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 200000\n  hold: delay\n",
    );
    let yaml = "max_batch_size: 0\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: m.y}\nnodes:\n  - name: m\n    model: affine\n    inputs: {x: x}\n    max_batch_size: 2\n";
    repo.pipeline("small", yaml);
    let s = start(repo.config()).await;
    let calls = (0..6).map(|i| {
        let client = s.client.clone();
        async move {
            let x = Tensor::from_f32(vec![4], &[i as f32; 4]);
            client.infer("small", &[("x", &x)], InferOptions::default()).await.unwrap()
        }
    });
    for (i, out) in futures::future::join_all(calls).await.into_iter().enumerate() {
        assert_eq!(out[0].1.to_f32().unwrap(), vec![2.0 * i as f32 + 1.0; 4]);
    }
    let stats = s.client.model_statistics("affine").await.unwrap();
    let sizes: Vec<u64> = stats[0].batch_stats.iter().map(|b| b.batch_size).collect();
    assert_eq!(sizes, vec![2], "6 items ran as batches of exactly 2: {sizes:?}");
}

/// Counts how many of its runs overlap, to observe a node's concurrency limit.
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static MOST_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sleeps 20 ms, recording how many runs overlap.
fn track() {
    use std::sync::atomic::Ordering::SeqCst;
    let now = RUNNING.fetch_add(1, SeqCst) + 1;
    MOST_RUNNING.fetch_max(now, SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    RUNNING.fetch_sub(1, SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_concurrency_limit_holds_across_requests() {
    use std::sync::atomic::Ordering::SeqCst;
    let tracks = OpSpec::new("test_tracks", "counts overlapping runs", |_| Ok(Box::new(PassThrough(track))));
    let repo = Repo::new();
    let node = |limit: usize| {
        format!("{TENSOR_PIPELINE}  - name: last\n    op: test_tracks\n    pool: wide\n    concurrency: {limit}\n    inputs: {{value: x}}\n")
    };
    repo.pipeline("limited", &node(1));
    repo.pipeline("free", &node(0));
    let mut cfg = repo.config();
    cfg.pools = vec![sluice_server::PoolConfig { name: "wide".into(), threads: 4, queue: 64 }];
    cfg.ops = Arc::new(OpRegistry::builtin().with(tracks).unwrap());
    let s = start(cfg).await;
    let x = Tensor::from_f32(vec![4], &[1.0; 4]);
    for (pipeline, most) in [("limited", 1), ("free", 4)] {
        MOST_RUNNING.store(0, SeqCst);
        let calls = (0..6).map(|_| {
            let client = s.client.clone();
            let x = x.clone();
            async move { client.infer(pipeline, &[("x", &x)], InferOptions::default()).await.unwrap() }
        });
        futures::future::join_all(calls).await;
        let seen = MOST_RUNNING.load(SeqCst);
        if most == 1 {
            assert_eq!(seen, 1, "concurrency: 1 let {seen} runs overlap");
        } else {
            assert!(seen > 1, "without a limit, the 4 pool threads run items together (saw {seen})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencv_params_without_engine_opencv_fail_the_load_naming_the_line() {
    let repo = Repo::new();
    let decode = |params: &str, resize: &str| {
        format!(
            "inputs:\n  - {{name: image, dtype: BYTES, dims: [1]}}\noutputs:\n  - {{name: o, from: small.image}}\nnodes:\n  \
             - {{name: decode, op: decode_image, inputs: {{bytes: image}}, params: {params}}}\n  - name: small\n    \
             op: resize\n    inputs: {{image: decode.image}}\n    params: {{mode: stretch, width: 8, height: 8{resize}}}\n"
        )
    };
    repo.pipeline("no_engine", &decode("{max_side: 320}", ""));
    repo.pipeline("area_on_rust", &decode("{}", ", interpolation: area"));
    let s = start(repo.config()).await;
    let index = s.client.repository_index().await.unwrap();
    let reason = |name: &str| index.iter().find(|m| m.name == name).map(|m| m.reason.clone()).unwrap();
    let r = reason("no_engine");
    assert!(
        r.contains("no_engine.yaml:6: node 'decode'") && r.contains("max_side") && r.contains("engine: opencv"),
        "{r}"
    );
    let r = reason("area_on_rust");
    assert!(
        r.contains("area_on_rust.yaml:8: node 'small'") && r.contains("interpolation: area needs engine: opencv"),
        "{r}"
    );
}
