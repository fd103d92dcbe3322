// Server-Sent Events push (transport 'sse', and 'auto' before the upgrade): ONE stream per client
// (per privacy) for the topics of all its channels, `GET /realtime/v1/sse?topic=a&topic=b…`,
// read with fetch (so it can carry `Authorization` and `Last-Event-ID`), resuming every topic
// from its channel's last `epoch-offset` after every drop and every change of the topic list.
// Publishing goes over REST.

/** Parses an event stream incrementally; calls `onEvent({ event, data, id })`. */
export class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent
    this.buf = ''
    this.reset()
  }

  reset() {
    this.event = ''
    this.data = []
    this.id = null
  }

  push(text) {
    this.buf += text
    let i
    while ((i = this.buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buf.slice(0, i)
      const nl = this.buf[i] === '\r' && this.buf[i + 1] === '\n' ? 2 : 1
      this.buf = this.buf.slice(i + nl)
      this.line(line)
    }
  }

  line(line) {
    if (line === '') {
      if (this.data.length) this.onEvent({ event: this.event || 'message', data: this.data.join('\n'), id: this.id })
      // An `id:` with no data: the server announcing the stream's position (not dispatched
      // by EventSource either, which only updates its lastEventId).
      else if (this.id) this.onEvent({ event: 'position', data: null, id: this.id })
      this.reset()
      return
    }
    if (line.startsWith(':')) return
    const c = line.indexOf(':')
    const field = c < 0 ? line : line.slice(0, c)
    let value = c < 0 ? '' : line.slice(c + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    if (field === 'event') this.event = value
    else if (field === 'data') this.data.push(value)
    else if (field === 'id') this.id = value
  }
}

/**
 * One stream connection of an `SseGroup`. `onOpen()`, `onMessage({ event, data, id })` (data
 * parsed), `onDown()` (the stream ended or failed; it reconnects by itself with
 * `backoff(attempt)`, asking `lastEventId()` again).
 */
export class SseStream {
  constructor({ url, headers, fetch, backoff, onOpen, onMessage, onDown, onHttpError }) {
    Object.assign(this, { url, headers, fetch, backoff, onOpen, onMessage, onDown, onHttpError })
    this.attempt = 0
    this.closed = false
    this.abort = null
    this.timer = null
  }

  /** Opens (or reopens) the stream; `lastEventId()` is asked at every (re)connect. */
  start(lastEventId) {
    this.lastEventId = lastEventId
    this.closed = false
    this.open()
  }

  close() {
    this.closed = true
    clearTimeout(this.timer)
    this.timer = null
    if (this.abort) this.abort.abort()
    this.abort = null
  }

  /** Cuts the current connection as a network failure would (it reconnects). For tests. */
  drop() {
    this.dropping = true
    if (this.abort) this.abort.abort()
  }

  async open() {
    if (this.closed) return
    const ctl = new AbortController()
    this.abort = ctl
    const headers = { Accept: 'text/event-stream', ...this.headers() }
    const last = this.lastEventId()
    if (last) headers['Last-Event-ID'] = last
    let opened = false
    try {
      const res = await this.fetch(this.url(), { headers, signal: ctl.signal })
      if (res.status !== 200 || !res.body) {
        this.onHttpError?.(res.status)
        const body = await res.text().catch(() => '')
        throw new Error(`corecast: SSE got HTTP ${res.status}: ${body}`)
      }
      opened = true
      this.attempt = 0
      this.onOpen()
      const parser = new EventStreamParser((e) => {
        if (e.data === null) return this.onMessage({ event: e.event, data: null, id: e.id })
        let data
        try {
          data = JSON.parse(e.data)
        } catch {
          return
        }
        this.onMessage({ event: e.event, data, id: e.id })
      })
      const reader = res.body.getReader()
      const dec = new TextDecoder()
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        parser.push(dec.decode(value, { stream: true }))
      }
    } catch (e) {
      if (this.closed || (ctl.signal.aborted && !this.dropping)) return
      if (!opened) this.lastError = e
    }
    this.dropping = false
    if (this.closed || this.abort !== ctl) return
    this.abort = null
    this.onDown()
    this.timer = setTimeout(() => {
      this.timer = null
      this.open()
    }, this.backoff(this.attempt++))
  }
}

/** `epoch-offset` per topic joined with `.` → `[{ epoch, offset } | null]` (`null` for `*` or a
 *  malformed entry). */
export function parseToken(token) {
  if (typeof token !== 'string' || token === '') return []
  return token.split('.').map((p) => {
    const i = p.lastIndexOf('-')
    if (i <= 0) return null
    const offset = Number(p.slice(i + 1))
    return Number.isSafeInteger(offset) && offset >= 0 ? { epoch: p.slice(0, i), offset } : null
  })
}

/** The resume token for `positions` (`{ epoch, offset }` or `null`, in topic order): `*` for
 *  a topic without a position (the server starts it live); `null` when no topic has one. */
export function buildToken(positions) {
  if (!positions.some((p) => p)) return null
  return positions.map((p) => (p ? `${p.epoch}-${p.offset}` : '*')).join('.')
}

/** How long the stream before a reopen keeps delivering, after the new one opened, to channels
 *  that had no position to resume from. */
const BRIDGE_GRACE_MS = 300
// How long a reopen waits for the open stream to announce its position (an older server never does).
const ANNOUNCE_WAIT_MS = 2000

/**
 * One event stream for several channels (transport 'sse', and 'auto' before the upgrade):
 * `GET /sse?topic=a&topic=b…`, every topic multiplexed. A change of the channel list reopens
 * it (once per tick, however many channels changed) with the new topics and a `Last-Event-ID`
 * built from each channel's last position (`*` for a channel with none yet), so nothing is
 * lost or delivered twice across the reopen; a drop reconnects the same way.
 *
 * `client` provides `endpoints`, `fetch`, `_authHeaders()`, `_sseBackoff(n)`, `_mode`,
 * `transport`, `_wanted`, `_streamUp(group)`, `_streamDown(group)`, `_streamGone(group)` and
 * `_upgrade(why)`. Channels provide `topic`, `epoch`, `offset`, `_streamOpened()`,
 * `_streamLost()`, `_onStreamEvent(event, data)` and `_adoptPosition(epoch, offset)`.
 */
export class SseGroup {
  constructor(client, key, { private: priv = false, track = null } = {}) {
    this.client = client
    this.key = key
    this.private = priv
    /** `{ state, key }` for a stream that tracks presence (one channel), else null. */
    this.track = track
    /** Channels routed by this group, in attach order. */
    this.channels = []
    /** The channels (topic order) of the stream now open or opening. */
    this.topics = []
    this.stream = null
    this.scheduled = false
    this.closed = false
  }

  add(ch) {
    if (!this.channels.includes(ch)) this.channels.push(ch)
    this.schedule()
  }

  /** Stops routing to `ch`; in SSE mode the stream reopens without it. Closes an empty group
   *  at once. */
  remove(ch) {
    const i = this.channels.indexOf(ch)
    if (i >= 0) this.channels.splice(i, 1)
    if (this.channels.length === 0) return this.close()
    // Upgrading to the WebSocket: the channels leave one by one as they join; the stream
    // keeps its topics until the last one left (their events are ignored meanwhile).
    if (this.client._mode === 'sse') this.schedule()
  }

  /** Reopens at the end of this tick even with the same topics (a new token). */
  restart() {
    this.force = true
    this.schedule()
  }

  /** Reopens (with the current channels) at the end of this tick. */
  schedule() {
    if (this.scheduled || this.closed) return
    this.scheduled = true
    queueMicrotask(() => {
      this.scheduled = false
      this.reopen()
    })
  }

  close() {
    if (this.closed) return
    this.closed = true
    clearTimeout(this.announceTimer)
    this.announceTimer = null
    if (this.bridge) {
      clearTimeout(this.bridge.graceTimer)
      this.bridge.stream.close()
      this.bridge = null
    }
    if (this.stream) this.stream.close()
    this.stream = null
    this.topics = []
    this.client._streamGone(this)
  }

  /** Cuts the current connection as a network failure would (it reconnects). For tests. */
  drop() {
    this.stream?.drop()
  }

  _position(ch) {
    return ch.epoch !== null && ch.offset !== null ? { epoch: ch.epoch, offset: ch.offset } : null
  }

  reopen() {
    if (this.closed) return
    if (this.channels.length === 0 || !this.client._wanted) return this.close()
    // Upgrading to the WebSocket: the stream carries on as it is until its channels joined
    // over the socket (one that never opened is not needed at all).
    if (this.client._mode !== 'sse') {
      if (!this.stream) this.close()
      return
    }
    const same =
      this.stream && this.topics.length === this.channels.length && this.topics.every((c, i) => c === this.channels[i])
    if (same && !this.force) return
    // A bridge (below) still running: once its new stream is open it ends after a short
    // grace, and this reopen waits for that.
    if (this.bridge?.graceTimer) {
      this.bridge.reopen = true
      return
    }
    const client = this.client
    const topics = [...this.channels]
    const old = this.stream
    const oldTopics = this.topics
    // The open stream announces every topic's position once the server knows them (an `id:`
    // event with no data): wait for it, so that no channel goes on the new stream without a
    // position. Only a server that never announces (an older corecast) falls back, after
    // ANNOUNCE_WAIT_MS, to the bridge below.
    if (!this.bridge && old?.isUp && !old.announced && !old.announceWaited &&
        topics.some((ch) => oldTopics.includes(ch) && !this._position(ch))) {
      if (!this.announceTimer) {
        this.announceTimer = setTimeout(() => {
          this.announceTimer = null
          old.announceWaited = true
          this.schedule()
        }, ANNOUNCE_WAIT_MS)
      }
      return
    }
    clearTimeout(this.announceTimer)
    this.announceTimer = null
    this.force = false
    if (this.bridge) {
      // The stream after the bridged one never opened: it is replaced, the bridge stays for
      // the channels that still have no position.
      old?.close()
      for (const ch of [...this.bridge.chans]) if (!topics.includes(ch) || this._position(ch)) this.bridge.chans.delete(ch)
      if (this.bridge.chans.size === 0) this._endBridge()
    } else {
      // Channels on the open stream that know no position yet (nothing arrived on it since it
      // opened) go on the new stream as `*` (started live). So that nothing published just
      // before the new stream took over is lost, the old stream stays open for their
      // broadcasts until the new one is open and a grace after; meanwhile their broadcasts on
      // the new stream wait, and are then delivered through the duplicate check (what the old
      // one delivered is dropped).
      const bridged = old?.isUp ? topics.filter((ch) => oldTopics.includes(ch) && !this._position(ch)) : []
      if (bridged.length) {
        this.bridge = { stream: old, chans: new Set(bridged), buffer: [], graceTimer: null, reopen: false }
      } else old?.close()
    }
    this.topics = topics
    const stream = new SseStream({
      url: () => {
        const q = new URLSearchParams()
        for (const ch of topics) q.append('topic', ch.topic)
        q.set('presence', 'true')
        if (this.private) q.set('private', 'true')
        if (this.track) {
          q.set('track', JSON.stringify(this.track.state))
          q.set('presence_key', this.track.key)
        }
        return `${client.endpoints.http}/sse?${q}`
      },
      headers: () => client._authHeaders(),
      fetch: client.fetch,
      backoff: (n) => client._sseBackoff(n),
      onOpen: () => {
        if (this.stream !== stream) return
        stream.isUp = true
        if (this.bridge && !this.bridge.graceTimer) {
          this.bridge.graceTimer = setTimeout(() => this._endBridge(), BRIDGE_GRACE_MS)
        }
        client._streamUp(this)
        for (const ch of topics) if (this.channels.includes(ch)) ch._streamOpened()
      },
      onMessage: ({ event, data, id }) => {
        if (this.stream === stream && event === 'position') {
          stream.announced = true
          this._onEvent(topics, event, data, id)
          if (this.announceTimer) this.schedule() // a reopen was waiting for this
          return
        }
        if (this.stream === stream) return this._onEvent(topics, event, data, id)
        const b = this.bridge
        if (b?.stream !== stream || event !== 'broadcast') return
        // The old stream, for the bridged channels' broadcasts only.
        const ch = topics.find((c) => c.topic === data?.topic)
        if (ch && b.chans.has(ch) && this.channels.includes(ch)) ch._onStreamEvent(event, data)
      },
      onDown: () => {
        if (this.bridge?.stream === stream) return this._endBridge()
        if (this.stream !== stream) return
        stream.isUp = false
        for (const ch of topics) if (this.channels.includes(ch)) ch._streamLost()
        client._streamDown(this)
      },
      onHttpError: (status) => {
        // `auto`: a server (or proxy) that does not serve the stream: use the WebSocket.
        if (this.stream === stream && client.transport === 'auto' && status !== 401 && status !== 403) {
          client._upgrade(`SSE unavailable (HTTP ${status})`)
        }
      },
    })
    // A planned reopen (topics or token changed) is not a reconnect: the client's status
    // stays as it is unless the new connection fails.
    this.stream = stream
    stream.start(() => buildToken(topics.map((ch) => this._position(ch))))
  }

  /** Ends the bridge: closes the old stream, then delivers what the new one held back. */
  _endBridge() {
    const b = this.bridge
    if (!b) return
    this.bridge = null
    clearTimeout(b.graceTimer)
    b.stream.close()
    for (const [ch, event, data] of b.buffer) if (this.channels.includes(ch)) ch._onStreamEvent(event, data)
    if (b.reopen) this.schedule()
  }

  _onEvent(topics, event, data, id) {
    if (event === 'position' && id) return this._adoptAll(topics, null, id)
    if (!data || typeof data.topic !== 'string') return
    const ch = topics.find((c) => c.topic === data.topic)
    if (!ch || !this.channels.includes(ch)) return
    if (this.bridge?.chans.has(ch) && event === 'broadcast') this.bridge.buffer.push([ch, event, data])
    else ch._onStreamEvent(event, data)
    if (event !== 'broadcast' || !id) return
    // The token has every topic's position on this stream: a channel that has seen nothing
    // yet (or whose topic moved on without a message for it) learns where it stands, so a
    // reopen resumes it instead of starting it live.
    this._adoptAll(topics, ch, id)
  }

  /** Every channel but `except` (and those being bridged) takes its position from `id`. */
  _adoptAll(topics, except, id) {
    const positions = parseToken(id)
    if (positions.length !== topics.length) return
    topics.forEach((c, i) => {
      if (c !== except && positions[i] && this.channels.includes(c) && !this.bridge?.chans.has(c)) c._adoptPosition(positions[i].epoch, positions[i].offset)
    })
  }
}
