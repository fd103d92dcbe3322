// Server start-up as the interop suite relies on it: every `corecast --shards 2` process must
// print its ready line, also when several start at the same time (test files run concurrently).
//
// KNOWN SERVER BUG (expected to FAIL until fixed): a few percent of concurrent 2-shard startups
// never become ready. The process stays alive with both shard executor threads asleep in
// io_uring_enter (glommio reactor park) and the main thread waiting for the shards' ready
// signals; no log line, no error. Not seen with --shards 1, nor with startups one at a time.
// The other test files work around it (helpers.mjs retries such a start); this one does not.

import { describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { Server } from './helpers.mjs'

describe('startup', () => {
  it('10 rounds of 10 concurrent 2-shard startups all become ready within 5 s', async () => {
    for (let round = 0; round < 10; round++) {
      const servers = Array.from({ length: 10 }, () => new Server())
      const results = await Promise.allSettled(servers.map((s) => s.startOnce(0, 5000)))
      await Promise.all(servers.map((s) => s.stop().catch(() => {})))
      const hung = results.filter((r) => r.status === 'rejected')
      assert.deepEqual(
        hung.map((r) => r.reason.message.split('\n')[0]),
        [],
        `round ${round}: ${hung.length} of 10 servers never printed the ready line`
      )
    }
  })
})
