#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 20), starting from
# the committed corpus in fuzz/corpus/<target>; inputs that find new paths go to
# fuzz/corpus-new/<target> (not committed: copy good ones into the corpus by hand). A
# crash, a panic, a timeout or a process over 2 GiB fails the run and leaves the input in
# fuzz/artifacts/<target>/: reproduce it with
#   cargo fuzz run --sanitizer none <target> fuzz/artifacts/<target>/<file>
# Longer runs by hand: scripts/fuzz.sh 600. cargo-fuzz with `--sanitizer none` builds on
# stable Rust (libFuzzer's coverage instrumentation; no AddressSanitizer: the targets are
# safe Rust apart from ONNX Runtime, which they do not load).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version 0.13.2
fi
targets=(decode_image http_infer grpc_infer pipeline model_yaml onnx_fold)
cargo fuzz build --sanitizer none
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus-new/$t"
    echo "fuzz: $t for ${secs} s"
    if ! cargo fuzz run --sanitizer none "$t" "fuzz/corpus-new/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log" | tr '\n' ' '
    echo
done
echo "fuzz: no target failed"
