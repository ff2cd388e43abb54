#!/usr/bin/env bash
# RFC 6455 conformance: the Autobahn|Testsuite cases, run by kosoku, against
# megasock's /echo route. Usage: scripts/autobahn.sh   (see docs/CONFORMANCE.md)
#
# What kosoku 0.1.0 does (read from its installed source and checked on the wire):
# - It is a Python package with a Rust (PyO3) core; the `kosoku` console script
#   (kosoku/_cli.py) calls kosoku.run_fuzzingclient(url, include, exclude,
#   concurrency). In that "fuzzingclient" mode it is the client and opens one
#   fresh connection per case to the server under test.
# - URL/path: every case connects to the URL it is given, verbatim. Path and query
#   are sent as they are and nothing is added per case: for ws://127.0.0.1:PORT/echo
#   every case sends `GET /echo HTTP/1.1` with Host, Upgrade, Connection: Upgrade,
#   Sec-WebSocket-Key, Sec-WebSocket-Version: 13 and no Origin, and no extensions
#   except in groups 12 and 13, which offer permessage-deflate (RFC 7692). No
#   path in the URL gives `GET /`. There is none of Autobahn's /runCase?case=N,
#   /getCaseCount or /updateReports (those belong to its fuzzingserver mode,
#   where the *client* is under test). So megasock needs no alias route.
# - Selection: -i/--include and -x/--exclude take a case id or a `*` glob, both
#   repeatable (`-x '12.*' -x '13.*'`); -p/--parallelism N runs N cases at once.
#   The suite has 517 cases: 301 in groups 1-10 and 216 in the permessage-deflate
#   groups 12 and 13. -s/--spec (Autobahn's JSON config) is not supported.
# - Verdicts: `behavior` is OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED,
#   or ERROR (no verdict: connection failure); `behaviorClose` is OK,
#   INFORMATIONAL, FAILED, UNCLEAN, WRONG CODE or FAILED BY CLIENT. kosoku counts
#   a case as passed when both are OK, NON-STRICT or INFORMATIONAL.
# - Exit status of the CLI: 0 if every case passed, 1 otherwise (UNIMPLEMENTED
#   counts as not passed), after writing reports to -o DIR (default
#   reports/clients): index.json, index.html, and one .json + .html per case,
#   named <agent>_case_<id with _>.<ext>, where the agent is the server's
#   `Server` header or, without one, host:port.
# - Timeouts: each case has its own timers (about 1 s for most, 100 s for the
#   9.x payload cases), but there is NO opening-handshake timeout: a server that
#   accepts TCP and never answers the upgrade hangs kosoku forever.
#
# Hence this script does not use the CLI: it calls run_fuzzingclient for each
# case itself (one case per call, up to AUTOBAHN_PARALLELISM at once), each under
# its own timeout, so a hung case is named and the other results still reach the
# report, which it writes with kosoku's own report writer.
#
# A case FAILS here if behavior is not OK/NON-STRICT/INFORMATIONAL/UNIMPLEMENTED
# (so FAILED, ERROR, or our TIMEOUT/NOT-RUN), or if behaviorClose is not OK or
# INFORMATIONAL (the issue requires echoing close codes and closing the TCP
# connection from the server side). UNIMPLEMENTED is counted, not failed.
#
# Environment:
#   MEGASOCK_BIN           server binary (default: cargo build --release, target/release/megasock)
#   AUTOBAHN_CASES         space-separated ids/globs to run instead of all (e.g. '5.* 6.4.*')
#   AUTOBAHN_PARALLELISM   cases in flight at once (default 2)
#   AUTOBAHN_DEADLINE      seconds for the whole case run (default 1800)
set -euo pipefail

READY_TIMEOUT=20   # seconds for the server to write its ready file
STOP_TIMEOUT=15    # seconds for the server to exit after SIGTERM

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv"
OUT="$ROOT/target/autobahn"
PARALLELISM=${AUTOBAHN_PARALLELISM:-2}
DEADLINE=${AUTOBAHN_DEADLINE:-1800}

log() { printf 'autobahn: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $PARALLELISM =~ ^[1-9][0-9]*$ ]] || die "AUTOBAHN_PARALLELISM must be a positive integer"
[[ $DEADLINE =~ ^[1-9][0-9]*$ ]] || die "AUTOBAHN_DEADLINE must be a positive integer (seconds)"

SERVER_PID=""
SERVER_STATUS=""  # exit status of the server once stop_server has reaped it
stop_server() {
    local pid=$SERVER_PID i
    [[ -n $pid ]] || return 0
    SERVER_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "server did not exit ${STOP_TIMEOUT}s after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    SERVER_STATUS=0
    wait "$pid" 2>/dev/null || SERVER_STATUS=$?
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. kosoku, pinned, in the repository's venv (scripts/requirements.txt).
"$ROOT/scripts/venv.sh" || die "scripts/venv.sh could not set up $VENV"
PY="$VENV/bin/python"

# 2. The server binary.
if [[ -n ${MEGASOCK_BIN:-} ]]; then
    BIN=$MEGASOCK_BIN
else
    log "building megasock (release)"
    cargo build --release --bin megasock
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/megasock"
fi
[[ -x $BIN ]] || die "server binary $BIN is not executable"

# 3. Start it on an ephemeral port and wait for its ready file.
rm -rf "$OUT"
mkdir -p "$OUT"
READY="$OUT/ready"
"$BIN" serve --listen 127.0.0.1:0 --workers 1 --max-message-size 16MiB \
    --ready-file "$READY" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!

ADDR=""
for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
    if [[ -f $READY ]]; then
        ADDR=$(sed -n 's/^ws=\([^[:space:]]*:[0-9][0-9]*\)[[:space:]]*$/\1/p' "$READY" | head -n 1)
        [[ -n $ADDR ]] && break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        tail -n 20 "$OUT/server.log" >&2 || true
        die "server exited before it was ready (log: $OUT/server.log)"
    fi
    sleep 0.1
done
if [[ -z $ADDR ]]; then
    tail -n 20 "$OUT/server.log" >&2 || true
    die "no ws= line in $READY after ${READY_TIMEOUT}s (log: $OUT/server.log)"
fi
URL="ws://$ADDR/echo"
log "server $BIN (pid $SERVER_PID) ready at $URL; running cases with parallelism $PARALLELISM"

# 4. Run the cases, write the reports, print verdicts. The driver prints
#    "PASSED FAILED" to $OUT/counts and exits 0 if it ran to the end.
start=$SECONDS
status=0
timeout --kill-after=10 $((DEADLINE + 150)) "$PY" - "$URL" "$OUT" "$PARALLELISM" "$DEADLINE" \
    "${AUTOBAHN_CASES:-*}" <<'PYTHON' || status=$?
import asyncio, collections, fnmatch, json, os, sys, time

from kosoku import FailureError, run_fuzzingclient
from kosoku._report import _report_filename, case_to_dict, write_reports
from kosoku.cases import CASES

url, out, parallelism, deadline, patterns = sys.argv[1:6]
parallelism, deadline = int(parallelism), float(deadline)
reports = os.path.join(out, "reports")

EXCLUDED = ()  # nothing since permessage-deflate (groups 12 and 13) is implemented
ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
ACCEPTED_CLOSE = {"OK", "INFORMATIONAL"}


def case_timeout(case_id):
    # kosoku waits up to 100 s for a 9.x echo; 12.x/13.x echo 1,000 compressed messages of
    # up to 128 KiB (seconds on a busy box); other cases take ~1 s at most.
    if case_id.startswith("9."):
        return 130.0
    return 240.0 if case_id.startswith(("12.", "13.")) else 30.0


def selected(case_id):
    if any(fnmatch.fnmatchcase(case_id, p) for p in EXCLUDED):
        return False
    return any(fnmatch.fnmatchcase(case_id, p) for p in patterns.split())


ids = [c for c in CASES if selected(c)]
if not ids:
    sys.exit(f"autobahn: no case matches AUTOBAHN_CASES={patterns!r}")


def message_as_bytes(cls):
    # kosoku 0.1.0 hands the 12.x/13.x cases a message that arrived uncompressed as str (text
    # decoded as UTF-8, binary as Latin-1, one character per byte, as in groups 1-10) and one
    # that was inflated as bytes. Their onMessage (Autobahn's, written for Python 2, where
    # both were bytes) hashes it, and a str raises TypeError ("Strings must be encoded before
    # hashing"): an ERROR whenever a server sends a message uncompressed, which RFC 7692
    # allows per message (megasock does under --deflate-min-size, or when compressing would
    # not make it smaller). Encoding the str back gives the case exactly the bytes that came
    # off the wire, which it then compares with what it sent.
    original = cls.onMessage

    def onMessage(self, msg, binary):
        if isinstance(msg, str):
            msg = msg.encode("latin-1" if binary else "utf-8")
        return original(self, msg, binary)

    cls.onMessage = onMessage


for c in ids:
    if c.startswith(("12.", "13.")):
        message_as_bytes(CASES[c])

results = {}  # case id -> CaseResult
problems = {}  # case id -> (verdict, text) for cases without a result
stop_at = time.monotonic() + deadline


async def run_one(case_id, gate):
    async with gate:
        left = stop_at - time.monotonic()
        if left <= 0:
            problems[case_id] = ("NOT-RUN", f"not started: the {deadline:.0f}s deadline had passed")
            return
        limit = min(case_timeout(case_id), left)
        try:
            got = await asyncio.wait_for(run_fuzzingclient(url, [case_id]), limit)
        except FailureError as failure:
            got = failure.results
        except asyncio.TimeoutError:
            problems[case_id] = ("TIMEOUT", f"no verdict within {limit:.0f}s (server hung? "
                                 "kosoku has no opening-handshake timeout)")
            return
        except Exception as exc:  # noqa: BLE001 - report and go on
            problems[case_id] = ("ERROR", f"kosoku raised {type(exc).__name__}: {exc}")
            return
        got = [r for r in got if r.case_id == case_id]
        if len(got) != 1:
            problems[case_id] = ("ERROR", f"kosoku returned {len(got)} results for this case")
            return
        results[case_id] = got[0]


async def main():
    gate = asyncio.Semaphore(parallelism)
    await asyncio.gather(*(run_one(c, gate) for c in ids))


began = time.monotonic()
asyncio.run(main())
elapsed = time.monotonic() - began

ordered = [results[c] for c in ids if c in results]
if ordered:
    write_reports(ordered, reports)


def short(value, limit=400):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + " ..."


behavior = collections.Counter()
close = collections.Counter()
failed = []
for c in ids:
    if c in problems:
        verdict, text = problems[c]
        behavior[verdict] += 1
        failed.append(c)
        continue
    r = results[c]
    b, bc = r.behavior.value, r.behavior_close.value
    behavior[b] += 1
    if b == "UNIMPLEMENTED":
        continue
    close[bc] += 1
    if b not in ACCEPTED or bc not in ACCEPTED_CLOSE:
        failed.append(c)

for c in failed:
    cls = CASES[c]
    print(f"\nFAILED case {c}: {getattr(cls, 'DESCRIPTION', '')}")
    print(f"  expectation: {getattr(cls, 'EXPECTATION', '')}")
    if c in problems:
        print(f"  verdict:     {problems[c][0]}: {problems[c][1]}")
        continue
    d = case_to_dict(results[c])
    print(f"  verdict:     behavior={d['behavior']} ({d['result']}); "
          f"close={d['behaviorClose']} ({d['resultClose']})")
    print(f"  expected:    {short(d['expected'])}")
    print(f"  received:    {short(d['received'])}")
    ec = d["expectedClose"]
    print(f"  close wanted: codes {ec.get('closeCode')}, kosoku closes first={ec.get('closedByMe')}, "
          f"clean required={ec.get('requireClean')}")
    print(f"  close seen:  server sent {d['remoteCloseCode']} {d['remoteCloseReason']!r}, "
          f"kosoku sent {d['localCloseCode']}, kosoku closed first={d['closedByMe']}, "
          f"clean={d['wasClean']} {d['wasNotCleanReason'] or ''}".rstrip())
    print(f"  report:      {os.path.join(reports, _report_filename(d['agent'], c, 'html'))}")

order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR", "TIMEOUT", "NOT-RUN"]
fmt = lambda counter, keys: ", ".join(
    f"{k} {counter[k]}" for k in keys + sorted(set(counter) - set(keys)))
print()
print(f"autobahn: {len(ids)} cases in {elapsed:.1f}s against {url}")
print(f"autobahn: behavior: {fmt(behavior, order)}")
print(f"autobahn: behaviorClose: {fmt(close, ['OK', 'INFORMATIONAL', 'FAILED', 'UNCLEAN', 'WRONG CODE', 'FAILED BY CLIENT'])}")
if ordered:
    print(f"autobahn: reports in {reports}/index.html (and index.json, one .json/.html per case)")
if failed:
    print(f"autobahn: failed cases: {' '.join(failed)}")
sys.stdout.flush()
with open(os.path.join(out, "counts"), "w") as f:
    f.write(f"{len(ids) - len(failed)} {len(failed)}\n")
PYTHON

if ((status != 0)); then
    [[ $status == 124 || $status == 137 ]] && log "case driver killed by the timeout"
    die "case driver exited with status $status after $((SECONDS - start))s"
fi
read -r passed failed <"$OUT/counts" || die "no counts from the case driver"

# 5. The server must have survived the run; then stop it.
died=0
kill -0 "$SERVER_PID" 2>/dev/null || died=1
stop_server
if ((died)); then
    tail -n 20 "$OUT/server.log" >&2 || true
    log "error: the server died during the run, exit status $SERVER_STATUS (log: $OUT/server.log)"
elif [[ $SERVER_STATUS != 0 ]]; then
    log "warning: server exited with status $SERVER_STATUS on SIGTERM (log: $OUT/server.log)"
fi

echo "autobahn: $passed passed, $failed failed"
((failed == 0 && died == 0))
