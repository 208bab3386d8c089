#!/usr/bin/env bash
# What a filter saves (BENCHMARKS.md): detect_crop_classify as shipped against the same
# pipeline with a filter_boxes node (min_score: BENCH_MIN_SCORE) between NMS and the
# crops, served side by side by one server, driven by `sluice bench` in alternating
# rounds. Prints the boxes each keeps for the test photo, then images/s per round.
#   BENCH_MIN_SCORE=0.345 (keeps 4 of the photo's 8 boxes; the detector has random weights) BENCH_SECONDS=10 BENCH_ROUNDS=2 BENCH_CONCURRENCY=4
#   SLUICE_BIN=/path/to/sluice  use this binary instead of `cargo build --release --locked`
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
sluice=${SLUICE_BIN:-target/release/sluice}
[ -n "${SLUICE_BIN:-}" ] || cargo build -q --release --locked --bin sluice
out=target/bench/filter
mkdir -p "$out"
grpc=127.0.0.1:18201
http=127.0.0.1:18200
repo=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$repo"' EXIT
mkdir -p "$repo/models" "$repo/pipelines"
ln -s "$PWD/models/detector" "$repo/models/detector"
ln -s "$PWD/models/resnet50" "$repo/models/resnet50"
cp pipelines/detect_crop_classify.yaml "$repo/pipelines/"
.venv/bin/python - "$repo" "${BENCH_MIN_SCORE:-0.345}" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from bench_detect import photo
repo, t = Path(sys.argv[1]), sys.argv[2]
(repo / "photo.jpg").write_bytes(photo(1280, 720))
text = (repo / "pipelines/detect_crop_classify.yaml").read_text()
for k in ("boxes", "scores", "classes"):
    text = text.replace(f"from: nms.{k}}}", f"from: keep.{k}}}")
text = text.replace("boxes: nms.boxes}", "boxes: keep.boxes}")
keep = ("  - name: keep\n    op: filter_boxes\n"
        "    inputs: {boxes: nms.boxes, scores: nms.scores, classes: nms.classes}\n"
        f"    params: {{min_score: {t}}}\n")
text = text.replace("  - name: crop\n", keep + "  - name: crop\n")
assert text.count("keep.") == 4
(repo / "pipelines/detect_crop_classify_filtered.yaml").write_text(text)
PY
"$sluice" serve --models "$repo/models" --pipelines "$repo/pipelines" \
  --grpc-addr "$grpc" --http-addr "$http" 2>"$out/server.log" &
pid=$!
for _ in $(seq 150); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.2; done
for p in detect_crop_classify detect_crop_classify_filtered; do
  "$sluice" infer "$p" --url "http://$grpc" --image "$repo/photo.jpg" | .venv/bin/python -c '
import json, sys
out = {o["name"]: o["data"] for o in json.load(sys.stdin)["outputs"]}
print(sys.argv[1], "keeps", out["count"][0], "boxes, scores", [round(s, 3) for s in out["box_scores"]])' "$p"
done
c=${BENCH_CONCURRENCY:-4}
for r in $(seq "${BENCH_ROUNDS:-2}"); do
  for p in detect_crop_classify detect_crop_classify_filtered; do
    "$sluice" bench "$p" --url "http://$grpc" --image "$repo/photo.jpg" --concurrency "$c" \
      --seconds "${BENCH_SECONDS:-10}" --format csv --out "$out/${p}_$r.csv" >/dev/null
    echo "round $r $p: $(tail -n 1 "$out/${p}_$r.csv")"
  done
done
head -n 1 "$out/detect_crop_classify_1.csv"
