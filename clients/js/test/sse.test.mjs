// Transport 'sse' against the real server: push over ONE event stream per client for all its
// channels (GET /realtime/v1/sse?topic=a&topic=b, Last-Event-ID resume of every topic, the
// stream reopened when channels come and go), publishing over REST, presence through the
// stream's `track` parameter.

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { createServerClient } from '../src/index.js'
import { Log, Server, client, jwt, nowSecs, sleep, startServer, topic, until } from './helpers.mjs'

/** A fetch that counts the event-stream requests it made. */
function countingFetch() {
  const f = (url, init) => {
    if (String(url).includes('/sse?')) f.streams.push(String(url))
    return fetch(url, init)
  }
  f.streams = []
  return f
}

/** The server's `corecast_sse_streams` gauge, summed over the shards. */
async function sseStreams(srv) {
  const text = await (await fetch(`${srv.url}/metrics`)).text()
  let n = 0
  for (const m of text.matchAll(/^corecast_sse_streams(?:\{[^}]*\})? (\d+)/gm)) n += Number(m[1])
  return n
}

/** Publishes `{ n }` as `event` to `topics` in turn, one after another, until stopped;
 *  `acked` has what the server acknowledged (a failed publish is not retried). */
function steadyPublisher(sdk, topics, event = 'tick') {
  const acked = new Map(topics.map((t) => [t, []]))
  let stop = false
  let n = 0
  const state = { paused: false, inFlight: 0 }
  const run = (async () => {
    while (!stop) {
      if (state.paused) {
        await sleep(2)
        continue
      }
      for (const name of topics) {
        const k = ++n
        state.inFlight++
        try {
          await sdk.emit(event, { n: k }, name, { persist: true })
          acked.get(name).push(k)
        } catch {}
        state.inFlight--
      }
      await sleep(3)
    }
  })()
  return {
    acked,
    state,
    count: () => [...acked.values()].reduce((a, l) => a + l.length, 0),
    async stop() {
      stop = true
      await run
    },
  }
}

function assertExactly(label, received, expected) {
  const seen = new Set(received)
  assert.equal(seen.size, received.length, `${label}: duplicates`)
  const lost = expected.filter((k) => !seen.has(k))
  assert.deepEqual(lost, [], `${label}: lost ${lost.length} of ${expected.length}`)
  assert.deepEqual(received, [...received].sort((a, b) => a - b), `${label}: in order`)
}

describe("transport 'sse'", { concurrency: true }, () => {
  it('channels share one event stream (one per privacy): one request, one stream on the server', async (t) => {
    const srv = await startServer(t)
    const f = countingFetch()
    const c = client(t, srv, { transport: 'sse', fetch: f })
    const names = [topic('share'), topic('share'), topic('share')]
    const got = new Log('shared')
    const chans = names.map((n) => c.channel(n).on('m', ({ topic: tp, data }) => got.push([tp, data.n])))
    // Subscribed in one tick: one stream for all of them.
    await Promise.all(chans.map((ch) => ch.subscribe()))
    assert.equal(f.streams.length, 1, f.streams.join('\n'))
    assert.deepEqual(new URL(f.streams[0]).searchParams.getAll('topic'), names)
    assert.equal(await sseStreams(srv), 1)
    assert.ok(chans.every((ch) => ch._sse === chans[0]._sse))
    const sdk = createServerClient(srv.url)
    for (const [i, n] of names.entries()) await sdk.emit('m', { n: i }, n)
    await got.wait(() => true, { count: 3 })
    assert.deepEqual(got.items, names.map((n, i) => [n, i]))
    // A private channel needs its own stream (`private=true` applies to the whole stream).
    const priv = c.channel(topic('share-private'), { private: true })
    await priv.subscribe()
    assert.equal(f.streams.length, 2)
    assert.equal(await until(async () => (await sseStreams(srv)) === 2 || null, { label: '2 streams' }).then(() => sseStreams(srv)), 2)
    // Leaving: the shared stream reopens with the remaining topics; the last one closes it.
    await chans[0].unsubscribe()
    await until(() => f.streams.length === 3, { label: 'reopened without the first topic' })
    assert.deepEqual(new URL(f.streams[2]).searchParams.getAll('topic'), names.slice(1))
    await chans[1].unsubscribe()
    await chans[2].unsubscribe()
    await priv.unsubscribe()
    await until(async () => (await sseStreams(srv)) === 0, { label: 'no stream left' })
    assert.equal(c.status, 'connected')
  })

  it('adding a third channel, then leaving one, while a publisher runs on the first two: nothing lost, nothing twice', async (t) => {
    const srv = await startServer(t)
    const f = countingFetch()
    const c = client(t, srv, { transport: 'sse', fetch: f })
    const statuses = []
    const names = [topic('add'), topic('add'), topic('add')]
    const received = new Map(names.map((n) => [n, []]))
    const gaps = []
    const sub = (n) =>
      c
        .channel(n)
        .on('tick', ({ data }) => received.get(n).push(data.n))
        .on('gap', (g) => gaps.push(g))
        .subscribe()
    await Promise.all([sub(names[0]), sub(names[1])])
    c.onStatusChange((s) => statuses.push(s))
    const sdk = createServerClient(srv.url)
    const pub = steadyPublisher(sdk, names.slice(0, 2))
    await until(() => received.get(names[0]).length >= 40, { label: '40 on the first topic' })
    await sub(names[2])
    const token = f.streams.length === 2 && c.channel(names[2])._sse
    assert.ok(token, `reopened once: ${f.streams.length} requests`)
    assert.deepEqual(new URL(f.streams[1]).searchParams.getAll('topic'), names)
    const third = steadyPublisher(sdk, [names[2]], 'tick')
    const mark = pub.count()
    await until(() => pub.count() >= mark + 60, { label: '60 more on the first two' })
    await c.channel(names[1]).unsubscribe()
    const leftAt = pub.acked.get(names[1]).length
    const mark2 = pub.count()
    await until(() => pub.count() >= mark2 + 60, { label: '60 more after leaving' })
    await pub.stop()
    await third.stop()
    const expect0 = pub.acked.get(names[0])
    const expect2 = third.acked.get(names[2])
    await until(() => expect0.every((k) => received.get(names[0]).includes(k)) && expect2.every((k) => received.get(names[2]).includes(k)), {
      label: 'every message',
      describe: () => `missing ${expect0.filter((k) => !received.get(names[0]).includes(k)).slice(0, 20)}`,
    })
    await sleep(200)
    assertExactly('first', received.get(names[0]), expect0)
    assertExactly('second (until it left)', received.get(names[1]), pub.acked.get(names[1]).slice(0, leftAt))
    assertExactly('third', received.get(names[2]), expect2)
    assert.deepEqual(gaps, [])
    assert.equal(f.streams.length, 3, f.streams.join('\n'))
    assert.equal(await sseStreams(srv), 1)
    assert.deepEqual(statuses, ['connected'], 'a reopen for new topics is not a reconnect')
    t.diagnostic(`${pub.count() + third.count()} published; requests: ${f.streams.length}`)
  })

  it('channels added one after another while their publisher already runs: each gets everything after its subscribe', async (t) => {
    // The first channel has no position when the second arrives (nothing reached it yet):
    // it goes on the new stream as `*`, and the old stream bridges it until the new one is open.
    const srv = await startServer(t)
    const c = client(t, srv, { transport: 'sse' })
    const sdk = createServerClient(srv.url)
    const names = [topic('chain'), topic('chain'), topic('chain'), topic('chain')]
    const received = new Map(names.map((n) => [n, []]))
    const gaps = []
    const pubs = []
    for (const n of names) {
      await c
        .channel(n)
        .on('tick', ({ data }) => received.get(n).push(data.n))
        .on('gap', (g) => gaps.push(g))
        .subscribe()
      pubs.push(steadyPublisher(sdk, [n]))
    }
    await until(() => pubs.every((p) => p.count() >= 30), { label: '30 on every topic' })
    for (const p of pubs) await p.stop()
    for (const [i, n] of names.entries()) {
      const expected = pubs[i].acked.get(n)
      await until(() => expected.every((k) => received.get(n).includes(k)), {
        label: `every message on ${n}`,
        describe: () => `missing ${expected.filter((k) => !received.get(n).includes(k)).slice(0, 20)}`,
      })
    }
    await sleep(200)
    for (const [i, n] of names.entries()) assertExactly(n, received.get(n), pubs[i].acked.get(n))
    assert.deepEqual(gaps, [])
    assert.equal(await sseStreams(srv), 1)
  })

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
    // A second channel on the same stream, with its own publisher.
    const name2 = topic('sse-steady')
    const received2 = []
    const ch2 = sse.channel(name2).on('tick', ({ data }) => received2.push(data.n)).on('gap', (g) => gaps.push(g))
    await Promise.all([ch.subscribe(), ch2.subscribe()])
    assert.equal(ch._sse, ch2._sse, 'one stream')
    const sdk = createServerClient(srv.url)
    const pub2 = steadyPublisher(sdk, [name2])
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
    pub2.state.paused = true
    await until(() => inFlight === 0 && pub2.state.inFlight === 0, { label: 'publishers idle' })
    await srv.stop()
    await srv.restart()
    paused = false
    pub2.state.paused = false
    const mark = acked.size
    await until(() => seen.filter((s) => s === 'connected').length === 2, { timeoutMs: 20000, label: 'stream back' })
    const beforeBack = acked.size - mark
    await until(() => acked.size >= mark + 100, { label: '100 after the restart' })
    stop = true
    await run
    await pub2.stop()
    await until(() => [...acked].every((k) => received.includes(k)), {
      label: 'every acknowledged message',
      describe: () => `missing ${[...acked].filter((k) => !received.includes(k)).slice(0, 20)}; gaps ${JSON.stringify(gaps)}`,
    })
    assert.equal(new Set(received).size, received.length, 'no duplicates')
    await until(() => pub2.acked.get(name2).every((k) => received2.includes(k)), { label: 'second channel: every message' })
    assertExactly('second channel', received2, pub2.acked.get(name2))
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
    // A quiet channel on the same stream: its topic resumes fine, it gets no gap.
    const quiet = topic('sse-gap-quiet')
    const gotQuiet = []
    const qch = sse.channel(quiet).on('tick', ({ data }) => gotQuiet.push(data.n)).on('gap', (g) => gaps.push(g))
    await Promise.all([ch.subscribe(), qch.subscribe()])
    assert.equal(ch._sse, qch._sse, 'one stream')
    const sdk = createServerClient(srv.url)
    await sdk.emit('tick', { n: 100 }, quiet)
    for (let k = 1; k <= 3; k++) await sdk.emit('tick', { n: k }, name)
    await until(() => got.length === 3 && gotQuiet.length === 1, { label: '3 + 1 messages' })
    const { epoch, offset } = ch
    ch._sse.drop()
    await until(() => sse.status === 'reconnecting', { label: 'reconnecting' })
    for (let k = 4; k <= 13; k++) await sdk.emit('tick', { n: k }, name)
    await sdk.emit('tick', { n: 101 }, quiet)
    const [g] = await gaps.wait(() => true, { timeoutMs: 15000 })
    assert.equal(g.topic, name)
    assert.equal(g.lastEpoch, epoch)
    assert.equal(g.lastOffset, offset)
    assert.match(g.message, /^resume impossible/)
    await until(() => sse.status === 'connected', { label: 'connected' })
    await sdk.emit('tick', { n: 14 }, name)
    await until(() => got.includes(14), { label: 'live after the gap' })
    await until(() => gotQuiet.length === 2, { label: 'the quiet channel resumed' })
    assert.deepEqual(gotQuiet, [100, 101])
    assert.equal(gaps.items.length, 1, JSON.stringify(gaps.items))
  })
})
