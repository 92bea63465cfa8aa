// End-to-end "one upstream fetch per mesh": pullmesh nodes in separate network namespaces on one bridge
// (mDNS, a mesh key), the real distribution registry as the upstream in the hub namespace, and real
// clients in the nodes' namespaces (skopeo on nodes 1 and 2, containerd's ctr on node 3), all pulling
// the same cold image at the same moment. The registry's own access log is the judge: every blob and
// the tag's manifest are fetched from it once for the whole mesh.
// Needs root and ip, skopeo, ctr, containerd, docker-registry, curl: a missing one FAILS the run.
import { randomUUID } from 'node:crypto'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, waitFor } from '../helpers/exec.js'
import { allDigests, buildImage, verifySkopeoDir, type BuiltImage } from '../helpers/images.js'
import { createNetnsLab, parseAccessWithRemote, startNetnsContainerd, startNetnsRegistry, type NetnsContainerd, type NetnsLab, type NetnsNode, type NetnsRegistry } from '../helpers/netns.js'
import { generateMeshKey } from '../../src/mesh/index.js'
import { verifyDataDirBlobs } from './support.js'

const UP = 'reg.test'
const REPO = 'library/herd'

let lab: NetnsLab | undefined
let reg: NetnsRegistry | undefined
let img: BuiltImage | undefined
let work = ''
const daemons: Array<{ net: NetnsNode, d: DaemonProcess, dataDir: string }> = []
const containerds: NetnsContainerd[] = []

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} is not available (see the beforeAll failure)`)
  return v
}

async function registryLog (): Promise<string> {
  const r = must(reg, 'registry')
  const id = randomUUID()
  await must(lab, 'lab').httpGet(must(lab, 'lab').hub, `${r.url}/v2/?pm-barrier=${id}`)
  await waitFor(() => r.logs().includes(id), { timeoutMs: 5000, intervalMs: 10, what: 'registry log barrier' })
  return r.logs()
}

describe('e2e: one upstream fetch per mesh (namespaces, mDNS, mesh key, skopeo and ctr at once)', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('ip', 'skopeo', 'ctr', 'containerd', 'docker-registry', 'curl')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-herd-'))
    lab = await createNetnsLab({ nodes: 3 })
    reg = await startNetnsRegistry(lab, { ns: lab.hub, ip: lab.hubIp, port: 5000, parentDir: work })
    img = await buildImage({ layers: 4, layerBytes: 6 << 20, dir: work })
    await lab.exec(lab.hub, 'skopeo', ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${img.layoutDir}:1`, `docker://${reg.host}/${REPO}:1`], { timeoutMs: 120_000 })
    const keyFile = join(work, 'mesh.key')
    await writeFile(keyFile, generateMeshKey())
    for (const net of lab.nodes) {
      const dataDir = join(work, `data-${net.index}`)
      await mkdir(dataDir, { recursive: true })
      const d = await startDaemon({
        netns: net.ns,
        dataDir,
        listen: '0.0.0.0:5000',
        upstreams: { [UP]: reg.url, [reg.host]: reg.url },
        mesh: true,
        mdns: true,
        meshListen: { p2p: ['/ip4/0.0.0.0/tcp/4001'], peer: '0.0.0.0:5050' },
        // A loaded 2-core CI machine runs three daemons, three clients and the registry here: a peer timeout
        // of 1.5 s keeps a slow answer from turning into a fallback fetch, which this test would count.
        extraArgs: ['--mesh-key', keyFile, '--peer-timeout', '1500ms'],
        startTimeoutMs: 30_000,
      })
      lab.track(d.pid)
      daemons.push({ net, d, dataDir })
    }
  }, 240_000)

  afterAll(async () => {
    const errors: unknown[] = []
    const step = async (f: () => Promise<unknown>): Promise<void> => { try { await f() } catch (e) { errors.push(e) } }
    for (const c of containerds) await step(async () => await c.stop())
    await Promise.all(daemons.map(async n => await step(async () => await n.d.stop('SIGTERM', 10_000))))
    await step(async () => await reg?.close())
    await step(async () => await lab?.teardown())
    await step(async () => await img?.cleanup())
    if (work !== '') await step(async () => await rm(work, { recursive: true, force: true }))
    if (errors.length > 0) throw new AggregateError(errors, `mesh-herd cleanup failed: ${errors.map(String).join('; ')}`)
  }, 120_000)

  it('three nodes pulling one cold image at the same moment fetch each blob and the tag once from the upstream', async () => {
    const l = must(lab, 'lab')
    const r = must(reg, 'registry')
    const image = must(img, 'image')
    // Every node sees the two others as mesh members (status lists connected peers with a data URL).
    for (const n of daemons) {
      await waitFor(async () => {
        const s = await l.httpGet(n.net.ns, `http://${n.net.ip}:5000/pullmesh/v1/status`, { timeoutMs: 3000 })
        const peers = (JSON.parse(s.body) as { mesh: { peers: Array<{ connected: boolean, dataUrl?: string }> } }).mesh.peers
        return peers.filter(p => p.connected && p.dataUrl !== undefined).length >= 2
      }, { timeoutMs: 30_000, intervalMs: 50, what: `node ${n.net.index} to see 2 peers` })
    }
    // containerd on node 3, pointed at its node as the mirror.
    const [n1, n2, n3] = daemons as [typeof daemons[0], typeof daemons[0], typeof daemons[0]]
    const ctrd = await startNetnsContainerd(l, n3.net.ns, work)
    containerds.push(ctrd)
    const hostsDir = join(work, 'certs.d')
    await mkdir(join(hostsDir, r.host), { recursive: true })
    await writeFile(join(hostsDir, r.host, 'hosts.toml'), `server = "${r.url}"\n\n[host."http://${n3.net.ip}:5000"]\n  capabilities = ["pull", "resolve"]\n`)

    const mark = (await registryLog()).length
    const outs = [join(work, 'out-1'), join(work, 'out-2')]
    const t0 = performance.now()
    const times = await Promise.all([
      ...[n1, n2].map(async (n, i) => {
        await l.exec(n.net.ns, 'skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${n.net.ip}:5000/${UP}/${REPO}:1`, `dir:${outs[i]!}`], { timeoutMs: 180_000 })
        return performance.now() - t0
      }),
      (async () => {
        await ctrd.ctr(['images', 'pull', '--plain-http', '--hosts-dir', hostsDir, `${r.host}/${REPO}:1`])
        return performance.now() - t0
      })(),
    ])
    console.log(`mesh herd: 3 clients pulled ${(image.totalBytes / 1048576).toFixed(0)} MiB at once; done after ${times.map(t => `${t.toFixed(0)} ms`).join(', ')}`)

    // Every client got verified content.
    for (const o of outs) await verifySkopeoDir(o, image)
    const got = new Set(await ctrd.verifyContentStore())
    expect(allDigests(image).filter(d => !got.has(d)), "missing from node 3's containerd content store").toEqual([])
    for (const n of daemons) {
      await waitFor(async () => {
        const held = new Set(await verifyDataDirBlobs(n.dataDir))
        return image.blobs.every(b => held.has(b.digest))
      }, { timeoutMs: 30_000, intervalMs: 100, what: `node ${n.net.index}'s store to hold every blob` })
    }

    // The upstream saw each blob once and the tag once, across the whole mesh; containerd never fell back.
    const access = parseAccessWithRemote((await registryLog()).slice(mark))
    const blobGets = access.filter(e => e.method === 'GET' && e.path.includes('/blobs/sha256:'))
    if (blobGets.length !== image.blobs.length) {
      // Why a node fetched for itself: its peer errors and delegation failures.
      for (const n of daemons) {
        const m = await l.httpGet(n.net.ns, `http://${n.net.ip}:5000/metrics`, { timeoutMs: 3000 })
        console.log(`node ${n.net.index}: ${m.body.split('\n').filter(x => /^pullmesh_mesh_(peer_errors|delegated)/.test(x)).join(' | ')}`)
        console.log(n.d.logs().filter(x => /peer failed|could not fetch|delegat/.test(x)).slice(-10).join('\n'))
      }
    }
    for (const b of image.blobs) {
      expect(blobGets.filter(e => e.path.endsWith(b.digest)).map(e => `${e.remote} ${e.status}`), `upstream GETs of ${b.digest}`).toHaveLength(1)
    }
    const tagGets = access.filter(e => e.method === 'GET' && e.path.endsWith(`/${REPO}/manifests/1`))
    expect(tagGets.map(e => `${e.remote} ${e.status} ${e.userAgent}`), 'upstream GETs of the tag').toHaveLength(1)
    expect(access.filter(e => /containerd/i.test(e.userAgent)).map(e => `${e.method} ${e.path}`), 'containerd fell back to the upstream').toEqual([])
    const served = daemons.map(n => n.d.requests().filter(q => q.statusCode >= 500).map(q => `${q.method} ${q.url} ${q.statusCode}`))
    expect(served.flat(), '5xx answers').toEqual([])
  }, 300_000)
})
