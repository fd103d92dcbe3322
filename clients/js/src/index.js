// @corecast/client: corecast's own realtime client.

import { RealtimeClient, backoffDelay, STATUSES } from './client.js'
import { ServerClient } from './server.js'
import { Channel } from './channel.js'

/**
 * A realtime client for the corecast server at `url` (`http(s)://host:port`, optionally ending
 * in `/realtime/v1`). Options: `token` (the user's JWT), `apikey` (the connect key, default the
 * token), `transport` (`'auto'` | `'websocket'`; `'sse'` is not built yet), `WebSocket` (an
 * implementation, e.g. the `ws` package in Node 20), `fetch`, `heartbeatIntervalMs`,
 * `timeoutMs`, `reconnect: { baseMs, maxMs, jitter }`.
 */
export function createClient(url, opts = {}) {
  return new RealtimeClient(url, opts)
}

/** A server-side client that publishes over REST with the service key. */
export function createServerClient(url, opts = {}) {
  return new ServerClient(url, opts)
}

export { RealtimeClient, ServerClient, Channel, backoffDelay, STATUSES }
