#!/usr/bin/env bash
# What the README's test command runs for device targets (cross/README.md):
#   - the aarch64 agent, cross-built, passes the TPM end-to-end scenarios under qemu-aarch64;
#   - the armv7 agent, cross-built, makes one TPM join under qemu-arm;
#   - both musl builds are fully static, and asking one for the TPM backend fails with its
#     one-sentence reason;
#   - the stripped size of each target is printed (cross/sizes.sh --no-build).
#   bash cross/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "cross/check.sh: $*" >&2; exit 1; }

bash cross/e2e.sh aarch64-unknown-linux-gnu
bash cross/e2e.sh armv7-unknown-linux-gnueabihf
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    bin=$(bash cross/build.sh "$t" | tail -n 1)
    desc=$(file -b "$bin")
    case $desc in *"statically linked"* | *"static-pie linked"*) ;; *) die "$bin is not static: $desc" ;; esac
    echo "$t: $desc"
done
if out=$(bash cross/build.sh x86_64-unknown-linux-musl --features tpm 2>&1); then
    die "a musl build with the TPM backend succeeded, the docs say it cannot"
fi
grep -q "cannot be built for x86_64-unknown-linux-musl: libtss2 is a shared library" <<<"$out" ||
    die "a musl TPM build failed without its reason: $out"
bash cross/sizes.sh --no-build
