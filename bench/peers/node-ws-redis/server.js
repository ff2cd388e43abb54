'use strict';
// Node.js `ws` nodes sharing rooms through Redis pub/sub, the pattern of socket.io's Redis
// adapter: a message is delivered to the local members at once and published, with this
// node's id, to the room's channel; every node subscribes to the channels of the rooms it has
// members in and delivers what other nodes published (its own echo is dropped by id).
//   GET /ws/{room}  every text/binary message goes to every member on every node
// Usage: node server.js --listen HOST:PORT --ready-file PATH --redis redis://HOST:PORT
const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');
const { createClient } = require('redis');
const { parseArgs, writeReady } = require('../common/args.js');

const argv = process.argv.slice(2);
const at = argv.indexOf('--redis');
const redisUrl = at >= 0 ? argv.splice(at, 2)[1] : 'redis://127.0.0.1:6379';
const opts = parseArgs(argv);
const uid = crypto.randomBytes(16);
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 16 << 20 });
const rooms = new Map(); // room -> Set of WebSocket
const pub = createClient({ url: redisUrl });
const sub = pub.duplicate();
const channel = (room) => `peer:room:${room}`;

function deliverLocal(members, data, isBinary) {
  for (const m of members) if (m.readyState === 1) m.send(data, { binary: isBinary });
}

function onPacket(packet, ch) {
  if (packet.subarray(1, 17).equals(uid)) return; // our own
  const members = rooms.get(ch.toString().slice('peer:room:'.length));
  if (members) deliverLocal(members, packet.subarray(17), packet[0] === 1);
}

const server = http.createServer((req, res) => {
  res.writeHead(404, { Connection: 'close' });
  res.end();
});
server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?')[0];
  if (!path.startsWith('/ws/') || path.length === 4) {
    socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  const room = path.slice(4);
  wss.handleUpgrade(req, socket, head, (ws) => {
    let members = rooms.get(room);
    if (!members) {
      members = new Set();
      rooms.set(room, members);
      sub.subscribe(channel(room), onPacket, true).catch(() => {});
    }
    members.add(ws);
    ws.on('message', (data, isBinary) => {
      deliverLocal(members, data, isBinary);
      const packet = Buffer.concat([Buffer.from([isBinary ? 1 : 0]), uid, data]);
      pub.publish(channel(room), packet).catch(() => {});
    });
    ws.on('close', () => {
      members.delete(ws);
      if (members.size === 0 && rooms.get(room) === members) {
        rooms.delete(room);
        sub.unsubscribe(channel(room)).catch(() => {});
      }
    });
  });
});
server.on('clientError', (err, socket) => socket.destroy());

Promise.all([pub.connect(), sub.connect()]).then(() => {
  server.listen(opts.port, opts.host, 65535, () => writeReady(opts, server.address().port, 'node-ws-redis'));
});

function shutdown() {
  server.close();
  for (const ws of wss.clients) ws.close(1001, 'server shutting down');
  setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
