// The status page (`GET /`) in a real browser: headless Chromium (Debian's `chromium`, driven by
// playwright-core) loads it from corecast, the page polls `/status.json` and draws what it
// reads. With `--jwt-secret` the details need a service_role token: without one the page says
// so (and `/status.json` tells nothing but that the node is up); with `?apikey=<service_role>`
// it shows the node's figures, which the test moves (a WebSocket subscriber, SSE streams,
// presence, REST publishes) and then reads back from the page. A screenshot goes to
// target/test-output/status-page.png.
//
// Needs /usr/bin/chromium (env CORECAST_CHROMIUM for another); CORECAST_SKIP_BROWSER=1 skips
// loudly when it cannot start, as in browser.test.mjs.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, mkdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import WebSocket from 'ws'
import { chromium } from 'playwright-core'
import { Server, jwt, nowSecs, sleep } from './helpers.mjs'

const CHROMIUM = process.env.CORECAST_CHROMIUM || '/usr/bin/chromium'
const SKIP = process.env.CORECAST_SKIP_BROWSER === '1'
const SECRET = 'status-page-test-secret-0123456789abcdef'
const OUT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'target', 'test-output')

let browser = null
let launchError = null
let srv = null

before(async () => {
  srv = await new Server({ args: ['--jwt-secret', SECRET, '--node-id', 'status-node'] }).start()
  try {
    if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} does not exist (apt-get install -y chromium)`)
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
      timeout: 30000,
    })
  } catch (e) {
    launchError = e
  }
})

after(async () => {
  if (browser) await browser.close().catch(() => {})
  if (srv) await srv.stop().catch(() => {})
})

function needBrowser(t) {
  if (browser) return true
  const msg = `Chromium (${CHROMIUM}) could not be launched: ${launchError?.message ?? 'unknown error'}`
  if (SKIP) {
    process.stderr.write(`\n!!! SKIPPING the status page browser test (CORECAST_SKIP_BROWSER=1): ${msg}\n\n`)
    t.skip(msg)
    return false
  }
  throw new Error(msg)
}

const service = () => jwt(SECRET, { role: 'service_role', exp: nowSecs() + 600 })
const anon = () => jwt(SECRET, { role: 'anon', exp: nowSecs() + 600 })

describe('status page', () => {
  it('/status.json gives details only to a service_role token', async () => {
    const get = async (headers) => (await fetch(`${srv.http}/status.json`, { headers })).json()
    const none = await get({})
    assert.deepEqual([none.status, none.node, none.details], ['ok', 'status-node', false])
    assert.equal(none.totals, undefined)
    assert.equal((await get({ Authorization: `Bearer ${anon()}` })).details, false)
    const full = await get({ Authorization: `Bearer ${service()}` })
    assert.equal(full.details, true)
    assert.equal(full.shards.length, 2)
    assert.equal(full.history_store, 'log')
    assert.deepEqual(full.members, ['status-node'])
    const page = await fetch(`${srv.http}/`)
    assert.equal(page.status, 200)
    assert.match(page.headers.get('content-type'), /text\/html/)
    const html = await page.text()
    assert.doesNotMatch(html, /<(script|link)[^>]+(src|href)=/, 'no external assets')
  })

  it('without a token the page says what it needs', async (t) => {
    if (!needBrowser(t)) return
    const page = await browser.newPage()
    t.after(() => page.close())
    await page.goto(`${srv.http}/`)
    await page.waitForFunction(() => window.__status !== undefined, null, { timeout: 10000 })
    assert.equal(await page.textContent('#node'), 'status-node')
    assert.match(await page.textContent('#error'), /service_role/)
    assert.equal(await page.isVisible('#auth'), true)
  })

  it('with a service_role token it shows the live figures, charted', async (t) => {
    if (!needBrowser(t)) return
    const topic = `status-${process.pid}`
    // Activity: one WebSocket subscriber with presence, two SSE streams, REST publishes.
    const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/realtime/v1/websocket?apikey=${service()}&vsn=2.0.0`)
    t.after(() => ws.close())
    await new Promise((resolve, reject) => {
      ws.once('open', resolve)
      ws.once('error', reject)
    })
    ws.send(JSON.stringify(['1', '1', `realtime:${topic}`, 'phx_join', { config: { presence: { key: 'ann', enabled: true } } }]))
    ws.send(JSON.stringify(['1', '2', `realtime:${topic}`, 'presence', { type: 'presence', event: 'track', payload: { online: true } }]))
    const streams = [0, 1].map(() => new AbortController())
    t.after(() => streams.forEach((c) => c.abort()))
    for (const c of streams) {
      fetch(`${srv.http}/realtime/v1/sse?topic=${topic}`, { headers: { Authorization: `Bearer ${service()}` }, signal: c.signal })
        .then((r) => r.body?.getReader().read())
        .catch(() => {})
    }
    let stop = false
    const publishing = (async () => {
      while (!stop) {
        const body = JSON.stringify({ messages: Array.from({ length: 20 }, (_, i) => ({ topic, event: 'e', payload: { i } })) })
        await fetch(`${srv.http}/realtime/v1/api/broadcast`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${service()}`, 'Content-Type': 'application/json' },
          body,
        }).catch(() => {})
        await sleep(20)
      }
    })()
    t.after(async () => {
      stop = true
      await publishing
    })
    const page = await browser.newPage({ viewport: { width: 1200, height: 800 } })
    t.after(() => page.close())
    await page.goto(`${srv.http}/?apikey=${service()}`)
    await page.waitForFunction(() => (window.__samples ?? 0) >= 4, null, { timeout: 15000 })
    const num = async (id) => {
      const s = (await page.textContent(`#${id}`)).trim()
      const m = s.match(/^([\d.]+)\s*(k|M)?/)
      assert.ok(m, `#${id} shows ${JSON.stringify(s)}`)
      return Number(m[1]) * (m[2] === 'M' ? 1e6 : m[2] === 'k' ? 1e3 : 1)
    }
    await page.waitForFunction(() => window.__status.totals.presence_members >= 1 && window.__status.totals.sse_streams >= 2, null, { timeout: 10000 })
    await sleep(1500) // two more samples with the new figures
    assert.equal(await page.textContent('#node'), 'status-node')
    assert.equal(await page.textContent('#cluster'), 'none')
    assert.equal(await page.textContent('#history_store'), 'log')
    assert.equal(await page.textContent('#tls'), 'off')
    assert.ok((await num('deliveries_rate')) > 0, 'deliveries per second')
    assert.ok((await num('published_rate')) > 0, 'published per second')
    assert.ok((await num('websockets')) >= 1)
    assert.ok((await num('sse_streams')) >= 2)
    assert.ok((await num('topics')) >= 1)
    assert.ok((await num('presence')) >= 1)
    // The charts have points, and the shard table one row per shard.
    const points = await page.$$eval('#card-deliveries_rate polyline', (p) => (p[0]?.getAttribute('points') ?? '').split(' ').length)
    assert.ok(points >= 3, `deliveries chart has ${points} points`)
    assert.equal(await page.$$eval('#shards tbody tr', (r) => r.length), 2)
    assert.match(await page.textContent('#latency'), /\d/)
    mkdirSync(OUT, { recursive: true })
    const shot = join(OUT, 'status-page.png')
    await page.screenshot({ path: shot, fullPage: true })
    console.log(`status page screenshot: ${shot}`)
    assert.ok(existsSync(shot))
  })
})
