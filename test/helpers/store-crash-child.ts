// Child process for the store crash test: opens the store in argv[2] and writes random blobs
// through it forever (with deletes, tags, touches, aborted and bad writes mixed in) until the
// parent SIGKILLs it. Prints "started" once the store is open, then "committed N" now and then.
// Run with: node --import tsx test/helpers/store-crash-child.ts <dataDir>
import { createHash, randomBytes, randomInt } from 'node:crypto'
import { createLogger } from '../../src/logger.js'
import { createMetrics } from '../../src/metrics.js'
import type { Digest } from '../../src/oci/digest.js'
import { createFsStore } from '../../src/store/fs-store.js'

const dataDir = process.argv[2]
if (dataDir === undefined) throw new Error('usage: store-crash-child.ts <dataDir>')

const store = createFsStore({ logger: createLogger('silent'), metrics: createMetrics() }, { dataDir, touchFlushIntervalMs: 20 })
await store.start()
process.stdout.write('started\n')

const known: Digest[] = []
let committed = 0

async function one (): Promise<void> {
  const roll = randomInt(100)
  if (roll < 8 && known.length > 0) {
    const d = known.splice(randomInt(known.length), 1)[0]!
    await store.delete(d)
    return
  }
  if (roll < 14 && known.length > 0) {
    const d = known[randomInt(known.length)]!
    store.touch(d, `docker.io/r${randomInt(5)}`)
    await store.putTag('docker.io', `library/r${randomInt(5)}`, `t${randomInt(10)}`, { digest: d, mediaType: 'application/octet-stream', size: 1, verifiedAt: Date.now(), private: false })
    return
  }
  const size = randomInt(10) === 0 ? randomInt(1 << 20, 3 << 20) : randomInt(0, 200_000)
  const bytes = randomBytes(size)
  const bad = roll >= 94
  const digest = `sha256:${createHash('sha256').update(bad ? randomBytes(8) : bytes).digest('hex')}` as Digest
  if (roll >= 90 && roll < 92) {
    await store.putBuffer(digest, bytes, { mediaType: 'application/octet-stream' }).then(() => { known.push(digest); committed++ })
    return
  }
  const w = await store.createWriter(digest, { expectedSize: size })
  const chunk = randomInt(4096, 256 * 1024)
  for (let off = 0; off < size; off += chunk) await w.write(bytes.subarray(off, off + chunk))
  if (roll >= 92 && roll < 94) { await w.abort(); return }
  try {
    await w.commit({ mediaType: 'application/octet-stream', repo: 'docker.io/library/crash' })
    known.push(digest)
    committed++
    if (committed % 20 === 0) process.stdout.write(`committed ${committed}\n`)
  } catch (err) {
    if (!bad) throw err
  }
}

async function worker (): Promise<void> {
  for (;;) await one()
}

await Promise.all(Array.from({ length: 6 }, worker))
