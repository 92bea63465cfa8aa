// `pullmesh prefetch` end to end: the real CLI (dist/main.js, built first) against a real daemon
// started in-process, in front of the fault-injecting upstream seeded with a two-platform image.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { buildConfig } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { run, type RunResult } from '../helpers/exec.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'

const ROOT = fileURLToPath(new URL('../..', import.meta.url))
const MAIN = join(ROOT, 'dist', 'main.js')
const REPO = 'team/app'

interface PlatformImage { manifest: string, config: string, layers: string[] }
interface Seeded { index: string, amd64: PlatformImage, arm64: PlatformImage, shared: string, blobs: Map<string, Buffer> }

let up: FaultUpstream
let daemon: Daemon
let dataDir: string
let seeded: Seeded

/** Seeds `team/app:multi`: an OCI index of linux/amd64 and linux/arm64, sharing one layer. */
function seed (u: FaultUpstream): Seeded {
  const blobs = new Map<string, Buffer>()
  const blob = (data: Buffer): string => { const d = u.addBlob(REPO, data); blobs.set(d, data); return d }
  const sharedData = randomBytes(512 * 1024)
  const shared = blob(sharedData)
  const platform = (arch: string, variant?: string): { image: PlatformImage, desc: object } => {
    const configData = Buffer.from(JSON.stringify({ architecture: arch, os: 'linux', ...(variant !== undefined ? { variant } : {}), rootfs: { type: 'layers', diff_ids: [] } }))
    const config = blob(configData)
    const ownData = randomBytes(300 * 1024 + (arch === 'arm64' ? 7 : 0))
    const own = blob(ownData)
    const body = Buffer.from(JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: config, size: configData.length },
      layers: [
        { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: shared, size: sharedData.length },
        { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: own, size: ownData.length },
      ],
    }))
    const manifest = u.addManifest(REPO, undefined, body, MediaType.ociManifest)
    return {
      image: { manifest, config, layers: [shared, own] },
      desc: { mediaType: MediaType.ociManifest, digest: manifest, size: body.length, platform: { os: 'linux', architecture: arch, ...(variant !== undefined ? { variant } : {}) } },
    }
  }
  const amd64 = platform('amd64')
  const arm64 = platform('arm64', 'v8')
  const index = u.addManifest(REPO, 'multi', { schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [amd64.desc, arm64.desc] }, MediaType.ociIndex)
  return { index, amd64: amd64.image, arm64: arm64.image, shared, blobs }
}

async function startDaemon (): Promise<Daemon> {
  const d = createDaemon(buildConfig({
    listen: '127.0.0.1:0',
    dataDir,
    // The same upstream under two names: a dotted default, and one with a port (addressed with ?ns=).
    upstream: [`fault.test=${up.url}`, `${up.host}=${up.url}`],
    defaultUpstream: 'fault.test',
    mesh: false,
    mdns: false,
    tagTtl: '1h',
    upstreamRetries: '1',
    upstreamConnectTimeout: '2s',
    upstreamHeadersTimeout: '2s',
    upstreamBodyTimeout: '2s',
  }, {}), { logger: createLogger('silent') })
  await d.start()
  return d
}

/** Runs the real CLI; never throws on a non-zero exit. PULLMESH_* from the test's environment are dropped. */
async function prefetch (...args: string[]): Promise<RunResult> {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PULLMESH_')))
  return await run(process.execPath, [MAIN, 'prefetch', ...args], { env, allowFailure: true, timeoutMs: 60_000 })
}

const stored = async (digest: string): Promise<boolean> => (await daemon.store.stat(parseDigest(digest))) !== undefined
/** A blob a client has received whole is committed to the store just after (fsync, rename, index): wait for that. */
const committed = async (d: string): Promise<void> => { await expect.poll(async () => await stored(d), { message: d, timeout: 5000 }).toBe(true) }
const allOf = (p: PlatformImage): string[] => [p.manifest, p.config, ...p.layers]
const image = (): string => `${up.host}/${REPO}:multi`

beforeAll(async () => {
  await run('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: ROOT, timeoutMs: 180_000 })
}, 200_000)

describe('pullmesh prefetch', () => {
  beforeEach(async () => {
    up = await startFaultUpstream()
    seeded = seed(up)
    dataDir = await mkdtemp(join(tmpdir(), 'pm-prefetch-'))
    daemon = await startDaemon()
  })

  afterEach(async () => {
    await daemon.stop()
    await up.close()
    await rm(dataDir, { recursive: true, force: true })
  })

  it('prefetches every platform of an image, addressing an upstream with a port through ?ns=', async () => {
    const r = await prefetch('--url', daemon.url(), image())
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    for (const d of [seeded.index, ...allOf(seeded.amd64), ...allOf(seeded.arm64)]) await committed(d)
    // one plain line per blob (the shared layer once) and one for the image
    const blobLines = r.stdout.split('\n').filter(l => / sha256:[0-9a-f]{12}… .* done$/.test(l))
    expect(blobLines).toHaveLength(5)
    expect(r.stdout).toContain(`${image()}  ${seeded.index}  2 platforms (linux/amd64, linux/arm64/v8), 5 blobs`)
    expect(r.stdout).toMatch(/prefetched 1 image /)
    // the daemon was asked containerd-style, and every blob was transferred once
    const blobGets = up.requests.filter(q => q.method === 'GET' && q.path.includes('/blobs/'))
    expect(blobGets.map(q => q.path).sort()).toEqual([...new Set(blobGets.map(q => q.path))].sort())
  })

  it('--platform linux/arm64 fetches only that platform', async () => {
    const r = await prefetch('--url', daemon.url(), '--platform', 'linux/arm64', image())
    expect(r.code).toBe(0)
    for (const d of allOf(seeded.arm64)) await committed(d)
    expect(await stored(seeded.amd64.manifest)).toBe(false)
    expect(await stored(seeded.amd64.config)).toBe(false)
    expect(await stored(seeded.amd64.layers[1]!)).toBe(false)
    expect(r.stdout).toContain('1 platform (linux/arm64/v8), 3 blobs')
  })

  it('a platform the image lacks fails with the platforms it has', async () => {
    const r = await prefetch('--url', daemon.url(), '--platform', 'linux/s390x', image())
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('no manifest for linux/s390x (the image has linux/amd64, linux/arm64/v8)')
  })

  it('a missing image exits 1 with the daemon\'s error, and the other images are still prefetched', async () => {
    const r = await prefetch('--url', daemon.url(), `${up.host}/${REPO}:nope`, image())
    expect(r.code).toBe(1)
    expect(r.stderr).toContain(`pullmesh prefetch: ${up.host}/${REPO}:nope: manifest nope: MANIFEST_UNKNOWN:`)
    expect(r.stderr).toContain('1 of 2 images failed')
    for (const d of allOf(seeded.arm64)) await committed(d)
  })

  it('an upstream the daemon does not serve exits 1 with NAME_UNKNOWN', async () => {
    const r = await prefetch('--url', daemon.url(), 'other.example/app:1')
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('NAME_UNKNOWN')
    expect(r.stderr).toContain('not configured')
  })

  it('--from-file reads a list (comments and blank lines ignored), combined with arguments and the default upstream', async () => {
    const list = join(dataDir, 'images.txt')
    // `team/app@digest` goes to the default upstream (no ns): the amd64 manifest only
    await writeFile(list, `# warm before the flight\n\n${REPO}@${seeded.amd64.manifest}   # amd64 only\n`)
    const r = await prefetch('--url', daemon.url(), '--from-file', list, `${REPO}@${seeded.arm64.manifest}`)
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    for (const d of [...allOf(seeded.amd64), ...allOf(seeded.arm64)]) await committed(d)
    expect(r.stdout).toMatch(/prefetched 2 images /)
    expect(up.requests.some(q => q.path === `/v2/${REPO}/manifests/${seeded.amd64.manifest}`)).toBe(true)
  })

  it('a corrupted upstream blob makes it exit 1, and the bad blob is not cached', async () => {
    const bad = seeded.amd64.layers[1]!
    up.setFault({ kind: 'corrupt' }, { path: new RegExp(`/blobs/${bad}$`) })
    const r = await prefetch('--url', daemon.url(), image())
    expect(r.code).toBe(1)
    expect(r.stderr).toContain(bad.slice(0, 19))
    expect(r.stderr).toMatch(/FAILED: blob sha256:[0-9a-f]{64}: /)
    expect(r.stderr).toContain('1 of 1 image failed')
    expect(await stored(bad)).toBe(false)
    for (const d of allOf(seeded.arm64)) await committed(d)
  })

  it('after the upstream goes away, the prefetched image is still served', async () => {
    expect((await prefetch('--url', daemon.url(), image())).code).toBe(0)
    await up.close()
    for (const [digest, data] of seeded.blobs) {
      const res = await simpleRequest(`${daemon.url()}/v2/${REPO}/blobs/${digest}?ns=${up.host}`)
      expect(res.status, digest).toBe(200)
      expect(`sha256:${createHash('sha256').update(res.body).digest('hex')}`).toBe(digest)
      expect(res.body.equals(data)).toBe(true)
    }
    // and a second prefetch (tag, index, manifests, blobs) succeeds from the cache alone
    const again = await prefetch('--url', daemon.url(), image())
    expect(again.stderr).toBe('')
    expect(again.code).toBe(0)
  })
})

describe('pullmesh prefetch usage', () => {
  it.each([
    [[], /no images given/],
    [['Bad/Name'], /invalid repository name "Bad\/Name"/],
    [['--from-file', '/nonexistent/images.txt'], /cannot read \/nonexistent\/images.txt/],
    [['--platform', 'linux', 'nginx'], /"linux" is not a platform/],
    [['--url', 'ftp://x', 'nginx'], /--url "ftp:\/\/x" is not an http\(s\) URL/],
  ])('%j exits 2', async (args, message) => {
    const r = await prefetch('--url', 'http://127.0.0.1:9', ...args)
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(message)
  })

  it('reports a daemon that is not there once, exit 1', async () => {
    const r = await prefetch('--url', 'http://127.0.0.1:9', 'nginx')
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('cannot reach the daemon at http://127.0.0.1:9')
  })

  it('documents itself in --help', async () => {
    const r = await prefetch('--help')
    expect(r.code).toBe(0)
    expect(r.stdout).toContain('--platform <os/arch[/variant]>')
    expect(r.stdout).toContain('--from-file <file>')
    expect(r.stdout).toContain('before going offline')
  })
})
