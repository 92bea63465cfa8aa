// Hostile peers against real libp2p meshes on 127.0.0.1 with the real store: a flooding peer, a peer
// that replays captured announcements once the seen-cache has forgotten them, a peer that tries to
// exhaust the index, and the inventory traffic of a busy node whose tags are only revalidated.
// Each hostile peer is a bare libp2p node with gossipsub, written here. mDNS stays off.
import { afterEach, describe, expect, it } from 'vitest'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { createLibp2p, type Libp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify, type Identify } from '@libp2p/identify'
import { bootstrap } from '@libp2p/bootstrap'
import { gossipsub, type GossipSub, type Message } from '@libp2p/gossipsub'
import { publicKeyToProtobuf } from '@libp2p/crypto/keys'
import { createLogger } from '../../src/logger.js'
import { createMetrics } from '../../src/metrics.js'
import { createFsStore } from '../../src/store/fs-store.js'
import { sha256Of, type Digest } from '../../src/oci/digest.js'
import type { BlobStore } from '../../src/store/types.js'
import { createMesh, type MeshNode } from '../../src/mesh/index.js'
import { ANNOUNCE_TOPIC, INVENTORY_PROTOCOL } from '../../src/mesh/messages.js'
import { BLOB_COST } from '../../src/mesh/peer-index.js'

const LAYER = 'application/vnd.oci.image.layer.v1.tar+gzip'
const MANIFEST = 'application/vnd.oci.image.manifest.v1+json'

interface TestNode { mesh: MeshNode, store: BlobStore, dataDir: string, id: string, addr: string }
type RawNode = Libp2p<{ identify: Identify, pubsub: GossipSub }>

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c()
})

let nextPort = 30_000 + Math.floor(Math.random() * 10_000)

interface StartOpts { bootstrap?: TestNode[], dataDir?: string, inventoryIntervalMs?: number, indexBudgetBytes?: number, gossipSeenTtlMs?: number }

async function startNode (opts: StartOpts = {}): Promise<TestNode> {
  const dataDir = opts.dataDir ?? await mkdtemp(join(tmpdir(), 'pullmesh-hostile-'))
  const logger = createLogger('silent')
  const metrics = createMetrics()
  const store = createFsStore({ logger, metrics }, { dataDir })
  await store.start()
  const mesh = createMesh({ logger, metrics, store }, {
    dataDir,
    listen: ['/ip4/127.0.0.1/tcp/0'],
    bootstrap: (opts.bootstrap ?? []).map(n => n.addr),
    mdns: false,
    dataPort: nextPort++,
    ...(opts.inventoryIntervalMs !== undefined ? { inventoryIntervalMs: opts.inventoryIntervalMs } : {}),
    ...(opts.indexBudgetBytes !== undefined ? { indexBudgetBytes: opts.indexBudgetBytes } : {}),
    ...(opts.gossipSeenTtlMs !== undefined ? { gossipSeenTtlMs: opts.gossipSeenTtlMs } : {}),
  })
  await mesh.start()
  const node: TestNode = { mesh, store, dataDir, id: mesh.status().peerId, addr: mesh.multiaddrs()[0]! }
  let stopped = false
  const stop = async (): Promise<void> => {
    if (stopped) return
    stopped = true
    await mesh.stop()
    await store.stop()
  }
  cleanups.push(async () => {
    await stop()
    if (opts.dataDir === undefined) await rm(dataDir, { recursive: true, force: true })
  })
  return Object.assign(node, { stop })
}

async function waitFor (what: string, pred: () => boolean, timeoutMs = 10_000): Promise<number> {
  const t0 = Date.now()
  while (!pred()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  return Date.now() - t0
}

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }
const connected = (a: TestNode, b: TestNode): boolean => a.mesh.status().peers.some(p => p.peerId === b.id && p.connected)
const holderIds = (n: TestNode, d: Digest): string[] => n.mesh.holders(d).map(h => h.peerId)
const peerOf = (n: TestNode, id: string) => n.mesh.status().peers.find(p => p.peerId === id) // eslint-disable-line @typescript-eslint/explicit-function-return-type

async function putBlob (store: BlobStore, buf = randomBytes(64)): Promise<Digest> {
  const d = sha256Of(buf)
  await store.putBuffer(d, buf, { mediaType: LAYER })
  return d
}

/** A bare libp2p node with gossipsub on our topic, connected to `targets`: the hostile peer. */
async function startHostile (targets: TestNode[]): Promise<RawNode> {
  const raw: RawNode = await createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    peerDiscovery: [bootstrap({ list: targets.map(t => t.addr), timeout: 10 })],
    services: { identify: identify(), pubsub: gossipsub({ allowPublishToZeroTopicPeers: true }) },
  })
  cleanups.push(async () => { await raw.stop() })
  raw.services.pubsub.subscribe(ANNOUNCE_TOPIC)
  await waitFor('hostile peer sees the nodes subscribed', () => targets.every(t => raw.services.pubsub.getSubscribers(ANNOUNCE_TOPIC).some(p => p.toString() === t.id)))
  return raw
}

const json = (o: unknown): Uint8Array => Buffer.from(JSON.stringify(o))

/** Sends a captured signed message, byte for byte as its signer published it, straight to one peer. */
function replay (h: RawNode, to: string, msg: Message): void {
  if (msg.type !== 'signed') throw new Error('unsigned')
  const seqno = new Uint8Array(8)
  new DataView(seqno.buffer).setBigUint64(0, msg.sequenceNumber, false)
  const raw = { from: msg.from.toMultihash().bytes, data: msg.data, seqno, topic: msg.topic, signature: msg.signature, key: publicKeyToProtobuf(msg.key) }
  // gossipsub's sendRpc is not in its exported interface, but it is how a hostile peer would write an RPC
  const gs = h.services.pubsub as unknown as { sendRpc: (id: string, rpc: unknown) => boolean }
  if (!gs.sendRpc(to, { subscriptions: [], messages: [raw] })) throw new Error('replay not sent')
}

describe('mesh against hostile peers (real libp2p on loopback, real store)', () => {
  it('a flooding peer is rate-limited and scored down; other peers are still indexed', async () => {
    const a = await startNode()
    const b = await startNode({ bootstrap: [a] })
    await waitFor('B connected', () => connected(a, b))
    const h = await startHostile([a])
    const hid = h.peerId.toString()
    const epoch = Date.now()
    const N = 3_000
    const t0 = Date.now()
    const mine: Digest[] = []
    const real = (async () => {
      for (let i = 0; i < 20; i++) { mine.push(await putBlob(b.store)); await sleep(50) }
    })()
    let sent = 0
    for (let i = 0; i < N && Date.now() - t0 < 30_000; i++) {
      const d = sha256Of(randomBytes(16))
      await h.services.pubsub.publish(ANNOUNCE_TOPIC, json({ v: 1, t: 'add', m: [LAYER], b: [[d, 1, 0]], e: epoch, s: i }))
      sent++
    }
    await real
    await waitFor('A indexes all of B\'s blobs during the flood', () => mine.every(d => holderIds(a, d).includes(b.id)), 15_000)
    await sleep(1_000) // let A work through what it received
    const elapsed = (Date.now() - t0) / 1000
    const flooded = peerOf(a, hid)?.blobs ?? 0
    const c = a.mesh.counters()
    const score = peerOf(a, hid)?.gossipScore
    console.log(`[hostile] flood: ${sent} messages in ${elapsed.toFixed(1)} s; A indexed ${flooded}; dropped ${JSON.stringify(c.gossipDropped)}; gossipsub score of the flooder ${score}`)
    // at most the burst (500) plus 50 messages a second get through
    expect(flooded).toBeLessThanOrEqual(500 + 50 * elapsed)
    expect(flooded).toBeLessThan(sent)
    expect((c.gossipDropped['rate-signer'] ?? 0) + (c.gossipDropped['rate-forwarder'] ?? 0)).toBeGreaterThan(0)
    expect(score).toBeLessThan(0)
    // B's announcements still flow after the flood
    const late = await putBlob(b.store)
    await waitFor('A learns B\'s next blob', () => holderIds(a, late).includes(b.id))
  }, 90_000)

  it('a replayed `remove` or `remove all`, after the seen-cache forgot it, leaves the real node\'s holdings alone', async () => {
    const seenTtl = 1_000
    const a = await startNode({ gossipSeenTtlMs: seenTtl })
    const dirB = await mkdtemp(join(tmpdir(), 'pullmesh-hostile-b-'))
    cleanups.push(async () => { await rm(dirB, { recursive: true, force: true }) })
    const b1 = await startNode({ bootstrap: [a], dataDir: dirB }) as TestNode & { stop: () => Promise<void> }
    await waitFor('B connected', () => connected(a, b1))
    const h = await startHostile([a, b1])
    const captured: Message[] = []
    h.services.pubsub.addEventListener('message', evt => {
      const m = evt.detail
      if (m.type === 'signed' && m.from.toString() === b1.id && Buffer.from(m.data).toString().includes('"t":"remove"')) captured.push(m)
    })

    const keepBuf = randomBytes(64)
    const d1 = await putBlob(b1.store, keepBuf)
    const d2Buf = randomBytes(64)
    const d2 = await putBlob(b1.store, d2Buf)
    await waitFor('A learns B holds both', () => holderIds(a, d1).includes(b1.id) && holderIds(a, d2).includes(b1.id))

    // Same epoch: B drops d2 (H captures the `remove`), then holds it again.
    await b1.store.delete(d2)
    await waitFor('captured remove', () => captured.length === 1)
    await waitFor('A forgets d2', () => holderIds(a, d2).length === 0)
    await putBlob(b1.store, d2Buf)
    await waitFor('A learns d2 again', () => holderIds(a, d2).includes(b1.id))
    await sleep(seenTtl + 2_000) // A's seen-cache has forgotten the remove
    replay(h, a.id, captured[0]!)
    await waitFor('A drops the replayed remove', () => (a.mesh.counters().gossipDropped.replay ?? 0) >= 1 || holderIds(a, d2).length === 0, 5_000).catch(() => {})
    expect(holderIds(a, d2)).toEqual([b1.id])

    // Older epoch: B stops (H captures its `remove all`) and restarts on the same data dir.
    await b1.stop()
    await waitFor('captured remove all', () => captured.length === 2)
    await waitFor('A forgets B', () => holderIds(a, d1).length === 0)
    const b2 = await startNode({ bootstrap: [a], dataDir: dirB })
    expect(b2.id).toBe(b1.id)
    await waitFor('A learns B\'s holdings again', () => holderIds(a, d1).includes(b2.id) && holderIds(a, d2).includes(b2.id))
    await sleep(seenTtl + 2_000)
    const before = a.mesh.counters().gossipDropped.replay ?? 0
    replay(h, a.id, captured[1]!)
    await waitFor('A drops the replayed remove all', () => (a.mesh.counters().gossipDropped.replay ?? 0) > before || holderIds(a, d1).length === 0, 5_000).catch(() => {})
    console.log(`[hostile] replays dropped: ${a.mesh.counters().gossipDropped.replay ?? 0}`)
    expect(holderIds(a, d1)).toEqual([b2.id])
    expect(holderIds(a, d2)).toEqual([b2.id])
    // and B's new announcements are still taken
    const d3 = await putBlob(b2.store)
    await waitFor('A learns B\'s next blob', () => holderIds(a, d3).includes(b2.id))
  }, 90_000)

  it('a peer that tries to exhaust the index gets at most the free space; a real peer\'s entries still get in', async () => {
    const budget = 256 * 1024
    const a = await startNode({ indexBudgetBytes: budget })
    const b = await startNode({ bootstrap: [a] })
    await waitFor('B connected', () => connected(a, b))
    const h = await startHostile([a])
    const hid = h.peerId.toString()
    const epoch = Date.now()
    const per = BLOB_COST + sha256Of(Buffer.alloc(1)).length + LAYER.length
    // 5,000 made-up blobs in 10 messages: well within the gossip rate limit, far beyond the index budget
    for (let i = 0; i < 10; i++) {
      const b = Array.from({ length: 500 }, () => [sha256Of(randomBytes(16)), 1, 0])
      await h.services.pubsub.publish(ANNOUNCE_TOPIC, json({ v: 1, t: 'add', m: [LAYER], b, e: epoch, s: i }))
    }
    await waitFor('A has taken what it will of the flood', () => (a.mesh.counters().indexRefused ?? 0) > 0 || (peerOf(a, hid)?.blobs ?? 0) >= 5_000, 15_000)
    await sleep(500)
    const before = peerOf(a, hid)?.blobs ?? 0
    const mine: Digest[] = []
    for (let i = 0; i < 100; i++) mine.push(await putBlob(b.store))
    await waitFor('A indexes all 100 of B\'s blobs', () => mine.every(d => holderIds(a, d).includes(b.id)), 15_000)
    const after = peerOf(a, hid)?.blobs ?? 0
    const c = a.mesh.counters()
    console.log(`[hostile] exhaustion: budget ${budget} B (~${Math.floor(budget / per)} blobs); hostile held ${before}, then ${after} after B's 100; index ${c.indexBytes} B, evicted ${c.indexEvicted}, refused ${c.indexRefused}`)
    expect(before).toBeLessThanOrEqual(Math.floor(budget / per))
    expect(after).toBeLessThan(before)
    expect(c.indexBytes).toBeLessThanOrEqual(budget)
  }, 60_000)

  it('a busy node whose tags are only revalidated sends empty inventory refreshes; a change is sent as a delta of one', async () => {
    const a = await startNode()
    const b = await startNode({ bootstrap: [a], inventoryIntervalMs: 1_000 })
    await waitFor('connected', () => connected(b, a))
    const blobs: Digest[] = []
    for (let i = 0; i < 500; i += 50) blobs.push(...await Promise.all(Array.from({ length: 50 }, async () => await putBlob(a.store))))
    const tags = Array.from({ length: 30 }, (_, i) => `v${i}`)
    for (const t of tags) await a.store.putTag('docker.io', 'library/app', t, { digest: blobs[0]!, mediaType: MANIFEST, size: 64, verifiedAt: Date.now(), private: false })
    await waitFor('B knows A', () => peerOf(b, a.id)?.blobs === 500 && b.mesh.tagRecords('docker.io', 'library/app', 'v29').length === 1, 15_000)
    // one refresh after the initial state, so that B holds A's latest generation
    const f0 = b.mesh.counters().inventoryFetches
    await waitFor('a refresh', () => b.mesh.counters().inventoryFetches >= f0 + 2, 10_000)

    const c0 = b.mesh.counters()
    const g0 = a.mesh.counters()
    const t0 = Date.now()
    let revalidations = 0
    while (b.mesh.counters().inventoryFetches < c0.inventoryFetches + 3 && Date.now() - t0 < 20_000) {
      for (const t of tags) { await a.store.putTag('docker.io', 'library/app', t, { digest: blobs[0]!, mediaType: MANIFEST, size: 64, verifiedAt: Date.now(), private: false }); revalidations++ }
      await sleep(100)
    }
    const c1 = b.mesh.counters()
    const g1 = a.mesh.counters()
    console.log(`[hostile] revalidation: ${revalidations} tag revalidations over ${c1.inventoryFetches - c0.inventoryFetches} refreshes; entries received ${c1.inventoryEntriesReceived - c0.inventoryEntriesReceived}, ` +
      `full ${c1.inventoryFull - c0.inventoryFull}, unchanged ${c1.inventoryUnchanged - c0.inventoryUnchanged}; A's gossip messages ${g1.gossipSentMessages - g0.gossipSentMessages}`)
    expect(c1.inventoryFetches - c0.inventoryFetches).toBeGreaterThanOrEqual(3)
    expect(c1.inventoryFull - c0.inventoryFull).toBe(0)
    expect(c1.inventoryEntriesReceived - c0.inventoryEntriesReceived).toBe(0)
    // what A gossiped meanwhile is its periodic hello, not the revalidations
    expect(g1.gossipSentMessages - g0.gossipSentMessages).toBeLessThanOrEqual(c1.inventoryFetches - c0.inventoryFetches + 2)

    // a real change: a new tag target and a removed blob come as a delta of two entries
    await a.store.putTag('docker.io', 'library/app', 'v0', { digest: blobs[1]!, mediaType: MANIFEST, size: 64, verifiedAt: Date.now(), private: false })
    await a.store.delete(blobs[499]!)
    const c2 = b.mesh.counters()
    // (The two changes may reach B in one delta or in two, and the removal may also come by gossip first.)
    await waitFor('the changes to reach B', () => b.mesh.counters().inventoryDelta > c2.inventoryDelta &&
      holderIds(b, blobs[499]!).length === 0 && b.mesh.tagRecords('docker.io', 'library/app', 'v0')[0]?.record.digest === blobs[1], 10_000)
    const c3 = b.mesh.counters()
    expect(c3.inventoryFull - c2.inventoryFull).toBe(0)
    expect(c3.inventoryEntriesReceived - c2.inventoryEntriesReceived).toBeLessThanOrEqual(2)
    expect(b.mesh.tagRecords('docker.io', 'library/app', 'v0')[0]?.record.digest).toBe(blobs[1])
    expect(holderIds(b, blobs[499]!)).toEqual([])
    expect(peerOf(b, a.id)?.blobs).toBe(499)
  }, 90_000)

  it('outgoing inventory fetches are bounded: peers that never answer hold at most 4 slots', async () => {
    const c = await startNode()
    // Six peers that accept the inventory request and never answer it.
    const held: Array<{ abort: (err: Error) => void }> = []
    for (let i = 0; i < 6; i++) {
      const raw = await createLibp2p({
        addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
        transports: [tcp()],
        connectionEncrypters: [noise()],
        streamMuxers: [yamux()],
        peerDiscovery: [bootstrap({ list: [c.addr], timeout: 10 })],
        services: { identify: identify() },
      })
      await raw.handle(INVENTORY_PROTOCOL, stream => { held.push(stream) })
      cleanups.push(async () => { await raw.stop() })
    }
    await waitFor('at least five connected, four asked', () => c.mesh.status().peers.filter(p => p.connected).length >= 5 && held.length >= 4, 15_000)
    await sleep(500)
    const k = c.mesh.counters()
    console.log(`[hostile] stalling inventories: ${held.length} requests reached the peers, ${k.inventoryFetchesQueued} queued, at most ${k.inventoryFetchesPeak} at once`)
    const n = c.mesh.status().peers.filter(p => p.connected).length
    expect(held.length).toBe(4)
    expect(k.inventoryFetchesPeak).toBe(4)
    expect(k.inventoryFetchesQueued).toBe(n - 4)
  }, 60_000)
})
