// Discovery without multicast: three pullmesh nodes in network namespaces on one bridge with mDNS off,
// each given only a DNS name (--bootstrap-dns) that a real DNS server (dnsmasq, in the hub namespace)
// resolves to every node's address, as a Kubernetes headless Service would. They form one mesh and
// learn each other's holdings. Needs root, ip and dnsmasq: a missing one FAILS the run.
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, waitFor } from '../helpers/exec.js'
import { createNetnsLab, type NetnsLab, type NetnsProcess } from '../helpers/netns.js'

const NAME = 'pm-peers.mesh.test'
let lab: NetnsLab | undefined
let work = ''
let dns: NetnsProcess | undefined
const daemons: Array<{ ns: string, ip: string, d: DaemonProcess }> = []
const resolvDirs: string[] = []

describe('e2e: discovery by DNS name (no multicast)', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('ip', 'dnsmasq', 'curl')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-dns-'))
    lab = await createNetnsLab({ nodes: 3 })
    // The name resolves to every node (one A record each), served by dnsmasq on the hub's bridge address.
    const hosts = join(work, 'peers.hosts')
    await writeFile(hosts, lab.nodes.map(n => `${n.ip} ${NAME}\n`).join(''))
    dns = lab.spawn(lab.hub, 'dnsmasq', ['--no-daemon', '--no-resolv', '--no-hosts', `--addn-hosts=${hosts}`, `--listen-address=${lab.hubIp}`,
      '--bind-interfaces', '--port=53', '--log-queries', '--log-facility=-', `--pid-file=${join(work, 'dnsmasq.pid')}`])
    // `ip netns exec` gives a process /etc/netns/NS/resolv.conf as its /etc/resolv.conf.
    for (const n of lab.nodes) {
      const dir = join('/etc/netns', n.ns)
      await mkdir(dir, { recursive: true })
      resolvDirs.push(dir)
      await writeFile(join(dir, 'resolv.conf'), `nameserver ${lab.hubIp}\n`)
    }
    await waitFor(() => dns!.logs().includes('started'), { timeoutMs: 10_000, intervalMs: 50, what: 'dnsmasq to start' })
  }, 120_000)

  afterAll(async () => {
    const errors: unknown[] = []
    const step = async (f: () => Promise<unknown>): Promise<void> => { try { await f() } catch (e) { errors.push(e) } }
    await Promise.all(daemons.map(async n => await step(async () => await n.d.stop('SIGTERM', 10_000))))
    await step(async () => await dns?.stop())
    await step(async () => await lab?.teardown())
    for (const d of resolvDirs) await step(async () => await rm(d, { recursive: true, force: true }))
    if (work !== '') await step(async () => await rm(work, { recursive: true, force: true }))
    if (errors.length > 0) throw new AggregateError(errors, `mesh-dns cleanup failed: ${errors.map(String).join('; ')}`)
  }, 60_000)

  it('nodes given only a DNS name form one mesh and reach each other\'s data paths', async () => {
    const l = lab!
    const t0 = Date.now()
    for (const net of l.nodes) {
      const dataDir = join(work, `data-${net.index}`)
      const d = await startDaemon({
        netns: net.ns, dataDir, listen: '0.0.0.0:5000', upstreams: { 'dns.test': `http://${l.hubIp}:5999` },
        mesh: true, mdns: false, meshListen: { p2p: ['/ip4/0.0.0.0/tcp/4001'], peer: '0.0.0.0:5050' },
        extraArgs: ['--bootstrap-dns', NAME], startTimeoutMs: 30_000,
      })
      l.track(d.pid)
      daemons.push({ ns: net.ns, ip: net.ip, d })
    }
    for (const n of daemons) {
      expect(n.d.args, 'no multicast, no bootstrap address').not.toContain('--bootstrap')
      await waitFor(async () => {
        const s = await l.httpGet(n.ns, `http://${n.ip}:5000/pullmesh/v1/status`, { timeoutMs: 3000 })
        const peers = (JSON.parse(s.body) as { mesh: { peers: Array<{ connected: boolean, dataUrl?: string }> } }).mesh.peers
        return peers.filter(p => p.connected && p.dataUrl !== undefined).length >= 2
      }, { timeoutMs: 45_000, intervalMs: 100, what: `node at ${n.ip} to see both others` })
    }
    console.log(`DNS discovery: 3 nodes formed a full mesh ${Date.now() - t0} ms after the first started`)
    // The name was looked up through dnsmasq from the nodes' namespaces.
    expect(dns!.logs()).toContain(`query[A] ${NAME}`)
  }, 120_000)
})
