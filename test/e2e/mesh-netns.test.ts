// End-to-end LAN mesh: pullmesh nodes in separate Linux network namespaces on one bridge, finding each
// other by mDNS alone (no bootstrap addresses), with the real distribution registry as the upstream
// (in the hub namespace, on the bridge) and real clients (skopeo, containerd ctr) run inside the nodes'
// namespaces. mDNS and multicast only ever run inside the namespaces created here (checked per PID).
// Needs root and ip, skopeo, ctr, containerd, docker-registry, curl: a missing one FAILS the run.
import { createHash, randomUUID } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { access as canAccess, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, DAEMON_ENTRY, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, waitFor } from '../helpers/exec.js'
import { allDigests, buildImage, verifySkopeoDir, type BuiltImage } from '../helpers/images.js'
import {
  createNetnsLab, namedNetns, netnsOf, parseAccessWithRemote, startFileServer, startNetnsContainerd, startNetnsRegistry,
  type NetnsContainerd, type NetnsLab, type NetnsNode, type NetnsRegistry, type RemoteAccess,
} from '../helpers/netns.js'
import { verifyDataDirBlobs } from './support.js'

const LAYERS = 3
const LAYER_BYTES = 3 << 20 // 3 MiB random per layer
const BIG_BYTES = 256 << 20
const UP = 'reg.test' // the dotted alias skopeo uses: docker://NODE:5000/reg.test/library/test:1
const REPO = 'library/test'

interface PeerStatus { peerId: string, addrs: string[], dataUrl?: string, connected: boolean, blobs: number, bytes: number }
interface Status { mesh: { enabled: boolean, peerId: string, peers: PeerStatus[] }, cache: { blobs: number, bytes: number } }

interface Node { net: NetnsNode, dataDir: string, d: DaemonProcess, spawnedAt: number, peerId: string }

let lab: NetnsLab | undefined
let reg: NetnsRegistry | undefined
let work = ''
let img: BuiltImage | undefined
const nodes: Node[] = [] // nodes[0] is node 1
const containerds: NetnsContainerd[] = []
const report: string[] = []

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} is not available (see the beforeAll failure)`)
  return v
}
const L = (): NetnsLab => must(lab, 'netns lab')
const R = (): NetnsRegistry => must(reg, 'registry')
const I = (): BuiltImage => must(img, 'test image')
const N = (i: number): Node => must(nodes[i - 1], `node ${i}`)
const url = (n: Node): string => `http://${n.net.ip}:5000`
const fmtMs = (ms: number): string => `${ms.toFixed(0)} ms`
const mibps = (bytes: number, s: number): string => `${(bytes / 1048576 / s).toFixed(0)} MiB/s`

async function startNode (net: NetnsNode): Promise<Node> {
  const l = L()
  const r = R()
  const dataDir = join(work, `data-${net.index}`)
  await mkdir(dataDir, { recursive: true })
  const spawnedAt = Date.now()
  const d = await startDaemon({
    netns: net.ns,
    dataDir,
    listen: '0.0.0.0:5000',
    // reg.test for skopeo (direct addressing); HOST:PORT for containerd, which sends ?ns=HOST:PORT.
    upstreams: { [UP]: r.url, [r.host]: r.url },
    mesh: true,
    mdns: true,
    meshListen: { p2p: ['/ip4/0.0.0.0/tcp/4001'], peer: '0.0.0.0:5050' },
    logLevel: 'info',
    // Tight upstream timeouts: the outage test must not wait on retries for long.
    extraArgs: ['--upstream-connect-timeout', '2s', '--upstream-retries', '2'],
    startTimeoutMs: 30_000,
  })
  l.track(d.pid)
  expect(d.args, 'discovery must be by mDNS alone').not.toContain('--bootstrap')
  const st = await status({ net } as Node)
  const node: Node = { net, dataDir, d, spawnedAt, peerId: st.mesh.peerId }
  return node
}

async function status (n: Pick<Node, 'net'>): Promise<Status> {
  const r = await L().httpGet(n.net.ns, `http://${n.net.ip}:5000/pullmesh/v1/status`, { timeoutMs: 3000 })
  if (r.status !== 200) throw new Error(`status of ${n.net.ip} answered ${r.status}: ${r.body.slice(0, 300)}`)
  return JSON.parse(r.body) as Status
}

async function metric (n: Node, name: string, labels: Record<string, string>): Promise<number> {
  const r = await L().httpGet(n.net.ns, `${url(n)}/metrics`, { timeoutMs: 3000 })
  if (r.status !== 200) throw new Error(`metrics of ${n.net.ip} answered ${r.status}`)
  let total = 0
  for (const line of r.body.split('\n')) {
    if (!line.startsWith(name)) continue
    const m = /^(\w+)(?:\{([^}]*)\})? (\S+)$/.exec(line)
    if (m === null || m[1] !== name) continue
    const ls = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map(x => [x[1], x[2]]))
    if (Object.entries(labels).every(([k, v]) => ls[k] === v)) total += Number(m[3])
  }
  return total
}

/** Poll a node's status until `check` holds; returns ms since `since`. */
async function waitStatus (n: Node, what: string, check: (s: Status) => boolean, since: number, timeoutMs = 30_000): Promise<number> {
  let last: Status | undefined
  try {
    await waitFor(async () => { last = await status(n); return check(last) }, { timeoutMs, intervalMs: 20, what: `${what} (node ${n.net.index})` })
  } catch (e) {
    throw new Error(`${String(e)}\nlast status: ${JSON.stringify(last?.mesh)}\nlogs:\n${n.d.logs().slice(-30).join('\n')}`)
  }
  return Date.now() - since
}

const connectedPeers = (s: Status): PeerStatus[] => s.mesh.peers.filter(p => p.connected && p.dataUrl !== undefined)
const peerOf = (s: Status, peerId: string): PeerStatus | undefined => s.mesh.peers.find(p => p.peerId === peerId)

/** Times (ms since epoch) of this node's log events. */
function logTimes (n: Node, msg: string): number[] {
  const out: number[] = []
  for (const l of n.d.logs()) {
    if (!l.includes(`"msg":"${msg}"`)) continue
    try { out.push(Date.parse((JSON.parse(l) as { time: string }).time)) } catch {}
  }
  return out
}

async function assertInOwnNetns (n: Node): Promise<void> {
  const self = await netnsOf('self')
  const theirs = await netnsOf(n.d.pid)
  expect(theirs, `pullmesh PID ${n.d.pid} must not run in the root network namespace`).not.toBe(self)
  expect(theirs, `pullmesh PID ${n.d.pid} runs in ${n.net.ns}`).toBe(await namedNetns(n.net.ns))
}

/** Everything the registry answered so far is in its logs (it writes the access line after the response). */
async function registryBarrier (): Promise<string> {
  const r = R()
  const id = randomUUID()
  await L().httpGet(L().hub, `${r.url}/v2/?pm-barrier=${id}`)
  await waitFor(() => r.logs().includes(id), { timeoutMs: 5000, intervalMs: 10, what: 'registry log barrier' })
  return r.logs()
}

async function skopeoPull (n: Node, ref: string): Promise<number> {
  const out = await mkdtemp(join(work, 'skopeo-'))
  const t0 = performance.now()
  await L().exec(n.net.ns, 'skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${n.net.ip}:5000/${UP}/${REPO}${ref}`, `dir:${join(out, 'img')}`], { timeoutMs: 120_000 })
  const ms = performance.now() - t0
  await verifySkopeoDir(join(out, 'img'), I())
  await rm(out, { recursive: true, force: true })
  return ms
}

function blobGetsFrom (entries: RemoteAccess[], ip: string): string[] {
  return entries.filter(e => e.remote === ip && e.method === 'GET' && e.path.includes('/blobs/sha256:')).map(e => `${e.method} ${e.path} ${e.status} (${e.userAgent})`)
}

async function sha256File (path: string): Promise<string> {
  const h = createHash('sha256')
  await pipeline(createReadStream(path, { highWaterMark: 1 << 20 }), h)
  return 'sha256:' + h.digest('hex')
}

const blobPath = (n: Node, digest: string): string => join(n.dataDir, 'blobs', 'sha256', digest.slice(7, 9), digest.slice(7))

interface Timed { bytes: number, seconds: number, ttfb: number }

/** curl inside `ns`, body to /dev/null; returns bytes, total seconds and time to first byte as curl measured them. */
async function curlTimed (ns: string, u: string): Promise<Timed> {
  const r = await L().exec(ns, 'curl', ['-sS', '--max-time', '300', '-o', '/dev/null', '-w', '%{http_code} %{size_download} %{time_total} %{time_starttransfer}', u], { timeoutMs: 310_000 })
  const [code, size, secs, ttfb] = r.stdout.trim().split(' ')
  if (code !== '200') throw new Error(`GET ${u} in ${ns} answered ${code}`)
  return { bytes: Number(size), seconds: Number(secs), ttfb: Number(ttfb) }
}

const fmtT = (t: Timed): string => `${mibps(t.bytes, t.seconds)} (${t.seconds.toFixed(2)} s, first byte after ${t.ttfb.toFixed(2)} s)`

describe('e2e: pullmesh LAN mesh in network namespaces (mDNS discovery, peer data path)', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('ip', 'skopeo', 'ctr', 'containerd', 'docker-registry', 'curl')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-netns-'))
    lab = await createNetnsLab({ nodes: 3 })
    reg = await startNetnsRegistry(lab, { ns: lab.hub, ip: lab.hubIp, port: 5000, parentDir: work })
    img = await buildImage({ layers: LAYERS, layerBytes: LAYER_BYTES, dir: work })
    // Push from inside the hub: the root namespace cannot reach the bridge.
    await lab.exec(lab.hub, 'skopeo', ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${img.layoutDir}:1`, `docker://${reg.host}/${REPO}:1`], { timeoutMs: 120_000 })
  }, 180_000)

  afterAll(async () => {
    const errors: unknown[] = []
    const step = async (f: () => Promise<unknown>): Promise<void> => { try { await f() } catch (e) { errors.push(e) } }
    for (const c of containerds) await step(async () => await c.stop())
    await Promise.all(nodes.map(async n => await step(async () => await n.d.stop('SIGTERM', 10_000))))
    await step(async () => await reg?.close())
    await step(async () => await lab?.teardown()) // kills anything left by PID, deletes every namespace
    await step(async () => await img?.cleanup())
    if (work !== '') await step(async () => await rm(work, { recursive: true, force: true }))
    if (report.length > 0) console.log('pullmesh mesh in network namespaces:\n' + report.map(l => '  ' + l).join('\n'))
    if (errors.length > 0) throw new AggregateError(errors, `mesh-netns cleanup failed: ${errors.map(String).join('; ')}`)
  }, 120_000)

  it('three nodes discover each other by mDNS alone, each in its own network namespace', async () => {
    const l = L()
    const started = await Promise.all(l.nodes.map(async net => await startNode(net)))
    nodes.push(...started)
    for (const n of nodes) await assertInOwnNetns(n)
    const ids = nodes.map(n => n.peerId)
    expect(new Set(ids).size).toBe(3)

    const polled = await Promise.all(nodes.map(async n => await waitStatus(n, '2 connected peers with data URLs',
      s => connectedPeers(s).length >= 2, n.spawnedAt, 30_000)))
    for (const n of nodes) {
      const s = await status(n)
      const others = ids.filter(id => id !== n.peerId).sort()
      expect(connectedPeers(s).map(p => p.peerId).sort(), `peers of node ${n.net.index}`).toEqual(others)
      for (const p of connectedPeers(s)) {
        const peer = nodes.find(m => m.peerId === p.peerId)
        expect(p.dataUrl, 'data URL of a peer is its bridge address').toBe(`http://${peer?.net.ip}:5050`)
      }
    }
    nodes.forEach((n, i) => {
      const meshStarted = logTimes(n, 'mesh started')[0]
      const connects = logTimes(n, 'peer connected')
      report.push(`node ${n.net.index}: spawn→mesh started ${meshStarted !== undefined ? fmtMs(meshStarted - n.spawnedAt) : '?'}, ` +
        `mesh started→peers connected (log) ${connects.slice(0, 2).map(t => meshStarted !== undefined ? fmtMs(t - meshStarted) : '?').join(', ')}, ` +
        `spawn→status shows 2 peers ${fmtMs(polled[i] ?? NaN)}`)
    })
    const human = await l.exec(N(1).net.ns, process.execPath, [DAEMON_ENTRY, 'status', '--url', url(N(1))], { timeoutMs: 10_000 })
    for (const n of nodes.slice(1)) expect(human.stdout).toContain(n.peerId)
    console.log(`pullmesh status (node 1):\n${human.stdout}`)
  }, 90_000)

  it('an image pulled through node 1 (skopeo) is served to node 2 (skopeo) and node 3 (containerd) by peers, not the upstream', async () => {
    const l = L()
    const r = R()
    const image = I()
    const [n1, n2, n3] = [N(1), N(2), N(3)]
    const entries = image.blobs.length + image.manifests.length
    const before = await Promise.all([n2, n3].map(async n => peerOf(await status(n), n1.peerId)?.blobs ?? 0))

    const ms1 = await skopeoPull(n1, ':1')
    const pulledAt = Date.now()
    report.push(`skopeo via node 1 (cold, from upstream): ${fmtMs(ms1)} for ${(image.totalBytes / 1048576).toFixed(1)} MiB`)
    // Gossip: nodes 2 and 3 learn node 1's new holdings.
    const known = await Promise.all([n2, n3].map(async (n, i) => await waitStatus(n, `node 1 holding ${entries} more entries`,
      s => (peerOf(s, n1.peerId)?.blobs ?? 0) >= (before[i] ?? 0) + entries, pulledAt, 15_000)))
    report.push(`holdings gossip: node 2 knew node 1's new blobs ${fmtMs(known[0] ?? NaN)} after the pull, node 3 ${fmtMs(known[1] ?? NaN)}`)

    const mark = (await registryBarrier()).length
    const hitsBefore = await Promise.all([n2, n3].map(async n => await metric(n, 'pullmesh_mesh_hits_total', { kind: 'blob' })))
    // During node 1's cold pull, nodes 2 and 3 may have been chosen to fetch some blobs for the mesh
    // (delegation): those they already hold, and they count with the mesh hits below.
    const fetchedForMesh = await Promise.all([n2, n3].map(async n => await metric(n, 'pullmesh_mesh_fetches_for_peers_total', { kind: 'blob' })))

    const ms2 = await skopeoPull(n2, ':1')
    report.push(`skopeo via node 2 (blobs from peers): ${fmtMs(ms2)}`)

    const ctrd = await startNetnsContainerd(l, n3.net.ns, work)
    containerds.push(ctrd)
    const hostsDir = join(work, 'certs.d')
    await mkdir(join(hostsDir, r.host), { recursive: true })
    await writeFile(join(hostsDir, r.host, 'hosts.toml'),
      `server = "${r.url}"\n\n[host."${url(n3)}"]\n  capabilities = ["pull", "resolve"]\n`)
    const t0 = performance.now()
    await ctrd.ctr(['images', 'pull', '--plain-http', '--hosts-dir', hostsDir, `${r.host}/${REPO}:1`])
    report.push(`ctr via node 3 (blobs from peers): ${fmtMs(performance.now() - t0)}`)
    const got = new Set(await ctrd.verifyContentStore())
    expect(allDigests(image).filter(d => !got.has(d)), "missing from node 3's containerd content store").toEqual([])

    // Every blob verified by sha256 in every node's store, too.
    for (const n of [n1, n2, n3]) {
      const held = new Set(await verifyDataDirBlobs(n.dataDir))
      expect(image.blobs.map(b => b.digest).filter(d => !held.has(d)), `blobs missing from node ${n.net.index}'s store`).toEqual([])
    }

    const access = parseAccessWithRemote((await registryBarrier()).slice(mark))
    // The addresses in the log are the nodes' own: node 2 and 3 did ask the upstream for the manifest by tag.
    expect(access.some(e => e.remote === n2.net.ip), `no request from node 2 (${n2.net.ip}) in the registry log`).toBe(true)
    expect(blobGetsFrom(access, n2.net.ip), 'blob GETs at the upstream from node 2').toEqual([])
    expect(blobGetsFrom(access, n3.net.ip), 'blob GETs at the upstream from node 3').toEqual([])
    expect(access.filter(e => /containerd/i.test(e.userAgent)).map(e => `${e.method} ${e.path}`), 'containerd fell back to the upstream').toEqual([])
    const mirrored = n3.d.requests().filter(q => q.statusCode === 200 && q.url.includes(`ns=${encodeURIComponent(r.host)}`) && q.url.includes('/blobs/'))
    expect(mirrored.length, 'containerd fetched its blobs through node 3').toBeGreaterThanOrEqual(image.blobs.length)

    const hitsAfter = await Promise.all([n2, n3].map(async n => await metric(n, 'pullmesh_mesh_hits_total', { kind: 'blob' })))
    expect((hitsAfter[0] ?? 0) - (hitsBefore[0] ?? 0) + (fetchedForMesh[0] ?? 0), 'node 2 blob mesh hits (+ blobs it fetched for the mesh)').toBeGreaterThanOrEqual(image.blobs.length)
    expect((hitsAfter[1] ?? 0) - (hitsBefore[1] ?? 0) + (fetchedForMesh[1] ?? 0), 'node 3 blob mesh hits (+ blobs it fetched for the mesh)').toBeGreaterThanOrEqual(image.blobs.length)
  }, 180_000)

  it('upstream outage: fresh nodes resolve the tag from the mesh and fetch blobs from peers (by tag and by digest)', async () => {
    const l = L()
    const r = R()
    const image = I()
    const entries = image.blobs.length + image.manifests.length
    const fresh: Node[] = []
    for (let k = 0; k < 2; k++) {
      const n = await startNode(await l.addNode())
      nodes.push(n)
      fresh.push(n)
      await assertInOwnNetns(n)
    }
    const olds = [N(1), N(2), N(3)]
    for (const n of fresh) {
      const peersMs = await waitStatus(n, '4 connected peers', s => connectedPeers(s).length >= 4, n.spawnedAt, 30_000)
      const holdMs = await waitStatus(n, "the first three nodes' holdings",
        s => olds.every(o => (peerOf(s, o.peerId)?.blobs ?? 0) >= entries), n.spawnedAt, 30_000)
      report.push(`node ${n.net.index} (joined later): spawn→4 peers connected ${fmtMs(peersMs)}, spawn→knows peers' holdings ${fmtMs(holdMs)}`)
    }
    const [n4, n5] = fresh as [Node, Node]

    await r.stop()
    try {
      const ms4 = await skopeoPull(n4, ':1')
      const ms5 = await skopeoPull(n5, '@' + image.manifestDigest)
      report.push(`upstream down: skopeo by tag via node 4 ${fmtMs(ms4)}, by digest via node 5 ${fmtMs(ms5)}`)
    } finally {
      await r.start()
    }
    expect(await metric(n4, 'pullmesh_stale_tags_served_total', {}), 'node 4 answered the tag from a peer record').toBeGreaterThanOrEqual(1)
    expect(n4.d.logs().some(line => line.includes('stale-if-error') && line.includes('"from":"mesh"')), 'node 4 logs the tag from the mesh').toBe(true)
    for (const n of fresh) {
      expect(await metric(n, 'pullmesh_mesh_hits_total', { kind: 'blob' }), `node ${n.net.index} blob mesh hits`).toBeGreaterThanOrEqual(image.blobs.length)
      const failed = n.d.requests().filter(q => q.statusCode >= 500).map(q => `${q.method} ${q.url} ${q.statusCode}`)
      expect(failed, `5xx answers from node ${n.net.index}`).toEqual([])
      const held = new Set(await verifyDataDirBlobs(n.dataDir))
      expect(image.blobs.map(b => b.digest).filter(d => !held.has(d))).toEqual([])
    }
  }, 180_000)

  it('peer-to-peer throughput of a 256 MiB blob vs. plain HTTP between the same namespaces', async () => {
    const l = L()
    const r = R()
    const [n1, n2, n3] = [N(1), N(2), N(3)]
    const big = await buildImage({ layers: 1, layerBytes: BIG_BYTES, dir: work, tag: 'big' })
    try {
      await l.exec(l.hub, 'skopeo', ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests',
        `oci:${big.layoutDir}:big`, `docker://${r.host}/library/big:1`], { timeoutMs: 300_000 })
      const layer = must(big.platforms[0]?.layers[0], 'big layer')
      const blobUrl = (n: Node): string => `${url(n)}/v2/${UP}/library/big/blobs/${layer.digest}`

      const cold = await curlTimed(n1.net.ns, blobUrl(n1))
      expect(cold.bytes).toBe(layer.size)
      // The response ends once the bytes verify; the store's commit (fsync, rename) follows.
      await expect.poll(async () => await canAccess(blobPath(n1, layer.digest)).then(() => true, () => false), { timeout: 30_000 }).toBe(true)
      expect(await sha256File(blobPath(n1, layer.digest))).toBe(layer.digest)
      const warm = await curlTimed(n1.net.ns, blobUrl(n1))
      const bytesBefore = await Promise.all([n2, n3].map(async n => peerOf(await status(n), n1.peerId)?.bytes ?? 0))
      await Promise.all([n2, n3].map(async (n, i) => await waitStatus(n, 'node 1 holding the big blob',
        s => (peerOf(s, n1.peerId)?.bytes ?? 0) >= (bytesBefore[i] ?? 0) + layer.size || (peerOf(s, n1.peerId)?.bytes ?? 0) >= layer.size, Date.now(), 15_000)))

      const mark = (await registryBarrier()).length
      const p2p = await curlTimed(n2.net.ns, blobUrl(n2))
      expect(p2p.bytes).toBe(layer.size)
      const p2p3 = await curlTimed(n3.net.ns, blobUrl(n3))
      const access = parseAccessWithRemote((await registryBarrier()).slice(mark))
      expect(blobGetsFrom(access, n2.net.ip), 'node 2 fetched the big blob upstream').toEqual([])
      expect(blobGetsFrom(access, n3.net.ip), 'node 3 fetched the big blob upstream').toEqual([])
      for (const n of [n2, n3]) await expect.poll(async () => await canAccess(blobPath(n, layer.digest)).then(() => true, () => false), { timeout: 30_000 }).toBe(true)
      expect(await sha256File(blobPath(n2, layer.digest))).toBe(layer.digest)
      expect(await sha256File(blobPath(n3, layer.digest))).toBe(layer.digest)

      const srv = await startFileServer(l, n1.net, blobPath(n1, layer.digest))
      let plain: Timed
      let plain2: Timed
      try {
        plain = await curlTimed(n2.net.ns, srv.url)
        plain2 = await curlTimed(n2.net.ns, srv.url)
      } finally {
        await srv.stop()
      }
      expect(plain.bytes).toBe(layer.size)
      const best = Math.min(plain.seconds, plain2.seconds)
      report.push(`256 MiB blob: node 1 cold from upstream ${fmtT(cold)}; node 1 warm from its store ${fmtT(warm)}`)
      report.push(`256 MiB blob: node 2 via its registry API from node 1's data path ${fmtT(p2p)}; node 3 likewise ${fmtT(p2p3)}`)
      report.push(`256 MiB blob: plain HTTP node 1 → node 2 (node http server, curl) ${mibps(plain.bytes, best)} (best of ${plain.seconds.toFixed(2)}/${plain2.seconds.toFixed(2)} s)`)
      report.push(`p2p / plain HTTP throughput ratio: ${(best / p2p.seconds).toFixed(2)}`)
    } finally {
      await big.cleanup()
    }
  }, 600_000)
})
