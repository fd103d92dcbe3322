// The full SDK, `@supabase/supabase-js`, unmodified, against corecast: `createClient(projectUrl,
// anonKey, { realtime: { transport } })` with the project URL pointing at corecast itself
// (supabase-js appends `/realtime/v1`, Phoenix `/websocket`), `channel`, `removeChannel`,
// `removeAllChannels`, broadcast `send` over the socket (JSON and binary) and through the REST
// fallback (a `send` before subscribing posts to `/realtime/v1/api/broadcast`), `httpSend`,
// presence `track`/`untrack`/`sync`, private channels through the `accessToken` option, and
// `postgres_changes` under row-level security with `realtime.setAuth` switching the identity of
// a joined channel.
//
// The server runs with `--jwt-secret`, so the anon key and the user tokens are real HS256 JWTs.
// The Postgres tests need DATABASE_URL (and PSQL, CORECAST_SLOT); `cargo test supabase_js`
// (tests/interop.rs) starts PostgreSQL and sets them. By hand, without Postgres (those tests are
// skipped): cargo build && cd tests/js && CORECAST_BIN=../../target/debug/corecast node --test supabase-js.test.mjs

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { createClient } from '@supabase/supabase-js'
import {
  Server,
  Log,
  tappedTransport,
  closeClient,
  subscribed,
  track,
  collect,
  topic,
  framesOf,
  frameEvent,
  jwt,
  nowSecs,
  arrayBuffer,
  bytes,
  sleep,
  withTranscript,
  until,
} from './helpers.mjs'

const SECRET = 'supabase-js-test-secret-0123456789'
const token = (claims) => jwt(SECRET, { exp: nowSecs() + 3600, ...claims })
const ANON = token({ role: 'anon', iss: 'supabase-demo' })
const ROOMS = token({ role: 'authenticated', sub: 'rooms-user', topics: ['sb-room-*'] })

/**
 * A supabase-js client for `server`: `realtime.transport` is a `ws` subclass recording every
 * frame (`client.tap`), `global.fetch` records every HTTP request (`client.http`: url, method,
 * headers, body, status). With `accessToken` (a function) supabase-js runs in third-party-auth
 * mode and takes realtime's token from it; without, `auth` is the (sessionless) auth client.
 * Stopped after test `t`.
 */
function supabase(t, server, { key = ANON, accessToken, realtime = {} } = {}) {
  const { tap, TappedWebSocket } = tappedTransport()
  const http = new Log('http requests')
  const recordingFetch = async (input, init = {}) => {
    const res = await fetch(input, init)
    const headers = Object.fromEntries(new Headers(init.headers ?? {}).entries())
    http.push({ url: String(input), method: init.method ?? 'GET', headers, body: init.body, status: res.status })
    return res
  }
  const options = {
    realtime: { transport: TappedWebSocket, ...realtime },
    global: { fetch: recordingFetch },
  }
  if (accessToken) options.accessToken = accessToken
  else options.auth = { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false }
  const client = createClient(server.http, key, options)
  client.tap = tap
  client.http = http
  t.after(() => closeClient(client.realtime))
  return client
}

/** `presenceState()` without presence_refs, keys sorted. */
function plain(state) {
  return Object.fromEntries(
    Object.keys(state)
      .sort()
      .map((k) => [k, state[k].map(({ presence_ref, ...rest }) => rest)])
  )
}

describe('supabase-js: broadcast, presence, channels', () => {
  let srv
  before(async () => {
    srv = await new Server({ args: ['--jwt-secret', SECRET] }).start()
  })
  after(() => srv?.stop())

  it('connects to <project URL>/realtime/v1/websocket with the anon key as apikey and access_token', async (t) => {
    const sb = supabase(t, srv)
    const ch = sb.channel(topic('sb-url'))
    await withTranscript([sb], async () => {
      await subscribed(ch)
      const [open] = sb.tap.opens.items
      const url = new URL(open.url)
      assert.equal(url.origin, `ws://127.0.0.1:${srv.port}`)
      assert.equal(url.pathname, '/realtime/v1/websocket')
      assert.equal(url.searchParams.get('apikey'), ANON)
      assert.equal(url.searchParams.get('vsn'), '2.0.0')
      // subscribe() builds the join before supabase-js's async accessToken callback resolved, so
      // the first join may carry no access_token (the server then uses the connect apikey); the
      // callback falls back to the anon key when nobody is signed in.
      const [join] = framesOf(sb.tap, 'out', ch.topic).filter((f) => frameEvent(f) === 'phx_join')
      assert.ok([undefined, ANON].includes(join[4].access_token), JSON.stringify(join))
      assert.equal(sb.realtime.accessTokenValue, ANON)
      assert.equal(ch.state, 'joined')
    })
  })

  it('broadcast over the socket between two clients: JSON and binary, self, ack, meta', async (t) => {
    const [a, b] = [supabase(t, srv), supabase(t, srv)]
    const name = topic('sb-bc')
    const cha = a.channel(name, { config: { broadcast: { self: true, ack: true } } })
    const chb = b.channel(name)
    const [selfLog, gotB] = [collect(cha), collect(chb)]
    await withTranscript([a, b], async () => {
      await subscribed(cha)
      await subscribed(chb)
      assert.equal(await cha.send({ type: 'broadcast', event: 'cursor', payload: { x: 1, y: 2 } }), 'ok')
      assert.equal(await cha.send({ type: 'broadcast', event: 'blob', payload: arrayBuffer([1, 2, 255]) }), 'ok')
      assert.equal(await chb.send({ type: 'broadcast', event: 'reply', payload: { from: 'b' } }), 'ok')
      const [m1, m2] = await gotB.wait((m) => m.event !== 'reply', { count: 2 })
      assert.equal(m1.event, 'cursor')
      assert.deepEqual(m1.payload, { x: 1, y: 2 })
      assert.equal(typeof m1.meta?.id, 'string')
      assert.equal(m2.event, 'blob')
      assert.deepEqual(bytes(m2.payload), [1, 2, 255])
      assert.ok(m2.meta.offset > m1.meta.offset, JSON.stringify([m1.meta, m2.meta]))
      // self: true echoes a's own messages to a; b's message reaches a too.
      await selfLog.wait((m) => m.event === 'cursor')
      await selfLog.wait((m) => m.event === 'blob')
      const [r] = await selfLog.wait((m) => m.event === 'reply')
      assert.deepEqual(r.payload, { from: 'b' })
      // b (self: false) never sees its own message.
      await sleep(200)
      assert.equal(gotB.filter((m) => m.event === 'reply').length, 0)
      // Binary sends went out as kind-3 frames, not JSON.
      assert.ok(framesOf(a.tap, 'out', undefined).some((f) => f.kind === 3 && f.event === 'blob'))
    })
  })

  it('send() before subscribe falls back to POST /realtime/v1/api/broadcast (public and private)', async (t) => {
    const name = topic('sb-rest')
    const sub = supabase(t, srv)
    const listener = sub.channel(name)
    const got = collect(listener)
    const privName = topic('sb-room')
    const privSub = supabase(t, srv, { accessToken: async () => ROOMS })
    const privListener = privSub.channel(privName, { config: { private: true } })
    const privGot = collect(privListener)
    await withTranscript([sub, privSub], async () => {
      // As Supabase's docs say for private channels: setAuth() before subscribing, so that the
      // join carries the callback's token (subscribe() does not wait for it).
      await privSub.realtime.setAuth()
      await subscribed(listener)
      await subscribed(privListener)

      const pub = supabase(t, srv)
      const ch = pub.channel(name)
      assert.equal(await ch.send({ type: 'broadcast', event: 'rest-1', payload: { n: 1 } }), 'ok')
      const [req] = pub.http.items
      // realtime-js derives the URL from the socket URL and keeps its query (apikey, vsn).
      const url = new URL(req.url)
      assert.equal(`${url.origin}${url.pathname}`, `${srv.http}/realtime/v1/api/broadcast`)
      assert.equal(req.method, 'POST')
      assert.equal(req.status, 202)
      assert.equal(req.headers.apikey, ANON)
      assert.deepEqual(JSON.parse(req.body), {
        messages: [{ topic: name, event: 'rest-1', payload: { n: 1 }, private: false }],
      })
      // No socket was opened for it.
      assert.equal(pub.tap.attempts, 0)
      const [m] = await got.wait((x) => x.event === 'rest-1')
      assert.deepEqual(m.payload, { n: 1 })

      // httpSend() uses the single-message endpoint.
      assert.deepEqual(await ch.httpSend('rest-2', { n: 2 }), { success: true })
      await got.wait((x) => x.event === 'rest-2')

      // A private topic needs a token that may publish there (a `topics` claim).
      const privPub = supabase(t, srv, { accessToken: async () => ROOMS })
      const pch = privPub.channel(privName, { config: { private: true } })
      assert.equal(await pch.send({ type: 'broadcast', event: 'secret', payload: { s: 1 } }), 'ok')
      const [preq] = privPub.http.items
      assert.equal(preq.headers.authorization, `Bearer ${ROOMS}`)
      assert.equal(preq.status, 202)
      const [pm] = await privGot.wait((x) => x.event === 'secret')
      assert.deepEqual(pm.payload, { s: 1 })

      // With the anon key alone the private publish is refused, and send() says so.
      const anonPub = supabase(t, srv)
      const ach = anonPub.channel(privName, { config: { private: true } })
      assert.equal(await ach.send({ type: 'broadcast', event: 'nope', payload: {} }), 'error')
      assert.equal(anonPub.http.items[0].status, 403, JSON.stringify(anonPub.http.items))
      await sleep(200)
      assert.equal(privGot.filter((x) => x.event === 'nope').length, 0)
    })
  })

  it('presence: track, sync, join/leave, untrack, removeChannel', async (t) => {
    const [a, b] = [supabase(t, srv), supabase(t, srv)]
    const name = topic('sb-pres')
    const mk = (c, key) => {
      const ch = c.channel(name, { config: { presence: { key } } })
      ch.events = new Log(`presence of ${key}`)
      for (const event of ['sync', 'join', 'leave'])
        ch.on('presence', { event }, (p) => ch.events.push({ event, ...p }))
      return ch
    }
    const [cha, chb] = [mk(a, 'alice'), mk(b, 'bob')]
    await withTranscript([a, b], async () => {
      await subscribed(cha)
      await subscribed(chb)
      assert.equal(await cha.track({ name: 'Alice', online_at: 1 }), 'ok')
      assert.equal(await chb.track({ name: 'Bob' }), 'ok')
      const both = { alice: [{ name: 'Alice', online_at: 1 }], bob: [{ name: 'Bob' }] }
      for (const ch of [cha, chb]) {
        await until(() => JSON.stringify(plain(ch.presenceState())) === JSON.stringify(both), {
          label: `both members in ${ch.topic}`,
          describe: () => JSON.stringify(ch.presenceState()),
        })
      }
      const [join] = await chb.events.wait((e) => e.event === 'join' && e.key === 'alice')
      assert.equal(join.newPresences[0].name, 'Alice')
      assert.equal(typeof join.newPresences[0].presence_ref, 'string')

      // An update replaces alice's meta for everyone.
      assert.equal(await cha.track({ name: 'Alice', online_at: 2 }), 'ok')
      await until(() => chb.presenceState().alice?.[0]?.online_at === 2, {
        label: 'updated meta at bob',
        describe: () => JSON.stringify(chb.presenceState()),
      })
      assert.equal(chb.presenceState().alice.length, 1)

      assert.equal(await chb.untrack(), 'ok')
      const [left] = await cha.events.wait((e) => e.event === 'leave' && e.key === 'bob')
      assert.equal(left.leftPresences[0].name, 'Bob')
      await until(() => !('bob' in cha.presenceState()), { label: 'bob gone at alice' })

      // removeChannel leaves the channel: alice disappears for bob.
      assert.equal(await a.removeChannel(cha), 'ok')
      assert.deepEqual(a.getChannels(), [])
      await chb.events.wait((e) => e.event === 'leave' && e.key === 'alice')
      await until(() => Object.keys(chb.presenceState()).length === 0, {
        label: 'empty presence at bob',
        describe: () => JSON.stringify(chb.presenceState()),
      })
    })
  })

  it('removeChannel / removeAllChannels leave on the server: nothing more is delivered', async (t) => {
    const [a, pub] = [supabase(t, srv), supabase(t, srv)]
    const [n1, n2] = [topic('sb-rm'), topic('sb-rm')]
    const [c1, c2] = [a.channel(n1), a.channel(n2)]
    const [g1, g2] = [collect(c1), collect(c2)]
    const [p1, p2] = [pub.channel(n1), pub.channel(n2)]
    await withTranscript([a, pub], async () => {
      for (const c of [c1, c2, p1, p2]) await subscribed(c)
      await p1.send({ type: 'broadcast', event: 'before', payload: {} })
      await g1.wait((m) => m.event === 'before')
      assert.equal(await a.removeChannel(c1), 'ok')
      assert.deepEqual(
        a.getChannels().map((c) => c.topic),
        [c2.topic]
      )
      const leave = await a.tap.frames.wait((f) => f.dir === 'out' && frameEvent(f.frame) === 'phx_leave')
      assert.equal(leave[0].frame[2], c1.topic)
      await p1.send({ type: 'broadcast', event: 'after', payload: {} })
      await p2.send({ type: 'broadcast', event: 'still', payload: {} })
      await g2.wait((m) => m.event === 'still')
      await sleep(200)
      assert.equal(g1.filter((m) => m.event === 'after').length, 0)
      // The socket itself stays open while a channel remains.
      assert.equal(a.tap.closes.items.length, 0)
      assert.deepEqual(await a.removeAllChannels(), ['ok'])
      assert.deepEqual(a.getChannels(), [])
    })
  })

  it('persisted messages (httpSend and send with persist) are replayed to a private join with broadcast.replay', async (t) => {
    const name = topic('sb-room')
    const a = supabase(t, srv, { accessToken: async () => ROOMS })
    await withTranscript([a], async () => {
      await a.realtime.setAuth()
      const ch = a.channel(name, { config: { private: true, broadcast: { ack: true } } })
      await subscribed(ch)
      const since = Date.now() - 1000
      assert.deepEqual(await ch.httpSend('h1', { n: 1 }, { persist: true }), { success: true })
      assert.equal(await ch.send({ type: 'broadcast', event: 's1', payload: { n: 2 }, persist: true }), 'ok')
      assert.equal(await ch.send({ type: 'broadcast', event: 'transient', payload: { n: 3 } }), 'ok')
      const b = supabase(t, srv, { accessToken: async () => ROOMS })
      await b.realtime.setAuth()
      const late = b.channel(name, { config: { private: true, broadcast: { replay: { since, limit: 10 } } } })
      const got = collect(late)
      await subscribed(late)
      const replayed = await got.wait(() => true, { count: 2 })
      assert.deepEqual(
        replayed.map((m) => [m.event, m.payload, m.meta.replayed]),
        [
          ['h1', { n: 1 }, true],
          ['s1', { n: 2 }, true],
        ]
      )
      await sleep(200)
      assert.equal(got.items.length, 2, 'only persisted messages are replayed')
    })
  })

  it('private channels: the accessToken option is the join token; the anon key is refused', async (t) => {
    const name = topic('sb-room')
    const ok = supabase(t, srv, { accessToken: async () => ROOMS })
    const ch = ok.channel(name, { config: { private: true } })
    const anon = supabase(t, srv)
    const no = anon.channel(name, { config: { private: true } })
    await withTranscript([ok, anon], async () => {
      await ok.realtime.setAuth()
      await subscribed(ch)
      const [join] = framesOf(ok.tap, 'out', ch.topic).filter((f) => frameEvent(f) === 'phx_join')
      assert.equal(join[4].access_token, ROOMS)
      assert.equal(join[4].config.private, true)
      const log = track(no)
      const [hit] = await log.wait((s) => s.status !== 'CLOSED', { label: 'join refusal' })
      assert.equal(hit.status, 'CHANNEL_ERROR')
      assert.match(hit.err, /Unauthorized/)
      await anon.removeChannel(no)
    })
  })
})

// -------------------------------------------------------------------------------------------
// Postgres changes (needs DATABASE_URL)
// -------------------------------------------------------------------------------------------

const DB = process.env.DATABASE_URL
const PSQL = process.env.PSQL ?? 'psql'
const skipPg = DB ? false : 'needs DATABASE_URL (run it through `cargo test supabase_js`)'

function sql(q) {
  return execFileSync(PSQL, ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', DB, '-c', q], {
    encoding: 'utf8',
  }).trim()
}

describe('supabase-js: postgres_changes under row-level security', { skip: skipPg }, () => {
  let srv
  before(async () => {
    // The roles are cluster-wide and other test files create them too (hence the handler).
    sql(`DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN CREATE ROLE anon NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         CREATE TABLE sb_notes (id serial PRIMARY KEY, owner text NOT NULL, body text);
         ALTER TABLE sb_notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_notes ON sb_notes FOR SELECT TO authenticated
           USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
         GRANT SELECT ON sb_notes TO authenticated, anon;`)
    srv = await new Server({ args: ['--jwt-secret', SECRET], env: { DATABASE_URL: DB } }).start()
    // corecast creates realtime.messages once it reached the database; then add a policy.
    for (let i = 0; sql("SELECT to_regprocedure('realtime.topic()') IS NOT NULL") !== 't'; i++) {
      if (i > 300) throw new Error('realtime.messages was not created')
      await sleep(50)
    }
    sql(`CREATE POLICY sb_room_of_user ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() = 'sb-room-of-' || (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))`)
  })
  after(() => srv?.stop())

  const user = (sub) => token({ role: 'authenticated', sub })

  /** A channel listening to every change of sb_notes; resolves once "Subscribed to PostgreSQL". */
  async function notesChannel(c, name = topic('sb-pg')) {
    // The join must carry the user's token (subscribe() does not wait for the callback).
    await c.realtime.setAuth()
    const ch = c.channel(name)
    const changes = new Log(`changes at ${name}`)
    const system = new Log(`system of ${name}`)
    ch.on('postgres_changes', { event: '*', schema: 'public', table: 'sb_notes' }, (p) => changes.push(p))
    ch.on('system', {}, (p) => system.push(p))
    await subscribed(ch)
    const [s] = await system.wait(() => true, { label: 'a system message' })
    assert.equal(s.message, 'Subscribed to PostgreSQL', JSON.stringify(s))
    return { ch, changes }
  }

  it('each user gets only the rows its policy shows; anon gets none', async (t) => {
    const alice = supabase(t, srv, { accessToken: async () => user('alice') })
    const bob = supabase(t, srv, { accessToken: async () => user('bob') })
    const anon = supabase(t, srv)
    await withTranscript([alice, bob, anon], async () => {
      const la = await notesChannel(alice)
      const lb = await notesChannel(bob)
      const ln = await notesChannel(anon)
      sql(`INSERT INTO sb_notes (owner, body) VALUES ('alice', 'a1'), ('bob', 'b1'), ('alice', 'a2');
           UPDATE sb_notes SET body = 'b1!' WHERE body = 'b1';`)
      const ga = await la.changes.wait(() => true, { count: 2 })
      assert.deepEqual(
        ga.map((p) => [p.eventType, p.new.owner, p.new.body]),
        [
          ['INSERT', 'alice', 'a1'],
          ['INSERT', 'alice', 'a2'],
        ]
      )
      const p = ga[0]
      assert.deepEqual([p.schema, p.table, p.errors], ['public', 'sb_notes', null])
      assert.deepEqual(p.old, {})
      assert.equal(typeof p.new.id, 'number')
      assert.match(p.commit_timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d/)
      const gb = await lb.changes.wait(() => true, { count: 2 })
      assert.deepEqual(
        gb.map((x) => [x.eventType, x.new.body]),
        [
          ['INSERT', 'b1'],
          ['UPDATE', 'b1!'],
        ]
      )
      assert.deepEqual(Object.keys(gb[1].old), ['id'])
      await sleep(300)
      assert.equal(la.changes.items.length, 2)
      assert.equal(lb.changes.items.length, 2)
      assert.equal(ln.changes.items.length, 0, JSON.stringify(ln.changes.items))
    })
  })

  it('realtime.setAuth switches the identity of a joined channel', async (t) => {
    let current = user('carol')
    const c = supabase(t, srv, { accessToken: async () => current })
    await withTranscript([c], async () => {
      const { ch, changes } = await notesChannel(c)
      sql(`INSERT INTO sb_notes (owner, body) VALUES ('dave', 'd0'), ('carol', 'c1')`)
      const [first] = await changes.wait()
      assert.equal(first.new.body, 'c1')

      current = user('dave')
      await c.realtime.setAuth(current)
      const [push] = await c.tap.frames.wait((f) => f.dir === 'out' && frameEvent(f.frame) === 'access_token')
      assert.deepEqual(push.frame[4], { access_token: current })
      assert.equal(push.frame[2], ch.topic)
      // The new identity applies once the server has taken the token: wait for a row of dave's.
      let n = 0
      await until(
        () => {
          if (changes.items.some((x) => x.new.owner === 'dave')) return true
          if (n++ % 20 === 0) sql(`INSERT INTO sb_notes (owner, body) VALUES ('dave', 'probe')`)
          return false
        },
        { label: "a row of dave's after setAuth", describe: () => JSON.stringify(changes.items) }
      )
      const seen = changes.items.length
      sql(`INSERT INTO sb_notes (owner, body) VALUES ('carol', 'c2'), ('dave', 'd2')`)
      await changes.wait((x) => x.new.body === 'd2')
      await sleep(300)
      assert.deepEqual(
        changes.items
          .slice(seen)
          .map((x) => x.new.body)
          .filter((b) => b !== 'probe'),
        ['d2'],
        'carol no longer sees her rows after setAuth(dave)'
      )
    })
  })

  it('private channel under a realtime.messages policy: setAuth to a user without access closes it', async (t) => {
    let current = user('erin')
    const c = supabase(t, srv, { accessToken: async () => current })
    const name = `sb-room-of-erin`
    await withTranscript([c], async () => {
      await c.realtime.setAuth()
      const ch = c.channel(name, { config: { private: true } })
      const system = new Log(`system of ${name}`)
      ch.on('system', {}, (p) => system.push(p))
      const statuses = track(ch)
      await subscribed(ch)
      // Another user's room is refused.
      const other = c.channel('sb-room-of-frank', { config: { private: true } })
      const [no] = await track(other).wait((s) => s.status !== 'CLOSED', { label: 'refusal' })
      assert.equal(no.status, 'CHANNEL_ERROR')
      assert.match(no.err, /Unauthorized/)
      await c.removeChannel(other)

      current = user('frank')
      await c.realtime.setAuth(current)
      const [sys] = await system.wait((p) => p.status === 'error', { label: 'a system error' })
      assert.match(sys.message, /no longer have permission/)
      await statuses.wait((s) => s.status === 'CLOSED', { label: 'CLOSED after the revocation' })
    })
  })
})
