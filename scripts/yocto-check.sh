#!/usr/bin/env bash
# Offline checks of the systemd unit (packaging/) and the Yocto layer (yocto-layer/):
#   1. the crates include file is exactly what Cargo.lock gives (same format as the
#      cargo-update-recipe-crates class), and the recipe's LIC_FILES_CHKSUM matches Cargo.toml;
#   2. oelint-adv (pinned, from PyPI, in a cached virtualenv) finds no error in the recipes,
#      for scarthgap and for wrynose;
#   3. layer.conf declares both LTS releases; the recipe installs files that exist;
#   4. systemd-analyze verify passes on the unit, its exposure score stays at most
#      BOUNDKEY_MAX_EXPOSURE (default 2.0), the sysusers.d file parses;
#   5. the default configuration file is accepted by boundkeyd (when a built one is found);
#   6. with --e2e (root, built debug binaries): the unit's ExecStart line, run the way systemd
#      runs it (its user from the sysusers.d file, its directories, UMask, EnvironmentFile, no
#      privileges) under strace, joins a local boundkey-authd with a key in swtpm, renews with
#      the spent join settings still present, and uses only system calls that the unit's
#      SystemCallFilter= allows.
# Nothing is fetched except oelint-adv on the first run (and apt packages that are missing).
#
#   scripts/yocto-check.sh [--e2e]    check
#   scripts/yocto-check.sh --update   rewrite the crates include file and LIC_FILES_CHKSUM
set -euo pipefail
cd "$(dirname "$0")/.."

OELINT_VERSION=9.11.2
MAX_EXPOSURE="${BOUNDKEY_MAX_EXPOSURE:-2.0}"
RECIPE_DIR=yocto-layer/recipes-security/boundkeyd
RECIPE="$RECIPE_DIR/boundkeyd_git.bb"
CRATES_INC="$RECIPE_DIR/boundkeyd-crates.inc"
UNIT=packaging/boundkeyd.service
CACHE="${BOUNDKEY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/boundkey}"

die() { echo "yocto-check: $*" >&2; exit 1; }

update=0
e2e=0
case "${1:-}" in
    --update) update=1 ;;
    --e2e) e2e=1 ;;
    "") ;;
    *) die "unknown argument '$1' (use --update, --e2e or nothing)" ;;
esac

# systemd-analyze and systemd-sysusers, python3 with venv for the linter; --e2e also runs
# swtpm (already in the list), strace and setpriv.
. scripts/deps.sh
BOUNDKEY_DEBIAN_PACKAGES+=(systemd python3 python3-venv)
[ "$e2e" -eq 1 ] && BOUNDKEY_DEBIAN_PACKAGES+=(strace util-linux)
boundkey_install_deps
python3 -c 'import tomllib' 2>/dev/null || die "python3 3.11 or newer is required (tomllib)"

tmp="$(mktemp -d)"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

# --- 1. crates include file and license checksum ------------------------------------------
echo "== crates include file and LIC_FILES_CHKSUM"
python3 - "$update" "$CRATES_INC" "$RECIPE" <<'PY'
import hashlib, re, sys, tomllib

update, inc_path, recipe_path = sys.argv[1] == "1", sys.argv[2], sys.argv[3]

# The body is what the cargo-update-recipe-crates class writes (`bitbake -c update_crates
# boundkeyd`) for the workspace's Cargo.lock: crate:// URIs in lock order, then checksums.
with open("Cargo.lock", "rb") as f:
    lock = tomllib.load(f)
crates = [p for p in lock["package"] if "crates.io" in p.get("source", "")]
if not crates:
    sys.exit("yocto-check: Cargo.lock lists no crates.io package")
other = [p["name"] for p in lock["package"] if "source" in p and "crates.io" not in p["source"]]
if other:
    sys.exit("yocto-check: Cargo.lock has packages from other sources, which the recipe cannot "
             "vendor yet: " + ", ".join(other))
out = ["# Generated from Cargo.lock by scripts/yocto-check.sh --update (the same entries as",
       "# `bitbake -c update_crates boundkeyd`, whose layout oelint-adv flags). Do not edit.",
       "", "# from Cargo.lock", "# nooelint: oelint.vars.inconspaces,oelint.vars.notneededspace",
       'SRC_URI += " \\']
out += ["    crate://crates.io/%s/%s \\" % (p["name"], p["version"]) for p in crates]
out += ['"', ""]
out += ['SRC_URI[%s-%s.sha256sum] = "%s"' % (p["name"], p["version"], p["checksum"])
        for p in crates]
want = "\n".join(out) + "\n"

# LIC_FILES_CHKSUM: the workspace's license line in Cargo.toml.
toml_lines = open("Cargo.toml", "rb").read().split(b"\n")
idx = [i for i, l in enumerate(toml_lines) if re.match(rb'^license = "', l)]
if len(idx) != 1:
    sys.exit("yocto-check: Cargo.toml must have exactly one top-level `license = \"…\"` line")
n = idx[0] + 1
md5 = hashlib.md5(toml_lines[idx[0]] + b"\n").hexdigest()
lic = 'LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=%d;endline=%d;md5=%s"' % (n, n, md5)
declared = re.search(rb'"(.*)"', toml_lines[idx[0]]).group(1).decode()
recipe = open(recipe_path).read()
m = re.search(r'^LICENSE = "(.*)"$', recipe, re.M)
if not m or m.group(1) != declared:
    sys.exit("yocto-check: %s: LICENSE must be \"%s\" as in Cargo.toml" % (recipe_path, declared))

if update:
    open(inc_path, "w").write(want)
    recipe = re.sub(r"^LIC_FILES_CHKSUM = .*$", lic, recipe, count=1, flags=re.M)
    open(recipe_path, "w").write(recipe)
    print("updated %s (%d crates) and %s" % (inc_path, len(crates), recipe_path))
    sys.exit(0)

try:
    have = open(inc_path).read()
except FileNotFoundError:
    have = ""
if have != want:
    import difflib
    sys.stdout.writelines(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                               inc_path, "from Cargo.lock", n=1))
    sys.exit("yocto-check: %s does not match Cargo.lock; run scripts/yocto-check.sh --update" % inc_path)
if lic not in recipe.splitlines():
    sys.exit("yocto-check: %s: LIC_FILES_CHKSUM must be\n  %s\nrun scripts/yocto-check.sh --update"
             % (recipe_path, lic))
print("%s: %d crates, matches Cargo.lock; LIC_FILES_CHKSUM matches Cargo.toml line %d"
      % (inc_path, len(crates), n))
PY
[ "$update" -eq 1 ] && exit 0

# --- 2. oelint-adv -------------------------------------------------------------------------
echo "== oelint-adv $OELINT_VERSION"
venv="$CACHE/oelint-adv-$OELINT_VERSION"
if [ ! -x "$venv/bin/oelint-adv" ]; then
    echo "installing oelint-adv $OELINT_VERSION into $venv" >&2
    python3 -m venv "$venv" >/dev/null 2>&1 || die "cannot create a virtualenv (apt-get install python3-venv)"
    "$venv/bin/pip" install -q --disable-pip-version-check "oelint-adv==$OELINT_VERSION" \
        || { rm -rf "$venv"; die "pip install oelint-adv==$OELINT_VERSION failed"; }
fi
for release in scarthgap wrynose; do
    # Findings are printed; only errors fail (warnings and info are style advice).
    # homepageping would go on the network: this check stays offline.
    out="$("$venv/bin/oelint-adv" --quiet --relpaths --release "$release" --jobs 1 \
        --suppress oelint.vars.homepageping \
        "$RECIPE" "$CRATES_INC" yocto-layer/conf/layer.conf 2>&1 || true)"
    [ -n "$out" ] && printf '%s\n' "$out"
    # oelint-adv exits 1 for any finding; anything but finding lines means it failed to run.
    if [ -n "$out" ] && printf '%s\n' "$out" | grep -vqE '^[^:]+:[0-9]+:(error|warning|info):'; then
        die "oelint-adv did not run cleanly for $release (output above)"
    fi
    if printf '%s\n' "$out" | grep -q ':error:'; then
        die "oelint-adv reports errors for $release"
    fi
    echo "oelint-adv --release $release: no errors ($(printf '%s' "$out" | grep -c ':warning:' || true) warnings)"
done

# --- 3. layer and recipe consistency -------------------------------------------------------
echo "== layer.conf and recipe"
for release in scarthgap wrynose; do
    grep -Eq "^LAYERSERIES_COMPAT_boundkey = \".*\\b$release\\b" yocto-layer/conf/layer.conf \
        || die "yocto-layer/conf/layer.conf: LAYERSERIES_COMPAT_boundkey must list $release"
done
# shellcheck disable=SC2016 # ${S} is BitBake syntax, matched literally
grep -o '${S}/packaging/[A-Za-z0-9._-]*' "$RECIPE" | sed 's,^[$]{S}/,,' | sort -u | while read -r f; do
    [ -f "$f" ] || die "$RECIPE installs $f, which does not exist"
done
# shellcheck disable=SC2016
grep -q '^SYSTEMD_SERVICE:${PN} = "boundkeyd.service"' "$RECIPE" || die "$RECIPE: SYSTEMD_SERVICE must name boundkeyd.service"
grep -Eq 'USERADD_PARAM:\$\{PN\} = .*--groups tss' "$RECIPE" || die "$RECIPE: the boundkeyd user must be in the tss group"
# PACKAGECONFIG maps to `--no-default-features [--features tpm]`: the root package must keep a
# `tpm` feature, on by default (what a plain cargo build ships).
python3 - <<'PY' || die "Cargo.toml: the recipe needs the boundkey package's feature \"tpm\", in its defaults"
import sys, tomllib
f = tomllib.load(open("Cargo.toml", "rb")).get("features", {})
sys.exit(0 if "tpm" in f and "tpm" in f.get("default", []) else 1)
PY
echo "ok"

# --- 4. systemd unit -----------------------------------------------------------------------
echo "== systemd-analyze verify / security"
# The unit names /usr/bin/boundkeyd, which verify requires to be executable: check a copy that
# points at a stand-in, everything else unchanged.
mkdir -p "$tmp/bin" "$tmp/unit"
printf '#!/bin/sh\nexit 0\n' > "$tmp/bin/boundkeyd"
chmod 0755 "$tmp/bin/boundkeyd"
sed "s,/usr/bin/boundkeyd,$tmp/bin/boundkeyd," "$UNIT" > "$tmp/unit/boundkeyd.service"
if ! out="$(systemd-analyze verify "$tmp/unit/boundkeyd.service" 2>&1)" || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    die "systemd-analyze verify reports problems in $UNIT"
fi
echo "systemd-analyze verify: clean"
exposure="$(systemd-analyze security --offline=yes "$tmp/unit/boundkeyd.service" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for boundkeyd.service: \([0-9.]*\).*/\1/p')"
[ -n "$exposure" ] || die "systemd-analyze security printed no exposure level"
echo "systemd-analyze security: exposure $exposure (at most $MAX_EXPOSURE allowed)"
python3 -c "import sys; sys.exit(float('$exposure') > float('$MAX_EXPOSURE'))" \
    || die "exposure $exposure of $UNIT is above $MAX_EXPOSURE: a hardening setting was lost"
# The directories the unit creates are the ones the configuration file names.
if ! { grep -q '^storage = "/var/lib/boundkeyd"' packaging/boundkeyd.toml && grep -q '^StateDirectory=boundkeyd$' "$UNIT" \
    && grep -q '^destination = "/run/boundkeyd"' packaging/boundkeyd.toml && grep -q '^RuntimeDirectory=boundkeyd$' "$UNIT"; }; then
    die "packaging/boundkeyd.toml's storage/destination and the unit's StateDirectory/RuntimeDirectory disagree"
fi
if command -v systemd-sysusers >/dev/null; then
    mkdir -p "$tmp/root/etc" "$tmp/root/usr/lib/sysusers.d"
    cp packaging/boundkeyd.sysusers "$tmp/root/usr/lib/sysusers.d/boundkeyd.conf"
    systemd-sysusers --dry-run --root="$tmp/root" >"$tmp/sysusers.out" 2>"$tmp/sysusers.err" \
        || { cat "$tmp/sysusers.err" >&2; die "systemd-sysusers rejects packaging/boundkeyd.sysusers"; }
    echo "systemd-sysusers --dry-run: ok"
fi

# --- 5. default configuration --------------------------------------------------------------
echo "== default configuration"
agent="${BOUNDKEYD:-${CARGO_TARGET_DIR:-target}/debug/boundkeyd}"
if [ -x "$agent" ]; then
    # `status` loads and validates the whole file (unknown keys are errors); --storage points
    # it at an empty directory instead of /var/lib/boundkeyd.
    mkdir -m 0700 "$tmp/storage"
    "$agent" status --config packaging/boundkeyd.toml --storage "$tmp/storage" >/dev/null \
        || die "$agent does not accept packaging/boundkeyd.toml"
    echo "packaging/boundkeyd.toml: accepted by $agent"
else
    echo "packaging/boundkeyd.toml: not run through boundkeyd (no built agent at $agent; set BOUNDKEYD)"
fi

# --- 6. the unit's command line, end to end -----------------------------------------------
if [ "$e2e" -eq 1 ]; then
    echo "== ExecStart as the unit's user against boundkey-authd and swtpm (--e2e)"
    [ "$(id -u)" -eq 0 ] || die "--e2e needs root (it creates the unit's system user and drops to it)"
    bin="${CARGO_TARGET_DIR:-target}/debug"
    for b in boundkeyd boundkey-authd boundkeyctl; do
        [ -x "$bin/$b" ] || die "--e2e needs $bin/$b: run cargo build --workspace --bins first"
    done
    export TSS2_LOG=all+none
    user="$(sed -n 's/^User=//p' "$UNIT")"
    group="$(sed -n 's/^Group=//p' "$UNIT")"
    umask_unit="$(sed -n 's/^UMask=//p' "$UNIT")"
    systemd-sysusers "$PWD/packaging/boundkeyd.sysusers"
    id -nG "$user" | grep -qw tss || die "the sysusers.d file did not put $user in the tss group"

    t="$tmp/e2e"
    mkdir -p "$t/tpm" "$t/auth" "$t/etc"
    chmod 0755 "$tmp" "$t"
    install -m 0755 "$bin/boundkeyd" "$t/boundkeyd"
    # What StateDirectory=/RuntimeDirectory= create, at the unit's modes.
    install -d -o "$user" -g "$group" -m "$(sed -n 's/^StateDirectoryMode=//p' "$UNIT")" "$t/state"
    install -d -o "$user" -g "$group" -m "$(sed -n 's/^RuntimeDirectoryMode=//p' "$UNIT")" "$t/run"
    sed -e "s,^storage = .*,storage = \"$t/state\"," -e "s,^destination = .*,destination = \"$t/run\"," \
        packaging/boundkeyd.toml > "$t/etc/boundkeyd.toml"

    port="$(python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    c = socket.socket()
    try:
        c.bind(("127.0.0.1", p + 1)); break
    except OSError:
        pass
print(p)')"
    swtpm socket --tpm2 --tpmstate dir="$t/tpm" --server type=tcp,port="$port" \
        --ctrl type=tcp,port=$((port + 1)) --flags not-need-init,startup-clear &
    pids+=($!)
    "$bin/boundkey-authd" start --data-dir "$t/auth" --listen 127.0.0.1:0 --cluster yocto-check \
        >"$t/authd.out" 2>"$t/authd.err" &
    pids+=($!)
    for _ in $(seq 1 100); do grep -q '^listening:' "$t/authd.out" && break; sleep 0.1; done
    grep -q '^listening:' "$t/authd.out" || { cat "$t/authd.err" >&2; die "boundkey-authd did not start"; }
    "$bin/boundkeyctl" --data-dir "$t/auth" bots add device >/dev/null
    "$bin/boundkeyctl" --data-dir "$t/auth" tokens add --bot device --join-method bound_keypair \
        >"$t/token" 2>/dev/null
    uri="$(sed -n 's/^join_uri: *//p' "$t/token")"
    secret="$(sed -n 's/^registration_secret: *//p' "$t/token")"
    # join.env as packaging/join.env.example describes it: the URI without its secret.
    printf 'BOUNDKEY_JOIN_ARGS=--join-uri=%s\nBOUNDKEY_REGISTRATION_SECRET=%s\n' \
        "${uri/:$secret@/@}" "$secret" > "$t/etc/join.env"
    chmod 0600 "$t/etc/join.env"

    # ExecStart from the unit, its paths pointed at the copies above. systemd splits $VAR at
    # whitespace without globbing, starts from an empty environment plus EnvironmentFile=.
    exec_start="$(sed -n 's/^ExecStart=//p' "$UNIT")"
    exec_start="${exec_start//\/usr\/bin\/boundkeyd/$t/boundkeyd}"
    exec_start="${exec_start//\/etc\/boundkey\/boundkeyd.toml/$t/etc/boundkeyd.toml}"
    grep -q '^EnvironmentFile=-/etc/boundkey/join.env$' "$UNIT" || die "$UNIT: EnvironmentFile= changed; update --e2e"
    run_unit() {
        local log="$1"; shift
        (
            set -f
            set -a
            # shellcheck disable=SC1091 # written just above
            . "$t/etc/join.env"
            set +a
            umask "$umask_unit"
            local cmd="${exec_start//\$BOUNDKEY_JOIN_ARGS/${BOUNDKEY_JOIN_ARGS:-}}"
            case "$cmd" in *'$'*) die "ExecStart uses a variable --e2e does not know: $exec_start" ;; esac
            # shellcheck disable=SC2086 # split at whitespace, no globbing: what systemd does
            strace -f -qq -o "$log" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TSS2_LOG="$TSS2_LOG" \
                BOUNDKEY_JOIN_ARGS="${BOUNDKEY_JOIN_ARGS:-}" \
                BOUNDKEY_REGISTRATION_SECRET="${BOUNDKEY_REGISTRATION_SECRET:-}" \
                setpriv --reuid="$user" --regid="$group" --init-groups --inh-caps=-all \
                --bounding-set=-all --no-new-privs \
                $cmd --tcti "swtpm:host=127.0.0.1,port=$port" --oneshot "$@"
        )
    }
    # /dev/tpmrm0 does not exist here, so the key store is named once (it is then remembered).
    run_unit "$t/strace.join" --keystore tpm 2>"$t/join.err" \
        || { cat "$t/join.err" >&2; die "first join through the unit's ExecStart failed"; }
    run_unit "$t/strace.renew" 2>"$t/renew.err" \
        || { cat "$t/renew.err" >&2; die "renewal through the unit's ExecStart failed (join.env left in place)"; }
    status="$("$t/boundkeyd" status --storage "$t/state" --format json)"
    python3 - "$status" <<'PY' || die "unexpected state after join and renewal"
import json, sys
s = json.loads(sys.argv[1])
assert s["keystore"] == "tpm" and s["generation"] == 2 and s["valid"], s
PY
    [ "$(stat -c '%U %a' "$t/state")" = "$user 700" ] || die "storage directory is not $user 0700"
    [ "$(stat -c '%U %a' "$t/run/current/key.pem")" = "$user 600" ] || die "key.pem is not $user 0600"
    [ "$(stat -c '%a' "$t/run/current/cert.pem")" = "644" ] || die "cert.pem is not 0644 under UMask=$umask_unit"
    ls "$t/state/keys/"*.tpmkey >/dev/null 2>&1 || die "no TPM key blob in the storage directory"
    python3 - "$UNIT" "$t/strace.join" "$t/strace.renew" <<'PY'
import re, subprocess, sys

def expand(group):
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                         text=True, check=True).stdout
    names = set()
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == group:
            continue
        names |= expand(line) if line.startswith("@") else {line}
    return names

def names(words):
    return set().union(*[expand(w) if w.startswith("@") else {w} for w in words])

allowed = None
for line in open(sys.argv[1]):
    m = re.match(r"SystemCallFilter=(~?)(.*)", line.strip())
    if m:
        words = m.group(2).split()
        if m.group(1):
            allowed -= names(words)
        else:
            allowed = names(words) if allowed is None else allowed | names(words)
used = set()
for path in sys.argv[2:]:
    agent = set()
    for line in open(path):
        m = re.match(r"(\d+)\s+(\w+)\(", line)
        if not m:
            continue
        pid, call = m.groups()
        if call == "execve" and re.match(r'\d+\s+execve\("[^"]*/boundkeyd"', line):
            agent.add(pid)
            continue
        if pid in agent:
            used.add(call)
            if call in ("clone", "clone3", "fork", "vfork"):
                r = re.search(r"= (\d+)$", line.strip())
                if r:
                    agent.add(r.group(1))
if not used:
    sys.exit("yocto-check: strace saw no system call of boundkeyd")
bad = sorted(used - allowed)
if bad:
    sys.exit("yocto-check: boundkeyd used system calls that SystemCallFilter= denies: " + " ".join(bad))
print("join and renewal as %s: ok; %d distinct system calls, all allowed by SystemCallFilter="
      % ("the unit's user", len(used)))
PY
fi
echo "yocto-check: all checks passed"
