// Test helpers for @corecast/client: start/stop the real corecast binary (env CORECAST_BIN) on
// a free port with its own --data-dir, wait with timeouts, sign HS256 tokens.
//
// By hand: cargo build && cd clients/js && npm ci &&
//   CORECAST_BIN=$PWD/../../target/debug/corecast node --test --test-reporter=spec test/

import { spawn } from 'node:child_process'
import { createHmac } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { createClient } from '../src/index.js'

export { WebSocket }

const BIN = process.env.CORECAST_BIN

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

export function withTimeout(promise, ms, label = 'operation') {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${label}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Polls `check` every 10 ms until truthy; fails with `label` and `describe()` after `timeoutMs`. */
export async function until(check, { timeoutMs = 10000, label = 'condition', describe = () => '' } = {}) {
  const t0 = Date.now()
  for (;;) {
    const v = check()
    if (v) return v
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${label}; ${describe()}`)
    await sleep(10)
  }
}

/** An append-only list that tests wait on: `wait(pred, {count, timeoutMs})`. */
export class Log {
  constructor(name = 'log') {
    this.name = name
    this.items = []
  }
  push(x) {
    this.items.push(x)
  }
  async wait(pred = () => true, { count = 1, timeoutMs = 10000, label } = {}) {
    const hits = await until(
      () => {
        const h = this.items.filter(pred)
        return h.length >= count ? h : null
      },
      {
        timeoutMs,
        label: `${this.name}: ${label ?? `${count} matching item(s)`}`,
        describe: () => `have ${this.items.length}: ${JSON.stringify(this.items).slice(0, 1500)}`,
      }
    )
    return hits.slice(0, count)
  }
}

const running = new Set()
const dataDirs = new Set()
process.on('exit', () => {
  for (const p of running) {
    try {
      p.kill('SIGKILL')
    } catch {}
  }
  for (const d of dataDirs) rmSync(d, { recursive: true, force: true })
})

const READY = /corecast listening on http:\/\/([0-9.]+):(\d+) with (\d+) shards/

/** A corecast process (`--shards 2 --cpus 0,1`, development mode unless `args` say otherwise)
 *  with its own temporary --data-dir, kept across restarts. */
export class Server {
  constructor({ args = [], env = {} } = {}) {
    this.args = args
    this.env = env
    this.dataDir = mkdtempSync(join(tmpdir(), 'corecast-client-js-'))
    dataDirs.add(this.dataDir)
    this.port = 0
    this.proc = null
    this.stderr = ''
  }

  /** Starts on `port` (0: a free one). A start not ready within `readyMs` is killed and
   *  retried (the server's known rare startup hang, see tests/js/startup.test.mjs). */
  async start(port = this.port, { attempts = 3, readyMs = 8000 } = {}) {
    for (let i = 1; ; i++) {
      try {
        return await this.startOnce(port, readyMs)
      } catch (e) {
        if (!e.notReady || i >= attempts) throw e
        process.stderr.write(`WARNING: corecast not ready within ${readyMs} ms; retrying\n`)
      }
    }
  }

  async startOnce(port, readyMs) {
    if (!BIN) throw new Error('CORECAST_BIN is not set (path of the corecast binary)')
    const env = { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn', ...this.env }
    for (const k of ['DATABASE_URL', 'CORECAST_DATABASE_URL', 'CORECAST_JWT_SECRET']) if (!(k in this.env)) delete env[k]
    const argv = ['--listen', `127.0.0.1:${port}`, '--shards', '2', '--cpus', '0,1', '--data-dir', this.dataDir, ...this.args]
    const proc = spawn(BIN, argv, { env, stdio: ['ignore', 'pipe', 'pipe'] })
    running.add(proc)
    this.proc = proc
    this.exited = new Promise((resolve) => {
      proc.on('exit', (code, signal) => resolve({ code, signal }))
      proc.on('error', (error) => resolve({ code: null, signal: null, error }))
    }).finally(() => running.delete(proc))
    proc.stderr.setEncoding('utf8')
    proc.stderr.on('data', (d) => (this.stderr = (this.stderr + d).slice(-20000)))
    proc.stdout.setEncoding('utf8')
    let out = ''
    const ready = new Promise((resolve, reject) => {
      proc.stdout.on('data', (d) => {
        out += d
        const m = READY.exec(out)
        if (m) resolve(Number(m[2]))
      })
      this.exited.then(({ code, signal, error }) =>
        reject(new Error(`corecast exited before ready (code ${code}, signal ${signal} ${error?.message ?? ''}): ${this.stderr}`))
      )
    })
    try {
      this.port = await withTimeout(ready, readyMs, 'corecast ready line')
    } catch (e) {
      e.notReady = e.message.startsWith('timed out')
      proc.kill('SIGKILL')
      await this.exited
      throw e
    }
    return this
  }

  /** Starts again on the same port (same --data-dir), retrying while the port is busy. */
  async restart() {
    let last
    for (let i = 0; i < 30; i++) {
      try {
        return await this.start(this.port)
      } catch (e) {
        last = e
        await sleep(100)
      }
    }
    throw last
  }

  /** SIGTERM (or `signal`), then waits for the exit. */
  async stop(signal = 'SIGTERM') {
    const proc = this.proc
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return this.exited
    proc.kill(signal)
    try {
      return await withTimeout(this.exited, 10000, 'corecast exit')
    } catch (e) {
      proc.kill('SIGKILL')
      await this.exited
      throw e
    }
  }

  get url() {
    return `http://127.0.0.1:${this.port}`
  }
}

/** Starts a server, stopped by `t.after`. */
export async function startServer(t, opts) {
  const srv = await new Server(opts).start()
  t.after(() => srv.stop())
  return srv
}

/** A client for `srv` with `ws` as WebSocket, disconnected by `t.after`. */
export function client(t, srv, opts = {}) {
  const c = createClient(srv.url, { WebSocket, ...opts })
  t.after(() => c.disconnect())
  return c
}

let seq = 0
/** A unique topic (with a `/`: a pub/sub topic). */
export function topic(prefix = 'room') {
  return `${prefix}/${process.pid}-${++seq}-${Math.random().toString(36).slice(2, 8)}`
}

const b64url = (s) => Buffer.from(s).toString('base64url')
/** An HS256 JWT. */
export function jwt(secret, claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64url(JSON.stringify(claims))
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url')
  return `${head}.${body}.${sig}`
}
export const nowSecs = () => Math.floor(Date.now() / 1000)
