#!/usr/bin/env bash
# Runs every check and test: formatting and clippy (warnings are errors), then installs
# what the tests need (ONNX Runtime, Triton's Python client and perf_analyzer; no ResNet
# weights), then the whole cargo workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
SLUICE_SKIP_RESNET=1 scripts/setup.sh
cargo test --workspace --locked
# The client's API docs (and their examples, run above as doctests) build without warnings.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p sluice-client
