// Cache lifecycle: a disk budget that holds while images are pulled, LRU order, max-age from the last
// access, pins, evict by image and digest, gc, and content in use never deleted under a client.
import { createHash, randomBytes } from 'node:crypto'
import { execFile } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { request as httpRequest } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'
import { DAEMON_ENTRY } from '../helpers/daemon-process.js'

const run = promisify(execFile)
const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const MiB = 1024 * 1024

let up: FaultUpstream
let daemon: Daemon
let dataDir: string

async function start (settings: RawSettings = {}): Promise<Daemon> {
  dataDir = await mkdtemp(join(tmpdir(), 'pm-life-'))
  const d = createDaemon(buildConfig({ listen: '127.0.0.1:0', dataDir, upstream: [`life.test=${up.url}`], mesh: false, ...settings }, {}), { logger: createLogger('silent') })
  await d.start()
  return d
}

function seedImage (repo: string, tag: string, layers: number, layerBytes: number): { blobs: string[], manifest: string } {
  const blobs = Array.from({ length: layers }, () => up.addBlob(repo, randomBytes(layerBytes)))
  const cfg = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', n: Math.random() }))
  const cfgD = up.addBlob(repo, cfg)
  const m = { schemaVersion: 2, mediaType: MediaType.ociManifest, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: cfgD, size: cfg.length }, layers: blobs.map(d => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: d, size: layerBytes })) }
  return { blobs: [...blobs, cfgD], manifest: up.addManifest(repo, tag, Buffer.from(JSON.stringify(m)), MediaType.ociManifest) }
}

async function pull (repo: string, tag: string, blobs: string[]): Promise<void> {
  expect((await simpleRequest(`${daemon.url()}/v2/life.test/${repo}/manifests/${tag}`)).status).toBe(200)
  for (const d of blobs) {
    const r = await simpleRequest(`${daemon.url()}/v2/life.test/${repo}/blobs/${d}`)
    expect(sha(r.body)).toBe(d)
  }
  await fillsDone()
}

/** A client's response ends once the bytes verify; the fill commits to the store (fsync, rename, index) just after. */
async function fillsDone (): Promise<void> {
  await expect.poll(async () => (await daemon.metrics.fillsActive.get()).values[0]?.value ?? 0).toBe(0)
}

const cached = async (d: string): Promise<boolean> => (await daemon.store.stat(parseDigest(d))) !== undefined
async function settle (): Promise<void> { await daemon.evictor.run('test') }
async function cli (...args: string[]): Promise<{ code: number, stdout: string, stderr: string }> {
  try {
    const r = await run(process.execPath, [DAEMON_ENTRY, ...args, '--url', daemon.url()], { timeout: 60_000 })
    return { code: 0, stdout: r.stdout, stderr: r.stderr }
  } catch (e) {
    const err = e as { code?: number, stdout?: string, stderr?: string }
    return { code: err.code ?? 1, stdout: err.stdout ?? '', stderr: err.stderr ?? '' }
  }
}

beforeAll(async () => { up = await startFaultUpstream() })
afterAll(async () => { await up.close() })
afterEach(async () => {
  await daemon.stop()
  await rm(dataDir, { recursive: true, force: true })
})

describe('disk budget', () => {
  it('stays within --max-size while images are pulled, evicting least recently used first', async () => {
    daemon = await start({ maxSize: '6MiB' })
    const images = Array.from({ length: 6 }, (_, i) => seedImage(`library/img${i}`, 'v1', 2, 1 * MiB))
    for (const [i, img] of images.entries()) {
      await pull(`library/img${i}`, 'v1', img.blobs)
      await settle()
      expect(daemon.store.usage().bytes, `after image ${i}`).toBeLessThanOrEqual(6 * MiB)
      // Keep image 0 hot: it must survive as the least recently used content goes.
      await pull('library/img0', 'v1', images[0]!.blobs)
    }
    for (const d of images[0]!.blobs) expect(await cached(d)).toBe(true)
    expect(await cached(images[1]!.blobs[0]!)).toBe(false)
    const metrics = (await simpleRequest(`${daemon.url()}/metrics`)).body.toString()
    expect(metrics).toMatch(/pullmesh_evictions_total\{reason="size"\} [1-9]/)
  })

  it('never evicts pinned content, and unpin lets it go', async () => {
    daemon = await start({ maxSize: '3MiB' })
    const keep = seedImage('library/keep', 'v1', 2, 1 * MiB)
    const pin = await cli('pin', 'life.test/library/keep:v1', '--json')
    expect(pin.code, pin.stderr).toBe(0)
    expect(JSON.parse(pin.stdout).blobs).toBe(3)
    for (const d of keep.blobs) expect(await cached(d)).toBe(true)
    for (let i = 0; i < 3; i++) {
      const other = seedImage(`library/other${i}`, 'v1', 1, 1 * MiB)
      await pull(`library/other${i}`, 'v1', other.blobs)
      await settle()
    }
    for (const d of keep.blobs) expect(await cached(d)).toBe(true)
    expect((await cli('unpin', 'life.test/library/keep:v1')).code).toBe(0)
    expect((await cli('unpin', 'life.test/library/keep:v1')).code).toBe(1)
    const more = seedImage('library/more', 'v1', 2, 1 * MiB)
    await pull('library/more', 'v1', more.blobs)
    await settle()
    expect(daemon.store.usage().bytes).toBeLessThanOrEqual(3 * MiB)
    expect((await Promise.all(keep.blobs.map(cached))).some(x => !x)).toBe(true)
  })

  it('does not delete a blob while it is streamed to a client', async () => {
    daemon = await start({ maxSize: '40MiB' })
    // Larger than loopback socket buffers, so the server really holds the file open while we pause.
    const big = randomBytes(32 * MiB)
    const d = up.addBlob('library/big', big)
    expect(sha((await simpleRequest(`${daemon.url()}/v2/life.test/library/big/blobs/${d}`)).body)).toBe(d)
    await fillsDone()
    const u = new URL(`${daemon.url()}/v2/life.test/library/big/blobs/${d}`)
    let res!: import('node:http').IncomingMessage
    await new Promise<void>((resolve, reject) => {
      const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname, agent: false, headers: { connection: 'close' } }, r => { res = r; r.pause(); resolve() })
      req.on('error', reject)
      req.end()
    })
    await new Promise(resolve => setTimeout(resolve, 100))
    expect(daemon.store.inUse(parseDigest(d))).toBe(true)
    // The big blob is the least recently used: the budget would take it first, but it is in use.
    const other = seedImage('library/push', 'v1', 2, 8 * MiB)
    await pull('library/push', 'v1', other.blobs)
    await settle()
    expect(await cached(d)).toBe(true)
    expect(daemon.store.usage().bytes).toBeLessThanOrEqual(40 * MiB)
    const chunks: Buffer[] = []
    await new Promise<void>((resolve, reject) => { res.on('data', (c: Buffer) => chunks.push(c)); res.on('end', resolve); res.on('error', reject); res.resume() })
    expect(sha(Buffer.concat(chunks))).toBe(d)
  })
})

describe('expiry, evict and gc', () => {
  it('--max-age counts from the last access', async () => {
    daemon = await start({ maxAge: '4s' })
    const a = up.addBlob('library/x', randomBytes(1000))
    const b = up.addBlob('library/x', randomBytes(1000))
    for (const d of [a, b]) await simpleRequest(`${daemon.url()}/v2/life.test/library/x/blobs/${d}`)
    await new Promise(resolve => setTimeout(resolve, 2500))
    await simpleRequest(`${daemon.url()}/v2/life.test/library/x/blobs/${a}`) // a is accessed again
    await new Promise(resolve => setTimeout(resolve, 2000))
    // b was inserted and last read 4.5 s ago; a was inserted as long ago but read 2 s ago.
    const result = await daemon.evictor.run('test')
    expect(result.evicted).toBe(1)
    expect(await cached(a)).toBe(true)
    expect(await cached(b)).toBe(false)
  })

  it('evicts an image or a digest on request, and gc drops tags that point nowhere', async () => {
    daemon = await start()
    const img = seedImage('library/gone', 'v1', 2, 10_000)
    await pull('library/gone', 'v1', img.blobs)
    const one = await cli('evict', img.blobs[0]!, '--json')
    expect(one.code, one.stderr).toBe(0)
    expect(JSON.parse(one.stdout).evicted).toEqual([img.blobs[0]])
    expect(await cached(img.blobs[0]!)).toBe(false)
    const all = await cli('evict', 'life.test/library/gone:v1', '--json')
    expect(all.code, all.stderr).toBe(0)
    expect(JSON.parse(all.stdout).evicted).toContain(img.manifest)
    for (const d of [...img.blobs, img.manifest]) expect(await cached(d)).toBe(false)
    expect(await daemon.store.getTag('life.test', 'library/gone', 'v1')).toBeUndefined()
    expect((await cli('evict', 'life.test/library/never:v1')).code).toBe(1)
    // Pulling again refetches (the upstream is still there).
    await pull('library/gone', 'v1', img.blobs)
    expect((await cli('gc')).code).toBe(0)
  })

  it('refuses admin requests a browser could send cross-site, while the CLI still works', async () => {
    daemon = await start()
    const img = seedImage('library/csrf', 'v1', 1, 10_000)
    await pull('library/csrf', 'v1', img.blobs)
    const u = daemon.url()
    const refused = async (method: string, path: string, headers: Record<string, string> = {}, body?: string): Promise<void> => {
      const r = await simpleRequest(u + path, { method, headers, ...(body !== undefined ? { body } : {}) })
      expect(r.status, `${method} ${path} ${JSON.stringify(headers)}`).toBe(403)
      const e = JSON.parse(r.body.toString()).errors[0]
      expect(e.code).toBe('DENIED')
      expect(e.message).toContain('x-pullmesh-admin: 1')
    }
    // What a form, an <img>, or fetch() in no-cors mode can send: no custom header, no JSON content type.
    await refused('POST', '/pullmesh/v1/gc')
    await refused('POST', '/pullmesh/v1/gc', { 'content-type': 'text/plain' }, '')
    await refused('POST', '/pullmesh/v1/pins', { 'content-type': 'text/plain' }, JSON.stringify({ image: 'life.test/library/csrf:v1' }))
    await refused('POST', '/pullmesh/v1/evict', { 'content-type': 'application/x-www-form-urlencoded' }, 'target=life.test/library/csrf:v1')
    await refused('POST', '/pullmesh/v1/evict', { 'content-type': 'multipart/form-data; boundary=x' }, '--x--')
    await refused('DELETE', '/pullmesh/v1/pins?image=life.test/library/csrf:v1')
    await refused('POST', '/pullmesh/v1/gc', { 'x-pullmesh-admin': 'yes please' })
    // DNS rebinding: a page served under its own name, now resolving to 127.0.0.1, may add headers, but
    // its Host header names it.
    const rebound = await simpleRequest(`${u}/pullmesh/v1/gc`, { method: 'POST', headers: { host: 'attacker.example:5000', 'x-pullmesh-admin': '1' } })
    expect(rebound.status).toBe(403)
    expect(JSON.parse(rebound.body.toString()).errors[0].message).toContain('Host header')
    for await (const p of daemon.store.listPins()) expect.unreachable(`pinned ${p.name}`)
    for (const d of img.blobs) expect(await cached(d)).toBe(true)
    // The header, or a JSON body, is enough.
    expect((await simpleRequest(`${u}/pullmesh/v1/gc`, { method: 'POST', headers: { 'x-pullmesh-admin': '1' } })).status).toBe(200)
    expect((await simpleRequest(`${u}/pullmesh/v1/gc`, { method: 'POST', headers: { host: `localhost:${new URL(u).port}`, 'x-pullmesh-admin': '1' } })).status).toBe(200)
    expect((await simpleRequest(`${u}/pullmesh/v1/evict`, { method: 'POST', headers: { 'content-type': 'application/json; charset=utf-8' }, body: JSON.stringify({ target: img.blobs[0] }) })).status).toBe(200)
    expect(await cached(img.blobs[0]!)).toBe(false)
    // Every CLI command that changes the cache still works.
    for (const args of [['pin', 'life.test/library/csrf:v1'], ['unpin', 'life.test/library/csrf:v1'], ['evict', 'life.test/library/csrf:v1'], ['gc']]) {
      const r = await cli(...args)
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(0)
    }
    for (const d of img.blobs) expect(await cached(d)).toBe(false)
  })

  it('status shows the cache against its budget, the hit ratio and health', async () => {
    daemon = await start({ maxSize: '1GiB' })
    const d = up.addBlob('library/s', randomBytes(5000))
    for (let i = 0; i < 3; i++) {
      await simpleRequest(`${daemon.url()}/v2/life.test/library/s/blobs/${d}`)
      await fillsDone()
    }
    const human = await cli('status')
    expect(human.code, human.stderr).toBe(0)
    expect(human.stdout).toContain('of 1.0 GiB')
    expect(human.stdout).toMatch(/hit ratio: 66\.7%/)
    const json = JSON.parse((await cli('status', '--json')).stdout)
    expect(json.cache).toMatchObject({ blobs: 1, maxBytes: 1024 * MiB, hits: 2, misses: 1 })
    expect(json.mesh).toEqual({ enabled: false })
  })
})
