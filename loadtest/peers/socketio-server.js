// Socket.IO v4 broadcast peer for the corecast load generator.
//
// Protocol (Engine.IO v4 over WebSocket only):
//   client -> 42["join","TOPIC"]   server joins the socket to room TOPIC and answers 42["joined","TOPIC"]
//   client -> 42["m",PAYLOAD]      server emits 42["m",PAYLOAD] to every other socket of that room
//                                   (socket.to(room).emit: the adapter encodes the packet once per broadcast)
//
// Usage: node socketio-server.js --port 8081 [--host 127.0.0.1]
'use strict';
const http = require('http');
const { Server } = require('socket.io');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const port = Number(arg('--port', '8081'));
const host = arg('--host', '127.0.0.1');

const httpServer = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
const io = new Server(httpServer, {
  transports: ['websocket'],
  perMessageDeflate: false,
  httpCompression: false,
  serveClient: false,
  maxHttpBufferSize: 1e6,
});
io.on('connection', (socket) => {
  socket.on('join', (topic) => {
    socket.join(topic);
    socket.data.room = topic;
    socket.emit('joined', topic);
  });
  socket.on('m', (payload) => {
    const room = socket.data.room;
    if (room !== undefined) socket.to(room).emit('m', payload);
  });
});
httpServer.listen(port, host, () => {
  console.log(`socket.io peer listening on http://${host}:${port}`);
});
