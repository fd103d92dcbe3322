// The @corecast/client examples (examples/client-js) run as a user would run them, against a
// real corecast: the token-stream producer and a viewer, two chat users typing lines (with
// history for a late joiner and presence), and, with DATABASE_URL (and PSQL, CORECAST_SLOT;
// `cargo test client_examples` provides them), the orders dashboard following the `orders`
// table. Needs `npm ci` in examples/client-js (scripts/test does it).

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync, spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Server, until } from './helpers.mjs'

const DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'examples', 'client-js')

const DB = process.env.DATABASE_URL
const PSQL = process.env.PSQL ?? 'psql'
const sql = (q) => execFileSync(PSQL, ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', DB, '-c', q], { encoding: 'utf8' })

let srv = null
before(async () => {
  assert.ok(existsSync(join(DIR, 'node_modules', '@corecast', 'client')), `run npm ci in ${DIR}`)
  if (DB) {
    // The table of the example's header comment.
    sql('DROP TABLE IF EXISTS orders; CREATE TABLE orders (id text PRIMARY KEY, user_id text, total float8, status text); ALTER TABLE orders REPLICA IDENTITY FULL')
  }
  const env = DB ? { DATABASE_URL: DB, CORECAST_SLOT: process.env.CORECAST_SLOT } : {}
  srv = await new Server({ env }).start()
})
after(async () => {
  if (srv) await srv.stop().catch(() => {})
})

/** Starts `node <file> …args` in the examples folder; its output accumulates in `out`. */
function run(t, file, args) {
  const p = spawn(process.execPath, [file, ...args], { cwd: DIR, env: { ...process.env, CORECAST_URL: srv.http } })
  const proc = { p, out: '', exited: new Promise((r) => p.once('exit', r)) }
  p.stdout.on('data', (d) => (proc.out += d))
  p.stderr.on('data', (d) => (proc.out += d))
  t.after(() => p.kill())
  return proc
}

describe('client examples', () => {
  it('token-stream: a viewer prints what the producer streams, in order', async (t) => {
    const viewer = run(t, 'token-stream.mjs', ['view', `s${process.pid}`])
    await until(() => viewer.out.includes('[viewing'), { label: 'viewer subscribed', describe: () => viewer.out })
    const producer = run(t, 'token-stream.mjs', ['produce', `s${process.pid}`, 'streamed', 'one', 'token', 'at', 'a', 'time'])
    assert.equal(await producer.exited, 0, producer.out)
    await until(() => viewer.out.includes('[6 tokens]'), { label: 'all tokens', describe: () => viewer.out })
    assert.match(viewer.out, /> streamed one token at a time\n\[6 tokens\]/)
  })

  it('chat: lines typed by one user reach the other; a late joiner gets the history and sees who is online', async (t) => {
    const room = `r${process.pid}`
    const ann = run(t, 'chat.mjs', ['ann', room])
    await until(() => ann.out.includes(`joined chat/${room} as ann`), { label: 'ann joined', describe: () => ann.out })
    const bob = run(t, 'chat.mjs', ['bob', room])
    await until(() => bob.out.includes(`joined chat/${room} as bob`), { label: 'bob joined', describe: () => bob.out })
    await until(() => ann.out.includes('bob joined'), { label: 'ann sees bob', describe: () => ann.out })
    ann.p.stdin.write('hello bob\n')
    await until(() => bob.out.includes('ann: hello bob'), { label: 'bob reads ann', describe: () => bob.out })
    bob.p.stdin.write('hi ann\n')
    await until(() => ann.out.includes('bob: hi ann'), { label: 'ann reads bob', describe: () => ann.out })
    // Carol joins later: the history shows both lines, oldest first, and ann and bob online.
    const carol = run(t, 'chat.mjs', ['carol', room])
    await until(() => carol.out.includes(`joined chat/${room} as carol`), { label: 'carol joined', describe: () => carol.out })
    const hello = carol.out.indexOf('ann: hello bob')
    const hi = carol.out.indexOf('bob: hi ann')
    assert.ok(hello >= 0 && hi > hello, carol.out)
    await until(() => /ann joined/.test(carol.out) && /bob joined/.test(carol.out), { label: 'carol sees who is online', describe: () => carol.out })
    // Bob leaves (Ctrl-D): the others see it.
    bob.p.stdin.end()
    await until(() => ann.out.includes('bob left'), { label: 'bob left', describe: () => ann.out })
  })

  it('orders dashboard: INSERT, UPDATE and DELETE on the orders table show up live', { skip: !DB && 'needs DATABASE_URL' }, async (t) => {
    const dash = run(t, 'orders-dashboard.mjs', [])
    await until(() => dash.out.includes('waiting for changes'), { timeoutMs: 20000, label: 'dashboard subscribed', describe: () => dash.out })
    sql("INSERT INTO orders VALUES ('o-1', 'u-1', 99.99, 'pending')")
    await until(() => dash.out.includes('new order #o-1'), { label: 'insert', describe: () => dash.out })
    assert.match(dash.out, /orders: 1 {3}revenue: \$99\.99/)
    sql("UPDATE orders SET status = 'shipped' WHERE id = 'o-1'")
    await until(() => dash.out.includes('#o-1: pending → shipped'), { label: 'update', describe: () => dash.out })
    sql("DELETE FROM orders WHERE id = 'o-1'")
    await until(() => dash.out.includes('#o-1 deleted'), { label: 'delete', describe: () => dash.out })
  })
})
