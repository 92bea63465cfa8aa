// Listings through the mirror: the OCI 1.1 referrers API and tags/list, against the real distribution
// registry (2.8: no referrers API) with the real skopeo, and against an upstream written here that
// has the referrers API and then goes down (stale-if-error).
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, type Server } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { MediaType } from '../../src/oci/media-types.js'
import { run } from '../helpers/exec.js'
import { listen, simpleRequest, trackSockets } from '../helpers/net.js'
import { pushBlob, pushManifest, startRegistry, type RegistryProcess } from '../helpers/registry.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const ociCode = (body: Buffer): string => (JSON.parse(body.toString('utf8')) as { errors: Array<{ code: string }> }).errors[0]!.code

async function startDaemon (dir: string, upstream: string, settings: RawSettings = {}): Promise<Daemon> {
  const d = createDaemon(buildConfig({
    listen: '127.0.0.1:0', dataDir: dir, upstream: [upstream], mesh: false, mdns: false, tagTtl: '1h', ...settings,
  }, {}), { logger: createLogger('silent') })
  await d.start()
  return d
}

describe('listings against the real distribution registry', () => {
  let reg: RegistryProcess
  let daemon: Daemon
  let dir: string
  let manifestDigest: string
  const tags = ['t1', 't2', 't3', 't4', 't5']

  beforeAll(async () => {
    reg = await startRegistry()
    const config = Buffer.from('{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    const configDigest = await pushBlob(reg.url, 'team/app', config)
    const layer = randomBytes(1024)
    const layerDigest = await pushBlob(reg.url, 'team/app', layer)
    const manifest = Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: MediaType.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: layerDigest, size: layer.length }],
    }))
    for (const t of tags) manifestDigest = await pushManifest(reg.url, 'team/app', t, manifest, MediaType.ociManifest)
    dir = await mkdtemp(join(tmpdir(), 'pm-listings-'))
    daemon = await startDaemon(dir, `registry.test=${reg.url}`)
  })
  afterAll(async () => {
    await daemon?.stop()
    await reg?.close()
    if (dir !== undefined) await rm(dir, { recursive: true, force: true })
  })

  it('answers 404 for referrers when the upstream has no referrers API, so OCI 1.1 clients fall back', async () => {
    const url = `${daemon.url()}/v2/registry.test/team/app/referrers/${manifestDigest}`
    const r = await simpleRequest(url)
    expect(r.status).toBe(404)
    expect(r.headers['content-type']).toMatch(/application\/json/)
    expect(ociCode(r.body)).toBe('UNSUPPORTED')
    const head = await simpleRequest(url, { method: 'HEAD' })
    expect(head.status).toBe(404)
    // The answer is cached for the tag TTL: the upstream was asked once.
    expect(reg.logs().match(/GET \/v2\/team\/app\/referrers\//g)?.length).toBe(1)
    // A malformed subject digest is the client's error.
    expect((await simpleRequest(`${daemon.url()}/v2/registry.test/team/app/referrers/sha256:zz`)).status).toBe(400)
  })

  it('passes tags/list through (distribution 2.8 does not paginate)', async () => {
    const all = await simpleRequest(`${daemon.url()}/v2/registry.test/team/app/tags/list`)
    expect(all.status).toBe(200)
    // distribution 2.8 lists an unpaginated answer in storage order
    expect((JSON.parse(all.body.toString()) as { tags: string[] }).tags.sort()).toEqual(tags)

    const bad = await simpleRequest(`${daemon.url()}/v2/registry.test/team/app/tags/list?n=abc`)
    expect(bad.status).toBe(400)
    const unknown = await simpleRequest(`${daemon.url()}/v2/registry.test/team/nothing/tags/list`)
    expect(unknown.status).toBe(404)
    expect(ociCode(unknown.body)).toBe('NAME_UNKNOWN')
  })

  it('lets the real skopeo list tags through the mirror', async () => {
    const host = new URL(daemon.url()).host
    const { stdout } = await run('skopeo', ['list-tags', '--tls-verify=false', `docker://${host}/registry.test/team/app`], { timeoutMs: 60_000 })
    const out = JSON.parse(stdout) as { Tags: string[] }
    expect(out.Tags.sort()).toEqual(tags)
  })

  it('lets the real podman list tags through the mirror', async () => {
    const host = new URL(daemon.url()).host
    const { stdout } = await run('podman', ['search', '--list-tags', '--limit', '100', '--tls-verify=false', `${host}/registry.test/team/app`], { timeoutMs: 60_000 })
    // NAME  TAG, one line a tag
    const rows = stdout.trim().split('\n').slice(1).map(l => l.trim().split(/\s+/))
    expect(rows.every(r => r[0] === `${host}/registry.test/team/app`)).toBe(true)
    expect(rows.map(r => r[1]).sort()).toEqual(tags)
  })

  it('refuses _catalog with a clear OCI error', async () => {
    const r = await simpleRequest(`${daemon.url()}/v2/_catalog`)
    expect(r.status).toBe(405)
    const e = (JSON.parse(r.body.toString()) as { errors: Array<{ code: string, detail: { reason: string } }> }).errors[0]!
    expect(e.code).toBe('UNSUPPORTED')
    expect(e.detail.reason).toMatch(/tags\/list/)
  })
})

describe('listings from an upstream with the referrers API that goes down', () => {
  let server: Server
  let closeServer: () => Promise<void>
  let daemon: Daemon
  let dir: string
  const requests: string[] = []
  const upTags = ['a', 'b', 'c', 'd', 'e']
  const subject = sha(Buffer.from('subject'))
  const sig = { mediaType: MediaType.ociManifest, digest: sha(Buffer.from('sig')), size: 100, artifactType: 'application/vnd.dev.cosign.artifact.sig.v1+json' }
  const sbom = { mediaType: MediaType.ociManifest, digest: sha(Buffer.from('sbom')), size: 200, artifactType: 'application/spdx+json' }

  beforeAll(async () => {
    server = createServer((req, res) => {
      requests.push(req.url ?? '')
      const u = new URL(req.url ?? '/', 'http://x')
      let body: Buffer | undefined
      let type = 'application/json'
      const headers: Record<string, string> = {}
      if (u.pathname === `/v2/team/app/referrers/${subject}`) {
        body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [sig, sbom] }))
        type = MediaType.ociIndex
      } else if (u.pathname === '/v2/team/app/tags/list') {
        // Paginated as distribution 3 does: n, last, and a Link to the next page on the upstream.
        const last = u.searchParams.get('last')
        const n = Number(u.searchParams.get('n') ?? '1000')
        const rest = last === null ? upTags : upTags.filter(t => t > last)
        const page = rest.slice(0, n)
        if (page.length < rest.length) headers.link = `</v2/team/app/tags/list?last=${page[page.length - 1]!}&n=${n}>; rel="next"`
        body = Buffer.from(JSON.stringify({ name: 'team/app', tags: page }))
      }
      if (body === undefined) { res.writeHead(404, { 'content-length': 0 }); res.end(); return }
      res.writeHead(200, { ...headers, 'content-type': type, 'content-length': body.length })
      res.end(body)
    })
    closeServer = trackSockets(server).closeServer
    const port = await listen(server)
    dir = await mkdtemp(join(tmpdir(), 'pm-listings-'))
    // A short TTL, so that the next request after it asks the upstream again.
    daemon = await startDaemon(dir, `oci11.test=http://127.0.0.1:${port}`, { tagTtl: '300ms' })
  })
  afterAll(async () => {
    await daemon?.stop()
    await closeServer?.()
    if (dir !== undefined) await rm(dir, { recursive: true, force: true })
  })

  it('paginates tags/list with n and last, rewriting the Link header to point at the mirror', async () => {
    // Follow the Link headers with undici (fetch), as crane and containerd do.
    const seen: string[] = []
    let next: string | undefined = `/v2/oci11.test/team/app/tags/list?n=2`
    let pages = 0
    while (next !== undefined && pages < 10) {
      const res = await fetch(new URL(next, daemon.url()))
      expect(res.status).toBe(200)
      seen.push(...((await res.json()) as { tags: string[] }).tags)
      const link = res.headers.get('link')
      pages++
      if (link === null) { next = undefined; continue }
      const m = /^<([^>]+)>;\s*rel="next"$/.exec(link)
      expect(m, link).not.toBeNull()
      expect(m![1]).toMatch(/^\/v2\/oci11\.test\/team\/app\/tags\/list\?/)
      next = m![1]
    }
    expect(seen).toEqual(upTags)
    expect(pages).toBe(3)

  })

  it('passes referrers through, filters by artifactType, caches them, and serves them stale when the upstream is down', async () => {
    const url = `${daemon.url()}/v2/oci11.test/team/app/referrers/${subject}`
    const r = await simpleRequest(url)
    expect(r.status).toBe(200)
    expect(r.headers['content-type']).toBe(MediaType.ociIndex)
    const doc = JSON.parse(r.body.toString()) as { mediaType: string, manifests: Array<{ digest: string }> }
    expect(doc.mediaType).toBe(MediaType.ociIndex)
    expect(doc.manifests.map(m => m.digest)).toEqual([sig.digest, sbom.digest])

    const f = await simpleRequest(`${url}?artifactType=${encodeURIComponent(sbom.artifactType)}`)
    expect(f.status).toBe(200)
    expect(f.headers['oci-filters-applied']).toBe('artifactType')
    expect((JSON.parse(f.body.toString()) as { manifests: Array<{ digest: string }> }).manifests.map(m => m.digest)).toEqual([sbom.digest])
    // One upstream request for both: the list is cached per subject digest.
    expect(requests.filter(p => p.includes('/referrers/'))).toHaveLength(1)

    const tagsBefore = await simpleRequest(`${daemon.url()}/v2/oci11.test/team/app/tags/list`)
    expect(JSON.parse(tagsBefore.body.toString()).tags).toEqual(upTags)

    await closeServer()
    await new Promise(resolve => setTimeout(resolve, 400)) // past the TTL
    const stale = await simpleRequest(url)
    expect(stale.status).toBe(200)
    expect(stale.headers.warning).toMatch(/^110 /)
    expect((JSON.parse(stale.body.toString()) as { manifests: unknown[] }).manifests).toHaveLength(2)
    const staleTags = await simpleRequest(`${daemon.url()}/v2/oci11.test/team/app/tags/list`)
    expect(staleTags.status).toBe(200)
    expect(JSON.parse(staleTags.body.toString()).tags).toEqual(upTags)

    // Nothing cached for another subject: the upstream's failure is the answer.
    const other = await simpleRequest(`${daemon.url()}/v2/oci11.test/team/app/referrers/${sha(Buffer.from('other'))}`)
    expect(other.status).toBe(503)
  })
})
