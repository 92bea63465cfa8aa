// The one place where undici and socket errors become ours. Nothing of undici's is thrown past
// src/upstream/: every catch and every body 'error' listener in the client goes through here.
import { UpstreamError, UpstreamProtocolError, UpstreamUnavailableError } from '../errors.js'

const TIMEOUTS: Record<string, string> = {
  UND_ERR_CONNECT_TIMEOUT: 'connect timeout',
  UND_ERR_HEADERS_TIMEOUT: 'timed out waiting for response headers',
  UND_ERR_BODY_TIMEOUT: 'response body stalled (idle timeout)',
  ETIMEDOUT: 'connection timed out',
}

/** Codes meaning the other side or the network broke the exchange: transient, worth a retry. */
const NETWORK = new Set([
  'UND_ERR_SOCKET', 'UND_ERR_CLOSED', 'UND_ERR_DESTROYED', 'UND_ERR_ABORTED', 'UND_ERR_REQ_RETRY',
  'ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH',
  'ENETUNREACH', 'ENETDOWN', 'EHOSTDOWN', 'EADDRNOTAVAIL', 'ERR_STREAM_PREMATURE_CLOSE',
])

/** Codes meaning the upstream's answer broke HTTP or the registry protocol. */
const PROTOCOL = new Set([
  'UND_ERR_RES_CONTENT_LENGTH_MISMATCH', 'UND_ERR_RES_EXCEEDED_MAX_SIZE', 'UND_ERR_INVALID_ARG',
  'UND_ERR_NOT_SUPPORTED', 'UND_ERR_INFO', 'UND_ERR_PRX_TLS', 'UND_ERR_MAX_REDIRECTS',
])

function codeOf (err: unknown): string | undefined {
  if (typeof err !== 'object' || err === null) return undefined
  const c = (err as { code?: unknown }).code
  return typeof c === 'string' ? c : undefined
}

function messageOf (err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}

/**
 * Maps anything thrown while talking to `upstream` to one of our errors. When the caller's own
 * signal aborted, its reason is returned unchanged: cancellation is not an upstream failure.
 */
export function toUpstreamError (err: unknown, upstream: string, signal?: AbortSignal): Error {
  if (signal?.aborted === true) {
    const r: unknown = signal.reason
    return r instanceof Error ? r : new DOMException('This operation was aborted', 'AbortError')
  }
  if (err instanceof UpstreamError) return err
  const code = codeOf(err)
  if (code !== undefined) {
    const timeout = TIMEOUTS[code]
    if (timeout !== undefined) return new UpstreamUnavailableError(upstream, `upstream ${timeout}`, undefined, { cause: err })
    if (NETWORK.has(code)) return new UpstreamUnavailableError(upstream, `upstream connection failed: ${code}: ${messageOf(err)}`, undefined, { cause: err })
    if (PROTOCOL.has(code) || code.startsWith('HPE_')) return new UpstreamProtocolError(upstream, `upstream broke HTTP: ${code}: ${messageOf(err)}`, { cause: err })
  }
  if (err instanceof Error && err.name === 'AbortError') {
    return new UpstreamUnavailableError(upstream, 'upstream request aborted', undefined, { cause: err })
  }
  // Unknown failures (TLS errors, errors without a code) are treated as the upstream being unreachable.
  return new UpstreamUnavailableError(upstream, `upstream request failed: ${code ?? (err instanceof Error ? err.name : 'error')}: ${messageOf(err)}`, undefined, { cause: err })
}

/** True for failures worth another attempt of an idempotent request. */
export function isRetryable (err: unknown): boolean {
  return err instanceof UpstreamUnavailableError
}
