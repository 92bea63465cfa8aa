// The mesh control plane: a libp2p node that announces what our store holds (gossipsub) and learns
// what peers hold (gossip + an inventory request/response on connect). Bytes move elsewhere (HTTP).
import '../polyfills.js'
import { randomBytes } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { createLibp2p, type Libp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify, type Identify } from '@libp2p/identify'
import { preSharedKey, generateKey } from '@libp2p/pnet'
import { gossipsub, StrictSign, TopicValidatorResult, type GossipSub, type Message } from '@libp2p/gossipsub'
import { peerIdFromPublicKey } from '@libp2p/peer-id'
import type { Connection, PeerId, Stream } from '@libp2p/interface'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { BlobStore, StoreEvent } from '../store/types.js'
import type { Digest } from '../oci/digest.js'
import { loadOrCreatePeerKey } from './peer-key.js'
import { PeerIndex } from './peer-index.js'
import { createMembership, type Membership } from './membership.js'
import {
  ANNOUNCE_TOPIC, INVENTORY_PROTOCOL, MAX_FRAME_BYTES, MAX_GOSSIP_BYTES, FRAME_ENTRIES, LineSplitter,
  decodeGossip, decodeFrame, encodeAdds, encodeRemoves, encodeRemoveAll, encodeTag, encodeHello,
  frameReq, frameInv, frameBlobs, frameTags, frameEnd,
  type BlobEntry, type TagEntry, type GossipMessage,
} from './messages.js'
import type { Mesh, MeshInit, MeshStatus, PeerHolder, PeerTagRecord, PeerOutcome } from './types.js'

export interface MeshComponents { logger: Logger, metrics: Metrics, store: BlobStore }

/** Counters for tests and diagnostics. */
export interface MeshCounters {
  gossipSentMessages: number
  /** Payload bytes of gossip messages we published (before gossipsub framing and signatures). */
  gossipSentBytes: number
  gossipReceived: number
  gossipDropped: Record<string, number>
  inventoryFetches: number
  inventoryFull: number
  inventoryUnchanged: number
  inventoryFailures: number
  inventoryServed: number
  duplicateConnectionsClosed: number
}

export type MeshNode = Mesh & { counters (): MeshCounters }

const MAX_INVENTORY_ENTRIES = 100_000
const MAX_INVENTORY_BYTES = 64 * 1024 * 1024
const INVENTORY_TIMEOUT_MS = 30_000
/** How long a requester may take to send its one-line inventory request. */
const INVENTORY_REQUEST_TIMEOUT_MS = 5_000
const MAX_CONCURRENT_INVENTORY_RESPONSES = 8
const ADD_BATCH_MS = 100
const ADD_BATCH_MAX = 500
const CONNECT_RETRY_DELAYS = [500, 2_000, 5_000]

/** The pnet pre-shared key file contents (for `pullmesh keygen`). */
export function generateMeshKey (): Uint8Array {
  const key = new Uint8Array(95)
  generateKey(key)
  return key
}

type Node = Libp2p<{ identify: Identify, pubsub: GossipSub }>

class InventoryError extends Error {
  override readonly name = 'InventoryError'
  constructor (readonly code: string, message: string) { super(message) }
}

/** The IP address in a connection's remote multiaddr, if it has one. */
function hostOf (conn: Connection): string | undefined {
  for (const c of conn.remoteAddr.getComponents()) {
    if ((c.name === 'ip4' || c.name === 'ip6') && c.value !== undefined) return c.value
  }
  return undefined
}

const toBytes = (chunk: Uint8Array | { subarray: () => Uint8Array }): Uint8Array => chunk instanceof Uint8Array ? chunk : chunk.subarray()

async function send (stream: Stream, buf: Uint8Array, signal: AbortSignal): Promise<void> {
  if (!stream.send(buf)) await stream.onDrain({ signal })
}

export function createMesh (components: MeshComponents, init: MeshInit): MeshNode {
  const log = components.logger.child({ component: 'mesh' })
  const { metrics, store } = components
  const peerTtlMs = init.peerTtlMs ?? 30_000
  const inventoryIntervalMs = init.inventoryIntervalMs ?? 60_000
  const entryTtlMs = Math.max(3 * inventoryIntervalMs, peerTtlMs)
  const index = new PeerIndex({ peerTtlMs, entryTtlMs })
  const epoch = randomBytes(8).toString('hex')
  const counters: MeshCounters = {
    gossipSentMessages: 0, gossipSentBytes: 0, gossipReceived: 0, gossipDropped: {},
    inventoryFetches: 0, inventoryFull: 0, inventoryUnchanged: 0, inventoryFailures: 0, inventoryServed: 0, duplicateConnectionsClosed: 0,
  }

  let node: Node | undefined
  let membership: Membership | undefined
  let selfId = ''
  let state: 'stopped' | 'starting' | 'started' | 'stopping' = 'stopped'
  let starting: Promise<void> | undefined
  let stopping: Promise<void> | undefined
  let stopCtl = new AbortController()
  let unsubscribeStore: (() => void) | undefined
  const timers: NodeJS.Timeout[] = []
  let flushTimer: NodeJS.Timeout | undefined

  /** Bumped on every store change; lets a peer skip an unchanged inventory. */
  let gen = 0
  /** Digests we have announced (or would announce): a removal is announced only for these, never for private content. */
  const publicDigests = new Set<Digest>()
  const pendingAdds = new Map<Digest, BlobEntry>()
  const pendingRemoves = new Set<Digest>()
  const pendingTags = new Map<string, TagEntry>()
  let publishChain: Promise<void> = Promise.resolve()

  /** Per peer: the epoch/gen of its last complete inventory we applied, and when. */
  const lastInventory = new Map<string, { epoch: string, gen: number, at: number }>()
  const inventoryInFlight = new Map<string, Promise<boolean>>()
  let inventoryResponses = 0
  /** Peers we are sending an inventory to right now: one response per peer at a time. */
  const servingTo = new Set<string>()
  /** Decoded messages, handed from the topic validator to the message listener. */
  const validated = new WeakMap<Message, GossipMessage>()

  const drop = (reason: string): void => { counters.gossipDropped[reason] = (counters.gossipDropped[reason] ?? 0) + 1 }
  const updatePeerGauge = (): void => { if (node !== undefined) metrics.peersConnected.set(node.getPeers().length) }

  // ---- announcing our holdings ------------------------------------------------------------

  function publish (data: Uint8Array): Promise<void> {
    const n = node
    publishChain = publishChain.then(async () => {
      if (n === undefined || state !== 'started') return
      counters.gossipSentMessages++
      counters.gossipSentBytes += data.byteLength
      try {
        await n.services.pubsub.publish(ANNOUNCE_TOPIC, data)
      } catch (err) {
        log.debug({ err }, 'gossip publish failed')
      }
    })
    return publishChain
  }

  function scheduleFlush (): void {
    if (pendingAdds.size >= ADD_BATCH_MAX) { flush(); return }
    if (flushTimer === undefined) flushTimer = setTimeout(flush, ADD_BATCH_MS)
  }

  function flush (): void {
    if (flushTimer !== undefined) { clearTimeout(flushTimer); flushTimer = undefined }
    if (state !== 'started') return // kept pending; flushed at start
    if (pendingRemoves.size > 0) {
      for (const m of encodeRemoves([...pendingRemoves])) void publish(m)
      pendingRemoves.clear()
    }
    if (pendingAdds.size > 0) {
      for (const m of encodeAdds([...pendingAdds.values()])) void publish(m)
      pendingAdds.clear()
    }
    for (const t of pendingTags.values()) void publish(encodeTag(t))
    pendingTags.clear()
  }

  function onStoreEvent (e: StoreEvent): void {
    gen++
    switch (e.type) {
      case 'added':
        if (e.info.private) return // pulled with credentials: never announced
        publicDigests.add(e.info.digest)
        pendingRemoves.delete(e.info.digest)
        pendingAdds.set(e.info.digest, { digest: e.info.digest, size: e.info.size, mediaType: e.info.mediaType })
        break
      case 'removed':
        pendingAdds.delete(e.digest)
        if (!publicDigests.delete(e.digest)) return
        pendingRemoves.add(e.digest)
        break
      case 'tag': {
        if (e.record.private) return
        const { digest, mediaType, size, verifiedAt } = e.record
        pendingTags.set(`${e.upstream}\u0000${e.repo}\u0000${e.tag}`, { upstream: e.upstream, repo: e.repo, tag: e.tag, record: { digest, mediaType, size, verifiedAt } })
        break
      }
    }
    scheduleFlush()
  }

  // ---- receiving announcements ------------------------------------------------------------

  function validate (_from: PeerId, msg: Message): TopicValidatorResult {
    if (msg.type !== 'signed') { drop('unsigned'); return TopicValidatorResult.Reject }
    // StrictSign has verified the signature with msg.key; the sender we index is that signer.
    if (!peerIdFromPublicKey(msg.key).equals(msg.from)) { drop('signer'); return TopicValidatorResult.Reject }
    if (msg.data.byteLength > MAX_GOSSIP_BYTES) { drop('too-large'); return TopicValidatorResult.Reject }
    const r = decodeGossip(msg.data)
    if (!r.ok) {
      drop(r.reason)
      // A newer protocol version is not misbehaviour: ignore it without penalising the forwarder.
      return r.reason === 'version' ? TopicValidatorResult.Ignore : TopicValidatorResult.Reject
    }
    validated.set(msg, r.value)
    return TopicValidatorResult.Accept
  }

  function onMessage (evt: CustomEvent<Message>): void {
    const msg = evt.detail
    if (msg.topic !== ANNOUNCE_TOPIC || msg.type !== 'signed') return
    const from = msg.from.toString()
    if (from === selfId) return
    // Only peers we hold a connection to are indexed: a relayed signer we cannot reach is of no use, and
    // any keypair can sign, so indexing strangers would let one node fill every index with made-up peers.
    if (node === undefined || node.getConnections(msg.from).length === 0) { drop('not-connected'); return }
    let m = validated.get(msg)
    if (m === undefined) {
      const r = decodeGossip(msg.data)
      if (!r.ok) { drop(r.reason); return }
      m = r.value
    }
    counters.gossipReceived++
    const now = Date.now()
    index.touch(from, now)
    switch (m.t) {
      case 'add': index.addBlobs(from, m.blobs, now); break
      case 'remove':
        if (m.all) { index.removeAll(from, now); lastInventory.delete(from) } else index.removeBlobs(from, m.digests, now)
        break
      case 'tag': index.putTag(from, m.entry, now); break
      case 'hello': index.setDataPort(from, m.dataPort, now); break
    }
  }

  // ---- inventory: serving ----------------------------------------------------------------

  async function serveInventory (stream: Stream, connection: Connection): Promise<void> {
    const requester = connection.remotePeer.toString()
    if (inventoryResponses >= MAX_CONCURRENT_INVENTORY_RESPONSES || servingTo.has(requester)) {
      stream.abort(new InventoryError('BUSY', 'too many inventory requests'))
      return
    }
    servingTo.add(requester)
    inventoryResponses++
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
      const snapshotGen = gen
      await send(stream, frameInv(init.dataPort, epoch, snapshotGen), signal)
      if (last?.epoch === epoch && last.gen === snapshotGen) {
        await send(stream, frameEnd(0, 0, true), signal)
      } else {
        let blobs = 0
        let tags = 0
        let batch: BlobEntry[] = []
        for await (const info of store.listBlobs()) {
          if (info.private) continue
          if (blobs + tags >= MAX_INVENTORY_ENTRIES) break
          batch.push({ digest: info.digest, size: info.size, mediaType: info.mediaType })
          blobs++
          if (batch.length >= FRAME_ENTRIES) { await send(stream, frameBlobs(batch), signal); batch = [] }
        }
        if (batch.length > 0) await send(stream, frameBlobs(batch), signal)
        let tbatch: TagEntry[] = []
        for await (const t of store.listTags()) {
          if (t.record.private) continue
          if (blobs + tags >= MAX_INVENTORY_ENTRIES) break
          const { digest, mediaType, size, verifiedAt } = t.record
          tbatch.push({ upstream: t.upstream, repo: t.repo, tag: t.tag, record: { digest, mediaType, size, verifiedAt } })
          tags++
          if (tbatch.length >= FRAME_ENTRIES) { await send(stream, frameTags(tbatch), signal); tbatch = [] }
        }
        if (tbatch.length > 0) await send(stream, frameTags(tbatch), signal)
        await send(stream, frameEnd(blobs, tags), signal)
      }
      await stream.close({ signal })
      counters.inventoryServed++
    } catch (err) {
      log.debug({ err, peer: connection.remotePeer.toString() }, 'inventory response failed')
      stream.abort(err instanceof Error ? err : new Error(String(err)))
    } finally {
      signal.removeEventListener('abort', onAbort)
      inventoryResponses--
      servingTo.delete(requester)
    }
  }

  // ---- inventory: fetching ---------------------------------------------------------------

  /** Asks a peer for its holdings and replaces its index entries. Returns false on failure. */
  function refreshInventory (peerId: PeerId): Promise<boolean> {
    const id = peerId.toString()
    const running = inventoryInFlight.get(id)
    if (running !== undefined) return running
    const p = fetchInventory(peerId).then(() => true, (err: unknown) => {
      counters.inventoryFailures++
      if (state === 'started') log.debug({ err, peer: id }, 'inventory fetch failed')
      return false
    }).finally(() => inventoryInFlight.delete(id))
    inventoryInFlight.set(id, p)
    return p
  }

  async function fetchInventory (peerId: PeerId): Promise<void> {
    const n = node
    if (n === undefined || state !== 'started') throw new InventoryError('STOPPED', 'mesh is not running')
    const id = peerId.toString()
    counters.inventoryFetches++
    const t0 = Date.now()
    const signal = AbortSignal.any([stopCtl.signal, AbortSignal.timeout(INVENTORY_TIMEOUT_MS)])
    const stream = await n.dialProtocol(peerId, INVENTORY_PROTOCOL, { signal })
    const onAbort = (): void => { stream.abort(new InventoryError('ABORTED', 'inventory request aborted')) }
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      const prev = lastInventory.get(id)
      const reusable = prev !== undefined && index.has(id) && t0 - prev.at < entryTtlMs / 2
      await send(stream, frameReq(reusable ? { epoch: prev.epoch, gen: prev.gen } : undefined), signal)
      await stream.close({ signal })

      const splitter = new LineSplitter(MAX_FRAME_BYTES)
      let head: { dataPort: number, epoch: string, gen: number } | undefined
      let end: { blobs: number, tags: number, same: boolean } | undefined
      const blobs: BlobEntry[] = []
      const tags: TagEntry[] = []
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
            case 'end': end = f; break
            case 'req': throw new InventoryError('BAD_FRAME', 'unexpected req')
          }
          if (blobs.length + tags.length > MAX_INVENTORY_ENTRIES) throw new InventoryError('TOO_LARGE', 'too many inventory entries')
        }
      }
      if (head === undefined || end === undefined || splitter.hasPartial) throw new InventoryError('TRUNCATED', 'inventory ended early')
      if (state !== 'started') return
      const now = Date.now()
      index.setDataPort(id, head.dataPort, now)
      if (end.same) {
        index.refreshAll(id, now)
        counters.inventoryUnchanged++
      } else {
        if (end.blobs !== blobs.length || end.tags !== tags.length) throw new InventoryError('TRUNCATED', 'inventory counts do not match')
        index.replaceInventory(id, blobs, tags, t0, now)
        counters.inventoryFull++
      }
      lastInventory.set(id, { epoch: head.epoch, gen: head.gen, at: now })
      log.debug({ peer: id, blobs: blobs.length, tags: tags.length, same: end.same, ms: now - t0 }, 'inventory received')
    } catch (err) {
      // Leaving the loop only drops our listeners: abort, or the stream (and its slot) stays open.
      stream.abort(err instanceof Error ? err : new Error(String(err)))
      throw err
    } finally {
      signal.removeEventListener('abort', onAbort)
    }
  }

  /** On connect: fetch the inventory, retrying a few times while the peer stays connected. */
  async function inventoryOnConnect (peerId: PeerId): Promise<void> {
    if (await refreshInventory(peerId)) return
    for (const delay of CONNECT_RETRY_DELAYS) {
      try {
        await sleep(delay, undefined, { signal: stopCtl.signal })
      } catch {
        return // stopping
      }
      if (state !== 'started' || node === undefined || node.getConnections(peerId).length === 0) return
      if (await refreshInventory(peerId)) return
    }
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
  }

  function onPeerDisconnect (evt: CustomEvent<PeerId>): void {
    index.disconnected(evt.detail.toString(), Date.now())
    updatePeerGauge()
    log.info({ peer: evt.detail.toString() }, 'peer disconnected')
  }

  function periodicInventory (): void {
    const n = node
    if (n === undefined || state !== 'started') return
    for (const peerId of n.getPeers()) void refreshInventory(peerId)
    void publish(encodeHello(init.dataPort))
  }

  // ---- lifecycle -------------------------------------------------------------------------

  async function doStart (): Promise<void> {
    stopCtl = new AbortController()
    const { key, created } = await loadOrCreatePeerKey(init.dataDir)
    const n: Node = await createLibp2p({
      start: false,
      privateKey: key,
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
        }),
      },
    })
    node = n
    selfId = n.peerId.toString()
    membership = createMembership({ logger: components.logger, node: n }, { bootstrap: init.bootstrap, mdns: init.mdns })
    await n.handle(INVENTORY_PROTOCOL, serveInventory, { maxInboundStreams: 4, maxOutboundStreams: 4 })
    n.addEventListener('connection:open', onConnectionOpen)
    n.addEventListener('peer:connect', onPeerConnect)
    n.addEventListener('peer:disconnect', onPeerDisconnect)
    n.services.pubsub.topicValidators.set(ANNOUNCE_TOPIC, validate)
    n.services.pubsub.addEventListener('message', onMessage)

    // Follow the store before listing it, so that nothing slips between the two.
    unsubscribeStore = store.subscribe(onStoreEvent)
    for await (const info of store.listBlobs()) if (!info.private) publicDigests.add(info.digest)

    await n.start()
    n.services.pubsub.subscribe(ANNOUNCE_TOPIC)
    state = 'started'
    timers.push(setInterval(periodicInventory, inventoryIntervalMs))
    timers.push(setInterval(() => { index.expire(Date.now()); for (const id of lastInventory.keys()) if (!index.has(id)) lastInventory.delete(id) }, Math.max(200, Math.min(5_000, Math.floor(peerTtlMs / 4)))))
    for (const t of timers) t.unref()
    await membership.start()
    flush()
    void publish(encodeHello(init.dataPort))
    log.info({ peer: selfId, addrs: n.getMultiaddrs().map(String), created }, 'mesh started')
  }

  async function doStop (): Promise<void> {
    const n = node
    if (flushTimer !== undefined) { clearTimeout(flushTimer); flushTimer = undefined }
    for (const t of timers.splice(0)) clearInterval(t)
    unsubscribeStore?.()
    unsubscribeStore = undefined
    if (n !== undefined) {
      // Withdraw: peers forget our holdings at once instead of after their TTL (best effort).
      if (n.getPeers().length > 0) {
        try {
          await Promise.race([publish(encodeRemoveAll()), new Promise(resolve => setTimeout(resolve, 1_000))])
          await new Promise(resolve => setTimeout(resolve, 50)) // let the muxer flush
        } catch { /* best effort */ }
      }
      state = 'stopping'
      stopCtl.abort()
      await membership?.stop()
      n.services.pubsub.removeEventListener('message', onMessage)
      n.removeEventListener('connection:open', onConnectionOpen)
      n.removeEventListener('peer:connect', onPeerConnect)
      n.removeEventListener('peer:disconnect', onPeerDisconnect)
        await n.stop()
    }
    await Promise.allSettled([...inventoryInFlight.values()])
    await publishChain
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
        unsubscribeStore?.()
        unsubscribeStore = undefined
        try { await membership?.stop() } catch { /* already failing */ }
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

    holders (digest: Digest): PeerHolder[] {
      return index.holders(digest, Date.now())
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
      const peers = index.status(Date.now()).map(p => ({ ...p, connected: connected.has(p.peerId) }))
      return { peerId: selfId, addrs: this.multiaddrs(), peers }
    },

    multiaddrs (): string[] {
      return node?.getMultiaddrs().map(String) ?? []
    },

    counters (): MeshCounters {
      return { ...counters, gossipDropped: { ...counters.gossipDropped }, duplicateConnectionsClosed: membership?.counters().duplicateConnectionsClosed ?? 0 }
    },
  }
}
