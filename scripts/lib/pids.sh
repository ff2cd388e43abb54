# shellcheck shell=bash
# Sourced by the bench and load scripts: the processes a script started, stopped by pid.

pids=()

# stop_pids [SECONDS]: SIGTERM to every started process, SIGKILL to those still there after
# SECONDS (default 5; megasock drains on SIGTERM), then forget them.
stop_pids() {
  local p ticks=$((${1:-5} * 10))
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 "$ticks"); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}
