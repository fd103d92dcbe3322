// A separate client process for presence.test.mjs: connects the unmodified realtime-js client to
// corecast, joins `topic` with presence key `key`, tracks `{pid, via: 'child'}`, prints
// `tracked <result>` on stdout and then waits to be killed (the test sends SIGKILL, so the
// socket is never closed by the client).
//
// Usage: node presence-child.mjs <endpoint ws://host:port/realtime/v1> <topic> <key>

import WebSocket from 'ws'
import { RealtimeClient } from '@supabase/realtime-js'

const [endpoint, topic, key] = process.argv.slice(2)
if (!endpoint || !topic || !key) {
  process.stderr.write('usage: node presence-child.mjs <endpoint> <topic> <key>\n')
  process.exit(2)
}

const client = new RealtimeClient(endpoint, { transport: WebSocket, params: { apikey: 'anon-key' } })
const ch = client.channel(topic, { config: { presence: { key } } })
ch.on('presence', { event: 'sync' }, () => {})
ch.subscribe(async (status, err) => {
  process.stdout.write(`status ${status}${err ? ` ${err.message}` : ''}\n`)
  if (status === 'SUBSCRIBED') {
    const result = await ch.track({ pid: process.pid, via: 'child' })
    process.stdout.write(`tracked ${result}\n`)
  }
})

// Stay alive until killed.
setInterval(() => {}, 1 << 30)
