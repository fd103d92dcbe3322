// Cluster mode with the unmodified realtime-js client: three real corecast nodes
// (`--cluster postgres`) sharing one PostgreSQL (DATABASE_URL, slot base CORECAST_SLOT), or
// one NATS server (`--cluster $CORECAST_TEST_CLUSTER`).
// Clients on different nodes exchange broadcasts over WebSocket, REST (`send()` on a channel
// that is not joined) and SSE (the `eventsource` package), all in one order with cluster-wide
// offsets; presence tracked on one node is seen on the others, and a node killed with SIGKILL
// has its members leave everywhere within the lease.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { EventSource } from 'eventsource'
import { Server, Log, makeClient, closeClient, subscribed, collect, topic, sleep } from './helpers.mjs'

const DB = process.env.DATABASE_URL
const SLOT = process.env.CORECAST_SLOT
// `nats://…`: the same against a NATS cluster instead.
const NATS = process.env.CORECAST_TEST_CLUSTER
const IDS = ['js-a', 'js-b', 'js-c']

async function members(node) {
  const res = await fetch(`${node.http}/health`)
  return (await res.json()).members
}

let nodes = []
before(async () => {
  if (NATS) {
    for (const id of IDS) nodes.push(await new Server({ args: ['--cluster', NATS, '--node-id', id] }).start())
  } else {
    if (!DB || !SLOT) throw new Error('DATABASE_URL and CORECAST_SLOT (or CORECAST_TEST_CLUSTER) must be set')
    for (const id of IDS) {
      const args = ['--cluster', 'postgres', '--slot', SLOT, '--node-id', id]
      nodes.push(await new Server({ args, env: { DATABASE_URL: DB } }).start())
    }
  }
  const t0 = Date.now()
  for (const n of nodes) {
    while (JSON.stringify(await members(n)) !== JSON.stringify(IDS)) {
      if (Date.now() - t0 > 20000) throw new Error(`members of ${n.http}: ${JSON.stringify(await members(n))}`)
      await sleep(50)
    }
  }
})
after(async () => {
  for (const n of nodes) await n.stop().catch(() => {})
})

describe('cluster mode with realtime-js', () => {
  it('broadcasts from WebSocket, REST and clients on every node arrive everywhere in one order', async (t) => {
    const name = topic('cl')
    const clients = nodes.map((n) => makeClient(n, { after: (f) => t.after(f) }))
    const channels = clients.map((c) => c.channel(name, { config: { broadcast: { self: true, ack: true } } }))
    const logs = channels.map((ch) => collect(ch, 'n'))
    await Promise.all(channels.map((ch) => subscribed(ch)))
    // SSE on node C.
    const sse = new Log('sse')
    const es = new EventSource(`${nodes[2].http}/realtime/v1/sse?topic=${encodeURIComponent(name)}`)
    t.after(() => es.close())
    es.addEventListener('broadcast', (e) => sse.push(JSON.parse(e.data)))
    await new Promise((resolve, reject) => {
      es.onopen = resolve
      es.onerror = reject
    })
    // REST from a client on node B that never joins: realtime-js falls back to POST /api/broadcast.
    const rest = makeClient(nodes[1], { after: (f) => t.after(f) })
    const per = 15
    const sends = []
    // HTTP requests in flight at once have no order between them: the REST publisher sends one
    // after the other, while the WebSocket clients send all of theirs at once.
    const restSends = (async () => {
      const out = []
      for (let i = 0; i < per; i++) {
        out.push(await rest.channel(name).send({ type: 'broadcast', event: 'n', payload: { from: 'rest', i } }))
      }
      return out
    })()
    for (let i = 0; i < per; i++) {
      channels.forEach((ch, k) => sends.push(ch.send({ type: 'broadcast', event: 'n', payload: { from: IDS[k], i } })))
    }
    assert.deepEqual(new Set([...(await Promise.all(sends)), ...(await restSends)]), new Set(['ok']))
    const total = per * 4
    const got = await Promise.all(logs.map((l) => l.wait(() => true, { count: total, timeoutMs: 15000 })))
    const order = (msgs) => msgs.map((m) => `${m.payload.from}:${m.payload.i}`)
    for (let k = 1; k < got.length; k++) assert.deepEqual(order(got[k]), order(got[0]), `node ${IDS[k]} vs ${IDS[0]}`)
    assert.deepEqual(
      got[0].map((m) => m.meta.offset),
      Array.from({ length: total }, (_, i) => i + 1),
      'cluster-wide offsets, dense'
    )
    for (const from of [...IDS, 'rest']) {
      const mine = got[0].filter((m) => m.payload.from === from).map((m) => m.payload.i)
      assert.deepEqual(mine, Array.from({ length: per }, (_, i) => i), `${from} keeps its order`)
    }
    const viaSse = await sse.wait(() => true, { count: total, timeoutMs: 15000 })
    assert.deepEqual(
      viaSse.map((m) => `${m.payload.from}:${m.payload.i}`),
      order(got[0]),
      'SSE on node C: the same order'
    )
    await sleep(200)
    assert.equal(logs[0].items.length, total, 'no duplicate')
  })

  it('presence is one state across nodes; a SIGKILLed node’s members leave within the lease', async (t) => {
    const name = topic('clp')
    const mk = (k, key) => {
      const c = makeClient(nodes[k], { after: (f) => t.after(f) })
      const ch = c.channel(name, { config: { presence: { key, enabled: true } } })
      ch.pres = new Log(`presence of ${key}`)
      for (const event of ['sync', 'join', 'leave']) {
        ch.on('presence', { event }, (p) => ch.pres.push({ event, p, state: ch.presenceState() }))
      }
      return { c, ch }
    }
    const a = mk(0, 'alice')
    const b = mk(1, 'bob')
    const c = mk(2, 'carol')
    await Promise.all([a, b, c].map((x) => subscribed(x.ch)))
    assert.equal(await a.ch.track({ status: 'online' }), 'ok')
    assert.equal(await c.ch.track({ status: 'away' }), 'ok')
    const keys = (x) => Object.keys(x.ch.presenceState()).sort()
    const waitKeys = async (x, want, ms) => {
      const t0 = Date.now()
      while (JSON.stringify(keys(x)) !== JSON.stringify(want)) {
        if (Date.now() - t0 > ms) throw new Error(`presence seen by ${x.ch.params?.config?.presence?.key}: ${keys(x)}`)
        await sleep(20)
      }
      return Date.now() - t0
    }
    await waitKeys(b, ['alice', 'carol'], 5000)
    await waitKeys(a, ['alice', 'carol'], 5000)
    assert.equal(b.ch.presenceState().alice[0].status, 'online')
    // Kill node A (SIGKILL, no goodbye): alice leaves on B and C within the 6 s lease (+1 s
    // heartbeat).
    nodes[0].proc.kill('SIGKILL')
    await nodes[0].exited
    closeClient(a.c)
    const took = await waitKeys(b, ['carol'], 10000)
    await waitKeys(c, ['carol'], 2000)
    assert.ok(took < 10000, `alice left after ${took} ms`)
    const leave = b.ch.pres.items.find((e) => e.event === 'leave' && e.p.key === 'alice')
    assert.ok(leave, 'a leave event for alice')
    // Node A comes back (same id, same port): no ghost of alice; its new members count.
    await nodes[0].restart()
    const t0 = Date.now()
    while (JSON.stringify(await members(nodes[1])) !== JSON.stringify(IDS)) {
      if (Date.now() - t0 > 20000) throw new Error('node A did not rejoin')
      await sleep(50)
    }
    const d = mk(0, 'dave')
    await subscribed(d.ch)
    assert.equal(await d.ch.track({}), 'ok')
    await waitKeys(b, ['carol', 'dave'], 5000)
    await waitKeys(d, ['carol', 'dave'], 5000)
  })
})
