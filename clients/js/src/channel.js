// A channel: one topic, joined over the client's socket, with gapless resume.

import { encodeText, encodeUserBroadcast, filterString, splitTable, toMs, wireTopic } from './wire.js'
import { reportError, backoffDelay } from './client.js'

const DB_OPS = ['INSERT', 'UPDATE', 'DELETE']

/** Event names that are not custom events (never sent to the server as bindings). */
const RESERVED = new Set([
  '*',
  'presence',
  'presence:join',
  'presence:update',
  'presence:leave',
  'gap',
  'system',
  'error',
  'broadcast',
  'postgres_changes',
])

let keySeq = 0
function randomKey() {
  const c = globalThis.crypto
  if (c && typeof c.randomUUID === 'function') return c.randomUUID()
  return `k-${Date.now().toString(36)}-${(++keySeq).toString(36)}-${Math.random().toString(36).slice(2)}`
}

export class Channel {
  constructor(client, topic, opts = {}) {
    this.client = client
    this.topic = topic
    this.wire = wireTopic(topic)
    this.opts = {
      self: opts.self ?? true,
      private: opts.private ?? false,
      presenceKey: opts.presenceKey ?? opts.presence?.key ?? randomKey(),
    }
    /** `closed` | `joining` | `joined` | `leaving` */
    this.state = 'closed'
    this.joinRef = null
    /** Position of the last broadcast seen: resumed from on every rejoin. */
    this.epoch = null
    this.offset = null
    this._handlers = new Map()
    this._pgBindings = []
    this._bcBindings = []
    this._wantJoined = false
    this._joinWaiters = []
    this._joinToken = null
    this._rejoinTimer = null
    this._rejoinAttempt = 0
    this._pgReadyTimer = null
    this._sse = null
    this._tracked = null
    this._presence = new Map()
    this._pgIds = new Map()
    this._sentBindings = '[]'
    const self = this
    /** Atelier style: `channel.presence.track(state)`, `.untrack()`, `.users`. */
    this.presence = {
      track: (state) => self.track(state),
      untrack: () => self.untrack(),
      get users() {
        return self._users()
      },
      get state() {
        return self.presenceState()
      },
    }
  }

  get isTableTopic() {
    return !this.topic.includes('/')
  }

  /** Why this channel needs the WebSocket (`auto`), or null: table changes are not carried
   *  by this client's event streams, and presence is duplex. */
  _needsDuplex() {
    if (this._serverBindings().length) return 'postgres changes'
    if (this._tracked !== null) return 'presence'
    return null
  }

  // ---------------------------------------------------------------------------------------
  // Listeners
  // ---------------------------------------------------------------------------------------

  /**
   * `.on(event, cb)` (Aerostack: a custom event, `INSERT`/`UPDATE`/`DELETE` on a table topic,
   * `presence:join|update|leave`, `presence`, `gap`, `system`, `*`), or
   * `.on('postgres_changes', { table, op?, filter? }, cb)` and `.on('broadcast', { event }, cb)`
   * (Atelier). Chainable.
   */
  on(event, filterOrCb, maybeCb) {
    if (typeof filterOrCb === 'function' && event !== 'broadcast') {
      if (event === 'postgres_changes') throw new TypeError("corecast: on('postgres_changes', { table }, cb) needs a table")
      let set = this._handlers.get(event)
      if (!set) this._handlers.set(event, (set = new Set()))
      set.add(filterOrCb)
      if (this.isTableTopic && DB_OPS.includes(event)) this._bindingsChanged()
      return this
    }
    const filter = typeof filterOrCb === 'function' ? {} : (filterOrCb ?? {})
    const cb = typeof filterOrCb === 'function' ? filterOrCb : maybeCb
    if (typeof cb !== 'function') throw new TypeError('corecast: on() needs a callback')
    if (event === 'broadcast') {
      this._bcBindings.push({ event: filter.event ?? '*', cb })
    } else if (event === 'postgres_changes') {
      if (!filter.table) throw new TypeError("corecast: on('postgres_changes', { table }, cb) needs a table")
      const { schema, table } = splitTable(filter.table)
      const op = (filter.op ?? filter.event ?? '*').toUpperCase()
      this._pgBindings.push({ schema: filter.schema ?? schema, table, op, filter: filterString(filter.filter), cb })
      this._bindingsChanged()
    } else {
      return this.on(event, cb)
    }
    return this
  }

  /** Removes one listener (`cb` given) or every listener of `event`. Chainable. */
  off(event, cb) {
    if (event === 'broadcast' || event === 'postgres_changes') {
      const list = event === 'broadcast' ? this._bcBindings : this._pgBindings
      for (let i = list.length - 1; i >= 0; i--) if (!cb || list[i].cb === cb) list.splice(i, 1)
      if (event === 'postgres_changes') this._bindingsChanged()
    }
    const set = this._handlers.get(event)
    if (set) {
      if (cb) set.delete(cb)
      else set.clear()
      if (set.size === 0) this._handlers.delete(event)
      if (this.isTableTopic && DB_OPS.includes(event)) this._bindingsChanged()
    }
    return this
  }

  _emit(event, payload) {
    const set = this._handlers.get(event)
    if (set) for (const cb of [...set]) call(cb, payload)
    if (event !== '*' && event !== 'presence' && event !== 'system' && event !== 'error') {
      const all = this._handlers.get('*')
      if (all) for (const cb of [...all]) call(cb, payload)
    }
  }

  // ---------------------------------------------------------------------------------------
  // Join / leave
  // ---------------------------------------------------------------------------------------

  /** Joins (connecting the client if needed); resolves once the server accepted the join. */
  subscribe() {
    this._wantJoined = true
    if (!this.client.channels.has(this.topic)) this.client.channels.set(this.topic, this)
    if (this.state === 'joined') return Promise.resolve(this)
    const p = new Promise((resolve, reject) => this._joinWaiters.push({ resolve, reject }))
    if (this.client._mode === 'sse' && this._needsDuplex()) this.client._upgrade(this._needsDuplex())
    if (this.client.transport === 'sse' && this._serverBindings().length) {
      this._emit('error', new Error("corecast: table changes are not carried over transport 'sse'; use 'auto' or 'websocket'"))
    }
    if (this.client._mode === 'sse') {
      this.client.connect()
    } else if (this.client.connected) {
      if (this.state === 'closed') this._join()
    } else {
      this.client.connect().catch(() => {})
    }
    return p
  }

  /** Leaves the channel and removes every listener. */
  async unsubscribe() {
    this._wantJoined = false
    clearTimeout(this._rejoinTimer)
    this._rejoinTimer = null
    this._closeStream()
    const wasJoined = this.state === 'joined' || this.state === 'joining'
    const joinRef = this.joinRef
    this.state = 'closed'
    this.joinRef = null
    this._handlers.clear()
    this._pgBindings = []
    this._bcBindings = []
    this._tracked = null
    this._presence.clear()
    this.epoch = this.offset = null
    for (const w of this._joinWaiters.splice(0)) w.reject(new Error('corecast: unsubscribed'))
    if (this.client.channels.get(this.topic) === this) this.client.channels.delete(this.topic)
    if (wasJoined && this.client.connected) {
      try {
        await this.client._push((ref) => encodeText(joinRef, ref, this.wire, 'phx_leave', {}), { timeoutMs: 5000 })
      } catch {}
    }
  }

  _joinConfig() {
    const broadcast = { self: this.opts.self, ack: true }
    if (this.epoch !== null && this.offset !== null) broadcast.resume = { epoch: this.epoch, offset: this.offset }
    const config = {
      broadcast,
      presence: { key: this.opts.presenceKey, enabled: true },
      postgres_changes: this._serverBindings().map((b) => b.wire),
      private: this.opts.private,
    }
    return config
  }

  /** The Postgres bindings sent with the join: Aerostack table listeners, then Atelier ones.
   *  Each `{ wire, match }` where `match(kind)` says which listeners a change goes to. */
  _serverBindings() {
    const out = []
    if (this.isTableTopic) {
      const { schema, table } = splitTable(this.topic)
      for (const op of DB_OPS) {
        if (this._handlers.get(op)?.size) out.push({ wire: { event: op, schema, table }, aerostack: op })
      }
    }
    for (const b of this._pgBindings) {
      const wire = { event: b.op, schema: b.schema, table: b.table }
      if (b.filter) wire.filter = b.filter
      out.push({ wire, atelier: b })
    }
    return out
  }

  _bindingsChanged() {
    if (this._sse && this.client.transport === 'auto' && this._serverBindings().length) {
      return this.client._upgrade('postgres changes')
    }
    // A join already made with other bindings is redone (resuming, so nothing is lost).
    if (this.state !== 'joined' && this.state !== 'joining') return
    if (JSON.stringify(this._serverBindings().map((b) => b.wire)) === this._sentBindings) return
    queueMicrotask(() => {
      if (this.state === 'joined' && JSON.stringify(this._serverBindings().map((b) => b.wire)) !== this._sentBindings) {
        this._join()
      }
    })
  }

  _join() {
    clearTimeout(this._rejoinTimer)
    this._rejoinTimer = null
    if (!this.client.connected) return
    const client = this.client
    const joinRef = client._makeRef()
    this.joinRef = joinRef
    this.state = 'joining'
    const bindings = this._serverBindings()
    this._sentBindings = JSON.stringify(bindings.map((b) => b.wire))
    const payload = { config: this._joinConfig() }
    const token = client.token
    if (token) payload.access_token = token
    this._joinToken = token
    const frame = encodeText(joinRef, joinRef, this.wire, 'phx_join', payload)
    if (!client._sendRaw(frame)) return
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        client._pending.delete(joinRef)
        reject(new Error(`corecast: join of ${this.topic} got no reply within ${client.timeoutMs} ms`))
      }, client.timeoutMs)
      client._pending.set(joinRef, { resolve, reject, timer })
    }).then(
      (reply) => {
        if (this.joinRef !== joinRef) return
        if (reply.status === 'ok') this._joined(reply.response ?? {}, bindings)
        else this._joinFailed(new Error(`corecast: join of ${this.topic} refused: ${reason(reply.response)}`))
      },
      (e) => {
        if (this.joinRef !== joinRef) return
        this._joinFailed(e)
      }
    )
  }

  _joined(response, bindings) {
    this.state = 'joined'
    // Upgraded from SSE: the socket took over (it resumed from the stream's last offset).
    if (this._sse) this._closeStream()
    this._rejoinAttempt = 0
    this._pgIds.clear()
    const server = Array.isArray(response.postgres_changes) ? response.postgres_changes : []
    bindings.forEach((b, i) => {
      const id = server[i]?.id
      if (id === undefined) return
      const key = String(id)
      if (!this._pgIds.has(key)) this._pgIds.set(key, [])
      this._pgIds.get(key).push(b)
    })
    if (this.client.token !== this._joinToken) this._tokenChanged()
    if (this._tracked !== null) this._sendTrack(this._tracked).catch(() => {})
    if (bindings.length === 0) return this._resolveJoin()
    // With Postgres bindings, subscribe() resolves once the server said "Subscribed to
    // PostgreSQL" (every change committed after that is delivered), or reported why not.
    clearTimeout(this._pgReadyTimer)
    this._pgReadyTimer = setTimeout(() => this._resolveJoin(), this.client.timeoutMs)
  }

  _resolveJoin() {
    clearTimeout(this._pgReadyTimer)
    this._pgReadyTimer = null
    for (const w of this._joinWaiters.splice(0)) w.resolve(this)
  }

  _joinFailed(e) {
    this.state = 'closed'
    this.joinRef = null
    this._emit('error', e)
    for (const w of this._joinWaiters.splice(0)) w.reject(e)
    this._scheduleRejoin()
  }

  _scheduleRejoin() {
    if (!this._wantJoined || !this.client.connected) return
    const d = this.client.rejoinMs[Math.min(this._rejoinAttempt++, this.client.rejoinMs.length - 1)]
    clearTimeout(this._rejoinTimer)
    this._rejoinTimer = setTimeout(() => {
      this._rejoinTimer = null
      if (this._wantJoined && this.state === 'closed') this._join()
    }, d)
  }

  _socketOpen() {
    if (!this._wantJoined) return
    if (this.client._mode === 'sse') {
      if (!this._sse) this._openStream()
      return
    }
    this._join()
  }

  // ---------------------------------------------------------------------------------------
  // Transport 'sse': the client's shared event stream
  // ---------------------------------------------------------------------------------------

  /** Joins the client's event stream (it reopens with this topic, resuming the others). */
  _openStream() {
    this.state = 'joining'
    this._sse = this.client._sseAttach(this)
  }

  /** Reopens the stream (new token or presence state), resuming where it was. */
  _restartStream() {
    if (!this._sse) return
    const before = this._sse
    this._closeStream()
    this._openStream()
    if (this._sse === before) before.restart()
  }

  _closeStream() {
    if (!this._sse) return
    const g = this._sse
    this._sse = null
    g.remove(this)
  }

  /** The stream (re)opened: this channel receives from it. */
  _streamOpened() {
    if (this.client._mode === 'sse') this.state = 'joined'
    this._resolveJoin()
  }

  _streamLost() {
    if (this.client._mode === 'sse') this.state = 'joining'
  }

  /** The stream's resume token says where this topic stands on it (a position at or after the
   *  last message delivered here: what a reopen resumes from). */
  _adoptPosition(epoch, offset) {
    if (this.epoch !== epoch || this.offset === null || offset > this.offset) {
      this.epoch = epoch
      this.offset = offset
    }
  }

  _onStreamEvent(event, d) {
    switch (event) {
      case 'broadcast': {
        const payload = d.encoding === 'base64' ? base64ToBuffer(d.payload) : d.payload
        return this._onBroadcast({ type: 'broadcast', event: d.event, payload, meta: d.meta })
      }
      case 'presence_state':
        return this._onPresenceState(d.payload)
      case 'presence_diff':
        return this._onPresenceDiff(d.payload)
      case 'system':
        return this._onSystem(d.payload ?? {})
      default:
        return
    }
  }

  _socketClosed() {
    clearTimeout(this._pgReadyTimer)
    this._pgReadyTimer = null
    clearTimeout(this._rejoinTimer)
    this._rejoinTimer = null
    if (this.state !== 'closed') {
      this.state = 'closed'
      this.joinRef = null
    }
  }

  _tokenChanged() {
    if (this._sse) return this._restartStream()
    const token = this.client.token
    if (this.state !== 'joined' || !token) return
    const joinRef = this.joinRef
    this._joinToken = token
    this.client._push((ref) => encodeText(joinRef, ref, this.wire, 'access_token', { access_token: token }), {
      reply: false,
    }).catch(() => {})
  }

  // ---------------------------------------------------------------------------------------
  // Publishing
  // ---------------------------------------------------------------------------------------

  /**
   * Publishes a custom event. Over the socket when joined (resolves once the server sequenced
   * it, and for `persist` once it is durable); over REST otherwise (resolves on `202`).
   */
  async publish(event, data, { persist } = {}) {
    if (typeof event !== 'string' || event === '') throw new TypeError('corecast: publish() needs an event name')
    this.client._countPublish()
    if (this.state === 'joined' && this.client.connected && !this._sse) {
      const joinRef = this.joinRef
      const meta = persist ? { persist } : null
      const reply = await this.client._push((ref) => encodeUserBroadcast(joinRef, ref, this.wire, event, data, meta))
      if (reply.status !== 'ok') throw new Error(`corecast: publish refused: ${reason(reply.response)}`)
      return 'ok'
    }
    // REST publishes of one channel go one after another, so they keep their order (separate
    // concurrent requests could be sequenced in any order).
    const run = () => this._restPublish(event, data, persist)
    const p = (this._restChain ?? Promise.resolve()).then(run, run)
    this._restChain = p.catch(() => {})
    return p
  }

  async _restPublish(event, data, persist) {
    if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
      // Binary: the single-message endpoint takes the raw bytes.
      const q = new URLSearchParams()
      if (persist === true) q.set('persist', 'true')
      else if (persist && persist.ttl) q.set('persist[ttl]', String(persist.ttl))
      if (this.opts.private) q.set('private', 'true')
      const path = `/api/broadcast/${encodeURIComponent(this.topic)}/events/${encodeURIComponent(event)}`
      const res = await this.client._rest(`${path}${q.size ? `?${q}` : ''}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/octet-stream' },
        body: data,
      })
      if (res.status !== 202) throw new Error(`corecast: publish got HTTP ${res.status}: ${await res.text()}`)
      return 'ok'
    }
    const msg = { topic: this.topic, event, payload: data === undefined ? null : data }
    if (persist) msg.persist = persist
    if (this.opts.private) msg.private = true
    const res = await this.client._rest('/api/broadcast', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ messages: [msg] }),
    })
    if (res.status !== 202) throw new Error(`corecast: publish got HTTP ${res.status}: ${await res.text()}`)
    return 'ok'
  }

  /** Atelier style: `send({ event, payload })`. */
  send({ event, payload, persist } = {}) {
    return this.publish(event, payload, { persist })
  }

  // ---------------------------------------------------------------------------------------
  // Presence
  // ---------------------------------------------------------------------------------------

  /** Announces (or, called again, updates) this client's presence state; kept across
   *  reconnects. Sent once joined; resolves when the server accepted it. */
  track(state) {
    if (state === null || typeof state !== 'object' || Array.isArray(state)) {
      return Promise.reject(new TypeError('corecast: track() needs an object'))
    }
    this._tracked = state
    if (this.client.transport === 'auto' && this.client._mode === 'sse') {
      this.client._upgrade('presence')
      return Promise.resolve('queued')
    }
    if (this._sse) {
      this._restartStream()
      return Promise.resolve('ok')
    }
    if (this.state !== 'joined') return Promise.resolve('queued')
    return this._sendTrack(state)
  }

  async _sendTrack(state) {
    const joinRef = this.joinRef
    const reply = await this.client._push((ref) =>
      encodeText(joinRef, ref, this.wire, 'presence', { type: 'presence', event: 'track', payload: state })
    )
    if (reply.status !== 'ok') throw new Error(`corecast: track refused: ${reason(reply.response)}`)
    return 'ok'
  }

  /** Removes this client's presence. */
  async untrack() {
    const had = this._tracked !== null
    this._tracked = null
    if (had && this._sse) this._restartStream()
    if (!had || this.state !== 'joined' || this._sse) return 'ok'
    const joinRef = this.joinRef
    const reply = await this.client._push((ref) =>
      encodeText(joinRef, ref, this.wire, 'presence', { type: 'presence', event: 'untrack' })
    )
    if (reply.status !== 'ok') throw new Error(`corecast: untrack refused: ${reason(reply.response)}`)
    return 'ok'
  }

  /** `{ key: [state, …] }` of everyone present. */
  presenceState() {
    const out = {}
    for (const [key, metas] of this._presence) out[key] = [...metas.values()]
    return out
  }

  _users() {
    const out = []
    for (const metas of this._presence.values()) out.push(...metas.values())
    return out
  }

  _onPresenceState(payload) {
    const next = new Map()
    for (const [key, v] of Object.entries(payload ?? {})) next.set(key, metasOf(v))
    const joined = []
    const left = []
    const prev = this._presence
    this._presence = next
    for (const [key, metas] of next) {
      const old = prev.get(key)
      const latest = last(metas)
      if (!old || old.size === 0) {
        for (const m of metas.values()) (joined.push(m), this._emit('presence:join', presenceEvent('join', this, key, m)))
      } else if (!sameMetas(old, metas) && latest) {
        joined.push(latest)
        this._emit('presence:update', presenceEvent('update', this, key, latest))
      }
    }
    for (const [key, old] of prev) {
      if (!next.has(key)) for (const m of old.values()) (left.push(m), this._emit('presence:leave', presenceEvent('leave', this, key, m)))
    }
    this._emit('presence', { joined, left, users: this._users() })
  }

  _onPresenceDiff(payload) {
    const joins = payload?.joins ?? {}
    const leaves = payload?.leaves ?? {}
    const keys = new Set([...Object.keys(joins), ...Object.keys(leaves)])
    const joined = []
    const left = []
    const events = []
    for (const key of keys) {
      const before = this._presence.get(key)
      const existed = !!before && before.size > 0
      const cur = new Map(before ?? [])
      const leftMetas = leaves[key] ? [...metasOf(leaves[key]).entries()] : []
      const joinMetas = joins[key] ? [...metasOf(joins[key]).entries()] : []
      for (const [ref] of leftMetas) cur.delete(ref)
      for (const [ref, m] of joinMetas) cur.set(ref, m)
      if (cur.size) this._presence.set(key, cur)
      else this._presence.delete(key)
      if (joinMetas.length) {
        const m = joinMetas[joinMetas.length - 1][1]
        joined.push(m)
        events.push(['presence:' + (existed ? 'update' : 'join'), presenceEvent(existed ? 'update' : 'join', this, key, m)])
      } else if (leftMetas.length && cur.size === 0) {
        for (const [, m] of leftMetas) (left.push(m), events.push(['presence:leave', presenceEvent('leave', this, key, m)]))
      } else if (leftMetas.length) {
        // One of several metas of this key left (a second tab closed): the key is still here.
        for (const [, m] of leftMetas) left.push(m)
      }
    }
    for (const [ev, p] of events) this._emit(ev, p)
    this._emit('presence', { joined, left, users: this._users() })
  }

  // ---------------------------------------------------------------------------------------
  // History
  // ---------------------------------------------------------------------------------------

  /**
   * Persisted messages, newest first: `[{ id, room_id, user_id, event, data, created_at }]`
   * (`created_at` in Unix ms). `before` (ms) returns only messages created before it.
   */
  async getHistory(limit = 50, before) {
    const n = Math.max(1, Math.min(1000, Math.floor(Number(limit) || 50)))
    const beforeMs = before === undefined || before === null ? null : toMs(before)
    const out = []
    let offsetCursor = null
    for (let page = 0; page < 100 && out.length < n; page++) {
      const q = new URLSearchParams({ limit: String(n) })
      if (beforeMs !== null) q.set('before_ms', String(beforeMs))
      if (offsetCursor !== null) q.set('before', String(offsetCursor))
      if (this.opts.private) q.set('private', 'true')
      const res = await this.client._rest(`/api/channels/${encodeURIComponent(this.topic)}/messages?${q}`)
      if (res.status !== 200) throw new Error(`corecast: history got HTTP ${res.status}: ${await res.text()}`)
      const body = await res.json()
      const rows = Array.isArray(body.messages) ? body.messages : []
      for (const r of rows) {
        const row = historyRow(this.topic, r)
        // Until the server filters by time itself (`before_ms`), filter here.
        if (beforeMs !== null && row.created_at !== null && row.created_at >= beforeMs) continue
        if (out.length < n) out.push(row)
      }
      if (rows.length < n) break
      const lowest = rows[rows.length - 1].offset
      if (typeof lowest !== 'number' || lowest <= 1) break
      offsetCursor = lowest
    }
    return out
  }

  // ---------------------------------------------------------------------------------------
  // Incoming
  // ---------------------------------------------------------------------------------------

  _onMessage(m) {
    // Messages for an earlier join of this topic (a stale join_ref) are ignored.
    if (m.joinRef != null && m.joinRef !== this.joinRef && m.event !== 'phx_reply') return
    switch (m.event) {
      case 'broadcast':
        return this._onBroadcast(m.payload ?? {})
      case 'presence_state':
        return this._onPresenceState(m.payload)
      case 'presence_diff':
        return this._onPresenceDiff(m.payload)
      case 'postgres_changes':
        return this._onPgChange(m.payload ?? {})
      case 'system':
        return this._onSystem(m.payload ?? {})
      case 'phx_close':
      case 'phx_error':
        if (m.joinRef !== this.joinRef || this.joinRef === null) return
        this.state = 'closed'
        this.joinRef = null
        this._scheduleRejoin()
        return
      default:
        return
    }
  }

  _onBroadcast(p) {
    const meta = p.meta ?? {}
    if (typeof meta.offset === 'number' && typeof meta.epoch === 'string') {
      // Defensive: never deliver an offset twice (a resume overlapping what was seen).
      if (meta.epoch === this.epoch && this.offset !== null && meta.offset <= this.offset) return
      this.epoch = meta.epoch
      this.offset = meta.offset
    }
    const event = p.event
    const payload = {
      type: 'event',
      topic: this.topic,
      event,
      data: p.payload,
      userId: meta.user_id ?? undefined,
      timestamp: toMs(meta.created_at) ?? Date.now(),
      meta,
    }
    if (typeof event === 'string' && !RESERVED.has(event)) this._emit(event, payload)
    else this._emit('*', payload)
    for (const b of [...this._bcBindings]) {
      if (b.event === '*' || b.event === event) call(b.cb, p.payload, payload)
    }
  }

  _onPgChange(p) {
    const d = p.data ?? {}
    const ids = Array.isArray(p.ids) ? p.ids : []
    const type = d.type
    const row = type === 'DELETE' ? (d.old_record ?? null) : (d.record ?? null)
    const old = d.old_record ?? undefined
    const ts = toMs(d.commit_timestamp) ?? Date.now()
    const targets = new Set()
    for (const id of ids) for (const b of this._pgIds.get(String(id)) ?? []) targets.add(b)
    let aerostack = false
    for (const b of targets) {
      if (b.aerostack && b.aerostack === type) aerostack = true
      if (b.atelier && (b.atelier.op === '*' || b.atelier.op === type)) {
        call(b.atelier.cb, {
          op: type,
          row: d.record ?? null,
          old_row: d.old_record ?? null,
          user_id: p.user_id ?? d.user_id ?? null,
          schema: d.schema,
          table: d.table,
          commit_timestamp: d.commit_timestamp,
        })
      }
    }
    const payload = { type: 'db_change', topic: this.topic, operation: type, data: row, old, timestamp: ts }
    if (aerostack) this._emit(type, payload)
    else if (targets.size) {
      const all = this._handlers.get('*')
      if (all) for (const cb of [...all]) call(cb, payload)
    }
  }

  _onSystem(p) {
    this._emit('system', p)
    if (p.extension === 'postgres_changes' && this._pgReadyTimer) {
      if (p.status !== 'ok') this._emit('error', new Error(`corecast: postgres_changes: ${p.message}`))
      this._resolveJoin()
    }
    if (p.status === 'error' && typeof p.message === 'string' && p.message.startsWith('resume impossible')) {
      const gap = {
        type: 'gap',
        topic: this.topic,
        message: p.message,
        lastEpoch: this.epoch,
        lastOffset: this.offset,
        epoch: p.epoch ?? null,
        oldestOffset: p.oldest_offset ?? null,
      }
      this._emit('gap', gap)
    }
  }
}

function call(cb, ...args) {
  try {
    cb(...args)
  } catch (e) {
    reportError(e)
  }
}

function reason(response) {
  if (!response || typeof response !== 'object') return String(response)
  return response.reason ?? response.error ?? JSON.stringify(response)
}

/** `{ metas: [{ phx_ref, …state }] }` → Map(phx_ref → state without the phx_ fields). */
function metasOf(v) {
  const out = new Map()
  const metas = Array.isArray(v?.metas) ? v.metas : []
  metas.forEach((m, i) => {
    const { phx_ref, phx_ref_prev, ...state } = m ?? {}
    out.set(phx_ref ?? `#${i}`, state)
  })
  return out
}

function last(map) {
  let v
  for (const x of map.values()) v = x
  return v
}

/** Same states (refs aside: a rejoin gives every meta a new `phx_ref`). */
function sameMetas(a, b) {
  if (a.size !== b.size) return false
  const key = (m) => [...m.values()].map((v) => JSON.stringify(v)).sort().join('\n')
  return key(a) === key(b)
}

function presenceEvent(kind, ch, key, state) {
  return { type: 'presence', event: kind, topic: ch.topic, key, data: state, timestamp: Date.now() }
}

function historyRow(topic, r) {
  return {
    id: r.id,
    room_id: topic,
    user_id: r.user_id ?? null,
    event: r.event,
    data: r.encoding === 'base64' ? base64ToBuffer(r.payload) : r.payload,
    created_at: typeof r.created_at_ms === 'number' ? r.created_at_ms : toMs(r.created_at),
    offset: r.offset,
    epoch: r.epoch,
  }
}

function base64ToBuffer(s) {
  const bin = atob(s)
  const out = new Uint8Array(bin.length)
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i)
  return out.buffer
}
