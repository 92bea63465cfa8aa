// Defects found in review of the client data path (issue 10, item 5): a HEAD on a cold miss, a manifest
// first cached as a blob, and a manifest request for the digest of a large blob.
import { randomBytes } from 'node:crypto'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Daemon } from '../../src/daemon.js'
import { parseDigest } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { simpleRequest } from '../helpers/net.js'
import type { FaultUpstream } from '../helpers/fault-upstream.js'
import { startFaultDaemon, type FaultDaemon } from '../helpers/fault-daemon.js'

let f: FaultDaemon | undefined
let up: FaultUpstream
let daemon: Daemon

beforeAll(async () => {
  f = await startFaultDaemon({ dirPrefix: 'pm-review-' })
  up = f.up
  daemon = f.daemon
})
afterAll(async () => { await f?.close() })

const base = (): string => `${daemon.url()}/v2/fault.test/team/app`
const code = (body: Buffer): string => (JSON.parse(body.toString()) as { errors: Array<{ code: string }> }).errors[0]!.code

describe('review fixes', () => {
  it('answers a HEAD on a cold blob miss from an upstream HEAD, without downloading the blob', async () => {
    const data = randomBytes(2 * 1024 * 1024 + 5)
    const d = up.addBlob('team/app', data)
    up.requests.length = 0
    const head = await simpleRequest(`${base()}/blobs/${d}`, { method: 'HEAD' })
    expect(head.status).toBe(200)
    expect(head.headers['content-length']).toBe(String(data.length))
    expect(head.headers['docker-content-digest']).toBe(d)
    expect(up.requests.filter(r => r.path.endsWith(d)).map(r => r.method)).toEqual(['HEAD'])
    await new Promise(resolve => setTimeout(resolve, 200))
    expect(await daemon.store.stat(parseDigest(d))).toBeUndefined()
    expect(daemon.resolver.activeFills()).toEqual([])

    const missing = await simpleRequest(`${base()}/blobs/sha256:${'7'.repeat(64)}`, { method: 'HEAD' })
    expect(missing.status).toBe(404)
  })

  it('serves a manifest first cached through /blobs/ with its real media type', async () => {
    const config = randomBytes(100)
    const cd = up.addBlob('team/app', config)
    const bytes = Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: MediaType.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: cd, size: config.length }, layers: [],
    }))
    const md = up.addManifest('team/app', undefined, bytes, MediaType.ociManifest)
    // Registries serve a manifest under /blobs/ too (a client walking an index may ask there).
    expect(up.addBlob('team/app', bytes)).toBe(md)
    expect((await simpleRequest(`${base()}/blobs/${md}`)).status).toBe(200)
    await expect.poll(async () => await daemon.store.stat(parseDigest(md))).toBeDefined()
    const r = await simpleRequest(`${base()}/manifests/${md}`, { headers: { accept: MediaType.ociManifest } })
    expect(r.status).toBe(200)
    expect(r.headers['content-type']).toBe(MediaType.ociManifest)
  })

  it('answers 404, not 500, for /manifests/ with the digest of a cached blob over 4 MiB', async () => {
    const big = randomBytes(5 * 1024 * 1024)
    const d = up.addBlob('team/app', big)
    expect((await simpleRequest(`${base()}/blobs/${d}`)).status).toBe(200)
    await expect.poll(async () => await daemon.store.stat(parseDigest(d))).toBeDefined()
    const r = await simpleRequest(`${base()}/manifests/${d}`, { headers: { accept: MediaType.ociManifest } })
    expect(r.status).toBe(404)
    expect(code(r.body)).toBe('MANIFEST_UNKNOWN')
  })
})
