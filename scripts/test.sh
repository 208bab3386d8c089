#!/usr/bin/env bash
# Runs every test: installs what the tests need (ONNX Runtime, Triton's Python client
# and perf_analyzer; no ResNet weights), then the whole cargo workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_SKIP_RESNET=1 scripts/setup.sh
cargo test --workspace --locked
