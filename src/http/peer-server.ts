import Fastify, { type FastifyInstance } from 'fastify'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { Resolver } from '../content/resolver.js'
import { tryParseDigest } from '../oci/digest.js'
import { contentRange, parseRange } from '../oci/range.js'
import { AUTH_HEADER, PEER_BLOB_PATH, verifyRequest } from '../peer-protocol.js'
import { OciError, blobUnknown } from '../errors.js'
import { toOciError } from './server.js'
import { sendBody } from './send-body.js'

export interface PeerServerComponents { resolver: Resolver, metrics: Metrics, logger: Logger }

/**
 * The peer data path: plain HTTP on the node's LAN address that serves blobs by digest only, only from
 * this node (its store, or a fill in progress, whose last byte waits for verification), and never
 * forwards a request. A peer is just another mirror. With a mesh key, every request must prove it.
 */
export function createPeerServer (c: PeerServerComponents, init: { key?: Buffer }): FastifyInstance {
  const log = c.logger.child({ component: 'peer-http' })
  const app = Fastify({ logger: false, forceCloseConnections: true, return503OnClosing: true })

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

  app.addHook('onRequest', async (req) => {
    if (init.key === undefined) return
    const path = (req.raw.url ?? '').split('?', 1)[0] ?? ''
    if (!verifyRequest(init.key, req.method, path, req.headers[AUTH_HEADER] as string | undefined)) {
      c.metrics.peerErrors.inc({ reason: 'auth-refused' })
      throw new OciError('UNAUTHORIZED', 401, 'this mesh requires its key')
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
      return await sendBody(reply.header('content-length', length), stream)
    },
  })
  return app
}
