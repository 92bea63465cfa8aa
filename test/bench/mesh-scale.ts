// Scenario 10, mesh scale (issue 11, part 4): N REAL mesh nodes (src/mesh createMesh, each with a real
// fs store in a temp dir pre-filled with K synthetic 64-byte blobs), several per worker process, on
// 127.0.0.1 with mDNS off. Nodes start in waves; each is given up to 3 bootstrap addresses of nodes
// already running, and peer exchange completes the mesh. Measured per node:
//   - memory: worker RSS and V8 heap (after gc) ÷ nodes, above the worker's baseline; and above the
//     stores alone ("mesh"); and the PeerIndex's own accounting (counters().indexBytes);
//   - mesh bytes per minute, idle and while content changes (every node adds and deletes blobs): the
//     worker's TCP sockets (every socket there is a mesh connection; libp2p payload incl. noise, yamux,
//     identify, gossipsub and inventory), plus our own counters (gossip payload, inventory entries);
//   - time from a node's mesh.start() to the first holder of a digest another running node holds;
//   - mesh.holders() latency p50/p99 (a local index lookup) and the fraction of held content findable.
// Then fits per-node memory and bytes/min against N (linear and power law) and extrapolates to 1,000
// and 5,000 nodes. The fit is only as good as the runs it is given: check "full mesh" in the table first
// (on a loaded 2-core machine a 100-node mesh did not finish forming; its row then describes a partial
// mesh, and the fit over it is meaningless: fit the runs whose mesh formed).
//
// Standalone:  node --import tsx test/bench/mesh-scale.ts [--nodes 10,30,100] [--k 500] [--idle 60]
//              [--churn 60] [--churn-rate 20] [--per-worker 25] [--samples 1000] [--converge 120]
//              [--bootstrap all|3] (every running node, or 3 random ones and peer exchange)
//              [--one-ip] (every dial from 127.0.0.1, as libp2p's per-host inbound limit sees it)
//              [--log-level debug] (the nodes' logs, to stdout)
//              [--routing dht] (no inventory exchange; lookups are DHT lookups: --dht-lookup-ms 300 deadline,
//              --dht-lookups 300 of them in all, spread over the nodes, one at a time per node)
// In the bench: npm run bench -- --only meshscale   (smoke: N=5, a few seconds per window)
// Results: test/bench/results/mesh-scale.{md,json} (standalone) and the bench's own table.
// Every worker is stopped by its PID, every temp dir removed, also on failure; every loop is bounded.
import { fork, type ChildProcess } from 'node:child_process'
import { randomBytes, randomInt } from 'node:crypto'
import { rmSync } from 'node:fs'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import type { Digest } from '../../src/oci/digest.js'
import { simBlob, type Envelope, type ErrorReply, type NodeSnapshot, type Reply, type Request, type WorkerMemory, type WorkerSnapshot } from './lib/mesh-scale-common.js'
import { absAtMost, notRun, row, type Row, type Target } from './lib/report.js'

const WORKER = fileURLToPath(new URL('./lib/mesh-scale-worker.ts', import.meta.url))
const SCENARIO = '10 mesh scale'

export interface ScaleOptions {
  nodes: number[]
  /** Synthetic blobs per node. */
  k: number
  idleMs: number
  churnMs: number
  /** Blobs each node adds (and deletes) per minute during the churn window. */
  churnPerMin: number
  perWorker: number
  /** Digests sampled for the lookup and findability checks (each node looks up every one not its own). */
  samples: number
  /**
   * Bootstrap addresses per node: up to this many random running nodes (peer exchange must find the
   * rest), or 0 for every running node (what a DNS name listing every peer, e.g. a Kubernetes headless
   * Service, gives a node).
   */
  bootstrapPeers: number
  /** Bound on waiting for the full mesh and every probe after the last start. */
  convergeMs: number
  log: (msg: string) => void
  scratch: string
  /**
   * Each outgoing connection binds its own random 127.x.y.z source, as if every node were its own host
   * (see the worker). Off: every dial comes from 127.0.0.1 and libp2p's per-host inbound limit (5/s)
   * refuses most of them once N reaches a few dozen.
   */
  distinctIps: boolean
  /** The nodes' pino level (their logs go to stdout); silent unless diagnosing. */
  logLevel?: string
  /**
   * Content routing of every node: gossip (full inventory, lookups read the local index), or dht (no
   * inventory exchange; lookups are DHT lookups with a deadline of dhtLookupMs, dhtLookups of them in all).
   */
  routing?: 'gossip' | 'dht'
  dhtLookupMs?: number
  dhtLookups?: number
}

export interface ScaleResult {
  n: number
  routing?: 'gossip' | 'dht'
  k: number
  bootstrapPeers: number
  distinctIps: boolean
  workers: number
  load: { before: number[], after: number[] }
  startMs: number
  /** From the last start until every node had N-1 connections (undefined: not within convergeMs). */
  fullMeshMs?: number
  connectedMin: number
  connectedMedian: number
  memory: {
    /** Worker RSS above its empty baseline, ÷ nodes (stores + meshes). */
    rssPerNode: number
    /** RSS above the stores alone ÷ nodes: what the meshes add. */
    meshRssPerNode: number
    heapPerNode: number
    meshHeapPerNode: number
    /** The PeerIndex's own accounting, mean over nodes. */
    indexBytesPerNode: number
    indexBytesMax: number
  }
  idle: Traffic
  churn: Traffic & { addsPerNodePerMin: number }
  ttfMs: { p50?: number, p99?: number, max?: number, found: number, probes: number }
  lookupUs: { p50?: number, p99?: number, max?: number, lookups: number }
  findable: { static: number, afterChurn: number, staleAfterChurn: number, asked: number }
  indexedBlobsPerNode: number
  /** Gossip messages dropped by all nodes over the whole run, by reason. */
  gossipDropped: Record<string, number>
}

export interface Traffic {
  ms: number
  /** TCP payload bytes sent by all nodes ÷ nodes ÷ minutes. */
  bytesPerMinPerNode: number
  gossipPayloadBytesPerMinPerNode: number
  gossipMessagesPerMinPerNode: number
  inventoryEntriesSentPerMinPerNode: number
  inventoryFetchesPerMinPerNode: number
  cpuPercent: number
}

// ---- workers -----------------------------------------------------------------------------

interface Worker {
  child: ChildProcess
  nodes: number[]
  request: <T extends Reply['op']>(body: Extract<Request, { op: T }>, timeoutMs: number) => Promise<Extract<Reply, { op: T }>>
  exited: () => boolean
}

async function startWorker (maxLifeMs: number, logLevel: string, distinctIps: boolean): Promise<Worker> {
  const child = fork(WORKER, [String(maxLifeMs), logLevel, distinctIps ? 'distinct-ips' : 'one-ip'], { execArgv: ['--import', 'tsx', '--expose-gc'], serialization: 'advanced', stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  let exited = false
  const pending = new Map<number, { resolve: (r: Reply) => void, reject: (e: Error) => void, timer: NodeJS.Timeout }>()
  let nextId = 1
  let readyResolve: () => void = () => {}
  const ready = new Promise<void>(resolve => { readyResolve = resolve })
  child.on('message', (m: Envelope<Reply> | ErrorReply) => {
    if (m.id === 0) { readyResolve(); return }
    const p = pending.get(m.id)
    if (p === undefined) return
    pending.delete(m.id)
    clearTimeout(p.timer)
    if ('error' in m) p.reject(new Error(`worker ${child.pid}: ${m.error}`))
    else p.resolve(m.body)
  })
  child.once('exit', (code, sig) => {
    exited = true
    for (const p of pending.values()) { clearTimeout(p.timer); p.reject(new Error(`worker ${child.pid} exited (${code ?? sig})`)) }
    pending.clear()
  })
  await Promise.race([ready, new Promise((_, reject) => setTimeout(() => reject(new Error('worker did not start within 60 s')), 60_000).unref())])
  return {
    child,
    nodes: [],
    exited: () => exited,
    async request (body, timeoutMs) {
      if (exited) throw new Error(`worker ${child.pid} has exited`)
      const id = nextId++
      return await new Promise((resolve, reject) => {
        const timer = setTimeout(() => { pending.delete(id); reject(new Error(`worker ${child.pid}: ${body.op} timed out after ${timeoutMs} ms`)) }, timeoutMs)
        pending.set(id, { resolve: resolve as (r: Reply) => void, reject, timer })
        child.send({ id, body } satisfies Envelope<Request>)
      })
    },
  }
}

/** Asks each worker to stop its nodes (bounded), then ends it by its PID. */
async function stopWorkers (workers: Worker[]): Promise<void> {
  await Promise.all(workers.map(async w => {
    if (!w.exited()) {
      try { await w.request({ op: 'stop' }, 60_000) } catch { /* killed below */ }
    }
    if (!w.exited() && w.child.pid !== undefined) {
      const gone = new Promise(resolve => w.child.once('exit', resolve))
      w.child.disconnect?.()
      process.kill(w.child.pid, 'SIGTERM')
      const t = setTimeout(() => { if (!w.exited() && w.child.pid !== undefined) process.kill(w.child.pid, 'SIGKILL') }, 10_000)
      await gone
      clearTimeout(t)
    }
  }))
}

// ---- statistics --------------------------------------------------------------------------

export function percentile (xs: ArrayLike<number>, p: number): number | undefined {
  const v = Array.from(xs).filter(Number.isFinite).sort((a, b) => a - b)
  if (v.length === 0) return undefined
  return v[Math.min(v.length - 1, Math.max(0, Math.ceil((p / 100) * v.length) - 1))]
}
const median = (xs: number[]): number => percentile(xs, 50) ?? 0

/** Least squares y = a + b·x. */
export function linearFit (xs: number[], ys: number[]): { a: number, b: number, at: (x: number) => number } {
  const n = xs.length
  const mx = xs.reduce((s, x) => s + x, 0) / n
  const my = ys.reduce((s, y) => s + y, 0) / n
  let sxy = 0; let sxx = 0
  for (let i = 0; i < n; i++) { sxy += (xs[i]! - mx) * (ys[i]! - my); sxx += (xs[i]! - mx) ** 2 }
  const b = sxx === 0 ? 0 : sxy / sxx
  const a = my - b * mx
  return { a, b, at: x => a + b * x }
}

/** Least squares on logs: y = c·x^p (only for positive ys). */
export function powerFit (xs: number[], ys: number[]): { c: number, p: number, at: (x: number) => number } | undefined {
  const pts = xs.map((x, i) => [x, ys[i]!] as const).filter(([x, y]) => x > 0 && y > 0)
  if (pts.length < 2) return undefined
  const l = linearFit(pts.map(([x]) => Math.log(x)), pts.map(([, y]) => Math.log(y)))
  const c = Math.exp(l.a)
  return { c, p: l.b, at: x => c * x ** l.b }
}

// ---- one run at N nodes ----------------------------------------------------------------------

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

function sumNodes (snaps: WorkerSnapshot[]): NodeSnapshot[] { return snaps.flatMap(s => s.nodes) }

function traffic (a: WorkerSnapshot[], b: WorkerSnapshot[], n: number, ms: number): Traffic {
  const min = ms / 60_000
  const sent = b.reduce((s, w) => s + w.bytes.sent, 0) - a.reduce((s, w) => s + w.bytes.sent, 0)
  const c = (snaps: WorkerSnapshot[], f: (x: NodeSnapshot['counters']) => number): number => sumNodes(snaps).reduce((s, x) => s + f(x.counters), 0)
  const d = (f: (x: NodeSnapshot['counters']) => number): number => (c(b, f) - c(a, f)) / n / min
  const cpu = (snaps: WorkerSnapshot[]): number => snaps.reduce((s, w) => s + w.cpuUserMs + w.cpuSystemMs, 0)
  return {
    ms,
    bytesPerMinPerNode: sent / n / min,
    gossipPayloadBytesPerMinPerNode: d(x => x.gossipSentBytes),
    gossipMessagesPerMinPerNode: d(x => x.gossipSentMessages),
    inventoryEntriesSentPerMinPerNode: d(x => x.inventoryEntriesSent),
    inventoryFetchesPerMinPerNode: d(x => x.inventoryFetches),
    cpuPercent: 100 * (cpu(b) - cpu(a)) / ms,
  }
}

export async function simulate (n: number, o: ScaleOptions): Promise<ScaleResult> {
  const runId = randomBytes(6).toString('hex')
  const dir = await mkdtemp(join(o.scratch, `mesh-scale-${n}-`))
  const workers: Worker[] = []
  const loadBefore = loadavg().map(x => Math.round(x * 100) / 100)
  const deadline = Date.now() + 10 * 60_000 + o.idleMs + o.churnMs + o.convergeMs
  try {
    const w = Math.max(1, Math.ceil(n / o.perWorker))
    const maxLife = deadline - Date.now() + 120_000
    workers.push(...await Promise.all(Array.from({ length: w }, async () => await startWorker(maxLife, o.logLevel ?? 'silent', o.distinctIps))))
    for (let i = 0; i < n; i++) workers[i % w]!.nodes.push(i)
    const byNode = (i: number): Worker => workers[i % w]!

    // Stores, pre-filled.
    const t0 = performance.now()
    const inits = await Promise.all(workers.map(async wk => await wk.request({ op: 'init', run: runId, nodes: wk.nodes, k: o.k, dir: join(dir, `w${wk.child.pid}`), routing: o.routing ?? 'gossip', ...(o.dhtLookupMs !== undefined ? { dhtLookupMs: o.dhtLookupMs } : {}) }, 120_000 + 20 * o.k * wk.nodes.length)))
    o.log(`    N=${n}: ${w} worker(s), ${n}×${o.k} blobs stored in ${((performance.now() - t0) / 1000).toFixed(1)} s`)

    // Starts, in waves; each node bootstraps from up to 3 random running nodes.
    const addrs: string[] = []
    const peerIds: string[] = []
    const wave = Math.max(2, Math.ceil(n / 10))
    const tStart = performance.now()
    let started = 0
    while (started < n) {
      if (Date.now() > deadline) throw new Error('deadline while starting')
      const batch = started === 0 ? [0] : Array.from({ length: Math.min(wave, n - started) }, (_, i) => started + i)
      const replies = await Promise.all(batch.map(async i => {
        const boot = new Set<number>()
        if (o.bootstrapPeers === 0) for (let b = 0; b < started; b++) boot.add(b)
        for (let t = 0; t < 10 * o.bootstrapPeers && boot.size < Math.min(o.bootstrapPeers, started); t++) boot.add(randomInt(started))
        let probe: { digest: Digest, holder: string } | undefined
        if (started > 0) {
          const h = randomInt(started)
          probe = { digest: simBlob(runId, h, randomInt(o.k)).digest, holder: peerIds[h]! }
        }
        return await byNode(i).request({ op: 'start', index: i, bootstrap: [...boot].map(b => addrs[b]!), probeTimeoutMs: o.convergeMs + 30_000, ...(probe !== undefined ? { probe } : {}) }, 60_000)
      }))
      batch.forEach((i, x) => { addrs[i] = replies[x]!.addr; peerIds[i] = replies[x]!.peerId })
      started += batch.length
    }
    const startMs = performance.now() - tStart
    o.log(`    N=${n}: all started in ${(startMs / 1000).toFixed(1)} s`)

    // Convergence: every node connected to every other, every probe answered (bounded).
    const snapAll = async (gc = false): Promise<WorkerSnapshot[]> => (await Promise.all(workers.map(async wk => await wk.request({ op: 'snapshot', gc }, 60_000)))).map(r => r.snapshot)
    const tConv = performance.now()
    let fullMeshMs: number | undefined
    let snaps = await snapAll()
    for (;;) {
      const ns = sumNodes(snaps)
      const full = ns.every(x => x.connected >= n - 1)
      if (full && fullMeshMs === undefined) fullMeshMs = performance.now() - tConv
      const probesDone = ns.every(x => x.index === 0 || x.ttfMs !== undefined)
      if ((full && probesDone) || performance.now() - tConv > o.convergeMs || Date.now() > deadline) break
      await sleep(1000)
      snaps = await snapAll()
    }
    const conn = sumNodes(snaps).map(x => x.connected)
    o.log(`    N=${n}: ${fullMeshMs !== undefined ? `full mesh ${(fullMeshMs / 1000).toFixed(1)} s after the last start` : `NO full mesh within ${o.convergeMs / 1000} s`}; connections min ${Math.min(...conn)} median ${median(conn)}`)
    await sleep(Math.min(5_000, o.idleMs / 4)) // inventories requested on the last connections land

    // Lookups and findability, static content.
    const sample = (count: number, pick: () => { node: number, j: number }): Array<{ digest: Digest, holder: string, node: number }> =>
      Array.from({ length: count }, () => { const p = pick(); return { digest: simBlob(runId, p.node, p.j).digest, holder: peerIds[p.node]!, node: p.node } })
    const doLookups = async (samples: Array<{ digest: Digest, holder: string, node: number }>): Promise<{ lat: number[], asked: number, found: number }> => {
      const perNode = o.routing === 'dht' ? Math.max(1, Math.ceil((o.dhtLookups ?? 300) / n)) : undefined
      const rs = await Promise.all(workers.map(async wk => await wk.request({ op: 'lookup', samples, ...(perNode !== undefined ? { perNode } : {}) }, 600_000)))
      return { lat: rs.flatMap(r => Array.from(r.latenciesNs)), asked: rs.reduce((s, r) => s + r.asked, 0), found: rs.reduce((s, r) => s + r.found, 0) }
    }
    const stat = await doLookups(sample(o.samples, () => ({ node: randomInt(n), j: randomInt(o.k) })))
    if (stat.found === 0) throw new Error(`N=${n}: no sampled digest is findable from any node (${stat.asked} lookups): the mesh did not form`)

    // Idle window.
    const idleA = await snapAll()
    await sleep(o.idleMs)
    const idleB = await snapAll()
    const idle = traffic(idleA, idleB, n, o.idleMs)
    o.log(`    N=${n}: idle ${(idle.bytesPerMinPerNode / 1024).toFixed(1)} KiB/min/node`)
    const memSnaps = await snapAll(true)

    // Churn window: every node adds one blob and deletes one every 60/churnPerMin s.
    const steps = Math.max(1, Math.round(o.churnPerMin * o.churnMs / 60_000))
    const churnA = await snapAll()
    const tc0 = performance.now()
    const churned = await Promise.all(workers.map(async wk => await wk.request({ op: 'churn', adds: steps, periodMs: Math.floor(o.churnMs / steps) }, o.churnMs + 120_000)))
    const churnMs = performance.now() - tc0
    const churnB = await snapAll()
    const churn = { ...traffic(churnA, churnB, n, churnMs), addsPerNodePerMin: churned.reduce((s, r) => s + r.added.length, 0) / n / (churnMs / 60_000) }
    o.log(`    N=${n}: churn ${(churn.bytesPerMinPerNode / 1024).toFixed(1)} KiB/min/node (${churn.addsPerNodePerMin.toFixed(1)} adds + deletes /min/node)`)
    await sleep(Math.min(3_000, o.churnMs / 4))
    const deleted = new Set(churned.flatMap(r => r.deleted).map(d => `${d.node}/${d.j}`))
    const addedSet = new Set(churned.flatMap(r => r.added).map(d => `${d.node}/${d.j}`))
    const heldNow = (): { node: number, j: number } => {
      for (let t = 0; t < 100; t++) {
        const node = randomInt(n); const j = randomInt(o.k + steps)
        if (j < o.k ? !deleted.has(`${node}/${j}`) : addedSet.has(`${node}/${j}`)) return { node, j }
      }
      return { node: 0, j: o.k - 1 }
    }
    const after = await doLookups(sample(o.samples, heldNow))
    const deletedList = [...deleted].map(s => { const [a, b] = s.split('/'); return { node: Number(a), j: Number(b) } })
    const stale = deletedList.length > 0 ? await doLookups(sample(Math.min(o.samples, 200), () => deletedList[randomInt(deletedList.length)]!)) : { lat: [], asked: 0, found: 0 }

    // Memory, per worker above its baselines.
    let rss = 0; let meshRss = 0; let heap = 0; let meshHeap = 0
    memSnaps.forEach((s, x) => {
      const base: WorkerMemory = inits[x]!.before; const stores: WorkerMemory = inits[x]!.afterStores
      rss += s.mem.rss - base.rss; meshRss += s.mem.rss - stores.rss
      heap += s.mem.heapUsed - base.heapUsed; meshHeap += s.mem.heapUsed - stores.heapUsed
    })
    const finalNodes = sumNodes(memSnaps)
    const ttf = finalNodes.filter(x => x.index !== 0).map(x => x.ttfMs).filter((x): x is number => x !== undefined)
    const lat = stat.lat.map(x => x / 1000)
    return {
      n, ...(o.routing !== undefined ? { routing: o.routing } : {}), k: o.k, bootstrapPeers: o.bootstrapPeers, distinctIps: o.distinctIps, workers: w, load: { before: loadBefore, after: loadavg().map(x => Math.round(x * 100) / 100) },
      startMs, ...(fullMeshMs !== undefined ? { fullMeshMs } : {}), connectedMin: Math.min(...conn), connectedMedian: median(conn),
      memory: {
        rssPerNode: rss / n, meshRssPerNode: meshRss / n, heapPerNode: heap / n, meshHeapPerNode: meshHeap / n,
        indexBytesPerNode: finalNodes.reduce((s, x) => s + x.counters.indexBytes, 0) / n,
        indexBytesMax: Math.max(...finalNodes.map(x => x.counters.indexBytes)),
      },
      idle, churn,
      ttfMs: { ...optional('p50', percentile(ttf, 50)), ...optional('p99', percentile(ttf, 99)), ...optional('max', percentile(ttf, 100)), found: ttf.length, probes: n - 1 },
      lookupUs: { ...optional('p50', percentile(lat, 50)), ...optional('p99', percentile(lat, 99)), ...optional('max', percentile(lat, 100)), lookups: lat.length },
      findable: { static: stat.asked > 0 ? stat.found / stat.asked : 0, afterChurn: after.asked > 0 ? after.found / after.asked : 0, staleAfterChurn: stale.asked > 0 ? stale.found / stale.asked : 0, asked: stat.asked },
      indexedBlobsPerNode: finalNodes.reduce((s, x) => s + x.indexedBlobs, 0) / n,
      gossipDropped: sumNodes(churnB).reduce<Record<string, number>>((acc, x) => {
        for (const [k, v] of Object.entries(x.counters.gossipDropped)) acc[k] = (acc[k] ?? 0) + v
        return acc
      }, {}),
    }
  } finally {
    await stopWorkers(workers)
    await rm(dir, { recursive: true, force: true })
  }
}

function optional<K extends string> (key: K, v: number | undefined): Partial<Record<K, number>> {
  return v === undefined ? {} : { [key]: v } as Record<K, number>
}

// ---- reporting -------------------------------------------------------------------------------

const KiB = 1024
const MiB = 1024 ** 2
const f1 = (x: number | undefined, d = 1): string => x === undefined ? '—' : x.toFixed(d)

export function tableMarkdown (rs: ScaleResult[]): string {
  const lines = [
    '| N | bootstrap | workers | load (1 min) | full mesh after last start | RSS/node (mesh only) | heap/node (mesh only) | index bytes/node | idle KiB/min/node | churn KiB/min/node | time to find p50 / p99 | lookup (holders() or, routing dht, findHolders()) p50 / p99 | findable (static / after churn) | stale after delete |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for (const r of rs) {
    lines.push(`| ${r.n} | ${r.bootstrapPeers === 0 ? 'all' : r.bootstrapPeers}${r.distinctIps ? '' : ', one IP'}${r.routing === 'dht' ? ', routing dht' : ''} | ${r.workers} | ${r.load.before[0]}→${r.load.after[0]} | ${r.fullMeshMs !== undefined ? `${f1(r.fullMeshMs / 1000)} s` : `no (min ${r.connectedMin} conns)`} | ` +
      `${f1(r.memory.rssPerNode / MiB)} MiB (${f1(r.memory.meshRssPerNode / MiB)}) | ${f1(r.memory.heapPerNode / MiB)} MiB (${f1(r.memory.meshHeapPerNode / MiB)}) | ${f1(r.memory.indexBytesPerNode / MiB, 2)} MiB | ` +
      `${f1(r.idle.bytesPerMinPerNode / KiB)} | ${f1(r.churn.bytesPerMinPerNode / KiB)} (${f1(r.churn.addsPerNodePerMin, 0)} adds+deletes/min) | ` +
      `${f1(r.ttfMs.p50, 0)} / ${f1(r.ttfMs.p99, 0)} ms (${r.ttfMs.found}/${r.ttfMs.probes}) | ${f1(r.lookupUs.p50, 1)} / ${f1(r.lookupUs.p99, 1)} µs | ` +
      `${(100 * r.findable.static).toFixed(2)} % / ${(100 * r.findable.afterChurn).toFixed(2)} % | ${(100 * r.findable.staleAfterChurn).toFixed(1)} % |`)
  }
  return lines.join('\n') + '\n'
}

interface FitLine { metric: string, unit: string, linear: { a: number, b: number }, power?: { c: number, p: number }, at1000: { linear: number, power?: number }, at5000: { linear: number, power?: number } }

export function fits (rs: ScaleResult[]): FitLine[] {
  const xs = rs.map(r => r.n)
  const metrics: Array<[string, string, (r: ScaleResult) => number]> = [
    ['RSS per node', 'MiB', r => r.memory.rssPerNode / MiB],
    ['mesh RSS per node', 'MiB', r => r.memory.meshRssPerNode / MiB],
    ['mesh heap per node', 'MiB', r => r.memory.meshHeapPerNode / MiB],
    ['peer index per node', 'MiB', r => r.memory.indexBytesPerNode / MiB],
    ['idle traffic per node', 'KiB/min', r => r.idle.bytesPerMinPerNode / KiB],
    ['churn traffic per node', 'KiB/min', r => r.churn.bytesPerMinPerNode / KiB],
    ['time to find p50', 'ms', r => r.ttfMs.p50 ?? NaN],
  ]
  return metrics.map(([metric, unit, f]) => {
    const ys = rs.map(f)
    const ok = xs.map((x, i) => [x, ys[i]!] as const).filter(([, y]) => Number.isFinite(y))
    const l = linearFit(ok.map(([x]) => x), ok.map(([, y]) => y))
    const p = powerFit(ok.map(([x]) => x), ok.map(([, y]) => y))
    return {
      metric, unit, linear: { a: l.a, b: l.b }, ...(p !== undefined ? { power: { c: p.c, p: p.p } } : {}),
      at1000: { linear: l.at(1000), ...(p !== undefined ? { power: p.at(1000) } : {}) },
      at5000: { linear: l.at(5000), ...(p !== undefined ? { power: p.at(5000) } : {}) },
    }
  })
}

export function fitMarkdown (fl: FitLine[]): string {
  const lines = ['| per node | linear fit a + b·N | power fit c·N^p | at 1,000 (linear / power) | at 5,000 (linear / power) |', '| --- | --- | --- | --- | --- |']
  const g = (x: number): string => Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(3)
  for (const f of fl) {
    lines.push(`| ${f.metric} (${f.unit}) | ${g(f.linear.a)} + ${g(f.linear.b)}·N | ${f.power !== undefined ? `${g(f.power.c)}·N^${f.power.p.toFixed(2)}` : '—'} | ` +
      `${g(f.at1000.linear)} / ${f.at1000.power !== undefined ? g(f.at1000.power) : '—'} | ${g(f.at5000.linear)} / ${f.at5000.power !== undefined ? g(f.at5000.power) : '—'} |`)
  }
  return lines.join('\n') + '\n'
}

export async function runScale (o: ScaleOptions): Promise<{ results: ScaleResult[], failures: string[] }> {
  const results: ScaleResult[] = []
  const failures: string[] = []
  for (const n of o.nodes) {
    o.log(`  mesh scale N=${n} (K=${o.k}, bootstrap ${o.bootstrapPeers === 0 ? 'all' : o.bootstrapPeers}, ${o.perWorker} nodes per worker, load ${loadavg().map(x => x.toFixed(2)).join(' ')})`)
    try {
      results.push(await simulate(n, o))
    } catch (err) {
      const msg = err instanceof Error ? err.stack ?? err.message : String(err)
      o.log(`  mesh scale N=${n} FAILED: ${msg}`)
      failures.push(`N=${n}: ${msg.split('\n')[0] ?? msg}`)
    }
  }
  return { results, failures }
}

/** Targets of issue 11 at 1,000 nodes (extrapolated by the power fit, else the linear one). */
const TARGETS: Array<[string, number, string, Target]> = [
  ['mesh RSS per node', 64, 'MiB', absAtMost(64, '≤ 64 MiB at 1,000')],
  ['idle traffic per node', 100_000 / KiB, 'KiB/min', absAtMost(100_000 / KiB, '≤ 100 KB/min at 1,000')],
]

/** Scenario 10 in `npm run bench`: smoke N=5 with short windows; full 10,30,100 with 60 s windows. */
export async function meshScale (ctx: { smoke: boolean, scratch: string, log: (m: string) => void }): Promise<Row[]> {
  const o: ScaleOptions = ctx.smoke
    ? { nodes: [5], k: 100, idleMs: 3_000, churnMs: 3_000, churnPerMin: 60, perWorker: 5, samples: 100, bootstrapPeers: 1, distinctIps: true, convergeMs: 15_000, log: ctx.log, scratch: ctx.scratch }
    : { nodes: [10, 30, 100], k: 500, idleMs: 60_000, churnMs: 60_000, churnPerMin: 20, perWorker: 25, samples: 1000, bootstrapPeers: 0, distinctIps: true, convergeMs: 120_000, log: ctx.log, scratch: ctx.scratch }
  const { results, failures } = await runScale(o)
  if (results.length === 0) throw new Error(`mesh scale: no run completed: ${failures.join('; ')}`)
  ctx.log('\n' + tableMarkdown(results))
  const rows: Row[] = []
  for (const r of results) {
    const s = `${SCENARIO} N=${r.n}`
    rows.push(row(s, 'RSS per node (stores + meshes)', 'B', 'lower', [r.memory.rssPerNode], []))
    rows.push(row(s, 'peer index per node', 'B', 'lower', [r.memory.indexBytesPerNode], []))
    rows.push(row(s, 'idle mesh traffic per node', 'KiB/min', 'lower', [r.idle.bytesPerMinPerNode / KiB], []))
    rows.push(row(s, 'churn mesh traffic per node', 'KiB/min', 'lower', [r.churn.bytesPerMinPerNode / KiB], []))
    rows.push(row(s, 'time to find a holder p50', 'ms', 'lower', r.ttfMs.p50 !== undefined ? [r.ttfMs.p50] : [], []))
    rows.push(row(s, 'holders() p99', 'µs', 'lower', r.lookupUs.p99 !== undefined ? [r.lookupUs.p99] : [], []))
    rows.push(row(s, 'findable', '%', 'higher', [100 * r.findable.static], [], ctx.smoke ? undefined : { text: '≥ 99 %', check: x => (x.pullmesh ?? 0) >= 99 }))
  }
  if (results.length >= 2) {
    const fl = fits(results)
    ctx.log('\n' + fitMarkdown(fl))
    for (const [metric, , unit, target] of TARGETS) {
      const f = fl.find(x => x.metric === metric)
      if (f === undefined) continue
      rows.push(row(`${SCENARIO} fit`, `${metric} at 1,000 (extrapolated)`, unit, 'lower', [f.at1000.power ?? f.at1000.linear], [], target))
    }
  }
  for (const f of failures) rows.push(notRun(SCENARIO, f, 'failed'))
  return rows
}

// ---- standalone ------------------------------------------------------------------------------

async function main (): Promise<number> {
  const argv = process.argv.slice(2)
  const flag = (name: string, dflt: string): string => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] ?? dflt : dflt }
  const num = (name: string, dflt: number): number => { const v = Number(flag(name, String(dflt))); if (!Number.isFinite(v) || v <= 0) throw new Error(`${name}: a positive number`); return v }
  const started = Date.now()
  const log = (msg: string): void => { console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(6)} s] ${msg}`) }
  const nodes = flag('--nodes', '10,30,100').split(',').map(Number)
  if (nodes.some(x => !Number.isInteger(x) || x < 2 || x > 1000)) throw new Error('--nodes: integers 2 to 1000')
  const scratch = await mkdtemp(join(tmpdir(), 'pullmesh-scale-'))
  // Interrupted: the workers see the IPC channel close, stop their nodes and remove their directories.
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => { log(`${sig}: exiting; workers clean up after themselves`); setTimeout(() => { rmSync(scratch, { recursive: true, force: true }); process.exit(130) }, 5_000).unref() })
  }
  const o: ScaleOptions = {
    nodes, k: num('--k', 500), idleMs: num('--idle', 60) * 1000, churnMs: num('--churn', 60) * 1000, churnPerMin: num('--churn-rate', 20),
    perWorker: num('--per-worker', 25), bootstrapPeers: flag('--bootstrap', 'all') === 'all' ? 0 : num('--bootstrap', 3),
    distinctIps: !argv.includes('--one-ip'), samples: num('--samples', 1000), convergeMs: num('--converge', 120) * 1000, log, scratch, logLevel: flag('--log-level', 'silent'),
    routing: flag('--routing', 'gossip') === 'dht' ? 'dht' : 'gossip', dhtLookupMs: num('--dht-lookup-ms', 300), dhtLookups: num('--dht-lookups', 300),
  }
  let code = 0
  try {
    log(`mesh scale: N=${nodes.join(',')}, K=${o.k}, idle ${o.idleMs / 1000} s, churn ${o.churnMs / 1000} s at ${o.churnPerMin}/min/node, ${o.perWorker} nodes per worker, node ${process.version}`)
    const { results, failures } = await runScale(o)
    const md = `## mesh scale (${new Date().toISOString()}, K=${o.k} blobs per node, idle ${o.idleMs / 1000} s, churn ${o.churnMs / 1000} s)\n\n` +
      tableMarkdown(results) + (results.length >= 2 ? '\n' + fitMarkdown(fits(results)) : '') + (failures.length > 0 ? `\nfailed: ${failures.join('; ')}\n` : '')
    console.log('\n' + md)
    const out = fileURLToPath(new URL('./results/', import.meta.url))
    await mkdir(out, { recursive: true })
    const stamp = new Date().toISOString().replace(/[:.]/g, '-')
    const json = JSON.stringify({ date: new Date().toISOString(), options: { ...o, log: undefined }, results, fits: results.length >= 2 ? fits(results) : [], failures }, null, 2)
    await writeFile(join(out, 'mesh-scale.md'), md)
    await writeFile(join(out, 'mesh-scale.json'), json)
    await writeFile(join(out, `mesh-scale-${stamp}.json`), json)
    log(`wrote ${out}mesh-scale.{md,json}`)
    if (failures.length > 0) code = 1
  } finally {
    await rm(scratch, { recursive: true, force: true })
  }
  return code
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  let code = 1
  try { code = await main() } catch (err) { console.error(err instanceof Error ? err.stack ?? err.message : String(err)) }
  process.exit(code)
}
