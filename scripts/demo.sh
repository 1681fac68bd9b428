#!/usr/bin/env bash
# The main job, end to end on this machine: an auth service on its embedded SQLite store, a bot
# and a bound-keypair token, an agent joining with its key in a software TPM (swtpm), then the
# resulting identity and bot instance. Everything runs under a fresh temporary directory and is
# stopped on exit. Set KEEP=1 to keep the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
boundkey_install_deps
export TSS2_LOG="${TSS2_LOG:-all+none}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building"
cargo build --workspace --bins --locked --quiet
BIN="$PWD/target/debug"
WORK="$(mktemp -d /tmp/boundkey-demo.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { # a port P with P and P+1 free
    local p
    for _ in $(seq 1 50); do
        p=$(( (RANDOM % 20000) + 30000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    return 1
}

wait_for_line() { # file pattern
    for _ in $(seq 1 100); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

say "starting the auth service (cluster demo, SQLite store in $WORK/auth)"
"$BIN/boundkey-authd" start --data-dir "$WORK/auth" --listen 127.0.0.1:0 --cluster demo \
    >"$WORK/authd.out" 2>"$WORK/authd.log" &
PIDS+=($!)
wait_for_line "$WORK/authd.out" '^listening:'
cat "$WORK/authd.out"
ADDR=$(sed -n 's/^listening: //p' "$WORK/authd.out")
CTL=("$BIN/boundkeyctl" --data-dir "$WORK/auth")

say "boundkeyctl bots add demo-bot"
"${CTL[@]}" bots add demo-bot
say "boundkeyctl tokens add --bot demo-bot --join-method bound_keypair"
"${CTL[@]}" --format json tokens add --bot demo-bot --join-method bound_keypair \
    --recovery-limit 3 --auth-server "$ADDR" >"$WORK/token.json"
cat "$WORK/token.json"; echo
JOIN_URI=$(sed -n 's/.*"join_uri" *: *"\([^"]*\)".*/\1/p' "$WORK/token.json")
TOKEN=$(sed -n 's/.*"name" *: *"\([^"]*\)".*/\1/p' "$WORK/token.json")

KEYSTORE=(--keystore file)
if command -v swtpm >/dev/null; then
    say "starting a software TPM (swtpm)"
    mkdir -p "$WORK/tpm"
    PORT=$(free_port)
    if swtpm socket --tpm2 --tpmstate "dir=$WORK/tpm" --server "type=tcp,port=$PORT" \
        --ctrl "type=tcp,port=$((PORT + 1))" --flags not-need-init,startup-clear \
        >"$WORK/swtpm.log" 2>&1 &
    then
        PIDS+=($!)
        for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            KEYSTORE=(--keystore tpm --tcti "swtpm:host=127.0.0.1,port=$PORT")
            echo "swtpm on 127.0.0.1:$PORT"
        fi
    fi
fi
if [ "${KEYSTORE[1]}" = file ]; then
    echo "NOTICE: swtpm could not run here; the bound key goes to the file backend instead." >&2
fi

AGENT=("$BIN/boundkeyd")
say "boundkeyd start --oneshot ${KEYSTORE[*]}   (first join: registration secret, new key made in the TPM)"
"${AGENT[@]}" start --oneshot --join-uri "$JOIN_URI" --storage "$WORK/agent" \
    --destination "$WORK/identity" "${KEYSTORE[@]}"
say "boundkeyd start --oneshot   (renewal over mTLS: same instance, generation 2)"
"${AGENT[@]}" start --oneshot --storage "$WORK/agent" --destination "$WORK/identity" "${KEYSTORE[@]}"

say "boundkeyd status"
"${AGENT[@]}" status --storage "$WORK/agent"
say "identity files in $WORK/identity"
ls -l "$WORK/identity/"
openssl x509 -in "$WORK/identity/cert.pem" -noout -subject -issuer -dates -ext subjectAltName
openssl verify -CAfile "$WORK/identity/ca.pem" "$WORK/identity/cert.pem"

say "boundkeyctl instances ls"
"${CTL[@]}" instances ls
INSTANCE=$("$BIN/boundkeyd" status --storage "$WORK/agent" --format json | sed -n 's/.*"instance_id" *: *"\([^"]*\)".*/\1/p')
say "boundkeyctl instances show $INSTANCE"
"${CTL[@]}" instances show "$INSTANCE"
say "boundkeyctl tokens show $TOKEN"
"${CTL[@]}" tokens show "$TOKEN"
say "boundkeyctl audit ls"
"${CTL[@]}" audit ls --limit 10
