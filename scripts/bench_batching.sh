#!/usr/bin/env bash
# Tail latency of dynamic batching at low concurrency, side by side in one run (BENCHMARKS.md
# "Batching at low concurrency"): a model with batching on (MODEL=resnet50, the default, or
# detector: their shipped model.yaml, up to 8, 2 ms delay; MODEL=tiny: y = 2x + 1 with the
# same batching settings as ResNet-50) against the same server with batching off
# (max_batch_size 1, the rest as shipped), perf_analyzer over gRPC at each concurrency, two
# alternated rounds. SLUICE_BIN compares another build (e.g. an older commit's) under the
# label "on (SLUICE_BIN)"; CONCURRENCY and BENCH_SECONDS (per window) change the sweep.
# Markdown to stdout; logs in target/bench/batching.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
out=target/bench/batching
rm -rf "$out"
mkdir -p "$out"
grpc=127.0.0.1:18401
http=127.0.0.1:18400
secs=${BENCH_SECONDS:-4}
concurrency=${CONCURRENCY:-1 2 4 8 16}
repo=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$repo"' EXIT
model=${MODEL:-resnet50}
mkdir -p "$repo/on/$model" "$repo/off/$model"
if [ "$model" = tiny ]; then
  .venv/bin/python scripts/gen_tiny.py "$repo/on/tiny" >/dev/null
  printf 'dynamic_batching:\n  max_queue_delay_us: 2000\n  preferred_batch_sizes: [4, 8]\n' >>"$repo/on/tiny/model.yaml"
else
  ln -s "$PWD/models/$model/model.onnx" "$repo/on/$model/model.onnx"
  cp "models/$model/model.yaml" "$repo/on/$model/model.yaml"
fi
ln -s "$repo/on/$model/model.onnx" "$repo/off/$model/model.onnx"
# Batching off: every request runs alone, the rest of the configuration as shipped.
.venv/bin/python - "$repo/on/$model/model.yaml" "$repo/off/$model/model.yaml" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["max_batch_size"] = 1
cfg.pop("dynamic_batching", None)
cfg["warmup"] = [w for w in cfg.get("warmup", []) if w.get("batch_size", 1) == 1]
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
PY

one() { # label binary variant
  local label=$1 bin=$2 variant=$3
  "$bin" serve --models "$repo/$variant" --pipelines "$repo/none" --grpc-addr "$grpc" --http-addr "$http" \
    --ort-dylib "$PWD/.sluice/lib/libonnxruntime.so" >/dev/null 2>"$out/$label.server.log" &
  pid=$!
  for _ in $(seq 150); do curl -sf "http://$http/v2/health/ready" >/dev/null && break; sleep 0.2; done
  for c in $concurrency; do
    .sluice/bin/perf_analyzer -i grpc -u "$grpc" -m "$model" -b 1 --input-data zero --concurrency-range "$c:$c" \
      -p $((secs * 1000)) -s 25 -r 6 --percentile 99 -f "$out/${label// /_}_c$c.csv" >"$out/${label// /_}_c$c.log" 2>&1 || true
  done
  kill $pid
  wait $pid 2>/dev/null || true
  pid=
}

labels=()
for round in 1 2; do
  one "on $round" target/release/sluice on
  labels+=("on $round")
  if [ -n "${SLUICE_BIN:-}" ]; then
    one "on (SLUICE_BIN) $round" "$SLUICE_BIN" on
    labels+=("on (SLUICE_BIN) $round")
  fi
  one "off $round" target/release/sluice off
  labels+=("off $round")
done

.venv/bin/python - "$out" "$concurrency" "${labels[@]}" <<'PY'
import csv, sys
from pathlib import Path
out, conc, labels = Path(sys.argv[1]), [int(c) for c in sys.argv[2].split()], sys.argv[3:]
def row(label, c):
    p = out / f"{label.replace(' ', '_')}_c{c}.csv"
    if not p.exists():
        return None
    r = next(csv.DictReader(open(p)))
    return float(r["Inferences/Second"]), float(r["p50 latency"]) / 1e3, float(r["p99 latency"]) / 1e3
print("| concurrency | batching | round | infer/s | p50 ms | p99 ms | p99 / off (same round) |")
print("|---|---|---|---|---|---|---|")
for c in conc:
    for label in labels:
        kind, rnd = label.rsplit(" ", 1)
        r = row(label, c)
        off = row(f"off {rnd}", c)
        if r is None:
            print(f"| {c} | {kind} | {rnd} | no stable measurement | | | |")
            continue
        ratio = f"{r[2] / off[2]:.2f}" if off else ""
        print(f"| {c} | {kind} | {rnd} | {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} | {ratio} |")
PY
