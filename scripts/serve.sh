#!/usr/bin/env bash
# Fetches what the example models need, builds sluice and serves models/ (and, once
# they exist, pipelines/) on gRPC :8001 and HTTP :8000. Extra arguments go to `sluice serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# On GPU hosts (where the set-up installed the GPU runtime) serve with ONNX Runtime's GPU build.
if [ -z "${ORT_DYLIB_PATH:-}" ] && [ -e .sluice/lib-gpu/libonnxruntime.so ]; then
  export ORT_DYLIB_PATH=$PWD/.sluice/lib-gpu/libonnxruntime.so
fi
exec cargo run --release --locked --bin sluice -- serve "$@"
