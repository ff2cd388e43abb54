#!/usr/bin/env python3
"""The figures of a scripts/million.sh run, from what the run left in its directory.

    million_report.py snapshot OUT NAME      kernel TCP counters now -> OUT/NAME.counters.json
    million_report.py scrape OUT ADMIN...    sum every server's /metrics -> OUT/servers.json
    million_report.py report OUT             everything -> OUT/report.json, a summary on stdout

The report joins the load generator's JSON (connections, delivery, server RSS and CPU summed
over the server processes, kernel memory, pings answered while the connections were held),
the servers' own counters (why connections ended, pings sent), and the kernel's TCP counters
before and after (listen-queue overflows, resets, aborts), then projects two million from the
measured per-connection figures. It exits 1 unless every requested connection opened and
received the message.
"""
import json
import os
import re
import sys
import urllib.request

# Kernel counters that explain a failed connect (from /proc/net/netstat and /proc/net/snmp).
COUNTERS = [
    "TcpExt:ListenOverflows", "TcpExt:ListenDrops", "TcpExt:TCPReqQFullDrop",
    "TcpExt:TCPAbortOnData", "TcpExt:TCPAbortOnMemory", "TcpExt:TCPAbortOnTimeout",
    "TcpExt:TCPTimeouts", "TcpExt:SyncookiesSent", "TcpExt:TCPBacklogDrop",
    "TcpExt:TCPMemoryPressures", "TcpExt:TWRecycled", "TcpExt:PAWSTimewait",
    "Tcp:AttemptFails", "Tcp:EstabResets", "Tcp:OutRsts", "Tcp:RetransSegs",
]


def kernel_counters():
    out = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        with open(path) as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            prefix, names = names.split(":", 1)
            _, values = values.split(":", 1)
            for n, v in zip(names.split(), values.split()):
                key = f"{prefix}:{n}"
                if key in COUNTERS:
                    out[key] = int(v)
    return out


def scrape(admins):
    """Sums the counters that say how connections ended, over every server."""
    wanted = re.compile(
        r"^(megasock_(disconnects_total|http_responses_total|accept_errors_total|pings_sent_total|"
        r"accepted_total|connections|messages_dropped_total|handshakes_total|publisher_pauses_total|"
        r"bus_overflowed_total|redis_[a-z_]*total)[^ ]*) ([0-9.e+]+)$")
    total, reached, per_server = {}, 0, []
    for a in admins:
        try:
            with urllib.request.urlopen(f"http://{a}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError as e:
            print(f"million: cannot scrape {a}: {e}", file=sys.stderr)
            continue
        reached += 1
        mine = {}
        for line in text.splitlines():
            m = wanted.match(line)
            if m:
                total[m.group(1)] = total.get(m.group(1), 0) + float(m.group(3))
                mine[m.group(1)] = int(float(m.group(3)))
        per_server.append({"admin": a, **{k: v for k, v in mine.items() if v}})
    return {"servers_scraped": reached, "servers": len(admins),
            "metrics": {k: int(v) for k, v in sorted(total.items()) if v},
            "per_server": per_server}


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def report(out):
    bench = load(os.path.join(out, "million.json"), {})
    run = load(os.path.join(out, "run.json"), {})
    servers = load(os.path.join(out, "servers.json"), {})
    before = load(os.path.join(out, "before.counters.json"), {})
    after = load(os.path.join(out, "after.counters.json"), {})
    conns = bench.get("connections", {})
    server = bench.get("server", {})
    hold = server.get("hold", {})
    lat = bench.get("latency_us", {})
    requested = run.get("connections", conns.get("requested", 0))
    opened = conns.get("opened", 0)
    delivered = bench.get("deliveries", 0)
    kernel_delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}

    rss_b = server.get("rss_per_conn_bytes")
    slab_b = server.get("kernel_slab_per_conn_bytes")
    tcp_b = server.get("kernel_tcp_mem_per_conn_bytes")
    loadgen_b = bench.get("loadgen", {}).get("rss_per_conn_bytes")
    projection = None
    if rss_b is not None and slab_b is not None:
        # What 2,000,000 would take on this box, from the per-connection figures measured here
        # (kernel figures count both ends, as a loopback run does; a real server has one end).
        n = 2_000_000
        projection = {
            "connections": n,
            "server_rss_gib": n * rss_b / 2**30,
            "kernel_slab_both_ends_gib": n * slab_b / 2**30,
            "kernel_slab_server_end_gib": n * slab_b / 2 / 2**30,
            "loadgen_rss_gib": n * (loadgen_b or 0) / 2**30,
            "server_processes_at_this_fd_cap": -(-n // run.get("per_process", 18000)),
            "ephemeral_ports_needed": n,
            "source_addresses_needed": -(-n // 25000),
            "hold_cpu_cores_with_pings": (hold.get("cpu_cores", 0) * n / max(opened, 1)),
        }

    # Every requested connection opened and got the message, and the load generator saw no
    # other problem (a connection dropped, processes that would not stop).
    ok = (opened >= requested and delivered >= opened and bench.get("lost", 1) == 0
          and bool(bench.get("ok")))
    rep = {
        "ok": ok,
        "command": run.get("command"),
        "box": run.get("box"),
        "requested": requested,
        "opened": opened,
        "failures": conns.get("failures", {}),
        "problems": bench.get("problems", []),
        "connect_s": conns.get("ramp_s"),
        "connect_rate_per_s": bench.get("connect_rate_per_s"),
        "verified": {
            "received_the_message": delivered,
            "answered_a_ping": hold.get("connections_that_answered_a_ping"),
        },
        "delivery_to_last_ms": lat.get("max", 0) / 1000,
        "delivery_p50_ms": lat.get("p50", 0) / 1000,
        "server_rss_per_conn_bytes": rss_b,
        "kernel_slab_per_conn_bytes_both_ends": slab_b,
        "kernel_tcp_mem_per_conn_bytes_both_ends": tcp_b,
        "loadgen_rss_per_conn_bytes": loadgen_b,
        "hold": hold,
        "ping_interval_s": run.get("ping_interval_s"),
        "servers": servers,
        "kernel_counters_delta": kernel_delta,
        "projection_2m": projection,
        "bench_report": "million.json",
        "plots": sorted(f for f in os.listdir(out) if f.endswith(".svg")),
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(rep, f, indent=2)

    def num(v, fmt="{:,.0f}"):
        return "-" if v is None else fmt.format(v)

    print(f"million: {num(opened)} of {num(requested)} connections opened in "
          f"{num(conns.get('ramp_s'), '{:.1f}')} s ({num(bench.get('connect_rate_per_s'))}/s); "
          f"failures {conns.get('failures') or 'none'}")
    print(f"million: one publish reached {num(delivered)} members: last after "
          f"{rep['delivery_to_last_ms']:,.0f} ms, p50 {rep['delivery_p50_ms']:,.0f} ms")
    print(f"million: server RSS {num(rss_b)} B/connection (all processes); kernel slab "
          f"{num(slab_b)} B and TCP buffers {num(tcp_b)} B per connection (both ends)")
    if hold:
        cpu_ping = hold.get("cpu_us_per_ping")
        print(f"million: held {hold.get('seconds', 0):.0f} s: server CPU "
              f"{hold.get('cpu_cores', 0):.2f} cores; {num(hold.get('pings_answered'))} pings "
              f"answered by {num(hold.get('connections_that_answered_a_ping'))} connections"
              + (f" ({cpu_ping:.1f} µs of server CPU per ping, idle work included)"
                 if cpu_ping else ""))
    if servers.get("metrics"):
        ended = {k: v for k, v in servers["metrics"].items()
                 if k.startswith(("megasock_disconnects_total", "megasock_http_responses",
                              "megasock_accept_errors"))}
        print(f"million: servers' own counts: {ended or 'no disconnects'}")
    if kernel_delta:
        print(f"million: kernel TCP counters during the run: {kernel_delta}")
    if projection:
        print(f"million: 2,000,000 would need about {projection['server_rss_gib']:.2f} GiB server "
              f"RSS + {projection['kernel_slab_server_end_gib']:.1f} GiB kernel slab (server end), "
              f"{projection['hold_cpu_cores_with_pings']:.2f} cores while idle "
              f"(pings every {run.get('ping_interval_s')} s)")
    for p in bench.get("problems", []):
        print(f"million: problem: {p}")
    print(f"million: report {os.path.join(out, 'report.json')}")
    return 0 if ok else 1


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    verb, out = argv[1], argv[2]
    if verb == "snapshot":
        with open(os.path.join(out, f"{argv[3]}.counters.json"), "w") as f:
            json.dump(kernel_counters(), f)
        return 0
    if verb == "scrape":
        with open(os.path.join(out, "servers.json"), "w") as f:
            json.dump(scrape(argv[3:]), f, indent=2)
        return 0
    if verb == "report":
        return report(out)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
