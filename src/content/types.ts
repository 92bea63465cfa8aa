import type { Readable } from 'node:stream'
import type { Digest } from '../oci/digest.js'
import type { ByteRange } from '../oci/range.js'
import type { TagRecord } from '../store/types.js'
import type { FillSource } from './fill.js'
import type { PeerHolder } from '../mesh/types.js'

/** A manifest a fetcher resolved for us; the caller verifies `body` against `digest`. */
export interface DelegatedManifest { body: Buffer, mediaType: string, digest: string, verifiedAt?: number }

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
  /** For a fill: where its bytes came from in the end (peer or upstream), asked once the response is done. */
  origin?: () => ContentOrigin
  open (range?: ByteRange): Promise<Readable>
}

/**
 * What the resolver needs from the mesh. Every method reads only local state: choosing a peer
 * never waits on the network. The mesh layer implements it; a node without a mesh has none.
 */
export interface PeerContent {
  /** Fill sources for `digest`: peers that hold it (best first), then peers filling it right now. */
  blobSources (digest: Digest): FillSource[]
  /**
   * Who fetches `key` from the upstream with this id for the mesh: 'self', a peer, or undefined when
   * the mesh is not up. Rendezvous hashing over this node and the connected peers that serve it.
   */
  fetcherFor (upstreamId: string, key: string): 'self' | PeerHolder | undefined
  /** A fill source that asks `fetcher` to fetch the blob for us (it never forwards the request). */
  delegateBlob (fetcher: PeerHolder, upstreamId: string, repo: string, digest: Digest): FillSource
  /** Asks `fetcher` for a manifest by tag or digest; undefined if it failed (the caller then asks the upstream). */
  delegateManifest (fetcher: PeerHolder, upstreamId: string, repo: string, reference: string, maxBytes: number, signal?: AbortSignal): Promise<DelegatedManifest | undefined>
  /** Tells peers that a fill of ours can be streamed from now. */
  announceFilling (digest: Digest, size: number): void
  fillingEnded (digest: Digest, ok: boolean): void
  /** Fetches a small blob (a manifest) from the peers that hold it, verified against `digest`; or undefined. */
  fetchSmall (digest: Digest, maxBytes: number, signal?: AbortSignal): Promise<Buffer | undefined>
  /** Tag records peers announced, freshest first. */
  tagRecords (upstream: string, repo: string, tag: string): TagRecord[]
}
