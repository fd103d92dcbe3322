// Transport 'sse' against the real server: push over one event stream per channel
// (GET /realtime/v1/sse, Last-Event-ID resume), publishing over REST, presence through the
// stream's `track` parameter.

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { createServerClient } from '../src/index.js'
import { Log, Server, client, jwt, nowSecs, sleep, startServer, topic, until } from './helpers.mjs'

describe("transport 'sse'", { concurrency: true }, () => {
  it('listen over SSE, publish over REST: RealtimePayload shape, both directions with a WebSocket client', async (t) => {
    const srv = await startServer(t)
    const sse = client(t, srv, { transport: 'sse' })
    const ws = client(t, srv)
    const seen = []
    sse.onStatusChange((s) => seen.push(s))
    const name = topic('sse')
    const got = new Log('sse')
    const gotWs = new Log('ws')
    const ch = sse.channel(name).on('message', (p) => got.push(p))
    await ch.subscribe()
    assert.deepEqual(seen, ['idle', 'connecting', 'connected'])
    assert.equal(sse._ws, null, 'no WebSocket')
    const wch = ws.channel(name).on('message', (p) => gotWs.push(p))
    await wch.subscribe()
    await wch.publish('message', { from: 'ws' })
    const [m] = await got.wait((p) => p.data.from === 'ws')
    assert.equal(m.type, 'event')
    assert.equal(m.topic, name)
    assert.equal(typeof m.meta.offset, 'number')
    await ch.publish('message', { from: 'sse' }, { persist: true })
    await gotWs.wait((p) => p.data.from === 'sse')
    await got.wait((p) => p.data.from === 'sse')
    assert.deepEqual((await ch.getHistory(5)).map((h) => h.data), [{ from: 'sse' }])
    await ch.unsubscribe()
  })

  it('presence over SSE: track via the stream, seen by a WebSocket client; the SSE client sees others', async (t) => {
    const srv = await startServer(t)
    const sse = client(t, srv, { transport: 'sse' })
    const ws = client(t, srv)
    const name = topic('sse-presence')
    const wsEv = new Log('ws presence')
    const sseEv = new Log('sse presence')
    const wch = ws.channel(name)
    wch.on('presence:join', ({ data }) => wsEv.push(['join', data])).on('presence:leave', ({ data }) => wsEv.push(['leave', data]))
    await wch.subscribe()
    const ch = sse.channel(name)
    ch.on('presence:join', ({ data }) => sseEv.push(['join', data]))
    ch.track({ userId: 'sse-user', name: 'Sam' })
    await ch.subscribe()
    const [[, d]] = await wsEv.wait(([k, d]) => k === 'join' && d.userId === 'sse-user')
    assert.equal(d.name, 'Sam')
    await wch.track({ userId: 'ws-user' })
    await sseEv.wait(([k, d]) => k === 'join' && d.userId === 'ws-user')
    await ch.unsubscribe()
    await wsEv.wait(([k, d]) => k === 'leave' && d.userId === 'sse-user')
  })

  it('server restart under a steady publisher: the stream resumes with Last-Event-ID, zero lost, zero duplicated', async (t) => {
    const srv = await new Server().start()
    t.after(() => srv.stop())
    const name = topic('sse-steady')
    const sse = client(t, srv, { transport: 'sse' })
    const seen = []
    sse.onStatusChange((s) => seen.push(s))
    const received = []
    const gaps = []
    const ch = sse.channel(name).on('tick', ({ data }) => received.push(data.n)).on('gap', (g) => gaps.push(g))
    await ch.subscribe()
    const sdk = createServerClient(srv.url)
    const acked = new Set()
    let stop = false
    let paused = false
    let inFlight = 0
    let n = 0
    const run = (async () => {
      while (!stop) {
        if (paused) {
          await sleep(2)
          continue
        }
        const k = ++n
        inFlight++
        try {
          await sdk.emit('tick', { n: k }, name, { persist: true })
          acked.add(k)
        } catch {}
        inFlight--
        await sleep(4)
      }
    })()
    await until(() => acked.size >= 100, { label: '100 before the restart' })
    paused = true
    await until(() => inFlight === 0, { label: 'publisher idle' })
    await srv.stop()
    await srv.restart()
    paused = false
    const mark = acked.size
    await until(() => seen.filter((s) => s === 'connected').length === 2, { timeoutMs: 20000, label: 'stream back' })
    const beforeBack = acked.size - mark
    await until(() => acked.size >= mark + 100, { label: '100 after the restart' })
    stop = true
    await run
    await until(() => [...acked].every((k) => received.includes(k)), {
      label: 'every acknowledged message',
      describe: () => `missing ${[...acked].filter((k) => !received.includes(k)).slice(0, 20)}; gaps ${JSON.stringify(gaps)}`,
    })
    assert.equal(new Set(received).size, received.length, 'no duplicates')
    assert.deepEqual(gaps, [])
    assert.ok(seen.includes('reconnecting'), JSON.stringify(seen))
    t.diagnostic(`acknowledged ${acked.size}, ${beforeBack} of them after the restart before the stream was back`)
  })

  it("'auto' upgrade to the WebSocket (track) under a steady publisher: nothing lost, nothing twice, the stream closed", async (t) => {
    const srv = await startServer(t)
    const c = client(t, srv) // transport 'auto' by default
    const name = topic('upgrade')
    const received = []
    const watcher = client(t, srv, { transport: 'websocket' })
    const wev = new Log('watcher presence')
    const w = watcher.channel(name).on('presence:join', ({ data }) => wev.push(data))
    await w.subscribe()
    const ch = c.channel(name).on('tick', ({ data }) => received.push(data.n))
    await ch.subscribe()
    assert.equal(c._mode, 'sse')
    assert.equal(c._ws, null)
    const sdk = createServerClient(srv.url)
    const acked = new Set()
    let stop = false
    let n = 0
    const run = (async () => {
      while (!stop) {
        const k = ++n
        await sdk.emit('tick', { n: k }, name)
        acked.add(k)
        await sleep(3)
      }
    })()
    await until(() => received.length >= 50, { label: '50 over SSE' })
    const statuses = []
    c.onStatusChange((s) => statuses.push(s))
    ch.track({ userId: 'upgraded' })
    await wev.wait((d) => d.userId === 'upgraded', { timeoutMs: 10000 })
    assert.equal(c._mode, 'websocket')
    assert.equal(c.upgradedBecause, 'presence')
    await until(() => ch._sse === null, { label: 'stream closed after the join' })
    const mark = acked.size
    await until(() => acked.size >= mark + 50, { label: '50 more after the upgrade' })
    stop = true
    await run
    await until(() => [...acked].every((k) => received.includes(k)), {
      label: 'every message',
      describe: () => `missing ${[...acked].filter((k) => !received.includes(k)).slice(0, 20)}`,
    })
    assert.equal(new Set(received).size, received.length, 'no duplicates')
    assert.deepEqual(received, [...received].sort((a, b) => a - b), 'in order')
    assert.deepEqual(statuses, ['connected'], 'the upgrade is not a reconnect')
  })

  it('setToken over SSE: the stream carries the token (private topic), a new token reopens it without a gap', async (t) => {
    const secret = 'sse-token-secret'
    const srv = await startServer(t, { args: ['--jwt-secret', secret] })
    const exp = nowSecs() + 3600
    const anonKey = jwt(secret, { role: 'anon', exp })
    const user1 = jwt(secret, { role: 'authenticated', sub: 'u1', topics: ['vault-*'], exp })
    const user2 = jwt(secret, { role: 'authenticated', sub: 'u1', topics: ['vault-*', 'x'], exp })
    const service = jwt(secret, { role: 'service_role', exp })
    const c = client(t, srv, { apikey: anonKey, transport: 'sse' })
    c.setToken(user1)
    const name = `vault-${Date.now()}`
    const got = []
    const gaps = []
    const ch = c.channel(name, { private: true }).on('m', ({ data }) => got.push(data.n)).on('gap', (g) => gaps.push(g))
    await ch.subscribe()
    const sdk = createServerClient(srv.url, { serviceKey: service })
    await sdk.emit('m', { n: 1 }, name, { private: true })
    await until(() => got.length === 1, { label: 'first' })
    c.setToken(user2)
    await sdk.emit('m', { n: 2 }, name, { private: true })
    await sdk.emit('m', { n: 3 }, name, { private: true })
    await until(() => got.length === 3, { label: 'after the new token', describe: () => JSON.stringify(got) })
    assert.deepEqual(got, [1, 2, 3])
    assert.deepEqual(gaps, [])
  })

  it('resume impossible over SSE (the window no longer holds the messages): a gap event', async (t) => {
    const srv = await startServer(t, { args: ['--window-messages', '4'] })
    const sse = client(t, srv, { transport: 'sse', reconnect: { baseMs: 500 } })
    const name = topic('sse-gap')
    const got = []
    const gaps = new Log('gaps')
    const ch = sse.channel(name).on('tick', ({ data }) => got.push(data.n)).on('gap', (g) => gaps.push(g))
    await ch.subscribe()
    const sdk = createServerClient(srv.url)
    for (let k = 1; k <= 3; k++) await sdk.emit('tick', { n: k }, name)
    await until(() => got.length === 3, { label: '3 messages' })
    const { epoch, offset } = ch
    ch._sse.drop()
    await until(() => sse.status === 'reconnecting', { label: 'reconnecting' })
    for (let k = 4; k <= 13; k++) await sdk.emit('tick', { n: k }, name)
    const [g] = await gaps.wait(() => true, { timeoutMs: 15000 })
    assert.equal(g.lastEpoch, epoch)
    assert.equal(g.lastOffset, offset)
    assert.match(g.message, /^resume impossible/)
    await until(() => sse.status === 'connected', { label: 'connected' })
    await sdk.emit('tick', { n: 14 }, name)
    await until(() => got.includes(14), { label: 'live after the gap' })
  })
})
