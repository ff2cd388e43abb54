#!/usr/bin/env bash
# RFC 6455 conformance over wss://: the Autobahn cases of scripts/autobahn.sh, with megasock
# serving TLS. kosoku 0.1.0 cannot open wss:// URLs (it answers `invalid url scheme "wss":
# expected ws or http`), so each case connection goes through a local relay that speaks plain
# TCP to kosoku and TLS 1.3 to megasock (scripts/lib/tls_relay.py, the test CA checked): the
# frames, their splits into reads and the close order reach megasock through its TLS transport.
#
#   scripts/autobahn-wss.sh            (environment as for scripts/autobahn.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
command -v openssl >/dev/null || { echo "autobahn-wss: openssl is required" >&2; exit 1; }
if [[ -z ${MEGASOCK_BIN:-} ]]; then
    cargo build --release --bin megasock
    MEGASOCK_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/megasock
fi
TLS_DIR=$(mktemp -d)
trap 'rm -rf "$TLS_DIR"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=megasock autobahn CA" -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/req.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$TLS_DIR/ext"
openssl x509 -req -in "$TLS_DIR/req.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 2 -extfile "$TLS_DIR/ext" -out "$TLS_DIR/cert.pem" 2>/dev/null
export REAL_MEGASOCK_BIN=$MEGASOCK_BIN TLS_DIR
export MEGASOCK_BIN=$ROOT/scripts/lib/megasock-behind-tls-relay.sh
scripts/autobahn.sh
