// The official Phoenix JS client (npm `phoenix` 1.8), unmodified, against corecast: `Socket` +
// `channel().join()`, `push` with `receive('ok'|'error'|'timeout')`, `on(event)`, heartbeats,
// `leave`, the `Presence` helper (`onSync`/`onJoin`/`onLeave`/`list`), Phoenix 1.8's `authToken`
// option (the token travels in `Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.<token>`),
// a binary push (Phoenix encodes an ArrayBuffer payload as a kind-0 binary frame), and
// `postgres_changes` under row-level security with the authToken as the subscriber's identity.
//
// Unlike realtime-js, Phoenix sends the join payload it is given verbatim (no defaults) and
// never sets `presence.enabled`: a join with `presence: {key}` and then a `track` is how a
// plain Phoenix app uses Supabase presence.
//
// The Postgres test needs DATABASE_URL (and PSQL, CORECAST_SLOT); `cargo test phoenix_js`
// (tests/interop.rs) starts PostgreSQL and sets them. By hand, without Postgres (that test is
// skipped): cargo build && cd tests/js && CORECAST_BIN=../../target/debug/corecast node --test phoenix.test.mjs

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { Socket, Presence } from 'phoenix'
import {
  Server,
  Log,
  tappedTransport,
  topic,
  framesOf,
  frameEvent,
  jwt,
  nowSecs,
  arrayBuffer,
  sleep,
  withTranscript,
  until,
} from './helpers.mjs'

const SECRET = 'phoenix-js-test-secret-0123456789'
const token = (claims) => jwt(SECRET, { exp: nowSecs() + 3600, ...claims })
const ANON = token({ role: 'anon' })

/**
 * A Phoenix Socket for `server` (not yet connected) whose `ws` transport records every frame
 * (`socket.tap`) plus, per connection attempt, the subprotocols offered and the upgrade
 * response's headers (`socket.tap.upgrades`). Disconnected after test `t`.
 */
function phxSocket(t, server, opts = {}) {
  const { tap, TappedWebSocket } = tappedTransport()
  tap.upgrades = new Log('upgrades')
  class Transport extends TappedWebSocket {
    constructor(url, protocols, options) {
      super(url, protocols, options)
      this.on('upgrade', (res) => tap.upgrades.push({ url: String(url), protocols, headers: res.headers }))
    }
  }
  const socket = new Socket(server.endpoint(), {
    transport: Transport,
    reconnectAfterMs: () => 200,
    rejoinAfterMs: () => 200,
    ...opts,
  })
  socket.tap = tap
  t.after(() => new Promise((resolve) => socket.disconnect(resolve, 1000, 'test over')))
  return socket
}

/** `push.receive(...)` as a promise: `{status: 'ok'|'error'|'timeout', response}`. */
function reply(push) {
  return new Promise((resolve) => {
    push
      .receive('ok', (response) => resolve({ status: 'ok', response }))
      .receive('error', (response) => resolve({ status: 'error', response }))
      .receive('timeout', () => resolve({ status: 'timeout' }))
  })
}

/** Joins `ch` and asserts an ok reply; returns the reply's response. */
async function joined(ch) {
  const r = await reply(ch.join())
  assert.equal(r.status, 'ok', `join of ${ch.topic}: ${JSON.stringify(r)}`)
  return r.response
}

/** Records every `event` message on `ch` into a Log. */
function on(ch, event) {
  const log = new Log(`${event} on ${ch.topic}`)
  ch.on(event, (payload) => log.push(payload))
  return log
}

/** A Presence helper on `ch` recording `sync` snapshots of `list()` and join/leave callbacks. */
function presence(ch) {
  const p = new Presence(ch)
  p.log = new Log(`presence of ${ch.topic}`)
  p.onJoin((key, current, joined) => p.log.push({ event: 'join', key, current, joined }))
  p.onLeave((key, current, left) => p.log.push({ event: 'leave', key, current, left }))
  p.onSync(() => p.log.push({ event: 'sync', list: listed(p) }))
  return p
}

/** `presence.list()` as `{key: [meta without phx_ref, …]}`, keys sorted. */
function listed(p) {
  const entries = p.list((key, { metas }) => [key, metas.map(({ phx_ref, phx_ref_prev, ...m }) => m)])
  return Object.fromEntries(entries.sort(([a], [b]) => (a < b ? -1 : 1)))
}

const track = (ch, state) => reply(ch.push('presence', { type: 'presence', event: 'track', payload: state }))

describe('phoenix.js: socket, channels, broadcast, presence', () => {
  let srv
  before(async () => {
    srv = await new Server({ args: ['--jwt-secret', SECRET] }).start()
  })
  after(() => srv?.stop())

  it('join, push (with and without ack), on(broadcast), heartbeats, leave', async (t) => {
    const a = phxSocket(t, srv, { params: { apikey: ANON }, heartbeatIntervalMs: 100 })
    const b = phxSocket(t, srv, { params: { apikey: ANON } })
    a.connect()
    b.connect()
    const name = `realtime:${topic('phx-bc')}`
    const cha = a.channel(name, { config: { broadcast: { self: true, ack: true } } })
    const chb = b.channel(name, { config: { broadcast: { self: false } } })
    const [selfLog, gotB] = [on(cha, 'broadcast'), on(chb, 'broadcast')]
    await withTranscript([a, b], async () => {
      assert.deepEqual(await joined(cha), { postgres_changes: [] })
      await joined(chb)
      const url = new URL(a.tap.opens.items[0].url)
      assert.equal(url.pathname, '/realtime/v1/websocket')
      assert.equal(url.searchParams.get('vsn'), '2.0.0')
      assert.equal(url.searchParams.get('apikey'), ANON)

      // ack: true: the push gets an ok reply; the sender gets its own message (self: true).
      const ack = await reply(cha.push('broadcast', { type: 'broadcast', event: 'hello', payload: { n: 1 } }))
      assert.deepEqual(ack, { status: 'ok', response: {} })
      const [m] = await gotB.wait()
      assert.equal(m.type, 'broadcast')
      assert.equal(m.event, 'hello')
      assert.deepEqual(m.payload, { n: 1 })
      assert.equal(typeof m.meta?.id, 'string')
      await selfLog.wait((x) => x.event === 'hello')

      // Without ack: no reply (Phoenix times the push out; realtime-js does not wait for it).
      const noAck = reply(chb.push('broadcast', { type: 'broadcast', event: 'back', payload: { n: 2 } }, 300))
      const [back] = await selfLog.wait((x) => x.event === 'back')
      assert.deepEqual(back.payload, { n: 2 })
      assert.equal((await noAck).status, 'timeout')

      // Heartbeats (every 100 ms here) are answered on the phoenix topic and keep the socket.
      await a.tap.frames.wait((f) => f.dir === 'in' && f.frame[2] === 'phoenix' && f.frame[4].status === 'ok', {
        count: 3,
      })
      assert.equal(a.tap.closes.items.length, 0)
      assert.equal(a.isConnected(), true)

      // An unknown event gets an error reply and the channel carries on.
      const bad = await reply(cha.push('no_such_event', {}))
      assert.equal(bad.status, 'error', JSON.stringify(bad))

      // leave: ok, then nothing more arrives on that channel.
      assert.equal((await reply(chb.leave())).status, 'ok')
      assert.equal(chb.state, 'closed')
      await reply(cha.push('broadcast', { type: 'broadcast', event: 'after-leave', payload: {} }))
      await selfLog.wait((x) => x.event === 'after-leave')
      await sleep(200)
      assert.equal(gotB.filter((x) => x.event === 'after-leave').length, 0)
    })
  })

  it('Presence helper: presence_state on join, diffs, onJoin/onLeave, list(), a socket that goes away', async (t) => {
    const [a, b] = [phxSocket(t, srv, { params: { apikey: ANON } }), phxSocket(t, srv, { params: { apikey: ANON } })]
    a.connect()
    b.connect()
    const name = `realtime:${topic('phx-pres')}`
    const cha = a.channel(name, { config: { presence: { key: 'alice', enabled: true } } })
    const chb = b.channel(name, { config: { presence: { key: 'bob', enabled: true } } })
    const [pa, pb] = [presence(cha), presence(chb)]
    await withTranscript([a, b], async () => {
      await joined(cha)
      // presence_state after a presence-enabled join, even on an empty channel.
      await pa.log.wait((e) => e.event === 'sync')
      assert.deepEqual(pa.log.items[0], { event: 'sync', list: {} })
      assert.deepEqual(await track(cha, { name: 'Alice' }), { status: 'ok', response: {} })
      await joined(chb)
      // bob's presence_state (or, within corecast's diff window, the diff after it) shows alice.
      await pb.log.wait((e) => e.event === 'sync' && e.list.alice?.[0]?.name === 'Alice')
      assert.equal((await track(chb, { name: 'Bob' })).status, 'ok')
      const both = JSON.stringify({ alice: [{ name: 'Alice' }], bob: [{ name: 'Bob' }] })
      for (const p of [pa, pb]) {
        await until(() => JSON.stringify(listed(p)) === both, {
          label: 'both members',
          describe: () => JSON.stringify(p.log.items),
        })
      }
      const [j] = await pa.log.wait((e) => e.event === 'join' && e.key === 'bob')
      assert.equal(j.current, undefined)
      assert.equal(j.joined.metas[0].name, 'Bob')
      assert.equal(typeof j.joined.metas[0].phx_ref, 'string')

      // An update: a leave of the old meta and a join of the new one, one meta in the end.
      assert.equal((await track(cha, { name: 'Alice', status: 'away' })).status, 'ok')
      await until(() => listed(pb).alice?.[0]?.status === 'away', {
        label: 'updated meta at bob',
        describe: () => JSON.stringify(pb.log.items),
      })
      assert.equal(listed(pb).alice.length, 1)

      // untrack, then the socket going away: bob sees both as leaves.
      assert.equal((await reply(chb.push('presence', { type: 'presence', event: 'untrack' }))).status, 'ok')
      await pa.log.wait((e) => e.event === 'leave' && e.key === 'bob')
      a.disconnect()
      const [l] = await pb.log.wait((e) => e.event === 'leave' && e.key === 'alice')
      assert.deepEqual(
        l.left.metas.map((m) => m.name),
        ['Alice']
      )
      await until(() => Object.keys(listed(pb)).length === 0, {
        label: 'empty presence at bob',
        describe: () => JSON.stringify(listed(pb)),
      })
    })
  })

  it('Presence helper: one key on two sockets is one entry with two metas', async (t) => {
    const socks = [0, 1, 2].map(() => phxSocket(t, srv, { params: { apikey: ANON } }))
    for (const s of socks) s.connect()
    const name = `realtime:${topic('phx-multi')}`
    const [c1, c2, watcher] = socks.map((s, i) =>
      s.channel(name, { config: { presence: { key: i < 2 ? 'same' : 'watcher', enabled: true } } })
    )
    const pw = presence(watcher)
    await withTranscript(socks, async () => {
      for (const c of [c1, c2, watcher]) await joined(c)
      assert.equal((await track(c1, { tab: 1 })).status, 'ok')
      assert.equal((await track(c2, { tab: 2 })).status, 'ok')
      await until(() => listed(pw).same?.length === 2, {
        label: 'two metas',
        describe: () => JSON.stringify(pw.log.items),
      })
      const refs = pw.list((k, { metas }) => metas.map((m) => m.phx_ref)).flat()
      assert.equal(new Set(refs).size, 2, `phx_refs are unique: ${refs}`)
      socks[0].disconnect()
      await until(() => JSON.stringify(listed(pw)) === JSON.stringify({ same: [{ tab: 2 }] }), {
        label: 'one meta left',
        describe: () => JSON.stringify(pw.log.items),
      })
      // onLeave for the key with the remaining meta as `current`.
      const [l] = await pw.log.wait((e) => e.event === 'leave' && e.key === 'same')
      assert.deepEqual(
        l.current.metas.map((m) => m.tab),
        [2]
      )
    })
  })

  // (a) Phoenix apps join with `presence: {key}` and no `enabled`; a `track` must then turn
  // presence on for that channel as Supabase Realtime does: `presence_state` and diffs arrive,
  // so that Presence.onSync fires and list() shows the members.
  it('presence: {key} without enabled, then track: presence_state and diffs arrive (Presence helper syncs)', async (t) => {
    const [a, b] = [phxSocket(t, srv, { params: { apikey: ANON } }), phxSocket(t, srv, { params: { apikey: ANON } })]
    a.connect()
    b.connect()
    const name = `realtime:${topic('phx-key')}`
    const cha = a.channel(name, { config: { presence: { key: 'alice' } } })
    const chb = b.channel(name, { config: { presence: { key: 'bob' } } })
    const [pa, pb] = [presence(cha), presence(chb)]
    await withTranscript([a, b], async () => {
      await joined(cha)
      await joined(chb)
      assert.deepEqual(await track(cha, { name: 'Alice' }), { status: 'ok', response: {} })
      await a.tap.frames.wait((f) => f.dir === 'in' && frameEvent(f.frame) === 'presence_state', {
        label: 'presence_state after the track',
      })
      await until(() => JSON.stringify(listed(pa)) === JSON.stringify({ alice: [{ name: 'Alice' }] }), {
        label: 'alice in her own Presence list',
        describe: () => JSON.stringify(pa.log.items),
      })
      assert.equal((await track(chb, { name: 'Bob' })).status, 'ok')
      const both = JSON.stringify({ alice: [{ name: 'Alice' }], bob: [{ name: 'Bob' }] })
      for (const p of [pa, pb]) {
        await until(() => JSON.stringify(listed(p)) === both, {
          label: 'both members in both Presence lists',
          describe: () => JSON.stringify(p.log.items),
        })
      }
      assert.ok(framesOf(a.tap, 'in', name).some((f) => frameEvent(f) === 'presence_diff'))
      // The diff for bob's join reached alice through onJoin.
      await pa.log.wait((e) => e.event === 'join' && e.key === 'bob')
    })
  })

  // (b) A binary push: Phoenix encodes an ArrayBuffer payload as a kind-0 binary frame, which
  // Supabase Realtime's serializer does not take for a broadcast. It must get an error reply on
  // its channel (not a 1007 close of the socket), and the socket must stay usable.
  it('a binary (kind 0) push gets an error reply on its channel; the socket stays usable', async (t) => {
    const [a, b] = [phxSocket(t, srv, { params: { apikey: ANON } }), phxSocket(t, srv, { params: { apikey: ANON } })]
    a.connect()
    b.connect()
    const name = `realtime:${topic('phx-bin')}`
    const cha = a.channel(name, { config: { broadcast: { ack: true } } })
    const chb = b.channel(name, {})
    const gotB = on(chb, 'broadcast')
    await withTranscript([a, b], async () => {
      await joined(cha)
      await joined(chb)
      const r = await reply(cha.push('broadcast', arrayBuffer([1, 2, 3])))
      const out = framesOf(a.tap, 'out').find((f) => f.kind === 0)
      assert.ok(out, 'phoenix sent a kind-0 binary frame')
      assert.equal(r.status, 'error', `reply to the binary push: ${JSON.stringify(r)}`)
      await sleep(100)
      assert.deepEqual(a.tap.closes.items, [], 'the socket was not closed')
      assert.equal(a.isConnected(), true)
      assert.equal(cha.state, 'joined')
      // The same socket and channel still work.
      const ack = await reply(cha.push('broadcast', { type: 'broadcast', event: 'after', payload: { ok: 1 } }))
      assert.equal(ack.status, 'ok')
      const [m] = await gotB.wait()
      assert.equal(m.event, 'after')
    })
  })

  // (c) Phoenix 1.8's authToken: no apikey in the URL; the token rides in the subprotocol list
  // and must be honoured as the connection's apikey (and access token), with `phoenix` selected.
  it('authToken: the 101 selects the phoenix subprotocol and the token authorizes the socket', async (t) => {
    // phoenix.js encodes the token with btoa (the standard alphabet), which for a JWT's
    // characters ([A-Za-z0-9._-]) never yields '+' or '/': the same text as base64url.
    const rooms = token({ role: 'authenticated', sub: 'phx-user', topics: ['phx-room-*'] })
    const s = phxSocket(t, srv, { authToken: rooms })
    s.connect()
    const name = `realtime:${topic('phx-room')}`
    await withTranscript([s], async () => {
      const [up] = await s.tap.upgrades.wait()
      assert.deepEqual(up.protocols, ['phoenix', `base64url.bearer.phx.${btoa(rooms).replace(/=/g, '')}`])
      assert.equal(up.headers['sec-websocket-protocol'], 'phoenix')
      assert.equal(new URL(up.url).searchParams.get('apikey'), null)
      await s.tap.opens.wait()
      assert.equal(s.conn.protocol, 'phoenix')
      // The token is the identity: its `topics` claim allows this private channel.
      const ch = s.channel(name, { config: { private: true, broadcast: { self: true, ack: true } } })
      const got = on(ch, 'broadcast')
      await joined(ch)
      assert.equal(
        (await reply(ch.push('broadcast', { type: 'broadcast', event: 'e', payload: { x: 1 } }))).status,
        'ok'
      )
      await got.wait()
      // ...and not others.
      const other = s.channel(`realtime:${topic('elsewhere')}`, { config: { private: true } })
      const r = await reply(other.join())
      assert.equal(r.status, 'error')
      assert.match(r.response.reason, /Unauthorized/)
      other.leave()
    })
  })

  it('reconnect and rejoin after a server restart (authToken socket)', async (t) => {
    const own = await new Server({ args: ['--jwt-secret', SECRET] }).start()
    t.after(() => own.stop())
    const s = phxSocket(t, own, { authToken: ANON })
    s.connect()
    const name = `realtime:${topic('phx-rc')}`
    const ch = s.channel(name, {
      config: { broadcast: { self: true, ack: true }, presence: { key: 'me', enabled: true } },
    })
    const got = on(ch, 'broadcast')
    const states = on(ch, 'presence_state')
    await withTranscript([s], async () => {
      await joined(ch)
      await states.wait()
      await own.stop()
      await own.restart()
      // Phoenix reconnects (the authToken again in the subprotocol) and rejoins with a new join_ref.
      await s.tap.opens.wait(() => true, { count: 2, label: 'the second open' })
      await states.wait(() => true, { count: 2, label: 'presence_state after the rejoin' })
      const joins = framesOf(s.tap, 'out', name).filter((f) => frameEvent(f) === 'phx_join')
      assert.equal(joins.length, 2)
      assert.notEqual(joins[0][0], joins[1][0])
      assert.equal(s.tap.upgrades.items[1].headers['sec-websocket-protocol'], 'phoenix')
      await until(() => ch.state === 'joined', { label: 'joined again' })
      assert.equal((await reply(ch.push('broadcast', { type: 'broadcast', event: 'after', payload: {} }))).status, 'ok')
      await got.wait((m) => m.event === 'after')
    })
  })

  it('authToken: a bad token is refused at the upgrade (401), like a bad apikey', async (t) => {
    const bad = jwt('not-the-secret', { role: 'anon', exp: nowSecs() + 3600 })
    const s = phxSocket(t, srv, { authToken: bad, reconnectAfterMs: () => 60000 })
    const errors = new Log('socket errors')
    s.onError((e) => errors.push(e))
    s.connect()
    await errors.wait()
    await sleep(100)
    assert.equal(s.tap.opens.items.length, 0)
    assert.ok(
      s.tap.errors.some((e) => /401/.test(e)),
      JSON.stringify(s.tap.errors)
    )
  })
})

// -------------------------------------------------------------------------------------------
// Postgres changes (needs DATABASE_URL)
// -------------------------------------------------------------------------------------------

const DB = process.env.DATABASE_URL
const PSQL = process.env.PSQL ?? 'psql'
const skipPg = DB ? false : 'needs DATABASE_URL (run it through `cargo test phoenix_js`)'

function sql(q) {
  return execFileSync(PSQL, ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', DB, '-c', q], {
    encoding: 'utf8',
  }).trim()
}

describe('phoenix.js: postgres_changes', { skip: skipPg }, () => {
  let srv
  before(async () => {
    sql(`DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         CREATE TABLE phx_msgs (id serial PRIMARY KEY, owner text NOT NULL, body text);
         ALTER TABLE phx_msgs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_msgs ON phx_msgs FOR SELECT TO authenticated
           USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
         GRANT SELECT ON phx_msgs TO authenticated;`)
    srv = await new Server({ args: ['--jwt-secret', SECRET], env: { DATABASE_URL: DB } }).start()
  })
  after(() => srv?.stop())

  it('raw postgres_changes frames under RLS, the authToken (or access_token) as identity', async (t) => {
    // One socket identified by its authToken alone, one by apikey + access_token in the join.
    const ann = phxSocket(t, srv, { authToken: token({ role: 'authenticated', sub: 'ann' }) })
    const ben = phxSocket(t, srv, { params: { apikey: ANON } })
    ann.connect()
    ben.connect()
    const binding = { event: '*', schema: 'public', table: 'phx_msgs' }
    const cha = ann.channel(`realtime:${topic('phx-pg')}`, { config: { postgres_changes: [binding] } })
    const chb = ben.channel(`realtime:${topic('phx-pg')}`, {
      config: { postgres_changes: [{ ...binding, event: 'INSERT' }] },
      access_token: token({ role: 'authenticated', sub: 'ben' }),
    })
    const [sysA, sysB] = [on(cha, 'system'), on(chb, 'system')]
    const [pgA, pgB] = [on(cha, 'postgres_changes'), on(chb, 'postgres_changes')]
    await withTranscript([ann, ben], async () => {
      const ra = await joined(cha)
      const rb = await joined(chb)
      assert.equal(ra.postgres_changes.length, 1)
      const { id: idA, ...echoA } = ra.postgres_changes[0]
      assert.deepEqual(echoA, binding)
      assert.ok(['number', 'string'].includes(typeof idA), JSON.stringify(ra))
      const idB = rb.postgres_changes[0].id
      for (const sys of [sysA, sysB]) {
        const [s] = await sys.wait()
        assert.deepEqual([s.extension, s.status, s.message], ['postgres_changes', 'ok', 'Subscribed to PostgreSQL'])
      }
      sql(`INSERT INTO phx_msgs (owner, body) VALUES ('ann', 'a1'), ('ben', 'b1');
           UPDATE phx_msgs SET body = 'a1!' WHERE body = 'a1';`)
      const ga = await pgA.wait(() => true, { count: 2 })
      assert.deepEqual(
        ga.map((p) => [p.data.type, p.data.record.owner, p.data.record.body]),
        [
          ['INSERT', 'ann', 'a1'],
          ['UPDATE', 'ann', 'a1!'],
        ]
      )
      const p = ga[0]
      assert.deepEqual(p.ids, [idA])
      assert.deepEqual([p.data.schema, p.data.table, p.data.errors], ['public', 'phx_msgs', null])
      assert.deepEqual(
        p.data.columns.map((c) => [c.name, c.type]),
        [
          ['id', 'int4'],
          ['owner', 'text'],
          ['body', 'text'],
        ]
      )
      assert.deepEqual(ga[1].data.old_record, { id: p.data.record.id })
      const [gb] = await pgB.wait()
      assert.deepEqual(gb.ids, [idB])
      assert.equal(gb.data.record.body, 'b1')
      await sleep(300)
      assert.equal(pgA.items.length, 2)
      assert.equal(pgB.items.length, 1)
    })
  })
})
