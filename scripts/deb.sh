#!/usr/bin/env bash
# Builds the two Debian packages and tests them on this machine (root; Debian 12):
#   1. cargo-deb (installed with `cargo install cargo-deb --locked` when missing) packs
#      boundkeyd (the agent built alone with `-p boundkey`, TPM backend) and boundkey-authd
#      (boundkey-authd and boundkeyctl, built for speed with the `server` profile) from
#      target/release and target/server (built here; an up-to-date build is reused);
#   2. both are installed with dpkg; the installed files, user, groups, directories, conffiles
#      and Depends are checked, and neither unit is enabled;
#   3. the installed boundkey-authd runs by its unit's ExecStart line as its user, the
#      installed agent by its unit's ExecStart line as its user (systemd need not be PID 1:
#      setpriv, the unit's UMask and EnvironmentFile, as scripts/yocto-check.sh --e2e does),
#      with a key in swtpm: a join, then a renewal;
#   4. `dpkg -r boundkeyd` keeps the configuration, join.env and the storage directory; after
#      a reinstall the next renewal continues the generation with the same instance and no
#      recovery spent;
#   5. `dpkg --purge boundkeyd` removes the configuration and join.env and keeps the storage
#      directory (docs/agent.md, "Debian package").
# The packages are left in ${CARGO_TARGET_DIR:-target}/debian. Everything this script
# installed is purged at the end. It refuses to run on a machine where a boundkeyd or
# boundkey-authd package or state directory exists that it did not create.
#
#   scripts/deb.sh
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "deb.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (it installs the packages and drops to their users)"

# swtpm and the TSS libraries (scripts/deps.sh); dpkg-shlibdeps for cargo-deb's $auto;
# systemd-sysusers and systemd-analyze; setpriv.
# shellcheck source=scripts/deps.sh
. scripts/deps.sh
BOUNDKEY_DEBIAN_PACKAGES+=(dpkg-dev systemd util-linux python3)
boundkey_install_deps
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked

target="${CARGO_TARGET_DIR:-target}"
AGENT_UNIT=/usr/lib/systemd/system/boundkeyd.service
AUTHD_UNIT=/usr/lib/systemd/system/boundkey-authd.service
# Marks the packages and state below as this script's, so a failed run is cleaned up by the
# next one while a real installation is never touched.
MARKER=/var/lib/boundkey-deb-check
STATE_PATHS=(/var/lib/boundkeyd /var/lib/boundkey-authd /run/boundkeyd /etc/boundkey)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok \(installed\|config-files\)\|half'; }
wipe() {
    dpkg --purge boundkeyd boundkey-authd >/dev/null 2>&1 || true
    rm -rf "${STATE_PATHS[@]}"
}
if [ ! -e "$MARKER" ]; then
    for p in boundkeyd boundkey-authd; do
        ! installed "$p" || die "package $p is installed and not by deb.sh: refusing to touch it"
    done
    for d in "${STATE_PATHS[@]}"; do
        [ ! -e "$d" ] || die "$d exists and deb.sh did not create it: refusing to touch it"
    done
fi
touch "$MARKER"
wipe

tmp="$(mktemp -d)"
chmod 0755 "$tmp"
pids=()
cleanup() {
    local rc=$? p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ "$rc" -ne 0 ]; then
        for f in "$tmp"/*.err; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
    fi
    wipe
    rm -f "$MARKER"
    rm -rf "$tmp"
}
trap cleanup EXIT

# --- 1. build and pack ------------------------------------------------------------------------
echo "== build (release; server profile for authd) and pack"
# The agent alone: built with the workspace, features of the server's dependencies would be
# unified into it.
cargo build --release --locked -p boundkey --bin boundkeyd
# The service for speed (opt-level 3), in target/server (Cargo.toml, [profile.server]).
cargo build --profile server --locked -p boundkey-server --bins
rm -rf "$target/debian"
cargo deb -p boundkey --no-build >"$tmp/deb-agent.out"
cargo deb -p boundkey-server --no-build --profile server >"$tmp/deb-server.out"
agent_deb="$(tail -n 1 "$tmp/deb-agent.out")"
server_deb="$(tail -n 1 "$tmp/deb-server.out")"
[ -f "$agent_deb" ] || die "cargo deb did not print the agent package's path"
[ -f "$server_deb" ] || die "cargo deb did not print the server package's path"
ls -l "$agent_deb" "$server_deb"

# --- 2. install and inspect -------------------------------------------------------------------
echo "== install"
dpkg -i "$agent_deb" "$server_deb" >/dev/null
for p in boundkeyd boundkey-authd; do
    [ "$(dpkg-query -W -f='${Status}' "$p")" = "install ok installed" ] || die "$p is not installed"
done
dpkg-query -W -f='${Depends}\n' boundkeyd | tee "$tmp/depends"
for lib in libtss2-esys-3.0.2-0 libtss2-tcti-device0 libtss2-tctildr0 libc6; do
    grep -q "\b$lib\b" "$tmp/depends" || die "boundkeyd does not depend on $lib"
done
cmp "$AGENT_UNIT" packaging/boundkeyd.service || die "installed agent unit differs from packaging/"
cmp "$AUTHD_UNIT" packaging/boundkey-authd.service || die "installed authd unit differs from packaging/"
cmp /etc/boundkey/boundkeyd.toml packaging/boundkeyd.toml || die "agent config differs from packaging/"
dpkg-query -W -f='${Conffiles}\n' boundkeyd | grep -q ' /etc/boundkey/boundkeyd.toml ' \
    || die "/etc/boundkey/boundkeyd.toml is not a conffile"
dpkg-query -W -f='${Conffiles}\n' boundkey-authd | grep -q ' /etc/boundkey/authd.env ' \
    || die "/etc/boundkey/authd.env is not a conffile"
for u in boundkeyd boundkey-authd; do
    [ ! -e "/etc/systemd/system/multi-user.target.wants/$u.service" ] || die "$u.service was enabled at install"
done
id -nG boundkeyd | grep -qw tss || die "the boundkeyd user is not in the tss group"
[ "$(stat -c '%U:%G %a' /var/lib/boundkeyd)" = "boundkeyd:boundkeyd 700" ] || die "/var/lib/boundkeyd: $(stat -c '%U:%G %a' /var/lib/boundkeyd)"
[ "$(stat -c '%U:%G %a' /run/boundkeyd)" = "boundkeyd:boundkeyd 750" ] || die "/run/boundkeyd: $(stat -c '%U:%G %a' /run/boundkeyd)"
[ "$(stat -c '%U:%G %a' /var/lib/boundkey-authd)" = "boundkey-authd:boundkey-authd 700" ] || die "/var/lib/boundkey-authd: wrong owner or mode"
for u in "$AGENT_UNIT" "$AUTHD_UNIT"; do
    systemd-analyze verify "$u" 2>&1 | tee "$tmp/verify.out" >&2
    [ ! -s "$tmp/verify.out" ] || die "systemd-analyze verify $u reported problems"
done

# --- 3. the installed programs, by their units' ExecStart lines -------------------------------
# ExecStart of UNIT with $NAME replaced by VALUE, as systemd expands it (split at whitespace,
# no globbing).
exec_start() {
    local line
    line="$(sed -n 's/^ExecStart=//p' "$1")"
    line="${line//\$$2/$3}"
    case "$line" in *'$'*) die "$1: ExecStart uses a variable deb.sh does not know: $line" ;; esac
    printf '%s\n' "$line"
}
# Runs a command line as the unit's User=/Group= with its UMask=, an empty environment plus
# the given variables, and no privileges: what systemd does, without systemd.
as_unit() {
    local unit="$1" vars="$2" cmd="$3"; shift 3
    local user group um
    user="$(sed -n 's/^User=//p' "$unit")"
    group="$(sed -n 's/^Group=//p' "$unit")"
    um="$(sed -n 's/^UMask=//p' "$unit")"
    (
        set -f
        umask "$um"
        cd /
        # shellcheck disable=SC2086 # split at whitespace, no globbing: what systemd does
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin $vars \
            setpriv --reuid="$user" --regid="$group" --init-groups --inh-caps=-all \
            --bounding-set=-all --no-new-privs $cmd "$@"
    )
}

echo "== boundkey-authd and boundkeyd as installed, against swtpm"
export TSS2_LOG=all+none
port="$(python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    c = socket.socket()
    try:
        c.bind(("127.0.0.1", p + 1)); break
    except OSError:
        pass
print(p)')"
mkdir "$tmp/tpm"
swtpm socket --tpm2 --tpmstate dir="$tmp/tpm" --server type=tcp,port="$port" \
    --ctrl type=tcp,port=$((port + 1)) --flags not-need-init,startup-clear &
pids+=($!)

grep -q '^EnvironmentFile=/etc/boundkey/authd.env$' "$AUTHD_UNIT" || die "$AUTHD_UNIT: EnvironmentFile= changed; update deb.sh"
as_unit "$AUTHD_UNIT" "" \
    "$(exec_start "$AUTHD_UNIT" BOUNDKEY_AUTHD_ARGS "--cluster=deb-check --listen=127.0.0.1:0")" \
    >"$tmp/authd.out" 2>"$tmp/authd.err" &
pids+=($!)
for _ in $(seq 1 100); do grep -qs '^listening:' "$tmp/authd.out" && break; sleep 0.1; done
grep -q '^listening:' "$tmp/authd.out" || die "the installed boundkey-authd did not start"
ctl() { boundkeyctl --data-dir /var/lib/boundkey-authd "$@"; }
ctl bots add device >/dev/null
ctl tokens add --bot device --join-method bound_keypair >"$tmp/token" 2>/dev/null
uri="$(sed -n 's/^join_uri: *//p' "$tmp/token")"
secret="$(sed -n 's/^registration_secret: *//p' "$tmp/token")"
token="$(sed -n 's/^name: *//p' "$tmp/token")"
[ -n "$uri" ] || die "boundkeyctl tokens add printed no join URI"
[ -n "$secret" ] || die "boundkeyctl tokens add printed no registration secret"
# join.env as the provisioning step writes it (packaging/join.env.example).
printf 'BOUNDKEY_JOIN_ARGS=--join-uri=%s\nBOUNDKEY_REGISTRATION_SECRET=%s\n' \
    "${uri/:$secret@/@}" "$secret" >/etc/boundkey/join.env
chmod 0600 /etc/boundkey/join.env
grep -q '^EnvironmentFile=-/etc/boundkey/join.env$' "$AGENT_UNIT" || die "$AGENT_UNIT: EnvironmentFile= changed; update deb.sh"

# The agent's unit, once, with join.env read as systemd reads it (as root, before dropping).
run_agent() {
    (
        set -a
        # shellcheck disable=SC1091 # written above
        . /etc/boundkey/join.env
        set +a
        as_unit "$AGENT_UNIT" \
            "TSS2_LOG=$TSS2_LOG BOUNDKEY_JOIN_ARGS=$BOUNDKEY_JOIN_ARGS BOUNDKEY_REGISTRATION_SECRET=$BOUNDKEY_REGISTRATION_SECRET" \
            "$(exec_start "$AGENT_UNIT" BOUNDKEY_JOIN_ARGS "$BOUNDKEY_JOIN_ARGS")" \
            --tcti "swtpm:host=127.0.0.1,port=$port" --oneshot "$@"
    )
}
# field NAME of `boundkeyd status --format json` for the installed storage directory
agent_status() {
    /usr/bin/boundkeyd status --config /etc/boundkey/boundkeyd.toml --format json \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}
recoveries() {
    ctl --format json tokens show "$token" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["recovery_count"])'
}

# /dev/tpmrm0 does not exist here, so the key store is named once (it is then remembered).
run_agent --keystore tpm 2>"$tmp/join.err" || die "join through the installed unit's ExecStart failed"
run_agent 2>"$tmp/renew.err" || die "renewal through the installed unit's ExecStart failed"
[ "$(agent_status keystore)" = tpm ] || die "the agent does not use the TPM key store"
[ "$(agent_status generation)" = 2 ] || die "generation after join and renewal: $(agent_status generation)"
[ "$(stat -c '%U %a' /run/boundkeyd/current/key.pem)" = "boundkeyd 600" ] || die "key.pem is not boundkeyd 0600"
[ "$(stat -c '%a' /run/boundkeyd/current/cert.pem)" = 644 ] || die "cert.pem is not 0644"
instance="$(agent_status instance_id)"
spent="$(recoveries)"

# --- 4. remove, reinstall: the device's state survives ----------------------------------------
echo "== dpkg -r and reinstall keep the device's state"
dpkg -r boundkeyd >/dev/null
[ "$(dpkg-query -W -f='${Status}' boundkeyd)" = "deinstall ok config-files" ] || die "boundkeyd: unexpected state after dpkg -r"
for f in /usr/bin/boundkeyd "$AGENT_UNIT"; do [ ! -e "$f" ] || die "dpkg -r left $f"; done
for f in /etc/boundkey/boundkeyd.toml /etc/boundkey/join.env; do [ -f "$f" ] || die "dpkg -r removed $f"; done
ls /var/lib/boundkeyd/keys/*.tpmkey >/dev/null 2>&1 || die "dpkg -r removed the storage directory's key"
dpkg -i "$agent_deb" >/dev/null
run_agent 2>"$tmp/renew2.err" || die "renewal after reinstall failed"
[ "$(agent_status generation)" = 3 ] || die "generation after reinstall and renewal: $(agent_status generation)"
[ "$(agent_status instance_id)" = "$instance" ] || die "the renewal after reinstall started a new instance"
[ "$(recoveries)" = "$spent" ] || die "the renewal after reinstall spent a recovery"

# --- 5. purge -----------------------------------------------------------------------------------
echo "== dpkg --purge boundkeyd"
dpkg --purge boundkeyd >/dev/null
installed boundkeyd && die "boundkeyd is still known to dpkg after purge"
for f in /etc/boundkey/boundkeyd.toml /etc/boundkey/join.env; do [ ! -e "$f" ] || die "purge left $f"; done
[ ! -e /run/boundkeyd ] || die "purge left /run/boundkeyd"
ls /var/lib/boundkeyd/keys/*.tpmkey >/dev/null 2>&1 || die "purge removed the storage directory (it must keep it)"
echo "deb.sh: ok ($(basename "$agent_deb") $(du -k "$agent_deb" | cut -f1) KiB, $(basename "$server_deb") $(du -k "$server_deb" | cut -f1) KiB)"
