export const MediaType = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifestV1Signed: 'application/vnd.docker.distribution.manifest.v1+prettyjws',
  dockerManifestV1: 'application/vnd.docker.distribution.manifest.v1+json',
  octetStream: 'application/octet-stream',
} as const

export const MANIFEST_MEDIA_TYPES: readonly string[] = [
  MediaType.ociIndex, MediaType.dockerManifestList, MediaType.ociManifest, MediaType.dockerManifest,
  MediaType.dockerManifestV1Signed, MediaType.dockerManifestV1,
]
export const INDEX_MEDIA_TYPES: readonly string[] = [MediaType.ociIndex, MediaType.dockerManifestList]
export const SINGLE_MANIFEST_MEDIA_TYPES: readonly string[] = [MediaType.ociManifest, MediaType.dockerManifest]

/** The Accept header pullmesh sends upstream: every manifest type, so one digest per tag. */
export const UPSTREAM_MANIFEST_ACCEPT = MANIFEST_MEDIA_TYPES.join(', ')

/** Largest manifest pullmesh accepts, from a client's view or an upstream's (the spec's 4 MiB). */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024

/** Parses an Accept header into bare media types (parameters and q dropped; q=0 entries removed). */
export function parseAccept (header: string | string[] | undefined): string[] {
  if (header === undefined) return []
  const parts = (Array.isArray(header) ? header.join(',') : header).split(',')
  const out: string[] = []
  for (const p of parts) {
    const [type, ...params] = p.split(';').map(s => s.trim().toLowerCase())
    if (type === undefined || type === '') continue
    if (params.some(x => /^q=0(?:\.0*)?$/.test(x))) continue
    out.push(type)
  }
  return out
}

/** True if a client that sent `accepted` can take `mediaType`. No Accept at all accepts anything. */
export function accepts (accepted: string[], mediaType: string): boolean {
  if (accepted.length === 0) return true
  return accepted.some(a => a === mediaType || a === '*/*' || a === 'application/*' ||
    // Old docker clients send the schema1 type alongside; a missing header is common too.
    (a === 'application/json' && mediaType === MediaType.dockerManifestV1))
}

/** Reads the mediaType a manifest declares about itself, if it is JSON with such a field. */
export function sniffManifestMediaType (buf: Uint8Array): string | undefined {
  try {
    const doc = JSON.parse(Buffer.from(buf).toString('utf8')) as unknown
    if (typeof doc !== 'object' || doc === null) return undefined
    const mt = (doc as { mediaType?: unknown }).mediaType
    if (typeof mt === 'string' && MANIFEST_MEDIA_TYPES.includes(mt)) return mt
    const d = doc as { manifests?: unknown, config?: unknown, schemaVersion?: unknown, fsLayers?: unknown }
    if (Array.isArray(d.manifests)) return MediaType.ociIndex
    if (d.config !== undefined) return MediaType.ociManifest
    if (d.schemaVersion === 1 && Array.isArray(d.fsLayers)) return MediaType.dockerManifestV1Signed
    return undefined
  } catch {
    return undefined
  }
}
