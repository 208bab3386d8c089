#!/usr/bin/env bash
# What OpenCV's reduced JPEG decode buys (BENCHMARKS.md): the `detect` pipeline (decode
# -> letterbox 320 -> the example detector -> NMS) four ways, served side by side by one
# server built with `--features opencv`: the pure-Rust ops (`rust`), the same steps on
# OpenCV (`opencv`), OpenCV with an INTER_AREA letterbox (`opencv_area`), and OpenCV
# decoding the JPEG at a DCT scale (`reduced`: max_side 320, letterbox with INTER_AREA).
# For 1920x1080 and 4032x3024 photo-like JPEGs, prints how far each pipeline's boxes are
# from the pure-Rust ones (and the reduced one's from opencv_area's: what the reduction
# alone moves), then images/s per round from `sluice bench`, the pipelines alternating.
#   BENCH_SECONDS=10 BENCH_ROUNDS=2 BENCH_CONCURRENCY=4
#   SLUICE_BIN=/path/to/sluice  a binary built with the opencv feature, instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_OPENCV=1 scripts/setup.sh >/dev/null
sluice=${SLUICE_BIN:-target/release/sluice}
[ -n "${SLUICE_BIN:-}" ] || cargo build -q --release --locked -p sluice-cli --features opencv
out=target/bench/opencv
mkdir -p "$out"
grpc=127.0.0.1:18211
http=127.0.0.1:18210
repo=$(mktemp -d)
trap 'kill ${pid:-} 2>/dev/null; rm -rf "$repo"' EXIT
mkdir -p "$repo/models" "$repo/pipelines"
ln -s "$PWD/models/detector" "$repo/models/detector"
.venv/bin/python - "$repo" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from bench_detect import detect_pipeline, photo
repo = Path(sys.argv[1])
for w, h in [(1920, 1080), (4032, 3024)]:
    (repo / f"photo_{w}x{h}.jpg").write_bytes(photo(w, h))
text = detect_pipeline()
decode = "  - {name: decode, op: decode_image, inputs: {bytes: image}}\n"
letterbox = "params: {mode: letterbox, width: 320, height: 320, pad: 114}"
assert decode in text and letterbox in text
variants = {
    "detect_rust": text,
    "detect_opencv": text.replace(decode, decode.replace("}}\n", "}, params: {engine: opencv}}\n"))
    .replace(letterbox, letterbox.replace("114}", "114, engine: opencv}")),
    "detect_opencv_area": text.replace(decode, decode.replace("}}\n", "}, params: {engine: opencv}}\n"))
    .replace(letterbox, letterbox.replace("114}", "114, engine: opencv, interpolation: area}")),
    "detect_reduced": text.replace(decode, decode.replace("}}\n", "}, params: {engine: opencv, max_side: 320}}\n"))
    .replace(letterbox, letterbox.replace("114}", "114, engine: opencv, interpolation: area}")),
}
for name, t in variants.items():
    (repo / "pipelines" / f"{name}.yaml").write_text(t)
PY
"$sluice" serve --models "$repo/models" --pipelines "$repo/pipelines" \
  --grpc-addr "$grpc" --http-addr "$http" 2>"$out/server.log" &
pid=$!
for _ in $(seq 150); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.2; done
pipelines=(detect_rust detect_opencv detect_opencv_area detect_reduced)
for size in 1920x1080 4032x3024; do
  for p in "${pipelines[@]}"; do
    "$sluice" infer "$p" --url "http://$grpc" --image "$repo/photo_$size.jpg" >"$out/boxes_${p}_$size.json"
  done
  .venv/bin/python - "$out" "$size" <<'PY'
import json, sys
out, size = sys.argv[1], sys.argv[2]
def boxes(p):
    o = {x["name"]: x for x in json.load(open(f"{out}/boxes_{p}_{size}.json"))["outputs"]}
    d = o["boxes"]["data"]
    return [d[i:i + 4] for i in range(0, len(d), 4)]
def iou(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0])); h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / u if u > 0 else 0
for base, p in [("detect_rust", "detect_opencv"), ("detect_rust", "detect_opencv_area"), ("detect_rust", "detect_reduced"),
                ("detect_opencv_area", "detect_reduced")]:
    ref, got, moved, unmatched = boxes(base), boxes(p), [], 0
    for r in ref:
        best = max(got, key=lambda g: iou(r, g), default=None)
        if best is None or iou(r, best) < 0.5:
            unmatched += 1
        else:
            moved.append(max(abs(a - b) for a, b in zip(r, best)))
    print(f"{size} {p}: {len(got)} boxes vs {len(ref)} from {base}; {len(moved)} matched (IoU >= 0.5), "
          f"corners moved at most {max(moved, default=0):.1f} px (mean of the worst corner {sum(moved) / max(len(moved), 1):.1f} px), "
          f"{unmatched} unmatched")
PY
done
c=${BENCH_CONCURRENCY:-4}
for r in $(seq "${BENCH_ROUNDS:-2}"); do
  for size in 1920x1080 4032x3024; do
    for p in "${pipelines[@]}"; do
      "$sluice" bench "$p" --url "http://$grpc" --image "$repo/photo_$size.jpg" --concurrency "$c" \
        --seconds "${BENCH_SECONDS:-10}" --format csv --out "$out/${p}_${size}_$r.csv" >/dev/null
      echo "round $r $size $p: $(tail -n 1 "$out/${p}_${size}_$r.csv")"
    done
  done
done
head -n 1 "$out/detect_rust_1920x1080_1.csv"
