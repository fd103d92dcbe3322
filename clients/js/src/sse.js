// Server-Sent Events push for one channel (transport 'sse'): `GET /realtime/v1/sse?topic=…`
// read with fetch (so it can carry `Authorization` and `Last-Event-ID`), resuming from the
// channel's last `epoch-offset` after every drop. Publishing goes over REST.

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
 * One channel's stream. `onOpen()`, `onMessage({ event, data })` (data parsed), `onDown()`
 * (the stream ended or failed; it reconnects by itself with `backoff(attempt)`).
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
