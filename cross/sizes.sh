#!/usr/bin/env bash
# Prints the stripped size of the release boundkeyd for every device target, building what is
# missing with cross/build.sh (its default backend per target).
#
#   cross/sizes.sh [--no-build] [TARGET…]
set -euo pipefail
cd "$(dirname "$0")/.."

build=yes
if [ "${1-}" = --no-build ]; then build=""; shift; fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
    x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

printf '%-32s %-6s %10s %8s\n' target keys bytes MiB
for t in "${targets[@]}"; do
    case $t in
    aarch64-*) strip=aarch64-linux-gnu-strip ;;
    armv7-*) strip=arm-linux-gnueabihf-strip ;;
    *) strip="strip" ;;
    esac
    case $t in *-musl) keys="file" ;; *) keys="tpm" ;; esac
    bin=${CARGO_TARGET_DIR:-target}/$t/release/boundkeyd
    if [ -n "$build" ]; then
        log=$(mktemp)
        bin=$(cross/build.sh "$t" 2>"$log" | tail -n 1) || { cat "$log" >&2; rm -f "$log"; exit 1; }
        rm -f "$log"
    elif [ ! -f "$bin" ]; then
        printf '%-32s %-6s %10s %8s\n' "$t" "$keys" - "(not built)"
        continue
    fi
    # The release profile strips already; strip a copy anyway so the figure never includes symbols.
    tmp=$(mktemp)
    "$strip" -o "$tmp" "$bin"
    bytes=$(stat -c %s "$tmp")
    rm -f "$tmp"
    printf '%-32s %-6s %10d %8s\n' "$t" "$keys" "$bytes" "$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')"
done
