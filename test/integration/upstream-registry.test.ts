// The upstream client against the real distribution registry 2.8 with token auth.
import { randomBytes } from 'node:crypto'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { UpstreamDeniedError, UpstreamUnavailableError } from '../../src/errors.js'
import { createLogger } from '../../src/logger.js'
import { createMetrics } from '../../src/metrics.js'
import type { Digest } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import type { RepoName } from '../../src/oci/reference.js'
import { createUpstreamClient } from '../../src/upstream/client.js'
import type { UpstreamClient, UpstreamInit } from '../../src/upstream/types.js'
import { readAll, simpleRequest } from '../helpers/net.js'
import { pushBlob, pushManifest, startRegistry, type RegistryProcess } from '../helpers/registry.js'
import { startTokenServer, type TokenServer } from '../helpers/token-server.js'

const repo = 'team/app' as RepoName

describe('upstream client against docker-registry with token auth', () => {
  let ts: TokenServer
  let reg: RegistryProcess
  let blob: Buffer
  let blobDigest: Digest
  let manifestDigest: string

  function client (over: Partial<UpstreamInit> = {}): UpstreamClient {
    return createUpstreamClient({ logger: createLogger('silent'), metrics: createMetrics() }, {
      name: reg.host, url: reg.url, credentials: { username: 'puller', password: 'pull-pw' },
      connectTimeoutMs: 2000, headersTimeoutMs: 5000, bodyIdleTimeoutMs: 5000, maxAttempts: 2, retryBaseMs: 10,
      ...over,
    })
  }

  beforeAll(async () => {
    ts = await startTokenServer({
      users: { puller: { password: 'pull-pw' }, seeder: { password: 'seed-pw', actions: ['pull', 'push'] } },
    })
    reg = await startRegistry({ auth: ts.registryAuth })
    // Seed with a push token minted for the seeding user.
    const push = `Bearer ${ts.mint('seeder', [{ type: 'repository', name: repo, actions: ['pull', 'push'] }])}`
    blob = randomBytes(2 * 1024 * 1024 + 3)
    blobDigest = await pushBlob(reg.url, repo, blob, push) as Digest
    const config = Buffer.from('{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    const configDigest = await pushBlob(reg.url, repo, config, push)
    const body = Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: MediaType.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: blobDigest, size: blob.length }],
    }))
    manifestDigest = await pushManifest(reg.url, repo, 'v1', body, MediaType.ociManifest, push)
    ts.requests.length = 0
  })

  afterAll(async () => {
    await reg?.close()
    await ts?.close()
  })

  it('the registry really requires a token', async () => {
    const res = await simpleRequest(`${reg.url}/v2/${repo}/blobs/${blobDigest}`)
    expect(res.status).toBe(401)
    expect(res.headers['www-authenticate']).toContain(`realm="${ts.realm}"`)
  })

  it('fetches blob, range and manifest with credentials, asking for the token once', async () => {
    const c = client()
    try {
      const res = await c.getBlob(repo, blobDigest)
      expect(res?.size).toBe(blob.length)
      expect((await readAll(res!.body)).equals(blob)).toBe(true)

      const part = await c.getBlob(repo, blobDigest, { range: { start: 1000, end: 1999 } })
      expect(part?.partial).toBe(true)
      expect((await readAll(part!.body)).equals(blob.subarray(1000, 2000))).toBe(true)

      const m = await c.getManifest(repo, 'v1')
      expect(m?.mediaType).toBe(MediaType.ociManifest)
      expect(m?.digest).toBe(manifestDigest)
      const head = await c.headManifest(repo, manifestDigest)
      expect(head?.digest).toBe(manifestDigest)
      expect(await c.getManifest(repo, 'missing')).toBeUndefined()

      expect(ts.requests).toEqual([{ user: 'puller', scopes: [`repository:${repo}:pull`], status: 200 }])
      // The registry's access log shows what it served.
      expect(reg.logs()).toContain(`"GET /v2/${repo}/blobs/${blobDigest} HTTP/1.1" 200`)
    } finally {
      await c.close()
    }
  })

  it('is denied without credentials (the token service refuses anonymous)', async () => {
    const c = client({ credentials: undefined })
    try {
      await expect(c.getBlob(repo, blobDigest)).rejects.toBeInstanceOf(UpstreamDeniedError)
    } finally {
      await c.close()
    }
  })

  it('reports an outage as unavailable and recovers after a restart', async () => {
    const c = client()
    try {
      expect(await c.headManifest(repo, 'v1')).toBeDefined()
      await reg.stop()
      await expect(c.headManifest(repo, 'v1')).rejects.toBeInstanceOf(UpstreamUnavailableError)
      await reg.start()
      expect((await c.headManifest(repo, 'v1'))?.digest).toBe(manifestDigest)
    } finally {
      await c.close()
    }
  })
})
