#!/usr/bin/env bash
# A room across two megasock nodes through Redis, against the same room on one node and on two
# Node `ws` nodes bridged the way socket.io's Redis adapter does (bench/peers/node-ws-redis):
# the bench kit's broadcast scenario with the publishers on node A and the other members on
# node B (`--members-url`), the three alternating in every round, medians of ROUNDS.
#
#   scripts/bench-cluster.sh [ROUNDS]        default 3
#
# Environment: BROADCAST_OPTS (default "--subs 2000 --pubs 4 --msgs 250 --size 64"),
# REDIS_SHARDED=1 is not used here (one redis-server). Placement on a 2-core box: the nodes and
# redis-server on CPU 0, the load generator on CPU 1. Everything it starts it stops by pid.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-3}
opts=${BROADCAST_OPTS:-"--subs 2000 --pubs 4 --msgs 250 --size 64"}
cargo build --release -p megasock -p megasock-bench >/dev/null 2>&1 || cargo build --release -p megasock -p megasock-bench
bin=target/release/megasock
bench=target/release/megasock-bench
out="bench/results/cluster-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"

# shellcheck source=scripts/lib/pids.sh
. scripts/lib/pids.sh
declare -A WS=()
stop_all() { stop_pids 5; }
trap stop_all EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

peer=bench/peers/node-ws-redis
[ -d "$peer/node_modules" ] || (cd "$peer" && npm ci --no-audit --no-fund >/dev/null)

# node NAME [options]: starts megasock (or with NODE_PEER=1 the Node peer) on CPU 0; sets
# WS[NAME].
node() {
  local name=$1 ready="$out/$1.ready"
  shift
  rm -f "$ready"
  if [ "${NODE_PEER:-0}" = 1 ]; then
    taskset -c 0 node "$peer/server.js" --listen 127.0.0.1:0 --ready-file "$ready" "$@" \
      >"$out/$name.log" 2>&1 &
  else
    taskset -c 0 "$bin" serve --listen 127.0.0.1:0 --workers 1 --ready-file "$ready" "$@" \
      >"$out/$name.log" 2>&1 &
  fi
  pids+=("$!")
  for _ in $(seq 1 200); do [ -s "$ready" ] && break; sleep 0.05; done
  WS[$name]=$(sed -n 's/^ws=//p' "$ready")
}

figure() { # figure FILE KEY
  python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): d=d[k]
print(d)' "$1" "$2"
}

for round in $(seq 1 "$rounds"); do
  # One node.
  node one
  # shellcheck disable=SC2086 # option list
  taskset -c 1 "$bench" broadcast --url "ws://${WS[one]}/ws/bench" $opts --threads 1 \
    --progress none --no-plots --json "$out/one-$round.json" >"$out/one-$round.txt" 2>&1 || true
  stop_all
  # Two nodes through Redis: megasock, then the Node peer.
  for kind in two node2; do
    port=$(free_port)
    taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      >"$out/redis.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    NODE_PEER=$([ "$kind" = node2 ] && echo 1 || echo 0) node a --redis "redis://127.0.0.1:$port"
    NODE_PEER=$([ "$kind" = node2 ] && echo 1 || echo 0) node b --redis "redis://127.0.0.1:$port"
    # shellcheck disable=SC2086 # option list
    taskset -c 1 "$bench" broadcast --url "ws://${WS[a]}/ws/bench" --members-url "ws://${WS[b]}/ws/bench" \
      --settle 500ms $opts --threads 1 --progress none --no-plots --json "$out/$kind-$round.json" \
      >"$out/$kind-$round.txt" 2>&1 || true
    redis-cli -p "$port" info commandstats | grep -E 'cmdstat_publish' >"$out/redis-$kind-$round.txt" || true
    stop_all
  done
  for kind in one two node2; do
    f="$out/$kind-$round.json"
    if [ -f "$f" ]; then
      printf 'round %s %-5s deliveries/s %10.0f  latency p50 %8.0f us  p99 %8.0f us  lost %s\n' "$round" "$kind" \
        "$(figure "$f" deliveries_per_s)" "$(figure "$f" latency_us.p50)" "$(figure "$f" latency_us.p99)" "$(figure "$f" lost)"
    else
      echo "round $round $kind: no report (see $out/$kind-$round.txt)"
    fi
  done
done
for kind in one two node2; do
  files=("$out/$kind"-*.json)
  [ -e "${files[0]}" ] && "$bench" summarize "${files[@]}" 2>&1 | grep -E "^figure|deliveries_per_s |latency_us.p50 |latency_us.p99 |lost " | sed "s/^/[$kind] /"
done
echo "bench-cluster: results in $out"
