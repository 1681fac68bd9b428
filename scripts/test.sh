#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, builds every binary
# (the end-to-end tests run the real boundkey-authd, boundkeyctl and boundkeyd) and runs the
# whole workspace's tests, each swtpm-backed test on its own swtpm and ports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
boundkey_install_deps
boundkey_install_python_deps

# libtss2 logs every TPM error response at WARNING; tests provoke many on purpose.
export TSS2_LOG="${TSS2_LOG:-all+none}"

for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked --features boundkey/pair-test -- -D warnings
echo "== cargo build (binaries used by end-to-end tests)"
cargo build --workspace --bins --locked
echo "== systemd unit and Yocto layer (offline checks; the unit's command line as its user)"
bash scripts/yocto-check.sh --e2e
echo "== builds without the TPM backend (the key store must then default to files)"
cargo check -p boundkey --no-default-features --locked
cargo test -p boundkey-hal --no-default-features --locked --lib -q 2>&1 | grep -E '^test result' || exit 1
echo "== Rust 1.75 (Yocto scarthgap): the agent's crates build and pass their unit tests"
bash scripts/msrv.sh
echo "== fuzz smoke run (every target: its corpus plus a few thousand new inputs)"
bash scripts/fuzz.sh smoke
echo "== device targets: cross builds, the aarch64 and armv7 agents under qemu against swtpm"
bash cross/check.sh
echo "== Debian packages: built, installed, run as their units' users, removed, purged"
bash scripts/deb.sh
echo "== load generator, quick version (8 devices against authd, then against the bare TLS server)"
cargo test -p boundkey-server --locked --bench loadgen -q 2>&1 | tail -n 12
echo "== cargo test"
cargo test --workspace --locked --features boundkey/pair-test "$@"
