// Discovery across routed subnets: two LAN segments (two bridges) routed through a hub namespace, two
// pullmesh nodes on each, started with mDNS on AND --bootstrap-dns NAME, where NAME is answered by a real
// DNS server (dnsmasq, in the hub) with every node's address, as a Kubernetes headless Service is.
// Multicast is not routed, so mDNS finds the peer on the same segment only; the DNS name joins the two
// segments into one mesh, and a pull on one segment is served by the peer on the other that holds the
// image. A passive mDNS listener on each segment shows what mDNS carried there, and how often each node
// queried (issue 11: a 100-node LAN must not be flooded).
// Needs root and ip, dnsmasq, skopeo, docker-registry, curl: a missing one FAILS the run.
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, waitFor } from '../helpers/exec.js'
import { buildImage, verifySkopeoDir, type BuiltImage } from '../helpers/images.js'
import {
  createNetnsLab, parseAccessWithRemote, startMdnsListener, startNetnsRegistry,
  type MdnsPacket, type NetnsLab, type NetnsNode, type NetnsProcess, type NetnsRegistry,
} from '../helpers/netns.js'
import { verifyDataDirBlobs } from './support.js'

const NAME = 'pullmesh.segments.test' // the "headless Service"
const UP = 'reg.test'
const REPO = 'library/seg'
const SERVICE_TAG = 'pullmesh.local'
/** The mDNS schedule under test: a query at start, +1 s and +5 s, then one per interval (default 60 s). */
const STARTUP_QUERIES = 3
const MDNS_INTERVAL_MS = 60_000
/** How long the query count is watched: long enough that a 10 s interval would show at least 2 more queries. */
const WATCH_MS = 45_000

interface PeerStatus { peerId: string, dataUrl?: string, connected: boolean, blobs: number }
interface Status { mesh: { peerId: string, peers: PeerStatus[] } }
interface Node { net: NetnsNode, dataDir: string, d: DaemonProcess, peerId: string, spawnedAt: number }
type Listener = Awaited<ReturnType<typeof startMdnsListener>>

let lab: NetnsLab | undefined
let reg: NetnsRegistry | undefined
let dns: NetnsProcess | undefined
let img: BuiltImage | undefined
let work = ''
const nodes: Node[] = []
const listeners: Listener[] = [] // one per segment
const resolvDirs: string[] = []
const report: string[] = []

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} is not available (see the beforeAll failure)`)
  return v
}
const L = (): NetnsLab => must(lab, 'netns lab')
const N = (i: number): Node => must(nodes[i - 1], `node ${i}`)
const url = (n: Node): string => `http://${n.net.ip}:5000`

async function status (n: Pick<Node, 'net'>): Promise<Status> {
  const r = await L().httpGet(n.net.ns, `http://${n.net.ip}:5000/pullmesh/v1/status`, { timeoutMs: 3000 })
  if (r.status !== 200) throw new Error(`status of ${n.net.ip} answered ${r.status}: ${r.body.slice(0, 300)}`)
  return JSON.parse(r.body) as Status
}
const connected = (s: Status): PeerStatus[] => s.mesh.peers.filter(p => p.connected && p.dataUrl !== undefined)

async function metric (n: Node, name: string, labels: Record<string, string>): Promise<number> {
  const r = await L().httpGet(n.net.ns, `${url(n)}/metrics`, { timeoutMs: 3000 })
  let total = 0
  for (const line of r.body.split('\n')) {
    const m = /^(\w+)(?:\{([^}]*)\})? (\S+)$/.exec(line)
    if (m === null || m[1] !== name) continue
    const ls = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map(x => [x[1], x[2]]))
    if (Object.entries(labels).every(([k, v]) => ls[k] === v)) total += Number(m[3])
  }
  return total
}

async function skopeoPull (n: Node): Promise<void> {
  const out = await mkdtemp(join(work, 'skopeo-'))
  await L().exec(n.net.ns, 'skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${n.net.ip}:5000/${UP}/${REPO}:1`, `dir:${join(out, 'img')}`], { timeoutMs: 120_000 })
  await verifySkopeoDir(join(out, 'img'), must(img, 'image'))
  await rm(out, { recursive: true, force: true })
}

const ourQueries = (packets: MdnsPacket[], from: string): MdnsPacket[] => packets.filter(p => p.kind === 'query' && p.from === from && p.names.includes(SERVICE_TAG))

describe('e2e: two routed LAN segments joined by a DNS name (mDNS inside each, not across)', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('ip', 'dnsmasq', 'skopeo', 'docker-registry', 'curl')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-segments-'))
    const l = lab = await createNetnsLab({ nodes: 0, segments: 2 })
    for (const segment of [0, 0, 1, 1]) await l.addNode(segment)
    reg = await startNetnsRegistry(l, { ns: l.hub, ip: l.hubIp, port: 5000, parentDir: work })
    img = await buildImage({ layers: 2, layerBytes: 1 << 20, dir: work })
    await l.exec(l.hub, 'skopeo', ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${img.layoutDir}:1`, `docker://${reg.host}/${REPO}:1`], { timeoutMs: 120_000 })
    // The name resolves to every node on both segments; dnsmasq answers on the hub's address in each.
    const hosts = join(work, 'peers.hosts')
    await writeFile(hosts, l.nodes.map(n => `${n.ip} ${NAME}\n`).join(''))
    dns = l.spawn(l.hub, 'dnsmasq', ['--no-daemon', '--no-resolv', '--no-hosts', `--addn-hosts=${hosts}`,
      ...l.gateways.map(g => `--listen-address=${g}`), '--bind-interfaces', '--port=53', '--log-queries', '--log-facility=-',
      `--pid-file=${join(work, 'dnsmasq.pid')}`])
    for (const n of l.nodes) {
      const dir = join('/etc/netns', n.ns) // `ip netns exec` shows it as /etc/resolv.conf
      await mkdir(dir, { recursive: true })
      resolvDirs.push(dir)
      await writeFile(join(dir, 'resolv.conf'), `nameserver ${l.gateways[n.segment]}\n`)
    }
    await waitFor(() => dns!.logs().includes('started'), { timeoutMs: 10_000, intervalMs: 50, what: 'dnsmasq to start' })
    // The lab itself: two subnets, and unicast crosses the hub (node 3 on segment B reaches the registry on the
    // hub's segment-A address through its gateway). Node to node across the hub is what the mesh below proves.
    const [a, b] = [l.nodes[0]!, l.nodes[2]!]
    if (a.ip.split('.').slice(0, 3).join('.') === b.ip.split('.').slice(0, 3).join('.')) throw new Error(`segments share a subnet: ${a.ip}, ${b.ip}`)
    const across = await l.httpGet(b.ns, `${reg.url}/v2/`)
    if (across.status !== 200) throw new Error(`segment B cannot reach the registry on segment A's hub address: ${across.status}`)
    // One listener per segment, in the namespace of the segment's first node.
    for (const n of [l.nodes[0]!, l.nodes[2]!]) listeners.push(await startMdnsListener(l, n.ns))
  }, 180_000)

  afterAll(async () => {
    const errors: unknown[] = []
    const step = async (f: () => Promise<unknown>): Promise<void> => { try { await f() } catch (e) { errors.push(e) } }
    await Promise.all(nodes.map(async n => await step(async () => await n.d.stop('SIGTERM', 10_000))))
    for (const li of listeners) await step(async () => await li.stop())
    await step(async () => await dns?.stop())
    await step(async () => await reg?.close())
    await step(async () => await lab?.teardown())
    for (const d of resolvDirs) await step(async () => await rm(d, { recursive: true, force: true }))
    await step(async () => await img?.cleanup())
    if (work !== '') await step(async () => await rm(work, { recursive: true, force: true }))
    if (report.length > 0) console.log('pullmesh across two routed segments:\n' + report.map(l => '  ' + l).join('\n'))
    if (errors.length > 0) throw new AggregateError(errors, `mesh-segments cleanup failed: ${errors.map(String).join('; ')}`)
  }, 60_000)

  it('four nodes with mDNS and --bootstrap-dns form one mesh across both segments', async () => {
    const l = L()
    const r = must(reg, 'registry')
    const t0 = Date.now()
    for (const net of l.nodes) {
      const dataDir = join(work, `data-${net.index}`)
      await mkdir(dataDir, { recursive: true })
      const spawnedAt = Date.now()
      const d = await startDaemon({
        netns: net.ns, dataDir, listen: '0.0.0.0:5000', upstreams: { [UP]: r.url },
        mesh: true, mdns: true, meshListen: { p2p: ['/ip4/0.0.0.0/tcp/4001'], peer: '0.0.0.0:5050' },
        // --no-delegate: only the node that pulls fetches, so "who holds the image" stays exact.
        extraArgs: ['--bootstrap-dns', NAME, '--no-delegate', '--upstream-connect-timeout', '2s'], startTimeoutMs: 30_000,
      })
      l.track(d.pid)
      nodes.push({ net, dataDir, d, spawnedAt, peerId: (await status({ net })).mesh.peerId })
    }
    for (const n of nodes) {
      await waitFor(async () => connected(await status(n)).length >= 3, { timeoutMs: 60_000, intervalMs: 100, what: `node ${n.net.index} (${n.net.ip}) to see the 3 others` })
      const s = await status(n)
      const others = nodes.filter(m => m !== n)
      expect(connected(s).map(p => p.peerId).sort(), `peers of node ${n.net.index}`).toEqual(others.map(m => m.peerId).sort())
      for (const m of others) expect(connected(s).find(p => p.peerId === m.peerId)?.dataUrl, `node ${n.net.index} reaches node ${m.net.index}'s data path`).toBe(`http://${m.net.ip}:5050`)
    }
    report.push(`one mesh of 4 nodes on 2 segments ${Date.now() - t0} ms after the first node was spawned`)
    expect(dns!.logs(), 'the nodes looked the name up through dnsmasq').toContain(`query[A] ${NAME}`)

    // mDNS: on each segment, both of its nodes answered (so each found the other), and nothing of the other segment appeared.
    for (const [k, li] of listeners.entries()) {
      const mine = nodes.filter(n => n.net.segment === k)
      const theirs = nodes.filter(n => n.net.segment !== k)
      await waitFor(() => mine.every(n => li.packets().some(p => p.kind === 'response' && p.from === n.net.ip && p.peerIds.includes(n.peerId))),
        { timeoutMs: 15_000, what: `mDNS answers from both nodes of segment ${k}` })
      const packets = li.packets()
      expect(packets.filter(p => theirs.some(n => n.net.ip === p.from)).length, `mDNS packets from the other segment seen on segment ${k}`).toBe(0)
      expect(packets.filter(p => p.peerIds.some(id => theirs.some(n => n.peerId === id))).length, `mDNS answers naming a peer of the other segment on segment ${k}`).toBe(0)
    }
  }, 180_000)

  it('a pull on segment A is served by the node on segment B that holds the image, not by the upstream', async () => {
    const l = L()
    const r = must(reg, 'registry')
    const image = must(img, 'image')
    const [n1, n2, n3, n4] = [N(1), N(2), N(3), N(4)]
    expect([n1.net.segment, n3.net.segment]).toEqual([0, 1])
    await skopeoPull(n3) // cold: node 3 fetches it from the upstream
    const entries = image.blobs.length + image.manifests.length
    await waitFor(async () => ((await status(n1)).mesh.peers.find(p => p.peerId === n3.peerId)?.blobs ?? 0) >= entries,
      { timeoutMs: 15_000, intervalMs: 50, what: "node 1 to learn node 3's holdings" })

    const mark = r.logs().length
    const hitsBefore = await metric(n1, 'pullmesh_mesh_hits_total', { kind: 'blob' })
    await skopeoPull(n1)
    await l.httpGet(l.hub, `${r.url}/v2/?barrier`) // the registry logs a request after answering it
    await waitFor(() => r.logs().slice(mark).includes('barrier'), { timeoutMs: 5000, intervalMs: 10, what: 'registry log barrier' })
    const access = parseAccessWithRemote(r.logs().slice(mark))
    expect(access.some(e => e.remote === n1.net.ip), `node 1 (${n1.net.ip}) asked the upstream for the tag`).toBe(true)
    expect(access.filter(e => e.remote === n1.net.ip && e.method === 'GET' && e.path.includes('/blobs/')).map(e => e.path), 'blob GETs at the upstream from node 1').toEqual([])
    // A fill is counted once it is committed, just after its client got the last (verified) byte: poll.
    let hits = 0
    await waitFor(async () => { hits = await metric(n1, 'pullmesh_mesh_hits_total', { kind: 'blob' }) - hitsBefore; return hits >= image.blobs.length },
      { timeoutMs: 10_000, intervalMs: 50, what: 'node 1 to count its mesh hits' }).catch(() => {})
    expect(hits, 'node 1 blobs from the mesh').toBeGreaterThanOrEqual(image.blobs.length)
    // Node 3 (segment B) was the only holder: neither node 1's neighbour nor node 3's has any of it.
    for (const n of [n2, n4]) {
      const held = new Set(await verifyDataDirBlobs(n.dataDir))
      expect(image.blobs.filter(b => held.has(b.digest)).length, `blobs of the image on node ${n.net.index}`).toBe(0)
    }
    const held1 = new Set(await verifyDataDirBlobs(n1.dataDir))
    expect(image.blobs.filter(b => !held1.has(b.digest)).map(b => b.digest), 'blobs missing from node 1').toEqual([])
  }, 180_000)

  it(`each node queries mDNS ${STARTUP_QUERIES} times in its first seconds, then once a minute`, async () => {
    const last = Math.max(...nodes.map(n => n.spawnedAt))
    // Bounded wait: the rest of the watch window (the tests above usually used most of it).
    await new Promise(resolve => setTimeout(resolve, Math.max(0, last + WATCH_MS - Date.now())))
    const now = Date.now()
    for (const [k, li] of listeners.entries()) {
      const packets = li.packets()
      for (const n of nodes.filter(m => m.net.segment === k)) {
        const q = ourQueries(packets, n.net.ip)
        const allowed = STARTUP_QUERIES + Math.floor((now - n.spawnedAt) / MDNS_INTERVAL_MS)
        expect(q.length, `node ${n.net.index}: mDNS queries in ${((now - n.spawnedAt) / 1000).toFixed(0)} s`).toBeGreaterThanOrEqual(1)
        expect(q.length, `node ${n.net.index}: mDNS queries in ${((now - n.spawnedAt) / 1000).toFixed(0)} s (at most ${allowed})`).toBeLessThanOrEqual(allowed)
      }
      const seg = packets.filter(p => p.names.includes(SERVICE_TAG) || p.peerIds.length > 0)
      const responses = seg.filter(p => p.kind === 'response')
      const span = (now - Math.min(...seg.map(p => p.at))) / 1000
      report.push(`segment ${k}: ${seg.length - responses.length} mDNS queries and ${responses.length} answers in ${span.toFixed(0)} s ` +
        `(answers ${Math.min(...responses.map(p => p.bytes))}–${Math.max(...responses.map(p => p.bytes))} B)`)
    }
  }, WATCH_MS + 30_000)
})
