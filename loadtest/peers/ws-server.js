// Node `ws` broadcast peer for the corecast load generator.
//
// Protocol (deliberately the simplest fair broadcast server):
//   connect to  ws://HOST:PORT/?room=TOPIC
//   the server adds the socket to the room and sends the text frame "joined";
//   every text message a client sends is sent to every *other* client of its room,
//   byte-for-byte (the same string object goes to each socket, so ws frames it per socket).
//
// Usage: node ws-server.js --port 8080 [--host 127.0.0.1]
'use strict';
const { WebSocketServer } = require('ws');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const port = Number(arg('--port', '8080'));
const host = arg('--host', '127.0.0.1');

const rooms = new Map(); // room name -> Set<WebSocket>

const wss = new WebSocketServer({ host, port, perMessageDeflate: false, clientTracking: false });
wss.on('connection', (ws, req) => {
  const q = req.url.indexOf('room=');
  const room = q >= 0 ? decodeURIComponent(req.url.slice(q + 5).split('&')[0]) : 'default';
  let set = rooms.get(room);
  if (!set) {
    set = new Set();
    rooms.set(room, set);
  }
  set.add(ws);
  ws.on('message', (data, isBinary) => {
    for (const peer of set) {
      if (peer !== ws && peer.readyState === 1) peer.send(data, { binary: isBinary });
    }
  });
  ws.on('close', () => {
    set.delete(ws);
    if (set.size === 0) rooms.delete(room);
  });
  ws.on('error', () => {});
  ws.send('joined');
});
wss.on('listening', () => {
  console.log(`ws peer listening on ws://${host}:${port}`);
});
