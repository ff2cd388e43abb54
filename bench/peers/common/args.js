'use strict';
// Shared by the peers: argument parsing and the ready file.
const fs = require('fs');

function usage(msg) {
  if (msg) console.error(msg);
  console.error('usage: node server.js [--listen HOST:PORT | --port PORT] [--host HOST] [--ready-file PATH] [--deflate]');
  process.exit(2);
}

function parseArgs(argv) {
  const opts = {
    host: process.env.HOST || '127.0.0.1',
    port: process.env.PORT !== undefined && process.env.PORT !== '' ? Number(process.env.PORT) : 0,
    readyFile: process.env.READY_FILE || null,
    // permessage-deflate on (each peer in its recommended way; see its server.js).
    deflate: process.env.DEFLATE === '1',
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--listen') {
      const v = next();
      const at = v.lastIndexOf(':');
      if (at < 0) usage(`--listen wants HOST:PORT, got ${v}`);
      opts.host = v.slice(0, at).replace(/^\[|\]$/g, '');
      opts.port = Number(v.slice(at + 1));
    } else if (a === '--port') {
      opts.port = Number(next());
    } else if (a === '--host') {
      opts.host = next();
    } else if (a === '--ready-file') {
      opts.readyFile = next();
    } else if (a === '--deflate') {
      opts.deflate = true;
    } else if (a === '-h' || a === '--help') {
      usage();
    } else if (/^\d+$/.test(a)) {
      opts.port = Number(a);
    } else {
      usage(`unknown argument ${a}`);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) usage(`bad port ${opts.port}`);
  return opts;
}

// Same format as megasock's --ready-file: `ws=HOST:PORT` on the first line.
// Written to a temporary name and renamed, so a reader never sees a partial file.
function writeReady(opts, port, name) {
  const line = `ws=${opts.host}:${port}\n`;
  console.log(`${name} peer listening: ${line.trim()}`);
  if (opts.readyFile) {
    const tmp = `${opts.readyFile}.tmp${process.pid}`;
    fs.writeFileSync(tmp, line);
    fs.renameSync(tmp, opts.readyFile);
  }
}

module.exports = { parseArgs, writeReady };
