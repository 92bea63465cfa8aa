// `pullmesh prefetch IMAGE...`: warms the cache of a running daemon by pulling images through its
// registry API, exactly as a client would (containerd-style `?ns=<upstream>` addressing). Every
// manifest and blob received is verified against its digest here too, so "prefetched" means the
// bytes made it through the daemon whole. Bodies are counted and discarded; the daemon keeps them.
//
// The pure parts (image and platform parsing, platform selection, manifest parsing) are exported
// for the unit tests; `runPrefetch` does the network work and reports through a `PrefetchReporter`.
import type { Command } from 'commander'
import { MultiBar, type SingleBar } from 'cli-progress'
import { readFile } from 'node:fs/promises'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { Agent, request, type Dispatcher } from 'undici'
import { OciError } from '../errors.js'
import { createDigester, digestOf, tryParseDigest, type Digest } from '../oci/digest.js'
import { parseImageRef } from '../oci/image-ref.js'
import { MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES } from '../oci/media-types.js'
import { ManifestInvalidError, parseManifest as parseOciManifest, type Descriptor, type ParsedManifest, type Platform } from '../oci/manifest.js'
import { parseReference, parseRepoName, type RepoName } from '../oci/reference.js'
import type { CliIo } from './index.js'

export type { Descriptor, ParsedManifest, Platform }
import { formatBytes } from './status.js'

// ------------------------------------------------------------------ errors

/** Bad input on the command line or in --from-file: exit code 2, nothing is fetched. */
export class PrefetchUsageError extends Error {
  override readonly name = 'PrefetchUsageError'
  readonly code = 'PM_PREFETCH_USAGE'
}

/**
 * One image (or blob) could not be prefetched. `code` is the OCI error code the daemon answered
 * (`MANIFEST_UNKNOWN`, `NAME_UNKNOWN`, ...) or one of ours: `PM_DIGEST_MISMATCH`, `PM_SIZE_MISMATCH`,
 * `PM_TRANSFER_BROKEN`, `PM_UNREACHABLE`, `PM_NO_PLATFORM`, `PM_MANIFEST_INVALID`, `PM_HTTP_<status>`.
 */
export class PrefetchError extends Error {
  override readonly name = 'PrefetchError'
  constructor (readonly code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
  }
}

// ------------------------------------------------------------------ image references

/** A validated image reference, ready to be requested from the daemon. */
export interface Image {
  /** As the user wrote it; used in every message. */
  name: string
  /** The upstream registry (sent as `?ns=`), or undefined for the daemon's default upstream. */
  registry: string | undefined
  repo: RepoName
  /** What goes after `/manifests/`: a tag (default `latest`) or a digest. */
  reference: string
  /** Set when the reference pins a digest: the top manifest must hash to it. */
  digest: Digest | undefined
}

const REGISTRY = /^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?$/

/**
 * Parses a Docker-style reference (`nginx`, `nginx:1.25`, `ghcr.io/org/img:tag`, `img@sha256:...`,
 * `host:5000/org/img:tag`) and validates every part, so that a typo is a usage error before anything
 * is fetched. A first component with a dot or a colon, or `localhost`, names the upstream registry.
 */
export function parseImage (input: string): Image {
  const name = input.trim()
  let ref
  try {
    ref = parseImageRef(name)
  } catch (err) {
    if (err instanceof OciError) throw new PrefetchUsageError(`"${name}" is not an image reference (expected [registry/]repository[:tag][@digest])`)
    throw err
  }
  const registry = ref.registry?.toLowerCase()
  if (registry !== undefined && !REGISTRY.test(registry)) {
    throw new PrefetchUsageError(`"${name}": "${ref.registry ?? ''}" is not a registry host name`)
  }
  // Docker accepts `name:tag@digest` and pulls by digest; the tag is checked, then ignored.
  let repoPart = ref.repo
  const colon = repoPart.lastIndexOf(':')
  if (colon > repoPart.lastIndexOf('/')) {
    const tag = repoPart.slice(colon + 1)
    repoPart = repoPart.slice(0, colon)
    if (!ref.reference.includes(':') || !/^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/.test(tag)) throw new PrefetchUsageError(`"${name}": invalid tag "${tag}"`)
  }
  const reference = ref.reference
  let repo: RepoName
  try {
    repo = parseRepoName(repoPart)
  } catch (err) {
    if (err instanceof OciError) throw new PrefetchUsageError(`"${name}": invalid repository name "${repoPart}" (lowercase letters, digits and . _ - separators only)`)
    throw err
  }
  let digest: Digest | undefined
  try {
    const r = parseReference(reference)
    if (r.kind === 'digest') digest = r.digest
  } catch (err) {
    if (err instanceof OciError) {
      throw new PrefetchUsageError(reference.includes(':')
        ? `"${name}": invalid digest "${reference}" (expected sha256:<64 hex> or sha512:<128 hex>)`
        : `"${name}": invalid tag "${reference}"`)
    }
    throw err
  }
  return { name, registry, repo, reference, digest }
}

/** Reads an image list: one reference per line; `#` starts a comment; blank lines are ignored. */
export function parseImageList (text: string): Array<{ line: number, text: string }> {
  const out: Array<{ line: number, text: string }> = []
  text.split(/\r?\n/).forEach((raw, i) => {
    const hash = raw.indexOf('#')
    const s = (hash === -1 ? raw : raw.slice(0, hash)).trim()
    if (s !== '') out.push({ line: i + 1, text: s })
  })
  return out
}

// ------------------------------------------------------------------ platforms


const ARCH_ALIASES: Record<string, { architecture: string, variant?: string }> = {
  x86_64: { architecture: 'amd64' },
  'x86-64': { architecture: 'amd64' },
  aarch64: { architecture: 'arm64' },
  armhf: { architecture: 'arm', variant: 'v7' },
  armel: { architecture: 'arm', variant: 'v6' },
  i386: { architecture: '386' },
  i686: { architecture: '386' },
}

/** Parses `os/arch[/variant]`, e.g. `linux/arm64` or `linux/arm/v7`. */
export function parsePlatform (s: string): Platform {
  const parts = s.trim().toLowerCase().split('/')
  if (parts.length < 2 || parts.length > 3 || parts.some(p => !/^[a-z0-9._-]+$/.test(p))) {
    throw new PrefetchUsageError(`"${s}" is not a platform (expected os/arch[/variant], e.g. linux/amd64 or linux/arm/v7)`)
  }
  const [os = '', arch = '', variant] = parts
  const alias = ARCH_ALIASES[arch]
  const v = variant ?? alias?.variant
  return { os, architecture: alias?.architecture ?? arch, ...(v !== undefined ? { variant: v } : {}) }
}

export function formatPlatform (p: Platform): string {
  return `${p.os}/${p.architecture}${p.variant !== undefined && p.variant !== '' ? `/${p.variant}` : ''}`
}

/** The variant a platform means when it names none (containerd's normalisation). */
function effectiveVariant (p: Platform): string | undefined {
  if (p.variant !== undefined && p.variant !== '') return p.variant.toLowerCase()
  if (p.architecture === 'arm64') return 'v8'
  if (p.architecture === 'arm') return 'v7'
  return undefined
}

/** True if `have` (from an index) is what `want` asks for. A `want` without a variant takes any. */
export function platformMatches (want: Platform, have: Platform | undefined): boolean {
  if (have === undefined) return false
  const alias = ARCH_ALIASES[have.architecture.toLowerCase()]
  const h: Platform = { os: have.os.toLowerCase(), architecture: alias?.architecture ?? have.architecture.toLowerCase(), ...(have.variant !== undefined ? { variant: have.variant } : alias?.variant !== undefined ? { variant: alias.variant } : {}) }
  if (h.os !== want.os || h.architecture !== want.architecture) return false
  return want.variant === undefined || effectiveVariant(want) === effectiveVariant(h)
}

/**
 * The index entries to fetch: every entry when no platform is asked for (attestations included, so
 * the image is complete offline), else the entries matching any of `want`.
 */
export function selectManifests<T extends { platform?: Platform | undefined }> (entries: readonly T[], want: readonly Platform[]): T[] {
  if (want.length === 0) return [...entries]
  return entries.filter(e => want.some(w => platformMatches(w, e.platform)))
}

// ------------------------------------------------------------------ manifests

/** Reads what a manifest points at; a malformed one is a PM_MANIFEST_INVALID failure of the image. */
export function parseManifest (bytes: Uint8Array, contentType: string | undefined): ParsedManifest {
  try {
    return parseOciManifest(bytes, contentType)
  } catch (err) {
    if (err instanceof ManifestInvalidError) throw new PrefetchError(err.code, err.message)
    throw err
  }
}

// ------------------------------------------------------------------ the run

export interface PrefetchInit {
  /** The daemon, e.g. `http://127.0.0.1:5000`. */
  url: URL
  images: readonly Image[]
  /** Empty: every platform. */
  platforms: readonly Platform[]
  /** Blobs transferred at once. */
  concurrency: number
}

export interface BlobProgress { advance: (bytes: number) => void, done: (bytes: number) => void, failed: () => void }

/** How a run shows what it does: bars on a terminal, lines otherwise. */
export interface PrefetchReporter {
  /** More bytes became known to be needed (for the overall total). */
  addTotal: (bytes: number) => void
  blobStarted: (image: Image, d: Descriptor) => BlobProgress
  blobFailed: (image: Image, digest: Digest, err: PrefetchError) => void
  imageDone: (image: Image, r: ImageResult) => void
  imageFailed: (image: Image, err: PrefetchError) => void
  finish: (results: readonly ImageResult[], ms: number) => void
  /** Releases the terminal (bars, cursor); called once the run ends, also when it failed early. Safe twice. */
  close: () => void
}

export interface ImageResult {
  image: Image
  ok: boolean
  /** The digest of the top manifest, once known. */
  digest?: Digest
  platforms: string[]
  manifests: number
  blobs: number
  /** Blob bytes this image needed (shared blobs counted for each image). */
  bytes: number
  error?: PrefetchError
}

const HEADERS_TIMEOUT_MS = 5 * 60_000
const BODY_IDLE_TIMEOUT_MS = 2 * 60_000
const MAX_INDEX_DEPTH = 4

/** Prefetches every image; never throws for a failed image (its result says why). */
export async function runPrefetch (init: PrefetchInit, reporter: PrefetchReporter, opts: { signal?: AbortSignal } = {}): Promise<ImageResult[]> {
  const started = performance.now()
  const agent = new Agent({ connections: init.concurrency + 2, keepAliveTimeout: 10_000 })
  const ctx: RunContext = { init, reporter, agent, signal: opts.signal, blobs: new Map(), limit: createLimiter(init.concurrency) }
  try {
    await checkDaemon(ctx)
    const imageLimit = createLimiter(Math.max(1, Math.min(4, init.concurrency)))
    const results = await Promise.all(init.images.map(img => imageLimit(async () => await prefetchImage(ctx, img))))
    reporter.finish(results, performance.now() - started)
    return results
  } finally {
    reporter.close()
    await (opts.signal?.aborted === true ? agent.destroy() : agent.close())
  }
}

interface RunContext {
  init: PrefetchInit
  reporter: PrefetchReporter
  agent: Dispatcher
  signal: AbortSignal | undefined
  /** One transfer per digest per run: later images share the first one's outcome. */
  blobs: Map<Digest, Promise<number>>
  limit: Limiter
}

type Limiter = <T>(fn: () => Promise<T>) => Promise<T>

function createLimiter (n: number): Limiter {
  let active = 0
  const waiting: Array<() => void> = []
  return async <T>(fn: () => Promise<T>): Promise<T> => {
    if (active >= n) await new Promise<void>(resolve => waiting.push(resolve))
    active++
    try {
      return await fn()
    } finally {
      active--
      waiting.shift()?.()
    }
  }
}

/** One clear failure up front when the daemon is not there, instead of one per image. */
async function checkDaemon (ctx: RunContext): Promise<void> {
  let status: number
  try {
    const res = await request(new URL('/v2/', ctx.init.url), { dispatcher: ctx.agent, signal: ctx.signal, headersTimeout: 10_000, bodyTimeout: 10_000 })
    status = res.statusCode
    await res.body.dump()
  } catch (err) {
    throw new PrefetchError('PM_UNREACHABLE', `cannot reach the daemon at ${ctx.init.url.origin}: ${(err as Error).message}`, { cause: err })
  }
  if (status !== 200) throw new PrefetchError('PM_UNREACHABLE', `${ctx.init.url.origin} answered ${status} to /v2/: is it a pullmesh daemon?`)
}

function registryUrl (ctx: RunContext, img: Image, kind: 'manifests' | 'blobs', ref: string): URL {
  const u = new URL(`/v2/${img.repo}/${kind}/${ref}`, ctx.init.url)
  if (img.registry !== undefined) u.searchParams.set('ns', img.registry)
  return u
}

async function prefetchImage (ctx: RunContext, image: Image): Promise<ImageResult> {
  const result: ImageResult = { image, ok: false, platforms: [], manifests: 0, blobs: 0, bytes: 0 }
  try {
    const top = await fetchManifest(ctx, image, image.reference, image.digest, undefined)
    result.digest = top.digest
    const blobs = new Map<Digest, Descriptor>()
    await walk(ctx, image, top, 0, blobs, result)
    result.blobs = blobs.size
    const outcomes = await Promise.allSettled([...blobs.values()].map(async d => await prefetchBlob(ctx, image, d)))
    const failed: PrefetchError[] = []
    outcomes.forEach((o, i) => {
      if (o.status === 'fulfilled') { result.bytes += o.value; return }
      const digest = [...blobs.keys()][i]!
      const err = asPrefetchError(o.reason)
      failed.push(err)
      ctx.reporter.blobFailed(image, digest, err)
    })
    if (failed.length > 0) {
      const codes = [...new Set(failed.map(e => e.code))].join(', ')
      throw new PrefetchError(failed[0]!.code, `${failed.length} of ${blobs.size} blobs failed (${codes})`)
    }
    result.ok = true
    ctx.reporter.imageDone(image, result)
  } catch (err) {
    result.error = asPrefetchError(err)
    ctx.reporter.imageFailed(image, result.error)
  }
  return result
}

function asPrefetchError (err: unknown): PrefetchError {
  if (err instanceof PrefetchError) return err
  const e = err as Error & { code?: unknown }
  if (e?.name === 'AbortError' || e?.code === 'ABORT_ERR') return new PrefetchError('PM_INTERRUPTED', 'interrupted', { cause: err })
  return new PrefetchError(typeof e?.code === 'string' ? e.code : 'PM_FAILED', e?.message ?? String(err), { cause: err })
}

interface FetchedManifest { digest: Digest, bytes: Buffer, contentType: string | undefined }

async function walk (ctx: RunContext, image: Image, m: FetchedManifest, depth: number, blobs: Map<Digest, Descriptor>, result: ImageResult): Promise<void> {
  result.manifests++
  const parsed = parseManifest(m.bytes, m.contentType)
  if (parsed.kind === 'image') {
    for (const b of parsed.blobs) if (!blobs.has(b.digest)) blobs.set(b.digest, b)
    return
  }
  if (depth >= MAX_INDEX_DEPTH) throw new PrefetchError('PM_MANIFEST_INVALID', `indexes nested deeper than ${MAX_INDEX_DEPTH}`)
  const chosen = selectManifests(parsed.manifests, ctx.init.platforms)
  if (chosen.length === 0 && ctx.init.platforms.length > 0) {
    const available = parsed.manifests.map(d => d.platform === undefined ? undefined : formatPlatform(d.platform)).filter(p => p !== undefined && p !== 'unknown/unknown')
    throw new PrefetchError('PM_NO_PLATFORM', `no manifest for ${ctx.init.platforms.map(formatPlatform).join(', ')} (the image has ${available.length > 0 ? available.join(', ') : 'no platforms listed'})`)
  }
  for (const d of chosen) {
    if (d.platform !== undefined && d.platform.os !== 'unknown') result.platforms.push(formatPlatform(d.platform))
    const child = await fetchManifest(ctx, image, d.digest, d.digest, d.size)
    await walk(ctx, image, child, depth + 1, blobs, result)
  }
}

/** GETs a manifest and checks that its bytes hash to the digest asked for (or the one the daemon names). */
async function fetchManifest (ctx: RunContext, image: Image, ref: string, expected: Digest | undefined, size: number | undefined): Promise<FetchedManifest> {
  const res = await send(ctx, registryUrl(ctx, image, 'manifests', ref), { accept: MANIFEST_MEDIA_TYPES.join(', ') })
  if (res.statusCode !== 200) throw await daemonError(res, `manifest ${ref}`)
  const declared = Number(res.headers['content-length'])
  if (Number.isFinite(declared) && declared > MAX_MANIFEST_BYTES) {
    await res.body.dump()
    throw new PrefetchError('PM_MANIFEST_INVALID', `manifest ${ref} is larger than ${formatBytes(MAX_MANIFEST_BYTES)}`)
  }
  const chunks: Buffer[] = []
  let n = 0
  try {
    for await (const c of res.body as AsyncIterable<Buffer>) {
      n += c.length
      if (n > MAX_MANIFEST_BYTES) throw new PrefetchError('PM_MANIFEST_INVALID', `manifest ${ref} is larger than ${formatBytes(MAX_MANIFEST_BYTES)}`)
      chunks.push(c)
    }
  } catch (err) {
    res.body.destroy()
    if (err instanceof PrefetchError) throw err
    throw new PrefetchError('PM_TRANSFER_BROKEN', `manifest ${ref}: the transfer broke: ${(err as Error).message}`, { cause: err })
  }
  const bytes = Buffer.concat(chunks)
  const header = res.headers['docker-content-digest']
  const named = typeof header === 'string' ? tryParseDigest(header) : undefined
  const want = expected ?? named
  if (want === undefined) throw new PrefetchError('PM_MANIFEST_INVALID', `manifest ${ref}: the daemon named no valid Docker-Content-Digest, so it cannot be verified`)
  const got = digestOf(bytes, want)
  if (got !== want) throw new PrefetchError('PM_DIGEST_MISMATCH', `manifest ${ref}: received bytes hash to ${got}, expected ${want}`)
  if (size !== undefined && bytes.length !== size) throw new PrefetchError('PM_SIZE_MISMATCH', `manifest ${ref}: received ${bytes.length} bytes, the index says ${size}`)
  const ct = res.headers['content-type']
  return { digest: want, bytes, contentType: typeof ct === 'string' ? ct.split(';')[0]!.trim().toLowerCase() : undefined }
}

/** Fetches a blob once per run (shared by every image that needs it); resolves to its size. */
async function prefetchBlob (ctx: RunContext, image: Image, d: Descriptor): Promise<number> {
  let p = ctx.blobs.get(d.digest)
  if (p === undefined) {
    if (d.size !== undefined) ctx.reporter.addTotal(d.size)
    p = ctx.limit(async () => await transferBlob(ctx, image, d))
    ctx.blobs.set(d.digest, p)
  }
  return await p
}

async function transferBlob (ctx: RunContext, image: Image, d: Descriptor): Promise<number> {
  const progress = ctx.reporter.blobStarted(image, d)
  let n = 0
  try {
    const res = await send(ctx, registryUrl(ctx, image, 'blobs', d.digest), {})
    if (res.statusCode !== 200) throw await daemonError(res, `blob ${d.digest}`)
    const hash = createDigester(d.digest)
    const sink = new Writable({
      highWaterMark: 1024 * 1024,
      write (chunk: Buffer, _enc, cb) {
        n += chunk.length
        if (d.size !== undefined && n > d.size) { cb(new PrefetchError('PM_SIZE_MISMATCH', `blob ${d.digest}: more than the ${d.size} bytes the manifest says`)); return }
        hash.update(chunk)
        progress.advance(chunk.length)
        cb()
      },
    })
    try {
      await pipeline(res.body, sink, ctx.signal !== undefined ? { signal: ctx.signal } : {})
    } catch (err) {
      if (err instanceof PrefetchError || ctx.signal?.aborted === true) throw err
      throw new PrefetchError('PM_TRANSFER_BROKEN',
        `blob ${d.digest}: the transfer broke after ${formatBytes(n)}${d.size !== undefined ? ` of ${formatBytes(d.size)}` : ''} ` +
        `(${(err as Error).message}; the daemon aborts a blob whose upstream transfer fails or does not match its digest)`, { cause: err })
    }
    const got = `${d.digest.slice(0, d.digest.indexOf(':'))}:${hash.digest('hex')}`
    if (got !== d.digest) throw new PrefetchError('PM_DIGEST_MISMATCH', `blob ${d.digest}: received bytes hash to ${got}`)
    if (d.size !== undefined && n !== d.size) throw new PrefetchError('PM_SIZE_MISMATCH', `blob ${d.digest}: received ${n} bytes, the manifest says ${d.size}`)
    progress.done(n)
    return n
  } catch (err) {
    progress.failed()
    throw asPrefetchError(err)
  }
}

async function send (ctx: RunContext, url: URL, headers: Record<string, string>): Promise<Dispatcher.ResponseData> {
  try {
    return await request(url, { dispatcher: ctx.agent, headers, signal: ctx.signal, headersTimeout: HEADERS_TIMEOUT_MS, bodyTimeout: BODY_IDLE_TIMEOUT_MS })
  } catch (err) {
    if (ctx.signal?.aborted === true) throw err
    throw new PrefetchError('PM_UNREACHABLE', `cannot reach the daemon at ${url.origin}: ${(err as Error).message}`, { cause: err })
  }
}

/** Turns a non-200 answer into an error carrying the daemon's OCI error code and message. */
async function daemonError (res: Dispatcher.ResponseData, what: string): Promise<PrefetchError> {
  let text = ''
  try { text = await res.body.text() } catch { /* the status alone will do */ }
  try {
    const body = JSON.parse(text) as { errors?: Array<{ code?: unknown, message?: unknown, detail?: unknown }> }
    const e = body.errors?.[0]
    if (typeof e?.code === 'string') {
      return new PrefetchError(e.code, `${what}: ${e.code}: ${typeof e.message === 'string' ? e.message : 'error'}${formatDetail(e.detail)} (HTTP ${res.statusCode})`)
    }
  } catch { /* not an OCI error body */ }
  return new PrefetchError(`PM_HTTP_${res.statusCode}`, `${what}: the daemon answered HTTP ${res.statusCode}`)
}

function formatDetail (detail: unknown): string {
  if (detail === undefined || detail === null) return ''
  const reason = (detail as { reason?: unknown }).reason
  if (typeof reason === 'string') return `: ${reason}`
  const s = JSON.stringify(detail)
  return s === '{}' ? '' : ` ${s.length > 200 ? `${s.slice(0, 200)}…` : s}`
}

// ------------------------------------------------------------------ reporting

export function shortDigest (d: string): string {
  const i = d.indexOf(':')
  return `${d.slice(0, i + 13)}…`
}

function imageSummary (r: ImageResult): string {
  const platforms = r.platforms.length === 0 ? '' : `${r.platforms.length} platform${r.platforms.length === 1 ? '' : 's'} (${r.platforms.join(', ')}), `
  return `${platforms}${r.blobs} blob${r.blobs === 1 ? '' : 's'}, ${formatBytes(r.bytes)} done`
}

function finishLine (results: readonly ImageResult[], ms: number): { ok: boolean, line: string } {
  const failed = results.filter(r => !r.ok).length
  const bytes = results.reduce((s, r) => s + (r.ok ? r.bytes : 0), 0)
  const secs = (ms / 1000).toFixed(1)
  return failed === 0
    ? { ok: true, line: `prefetched ${results.length} image${results.length === 1 ? '' : 's'} (${formatBytes(bytes)}) in ${secs}s\n` }
    : { ok: false, line: `${failed} of ${results.length} image${results.length === 1 ? '' : 's'} failed to prefetch\n` }
}

/** One line per finished blob and per image; failures on stderr. For logs and pipes. */
export function createLineReporter (io: Pick<CliIo, 'stdout' | 'stderr'>): PrefetchReporter {
  return {
    addTotal: () => {},
    blobStarted: (image, d) => ({
      advance: () => {},
      done: (bytes) => { io.stdout.write(`${image.name}  ${shortDigest(d.digest)} ${formatBytes(bytes)} done\n`) },
      failed: () => {},
    }),
    blobFailed: (image, digest, err) => { io.stderr.write(`${image.name}  ${shortDigest(digest)} FAILED: ${err.message}\n`) },
    imageDone: (image, r) => { io.stdout.write(`${image.name}  ${r.digest ?? ''}  ${imageSummary(r)}\n`) },
    imageFailed: (image, err) => { io.stderr.write(`pullmesh prefetch: ${image.name}: ${err.message}\n`) },
    finish: (results, ms) => {
      const f = finishLine(results, ms)
      ;(f.ok ? io.stdout : io.stderr).write(f.line)
    },
    close: () => {},
  }
}

/** cli-progress bars on a terminal: one per blob in flight and one overall. Failures are repeated on stderr at the end. */
export function createBarReporter (io: Pick<CliIo, 'stdout' | 'stderr'>): PrefetchReporter {
  const bars = new MultiBar({
    stream: io.stdout as unknown as NodeJS.WritableStream,
    hideCursor: true,
    clearOnComplete: false,
    autopadding: true,
    format: (_opts, params, payload: { label: string }) => {
      const width = 30
      const ratio = params.total > 0 ? Math.min(1, params.value / params.total) : 0
      const filled = Math.round(ratio * width)
      return `${payload.label.padEnd(24)} ${'█'.repeat(filled)}${'░'.repeat(width - filled)} ${String(Math.floor(ratio * 100)).padStart(3)}%  ${formatBytes(params.value)} / ${formatBytes(params.total)}`
    },
  })
  const overall: SingleBar = bars.create(0, 0, { label: 'total' })
  let total = 0
  let done = 0
  const failures: string[] = []
  let stopped = false
  const log = (s: string): void => { if (stopped) io.stdout.write(s); else bars.log(s) }
  const stop = (): void => {
    if (stopped) return
    stopped = true
    bars.stop()
    for (const f of failures) io.stderr.write(f)
  }
  return {
    addTotal: (bytes) => { total += bytes; overall.setTotal(total) },
    blobStarted: (_image, d) => {
      const bar = bars.create(d.size ?? 0, 0, { label: shortDigest(d.digest) })
      let value = 0
      return {
        advance: (n) => { value += n; done += n; if (d.size === undefined) bar.setTotal(value); bar.update(value); overall.update(done) },
        done: () => { bars.remove(bar) },
        failed: () => { done -= value; overall.update(done); bars.remove(bar) },
      }
    },
    blobFailed: (image, digest, err) => {
      const s = `${image.name}  ${shortDigest(digest)} FAILED: ${err.message}\n`
      failures.push(s)
      log(s)
    },
    imageDone: (image, r) => { log(`${image.name}  ${r.digest ?? ''}  ${imageSummary(r)}\n`) },
    imageFailed: (image, err) => {
      const s = `pullmesh prefetch: ${image.name}: ${err.message}\n`
      failures.push(s)
      log(s)
    },
    finish: (results, ms) => {
      overall.update(done)
      stop()
      const f = finishLine(results, ms)
      ;(f.ok ? io.stdout : io.stderr).write(f.line)
    },
    close: stop,
  }
}

// ------------------------------------------------------------------ the command

const collect = (v: string, prev: string[] = []): string[] => [...prev, v]

const HELP = `
Pulls images into the cache of a running pullmesh daemon through its registry API, verifying the
digest of every manifest and blob it receives. Run it before going offline: afterwards the daemon
serves these images without its upstream. A first name component with a dot or colon (or
"localhost") names the upstream registry, which must be configured on the daemon; other names go
to the daemon's default upstream.

Exit status: 0 every image was prefetched; 1 some image failed (each failure is reported with the
daemon's error code and message); 2 usage error (no images, bad reference or platform, unreadable file).

Examples:
  pullmesh prefetch nginx:1.25 ghcr.io/org/app:2.1
  pullmesh prefetch --platform linux/arm64 --platform linux/amd64 redis:7
  pullmesh prefetch --url http://10.0.0.5:5000 --from-file images.txt
`

interface PrefetchFlags { url: string, platform?: string[], fromFile?: string, concurrency: string }

export function registerPrefetch (program: Command, io: CliIo, setExit: (code: number) => void): void {
  program.command('prefetch')
    .description('pull images into the cache of a running daemon (to warm a node before going offline)')
    .argument('[image...]', 'image references: nginx, nginx:1.25, ghcr.io/org/img:tag, img@sha256:..., host:5000/org/img:tag')
    .option('--url <url>', 'the daemon to fill', io.env.PULLMESH_URL ?? 'http://127.0.0.1:5000')
    .option('--platform <os/arch[/variant]>', 'only this platform of multi-platform images; repeatable (default: every platform)', collect)
    .option('-f, --from-file <file>', 'also read images from FILE, one per line (# comments and blank lines ignored)')
    .option('--concurrency <n>', 'blobs transferred at once', '3')
    .addHelpText('after', HELP)
    .action(async (args: string[], flags: PrefetchFlags) => {
      setExit(await prefetchCommand(args, flags, io))
    })
}

async function prefetchCommand (args: string[], flags: PrefetchFlags, io: CliIo): Promise<number> {
  const problems: string[] = []
  const images: Image[] = []
  const addImage = (text: string, where: string): void => {
    try {
      images.push(parseImage(text))
    } catch (err) {
      if (!(err instanceof PrefetchUsageError)) throw err
      problems.push(`${where}${err.message}`)
    }
  }
  for (const a of args) addImage(a, '')
  if (flags.fromFile !== undefined) {
    try {
      for (const { line, text } of parseImageList(await readFile(flags.fromFile, 'utf8'))) addImage(text, `${flags.fromFile}:${line}: `)
    } catch (err) {
      problems.push(`cannot read ${flags.fromFile}: ${(err as Error).message}`)
    }
  }
  const platforms: Platform[] = []
  for (const p of flags.platform ?? []) {
    try { platforms.push(parsePlatform(p)) } catch (err) {
      if (!(err instanceof PrefetchUsageError)) throw err
      problems.push(err.message)
    }
  }
  let url: URL | undefined
  try {
    url = new URL(flags.url)
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error('not http')
  } catch {
    problems.push(`--url "${flags.url}" is not an http(s) URL`)
  }
  const concurrency = Number(flags.concurrency)
  if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 64) problems.push(`--concurrency must be a whole number from 1 to 64, not "${flags.concurrency}"`)
  if (images.length === 0 && flags.fromFile === undefined) problems.push('no images given (name them as arguments or with --from-file)')
  else if (images.length === 0 && problems.length === 0) problems.push(`no images in ${flags.fromFile ?? ''}`)
  if (problems.length > 0 || url === undefined) {
    for (const p of problems) io.stderr.write(`pullmesh prefetch: ${p}\n`)
    io.stderr.write("(see 'pullmesh prefetch --help')\n")
    return 2
  }

  // Ctrl-C aborts the transfers cleanly (restoring the terminal) instead of killing mid-render.
  const ac = new AbortController()
  void io.stopRequested().then(() => { ac.abort(new Error('interrupted')) })
  const tty = (io.stdout as Partial<NodeJS.WriteStream>).isTTY === true
  const reporter = tty ? createBarReporter(io) : createLineReporter(io)
  try {
    const results = await runPrefetch({ url, images, platforms, concurrency }, reporter, { signal: ac.signal })
    if (ac.signal.aborted) return 130
    return results.every(r => r.ok) ? 0 : 1
  } catch (err) {
    if (!(err instanceof PrefetchError)) throw err
    io.stderr.write(`pullmesh prefetch: ${err.message}\n`)
    return ac.signal.aborted ? 130 : 1
  }
}
