#!/usr/bin/env bash
# Pipelines benchmark (BENCHMARKS.md): split vs fused layout of the classify pipeline.
# BENCH_SECONDS sets perf_analyzer's measurement window (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
.venv/bin/python scripts/bench_pipeline.py target/bench/pipeline "${BENCH_SECONDS:-5}"
