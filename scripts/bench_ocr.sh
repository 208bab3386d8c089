#!/usr/bin/env bash
# OCR parity and throughput against rapidocr_onnxruntime (BENCHMARKS.md).
# BENCH_SECONDS: each throughput run (default 10); OCR_PAGES: random pages (default 40).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release --locked --bin sluice
.venv/bin/python scripts/bench_ocr.py target/bench/ocr "${BENCH_SECONDS:-10}" "${OCR_PAGES:-40}"
