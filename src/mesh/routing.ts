// Content routing: who holds a digest. The local peer index answers at once (filled by full inventory
// and gossip); a Kademlia DHT answers for the rest of a mesh too large for every node to index every
// other. Provider records are keyed by the digest's multihash (see digestCid), on our own protocol
// (/pullmesh/kad/1.0.0), so they never mix with the public IPFS DHT. Provide follows the store:
// `added` provides, `removed` stops re-providing (peers drop the record when it expires, and a node
// that asks us meanwhile gets a 404 from the data path and moves on). Re-providing is spread in time.
import { createHash } from 'node:crypto'
import { setMaxListeners } from 'node:events'
import { kadDHT, passthroughMapper, type KadDHT, type SingleKadDHT } from '@libp2p/kad-dht'
import { ping, type Ping } from '@libp2p/ping'
import { CID } from 'multiformats/cid'
import { create as createMultihash } from 'multiformats/hashes/digest'
import type { Libp2p } from 'libp2p'
import type { PeerId, PeerInfo } from '@libp2p/interface'
import type { Logger } from '../logger.js'
import type { Digest } from '../oci/digest.js'
import type { PeerIndex } from './peer-index.js'
import type { HoldingsChange } from './inventory.js'
import type { PeerHolder } from './types.js'

export const DHT_PROTOCOL = '/pullmesh/kad/1.0.0'
const DEFAULT_REPROVIDE_MS = 22 * 3600_000
const DEFAULT_VALIDITY_MS = 48 * 3600_000

/**
 * gossip: full inventory with every connected peer plus gossip announcements (every lookup is local).
 * dht: the DHT finds holders; no inventory exchange and no per-blob gossip (hello, tags and fills still gossip).
 * both: the two at once; the DHT is asked only when the local index knows no holder.
 */
export type RoutingMode = 'gossip' | 'dht' | 'both'
export const ROUTING_MODES: readonly RoutingMode[] = ['gossip', 'dht', 'both']

export interface DhtOptions {
  /** How long a lookup may take before the caller moves on (default 300 ms). */
  lookupMs?: number
  /**
   * Each provided digest is provided again after this, ±25 % (default 22 h, as IPFS does). A provide is a
   * lookup plus up to 20 ADD_PROVIDER messages, so this period sets the idle DHT traffic of a large store.
   */
  reprovideMs?: number
  /**
   * How long a provider record lives at the peers that store it (default 48 h). A removed blob can be named
   * by a record until then: the node asked answers 404 and the next source is tried.
   */
  validityMs?: number
  /** Provides started per second at most (default 20): a large store is provided over a while, never in one burst. */
  providesPerSec?: number
  /** Provides in flight at once (default 4). */
  provideConcurrency?: number
  /** Kademlia query concurrency per path and disjoint paths (default 3 and 3; kad-dht's own default is 10 × 10). */
  alpha?: number
  disjointPaths?: number
}

/**
 * The libp2p services the DHT needs (kad-dht uses ping to check old routing-table contacts). The factories take
 * `any` components: the node's service map has them as optional (mode gossip has none), which kad-dht's own
 * component types do not accept.
 */
export function dhtServices (o: DhtOptions = {}): { dht: (components: any) => KadDHT, ping: (components: any) => Ping } {
  const reprovideMs = o.reprovideMs ?? DEFAULT_REPROVIDE_MS
  const validityMs = o.validityMs ?? (o.reprovideMs === undefined ? DEFAULT_VALIDITY_MS : 2 * reprovideMs)
  return {
    dht: kadDHT({
      protocol: DHT_PROTOCOL,
      logPrefix: 'libp2p:pullmesh-dht',
      datastorePrefix: '/pullmesh-dht',
      metricsPrefix: 'libp2p_pullmesh_dht',
      // Our own mesh (own protocol, often a pnet key): every member is dialable on the addresses it reports,
      // public or private. clientMode false: every node serves records from the start (no AutoNAT here).
      peerInfoMapper: passthroughMapper,
      clientMode: false,
      // A lookup ends at the first answer with a provider; 9 queries in flight find it as fast on a LAN as
      // kad-dht's default 100, at a fraction of the streams.
      alpha: o.alpha ?? 3,
      disjointPaths: o.disjointPaths ?? 3,
      // A node alone answers "nobody" at once instead of waiting for a first peer.
      allowQueryWithZeroPeers: true,
      // Re-providing is ours (spread, see createRouting); kad-dht's reprovider only drops expired records
      // of other peers, checked this often. Its threshold is below our period, so it never re-provides in a burst.
      reprovide: { interval: Math.max(1_000, Math.min(3600_000, Math.floor(validityMs / 4))), validity: validityMs, threshold: Math.max(1, Math.floor((validityMs - reprovideMs * 1.25) / 2)) },
    }),
    ping: ping(),
  }
}

const RAW_CODEC = 0x55
const SHA2_256 = 0x12

/**
 * The DHT key of a digest: a raw CIDv1 of its sha2-256 multihash. kad-dht 16 sends only the multihash
 * and the receiving node decodes it as a CID, which works for a 32-byte sha2-256 multihash (read as a
 * CIDv0) and fails for any other: a sha512 digest is therefore keyed by the sha2-256 of its 64 bytes
 * (finding a sha256 blob with the same key would take a sha256 preimage). Undefined for other algorithms.
 */
export function digestCid (d: Digest): CID | undefined {
  const i = d.indexOf(':')
  const alg = d.slice(0, i)
  const bytes = Buffer.from(d.slice(i + 1), 'hex')
  if (alg === 'sha256' && bytes.length === 32) return CID.createV1(RAW_CODEC, createMultihash(SHA2_256, bytes))
  if (alg === 'sha512' && bytes.length === 64) return CID.createV1(RAW_CODEC, createMultihash(SHA2_256, createHash('sha256').update(bytes).digest()))
  return undefined
}

/** The identify agent string, which carries our data port: a node found in the DHT tells it on connect. */
export function agentFor (dataPort: number): string {
  return `pullmesh data-port/${dataPort}`
}

export function dataPortOfAgent (agent: string | undefined): number | undefined {
  const m = /^pullmesh data-port\/(\d{1,5})$/.exec(agent ?? '')
  const port = m === null ? NaN : Number(m[1])
  return Number.isInteger(port) && port > 0 && port < 65536 ? port : undefined
}

export interface RoutingCounters {
  dhtProvides: number
  dhtProvideFailures: number
  dhtLookups: number
  dhtLookupHits: number
  dhtProvided: number
}

export interface Routing {
  /** Starts providing what we hold, spread over time; idempotent. */
  start (holdings: Iterable<{ digest: Digest }>): void
  stop (): void
  /** A change to our public holdings (from the store). */
  onChange (change: HoldingsChange): void
  /** Providers of `digest` (never us), as holders we can reach on the data path; [] on a miss or at the deadline. */
  find (digest: Digest, o?: { signal?: AbortSignal, deadlineMs?: number }): Promise<PeerHolder[]>
  /** Peers in the DHT's routing table (connected or not). */
  tableSize (): number
  counters (): RoutingCounters
}

type DhtNode = Libp2p<{ dht: KadDHT }>

interface HeapEntry { due: number, digest: Digest }

export function createRouting (components: { logger: Logger, node: DhtNode, index: PeerIndex }, init: DhtOptions & { maxHolders?: number }): Routing {
  const log = components.logger.child({ component: 'routing' })
  const { node, index } = components
  const lookupMs = init.lookupMs ?? 300
  const reprovideMs = init.reprovideMs ?? DEFAULT_REPROVIDE_MS
  const rate = init.providesPerSec ?? 20
  const concurrency = init.provideConcurrency ?? 4
  const maxHolders = init.maxHolders ?? 3
  const retryMs = Math.min(30_000, reprovideMs / 2)
  /** Failed provides in a row per digest: a provide that reached nobody (a routing table still filling up
   * just after a peer connected) is retried after 1 s, 2 s, 4 s ... up to retryMs, not after retryMs at once. */
  const failures = new Map<Digest, number>()
  const counters: RoutingCounters = { dhtProvides: 0, dhtProvideFailures: 0, dhtLookups: 0, dhtLookupHits: 0, dhtProvided: 0 }

  /** digest → when it is due to be provided (again); the heap orders them, stale heap entries are skipped. */
  const due = new Map<Digest, number>()
  /** Digests that came due while we had no peer: provided (spread) once a first peer connects. */
  const waiting = new Set<Digest>()
  const heap: HeapEntry[] = []
  let running = false
  let inFlight = 0
  let timer: NodeJS.Timeout | undefined
  /** When the armed timer fires: an entry due earlier re-arms it. */
  let timerAt = 0
  let stopCtl = new AbortController()
  /** Tokens for starting provides (refilled at `rate`). */
  let tokens = 1
  let tokensAt = Date.now()

  function push (e: HeapEntry): void {
    heap.push(e)
    let i = heap.length - 1
    while (i > 0) {
      const p = (i - 1) >> 1
      if (heap[p]!.due <= e.due) break
      heap[i] = heap[p]!
      i = p
    }
    heap[i] = e
  }

  function pop (): HeapEntry | undefined {
    const top = heap[0]
    const last = heap.pop()
    if (top === undefined || last === undefined || heap.length === 0) return top
    heap[0] = last
    let i = 0
    for (;;) {
      const l = 2 * i + 1
      const r = l + 1
      let m = i
      if (l < heap.length && heap[l]!.due < heap[m]!.due) m = l
      if (r < heap.length && heap[r]!.due < heap[m]!.due) m = r
      if (m === i) break
      const t = heap[i]!
      heap[i] = heap[m]!
      heap[m] = t
      i = m
    }
    return top
  }

  function schedule (digest: Digest, at: number): void {
    due.set(digest, at)
    push({ due: at, digest })
    // The heap holds stale entries of rescheduled digests; rebuild it when they dominate.
    if (heap.length > 2 * due.size + 1024) {
      heap.length = 0
      for (const [d, t] of due) push({ due: t, digest: d })
    }
    if (running) arm()
  }

  const jitter = (ms: number): number => Math.round(ms * (0.75 + Math.random() * 0.5))

  function arm (): void {
    if (!running) return
    while (heap.length > 0 && due.get(heap[0]!.digest) !== heap[0]!.due) pop()
    const next = heap[0]
    if (next === undefined) return
    const now = Date.now()
    const wait = Math.max(inFlight >= concurrency ? 50 : 0, next.due - now, tokens >= 1 ? 0 : Math.ceil(1000 / rate))
    if (timer !== undefined) {
      if (timerAt <= now + wait) return
      clearTimeout(timer)
    }
    timerAt = now + wait
    timer = setTimeout(tick, wait)
    timer.unref()
  }

  function tick (): void {
    timer = undefined
    if (!running) return
    const now = Date.now()
    tokens = Math.min(Math.max(1, rate), tokens + (now - tokensAt) * rate / 1000)
    tokensAt = now
    while (inFlight < concurrency && tokens >= 1) {
      const e = heap[0]
      if (e === undefined || e.due > now) break
      pop()
      if (due.get(e.digest) !== e.due) continue // rescheduled or no longer held
      tokens -= 1
      void provideOne(e.digest)
    }
    arm()
  }

  async function provideOne (digest: Digest): Promise<void> {
    const cid = digestCid(digest)
    if (cid === undefined) { due.delete(digest); return }
    // Alone, a provide stores nothing anywhere: wait for a peer (and check again now and then).
    if (node.getPeers().length === 0) { waiting.add(digest); schedule(digest, Date.now() + jitter(reprovideMs)); return }
    inFlight++
    counters.dhtProvides++
    let ok = false
    try {
      const signal = AbortSignal.any([stopCtl.signal, AbortSignal.timeout(30_000)])
      for await (const ev of node.services.dht.provide(cid, { signal })) {
        if (ev.name === 'PEER_RESPONSE' && ev.messageName === 'ADD_PROVIDER') ok = true
      }
    } catch (err) {
      if (!running) return
      log.debug({ err, digest }, 'DHT provide failed')
    } finally {
      inFlight--
    }
    if (!running || !due.has(digest)) return
    if (ok) counters.dhtProvided++
    else counters.dhtProvideFailures++
    const failed = ok ? 0 : (failures.get(digest) ?? 0) + 1
    if (failed === 0) failures.delete(digest)
    else failures.set(digest, failed)
    schedule(digest, Date.now() + (ok ? jitter(reprovideMs) : jitter(Math.min(retryMs, 1000 * 2 ** (failed - 1)))))
  }

  /** A connected peer's identify agent tells its data port (a peer found in the DHT did not exchange inventory). */
  function onIdentify (evt: CustomEvent<{ peerId: PeerId, agentVersion?: string }>): void {
    const port = dataPortOfAgent(evt.detail.agentVersion)
    if (port !== undefined) index.setDataPort(evt.detail.peerId.toString(), port, Date.now())
  }

  /** The first peer after none: what came due meanwhile is provided now, spread as at start. */
  function onPeerConnect (): void {
    if (waiting.size === 0) return
    const now = Date.now()
    const spreadMs = Math.max(1_000, waiting.size * 1000 / rate)
    for (const d of waiting) if (due.has(d)) schedule(d, now + Math.floor(Math.random() * spreadMs))
    waiting.clear()
  }

  async function waitForDataUrl (peerId: PeerId, signal: AbortSignal): Promise<string | undefined> {
    const id = peerId.toString()
    const known = index.dataUrl(id)
    if (known !== undefined || signal.aborted) return known
    // Identified already (before we listened, or while the index did not know the peer yet)?
    try {
      const agent = (await node.peerStore.get(peerId, { signal })).metadata.get('AgentVersion')
      const port = dataPortOfAgent(agent !== undefined ? Buffer.from(agent).toString() : undefined)
      if (port !== undefined) index.setDataPort(id, port, Date.now())
      if (index.dataUrl(id) !== undefined) return index.dataUrl(id)
    } catch { /* not in the peer store yet: identify will tell */ }
    return await new Promise(resolve => {
      const done = (): void => {
        node.removeEventListener('peer:identify', check)
        signal.removeEventListener('abort', done)
        resolve(index.dataUrl(id))
      }
      const check = (): void => { if (index.dataUrl(id) !== undefined) done() }
      node.addEventListener('peer:identify', check)
      signal.addEventListener('abort', done, { once: true })
      check()
    })
  }

  /** Where a provider's data path listens: known already, or learned by connecting to it (identify). */
  async function reach (p: PeerInfo, signal: AbortSignal): Promise<PeerHolder | undefined> {
    const id = p.id.toString()
    const known = index.dataUrl(id)
    if (known !== undefined) return { peerId: id, dataUrl: known }
    try {
      if (node.getConnections(p.id).length === 0) {
        if (p.multiaddrs.length > 0) await node.peerStore.merge(p.id, { multiaddrs: p.multiaddrs })
        // The data host is the address of this (authenticated) connection, never an address a record claims.
        await node.dial(p.id, { signal })
      }
      const url = await waitForDataUrl(p.id, signal)
      return url !== undefined ? { peerId: id, dataUrl: url } : undefined
    } catch (err) {
      log.debug({ err, peer: id }, 'could not reach a DHT provider')
      return undefined
    }
  }

  return {
    start (holdings) {
      if (running) return
      running = true
      stopCtl = new AbortController()
      setMaxListeners(Infinity, stopCtl.signal)
      node.addEventListener('peer:identify', onIdentify)
      node.addEventListener('peer:connect', onPeerConnect)
      tokens = 1
      tokensAt = Date.now()
      // What we already hold is provided over n / rate seconds at random, never in one burst at start.
      const list = [...holdings]
      const spreadMs = Math.max(1_000, list.length * 1000 / rate)
      const now = Date.now()
      for (const h of list) schedule(h.digest, now + Math.floor(Math.random() * spreadMs))
      arm()
    },

    stop () {
      if (!running) return
      running = false
      stopCtl.abort()
      node.removeEventListener('peer:identify', onIdentify)
      node.removeEventListener('peer:connect', onPeerConnect)
      if (timer !== undefined) { clearTimeout(timer); timer = undefined }
      due.clear()
      failures.clear()
      waiting.clear()
      heap.length = 0
    },

    onChange (change) {
      if (!running) return
      if (change.type === 'added') {
        // Soon (others may be looking for it now), but a burst of adds still goes out at `rate`.
        if (!due.has(change.entry.digest)) schedule(change.entry.digest, Date.now() + Math.floor(Math.random() * 200))
      } else if (change.type === 'removed') {
        due.delete(change.digest)
        failures.delete(change.digest)
        waiting.delete(change.digest)
        const cid = digestCid(change.digest)
        if (cid !== undefined) node.services.dht.cancelReprovide(cid).catch(() => {})
      }
    },

    async find (digest, o = {}) {
      const cid = digestCid(digest)
      if (!running || cid === undefined || node.getPeers().length === 0) return []
      o.signal?.throwIfAborted()
      counters.dhtLookups++
      // One signal ends the query: the deadline, our stop, or the caller's. The answer does not wait for
      // kad-dht to unwind: at the deadline it is whatever was found so far.
      const ctl = new AbortController()
      const end = (): void => ctl.abort()
      const timer = setTimeout(end, o.deadlineMs ?? lookupMs)
      o.signal?.addEventListener('abort', end, { once: true })
      stopCtl.signal.addEventListener('abort', end, { once: true })
      const ended = new Promise<void>(resolve => ctl.signal.addEventListener('abort', () => resolve(), { once: true }))
      const signal = ctl.signal
      const seen = new Set<string>([node.peerId.toString()])
      const out: PeerHolder[] = []
      const work = (async () => {
        for await (const ev of node.services.dht.findProviders(cid, { signal })) {
          if (ev.name !== 'PROVIDER') continue
          const fresh = ev.providers.filter(p => !seen.has(p.id.toString()))
          for (const p of fresh) seen.add(p.id.toString())
          const reached = await Promise.all(fresh.slice(0, maxHolders).map(async p => await reach(p, signal)))
          for (const h of reached) if (h !== undefined && out.length < maxHolders && !signal.aborted) out.push(h)
          // The peers nearest the key hold every record for it: the first answer with a reachable holder is enough.
          if (out.length > 0) break
        }
      })().catch((err: unknown) => { if (!signal.aborted) log.debug({ err, digest }, 'DHT lookup failed') })
      try {
        await Promise.race([work, ended])
      } finally {
        clearTimeout(timer)
        o.signal?.removeEventListener('abort', end)
        stopCtl.signal.removeEventListener('abort', end)
        ctl.abort()
      }
      if (o.signal?.aborted === true) throw o.signal.reason
      if (out.length > 0) counters.dhtLookupHits++
      return out.slice()
    },

    tableSize: () => (node.services.dht as Partial<SingleKadDHT>).routingTable?.size ?? 0,

    counters: () => ({ ...counters }),
  }
}
