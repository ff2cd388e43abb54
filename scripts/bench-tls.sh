#!/usr/bin/env bash
# bench-tls.sh: the wss:// figures of issue 12, each beside its reference in the same run, the
# servers taking turns (A B A B ...), medians printed at the end.
#
#   scripts/bench-tls.sh [ROUNDS]        default 3 rounds
#
# 1. Idle memory: 15,000 connections opened and held on a fresh megasock (1 worker) each time,
#    over ws:// and over wss:// (TLS 1.3, the test CA checked): server RSS growth per
#    connection, as megasock-bench connect --server-pid reports it.
# 2. Broadcast over TLS: 2,000 members of one room, 4 publishers x 2,500 messages of 64 B,
#    megasock (1 worker) against uWebSockets.js SSLApp (bench/peers/uws --tls-cert), the server
#    on CPU 0 and the load generator on CPU 1: server CPU time per delivery.
#
# A test CA and a localhost/127.0.0.1 certificate are made with openssl for the run. Results,
# logs and the exact commands go to bench/results/<date>-tls/. Needs the release binaries
# (built here unless NO_BUILD=1), node and npm for the uws peer, openssl, python3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${1:-3}
CONNS=${CONNS:-15000}
BCAST=(--subs 2000 --pubs 4 --msgs 2500 --size 64)
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [ROUNDS]" >&2; exit 2; }
OUT=$ROOT/bench/results/$(date +%Y%m%d-%H%M%S)-tls
mkdir -p "$OUT"
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
if [[ ${NO_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --workspace --bins)
fi
if [[ ! -d $ROOT/bench/peers/uws/node_modules ]]; then
    (cd "$ROOT/bench/peers/uws" && npm ci --no-audit --no-fund)
fi
ulimit -n "$(ulimit -Hn)"

# The test PKI: a CA, and a P-256 certificate for localhost and 127.0.0.1 signed by it.
PKI=$OUT/pki
mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=megasock bench CA" -keyout "$PKI/ca.key" -out "$PKI/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$PKI/key.pem" -out "$PKI/req.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$PKI/ext"
openssl x509 -req -in "$PKI/req.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 2 -extfile "$PKI/ext" -out "$PKI/cert.pem" 2>/dev/null

SERVER_PID=""
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT

# start NAME CPUS: starts a server (megasock-ws, megasock-wss or uws-wss); sets SERVER_PID, URL.
start() {
    local name=$1 cpus=$2 ready=$OUT/$1.ready key
    rm -f "$ready"
    case $name in
    megasock-ws)
        taskset -c "$cpus" "$BIN/megasock" --listen 127.0.0.1:0 --workers 1 \
            --ready-file "$ready" >>"$OUT/$name.log" 2>&1 &
        key=ws ;;
    megasock-wss)
        taskset -c "$cpus" "$BIN/megasock" --tls-listen 127.0.0.1:0 --workers 1 \
            --tls-cert "$PKI/cert.pem" --tls-key "$PKI/key.pem" \
            --ready-file "$ready" >>"$OUT/$name.log" 2>&1 &
        key=wss ;;
    uws-wss)
        taskset -c "$cpus" node "$ROOT/bench/peers/uws/server.js" --listen 127.0.0.1:0 \
            --tls-cert "$PKI/cert.pem" --tls-key "$PKI/key.pem" \
            --ready-file "$ready" >>"$OUT/$name.log" 2>&1 &
        key=wss ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 200); do
        [[ -s $ready ]] && grep -q "^$key=" "$ready" && break
        sleep 0.05
    done
    URL="$key://$(sed -n "s/^$key=//p" "$ready" | head -n1)"
    [[ $URL != "$key://" ]] || { echo "$name did not start (log: $OUT/$name.log)" >&2; exit 3; }
}

bench() { # bench NAME ROUND CPUS SCENARIO ARGS...
    local name=$1 round=$2 cpus=$3 out
    shift 3
    out=$OUT/$name-$1-$round
    echo "taskset -c $cpus megasock-bench $* --server-pid $SERVER_PID --ca $PKI/ca.pem" >>"$OUT/commands.txt"
    taskset -c "$cpus" "$BIN/megasock-bench" "$@" --server-pid "$SERVER_PID" --ca "$PKI/ca.pem" \
        --progress none --no-plots --json "$out.json" >"$out.txt" 2>&1 || {
        echo "megasock-bench failed: $out.txt" >&2
        cat "$out.txt" >&2
        exit 1
    }
}

for r in $(seq "$ROUNDS"); do
    for s in megasock-ws megasock-wss; do
        start "$s" 0
        echo "round $r: connect $CONNS to $s"
        bench "$s" "$r" 1 connect --url "$URL/echo" --conns "$CONNS" --hold 3
        stop_server
    done
    for s in megasock-wss uws-wss; do
        start "$s" 0
        echo "round $r: broadcast to $s"
        bench "$s" "$r" 1 broadcast --url "$URL/ws/tls-$r" "${BCAST[@]}"
        stop_server
    done
done

python3 - "$OUT" "$ROUNDS" <<'PYTHON' | tee "$OUT/summary.txt"
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(name, scen):
    return [f"{out}/{name}-{scen}-{r}" for r in range(1, rounds + 1)]
def med(xs):
    return statistics.median(xs), min(xs), max(xs)
print(f"wss:// figures, {rounds} rounds, medians (min - max); files in {out}")
rss = {}
for name in ["megasock-ws", "megasock-wss"]:
    js = [json.load(open(p + ".json")) for p in runs(name, "connect")]
    rss[name] = med([j["server"]["rss_per_conn_bytes"] for j in js])
    m, lo, hi = rss[name]
    slab = statistics.median(j["server"]["kernel_slab_per_conn_bytes"] for j in js)
    rate = statistics.median(j["connect_rate_per_s"] for j in js)
    print(f"  idle RSS per connection at 15,000, {name:13} {m:7.0f} B  ({lo:.0f} - {hi:.0f}); "
          f"kernel slab {slab:.0f} B (both ends); {rate:.0f} connects/s")
cpu = {}
for name in ["megasock-wss", "uws-wss"]:
    xs = []
    for p in runs(name, "broadcast"):
        text = open(p + ".txt").read()
        m = re.search(r"server: ([0-9.]+) CPU-s during the run", text)
        d = json.load(open(p + ".json"))["deliveries"]
        xs.append(float(m.group(1)) * 1e9 / d)
    cpu[name] = med(xs)
    m, lo, hi = cpu[name]
    print(f"  broadcast server CPU per delivery, {name:13} {m:7.1f} ns  ({lo:.1f} - {hi:.1f})")
print(f"  megasock / uWebSockets.js SSLApp CPU per delivery: {cpu['megasock-wss'][0] / cpu['uws-wss'][0]:.3f}x (goal <= 0.5x)")
PYTHON
