import type { FastifyInstance, FastifyReply } from 'fastify'
import type { Resolver } from '../content/resolver.js'
import type { Metrics } from '../metrics.js'
import type { ContentOrigin } from '../content/types.js'
import { parseRegistryPath, parseReference, resolveTarget, type RoutingInit } from '../oci/reference.js'
import { parseDigest } from '../oci/digest.js'
import { sendBody } from './send-body.js'
import { contentRange, parseRange } from '../oci/range.js'
import { parseAccept } from '../oci/media-types.js'
import { unsupported } from '../errors.js'

export interface RegistryRoutesComponents { resolver: Resolver, metrics: Metrics }

/** The pull side of the OCI distribution API. Push and delete are refused. */
export function registerRegistryRoutes (app: FastifyInstance, c: RegistryRoutesComponents, routing: RoutingInit): void {
  const { resolver, metrics } = c

  app.route({
    method: ['GET', 'HEAD'],
    url: '/v2/',
    handler: async (_req, reply) => {
      void reply.header('docker-distribution-api-version', 'registry/2.0').type('application/json')
      return reply.send('{}')
    },
  })
  app.route({
    method: ['GET', 'HEAD'],
    url: '/v2',
    handler: async (_req, reply) => reply.header('docker-distribution-api-version', 'registry/2.0').type('application/json').send('{}'),
  })

  app.route({
    method: ['GET', 'HEAD'],
    url: '/v2/*',
    handler: async (req, reply) => {
      const [rawPath = '', query = ''] = req.raw.url!.split('?', 2)
      const route = parseRegistryPath(rawPath)
      void reply.header('docker-distribution-api-version', 'registry/2.0')
      if (route.kind === 'base') return reply.type('application/json').send('{}')
      const ns = new URLSearchParams(query).get('ns') ?? undefined
      const target = resolveTarget(route.name, ns, routing)
      const signal = abortSignalOf(reply)
      const head = req.method === 'HEAD'

      if (route.kind === 'manifest') {
        const ref = parseReference(route.reference)
        const m = await resolver.manifest(target, ref, parseAccept(req.headers.accept), signal)
        void reply
          .header('content-type', m.mediaType)
          .header('content-length', m.body.length)
          .header('docker-content-digest', m.digest)
          .header('etag', `"${m.digest}"`)
        if (head) return reply.send()
        metrics.bytesServed.inc({ source: sourceLabel(m.source) }, m.body.length)
        return reply.send(m.body)
      }

      const digest = parseDigest(route.digest)
      const blob = await resolver.blob(target, digest, signal)
      const range = head ? undefined : parseRange(req.headers.range, blob.size)
      void reply
        .header('content-type', 'application/octet-stream')
        .header('docker-content-digest', digest)
        .header('etag', `"${digest}"`)
        .header('accept-ranges', 'bytes')
      if (head) return reply.header('content-length', blob.size).send()
      const stream = await blob.open(range)
      const length = range === undefined ? blob.size : range.end - range.start + 1
      if (range !== undefined) void reply.code(206).header('content-range', contentRange(range, blob.size))
      void reply.header('content-length', length)
      reply.raw.once('finish', () => metrics.bytesServed.inc({ source: sourceLabel(blob.origin?.() ?? blob.source) }, length))
      return await sendBody(reply, stream)
    },
  })

  // Everything that writes is refused: this is a read-only mirror.
  app.route({
    method: ['POST', 'PUT', 'PATCH', 'DELETE'],
    url: '/v2/*',
    handler: async () => { throw unsupported({ reason: 'push and delete are not supported by a mirror' }) },
  })
}

function sourceLabel (s: ContentOrigin): string {
  return s === 'fill' ? 'upstream' : s
}

/** An AbortSignal that fires when the client goes away before the response is done. */
function abortSignalOf (reply: FastifyReply): AbortSignal {
  const ac = new AbortController()
  reply.raw.once('close', () => { if (!reply.raw.writableFinished) ac.abort(new Error('client went away')) })
  return ac.signal
}
