#!/usr/bin/env bash
# Per-request cost by protocol, side by side in one run: the tiny model (y = 2x + 1) at
# concurrency 1 through perf_analyzer over gRPC (responses plain, the default), over gRPC
# with --grpc-compress-responses (perf_analyzer accepts gzip on every call, as
# tritonclient does), and over HTTP; two alternated rounds. Server CPU per request is
# read from /proc over each measurement. Markdown to stdout; logs in target/bench/protocols.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
out=target/bench/protocols
mkdir -p "$out"
repo=$(mktemp -d)
.venv/bin/python scripts/gen_tiny.py "$repo/tiny" >/dev/null
grpc=127.0.0.1:19001
http=127.0.0.1:19000
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$repo"' EXIT
served() { curl -s "http://$http/v2/models/tiny/stats" | .venv/bin/python -c \
  'import json,sys; print(json.load(sys.stdin)["model_stats"][0]["inference_stats"]["success"]["count"])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
one() { # label protocol [serve flags...]
  local label=$1 proto=$2
  shift 2
  target/release/sluice serve --models "$repo" --pipelines /nonexistent --grpc-addr $grpc --http-addr $http \
    --ort-dylib "$PWD/.sluice/lib/libonnxruntime.so" "$@" >/dev/null 2>"$out/$label.server.log" &
  pid=$!
  for _ in $(seq 100); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.1; done
  local url=$grpc
  [ "$proto" = http ] && url=$http
  local t0 r0 t1 r1
  t0=$(cpu_ticks $pid); r0=$(served)
  .sluice/bin/perf_analyzer -i "$proto" -u "$url" -m tiny -b 1 --concurrency-range 1:1 -p 2000 -s 50 -r 10 \
    -f "$out/$label.csv" >"$out/$label.log" 2>&1 || true
  t1=$(cpu_ticks $pid); r1=$(served)
  kill $pid; wait $pid 2>/dev/null || true
  pid=
  .venv/bin/python - "$out/$label.csv" "$label" "$t0" "$t1" "$r0" "$r1" <<'PY'
import csv, os, sys
path, label, t0, t1, r0, r1 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
if not os.path.exists(path):
    print(f"| {label} | no stable measurement | | |"); sys.exit()
row = next(csv.DictReader(open(path)))
cpu_ms = (t1 - t0) / os.sysconf("SC_CLK_TCK") * 1000 / max(r1 - r0, 1)
print(f"| {label} | {float(row['Inferences/Second']):.0f} | {float(row['p50 latency']):.0f} | {cpu_ms:.3f} |")
PY
}
echo "| run | infer/s | p50 us | server CPU ms/request |"
echo "|---|---|---|---|"
for round in 1 2; do
  one "grpc-$round" grpc
  one "grpc-gzip-$round" grpc --grpc-compress-responses
  one "http-$round" http
done
