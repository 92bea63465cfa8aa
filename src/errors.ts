// Errors the daemon speaks in. OciError carries a spec code and an HTTP status; the
// one HTTP error handler turns it into the OCI error body. Internal errors are named
// classes with a stable `code`, matched by that code and never by message text.

export type OciErrorCode =
  | 'BLOB_UNKNOWN' | 'BLOB_UPLOAD_INVALID' | 'BLOB_UPLOAD_UNKNOWN' | 'DIGEST_INVALID'
  | 'MANIFEST_BLOB_UNKNOWN' | 'MANIFEST_INVALID' | 'MANIFEST_UNKNOWN' | 'NAME_INVALID'
  | 'NAME_UNKNOWN' | 'SIZE_INVALID' | 'UNAUTHORIZED' | 'DENIED' | 'UNSUPPORTED'
  | 'TOOMANYREQUESTS' | 'RANGE_INVALID' | 'UNAVAILABLE'

export class OciError extends Error {
  override readonly name = 'OciError'
  readonly headers: Record<string, string>
  constructor (
    readonly code: OciErrorCode,
    readonly status: number,
    message: string,
    readonly detail?: unknown,
    headers: Record<string, string> = {},
  ) {
    super(message)
    this.headers = headers
  }

  toBody (): { errors: Array<{ code: string, message: string, detail?: unknown }> } {
    return { errors: [{ code: this.code, message: this.message, ...(this.detail !== undefined ? { detail: this.detail } : {}) }] }
  }
}

export const nameInvalid = (detail?: unknown): OciError => new OciError('NAME_INVALID', 400, 'invalid repository name', detail)
export const digestInvalid = (detail?: unknown): OciError => new OciError('DIGEST_INVALID', 400, 'invalid digest', detail)
export const manifestUnknown = (detail?: unknown): OciError => new OciError('MANIFEST_UNKNOWN', 404, 'manifest unknown', detail)
export const blobUnknown = (detail?: unknown): OciError => new OciError('BLOB_UNKNOWN', 404, 'blob unknown to registry', detail)
export const unsupported = (detail?: unknown): OciError => new OciError('UNSUPPORTED', 405, 'the operation is unsupported: pullmesh is a read-only mirror', detail)
export const nameUnknown = (detail?: unknown): OciError => new OciError('NAME_UNKNOWN', 404, 'repository name not known to registry', detail)

/** Base for errors raised while talking to an upstream registry. */
export class UpstreamError extends Error {
  override name = 'UpstreamError'
  constructor (readonly code: string, message: string, readonly upstream: string, options?: { cause?: unknown }) {
    super(message, options)
  }
}

/** The upstream could not be reached, timed out, or answered 5xx. Stale content may be served. */
export class UpstreamUnavailableError extends UpstreamError {
  override name = 'UpstreamUnavailableError'
  constructor (upstream: string, message: string, readonly status?: number, options?: { cause?: unknown }) {
    super('PM_UPSTREAM_UNAVAILABLE', message, upstream, options)
  }
}

/** The upstream answered 429. `retryAfter` is passed on to the client. */
export class UpstreamRateLimitedError extends UpstreamError {
  override name = 'UpstreamRateLimitedError'
  constructor (upstream: string, readonly retryAfter?: string) {
    super('PM_UPSTREAM_RATE_LIMITED', 'upstream rate limit reached', upstream)
  }
}

/** The upstream refused us (401/403 after the token flow). */
export class UpstreamDeniedError extends UpstreamError {
  override name = 'UpstreamDeniedError'
  constructor (upstream: string, readonly status: number, message = 'upstream denied access') {
    super('PM_UPSTREAM_DENIED', message, upstream)
  }
}

/** The upstream sent something that breaks the protocol (bad digest, oversize manifest, short body). */
export class UpstreamProtocolError extends UpstreamError {
  override name = 'UpstreamProtocolError'
  constructor (upstream: string, message: string, options?: { cause?: unknown }) {
    super('PM_UPSTREAM_PROTOCOL', message, upstream, options)
  }
}

/** Bytes did not hash to the digest they were fetched under, or their size was wrong. */
export class VerificationError extends Error {
  override readonly name = 'VerificationError'
  readonly code = 'PM_VERIFICATION_FAILED'
  constructor (message: string, readonly expected: string, readonly actual?: string) {
    super(message)
  }
}

/** Configuration that failed validation; `problems` lists every problem found at once. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError'
  readonly code = 'PM_CONFIG_INVALID'
  constructor (readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map(p => `  - ${p}`).join('\n')}`)
  }
}

/** No source has the content. Internal: the HTTP layer turns it into BLOB_UNKNOWN or MANIFEST_UNKNOWN. */
export class NotFoundError extends Error {
  override readonly name = 'NotFoundError'
  readonly code = 'PM_NOT_FOUND'
}
