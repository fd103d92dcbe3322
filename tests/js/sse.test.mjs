// Server-Sent Events with the npm `eventsource` package (a WhatWG EventSource for Node): broadcasts
// published over REST and by a realtime-js WebSocket client, several topics on one stream,
// `presence=true` / `track=`, automatic reconnect with `Last-Event-ID` after the connection is
// cut (TCP cut through a proxy, and a server restart on the same port) without gap or duplicate,
// `last_event_id` in the query, auth, and a bad request.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { EventSource } from 'eventsource'
import { Server, Log, clientOnShard, subscribed, topic, arrayBuffer, jwt, nowSecs, sleep, tcpProxy } from './helpers.mjs'

let srv
before(async () => {
  srv = await new Server().start()
})
after(() => srv.stop())

const SSE_EVENTS = ['broadcast', 'presence_state', 'presence_diff', 'system', 'message']

/**
 * An EventSource on `${base}/realtime/v1/sse?${query}` (closed by `t.after`). Returns logs:
 * `events` ({type, data (parsed JSON), lastEventId}), `requests` (one per HTTP request the
 * EventSource made: {headers it sent, status, contentType, cors}), `opens`, `errors`.
 * `headers` are added to every request through the `fetch` option (eventsource 3+).
 */
function openStream(t, base, query, { headers = {} } = {}) {
  const requests = new Log('SSE requests')
  const events = new Log(`SSE events of ${query}`)
  const opens = new Log('SSE opens')
  const errors = new Log('SSE errors')
  const es = new EventSource(`${base}/realtime/v1/sse?${query}`, {
    fetch: async (input, init) => {
      const req = { url: String(input), headers: { ...init.headers }, status: null }
      requests.push(req)
      const res = await fetch(input, { ...init, headers: { ...init.headers, ...headers } })
      req.status = res.status
      req.contentType = res.headers.get('content-type')
      req.cors = res.headers.get('access-control-allow-origin')
      return res
    },
  })
  for (const type of SSE_EVENTS) {
    es.addEventListener(type, (e) => events.push({ type, data: JSON.parse(e.data), lastEventId: e.lastEventId }))
  }
  es.addEventListener('open', () => opens.push({ t: Date.now() }))
  es.addEventListener('error', (e) => errors.push({ code: e.code, message: e.message, readyState: es.readyState }))
  t.after(() => es.close())
  return { es, requests, events, opens, errors }
}

/**
 * Waits until the stream `s` (opened with `presence=true`) is registered with the owner of each
 * of its `n` topics: each owner answers the stream's presence sync after its interest and
 * position request (same FIFO), so once `n` presence_state events arrived, a message published
 * from now on is delivered. Needed because the `open` event alone does not guarantee that (see
 * the KNOWN SERVER BUG test 'a broadcast published right after open ...').
 */
async function ready(s, n = 1) {
  await s.events.wait((e) => e.type === 'presence_state', {
    count: n,
    label: `${n} presence_state (stream registered)`,
  })
}

/** POST /realtime/v1/api/broadcast with `messages`; asserts 202. */
async function publish(server, messages, headers = {}) {
  const res = await fetch(`${server.http}/realtime/v1/api/broadcast`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', apikey: 'anon-key', ...headers },
    body: JSON.stringify({ messages }),
  })
  assert.equal(res.status, 202, `publish: ${res.status} ${await res.text()}`)
}

/** Publishes `{n}` as event `m` to each `[topic, n]`, one request each, in order. */
async function publishSeq(server, list) {
  for (const [name, n] of list) await publish(server, [{ topic: name, event: 'm', payload: { n } }])
}

/** Broadcast events of `log` for `name`, as their payload.n. */
const ns = (log, name) =>
  log.filter((e) => e.type === 'broadcast' && e.data.topic === name).map((e) => e.data.payload.n)

/** Asserts `got` (a topic's received n's) is exactly `want`: complete, in order, no duplicate. */
function assertExactly(got, want, what) {
  assert.deepEqual(got, want, `${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`)
}

describe('SSE with the eventsource package', { concurrency: true }, () => {
  it('one stream, several topics: REST (batch and single-event) and realtime-js WebSocket broadcasts', async (t) => {
    const [a, b, c] = [topic('sse-a'), topic('sse-b'), topic('sse-c')]
    const s = openStream(t, srv.http, `topic=${a}&topic=${b}&topic=${c}&apikey=anon-key&presence=true`)
    await s.opens.wait(() => true, { label: 'open' })
    await ready(s, 3)
    assert.equal(s.requests.items[0].status, 200)
    assert.match(s.requests.items[0].contentType, /^text\/event-stream/)
    assert.equal(s.requests.items[0].cors, '*', 'CORS is open')
    assert.equal(s.requests.items[0].headers.Accept, 'text/event-stream')
    assert.equal(s.requests.items[0].headers['Last-Event-ID'], undefined, 'no Last-Event-ID on the first request')

    // REST batch (two topics in one request), then the single-message endpoint.
    await publish(srv, [
      { topic: a, event: 'rest', payload: { n: 1 } },
      { topic: b, event: 'rest', payload: { n: 2 } },
    ])
    let res = await fetch(`${srv.http}/realtime/v1/api/broadcast/${c}/events/single`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', apikey: 'anon-key' },
      body: JSON.stringify({ n: 3 }),
    })
    assert.equal(res.status, 202)
    res = await fetch(`${srv.http}/realtime/v1/api/broadcast/${c}/events/bin`, {
      method: 'POST',
      headers: { 'content-type': 'application/octet-stream', apikey: 'anon-key' },
      body: new Uint8Array([1, 2, 3, 250]),
    })
    assert.equal(res.status, 202)

    // A realtime-js client on each shard sends over its WebSocket (JSON and binary payloads).
    const w0 = await clientOnShard(srv, 0, { after: t.after.bind(t) })
    const w1 = await clientOnShard(srv, 1, { after: t.after.bind(t) })
    const chA = w0.channel(a)
    const chB = w1.channel(b)
    await Promise.all([subscribed(chA), subscribed(chB)])
    assert.equal(await chA.send({ type: 'broadcast', event: 'ws', payload: { n: 4, text: 'héllo ✓' } }), 'ok')
    assert.equal(await chB.send({ type: 'broadcast', event: 'ws', payload: { n: 5 } }), 'ok')
    assert.equal(await chB.send({ type: 'broadcast', event: 'ws-bin', payload: arrayBuffer([0, 255, 7]) }), 'ok')

    const got = await s.events.wait((e) => e.type === 'broadcast', { count: 7, label: '7 broadcasts' })
    const by = (ev, name) => got.filter((e) => e.data.event === ev && e.data.topic === name)
    assert.deepEqual(
      by('rest', a).map((e) => e.data.payload),
      [{ n: 1 }]
    )
    assert.deepEqual(
      by('rest', b).map((e) => e.data.payload),
      [{ n: 2 }]
    )
    assert.deepEqual(
      by('single', c).map((e) => e.data.payload),
      [{ n: 3 }]
    )
    assert.deepEqual(
      by('ws', a).map((e) => e.data.payload),
      [{ n: 4, text: 'héllo ✓' }]
    )
    assert.deepEqual(
      by('ws', b).map((e) => e.data.payload),
      [{ n: 5 }]
    )
    const [bin] = by('bin', c)
    assert.equal(bin.data.encoding, 'base64')
    assert.deepEqual([...Buffer.from(bin.data.payload, 'base64')], [1, 2, 3, 250])
    const [wsBin] = by('ws-bin', b)
    assert.equal(wsBin.data.encoding, 'base64')
    assert.deepEqual([...Buffer.from(wsBin.data.payload, 'base64')], [0, 255, 7])
    for (const e of got) {
      assert.deepEqual(
        Object.keys(e.data)
          .filter((k) => k !== 'encoding')
          .sort(),
        ['event', 'meta', 'payload', 'topic']
      )
      assert.equal(typeof e.data.meta.offset, 'number')
      assert.equal(typeof e.data.meta.id, 'string')
      // Every broadcast carries a resume token for all three topics: `<epoch>-<offset>` x 3.
      assert.match(e.lastEventId, /^[A-Za-z0-9]+-\d+\.[A-Za-z0-9]+-\d+\.[A-Za-z0-9]+-\d+$/, e.lastEventId)
    }
    // Per topic, offsets increase along the stream.
    for (const name of [a, b, c]) {
      const offs = got.filter((e) => e.data.topic === name).map((e) => e.data.meta.offset)
      assert.deepEqual(
        offs,
        [...offs].sort((x, y) => x - y),
        `${name} offsets in order`
      )
    }
    assert.equal(s.errors.items.length, 0, JSON.stringify(s.errors.items))
    assert.equal(s.es.readyState, EventSource.OPEN)
  })

  it('a stream resumes from `last_event_id` in the query (a new EventSource)', async (t) => {
    const [x, y] = [topic('sse-q-x'), topic('sse-q-y')]
    const s1 = openStream(t, srv.http, `topic=${x}&topic=${y}&presence=true`)
    await ready(s1, 2)
    await publishSeq(srv, [
      [x, 1],
      [y, 2],
      [x, 3],
      [y, 4],
    ])
    const first = await s1.events.wait((e) => e.type === 'broadcast', { count: 4 })
    const token = first[1].lastEventId // after x:1, y:2
    s1.es.close()
    const s2 = openStream(t, srv.http, `topic=${x}&topic=${y}&last_event_id=${encodeURIComponent(token)}`)
    const replayed = await s2.events.wait((e) => e.type === 'broadcast', { count: 2 })
    // (The relative order of two topics' backlogs is not defined; each topic's is.)
    assert.deepEqual(
      replayed.map((e) => [e.data.topic, e.data.payload.n, e.data.meta.replayed]).sort((p, q) => p[1] - q[1]),
      [
        [x, 3, true],
        [y, 4, true],
      ]
    )
    assert.equal(replayed.at(-1).lastEventId, first.at(-1).lastEventId, 'the same token after the same messages')
    await publishSeq(srv, [[x, 5]])
    await s2.events.wait((e) => e.type === 'broadcast' && e.data.payload.n === 5)
    assertExactly(ns(s2.events, x), [3, 5], x)
    assertExactly(ns(s2.events, y), [4], y)
  })

  it('presence=true: presence_state and diffs from realtime-js; track= puts the stream in presenceState()', async (t) => {
    const name = topic('sse-presence')
    const c = await clientOnShard(srv, 1, { after: t.after.bind(t) })
    const ch = c.channel(name, { config: { presence: { key: 'ws-user' } } })
    const pres = new Log('realtime-js presence events')
    ch.on('presence', { event: 'join' }, (p) => pres.push(p))
    ch.on('presence', { event: 'leave' }, (p) => pres.push(p))
    await subscribed(ch)
    assert.equal(await ch.track({ via: 'ws' }), 'ok')
    await pres.wait((e) => e.event === 'join' && e.key === 'ws-user')

    // A listening stream: presence_state (with the WebSocket member), then diffs.
    const watch = openStream(t, srv.http, `topic=${name}&presence=true`)
    const [state] = await watch.events.wait((e) => e.type === 'presence_state', { label: 'presence_state' })
    assert.equal(state.data.topic, name)
    assert.equal(state.data.event, 'presence_state')
    assert.deepEqual(Object.keys(state.data.payload), ['ws-user'])
    assert.equal(state.data.payload['ws-user'].metas[0].via, 'ws')
    assert.equal(typeof state.data.payload['ws-user'].metas[0].phx_ref, 'string')

    // A tracking stream: its member shows up in realtime-js's presenceState() and in the
    // listening stream's diffs; closing the EventSource removes it.
    const track = encodeURIComponent(JSON.stringify({ via: 'sse', n: 1 }))
    const tracker = openStream(t, srv.http, `topic=${name}&presence=true&presence_key=sse-user&track=${track}`)
    await tracker.opens.wait()
    const [j] = await pres.wait((e) => e.event === 'join' && e.key === 'sse-user', {
      label: 'realtime-js sees sse-user',
    })
    assert.deepEqual(
      j.newPresences.map(({ presence_ref, ...r }) => r),
      [{ via: 'sse', n: 1 }]
    )
    const [diff] = await watch.events.wait((e) => e.type === 'presence_diff' && e.data.payload.joins['sse-user'], {
      label: 'diff joining sse-user',
    })
    assert.deepEqual(diff.data.payload.leaves, {})
    assert.equal(diff.data.payload.joins['sse-user'].metas[0].via, 'sse')
    // The tracker stream (presence=true) sees itself too.
    await tracker.events.wait(
      (e) =>
        (e.type === 'presence_diff' && e.data.payload.joins['sse-user']) ||
        (e.type === 'presence_state' && e.data.payload['sse-user']),
      { label: 'the tracking stream sees itself' }
    )

    tracker.es.close()
    await pres.wait((e) => e.event === 'leave' && e.key === 'sse-user', { label: 'leave after EventSource.close()' })
    await watch.events.wait((e) => e.type === 'presence_diff' && e.data.payload.leaves['sse-user'], {
      label: 'diff leaving sse-user',
    })
    assert.deepEqual(Object.keys(ch.presenceState()), ['ws-user'])
    // The WebSocket member's untrack reaches the stream too.
    assert.equal(await ch.untrack(), 'ok')
    await watch.events.wait((e) => e.type === 'presence_diff' && e.data.payload.leaves['ws-user'], {
      label: 'diff leaving ws-user',
    })
  })

  it('the TCP connection is cut: EventSource reconnects with Last-Event-ID, gets everything missed, in order, once', async (t) => {
    const [x, y] = [topic('sse-cut-x'), topic('sse-cut-y')]
    const proxy = await tcpProxy(t, srv.port)
    const s = openStream(t, proxy.url, `topic=${x}&topic=${y}&presence=true`)
    await ready(s, 2)
    await publishSeq(srv, [
      [x, 1],
      [y, 2],
      [x, 3],
    ])
    const before = await s.events.wait((e) => e.type === 'broadcast', { count: 3 })
    const lastId = before.at(-1).lastEventId

    proxy.cut()
    await s.errors.wait(() => true, { label: 'error event after the cut' })
    assert.equal(s.es.readyState, EventSource.CONNECTING, 'reconnecting by itself')
    // Published while the stream is away (the server's retry hint is 2 s).
    await publishSeq(srv, [
      [y, 4],
      [x, 5],
      [y, 6],
      [x, 7],
      [y, 8],
    ])
    assert.equal(s.requests.items.length, 1, 'still away while publishing')
    await s.opens.wait(() => true, { count: 2, timeoutMs: 10000, label: 'reopened' })
    assert.equal(s.requests.items[1].headers['Last-Event-ID'], lastId, 'the reconnect carries Last-Event-ID')
    assert.equal(s.requests.items[1].status, 200)
    await publishSeq(srv, [
      [x, 9],
      [y, 10],
    ])
    await s.events.wait((e) => e.type === 'broadcast', { count: 10, label: '10 broadcasts' })
    await sleep(200)
    assertExactly(ns(s.events, x), [1, 3, 5, 7, 9], x)
    assertExactly(ns(s.events, y), [2, 4, 6, 8, 10], y)
    // Missed messages come back marked replayed; 9 and 10 may too (published right after the
    // reopen, they can be sequenced before the owner served the resume, then they are part of it).
    for (const e of s.events.filter((e) => e.type === 'broadcast')) {
      const n = e.data.payload.n
      if (n <= 3) assert.equal(e.data.meta.replayed, undefined, `live before the cut: ${JSON.stringify(e.data)}`)
      if (n >= 4 && n <= 8) assert.equal(e.data.meta.replayed, true, `missed, so replayed: ${JSON.stringify(e.data)}`)
    }
    assert.equal(
      s.events.filter((e) => e.type === 'system').length,
      0,
      JSON.stringify(s.events.filter((e) => e.type === 'system'))
    )
  })

  // The restart scenario twice: with messages stored durably (`persist: true`, whose streams keep
  // their epoch across a clean restart), and with plain (ephemeral) broadcasts.
  //
  // KNOWN SERVER BUG (the ephemeral case FAILS until fixed): at a clean shutdown corecast writes
  // an epoch checkpoint only for topics with durable history (src/shard/history.rs
  // `write_checkpoints`), so after a SIGTERM restart a topic that only had ephemeral broadcasts
  // starts under a NEW epoch. The EventSource reconnects with `Last-Event-ID: <old epoch>-<n>...`
  // and gets `event: system` {"status":"error","message":"resume impossible: unknown epoch ..."}
  // per topic, then only live messages: everything published between the restart and the
  // reconnect (here x:5, y:6, x:7) is never delivered, although the stream had seen every message
  // of the old epoch (its token was at the old stream's last offset), so a gapless resume was
  // possible.
  for (const persist of [true, false]) {
    const kind = persist ? 'persisted (persist: true)' : 'ephemeral'
    it(`the server restarts on the same port (SIGTERM), ${kind} messages: EventSource resumes without gap or duplicate`, async (t) => {
      const own = await new Server().start()
      t.after(() => own.stop())
      const [x, y] = [topic('sse-rs-x'), topic('sse-rs-y')]
      const pub = (list) =>
        (async () => {
          for (const [name, n] of list) await publish(own, [{ topic: name, event: 'm', payload: { n }, persist }])
        })()
      const s = openStream(t, own.http, `topic=${x}&topic=${y}&presence=true`)
      await ready(s, 2)
      await pub([
        [x, 1],
        [y, 2],
        [x, 3],
        [y, 4],
      ])
      const before = await s.events.wait((e) => e.type === 'broadcast', { count: 4 })
      const lastId = before.at(-1).lastEventId

      const { code } = await own.stop()
      assert.equal(code, 0)
      await s.errors.wait(() => true, { label: 'error event after the shutdown' })
      await own.restart()
      // Published after the restart, before the EventSource is back (it retries every 2 s).
      await pub([
        [x, 5],
        [y, 6],
        [x, 7],
      ])
      const okBefore = s.requests.filter((r) => r.status === 200).length
      await s.opens.wait(() => true, { count: 2, timeoutMs: 15000, label: 'reopened after the restart' })
      const reopen = s.requests.items.filter((r) => r.status === 200)[1]
      assert.equal(reopen.headers['Last-Event-ID'], lastId, 'the reconnect carries Last-Event-ID')
      await pub([
        [y, 8],
        [x, 9],
      ])
      const detail = () =>
        `\nevents: ${JSON.stringify(s.events.items.map((e) => [e.type, e.data.topic === x ? 'x' : 'y', e.data.payload?.n ?? e.data.payload, e.lastEventId]))}` +
        `\nrequests: ${JSON.stringify(s.requests.items)}`
      await s.events.wait((e) => e.type === 'broadcast' && e.data.payload.n === 9, { timeoutMs: 10000, label: 'x:9' })
      await s.events.wait((e) => e.type === 'broadcast' && e.data.payload.n === 8, { timeoutMs: 10000, label: 'y:8' })
      await sleep(200)
      assert.equal(okBefore, 1, 'the messages after the restart were published before the stream came back')
      assert.deepEqual(
        s.events.filter((e) => e.type === 'system'),
        [],
        `no resume error${detail()}`
      )
      assert.deepEqual(ns(s.events, x), [1, 3, 5, 7, 9], `topic x: every message, in order, once${detail()}`)
      assert.deepEqual(ns(s.events, y), [2, 4, 6, 8], `topic y: every message, in order, once${detail()}`)
    })
  }

  it('auth with --jwt-secret: apikey query, x-api-key / Authorization headers through the fetch option; 401 without', async (t) => {
    const secret = 'sse-interop-secret'
    const secured = await new Server({ args: ['--jwt-secret', secret] }).start()
    t.after(() => secured.stop())
    const anon = jwt(secret, { role: 'anon', exp: nowSecs() + 3600 })
    const name = topic('sse-auth')

    const none = openStream(t, secured.http, `topic=${name}`)
    const [err] = await none.errors.wait(() => true, { label: 'error without a key' })
    assert.equal(err.code, 401)
    assert.equal(err.readyState, EventSource.CLOSED, 'a 401 fails the connection for good')

    const q = `topic=${name}&presence=true`
    const streams = [
      openStream(t, secured.http, `${q}&apikey=${anon}`),
      openStream(t, secured.http, q, { headers: { 'x-api-key': anon } }),
      openStream(t, secured.http, q, { headers: { Authorization: `Bearer ${anon}` } }),
      openStream(t, secured.http, q, { headers: { apikey: anon } }),
    ]
    await Promise.all(streams.map((s) => ready(s)))
    await publish(secured, [{ topic: name, event: 'm', payload: { n: 1 } }], { apikey: anon })
    for (const s of streams) await s.events.wait((e) => e.type === 'broadcast' && e.data.payload.n === 1)
  })

  // KNOWN SERVER BUG (expected to FAIL until fixed): the stream's `200` head and preamble go out
  // before the topic owners registered the stream (src/shard/conn.rs sends `stream_head()` and
  // only then `sse_open` routes the interest and position request to each owner). A broadcast
  // published after the client saw `open` (and answered 202) can reach the owner first, when it
  // enters on the owner's shard while the stream lives on the other one: it is sequenced without
  // the stream's shard listening, and the position the owner then hands the stream already
  // includes it, so the stream never gets it. Measured: 3-6 % of fresh streams miss their first
  // message. A WebSocket join has no such race (its reply waits for the owner).
  it('a broadcast published right after `open` reaches the stream (100 fresh streams)', async (t) => {
    const n = 100
    const streams = []
    for (let i = 0; i < n; i++) {
      const name = topic('sse-open-race')
      const s = openStream(t, srv.http, `topic=${name}`)
      await s.opens.wait(() => true, { label: `stream ${i} open` })
      await publish(srv, [{ topic: name, event: 'first', payload: { i } }])
      streams.push({ name, s })
    }
    const deadline = Date.now() + 3000
    const missing = () => streams.filter(({ s }) => !s.events.items.some((e) => e.type === 'broadcast'))
    while (missing().length > 0 && Date.now() < deadline) await sleep(50)
    const lost = missing()
    assert.deepEqual(
      lost.map(({ name }) => name),
      [],
      `${lost.length} of ${n} streams never got the broadcast published (202) after their open event`
    )
  })

  it('a bad request (no topic) fails the EventSource: 400, CLOSED, no retry', async (t) => {
    const s = openStream(t, srv.http, 'apikey=anon-key')
    const [err] = await s.errors.wait(() => true, { label: 'error' })
    assert.equal(err.code, 400)
    assert.equal(s.es.readyState, EventSource.CLOSED)
    const res = await fetch(`${srv.http}/realtime/v1/sse?apikey=anon-key`)
    assert.equal(res.status, 400)
    assert.match(await res.text(), /topic/)
    await sleep(3200) // longer than eventsource's default 3 s retry: nothing more was requested
    assert.equal(s.requests.items.length, 1)
    assert.equal(s.opens.items.length, 0)
  })
})
