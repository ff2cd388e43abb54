#!/usr/bin/env bash
# A processing worker for megasock's stream of client messages (--redis-stream KEY): reads it
# with a consumer group, handles each entry, acknowledges it. Run several copies with different
# CONSUMER names to share the work; an entry is given to one consumer of the group.
#
#   deploy/redis/consume-stream.sh [KEY] [GROUP] [CONSUMER]
#   REDIS="-h 127.0.0.1 -p 6379" deploy/redis/consume-stream.sh megasock:in workers w1
#
# Each entry has the fields room, conn, node, ts (Unix ms) and data (the message's bytes).
# Entries a consumer read but never acknowledged (it crashed) stay pending: `XAUTOCLAIM KEY GROUP
# CONSUMER 60000 0` hands those older than a minute to another consumer.
set -euo pipefail
key=${1:-megasock:in}
group=${2:-workers}
consumer=${3:-$(hostname)-$$}
read -r -a redis <<<"${REDIS:-}"
cli() { redis-cli "${redis[@]}" "$@"; }

# The group starts at the end of the stream ($); use 0 to process what is already there.
cli XGROUP CREATE "$key" "$group" '$' MKSTREAM >/dev/null 2>&1 || true

handle() { # handle ID ROOM CONN DATA: replace with real work
  printf 'entry %s from %s in room %q: %s\n' "$1" "$3" "$2" "$4"
}

while true; do
  # Up to 100 new entries, waiting at most 5 s; --no-raw keeps the reply's structure, one
  # field per line in raw mode is easier to parse: id, then name/value pairs.
  reply=$(cli --raw XREADGROUP GROUP "$group" "$consumer" COUNT 100 BLOCK 5000 STREAMS "$key" '>')
  [ -n "$reply" ] || continue
  mapfile -t lines <<<"$reply"
  i=1 # lines[0] is the stream's key
  while ((i < ${#lines[@]})); do
    id=${lines[i]}
    declare -A f=()
    j=$((i + 1))
    while ((j + 1 < ${#lines[@]})) && [[ ! ${lines[j]} =~ ^[0-9]+-[0-9]+$ ]]; do
      f[${lines[j]}]=${lines[j + 1]}
      j=$((j + 2))
    done
    handle "$id" "${f[room]:-}" "${f[conn]:-}" "${f[data]:-}"
    cli XACK "$key" "$group" "$id" >/dev/null
    unset f
    i=$j
  done
done
