// Type declarations for @corecast/client (hand-written; the package is plain ES modules).

export type ConnectionStatus = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'disconnected'

/** A WebSocket constructor with the W3C API (the browser's, or the `ws` package in Node). */
export interface WebSocketLike {
  new (url: string, protocols?: string | string[]): {
    binaryType: string
    readyState: number
    send(data: string | ArrayBuffer): void
    close(code?: number, reason?: string): void
    onopen: ((ev: any) => void) | null
    onmessage: ((ev: { data: any }) => void) | null
    onclose: ((ev: any) => void) | null
    onerror: ((ev: any) => void) | null
  }
}

export interface ClientOptions {
  /** The user's JWT: carried by every join (`access_token`), used for REST calls, and as the
   *  connect apikey when `apikey` is not given. */
  token?: string | null
  /** The connect key (an anon key, say); default: `token`. */
  apikey?: string | null
  /** `'auto'` (default: event streams while only listening and publishing, one WebSocket once
   *  presence, table changes or a high publish rate need it) | `'websocket'` | `'sse'`. */
  transport?: 'auto' | 'websocket' | 'sse'
  /** WebSocket implementation; default `globalThis.WebSocket`. Node 20: `import WebSocket from 'ws'`. */
  WebSocket?: WebSocketLike
  /** fetch implementation; default `globalThis.fetch`. */
  fetch?: typeof fetch
  /** Heartbeat period (default 25000 ms); a heartbeat unanswered by the next one reconnects. */
  heartbeatIntervalMs?: number
  /** Reply timeout for joins and pushes (default 10000 ms). */
  timeoutMs?: number
  /** Reconnect backoff: `baseMs * 2^n` capped at `maxMs`, shortened by up to `jitter` (a fraction). */
  reconnect?: { baseMs?: number; maxMs?: number; jitter?: number }
  /** Delays between join retries after a refused join or a channel closed by the server. */
  rejoinMs?: number[]
}

export interface ChannelOptions {
  /** Receive your own broadcasts (default true). */
  self?: boolean
  /** The private channel of this name (default false). */
  private?: boolean
  /** Presence key of this client on the channel (default a random UUID). */
  presenceKey?: string
}

export interface BroadcastMeta {
  id?: string
  offset?: number
  epoch?: string
  user_id?: string
  replayed?: boolean
  [k: string]: unknown
}

/** What custom events and table changes deliver (the Aerostack document's RealtimePayload). */
export interface RealtimePayload<T = any> {
  type: 'db_change' | 'event'
  topic: string
  /** DB changes only. */
  operation?: 'INSERT' | 'UPDATE' | 'DELETE'
  /** Custom events only. */
  event?: string
  /** The new/current row, the deleted row, or the event data. */
  data: T
  /** The previous row (UPDATE and DELETE), as the table's replica identity gives it. */
  old?: T
  /** The publisher's `sub`, when the server knows it. */
  userId?: string
  /** Unix ms. */
  timestamp?: number
  /** Custom events: the server's `meta` (id, offset, epoch, …). */
  meta?: BroadcastMeta
}

export interface PresenceEvent<T = any> {
  type: 'presence'
  event: 'join' | 'update' | 'leave'
  topic: string
  key: string
  data: T
  timestamp: number
}

export interface PresenceSummary<T = any> {
  joined: T[]
  left: T[]
  users: T[]
}

/** Emitted when the server cannot resume the channel from the last position seen. */
export interface GapEvent {
  type: 'gap'
  topic: string
  message: string
  /** The stream position this client had seen last. */
  lastEpoch: string | null
  lastOffset: number | null
  /** The stream as the server has it now. */
  epoch: string | null
  oldestOffset: number | null
}

export interface SystemMessage {
  extension?: string
  status?: 'ok' | 'error'
  message?: string
  [k: string]: unknown
}

/** Atelier style: what `on('postgres_changes', …)` delivers. */
export interface PostgresChange<T = any> {
  op: 'INSERT' | 'UPDATE' | 'DELETE'
  row: T | null
  old_row: Partial<T> | null
  user_id: string | null
  schema?: string
  table?: string
  commit_timestamp?: string
}

export interface PostgresChangesFilter {
  /** `table` or `schema.table`. */
  table: string
  schema?: string
  op?: 'INSERT' | 'UPDATE' | 'DELETE' | '*'
  /** Column equalities, `{ user_id: me.id }` (or a server filter string `col=eq.value`). */
  filter?: Record<string, string | number | boolean | null> | string
}

export interface HistoryMessage<T = any> {
  id: string
  room_id: string
  user_id: string | null
  event: string
  data: T
  /** Unix ms. */
  created_at: number
  offset?: number
  epoch?: string
}

export interface PublishOptions {
  /** Store it for history (`true`, or `{ ttl: seconds }`). */
  persist?: boolean | { ttl: number }
}

export declare class Channel {
  readonly topic: string
  /** `closed` | `joining` | `joined` | `leaving` */
  readonly state: string
  /** Position of the last broadcast seen (resumed from on every rejoin). */
  readonly epoch: string | null
  readonly offset: number | null
  readonly presence: {
    track(state: Record<string, unknown>): Promise<string>
    untrack(): Promise<string>
    readonly users: any[]
    readonly state: Record<string, any[]>
  }

  on(event: 'INSERT' | 'UPDATE' | 'DELETE', cb: (p: RealtimePayload) => void): this
  on(event: 'presence:join' | 'presence:update' | 'presence:leave', cb: (p: PresenceEvent) => void): this
  on(event: 'presence', cb: (s: PresenceSummary) => void): this
  on(event: 'gap', cb: (g: GapEvent) => void): this
  on(event: 'system', cb: (m: SystemMessage) => void): this
  on(event: 'error', cb: (e: Error) => void): this
  on(event: 'postgres_changes', filter: PostgresChangesFilter, cb: (c: PostgresChange) => void): this
  on(event: 'broadcast', filter: { event?: string }, cb: (payload: any, full: RealtimePayload) => void): this
  on(event: 'broadcast', cb: (payload: any, full: RealtimePayload) => void): this
  on(event: '*', cb: (p: any) => void): this
  on(event: string, cb: (p: RealtimePayload) => void): this
  off(event: string, cb?: (...args: any[]) => void): this

  subscribe(): Promise<this>
  unsubscribe(): Promise<void>
  publish(event: string, data: any, opts?: PublishOptions): Promise<'ok'>
  send(msg: { event: string; payload?: any; persist?: PublishOptions['persist'] }): Promise<'ok'>
  track(state: Record<string, unknown>): Promise<string>
  untrack(): Promise<string>
  presenceState(): Record<string, any[]>
  /** Persisted messages, newest first; `before`: only those created before it (Unix ms). */
  getHistory(limit?: number, before?: number): Promise<HistoryMessage[]>
}

export declare class RealtimeClient {
  readonly status: ConnectionStatus
  readonly transport: 'auto' | 'websocket' | 'sse'
  /** `auto`: why it upgraded to the WebSocket (undefined while it has not). */
  readonly upgradedBecause?: string
  connect(): Promise<void>
  disconnect(): void
  channel(topic: string, opts?: ChannelOptions): Channel
  getChannels(): Channel[]
  /** Calls `cb` with the current status now and on every change; returns the unsubscribe function. */
  onStatusChange(cb: (status: ConnectionStatus) => void): () => void
  setToken(token: string | null): void
}

export interface ServerClientOptions {
  /** A service-role JWT (or any token the server accepts for publishing). */
  serviceKey?: string
  fetch?: typeof fetch
}

export interface EmitOptions extends PublishOptions {
  private?: boolean
  /** Message id (default: the server makes one). */
  id?: string
}

export declare class ServerClient {
  emit(event: string, data: any, topic: string, opts?: EmitOptions): Promise<'ok'>
  emitMany(
    messages: { topic: string; event: string; payload: any; persist?: PublishOptions['persist']; private?: boolean; id?: string }[]
  ): Promise<'ok'>
  /** Aerostack style: `sdk.socket.emit(event, data, topic)`. */
  readonly socket: { emit(event: string, data: any, topic: string, opts?: EmitOptions): Promise<'ok'> }
}

export declare function createClient(url: string, opts?: ClientOptions): RealtimeClient
export declare function createServerClient(url: string, opts?: ServerClientOptions): ServerClient
export declare function backoffDelay(
  attempt: number,
  opts?: { baseMs?: number; maxMs?: number; jitter?: number },
  random?: () => number
): number
export declare const STATUSES: ConnectionStatus[]
