import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto'

/** The peer data path serves blobs under this prefix, by digest only. */
export const PEER_BLOB_PATH = '/pullmesh/v1/blobs/'

/**
 * Proof of the mesh key on the peer data path, in one request header:
 * `x-pullmesh-auth: 2.<key id>.<ms since epoch>.<nonce>.<HMAC-SHA256>` (hex fields). The HMAC covers the
 * target node's peer id, the time, the nonce, the method, the path with its query string exactly as sent,
 * and the Range header, so a captured header is good for that one request to that one node, once, within
 * AUTH_WINDOW_MS. The key id (a hash of the data-path key) only lets a node tell "different mesh key"
 * apart from a forged or replayed signature in its logs.
 */
export const AUTH_HEADER = 'x-pullmesh-auth'
/** Set on a 401 from the data path: why the signature was refused (an AuthFailure). */
export const AUTH_ERROR_HEADER = 'x-pullmesh-auth-error'
/** How far a signature's time may be from the verifier's clock, either way. */
export const AUTH_WINDOW_MS = 30_000
const VERSION = '2'
const DEFAULT_MAX_NONCES = 100_000

/** What a data-path request signature covers. `url` is the path and query exactly as sent on the wire. */
export interface SignedRequest {
  /** The peer id of the node the request is sent to. */
  target: string
  method: string
  url: string
  /** The Range header sent, if any. */
  range?: string
}

export type AuthFailure = 'missing' | 'malformed' | 'key' | 'signature' | 'expired' | 'replayed' | 'busy'
export type AuthResult = { ok: true } | { ok: false, reason: AuthFailure }

/** The data-path HMAC key, derived from the 32 bytes of the parsed pnet key (see mesh/psk.ts), never the file. */
export function dataPathKey (psk: Uint8Array): Buffer {
  return createHash('sha256').update('pullmesh data path v2\n').update(psk).digest()
}

function keyId (key: Buffer): string {
  return createHash('sha256').update('pullmesh data path key id\n').update(key).digest('hex').slice(0, 16)
}

function mac (key: Buffer, r: SignedRequest, ts: number, nonce: string): Buffer {
  return createHmac('sha256', key)
    .update(`pullmesh-data-v${VERSION}\n${r.target}\n${ts}\n${nonce}\n${r.method.toUpperCase()}\n${r.url}\n${r.range ?? ''}`)
    .digest()
}

/**
 * The AUTH_HEADER value for one request; a fresh nonce each call. `req.url` is taken as a WHATWG URL
 * parser (undici, fetch) will put it on the wire (dot segments resolved, unsafe characters escaped),
 * so `request(dataUrl + url)` sends what was signed. The verifier checks the request line as received.
 */
export function signRequest (key: Buffer, req: SignedRequest, now = Date.now()): string {
  const nonce = randomBytes(16).toString('hex')
  const u = new URL(req.url, 'http://peer.invalid')
  return `${VERSION}.${keyId(key)}.${now}.${nonce}.${mac(key, { ...req, url: u.pathname + u.search }, now, nonce).toString('hex')}`
}

export interface RequestVerifier {
  /** Checks AUTH_HEADER for a request received by this node; a valid nonce is used up. */
  verify (req: Omit<SignedRequest, 'target'>, header: string | string[] | undefined, now?: number): AuthResult
  /** Nonces remembered now (bounded by maxNonces). */
  size (): number
}

/**
 * The server side: checks signatures made for `self` (this node's peer id) and keeps every nonce seen
 * within the window, so that a signature is accepted once. The cache is bounded: when it is full of
 * live nonces, requests are refused ('busy') rather than remembered less (only valid signatures,
 * i.e. key holders, can fill it).
 */
export function createRequestVerifier (key: Buffer, init: { self: string, windowMs?: number, maxNonces?: number }): RequestVerifier {
  const windowMs = init.windowMs ?? AUTH_WINDOW_MS
  const maxNonces = init.maxNonces ?? DEFAULT_MAX_NONCES
  const kid = keyId(key)
  // nonce → forget-after time. A nonce is acceptable only while |now - ts| <= window, so it can never be
  // accepted again after arrival + 2 × window: every entry gets that expiry, which keeps the Map (in
  // insertion order) sorted by expiry and lets expired entries be dropped from the front.
  const nonces = new Map<string, number>()

  function purge (now: number): void {
    for (const [n, exp] of nonces) {
      if (exp > now) break
      nonces.delete(n)
    }
  }

  return {
    verify (req, header, now = Date.now()) {
      if (header === undefined) return { ok: false, reason: 'missing' }
      if (typeof header !== 'string') return { ok: false, reason: 'malformed' }
      const m = /^2\.([0-9a-f]{16})\.(\d{1,15})\.([0-9a-f]{32})\.([0-9a-f]{64})$/.exec(header)
      if (m === null) return { ok: false, reason: 'malformed' }
      if (m[1] !== kid) return { ok: false, reason: 'key' }
      const ts = Number(m[2])
      const nonce = m[3]!
      if (Math.abs(now - ts) > windowMs) return { ok: false, reason: 'expired' }
      const expected = mac(key, { ...req, target: init.self }, ts, nonce)
      if (!timingSafeEqual(expected, Buffer.from(m[4]!, 'hex'))) return { ok: false, reason: 'signature' }
      purge(now)
      if (nonces.has(nonce)) return { ok: false, reason: 'replayed' }
      if (nonces.size >= maxNonces) return { ok: false, reason: 'busy' }
      nonces.set(nonce, now + 2 * windowMs)
      return { ok: true }
    },
    size: () => nonces.size,
  }
}
