import Fastify, { type FastifyInstance } from 'fastify'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { Resolver } from '../content/resolver.js'
import { tryParseDigest } from '../oci/digest.js'
import { contentRange, parseRange } from '../oci/range.js'
import { AUTH_ERROR_HEADER, AUTH_HEADER, PEER_BLOB_PATH, createRequestVerifier, type AuthFailure } from '../peer-protocol.js'
import { OciError, blobUnknown } from '../errors.js'
import { toOciError } from './server.js'
import { sendBody } from './send-body.js'

export interface PeerServerComponents { resolver: Resolver, metrics: Metrics, logger: Logger }

export interface PeerServerInit {
  /** Data-path key (from the mesh key); without it the data path is open. */
  key?: Buffer
  /** This node's libp2p peer id: signatures made for another node are refused. Required with `key`. */
  self?: string
  /** Time allowed for a request's headers to arrive (default 5 s). */
  headersTimeoutMs?: number
  /** Time allowed for a whole request to arrive (default 10 s). */
  requestTimeoutMs?: number
}

const WARN_EVERY_MS = 60_000
const MAX_WARNED_REMOTES = 1024
const REFUSAL_MESSAGES: Partial<Record<AuthFailure, string>> = {
  key: 'data-path signature made with a different mesh key: is this peer started with another --mesh-key file?',
  signature: 'data-path signature invalid: different mesh key, or a request signed for another node or another URL/range',
  expired: 'data-path signature outside the time window: clock skew between nodes, or a replayed request',
  replayed: 'data-path signature replayed (nonce already used)',
  busy: 'data-path replay cache full; refusing signed requests until it drains',
}

/**
 * The peer data path: plain HTTP on the node's LAN address that serves blobs by digest only, only from
 * this node (its store, or a fill in progress, whose last byte waits for verification), and never
 * forwards a request. A peer is just another mirror. With a mesh key, every request must prove it.
 */
export function createPeerServer (c: PeerServerComponents, init: PeerServerInit): FastifyInstance {
  const log = c.logger.child({ component: 'peer-http' })
  if (init.key !== undefined && (init.self === undefined || init.self === '')) throw new TypeError('createPeerServer: a key needs this node\'s peer id (init.self)')
  const verifier = init.key !== undefined ? createRequestVerifier(init.key, { self: init.self! }) : undefined
  const headersTimeout = init.headersTimeoutMs ?? 5_000
  const requestTimeout = Math.max(init.requestTimeoutMs ?? 10_000, headersTimeout)
  const app = Fastify({
    logger: false,
    forceCloseConnections: true,
    return503OnClosing: true,
    // sha512 digests (135 characters) are path parameters too.
    routerOptions: { maxParamLength: 512 },
    // A request that arrives a byte at a time is cut off: headers and the whole request have deadlines,
    // checked every second (Node's default check runs every 30 s).
    requestTimeout,
    http: { headersTimeout, requestTimeout, connectionsCheckingInterval: 1_000 },
  })

  // One warn per remote address and reason per minute: a mis-keyed or hostile peer cannot flood the log.
  const warned = new Map<string, number>()
  function warnRefusal (remote: string, reason: AuthFailure): void {
    const message = REFUSAL_MESSAGES[reason]
    if (message === undefined) return
    const now = Date.now()
    const k = `${reason} ${remote}`
    const last = warned.get(k)
    if (last !== undefined && now - last < WARN_EVERY_MS) return
    if (warned.size >= MAX_WARNED_REMOTES) warned.clear()
    warned.set(k, now)
    log.warn({ remote, reason }, message)
  }

  app.setErrorHandler((err, req, reply) => {
    const e = toOciError(err)
    if (e.status >= 500) log.error({ err, url: req.raw.url }, 'peer request failed')
    if (reply.raw.headersSent) { reply.raw.destroy(); return }
    void reply.code(e.status).headers(e.headers).type('application/json').send(req.method === 'HEAD' ? undefined : e.toBody())
  })
  app.setNotFoundHandler((_req, reply) => {
    void reply.code(404).type('application/json').send(new OciError('UNSUPPORTED', 404, 'no such endpoint').toBody())
  })
  // On the response's close, not onResponse: a body sent by sendBody() bypasses fastify's hooks.
  app.addHook('onRequest', async (req, reply) => {
    const t0 = performance.now()
    reply.raw.once('close', () => {
      log.debug({ method: req.method, url: req.raw.url, statusCode: reply.raw.statusCode, remote: req.ip, ms: Math.round(performance.now() - t0), ...(reply.raw.writableFinished ? {} : { aborted: true }) }, 'peer request')
    })
  })

  // The one auth check, for every route (the 404 handler included): path and query as sent, and Range.
  app.addHook('onRequest', async (req) => {
    if (verifier === undefined) return
    const range = req.headers.range
    const r = verifier.verify({ method: req.method, url: req.raw.url ?? '', ...(range !== undefined ? { range } : {}) }, req.headers[AUTH_HEADER])
    if (r.ok) return
    c.metrics.peerErrors.inc({ reason: 'auth-refused' })
    warnRefusal(req.ip, r.reason)
    // Close the connection after a refusal: nothing more from this client is read.
    throw new OciError('UNAUTHORIZED', 401, 'this mesh requires its key', { reason: r.reason }, { [AUTH_ERROR_HEADER]: r.reason, connection: 'close' })
  })
  app.route({
    method: ['GET', 'HEAD'],
    url: `${PEER_BLOB_PATH}:digest`,
    handler: async (req, reply) => {
      const raw = (req.params as { digest: string }).digest
      const digest = tryParseDigest(raw)
      if (digest === undefined) throw new OciError('DIGEST_INVALID', 400, 'invalid digest', { digest: raw.slice(0, 200) })
      const blob = await c.resolver.localBlob(digest, { forPeer: true })
      if (blob === undefined) throw blobUnknown({ digest })
      void reply.header('content-type', 'application/octet-stream').header('docker-content-digest', digest).header('accept-ranges', 'bytes')
      if (req.method === 'HEAD') return reply.header('content-length', blob.size).send()
      const range = parseRange(req.headers.range, blob.size)
      const stream = await blob.open(range)
      const length = range === undefined ? blob.size : range.end - range.start + 1
      if (range !== undefined) void reply.code(206).header('content-range', contentRange(range, blob.size))
      reply.raw.once('finish', () => c.metrics.peerBytes.inc({ direction: 'out' }, length))
      return await sendBody(reply.header('content-length', length), stream)
    },
  })
  return app
}
