// Real libp2p meshes on 127.0.0.1 with the real store. mDNS stays off: nodes are connected with
// bootstrap multiaddrs (never enable mDNS or multicast in the root network namespace).
import { afterEach, describe, expect, it } from 'vitest'
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { createServer, type AddressInfo } from 'node:net'
import { createLibp2p, type Libp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify, type Identify } from '@libp2p/identify'
import { bootstrap } from '@libp2p/bootstrap'
import { gossipsub, type GossipSub } from '@libp2p/gossipsub'
import { createLogger } from '../../src/logger.js'
import { createMetrics } from '../../src/metrics.js'
import { createFsStore } from '../../src/store/fs-store.js'
import { sha256Of, type Digest } from '../../src/oci/digest.js'
import type { BlobStore } from '../../src/store/types.js'
import { createMesh, generateMeshKey, type MeshNode } from '../../src/mesh/index.js'
import { ANNOUNCE_TOPIC } from '../../src/mesh/messages.js'

const LAYER = 'application/vnd.oci.image.layer.v1.tar+gzip'
const MANIFEST = 'application/vnd.oci.image.manifest.v1+json'

interface TestNode { mesh: MeshNode, store: BlobStore, dataDir: string, dataPort: number, id: string, addr: string }

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c()
})

let nextPort = 40_000 + Math.floor(Math.random() * 10_000)

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const srv = createServer()
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as AddressInfo).port
      srv.close(() => resolve(port))
    })
  })
}

interface StartOpts { bootstrap?: TestNode[], bootstrapAddrs?: string[], listenPort?: number, meshKey?: Uint8Array, dataDir?: string, peerTtlMs?: number, inventoryIntervalMs?: number }

async function startNode (opts: StartOpts = {}): Promise<TestNode> {
  const dataDir = opts.dataDir ?? await mkdtemp(join(tmpdir(), 'pullmesh-mesh-'))
  const logger = createLogger('silent')
  const metrics = createMetrics()
  const store = createFsStore({ logger, metrics }, { dataDir })
  await store.start()
  const dataPort = nextPort++
  const mesh = createMesh({ logger, metrics, store }, {
    dataDir,
    listen: [`/ip4/127.0.0.1/tcp/${opts.listenPort ?? 0}`],
    bootstrap: [...(opts.bootstrap ?? []).map(n => n.addr), ...(opts.bootstrapAddrs ?? [])],
    mdns: false,
    dataPort,
    ...(opts.meshKey !== undefined ? { meshKey: opts.meshKey } : {}),
    ...(opts.peerTtlMs !== undefined ? { peerTtlMs: opts.peerTtlMs } : {}),
    ...(opts.inventoryIntervalMs !== undefined ? { inventoryIntervalMs: opts.inventoryIntervalMs } : {}),
  })
  await mesh.start()
  const st = mesh.status()
  const node: TestNode = { mesh, store, dataDir, dataPort, id: st.peerId, addr: mesh.multiaddrs()[0]! }
  cleanups.push(async () => {
    await mesh.stop()
    await store.stop()
    if (opts.dataDir === undefined) await rm(dataDir, { recursive: true, force: true })
  })
  return node
}

async function waitFor (what: string, pred: () => boolean, timeoutMs = 10_000): Promise<number> {
  const t0 = Date.now()
  while (!pred()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  return Date.now() - t0
}

const connected = (a: TestNode, b: TestNode): boolean => a.mesh.status().peers.some(p => p.peerId === b.id && p.connected)

async function putBlob (store: BlobStore, opts: { private?: boolean, bytes?: number, mediaType?: string } = {}): Promise<Digest> {
  const buf = randomBytes(opts.bytes ?? 64)
  const d = sha256Of(buf)
  await store.putBuffer(d, buf, { mediaType: opts.mediaType ?? LAYER, ...(opts.private === true ? { private: true } : {}) })
  return d
}

const holderIds = (n: TestNode, d: Digest): string[] => n.mesh.holders(d).map(h => h.peerId)

/** A bare libp2p node speaking gossipsub on our topic: an arbitrary (possibly hostile) peer. */
async function startRawPeer (target: TestNode): Promise<Libp2p<{ identify: Identify, pubsub: GossipSub }>> {
  const raw = await createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    peerDiscovery: [bootstrap({ list: [target.addr], timeout: 10 })],
    services: { identify: identify(), pubsub: gossipsub({ allowPublishToZeroTopicPeers: true }) },
  })
  let stopped = false
  cleanups.push(async () => { if (!stopped) await raw.stop() })
  const origStop = raw.stop.bind(raw)
  raw.stop = async () => { stopped = true; await origStop() }
  raw.services.pubsub.subscribe(ANNOUNCE_TOPIC)
  await waitFor('raw peer sees the node subscribed', () => raw.services.pubsub.getSubscribers(ANNOUNCE_TOPIC).some(p => p.toString() === target.id))
  return raw
}

const json = (o: unknown): Uint8Array => Buffer.from(JSON.stringify(o))
/** A gossip message as a pullmesh node sends it: with its signer's origin (epoch, seq). */
let rawSeq = 0
const rawEpoch = Date.now()
const ann = (o: Record<string, unknown>): Uint8Array => json({ ...o, e: rawEpoch, s: rawSeq++ })

describe('mesh (real libp2p on loopback, real store)', () => {
  it('announces adds, removes and tags; never private content', async () => {
    const a = await startNode()
    const b = await startNode({ bootstrap: [a] })
    await waitFor('connection', () => connected(a, b) && connected(b, a))

    const d = await putBlob(a.store)
    const ms = await waitFor('B learns A holds the blob', () => holderIds(b, d).includes(a.id))
    console.log(`[mesh] add announced to peer in ${ms} ms`)
    expect(b.mesh.holders(d)).toEqual([{ peerId: a.id, dataUrl: `http://127.0.0.1:${a.dataPort}` }])
    expect(a.mesh.holders(d)).toEqual([]) // we never list ourselves

    // tag record propagates
    const record = { digest: d, mediaType: MANIFEST, size: 64, verifiedAt: Date.now(), private: false }
    await a.store.putTag('registry-1.docker.io', 'library/alpine', '3.20', record)
    await waitFor('tag record', () => b.mesh.tagRecords('registry-1.docker.io', 'library/alpine', '3.20').length === 1)
    expect(b.mesh.tagRecords('registry-1.docker.io', 'library/alpine', '3.20')).toEqual([{ peerId: a.id, record }])

    // private content (blob and tag) is never announced; a public sentinel after it shows gossip went through
    const priv = await putBlob(a.store, { private: true })
    await a.store.putTag('registry.example.com', 'team/secret', 'v1', { ...record, digest: priv, private: true })
    const sentinel = await putBlob(a.store)
    await waitFor('sentinel', () => holderIds(b, sentinel).includes(a.id))
    expect(b.mesh.holders(priv)).toEqual([])
    expect(b.mesh.tagRecords('registry.example.com', 'team/secret', 'v1')).toEqual([])
    // removing private content announces nothing either (it would leak that we had it)
    const before = a.mesh.counters().gossipSentMessages
    await a.store.delete(priv)
    await new Promise(resolve => setTimeout(resolve, 300))
    expect(a.mesh.counters().gossipSentMessages).toBe(before)

    // a node that joins later learns holdings via inventory, but nothing private
    const c = await startNode({ bootstrap: [a] })
    await waitFor('C inventory', () => holderIds(c, sentinel).includes(a.id))
    expect(c.mesh.holders(d).map(h => h.peerId)).toEqual([a.id])
    expect(c.mesh.tagRecords('registry-1.docker.io', 'library/alpine', '3.20')).toHaveLength(1)
    expect(c.mesh.tagRecords('registry.example.com', 'team/secret', 'v1')).toEqual([])

    // remove → forgotten
    await a.store.delete(d)
    await waitFor('B forgets removed blob', () => b.mesh.holders(d).length === 0)
    await waitFor('C forgets removed blob', () => c.mesh.holders(d).length === 0)
    expect(holderIds(b, sentinel)).toEqual([a.id])

    // status and metrics
    const st = b.mesh.status()
    const pa = st.peers.find(p => p.peerId === a.id)
    expect(pa).toMatchObject({ connected: true, dataUrl: `http://127.0.0.1:${a.dataPort}`, blobs: 1, score: 0 })
    expect(st.addrs[0]).toMatch(new RegExp(`/p2p/${b.id}$`))
  })

  it('a late node learns 5,000 blobs via inventory; prints gossip volume', async () => {
    const a = await startNode()
    const b = await startNode({ bootstrap: [a] })
    await waitFor('connection', () => connected(b, a))

    const N = 5_000
    const sent0 = a.mesh.counters()
    const digests: Digest[] = []
    const t0 = Date.now()
    for (let i = 0; i < N; i += 100) {
      digests.push(...await Promise.all(Array.from({ length: Math.min(100, N - i) }, async () => await putBlob(a.store, { bytes: 32 }))))
    }
    const putMs = Date.now() - t0
    await waitFor('B learns all 5,000 via gossip', () => b.mesh.status().peers.find(p => p.peerId === a.id)?.blobs === N, 30_000)
    const sent1 = a.mesh.counters()
    const msgs = sent1.gossipSentMessages - sent0.gossipSentMessages
    const bytes = sent1.gossipSentBytes - sent0.gossipSentBytes
    console.log(`[mesh] gossip for ${N} blobs: ${msgs} messages, ${bytes} payload bytes (${(bytes / N).toFixed(1)} B/blob), store puts took ${putMs} ms; ` +
      `est. wire incl. ~200 B/msg signing+framing: ${bytes + msgs * 200} B`)
    expect(b.mesh.holders(digests[N - 1]!).map(h => h.peerId)).toEqual([a.id])

    const tStart = Date.now()
    const c = await startNode({ bootstrap: [a, b] })
    const started = Date.now() - tStart
    await waitFor('C learns all of A via inventory', () => c.mesh.status().peers.find(p => p.peerId === a.id)?.blobs === N, 15_000)
    const learned = Date.now() - tStart
    console.log(`[mesh] late node: start() ${started} ms, knows A's ${N} blobs ${learned} ms after start() was called`)
    expect(c.mesh.holders(digests[0]!).map(h => h.peerId)).toEqual([a.id])
    expect(learned).toBeLessThan(10_000)
  })

  it('mesh key: wrong key or no key cannot connect, right key can', async () => {
    const key = generateMeshKey()
    expect(Buffer.from(key).toString()).toMatch(/^\/key\/swarm\/psk\/1\.0\.0\/\n\/base16\/\n[0-9a-f]{64}$/)
    const a = await startNode({ meshKey: key })
    const d = await putBlob(a.store)

    const wrong = await startNode({ meshKey: generateMeshKey(), bootstrap: [a] })
    const none = await startNode({ bootstrap: [a] })
    const right = await startNode({ meshKey: key, bootstrap: [a] })
    await waitFor('right key connects and learns holdings', () => holderIds(right, d).includes(a.id))
    await new Promise(resolve => setTimeout(resolve, 1_500)) // the others have had plenty of time
    expect(connected(wrong, a)).toBe(false)
    expect(connected(none, a)).toBe(false)
    expect(wrong.mesh.holders(d)).toEqual([])
    expect(none.mesh.holders(d)).toEqual([])
    expect(a.mesh.status().peers.filter(p => p.connected).map(p => p.peerId)).toEqual([right.id])
  })

  it('withdraws on stop, and forgets a silently vanished peer after the TTL', async () => {
    const a = await startNode({ peerTtlMs: 1_000 })
    const b = await startNode({ bootstrap: [a] })
    const d = await putBlob(b.store)
    await waitFor('A learns B', () => holderIds(a, d).includes(b.id))
    const t0 = Date.now()
    await b.mesh.stop()
    const ms = await waitFor('withdrawal', () => a.mesh.holders(d).length === 0, 5_000)
    console.log(`[mesh] graceful stop: peer forgot holdings ${Date.now() - t0} ms after stop() began (${ms} ms after it returned)`)

    // A raw peer announces, then vanishes without withdrawing: kept during the grace TTL, then forgotten.
    const raw = await startRawPeer(a)
    const rawId = raw.peerId.toString()
    const d2 = sha256Of(randomBytes(16))
    await raw.services.pubsub.publish(ANNOUNCE_TOPIC, ann({ v: 1, t: 'hello', dataPort: 5050 }))
    await raw.services.pubsub.publish(ANNOUNCE_TOPIC, ann({ v: 1, t: 'add', m: [LAYER], b: [[d2, 16, 0]] }))
    await waitFor('A learns raw peer holdings', () => holderIds(a, d2).includes(rawId))
    expect(a.mesh.holders(d2)).toEqual([{ peerId: rawId, dataUrl: 'http://127.0.0.1:5050' }])
    await raw.stop()
    const gone = Date.now()
    await waitFor('disconnect seen', () => a.mesh.status().peers.find(p => p.peerId === rawId)?.connected === false)
    expect(holderIds(a, d2)).toEqual([rawId]) // still there within the grace period
    await waitFor('forgotten after TTL', () => a.mesh.holders(d2).length === 0 && a.mesh.status().peers.every(p => p.peerId !== rawId), 5_000)
    const after = Date.now() - gone
    console.log(`[mesh] vanished peer forgotten ${after} ms after disconnect (peerTtlMs 1000)`)
    expect(after).toBeGreaterThanOrEqual(900)
  })

  it('drops oversize, malformed and wrong-version messages without crashing', async () => {
    const a = await startNode()
    const raw = await startRawPeer(a)
    const rawId = raw.peerId.toString()
    const good = sha256Of(randomBytes(16))
    const bad = sha256Of(randomBytes(16))
    const pub = async (data: Uint8Array): Promise<void> => { await raw.services.pubsub.publish(ANNOUNCE_TOPIC, data) }
    await pub(ann({ v: 1, t: 'hello', dataPort: 5051 }))
    await pub(ann({ v: 1, t: 'add', m: [LAYER], b: [[bad, 1, 0]], pad: 'x'.repeat(70 * 1024) })) // > 64 KiB
    await pub(Buffer.from('{"v":1,"t":"add",')) // not JSON
    await pub(Buffer.from([0xff, 0xfe, 0x00, 0x01]))
    await pub(ann({ v: 2, t: 'add', m: [LAYER], b: [[bad, 1, 0]] })) // future version
    await pub(ann({ t: 'add', m: [LAYER], b: [[bad, 1, 0]] })) // no version
    await pub(json({ v: 1, t: 'add', m: [LAYER], b: [[bad, 1, 0]] })) // no origin (epoch, seq)
    await pub(ann({ v: 1, t: 'add', m: [LAYER], b: [['sha256:zz', 1, 0]] })) // bad digest
    await pub(ann({ v: 1, t: 'add', m: [LAYER], b: [[bad, -1, 0]] })) // bad size
    await pub(ann({ v: 1, t: 'add', m: [LAYER], b: [[bad, 1, 7]] })) // bad media type index
    await pub(ann({ v: 1, t: 'nuke' })) // a type we do not know: ignored, not penalised
    await pub(json([1, 2, 3]))
    await pub(ann({ v: 1, t: 'tag', upstream: 'u', repo: 'r', tag: 't', record: { digest: 'nope', mediaType: MANIFEST, size: 1, verifiedAt: 1 } }))
    await pub(ann({ v: 1, t: 'add', m: [LAYER], b: [[good, 1, 0]] }))
    await waitFor('valid message after the junk', () => holderIds(a, good).includes(rawId))
    expect(a.mesh.holders(bad)).toEqual([])
    expect(a.mesh.tagRecords('u', 'r', 't')).toEqual([])
    const dropped = a.mesh.counters().gossipDropped
    console.log('[mesh] dropped by reason:', JSON.stringify(dropped))
    expect(dropped).toMatchObject({ 'too-large': 1, 'not-json': 2, version: 2, origin: 1, schema: 5, 'unknown-type': 1 })
    // still healthy: a real peer is served as usual
    const b = await startNode({ bootstrap: [a] })
    const d = await putBlob(b.store)
    await waitFor('A learns B', () => holderIds(a, d).includes(b.id))
  })

  it('keeps its peer identity across restarts (peer-key file mode 0600)', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'pullmesh-mesh-id-'))
    cleanups.push(async () => { await rm(dataDir, { recursive: true, force: true }) })
    const first = await startNode({ dataDir })
    const id = first.id
    await first.mesh.stop()
    await first.store.stop()
    const st = await stat(join(dataDir, 'peer-key'))
    expect(st.mode & 0o777).toBe(0o600)
    const second = await startNode({ dataDir })
    expect(second.id).toBe(id)
    // start/stop are idempotent
    await second.mesh.start()
    await second.mesh.stop()
    await second.mesh.stop()
  })

  it('two nodes dialing each other at once keep one connection and exchange inventories', async () => {
    const dirA = await mkdtemp(join(tmpdir(), 'pullmesh-mesh-a-'))
    const dirB = await mkdtemp(join(tmpdir(), 'pullmesh-mesh-b-'))
    cleanups.push(async () => { await rm(dirA, { recursive: true, force: true }); await rm(dirB, { recursive: true, force: true }) })
    // create both identities first so that each can name the other in its bootstrap list
    const ids: string[] = []
    for (const dataDir of [dirA, dirB]) {
      const n = await startNode({ dataDir })
      ids.push(n.id)
      await n.mesh.stop()
      await n.store.stop()
    }
    const [pA, pB] = [await freePort(), await freePort()]
    const [a, b] = await Promise.all([
      startNode({ dataDir: dirA, listenPort: pA, bootstrapAddrs: [`/ip4/127.0.0.1/tcp/${pB}/p2p/${ids[1]}`] }),
      startNode({ dataDir: dirB, listenPort: pB, bootstrapAddrs: [`/ip4/127.0.0.1/tcp/${pA}/p2p/${ids[0]}`] }),
    ])
    const d1 = await putBlob(a.store)
    const d2 = await putBlob(b.store)
    await waitFor('both learn', () => holderIds(b, d1).includes(a.id) && holderIds(a, d2).includes(b.id))
    await new Promise(resolve => setTimeout(resolve, 2_500)) // past the dedupe re-check
    const dups = a.mesh.counters().duplicateConnectionsClosed + b.mesh.counters().duplicateConnectionsClosed
    console.log(`[mesh] simultaneous dial: duplicate connections closed: ${dups}`)
    expect(connected(a, b) && connected(b, a)).toBe(true)
    const d3 = await putBlob(a.store)
    await waitFor('gossip still flows', () => holderIds(b, d3).includes(a.id))
  })
})
