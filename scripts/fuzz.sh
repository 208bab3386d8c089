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
# Every target fuzz/Cargo.toml declares (the server's unit tests check that each has its
# corpus folder and feeds its own entry point).
mapfile -t targets < <(cargo fuzz list)
[ "${#targets[@]}" -gt 0 ] || { echo "fuzz: cargo fuzz list found no targets" >&2; exit 1; }
cargo fuzz build --sanitizer none
# Targets run side by side, one a core (SLUICE_FUZZ_JOBS, default every core): each
# still fuzzes for its full SECONDS on a core of its own.
jobs_max=${SLUICE_FUZZ_JOBS:-$(nproc)}
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
run() {
    local t=$1
    if cargo fuzz run --sanitizer none "$t" "fuzz/corpus-new/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 >"$logs/$t" 2>&1; then
        echo "fuzz: $t: $(grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$logs/$t" | tr -s ' \n' ' ')"
    else
        tail -40 "$logs/$t" >&2
        echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/" >&2
        return 1
    fi
}
failed=0
running=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus-new/$t"
    if [ "$running" -ge "$jobs_max" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
    echo "fuzz: $t for ${secs} s"
    run "$t" &
    running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
[ "$failed" = 0 ] || { echo "fuzz: a target failed (above)" >&2; exit 1; }
echo "fuzz: no target failed"
