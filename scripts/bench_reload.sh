#!/usr/bin/env bash
# Hot-reload benchmark (BENCHMARKS.md): p99 latency of a steady open-loop load in the
# 10 s around a reload vs the 10 s before it, for a pipeline edit and model swaps.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
.venv/bin/python scripts/bench_reload.py target/bench/reload
