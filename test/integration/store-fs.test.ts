import { appendFile, mkdir, open as openFile, readFile, truncate, unlink, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import type { Readable } from 'node:stream'
import { Level } from 'level'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { VerificationError } from '../../src/errors.js'
import type { Digest } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { BlobTooLargeError, StoreClosedError } from '../../src/store/errors.js'
import { createFsStore } from '../../src/store/fs-store.js'
import type { BlobStore, StoreEvent } from '../../src/store/types.js'
import {
  blobFile, collect, fileVerifies, listBlobFiles, listTempFiles, makeTempDir, randomBlob, readRawIndex,
  removeDir, sha256, silentComponents,
} from '../helpers/store-fixtures.js'

const LAYER = 'application/vnd.oci.image.layer.v1.tar+gzip'

describe('fs store', () => {
  let dataDir: string
  let components: ReturnType<typeof silentComponents>
  let store: BlobStore
  const open = async (): Promise<BlobStore> => {
    store = createFsStore(components, { dataDir })
    await store.start()
    return store
  }

  beforeEach(async () => {
    dataDir = await makeTempDir()
    components = silentComponents()
    await open()
  })
  afterEach(async () => {
    await store.stop()
    await removeDir(dataDir)
  })

  async function put (size: number, meta = { mediaType: LAYER }): Promise<{ bytes: Buffer, digest: Digest }> {
    const b = randomBlob(size)
    const w = await store.createWriter(b.digest, { expectedSize: size })
    for (let off = 0; off < size; off += 100_000) await w.write(b.bytes.subarray(off, off + 100_000))
    await w.commit(meta)
    return b
  }

  it('stores a verified write and reads it back', async () => {
    const { bytes, digest } = randomBlob(300_000)
    const w = await store.createWriter(digest, { expectedSize: bytes.length })
    expect(w.tempPath.startsWith(join(dataDir, 'tmp'))).toBe(true)
    await w.write(bytes.subarray(0, 1000))
    // write() resolves once the chunk is accepted; bytesWritten follows as the bytes reach the file.
    await expect.poll(() => w.bytesWritten).toBe(1000)
    // Others may read the growing temp file up to bytesWritten.
    expect((await readFile(w.tempPath)).subarray(0, w.bytesWritten).equals(bytes.subarray(0, 1000))).toBe(true)
    await w.write(bytes.subarray(1000))
    await expect.poll(() => w.bytesWritten).toBe(bytes.length)
    const info = await w.commit({ mediaType: LAYER, repo: 'docker.io/library/alpine' })
    expect(info).toMatchObject({ digest, size: bytes.length, mediaType: LAYER, repos: ['docker.io/library/alpine'], private: false })
    expect(await store.stat(digest)).toEqual(info)
    expect(await fileVerifies(dataDir, digest, bytes.length)).toBe(true)
    expect(await listTempFiles(dataDir)).toEqual([])
    const s = await store.createReadStream(digest)
    expect((await collect(s!)).equals(bytes)).toBe(true)
    expect((await store.readBuffer(digest, 1 << 20))!.equals(bytes)).toBe(true)
    await expect(store.readBuffer(digest, 10)).rejects.toBeInstanceOf(BlobTooLargeError)
    expect(store.usage()).toEqual({ bytes: bytes.length, blobs: 1 })
    expect((await components.metrics.storeBytes.get()).values[0]?.value).toBe(bytes.length)
    expect((await components.metrics.storeBlobs.get()).values[0]?.value).toBe(1)
    await w.abort() // no-op after commit
    expect(await fileVerifies(dataDir, digest)).toBe(true)
  })

  it('stores an empty blob', async () => {
    const { bytes, digest } = randomBlob(0)
    const info = await store.putBuffer(digest, bytes, { mediaType: LAYER })
    expect(info.size).toBe(0)
    expect(await collect((await store.createReadStream(digest))!)).toEqual(Buffer.alloc(0))
  })

  it('rejects a wrong digest and stores nothing', async () => {
    const { bytes } = randomBlob(5000)
    const other = randomBlob(10).digest
    const w = await store.createWriter(other)
    await w.write(bytes)
    const err = await w.commit({ mediaType: LAYER }).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(VerificationError)
    expect((err as VerificationError).code).toBe('PM_VERIFICATION_FAILED')
    expect(await store.stat(other)).toBeUndefined()
    expect(await listBlobFiles(dataDir)).toEqual([])
    expect(await listTempFiles(dataDir)).toEqual([])
    await w.abort() // safe after a failed commit
    await expect(store.putBuffer(other, bytes, { mediaType: LAYER })).rejects.toBeInstanceOf(VerificationError)
    expect((await components.metrics.verificationFailures.get()).values).toEqual([expect.objectContaining({ labels: { source: 'store' }, value: 2 })])
    expect(store.usage()).toEqual({ bytes: 0, blobs: 0 })
  })

  it('rejects a short write', async () => {
    const { bytes, digest } = randomBlob(5000)
    const w = await store.createWriter(digest, { expectedSize: 5000 })
    await w.write(bytes.subarray(0, 4000))
    await expect(w.commit({ mediaType: LAYER })).rejects.toBeInstanceOf(VerificationError)
    expect(await store.stat(digest)).toBeUndefined()
    expect(await listTempFiles(dataDir)).toEqual([])
  })

  it('rejects a write past the expected size', async () => {
    const { bytes, digest } = randomBlob(5000)
    const w = await store.createWriter(digest, { expectedSize: 4999 })
    await w.write(bytes.subarray(0, 4000))
    await expect(w.write(bytes.subarray(4000))).rejects.toBeInstanceOf(VerificationError)
    await expect.poll(() => w.bytesWritten).toBe(4000)
    await w.abort()
    await w.abort()
    expect(await listTempFiles(dataDir)).toEqual([])
    expect(await store.stat(digest)).toBeUndefined()
  })

  it('gathers chunks that arrive while a write is in flight into one write, and reports each step', async () => {
    const { bytes, digest } = randomBlob(100 * 65536 + 5)
    const progress: number[] = []
    const w = await store.createWriter(digest, { expectedSize: bytes.length, onProgress: () => progress.push(w.bytesWritten) })
    const writes: Array<Promise<void>> = []
    for (let off = 0; off < bytes.length; off += 65536) writes.push(w.write(bytes.subarray(off, off + 65536)))
    await Promise.all(writes)
    await expect.poll(() => w.bytesWritten).toBe(bytes.length)
    // 101 chunks, written in far fewer steps (the first alone, the rest as they queued behind it).
    expect(progress.length).toBeLessThan(10)
    expect(progress.at(-1)).toBe(bytes.length)
    expect(progress).toEqual([...progress].sort((a, b) => a - b))
    expect((await w.commit({ mediaType: LAYER })).size).toBe(bytes.length)
    expect(await fileVerifies(dataDir, digest, bytes.length)).toBe(true)
  })

  it('verifies a large blob from the file itself: bytes changed on disk before the commit are refused', async () => {
    const { bytes, digest } = randomBlob(6 * 1024 * 1024 + 7)
    const w = await store.createWriter(digest, { expectedSize: bytes.length })
    // The hashing thread (running since the store started) is told of written bytes a MiB at a time and
    // reads them at once; the last 512 KiB are below that step, so it reads them only at commit.
    const tail = bytes.length - 512 * 1024
    await w.write(bytes.subarray(0, tail))
    await expect.poll(() => w.bytesWritten).toBe(tail)
    await w.write(bytes.subarray(tail))
    await expect.poll(() => w.bytesWritten).toBe(bytes.length)
    // Damage the temp file behind the writer's back: what is on disk is what gets verified.
    const at = bytes.length - 1000
    const fh = await openFile(w.tempPath, 'r+')
    await fh.write(Buffer.from([bytes[at]! ^ 0xff]), 0, 1, at)
    await fh.close()
    await expect(w.commit({ mediaType: LAYER })).rejects.toBeInstanceOf(VerificationError)
    expect(await store.stat(digest)).toBeUndefined()
    expect(await listTempFiles(dataDir)).toEqual([])
    // A large wrong digest is refused too, and a right one commits.
    const other = randomBlob(5 * 1024 * 1024)
    const liar = await store.createWriter(digest, { expectedSize: other.bytes.length })
    await liar.write(other.bytes)
    await expect(liar.commit({ mediaType: LAYER })).rejects.toBeInstanceOf(VerificationError)
    const good = await store.createWriter(digest, { expectedSize: bytes.length })
    for (let off = 0; off < bytes.length; off += 65536) await good.write(bytes.subarray(off, off + 65536))
    expect((await good.commit({ mediaType: LAYER })).size).toBe(bytes.length)
    expect(await fileVerifies(dataDir, digest, bytes.length)).toBe(true)
  })

  it('holds back a writer that runs more than 4 MiB ahead of the file', async () => {
    const { bytes, digest } = randomBlob(12 * 1024 * 1024)
    const w = await store.createWriter(digest, { expectedSize: bytes.length })
    let accepted = 0
    const writes = [0, 1, 2, 3, 4, 5].map(async i => { await w.write(bytes.subarray(i * 2 * 1024 * 1024, (i + 1) * 2 * 1024 * 1024)); accepted++ })
    await Promise.resolve()
    // The first two are under the window and resolve at once; later ones wait for the file.
    expect(accepted).toBe(2)
    await Promise.all(writes)
    expect((await w.commit({ mediaType: LAYER })).size).toBe(bytes.length)
  })

  it('lets concurrent writers of one digest both succeed with one verified file', async () => {
    const { bytes, digest } = randomBlob(2_000_000)
    const events: StoreEvent[] = []
    store.subscribe(e => events.push(e))
    const writers = await Promise.all([1, 2, 3].map(async () => store.createWriter(digest, { expectedSize: bytes.length })))
    for (let off = 0; off < bytes.length; off += 256 * 1024) {
      await Promise.all(writers.map(async w => w.write(bytes.subarray(off, off + 256 * 1024))))
    }
    const infos = await Promise.all(writers.map(async (w, i) => w.commit({ mediaType: LAYER, repo: `r/${i}` })))
    for (const info of infos) expect(info.digest).toBe(digest)
    expect((await store.stat(digest))!.repos.sort()).toEqual(['r/0', 'r/1', 'r/2'])
    expect(await fileVerifies(dataDir, digest, bytes.length)).toBe(true)
    expect(await listTempFiles(dataDir)).toEqual([])
    expect(store.usage()).toEqual({ bytes: bytes.length, blobs: 1 })
    expect(events.filter(e => e.type === 'added')).toHaveLength(1)
  })

  it('serves inclusive byte ranges', async () => {
    const { bytes, digest } = await put(3 * 1024 * 1024 + 17)
    for (const [start, end] of [[0, 0], [5, 5], [1000, 2_500_000], [bytes.length - 1, bytes.length - 1], [0, bytes.length - 1]] as const) {
      const s = await store.createReadStream(digest, { start, end })
      expect((await collect(s!)).equals(bytes.subarray(start, end + 1))).toBe(true)
    }
    await expect(store.createReadStream(digest, { start: 0, end: bytes.length })).rejects.toBeInstanceOf(RangeError)
  })

  it('returns undefined for missing content and drops an entry whose file vanished', async () => {
    expect(await store.stat(randomBlob(1).digest)).toBeUndefined()
    expect(await store.createReadStream(randomBlob(1).digest)).toBeUndefined()
    expect(await store.readBuffer(randomBlob(1).digest, 100)).toBeUndefined()
    const { digest } = await put(1000)
    const events: StoreEvent[] = []
    store.subscribe(e => events.push(e))
    await unlink(blobFile(dataDir, digest))
    expect(await store.createReadStream(digest)).toBeUndefined()
    expect(await store.stat(digest)).toBeUndefined()
    expect(events).toEqual([{ type: 'removed', digest }])
    await store.stop()
    expect((await readRawIndex(dataDir)).blobs.size).toBe(0)
  })

  it('never streams a file that was truncated behind its back: the entry is dropped', async () => {
    const { digest } = await put(5000)
    await truncate(blobFile(dataDir, digest), 1000)
    expect(await store.createReadStream(digest)).toBeUndefined()
    expect(await store.stat(digest)).toBeUndefined()
  })

  it('putBuffer stores manifests, and a repeat put merges repos', async () => {
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociManifest, config: {}, layers: [] }))
    const d = sha256(manifest)
    await store.putBuffer(d, manifest, { mediaType: MediaType.ociManifest, repo: 'a/b', private: true })
    const again = await store.putBuffer(d, manifest, { mediaType: MediaType.ociManifest, repo: 'a/c', private: true })
    expect(again).toMatchObject({ repos: ['a/b', 'a/c'], private: true })
    const events: StoreEvent[] = []
    store.subscribe(e => events.push(e))
    const pub = await store.putBuffer(d, manifest, { mediaType: MediaType.ociManifest })
    expect(pub.private).toBe(false)
    expect(events).toEqual([{ type: 'added', info: pub }])
    expect(await store.readBuffer(d, 4 << 20)).toEqual(manifest)
  })

  it('deletes content: index first, then file, then an event', async () => {
    const { digest } = await put(1000)
    const events: StoreEvent[] = []
    store.subscribe(e => events.push(e))
    expect(await store.delete(digest)).toBe(true)
    expect(await store.delete(digest)).toBe(false)
    expect(await store.stat(digest)).toBeUndefined()
    expect(await listBlobFiles(dataDir)).toEqual([])
    expect(events).toEqual([{ type: 'removed', digest }])
    expect(store.usage()).toEqual({ bytes: 0, blobs: 0 })
  })

  it('emits events after the index change is visible, and unsubscribes', async () => {
    const seen: Array<{ e: StoreEvent, visible: boolean }> = []
    const off = store.subscribe(e => {
      if (e.type === 'added') seen.push({ e, visible: store.usage().blobs === 1 })
      else seen.push({ e, visible: true })
    })
    store.subscribe(() => { throw new Error('a bad listener does not break the store') })
    const { digest } = await put(10)
    await store.putTag('docker.io', 'library/x', 'v1', { digest, mediaType: LAYER, size: 10, verifiedAt: 1, private: false })
    off()
    await store.delete(digest)
    expect(seen.map(s => s.e.type)).toEqual(['added', 'tag'])
    expect(seen.every(s => s.visible)).toBe(true)
    expect(seen[1]!.e).toEqual({ type: 'tag', upstream: 'docker.io', repo: 'library/x', tag: 'v1', record: { digest, mediaType: LAYER, size: 10, verifiedAt: 1, private: false } })
  })

  it('puts, gets, lists and deletes tags', async () => {
    const { digest } = await put(10)
    const rec = { digest, mediaType: MediaType.ociIndex, size: 10, verifiedAt: Date.now(), private: false }
    await store.putTag('docker.io', 'library/alpine', '3.20', rec)
    await store.putTag('ghcr.io:443', 'org/team/app', 'latest', { ...rec, private: true })
    expect(await store.getTag('docker.io', 'library/alpine', '3.20')).toEqual(rec)
    expect(await store.getTag('docker.io', 'library/alpine', 'nope')).toBeUndefined()
    const all = []
    for await (const t of store.listTags()) all.push(t)
    expect(all).toEqual([
      { upstream: 'docker.io', repo: 'library/alpine', tag: '3.20', record: rec },
      { upstream: 'ghcr.io:443', repo: 'org/team/app', tag: 'latest', record: { ...rec, private: true } },
    ])
    await store.deleteTag('docker.io', 'library/alpine', '3.20')
    expect(await store.getTag('docker.io', 'library/alpine', '3.20')).toBeUndefined()
    await expect(store.putTag('docker.io', 'x', 'a:b', rec)).rejects.toBeInstanceOf(TypeError)
  })

  it('keeps data, tags and access times across a restart', async () => {
    const a = await put(1000)
    const b = await put(2000)
    await store.putTag('docker.io', 'library/a', '1', { digest: a.digest, mediaType: LAYER, size: 1000, verifiedAt: 5, private: false })
    const before = (await store.stat(a.digest))!
    await new Promise(resolve => setTimeout(resolve, 5))
    store.touch(a.digest, 'docker.io/library/other')
    const touched = (await store.stat(a.digest))!
    expect(touched.lastAccess).toBeGreaterThan(before.lastAccess)
    await store.stop()
    await store.stop()
    await expect(store.stat(a.digest)).rejects.toBeInstanceOf(StoreClosedError)
    expect(store.usage()).toEqual({ bytes: 0, blobs: 0 })
    await open()
    await store.start()
    expect(await store.stat(a.digest)).toEqual(touched)
    expect((await store.stat(a.digest))!.repos).toContain('docker.io/library/other')
    expect(await store.stat(b.digest)).toMatchObject({ size: 2000 })
    expect(await store.getTag('docker.io', 'library/a', '1')).toMatchObject({ digest: a.digest })
    expect(store.usage()).toEqual({ bytes: 3000, blobs: 2 })
    const listed = []
    for await (const i of store.listBlobs()) listed.push(i.digest)
    expect(listed.sort()).toEqual([a.digest, b.digest].sort())
  })

  it('stop aborts open writers and start/stop are idempotent', async () => {
    const { bytes, digest } = randomBlob(100)
    const w = await store.createWriter(digest)
    await w.write(bytes)
    await Promise.all([store.stop(), store.stop()])
    expect(await listTempFiles(dataDir)).toEqual([])
    await expect(w.commit({ mediaType: LAYER })).rejects.toThrow()
    await Promise.all([store.start(), store.start()])
    expect(await store.stat(digest)).toBeUndefined()
  })

  describe('start-up reconcile', () => {
    it('repairs temp files, missing files, orphans, bad orphans, size mismatches and dangling tags', async () => {
      const kept = await put(1000)
      const missing = await put(1000)
      const resized = await put(1000)
      await store.putTag('docker.io', 'r', 'kept', { digest: kept.digest, mediaType: LAYER, size: 1000, verifiedAt: 1, private: false })
      await store.putTag('docker.io', 'r', 'gone', { digest: missing.digest, mediaType: LAYER, size: 1000, verifiedAt: 1, private: false })
      await store.stop()

      await writeFile(join(dataDir, 'tmp', 'leftover'), 'partial')
      await unlink(blobFile(dataDir, missing.digest))
      await appendFile(blobFile(dataDir, resized.digest), 'x')
      const orphan = randomBlob(1500)
      await mkdir(dirname(blobFile(dataDir, orphan.digest)), { recursive: true })
      await writeFile(blobFile(dataDir, orphan.digest), orphan.bytes)
      const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.dockerManifest, config: {}, layers: [] }))
      const orphanManifest = sha256(manifest)
      await mkdir(dirname(blobFile(dataDir, orphanManifest)), { recursive: true })
      await writeFile(blobFile(dataDir, orphanManifest), manifest)
      const bad = randomBlob(10).digest
      await mkdir(dirname(blobFile(dataDir, bad)), { recursive: true })
      await writeFile(blobFile(dataDir, bad), 'not what the name says')
      await writeFile(join(dirname(blobFile(dataDir, bad)), 'junk'), 'x')

      const lines: string[] = []
      const { createLogger } = await import('../../src/logger.js')
      const logger = createLogger('info', { write: (s: string) => { lines.push(s) } })
      store = createFsStore({ logger, metrics: components.metrics }, { dataDir })
      await store.start()

      expect(await listTempFiles(dataDir)).toEqual([])
      expect(await store.stat(kept.digest)).toMatchObject({ size: 1000 })
      expect(await store.stat(missing.digest)).toBeUndefined()
      expect(await store.stat(resized.digest)).toBeUndefined()
      expect(await store.stat(orphan.digest)).toMatchObject({ size: 1500, mediaType: MediaType.octetStream, private: true })
      expect(await store.stat(orphanManifest)).toMatchObject({ mediaType: MediaType.dockerManifest })
      expect(await store.stat(bad)).toBeUndefined()
      expect((await listBlobFiles(dataDir)).sort()).toEqual([kept.digest, orphan.digest, orphanManifest].sort())
      expect(await store.getTag('docker.io', 'r', 'kept')).toBeDefined()
      expect(await store.getTag('docker.io', 'r', 'gone')).toBeUndefined()
      expect(store.usage()).toEqual({ bytes: 1000 + 1500 + manifest.length, blobs: 3 })

      const summary = JSON.parse(lines.find(l => l.includes('repaired'))!) as Record<string, number>
      expect(summary).toMatchObject({
        tempRemoved: 1, missing: 1, sizeMismatch: 1, orphansIndexed: 2, orphansRemoved: 2, strayRemoved: 1, tagsDropped: 1,
      })

      await store.stop()
      const raw = await readRawIndex(dataDir)
      expect([...raw.blobs.keys()].sort()).toEqual([kept.digest, orphan.digest, orphanManifest].sort())
      expect([...raw.tags.keys()]).toEqual(['docker.io/r:kept'])
    })

    it('re-indexes a file whose index entry had the wrong size but whose content verifies', async () => {
      const a = await put(1000)
      await store.stop()
      const db = new Level<string, unknown>(join(dataDir, 'index'), { valueEncoding: 'json' })
      await db.open()
      const info = await db.get(`blob!${a.digest}`) as Record<string, unknown>
      await db.put(`blob!${a.digest}`, { ...info, size: 999, repos: ['keep/me'] })
      await db.close()
      await open()
      expect(await store.stat(a.digest)).toMatchObject({ size: 1000, repos: ['keep/me'], mediaType: LAYER })
    })

    it('starts with a 10,000-blob index quickly', async () => {
      await store.stop()
      const n = 10_000
      const db = new Level<string, unknown>(join(dataDir, 'index'), { valueEncoding: 'json' })
      await db.open()
      let batch: Array<{ type: 'put', key: string, value: unknown }> = []
      const dirs = new Set<string>()
      let writes: Array<Promise<void>> = []
      for (let i = 0; i < n; i++) {
        const bytes = Buffer.from(`blob number ${i}`)
        const d = sha256(bytes)
        const p = blobFile(dataDir, d)
        if (!dirs.has(dirname(p))) { await mkdir(dirname(p), { recursive: true }); dirs.add(dirname(p)) }
        writes.push(writeFile(p, bytes))
        batch.push({ type: 'put', key: `blob!${d}`, value: { digest: d, size: bytes.length, mediaType: LAYER, lastAccess: 1, createdAt: 1, repos: ['a/b'], private: false } })
        if (batch.length === 500) { await Promise.all([db.batch(batch), ...writes]); batch = []; writes = [] }
      }
      await Promise.all([db.batch(batch), ...writes])
      await db.close()
      store = createFsStore(components, { dataDir })
      const t0 = performance.now()
      await store.start()
      const ms = performance.now() - t0
      console.log(`fs store start-up with ${n} indexed blobs: ${ms.toFixed(0)} ms`)
      expect(store.usage().blobs).toBe(n)
    })
  })

  it('never builds a path from an unvalidated digest', async () => {
    await expect(store.createWriter('sha256:../../etc/passwd' as Digest)).rejects.toBeInstanceOf(TypeError)
    await expect(store.delete('sha256:../x' as Digest)).rejects.toBeInstanceOf(TypeError)
  })

  it('reads into a chunk\'s buffer again only once the consumer hands it back', async () => {
    const { bytes, digest } = await put(7 * 1024 * 1024 + 333)
    const s = (await store.createReadStream(digest)) as Readable & { recycle: (c: Buffer) => void }
    const kept: Array<{ chunk: Buffer, copy: Buffer }> = []
    const seen = new Set<ArrayBuffer>()
    let reused = 0
    let i = 0
    for await (const chunk of s as AsyncIterable<Buffer>) {
      expect(chunk.length).toBeLessThanOrEqual(1024 * 1024)
      if (seen.has(chunk.buffer as ArrayBuffer)) reused++
      seen.add(chunk.buffer as ArrayBuffer)
      // Every other chunk is handed back at once; the rest are held, and must never change.
      if (i++ % 2 === 0) s.recycle(Buffer.from(chunk)) // not a chunk of this stream: ignored
      if (i % 2 === 0) kept.push({ chunk, copy: Buffer.from(chunk) })
      else s.recycle(chunk)
    }
    for (const k of kept) expect(k.chunk.equals(k.copy)).toBe(true)
    expect(Buffer.concat(kept.map(k => k.copy)).length).toBeGreaterThan(0)
    expect(reused).toBeGreaterThan(0)
    // A consumer that never hands chunks back (a plain pipe) gets every byte right too.
    expect((await collect((await store.createReadStream(digest))!)).equals(bytes)).toBe(true)
    expect(store.inUse(digest)).toBe(false)
  })

  it('ends a stream with an error, never short, when the file shrinks while it is read', async () => {
    const { digest } = await put(3 * 1024 * 1024)
    const s = (await store.createReadStream(digest))!
    await truncate(blobFile(dataDir, digest), 1024 * 1024 + 10)
    await expect(collect(s)).rejects.toThrow(/ended at/)
    expect(store.inUse(digest)).toBe(false)
  })

  it('streams a file that stays readable after the blob is deleted', async () => {
    const { bytes, digest } = await put(2_500_000)
    const s = (await store.createReadStream(digest))!
    await store.delete(digest)
    expect((await collect(s)).equals(bytes)).toBe(true)
  })
})
