// A full cache disk (a small tmpfs, filled up by the test): a cached tag past its TTL that the upstream
// confirms is still served (only the note of the confirmation is lost), and a miss that cannot be stored
// says why (507, "disk is full") instead of a bare "internal error". Nothing is left half-written.
import { randomBytes } from 'node:crypto'
import { mkdtemp, open, readdir, rm, rmdir } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { MediaType } from '../../src/oci/media-types.js'
import { parseDigest } from '../../src/oci/digest.js'
import { requireRoot, run } from '../helpers/exec.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'

let up: FaultUpstream
let mnt = ''
let mounted = false
let daemon: Daemon | undefined
const lines: Array<Record<string, unknown>> = []

/** Writes a filler file until the disk refuses even one more byte (ENOSPC). */
async function fillDisk (path: string): Promise<void> {
  const fh = await open(path, 'w')
  try {
    for (const size of [1024 * 1024, 64 * 1024, 4096, 1]) {
      const chunk = Buffer.alloc(size, 1)
      for (let i = 0; i < 100_000; i++) {
        try {
          await fh.write(chunk)
        } catch (err) {
          if ((err as { code?: string }).code !== 'ENOSPC') throw err
          break
        }
      }
    }
  } finally {
    await fh.close().catch(() => {})
  }
}

beforeAll(async () => {
  requireRoot()
  up = await startFaultUpstream()
  mnt = await mkdtemp(join(tmpdir(), 'pm-full-'))
  await run('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mnt], { timeoutMs: 10_000 })
  mounted = true
  daemon = createDaemon(buildConfig({
    listen: '127.0.0.1:0', dataDir: join(mnt, 'data'), mesh: false, tagTtl: '0s', upstream: [`full.test=${up.url}`], upstreamRetries: '1',
  }, {}), { logger: createLogger('warn', new Writable({ write (chunk: Buffer, _e, cb) { for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>); cb() } })) })
  await daemon.start()
})
afterAll(async () => {
  await daemon?.stop()
  await up.close()
  if (mounted) await run('umount', [mnt], { timeoutMs: 10_000 })
  if (mnt !== '') await rmdir(mnt).catch(async () => await rm(mnt, { recursive: true, force: true }))
})

describe('a full cache disk', () => {
  it('serves a confirmed cached tag and answers a miss it cannot store with 507', async () => {
    const d = daemon!
    const cfg = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [] } }))
    const cfgD = up.addBlob('library/app', cfg)
    const m = up.addManifest('library/app', 'v1', { schemaVersion: 2, mediaType: MediaType.ociManifest, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: cfgD, size: cfg.length }, layers: [] }, MediaType.ociManifest)
    expect((await simpleRequest(`${d.url()}/v2/full.test/library/app/manifests/v1`)).headers['docker-content-digest']).toBe(m)
    expect((await simpleRequest(`${d.url()}/v2/full.test/library/app/blobs/${cfgD}`)).status).toBe(200)
    await expect.poll(async () => await d.store.stat(parseDigest(cfgD))).toBeDefined()
    await fillDisk(join(mnt, 'filler'))

    // The tag is past its TTL (0 s): each GET revalidates it with a HEAD, which confirms it, and records when.
    // LevelDB appends that small record to its log in a page the disk already gave it, so the first few
    // records still fit; revalidate until one does not (a page is 4 KiB, a record a few hundred bytes), and
    // every answer must still be the manifest.
    const failed = (): boolean => lines.some(l => l.msg === 'could not record the tag\'s revalidation; serving it anyway')
    let n = 0
    for (; n < 200 && !failed(); n++) {
      const again = await simpleRequest(`${d.url()}/v2/full.test/library/app/manifests/v1`)
      expect(again.status).toBe(200)
      expect(again.headers['docker-content-digest']).toBe(m)
    }
    expect(failed()).toBe(true)
    const after = await simpleRequest(`${d.url()}/v2/full.test/library/app/manifests/v1`)
    expect(after.status).toBe(200)

    // A miss cannot be stored: the client is told the disk is full, and no temp file is left behind.
    const big = up.addBlob('library/app', randomBytes(4 * 1024 * 1024))
    const miss = await simpleRequest(`${d.url()}/v2/full.test/library/app/blobs/${big}`)
    expect(miss.status).toBe(507)
    expect(miss.body.toString()).toContain('disk is full')
    expect(await readdir(join(mnt, 'data', 'tmp')).catch(() => [])).toEqual([])

    // The daemon stops cleanly on the full disk (LevelDB has refused writes by now), and once space is freed
    // a new daemon on the same data dir serves what was cached, with the upstream down.
    await d.stop()
    await rm(join(mnt, 'filler'))
    daemon = createDaemon(buildConfig({
      listen: '127.0.0.1:0', dataDir: join(mnt, 'data'), mesh: false, upstream: [`full.test=${up.url}`], upstreamRetries: '1',
    }, {}), { logger: createLogger('silent') })
    await daemon.start()
    up.setFault({ kind: 'status', status: 503 })
    const byDigest = await simpleRequest(`${daemon.url()}/v2/full.test/library/app/manifests/${m}`)
    expect(byDigest.status).toBe(200)
    expect(byDigest.headers['docker-content-digest']).toBe(m)
    const config = await simpleRequest(`${daemon.url()}/v2/full.test/library/app/blobs/${cfgD}`)
    expect(config.status).toBe(200)
    expect(config.body.equals(cfg)).toBe(true)
  })
})
