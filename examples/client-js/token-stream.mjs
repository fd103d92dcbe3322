// An AI token stream: one producer streams tokens over a channel, any number of viewers print
// them as they arrive, in order; a viewer that loses its connection resumes where it was.
//
//   node token-stream.mjs view [stream]               a viewer
//   node token-stream.mjs produce [stream] [text…]    a producer (service key in SERVICE_KEY
//                                                     when the server has --jwt-secret)
//
// CORECAST_URL defaults to http://127.0.0.1:4000.

import { createClient, createServerClient } from '@corecast/client'
import WebSocket from 'ws'

const url = process.env.CORECAST_URL ?? 'http://127.0.0.1:4000'
const [mode = 'view', stream = 'demo', ...words] = process.argv.slice(2)
const topic = `ai/${stream}`

if (mode === 'produce') {
  const sdk = createServerClient(url, { serviceKey: process.env.SERVICE_KEY })
  const text = words.length ? words.join(' ') : 'The quick brown fox jumps over the lazy dog, token by token.'
  const tokens = text.match(/\S+\s*/g) ?? []
  const id = crypto.randomUUID()
  await sdk.emit('start', { id }, topic)
  for (const [i, token] of tokens.entries()) {
    // Each emit resolves once the server sequenced it: tokens keep their order.
    await sdk.emit('token', { id, i, token }, topic)
    await new Promise((r) => setTimeout(r, 50))
  }
  await sdk.emit('done', { id, count: tokens.length }, topic)
} else {
  const realtime = createClient(url, { token: process.env.TOKEN, WebSocket })
  const channel = realtime.channel(topic, { self: false })
  channel
    .on('start', () => process.stdout.write('\n> '))
    .on('token', ({ data }) => process.stdout.write(data.token))
    .on('done', ({ data }) => process.stdout.write(`\n[${data.count} tokens]\n`))
    .on('gap', (g) => process.stdout.write(`\n[missed tokens: ${g.message}]\n`))
  realtime.onStatusChange((s) => s !== 'connected' && process.stderr.write(`[${s}]\n`))
  await channel.subscribe()
  process.stderr.write(`[viewing ${topic}]\n`)
}
