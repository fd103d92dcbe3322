// A terminal chat room with history and presence.
//
//   node chat.mjs [name] [room]        (CORECAST_URL, default http://127.0.0.1:4000; TOKEN)
//
// Loads the last 20 messages, shows who is online, and sends every line you type (persisted,
// so the next person to join sees it in the history). Reconnects and resumes by itself: stop
// and restart the server and no message is lost; if some were out of reach, it says so.

import { createClient } from '@corecast/client'
import WebSocket from 'ws'
import readline from 'node:readline'

const url = process.env.CORECAST_URL ?? 'http://127.0.0.1:4000'
const name = process.argv[2] ?? `guest-${Math.floor(Math.random() * 1000)}`
const room = process.argv[3] ?? 'general'

const realtime = createClient(url, { token: process.env.TOKEN, WebSocket })
realtime.onStatusChange((status) => console.log(`[${status}]`))

const channel = realtime.channel(`chat/${room}`)
const online = new Map()
const show = (m) => console.log(`${new Date(m.timestamp).toLocaleTimeString()} ${m.userName}: ${m.text}`)

channel.track({ userId: name, name, status: 'online' })
channel
  .on('message', ({ data }) => show(data))
  .on('presence:join', ({ data }) => {
    online.set(data.userId, data)
    console.log(`* ${data.name} joined (${online.size} online: ${[...online.keys()].join(', ')})`)
  })
  .on('presence:leave', ({ data }) => {
    online.delete(data.userId)
    console.log(`* ${data.name} left (${online.size} online)`)
  })
  .on('gap', (gap) => console.log(`* some messages could not be resumed (${gap.message}); reload the history`))

const history = await channel.getHistory(20)
for (const h of history.reverse()) show(h.data)
await channel.subscribe()
console.log(`* joined chat/${room} as ${name}; type a line and press enter (Ctrl-D quits)`)

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', (text) => {
  if (!text.trim()) return
  channel
    .publish('message', { id: crypto.randomUUID(), userId: name, userName: name, text: text.trim(), timestamp: Date.now() }, { persist: true })
    .catch((e) => console.log(`* not sent: ${e.message}`))
})
rl.on('close', async () => {
  await channel.untrack().catch(() => {})
  await channel.unsubscribe()
  realtime.disconnect()
})
