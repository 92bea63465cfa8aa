// The client for one upstream registry: undici Agent, token auth, bounded retries, and the mapping
// of HTTP statuses and network failures to our errors (see ./map-error.ts).
import { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { Agent, EnvHttpProxyAgent, ProxyAgent, interceptors, type Dispatcher } from 'undici'
import { UpstreamDeniedError, UpstreamProtocolError, UpstreamRateLimitedError, UpstreamUnavailableError } from '../errors.js'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import { tryParseDigest, type Digest } from '../oci/digest.js'
import { MAX_MANIFEST_BYTES, MediaType, UPSTREAM_MANIFEST_ACCEPT, sniffManifestMediaType } from '../oci/media-types.js'
import type { ByteRange } from '../oci/range.js'
import type { RepoName } from '../oci/reference.js'
import { TokenCache, basicAuthorization, parseTokenResponse, parseWwwAuthenticate, pullScope } from './auth.js'
import { CircuitBreaker } from './breaker.js'
import { isRetryable, toUpstreamError } from './map-error.js'
import type { AbortOptions, BlobResponse, ListingResponse, ManifestHead, ManifestResponse, UpstreamClient, UpstreamInit, UpstreamProxy } from './types.js'

export interface UpstreamComponents { logger: Logger, metrics: Metrics }

type Kind = 'manifest' | 'blob' | 'token' | 'listing'
type Response = Dispatcher.ResponseData

interface Exchange {
  kind: Kind
  method: 'GET' | 'HEAD'
  path: string
  repo: RepoName
  headers: Record<string, string>
  /** Follow redirects (blob GETs go to S3/CDN). */
  follow: boolean
  signal?: AbortSignal | undefined
}

const MAX_REDIRECTS = 5
const MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
const MAX_BACKOFF_MS = 10_000
const CLOSE_GRACE_MS = 2_000
const BLOB_CHUNK = 1024 * 1024

export function createUpstreamClient (components: UpstreamComponents, init: UpstreamInit): UpstreamClient {
  const name = init.name
  const { metrics } = components
  const log = components.logger.child({ component: 'upstream', upstream: name })
  const base = new URL(init.url)
  if (base.protocol !== 'http:' && base.protocol !== 'https:') throw new TypeError(`upstream ${name}: url must be http or https`)
  const origin = base.origin
  const prefix = base.pathname.replace(/\/+$/, '')
  const credentials = init.credentials
  const maxAttempts = Math.max(1, Math.floor(init.maxAttempts))

  const agentOptions = {
    connect: { timeout: init.connectTimeoutMs },
    headersTimeout: init.headersTimeoutMs,
    bodyTimeout: init.bodyIdleTimeoutMs,
  }
  const agent: Dispatcher = createDispatcher(agentOptions, init.proxy)
  const breaker = new CircuitBreaker({ upstream: name, holdMs: init.breakerHoldMs ?? 0 })
  const deadlineMs = init.deadlineMs ?? 0
  // Cross-origin hops drop Authorization, Cookie and Proxy-Authorization (undici's RedirectHandler).
  const following = agent.compose(interceptors.redirect({ maxRedirections: MAX_REDIRECTS }))

  const tokens = new TokenCache()
  const tokenFetches = new Map<string, Promise<string>>()
  /** The last Bearer challenge: lets a new scope fetch its token before the first request. */
  let bearer: { realm: string, service: string | undefined } | undefined
  /** The upstream asked for Basic credentials once: send them up front from then on. */
  let basic = false
  let closing: Promise<void> | undefined

  const err = (e: unknown, signal?: AbortSignal): Error => toUpstreamError(e, name, signal)

  async function discard (res: Response): Promise<void> {
    try { await res.body.dump() } catch { /* the connection is gone either way */ }
  }

  /** One HTTP request; no retries, no auth logic. Never throws undici errors. */
  async function send (dispatcher: Dispatcher, url: { origin: string, path: string }, ex: { kind: Kind, method: 'GET' | 'HEAD', repo: string, headers: Record<string, string>, signal?: AbortSignal | undefined }): Promise<Response> {
    if (closing !== undefined) throw new UpstreamUnavailableError(name, 'upstream client is closed')
    const t0 = performance.now()
    try {
      const res = await dispatcher.request({
        origin: url.origin, path: url.path, method: ex.method, headers: ex.headers, signal: ex.signal ?? null,
      })
      const ms = Math.round(performance.now() - t0)
      metrics.upstreamRequests.inc({ upstream: name, kind: ex.kind, status: String(res.statusCode) })
      log.debug({ repo: ex.repo, kind: ex.kind, method: ex.method, status: res.statusCode, ms }, 'upstream response')
      return res
    } catch (e) {
      const mapped = err(e, ex.signal)
      const code = (mapped as { code?: unknown }).code
      metrics.upstreamRequests.inc({ upstream: name, kind: ex.kind, status: typeof code === 'string' ? code : 'aborted' })
      throw mapped
    }
  }

  async function readBounded (res: Response, limit: number, what: string, signal?: AbortSignal): Promise<Buffer> {
    const declared = contentLength(res.headers)
    if (declared !== undefined && declared > limit) {
      res.body.destroy()
      throw new UpstreamProtocolError(name, `${what} too large: Content-Length ${declared} > ${limit}`)
    }
    const chunks: Buffer[] = []
    let n = 0
    try {
      for await (const chunk of res.body as AsyncIterable<Buffer>) {
        n += chunk.length
        if (n > limit) throw new UpstreamProtocolError(name, `${what} too large: more than ${limit} bytes`)
        chunks.push(chunk)
      }
    } catch (e) {
      res.body.destroy()
      throw err(e, signal)
    }
    return Buffer.concat(chunks, n)
  }

  function tokenFor (scope: string, signal?: AbortSignal): Promise<string> {
    let p = tokenFetches.get(scope)
    if (p === undefined) {
      const b = bearer
      if (b === undefined) return Promise.reject(new UpstreamProtocolError(name, 'no bearer challenge known'))
      // Shared by concurrent callers: not tied to one caller's signal, bounded by the agent's timeouts.
      p = fetchToken(b.realm, b.service, scope).finally(() => tokenFetches.delete(scope))
      tokenFetches.set(scope, p)
    }
    return raceAbort(p, signal)
  }

  async function fetchToken (realm: string, service: string | undefined, scope: string): Promise<string> {
    let url: URL
    try { url = new URL(realm) } catch { throw new UpstreamProtocolError(name, 'bearer challenge has an invalid realm') }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new UpstreamProtocolError(name, 'bearer realm must be http or https')
    // Credentials for an https upstream never travel in clear text.
    if (url.protocol === 'http:' && new URL(origin).protocol === 'https:') throw new UpstreamProtocolError(name, 'bearer realm of an https upstream must be https')
    if (service !== undefined) url.searchParams.set('service', service)
    url.searchParams.set('scope', scope)
    const headers: Record<string, string> = { accept: 'application/json' }
    if (credentials !== undefined) headers.authorization = basicAuthorization(credentials)
    // Shared by every fill of this scope: bounded as a whole, so a trickling token endpoint cannot hold them.
    const signal = AbortSignal.timeout(init.headersTimeoutMs + init.bodyIdleTimeoutMs)
    let body: Buffer
    try {
      const res = await send(agent, { origin: url.origin, path: url.pathname + url.search }, { kind: 'token', method: 'GET', repo: scope, headers, signal })
      if (res.statusCode !== 200) {
        await discard(res)
        throw statusError(res, 'token service')
      }
      body = await readBounded(res, MAX_TOKEN_RESPONSE_BYTES, 'token response', signal)
    } catch (e) {
      if (signal.aborted) throw new UpstreamUnavailableError(name, 'the token service did not answer in time')
      throw e
    }
    let doc: unknown
    try { doc = JSON.parse(body.toString('utf8')) } catch { doc = undefined }
    const grant = parseTokenResponse(doc)
    if (grant === undefined) throw new UpstreamProtocolError(name, 'token service answered without a token')
    tokens.set(scope, grant)
    log.debug({ scope, expiresIn: grant.expiresInS }, 'upstream token issued')
    return grant.token
  }

  /** The Authorization to send up front for `scope`, if any is known. */
  async function authorizationFor (scope: string, signal?: AbortSignal): Promise<string | undefined> {
    if (basic && credentials !== undefined) return basicAuthorization(credentials)
    const cached = tokens.get(scope)
    if (cached !== undefined) return `Bearer ${cached}`
    if (bearer !== undefined) return `Bearer ${await tokenFor(scope, signal)}`
    return undefined
  }

  /** Sends the request, answering one 401 challenge (Bearer token or Basic credentials). */
  async function authorized (ex: Exchange): Promise<Response> {
    const scope = pullScope(ex.repo)
    const dispatcher = ex.follow ? following : agent
    const url = { origin, path: ex.path }
    const sent = await authorizationFor(scope, ex.signal)
    const res = await send(dispatcher, url, { ...ex, headers: withAuth(ex.headers, sent) })
    if (res.statusCode !== 401) return res
    // The 401 may come from a redirect target (a CDN): credentials answer only our own origin's challenge.
    const history = (res.context as { history?: URL[] } | undefined)?.history
    const answeredBy = history !== undefined && history.length > 0 ? history[history.length - 1]!.origin : origin
    if (answeredBy !== origin) {
      await discard(res)
      throw new UpstreamDeniedError(name, 401, 'a redirect target asked for credentials; none were sent')
    }
    const challenges = parseWwwAuthenticate(res.headers['www-authenticate'])
    await discard(res)
    let next: string | undefined
    const b = challenges.find(c => c.scheme === 'bearer' && c.params.realm !== undefined && c.params.realm !== '')
    if (b !== undefined) {
      bearer = { realm: b.params.realm!, service: b.params.service }
      tokens.delete(scope)
      next = `Bearer ${await tokenFor(scope, ex.signal)}`
    } else if (challenges.some(c => c.scheme === 'basic') && credentials !== undefined) {
      basic = true
      next = basicAuthorization(credentials)
    }
    if (next === undefined || next === sent) {
      log.info({ repo: ex.repo, kind: ex.kind, status: 401 }, 'upstream denied access')
      throw new UpstreamDeniedError(name, 401, credentials === undefined ? 'upstream requires credentials' : 'upstream rejected the credentials')
    }
    return await send(dispatcher, url, { ...ex, headers: withAuth(ex.headers, next) })
  }

  /**
   * Runs an idempotent exchange with bounded retries. `handle` turns a non-5xx response into the
   * result and must consume, dump or hand over its body. Failures inside `handle` (a manifest body
   * that breaks mid-read) are retried too, which is safe because nothing reached the caller yet.
   */
  async function run<T> (ex: Exchange, handle: (res: Response) => Promise<T>): Promise<T> {
    // Fail fast: an upstream that could not be reached moments ago is not waited on again.
    const permit = breaker.acquire()
    // One deadline for the whole exchange (token, redirects, retries) until the answer is in hand:
    // a client never waits longer than this for response headers on a miss.
    const deadline = new AbortController()
    const timer = deadlineMs > 0
      ? setTimeout(() => { deadline.abort(new UpstreamUnavailableError(name, `no answer from the upstream within ${deadlineMs} ms`)) }, deadlineMs)
      : undefined
    const signal = ex.signal !== undefined ? AbortSignal.any([ex.signal, deadline.signal]) : deadline.signal
    const answered = { value: false }
    try {
      const out = await attempts({ ...ex, signal }, handle, answered)
      permit.reachable()
      return out
    } catch (e) {
      if (answered.value) permit.reachable()
      else if (e instanceof UpstreamUnavailableError && ex.signal?.aborted !== true && e.status === undefined) permit.unreachable(e.message)
      else permit.release()
      throw e
    } finally {
      clearTimeout(timer)
    }
  }

  async function attempts<T> (ex: Exchange, handle: (res: Response) => Promise<T>, answered: { value: boolean }): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      const t0 = performance.now()
      try {
        const res = await authorized(ex)
        answered.value = true
        if (res.statusCode >= 500) {
          await discard(res)
          throw new UpstreamUnavailableError(name, `upstream answered ${res.statusCode}`, res.statusCode)
        }
        return await handle(res)
      } catch (e) {
        const mapped = err(e, ex.signal)
        const ms = Math.round(performance.now() - t0)
        if (isRetryable(mapped) && attempt < maxAttempts && ex.signal?.aborted !== true && closing === undefined) {
          const delay = backoff(init.retryBaseMs, attempt)
          log.warn({ repo: ex.repo, kind: ex.kind, attempt, ms, delayMs: delay, reason: mapped.message }, 'upstream request failed, retrying')
          try { await sleep(delay, undefined, ex.signal !== undefined ? { signal: ex.signal } : {}) } catch (s) { throw err(s, ex.signal) }
          continue
        }
        const code = (mapped as { code?: unknown }).code
        if (typeof code === 'string') {
          metrics.upstreamErrors.inc({ upstream: name, code })
          const level = mapped instanceof UpstreamUnavailableError ? 'warn' : 'info'
          log[level]({ repo: ex.repo, kind: ex.kind, attempt, ms, code, reason: mapped.message }, 'upstream request failed')
        }
        throw mapped
      }
    }
  }

  function statusError (res: Response, what: string): Error {
    const s = res.statusCode
    if (s === 401 || s === 403) return new UpstreamDeniedError(name, s, `${what} denied access (${s})`)
    if (s === 429) return new UpstreamRateLimitedError(name, header(res.headers, 'retry-after'))
    if (s >= 500) return new UpstreamUnavailableError(name, `${what} answered ${s}`, s)
    return new UpstreamProtocolError(name, `${what} answered unexpected status ${s}`)
  }

  /** Dumps the body of an unwanted response and throws the matching error. */
  async function fail (res: Response): Promise<never> {
    await discard(res)
    throw statusError(res, 'upstream')
  }

  async function listing (res: Response, what: string, signal?: AbortSignal): Promise<ListingResponse> {
    const body = await readBounded(res, MAX_MANIFEST_BYTES, what, signal)
    return { body, mediaType: mediaTypeOf(res.headers), link: header(res.headers, 'link') }
  }

  /** The path of a `Link` target of ours, checked to stay on `expected` (same origin, same path). */
  function samePath (link: string, expected: string): string {
    let u: URL
    try { u = new URL(link, origin) } catch { throw new UpstreamProtocolError(name, 'invalid Link target') }
    if (u.origin !== origin || u.pathname !== expected) throw new UpstreamProtocolError(name, 'Link target leaves the listing')
    return u.pathname + u.search
  }

  function manifestPath (repo: RepoName, reference: string): string {
    return `${prefix}/v2/${repo}/manifests/${encodeURIComponent(reference).replace(/%3A/gi, ':')}`
  }

  function blobBody (src: Readable, expected: number, signal?: AbortSignal): Readable {
    return new UpstreamBody(src, expected, {
      onBytes: n => metrics.upstreamBytes.inc({ upstream: name }, n),
      mapError: e => err(e, signal),
      short: got => new UpstreamProtocolError(name, `upstream blob body ended after ${got} of ${expected} bytes`),
      closedEarly: () => new UpstreamUnavailableError(name, 'upstream blob body closed early'),
    })
  }

  return {
    name,
    authenticated: credentials !== undefined,

    async getManifest (repo: RepoName, reference: string, o?: AbortOptions): Promise<ManifestResponse | undefined> {
      const ex: Exchange = { kind: 'manifest', method: 'GET', path: manifestPath(repo, reference), repo, headers: { accept: UPSTREAM_MANIFEST_ACCEPT }, follow: false, signal: o?.signal }
      return await run(ex, async res => {
        if (res.statusCode === 404) { await discard(res); return undefined }
        if (res.statusCode !== 200) return await fail(res)
        const body = await readBounded(res, MAX_MANIFEST_BYTES, 'manifest', o?.signal)
        const mediaType = mediaTypeOf(res.headers) ?? sniffManifestMediaType(body) ?? MediaType.octetStream
        return { body, mediaType, ...optionalDigest(res.headers) }
      })
    },

    async headManifest (repo: RepoName, reference: string, o?: AbortOptions): Promise<ManifestHead | undefined> {
      const ex: Exchange = { kind: 'manifest', method: 'HEAD', path: manifestPath(repo, reference), repo, headers: { accept: UPSTREAM_MANIFEST_ACCEPT }, follow: false, signal: o?.signal }
      return await run(ex, async res => {
        await discard(res)
        if (res.statusCode === 404) return undefined
        if (res.statusCode !== 200) throw statusError(res, 'upstream')
        const size = contentLength(res.headers)
        if (size !== undefined && size > MAX_MANIFEST_BYTES) throw new UpstreamProtocolError(name, `manifest too large: Content-Length ${size} > ${MAX_MANIFEST_BYTES}`)
        return { mediaType: mediaTypeOf(res.headers) ?? MediaType.octetStream, ...optionalDigest(res.headers), ...(size !== undefined ? { size } : {}) }
      })
    },

    async getBlob (repo: RepoName, digest: Digest, o?: AbortOptions & { range?: ByteRange }): Promise<BlobResponse | undefined> {
      const range = o?.range
      const headers: Record<string, string> = { accept: '*/*' }
      if (range !== undefined) headers.range = `bytes=${range.start}-${range.end}`
      const ex: Exchange = { kind: 'blob', method: 'GET', path: `${prefix}/v2/${repo}/blobs/${digest}`, repo, headers, follow: true, signal: o?.signal }
      return await run(ex, async res => {
        if (res.statusCode === 404) { await discard(res); return undefined }
        const length = contentLength(res.headers)
        if (res.statusCode === 200) {
          if (length === undefined) {
            await discard(res)
            throw new UpstreamProtocolError(name, 'blob response without a valid Content-Length')
          }
          return { body: blobBody(res.body, length, o?.signal), size: length, partial: false }
        }
        if (res.statusCode === 206 && range !== undefined) {
          const cr = parseContentRange(header(res.headers, 'content-range'))
          const want = range.end - range.start + 1
          if (cr === undefined || cr.start !== range.start || cr.end !== range.end || (length !== undefined && length !== want)) {
            await discard(res)
            throw new UpstreamProtocolError(name, `206 with a Content-Range that does not match bytes=${range.start}-${range.end}`)
          }
          return { body: blobBody(res.body, want, o?.signal), size: cr.size, partial: true }
        }
        return await fail(res)
      })
    },

    async headBlob (repo: RepoName, digest: Digest, o?: AbortOptions): Promise<{ size: number } | undefined> {
      const ex: Exchange = { kind: 'blob', method: 'HEAD', path: `${prefix}/v2/${repo}/blobs/${digest}`, repo, headers: { accept: '*/*' }, follow: true, signal: o?.signal }
      return await run(ex, async res => {
        await discard(res)
        if (res.statusCode === 404) return undefined
        if (res.statusCode !== 200) throw statusError(res, 'upstream')
        const size = contentLength(res.headers)
        if (size === undefined) throw new UpstreamProtocolError(name, 'blob HEAD without a valid Content-Length')
        return { size }
      })
    },

    async getReferrers (repo: RepoName, digest: Digest, o?: AbortOptions & { page?: string }): Promise<ListingResponse | undefined> {
      const first = `${prefix}/v2/${repo}/referrers/${digest}`
      const path = o?.page !== undefined ? samePath(o.page, first) : first
      const ex: Exchange = { kind: 'listing', method: 'GET', path, repo, headers: { accept: `${MediaType.ociIndex}, application/json` }, follow: false, signal: o?.signal }
      return await run(ex, async res => {
        // Registries without the referrers API (distribution 2.8 among them) answer 404, some 400 or 405.
        if (res.statusCode === 404 || res.statusCode === 400 || res.statusCode === 405) { await discard(res); return undefined }
        if (res.statusCode !== 200) return await fail(res)
        return await listing(res, 'referrers list', o?.signal)
      })
    },

    async listTags (repo: RepoName, o?: AbortOptions & { n?: number, last?: string }): Promise<ListingResponse | undefined> {
      const q = new URLSearchParams()
      if (o?.n !== undefined) q.set('n', String(o.n))
      if (o?.last !== undefined) q.set('last', o.last)
      const query = q.size > 0 ? `?${q.toString()}` : ''
      const ex: Exchange = { kind: 'listing', method: 'GET', path: `${prefix}/v2/${repo}/tags/list${query}`, repo, headers: { accept: 'application/json' }, follow: false, signal: o?.signal }
      return await run(ex, async res => {
        if (res.statusCode === 404) { await discard(res); return undefined }
        if (res.statusCode !== 200) return await fail(res)
        return await listing(res, 'tag list', o?.signal)
      })
    },

    available: () => breaker.available,

    async close (): Promise<void> {
      closing ??= (async () => {
        tokens.clear()
        let timer: NodeJS.Timeout | undefined
        const grace = new Promise<'timeout'>(resolve => { timer = setTimeout(() => resolve('timeout'), CLOSE_GRACE_MS) })
        try {
          const how = await Promise.race([agent.close().then(() => 'closed' as const), grace])
          if (how === 'timeout') await agent.destroy()
        } catch { /* closing twice or a dead socket: nothing left to release */ } finally {
          clearTimeout(timer)
        }
      })()
      return await closing
    },
  }
}

/** The dispatcher for one upstream: direct, through one proxy, or by the HTTP(S)_PROXY/NO_PROXY rules. */
function createDispatcher (options: { connect: { timeout: number }, headersTimeout: number, bodyTimeout: number }, proxy: UpstreamProxy | undefined): Dispatcher {
  if (proxy?.kind === 'url') return new ProxyAgent({ ...options, uri: proxy.url })
  if (proxy?.kind === 'env' && (proxy.httpProxy !== undefined || proxy.httpsProxy !== undefined)) {
    // Every value is given (empty when unset): undici must not read process.env itself.
    return new EnvHttpProxyAgent({ ...options, httpProxy: proxy.httpProxy ?? '', httpsProxy: proxy.httpsProxy ?? '', noProxy: proxy.noProxy ?? '' })
  }
  return new Agent(options)
}

/** Wraps an undici body: counts bytes, checks the length, and re-raises its errors as ours. */
class UpstreamBody extends Readable {
  readonly #src: Readable
  #received = 0
  #ended = false

  constructor (src: Readable, expected: number, hooks: {
    onBytes: (n: number) => void
    mapError: (e: unknown) => Error
    short: (got: number) => Error
    closedEarly: () => Error
  }) {
    super({ highWaterMark: BLOB_CHUNK })
    this.#src = src
    src.on('data', (chunk: Buffer) => {
      this.#received += chunk.length
      hooks.onBytes(chunk.length)
      if (!this.push(chunk)) src.pause()
    })
    src.once('end', () => {
      this.#ended = true
      if (this.#received !== expected) this.destroy(hooks.short(this.#received))
      else this.push(null)
    })
    src.on('error', (e: unknown) => { this.destroy(hooks.mapError(e)) })
    src.once('close', () => { if (!this.#ended && !this.destroyed) this.destroy(hooks.closedEarly()) })
    src.pause()
  }

  override _read (): void { this.#src.resume() }

  override _destroy (error: Error | null, callback: (error?: Error | null) => void): void {
    if (!this.#src.destroyed) this.#src.destroy()
    callback(error)
  }
}

function header (h: Response['headers'], key: string): string | undefined {
  const v = h[key]
  return Array.isArray(v) ? v[0] : v
}

function contentLength (h: Response['headers']): number | undefined {
  const v = header(h, 'content-length')
  if (v === undefined || !/^\d{1,15}$/.test(v.trim())) return undefined
  return Number(v.trim())
}

function mediaTypeOf (h: Response['headers']): string | undefined {
  const v = header(h, 'content-type')?.split(';')[0]?.trim().toLowerCase()
  return v === undefined || v === '' ? undefined : v
}

function optionalDigest (h: Response['headers']): { digest?: string } {
  const v = header(h, 'docker-content-digest')?.trim()
  const d = v === undefined ? undefined : tryParseDigest(v)
  return d === undefined ? {} : { digest: d }
}

/** Parses `bytes a-b/size`; an unknown size (`*`) is refused. */
export function parseContentRange (v: string | undefined): { start: number, end: number, size: number } | undefined {
  const m = v === undefined ? null : /^bytes (\d{1,15})-(\d{1,15})\/(\d{1,15})$/.exec(v.trim())
  if (m === null) return undefined
  const start = Number(m[1]); const end = Number(m[2]); const size = Number(m[3])
  if (end < start || end >= size) return undefined
  return { start, end, size }
}

function withAuth (headers: Record<string, string>, authorization: string | undefined): Record<string, string> {
  return authorization === undefined ? headers : { ...headers, authorization }
}

/** Exponential backoff with "equal jitter": half fixed, half random. */
export function backoff (baseMs: number, attempt: number): number {
  const exp = Math.min(MAX_BACKOFF_MS, baseMs * 2 ** (attempt - 1))
  return Math.round(exp / 2 + Math.random() * exp / 2)
}

async function raceAbort<T> (p: Promise<T>, signal?: AbortSignal): Promise<T> {
  if (signal === undefined) return await p
  if (signal.aborted) throw signal.reason
  let onAbort: (() => void) | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => {
      onAbort = () => { reject(signal.reason) }
      signal.addEventListener('abort', onAbort, { once: true })
    })])
  } finally {
    if (onAbort !== undefined) signal.removeEventListener('abort', onAbort)
  }
}
