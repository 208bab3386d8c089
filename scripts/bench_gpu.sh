#!/usr/bin/env bash
# ResNet-50 on a GPU host, side by side in one run: one ONNX Runtime session called
# directly (ort_bench) vs sluice with dynamic batching under perf_analyzer, for each of
# the CPU, CUDA and TensorRT execution providers. Needs an onnxruntime-gpu library
# (ORT_DYLIB_PATH) with its CUDA libraries on LD_LIBRARY_PATH.
#   usage: scripts/bench_gpu.sh BIN_DIR OUT_DIR
# BIN_DIR holds release builds of `sluice` and `ort_bench` and a `perf_analyzer` that runs.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=$1 out=$2
mkdir -p "$out"
secs=${BENCH_SECONDS:-8}
[ -f models/resnet50/model.onnx ] || python3 scripts/gen_resnet50.py models/resnet50/model.onnx

eps=${EPS:-cpu cuda tensorrt}
instances=${INSTANCES:-2}
work=$(mktemp -d)
for ep in $eps; do
  mkdir -p "$work/$ep/resnet50"
  ln -s "$PWD/models/resnet50/model.onnx" "$work/$ep/resnet50/model.onnx"
  cat >"$work/$ep/resnet50/model.yaml" <<EOF
execution_provider: $ep
cudnn_conv_algo_search: ${CONV_SEARCH:-heuristic}
max_batch_size: 32
instances: $instances
intra_op_threads: 4
dynamic_batching:
  max_queue_delay_us: 500
  preferred_batch_sizes: [16, 32]
  allowed_batch_sizes: [1, 2, 4, 8, 16, 32]
max_queue_size: 512
warmup:
  - batch_size: 1
  - batch_size: 32
EOF
done

for ep in $eps; do
  echo "== $ep: raw ONNX Runtime session"
  batches=1,8,16,32
  [ "$ep" = cpu ] && batches=1,8
  "$bin/ort_bench" "$work/$ep/resnet50" --batches "$batches" --seconds "$secs" 2>&1 | tee "$out/raw_$ep.md"
  echo "== $ep: sluice + perf_analyzer (batch-1 requests over gRPC)"
  "$bin/sluice" serve --models "$work/$ep" --grpc-addr 127.0.0.1:18001 --http-addr 127.0.0.1:18000 \
    >"$out/server_$ep.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do curl -sf 127.0.0.1:18000/v2/health/ready >/dev/null && break; sleep 0.5; done
  curl -s -XPOST 127.0.0.1:18000/v2/repository/index | tee "$out/index_$ep.json"; echo
  if curl -sf 127.0.0.1:18000/v2/health/ready >/dev/null; then
    concs=${CONCURRENCY:-1 4 16 64}
    [ "$ep" = cpu ] && concs="1 16"
    for c in $concs; do
      "$bin/perf_analyzer" -m resnet50 -i grpc -u 127.0.0.1:18001 -b 1 --concurrency-range "$c:$c" \
        -p $((secs * 500)) -s 25 -r 8 -f "$out/sluice_${ep}_c$c.csv" >"$out/sluice_${ep}_c$c.log" 2>&1
      tail -n 1 "$out/sluice_${ep}_c$c.log"
    done
    curl -s 127.0.0.1:18000/v2/models/resnet50/stats >"$out/stats_$ep.json"
  fi
  kill "$pid"; wait "$pid" 2>/dev/null
done
rm -rf "$work"
