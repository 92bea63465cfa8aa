import type { FastifyInstance, FastifyRequest } from 'fastify'
import { isIP } from 'node:net'
import { hostname } from 'node:os'
import type { Resolver } from '../content/resolver.js'
import type { BlobStore } from '../store/types.js'
import type { Evictor } from '../store/eviction.js'
import type { Metrics } from '../metrics.js'
import type { Logger } from '../logger.js'
import { walkImage, manifestChildren } from '../content/image.js'
import { formatImageRef, parseImageRef } from '../oci/image-ref.js'
import { parseReference, resolveTarget, type RoutingInit, type Target } from '../oci/reference.js'
import { tryParseDigest, type Digest } from '../oci/digest.js'
import { MAX_MANIFEST_BYTES } from '../oci/media-types.js'
import { OciError } from '../errors.js'

/** Sent by `pullmesh pin|unpin|gc|evict`: a header a web page cannot add to a cross-site request. */
export const ADMIN_HEADER = 'x-pullmesh-admin'

export interface AdminComponents { resolver: Resolver, store: BlobStore, evictor: Evictor, metrics: Metrics, logger: Logger }

/**
 * The operator's API behind `pullmesh pin|unpin|gc|evict`. Everything that changes the cache is
 * accepted only from loopback, even when the registry API listens on the LAN, and only with the header
 * `x-pullmesh-admin: 1` or a JSON body: a web page open in a browser on this host can send neither
 * cross-site without a CORS preflight, which is never granted here.
 */
export function registerAdminRoutes (app: FastifyInstance, c: AdminComponents, routing: RoutingInit): void {
  const log = c.logger.child({ component: 'admin' })

  function imageTarget (image: unknown): { name: string, target: Target, reference: string } {
    if (typeof image !== 'string') throw new OciError('NAME_INVALID', 400, 'expected {"image": "<reference>"}')
    const ref = parseImageRef(image)
    const target = resolveTarget(ref.repo, ref.registry, routing)
    return { name: formatImageRef({ registry: target.upstream, repo: target.repo, reference: ref.reference }), target, reference: ref.reference }
  }

  app.get('/pullmesh/v1/pins', async () => {
    const pins = []
    for await (const p of c.store.listPins()) pins.push({ name: p.name, digests: p.digests.length, createdAt: new Date(p.createdAt).toISOString() })
    return { pins }
  })

  app.post('/pullmesh/v1/pins', { onRequest: adminOnly }, async (req) => {
    const { name, target, reference } = imageTarget((req.body as { image?: unknown } | undefined)?.image)
    const contents = await walkImage(c.resolver, target, parseReference(reference), { fetchBlobs: true })
    const digests = [...contents.manifests, ...contents.blobs.map(b => b.digest)]
    await c.store.putPin(name, digests)
    log.info({ image: name, digests: digests.length }, 'pinned')
    return { pinned: name, manifests: contents.manifests.length, blobs: contents.blobs.length, bytes: contents.blobs.reduce((n, b) => n + b.size, 0) }
  })

  app.delete('/pullmesh/v1/pins', { onRequest: adminOnly }, async (req) => {
    const { name } = imageTarget((req.query as { image?: unknown }).image)
    if (!(await c.store.deletePin(name))) throw new OciError('NAME_UNKNOWN', 404, 'no such pin', { image: name })
    log.info({ image: name }, 'unpinned')
    return { unpinned: name }
  })

  app.post('/pullmesh/v1/gc', { onRequest: adminOnly }, async () => {
    const result = await c.evictor.run('gc')
    // Tag records whose manifest is gone point nowhere: drop them.
    let tagsDropped = 0
    for await (const t of c.store.listTags()) {
      if (await c.store.stat(t.record.digest) === undefined) {
        await c.store.deleteTag(t.upstream, t.repo, t.tag)
        tagsDropped++
      }
    }
    return { ...result, tagsDropped, store: c.store.usage() }
  })

  app.post('/pullmesh/v1/evict', { onRequest: adminOnly }, async (req) => {
    const what = (req.body as { target?: unknown } | undefined)?.target
    if (typeof what !== 'string') throw new OciError('NAME_INVALID', 400, 'expected {"target": "<image or digest>"}')
    const digest = tryParseDigest(what)
    let digests: Digest[]
    let tagToDrop: { upstream: string, repo: string, tag: string } | undefined
    if (digest !== undefined) {
      digests = [digest]
    } else {
      // An image is evicted as far as this node knows it: from local records only, never the upstream.
      const { target, reference } = imageTarget(what)
      const ref = parseReference(reference)
      let root: Digest | undefined
      if (ref.kind === 'digest') root = ref.digest
      else {
        root = (await c.store.getTag(target.upstream, target.repo, ref.tag))?.digest
        tagToDrop = { upstream: target.upstream, repo: target.repo, tag: ref.tag }
      }
      if (root === undefined) throw new OciError('MANIFEST_UNKNOWN', 404, 'this image is not cached here', { image: what })
      digests = await localImageDigests(c.store, root)
    }
    const pinned = new Set<Digest>()
    for await (const p of c.store.listPins()) for (const d of p.digests) pinned.add(d)
    const busy = new Set(c.resolver.activeFills())
    const evicted: Digest[] = []
    const skipped: Array<{ digest: Digest, reason: string }> = []
    for (const d of digests) {
      if (pinned.has(d)) { skipped.push({ digest: d, reason: 'pinned' }); continue }
      if (busy.has(d) || c.store.inUse(d)) { skipped.push({ digest: d, reason: 'in use' }); continue }
      if (await c.store.delete(d)) {
        evicted.push(d)
        c.metrics.evictions.inc({ reason: 'manual' })
      }
    }
    if (tagToDrop !== undefined) await c.store.deleteTag(tagToDrop.upstream, tagToDrop.repo, tagToDrop.tag)
    log.info({ target: what, evicted: evicted.length, skipped: skipped.length }, 'evicted on request')
    return { evicted, skipped }
  })
}

function loopbackOnly (req: FastifyRequest): void {
  const ip = req.socket.remoteAddress ?? ''
  if (!(ip.startsWith('127.') || ip === '::1' || ip.startsWith('::ffff:127.'))) {
    throw new OciError('DENIED', 403, 'cache administration is accepted from this host only')
  }
}

/**
 * The guard for every state-changing admin route (use it as the route's onRequest hook, so that a refused
 * request is never parsed): loopback peers only, with the admin header or a JSON body.
 */
export async function adminOnly (req: FastifyRequest): Promise<void> {
  loopbackOnly(req)
  // DNS rebinding: a page whose name now resolves to 127.0.0.1 is same-origin with this API and may add
  // headers; its Host header still carries its own name.
  const host = hostOf(req.headers.host ?? '')
  if (!(isIP(host) !== 0 || host === 'localhost' || host.endsWith('.localhost') || host === hostname().toLowerCase())) {
    throw new OciError('DENIED', 403, 'cache administration is accepted for an IP address, localhost or this host\'s name only (Host header)')
  }
  if (req.headers[ADMIN_HEADER] === '1') return
  const type = (req.headers['content-type'] ?? '').split(';', 1)[0]!.trim().toLowerCase()
  if (type === 'application/json') return
  throw new OciError('DENIED', 403, `cache administration needs the header "${ADMIN_HEADER}: 1" or a JSON body (content-type application/json), which a browser cannot send cross-site`)
}

function hostOf (header: string): string {
  const h = header.trim().toLowerCase()
  if (h.startsWith('[')) return h.slice(1, h.indexOf(']') > 0 ? h.indexOf(']') : undefined)
  return h.split(':', 1)[0]!.replace(/\.$/, '')
}

/** The digests of a cached image tree, from the store alone. */
async function localImageDigests (store: BlobStore, root: Digest): Promise<Digest[]> {
  const out: Digest[] = []
  const queue: Digest[] = [root]
  const seen = new Set<Digest>()
  while (queue.length > 0) {
    const d = queue.shift()!
    if (seen.has(d)) continue
    seen.add(d)
    out.push(d)
    const info = await store.stat(d)
    if (info === undefined || info.size > MAX_MANIFEST_BYTES) continue
    const body = await store.readBuffer(d, MAX_MANIFEST_BYTES)
    if (body === undefined) continue
    const kids = manifestChildren(body, info.mediaType)
    queue.push(...kids.manifests, ...kids.blobs.map(b => b.digest))
  }
  return out
}
