// A private containerd 1.6 for e2e tests: root, state and the gRPC socket live
// in a mkdtemp directory, the CRI plugin is off, and stop() kills it by PID,
// unmounts anything left under the temp dir and removes it.
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { run, waitFor, type RunResult } from './exec.js'

export interface PullOptions {
  /** Directory holding `<host:port>/hosts.toml` (containerd's certs.d layout). */
  hostsDir?: string
  /** Default true: everything in these tests is plain HTTP on loopback. */
  plainHttp?: boolean
  /** Fetch every platform of an index (default: only the host platform). */
  allPlatforms?: boolean
  platform?: string
  /** `content fetch` instead of `images pull`: no unpacking, no snapshots. */
  fetchOnly?: boolean
  timeoutMs?: number
}

export interface Containerd {
  dir: string
  root: string
  socket: string
  pid: number
  logs: () => string
  /** `ctr images pull` (or `ctr content fetch`) of `ref` = `HOST:PORT/repo:tag`. */
  pull: (ref: string, o?: PullOptions) => Promise<RunResult>
  /** Run any `ctr` subcommand against this containerd. */
  ctr: (args: string[], o?: { allowFailure?: boolean }) => Promise<RunResult>
  /** Remove the image record and every blob from the content store (and snapshots). */
  clear: () => Promise<void>
  /** Digests of the blobs in the content store, each verified by hashing the file. */
  verifyContentStore: () => Promise<string[]>
  stop: () => Promise<void>
}

/** Mount points at or below `dir` (deepest first). */
export async function mountsUnder (dir: string): Promise<string[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8')
  const out: string[] = []
  for (const line of text.split('\n')) {
    const mp = line.split(' ')[4]
    if (mp === undefined) continue
    const decoded = mp.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)))
    if (decoded === dir || decoded.startsWith(dir + '/')) out.push(decoded)
  }
  return out.sort((a, b) => b.length - a.length)
}

/**
 * Write `<hostsDir>/<upstreamHost>/hosts.toml` with `mirror` as the first host
 * and the upstream as `server`. Returns hostsDir (created with mkdtemp if not given).
 */
export async function writeHostsToml (o: { upstreamHost: string, mirrorUrl: string, upstreamUrl?: string, hostsDir?: string }): Promise<string> {
  const hostsDir = o.hostsDir ?? await mkdtemp(join(tmpdir(), 'pullmesh-certsd-'))
  const dir = join(hostsDir, o.upstreamHost)
  await mkdir(dir, { recursive: true })
  const toml = [
    `server = "${o.upstreamUrl ?? 'http://' + o.upstreamHost}"`,
    '',
    `[host."${o.mirrorUrl}"]`,
    '  capabilities = ["pull", "resolve"]',
    '',
  ].join('\n')
  await writeFile(join(dir, 'hosts.toml'), toml)
  return hostsDir
}

async function sha256File (path: string): Promise<string> {
  const h = createHash('sha256')
  await pipeline(createReadStream(path, { highWaterMark: 1 << 20 }), h)
  return h.digest('hex')
}

/**
 * A containerd 1.6 config with root, state and sockets in a new temp dir (under `parentDir`), CRI and
 * the snapshotters and tracing this machine lacks turned off. Shared by the root-namespace and netns helpers.
 */
export interface ContainerdConfigOptions {
  /** Run the CRI plugin (off by default: the tests pull with ctr, which does not use it). */
  cri?: boolean
  /** TOML appended to the generated config (sections not already in it). */
  extraConfig?: string
}

export async function writeContainerdConfig (prefix: string, parentDir?: string, o: ContainerdConfigOptions = {}): Promise<{ dir: string, root: string, state: string, socket: string, configFile: string }> {
  const dir = await mkdtemp(join(parentDir ?? tmpdir(), prefix))
  const root = join(dir, 'root')
  const state = join(dir, 'state')
  const socket = join(dir, 'containerd.sock')
  await mkdir(root, { recursive: true })
  await mkdir(state, { recursive: true })
  const config = [
    'version = 2',
    `root = "${root}"`,
    `state = "${state}"`,
    `disabled_plugins = [${o.cri === true ? '' : '"io.containerd.grpc.v1.cri", '}"io.containerd.snapshotter.v1.btrfs", ` +
      '"io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", ' +
      '"io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]',
    '', '[grpc]', `  address = "${socket}"`, '', '[ttrpc]', `  address = "${socket}.ttrpc"`, '',
    '[debug]', '  address = ""', '', '[metrics]', '  address = ""', '',
    // The CRI plugin's streaming server stays on loopback, on a port of its own choosing.
    ...(o.cri === true ? ['[plugins."io.containerd.grpc.v1.cri"]', '  disable_tcp_service = true', '  stream_server_address = "127.0.0.1"', '  stream_server_port = "0"', ''] : []),
    o.extraConfig ?? '',
  ].join('\n')
  const configFile = join(dir, 'config.toml')
  await writeFile(configFile, config)
  return { dir, root, state, socket, configFile }
}

/** Hashes every blob in a containerd content store (`.../blobs/sha256`); throws on any mismatch. */
export async function verifyContentDir (contentDir: string): Promise<string[]> {
  let names: string[] = []
  try { names = await readdir(contentDir) } catch {}
  const bad: string[] = []
  for (const n of names) {
    const got = await sha256File(join(contentDir, n))
    if (got !== n) bad.push(`${n} hashes to ${got}`)
  }
  if (bad.length > 0) throw new Error(`containerd content store corrupt:\n  ${bad.join('\n  ')}`)
  return names.map(n => 'sha256:' + n)
}

export async function startContainerd (o: ContainerdConfigOptions = {}): Promise<Containerd> {
  const { dir, root, socket, configFile } = await writeContainerdConfig('pullmesh-ctrd-', undefined, o)

  const logChunks: string[] = []
  const child: ChildProcess = spawn('containerd', ['--config', configFile, '--log-level', 'warn'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  child.stdout?.on('data', (b: Buffer) => logChunks.push(b.toString()))
  child.stderr?.on('data', (b: Buffer) => logChunks.push(b.toString()))
  let exited: { code: number | null, signal: string | null } | undefined
  const exitPromise = new Promise<void>(resolve => child.once('exit', (code, signal) => { exited = { code, signal }; resolve() }))
  const spawnError = new Promise<never>((_, reject) => child.once('error', reject))
  const logs = (): string => logChunks.join('')

  const ctr = async (args: string[], o: { allowFailure?: boolean, timeoutMs?: number } = {}): Promise<RunResult> =>
    await run('ctr', ['-a', socket, ...args], { allowFailure: o.allowFailure, timeoutMs: o.timeoutMs ?? 180_000 })

  const cleanupDir = async (): Promise<void> => {
    for (const mp of await mountsUnder(dir)) {
      await run('umount', ['-l', mp], { allowFailure: true })
    }
    await rm(dir, { recursive: true, force: true })
  }

  try {
    await Promise.race([spawnError, waitFor(async () => {
      if (exited !== undefined) throw new Error(`containerd exited early (${exited.code ?? exited.signal}):\n${logs()}`)
      await stat(socket)
      const r = await ctr(['version'], { allowFailure: true, timeoutMs: 5000 })
      return r.code === 0
    }, { timeoutMs: 20_000, what: 'containerd socket' })])
  } catch (e) {
    if (exited === undefined) child.kill('SIGKILL')
    await exitPromise.catch(() => {})
    await cleanupDir()
    throw new Error(`containerd did not start: ${String(e)}\n${logs()}`)
  }

  const contentDir = join(root, 'io.containerd.content.v1.content', 'blobs', 'sha256')
  let stopped = false

  return {
    dir,
    root,
    socket,
    pid: child.pid ?? -1,
    logs,
    ctr,
    async pull (ref, o = {}) {
      const args = o.fetchOnly === true ? ['content', 'fetch'] : ['images', 'pull']
      if (o.plainHttp !== false) args.push('--plain-http')
      if (o.hostsDir !== undefined) args.push('--hosts-dir', o.hostsDir)
      if (o.allPlatforms === true) args.push('--all-platforms')
      if (o.platform !== undefined) args.push('--platform', o.platform)
      args.push(ref)
      return await ctr(args, { timeoutMs: o.timeoutMs })
    },
    async clear () {
      const imgs = (await ctr(['images', 'ls', '-q'])).stdout.split('\n').filter(s => s.trim() !== '')
      if (imgs.length > 0) await ctr(['images', 'rm', '--sync', ...imgs])
      // Snapshots of unpacked layers hold gc references to nothing once the image is gone,
      // but remove them explicitly (children first) so the content store is really empty.
      for (let i = 0; i < 10; i++) {
        const snaps = (await ctr(['snapshots', 'ls'], { allowFailure: true })).stdout.split('\n').slice(1)
          .map(l => l.trim().split(/\s+/)[0]).filter((s): s is string => s !== undefined && s !== '')
        if (snaps.length === 0) break
        for (const s of snaps) await ctr(['snapshots', 'rm', s], { allowFailure: true })
      }
      const digests = (await ctr(['content', 'ls', '-q'])).stdout.split('\n').map(s => s.trim()).filter(s => s !== '')
      if (digests.length > 0) await ctr(['content', 'rm', ...digests])
      const left = (await ctr(['content', 'ls', '-q'])).stdout.trim()
      if (left !== '') throw new Error(`containerd content store not empty after clear:\n${left}`)
    },
    verifyContentStore: async () => await verifyContentDir(contentDir),
    async stop () {
      if (stopped) return
      stopped = true
      if (exited === undefined) {
        child.kill('SIGTERM')
        const t = setTimeout(() => { if (exited === undefined) child.kill('SIGKILL') }, 5000)
        await exitPromise
        clearTimeout(t)
      }
      await cleanupDir()
    },
  }
}
