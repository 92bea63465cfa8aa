import type { Readable } from 'node:stream'
import type { Digest } from '../oci/digest.js'
import type { ByteRange } from '../oci/range.js'
import type { TagRecord } from '../store/types.js'
import type { FillSource } from './fill.js'

export type ContentOrigin = 'store' | 'fill' | 'peer' | 'upstream'

export interface ManifestResult {
  body: Buffer
  mediaType: string
  digest: Digest
  source: ContentOrigin
}

/** A blob that can be served: its size is known; `open` gives the bytes (or a range of them). */
export interface BlobHandle {
  digest: Digest
  size: number
  source: ContentOrigin
  open (range?: ByteRange): Promise<Readable>
}

/**
 * What the resolver needs from the mesh. Every method reads only local state: choosing a peer
 * never waits on the network. The mesh layer implements it; a node without a mesh has none.
 */
export interface PeerContent {
  /** Fill sources for `digest`, one per peer that announced it, best first. */
  blobSources (digest: Digest): FillSource[]
  /** Fetches a small blob (a manifest) from the peers that hold it, verified against `digest`; or undefined. */
  fetchSmall (digest: Digest, maxBytes: number, signal?: AbortSignal): Promise<Buffer | undefined>
  /** Tag records peers announced, freshest first. */
  tagRecords (upstream: string, repo: string, tag: string): TagRecord[]
}
