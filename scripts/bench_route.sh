#!/usr/bin/env bash
# What a route buys (BENCHMARKS.md): detect_crop_classify (every crop on ResNet-50)
# against detect_route_classify (class 0 on ResNet-50, every other class on the small
# classifier), at its default `min_score` and with a stricter one sent as a request
# parameter. One server serves both; `sluice bench` drives them in alternating rounds.
# Prints the boxes each keeps for the test photo, then images/s per round and how many
# crops each branch of the route classified.
#   BENCH_STRICT=0.345 BENCH_SECONDS=10 BENCH_ROUNDS=2 BENCH_CONCURRENCY=4
#   SLUICE_BIN=/path/to/sluice  use this binary instead of `cargo build --release --locked`
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
sluice=${SLUICE_BIN:-target/release/sluice}
[ -n "${SLUICE_BIN:-}" ] || cargo build -q --release --locked --bin sluice
out=target/bench/route
mkdir -p "$out"
grpc=127.0.0.1:18211
http=127.0.0.1:18210
repo=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$repo"' EXIT
mkdir -p "$repo/models" "$repo/pipelines"
for m in detector resnet50 classifier_small; do ln -s "$PWD/models/$m" "$repo/models/$m"; done
cp pipelines/detect_crop_classify.yaml pipelines/detect_route_classify.yaml "$repo/pipelines/"
.venv/bin/python - "$repo" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from bench_detect import photo
(Path(sys.argv[1]) / "photo.jpg").write_bytes(photo(1280, 720))
PY
"$sluice" serve --models "$repo/models" --pipelines "$repo/pipelines" \
  --grpc-addr "$grpc" --http-addr "$http" 2>"$out/server.log" &
pid=$!
for _ in $(seq 150); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.2; done
strict=${BENCH_STRICT:-0.345}
runs=("detect_crop_classify" "detect_route_classify" "detect_route_classify --param min_score=$strict")
for r in "${runs[@]}"; do
  # shellcheck disable=SC2086 # the run's words: pipeline, then its flags
  "$sluice" infer $r --url "http://$grpc" --image "$repo/photo.jpg" | .venv/bin/python -c '
import json, sys
out = {o["name"]: o["data"] for o in json.load(sys.stdin)["outputs"]}
print(sys.argv[1], "keeps", out["count"][0], "boxes, classes", out["box_classes"])' "$r"
done
c=${BENCH_CONCURRENCY:-4}
for round in $(seq "${BENCH_ROUNDS:-2}"); do
  for k in "${!runs[@]}"; do
    # shellcheck disable=SC2086
    "$sluice" bench ${runs[$k]} --url "http://$grpc" --image "$repo/photo.jpg" --concurrency "$c" \
      --seconds "${BENCH_SECONDS:-10}" --format csv --out "$out/run${k}_$round.csv" >/dev/null
    echo "round $round ${runs[$k]}: $(tail -n 1 "$out/run${k}_$round.csv")"
  done
done
head -n 1 "$out/run0_1.csv"
curl -s "http://$http/metrics" | grep '^sluice_node_branch_items_total'
