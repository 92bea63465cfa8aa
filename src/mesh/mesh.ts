// The mesh control plane: a libp2p node that announces what our store holds (announce.ts: gossipsub)
// and learns what peers hold (announce.ts + inventory.ts: a request/response on connect). This file
// wires them to libp2p and keeps the connections. Bytes move elsewhere (HTTP).
import '../polyfills.js'
import { setMaxListeners } from 'node:events'
import { createLibp2p, type Libp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify, type Identify } from '@libp2p/identify'
import { preSharedKey, generateKey } from '@libp2p/pnet'
import { gossipsub, StrictSign, type GossipSub } from '@libp2p/gossipsub'
import { multiaddr } from '@multiformats/multiaddr'
import type { Connection, PeerId } from '@libp2p/interface'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { BlobStore, StoreEvent } from '../store/types.js'
import type { Digest } from '../oci/digest.js'
import { loadOrCreatePeerKey } from './peer-key.js'
import { PeerIndex } from './peer-index.js'
import { ANNOUNCE_TOPIC, INVENTORY_PROTOCOL, MAX_GOSSIP_BYTES, encodeFilling, encodeUnfilling } from './messages.js'
import { createDnsDiscovery, type DnsDiscovery } from './dns-discovery.js'
import { createMembership, type Membership } from './membership.js'
import { createAnnouncer, gossipScoring, nextEpoch, type AnnounceCounters, type Announcer } from './announce.js'
import { createInventory, LocalHoldings, type Inventory, type InventoryCounters } from './inventory.js'
import { agentFor, createRouting, dhtServices, type Routing, type RoutingCounters } from './routing.js'
import type { KadDHT } from '@libp2p/kad-dht'
import type { Mesh, MeshInit, MeshStatus, PeerHolder, PeerTagRecord, PeerOutcome } from './types.js'

export interface MeshComponents { logger: Logger, metrics: Metrics, store: BlobStore }

/** Counters for tests and diagnostics. */
export interface MeshCounters extends AnnounceCounters, InventoryCounters, Partial<RoutingCounters> {
  duplicateConnectionsClosed: number
  /** Index entries evicted, and refused, because the index budget was full; peers evicted from full slots. */
  indexEvicted: number
  indexRefused: number
  indexPeersEvicted: number
  /** Accounted bytes the peer index holds, and its budget. */
  indexBytes: number
  indexMaxBytes: number
}

export type MeshNode = Mesh & { counters (): MeshCounters }

/** A peer learned by peer exchange is dialed at most this often, and this many such dials at once. */
const PEX_RETRY_MS = 60_000
const PEX_MAX_DIALS = 8
const HELLO_DEBOUNCE_MS = 1_500
const HELLO_MIN_GAP_MS = 10_000
/** How long a `filling` record lives; a fill that runs longer is announced again. */
const FILLING_TTL_MS = 2 * 60_000

/** The pnet pre-shared key file contents (for `pullmesh keygen`). */
export function generateMeshKey (): Uint8Array {
  const key = new Uint8Array(95)
  generateKey(key)
  return key
}

type Node = Libp2p<{ identify: Identify, pubsub: GossipSub, dht?: KadDHT }>

/** The IP address in a connection's remote multiaddr, if it has one. */
function hostOf (conn: Connection): string | undefined {
  for (const c of conn.remoteAddr.getComponents()) {
    if ((c.name === 'ip4' || c.name === 'ip6') && c.value !== undefined) return c.value
  }
  return undefined
}

export function createMesh (components: MeshComponents, init: MeshInit): MeshNode {
  const log = components.logger.child({ component: 'mesh' })
  const { metrics, store } = components
  const peerTtlMs = init.peerTtlMs ?? 30_000
  const inventoryIntervalMs = init.inventoryIntervalMs ?? 60_000
  const entryTtlMs = Math.max(3 * inventoryIntervalMs, peerTtlMs)
  const index = new PeerIndex({ peerTtlMs, entryTtlMs, ...(init.indexBudgetBytes !== undefined ? { maxIndexBytes: init.indexBudgetBytes } : {}) })
  /** Our public holdings, rebuilt from the store at each start. */
  let holdings = new LocalHoldings()

  let node: Node | undefined
  let membership: Membership | undefined
  let selfId = ''
  let state: 'stopped' | 'starting' | 'started' | 'stopping' = 'stopped'
  let starting: Promise<void> | undefined
  let stopping: Promise<void> | undefined
  let stopCtl = new AbortController()
  let unsubscribeStore: (() => void) | undefined
  const timers: NodeJS.Timeout[] = []
  /** Created at start (they carry this run's epoch). */
  let announce: Announcer | undefined
  let inventory: Inventory | undefined
  /** The DHT side of content routing (routing 'dht' or 'both'); see ./routing.ts. */
  let routing: Routing | undefined
  const mode = init.routing ?? 'both'
  /** Full inventory and per-blob gossip: off when the DHT alone carries blob routing. */
  const fullInventory = mode !== 'dht'

  let dnsDiscovery: DnsDiscovery | undefined
  const pexTried = new Map<string, number>()
  let pexDialing = 0
  let helloTimer: NodeJS.Timeout | undefined
  let lastHelloAt = 0
  const upstreamIds = init.upstreams ?? []
  /** Fills of ours that peers were told about (digest → size, when last announced). */
  const fillingNow = new Map<Digest, { size: number, at: number }>()
  const updatePeerGauge = (): void => { if (node !== undefined) metrics.peersConnected.set(node.getPeers().length) }
  const inventoryOnConnect = async (peerId: PeerId): Promise<void> => { if (fullInventory) await inventory?.onConnect(peerId) }

  function onStoreEvent (e: StoreEvent): void {
    const change = holdings.apply(e)
    if (change === undefined) return
    if (fullInventory || change.type === 'tag') announce?.queue(change)
    routing?.onChange(change)
  }

  // ---- connections -----------------------------------------------------------------------

  // Discovery, dialing, redial with backoff, connection tags and duplicate connections: ./membership.ts.
  // Here: only what the index needs to know about connections.

  function onConnectionOpen (evt: CustomEvent<Connection>): void {
    const conn = evt.detail
    index.connected(conn.remotePeer.toString(), hostOf(conn), [conn.remoteAddr.toString()], Date.now())
    updatePeerGauge()
  }

  function onPeerConnect (evt: CustomEvent<PeerId>): void {
    const peerId = evt.detail
    const conn = node?.getConnections(peerId)[0]
    index.connected(peerId.toString(), conn !== undefined ? hostOf(conn) : undefined, conn !== undefined ? [conn.remoteAddr.toString()] : [], Date.now())
    updatePeerGauge()
    log.info({ peer: peerId.toString() }, 'peer connected')
    void inventoryOnConnect(peerId)
    helloSoon()
  }

  function onPeerDisconnect (evt: CustomEvent<PeerId>): void {
    index.disconnected(evt.detail.toString(), Date.now())
    updatePeerGauge()
    log.info({ peer: evt.detail.toString() }, 'peer disconnected')
  }

  /** Some mesh member we know of (tracked for redial, or in the DHT's routing table) is not connected now. */
  function indexMayMissMembers (): boolean {
    const connected = node?.getPeers().length ?? 0
    return (membership?.unconnected() ?? 0) > 0 || (routing?.tableSize() ?? 0) > connected
  }

  function periodicInventory (): void {
    const n = node
    if (n === undefined || state !== 'started') return
    if (fullInventory) for (const peerId of n.getPeers()) void inventory?.refresh(peerId)
    announce?.hello()
    // A fill that runs for longer than its record's lifetime is announced again.
    const t = Date.now()
    for (const [d, f] of fillingNow) {
      if (t - f.at > FILLING_TTL_MS / 2) { f.at = t; announce?.publish(encodeFilling(d, f.size, FILLING_TTL_MS)) }
    }
  }

  // ---- peer exchange ---------------------------------------------------------------------

  /**
   * A new connection changes who can hear our hello (which carries our addresses): say it again soon,
   * but at most once per HELLO_MIN_GAP_MS, so that a node joining a large mesh costs each node one hello.
   */
  function helloSoon (): void {
    if (helloTimer !== undefined) return
    const wait = Math.max(HELLO_DEBOUNCE_MS, lastHelloAt + HELLO_MIN_GAP_MS - Date.now())
    helloTimer = setTimeout(() => {
      helloTimer = undefined
      if (state !== 'started') return
      lastHelloAt = Date.now()
      announce?.hello()
    }, wait)
    helloTimer.unref()
  }

  /** Our listen addresses as peers of our peers could dial them (wildcards expanded by libp2p). */
  function helloAddrs (): string[] {
    if (init.peerExchange === false || node === undefined) return []
    const all = node.getMultiaddrs().map(String)
    // Loopback addresses help only a mesh that lives on loopback (tests, one host).
    const routable = all.filter(a => !a.startsWith('/ip4/127.') && !a.startsWith('/ip6/::1/'))
    return (routable.length > 0 ? routable : all).slice(0, 8)
  }

  /**
   * A member we are not connected to told the mesh where it listens (its signed hello, relayed by
   * gossipsub): dial it, at most once a minute per peer and a few at a time. This is how a node that
   * knows one peer (a bootstrap address, a DNS name) comes to know the rest.
   */
  function learnedPeer (peerId: PeerId, addrs: string[]): void {
    const n = node
    if (init.peerExchange === false || n === undefined || state !== 'started' || peerId.equals(n.peerId)) return
    if (n.getConnections(peerId).length > 0) return
    const id = peerId.toString()
    const now = Date.now()
    if ((pexTried.get(id) ?? 0) > now - PEX_RETRY_MS || pexDialing >= PEX_MAX_DIALS) return
    if (pexTried.size >= 4096) pexTried.clear()
    pexTried.set(id, now)
    const mas = []
    for (const a of addrs) {
      try {
        const ma = multiaddr(a)
        const p2p = ma.getComponents().findLast(c => c.name === 'p2p')?.value
        if (p2p === undefined || p2p === id) mas.push(p2p === undefined ? ma.encapsulate(`/p2p/${id}`) : ma)
      } catch { /* not a multiaddr: ignore it */ }
    }
    if (mas.length === 0) return
    pexDialing++
    log.debug({ peer: id, addrs: mas.map(String) }, 'dialing a peer learned from the mesh')
    n.dial(mas, { signal: stopCtl.signal })
      .catch((err: unknown) => log.debug({ err, peer: id }, 'peer-exchange dial failed'))
      .finally(() => { pexDialing-- })
  }

  // ---- lifecycle -------------------------------------------------------------------------

  async function doStart (): Promise<void> {
    stopCtl = new AbortController()
    // Every dial of this component listens on it: dozens at once in a large mesh is expected, not a leak.
    setMaxListeners(Infinity, stopCtl.signal)
    const { key, created } = await loadOrCreatePeerKey(init.dataDir)
    const epoch = await nextEpoch(init.dataDir)
    holdings = new LocalHoldings()
    const n: Node = await createLibp2p({
      start: false,
      privateKey: key,
      // The identify agent carries our data port, for peers that find us in the DHT (routing.ts).
      nodeInfo: { userAgent: agentFor(init.dataPort) },
      addresses: { listen: init.listen },
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      ...(init.meshKey !== undefined ? { connectionProtector: preSharedKey({ psk: init.meshKey }) } : {}),
      services: {
        identify: identify(),
        pubsub: gossipsub({
          globalSignaturePolicy: StrictSign,
          allowPublishToZeroTopicPeers: true,
          emitSelf: false,
          allowedTopics: [ANNOUNCE_TOPIC],
          // One announce topic: forward nothing else, keep memory bounded.
          maxInboundDataLength: MAX_GOSSIP_BYTES * 2,
          ...(init.gossipSeenTtlMs !== undefined ? { seenTTL: init.gossipSeenTtlMs } : {}),
          ...gossipScoring(peerId => index.score(peerId, Date.now())),
        }),
        ...(mode !== 'gossip' ? dhtServices(init.dht) : {}),
      },
    })
    node = n
    selfId = n.peerId.toString()
    routing = mode !== 'gossip' ? createRouting({ logger: log, node: n as Libp2p<{ dht: KadDHT }>, index }, init.dht ?? {}) : undefined
    const inv = createInventory({ logger: log, holdings, index, node: () => node }, { dataPort: init.dataPort, upstreams: upstreamIds, epoch: String(epoch), entryTtlMs })
    const ann = createAnnouncer({ logger: log, index, node: () => node, onWithdraw: id => inv.forgetPeer(id), onPeerAddrs: learnedPeer }, {
      dataPort: init.dataPort, upstreams: upstreamIds, addrs: helloAddrs, epoch, ...(init.gossipLimits !== undefined ? { limits: init.gossipLimits } : {}),
    })
    inventory = inv
    announce = ann
    membership = createMembership({ logger: components.logger, node: n }, {
      bootstrap: init.bootstrap, mdns: init.mdns, ...(init.mdnsIntervalMs !== undefined ? { mdnsIntervalMs: init.mdnsIntervalMs } : {}),
    })
    await n.handle(INVENTORY_PROTOCOL, inv.serve, { maxInboundStreams: 4, maxOutboundStreams: 4 })
    n.addEventListener('connection:open', onConnectionOpen)
    n.addEventListener('peer:connect', onPeerConnect)
    n.addEventListener('peer:disconnect', onPeerDisconnect)
    n.services.pubsub.topicValidators.set(ANNOUNCE_TOPIC, ann.validate)
    n.services.pubsub.addEventListener('message', ann.onMessage)

    // Follow the store before listing it, so that nothing slips between the two.
    unsubscribeStore = store.subscribe(onStoreEvent)
    holdings.beginLoad()
    for await (const info of store.listBlobs()) if (!info.private) holdings.loadBlob({ digest: info.digest, size: info.size, mediaType: info.mediaType })
    for await (const t of store.listTags()) {
      if (t.record.private) continue
      const { digest, mediaType, size, verifiedAt } = t.record
      holdings.loadTag({ upstream: t.upstream, repo: t.repo, tag: t.tag, record: { digest, mediaType, size, verifiedAt } })
    }
    holdings.endLoad()

    await n.start()
    n.services.pubsub.subscribe(ANNOUNCE_TOPIC)
    state = 'started'
    inv.start()
    timers.push(setInterval(periodicInventory, inventoryIntervalMs))
    timers.push(setInterval(() => { index.expire(Date.now()); inv.expire() }, Math.max(200, Math.min(5_000, Math.floor(peerTtlMs / 4)))))
    for (const t of timers) t.unref()
    await membership.start()
    ann.start()
    ann.hello()
    routing?.start(holdings.listBlobs())
    if ((init.bootstrapDns ?? []).length > 0) {
      dnsDiscovery = createDnsDiscovery({
        logger: log,
        dial: (addr) => {
          if (state !== 'started') return
          n.dial(multiaddr(addr), { signal: stopCtl.signal }).catch((err: unknown) => log.debug({ err, addr }, 'DNS-discovered dial failed'))
        },
        connectedHosts: () => new Set(n.getConnections().map(c => hostOf(c)).filter((h): h is string => h !== undefined)),
      }, { names: init.bootstrapDns ?? [], ...(init.dnsIntervalMs !== undefined ? { intervalMs: init.dnsIntervalMs } : {}) })
      dnsDiscovery.start()
    }
    log.info({ peer: selfId, addrs: n.getMultiaddrs().map(String), created }, 'mesh started')
  }

  async function doStop (): Promise<void> {
    const n = node
    dnsDiscovery?.stop()
    dnsDiscovery = undefined
    if (helloTimer !== undefined) { clearTimeout(helloTimer); helloTimer = undefined }
    for (const t of timers.splice(0)) clearInterval(t)
    unsubscribeStore?.()
    unsubscribeStore = undefined
    if (n !== undefined) {
      // Withdraw: peers forget our holdings at once instead of after their TTL (best effort).
      if (n.getPeers().length > 0) {
        try {
          await Promise.race([announce?.withdraw(), new Promise(resolve => setTimeout(resolve, 1_000))])
          await new Promise(resolve => setTimeout(resolve, 50)) // let the muxer flush
        } catch { /* best effort */ }
      }
      state = 'stopping'
      stopCtl.abort()
      routing?.stop()
      await membership?.stop()
      if (announce !== undefined) n.services.pubsub.removeEventListener('message', announce.onMessage)
      n.removeEventListener('connection:open', onConnectionOpen)
      n.removeEventListener('peer:connect', onPeerConnect)
      n.removeEventListener('peer:disconnect', onPeerDisconnect)
        await n.stop()
    }
    await inventory?.stop()
    await announce?.stop()
    node = undefined
    metrics.peersConnected.set(0)
    log.info({ peer: selfId }, 'mesh stopped')
  }

  return {
    async start () {
      if (state === 'started') return
      if (stopping !== undefined) await stopping
      if (starting !== undefined) return await starting
      state = 'starting'
      starting = doStart().catch(async (err: unknown) => {
        state = 'stopping'
        stopCtl.abort()
        routing?.stop()
        unsubscribeStore?.()
        unsubscribeStore = undefined
        try { await membership?.stop() } catch { /* already failing */ }
        await inventory?.stop()
        await announce?.stop()
        try { await node?.stop() } catch { /* already failing */ }
        node = undefined
        state = 'stopped'
        throw err
      }).finally(() => { starting = undefined })
      return await starting
    },

    async stop () {
      if (starting !== undefined) await starting.catch(() => {})
      if (stopping !== undefined) return await stopping
      if (state === 'stopped') return
      stopping = doStop().finally(() => { state = 'stopped'; stopping = undefined })
      return await stopping
    },

    repoTags (upstream: string, repo: string) {
      return index.repoTags(upstream, repo, Date.now())
    },

    fillers (digest: Digest) {
      return index.fillers(digest, Date.now())
    },

    members () {
      return index.members(Date.now())
    },

    peerId () {
      return selfId
    },

    announceFilling (digest: Digest, size: number): void {
      if (state !== 'started' || fillingNow.has(digest)) return
      fillingNow.set(digest, { size, at: Date.now() })
      // Not batched with adds: a peer that misses this digest a moment from now should stream from us.
      announce?.publish(encodeFilling(digest, size, FILLING_TTL_MS))
    },

    fillingEnded (digest: Digest, ok: boolean): void {
      if (!fillingNow.delete(digest)) return
      // Success is announced by the store's `added` (which also clears the record at peers).
      if (!ok && state === 'started') announce?.publish(encodeUnfilling(digest))
    },

    holders (digest: Digest): PeerHolder[] {
      return index.holders(digest, Date.now())
    },

    async findHolders (digest: Digest, o: { signal?: AbortSignal, deadlineMs?: number } = {}): Promise<PeerHolder[]> {
      const local = index.holders(digest, Date.now())
      if (local.length > 0 || routing === undefined || state !== 'started') return local
      // In `both`, the index already covers every connected peer (full inventory): the DHT can only add a
      // member we are not connected to. In a small mesh where everyone is connected, a miss costs no lookup.
      if (fullInventory && !indexMayMissMembers()) return local
      return await routing.find(digest, o)
    },

    tagRecords (upstream: string, repo: string, tag: string): PeerTagRecord[] {
      return index.tagRecords(upstream, repo, tag, Date.now())
    },

    report (peerId: string, outcome: PeerOutcome): void {
      index.report(peerId, outcome, Date.now())
    },

    status (): MeshStatus {
      const n = node
      const connected = new Set(n?.getPeers().map(String) ?? [])
      // gossipsub's own score of each peer (the class has getScore; the exported interface does not)
      const gs = n?.services.pubsub as unknown as { getScore?: (id: string) => number } | undefined
      const peers = index.status(Date.now()).map(p => {
        const g = gs?.getScore?.(p.peerId)
        return { ...p, connected: connected.has(p.peerId), ...(g !== undefined ? { gossipScore: Math.round(g * 100) / 100 } : {}) }
      })
      return { peerId: selfId, addrs: this.multiaddrs(), peers }
    },

    multiaddrs (): string[] {
      return node?.getMultiaddrs().map(String) ?? []
    },

    counters (): MeshCounters {
      const a = announce?.counters() ?? { gossipSentMessages: 0, gossipSentBytes: 0, gossipSendThrottledMs: 0, gossipReceived: 0, gossipDropped: {} }
      const i = inventory?.counters() ?? {
        inventoryFetches: 0, inventoryFull: 0, inventoryDelta: 0, inventoryUnchanged: 0, inventoryFailures: 0, inventoryServed: 0,
        inventoryEntriesSent: 0, inventoryEntriesReceived: 0, inventoryFetchesQueued: 0, inventoryFetchesPeak: 0,
      }
      const mem = index.memory()
      return {
        ...a, ...i, duplicateConnectionsClosed: membership?.counters().duplicateConnectionsClosed ?? 0,
        indexEvicted: index.evictions.evicted, indexRefused: index.evictions.refused, indexPeersEvicted: index.evictions.peersEvicted,
        indexBytes: mem.used, indexMaxBytes: mem.max,
        ...(routing?.counters() ?? {}),
      }
    },
  }
}
