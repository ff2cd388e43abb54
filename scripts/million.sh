#!/usr/bin/env bash
# One box, many sockets: hold N WebSocket connections on this machine, all members of one room,
# and reach every one with one message. With a per-process fd cap (20,000 here) the sockets
# are held by several megasock processes on one port (SO_REUSEPORT), bridged by one local
# redis-server so that a single publish reaches all of them, and opened by several
# megasock-bench processes from several loopback source addresses.
#
#   scripts/million.sh [--connections N] [--per-process N] [--keep S] [--check]
#
# --check only reports what the box lacks for N connections (and the scripts/tune.sh command
# that fixes it). Everything it starts it stops by pid, also on Ctrl-C and on failure.
# Work in progress (issue 10): the report is the bench kit's JSON; plots and the 1,000,000 run
# are still to come.
set -euo pipefail
cd "$(dirname "$0")/.."

conns=1000000
per_process=18000
keep=10
check_only=0
while [ $# -gt 0 ]; do
  case $1 in
  --connections) conns=$2; shift 2 ;;
  --per-process) per_process=$2; shift 2 ;;
  --keep) keep=$2; shift 2 ;;
  --check) check_only=1; shift ;;
  -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
  *) echo "million: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf 'million: %s\n' "$*"; }
# SO_REUSEPORT spreads connections by a hash, not evenly: plan 8 % headroom per process, or
# the fullest ones answer 503 (seen: 133 of 300,000 with no headroom).
servers=$(((conns * 100 + per_process * 92 - 1) / (per_process * 92)))
clients=$(((conns + 17999) / 18000))
# About 28,000 ephemeral ports per source address: one address per 25,000 connections.
addrs=$(((conns + 24999) / 25000))
last_ip=$((1 + addrs))

# --- what the box needs ----------------------------------------------------------------------
short=()
need_kib=$((conns * 12 + 262144)) # ~10 KB kernel (both ends) + ~1 KB user per connection
avail_kib=$(awk '/MemAvailable/ { print $2 }' /proc/meminfo)
[ "$avail_kib" -ge "$need_kib" ] ||
  short+=("memory: $((avail_kib / 1024)) MiB available, about $((need_kib / 1024)) MiB needed")
file_max=$(cat /proc/sys/fs/file-max)
[ "$file_max" -ge $((conns * 2 + 65536)) ] || short+=("fs.file-max $file_max < $((conns * 2 + 65536))")
nofile=$(ulimit -Hn)
[ "$nofile" -ge $((per_process + 256)) ] ||
  short+=("RLIMIT_NOFILE hard $nofile < $((per_process + 256)) (lower --per-process)")
somax=$(cat /proc/sys/net/core/somaxconn)
[ "$somax" -ge 4096 ] || short+=("net.core.somaxconn $somax < 4096")
read -r lo hi </proc/sys/net/ipv4/ip_local_port_range
ports=$((hi - lo))
[ $((ports * addrs)) -ge "$conns" ] ||
  short+=("ephemeral ports: $ports x $addrs source addresses < $conns (widen net.ipv4.ip_local_port_range)")
syn=$(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)
[ "$syn" -ge 65535 ] || short+=("net.ipv4.tcp_max_syn_backlog $syn < 65535 (connects stall and reset past ~50,000 here)")
watches=$(cat /proc/sys/fs/epoll/max_user_watches)
[ "$watches" -ge $((conns * 2)) ] || short+=("fs.epoll.max_user_watches $watches < $((conns * 2))")
if [ "${#short[@]}" -gt 0 ]; then
  log "this box is short of:"
  printf '  - %s\n' "${short[@]}"
  log "fix: sudo scripts/tune.sh apply --connections $conns --role server (and --role loadgen)"
  [ "$check_only" = 1 ] && exit 1
  exit 1
fi
log "the box fits $conns connections: $servers server processes x $per_process, $clients client processes, source addresses 127.0.0.2-127.0.0.$last_ip"
[ "$check_only" = 0 ] || exit 0

# --- run -----------------------------------------------------------------------------------
cargo build --release -p megasock -p megasock-bench >/dev/null 2>&1 ||
  cargo build --release -p megasock -p megasock-bench
bin=target/release/megasock
bench=target/release/megasock-bench
out="bench/results/million-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
# shellcheck source=scripts/lib/pids.sh
. scripts/lib/pids.sh
cleanup() { stop_pids 10; }
trap cleanup EXIT
trap 'exit 130' INT TERM

redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
pids+=("$!")
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

listen=127.0.0.1:0
for i in $(seq 1 "$servers"); do
  ready="$out/server-$i.ready"
  "$bin" serve --listen "$listen" --workers 1 --max-connections "$per_process" --backlog 65535 \
    --redis "redis://127.0.0.1:$redis_port" --ready-file "$ready" >"$out/server-$i.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 1 200); do [ -s "$ready" ] && break; sleep 0.05; done
  [ -s "$ready" ] || { log "server $i did not start (see $out/server-$i.log)"; exit 1; }
  listen=$(sed -n 's/^ws=//p' "$ready") # the others bind the first one's port
done
log "$servers servers on $listen, redis on $redis_port"

start=$SECONDS
"$bench" broadcast --url "ws://$listen/ws/million" --subs "$conns" --pubs 1 --msgs 1 --size 64 \
  --procs "$clients" --threads 1 --source-ips "127.0.0.2-127.0.0.$last_ip" --settle "${keep}s" \
  --connect-timeout 30s --idle-timeout 30s --deadline 900s --json "$out/million.json" \
  2>&1 | tee "$out/bench.txt"
log "done in $((SECONDS - start)) s; report $out/million.json"
python3 - "$out/million.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
lat = d.get("latency_us", {})
c = d.get("connections", {})
print(f"million: {c.get('opened')} connections opened in {c.get('ramp_s', 0):.1f} s, "
      f"{d.get('deliveries')} of {d.get('expected_deliveries')} delivered, lost {d.get('lost')}, "
      f"last member after {lat.get('max', 0) / 1000:.1f} ms, p50 {lat.get('p50', 0) / 1000:.1f} ms")
sys.exit(0 if d.get("ok") else 1)
EOF
