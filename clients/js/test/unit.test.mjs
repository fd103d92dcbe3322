// Unit tests without a server: URLs, backoff, frames (the captured bytes of
// reference/realtime-protocol.md §1.2), filters, duplicate dropping, presence bookkeeping.

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { backoffDelay, createClient } from '../src/index.js'
import { decode, encodeUserBroadcast, endpoints, filterString, splitTable, toMs } from '../src/wire.js'

const hex = (buf) => Buffer.from(buf).toString('hex')

describe('unit', () => {
  it('endpoints from http, ws and /realtime/v1 URLs', () => {
    for (const u of ['http://h:1', 'http://h:1/', 'http://h:1/realtime/v1', 'ws://h:1', 'h:1']) {
      assert.deepEqual(endpoints(u), { http: 'http://h:1/realtime/v1', ws: 'ws://h:1/realtime/v1' }, u)
    }
    assert.deepEqual(endpoints('https://x.dev'), { http: 'https://x.dev/realtime/v1', ws: 'wss://x.dev/realtime/v1' })
  })

  it('backoff: 1 s, 2 s, 4 s, 8 s … capped at 30 s, jitter only shortens', () => {
    const none = () => 0
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 40].map((n) => backoffDelay(n, {}, none)), [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000])
    for (let n = 0; n < 10; n++) {
      const d = backoffDelay(n)
      const full = Math.min(30000, 1000 * 2 ** n)
      assert.ok(d <= full && d >= full * 0.8, `attempt ${n}: ${d}`)
    }
  })

  it('kind-3 frames byte for byte as realtime-js sends them; kind-4 decoded', () => {
    const f = encodeUserBroadcast('6', '7', 'realtime:room1', 'cursor', { x: 2 }, null)
    assert.equal(hex(f), '0301010e06000136377265616c74696d653a726f6f6d31637572736f727b2278223a327d')
    const b = encodeUserBroadcast('6', '9', 'realtime:room1', 'cursor', new Uint8Array([1, 2, 3]), null)
    assert.equal(hex(b), '0301010e06000036397265616c74696d653a726f6f6d31637572736f72010203')
    const p = encodeUserBroadcast('1', '2', 't', 'e', {}, { persist: true })
    assert.match(Buffer.from(p).toString('utf8'), /\{"persist":true\}\{\}$/)
    const k4 = Buffer.from('040e060c017265616c74696d653a726f6f6d31637572736f727b226964223a22616263227d7b2278223a327d', 'hex')
    const m = decode(k4.buffer.slice(k4.byteOffset, k4.byteOffset + k4.byteLength))
    assert.deepEqual(m, {
      joinRef: null,
      ref: null,
      topic: 'realtime:room1',
      event: 'broadcast',
      payload: { type: 'broadcast', event: 'cursor', payload: { x: 2 }, meta: { id: 'abc' } },
    })
    assert.equal(decode('not json'), null)
    assert.deepEqual(decode('["1",null,"realtime:a","x",{}]').joinRef, '1')
  })

  it('filters, table names, timestamps', () => {
    assert.equal(filterString({ user_id: 'u1' }), 'user_id=eq.u1')
    assert.equal(filterString({ a: 1, b: 'x,y' }), 'a=eq.1,b=eq."x,y"')
    assert.equal(filterString(undefined), undefined)
    assert.deepEqual(splitTable('orders'), { schema: 'public', table: 'orders' })
    assert.deepEqual(splitTable('shop.items'), { schema: 'shop', table: 'items' })
    assert.equal(toMs('2026-12-07T01:59:13.375Z'), Date.UTC(2026, 11, 7, 1, 59, 13, 375))
    assert.equal(toMs(5), 5)
  })

  it('an unknown transport is refused clearly', () => {
    assert.throws(() => createClient('http://h:1', { transport: 'carrier-pigeon' }), /unknown transport/)
  })

  it('duplicates are dropped by offset; a new epoch is accepted', () => {
    const c = createClient('http://h:1')
    const ch = c.channel('room/x')
    const got = []
    ch.on('m', (p) => got.push(p.data.n))
    const msg = (n, offset, epoch = 'e1') => ({
      joinRef: null,
      ref: null,
      topic: 'realtime:room/x',
      event: 'broadcast',
      payload: { type: 'broadcast', event: 'm', payload: { n }, meta: { id: String(n), offset, epoch } },
    })
    for (const m of [msg(1, 1), msg(2, 2), msg(2, 2), msg(1, 1), msg(3, 3), msg(4, 10, 'e2'), msg(4, 10, 'e2'), msg(5, 11, 'e2')]) {
      ch._onMessage(m)
    }
    assert.deepEqual(got, [1, 2, 3, 4, 5])
    assert.equal(ch.epoch, 'e2')
    assert.equal(ch.offset, 11)
    assert.deepEqual(ch._joinConfig().broadcast.resume, { epoch: 'e2', offset: 11 })
  })

  it('presence: state then diffs give join, update, leave and { joined, left, users }', () => {
    const ch = createClient('http://h:1').channel('room/p')
    const ev = []
    const sums = []
    ch.on('presence:join', ({ data }) => ev.push(['join', data.name]))
      .on('presence:update', ({ data }) => ev.push(['update', data.name]))
      .on('presence:leave', ({ data }) => ev.push(['leave', data.name]))
      .on('presence', (s) => sums.push(s))
    ch._onPresenceState({ a: { metas: [{ phx_ref: 'r1', name: 'A' }] } })
    ch._onPresenceDiff({ joins: { b: { metas: [{ phx_ref: 'r2', name: 'B' }] } }, leaves: {} })
    ch._onPresenceDiff({
      joins: { a: { metas: [{ phx_ref: 'r3', phx_ref_prev: 'r1', name: 'A2' }] } },
      leaves: { a: { metas: [{ phx_ref: 'r1', name: 'A' }] } },
    })
    ch._onPresenceDiff({ joins: {}, leaves: { b: { metas: [{ phx_ref: 'r2', name: 'B' }] } } })
    assert.deepEqual(ev, [['join', 'A'], ['join', 'B'], ['update', 'A2'], ['leave', 'B']])
    assert.deepEqual(sums.at(-1), { joined: [], left: [{ name: 'B' }], users: [{ name: 'A2' }] })
    // A presence_state after a rejoin reports only what changed.
    ch._onPresenceState({ a: { metas: [{ phx_ref: 'r9', name: 'A2' }] }, c: { metas: [{ phx_ref: 'r8', name: 'C' }] } })
    assert.deepEqual(ev.slice(4), [['join', 'C']])
  })

  it('event stream parser: fields, multi-line data, comments, CRLF, split chunks', async () => {
    const { EventStreamParser } = await import('../src/sse.js')
    const got = []
    const p = new EventStreamParser((e) => got.push(e))
    p.push('retry: 2000\n: open\n\nid: e1-5\nevent: broadcast\ndata: {"a":\ndata: 1}\n\nevent: sys')
    p.push('tem\r\ndata: {}\r\n\r\n')
    assert.deepEqual(got, [
      { event: 'broadcast', data: '{"a":\n1}', id: 'e1-5' },
      { event: 'system', data: '{}', id: null },
    ])
  })

  it('resume tokens of a multiplexed stream: parsed per topic, built with * for a topic without a position', async () => {
    const { parseToken, buildToken } = await import('../src/sse.js')
    assert.deepEqual(parseToken('ab12-40.cd34-0.*'), [{ epoch: 'ab12', offset: 40 }, { epoch: 'cd34', offset: 0 }, null])
    assert.deepEqual(parseToken('x'), [null])
    assert.deepEqual(parseToken(''), [])
    assert.equal(buildToken([{ epoch: 'ab12', offset: 40 }, null]), 'ab12-40.*')
    assert.equal(buildToken([null, { epoch: 'e', offset: 3 }, null]), '*.e-3.*')
    assert.equal(buildToken([null, null]), null, 'no position at all: no token (every topic starts live)')
  })
})
