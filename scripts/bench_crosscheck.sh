#!/usr/bin/env bash
# Cross-check of `sluice bench` against Triton's perf_analyzer (BENCHMARKS.md): the same
# models (ResNet-50, where the server's work dominates a request; the tiny y = 2x + 1 and
# the YOLO-shaped detector with 1.2 MB requests, where each client's own per-request cost
# shows), zero-filled batch-1 requests, the same concurrencies, one tool after the other
# against one server. SERVER_CPUS / CLIENT_CPUS (taskset lists) keep the clients off the
# server's cores; MODELS picks models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
out=target/bench/crosscheck
rm -rf "$out"
mkdir -p "$out"
grpc=127.0.0.1:18301
http=127.0.0.1:18300
secs=${BENCH_SECONDS:-5}
repo=$(mktemp -d)
models=${MODELS:-tiny detector resnet50}
concurrency=${CONCURRENCY:-1 2 4}
for m in detector resnet50; do
  case " $models " in *" $m "*) ;; *) continue ;; esac
  mkdir -p "$repo/$m"
  ln -s "$PWD/models/$m/model.onnx" "$repo/$m/model.onnx"
  cp "models/$m/model.yaml" "$repo/$m/model.yaml"
done
.venv/bin/python scripts/gen_tiny.py "$repo/tiny" >/dev/null
# On a host with cores to spare, give the clients their own: SERVER_CPUS=0-7 CLIENT_CPUS=8-15.
srv_cpus=${SERVER_CPUS:-}
cli_cpus=${CLIENT_CPUS:-}
# shellcheck disable=SC2086 # ${x:+taskset -c $x} is meant to split into words
${srv_cpus:+taskset -c $srv_cpus} target/release/sluice serve --models "$repo" --pipelines "$repo/none" --grpc-addr "$grpc" --http-addr "$http" 2>"$out/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$repo"' EXIT
for _ in $(seq 100); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.2; done
for m in $models; do
  for c in $concurrency; do
    # shellcheck disable=SC2086
    ${cli_cpus:+taskset -c $cli_cpus} target/release/sluice bench "$m" --url "http://$grpc" --concurrency "$c" --seconds "$secs" --warmup 2 \
      --zero-data --format csv --out "$out/sluice_${m}_c$c.csv" >/dev/null 2>&1
    # shellcheck disable=SC2086
    ${cli_cpus:+taskset -c $cli_cpus} .sluice/bin/perf_analyzer -i grpc -u "$grpc" -m "$m" -b 1 --input-data zero --concurrency-range "$c:$c" \
      -p $((secs * 1000)) -f "$out/pa_${m}_c$c.csv" >"$out/pa_${m}_c$c.log"
  done
done
.venv/bin/python - "$out" "$models" "$concurrency" <<'PY'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
models, concurrency = sys.argv[2].split(), [int(c) for c in sys.argv[3].split()]
num = lambda v: 0.0 if v in ("", "-") else float(v)
print("| model | concurrency | sluice bench req/s | perf_analyzer infer/s | ratio | sluice bench p50 ms | perf_analyzer p50 ms | ratio | server ms/request under sluice bench / perf_analyzer |")
print("|---|---|---|---|---|---|---|---|---|")
for m in models:
    for c in concurrency:
        if not (out / f"sluice_{m}_c{c}.csv").exists():
            continue
        s = next(csv.DictReader(open(out / f"sluice_{m}_c{c}.csv")))
        p = next(csv.DictReader(open(out / f"pa_{m}_c{c}.csv")))
        st, pt = float(s["req/s"]), float(p["Inferences/Second"])
        sp, pp = float(s["p50 ms"]), float(p["p50 latency"]) / 1000
        # What the server itself spent per request (its v2 statistics), as each tool read it.
        ss = num(s["server queue ms"]) + num(s["server compute ms"])
        ps = sum(float(p[k]) for k in ("Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output")) / 1000
        print(f"| {m} | {c} | {st:.1f} | {pt:.1f} | {st / pt:.3f} | {sp:.3f} | {pp:.3f} | {sp / pp:.3f} | {ss:.3f} / {ps:.3f} |")
PY
