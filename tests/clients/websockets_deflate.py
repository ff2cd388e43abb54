"""Python `websockets` with permessage-deflate against megasock (run by tests/deflate.rs):

    .venv/bin/python websockets_deflate.py ws://127.0.0.1:PORT ROOM

Two room members and an echo client, all with websockets' default compression (it offers
permessage-deflate with client_max_window_bits). Prints one JSON line and exits 0 if every
message came back byte for byte, 1 otherwise.
"""

import json
import sys

from websockets.sync.client import connect

base, room = sys.argv[1:3]


def fail(msg):
    print(f"websockets_deflate: {msg}", file=sys.stderr)
    sys.exit(1)


def chat(n):
    parts, i = [], 0
    while sum(map(len, parts)) < n:
        parts.append(json.dumps({"type": "message", "room": room, "id": i, "text": f"message {i} says hello"}))
        i += 1
    return "".join(parts)[:n]


with connect(f"{base}/ws/{room}", compression="deflate", open_timeout=10) as a, \
        connect(f"{base}/ws/{room}", compression="deflate", open_timeout=10) as b, \
        connect(f"{base}/echo", compression="deflate", open_timeout=10) as echo:
    answers = [ws.response.headers.get("Sec-WebSocket-Extensions", "") for ws in (a, b, echo)]
    for answer in answers:
        if not answer.startswith("permessage-deflate"):
            fail(f"not negotiated: {answer!r}")
    for ws in (a, b, echo):
        if [e.name for e in ws.protocol.extensions] != ["permessage-deflate"]:
            fail(f"extensions in use: {ws.protocol.extensions}")

    big, small = chat(4096), "hi"
    a.send(big)
    a.send(small)
    for name, ws in (("a", a), ("b", b)):
        for want in (big, small):
            got = ws.recv(timeout=10)
            if got != want:
                fail(f"member {name}: got {got[:40]!r}..., want {want[:40]!r}...")

    blob = bytes(i % 13 for i in range(3000))
    echo.send(blob)
    if echo.recv(timeout=10) != blob:
        fail("echo differs")

print(json.dumps({"extensions": answers[0], "ok": True}))
