// Presence with the unmodified realtime-js client (§1.10): `sync`/`join`/`leave` events and
// `presenceState()` across clients pinned to both shards, updates (leave + join with
// `phx_ref_prev`), unchanged tracks, untrack, fixed vs generated presence keys, rejoin after a
// leave, 10 clients tracking at once, a client process killed with SIGKILL, track errors, and a
// vsn 1.0.0 client.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import {
  Server,
  Log,
  makeClient,
  clientOnShard,
  closeClient,
  subscribed,
  topic,
  framesOf,
  frameEvent,
  withTranscript,
  sleep,
  until,
} from './helpers.mjs'

let srv
before(async () => {
  srv = await new Server().start()
})
after(() => srv.stop())

/**
 * A channel on `name` with presence enabled and key `key` ('' lets the server generate one, as
 * realtime-js sends by default). With `listen` (the default) it binds `sync`, `join` and `leave`
 * handlers that record into `ch.pres` (a Log: `{event:'sync', state}` snapshots and the join /
 * leave payloads as realtime-js emits them); without, presence is enabled by
 * `config.presence.enabled` alone.
 */
function presenceChannel(client, name, { key = '', listen = true, ...config } = {}) {
  const ch = client.channel(name, { config: { ...config, presence: { key, enabled: true } } })
  ch.pres = new Log(`presence events of ${name} (key ${JSON.stringify(key)})`)
  if (listen) {
    for (const event of ['sync', 'join', 'leave']) {
      ch.on('presence', { event }, (p) => ch.pres.push(event === 'sync' ? { event, state: ch.presenceState() } : p))
    }
  }
  return ch
}

const byJson = (a, b) => (JSON.stringify(a) < JSON.stringify(b) ? -1 : 1)

/** A presence (realtime-js shape) without its `presence_ref`. */
const strip = ({ presence_ref, ...rest }) => rest

/** `presenceState()` without presence_refs, keys and metas sorted: comparable with deepEqual. */
function plain(state) {
  return Object.fromEntries(
    Object.keys(state)
      .sort()
      .map((k) => [k, state[k].map(strip).sort(byJson)])
  )
}

/** presence_refs by key, in state order. */
function refs(ch) {
  return Object.fromEntries(
    Object.entries(ch.presenceState()).map(([k, metas]) => [k, metas.map((m) => m.presence_ref)])
  )
}

/** Waits until `plain(ch.presenceState())` deep-equals `expected`. */
async function waitPlain(ch, expected, label = '', timeoutMs = 10000) {
  const want = plain(Object.fromEntries(Object.entries(expected).map(([k, v]) => [k, v.map((m) => ({ ...m }))])))
  await until(
    () => {
      try {
        assert.deepEqual(plain(ch.presenceState()), want)
        return true
      } catch {
        return false
      }
    },
    {
      timeoutMs,
      label: `presenceState() of ${ch.topic} ${label} = ${JSON.stringify(want)}`,
      describe: () =>
        `have ${JSON.stringify(ch.presenceState())}; events ${JSON.stringify(ch.pres.items).slice(0, 1500)}`,
    }
  )
}

/** Inbound presence_state / presence_diff frames of `wire` as `{event, join_ref, ref, payload}`. */
function presenceFrames(client, wire) {
  return framesOf(client.tap, 'in', wire)
    .filter((f) => ['presence_state', 'presence_diff'].includes(frameEvent(f)))
    .map((f) =>
      Array.isArray(f)
        ? { event: f[3], join_ref: f[0], ref: f[1], payload: f[4], v: 2 }
        : { event: f.event, join_ref: f.join_ref, ref: f.ref, payload: f.payload, v: 1 }
    )
}

describe('presence', { concurrency: true }, () => {
  it('sync/join/leave events and presenceState() across three clients on both shards', async (t) => {
    const after = t.after.bind(t)
    const name = topic('room')
    const wire = `realtime:${name}`
    const a = await clientOnShard(srv, 0, { after })
    const b = await clientOnShard(srv, 1, { after })
    const c = await clientOnShard(srv, 0, { after })
    await withTranscript([a, b, c], async () => {
      const chA = presenceChannel(a, name, { key: 'alice' })
      await subscribed(chA)
      // An empty channel: presence_state {} right after the join reply, hence a first sync.
      const [sync0] = await chA.pres.wait((e) => e.event === 'sync', { label: 'first sync' })
      assert.deepEqual(sync0.state, {})
      const join = framesOf(a.tap, 'out', wire).find((f) => f[3] === 'phx_join')
      assert.deepEqual(join[4].config.presence, { key: 'alice', enabled: true })
      const inA = framesOf(a.tap, 'in', wire)
      assert.equal(inA[0][3], 'phx_reply', 'the join reply comes first')
      assert.equal(inA[0][1], join[1])
      assert.deepEqual(inA[1], [join[0], null, wire, 'presence_state', {}], 'then presence_state with the join_ref')

      // The tracker itself gets the diff: a join event for its own key.
      assert.equal(await chA.track({ name: 'alice', n: 1 }), 'ok')
      const [joinA] = await chA.pres.wait((e) => e.event === 'join', { label: "alice's own join" })
      assert.equal(joinA.key, 'alice')
      assert.deepEqual(joinA.currentPresences, [])
      assert.equal(joinA.newPresences.length, 1)
      assert.deepEqual(strip(joinA.newPresences[0]), { name: 'alice', n: 1 })
      assert.equal(typeof joinA.newPresences[0].presence_ref, 'string')
      assert.ok(joinA.newPresences[0].presence_ref.length > 0)
      await waitPlain(chA, { alice: [{ name: 'alice', n: 1 }] })

      // B (other shard) listens with a binding; C only with config.presence.enabled (no binding).
      const chB = presenceChannel(b, name, { key: 'bob' })
      const chC = presenceChannel(c, name, { key: 'carol', listen: false })
      await Promise.all([subscribed(chB), subscribed(chC)])
      assert.equal(await chB.track({ name: 'bob' }), 'ok')
      const both = { alice: [{ name: 'alice', n: 1 }], bob: [{ name: 'bob' }] }
      for (const ch of [chA, chB, chC]) await waitPlain(ch, both)
      // A meta has the same presence_ref everywhere (phx_ref is the server's), unique per meta.
      assert.deepEqual(refs(chB), refs(chA))
      assert.deepEqual(refs(chC), refs(chA))
      assert.notEqual(refs(chA).alice[0], refs(chA).bob[0])
      await chA.pres.wait((e) => e.event === 'join' && e.key === 'bob', { label: 'A: join bob' })
      const [bSeesAlice] = await chB.pres.wait((e) => e.event === 'join' && e.key === 'alice', {
        label: 'B: join alice',
      })
      assert.deepEqual(bSeesAlice.newPresences.map(strip), [{ name: 'alice', n: 1 }])
      await chB.pres.wait((e) => e.event === 'join' && e.key === 'bob', { label: 'B: its own join' })
      assert.equal(chA.pres.filter((e) => e.event === 'leave').length, 0)
      // C never tracked: only the trackers are present; its presence_state/diffs are vsn 2 arrays.
      assert.ok(presenceFrames(c, wire).some((f) => f.event === 'presence_state' && f.v === 2))

      // B leaves the channel: A and C see bob leave.
      assert.equal(await chB.unsubscribe(), 'ok')
      const alone = { alice: [{ name: 'alice', n: 1 }] }
      await waitPlain(chA, alone, 'after bob left')
      await waitPlain(chC, alone, 'after bob left')
      const [leaveB] = await chA.pres.wait((e) => e.event === 'leave' && e.key === 'bob', { label: 'A: leave bob' })
      assert.deepEqual(leaveB.leftPresences.map(strip), [{ name: 'bob' }])
      assert.deepEqual(leaveB.currentPresences, [])
      // The leave went out as a presence_diff with leaves.bob and no joins.
      const leaveDiff = presenceFrames(c, wire).find((f) => f.event === 'presence_diff' && f.payload.leaves?.bob)
      assert.ok(leaveDiff, 'C got a presence_diff leaving bob')
      assert.deepEqual(leaveDiff.payload.joins, {})
      assert.equal(leaveDiff.payload.leaves.bob.metas.length, 1)
      assert.equal(leaveDiff.payload.leaves.bob.metas[0].name, 'bob')

      // A closes its socket cleanly (disconnect): C sees alice go.
      await closeClient(a)
      await waitPlain(chC, {}, 'after A disconnected')
    })
  })

  it('track update = leave + join (phx_ref_prev), presence_ref changes; unchanged track is a no-op; untrack', async (t) => {
    const after = t.after.bind(t)
    const name = topic('update')
    const wire = `realtime:${name}`
    const a = await clientOnShard(srv, 1, { after })
    const b = await clientOnShard(srv, 0, { after })
    await withTranscript([a, b], async () => {
      const chA = presenceChannel(a, name, { key: 'alice' })
      const chB = presenceChannel(b, name, { key: 'bob' })
      await Promise.all([subscribed(chA), subscribed(chB)])
      assert.equal(await chA.track({ status: 'online' }), 'ok')
      await waitPlain(chB, { alice: [{ status: 'online' }] })
      const ref1 = refs(chB).alice[0]
      const mark = chB.pres.items.length

      // Update: both clients end with the new meta under a new presence_ref.
      assert.equal(await chA.track({ status: 'away' }), 'ok')
      for (const ch of [chA, chB]) await waitPlain(ch, { alice: [{ status: 'away' }] }, 'after the update')
      const ref2 = refs(chB).alice[0]
      assert.notEqual(ref2, ref1, 'an update gets a new presence_ref')
      assert.deepEqual(refs(chA), refs(chB))
      // realtime-js events: join (new meta) then leave (old meta) for the same key.
      const evs = chB.pres.items.slice(mark).filter((e) => e.event !== 'sync')
      assert.deepEqual(
        evs.map((e) => [e.event, e.key]),
        [
          ['join', 'alice'],
          ['leave', 'alice'],
        ],
        JSON.stringify(evs)
      )
      assert.deepEqual(evs[0].newPresences, [{ status: 'away', presence_ref: ref2 }])
      assert.deepEqual(evs[0].currentPresences, [{ status: 'online', presence_ref: ref1 }])
      assert.deepEqual(evs[1].leftPresences, [{ status: 'online', presence_ref: ref1 }])
      assert.deepEqual(evs[1].currentPresences, [{ status: 'away', presence_ref: ref2 }])
      // Wire: one presence_diff with the leave of the old meta and the join carrying phx_ref_prev.
      const upd = presenceFrames(b, wire).filter((f) => f.event === 'presence_diff' && f.payload.leaves?.alice)
      assert.equal(upd.length, 1, JSON.stringify(upd))
      assert.deepEqual(upd[0].payload, {
        joins: { alice: { metas: [{ status: 'away', phx_ref: ref2, phx_ref_prev: ref1 }] } },
        leaves: { alice: { metas: [{ status: 'online', phx_ref: ref1 }] } },
      })
      assert.equal(upd[0].join_ref, null, 'diffs carry a null join_ref')

      // An unchanged track: ok, and no diff about alice. B's own later track is coalesced by the
      // owner after it, so a diff for it would have arrived by the time bob shows up.
      const aliceDiffs = () =>
        presenceFrames(b, wire).filter(
          (f) => f.event === 'presence_diff' && (f.payload.joins.alice || f.payload.leaves.alice)
        )
      const before = aliceDiffs().length
      assert.equal(await chA.track({ status: 'away' }), 'ok')
      assert.equal(await chB.track({ status: 'watching' }), 'ok')
      const two = { alice: [{ status: 'away' }], bob: [{ status: 'watching' }] }
      for (const ch of [chA, chB]) await waitPlain(ch, two, 'after the no-op track')
      assert.equal(aliceDiffs().length, before, 'an unchanged track sends no diff')
      assert.equal(refs(chB).alice[0], ref2, 'and keeps the presence_ref')

      // Untrack: a leave for everyone; A stays subscribed and still receives presence.
      const mark2 = chB.pres.items.length
      assert.equal(await chA.untrack(), 'ok')
      for (const ch of [chA, chB]) await waitPlain(ch, { bob: [{ status: 'watching' }] }, 'after untrack')
      const left = chB.pres.items.slice(mark2).filter((e) => e.event !== 'sync')
      assert.deepEqual(
        left.map((e) => [e.event, e.key]),
        [['leave', 'alice']]
      )
      assert.deepEqual(left[0].leftPresences, [{ status: 'away', presence_ref: ref2 }])
      assert.equal(chA.state, 'joined')
      assert.equal(await chB.track({ status: 'typing' }), 'ok')
      await waitPlain(chA, { bob: [{ status: 'typing' }] }, 'A still receives diffs after its untrack')
      // Tracking again after untrack: a fresh join with a fresh ref.
      assert.equal(await chA.track({ status: 'back' }), 'ok')
      const back = { alice: [{ status: 'back' }], bob: [{ status: 'typing' }] }
      for (const ch of [chA, chB]) await waitPlain(ch, back, 'after tracking again')
      assert.ok(![ref1, ref2].includes(refs(chB).alice[0]))
    })
  })

  it('presence.key set vs generated: fixed key kept, generated keys distinct, one key from two sockets = two metas', async (t) => {
    const after = t.after.bind(t)
    const name = topic('keys')
    const clients = await Promise.all([0, 1, 0, 1, 0].map((s) => clientOnShard(srv, s, { after })))
    await withTranscript(clients, async () => {
      const [s1, s2, g1, g2, obs] = clients
      const chS1 = presenceChannel(s1, name, { key: 'shared' })
      const chS2 = presenceChannel(s2, name, { key: 'shared' })
      const chG1 = presenceChannel(g1, name) // key '' (realtime-js default): generated by the server
      const chG2 = presenceChannel(g2, name)
      const chObs = presenceChannel(obs, name, { key: 'observer' })
      const chans = [chS1, chS2, chG1, chG2, chObs]
      await Promise.all(chans.map((ch) => subscribed(ch)))
      assert.deepEqual(framesOf(g1.tap, 'out', chG1.topic).find((f) => f[3] === 'phx_join')[4].config.presence, {
        key: '',
        enabled: true,
      })
      const results = await Promise.all([chS1, chS2, chG1, chG2].map((ch, i) => ch.track({ i })))
      assert.deepEqual(results, ['ok', 'ok', 'ok', 'ok'])
      const state = await until(
        () => {
          const s = chObs.presenceState()
          return Object.keys(s).length === 3 && s.shared?.length === 2 ? s : null
        },
        { label: '3 keys, shared with 2 metas', describe: () => JSON.stringify(chObs.presenceState()) }
      )
      assert.deepEqual(state.shared.map(strip).sort(byJson), [{ i: 0 }, { i: 1 }])
      assert.notEqual(state.shared[0].presence_ref, state.shared[1].presence_ref, 'one ref per meta')
      const generated = Object.keys(state).filter((k) => k !== 'shared')
      assert.equal(generated.length, 2, 'the two generated keys are distinct')
      for (const k of generated) {
        assert.ok(k.length > 0 && k !== 'observer', `generated key ${JSON.stringify(k)}`)
        assert.equal(state[k].length, 1)
      }
      assert.deepEqual(generated.map((k) => state[k][0].i).sort(), [2, 3])
      // Every client converges on the same state.
      for (const ch of chans) await waitPlain(ch, plain(state))

      // One of the two sockets with the shared key leaves: the key stays with one meta.
      const mark = chObs.pres.items.length
      assert.equal(await chS2.unsubscribe(), 'ok')
      const rest = plain(state)
      rest.shared = [{ i: 0 }]
      await waitPlain(chObs, rest, 'after one shared meta left')
      const [leave] = await chObs.pres.wait((e, i) => e.event === 'leave', {
        label: 'leave of one shared meta',
      })
      assert.equal(leave.key, 'shared')
      assert.deepEqual(leave.leftPresences.map(strip), [{ i: 1 }])
      assert.deepEqual(leave.currentPresences.map(strip), [{ i: 0 }])
      assert.ok(chObs.pres.items.indexOf(leave) >= mark)
    })
  })

  it('rejoin after leave: the new channel gets presence_state with the others and can track again', async (t) => {
    const after = t.after.bind(t)
    const name = topic('rejoin')
    const a = await clientOnShard(srv, 0, { after })
    const b = await clientOnShard(srv, 1, { after })
    await withTranscript([a, b], async () => {
      const chB = presenceChannel(b, name, { key: 'bob' })
      const chA1 = presenceChannel(a, name, { key: 'alice' })
      await Promise.all([subscribed(chA1), subscribed(chB)])
      assert.equal(await chB.track({ who: 'bob' }), 'ok')
      assert.equal(await chA1.track({ v: 1 }), 'ok')
      const full = { alice: [{ v: 1 }], bob: [{ who: 'bob' }] }
      await waitPlain(chB, full)
      const oldRef = refs(chB).alice[0]

      assert.equal(await a.removeChannel(chA1), 'ok')
      await waitPlain(chB, { bob: [{ who: 'bob' }] }, 'after alice left')
      await chB.pres.wait((e) => e.event === 'leave' && e.key === 'alice', { label: 'leave alice' })

      const chA2 = presenceChannel(a, name, { key: 'alice' })
      assert.notEqual(chA2, chA1)
      await subscribed(chA2)
      // Its presence_state already holds bob, and no trace of its old meta.
      const [sync] = await chA2.pres.wait((e) => e.event === 'sync', { label: 'sync after rejoin' })
      assert.deepEqual(plain(sync.state), { bob: [{ who: 'bob' }] })
      await chA2.pres.wait((e) => e.event === 'join' && e.key === 'bob', { label: 'join bob from presence_state' })
      assert.equal(await chA2.track({ v: 2 }), 'ok')
      const again = { alice: [{ v: 2 }], bob: [{ who: 'bob' }] }
      for (const ch of [chA2, chB]) await waitPlain(ch, again, 'after tracking on the new channel')
      assert.notEqual(refs(chB).alice[0], oldRef)
      assert.deepEqual(refs(chA2), refs(chB))
    })
  })

  it('10 clients tracking at once end with the same presenceState() everywhere', async (t) => {
    const after = t.after.bind(t)
    const name = topic('crowd')
    const n = 10
    const clients = await Promise.all(Array.from({ length: n }, (_, i) => clientOnShard(srv, i % 2, { after })))
    await withTranscript(clients, async () => {
      const chans = clients.map((c, i) => presenceChannel(c, name, { key: `user-${i}` }))
      await Promise.all(chans.map((ch) => subscribed(ch)))
      const results = await Promise.all(chans.map((ch, i) => ch.track({ i, color: `hsl(${i * 36}, 80%, 50%)` })))
      assert.deepEqual(results, Array(n).fill('ok'))
      const expected = Object.fromEntries(
        Array.from({ length: n }, (_, i) => [`user-${i}`, [{ i, color: `hsl(${i * 36}, 80%, 50%)` }]])
      )
      for (const ch of chans) await waitPlain(ch, expected, 'with all 10 members', 15000)
      const r0 = refs(chans[0])
      for (const ch of chans) assert.deepEqual(refs(ch), r0, 'the same presence_refs everywhere')
      assert.equal(new Set(Object.values(r0).flat()).size, n, 'distinct presence_refs')
      for (const ch of chans) {
        const joined = new Set(ch.pres.filter((e) => e.event === 'join').map((e) => e.key))
        assert.equal(joined.size, n, `${n} keys joined: ${[...joined]}`)
        assert.deepEqual(
          ch.pres.filter((e) => e.event === 'leave'),
          [],
          'nobody left'
        )
      }
    })
  })

  it('a client process killed with SIGKILL disappears from the others within a few seconds (leave)', async (t) => {
    const after = t.after.bind(t)
    const name = topic('killed')
    const observers = [await clientOnShard(srv, 0, { after }), await clientOnShard(srv, 1, { after })]
    const chans = observers.map((c, i) => presenceChannel(c, name, { key: `observer-${i}` }))
    await Promise.all(chans.map((ch) => subscribed(ch)))
    assert.equal(await chans[0].track({ watching: true }), 'ok')

    const script = fileURLToPath(new URL('./presence-child.mjs', import.meta.url))
    const child = spawn(process.execPath, [script, srv.endpoint(), name, 'doomed'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
    t.after(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    })
    let out = ''
    child.stdout.setEncoding('utf8')
    child.stderr.setEncoding('utf8')
    const lines = new Log('child output')
    child.stdout.on('data', (d) => {
      out += d
      for (const l of d.split('\n').filter(Boolean)) lines.push(l)
    })
    child.stderr.on('data', (d) => (out += d))
    await withTranscript(observers, async () => {
      const [tracked] = await lines.wait((l) => l.startsWith('tracked'), { timeoutMs: 15000, label: 'child tracked' })
      assert.equal(tracked, 'tracked ok', out)
      const withChild = { doomed: [{ pid: child.pid, via: 'child' }], 'observer-0': [{ watching: true }] }
      for (const ch of chans) await waitPlain(ch, withChild, 'with the child')

      const t0 = Date.now()
      process.kill(child.pid, 'SIGKILL')
      assert.deepEqual(await exited, { code: null, signal: 'SIGKILL' })
      for (const ch of chans) {
        const [leave] = await ch.pres.wait((e) => e.event === 'leave' && e.key === 'doomed', {
          timeoutMs: 5000,
          label: 'leave of the killed process',
        })
        assert.deepEqual(leave.leftPresences.map(strip), [{ pid: child.pid, via: 'child' }])
        await waitPlain(ch, { 'observer-0': [{ watching: true }] }, 'after the kill')
      }
      const ms = Date.now() - t0
      assert.ok(ms < 5000, `leave seen ${ms} ms after SIGKILL`)
    })
  })

  it('track errors: a non-object payload, then the per-socket rate limit (--presence-calls-per-30s 3)', async (t) => {
    const limited = await new Server({ args: ['--presence-calls-per-30s', '3'] }).start()
    t.after(() => limited.stop())
    const after = t.after.bind(t)
    const name = topic('errors')
    const wire = `realtime:${name}`
    const a = makeClient(limited, { after })
    const obs = makeClient(limited, { after })
    await withTranscript([a, obs], async () => {
      const chA = presenceChannel(a, name, { key: 'alice' })
      const chObs = presenceChannel(obs, name, { key: 'observer' })
      await Promise.all([subscribed(chA), subscribed(chObs)])
      const replyTo = (push) => framesOf(a.tap, 'in', wire).find((f) => f[3] === 'phx_reply' && f[1] === push[1])?.[4]

      // 1: not a map.
      assert.equal(await chA.track('just a string'), 'error')
      const bad = framesOf(a.tap, 'out', wire)
        .filter((f) => f[3] === 'presence')
        .at(-1)
      assert.equal(replyTo(bad).status, 'error')
      assert.match(JSON.stringify(replyTo(bad).response), /Presence track payload must be a map/)
      // 2, 3: fine.
      assert.equal(await chA.track({ n: 2 }), 'ok')
      assert.equal(await chA.track({ n: 3 }), 'ok')
      await waitPlain(chObs, { alice: [{ n: 3 }] })
      // 4: over the limit, refused with a reason; the channel stays joined, the state unchanged.
      assert.equal(await chA.track({ n: 4 }), 'error')
      const limitedPush = framesOf(a.tap, 'out', wire)
        .filter((f) => f[3] === 'presence')
        .at(-1)
      assert.match(JSON.stringify(replyTo(limitedPush)), /PresenceRateLimitReached/)
      assert.equal(chA.state, 'joined')
      await sleep(200)
      assert.deepEqual(plain(chObs.presenceState()), { alice: [{ n: 3 }] })
    })
  })

  it('vsn 1.0.0 client: JSON object frames, tracks and sees a vsn 2 client, update and untrack', async (t) => {
    const after = t.after.bind(t)
    const name = topic('v1')
    const wire = `realtime:${name}`
    const v1 = makeClient(srv, { vsn: '1.0.0', after })
    const v2 = await clientOnShard(srv, 1, { after })
    await withTranscript([v1, v2], async () => {
      const ch1 = presenceChannel(v1, name, { key: 'old' })
      await subscribed(ch1)
      const [sync0] = await ch1.pres.wait((e) => e.event === 'sync', { label: 'first sync (vsn 1)' })
      assert.deepEqual(sync0.state, {})
      const ch2 = presenceChannel(v2, name, { key: 'new' })
      await subscribed(ch2)
      assert.equal(await ch1.track({ client: 'v1' }), 'ok')
      assert.equal(await ch2.track({ client: 'v2' }), 'ok')
      const both = { new: [{ client: 'v2' }], old: [{ client: 'v1' }] }
      for (const ch of [ch1, ch2]) await waitPlain(ch, both)
      assert.deepEqual(refs(ch1), refs(ch2))

      assert.equal(await ch1.track({ client: 'v1', status: 'away' }), 'ok')
      const updated = { new: [{ client: 'v2' }], old: [{ client: 'v1', status: 'away' }] }
      for (const ch of [ch1, ch2]) await waitPlain(ch, updated, 'after the vsn 1 update')
      assert.equal(await ch1.untrack(), 'ok')
      for (const ch of [ch1, ch2]) await waitPlain(ch, { new: [{ client: 'v2' }] }, 'after the vsn 1 untrack')
      await ch2.pres.wait((e) => e.event === 'leave' && e.key === 'old', { label: 'leave old' })

      // vsn 1 wire: JSON objects only, presence_state/presence_diff with ref null.
      assert.ok(
        v1.tap.frames.items.every((f) => !f.binary),
        'no binary frames with vsn 1.0.0'
      )
      const pf = presenceFrames(v1, wire)
      assert.ok(pf.length >= 4, JSON.stringify(pf))
      for (const f of pf) {
        assert.equal(f.v, 1)
        assert.equal(f.ref, null)
      }
      assert.equal(pf[0].event, 'presence_state')
      const diffs = pf.filter((f) => f.event === 'presence_diff')
      assert.ok(
        diffs.some((f) => f.payload.joins.old?.metas[0].phx_ref_prev),
        'the update carries phx_ref_prev'
      )
    })
  })
})
