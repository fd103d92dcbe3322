// Broadcast over the socket between separate realtime-js clients (pinned to different shards
// where it matters): JSON and binary payloads, vsn 1 vs 2, self, ack, ordering, meta.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  Server,
  makeClient,
  clientOnShard,
  subscribed,
  collect,
  topic,
  framesOf,
  frameEvent,
  arrayBuffer,
  bytes,
  sleep,
} from './helpers.mjs'

let srv
before(async () => {
  srv = await new Server().start()
})
after(() => srv.stop())

/** Checks `meta` the server attaches to every delivered broadcast. */
function assertMeta(m) {
  assert.ok(m.meta, `meta present: ${JSON.stringify(m)}`)
  assert.equal(typeof m.meta.id, 'string')
  assert.ok(m.meta.id.length > 0)
  assert.equal(typeof m.meta.offset, 'number')
  assert.equal(typeof m.meta.epoch, 'string')
}

/**
 * Waits until `sentinel` has `n` messages, then a short grace, and asserts `log` got nothing
 * matching `pred` (used for "must not arrive" checks without a bare sleep).
 */
async function assertNone(log, pred, sentinel, n = 1) {
  await sentinel.wait(() => true, { count: n, timeoutMs: 5000 })
  await sleep(250)
  assert.deepEqual(log.filter(pred), [])
}

describe('broadcast', { concurrency: true }, () => {
  it('JSON payloads across shards reach every subscriber, with meta', async (t) => {
    const after = t.after.bind(t)
    const name = topic('json')
    const sender = await clientOnShard(srv, 0, { after })
    const r0 = await clientOnShard(srv, 0, { after })
    const r1 = await clientOnShard(srv, 1, { after })
    const chS = sender.channel(name)
    const ch0 = r0.channel(name)
    const ch1 = r1.channel(name)
    const got0 = collect(ch0)
    const got1 = collect(ch1)
    const onlyA = collect(ch1, 'a')
    await Promise.all([subscribed(chS), subscribed(ch0), subscribed(ch1)])

    const big = { blob: 'x'.repeat(200 * 1024), n: 1 }
    const payloads = [
      { a: 1, nested: { list: [1, 2, { z: true }], s: 'héllo wörld ✓ 😀' } },
      [1, 'two', 3.5],
      'just a string',
      42,
      {},
      big,
    ]
    for (const [i, p] of payloads.entries()) {
      assert.equal(await chS.send({ type: 'broadcast', event: i === 0 ? 'a' : `e${i}`, payload: p }), 'ok')
    }
    for (const got of [got0, got1]) {
      const msgs = await got.wait(() => true, { count: payloads.length, timeoutMs: 10000 })
      msgs.forEach((m, i) => {
        assert.equal(m.type, 'broadcast')
        assert.equal(m.event, i === 0 ? 'a' : `e${i}`)
        assert.deepEqual(m.payload, payloads[i])
        assertMeta(m)
      })
    }
    assert.equal(onlyA.items.length, 1, 'event-filtered binding gets only its event')
    // vsn 2: the client pushed kind-3 frames (JSON encoding) and received kind-4 frames.
    const out = framesOf(sender.tap, 'out', chS.topic).filter((f) => f.kind === 3)
    assert.equal(out.length, payloads.length)
    assert.ok(out.every((f) => f.encoding === 1))
    const inFrames = framesOf(r1.tap, 'in', ch1.topic).filter((f) => frameEvent(f) === 'broadcast')
    assert.equal(inFrames.length, payloads.length)
  })

  it('binary ArrayBuffer payloads with vsn 2; a vsn 1 subscriber gets the JSON ones only', async (t) => {
    const after = t.after.bind(t)
    const name = topic('bin')
    const sender = await clientOnShard(srv, 1, { after })
    const r0 = await clientOnShard(srv, 0, { after })
    const v1 = makeClient(srv, { vsn: '1.0.0', after })
    const chS = sender.channel(name, { config: { broadcast: { self: true } } })
    const selfGot = collect(chS, 'bin')
    const ch0 = r0.channel(name)
    const chV1 = v1.channel(name)
    const got0 = collect(ch0)
    const gotV1 = collect(chV1)
    await Promise.all([subscribed(chS), subscribed(ch0), subscribed(chV1)])

    const blobs = [[0, 1, 2, 255, 128, 10, 13], [], Array.from({ length: 100 * 1024 }, (_, i) => i % 251)]
    for (const b of blobs) {
      assert.equal(await chS.send({ type: 'broadcast', event: 'bin', payload: arrayBuffer(b) }), 'ok')
    }
    await chS.send({ type: 'broadcast', event: 'marker', payload: { after: 'binary' } })

    const msgs = await got0.wait(() => true, { count: blobs.length + 1, timeoutMs: 10000 })
    blobs.forEach((b, i) => {
      assert.equal(msgs[i].event, 'bin')
      assert.ok(msgs[i].payload instanceof ArrayBuffer, `payload ${i} is an ArrayBuffer`)
      assert.deepEqual(bytes(msgs[i].payload), b)
      assertMeta(msgs[i])
    })
    assert.deepEqual(msgs[blobs.length].payload, { after: 'binary' })
    // Wire: kind 3 with encoding 0 out, kind 4 with encoding 0 in.
    const out = framesOf(sender.tap, 'out', chS.topic).filter((f) => f.kind === 3 && f.event === 'bin')
    assert.deepEqual(out.map((f) => f.encoding), [0, 0, 0])
    const inBin = framesOf(r0.tap, 'in', ch0.topic).filter((f) => f.kind === 4 && f.event === 'bin')
    assert.deepEqual(inBin.map((f) => f.encoding), [0, 0, 0])
    // self:true echoes binary too.
    const echoed = await selfGot.wait(() => true, { count: blobs.length, timeoutMs: 5000 })
    assert.deepEqual(bytes(echoed[0].payload), blobs[0])

    // The vsn 1 client gets the JSON marker, never the binary messages (JSON cannot carry them).
    const [marker] = await gotV1.wait((m) => m.event === 'marker', { timeoutMs: 5000 })
    assert.deepEqual(marker.payload, { after: 'binary' })
    assertMeta(marker)
    await sleep(200)
    assert.deepEqual(gotV1.filter((m) => m.event === 'bin'), [])
    assert.ok(v1.tap.frames.items.every((f) => !f.binary), 'no binary frame to a vsn 1 socket')
    assert.ok(!framesOf(v1.tap, 'in').some((f) => f.event === 'broadcast' && f.payload?.event === 'bin'))
  })

  it('self:false (default) does not echo; self:true does', async (t) => {
    const after = t.after.bind(t)
    const name = topic('self')
    const a = makeClient(srv, { after })
    const b = makeClient(srv, { after })
    const c = makeClient(srv, { after })
    const noSelf = a.channel(name)
    const withSelf = b.channel(name, { config: { broadcast: { self: true } } })
    const watcher = c.channel(name)
    const gotNoSelf = collect(noSelf)
    const gotSelf = collect(withSelf)
    const gotWatcher = collect(watcher)
    await Promise.all([subscribed(noSelf), subscribed(withSelf), subscribed(watcher)])

    await noSelf.send({ type: 'broadcast', event: 'from-a', payload: { n: 1 } })
    await assertNone(gotNoSelf, (m) => m.event === 'from-a', gotWatcher, 1)
    assert.equal(gotSelf.filter((m) => m.event === 'from-a').length, 1)

    await withSelf.send({ type: 'broadcast', event: 'from-b', payload: { n: 2 } })
    const [echo] = await gotSelf.wait((m) => m.event === 'from-b', { timeoutMs: 5000 })
    assert.deepEqual(echo.payload, { n: 2 })
    assertMeta(echo)
    await gotNoSelf.wait((m) => m.event === 'from-b', { timeoutMs: 5000 })
    assert.equal(gotSelf.filter((m) => m.event === 'from-b').length, 1, 'echoed exactly once')
  })

  it('ack:true → send() resolves ok on the server reply (JSON and binary); ack:false sends no reply', async (t) => {
    const after = t.after.bind(t)
    const name = topic('ack')
    const a = makeClient(srv, { after })
    const b = makeClient(srv, { after })
    const acked = a.channel(name, { config: { broadcast: { ack: true } } })
    const rx = b.channel(name, { config: { broadcast: { ack: false } } })
    const gotA = collect(acked)
    const gotB = collect(rx)
    await Promise.all([subscribed(acked), subscribed(rx)])

    assert.equal(await acked.send({ type: 'broadcast', event: 'j', payload: { x: 1 } }), 'ok')
    assert.equal(await acked.send({ type: 'broadcast', event: 'b', payload: arrayBuffer([9, 8]) }), 'ok')
    const pushes = framesOf(a.tap, 'out', acked.topic).filter((f) => f.kind === 3)
    const replies = framesOf(a.tap, 'in', acked.topic).filter((f) => f[3] === 'phx_reply')
    for (const p of pushes) {
      const r = replies.find((f) => f[1] === p.ref)
      assert.deepEqual(r, [p.join_ref, p.ref, acked.topic, 'phx_reply', { status: 'ok', response: {} }])
    }
    await gotB.wait(() => true, { count: 2, timeoutMs: 5000 })

    // Without ack the client resolves immediately and the server must not reply.
    assert.equal(await rx.send({ type: 'broadcast', event: 'n', payload: { y: 2 } }), 'ok')
    await gotA.wait((m) => m.event === 'n', { timeoutMs: 5000 })
    await sleep(200)
    const push = framesOf(b.tap, 'out', rx.topic).find((f) => f.kind === 3 && f.event === 'n')
    assert.ok(push)
    assert.ok(!framesOf(b.tap, 'in', rx.topic).some((f) => f[3] === 'phx_reply' && f[1] === push.ref))
  })

  it('ordering: 500 messages from one sender arrive in order with increasing offsets', async (t) => {
    const after = t.after.bind(t)
    const name = topic('order')
    const sender = await clientOnShard(srv, 0, { after })
    const rx = await clientOnShard(srv, 1, { after })
    const rx2 = await clientOnShard(srv, 0, { after })
    const chS = sender.channel(name)
    const chR = rx.channel(name)
    const chR2 = rx2.channel(name)
    const got = collect(chR, 'seq')
    const got2 = collect(chR2, 'seq')
    await Promise.all([subscribed(chS), subscribed(chR), subscribed(chR2)])
    const N = 500
    for (let i = 0; i < N; i++) {
      chS.send({ type: 'broadcast', event: 'seq', payload: { i } })
    }
    for (const log of [got, got2]) {
      const msgs = await log.wait(() => true, { count: N, timeoutMs: 20000 })
      assert.deepEqual(
        msgs.map((m) => m.payload.i),
        Array.from({ length: N }, (_, i) => i)
      )
      const epochs = new Set(msgs.map((m) => m.meta.epoch))
      assert.equal(epochs.size, 1, 'one epoch')
      for (let i = 1; i < N; i++) {
        assert.ok(msgs[i].meta.offset > msgs[i - 1].meta.offset, `offset increases at ${i}`)
      }
      assert.equal(new Set(msgs.map((m) => m.meta.id)).size, N, 'distinct ids')
    }
    // Both receivers see the same offsets and ids for the same messages.
    assert.deepEqual(
      got.items.map((m) => [m.meta.offset, m.meta.id]),
      got2.items.map((m) => [m.meta.offset, m.meta.id])
    )
  })

  it('two senders interleaved: per-sender order is kept', async (t) => {
    const after = t.after.bind(t)
    const name = topic('order2')
    const s1 = await clientOnShard(srv, 0, { after })
    const s2 = await clientOnShard(srv, 1, { after })
    const rx = makeClient(srv, { after })
    const c1 = s1.channel(name)
    const c2 = s2.channel(name)
    const cr = rx.channel(name)
    const got = collect(cr)
    await Promise.all([subscribed(c1), subscribed(c2), subscribed(cr)])
    const N = 200
    for (let i = 0; i < N; i++) {
      c1.send({ type: 'broadcast', event: 's1', payload: { i } })
      c2.send({ type: 'broadcast', event: 's2', payload: { i } })
    }
    const msgs = await got.wait(() => true, { count: 2 * N, timeoutMs: 20000 })
    for (const ev of ['s1', 's2']) {
      assert.deepEqual(
        msgs.filter((m) => m.event === ev).map((m) => m.payload.i),
        Array.from({ length: N }, (_, i) => i)
      )
    }
  })

  it('vsn 1 sender → vsn 2 receiver (text frames), with self and ack on vsn 1', async (t) => {
    const after = t.after.bind(t)
    const name = topic('v1send')
    const v1 = makeClient(srv, { vsn: '1.0.0', after })
    const v2 = makeClient(srv, { after })
    const ch1 = v1.channel(name, { config: { broadcast: { self: true, ack: true } } })
    const ch2 = v2.channel(name)
    const got1 = collect(ch1)
    const got2 = collect(ch2)
    await Promise.all([subscribed(ch1), subscribed(ch2)])
    assert.equal(await ch1.send({ type: 'broadcast', event: 'hi', payload: { from: 'v1' } }), 'ok')
    const [m2] = await got2.wait(() => true, { timeoutMs: 5000 })
    assert.deepEqual(m2.payload, { from: 'v1' })
    assertMeta(m2)
    const [m1] = await got1.wait(() => true, { timeoutMs: 5000 })
    assert.deepEqual(m1.payload, { from: 'v1' })
    assertMeta(m1)
    // A vsn 1 push is JSON, so the vsn 2 receiver gets a JSON text frame, not kind 4.
    const f = framesOf(v2.tap, 'in', ch2.topic).find((x) => frameEvent(x) === 'broadcast')
    assert.ok(Array.isArray(f), `text frame: ${JSON.stringify(f)}`)
    assert.deepEqual([f[0], f[1], f[3]], [null, null, 'broadcast'])
  })

  it('unicode topic and event names survive the binary headers (kind 3 in, kind 4 out)', async (t) => {
    const after = t.after.bind(t)
    const name = `${topic('räum')}-😀:chat/1`
    const a = makeClient(srv, { after })
    const b = makeClient(srv, { after })
    const v1 = makeClient(srv, { vsn: '1.0.0', after })
    const chA = a.channel(name, { config: { broadcast: { ack: true } } })
    const chB = b.channel(name)
    const chV1 = v1.channel(name)
    const got = collect(chB, 'évent ✓')
    const gotV1 = collect(chV1, 'évent ✓')
    await Promise.all([subscribed(chA), subscribed(chB), subscribed(chV1)])
    assert.equal(await chA.send({ type: 'broadcast', event: 'évent ✓', payload: { x: 'ü' } }), 'ok')
    assert.equal(await chA.send({ type: 'broadcast', event: 'évent ✓', payload: arrayBuffer([1]) }), 'ok')
    const [j, bin] = await got.wait(() => true, { count: 2, timeoutMs: 5000 })
    assert.deepEqual(j.payload, { x: 'ü' })
    assert.deepEqual(bytes(bin.payload), [1])
    const [m] = await gotV1.wait(() => true, { timeoutMs: 5000 })
    assert.deepEqual(m.payload, { x: 'ü' })
  })

  it('fan-out: 40 clients across both shards all receive each message', async (t) => {
    const after = t.after.bind(t)
    const name = topic('fanout')
    const clients = Array.from({ length: 40 }, (_, i) => makeClient(srv, { vsn: i % 4 === 3 ? '1.0.0' : '2.0.0', after }))
    const chans = clients.map((c) => c.channel(name))
    const logs = chans.map((ch) => collect(ch, 'f'))
    await Promise.all(chans.map((ch) => subscribed(ch)))
    const shards = new Set(clients.map((c) => c.tap.opens.items[0].shard))
    assert.equal(shards.size, 2, 'clients landed on both shards')
    const sender = makeClient(srv, { after }).channel(name)
    await subscribed(sender)
    for (let i = 0; i < 10; i++) sender.send({ type: 'broadcast', event: 'f', payload: { i } })
    for (const log of logs) {
      const msgs = await log.wait(() => true, { count: 10, timeoutMs: 10000 })
      assert.deepEqual(msgs.map((m) => m.payload.i), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    }
  })

  it('topics are isolated: other topics and the private topic of the same name get nothing', async (t) => {
    const after = t.after.bind(t)
    const name = topic('iso')
    const a = makeClient(srv, { after })
    const b = makeClient(srv, { after })
    const pub = a.channel(name)
    const other = b.channel(`${name}-other`)
    const priv = b.channel(name, { config: { private: true } })
    const gotOther = collect(other)
    const gotPriv = collect(priv)
    const watcher = makeClient(srv, { after }).channel(name)
    const gotWatcher = collect(watcher)
    await Promise.all([subscribed(pub), subscribed(other), subscribed(priv), subscribed(watcher)])
    await pub.send({ type: 'broadcast', event: 'x', payload: { public: true } })
    await assertNone(gotOther, () => true, gotWatcher)
    assert.deepEqual(gotPriv.items, [])
  })
})
