// The code samples of the two product documents (../shared/seeds: the Aerostack "Realtime —
// SDK" and Atelier "Realtime" pages), run against the real server. Plain snippets are as
// printed, with only the imports and the client construction changed; the React samples run
// their `useEffect` bodies with the state setters replaced by plain variables.

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { createClient, createServerClient } from '../src/index.js'
import { WebSocket, sleep, startServer, until } from './helpers.mjs'

describe('document samples', { concurrency: true }, () => {
  it('Aerostack: ChatRoom (subscribe), publish (client-side, with persistence), publish from the server, unsubscribe', async (t) => {
    const srv = await startServer(t)
    const realtime = createClient(srv.url, { WebSocket })
    const sdk = { socket: createServerClient(srv.url).socket }
    t.after(() => realtime.disconnect())
    const roomId = `r${Date.now()}`
    const currentUser = { name: 'Ann' }
    // ChatRoom's effect:
    let messages = []
    const setMessages = (f) => (messages = f(messages))
    let typing = 0
    const channel = realtime.channel(`chat/${roomId}`)
    channel
      .on('message', ({ data }) => {
        setMessages((prev) => [...prev, data])
      })
      .on('typing', ({ data }) => {
        // Show typing indicator
        typing++
      })
      .subscribe()
    const cleanup = () => channel.unsubscribe()
    await until(() => channel.state === 'joined', { label: 'joined' })
    // "Publish to a channel (client-side)":
    {
      const channel = realtime.channel(`chat/${roomId}`)
      // Publish a message (broadcast to all subscribers)
      channel.publish('message', {
        id: crypto.randomUUID(),
        user: currentUser.name,
        text: 'Hello everyone!',
        timestamp: Date.now(),
      })
      // Publish with persistence (stored in DB for history)
      await channel.publish('message', { id: crypto.randomUUID(), user: currentUser.name, text: 'kept' }, { persist: true })
    }
    // "Publish from the server":
    const userId = roomId
    sdk.socket.emit('message', { id: crypto.randomUUID(), user: 'System', text: 'Order #1234 has been shipped' }, `notifications/${userId}`)
    await sdk.socket.emit('message', { id: crypto.randomUUID(), user: 'System', text: 'to the room' }, `chat/${roomId}`)
    await channel.publish('typing', {})
    await until(() => messages.length === 3 && typing === 1, { label: 'three messages and a typing event', describe: () => JSON.stringify(messages) })
    assert.deepEqual(messages.map((m) => m.text), ['Hello everyone!', 'kept', 'to the room'])
    // Message history: only the persisted one.
    const history = await channel.getHistory(50)
    assert.deepEqual(history.map((h) => h.data.text), ['kept'])
    await cleanup()
  })

  it('Aerostack: message history (publish with persistence, getHistory, paginate before a timestamp)', async (t) => {
    const srv = await startServer(t)
    const realtime = createClient(srv.url, { WebSocket })
    t.after(() => realtime.disconnect())
    const user = { id: 'u-1' }
    const channel = realtime.channel(`chat/history-${Date.now()}`)
    await channel.subscribe()
    for (let i = 0; i < 60; i++) {
      await channel.publish('message', {
        userId: user.id,
        text: `This message will be saved ${i}`,
        timestamp: Date.now(),
      }, { persist: true })  // <-- messages are stored in DB
      if (i % 10 === 9) await sleep(2)
    }
    // Get the last 50 messages
    const messages = await channel.getHistory(50)
    // Paginate: get 50 messages before a timestamp
    const older = await channel.getHistory(50, messages[messages.length - 1].created_at)
    assert.equal(messages.length, 50)
    assert.equal(messages[0].data.text, 'This message will be saved 59')
    assert.ok(older.length > 0 && older.length <= 10, `older: ${older.length}`)
    assert.ok(older.every((h) => h.created_at < messages[messages.length - 1].created_at))
    assert.equal(older[older.length - 1].data.text, 'This message will be saved 0')
  })

  it('Aerostack: OnlineUsers (track before subscribe, presence:join / update / leave, untrack + unsubscribe)', async (t) => {
    const srv = await startServer(t)
    const mk = () => {
      const c = createClient(srv.url, { WebSocket })
      t.after(() => c.disconnect())
      return c
    }
    const roomId = `p${Date.now()}`
    const mount = (realtime, user) => {
      let online = new Map()
      const setOnline = (f) => (online = f(online))
      const channel = realtime.channel(`room/${roomId}`)
      // Announce your presence
      channel.track({
        userId: user.id,
        name: user.name,
        color: '#FF5733',
        status: 'active',
      })
      // Listen for others joining/leaving
      channel
        .on('presence:join', ({ data }) => {
          setOnline((prev) => new Map(prev).set(data.userId, data))
        })
        .on('presence:update', ({ data }) => {
          setOnline((prev) => new Map(prev).set(data.userId, data))
        })
        .on('presence:leave', ({ data }) => {
          setOnline((prev) => {
            const next = new Map(prev)
            next.delete(data.userId)
            return next
          })
        })
        .subscribe()
      return {
        channel,
        online: () => online,
        cleanup: () => {
          channel.untrack() // Remove your presence
          channel.unsubscribe() // Disconnect from channel
        },
      }
    }
    const alice = mount(mk(), { id: 'a', name: 'Alice' })
    const bob = mount(mk(), { id: 'b', name: 'Bob' })
    await until(() => alice.online().size === 2 && bob.online().size === 2, { label: 'both online for both' })
    // Update presence state: call track() again.
    bob.channel.track({ userId: 'b', name: 'Bob', cursor: { line: 42, col: 15 }, selection: { start: 100, end: 150 } })
    await until(() => alice.online().get('b')?.cursor?.line === 42, { label: 'update seen' })
    bob.cleanup()
    await until(() => alice.online().size === 1, { label: 'Bob left' })
    assert.deepEqual([...alice.online().keys()], ['a'])
    alice.cleanup()
  })

  it('Aerostack: connection management (onStatusChange, connect/disconnect, setToken)', async (t) => {
    const srv = await startServer(t)
    const realtime = createClient(srv.url, { WebSocket })
    t.after(() => realtime.disconnect())
    let status = 'idle'
    const setStatus = (s) => (status = s)
    const seen = []
    const unsub = realtime.onStatusChange((newStatus) => {
      // 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'disconnected'
      setStatus(newStatus)
      seen.push(newStatus)
    })
    // The SDK connects automatically on mount, but you can control it manually:
    await realtime.connect()
    assert.equal(status, 'connected')
    realtime.disconnect()
    assert.equal(status, 'disconnected')
    const newAccessToken = 'a-refreshed-token'
    realtime.setToken(newAccessToken)
    unsub()
    assert.deepEqual(seen, ['idle', 'connecting', 'connected', 'disconnected'])
  })

  it('Aerostack overview: chat/engineering with sdk.socket.emit; live analytics dashboard broadcast channel', async (t) => {
    const srv = await startServer(t)
    const realtime = createClient(srv.url, { WebSocket })
    t.after(() => realtime.disconnect())
    const sdk = { socket: createServerClient(srv.url).socket }
    const got = []
    const addMessage = (d) => got.push(d)
    const channel = realtime.channel('chat/engineering')
    channel.on('message', ({ data }) => {
      addMessage(data)
    })
    await channel.subscribe()
    const [text, author, timestamp] = ['hi', 'Ann', Date.now()]
    // Send a message from any client
    sdk.socket.emit('message', { text, author, timestamp }, 'chat/engineering')
    let metrics = { activeUsers: 0, ordersToday: 0, revenue: 0 }
    const setMetrics = (m) => (metrics = m)
    const dash = realtime.channel('dashboard/metrics')
    dash
      .on('metrics:update', ({ data }) => {
        setMetrics(data)
      })
      .subscribe()
    await until(() => dash.state === 'joined', { label: 'dashboard joined' })
    await sdk.socket.emit('metrics:update', { activeUsers: 3, ordersToday: 7, revenue: 12.5 }, 'dashboard/metrics')
    await until(() => got.length === 1 && metrics.activeUsers === 3, { label: 'message and metrics' })
    assert.deepEqual(got, [{ text, author, timestamp }])
  })

  it('Atelier: subscribe (broadcast cursor, presence), send, presence.track / untrack', async (t) => {
    const srv = await startServer(t)
    const atelier = createClient(srv.url, { WebSocket })
    const other = createClient(srv.url, { WebSocket })
    t.after(() => (atelier.disconnect(), other.disconnect()))
    const cursors = []
    const states = []
    const channel = atelier.channel('room-42')
    channel.on('broadcast', { event: 'cursor' }, (payload) => {
      // { x, y, color }
      cursors.push(payload)
    })
    channel.on('presence', (state) => {
      // { joined, left, users }
      states.push(state)
    })
    await channel.subscribe()
    const peer = other.channel('room-42')
    await peer.subscribe()
    peer.send({ event: 'cursor', payload: { x: 120, y: 480, color: '#000' } })
    peer.presence.track({ name: 'Ryan', cursor: { x: 0, y: 0 } })
    await until(() => cursors.length === 1 && states.some((s) => s.users.some((u) => u.name === 'Ryan')), { label: 'cursor and presence' })
    assert.deepEqual(cursors[0], { x: 120, y: 480, color: '#000' })
    peer.presence.untrack()
    await until(() => states.at(-1).left.some((u) => u.name === 'Ryan') && states.at(-1).users.length === 0, { label: 'Ryan left' })
  })
})
