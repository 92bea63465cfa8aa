// Processes the benchmarks run: the CNCF distribution registry (as the upstream or as a proxy) and the
// pullmesh daemon (`node dist/main.js start`). Every process is tracked here and stopped by its own PID
// in `stopAll()`; nothing is ever killed by name.
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import { request as httpRequest } from 'node:http'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { getFreePort } from '../../helpers/net.js'
import { registryConfigYaml } from '../../helpers/registry.js'

export const REPO_ROOT = fileURLToPath(new URL('../../..', import.meta.url))
// PULLMESH_BENCH_ENTRY points the bench at another build (an older commit's dist/main.js) for A/B runs.
export const DAEMON_ENTRY = process.env.PULLMESH_BENCH_ENTRY ?? join(REPO_ROOT, 'dist', 'main.js')
export const REGISTRY_BIN = '/usr/bin/docker-registry'

export interface Proc {
  readonly pid: number
  readonly child: ChildProcess
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process has exited. Safe to call twice. */
  stop: (graceMs?: number) => Promise<void>
  exited: () => boolean
  /** The last lines of stderr and stdout, for error messages. */
  tail: () => string
}

const live = new Set<Proc>()

function track (child: ChildProcess, onLine?: (line: string) => void): Proc {
  if (child.pid === undefined) throw new Error('spawn failed (no pid)')
  let exited = false
  const done = new Promise<void>(resolve => child.once('exit', () => { exited = true; resolve() }))
  child.once('error', () => { exited = true })
  let tailBuf = ''
  let partial = ''
  const onData = (b: Buffer): void => {
    const s = b.toString('utf8')
    tailBuf = (tailBuf + s).slice(-8000)
    if (onLine === undefined) return
    partial += s
    let nl: number
    while ((nl = partial.indexOf('\n')) >= 0) {
      onLine(partial.slice(0, nl))
      partial = partial.slice(nl + 1)
    }
  }
  child.stdout?.on('data', onData)
  child.stderr?.on('data', onData)
  const p: Proc = {
    pid: child.pid,
    child,
    exited: () => exited,
    tail: () => tailBuf,
    async stop (graceMs = 5000) {
      if (!exited) {
        child.kill('SIGTERM')
        const t = setTimeout(() => { if (!exited) child.kill('SIGKILL') }, graceMs)
        await done
        clearTimeout(t)
      }
      live.delete(p)
    },
  }
  live.add(p)
  return p
}

/** Stops every process the benchmark started (each by its own PID). */
export async function stopAll (): Promise<void> {
  await Promise.allSettled([...live].map(async p => await p.stop(3000)))
}

/** One GET (or HEAD) with no agent; resolves to the status, or rejects on a connection error. */
export async function httpStatus (url: string, timeoutMs = 1000, method = 'GET'): Promise<number> {
  const u = new URL(url)
  return await new Promise((resolve, reject) => {
    const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname + u.search, method, agent: false, timeout: timeoutMs }, res => {
      res.resume()
      res.once('end', () => resolve(res.statusCode ?? 0))
      res.once('error', reject)
    })
    req.once('timeout', () => req.destroy(new Error('timeout')))
    req.once('error', reject)
    req.end()
  })
}

/** Polls `url` every `intervalMs` until it answers one of `ok`; returns the ms since `t0`. */
export async function waitReady (url: string, proc: Proc, t0: number, o: { ok?: number[], timeoutMs?: number, intervalMs?: number } = {}): Promise<number> {
  const ok = o.ok ?? [200]
  const deadline = t0 + (o.timeoutMs ?? 30_000)
  for (;;) {
    if (proc.exited()) throw new Error(`process ${proc.pid} exited before it was ready:\n${proc.tail().slice(-3000)}`)
    try {
      if (ok.includes(await httpStatus(url, 500))) return performance.now() - t0
    } catch { /* not listening yet */ }
    if (performance.now() > deadline) throw new Error(`${url} not ready after ${o.timeoutMs ?? 30_000} ms:\n${proc.tail().slice(-3000)}`)
    await new Promise(resolve => setTimeout(resolve, o.intervalMs ?? 5))
  }
}

// ------------------------------------------------------------------ distribution

export interface AccessRecord { method: string, path: string, status: number, bytes: number }

export interface Distribution extends Proc {
  url: string
  host: string
  port: number
  /** The storage root directory. */
  root: string
  readyMs: number
  /** Access-log records so far (only kept when `accessLog` was requested). */
  access: AccessRecord[]
}

export interface DistributionOptions {
  /** Directory for config.yml and (unless `root` is given) the storage root `data/`. */
  dir: string
  root?: string
  proxy?: string
  /** Keep the access log (the upstream needs it to count bytes). Off for the registry under test. */
  accessLog?: boolean
  host?: string
  port?: number
  /** Run inside this network namespace (`ip netns exec`). */
  netns?: string
}

const ACCESS_RE = /"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP\/[\d.]+" (\d{3}) (\d+|-)/

/** Starts `docker-registry serve` and waits until `/v2/` answers. */
export async function startDistribution (o: DistributionOptions): Promise<Distribution> {
  const root = o.root ?? join(o.dir, 'data')
  await mkdir(root, { recursive: true })
  const host = o.host ?? '127.0.0.1'
  const port = o.port ?? await getFreePort()
  const cfg = registryConfigYaml({
    root,
    addr: `${host}:${port}`,
    logLevel: o.accessLog === true ? 'info' : 'error',
    accessLog: o.accessLog === true,
    ...(o.proxy !== undefined ? { proxy: { remoteurl: o.proxy } } : {}),
  })
  const cfgPath = join(o.dir, `config-${port}.yml`)
  await writeFile(cfgPath, cfg)
  const env = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: o.dir }
  const [cmd, args] = o.netns !== undefined
    ? ['ip', ['netns', 'exec', o.netns, REGISTRY_BIN, 'serve', cfgPath]]
    : [REGISTRY_BIN, ['serve', cfgPath]]
  const access: AccessRecord[] = []
  const t0 = performance.now()
  const child = spawn(cmd, args as string[], { cwd: o.dir, env, stdio: ['ignore', 'pipe', 'pipe'] })
  const proc = track(child, o.accessLog === true
    ? line => {
      const m = ACCESS_RE.exec(line)
      if (m !== null) access.push({ method: m[1]!, path: m[2]!, status: Number(m[3]), bytes: m[4] === '-' ? 0 : Number(m[4]) })
    }
    : undefined)
  const url = `http://${host}:${port}`
  // From inside a namespace the harness cannot poll; the caller checks readiness there.
  const readyMs = o.netns !== undefined ? 0 : await waitReady(`${url}/v2/`, proc, t0)
  return Object.assign(proc, { url, host: `${host}:${port}`, port, root, readyMs, access })
}

/** Bytes and GETs the upstream served for one blob digest since access-log index `from`. */
export function upstreamBlobTraffic (up: Distribution, digest: string, from = 0): { bytes: number, gets: number, heads: number } {
  let bytes = 0; let gets = 0; let heads = 0
  for (const r of up.access.slice(from)) {
    if (!r.path.includes(`/blobs/${digest}`)) continue
    if (r.method === 'GET') { gets++; bytes += r.bytes }
    if (r.method === 'HEAD') heads++
  }
  return { bytes, gets, heads }
}

/** Waits until the access log has not grown for `quietMs` (distribution's second fetch ends late). */
export async function settleAccessLog (up: Distribution, quietMs = 1500, maxMs = 30_000): Promise<void> {
  const end = Date.now() + maxMs
  let n = up.access.length
  let since = Date.now()
  while (Date.now() < end) {
    await new Promise(resolve => setTimeout(resolve, 100))
    if (up.access.length !== n) { n = up.access.length; since = Date.now() }
    if (Date.now() - since >= quietMs) return
  }
}

// ------------------------------------------------------------------ pullmesh

export interface Pullmesh extends Proc {
  url: string
  port: number
  /** ms from spawn to the first `/readyz` 200. */
  readyMs: number
  dataDir: string
}

export interface PullmeshOptions {
  dataDir: string
  upstream: string
  /** Default `--no-mesh`. */
  mesh?: string[]
  host?: string
  port?: number
  nodeArgs?: string[]
  netns?: string
  logLevel?: string
  /** Another build's dist/main.js (default DAEMON_ENTRY). */
  entry?: string
}

export const UPSTREAM_NAME = 'bench.test'

export async function startPullmesh (o: PullmeshOptions): Promise<Pullmesh> {
  const host = o.host ?? '127.0.0.1'
  const port = o.port ?? await getFreePort()
  const args = [...(o.nodeArgs ?? []), o.entry ?? DAEMON_ENTRY, 'start', '--listen', `${host}:${port}`, '--data-dir', o.dataDir,
    '--upstream', `${UPSTREAM_NAME}=${o.upstream}`, ...(o.mesh ?? ['--no-mesh']), '--log-level', o.logLevel ?? 'warn']
  const [cmd, argv] = o.netns !== undefined ? ['ip', ['netns', 'exec', o.netns, process.execPath, ...args]] : [process.execPath, args]
  const t0 = performance.now()
  const child = spawn(cmd, argv as string[], { cwd: REPO_ROOT, env: process.env, stdio: ['ignore', 'pipe', 'pipe'] })
  const proc = track(child)
  const url = `http://${host}:${port}`
  const readyMs = o.netns !== undefined ? 0 : await waitReady(`${url}/readyz`, proc, t0)
  return Object.assign(proc, { url, port, readyMs, dataDir: o.dataDir })
}

/** Reads a counter or gauge from `/metrics` (summing every series whose labels contain `match`). */
export async function metricValue (metricsText: string, name: string, match = ''): Promise<number> {
  let sum = 0
  for (const line of metricsText.split('\n')) {
    if (!line.startsWith(name)) continue
    const rest = line.slice(name.length)
    if (rest[0] !== ' ' && rest[0] !== '{') continue
    if (match !== '' && !rest.includes(match)) continue
    sum += Number(line.slice(line.lastIndexOf(' ') + 1))
  }
  return sum
}

/** The pass-through reference (./passthrough.mjs) in front of `upstream`. */
export async function startPassthrough (upstream: string): Promise<Proc & { url: string }> {
  const port = await getFreePort()
  const script = fileURLToPath(new URL('./passthrough.mjs', import.meta.url))
  const t0 = performance.now()
  const proc = track(spawn(process.execPath, [script, upstream, String(port)], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] }))
  const url = `http://127.0.0.1:${port}`
  await waitReady(`${url}/ready`, proc, t0)
  return Object.assign(proc, { url })
}
