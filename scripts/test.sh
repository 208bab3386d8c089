#!/usr/bin/env bash
# Runs every check and test: formatting and clippy (warnings are errors; every cargo
# feature on, as for the tests: the tract backend is built and tested), then installs
# what the tests need (ONNX Runtime, Triton's Python client and perf_analyzer, the deploy
# checks' Helm SDK and schemas, the example models: the container test serves them all), builds the container image, then the
# whole cargo workspace's tests (tests/tests/deploy.rs starts the image as the rendered
# Helm chart says, tests/tests/hostile.rs runs it under a 4 GiB cap; SLUICE_SKIP_DOCKER_TESTS=1
# skips the image and those tests), then the fuzz targets for 20 s each.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
scripts/setup.sh
# The image the deploy test runs (release build; the test rebuilds it too, a no-op then).
if [ "${SLUICE_SKIP_DOCKER_TESTS:-0}" != 1 ]; then SLUICE_IMAGE=sluice:test scripts/image.sh; fi
cargo test --workspace --all-features --locked
# Every fuzz target from its committed corpus, briefly (scripts/fuzz.sh 600 by hand).
scripts/fuzz.sh "${SLUICE_FUZZ_SECONDS:-20}"
# The client's API docs (and their examples, run above as doctests) build without warnings.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p sluice-client
