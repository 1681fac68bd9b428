#!/usr/bin/env bash
# Runs the end-to-end TPM scenarios with a cross-built boundkeyd under qemu-user, against a host
# swtpm per test and the host's boundkey-authd / boundkeyctl (tests/tpm_e2e.rs, through the
# harness's BOUNDKEY_TEST_AGENT / BOUNDKEY_TEST_RUNNER).
#
#   cross/e2e.sh aarch64-unknown-linux-gnu       first join with a key created in the TPM,
#                                                renewal, requested rotations, a copied storage
#                                                directory refused and the token locked
#   cross/e2e.sh armv7-unknown-linux-gnueabihf   one TPM join (a key created in the TPM first)
#
# Builds what it needs (cross/build.sh, the host binaries); installs qemu-user when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "cross/e2e.sh: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: cross/e2e.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf"
target=$1

case $target in
aarch64-unknown-linux-gnu)
    qemu=qemu-aarch64 debarch=arm64
    tests=(tpm_registration_renewal_then_expiry_and_recovery
        tpm_rotation_makes_a_new_tpm_key_and_keeps_at_most_ten_old_ones
        tpm_copied_storage_is_refused_and_the_token_locked) ;;
armv7-unknown-linux-gnueabihf)
    qemu=qemu-arm debarch=armhf
    tests=(tpm_pre_registered_key_joins_and_status_shows_the_tpm) ;;
*) die "no emulated scenarios for '$target'" ;;
esac

# shellcheck source=scripts/deps.sh
. scripts/deps.sh
BOUNDKEY_DEBIAN_PACKAGES+=(qemu-user)
boundkey_install_deps

agent=$(cross/build.sh "$target" | tail -n 1)
# With Debian multiarch the target's loader and libraries are where the binary expects them; with
# cross/build.sh's unpacked sysroot (when multiarch could not install), qemu looks there first.
runner=$qemu
sysroot=${BOUNDKEY_CROSS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/boundkey-cross}/$debarch-sysroot
if ! dpkg-query -W -f='${Status}' "libtss2-dev:$debarch" 2>/dev/null | grep -q "install ok installed"; then
    [ -f "$sysroot/.complete" ] || die "neither libtss2-dev:$debarch nor $sysroot is there"
    runner="$qemu -L $sysroot"
fi
echo "== $runner $agent --version"
$runner "$agent" --version || die "$agent does not run under $runner"
echo "== host binaries (auth service, boundkeyctl)"
cargo build --locked --workspace --bins
echo "== tpm_e2e with $agent under $runner"
export TSS2_LOG="${TSS2_LOG:-all+none}"
BOUNDKEY_TEST_AGENT=$agent BOUNDKEY_TEST_RUNNER=$runner \
    cargo test --locked -p boundkey --test tpm_e2e -- --exact "${tests[@]}"
