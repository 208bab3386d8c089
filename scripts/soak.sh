#!/usr/bin/env bash
# Soak (BENCHMARKS.md, "Soak"): the example pipelines (classify, detect_crop_classify, ocr)
# served together at about half of what the machine can do, open loop, for
# SOAK_MINUTES (default 10): failures, the server's RSS over time (growth per minute),
# and each pipeline's p99 in the first and the last minute. Not a CI test: it takes
# the machine for the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
.venv/bin/python scripts/soak.py target/bench/soak "${SOAK_MINUTES:-10}"
