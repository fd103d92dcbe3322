// uWebSockets.js broadcast peer for the corecast load generator.
//
// The same protocol as ws-server.js, so the generator speaks to both the same way:
//   connect to  ws://HOST:PORT/?room=TOPIC
//   the server subscribes the socket to the topic and sends the text frame "joined";
//   every message a client sends is published to every *other* subscriber of its topic,
//   byte-for-byte, with uWS's native pub/sub (`ws.publish` skips the sender).
//
// uWebSockets.js comes from the npm package @trufflesuite/uws-js-unofficial (uWS.js v20.30,
// prebuilt for Node 20 linux-x64). That package silently falls back to a slow pure-JS
// implementation when its native binary does not load; this server loads the binary itself
// and exits instead, so a run never measures the fallback under uWS's name.
//
// Usage: node uws-server.js --port 8080 [--host 127.0.0.1]
'use strict';
const path = require('path');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const port = Number(arg('--port', '8080'));
const host = arg('--host', '127.0.0.1');

let uWS;
try {
  const pkg = path.dirname(require.resolve('@trufflesuite/uws-js-unofficial/package.json'));
  const bin = `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`;
  uWS = require(path.join(pkg, 'binaries', bin));
} catch (e) {
  console.error(`uws peer: the native uWebSockets.js binary did not load (${e.message})`);
  process.exit(1);
}

const app = uWS.App();
app.ws('/*', {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024 * 1024,
  // No idle timeout (the generator's peers send no heartbeats; ws-server.js has none either).
  idleTimeout: 0,
  // uWS's default (64 KiB) *skips* a subscriber whose send buffer holds more than that: under
  // a fan-out burst it would drop messages where corecast, nats, ws and Socket.IO queue them.
  // 64 MiB per socket makes it queue like the others, so its figures are for delivering
  // everything (the loss columns would show it if it still dropped).
  maxBackpressure: 64 * 1024 * 1024,
  closeOnBackpressureLimit: false,
  upgrade: (res, req, context) => {
    const q = req.getQuery('room');
    const room = q ? decodeURIComponent(q) : 'default';
    res.upgrade(
      { room },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },
  open: (ws) => {
    ws.subscribe(ws.getUserData().room);
    ws.send('joined', false);
  },
  message: (ws, message, isBinary) => {
    ws.publish(ws.getUserData().room, message, isBinary);
  },
});
app.listen(host, port, (listenSocket) => {
  if (!listenSocket) {
    console.error(`uws peer: could not listen on ${host}:${port}`);
    process.exit(1);
  }
  console.log(`uws peer listening on ws://${host}:${port}`);
});
