#!/usr/bin/env bash
# Installs the Debian packages boundkey builds and tests with, when missing. Sourced by the
# other scripts; safe to run on its own.
set -euo pipefail

# postgresql: the PostgreSQL store's tests start their own server (initdb, postgres, psql,
# pg_isready from /usr/lib/postgresql/N/bin; testkit::Postgres), and fail without it.
BOUNDKEY_DEBIAN_PACKAGES=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config openssl time postgresql)

boundkey_install_deps() {
    local missing=()
    for p in "${BOUNDKEY_DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; return 1; }
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Python's `cryptography` (>= 42) is the second strict RFC 5280 verifier in the conformance tests;
# Debian 12's python3-cryptography predates its verifier, so it comes from PyPI.
boundkey_install_python_deps() {
    python3 -c 'import cryptography.x509.verification' 2>/dev/null && return 0
    echo "installing Python package: cryptography>=42" >&2
    python3 -m pip install --quiet 'cryptography>=42' \
        || python3 -m pip install --quiet --break-system-packages 'cryptography>=42'
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    boundkey_install_deps
    boundkey_install_python_deps
fi
