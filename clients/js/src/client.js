// The realtime client: one WebSocket, heartbeats, reconnect with backoff, channels.

import { Channel } from './channel.js'
import { decode, encodeText, endpoints } from './wire.js'
import { SseGroup } from './sse.js'

export const STATUSES = ['idle', 'connecting', 'connected', 'reconnecting', 'disconnected']

/**
 * Reconnect delay before attempt `n` (0-based): 1 s, 2 s, 4 s, 8 s … at most `maxMs`, each
 * shortened by up to `jitter` (a fraction) at random, so clients dropped together do not come
 * back in lockstep. Never more than `maxMs`.
 */
export function backoffDelay(n, { baseMs = 1000, maxMs = 30000, jitter = 0.2 } = {}, random = Math.random) {
  const d = Math.min(maxMs, baseMs * 2 ** Math.min(n, 30))
  return Math.round(d * (1 - jitter * random()))
}

/** Join retry delays after a join error or a channel closed by the server (as Phoenix). */
const REJOIN_MS = [1000, 2000, 5000, 10000]

export class RealtimeClient {
  constructor(url, opts = {}) {
    const { transport = 'auto' } = opts
    if (!['auto', 'websocket', 'sse'].includes(transport)) {
      throw new TypeError(`corecast: unknown transport '${transport}' (auto | websocket | sse)`)
    }
    this.endpoints = endpoints(url)
    this.transport = transport
    /** What carries push now: 'sse' (event streams, REST publishing) or 'websocket'. `auto`
     *  starts with SSE and upgrades to one WebSocket for good once duplex is needed. */
    this._mode = transport === 'websocket' ? 'websocket' : 'sse'
    this._upgrading = false
    this._publishTimes = []
    this.token = opts.token ?? null
    this.apikey = opts.apikey ?? null
    this.WebSocket = opts.WebSocket ?? globalThis.WebSocket
    this.fetch = opts.fetch ?? globalThis.fetch?.bind(globalThis)
    this.heartbeatMs = opts.heartbeatIntervalMs ?? 25000
    this.timeoutMs = opts.timeoutMs ?? 10000
    this.reconnect = { baseMs: 1000, maxMs: 30000, jitter: 0.2, ...(opts.reconnect ?? {}) }
    this.rejoinMs = opts.rejoinMs ?? REJOIN_MS
    this.status = 'idle'
    this.channels = new Map()
    this._statusListeners = new Set()
    this._ws = null
    this._ref = 0
    this._pending = new Map()
    this._attempt = 0
    this._wanted = false
    this._reconnectTimer = null
    this._heartbeatTimer = null
    this._heartbeatRef = null
    this._connectWaiters = []
    /** SSE mode: the event streams, at most one per privacy (plus one per channel that tracks
     *  presence over transport 'sse': the server's `track` applies to every topic of a stream). */
    this._sseGroups = new Map()
    /** Streams not open now (failed, or not open yet while the client is not connected). */
    this._sseDown = new Set()
  }

  /** SSE mode: the stream `ch` belongs to (made when needed; it opens at the end of the tick). */
  _sseAttach(ch) {
    const tracked = ch._tracked !== null && this.transport === 'sse'
    const key = tracked ? `track:${ch.opts.private ? 'private' : 'public'}:${ch.topic}` : ch.opts.private ? 'private' : 'public'
    let g = this._sseGroups.get(key)
    if (g && tracked && JSON.stringify(g.track.state) !== JSON.stringify(ch._tracked)) {
      g.close()
      g = null
    }
    if (!g) {
      const track = tracked ? { state: ch._tracked, key: ch.opts.presenceKey } : null
      g = new SseGroup(this, key, { private: ch.opts.private, track })
      this._sseGroups.set(key, g)
      // A stream added to a connected client does not make it "reconnecting".
      if (this.status !== 'connected') this._sseDown.add(g)
    }
    g.add(ch)
    return g
  }

  _sseBackoff(n) {
    return backoffDelay(n, this.reconnect)
  }

  _streamUp(g) {
    this._sseDown.delete(g)
    this._streamStatus()
  }

  _streamDown(g) {
    this._sseDown.add(g)
    this._streamStatus()
  }

  /** A stream closed for good (no channels left, or the upgrade finished). */
  _streamGone(g) {
    if (this._sseGroups.get(g.key) === g) this._sseGroups.delete(g.key)
    if (this._sseDown.delete(g)) this._streamStatus()
  }

  _streamStatus() {
    if (!this._wanted || this._mode !== 'sse') return
    if (this._sseDown.size === 0) {
      this._everConnected = true
      this._setStatus('connected')
    } else this._setStatus(this._everConnected ? 'reconnecting' : 'connecting')
  }

  // ---------------------------------------------------------------------------------------
  // Status
  // ---------------------------------------------------------------------------------------

  /** Calls `cb(status)` now and on every change; returns the function that stops it. */
  onStatusChange(cb) {
    this._statusListeners.add(cb)
    try {
      cb(this.status)
    } catch (e) {
      reportError(e)
    }
    return () => this._statusListeners.delete(cb)
  }

  _setStatus(s) {
    if (this.status === s) return
    this.status = s
    for (const cb of [...this._statusListeners]) {
      try {
        cb(s)
      } catch (e) {
        reportError(e)
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // Connection
  // ---------------------------------------------------------------------------------------

  /** Opens the connection (if not open); resolves once connected. Reconnects on its own after. */
  connect() {
    this._wanted = true
    if (this._mode === 'sse') {
      // No socket: the subscribed channels share one event stream (per privacy).
      if (this.status === 'idle' || this.status === 'disconnected') this._setStatus('connecting')
      for (const ch of this.channels.values()) ch._socketOpen()
      this._streamStatus()
      return Promise.resolve()
    }
    if (this.status === 'connected') return Promise.resolve()
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }))
    if (!this._ws && !this._reconnectTimer) this._open()
    return p
  }

  /** Closes the connection and stops reconnecting. Channels keep their subscriptions and
   *  resume positions: a later `connect()` restores them. */
  disconnect() {
    this._wanted = false
    clearTimeout(this._reconnectTimer)
    this._reconnectTimer = null
    const ws = this._ws
    this._dropSocket()
    for (const ch of this.channels.values()) ch._closeStream()
    for (const g of [...this._sseGroups.values()]) g.close()
    this._sseDown.clear()
    if (ws) {
      try {
        ws.close(1000, 'client disconnect')
      } catch {}
    }
    for (const w of this._connectWaiters.splice(0)) w.reject(new Error('corecast: disconnected'))
    this._setStatus('disconnected')
  }

  /** Sets the user token: pushed to every joined channel at once (`access_token`), carried by
   *  every later join and used for REST calls. */
  setToken(token) {
    this.token = token ?? null
    for (const ch of this.channels.values()) ch._tokenChanged()
  }

  /** The channel for `topic` (made on first use). */
  channel(topic, opts = {}) {
    if (typeof topic !== 'string' || topic === '') throw new TypeError('corecast: a topic is required')
    let ch = this.channels.get(topic)
    if (!ch) {
      ch = new Channel(this, topic, opts)
      this.channels.set(topic, ch)
    }
    return ch
  }

  /** Channels currently known (subscribed or not). */
  getChannels() {
    return [...this.channels.values()]
  }

  get connected() {
    return this._ws !== null && this.status === 'connected'
  }

  /**
   * `auto`: switches push from the event streams to one WebSocket, for good (`why`: presence,
   * table changes, a high publish rate, SSE unavailable). Each channel joins over the socket
   * resuming from the last offset the stream delivered to it, and leaves the stream once
   * joined (the stream closes when the last channel left);
   * what both delivered meanwhile is dropped as a duplicate by offset: nothing lost, nothing
   * twice.
   */
  _upgrade(why) {
    if (this.transport !== 'auto' || this._mode === 'websocket') return
    this._mode = 'websocket'
    this.upgradedBecause = why
    this._sseDown.clear()
    if (!this._wanted) return
    this._upgrading = true
    if (!this._ws && !this._reconnectTimer) this._open()
  }

  /** `auto`: a high publish rate (more than 5 in a second) is a reason for the WebSocket. */
  _countPublish() {
    if (this.transport !== 'auto' || this._mode !== 'sse') return
    const now = Date.now()
    this._publishTimes.push(now)
    while (this._publishTimes.length && now - this._publishTimes[0] > 1000) this._publishTimes.shift()
    if (this._publishTimes.length > 5) this._upgrade('publish rate')
  }

  _socketUrl() {
    const params = new URLSearchParams()
    const key = this.apikey ?? this.token
    if (key) params.set('apikey', key)
    params.set('vsn', '2.0.0')
    return `${this.endpoints.ws}/websocket?${params}`
  }

  _open() {
    const WS = this.WebSocket
    if (typeof WS !== 'function') {
      const e = new Error(
        "corecast: no WebSocket implementation: pass one as the `WebSocket` option (in Node: import WebSocket from 'ws')"
      )
      for (const w of this._connectWaiters.splice(0)) w.reject(e)
      throw e
    }
    if (!this._upgrading) this._setStatus(this._everConnected ? 'reconnecting' : 'connecting')
    let ws
    try {
      ws = new WS(this._socketUrl())
    } catch (e) {
      reportError(e)
      this._scheduleReconnect()
      return
    }
    ws.binaryType = 'arraybuffer'
    this._ws = ws
    ws.onopen = () => {
      if (this._ws !== ws) return
      this._attempt = 0
      this._upgrading = false
      this._everConnected = true
      this._setStatus('connected')
      this._startHeartbeat()
      for (const w of this._connectWaiters.splice(0)) w.resolve()
      for (const ch of this.channels.values()) ch._socketOpen()
    }
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return
      this._onMessage(ev.data)
    }
    ws.onerror = () => {}
    ws.onclose = () => {
      if (this._ws !== ws) return
      this._dropSocket()
      if (this._wanted) this._scheduleReconnect()
      else this._setStatus('disconnected')
    }
  }

  /** Forgets the current socket: timers, pending replies, channel states. */
  _dropSocket() {
    const ws = this._ws
    this._ws = null
    clearInterval(this._heartbeatTimer)
    this._heartbeatTimer = null
    this._heartbeatRef = null
    if (ws) ws.onopen = ws.onmessage = ws.onclose = null
    for (const [, p] of this._pending) {
      clearTimeout(p.timer)
      p.reject(new Error('corecast: connection lost'))
    }
    this._pending.clear()
    for (const ch of this.channels.values()) ch._socketClosed()
  }

  _scheduleReconnect() {
    this._upgrading = false
    this._setStatus(this._everConnected ? 'reconnecting' : 'connecting')
    const delay = backoffDelay(this._attempt++, this.reconnect)
    clearTimeout(this._reconnectTimer)
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null
      if (this._wanted && !this._ws) this._open()
    }, delay)
  }

  _startHeartbeat() {
    clearInterval(this._heartbeatTimer)
    this._heartbeatTimer = setInterval(() => {
      if (!this._ws) return
      if (this._heartbeatRef !== null) {
        // No reply to the last heartbeat: the connection is dead, start over.
        const ws = this._ws
        this._dropSocket()
        try {
          ws.close(1000, 'heartbeat timeout')
        } catch {}
        if (this._wanted) this._scheduleReconnect()
        return
      }
      this._heartbeatRef = this._makeRef()
      this._sendRaw(encodeText(null, this._heartbeatRef, 'phoenix', 'heartbeat', {}))
    }, this.heartbeatMs)
  }

  _makeRef() {
    this._ref = (this._ref + 1) % 1e15
    return String(this._ref)
  }

  _sendRaw(frame) {
    if (!this._ws || this._ws.readyState !== 1) return false
    this._ws.send(frame)
    return true
  }

  /**
   * Sends `frame` (built by `build(ref)`); when `reply` is set, resolves with the reply payload
   * `{status, response}` (rejects on timeout or a lost connection).
   */
  _push(build, { reply = true, timeoutMs = this.timeoutMs } = {}) {
    const ref = this._makeRef()
    if (!this._sendRaw(build(ref))) return Promise.reject(new Error('corecast: not connected'))
    if (!reply) return Promise.resolve({ status: 'ok', response: {} })
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(ref)
        reject(new Error(`corecast: no reply within ${timeoutMs} ms`))
      }, timeoutMs)
      this._pending.set(ref, { resolve, reject, timer })
    })
  }

  _onMessage(data) {
    const m = decode(data)
    if (!m) return
    if (m.event === 'phx_reply' && m.ref != null) {
      if (m.topic === 'phoenix' && m.ref === this._heartbeatRef) {
        this._heartbeatRef = null
        return
      }
      const p = this._pending.get(m.ref)
      if (p) {
        this._pending.delete(m.ref)
        clearTimeout(p.timer)
        p.resolve(m.payload ?? {})
        return
      }
    }
    if (typeof m.topic !== 'string' || !m.topic.startsWith('realtime:')) return
    const ch = this.channels.get(m.topic.slice('realtime:'.length))
    if (ch) ch._onMessage(m)
  }

  // ---------------------------------------------------------------------------------------
  // REST
  // ---------------------------------------------------------------------------------------

  _authHeaders() {
    const key = this.token ?? this.apikey
    return key ? { Authorization: `Bearer ${key}`, apikey: this.apikey ?? key } : {}
  }

  async _rest(path, init = {}) {
    if (typeof this.fetch !== 'function') throw new Error('corecast: no fetch implementation (pass `fetch`)')
    const res = await this.fetch(`${this.endpoints.http}${path}`, {
      ...init,
      headers: { ...this._authHeaders(), ...(init.headers ?? {}) },
    })
    return res
  }
}

/** A listener threw: report it without breaking the client. */
export function reportError(e) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(e)
  else console.error('corecast: a listener threw:', e)
}
