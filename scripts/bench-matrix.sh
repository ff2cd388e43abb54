#!/usr/bin/env bash
# The benchmark matrix behind docs/PERFORMANCE.md: every scenario against megasock (1 worker
# pinned, 2 workers) and both peers (uWebSockets.js, Node ws), in ROUNDS rounds that alternate
# the servers (A B C D A B C D ...), then the median, min, max and spread per server.
#
#   scripts/bench-matrix.sh [ROUNDS] [SCENARIO...]     default: 3 rounds, all scenarios
#
# Environment: SERVERS="megasock-1w uws" runs a subset (megasock-1w-nodeflate is megasock-1w
# with --no-deflate; DEFLATE=1 turns compression on in the peers, see bench/README.md); BASELINE_BIN_DIR=DIR adds the server
# megasock-baseline (DIR/megasock, e.g. a build of an older commit, placed like megasock-1w) for
# before/after comparisons in the same alternating run; BROADCAST_OPTS, ECHO_OPTS,
# CONNECT_OPTS, LADDER_OPTS replace a scenario's options (e.g. BROADCAST_OPTS="--subs 2000
# --pubs 4 --msgs 2500 --size 64" for runs long enough to measure the server's CPU time).
#
# Results: bench/results/matrix-<date>/<scenario>/<server>-<round>/ and SUMMARY.md there.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-3}
shift || true
scenarios=("$@")
[ "${#scenarios[@]}" -gt 0 ] || scenarios=(broadcast echo connect ladder)

out="bench/results/matrix-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
cargo build --release --workspace >/dev/null 2>&1 || cargo build --release --workspace
bench=target/release/megasock-bench

# Server placements: the load generator always has CPU 1 to itself, except that megasock with
# two workers also puts its second worker there (it is the only way to give it two cores).
declare -A server_opts=(
  [megasock-1w]="--workers 1 --pin --split"
  [megasock-2w]="--workers 2 --pin --client-cpus 1"
  [megasock-1w-nodeflate]="--workers 1 --pin --split --server-arg --no-deflate"
  [uws]="--peer uws --split"
  [node-ws]="--peer node-ws --split"
)
default_servers="megasock-1w megasock-2w uws node-ws"
if [ -n "${BASELINE_BIN_DIR:-}" ]; then
  [ -x "$BASELINE_BIN_DIR/megasock" ] || {
    echo "bench-matrix: BASELINE_BIN_DIR=$BASELINE_BIN_DIR has no megasock binary" >&2
    exit 2
  }
  # The baseline server with this tree's load generator, so only the server differs.
  ln -sf "$(pwd)/$bench" "$BASELINE_BIN_DIR/megasock-bench" 2>/dev/null ||
    cp "$bench" "$BASELINE_BIN_DIR/megasock-bench"
  server_opts[megasock-baseline]="--workers 1 --pin --split"
  default_servers="megasock-baseline $default_servers"
fi
read -r -a servers <<<"${SERVERS:-$default_servers}"

declare -A scenario_opts=(
  [broadcast]="--subs 2000 --pubs 4 --msgs 250 --size 64"
  [echo]="--conns 100 --inflight 8 --size 64 --secs 5"
  [connect]="--conns 15000 --hold 3"
  [ladder]="--steps 1000,2000,5000,10000,15000"
)

for scenario in "${!scenario_opts[@]}"; do
  override="${scenario^^}_OPTS"
  if [ -n "${!override:-}" ]; then
    scenario_opts[$scenario]="${!override}"
  fi
done

summary="$out/SUMMARY.md"
{
  echo "# Benchmark matrix $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)."
  echo "Command: SERVERS=\"${servers[*]}\" scripts/bench-matrix.sh $rounds ${scenarios[*]}"
} >"$summary"

for scenario in "${scenarios[@]}"; do
  for round in $(seq 1 "$rounds"); do
    for server in "${servers[@]}"; do
      dir="$out/$scenario/$server-$round"
      mkdir -p "$out/$scenario"
      bin_dir=""
      [ "$server" != megasock-baseline ] || bin_dir=$BASELINE_BIN_DIR
      # shellcheck disable=SC2086 # option lists are word-split on purpose
      if ! BENCH_BIN_DIR=$bin_dir scripts/bench.sh "$scenario" --no-build --out "$dir" ${server_opts[$server]} \
        ${scenario_opts[$scenario]} >"$dir.log" 2>&1; then
        echo "bench-matrix: $scenario against $server (round $round) failed; see $dir.log" >&2
      fi
      tail -n 3 "$dir.log" | sed "s|^|[$scenario $server $round] |"
    done
  done
  {
    echo
    echo "## $scenario"
    echo
    echo "Options: \`${scenario_opts[$scenario]}\`"
  } >>"$summary"
  for server in "${servers[@]}"; do
    reports=()
    for round in $(seq 1 "$rounds"); do
      f="$out/$scenario/$server-$round/$scenario.json"
      [ -f "$f" ] && reports+=("$f")
    done
    {
      echo
      echo "### $server (\`${server_opts[$server]}\`)"
      echo
      echo '```'
      if [ "${#reports[@]}" -gt 0 ]; then
        "$bench" summarize --json "$out/$scenario/$server-summary.json" "${reports[@]}" 2>&1 || true
      else
        echo "no report"
      fi
      echo '```'
    } >>"$summary"
  done
done
echo "bench-matrix: summary in $summary"
