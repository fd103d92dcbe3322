// corecast serving TLS (`--tls-cert` / `--tls-key`): the unmodified realtime-js over wss://
// (broadcast across shards, presence, a 300 KiB payload and a burst in order), supabase-js over
// https:// (its REST broadcast and the socket), and Server-Sent Events over https:// with the
// `eventsource` package.
//
// Run by tests/tls.rs, which makes the certificate (a CA and a leaf for 127.0.0.1/localhost),
// passes its files in CORECAST_TEST_TLS_CERT / CORECAST_TEST_TLS_KEY and trusts the CA through
// NODE_EXTRA_CA_CERTS, as a user of a private CA would. Nothing here turns verification off.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { EventSource } from 'eventsource'
import WebSocket from 'ws'
import { createClient } from '@supabase/supabase-js'
import { Server, Log, clientOnShard, subscribed, collect, topic, track, until } from './helpers.mjs'

const CERT = process.env.CORECAST_TEST_TLS_CERT
const KEY = process.env.CORECAST_TEST_TLS_KEY

let srv
before(async () => {
  assert.ok(CERT && KEY, 'CORECAST_TEST_TLS_CERT and CORECAST_TEST_TLS_KEY are set (run through tests/tls.rs)')
  srv = await new Server({ args: ['--tls-cert', CERT, '--tls-key', KEY] }).start()
  assert.ok(srv.http.startsWith('https://'), `the server reports https: ${srv.http}`)
})
after(() => srv.stop())

describe('TLS', { concurrency: true }, () => {
  it('realtime-js over wss:// broadcasts across shards, big and small, in order', async (t) => {
    const after = t.after.bind(t)
    assert.ok(srv.endpoint().startsWith('wss://'))
    const name = topic('tls')
    const sender = await clientOnShard(srv, 0, { after })
    const r0 = await clientOnShard(srv, 0, { after })
    const r1 = await clientOnShard(srv, 1, { after })
    const chS = sender.channel(name, { config: { broadcast: { ack: true } } })
    const [g0, g1] = [collect(r0.channel(name)), collect(r1.channel(name))]
    await Promise.all([subscribed(chS), subscribed(r0.channel(name)), subscribed(r1.channel(name))])

    // Bigger than a TLS record (16 KiB) and than the session's 64 KiB buffer.
    const big = { blob: 'x'.repeat(300 * 1024) }
    assert.equal(await chS.send({ type: 'broadcast', event: 'big', payload: big }), 'ok')
    const n = 500
    for (let i = 0; i < n; i++) chS.send({ type: 'broadcast', event: 'seq', payload: { i } })
    for (const g of [g0, g1]) {
      await g.wait((m) => m.event === 'seq', { count: n, timeoutMs: 20000, label: 'the burst' })
      const got = g.items
      assert.equal(got[0].event, 'big')
      assert.equal(got[0].payload.blob.length, big.blob.length)
      assert.deepEqual(
        got.filter((m) => m.event === 'seq').map((m) => m.payload.i),
        [...Array(n).keys()],
        'every message once, in order'
      )
    }
  })

  it('presence over wss://', async (t) => {
    const after = t.after.bind(t)
    const name = topic('tls-presence')
    const a = await clientOnShard(srv, 0, { after })
    const b = await clientOnShard(srv, 1, { after })
    const chA = a.channel(name, { config: { presence: { key: 'alice', enabled: true } } })
    const chB = b.channel(name, { config: { presence: { key: 'bob', enabled: true } } })
    chB.on('presence', { event: 'sync' }, () => {})
    await Promise.all([subscribed(chA), subscribed(chB)])
    await chA.track({ online: true })
    await until(() => 'alice' in chB.presenceState(), { label: 'alice seen by bob over TLS' })
    assert.equal(chB.presenceState().alice[0].online, true)
  })

  it('supabase-js over https://: the socket, and its REST broadcast', async (t) => {
    const client = createClient(srv.http, 'anon-key', {
      realtime: { transport: WebSocket },
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    })
    t.after(() => client.removeAllChannels())
    const name = topic('tls-sb')
    const listener = client.channel(name)
    const got = collect(listener)
    const statuses = track(listener)
    await statuses.wait((s) => s.status === 'SUBSCRIBED', { label: 'SUBSCRIBED over wss' })
    // httpSend: POST /realtime/v1/api/broadcast over https.
    const sender = client.channel(name)
    const res = await sender.httpSend('rest', { over: 'https' })
    assert.equal(res.success, true, JSON.stringify(res))
    const [m] = await got.wait((x) => x.event === 'rest', { label: 'the REST broadcast' })
    assert.deepEqual(m.payload, { over: 'https' })
  })

  it('Server-Sent Events over https:// (eventsource)', async (t) => {
    const name = topic('tls-sse')
    const events = new Log('SSE events')
    const es = new EventSource(`${srv.http}/realtime/v1/sse?topic=${name}&apikey=anon-key`)
    t.after(() => es.close())
    const opened = new Promise((resolve, reject) => {
      es.onopen = resolve
      es.onerror = (e) => reject(new Error(`EventSource error: ${e.message ?? e.type}`))
    })
    es.addEventListener('broadcast', (e) => events.push(JSON.parse(e.data)))
    await opened
    for (let i = 0; i < 20; i++) {
      const r = await fetch(`${srv.http}/realtime/v1/api/broadcast`, {
        method: 'POST',
        headers: { apikey: 'anon-key', 'content-type': 'application/json' },
        body: JSON.stringify({ messages: [{ topic: name, event: 'e', payload: { i } }] }),
      })
      assert.equal(r.status, 202)
    }
    await events.wait(() => true, { count: 20, label: '20 events over https' })
    assert.deepEqual(
      events.items.map((e) => e.payload.i),
      [...Array(20).keys()]
    )
  })
})
