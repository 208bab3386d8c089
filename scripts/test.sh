#!/usr/bin/env bash
# Runs every check and test: installs what the tests need (ONNX Runtime, Triton's Python
# client and perf_analyzer, the deploy checks' Helm SDK and schemas, the example models:
# the container test serves them all; OpenCV's development files for the `opencv`
# feature), then formatting and clippy (warnings are errors; every cargo feature on, as
# for the tests), builds the workspace's tests and the container image, runs the whole
# workspace's tests, the OpenCV engine's among them (tests/tests/deploy.rs starts the
# image as the rendered Helm chart says, tests/tests/hostile.rs runs it under a 4 GiB cap;
# SLUICE_SKIP_DOCKER_TESTS=1 skips the image and those tests). The fuzz targets' committed
# corpus runs through them in the server's unit tests; fuzzing proper needs a build of
# its own (the server with coverage instrumentation: ~7 of the suite's minutes on 2
# cores), so it runs here only with SLUICE_FUZZ_SECONDS=N (N s a target; by hand:
# scripts/fuzz.sh 600).
#
# The tests build in the release profile: the image needs a release `sluice`, and one
# release build of the dependencies serves both (a dev-profile test build beside the
# image's release build compiled every dependency twice: ~13 of the suite's minutes on 2
# cores). Debug assertions and overflow checks still run in the fuzz targets (cargo fuzz
# turns them on). The image's binary has every feature but the `sluice` command's
# `opencv` (that binary needs OpenCV's shared libraries, which the image does not carry).
# The OpenCV engine is a crate of its own (ops-opencv), so its tests build in the same
# run without changing the server the image's binary is built from.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
step() { echo "test.sh: $* (at $((SECONDS - t0)) s)"; }

step "setup"
SLUICE_OPENCV=1 scripts/setup.sh
step "fmt"
cargo fmt --all --check
step "clippy"
# In the release profile, as the tests build: the build scripts' runs (OpenCV's bindings,
# generated with libclang, ~4 of the suite's minutes on 2 cores) and the proc macros then
# serve both steps instead of being built once for each profile.
cargo clippy --release --workspace --all-targets --all-features --locked -- -D warnings
# Every feature of every workspace package but the command's `opencv`.
features=$(cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
pkgs = json.load(sys.stdin)["packages"]
print(",".join(p["name"] + "/" + f for p in pkgs for f in p["features"] if (p["name"], f) != ("sluice-cli", "opencv")))')
# The test targets, then the doctests; not the examples, which no test runs (clippy
# --all-targets has checked them): five fewer binaries to link against the server.
tests=(--workspace --features "$features" --release --locked)
step "test build (release; features $features)"
cargo test "${tests[@]}" --lib --bins --tests --no-run
# The image the deploy and hostile tests run, from the binary just built (tests/ rebuild
# it through scripts/image.sh with the same SLUICE_BIN: a cached no-op then). A copy: a
# later build must not change the binary under the image.
if [ "${SLUICE_SKIP_DOCKER_TESTS:-0}" != 1 ]; then
  step "image"
  mkdir -p .sluice/image-bin
  cp target/release/sluice .sluice/image-bin/sluice
  export SLUICE_BIN=$PWD/.sluice/image-bin/sluice
  SLUICE_IMAGE=sluice:test scripts/image.sh
fi
step "tests"
# Every test binary runs even after one fails: one CI run reports every failure.
failed=0
cargo test "${tests[@]}" --lib --bins --tests --no-fail-fast || failed=1
cargo test "${tests[@]}" --doc --no-fail-fast || failed=1
[ "$failed" = 0 ] || { echo "test.sh: tests failed (above)" >&2; exit 1; }
if [ "${SLUICE_FUZZ_SECONDS:-0}" != 0 ]; then
  step "fuzz"
  scripts/fuzz.sh "$SLUICE_FUZZ_SECONDS"
fi
# The client's API docs (and their examples, run above as doctests) build without warnings.
step "client docs"
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --locked -p sluice-client
step "done"
