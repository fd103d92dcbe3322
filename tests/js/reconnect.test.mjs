// Automatic reconnect and rejoin by realtime-js itself: after a server restart on the same port
// (SIGTERM: close 1001), and after the server closes an idle socket (close 1000).

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import {
  Server,
  makeClient,
  track,
  subscribed,
  collect,
  topic,
  framesOf,
  jwt,
  nowSecs,
  withTranscript,
} from './helpers.mjs'

const joinsOf = (c, wire) => framesOf(c.tap, 'out', wire).filter((f) => (f[3] ?? f.event) === 'phx_join')

describe('reconnect', { concurrency: true }, () => {
  it('server restart on the same port: clients reconnect, rejoin with new join_refs, receive again', async (t) => {
    const srv = await new Server().start()
    t.after(() => srv.stop())
    const after = t.after.bind(t)
    const name = topic('restart')
    const v2 = makeClient(srv, { after })
    const v1 = makeClient(srv, { vsn: '1.0.0', after })
    const chans = [
      v2.channel(name),
      v2.channel(topic('restart-private'), { config: { private: true, broadcast: { self: true } } }),
      v1.channel(name),
    ]
    const got = chans.map((ch) => collect(ch))
    chans.forEach((ch) => track(ch))
    await Promise.all(chans.map((ch) => subscribed(ch)))
    const port = srv.port

    const { code } = await srv.stop()
    assert.equal(code, 0, 'corecast exits 0 on SIGTERM')
    for (const c of [v2, v1]) {
      const [close] = await c.tap.closes.wait(() => true, { timeoutMs: 5000 })
      assert.equal(close.code, 1001, `close code on shutdown: ${JSON.stringify(close)}`)
    }
    for (const ch of chans) {
      await ch.statuses.wait((s) => s.status === 'CHANNEL_ERROR', { timeoutMs: 5000 })
    }

    await srv.restart()
    assert.equal(srv.port, port)
    // realtime-js retries after 1 s, 2 s, 5 s…: all channels are SUBSCRIBED a second time.
    for (const ch of chans) {
      await ch.statuses.wait((s) => s.status === 'SUBSCRIBED', { count: 2, timeoutMs: 15000 })
      assert.equal(ch.state, 'joined')
    }
    assert.equal(v2.tap.opens.items.length, 2)
    for (const [c, ch] of [
      [v2, chans[0]],
      [v2, chans[1]],
      [v1, chans[2]],
    ]) {
      const joins = joinsOf(c, ch.topic)
      assert.equal(joins.length, 2, `${ch.topic}: joined twice`)
      const jr = (f) => f[0] ?? f.join_ref
      assert.notEqual(jr(joins[0]), jr(joins[1]), 'the rejoin has a new join_ref')
    }

    // New broadcasts reach the rejoined channels.
    const sender = makeClient(srv, { after })
    const chS = sender.channel(name)
    await subscribed(chS)
    await chS.send({ type: 'broadcast', event: 'after-restart', payload: { n: 1 } })
    for (const i of [0, 2]) {
      const [m] = await got[i].wait((x) => x.event === 'after-restart', { timeoutMs: 5000 })
      assert.deepEqual(m.payload, { n: 1 })
    }
    await chans[1].send({ type: 'broadcast', event: 'self', payload: {} })
    await got[1].wait((x) => x.event === 'self', { timeoutMs: 5000 })
  })

  it('with --jwt-secret, the rejoin after a restart carries the setAuth token (private channel)', async (t) => {
    const secret = 'reconnect-secret'
    const srv = await new Server({ args: ['--jwt-secret', secret] }).start()
    t.after(() => srv.stop())
    const exp = nowSecs() + 3600
    const c = makeClient(srv, { apikey: jwt(secret, { role: 'anon', exp }), after: t.after.bind(t) })
    const rooms = jwt(secret, { role: 'authenticated', topics: ['room-*'], exp })
    await c.setAuth(rooms)
    const ch = c.channel(topic('room'), { config: { private: true, broadcast: { self: true } } })
    const got = collect(ch)
    track(ch)
    await subscribed(ch)
    await srv.stop()
    await srv.restart()
    await withTranscript([c], async () => {
      await ch.statuses.wait((s) => s.status === 'SUBSCRIBED', { count: 2, timeoutMs: 15000 })
      const joins = joinsOf(c, ch.topic)
      assert.equal(joins.length, 2)
      assert.equal(joins[1][4].access_token, rooms)
      assert.ok(!ch.statuses.items.some((s) => /Unauthorized/.test(s.err ?? '')), JSON.stringify(ch.statuses.items))
      await ch.send({ type: 'broadcast', event: 'back', payload: {} })
      await got.wait((m) => m.event === 'back', { timeoutMs: 5000 })
    })
  })

  it('server closes an idle socket (1000): the client reconnects and rejoins by itself', async (t) => {
    const srv = await new Server({ args: ['--idle-timeout-secs', '1'] }).start()
    t.after(() => srv.stop())
    // Heartbeats every 25 s (the default): the server's 1 s idle timeout fires first.
    const c = makeClient(srv, { after: t.after.bind(t) })
    const ch = c.channel(topic('idle'))
    track(ch)
    await subscribed(ch)
    const [close] = await c.tap.closes.wait(() => true, { timeoutMs: 5000 })
    assert.equal(close.code, 1000)
    assert.match(close.reason, /idle/i)
    await ch.statuses.wait((s) => s.status === 'SUBSCRIBED', { count: 2, timeoutMs: 10000 })
    assert.ok(c.tap.opens.items.length >= 2)
    assert.equal(joinsOf(c, ch.topic).length >= 2, true)
  })
})
