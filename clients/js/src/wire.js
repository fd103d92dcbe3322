// The Phoenix channel protocol as corecast speaks it (vsn 2.0.0): JSON text arrays
// `[join_ref, ref, topic, event, payload]`, binary kind 3 (user broadcast push, client → server)
// and kind 4 (user broadcast, server → client). See reference/realtime-protocol.md §1.2.

const enc = new TextEncoder()
const dec = new TextDecoder()

/** The server's base URLs from what the caller gave: `http(s)://host[:port][/realtime/v1]` or
 *  `ws(s)://…`. Returns `{ http, ws }`, both ending in `/realtime/v1`. */
export function endpoints(url) {
  if (typeof url !== 'string' || url === '') throw new TypeError('corecast: a server URL is required')
  let u = url.replace(/\/+$/, '')
  if (!/^[a-z]+:\/\//i.test(u)) u = `http://${u}`
  u = u.replace(/\/realtime\/v1$/, '').replace(/\/socket$/, '')
  const http = u.replace(/^ws(s?):/i, 'http$1:')
  const ws = http.replace(/^http(s?):/i, 'ws$1:')
  return { http: `${http}/realtime/v1`, ws: `${ws}/realtime/v1` }
}

/** The Phoenix wire topic of a channel name. */
export const wireTopic = (topic) => `realtime:${topic}`

export function encodeText(joinRef, ref, topic, event, payload) {
  return JSON.stringify([joinRef ?? null, ref ?? null, topic, event, payload])
}

/**
 * A kind-3 frame: a user broadcast push. `payload` is JSON-encoded (encoding 1) unless it is an
 * ArrayBuffer or a typed array (encoding 0, raw bytes). `metadata` is an object (`{persist}`) or
 * null.
 */
export function encodeUserBroadcast(joinRef, ref, topic, event, payload, metadata) {
  const jr = enc.encode(joinRef ?? '')
  const rf = enc.encode(ref ?? '')
  const tp = enc.encode(topic)
  const ev = enc.encode(event)
  const md = enc.encode(metadata ? JSON.stringify(metadata) : '')
  for (const [name, b] of [
    ['join_ref', jr],
    ['ref', rf],
    ['topic', tp],
    ['event', ev],
    ['metadata', md],
  ]) {
    if (b.length > 255) throw new RangeError(`corecast: ${name} is longer than 255 bytes`)
  }
  let body
  let encoding
  if (payload instanceof ArrayBuffer) {
    body = new Uint8Array(payload)
    encoding = 0
  } else if (ArrayBuffer.isView(payload)) {
    body = new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength)
    encoding = 0
  } else {
    body = enc.encode(JSON.stringify(payload === undefined ? null : payload))
    encoding = 1
  }
  const out = new Uint8Array(7 + jr.length + rf.length + tp.length + ev.length + md.length + body.length)
  out.set([3, jr.length, rf.length, tp.length, ev.length, md.length, encoding], 0)
  let o = 7
  for (const b of [jr, rf, tp, ev, md, body]) {
    out.set(b, o)
    o += b.length
  }
  return out.buffer
}

/**
 * Decodes one frame into `{ joinRef, ref, topic, event, payload }`, or null when it is not a
 * message this client understands. Kind 4 becomes a `broadcast` message with payload
 * `{ type: 'broadcast', event, payload, meta }` (binary payloads stay ArrayBuffers).
 */
export function decode(data) {
  if (typeof data === 'string') {
    let m
    try {
      m = JSON.parse(data)
    } catch {
      return null
    }
    if (!Array.isArray(m) || m.length !== 5) return null
    const [joinRef, ref, topic, event, payload] = m
    return { joinRef, ref, topic, event, payload }
  }
  const b = toBytes(data)
  if (!b || b.length < 5 || b[0] !== 4) return null
  const [tl, el, ml, encoding] = [b[1], b[2], b[3], b[4]]
  let o = 5
  const take = (n) => {
    const s = b.subarray(o, o + n)
    o += n
    return s
  }
  const topic = dec.decode(take(tl))
  const event = dec.decode(take(el))
  const metaText = dec.decode(take(ml))
  const rest = b.subarray(o)
  let payload
  try {
    payload = encoding === 1 ? JSON.parse(dec.decode(rest)) : rest.slice().buffer
  } catch {
    return null
  }
  let meta
  if (metaText) {
    try {
      meta = JSON.parse(metaText)
    } catch {
      meta = undefined
    }
  }
  return { joinRef: null, ref: null, topic, event: 'broadcast', payload: { type: 'broadcast', event, payload, meta } }
}

function toBytes(data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data)
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  // Node's `ws` with binaryType 'nodebuffer' or an array of fragments.
  if (Array.isArray(data)) {
    const parts = data.map(toBytes)
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
    let o = 0
    for (const p of parts) (out.set(p, o), (o += p.length))
    return out
  }
  return null
}

/** Atelier-style filter object `{ col: value, … }` → the server's `col=eq.value[,…]`. */
export function filterString(filter) {
  if (filter == null) return undefined
  if (typeof filter === 'string') return filter
  const parts = Object.entries(filter).map(([col, v]) => `${col}=eq.${quoteValue(v)}`)
  return parts.length ? parts.join(',') : undefined
}

function quoteValue(v) {
  const s = v === null ? 'null' : String(v)
  return /[,()"\\]/.test(s) ? `"${s.replace(/["\\]/g, (c) => `\\${c}`)}"` : s
}

/** `schema.table` (default schema `public`) → `{ schema, table }`. */
export function splitTable(name) {
  const i = name.indexOf('.')
  return i < 0 ? { schema: 'public', table: name } : { schema: name.slice(0, i), table: name.slice(i + 1) }
}

/** A `created_at` (ms number, numeric string or ISO text) as Unix ms, or null. */
export function toMs(v) {
  if (typeof v === 'number') return v
  if (typeof v === 'string') {
    if (/^\d+$/.test(v)) return Number(v)
    const t = Date.parse(v)
    return Number.isNaN(t) ? null : t
  }
  return null
}
