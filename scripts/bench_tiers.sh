#!/usr/bin/env bash
# What splitting the CPU and model tiers costs and buys (BENCHMARKS.md).
#
# 1. The hop: a tiny model (a few µs of compute) called directly and through a second
#    sluice that serves it as `backend: remote`, on loopback, one request at a time:
#    the difference in p50 is what the remote call adds per batch. Twice: all processes
#    sharing all cores, and the model tier on a core of its own (as on its own host).
# 2. The split: detect_crop_classify with the example models, all on one host (a
#    container limited to 2 CPUs) against a CPU tier (1 CPU: decode, crops, NMS) and a
#    model tier (1 CPU: the detector and ResNet-50) on a private Docker network, the
#    same total cores. `sluice bench` from outside at concurrency 4; the model tier's
#    busy fraction from its metrics.
#   BENCH_SECONDS=20 BENCH_CONCURRENCY=4 BENCH_HOP_ONLY=1 (part 1 only)
#   SLUICE_BIN=/path/to/sluice  use this binary instead of `cargo build --release --locked`
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
sluice=${SLUICE_BIN:-target/release/sluice}
[ -n "${SLUICE_BIN:-}" ] || cargo build -q --release --locked --bin sluice
export SLUICE_BIN=$PWD/$sluice
[ "${sluice#/}" != "$sluice" ] && export SLUICE_BIN=$sluice
out=target/bench/tiers
mkdir -p "$out"
secs=${BENCH_SECONDS:-20}
conc=${BENCH_CONCURRENCY:-4}
work=$(mktemp -d)
net=sluice-bench-tiers
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  docker rm -f "$net-one" "$net-mt" "$net-cpu" >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_ready() { for _ in $(seq 600); do curl -sf "http://$1/v2/health/ready" >/dev/null && return; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }
remote_yaml() { # endpoint-or-dns key, value, batch delay in µs
  printf 'backend: remote\ninstances: 2\ndynamic_batching:\n  max_queue_delay_us: %s\nremote:\n  %s: %s\n' "$3" "$1" "$2"
}

echo "== 1. the hop, loopback, concurrency 1"
mkdir -p "$work/tiny/models" "$work/hop/models/tiny" "$work/none"
.venv/bin/python scripts/gen_tiny.py "$work/tiny/models/tiny" >/dev/null
# No batching delay: one request is one call, so the difference is the hop alone.
remote_yaml endpoints '["127.0.0.1:18301"]' 0 > "$work/hop/models/tiny/model.yaml"
# The remote calls' own latency, from the CPU tier's sluice_remote_duration_seconds
# histogram over one run: p50 interpolated within its (fine, below 1 ms) buckets.
buckets() { curl -s http://127.0.0.1:18310/metrics | grep '^sluice_remote_duration_seconds_bucket' > "$1"; }
call_p50() {
  python3 - "$1" "$2" <<'PY'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        le = re.search(r'le="([^"]+)"', line).group(1)
        out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out
a, b = read(sys.argv[1]), read(sys.argv[2])
cum = sorted((le, b[le] - a.get(le, 0.0)) for le in b)
total = cum[-1][1]
prev_le, prev_n = 0.0, 0.0
for le, n in cum:
    if n >= total / 2:
        frac = (total / 2 - prev_n) / (n - prev_n) if n > prev_n else 0.0
        print(f"remote call p50 {1e3 * (prev_le + frac * (le - prev_le)):.3f} ms over {int(total)} calls; "
              f"{100 * dict(cum).get(0.00015, 0) / total:.0f}% within 0.150 ms")
        break
    prev_le, prev_n = le, n
PY
}
# Two layouts: every process on every core, and the model tier on a core of its own
# (the CPU tier and the load generator on the others), which stands in for the model
# tier on a host of its own, the deployment this is for.
# CPU ids as this process may use them (a container's need not start at 0).
read -r all own rest < <(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); j = lambda x: ",".join(map(str, x)); print(j(c), c[-1], j(c[:-1]) or "-")')
layouts="shared:$all:$all"
[ "$rest" != - ] && layouts="$layouts own-core:$own:$rest"
for layout in $layouts; do
  IFS=: read -r name mt_cpus rest_cpus <<<"$layout"
  taskset -c "$mt_cpus" "$SLUICE_BIN" serve --models "$work/tiny/models" --pipelines "$work/none" \
    --grpc-addr 127.0.0.1:18301 --http-addr 127.0.0.1:18300 2>"$out/tiny_$name.log" &
  pids+=($!)
  wait_ready 127.0.0.1:18300
  taskset -c "$rest_cpus" "$SLUICE_BIN" serve --models "$work/hop/models" --pipelines "$work/none" \
    --grpc-addr 127.0.0.1:18311 --http-addr 127.0.0.1:18310 2>"$out/hop_$name.log" &
  pids+=($!)
  wait_ready 127.0.0.1:18310
  for round in 1 2; do
    for t in direct:18301 remote:18311; do
      [ "${t%%:*}" = remote ] && buckets "$work/b0"
      csv="$out/hop_${name}_${t%%:*}_$round.csv"
      taskset -c "$rest_cpus" "$SLUICE_BIN" bench tiny --url "http://127.0.0.1:${t#*:}" --concurrency 1 --seconds 10 \
        --format csv --out "$csv" >/dev/null 2>&1
      echo "$name round $round ${t%%:*}: $(tail -n 1 "$csv")"
      if [ "${t%%:*}" = remote ]; then buckets "$work/b1"; echo "$name round $round $(call_p50 "$work/b0" "$work/b1")"; fi
    done
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
done
head -n 1 "$out/hop_shared_direct_1.csv"
[ "${BENCH_HOP_ONLY:-0}" = 1 ] && exit 0

echo "== 2. one host (2 CPUs) against a CPU tier (1 CPU) and a model tier (1 CPU)"
scripts/image.sh >/dev/null
image=${SLUICE_IMAGE:-sluice:latest}
.venv/bin/python - "$work/photo.jpg" <<'PY'
import sys
sys.path.insert(0, "scripts")
from bench_detect import photo
open(sys.argv[1], "wb").write(photo(1280, 720))
PY
mkdir -p "$work/one/models" "$work/one/pipelines" "$work/cpu/models/detector" "$work/cpu/models/resnet50" "$work/cpu/pipelines"
for m in detector resnet50; do
  mkdir -p "$work/one/models/$m"
  cp "models/$m/model.onnx" "models/$m/model.yaml" "$work/one/models/$m/"
  remote_yaml dns modeltier:8001 2000 > "$work/cpu/models/$m/model.yaml"
done
cp pipelines/detect_crop_classify.yaml "$work/one/pipelines/"
cp pipelines/detect_crop_classify.yaml "$work/cpu/pipelines/"
chmod -R a+rX "$work"
docker network rm "$net" >/dev/null 2>&1 || true
docker network create --internal "$net" >/dev/null
run() { # name cpus models pipelines [alias]
  docker run -d --name "$1" --network "$net" --cpus "$2" ${5:+--network-alias "$5"} \
    -v "$3:/srv/sluice/models:ro" -v "$4:/srv/sluice/pipelines:ro" "$image" >/dev/null
  docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"
}
busy() { # ip: the model tier's busy seconds so far, summed over its models
  curl -s "http://$1:8000/metrics" | awk '/^sluice_model_busy_seconds_total/ {s += $2} END {print s + 0}'
}
bench() { # label ip busy-ip
  local b0 b1
  "$SLUICE_BIN" bench detect_crop_classify --url "http://$2:8001" --image "$work/photo.jpg" --concurrency "$conc" \
    --seconds 3 --format csv >/dev/null 2>&1  # warm
  b0=$(busy "$3")
  "$SLUICE_BIN" bench detect_crop_classify --url "http://$2:8001" --image "$work/photo.jpg" --concurrency "$conc" \
    --seconds "$secs" --format csv --out "$out/$1.csv" >/dev/null 2>&1
  b1=$(busy "$3")
  echo "$1: $(tail -n 1 "$out/$1.csv"); model tier busy $(echo "$b0 $b1 $secs" | awk '{printf "%.2f", ($2 - $1) / $3}') s/s"
}
one=$(run "$net-one" 2 "$work/one/models" "$work/one/pipelines")
wait_ready "$one:8000"
bench one_host "$one" "$one"
docker rm -f "$net-one" >/dev/null
# The same total cores split evenly, then sized to the work (the models take most).
for split in 1:1 0.5:1.5; do
  mt=$(run "$net-mt" "${split#*:}" "$work/one/models" "$work/none" modeltier)
  wait_ready "$mt:8000"
  cpu=$(run "$net-cpu" "${split%%:*}" "$work/cpu/models" "$work/cpu/pipelines")
  wait_ready "$cpu:8000"
  bench "split_cpu${split%%:*}_models${split#*:}" "$cpu" "$mt"
  docker rm -f "$net-mt" "$net-cpu" >/dev/null
done
head -n 1 "$out/one_host.csv"
