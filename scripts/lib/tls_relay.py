"""A plain-TCP to TLS relay, so that a client without TLS (kosoku 0.1.0 refuses wss:// URLs)
drives megasock's wss:// listener. Every connection accepted on the plain side gets its own
TLS connection to the target (the server's certificate checked against --ca); bytes are
copied both ways unchanged.

Closing is passed on in the order the server chose: the server's close_notify + FIN becomes a
FIN to the client (half-close, so a client can still answer), and the client's FIN closes the
TLS side (close_notify, then TCP). That keeps "who closed TCP first" as the server decided,
which is what the Autobahn close verdicts judge.

usage: python3 tls_relay.py --target HOST:PORT --ca CA.pem --ready-file FILE
(writes `relay=127.0.0.1:PORT` to FILE once listening; runs until SIGTERM)
"""

import argparse
import asyncio
import os
import signal
import ssl


async def pipe(reader, writer, on_eof):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    await on_eof()


async def handle(client_r, client_w, host, port, ctx):
    try:
        server_r, server_w = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname="localhost"
        )
    except (OSError, ssl.SSLError):
        client_w.close()
        return

    async def server_ended():
        # The server closed (close_notify and/or FIN): pass a FIN to the client.
        try:
            if client_w.can_write_eof():
                client_w.write_eof()
        except OSError:
            pass

    async def client_ended():
        # TLS has no half-close here: close_notify, then the TCP connection.
        try:
            server_w.close()
            await server_w.wait_closed()
        except (OSError, ssl.SSLError):
            pass

    await asyncio.gather(
        pipe(client_r, server_w, client_ended), pipe(server_r, client_w, server_ended)
    )
    client_w.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--ready-file", required=True)
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    srv = await asyncio.start_server(
        lambda r, w: handle(r, w, host, int(port), ctx), "127.0.0.1", 0
    )
    bound = srv.sockets[0].getsockname()
    tmp = a.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"relay={bound[0]}:{bound[1]}\n")
    os.replace(tmp, a.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    async with srv:
        await stop.wait()


asyncio.run(main())
