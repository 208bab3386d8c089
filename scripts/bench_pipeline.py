"""The pipelines benchmark of BENCHMARKS.md: pipelines with the split layout (CPU ops on
their pool, the model on its own instance thread and batcher) against the same steps done
serially inside one worker (`layout: fused`), at the same thread counts, under saturating
load from Triton's perf_analyzer. Also reads, from the server's metrics, how busy the
model was. Two pipelines: `classify` (the example: ResNet-50, whose CPU compute dwarfs
pre-processing) and `detect` (decode -> letterbox -> the example detector -> NMS, where
model and pre-processing cost about the same, as with a GPU model). Run by
scripts/bench_pipeline.sh (which builds and sets up first).

usage: bench_pipeline.py OUT_DIR [SECONDS]
"""
import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_detect import detect_pipeline, photo

out = Path(sys.argv[1])
secs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
out.mkdir(parents=True, exist_ok=True)
root = Path(__file__).resolve().parent.parent
GRPC, HTTP = "127.0.0.1:18101", "127.0.0.1:18100"
CONCURRENCY = 4


def metric(name, label):
    text = urllib.request.urlopen(f"http://{HTTP}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


PIPELINES = {"classify": ("resnet50", None), "detect": ("detector", detect_pipeline())}


def run(pipeline, layout, pool_threads, image, tag):
    model, text = PIPELINES[pipeline]
    repo = Path(tempfile.mkdtemp())
    (repo / "models" / model).mkdir(parents=True)
    (repo / "pipelines").mkdir()
    os.symlink(root / f"models/{model}/model.onnx", repo / f"models/{model}/model.onnx")
    # One ORT thread: the model's share of the thread budget is one thread in both layouts.
    (repo / f"models/{model}/model.yaml").write_text(
        "max_batch_size: 8\nintra_op_threads: 1\ndynamic_batching:\n  max_queue_delay_us: 2000\n"
        "max_queue_size: 128\nwarmup:\n  - batch_size: 1\n")
    text = text or (root / f"pipelines/{pipeline}.yaml").read_text()
    (repo / f"pipelines/{pipeline}.yaml").write_text(f"layout: {layout}\n{text}")
    data = repo / "input.json"
    data.write_text(json.dumps({"data": [{"image": {"b64": base64.b64encode(struct.pack("<I", len(image)) + image).decode(), "shape": [1]}}]}))
    log = open(out / f"server_{tag}.log", "w")
    server = subprocess.Popen(
        [root / "target/release/sluice", "serve", "--models", repo / "models", "--pipelines", repo / "pipelines",
         "--grpc-addr", GRPC, "--http-addr", HTTP, "--pool", f"default={pool_threads}:256",
         "--ort-dylib", root / ".sluice/lib/libonnxruntime.so"], stdout=log, stderr=log)
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://{HTTP}/v2/health/ready").status == 200:
                    break
            except Exception:
                time.sleep(0.2)
        label = f'model="{model}"'
        busy0, t0 = metric("sluice_model_busy_seconds_total", label), time.time()
        csv_path = out / f"{tag}.csv"
        subprocess.run(
            [root / ".sluice/bin/perf_analyzer", "-i", "grpc", "-u", GRPC, "-m", pipeline, "-b", "1",
             "--input-data", data, "--shape", "image:1", "--concurrency-range", f"{CONCURRENCY}:{CONCURRENCY}",
             "-p", str(secs * 1000), "-f", csv_path], check=True, stdout=open(out / f"{tag}.log", "w"))
        busy = (metric("sluice_model_busy_seconds_total", label) - busy0) / (time.time() - t0)
        row = next(csv.DictReader(open(csv_path)))
        ms = lambda k: float(row[k]) / 1000
        return float(row["Inferences/Second"]), ms("p50 latency"), ms("p90 latency"), ms("p99 latency"), busy
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(repo)


print(f"models run with 1 ORT thread, max batch 8; perf_analyzer concurrency {CONCURRENCY}, {secs} s windows")
print()
print("| pipeline | image | CPU pool threads | layout | images/s | p50 ms | p90 ms | p99 ms | model busy | split / fused |")
print("|---|---|---|---|---|---|---|---|---|---|")
for pipeline in ("classify", "detect"):
    for (w, h) in [(640, 480), (1920, 1080)]:
        image = photo(w, h)
        for threads in (1, 2):
            res = {}
            for layout in ("fused", "split"):
                res[layout] = run(pipeline, layout, threads, image, f"{pipeline}_{w}x{h}_t{threads}_{layout}")
            for layout in ("fused", "split"):
                ips, p50, p90, p99, busy = res[layout]
                ratio = f"{res['split'][0] / res['fused'][0]:.2f}" if layout == "split" else ""
                print(f"| {pipeline} | {w}x{h} JPEG ({len(image) // 1024} KB) | {threads} | {layout} | {ips:.1f} | {p50:.0f} "
                      f"| {p90:.0f} | {p99:.0f} | {busy:.2f} | {ratio} |", flush=True)
