// Table topics and Postgres changes against a real PostgreSQL: Aerostack style (a topic
// without `/` is a table: INSERT / UPDATE / DELETE listeners, `schema.table`) and Atelier style
// (`on('postgres_changes', { table, op?, filter? })`).
//
// Run through `cargo test --test integration client_js` (tests/client_js.rs), which starts
// PostgreSQL and sets DATABASE_URL (a fresh database), CORECAST_SLOT, PSQL and CORECAST_BIN.
// Skipped without DATABASE_URL.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import WebSocket from 'ws'
import { createClient } from '../src/index.js'
import { Log, Server, jwt, nowSecs, until } from './helpers.mjs'

const DB = process.env.DATABASE_URL
const PSQL = process.env.PSQL ?? 'psql'
const SECRET = 'client-js-pg-secret'
const skip = DB ? false : 'needs DATABASE_URL (run it through `cargo test --test integration client_js`)'

function sql(q) {
  return execFileSync(PSQL, ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', DB, '-c', q], {
    encoding: 'utf8',
  }).trim()
}

const token = (claims) => jwt(SECRET, { exp: nowSecs() + 3600, role: 'authenticated', ...claims })

let srv
const clients = []

before(async () => {
  if (skip) return
  sql(`DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
       CREATE TABLE orders (id text PRIMARY KEY, user_id text, total float8, status text);
       ALTER TABLE orders REPLICA IDENTITY FULL;
       CREATE TABLE todos (id serial PRIMARY KEY, user_id text, text text, done bool DEFAULT false, list_id int);
       CREATE SCHEMA shop;
       CREATE TABLE shop.items (id int PRIMARY KEY, name text);
       GRANT USAGE ON SCHEMA shop TO authenticated;
       GRANT SELECT ON orders, todos, shop.items TO authenticated;
       CREATE TABLE notes (id serial PRIMARY KEY, owner text NOT NULL, body text);
       ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
       CREATE POLICY own ON notes FOR SELECT TO authenticated
         USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
       GRANT SELECT ON notes TO authenticated;`)
  const args = ['--jwt-secret', SECRET]
  if (process.env.CORECAST_SLOT) args.push('--slot', process.env.CORECAST_SLOT)
  srv = await new Server({ args, env: { DATABASE_URL: DB } }).start()
})

after(async () => {
  for (const c of clients) c.disconnect()
  await srv?.stop()
})

function realtime(sub = 'user-1') {
  const c = createClient(srv.url, { token: token({ sub }), WebSocket })
  clients.push(c)
  return c
}

/** Waits for "Subscribed to PostgreSQL" on `ch` (changes committed after it are delivered). */
function pgReady(ch) {
  const log = new Log(`system of ${ch.topic}`)
  ch.on('system', (p) => log.push(p))
  return log.wait((p) => p.extension === 'postgres_changes' && p.status === 'ok', { timeoutMs: 15000 })
}

describe('table topics and Postgres changes', { skip, concurrency: false }, () => {
  it("Aerostack: channel('orders') INSERT / UPDATE / DELETE as db_change payloads (the LiveOrders sample)", async () => {
    const realtimeClient = realtime()
    const channel = realtimeClient.channel('orders') // table name, no slash
    let orders = []
    const events = new Log('orders')
    channel
      .on('INSERT', (p) => {
        events.push(p)
        orders = [p.data, ...orders]
      })
      .on('UPDATE', (p) => {
        events.push(p)
        orders = orders.map((o) => (o.id === p.data.id ? p.data : o))
      })
      .on('DELETE', (p) => {
        events.push(p)
        orders = orders.filter((o) => o.id !== p.data.id)
      })
    // subscribe() resolves once the server said "Subscribed to PostgreSQL".
    await channel.subscribe()
    sql(`INSERT INTO orders (id, user_id, total, status) VALUES ('o-1', 'user-1', 99.99, 'pending')`)
    sql(`INSERT INTO orders (id, user_id, total, status) VALUES ('o-2', 'user-1', 5, 'pending')`)
    sql(`UPDATE orders SET status = 'shipped' WHERE id = 'o-1'`)
    sql(`DELETE FROM orders WHERE id = 'o-2'`)
    await events.wait(() => true, { count: 4, timeoutMs: 15000 })
    const [ins, , upd, del] = events.items
    assert.equal(ins.type, 'db_change')
    assert.equal(ins.topic, 'orders')
    assert.equal(ins.operation, 'INSERT')
    assert.deepEqual(ins.data, { id: 'o-1', user_id: 'user-1', total: 99.99, status: 'pending' })
    assert.equal(typeof ins.timestamp, 'number')
    assert.equal(upd.operation, 'UPDATE')
    assert.equal(upd.data.status, 'shipped')
    assert.equal(upd.old.status, 'pending')
    assert.equal(del.operation, 'DELETE')
    assert.equal(del.data.id, 'o-2')
    assert.deepEqual(orders, [{ id: 'o-1', user_id: 'user-1', total: 99.99, status: 'shipped' }])
    // `*` gets every event too; pub/sub on the same topic still works.
    const custom = new Log('custom')
    channel.on('note', (p) => custom.push(p))
    await channel.publish('note', { hi: 1 })
    await custom.wait()
    await channel.unsubscribe()
  })

  it("Aerostack: 'schema.table' names another schema", async () => {
    const ch = realtime().channel('shop.items')
    const got = new Log('shop.items')
    const ready = pgReady(ch)
    ch.on('INSERT', (p) => got.push(p))
    await ch.subscribe()
    await ready
    sql(`INSERT INTO shop.items VALUES (1, 'widget')`)
    const [p] = await got.wait(() => true, { timeoutMs: 15000 })
    assert.deepEqual(p.data, { id: 1, name: 'widget' })
    assert.equal(p.topic, 'shop.items')
  })

  it("Atelier: on('postgres_changes', { table, op?, filter? }) delivers { op, row, old_row, user_id }", async () => {
    const channel = realtime().channel('room-42')
    const all = new Log('all')
    const inserts = new Log('inserts')
    const mine = new Log('mine')
    const ready = pgReady(channel)
    channel.on('postgres_changes', { table: 'todos' }, (change) => all.push(change))
    channel.on('postgres_changes', { table: 'todos', op: 'INSERT' }, (change) => inserts.push(change))
    channel.on('postgres_changes', { table: 'todos', filter: { user_id: 'me' } }, (change) => mine.push(change))
    await channel.subscribe()
    await ready
    sql(`INSERT INTO todos (user_id, text) VALUES ('me', 'mine'), ('other', 'theirs')`)
    sql(`UPDATE todos SET done = true WHERE user_id = 'me'`)
    await all.wait(() => true, { count: 3, timeoutMs: 15000 })
    await inserts.wait(() => true, { count: 2 })
    await mine.wait(() => true, { count: 2 })
    assert.deepEqual(all.items.map((c) => c.op), ['INSERT', 'INSERT', 'UPDATE'])
    assert.deepEqual(inserts.items.map((c) => c.row.text), ['mine', 'theirs'])
    assert.deepEqual(mine.items.map((c) => [c.op, c.row.user_id]), [['INSERT', 'me'], ['UPDATE', 'me']])
    const u = all.items[2]
    assert.equal(u.row.done, true)
    assert.ok('old_row' in u && 'user_id' in u)
    assert.equal(inserts.items.length, 2)
  })

  it('Atelier: a filter on two columns (ANDed)', async () => {
    const channel = realtime().channel('room-43')
    const hits = new Log('hits')
    channel.on('postgres_changes', { table: 'todos', op: 'INSERT', filter: { user_id: 'me', list_id: 7 } }, (c) => hits.push(c))
    await channel.subscribe()
    sql(`INSERT INTO todos (user_id, text, list_id) VALUES ('me', 'a', 7), ('me', 'b', 8), ('other', 'c', 7), ('me', 'd', 7)`)
    await hits.wait(() => true, { count: 2, timeoutMs: 15000 })
    await new Promise((r) => setTimeout(r, 300))
    assert.deepEqual(hits.items.map((c) => c.row.text), ['a', 'd'])
  })

  it('row-level security applies to table topics: each user gets only the rows it may see, also after setToken', async () => {
    const ann = realtime('ann')
    const bob = realtime('bob')
    const gotAnn = new Log('ann')
    const gotBob = new Log('bob')
    await ann.channel('notes').on('INSERT', ({ data }) => gotAnn.push(data.body)).subscribe()
    await bob.channel('notes').on('INSERT', ({ data }) => gotBob.push(data.body)).subscribe()
    sql(`INSERT INTO notes (owner, body) VALUES ('ann', 'for ann'), ('bob', 'for bob'), ('carl', 'for carl')`)
    await gotAnn.wait(() => true, { timeoutMs: 15000 })
    await gotBob.wait(() => true, { timeoutMs: 15000 })
    // Bob's token changes to carl's: the live channel follows it.
    bob.setToken(token({ sub: 'carl' }))
    await new Promise((r) => setTimeout(r, 300))
    sql(`INSERT INTO notes (owner, body) VALUES ('bob', 'for bob 2'), ('carl', 'for carl 2')`)
    await gotBob.wait((b) => b === 'for carl 2', { timeoutMs: 15000 })
    await new Promise((r) => setTimeout(r, 300))
    assert.deepEqual(gotAnn.items, ['for ann'])
    assert.deepEqual(gotBob.items, ['for bob', 'for carl 2'])
  })
})
