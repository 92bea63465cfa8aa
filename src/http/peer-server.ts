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
import { lazySchemaCompilers } from './schema-compilers.js'
import { pipeline } from 'node:stream/promises'
import { DELEGATED_CONTENT_TYPE, HEARTBEAT_MS, PEER_FETCH_PATH, encodePreamble } from '../content/delegation.js'

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
    schemaController: { compilersFactory: lazySchemaCompilers() },
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
  // Delegated fetches: a peer chose this node to fetch content for the mesh. The answer starts at once
  // (so the asker can tell a busy fetcher from a dead one), carries a space every HEARTBEAT_MS while we
  // wait on the upstream, then one JSON line (size, or error), then the bytes. Never forwarded further.
  const delegatedBy = new Map<string, number>()
  app.get(`${PEER_FETCH_PATH}:kind/:ref`, async (req, reply) => {
    const { kind, ref } = req.params as { kind: string, ref: string }
    const q = req.query as Record<string, string | undefined>
    const upstream = q.u ?? ''
    const repo = q.r ?? ''
    if (kind !== 'blob' && kind !== 'manifest') throw new OciError('UNSUPPORTED', 404, 'no such endpoint')
    const digest = kind === 'blob' ? tryParseDigest(ref) : undefined
    if (kind === 'blob' && digest === undefined) throw new OciError('DIGEST_INVALID', 400, 'invalid digest', { digest: ref.slice(0, 200) })
    const start = parseOpenRange(req.headers.range)
    if (start === null) throw new OciError('UNSUPPORTED', 416, 'only "bytes=N-" ranges are supported here')
    // A peer may keep only so many fetches running here at once (each can cost this node an upstream
    // download): the rest are refused at once, and the asker fetches for itself.
    const who = req.ip
    const running = delegatedBy.get(who) ?? 0
    if (running >= MAX_DELEGATED_PER_PEER) throw new OciError('TOOMANYREQUESTS', 429, 'too many delegated fetches from this peer at once')
    delegatedBy.set(who, running + 1)
    reply.raw.once('close', () => {
      const n = (delegatedBy.get(who) ?? 1) - 1
      if (n <= 0) delegatedBy.delete(who)
      else delegatedBy.set(who, n)
    })
    reply.hijack()
    const res = reply.raw
    const ac = new AbortController()
    res.once('close', () => { if (!res.writableFinished) ac.abort(new Error('peer went away')) })
    res.writeHead(200, { 'content-type': DELEGATED_CONTENT_TYPE, 'cache-control': 'no-store' })
    res.flushHeaders()
    let preambleSent = false
    const beat = setInterval(() => { if (!res.destroyed) res.write(' ') }, HEARTBEAT_MS)
    const fail = (err: unknown): void => {
      clearInterval(beat)
      const e = toOciError(err)
      const code = (err as { code?: string }).code ?? e.code
      if (e.status >= 500 && code !== 'PM_FETCHER_BUSY') log.warn({ err: code, ref, kind }, 'delegated fetch failed')
      if (!res.destroyed) res.end(encodePreamble({ error: { code: String(code).slice(0, 64), status: e.status } }))
    }
    try {
      if (kind === 'manifest') {
        const m = await c.resolver.manifestForPeer(upstream, repo, ref, ac.signal)
        clearInterval(beat)
        if (m === undefined) { fail(blobUnknown({ ref })); return }
        res.write(encodePreamble({ size: m.body.length, mediaType: m.mediaType, digest: m.digest, ...(m.verifiedAt !== undefined ? { verifiedAt: m.verifiedAt } : {}) }))
        res.end(m.body)
        c.metrics.peerBytes.inc({ direction: 'out' }, m.body.length)
        return
      }
      const blob = await c.resolver.blobForPeer(upstream, repo, digest!, ac.signal)
      clearInterval(beat)
      if (blob === undefined) { fail(blobUnknown({ digest })); return }
      const from = Math.min(start ?? 0, blob.size)
      const stream = await blob.open(from < blob.size ? { start: from, end: blob.size - 1 } : undefined)
      if (from >= blob.size && from > 0) { stream.destroy(); fail(new OciError('UNSUPPORTED', 416, 'range starts past the end')); return }
      res.write(encodePreamble({ size: blob.size, start: from }))
      preambleSent = true
      let sent = 0
      stream.on('data', (chunk: Buffer) => { sent += chunk.length })
      await pipeline(stream, res, { signal: ac.signal })
      c.metrics.peerBytes.inc({ direction: 'out' }, sent)
    } catch (err) {
      clearInterval(beat)
      // Before the preamble, the error goes in it; after it, only an aborted stream can say so.
      if (res.destroyed || res.writableEnded) return
      if (preambleSent) { res.destroy(); return }
      fail(err)
    }
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
      // A peer streaming from a fill of ours in progress: a fetch made for it too.
      if (blob.source === 'fill') c.metrics.servedForPeers.inc({ kind: 'blob' })
      return await sendBody(reply.header('content-length', length), stream)
    },
  })
  return app
}

/** Delegated fetches one peer (by address) may have running on this node at once. */
const MAX_DELEGATED_PER_PEER = 16

/** `bytes=N-` → N; no header → undefined; anything else → null. */
function parseOpenRange (h: string | undefined): number | undefined | null {
  if (h === undefined) return undefined
  const m = /^bytes=(\d{1,15})-$/.exec(h.trim())
  return m === null ? null : Number(m[1])
}
