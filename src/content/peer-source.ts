import { Agent, request, type Dispatcher } from 'undici'
import { Readable } from 'node:stream'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { Mesh, PeerHolder } from '../mesh/types.js'
import type { Digest } from '../oci/digest.js'
import type { TagRecord } from '../store/types.js'
import type { DelegatedManifest, PeerContent } from './types.js'
import type { FillSource } from './fill.js'
import { AUTH_ERROR_HEADER, AUTH_HEADER, PEER_BLOB_PATH, signRequest } from '../peer-protocol.js'
import { digestOf } from '../oci/digest.js'
import { VerificationError } from '../errors.js'
import { DELEGATED_CONTENT_TYPE, HEARTBEAT_MS, PEER_FETCH_PATH, readPreamble, rendezvous, type Preamble, type PreambleOk } from './delegation.js'

export interface PeerContentInit {
  /** Connect and first-byte deadline for a peer; a dead or slow peer costs at most this. */
  timeoutMs: number
  /** Data-path key derived from the mesh key, when the mesh is private. */
  key?: Buffer
  /** Peers tried per request before the upstream. */
  maxPeers?: number
  /** Largest blob taken from a peer (the disk budget): an unverified claim never fills the disk. */
  maxBytes?: number
  /** A transfer slower than this moves on to the next source (bytesPerSec 0: no minimum). */
  minRate?: { bytesPerSec: number, windowMs: number }
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

/** The fetcher answered a delegated fetch with an error of its own (its upstream failed, or it is busy). */
export class DelegateRefusedError extends Error {
  override readonly name = 'DelegateRefusedError'
  readonly code = 'PM_DELEGATE_REFUSED'
  constructor (message: string, readonly status: number, readonly reason: string) { super(message) }
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
  const minRate = init.minRate !== undefined && init.minRate.bytesPerSec > 0 ? init.minRate : undefined
  const agent = new Agent({
    connect: { timeout: init.timeoutMs },
    headersTimeout: init.timeoutMs,
    // A peer that stalls mid-transfer is dropped; the next source takes over (the fill also enforces a minimum rate).
    bodyTimeout: Math.max(2_000, init.timeoutMs * 4),
    keepAliveTimeout: 30_000,
  })

  /** GET on a peer's data path; the peer deadline covers the response headers, enforced by our own timer. */
  async function send (peer: PeerHolder, pathAndQuery: string, headers: Record<string, string>, signal?: AbortSignal): Promise<Dispatcher.ResponseData> {
    const dataUrl = peer.dataUrl
    // The signature binds the node asked, the method, the path and query, and the range.
    if (init.key !== undefined) headers[AUTH_HEADER] = signRequest(init.key, { target: peer.peerId, method: 'GET', url: pathAndQuery, ...(headers.range !== undefined ? { range: headers.range } : {}) })
    // undici's own timers tick about once a second; the peer deadline is enforced here, to the ms.
    const deadline = new AbortController()
    const timer = setTimeout(() => deadline.abort(new PeerTimeoutError(`peer ${dataUrl} did not answer within ${init.timeoutMs} ms`)), init.timeoutMs)
    try {
      return await request(dataUrl + pathAndQuery, {
        method: 'GET',
        headers,
        dispatcher: agent,
        signal: signal !== undefined ? AbortSignal.any([signal, deadline.signal]) : deadline.signal,
      })
    } finally {
      clearTimeout(timer)
    }
  }

  async function get (peer: PeerHolder, digest: Digest, signal?: AbortSignal, from?: { start: number, size: number }): Promise<{ body: Readable, size: number, start: number } | undefined> {
    const headers: Record<string, string> = {}
    if (from !== undefined && from.start > 0) headers.range = `bytes=${from.start}-${from.size - 1}`
    const res = await send(peer, PEER_BLOB_PATH + digest, headers, signal)
    if (res.statusCode === 404) {
      await res.body.dump().catch(() => {})
      return undefined
    }
    const length = Number(res.headers['content-length'])
    let size = length
    let start = 0
    if (res.statusCode === 206 && from !== undefined) {
      const cr = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(String(res.headers['content-range'] ?? ''))
      if (cr === null || Number(cr[1]) !== from.start || Number(cr[2]) !== from.size - 1 || Number(cr[3]) !== from.size || length !== from.size - from.start) {
        await res.body.dump().catch(() => {})
        throw new PeerProtocolError(`peer ${peer.peerId} answered a range it was not asked for`)
      }
      size = from.size
      start = from.start
    } else if (res.statusCode !== 200 || !Number.isSafeInteger(size) || size < 0) {
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
    return { body: res.body as unknown as Readable, size, start }
  }

  /** A delegated fetch: the fetcher answers at once, sends heartbeats while it waits, then a preamble and the bytes. */
  async function delegated (fetcher: PeerHolder, pathAndQuery: string, headers: Record<string, string>, signal?: AbortSignal): Promise<{ body: Readable, preamble: PreambleOk } | undefined> {
    const res = await send(fetcher, pathAndQuery, headers, signal)
    if (res.statusCode !== 200 || res.headers['content-type'] !== DELEGATED_CONTENT_TYPE) {
      await res.body.dump().catch(() => {})
      if (res.statusCode === 404) return undefined
      if (res.statusCode === 429) throw new DelegateRefusedError(`fetcher ${fetcher.peerId} is busy with our other fetches`, 429, 'BUSY')
      throw new PeerProtocolError(`fetcher ${fetcher.peerId} answered ${res.statusCode}`)
    }
    const body = res.body as unknown as Readable
    body.on('error', () => {})
    let p: Preamble
    try {
      // Heartbeats come every HEARTBEAT_MS; a fetcher silent for the peer timeout (at least 4 beats) is gone.
      p = await readPreamble(body, Math.max(init.timeoutMs, 4 * HEARTBEAT_MS), signal)
    } catch (err) {
      body.destroy()
      throw err
    }
    if ('error' in p) {
      body.destroy()
      throw new DelegateRefusedError(`fetcher ${fetcher.peerId} could not fetch it: ${p.error.code}`, p.error.status, p.error.code)
    }
    return { body, preamble: p }
  }

  function fail (peer: PeerHolder, digest: string, err: unknown, delegate = false): void {
    const code = (err as { code?: string }).code ?? (err as Error).name
    // A fetcher whose own upstream failed, or that was busy, did nothing wrong.
    if (err instanceof DelegateRefusedError) {
      metrics.peerErrors.inc({ reason: 'delegate-refused' })
      log.info({ peer: peer.peerId, digest, reason: err.reason }, 'the fetcher could not fetch it; trying the next source')
      return
    }
    metrics.peerErrors.inc({ reason: code === 'PM_VERIFICATION_FAILED' ? 'wrong-bytes' : code === 'PM_TRANSFER_TOO_SLOW' ? 'too-slow' : code === 'PM_PEER_TIMEOUT' || code === 'PM_FETCHER_SILENT' ? 'timeout' : 'fetch-failed' })
    // A fetcher that is slow to answer (a busy or just-started node) did nothing wrong: we fall back for
    // this fetch, and do not mark it down for the next ones. Wrong bytes, trickling and errors do count.
    if (!(delegate && (code === 'PM_PEER_TIMEOUT' || code === 'PM_FETCHER_SILENT'))) mesh.report(peer.peerId, 'bad')
    log.warn({ peer: peer.peerId, digest, err: code }, 'peer failed; trying the next source')
  }

  function holderSource (peer: PeerHolder, digest: Digest, filling: boolean): FillSource {
    return {
      label: `peer:${peer.peerId}`,
      kind: 'peer',
      peer: peer.peerId,
      streamable: true,
      resumable: true,
      ...(minRate !== undefined ? { minRate } : {}),
      open: async (signal, from) => await get(peer, digest, signal, from),
      onFailure: (err) => fail(peer, digest, err),
      // A holder that announced the digest and then has not got it is penalised (a filler may just have finished or failed).
      onMissing: () => { if (!filling) { metrics.peerErrors.inc({ reason: 'missing' }); mesh.report(peer.peerId, 'missing') } },
      onSuccess: () => mesh.report(peer.peerId, 'good'),
      onBytes: (n) => metrics.peerBytes.inc({ direction: 'in' }, n),
    }
  }

  /**
   * A cold miss that no peer in the local index holds: the mesh's content routing (the DHT) is asked for
   * holders, for at most its lookup deadline, and they are tried in turn. A provider record outlives a
   * removal until it expires, so a holder that answers 404 is skipped without a penalty.
   */
  function routedSource (digest: Digest): FillSource {
    let found: PeerHolder[] | undefined
    let current: PeerHolder | undefined
    return {
      label: 'peer:routed',
      kind: 'peer',
      streamable: true,
      resumable: true,
      ...(minRate !== undefined ? { minRate } : {}),
      open: async (signal, from) => {
        found ??= (await mesh.findHolders(digest, { signal })).slice(0, maxPeers)
        for (;;) {
          current = found.shift()
          if (current === undefined) return undefined
          try {
            const r = await get(current, digest, signal, from)
            if (r !== undefined) return r
            metrics.peerErrors.inc({ reason: 'missing' })
          } catch (err) {
            if (signal.aborted) throw err
            fail(current, digest, err)
          }
        }
      },
      onFailure: (err) => { if (current !== undefined) fail(current, digest, err) },
      onSuccess: () => { if (current !== undefined) mesh.report(current.peerId, 'good') },
      onBytes: (n) => metrics.peerBytes.inc({ direction: 'in' }, n),
    }
  }

  return {
    blobSources (digest: Digest): FillSource[] {
      const holders = mesh.holders(digest).slice(0, maxPeers)
      const held = new Set(holders.map(h => h.peerId))
      const fillers = mesh.fillers(digest).filter(f => !held.has(f.peerId)).slice(0, maxPeers)
      if (holders.length === 0 && fillers.length === 0) return [routedSource(digest)]
      return [...holders.map(p => holderSource(p, digest, false)), ...fillers.map(p => holderSource(p, digest, true))]
    },

    delegateBlob (fetcher: PeerHolder, upstream: string, repo: string, digest: Digest): FillSource {
      const q = `?u=${encodeURIComponent(upstream)}&r=${encodeURIComponent(repo)}`
      return {
        label: `delegate:${fetcher.peerId}`,
        kind: 'delegate',
        peer: fetcher.peerId,
        streamable: true,
        resumable: true,
        ...(minRate !== undefined ? { minRate } : {}),
        open: async (signal, from) => {
          metrics.delegations.inc({ kind: 'blob' })
          const headers: Record<string, string> = {}
          if (from !== undefined && from.start > 0) headers.range = `bytes=${from.start}-`
          const r = await delegated(fetcher, `${PEER_FETCH_PATH}blob/${digest}${q}`, headers, signal)
          if (r === undefined) return undefined
          const { size, start = 0 } = r.preamble
          if ((init.maxBytes !== undefined && size > init.maxBytes) || (from !== undefined && start !== 0 && start !== from.start)) {
            r.body.destroy()
            throw new PeerProtocolError(`fetcher ${fetcher.peerId} offers ${size} bytes from ${start}`)
          }
          return { body: r.body, size, start }
        },
        onFailure: (err) => { metrics.delegationFailures.inc({ kind: 'blob' }); fail(fetcher, digest, err, true) },
        onSuccess: () => mesh.report(fetcher.peerId, 'good'),
        onBytes: (n) => metrics.peerBytes.inc({ direction: 'in' }, n),
      }
    },

    async delegateManifest (fetcher: PeerHolder, upstream: string, repo: string, reference: string, maxBytes: number, signal?: AbortSignal): Promise<DelegatedManifest | undefined> {
      metrics.delegations.inc({ kind: 'manifest' })
      const q = `?u=${encodeURIComponent(upstream)}&r=${encodeURIComponent(repo)}`
      try {
        const r = await delegated(fetcher, `${PEER_FETCH_PATH}manifest/${encodeURIComponent(reference)}${q}`, {}, signal)
        if (r === undefined) return undefined
        const { size, mediaType, digest, verifiedAt } = r.preamble
        if (size > maxBytes || mediaType === undefined || digest === undefined) {
          r.body.destroy()
          throw new PeerProtocolError(`fetcher ${fetcher.peerId} sent a manifest preamble without its type or digest, or too large`)
        }
        const chunks: Buffer[] = []
        let n = 0
        for await (const c of r.body) {
          n += (c as Buffer).length
          if (n > size) { r.body.destroy(); throw new PeerProtocolError('manifest body longer than announced') }
          chunks.push(c as Buffer)
        }
        if (n !== size) throw new PeerProtocolError('manifest body shorter than announced')
        metrics.peerBytes.inc({ direction: 'in' }, n)
        return { body: Buffer.concat(chunks), mediaType, digest, ...(verifiedAt !== undefined ? { verifiedAt } : {}) }
      } catch (err) {
        if (signal?.aborted === true) throw err
        metrics.delegationFailures.inc({ kind: 'manifest' })
        fail(fetcher, reference, err, true)
        return undefined
      }
    },

    fetcherFor: (upstream: string, key: string) => {
      const self = mesh.peerId()
      if (self === '') return undefined
      const members = mesh.members().filter(m => m.upstreams.includes(upstream))
      const id = rendezvous(`${upstream}\n${key}`, [self, ...members.map(m => m.peerId)])
      if (id === undefined || id === self) return 'self'
      return members.find(m => m.peerId === id)
    },

    announceFilling: (digest, size) => mesh.announceFilling(digest, size),
    fillingEnded: (digest, ok) => mesh.fillingEnded(digest, ok),

    async fetchSmall (digest: Digest, maxBytes: number, signal?: AbortSignal): Promise<Buffer | undefined> {
      // The local index first; the mesh's content routing (bounded by its deadline) when it knows nobody.
      for (const peer of (await mesh.findHolders(digest, signal !== undefined ? { signal } : {})).slice(0, maxPeers)) {
        try {
          const r = await get(peer, digest, signal)
          if (r === undefined) { mesh.report(peer.peerId, 'missing'); continue }
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
