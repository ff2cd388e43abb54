'use strict';
// uWebSockets.js peer speaking megasock's routes, for side-by-side benchmarks.
//   GET /echo       every message comes back to the sender with the same opcode
//   GET /ws/{room}  the connection joins {room}; every text/binary message goes to every
//                   member of the room, the sender included (native pub/sub: app.publish)
// Usage: node server.js [--listen HOST:PORT | --port PORT] [--ready-file PATH] [--deflate]
//        --deflate: permessage-deflate with uWS.SHARED_COMPRESSOR (one compressor for all,
//        no context takeover: uWS's recommendation for many sockets); publish compresses.
//        (env: PORT, HOST, READY_FILE; port 0 picks a free port)
// The ready file gets `ws=HOST:PORT` once listening, like megasock's --ready-file.
const uWS = require('uwebsockets');
const { parseArgs, writeReady } = require('../common/args.js');

const opts = parseArgs(process.argv.slice(2));
const MiB = 1024 * 1024;

const behavior = {
  compression: opts.deflate ? uWS.SHARED_COMPRESSOR : uWS.DISABLED,
  // Generous limits so that a broadcast burst (thousands of members, every message
  // queued behind the others) is never dropped or closed for backpressure.
  maxPayloadLength: 16 * MiB,
  maxBackpressure: 64 * MiB,
  closeOnBackpressureLimit: false,
  idleTimeout: 0,
  sendPingsAutomatically: false,
};

function upgrade(res, req, context, userData) {
  res.upgrade(
    userData,
    req.getHeader('sec-websocket-key'),
    req.getHeader('sec-websocket-protocol'),
    req.getHeader('sec-websocket-extensions'),
    context,
  );
}

let listenSocket = null;
const app = uWS.App()
  .ws('/echo', {
    ...behavior,
    upgrade: (res, req, context) => upgrade(res, req, context, {}),
    message: (ws, message, isBinary) => {
      ws.send(message, isBinary, opts.deflate);
    },
  })
  .ws('/ws/:room', {
    ...behavior,
    upgrade: (res, req, context) => upgrade(res, req, context, { room: req.getParameter(0) }),
    open: (ws) => {
      ws.subscribe(ws.getUserData().room);
    },
    message: (ws, message, isBinary) => {
      // app.publish reaches every subscriber, the sender included (ws.publish would skip it).
      app.publish(ws.getUserData().room, message, isBinary, opts.deflate);
    },
  })
  .any('/*', (res) => {
    res.writeStatus('404 Not Found').writeHeader('Connection', 'close').end('not found\n', true);
  })
  .listen(opts.host, opts.port, (token) => {
    if (!token) {
      console.error(`uws peer: cannot listen on ${opts.host}:${opts.port}`);
      process.exit(1);
    }
    listenSocket = token;
    const port = uWS.us_socket_local_port(token);
    writeReady(opts, port, 'uws');
  });

function shutdown() {
  if (listenSocket) {
    uWS.us_listen_socket_close(listenSocket);
    listenSocket = null;
  }
  if (typeof app.close === 'function') app.close();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
