// Channel lifecycle with the unmodified realtime-js client: every join config shape the client
// produces, vsn 1.0.0, the self-hosted `/socket` prefix, heartbeats, leave and removeChannel.
// (Presence and Postgres changes delivery get their own files once the server implements them.)

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { postgresChangesFilter } from '@supabase/realtime-js'
import { Server, Log, makeClient, subscribed, collect, topic, framesOf, sleep } from './helpers.mjs'

let srv
before(async () => {
  srv = await new Server().start()
})
after(() => srv.stop())

/** The phx_join the client sent for `wire` and the server's reply to it (vsn 2 arrays). */
function joinExchange(client, wire) {
  const join = framesOf(client.tap, 'out', wire).find((f) => f[3] === 'phx_join')
  assert.ok(join, `no phx_join sent for ${wire}`)
  const reply = framesOf(client.tap, 'in', wire).find((f) => f[3] === 'phx_reply' && f[1] === join[1])
  return { join, reply }
}

describe('join config shapes', { concurrency: true }, () => {
  it('defaults: SUBSCRIBED, reply echoes an empty postgres_changes list', async (t) => {
    const client = makeClient(srv, { after: t.after.bind(t) })
    const name = topic('defaults')
    const ch = client.channel(name)
    await subscribed(ch)
    assert.equal(ch.state, 'joined')
    const { join, reply } = joinExchange(client, `realtime:${name}`)
    assert.equal(join[0], join[1], 'join_ref == ref for phx_join')
    assert.deepEqual(join[4].config, {
      broadcast: { ack: false, self: false },
      presence: { key: '', enabled: false },
      postgres_changes: [],
      private: false,
    })
    assert.deepEqual(reply, [
      join[0],
      join[1],
      `realtime:${name}`,
      'phx_reply',
      { status: 'ok', response: { postgres_changes: [] } },
    ])
    assert.match(client.tap.opens.items[0].url, /\/realtime\/v1\/websocket\?apikey=anon-key&vsn=2\.0\.0$/)
  })

  it('broadcast {self:true, ack:true}: SUBSCRIBED', async (t) => {
    const client = makeClient(srv, { after: t.after.bind(t) })
    const name = topic('selfack')
    const ch = client.channel(name, { config: { broadcast: { self: true, ack: true } } })
    await subscribed(ch)
    const { join, reply } = joinExchange(client, `realtime:${name}`)
    assert.deepEqual(join[4].config.broadcast, { self: true, ack: true })
    assert.equal(reply[4].status, 'ok')
  })

  it('presence {key:"u1"} and a presence binding: SUBSCRIBED', async (t) => {
    const client = makeClient(srv, { after: t.after.bind(t) })
    const a = client.channel(topic('presence-key'), { config: { presence: { key: 'u1' } } })
    const b = client.channel(topic('presence-bound'), { config: { presence: { key: 'u2', enabled: true } } })
    b.on('presence', { event: 'sync' }, () => {})
    await Promise.all([subscribed(a), subscribed(b)])
    assert.deepEqual(joinExchange(client, a.topic).join[4].config.presence, { key: 'u1', enabled: false })
    assert.deepEqual(joinExchange(client, b.topic).join[4].config.presence, { key: 'u2', enabled: true })
  })

  it('private:true (development mode allows every private topic): SUBSCRIBED', async (t) => {
    const client = makeClient(srv, { after: t.after.bind(t) })
    const ch = client.channel(topic('private'), { config: { private: true } })
    await subscribed(ch)
    assert.equal(joinExchange(client, ch.topic).join[4].config.private, true)
  })

  it('postgres_changes bindings: echo matches (SUBSCRIBED), distinct ids, system error, channel usable', async (t) => {
    const client = makeClient(srv, { after: t.after.bind(t) })
    const name = topic('pg')
    const ch = client.channel(name)
    const filters = [
      { event: '*', schema: 'public' },
      { event: 'INSERT', schema: 'public', table: 'todos' },
      { event: 'UPDATE', schema: 'public', table: 'todos', filter: 'id=eq.1' },
      { event: 'DELETE', schema: 'public', table: 'todos', filter: 'id=gt.0,id=lt.100' },
      { event: '*', schema: 'private', table: 'rooms', filter: postgresChangesFilter().in('status', ['a', 'b,c']) },
      { event: 'INSERT', schema: 'public', table: 'people', filter: 'name=eq.Zoë', select: ['id', 'name'] },
    ]
    for (const f of filters) ch.on('postgres_changes', f, () => {})
    const system = new Log('system')
    ch.on('system', {}, (p) => system.push(p))
    await subscribed(ch)

    const { join, reply } = joinExchange(client, ch.topic)
    const sent = join[4].config.postgres_changes
    assert.equal(sent.length, filters.length)
    assert.equal(sent[4].filter, 'status=in.(a,"b,c")')
    const echoed = reply[4].response.postgres_changes
    assert.equal(echoed.length, sent.length)
    sent.forEach((s, i) => {
      const { id, ...rest } = echoed[i]
      assert.deepEqual(rest, s, `binding ${i} echoed verbatim`)
      assert.ok(typeof id === 'number' || typeof id === 'string', `binding ${i} has an id: ${id}`)
    })
    const ids = ch.bindings.postgres_changes.map((b) => b.id)
    assert.deepEqual(ids, echoed.map((e) => e.id), 'the client stored the server ids')
    assert.equal(new Set(ids).size, ids.length, 'ids are distinct')

    // No database: a system error says so, and the channel stays joined.
    const [msg] = await system.wait(() => true, { timeoutMs: 5000 })
    assert.equal(msg.extension, 'postgres_changes')
    assert.equal(msg.status, 'error')
    assert.equal(msg.channel, name)
    assert.match(msg.message, /Postgres changes/i)
    const sys = framesOf(client.tap, 'in', ch.topic).find((f) => f[3] === 'system')
    assert.equal(sys[0], join[0], 'system message carries the join_ref')
    assert.equal(ch.state, 'joined')
    assert.ok(!ch.statuses.items.some((s) => s.status !== 'SUBSCRIBED'), JSON.stringify(ch.statuses.items))
    const got = collect(ch, 'still')
    const other = makeClient(srv, { after: t.after.bind(t) })
    const sender = other.channel(name)
    await subscribed(sender)
    await sender.send({ type: 'broadcast', event: 'still', payload: { joined: true } })
    const [m] = await got.wait(() => true, { timeoutMs: 5000 })
    assert.deepEqual(m.payload, { joined: true })
  })

  it('postgres_changes with a lower-case event is echoed verbatim (client compares strictly)', async (t) => {
    const client = makeClient(srv, { after: t.after.bind(t) })
    const ch = client.channel(topic('pg-lower'))
    ch.on('postgres_changes', { event: 'insert', schema: 'public', table: 'todos' }, () => {})
    ch.on('postgres_changes', { event: 'update', schema: 'public', table: 'todos', filter: '' }, () => {})
    await subscribed(ch)
    const { reply } = joinExchange(client, ch.topic)
    assert.equal(reply[4].response.postgres_changes[0].event, 'insert')
    assert.equal(reply[4].response.postgres_changes[1].event, 'update')
  })

  it('vsn 1.0.0 client: JSON object frames, SUBSCRIBED, broadcast round trip', async (t) => {
    const client = makeClient(srv, { vsn: '1.0.0', after: t.after.bind(t) })
    const name = topic('v1')
    const ch = client.channel(name, { config: { broadcast: { self: true, ack: true } } })
    ch.on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'todos' }, () => {})
    const got = collect(ch, 'e')
    await subscribed(ch)
    assert.match(client.tap.opens.items[0].url, /vsn=1\.0\.0$/)
    const reply = framesOf(client.tap, 'in', ch.topic).find((f) => f.event === 'phx_reply')
    assert.equal(reply.payload.status, 'ok')
    assert.equal(reply.payload.response.postgres_changes[0].table, 'todos')
    assert.equal(await ch.send({ type: 'broadcast', event: 'e', payload: { v: 1 } }), 'ok')
    const [m] = await got.wait(() => true, { timeoutMs: 5000 })
    assert.equal(m.event, 'e')
    assert.deepEqual(m.payload, { v: 1 })
    assert.ok(client.tap.frames.items.every((f) => !f.binary), 'no binary frames with vsn 1.0.0')
  })

  it('self-hosted prefix /socket works (client builds /socket/websocket)', async (t) => {
    const client = makeClient(srv, { prefix: '/socket', after: t.after.bind(t) })
    const ch = client.channel(topic('socket-prefix'), { config: { broadcast: { self: true } } })
    const got = collect(ch)
    await subscribed(ch)
    assert.match(client.tap.opens.items[0].url, /\/socket\/websocket\?/)
    await ch.send({ type: 'broadcast', event: 'x', payload: {} })
    await got.wait()
  })

  it('logLevel adds log_level to the URL; the server ignores it', async (t) => {
    const client = makeClient(srv, { logLevel: 'info', after: t.after.bind(t) })
    const ch = client.channel(topic('loglevel'))
    await subscribed(ch)
    assert.match(client.tap.opens.items[0].url, /\?apikey=anon-key&log_level=info&vsn=2\.0\.0$/)
  })

  it('many channels on one client: all SUBSCRIBED, each reply matched by ref', async (t) => {
    const client = makeClient(srv, { after: t.after.bind(t) })
    const chans = Array.from({ length: 20 }, (_, i) =>
      client.channel(topic(`many${i}`), { config: { private: i % 2 === 1 } })
    )
    await Promise.all(chans.map((c) => subscribed(c)))
    for (const c of chans) assert.equal(c.state, 'joined')
  })
})

describe('heartbeat', () => {
  it('500 ms heartbeats all answered ok; connection and channel stay up past the idle timeout', async (t) => {
    // An idle timeout of 2 s on the server: only the client's heartbeats keep the socket open.
    const idle = await new Server({ args: ['--idle-timeout-secs', '2'] }).start()
    t.after(() => idle.stop())
    const beats = new Log('heartbeats')
    const client = makeClient(idle, {
      heartbeatIntervalMs: 500,
      heartbeatCallback: (status, latency) => beats.push({ status, latency }),
      after: t.after.bind(t),
    })
    const ch = client.channel(topic('hb'), { config: { broadcast: { self: true } } })
    await subscribed(ch)
    await beats.wait((b) => b.status === 'ok', { count: 6, timeoutMs: 10000 })
    const bad = beats.filter((b) => b.status !== 'ok' && b.status !== 'sent')
    assert.deepEqual(bad, [], 'no heartbeat timeout/error')
    assert.equal(client.tap.closes.items.length, 0, `no close: ${JSON.stringify(client.tap.closes.items)}`)
    assert.equal(client.tap.attempts, 1)
    assert.ok(client.isConnected())
    assert.equal(ch.state, 'joined')
    assert.deepEqual(ch.statuses.items.map((s) => s.status), ['SUBSCRIBED'])

    // Wire shape: [null, ref, "phoenix", "heartbeat", {}] → [null, ref, "phoenix", "phx_reply", ok].
    const hbs = framesOf(client.tap, 'out', 'phoenix')
    assert.ok(hbs.length >= 6)
    const replies = framesOf(client.tap, 'in', 'phoenix')
    for (const hb of hbs.slice(0, 6)) {
      assert.deepEqual([hb[0], hb[3], hb[4]], [null, 'heartbeat', {}])
      const r = replies.find((f) => f[1] === hb[1])
      assert.deepEqual(r, [null, hb[1], 'phoenix', 'phx_reply', { status: 'ok', response: {} }])
    }
    const got = collect(ch, 'alive')
    await ch.send({ type: 'broadcast', event: 'alive', payload: {} })
    await got.wait(() => true, { timeoutMs: 5000 })
  })
})

describe('leave', { concurrency: true }, () => {
  it('unsubscribe() → ok, CLOSED; server replies ok + phx_close; no more messages', async (t) => {
    const name = topic('leave')
    const a = makeClient(srv, { after: t.after.bind(t) })
    const b = makeClient(srv, { after: t.after.bind(t) })
    const sentinel = makeClient(srv, { after: t.after.bind(t) })
    const chA = a.channel(name)
    const gotA = collect(chA)
    const chB = b.channel(name)
    const chS = sentinel.channel(name)
    const gotS = collect(chS)
    await Promise.all([subscribed(chA), subscribed(chB), subscribed(chS)])

    await chB.send({ type: 'broadcast', event: 'before', payload: { n: 1 } })
    await gotA.wait((m) => m.event === 'before', { timeoutMs: 5000 })

    assert.equal(await chA.unsubscribe(), 'ok')
    assert.equal(chA.state, 'closed')
    await chA.statuses.wait((s) => s.status === 'CLOSED', { timeoutMs: 5000 })
    // The server answers the leave and closes the channel with ref == join_ref.
    const { join } = joinExchange(a, chA.topic)
    const leave = framesOf(a.tap, 'out', chA.topic).find((f) => f[3] === 'phx_leave')
    assert.deepEqual(leave.slice(0, 1), [join[0]])
    await a.tap.frames.wait((f) => f.dir === 'in' && f.frame[3] === 'phx_close', { timeoutMs: 5000 })
    const inA = framesOf(a.tap, 'in', chA.topic)
    assert.ok(
      inA.some((f) => f[3] === 'phx_reply' && f[1] === leave[1] && f[4].status === 'ok'),
      `leave reply: ${JSON.stringify(inA)}`
    )
    assert.ok(inA.some((f) => f[3] === 'phx_close' && f[0] === join[0] && f[1] === join[0]))

    const framesBefore = a.tap.frames.items.length
    await chB.send({ type: 'broadcast', event: 'after', payload: { n: 2 } })
    await gotS.wait((m) => m.event === 'after', { timeoutMs: 5000 })
    await sleep(300) // the sentinel already has it; give a stray delivery to A a moment more
    const stray = a.tap.frames.items.slice(framesBefore).filter((f) => f.dir === 'in')
    assert.deepEqual(stray.map((f) => f.frame), [], 'nothing arrives for a left channel')
    assert.equal(gotA.filter((m) => m.event === 'after').length, 0)
  })

  it('removeChannel() → ok, channel gone; a new channel on the topic joins again', async (t) => {
    const name = topic('remove')
    const a = makeClient(srv, { after: t.after.bind(t) })
    const b = makeClient(srv, { after: t.after.bind(t) })
    const chA = a.channel(name)
    const chB = b.channel(name)
    await Promise.all([subscribed(chA), subscribed(chB)])
    assert.equal(await a.removeChannel(chA), 'ok')
    assert.ok(!a.getChannels().includes(chA))

    const again = a.channel(name)
    assert.notEqual(again, chA)
    const got = collect(again, 'back')
    await subscribed(again)
    const joins = framesOf(a.tap, 'out', again.topic).filter((f) => f[3] === 'phx_join')
    assert.equal(joins.length, 2)
    assert.notEqual(joins[0][0], joins[1][0], 'new join_ref')
    await chB.send({ type: 'broadcast', event: 'back', payload: { n: 3 } })
    const [m] = await got.wait(() => true, { timeoutMs: 5000 })
    assert.deepEqual(m.payload, { n: 3 })
  })

  it('removeAllChannels() → every leave ok, socket disconnected', async (t) => {
    const a = makeClient(srv, { after: t.after.bind(t) })
    const chans = [a.channel(topic('all1')), a.channel(topic('all2')), a.channel(topic('all3'))]
    await Promise.all(chans.map((c) => subscribed(c)))
    assert.deepEqual(await a.removeAllChannels(), ['ok', 'ok', 'ok'])
    assert.equal(a.isConnected(), false)
    await a.tap.closes.wait(() => true, { timeoutMs: 5000 })
  })
})
