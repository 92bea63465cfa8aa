// Listings passed through from the upstream: the OCI 1.1 referrers of a subject digest and a
// repository's tags (and the size of a blob, for a HEAD on a miss). Both are small JSON documents, cached in memory for a short time and served
// stale when the upstream fails (stale-if-error). Nothing here touches the blob store.
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { Digest } from '../oci/digest.js'
import { MediaType } from '../oci/media-types.js'
import type { Target } from '../oci/reference.js'
import type { ListingResponse, UpstreamClient } from '../upstream/types.js'
import { OciError, UpstreamProtocolError, UpstreamRateLimitedError, UpstreamUnavailableError, nameUnknown } from '../errors.js'

export interface ListingsInit {
  /** Referrers are kept this long before the upstream is asked again (the tag TTL). */
  referrersTtlMs: number
  /** Tag lists are kept this long: short, since tags move. */
  tagsTtlMs: number
  /** Bytes of listings kept in memory at most; the least recently used go first. */
  maxBytes?: number
  /** Pages of one referrers list followed at most. */
  maxPages?: number
}

export interface ListingsComponents {
  upstreams: ReadonlyMap<string, UpstreamClient>
  /** Tags that mesh peers announced for a repo: answers a tag list while the upstream is unreachable. */
  peerTags?: (upstream: string, repo: string) => string[]
  logger: Logger
  metrics: Metrics
  now?: () => number
}

export interface ReferrersAnswer {
  /** An OCI image index listing the referrers. */
  body: Buffer
  /** True when the list was filtered by `artifactType` (the `OCI-Filters-Applied` header). */
  filtered: boolean
  /** True when the upstream failed and a cached list answered. */
  stale: boolean
}

export interface TagsAnswer {
  body: Buffer
  /** The next page, when the upstream has one: its `n` and `last`. */
  next: { n: string | undefined, last: string | undefined } | undefined
  stale: boolean
  /** True when the upstream was unreachable and the list is made of the tags mesh peers know. */
  fromMesh?: boolean
}

export interface TagsQuery { n?: number, last?: string }

export interface Listings {
  /** Throws a 404 OciError when the upstream has no referrers API, so that clients fall back to tags. */
  referrers (target: Target, subject: Digest, artifactType?: string): Promise<ReferrersAnswer>
  tags (target: Target, query: TagsQuery): Promise<TagsAnswer>
  /**
   * The size of a blob as the upstream states it (a HEAD; nothing is downloaded), or undefined when
   * the upstream does not have it. For HEAD requests on a cache miss.
   */
  blobSize (target: Target, digest: Digest, signal?: AbortSignal): Promise<number | undefined>
}

type Cached =
  | { kind: 'referrers', manifests: unknown[] }
  | { kind: 'unsupported' }
  | { kind: 'tags', body: Buffer, next: TagsAnswer['next'] }

interface Entry { value: Cached, at: number, bytes: number }

const DEFAULT_MAX_BYTES = 32 * 1024 * 1024
const DEFAULT_MAX_PAGES = 8

export function createListings (components: ListingsComponents, init: ListingsInit): Listings {
  const { upstreams, metrics } = components
  const log = components.logger.child({ component: 'listings' })
  const now = components.now ?? Date.now
  const maxBytes = init.maxBytes ?? DEFAULT_MAX_BYTES
  const maxPages = init.maxPages ?? DEFAULT_MAX_PAGES
  const cache = new Map<string, Entry>()
  const flights = new Map<string, Promise<Cached>>()
  let bytes = 0

  function upstreamFor (target: Target): UpstreamClient {
    const up = upstreams.get(target.upstream)
    if (up === undefined) throw new OciError('NAME_UNKNOWN', 404, 'upstream is not configured', { upstream: target.upstream })
    return up
  }

  function remember (key: string, value: Cached, size: number): void {
    forget(key)
    cache.set(key, { value, at: now(), bytes: size })
    bytes += size
    for (const [k, e] of cache) {
      if (bytes <= maxBytes) break
      cache.delete(k)
      bytes -= e.bytes
    }
  }

  function forget (key: string): void {
    const e = cache.get(key)
    if (e === undefined) return
    cache.delete(key)
    bytes -= e.bytes
  }

  /** The cached value when fresh; else one shared fetch; on an upstream failure, the stale value. */
  async function lookup (key: string, ttlMs: number, up: UpstreamClient, what: Record<string, string>, fetch: () => Promise<{ value: Cached, size: number }>): Promise<{ value: Cached, stale: boolean }> {
    const hit = cache.get(key)
    if (hit !== undefined && now() - hit.at < ttlMs) {
      cache.delete(key); cache.set(key, hit) // most recently used last
      return { value: hit.value, stale: false }
    }
    let flight = flights.get(key)
    if (flight === undefined) {
      flight = fetch()
        .then(r => { remember(key, r.value, r.size); return r.value })
        .finally(() => flights.delete(key))
      flights.set(key, flight)
    }
    try {
      return { value: await flight, stale: false }
    } catch (err) {
      const old = cache.get(key)
      if (old !== undefined && (err instanceof UpstreamUnavailableError || err instanceof UpstreamRateLimitedError)) {
        metrics.staleServed.inc({ upstream: up.name })
        log.warn({ ...what, upstream: up.name, fetchedAt: new Date(old.at).toISOString(), reason: err.message }, 'upstream failed; serving a cached listing (stale-if-error)')
        return { value: old.value, stale: true }
      }
      throw err
    }
  }

  async function fetchReferrers (up: UpstreamClient, target: Target, subject: Digest): Promise<{ value: Cached, size: number }> {
    const manifests: unknown[] = []
    let size = 0
    let page: string | undefined
    for (let i = 0; i < maxPages; i++) {
      const res = await up.getReferrers(target.repo, subject, page !== undefined ? { page } : {})
      if (res === undefined) {
        if (i === 0) return { value: { kind: 'unsupported' }, size: 64 }
        break
      }
      const doc = parseJson(res, up.name, 'referrers list') as { manifests?: unknown }
      if (!Array.isArray(doc.manifests)) throw new UpstreamProtocolError(up.name, 'referrers list without a manifests array')
      manifests.push(...doc.manifests.filter(m => typeof m === 'object' && m !== null))
      size += res.body.length
      page = nextLink(res.link)
      if (page === undefined) break
    }
    return { value: { kind: 'referrers', manifests }, size }
  }

  async function fetchTags (up: UpstreamClient, target: Target, q: TagsQuery): Promise<{ value: Cached, size: number }> {
    const res = await up.listTags(target.repo, q)
    if (res === undefined) throw nameUnknown({ name: target.repo })
    const doc = parseJson(res, up.name, 'tag list') as { tags?: unknown }
    if (doc.tags !== null && doc.tags !== undefined && !(Array.isArray(doc.tags) && doc.tags.every(t => typeof t === 'string'))) {
      throw new UpstreamProtocolError(up.name, 'tag list without a tags array')
    }
    const link = nextLink(res.link)
    let next: TagsAnswer['next']
    if (link !== undefined) {
      const u = new URL(link, 'http://upstream.invalid')
      next = { n: u.searchParams.get('n') ?? undefined, last: u.searchParams.get('last') ?? undefined }
    }
    return { value: { kind: 'tags', body: res.body, next }, size: res.body.length }
  }

  return {
    async referrers (target: Target, subject: Digest, artifactType?: string): Promise<ReferrersAnswer> {
      const up = upstreamFor(target)
      const key = `r ${target.upstream}/${target.repo}@${subject}`
      const { value, stale } = await lookup(key, init.referrersTtlMs, up, { repo: target.repo, subject }, async () => await fetchReferrers(up, target, subject))
      if (value.kind !== 'referrers') {
        throw new OciError('UNSUPPORTED', 404, 'the upstream registry does not support the referrers API; use the tag schema', { upstream: up.name })
      }
      const manifests = artifactType === undefined
        ? value.manifests
        : value.manifests.filter(m => (m as { artifactType?: unknown }).artifactType === artifactType)
      const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests }))
      return { body, filtered: artifactType !== undefined, stale }
    },

    async blobSize (target: Target, digest: Digest, signal?: AbortSignal): Promise<number | undefined> {
      const res = await upstreamFor(target).headBlob(target.repo, digest, signal !== undefined ? { signal } : {})
      return res?.size
    },

    async tags (target: Target, q: TagsQuery): Promise<TagsAnswer> {
      const up = upstreamFor(target)
      const key = `t ${target.upstream}/${target.repo}?n=${q.n ?? ''}&last=${q.last ?? ''}`
      let found: { value: Cached, stale: boolean }
      try {
        found = await lookup(key, init.tagsTtlMs, up, { repo: target.repo }, async () => await fetchTags(up, target, q))
      } catch (err) {
        // Unreachable and nothing cached: the tags mesh peers announced, marked as such (x-pullmesh-source: mesh).
        const known = (err instanceof UpstreamUnavailableError || err instanceof UpstreamRateLimitedError) ? components.peerTags?.(target.upstream, target.repo) ?? [] : []
        if (known.length === 0) throw err
        let tags = [...known].sort()
        if (q.last !== undefined) { const last = q.last; tags = tags.filter(t => t > last) }
        if (q.n !== undefined) tags = tags.slice(0, q.n)
        metrics.staleServed.inc({ upstream: up.name })
        log.warn({ repo: target.repo, upstream: up.name, tags: tags.length, reason: (err as Error).message }, 'upstream failed; answering a tag list from the tags mesh peers know')
        return { body: Buffer.from(JSON.stringify({ name: target.repo, tags })), next: undefined, stale: true, fromMesh: true }
      }
      const { value, stale } = found
      if (value.kind !== 'tags') throw new Error('listing cache holds the wrong kind for a tag list')
      return { body: value.body, next: value.next, stale }
    },
  }
}

function parseJson (res: ListingResponse, upstream: string, what: string): Record<string, unknown> {
  let doc: unknown
  try { doc = JSON.parse(res.body.toString('utf8')) } catch { doc = undefined }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw new UpstreamProtocolError(upstream, `${what} is not a JSON object`)
  return doc as Record<string, unknown>
}

/** The target of `rel="next"` in a `Link` header (RFC 8288), if any. */
export function nextLink (header: string | undefined): string | undefined {
  if (header === undefined) return undefined
  for (const part of header.split(/,(?=\s*<)/)) {
    const m = /^\s*<([^>]*)>\s*;(.*)$/.exec(part)
    if (m === null) continue
    if (/(?:^|;)\s*rel\s*=\s*"?(?:[^";]*\s)?next(?:\s[^";]*)?"?\s*(?:;|$)/i.test(m[2] ?? '')) return m[1]
  }
  return undefined
}
