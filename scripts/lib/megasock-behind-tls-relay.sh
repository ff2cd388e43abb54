#!/usr/bin/env bash
# Stands in for the megasock binary (MEGASOCK_BIN) in scripts/autobahn.sh, for
# scripts/autobahn-wss.sh: starts the real megasock ($REAL_MEGASOCK_BIN) with the arguments it
# is given plus a wss:// listener (test certificate $TLS_DIR/cert.pem, key.pem), puts the plain
# to TLS relay (tls_relay.py) in front of that listener, and writes the relay's address as the
# `ws=` line of the ready file the caller asked for. SIGTERM stops both.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${REAL_MEGASOCK_BIN:?}" "${TLS_DIR:?}"
PY=${RELAY_PYTHON:-python3}

args=() ready=""
while (($#)); do
    case $1 in
    --ready-file) ready=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
    esac
done
[[ -n $ready ]] || { echo "$0: needs --ready-file" >&2; exit 2; }
inner=$ready.megasock relay_ready=$ready.relay
rm -f "$inner" "$relay_ready"

"$REAL_MEGASOCK_BIN" "${args[@]}" --tls-listen 127.0.0.1:0 \
    --tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem" --ready-file "$inner" &
server=$!
relay=""
stop() {
    [[ -n $relay ]] && kill -TERM "$relay" 2>/dev/null
    kill -TERM "$server" 2>/dev/null
    wait "$server"
}
trap 'stop; exit $?' TERM INT

wss=""
for _ in $(seq 200); do
    wss=$(sed -n 's/^wss=//p' "$inner" 2>/dev/null | head -n1 || true)
    [[ -n $wss ]] && break
    kill -0 "$server" 2>/dev/null || { echo "$0: megasock exited" >&2; exit 1; }
    sleep 0.05
done
[[ -n $wss ]] || { echo "$0: no wss= line from megasock" >&2; kill "$server"; exit 1; }

"$PY" "$HERE/tls_relay.py" --target "$wss" --ca "$TLS_DIR/ca.pem" --ready-file "$relay_ready" &
relay=$!
addr=""
for _ in $(seq 200); do
    addr=$(sed -n 's/^relay=//p' "$relay_ready" 2>/dev/null | head -n1 || true)
    [[ -n $addr ]] && break
    sleep 0.05
done
[[ -n $addr ]] || { echo "$0: the relay did not start" >&2; stop; exit 1; }
printf 'pid=%s\nws=%s\nwss=%s\n' "$$" "$addr" "$wss" >"$ready.tmp"
mv "$ready.tmp" "$ready"
echo "megasock wss://$wss behind the relay ws://$addr" >&2
wait "$server"
