// End-to-end mesh healing: five pullmesh daemons in their own network namespaces on one bridge, mDNS
// discovery only, the real distribution registry as the upstream (in the hub). The LAN is split, a
// node's cable is pulled, nodes are restarted on the same data dir; after each, every node must be
// connected to every other again and know their holdings, and a pull across the old split must be
// served by a peer with the upstream stopped. Heal and rejoin times are printed for the README.
// Needs root and ip, iptables, skopeo, docker-registry, curl: a missing one FAILS the run.
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, waitFor } from '../helpers/exec.js'
import { buildImage, verifySkopeoDir, type BuiltImage } from '../helpers/images.js'
import { createNetnsLab, startNetnsRegistry, type NetnsLab, type NetnsNode, type NetnsRegistry } from '../helpers/netns.js'

const NODES = 5
const UP = 'reg.test'
/** The bound the issue asks for: healed (connected to all, holdings known) within 30 s. */
const HEAL_BOUND_MS = 30_000
/** Long enough for libp2p's connection monitor (10 s pings) to drop every connection across the cut. */
const CUT_MS = 20_000

interface PeerStatus { peerId: string, dataUrl?: string, connected: boolean, blobs: number }
interface Status { mesh: { peerId: string, peers: PeerStatus[] }, cache: { blobs: number } }
interface Node { net: NetnsNode, dataDir: string, d: DaemonProcess, peerId: string }

let lab: NetnsLab | undefined
let reg: NetnsRegistry | undefined
let work = ''
const nodes: Node[] = []
const images: BuiltImage[] = []
const report: string[] = []

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} is not available (see the beforeAll failure)`)
  return v
}
const L = (): NetnsLab => must(lab, 'netns lab')
const R = (): NetnsRegistry => must(reg, 'registry')
const N = (i: number): Node => must(nodes[i - 1], `node ${i}`)
const url = (n: Node): string => `http://${n.net.ip}:5000`
const fmt = (ms: number): string => `${(ms / 1000).toFixed(2)} s`

async function spawnNode (net: NetnsNode): Promise<Node> {
  const dataDir = join(work, `data-${net.index}`)
  await mkdir(dataDir, { recursive: true })
  const d = await startDaemon({
    netns: net.ns,
    dataDir,
    listen: '0.0.0.0:5000',
    upstreams: { [UP]: R().url },
    mesh: true,
    mdns: true,
    meshListen: { p2p: ['/ip4/0.0.0.0/tcp/4001'], peer: '0.0.0.0:5050' },
    logLevel: 'info',
    extraArgs: ['--upstream-connect-timeout', '2s', '--upstream-retries', '2'],
    startTimeoutMs: 30_000,
  })
  L().track(d.pid)
  expect(d.args, 'discovery must be by mDNS alone').not.toContain('--bootstrap')
  const st = await status(net)
  return { net, dataDir, d, peerId: st.mesh.peerId }
}

async function status (net: NetnsNode): Promise<Status> {
  const r = await L().httpGet(net.ns, `http://${net.ip}:5000/pullmesh/v1/status`, { timeoutMs: 3000 })
  if (r.status !== 200) throw new Error(`status of ${net.ip} answered ${r.status}: ${r.body.slice(0, 300)}`)
  return JSON.parse(r.body) as Status
}

/** What is missing for a full mesh among `group`: unconnected pairs and peers whose holdings are not known. */
async function meshGaps (group: readonly Node[]): Promise<string[]> {
  const sts = await Promise.all(group.map(async n => await status(n.net)))
  const gaps: string[] = []
  group.forEach((n, i) => {
    const s = sts[i] as Status
    group.forEach((m, j) => {
      if (i === j) return
      const p = s.mesh.peers.find(x => x.peerId === m.peerId)
      if (p === undefined || !p.connected || p.dataUrl === undefined) { gaps.push(`${n.net.index}→${m.net.index} not connected`); return }
      const holds = (sts[j] as Status).cache.blobs
      if (p.blobs < holds) gaps.push(`${n.net.index} knows ${p.blobs}/${holds} blobs of ${m.net.index}`)
    })
  })
  return gaps
}

/** Waits until every node in `group` is connected to every other and knows its holdings; returns ms since `since`. */
async function waitHealed (group: readonly Node[], since: number, timeoutMs = HEAL_BOUND_MS): Promise<number> {
  let last: string[] = []
  try {
    await waitFor(async () => { last = await meshGaps(group); return last.length === 0 }, { timeoutMs: Math.max(0, since + timeoutMs - Date.now()), intervalMs: 100, what: 'a full mesh with known holdings' })
  } catch (e) {
    throw new Error(`${String(e)}\nstill missing: ${last.join(', ')}\n` + group.map(n => `--- node ${n.net.index} ---\n${n.d.logs().slice(-15).join('\n')}`).join('\n'))
  }
  return Date.now() - since
}

/** Waits until no node of `a` is connected to any node of `b` (the cut has been noticed on both sides). */
async function waitApart (a: readonly Node[], b: readonly Node[], timeoutMs = 60_000): Promise<void> {
  await waitFor(async () => {
    for (const [x, y] of [[a, b], [b, a]] as const) {
      for (const n of x) {
        const s = await status(n.net)
        if (s.mesh.peers.some(p => p.connected && y.some(m => m.peerId === p.peerId))) return false
      }
    }
    return true
  }, { timeoutMs, intervalMs: 500, what: 'connections across the cut to drop' })
}

/** Times (ms since epoch) of a node's log lines with this msg (and, if given, this peer). */
function logTimes (n: Node, msg: string, peer?: string): number[] {
  const out: number[] = []
  for (const l of n.d.logs()) {
    if (!l.includes(`"msg":"${msg}"`) || (peer !== undefined && !l.includes(peer))) continue
    try { out.push(Date.parse((JSON.parse(l) as { time: string }).time)) } catch {}
  }
  return out
}

async function pushImage (name: string): Promise<BuiltImage> {
  const img = await buildImage({ layers: 2, layerBytes: 256 << 10, dir: work, tag: '1' })
  images.push(img)
  await L().exec(L().hub, 'skopeo', ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests',
    `oci:${img.layoutDir}:1`, `docker://${R().host}/library/${name}:1`], { timeoutMs: 120_000 })
  return img
}

async function skopeoPull (n: Node, name: string, img: BuiltImage): Promise<void> {
  const out = await mkdtemp(join(work, 'skopeo-'))
  await L().exec(n.net.ns, 'skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${n.net.ip}:5000/${UP}/library/${name}:1`, `dir:${join(out, 'img')}`], { timeoutMs: 120_000 })
    .catch((e: unknown) => { throw new Error(`${String(e)}\n--- node ${n.net.index} ---\n${n.d.logs().filter(l => !l.includes('/pullmesh/v1/status')).slice(-25).join('\n')}`) })
  await verifySkopeoDir(join(out, 'img'), img)
  await rm(out, { recursive: true, force: true })
}

async function sha256File (path: string): Promise<string> {
  const h = createHash('sha256')
  await pipeline(createReadStream(path), h)
  return 'sha256:' + h.digest('hex')
}

/** With the upstream stopped, every blob of `img` is fetched by digest through each of `via` (so from a peer), byte-exact. */
async function pullBlobsUpstreamDown (via: readonly Node[], name: string, img: BuiltImage): Promise<void> {
  const r = R()
  await r.stop()
  try {
    for (const n of via) {
      for (const b of img.blobs) {
        const file = join(work, `blob-${n.net.index}-${b.digest.slice(7, 19)}`)
        const res = await L().exec(n.net.ns, 'curl', ['-sS', '--max-time', '60', '-o', file, '-w', '%{http_code}', `${url(n)}/v2/${UP}/library/${name}/blobs/${b.digest}`], { timeoutMs: 70_000 })
        if (res.stdout.trim() !== '200') {
          const body = await readFile(file, 'utf8').catch(() => '')
          throw new Error(`GET ${name} blob ${b.digest} via node ${n.net.index} with the upstream down: ${res.stdout.trim()} ${body}\n` +
            `--- node ${n.net.index} ---\n${n.d.logs().filter(l => !l.includes('/pullmesh/v1/status')).slice(-30).join('\n')}`)
        }
        expect(await sha256File(file)).toBe(b.digest)
        await rm(file, { force: true })
      }
    }
  } finally {
    await r.start()
  }
}

describe('e2e: the mesh heals after partitions, link cuts and restarts (mDNS only, network namespaces)', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('ip', 'iptables', 'skopeo', 'docker-registry', 'curl')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-heal-'))
    lab = await createNetnsLab({ nodes: NODES })
    reg = await startNetnsRegistry(lab, { ns: lab.hub, ip: lab.hubIp, port: 5000, parentDir: work })
    const started = await Promise.all(lab.nodes.map(async net => await spawnNode(net)))
    nodes.push(...started)
    await waitHealed(nodes, Date.now(), 60_000)
  }, 180_000)

  afterAll(async () => {
    const errors: unknown[] = []
    const step = async (f: () => Promise<unknown>): Promise<void> => { try { await f() } catch (e) { errors.push(e) } }
    await Promise.all(nodes.map(async n => await step(async () => await n.d.stop('SIGTERM', 10_000))))
    await step(async () => await reg?.close())
    await step(async () => await lab?.teardown())
    for (const img of images) await step(async () => await img.cleanup())
    if (work !== '') await step(async () => await rm(work, { recursive: true, force: true }))
    if (report.length > 0) console.log('pullmesh mesh healing (5 nodes, mDNS):\n' + report.map(l => '  ' + l).join('\n'))
    if (errors.length > 0) throw new AggregateError(errors, `mesh-heal cleanup failed: ${errors.map(String).join('; ')}`)
  }, 120_000)

  it('a LAN split in two for 20 s heals: all reconnect, know the other side\'s holdings, and serve across the old split', async () => {
    const l = L()
    const sideA = [N(1), N(2), N(3)] // stays on br0 with the upstream
    const sideB = [N(4), N(5)]
    const img = await pushImage('split')
    const cutAt = Date.now()
    await l.splitBridge(sideB.map(n => n.net))
    try {
      // Only side A reaches the upstream: node 1 pulls an image the other side has never heard of.
      await skopeoPull(N(1), 'split', img)
      await waitApart(sideA, sideB)
      const left = CUT_MS - (Date.now() - cutAt)
      if (left > 0) await new Promise(resolve => setTimeout(resolve, left))
    } finally {
      await l.healBridge()
    }
    const healedAt = Date.now()
    report.push(`split: connections across it dropped; split lasted ${fmt(healedAt - cutAt)}`)
    const ms = await waitHealed(nodes, healedAt)
    report.push(`split healed: every node connected to every other and knowing their holdings ${fmt(ms)} after the bridge was rejoined`)
    await pullBlobsUpstreamDown(sideB, 'split', img)
  }, 180_000)

  it('a node whose link is down for 20 s rejoins: connected to all, knows holdings, pulls from peers', async () => {
    const l = L()
    const cut = N(3)
    const rest = nodes.filter(n => n !== cut)
    const img = await pushImage('cut')
    const cutAt = Date.now()
    await l.cutLink(cut.net)
    try {
      await skopeoPull(N(1), 'cut', img)
      await waitApart([cut], rest)
      const left = CUT_MS - (Date.now() - cutAt)
      if (left > 0) await new Promise(resolve => setTimeout(resolve, left))
    } finally {
      await l.restoreLink(cut.net)
    }
    const upAt = Date.now()
    const ms = await waitHealed(nodes, upAt)
    report.push(`link cut (node 3, ${fmt(upAt - cutAt)}): healed ${fmt(ms)} after the link came back`)
    await pullBlobsUpstreamDown([cut], 'cut', img)
  }, 180_000)

  it('a node frozen for 20 s (SIGSTOP, like a laptop asleep) is reconnected by all once it resumes', async () => {
    const frozen = N(1)
    const rest = nodes.filter(n => n !== frozen)
    const stoppedAt = Date.now()
    process.kill(frozen.d.pid, 'SIGSTOP')
    try {
      // The others' connection monitor drops it (its pings go unanswered); it cannot answer status meanwhile.
      await waitFor(async () => {
        for (const n of rest) if ((await status(n.net)).mesh.peers.some(p => p.connected && p.peerId === frozen.peerId)) return false
        return true
      }, { timeoutMs: 60_000, intervalMs: 500, what: 'the others to drop the frozen node' })
      const left = CUT_MS - (Date.now() - stoppedAt)
      if (left > 0) await new Promise(resolve => setTimeout(resolve, left))
    } finally {
      process.kill(frozen.d.pid, 'SIGCONT')
    }
    const resumedAt = Date.now()
    const ms = await waitHealed(nodes, resumedAt)
    report.push(`node 1 frozen (SIGSTOP) for ${fmt(resumedAt - stoppedAt)}: healed ${fmt(ms)} after SIGCONT`)
  }, 120_000)

  it('a node restarted on the same data dir (SIGTERM, SIGKILL) is reconnected by every other node', async () => {
    const l = L()
    const img = await pushImage('restart')
    await skopeoPull(N(5), 'restart', img)

    const restart = async (i: number, signal: NodeJS.Signals, blockOutbound: boolean): Promise<number> => {
      const old = N(i)
      await old.d.stop(signal, 10_000)
      if (blockOutbound) {
        // The restarted node cannot dial out (SYNs to the mesh port dropped): only the others' redials can bring it back.
        await l.exec(old.net.ns, 'iptables', ['-A', 'OUTPUT', '-p', 'tcp', '--dport', '4001', '--syn', '-j', 'DROP'])
      }
      const fresh = await spawnNode(old.net)
      expect(fresh.peerId, 'same data dir, same peer id').toBe(old.peerId)
      nodes[i - 1] = fresh
      try {
        const meshStarted = logTimes(fresh, 'mesh started')[0]
        if (meshStarted === undefined) throw new Error('no "mesh started" log line')
        const others = nodes.filter(n => n !== fresh)
        // Every other node logs "peer connected" for it.
        await waitFor(() => others.every(o => logTimes(o, 'peer connected', fresh.peerId).some(t => t >= meshStarted - 1000)), { timeoutMs: HEAL_BOUND_MS, intervalMs: 50, what: `every node to reconnect to restarted node ${i}` })
          .catch((e: unknown) => { throw new Error(`${String(e)}\n` + [fresh, ...others].map(n => `--- node ${n.net.index} ---\n${n.d.logs().slice(-12).join('\n')}`).join('\n')) })
        const each = others.map(o => Math.min(...logTimes(o, 'peer connected', fresh.peerId).filter(t => t >= meshStarted - 1000)) - meshStarted)
        const rejoin = Math.max(...each)
        const healed = await waitHealed(nodes, meshStarted)
        report.push(`restart of node ${i} (${signal}${blockOutbound ? ', its own dials blocked' : ''}): "mesh started" → connected by all ${fmt(rejoin)} (nodes ${others.map((o, k) => `${o.net.index}: ${fmt(each[k] ?? NaN)}`).join(', ')}), → full mesh with holdings known (status polled) ${fmt(healed)}`)
        return rejoin
      } finally {
        if (blockOutbound) await l.exec(old.net.ns, 'iptables', ['-D', 'OUTPUT', '-p', 'tcp', '--dport', '4001', '--syn', '-j', 'DROP'])
      }
    }

    await restart(5, 'SIGTERM', false)
    await restart(2, 'SIGKILL', false)
    await restart(4, 'SIGKILL', true)
    // Node 5 held the image before its restart: the others know it again and can pull it from it.
    await pullBlobsUpstreamDown([N(1)], 'restart', img)
  }, 180_000)
})
