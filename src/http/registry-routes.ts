import type { FastifyInstance, FastifyReply } from 'fastify'
import type { Resolver } from '../content/resolver.js'
import type { Metrics } from '../metrics.js'
import type { ContentOrigin } from '../content/types.js'
import { parseRegistryPath, parseReference, resolveTarget, type RoutingInit } from '../oci/reference.js'
import { parseDigest } from '../oci/digest.js'
import { sendBody } from './send-body.js'
import { contentRange, parseRange } from '../oci/range.js'
import { parseAccept } from '../oci/media-types.js'
import { OciError, UpstreamUnavailableError, blobUnknown, unsupported } from '../errors.js'
import type { Digest } from '../oci/digest.js'
import type { Target } from '../oci/reference.js'
import type { Listings } from '../content/listings.js'
import { MediaType } from '../oci/media-types.js'

export interface RegistryRoutesComponents { resolver: Resolver, metrics: Metrics, listings: Listings }

/** The pull side of the OCI distribution API. Push and delete are refused. */
export function registerRegistryRoutes (app: FastifyInstance, c: RegistryRoutesComponents, routing: RoutingInit): void {
  const { resolver, metrics, listings } = c

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
      const params = new URLSearchParams(query)

      if (route.kind === 'referrers') {
        const subject = parseDigest(route.digest)
        const artifactType = params.get('artifactType') ?? undefined
        const r = await listings.referrers(target, subject, artifactType)
        void reply.type(MediaType.ociIndex).header('content-length', r.body.length)
        if (r.filtered) void reply.header('oci-filters-applied', 'artifactType')
        if (r.stale) void reply.header('warning', '110 pullmesh "Response is Stale"')
        return reply.send(head ? undefined : r.body)
      }

      if (route.kind === 'tags') {
        const t = await listings.tags(target, tagsQuery(params))
        void reply.type('application/json').header('content-length', t.body.length)
        if (t.next !== undefined) void reply.header('link', `<${tagsLink(route.name, ns, t.next)}>; rel="next"`)
        if (t.stale) void reply.header('warning', '110 pullmesh "Response is Stale"')
        if (t.fromMesh === true) void reply.header('x-pullmesh-source', 'mesh')
        return reply.send(head ? undefined : t.body)
      }

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
      if (head) {
        // A HEAD does not start a download: the store or a fill running here, else the upstream's HEAD.
        // Only when the upstream cannot answer does it fall back to a fill (which asks the peers first).
        const size = (await resolver.localBlob(digest))?.size ?? await upstreamBlobSize(target, digest, signal)
        if (size === undefined) throw blobUnknown({ digest })
        void reply
          .header('content-type', 'application/octet-stream')
          .header('docker-content-digest', digest)
          .header('etag', `"${digest}"`)
          .header('accept-ranges', 'bytes')
        return reply.header('content-length', size).send()
      }
      const blob = await resolver.blob(target, digest, signal)
      const range = parseRange(req.headers.range, blob.size)
      void reply
        .header('content-type', 'application/octet-stream')
        .header('docker-content-digest', digest)
        .header('etag', `"${digest}"`)
        .header('accept-ranges', 'bytes')
      const stream = await blob.open(range)
      const length = range === undefined ? blob.size : range.end - range.start + 1
      if (range !== undefined) void reply.code(206).header('content-range', contentRange(range, blob.size))
      void reply.header('content-length', length)
      reply.raw.once('finish', () => metrics.bytesServed.inc({ source: sourceLabel(blob.origin?.() ?? blob.source) }, length))
      return await sendBody(reply, stream)
    },
  })

  async function upstreamBlobSize (target: Target, digest: Digest, signal: AbortSignal): Promise<number | undefined> {
    try {
      return await listings.blobSize(target, digest, signal)
    } catch (err) {
      if (!(err instanceof UpstreamUnavailableError)) throw err
      return (await resolver.blob(target, digest, signal)).size
    }
  }

  // Everything that writes is refused: this is a read-only mirror.
  app.route({
    method: ['POST', 'PUT', 'PATCH', 'DELETE'],
    url: '/v2/*',
    handler: async () => { throw unsupported({ reason: 'push and delete are not supported by a mirror' }) },
  })
}

const TAG_LIKE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/

/** `n` and `last` of a tag list request, checked before they travel upstream. */
function tagsQuery (params: URLSearchParams): { n?: number, last?: string } {
  const n = params.get('n')
  const last = params.get('last')
  if (n !== null && !/^\d{1,5}$/.test(n)) throw new OciError('UNSUPPORTED', 400, 'invalid pagination: n must be a number', { n: n.slice(0, 50) })
  if (last !== null && last !== '' && !TAG_LIKE.test(last)) throw new OciError('UNSUPPORTED', 400, 'invalid pagination: last must be a tag', { last: last.slice(0, 200) })
  return { ...(n !== null ? { n: Number(n) } : {}), ...(last !== null && last !== '' ? { last } : {}) }
}

/** The next page of a tag list, on the mirror: the name as the client gave it, and its `ns`. */
function tagsLink (name: string, ns: string | undefined, next: { n: string | undefined, last: string | undefined }): string {
  const q = new URLSearchParams()
  if (next.n !== undefined) q.set('n', next.n)
  if (next.last !== undefined) q.set('last', next.last)
  if (ns !== undefined) q.set('ns', ns)
  const qs = q.toString()
  return `/v2/${name}/tags/list${qs === '' ? '' : `?${qs}`}`
}

function sourceLabel (s: ContentOrigin): string {
  return s === 'fill' ? 'upstream' : s
}

/** An AbortSignal that fires when the client goes away before the response is done. */
function abortSignalOf (reply: FastifyReply): AbortSignal {
  const ac = new AbortController()
  const gone = (): void => { if (!reply.raw.writableFinished) ac.abort(new Error('client went away')) }
  reply.raw.once('close', gone)
  // A pipelined response whose connection dies before its turn never closes; its request does.
  reply.request.raw.once('close', gone)
  return ac.signal
}
