"""What `fold_graph` buys per model (BENCHMARKS.md): each OCR model as shipped and as
`sluice fold` writes it, in ONNX Runtime on one thread, runs interleaved in one process
on the same input; the largest output difference is printed beside the times.

usage: bench_fold.py OUT_DIR [ROUNDS]   (needs target/release/sluice and the set-up models)
"""
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

root = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
out.mkdir(parents=True, exist_ok=True)
# What the OCR pipeline runs: a rendered page as the detector sees it (shorter side 736,
# multiples of 32, BGR in [-1, 1]); batches of 8 text lines for the recogniser and 16 for
# the direction classifier, text-like (dark strokes on a light background).
subprocess.run([sys.executable, root / "tests/python/render_text.py", out / "page", "--random", "1"], check=True,
               stdout=subprocess.DEVNULL)
page = cv2.imread(str(out / "page/random_000.png"))
h, w = page.shape[:2]
scale = 736 / min(h, w)
page = cv2.resize(page, (round(w * scale / 32) * 32, round(h * scale / 32) * 32)).astype(np.float32) / 127.5 - 1
rng = np.random.default_rng(0)
lines = lambda shape: np.where(rng.random(shape) < 0.2, -0.8, 0.9).astype(np.float32)  # noqa: E731
cases = [("ocr_det", page.transpose(2, 0, 1)[None].copy()), ("ocr_rec", lines([8, 3, 48, 320])),
         ("ocr_cls", lines([16, 3, 48, 192]))]
print("| model | input | as shipped ms | folded ms | folded / shipped | largest output difference / largest output |")
print("|---|---|---|---|---|---|")
for name, x in cases:
    src = root / f"models/{name}/model.onnx"
    folded = out / f"{name}.onnx"
    subprocess.run([root / "target/release/sluice", "fold", src, folded], check=True, stdout=subprocess.DEVNULL)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (src, folded)]
    feed = {sessions[0].get_inputs()[0].name: x}
    outs = [s.run(None, feed)[0] for s in sessions]
    times = [[], []]
    for r in range(rounds):
        # Alternate which goes first, so neither always runs on a warmer cache.
        for i, s in (list(enumerate(sessions)) if r % 2 == 0 else list(enumerate(sessions))[::-1]):
            t = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t)
    shipped, fast = (np.median(t) * 1000 for t in times)
    print(f"| {name} | {list(x.shape)} | {shipped:.1f} | {fast:.1f} | {fast / shipped:.2f} | {np.abs(outs[0] - outs[1]).max():.1e} / {np.abs(outs[0]).max():.2f} |")

# Where the detector's time goes, by op type, before and after (ONNX Runtime's profiler).
print()
print("| detector op type | share of kernel time, as shipped | share, folded |")
print("|---|---|---|")
shares = []
for path in (root / "models/ocr_det/model.onnx", out / "ocr_det.onnx"):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out / "profile")
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: cases[0][1]})
    events = json.loads(Path(s.end_profiling()).read_text())
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    shares.append({op: t / total for op, t in by_op.items()})
for op in sorted(set(shares[0]) | set(shares[1]), key=lambda o: -shares[0].get(o, 0)):
    if max(shares[0].get(op, 0), shares[1].get(op, 0)) >= 0.01:
        print(f"| {op} | {100 * shares[0].get(op, 0):.0f}% | {100 * shares[1].get(op, 0):.0f}% |")
