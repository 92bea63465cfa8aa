import Fastify, { type FastifyInstance, type FastifyError, type FastifyReply } from 'fastify'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { Resolver } from '../content/resolver.js'
import type { RoutingInit } from '../oci/reference.js'
import {
  NotFoundError, OciError, UpstreamDeniedError, UpstreamProtocolError, UpstreamRateLimitedError,
  UpstreamUnavailableError, VerificationError,
} from '../errors.js'
import { registerRegistryRoutes } from './registry-routes.js'
import type { Listings } from '../content/listings.js'
import type { TlsMaterial } from './tls.js'
import { UpstreamCircuitOpenError } from '../upstream/breaker.js'
import { BlobTooLargeError } from '../store/errors.js'
import { lazySchemaCompilers } from './schema-compilers.js'

export interface HttpComponents {
  resolver: Resolver
  listings: Listings
  metrics: Metrics
  logger: Logger
  /** Readiness: true once every part has started. */
  ready: () => boolean
  /** Extra routes (the mesh's status endpoint, for example). */
  extraRoutes?: (app: FastifyInstance) => void
}

export interface HttpInit {
  /** On close, responses in flight get this long to finish before their connections are cut (default 0). */
  shutdownGraceMs?: number
  /** Serve HTTPS with this certificate and key (see ./tls.ts for reloading them). */
  tls?: TlsMaterial
}

/** Builds the client-facing HTTP server: the registry API, health, readiness and metrics. */
export function createHttpServer (c: HttpComponents, routing: RoutingInit, init: HttpInit = {}): FastifyInstance {
  const log = c.logger.child({ component: 'http' })
  const app = Fastify({
    ...(init.tls !== undefined ? { https: { cert: init.tls.cert, key: init.tls.key } } : {}),
    logger: false,
    // No route has a schema: ajv and fast-json-stringify load only if one ever does (see schema-compilers.ts).
    schemaController: { compilersFactory: lazySchemaCompilers() },
    routerOptions: { maxParamLength: 2048 },
    forceCloseConnections: true,
    return503OnClosing: true,
    keepAliveTimeout: 65_000,
    // Requests that arrive a byte at a time are cut off (checked every second; Node's own check runs every 30 s).
    requestTimeout: 30_000,
    http: { headersTimeout: 15_000, requestTimeout: 30_000, connectionsCheckingInterval: 1_000 },
    frameworkErrors: (err, _req, reply) => {
      const e = new OciError('NAME_INVALID', 400, 'malformed request', { reason: err.message })
      void (reply as FastifyReply).code(e.status).type('application/json').send(e.toBody())
    },
  })

  /** Responses not closed yet (for the drain on close), and who waits for the last one. */
  const inFlight = new Set<object>()
  let drained: (() => void) | undefined
  // Logged when the response closes, not on 'finish': a client that hangs up as soon as it has every
  // byte must still be counted and logged (onResponse would never fire for it).
  // Timed here, not with reply.elapsedTime, which stops when sendBody() takes the response over.
  app.addHook('onRequest', async (req, reply) => {
    const t0 = performance.now()
    inFlight.add(reply.raw)
    reply.raw.once('close', () => {
      inFlight.delete(reply.raw)
      if (inFlight.size === 0) drained?.()
      const ms = performance.now() - t0
      const route = routeLabel(req.raw.url ?? '')
      const complete = reply.raw.writableFinished
      // A client that hung up before any answer gets none: counted as 499 (nginx's "client closed request").
      const status = !complete && !reply.raw.headersSent ? 499 : reply.raw.statusCode
      c.metrics.httpRequests.inc({ route, method: req.method, status: String(status) })
      c.metrics.httpDuration.observe({ route }, ms / 1000)
      const fields = { method: req.method, url: req.raw.url, statusCode: status, ms: Math.round(ms), remote: req.ip, ...(complete ? {} : { aborted: true }) }
      if (status >= 500) log.error(fields, 'request')
      else log.info(fields, 'request')
    })
  })

  // Drain: once closing, fastify answers new requests 503 (return503OnClosing); responses in flight
  // (a layer download) get the grace period to finish before the connections are closed.
  app.addHook('preClose', async () => {
    const graceMs = init.shutdownGraceMs ?? 0
    if (inFlight.size === 0 || graceMs <= 0) return
    log.info({ inFlight: inFlight.size, graceMs }, 'draining responses in flight')
    let timer: NodeJS.Timeout | undefined
    await new Promise<void>(resolve => {
      drained = resolve
      timer = setTimeout(resolve, graceMs)
    })
    clearTimeout(timer)
    drained = undefined
    if (inFlight.size > 0) log.warn({ inFlight: inFlight.size }, 'grace period over; closing responses still in flight')
  })

  app.setErrorHandler((err: FastifyError | Error, req, reply) => {
    if (reply.raw.destroyed && !reply.raw.headersSent) {
      // The client hung up while it waited (a cold miss): its abort, not our failure.
      log.debug({ url: req.raw.url, reason: err.message }, 'client went away before the answer')
      return
    }
    const e = toOciError(err)
    if (e.status >= 500) log.error({ err, url: req.raw.url }, 'request failed')
    if (reply.raw.headersSent) { reply.raw.destroy(); return }
    void reply.code(e.status).headers(e.headers).type('application/json')
    void reply.send(req.method === 'HEAD' ? undefined : e.toBody())
  })
  app.setNotFoundHandler((req, reply) => {
    const e = new OciError('UNSUPPORTED', 404, 'no such endpoint', { method: req.method, path: (req.raw.url ?? '').slice(0, 200) })
    void reply.code(404).type('application/json').send(e.toBody())
  })

  app.get('/healthz', async () => ({ status: 'ok' }))
  app.get('/readyz', async (_req, reply) => c.ready() ? { status: 'ready' } : reply.code(503).send({ status: 'starting' }))
  app.get('/metrics', async (_req, reply) => {
    const body = await c.metrics.registry.metrics()
    return reply.type(c.metrics.registry.contentType).send(body)
  })

  registerRegistryRoutes(app, { resolver: c.resolver, metrics: c.metrics, listings: c.listings }, routing)
  c.extraRoutes?.(app)
  return app
}

function routeLabel (url: string): string {
  const path = url.split('?', 1)[0] ?? ''
  if (path === '/v2/' || path === '/v2') return 'base'
  if (/^\/v2\/.+\/manifests\//.test(path)) return 'manifest'
  if (/^\/v2\/.+\/blobs\//.test(path)) return 'blob'
  if (path.startsWith('/v2/')) return 'registry-other'
  if (path.startsWith('/pullmesh/')) return 'pullmesh'
  if (['/healthz', '/readyz', '/metrics'].includes(path)) return path.slice(1)
  return 'other'
}

/** The one mapping from every error the daemon can raise to an OCI error body and status. */
export function toOciError (err: unknown): OciError {
  if (err instanceof OciError) return err
  if (err instanceof UpstreamRateLimitedError) {
    return new OciError('TOOMANYREQUESTS', 429, 'the upstream registry is rate-limiting; retry later', { upstream: err.upstream },
      err.retryAfter !== undefined ? { 'retry-after': err.retryAfter } : {})
  }
  if (err instanceof UpstreamCircuitOpenError) {
    return new OciError('UNAVAILABLE', 503, 'the upstream registry is unreachable and the content is not cached; not retried until the hold ends',
      { upstream: err.upstream, reason: err.message }, { 'retry-after': String(err.retryAfterS) })
  }
  if (err instanceof UpstreamUnavailableError) {
    return new OciError('UNAVAILABLE', 503, 'the upstream registry is unavailable and the content is not cached', { upstream: err.upstream, status: err.status })
  }
  if (err instanceof UpstreamDeniedError) {
    return new OciError('DENIED', 403, 'the upstream registry denied access', { upstream: err.upstream, status: err.status })
  }
  if (err instanceof UpstreamProtocolError) {
    return new OciError('UNAVAILABLE', 502, 'the upstream registry sent an invalid response', { upstream: err.upstream, reason: err.message })
  }
  if (err instanceof VerificationError) {
    return new OciError('DIGEST_INVALID', 502, 'content failed digest verification and was discarded', { expected: err.expected })
  }
  if (err instanceof NotFoundError) return new OciError('BLOB_UNKNOWN', 404, 'blob unknown to registry')
  // Only manifests are read whole: a digest that names a larger blob names no manifest.
  if (err instanceof BlobTooLargeError) return new OciError('MANIFEST_UNKNOWN', 404, 'manifest unknown', { reason: 'the digest names a blob too large to be a manifest' })
  const fe = err as FastifyError
  if (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    return new OciError('UNSUPPORTED', fe.statusCode, fe.message)
  }
  // The cache's disk is full (or its quota is): say so, so that an operator sees it in the client's error too.
  const code = (err as { code?: unknown }).code
  if (code === 'ENOSPC' || code === 'EDQUOT') {
    return new OciError('UNAVAILABLE', 507, 'the mirror\'s cache disk is full; the content could not be stored', { code })
  }
  return new OciError('UNAVAILABLE', 500, 'internal error')
}
