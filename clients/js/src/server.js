// The server-side client: publishing over REST with the service key.

import { endpoints } from './wire.js'

export class ServerClient {
  constructor(url, { serviceKey, fetch } = {}) {
    this.endpoints = endpoints(url)
    this.serviceKey = serviceKey ?? null
    this.fetch = fetch ?? globalThis.fetch?.bind(globalThis)
    /** Aerostack style: `sdk.socket.emit(event, data, topic)`. */
    this.socket = { emit: (...args) => this.emit(...args) }
  }

  /**
   * Broadcasts `data` as `event` to every subscriber of `topic` (`POST /api/broadcast`).
   * Resolves once the server accepted it (`202`: sequenced, and durable with `persist`).
   */
  async emit(event, data, topic, { persist, private: isPrivate, id } = {}) {
    if (typeof event !== 'string' || event === '') throw new TypeError('corecast: emit() needs an event name')
    if (typeof topic !== 'string' || topic === '') throw new TypeError('corecast: emit() needs a topic')
    const msg = { topic, event, payload: data === undefined ? null : data }
    if (persist) msg.persist = persist
    if (isPrivate) msg.private = true
    if (id) msg.id = id
    return this.emitMany([msg])
  }

  /** Publishes several `{ topic, event, payload, persist?, private?, id? }` in one request. */
  async emitMany(messages) {
    if (typeof this.fetch !== 'function') throw new Error('corecast: no fetch implementation (pass `fetch`)')
    const headers = { 'Content-Type': 'application/json' }
    if (this.serviceKey) {
      headers.Authorization = `Bearer ${this.serviceKey}`
      headers.apikey = this.serviceKey
    }
    const res = await this.fetch(`${this.endpoints.http}/api/broadcast`, {
      method: 'POST',
      headers,
      body: JSON.stringify({ messages }),
    })
    if (res.status !== 202) {
      const body = await res.text().catch(() => '')
      const e = new Error(`corecast: emit got HTTP ${res.status}: ${body}`)
      e.status = res.status
      throw e
    }
    await res.body?.cancel?.().catch?.(() => {})
    return 'ok'
  }
}
