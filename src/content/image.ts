import type { Digest } from '../oci/digest.js'
import { tryParseDigest } from '../oci/digest.js'
import type { Reference, Target } from '../oci/reference.js'
import { INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES } from '../oci/media-types.js'
import type { Resolver } from './resolver.js'

/** Everything an image consists of: its manifests (index included) and its blobs (configs, layers). */
export interface ImageContents { manifests: Digest[], blobs: Array<{ digest: Digest, size: number }> }

/** The digests a manifest or index points at. Pure: malformed entries are ignored. */
export function manifestChildren (body: Buffer, mediaType: string): { manifests: Digest[], blobs: Array<{ digest: Digest, size: number }> } {
  let doc: { manifests?: unknown, config?: unknown, layers?: unknown }
  try { doc = JSON.parse(body.toString('utf8')) as typeof doc } catch { return { manifests: [], blobs: [] } }
  const descs = (v: unknown): Array<{ digest: Digest, size: number, mediaType?: string }> => {
    if (!Array.isArray(v)) return []
    const out: Array<{ digest: Digest, size: number, mediaType?: string }> = []
    for (const x of v as Array<{ digest?: unknown, size?: unknown, mediaType?: unknown }>) {
      const d = typeof x?.digest === 'string' ? tryParseDigest(x.digest) : undefined
      if (d !== undefined) out.push({ digest: d, size: typeof x.size === 'number' ? x.size : 0, ...(typeof x.mediaType === 'string' ? { mediaType: x.mediaType } : {}) })
    }
    return out
  }
  if (INDEX_MEDIA_TYPES.includes(mediaType) || Array.isArray(doc.manifests)) {
    return { manifests: descs(doc.manifests).filter(m => m.mediaType === undefined || MANIFEST_MEDIA_TYPES.includes(m.mediaType)).map(m => m.digest), blobs: [] }
  }
  return { manifests: [], blobs: [...descs(doc.config !== undefined ? [doc.config] : []), ...descs(doc.layers)].map(({ digest, size }) => ({ digest, size })) }
}

/**
 * Walks an image through the resolver (local store, then peers, then the upstream) and, with
 * `fetchBlobs`, makes sure every blob is cached. Returns every digest it consists of.
 */
export async function walkImage (resolver: Resolver, target: Target, ref: Reference, opts: { fetchBlobs: boolean, signal?: AbortSignal }): Promise<ImageContents> {
  const manifests: Digest[] = []
  const blobs = new Map<Digest, number>()
  const queue: Reference[] = [ref]
  const seen = new Set<string>()
  while (queue.length > 0) {
    const r = queue.shift()!
    const key = r.kind === 'tag' ? r.tag : r.digest
    if (seen.has(key)) continue
    seen.add(key)
    const m = await resolver.manifest(target, r, [...MANIFEST_MEDIA_TYPES], opts.signal)
    manifests.push(m.digest)
    const kids = manifestChildren(m.body, m.mediaType)
    for (const d of kids.manifests) queue.push({ kind: 'digest', digest: d })
    for (const b of kids.blobs) blobs.set(b.digest, b.size)
  }
  if (opts.fetchBlobs) {
    for (const d of blobs.keys()) {
      const h = await resolver.blob(target, d, opts.signal)
      if (h.source !== 'store') {
        // Drain the fill's stream: it ends only once the blob has verified and is stored.
        const s = await h.open()
        for await (const _ of s) { /* discard */ }
      }
    }
  }
  return { manifests, blobs: [...blobs].map(([digest, size]) => ({ digest, size })) }
}
