import { Agent, request } from 'undici'
import { Readable } from 'node:stream'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { Mesh, PeerHolder } from '../mesh/types.js'
import type { Digest } from '../oci/digest.js'
import type { TagRecord } from '../store/types.js'
import type { PeerContent } from './types.js'
import type { FillSource } from './fill.js'
import { AUTH_ERROR_HEADER, AUTH_HEADER, PEER_BLOB_PATH, signRequest } from '../peer-protocol.js'
import { digestOf } from '../oci/digest.js'
import { VerificationError } from '../errors.js'

export interface PeerContentInit {
  /** Connect and first-byte deadline for a peer; a dead or slow peer costs at most this. */
  timeoutMs: number
  /** Data-path key derived from the mesh key, when the mesh is private. */
  key?: Buffer
  /** Peers tried per request before the upstream. */
  maxPeers?: number
  /** Largest blob taken from a peer (the disk budget): an unverified claim never fills the disk. */
  maxBytes?: number
}

/** A peer did not start answering within the peer timeout. */
export class PeerTimeoutError extends Error {
  override readonly name = 'PeerTimeoutError'
  readonly code = 'PM_PEER_TIMEOUT'
}

/** A peer that answered but broke the protocol (wrong status, missing length). */
export class PeerProtocolError extends Error {
  override readonly name = 'PeerProtocolError'
  readonly code = 'PM_PEER_PROTOCOL'
}

/**
 * Fetches content from peers over their plain-HTTP data path: a peer is just another mirror, and its
 * endpoint never forwards, so requests cannot loop. Peers are chosen from the mesh's local index only.
 * Nothing here trusts the bytes: the fill (blobs) and the resolver (manifests) verify them.
 */
export function createPeerContent (components: { mesh: Mesh, metrics: Metrics, logger: Logger }, init: PeerContentInit): PeerContent & { close: () => Promise<void> } {
  const { mesh, metrics } = components
  const log = components.logger.child({ component: 'peers' })
  const maxPeers = init.maxPeers ?? 3
  const agent = new Agent({
    connect: { timeout: init.timeoutMs },
    headersTimeout: init.timeoutMs,
    // A peer that stalls mid-transfer is dropped; the next source takes over.
    bodyTimeout: Math.max(2_000, init.timeoutMs * 4),
    keepAliveTimeout: 30_000,
  })

  async function get (peer: PeerHolder, digest: Digest, signal?: AbortSignal): Promise<{ body: Readable, size: number } | undefined> {
    const path = PEER_BLOB_PATH + digest
    const headers: Record<string, string> = {}
    if (init.key !== undefined) headers[AUTH_HEADER] = signRequest(init.key, { target: peer.peerId, method: 'GET', url: path })
    // undici's own timers tick about once a second; the peer deadline is enforced here, to the ms.
    const deadline = new AbortController()
    const timer = setTimeout(() => deadline.abort(new PeerTimeoutError(`peer ${peer.peerId} did not answer within ${init.timeoutMs} ms`)), init.timeoutMs)
    let res
    try {
      res = await request(peer.dataUrl + path, {
        method: 'GET',
        headers,
        dispatcher: agent,
        signal: signal !== undefined ? AbortSignal.any([signal, deadline.signal]) : deadline.signal,
      })
    } finally {
      clearTimeout(timer)
    }
    if (res.statusCode === 404) {
      await res.body.dump().catch(() => {})
      return undefined
    }
    const size = Number(res.headers['content-length'])
    if (res.statusCode !== 200 || !Number.isSafeInteger(size) || size < 0) {
      await res.body.dump().catch(() => {})
      if (res.statusCode === 401) {
        const reason = String(res.headers[AUTH_ERROR_HEADER] ?? 'unknown').slice(0, 20)
        log.warn({ peer: peer.peerId, dataUrl: peer.dataUrl, reason }, reason === 'expired'
          ? 'peer refused our data-path signature (401): clock skew between the nodes?'
          : 'peer refused our data-path signature (401): different mesh key?')
        throw new PeerProtocolError(`peer ${peer.peerId} refused our data-path signature (${reason})`)
      }
      throw new PeerProtocolError(`peer ${peer.peerId} answered ${res.statusCode}`)
    }
    if (init.maxBytes !== undefined && size > init.maxBytes) {
      res.body.destroy()
      throw new PeerProtocolError(`peer ${peer.peerId} offers ${size} bytes, more than the disk budget`)
    }
    return { body: res.body as unknown as Readable, size }
  }

  function fail (peer: PeerHolder, digest: Digest, err: unknown): void {
    const code = (err as { code?: string }).code ?? (err as Error).name
    metrics.peerErrors.inc({ reason: code === 'PM_VERIFICATION_FAILED' ? 'wrong-bytes' : 'fetch-failed' })
    mesh.report(peer.peerId, 'bad')
    log.warn({ peer: peer.peerId, digest, err: code }, 'peer failed; trying the next source')
  }

  return {
    blobSources (digest: Digest): FillSource[] {
      return mesh.holders(digest).slice(0, maxPeers).map((peer): FillSource => ({
        label: `peer:${peer.peerId}`,
        kind: 'peer',
        streamable: false,
        open: async (signal) => await get(peer, digest, signal),
        onFailure: (err) => fail(peer, digest, err),
        onSuccess: () => mesh.report(peer.peerId, 'good'),
        onBytes: (n) => metrics.peerBytes.inc({ direction: 'in' }, n),
      }))
    },

    async fetchSmall (digest: Digest, maxBytes: number, signal?: AbortSignal): Promise<Buffer | undefined> {
      for (const peer of mesh.holders(digest).slice(0, maxPeers)) {
        try {
          const r = await get(peer, digest, signal)
          if (r === undefined) continue
          if (r.size > maxBytes) { r.body.destroy(); throw new PeerProtocolError(`peer ${peer.peerId} offers ${r.size} bytes`) }
          const chunks: Buffer[] = []
          for await (const c of r.body) chunks.push(c as Buffer)
          const buf = Buffer.concat(chunks)
          metrics.peerBytes.inc({ direction: 'in' }, buf.length)
          if (buf.length !== r.size) throw new PeerProtocolError('short body')
          if (digestOf(buf, digest) !== digest) {
            metrics.verificationFailures.inc({ source: 'peer' })
            throw new VerificationError('peer sent bytes that do not match the digest', digest)
          }
          mesh.report(peer.peerId, 'good')
          return buf
        } catch (err) {
          if (signal?.aborted === true) throw err
          fail(peer, digest, err)
        }
      }
      return undefined
    },

    tagRecords (upstream: string, repo: string, tag: string): TagRecord[] {
      return mesh.tagRecords(upstream, repo, tag).map(r => r.record)
    },

    async close () {
      await agent.close().catch(() => {})
    },
  }
}
