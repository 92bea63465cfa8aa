import { randomBytes } from 'node:crypto'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { UpstreamDeniedError, UpstreamError, UpstreamProtocolError, UpstreamRateLimitedError, UpstreamUnavailableError } from '../../src/errors.js'
import { createLogger } from '../../src/logger.js'
import { createMetrics, type Metrics } from '../../src/metrics.js'
import type { Digest } from '../../src/oci/digest.js'
import { MAX_MANIFEST_BYTES, MediaType } from '../../src/oci/media-types.js'
import type { RepoName } from '../../src/oci/reference.js'
import { createUpstreamClient } from '../../src/upstream/client.js'
import type { UpstreamClient, UpstreamInit } from '../../src/upstream/types.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { getFreePort, listen, readAll, trackSockets } from '../helpers/net.js'

const repo = 'library/test' as RepoName

describe('upstream client against the fault upstream', () => {
  let up: FaultUpstream
  let metrics: Metrics
  let logLines: string[]
  const clients: UpstreamClient[] = []
  const extra: FaultUpstream[] = []

  beforeEach(async () => {
    up = await startFaultUpstream()
    metrics = createMetrics()
    logLines = []
  })

  afterEach(async () => {
    await Promise.all(clients.splice(0).map(async c => { await c.close() }))
    await Promise.all(extra.splice(0).map(async u => { await u.close() }))
    await up.close()
  })

  function client (over: Partial<UpstreamInit> = {}, target: FaultUpstream = up): UpstreamClient {
    const logger = createLogger('debug', { write: (s: string) => { logLines.push(s) } })
    const c = createUpstreamClient({ logger, metrics }, {
      name: target.host, url: target.url,
      connectTimeoutMs: 2000, headersTimeoutMs: 2000, bodyIdleTimeoutMs: 2000,
      maxAttempts: 3, retryBaseMs: 5,
      ...over,
    })
    clients.push(c)
    return c
  }

  async function counter (name: string): Promise<number> {
    const m = (await metrics.registry.getMetricsAsJSON()).find(x => x.name === name)
    return (m?.values ?? []).reduce((s, v) => s + v.value, 0)
  }

  const blobReqs = (): number => up.requests.filter(r => r.path.includes('/blobs/')).length

  it('fetches manifests by tag and digest, HEAD included, with Accept and digest', async () => {
    const manifest = { schemaVersion: 2, mediaType: MediaType.ociManifest, config: {}, layers: [] }
    const digest = up.addManifest(repo, 'v1', manifest, MediaType.ociManifest)
    const c = client()
    const got = await c.getManifest(repo, 'v1')
    expect(got?.body.toString()).toBe(JSON.stringify(manifest))
    expect(got?.mediaType).toBe(MediaType.ociManifest)
    expect(got?.digest).toBe(digest)
    expect((await c.getManifest(repo, digest))?.digest).toBe(digest)
    const head = await c.headManifest(repo, 'v1')
    expect(head).toEqual({ mediaType: MediaType.ociManifest, digest, size: got?.body.length })
    expect(up.requests[0]?.headers.accept).toContain(MediaType.ociIndex)
    expect(up.requests[0]?.headers.accept).toContain(MediaType.dockerManifest)
    expect(c.authenticated).toBe(false)
  })

  it('returns undefined for 404s', async () => {
    const c = client()
    expect(await c.getManifest(repo, 'nope')).toBeUndefined()
    expect(await c.headManifest(repo, 'nope')).toBeUndefined()
    expect(await c.getBlob(repo, `sha256:${'0'.repeat(64)}` as Digest)).toBeUndefined()
  })

  it('streams blobs and ranges, counting bytes', async () => {
    const data = randomBytes(3 * 1024 * 1024 + 17)
    const digest = up.addBlob(repo, data) as Digest
    const c = client()
    const full = await c.getBlob(repo, digest)
    expect(full?.size).toBe(data.length)
    expect(full?.partial).toBe(false)
    expect((await readAll(full!.body)).equals(data)).toBe(true)
    const part = await c.getBlob(repo, digest, { range: { start: 100, end: 1099 } })
    expect(part).toMatchObject({ size: data.length, partial: true })
    expect((await readAll(part!.body)).equals(data.subarray(100, 1100))).toBe(true)
    expect(up.requests.at(-1)?.headers.range).toBe('bytes=100-1099')
    expect(await counter('pullmesh_upstream_bytes_total')).toBe(data.length + 1000)
  })

  it('passes corrupt bytes through unchanged in length (verification is not its job)', async () => {
    const data = randomBytes(10_000)
    const digest = up.addBlob(repo, data) as Digest
    up.setFault({ kind: 'corrupt' })
    const res = await client().getBlob(repo, digest)
    const got = await readAll(res!.body)
    expect(got.length).toBe(data.length)
    expect(got.equals(data)).toBe(false)
  })

  for (const fault of [{ kind: 'truncate' }, { kind: 'reset', afterBytes: 100_000 }] as const) {
    it(`surfaces ${fault.kind} mid-body as an UpstreamError on the stream, without retrying`, async () => {
      const digest = up.addBlob(repo, randomBytes(1024 * 1024)) as Digest
      up.setFault(fault)
      const res = await client().getBlob(repo, digest)
      expect(res?.size).toBe(1024 * 1024)
      const e = await readAll(res!.body).then(() => undefined, (x: unknown) => x)
      expect(e).toBeInstanceOf(UpstreamError)
      expect(e).toBeInstanceOf(UpstreamUnavailableError)
      expect(blobReqs()).toBe(1)
    })
  }

  it('delivers a slow body intact', async () => {
    const data = randomBytes(64 * 1024)
    const digest = up.addBlob(repo, data) as Digest
    up.setFault({ kind: 'slow', chunkBytes: 8 * 1024, delayMs: 20 })
    const t0 = Date.now()
    const res = await client().getBlob(repo, digest)
    expect((await readAll(res!.body)).equals(data)).toBe(true)
    expect(Date.now() - t0).toBeGreaterThanOrEqual(7 * 20 - 5)
  })

  it('fails a stalled body with the idle timeout as a stream error', async () => {
    const digest = up.addBlob(repo, randomBytes(64 * 1024)) as Digest
    up.setFault({ kind: 'slow', chunkBytes: 1024, delayMs: 2000 })
    const res = await client({ bodyIdleTimeoutMs: 200 }).getBlob(repo, digest)
    const t0 = Date.now()
    const e = await readAll(res!.body).then(() => undefined, (x: unknown) => x)
    expect(e).toBeInstanceOf(UpstreamUnavailableError)
    expect((e as Error).message).toMatch(/idle/)
    expect(Date.now() - t0).toBeLessThan(3000)
  })

  it('retries 500 then succeeds', async () => {
    const data = randomBytes(1000)
    const digest = up.addBlob(repo, data) as Digest
    up.setFault({ kind: 'status', status: 500 }, { path: /\/blobs\//, times: 2 })
    const res = await client().getBlob(repo, digest)
    expect((await readAll(res!.body)).equals(data)).toBe(true)
    expect(blobReqs()).toBe(3)
  })

  it('throws UpstreamUnavailableError once retries are exhausted', async () => {
    up.addManifest(repo, 'v1', { schemaVersion: 2 }, MediaType.ociManifest)
    up.setFault({ kind: 'status', status: 503 })
    const e = await client({ maxAttempts: 3 }).getManifest(repo, 'v1').catch((x: unknown) => x)
    expect(e).toBeInstanceOf(UpstreamUnavailableError)
    expect((e as UpstreamUnavailableError).status).toBe(503)
    expect(up.requests).toHaveLength(3)
    expect(await counter('pullmesh_upstream_errors_total')).toBe(1)
  })

  it('throws UpstreamRateLimitedError with Retry-After on 429, without retrying', async () => {
    up.setFault({ kind: 'status', status: 429, retryAfter: '17' })
    const e = await client().getManifest(repo, 'v1').catch((x: unknown) => x)
    expect(e).toBeInstanceOf(UpstreamRateLimitedError)
    expect((e as UpstreamRateLimitedError).retryAfter).toBe('17')
    expect(up.requests).toHaveLength(1)
  })

  it('times out a hung upstream quickly', async () => {
    up.setFault({ kind: 'hang' })
    const t0 = Date.now()
    const e = await client({ headersTimeoutMs: 200, maxAttempts: 2 }).getManifest(repo, 'v1').catch((x: unknown) => x)
    expect(e).toBeInstanceOf(UpstreamUnavailableError)
    // undici runs its headers timeout on ~1 s resolution "fast timers": about 1 s per attempt here.
    expect(Date.now() - t0).toBeLessThan(4000)
    expect(up.requests).toHaveLength(2)
  })

  it('maps a refused connection to UpstreamUnavailableError after retries', async () => {
    const port = await getFreePort()
    const c = createUpstreamClient({ logger: createLogger('silent'), metrics }, {
      name: 'down', url: `http://127.0.0.1:${port}`, connectTimeoutMs: 500, headersTimeoutMs: 500, bodyIdleTimeoutMs: 500, maxAttempts: 2, retryBaseMs: 5,
    })
    clients.push(c)
    await expect(c.getBlob(repo, `sha256:${'1'.repeat(64)}` as Digest)).rejects.toBeInstanceOf(UpstreamUnavailableError)
  })

  it('rejects an oversize manifest by Content-Length, as a protocol error', async () => {
    up.addManifest(repo, 'big', Buffer.alloc(MAX_MANIFEST_BYTES + 1, 0x20), MediaType.ociManifest)
    await expect(client().getManifest(repo, 'big')).rejects.toBeInstanceOf(UpstreamProtocolError)
    await expect(client().headManifest(repo, 'big')).rejects.toBeInstanceOf(UpstreamProtocolError)
  })

  it('rejects a 206 whose Content-Range does not match', async () => {
    const data = randomBytes(5000)
    const digest = up.addBlob(repo, data) as Digest
    // The fault upstream clamps the end to the blob's size: ask past it and the answer mismatches.
    await expect(client().getBlob(repo, digest, { range: { start: 10, end: 9999 } })).rejects.toBeInstanceOf(UpstreamProtocolError)
  })

  it('follows blob redirects and does not send Authorization to another origin', async () => {
    const cdn = await startFaultUpstream()
    extra.push(cdn)
    const data = randomBytes(2048)
    const digest = up.addBlob(repo, data) as Digest
    cdn.addBlob(repo, data)
    up.setFault({ kind: 'auth' }, { path: /^\/v2\/library\/test\/blobs\// })
    const c = client()
    // First request: challenge, token, then the redirect (the auth fault is replaced by the redirect below).
    const first = await c.getBlob(repo, digest)
    expect((await readAll(first!.body)).equals(data)).toBe(true)
    up.setFault({ kind: 'redirect', to: cdn.url })
    const res = await c.getBlob(repo, digest)
    expect((await readAll(res!.body)).equals(data)).toBe(true)
    const toUp = up.requests.at(-1)!
    expect(toUp.headers.authorization).toMatch(/^Bearer /)
    expect(cdn.requests).toHaveLength(1)
    expect(cdn.requests[0]?.headers.authorization).toBeUndefined()
  })

  it('never sends credentials to a token realm named by a redirect target', async () => {
    // A hostile (or misconfigured) CDN behind a redirect answers 401 with its own Bearer realm.
    const cdn = await startFaultUpstream({ auth: { username: 'u', password: 'p' } })
    extra.push(cdn)
    const data = randomBytes(2048)
    const digest = up.addBlob(repo, data) as Digest
    cdn.addBlob(repo, data)
    up.setFault({ kind: 'redirect', to: cdn.url })
    const c = client({ credentials: { username: 'u', password: 'p' } })
    await expect(c.getBlob(repo, digest)).rejects.toBeInstanceOf(UpstreamDeniedError)
    expect(cdn.requests.filter(r => r.path === '/token')).toEqual([])
    expect(cdn.requests.every(r => r.headers.authorization === undefined)).toBe(true)
  })

  it('does the anonymous bearer flow once per scope and caches the token', async () => {
    const data = randomBytes(100)
    const digest = up.addBlob(repo, data) as Digest
    up.addManifest(repo, 'v1', { schemaVersion: 2 }, MediaType.ociManifest)
    up.addManifest('other/repo', 'v1', { schemaVersion: 2 }, MediaType.ociManifest)
    up.setFault({ kind: 'auth' })
    const c = client()
    await readAll((await c.getBlob(repo, digest))!.body)
    expect(await c.getManifest(repo, 'v1')).toBeDefined()
    expect(await c.headManifest(repo, 'v1')).toBeDefined()
    expect(up.tokensIssued).toBe(1)
    expect(up.requests.map(r => r.path)).toEqual([
      `/v2/${repo}/blobs/${digest}`, '/token', `/v2/${repo}/blobs/${digest}`,
      `/v2/${repo}/manifests/v1`, `/v2/${repo}/manifests/v1`,
    ])
    const tokenReq = new URL(up.requests[1]!.url, up.url)
    expect(tokenReq.searchParams.get('scope')).toBe(`repository:${repo}:pull`)
    expect(tokenReq.searchParams.get('service')).toBe('fault-upstream')
    // A new scope: the known challenge lets the client fetch the token before the first request.
    expect(await c.getManifest('other/repo' as RepoName, 'v1')).toBeDefined()
    expect(up.tokensIssued).toBe(2)
    expect(up.requests.slice(-2).map(r => r.path)).toEqual(['/token', '/v2/other/repo/manifests/v1'])
  })

  it('sends basic credentials to the token endpoint and never logs them', async () => {
    up.addManifest(repo, 'v1', { schemaVersion: 2 }, MediaType.ociManifest)
    up.setFault({ kind: 'auth', username: 'alice', password: 's3cret-pw' })
    const c = client({ credentials: { username: 'alice', password: 's3cret-pw' } })
    expect(c.authenticated).toBe(true)
    expect((await c.getManifest(repo, 'v1'))?.body.length).toBeGreaterThan(0)
    const tokenReq = up.requests.find(r => r.path === '/token')!
    expect(tokenReq.headers.authorization).toBe(`Basic ${Buffer.from('alice:s3cret-pw').toString('base64')}`)
    const bearer = up.requests.at(-1)!.headers.authorization!
    expect(bearer).toMatch(/^Bearer /)
    const logs = logLines.join('')
    expect(logs).toContain('"status":200')
    expect(logs).not.toContain('s3cret-pw')
    expect(logs).not.toContain(Buffer.from('alice:s3cret-pw').toString('base64'))
    expect(logs).not.toContain(bearer.slice('Bearer '.length))
  })

  it('denies with wrong or missing credentials', async () => {
    up.addManifest(repo, 'v1', { schemaVersion: 2 }, MediaType.ociManifest)
    up.setFault({ kind: 'auth', username: 'alice', password: 'right' })
    const wrong = await client({ credentials: { username: 'alice', password: 'wrong' } }).getManifest(repo, 'v1').catch((x: unknown) => x)
    expect(wrong).toBeInstanceOf(UpstreamDeniedError)
    const none = await client().getManifest(repo, 'v1').catch((x: unknown) => x)
    expect(none).toBeInstanceOf(UpstreamDeniedError)
    expect((none as UpstreamDeniedError).status).toBe(401)
  })

  it('maps 403 to UpstreamDeniedError', async () => {
    up.setFault({ kind: 'status', status: 403 })
    const e = await client().getManifest(repo, 'v1').catch((x: unknown) => x)
    expect(e).toBeInstanceOf(UpstreamDeniedError)
    expect((e as UpstreamDeniedError).status).toBe(403)
  })

  it('answers a Basic challenge with the credentials', async () => {
    // A tiny server that only understands Basic.
    const seen: Array<string | undefined> = []
    const srv = createServer((req, res) => {
      seen.push(req.headers.authorization)
      req.resume()
      if (req.headers.authorization !== `Basic ${Buffer.from('bob:pw').toString('base64')}`) {
        res.writeHead(401, { 'www-authenticate': 'Basic realm="reg"', 'content-length': 2 }); res.end('no'); return
      }
      res.writeHead(200, { 'content-type': MediaType.ociManifest, 'content-length': 2 }); res.end('{}')
    })
    const { closeServer } = trackSockets(srv)
    const port = await listen(srv)
    try {
      const c = createUpstreamClient({ logger: createLogger('silent'), metrics }, {
        name: 'basic', url: `http://127.0.0.1:${port}`, credentials: { username: 'bob', password: 'pw' },
        connectTimeoutMs: 1000, headersTimeoutMs: 1000, bodyIdleTimeoutMs: 1000, maxAttempts: 1, retryBaseMs: 1,
      })
      clients.push(c)
      expect((await c.getManifest(repo, 'v1'))?.body.toString()).toBe('{}')
      expect((await c.getManifest(repo, 'v2'))?.body.toString()).toBe('{}')
      expect(seen.map(s => s === undefined ? 'none' : 'basic')).toEqual(['none', 'basic', 'basic'])
    } finally {
      await closeServer()
    }
  })

  it('aborts with the caller signal, not an upstream error', async () => {
    up.setFault({ kind: 'hang' })
    const ac = new AbortController()
    const reason = new Error('client left')
    setTimeout(() => { ac.abort(reason) }, 50)
    const e = await client().getManifest(repo, 'v1', { signal: ac.signal }).catch((x: unknown) => x)
    expect(e).toBe(reason)
  })

  it('retries a manifest whose body broke mid-read (nothing reached the caller yet)', async () => {
    up.addManifest(repo, 'v1', Buffer.alloc(50_000, 0x20), MediaType.ociManifest)
    up.setFault({ kind: 'truncate' }, { times: 1 })
    expect((await client().getManifest(repo, 'v1'))?.body.length).toBe(50_000)
    expect(up.requests).toHaveLength(2)
  })

  it('shares one token fetch between concurrent requests for a scope', async () => {
    up.addManifest(repo, 'v1', { schemaVersion: 2 }, MediaType.ociManifest)
    up.setFault({ kind: 'auth' })
    const c = client()
    const got = await Promise.all(Array.from({ length: 5 }, async () => await c.getManifest(repo, 'v1')))
    expect(got.every(m => m !== undefined)).toBe(true)
    expect(up.tokensIssued).toBe(1)
  })

  it('fetches a new token when the cached one nears expiry', async () => {
    up.addManifest(repo, 'v1', { schemaVersion: 2 }, MediaType.ociManifest)
    up.setFault({ kind: 'auth', expiresIn: 1 })
    const c = client()
    await c.getManifest(repo, 'v1')
    await c.getManifest(repo, 'v1')
    expect(up.tokensIssued).toBe(1)
    await new Promise(resolve => setTimeout(resolve, 850)) // 1 s lifetime, used for 0.8 s
    await c.getManifest(repo, 'v1')
    expect(up.tokensIssued).toBe(2)
    // The stale token was never sent: no second 401 round.
    expect(up.requests.filter(r => r.path !== '/token')).toHaveLength(4)
  })

  it('ends the blob stream with the caller abort reason when the caller aborts mid-body', async () => {
    const digest = up.addBlob(repo, randomBytes(64 * 1024)) as Digest
    up.setFault({ kind: 'slow', chunkBytes: 1024, delayMs: 30 })
    const ac = new AbortController()
    const reason = new Error('client left')
    const res = await client().getBlob(repo, digest, { signal: ac.signal })
    setTimeout(() => { ac.abort(reason) }, 100)
    const e = await readAll(res!.body).then(() => undefined, (x: unknown) => x)
    expect(e).toBe(reason)
  })

  describe('against a misbehaving server', () => {
    async function withServer (handler: (req: IncomingMessage, res: ServerResponse) => void, fn: (c: UpstreamClient) => Promise<void>): Promise<void> {
      const srv = createServer(handler)
      const { closeServer } = trackSockets(srv)
      const port = await listen(srv)
      try {
        const c = createUpstreamClient({ logger: createLogger('silent'), metrics }, {
          name: 'odd', url: `http://127.0.0.1:${port}`, connectTimeoutMs: 1000, headersTimeoutMs: 1000, bodyIdleTimeoutMs: 1000, maxAttempts: 1, retryBaseMs: 1,
        })
        clients.push(c)
        await fn(c)
      } finally {
        await closeServer()
      }
    }

    it('counts manifest bytes when there is no Content-Length', async () => {
      await withServer((req, res) => {
        req.resume()
        res.writeHead(200, { 'content-type': MediaType.ociManifest }) // chunked
        const chunk = Buffer.alloc(1024 * 1024, 0x20)
        for (let i = 0; i < 5; i++) res.write(chunk)
        res.end()
      }, async c => {
        await expect(c.getManifest(repo, 'v1')).rejects.toBeInstanceOf(UpstreamProtocolError)
      })
    })

    it('refuses a blob without Content-Length, and a 206 to a plain request', async () => {
      let n = 0
      await withServer((req, res) => {
        req.resume()
        if (n++ === 0) { res.writeHead(200, { 'content-type': 'application/octet-stream' }); res.end('chunked body') } else { res.writeHead(206, { 'content-range': 'bytes 0-1/10', 'content-length': 2 }); res.end('ab') }
      }, async c => {
        await expect(c.getBlob(repo, `sha256:${'2'.repeat(64)}` as Digest)).rejects.toBeInstanceOf(UpstreamProtocolError)
        await expect(c.getBlob(repo, `sha256:${'2'.repeat(64)}` as Digest)).rejects.toBeInstanceOf(UpstreamProtocolError)
      })
    })

    it('takes the manifest media type from Content-Type without parameters, else sniffs it', async () => {
      let n = 0
      const index = JSON.stringify({ schemaVersion: 2, manifests: [] })
      await withServer((req, res) => {
        req.resume()
        const headers: Record<string, string> = n++ === 0 ? { 'content-type': `${MediaType.dockerManifest}; charset=utf-8` } : {}
        res.writeHead(200, { ...headers, 'content-length': Buffer.byteLength(index), 'docker-content-digest': 'not-a-digest' })
        res.end(index)
      }, async c => {
        const a = await c.getManifest(repo, 'v1')
        expect(a?.mediaType).toBe(MediaType.dockerManifest)
        expect(a?.digest).toBeUndefined()
        expect((await c.getManifest(repo, 'v1'))?.mediaType).toBe(MediaType.ociIndex)
      })
    })
  })

  it('close() is idempotent and later calls fail as unavailable', async () => {
    const c = client()
    await c.close()
    await c.close()
    await expect(c.getManifest(repo, 'v1')).rejects.toBeInstanceOf(UpstreamUnavailableError)
  })
})
