#!/usr/bin/env bash
# The serving-core benchmark of BENCHMARKS.md, side by side in one run:
#  1. ResNet-50 on one ONNX Runtime session called directly (ort_bench), batch 1..8;
#  2. the same model through sluice with dynamic batching, batch-1 requests from
#     Triton's perf_analyzer over gRPC at concurrency 1..16;
#  3. what sluice adds per request on a tiny model (server time minus compute).
# Results go to target/bench/ and a Markdown summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice --example ort_bench
out=target/bench
mkdir -p "$out"
secs=${BENCH_SECONDS:-10}
grpc=127.0.0.1:18001
http=127.0.0.1:18000

target/release/examples/ort_bench models/resnet50 --batches 1,2,4,8 --seconds "$secs" | tee "$out/raw.md"

repo=$(mktemp -d)
ln -s "$PWD/models/resnet50" "$repo/resnet50"
.venv/bin/python scripts/gen_tiny.py "$repo/tiny"
target/release/sluice serve --models "$repo" --grpc-addr "$grpc" --http-addr "$http" 2>"$out/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$repo"' EXIT
for _ in $(seq 100); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.2; done

pa() { .sluice/bin/perf_analyzer -i grpc -u "$grpc" -b 1 -p $((secs * 1000 / 2)) -s 20 -r 6 "$@"; }
for c in 1 2 4 8 16; do
  pa -m resnet50 --concurrency-range "$c:$c" -f "$out/resnet50_c$c.csv" >"$out/resnet50_c$c.log"
done
curl -s "http://$http/v2/models/resnet50/stats" >"$out/resnet50_stats.json"
pa -m tiny --concurrency-range 1:1 -f "$out/tiny_c1.csv" >"$out/tiny_c1.log"
curl -s "http://$http/metrics" >"$out/metrics.txt"
curl -s "http://$http/v2/models/tiny/stats" >"$out/tiny_stats.json"
.venv/bin/python scripts/bench_report.py "$out"
