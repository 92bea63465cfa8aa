import type { Readable } from 'node:stream'
import type { Digest } from '../oci/digest.js'
import type { RepoName } from '../oci/reference.js'
import type { ByteRange } from '../oci/range.js'

export interface UpstreamInit {
  /** The name clients use, e.g. `docker.io` or `127.0.0.1:5001`. */
  name: string
  /** Base URL, e.g. `https://registry-1.docker.io`. */
  url: string
  credentials?: { username: string, password: string }
  connectTimeoutMs: number
  headersTimeoutMs: number
  bodyIdleTimeoutMs: number
  /** Attempts for idempotent requests on connect errors and 5xx (1 = no retry). */
  maxAttempts: number
  /** First backoff delay; doubles per attempt, with jitter. */
  retryBaseMs: number
}

export interface ManifestResponse { body: Buffer, mediaType: string, digest?: string }
export interface ManifestHead { mediaType: string, digest?: string, size?: number }
export interface BlobResponse {
  /** The response body. Consume it or destroy it. Errors are already ours, never undici's. */
  body: Readable
  /** Total size of the blob (from Content-Length, or Content-Range for a range). */
  size: number
  /** True if the upstream answered a range request with 206. */
  partial: boolean
}

export interface AbortOptions { signal?: AbortSignal }

/**
 * One configured upstream registry. Missing content (404) is `undefined`; every other failure
 * throws one of the Upstream*Error classes from ../errors.ts.
 */
export interface UpstreamClient {
  readonly name: string
  /** True when the pulls go out with credentials (content is then private to this node by default). */
  readonly authenticated: boolean
  getManifest (repo: RepoName, reference: string, o?: AbortOptions): Promise<ManifestResponse | undefined>
  headManifest (repo: RepoName, reference: string, o?: AbortOptions): Promise<ManifestHead | undefined>
  getBlob (repo: RepoName, digest: Digest, o?: AbortOptions & { range?: ByteRange }): Promise<BlobResponse | undefined>
  close (): Promise<void>
}
