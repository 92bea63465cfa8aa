// A fill reader destroyed before its first chunk (a client gone before any byte was ready) must let go
// of everything: once the fill is done, nothing of it keeps a stored blob open (which would keep the blob
// from ever being evicted). The fill runs on the real store; its source is a stream the test controls.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, readdir, readlink, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PassThrough } from 'node:stream'
import { afterEach, describe, expect, it } from 'vitest'
import { Fill, type FillSource } from '../../src/content/fill.js'
import { createLogger } from '../../src/logger.js'
import { createMetrics } from '../../src/metrics.js'
import { parseDigest } from '../../src/oci/digest.js'
import { createFsStore } from '../../src/store/fs-store.js'
import type { BlobStore } from '../../src/store/types.js'

let store: BlobStore | undefined
let dir = ''
afterEach(async () => {
  await store?.stop()
  if (dir !== '') await rm(dir, { recursive: true, force: true })
})

describe('fill readers', () => {
  it('a reader destroyed before its first chunk holds nothing open once the fill is done', async () => {
    dir = await mkdtemp(join(tmpdir(), 'pm-fill-reader-'))
    store = createFsStore({ logger: createLogger('silent'), metrics: createMetrics() }, { dataDir: dir })
    await store.start()
    const data = randomBytes(3 * 1024 * 1024)
    const digest = parseDigest(`sha256:${createHash('sha256').update(data).digest('hex')}`)
    const body = new PassThrough()
    // A source that is not streamed: readers see nothing until the whole blob has verified.
    const source: FillSource = { label: 'test', kind: 'peer', streamable: false, open: async () => ({ body, size: data.length }) }
    const fill = new Fill(digest, store, { mediaType: 'application/octet-stream' })
    const running = fill.run([source], new AbortController().signal)
    // A reader made before any byte is readable, and destroyed at once (its client went away).
    const reader = fill.createReader()
    reader.resume()
    await new Promise(resolve => setImmediate(resolve))
    reader.destroy()
    body.end(data)
    await running
    expect(fill.state).toBe('done')
    // Give a reader that wrongly carried on the time to open the stored blob.
    await new Promise(resolve => setTimeout(resolve, 200))
    expect(store.inUse(digest), 'the stored blob is held open by a destroyed reader').toBe(false)
    // Nor any file descriptor of this process on the blob (the fill's own attempt file is the same inode).
    const fds = await readdir('/proc/self/fd')
    const targets = await Promise.all(fds.map(async fd => await readlink(`/proc/self/fd/${fd}`).catch(() => '')))
    expect(targets.filter(t => t.startsWith(join(dir, 'blobs')) || t.startsWith(join(dir, 'tmp'))), 'descriptors still open on the blob').toEqual([])
    expect((await store.stat(digest))?.size).toBe(data.length)
    expect(await store.delete(digest)).toBe(true)
  })

  it('a late reader of a finished fill whose blob was evicted meanwhile gets BLOB_UNKNOWN (a retry), not an internal error', async () => {
    dir = await mkdtemp(join(tmpdir(), 'pm-fill-reader-'))
    store = createFsStore({ logger: createLogger('silent'), metrics: createMetrics() }, { dataDir: dir })
    await store.start()
    const data = randomBytes(1024 * 1024)
    const digest = parseDigest(`sha256:${createHash('sha256').update(data).digest('hex')}`)
    const body = new PassThrough()
    const fill = new Fill(digest, store, { mediaType: 'application/octet-stream' })
    const running = fill.run([{ label: 'test', kind: 'upstream', streamable: true, open: async () => ({ body, size: data.length }) }], new AbortController().signal)
    body.end(data)
    await running
    expect(await store.delete(digest)).toBe(true) // evicted between the fill's end and the late reader
    const err = await new Promise<unknown>((resolve) => {
      const reader = fill.createReader()
      reader.on('error', resolve)
      reader.on('end', () => resolve(undefined))
      reader.resume()
    })
    expect((err as { code?: string, status?: number } | undefined)).toMatchObject({ code: 'BLOB_UNKNOWN', status: 404 })
  })
})
