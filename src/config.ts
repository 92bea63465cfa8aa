import { readFileSync } from 'node:fs'
import { homedir, networkInterfaces } from 'node:os'
import { isAbsolute, join, resolve } from 'node:path'
import { createSecureContext } from 'node:tls'
import { z } from 'zod'
import { ConfigError } from './errors.js'
import { parseDnsName } from './mesh/dns-discovery.js'
import { parseMeshKey } from './mesh/psk.js'
import type { UpstreamProxy } from './upstream/types.js'

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'
const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']

export interface HostPort { host: string, port: number }

export interface UpstreamConfig {
  name: string
  url: string
  credentials?: { username: string, password: string }
  /** Share content pulled with these credentials with peers anyway. */
  shareWithPeers: boolean
  /** How to reach it: a proxy of its own, or the HTTP(S)_PROXY rules; undefined: directly. */
  proxy?: UpstreamProxy
}

/** The daemon's whole configuration, validated once and frozen. */
export interface Config {
  listen: HostPort
  dataDir: string
  upstreams: UpstreamConfig[]
  defaultUpstream: string
  tagTtlMs: number
  /** Disk budget for cached content. */
  maxBytes: number
  /** Evict content not accessed for this long (undefined: never). */
  maxAgeMs: number | undefined
  logLevel: LogLevel
  /**
   * `deadlineMs`: a miss fails after this long without an answer from the upstream (all attempts);
   * `breakerHoldMs`: after the upstream could not be reached, requests to it fail at once for this long.
   */
  upstreamTimeouts: { connectMs: number, headersMs: number, bodyIdleMs: number, deadlineMs: number, breakerHoldMs: number }
  /** On SIGTERM, responses in flight get this long to finish before their connections are closed. */
  shutdownGraceMs: number
  /** Serve the client API over HTTPS with these PEM files (re-read on SIGHUP). */
  tls?: { certFile: string, keyFile: string }
  upstreamMaxAttempts: number
  mesh: {
    enabled: boolean
    mdns: boolean
    /** How often this node sends an mDNS query once started (it sends a few in its first seconds regardless). */
    mdnsIntervalMs: number
    bootstrap: string[]
    /** DNS names (NAME or NAME:PORT) resolving to peers, re-resolved periodically. */
    bootstrapDns: string[]
    /** Dial peers that peers tell us about (their signed hello carries their addresses). */
    peerExchange: boolean
    p2pListen: string[]
    /** Where peers fetch blobs from this node (the data path). */
    peerListen: HostPort
    meshKeyFile?: string
    /** How long a peer may take to start sending before the next source is tried. */
    peerTimeoutMs: number
    /** A transfer from a peer slower than this (averaged over the window) moves on to the next source. */
    peerMinRate: { bytesPerSec: number, windowMs: number }
    /** Misses that another node is chosen to fetch are asked of it instead of the upstream. */
    delegate: boolean
    /** Who holds a digest: 'gossip' (full inventory), 'dht' (Kademlia provider records) or 'both'. */
    routing: 'gossip' | 'dht' | 'both'
    /** A DHT lookup that has found nobody by then gives up (the next source is tried). */
    dhtDeadlineMs: number
  }
}

/** Raw settings as they arrive from a flag, the environment or the config file. */
export interface RawSettings {
  listen?: string
  dataDir?: string
  upstream?: string[]
  defaultUpstream?: string
  credentialsFile?: string
  tagTtl?: string
  maxSize?: string
  maxAge?: string
  logLevel?: string
  mdns?: boolean | string
  mdnsInterval?: string
  mesh?: boolean | string
  bootstrap?: string[]
  bootstrapDns?: string[]
  peerExchange?: boolean | string
  p2pListen?: string[]
  peerListen?: string
  meshKey?: string
  peerTimeout?: string
  peerMinRate?: string
  peerRateWindow?: string
  delegate?: boolean | string
  routing?: string
  dhtDeadline?: string
  upstreamConnectTimeout?: string
  upstreamHeadersTimeout?: string
  upstreamBodyTimeout?: string
  upstreamRetries?: string
  upstreamDeadline?: string
  upstreamHold?: string
  upstreamProxy?: string[]
  shutdownGrace?: string
  tlsCert?: string
  tlsKey?: string
  shareCredentialed?: string[]
}

/** The environment variables read, each mapped to a setting. Lists are comma-separated. */
export const ENV_VARS: Record<string, keyof RawSettings> = {
  PULLMESH_LISTEN: 'listen',
  PULLMESH_DATA_DIR: 'dataDir',
  PULLMESH_UPSTREAMS: 'upstream',
  PULLMESH_DEFAULT_UPSTREAM: 'defaultUpstream',
  PULLMESH_CREDENTIALS_FILE: 'credentialsFile',
  PULLMESH_TAG_TTL: 'tagTtl',
  PULLMESH_MAX_SIZE: 'maxSize',
  PULLMESH_MAX_AGE: 'maxAge',
  PULLMESH_LOG_LEVEL: 'logLevel',
  PULLMESH_MDNS: 'mdns',
  PULLMESH_MDNS_INTERVAL: 'mdnsInterval',
  PULLMESH_MESH: 'mesh',
  PULLMESH_BOOTSTRAP: 'bootstrap',
  PULLMESH_BOOTSTRAP_DNS: 'bootstrapDns',
  PULLMESH_PEER_EXCHANGE: 'peerExchange',
  PULLMESH_P2P_LISTEN: 'p2pListen',
  PULLMESH_PEER_LISTEN: 'peerListen',
  PULLMESH_MESH_KEY: 'meshKey',
  PULLMESH_PEER_TIMEOUT: 'peerTimeout',
  PULLMESH_PEER_MIN_RATE: 'peerMinRate',
  PULLMESH_PEER_RATE_WINDOW: 'peerRateWindow',
  PULLMESH_DELEGATE: 'delegate',
  PULLMESH_ROUTING: 'routing',
  PULLMESH_DHT_DEADLINE: 'dhtDeadline',
  PULLMESH_UPSTREAM_CONNECT_TIMEOUT: 'upstreamConnectTimeout',
  PULLMESH_UPSTREAM_HEADERS_TIMEOUT: 'upstreamHeadersTimeout',
  PULLMESH_UPSTREAM_BODY_TIMEOUT: 'upstreamBodyTimeout',
  PULLMESH_UPSTREAM_RETRIES: 'upstreamRetries',
  PULLMESH_UPSTREAM_DEADLINE: 'upstreamDeadline',
  PULLMESH_UPSTREAM_HOLD: 'upstreamHold',
  PULLMESH_UPSTREAM_PROXY: 'upstreamProxy',
  PULLMESH_SHUTDOWN_GRACE: 'shutdownGrace',
  PULLMESH_TLS_CERT: 'tlsCert',
  PULLMESH_TLS_KEY: 'tlsKey',
  PULLMESH_SHARE_CREDENTIALED: 'shareCredentialed',
}
const LIST_SETTINGS = new Set<keyof RawSettings>(['upstream', 'bootstrap', 'bootstrapDns', 'p2pListen', 'shareCredentialed', 'upstreamProxy'])

export const DEFAULTS = {
  listen: '127.0.0.1:5000',
  upstream: ['docker.io=https://registry-1.docker.io'],
  tagTtl: '5m',
  maxSize: '20GiB',
  maxAge: '30d',
  logLevel: 'info',
  mdnsInterval: '60s',
  p2pListen: ['/ip4/0.0.0.0/tcp/4001'],
  peerListen: '0.0.0.0:5050',
  peerTimeout: '500ms',
  peerMinRate: '64KiB',
  peerRateWindow: '5s',
  dhtDeadline: '300ms',
  upstreamConnectTimeout: '10s',
  upstreamHeadersTimeout: '30s',
  upstreamBodyTimeout: '60s',
  upstreamRetries: '3',
  upstreamDeadline: '10s',
  upstreamHold: '15s',
  shutdownGrace: '10s',
} as const

export function defaultDataDir (env: Record<string, string | undefined>): string {
  const base = env.XDG_DATA_HOME !== undefined && isAbsolute(env.XDG_DATA_HOME)
    ? env.XDG_DATA_HOME
    : join(env.HOME ?? homedir(), '.local', 'share')
  return join(base, 'pullmesh')
}

/** Reads PULLMESH_* variables into raw settings. */
export function settingsFromEnv (env: Record<string, string | undefined>): RawSettings {
  const out: Record<string, unknown> = {}
  for (const [name, key] of Object.entries(ENV_VARS)) {
    const v = env[name]
    if (v === undefined || v === '') continue
    out[key] = LIST_SETTINGS.has(key) ? v.split(',').map(s => s.trim()).filter(Boolean) : v
  }
  return out as RawSettings
}

const fileSchema = z.object({
  listen: z.string(),
  dataDir: z.string(),
  upstream: z.array(z.string()),
  upstreams: z.record(z.string(), z.string()),
  defaultUpstream: z.string(),
  credentialsFile: z.string(),
  tagTtl: z.union([z.string(), z.number()]),
  maxSize: z.union([z.string(), z.number()]),
  maxAge: z.union([z.string(), z.number()]),
  logLevel: z.string(),
  mdns: z.boolean(),
  mdnsInterval: z.union([z.string(), z.number()]),
  mesh: z.boolean(),
  bootstrap: z.array(z.string()),
  bootstrapDns: z.array(z.string()),
  peerExchange: z.boolean(),
  p2pListen: z.array(z.string()),
  peerListen: z.string(),
  meshKey: z.string(),
  peerTimeout: z.union([z.string(), z.number()]),
  peerMinRate: z.union([z.string(), z.number()]),
  peerRateWindow: z.union([z.string(), z.number()]),
  delegate: z.boolean(),
  routing: z.string(),
  dhtDeadline: z.union([z.string(), z.number()]),
  upstreamConnectTimeout: z.union([z.string(), z.number()]),
  upstreamHeadersTimeout: z.union([z.string(), z.number()]),
  upstreamBodyTimeout: z.union([z.string(), z.number()]),
  upstreamRetries: z.union([z.string(), z.number()]),
  upstreamDeadline: z.union([z.string(), z.number()]),
  upstreamHold: z.union([z.string(), z.number()]),
  upstreamProxy: z.record(z.string(), z.string()),
  shutdownGrace: z.union([z.string(), z.number()]),
  tlsCert: z.string(),
  tlsKey: z.string(),
  shareCredentialed: z.array(z.string()),
}).partial().strict()

/** Reads a JSON config file. Problems are pushed onto `problems`; relative paths resolve against the file. */
export function settingsFromFile (path: string, problems: string[]): RawSettings {
  let doc: unknown
  try {
    doc = JSON.parse(readFileSync(path, 'utf8'))
  } catch (err) {
    problems.push(`config file ${path}: ${(err as Error).message}`)
    return {}
  }
  const parsed = fileSchema.safeParse(doc)
  if (!parsed.success) {
    for (const i of parsed.error.issues) problems.push(`config file ${path}: ${i.path.join('.') || '(root)'}: ${i.message}`)
    return {}
  }
  const d = parsed.data
  const str = (v: string | number | undefined): string | undefined => v === undefined ? undefined : String(v)
  const dir = resolve(path, '..')
  const rel = (p: string | undefined): string | undefined => p === undefined ? undefined : resolve(dir, p)
  return {
    listen: d.listen,
    dataDir: rel(d.dataDir),
    upstream: [...(d.upstream ?? []), ...Object.entries(d.upstreams ?? {}).map(([k, v]) => `${k}=${v}`)],
    defaultUpstream: d.defaultUpstream,
    credentialsFile: rel(d.credentialsFile),
    tagTtl: str(d.tagTtl),
    maxSize: str(d.maxSize),
    maxAge: str(d.maxAge),
    logLevel: d.logLevel,
    mdns: d.mdns,
    mdnsInterval: str(d.mdnsInterval),
    mesh: d.mesh,
    bootstrap: d.bootstrap,
    bootstrapDns: d.bootstrapDns,
    peerExchange: d.peerExchange,
    p2pListen: d.p2pListen,
    peerListen: d.peerListen,
    meshKey: rel(d.meshKey),
    peerTimeout: str(d.peerTimeout),
    peerMinRate: str(d.peerMinRate),
    peerRateWindow: str(d.peerRateWindow),
    delegate: d.delegate,
    routing: d.routing,
    dhtDeadline: str(d.dhtDeadline),
    upstreamConnectTimeout: str(d.upstreamConnectTimeout),
    upstreamHeadersTimeout: str(d.upstreamHeadersTimeout),
    upstreamBodyTimeout: str(d.upstreamBodyTimeout),
    upstreamRetries: str(d.upstreamRetries),
    upstreamDeadline: str(d.upstreamDeadline),
    upstreamHold: str(d.upstreamHold),
    upstreamProxy: Object.entries(d.upstreamProxy ?? {}).map(([k, v]) => `${k}=${v}`),
    shutdownGrace: str(d.shutdownGrace),
    tlsCert: rel(d.tlsCert),
    tlsKey: rel(d.tlsKey),
    shareCredentialed: d.shareCredentialed,
  }
}

/** Later sources win: defaults < file < environment < flags. Empty lists do not override. */
export function mergeSettings (...layers: RawSettings[]): RawSettings {
  const out: Record<string, unknown> = {}
  for (const layer of layers) {
    for (const [k, v] of Object.entries(layer)) {
      if (v === undefined) continue
      if (Array.isArray(v) && v.length === 0) continue
      out[k] = v
    }
  }
  return out as RawSettings
}

/** True when this host has an IPv6 address peers could reach: not loopback, not link-local (fe80::/10). */
export function hasRoutableIpv6 (): boolean {
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) {
      if (a.family === 'IPv6' && !a.internal && !/^fe[89ab]/i.test(a.address)) return true
    }
  }
  return false
}

/** Parses `1h`, `5m`, `30s`, `250ms`, `2d`, or a bare number of seconds. */
export function parseDuration (s: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(s.trim())
  if (m === null) return undefined
  const n = Number(m[1])
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as 'ms' | 's' | 'm' | 'h' | 'd' ?? 's']
  const ms = Math.round(n * unit)
  return Number.isFinite(ms) ? ms : undefined
}

/** Parses `50GiB`, `500MiB`, `2GB` (decimal), `1.5TiB`, or a number of bytes. */
export function parseSize (s: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|K|M|G|T)?$/i.exec(s.trim())
  if (m === null) return undefined
  const units: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }
  const n = Math.floor(Number(m[1]) * units[(m[2] ?? 'b').toLowerCase()]!)
  return Number.isSafeInteger(n) ? n : undefined
}

export function parseHostPort (s: string): HostPort | undefined {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(s.trim())
  if (m === null) return undefined
  const port = Number(m[3])
  if (port > 65535) return undefined
  return { host: m[1] ?? m[2]!, port }
}

const UPSTREAM_NAME = /^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::\d{1,5})?$/

function bool (v: boolean | string | undefined, name: string, problems: string[]): boolean | undefined {
  if (v === undefined || typeof v === 'boolean') return v
  if (/^(1|true|yes|on)$/i.test(v)) return true
  if (/^(0|false|no|off)$/i.test(v)) return false
  problems.push(`${name}: expected true or false, got "${v}"`)
  return undefined
}

/**
 * Validates merged settings into a frozen Config. Every problem is collected and reported at once
 * in one ConfigError. Files named by settings (credentials) are read here.
 */
export function buildConfig (raw: RawSettings, env: Record<string, string | undefined>, preProblems: string[] = [], host: { ipv6?: boolean } = {}): Readonly<Config> {
  const problems = [...preProblems]
  // On a dual-stack host the mesh listens on IPv6 too by default (the data path on [::] takes both).
  const dualStack = host.ipv6 ?? hasRoutableIpv6()
  const defaults = dualStack ? { ...DEFAULTS, p2pListen: [...DEFAULTS.p2pListen, '/ip6/::/tcp/4001'], peerListen: '[::]:5050' } : DEFAULTS
  const s = mergeSettings(defaults as unknown as RawSettings, raw)

  const listen = parseHostPort(s.listen!)
  if (listen === undefined) problems.push(`listen: expected HOST:PORT, got "${s.listen}"`)
  const peerListen = parseHostPort(s.peerListen!)
  if (peerListen === undefined) problems.push(`peer-listen: expected HOST:PORT, got "${s.peerListen}"`)

  const dur = (name: string, v: string | undefined, min: number): number => {
    const ms = parseDuration(v ?? '')
    if (ms === undefined || ms < min) { problems.push(`${name}: expected a duration such as 30s, 5m or 1h (at least ${min} ms), got "${v}"`); return 0 }
    return ms
  }
  const tagTtlMs = dur('tag-ttl', s.tagTtl, 0)
  const maxBytes = parseSize(s.maxSize ?? '')
  if (maxBytes === undefined || maxBytes < 1024 * 1024) problems.push(`max-size: expected a size such as 50GiB or 500MiB (at least 1MiB), got "${s.maxSize}"`)
  const maxAgeMs = s.maxAge === 'off' || s.maxAge === '0' ? undefined : dur('max-age', s.maxAge, 1000)
  const peerTimeoutMs = dur('peer-timeout', s.peerTimeout, 10)
  const peerMinRate = parseSize(s.peerMinRate ?? '')
  if (peerMinRate === undefined) problems.push(`peer-min-rate: expected bytes per second such as 64KiB or 0 (off), got "${s.peerMinRate}"`)
  const peerRateWindowMs = dur('peer-rate-window', s.peerRateWindow, 100)
  // The DHT trades peer addresses and dials the peers it learns of (that is how it routes): a node that opts
  // out of peer exchange runs without it unless told otherwise, and cannot be told both.
  const peerExchangeOn = bool(s.peerExchange, 'peer-exchange', []) ?? true
  const routing = s.routing ?? (peerExchangeOn ? 'both' : 'gossip')
  if (routing !== 'gossip' && routing !== 'dht' && routing !== 'both') problems.push(`routing: expected gossip, dht or both, got "${routing}"`)
  else if (routing !== 'gossip' && !peerExchangeOn) problems.push(`routing: ${routing} uses the DHT, which shares and dials peer addresses; with --no-peer-exchange use --routing gossip`)
  const dhtDeadlineMs = dur('dht-deadline', s.dhtDeadline, 10)
  const connectMs = dur('upstream-connect-timeout', s.upstreamConnectTimeout, 10)
  const headersMs = dur('upstream-headers-timeout', s.upstreamHeadersTimeout, 10)
  const bodyIdleMs = dur('upstream-body-timeout', s.upstreamBodyTimeout, 10)
  const deadlineMs = dur('upstream-deadline', s.upstreamDeadline, 100)
  const breakerHoldMs = s.upstreamHold === 'off' ? 0 : dur('upstream-hold', s.upstreamHold, 0)
  const shutdownGraceMs = dur('shutdown-grace', s.shutdownGrace, 0)
  const retries = Number(s.upstreamRetries)
  if (!Number.isInteger(retries) || retries < 1 || retries > 10) problems.push(`upstream-retries: expected an attempt count from 1 to 10, got "${s.upstreamRetries}"`)

  const logLevel = (s.logLevel ?? 'info').toLowerCase() as LogLevel
  if (!LOG_LEVELS.includes(logLevel)) problems.push(`log-level: expected one of ${LOG_LEVELS.join(', ')}, got "${s.logLevel}"`)

  const upstreams: UpstreamConfig[] = []
  const names = new Set<string>()
  // Flags replace the default list rather than adding to it.
  for (const spec of s.upstream ?? []) {
    const eq = spec.indexOf('=')
    const name = eq > 0 ? spec.slice(0, eq).trim().toLowerCase() : ''
    const url = eq > 0 ? spec.slice(eq + 1).trim() : ''
    if (!UPSTREAM_NAME.test(name)) { problems.push(`upstream: expected NAME=URL with a registry host name such as ghcr.io, got "${spec}"`); continue }
    let parsed: URL | undefined
    try { parsed = new URL(url) } catch { parsed = undefined }
    if (parsed === undefined || !['http:', 'https:'].includes(parsed.protocol) || parsed.username !== '' || parsed.password !== '' || parsed.search !== '' || parsed.hash !== '') {
      problems.push(`upstream ${name}: expected an http(s) URL without credentials or query, got "${url}"`)
      continue
    }
    if (names.has(name)) { problems.push(`upstream ${name}: configured twice`); continue }
    names.add(name)
    upstreams.push({ name, url: parsed.origin + parsed.pathname.replace(/\/+$/, ''), shareWithPeers: false })
  }
  if (upstreams.length === 0 && !problems.some(p => p.startsWith('upstream'))) problems.push('upstream: at least one upstream is needed')

  const defaultUpstream = (s.defaultUpstream ?? upstreams[0]?.name ?? '').toLowerCase()
  if (upstreams.length > 0 && !names.has(defaultUpstream)) problems.push(`default-upstream: "${defaultUpstream}" is not a configured upstream (${[...names].join(', ')})`)

  if (s.credentialsFile !== undefined) readCredentials(s.credentialsFile, upstreams, problems)
  assignProxies(upstreams, s.upstreamProxy ?? [], proxyFromEnv(env, problems), problems)
  for (const name of s.shareCredentialed ?? []) {
    const u = upstreams.find(x => x.name === name.toLowerCase())
    if (u === undefined) problems.push(`share-credentialed: "${name}" is not a configured upstream`)
    else u.shareWithPeers = true
  }

  const mdns = bool(s.mdns, 'mdns', problems) ?? true
  const mdnsIntervalMs = dur('mdns-interval', s.mdnsInterval, 1000)
  // Timers overflow past 2^31-1 ms (and would then fire every millisecond): a day is plenty.
  if (mdnsIntervalMs > 86_400_000) problems.push(`mdns-interval: at most 1d, got "${s.mdnsInterval}"`)
  const meshEnabled = bool(s.mesh, 'mesh', problems) ?? true
  const delegate = bool(s.delegate, 'delegate', problems) ?? true
  for (const a of s.p2pListen ?? []) {
    if (!/^\/(ip4|ip6)\/[^/]+\/tcp\/\d+$/.test(a)) problems.push(`p2p-listen: expected /ip4/HOST/tcp/PORT, got "${a}"`)
  }
  for (const n of s.bootstrapDns ?? []) {
    if (parseDnsName(n) === undefined) problems.push(`bootstrap-dns: expected a DNS name with an optional :PORT (default 4001), got "${n}"`)
  }
  const peerExchange = bool(s.peerExchange, 'peer-exchange', problems) ?? true
  for (const a of s.bootstrap ?? []) {
    if (!/^\/(ip4|ip6|dns|dns4|dns6)\/[^/]+\/tcp\/\d+\/p2p\/[A-Za-z0-9]+$/.test(a)) problems.push(`bootstrap: expected /ip4/HOST/tcp/PORT/p2p/PEER-ID, got "${a}"`)
  }
  if (s.meshKey !== undefined) checkMeshKey(s.meshKey, problems)
  if ((s.tlsCert === undefined) !== (s.tlsKey === undefined)) problems.push('tls-cert and tls-key: give both, or neither')
  for (const [name, file] of [['tls-cert', s.tlsCert], ['tls-key', s.tlsKey]] as const) {
    if (file === undefined) continue
    try { readFileSync(file) } catch (err) { problems.push(`${name} ${file}: cannot read it (${(err as NodeJS.ErrnoException).code ?? 'error'})`) }
  }
  if (s.tlsCert !== undefined && s.tlsKey !== undefined && !problems.some(p => p.startsWith('tls-'))) {
    try { createSecureContext({ cert: readFileSync(s.tlsCert), key: readFileSync(s.tlsKey) }) } catch {
      problems.push('tls-cert and tls-key: not a PEM certificate and the private key that belongs to it')
    }
  }

  if (problems.length > 0) throw new ConfigError(problems)

  const config: Config = {
    listen: listen!,
    dataDir: resolve(s.dataDir ?? defaultDataDir(env)),
    upstreams,
    defaultUpstream,
    tagTtlMs,
    maxBytes: maxBytes!,
    maxAgeMs,
    logLevel,
    upstreamTimeouts: { connectMs, headersMs, bodyIdleMs, deadlineMs, breakerHoldMs },
    shutdownGraceMs,
    ...(s.tlsCert !== undefined && s.tlsKey !== undefined ? { tls: { certFile: resolve(s.tlsCert), keyFile: resolve(s.tlsKey) } } : {}),
    upstreamMaxAttempts: retries,
    mesh: {
      enabled: meshEnabled,
      mdns,
      mdnsIntervalMs,
      bootstrap: s.bootstrap ?? [],
      bootstrapDns: s.bootstrapDns ?? [],
      peerExchange,
      p2pListen: s.p2pListen ?? [],
      peerListen: peerListen!,
      ...(s.meshKey !== undefined ? { meshKeyFile: resolve(s.meshKey) } : {}),
      peerTimeoutMs,
      peerMinRate: { bytesPerSec: peerMinRate ?? 0, windowMs: peerRateWindowMs },
      delegate,
      routing: routing as Config['mesh']['routing'],
      dhtDeadlineMs,
    },
  }
  return deepFreeze(config)
}

/** A libp2p pnet key file (parsed as the daemon will parse it, see mesh/psk.ts). Never echoed. */
function checkMeshKey (path: string, problems: string[]): void {
  let buf: Buffer
  try {
    buf = readFileSync(path)
  } catch (err) {
    problems.push(`mesh-key ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? 'error'}); create one with "pullmesh keygen FILE"`)
    return
  }
  try {
    parseMeshKey(buf)
  } catch (err) {
    problems.push(`mesh-key ${path}: ${(err as Error).message}; create one with "pullmesh keygen FILE"`)
  }
}

/** Checks a proxy URL; the message never echoes it (it may carry credentials). */
function proxyUrl (v: string, what: string, problems: string[]): string | undefined {
  let u: URL | undefined
  try { u = new URL(v) } catch { u = undefined }
  if (u === undefined || !['http:', 'https:', 'socks5:'].includes(u.protocol) || u.hostname === '') {
    problems.push(`${what}: expected an http://, https:// or socks5:// proxy URL`)
    return undefined
  }
  return v
}

/** HTTP_PROXY, HTTPS_PROXY and NO_PROXY (either case, lower case first, as curl reads them). */
function proxyFromEnv (env: Record<string, string | undefined>, problems: string[]): UpstreamProxy | undefined {
  const get = (n: string): string | undefined => {
    const v = env[n.toLowerCase()] ?? env[n]
    return v === undefined || v.trim() === '' ? undefined : v.trim()
  }
  const http = get('HTTP_PROXY')
  const https = get('HTTPS_PROXY')
  if (http === undefined && https === undefined) return undefined
  const httpProxy = http !== undefined ? proxyUrl(http, 'HTTP_PROXY', problems) : undefined
  const httpsProxy = https !== undefined ? proxyUrl(https, 'HTTPS_PROXY', problems) : undefined
  const noProxy = get('NO_PROXY')
  return { kind: 'env', ...(httpProxy !== undefined ? { httpProxy } : {}), ...(httpsProxy !== undefined ? { httpsProxy } : {}), ...(noProxy !== undefined ? { noProxy } : {}) }
}

/** `--upstream-proxy NAME=URL` (or `NAME=direct`) wins over the environment for that upstream. */
function assignProxies (upstreams: UpstreamConfig[], specs: string[], fromEnv: UpstreamProxy | undefined, problems: string[]): void {
  const own = new Map<string, UpstreamProxy | 'direct'>()
  for (const spec of specs) {
    const eq = spec.indexOf('=')
    const name = eq > 0 ? spec.slice(0, eq).trim().toLowerCase() : ''
    const value = eq > 0 ? spec.slice(eq + 1).trim() : ''
    if (!upstreams.some(u => u.name === name)) { problems.push(`upstream-proxy: expected NAME=URL for a configured upstream, got "${name === '' ? spec.slice(0, 100) : name}"`); continue }
    if (value === 'direct') { own.set(name, 'direct'); continue }
    const url = proxyUrl(value, `upstream-proxy ${name}`, problems)
    if (url !== undefined) own.set(name, { kind: 'url', url })
  }
  for (const u of upstreams) {
    const p = own.get(u.name) ?? fromEnv
    if (p !== undefined && p !== 'direct') u.proxy = p
  }
}

const credentialsSchema = z.record(z.string(), z.object({ username: z.string().min(1), password: z.string() }).strict())

function readCredentials (path: string, upstreams: UpstreamConfig[], problems: string[]): void {
  let doc: unknown
  try {
    doc = JSON.parse(readFileSync(path, 'utf8'))
  } catch (err) {
    // Never echo the file's contents: it holds secrets.
    problems.push(`credentials-file ${path}: cannot read it as JSON (${(err as NodeJS.ErrnoException).code ?? 'syntax error'})`)
    return
  }
  const parsed = credentialsSchema.safeParse(doc)
  if (!parsed.success) {
    problems.push(`credentials-file ${path}: expected {"<upstream>": {"username": "...", "password": "..."}}`)
    return
  }
  for (const [name, cred] of Object.entries(parsed.data)) {
    const u = upstreams.find(x => x.name === name.toLowerCase())
    if (u === undefined) problems.push(`credentials-file ${path}: "${name}" is not a configured upstream`)
    else u.credentials = cred
  }
}

function deepFreeze<T> (o: T): T {
  if (o !== null && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v)
    Object.freeze(o)
  }
  return o
}
