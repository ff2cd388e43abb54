'use strict';
// Classic Node.js `ws` server speaking megasock's routes, for side-by-side benchmarks.
//   GET /echo       every message comes back to the sender with the same opcode
//   GET /ws/{room}  the connection joins {room}; every text/binary message goes to every
//                   member of the room, the sender included (rooms: a Map of Sets)
// Usage: node server.js [--listen HOST:PORT | --port PORT] [--ready-file PATH] [--deflate]
//        --deflate: perMessageDeflate as ws documents it (zlib per socket, context takeover
//        when the client allows it), with threshold 128 like megasock's --deflate-min-size.
//        (env: PORT, HOST, READY_FILE; port 0 picks a free port)
// The ready file gets `ws=HOST:PORT` once listening, like megasock's --ready-file.
const http = require('http');
const { WebSocketServer } = require('ws');
const { parseArgs, writeReady } = require('../common/args.js');

const opts = parseArgs(process.argv.slice(2));
const MiB = 1024 * 1024;

const wss = new WebSocketServer({
  noServer: true,
  perMessageDeflate: opts.deflate ? { threshold: 128 } : false,
  maxPayload: 16 * MiB,
  clientTracking: true,
});
const rooms = new Map(); // room name -> Set of WebSocket

const server = http.createServer((req, res) => {
  res.writeHead(404, { Connection: 'close', 'Content-Type': 'text/plain' });
  res.end('not found\n');
});

function reject(socket, status) {
  socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
}

server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?')[0];
  let room = null;
  if (path.startsWith('/ws/')) {
    room = path.slice(4);
    if (room.length === 0 || room.includes('/')) return reject(socket, '400 Bad Request');
  } else if (path !== '/echo') {
    return reject(socket, '404 Not Found');
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (room === null) {
      ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
      return;
    }
    let members = rooms.get(room);
    if (!members) {
      members = new Set();
      rooms.set(room, members);
    }
    members.add(ws);
    ws.on('message', (data, isBinary) => {
      for (const m of members) {
        if (m.readyState === 1) m.send(data, { binary: isBinary });
      }
    });
    ws.on('close', () => {
      members.delete(ws);
      if (members.size === 0 && rooms.get(room) === members) rooms.delete(room);
    });
  });
});
server.on('clientError', (err, socket) => socket.destroy());

server.listen(opts.port, opts.host, 65535, () => {
  writeReady(opts, server.address().port, 'node-ws');
});

function shutdown() {
  server.close();
  for (const ws of wss.clients) ws.close(1001, 'server shutting down');
  setTimeout(() => process.exit(0), 200).unref();
  wss.close(() => process.exit(0));
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
