/**
 * Runs the real CNCF distribution registry (Debian `docker-registry` 2.8, `/usr/bin/docker-registry`)
 * on an ephemeral 127.0.0.1 port in a mkdtemp directory, optionally as a pull-through proxy and
 * optionally with token auth (see ./token-server.ts). Its stdout/stderr (which include the access
 * log) are captured for assertions.
 *
 * ```ts
 * const reg = await startRegistry()                       // plain registry
 * const mirror = await startRegistry({ proxy: { remoteurl: reg.url } })
 * await reg.stop(); ...; await reg.start()                // outage: same port, same data
 * expect(reg.logs()).toContain('GET /v2/library/test/blobs/')
 * await mirror.close(); await reg.close()                 // stop and remove the directory
 * ```
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { getFreePort, simpleRequest } from './net.js'
import type { RegistryTokenAuth } from './token-server.js'

export const REGISTRY_BIN = '/usr/bin/docker-registry'

export interface RegistryOptions {
  /** Pull-through cache of `remoteurl` (optionally with credentials for it). */
  proxy?: { remoteurl: string, username?: string, password?: string }
  /** Token auth, e.g. `tokenServer.registryAuth`. */
  auth?: RegistryTokenAuth
  /** Port to use; default a free ephemeral port. */
  port?: number
  /** Registry log level; default `info` (the access log is always on). */
  logLevel?: 'error' | 'warn' | 'info' | 'debug'
  /** Readiness timeout in ms; default 15000. */
  readyTimeoutMs?: number
}

export interface RegistryProcess {
  /** `http://127.0.0.1:PORT` */
  url: string
  /** `127.0.0.1:PORT` */
  host: string
  port: number
  /** The temp directory holding config.yml and the storage root (`data/`). */
  dir: string
  /** Everything the process printed so far, across restarts. */
  logs: () => string
  /** True while the process runs. */
  readonly running: boolean
  /** Stops the process (SIGTERM, then SIGKILL after 5 s). Data stays; safe to call twice. */
  stop: () => Promise<void>
  /** (Re)starts on the same port and directory and waits until `/v2/` answers. */
  start: () => Promise<void>
  /** stop(), then remove the directory. */
  close: () => Promise<void>
}

const q = (s: string): string => JSON.stringify(s) // a JSON string is a valid YAML double-quoted scalar

/** What a distribution registry config says; shared by the loopback, namespace and benchmark launchers. */
export interface RegistryConfig {
  /** Storage root directory. */
  root: string
  /** `HOST:PORT` to listen on. */
  addr: string
  logLevel?: string
  /** Access log on (default true). */
  accessLog?: boolean
  proxy?: { remoteurl: string, username?: string, password?: string }
  auth?: { realm: string, service: string, issuer: string, rootcertbundle: string }
}

/** The YAML for `docker-registry serve`. */
export function registryConfigYaml (c: RegistryConfig): string {
  const lines = [
    'version: 0.1',
    'log:',
    `  level: ${c.logLevel ?? 'info'}`,
    '  formatter: text',
    '  accesslog:',
    `    disabled: ${c.accessLog === false ? 'true' : 'false'}`,
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${q(c.root)}`,
    '  delete:',
    '    enabled: true',
    '  maintenance:',
    '    uploadpurging:',
    '      enabled: false',
    'http:',
    `  addr: ${q(c.addr)}`,
    `  secret: ${q(randomBytes(16).toString('hex'))}`,
    'health:',
    '  storagedriver:',
    '    enabled: false',
  ]
  if (c.proxy !== undefined) {
    lines.push('proxy:', `  remoteurl: ${q(c.proxy.remoteurl)}`)
    if (c.proxy.username !== undefined) lines.push(`  username: ${q(c.proxy.username)}`)
    if (c.proxy.password !== undefined) lines.push(`  password: ${q(c.proxy.password)}`)
  }
  if (c.auth !== undefined) {
    lines.push('auth:', '  token:',
      `    realm: ${q(c.auth.realm)}`, `    service: ${q(c.auth.service)}`,
      `    issuer: ${q(c.auth.issuer)}`, `    rootcertbundle: ${q(c.auth.rootcertbundle)}`)
  }
  return lines.join('\n') + '\n'
}

function configYaml (dir: string, port: number, o: RegistryOptions): string {
  return registryConfigYaml({
    root: join(dir, 'data'),
    addr: `127.0.0.1:${port}`,
    ...(o.logLevel !== undefined ? { logLevel: o.logLevel } : {}),
    ...(o.proxy !== undefined ? { proxy: o.proxy } : {}),
    ...(o.auth !== undefined ? { auth: o.auth } : {}),
  })
}

export async function startRegistry (opts: RegistryOptions = {}): Promise<RegistryProcess> {
  const dir = await mkdtemp(join(tmpdir(), 'pullmesh-registry-'))
  await mkdir(join(dir, 'data'))
  const port = opts.port ?? await getFreePort()
  const configPath = join(dir, 'config.yml')
  await writeFile(configPath, configYaml(dir, port, opts))
  const url = `http://127.0.0.1:${port}`
  const MAX_LOG = 16 * 1024 * 1024
  let log = ''
  let child: ChildProcess | undefined
  let exited: Promise<void> | undefined

  // A clean environment: REGISTRY_* variables would override the config file.
  const env: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir }

  async function start (): Promise<void> {
    if (child !== undefined) return
    const c = spawn(REGISTRY_BIN, ['serve', configPath], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] })
    child = c
    const append = (b: Buffer): void => { if (log.length < MAX_LOG) log += b.toString('utf8') }
    c.stdout?.on('data', append)
    c.stderr?.on('data', append)
    exited = new Promise<void>(resolve => {
      c.once('exit', () => { if (child === c) child = undefined; resolve() })
      c.once('error', e => { log += `\n[spawn error] ${e.message}\n`; if (child === c) child = undefined; resolve() })
    })
    const deadline = Date.now() + (opts.readyTimeoutMs ?? 15_000)
    for (;;) {
      if (child !== c) throw new Error(`docker-registry exited during startup:\n${log.slice(-4000)}`)
      try {
        const res = await simpleRequest(`${url}/v2/`, { timeoutMs: 1000 })
        if (res.status === 200 || res.status === 401) return
      } catch { /* not listening yet */ }
      if (Date.now() > deadline) {
        await stop()
        throw new Error(`docker-registry not ready after ${opts.readyTimeoutMs ?? 15_000} ms:\n${log.slice(-4000)}`)
      }
      await new Promise(resolve => setTimeout(resolve, 50))
    }
  }

  async function stop (): Promise<void> {
    const c = child
    if (c === undefined) { await exited; return }
    c.kill('SIGTERM')
    const t = setTimeout(() => { c.kill('SIGKILL') }, 5000)
    try { await exited } finally { clearTimeout(t) }
  }

  try {
    await start()
  } catch (e) {
    await rm(dir, { recursive: true, force: true })
    throw e
  }

  return {
    url,
    host: `127.0.0.1:${port}`,
    port,
    dir,
    logs: () => log,
    get running () { return child !== undefined },
    start,
    stop,
    async close () {
      await stop()
      await rm(dir, { recursive: true, force: true })
    },
  }
}

/**
 * Pushes a blob with a monolithic upload (`POST /v2/<repo>/blobs/uploads/`, then `PUT <location>&digest=`).
 * `authorization` is sent on both requests (e.g. `Bearer ${tokenServer.mint(...)}`). Returns the digest.
 */
export async function pushBlob (registryUrl: string, repo: string, data: Buffer, authorization?: string): Promise<string> {
  const digest = `sha256:${createHash('sha256').update(data).digest('hex')}`
  const auth: Record<string, string> = authorization === undefined ? {} : { authorization }
  const post = await simpleRequest(`${registryUrl}/v2/${repo}/blobs/uploads/`, { method: 'POST', headers: auth })
  const location = post.headers.location
  if (post.status !== 202 || location === undefined) throw new Error(`blob upload POST answered ${post.status}: ${post.body.toString('utf8').slice(0, 500)}`)
  const put = new URL(location, registryUrl)
  put.searchParams.set('digest', digest)
  const res = await simpleRequest(put, { method: 'PUT', headers: { ...auth, 'content-type': 'application/octet-stream' }, body: data })
  if (res.status !== 201) throw new Error(`blob upload PUT answered ${res.status}: ${res.body.toString('utf8').slice(0, 500)}`)
  return digest
}

/** Pushes a manifest under `reference` (tag or digest). Returns the digest of `body`. */
export async function pushManifest (registryUrl: string, repo: string, reference: string, body: Buffer, mediaType: string, authorization?: string): Promise<string> {
  const headers: Record<string, string> = { 'content-type': mediaType, ...(authorization === undefined ? {} : { authorization }) }
  const res = await simpleRequest(`${registryUrl}/v2/${repo}/manifests/${reference}`, { method: 'PUT', headers, body })
  if (res.status !== 201) throw new Error(`manifest PUT answered ${res.status}: ${res.body.toString('utf8').slice(0, 500)}`)
  return `sha256:${createHash('sha256').update(body).digest('hex')}`
}
