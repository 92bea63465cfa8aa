// Scenario 6: two pullmesh nodes in network namespaces; node B fetches a blob node A holds, compared
// with a plain HTTP download of the same file between the same namespaces (Node http, 1 MiB chunks),
// and B's client's time to first byte compared with a client of A getting the same blob as a store hit.
// Namespaces get unique names (with our PID) and are always deleted; multicast stays inside them.
import { spawn } from 'node:child_process'
import { access, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from '../helpers/exec.js'
import { curlDownload } from './lib/load.js'
import { metricValue, startDistribution, startPullmesh, upstreamBlobTraffic, type Distribution, type Pullmesh } from './lib/procs.js'
import { diffAtMost, notRun, ratioAtLeast, row, type Row } from './lib/report.js'
import { seedBlob } from './lib/seed.js'
import type { Ctx } from './scenarios.js'

const created: string[] = []

/** Deletes every namespace this process created (hub last). Safe to call twice. */
export async function meshCleanup (): Promise<void> {
  while (created.length > 0) {
    const ns = created.pop()!
    await run('ip', ['netns', 'del', ns], { allowFailure: true, timeoutMs: 10_000 })
  }
}

async function ip (...args: string[]): Promise<void> {
  await run('ip', args, { timeoutMs: 10_000 })
}

export interface BenchNamespaces {
  hub: string
  /** The first three octets of the bridge's /24 (the hub's br0 is `${net}.1`). */
  net: string
  /** Node namespaces, each with its address `${net}.(10+i)` (i from 1). */
  nodes: Array<{ ns: string, addr: string }>
}

/**
 * A hub namespace holding a bridge (the upstream listens on `${net}.1`) and `count` node namespaces on
 * it, named `pmb<kind>h<pid>` and `pmb<kind><i><pid>`; every name is recorded for meshCleanup().
 */
export async function makeBenchNamespaces (kind: string, count: number): Promise<BenchNamespaces> {
  const id = process.pid
  const net = `10.99.${20 + (id % 200)}`
  const hub = `pmb${kind}h${id}`
  await ip('netns', 'add', hub); created.push(hub)
  await ip('-n', hub, 'link', 'set', 'lo', 'up')
  await ip('-n', hub, 'link', 'add', 'br0', 'type', 'bridge')
  await ip('-n', hub, 'link', 'set', 'br0', 'type', 'bridge', 'mcast_snooping', '0')
  await ip('-n', hub, 'addr', 'add', `${net}.1/24`, 'dev', 'br0')
  await ip('-n', hub, 'link', 'set', 'br0', 'up')
  const nodes: BenchNamespaces['nodes'] = []
  for (let i = 1; i <= count; i++) {
    const ns = `pmb${kind}${i}n${id}`
    const addr = `${net}.${10 + i}`
    await ip('netns', 'add', ns); created.push(ns)
    await ip('-n', ns, 'link', 'set', 'lo', 'up')
    await ip('-n', hub, 'link', 'add', `veth${i}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns)
    await ip('-n', hub, 'link', 'set', `veth${i}`, 'master', 'br0')
    await ip('-n', hub, 'link', 'set', `veth${i}`, 'up')
    await ip('-n', ns, 'addr', 'add', `${addr}/24`, 'dev', 'eth0')
    await ip('-n', ns, 'link', 'set', 'eth0', 'multicast', 'on', 'up')
    await ip('-n', ns, 'route', 'add', '224.0.0.0/4', 'dev', 'eth0') // no default route, on purpose
    nodes.push({ ns, addr })
  }
  return { hub, net, nodes }
}

/** hub (bridge, upstream on 10.99.N.1) + nsA (10.99.N.11) + nsB (10.99.N.12). */
async function makeNamespaces (): Promise<{ hub: string, a: string, b: string, net: string }> {
  const { hub, net, nodes } = await makeBenchNamespaces('6', 2)
  return { hub, net, a: nodes[0]!.ns, b: nodes[1]!.ns }
}

export async function statusIn (ns: string, url: string): Promise<number> {
  const r = await run('ip', ['netns', 'exec', ns, 'curl', '-s', '-o', '/dev/null', '--max-time', '1', '-w', '%{http_code}', url], { allowFailure: true, timeoutMs: 5000 })
  return Number(r.stdout.trim() || 0)
}

export async function textIn (ns: string, url: string): Promise<string> {
  const r = await run('ip', ['netns', 'exec', ns, 'curl', '-s', '--max-time', '5', url], { allowFailure: true, timeoutMs: 10_000 })
  return r.stdout
}

export async function waitIn (ns: string, url: string, proc: { exited: () => boolean, tail: () => string }, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs
  for (;;) {
    if (proc.exited()) throw new Error(`process exited before ${url} answered: ${proc.tail().slice(-1500)}`)
    const s = await statusIn(ns, url)
    if (s === 200) return
    if (Date.now() > end) throw new Error(`${url} (in ${ns}) not ready after ${timeoutMs} ms: ${proc.tail().slice(-1500)}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

const PLAIN_SERVER = `
import http from 'node:http'; import fs from 'node:fs'; import { pipeline } from 'node:stream/promises'
const [file, host, port] = process.argv.slice(2)
const size = fs.statSync(file).size
http.createServer((req, res) => {
  res.writeHead(200, { 'content-length': size, 'content-type': 'application/octet-stream' })
  if (req.method === 'HEAD') { res.end(); return }
  pipeline(fs.createReadStream(file, { highWaterMark: 1 << 20 }), res).catch(() => {})
}).listen(Number(port), host)
`

export async function mesh (ctx: Ctx): Promise<Row[]> {
  if (process.getuid?.() !== 0) return [notRun('6 mesh', 'needs root for network namespaces')]
  const b = ctx.big
  const procs: Array<{ stop: () => Promise<void> }> = []
  const dirs: string[] = []
  let up: Distribution | undefined
  try {
    const ns = await makeNamespaces()
    const upDir = await mkdtemp(join(ctx.scratch, 'mesh-up-')); dirs.push(upDir)
    // A second registry process on the upstream's storage, listening on the bridge inside the hub.
    up = await startDistribution({ dir: upDir, root: ctx.upstream.root, host: `${ns.net}.1`, port: 5000, netns: ns.hub, accessLog: true })
    procs.push(up)
    await waitIn(ns.hub, `${up.url}/v2/`, up)
    const upstreamUrl = up.url

    const meshArgs = (addr: string): string[] => ['--p2p-listen', `/ip4/${addr}/tcp/4001`, '--peer-listen', `${addr}:5050`]
    const startNode = async (nsName: string, addr: string): Promise<Pullmesh> => {
      const dataDir = await mkdtemp(join(ctx.scratch, `mesh-${nsName}-`)); dirs.push(dataDir)
      const pm = await startPullmesh({ dataDir, upstream: upstreamUrl, netns: nsName, port: 5000, mesh: meshArgs(addr), logLevel: 'warn' })
      procs.push(pm)
      await waitIn(nsName, `${pm.url}/readyz`, pm)
      return pm
    }
    const A = await startNode(ns.a, `${ns.net}.11`)
    const blobPath = `/v2/bench.test/${b.repo}/blobs/${b.digest}`
    await curlDownload(`${A.url}${blobPath}`, { netns: ns.a, expectBytes: b.size })
    // A second, smaller blob on A: each fresh B takes it from A first, so that the measured fetch runs
    // on a warm process (its first peer transfer pays for connections, JIT and the hashing thread).
    const warm = await seedBlob(ctx.upstream.url, 'bench/mesh-warm', 8 * 2 ** 20)
    const warmPath = `/v2/bench.test/${warm.repo}/blobs/${warm.digest}`
    await curlDownload(`${A.url}${warmPath}`, { netns: ns.a, expectBytes: warm.size })
    const hex = b.digest.slice('sha256:'.length)
    const file = join(A.dataDir, 'blobs', 'sha256', hex.slice(0, 2), hex)
    // The response ends once the bytes verify; the commit (fsync, rename) follows.
    for (const end = Date.now() + 60_000; !await access(file).then(() => true, () => false);) {
      if (Date.now() > end) throw new Error(`node A never committed ${b.digest}`)
      await new Promise(resolve => setTimeout(resolve, 50))
    }

    // Baseline: a plain HTTP server in A's namespace serving the same file.
    const script = join(ctx.scratch, 'plain-server.mjs')
    await writeFile(script, PLAIN_SERVER)
    const plain = spawn('ip', ['netns', 'exec', ns.a, process.execPath, script, file, `${ns.net}.11`, '8080'], { stdio: ['ignore', 'pipe', 'pipe'] })
    let plainExited = false
    plain.once('exit', () => { plainExited = true })
    let plainErr = ''
    plain.stderr?.on('data', (d: Buffer) => { plainErr += d.toString() })
    const plainProc = {
      exited: () => plainExited,
      tail: () => plainErr,
      stop: async () => { if (!plainExited) { plain.kill('SIGTERM'); await new Promise(resolve => plain.once('exit', resolve)) } },
    }
    procs.push(plainProc)
    await waitIn(ns.b, `http://${ns.net}.11:8080/`, plainProc)

    const meshBps: number[] = []; const plainBps: number[] = []
    const bTtfb: number[] = []; const aTtfb: number[] = []; const bFirstTtfb: number[] = []
    for (let i = 0; i < ctx.runs; i++) {
      for (const who of i % 2 === 0 ? ['mesh', 'plain'] : ['plain', 'mesh']) {
        if (who === 'plain') {
          const d = await curlDownload(`http://${ns.net}.11:8080/`, { netns: ns.b, expectBytes: b.size })
          plainBps.push(d.bps)
          ctx.log(`  plain http A→B #${i + 1}: ${(d.bps / 2 ** 30).toFixed(2)} GiB/s`)
          continue
        }
        const B = await startNode(ns.b, `${ns.net}.12`)
        try {
          // Wait for the nodes to find each other (mDNS) and for A's inventory to reach B.
          const end = Date.now() + 15_000
          let peers = 0
          while (Date.now() < end) {
            peers = await metricValue(await textIn(ns.b, `${B.url}/metrics`), 'pullmesh_mesh_peers_connected')
            if (peers >= 1) break
            await new Promise(resolve => setTimeout(resolve, 100))
          }
          if (peers < 1) return [notRun('6 mesh', 'node B never connected to node A within 15 s (pullmesh_mesh_peers_connected stayed 0): the mesh is not wired into `pullmesh start` yet, or discovery failed')]
          await new Promise(resolve => setTimeout(resolve, 1000))
          const w = await curlDownload(`${B.url}${warmPath}`, { netns: ns.b, expectBytes: warm.size })
          bFirstTtfb.push(w.ttfb)
          const hitsOf = async (): Promise<number> => await metricValue(await textIn(ns.b, `${B.url}/metrics`), 'pullmesh_mesh_hits_total', 'kind="blob"')
          // The warm-up's fill commits just after its response ends.
          for (const end = Date.now() + 10_000; Date.now() < end; await new Promise(resolve => setTimeout(resolve, 50))) {
            if (await metricValue(await textIn(ns.b, `${B.url}/metrics`), 'pullmesh_fills_active') === 0) break
          }
          const hits0 = await hitsOf()
          const from = up.access.length
          const d = await curlDownload(`${B.url}${blobPath}`, { netns: ns.b, expectBytes: b.size })
          // The hit is counted when B's fill commits, just after the response ends.
          let hits = 0
          for (const end = Date.now() + 30_000; Date.now() < end; await new Promise(resolve => setTimeout(resolve, 50))) {
            hits = await hitsOf() - hits0
            if (hits >= 1) break
          }
          const t = upstreamBlobTraffic(up, b.digest, from)
          if (hits < 1 || t.gets > 0) {
            return [notRun('6 mesh', `node B fetched from the upstream (${t.gets} upstream GETs, mesh blob hits ${hits}), not from node A`)]
          }
          meshBps.push(d.bps); bTtfb.push(d.ttfb)
          // The same blob as a store hit on A, for a client in A's namespace: the TTFB to compare with.
          const hit = await curlDownload(`${A.url}${blobPath}`, { netns: ns.a, expectBytes: b.size })
          aTtfb.push(hit.ttfb)
          ctx.log(`  mesh A→B #${i + 1}: ${(d.bps / 2 ** 30).toFixed(2)} GiB/s, ttfb ${(d.ttfb * 1000).toFixed(1)} ms (A's store hit: ttfb ${(hit.ttfb * 1000).toFixed(1)} ms; B's first peer fetch after start: ttfb ${(w.ttfb * 1000).toFixed(1)} ms)`)
        } finally {
          await B.stop()
          await rm(B.dataDir, { recursive: true, force: true })
        }
      }
    }
    return [
      row('6 mesh', `B fetches ${b.size / 2 ** 20} MiB blob held by A (netns)`, 'B/s', 'higher', meshBps, plainBps, ratioAtLeast(0.8), undefined, 'plain HTTP'),
      row('6 mesh', "time to first byte: B's client, blob held by A", 's', 'lower', bTtfb, aTtfb, diffAtMost(0.02, '≤ +20 ms'),
        `B warmed by one earlier ${warm.size / 2 ** 20} MiB peer fetch; B's first peer fetch after start: ${bFirstTtfb.map(t => `${(t * 1000).toFixed(0)} ms`).join('/')}`, "A's client, store hit on A"),
    ]
  } finally {
    for (const p of procs.reverse()) await p.stop().catch(() => {})
    await meshCleanup()
    for (const d of dirs) await rm(d, { recursive: true, force: true })
  }
}
