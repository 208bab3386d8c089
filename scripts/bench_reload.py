"""The hot-reload benchmark of BENCHMARKS.md: a steady open-loop load (Poisson arrivals at
half the server's capacity) on the `detect` pipeline (JPEG decode -> letterbox -> the
example detector -> NMS) while the repository changes under it, 20 s into a 30 s
measured window. p99 latency (from each request's scheduled send) in the 10 s around
the change ([15 s, 25 s)) against the 10 s before it ([10 s, 20 s)), for four runs in
one go: no change (the noise floor), a rewritten pipeline file, a replaced model file
(the detector loaded and warmed up again next to the serving one, then swapped), and a
replaced file of another, much bigger model in the same repository (ResNet-50, whose
load and warm-up compete with the load for the same cores).
Run by scripts/bench_reload.sh (which builds and sets up first).

Each change runs REPEAT times (default 3): a p99 over 10 s at this rate
is the 16th-slowest of ~1600 requests, and it moves by 10-20% between quiet windows.

usage: bench_reload.py OUT_DIR [REPEAT]     (ONLY=none,detector runs only those changes)
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from bench_detect import detect_pipeline

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 3
root = Path(__file__).resolve().parent.parent
sluice = root / "target/release/sluice"
GRPC, HTTP = "127.0.0.1:18201", "127.0.0.1:18200"
WARMUP, SECONDS, CHANGE_AT = 3, 30, 20.0



def photo(w, h):
    """A JPEG with photo-like content, quality 90."""
    rng = np.random.default_rng(w)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def metrics():
    text = urllib.request.urlopen(f"http://{HTTP}/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        if not line.startswith("#") and " " in line:
            k, v = line.rsplit(" ", 1)
            values[k] = float(v)
    return values


def p99(xs):
    return float(np.percentile(xs, 99)) if xs else float("nan")


tmp = Path(tempfile.mkdtemp())
(tmp / "models").mkdir()
(tmp / "pipelines").mkdir()
shutil.copytree(root / "models/detector", tmp / "models/detector")
shutil.copytree(root / "models/resnet50", tmp / "models/resnet50")
pipeline_file = tmp / "pipelines/detect.yaml"
pipeline_file.write_text(detect_pipeline(8))
image = tmp / "photo.jpg"
image.write_bytes(photo(640, 480))

server = subprocess.Popen(
    [sluice, "serve", "--models", tmp / "models", "--pipelines", tmp / "pipelines",
     "--grpc-addr", GRPC, "--http-addr", HTTP, "--reload", "watch", "--reload-debounce-ms", "500"],
    stdout=subprocess.DEVNULL, stderr=open(out / "server.log", "w"),
)
try:
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"http://{HTTP}/v2/health/ready").status == 200:
                break
        except OSError:
            time.sleep(0.1)
    bench = [sluice, "bench", "--url", f"http://{GRPC}", "detect", "--image", image, "--format", "json"]
    cap = json.loads(subprocess.run(bench + ["--concurrency", "4", "--seconds", "5"],
                                    check=True, capture_output=True, text=True).stdout)
    capacity = cap[0]["throughput"]
    rate = round(capacity * 0.5)
    print(f"capacity {capacity:.0f} req/s at concurrency 4; offering {rate} req/s (Poisson)")

    def replace_model(name):
        # A copy renamed over the file: new inode, same weights, as a deploy tool does it.
        src = tmp / "models" / name / "model.onnx"
        shutil.copyfile(src, src.with_suffix(".partial"))
        src.with_suffix(".partial").rename(src)

    changes = [
        ("none (noise floor)", lambda: None, repeat),
        # Alternating between two texts, so every run is a change.
        ("pipeline file rewritten", lambda: pipeline_file.write_text(
            detect_pipeline(9 if "max_detections: 8" in pipeline_file.read_text() else 8)), repeat),
        ("detector model file replaced", lambda: replace_model("detector"), repeat),
        ("another model (ResNet-50) replaced", lambda: replace_model("resnet50"), repeat),
    ]
    only = [w for w in os.environ.get("ONLY", "").split(",") if w]  # e.g. ONLY=none,detector
    changes = [c for c in changes if not only or any(w in c[0] for w in only)]
    runs = [(name, change) for name, change, n in changes for _ in range(n)]
    rows = []
    for name, change in runs:
        before = metrics()
        samples = out / f"samples_{len(rows)}.csv"
        started = time.monotonic()
        proc = subprocess.Popen(
            bench + ["--rate", str(rate), "--poisson", "--warmup", str(WARMUP), "--seconds", str(SECONDS),
                     "--samples", samples],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        time.sleep(WARMUP + CHANGE_AT - (time.monotonic() - started))
        change()
        stdout, _ = proc.communicate()
        assert proc.returncode == 0, stdout
        after = metrics()
        delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)
        reloads = delta('sluice_reloads_total{outcome="ok"}')
        reload_s = delta("sluice_reload_duration_seconds_sum") / reloads if reloads else 0.0
        loads = sum(delta(f'sluice_model_loads_total{{model="{m}",outcome="ok",version="1"}}')
                    for m in ("detector", "resnet50"))
        with open(samples) as f:
            rs = [(float(r["at_s"]), float(r["latency_ms"]), r["ok"] == "1") for r in csv.DictReader(f)]
        errors = sum(1 for _, _, ok in rs if not ok)
        win = lambda a, b: [lat for t, lat, ok in rs if a <= t < b and ok]
        p_before, p_around = p99(win(CHANGE_AT - 10, CHANGE_AT)), p99(win(CHANGE_AT - 5, CHANGE_AT + 5))
        step = json.loads(stdout)[0]
        rows.append((name, step["throughput"], errors, reloads, loads, reload_s * 1000, p_before, p_around))
        print(rows[-1])

    lines = [
        f"Offered load: {rate} req/s Poisson (half of the {capacity:.0f} req/s measured at concurrency 4), "
        f"{SECONDS} s measured, change at {CHANGE_AT:.0f} s.",
        "",
        "| change at 20 s | req/s | failed | reloads | model loads | reload took ms "
        "| p99 ms [10,20) s | p99 ms [15,25) s | around / before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, thr, err, rel, loads, took, pb, pa in rows:
        lines.append(f"| {name} | {thr:.1f} | {err} | {rel:.0f} | {loads:.0f} | {took:.0f} | {pb:.2f} | {pa:.2f} "
                     f"| {pa / pb:.2f} |")
    lines += ["", "| change | runs | median around / before |", "|---|---|---|"]
    for name, _, n in changes:
        ratios = [pa / pb for r_name, *_, pb, pa in rows if r_name == name]
        lines.append(f"| {name} | {n} | {float(np.median(ratios)):.2f} |")
    table = "\n".join(lines)
    (out / "reload.md").write_text(table + "\n")
    print(table)
finally:
    server.terminate()
    server.wait()
    shutil.rmtree(tmp, ignore_errors=True)
