#!/usr/bin/env bash
# Runs every test: installs what the tests need (ONNX Runtime, Triton's Python client
# and perf_analyzer; no ResNet weights), then the whole cargo workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_SKIP_RESNET=1 scripts/setup.sh
cargo test --workspace --locked
# The client's API docs (and their examples, run above as doctests) build without warnings.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p sluice-client
