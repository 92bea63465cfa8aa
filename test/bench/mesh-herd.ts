// Scenario 9, mesh herd: N pullmesh nodes in network namespaces on one bridge (mDNS, a mesh key), the
// upstream distribution registry in the hub namespace. All N nodes pull the same cold blob at the same
// moment (curl in each node's namespace against its own node). The upstream's access log counts what
// the whole mesh fetched (target: the blob once), and the nodes' wall times are compared with
//   - the distribution registry as ONE central pull-through mirror in the hub, cold, used by the same N
//     clients at once (its storage is fresh every run), and
//   - one pullmesh node's lone cold pull: a `--no-mesh` pullmesh in node 1's namespace (the pure
//     single-node baseline, the one the 1.5× target uses), and one mesh node pulling alone (which may
//     delegate the fetch to another node: what a lone pull costs inside the mesh).
// Every variant of every run pulls its own freshly seeded random blob, so every pull is cold.
// Namespaces carry our PID and are always deleted; processes are stopped by their own PID.
import { access, mkdtemp, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from '../helpers/exec.js'
import { cpuSeconds, curlDownload, type Download } from './lib/load.js'
import { DAEMON_ENTRY, metricValue, settleAccessLog, startDistribution, startPullmesh, upstreamBlobTraffic, type Distribution, type Pullmesh } from './lib/procs.js'
import { exactly, median, notRun, ratioAtMost, row, type Row } from './lib/report.js'
import { seedBlob, type SeededBlob } from './lib/seed.js'
import { makeBenchNamespaces, meshCleanup, textIn, waitIn } from './mesh.js'
import type { Ctx } from './scenarios.js'

const SCENARIO = '9 mesh herd'
const REPO = 'bench/meshherd'
const PORT = 5000
/** The central mirror (hub) and the lone `--no-mesh` node (node 1's namespace) listen here. */
const ALT_PORT = 5001
/** Warm-up blobs: at least the store's threshold for hashing on its thread (4 MiB). */
const WARM_BYTES = 4 * 2 ** 20

type Variant = 'mesh' | 'central' | 'lone' | 'loneMesh'
const VARIANTS: Variant[] = ['mesh', 'central', 'lone', 'loneMesh']

interface Node { ns: string, addr: string, pm: Pullmesh }

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

async function metricIn (ns: string, url: string, name: string, match = ''): Promise<number> {
  return await metricValue(await textIn(ns, `${url}/metrics`), name, match)
}

/** Every node's `pullmesh_mesh_peers_connected` reaches n-1. */
async function waitForFullMesh (nodes: Node[], timeoutMs: number): Promise<number[]> {
  const end = Date.now() + timeoutMs
  let seen: number[] = []
  for (;;) {
    seen = await Promise.all(nodes.map(async n => await metricIn(n.ns, n.pm.url, 'pullmesh_mesh_peers_connected')))
    if (seen.every(p => p >= nodes.length - 1)) return seen
    for (const n of nodes) if (n.pm.exited()) throw new Error(`node in ${n.ns} exited: ${n.pm.tail().slice(-1500)}`)
    if (Date.now() > end) throw new Error(`the mesh never formed within ${timeoutMs} ms: peers connected per node ${seen.join('/')} (want ${nodes.length - 1} each)`)
    await sleep(100)
  }
}

/** Waits until no node has a fill in progress (the commit follows the last byte), bounded. */
async function waitFillsDone (nodes: Array<{ ns: string, pm: Pullmesh }>, timeoutMs = 60_000): Promise<void> {
  const end = Date.now() + timeoutMs
  while (Date.now() < end) {
    const active = await Promise.all(nodes.map(async n => await metricIn(n.ns, n.pm.url, 'pullmesh_fills_active')))
    if (active.every(a => a === 0)) return
    await sleep(100)
  }
}

const blobPath = (repo: string, b: SeededBlob): string => `/v2/${repo}/blobs/${b.digest}`

export async function meshHerd (ctx: Ctx): Promise<Row[]> {
  if (process.getuid?.() !== 0) return [notRun(SCENARIO, 'needs root for network namespaces')]
  const n = ctx.sizes.meshNodes
  const size = ctx.sizes.meshHerd
  const procs: Array<{ stop: () => Promise<void> }> = []
  const dirs: string[] = []
  const seeded: SeededBlob[] = []
  const dropUpstreamBlob = async (b: SeededBlob): Promise<void> => {
    const hex = b.digest.slice('sha256:'.length)
    await rm(join(ctx.upstream.root, 'docker', 'registry', 'v2', 'blobs', 'sha256', hex.slice(0, 2), hex), { recursive: true, force: true })
  }
  try {
    const ns = await makeBenchNamespaces('m', n)
    const upDir = await mkdtemp(join(ctx.scratch, 'herd-up-')); dirs.push(upDir)
    // A second registry process on the upstream's storage, listening on the bridge inside the hub.
    const up: Distribution = await startDistribution({ dir: upDir, root: ctx.upstream.root, host: `${ns.net}.1`, port: PORT, netns: ns.hub, accessLog: true })
    procs.push(up)
    await waitIn(ns.hub, `${up.url}/v2/`, up)

    const keyFile = join(ctx.scratch, 'mesh-herd.key')
    await rm(keyFile, { force: true })
    await run(process.execPath, [DAEMON_ENTRY, 'keygen', keyFile], { timeoutMs: 30_000 })

    const t0 = performance.now()
    const nodes: Node[] = await Promise.all(ns.nodes.map(async ({ ns: nsName, addr }) => {
      const dataDir = await mkdtemp(join(ctx.scratch, `herd-${nsName}-`)); dirs.push(dataDir)
      const pm = await startPullmesh({
        dataDir, upstream: up.url, netns: nsName, port: PORT, logLevel: 'warn',
        mesh: ['--p2p-listen', `/ip4/${addr}/tcp/4001`, '--peer-listen', `${addr}:5050`, '--mesh-key', keyFile],
      })
      procs.push(pm)
      await waitIn(nsName, `${pm.url}/readyz`, pm, 60_000)
      return { ns: nsName, addr, pm }
    }))
    const peers = await waitForFullMesh(nodes, 30_000)
    ctx.log(`  ${n} nodes ready and fully meshed (${peers.join('/')} peers) ${((performance.now() - t0) / 1000).toFixed(1)} s after start`)
    await sleep(1000) // identify, hello and inventory settle
    const node1 = nodes[0]!

    // The lone baseline: one pullmesh without a mesh, in node 1's namespace.
    const loneDir = await mkdtemp(join(ctx.scratch, 'herd-lone-')); dirs.push(loneDir)
    const lone = await startPullmesh({ dataDir: loneDir, upstream: up.url, netns: node1.ns, port: ALT_PORT, logLevel: 'warn' })
    procs.push(lone)
    await waitIn(node1.ns, `${lone.url}/readyz`, lone, 60_000)

    // Warm-up, not measured: a node's first transfers after start pay for connections, JIT and its
    // hashing thread (hundreds of ms here). 2N small herds make each node likely the fetcher of one.
    const tw0 = performance.now()
    for (let k = 0; k < 2 * n; k++) {
      const w = await seedBlob(ctx.upstream.url, REPO, WARM_BYTES)
      seeded.push(w)
      await Promise.all(nodes.map(async nd => await curlDownload(`${nd.pm.url}${blobPath(`bench.test/${REPO}`, w)}`, { netns: nd.ns, expectBytes: WARM_BYTES })))
      if (k === 0) await curlDownload(`${lone.url}${blobPath(`bench.test/${REPO}`, w)}`, { netns: node1.ns, expectBytes: WARM_BYTES })
      await waitFillsDone([...nodes, { ns: node1.ns, pm: lone }])
      await dropUpstreamBlob(w)
    }
    ctx.log(`  warm-up: ${2 * n} herds of ${fmtMiB(WARM_BYTES)} in ${((performance.now() - tw0) / 1000).toFixed(1)} s`)

    const upRatio: Record<'mesh' | 'central', number[]> = { mesh: [], central: [] }
    const upGets: Record<'mesh' | 'central', number[]> = { mesh: [], central: [] }
    const medianT: Record<'mesh' | 'central', number[]> = { mesh: [], central: [] }
    const slowestT: Record<'mesh' | 'central', number[]> = { mesh: [], central: [] }
    const cpuT: Record<'mesh' | 'central', number[]> = { mesh: [], central: [] }
    const loneT: number[] = []; const loneMeshT: number[] = []; const loneCpu: number[] = []
    const meshNotes: string[] = []

    for (let i = 0; i < ctx.runs; i++) {
      const order = [...VARIANTS.slice(i % VARIANTS.length), ...VARIANTS.slice(0, i % VARIANTS.length)]
      for (const v of order) {
        const b = await seedBlob(ctx.upstream.url, REPO, size)
        seeded.push(b)
        const from = up.access.length
        if (v === 'mesh' || v === 'central') {
          let central: Distribution | undefined
          let centralDir: string | undefined
          if (v === 'central') {
            centralDir = await mkdtemp(join(ctx.scratch, 'herd-central-'))
            central = await startDistribution({ dir: centralDir, proxy: up.url, host: `${ns.net}.1`, port: ALT_PORT, netns: ns.hub })
            procs.push(central)
            await waitIn(ns.hub, `${central.url}/v2/`, central)
          }
          try {
            const url = (nd: Node): string => v === 'mesh' ? `${nd.pm.url}${blobPath(`bench.test/${REPO}`, b)}` : `${central!.url}${blobPath(REPO, b)}`
            const before = v === 'mesh' ? await meshCounters(nodes) : undefined
            // CPU of the serving side: every node, or the one central registry.
            const servers = v === 'mesh' ? nodes.map(nd => nd.pm.pid) : [central!.pid]
            const cpu0 = await Promise.all(servers.map(cpuSeconds))
            const tw = performance.now()
            const each: Download[] = await Promise.all(nodes.map(async nd => await curlDownload(url(nd), { netns: nd.ns, expectBytes: size })))
            const wall = (performance.now() - tw) / 1000
            if (v === 'mesh') await waitFillsDone(nodes)
            if (central !== undefined) await waitFile(join(central.root, 'docker', 'registry', 'v2', 'blobs', 'sha256', b.digest.slice(7, 9), b.digest.slice(7), 'data'))
            const cpu = (await Promise.all(servers.map(cpuSeconds))).reduce((a, c, k) => a + c - cpu0[k]!, 0)
            cpuT[v].push(cpu)
            await settleAccessLog(up, 1000)
            const t = upstreamBlobTraffic(up, b.digest, from)
            const times = each.map(d => d.total)
            upRatio[v].push(t.bytes / size); upGets[v].push(t.gets)
            medianT[v].push(median(times)!); slowestT[v].push(Math.max(...times))
            let extra = ''
            if (before !== undefined) {
              const after = await meshCounters(nodes)
              const d = (k: keyof MeshCounters): number => after[k] - before[k]
              extra = `; mesh: ${d('delegated')} delegated, ${d('forPeers')} served for peers, ${d('avoided')} upstream fetches avoided, ${d('delegatedFailed')} delegations failed, ${d('peerErrors')} peer errors`
              meshNotes.push(`${d('delegated')}/${d('forPeers')}/${d('avoided')}`)
            }
            ctx.log(`  ${v === 'mesh' ? 'mesh herd' : 'central mirror'} #${i + 1}: ${n} nodes × ${fmtMiB(size)}, per node ${times.map(s => s.toFixed(2)).join('/')} s (median ${median(times)!.toFixed(2)}, slowest ${Math.max(...times).toFixed(2)}, all done ${wall.toFixed(2)} s, ${cpu.toFixed(2)} CPU-s), upstream ${t.gets} GETs = ${(t.bytes / size).toFixed(2)}× blob${extra}`)
          } finally {
            if (central !== undefined) await central.stop()
            if (centralDir !== undefined) await rm(centralDir, { recursive: true, force: true })
          }
        } else {
          const target = v === 'lone' ? lone : node1.pm
          const servers = v === 'lone' ? [lone.pid] : nodes.map(nd => nd.pm.pid)
          const cpu0 = await Promise.all(servers.map(cpuSeconds))
          const d = await curlDownload(`${target.url}${blobPath(`bench.test/${REPO}`, b)}`, { netns: node1.ns, expectBytes: size })
          await waitFillsDone(v === 'lone' ? [{ ns: node1.ns, pm: lone }] : nodes)
          await settleAccessLog(up, 500)
          const t = upstreamBlobTraffic(up, b.digest, from)
          const cpu = (await Promise.all(servers.map(cpuSeconds))).reduce((a, c, k) => a + c - cpu0[k]!, 0)
          if (v === 'lone') { loneT.push(d.total); loneCpu.push(cpu) } else loneMeshT.push(d.total)
          ctx.log(`  lone cold pull, ${v === 'lone' ? 'pullmesh --no-mesh' : 'mesh node 1 alone'} #${i + 1}: ${d.total.toFixed(2)} s (ttfb ${(d.ttfb * 1000).toFixed(0)} ms, ${cpu.toFixed(2)} CPU-s${v === 'lone' ? '' : ' over all nodes'}), upstream ${t.gets} GETs = ${(t.bytes / size).toFixed(2)}× blob`)
        }
        await dropUpstreamBlob(b)
      }
    }

    const label = `${n} nodes × ${fmtMiB(size)}, cold, at once`
    const gets = (v: 'mesh' | 'central'): string => upGets[v].join('/')
    return [
      row(SCENARIO, `upstream bytes ÷ blob size, ${label}`, 'x', 'lower', upRatio.mesh, upRatio.central, exactly(1, '= 1.0× blob'),
        `upstream GETs per run: ${gets('mesh')} vs ${gets('central')}; delegated/served-for-peers/avoided per run: ${meshNotes.join(', ')}`, 'one central distribution mirror'),
      row(SCENARIO, 'median node wall time', 's', 'lower', medianT.mesh, medianT.central, undefined, undefined, 'one central distribution mirror'),
      row(SCENARIO, 'slowest node wall time', 's', 'lower', slowestT.mesh, slowestT.central, undefined, undefined, 'one central distribution mirror'),
      row(SCENARIO, `slowest node vs one node's lone cold pull of ${fmtMiB(size)}`, 's', 'lower', slowestT.mesh, loneT, ratioAtMost(1.5),
        `a mesh node pulling alone (may delegate to the chosen fetcher): ${loneMeshT.map(s => s.toFixed(2)).join('/')} s`, 'lone pullmesh, --no-mesh'),
      row(SCENARIO, 'CPU time of the serving side (user+sys, all nodes)', 's', 'lower', cpuT.mesh, cpuT.central, undefined,
        `the ${n} nodes share this host's cores, so the herd's wall time is bounded by their sum; a lone --no-mesh pull used ${loneCpu.map(s => s.toFixed(2)).join('/')} CPU-s`, 'one central distribution mirror'),
    ]
  } finally {
    for (const p of procs.reverse()) await p.stop().catch(() => {})
    await meshCleanup()
    for (const b of seeded) await dropUpstreamBlob(b).catch(() => {})
    for (const d of dirs) await rm(d, { recursive: true, force: true })
  }
}

interface MeshCounters { delegated: number, delegatedFailed: number, forPeers: number, avoided: number, peerErrors: number }

/** The mesh's delegation counters, summed over the nodes. */
async function meshCounters (nodes: Node[]): Promise<MeshCounters> {
  const sum: MeshCounters = { delegated: 0, delegatedFailed: 0, forPeers: 0, avoided: 0, peerErrors: 0 }
  for (const nd of nodes) {
    const m = await textIn(nd.ns, `${nd.pm.url}/metrics`)
    sum.delegated += await metricValue(m, 'pullmesh_mesh_delegated_fetches_total', 'kind="blob"')
    sum.delegatedFailed += await metricValue(m, 'pullmesh_mesh_delegated_failures_total', 'kind="blob"')
    sum.forPeers += await metricValue(m, 'pullmesh_mesh_fetches_for_peers_total', 'kind="blob"')
    sum.avoided += await metricValue(m, 'pullmesh_mesh_upstream_fetches_avoided_total', 'kind="blob"')
    sum.peerErrors += await metricValue(m, 'pullmesh_mesh_peer_errors_total')
  }
  return sum
}

/** distribution stores a proxied blob with a second upstream GET that can end after the client's. */
async function waitFile (file: string, timeoutMs = 120_000): Promise<void> {
  for (const end = Date.now() + timeoutMs; !await access(file).then(() => true, () => false);) {
    if (Date.now() > end) throw new Error(`${file} never appeared within ${timeoutMs} ms`)
    await sleep(100)
  }
}

function fmtMiB (b: number): string {
  return b >= 2 ** 20 ? `${b / 2 ** 20} MiB` : `${b / 1024} KiB`
}
