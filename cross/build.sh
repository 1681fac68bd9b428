#!/usr/bin/env bash
# Builds a release boundkeyd for a device target on Debian 12, installing what is missing first:
# the Rust target, the cross C compiler (ring and the linker need one), and for the TPM backend
# libtss2-dev for the target architecture through Debian multiarch.
#
#   cross/build.sh TARGET [--features tpm] [--no-default-features] [other cargo build args]
#
# TARGET is one of
#   aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf   TPM backend (default) or files
#   x86_64-unknown-linux-musl, aarch64-unknown-linux-musl      fully static, file backend only
# The binary ends in $CARGO_TARGET_DIR (default target/)/TARGET/release/boundkeyd; the last line
# printed is its path. BOUNDKEY_CROSS_PROFILE=NAME builds with another cargo profile.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "cross/build.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: cross/build.sh TARGET [--features tpm] [cargo build args]"
target=$1
shift

# Feature selection: gnu targets default to the TPM backend, musl targets to files only.
want_tpm=""
extra=()
while [ $# -gt 0 ]; do
    case $1 in
    --features) [ $# -ge 2 ] || die "--features needs a value"
        case ",$2," in *,tpm,*) want_tpm=yes ;; esac
        extra+=("$1" "$2"); shift 2 ;;
    --features=*) case ",${1#--features=}," in *,tpm,*) want_tpm=yes ;; esac
        extra+=("$1"); shift ;;
    --no-default-features) want_tpm=${want_tpm:-no}; extra+=("$1"); shift ;;
    *) extra+=("$1"); shift ;;
    esac
done

case $target in
aarch64-unknown-linux-gnu)     debarch=arm64 gnu=aarch64-linux-gnu   static=no ;;
armv7-unknown-linux-gnueabihf) debarch=armhf gnu=arm-linux-gnueabihf static=no ;;
x86_64-unknown-linux-musl)     debarch=""    gnu=""                  static=yes ;;
aarch64-unknown-linux-musl)    debarch=""    gnu=aarch64-linux-gnu   static=yes ;;
*) die "unsupported target '$target' (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf, x86_64-unknown-linux-musl, aarch64-unknown-linux-musl)" ;;
esac

if [ $static = yes ]; then
    [ "$want_tpm" = yes ] && die "the TPM backend cannot be built for $target: libtss2 is a shared library that loads its TCTI with dlopen, which a fully static musl binary cannot do, and Debian ships no musl build of it (use a gnu target for the TPM, or drop --features tpm)"
    want_tpm=no
    # The package's default feature is tpm: a musl build is the file backend unless told otherwise.
    case " ${extra[*]-} " in *" --no-default-features "*) ;; *) extra+=(--no-default-features) ;; esac
else
    want_tpm=${want_tpm:-yes}
    case " ${extra[*]-} " in *" --no-default-features "*) ;; *) want_tpm=yes ;; esac
fi

# --- what is missing -------------------------------------------------------------------------
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"; fi
}

pkgs=(pkg-config file binutils)
[ -n "$gnu" ] && pkgs+=("gcc-$gnu")
[ "$target" = x86_64-unknown-linux-musl ] && pkgs+=(musl-tools)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_get() { DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 "$@"; }
updated=""
apt_update() {
    [ -n "$updated" ] && return 0
    updated=yes
    # A failed index (a mirror mid-sync) is reported by apt; the install says if it mattered.
    apt_get update -qq || echo "cross/build.sh: apt-get update reported errors, trying anyway" >&2
}

missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    apt_update
    apt_get install -y -qq "${missing[@]}" >/dev/null || die "could not install ${missing[*]}"
fi

# The target's libtss2 (TPM backend). Debian multiarch first; foreign-architecture libraries
# must have the same version as the host's copies, which apt arranges when its indexes agree.
# When they do not (a stale host, a mirror mid-sync), the target's packages are unpacked into a
# private sysroot instead (cached; nothing is installed into the system from them).
cache=${BOUNDKEY_CROSS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/boundkey-cross}
sysroot=""
sysroot_pkgs=(libc6 libgcc-s1 libssl3 libtss2-dev libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-sys1 libtss2-rc0
    libtss2-tctildr0 libtss2-tcti-device0 libtss2-tcti-swtpm0 libtss2-tcti-mssim0)
extract_sysroot() {
    local root=$cache/$debarch-sysroot dl
    # The marker holds the package list: a changed list unpacks again.
    if [ "$(cat "$root/.complete" 2>/dev/null)" != "${sysroot_pkgs[*]}" ]; then
        echo "unpacking the $debarch libtss2 packages into $root" >&2
        local arch=(-o "APT::Architectures::=$(dpkg --print-architecture)" -o "APT::Architectures::=$debarch")
        as_root apt-get -o DPkg::Lock::Timeout=600 "${arch[@]}" update -qq >/dev/null 2>&1 || true
        dl=$(mktemp -d)
        (cd "$dl" && apt-get "${arch[@]}" download -qq "${sysroot_pkgs[@]/%/:$debarch}" >/dev/null 2>&1) \
            || { rm -rf "$dl"; die "could not download the $debarch libtss2 packages (${sysroot_pkgs[*]})"; }
        rm -rf "$root"
        mkdir -p "$root"
        for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$root"; done
        rm -rf "$dl"
        echo "${sysroot_pkgs[*]}" >"$root/.complete"
    fi
    sysroot=$root
}
if [ "$want_tpm" = yes ] && ! installed "libtss2-dev:$debarch"; then
    if [ -f "$cache/$debarch-sysroot/.complete" ]; then
        extract_sysroot
    else
        echo "installing libtss2-dev:$debarch (Debian multiarch)" >&2
        added=""
        if ! dpkg --print-foreign-architectures | grep -qx "$debarch"; then
            as_root dpkg --add-architecture "$debarch"
            added=yes
        fi
        updated=""
        apt_update
        if ! apt_get install -y -qq "libtss2-dev:$debarch" >/dev/null; then
            echo "cross/build.sh: libtss2-dev:$debarch does not install next to the host's libraries; using an unpacked sysroot" >&2
            # Leave apt as it was: an architecture whose index fails would break every apt-get update.
            if [ -n "$added" ]; then
                as_root dpkg --remove-architecture "$debarch"
            fi
            extract_sysroot
        fi
    fi
fi

command -v rustup >/dev/null || die "rustup not found: install Rust with rustup (https://rustup.rs)"
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2

# --- the build environment ----------------------------------------------------------------------
# Per-target variables only: a host build in the same shell is unaffected.
tu=$(echo "$target" | tr 'a-z-' 'A-Z_')
tl=${target//-/_}
if [ -n "$gnu" ]; then
    export "CARGO_TARGET_${tu}_LINKER=$gnu-gcc" "CC_${tl}=$gnu-gcc" "AR_${tl}=$gnu-ar"
fi
if [ "$target" = x86_64-unknown-linux-musl ]; then
    export "CC_${tl}=musl-gcc"
fi
if [ "$want_tpm" = yes ]; then
    # pkg-config answers for the target: only its multiarch directory (and arch-independent .pc).
    export PKG_CONFIG_ALLOW_CROSS=1
    export "PKG_CONFIG_LIBDIR_${tl}=$sysroot/usr/lib/$gnu/pkgconfig:$sysroot/usr/share/pkgconfig"
    if [ -n "$sysroot" ]; then
        export "PKG_CONFIG_SYSROOT_DIR_${tl}=$sysroot"
        # libtss2-esys needs libcrypto: let the linker find it in the sysroot too.
        export "CARGO_TARGET_${tu}_RUSTFLAGS=-C link-arg=-Wl,-rpath-link,$sysroot/usr/lib/$gnu"
    fi
fi

profile=${BOUNDKEY_CROSS_PROFILE:-release}
echo "== cargo build --profile $profile --target $target ${extra[*]-}" >&2
cargo build --locked --profile "$profile" -p boundkey --bin boundkeyd --target "$target" ${extra[@]+"${extra[@]}"} >&2

dir=$profile
[ "$profile" = dev ] && dir=debug
bin=${CARGO_TARGET_DIR:-target}/$target/$dir/boundkeyd
[ -f "$bin" ] || die "cargo reported success but $bin is missing"

# --- check what came out --------------------------------------------------------------------------
desc=$(file -b "$bin")
case $target in
aarch64-*) case $desc in *"ARM aarch64"*) ;; *) die "$bin is not an aarch64 binary: $desc" ;; esac ;;
armv7-*) case $desc in *"ARM, EABI5"*) ;; *) die "$bin is not a 32-bit ARM binary: $desc" ;; esac ;;
x86_64-*) case $desc in *"x86-64"*) ;; *) die "$bin is not an x86-64 binary: $desc" ;; esac ;;
esac
if [ $static = yes ]; then
    # Fully static: no program interpreter and no shared-library dependencies.
    if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
        die "$bin is not fully static: $desc"
    fi
fi
echo "$bin"
