#!/usr/bin/env bash
# One box, many sockets: hold N WebSocket connections on this machine, all members of one room,
# and reach every one with one message. With a per-process fd cap (20,000 here) the sockets
# are held by several megasock processes on one port (SO_REUSEPORT), bridged by one local
# redis-server so that a single publish reaches all of them, and opened by several
# megasock-bench processes from several loopback source addresses.
#
#   scripts/million.sh [--connections N] [--per-process N] [--rate CONNS_PER_S] [--keep S]
#                      [--ping-interval S] [--idle-timeout S] [--handshake-timeout S] [--check] [--tune]
#
# --check only reports what the box lacks for N connections (and the command that fixes it).
# --tune (root) writes the sysctls that fall short for the run and puts the old values back
# when it ends. The connections are held --keep seconds (default 40) while the servers ping
# every connection silent for --ping-interval (default 30 s): the hold shows what idle pings
# cost at N. Live progress goes to the terminal; bench/results/million-*/ gets report.json
# (summary, kernel counters, 2,000,000 projection), million.json (the bench kit's report) and
# million.timeline.svg (connections, server RSS, kernel slab, server CPU over time).
# Everything it starts it stops by pid, also on Ctrl-C and on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

conns=1000000
per_process=18000
keep=40
ping_interval=30
handshake_timeout=30
# The servers' idle timeout. At the end a million clients close at once and the box is
# saturated for a minute: with the default 75 s (45 s to answer a ping) servers timed out
# connections whose close was on its way (200,000 here with --ping-interval 5 --idle-timeout
# 12: 14,344 idle timeouts; with --idle-timeout 30: none).
idle_timeout=150
# Connects per second over all client processes. Unpaced, 56 clients x 1,000 handshakes in
# flight starved this 2-core box: connects timed out and starved clients missed their pings.
rate=8000
check_only=0
tune=0
while [ $# -gt 0 ]; do
  case $1 in
  --connections) conns=$2; shift 2 ;;
  --per-process) per_process=$2; shift 2 ;;
  --keep) keep=$2; shift 2 ;;
  --ping-interval) ping_interval=$2; shift 2 ;;
  --handshake-timeout) handshake_timeout=$2; shift 2 ;;
  --rate) rate=$2; shift 2 ;;
  --idle-timeout) idle_timeout=$2; shift 2 ;;
  --check) check_only=1; shift ;;
  --tune) tune=1; shift ;;
  -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
  *) echo "million: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf 'million: %s\n' "$*"; }
restore=() # key=value pairs written back when the run ends (--tune)
restore_sysctls() {
  for r in "${restore[@]}"; do sysctl -qw "$r" >/dev/null || log "could not put back $r"; done
  restore=()
}
# SO_REUSEPORT spreads connections by a hash, not evenly: plan 8 % headroom per process, or
# the fullest ones answer 503 (seen: 133 of 300,000 with no headroom).
servers=$(((conns * 100 + per_process * 92 - 1) / (per_process * 92)))
clients=$(((conns + 17999) / 18000))
# About 28,000 ephemeral ports per source address: one address per 25,000 connections.
addrs=$(((conns + 24999) / 25000))
last_ip=$((1 + addrs))

# --- what the box needs ----------------------------------------------------------------------
short=()
fixes=() # sysctl key=value pairs that --tune writes
need_sysctl() { # key minimum why
  local cur
  cur=$(sysctl -n "$1")
  if [ "$cur" -lt "$2" ]; then
    short+=("$1 $cur < $2 ($3)")
    fixes+=("$1=$2")
  fi
}
check_box() {
  short=()
  fixes=()
  need_kib=$((conns * 12 + 262144)) # ~10 KB kernel (both ends) + ~1 KB user per connection
  avail_kib=$(awk '/MemAvailable/ { print $2 }' /proc/meminfo)
  [ "$avail_kib" -ge "$need_kib" ] ||
    short+=("memory: $((avail_kib / 1024)) MiB available, about $((need_kib / 1024)) MiB needed")
  nofile=$(ulimit -Hn)
  [ "$nofile" -ge $((per_process + 256)) ] ||
    short+=("RLIMIT_NOFILE hard $nofile < $((per_process + 256)) (lower --per-process)")
  need_sysctl fs.file-max $((conns * 2 + 65536)) "open files, both ends"
  need_sysctl fs.nr_open $((per_process + 256)) "per-process open-file ceiling"
  need_sysctl fs.epoll.max_user_watches $((conns * 2)) "epoll registrations, both ends"
  need_sysctl net.core.somaxconn 65535 "accept queue per listener"
  need_sysctl net.ipv4.tcp_max_syn_backlog 65535 "half-open queue; connects stall and reset past ~50,000 here without it"
  read -r lo hi </proc/sys/net/ipv4/ip_local_port_range
  if [ $(((hi - lo) * addrs)) -lt "$conns" ]; then
    short+=("ephemeral ports: $((hi - lo)) x $addrs source addresses < $conns")
    fixes+=("net.ipv4.ip_local_port_range=10000 65535")
  fi
}
check_box
if [ "${#short[@]}" -gt 0 ] && [ "$tune" = 1 ] && [ "$check_only" = 0 ] && [ "${#fixes[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "--tune writes sysctls: run it as root"; exit 1; }
  for f in "${fixes[@]}"; do
    key=${f%%=*}
    restore+=("$key=$(sysctl -n "$key" | tr '\t' ' ')")
    log "tune: $f (was ${restore[-1]#*=}; put back when the run ends)"
    sysctl -qw "$f" >/dev/null
  done
  check_box
fi
if [ "${#short[@]}" -gt 0 ]; then
  log "this box is short of:"
  printf '  - %s
' "${short[@]}"
  log "fix for this run: sudo scripts/million.sh --tune --connections $conns (sysctls put back afterwards)"
  log "fix for good: sudo scripts/tune.sh apply --connections $conns --role both"
  restore_sysctls
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
cleanup() {
  stop_pids 10
  restore_sysctls
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
pids+=("$!")
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

listen=127.0.0.1:0
admins=()
server_pids=()
for i in $(seq 1 "$servers"); do
  ready="$out/server-$i.ready"
  "$bin" serve --listen "$listen" --workers 1 --max-connections "$per_process" --backlog 65535 \
    --ping-interval "${ping_interval}s" --handshake-timeout "${handshake_timeout}s" \
    --idle-timeout "${idle_timeout}s" \
    --admin 127.0.0.1:0 --redis "redis://127.0.0.1:$redis_port" --ready-file "$ready" \
    >"$out/server-$i.log" 2>&1 &
  pids+=("$!")
  server_pids+=("$!")
  for _ in $(seq 1 200); do [ -s "$ready" ] && break; sleep 0.05; done
  [ -s "$ready" ] || { log "server $i did not start (see $out/server-$i.log)"; exit 1; }
  listen=$(sed -n 's/^ws=//p' "$ready") # the others bind the first one's port
  admins+=("$(sed -n 's/^admin=//p' "$ready")")
done
log "$servers servers on $listen, redis on $redis_port; results in $out"

cat >"$out/run.json" <<EOF
{"command": "scripts/million.sh --connections $conns --per-process $per_process --rate $rate --keep $keep --ping-interval $ping_interval --handshake-timeout $handshake_timeout",
 "connections": $conns, "per_process": $per_process, "servers": $servers, "clients": $clients,
 "source_addresses": $addrs, "keep_s": $keep, "ping_interval_s": $ping_interval,
 "box": {"cpus": $(nproc), "mem_total_kib": $(awk '/MemTotal/ { print $2 }' /proc/meminfo),
         "kernel": "$(uname -r)", "nofile_hard": $(ulimit -Hn)}}
EOF
python3 scripts/million_report.py snapshot "$out" before
start=$SECONDS
pid_list=$(IFS=,; echo "${server_pids[*]}")
set +e
"$bench" broadcast --url "ws://$listen/ws/million" --subs "$conns" --pubs 1 --msgs 1 --size 64 \
  --procs "$clients" --threads 1 --rate "$rate" --max-pending 200 --source-ips "127.0.0.2-127.0.0.$last_ip" --settle "${keep}s" \
  --connect-timeout 30s --idle-timeout 60s --deadline 1200s --server-pid "$pid_list" \
  --progress lines --json "$out/million.json" 2>&1 | tee "$out/bench.txt"
set -e
log "bench done in $((SECONDS - start)) s"
python3 scripts/million_report.py snapshot "$out" after
python3 scripts/million_report.py scrape "$out" "${admins[@]}"
python3 scripts/million_report.py report "$out"
