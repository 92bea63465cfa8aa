// Seeding content: random blobs into the upstream, and a many-blob index into a pullmesh data dir
// (through the daemon's own store, from dist/, so the index format is always the real one) and into a
// distribution storage root (its documented filesystem layout).
import { createHash, randomBytes } from 'node:crypto'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { pushBlob } from '../../helpers/registry.js'
import { REPO_ROOT } from './procs.js'

export interface SeededBlob { digest: string, size: number, repo: string }

/** Pushes `size` random bytes as a blob of `repo` (monolithic upload). */
export async function seedBlob (upstreamUrl: string, repo: string, size: number): Promise<SeededBlob> {
  let data: Buffer | undefined = randomBytes(size)
  const digest = await pushBlob(upstreamUrl, repo, data)
  data = undefined
  return { digest, size, repo }
}

/** `n` distinct small blobs (digest, bytes), deterministic from `seed`. */
export function smallBlobs (n: number, seed: string): Array<{ digest: string, data: Buffer }> {
  const out: Array<{ digest: string, data: Buffer }> = []
  for (let i = 0; i < n; i++) {
    const data = Buffer.from(`pullmesh bench index blob ${seed} ${i} ${'x'.repeat(i % 512)}\n`)
    out.push({ digest: 'sha256:' + createHash('sha256').update(data).digest('hex'), data })
  }
  return out
}

/** Writes blobs into a pullmesh data dir through the real store (dist/store/fs-store.js). */
export async function seedPullmeshIndex (dataDir: string, blobs: Array<{ digest: string, data: Buffer }>, concurrency = 16): Promise<void> {
  const dist = (p: string): string => pathToFileURL(join(REPO_ROOT, 'dist', p)).href
  const { createFsStore } = await import(dist('store/fs-store.js')) as { createFsStore: (c: unknown, i: unknown) => { start: () => Promise<void>, stop: () => Promise<void>, putBuffer: (d: string, b: Buffer, m: unknown) => Promise<unknown> } }
  const { createLogger } = await import(dist('logger.js')) as { createLogger: (l: string) => unknown }
  const { createMetrics } = await import(dist('metrics.js')) as { createMetrics: () => unknown }
  const store = createFsStore({ logger: createLogger('warn'), metrics: createMetrics() }, { dataDir })
  await store.start()
  try {
    let next = 0
    await Promise.all(Array.from({ length: concurrency }, async () => {
      while (next < blobs.length) {
        const b = blobs[next++]!
        await store.putBuffer(b.digest, b.data, { mediaType: 'application/octet-stream', repo: 'bench.test/bench/index', private: false })
      }
    }))
  } finally {
    await store.stop()
  }
}

/** Writes blobs into a distribution filesystem storage root (`docker/registry/v2/blobs/sha256/xx/hex/data`). */
export async function seedDistributionStorage (root: string, blobs: Array<{ digest: string, data: Buffer }>): Promise<void> {
  for (const b of blobs) {
    const hex = b.digest.slice('sha256:'.length)
    const dir = join(root, 'docker', 'registry', 'v2', 'blobs', 'sha256', hex.slice(0, 2), hex)
    await mkdir(dir, { recursive: true })
    await writeFile(join(dir, 'data'), b.data)
  }
}
