// Authentication and authorization with a secret-configured server (`--jwt-secret`): connect-time
// apikey, private channels (`role: service_role` or a `topics` claim of glob patterns), the
// client's own `access_token` / `setAuth` / `accessToken` paths, token expiry, and REST auth.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  Server,
  Log,
  makeClient,
  subscribed,
  track,
  collect,
  topic,
  framesOf,
  jwt,
  nowSecs,
  arrayBuffer,
  sleep,
  byEvent,
} from './helpers.mjs'

const SECRET = 'interop-test-secret-0123456789abcdef'
const HOUR = 3600
const token = (claims) => jwt(SECRET, { exp: nowSecs() + HOUR, ...claims })
const ANON = token({ role: 'anon' })
const USER = token({ role: 'authenticated', sub: 'u1' })
const ROOMS = token({ role: 'authenticated', sub: 'u2', topics: ['room-*'] })
const SERVICE = token({ role: 'service_role' })

let srv
before(async () => {
  srv = await new Server({ args: ['--jwt-secret', SECRET] }).start()
})
after(() => srv.stop())

const client = (t, apikey, opts = {}) => makeClient(srv, { apikey, after: t.after.bind(t), ...opts })

/** Subscribes and waits for the first CHANNEL_ERROR; returns its message. */
async function channelError(ch) {
  const log = ch.statuses ?? track(ch)
  const [hit] = await log.wait((s) => s.status !== 'CLOSED', { timeoutMs: 10000, label: 'CHANNEL_ERROR' })
  assert.equal(hit.status, 'CHANNEL_ERROR', `expected CHANNEL_ERROR, got ${JSON.stringify(hit)}`)
  return hit.err
}

/** Records `system` events of a channel. */
function systemLog(ch) {
  const log = new Log(`system ${ch.topic}`)
  ch.on('system', {}, (p) => log.push(p))
  return log
}

/** Waits until the server closed `ch` (system error + phx_close): CLOSED, no automatic rejoin. */
async function closedByServer(c, ch, system, messageRe) {
  const [sys] = await system.wait((p) => p.status === 'error', { timeoutMs: 8000 })
  assert.equal(sys.extension, 'system')
  assert.match(sys.message, messageRe)
  await ch.statuses.wait((s) => s.status === 'CLOSED', { timeoutMs: 5000 })
  assert.equal(ch.state, 'closed')
  const joins = () => framesOf(c.tap, 'out', ch.topic).filter((f) => f[3] === 'phx_join').length
  const before = joins()
  await sleep(1500) // the client's rejoin timer would fire after 1 s; it must not (phx_close)
  assert.equal(joins(), before, 'no automatic rejoin after phx_close')
  const inFrames = framesOf(c.tap, 'in', ch.topic)
  const close = inFrames.find((f) => f[3] === 'phx_close')
  assert.ok(close, 'phx_close received')
  assert.equal(close[1], close[0], 'phx_close has ref == join_ref')
  assert.ok(
    inFrames.indexOf(inFrames.find((f) => f[3] === 'system' && f[4].status === 'error')) <
      inFrames.indexOf(close),
    'system error before phx_close'
  )
}

describe('auth', { concurrency: true }, () => {
  it('a valid token as apikey connects, joins, and broadcasts', async (t) => {
    const a = client(t, USER)
    const b = client(t, ANON)
    const name = topic('valid')
    const chA = a.channel(name)
    const chB = b.channel(name)
    const got = collect(chB)
    await Promise.all([subscribed(chA), subscribed(chB)])
    assert.ok(a.tap.opens.items[0].url.includes(`apikey=${USER}`))
    await chA.send({ type: 'broadcast', event: 'e', payload: { ok: 1 } })
    await got.wait(() => true, { timeoutMs: 5000 })
  })

  it('bad apikeys cannot connect: upgrade refused, the client keeps retrying, never SUBSCRIBED', async (t) => {
    const bad = {
      garbage: 'not-a-jwt',
      wrongSecret: jwt('some-other-secret', { role: 'anon', exp: nowSecs() + HOUR }),
      expired: jwt(SECRET, { role: 'anon', exp: nowSecs() - 10 }),
      noRole: jwt(SECRET, { sub: 'x', exp: nowSecs() + HOUR }),
    }
    const clients = Object.entries(bad).map(([kind, key]) => {
      const c = client(t, key)
      const ch = c.channel(topic(`bad-${kind}`))
      track(ch)
      return { kind, c, ch }
    })
    // Attempts at t=0, +1 s and +3 s (backoff 1 s, 2 s): wait for the third to fail.
    await Promise.all(
      clients.map(({ c }) => c.tap.closes.wait(() => true, { count: 3, timeoutMs: 8000 }))
    )
    for (const { kind, c, ch } of clients) {
      assert.equal(c.tap.opens.items.length, 0, `${kind}: no socket opened`)
      assert.ok(c.tap.attempts >= 3, `${kind}: retried (${c.tap.attempts} attempts)`)
      assert.ok(
        c.tap.errors.some((e) => /401/.test(e)),
        `${kind}: upgrade answered 401: ${JSON.stringify(c.tap.errors)}`
      )
      assert.ok(!ch.statuses.items.some((s) => s.status === 'SUBSCRIBED'), `${kind}: never SUBSCRIBED`)
      assert.equal(c.isConnected(), false)
    }
  })

  it('private channel: no topics claim → CHANNEL_ERROR Unauthorized; topics glob / service_role → SUBSCRIBED', async (t) => {
    const user = client(t, USER)
    const rooms = client(t, ROOMS)
    const service = client(t, SERVICE)
    const anonPublic = client(t, ANON)
    const unauth = user.channel(topic('room'), { config: { private: true } })
    const err = await channelError(unauth)
    assert.match(err, /Unauthorized/)
    assert.ok(!unauth.statuses.items.some((s) => s.status === 'SUBSCRIBED'))

    const allowed = rooms.channel(topic('room'), { config: { private: true } })
    const denied = rooms.channel(topic('lobby'), { config: { private: true } })
    const svc = service.channel(topic('anything'), { config: { private: true } })
    const pub = anonPublic.channel(topic('lobby'))
    await Promise.all([subscribed(allowed), subscribed(svc), subscribed(pub)])
    assert.match(await channelError(denied), /Unauthorized/)
    await user.removeChannel(unauth)
    await rooms.removeChannel(denied)
  })

  it('setAuth(token) before subscribe: the join carries access_token and authorizes the private join', async (t) => {
    const c = client(t, ANON)
    await c.setAuth(ROOMS)
    const name = topic('room')
    const ch = c.channel(name, { config: { private: true } })
    await subscribed(ch)
    const join = framesOf(c.tap, 'out', ch.topic).find((f) => f[3] === 'phx_join')
    assert.equal(join[4].access_token, ROOMS)

    // setAuth after the channel exists but before it joins also lands in the join payload.
    const c2 = client(t, ANON)
    const ch2 = c2.channel(topic('room'), { config: { private: true } })
    await c2.setAuth(SERVICE)
    await subscribed(ch2)
    assert.equal(framesOf(c2.tap, 'out', ch2.topic).find((f) => f[3] === 'phx_join')[4].access_token, SERVICE)
  })

  it('setAuth(invalid) before subscribe: the join is refused with the JWT error', async (t) => {
    const c = client(t, ANON)
    await c.setAuth(jwt('wrong-secret', { role: 'authenticated', exp: nowSecs() + HOUR }))
    const ch = c.channel(topic('pub'))
    const err = await channelError(ch)
    assert.match(err, /JwtSignatureError|signature/i)
    await c.removeChannel(ch)
  })

  it('accessToken callback: the private join is authorized by the callback token', async (t) => {
    let calls = 0
    const c = client(t, ANON, {
      accessToken: async () => {
        calls++
        return ROOMS
      },
    })
    const ch = c.channel(topic('room'), { config: { private: true } })
    // realtime-js may send the first join before the callback resolved (then the connect token
    // is used and the join fails); its rejoin carries the callback token. Either way: SUBSCRIBED.
    track(ch)
    await ch.statuses.wait((s) => s.status === 'SUBSCRIBED', { timeoutMs: 10000 })
    assert.ok(calls >= 1)
    const joins = framesOf(c.tap, 'out', ch.topic).filter((f) => f[3] === 'phx_join')
    assert.equal(joins.at(-1)[4].access_token, ROOMS)
  })

  it('accessToken callback + await setAuth() before subscribe: the first join carries the callback token', async (t) => {
    let calls = 0
    const c = client(t, ANON, {
      accessToken: async () => {
        calls++
        return ROOMS
      },
    })
    // Resolves the callback now, so the join does not go out with the apikey's claims.
    await c.setAuth()
    assert.equal(calls, 1)
    const ch = c.channel(topic('room'), { config: { private: true } })
    track(ch)
    await subscribed(ch)
    const joins = framesOf(c.tap, 'out', ch.topic).filter((f) => f[3] === 'phx_join')
    assert.equal(joins.length, 1, 'one join, authorized the first time')
    assert.equal(joins[0][4].access_token, ROOMS)
    assert.deepEqual(ch.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
  })

  it('setAuth(new valid token) on a joined channel: access_token pushed, channel stays joined', async (t) => {
    const c = client(t, USER)
    const other = client(t, ANON)
    const name = topic('room')
    const ch = c.channel(name, { config: { private: true } })
    await c.setAuth(ROOMS)
    const got = collect(ch)
    const system = systemLog(ch)
    await subscribed(ch)
    const fresh = token({ role: 'authenticated', sub: 'u2', topics: ['room-*'], n: 2 })
    await c.setAuth(fresh)
    const push = await c.tap.frames.wait((f) => f.dir === 'out' && f.frame[3] === 'access_token', {
      timeoutMs: 5000,
    })
    assert.deepEqual(push[0].frame[4], { access_token: fresh })
    // Still joined: a private broadcast from another authorized client arrives.
    await other.setAuth(SERVICE)
    const sender = other.channel(name, { config: { private: true } })
    await subscribed(sender)
    await sender.send({ type: 'broadcast', event: 'after-refresh', payload: {} })
    await got.wait((m) => m.event === 'after-refresh', { timeoutMs: 5000 })
    assert.equal(ch.state, 'joined')
    assert.deepEqual(system.items, [])
    assert.deepEqual(ch.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
  })

  it('setAuth(expired token) on a joined channel → system error + phx_close → CLOSED', async (t) => {
    const c = client(t, USER)
    const ch = c.channel(topic('pub'))
    const system = systemLog(ch)
    await subscribed(ch)
    await c.setAuth(jwt(SECRET, { role: 'authenticated', exp: nowSecs() - 5 }))
    await closedByServer(c, ch, system, /expired/i)
  })

  it('setAuth(badly signed token) on a joined channel → system error + phx_close → CLOSED', async (t) => {
    const c = client(t, USER)
    const ch = c.channel(topic('pub'))
    const system = systemLog(ch)
    await subscribed(ch)
    await c.setAuth(jwt('wrong-secret', { role: 'authenticated', exp: nowSecs() + HOUR }))
    await closedByServer(c, ch, system, /signature|JWT/i)
  })

  it('setAuth(token without the topic) on a joined private channel → permission revoked, CLOSED', async (t) => {
    const c = client(t, ROOMS)
    const name = topic('room')
    const ch = c.channel(name, { config: { private: true } })
    const system = systemLog(ch)
    await subscribed(ch)
    await c.setAuth(USER)
    await closedByServer(c, ch, system, new RegExp(`no longer have permission.*${name}`))
  })

  it('a token that expires while joined closes the channel at expiry', async (t) => {
    const c = client(t, USER)
    const ch = c.channel(topic('pub'))
    await c.setAuth(jwt(SECRET, { role: 'authenticated', exp: nowSecs() + 2 }))
    const system = systemLog(ch)
    await subscribed(ch)
    const join = framesOf(c.tap, 'out', ch.topic).find((f) => f[3] === 'phx_join')
    assert.ok(join[4].access_token)
    await closedByServer(c, ch, system, /expired/i)
  })

  it('REST: the token authorizes httpSend/send(); bad tokens and unauthorized private topics are refused', async (t) => {
    const name = topic('room')
    const rx = client(t, SERVICE)
    const rxPub = rx.channel(name)
    const rxPriv = client(t, SERVICE).channel(name, { config: { private: true } })
    const gotPub = collect(rxPub)
    const gotPriv = collect(rxPriv)
    await Promise.all([subscribed(rxPub), subscribed(rxPriv)])

    const user = client(t, USER)
    assert.deepEqual(await user.channel(name).httpSend('pub', { n: 1 }), { success: true })
    const warn = console.warn
    console.warn = () => {}
    try {
      assert.equal(await user.channel(name).send({ type: 'broadcast', event: 'pub2', payload: {} }), 'ok')
      const bad = client(t, 'not-a-jwt')
      assert.equal(await bad.channel(name).send({ type: 'broadcast', event: 'nope', payload: {} }), 'error')
      await assert.rejects(bad.channel(`${name}-x`).httpSend('nope', {}), /unauthori[sz]ed|401|invalid|JWT/i)
    } finally {
      console.warn = warn
    }

    // Private: the user token has no topics claim → refused; setAuth(ROOMS) sends a Bearer token that has.
    const userPriv = client(t, USER)
    const chUserPriv = userPriv.channel(name, { config: { private: true } })
    await assert.rejects(chUserPriv.httpSend('denied', {}), /not allowed|forbidden|403|unauthori/i)
    await userPriv.setAuth(ROOMS)
    assert.deepEqual(await chUserPriv.httpSend('allowed', { p: 1 }), { success: true })
    assert.deepEqual(await chUserPriv.httpSend('allowed-bin', arrayBuffer([5])), { success: true })

    // (Order across separate REST requests is checked in rest.test.mjs.)
    const pubMsgs = await gotPub.wait(() => true, { count: 2, timeoutMs: 5000 })
    assert.deepEqual(Object.keys(byEvent(pubMsgs)).sort(), ['pub', 'pub2'])
    const privMsgs = await gotPriv.wait(() => true, { count: 2, timeoutMs: 5000 })
    assert.deepEqual(Object.keys(byEvent(privMsgs)).sort(), ['allowed', 'allowed-bin'])
    await sleep(200)
    assert.equal(gotPub.items.length, 2, 'refused messages were not delivered')
    assert.equal(gotPriv.items.length, 2)
  })
})
