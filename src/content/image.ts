import type { Readable } from 'node:stream'
import type { Digest } from '../oci/digest.js'
import type { Reference, Target } from '../oci/reference.js'
import { MANIFEST_MEDIA_TYPES } from '../oci/media-types.js'
import { ManifestInvalidError, parseManifest } from '../oci/manifest.js'
import type { Resolver } from './resolver.js'

/** Everything an image consists of: its manifests (index included) and its blobs (configs, layers). */
export interface ImageContents { manifests: Digest[], blobs: Array<{ digest: Digest, size: number }> }

/**
 * The digests a manifest or index points at, from the shared parser: foreign (non-distributable)
 * layers, which registries do not serve, are left out. A malformed manifest has no children.
 */
export function manifestChildren (body: Buffer, mediaType: string): { manifests: Digest[], blobs: Array<{ digest: Digest, size: number }> } {
  let parsed
  try { parsed = parseManifest(body, mediaType) } catch (err) {
    if (err instanceof ManifestInvalidError) return { manifests: [], blobs: [] }
    throw err
  }
  if (parsed.kind === 'index') return { manifests: parsed.manifests.map(m => m.digest), blobs: [] }
  return { manifests: [], blobs: parsed.blobs.map(b => ({ digest: b.digest, size: b.size ?? 0 })) }
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
        const s = await h.open() as Readable & { recycle?: (chunk: Buffer) => void }
        for await (const chunk of s) s.recycle?.(chunk as Buffer) // its buffer may be read into again
      }
    }
  }
  return { manifests, blobs: [...blobs].map(([digest, size]) => ({ digest, size })) }
}
