#!/usr/bin/env bash
# Fetches what the example models need, builds sluice and serves models/ (and, once
# they exist, pipelines/) on gRPC :8001 and HTTP :8000. Extra arguments go to `sluice serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --locked --bin sluice -- serve "$@"
