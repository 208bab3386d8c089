#!/usr/bin/env bash
# sluice beside MLServer and the KServe Python server (BENCHMARKS.md): installs each peer
# from PyPI into its own venv (they cannot share one: their pins conflict), builds sluice,
# then runs scripts/bench_peers.py. Markdown to stdout; logs in target/bench/peers.
#   BENCH_SECONDS   perf_analyzer's measurement window (default 5)
#   PEER_WORKLOADS  tiny resnet50 classify detect detect_crop_classify (default: all)
#   PEER_SERVERS    sluice sluice-reduced sluice-tuned mlserver mlserver-nobatch kserve
#                   kserve-reduced (default: all; the -reduced and -tuned ones run detect
#                   only, decoding its JPEG at a DCT scale; see bench_peers.py)
set -euo pipefail
cd "$(dirname "$0")/.."
# OpenCV's dev files: sluice-reduced is `engine: opencv` (the binary's opencv feature).
SLUICE_OPENCV=1 scripts/setup.sh >/dev/null
# The same ONNX Runtime as .venv, OpenCV for the pipelines' image steps; uvloop 0.21.0
# because MLServer 1.7.1's event-loop setup fails on newer ones.
COMMON=(onnxruntime==1.31.1 opencv-python-headless==4.12.0.88)
peer_venv() { # DIR REQ...
  local dir=$1
  shift
  local stamp
  stamp="$dir/.sluice-bench-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    [ -x "$dir/bin/python" ] || "${PYTHON:-python3}" -m venv "$dir"
    echo "bench_peers: installing $* into $dir" >&2
    "$dir/bin/python" -m pip install --disable-pip-version-check -q "$@" >&2
    touch "$stamp"
  fi
}
peer_venv .venv-mlserver mlserver==1.7.1 uvloop==0.21.0 "${COMMON[@]}"
peer_venv .venv-kserve kserve==0.21.0 "${COMMON[@]}"
cargo build -q --release --locked -p sluice-cli --features opencv
.venv/bin/python scripts/bench_peers.py target/bench/peers "${BENCH_SECONDS:-5}"
