// The daemon against a controllable upstream that injects faults: shared fills, verification,
// aborted responses, retries, rate limits, token auth, tag TTL and stale-if-error.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, readdir, rm } from 'node:fs/promises'
import { request as httpRequest } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`

let up: FaultUpstream
let daemon: Daemon
let dataDir: string

async function startDaemon (settings: RawSettings = {}): Promise<Daemon> {
  const config = buildConfig({
    listen: '127.0.0.1:0',
    dataDir,
    upstream: [`fault.test=${up.url}`],
    mesh: false,
    mdns: false,
    tagTtl: '1h',
    upstreamRetries: '3',
    upstreamConnectTimeout: '2s',
    upstreamHeadersTimeout: '2s',
    upstreamBodyTimeout: '1s',
    ...settings,
  }, {})
  const d = createDaemon(config, { logger: createLogger('silent') })
  await d.start()
  return d
}

/** GET that reports whether the body arrived whole, or the transfer was aborted. */
async function fetchBody (path: string, headers: Record<string, string> = {}): Promise<{ status: number, headers: Record<string, unknown>, body: Buffer, aborted: boolean }> {
  const u = new URL(daemon.url() + path)
  return await new Promise((resolve, reject) => {
    const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname + u.search, agent: false, headers: { connection: 'close', ...headers } }, res => {
      const chunks: Buffer[] = []
      let aborted = false
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('error', () => { aborted = true })
      res.on('aborted', () => { aborted = true })
      res.on('close', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), aborted: aborted || !res.complete }))
    })
    req.on('error', reject)
    req.end()
  })
}

const blobPath = (digest: string, repo = 'library/app'): string => `/v2/fault.test/${repo}/blobs/${digest}`
const blobGets = (digest: string): number => up.requests.filter(r => r.method === 'GET' && r.path.endsWith(`/blobs/${digest}`)).length

async function tempFiles (): Promise<string[]> {
  return await readdir(join(dataDir, 'tmp')).catch(() => [])
}

beforeAll(async () => { up = await startFaultUpstream() })
afterAll(async () => { await up.close() })
beforeEach(async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'pm-faults-'))
  up.setFault(undefined)
  up.requests.length = 0
  daemon = await startDaemon()
})
afterEach(async () => {
  await daemon.stop()
  await rm(dataDir, { recursive: true, force: true })
})

describe('shared streaming fills', () => {
  it('serves N concurrent clients from one upstream GET, each getting the whole blob', async () => {
    const data = randomBytes(6 * 1024 * 1024 + 123)
    const d = up.addBlob('library/app', data)
    up.setFault({ kind: 'slow', chunkBytes: 256 * 1024, delayMs: 5 })
    const results = await Promise.all(Array.from({ length: 8 }, async () => await fetchBody(blobPath(d))))
    for (const r of results) {
      expect(r.status).toBe(200)
      expect(r.aborted).toBe(false)
      expect(sha(r.body)).toBe(d)
      expect(r.headers['docker-content-digest']).toBe(d)
      expect(r.headers['content-length']).toBe(String(data.length))
    }
    expect(blobGets(d)).toBe(1)
    // Clients finish once the bytes verify; the cache commit (fsync, rename, index) follows.
    await expect.poll(async () => await daemon.store.stat(parseDigest(d))).toMatchObject({ size: data.length })
    // Cached: served without the upstream.
    const again = await fetchBody(blobPath(d))
    expect(sha(again.body)).toBe(d)
    expect(blobGets(d)).toBe(1)
  })

  it('keeps filling for the others when one client disconnects mid-stream', async () => {
    const data = randomBytes(4 * 1024 * 1024)
    const d = up.addBlob('library/app', data)
    up.setFault({ kind: 'slow', chunkBytes: 128 * 1024, delayMs: 10 })
    const quitter = new Promise<void>((resolve) => {
      const u = new URL(daemon.url() + blobPath(d))
      const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, agent: false }, res => {
        res.once('data', () => { req.destroy(); resolve() })
      })
      req.on('error', () => resolve())
      req.end()
    })
    const stayer = fetchBody(blobPath(d))
    await quitter
    const r = await stayer
    expect(r.aborted).toBe(false)
    expect(sha(r.body)).toBe(d)
    expect(blobGets(d)).toBe(1)
    await expect.poll(async () => await daemon.store.stat(parseDigest(d))).toBeDefined()
  })

  it('serves a range while the blob is still filling (a HEAD on the miss before it downloads nothing)', async () => {
    const data = randomBytes(3 * 1024 * 1024)
    const d = up.addBlob('library/app', data)
    up.setFault({ kind: 'slow', chunkBytes: 256 * 1024, delayMs: 10 })
    const head = await simpleRequest(daemon.url() + blobPath(d), { method: 'HEAD' })
    expect(head.status).toBe(200)
    expect(head.headers['content-length']).toBe(String(data.length))
    const r = await fetchBody(blobPath(d), { range: 'bytes=1000-2999' })
    expect(r.status).toBe(206)
    expect(r.headers['content-range']).toBe(`bytes 1000-2999/${data.length}`)
    expect(r.body.equals(data.subarray(1000, 3000))).toBe(true)
    expect(blobGets(d)).toBe(1)
  })
})

describe('warm hits', () => {
  /** A client that takes its body slowly, so the server's socket backs up and its writes queue. */
  async function slowFetch (path: string): Promise<Buffer> {
    const u = new URL(daemon.url() + path)
    return await new Promise((resolve, reject) => {
      const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, agent: false }, res => {
        const chunks: Buffer[] = []
        res.on('data', (c: Buffer) => {
          chunks.push(c)
          res.pause()
          setTimeout(() => res.resume(), 2)
        })
        res.on('end', () => resolve(Buffer.concat(chunks)))
        res.on('error', reject)
      })
      req.on('error', reject)
      req.end()
    })
  }

  it('serves a cached blob to fast, slow and ranged clients at once, every byte right, and lets go of the file', async () => {
    const data = randomBytes(9 * 1024 * 1024 + 4321)
    const d = up.addBlob('library/app', data)
    expect(sha((await fetchBody(blobPath(d))).body)).toBe(d)
    const digest = parseDigest(d)
    await expect.poll(async () => await daemon.store.stat(digest)).toBeDefined()
    const [fast1, fast2, slow1, slow2, ranged] = await Promise.all([
      fetchBody(blobPath(d)), fetchBody(blobPath(d)), slowFetch(blobPath(d)), slowFetch(blobPath(d)),
      fetchBody(blobPath(d), { range: 'bytes=1048000-5000000' }),
    ])
    for (const r of [fast1!, fast2!]) {
      expect(r.aborted).toBe(false)
      expect(r.body.equals(data)).toBe(true)
      expect(r.headers).toMatchObject({
        'content-length': String(data.length), 'docker-content-digest': d, etag: `"${d}"`,
        'content-type': 'application/octet-stream', 'accept-ranges': 'bytes', 'docker-distribution-api-version': 'registry/2.0',
      })
    }
    expect(slow1!.equals(data)).toBe(true)
    expect(slow2!.equals(data)).toBe(true)
    expect(ranged!.status).toBe(206)
    expect(ranged!.headers['content-range']).toBe(`bytes 1048000-5000000/${data.length}`)
    expect(ranged!.body.equals(data.subarray(1048000, 5000001))).toBe(true)
    expect(blobGets(d)).toBe(1)
    await expect.poll(() => daemon.store.inUse(digest)).toBe(false)
    // Request durations cover the whole transfer, also for bodies sent outside fastify (sendBody).
    const slowest = Math.max(...(await daemon.metrics.httpDuration.get()).values
      .filter(v => v.metricName?.endsWith('_sum') === true && v.labels.route === 'blob').map(v => v.value))
    expect(slowest).toBeGreaterThan(0.05)
  })

  it('a client that hangs up mid-body closes the file and leaves the blob intact', async () => {
    const data = randomBytes(8 * 1024 * 1024)
    const d = up.addBlob('library/app', data)
    await fetchBody(blobPath(d))
    const digest = parseDigest(d)
    await expect.poll(async () => await daemon.store.stat(digest)).toBeDefined()
    await new Promise<void>((resolve) => {
      const u = new URL(daemon.url() + blobPath(d))
      const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, agent: false }, res => {
        res.once('data', () => { req.destroy(); resolve() })
      })
      req.on('error', () => resolve())
      req.end()
    })
    await expect.poll(() => daemon.store.inUse(digest)).toBe(false)
    const again = await fetchBody(blobPath(d))
    expect(again.aborted).toBe(false)
    expect(again.body.equals(data)).toBe(true)
  })
})

describe('bad upstream bytes are never served whole or cached', () => {
  // 2 MiB blobs are hashed in line as they arrive, 6 MiB ones by the store's hashing thread.
  for (const [fault, mib] of [[{ kind: 'corrupt' }, 2], [{ kind: 'truncate' }, 2], [{ kind: 'reset' }, 2], [{ kind: 'corrupt' }, 6], [{ kind: 'truncate' }, 6]] as const) {
    it(`${fault.kind}, ${mib} MiB: every client's response is aborted and nothing is cached`, async () => {
      const data = randomBytes(mib * 1024 * 1024)
      const d = up.addBlob('library/app', data)
      up.setFault(fault, { path: /\/blobs\// })
      const results = await Promise.all(Array.from({ length: 3 }, async () => await fetchBody(blobPath(d))))
      for (const r of results) {
        const complete = r.status === 200 && !r.aborted && r.body.length === data.length
        expect(complete, `status ${r.status}, ${r.body.length} bytes, aborted ${r.aborted}`).toBe(false)
        if (r.status === 200) expect(r.body.length).toBeLessThan(data.length)
      }
      expect(await daemon.store.stat(parseDigest(d))).toBeUndefined()
      expect(await tempFiles()).toEqual([])
      // The upstream recovers: the next request fills and verifies.
      up.setFault(undefined)
      const ok = await fetchBody(blobPath(d))
      expect(ok.aborted).toBe(false)
      expect(sha(ok.body)).toBe(d)
    })
  }

  it('an upstream that claims an empty body for a non-empty digest never completes a response', async () => {
    const { createServer } = await import('node:http')
    const liar = createServer((req, res) => {
      if (req.url?.includes('/blobs/') === true) { res.writeHead(200, { 'content-length': '0', 'content-type': 'application/octet-stream' }); res.end(); return }
      res.writeHead(200, { 'content-type': 'application/json' }); res.end('{}')
    })
    await new Promise<void>(resolve => liar.listen(0, '127.0.0.1', resolve))
    const port = (liar.address() as { port: number }).port
    const liarDaemon = await startDaemon({ upstream: [`liar.test=http://127.0.0.1:${port}`], dataDir: `${dataDir}-liar` })
    try {
      const d = sha(Buffer.from('not empty'))
      const u = new URL(`${liarDaemon.url()}/v2/liar.test/library/app/blobs/${d}`)
      const r = await new Promise<{ status: number, aborted: boolean, bytes: number }>((resolve, reject) => {
        const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, agent: false }, res => {
          let bytes = 0
          let aborted = false
          res.on('data', (c: Buffer) => { bytes += c.length })
          res.on('error', () => { aborted = true })
          res.on('close', () => resolve({ status: res.statusCode ?? 0, aborted: aborted || !res.complete, bytes }))
        })
        req.on('error', reject)
        req.end()
      })
      expect(r.status === 200 && !r.aborted, `status ${r.status}, aborted ${r.aborted}`).toBe(false)
      expect(await liarDaemon.store.stat(parseDigest(d))).toBeUndefined()
    } finally {
      await liarDaemon.stop()
      liar.closeAllConnections()
      await new Promise(resolve => liar.close(resolve))
      await rm(`${dataDir}-liar`, { recursive: true, force: true })
    }
  })

  it('rejects a manifest fetched by digest whose bytes hash differently', async () => {
    const m = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociManifest, config: {}, layers: [] }))
    const d = up.addManifest('library/app', undefined, m, MediaType.ociManifest)
    up.setFault({ kind: 'corrupt' }, { path: /\/manifests\// })
    const r = await simpleRequest(`${daemon.url()}/v2/fault.test/library/app/manifests/${d}`)
    expect(r.status).toBe(502)
    expect(JSON.parse(r.body.toString()).errors[0].code).toBeTypeOf('string')
    expect(await daemon.store.stat(parseDigest(d))).toBeUndefined()
  })

  it('refuses a manifest over 4 MiB', async () => {
    const big = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociManifest, config: {}, layers: [], pad: 'x'.repeat(4 * 1024 * 1024) }))
    up.addManifest('library/app', 'huge', big, MediaType.ociManifest)
    const r = await simpleRequest(`${daemon.url()}/v2/fault.test/library/app/manifests/huge`)
    expect(r.status).toBeGreaterThanOrEqual(400)
    expect(JSON.parse(r.body.toString()).errors).toHaveLength(1)
  })
})

describe('upstream errors', () => {
  it('retries a 500 and then succeeds', async () => {
    const d = up.addBlob('library/app', randomBytes(1000))
    up.setFault({ kind: 'status', status: 500 }, { path: /\/blobs\//, times: 2 })
    const r = await fetchBody(blobPath(d))
    expect(r.status).toBe(200)
    expect(sha(r.body)).toBe(d)
    expect(blobGets(d)).toBe(3)
  })

  it('answers 503 UNAVAILABLE when the upstream keeps failing', async () => {
    const d = up.addBlob('library/app', randomBytes(1000))
    up.setFault({ kind: 'status', status: 502 }, { path: /\/blobs\// })
    const r = await simpleRequest(daemon.url() + blobPath(d))
    expect(r.status).toBe(503)
    expect(JSON.parse(r.body.toString()).errors[0].code).toBe('UNAVAILABLE')
  })

  it('passes a 429 on with Retry-After', async () => {
    const d = up.addBlob('library/app', randomBytes(1000))
    up.setFault({ kind: 'status', status: 429, retryAfter: '17' })
    const r = await simpleRequest(daemon.url() + blobPath(d))
    expect(r.status).toBe(429)
    expect(r.headers['retry-after']).toBe('17')
    expect(JSON.parse(r.body.toString()).errors[0].code).toBe('TOOMANYREQUESTS')
  })

  it('follows a 401 Bearer challenge', async () => {
    const d = up.addBlob('library/app', randomBytes(5000))
    up.setFault({ kind: 'auth' })
    const r = await fetchBody(blobPath(d))
    expect(r.status).toBe(200)
    expect(sha(r.body)).toBe(d)
  })

  it('answers 404 BLOB_UNKNOWN for a blob the upstream does not have', async () => {
    const r = await simpleRequest(daemon.url() + blobPath(`sha256:${'1'.repeat(64)}`))
    expect(r.status).toBe(404)
    expect(JSON.parse(r.body.toString()).errors[0].code).toBe('BLOB_UNKNOWN')
  })
})

describe('tags', () => {
  const manifest = (n: number): Buffer => Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociManifest, config: { n }, layers: [] }))
  const manifestReqs = (method: string): number => up.requests.filter(r => r.method === method && r.path.includes('/manifests/')).length

  it('answers within the TTL from the index, revalidates with HEAD after it, and serves stale if the upstream fails', async () => {
    await daemon.stop()
    daemon = await startDaemon({ tagTtl: '300ms' })
    const d1 = up.addManifest('library/app', 'v1', manifest(1), MediaType.ociManifest)
    const path = '/v2/fault.test/library/app/manifests/v1'
    const first = await simpleRequest(daemon.url() + path)
    expect(first.status).toBe(200)
    expect(first.headers['docker-content-digest']).toBe(d1)
    expect(first.headers['content-type']).toBe(MediaType.ociManifest)
    await simpleRequest(daemon.url() + path)
    expect(manifestReqs('GET')).toBe(1)
    expect(manifestReqs('HEAD')).toBe(0)

    await new Promise(resolve => setTimeout(resolve, 400))
    const revalidated = await simpleRequest(daemon.url() + path)
    expect(revalidated.headers['docker-content-digest']).toBe(d1)
    expect(manifestReqs('HEAD')).toBe(1)
    expect(manifestReqs('GET')).toBe(1)

    // The tag moves upstream: after the TTL, the new digest is fetched.
    await new Promise(resolve => setTimeout(resolve, 400))
    const d2 = up.addManifest('library/app', 'v1', manifest(2), MediaType.ociManifest)
    const moved = await simpleRequest(daemon.url() + path)
    expect(moved.headers['docker-content-digest']).toBe(d2)

    // The upstream fails: the cached mapping is served (stale-if-error), and counted.
    await new Promise(resolve => setTimeout(resolve, 400))
    up.setFault({ kind: 'status', status: 503 })
    const stale = await simpleRequest(daemon.url() + path)
    expect(stale.status).toBe(200)
    expect(stale.headers['docker-content-digest']).toBe(d2)
    up.setFault({ kind: 'status', status: 429, retryAfter: '5' })
    expect((await simpleRequest(daemon.url() + path)).status).toBe(200)
    const metrics = (await simpleRequest(`${daemon.url()}/metrics`)).body.toString()
    expect(metrics).toMatch(/pullmesh_stale_tags_served_total\{upstream="fault.test"\} [2-9]/)
    // Once cached, a digest never needs the upstream.
    expect((await simpleRequest(`${daemon.url()}/v2/fault.test/library/app/manifests/${d1}`)).status).toBe(200)
  })

  it('keeps serving cached tags and digests with the upstream gone', async () => {
    await daemon.stop()
    daemon = await startDaemon({ tagTtl: '0s' })
    const blob = randomBytes(100_000)
    const bd = up.addBlob('library/app', blob)
    const md = up.addManifest('library/app', 'stable', manifest(3), MediaType.ociManifest)
    expect((await fetchBody('/v2/fault.test/library/app/manifests/stable')).status).toBe(200)
    expect(sha((await fetchBody(blobPath(bd))).body)).toBe(bd)
    up.setFault({ kind: 'hang' })
    const t = await fetchBody('/v2/fault.test/library/app/manifests/stable')
    expect(t.status).toBe(200)
    expect(t.headers['docker-content-digest']).toBe(md)
    expect(sha((await fetchBody(blobPath(bd))).body)).toBe(bd)
    expect((await fetchBody(`/v2/fault.test/library/app/manifests/${md}`)).status).toBe(200)
    up.setFault(undefined)
  })

  it('negotiates Accept: an index goes to a client that accepts it; a single-manifest client gets linux/amd64', async () => {
    const amd = manifest(10)
    const arm = manifest(11)
    const amdD = up.addManifest('library/multi', undefined, amd, MediaType.ociManifest)
    const armD = up.addManifest('library/multi', undefined, arm, MediaType.ociManifest)
    const index = {
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [
        { mediaType: MediaType.ociManifest, digest: armD, size: arm.length, platform: { os: 'linux', architecture: 'arm64' } },
        { mediaType: MediaType.ociManifest, digest: amdD, size: amd.length, platform: { os: 'linux', architecture: 'amd64' } },
      ],
    }
    const indexD = up.addManifest('library/multi', 'latest', Buffer.from(JSON.stringify(index)), MediaType.ociIndex)
    const path = '/v2/fault.test/library/multi/manifests/latest'
    const all = await simpleRequest(daemon.url() + path, { headers: { accept: `${MediaType.ociIndex}, ${MediaType.ociManifest}` } })
    expect(all.headers['docker-content-digest']).toBe(indexD)
    expect(all.headers['content-type']).toBe(MediaType.ociIndex)
    const single = await simpleRequest(daemon.url() + path, { headers: { accept: MediaType.ociManifest } })
    expect(single.headers['docker-content-digest']).toBe(amdD)
    const none = await simpleRequest(daemon.url() + path, { headers: { accept: 'application/x-nothing' } })
    expect(none.status).toBe(404)
    expect(JSON.parse(none.body.toString()).errors[0].code).toBe('MANIFEST_UNKNOWN')
  })
})

describe('registry API surface', () => {
  it('answers /v2/ with the API version header and refuses writes', async () => {
    const base = await simpleRequest(`${daemon.url()}/v2/`)
    expect(base.status).toBe(200)
    expect(base.headers['docker-distribution-api-version']).toBe('registry/2.0')
    for (const [method, path] of [['POST', '/v2/fault.test/library/app/blobs/uploads/'], ['PUT', '/v2/fault.test/library/app/manifests/x'], ['DELETE', `/v2/fault.test/library/app/blobs/sha256:${'0'.repeat(64)}`], ['PATCH', '/v2/x/blobs/uploads/1']] as const) {
      const r = await simpleRequest(daemon.url() + path, { method, body: 'x' })
      expect(r.status, `${method} ${path}`).toBeGreaterThanOrEqual(400)
      expect(r.status).toBeLessThan(500)
      expect(['UNSUPPORTED', 'DENIED']).toContain(JSON.parse(r.body.toString()).errors[0].code)
    }
    expect((await simpleRequest(`${daemon.url()}/healthz`)).status).toBe(200)
    expect((await simpleRequest(`${daemon.url()}/readyz`)).status).toBe(200)
  })

  it('answers hostile paths with OCI errors and touches nothing outside the data dir', async () => {
    const paths = [
      '/v2/fault.test/..%2f..%2fetc/manifests/passwd', '/v2/fault.test/a/blobs/sha256:..%2F..%2F',
      `/v2/fault.test/a/blobs/sha256:${'a'.repeat(63)}`, '/v2/fault.test/a/blobs/sha1:abc', '/v2/fault.test/A/manifests/x',
      '/v2/fault.test/a/manifests/..', '/v2/unknown.example/a/manifests/x', `/v2/${'a/'.repeat(200)}b/manifests/x`, '/v2/%00/manifests/x',
    ]
    for (const p of paths) {
      const r = await simpleRequest(daemon.url() + p)
      expect(r.status, p).toBeGreaterThanOrEqual(400)
      expect(r.status, p).toBeLessThan(500)
      expect(JSON.parse(r.body.toString()).errors[0].code, p).toBeTypeOf('string')
    }
    const d = up.addBlob('library/app', randomBytes(500))
    for (const range of ['bytes=abc', 'bytes=10-5', 'bytes=0-1,5-6', 'bytes=600-']) {
      const r = await simpleRequest(daemon.url() + blobPath(d), { headers: { range } })
      expect([400, 416], range).toContain(r.status)
      expect(JSON.parse(r.body.toString()).errors[0].code).toBe('RANGE_INVALID')
    }
    expect((await fetchBody(blobPath(d))).status).toBe(200)
  })
})
