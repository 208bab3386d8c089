#!/usr/bin/env bash
# What the server allocates per request on gRPC and on HTTP (BENCHMARKS.md): the tiny model
# under valgrind's DHAT, see scripts/profile_allocs.py. Markdown to stdout; the DHAT
# profiles (open them in DHAT's viewer, dh_view.html) in target/bench/allocs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
command -v valgrind >/dev/null || { echo "profile_allocs: needs valgrind (Debian: apt-get install valgrind)" >&2; exit 1; }
cargo build -q --release --locked --bin sluice
.venv/bin/python scripts/profile_allocs.py target/bench/allocs "$@"
