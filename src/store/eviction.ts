import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { Digest } from '../oci/digest.js'
import type { BlobInfo, BlobStore } from './types.js'

export interface EvictionInit {
  /** Disk budget for verified content. */
  maxBytes: number
  /** Content not accessed for this long is evicted (counted from the last access, not insertion). */
  maxAgeMs?: number
  /** Eviction for the budget frees down to this fraction of it, so it does not run on every fill. */
  lowWatermark?: number
  /** How often max-age and the budget are checked without a trigger. */
  intervalMs?: number
}

export interface EvictionResult { evicted: number, bytes: number, skippedBusy: number }

export interface Evictor {
  start (): void
  stop (): Promise<void>
  /** Runs one pass now (budget and max-age). Concurrent calls share one pass. */
  run (reason: string): Promise<EvictionResult>
}

/**
 * Keeps the store within its budget: least recently used first, never content that is pinned, being
 * served or being filled. Each eviction is the store's crash-safe delete (index entry, then file),
 * which also announces the removal to the mesh.
 */
export function createEvictor (components: { store: BlobStore, logger: Logger, metrics: Metrics, busy: () => Iterable<Digest>, now?: () => number }, init: EvictionInit): Evictor {
  const { store, metrics } = components
  const log = components.logger.child({ component: 'eviction' })
  const now = components.now ?? Date.now
  const low = Math.floor(init.maxBytes * (init.lowWatermark ?? 0.9))
  let running: Promise<EvictionResult> | undefined
  let timer: NodeJS.Timeout | undefined
  let unsubscribe: (() => void) | undefined
  let stopped = true

  async function pinned (): Promise<Set<Digest>> {
    const out = new Set<Digest>()
    for await (const p of store.listPins()) for (const d of p.digests) out.add(d)
    return out
  }

  async function pass (reason: string): Promise<EvictionResult> {
    const result: EvictionResult = { evicted: 0, bytes: 0, skippedBusy: 0 }
    const keep = await pinned()
    const busy = new Set(components.busy())
    const all: BlobInfo[] = []
    for await (const b of store.listBlobs()) all.push(b)
    all.sort((a, b) => a.lastAccess - b.lastAccess)
    const expiredBefore = init.maxAgeMs !== undefined ? now() - init.maxAgeMs : -Infinity
    let over = store.usage().bytes > init.maxBytes
    for (const b of all) {
      const expired = b.lastAccess < expiredBefore
      if (!expired && !over) {
        if (init.maxAgeMs === undefined) break
        continue
      }
      if (keep.has(b.digest)) continue
      if (busy.has(b.digest) || store.inUse(b.digest)) { result.skippedBusy++; continue }
      if (await store.delete(b.digest)) {
        result.evicted++
        result.bytes += b.size
        metrics.evictions.inc({ reason: expired ? 'max-age' : 'size' })
      }
      if (over && store.usage().bytes <= low) over = false
    }
    if (result.evicted > 0 || result.skippedBusy > 0) {
      log.info({ reason, ...result, storeBytes: store.usage().bytes, maxBytes: init.maxBytes }, 'evicted content')
    }
    if (store.usage().bytes > init.maxBytes) {
      log.warn({ storeBytes: store.usage().bytes, maxBytes: init.maxBytes }, 'over the disk budget: the rest is pinned or in use')
    }
    return result
  }

  async function run (reason: string): Promise<EvictionResult> {
    if (running !== undefined) return await running
    running = pass(reason).finally(() => { running = undefined })
    return await running
  }

  return {
    start () {
      if (!stopped) return
      stopped = false
      unsubscribe = store.subscribe(e => {
        if (e.type === 'added' && store.usage().bytes > init.maxBytes) void run('budget').catch(err => log.error({ err }, 'eviction failed'))
      })
      timer = setInterval(() => { void run('periodic').catch(err => log.error({ err }, 'eviction failed')) }, init.intervalMs ?? 60_000)
      timer.unref()
      void run('start-up').catch(err => log.error({ err }, 'eviction failed'))
    },
    async stop () {
      if (stopped) return
      stopped = true
      unsubscribe?.()
      if (timer !== undefined) clearInterval(timer)
      await running?.catch(() => {})
    },
    run,
  }
}
