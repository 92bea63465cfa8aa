// `pullmesh configure`: rendering, the daemon.json merge and the file handling, through the pure
// functions and through runCli with temp files (Docker's real daemon.json is never touched).
import { chmod, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { runCli } from '../../src/cli/index.js'
import {
  backupStamp, checkContainerdConfig, ConfigureError, criDisabled, containerdHostsToml, installFile, mergeDockerDaemonJson, mirrorFromListen, parseMirror,
  podmanRegistriesConf,
} from '../../src/cli/configure.js'
import type { UpstreamConfig } from '../../src/config.js'
import { containerdConfigFromArgs, processStartMs } from '../../src/cli/containerd-running.js'

function sink (): { stream: Writable, text: () => string } {
  const chunks: string[] = []
  return {
    stream: new Writable({ write (c: Buffer | string, _e, cb) { chunks.push(c.toString()); cb() } }),
    text: () => chunks.join(''),
  }
}

async function cli (args: string[], env: Record<string, string> = {}): Promise<{ code: number, out: string, err: string }> {
  const out = sink()
  const err = sink()
  const code = await runCli(['configure', ...args], {
    env: { HOME: '/nonexistent', ...env },
    stdout: out.stream,
    stderr: err.stream,
    stopRequested: async () => await new Promise<string>(() => {}),
  })
  return { code, out: out.text(), err: err.text() }
}

const up = (name: string, url: string): UpstreamConfig => ({ name, url, shareWithPeers: false })
const MIRROR = parseMirror('http://127.0.0.1:5000')

let dir = ''
beforeEach(async () => { dir = await mkdtemp(join(tmpdir(), 'pullmesh-configure-')) })
afterEach(async () => { await rm(dir, { recursive: true, force: true }) })

describe('configure: the mirror address', () => {
  it('derives the client URL from the listen address (wildcards become loopback)', () => {
    expect(mirrorFromListen({ host: '127.0.0.1', port: 5000 }).url).toBe('http://127.0.0.1:5000')
    expect(mirrorFromListen({ host: '0.0.0.0', port: 5001 })).toEqual({ url: 'http://127.0.0.1:5001', hostPort: '127.0.0.1:5001', insecure: true })
    expect(mirrorFromListen({ host: '::', port: 5000 }).url).toBe('http://[::1]:5000')
    expect(mirrorFromListen({ host: 'fd00::1', port: 5000 }).hostPort).toBe('[fd00::1]:5000')
  })

  it('accepts an http(s) origin for --mirror and refuses anything else', () => {
    expect(parseMirror('https://mirror.lan:8443/')).toEqual({ url: 'https://mirror.lan:8443', hostPort: 'mirror.lan:8443', insecure: false })
    for (const bad of ['127.0.0.1:5000', 'ftp://x', 'http://u:p@x:1', 'http://x:1/path', 'http://x:1/?a=b']) {
      expect(() => parseMirror(bad), bad).toThrow(ConfigureError)
    }
  })
})

describe('configure docker: daemon.json merge', () => {
  it('adds the mirror first and keeps every other key and mirror', () => {
    const before = JSON.stringify({ 'log-driver': 'journald', 'registry-mirrors': ['https://other.example'], features: { buildkit: true } })
    const { text, changed } = mergeDockerDaemonJson(before, 'http://127.0.0.1:5000')
    expect(changed).toBe(true)
    expect(JSON.parse(text)).toEqual({
      'log-driver': 'journald',
      'registry-mirrors': ['http://127.0.0.1:5000', 'https://other.example'],
      features: { buildkit: true },
    })
  })

  it('does not duplicate the mirror (trailing slash and case ignored)', () => {
    const before = '{"registry-mirrors": ["HTTP://127.0.0.1:5000/"]}'
    expect(mergeDockerDaemonJson(before, 'http://127.0.0.1:5000')).toEqual({ text: before, changed: false })
  })

  it('starts a missing or empty file', () => {
    expect(JSON.parse(mergeDockerDaemonJson(undefined, 'http://127.0.0.1:5000').text)).toEqual({ 'registry-mirrors': ['http://127.0.0.1:5000'] })
    expect(JSON.parse(mergeDockerDaemonJson('  \n', 'http://127.0.0.1:5000').text)).toEqual({ 'registry-mirrors': ['http://127.0.0.1:5000'] })
  })

  it('refuses what it cannot merge safely', () => {
    for (const bad of ['{"a":', '[1]', 'null', '{"registry-mirrors": "http://x"}', '{"registry-mirrors": [1]}']) {
      expect(() => mergeDockerDaemonJson(bad, 'http://127.0.0.1:5000'), bad).toThrow(ConfigureError)
    }
  })

  it('prints the entry without --write', async () => {
    const r = await cli(['docker', '--listen', '0.0.0.0:5005'])
    expect(r.code).toBe(0)
    expect(JSON.parse(r.out)).toEqual({ 'registry-mirrors': ['http://127.0.0.1:5005'] })
    expect(r.err).toContain('--write')
  })

  it('--write merges into the file, backs up the old one, keeps its mode, and is idempotent', async () => {
    const file = join(dir, 'daemon.json')
    const original = '{\n  "data-root": "/srv/docker",\n  "registry-mirrors": ["https://other.example"]\n}\n'
    await writeFile(file, original)
    await chmod(file, 0o600)

    const r1 = await cli(['docker', '--write', '--file', file])
    expect(r1.err).toBe('')
    expect(r1.code).toBe(0)
    expect(JSON.parse(await readFile(file, 'utf8'))).toEqual({
      'data-root': '/srv/docker',
      'registry-mirrors': ['http://127.0.0.1:5000', 'https://other.example'],
    })
    expect((await stat(file)).mode & 0o777).toBe(0o600)
    const backups = (await readdir(dir)).filter(f => f.startsWith('daemon.json.bak-'))
    expect(backups).toHaveLength(1)
    expect(await readFile(join(dir, backups[0] ?? ''), 'utf8')).toBe(original)

    const r2 = await cli(['docker', '--write', '--file', file])
    expect(r2.code).toBe(0)
    expect(r2.out).toContain('already lists')
    expect((await readdir(dir)).sort()).toEqual(['daemon.json', backups[0]])
  })

  it('--write creates a missing file (and its directory) with no backup; --dry-run writes nothing', async () => {
    const file = join(dir, 'etc', 'docker', 'daemon.json')
    const dry = await cli(['docker', '--write', '--dry-run', '--file', file, '--mirror', 'http://10.0.0.2:5000'])
    expect(dry.code).toBe(0)
    expect(dry.out).toContain('"http://10.0.0.2:5000"')
    await expect(stat(file)).rejects.toThrow()
    const r = await cli(['docker', '--write', '--file', file, '--mirror', 'http://10.0.0.2:5000'])
    expect(r.code).toBe(0)
    expect(JSON.parse(await readFile(file, 'utf8'))).toEqual({ 'registry-mirrors': ['http://10.0.0.2:5000'] })
    expect(await readdir(join(dir, 'etc', 'docker'))).toEqual(['daemon.json'])
  })

  it('--write leaves an invalid file alone and exits 2', async () => {
    const file = join(dir, 'daemon.json')
    await writeFile(file, '{"debug": true,,}')
    const r = await cli(['docker', '--write', '--file', file])
    expect(r.code).toBe(2)
    expect(r.err).toContain('not valid JSON')
    expect(await readFile(file, 'utf8')).toBe('{"debug": true,,}')
    expect(await readdir(dir)).toEqual(['daemon.json'])
  })

  it('warns when Docker Hub is not the default upstream (Docker mirrors only Docker Hub)', async () => {
    const r = await cli(['docker', '--upstream', 'ghcr.io=https://ghcr.io'])
    expect(r.code).toBe(0)
    expect(r.err).toContain('warning')
  })
})

describe('configure containerd', () => {
  // The registry section of `containerd config default` (containerd 1.6, version 2), abridged.
  const V2 = 'version = 2\nroot = "/var/lib/containerd"\n[plugins]\n  [plugins."io.containerd.grpc.v1.cri"]\n    [plugins."io.containerd.grpc.v1.cri".registry]\n      config_path = ""\n'
  // containerd 2.x (version 3): config_path moved to the CRI images plugin.
  const V3 = 'version = 3\n[plugins]\n  [plugins.\'io.containerd.cri.v1.images\']\n    [plugins.\'io.containerd.cri.v1.images\'.registry]\n      config_path = \'/etc/containerd/certs.d\'\n'

  it('checks config_path in a version 2 config and says what to add', () => {
    const c = checkContainerdConfig(V2, '/etc/containerd/certs.d')
    expect(c).toMatchObject({ version: 2, configPath: '', ok: false })
    expect(c.advice.join('\n')).toContain('[plugins."io.containerd.grpc.v1.cri".registry]:\n  config_path = "/etc/containerd/certs.d"')
    expect(c.advice.join('\n')).not.toContain('use_local_image_pull')
    const fixed = checkContainerdConfig(V2.replace('config_path = ""', 'config_path = "/etc/containerd/certs.d/" # ours'), '/etc/containerd/certs.d')
    expect(fixed).toMatchObject({ version: 2, ok: true, advice: [] })
    expect(checkContainerdConfig(V2.replace('config_path = ""', 'config_path = "/elsewhere"'), '/etc/containerd/certs.d').advice[0]).toContain('config_path is /elsewhere')
  })

  it('checks a version 3 config in its own section and explains use_local_image_pull', () => {
    const c = checkContainerdConfig(V3, '/etc/containerd/certs.d')
    expect(c).toMatchObject({ version: 3, configPath: '/etc/containerd/certs.d', ok: true })
    expect(c.advice.join('\n')).toContain('use_local_image_pull = true')
    // A version 3 file with config_path only in the old (version 2) section is not read by containerd 2.x.
    const old = checkContainerdConfig(V2.replace('version = 2', 'version = 3').replace('config_path = ""', 'config_path = "/etc/containerd/certs.d"'), '/etc/containerd/certs.d')
    expect(old.ok).toBe(false)
    expect(old.advice.join('\n')).toContain('[plugins."io.containerd.cri.v1.images".registry]')
    expect(checkContainerdConfig('root = "/x"\n', '/d').advice[0]).toContain('version 1')
  })

  it('the CLI reads the containerd config it is given and says whether containerd will use the files', async () => {
    const cfg = join(dir, 'config.toml')
    await writeFile(cfg, V2)
    const bad = await cli(['containerd', '--dir', join(dir, 'certs.d'), '--containerd-config', cfg, '--upstream', 'ghcr.io=https://ghcr.io'])
    expect(bad.code).toBe(0)
    expect(bad.err).toContain('containerd will not use these files yet')
    expect(bad.out).toContain(`config_path = "${join(dir, 'certs.d')}"`)
    await writeFile(cfg, V2.replace('config_path = ""', `config_path = "${join(dir, 'certs.d')}"`))
    const good = await cli(['containerd', '--dir', join(dir, 'certs.d'), '--containerd-config', cfg, '--upstream', 'ghcr.io=https://ghcr.io'])
    expect(good.out).toContain('already reads hosts.toml')
    const missing = await cli(['containerd', '--dir', join(dir, 'certs.d'), '--containerd-config', join(dir, 'nope.toml'), '--upstream', 'ghcr.io=https://ghcr.io'])
    expect(missing.out).toContain('version 3 (containerd 2.x)')
    expect(missing.out).toContain('use_local_image_pull')
  })

  it('renders hosts.toml with the upstream as server and the mirror first; Docker Hub maps to registry-1', () => {
    expect(containerdHostsToml(up('ghcr.io', 'https://ghcr.io'), MIRROR)).toContain('server = "https://ghcr.io"\n\n[host."http://127.0.0.1:5000"]\n  capabilities = ["pull", "resolve"]\n')
    expect(containerdHostsToml(up('index.docker.io', 'https://index.docker.io'), MIRROR)).toContain('server = "https://registry-1.docker.io"')
    expect(containerdHostsToml(undefined, MIRROR)).not.toContain('server')
  })

  it('writes one hosts.toml per upstream (from PULLMESH_UPSTREAMS), backs up a changed file, leaves an equal one alone', async () => {
    const env = { PULLMESH_UPSTREAMS: 'docker.io=https://registry-1.docker.io,127.0.0.1:5001=http://127.0.0.1:5001' }
    const r1 = await cli(['containerd', '--dir', dir], env)
    expect(r1.code).toBe(0)
    expect(r1.out).toContain('config_path')
    expect((await readdir(dir)).sort()).toEqual(['127.0.0.1:5001', 'docker.io'])
    expect(await readFile(join(dir, 'docker.io', 'hosts.toml'), 'utf8')).toContain('server = "https://registry-1.docker.io"')
    expect(await readFile(join(dir, '127.0.0.1:5001', 'hosts.toml'), 'utf8')).toContain('server = "http://127.0.0.1:5001"')

    const r2 = await cli(['containerd', '--dir', dir], env)
    expect(r2.out).toContain('already up to date')
    expect(await readdir(join(dir, 'docker.io'))).toEqual(['hosts.toml'])

    const r3 = await cli(['containerd', '--dir', dir, '--mirror', 'http://127.0.0.1:6000'], env)
    expect(r3.code).toBe(0)
    const files = (await readdir(join(dir, 'docker.io'))).sort()
    expect(files).toHaveLength(2)
    expect(files[1]).toMatch(/^hosts\.toml\.bak-\d{8}T\d{6}Z$/)
    expect(await readFile(join(dir, 'docker.io', 'hosts.toml'), 'utf8')).toContain('[host."http://127.0.0.1:6000"]')
    expect(await readFile(join(dir, 'docker.io', files[1] ?? ''), 'utf8')).toContain('[host."http://127.0.0.1:5000"]')
  })

  it('flags win over the environment; with no upstream named it writes _default', async () => {
    const r = await cli(['containerd', '--dir', dir, '--upstream', 'quay.io=https://quay.io'], { PULLMESH_UPSTREAMS: 'ghcr.io=https://ghcr.io' })
    expect(r.code).toBe(0)
    expect(await readdir(dir)).toEqual(['quay.io'])
    const d2 = join(dir, 'other')
    expect((await cli(['containerd', '--dir', d2])).code).toBe(0)
    expect(await readdir(d2)).toEqual(['_default'])
  })

  it('--dry-run prints the files and writes nothing; a bad upstream exits 2 with the config message', async () => {
    const r = await cli(['containerd', '--dir', dir, '--dry-run', '--upstream', 'ghcr.io=https://ghcr.io'])
    expect(r.out).toContain(`# ${join(dir, 'ghcr.io', 'hosts.toml')}\n`)
    expect(await readdir(dir)).toEqual([])
    const bad = await cli(['containerd', '--dir', dir, '--upstream', 'ghcr.io'])
    expect(bad.code).toBe(2)
    expect(bad.err).toContain('expected NAME=URL')
  })
})

describe('configure podman', () => {
  it('puts the bare mirror in front of the default upstream and <mirror>/<name> in front of the others', () => {
    const { text, warnings } = podmanRegistriesConf([up('docker.io', 'https://registry-1.docker.io'), up('ghcr.io', 'https://ghcr.io')], 'docker.io', MIRROR)
    expect(warnings).toEqual([])
    expect(text).toContain('[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n[[registry.mirror]]\nlocation = "127.0.0.1:5000"\ninsecure = true\n')
    expect(text).toContain('[[registry]]\nprefix = "ghcr.io"\nlocation = "ghcr.io"\n\n[[registry.mirror]]\nlocation = "127.0.0.1:5000/ghcr.io"\ninsecure = true\n')
  })

  it('marks an http upstream insecure; a host:port name goes through its dotted alias, or is left out with a warning', () => {
    const withAlias = podmanRegistriesConf([up('docker.io', 'https://registry-1.docker.io'), up('reg.lan', 'http://10.0.0.5:5000'), up('10.0.0.5:5000', 'http://10.0.0.5:5000')], 'docker.io', MIRROR)
    expect(withAlias.warnings).toEqual([])
    expect(withAlias.text).toContain('prefix = "10.0.0.5:5000"\nlocation = "10.0.0.5:5000"\ninsecure = true\n\n[[registry.mirror]]\nlocation = "127.0.0.1:5000/reg.lan"')
    const without = podmanRegistriesConf([up('docker.io', 'https://registry-1.docker.io'), up('10.0.0.5:5000', 'http://10.0.0.5:5000')], 'docker.io', MIRROR)
    expect(without.warnings).toHaveLength(1)
    expect(without.text).not.toContain('10.0.0.5')
  })

  it('an https mirror is not marked insecure', () => {
    const { text } = podmanRegistriesConf([up('docker.io', 'https://registry-1.docker.io')], 'docker.io', parseMirror('https://mirror.lan'))
    expect(text).toContain('[[registry.mirror]]\nlocation = "mirror.lan"\n')
    expect(text).not.toContain('insecure')
  })

  it('writes the drop-in with the defaults (Docker Hub) and backs up a different one', async () => {
    const file = join(dir, 'registries.conf.d', '50-pullmesh.conf')
    expect((await cli(['podman', '--file', file])).code).toBe(0)
    expect(await readFile(file, 'utf8')).toContain('prefix = "docker.io"')
    expect((await cli(['podman', '--file', file, '--mirror', 'http://127.0.0.1:5999'])).code).toBe(0)
    expect((await readdir(join(dir, 'registries.conf.d'))).length).toBe(2)
  })
})

describe('configure: files', () => {
  it('backup stamps sort and carry no characters that need quoting', () => {
    expect(backupStamp(new Date('2026-07-14T09:30:12.345Z'))).toBe('20260714T093012Z')
  })

  it('a second backup within the same second gets its own name', async () => {
    const f = join(dir, 'x.conf')
    const now = new Date('2026-07-14T09:30:12Z')
    await writeFile(f, 'a')
    await installFile(f, 'b', now)
    await installFile(f, 'c', now)
    expect((await readdir(dir)).sort()).toEqual(['x.conf', 'x.conf.bak-20260714T093012Z', 'x.conf.bak-20260714T093012Z-2'])
    expect(await readFile(join(dir, 'x.conf.bak-20260714T093012Z-2'), 'utf8')).toBe('b')
  })

  it('an unwritable target exits 1 and leaves no temp file', async () => {
    const file = join(dir, 'not-a-dir')
    await writeFile(file, '')
    const r = await cli(['podman', '--file', join(file, 'x.conf')])
    expect(r.code).toBe(1)
    expect(r.err).toContain('pullmesh configure:')
    expect(await readdir(dir)).toEqual(['not-a-dir'])
  })
})

describe('the running containerd', () => {
  it('takes its config file from the command line, in each spelling, or the default', () => {
    expect(containerdConfigFromArgs(['containerd', '--config', '/a.toml', '--log-level', 'warn'])).toBe('/a.toml')
    expect(containerdConfigFromArgs(['/usr/bin/containerd', '-c', 'rel.toml'])).toBe('rel.toml')
    expect(containerdConfigFromArgs(['containerd', '--config=/b.toml'])).toBe('/b.toml')
    expect(containerdConfigFromArgs(['containerd', '--log-level', 'debug'])).toBe('/etc/containerd/config.toml')
    expect(containerdConfigFromArgs(['containerd', '--config'])).toBe('/etc/containerd/config.toml')
  })
  it('reads the start time from /proc/PID/stat, whatever the command name holds', () => {
    const rest = 'S 1 1 1 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 12 0 12345 1000 10'
    expect(processStartMs(`77 (contai) nerd) ${rest}`, 1_000_000)).toBe(1_000_000_000 + 123_450)
    expect(processStartMs('garbage', 1)).toBeUndefined()
  })
  it('sees a disabled CRI plugin in either config version', () => {
    expect(criDisabled('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n')).toBe(true)
    expect(criDisabled('version = 3\ndisabled_plugins = ["io.containerd.cri.v1.images", "x"]\n')).toBe(true)
    expect(criDisabled('version = 2\ndisabled_plugins = []\n[plugins."io.containerd.grpc.v1.cri".registry]\n')).toBe(false)
    expect(criDisabled('version = 2\n')).toBe(false)
  })
})
