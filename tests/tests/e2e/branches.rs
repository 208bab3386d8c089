//! Pipelines that choose, end to end over the wire: a route by detected class to two
//! classifiers (the example `detect_route_classify`), a route by a request parameter, a
//! weighted split (plain and sticky), `when:` conditions with their defaults, and request
//! parameters that change an op's threshold per request.

use sluice_client::{ClientError, InferOptions, Parameter, Tensor};
use sluice_tests::{
    cells_png, example_pipeline, linear_model, metric, start, tiny_classifier, tiny_classifier_scaled,
    tiny_classifier_weight, tiny_detector, Repo,
};
use std::collections::HashMap;
use tonic::Code;

const CLASSIFIER_YAML: &str = "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_us: 5000\n  hold: delay\n";
const DETECTOR_YAML: &str = "max_batch_size: 4\ndynamic_batching:\n  max_queue_delay_us: 2000\n  hold: delay\n";
/// The small classifier's stand-in: the tiny classifier with its weights negated, so the
/// two answer differently and each answer shows which model gave it.
const SMALL_SCALE: f32 = -1.0;

/// The stand-in models under the example models' names, and the example `pipelines`.
fn example_repo(pipelines: &[&str]) -> Repo {
    let repo = Repo::new();
    repo.add("resnet50", &tiny_classifier(), CLASSIFIER_YAML);
    repo.add("classifier_small", &tiny_classifier_scaled(SMALL_SCALE), CLASSIFIER_YAML);
    repo.add("detector", &tiny_detector(), DETECTOR_YAML);
    for p in pipelines {
        repo.pipeline(p, &example_pipeline(p));
    }
    repo
}

/// What a stand-in classifier (weights times `scale`) answers for a crop of one colour,
/// worked out from its weights: the crop normalised with ImageNet's mean and std, its
/// channel means times the weights, softmax, top 5. (top-5 scores, top-5 classes)
fn expected_top5(rgb: [u8; 3], scale: f32) -> (Vec<f32>, Vec<i64>) {
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let v: Vec<f32> = (0..3).map(|c| (f32::from(rgb[c]) / 255.0 - mean[c]) / std[c]).collect();
    let logits: Vec<f32> =
        (0..1000).map(|k| (0..3).map(|c| v[c] * tiny_classifier_weight(c, k) * scale).sum()).collect();
    let max = logits.iter().cloned().fold(f32::MIN, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let mut order: Vec<usize> = (0..1000).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top = &order[..5];
    (top.iter().map(|&k| (logits[k] - max).exp() / sum).collect(), top.iter().map(|&k| k as i64).collect())
}

fn outputs(out: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    out.into_iter().collect()
}

fn image_input(png: &[u8]) -> Tensor {
    sluice_client::encoded_images(&[png.to_vec()])
}

/// The example route: each crop is answered by the model for its box's class, in box
/// order, also with many requests in flight (their crops share each model's batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_by_class_answers_each_crop_with_its_model_in_box_order() {
    let repo = example_repo(&["detect_route_classify"]);
    let s = start(repo.config()).await;
    let red = |b: u8| [255, 0, b];
    let yellow = |b: u8| [255, 255, b];
    // Boxes come back in cell order (all score 1): per request, its cells' colours.
    let layouts: Vec<Vec<(u32, u32, [u8; 3])>> = vec![
        vec![(0, 0, red(0)), (5, 1, yellow(90)), (2, 7, red(180))],
        vec![(1, 1, yellow(0)), (4, 4, yellow(200))],
        vec![(3, 0, red(60)), (9, 9, yellow(30))],
        vec![(6, 2, red(120))],
    ];
    let calls = layouts.iter().cycle().take(12).map(|l| {
        let (client, input) = (s.client.clone(), image_input(&cells_png(l)));
        async move { client.infer("detect_route_classify", &[("image", &input)], InferOptions::default()).await }
    });
    let results = futures::future::join_all(calls).await;
    let (mut to_big, mut to_small) = (0, 0);
    for (r, layout) in results.into_iter().zip(layouts.iter().cycle()) {
        let out = outputs(r.unwrap());
        let n = layout.len();
        assert_eq!(out["count"].to_i64().unwrap(), vec![n as i64]);
        let classes: Vec<i64> = layout.iter().map(|&(_, _, c)| i64::from(c[1] == 255)).collect();
        assert_eq!(out["box_classes"].to_i64().unwrap(), classes);
        let (scores, top) = (out["crop_scores"].to_f32().unwrap(), out["crop_classes"].to_i64().unwrap());
        for (k, &(_, _, rgb)) in layout.iter().enumerate() {
            let (scale, which) = if classes[k] == 0 { (1.0, "resnet50") } else { (SMALL_SCALE, "classifier_small") };
            let (want_scores, want_classes) = expected_top5(rgb, scale);
            assert_eq!(&top[k * 5..k * 5 + 5], &want_classes[..], "crop {k} of {layout:?}: answered by {which}");
            for (g, w) in scores[k * 5..k * 5 + 5].iter().zip(&want_scores) {
                assert!((g - w).abs() <= 1e-4 + 1e-3 * w, "crop {k}: score {g}, want {w}");
            }
            if classes[k] == 0 {
                to_big += 1;
            } else {
                to_small += 1;
            }
        }
    }
    // Each model saw exactly its crops, and the branch counters say so.
    let count = |m: &'static str| {
        let c = &s.client;
        async move { c.model_statistics(m).await.unwrap()[0].inference_count }
    };
    assert_eq!((count("resnet50").await, count("classifier_small").await), (to_big, to_small));
    let labels = |b| ["pipeline=\"detect_route_classify\"", "node=\"classifier\"", b];
    let branch = "sluice_node_branch_items_total";
    assert_eq!(metric(&s.http, branch, &labels("branch=\"resnet50\"")).await, to_big as f64);
    assert_eq!(metric(&s.http, branch, &labels("branch=\"classifier_small\"")).await, to_small as f64);
    // The dashboard's frame: the route node with its branches' counts, and a dashed
    // (conditional) edge from what it routes by.
    let frame: serde_json::Value =
        reqwest::get(format!("{}/dashboard/data", s.http)).await.unwrap().json().await.unwrap();
    let p = frame["pipelines"].as_array().unwrap().iter().find(|p| p["name"] == "detect_route_classify").unwrap();
    let node = p["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "classifier").unwrap();
    assert_eq!(node["kind"], "route");
    assert_eq!(node["conditions"], serde_json::json!(["keep"]));
    let branches: Vec<(String, u64)> = node["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["label"].as_str().unwrap().to_string(), b["items_total"].as_u64().unwrap()))
        .collect();
    assert_eq!(branches, vec![("resnet50".into(), to_big), ("classifier_small".into(), to_small)]);
}

/// The example's `min_score` parameter moves the filter's threshold per request, over
/// gRPC and HTTP; values outside its range or of the wrong type are the request's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_parameter_changes_the_threshold_of_that_request_only() {
    let repo = example_repo(&["detect_route_classify"]);
    let s = start(repo.config()).await;
    // A full red cell scores 1.0, a half red one about 0.5.
    let input = image_input(&cells_png(&[(0, 0, [255, 0, 0]), (3, 3, [128, 0, 0])]));
    let call = |p: Option<Parameter>| {
        let (client, input) = (s.client.clone(), input.clone());
        async move {
            let parameters = p.map(|p| vec![("min_score".to_string(), p)]).unwrap_or_default();
            let opts = InferOptions { parameters, ..Default::default() };
            client.infer("detect_route_classify", &[("image", &input)], opts).await
        }
    };
    let count = |r: Result<Vec<(String, Tensor)>, ClientError>| outputs(r.unwrap())["count"].to_i64().unwrap()[0];
    // Concurrently, so each request's value must stay its own.
    let (default, strict, loose) =
        tokio::join!(call(None), call(Some(Parameter::Float(0.6))), call(Some(Parameter::Float(0.4))));
    assert_eq!((count(default), count(strict), count(loose)), (2, 1, 2));
    assert_eq!(count(call(Some(Parameter::Int(1))).await), 1, "an integer is a number too");

    for (bad, says) in [
        (Parameter::Float(1.5), "parameter 'min_score': 1.5 is outside [0, 1]"),
        (Parameter::String("high".into()), "parameter 'min_score': expected a number, got 'high'"),
    ] {
        let err = call(Some(bad)).await.unwrap_err();
        let ClientError::Status(st) = &err else { panic!("{err}") };
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
        assert!(st.message().contains(says), "{}", st.message());
    }
    // The server keeps serving, with the default.
    assert_eq!(count(call(None).await), 2);
}

/// y = 2x + 1 (`a`) or y = 3x (`b`), over x FP32 [4]: which model answered shows in y.
fn ab_repo() -> Repo {
    let repo = Repo::new();
    repo.add("a", &linear_model(4, 2.0, 1.0), "max_batch_size: 8\n");
    repo.add("b", &linear_model(4, 3.0, 0.0), "max_batch_size: 8\n");
    repo
}

const AB_HEAD: &str =
    "max_batch_size: 0\ninputs:\n  - {name: x, dtype: FP32, dims: [4]}\noutputs:\n  - {name: y, from: m.y}\n";

/// 'a' or 'b', from what a request got back for x = [1, 2, 3, 4].
fn which(y: &Tensor) -> char {
    match y.to_f32().unwrap()[..] {
        [3.0, 5.0, 7.0, 9.0] => 'a',
        [3.0, 6.0, 9.0, 12.0] => 'b',
        ref other => panic!("neither model's answer: {other:?}"),
    }
}

/// A 90/10 split holds its weights within 3% over 2,000 requests; a sticky one sends a
/// request id to the same branch every time and spreads many ids by the weights too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_holds_its_weights_and_sticks_by_request_id() {
    let repo = ab_repo();
    let split = "nodes:\n  - name: m\n    split:\n      - {model: a, weight: 90}\n      - {model: b, weight: 10}\n    inputs: {x: x}\n";
    repo.pipeline("canary", &format!("{AB_HEAD}{split}"));
    repo.pipeline("sticky", &format!("{AB_HEAD}{split}    sticky: true\n"));
    let s = start(repo.config()).await;
    let x = Tensor::from_f32(vec![4], &[1.0, 2.0, 3.0, 4.0]);
    let run = |pipeline: &'static str, ids: Vec<String>| {
        let (client, x) = (s.client.clone(), x.clone());
        async move {
            let mut got = Vec::new();
            // 16 in flight at a time.
            for chunk in ids.chunks(16) {
                let calls = chunk.iter().map(|id| {
                    let (client, x) = (client.clone(), x.clone());
                    let opts = InferOptions { id: id.clone(), ..Default::default() };
                    async move { client.infer(pipeline, &[("x", &x)], opts).await }
                });
                for r in futures::future::join_all(calls).await {
                    got.push(which(&r.unwrap()[0].1));
                }
            }
            got
        }
    };
    let share_b = |got: &[char]| got.iter().filter(|&&c| c == 'b').count() as f64 / got.len() as f64;

    let got = run("canary", (0..2000).map(|i| format!("r{i}")).collect()).await;
    assert!((share_b(&got) - 0.10).abs() <= 0.03, "canary share {}", share_b(&got));
    let labels = |b: &'static str| ["pipeline=\"canary\"", "node=\"m\"", b];
    let b_items = metric(&s.http, "sluice_node_branch_items_total", &labels("branch=\"b\"")).await;
    let a_items = metric(&s.http, "sluice_node_branch_items_total", &labels("branch=\"a\"")).await;
    assert_eq!((a_items + b_items, b_items), (2000.0, got.iter().filter(|&&c| c == 'b').count() as f64));

    let got = run("sticky", (0..2000).map(|i| format!("user-{i}")).collect()).await;
    assert!((share_b(&got) - 0.10).abs() <= 0.03, "sticky share {}", share_b(&got));
    let again = run("sticky", (0..2000).map(|i| format!("user-{i}")).collect()).await;
    assert_eq!(got, again, "every id takes the branch it took before");
}

/// A route by a request parameter: every item of the request goes where it says; a
/// value no case names is the request's error (HTTP 400 / INVALID_ARGUMENT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_by_a_parameter_sends_the_request_where_it_says() {
    let repo = ab_repo();
    let route = "parameters:\n  - {name: variant, type: string, default: a}\nnodes:\n  - name: m\n    route: {by: $variant, cases: {a: a, b: b}}\n    inputs: {x: x}\n";
    repo.pipeline("by_variant", &format!("{AB_HEAD}{route}"));
    let s = start(repo.config()).await;
    let x = Tensor::from_f32(vec![4], &[1.0, 2.0, 3.0, 4.0]);
    let call = |v: Option<&str>| {
        let (client, x) = (s.client.clone(), x.clone());
        let parameters = v.map(|v| vec![("variant".to_string(), Parameter::String(v.into()))]).unwrap_or_default();
        async move { client.infer("by_variant", &[("x", &x)], InferOptions { parameters, ..Default::default() }).await }
    };
    assert_eq!(which(&call(None).await.unwrap()[0].1), 'a');
    assert_eq!(which(&call(Some("b")).await.unwrap()[0].1), 'b');
    let err = call(Some("c")).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("route: no case for 'c' ('a' -> a, 'b' -> b) and no `default:`"), "{err}");

    // The same over HTTP/JSON, parameters in the body.
    let http = reqwest::Client::new();
    let body = |v: &str| {
        serde_json::json!({
            "parameters": {"variant": v},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}],
        })
    };
    let url = format!("{}/v2/models/by_variant/infer", s.http);
    let r: serde_json::Value = http.post(&url).json(&body("b")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["outputs"][0]["data"], serde_json::json!([3.0, 6.0, 9.0, 12.0]), "{r}");
    let r = http.post(&url).json(&body("c")).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

/// `when:` on a node: a condition over a request parameter (the classifier never runs,
/// its counters stay at zero, the outputs take their defaults) and over a computed value
/// (`count.count > 1`), in the split and the fused layout alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_skips_its_node_and_the_outputs_take_their_defaults() {
    let repo = example_repo(&[]);
    let classify = example_pipeline("classify")
        .replace("inputs:\n", "parameters:\n  - {name: classify, type: bool, default: true}\ninputs:\n")
        .replace("from: top5.scores}", "from: top5.scores, default: [0, 0, 0, 0, 0]}")
        .replace("from: top5.classes}", "from: top5.classes, default: [-1, -1, -1, -1, -1]}")
        .replace(
            "    inputs: {input: normalize.tensor}\n",
            "    inputs: {input: normalize.tensor}\n    when: $classify\n",
        )
        .replace("    params: {k: 5, softmax: true}\n", "    params: {k: 5, softmax: true}\n    on_absent: skip\n");
    assert_eq!(classify.matches("when: $classify").count(), 1, "the example changed: {classify}");
    repo.pipeline("maybe_classify", &classify);
    repo.pipeline("maybe_classify_fused", &classify.replace("max_batch_size: 8", "layout: fused\nmax_batch_size: 8"));
    // Crops are gathered only when there are at least two.
    let gathered = example_pipeline("detect_crop_classify")
        .replace("from: gather_classes.tensor}", "from: gather_classes.tensor, default: empty}")
        .replace("    inputs: {list: top5.classes}\n", "    inputs: {list: top5.classes}\n    when: count.count > 1\n");
    repo.pipeline("gather_if_many", &gathered);
    let s = start(repo.config()).await;
    let photo = image_input(&cells_png(&[(4, 4, [10, 200, 30])]));
    let off = || InferOptions { parameters: vec![("classify".into(), Parameter::Bool(false))], ..Default::default() };

    for p in ["maybe_classify", "maybe_classify_fused"] {
        let out = outputs(s.client.infer(p, &[("image", &photo)], off()).await.unwrap());
        assert_eq!(out["scores"].to_f32().unwrap(), vec![0.0; 5], "{p}");
        assert_eq!(out["classes"].to_i64().unwrap(), vec![-1; 5], "{p}");
    }
    assert_eq!(s.client.model_statistics("resnet50").await.unwrap()[0].inference_count, 0, "never ran");
    let skipped = |p: &'static str, n: &'static str| {
        let labels = [format!("pipeline=\"{p}\""), format!("node=\"{n}\"")];
        let http = s.http.clone();
        async move { metric(&http, "sluice_node_skipped_total", &[&labels[0], &labels[1]]).await }
    };
    assert_eq!(skipped("maybe_classify", "classifier").await, 1.0);
    assert_eq!(skipped("maybe_classify", "top5").await, 1.0, "skipped with what it reads");
    for p in ["maybe_classify", "maybe_classify_fused"] {
        let out = outputs(s.client.infer(p, &[("image", &photo)], InferOptions::default()).await.unwrap());
        assert_eq!(out["classes"].shape, vec![1, 5], "{p}: runs by default");
        assert!(out["classes"].to_i64().unwrap().iter().all(|&c| c >= 0));
    }
    assert_eq!(s.client.model_statistics("resnet50").await.unwrap()[0].inference_count, 2);

    let one = image_input(&cells_png(&[(2, 2, [255, 0, 0])]));
    let two = image_input(&cells_png(&[(2, 2, [255, 0, 0]), (6, 6, [255, 0, 40])]));
    let out = outputs(s.client.infer("gather_if_many", &[("image", &one)], InferOptions::default()).await.unwrap());
    assert_eq!((out["crop_classes"].shape.clone(), out["crop_scores"].shape.clone()), (vec![1, 0, 5], vec![1, 1, 5]));
    let out = outputs(s.client.infer("gather_if_many", &[("image", &two)], InferOptions::default()).await.unwrap());
    assert_eq!(out["crop_classes"].shape, vec![1, 2, 5]);
    assert_eq!(skipped("gather_if_many", "gather_classes").await, 1.0);
}
