// Node `ws` with permessage-deflate against megasock (run by tests/deflate.rs):
//   node ws_deflate.mjs ws://127.0.0.1:PORT ROOM
// Two room members and an echo client, all offering permessage-deflate. Prints one JSON line
// and exits 0 if every message came back byte for byte, 1 otherwise.
import WebSocket from 'ws';

const [base, room] = process.argv.slice(2);
const fail = (msg) => {
  console.error(`ws_deflate: ${msg}`);
  process.exit(1);
};
setTimeout(() => fail('timed out after 20 s'), 20000).unref();

// threshold 0: ws compresses every message it sends (its default is 1024 bytes).
const options = { perMessageDeflate: { threshold: 0 } };

function open(path) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(base + path, options);
    ws.binaryType = 'nodebuffer';
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

function next(ws) {
  return new Promise((resolve, reject) => {
    ws.once('message', (data, isBinary) => resolve({ data: Buffer.from(data), isBinary }));
    ws.once('error', reject);
  });
}

const chat = (n) => {
  let s = '';
  for (let i = 0; s.length < n; i++) {
    s += JSON.stringify({ type: 'message', room, id: i, user: `user${i % 7}`, text: `message ${i} says hello` });
  }
  return s.slice(0, n);
};

const a = await open(`/ws/${room}`);
const b = await open(`/ws/${room}`);
const echo = await open('/echo');
for (const ws of [a, b, echo]) {
  if (!ws.extensions.startsWith('permessage-deflate')) fail(`not negotiated: ${ws.extensions}`);
}

// A large and a small message through the room: both members get both, in order.
const big = chat(4096);
const small = 'hi';
const got = [next(a), next(b)];
a.send(big);
const first = await Promise.all(got);
const got2 = [next(a), next(b)];
a.send(small);
const second = await Promise.all(got2);
for (const [i, m] of first.entries()) if (m.isBinary || m.data.toString() !== big) fail(`member ${i}: big message differs`);
for (const [i, m] of second.entries()) if (m.isBinary || m.data.toString() !== small) fail(`member ${i}: small message differs`);

// Binary through the echo route.
const bin = Buffer.alloc(3000);
for (let i = 0; i < bin.length; i++) bin[i] = i % 13;
const back = next(echo);
echo.send(bin);
const e = await back;
if (!e.isBinary || !e.data.equals(bin)) fail('echo differs');

console.log(JSON.stringify({ extensions: a.extensions, ok: true }));
for (const ws of [a, b, echo]) ws.close(1000);
await Promise.all([a, b, echo].map((ws) => new Promise((r) => ws.once('close', r))));
