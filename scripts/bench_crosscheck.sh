#!/usr/bin/env bash
# Cross-check of `sluice bench` against Triton's perf_analyzer (BENCHMARKS.md): the same
# models (the tiny y = 2x + 1, where the server dominates, and the YOLO-shaped detector,
# with 1.2 MB requests), zero-filled batch-1 requests, the same concurrencies, one tool
# after the other against one server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
out=target/bench/crosscheck
mkdir -p "$out"
grpc=127.0.0.1:18301
http=127.0.0.1:18300
secs=${BENCH_SECONDS:-5}
repo=$(mktemp -d)
mkdir -p "$repo/detector"
ln -s "$PWD/models/detector/model.onnx" "$repo/detector/model.onnx"
cp models/detector/model.yaml "$repo/detector/model.yaml"
.venv/bin/python scripts/gen_tiny.py "$repo/tiny" >/dev/null
target/release/sluice serve --models "$repo" --pipelines "$repo/none" --grpc-addr "$grpc" --http-addr "$http" 2>"$out/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$repo"' EXIT
for _ in $(seq 100); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.2; done
for m in tiny detector; do
  for c in 1 4; do
    target/release/sluice bench "$m" --url "http://$grpc" --concurrency "$c" --seconds "$secs" --warmup 2 \
      --zero-data --format csv --out "$out/sluice_${m}_c$c.csv" >/dev/null 2>&1
    .sluice/bin/perf_analyzer -i grpc -u "$grpc" -m "$m" -b 1 --input-data zero --concurrency-range "$c:$c" \
      -p $((secs * 1000)) -f "$out/pa_${m}_c$c.csv" >"$out/pa_${m}_c$c.log"
  done
done
.venv/bin/python - "$out" <<'PY'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| model | concurrency | sluice bench req/s | perf_analyzer infer/s | ratio | sluice bench p50 ms | perf_analyzer p50 ms | ratio |")
print("|---|---|---|---|---|---|---|---|")
for m in ("tiny", "detector"):
    for c in (1, 4):
        s = next(csv.DictReader(open(out / f"sluice_{m}_c{c}.csv")))
        p = next(csv.DictReader(open(out / f"pa_{m}_c{c}.csv")))
        st, pt = float(s["req/s"]), float(p["Inferences/Second"])
        sp, pp = float(s["p50 ms"]), float(p["p50 latency"]) / 1000
        print(f"| {m} | {c} | {st:.1f} | {pt:.1f} | {st / pt:.3f} | {sp:.3f} | {pp:.3f} | {sp / pp:.3f} |")
PY
