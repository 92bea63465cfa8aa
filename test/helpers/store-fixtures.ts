// Shared helpers for the store tests: temp data dirs, a silent logger, random blobs, and
// raw checks of the on-disk layout that do not go through the store.
import { createHash, randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Level } from 'level'
import { createLogger } from '../../src/logger.js'
import { createMetrics, type Metrics } from '../../src/metrics.js'
import type { Digest } from '../../src/oci/digest.js'
import type { BlobInfo } from '../../src/store/types.js'

export async function makeTempDir (prefix = 'pullmesh-store-'): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix))
}

export async function removeDir (dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true })
}

export function silentComponents (): { logger: ReturnType<typeof createLogger>, metrics: Metrics } {
  return { logger: createLogger('silent'), metrics: createMetrics() }
}

export function sha256 (buf: Uint8Array): Digest {
  return `sha256:${createHash('sha256').update(buf).digest('hex')}` as Digest
}

export function randomBlob (size: number): { bytes: Buffer, digest: Digest } {
  const bytes = randomBytes(size)
  return { bytes, digest: sha256(bytes) }
}

export function blobFile (dataDir: string, d: Digest): string {
  const [alg, hex] = d.split(':') as [string, string]
  return join(dataDir, 'blobs', alg, hex.slice(0, 2), hex)
}

/** Every file under blobs/, as digests (throws on anything that is not a well-placed blob file). */
export async function listBlobFiles (dataDir: string): Promise<Digest[]> {
  const out: Digest[] = []
  const root = join(dataDir, 'blobs')
  if (!existsSync(root)) return out
  for (const alg of await readdir(root)) {
    for (const prefix of await readdir(join(root, alg))) {
      for (const name of await readdir(join(root, alg, prefix))) {
        if (!name.startsWith(prefix)) throw new Error(`misplaced blob file ${alg}/${prefix}/${name}`)
        out.push(`${alg}:${name}` as Digest)
      }
    }
  }
  return out
}

export async function listTempFiles (dataDir: string): Promise<string[]> {
  const dir = join(dataDir, 'tmp')
  return existsSync(dir) ? readdir(dir) : []
}

/** Reads the index directly (the store must be stopped). */
export async function readRawIndex (dataDir: string): Promise<{ blobs: Map<Digest, BlobInfo>, tags: Map<string, { digest: Digest }> }> {
  const db = new Level<string, unknown>(join(dataDir, 'index'), { valueEncoding: 'json' })
  await db.open()
  try {
    const blobs = new Map<Digest, BlobInfo>()
    const tags = new Map<string, { digest: Digest }>()
    for await (const [k, v] of db.iterator()) {
      if (k.startsWith('blob!')) blobs.set(k.slice(5) as Digest, v as BlobInfo)
      else if (k.startsWith('tag!')) tags.set(k.slice(4), v as { digest: Digest })
    }
    return { blobs, tags }
  } finally {
    await db.close()
  }
}

/** Hashes a stored file and says whether it matches its name and the expected size. */
export async function fileVerifies (dataDir: string, d: Digest, size?: number): Promise<boolean> {
  const p = blobFile(dataDir, d)
  if (!existsSync(p)) return false
  if (size !== undefined && (await stat(p)).size !== size) return false
  return sha256(await readFile(p)) === d
}

export async function collect (stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const c of stream) chunks.push(c as Buffer)
  return Buffer.concat(chunks)
}
