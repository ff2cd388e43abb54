#!/usr/bin/env bash
# The repository's Python venv (.venv) with the pinned packages of scripts/requirements.txt:
# kosoku (scripts/autobahn.sh) and websockets (tests/deflate.rs, a real client with
# permessage-deflate). Creates it (or recreates a broken one) and installs what is missing or
# at another version; quick when everything is there.
#
#   scripts/venv.sh        (.ci/run and scripts/autobahn.sh call it)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/scripts/requirements.txt"

log() { printf 'venv: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 is required"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "kosoku needs Python >= 3.10, python3 is $(python3 -V 2>&1)"
if [[ -e $VENV ]] && ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    log "$VENV is broken (its python does not run); recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
PY="$VENV/bin/python"

# Every `name==version` line installed at that version? (No pip run when so: pip is slow.)
if ! "$PY" - "$REQUIREMENTS" <<'PYTHON'; then
import importlib.metadata as m, sys
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, version = line.split("==")
    try:
        if m.version(name) != version:
            sys.exit(1)
    except m.PackageNotFoundError:
        sys.exit(1)
PYTHON
    log "installing $(grep -v '^#' "$REQUIREMENTS" | xargs) into $VENV"
    timeout 600 "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS" ||
        die "pip install -r $REQUIREMENTS failed"
fi
