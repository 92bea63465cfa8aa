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
  /**
   * Overall deadline of one exchange until its answer is in hand (all attempts, token and redirects
   * included). A cold miss fails within about this long, so that a client can fall back.
   */
  deadlineMs?: number
  /** After the upstream could not be reached, requests to it fail at once for this long (default 0: never). */
  breakerHoldMs?: number
  /** How to reach the upstream: directly (default), through one proxy, or by HTTP(S)_PROXY/NO_PROXY rules. */
  proxy?: UpstreamProxy
}

export type UpstreamProxy =
  | { kind: 'url', url: string }
  | { kind: 'env', httpProxy?: string, httpsProxy?: string, noProxy?: string }

/** A listing answer (referrers or tags), passed on as JSON. */
export interface ListingResponse {
  body: Buffer
  mediaType: string | undefined
  /** The `Link` header (the next page), when there is one. */
  link: string | undefined
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
  /** `HEAD /v2/<repo>/blobs/<digest>`: the size the upstream claims (unverified), or undefined (404). */
  headBlob (repo: RepoName, digest: Digest, o?: AbortOptions): Promise<{ size: number } | undefined>
  /**
   * `GET /v2/<repo>/referrers/<digest>` (OCI 1.1). Undefined when the upstream has no referrers API
   * (404, 400 or 405, as registries before OCI 1.1 answer). `page` is a `Link` target of a previous answer.
   */
  getReferrers (repo: RepoName, digest: Digest, o?: AbortOptions & { page?: string }): Promise<ListingResponse | undefined>
  /** `GET /v2/<repo>/tags/list?n=&last=`. Undefined when the repository is unknown (404). */
  listTags (repo: RepoName, o?: AbortOptions & { n?: number, last?: string }): Promise<ListingResponse | undefined>
  /** False while the circuit breaker fails requests fast (the upstream was unreachable moments ago). */
  available (): boolean
  close (): Promise<void>
}
