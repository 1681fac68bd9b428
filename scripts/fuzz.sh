#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (nightly + cargo-fuzz, installed when missing).
#   bash scripts/fuzz.sh smoke          each target replays its corpus plus a few thousand inputs
#   bash scripts/fuzz.sh long [RUNS]    each target for RUNS executions (default 10,000,000),
#                                       new corpus entries kept in fuzz/corpus/<target>/
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-smoke}"
runs="${2:-10000000}"

rustup toolchain list 2>/dev/null | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

# No sanitizer (-s none): every fuzzed parser is safe Rust (unsafe_code is forbidden in the
# workspace), so AddressSanitizer would only slow the runs down; coverage guidance stays on.
# libtss2 logs every TPM error at WARNING; the blob target never talks to a TPM anyway.
export TSS2_LOG="${TSS2_LOG:-all+none}"
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O -s none
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in $targets; do
    case "$mode" in
        smoke)
            # New inputs go to a scratch directory: a smoke run leaves the committed corpus alone.
            scratch=$(mktemp -d)
            args=(-runs=3000 -max_len=4096)
            dirs=("$scratch" "fuzz/corpus/$t")
            ;;
        long)
            scratch=""
            args=(-runs="$runs" -max_len=4096 -print_final_stats=1)
            dirs=("fuzz/corpus/$t")
            ;;
        *) echo "usage: $0 smoke | long [RUNS]" >&2; exit 2 ;;
    esac
    if cargo +nightly fuzz run -O -s none "$t" "${dirs[@]}" -- "${args[@]}" >"$log" 2>&1; then
        echo "fuzz $t: $(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1)"
        grep -E 'stat::(number_of_executed_units|average_exec_per_sec)' "$log" || true
    else
        tail -n 40 "$log" >&2
        echo "fuzz target $t failed (a crash is saved under fuzz/artifacts/$t)" >&2
        exit 1
    fi
    [ -z "$scratch" ] || rm -rf "$scratch"
done
echo "fuzz ($mode): every target ran without a crash"
