// Reconnect and gapless resume against the real server: restarts on the same port and
// --data-dir under a steady publisher (zero lost, zero duplicated), status sequence, and the
// `gap` event when resuming is impossible.

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { createServerClient } from '../src/index.js'
import { Log, Server, client, sleep, topic, until } from './helpers.mjs'

/** Counts what a subscriber got against what publishers had acknowledged. */
function checkExactlyOnce(received, acked, sent) {
  const seen = new Map()
  const dups = []
  for (const n of received) {
    if (seen.has(n)) dups.push(n)
    seen.set(n, true)
  }
  const lost = [...acked].filter((n) => !seen.has(n))
  const unknown = received.filter((n) => !sent.has(n))
  assert.deepEqual(dups, [], `duplicated: ${dups.length}`)
  assert.deepEqual(lost, [], `lost: ${lost.length} of ${acked.size} acknowledged`)
  assert.deepEqual(unknown, [], 'received messages nobody sent')
}

/**
 * Two steady publishers (the server SDK over REST, and a client channel: socket when joined,
 * REST while not) and two subscribers on one topic; the server is restarted on the same port
 * and data dir. `quietShutdown`: the publishers pause for the SIGTERM itself (they carry on
 * the moment the server is back, before the subscribers have rejoined, so resuming is still
 * what saves those messages). Returns the counts and checks every subscriber got every
 * acknowledged message exactly once.
 */
async function steadyRestart(t, { quietShutdown }) {
  const srv = await new Server().start()
  t.after(() => srv.stop())
  const name = topic('steady')
  // One subscriber on the WebSocket, one on 'auto' (listen-only: an event stream).
  const subs = [client(t, srv, { transport: 'websocket' }), client(t, srv, { transport: 'auto' })]
  const received = subs.map(() => [])
  const gaps = []
  for (const [i, c] of subs.entries()) {
    const ch = c.channel(name)
    ch.on('tick', ({ data }) => received[i].push(data.n)).on('gap', (g) => gaps.push(g))
    await ch.subscribe()
  }
  const sdk = createServerClient(srv.url)
  // The publishing client is 'auto': it starts listening on an event stream and publishing over
  // REST, and its publish rate upgrades it to the WebSocket while the test runs.
  const pubClient = client(t, srv, { transport: 'auto' })
  const pubCh = pubClient.channel(name, { self: false })
  await pubCh.subscribe()
  const sent = new Set()
  const acked = new Set()
  let failed = 0
  let stop = false
  let paused = false
  let inFlight = 0
  let next = 0
  // Each number is published once; failures (server down) are not retried.
  const publisher = async (publish) => {
    while (!stop) {
      if (paused) {
        await sleep(2)
        continue
      }
      const n = ++next
      sent.add(n)
      inFlight++
      try {
        await publish(n)
        acked.add(n)
      } catch {
        failed++
      } finally {
        inFlight--
      }
      await sleep(4)
    }
  }
  const runs = [
    publisher((n) => sdk.emit('tick', { n }, name, { persist: true })),
    publisher((n) => pubCh.publish('tick', { n }, { persist: true })),
  ]
  await until(() => acked.size >= 100, { label: '100 acknowledged before the restart' })
  const beforeRestart = acked.size
  if (quietShutdown) {
    paused = true
    await until(() => inFlight === 0, { label: 'publishers idle' })
  }
  const { code } = await srv.stop()
  assert.equal(code, 0)
  await sleep(300)
  await srv.restart()
  paused = false
  const mark = acked.size
  for (const c of subs) await until(() => c.channel(name).state === 'joined', { timeoutMs: 20000, label: 'rejoined' })
  await until(() => pubCh.state === 'joined', { timeoutMs: 20000, label: 'publisher rejoined' })
  const beforeRejoin = acked.size - mark
  await until(() => acked.size >= mark + 100, { label: '100 more acknowledged after the restart' })
  stop = true
  await Promise.all(runs)
  for (const r of received) {
    await until(() => [...acked].every((n) => r.includes(n)), {
      timeoutMs: 10000,
      label: 'every acknowledged message',
      describe: () =>
        `missing ${[...acked].filter((n) => !r.includes(n)).slice(0, 20)}; gaps ${JSON.stringify(gaps)}; ` +
        `positions ${JSON.stringify(subs.map((c) => [c.channel(name).epoch, c.channel(name).offset]))}`,
    })
  }
  await sleep(200)
  for (const r of received) checkExactlyOnce(r, acked, sent)
  assert.equal(pubClient._mode, 'websocket', 'the publisher upgraded')
  assert.equal(subs[1]._mode, 'sse', 'the listen-only auto subscriber stayed on SSE')
  assert.deepEqual(gaps, [], 'no gap within the window')
  assert.ok(beforeRestart >= 100 && acked.size > beforeRestart + 100, `acked ${acked.size}, failed ${failed}`)
  t.diagnostic(
    `sent ${sent.size}, acknowledged ${acked.size} (${beforeRejoin} after the restart before every ` +
      `subscriber had rejoined), failed while down ${failed}`
  )
}

describe('reconnect and resume', { concurrency: true }, () => {
  it('status sequence: idle → connecting → connected, then on a server restart reconnecting → connected; subscriptions restored', async (t) => {
    const srv = await new Server().start()
    t.after(() => srv.stop())
    const c = client(t, srv)
    const seen = []
    c.onStatusChange((s) => seen.push(s))
    const name = topic('status')
    const got = new Log('after restart')
    const ch = c.channel(name).on('ping', (p) => got.push(p))
    await ch.subscribe()
    assert.deepEqual(seen, ['idle', 'connecting', 'connected'])
    await srv.stop()
    await until(() => seen.includes('reconnecting'), { label: 'reconnecting' })
    await srv.restart()
    await until(() => seen.filter((s) => s === 'connected').length === 2, { timeoutMs: 15000, label: 'connected again' })
    assert.deepEqual(seen, ['idle', 'connecting', 'connected', 'reconnecting', 'connected'])
    await until(() => ch.state === 'joined', { label: 'rejoined' })
    await createServerClient(srv.url).emit('ping', { n: 1 }, name)
    await got.wait()
  })

  it('server restart under a steady publisher: persisted messages arrive exactly once (zero lost, zero duplicated)', async (t) => {
    await steadyRestart(t, { quietShutdown: true })
  })

  it('the same, publishing straight through the SIGTERM (a publish racing the shutdown keeps the epoch)', async (t) => {
    await steadyRestart(t, { quietShutdown: false })
  })

  it('resume impossible (the messages after the last offset left the window): a gap event, then live again', async (t) => {
    const srv = await new Server({ args: ['--window-messages', '4'] }).start()
    t.after(() => srv.stop())
    const name = topic('gap')
    const c = client(t, srv, { reconnect: { baseMs: 500 }, transport: 'websocket' })
    const got = []
    const gaps = new Log('gaps')
    const ch = c.channel(name).on('tick', ({ data }) => got.push(data.n)).on('gap', (g) => gaps.push(g))
    await ch.subscribe()
    const sdk = createServerClient(srv.url)
    for (let n = 1; n <= 3; n++) await sdk.emit('tick', { n }, name)
    await until(() => got.length === 3, { label: '3 messages' })
    const { epoch, offset } = ch
    assert.equal(typeof epoch, 'string')
    // Cut this client's socket; while it is away, 10 messages (not persisted) overflow the
    // 4-message window.
    const reconnected = until(() => c.status === 'reconnecting', { label: 'reconnecting' })
    c._ws.close()
    await reconnected
    for (let n = 4; n <= 13; n++) await sdk.emit('tick', { n }, name)
    const [g] = await gaps.wait(() => true, { timeoutMs: 15000 })
    assert.equal(g.type, 'gap')
    assert.equal(g.topic, name)
    assert.equal(g.lastEpoch, epoch)
    assert.equal(g.lastOffset, offset)
    assert.equal(typeof g.oldestOffset, 'number')
    assert.ok(g.oldestOffset > offset + 1, JSON.stringify(g))
    assert.match(g.message, /^resume impossible/)
    await until(() => ch.state === 'joined', { label: 'rejoined' })
    await sdk.emit('tick', { n: 14 }, name)
    await until(() => got.includes(14), { label: 'live after the gap' })
    assert.equal(new Set(got).size, got.length, 'no duplicates')
  })

  it('resume impossible after a crash (SIGKILL: a new epoch): a gap event with the old position', async (t) => {
    const srv = await new Server().start()
    t.after(() => srv.stop())
    const name = topic('crash')
    const c = client(t, srv)
    const gaps = new Log('gaps')
    const got = []
    const ch = c.channel(name).on('tick', ({ data }) => got.push(data.n)).on('gap', (g) => gaps.push(g))
    await ch.subscribe()
    const sdk = createServerClient(srv.url)
    for (let n = 1; n <= 3; n++) await sdk.emit('tick', { n }, name, { persist: true })
    await until(() => got.length === 3, { label: '3 messages' })
    const { epoch, offset } = ch
    await srv.stop('SIGKILL')
    await srv.restart()
    await until(() => ch.state === 'joined', { timeoutMs: 15000, label: 'rejoined' })
    await sdk.emit('tick', { n: 4 }, name, { persist: true })
    await until(() => got.includes(4), { label: 'live after the crash' })
    const [g] = await gaps.wait(() => true, { timeoutMs: 5000 })
    assert.equal(g.lastEpoch, epoch)
    assert.equal(g.lastOffset, offset)
    assert.notEqual(g.epoch, epoch)
    assert.deepEqual(got, [1, 2, 3, 4])
  })
})
