// Inventory: what this node holds (LocalHoldings, with a change journal), and the request/response
// exchange that tells a peer about it (/pullmesh/inventory/1.0.0). A refresh sends only what changed
// since the generation the requester last applied (a delta), or one small frame when nothing did.
import { setTimeout as sleep } from 'node:timers/promises'
import type { Libp2p } from 'libp2p'
import type { Connection, PeerId, Stream } from '@libp2p/interface'
import type { Logger } from '../logger.js'
import type { StoreEvent } from '../store/types.js'
import type { Digest } from '../oci/digest.js'
import type { PeerIndex } from './peer-index.js'
import {
  INVENTORY_PROTOCOL, MAX_FRAME_BYTES, FRAME_ENTRIES, LineSplitter, decodeFrame,
  frameReq, frameInv, frameBlobs, frameTags, frameEnd, frameGone,
  type BlobEntry, type TagEntry, type TagName,
} from './messages.js'

export const MAX_INVENTORY_ENTRIES = 100_000
const MAX_INVENTORY_BYTES = 64 * 1024 * 1024
const INVENTORY_TIMEOUT_MS = 30_000
/** How long a requester may take to send its one-line inventory request. */
const INVENTORY_REQUEST_TIMEOUT_MS = 5_000
const CONNECT_RETRY_DELAYS = [500, 2_000, 5_000]

export class InventoryError extends Error {
  override readonly name = 'InventoryError'
  constructor (readonly code: string, message: string) { super(message) }
}

const tagKey = (t: TagName): string => `${t.upstream}\u0000${t.repo}\u0000${t.tag}`

/** A change to this node's public holdings, to be announced. */
export type HoldingsChange =
  | { type: 'added', entry: BlobEntry }
  | { type: 'removed', digest: Digest }
  | { type: 'tag', entry: TagEntry }

export interface HoldingsDelta { blobs: BlobEntry[], tags: TagEntry[], goneBlobs: Digest[], goneTags: TagName[] }

/**
 * This node's public holdings (never private content), kept from the store's events, with a
 * generation that changes only when what a peer would index changes: a tag revalidated to the same
 * digest, or a blob added again, changes nothing. Removals are remembered (up to `maxGone`) so that a
 * delta can say what is gone; a requester older than the oldest remembered removal gets everything.
 */
export class LocalHoldings {
  gen = 0
  private readonly blobs = new Map<Digest, { size: number, mediaType: string, gen: number }>()
  private readonly tags = new Map<string, { entry: TagEntry, gen: number }>()
  private readonly gone = new Map<string, { gen: number, blob?: Digest, tag?: TagName }>()
  private floor = 0
  private loading: Set<string> | undefined

  constructor (private readonly maxGone = 20_000) {}

  /** Between beginLoad and endLoad, entries listed from the store (load*) never undo a removal seen meanwhile. */
  beginLoad (): void { this.loading = new Set() }
  endLoad (): void { this.loading = undefined }

  loadBlob (e: BlobEntry): void {
    if (this.loading?.has(`b${e.digest}`) === true || this.blobs.has(e.digest)) return
    this.blobs.set(e.digest, { size: e.size, mediaType: e.mediaType, gen: this.gen })
  }

  loadTag (e: TagEntry): void {
    const k = tagKey(e)
    if (this.loading?.has(`t${k}`) === true || this.tags.has(k)) return
    this.tags.set(k, { entry: e, gen: this.gen })
  }

  hasBlob (d: Digest): boolean { return this.blobs.has(d) }
  get size (): { blobs: number, tags: number } { return { blobs: this.blobs.size, tags: this.tags.size } }

  /** Applies a store event; returns what to announce, or undefined when peers need not hear of it. */
  apply (e: StoreEvent): HoldingsChange | undefined {
    switch (e.type) {
      case 'added': {
        if (e.info.private) return undefined // pulled with credentials: never announced
        const old = this.blobs.get(e.info.digest)
        if (old !== undefined && old.size === e.info.size && old.mediaType === e.info.mediaType) return undefined
        const gen = ++this.gen
        this.blobs.set(e.info.digest, { size: e.info.size, mediaType: e.info.mediaType, gen })
        this.gone.delete(`b${e.info.digest}`)
        return { type: 'added', entry: { digest: e.info.digest, size: e.info.size, mediaType: e.info.mediaType } }
      }
      case 'removed': {
        this.loading?.add(`b${e.digest}`)
        if (!this.blobs.delete(e.digest)) return undefined // private, or unknown: never announced
        this.markGone(`b${e.digest}`, { blob: e.digest })
        return { type: 'removed', digest: e.digest }
      }
      case 'tag': {
        const name = { upstream: e.upstream, repo: e.repo, tag: e.tag }
        const k = tagKey(name)
        const old = this.tags.get(k)
        if (e.record.private) {
          this.loading?.add(`t${k}`)
          // now private: peers keep the public record they have until it expires; a delta drops it
          if (old !== undefined) { this.tags.delete(k); this.markGone(`t${k}`, { tag: name }) }
          return undefined
        }
        const { digest, mediaType, size, verifiedAt } = e.record
        const entry: TagEntry = { ...name, record: { digest, mediaType, size, verifiedAt } }
        if (old !== undefined && old.entry.record.digest === digest && old.entry.record.mediaType === mediaType && old.entry.record.size === size) {
          // A revalidation: the same content, confirmed again. Nothing a peer would act on has changed.
          old.entry = entry
          return undefined
        }
        const gen = ++this.gen
        this.tags.set(k, { entry, gen })
        this.gone.delete(`t${k}`)
        return { type: 'tag', entry }
      }
    }
  }

  private markGone (key: string, what: { blob?: Digest, tag?: TagName }): void {
    const gen = ++this.gen
    this.gone.delete(key)
    this.gone.set(key, { gen, ...what })
    while (this.gone.size > this.maxGone) {
      const oldest = this.gone.entries().next()
      if (oldest.done === true) break
      this.gone.delete(oldest.value[0])
      this.floor = Math.max(this.floor, oldest.value[1].gen)
    }
  }

  * listBlobs (): Iterable<BlobEntry> {
    for (const [digest, b] of this.blobs) yield { digest, size: b.size, mediaType: b.mediaType }
  }

  * listTags (): Iterable<TagEntry> {
    for (const t of this.tags.values()) yield t.entry
  }

  /** What changed after generation `since`, or undefined if that is no longer known (then send everything). */
  changedSince (since: number): HoldingsDelta | undefined {
    if (since < this.floor || since > this.gen) return undefined
    const out: HoldingsDelta = { blobs: [], tags: [], goneBlobs: [], goneTags: [] }
    for (const [digest, b] of this.blobs) if (b.gen > since) out.blobs.push({ digest, size: b.size, mediaType: b.mediaType })
    for (const t of this.tags.values()) if (t.gen > since) out.tags.push(t.entry)
    for (const g of this.gone.values()) {
      if (g.gen <= since) continue
      if (g.blob !== undefined) out.goneBlobs.push(g.blob)
      if (g.tag !== undefined) out.goneTags.push(g.tag)
    }
    return out
  }
}

export interface InventoryCounters {
  inventoryFetches: number
  inventoryFull: number
  inventoryDelta: number
  inventoryUnchanged: number
  inventoryFailures: number
  inventoryServed: number
  /** Entries (blobs, tags and removals) we sent in inventory responses. */
  inventoryEntriesSent: number
  /** Entries (blobs, tags and removals) we received in inventory responses. */
  inventoryEntriesReceived: number
  /** Fetches that waited for a slot (outgoing fetches are bounded), and the most that ran at once. */
  inventoryFetchesQueued: number
  inventoryFetchesPeak: number
}

type InventoryNode = Pick<Libp2p, 'dialProtocol' | 'getConnections'>

export interface InventoryComponents {
  logger: Logger
  holdings: LocalHoldings
  index: PeerIndex
  /** The running libp2p node, or undefined while stopped. */
  node: () => InventoryNode | undefined
}

export interface InventoryInit {
  dataPort: number
  /** Ids of the upstreams this node fetches for the mesh, sent in the first frame. */
  upstreams?: string[]
  /** This process's epoch (changes across restarts); with `holdings.gen` it names an inventory. */
  epoch: string
  /** Entries a peer announced live this long unless refreshed; a delta is asked for only within half of it. */
  entryTtlMs: number
  maxConcurrentResponses?: number
  maxConcurrentFetches?: number
}

export interface Inventory {
  /** The protocol handler (serves our holdings). */
  serve: (stream: Stream, connection: Connection) => Promise<void>
  /** Asks a peer for what changed and applies it to the index. Returns false on failure. */
  refresh: (peerId: PeerId) => Promise<boolean>
  /** On connect: fetch, retrying a few times while the peer stays connected. */
  onConnect: (peerId: PeerId) => Promise<void>
  /** The peer withdrew (or was forgotten): its next inventory is a complete one. */
  forgetPeer: (peerId: string) => void
  /** Drops exchange state of peers the index no longer knows. */
  expire: () => void
  counters: () => InventoryCounters
  start: () => void
  stop: () => Promise<void>
}

const toBytes = (chunk: Uint8Array | { subarray: () => Uint8Array }): Uint8Array => chunk instanceof Uint8Array ? chunk : chunk.subarray()

async function send (stream: Stream, buf: Uint8Array, signal: AbortSignal): Promise<void> {
  if (!stream.send(buf)) await stream.onDrain({ signal })
}

export function createInventory (components: InventoryComponents, init: InventoryInit): Inventory {
  const log = components.logger
  const { holdings, index } = components
  const maxResponses = init.maxConcurrentResponses ?? 8
  const maxFetches = init.maxConcurrentFetches ?? 4
  const counters: InventoryCounters = {
    inventoryFetches: 0, inventoryFull: 0, inventoryDelta: 0, inventoryUnchanged: 0, inventoryFailures: 0, inventoryServed: 0,
    inventoryEntriesSent: 0, inventoryEntriesReceived: 0, inventoryFetchesQueued: 0, inventoryFetchesPeak: 0,
  }
  let running = false
  let stopCtl = new AbortController()
  /** Per peer: the epoch/gen of its last inventory we applied, and when. */
  const lastInventory = new Map<string, { epoch: string, gen: number, at: number }>()
  const inFlight = new Map<string, Promise<boolean>>()
  let responses = 0
  /** Peers we are sending an inventory to right now: one response per peer at a time. */
  const servingTo = new Set<string>()
  let fetches = 0
  const waiting: Array<() => void> = []

  // ---- serving ----

  async function serve (stream: Stream, connection: Connection): Promise<void> {
    const requester = connection.remotePeer.toString()
    if (!running || responses >= maxResponses || servingTo.has(requester)) {
      stream.abort(new InventoryError('BUSY', 'too many inventory requests'))
      return
    }
    servingTo.add(requester)
    responses++
    const signal = AbortSignal.any([stopCtl.signal, AbortSignal.timeout(INVENTORY_TIMEOUT_MS)])
    const onAbort = (): void => { stream.abort(new InventoryError('ABORTED', 'inventory response aborted')) }
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      // The request is one line; the requester half-closes after sending it, within a short deadline
      // (a peer that never finishes its request must not hold a response slot for long).
      const splitter = new LineSplitter(4096)
      let reqLine: Uint8Array | undefined
      const reqTimer = setTimeout(() => { stream.abort(new InventoryError('ABORTED', 'inventory request not sent in time')) }, INVENTORY_REQUEST_TIMEOUT_MS)
      try {
        for await (const chunk of stream) {
          const lines = splitter.push(toBytes(chunk))
          if (reqLine === undefined && lines[0] !== undefined) reqLine = lines[0]
        }
      } finally {
        clearTimeout(reqTimer)
      }
      const req = reqLine === undefined ? undefined : decodeFrame(reqLine)
      const last = req?.ok === true && req.value.t === 'req' ? req.value : undefined
      // Snapshot synchronously: the journal cannot change between here and the first await.
      const gen = holdings.gen
      const delta = last?.delta === true && last.epoch === init.epoch && last.gen !== undefined && last.gen !== gen ? holdings.changedSince(last.gen) : undefined
      await send(stream, frameInv(init.dataPort, init.epoch, gen, init.upstreams ?? []), signal)
      if (last?.epoch === init.epoch && last.gen === gen) {
        await send(stream, frameEnd(0, 0, true), signal)
      } else {
        // A complete inventory is read from the live maps as it is sent: an entry that changes meanwhile
        // has a generation above `gen`, so the requester's next delta carries it again.
        let blobs = 0
        let tags = 0
        let batch: BlobEntry[] = []
        for (const b of delta !== undefined ? delta.blobs : holdings.listBlobs()) {
          if (blobs >= MAX_INVENTORY_ENTRIES) break
          batch.push(b)
          blobs++
          if (batch.length >= FRAME_ENTRIES) { await send(stream, frameBlobs(batch), signal); batch = [] }
        }
        if (batch.length > 0) await send(stream, frameBlobs(batch), signal)
        let tbatch: TagEntry[] = []
        for (const t of delta !== undefined ? delta.tags : holdings.listTags()) {
          if (blobs + tags >= MAX_INVENTORY_ENTRIES) break
          tbatch.push(t)
          tags++
          if (tbatch.length >= FRAME_ENTRIES) { await send(stream, frameTags(tbatch), signal); tbatch = [] }
        }
        if (tbatch.length > 0) await send(stream, frameTags(tbatch), signal)
        let gone = 0
        if (delta !== undefined) {
          const gb = delta.goneBlobs
          const gt = delta.goneTags
          for (let i = 0, j = 0; i < gb.length || j < gt.length; i += FRAME_ENTRIES, j += FRAME_ENTRIES) {
            await send(stream, frameGone(gb.slice(i, i + FRAME_ENTRIES), gt.slice(j, j + FRAME_ENTRIES)), signal)
          }
          gone = gb.length + gt.length
        }
        await send(stream, frameEnd(blobs, tags, false, delta !== undefined ? { gone } : undefined), signal)
        counters.inventoryEntriesSent += blobs + tags + gone
      }
      await stream.close({ signal })
      counters.inventoryServed++
    } catch (err) {
      log.debug({ err, peer: requester }, 'inventory response failed')
      stream.abort(err instanceof Error ? err : new Error(String(err)))
    } finally {
      signal.removeEventListener('abort', onAbort)
      responses--
      servingTo.delete(requester)
    }
  }

  // ---- fetching ----

  async function acquire (): Promise<void> {
    if (fetches < maxFetches) { fetches++; counters.inventoryFetchesPeak = Math.max(counters.inventoryFetchesPeak, fetches); return }
    counters.inventoryFetchesQueued++
    await new Promise<void>(resolve => waiting.push(resolve))
    if (!running) throw new InventoryError('STOPPED', 'mesh is not running')
  }

  function release (): void {
    const next = waiting.shift()
    if (next !== undefined) next() // the slot passes on
    else fetches--
  }

  function refresh (peerId: PeerId): Promise<boolean> {
    const id = peerId.toString()
    const existing = inFlight.get(id)
    if (existing !== undefined) return existing
    const p = (async () => {
      await acquire()
      try {
        await fetchInventory(peerId)
      } finally {
        release()
      }
    })().then(() => true, (err: unknown) => {
      counters.inventoryFailures++
      if (running) log.debug({ err, peer: id }, 'inventory fetch failed')
      return false
    }).finally(() => inFlight.delete(id))
    inFlight.set(id, p)
    return p
  }

  async function fetchInventory (peerId: PeerId): Promise<void> {
    const n = components.node()
    if (n === undefined || !running) throw new InventoryError('STOPPED', 'mesh is not running')
    if (n.getConnections(peerId).length === 0) throw new InventoryError('GONE', 'peer disconnected')
    const id = peerId.toString()
    counters.inventoryFetches++
    const t0 = Date.now()
    const signal = AbortSignal.any([stopCtl.signal, AbortSignal.timeout(INVENTORY_TIMEOUT_MS)])
    const stream = await n.dialProtocol(peerId, INVENTORY_PROTOCOL, { signal })
    const onAbort = (): void => { stream.abort(new InventoryError('ABORTED', 'inventory request aborted')) }
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      const prev = lastInventory.get(id)
      const reusable = prev !== undefined && index.has(id) && t0 - prev.at < init.entryTtlMs / 2
      await send(stream, frameReq(reusable ? { epoch: prev.epoch, gen: prev.gen } : undefined, true), signal)
      await stream.close({ signal })

      const splitter = new LineSplitter(MAX_FRAME_BYTES)
      let head: { dataPort: number, epoch: string, gen: number, upstreams?: string[] } | undefined
      let end: { blobs: number, tags: number, same: boolean, delta?: boolean, gone?: number } | undefined
      const blobs: BlobEntry[] = []
      const tags: TagEntry[] = []
      const goneBlobs: Digest[] = []
      const goneTags: TagName[] = []
      let bytes = 0
      for await (const chunk of stream) {
        const buf = toBytes(chunk)
        bytes += buf.byteLength
        if (bytes > MAX_INVENTORY_BYTES) throw new InventoryError('TOO_LARGE', 'inventory too large')
        for (const line of splitter.push(buf)) {
          const r = decodeFrame(line)
          if (!r.ok) throw new InventoryError('BAD_FRAME', `bad inventory frame: ${r.reason}`)
          const f = r.value
          if (end !== undefined) throw new InventoryError('BAD_FRAME', 'frame after end')
          if (head === undefined && f.t !== 'inv') throw new InventoryError('BAD_FRAME', 'inventory must start with inv')
          switch (f.t) {
            case 'inv': head = f; break
            case 'blobs': blobs.push(...f.blobs); break
            case 'tags': tags.push(...f.tags); break
            case 'gone': goneBlobs.push(...f.blobs); goneTags.push(...f.tags); break
            case 'end': end = f; break
            case 'req': throw new InventoryError('BAD_FRAME', 'unexpected req')
          }
          if (blobs.length + tags.length + goneBlobs.length + goneTags.length > MAX_INVENTORY_ENTRIES) throw new InventoryError('TOO_LARGE', 'too many inventory entries')
        }
      }
      if (head === undefined || end === undefined || splitter.hasPartial) throw new InventoryError('TRUNCATED', 'inventory ended early')
      if (!running) return
      const now = Date.now()
      index.setDataPort(id, head.dataPort, now)
      if (head.upstreams !== undefined) index.setUpstreams(id, head.upstreams, now)
      if (end.same) {
        index.refreshAll(id, now)
        counters.inventoryUnchanged++
      } else {
        if (end.blobs !== blobs.length || end.tags !== tags.length || (end.gone ?? 0) !== goneBlobs.length + goneTags.length) {
          throw new InventoryError('TRUNCATED', 'inventory counts do not match')
        }
        if (end.delta === true) {
          // A delta is only valid against what we asked for.
          if (!reusable || head.epoch !== prev.epoch) throw new InventoryError('BAD_FRAME', 'unrequested delta')
          index.applyDelta(id, blobs, tags, goneBlobs, goneTags, t0, now)
          counters.inventoryDelta++
        } else {
          if (goneBlobs.length + goneTags.length > 0) throw new InventoryError('BAD_FRAME', 'removals in a complete inventory')
          index.replaceInventory(id, blobs, tags, t0, now)
          counters.inventoryFull++
        }
        counters.inventoryEntriesReceived += blobs.length + tags.length + goneBlobs.length + goneTags.length
      }
      lastInventory.set(id, { epoch: head.epoch, gen: head.gen, at: now })
      log.debug({ peer: id, blobs: blobs.length, tags: tags.length, gone: goneBlobs.length + goneTags.length, same: end.same, delta: end.delta === true, ms: now - t0 }, 'inventory received')
    } catch (err) {
      // Leaving the loop only drops our listeners: abort, or the stream (and its slot) stays open.
      stream.abort(err instanceof Error ? err : new Error(String(err)))
      throw err
    } finally {
      signal.removeEventListener('abort', onAbort)
    }
  }

  async function onConnect (peerId: PeerId): Promise<void> {
    if (await refresh(peerId)) return
    for (const delay of CONNECT_RETRY_DELAYS) {
      try {
        await sleep(delay, undefined, { signal: stopCtl.signal })
      } catch {
        return // stopping
      }
      const n = components.node()
      if (!running || n === undefined || n.getConnections(peerId).length === 0) return
      if (await refresh(peerId)) return
    }
  }

  return {
    serve,
    refresh,
    onConnect,
    forgetPeer (peerId) { lastInventory.delete(peerId) },
    expire () { for (const id of lastInventory.keys()) if (!index.has(id)) lastInventory.delete(id) },
    counters: () => ({ ...counters }),
    start () {
      if (running) return
      stopCtl = new AbortController()
      running = true
    },
    async stop () {
      if (!running) return
      running = false
      stopCtl.abort()
      for (const w of waiting.splice(0)) w()
      await Promise.allSettled([...inFlight.values()])
    },
  }
}
