// One fill serves a digest whatever repo asked first. A client asking through a repo that has the blob
// must not fail because it joined a fill started through a repo that answers 404 or 403 for it (a shared
// base layer asked through another repo). The upstream here is a small server written in the test.
import { createHash, randomBytes } from 'node:crypto'
import { createServer, type Server } from 'node:http'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest } from '../../src/oci/digest.js'
import { simpleRequest } from '../helpers/net.js'

const blob = randomBytes(200_000)
const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`
let upstream: Server
let daemon: Daemon
let dir = ''
const seen: string[] = []
let denyStatus = 404

beforeAll(async () => {
  upstream = createServer((req, res) => {
    const url = req.url ?? ''
    seen.push(`${req.method} ${url}`)
    if (url === '/v2/') { res.writeHead(200, { 'content-type': 'application/json' }); res.end('{}'); return }
    if (url === `/v2/library/has/blobs/${digest}`) {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(blob.length), 'docker-content-digest': digest })
      res.end(req.method === 'HEAD' ? undefined : blob)
      return
    }
    // The repo that lacks the blob answers after a while, so that a second client joins the fill meanwhile.
    setTimeout(() => {
      res.writeHead(denyStatus, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ errors: [{ code: denyStatus === 404 ? 'BLOB_UNKNOWN' : 'DENIED', message: 'no' }] }))
    }, 400)
  })
  await new Promise<void>(resolve => upstream.listen(0, '127.0.0.1', resolve))
  dir = await mkdtemp(join(tmpdir(), 'pm-fill-repos-'))
  daemon = createDaemon(buildConfig({
    listen: '127.0.0.1:0', dataDir: dir, mesh: false,
    upstream: [`repos.test=http://127.0.0.1:${(upstream.address() as { port: number }).port}`], upstreamRetries: '1',
  }, {}), { logger: createLogger('silent') })
  await daemon.start()
})
afterAll(async () => {
  await daemon.stop()
  upstream.closeAllConnections()
  await new Promise(resolve => upstream.close(resolve))
  await rm(dir, { recursive: true, force: true })
})

describe('a fill shared across repos', () => {
  for (const status of [404, 403]) {
    it(`a client asking through a repo that has the blob succeeds although it joined a fill whose repo answered ${status}`, async () => {
      denyStatus = status
      seen.length = 0
      const lacking = simpleRequest(`${daemon.url()}/v2/repos.test/library/lacks/blobs/${digest}`, { timeoutMs: 10_000 })
      await new Promise(resolve => setTimeout(resolve, 100))
      const having = simpleRequest(`${daemon.url()}/v2/repos.test/library/has/blobs/${digest}`, { timeoutMs: 10_000 })
      const [a, b] = await Promise.all([lacking, having])
      expect(a.status).toBeGreaterThanOrEqual(400)
      expect(b.status).toBe(200)
      expect(createHash('sha256').update(b.body).digest('hex')).toBe(digest.slice(7))
      // The second client's request joined the first fill (only one upstream request before the retry).
      expect(seen.filter(x => x.includes('/blobs/')).slice(0, 1)).toEqual([`GET /v2/library/lacks/blobs/${digest}`])
      // Forget it again for the next case (once its commit, which follows verification, is done).
      await expect.poll(async () => await daemon.store.stat(parseDigest(digest)), { timeout: 10_000 }).toBeDefined()
      await daemon.store.delete(parseDigest(digest))
    })
  }
})
