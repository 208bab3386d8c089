//! The example's binary end to end: `sluice-custom serve` serves a pipeline that ends in
//! the crate's own op, answers over the wire with the project's client, and
//! `sluice-custom ops` / `check` know the op.

use sluice_client::{Client, InferOptions, Tensor};
use sluice_ops::Image;
use sluice_tests::{ort_dylib, png, tiny_detector, Repo};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn sluice_custom() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice-custom"))
}

/// A repository with the stand-in detector and the example's pipeline file.
fn repo() -> Repo {
    let repo = Repo::new();
    repo.add("detector", &tiny_detector(), "max_batch_size: 4\n");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/detect_normalized.yaml");
    repo.pipeline("detect_normalized", &std::fs::read_to_string(file).unwrap());
    repo
}

/// Kills the server when the test ends, passed or not.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_op_answers_over_the_wire() {
    let repo = repo();
    let child = sluice_custom()
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--models"])
        .arg(repo.path())
        .arg("--pipelines")
        .arg(repo.pipelines_path())
        .arg("--ort-dylib")
        .arg(ort_dylib())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed when the test ends, whatever happens below.
    let mut server = Server(child);
    let stdout = server.0.stdout.take().unwrap();
    // The serving line, or a failure within a minute rather than a hung test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the server prints its addresses");
    // "sluice serving gRPC on 127.0.0.1:PORT and HTTP on 127.0.0.1:PORT"
    let grpc = line.split_whitespace().nth(4).unwrap_or_else(|| panic!("not the serving line: {line}"));
    let client = Client::connect(format!("http://{grpc}")).await.unwrap();

    // A 320x320 picture with one red cell of the detector's grid: the box (64, 32)-(96, 64).
    let mut img = Image::filled(320, 320, [0, 0, 0]);
    for y in 32..64 {
        for x in 64..96 {
            img.data[(y * 320 + x) * 3] = 255;
        }
    }
    let input = sluice_client::encoded_images(&[png(&img)]);
    let out: HashMap<String, Tensor> = client
        .infer("detect_normalized", &[("image", &input)], InferOptions::default())
        .await
        .unwrap()
        .into_iter()
        .collect();
    let boxes = out["boxes"].to_f32().unwrap();
    assert_eq!(out["boxes"].shape, vec![1, 1, 4]);
    let want = [0.25, 0.15, 0.1, 0.1]; // centre (80, 48), 32x32, over 320x320
    assert!(boxes.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{boxes:?}");
}

/// `sluice-custom check` on the repository.
fn run_check(repo: &Repo) -> std::process::Output {
    sluice_custom()
        .arg("check")
        .arg("--models")
        .arg(repo.path())
        .arg("--pipelines")
        .arg(repo.pipelines_path())
        .output()
        .unwrap()
}

#[test]
fn the_help_names_this_binary() {
    let help = sluice_custom().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Usage: sluice-custom "), "{text}");
    let serve = sluice_custom().args(["serve", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&serve.stdout).contains("Usage: sluice-custom serve"));
}

#[test]
fn ops_and_check_know_the_custom_op() {
    let ops = sluice_custom().arg("ops").output().unwrap();
    let text = String::from_utf8_lossy(&ops.stdout);
    assert!(text.contains("normalize_boxes: boxes [n,4] in the picture's pixels"), "{text}");
    assert!(text.contains("param format (default xyxy)") && text.contains("decode_image:"), "{text}");

    let repo = repo();
    let check = run_check(&repo);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}{}", String::from_utf8_lossy(&check.stderr));
    assert!(stdout.contains("ok     pipeline detect_normalized"), "{stdout}");
    // A bad param of the custom op fails the check, naming the file, line and node.
    repo.pipeline(
        "typo",
        &std::fs::read_to_string(repo.pipelines_path().join("detect_normalized.yaml"))
            .unwrap()
            .replace("format: cxcywh", "format: yolo"),
    );
    let check = run_check(&repo);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success());
    assert!(
        stdout.contains("typo.yaml:23: node 'relative': op 'normalize_boxes': bad params: unknown variant `yolo`"),
        "{stdout}"
    );
}
