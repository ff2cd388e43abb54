#!/usr/bin/env bash
# bench.sh: run one megasock-bench scenario against megasock (built and started here), one of
# the peers in bench/peers (node-ws, uws), or a server that is already running, and keep
# everything in bench/results/<date>-<scenario>/: the JSON report, .hgrm files, SVG plots,
# the server log, the load generator's summary, and the exact commands (commands.txt).
#
#   scripts/bench.sh echo --conns 100 --inflight 8 --secs 10
#   scripts/bench.sh broadcast --workers 1 --pin --split --subs 2000 --pubs 4 --msgs 250
#   scripts/bench.sh broadcast --peer uws --split --subs 2000 --pubs 4 --msgs 250
#   scripts/bench.sh connect --conns 15000 --hold 10
#   scripts/bench.sh ladder --target ws://10.0.0.5:8080 --steps 1000,2000,5000
#   scripts/bench.sh echo --peer uws --split --runs 3      # median of 3 against one server
#
# `scripts/bench.sh --help` lists the options. Exit status: the load generator's (0 ok,
# 1 a check failed), 2 for usage errors and limits that cannot hold the run, 3 when the
# server could not be built or started.
set -euo pipefail

ORIG_ARGS=("$@")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=${0##*/}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
READY_TIMEOUT=30 # seconds to wait for the server's ready file
STOP_TIMEOUT=20  # seconds to wait for the server to exit after SIGTERM

usage() {
    cat <<EOF
Usage: $PROG SCENARIO [options] [megasock-bench options]

SCENARIO is connect, echo, broadcast or ladder. Options this script does not know are passed
to megasock-bench (see: megasock-bench SCENARIO --help), e.g. --conns, --hold, --inflight,
--secs, --size, --subs, --pubs, --msgs, --steps, --procs, --threads, --source-ips, --rate.

Server (default: build and start megasock on 127.0.0.1, port picked by the kernel):
  --peer NAME          start bench/peers/NAME instead (node-ws or uws; npm ci on first use)
  --target URL         use a server that is already running, ws://HOST:PORT; nothing is
                       started or stopped (pass --server-pid PID to sample its memory/CPU)
megasock options:
  --workers N          worker threads (default 1)
  --pin                pin worker i to core i (megasock --pin)
  --max-connections N, --max-message-size SIZE, --max-backpressure SIZE
  --server-arg ARG     any other megasock serve option (repeat for several words)
CPU placement (taskset):
  --split              server on CPU 0, load generator on CPU 1
  --server-cpus LIST   run the server under taskset -c LIST
  --client-cpus LIST   run the load generator under taskset -c LIST
Runs:
  --warmup N           unmeasured runs of the same scenario against the same server first
                       (default 1, 0 for connect): a fresh server, JIT-compiled ones above
                       all, is slower on its first run (warmup-K.txt keeps their output)
  --runs N             measured runs (default 1); with N > 1 each goes to run-K/ and
                       summary.txt/summary.json give the median, min, max and spread
Other:
  --path PATH          URL path (default /echo for connect and echo, /ws/bench-<pid> for
                       broadcast and ladder)
  --out DIR            results directory (default bench/results/<date>-<scenario>[-<label>])
  --label NAME         suffix for the default results directory (e.g. uws, megasock-2w)
  --no-build           use the release binaries already in $TARGET_DIR/release
                       (or in \$BENCH_BIN_DIR if set, e.g. target/debug)
  -h, --help           this text

Before anything starts, the run is refused (exit 2) when the open-file limit or the local
port range cannot hold the requested connections; the message names the fix, e.g.
  scripts/tune.sh apply --role both --connections N     (server and load generator here)
  scripts/tune.sh apply --role loadgen --connections N  (with --target)
EOF
}

die() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit 2
}

# ------------------------------------------------------------------ arguments
[[ $# -ge 1 ]] || {
    usage >&2
    exit 2
}
case $1 in
-h | --help)
    usage
    exit 0
    ;;
connect | echo | broadcast | ladder) SCENARIO=$1 ;;
*) die "unknown scenario '$1' (connect, echo, broadcast or ladder; --help for more)" ;;
esac
shift

PEER=""
TARGET=""
WORKERS=1
PIN=0
SERVER_CPUS=""
CLIENT_CPUS=""
URL_PATH=""
OUT=""
LABEL=""
BUILD=1
WARMUP=""
RUNS=1
SERVER_ARGS=()
BENCH_ARGS=()
USER_SERVER_PID=0

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --peer)
        need_value "$@"
        PEER=$2
        shift 2
        ;;
    --target)
        need_value "$@"
        TARGET=$2
        shift 2
        ;;
    --workers)
        need_value "$@"
        WORKERS=$2
        shift 2
        ;;
    --pin)
        PIN=1
        shift
        ;;
    --max-connections | --max-message-size | --max-backpressure)
        need_value "$@"
        SERVER_ARGS+=("$1" "$2")
        shift 2
        ;;
    --server-arg)
        need_value "$@"
        SERVER_ARGS+=("$2")
        shift 2
        ;;
    --split)
        SERVER_CPUS=0
        CLIENT_CPUS=1
        shift
        ;;
    --server-cpus)
        need_value "$@"
        SERVER_CPUS=$2
        shift 2
        ;;
    --client-cpus)
        need_value "$@"
        CLIENT_CPUS=$2
        shift 2
        ;;
    --path)
        need_value "$@"
        URL_PATH=$2
        shift 2
        ;;
    --out)
        need_value "$@"
        OUT=$2
        shift 2
        ;;
    --label)
        need_value "$@"
        LABEL=$2
        shift 2
        ;;
    --no-build)
        BUILD=0
        shift
        ;;
    --warmup)
        need_value "$@"
        WARMUP=$2
        shift 2
        ;;
    --runs)
        need_value "$@"
        RUNS=$2
        shift 2
        ;;
    --url | --url=* | --json | --json=*)
        die "$1 is set by this script (use --target/--path, and --out for the results directory)"
        ;;
    --server-pid | --server-pid=*)
        USER_SERVER_PID=1
        BENCH_ARGS+=("$1")
        shift
        ;;
    --)
        shift
        BENCH_ARGS+=("$@")
        break
        ;;
    *)
        BENCH_ARGS+=("$1")
        shift
        ;;
    esac
done

[[ -z $PEER || -z $TARGET ]] || die "--peer and --target exclude each other"
case $PEER in
"" | node-ws | uws) ;;
*) die "unknown peer '$PEER' (node-ws or uws)" ;;
esac
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
if [[ -z $WARMUP ]]; then
    if [[ $SCENARIO == connect ]]; then WARMUP=0; else WARMUP=1; fi
fi
[[ $WARMUP =~ ^[0-9]+$ ]] || die "--warmup must be a non-negative integer"
if [[ -n $TARGET ]]; then
    [[ $TARGET =~ ^ws://[^/]+/?$ ]] || die "--target wants ws://HOST:PORT (the path comes from --path), got '$TARGET'"
    TARGET=${TARGET%/}
    ((${#SERVER_ARGS[@]} == 0 && PIN == 0 && WORKERS == 1)) || die "--workers/--pin/--max-*/--server-arg configure a server started here; not with --target"
    [[ -z $SERVER_CPUS ]] || [[ $SERVER_CPUS == 0 && $CLIENT_CPUS == 1 ]] || die "--server-cpus needs a server started here"
    SERVER_CPUS=""
fi
if [[ -n $PEER ]]; then
    ((${#SERVER_ARGS[@]} == 0 && PIN == 0 && WORKERS == 1)) || die "--workers/--pin/--max-*/--server-arg are megasock options; the peers take none"
fi
if [[ -n $SERVER_CPUS || -n $CLIENT_CPUS ]]; then
    command -v taskset >/dev/null || die "taskset not found (apt-get install util-linux)"
fi
if [[ -z $URL_PATH ]]; then
    case $SCENARIO in
    connect | echo) URL_PATH=/echo ;;
    *) URL_PATH=/ws/bench-$$ ;;
    esac
fi
[[ $URL_PATH == /* ]] || die "--path must start with /"

SERVER_KIND=${PEER:-megasock}
[[ -z $TARGET ]] || SERVER_KIND=target

# ------------------------------------------------------------------ results directory
if [[ -z $OUT ]]; then
    stamp=$(date +%Y-%m-%d-%H%M%S)
    OUT=$ROOT/bench/results/$stamp-$SCENARIO${LABEL:+-$LABEL}
    n=2
    base=$OUT
    while [[ -e $OUT ]]; do
        OUT=$base-$n
        n=$((n + 1))
    done
fi
OUT_CREATED=0
[[ -e $OUT ]] || OUT_CREATED=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# A refused run leaves nothing behind in a directory it created.
discard_out() {
    if ((OUT_CREATED)); then
        rm -rf "$OUT"
    fi
}
COMMANDS=$OUT/commands.txt
: >"$COMMANDS"

# Log a command line (shell-quoted, runnable as is) to commands.txt.
log_cmd() {
    local q
    printf -v q '%q ' "$@"
    printf '%s\n' "${q% }" >>"$COMMANDS"
}
printf '# %s %s, %s, from %s\n' "$PROG" "$SCENARIO" "$(date -Iseconds)" "$ROOT" >>"$COMMANDS"
{
    printf '# invoked as:'
    printf ' %q' "$0" "${ORIG_ARGS[@]}"
    printf '\n'
} >>"$COMMANDS"

# ------------------------------------------------------------------ build
cd "$ROOT"
if ((BUILD)); then
    build=(cargo build --release -p megasock-bench)
    [[ $SERVER_KIND != megasock ]] || build+=(-p megasock)
    log_cmd "${build[@]}"
    echo "building: ${build[*]}" >&2
    "${build[@]}" >&2 || {
        echo "$PROG: build failed" >&2
        exit 3
    }
fi
# BENCH_BIN_DIR (with --no-build) points at other binaries, e.g. target/debug for tests.
BIN_DIR=${BENCH_BIN_DIR:-$TARGET_DIR/release}
((BUILD)) || [[ -z ${BENCH_BIN_DIR:-} ]] || echo "using the binaries in $BIN_DIR" >&2
((!BUILD)) || BIN_DIR=$TARGET_DIR/release
BENCH_BIN=$BIN_DIR/megasock-bench
SERVER_BIN=$BIN_DIR/megasock
[[ -x $BENCH_BIN ]] || die "$BENCH_BIN is missing (run without --no-build)"
[[ $SERVER_KIND != megasock || -x $SERVER_BIN ]] || die "$SERVER_BIN is missing (run without --no-build)"

# ------------------------------------------------------------------ limits
taskset_prefix() {
    [[ -z $1 ]] || printf '%s\n' taskset -c "$1"
}

# The load generator and the servers started here inherit the raised soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The load generator checks its own fds (per process) and the local port range.
mapfile -t client_prefix < <(taskset_prefix "$CLIENT_CPUS")
plan=$("${client_prefix[@]}" "$BENCH_BIN" "$SCENARIO" --url "ws://127.0.0.1:1$URL_PATH" --dry-run "${BENCH_ARGS[@]}" 2>"$OUT/dry-run.err") || {
    status=$?
    msg=$(cat "$OUT/dry-run.err")
    rm -f "$OUT/dry-run.err"
    if [[ $SERVER_KIND != target ]]; then
        msg=${msg//--role loadgen/--role both}
    fi
    printf '%s\n' "$msg" >&2
    echo "$PROG: refusing to start" >&2
    discard_out
    exit "$status"
}
rm -f "$OUT/dry-run.err"
plan_value() { sed -n "s/^$1=//p" <<<"$plan"; }
CONNS=$(plan_value max_connections)
[[ $CONNS =~ ^[0-9]+$ ]] || die "could not read the plan from megasock-bench --dry-run"

if [[ $SERVER_KIND != target ]]; then
    # The server here holds every connection in one process (plus listeners, epoll, logs).
    server_reserve=256
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((CONNS + server_reserve > hard)); then
        printf '%s: the server needs %s fds (%s connections + %s), but the open-file limit here is %s.\n' \
            "$PROG" "$((CONNS + server_reserve))" "$CONNS" "$server_reserve" "$hard" >&2
        printf 'Fix: scripts/tune.sh apply --role both --connections %s (then start a new login shell)\n' "$CONNS" >&2
        discard_out
        exit 2
    fi
    # Both ends of every connection live on this box.
    file_max=$(cat /proc/sys/fs/file-max 2>/dev/null || echo 0)
    if ((file_max > 0 && 2 * CONNS + 4096 > file_max)); then
        printf '%s: %s connections need %s open files on this box, but fs.file-max is %s.\n' \
            "$PROG" "$CONNS" "$((2 * CONNS + 4096))" "$file_max" >&2
        printf 'Fix: scripts/tune.sh apply --role both --connections %s\n' "$CONNS" >&2
        discard_out
        exit 2
    fi
fi

# ------------------------------------------------------------------ system facts
{
    echo "date: $(date -Iseconds)"
    echo "host: $(uname -a)"
    echo "cpus: $(nproc) ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1))"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "rustc: $(rustc -V 2>/dev/null || echo '?')"
    [[ $SERVER_KIND == megasock || $SERVER_KIND == target ]] || echo "node: $(node -v 2>/dev/null || echo '?')"
    echo "nofile: soft $(ulimit -Sn) hard $(ulimit -Hn)"
    echo "ip_local_port_range: $(tr '\t' ' ' </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null)"
    echo "somaxconn: $(cat /proc/sys/net/core/somaxconn 2>/dev/null)"
    echo "file-max: $(cat /proc/sys/fs/file-max 2>/dev/null)"
    echo "server: $SERVER_KIND${SERVER_CPUS:+ (cpus $SERVER_CPUS)}; load generator${CLIENT_CPUS:+ (cpus $CLIENT_CPUS)}"
    echo "plan:"
    grep -v -e '^target=' -e '^path=' <<<"$plan" | while IFS= read -r line; do printf '  %s\n' "$line"; done
} >"$OUT/system.txt"

# ------------------------------------------------------------------ server
SERVER_PID=""
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID status=0 waited=0
    SERVER_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && ((waited < STOP_TIMEOUT * 10)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$PROG: server $pid still running ${STOP_TIMEOUT}s after SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || status=$?
    echo "# server exit status: $status" >>"$COMMANDS"
    echo "server stopped (exit status $status)" >&2
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SERVER_PID_ARGS=()
if [[ $SERVER_KIND == target ]]; then
    URL=$TARGET$URL_PATH
else
    READY=$OUT/server.ready
    rm -f "$READY"
    mapfile -t server_cmd < <(taskset_prefix "$SERVER_CPUS")
    if [[ $SERVER_KIND == megasock ]]; then
        server_cmd+=("$SERVER_BIN" serve --listen 127.0.0.1:0 --workers "$WORKERS" --ready-file "$READY")
        ((PIN == 0)) || server_cmd+=(--pin)
        server_cmd+=("${SERVER_ARGS[@]}")
    else
        peer_dir=$ROOT/bench/peers/$PEER
        command -v node >/dev/null || die "node is not installed (the $PEER peer needs Node.js 20)"
        if [[ ! -d $peer_dir/node_modules ]]; then
            log_cmd npm ci --prefix "$peer_dir" --no-audit --no-fund
            npm ci --prefix "$peer_dir" --no-audit --no-fund >&2 || {
                echo "$PROG: npm ci failed in $peer_dir" >&2
                exit 3
            }
        fi
        server_cmd+=(node "$peer_dir/server.js" --listen 127.0.0.1:0 --ready-file "$READY")
    fi
    log_cmd "${server_cmd[@]}"
    "${server_cmd[@]}" >"$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    echo "# server pid: $SERVER_PID" >>"$COMMANDS"
    waited=0
    until [[ -s $READY ]] && grep -q '^ws=' "$READY"; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "$PROG: the server exited before it was ready; its log ($OUT/server.log):" >&2
            tail -n 20 "$OUT/server.log" >&2
            SERVER_PID=""
            exit 3
        fi
        if ((waited >= READY_TIMEOUT * 10)); then
            echo "$PROG: the server did not write $READY within ${READY_TIMEOUT}s" >&2
            exit 3
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    addr=$(sed -n 's/^ws=//p' "$READY" | head -n1)
    URL=ws://$addr$URL_PATH
    ((USER_SERVER_PID)) || SERVER_PID_ARGS=(--server-pid "$SERVER_PID")
    echo "server ($SERVER_KIND) ready at $addr, pid $SERVER_PID" >&2
fi

# ------------------------------------------------------------------ load
bench_cmd() { # $1 = JSON path or "" (warm-up)
    local cmd=("${client_prefix[@]}" "$BENCH_BIN" "$SCENARIO" --url "$URL")
    [[ -z $1 ]] || cmd+=(--json "$1")
    cmd+=("${SERVER_PID_ARGS[@]}" "${BENCH_ARGS[@]}")
    printf '%s\0' "${cmd[@]}"
}
for ((k = 1; k <= WARMUP; k++)); do
    mapfile -d '' -t cmd < <(bench_cmd "")
    log_cmd "${cmd[@]}"
    echo "warm-up run $k of $WARMUP (output: $OUT/warmup-$k.txt)" >&2
    wstatus=0
    "${cmd[@]}" >"$OUT/warmup-$k.txt" 2>&1 || wstatus=$?
    echo "# warm-up exit status: $wstatus" >>"$COMMANDS"
    ((wstatus == 0)) || echo "$PROG: warm-up run $k exited with $wstatus (see warmup-$k.txt)" >&2
done
status=0
reports=()
for ((k = 1; k <= RUNS; k++)); do
    dir=$OUT
    if ((RUNS > 1)); then
        dir=$OUT/run-$k
        mkdir -p "$dir"
        echo "run $k of $RUNS" >&2
    fi
    reports+=("$dir/$SCENARIO.json")
    mapfile -d '' -t cmd < <(bench_cmd "$dir/$SCENARIO.json")
    log_cmd "${cmd[@]}"
    rstatus=0
    "${cmd[@]}" | tee "$dir/summary.txt" || rstatus=${PIPESTATUS[0]}
    echo "# load generator exit status: $rstatus" >>"$COMMANDS"
    ((rstatus <= status)) || status=$rstatus
done
if ((RUNS > 1)); then
    summarize=("$BENCH_BIN" summarize --json "$OUT/summary.json" "${reports[@]}")
    log_cmd "${summarize[@]}"
    "${summarize[@]}" | tee "$OUT/summary.txt" || true
fi

stop_server
echo "results: $OUT" >&2
exit "$status"
