#!/usr/bin/env bash
# tract against ONNX Runtime, per model and batch size, side by side in one run (the
# tract table of BENCHMARKS.md): the example models with fixed shapes, each loaded by
# both backends as the server loads them, both on one thread, alternating rounds.
#   BENCH_BATCHES=1,4,8  BENCH_ROUNDS=6  BENCH_ROUND_SECONDS=1
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --features tract -p sluice-server --example tract_bench
# ocr_det and ocr_rec take images of any size: tract needs fixed shapes (see README).
target/release/examples/tract_bench models/resnet50 models/detector models/ocr_cls \
  --batches "${BENCH_BATCHES:-1,4,8}" --rounds "${BENCH_ROUNDS:-6}" --round-seconds "${BENCH_ROUND_SECONDS:-1}"
