#!/usr/bin/env bash
# Echo latency of connected clients while a connect storm hits the same worker: does accepting
# starve the clients already there? Runs each server build in alternating rounds (A B A B ...)
# and prints the echo p50/p99/max of each run and their medians.
#
#   scripts/bench-storm.sh [ROUNDS] [BIN...]     default: 3 rounds, target/release/megasock
#
# Example (before/after): scripts/bench-storm.sh 3 /work/baseline/megasock target/release/megasock
# Each run: one worker pinned to CPU 0; on CPU 1, an echo client (10 connections, 1 message in
# flight each, 8 s) and, from its second second, a storm of STORM_CONNS (default 15000)
# connections opened as fast as possible (at nice 19, so it does not starve the echo client it
# shares CPU 1 with) and held 1 s; STORM_OPTS adds megasock-bench connect options (e.g.
# "--max-pending 10000"). Everything stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-3}
shift || true
bins=("$@")
[ "${#bins[@]}" -gt 0 ] || bins=(target/release/megasock)
storm=${STORM_CONNS:-15000}
bench=target/release/megasock-bench
[ -x "$bench" ] || cargo build --release -p megasock-bench >&2
out="bench/results/storm-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"

server_pid=""
stop() {
  [ -n "$server_pid" ] || return 0
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}
trap stop EXIT

figure() { # figure FILE KEY: a number from the echo JSON report
  python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): d=d[k]
print(d)' "$1" "$2"
}

for round in $(seq 1 "$rounds"); do
  for i in "${!bins[@]}"; do
    bin=${bins[$i]}
    dir="$out/bin$i-$round"
    mkdir -p "$dir"
    rm -f "$dir/ready"
    taskset -c 0 "$bin" serve --listen 127.0.0.1:0 --workers 1 --pin --ready-file "$dir/ready" \
      >"$dir/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 200); do [ -s "$dir/ready" ] && break; sleep 0.05; done
    addr=$(sed -n 's/^ws=//p' "$dir/ready")
    [ -n "$addr" ] || { echo "bench-storm: $bin did not start (see $dir/server.log)" >&2; exit 1; }
    taskset -c 1 "$bench" echo --url "ws://$addr/echo" --conns 10 --inflight 1 --secs 8 \
      --threads 1 --progress none --no-plots --json "$dir/echo.json" >"$dir/echo.txt" 2>&1 &
    echo_pid=$!
    sleep 1
    # shellcheck disable=SC2086 # STORM_OPTS is an option list, split on purpose
    nice -n 19 taskset -c 1 "$bench" connect --url "ws://$addr/echo" --conns "$storm" --hold 1 --threads 1 \
      --progress none --no-plots --allow-failures --deadline 60s ${STORM_OPTS:-} \
      >"$dir/storm.txt" 2>&1 || true
    wait "$echo_pid"
    stop
    p50=$(figure "$dir/echo.json" latency_us.p50)
    p99=$(figure "$dir/echo.json" latency_us.p99)
    max=$(figure "$dir/echo.json" latency_us.max)
    echo "$i $p50 $p99 $max" >>"$out/runs.txt"
    printf 'round %s  %-40s echo p50 %8.0f us  p99 %8.0f us  max %8.0f us\n' \
      "$round" "$bin" "$p50" "$p99" "$max"
  done
done

echo "medians over $rounds rounds (echo during a storm of $storm connects):"
for i in "${!bins[@]}"; do
  awk -v i="$i" -v bin="${bins[$i]}" '$1 == i { p50[n] = $2; p99[n] = $3; mx[n] = $4; n++ }
    function med(a, n,   s, j, k, t) {
      for (j = 0; j < n; j++) s[j] = a[j]
      for (j = 0; j < n; j++) for (k = j + 1; k < n; k++) if (s[k] < s[j]) { t = s[j]; s[j] = s[k]; s[k] = t }
      return n % 2 ? s[int(n / 2)] : (s[n / 2 - 1] + s[n / 2]) / 2
    }
    END { printf "  %-40s p50 %8.0f us  p99 %8.0f us  max %8.0f us\n", bin, med(p50, n), med(p99, n), med(mx, n) }' \
    "$out/runs.txt"
done
echo "bench-storm: results in $out"
