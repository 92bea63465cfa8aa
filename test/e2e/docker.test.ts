// The real Docker engine (Debian docker.io) pulling through pullmesh, configured the way a team would:
// `pullmesh configure docker --write` puts pullmesh in daemon.json's registry-mirrors. dockerd runs only
// inside a network namespace with no route off this machine (started with nsenter, see
// ../shared/NOTES.md), so its fallback to the public Docker Hub cannot leave; pullmesh runs in the same
// namespace on 127.0.0.1:5000, with the real distribution registry (hub namespace) as its "docker.io".
// It pulls a single-platform image and a multi-platform index, then both again with the registry stopped.
// Needs root and ip, nsenter, dockerd, docker, skopeo, docker-registry: a missing one FAILS the run.
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, DAEMON_ENTRY, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, run, waitFor } from '../helpers/exec.js'
import { buildImage, buildMultiArchImage, type BuiltImage } from '../helpers/images.js'
import { createNetnsLab, netnsOf, namedNetns, startNetnsRegistry, type NetnsLab, type NetnsRegistry } from '../helpers/netns.js'

let lab: NetnsLab | undefined
let reg: NetnsRegistry | undefined
let pm: DaemonProcess | undefined
let work = ''
let dockerd: ChildProcess | undefined
let dockerdLog = ''
const images: BuiltImage[] = []

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} is not available (see the beforeAll failure)`)
  return v
}

const sock = (): string => `unix://${join(work, 'docker.sock')}`
async function docker (args: string[], timeoutMs = 120_000): Promise<string> {
  const r = await run('docker', ['-H', sock(), ...args], { timeoutMs, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: work, DOCKER_CONFIG: join(work, 'docker-cli') } })
  return r.stdout
}

describe('e2e: the Docker engine pulls through pullmesh (registry-mirrors), in a namespace with no way out', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('ip', 'nsenter', 'dockerd', 'docker', 'skopeo', 'docker-registry', 'curl')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-docker-'))
    lab = await createNetnsLab({ nodes: 1 })
    const net = lab.nodes[0]!
    reg = await startNetnsRegistry(lab, { ns: lab.hub, ip: lab.hubIp, port: 5000, parentDir: work })
    const single = await buildImage({ layers: 2, layerBytes: 1 << 20, dir: work, tag: 'single' })
    const multi = await buildMultiArchImage({ layers: 2, layerBytes: 512 << 10, dir: work, tag: 'multi' })
    images.push(single, multi)
    await lab.exec(lab.hub, 'skopeo', ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests', `oci:${single.layoutDir}:single`, `docker://${reg.host}/library/app:1`], { timeoutMs: 120_000 })
    await lab.exec(lab.hub, 'skopeo', ['copy', '--quiet', '--all', '--dest-tls-verify=false', '--preserve-digests', `oci:${multi.layoutDir}:multi`, `docker://${reg.host}/library/multi:1`], { timeoutMs: 120_000 })

    // pullmesh in the node's namespace, its default upstream "docker.io" being the registry in the hub.
    pm = await startDaemon({ netns: net.ns, dataDir: join(work, 'pm-data'), listen: '127.0.0.1:5000', upstreams: { 'docker.io': reg.url }, logLevel: 'info', startTimeoutMs: 30_000 })
    lab.track(pm.pid)

    // daemon.json written by pullmesh itself.
    await mkdir(join(work, 'docker-cli'), { recursive: true })
    const daemonJson = join(work, 'daemon.json')
    const cfg = await run(process.execPath, [DAEMON_ENTRY, 'configure', 'docker', '--write', '--file', daemonJson, '--mirror', 'http://127.0.0.1:5000', '--upstream', `docker.io=${reg.url}`], { timeoutMs: 30_000 })
    expect(cfg.code, cfg.stderr).toBe(0)

    // dockerd inside the node's namespace (nsenter, not `ip netns exec`, which hides the cgroup mounts).
    const args = ['--net=/var/run/netns/' + net.ns, 'dockerd', '--config-file', daemonJson, '--data-root', join(work, 'root'), '--exec-root', join(work, 'exec'),
      '--pidfile', join(work, 'docker.pid'), '-H', sock(), '--bridge=none', '--iptables=false', '--ip6tables=false', '--storage-driver=vfs']
    dockerd = spawn('nsenter', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    dockerd.stdout?.on('data', (d: Buffer) => { dockerdLog += d.toString() })
    dockerd.stderr?.on('data', (d: Buffer) => { dockerdLog += d.toString() })
    lab.track(dockerd.pid!)
    await waitFor(async () => { try { await docker(['version'], 5_000); return true } catch { return false } }, { timeoutMs: 60_000, intervalMs: 200, what: `dockerd to answer (log: ${dockerdLog.slice(-2000)})` })
    // The engine must not share our namespace: its fallback to Docker Hub must have nowhere to go.
    expect(await netnsOf(dockerd.pid!)).toBe(await namedNetns(net.ns))
    expect(await netnsOf(dockerd.pid!)).not.toBe(await netnsOf('self'))
  }, 300_000)

  afterAll(async () => {
    const errors: unknown[] = []
    const step = async (f: () => Promise<unknown>): Promise<void> => { try { await f() } catch (e) { errors.push(e) } }
    if (dockerd?.pid !== undefined && dockerd.exitCode === null) {
      const d = dockerd
      await step(async () => {
        const exited = new Promise(resolve => d.once('exit', resolve))
        d.kill('SIGTERM')
        await Promise.race([exited, new Promise(resolve => setTimeout(resolve, 20_000))])
      })
    }
    await step(async () => await pm?.stop('SIGTERM', 10_000))
    await step(async () => await reg?.close())
    await step(async () => await lab?.teardown())
    for (const i of images) await step(async () => await i.cleanup())
    if (work !== '') await step(async () => await rm(work, { recursive: true, force: true }))
    if (errors.length > 0) throw new AggregateError(errors, `docker e2e cleanup failed: ${errors.map(String).join('; ')}`)
  }, 120_000)

  it('pulls a single-platform image and a multi-platform index through pullmesh, then again with the upstream stopped', async () => {
    const p = must(pm, 'pullmesh')
    const r = must(reg, 'registry')
    const [single, multi] = images as [BuiltImage, BuiltImage]
    const amd64 = multi.platforms.find(x => x.arch === 'amd64')!

    const t0 = performance.now()
    await docker(['pull', 'app:1'])
    await docker(['pull', 'multi:1'])
    const cold = performance.now() - t0
    const inspect = JSON.parse(await docker(['image', 'inspect', 'app:1', 'multi:1'])) as Array<{ RepoDigests: string[] }>
    expect(inspect[0]!.RepoDigests.join()).toContain(single.manifestDigest)
    expect(inspect[1]!.RepoDigests.join()).toContain(multi.manifestDigest)
    // Docker's requests reached pullmesh (nothing else in that namespace asks for /v2/library/...), and every
    // layer of app:1 and of multi's linux/amd64 went through it.
    const fromDocker = p.requests().filter(q => q.url.startsWith('/v2/library/'))
    for (const d of [...single.blobs.map(b => b.digest), ...amd64.layers.map(l => l.digest)]) {
      expect(fromDocker.some(q => q.url.endsWith(`/blobs/${d}`) && q.statusCode === 200), `Docker fetched ${d} through pullmesh`).toBe(true)
    }

    // The upstream goes away; the engine forgets the images and pulls them again: pullmesh alone answers.
    await r.stop()
    try {
      await docker(['rmi', 'app:1', 'multi:1'])
      const t1 = performance.now()
      await docker(['pull', 'app:1'])
      await docker(['pull', 'multi:1'])
      const warm = performance.now() - t1
      const again = JSON.parse(await docker(['image', 'inspect', 'app:1', 'multi:1'])) as Array<{ RepoDigests: string[] }>
      expect(again[0]!.RepoDigests.join()).toContain(single.manifestDigest)
      expect(again[1]!.RepoDigests.join()).toContain(multi.manifestDigest)
      console.log(`docker engine through pullmesh: cold pulls ${cold.toFixed(0)} ms, pulls with the upstream stopped ${warm.toFixed(0)} ms`)
    } finally {
      await r.start()
    }
    const failed = p.requests().filter(q => q.statusCode >= 500).map(q => `${q.method} ${q.url} ${q.statusCode}`)
    expect(failed, '5xx answers from pullmesh').toEqual([])
  }, 300_000)
})
