// `pullmesh configure docker|containerd|podman`: writes (or prints) the client-side configuration
// that makes a container client use this pullmesh as its registry mirror. The upstreams come from
// the same settings the daemon reads (flags, PULLMESH_* variables, --config file), so a host
// configured with the daemon's environment gets one mirror entry per upstream the daemon serves.
//
// The pure functions (rendering and merging) are exported for the unit tests; the writes are
// atomic (temp file in the same directory, fsync, rename) and an existing file is backed up first.
import type { Command, Option } from 'commander'
import { randomBytes } from 'node:crypto'
import { constants } from 'node:fs'
import { copyFile, mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { buildConfig, mergeSettings, settingsFromEnv, settingsFromFile, type Config, type HostPort, type RawSettings, type UpstreamConfig } from '../config.js'
import { ConfigError } from '../errors.js'
import type { CliIo } from './index.js'
import { findRunningContainerds, runningContainerdConfig } from './containerd-running.js'

export const DEFAULT_DOCKER_FILE = '/etc/docker/daemon.json'
export const DEFAULT_CONTAINERD_DIR = '/etc/containerd/certs.d'
export const DEFAULT_PODMAN_FILE = '/etc/containers/registries.conf.d/50-pullmesh.conf'

/** Upstream names that mean Docker Hub (the same set the router knows). */
const DOCKER_HUB = new Set(['docker.io', 'registry-1.docker.io', 'index.docker.io'])
const DOCKER_HUB_SERVER = 'https://registry-1.docker.io'

/** A failure the user can act on: reported as one line, no stack. */
export class ConfigureError extends Error {
  override readonly name = 'ConfigureError'
  readonly code = 'PULLMESH_CONFIGURE'
}

// ------------------------------------------------------------------ the mirror address

export interface Mirror {
  /** `http://127.0.0.1:5000`: what Docker and containerd are given. */
  url: string
  /** `127.0.0.1:5000`: what registries.conf calls a location. */
  hostPort: string
  /** Plain HTTP (registries.conf needs `insecure = true`). */
  insecure: boolean
}

/** The URL local clients use to reach a daemon listening on `listen`: a wildcard address becomes loopback. */
export function mirrorFromListen (listen: HostPort): Mirror {
  let host = listen.host
  if (host === '0.0.0.0' || host === '') host = '127.0.0.1'
  else if (host === '::' || host === '0:0:0:0:0:0:0:0') host = '::1'
  const h = host.includes(':') ? `[${host}]` : host
  return { url: `http://${h}:${listen.port}`, hostPort: `${h}:${listen.port}`, insecure: true }
}

/** Validates `--mirror`: an http(s) origin, nothing else. */
export function parseMirror (s: string): Mirror {
  let u: URL | undefined
  try { u = new URL(s) } catch { u = undefined }
  if (u === undefined || !['http:', 'https:'].includes(u.protocol) || u.username !== '' || u.password !== '' ||
      u.search !== '' || u.hash !== '' || (u.pathname !== '/' && u.pathname !== '')) {
    throw new ConfigureError(`--mirror: expected an http(s) URL with no path, such as http://127.0.0.1:5000, got "${s}"`)
  }
  return { url: u.origin, hostPort: u.host, insecure: u.protocol === 'http:' }
}

// ------------------------------------------------------------------ docker

/**
 * Merges the mirror into the text of a daemon.json (undefined: no file yet). The mirror goes first in
 * `registry-mirrors`; other keys and other mirrors are kept. `changed` is false when it is already there.
 */
export function mergeDockerDaemonJson (existing: string | undefined, mirrorUrl: string): { text: string, changed: boolean } {
  let doc: Record<string, unknown> = {}
  if (existing !== undefined && existing.trim() !== '') {
    let parsed: unknown
    try { parsed = JSON.parse(existing) } catch (err) {
      throw new ConfigureError(`it is not valid JSON (${(err as Error).message}); fix it or move it away, nothing was changed`)
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw new ConfigureError('it does not hold a JSON object; nothing was changed')
    }
    doc = parsed as Record<string, unknown>
  }
  const current = doc['registry-mirrors']
  if (current !== undefined && (!Array.isArray(current) || current.some(m => typeof m !== 'string'))) {
    throw new ConfigureError('"registry-mirrors" is not a list of URLs; nothing was changed')
  }
  const mirrors = (current ?? []) as string[]
  const norm = (m: string): string => m.trim().replace(/\/+$/, '').toLowerCase()
  if (mirrors.some(m => norm(m) === norm(mirrorUrl))) {
    return { text: existing ?? '', changed: false }
  }
  doc['registry-mirrors'] = [mirrorUrl, ...mirrors]
  return { text: JSON.stringify(doc, null, 2) + '\n', changed: true }
}

// ------------------------------------------------------------------ containerd

/** containerd's main config file, where `config_path` must point at the certs.d directory. */
export const DEFAULT_CONTAINERD_CONFIG = '/etc/containerd/config.toml'

/** Where `config_path` lives, per config version: 2 is containerd 1.x (and 2.x reading old files), 3 is containerd 2.x. */
const REGISTRY_SECTION: Record<2 | 3, string> = {
  2: '[plugins."io.containerd.grpc.v1.cri".registry]',
  3: '[plugins."io.containerd.cri.v1.images".registry]',
}

export interface ContainerdConfigCheck {
  /** The config file's `version` (1 when absent, as containerd reads it). */
  version: number
  /** The `config_path` set in the registry section of that version, if any. */
  configPath?: string
  /** True when that config_path is `dir`. */
  ok: boolean
  /** What to tell the operator (each a line). */
  advice: string[]
}

/**
 * Reads a containerd config.toml (just enough TOML: section headers and `key = "value"` lines) and says
 * whether containerd will read the hosts.toml files under `dir`, and what to change if not.
 */
export function checkContainerdConfig (text: string, dir: string): ContainerdConfigCheck {
  let section = ''
  let version = 1
  const values = new Map<string, string>()
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.replace(/#.*$/, '').trim()
    if (line === '') continue
    const h = /^\[(.+)\]$/.exec(line)
    if (h !== null) { section = `[${h[1]!.replace(/\s+/g, '').replace(/'/g, '"')}]`; continue }
    const kv = /^([A-Za-z0-9_.-]+)\s*=\s*(.+)$/.exec(line)
    if (kv === null) continue
    const value = kv[2]!.trim().replace(/^"(.*)"$/, '$1').replace(/^'(.*)'$/, '$1')
    if (section === '' && kv[1] === 'version') version = Number(value) || 1
    values.set(`${section}${kv[1]}`, value)
  }
  const wanted: 2 | 3 = version >= 3 ? 3 : 2
  const key = `${REGISTRY_SECTION[wanted].replace(/\s+/g, '')}config_path`
  const configPath = values.get(key)
  const ok = configPath !== undefined && configPath.replace(/\/+$/, '') === dir.replace(/\/+$/, '')
  const advice: string[] = []
  if (version < 2) advice.push('this config file has no `version = 2` or `version = 3`: containerd reads it as version 1, which has no config_path; start from `containerd config default`')
  if (!ok) {
    advice.push(configPath === undefined || configPath === ''
      ? `config_path is not set: containerd ignores the hosts.toml files. Add, under ${REGISTRY_SECTION[wanted]}:`
      : `config_path is ${configPath}, not ${dir}: containerd reads other hosts.toml files. Set, under ${REGISTRY_SECTION[wanted]}:`)
    advice.push(`  config_path = ${tomlString(dir)}`)
    advice.push('and restart containerd once (later hosts.toml changes apply to the next pull).')
  }
  if (wanted === 3) {
    advice.push('containerd 2.1 and later pull through the transfer service, which does not read hosts.toml mirrors the way')
    advice.push('the CRI plugin does; to pull through pullmesh for Kubernetes, set, under [plugins."io.containerd.cri.v1.images"]:')
    advice.push('  use_local_image_pull = true')
  }
  return { version, ...(configPath !== undefined ? { configPath } : {}), ok, advice }
}

/** True when a containerd config (a file or `config dump`) disables the CRI plugin, the only reader of config_path. */
export function criDisabled (text: string): boolean {
  const m = /^\s*disabled_plugins\s*=\s*\[([^\]]*)\]/m.exec(text)
  return m !== null && /"io\.containerd\.(grpc\.v1\.cri|cri\.v1\.images)"/.test(m[1]!)
}

/** The certs.d directory containerd looks up for an upstream: the registry host as written in image names. */
export function containerdHostDir (u: UpstreamConfig): string {
  return DOCKER_HUB.has(u.name) ? 'docker.io' : u.name
}

/**
 * hosts.toml for one upstream (or, for `undefined`, the `_default` catch-all, which keeps each
 * registry's own server): the mirror is the first host, for pull and resolve only.
 */
export function containerdHostsToml (u: UpstreamConfig | undefined, mirror: Mirror): string {
  const lines = ['# Written by `pullmesh configure containerd`: pull through the local pullmesh first.']
  if (u !== undefined) {
    const server = DOCKER_HUB.has(u.name) ? DOCKER_HUB_SERVER : u.url
    lines.push(`server = ${tomlString(server)}`)
  }
  lines.push('', `[host.${tomlString(mirror.url)}]`, '  capabilities = ["pull", "resolve"]', '')
  return lines.join('\n')
}

// ------------------------------------------------------------------ podman

/** The registries.conf location of an upstream: its host (and path) as the client must address it. */
function podmanLocation (u: UpstreamConfig): { location: string, insecure: boolean } {
  if (DOCKER_HUB.has(u.name)) return { location: 'docker.io', insecure: false }
  const url = new URL(u.url)
  const path = url.pathname.replace(/\/+$/, '')
  return { location: url.host + path, insecure: url.protocol === 'http:' }
}

/**
 * A registries.conf drop-in with one `[[registry]]` per upstream and the mirror in front of it.
 * podman sends no upstream name to a mirror, so the default upstream gets the bare mirror address
 * (the daemon serves it for unqualified paths) and every other upstream is addressed through
 * `<mirror>/<name>`, which the daemon routes by its first path component. A name with a port
 * cannot be a path component; another upstream with the same URL and a dotted name (an alias)
 * is used then, or the upstream is left out with a warning.
 */
export function podmanRegistriesConf (upstreams: readonly UpstreamConfig[], defaultUpstream: string, mirror: Mirror): { text: string, warnings: string[] } {
  const warnings: string[] = []
  const out = [
    '# Written by `pullmesh configure podman`: podman, buildah, skopeo and CRI-O pull through the local pullmesh first.',
    '',
  ]
  const seen = new Set<string>()
  for (const u of upstreams) {
    const prefix = DOCKER_HUB.has(u.name) ? 'docker.io' : u.name
    if (seen.has(prefix)) continue
    let mirrorLocation: string | undefined
    if (u.name === defaultUpstream) {
      mirrorLocation = mirror.hostPort
    } else if (!u.name.includes(':')) {
      mirrorLocation = `${mirror.hostPort}/${u.name}`
    } else {
      const alias = upstreams.find(a => a.url === u.url && !a.name.includes(':') && a.name !== defaultUpstream)
      if (alias !== undefined) mirrorLocation = `${mirror.hostPort}/${alias.name}`
      else if (upstreams.find(a => a.url === u.url && a.name === defaultUpstream) !== undefined) mirrorLocation = mirror.hostPort
    }
    if (mirrorLocation === undefined) {
      warnings.push(`upstream ${u.name}: a name with a port cannot be addressed through a mirror path and it is not the default upstream; ` +
        `give it a dotted alias on the daemon (e.g. --upstream registry.lan=${u.url}) or make it --default-upstream. Left out.`)
      continue
    }
    seen.add(prefix)
    const loc = podmanLocation(u)
    out.push('[[registry]]', `prefix = ${tomlString(prefix)}`, `location = ${tomlString(loc.location)}`)
    if (loc.insecure) out.push('insecure = true')
    out.push('', '[[registry.mirror]]', `location = ${tomlString(mirrorLocation)}`)
    if (mirror.insecure) out.push('insecure = true')
    out.push('')
  }
  return { text: out.join('\n'), warnings }
}

/** A TOML basic string. JSON's escapes are valid TOML escapes. */
function tomlString (s: string): string {
  return JSON.stringify(s)
}

// ------------------------------------------------------------------ files

/** `20260714T093012Z`: sortable, with no characters that need quoting. */
export function backupStamp (now: Date): string {
  return now.toISOString().replace(/\.\d+Z$/, 'Z').replace(/[-:]/g, '')
}

async function readIfExists (path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw err
  }
}

/** Copies `path` to `<path>.bak-<stamp>` (or `-2`, `-3` ... if taken). Returns the backup's path. */
export async function backupFile (path: string, now: Date): Promise<string> {
  const base = `${path}.bak-${backupStamp(now)}`
  for (let i = 1; ; i++) {
    const target = i === 1 ? base : `${base}-${i}`
    try {
      await copyFile(path, target, constants.COPYFILE_EXCL)
      return target
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || i >= 100) throw err
    }
  }
}

/** Writes `text` to `path` atomically: temp file beside it, fsync, rename, fsync the directory. Keeps an existing file's mode. */
export async function writeFileAtomic (path: string, text: string): Promise<void> {
  const dir = dirname(path)
  await mkdir(dir, { recursive: true })
  let mode = 0o644
  try { mode = (await stat(path)).mode & 0o7777 } catch {}
  const tmp = join(dir, `.${basename(path)}.tmp-${randomBytes(6).toString('hex')}`)
  try {
    const fh = await open(tmp, 'wx', mode)
    try {
      await fh.writeFile(text)
      await fh.chmod(mode)
      await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(tmp, path)
  } catch (err) {
    await rm(tmp, { force: true })
    throw err
  }
  const dh = await open(dir, 'r')
  try { await dh.sync() } catch {} finally { await dh.close() }
}

export type WriteOutcome = { path: string, state: 'unchanged' } | { path: string, state: 'written', backup?: string }

/** Writes `text` unless the file already holds it; backs up a different existing file first. */
export async function installFile (path: string, text: string, now: Date): Promise<WriteOutcome> {
  const old = await readIfExists(path)
  if (old === text) return { path, state: 'unchanged' }
  const backup = old === undefined ? undefined : await backupFile(path, now)
  await writeFileAtomic(path, text)
  return backup === undefined ? { path, state: 'written' } : { path, state: 'written', backup }
}

function describeOutcome (o: WriteOutcome): string {
  if (o.state === 'unchanged') return `${o.path}: already up to date`
  return `wrote ${o.path}` + (o.backup !== undefined ? ` (previous version saved as ${o.backup})` : '')
}

// ------------------------------------------------------------------ the command

interface Resolved {
  config: Readonly<Config>
  mirror: Mirror
  /** True when upstreams were named (flag, environment or config file) rather than defaulted. */
  explicitUpstreams: boolean
}

const collect = (v: string, prev: string[] = []): string[] => [...prev, v]

/** Only what was typed counts as a flag, so that defaults never mask the environment or the file. */
function typedFlags (cmd: Command): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  for (const opt of cmd.options as Option[]) {
    const key = opt.attributeName()
    if (cmd.getOptionValueSource(key) === 'cli') out[key] = cmd.getOptionValue(key)
  }
  return out
}

function resolveSettings (cmd: Command, io: CliIo): Resolved {
  const flags = typedFlags(cmd)
  const problems: string[] = []
  const configFile = (flags.config as string | undefined) ?? io.env.PULLMESH_CONFIG
  const file = configFile !== undefined ? settingsFromFile(configFile, problems) : {}
  const fromFlags: RawSettings = {
    ...(flags.listen !== undefined ? { listen: flags.listen as string } : {}),
    ...(flags.upstream !== undefined ? { upstream: flags.upstream as string[] } : {}),
    ...(flags.defaultUpstream !== undefined ? { defaultUpstream: flags.defaultUpstream as string } : {}),
  }
  const raw = mergeSettings(file, settingsFromEnv(io.env), fromFlags)
  const config = buildConfig(raw, io.env, problems)
  const mirror = flags.mirror !== undefined ? parseMirror(flags.mirror as string) : mirrorFromListen(config.listen)
  return { config, mirror, explicitUpstreams: (raw.upstream ?? []).length > 0 }
}

function commonOptions (c: Command): Command {
  return c
    .option('--mirror <url>', 'the pullmesh address clients use (default http://127.0.0.1:5000, or derived from --listen)')
    .option('--listen <host:port>', 'the daemon\'s listen address, to derive --mirror from (PULLMESH_LISTEN)')
    .option('--upstream <name=url>', 'an upstream the daemon serves; repeatable (PULLMESH_UPSTREAMS; default docker.io)', collect)
    .option('--default-upstream <name>', 'the daemon\'s default upstream (PULLMESH_DEFAULT_UPSTREAM; default: the first)')
    .option('-c, --config <file>', 'the daemon\'s JSON config file (PULLMESH_CONFIG)')
    .option('--dry-run', 'print what would be written and change nothing')
}

/** Adds `pullmesh configure docker|containerd|podman` to the program. */
export function registerConfigure (program: Command, io: CliIo, setExit: (code: number) => void, now: () => Date = () => new Date()): void {
  const out = (s: string): void => { io.stdout.write(s) }
  const warn = (s: string): void => { io.stderr.write(`pullmesh: warning: ${s}\n`) }

  /** Configuration problems exit 2, failed reads and writes exit 1; both as one line, without a stack. */
  const run = (action: (cmd: Command, r: Resolved) => Promise<void>) => async (_opts: unknown, cmd: Command): Promise<void> => {
    try {
      await action(cmd, resolveSettings(cmd, io))
    } catch (err) {
      if (err instanceof ConfigError || err instanceof ConfigureError) {
        io.stderr.write(`pullmesh configure: ${err.message}\n`)
        setExit(2)
        return
      }
      const e = err as NodeJS.ErrnoException
      if (typeof e.code === 'string' && typeof e.syscall === 'string') {
        io.stderr.write(`pullmesh configure: ${e.message}${e.code === 'EACCES' || e.code === 'EPERM' || e.code === 'EROFS' ? ' (run as root?)' : ''}\n`)
        setExit(1)
        return
      }
      throw err
    }
  }

  const configure = program.command('configure')
    .description('point a container client at this pullmesh (docker, containerd, podman)')

  commonOptions(configure.command('docker'))
    .description('print the registry-mirrors entry for Docker\'s daemon.json, or merge it in with --write')
    .option('--write', `merge the mirror into --file (backed up first)`)
    .option('--file <path>', 'daemon.json to merge into', DEFAULT_DOCKER_FILE)
    .action(run(async (cmd, r) => {
      const o = cmd.opts<{ write?: boolean, file: string, dryRun?: boolean }>()
      const hub = r.config.upstreams.find(u => DOCKER_HUB.has(u.name))
      if (hub === undefined || hub.name !== r.config.defaultUpstream) {
        warn(`Docker sends only Docker Hub pulls to a mirror, and pullmesh answers them from its default upstream (${r.config.defaultUpstream}), not Docker Hub`)
      }
      if (o.write !== true) {
        out(JSON.stringify({ 'registry-mirrors': [r.mirror.url] }, null, 2) + '\n')
        // stdout stays pure JSON (it can be redirected into a file); the hint goes to stderr.
        io.stderr.write(`merge this into ${o.file} (or run with --write), then: systemctl reload docker\n`)
        return
      }
      const existing = await readIfExists(o.file)
      let merged
      try { merged = mergeDockerDaemonJson(existing, r.mirror.url) } catch (err) {
        if (err instanceof ConfigureError) throw new ConfigureError(`${o.file}: ${err.message}`)
        throw err
      }
      if (o.dryRun === true) {
        out(merged.changed ? `# ${o.file} would become:\n${merged.text}` : `# ${o.file} already lists ${r.mirror.url}\n`)
        return
      }
      if (!merged.changed) { out(`${o.file} already lists ${r.mirror.url}\n`); return }
      out(describeOutcome(await installFile(o.file, merged.text, now())) + '\n')
      out('registry-mirrors is reloaded without a restart: systemctl reload docker (or send dockerd SIGHUP)\n')
    }))

  commonOptions(configure.command('containerd'))
    .description('write a hosts.toml per upstream under containerd\'s certs.d (or _default when no upstream is named)')
    .option('--dir <path>', 'containerd\'s config_path', DEFAULT_CONTAINERD_DIR)
    .option('--containerd-config <file>', 'containerd\'s config.toml, checked for config_path (default: the config of each running containerd, else this file)', DEFAULT_CONTAINERD_CONFIG)
    .action(run(async (cmd, r) => {
      const o = cmd.opts<{ dir: string, containerdConfig: string, dryRun?: boolean }>()
      const files: Array<{ path: string, text: string }> = []
      if (r.explicitUpstreams) {
        const dirs = new Set<string>()
        for (const u of r.config.upstreams) {
          const d = containerdHostDir(u)
          if (dirs.has(d)) continue
          dirs.add(d)
          files.push({ path: join(o.dir, d, 'hosts.toml'), text: containerdHostsToml(u, r.mirror) })
        }
      } else {
        files.push({ path: join(o.dir, '_default', 'hosts.toml'), text: containerdHostsToml(undefined, r.mirror) })
      }
      if (o.dryRun === true) {
        for (const f of files) out(`# ${f.path}\n${f.text}\n`)
      } else {
        const t = now()
        for (const f of files) out(describeOutcome(await installFile(f.path, f.text, t)) + '\n')
      }
      // The running containerd's own config, when one runs here and no file was named: that is what it uses.
      const running = cmd.getOptionValueSource('containerdConfig') === 'cli' ? [] : await findRunningContainerds()
      if (running.length > 0) {
        for (const c of running) {
          const rc = await runningContainerdConfig(c)
          const what = `the running containerd (pid ${c.pid}, --config ${c.configFile})`
          if (rc.text === undefined) {
            warn(`${what}: its config file could not be read to check it; set config_path = ${tomlString(o.dir)} in it.`)
            continue
          }
          const restart = rc.changedSinceStart ? ` ${c.configFile} changed after containerd started: restart containerd once to apply it.` : ''
          const checked = rc.source === 'dump' ? 'checked with containerd config dump' : 'checked in the file'
          if (criDisabled(rc.text)) {
            // config_path is the CRI plugin's setting: without CRI, only clients that read certs.d themselves pull through us.
            out(`${what}: its CRI plugin is disabled, and config_path matters only to CRI (Kubernetes); ctr takes --hosts-dir ${o.dir}, nerdctl reads ${o.dir === DEFAULT_CONTAINERD_DIR ? 'it' : '/etc/containerd/certs.d'} by default.${restart}\n`)
            continue
          }
          const ch = checkContainerdConfig(rc.text, o.dir)
          if (ch.ok && !rc.changedSinceStart) out(`${what} reads hosts.toml from ${o.dir} (${checked}).\n`)
          else if (ch.ok) warn(`${what}: ${c.configFile} sets config_path = ${tomlString(o.dir)}, but${restart}`)
          else warn(`${what} will not use these files yet (config version ${ch.version}, ${checked}).${restart}`)
          for (const a of ch.ok ? ch.advice.filter(l => !l.startsWith('and restart')) : ch.advice) out(a + '\n')
        }
        out(`ctr: ctr images pull --hosts-dir ${o.dir} ...\n`)
        return
      }
      let text: string | undefined
      try { text = await readFile(o.containerdConfig, 'utf8') } catch { text = undefined }
      if (text === undefined) {
        out(`containerd reads these only with config_path set (${o.containerdConfig} could not be read to check it):\n` +
          `  version 2 (containerd 1.x):  ${REGISTRY_SECTION[2]}\n    config_path = ${tomlString(o.dir)}\n` +
          `  version 3 (containerd 2.x):  ${REGISTRY_SECTION[3]}\n    config_path = ${tomlString(o.dir)}\n` +
          '  and with containerd 2.1 or later, also: [plugins."io.containerd.cri.v1.images"] use_local_image_pull = true\n' +
          `then restart containerd once. ctr: ctr images pull --hosts-dir ${o.dir} ...\n`)
      } else {
        const c = checkContainerdConfig(text, o.dir)
        if (c.ok) out(`${o.containerdConfig} (version ${c.version}) already reads hosts.toml from ${o.dir}.\n`)
        else warn(`${o.containerdConfig} (version ${c.version}): containerd will not use these files yet.`)
        for (const a of c.advice) out(a + '\n')
        out(`ctr: ctr images pull --hosts-dir ${o.dir} ...\n`)
      }
    }))

  commonOptions(configure.command('podman'))
    .description('write a registries.conf drop-in that puts the mirror in front of each upstream (podman, buildah, skopeo, CRI-O)')
    .option('--file <path>', 'the drop-in to write', DEFAULT_PODMAN_FILE)
    .action(run(async (cmd, r) => {
      const o = cmd.opts<{ file: string, dryRun?: boolean }>()
      const conf = podmanRegistriesConf(r.config.upstreams, r.config.defaultUpstream, r.mirror)
      for (const w of conf.warnings) warn(w)
      if (o.dryRun === true) { out(`# ${o.file}\n${conf.text}`); return }
      out(describeOutcome(await installFile(o.file, conf.text, now())) + '\n')
    }))
}
