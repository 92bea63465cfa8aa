// Dual stack: two pullmesh nodes in network namespaces that reach each other over IPv6 only (ULA addresses
// on the bridge; the mesh listens on /ip6/::, the data path on [::]). B learns A by an /ip6 bootstrap
// address, and takes a blob A holds over A's data path at an IPv6 URL, not from the upstream.
// Needs root, ip, curl and docker-registry: a missing one FAILS the run.
import { createHash } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, run, waitFor } from '../helpers/exec.js'
import { buildImage } from '../helpers/images.js'
import { createNetnsLab, parseAccessWithRemote, startNetnsRegistry, type NetnsLab, type NetnsRegistry } from '../helpers/netns.js'

let lab: NetnsLab | undefined
let reg: NetnsRegistry | undefined
let work = ''
const daemons: DaemonProcess[] = []
const v6 = (i: number): string => `fd99:${lab!.subnet}::${10 + i}`

interface Status { mesh: { peerId: string, peers: Array<{ peerId: string, connected: boolean, dataUrl?: string, blobs: number }> } }
async function status (ns: string, ip: string): Promise<Status> {
  const r = await lab!.httpGet(ns, `http://${ip}:5000/pullmesh/v1/status`, { timeoutMs: 3000 })
  return JSON.parse(r.body) as Status
}

describe('e2e: the mesh and the data path over IPv6', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('ip', 'curl', 'docker-registry', 'skopeo')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-v6-'))
    lab = await createNetnsLab({ nodes: 2 })
    for (const n of lab.nodes) await run('ip', ['-n', n.ns, '-6', 'addr', 'add', `${v6(n.index)}/64`, 'dev', 'eth0', 'nodad'], { timeoutMs: 10_000 })
    reg = await startNetnsRegistry(lab, { ns: lab.hub, ip: lab.hubIp, port: 5000, parentDir: work })
  }, 120_000)

  afterAll(async () => {
    const errors: unknown[] = []
    const step = async (f: () => Promise<unknown>): Promise<void> => { try { await f() } catch (e) { errors.push(e) } }
    await Promise.all(daemons.map(async d => await step(async () => await d.stop('SIGTERM', 10_000))))
    await step(async () => await reg?.close())
    await step(async () => await lab?.teardown())
    if (work !== '') await step(async () => await rm(work, { recursive: true, force: true }))
    if (errors.length > 0) throw new AggregateError(errors, `mesh-ipv6 cleanup failed: ${errors.map(String).join('; ')}`)
  }, 60_000)

  it('B connects to A by an IPv6 address and takes A\'s blob from A\'s IPv6 data URL', async () => {
    const l = lab!
    const r = reg!
    const [na, nb] = l.nodes as [typeof l.nodes[0], typeof l.nodes[0]]
    const start = async (net: typeof na, extra: string[]): Promise<DaemonProcess> => {
      const d = await startDaemon({
        netns: net.ns, dataDir: join(work, `data-${net.index}`), listen: '0.0.0.0:5000', upstreams: { 'v6.test': r.url },
        mesh: true, mdns: false, meshListen: { p2p: ['/ip6/::/tcp/4001'], peer: '[::]:5050' }, extraArgs: extra, startTimeoutMs: 30_000,
      })
      l.track(d.pid)
      daemons.push(d)
      return d
    }
    await start(na, [])
    const aId = (await status(na.ns, na.ip)).mesh.peerId
    await start(nb, ['--bootstrap', `/ip6/${v6(na.index)}/tcp/4001/p2p/${aId}`])

    // A caches a layer (from the upstream, over IPv4 to the hub).
    const img = await buildImage({ layers: 1, layerBytes: 2 << 20, dir: work })
    await l.exec(l.hub, 'skopeo', ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests', `oci:${img.layoutDir}:1`, `docker://${r.host}/library/v6:1`], { timeoutMs: 60_000 })
    const digest = img.blobs.find(b => b.size >= 1 << 20)!.digest
    const got = await l.exec(na.ns, 'curl', ['-sf', '-o', '/dev/null', '-w', '%{http_code}', `http://${na.ip}:5000/v2/v6.test/library/v6/blobs/${digest}`], { timeoutMs: 30_000 })
    expect(got.stdout).toBe('200')

    // B knows A, over IPv6, with an IPv6 data URL, and holdings.
    let seen: Status['mesh']['peers'][0] | undefined
    await waitFor(async () => {
      seen = (await status(nb.ns, nb.ip)).mesh.peers.find(p => p.peerId === aId && p.connected)
      return seen !== undefined && (seen.blobs ?? 0) >= 1
    }, { timeoutMs: 30_000, intervalMs: 100, what: 'B to know A and its blob over IPv6' })
    expect(seen!.dataUrl).toBe(`http://[${v6(na.index)}]:5050`)

    const mark = r.logs().length
    const viaB = await l.exec(nb.ns, 'curl', ['-sf', `http://${nb.ip}:5000/v2/v6.test/library/v6/blobs/${digest}`, '-o', join(work, 'viaB')], { timeoutMs: 30_000 })
    expect(viaB.code).toBe(0)
    const { readFile } = await import('node:fs/promises')
    expect(createHash('sha256').update(await readFile(join(work, 'viaB'))).digest('hex')).toBe(digest.slice(7))
    const access = parseAccessWithRemote(r.logs().slice(mark))
    expect(access.filter(e => e.remote === nb.ip && e.path.includes('/blobs/')).map(e => `${e.method} ${e.path}`), 'B went to the upstream').toEqual([])
  }, 120_000)
})
