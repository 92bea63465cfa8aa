import type { Digest } from '../oci/digest.js'
import type { ByteRange } from '../oci/range.js'
import type { Readable } from 'node:stream'

/** What the index holds for each stored blob or manifest. */
export interface BlobInfo {
  digest: Digest
  size: number
  mediaType: string
  /** ms since epoch; updated lazily (at most about once a minute per blob). */
  lastAccess: number
  createdAt: number
  /** `upstream/repo` names this content was pulled for (bounded list). */
  repos: string[]
  /** Pulled with upstream credentials: never announced to or served to peers (mesh issue). */
  private: boolean
}

/** upstream/repo:tag → digest, and when the upstream last confirmed it. */
export interface TagRecord {
  digest: Digest
  mediaType: string
  size: number
  /** ms since epoch when the upstream last confirmed this mapping. */
  verifiedAt: number
  private: boolean
}

/** Content an operator pinned: never evicted. `name` is the image reference it was pinned as. */
export interface PinRecord { name: string, digests: Digest[], createdAt: number }

export interface BlobMeta { mediaType: string, repo?: string, private?: boolean }

/** Events the store emits after an index change has been committed. */
export type StoreEvent =
  | { type: 'added', info: BlobInfo }
  | { type: 'removed', digest: Digest }
  | { type: 'tag', upstream: string, repo: string, tag: string, record: TagRecord }

/**
 * A write in progress. Bytes go to a temp file inside the data dir while being hashed; nothing is
 * visible under the digest until `commit` has verified size and digest, fsynced and renamed.
 * `tempPath` may be read by others while the write is in progress (up to `bytesWritten`).
 */
export interface BlobWriter {
  readonly digest: Digest
  readonly tempPath: string
  readonly bytesWritten: number
  /**
   * Appends a chunk. The writer may keep a reference to it until the bytes are in the file, so it must
   * not change afterwards. Resolves as soon as there is room for more (bytesWritten may lag); rejects
   * if an earlier write failed or this one would exceed the expected size.
   */
  write (chunk: Uint8Array): Promise<void>
  /** True while write()'s promise is still pending on room: a caller that streams should wait for it. */
  readonly full: boolean
  /**
   * Verifies, fsyncs, renames atomically and indexes. Throws VerificationError (and cleans up) on mismatch.
   * `onVerified` runs as soon as the bytes in the temp file have verified, before the fsync: they may be
   * served from then on, though the blob is in the cache only once commit resolves.
   */
  commit (meta: BlobMeta, onVerified?: () => void): Promise<BlobInfo>
  /** Discards the temp file. Safe to call more than once and after a failed commit. */
  abort (): Promise<void>
}

export interface BlobStore {
  start (): Promise<void>
  stop (): Promise<void>
  stat (digest: Digest): Promise<BlobInfo | undefined>
  /** Opens the blob for reading (1 MiB chunks). Undefined if it is not stored. */
  createReadStream (digest: Digest, range?: ByteRange): Promise<Readable | undefined>
  /** Reads a whole small blob (manifests); undefined if missing. Throws if larger than maxBytes. */
  readBuffer (digest: Digest, maxBytes: number): Promise<Buffer | undefined>
  /** `onProgress` runs each time more of the accepted bytes have reached the file (bytesWritten grew). */
  createWriter (digest: Digest, opts?: { expectedSize?: number, onProgress?: () => void }): Promise<BlobWriter>
  /** Verifies and stores a small buffer (manifests). Throws VerificationError on mismatch. */
  putBuffer (digest: Digest, buf: Uint8Array, meta: BlobMeta): Promise<BlobInfo>
  /** Records an access (and the repo it was for); persisted lazily. */
  touch (digest: Digest, repo?: string): void
  delete (digest: Digest): Promise<boolean>
  getTag (upstream: string, repo: string, tag: string): Promise<TagRecord | undefined>
  putTag (upstream: string, repo: string, tag: string, record: TagRecord): Promise<void>
  deleteTag (upstream: string, repo: string, tag: string): Promise<void>
  listBlobs (): AsyncIterable<BlobInfo>
  listTags (): AsyncIterable<{ upstream: string, repo: string, tag: string, record: TagRecord }>
  /** Totals over verified content. */
  usage (): { bytes: number, blobs: number }
  /** True while a read stream of the blob is open (a client is being served from it). */
  inUse (digest: Digest): boolean
  putPin (name: string, digests: Digest[]): Promise<void>
  /** Returns false if there was no such pin. */
  deletePin (name: string): Promise<boolean>
  listPins (): AsyncIterable<PinRecord>
  subscribe (listener: (e: StoreEvent) => void): () => void
}
