#!/usr/bin/env python3
"""The client side of scripts/cluster-test.sh: a small blocking WebSocket client (stdlib only:
raw socket, HTTP/1.1 upgrade, masked frames) and the checks it runs through HAProxy.

  cluster_client.py echo --addr H:P --clients N [--admin H:P ...]
      opens N clients at once, echoes a message on each, closes them; with --admin, checks
      that every listed node accepted at least one of them (megasock_accepted_total).
  cluster_client.py drain --addr H:P --admin H:P --admin H:P --stop-file F ...
      opens resident clients, then runs connect loops (connect, upgrade, echo, close) until
      F exists; prints "loop running" once they run, so the caller can SIGTERM the node whose
      admin address comes first; at the end checks that the residents of that node got close
      1001, the others still echo, and that no connect failed. Last line:
      "connects=N failed=F".
  cluster_client.py get --addr H:P --path P
      one plain HTTP GET: prints the status code, then the body.
  cluster_client.py haproxy-stat --socket PATH
      HAProxy's `show stat` over its runtime API socket: one "proxy/server status" line per
      server.

Exit status 0 when every check passed, 1 otherwise (with the reasons on stderr).
"""

import argparse
import base64
import hashlib
import os
import socket
import struct
import sys
import threading
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class WsError(Exception):
    """What went wrong, in words for the failure list."""


def recv_all(sock):
    """Everything the peer sends until it closes."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def split_addr(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


class Ws:
    """One client connection: upgrade on construction, then masked frames."""

    def __init__(self, addr, path="/echo", timeout=5.0):
        self.buf = b""
        try:
            self.sock = socket.create_connection(split_addr(addr), timeout=timeout)
        except OSError as e:
            raise WsError(f"connect: {type(e).__name__}: {e}") from None
        try:
            self._upgrade(addr, path)
        except WsError:
            self.sock.close()
            raise
        except OSError as e:
            self.sock.close()
            raise WsError(f"upgrade: {type(e).__name__}: {e}") from None

    def _upgrade(self, addr, path):
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\n"
            b"Host: " + addr.encode() + b"\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise WsError(f"upgrade: closed after {len(self.buf)} bytes {self.buf[:60]!r}")
            self.buf += chunk
            if len(self.buf) > 16384:
                raise WsError("upgrade: response head over 16 KiB")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise WsError(f"upgrade: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        want = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != want:
            got = headers.get("sec-websocket-accept")
            raise WsError(f"upgrade: bad Sec-WebSocket-Accept {got!r}")

    def send(self, opcode, payload=b""):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send_close(self, code):
        self.send(CLOSE, struct.pack("!H", code))

    def _fill(self, n):
        """At least n bytes in the buffer. Nothing is consumed, so a timeout (the residents
        poll with one) never loses part of a frame."""
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WsError("EOF")
            self.buf += chunk

    def recv(self):
        """The next frame as (opcode, payload); the server's frames are never masked."""
        self._fill(2)
        b0, b1 = self.buf[0], self.buf[1]
        if b1 & 0x80:
            raise WsError("server sent a masked frame")
        n, at = b1 & 0x7F, 2
        if n == 126:
            self._fill(4)
            (n,) = struct.unpack("!H", self.buf[2:4])
            at = 4
        elif n == 127:
            self._fill(10)
            (n,) = struct.unpack("!Q", self.buf[2:10])
            at = 10
        self._fill(at + n)
        payload, self.buf = self.buf[at : at + n], self.buf[at + n :]
        return b0 & 0x0F, payload

    def recv_message(self):
        """The next data or close frame; answers pings on the way."""
        while True:
            op, payload = self.recv()
            if op == PING:
                self.send(PONG, payload)
                continue
            if op == PONG:
                continue
            return op, payload

    def close(self, code=1000):
        """Our close, then the server's close or EOF (bounded); errors here are not failures."""
        try:
            self.send_close(code)
            self.sock.settimeout(2.0)
            while True:
                op, _ = self.recv()
                if op == CLOSE:
                    break
        except (OSError, WsError):
            pass
        finally:
            self.sock.close()


def close_code(payload):
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def http_get(addr, path, timeout=5.0):
    """(status, body) of one GET with Connection: close."""
    with socket.create_connection(split_addr(addr), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        data = recv_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("utf-8", "replace")


def metric_sum(admin, name):
    """Sum of every sample of `name` (all label sets) in a node's /metrics."""
    status, body = http_get(admin, "/metrics")
    if status != 200:
        raise WsError(f"{admin}/metrics: HTTP {status}")
    total, seen = 0.0, False
    for line in body.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    if not seen:
        raise WsError(f"{admin}/metrics has no {name}")
    return total


def fail(msgs):
    for m in msgs:
        print(f"cluster_client: {m}", file=sys.stderr)
    sys.exit(1)


# --- echo: several clients at once through the balancer ------------------------------------


def cmd_echo(args):
    before = {a: metric_sum(a, "megasock_accepted_total") for a in args.admin}
    errors, clients = [], []
    for i in range(args.clients):
        try:
            clients.append(Ws(args.addr, args.path))
        except WsError as e:
            errors.append(f"client {i}: {e}")
    for i, c in enumerate(clients):
        msg = f"hello {i} through the balancer".encode()
        try:
            c.send(TEXT, msg)
            op, payload = c.recv_message()
            if (op, payload) != (TEXT, msg):
                errors.append(f"client {i}: sent {msg!r}, got opcode {op} {payload[:60]!r}")
        except (OSError, WsError) as e:
            errors.append(f"client {i}: echo: {type(e).__name__}: {e}")
    for c in clients:
        c.close()
    for a in args.admin:
        got = metric_sum(a, "megasock_accepted_total") - before[a]
        print(f"node {a}: accepted {got:.0f} of the {args.clients} clients")
        if got < 1:
            errors.append(f"node {a} accepted none of the {args.clients} clients")
    if errors:
        fail(errors)
    print(f"echo: {len(clients)} clients echoed")


# --- drain: connect loops while one node drains --------------------------------------------


class Resident:
    """A client that stays connected; a thread records the close code if the server sends one."""

    def __init__(self, addr, i, hold):
        self.i, self.hold = i, hold
        self.ws = Ws(addr, "/echo")
        msg = f"resident {i}".encode()
        self.ws.send(TEXT, msg)
        op, payload = self.ws.recv_message()
        if (op, payload) != (TEXT, msg):
            raise WsError(f"resident {i}: echo got opcode {op} {payload[:60]!r}")
        self.code = None  # the server's close code, once it sent one
        self.error = None
        self.stop = threading.Event()
        self.ws.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        while not self.stop.is_set():
            try:
                op, payload = self.ws.recv_message()
            except socket.timeout:
                continue
            except (OSError, WsError) as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            if op != CLOSE:
                self.error = f"unexpected opcode {op} {payload[:60]!r}"
                return
            self.code = close_code(payload)
            # Answer a little later: the node stays in its drain (and /readyz 503) meanwhile.
            time.sleep(self.hold)
            try:
                self.ws.send_close(self.code or 1000)
            except OSError:
                pass
            self.ws.sock.close()
            return

    def finish(self):
        """After the drain: a resident the server did not close must still echo."""
        self.stop.set()
        self.thread.join(timeout=5)
        if self.code is not None or self.error is not None:
            return
        self.ws.sock.settimeout(5.0)
        msg = f"resident {self.i} still here".encode()
        try:
            self.ws.send(TEXT, msg)
            op, payload = self.ws.recv_message()
            if (op, payload) != (TEXT, msg):
                self.error = f"after the drain: opcode {op} {payload[:60]!r}"
        except (OSError, WsError) as e:
            self.error = f"after the drain: {type(e).__name__}: {e}"
        self.ws.close()


def connect_once(addr):
    """Connect, upgrade, echo, close: None on success, else what failed. A close frame in
    place of the echo is a success: a draining node says 1001 to an upgrade it completes."""
    try:
        c = Ws(addr, "/echo")
    except WsError as e:
        return str(e)
    try:
        c.send(TEXT, b"hi")
        op, payload = c.recv_message()
        if op == CLOSE:
            return None
        if (op, payload) != (TEXT, b"hi"):
            return f"echo: opcode {op} {payload[:60]!r}"
        return None
    except (OSError, WsError) as e:
        return f"echo: {type(e).__name__}: {e}"
    finally:
        c.close()


def cmd_drain(args):
    draining, others = args.admin[0], args.admin[1:]
    residents = []
    try:
        residents = [Resident(args.addr, i, args.hold) for i in range(args.residents)]
    except (OSError, WsError) as e:
        fail([f"resident: {e}"])
    # Which residents does the node to drain hold? Only they may be told 1001.
    deadline = time.monotonic() + 5
    while True:
        on = {a: metric_sum(a, "megasock_connections") for a in args.admin}
        if sum(on.values()) == args.residents:
            break
        if time.monotonic() > deadline:
            fail([f"the nodes report {on} connections, not the {args.residents} residents"])
        time.sleep(0.05)
    on_draining = int(on[draining])
    rest = args.residents - on_draining
    print(f"residents: {on_draining} on {draining}, {rest} on {', '.join(others)}")
    if on_draining < 1:
        fail([f"no resident on {draining}: the drain would close nobody"])

    stop = threading.Event()
    lock = threading.Lock()
    count = [0]
    failures = []

    def loop():
        while not stop.is_set():
            err = connect_once(args.addr)
            with lock:
                count[0] += 1
                if err is not None:
                    failures.append(f"{time.strftime('%H:%M:%S')} {err}")

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    start = time.monotonic()
    while count[0] < args.min_before:
        if time.monotonic() - start > args.max_seconds:
            stop.set()
            fail([f"the loops made only {count[0]} connects in {args.max_seconds}s"])
        time.sleep(0.02)
    print(f"loop running ({count[0]} connects)", flush=True)
    while not os.path.exists(args.stop_file):
        if time.monotonic() - start > args.max_seconds:
            failures.append(f"no stop file after {args.max_seconds}s")
            break
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    if any(t.is_alive() for t in threads):
        failures.append("a connect loop did not finish within 10s")

    errors = []
    for r in residents:
        r.finish()
    closed = [r for r in residents if r.code is not None]
    for r in residents:
        if r.error is not None:
            errors.append(f"resident {r.i}: {r.error}")
        elif r.code is not None and r.code != 1001:
            errors.append(f"resident {r.i}: close {r.code}, expected 1001")
    if len(closed) != on_draining:
        errors.append(
            f"{len(closed)} residents were closed, expected the {on_draining} on {draining}"
        )
    print(f"residents: {len(closed)} told 1001, {len(residents) - len(closed)} still echo")
    if failures:
        errors.append(f"{len(failures)} of {count[0]} connects failed:")
        errors.extend(f"  {f}" for f in failures[:30])
        if len(failures) > 30:
            errors.append(f"  ... and {len(failures) - 30} more")
    print(f"connects={count[0]} failed={len(failures)}", flush=True)
    if errors:
        fail(errors)


# --- small helpers for the shell script ----------------------------------------------------


def cmd_get(args):
    try:
        status, body = http_get(args.addr, args.path)
    except OSError as e:
        print(f"000\n{type(e).__name__}: {e}")
        return
    print(status)
    print(body, end="")


def cmd_haproxy_stat(args):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(args.socket)
        s.sendall(b"show stat\n")
        data = recv_all(s)
    lines = data.decode().splitlines()
    if not lines or not lines[0].startswith("# "):
        fail([f"show stat: unexpected answer {data[:200]!r}"])
    cols = lines[0][2:].split(",")
    for line in lines[1:]:
        if not line:
            continue
        row = dict(zip(cols, line.split(",")))
        if row["svname"] in ("FRONTEND", "BACKEND"):
            continue
        name = f"{row['pxname']}/{row['svname']}"
        print(f"{name} {row['status']} {row['check_status']} {row['check_code']}")


# --- room: one room across nodes (the Redis bridge) ----------------------------------------


def redis_numsub(addr, verb, channel):
    """Subscribers of `channel` on one Redis server (PUBSUB NUMSUB or SHARDNUMSUB)."""
    args = [b"PUBSUB", verb.encode(), channel.encode()]
    req = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    with socket.create_connection(split_addr(addr), timeout=2) as s:
        s.sendall(req)
        buf = b""
        while buf.count(b"\r\n") < 4:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    # *2 / $len / channel / :count
    lines = buf.split(b"\r\n")
    return int(lines[3][1:]) if len(lines) > 3 and lines[3].startswith(b":") else 0


def cmd_room(args):
    """Members of one room (through the balancer, or straight to a node) each receive every
    message of every sender exactly once, in per-sender order."""
    path = f"/ws/{args.room}"
    members = [Ws(args.addr, path) for _ in range(args.members)]
    errors = []
    deadline = time.time() + 10
    for a in args.admin:
        # Every node must hold members (else Redis is not needed), and have subscribed.
        if metric_sum(a, "megasock_connections") < 1:
            errors.append(f"node {a} holds none of the room's members")
        while metric_sum(a, "megasock_redis_subscriptions") < 1 and time.time() < deadline:
            time.sleep(0.05)
    if errors:
        fail(errors)
    # Every node must have subscribed to the room's channel before anything is published
    # (across nodes delivery is at most once: a node hears a room from its SUBSCRIBE on).
    if args.redis:
        channel = f"megasock:room:{args.room}"
        verb = "SHARDNUMSUB" if args.sharded else "NUMSUB"
        deadline = time.time() + 10
        while True:
            n = sum(redis_numsub(addr, verb, channel) for addr in args.redis)
            if n >= len(args.admin):
                break
            if time.time() > deadline:
                fail([f"{channel}: {n} subscribers after 10 s, expected {len(args.admin)}"])
            time.sleep(0.02)
    senders = members[: args.senders]
    for m in range(args.msgs):
        for si, s in enumerate(senders):
            s.send(TEXT, f"s{si}:{m}".encode())
    want = args.senders * args.msgs
    for i, c in enumerate(members):
        c.sock.settimeout(10.0)
        nxt = [0] * args.senders
        try:
            for _ in range(want):
                op, payload = c.recv_message()
                si, m = (int(x) for x in payload.decode()[1:].split(":"))
                if op != TEXT or m != nxt[si]:
                    errors.append(f"member {i}: sender {si} message {m}, expected {nxt[si]}")
                    break
                nxt[si] += 1
            c.sock.settimeout(0.3)
            try:
                op, payload = c.recv_message()
                errors.append(f"member {i}: an extra message {payload[:40]!r} (a duplicate)")
            except socket.timeout:
                pass
        except (OSError, WsError, ValueError) as e:
            errors.append(f"member {i}: got {sum(nxt)} of {want}: {type(e).__name__}: {e}")
    for c in members:
        c.close()
    if errors:
        fail(errors)
    print(f"room {args.room}: {len(members)} members each got {want} messages, once, in order")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--addr", required=True)
    e.add_argument("--path", default="/echo")
    e.add_argument("--clients", type=int, default=8)
    e.add_argument("--admin", action="append", default=[])
    d = sub.add_parser("drain")
    d.add_argument("--addr", required=True)
    d.add_argument("--admin", action="append", required=True, help="first: the node to drain")
    d.add_argument("--stop-file", required=True)
    d.add_argument("--threads", type=int, default=8)
    d.add_argument("--residents", type=int, default=4)
    d.add_argument("--hold", type=float, default=1.0, help="seconds before answering a close")
    d.add_argument("--min-before", type=int, default=200)
    d.add_argument("--max-seconds", type=float, default=30)
    g = sub.add_parser("get")
    g.add_argument("--addr", required=True)
    g.add_argument("--path", required=True)
    r = sub.add_parser("room")
    r.add_argument("--addr", required=True)
    r.add_argument("--room", required=True)
    r.add_argument("--members", type=int, default=8)
    r.add_argument("--senders", type=int, default=2)
    r.add_argument("--msgs", type=int, default=50)
    r.add_argument("--admin", action="append", default=[], help="nodes that must hold members")
    r.add_argument("--redis", action="append", default=[], help="HOST:PORT: wait for the nodes' subscriptions")
    r.add_argument("--sharded", action="store_true", help="count shard channel subscriptions")
    h = sub.add_parser("haproxy-stat")
    h.add_argument("--socket", required=True)
    args = p.parse_args()
    try:
        commands = {
            "echo": cmd_echo,
            "drain": cmd_drain,
            "get": cmd_get,
            "haproxy-stat": cmd_haproxy_stat,
            "room": cmd_room,
        }
        commands[args.cmd](args)
    except (OSError, WsError) as e:
        fail([f"{args.cmd}: {type(e).__name__}: {e}"])


if __name__ == "__main__":
    main()
