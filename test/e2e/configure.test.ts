// `pullmesh configure containerd|podman` checked against the real clients: the CLI (dist/main.js)
// writes the client configuration into a temp dir, then containerd's ctr (--hosts-dir), podman
// (CONTAINERS_REGISTRIES_CONF) and skopeo (the same drop-in, --registries-conf) pull an image from the real
// distribution registry. containerd and podman fall back to the upstream silently when a mirror
// fails, so every test asserts from the daemon's request log that the mirror served the image
// and from the registry's access log that the client never reached the upstream itself.
// (Docker is never reconfigured on this machine; its daemon.json merge is unit-tested.)
import { appendFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { mountsUnder, startContainerd, type Containerd } from '../helpers/containerd.js'
import { DAEMON_ENTRY, startDaemon, type DaemonProcess, type RequestLog } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, run, which, type RunResult } from '../helpers/exec.js'
import { allDigests, buildImage, pushImage, verifySkopeoDir, type BuiltImage } from '../helpers/images.js'
import { startRegistry, type RegistryProcess } from '../helpers/registry.js'
import { logBarrier, parseRegistryAccess, upstreamAlias, type AccessEntry } from './support.js'

let work = ''
let reg: RegistryProcess | undefined
let daemon: DaemonProcess | undefined
let ctrd: Containerd | undefined
const closers: Array<() => Promise<void>> = []
const images: Record<'ctr' | 'ctrDefault' | 'podman' | 'skopeo', BuiltImage> = {} as never
const REPO: Record<keyof typeof images, string> = { ctr: 'cfg-ctr', ctrDefault: 'cfg-ctr-default', podman: 'cfg-podman', skopeo: 'cfg-skopeo' }

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} was not started (see beforeAll failure)`)
  return v
}

/** Runs the real CLI with no PULLMESH_* variables from the test's environment. */
async function configure (args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return await run(process.execPath, [DAEMON_ENTRY, 'configure', ...args], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: work, ...env },
    timeoutMs: 30_000,
  })
}

async function marks (): Promise<{ up: number, req: number }> {
  const d = must(daemon, 'daemon')
  const r = must(reg, 'registry')
  const up = await logBarrier(r)
  await logBarrier({ url: d.url, logs: d.logs })
  return { up, req: d.requests().length }
}

async function since (m: { up: number, req: number }): Promise<{ up: AccessEntry[], reqs: RequestLog[] }> {
  const d = must(daemon, 'daemon')
  const r = must(reg, 'registry')
  await logBarrier(r)
  await logBarrier({ url: d.url, logs: d.logs })
  return { up: parseRegistryAccess(r.logs().slice(m.up)), reqs: d.requests().slice(m.req) }
}

const pathOf = (url: string): string => url.split('?')[0] ?? url

/** The mirror answered 200 to the manifest (by tag or digest) and to every blob; optionally every request carried `?ns=`. */
function expectMirrorServed (reqs: RequestLog[], img: BuiltImage, repoPath: string, o: { ns?: string } = {}): void {
  const ok = reqs.filter(r => r.statusCode === 200 && r.method === 'GET')
  const has = (suffix: string): boolean => ok.some(r => pathOf(r.url).endsWith(suffix))
  const problems: string[] = []
  if (!has(`/v2/${repoPath}/manifests/1`) && !has(`/manifests/${img.manifestDigest}`)) problems.push(`no 200 GET of the manifest of ${repoPath}`)
  for (const b of img.blobs) if (!has(`/v2/${repoPath}/blobs/${b.digest}`)) problems.push(`no 200 GET of ${repoPath} blob ${b.digest}`)
  if (o.ns !== undefined) {
    const without = reqs.filter(r => r.url.startsWith('/v2/') && !r.url.includes('pm-barrier') && !r.url.includes(`ns=${encodeURIComponent(o.ns ?? '')}`))
    if (without.length > 0) problems.push(`requests without ns=${o.ns}: ${without.map(r => r.url).join(', ')}`)
  }
  if (problems.length > 0) {
    throw new Error(`the mirror did not serve ${repoPath}:\n  ${problems.join('\n  ')}\n  mirror requests:\n    ` +
      reqs.map(r => `${r.method} ${r.url} ${r.statusCode}`).join('\n    '))
  }
}

/** No request from a client reached the upstream directly (the silent fallback). */
function expectNoClientAtUpstream (entries: AccessEntry[]): void {
  const direct = entries.filter(e => /containerd|skopeo|podman|containers\//i.test(e.userAgent))
  expect(direct.map(e => `${e.method} ${e.path} ${e.status} (${e.userAgent})`), 'client requests that reached the upstream directly').toEqual([])
}

describe('e2e: pullmesh configure, checked with the real clients', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('docker-registry', 'skopeo', 'containerd', 'ctr', 'umount')
    // podman is not in the base set the other e2e tests need: name its package.
    if (which('podman') === undefined) throw new Error('podman is missing on PATH (apt-get install -y podman)')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-e2e-configure-'))
    closers.push(async () => {
      for (const mp of await mountsUnder(work)) await run('umount', ['-l', mp], { allowFailure: true })
      await rm(work, { recursive: true, force: true })
    })
    reg = await startRegistry()
    closers.push(async () => { await reg?.close() })
    for (const k of Object.keys(REPO) as Array<keyof typeof REPO>) {
      images[k] = await buildImage({ layers: 2, layerBytes: 64 * 1024, dir: work })
      await pushImage(images[k].layoutDir, `${reg.host}/library/${REPO[k]}:1`)
    }
    // The registry is the default upstream (podman sends no ns) and also has a dotted alias
    // (a mirror path component cannot hold host:port).
    daemon = await startDaemon({ dataDir: join(work, 'data'), upstreams: { [reg.host]: reg.url, [upstreamAlias(reg.port)]: reg.url } })
    closers.push(async () => { await daemon?.stop() })
    ctrd = await startContainerd()
    closers.push(async () => { await ctrd?.stop() })
  }, 180_000)

  afterAll(async () => {
    const errors: unknown[] = []
    for (const close of closers.reverse()) {
      try { await close() } catch (e) { errors.push(e) }
    }
    if (errors.length > 0) throw new AggregateError(errors, 'cleanup failed')
  }, 60_000)

  it('containerd: the hosts.toml written for an upstream makes ctr pull through the mirror, with ns=', async () => {
    const r = must(reg, 'registry')
    const d = must(daemon, 'daemon')
    const c = must(ctrd, 'containerd')
    const dir = join(work, 'certs.d')
    const res = await configure(['containerd', '--dir', dir, '--mirror', d.url], { PULLMESH_UPSTREAMS: `${r.host}=${r.url}` })
    expect(res.stdout).toContain('config_path')
    const toml = await readFile(join(dir, r.host, 'hosts.toml'), 'utf8')
    expect(toml).toContain(`server = "${r.url}"`)
    expect(toml).toContain(`[host."${d.url}"]`)

    const m = await marks()
    // No --plain-http: the schemes come from hosts.toml alone.
    await c.pull(`${r.host}/library/${REPO.ctr}:1`, { hostsDir: dir, plainHttp: false })
    const got = new Set(await c.verifyContentStore())
    expect(allDigests(images.ctr).filter(x => !got.has(x)), 'blobs missing from containerd').toEqual([])
    const { up, reqs } = await since(m)
    expectMirrorServed(reqs, images.ctr, `library/${REPO.ctr}`, { ns: r.host })
    expectNoClientAtUpstream(up)
  }, 120_000)

  it('containerd: with no upstream named, _default/hosts.toml sends every registry to the mirror', async () => {
    const r = must(reg, 'registry')
    const d = must(daemon, 'daemon')
    const c = must(ctrd, 'containerd')
    const dir = join(work, 'certs.d-default')
    await configure(['containerd', '--dir', dir, '--mirror', d.url])
    const toml = await readFile(join(dir, '_default', 'hosts.toml'), 'utf8')
    expect(toml).not.toContain('server =')

    const m = await marks()
    await c.pull(`${r.host}/library/${REPO.ctrDefault}:1`, { hostsDir: dir })
    const { up, reqs } = await since(m)
    expectMirrorServed(reqs, images.ctrDefault, `library/${REPO.ctrDefault}`, { ns: r.host })
    expectNoClientAtUpstream(up)
  }, 120_000)

  it('containerd: checks the config each running containerd started with, and says when it must restart', async () => {
    const d = must(daemon, 'daemon')
    const c = must(ctrd, 'containerd')
    const dir = join(work, 'certs.d-running')
    const cfg = join(c.dir, 'config.toml')
    const section = `\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "${dir}"\n`
    // No --containerd-config: the config of each running containerd is checked (found by its command line).
    // The suite's containerd runs without CRI, the only reader of config_path.
    const first = await configure(['containerd', '--dir', dir, '--mirror', d.url])
    expect(first.stdout + first.stderr).toContain(`the running containerd (pid ${c.pid}, --config ${cfg}): its CRI plugin is disabled, and config_path matters only to CRI`)

    // A containerd with CRI whose config lacks config_path: told so, from `containerd config dump`.
    const bare = await startContainerd({ cri: true })
    // The operator then edits its file as advised, but does not restart it.
    const ready = await startContainerd({ cri: true, extraConfig: section })
    try {
      const bareCfg = join(bare.dir, 'config.toml')
      const readyCfg = join(ready.dir, 'config.toml')
      const second = await configure(['containerd', '--dir', dir, '--mirror', d.url])
      const secondOut = second.stdout + second.stderr
      expect(secondOut).toContain(`the running containerd (pid ${bare.pid}, --config ${bareCfg}) will not use these files yet (config version 2, checked with containerd config dump).`)
      expect(secondOut).toContain(`config_path = "${dir}"`)
      expect(secondOut).toContain(`the running containerd (pid ${ready.pid}, --config ${readyCfg}) reads hosts.toml from ${dir} (checked with containerd config dump).`)

      await appendFile(bareCfg, section)
      const third = await configure(['containerd', '--dir', dir, '--mirror', d.url])
      expect(third.stdout + third.stderr).toContain(`the running containerd (pid ${bare.pid}, --config ${bareCfg}): ${bareCfg} sets config_path = "${dir}", but ${bareCfg} changed after containerd started: restart containerd once to apply it.`)

      // Naming a file checks that file only, as before.
      const named = await configure(['containerd', '--dir', dir, '--mirror', d.url, '--containerd-config', readyCfg])
      expect(named.stdout + named.stderr).not.toContain('the running containerd')
      expect(named.stdout).toContain(`(version 2) already reads hosts.toml from ${dir}`)
    } finally {
      await ready.stop()
      await bare.stop()
    }
  }, 120_000)

  it('podman: the registries.conf drop-in makes podman pull through the mirror (default upstream, bare mirror path)', async () => {
    const r = must(reg, 'registry')
    const d = must(daemon, 'daemon')
    const pdir = join(work, 'podman')
    await mkdir(pdir, { recursive: true })
    const conf = join(pdir, '50-pullmesh.conf')
    await configure(['podman', '--file', conf, '--mirror', d.url, '--upstream', `${r.host}=${r.url}`])
    const text = await readFile(conf, 'utf8')
    expect(text).toContain(`prefix = "${r.host}"`)
    expect(text).toContain(`location = "${d.host}"`)

    const storageConf = join(pdir, 'storage.conf')
    await writeFile(storageConf, [
      '[storage]',
      'driver = "vfs"',
      `graphroot = "${join(pdir, 'graph')}"`,
      `runroot = "${join(pdir, 'run')}"`,
      '',
    ].join('\n'))
    const env = {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      HOME: pdir,
      CONTAINERS_REGISTRIES_CONF: conf,
      CONTAINERS_STORAGE_CONF: storageConf,
    }
    const podman = async (args: string[]): Promise<RunResult> => await run('podman', [
      '--cgroup-manager=cgroupfs', '--events-backend=none', '--tmpdir', join(pdir, 'tmp'), ...args,
    ], { env, timeoutMs: 120_000 })

    const m = await marks()
    try {
      await podman(['pull', '--quiet', `${r.host}/library/${REPO.podman}:1`])
      const id = (await podman(['image', 'inspect', '--format', '{{.Digest}}', `${r.host}/library/${REPO.podman}:1`])).stdout.trim()
      expect(id).toBe(images.podman.manifestDigest)
    } finally {
      // Only this storage (vfs: no mounts); `system reset` would also drop the machine's podman networks.
      await podman(['rmi', '--all', '--force']).catch(() => {})
    }
    const { up, reqs } = await since(m)
    expectMirrorServed(reqs, images.podman, `library/${REPO.podman}`)
    expectNoClientAtUpstream(up)
  }, 180_000)

  it('skopeo: the same drop-in, for a registry that is not the default upstream, pulls through <mirror>/<alias>', async () => {
    const r = must(reg, 'registry')
    const d = must(daemon, 'daemon')
    const alias = upstreamAlias(r.port)
    const conf = join(work, 'skopeo-50-pullmesh.conf')
    // Configured for a daemon whose default upstream is Docker Hub (nothing contacts it): the registry
    // is then reached through a mirror path prefix, its dotted alias.
    await configure(['podman', '--file', conf, '--mirror', d.url, '--upstream', 'docker.io=https://registry-1.docker.io',
      '--upstream', `${alias}=${r.url}`, '--upstream', `${r.host}=${r.url}`])
    expect(await readFile(conf, 'utf8')).toContain(`location = "${d.host}/${alias}"`)

    const out = join(work, 'skopeo-out')
    const m = await marks()
    // skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF (podman reads it): name the file with its global --registries-conf.
    await run('skopeo', ['--registries-conf', conf, 'copy', '--quiet', `docker://${r.host}/library/${REPO.skopeo}:1`, `dir:${out}`], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: work },
      timeoutMs: 120_000,
    })
    await verifySkopeoDir(out, images.skopeo)
    const { up, reqs } = await since(m)
    expectMirrorServed(reqs, images.skopeo, `${alias}/library/${REPO.skopeo}`)
    expectNoClientAtUpstream(up)
  }, 120_000)
})
