// Who fetches what for the mesh: one node per (upstream, content), chosen without a coordinator.
//
// Every node ranks the same candidates the same way: rendezvous (highest-random-weight) hashing of
// the content key with each candidate's peer id, over itself and the connected peers that fetch from
// that upstream. It needs no shared state beyond membership, and when a node joins or leaves only the
// keys it wins or held move (about 1/N of them), so a membership change rarely moves a running fetch.
// Nodes whose views of membership differ may pick different fetchers now and then: that costs a
// duplicate upstream fetch, never a failed pull, because every delegated fetch falls back to the
// upstream itself.
//
// The wire format of a delegated fetch lives here too, since both the asking side (peer-source.ts)
// and the answering side (http/peer-server.ts) speak it.
import { createHash } from 'node:crypto'
import type { Readable } from 'node:stream'

/** The peer data path answers delegated fetches under this prefix (never forwarded any further). */
export const PEER_FETCH_PATH = '/pullmesh/v1/fetch/'

/** Content type of a delegated fetch's answer: heartbeat spaces, one JSON line, then the bytes. */
export const DELEGATED_CONTENT_TYPE = 'application/vnd.pullmesh.delegated.v1'

/** A fetcher waiting on its upstream sends a space this often, so the asker can tell "slow" from "dead". */
export const HEARTBEAT_MS = 200

/** The longest preamble line accepted. */
const MAX_PREAMBLE = 4096

/**
 * A stable id for an upstream, the same on every node that fetches from the same URL, whatever name
 * each gives it. Announced in hello and inventory; a delegated fetch names its upstream by it.
 */
export function upstreamId (url: string): string {
  return createHash('sha256').update('pullmesh upstream v1\n').update(url.replace(/\/+$/, '').toLowerCase()).digest('hex').slice(0, 16)
}

function weight (key: string, peerId: string): bigint {
  return createHash('sha256').update(key).update('\n').update(peerId).digest().readBigUInt64BE(0)
}

/** The candidate with the highest weight for `key` (ties, impossible in practice, go to the smaller id). */
export function rendezvous (key: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined
  let bestW = -1n
  for (const c of candidates) {
    const w = weight(key, c)
    if (w > bestW || (w === bestW && best !== undefined && c < best)) { best = c; bestW = w }
  }
  return best
}

/** What a delegated fetch announces before its bytes. */
export interface PreambleOk { size: number, start?: number, mediaType?: string, digest?: string, verifiedAt?: number }
export type Preamble = PreambleOk | { error: { code: string, status: number } }

export function encodePreamble (p: Preamble): string {
  return JSON.stringify(p) + '\n'
}

export class PreambleError extends Error {
  override readonly name = 'PreambleError'
  readonly code = 'PM_DELEGATE_PREAMBLE'
}

/** A fetcher went silent (no heartbeat) before it could say what it is sending. */
export class FetcherSilentError extends Error {
  override readonly name = 'FetcherSilentError'
  readonly code = 'PM_FETCHER_SILENT'
}

/**
 * Reads a delegated answer's preamble: leading heartbeat spaces, then one JSON line. Each gap between
 * bytes may last at most `idleMs`. The rest of the body stays in `body` for the caller.
 */
export async function readPreamble (body: Readable, idleMs: number, signal?: AbortSignal): Promise<Preamble> {
  return await new Promise<Preamble>((resolve, reject) => {
    let text = ''
    let timer: NodeJS.Timeout | undefined
    const arm = (): void => {
      if (timer !== undefined) clearTimeout(timer)
      timer = setTimeout(() => done(new FetcherSilentError(`no heartbeat within ${idleMs} ms`)), idleMs)
    }
    const done = (err?: unknown, value?: Preamble): void => {
      if (timer !== undefined) clearTimeout(timer)
      body.off('readable', onReadable)
      body.off('error', onError)
      body.off('end', onEnd)
      signal?.removeEventListener('abort', onAbort)
      if (err !== undefined) reject(err)
      else resolve(value!)
    }
    const onError = (err: unknown): void => done(err)
    const onEnd = (): void => done(new PreambleError('the fetcher ended its answer before saying what it sends'))
    const onAbort = (): void => done(signal!.reason)
    const onReadable = (): void => {
      arm()
      for (;;) {
        const chunk = body.read() as Buffer | null
        if (chunk === null) return
        const nl = chunk.indexOf(10)
        if (nl === -1) {
          text += chunk.toString('utf8')
          if (text.length > MAX_PREAMBLE) { done(new PreambleError('preamble too long')); return }
          continue
        }
        text += chunk.subarray(0, nl).toString('utf8')
        const rest = chunk.subarray(nl + 1)
        if (rest.length > 0) body.unshift(rest)
        let parsed: unknown
        try { parsed = JSON.parse(text.trim()) } catch { done(new PreambleError('preamble is not JSON')); return }
        const p = checkPreamble(parsed)
        if (p === undefined) { done(new PreambleError('preamble does not fit its schema')); return }
        done(undefined, p)
        return
      }
    }
    signal?.addEventListener('abort', onAbort, { once: true })
    body.on('readable', onReadable)
    body.once('error', onError)
    body.once('end', onEnd)
    arm()
  })
}

function checkPreamble (o: unknown): Preamble | undefined {
  if (o === null || typeof o !== 'object') return undefined
  const r = o as Record<string, unknown>
  const int = (v: unknown): boolean => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0
  if (typeof r.error === 'object' && r.error !== null) {
    const e = r.error as Record<string, unknown>
    if (typeof e.code !== 'string' || e.code.length > 64 || !int(e.status)) return undefined
    return { error: { code: e.code, status: e.status as number } }
  }
  if (!int(r.size)) return undefined
  if (r.start !== undefined && (!int(r.start) || (r.start as number) > (r.size as number))) return undefined
  if (r.mediaType !== undefined && (typeof r.mediaType !== 'string' || r.mediaType.length > 255)) return undefined
  if (r.digest !== undefined && (typeof r.digest !== 'string' || r.digest.length > 200)) return undefined
  if (r.verifiedAt !== undefined && !int(r.verifiedAt)) return undefined
  return {
    size: r.size as number,
    ...(r.start !== undefined ? { start: r.start as number } : {}),
    ...(r.mediaType !== undefined ? { mediaType: r.mediaType as string } : {}),
    ...(r.digest !== undefined ? { digest: r.digest as string } : {}),
    ...(r.verifiedAt !== undefined ? { verifiedAt: r.verifiedAt as number } : {}),
  }
}
