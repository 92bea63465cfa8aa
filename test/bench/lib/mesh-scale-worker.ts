// A worker process of the mesh-scale simulation (../mesh-scale.ts): it hosts several REAL mesh nodes
// (createMesh from src/mesh, each with its own real fs store in a temp dir, listening on 127.0.0.1, mDNS
// off) and answers the orchestrator's requests over the IPC channel. Every TCP socket of this process
// is a mesh connection, so the sockets' byte counts are the mesh's traffic (libp2p payload: noise,
// yamux, identify, gossipsub, inventory). It exits, stopping its nodes and removing their directories,
// when asked, when the orchestrator goes away, or at its own deadline.
import '../../../src/polyfills.js'
import { subscribe } from 'node:diagnostics_channel'
import { mkdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { Socket } from 'node:net'
import { randomInt } from 'node:crypto'
import { createLogger } from '../../../src/logger.js'
import { createMetrics } from '../../../src/metrics.js'
import { createFsStore } from '../../../src/store/fs-store.js'
import { createMesh, type MeshNode } from '../../../src/mesh/index.js'
import type { BlobStore } from '../../../src/store/types.js'
import type { Digest } from '../../../src/oci/digest.js'
import { SIM_MEDIA_TYPE, simBlob, type Envelope, type ErrorReply, type NodeSnapshot, type Reply, type Request, type WorkerMemory } from './mesh-scale-common.js'

/** Hard limit on this process's life, whatever the orchestrator does. */
const MAX_LIFE_MS = Number(process.argv[2] ?? 30 * 60_000)

interface SimNode { index: number, dir: string, store: BlobStore, mesh?: MeshNode, startedAt?: number, ttfMs?: number, probeTimer?: NodeJS.Timeout, churnStep: number }

/** pino level for the nodes' logs (stdout), for diagnosing a run; silent by default. */
const logger = createLogger((process.argv[3] ?? 'silent') as 'silent')
const nodes = new Map<number, SimNode>()
let run = ''
let k = 0
let routing: 'gossip' | 'dht' | 'both' = 'gossip'
let dhtLookupMs = 300

// ---- distinct source addresses ------------------------------------------------------------

/**
 * On one machine every node's outgoing connections come from 127.0.0.1, and libp2p accepts at most
 * 5 inbound connections per second from one host (connectionManager.inboundConnectionThreshold), so a
 * loopback mesh of dozens of nodes refuses most of its own dials, which a LAN of separate hosts never
 * does. With `distinct-ips`, each outgoing loopback connection binds a random source in 127.0.0.0/8
 * (every such address is local on Linux), so that each dial looks like it comes from its own host.
 * This changes only Node's socket, not our code or libp2p's.
 */
if (process.argv[4] === 'distinct-ips') {
  const connect = Socket.prototype.connect as (...args: unknown[]) => Socket
  Socket.prototype.connect = function (this: Socket, ...args: unknown[]): Socket {
    const first = args[0]
    const opts = (Array.isArray(first) ? first[0] : first) as { host?: string, localAddress?: string, path?: string } | undefined
    if (opts !== null && typeof opts === 'object' && opts.path === undefined && opts.localAddress === undefined && typeof opts.host === 'string' && opts.host.startsWith('127.')) {
      opts.localAddress = `127.${1 + randomInt(254)}.${randomInt(256)}.${1 + randomInt(254)}`
    }
    return connect.apply(this, args)
  } as typeof Socket.prototype.connect
}

// ---- socket bytes ------------------------------------------------------------------------

const live = new Set<Socket>()
let closedSent = 0
let closedReceived = 0
function track (s: Socket): void {
  live.add(s)
  s.once('close', () => { live.delete(s); closedSent += s.bytesWritten; closedReceived += s.bytesRead })
}
subscribe('net.client.socket', (m) => { track((m as { socket: Socket }).socket) })
subscribe('net.server.socket', (m) => { track((m as { socket: Socket }).socket) })
function bytes (): { sent: number, received: number, sockets: number } {
  let sent = closedSent; let received = closedReceived
  for (const s of live) { sent += s.bytesWritten; received += s.bytesRead }
  return { sent, received, sockets: live.size }
}

function memory (gc: boolean): WorkerMemory {
  if (gc) (globalThis as { gc?: () => void }).gc?.()
  const m = process.memoryUsage()
  return { rss: m.rss, heapUsed: m.heapUsed, external: m.external, arrayBuffers: m.arrayBuffers }
}

// ---- requests ----------------------------------------------------------------------------

async function init (r: Extract<Request, { op: 'init' }>): Promise<Reply> {
  const before = memory(true)
  run = r.run
  k = r.k
  routing = r.routing ?? 'gossip'
  dhtLookupMs = r.dhtLookupMs ?? 300
  await mkdir(r.dir, { recursive: true })
  for (const index of r.nodes) {
    const dir = join(r.dir, `node-${index}`)
    const store = createFsStore({ logger, metrics: createMetrics() }, { dataDir: dir })
    const node: SimNode = { index, dir, store, churnStep: 0 }
    nodes.set(index, node)
    await store.start()
    for (let j = 0; j < r.k; j++) {
      const b = simBlob(run, index, j)
      await store.putBuffer(b.digest, b.bytes, { mediaType: SIM_MEDIA_TYPE })
    }
  }
  return { op: 'init', before, afterStores: memory(true) }
}

async function start (r: Extract<Request, { op: 'start' }>): Promise<Reply> {
  const n = nodes.get(r.index)
  if (n === undefined) throw new Error(`no node ${r.index} here`)
  const mesh = createMesh({ logger, metrics: createMetrics(), store: n.store }, {
    dataDir: n.dir,
    listen: ['/ip4/127.0.0.1/tcp/0'],
    bootstrap: r.bootstrap,
    mdns: false,
    dataPort: 1, // the data path is not simulated: nothing fetches bytes here
    routing,
    dht: { lookupMs: dhtLookupMs },
  })
  n.mesh = mesh
  const t0 = performance.now()
  n.startedAt = t0
  await mesh.start()
  const probe = r.probe
  if (probe !== undefined) {
    // Time to the first holder of a digest another (already running) node holds: polled every 5 ms, bounded.
    // With routing dht: findHolders (a DHT lookup, at most its deadline) every 250 ms.
    const poll = async (): Promise<void> => {
      const hs = routing === 'dht' ? await mesh.findHolders(probe.digest).catch(() => []) : mesh.holders(probe.digest)
      const now = performance.now()
      if (hs.some(h => h.peerId === probe.holder)) { n.ttfMs = now - t0; n.probeTimer = undefined; return }
      if (now - t0 > r.probeTimeoutMs || n.mesh === undefined) { n.probeTimer = undefined; return }
      n.probeTimer = setTimeout(() => { void poll() }, routing === 'dht' ? 250 : 5)
    }
    void poll()
  }
  return { op: 'start', addr: mesh.multiaddrs()[0] ?? '', peerId: mesh.peerId() }
}

function snapshotNode (n: SimNode): NodeSnapshot | undefined {
  const mesh = n.mesh
  if (mesh === undefined) return undefined
  const st = mesh.status()
  const c = mesh.counters()
  return {
    index: n.index,
    peerId: st.peerId,
    connected: st.peers.filter(p => p.connected).length,
    counters: {
      gossipSentMessages: c.gossipSentMessages, gossipSentBytes: c.gossipSentBytes, gossipReceived: c.gossipReceived,
      inventoryFetches: c.inventoryFetches, inventoryFull: c.inventoryFull, inventoryDelta: c.inventoryDelta, inventoryUnchanged: c.inventoryUnchanged,
      inventoryFailures: c.inventoryFailures, inventoryEntriesSent: c.inventoryEntriesSent, inventoryEntriesReceived: c.inventoryEntriesReceived,
      indexBytes: c.indexBytes, indexMaxBytes: c.indexMaxBytes, indexEvicted: c.indexEvicted, indexRefused: c.indexRefused,
      gossipDropped: { ...c.gossipDropped },
    },
    ...(n.ttfMs !== undefined ? { ttfMs: n.ttfMs } : {}),
    indexedBlobs: st.peers.reduce((s, p) => s + p.blobs, 0),
  }
}

function snapshot (gc: boolean): Reply {
  const cpu = process.cpuUsage()
  const list: NodeSnapshot[] = []
  for (const n of nodes.values()) { const s = snapshotNode(n); if (s !== undefined) list.push(s) }
  return { op: 'snapshot', snapshot: { mem: memory(gc), bytes: bytes(), nodes: list, cpuUserMs: cpu.user / 1000, cpuSystemMs: cpu.system / 1000 } }
}

async function lookup (r: Extract<Request, { op: 'lookup' }>): Promise<Reply> {
  const lat: number[] = []
  let asked = 0; let found = 0; let anyHolder = 0
  for (const n of nodes.values()) {
    const mesh = n.mesh
    if (mesh === undefined) continue
    // With routing dht, each node asks a different slice of the samples, at most perNode, one at a time.
    const mine = r.perNode === undefined ? r.samples : Array.from({ length: Math.min(r.perNode, r.samples.length) }, (_, i) => r.samples[(n.index * r.perNode! + i) % r.samples.length]!)
    for (const s of mine) {
      if (s.node === n.index) continue // our own content is not in the peer index
      const t0 = process.hrtime.bigint()
      const hs = routing === 'dht' ? await mesh.findHolders(s.digest as Digest) : mesh.holders(s.digest as Digest)
      lat.push(Number(process.hrtime.bigint() - t0))
      asked++
      if (hs.length > 0) anyHolder++
      if (hs.some(h => h.peerId === s.holder)) found++
    }
  }
  return { op: 'lookup', latenciesNs: Float64Array.from(lat), asked, found, anyHolder }
}

/**
 * `adds` steps, `periodMs` apart: every node adds one new blob and deletes its oldest original one.
 * Nodes churn side by side; a step that falls behind is skipped, and no step starts after the window.
 */
async function churn (r: Extract<Request, { op: 'churn' }>): Promise<Reply> {
  const added: Array<{ node: number, j: number }> = []
  const deleted: Array<{ node: number, j: number }> = []
  const list = [...nodes.values()].filter(n => n.mesh !== undefined)
  const t0 = Date.now()
  const end = t0 + r.adds * r.periodMs
  await Promise.all(list.map(async (n, x) => {
    const offset = Math.floor((x / list.length) * r.periodMs)
    for (let step = 0; step < r.adds; step++) {
      const due = t0 + offset + step * r.periodMs
      if (due >= end) break
      const wait = due - Date.now()
      if (wait < -r.periodMs) continue // fell behind: skip a step rather than pile up
      if (wait > 0) await new Promise(resolve => setTimeout(resolve, wait))
      const s = n.churnStep++
      if (s >= k) break
      const b = simBlob(run, n.index, k + s)
      await n.store.putBuffer(b.digest, b.bytes, { mediaType: SIM_MEDIA_TYPE })
      added.push({ node: n.index, j: k + s })
      if (await n.store.delete(simBlob(run, n.index, s).digest)) deleted.push({ node: n.index, j: s })
    }
  }))
  if (end > Date.now()) await new Promise(resolve => setTimeout(resolve, end - Date.now()))
  return { op: 'churn', added, deleted }
}

let stopping: Promise<number> | undefined
async function stopAll (): Promise<number> {
  stopping ??= (async () => {
    let stopped = 0
    const all = [...nodes.values()]
    nodes.clear()
    await Promise.all(all.map(async n => {
      if (n.probeTimer !== undefined) clearTimeout(n.probeTimer)
      try { await n.mesh?.stop(); stopped++ } catch { /* keep stopping the rest */ }
      try { await n.store.stop() } catch { /* keep stopping the rest */ }
      await rm(n.dir, { recursive: true, force: true })
    }))
    return stopped
  })()
  return await stopping
}

async function handle (r: Request): Promise<Reply> {
  switch (r.op) {
    case 'init': return await init(r)
    case 'start': return await start(r)
    case 'snapshot': return snapshot(r.gc)
    case 'lookup': return await lookup(r)
    case 'churn': return await churn(r)
    case 'stop': return { op: 'stop', stopped: await stopAll() }
  }
}

const exitSoon = (code: number): void => { void stopAll().finally(() => process.exit(code)) }
process.on('message', (msg: Envelope<Request>) => {
  handle(msg.body).then(
    body => { process.send?.({ id: msg.id, body } satisfies Envelope<Reply>) },
    (err: unknown) => { process.send?.({ id: msg.id, error: err instanceof Error ? err.stack ?? err.message : String(err) } satisfies ErrorReply) },
  )
})
process.on('disconnect', () => { exitSoon(0) })
for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => { exitSoon(0) })
setTimeout(() => { console.error(`mesh-scale worker ${process.pid}: deadline reached, exiting`); exitSoon(3) }, MAX_LIFE_MS).unref()
process.send?.({ id: 0, body: { op: 'ready' } })
