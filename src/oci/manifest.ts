import type { Digest } from './digest.js'
import { tryParseDigest } from './digest.js'
import { INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, sniffManifestMediaType } from './media-types.js'

/** An OCI platform, as index entries carry it. */
export interface Platform { os: string, architecture: string, variant?: string }

/** A manifest that cannot be read: not JSON, or entries without a valid digest or size. */
export class ManifestInvalidError extends Error {
  override readonly name = 'ManifestInvalidError'
  readonly code = 'PM_MANIFEST_INVALID'
}

export interface Descriptor {
  digest: Digest
  /** Unknown only for schema1 layers. */
  size: number | undefined
  mediaType: string | undefined
  platform?: Platform | undefined
}

export type ParsedManifest =
  | { kind: 'index', manifests: Descriptor[] }
  | { kind: 'image', blobs: Descriptor[], skipped: number }

/**
 * Reads what a manifest points at. Layers that registries do not serve (foreign or
 * non-distributable, e.g. Windows base layers) are skipped and counted.
 */
export function parseManifest (bytes: Uint8Array, contentType: string | undefined): ParsedManifest {
  let doc: Record<string, unknown>
  try {
    const v = JSON.parse(Buffer.from(bytes).toString('utf8')) as unknown
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not a JSON object')
    doc = v as Record<string, unknown>
  } catch (err) {
    throw new ManifestInvalidError(`the manifest is not valid JSON: ${(err as Error).message}`)
  }
  const mediaType = contentType !== undefined && MANIFEST_MEDIA_TYPES.includes(contentType) ? contentType : sniffManifestMediaType(bytes)
  if ((mediaType !== undefined && INDEX_MEDIA_TYPES.includes(mediaType)) || Array.isArray(doc.manifests)) {
    return { kind: 'index', manifests: descriptors(doc.manifests, 'manifests') }
  }
  if (Array.isArray(doc.fsLayers)) {
    const seen = new Set<string>()
    const blobs: Descriptor[] = []
    for (const l of doc.fsLayers as Array<{ blobSum?: unknown }>) {
      const d = typeof l?.blobSum === 'string' ? tryParseDigest(l.blobSum) : undefined
      if (d === undefined) throw new ManifestInvalidError('a schema1 layer has no valid blobSum')
      if (!seen.has(d)) { seen.add(d); blobs.push({ digest: d, size: undefined, mediaType: undefined }) }
    }
    return { kind: 'image', blobs, skipped: 0 }
  }
  if (doc.config === undefined) throw new ManifestInvalidError('the manifest has neither manifests, config nor layers')
  const all = [...descriptors([doc.config], 'config'), ...descriptors(doc.layers ?? [], 'layers')]
  const blobs = all.filter(d => !nonDistributable(d.mediaType))
  return { kind: 'image', blobs, skipped: all.length - blobs.length }
}

function nonDistributable (mediaType: string | undefined): boolean {
  return mediaType !== undefined && (mediaType.includes('.nondistributable.') || mediaType.includes('.foreign.'))
}

function descriptors (v: unknown, field: string): Descriptor[] {
  if (!Array.isArray(v)) throw new ManifestInvalidError(`the manifest's "${field}" is not a list`)
  return v.map((x: unknown) => {
    const o = (typeof x === 'object' && x !== null ? x : {}) as { digest?: unknown, size?: unknown, mediaType?: unknown, platform?: unknown }
    const digest = typeof o.digest === 'string' ? tryParseDigest(o.digest) : undefined
    if (digest === undefined) throw new ManifestInvalidError(`an entry of "${field}" has no valid digest`)
    if (typeof o.size !== 'number' || !Number.isSafeInteger(o.size) || o.size < 0) {
      throw new ManifestInvalidError(`the entry ${digest} in "${field}" has no valid size`)
    }
    const p = o.platform as { os?: unknown, architecture?: unknown, variant?: unknown } | undefined
    const platform = typeof p?.os === 'string' && typeof p.architecture === 'string'
      ? { os: p.os, architecture: p.architecture, ...(typeof p.variant === 'string' && p.variant !== '' ? { variant: p.variant } : {}) }
      : undefined
    return { digest, size: o.size, mediaType: typeof o.mediaType === 'string' ? o.mediaType : undefined, ...(platform !== undefined ? { platform } : {}) }
  })
}
