// The client in a real browser: headless Chromium (Debian's `chromium`, driven by
// playwright-core) loads src/ as ES modules from a local static server, with no WebSocket
// or fetch option (the browser's own), and runs the 'auto' path against the real server:
// listen over SSE, publish over REST, upgrade to the WebSocket on track(), nothing lost or
// twice. Needs /usr/bin/chromium (env CORECAST_CHROMIUM for another path); with
// CORECAST_SKIP_BROWSER=1 a missing browser skips the test loudly instead of failing it.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createServer } from 'node:http'
import { existsSync, readFileSync } from 'node:fs'
import { dirname, join, normalize } from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'
import { createServerClient } from '../src/index.js'
import { startServer, topic } from './helpers.mjs'

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..')
const CHROMIUM = process.env.CORECAST_CHROMIUM || '/usr/bin/chromium'
const SKIP = process.env.CORECAST_SKIP_BROWSER === '1'
const ARGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync']

let browser = null
let launchError = null
let statics = null

before(async () => {
  try {
    if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} does not exist (apt-get install -y chromium)`)
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, timeout: 30000 })
  } catch (e) {
    launchError = e
  }
  // A static server for the package's own files (src/*.js) and an empty page.
  statics = createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname
    if (path === '/') {
      res.writeHead(200, { 'Content-Type': 'text/html' })
      return res.end('<!doctype html><title>corecast client</title>')
    }
    const file = normalize(join(ROOT, path))
    if (!file.startsWith(join(ROOT, 'src')) || !existsSync(file)) {
      res.writeHead(404)
      return res.end()
    }
    res.writeHead(200, { 'Content-Type': 'text/javascript' })
    res.end(readFileSync(file))
  })
  await new Promise((r) => statics.listen(0, '127.0.0.1', r))
})

after(async () => {
  await browser?.close()
  statics?.close()
})

function needBrowser(t) {
  if (browser) return true
  const msg = `Chromium (${CHROMIUM}) could not be launched: ${launchError?.message ?? 'unknown error'}`
  if (SKIP) {
    process.stderr.write(`\n!!! SKIPPING the browser test (CORECAST_SKIP_BROWSER=1): ${msg}\n\n`)
    t.skip(msg)
    return false
  }
  throw new Error(`${msg} (set CORECAST_SKIP_BROWSER=1 to skip)`)
}

describe('in Chromium', () => {
  it("'auto' in a browser: SSE push, REST publish, upgrade to the browser's WebSocket on track(); nothing lost or twice", async (t) => {
    if (!needBrowser(t)) return
    const srv = await startServer(t)
    const page = await browser.newPage()
    t.after(() => page.close())
    const errors = []
    page.on('pageerror', (e) => errors.push(e.message))
    await page.goto(`http://127.0.0.1:${statics.address().port}/`)
    const name = topic('browser')
    await page.evaluate(
      async ({ url, name }) => {
        const { createClient } = await import('/src/index.js')
        const c = createClient(url)
        const got = []
        const ch = c.channel(name).on('m', ({ data }) => got.push(data.n))
        await ch.subscribe()
        Object.assign(window, { c, ch, got })
      },
      { url: srv.url, name }
    )
    assert.equal(await page.evaluate(() => window.c._mode), 'sse')
    const sdk = createServerClient(srv.url)
    for (let n = 1; n <= 5; n++) await sdk.emit('m', { n }, name)
    await page.waitForFunction(() => window.got.length >= 5, null, { timeout: 10000 })
    // Publishing from the page (REST while on SSE), then presence: the upgrade.
    await page.evaluate(() => window.ch.publish('m', { n: 6 }))
    await page.evaluate(() => window.ch.track({ who: 'browser' }))
    for (let n = 7; n <= 12; n++) await sdk.emit('m', { n }, name)
    await page.waitForFunction(() => window.c._mode === 'websocket' && window.ch._sse === null && window.ch.state === 'joined', null, {
      timeout: 10000,
    })
    await page.evaluate(() => window.ch.publish('m', { n: 13 })) // over the socket now
    await sdk.emit('m', { n: 14 }, name)
    await page.waitForFunction(() => window.got.includes(14), null, { timeout: 10000 })
    const got = await page.evaluate(() => window.got)
    assert.deepEqual(got, Array.from({ length: 14 }, (_, i) => i + 1))
    const users = await page.evaluate(() => window.ch.presence.users)
    assert.deepEqual(users, [{ who: 'browser' }])
    assert.equal(await page.evaluate(() => window.c.status), 'connected')
    assert.deepEqual(errors, [])
    await page.evaluate(() => window.c.disconnect())
  })
})
