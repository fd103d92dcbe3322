// Channels against the real server: publish/receive, presence, history, server emit, tokens.

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { createServerClient } from '../src/index.js'
import { Log, client, jwt, nowSecs, sleep, startServer, topic, until } from './helpers.mjs'

describe('channels', { concurrency: true }, () => {
  for (const transport of ['websocket', 'auto']) it(`${transport}: subscribe, publish, receive across two clients (RealtimePayload shape, *, off, self)`, async (t) => {
    const srv = await startServer(t)
    const a = client(t, srv, { transport })
    const b = client(t, srv, { transport })
    const name = topic('chat')
    const gotB = new Log('b')
    const allB = new Log('b *')
    const gotA = new Log('a')
    const onB = (p) => gotB.push(p)
    const chB = b.channel(name).on('message', onB).on('*', (p) => allB.push(p))
    const chA = a.channel(name).on('message', (p) => gotA.push(p))
    assert.equal(await chB.subscribe(), chB)
    await chA.subscribe()
    assert.equal(await chA.publish('message', { text: 'hello' }), 'ok')
    const [m] = await gotB.wait()
    assert.equal(m.type, 'event')
    assert.equal(m.topic, name)
    assert.equal(m.event, 'message')
    assert.deepEqual(m.data, { text: 'hello' })
    assert.equal(typeof m.timestamp, 'number')
    assert.ok(Math.abs(m.timestamp - Date.now()) < 60000)
    assert.ok('userId' in m)
    assert.equal(typeof m.meta.offset, 'number')
    await allB.wait((p) => p.event === 'message')
    // The publisher gets its own message too (self: true by default, as the chat sample needs).
    await gotA.wait()
    // off(): no more deliveries to that listener.
    chB.off('message', onB)
    await chA.publish('message', { text: 'second' })
    await allB.wait((p) => p.data.text === 'second')
    assert.equal(gotB.items.length, 1)
    // A channel that is not joined publishes over REST.
    const c = client(t, srv, { transport })
    await c.channel(name).publish('message', { text: 'via rest' })
    await gotA.wait((p) => p.data.text === 'via rest')
    // Binary payloads (ArrayBuffer) go as kind-3 frames and arrive as ArrayBuffers.
    const bin = new Log('bin')
    chB.on('blob', (p) => bin.push(p))
    await chA.publish('blob', new Uint8Array([1, 2, 3]))
    const [bm] = await bin.wait()
    assert.deepEqual([...new Uint8Array(bm.data)], [1, 2, 3])
    await chB.unsubscribe()
    await chA.publish('message', { text: 'after unsubscribe' })
    await gotA.wait((p) => p.data.text === 'after unsubscribe')
    await sleep(100)
    assert.ok(!allB.items.some((p) => p.data?.text === 'after unsubscribe'))
  })

  it('status: idle → connecting → connected → disconnected; onStatusChange unsubscribes', async (t) => {
    const srv = await startServer(t)
    const c = client(t, srv)
    const seen = []
    const unsub = c.onStatusChange((s) => seen.push(s))
    assert.deepEqual(seen, ['idle'])
    await c.connect()
    assert.deepEqual(seen, ['idle', 'connecting', 'connected'])
    await c.connect()
    c.disconnect()
    assert.deepEqual(seen, ['idle', 'connecting', 'connected', 'disconnected'])
    unsub()
    await c.connect()
    assert.equal(c.status, 'connected')
    assert.equal(seen.length, 4)
  })

  it('Atelier style: broadcast { event } bindings, send(), presence.track / untrack, presence { joined, left, users }', async (t) => {
    const srv = await startServer(t)
    const a = client(t, srv)
    const b = client(t, srv)
    const name = topic('room')
    const cursors = new Log('cursors')
    const states = new Log('presence')
    const chA = a.channel(name)
    chA.on('broadcast', { event: 'cursor' }, (payload) => cursors.push(payload))
    chA.on('presence', (state) => states.push(state))
    await chA.subscribe()
    const chB = b.channel(name)
    await chB.subscribe()
    await chB.presence.track({ name: 'Ryan', cursor: { x: 0, y: 0 } })
    const [s1] = await states.wait((s) => s.joined.some((u) => u.name === 'Ryan'))
    assert.deepEqual(s1.users.map((u) => u.name), ['Ryan'])
    chB.send({ event: 'cursor', payload: { x: 120, y: 480, color: '#000' } })
    const [cur] = await cursors.wait()
    assert.deepEqual(cur, { x: 120, y: 480, color: '#000' })
    await chB.presence.untrack()
    const [s2] = await states.wait((s) => s.left.some((u) => u.name === 'Ryan'))
    assert.deepEqual(s2.users, [])
  })

  it('Aerostack presence: presence:join, presence:update, presence:leave with { data: state }; leave on disconnect', async (t) => {
    const srv = await startServer(t)
    const watcher = client(t, srv)
    const alice = client(t, srv)
    const name = topic('room')
    const ev = new Log('presence events')
    const online = new Map()
    const w = watcher.channel(name)
    w.on('presence:join', ({ data }) => (ev.push(['join', data]), online.set(data.userId, data)))
      .on('presence:update', ({ data }) => (ev.push(['update', data]), online.set(data.userId, data)))
      .on('presence:leave', ({ data }) => (ev.push(['leave', data]), online.delete(data.userId)))
    await w.subscribe()
    const ch = alice.channel(name)
    // track() before subscribe(), as the document's sample does: sent once joined.
    ch.track({ userId: 'u-alice', name: 'Alice', color: '#FF5733', status: 'active' })
    await ch.subscribe()
    const [[, joined]] = await ev.wait(([k]) => k === 'join')
    assert.deepEqual(joined, { userId: 'u-alice', name: 'Alice', color: '#FF5733', status: 'active' })
    await ch.track({ userId: 'u-alice', name: 'Alice', cursor: { line: 42, col: 15 } })
    const [[, upd]] = await ev.wait(([k]) => k === 'update')
    assert.deepEqual(upd.cursor, { line: 42, col: 15 })
    assert.equal(online.get('u-alice').cursor.line, 42)
    assert.deepEqual(Object.keys(w.presenceState()).length, 1)
    // Auto-cleanup: a client that goes away leaves.
    alice.disconnect()
    const [[, left]] = await ev.wait(([k]) => k === 'leave')
    assert.equal(left.userId, 'u-alice')
    assert.equal(online.size, 0)
    assert.equal(ev.items.filter(([k]) => k === 'join').length, 1)
  })

  it('getHistory(limit, before): persisted messages only, newest first, paging by created_at', async (t) => {
    const srv = await startServer(t)
    const c = client(t, srv)
    const name = topic('chat')
    const ch = c.channel(name)
    await ch.subscribe()
    for (let i = 1; i <= 6; i++) {
      await ch.publish('message', { n: i }, { persist: true })
      await ch.publish('typing', { n: i }) // not persisted: not history
      await sleep(3)
    }
    const page = await ch.getHistory(4)
    assert.equal(page.length, 4)
    assert.deepEqual(page.map((h) => h.data.n), [6, 5, 4, 3])
    for (const h of page) {
      assert.equal(typeof h.id, 'string')
      assert.equal(h.room_id, name)
      assert.ok('user_id' in h)
      assert.equal(h.event, 'message')
      assert.equal(typeof h.created_at, 'number')
    }
    const older = await ch.getHistory(4, page[page.length - 1].created_at)
    assert.deepEqual(older.map((h) => h.data.n), [2, 1])
    assert.deepEqual((await ch.getHistory()).map((h) => h.data.n), [6, 5, 4, 3, 2, 1])
    // A topic nobody published to has no history.
    assert.deepEqual(await c.channel(topic('empty')).getHistory(10), [])
  })

  it('createServerClient(url, { serviceKey }).emit and sdk.socket.emit reach subscribers; persist is history', async (t) => {
    const secret = 'server-client-secret'
    const srv = await startServer(t, { args: ['--jwt-secret', secret] })
    const serviceKey = jwt(secret, { role: 'service_role', exp: nowSecs() + 3600 })
    const anon = jwt(secret, { role: 'anon', exp: nowSecs() + 3600 })
    const c = client(t, srv, { token: anon })
    const name = `notifications/${Date.now()}`
    const got = new Log('notifications')
    const ch = c.channel(name).on('message', ({ data }) => got.push(data))
    await ch.subscribe()
    const sdk = createServerClient(srv.url, { serviceKey })
    assert.equal(await sdk.emit('message', { text: 'Order #1234 has been shipped' }, name, { persist: true }), 'ok')
    await sdk.socket.emit('message', { id: 'x', user: 'System', text: 'second' }, name)
    await got.wait((d) => d.text === 'second')
    assert.deepEqual(got.items.map((d) => d.text), ['Order #1234 has been shipped', 'second'])
    const hist = await ch.getHistory(10)
    assert.deepEqual(hist.map((h) => h.data.text), ['Order #1234 has been shipped'])
    // A wrong key is refused with the server's reason.
    const bad = createServerClient(srv.url, { serviceKey: 'not-a-jwt' })
    await assert.rejects(bad.emit('message', {}, name), /HTTP 401/)
  })

  it("the publisher's identity: userId on live events and user_id in history (the token's sub), when the server reports it", async (t) => {
    const secret = 'user-id-secret'
    const srv = await startServer(t, { args: ['--jwt-secret', secret] })
    const exp = nowSecs() + 3600
    const ann = client(t, srv, { token: jwt(secret, { role: 'authenticated', sub: 'user-ann', exp }), transport: 'websocket' })
    const bob = client(t, srv, { token: jwt(secret, { role: 'authenticated', sub: 'user-bob', exp }) })
    const name = topic('who')
    const got = new Log('who')
    const ch = ann.channel(name).on('message', (p) => got.push(p))
    await ch.subscribe()
    await ch.publish('message', { by: 'ann' }, { persist: true }) // over the socket
    await bob.channel(name).publish('message', { by: 'bob' }, { persist: true }) // over REST
    await got.wait(() => true, { count: 2 })
    const raw = await (
      await fetch(`${srv.url}/realtime/v1/api/channels/${encodeURIComponent(name)}/messages?limit=5`, {
        headers: { Authorization: `Bearer ${ann.token}` },
      })
    ).json()
    if (!('user_id' in (raw.messages[0] ?? {}))) {
      t.skip('this server does not report user_id yet')
      return
    }
    const byData = Object.fromEntries(got.items.map((p) => [p.data.by, p.userId]))
    assert.deepEqual(byData, { ann: 'user-ann', bob: 'user-bob' })
    const hist = await ch.getHistory(5)
    assert.deepEqual(hist.map((h) => [h.data.by, h.user_id]), [['bob', 'user-bob'], ['ann', 'user-ann']])
  })

  it('heartbeats keep an idle connection open (server --idle-timeout-secs 1)', async (t) => {
    const srv = await startServer(t, { args: ['--idle-timeout-secs', '1'] })
    const c = client(t, srv, { transport: 'websocket', heartbeatIntervalMs: 300 })
    const seen = []
    c.onStatusChange((s) => seen.push(s))
    await c.channel(topic('idle')).subscribe()
    await sleep(2500)
    assert.deepEqual(seen, ['idle', 'connecting', 'connected'])
  })

  it('setToken: every join carries the current token, live channels get access_token (no anonymous window)', async (t) => {
    const secret = 'set-token-secret'
    const srv = await startServer(t, { args: ['--jwt-secret', secret] })
    const exp = nowSecs() + 3600
    const anonKey = jwt(secret, { role: 'anon', exp })
    const user1 = jwt(secret, { role: 'authenticated', sub: 'user-1', topics: ['secret-*'], exp })
    const user2 = jwt(secret, { role: 'authenticated', sub: 'user-1', topics: ['secret-*', 'other-*'], exp })
    // Record every frame the client sends.
    const { default: WS } = await import('ws')
    const sent = []
    class Tapped extends WS {
      send(d, ...r) {
        if (typeof d === 'string') sent.push(JSON.parse(d))
        return super.send(d, ...r)
      }
    }
    const c = client(t, srv, { apikey: anonKey, WebSocket: Tapped, transport: 'websocket' })
    c.setToken(user1)
    // A private channel that only the user's token may join: joining works at once.
    const ch = c.channel(`secret-${Date.now()}`, { private: true })
    const got = new Log('private')
    ch.on('ping', (p) => got.push(p))
    await ch.subscribe()
    const joins = sent.filter((f) => f[3] === 'phx_join')
    assert.equal(joins.length, 1)
    assert.equal(joins[0][4].access_token, user1)
    c.setToken(user2)
    await until(() => sent.some((f) => f[3] === 'access_token' && f[4].access_token === user2), { label: 'access_token push' })
    const other = c.channel(`other-${Date.now()}`, { private: true })
    await other.subscribe()
    assert.equal(sent.filter((f) => f[3] === 'phx_join').at(-1)[4].access_token, user2)
    // The channel is still live under the new token.
    await ch.publish('ping', { n: 1 })
    await got.wait()
  })
})
