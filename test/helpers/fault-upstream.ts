/**
 * A small, controllable OCI upstream for tests (node:http on 127.0.0.1).
 *
 * Serves GET and HEAD for `/v2/`, `/v2/<name>/manifests/<tag|digest>` and `/v2/<name>/blobs/<digest>`
 * (single `Range: bytes=` ranges → 206), with Content-Type, Content-Length and Docker-Content-Digest,
 * plus a token endpoint at `/token` used by the `auth` fault. One fault at a time can be injected
 * with `setFault`, optionally limited to a path, a method and a number of requests.
 *
 * ```ts
 * const up = await startFaultUpstream()
 * const digest = up.addBlob('library/test', randomBytes(1024))
 * up.setFault({ kind: 'status', status: 500 }, { path: /\/blobs\//, times: 2 })  // two 500s, then normal
 * // ... up.requests lists every request received (including /token)
 * await up.close()
 * ```
 */
import { createHash, randomBytes } from 'node:crypto'
import { createServer, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http'
import { listen, trackSockets } from './net.js'

export type Fault =
  /** Flip one byte in the middle of the body; same length, same headers (so the digest is wrong). */
  | { kind: 'corrupt' }
  /** Send the first half of the body (with the full Content-Length), then end the socket. */
  | { kind: 'truncate' }
  /** Send `afterBytes` (default: half) of the body, then reset the connection (TCP RST). */
  | { kind: 'reset', afterBytes?: number }
  /** Send the body in `chunkBytes` pieces, `delayMs` apart. */
  | { kind: 'slow', chunkBytes: number, delayMs: number }
  /** Answer `status` with an OCI error body, and `Retry-After` when given. */
  | { kind: 'status', status: number, retryAfter?: string }
  /** Accept the request and never answer (the socket is destroyed by close()). */
  | { kind: 'hang' }
  /**
   * Require `Authorization: Bearer <token>` from this server's `/token` endpoint; requests without
   * one get a 401 Bearer challenge. With username/password, `/token` requires those basic credentials.
   */
  | { kind: 'auth', username?: string, password?: string, expiresIn?: number }
  /** Redirect (default 307) to `to` + the original path and query, e.g. another FaultUpstream's url. */
  | { kind: 'redirect', to: string, status?: number }

export interface FaultMatch {
  /** Applies only when the request path (without query) matches. */
  path?: RegExp
  /** Applies only to this method (GET, HEAD, ...). */
  method?: string
  /** Applies to this many matching requests, then the fault clears itself. Default: until replaced. */
  times?: number
}

export interface RecordedRequest { method: string, path: string, url: string, headers: IncomingHttpHeaders }

export interface FaultUpstreamOptions {
  /** Require bearer auth on every `/v2/` request, independent of (and combinable with) setFault. */
  auth?: { username?: string, password?: string, expiresIn?: number }
  /** `service` named in challenges; default `fault-upstream`. */
  service?: string
}

export interface FaultUpstream {
  /** `http://127.0.0.1:PORT` */
  url: string
  /** `127.0.0.1:PORT` */
  host: string
  port: number
  /** Stores a blob in `repo`; returns its sha256 digest. */
  addBlob: (repo: string, data: Buffer) => string
  /**
   * Stores a manifest in `repo`, served by digest and, when `tag` is given, by tag. An object is
   * serialized with JSON.stringify. Returns the digest of the exact bytes served.
   */
  addManifest: (repo: string, tag: string | undefined, body: Buffer | object, mediaType: string) => string
  /** Injects a fault (replacing any previous one); `undefined` clears it. */
  setFault: (fault: Fault | undefined, match?: FaultMatch) => void
  /** Every request received, in order (clear with `requests.length = 0`). */
  requests: RecordedRequest[]
  /** Number of tokens issued by `/token`. */
  readonly tokensIssued: number
  /** Stops listening and destroys every socket, including hung ones. Safe to call twice. */
  close: () => Promise<void>
}

const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`

interface Active { fault: Fault, match: FaultMatch, remaining: number }

export async function startFaultUpstream (opts: FaultUpstreamOptions = {}): Promise<FaultUpstream> {
  const service = opts.service ?? 'fault-upstream'
  const blobs = new Map<string, Map<string, Buffer>>()
  const manifests = new Map<string, { tags: Map<string, string>, byDigest: Map<string, { body: Buffer, mediaType: string }> }>()
  const tokens = new Map<string, { scopes: Set<string>, expiresAt: number }>()
  const requests: RecordedRequest[] = []
  let active: Active | undefined
  let tokensIssued = 0
  let closed = false
  let base = ''

  const server = createServer((req, res) => { handle(req, res) })
  const { closeServer } = trackSockets(server)
  const port = await listen(server, '127.0.0.1', 0)
  base = `http://127.0.0.1:${port}`

  function takeFault (method: string, path: string): Fault | undefined {
    const a = active
    if (a === undefined || path === '/token') return undefined
    if (a.match.path !== undefined && !a.match.path.test(path)) return undefined
    if (a.match.method !== undefined && a.match.method.toUpperCase() !== method) return undefined
    if (--a.remaining <= 0) active = undefined
    return a.fault
  }

  function ociError (res: ServerResponse, status: number, code: string, message: string, headers: Record<string, string> = {}): void {
    const body = Buffer.from(JSON.stringify({ errors: [{ code, message }] }))
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': body.length, 'docker-distribution-api-version': 'registry/2.0', ...headers })
    res.end(body)
  }

  function issueToken (req: IncomingMessage, res: ServerResponse, url: URL, auth: { username?: string, password?: string, expiresIn?: number } | undefined): void {
    if (auth?.username !== undefined) {
      const h = req.headers.authorization ?? ''
      const m = /^Basic\s+(.+)$/i.exec(h)
      const [user, ...rest] = m === null ? [] : Buffer.from(m[1]!, 'base64').toString('utf8').split(':')
      if (user !== auth.username || rest.join(':') !== (auth.password ?? '')) {
        ociError(res, 401, 'UNAUTHORIZED', 'bad credentials', { 'www-authenticate': `Basic realm="${service}"` })
        return
      }
    }
    const token = randomBytes(16).toString('hex')
    const expiresIn = auth?.expiresIn ?? 300
    tokens.set(token, { scopes: new Set(url.searchParams.getAll('scope')), expiresAt: Date.now() + expiresIn * 1000 })
    tokensIssued++
    const body = Buffer.from(JSON.stringify({ token, access_token: token, expires_in: expiresIn, issued_at: new Date().toISOString() }))
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length })
    res.end(body)
  }

  /** True when the request carries a valid token for `repo` (any valid token for `/v2/`). */
  function authorized (req: IncomingMessage, repo: string | undefined): boolean {
    const m = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '')
    const t = m === null ? undefined : tokens.get(m[1]!)
    if (t === undefined || Date.now() >= t.expiresAt) return false
    if (repo === undefined) return true
    return [...t.scopes].some(s => {
      const [type, ...rest] = s.split(':')
      const actions = rest.pop() ?? ''
      return type === 'repository' && rest.join(':') === repo && actions.split(',').includes('pull')
    })
  }

  function challenge (res: ServerResponse, repo: string | undefined): void {
    const scope = repo === undefined ? '' : `,scope="repository:${repo}:pull"`
    ociError(res, 401, 'UNAUTHORIZED', 'authentication required', { 'www-authenticate': `Bearer realm="${base}/token",service="${service}"${scope}` })
  }

  function handle (req: IncomingMessage, res: ServerResponse): void {
    const method = (req.method ?? 'GET').toUpperCase()
    const url = new URL(req.url ?? '/', base)
    const path = url.pathname
    requests.push({ method, path, url: req.url ?? '/', headers: { ...req.headers } })
    req.resume()
    const fault = takeFault(method, path)
    const authFault = fault?.kind === 'auth' ? fault : undefined

    if (path === '/token' && method === 'GET') {
      issueToken(req, res, url, opts.auth ?? (active?.fault.kind === 'auth' ? active.fault : undefined))
      return
    }
    if (fault?.kind === 'hang') return
    if (fault?.kind === 'status') {
      ociError(res, fault.status, fault.status === 429 ? 'TOOMANYREQUESTS' : 'UNAVAILABLE', 'injected fault', fault.retryAfter !== undefined ? { 'retry-after': fault.retryAfter } : {})
      return
    }
    if (fault?.kind === 'redirect') {
      res.writeHead(fault.status ?? 307, { location: `${fault.to.replace(/\/+$/, '')}${req.url ?? '/'}`, 'content-length': 0 })
      res.end()
      return
    }

    const route = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(path)
    const repo = route?.[1]
    if (opts.auth !== undefined || authFault !== undefined) {
      if (!authorized(req, repo)) { challenge(res, repo); return }
    }
    if (method !== 'GET' && method !== 'HEAD') { ociError(res, 405, 'UNSUPPORTED', 'read-only'); return }
    if (path === '/v2/' || path === '/v2') {
      send(req, res, 200, { 'content-type': 'application/json' }, Buffer.from('{}'), undefined)
      return
    }
    if (route === null || repo === undefined) { ociError(res, 404, 'NAME_UNKNOWN', 'unknown path'); return }
    const ref = route[3]!
    if (route[2] === 'manifests') {
      const m = manifests.get(repo)
      const digest = ref.includes(':') ? ref : m?.tags.get(ref)
      const entry = digest === undefined ? undefined : m?.byDigest.get(digest)
      if (entry === undefined || digest === undefined) { ociError(res, 404, 'MANIFEST_UNKNOWN', 'manifest unknown'); return }
      send(req, res, 200, { 'content-type': entry.mediaType, 'docker-content-digest': digest }, entry.body, fault)
      return
    }
    const blob = blobs.get(repo)?.get(ref)
    if (blob === undefined) { ociError(res, 404, 'BLOB_UNKNOWN', 'blob unknown'); return }
    const headers: Record<string, string> = { 'content-type': 'application/octet-stream', 'docker-content-digest': ref, 'accept-ranges': 'bytes' }
    const range = req.headers.range
    if (range !== undefined) {
      const r = parseRange(range, blob.length)
      if (r === undefined) { ociError(res, 416, 'RANGE_INVALID', 'range not satisfiable', { 'content-range': `bytes */${blob.length}` }); return }
      send(req, res, 206, { ...headers, 'content-range': `bytes ${r.start}-${r.end}/${blob.length}` }, blob.subarray(r.start, r.end + 1), fault)
      return
    }
    send(req, res, 200, headers, blob, fault)
  }

  function send (req: IncomingMessage, res: ServerResponse, status: number, headers: Record<string, string>, body: Buffer, fault: Fault | undefined): void {
    res.writeHead(status, { ...headers, 'content-length': body.length, 'docker-distribution-api-version': 'registry/2.0' })
    if (req.method === 'HEAD') { res.end(); return }
    switch (fault?.kind) {
      case 'corrupt': {
        const copy = Buffer.from(body)
        const mid = copy.length >> 1
        if (copy.length > 0) copy[mid] = copy[mid]! ^ 0xff
        res.end(copy)
        return
      }
      case 'truncate':
        res.write(body.subarray(0, body.length >> 1), () => { res.socket?.end() })
        return
      case 'reset': {
        const n = Math.min(fault.afterBytes ?? body.length >> 1, body.length)
        const cut = (): void => { res.socket?.resetAndDestroy() }
        if (n === 0) { res.flushHeaders(); setImmediate(cut); return }
        res.write(body.subarray(0, n), cut)
        return
      }
      case 'slow':
        void dribble(res, body, Math.max(1, fault.chunkBytes), fault.delayMs)
        return
      default:
        res.end(body)
    }
  }

  async function dribble (res: ServerResponse, body: Buffer, chunk: number, delayMs: number): Promise<void> {
    // One 'close' listener for the whole dribble: a waiter per chunk would pile up listeners.
    let wake: (() => void) | undefined
    const onClose = (): void => { wake?.() }
    res.once('close', onClose)
    const wait = async (arm: (done: () => void) => () => void): Promise<void> => {
      await new Promise<void>(resolve => {
        if (closed || res.destroyed) { resolve(); return }
        const disarm = arm(() => { wake = undefined; disarm(); resolve() })
        wake = () => { wake = undefined; disarm(); resolve() }
      })
    }
    try {
      for (let off = 0; off < body.length; off += chunk) {
        if (closed || res.destroyed) return
        const ok = res.write(body.subarray(off, off + chunk))
        if (!ok) await wait(done => { res.once('drain', done); return () => res.off('drain', done) })
        if (off + chunk < body.length) await wait(done => { const t = setTimeout(done, delayMs); return () => clearTimeout(t) })
      }
      if (!closed && !res.destroyed) res.end()
    } finally {
      res.off('close', onClose)
    }
  }

  return {
    url: base,
    host: `127.0.0.1:${port}`,
    port,
    requests,
    get tokensIssued () { return tokensIssued },
    addBlob (repo, data) {
      const digest = sha256(data)
      let m = blobs.get(repo)
      if (m === undefined) blobs.set(repo, m = new Map())
      m.set(digest, Buffer.from(data))
      return digest
    },
    addManifest (repo, tag, body, mediaType) {
      const bytes = Buffer.isBuffer(body) ? Buffer.from(body) : Buffer.from(JSON.stringify(body))
      const digest = sha256(bytes)
      let m = manifests.get(repo)
      if (m === undefined) manifests.set(repo, m = { tags: new Map(), byDigest: new Map() })
      m.byDigest.set(digest, { body: bytes, mediaType })
      if (tag !== undefined) m.tags.set(tag, digest)
      return digest
    },
    setFault (fault, match = {}) {
      active = fault === undefined ? undefined : { fault, match, remaining: match.times ?? Infinity }
    },
    async close () {
      closed = true
      await closeServer()
    },
  }
}

function parseRange (h: string, size: number): { start: number, end: number } | undefined {
  const m = /^bytes=(\d*)-(\d*)$/.exec(h.trim())
  if (m === null || (m[1] === '' && m[2] === '')) return undefined
  let start: number
  let end: number
  if (m[1] === '') {
    start = Math.max(0, size - Number(m[2]))
    end = size - 1
  } else {
    start = Number(m[1])
    end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1)
  }
  if (start >= size || end < start) return undefined
  return { start, end }
}
